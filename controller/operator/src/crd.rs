//! The Migration custom resource (`automigrate.dev/v1alpha1`, kind `Migration`, namespaced).
//!
//! One Migration moves one pod. Its `spec` says what was asked (which pod, optionally to which
//! node, why, and whether a person or the controller asked); its `status` is the persisted state
//! machine of [`automigrate_core::migration`]: [`MigrationState`] flattened into the status so
//! `kubectl get migrations` shows `.status.phase`, `.status.source` and `.status.target`
//! directly, plus what the controller needs to resume after a restart (the policy's limits, the
//! transfers it started, the pod it is replacing, the replacement's name).
//!
//! A Migration without a status is a request: the next decision pass picks a target for it (the
//! one in `spec.target` if set) and writes the first status. The schema is generated from these
//! Rust types (`crdgen` prints it; `deploy/crd.yaml` is checked against it by a test), so the
//! API server never prunes a field the controller writes.

use std::collections::BTreeMap;

use automigrate_core::annotations::CheckpointMode;
use automigrate_core::decide::Trigger;
use automigrate_core::migration::{Limits, MigrationState, Phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every automigrate resource.
pub const GROUP: &str = "automigrate.dev";

/// Label on a Migration naming the pod it moves (for selectors and `kubectl get -l`).
pub const POD_LABEL: &str = "migration.automigrate.dev/pod";

/// Who asked for a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Origin {
    /// A person (`kubectl migrate`, or a Migration written by hand).
    Manual,
    /// The controller's decision pass.
    Automatic,
}

/// What a Migration asks for.
// kube's `printcolumn(...)` repeats `type_ = ...` once per column; clippy reads that as one
// attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "automigrate.dev",
    version = "v1alpha1",
    kind = "Migration",
    plural = "migrations",
    shortname = "mig",
    category = "automigrate",
    namespaced,
    status = "MigrationStatus",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the migration is in its state machine"
    ),
    printcolumn(
        name = "Pod",
        type_ = "string",
        json_path = ".spec.pod",
        description = "The pod being moved"
    ),
    printcolumn(
        name = "Source",
        type_ = "string",
        json_path = ".status.source",
        description = "The node the pod ran on"
    ),
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".status.target",
        description = "The node the pod is moved to"
    ),
    printcolumn(
        name = "Trigger",
        type_ = "string",
        json_path = ".spec.trigger",
        priority = 1,
        description = "Why the pod is moved"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// Name of the pod to move, in the Migration's namespace.
    pub pod: String,
    /// Move the pod to this node; unset lets the controller choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub origin: Origin,
    /// Why the engine moves the pod (automatic migrations); `manual` for a person's request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<Trigger>,
    /// The reason in words, as the decision pass or the person gave it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

// The transfer records and the stored checkpoint are the migration driver's own persisted
// types (automigrate_core::driver), kept in the status field for field.
pub use automigrate_core::driver::{RestoreSource, TransferPayload, TransferRecord};

/// The persisted migration: the core state machine plus what the driver needs to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The state machine of `automigrate_core::migration`, field for field.
    #[serde(flatten)]
    pub state: MigrationState,
    /// Phase deadlines and retry budget from the policy in force when the migration began.
    pub limits: Limits,
    /// The policy the migration runs under.
    pub policy: String,
    /// How the pod's state is captured and restored (annotation, else the policy's mode).
    #[serde(default)]
    pub mode: CheckpointMode,
    /// How long a node's Lease may go unrenewed before the node counts as dead (fencing).
    #[serde(with = "automigrate_core::units::duration")]
    #[schemars(with = "String")]
    pub lease_timeout: std::time::Duration,
    /// The newest stored checkpoint, used when the source cannot take a fresh one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_checkpoint: Option<RestoreSource>,
    /// The checkpoint an incremental final dump builds on (already sent while syncing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_checkpoint: Option<String>,
    #[serde(default)]
    pub transfers: Vec<TransferRecord>,
    /// Bytes sent to the target so far, over every transfer of this migration.
    #[serde(default)]
    pub bytes_moved: u64,
    /// The pod being replaced, as it was when the migration began (metadata and spec), so
    /// the replacement can be built after the source is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object")]
    pub source_pod: Option<serde_json::Value>,
    /// UID of the pod being replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod_uid: Option<String>,
    /// Checkpoints that failed to restore on the target (the driver retries an older one once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_restores: Vec<String>,
    /// Name of the replacement pod once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement_pod: Option<String>,
    /// Kubernetes-style conditions: `Ready` (the migration ended well) and `Progressing`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` of the spec this status was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl MigrationStatus {
    pub fn phase(&self) -> Phase {
        self.state.phase
    }
}

/// An object the API server keeps as written (a pod's metadata and spec).
fn preserved_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

impl Migration {
    /// The phase, or `None` for a request the controller has not started yet.
    pub fn phase(&self) -> Option<Phase> {
        self.status.as_ref().map(MigrationStatus::phase)
    }

    pub fn is_terminal(&self) -> bool {
        self.phase().is_some_and(|phase| phase.is_terminal())
    }

    /// A request: no status yet.
    pub fn is_request(&self) -> bool {
        self.status.is_none()
    }
}

/// Labels every Migration for `pod` carries.
pub fn labels_for(pod: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(POD_LABEL.to_string(), pod.to_string())])
}

/// The CRD as YAML, exactly as `crdgen` prints it and `deploy/crd.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    use kube::CustomResourceExt;
    let mut text = String::from(
        "# Generated by `cargo run -p automigrate-operator --bin crdgen > deploy/crd.yaml`; do not edit.\n",
    );
    text.push_str(&serde_saphyr::to_string(&Migration::crd())?);
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;
    use kube::CustomResourceExt;

    fn schema_of(path: &[&str]) -> serde_json::Value {
        let crd = serde_json::to_value(Migration::crd()).unwrap();
        let mut node = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        for key in path {
            node = &node["properties"][key];
        }
        node.clone()
    }

    #[test]
    fn status_schema_names_every_field_the_state_machine_persists() {
        // Every key the core state serialises must be in the schema, or a real API server
        // would prune it and a restarted controller would resume from a wrong state.
        let mut state =
            MigrationState::new("a".into(), "b".into(), true, Timestamp::UNIX_EPOCH, None);
        state.checkpoint_id = Some("ck".into());
        state.downtime = Some(std::time::Duration::from_secs(3));
        state.downtime_started_at = Some(Timestamp::UNIX_EPOCH);
        state.message = Some("m".into());
        state.rollback = Some(automigrate_core::migration::RollbackAction::KeepSource);
        let json = serde_json::to_value(&state).unwrap();
        let status = schema_of(&["status"]);
        for key in json.as_object().unwrap().keys() {
            assert!(
                status["properties"].get(key).is_some(),
                "status schema lacks `{key}`: {status:#}"
            );
        }
        assert_eq!(
            schema_of(&["status", "sourcePod"])["x-kubernetes-preserve-unknown-fields"],
            true
        );
    }

    #[test]
    fn crd_is_namespaced_with_status_and_columns() {
        let crd = Migration::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|column| column.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "Pod", "Source", "Target", "Trigger", "Age"]
        );
    }

    #[test]
    fn status_round_trips_with_the_state_flattened() {
        let state = MigrationState::new(
            "edge-1".into(),
            "edge-2".into(),
            false,
            Timestamp::UNIX_EPOCH,
            None,
        );
        let status = MigrationStatus {
            state,
            limits: Limits::from_policy(&automigrate_core::Policy::default()),
            policy: "default".into(),
            mode: CheckpointMode::Transparent,
            lease_timeout: std::time::Duration::from_secs(30),
            stored_checkpoint: None,
            base_checkpoint: None,
            transfers: vec![],
            bytes_moved: 0,
            source_pod: Some(serde_json::json!({"spec": {"containers": []}})),
            source_pod_uid: None,
            failed_restores: vec![],
            replacement_pod: None,
            conditions: vec![],
            observed_generation: Some(1),
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["phase"], "Pending");
        assert_eq!(json["source"], "edge-1");
        assert_eq!(json["limits"]["fence"], "2m");
        let back: MigrationStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }

    /// The shipped CRD is what the code generates (regenerate with `crdgen`).
    #[test]
    fn deploy_crd_yaml_is_up_to_date() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/crd.yaml");
        let shipped = std::fs::read_to_string(path).unwrap_or_default();
        let generated = crd_yaml().unwrap();
        assert!(
            shipped == generated,
            "deploy/crd.yaml is out of date: run `cargo run -p automigrate-operator --bin crdgen > deploy/crd.yaml`"
        );
    }
}
