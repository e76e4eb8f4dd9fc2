//! The demo's runs and what is measured in them.
//!
//! Every run builds its own [`LocalCluster`] (a fresh network, fresh storage), writes the
//! dataset to node A's storage, starts the training container on node A and lets the
//! [`LocalController`] run until training ends, while a scenario task acts on the world:
//!
//! - [`RunKind::Reference`]: the container alone, no controller (no checkpoint ever touches the
//!   process): the uninterrupted training time and the reference loss.
//! - [`RunKind::HardFailure`]: once node A has reported `percent` % of the epochs, node A fails
//!   (agent killed, workload SIGKILLed, links cut). With [`Recovery::Resume`] the replacement
//!   restores from the newest checkpoint (MTT, MDT); with [`Recovery::FreshRestart`] it starts
//!   from the beginning with everything else identical (NTT, NDT).
//! - [`RunKind::Degradation`]: at `percent` % node A reports `DiskPressure`; the engine moves
//!   the pod proactively with a fresh stop-and-dump checkpoint.
//! - [`RunKind::Mobility`]: a simulated user moves from near node A to near node C, with jitter
//!   around the policy's threshold before and after, so the pod must follow once and only once.
//!
//! A [`CopyMonitor`] watches every run. The measured [`RunResult`] keeps every figure the report
//! shows and the raw material (progress of every container, the controller's timeline).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_agent::api::PodKey;
use automigrate_core::PolicySet;
use automigrate_core::model::UserObservation;
use serde::{Deserialize, Serialize};

use crate::clock::{ClockError, PolicyClock};
use crate::cluster::{AgentMode, ClusterConfig, ClusterError, LocalCluster};
use crate::controller::{
    ControllerError, ControllerOptions, LocalController, MigrationSummary, PodConfig, Purpose,
    Recovery, TimelineEvent, unix_now,
};
use crate::monitor::{CopyMonitor, CopyReport};
use crate::node::{ContainerSpec, NodeError};
use crate::workload::{self, DatasetSpec, Progress, TrainerSpec, WorkloadError};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Controller(#[from] Box<ControllerError>),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Clock(#[from] ClockError),
    #[error("run {run}: training did not finish within {limit:?}")]
    TimedOut { run: String, limit: Duration },
    #[error("run {run}: {reason}")]
    Failed { run: String, reason: String },
}

impl From<ControllerError> for ScenarioError {
    fn from(error: ControllerError) -> Self {
        Self::Controller(Box::new(error))
    }
}

/// The namespace and name of the demo's pod.
pub const POD_NAMESPACE: &str = "ml";
pub const POD_NAME: &str = "trainer";
/// The container's name in the pod.
pub const CONTAINER_NAME: &str = "trainer";
/// The node the pod starts on and its dataset lives on.
pub const HOME_NODE: &str = "node-a";
/// The label `policies/edge-mobility.yaml` requires of its targets.
pub const EDGE_LABEL: &str = "node-role.kubernetes.io/edge";
/// The condition the degradation scenario injects (one of the default policy's conditions).
pub const DEGRADATION_CONDITION: &str = "DiskPressure";

/// What the demo runs on; shared by every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DemoSettings {
    /// Storage of every run: `<root>/<run>/<node>/`.
    pub root: PathBuf,
    pub policies_dir: PathBuf,
    /// Policy time runs this many times faster than real time.
    pub time_scale: u32,
    pub nodes: usize,
    /// RTT between neighbouring nodes on the line (node-a to b, c, d: 1, 2, 3 steps).
    pub rtt_step_ms: u64,
    pub dataset: DatasetSpec,
    pub trainer: TrainerSpec,
    /// `automigrate.dev/checkpoint-interval`, in policy time.
    pub checkpoint_interval: String,
    /// Policy for the failure and degradation runs, and for the mobility run.
    pub failure_policy: String,
    pub mobility_policy: String,
    /// Pause between controller passes.
    pub tick_ms: u64,
    /// Keep every run's storage (otherwise removed after the run).
    pub keep: bool,
    /// Which agent every node runs.
    pub agent: AgentMode,
    /// A hard failure waits, past its point, until a checkpoint taken after epoch 1 has a
    /// standby copy: then the run measures resuming, not whether the first periodic copy
    /// happened to finish in time on a busy machine. The epoch it struck at is reported.
    pub failure_after_standby_copy: bool,
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

/// One container's progress, as its `progress.log` tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRun {
    pub node: String,
    pub container: String,
    pub runs: Vec<u64>,
    pub first_epoch: Option<u32>,
    pub last_epoch: Option<u32>,
    pub first_at: Option<f64>,
    pub last_at: Option<f64>,
    pub started_fresh: bool,
    pub done: bool,
    pub progress: Progress,
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
    /// Deployment to the last epoch's line: the training time of this run.
    pub training_s: Option<f64>,
    pub final_epoch: Option<u32>,
    pub final_loss: Option<f64>,
    pub final_loss_hex: Option<String>,
    /// When the scenario acted (failure, condition, the user's decisive move).
    pub event_at: Option<f64>,
    /// The last epoch the source had reported when the scenario acted.
    pub epoch_at_event: Option<u32>,
    pub migrations: Vec<MigrationSummary>,
    /// From the event (or the final dump's start, for a live source) until training ran again.
    pub downtime_s: Option<f64>,
    /// From the event until the engine decided.
    pub detection_s: Option<f64>,
    /// First epoch the replacement reported, minus one: where it resumed.
    pub resumed_from_epoch: Option<u32>,
    /// The epochs the workload had reported around the checkpoint that was restored.
    pub checkpoint_epochs: Option<(Option<u32>, Option<u32>)>,
    /// Epochs computed twice: reported before the event, and again by the replacement.
    pub lost_epochs: Option<u32>,
    /// The replacement is the same process (run tag kept), i.e. resumed, not restarted.
    pub same_process: Option<bool>,
    pub checkpoints: usize,
    pub mean_freeze_ms: Option<f64>,
    pub replication_bytes: u64,
    pub recovery_bytes: u64,
    pub dataset_verified_on: Vec<String>,
    pub copies: CopyReport,
    /// Two containers reported progress in overlapping time spans.
    pub progress_overlap: bool,
    pub containers: Vec<ContainerRun>,
    pub timeline: Vec<TimelineEvent>,
    /// Mobility runs: migrations by trigger, and how the pod moved.
    pub path: Vec<String>,
    /// `/proc/loadavg` when the run started and when it ended: how busy the machine was.
    pub load_average: (String, String),
}

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl DemoSettings {
    pub(crate) fn cluster_config(&self, run: &str) -> ClusterConfig {
        let mut config = ClusterConfig::line(
            self.nodes,
            Duration::from_millis(self.rtt_step_ms),
            self.root.join(run),
        );
        config.name_prefix = short_prefix(run);
        config.agent = self.agent.clone();
        config.labels.insert(EDGE_LABEL.into(), String::new());
        config
    }

    pub(crate) fn pod(&self, policy: &str, extra: &[(&str, &str)]) -> PodConfig {
        let interval = self.checkpoint_interval.clone();
        let mut annotations: Vec<(&str, &str)> = vec![(
            automigrate_core::annotations::CHECKPOINT_INTERVAL,
            interval.as_str(),
        )];
        annotations.extend_from_slice(extra);
        let mut config = PodConfig::new(
            PodKey::new(POD_NAMESPACE, POD_NAME),
            policy,
            &self.dataset.name,
            self.trainer.clone(),
            &annotations,
        );
        config
            .labels
            .insert("automigrate.dev/tier".into(), "edge".into());
        config
    }
}

/// Clears what an earlier run of the same name left (a `--keep` run, or one that crashed):
/// its containers first, then its storage, so every run starts from nothing.
pub(crate) fn prepare_run_dir(settings: &DemoSettings, run: &str) -> Result<(), ScenarioError> {
    let dir = settings.root.join(run);
    if !dir.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(&dir).map_err(|source| WorkloadError::Io {
        path: dir.clone(),
        source,
    })?;
    for node in entries.filter_map(Result::ok) {
        let runc_root = node.path().join("runc");
        let Ok(containers) = std::fs::read_dir(&runc_root) else {
            continue;
        };
        for container in containers.filter_map(Result::ok) {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force"])
                .arg(container.file_name())
                .output();
        }
    }
    std::fs::remove_dir_all(&dir).map_err(|source| WorkloadError::Io { path: dir, source })?;
    Ok(())
}

/// Namespace names are `amnet<ID>-<prefix>-<i>`: keep the prefix short and valid.
fn short_prefix(run: &str) -> String {
    let mut prefix: String = run
        .split('-')
        .filter_map(|part| part.chars().next())
        .collect();
    prefix.truncate(10);
    if prefix.is_empty() {
        "run".into()
    } else {
        prefix
    }
}

pub(crate) fn progress_of_all(cluster: &LocalCluster) -> Vec<ContainerRun> {
    let mut runs = Vec::new();
    for node in cluster.nodes() {
        let work = node.layout().root().join("work");
        let Ok(entries) = std::fs::read_dir(&work) else {
            continue;
        };
        let mut containers: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        containers.sort();
        for container in containers {
            let progress =
                workload::read_progress(&node.layout().progress(&container)).unwrap_or_default();
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
                node: node.name().to_string(),
                container: container.clone(),
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
    }
    runs.sort_by(|a, b| {
        a.first_at
            .partial_cmp(&b.first_at)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    runs
}

/// Whether two containers' reported spans overlap in time.
pub(crate) fn spans_overlap(containers: &[ContainerRun]) -> bool {
    let spans: Vec<(f64, f64)> = containers
        .iter()
        .filter_map(|run| Some((run.first_at?, run.last_at?)))
        .collect();
    spans
        .iter()
        .enumerate()
        .any(|(i, a)| spans.iter().skip(i + 1).any(|b| a.0 < b.1 && b.0 < a.1))
}

/// Runs the training container alone to the end: the reference.
#[tracing::instrument(name = "reference_run", skip(settings))]
pub async fn reference_run(settings: &DemoSettings) -> Result<RunResult, ScenarioError> {
    let name = RunKind::Reference.name();
    prepare_run_dir(settings, &name)?;
    let cluster = LocalCluster::create(settings.cluster_config(&name)).await?;
    let node = Arc::clone(cluster.node(HOME_NODE)?);
    workload::generate_dataset(
        &node.layout().dataset(&settings.dataset.name),
        &settings.dataset,
    )?;
    let container = format!("{POD_NAME}-{HOME_NODE}-1");
    let spec = ContainerSpec {
        pod: PodKey::new(POD_NAMESPACE, POD_NAME),
        container: CONTAINER_NAME.into(),
        instance: container.clone(),
        dataset: settings.dataset.name.clone(),
        trainer: settings.trainer.clone(),
    };
    let monitor = CopyMonitor::start(cluster.nodes().to_vec(), Duration::from_millis(20));
    let load_at_start = load_average();
    let deployed_at = unix_now();
    node.run_fresh(&spec).await?;
    let limit = run_limit(settings);
    let started = Instant::now();
    let progress_path = node.layout().progress(&container);
    loop {
        let progress = workload::read_progress(&progress_path)?;
        if progress.done().is_some() {
            break;
        }
        if started.elapsed() > limit {
            return Err(ScenarioError::TimedOut { run: name, limit });
        }
        if !node.container_running(&spec.runtime_id()) {
            return Err(ScenarioError::Failed {
                run: name,
                reason: format!(
                    "the trainer stopped without finishing; see {}",
                    node.layout().logs().display()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let copies = monitor.stop();
    let containers = progress_of_all(&cluster);
    let result = summarise(
        RunKind::Reference,
        None,
        settings,
        deployed_at,
        containers,
        copies,
        &[],
        &[],
        None,
        None,
        Vec::new(),
        load_at_start,
    );
    finish_cluster(cluster, settings, &name).await?;
    Ok(result)
}

fn run_limit(settings: &DemoSettings) -> Duration {
    // Generous: a 2-core machine shared with builds runs the trainer far slower than idle.
    Duration::from_secs(120 + u64::from(settings.trainer.epochs) * 6)
}

async fn finish_cluster(
    cluster: LocalCluster,
    settings: &DemoSettings,
    run: &str,
) -> Result<(), ScenarioError> {
    cluster.teardown().await?;
    if !settings.keep {
        let dir = settings.root.join(run);
        if let Err(error) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), %error, "run storage left behind");
        }
    }
    Ok(())
}

/// What the scenario task did, for the result.
#[derive(Debug, Clone, Copy, Default)]
struct ScenarioAction {
    at: Option<f64>,
    epoch: Option<u32>,
}

/// Waits until the container on `node` has reported at least `epoch` epochs.
pub(crate) async fn wait_for_epoch(path: &Path, epoch: u32) -> Option<u32> {
    loop {
        match workload::read_progress(path) {
            Ok(progress) => {
                if progress.done().is_some() {
                    return None;
                }
                if let Some(last) = progress.last_epoch()
                    && last.epoch >= epoch
                {
                    return Some(last.epoch);
                }
            }
            Err(error) => tracing::debug!(%error, "progress not readable yet"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The epoch at which `percent` % of the training is done (at least 1).
pub fn epoch_at_percent(epochs: u32, percent: u32) -> u32 {
    (u64::from(epochs) * u64::from(percent))
        .div_ceil(100)
        .clamp(1, u64::from(epochs.max(1))) as u32
}

/// The phase of [`mobility_trace`] in which the user has moved and the pod should follow.
pub const MOBILITY_DECISIVE_PHASE: usize = 2;

/// A simulated user's latency to each node, per phase of the mobility run.
pub fn mobility_trace(nodes: &[String]) -> Vec<(f64, Vec<Vec<u64>>)> {
    // Rows are alternatives cycled every pass-ish (jitter); columns follow `nodes` (a, b, c, d).
    // Phase boundaries are fractions of the reference training time.
    let pad = |values: &[u64]| -> Vec<u64> {
        (0..nodes.len())
            .map(|index| values.get(index).copied().unwrap_or(60))
            .collect()
    };
    vec![
        // Near node-a.
        (0.0, vec![pad(&[8, 18, 28, 38])]),
        // Drifting: node-a flickers around the 40 ms threshold, but no node is within 25 ms.
        (0.2, vec![pad(&[38, 27, 33, 43]), pad(&[44, 28, 32, 42])]),
        // Moved next to node-c: node-a far, node-c within 25 ms.
        (0.4, vec![pad(&[55, 40, 12, 22])]),
        // Jitter around node-c's threshold; no other node within 25 ms: it must stay.
        (0.65, vec![pad(&[60, 27, 38, 27]), pad(&[62, 29, 44, 28])]),
    ]
}

/// One controller-driven run.
#[tracing::instrument(name = "scenario_run", skip(settings, policies))]
pub async fn controlled_run(
    settings: &DemoSettings,
    policies: &PolicySet,
    kind: RunKind,
    reference_training_s: f64,
) -> Result<RunResult, ScenarioError> {
    let name = kind.name();
    let policy = match kind {
        RunKind::Mobility => settings.mobility_policy.clone(),
        _ => settings.failure_policy.clone(),
    };
    prepare_run_dir(settings, &name)?;
    let cluster = Arc::new(LocalCluster::create(settings.cluster_config(&name)).await?);
    let home = Arc::clone(cluster.node(HOME_NODE)?);
    let meta = workload::generate_dataset(
        &home.layout().dataset(&settings.dataset.name),
        &settings.dataset,
    )?;
    let extra: Vec<(&str, &str)> = match kind {
        RunKind::Mobility => vec![(automigrate_core::annotations::USER, "alice")],
        _ => Vec::new(),
    };
    let clock = PolicyClock::start(settings.time_scale)?;
    let state_dir = settings.root.join(&name).join("controller");
    let mut controller = LocalController::new(
        Arc::clone(&cluster),
        policies.clone(),
        clock,
        settings.pod(&policy, &extra),
        meta,
        HOME_NODE,
        ControllerOptions {
            tick: Duration::from_millis(settings.tick_ms),
            recovery: match kind {
                RunKind::HardFailure { recovery, .. } => recovery,
                _ => Recovery::Resume,
            },
            state_dir,
        },
    )
    .with_dataset_origin(settings.dataset.clone());
    let monitor = CopyMonitor::start(cluster.nodes().to_vec(), Duration::from_millis(20));
    let load_at_start = load_average();
    let deployed_at = unix_now();
    controller.deploy().await?;
    let home_progress = home.layout().progress(&format!("{POD_NAME}-{HOME_NODE}-1"));
    let epochs = settings.trainer.epochs;
    // The scenario task records what it did here: it may still be running (the mobility
    // trace) when training ends and is then stopped.
    let acted: Arc<std::sync::Mutex<ScenarioAction>> = Arc::default();
    let record = {
        let acted = Arc::clone(&acted);
        move |epoch: Option<u32>| {
            if let Ok(mut acted) = acted.lock()
                && acted.at.is_none()
            {
                *acted = ScenarioAction {
                    at: Some(unix_now()),
                    epoch,
                };
            }
        }
    };
    let action: tokio::task::JoinHandle<()> = match kind {
        RunKind::Reference => tokio::spawn(async {}),
        RunKind::HardFailure { percent, .. } => {
            let cluster = Arc::clone(&cluster);
            let shared = controller.shared();
            let wait_for_copy = settings.failure_after_standby_copy;
            tokio::spawn(async move {
                let Some(mut epoch) =
                    wait_for_epoch(&home_progress, epoch_at_percent(epochs, percent)).await
                else {
                    return;
                };
                if wait_for_copy {
                    while !shared.standby_holds_epoch(1) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    epoch = workload::read_progress(&home_progress)
                        .ok()
                        .and_then(|progress| progress.last_epoch().map(|record| record.epoch))
                        .unwrap_or(epoch);
                }
                record(Some(epoch));
                if let Err(error) = cluster.fail_node(HOME_NODE).await {
                    tracing::error!(%error, "failure injection");
                }
                tracing::info!(epoch, "node-a failed");
            })
        }
        RunKind::Degradation { percent } => {
            let home = Arc::clone(&home);
            tokio::spawn(async move {
                let Some(epoch) =
                    wait_for_epoch(&home_progress, epoch_at_percent(epochs, percent)).await
                else {
                    return;
                };
                record(Some(epoch));
                home.inject_condition(DEGRADATION_CONDITION);
            })
        }
        RunKind::Mobility => {
            let users = controller.users_handle();
            let nodes: Vec<String> = cluster
                .nodes()
                .iter()
                .map(|node| node.name().to_string())
                .collect();
            let phases = mobility_trace(&nodes);
            let period = reference_training_s.max(1.0);
            tokio::spawn(async move {
                let started = Instant::now();
                let mut flip = 0usize;
                loop {
                    let fraction = started.elapsed().as_secs_f64() / period;
                    let Some((index, (_, rows))) = phases
                        .iter()
                        .enumerate()
                        .rev()
                        .find(|(_, (from, _))| fraction >= *from)
                    else {
                        break;
                    };
                    if index == MOBILITY_DECISIVE_PHASE {
                        let epoch = workload::read_progress(&home_progress)
                            .ok()
                            .and_then(|progress| progress.last_epoch().map(|r| r.epoch));
                        record(epoch);
                    }
                    flip += 1;
                    let row = rows
                        .get(flip % rows.len().max(1))
                        .cloned()
                        .unwrap_or_default();
                    let observations = nodes
                        .iter()
                        .zip(row)
                        .map(|(node, latency)| UserObservation {
                            user: "alice".into(),
                            node: node.clone(),
                            latency: Duration::from_millis(latency),
                        })
                        .collect();
                    if let Ok(mut users) = users.lock() {
                        *users = observations;
                    }
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            })
        }
    };
    let limit = run_limit(settings);
    let ran = tokio::time::timeout(limit, controller.run_until(|_| false)).await;
    action.abort();
    let action = acted.lock().map(|acted| *acted).unwrap_or_default();
    let copies = monitor.stop();
    let outcome = match ran {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(ScenarioError::from(error)),
        Err(_) => Err(ScenarioError::TimedOut {
            run: name.clone(),
            limit,
        }),
    };
    let containers = progress_of_all(&cluster);
    let verified: Vec<String> = controller.dataset_holders().iter().cloned().collect();
    let result = summarise(
        kind,
        Some(policy),
        settings,
        deployed_at,
        containers,
        copies,
        &controller.timeline(),
        controller.migrations(),
        action.at,
        action.epoch,
        verified,
        load_at_start,
    );
    let checkpoint_epochs = controller.checkpoint_epochs().clone();
    drop(controller);
    let cluster = Arc::try_unwrap(cluster).map_err(|_| ScenarioError::Failed {
        run: name.clone(),
        reason: "the cluster is still shared at the end of the run".into(),
    })?;
    finish_cluster(cluster, settings, &name).await?;
    outcome?;
    Ok(with_checkpoint_epochs(result, &checkpoint_epochs))
}

fn with_checkpoint_epochs(
    mut result: RunResult,
    epochs: &BTreeMap<String, (Option<u32>, Option<u32>)>,
) -> RunResult {
    result.checkpoint_epochs = result
        .migrations
        .last()
        .and_then(|migration| migration.checkpoint.as_ref())
        .and_then(|id| epochs.get(id).copied());
    result
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    kind: RunKind,
    policy: Option<String>,
    settings: &DemoSettings,
    deployed_at: f64,
    containers: Vec<ContainerRun>,
    copies: CopyReport,
    timeline: &[TimelineEvent],
    migrations: &[MigrationSummary],
    event_at: Option<f64>,
    epoch_at_event: Option<u32>,
    dataset_verified_on: Vec<String>,
    load_at_start: String,
) -> RunResult {
    let finisher = containers.iter().find(|run| run.done);
    let last = finisher.and_then(|run| run.progress.last_epoch().cloned());
    let done_at = finisher.and_then(|run| run.progress.done().map(|(_, _, at)| at));
    // The migration that answered the scenario's event (the first one after it).
    let answer = migrations
        .iter()
        .find(|migration| event_at.is_none_or(|at| migration.decided_at >= at));
    let replacement = answer.and_then(|migration| {
        containers
            .iter()
            .find(|run| run.container == migration.new_container)
    });
    let original = containers.first();
    let downtime_s = answer.and_then(|migration| {
        let stopped = migration.freeze_started_at.or(event_at)?;
        Some(migration.resumed_at? - stopped)
    });
    let detection_s = match (answer, event_at) {
        (Some(migration), Some(at)) if migration.freeze_started_at.is_none() => {
            Some(migration.decided_at - at)
        }
        (Some(migration), Some(at)) => Some(migration.decided_at - at),
        _ => None,
    };
    let resumed_from_epoch = replacement
        .and_then(|run| run.first_epoch)
        .map(|epoch| epoch.saturating_sub(1));
    let source_last = answer.and_then(|migration| {
        containers
            .iter()
            .find(|run| run.container == migration.old_container)
            .and_then(|run| run.last_epoch)
    });
    let lost_epochs = match (source_last, resumed_from_epoch) {
        (Some(reported), Some(resumed)) => Some(reported.saturating_sub(resumed)),
        _ => None,
    };
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
    let mut freezes = Vec::new();
    let mut checkpoints = 0;
    let (mut replication_bytes, mut recovery_bytes) = (0u64, 0u64);
    for event in timeline {
        match event {
            TimelineEvent::Checkpoint { freeze_ms, .. } => {
                checkpoints += 1;
                freezes.push(*freeze_ms);
            }
            TimelineEvent::Transfer {
                purpose,
                bytes_sent,
                error: None,
                ..
            } => match purpose {
                Purpose::Replication => replication_bytes += bytes_sent,
                Purpose::Recovery => recovery_bytes += bytes_sent,
            },
            _ => {}
        }
    }
    let mut path = Vec::new();
    if let Some(first) = original {
        path.push(first.node.clone());
    }
    for migration in migrations {
        path.push(format!("{} ({})", migration.to, migration.trigger));
    }
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
        event_at,
        epoch_at_event,
        migrations: migrations.to_vec(),
        downtime_s,
        detection_s,
        resumed_from_epoch,
        checkpoint_epochs: None,
        lost_epochs,
        same_process,
        checkpoints,
        mean_freeze_ms: (!freezes.is_empty())
            .then(|| freezes.iter().sum::<f64>() / freezes.len() as f64),
        replication_bytes,
        recovery_bytes,
        dataset_verified_on,
        copies,
        progress_overlap: spans_overlap(&containers),
        containers,
        timeline: timeline.to_vec(),
        path,
        load_average: (load_at_start, load_average()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        for name in &names {
            let prefix = short_prefix(name);
            assert!((1..=10).contains(&prefix.len()), "{prefix}");
        }
    }

    #[test]
    fn overlapping_spans_are_found() {
        let run = |first: f64, last: f64| ContainerRun {
            node: "n".into(),
            container: "c".into(),
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
        // edge-mobility: threshold 40 ms, hysteresis 15 ms: targets must be within 25 ms.
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
    }
}
