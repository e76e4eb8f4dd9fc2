//! The replacement pod: the migrated pod rebuilt on the target node, and how pod owners are
//! handled.
//!
//! The replacement is built from the source pod as it was when the migration began (kept in the
//! Migration's status, because by restore time the source is gone). It keeps the pod's labels,
//! annotations and spec, is pinned with `spec.nodeName` to the target the engine chose (node
//! selectors and node affinity that named the old node are dropped, or the kubelet would refuse
//! it), and gets a deterministic name, `<original name>-<6 characters of the Migration's uid>`, so
//! a controller that crashes after creating it finds it again instead of creating a second one.
//! The first container is the one that was checkpointed; others start fresh.
//!
//! - **Transparent** (CRIU): the first container's image becomes the checkpoint OCI image the
//!   target's agent built (the image carries `org.criu.checkpoint.container.name`; CRI-O and
//!   containerd ≥ 2.1 restore the process tree from it).
//! - **Application**: the original image, with the checkpoint directory from the target's agent
//!   store mounted read-only at [`CHECKPOINT_MOUNT`] and `AUTOMIGRATE_CHECKPOINT_DIR` pointing
//!   there; the program loads its own state.
//! - **Fresh**: the original spec only (no checkpoint survives, or the policy restarts).
//!
//! ## Owners (what the controller does, and does not do, about pod controllers)
//!
//! - **No owner (bare pod)**: the replacement is a new pod with the same labels; nothing else
//!   watches it.
//! - **Job**: the replacement carries the Job's controller ownerReference and labels
//!   (`job-name`, `controller-uid`), so the Job counts it as one of its pods (adoption by
//!   ownerReference). The source is deleted during fencing, before the replacement exists, so the
//!   Job may see one active pod fewer for a moment; with `podReplacementPolicy: Failed` (the
//!   recommended setting for protected Jobs) it does not start a fresh pod for a deleted one that
//!   has not finished terminating. Finalizers (the Job tracking finalizer) are not copied: the Job
//!   controller adds its own.
//! - **StatefulSet, ReplicaSet (Deployment), DaemonSet and anything else**: their controllers
//!   recreate a deleted pod from their own template, under the same name (StatefulSet) or a new
//!   one, on a node of the scheduler's choosing. A replacement created by us would either collide
//!   with that pod or be deleted as surplus. So the controller does not fight them: it still
//!   checkpoints and replicates such pods, but it does not start a migration for them; the
//!   decision pass records a Warning Event `OwnerNotSupported` on the pod instead, and Kubernetes'
//!   own eviction applies. [`OwnerHandling::for_owner`] encodes this rule.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, HostPathVolumeSource, Pod, PodSpec, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Where an application-mode replacement finds its checkpoint.
pub const CHECKPOINT_MOUNT: &str = "/var/run/automigrate/checkpoint";
/// The environment variable naming [`CHECKPOINT_MOUNT`].
pub const CHECKPOINT_ENV: &str = "AUTOMIGRATE_CHECKPOINT_DIR";
/// Label on a replacement: the name of the pod it replaces (first of the chain).
pub const ORIGIN_LABEL: &str = "migration.automigrate.dev/origin";
/// Annotation on a replacement: the Migration that created it.
pub const MIGRATION_ANNOTATION: &str = "migration.automigrate.dev/name";
/// Annotation on a replacement: the checkpoint it was restored from.
pub const RESTORED_FROM_ANNOTATION: &str = "migration.automigrate.dev/restored-from";
const CHECKPOINT_VOLUME: &str = "automigrate-checkpoint";
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// How a pod's owner is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerHandling {
    /// A bare pod: replace it with a new bare pod.
    Replace,
    /// A Job's pod: replace it and keep the Job's ownerReference so the Job adopts it.
    ReplaceAdopted,
    /// Its controller recreates it from its own template: do not migrate.
    NotSupported,
}

impl OwnerHandling {
    pub fn for_owner(kind: Option<&str>) -> Self {
        match kind {
            None => Self::Replace,
            Some("Job") => Self::ReplaceAdopted,
            Some(_) => Self::NotSupported,
        }
    }
}

/// How the replacement gets the workload's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restore {
    /// Start the checkpoint image built on the target.
    Transparent {
        image: String,
        checkpoint_id: String,
    },
    /// Mount the checkpoint directory `host_path` (on the target) into the original image.
    Application {
        host_path: String,
        checkpoint_id: String,
    },
    /// Start from the beginning.
    Fresh,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplacementError {
    #[error("the recorded source pod cannot be read back: {0}")]
    SourcePod(String),
    #[error("the source pod has no containers")]
    NoContainers,
}

impl ReplacementError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::SourcePod(_) => "source_pod",
            Self::NoContainers => "no_containers",
        }
    }
}

/// The parts of a pod a replacement is built from, as kept in the Migration's status.
pub fn record_source(pod: &Pod) -> serde_json::Value {
    let metadata = &pod.metadata;
    serde_json::json!({
        "metadata": {
            "name": metadata.name,
            "namespace": metadata.namespace,
            "labels": metadata.labels,
            "annotations": metadata.annotations,
            "ownerReferences": metadata.owner_references,
        },
        "spec": pod.spec,
    })
}

/// `<origin>-<suffix>`, cut to the 63 characters a pod name may have.
pub fn replacement_name(source: &Pod, migration_uid: &str) -> String {
    let origin = origin_name(source);
    let suffix: String = migration_uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect::<String>()
        .to_ascii_lowercase();
    let keep = 63usize.saturating_sub(suffix.len() + 1);
    let base: String = origin.chars().take(keep).collect();
    format!("{}-{suffix}", base.trim_end_matches('-'))
}

fn origin_name(source: &Pod) -> String {
    source
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(ORIGIN_LABEL))
        .cloned()
        .or_else(|| source.metadata.name.clone())
        .unwrap_or_default()
}

/// Builds the replacement for `source_record` (from [`record_source`]) on `node`.
pub fn build(
    source_record: &serde_json::Value,
    name: &str,
    node: &str,
    migration: &str,
    restore: &Restore,
) -> Result<Pod, ReplacementError> {
    let source: Pod = serde_json::from_value(source_record.clone())
        .map_err(|error| ReplacementError::SourcePod(error.to_string()))?;
    let metadata = &source.metadata;
    let mut labels = metadata.labels.clone().unwrap_or_default();
    labels.insert(ORIGIN_LABEL.into(), origin_name(&source));
    let mut annotations: BTreeMap<String, String> = metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        // The source's checkpoint record names where the source's checkpoints were; the
        // replacement starts its own record with its first checkpoint.
        .filter(|(key, _)| {
            key != "kubectl.kubernetes.io/last-applied-configuration"
                && key != crate::snapshot::LATEST_CHECKPOINT
        })
        .collect();
    annotations.insert(MIGRATION_ANNOTATION.into(), migration.into());
    let owner_kind = metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| owner.kind.as_str());
    let owner_references = match OwnerHandling::for_owner(owner_kind) {
        OwnerHandling::ReplaceAdopted => metadata.owner_references.clone(),
        OwnerHandling::Replace | OwnerHandling::NotSupported => None,
    };

    let mut spec: PodSpec = source.spec.clone().unwrap_or_default();
    if spec.containers.is_empty() {
        return Err(ReplacementError::NoContainers);
    }
    spec.node_name = Some(node.into());
    spec.scheduling_gates = None;
    if let Some(selector) = spec.node_selector.as_mut() {
        selector.remove(HOSTNAME_LABEL);
    }
    if let Some(affinity) = spec.affinity.as_mut() {
        affinity.node_affinity = None;
    }
    match restore {
        Restore::Transparent {
            image,
            checkpoint_id,
        } => {
            if let Some(container) = spec.containers.first_mut() {
                container.image = Some(image.clone());
                container.image_pull_policy = Some("IfNotPresent".into());
            }
            annotations.insert(RESTORED_FROM_ANNOTATION.into(), checkpoint_id.clone());
        }
        Restore::Application {
            host_path,
            checkpoint_id,
        } => {
            spec.volumes.get_or_insert_with(Vec::new).push(Volume {
                name: CHECKPOINT_VOLUME.into(),
                host_path: Some(HostPathVolumeSource {
                    path: host_path.clone(),
                    type_: Some("Directory".into()),
                }),
                ..Volume::default()
            });
            if let Some(container) = spec.containers.first_mut() {
                container
                    .volume_mounts
                    .get_or_insert_with(Vec::new)
                    .push(VolumeMount {
                        name: CHECKPOINT_VOLUME.into(),
                        mount_path: CHECKPOINT_MOUNT.into(),
                        read_only: Some(true),
                        ..VolumeMount::default()
                    });
                container.env.get_or_insert_with(Vec::new).push(EnvVar {
                    name: CHECKPOINT_ENV.into(),
                    value: Some(CHECKPOINT_MOUNT.into()),
                    value_from: None,
                });
            }
            annotations.insert(RESTORED_FROM_ANNOTATION.into(), checkpoint_id.clone());
        }
        Restore::Fresh => {}
    }
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references,
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Affinity, Container, NodeAffinity};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn source(owner: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("trainer".into()),
                namespace: Some("ml".into()),
                uid: Some("old-uid".into()),
                resource_version: Some("42".into()),
                labels: Some(BTreeMap::from([("app".into(), "lstm".into())])),
                annotations: Some(BTreeMap::from([
                    ("automigrate.dev/protect".into(), "true".into()),
                    (crate::snapshot::LATEST_CHECKPOINT.into(), "{}".into()),
                ])),
                finalizers: Some(vec!["batch.kubernetes.io/job-tracking".into()]),
                owner_references: owner.map(|kind| {
                    vec![OwnerReference {
                        api_version: "batch/v1".into(),
                        kind: kind.into(),
                        name: "train-job".into(),
                        uid: "job-uid".into(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    }]
                }),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("edge-2".into()),
                node_selector: Some(BTreeMap::from([
                    (HOSTNAME_LABEL.into(), "edge-2".into()),
                    ("gpu".into(), "yes".into()),
                ])),
                affinity: Some(Affinity {
                    node_affinity: Some(NodeAffinity::default()),
                    ..Affinity::default()
                }),
                containers: vec![
                    Container {
                        name: "main".into(),
                        image: Some("pytorch:1.13".into()),
                        ..Container::default()
                    },
                    Container {
                        name: "sidecar".into(),
                        image: Some("exporter".into()),
                        ..Container::default()
                    },
                ],
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn transparent_replacement_uses_the_checkpoint_image_and_pins_the_target() {
        let record = record_source(&source(None));
        let restore = Restore::Transparent {
            image: "localhost/ck:1".into(),
            checkpoint_id: "ck-1".into(),
        };
        let pod = build(&record, "trainer-abc123", "edge-3", "mig-1", &restore).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("edge-3"));
        assert_eq!(spec.containers[0].image.as_deref(), Some("localhost/ck:1"));
        assert_eq!(spec.containers[1].image.as_deref(), Some("exporter"));
        assert!(
            !spec
                .node_selector
                .as_ref()
                .unwrap()
                .contains_key(HOSTNAME_LABEL)
        );
        assert!(spec.node_selector.as_ref().unwrap().contains_key("gpu"));
        assert!(spec.affinity.as_ref().unwrap().node_affinity.is_none());
        let metadata = &pod.metadata;
        assert_eq!(metadata.uid, None);
        assert_eq!(metadata.resource_version, None);
        assert_eq!(metadata.finalizers, None);
        assert_eq!(metadata.owner_references, None);
        let labels = metadata.labels.as_ref().unwrap();
        assert_eq!(labels["app"], "lstm");
        assert_eq!(labels[ORIGIN_LABEL], "trainer");
        let annotations = metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[RESTORED_FROM_ANNOTATION], "ck-1");
        assert_eq!(annotations["automigrate.dev/protect"], "true");
        assert!(!annotations.contains_key(crate::snapshot::LATEST_CHECKPOINT));
    }

    #[test]
    fn application_replacement_mounts_the_checkpoint() {
        let record = record_source(&source(Some("Job")));
        let restore = Restore::Application {
            host_path: "/var/lib/automigrate/checkpoints/ck-2".into(),
            checkpoint_id: "ck-2".into(),
        };
        let pod = build(&record, "trainer-abc123", "edge-3", "mig-1", &restore).unwrap();
        let spec = pod.spec.unwrap();
        let container = &spec.containers[0];
        assert_eq!(container.image.as_deref(), Some("pytorch:1.13"));
        let env = container.env.as_ref().unwrap();
        assert_eq!(env[0].name, CHECKPOINT_ENV);
        assert_eq!(env[0].value.as_deref(), Some(CHECKPOINT_MOUNT));
        let mount = &container.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.mount_path, CHECKPOINT_MOUNT);
        assert_eq!(mount.read_only, Some(true));
        let volume = &spec.volumes.as_ref().unwrap()[0];
        assert_eq!(
            volume.host_path.as_ref().unwrap().path,
            "/var/lib/automigrate/checkpoints/ck-2"
        );
        let owners = pod.metadata.owner_references.unwrap();
        assert_eq!(owners[0].kind, "Job", "the Job adopts the replacement");
    }

    #[test]
    fn names_are_deterministic_and_do_not_grow() {
        let mut pod = source(None);
        let first = replacement_name(&pod, "0f3a9c2e-1111-2222");
        assert_eq!(first, "trainer-0f3a9c");
        pod.metadata.name = Some(first);
        pod.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(ORIGIN_LABEL.into(), "trainer".into());
        assert_eq!(replacement_name(&pod, "ab12cd34"), "trainer-ab12cd");
        pod.metadata.labels = Some(BTreeMap::from([(ORIGIN_LABEL.into(), "x".repeat(80))]));
        assert_eq!(replacement_name(&pod, "ab12cd34").len(), 63);
    }

    #[test]
    fn owners_decide_whether_a_pod_is_migrated() {
        assert_eq!(OwnerHandling::for_owner(None), OwnerHandling::Replace);
        assert_eq!(
            OwnerHandling::for_owner(Some("Job")),
            OwnerHandling::ReplaceAdopted
        );
        for kind in ["StatefulSet", "ReplicaSet", "DaemonSet", "PyTorchJob"] {
            assert_eq!(
                OwnerHandling::for_owner(Some(kind)),
                OwnerHandling::NotSupported
            );
        }
    }
}
