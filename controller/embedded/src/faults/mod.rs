//! The fault-injection suite: randomized runs of the embedded mode (real runc, CRIU, agent
//! daemons across emulated links) with one fault each, and the verdict of every run.
//!
//! A run is one [`FaultKind`] with parameters drawn from the run's seed ([`FaultPlan`]): when the
//! fault fires (percent of training, migration phase, delay), on which node, how (which file is
//! damaged and where, how much disk is left, whether a killed daemon comes back). Every run builds
//! its own [`LocalCluster`] of agent daemons, trains the deterministic trainer under a
//! [`LocalController`], and a fault task ([`world::FaultContext`]) acts on the world from the
//! outside, triggered only by what it can observe: the migration state JSON the controller
//! persists in `<state dir>/migrations/` (its phase, source, target, checkpoint) and the
//! workload's progress file. Nothing inside the controller is hooked.
//!
//! Each fault kind lives in its own module (`controller_kill`, `agent_kill`, `agent_outage`,
//! `partition`, `target_death`, `disk_full`, `corruption`, `resume_damage`, `policy_edit`); [`world`] holds what they share
//! (the migration watcher, the daemon supervisor, disk and link tools); [`report`] writes the
//! report. Controller-kill runs drive the controller as its own OS process
//! ([`crate::process::ControllerProcess`]); every other run drives it in this process (its
//! policy inbox is how policy edits arrive).
//!
//! After a run [`verdict`] decides, from the measured material only ([`RunRecord`]):
//! - double running: the [`crate::monitor::CopyMonitor`] saw two running copies, or two
//!   containers' progress spans overlap;
//! - corrupted restore: a replacement was restored from a checkpoint the fault damaged;
//! - stuck: a migration that is not in a terminal phase when the run ends, or the run hit its
//!   deadline;
//! - a terminal migration without a reason; files that do not verify (the dataset on every
//!   holder, every checkpoint in every store except the one damaged on purpose); a final loss
//!   that is not bit-identical to the uninterrupted reference; training that did not finish; a
//!   replacement that restarted from zero, or redid more epochs than one checkpoint interval.
//!
//! Any of these is a finding; runs are never dropped from the report.

pub mod agent_kill;
pub mod agent_outage;
pub mod controller_kill;
pub mod corruption;
pub mod disk_full;
pub mod partition;
pub mod policy_edit;
pub mod report;
pub mod resume_damage;
pub mod target_death;
pub mod world;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_core::PolicySet;
use automigrate_core::migration::Phase;
use serde::{Deserialize, Serialize};

use crate::cluster::LocalCluster;
use crate::controller::{ControllerOptions, LocalController, Recovery, TimelineEvent, unix_now};
use crate::monitor::{CopyMonitor, CopyReport};
use crate::scenario::{
    self, ContainerRun, DemoSettings, HOME_NODE, POD_NAME, POD_NAMESPACE, RunResult, ScenarioError,
};
use crate::workload::{self, SplitMix};

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Scenario(#[from] Box<ScenarioError>),
    #[error("{0}")]
    Setup(String),
    #[error("unknown fault kind `{0}`: expected one of {1}")]
    UnknownKind(String, String),
}

impl From<ScenarioError> for FaultError {
    fn from(error: ScenarioError) -> Self {
        Self::Scenario(Box::new(error))
    }
}

/// What is done to the system in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` of the controller process in a migration phase, then a new one started.
    ControllerKill,
    /// `kill -9` of the source node's agent daemon while the final checkpoint moves.
    SourceAgentKill,
    /// `kill -9` of the target node's agent daemon while the final checkpoint moves.
    TargetAgentKill,
    /// The source node is cut off (links and control plane) but alive: its workload runs on.
    SourcePartition,
    /// The target node dies while the replacement is being restored.
    TargetDeath,
    /// The target's disk fills up when the migration starts.
    TargetDiskFull,
    /// A stored checkpoint is truncated or bit-flipped on disk.
    CorruptAtRest,
    /// A checkpoint file is damaged as it lands on the receiver.
    CorruptInFlight,
    /// The pod's policy is edited (validly) during a migration.
    PolicyEditValid,
    /// An invalid edit of the pod's policy arrives during a migration.
    PolicyEditInvalid,
    /// The source's agent, the target's, or both stop answering for 5–30 s in a phase.
    AgentOutage,
    /// Pieces the receiver journaled are damaged, then the transfer resumes.
    ResumeDamage,
}

impl FaultKind {
    pub const ALL: [FaultKind; 12] = [
        FaultKind::ControllerKill,
        FaultKind::SourceAgentKill,
        FaultKind::TargetAgentKill,
        FaultKind::SourcePartition,
        FaultKind::TargetDeath,
        FaultKind::TargetDiskFull,
        FaultKind::CorruptAtRest,
        FaultKind::CorruptInFlight,
        FaultKind::PolicyEditValid,
        FaultKind::PolicyEditInvalid,
        FaultKind::AgentOutage,
        FaultKind::ResumeDamage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ControllerKill => "controller-kill",
            FaultKind::SourceAgentKill => "source-agent-kill",
            FaultKind::TargetAgentKill => "target-agent-kill",
            FaultKind::SourcePartition => "source-partition",
            FaultKind::TargetDeath => "target-death",
            FaultKind::TargetDiskFull => "target-disk-full",
            FaultKind::CorruptAtRest => "corrupt-at-rest",
            FaultKind::CorruptInFlight => "corrupt-in-flight",
            FaultKind::PolicyEditValid => "policy-edit-valid",
            FaultKind::PolicyEditInvalid => "policy-edit-invalid",
            FaultKind::AgentOutage => "agent-outage",
            FaultKind::ResumeDamage => "resume-damage",
        }
    }

    /// Short tag for run names (namespaces are named after them).
    fn tag(self) -> &'static str {
        match self {
            FaultKind::ControllerKill => "ck",
            FaultKind::SourceAgentKill => "sak",
            FaultKind::TargetAgentKill => "tak",
            FaultKind::SourcePartition => "sp",
            FaultKind::TargetDeath => "td",
            FaultKind::TargetDiskFull => "tdf",
            FaultKind::CorruptAtRest => "car",
            FaultKind::CorruptInFlight => "cif",
            FaultKind::PolicyEditValid => "pev",
            FaultKind::PolicyEditInvalid => "pei",
            FaultKind::AgentOutage => "ao",
            FaultKind::ResumeDamage => "rd",
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FaultKind {
    type Err = FaultError;
    fn from_str(text: &str) -> Result<Self, FaultError> {
        FaultKind::ALL
            .into_iter()
            .find(|kind| kind.name() == text)
            .ok_or_else(|| {
                FaultError::UnknownKind(
                    text.to_string(),
                    FaultKind::ALL.map(FaultKind::name).join(", "),
                )
            })
    }
}

/// How the run provokes the migration the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Trigger {
    /// The home node reports `DiskPressure`: a live source, moved with a fresh final dump.
    Degradation,
    /// The home node fails hard: the newest stored checkpoint is restored elsewhere.
    NodeFailure,
    /// The fault itself (a partition) is what the engine answers.
    TheFault,
}

/// Which node's agent daemon a kill strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Side {
    Source,
    Target,
}

/// Whose agent daemons an outage freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OutageSides {
    Source,
    Target,
    Both,
}

/// How a file is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "mode")]
pub enum Damage {
    /// Cut to `keep_permille` ‰ of its length.
    #[serde(rename_all = "camelCase")]
    Truncate { keep_permille: u32 },
    /// One bit flipped at `offset_permille` ‰ of its length.
    #[serde(rename_all = "camelCase")]
    BitFlip { offset_permille: u32, bit: u8 },
}

/// Where a checkpoint is damaged at rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RestPlace {
    /// The newest standby copy, just before the home node fails (it is what will be restored).
    Standby,
    /// The final checkpoint once it is in the target's store, before the restore.
    Target,
}

/// The drawn parameters of one run's fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "fault")]
pub enum FaultParams {
    #[serde(rename_all = "camelCase")]
    AgentKill {
        side: Side,
        /// The migration phase the kill waits for.
        phase: Phase,
        delay_ms: u64,
        /// The daemon's supervisor starts it again after this long; `None`: it stays dead.
        restart_after_ms: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    ControllerKill {
        /// The migration phase the kill aims at.
        phase: Phase,
        /// The controller pauses this long before that phase's step.
        pause_ms: u64,
        /// The kill comes this long after the phase is seen.
        delay_ms: u64,
        /// A new controller process starts this long after the kill.
        restart_after_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    Partition {
        /// The partition heals after this long; `None`: not before training ends.
        heal_after_ms: Option<u64>,
    },
    #[serde(rename_all = "camelCase")]
    AgentOutage {
        sides: OutageSides,
        /// The migration phase the outage waits for.
        phase: Phase,
        delay_ms: u64,
        /// How long the daemons stay frozen.
        outage_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    ResumeDamage {
        /// The receiver's agent is killed and started again too, after the damage.
        restart_receiver: bool,
        /// The sender is killed once this many bytes have landed in the receiver's staging.
        min_bytes: u64,
        /// The agent's supervisor starts it again after this long.
        restart_after_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    TargetDeath { delay_ms: u64 },
    #[serde(rename_all = "camelCase")]
    DiskFull {
        /// Space left on the target once it is filled.
        free_kib: u64,
        /// The target's kubelet then reports `DiskPressure`.
        kubelet_reports: bool,
    },
    #[serde(rename_all = "camelCase")]
    CorruptAtRest {
        place: RestPlace,
        damage: Damage,
        /// Which file of the checkpoint (index into its files, largest first, modulo count).
        file_pick: u32,
    },
    #[serde(rename_all = "camelCase")]
    CorruptInFlight { offset_permille: u32, bit: u8 },
    #[serde(rename_all = "camelCase")]
    PolicyEdit {
        /// The migration phase the edit arrives in.
        phase: Phase,
        /// Which of the prepared edits (valid or invalid per the kind).
        edit: u32,
    },
}

/// One run of the suite, fully decided by the suite seed and the run's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultPlan {
    pub index: usize,
    pub kind: FaultKind,
    pub seed: u64,
    pub trigger: Trigger,
    /// When the trigger fires, percent of the epochs.
    pub percent: u32,
    pub params: FaultParams,
}

impl FaultPlan {
    pub fn name(&self) -> String {
        format!("f{:03}-{}", self.index, self.kind.tag())
    }

    /// One line for logs and the report.
    pub fn describe(&self) -> String {
        let params = serde_json::to_string(&self.params).unwrap_or_default();
        format!(
            "{} trigger={:?} at {} % seed={:#x} {params}",
            self.kind, self.trigger, self.percent, self.seed
        )
    }
}

/// A small deterministic generator for the plans.
#[derive(Debug, Clone)]
pub struct Draw(SplitMix);

impl Draw {
    pub fn new(seed: u64) -> Self {
        Self(SplitMix(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low + 1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(1, 100) <= percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            return None;
        }
        let index = (self.next_u64() % items.len() as u64) as usize;
        items.get(index).copied()
    }
}

/// The plans of a suite: kinds in rounds (every kind once per round, in an order the seed
/// shuffles), each run's parameters from its own seed.
pub fn plan_runs(seed: u64, runs: usize, kinds: &[FaultKind]) -> Vec<FaultPlan> {
    let mut suite = Draw::new(seed);
    let mut plans = Vec::with_capacity(runs);
    let mut round: Vec<FaultKind> = Vec::new();
    for index in 0..runs {
        if round.is_empty() {
            round = kinds.to_vec();
            // Fisher-Yates, popped from the back.
            for i in (1..round.len()).rev() {
                let j = (suite.next_u64() % (i as u64 + 1)) as usize;
                round.swap(i, j);
            }
        }
        let Some(kind) = round.pop() else { break };
        let run_seed = suite.next_u64();
        plans.push(draw_plan(index, kind, run_seed));
    }
    plans
}

fn draw_plan(index: usize, kind: FaultKind, seed: u64) -> FaultPlan {
    let mut draw = Draw::new(seed);
    let (trigger, params) = match kind {
        FaultKind::ControllerKill => controller_kill::draw(&mut draw),
        FaultKind::SourceAgentKill | FaultKind::TargetAgentKill => {
            agent_kill::draw(&mut draw, kind == FaultKind::SourceAgentKill)
        }
        FaultKind::SourcePartition => partition::draw(&mut draw),
        FaultKind::TargetDeath => target_death::draw(&mut draw),
        FaultKind::TargetDiskFull => disk_full::draw(&mut draw),
        FaultKind::CorruptAtRest => corruption::draw_at_rest(&mut draw),
        FaultKind::CorruptInFlight => corruption::draw_in_flight(&mut draw),
        FaultKind::PolicyEditValid | FaultKind::PolicyEditInvalid => policy_edit::draw(&mut draw),
        FaultKind::AgentOutage => agent_outage::draw(&mut draw),
        FaultKind::ResumeDamage => resume_damage::draw(&mut draw),
    };
    FaultPlan {
        index,
        kind,
        seed,
        trigger,
        percent: draw.range(20, 55) as u32,
        params,
    }
}

/// What the suite runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuiteSettings {
    /// Cluster, workload, policy and clock settings, shared with the demo.
    pub demo: DemoSettings,
    pub seed: u64,
    pub runs: usize,
    pub kinds: Vec<FaultKind>,
    /// A run that has not finished training by then is stopped and counted stuck.
    pub run_deadline_s: u64,
    /// Size of the tmpfs each non-home node's storage lives on in disk-full runs.
    pub disk_mib: u64,
}

/// The suite's standard settings: short runs (a few seconds of training, a checkpoint every
/// second of real time) on 3 nodes with agent daemons.
pub fn standard_settings(
    root: PathBuf,
    policies_dir: PathBuf,
    agent_binary: PathBuf,
    seed: u64,
    runs: usize,
    kinds: Vec<FaultKind>,
) -> SuiteSettings {
    let mut demo = crate::demo::DemoPlan::standard(root, policies_dir).settings;
    demo.nodes = 3;
    demo.dataset = workload::DatasetSpec {
        name: "faults".into(),
        files: 4,
        rows_per_file: 4096,
        features: 32,
        classes: 4,
        seed: 5,
    };
    demo.trainer = workload::TrainerSpec {
        epochs: 64,
        hidden: 128,
        seed: 3,
        learning_rate: 0.05,
    };
    // 1 s of real time at scale 30.
    demo.checkpoint_interval = "30s".into();
    demo.agent = crate::cluster::AgentMode::Daemon {
        binary: agent_binary,
    };
    demo.keep = false;
    SuiteSettings {
        demo,
        seed,
        runs,
        kinds,
        run_deadline_s: 150,
        disk_mib: 512,
    }
}

/// One migration as the run ended with it (from its persisted state file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationOutcome {
    pub file: String,
    pub trigger: String,
    pub source: String,
    pub target: String,
    pub phase: Phase,
    pub message: Option<String>,
    pub checkpoint: Option<String>,
    pub fresh_start: Option<bool>,
    pub old_container: String,
    pub new_container: String,
}

/// What was done to the system, as the fault task recorded it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Injection {
    /// Unix time the fault struck.
    pub at: Option<f64>,
    /// The last epoch the workload had reported then.
    pub epoch: Option<u32>,
    /// The migration phase observed right before and right after the fault.
    pub phase_before: Option<Phase>,
    pub phase_after: Option<Phase>,
    pub node: Option<String>,
    /// A checkpoint the fault damaged on purpose: (node, id).
    pub damaged_checkpoint: Option<(String, String)>,
    /// What happened, step by step.
    pub notes: Vec<String>,
    /// Policy edits: the policy that must be in force at the end (its JSON form).
    pub expected_policy: Option<String>,
    /// Checkpoints listed on live nodes other than the home node when the fault struck
    /// (`<id> on <node>`): what a replacement could resume from.
    pub checkpoints_at_strike: Vec<String>,
}

/// One run's measured outcome and verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub plan: FaultPlan,
    pub name: String,
    pub started_at: f64,
    pub wall_s: f64,
    pub load_average: (String, String),
    pub injection: Injection,
    /// Did the fault strike at all (its trigger was seen before training ended)?
    pub fault_fired: bool,
    pub migrations: Vec<MigrationOutcome>,
    /// The migrations' end phases, joined (`none` without migrations).
    pub outcome: String,
    pub controller_error: Option<String>,
    pub deadline_hit: bool,
    pub training_finished: bool,
    pub final_epoch: Option<u32>,
    pub final_loss_hex: Option<String>,
    pub loss_identical: bool,
    /// Per replacement: the last epoch it did not compute again (0: from the beginning).
    pub resumed_from: Vec<u32>,
    /// Replacements started from the beginning (not restored).
    pub fresh_starts: usize,
    /// Per replacement: epochs of work the fault cost (the epoch reported when it struck, or
    /// the replaced container's last one, minus where the replacement resumed).
    pub redone_epochs: Vec<u32>,
    /// One checkpoint interval, one controller pass and the longest replication lag seen, in
    /// epochs, plus one.
    pub redone_allowed: u32,
    /// Longest time from a periodic checkpoint's start to its standby copy being complete.
    pub replication_lag_s: Option<f64>,
    pub copies: CopyReport,
    pub progress_overlap: bool,
    pub verification_problems: Vec<String>,
    pub checkpoints_verified: usize,
    /// Checkpoints other live nodes held when the fault struck, the damaged one excepted
    /// (what a replacement could resume from).
    pub resumable_before_fault: Vec<String>,
    pub datasets_verified: usize,
    /// Lines in the agents' logs saying a received piece, file or archive did not verify.
    pub receiver_refusals: usize,
    pub policy_in_force: Option<String>,
    pub findings: Vec<String>,
}

impl RunRecord {
    fn not_carried_out(plan: &FaultPlan, error: &FaultError, took: Duration) -> Self {
        Self {
            plan: plan.clone(),
            name: plan.name(),
            started_at: unix_now() - took.as_secs_f64(),
            wall_s: took.as_secs_f64(),
            load_average: (scenario::load_average(), scenario::load_average()),
            injection: Injection::default(),
            fault_fired: false,
            migrations: Vec::new(),
            outcome: "not run".into(),
            controller_error: None,
            deadline_hit: false,
            training_finished: false,
            final_epoch: None,
            final_loss_hex: None,
            loss_identical: false,
            resumed_from: Vec::new(),
            redone_epochs: Vec::new(),
            fresh_starts: 0,
            redone_allowed: 0,
            replication_lag_s: None,
            copies: CopyReport::default(),
            progress_overlap: false,
            verification_problems: Vec::new(),
            checkpoints_verified: 0,
            resumable_before_fault: Vec::new(),
            datasets_verified: 0,
            receiver_refusals: 0,
            policy_in_force: None,
            findings: vec![format!("the run could not be carried out: {error}")],
        }
    }

    pub fn double_running(&self) -> bool {
        self.copies.max_running > 1 || !self.copies.overlaps.is_empty() || self.progress_overlap
    }

    pub fn corrupted_restore(&self) -> bool {
        self.findings
            .iter()
            .any(|finding| finding.starts_with(CORRUPTED_RESTORE))
    }

    pub fn stuck(&self) -> bool {
        self.findings
            .iter()
            .any(|finding| finding.starts_with(STUCK))
    }
}

const CORRUPTED_RESTORE: &str = "corrupted restore";
const STUCK: &str = "stuck";

/// The suite's reference: the uninterrupted run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    pub loss_hex: String,
    pub training_s: f64,
    pub epoch_s: f64,
}

impl Reference {
    pub fn from_run(run: &RunResult) -> Result<Self, FaultError> {
        let (Some(loss_hex), Some(training_s)) = (run.final_loss_hex.clone(), run.training_s)
        else {
            return Err(FaultError::Setup(
                "the reference run did not finish its training".into(),
            ));
        };
        Ok(Self {
            loss_hex,
            training_s,
            epoch_s: training_s / f64::from(run.epochs.max(1)),
        })
    }
}

/// Runs the uninterrupted reference, then every plan; after each run `progress` gets the
/// reference and every record so far (to print, or to write a partial report). A run that
/// could not be carried out (its cluster did not come up) is kept as a record with that finding.
pub async fn run_suite(
    settings: &SuiteSettings,
    policies: &PolicySet,
    mut progress: impl FnMut(&Reference, &[RunRecord]),
) -> Result<(Reference, Vec<RunRecord>), FaultError> {
    let reference_run = scenario::reference_run(&settings.demo).await?;
    let reference = Reference::from_run(&reference_run)?;
    let plans = plan_runs(settings.seed, settings.runs, &settings.kinds);
    let mut records = Vec::with_capacity(plans.len());
    for plan in plans {
        let started = Instant::now();
        let record = match run_one(settings, policies, &reference, &plan).await {
            Ok(record) => record,
            Err(error) => RunRecord::not_carried_out(&plan, &error, started.elapsed()),
        };
        records.push(record);
        progress(&reference, &records);
    }
    Ok((reference, records))
}

/// One run: cluster, training under the controller, the fault, the verdict.
#[tracing::instrument(name = "fault_run", skip_all, fields(run = %plan.name()))]
pub async fn run_one(
    settings: &SuiteSettings,
    policies: &PolicySet,
    reference: &Reference,
    plan: &FaultPlan,
) -> Result<RunRecord, FaultError> {
    let demo = &settings.demo;
    let name = plan.name();
    let started = Instant::now();
    let started_at = unix_now();
    let load_at_start = scenario::load_average();
    world::unmount_leftovers(&demo.root.join(&name));
    scenario::prepare_run_dir(demo, &name)?;
    let config = demo.cluster_config(&name);
    let mounts = if plan.kind == FaultKind::TargetDiskFull {
        world::mount_small_disks(&config, HOME_NODE, settings.disk_mib)
            .map_err(FaultError::Setup)?
    } else {
        Vec::new()
    };
    let cluster = match LocalCluster::create(config).await {
        Ok(cluster) => Arc::new(cluster),
        Err(error) => {
            world::unmount(&mounts);
            return Err(ScenarioError::from(error).into());
        }
    };
    let outcome = drive(settings, policies, plan, &cluster).await;
    let (mut record, damaged) = match outcome {
        Ok(parts) => parts,
        Err(error) => {
            world::unmount(&mounts);
            return Err(error);
        }
    };
    let cluster = Arc::try_unwrap(cluster).map_err(|_| {
        FaultError::Setup(format!(
            "run {name}: the cluster is still shared at the end of the run"
        ))
    })?;
    if let Err(error) = cluster.teardown().await {
        tracing::warn!(%error, "teardown");
    }
    if demo.keep {
        // What lived on the small disks goes with them: keep their logs.
        world::keep_logs(&mounts);
    }
    world::unmount(&mounts);
    // A restore killed half-way (a node dying under it) can leave CRIU's mounts behind.
    world::unmount_leftovers(&demo.root.join(&name));
    if !demo.keep
        && let Err(error) = std::fs::remove_dir_all(demo.root.join(&name))
    {
        tracing::warn!(%error, "run storage left behind");
    }
    record.name = name;
    record.started_at = started_at;
    record.wall_s = started.elapsed().as_secs_f64();
    record.load_average = (load_at_start, scenario::load_average());
    verdict(&mut record, reference, demo, damaged.as_ref());
    Ok(record)
}

/// What a run's controller left behind, however it ran.
struct Ran {
    copies: CopyReport,
    controller_error: Option<String>,
    deadline_hit: bool,
    timeline: Vec<TimelineEvent>,
    holders: std::collections::BTreeSet<String>,
    policy_in_force: Option<String>,
    /// Checkpoint restored and fresh start, by state file name (in-process controllers).
    restored: BTreeMap<String, (Option<String>, bool)>,
}

/// Everything between the cluster's creation and its teardown.
async fn drive(
    settings: &SuiteSettings,
    policies: &PolicySet,
    plan: &FaultPlan,
    cluster: &Arc<LocalCluster>,
) -> Result<(RunRecord, Option<(String, String)>), FaultError> {
    let demo = &settings.demo;
    let home = Arc::clone(cluster.node(HOME_NODE).map_err(ScenarioError::from)?);
    let meta =
        workload::generate_dataset(&home.layout().dataset(&demo.dataset.name), &demo.dataset)
            .map_err(ScenarioError::from)?;
    let clock = crate::clock::PolicyClock::start(demo.time_scale).map_err(ScenarioError::from)?;
    let state_dir = demo.root.join(plan.name()).join("controller");
    let home_progress = home.layout().progress(&format!("{POD_NAME}-{HOME_NODE}-1"));
    let limit = Duration::from_secs(settings.run_deadline_s);
    let (context, ran) = if plan.kind == FaultKind::ControllerKill {
        drive_process(
            settings,
            plan,
            cluster,
            meta,
            clock,
            &state_dir,
            home_progress,
            limit,
        )
        .await?
    } else {
        let mut controller = LocalController::new(
            Arc::clone(cluster),
            policies.clone(),
            clock,
            demo.pod(&demo.failure_policy, &[]),
            meta,
            HOME_NODE,
            ControllerOptions {
                tick: Duration::from_millis(demo.tick_ms),
                recovery: Recovery::Resume,
                state_dir: state_dir.clone(),
            },
        )
        .with_dataset_origin(demo.dataset.clone());
        let monitor = CopyMonitor::start(cluster.nodes().to_vec(), Duration::from_millis(20));
        controller.deploy().await.map_err(ScenarioError::from)?;
        let context = world::FaultContext::new(
            Arc::clone(cluster),
            Some(controller.shared()),
            controller.policy_edits_handle(),
            state_dir.clone(),
            home_progress,
            demo.trainer.epochs,
            demo.policies_dir.clone(),
            demo.failure_policy.clone(),
        );
        let task = tokio::spawn(inject(context.clone(), plan.clone(), None));
        let outcome = tokio::time::timeout(limit, controller.run_until(|_| false)).await;
        task.abort();
        // Undo what outlives the fault (a partition, a full disk, restarted daemons) first.
        context.heal().await;
        let (controller_error, deadline_hit) = match outcome {
            Ok(Ok(())) => (None, false),
            Ok(Err(error)) => (Some(error.to_string()), false),
            Err(_) => (None, true),
        };
        let ran = Ran {
            copies: monitor.stop(),
            controller_error,
            deadline_hit,
            timeline: controller.timeline(),
            holders: controller.dataset_holders(),
            policy_in_force: controller
                .policies()
                .get(&demo.failure_policy)
                .and_then(|policy| serde_json::to_string(policy).ok()),
            restored: controller
                .migrations()
                .iter()
                .filter_map(|summary| {
                    let file = summary
                        .state_file
                        .file_name()?
                        .to_string_lossy()
                        .into_owned();
                    Some((file, (summary.checkpoint.clone(), summary.fresh_start)))
                })
                .collect(),
        };
        (context, ran)
    };
    collect(plan, cluster, &demo.dataset.name, &state_dir, &context, ran).await
}

/// The controller as its own process (controller-kill runs), killed and restarted by the
/// fault task.
#[allow(clippy::too_many_arguments)]
async fn drive_process(
    settings: &SuiteSettings,
    plan: &FaultPlan,
    cluster: &Arc<LocalCluster>,
    meta: workload::DatasetMeta,
    clock: crate::clock::PolicyClock,
    state_dir: &Path,
    home_progress: PathBuf,
    limit: Duration,
) -> Result<(world::FaultContext, Ran), FaultError> {
    use crate::process::{ControllerLaunch, ControllerProcess, StepDelay};
    let demo = &settings.demo;
    let mut launch = ControllerLaunch::new(
        cluster,
        state_dir.to_path_buf(),
        demo.policies_dir.clone(),
        clock.anchor(),
        demo.pod(&demo.failure_policy, &[]),
        meta,
        HOME_NODE,
    );
    launch.dataset_origin = Some(demo.dataset.clone());
    launch.tick_ms = demo.tick_ms;
    if let FaultParams::ControllerKill {
        phase, pause_ms, ..
    } = plan.params
    {
        launch.step_delay = Some(StepDelay {
            phase,
            millis: pause_ms,
        });
    }
    let monitor = CopyMonitor::start(cluster.nodes().to_vec(), Duration::from_millis(20));
    let process = ControllerProcess::spawn(cluster, launch)
        .map_err(|error| FaultError::Setup(error.to_string()))?;
    let process = Arc::new(tokio::sync::Mutex::new(process));
    let context = world::FaultContext::new(
        Arc::clone(cluster),
        None,
        Arc::default(),
        state_dir.to_path_buf(),
        home_progress,
        demo.trainer.epochs,
        demo.policies_dir.clone(),
        demo.failure_policy.clone(),
    );
    let task = tokio::spawn(inject(
        context.clone(),
        plan.clone(),
        Some(Arc::clone(&process)),
    ));
    let deadline = Instant::now() + limit;
    let mut deadline_hit = false;
    loop {
        {
            let mut process = process.lock().await;
            if !process.is_running() {
                break;
            }
            if Instant::now() > deadline {
                deadline_hit = true;
                let _ = process.kill9();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    context.heal().await;
    let exit = process.lock().await.exit_record();
    let controller_error = match &exit {
        Some(record) if record.training_done => None,
        Some(record) => Some(record.error.clone().unwrap_or_else(|| "stopped".into())),
        None if deadline_hit => None,
        None => Some("the controller process ended without an exit record".into()),
    };
    let ran = Ran {
        copies: monitor.stop(),
        controller_error,
        deadline_hit,
        timeline: crate::worker::read_timeline(state_dir),
        holders: world::read_holders(state_dir),
        policy_in_force: None,
        restored: BTreeMap::new(),
    };
    Ok((context, ran))
}

/// Reads the run's outcome from the world and the controller's record.
async fn collect(
    plan: &FaultPlan,
    cluster: &Arc<LocalCluster>,
    dataset: &str,
    state_dir: &Path,
    context: &world::FaultContext,
    ran: Ran,
) -> Result<(RunRecord, Option<(String, String)>), FaultError> {
    let containers = scenario::progress_of_all(cluster);
    let injection = context.injection();
    let mut migrations = world::read_migrations(state_dir);
    for migration in &mut migrations {
        if let Some((checkpoint, fresh)) = ran.restored.get(&migration.file) {
            migration.checkpoint = checkpoint.clone().or(migration.checkpoint.take());
            migration.fresh_start = Some(*fresh);
        }
    }
    let damaged = injection.damaged_checkpoint.clone();
    let verification = tokio::task::spawn_blocking({
        let cluster = Arc::clone(cluster);
        let dataset = dataset.to_string();
        let holders = ran.holders.clone();
        let damaged = damaged.clone();
        move || world::verify_files(&cluster, &dataset, &holders, damaged.as_ref())
    })
    .await
    .map_err(|error| FaultError::Setup(format!("verification task: {error}")))?;
    let finisher = containers.iter().find(|run| run.done);
    let last = finisher.and_then(|run| run.progress.last_epoch().cloned());
    let (resumed_from, redone_epochs, fresh_starts) =
        replacements(&containers, &migrations, injection.epoch);
    let damaged_name = damaged.as_ref().map(|(node, id)| format!("{id} on {node}"));
    let resumable_before_fault: Vec<String> = injection
        .checkpoints_at_strike
        .iter()
        .filter(|listed| Some(*listed) != damaged_name.as_ref())
        .cloned()
        .collect();
    let replication_lag_s = replication_lag(&ran.timeline);
    let mut record = RunRecord {
        plan: plan.clone(),
        name: String::new(),
        started_at: 0.0,
        wall_s: 0.0,
        load_average: (String::new(), String::new()),
        fault_fired: injection.at.is_some(),
        injection,
        outcome: outcome_of(&migrations),
        migrations,
        controller_error: ran.controller_error,
        deadline_hit: ran.deadline_hit,
        training_finished: finisher.is_some(),
        final_epoch: last.as_ref().map(|record| record.epoch),
        final_loss_hex: last.map(|record| record.loss_hex),
        loss_identical: false,
        resumed_from,
        redone_epochs,
        fresh_starts,
        redone_allowed: 0,
        replication_lag_s,
        copies: ran.copies,
        progress_overlap: scenario::spans_overlap(&containers),
        verification_problems: verification.problems,
        checkpoints_verified: verification.checkpoints,
        resumable_before_fault,
        datasets_verified: verification.datasets,
        receiver_refusals: world::receiver_refusals(cluster),
        policy_in_force: ran.policy_in_force,
        findings: Vec::new(),
    };
    record.injection.notes.extend(policy_notes(&ran.timeline));
    Ok((record, damaged))
}

/// Runs the plan's fault.
async fn inject(
    context: world::FaultContext,
    plan: FaultPlan,
    controller: Option<Arc<tokio::sync::Mutex<crate::process::ControllerProcess>>>,
) {
    let outcome = match &plan.params {
        FaultParams::ControllerKill { .. } => match controller {
            Some(controller) => controller_kill::inject(&context, &plan, controller).await,
            None => Err("the controller does not run as its own process".into()),
        },
        FaultParams::AgentKill { .. } => agent_kill::inject(&context, &plan).await,
        FaultParams::AgentOutage { .. } => agent_outage::inject(&context, &plan).await,
        FaultParams::ResumeDamage { .. } => resume_damage::inject(&context, &plan).await,
        FaultParams::Partition { .. } => partition::inject(&context, &plan).await,
        FaultParams::TargetDeath { .. } => target_death::inject(&context, &plan).await,
        FaultParams::DiskFull { .. } => disk_full::inject(&context, &plan).await,
        FaultParams::CorruptAtRest { .. } => corruption::inject_at_rest(&context, &plan).await,
        FaultParams::CorruptInFlight { .. } => corruption::inject_in_flight(&context, &plan).await,
        FaultParams::PolicyEdit { .. } => policy_edit::inject(&context, &plan).await,
    };
    if let Err(reason) = outcome {
        context.note(format!("fault not injected: {reason}"));
    }
}

/// Policy edits the controller applied or refused, for the record.
fn policy_notes(timeline: &[TimelineEvent]) -> Vec<String> {
    timeline
        .iter()
        .filter_map(|event| match event {
            TimelineEvent::PolicyEdited {
                name,
                accepted,
                message,
                ..
            } => Some(format!(
                "controller {} the edit of policy `{name}`{}",
                if *accepted { "applied" } else { "refused" },
                message
                    .as_ref()
                    .map(|message| format!(": {message}"))
                    .unwrap_or_default()
            )),
            _ => None,
        })
        .collect()
}

/// The migrations' end phases in order, repeats counted: `Failed×3+Succeeded`.
fn outcome_of(migrations: &[MigrationOutcome]) -> String {
    if migrations.is_empty() {
        return "none".into();
    }
    let mut parts: Vec<(Phase, usize)> = Vec::new();
    for migration in migrations {
        match parts.last_mut() {
            Some((phase, count)) if *phase == migration.phase => *count += 1,
            _ => parts.push((migration.phase, 1)),
        }
    }
    parts
        .iter()
        .map(|(phase, count)| {
            if *count > 1 {
                format!("{phase}×{count}")
            } else {
                phase.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("+")
}

/// Replacements started from the beginning: the controller's own record of each migration
/// that ended with its replacement running (a restore from a checkpoint taken before the first
/// epoch also starts at epoch 1, but is not a fresh start).
fn fresh_starts_of(migrations: &[MigrationOutcome]) -> usize {
    let mut fresh = std::collections::BTreeSet::new();
    for migration in migrations {
        if migration.fresh_start == Some(true)
            && matches!(migration.phase, Phase::Succeeded | Phase::Restarted)
        {
            fresh.insert(migration.new_container.as_str());
        }
    }
    fresh.len()
}

/// Judges the runs of a written report again with this build's rules (the measured fields
/// stay as they were): for a report whose runs were judged by an earlier rule.
pub fn rejudge(report: &mut report::SuiteReport) {
    for run in &mut report.runs {
        if run.outcome == "not run" {
            continue;
        }
        run.fresh_starts = fresh_starts_of(&run.migrations);
        run.outcome = outcome_of(&run.migrations);
        let damaged = run.injection.damaged_checkpoint.clone();
        verdict(
            run,
            &report.reference,
            &report.settings.demo,
            damaged.as_ref(),
        );
    }
    report::recount(report);
}

/// The longest time from a periodic checkpoint's start until its standby copy was complete.
fn replication_lag(timeline: &[TimelineEvent]) -> Option<f64> {
    let mut lag: Option<f64> = None;
    for event in timeline {
        let TimelineEvent::Checkpoint { at, id, kind, .. } = event else {
            continue;
        };
        if kind != "periodic" {
            continue;
        }
        let what = format!("checkpoint {id}");
        let copied = timeline.iter().find_map(|event| match event {
            TimelineEvent::Transfer {
                at: sent_at,
                what: sent,
                purpose: crate::controller::Purpose::Replication,
                error: None,
                took_ms,
                ..
            } if *sent == what => Some(sent_at + took_ms / 1000.0 - at),
            _ => None,
        });
        if let Some(copied) = copied {
            lag = Some(lag.map_or(copied, |lag| lag.max(copied)));
        }
    }
    lag
}

/// For every migration whose replacement reported progress: the epoch it resumed after, and
/// the epochs of work lost: those reported when the fault struck (`fault_epoch`; else the
/// replaced container's last) minus where the replacement resumed.
fn replacements(
    containers: &[ContainerRun],
    migrations: &[MigrationOutcome],
    fault_epoch: Option<u32>,
) -> (Vec<u32>, Vec<u32>, usize) {
    let by_name: BTreeMap<&str, &ContainerRun> = containers
        .iter()
        .map(|run| (run.container.as_str(), run))
        .collect();
    let mut resumed = Vec::new();
    let mut redone = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for migration in migrations {
        // Failed attempts name the replacement they would have started; count it once.
        if !seen.insert(migration.new_container.as_str()) {
            continue;
        }
        let Some(new) = by_name.get(migration.new_container.as_str()) else {
            continue;
        };
        if new.container == migration.old_container {
            continue;
        }
        let from = if new.started_fresh {
            0
        } else {
            new.first_epoch.map_or(0, |epoch| epoch.saturating_sub(1))
        };
        if new.first_epoch.is_none() && !new.done {
            continue;
        }
        resumed.push(from);
        let old_last = by_name
            .get(migration.old_container.as_str())
            .and_then(|old| old.last_epoch);
        if let Some(lost_from) = fault_epoch.or(old_last) {
            redone.push(
                lost_from
                    .min(old_last.unwrap_or(lost_from))
                    .saturating_sub(from),
            );
        }
    }
    (resumed, redone, fresh_starts_of(migrations))
}

/// Decides the findings of a finished run.
fn verdict(
    record: &mut RunRecord,
    reference: &Reference,
    demo: &DemoSettings,
    damaged: Option<&(String, String)>,
) {
    let mut findings = Vec::new();
    // One checkpoint interval of real time, one controller pass (a checkpoint that falls due
    // between passes starts at the next one) and the longest replication lag of the run, in
    // epochs, plus the epoch in flight.
    let interval_s = automigrate_core::units::parse_duration(&demo.checkpoint_interval)
        .map(|interval| interval.as_secs_f64() / f64::from(demo.time_scale.max(1)))
        .unwrap_or(1.0);
    let pass_s = Duration::from_millis(demo.tick_ms).as_secs_f64();
    let window_s = interval_s + pass_s + record.replication_lag_s.unwrap_or(0.0);
    record.redone_allowed = (window_s / reference.epoch_s.max(1e-3)).ceil() as u32 + 1;
    if record.double_running() {
        findings.push(format!(
            "double running: at most {} copies ran at once; {} overlapping samples; progress spans overlap: {}",
            record.copies.max_running,
            record.copies.overlaps.len(),
            record.progress_overlap
        ));
    }
    if let Some((node, id)) = damaged {
        let restored_damaged = record.migrations.iter().any(|migration| {
            migration.checkpoint.as_deref() == Some(id.as_str())
                && &migration.target == node
                && matches!(migration.phase, Phase::Succeeded)
        });
        if restored_damaged {
            findings.push(format!(
                "{CORRUPTED_RESTORE}: a replacement on {node} was restored from the damaged checkpoint {id}"
            ));
        }
    }
    let unfinished: Vec<&MigrationOutcome> = record
        .migrations
        .iter()
        .filter(|migration| !migration.phase.is_terminal())
        .collect();
    if record.deadline_hit || !unfinished.is_empty() {
        findings.push(format!(
            "{STUCK}: deadline hit: {}; migrations not in a terminal phase: {}",
            record.deadline_hit,
            unfinished
                .iter()
                .map(|migration| format!("{} in {}", migration.file, migration.phase))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for migration in &record.migrations {
        if migration.phase.is_terminal()
            && migration
                .message
                .as_ref()
                .is_none_or(|message| message.trim().is_empty())
        {
            findings.push(format!(
                "migration {} ended {} without a reason",
                migration.file, migration.phase
            ));
        }
    }
    if !record.verification_problems.is_empty() {
        findings.push(format!(
            "files that do not verify: {}",
            record.verification_problems.join("; ")
        ));
    }
    record.loss_identical = record.final_loss_hex.as_deref() == Some(reference.loss_hex.as_str());
    if !record.training_finished {
        findings.push(format!(
            "training did not finish (last epoch {:?}; controller error: {})",
            record.final_epoch,
            record.controller_error.as_deref().unwrap_or("none")
        ));
    } else if !record.loss_identical {
        findings.push(format!(
            "final loss {} differs from the reference {}",
            record.final_loss_hex.as_deref().unwrap_or("?"),
            reference.loss_hex
        ));
    }
    if let Some(expected) = &record.injection.expected_policy
        && record.policy_in_force.as_ref() != Some(expected)
    {
        findings.push(format!(
            "the policy in force is not the expected one after the edit: {}",
            record.policy_in_force.as_deref().unwrap_or("none")
        ));
    }
    if record.fresh_starts > 0 && !record.resumable_before_fault.is_empty() {
        findings.push(format!(
            "a replacement started training from the beginning although intact checkpoints existed: {}",
            record.resumable_before_fault.join(", ")
        ));
    }
    let allowed = record.redone_allowed;
    let resumed_redone: Vec<u32> = record
        .resumed_from
        .iter()
        .zip(&record.redone_epochs)
        .filter(|(from, redone)| **from > 0 && **redone > allowed)
        .map(|(_, redone)| *redone)
        .collect();
    if !resumed_redone.is_empty() {
        findings.push(format!(
            "epochs lost beyond one checkpoint interval: redid {resumed_redone:?}, allowed {allowed}"
        ));
    }
    record.findings = findings;
}

/// Paths of the run's files, for tests that inspect a kept run.
pub fn run_dir(settings: &SuiteSettings, plan: &FaultPlan) -> PathBuf {
    settings.demo.root.join(plan.name())
}

/// The pod all runs protect, as the checkpoint store names it.
pub fn store_pod() -> automigrate_checkpoint::PodKey {
    automigrate_checkpoint::PodKey::new(POD_NAMESPACE, POD_NAME)
}

/// Reads the suite's default list of kinds (all of them).
pub fn all_kinds() -> Vec<FaultKind> {
    FaultKind::ALL.to_vec()
}

/// What of issue 7's fault list a suite with `kinds` does not run, each with why (for the
/// report).
pub fn left_out(kinds: &[FaultKind]) -> Vec<String> {
    let mut lines = vec![
        "corrupted bytes on the wire: the emulated links have no corruption knob (loss, delay \
         and rate only), so the in-flight fault damages a file in the receiver's staging area as \
         it lands instead; TLS would refuse altered records before the transfer engine saw them"
            .to_string(),
    ];
    for kind in FaultKind::ALL {
        if !kinds.contains(&kind) {
            lines.push(format!("{kind}: not selected (--kinds)"));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_decided_by_the_seed() {
        let kinds = all_kinds();
        let a = plan_runs(7, 30, &kinds);
        let b = plan_runs(7, 30, &kinds);
        let c = plan_runs(8, 30, &kinds);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 30);
    }

    #[test]
    fn every_kind_runs_once_per_round() {
        let kinds = all_kinds();
        let plans = plan_runs(1, kinds.len() * 3, &kinds);
        for round in plans.chunks(kinds.len()) {
            let mut seen: Vec<FaultKind> = round.iter().map(|plan| plan.kind).collect();
            seen.sort();
            let mut expected = kinds.clone();
            expected.sort();
            assert_eq!(seen, expected);
        }
    }

    fn settings() -> DemoSettings {
        standard_settings(
            PathBuf::from("/nonexistent"),
            PathBuf::from("policies"),
            PathBuf::from("automigrate-agent"),
            1,
            1,
            all_kinds(),
        )
        .demo
    }

    fn judged(change: impl FnOnce(&mut RunRecord)) -> RunRecord {
        let plan = plan_runs(1, 1, &[FaultKind::SourcePartition]).remove(0);
        let mut record = RunRecord::not_carried_out(
            &plan,
            &FaultError::Setup("test".into()),
            Duration::from_secs(1),
        );
        record.findings.clear();
        record.training_finished = true;
        record.final_epoch = Some(64);
        record.final_loss_hex = Some("0x1p-5".into());
        change(&mut record);
        let reference = Reference {
            loss_hex: "0x1p-5".into(),
            training_s: 6.4,
            epoch_s: 0.1,
        };
        verdict(&mut record, &reference, &settings(), None);
        record
    }

    #[test]
    fn a_clean_run_has_no_findings_and_each_violation_is_one() {
        assert!(judged(|_| {}).findings.is_empty());
        let double = judged(|record| record.copies.max_running = 2);
        assert!(double.double_running() && double.findings.len() == 1);
        let stuck = judged(|record| record.deadline_hit = true);
        assert!(stuck.stuck());
        let loss = judged(|record| record.final_loss_hex = Some("0x1p-4".into()));
        assert!(!loss.loss_identical && loss.findings.len() == 1);
        let restart = judged(|record| {
            record.fresh_starts = 1;
            record.resumable_before_fault = vec!["trainer-000002 on node-b".into()];
        });
        assert_eq!(restart.findings.len(), 1);
        // 1 s interval (30 s at ×30) + a 0.1 s pass + 0.5 s lag at 0.1 s per epoch: 16 + 1.
        let lost = judged(|record| {
            record.replication_lag_s = Some(0.5);
            record.resumed_from = vec![10];
            record.redone_epochs = vec![18];
        });
        assert_eq!(lost.redone_allowed, 17);
        assert_eq!(lost.findings.len(), 1, "{:?}", lost.findings);
    }

    #[test]
    fn a_migration_ending_without_a_reason_or_mid_way_is_a_finding() {
        let migration = |phase: Phase, message: Option<&str>| MigrationOutcome {
            file: "ml-trainer-1.json".into(),
            trigger: "NodeFailed".into(),
            source: "node-a".into(),
            target: "node-b".into(),
            phase,
            message: message.map(str::to_string),
            checkpoint: Some("trainer-000002".into()),
            fresh_start: Some(false),
            old_container: "trainer-node-a-1".into(),
            new_container: "trainer-node-b-2".into(),
        };
        let silent = judged(|record| record.migrations = vec![migration(Phase::Failed, None)]);
        assert_eq!(silent.findings.len(), 1);
        let midway =
            judged(|record| record.migrations = vec![migration(Phase::Restoring, Some("x"))]);
        assert!(midway.stuck());
    }

    #[test]
    fn outcomes_count_repeated_phases() {
        let migration = |phase| MigrationOutcome {
            file: String::new(),
            trigger: String::new(),
            source: String::new(),
            target: String::new(),
            phase,
            message: None,
            checkpoint: None,
            fresh_start: None,
            old_container: String::new(),
            new_container: String::new(),
        };
        assert_eq!(outcome_of(&[]), "none");
        let phases = [Phase::Failed, Phase::Failed, Phase::Succeeded];
        let migrations: Vec<MigrationOutcome> = phases.into_iter().map(migration).collect();
        assert_eq!(outcome_of(&migrations), "Failed×2+Succeeded");
    }

    #[test]
    fn kinds_parse_by_name_and_run_names_are_short() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>().unwrap(), kind);
        }
        assert!("nonsense".parse::<FaultKind>().is_err());
        for plan in plan_runs(3, 20, &all_kinds()) {
            assert!(plan.name().len() <= 10, "{}", plan.name());
            assert!((20..=55).contains(&plan.percent));
        }
    }
}
