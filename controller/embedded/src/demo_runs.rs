//! The demo's runs on the local cluster of real components ([`KubeCluster`]), and what is
//! measured in them.
//!
//! Every run builds its own cluster (4 nodes on a line, the real `automigrate-apiserver`,
//! `automigrate-kubelet`s, `automigrate-agent` pods and two `automigrate-controller` replicas),
//! applies the demo policies ([`DemoSettings::policies_file`]), puts the dataset on node-a and
//! applies the trainer as a Pod ([`trainer_pod`], the manifest `examples/demo-trainer-pod.yaml`
//! shows) pinned to node-a. The controller protects it as it would on any cluster; the harness
//! only acts on the world, as the rules of issue 12 allow:
//!
//! - [`RunKind::Reference`]: the same pod without any `automigrate.dev/` annotation (the
//!   controller ignores it): the uninterrupted training time and the reference loss.
//! - [`RunKind::HardFailure`]: once node-a reported `percent` % of the epochs (and, with
//!   [`Recovery::Resume`], a checkpoint taken after epoch 1 reached a standby node), node-a is
//!   powered off ([`KubeCluster::power_off`]). [`Recovery::FreshRestart`] runs the same pod with
//!   `automigrate.dev/replicate-to: "0"`: no checkpoint survives node-a, so the controller starts
//!   the replacement from the beginning (the seed paper's "new container").
//! - [`RunKind::Degradation`]: at `percent` % a node-problem-detector condition the policy
//!   reacts to ([`DEGRADATION_CONDITION`]) turns True on node-a.
//! - [`RunKind::Mobility`]: the user's latency to every node is written to the pod's
//!   `automigrate.dev/user-latency` annotation (as an edge gateway would), following
//!   [`mobility_trace`]: near node-a, jitter, moved next to node-c, jitter.
//!
//! Where files are: every node has its own `/var/lib/automigrate` (the kubelets'
//! `--host-path-map`; [`KubeCluster::node_dir`] on the host): the dataset in `data/<name>` (the
//! agents' data root, so the controller can move it), the trainer's progress log in
//! `work/trainer/`, the program in `app/` (the "image", on every node).
//!
//! Measured: the progress log of every node (epochs, losses, run tags), the running containers
//! sampled from runc on every node every 20 ms ([`KubeCluster::running_containers`], not the
//! controller's view), the checkpoints the controller recorded on the pod, and every Migration
//! object as the API server has it (phases and timings from `status.history`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::{Duration, Instant};

use automigrate_core::annotations;
use automigrate_core::migration::{MigrationState, Phase};
use automigrate_core::model::CheckpointInfo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::faults::sampler::{CopyReport, CopySampler, unix_now};
use crate::kube::{KubeCluster, KubeClusterConfig, KubeClusterError, NODE_HOST_DIR};
use crate::workload::{self, DatasetSpec, Progress, TrainerSpec, WorkloadError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cluster(#[from] KubeClusterError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("run {run}: training did not finish within {limit:?} (logs: {logs})")]
    TimedOut {
        run: String,
        limit: Duration,
        logs: String,
    },
    #[error("run {run}: {reason}")]
    Failed { run: String, reason: String },
}

/// The namespace and name of the demo's pod, and its container.
pub const POD_NAMESPACE: &str = "ml";
pub const POD_NAME: &str = "trainer";
pub const CONTAINER_NAME: &str = "trainer";
/// The node the pod starts on and its dataset lives on.
pub const HOME_NODE: &str = "node-a";
/// The label `edge-mobility` policies require of their targets.
pub const EDGE_LABEL: &str = "node-role.kubernetes.io/edge";
/// The condition the degradation run sets on node-a, as node-problem-detector reports a hung
/// kernel task (one of the default triggers' conditions; the kubelet keeps it).
pub const DEGRADATION_CONDITION: &str = "KernelDeadlock";
/// The user whose latency the mobility run's pod follows.
pub const MOBILITY_USER: &str = "alice";
/// Where the pod finds its dataset, work directory and program on every node.
pub const DATA_DIR: &str = "data";
pub const WORK_DIR: &str = "work/trainer";
pub const APP_DIR: &str = "app";
/// The image the pod names: the local kubelet resolves every non-checkpoint image to the
/// host's root filesystem (read-only /usr, /etc), where python3 and numpy are.
pub const TRAINER_IMAGE: &str = "ghcr.io/automigrate/demo-trainer:0.1.0";
/// The pod annotation where the controller records the newest checkpoint
/// (`automigrate_operator::snapshot::LATEST_CHECKPOINT`).
pub const LATEST_CHECKPOINT: &str = "checkpoint.automigrate.dev/latest";
/// The replacement pod's annotation naming the checkpoint it was restored from.
pub const RESTORED_FROM: &str = "migration.automigrate.dev/restored-from";
/// How often the runc state of every node is sampled.
const SAMPLE_PERIOD: Duration = Duration::from_millis(20);

/// How a replacement after a hard failure starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Recovery {
    /// From the newest checkpoint a standby node holds (what automigrate does).
    Resume,
    /// From the beginning: the pod keeps no standby copy (`replicate-to: "0"`), so nothing
    /// survives its node.
    FreshRestart,
}

/// What the demo runs on; shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DemoSettings {
    /// Every run's cluster lives in `<root>/<run>/` (tmpfs: the kubelets report DiskPressure
    /// on a nearly full disk, and the controller moves nothing to such a node).
    pub root: PathBuf,
    /// Where automigrate-apiserver, -kubelet, -agent, -controller and automigrate are.
    pub bin_dir: PathBuf,
    /// The demo's policy ConfigMaps (applied after deploy/policies/default.yaml).
    pub policies_file: PathBuf,
    pub nodes: usize,
    /// RTT between neighbouring nodes on the line (node-a to b, c, d: 1, 2, 3 steps).
    pub rtt_step_ms: u64,
    pub dataset: DatasetSpec,
    pub trainer: TrainerSpec,
    /// `automigrate.dev/checkpoint-interval` of the pod.
    pub checkpoint_interval: String,
    /// Policy of the failure and degradation runs, and of the mobility run.
    pub failure_policy: String,
    pub mobility_policy: String,
    /// Keep every run's state directory (otherwise removed after the run).
    pub keep: bool,
}

/// Which run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum RunKind {
    Reference,
    HardFailure { percent: u32, recovery: Recovery },
    Degradation { percent: u32 },
    Mobility,
}

impl RunKind {
    pub fn name(&self) -> String {
        match self {
            RunKind::Reference => "reference".into(),
            RunKind::HardFailure {
                percent,
                recovery: Recovery::Resume,
            } => format!("hard-failure-{percent}-migrate"),
            RunKind::HardFailure {
                percent,
                recovery: Recovery::FreshRestart,
            } => format!("hard-failure-{percent}-restart"),
            RunKind::Degradation { percent } => format!("degradation-{percent}"),
            RunKind::Mobility => "mobility".into(),
        }
    }
}

/// One node's progress log (every incarnation of the pod that ran there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRun {
    pub node: String,
    /// The pod that ran there (the original, or the replacement a Migration created).
    pub pod: String,
    pub runs: Vec<u64>,
    pub first_epoch: Option<u32>,
    pub last_epoch: Option<u32>,
    pub first_at: Option<f64>,
    pub last_at: Option<f64>,
    pub started_fresh: bool,
    pub done: bool,
    pub progress: Progress,
}

/// One phase of a Migration, from its `status.history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseSpan {
    pub phase: Phase,
    pub started_at: f64,
    pub seconds: f64,
}

/// One Migration object, as read back from the API server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSummary {
    /// `metadata.name` of the Migration.
    pub name: String,
    pub trigger: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub phase: Phase,
    /// `status.startedAt`: when the controller decided.
    pub decided_at: f64,
    /// The final dump's start (live sources: the Checkpointing phase).
    pub freeze_started_at: Option<f64>,
    /// The end of the Restoring phase: the replacement ran again.
    pub resumed_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub source_pod: String,
    pub replacement_pod: Option<String>,
    /// The checkpoint the replacement was restored from (`None`: started fresh).
    pub checkpoint: Option<String>,
    pub bytes_moved: u64,
    /// The controller's own downtime figure (`status.downtime`).
    pub downtime_s: Option<f64>,
    pub message: Option<String>,
    pub history: Vec<PhaseSpan>,
}

/// One checkpoint the controller recorded on the pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSeen {
    pub id: String,
    pub node: String,
    pub taken_at: f64,
    pub bytes: u64,
    pub freeze_ms: Option<f64>,
    pub held_on: Vec<String>,
}

/// Everything measured in one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunResult {
    pub name: String,
    pub kind: RunKind,
    pub policy: Option<String>,
    pub epochs: u32,
    pub deployed_at: f64,
    pub done_at: Option<f64>,
    /// Pod applied to the last epoch's line: the training time of this run.
    pub training_s: Option<f64>,
    pub final_epoch: Option<u32>,
    pub final_loss: Option<f64>,
    pub final_loss_hex: Option<String>,
    /// When the harness acted (power-off, condition, the user's decisive move).
    pub event_at: Option<f64>,
    /// The last epoch the source had reported when the harness acted.
    pub epoch_at_event: Option<u32>,
    pub migrations: Vec<MigrationSummary>,
    /// From the event (or the final dump's start, for a live source) until the replacement
    /// ran again.
    pub downtime_s: Option<f64>,
    /// From the event until the controller created its Migration.
    pub detection_s: Option<f64>,
    /// First epoch the replacement reported, minus one: where it resumed.
    pub resumed_from_epoch: Option<u32>,
    /// The epochs the source had reported around the restored checkpoint's dump.
    pub checkpoint_epochs: Option<(Option<u32>, Option<u32>)>,
    /// Epochs computed twice: reported by the source, and again by the replacement.
    pub lost_epochs: Option<u32>,
    /// Live sources: the last epoch the source had reported when the final dump began (the
    /// Migration's Checkpointing phase). The kubelet checkpoint API leaves the container
    /// running, so the source may report more epochs until it is fenced.
    pub epoch_at_final_dump: Option<u32>,
    /// The replacement is the same process (run tag kept), i.e. resumed, not restarted.
    pub same_process: Option<bool>,
    pub checkpoints: usize,
    pub mean_freeze_ms: Option<f64>,
    /// Bytes of checkpoints copied to standby nodes while training ran.
    pub replication_bytes: u64,
    /// Bytes the Migrations moved (`status.bytesMoved`).
    pub recovery_bytes: u64,
    /// Nodes whose copy of the dataset matches its manifest after the run.
    pub dataset_verified_on: Vec<String>,
    /// Nodes the harness put the dataset on before the run (the rest got it from the
    /// controller).
    pub dataset_provisioned_on: Vec<String>,
    pub copies: CopyReport,
    /// Two nodes' progress spans overlap in time.
    pub progress_overlap: bool,
    pub containers: Vec<ContainerRun>,
    pub checkpoints_seen: Vec<CheckpointSeen>,
    /// How the pod moved: its first node, then each Migration's target (trigger).
    pub path: Vec<String>,
    /// `/proc/loadavg` when the run started and when it ended.
    pub load_average: (String, String),
    /// The cluster's state directory while it ran (component logs in `logs/`).
    pub cluster_root: PathBuf,
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn unix_of(timestamp: jiff::Timestamp) -> f64 {
    timestamp.as_nanosecond() as f64 / 1e9
}

/// The epoch at which `percent` % of the training is done (at least 1).
pub fn epoch_at_percent(epochs: u32, percent: u32) -> u32 {
    (u64::from(epochs) * u64::from(percent))
        .div_ceil(100)
        .clamp(1, u64::from(epochs.max(1))) as u32
}

/// The epochs a source had reported while a checkpoint of it was taken at `taken_at` (unix
/// seconds) after a freeze of `freeze_s`: the last one reported before the freeze began (minus
/// half a second of clock and polling slack) and the last one half a second after. No epoch
/// reported yet is epoch 0: the checkpoint holds the first epoch's work in progress (a window
/// of `None` failed the demo's resume check for a first checkpoint that was restored).
fn epochs_around_checkpoint<'a>(
    epochs: impl Iterator<Item = &'a crate::workload::EpochRecord>,
    taken_at: f64,
    freeze_s: f64,
) -> (Option<u32>, Option<u32>) {
    let (began, recorded) = (taken_at - freeze_s - 0.5, taken_at + 0.5);
    let (mut before, mut after) = (0, 0);
    for record in epochs {
        if record.at <= began {
            before = record.epoch;
        }
        if record.at <= recorded {
            after = record.epoch;
        }
    }
    (Some(before), Some(after))
}

/// Network namespace names are `amnet<ID>-<prefix>-<i>`: keep the prefix short and valid.
fn short_prefix(run: &str) -> String {
    let mut prefix: String = run
        .split('-')
        .filter_map(|part| part.chars().next())
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    prefix.truncate(10);
    if prefix.is_empty() {
        "run".into()
    } else {
        prefix
    }
}

/// The trainer's Pod: what a user applies with `kubectl apply -f` (see
/// examples/demo-trainer-pod.yaml, the same pod as YAML): the program reads the dataset
/// `dataset` of the node's data root at `/data`. `annotations` are its `automigrate.dev/`
/// annotations (none: an unprotected pod).
pub fn trainer_pod(
    trainer: &TrainerSpec,
    dataset: &str,
    annotations: &BTreeMap<String, String>,
) -> Value {
    let node_path = |dir: &str| format!("{NODE_HOST_DIR}/{dir}");
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD_NAME,
            "namespace": POD_NAMESPACE,
            "labels": {"app": "demo-trainer", "automigrate.dev/tier": "edge"},
            "annotations": annotations,
        },
        "spec": {
            "nodeName": HOME_NODE,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": CONTAINER_NAME,
                "image": TRAINER_IMAGE,
                "command": [
                    workload::PYTHON,
                    format!("/app/{}", workload::TRAINER_FILE),
                    "/data",
                    "/work",
                    trainer.epochs.to_string(),
                    trainer.hidden.to_string(),
                    trainer.seed.to_string(),
                    format!("{:?}", trainer.learning_rate),
                ],
                "workingDir": "/work",
                "env": [
                    {"name": "OPENBLAS_NUM_THREADS", "value": "1"},
                    {"name": "OMP_NUM_THREADS", "value": "1"},
                ],
                "volumeMounts": [
                    {"name": "data", "mountPath": "/data"},
                    {"name": "work", "mountPath": "/work"},
                    {"name": "app", "mountPath": "/app", "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "data", "hostPath": {"path": node_path(&format!("{DATA_DIR}/{dataset}"))}},
                {"name": "work", "hostPath": {"path": node_path(WORK_DIR)}},
                {"name": "app", "hostPath": {"path": node_path(APP_DIR)}},
            ],
        },
    })
}

impl DemoSettings {
    fn cluster_config(&self, run: &str) -> KubeClusterConfig {
        let mut config = KubeClusterConfig::line(
            self.nodes,
            Duration::from_millis(self.rtt_step_ms),
            self.root.join(run),
            self.bin_dir.clone(),
        );
        config.name_prefix = short_prefix(run);
        config.policies = vec![self.policies_file.clone()];
        for node in config.nodes.clone() {
            config.node_labels.insert(
                node,
                BTreeMap::from([(EDGE_LABEL.to_string(), String::new())]),
            );
        }
        config
    }

    /// The dataset's path as the pod and the controller name it (`automigrate.dev/dataset`).
    fn dataset_path(&self) -> String {
        format!("{NODE_HOST_DIR}/{DATA_DIR}/{}", self.dataset.name)
    }

    /// The pod's annotations for a run (none for the reference).
    fn annotations(&self, kind: RunKind) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        let policy = match kind {
            RunKind::Reference => return map,
            RunKind::Mobility => &self.mobility_policy,
            _ => &self.failure_policy,
        };
        for (key, value) in [
            (annotations::PROTECT, "true"),
            (annotations::POLICY, policy.as_str()),
            (annotations::MODE, "transparent"),
            (
                annotations::CHECKPOINT_INTERVAL,
                self.checkpoint_interval.as_str(),
            ),
        ] {
            map.insert(key.to_string(), value.to_string());
        }
        map.insert(annotations::DATASET.to_string(), self.dataset_path());
        if let RunKind::HardFailure {
            recovery: Recovery::FreshRestart,
            ..
        } = kind
        {
            map.insert(annotations::REPLICATE_TO.to_string(), "0".into());
        }
        if kind == RunKind::Mobility {
            map.insert(annotations::USER.to_string(), MOBILITY_USER.into());
        }
        map
    }
}

fn progress_path(cluster: &KubeCluster, node: &str) -> PathBuf {
    cluster
        .node_dir(node)
        .join(WORK_DIR)
        .join(workload::PROGRESS_FILE)
}

/// Every node's progress log, ordered by its first line.
fn progress_of_all(
    cluster: &KubeCluster,
    pods_by_node: &BTreeMap<String, String>,
) -> Vec<ContainerRun> {
    let mut runs = Vec::new();
    for node in cluster.nodes() {
        let Ok(progress) = workload::read_progress(&progress_path(cluster, node)) else {
            continue;
        };
        if progress.lines.is_empty() {
            continue;
        }
        let epochs: Vec<_> = progress.epochs().collect();
        let mut runs_seen: Vec<u64> = progress
            .lines
            .iter()
            .map(|line| match line {
                workload::ProgressLine::Start { run, .. }
                | workload::ProgressLine::Done { run, .. } => *run,
                workload::ProgressLine::Epoch(record) => record.run,
            })
            .collect();
        runs_seen.dedup();
        let times: Vec<f64> = progress
            .lines
            .iter()
            .map(|line| match line {
                workload::ProgressLine::Start { at, .. }
                | workload::ProgressLine::Done { at, .. } => *at,
                workload::ProgressLine::Epoch(record) => record.at,
            })
            .collect();
        runs.push(ContainerRun {
            node: node.clone(),
            pod: pods_by_node.get(node).cloned().unwrap_or_default(),
            runs: runs_seen,
            first_epoch: epochs.first().map(|record| record.epoch),
            last_epoch: epochs.last().map(|record| record.epoch),
            first_at: times.first().copied(),
            last_at: times.last().copied(),
            started_fresh: progress.starts().next().is_some(),
            done: progress.done().is_some(),
            progress: progress.clone(),
        });
    }
    runs.sort_by(|a, b| {
        a.first_at
            .partial_cmp(&b.first_at)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    runs
}

/// Whether two containers' reported spans overlap in time.
pub fn spans_overlap(containers: &[ContainerRun]) -> bool {
    let spans: Vec<(f64, f64)> = containers
        .iter()
        .filter_map(|run| Some((run.first_at?, run.last_at?)))
        .collect();
    spans
        .iter()
        .enumerate()
        .any(|(i, a)| spans.iter().skip(i + 1).any(|b| a.0 < b.1 && b.0 < a.1))
}

/// The trainer pods in the namespace, newest first, without those being deleted.
fn live_trainer_pods(cluster: &KubeCluster) -> Vec<Value> {
    let mut pods: Vec<Value> = cluster
        .get(&["pods", "-n", POD_NAMESPACE])
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
        .collect();
    pods.sort_by(|a, b| {
        let created = |pod: &Value| {
            pod["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        created(b).cmp(&created(a))
    });
    pods
}

/// The newest checkpoint the controller recorded on `pod`.
fn latest_checkpoint(pod: &Value) -> Option<CheckpointInfo> {
    let text = pod["metadata"]["annotations"][LATEST_CHECKPOINT].as_str()?;
    serde_json::from_str(text).ok()
}

/// One Migration object in the demo's terms.
fn summarise_migration(object: &Value) -> Option<MigrationSummary> {
    let status = object.get("status").filter(|status| !status.is_null())?;
    let state: MigrationState = serde_json::from_value(status.clone()).ok()?;
    let history: Vec<PhaseSpan> = state
        .history
        .iter()
        .map(|timing| PhaseSpan {
            phase: timing.phase,
            started_at: unix_of(timing.started_at),
            seconds: timing.duration.as_secs_f64(),
        })
        .collect();
    let end_of = |phase: Phase| {
        history
            .iter()
            .rfind(|span| span.phase == phase)
            .map(|span| span.started_at + span.seconds)
    };
    let start_of = |phase: Phase| {
        history
            .iter()
            .find(|span| span.phase == phase)
            .map(|span| span.started_at)
    };
    let trigger = object["spec"]["trigger"].as_str().unwrap_or("Manual");
    let mut chars = trigger.chars();
    let trigger = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    Some(MigrationSummary {
        name: object["metadata"]["name"].as_str()?.to_string(),
        trigger,
        from: state.source.clone(),
        to: state.target.clone(),
        reason: object["spec"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        phase: state.phase,
        decided_at: unix_of(state.started_at),
        freeze_started_at: state
            .source_alive
            .then(|| start_of(Phase::Checkpointing))
            .flatten(),
        resumed_at: end_of(Phase::Restoring),
        ended_at: state
            .phase
            .is_terminal()
            .then(|| unix_of(state.phase_started_at)),
        source_pod: object["spec"]["pod"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        replacement_pod: status["replacementPod"].as_str().map(str::to_string),
        // A fresh final dump is the state machine's checkpoint; a restore after a failure names
        // the stored one it used.
        checkpoint: state.checkpoint_id.clone().or_else(|| {
            status["storedCheckpoint"]["id"]
                .as_str()
                .map(str::to_string)
        }),
        bytes_moved: status["bytesMoved"].as_u64().unwrap_or(0),
        downtime_s: state.downtime.map(|downtime| downtime.as_secs_f64()),
        message: state.message.clone(),
        history,
    })
}

/// The Migrations of the demo's namespace, in the order they started.
fn read_migrations(cluster: &KubeCluster) -> Vec<MigrationSummary> {
    let mut migrations: Vec<MigrationSummary> = cluster
        .migrations()
        .iter()
        .filter(|object| object["metadata"]["namespace"] == POD_NAMESPACE)
        .filter_map(summarise_migration)
        .collect();
    migrations.sort_by(|a, b| {
        a.decided_at
            .partial_cmp(&b.decided_at)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    migrations
}

/// A simulated user's latency to each node, per phase of the mobility run.
pub fn mobility_trace(nodes: &[String]) -> Vec<(f64, Vec<Vec<u64>>)> {
    // Rows are alternatives cycled on every update (jitter); columns follow `nodes`
    // (a, b, c, d). Phase boundaries are fractions of the reference training time.
    let pad = |values: &[u64]| -> Vec<u64> {
        (0..nodes.len())
            .map(|index| values.get(index).copied().unwrap_or(60))
            .collect()
    };
    vec![
        // Near node-a.
        (0.0, vec![pad(&[8, 18, 28, 38])]),
        // Drifting: node-a flickers around the 40 ms threshold, but no node is within 25 ms.
        (0.15, vec![pad(&[38, 27, 33, 43]), pad(&[44, 28, 32, 42])]),
        // Moved next to node-c: node-a far, node-c within 25 ms.
        (0.3, vec![pad(&[55, 40, 12, 22])]),
        // Jitter around node-c's threshold; no other node within 25 ms: it must stay.
        (0.65, vec![pad(&[60, 27, 38, 27]), pad(&[62, 29, 44, 28])]),
    ]
}

/// The phase of [`mobility_trace`] in which the user has moved and the pod should follow.
pub const MOBILITY_DECISIVE_PHASE: usize = 2;

fn latency_annotation(nodes: &[String], row: &[u64]) -> String {
    nodes
        .iter()
        .zip(row)
        .map(|(node, ms)| format!("{node}={ms}ms"))
        .collect::<Vec<_>>()
        .join(",")
}

fn run_limit(settings: &DemoSettings) -> Duration {
    // Generous: a 2-core machine shared with builds runs the trainer far slower than idle, and
    // a hard failure adds the controller's detection (15 s lease timeout) and a restore.
    Duration::from_secs(150 + u64::from(settings.trainer.epochs) * 6)
}

/// What the harness did, for the result.
#[derive(Debug, Clone, Copy, Default)]
struct Action {
    at: Option<f64>,
    epoch: Option<u32>,
}

/// Runs one scenario on a fresh cluster. `reference_s` paces the mobility trace.
pub async fn run(
    settings: &DemoSettings,
    kind: RunKind,
    reference_s: f64,
) -> Result<RunResult, RunError> {
    let name = kind.name();
    let dir = settings.root.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| WorkloadError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    let cluster = Arc::new(KubeCluster::create(settings.cluster_config(&name)).await?);
    let outcome = drive(&cluster, settings, kind, reference_s).await;
    let cluster = Arc::try_unwrap(cluster).map_err(|_| RunError::Failed {
        run: name.clone(),
        reason: "the cluster is still shared at the end of the run".into(),
    })?;
    let teardown = cluster.teardown().await;
    if !settings.keep
        && outcome.is_ok()
        && let Err(error) = std::fs::remove_dir_all(&dir)
    {
        tracing::warn!(dir = %dir.display(), %error, "run storage left behind");
    }
    let result = outcome?;
    teardown?;
    Ok(result)
}

async fn drive(
    cluster: &Arc<KubeCluster>,
    settings: &DemoSettings,
    kind: RunKind,
    reference_s: f64,
) -> Result<RunResult, RunError> {
    let name = kind.name();
    let nodes: Vec<String> = cluster.nodes().to_vec();
    // The program on every node (the image), the dataset on node-a; for a hard failure on
    // every node, since nothing can copy it from a node that is gone (see the report's notes).
    let provisioned: Vec<String> = match kind {
        RunKind::HardFailure { .. } => nodes.clone(),
        _ => vec![HOME_NODE.to_string()],
    };
    for node in &nodes {
        workload::install_program(&cluster.node_dir(node).join(APP_DIR))?;
    }
    for node in &provisioned {
        let dir = cluster
            .node_dir(node)
            .join(DATA_DIR)
            .join(&settings.dataset.name);
        workload::generate_dataset(&dir, &settings.dataset)?;
    }
    let policy = match kind {
        RunKind::Reference => None,
        RunKind::Mobility => Some(settings.mobility_policy.clone()),
        _ => Some(settings.failure_policy.clone()),
    };
    let mut annotations = settings.annotations(kind);
    let trace = mobility_trace(&nodes);
    if kind == RunKind::Mobility
        && let Some((_, rows)) = trace.first()
        && let Some(row) = rows.first()
    {
        annotations.insert(
            annotations::USER_LATENCY.to_string(),
            latency_annotation(&nodes, row),
        );
    }
    let namespace =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": POD_NAMESPACE}});
    cluster.apply(&namespace)?;

    // Every trainer container in the pods' namespace, the source and any replacement alike.
    let sampler = CopySampler::start(
        Arc::clone(cluster),
        format!("{POD_NAMESPACE}_"),
        CONTAINER_NAME.to_string(),
        SAMPLE_PERIOD,
    );
    let load_at_start = load_average();
    let deployed_at = unix_now();
    cluster.apply(&trainer_pod(
        &settings.trainer,
        &settings.dataset.name,
        &annotations,
    ))?;
    let started = Instant::now();
    let limit = run_limit(settings);
    let home_progress = progress_path(cluster, HOME_NODE);
    let epochs = settings.trainer.epochs;
    let mut action = Action::default();
    let mut checkpoints: BTreeMap<String, CheckpointSeen> = BTreeMap::new();
    let mut last_annotation = String::new();
    let mut flip = 0usize;
    let mut last_flip = Instant::now();
    let mut done_seen: Option<Instant> = None;
    loop {
        let pods = live_trainer_pods(cluster);
        for pod in &pods {
            if let Some(info) = latest_checkpoint(pod) {
                let node = pod["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                checkpoints.insert(
                    info.id.clone(),
                    CheckpointSeen {
                        id: info.id.clone(),
                        node,
                        taken_at: unix_of(info.taken_at),
                        bytes: info.size.0,
                        freeze_ms: info.freeze.map(|freeze| freeze.as_secs_f64() * 1e3),
                        held_on: info.held_on.clone(),
                    },
                );
            }
        }
        let home = workload::read_progress(&home_progress).unwrap_or_default();
        let home_epoch = home.last_epoch().map(|record| record.epoch);
        let first_epoch_at = home.epochs().next().map(|record| record.at);
        match kind {
            RunKind::Reference => {}
            RunKind::HardFailure { percent, recovery } if action.at.is_none() => {
                let reached =
                    home_epoch.is_some_and(|epoch| epoch >= epoch_at_percent(epochs, percent));
                // A checkpoint taken during training (after epoch 1) where the replacement can
                // get it: on a standby node (resume), or anywhere (restart: it keeps none).
                let ready = first_epoch_at.is_some_and(|after| {
                    checkpoints.values().any(|seen| {
                        seen.taken_at > after
                            && match recovery {
                                Recovery::Resume => {
                                    seen.held_on.iter().any(|node| node != HOME_NODE)
                                }
                                Recovery::FreshRestart => true,
                            }
                    })
                });
                if reached && ready && home.done().is_none() {
                    action = Action {
                        at: Some(unix_now()),
                        epoch: home_epoch,
                    };
                    cluster.power_off(HOME_NODE)?;
                    tracing::info!(epoch = ?home_epoch, "node-a powered off");
                }
            }
            RunKind::Degradation { percent }
                if action.at.is_none()
                    && home_epoch
                        .is_some_and(|epoch| epoch >= epoch_at_percent(epochs, percent)) =>
            {
                action = Action {
                    at: Some(unix_now()),
                    epoch: home_epoch,
                };
                cluster.set_node_condition(
                    HOME_NODE,
                    DEGRADATION_CONDITION,
                    "True",
                    "DemoKernelTaskHung",
                )?;
            }
            RunKind::Mobility => {
                let fraction = started.elapsed().as_secs_f64() / reference_s.max(1.0);
                if let Some((index, (_, rows))) = trace
                    .iter()
                    .enumerate()
                    .rev()
                    .find(|(_, (from, _))| fraction >= *from)
                {
                    if index == MOBILITY_DECISIVE_PHASE && action.at.is_none() {
                        action = Action {
                            at: Some(unix_now()),
                            epoch: home_epoch,
                        };
                    }
                    if last_flip.elapsed() >= Duration::from_millis(500) {
                        flip += 1;
                        last_flip = Instant::now();
                    }
                    let row = rows
                        .get(flip % rows.len().max(1))
                        .cloned()
                        .unwrap_or_default();
                    let value = latency_annotation(&nodes, &row);
                    if let Some(pod) = pods
                        .first()
                        .and_then(|pod| pod["metadata"]["name"].as_str())
                        && value != last_annotation
                    {
                        let assignment = format!("{}={value}", annotations::USER_LATENCY);
                        match cluster.kubectl(&[
                            "annotate",
                            "pod",
                            pod,
                            "-n",
                            POD_NAMESPACE,
                            "--overwrite",
                            &assignment,
                        ]) {
                            Ok(_) => last_annotation = value,
                            Err(error) => tracing::warn!(%error, "annotating the user latency"),
                        }
                    }
                }
            }
            _ => {}
        }
        let done = nodes.iter().any(|node| {
            workload::read_progress(&progress_path(cluster, node))
                .map(|progress| progress.done().is_some())
                .unwrap_or(false)
        });
        if done {
            // Let the Migrations reach their end (the controller verifies the replacement after
            // it ran), at most 30 s.
            let since = *done_seen.get_or_insert_with(Instant::now);
            let settled = read_migrations(cluster)
                .iter()
                .all(|migration| migration.phase.is_terminal());
            if settled || since.elapsed() > Duration::from_secs(30) {
                break;
            }
        }
        if started.elapsed() > limit {
            let _ = sampler.stop();
            return Err(RunError::TimedOut {
                run: name,
                limit,
                logs: cluster.logs_dir().display().to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let copies = sampler.stop();
    let migrations = read_migrations(cluster);
    let mut pods_by_node = BTreeMap::from([(HOME_NODE.to_string(), POD_NAME.to_string())]);
    for migration in &migrations {
        if let Some(pod) = &migration.replacement_pod {
            pods_by_node.insert(migration.to.clone(), pod.clone());
        }
    }
    let containers = progress_of_all(cluster, &pods_by_node);
    let verified: Vec<String> = nodes
        .iter()
        .filter(|node| {
            let dir = cluster
                .node_dir(node)
                .join(DATA_DIR)
                .join(&settings.dataset.name);
            workload::verify_dataset(&dir).is_ok()
        })
        .cloned()
        .collect();
    print_migrations(cluster);
    Ok(summarise(
        kind,
        policy,
        settings,
        deployed_at,
        containers,
        copies,
        migrations,
        checkpoints.into_values().collect(),
        action,
        verified,
        provisioned,
        load_at_start,
        cluster.root().to_path_buf(),
    ))
}

/// `kubectl get migrations -A` as a user would see it, into the demo's output.
fn print_migrations(cluster: &KubeCluster) {
    if let Ok(table) = cluster.kubectl(&["get", "migrations.automigrate.dev", "-A"]) {
        for line in table.lines() {
            println!("[demo]   {line}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    kind: RunKind,
    policy: Option<String>,
    settings: &DemoSettings,
    deployed_at: f64,
    containers: Vec<ContainerRun>,
    copies: CopyReport,
    migrations: Vec<MigrationSummary>,
    mut checkpoints_seen: Vec<CheckpointSeen>,
    action: Action,
    dataset_verified_on: Vec<String>,
    dataset_provisioned_on: Vec<String>,
    load_at_start: String,
    cluster_root: PathBuf,
) -> RunResult {
    checkpoints_seen.sort_by(|a, b| {
        a.taken_at
            .partial_cmp(&b.taken_at)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let finisher = containers.iter().find(|run| run.done);
    let last = finisher.and_then(|run| run.progress.last_epoch().cloned());
    let done_at = finisher.and_then(|run| run.progress.done().map(|(_, _, at)| at));
    // The Migration that answered the harness's action (the first one after it).
    let answer = migrations
        .iter()
        .find(|migration| action.at.is_none_or(|at| migration.decided_at >= at - 1.0));
    let replacement = answer.and_then(|migration| {
        containers
            .iter()
            .find(|run| run.node == migration.to && run.node != migration.from)
    });
    let original = containers.iter().find(|run| run.node == HOME_NODE);
    let resumed_at = answer.and_then(|migration| {
        migration
            .resumed_at
            .or_else(|| replacement.and_then(|run| run.first_at))
    });
    let downtime_s = answer.and_then(|migration| {
        let stopped = migration.freeze_started_at.or(action.at)?;
        Some(resumed_at? - stopped)
    });
    let detection_s = match (answer, action.at) {
        (Some(migration), Some(at)) => Some(migration.decided_at - at),
        _ => None,
    };
    let resumed_from_epoch = replacement
        .and_then(|run| run.first_epoch)
        .map(|epoch| epoch.saturating_sub(1));
    let source_last = answer.and_then(|migration| {
        containers
            .iter()
            .find(|run| run.node == migration.from)
            .and_then(|run| run.last_epoch)
    });
    let lost_epochs = match (source_last, resumed_from_epoch) {
        (Some(reported), Some(resumed)) => Some(reported.saturating_sub(resumed)),
        _ => None,
    };
    let epoch_at_final_dump = answer.and_then(|migration| {
        let dump = migration.freeze_started_at?;
        containers
            .iter()
            .find(|run| run.node == migration.from)?
            .progress
            .epochs()
            .filter(|record| record.at <= dump)
            .map(|record| record.epoch)
            .last()
    });
    let same_process = match (original, replacement) {
        (Some(original), Some(replacement)) => Some(
            !replacement.runs.is_empty()
                && replacement
                    .runs
                    .iter()
                    .all(|run| original.runs.contains(run)),
        ),
        _ => None,
    };
    // The epochs the source had reported while the restored checkpoint was being taken: from
    // the start of its freeze (minus half a second of clock and polling slack) to half a second
    // after it was recorded.
    let checkpoint_epochs = answer
        .and_then(|migration| migration.checkpoint.as_ref())
        .and_then(|id| checkpoints_seen.iter().find(|seen| &seen.id == id))
        .and_then(|seen| {
            let source = containers
                .iter()
                .find(|run| Some(run.node.as_str()) == answer.map(|m| m.from.as_str()))?;
            let freeze_s = seen.freeze_ms.unwrap_or(0.0) / 1e3;
            Some(epochs_around_checkpoint(
                source.progress.epochs(),
                seen.taken_at,
                freeze_s,
            ))
        });
    let freezes: Vec<f64> = checkpoints_seen
        .iter()
        .filter_map(|seen| seen.freeze_ms)
        .collect();
    let replication_bytes = checkpoints_seen
        .iter()
        .map(|seen| {
            let standbys = seen
                .held_on
                .iter()
                .filter(|node| **node != seen.node)
                .count();
            seen.bytes.saturating_mul(standbys as u64)
        })
        .sum();
    let mut path = Vec::new();
    if let Some(first) = original {
        path.push(first.node.clone());
    }
    for migration in &migrations {
        path.push(format!("{} ({})", migration.to, migration.trigger));
    }
    let unique: BTreeSet<&str> = checkpoints_seen
        .iter()
        .map(|seen| seen.id.as_str())
        .collect();
    RunResult {
        name: kind.name(),
        kind,
        policy,
        epochs: settings.trainer.epochs,
        deployed_at,
        done_at,
        training_s: done_at.map(|at| at - deployed_at),
        final_epoch: last.as_ref().map(|record| record.epoch),
        final_loss: last.as_ref().map(|record| record.loss),
        final_loss_hex: last.map(|record| record.loss_hex),
        event_at: action.at,
        epoch_at_event: action.epoch,
        recovery_bytes: migrations
            .iter()
            .map(|migration| migration.bytes_moved)
            .sum(),
        migrations,
        downtime_s,
        detection_s,
        resumed_from_epoch,
        checkpoint_epochs,
        lost_epochs,
        epoch_at_final_dump,
        same_process,
        checkpoints: unique.len(),
        mean_freeze_ms: (!freezes.is_empty())
            .then(|| freezes.iter().sum::<f64>() / freezes.len() as f64),
        replication_bytes,
        dataset_verified_on,
        dataset_provisioned_on,
        copies,
        progress_overlap: spans_overlap(&containers),
        containers,
        checkpoints_seen,
        path,
        load_average: (load_at_start, load_average()),
        cluster_root,
    }
}

/// Reads the YAML example of the trainer pod (for its test).
pub fn example_pod_path(repo: &Path) -> PathBuf {
    repo.join("examples/demo-trainer-pod.yaml")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn settings() -> DemoSettings {
        crate::demo::Plan::standard(
            PathBuf::from("/tmp/x"),
            PathBuf::from("/bin"),
            PathBuf::from("p.yaml"),
        )
        .settings
    }

    #[test]
    fn a_checkpoint_before_the_first_epoch_line_is_at_epoch_zero() {
        let record = |epoch: u32, at: f64| crate::workload::EpochRecord {
            epoch,
            loss: 0.0,
            loss_hex: String::new(),
            run: 1,
            at,
        };
        let epochs = [record(1, 10.0), record(2, 11.0), record(3, 12.0)];
        // Taken during the first epoch, its line half a second after.
        assert_eq!(
            epochs_around_checkpoint(epochs.iter(), 9.8, 0.2),
            (Some(0), Some(1))
        );
        assert_eq!(
            epochs_around_checkpoint(epochs.iter(), 11.9, 0.2),
            (Some(2), Some(3))
        );
    }

    #[test]
    fn failure_points_are_whole_epochs() {
        assert_eq!(epoch_at_percent(40, 25), 10);
        assert_eq!(epoch_at_percent(40, 50), 20);
        assert_eq!(epoch_at_percent(10, 75), 8);
        assert_eq!(epoch_at_percent(3, 1), 1);
        assert_eq!(epoch_at_percent(0, 50), 1);
    }

    #[test]
    fn run_names_and_prefixes_are_short_and_distinct() {
        let kinds = [
            RunKind::Reference,
            RunKind::HardFailure {
                percent: 25,
                recovery: Recovery::Resume,
            },
            RunKind::HardFailure {
                percent: 25,
                recovery: Recovery::FreshRestart,
            },
            RunKind::Degradation { percent: 50 },
            RunKind::Mobility,
        ];
        let names: Vec<String> = kinds.iter().map(RunKind::name).collect();
        let unique: BTreeSet<&String> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        for name in &names {
            let prefix = short_prefix(name);
            assert!((1..=10).contains(&prefix.len()), "{prefix}");
        }
    }

    #[test]
    fn the_pod_annotations_are_valid_and_say_what_each_run_needs() {
        let settings = settings();
        let parse = |kind: RunKind| {
            let map = settings.annotations(kind);
            let (parsed, errors) = annotations::parse(POD_NAMESPACE, POD_NAME, &map);
            assert!(errors.is_empty(), "{kind:?}: {errors:?}");
            parsed
        };
        assert!(!parse(RunKind::Reference).protect);
        let resume = parse(RunKind::HardFailure {
            percent: 50,
            recovery: Recovery::Resume,
        });
        assert!(resume.protect);
        assert_eq!(resume.replicate_to, None);
        let restart = parse(RunKind::HardFailure {
            percent: 50,
            recovery: Recovery::FreshRestart,
        });
        assert_eq!(restart.replicate_to, Some(0));
        let mobility = parse(RunKind::Mobility);
        assert_eq!(mobility.user.as_deref(), Some(MOBILITY_USER));
        assert_eq!(mobility.policy.as_deref(), Some("demo-mobility"));
        assert_eq!(
            mobility.dataset,
            Some(annotations::DatasetRef::Path(
                "/var/lib/automigrate/data/clusters".into()
            ))
        );
    }

    #[test]
    fn the_shipped_example_is_the_pod_the_demo_applies() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let text = std::fs::read_to_string(example_pod_path(&repo)).unwrap();
        let example: Value = serde_saphyr::from_str(&text).unwrap();
        let settings = settings();
        let applied = trainer_pod(
            &settings.trainer,
            &settings.dataset.name,
            &settings.annotations(RunKind::HardFailure {
                percent: 50,
                recovery: Recovery::Resume,
            }),
        );
        assert_eq!(example, applied);
    }

    #[test]
    fn the_demo_policies_are_valid_and_allow_the_pods_interval() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let text = std::fs::read_to_string(repo.join("examples/demo-policies.yaml")).unwrap();
        let mut set = automigrate_core::PolicySet::new();
        for document in automigrate_core::policy::configmaps_from_yaml(&text).unwrap() {
            let name = document.metadata.name.clone();
            document
                .policy_text()
                .and_then(|policy| set.apply(&name, policy))
                .unwrap();
        }
        let settings = settings();
        let interval = Duration::from_secs(5);
        assert_eq!(settings.checkpoint_interval, "5s");
        for name in [&settings.failure_policy, &settings.mobility_policy] {
            let policy = set.get(name).unwrap_or_else(|| panic!("no policy {name}"));
            assert!(policy.checkpoint.min_interval <= interval, "{name}");
        }
        let mobility = set.get(&settings.mobility_policy).unwrap();
        assert!(mobility.triggers.mobility.is_some());
    }

    #[test]
    fn overlapping_spans_are_found() {
        let run = |first: f64, last: f64| ContainerRun {
            node: "n".into(),
            pod: "p".into(),
            runs: vec![1],
            first_epoch: None,
            last_epoch: None,
            first_at: Some(first),
            last_at: Some(last),
            started_fresh: true,
            done: false,
            progress: Progress::default(),
        };
        assert!(!spans_overlap(&[run(0.0, 1.0), run(1.5, 3.0)]));
        assert!(spans_overlap(&[run(0.0, 2.0), run(1.5, 3.0)]));
    }

    #[test]
    fn the_mobility_trace_moves_once_and_jitters_without_a_close_alternative() {
        let nodes: Vec<String> = ["node-a", "node-b", "node-c", "node-d"]
            .iter()
            .map(ToString::to_string)
            .collect();
        let trace = mobility_trace(&nodes);
        // threshold 40 ms, hysteresis 15 ms: targets must be within 25 ms.
        let (_, before) = &trace[1];
        for row in before {
            assert!(row.iter().skip(1).all(|&latency| latency > 25), "{row:?}");
        }
        let (_, moved) = &trace[MOBILITY_DECISIVE_PHASE];
        assert!(moved[0][0] > 40 && moved[0][2] <= 25);
        let (_, after) = &trace[3];
        for row in after {
            let others_far = row
                .iter()
                .enumerate()
                .filter(|(index, _)| *index != 2)
                .all(|(_, &latency)| latency > 25);
            assert!(others_far, "{row:?}");
        }
        let text = latency_annotation(&nodes, &moved[0]);
        let parsed = annotations::parse_user_latency(&text).unwrap();
        assert_eq!(parsed.len(), 4, "{text}");
    }

    #[test]
    fn a_migration_object_is_read_with_its_phases() {
        let object = json!({
            "metadata": {"name": "trainer-x1", "namespace": "ml"},
            "spec": {"pod": "trainer", "trigger": "nodeFailed", "reason": "node-a failed"},
            "status": {
                "phase": "Succeeded", "source": "node-a", "target": "node-b",
                "sourceAlive": false, "sourceFenced": true, "targetStarted": true,
                "checkpointId": null, "startedAt": "2026-12-06T15:00:00Z",
                "phaseStartedAt": "2026-12-06T15:00:09Z", "attempts": 0,
                "downtimeStartedAt": null, "downtime": "8s", "rollback": null,
                "message": null, "replacementPod": "trainer-abc123", "bytesMoved": 1000,
                "storedCheckpoint": {"id": "ck-0", "from": "node-c"},
                "history": [
                    {"phase": "Transferring", "startedAt": "2026-12-06T15:00:00Z", "duration": "2s"},
                    {"phase": "Restoring", "startedAt": "2026-12-06T15:00:04Z", "duration": "3s"},
                ],
            },
        });
        let summary = summarise_migration(&object).unwrap();
        assert_eq!(summary.name, "trainer-x1");
        assert_eq!(summary.trigger, "NodeFailed");
        assert_eq!(
            (summary.from.as_str(), summary.to.as_str()),
            ("node-a", "node-b")
        );
        assert_eq!(summary.phase, Phase::Succeeded);
        assert_eq!(summary.history.len(), 2);
        let start = unix_of("2026-12-06T15:00:00Z".parse().unwrap());
        assert_eq!(summary.resumed_at, Some(start + 7.0));
        assert_eq!(summary.freeze_started_at, None);
        assert_eq!(summary.replacement_pod.as_deref(), Some("trainer-abc123"));
        // Restored from a stored checkpoint: the state machine has no checkpoint id of its own.
        assert_eq!(summary.checkpoint.as_deref(), Some("ck-0"));
    }
}
