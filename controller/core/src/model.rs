//! The cluster as the decision engine sees it: a [`ClusterSnapshot`] taken at one instant.
//!
//! A driver fills it from whatever it watches (kube reflectors, local agents, a simulated
//! cluster). Everything is plain data with serde, so a snapshot can be written to YAML, edited by
//! hand and fed to `automigrate plan`. Field names follow Kubernetes (`camelCase`), and unknown
//! fields are rejected so that a typo in a hand-written snapshot is an error, not a silent
//! default. Times are absolute ([`jiff::Timestamp`], RFC 3339 in YAML); the engine turns them
//! into ages against the `now` it is given, never against a clock of its own.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::migration::Phase;
use crate::units::{self, BitRate, Bytes, MilliCpu};

/// A node's name, as in `metadata.name`.
pub type NodeName = String;

/// A pod's identity, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// CPU, memory and GPUs, as requested by a pod or offered by a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub cpu: MilliCpu,
    #[serde(default)]
    pub memory: Bytes,
    #[serde(default)]
    pub gpu: u64,
}

impl Resources {
    pub fn new(cpu_millis: u64, memory_bytes: u64, gpu: u64) -> Self {
        Self {
            cpu: MilliCpu(cpu_millis),
            memory: Bytes(memory_bytes),
            gpu,
        }
    }

    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources::new(
            self.cpu.0.saturating_sub(other.cpu.0),
            self.memory.0.saturating_sub(other.memory.0),
            self.gpu.saturating_sub(other.gpu),
        )
    }

    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources::new(
            self.cpu.0.saturating_add(other.cpu.0),
            self.memory.0.saturating_add(other.memory.0),
            self.gpu.saturating_add(other.gpu),
        )
    }

    /// The first dimension in which `request` does not fit into `self`, if any.
    pub fn shortfall(self, request: Resources) -> Option<&'static str> {
        if request.cpu > self.cpu {
            Some("cpu")
        } else if request.memory > self.memory {
            Some("memory")
        } else if request.gpu > self.gpu {
            Some("gpu")
        } else {
            None
        }
    }
}

/// `True`, `False` or `Unknown`, as in a Kubernetes condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One entry of `status.conditions`: kubelet's own (`Ready`, `MemoryPressure`, …) or one set by
/// node-problem-detector (`KernelDeadlock`, `ReadonlyFilesystem`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeCondition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: ConditionStatus,
    /// `lastTransitionTime`: since when the condition has had this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Taint {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    pub effect: TaintEffect,
}

/// A node and everything the engine needs to judge its health and its room for one more pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Node {
    pub name: NodeName,
    /// `topology.kubernetes.io/zone`, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<Taint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<NodeCondition>,
    /// `spec.renewTime` of the node's Lease in `kube-node-lease`: the kubelet's heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Timestamp>,
    pub allocatable: Resources,
    /// Sum of the requests of every pod bound to the node, protected or not.
    #[serde(default)]
    pub requested: Resources,
    /// `spec.unschedulable` (cordoned).
    #[serde(default)]
    pub unschedulable: bool,
}

impl Node {
    pub fn condition(&self, kind: &str) -> Option<&NodeCondition> {
        self.conditions
            .iter()
            .find(|condition| condition.kind == kind)
    }

    pub fn free(&self) -> Resources {
        self.allocatable.saturating_sub(self.requested)
    }
}

/// The controller that owns a pod (`metadata.ownerReferences` with `controller: true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
}

/// The newest checkpoint of a pod that the agents hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointInfo {
    pub id: String,
    pub taken_at: Timestamp,
    pub size: Bytes,
    /// How long the workload was frozen to take it: the checkpoint cost `C` in Young/Daly.
    #[serde(
        default,
        with = "units::option_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub freeze: Option<Duration>,
    /// Nodes that hold a verified copy (the pod's node and its standby replicas).
    #[serde(default)]
    pub held_on: Vec<NodeName>,
    /// Training progress recorded with the checkpoint, when the workload reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// A pod that carries `automigrate.dev/protect: "true"`. Its annotations are kept raw: the engine
/// parses them itself so that a malformed one is reported against the pod, never dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtectedPod {
    pub namespace: String,
    pub name: String,
    pub node: NodeName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerRef>,
    #[serde(default)]
    pub requests: Resources,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointInfo>,
    /// A checkpoint of this pod is being taken right now; do not ask for another.
    #[serde(default)]
    pub checkpoint_in_progress: bool,
}

impl ProtectedPod {
    pub fn pod_ref(&self) -> PodRef {
        PodRef::new(&self.namespace, &self.name)
    }
}

/// A dataset that protected pods read, keyed by the value of their `automigrate.dev/dataset`
/// annotation, and where copies of it already are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dataset {
    pub id: String,
    pub total_bytes: Bytes,
    pub file_count: u64,
    /// Exact file sizes when known; otherwise the planner assumes equal sizes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<crate::transfer::FileSpec>,
    #[serde(default)]
    pub present_on: Vec<NodeName>,
}

impl Dataset {
    /// The files to plan a transfer with: the exact list, or `file_count` equal shares.
    pub fn file_specs(&self) -> Vec<crate::transfer::FileSpec> {
        if !self.files.is_empty() || self.file_count == 0 {
            return self.files.clone();
        }
        let count = self.file_count;
        let base = self.total_bytes.0 / count;
        let remainder = self.total_bytes.0 % count;
        (0..count)
            .map(|index| crate::transfer::FileSpec {
                path: format!("{}/part-{index:06}", self.id.trim_end_matches('/')),
                size: base + u64::from(index < remainder),
            })
            .collect()
    }
}

/// One measured node-to-node link, from the agents' peer probes or from Prometheus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LinkObservation {
    pub from: NodeName,
    pub to: NodeName,
    #[serde(with = "units::duration")]
    pub rtt: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BitRate>,
    /// Packet loss probability, 0 to 1.
    #[serde(default)]
    pub loss: f64,
    /// Whether `to` answers `from`'s probes now (one of `from`'s last two probes answered,
    /// not the windowed loss); `None`: not reported (a PromQL source, an older agent). Feeds
    /// peer-confirmed failure ([`crate::health::PeerReach`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answering: Option<bool>,
}

/// How far a user (who consumes a pod's results, e.g. an edge client) is from a node now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserObservation {
    pub user: String,
    pub node: NodeName,
    #[serde(with = "units::duration")]
    pub latency: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

/// An alert received from Alertmanager. Labels `node`, `pod` and `namespace` say what it is
/// about; `alertname` is [`Alert::name`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Alert {
    pub name: String,
    pub status: AlertStatus,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub starts_at: Option<Timestamp>,
}

/// A migration the driver knows about (from Migration resources): in flight or finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationRecord {
    pub pod: PodRef,
    pub phase: Phase,
    pub source: NodeName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NodeName>,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

impl MigrationRecord {
    /// A migration started at `at` that its driver has not reported on yet.
    pub fn just_started(pod: PodRef, at: Timestamp) -> Self {
        Self {
            pod,
            phase: Phase::Pending,
            source: String::new(),
            target: None,
            started_at: at,
            finished_at: None,
        }
    }
}

/// A user asked for a pod to move (`kubectl migrate`), optionally to a named node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationRequest {
    pub pod: PodRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NodeName>,
}

/// Everything the engine knows at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSnapshot {
    /// When the snapshot was taken; tools that replay it use this as `now` unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_at: Option<Timestamp>,
    #[serde(default)]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub pods: Vec<ProtectedPod>,
    #[serde(default)]
    pub datasets: Vec<Dataset>,
    #[serde(default)]
    pub links: Vec<LinkObservation>,
    #[serde(default)]
    pub users: Vec<UserObservation>,
    #[serde(default)]
    pub alerts: Vec<Alert>,
    #[serde(default)]
    pub migrations: Vec<MigrationRecord>,
    #[serde(default)]
    pub requests: Vec<MigrationRequest>,
}

/// Why a snapshot document could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot: {path}: {reason}")]
    Invalid { path: String, reason: String },
    /// The document holds more YAML nodes than the reader was allowed to read.
    #[error(
        "snapshot: more than {limit} YAML nodes (values, lists and maps; about 30 per cluster node or pod), the reading limit; stopped at {path}"
    )]
    TooLarge { limit: usize, path: String },
    #[error("snapshot: node `{0}` is listed twice")]
    DuplicateNode(NodeName),
    #[error("snapshot: pod {0} is listed twice")]
    DuplicatePod(PodRef),
}

impl ClusterSnapshot {
    /// Parses a YAML snapshot; errors name the field path (`pods[3].requests.memory`). Reads at
    /// most [`ClusterSnapshot::DEFAULT_MAX_YAML_NODES`] YAML nodes.
    pub fn from_yaml(text: &str) -> Result<Self, SnapshotError> {
        Self::from_yaml_with_limit(text, Self::DEFAULT_MAX_YAML_NODES)
    }

    /// The most YAML nodes [`ClusterSnapshot::from_yaml`] reads: about 30 per cluster node or
    /// pod, so some 300,000 of them (a 5,000-node cluster with 150,000 pods is Kubernetes'
    /// tested limit). The limit only stops a runaway document early; memory grows with the
    /// file, not with the limit.
    pub const DEFAULT_MAX_YAML_NODES: usize = 10_000_000;

    /// [`ClusterSnapshot::from_yaml`] with another limit on the YAML nodes read.
    pub fn from_yaml_with_limit(text: &str, max_yaml_nodes: usize) -> Result<Self, SnapshotError> {
        let snapshot: ClusterSnapshot =
            crate::policy::from_yaml_with_node_limit(text, max_yaml_nodes).map_err(
                |(path, reason, too_many_nodes)| {
                    if too_many_nodes {
                        SnapshotError::TooLarge {
                            limit: max_yaml_nodes,
                            path,
                        }
                    } else {
                        SnapshotError::Invalid { path, reason }
                    }
                },
            )?;
        snapshot.check_unique()?;
        Ok(snapshot)
    }

    fn check_unique(&self) -> Result<(), SnapshotError> {
        let mut nodes = std::collections::BTreeSet::new();
        for node in &self.nodes {
            if !nodes.insert(node.name.as_str()) {
                return Err(SnapshotError::DuplicateNode(node.name.clone()));
            }
        }
        let mut pods = std::collections::BTreeSet::new();
        for pod in &self.pods {
            if !pods.insert((pod.namespace.as_str(), pod.name.as_str())) {
                return Err(SnapshotError::DuplicatePod(pod.pod_ref()));
            }
        }
        Ok(())
    }
}
