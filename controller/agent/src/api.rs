//! The agent's HTTP API wire types (JSON, camelCase), shared by the agent's server, its
//! [`crate::client::AgentClient`], the controller and the embedded driver.
//!
//! The contract (docs in /work/notes/agent-api.md, mirrored in `controller/agent/README.md`):
//! - `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus text).
//! - `POST /v1/checkpoints` [`CheckpointRequest`] → 200 [`CheckpointSummary`] (synchronous).
//! - `GET /v1/checkpoints?namespace=&pod=` ([`CheckpointQuery`]) → `Vec<CheckpointSummary>`,
//!   newest first.
//! - `POST /v1/transfers` [`TransferRequest`] → 202 [`TransferStatus`];
//!   `GET /v1/transfers/{id}` → [`TransferStatus`].
//! - `POST /v1/images` [`ImageRequest`] → [`ImageResponse`].
//! - `GET /v1/peers` → `Vec<PeerLatency>`.
//! - Every non-2xx answer carries an [`ErrorBody`] whose `kind` is one of [`error_kind`].
//!
//! Durations are humantime strings (`"527ms"`, `"1m 30s"`), rounded to microseconds;
//! timestamps are RFC 3339. Names follow Kubernetes rules ([`validate_namespace`],
//! [`validate_pod_name`], [`validate_container_name`]) so a name can never escape a directory.

use std::time::Duration;

use automigrate_core::model::PodRef;
use serde::{Deserialize, Serialize};

/// Periodic checkpoints leave the workload running; a final one stops it (migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CheckpointKind {
    Periodic,
    Final,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRequest {
    pub pod: PodRef,
    pub container: String,
    pub kind: CheckpointKind,
}

impl CheckpointRequest {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_pod(&self.pod)?;
        validate_container_name(&self.container)
    }
}

/// A checkpoint in an agent's store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSummary {
    /// `<pod>-<sequence>`, unique per pod on a node.
    pub id: String,
    pub pod: PodRef,
    pub container: String,
    pub created_at: jiff::Timestamp,
    /// Bytes of all files in the archive.
    pub bytes: u64,
    pub files: u64,
    /// How long the workload was frozen (zero when the backend cannot tell).
    #[serde(with = "duration")]
    pub freeze: Duration,
    /// The checkpoint this incremental one builds on.
    pub parent: Option<String>,
    /// Every file's hash checked against the manifest (and the parent chain) by this agent.
    pub verified: bool,
}

/// `GET /v1/checkpoints` filter: no filter lists every pod, `namespace` alone one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// What a transfer moves. A checkpoint goes into the receiving agent's store (with its parent
/// chain when the receiver lacks it); a dataset path is relative to the data root of both
/// agents and lands at the same relative path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Payload {
    Checkpoint { id: String },
    Dataset { path: String },
}

/// Another agent, as seen by this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub node: String,
    /// `host:port` of its transfer engine.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferRequest {
    pub payload: Payload,
    pub to: Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TransferState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferStatus {
    pub id: String,
    pub state: TransferState,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Streams open now (while running) or the most used (when finished).
    pub streams: u32,
    pub error: Option<String>,
}

/// Ask the (target) agent to build a checkpoint OCI image from a checkpoint in its store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRequest {
    pub checkpoint_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageResponse {
    /// A reference the runtime can start (after the agent's configured import command ran):
    /// `oci:<layout dir>:<tag>` when no import command is configured.
    pub image: String,
}

/// The agent's own measurement of the path to one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerLatency {
    pub node: String,
    /// Median round-trip time of the successful probes in the window (zero when none).
    #[serde(with = "duration")]
    pub rtt: Duration,
    /// Fraction of probes in the window that failed, 0.0 ..= 1.0.
    pub loss: f64,
    /// Whether the peer answers now: one of its last two probes was answered, and the prober
    /// is current. `None` (absent): unknown, or an agent from before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answering: Option<bool>,
    /// Probes lost in a row since the peer last answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u32>,
}

/// The body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A sentence for the operator.
    pub error: String,
    /// One of [`error_kind`], for programs.
    pub kind: String,
}

/// The `kind` values of [`ErrorBody`].
pub mod error_kind {
    /// No or wrong bearer token (401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The request is malformed or names something unsafe (400).
    pub const INVALID: &str = "invalid";
    /// The pod, checkpoint, transfer or peer is unknown here (404).
    pub const NOT_FOUND: &str = "notFound";
    /// The request conflicts with the state (a checkpoint already running for the pod, an id
    /// present in two namespaces) (409).
    pub const CONFLICT: &str = "conflict";
    /// The checkpoint backend failed (500).
    pub const CHECKPOINT_FAILED: &str = "checkpointFailed";
    /// The checkpoint store failed (500).
    pub const STORE: &str = "store";
    /// Building an image failed (500).
    pub const IMAGE_FAILED: &str = "imageFailed";
    /// The agent is not ready or is shutting down (503).
    pub const UNAVAILABLE: &str = "unavailable";
    /// Anything else (500).
    pub const INTERNAL: &str = "internal";
}

/// Why a name or path in a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{what} `{value}` is not a valid name: {rule}")]
    Name {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("path `{value}` is not allowed: {rule}")]
    Path { value: String, rule: &'static str },
}

/// Checks a pod's namespace and name against the Kubernetes rules.
pub fn validate_pod(pod: &PodRef) -> Result<(), ValidationError> {
    validate_namespace(&pod.namespace)?;
    validate_pod_name(&pod.name)
}

/// A DNS-1123 label: 1–63 of `a-z0-9-`, alphanumeric at both ends.
pub fn validate_namespace(value: &str) -> Result<(), ValidationError> {
    dns_label("namespace", value)
}

/// A container name is a DNS-1123 label.
pub fn validate_container_name(value: &str) -> Result<(), ValidationError> {
    dns_label("container", value)
}

/// A DNS-1123 subdomain: 1–253 of `a-z0-9-.`, labels alphanumeric at both ends.
pub fn validate_pod_name(value: &str) -> Result<(), ValidationError> {
    let refuse = |rule| {
        Err(ValidationError::Name {
            what: "pod",
            value: value.to_string(),
            rule,
        })
    };
    if value.is_empty() || value.len() > 253 {
        return refuse("1 to 253 characters");
    }
    for label in value.split('.') {
        if !label_ok(label) {
            return refuse(
                "lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit",
            );
        }
    }
    Ok(())
}

/// A checkpoint id: `<pod name>-<digits>` as the store makes them; no separators, no dots
/// at the start.
pub fn validate_checkpoint_id(value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::Name {
            what: "checkpoint id",
            value: value.to_string(),
            rule: "lowercase letters, digits, '-' and '.', not starting with '.'",
        })
    }
}

/// A dataset path relative to the data root: not empty, not absolute, no `.`/`..`/empty
/// components, no NUL, no leading dot in a component (our staging names start with one).
pub fn validate_relative_path(value: &str) -> Result<(), ValidationError> {
    let refuse = |rule| {
        Err(ValidationError::Path {
            value: value.to_string(),
            rule,
        })
    };
    if value.is_empty() || value.len() > 4096 {
        return refuse("1 to 4096 bytes");
    }
    if value.starts_with('/') {
        return refuse("must be relative to the data root");
    }
    if value.contains('\0') || value.contains('\\') {
        return refuse("no NUL or backslash");
    }
    for component in value.split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return refuse("no empty, `.` or `..` components");
        }
        if component.starts_with('.') {
            return refuse("no component starting with `.`");
        }
    }
    Ok(())
}

fn label_ok(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

fn dns_label(what: &'static str, value: &str) -> Result<(), ValidationError> {
    if label_ok(value) {
        Ok(())
    } else {
        Err(ValidationError::Name {
            what,
            value: value.to_string(),
            rule: "1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
        })
    }
}

/// `#[serde(with = "duration")]`: a humantime string rounded to microseconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Formats like the rest of the project (`527ms`, `1m 30s`), keeping microseconds so a
    /// loopback RTT is not shown as zero.
    pub fn format(value: Duration) -> String {
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        humantime::format_duration(Duration::from_micros(micros)).to_string()
    }

    pub fn parse(text: &str) -> Result<Duration, humantime::DurationError> {
        humantime::parse_duration(text.trim())
    }

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map_err(|error| {
            serde::de::Error::custom(format!("duration `{text}`: {error} (write e.g. `527ms`)"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pod key is the core model's `PodRef` (shared with the checkpoint manifest); the
    /// request JSON the README documents must not change with it.
    #[test]
    fn a_checkpoint_request_keeps_its_json() {
        let json = serde_json::json!(
            {"pod": {"namespace": "ml", "name": "trainer"}, "container": "main", "kind": "periodic"}
        );
        let request: CheckpointRequest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(request.pod, PodRef::new("ml", "trainer"));
        assert_eq!(serde_json::to_value(&request).unwrap(), json);
        request.validate().unwrap();
        let bad = CheckpointRequest {
            pod: PodRef::new("ml", "../etc"),
            ..request
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn wire_shapes_match_the_contract() {
        let summary = CheckpointSummary {
            id: "trainer-000001".into(),
            pod: PodRef::new("ml", "trainer"),
            container: "main".into(),
            created_at: "2026-11-22T10:00:00Z".parse().unwrap(),
            bytes: 10,
            files: 2,
            freeze: Duration::from_millis(527),
            parent: None,
            verified: true,
        };
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "trainer-000001",
                "pod": {"namespace": "ml", "name": "trainer"},
                "container": "main",
                "createdAt": "2026-11-22T10:00:00Z",
                "bytes": 10, "files": 2, "freeze": "527ms", "parent": null, "verified": true
            })
        );
        assert_eq!(
            serde_json::from_value::<CheckpointSummary>(json).unwrap(),
            summary
        );

        let request = TransferRequest {
            payload: Payload::Checkpoint {
                id: "trainer-000001".into(),
            },
            to: Peer {
                node: "b".into(),
                address: "10.0.0.2:9461".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&request).unwrap(),
            serde_json::json!({
                "payload": {"checkpoint": {"id": "trainer-000001"}},
                "to": {"node": "b", "address": "10.0.0.2:9461"}
            })
        );
        assert_eq!(
            serde_json::to_value(Payload::Dataset {
                path: "imagenet".into()
            })
            .unwrap(),
            serde_json::json!({"dataset": {"path": "imagenet"}})
        );
        let status = TransferStatus {
            id: "t".into(),
            state: TransferState::Running,
            bytes_total: 5,
            bytes_done: 1,
            streams: 3,
            error: None,
        };
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::json!({"id": "t", "state": "running", "bytesTotal": 5, "bytesDone": 1, "streams": 3, "error": null})
        );
        assert_eq!(
            serde_json::to_value(CheckpointKind::Final).unwrap(),
            serde_json::json!("final")
        );
        assert_eq!(
            serde_json::to_value(ImageRequest {
                checkpoint_id: "x-1".into()
            })
            .unwrap(),
            serde_json::json!({"checkpointId": "x-1"})
        );
        let latency = PeerLatency {
            node: "b".into(),
            rtt: Duration::from_micros(1_250),
            loss: 0.0,
            answering: None,
            missed: None,
        };
        let json = serde_json::to_value(&latency).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"node": "b", "rtt": "1ms 250us", "loss": 0.0})
        );
        assert_eq!(
            serde_json::from_value::<PeerLatency>(json).unwrap(),
            latency
        );
    }

    #[test]
    fn a_bad_duration_says_what_to_write() {
        let error = serde_json::from_value::<PeerLatency>(
            serde_json::json!({"node": "b", "rtt": "soon", "loss": 0.0}),
        )
        .unwrap_err();
        assert!(error.to_string().contains("527ms"), "{error}");
    }

    #[test]
    fn names_follow_kubernetes_rules() {
        for good in ["a", "trainer-0", "x.y-z"] {
            validate_pod_name(good).unwrap();
        }
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "A",
            "-a",
            "a-",
            "a..b",
            "a\0",
            &"a".repeat(254),
        ] {
            assert!(validate_pod_name(bad).is_err(), "{bad:?}");
        }
        validate_namespace("ml-team").unwrap();
        for bad in ["a.b", "", "ML", &"a".repeat(64)] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
        validate_container_name("main").unwrap();
        assert!(validate_container_name("../x").is_err());
    }

    #[test]
    fn dataset_paths_stay_relative() {
        for good in ["imagenet", "sets/cifar-10/train", "a b"] {
            validate_relative_path(good).unwrap();
        }
        for bad in [
            "", "/etc", "../x", "a/../b", "a//b", "a/./b", "a/", ".hidden", "a\\b", "a\0b",
        ] {
            assert!(validate_relative_path(bad).is_err(), "{bad:?}");
        }
        validate_checkpoint_id("trainer-000001").unwrap();
        for bad in ["", "../x", "a/b", ".staging-x", "A"] {
            assert!(validate_checkpoint_id(bad).is_err(), "{bad:?}");
        }
    }
}
