//! Kubernetes objects in, the engine's [`ClusterSnapshot`] out: a pure translation, so the
//! decision pass sees exactly what the reflectors hold and tests can check the mapping alone.
//!
//! - Node + its Lease in `kube-node-lease` → [`model::Node`] (conditions with their transition
//!   times, taints, allocatable, the Lease's `renewTime` as the heartbeat, and the sum of the
//!   requests of every non-terminated pod bound to the node).
//! - Pod with any `automigrate.dev/` annotation (not only `protect`: a misspelled key must be
//!   reported, not skipped), bound to a node, not terminated and not being deleted →
//!   [`ProtectedPod`] (raw annotations: the engine parses and reports them, and acts only on
//!   pods whose `protect` is `"true"`). Its
//!   newest checkpoint is kept on the pod in the [`LATEST_CHECKPOINT`] annotation, which the
//!   controller writes after every checkpoint and replication, so it survives a controller
//!   restart and is visible in `kubectl describe pod`.
//! - Migration with a status → [`MigrationRecord`]; without one → [`MigrationRequest`].
//! - User latency: a protected pod's `automigrate.dev/user-latency` annotation (for the user
//!   its `automigrate.dev/user` names) → [`UserObservation`]s, merged with those from PromQL.
//!   For one (user, node) the annotation wins over PromQL (a pod's annotation is the more
//!   specific statement), and between pods of one user the first by namespace/name wins, so
//!   the snapshot does not depend on the reflector's order. An invalid annotation adds nothing
//!   here; the engine reports it against the pod.
//!
//! Order: nodes by name, pods by namespace/name, whatever order the reflector lists them in, so
//! a snapshot is a function of the objects alone. [`build`] translates everything at once and is
//! the reference; the decision pass uses [`IncrementalSnapshot`], which keeps the translation
//! between passes and must give a snapshot equal to [`build`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use automigrate_core::annotations;
use automigrate_core::model::{
    self, Alert, CheckpointInfo, ClusterSnapshot, ConditionStatus, LinkObservation,
    MigrationRecord, MigrationRequest, NodeCondition, OwnerRef, PodRef, ProtectedPod, Resources,
    Taint, TaintEffect, UserObservation,
};
use automigrate_core::units::{Bytes, MilliCpu};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::Migration;

pub mod incremental;
pub use incremental::{IncrementalSnapshot, Refresh};

/// Pod annotation holding the newest checkpoint as JSON ([`CheckpointInfo`]). Outside the
/// `automigrate.dev/` user domain on purpose: users do not write it.
pub const LATEST_CHECKPOINT: &str = "checkpoint.automigrate.dev/latest";
/// Namespace of the kubelets' heartbeat Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// Extended resource counted as GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// What the reflectors and the controller's own books hold at one instant.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub nodes: &'a [Arc<Node>],
    pub leases: &'a [Arc<Lease>],
    pub pods: &'a [Arc<Pod>],
    pub migrations: &'a [Arc<Migration>],
    pub alerts: Vec<Alert>,
    /// Shared with the [`LinkBook`](crate::probes::LinkBook): the same allocation while the
    /// links are the same.
    pub links: Arc<[LinkObservation]>,
    /// User latency from PromQL (pod annotations are read from `pods`); shared like `links`.
    pub users: Arc<[UserObservation]>,
    pub checkpoints_in_progress: &'a BTreeSet<PodRef>,
}

/// Each node's last heartbeat: the renew time of its Lease in the node-lease namespace.
fn node_heartbeats<'a, C>(leases: &'a [Arc<Lease>]) -> C
where
    C: FromIterator<(&'a str, Timestamp)>,
{
    leases
        .iter()
        .filter(|lease| lease.metadata.namespace.as_deref() == Some(NODE_LEASE_NAMESPACE))
        .filter_map(|lease| {
            let name = lease.metadata.name.as_deref()?;
            let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0;
            Some((name, renewed))
        })
        .collect()
}

pub fn build(inputs: &Inputs<'_>, now: Timestamp) -> ClusterSnapshot {
    let heartbeats: BTreeMap<&str, Timestamp> = node_heartbeats(inputs.leases);
    let mut requested: BTreeMap<&str, Resources> = BTreeMap::new();
    for pod in inputs.pods {
        if let Some(node) = pod_node(pod)
            && !is_terminated(pod)
        {
            let sum = requested.entry(node).or_default();
            *sum = sum.saturating_add(pod_requests(pod));
        }
    }
    let mut nodes: Vec<model::Node> = inputs
        .nodes
        .iter()
        .filter_map(|node| {
            let name = node.metadata.name.as_deref()?;
            Some(convert_node(
                node,
                heartbeats.get(name).copied(),
                requested.get(name).copied().unwrap_or_default(),
            ))
        })
        .collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut pods: Vec<ProtectedPod> = inputs
        .pods
        .iter()
        .filter_map(|pod| protected_pod(pod, inputs.checkpoints_in_progress))
        .collect();
    pods.sort_by(pod_order);
    let users = user_observations(&pods, &inputs.users);
    let (migrations, requests) = migration_records(inputs.migrations);
    ClusterSnapshot {
        taken_at: Some(now),
        nodes,
        pods,
        datasets: Vec::new(),
        links: inputs.links.to_vec(),
        users,
        alerts: inputs.alerts.clone(),
        migrations,
        requests,
    }
}

/// The snapshot's pod order: by namespace, then name (as [`PodRef`] orders).
fn pod_order(a: &ProtectedPod, b: &ProtectedPod) -> std::cmp::Ordering {
    (a.namespace.as_str(), a.name.as_str()).cmp(&(b.namespace.as_str(), b.name.as_str()))
}

/// Migrations with a status as records of what happened; those without as requests.
fn migration_records(
    migrations: &[Arc<Migration>],
) -> (Vec<MigrationRecord>, Vec<MigrationRequest>) {
    let mut records = Vec::new();
    let mut requests = Vec::new();
    for migration in migrations {
        let Some(namespace) = migration.metadata.namespace.clone() else {
            continue;
        };
        let pod = PodRef::new(namespace, migration.spec.pod.clone());
        match &migration.status {
            Some(status) => {
                let state = &status.state;
                records.push(MigrationRecord {
                    pod,
                    phase: state.phase,
                    source: state.source.clone(),
                    target: Some(state.target.clone()).filter(|target| !target.is_empty()),
                    started_at: state.started_at,
                    finished_at: state.phase.is_terminal().then_some(state.phase_started_at),
                });
            }
            None => requests.push(MigrationRequest {
                pod,
                target: migration.spec.target.clone(),
            }),
        }
    }
    (records, requests)
}

/// The `queried` user latencies for pairs no pod annotated, then the annotated ones of `pods`.
pub fn user_observations<'p>(
    pods: impl IntoIterator<Item = &'p ProtectedPod>,
    queried: &[UserObservation],
) -> Vec<UserObservation> {
    // (user, node) → (pod, latency): the first pod by namespace/name wins.
    let mut annotated: BTreeMap<(String, String), (PodRef, std::time::Duration)> = BTreeMap::new();
    for pod in pods {
        // Only pods that say `protect` at all; one with a misspelled key alone speaks for no user.
        if !pod.annotations.contains_key(annotations::PROTECT) {
            continue;
        }
        let (Some(value), Some(user)) = (
            pod.annotations.get(annotations::USER_LATENCY),
            pod.annotations.get(annotations::USER),
        ) else {
            continue;
        };
        let Ok(latencies) = annotations::parse_user_latency(value) else {
            continue;
        };
        let pod_ref = pod.pod_ref();
        for (node, latency) in latencies {
            let key = (user.trim().to_string(), node);
            if annotated
                .get(&key)
                .is_none_or(|(first, _)| pod_ref < *first)
            {
                annotated.insert(key, (pod_ref.clone(), latency));
            }
        }
    }
    let mut users: Vec<UserObservation> = queried
        .iter()
        .filter(|seen| !annotated.contains_key(&(seen.user.clone(), seen.node.clone())))
        .cloned()
        .collect();
    users.extend(
        annotated
            .into_iter()
            .map(|((user, node), (_, latency))| UserObservation {
                user,
                node,
                latency,
            }),
    );
    users
}

pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// Succeeded or Failed: the pod holds no resources and runs nothing.
pub fn is_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status
            .as_ref()
            .and_then(|status| status.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

fn quantity<T: std::str::FromStr>(value: Option<&Quantity>) -> Option<T> {
    value.and_then(|quantity| quantity.0.parse().ok())
}

fn resources(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
    let Some(map) = map else {
        return Resources::default();
    };
    Resources {
        cpu: quantity::<MilliCpu>(map.get("cpu")).unwrap_or_default(),
        memory: quantity::<Bytes>(map.get("memory")).unwrap_or_default(),
        gpu: map
            .get(GPU_RESOURCE)
            .and_then(|quantity| quantity.0.parse::<u64>().ok())
            .unwrap_or(0),
    }
}

/// The sum of the containers' requests (init containers run before and hold nothing after).
pub fn pod_requests(pod: &Pod) -> Resources {
    pod.spec
        .iter()
        .flat_map(|spec| spec.containers.iter())
        .map(|container| {
            resources(
                container
                    .resources
                    .as_ref()
                    .and_then(|resources| resources.requests.as_ref()),
            )
        })
        .fold(Resources::default(), Resources::saturating_add)
}

fn convert_node(node: &Node, heartbeat: Option<Timestamp>, requested: Resources) -> model::Node {
    let metadata = &node.metadata;
    let labels: BTreeMap<String, String> = metadata.labels.clone().unwrap_or_default();
    let spec = node.spec.as_ref();
    let taints = spec
        .and_then(|spec| spec.taints.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|taint| {
            let effect = match taint.effect.as_str() {
                "NoSchedule" => TaintEffect::NoSchedule,
                "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
                "NoExecute" => TaintEffect::NoExecute,
                _ => return None,
            };
            Some(Taint {
                key: taint.key.clone(),
                value: taint.value.clone(),
                effect,
            })
        })
        .collect();
    let status = node.status.as_ref();
    let conditions = status
        .and_then(|status| status.conditions.as_ref())
        .into_iter()
        .flatten()
        .map(|condition| NodeCondition {
            kind: condition.type_.clone(),
            status: match condition.status.as_str() {
                "True" => ConditionStatus::True,
                "False" => ConditionStatus::False,
                _ => ConditionStatus::Unknown,
            },
            since: condition.last_transition_time.as_ref().map(|time| time.0),
            reason: condition.reason.clone(),
            message: condition.message.clone(),
        })
        .collect();
    model::Node {
        name: metadata.name.clone().unwrap_or_default(),
        zone: labels.get("topology.kubernetes.io/zone").cloned(),
        labels,
        taints,
        conditions,
        last_heartbeat: heartbeat,
        allocatable: resources(status.and_then(|status| status.allocatable.as_ref())),
        requested,
        unschedulable: spec.and_then(|spec| spec.unschedulable).unwrap_or(false),
    }
}

/// The newest checkpoint recorded on a pod, if its annotation holds one.
pub fn latest_checkpoint(pod: &Pod) -> Option<CheckpointInfo> {
    let text = pod.metadata.annotations.as_ref()?.get(LATEST_CHECKPOINT)?;
    serde_json::from_str(text).ok()
}

fn protected_pod(pod: &Pod, in_progress: &BTreeSet<PodRef>) -> Option<ProtectedPod> {
    let metadata = &pod.metadata;
    let annotations_map = metadata.annotations.as_ref()?;
    // Any `automigrate.dev/` key, not only `protect`: the engine parses every such pod and
    // reports a misspelled key (`automigrate.dev/protected`) instead of the pod being skipped
    // silently. A prefix test per key keeps this cheap for the many pods with none.
    if !annotations_map
        .keys()
        .any(|key| key.starts_with(annotations::DOMAIN))
        || metadata.deletion_timestamp.is_some()
        || is_terminated(pod)
    {
        return None;
    }
    let node = pod_node(pod)?.to_string();
    let namespace = metadata.namespace.clone()?;
    let name = metadata.name.clone()?;
    let owner = metadata
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| OwnerRef {
            kind: owner.kind.clone(),
            name: owner.name.clone(),
        });
    let pod_ref = PodRef::new(&namespace, &name);
    Some(ProtectedPod {
        checkpoint_in_progress: in_progress.contains(&pod_ref),
        namespace,
        name,
        node,
        owner,
        requests: pod_requests(pod),
        labels: metadata.labels.clone().unwrap_or_default(),
        annotations: annotations_map
            .iter()
            .filter(|(key, _)| key.starts_with(annotations::DOMAIN))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        last_checkpoint: latest_checkpoint(pod),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{
        Container, NodeCondition as K8sCondition, NodeSpec, NodeStatus, PodSpec, PodStatus,
        ResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn node(name: &str, ready: &str, since: i64) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    "topology.kubernetes.io/zone".into(),
                    "z1".into(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(true),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                allocatable: Some(BTreeMap::from([
                    ("cpu".into(), Quantity("4".into())),
                    ("memory".into(), Quantity("8Gi".into())),
                    (GPU_RESOURCE.into(), Quantity("1".into())),
                ])),
                conditions: Some(vec![K8sCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    last_transition_time: Some(Time(t(since))),
                    ..K8sCondition::default()
                }]),
                ..NodeStatus::default()
            }),
        })
    }

    fn pod(name: &str, node: &str, protect: bool, phase: &str) -> Arc<Pod> {
        let mut annotations = BTreeMap::from([("other.io/x".to_string(), "y".to_string())]);
        if protect {
            annotations.insert(annotations::PROTECT.into(), "true".into());
            annotations.insert(
                LATEST_CHECKPOINT.into(),
                r#"{"id":"ck-1","takenAt":"2027-01-15T08:00:00Z","size":1024,"heldOn":["n1"]}"#
                    .into(),
            );
        }
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ml".into()),
                annotations: Some(annotations),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "main".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some(BTreeMap::from([
                            ("cpu".into(), Quantity("500m".into())),
                            ("memory".into(), Quantity("1Gi".into())),
                        ])),
                        ..ResourceRequirements::default()
                    }),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
        })
    }

    #[test]
    fn maps_nodes_leases_and_pods() {
        let nodes = [node("n1", "True", -100), node("n2", "Unknown", -40)];
        let leases = [Arc::new(Lease {
            metadata: ObjectMeta {
                name: Some("n2".into()),
                namespace: Some(NODE_LEASE_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(t(-45))),
                ..LeaseSpec::default()
            }),
        })];
        let pods = [
            pod("trainer", "n1", true, "Running"),
            pod("web", "n1", false, "Running"),
            pod("done", "n1", true, "Succeeded"),
        ];
        let in_progress = BTreeSet::from([PodRef::new("ml", "trainer")]);
        let inputs = Inputs {
            nodes: &nodes,
            leases: &leases,
            pods: &pods,
            migrations: &[],
            alerts: Vec::new(),
            links: Arc::from(Vec::new()),
            users: Arc::from(Vec::new()),
            checkpoints_in_progress: &in_progress,
        };
        let snapshot = build(&inputs, t(0));
        assert_eq!(snapshot.nodes.len(), 2);
        let n1 = &snapshot.nodes[0];
        assert_eq!(n1.zone.as_deref(), Some("z1"));
        assert!(n1.unschedulable);
        assert_eq!(n1.allocatable, Resources::new(4000, 8 << 30, 1));
        assert_eq!(
            n1.requested,
            Resources::new(1000, 2 << 30, 0),
            "two running pods count, the finished one does not"
        );
        assert_eq!(n1.last_heartbeat, None);
        let n2 = &snapshot.nodes[1];
        assert_eq!(n2.last_heartbeat, Some(t(-45)));
        assert_eq!(n2.conditions[0].status, ConditionStatus::Unknown);
        assert_eq!(n2.conditions[0].since, Some(t(-40)));

        assert_eq!(snapshot.pods.len(), 1, "only the protected running pod");
        let trainer = &snapshot.pods[0];
        assert_eq!(trainer.node, "n1");
        assert!(trainer.checkpoint_in_progress);
        assert_eq!(trainer.last_checkpoint.as_ref().unwrap().id, "ck-1");
        assert!(
            !trainer.annotations.contains_key("other.io/x"),
            "only automigrate.dev/ annotations reach the engine"
        );
        assert!(!trainer.annotations.contains_key(LATEST_CHECKPOINT));
    }

    #[test]
    fn user_latency_from_annotations_wins_over_promql_and_is_deterministic() {
        let annotated = |name: &str, user: Option<&str>, latency: &str| {
            let mut pod =
                protected_pod(&pod(name, "n1", true, "Running"), &BTreeSet::new()).unwrap();
            if let Some(user) = user {
                pod.annotations
                    .insert(annotations::USER.into(), user.into());
            }
            pod.annotations
                .insert(annotations::USER_LATENCY.into(), latency.into());
            pod
        };
        let seen = |user: &str, node: &str, millis: u64| UserObservation {
            user: user.into(),
            node: node.into(),
            latency: std::time::Duration::from_millis(millis),
        };
        let pods = [
            annotated("b", Some("alice"), "n1=30ms, n2=40ms"),
            annotated("a", Some("alice"), "n1=10ms"),
            annotated("c", None, "n3=1ms"),
            annotated("d", Some("carol"), "n1=oops"),
        ];
        let queried = [
            seen("alice", "n1", 99),
            seen("alice", "n3", 50),
            seen("bob", "n1", 7),
        ];
        let users = user_observations(&pods, &queried);
        assert_eq!(
            users,
            [
                seen("alice", "n3", 50),
                seen("bob", "n1", 7),
                seen("alice", "n1", 10),
                seen("alice", "n2", 40),
            ],
            "pod a's n1 beats pod b's and PromQL's; no user or a bad value adds nothing"
        );
        let reversed: Vec<ProtectedPod> = pods.iter().rev().cloned().collect();
        assert_eq!(user_observations(&reversed, &queried), users);
    }
}
