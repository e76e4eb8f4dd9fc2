//! The local-mode controller: the second driver of the shared engine, next to the Kubernetes
//! controller.
//!
//! Each pass ([`LocalController::tick`]) it builds an `automigrate_core::ClusterSnapshot` from
//! the local nodes (their kubelet status, their agents' peer probes and checkpoint lists, the
//! dataset copies it knows of, the simulated users), calls `automigrate_core::decide` with the
//! policies loaded from `policies/` and the policy clock's `now`, and carries out the result:
//!
//! - a checkpoint decision: a background job ([`crate::worker::CheckpointJob`]) has the node's
//!   agent take a periodic dump (the container keeps running), sends the checkpoint, and the
//!   dataset where missing, to each standby the engine named, and applies retention; the passes
//!   go on meanwhile (the snapshot says a checkpoint is in progress), so a failure is detected
//!   while bytes move;
//! - a migration decision: a [`MigrationState`] is created and driven through
//!   `automigrate_core::migration` (`observe` what is true, `timeout`, `step`, `apply`) until it
//!   ends, each step carried out against the agents and the node runtimes. The state is written
//!   to `<state dir>/migrations/<pod>-<n>.json` after every transition, the engine memory to
//!   `<state dir>/engine-memory.json` after every pass.
//!
//! The fence for a dead node is out of band, as a power controller would do it: the demo reads
//! the node's runc state and `/proc` directly, and SIGKILLs a container that still runs before
//! anything is started elsewhere.
//!
//! Restarts. [`LocalController::open`] starts a controller on a state directory that may hold
//! an earlier controller's work (one that was killed): it reads the engine memory, the journaled
//! timeline, epochs and dataset holders ([`crate::worker::Shared::journaled`]), and every
//! persisted migration ([`PersistedMigration`]). Finished ones give the pod's placement (the
//! outcomes replayed in order) and the engine's migration history; one still in progress is
//! driven to its end by the first pass, through the same loop as a new one: it first waits for
//! runtime operations the dead controller left going on the nodes involved (a `runc restore` it
//! started outlives it), then observes what is true and only then steps. Each step is
//! idempotent or recognises its own finished work: before a final dump the controller persists
//! that it asked for one (`dumpRequestedAt`), so a restarted one finds the dump the agent took
//! meanwhile, waits while the agent is still taking it (`conflict`), and, when the source's
//! workload is gone without a dump, goes on as for a lost source from the newest stored
//! checkpoint; a restore first removes a half-made container; a rollback that finds the
//! workload already restored on the source keeps it. Never two copies holds as in the engine:
//! nothing starts before the source is fenced, which a resumed run re-establishes. For tests,
//! [`LocalController::with_halt`] stops a controller as if killed at a given point, and
//! [`LocalController::with_step_delay`] holds a phase's step back so a kill can be aimed at it;
//! [`crate::process`] runs the controller as a process that is killed for real.
//!
//! Everything the controller does lands in a [`TimelineEvent`] list with wall-clock times (Unix
//! seconds, the same clock the workload's progress lines use), from which the scenarios compute
//! their figures. [`Recovery::FreshRestart`] makes the restore step start the workload from its
//! beginning instead of from the checkpoint: the counterfactual "no migration" run that the
//! seed paper's NTT measures, with everything else (detection, target, data) the same.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use automigrate_agent::api::{
    CheckpointKind, CheckpointRequest, CheckpointSummary, PodKey, error_kind,
};
use automigrate_core::decide::{CheckpointDecision, CheckpointSource, MigrationDecision, Payload};
use automigrate_core::migration::{self, Event, Facts, Limits, MigrationState, Phase, Step};
use automigrate_core::model::{
    CheckpointInfo, ClusterSnapshot, ConditionStatus, Dataset, LinkObservation, MigrationRecord,
    Node, NodeCondition, ProtectedPod, Resources, UserObservation,
};
use automigrate_core::transfer::FileSpec;
use automigrate_core::units::Bytes;
use automigrate_core::{EngineMemory, Policy, PolicySet, decide};
use serde::{Deserialize, Serialize};

use crate::agent::{AgentError, AgentHandle, NodeAgent};
use crate::clock::PolicyClock;
use crate::cluster::{ClusterError, LocalCluster};
use crate::node::{ContainerSpec, LocalNode, NodeError};
use crate::worker::{CheckpointJob, EpochRange, Shared, Worker};
use crate::workload::{self, DatasetMeta, DatasetSpec, TrainerSpec, WorkloadError};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("writing controller state {path}: {reason}")]
    Persist { path: PathBuf, reason: String },
    #[error("the migration state machine refused an event: {0}")]
    Transition(#[from] migration::TransitionError),
    #[error(
        "no node holds the dataset any more and it has no origin to fetch it from again ({node} needs it)"
    )]
    NoDatasetCopy { node: String },
    #[error("checkpoint {id} was sent to {node}, but its agent did not store it")]
    NotStored { node: String, id: String },
    #[error(
        "the workload's container {container} on {node} stopped without finishing its training"
    )]
    WorkloadLost { node: String, container: String },
    #[error("reading controller state {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    /// The halt point set with [`LocalController::with_halt`] was reached: the controller stops
    /// as if killed there (tests of restarts).
    #[error("halted in phase {phase} as asked")]
    Halted { phase: Phase },
}

/// Unix time in seconds, the clock of the workload's progress lines.
pub fn unix_now() -> f64 {
    unix_seconds(SystemTime::now())
}

pub fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

/// The protected training pod the demo runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodConfig {
    pub pod: PodKey,
    /// The container's name inside the pod (what the agent's checkpoint request names).
    pub container: String,
    pub labels: BTreeMap<String, String>,
    /// Every `automigrate.dev/*` annotation, as a user would write them.
    pub annotations: BTreeMap<String, String>,
    pub requests: Resources,
    /// The dataset's directory under every node's data root; the pod's dataset annotation is
    /// `pvc:<dataset>`.
    pub dataset: String,
    pub trainer: TrainerSpec,
}

impl PodConfig {
    /// The pod protected by `policy`, reading `dataset`, with further annotations.
    pub fn new(
        pod: PodKey,
        policy: &str,
        dataset: &str,
        trainer: TrainerSpec,
        extra: &[(&str, &str)],
    ) -> Self {
        use automigrate_core::annotations::{DATASET, POLICY, PROTECT};
        let mut annotations: BTreeMap<String, String> = [
            (PROTECT, "true".to_string()),
            (POLICY, policy.to_string()),
            (DATASET, format!("pvc:{dataset}")),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect();
        for (key, value) in extra {
            annotations.insert((*key).to_string(), (*value).to_string());
        }
        Self {
            pod,
            container: "trainer".into(),
            labels: BTreeMap::new(),
            annotations,
            requests: Resources::new(1000, 512 << 20, 0),
            dataset: dataset.to_string(),
            trainer,
        }
    }

    pub fn dataset_id(&self) -> String {
        format!("pvc:{}", self.dataset)
    }
}

/// How a replacement starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Recovery {
    /// From the checkpoint (what automigrate does).
    Resume,
    /// From the beginning, everything else unchanged (the seed paper's "new container").
    FreshRestart,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControllerOptions {
    /// Pause between passes.
    pub tick: Duration,
    pub recovery: Recovery,
    /// Where migration states and the engine memory are written.
    pub state_dir: PathBuf,
}

/// Why bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Purpose {
    /// Standby copies made while training runs.
    Replication,
    /// Moves a migration needed.
    Recovery,
}

/// One thing the controller did or saw, with its wall-clock time (`at`, Unix seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "event")]
pub enum TimelineEvent {
    #[serde(rename_all = "camelCase")]
    Deployed {
        at: f64,
        node: String,
        container: String,
    },
    #[serde(rename_all = "camelCase")]
    Checkpoint {
        at: f64,
        node: String,
        id: String,
        kind: String,
        bytes: u64,
        freeze_ms: f64,
        took_ms: f64,
        /// Last epoch the workload had reported before and after the dump: the checkpoint holds
        /// the state after an epoch in this range.
        epoch_before: Option<u32>,
        epoch_after: Option<u32>,
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    CheckpointFailed {
        at: f64,
        node: String,
        error: String,
    },
    #[serde(rename_all = "camelCase")]
    Transfer {
        at: f64,
        from: String,
        to: String,
        what: String,
        purpose: Purpose,
        bytes: u64,
        bytes_sent: u64,
        took_ms: f64,
        error: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    DatasetVerified {
        at: f64,
        node: String,
        bytes: u64,
        files: usize,
    },
    /// No node held the dataset any more: it was fetched again from its origin.
    #[serde(rename_all = "camelCase")]
    DatasetFetched {
        at: f64,
        node: String,
        bytes: u64,
        took_ms: f64,
    },
    #[serde(rename_all = "camelCase")]
    Deferred {
        at: f64,
        trigger: String,
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    Problem { at: f64, message: String },
    #[serde(rename_all = "camelCase")]
    MigrationDecided {
        at: f64,
        trigger: String,
        from: String,
        to: String,
        reason: String,
        checkpoint: String,
        candidates: Vec<String>,
    },
    #[serde(rename_all = "camelCase")]
    Phase {
        at: f64,
        phase: Phase,
        message: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Resumed {
        at: f64,
        node: String,
        container: String,
        checkpoint: Option<String>,
        fresh: bool,
    },
    /// A policy ConfigMap edit arrived: applied, or refused with the last valid version kept.
    #[serde(rename_all = "camelCase")]
    PolicyEdited {
        at: f64,
        name: String,
        accepted: bool,
        message: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    MigrationEnded {
        at: f64,
        phase: Phase,
        message: Option<String>,
    },
    /// A controller started on a state directory with work in it (an earlier one died).
    #[serde(rename_all = "camelCase")]
    ControllerStarted {
        at: f64,
        /// The phase of the migration it found in progress, and the step that was in flight.
        migration_phase: Option<Phase>,
        step_in_flight: Option<String>,
        /// Runtime operations of the dead controller it waited for before observing.
        waited_for_runtime_ms: f64,
    },
}

/// What one migration did, for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSummary {
    pub trigger: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub phase: Phase,
    pub decided_at: f64,
    /// The final stop-and-dump began (live sources): the workload stopped here.
    pub freeze_started_at: Option<f64>,
    /// The replacement was running again (restore returned, or a fresh start's first line).
    pub resumed_at: Option<f64>,
    pub ended_at: f64,
    pub old_container: String,
    pub new_container: String,
    pub checkpoint: Option<String>,
    pub fresh_start: bool,
    pub recovery_bytes: u64,
    /// The state machine's own downtime, converted back to real time.
    pub state_machine_downtime_s: Option<f64>,
    pub phases: Vec<(Phase, f64)>,
    pub state_file: PathBuf,
}

#[derive(Debug, Clone)]
struct PodState {
    config: PodConfig,
    node: String,
    container: String,
    generation: u32,
}

/// A stored checkpoint a migration restores from when its own source cannot give one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredChoice {
    pub id: String,
    /// A node whose agent holds it.
    pub from: String,
}

/// The step a controller was carrying out when it wrote the migration's file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InFlight {
    pub step: Step,
    /// Unix seconds.
    pub since: f64,
}

/// What the driver records about a migration besides the state machine's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DriverRecord {
    pub decided_at: f64,
    pub freeze_started_at: Option<f64>,
    pub resumed_at: Option<f64>,
    pub checkpoint_used: Option<String>,
    pub fresh_start: bool,
    pub recovery_bytes: u64,
    pub phases: Vec<(Phase, f64)>,
    /// When this migration asked the source's agent for its final dump (Unix seconds): a dump
    /// the agent stored after it is this migration's, even if no controller saw the answer.
    pub dump_requested_at: Option<f64>,
    pub fallback_checkpoint: Option<StoredChoice>,
    pub in_flight: Option<InFlight>,
    /// Controllers that took this migration over from one that died.
    pub resumed_by: u32,
}

/// `<state dir>/migrations/<namespace>-<pod>-<n>.json`, rewritten after every transition and
/// before every step: all a restarted controller needs to go on with the migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistedMigration {
    pub pod: PodKey,
    pub sequence: usize,
    pub trigger: String,
    pub reason: String,
    pub policy: String,
    pub checkpoint: String,
    pub old_container: String,
    pub new_container: String,
    /// Policy time runs this many times faster than real time in these timestamps.
    pub policy_clock_scale: u32,
    pub limits: Limits,
    pub state: MigrationState,
    pub decision: MigrationDecision,
    pub driver: DriverRecord,
}

impl PersistedMigration {
    /// Every migration persisted in `state_dir`, in the order they were decided.
    pub fn read_all(state_dir: &Path) -> Result<Vec<(PathBuf, Self)>, ControllerError> {
        let dir = state_dir.join("migrations");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => {
                return Err(ControllerError::Load {
                    path: dir,
                    reason: error.to_string(),
                });
            }
        };
        let mut found = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().and_then(|ext| ext.to_str()) != Some("json") {
                continue;
            }
            let load = |reason: String| ControllerError::Load {
                path: path.clone(),
                reason,
            };
            let text = std::fs::read(&path).map_err(|e| load(e.to_string()))?;
            let persisted: Self = serde_json::from_slice(&text).map_err(|e| load(e.to_string()))?;
            found.push((path, persisted));
        }
        found.sort_by_key(|(_, persisted)| persisted.sequence);
        Ok(found)
    }
}

/// What a migration in progress carries besides its persisted state.
#[derive(Debug)]
struct MigrationRun {
    decision: MigrationDecision,
    limits: Limits,
    state: MigrationState,
    old_container: String,
    new_container: String,
    state_file: PathBuf,
    sequence: usize,
    driver: DriverRecord,
}

/// Where a controller stops as if killed (see [`LocalController::with_halt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HaltPoint {
    pub phase: Phase,
    /// `None`: right after entering the phase, before its step; `Some(after)`: this long into
    /// the step (the step is abandoned mid-way).
    pub after: Option<Duration>,
}

/// What one pass did.
#[derive(Debug, Clone, PartialEq)]
pub enum TickOutcome {
    Idle,
    Checkpointed,
    Migrated(Box<MigrationSummary>),
    /// The training program wrote its last line.
    TrainingDone,
}

/// The local-mode controller (see the module header).
#[derive(Debug)]
pub struct LocalController {
    cluster: Arc<LocalCluster>,
    policies: PolicySet,
    clock: PolicyClock,
    memory: EngineMemory,
    options: ControllerOptions,
    pod: PodState,
    dataset: DatasetMeta,
    worker: Worker,
    /// The periodic checkpoint running in the background, if any.
    checkpointing: Option<tokio::task::JoinHandle<()>>,
    users: Arc<std::sync::Mutex<Vec<UserObservation>>>,
    records: Vec<MigrationRecord>,
    migrations: Vec<MigrationSummary>,
    reported: BTreeSet<String>,
    last_deferred: Option<String>,
    incremental_noted: bool,
    /// Since when the pod's container has been seen stopped on a live node.
    stopped_since: Option<Instant>,
    /// After a failed periodic checkpoint, the next waits until then (a failing dump is not
    /// retried on every pass).
    checkpoint_retry_at: Option<Instant>,
    checkpoints_failed_seen: usize,
    policy_edits: PolicyEdits,
    /// A migration an earlier controller left in progress, driven on by the next pass.
    pending: Option<MigrationRun>,
    halt: Option<HaltPoint>,
    /// A pause before the step of one phase (so a test can kill the controller in it).
    step_delay: Option<(Phase, Duration)>,
    /// Where another process writes the users' latencies (read by every pass when present).
    users_file: Option<PathBuf>,
}

/// Policy ConfigMap edits waiting to be applied, `(name, policy.yaml text)`, as the Kubernetes
/// controller's policy watch delivers them. They are applied at the next pass, or at the next
/// step of a migration in progress (whose phase limits stay those it was decided with).
pub type PolicyEdits = Arc<std::sync::Mutex<Vec<(String, String)>>>;

impl LocalController {
    /// A controller for one pod whose dataset already sits on `node` (its only copy so far).
    pub fn new(
        cluster: Arc<LocalCluster>,
        policies: PolicySet,
        clock: PolicyClock,
        config: PodConfig,
        dataset: DatasetMeta,
        node: &str,
        options: ControllerOptions,
    ) -> Self {
        let container = format!("{}-{node}-1", config.pod.name);
        let shared = Arc::new(Shared::default());
        shared.add_holder(node);
        let worker = Worker {
            cluster: Arc::clone(&cluster),
            dataset: config.dataset.clone(),
            origin: None,
            shared,
        };
        Self {
            cluster,
            policies,
            clock,
            memory: EngineMemory::default(),
            options,
            pod: PodState {
                config,
                node: node.to_string(),
                container,
                generation: 1,
            },
            dataset,
            worker,
            checkpointing: None,
            users: Arc::default(),
            records: Vec::new(),
            migrations: Vec::new(),
            reported: BTreeSet::new(),
            last_deferred: None,
            incremental_noted: false,
            stopped_since: None,
            checkpoint_retry_at: None,
            checkpoints_failed_seen: 0,
            policy_edits: Arc::default(),
            pending: None,
            halt: None,
            step_delay: None,
            users_file: None,
        }
    }

    /// Reads the users' latencies from `path` (a JSON list of `UserObservation`) at every pass
    /// where it exists, instead of [`LocalController::users_handle`].
    pub fn with_users_file(mut self, path: PathBuf) -> Self {
        self.users_file = Some(path);
        self
    }

    fn users(&self) -> Vec<UserObservation> {
        if let Some(path) = &self.users_file
            && let Ok(text) = std::fs::read(path)
        {
            match serde_json::from_slice(&text) {
                Ok(users) => return users,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "unreadable users file")
                }
            }
        }
        self.users
            .lock()
            .map(|users| users.clone())
            .unwrap_or_default()
    }

    /// A controller on `options.state_dir` that goes on with what an earlier controller left
    /// there (see the module header), or starts afresh on an empty one. The pod starts on
    /// `node` with its dataset there; where it runs now follows from the finished migrations.
    pub fn open(
        cluster: Arc<LocalCluster>,
        policies: PolicySet,
        clock: PolicyClock,
        config: PodConfig,
        dataset: DatasetMeta,
        node: &str,
        options: ControllerOptions,
    ) -> Result<Self, ControllerError> {
        let state_dir = options.state_dir.clone();
        let mut controller = Self::new(cluster, policies, clock, config, dataset, node, options);
        let shared = Arc::new(crate::worker::Shared::journaled(&state_dir, true)?);
        shared.add_holder(node);
        controller.worker.shared = shared;
        controller.checkpoints_failed_seen = controller
            .worker
            .shared
            .timeline()
            .iter()
            .filter(|event| matches!(event, TimelineEvent::CheckpointFailed { .. }))
            .count();
        let memory_path = state_dir.join("engine-memory.json");
        match std::fs::read(&memory_path) {
            Ok(text) => {
                controller.memory =
                    serde_json::from_slice(&text).map_err(|error| ControllerError::Load {
                        path: memory_path.clone(),
                        reason: error.to_string(),
                    })?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(ControllerError::Load {
                    path: memory_path,
                    reason: error.to_string(),
                });
            }
        }
        for (path, persisted) in PersistedMigration::read_all(&state_dir)? {
            if persisted.pod != controller.pod.config.pod {
                continue;
            }
            let run = MigrationRun {
                decision: persisted.decision,
                limits: persisted.limits,
                state: persisted.state,
                old_container: persisted.old_container,
                new_container: persisted.new_container,
                state_file: path,
                sequence: persisted.sequence,
                driver: persisted.driver,
            };
            if run.state.phase.is_terminal() {
                controller.conclude(run);
            } else if let Some(earlier) = controller.pending.replace(run) {
                // One pod migrates once at a time; a second would mean a corrupt directory.
                return Err(ControllerError::Load {
                    path: earlier.state_file,
                    reason: "two migrations of the pod in progress at once".into(),
                });
            }
        }
        // With a migration in progress, the resume says so once it has looked at the runtimes.
        if controller.pending.is_none() && !controller.worker.shared.timeline().is_empty() {
            controller
                .worker
                .shared
                .push(TimelineEvent::ControllerStarted {
                    at: unix_now(),
                    migration_phase: None,
                    step_in_flight: None,
                    waited_for_runtime_ms: 0.0,
                });
        }
        Ok(controller)
    }

    /// Stops as if killed at `halt` (a test of restarts: the state persisted there is what a
    /// killed controller leaves).
    pub fn with_halt(mut self, halt: HaltPoint) -> Self {
        self.halt = Some(halt);
        self
    }

    /// Pauses `delay` before carrying out the step of `phase`, so that a test can kill the
    /// controller while the migration is persisted in that phase.
    pub fn with_step_delay(mut self, phase: Phase, delay: Duration) -> Self {
        self.step_delay = Some((phase, delay));
        self
    }

    /// The phase of a migration an earlier controller left in progress, if one waits.
    pub fn pending_phase(&self) -> Option<Phase> {
        self.pending.as_ref().map(|run| run.state.phase)
    }

    /// Whether the pod was deployed (by this controller or an earlier one on its state dir).
    pub fn deployed(&self) -> bool {
        self.worker
            .shared
            .timeline()
            .iter()
            .any(|event| matches!(event, TimelineEvent::Deployed { .. }))
    }

    /// Deploys the pod unless an earlier controller did: a container already running (started
    /// by a controller killed before it noted so) is kept.
    pub async fn deploy_once(&mut self) -> Result<(), ControllerError> {
        if self.deployed() {
            return Ok(());
        }
        if self
            .node(&self.pod.node)?
            .container_running(&self.runtime_id())
        {
            self.worker.shared.push(TimelineEvent::Deployed {
                at: unix_now(),
                node: self.pod.node.clone(),
                container: self.pod.container.clone(),
            });
            return Ok(());
        }
        self.deploy().await
    }

    /// Where policy edits go (see [`PolicyEdits`]).
    pub fn policy_edits_handle(&self) -> PolicyEdits {
        Arc::clone(&self.policy_edits)
    }

    /// The policies in force.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Applies the edits that arrived; an invalid one is refused and the last valid version of
    /// that policy stays in force ([`PolicySet::apply`]).
    fn apply_policy_edits(&mut self) {
        let edits = self
            .policy_edits
            .lock()
            .map(|mut edits| std::mem::take(&mut *edits))
            .unwrap_or_default();
        for (name, text) in edits {
            let outcome = self.policies.apply(&name, &text);
            if let Err(error) = &outcome {
                tracing::warn!(%name, %error, "policy edit refused; the last valid version stays");
            }
            self.worker.shared.push(TimelineEvent::PolicyEdited {
                at: unix_now(),
                name,
                accepted: outcome.is_ok(),
                message: outcome.err().map(|error| error.to_string()),
            });
        }
    }

    /// Where the dataset can be fetched again when no node holds a copy any more.
    pub fn with_dataset_origin(mut self, spec: DatasetSpec) -> Self {
        self.worker.origin = Some(spec);
        self
    }

    pub fn clock(&self) -> &PolicyClock {
        &self.clock
    }

    pub fn timeline(&self) -> Vec<TimelineEvent> {
        self.worker.shared.timeline()
    }

    pub fn migrations(&self) -> &[MigrationSummary] {
        &self.migrations
    }

    /// Where the pod runs now: (node, container id).
    pub fn placement(&self) -> (&str, &str) {
        (&self.pod.node, &self.pod.container)
    }

    /// What the controller and its background jobs record (for scenario tasks that wait on it).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.worker.shared)
    }

    /// Where a scenario writes the users' latencies to the nodes (read by every pass).
    pub fn users_handle(&self) -> Arc<std::sync::Mutex<Vec<UserObservation>>> {
        Arc::clone(&self.users)
    }

    /// Nodes holding a verified copy of the dataset.
    pub fn dataset_holders(&self) -> BTreeSet<String> {
        self.worker.shared.holders()
    }

    /// The epochs the workload had reported around each checkpoint, by checkpoint id.
    pub fn checkpoint_epochs(&self) -> BTreeMap<String, EpochRange> {
        self.worker.shared.epochs()
    }

    fn spec(&self, instance: &str) -> ContainerSpec {
        ContainerSpec {
            pod: self.pod.config.pod.clone(),
            container: self.pod.config.container.clone(),
            instance: instance.to_string(),
            dataset: self.pod.config.dataset.clone(),
            trainer: self.pod.config.trainer.clone(),
        }
    }

    /// The pod's container id in runc, the same on every node.
    fn runtime_id(&self) -> String {
        crate::node::runtime_id(&self.pod.config.pod, &self.pod.config.container)
    }

    fn node(&self, name: &str) -> Result<&Arc<LocalNode>, ControllerError> {
        Ok(self.cluster.node(name)?)
    }

    fn agent(&self, name: &str) -> Result<&AgentHandle, ControllerError> {
        Ok(self.cluster.agent(name)?)
    }

    fn progress_of(&self, node: &str, container: &str) -> workload::Progress {
        self.node(node)
            .ok()
            .and_then(|node| workload::read_progress(&node.layout().progress(container)).ok())
            .unwrap_or_default()
    }

    fn last_epoch(&self, node: &str, container: &str) -> Option<u32> {
        self.progress_of(node, container)
            .last_epoch()
            .map(|record| record.epoch)
    }

    /// Whether the pod's current container has finished its training.
    pub fn training_done(&self) -> bool {
        self.progress_of(&self.pod.node, &self.pod.container)
            .done()
            .is_some()
    }

    /// Starts the pod from its beginning on its node.
    #[tracing::instrument(name = "deploy", skip(self), fields(node = %self.pod.node))]
    pub async fn deploy(&mut self) -> Result<(), ControllerError> {
        let spec = self.spec(&self.pod.container);
        self.node(&self.pod.node)?.run_fresh(&spec).await?;
        self.worker.shared.push(TimelineEvent::Deployed {
            at: unix_now(),
            node: self.pod.node.clone(),
            container: self.pod.container.clone(),
        });
        Ok(())
    }

    /// Writes a JSON file atomically (temporary file, then rename).
    fn persist(path: &Path, value: &impl Serialize) -> Result<(), ControllerError> {
        let error = |reason: String| ControllerError::Persist {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| error(e.to_string()))?;
        }
        let text = serde_json::to_string_pretty(value).map_err(|e| error(e.to_string()))?;
        let temporary = path.with_extension("json.tmp");
        std::fs::write(&temporary, text).map_err(|e| error(e.to_string()))?;
        std::fs::rename(&temporary, path).map_err(|e| error(e.to_string()))
    }

    /// The cluster as the engine sees it now.
    pub async fn snapshot(&self) -> ClusterSnapshot {
        let clock = self.clock;
        let config = self.cluster.config();
        let stale_after = config.heartbeat * 3;
        let pod_key = &self.pod.config.pod;
        let mut links = Vec::new();
        let mut holdings: Vec<(String, CheckpointSummary)> = Vec::new();
        // The agents first: their answers may take a while on a busy machine, and the node
        // statuses (heartbeats) must be read together with `now`, or a slow answer would age
        // them and read as a node failure.
        for agent in self.cluster.agents() {
            let node = agent.node().to_string();
            if let Ok(peers) = agent.peers().await {
                for peer in peers {
                    if peer.loss < 1.0 {
                        links.push(LinkObservation {
                            from: node.clone(),
                            to: peer.node,
                            rtt: peer.rtt,
                            bandwidth: None,
                            loss: peer.loss,
                        });
                    }
                }
            }
            if let Ok(list) = agent.checkpoints(pod_key).await {
                holdings.extend(list.into_iter().map(|summary| (node.clone(), summary)));
            }
        }
        let now = clock.now();
        let mut nodes = Vec::new();
        // Nodes whose heartbeat is stale: a copy of the dataset there cannot be fetched.
        let mut silent_nodes = BTreeSet::new();
        for node in self.cluster.nodes() {
            let status = node.status(|time| clock.policy_time_of(time));
            let silent = SystemTime::now()
                .duration_since(status.last_heartbeat)
                .unwrap_or_default();
            if silent > stale_after {
                silent_nodes.insert(node.name().to_string());
            }
            // The node lifecycle controller's rule: Ready turns Unknown once the heartbeat is
            // stale; the engine's grace periods count from the last heartbeat.
            let ready = if silent <= stale_after {
                NodeCondition {
                    kind: "Ready".into(),
                    status: ConditionStatus::True,
                    since: Some(clock.at(Duration::ZERO)),
                    reason: Some("KubeletReady".into()),
                    message: None,
                }
            } else {
                NodeCondition {
                    kind: "Ready".into(),
                    status: ConditionStatus::Unknown,
                    since: Some(clock.policy_time_of(status.last_heartbeat)),
                    reason: Some("NodeStatusUnknown".into()),
                    message: Some("kubelet stopped posting node status".into()),
                }
            };
            let mut labels = config.labels.clone();
            labels.insert("kubernetes.io/hostname".into(), node.name().to_string());
            let requested = if self.pod.node == node.name() {
                self.pod.config.requests
            } else {
                Resources::default()
            };
            nodes.push(Node {
                name: node.name().to_string(),
                zone: None,
                labels,
                taints: Vec::new(),
                conditions: std::iter::once(ready).chain(status.conditions).collect(),
                last_heartbeat: Some(clock.policy_time_of(status.last_heartbeat)),
                allocatable: config.allocatable,
                requested,
                unschedulable: false,
            });
        }
        let epochs = self.worker.shared.epochs();
        // The newest checkpoint a reachable agent holds, and every reachable node holding it.
        let newest = holdings
            .iter()
            .max_by(|a, b| (a.1.created_at, &a.1.id).cmp(&(b.1.created_at, &b.1.id)))
            .map(|(_, summary)| summary.clone());
        let last_checkpoint = newest.map(|summary| {
            let mut held_on: Vec<String> = holdings
                .iter()
                .filter(|(_, other)| other.id == summary.id)
                .map(|(node, _)| node.clone())
                .collect();
            held_on.sort();
            held_on.dedup();
            CheckpointInfo {
                id: summary.id.clone(),
                taken_at: clock.policy_time_of(SystemTime::from(summary.created_at)),
                size: Bytes(summary.bytes),
                freeze: Some(clock.to_policy(summary.freeze)),
                held_on,
                epoch: epochs
                    .get(&summary.id)
                    .and_then(|(before, _)| before.map(u64::from)),
            }
        });
        let pod = ProtectedPod {
            namespace: pod_key.namespace.clone(),
            name: pod_key.name.clone(),
            node: self.pod.node.clone(),
            owner: None,
            requests: self.pod.config.requests,
            labels: self.pod.config.labels.clone(),
            annotations: self.pod.config.annotations.clone(),
            last_checkpoint,
            checkpoint_in_progress: self.checkpointing.is_some(),
        };
        let dataset = Dataset {
            id: self.pod.config.dataset_id(),
            total_bytes: Bytes(self.dataset.total_bytes()),
            file_count: self.dataset.files.len() as u64,
            files: self
                .dataset
                .files
                .iter()
                .map(|file| FileSpec {
                    path: file.path.clone(),
                    size: file.size,
                })
                .collect(),
            present_on: self
                .worker
                .shared
                .holders()
                .into_iter()
                .filter(|holder| !silent_nodes.contains(holder))
                .collect(),
        };
        ClusterSnapshot {
            taken_at: Some(now),
            nodes,
            pods: vec![pod],
            datasets: vec![dataset],
            links,
            users: self.users(),
            alerts: Vec::new(),
            migrations: self.records.clone(),
            requests: Vec::new(),
        }
    }

    fn policy(&self, name: &str) -> Policy {
        self.policies
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.policies.fallback().1.clone())
    }

    /// One pass: snapshot, decide, act.
    #[tracing::instrument(name = "controller_tick", skip(self))]
    pub async fn tick(&mut self) -> Result<TickOutcome, ControllerError> {
        self.apply_policy_edits();
        if let Some(run) = self.pending.take() {
            let summary = self.resume(run).await?;
            return Ok(TickOutcome::Migrated(Box::new(summary)));
        }
        if self.training_done() {
            self.settle_checkpoint(true).await;
            return Ok(TickOutcome::TrainingDone);
        }
        self.settle_checkpoint(false).await;
        self.check_workload()?;
        let snapshot = self.snapshot().await;
        let now = snapshot.taken_at.unwrap_or_else(|| self.clock.now());
        let (decisions, memory) = decide(&snapshot, &self.policies, &self.memory, now);
        self.memory = memory;
        Self::persist(
            &self.options.state_dir.join("engine-memory.json"),
            &self.memory,
        )?;
        for problem in &decisions.problems {
            if self.reported.insert(problem.message.clone()) {
                tracing::warn!(message = %problem.message, "engine problem");
                self.worker.shared.push(TimelineEvent::Problem {
                    at: unix_now(),
                    message: problem.message.clone(),
                });
            }
        }
        let pod_ref = automigrate_core::model::PodRef::new(
            &self.pod.config.pod.namespace,
            &self.pod.config.pod.name,
        );
        if let Some(deferred) = decisions
            .deferred
            .iter()
            .find(|deferred| deferred.pod == pod_ref)
        {
            // Only when the reason changes in kind, not every pass of a dwell timer.
            let gist: String = deferred
                .reason
                .split(['(', ';'])
                .next()
                .unwrap_or_default()
                .to_string();
            if self.last_deferred.as_ref() != Some(&gist) {
                self.worker.shared.push(TimelineEvent::Deferred {
                    at: unix_now(),
                    trigger: format!("{:?}", deferred.trigger),
                    reason: deferred.reason.clone(),
                });
                self.last_deferred = Some(gist);
            }
        } else {
            self.last_deferred = None;
        }
        if let Some(decision) = decisions
            .migrations
            .into_iter()
            .find(|decision| decision.pod == pod_ref)
        {
            let summary = self.migrate(decision).await?;
            return Ok(TickOutcome::Migrated(Box::new(summary)));
        }
        if let Some(decision) = decisions
            .checkpoints
            .iter()
            .find(|decision| decision.pod == pod_ref)
        {
            let backing_off = self
                .checkpoint_retry_at
                .is_some_and(|at| Instant::now() < at);
            if self.checkpointing.is_none() && !backing_off {
                self.start_periodic_checkpoint(decision);
            }
            return Ok(TickOutcome::Checkpointed);
        }
        Ok(TickOutcome::Idle)
    }

    /// Runs passes until `stop` says so or training ends, pausing `tick` between them.
    pub async fn run_until(
        &mut self,
        mut stop: impl FnMut(&Self) -> bool,
    ) -> Result<(), ControllerError> {
        loop {
            if stop(self) {
                return Ok(());
            }
            if self.tick().await? == TickOutcome::TrainingDone {
                return Ok(());
            }
            tokio::time::sleep(self.options.tick).await;
        }
    }

    /// How long a container may read as not running before it counts as stopped: runc needs a
    /// moment between `run` or `restore` returning and its state file naming the process.
    const RUNTIME_STATE_GRACE: Duration = Duration::from_secs(2);

    /// A container on a live node that stopped before the end of training is lost: no
    /// migration can help (the engine only moves pods off failing nodes), so the run ends.
    fn check_workload(&mut self) -> Result<(), ControllerError> {
        let node = self.node(&self.pod.node)?;
        let running = node.container_running(&self.runtime_id());
        if running || !node.is_alive() || self.training_done() {
            self.stopped_since = None;
            return Ok(());
        }
        let since = *self.stopped_since.get_or_insert_with(Instant::now);
        if since.elapsed() > Self::RUNTIME_STATE_GRACE {
            return Err(ControllerError::WorkloadLost {
                node: self.pod.node.clone(),
                container: self.pod.container.clone(),
            });
        }
        Ok(())
    }

    /// Starts a periodic checkpoint with its standby copies in the background, so the passes
    /// (and failure detection) go on while bytes move.
    fn start_periodic_checkpoint(&mut self, decision: &CheckpointDecision) {
        let job = CheckpointJob {
            worker: self.worker.clone(),
            pod: self.pod.config.pod.clone(),
            container_name: self.pod.config.container.clone(),
            container: self.pod.container.clone(),
            decision: decision.clone(),
            retention: automigrate_checkpoint::Retention::from(
                &self.policy(&decision.policy).checkpoint.retention,
            ),
            note_incremental: decision.incremental_on.is_some() && !self.incremental_noted,
        };
        self.incremental_noted |= job.note_incremental;
        self.checkpointing = Some(tokio::spawn(job.run()));
    }

    /// Forgets a finished background checkpoint; with `wait`, waits for a running one first.
    /// A failed one delays the next by a second of real time.
    async fn settle_checkpoint(&mut self, wait: bool) {
        if let Some(handle) = self.checkpointing.take() {
            if handle.is_finished() || wait {
                if let Err(error) = handle.await {
                    tracing::warn!(%error, "checkpoint task ended abnormally");
                }
                let failed = self
                    .worker
                    .shared
                    .timeline()
                    .iter()
                    .filter(|event| matches!(event, TimelineEvent::CheckpointFailed { .. }))
                    .count();
                if failed > self.checkpoints_failed_seen {
                    self.checkpoints_failed_seen = failed;
                    self.checkpoint_retry_at = Some(Instant::now() + Duration::from_secs(1));
                }
            } else {
                self.checkpointing = Some(handle);
            }
        }
    }

    /// Stops a background checkpoint whose node died: its copies can no longer complete.
    fn abandon_checkpoint(&mut self) {
        if let Some(handle) = self.checkpointing.take()
            && !handle.is_finished()
        {
            handle.abort();
            self.worker.shared.push(TimelineEvent::Problem {
                at: unix_now(),
                message: "a periodic checkpoint in progress was abandoned: its node failed".into(),
            });
        }
    }

    fn describe_source(source: &CheckpointSource) -> String {
        match source {
            CheckpointSource::Fresh { base } => match base {
                Some(base) => format!("fresh stop-and-dump (incremental on {base})"),
                None => "fresh stop-and-dump".into(),
            },
            CheckpointSource::Stored {
                id, from, epoch, ..
            } => match epoch {
                Some(epoch) => format!("stored {id} from {from} (epoch {epoch})"),
                None => format!("stored {id} from {from}"),
            },
            CheckpointSource::None => "none survives: restart from the beginning".into(),
        }
    }

    /// Drives one migration through the state machine to its end.
    #[tracing::instrument(name = "migration", skip_all, fields(from = %decision.from, to = %decision.to, trigger = ?decision.trigger))]
    async fn migrate(
        &mut self,
        decision: MigrationDecision,
    ) -> Result<MigrationSummary, ControllerError> {
        let policy = self.policy(&decision.policy);
        let limits = Limits::from_policy(&policy);
        let source_alive = matches!(decision.checkpoint, CheckpointSource::Fresh { .. });
        // A periodic checkpoint of a live source finishes first (the agent takes one dump at a
        // time); one on a dead node can no longer finish.
        if source_alive {
            self.settle_checkpoint(true).await;
        } else {
            self.abandon_checkpoint();
        }
        let state = MigrationState::new(
            decision.from.clone(),
            decision.to.clone(),
            source_alive,
            self.clock.now(),
            decision.failed_at,
        );
        let sequence = self.migrations.len() + 1;
        let state_file = self.options.state_dir.join("migrations").join(format!(
            "{}-{}-{sequence}.json",
            self.pod.config.pod.namespace, self.pod.config.pod.name
        ));
        let decided_at = unix_now();
        self.worker.shared.push(TimelineEvent::MigrationDecided {
            at: decided_at,
            trigger: format!("{:?}", decision.trigger),
            from: decision.from.clone(),
            to: decision.to.clone(),
            reason: decision.reason.clone(),
            checkpoint: Self::describe_source(&decision.checkpoint),
            candidates: decision
                .candidates
                .iter()
                .map(|candidate| format!("{} {:.3}", candidate.node, candidate.score))
                .collect(),
        });
        tracing::info!(reason = %decision.reason, "migration decided");
        let run = MigrationRun {
            new_container: format!(
                "{}-{}-{}",
                self.pod.config.pod.name,
                decision.to,
                self.pod.generation + 1
            ),
            old_container: self.pod.container.clone(),
            decision,
            limits,
            state,
            state_file,
            sequence,
            driver: DriverRecord {
                decided_at,
                ..DriverRecord::default()
            },
        };
        self.save(&run)?;
        self.drive(run).await
    }

    /// Goes on with a migration an earlier controller left in progress: waits until the
    /// runtime operations it started on the two nodes are over, then drives it like a new one
    /// (observing first).
    #[tracing::instrument(name = "migration_resume", skip_all, fields(phase = %run.state.phase, from = %run.state.source, to = %run.state.target))]
    async fn resume(&mut self, mut run: MigrationRun) -> Result<MigrationSummary, ControllerError> {
        let waited = self.wait_for_quiet_runtimes(&run).await;
        run.driver.resumed_by += 1;
        let in_flight = run.driver.in_flight.take();
        tracing::warn!(phase = %run.state.phase, in_flight = ?in_flight, waited_ms = waited.as_millis(), "resuming a migration an earlier controller left in progress");
        self.worker.shared.push(TimelineEvent::ControllerStarted {
            at: unix_now(),
            migration_phase: Some(run.state.phase),
            step_in_flight: in_flight.map(|in_flight| format!("{:?}", in_flight.step)),
            waited_for_runtime_ms: waited.as_secs_f64() * 1000.0,
        });
        self.save(&run)?;
        self.drive(run).await
    }

    /// Longest a restarted controller waits for the runtime operations of the one that died.
    const RUNTIME_QUIET_LIMIT: Duration = Duration::from_secs(120);

    /// Waits until no `runc` works on the migration's nodes (an operation a killed controller
    /// started goes on without it; observing before it ends would see a half-made state).
    async fn wait_for_quiet_runtimes(&self, run: &MigrationRun) -> Duration {
        let started = Instant::now();
        let nodes: Vec<Arc<LocalNode>> = [&run.state.source, &run.state.target]
            .into_iter()
            .filter_map(|name| self.node(name).ok().cloned())
            .collect();
        loop {
            let busy: Vec<u32> = nodes
                .iter()
                .flat_map(|node| node.runtime_operations())
                .collect();
            if busy.is_empty() || started.elapsed() > Self::RUNTIME_QUIET_LIMIT {
                if !busy.is_empty() {
                    tracing::warn!(?busy, "runtime operations still running; observing anyway");
                }
                return started.elapsed();
            }
            tracing::info!(
                ?busy,
                "waiting for runtime operations of the earlier controller"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The driver's loop: observe, time out, step, until the migration ends.
    async fn drive(&mut self, mut run: MigrationRun) -> Result<MigrationSummary, ControllerError> {
        let mut delayed_in = None;
        loop {
            self.apply_policy_edits();
            let facts = self.facts(&run).await;
            if let Some(event) = migration::observe(&run.state, &facts) {
                self.apply(&mut run, event)?;
                continue;
            }
            if let Some(event) = migration::timeout(&run.state, &run.limits, self.clock.now()) {
                self.apply(&mut run, event)?;
                continue;
            }
            // A retryable failure keeps the phase until its deadline; the step runs again only
            // once the backoff the state machine recorded has passed.
            if let Some(wait) = run
                .state
                .retry_at
                .map(|at| automigrate_core::units::age(at, self.clock.now()))
                .filter(|wait| !wait.is_zero())
            {
                tokio::time::sleep(self.clock.to_real(wait).min(self.remaining(&run))).await;
                continue;
            }
            let step = migration::step(&run.state);
            if step == Step::Done {
                break;
            }
            let phase = run.state.phase;
            if let Some((slow, delay)) = self.step_delay
                && slow == phase
                && delayed_in != Some(phase)
            {
                delayed_in = Some(phase);
                tokio::time::sleep(delay).await;
                continue;
            }
            run.driver.in_flight = Some(InFlight {
                step: step.clone(),
                since: unix_now(),
            });
            self.save(&run)?;
            let budget = self.remaining(&run);
            let halt_after = self
                .halt
                .filter(|halt| halt.phase == phase)
                .and_then(|halt| halt.after);
            let outcome = match halt_after {
                Some(after) if after < budget => {
                    let step_run = tokio::time::timeout(after, self.execute(&mut run, &step));
                    match step_run.await {
                        Ok(event) => Ok(event),
                        Err(_) => return Err(self.halted(phase)),
                    }
                }
                _ => tokio::time::timeout(budget, self.execute(&mut run, &step)).await,
            };
            let event = match outcome {
                Ok(event) => event,
                Err(_) => migration::timeout(&run.state, &run.limits, self.clock.now())
                    .unwrap_or_else(|| Event::StepFailed {
                        reason: format!("{step:?} outlived its phase's deadline"),
                        retryable: false,
                    }),
            };
            run.driver.in_flight = None;
            self.apply(&mut run, event)?;
        }
        Ok(self.finish(run))
    }

    /// Stops as if killed: background work is abandoned where it is.
    fn halted(&mut self, phase: Phase) -> ControllerError {
        if let Some(handle) = self.checkpointing.take() {
            handle.abort();
        }
        tracing::warn!(%phase, "halting as asked");
        ControllerError::Halted { phase }
    }

    /// Real time left before the current phase's deadline (a minute for phases without one).
    fn remaining(&self, run: &MigrationRun) -> Duration {
        let Some(deadline) = run.limits.deadline(run.state.phase) else {
            return Duration::from_secs(60);
        };
        let elapsed = automigrate_core::units::age(self.clock.now(), run.state.phase_started_at);
        self.clock
            .to_real(deadline.saturating_sub(elapsed))
            .max(Duration::from_millis(1))
    }

    fn save(&self, run: &MigrationRun) -> Result<(), ControllerError> {
        Self::persist(
            &run.state_file,
            &PersistedMigration {
                pod: self.pod.config.pod.clone(),
                sequence: run.sequence,
                trigger: format!("{:?}", run.decision.trigger),
                reason: run.decision.reason.clone(),
                policy: run.decision.policy.clone(),
                checkpoint: Self::describe_source(&run.decision.checkpoint),
                old_container: run.old_container.clone(),
                new_container: run.new_container.clone(),
                policy_clock_scale: self.clock.scale(),
                limits: run.limits,
                state: run.state.clone(),
                decision: run.decision.clone(),
                driver: run.driver.clone(),
            },
        )
    }

    fn apply(&mut self, run: &mut MigrationRun, event: Event) -> Result<(), ControllerError> {
        let before = run.state.phase;
        run.state = migration::apply(&run.state, &event, &run.limits, self.clock.now())?;
        self.save(run)?;
        if run.state.phase != before {
            let at = unix_now();
            tracing::info!(from = %before, to = %run.state.phase, message = ?run.state.message, "migration phase");
            run.driver.phases.push((run.state.phase, at));
            self.save(run)?;
            self.worker.shared.push(TimelineEvent::Phase {
                at,
                phase: run.state.phase,
                message: run.state.message.clone(),
            });
            if self
                .halt
                .is_some_and(|halt| halt.phase == run.state.phase && halt.after.is_none())
            {
                return Err(self.halted(run.state.phase));
            }
        }
        Ok(())
    }

    async fn facts(&self, run: &MigrationRun) -> Facts {
        let source_reachable = match self.agent(&run.state.source) {
            Ok(agent) => agent.health().await.is_ok(),
            Err(_) => false,
        };
        let source_running = if source_reachable {
            self.node(&run.state.source)
                .ok()
                .map(|node| node.container_running(&self.runtime_id()))
        } else {
            None
        };
        let target_running = self
            .node(&run.state.target)
            .is_ok_and(|node| node.container_running(&self.runtime_id()));
        let checkpoint_complete = match (&run.state.checkpoint_id, self.node(&run.state.source)) {
            (Some(id), Ok(node)) => {
                let pod = automigrate_checkpoint::PodKey::new(
                    &self.pod.config.pod.namespace,
                    &self.pod.config.pod.name,
                );
                node.has_checkpoint(&pod, id)
            }
            _ => false,
        };
        Facts {
            source_running,
            target_running,
            checkpoint_complete,
        }
    }

    fn failed_step(reason: impl std::fmt::Display, retryable: bool) -> Event {
        Event::StepFailed {
            reason: reason.to_string(),
            retryable,
        }
    }

    fn succeeded(checkpoint_id: Option<String>) -> Event {
        Event::StepSucceeded { checkpoint_id }
    }

    /// Carries out one step and says what happened.
    async fn execute(&mut self, run: &mut MigrationRun, step: &Step) -> Event {
        let result = match step {
            Step::SyncData if run.state.phase == Phase::Pending => Ok(Self::succeeded(None)),
            Step::SyncData => self.sync_data(run).await,
            Step::Checkpoint => self.final_checkpoint(run).await,
            Step::TransferCheckpoint => self.transfer_checkpoint(run).await,
            Step::Fence { .. } => self.fence(run).await,
            Step::Restore => self.restore(run).await,
            Step::Verify => self.verify(run).await,
            Step::RollBack {
                stop_target,
                action,
            } => self.roll_back(run, *stop_target, *action).await,
            Step::Done => Ok(Self::succeeded(None)),
        };
        result.unwrap_or_else(|error| Self::failed_step(error, false))
    }

    async fn source_reachable(&self, run: &MigrationRun) -> bool {
        match self.agent(&run.state.source) {
            Ok(agent) => agent.health().await.is_ok(),
            Err(_) => false,
        }
    }

    /// The dataset (and, for a dead source, the stored checkpoint) go to the target while the
    /// source, if alive, keeps training.
    async fn sync_data(&mut self, run: &mut MigrationRun) -> Result<Event, ControllerError> {
        if run.state.source_alive && !self.source_reachable(run).await {
            return Ok(Event::SourceLost);
        }
        let target = run.state.target.clone();
        for transfer in run.decision.transfers.clone() {
            let moved = match transfer.payload {
                Payload::Dataset => {
                    self.worker
                        .ensure_dataset(&transfer.from, &target, Purpose::Recovery)
                        .await
                }
                Payload::Checkpoint => match &run.decision.checkpoint {
                    CheckpointSource::Stored { id, from, .. }
                        if self.options.recovery == Recovery::Resume =>
                    {
                        let (id, from) = (id.clone(), from.clone());
                        self.copy_checkpoint(&from, &target, &id).await
                    }
                    // A fresh dump is sent once it exists (Transferring).
                    _ => Ok(0),
                },
            };
            match moved {
                Ok(bytes) => run.driver.recovery_bytes += bytes,
                Err(error) => return Ok(Self::failed_step(error, true)),
            }
        }
        // The engine found no surviving copy ("the pod must fetch it again").
        if !self.worker.shared.holders().contains(&target) {
            match self.worker.fetch_from_origin(&target).await {
                Ok(bytes) => run.driver.recovery_bytes += bytes,
                Err(error) => return Ok(Self::failed_step(error, false)),
            }
        }
        Ok(Self::succeeded(None))
    }

    async fn copy_checkpoint(
        &mut self,
        from: &str,
        to: &str,
        id: &str,
    ) -> Result<u64, ControllerError> {
        let pod = self.pod.config.pod.clone();
        self.worker
            .copy_checkpoint(&pod, from, to, id, Purpose::Recovery)
            .await
    }

    /// The final stop-and-dump: from here the workload makes no progress until it resumes.
    async fn final_checkpoint(&mut self, run: &mut MigrationRun) -> Result<Event, ControllerError> {
        if !self.source_reachable(run).await {
            return Ok(Event::SourceLost);
        }
        if let Some(event) = self.earlier_dump(run).await {
            return Ok(event);
        }
        let source = run.state.source.clone();
        let at = unix_now();
        run.driver.freeze_started_at.get_or_insert(at);
        // Persisted before asking: a controller that takes over finds what this request made.
        run.driver.dump_requested_at.get_or_insert(at);
        self.save(run)?;
        let started = Instant::now();
        let request = CheckpointRequest {
            pod: self.pod.config.pod.clone(),
            container: self.pod.config.container.clone(),
            kind: CheckpointKind::Final,
        };
        let before = self.last_epoch(&source, &run.old_container);
        let result = loop {
            match self.agent(&source)?.checkpoint(&request).await {
                // The agent is still taking a dump of the pod that an earlier controller asked
                // for: wait for it to end, then see what it left.
                Err(AgentError::Failed { kind, .. }) if kind == error_kind::CONFLICT => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if let Some(event) = self.earlier_dump(run).await {
                        return Ok(event);
                    }
                }
                other => break other,
            }
        };
        match result {
            Ok(summary) => {
                // The dumped process is gone: its last line is exactly the checkpoint's epoch.
                let epoch = self.last_epoch(&source, &run.old_container);
                self.worker.shared.set_epochs(&summary.id, (epoch, epoch));
                self.worker.shared.push(TimelineEvent::Checkpoint {
                    at,
                    node: source,
                    id: summary.id.clone(),
                    kind: "final".into(),
                    bytes: summary.bytes,
                    freeze_ms: summary.freeze.as_secs_f64() * 1000.0,
                    took_ms: started.elapsed().as_secs_f64() * 1000.0,
                    epoch_before: before,
                    epoch_after: epoch,
                    reason: run.decision.reason.clone(),
                });
                Ok(Self::succeeded(Some(summary.id)))
            }
            Err(AgentError::Unreachable { .. }) => Ok(Event::SourceLost),
            Err(error) => Ok(Self::failed_step(error, true)),
        }
    }

    /// How long a restarted controller waits for a dump it finds the source's workload gone
    /// after to show up in the agent's store (the agent may still be storing it).
    const EARLIER_DUMP_WAIT: Duration = Duration::from_secs(10);

    /// What became of a final dump this migration asked for before (by this controller or one
    /// that died since): `None` while the workload still runs on the source (dump, again);
    /// success with its id when the source's agent stores a checkpoint made since the request;
    /// [`Event::SourceLost`] when the workload is gone and no such checkpoint appears (no fresh
    /// checkpoint can be had: go on from the newest stored one).
    async fn earlier_dump(&mut self, run: &MigrationRun) -> Option<Event> {
        let requested = run.driver.dump_requested_at?;
        let source = run.state.source.clone();
        let node = Arc::clone(self.node(&source).ok()?);
        if node.container_running(&self.runtime_id()) {
            return None;
        }
        let agent = self.agent(&source).ok()?.clone();
        let deadline = Instant::now() + Self::EARLIER_DUMP_WAIT;
        loop {
            let made_since = agent
                .checkpoints(&self.pod.config.pod)
                .await
                .ok()?
                .into_iter()
                .filter(|summary| {
                    unix_seconds(SystemTime::from(summary.created_at)) >= requested - 0.5
                })
                .max_by_key(|summary| summary.created_at);
            if let Some(summary) = made_since {
                // The dumped process is gone: its last line is exactly the checkpoint's epoch.
                let epoch = self.last_epoch(&source, &run.old_container);
                self.worker.shared.set_epochs(&summary.id, (epoch, epoch));
                self.worker.shared.push(TimelineEvent::Checkpoint {
                    at: unix_seconds(SystemTime::from(summary.created_at)),
                    node: source.clone(),
                    id: summary.id.clone(),
                    kind: "final".into(),
                    bytes: summary.bytes,
                    freeze_ms: summary.freeze.as_secs_f64() * 1000.0,
                    took_ms: 0.0,
                    epoch_before: epoch,
                    epoch_after: epoch,
                    reason: format!("{} (found after a controller restart)", run.decision.reason),
                });
                tracing::info!(id = %summary.id, "the final dump asked for earlier was taken");
                return Some(Self::succeeded(Some(summary.id)));
            }
            if Instant::now() > deadline {
                tracing::warn!("the source's workload is gone without a final dump");
                return Some(Event::SourceLost);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The checkpoint to restore from: this migration's dump, else the engine's stored choice,
    /// else the stored one chosen when the source could give none ([`Self::choose_fallback`]).
    fn checkpoint_to_use(&self, run: &MigrationRun) -> Option<(String, Option<String>)> {
        if let Some(id) = &run.state.checkpoint_id {
            return Some((id.clone(), Some(run.state.source.clone())));
        }
        match &run.decision.checkpoint {
            CheckpointSource::Stored { id, from, .. } => Some((id.clone(), Some(from.clone()))),
            _ => run
                .driver
                .fallback_checkpoint
                .as_ref()
                .map(|choice| (choice.id.clone(), Some(choice.from.clone()))),
        }
    }

    /// A live source lost before its final dump leaves the migration without a checkpoint of
    /// its own: the newest one a reachable agent stores is chosen (the target's copy when it has
    /// one) and persisted, as the engine's "continue from the newest stored checkpoint" says.
    async fn choose_fallback(&mut self, run: &mut MigrationRun) -> Result<(), ControllerError> {
        if self.options.recovery == Recovery::FreshRestart
            || run.state.source_alive
            || self.checkpoint_to_use(run).is_some()
        {
            return Ok(());
        }
        let mut newest: Option<(CheckpointSummary, String)> = None;
        for agent in self.cluster.agents() {
            let Ok(list) = agent.checkpoints(&self.pod.config.pod).await else {
                continue;
            };
            for summary in list {
                let node = agent.node().to_string();
                let better = match &newest {
                    None => true,
                    Some((best, holder)) => {
                        (summary.created_at, &summary.id) > (best.created_at, &best.id)
                            || (summary.id == best.id
                                && node == run.state.target
                                && *holder != run.state.target)
                    }
                };
                if better {
                    newest = Some((summary, node));
                }
            }
        }
        if let Some((summary, from)) = newest {
            tracing::info!(id = %summary.id, %from, "no checkpoint of the migration's own: using the newest stored one");
            run.driver.fallback_checkpoint = Some(StoredChoice {
                id: summary.id,
                from,
            });
            self.save(run)?;
        }
        Ok(())
    }

    async fn transfer_checkpoint(
        &mut self,
        run: &mut MigrationRun,
    ) -> Result<Event, ControllerError> {
        if self.options.recovery == Recovery::FreshRestart {
            return Ok(Self::succeeded(None));
        }
        self.choose_fallback(run).await?;
        let Some((id, Some(from))) = self.checkpoint_to_use(run) else {
            return Ok(Self::succeeded(None));
        };
        let target = run.state.target.clone();
        match self.copy_checkpoint(&from, &target, &id).await {
            Ok(bytes) => {
                run.driver.recovery_bytes += bytes;
                Ok(Self::succeeded(None))
            }
            Err(error) => Ok(Self::failed_step(error, true)),
        }
    }

    /// Makes sure the old container cannot run: removed through a live node's runtime, or,
    /// for a dead node, confirmed dead out of band (and SIGKILLed there if it still runs).
    async fn fence(&mut self, run: &mut MigrationRun) -> Result<Event, ControllerError> {
        let node = Arc::clone(self.node(&run.state.source)?);
        let old = self.runtime_id();
        if node.is_alive() {
            node.remove_container(&old).await?;
        } else if node.container_running(&old) {
            tracing::warn!(container = %old, "dead node's container still runs: power-fencing it");
            node.runc()
                .kill(&old, "KILL")
                .await
                .map_err(NodeError::from)?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if node.container_running(&old) {
            Ok(Self::failed_step(
                format!(
                    "container {old} ({}) on {} still runs",
                    run.old_container, run.state.source
                ),
                true,
            ))
        } else {
            Ok(Self::succeeded(None))
        }
    }

    async fn restore(&mut self, run: &mut MigrationRun) -> Result<Event, ControllerError> {
        let target = Arc::clone(self.node(&run.state.target)?);
        let spec = self.spec(&run.new_container);
        // Idempotent: a container left by an attempt that did not finish goes first.
        target.remove_container(&self.runtime_id()).await?;
        self.choose_fallback(run).await?;
        let checkpoint = match self.options.recovery {
            Recovery::Resume => self.checkpoint_to_use(run),
            Recovery::FreshRestart => None,
        };
        match checkpoint {
            Some((id, from)) => {
                // A source lost while syncing skips the transfer phase: the copy is made here.
                if let Some(from) = from.filter(|from| *from != run.state.target) {
                    let target_name = run.state.target.clone();
                    match self.copy_checkpoint(&from, &target_name, &id).await {
                        Ok(bytes) => run.driver.recovery_bytes += bytes,
                        Err(error) => return Ok(Self::failed_step(error, true)),
                    }
                }
                // Recorded before: a controller that takes over after the restore finds it.
                run.driver.checkpoint_used = Some(id.clone());
                self.save(run)?;
                let timeout = self.clock.to_real(run.limits.restore);
                match target.restore(&spec, &id, timeout).await {
                    Ok(_) => {
                        let at = unix_now();
                        run.driver.resumed_at = Some(at);
                        run.driver.checkpoint_used = Some(id.clone());
                        self.worker.shared.push(TimelineEvent::Resumed {
                            at,
                            node: run.state.target.clone(),
                            container: run.new_container.clone(),
                            checkpoint: Some(id),
                            fresh: false,
                        });
                        Ok(Self::succeeded(None))
                    }
                    // The stored checkpoint does not verify (damaged at rest) and the source is
                    // gone: an older one on the target that verifies beats the policy's
                    // fallback, a restart from zero.
                    Err(error @ (NodeError::Store(_) | NodeError::Archive(_)))
                        if !run.state.source_alive =>
                    {
                        let older = self.newest_verified(&target, Some(id.clone())).await;
                        let Some(older) = older else {
                            return Ok(Self::failed_step(error, false));
                        };
                        tracing::warn!(%id, %older, %error, "checkpoint does not verify; restoring an older one");
                        self.worker.shared.push(TimelineEvent::Problem {
                            at: unix_now(),
                            message: format!(
                                "checkpoint {id} does not verify on {}: {error}; restoring the older {older}",
                                run.state.target
                            ),
                        });
                        run.driver.checkpoint_used = Some(older.clone());
                        self.save(run)?;
                        match target.restore(&spec, &older, timeout).await {
                            Ok(_) => {
                                let at = unix_now();
                                run.driver.resumed_at = Some(at);
                                self.worker.shared.push(TimelineEvent::Resumed {
                                    at,
                                    node: run.state.target.clone(),
                                    container: run.new_container.clone(),
                                    checkpoint: Some(older),
                                    fresh: false,
                                });
                                Ok(Self::succeeded(None))
                            }
                            Err(error) => Ok(Self::failed_step(error, false)),
                        }
                    }
                    Err(error) => Ok(Self::failed_step(error, false)),
                }
            }
            None => match target.run_fresh(&spec).await {
                Ok(()) => {
                    run.driver.fresh_start = true;
                    Ok(Self::succeeded(None))
                }
                Err(error) => Ok(Self::failed_step(error, false)),
            },
        }
    }

    /// Waits until the replacement reports progress of its own (a new epoch, or the end of
    /// training).
    async fn verify(&mut self, run: &mut MigrationRun) -> Result<Event, ControllerError> {
        let target = run.state.target.clone();
        let container = run.new_container.clone();
        let mut stopped_since: Option<Instant> = None;
        loop {
            let progress = self.progress_of(&target, &container);
            if run.driver.fresh_start
                && run.driver.resumed_at.is_none()
                && let Some((_, at)) = progress.starts().next()
            {
                // A fresh process runs training code from its start line on.
                run.driver.resumed_at = Some(at);
                self.worker.shared.push(TimelineEvent::Resumed {
                    at,
                    node: target.clone(),
                    container: container.clone(),
                    checkpoint: None,
                    fresh: true,
                });
            }
            // Progress of the replacement itself: a restored work directory carries the
            // checkpointed process's lines, so only an epoch written since the replacement
            // started (or, if that moment was not seen, since Verifying began) counts.
            let since = run.driver.resumed_at.or_else(|| {
                run.driver
                    .phases
                    .iter()
                    .rev()
                    .find(|(phase, _)| *phase == Phase::Verifying)
                    .map(|(_, at)| *at)
            });
            let progressed = progress
                .epochs()
                .any(|record| since.is_none_or(|since| record.at >= since));
            if progressed || progress.done().is_some() {
                if run.driver.resumed_at.is_none() {
                    // Restored by a controller that died before it saw the restore return.
                    let at = unix_now();
                    run.driver.resumed_at = Some(at);
                    self.worker.shared.push(TimelineEvent::Resumed {
                        at,
                        node: target.clone(),
                        container: container.clone(),
                        checkpoint: run.driver.checkpoint_used.clone(),
                        fresh: run.driver.fresh_start,
                    });
                }
                return Ok(Self::succeeded(None));
            }
            let running = self
                .node(&target)
                .is_ok_and(|node| node.container_running(&self.runtime_id()));
            if running {
                stopped_since = None;
            } else if stopped_since.get_or_insert_with(Instant::now).elapsed()
                > Self::RUNTIME_STATE_GRACE
            {
                return Ok(Self::failed_step(
                    format!("container {container} on {target} stopped without progress"),
                    false,
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn roll_back(
        &mut self,
        run: &mut MigrationRun,
        stop_target: bool,
        action: migration::RollbackAction,
    ) -> Result<Event, ControllerError> {
        use migration::RollbackAction;
        if stop_target {
            self.node(&run.state.target)?
                .remove_container(&self.runtime_id())
                .await?;
        }
        match action {
            RollbackAction::KeepSource => return self.keep_source(run).await,
            RollbackAction::RestoreOnSource => {
                let Some((id, _)) = self.checkpoint_to_use(run) else {
                    return Ok(Self::failed_step(
                        "no checkpoint to restore on the source",
                        false,
                    ));
                };
                let source = Arc::clone(self.node(&run.state.source)?);
                let container = format!(
                    "{}-{}-{}",
                    self.pod.config.pod.name,
                    run.state.source,
                    self.pod.generation + 1
                );
                // Restored already by a controller that died before it recorded so.
                if source.container_running(&self.runtime_id()) {
                    run.new_container = container;
                    return Ok(Self::succeeded(None));
                }
                source.remove_container(&self.runtime_id()).await?;
                source
                    .restore(
                        &self.spec(&container),
                        &id,
                        self.clock.to_real(run.limits.restore),
                    )
                    .await?;
                run.new_container = container;
            }
            RollbackAction::RestartFresh => {
                let spec = self.spec(&run.new_container);
                let target = Arc::clone(self.node(&run.state.target)?);
                // Started already by a controller that died before it recorded so.
                if !target.container_running(&self.runtime_id()) {
                    target.remove_container(&self.runtime_id()).await?;
                    target.run_fresh(&spec).await?;
                }
                run.driver.fresh_start = true;
            }
        }
        Ok(Self::succeeded(None))
    }

    /// The newest restorable checkpoint of the pod that `node`'s store verifies, other than
    /// `except` (one known to be damaged).
    async fn newest_verified(
        &self,
        node: &crate::node::LocalNode,
        except: Option<String>,
    ) -> Option<String> {
        let store = node.store().clone();
        let pod = automigrate_checkpoint::PodKey::new(
            &self.pod.config.pod.namespace,
            &self.pod.config.pod.name,
        );
        tokio::task::spawn_blocking(move || {
            store
                .list(&pod)
                .ok()?
                .into_iter()
                .rev()
                .filter(|stored| {
                    Some(&stored.manifest.id) != except.as_ref()
                        && stored.manifest.kind.restorable()
                })
                .find(|stored| store.verified(&pod, &stored.manifest.id).is_ok())
                .map(|stored| stored.manifest.id)
        })
        .await
        .ok()
        .flatten()
    }

    /// Keeping the source means it must run. A final dump whose step failed (its agent stopped
    /// answering mid-dump, the deadline passed) may still have completed and stopped the
    /// container: then the source is restored from the newest checkpoint its own store
    /// verifies (that dump, if it landed), or started fresh if it has none. A source that
    /// runs, finished its training, or whose node is dead is left as it is.
    async fn keep_source(&mut self, run: &mut MigrationRun) -> Result<Event, ControllerError> {
        let source = Arc::clone(self.node(&run.state.source)?);
        let finished = self
            .progress_of(&run.state.source, &run.old_container)
            .done()
            .is_some();
        if !source.is_alive() || finished || source.container_running(&self.runtime_id()) {
            return Ok(Self::succeeded(None));
        }
        let newest = self.newest_verified(&source, None).await;
        let container = format!(
            "{}-{}-{}",
            self.pod.config.pod.name,
            run.state.source,
            self.pod.generation + 1
        );
        tracing::warn!(
            source = %run.state.source,
            checkpoint = newest.as_deref().unwrap_or("none"),
            "keeping the source: its container is stopped (a final dump completed after its step failed); bringing it back"
        );
        source.remove_container(&self.runtime_id()).await?;
        let spec = self.spec(&container);
        match &newest {
            Some(id) => {
                source
                    .restore(&spec, id, self.clock.to_real(run.limits.restore))
                    .await?;
            }
            None => {
                source.run_fresh(&spec).await?;
                run.driver.fresh_start = true;
            }
        }
        run.new_container = container;
        run.driver.checkpoint_used = newest;
        Ok(Self::succeeded(None))
    }

    fn finish(&mut self, run: MigrationRun) -> MigrationSummary {
        let ended_at = unix_now();
        self.worker.shared.push(TimelineEvent::MigrationEnded {
            at: ended_at,
            phase: run.state.phase,
            message: run.state.message.clone(),
        });
        let finished_at = self.clock.now();
        self.record_outcome(run, ended_at, finished_at)
    }

    /// A finished migration an earlier controller persisted: where it left the pod.
    fn conclude(&mut self, run: MigrationRun) {
        let ended_at = run
            .driver
            .phases
            .last()
            .map(|(_, at)| *at)
            .unwrap_or(run.driver.decided_at);
        let finished_at = run.state.phase_started_at;
        self.record_outcome(run, ended_at, finished_at);
    }

    /// Moves the pod where the migration left it and records the migration.
    fn record_outcome(
        &mut self,
        run: MigrationRun,
        ended_at: f64,
        finished_at: jiff::Timestamp,
    ) -> MigrationSummary {
        use migration::RollbackAction;
        let phase = run.state.phase;
        // Where the pod is now.
        match (phase, run.state.rollback) {
            (Phase::Succeeded | Phase::Restarted, _) => {
                self.pod.node = run.state.target.clone();
                self.pod.container = run.new_container.clone();
                self.pod.generation += 1;
            }
            (Phase::RolledBack, Some(RollbackAction::RestoreOnSource)) => {
                self.pod.container = run.new_container.clone();
                self.pod.generation += 1;
            }
            _ => {}
        }
        self.records.push(MigrationRecord {
            pod: automigrate_core::model::PodRef::new(
                &self.pod.config.pod.namespace,
                &self.pod.config.pod.name,
            ),
            phase,
            source: run.state.source.clone(),
            target: Some(run.state.target.clone()),
            started_at: run.state.started_at,
            finished_at: Some(finished_at),
        });
        let summary = MigrationSummary {
            trigger: format!("{:?}", run.decision.trigger),
            from: run.state.source.clone(),
            to: run.state.target.clone(),
            reason: run.decision.reason.clone(),
            phase,
            decided_at: run.driver.decided_at,
            freeze_started_at: run.driver.freeze_started_at,
            resumed_at: run.driver.resumed_at,
            ended_at,
            old_container: run.old_container.clone(),
            new_container: run.new_container.clone(),
            checkpoint: run.driver.checkpoint_used.clone(),
            fresh_start: run.driver.fresh_start,
            recovery_bytes: run.driver.recovery_bytes,
            state_machine_downtime_s: run
                .state
                .downtime
                .map(|downtime| self.clock.to_real(downtime).as_secs_f64()),
            phases: run.driver.phases.clone(),
            state_file: run.state_file.clone(),
        };
        self.migrations.push(summary.clone());
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automigrate_core::decide::Trigger;
    use automigrate_core::model::PodRef;

    fn persisted(sequence: usize, phase: Phase) -> PersistedMigration {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let mut state = MigrationState::new("node-a".into(), "node-b".into(), true, now, None);
        state.phase = phase;
        PersistedMigration {
            pod: PodKey::new("ml", "trainer"),
            sequence,
            trigger: "NodeDegraded".into(),
            reason: "DiskPressure".into(),
            policy: "default".into(),
            checkpoint: "fresh stop-and-dump".into(),
            old_container: "trainer-node-a-1".into(),
            new_container: "trainer-node-b-2".into(),
            policy_clock_scale: 30,
            limits: Limits::from_policy(&Policy::default()),
            state,
            decision: MigrationDecision {
                pod: PodRef::new("ml", "trainer"),
                from: "node-a".into(),
                to: "node-b".into(),
                trigger: Trigger::NodeDegraded,
                reason: "DiskPressure".into(),
                policy: "default".into(),
                failed_at: None,
                checkpoint: CheckpointSource::Fresh { base: None },
                transfers: Vec::new(),
                candidates: Vec::new(),
                rejected: Default::default(),
            },
            driver: DriverRecord {
                decided_at: 12.5,
                dump_requested_at: Some(13.0),
                in_flight: Some(InFlight {
                    step: Step::Checkpoint,
                    since: 13.0,
                }),
                fallback_checkpoint: Some(StoredChoice {
                    id: "trainer-000002".into(),
                    from: "node-c".into(),
                }),
                phases: vec![(Phase::Syncing, 12.6), (phase, 12.9)],
                ..DriverRecord::default()
            },
        }
    }

    #[test]
    fn persisted_migrations_are_read_back_in_the_order_decided() {
        let dir = tempfile::tempdir().unwrap();
        let migrations = dir.path().join("migrations");
        for (sequence, phase) in [(10, Phase::Checkpointing), (2, Phase::Succeeded)] {
            LocalController::persist(
                &migrations.join(format!("ml-trainer-{sequence}.json")),
                &persisted(sequence, phase),
            )
            .unwrap();
        }
        // A temporary file a kill left behind is no migration.
        std::fs::write(migrations.join("ml-trainer-11.json.tmp"), "{").unwrap();
        let read = PersistedMigration::read_all(dir.path()).unwrap();
        let sequences: Vec<usize> = read.iter().map(|(_, found)| found.sequence).collect();
        assert_eq!(sequences, [2, 10]);
        assert_eq!(read[1].1, persisted(10, Phase::Checkpointing));
        assert!(read[1].0.ends_with("ml-trainer-10.json"));

        std::fs::write(migrations.join("ml-trainer-12.json"), "{").unwrap();
        assert!(matches!(
            PersistedMigration::read_all(dir.path()),
            Err(ControllerError::Load { .. })
        ));
    }

    #[test]
    fn an_empty_state_dir_holds_no_migration() {
        let dir = tempfile::tempdir().unwrap();
        assert!(PersistedMigration::read_all(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn the_driver_record_reads_files_written_before_it_grew() {
        let record: DriverRecord = serde_json::from_str(r#"{"decidedAt": 3.0}"#).unwrap();
        assert_eq!(record.decided_at, 3.0);
        assert_eq!(record.in_flight, None);
        assert_eq!(record.resumed_by, 0);
    }
}
