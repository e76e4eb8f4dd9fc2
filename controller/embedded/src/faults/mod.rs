//! The fault-injection suite: randomized runs of the local cluster of real components (the
//! `automigrate-controller` replicas, an `automigrate-kubelet` and an `automigrate-agent` pod
//! per node, the local API server: [`crate::kube::KubeCluster`]) with one fault each, and the
//! verdict of every run.
//!
//! A run is one [`FaultKind`] with parameters drawn from the run's seed ([`FaultPlan`]): when the
//! fault fires (percent of training, migration phase, delay), on which node, how (which file is
//! damaged and where, how much disk is left). Every run builds its own cluster, applies the
//! protected training pod (the deterministic numpy trainer) to node-a, and a fault task
//! ([`world::FaultContext`]) acts on the world from the outside, triggered only by what it can
//! observe: the Migration objects the controller writes to the API server (phase, source,
//! target, checkpoint) and the workload's progress log. Nothing inside a component is hooked,
//! and the harness takes no action the product should take: it kills, freezes, cuts, fills,
//! powers off, damages files, sets a node condition (as node-problem-detector) and edits the
//! policy ConfigMap (as a person), never deletes a pod, patches a Migration or kills a
//! container to prevent a second copy.
//!
//! Each fault kind lives in its own module (`controller_kill`, `agent_kill`, `agent_outage`,
//! `api_cut`, `target_death`, `disk_full`, `corruption`, `resume_damage`, `policy_edit`);
//! [`world`] holds what they share; [`api`] reads the API server; [`sampler`] counts running
//! copies from runc; [`training`] runs the reference and reads the progress log; [`report`]
//! writes the report.
//!
//! After a run [`verdict`] decides, from the measured material only ([`RunRecord`]):
//! - double running: the runc sampler saw two running copies, or the progress log shows two
//!   copies appending at once;
//! - corrupted restore: a replacement was restored from a checkpoint the fault damaged;
//! - stuck: a migration that is not in a terminal phase when the run ends, or the run hit its
//!   deadline;
//! - a terminal migration without a reason; files that do not verify (the dataset on every
//!   holder, every checkpoint in every store except the one damaged on purpose); a final loss
//!   that is not bit-identical to the uninterrupted reference; training that did not finish; a
//!   replacement that restarted from zero although intact checkpoints existed, or redid more
//!   epochs than one checkpoint interval and two controller passes.
//!
//! Any of these is a finding; runs are never dropped from the report. The kinds where a node is
//! cut off from the API server but alive ([`FaultKind::known_split_brain`]) are judged by the
//! same rules and reported on their own lines, outside the goals: the controller's fencing
//! modes cannot handle them safely and automatically (issue 16).

pub mod agent_kill;
pub mod agent_outage;
pub mod api;
pub mod api_cut;
pub mod controller_kill;
pub mod corruption;
pub mod disk_full;
pub mod downtime;
pub mod home_node;
pub mod policy_edit;
pub mod report;
pub mod resume_damage;
pub mod sampler;
pub mod target_death;
pub mod training;
pub mod world;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_core::migration::Phase;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use api::MigrationOutcome;
pub use sampler::{CopyReport, unix_now};
pub use training::Reference;

use crate::kube::{KubeCluster, KubeClusterConfig, KubeClusterError, NODE_HOST_DIR};
use crate::workload::{self, DatasetSpec, SplitMix, TrainerSpec};
use world::{CONTAINER_NAME, HOME_NODE, POD_NAME, POD_NAMESPACE};

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error(transparent)]
    Cluster(#[from] Box<KubeClusterError>),
    #[error(transparent)]
    Training(#[from] training::TrainingError),
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    #[error("{0}")]
    Setup(String),
    #[error("unknown fault kind `{0}`: expected one of {1}")]
    UnknownKind(String, String),
}

impl From<KubeClusterError> for FaultError {
    fn from(error: KubeClusterError) -> Self {
        Self::Cluster(Box::new(error))
    }
}

/// What is done to the system in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` of the leading controller replica in a migration phase; started again later.
    ControllerKill,
    /// `kill -9` of the source node's agent while the final checkpoint moves.
    SourceAgentKill,
    /// `kill -9` of the target node's agent while the final checkpoint moves.
    TargetAgentKill,
    /// The target node is powered off while the replacement is being restored.
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
    /// The home node is cut off from the API server but alive; the controller fences by taint.
    ApiCutTaint,
    /// The same, with the controller waiting for an administrator to fence.
    ApiCutAdministrator,
    /// The home node (or a migration's source) is cut off from the API server but alive, in
    /// the default self-fence mode: its agent fences itself, the training resumes elsewhere.
    ApiCut,
    /// The home node is cut off from its peers only: nothing may be fenced, moved or stopped.
    PeerCut,
    /// The home node (or a migration's source) is powered off: kubelet, agent and containers
    /// die together.
    PowerOff,
}

impl FaultKind {
    pub const ALL: [FaultKind; 16] = [
        FaultKind::ControllerKill,
        FaultKind::SourceAgentKill,
        FaultKind::TargetAgentKill,
        FaultKind::TargetDeath,
        FaultKind::TargetDiskFull,
        FaultKind::CorruptAtRest,
        FaultKind::CorruptInFlight,
        FaultKind::PolicyEditValid,
        FaultKind::PolicyEditInvalid,
        FaultKind::AgentOutage,
        FaultKind::ResumeDamage,
        FaultKind::ApiCutTaint,
        FaultKind::ApiCutAdministrator,
        FaultKind::ApiCut,
        FaultKind::PeerCut,
        FaultKind::PowerOff,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ControllerKill => "controller-kill",
            FaultKind::SourceAgentKill => "source-agent-kill",
            FaultKind::TargetAgentKill => "target-agent-kill",
            FaultKind::TargetDeath => "target-death",
            FaultKind::TargetDiskFull => "target-disk-full",
            FaultKind::CorruptAtRest => "corrupt-at-rest",
            FaultKind::CorruptInFlight => "corrupt-in-flight",
            FaultKind::PolicyEditValid => "policy-edit-valid",
            FaultKind::PolicyEditInvalid => "policy-edit-invalid",
            FaultKind::AgentOutage => "agent-outage",
            FaultKind::ResumeDamage => "resume-damage",
            FaultKind::ApiCutTaint => "api-cut-taint",
            FaultKind::ApiCutAdministrator => "api-cut-administrator",
            FaultKind::ApiCut => "api-cut",
            FaultKind::PeerCut => "peer-cut",
            FaultKind::PowerOff => "power-off",
        }
    }

    /// Short tag for run names (namespaces are named after them).
    fn tag(self) -> &'static str {
        match self {
            FaultKind::ControllerKill => "ck",
            FaultKind::SourceAgentKill => "sak",
            FaultKind::TargetAgentKill => "tak",
            FaultKind::TargetDeath => "td",
            FaultKind::TargetDiskFull => "tdf",
            FaultKind::CorruptAtRest => "car",
            FaultKind::CorruptInFlight => "cif",
            FaultKind::PolicyEditValid => "pev",
            FaultKind::PolicyEditInvalid => "pei",
            FaultKind::AgentOutage => "ao",
            FaultKind::ResumeDamage => "rd",
            FaultKind::ApiCutTaint => "act",
            FaultKind::ApiCutAdministrator => "aca",
            FaultKind::ApiCut => "ac",
            FaultKind::PeerCut => "pc",
            FaultKind::PowerOff => "po",
        }
    }

    /// A node cut off from the API server but alive: the split brain issue 16 closes. Run and
    /// reported on its own line, never counted as passing.
    pub fn known_split_brain(self) -> bool {
        matches!(
            self,
            FaultKind::ApiCutTaint | FaultKind::ApiCutAdministrator
        )
    }

    /// The controller's `--dead-node-fencing` in runs of this kind: the two kinds about the
    /// other modes run with theirs (`taint`, `administrator`); every other kind with the
    /// default, `self-fence`, as `deploy/` runs it.
    pub fn fencing(self) -> Fencing {
        match self {
            FaultKind::ApiCutAdministrator => Fencing::Administrator,
            FaultKind::ApiCutTaint => Fencing::Taint,
            _ => Fencing::SelfFence,
        }
    }

    /// Whether the fault leaves the workload's node alive but unable to hand its work on:
    /// the old copy may go on computing after the fault, and nothing it computes from then on
    /// can be saved (no checkpoint of it can leave the node), so it is not counted as lost
    /// by the product.
    fn strands_live_work(self) -> bool {
        matches!(
            self,
            FaultKind::ApiCut | FaultKind::ApiCutTaint | FaultKind::ApiCutAdministrator
        )
    }

    /// Issue 16's kinds: the fault strikes the node the training runs on (the home node, or a
    /// live migration's source) at a drawn moment ([`home_node`]).
    pub fn strikes_home_node(self) -> bool {
        matches!(
            self,
            FaultKind::ApiCut | FaultKind::PeerCut | FaultKind::PowerOff
        )
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

/// The controller's dead-node fencing mode (`--dead-node-fencing`,
/// `AUTOMIGRATE_DEAD_NODE_FENCING`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Fencing {
    /// The controller sets the out-of-service taint on a node whose Lease expired.
    Taint,
    /// The controller waits for an administrator to set that taint.
    Administrator,
    /// The default: every agent fences its own node when it cannot confirm its standing; the
    /// controller counts an expired node as fenced after the safe time.
    SelfFence,
}

impl Fencing {
    pub fn name(self) -> &'static str {
        match self {
            Fencing::Taint => "taint",
            Fencing::Administrator => "administrator",
            Fencing::SelfFence => "self-fence",
        }
    }
}

/// How the run provokes the migration the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Trigger {
    /// The home node reports a node-problem-detector condition the policy reacts to
    /// ([`world::DEGRADATION_CONDITION`]): a live source, moved with a fresh final dump.
    Degradation,
    /// The home node is powered off: the newest stored checkpoint is restored elsewhere.
    NodeFailure,
    /// The fault itself (a cut) is what the controller answers.
    TheFault,
}

/// Which node's agent a kill strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Side {
    Source,
    Target,
}

/// Whose agents an outage freezes.
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
    /// The newest standby copy, just before the home node is powered off (it is what will be
    /// restored).
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
    },
    #[serde(rename_all = "camelCase")]
    ControllerKill {
        /// The migration phase the kill aims at.
        phase: Phase,
        /// The kill comes this long after the phase is seen.
        delay_ms: u64,
        /// The killed replica starts again this long after the kill.
        restart_after_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    ApiCut { fencing: Fencing },
    /// Issue 16's kinds (api-cut, peer-cut, power-off): when the fault strikes the node the
    /// training runs on.
    #[serde(rename_all = "camelCase")]
    HomeNode { moment: home_node::Moment },
    #[serde(rename_all = "camelCase")]
    AgentOutage {
        sides: OutageSides,
        /// The migration phase the outage waits for.
        phase: Phase,
        delay_ms: u64,
        /// How long the agents stay frozen.
        outage_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    ResumeDamage {
        /// The receiver's agent is killed too, after the damage.
        kill_receiver: bool,
        /// The sender is killed once this many bytes have landed in the receiver's staging.
        min_bytes: u64,
    },
    #[serde(rename_all = "camelCase")]
    TargetDeath { delay_ms: u64 },
    #[serde(rename_all = "camelCase")]
    DiskFull {
        /// Space left on the target once it is filled.
        free_kib: u64,
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
/// shuffles), each run's parameters from its own seed (controller-kill runs also from how many
/// came before: they aim at the phases in turn).
pub fn plan_runs(seed: u64, runs: usize, kinds: &[FaultKind]) -> Vec<FaultPlan> {
    let mut suite = Draw::new(seed);
    let mut plans: Vec<FaultPlan> = Vec::with_capacity(runs);
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
        let occurrence = plans.iter().filter(|plan| plan.kind == kind).count();
        plans.push(draw_plan(index, kind, run_seed, occurrence));
    }
    plans
}

fn draw_plan(index: usize, kind: FaultKind, seed: u64, occurrence: usize) -> FaultPlan {
    let mut draw = Draw::new(seed);
    let (trigger, params) = match kind {
        FaultKind::ControllerKill => controller_kill::draw(&mut draw, occurrence),
        FaultKind::SourceAgentKill | FaultKind::TargetAgentKill => {
            agent_kill::draw(&mut draw, kind == FaultKind::SourceAgentKill)
        }
        FaultKind::TargetDeath => target_death::draw(&mut draw),
        FaultKind::TargetDiskFull => disk_full::draw(&mut draw),
        FaultKind::CorruptAtRest => corruption::draw_at_rest(&mut draw),
        FaultKind::CorruptInFlight => corruption::draw_in_flight(&mut draw),
        FaultKind::PolicyEditValid | FaultKind::PolicyEditInvalid => policy_edit::draw(&mut draw),
        FaultKind::AgentOutage => agent_outage::draw(&mut draw),
        FaultKind::ResumeDamage => resume_damage::draw(&mut draw),
        FaultKind::ApiCutTaint | FaultKind::ApiCutAdministrator => {
            api_cut::draw(&mut draw, kind.fencing())
        }
        FaultKind::ApiCut | FaultKind::PowerOff => home_node::draw(&mut draw, true),
        FaultKind::PeerCut => home_node::draw(&mut draw, false),
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

/// The suite's policy: deploy's `default` with the shortest failure triggers the policy floors
/// allow (a kubelet here renews its Lease every second) and a pod checkpoint interval down to
/// 1 s, so a run of a few tens of seconds has several checkpoints, and a 2 min restore timeout
/// (deploy: 5 min), so a run sees how a phase that keeps failing ends. Everything else
/// (retention, incremental dumps, one standby copy, the 10 min cooldown, the rollback fallback)
/// is deploy's.
pub const SUITE_POLICY: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: default
  namespace: automigrate-system
  labels:
    automigrate.dev/policy: \"true\"
data:
  policy.yaml: |
    checkpoint:
      interval: 10m
      minInterval: 1s
      retention: {count: 3}
      incremental: true
      replicateTo: 1
    triggers:
      notReadyGrace: 10s
      leaseTimeout: 15s
      heartbeatInterval: 1s
      cooldown: 10m
    restore:
      timeout: 2m
      fallback: rollback
";

/// What the suite runs on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuiteSettings {
    /// Every run's cluster state: `<root>/<run>/` (keep it on tmpfs, see the kube module).
    pub root: PathBuf,
    /// Where the binaries are (automigrate-apiserver, -kubelet, -agent, -controller, automigrate).
    pub bin_dir: PathBuf,
    pub nodes: usize,
    /// RTT between neighbouring nodes on the line.
    pub rtt_step_ms: u64,
    pub dataset: DatasetSpec,
    pub trainer: TrainerSpec,
    /// The pod's `automigrate.dev/checkpoint-interval`.
    pub checkpoint_interval: String,
    /// The policy ConfigMap applied (named `default`).
    pub policy: String,
    pub seed: u64,
    pub runs: usize,
    pub kinds: Vec<FaultKind>,
    /// A run that has not finished training by then is stopped and counted stuck.
    pub run_deadline_s: u64,
    /// After training finished: how long the run waits for every migration to end (longer than
    /// the policy's restore timeout, so a migration retrying a failing step is seen to reach
    /// its deadline rather than counted stuck).
    pub settle_s: u64,
    /// Size of the tmpfs each non-home node's state lives on in disk-full runs.
    pub disk_mib: u64,
    /// Keep every run's state directory (logs, stores, manifests).
    pub keep: bool,
    /// Runs carried out at once, each on its own cluster (`--jobs`).
    #[serde(default = "one_job")]
    pub jobs: usize,
}

fn one_job() -> usize {
    1
}

/// The suite's standard settings: 3 nodes, 160 epochs of the trainer (about 20 s uninterrupted
/// on 2 cores), a checkpoint every 5 s.
pub fn standard_settings(
    root: PathBuf,
    bin_dir: PathBuf,
    seed: u64,
    runs: usize,
    kinds: Vec<FaultKind>,
) -> SuiteSettings {
    SuiteSettings {
        root,
        bin_dir,
        nodes: 3,
        rtt_step_ms: 10,
        dataset: DatasetSpec {
            name: "faults".into(),
            files: 4,
            rows_per_file: 4096,
            features: 32,
            classes: 4,
            seed: 5,
        },
        trainer: TrainerSpec {
            epochs: 160,
            hidden: 128,
            seed: 3,
            learning_rate: 0.05,
        },
        checkpoint_interval: "5s".into(),
        policy: SUITE_POLICY.into(),
        seed,
        runs,
        kinds,
        run_deadline_s: 420,
        settle_s: 150,
        disk_mib: 512,
        keep: false,
        jobs: 1,
    }
}

/// What was done to the system, as the fault task recorded it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Injection {
    /// Unix time the fault struck.
    pub at: Option<f64>,
    /// The last epoch the workload had reported then.
    pub epoch: Option<u32>,
    /// The migration phase the API server showed right before and right after the fault.
    pub phase_before: Option<Phase>,
    pub phase_after: Option<Phase>,
    pub node: Option<String>,
    /// A checkpoint the fault damaged on purpose: (node, id).
    pub damaged_checkpoint: Option<(String, String)>,
    /// What happened, step by step.
    pub notes: Vec<String>,
    /// Policy edits: what the controller must do with the edit (`applied` or `refused`).
    pub expected_policy: Option<String>,
    /// Restorable checkpoints on live nodes other than the home node when the fault struck
    /// (`<id> on <node>`): what a replacement could resume from.
    pub checkpoints_at_strike: Vec<String>,
    /// Issue 16's kinds: the drawn moment and what was seen when the fault fired.
    #[serde(default)]
    pub moment: Option<String>,
}

/// One run's measured outcome and verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub plan: FaultPlan,
    pub name: String,
    pub started_at: f64,
    pub wall_s: f64,
    /// From the start of the run until the cluster was up (every node Ready, a leader).
    pub cluster_up_s: f64,
    pub load_average: (String, String),
    pub injection: Injection,
    /// Did the fault strike at all (its trigger was seen before training ended)?
    pub fault_fired: bool,
    /// Every Migration object as the API server had it at the end of the run.
    pub migrations: Vec<MigrationOutcome>,
    /// The migrations' end phases, joined (`none` without migrations).
    pub outcome: String,
    pub deadline_hit: bool,
    pub training_finished: bool,
    /// When the training wrote its `done` line (Unix seconds).
    #[serde(default)]
    pub training_finished_at: Option<f64>,
    pub final_epoch: Option<u32>,
    pub final_loss_hex: Option<String>,
    pub loss_identical: bool,
    /// Per break in the progress log: the last epoch not computed again (0: from the start).
    pub resumed_from: Vec<u32>,
    /// Copies started from the beginning after the first.
    pub fresh_starts: usize,
    /// Per break: epochs computed again.
    pub redone_epochs: Vec<u32>,
    /// Per break: epochs computed again that were computed before the work cutoff
    /// ([`work_cutoff`]); work the old copy did after it could not be saved by any product.
    /// Empty in reports written before it existed (the verdict then uses `redone_epochs`).
    #[serde(default)]
    pub lost_epochs: Vec<u32>,
    /// Unix time from which the old copy's work could not be saved, if before the breaks.
    #[serde(default)]
    pub work_cutoff_at: Option<f64>,
    /// One checkpoint interval and two controller passes, in epochs, plus one.
    pub redone_allowed: u32,
    /// Stretches of the progress log written without a break.
    pub segments: usize,
    pub copies: CopyReport,
    /// The progress log shows two copies appending at the same time.
    pub progress_interleaved: bool,
    pub verification_problems: Vec<String>,
    pub checkpoints_verified: usize,
    /// Checkpoints other live nodes held when the fault struck, the damaged one excepted.
    pub resumable_before_fault: Vec<String>,
    pub datasets_verified: usize,
    /// Nodes the harness put the dataset on before the run (the others got it from the
    /// controller, or not at all).
    #[serde(default)]
    pub dataset_provisioned_on: Vec<String>,
    /// Lines in the agents' logs saying a received piece, file or archive did not verify.
    pub receiver_refusals: usize,
    /// From the fault until the training ran again ([`downtime`]).
    #[serde(default)]
    pub downtime: downtime::Downtime,
    /// The controller's Events on the policy ConfigMap (`reason: note`).
    pub policy_events: Vec<String>,
    /// What the controller did with a policy edit: `applied` or `refused` (from the Events).
    pub policy_outcome: Option<String>,
    pub findings: Vec<String>,
}

impl RunRecord {
    fn not_carried_out(plan: &FaultPlan, error: &FaultError, took: Duration) -> Self {
        Self {
            plan: plan.clone(),
            name: plan.name(),
            started_at: unix_now() - took.as_secs_f64(),
            wall_s: took.as_secs_f64(),
            cluster_up_s: 0.0,
            load_average: (load_average(), load_average()),
            injection: Injection::default(),
            fault_fired: false,
            migrations: Vec::new(),
            outcome: "not run".into(),
            deadline_hit: false,
            training_finished: false,
            training_finished_at: None,
            final_epoch: None,
            final_loss_hex: None,
            loss_identical: false,
            resumed_from: Vec::new(),
            fresh_starts: 0,
            redone_epochs: Vec::new(),
            lost_epochs: Vec::new(),
            work_cutoff_at: None,
            redone_allowed: 0,
            segments: 0,
            copies: CopyReport::default(),
            progress_interleaved: false,
            verification_problems: Vec::new(),
            checkpoints_verified: 0,
            resumable_before_fault: Vec::new(),
            datasets_verified: 0,
            dataset_provisioned_on: Vec::new(),
            receiver_refusals: 0,
            downtime: downtime::Downtime::NoFault,
            policy_events: Vec::new(),
            policy_outcome: None,
            findings: vec![format!("the run could not be carried out: {error}")],
        }
    }

    pub fn double_running(&self) -> bool {
        self.copies.max_running > 1 || !self.copies.overlaps.is_empty() || self.progress_interleaved
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
/// Two controller passes (decision and executor, 1 s each in the local cluster) of slack in
/// the redo allowance: a checkpoint falls due between passes, and its standby copy takes a
/// pass to be asked for.
const CONTROLLER_PASSES_S: f64 = 2.0;

pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Runs the uninterrupted reference, then every plan; after each run `progress` gets the
/// reference and every record so far (to print, or to write a partial report). A run that
/// could not be carried out (its cluster did not come up) is kept as a record with that finding.
pub async fn run_suite(
    settings: &SuiteSettings,
    mut progress: impl FnMut(&Reference, &[RunRecord]),
) -> Result<(Reference, Vec<RunRecord>), FaultError> {
    let reference = {
        let dir = settings.root.join("reference");
        let dataset = settings.dataset.clone();
        let trainer = settings.trainer.clone();
        tokio::task::spawn_blocking(move || {
            training::reference_run(&dir, &dataset, &trainer, Duration::from_secs(600))
        })
        .await
        .map_err(|error| FaultError::Setup(format!("reference run: {error}")))??
    };
    let plans = plan_runs(settings.seed, settings.runs, &settings.kinds);
    let mut records = Vec::with_capacity(plans.len());
    let jobs = settings.jobs.clamp(1, plans.len().max(1));
    if jobs == 1 {
        for plan in plans {
            records.push(run_planned(settings, &reference, &plan).await);
            progress(&reference, &records);
        }
        return Ok((reference, records));
    }
    // Lanes: `jobs` tasks take the next plan from one queue, each run its own cluster (its own
    // root `<root>/<run>`, name prefix `<run>` and so network namespaces, cgroups under its own
    // root's hash), so lanes share nothing but the host. Records come back as runs finish and
    // are put in plan order at the end (the report sorts them too).
    let shared = Arc::new((settings.clone(), reference.clone()));
    let queue = Arc::new(std::sync::Mutex::new(plans.into_iter()));
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<RunRecord>();
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..jobs {
        let (shared, queue, sender) = (Arc::clone(&shared), Arc::clone(&queue), sender.clone());
        lanes.spawn(async move {
            // Lanes start a few seconds apart, so their clusters do not all start at once.
            tokio::time::sleep(Duration::from_secs(5 * lane as u64)).await;
            loop {
                let next = queue.lock().ok().and_then(|mut plans| plans.next());
                let Some(plan) = next else { break };
                let record = run_planned(&shared.0, &shared.1, &plan).await;
                if sender.send(record).is_err() {
                    break;
                }
            }
        });
    }
    drop(sender);
    while let Some(record) = receiver.recv().await {
        records.push(record);
        progress(&reference, &records);
    }
    while lanes.join_next().await.is_some() {}
    records.sort_by_key(|record| record.plan.index);
    Ok((reference, records))
}

/// One planned run; a run that could not be carried out is a record with that finding.
async fn run_planned(
    settings: &SuiteSettings,
    reference: &Reference,
    plan: &FaultPlan,
) -> RunRecord {
    let started = Instant::now();
    match run_one(settings, reference, plan).await {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(run = %plan.name(), %error, "run not carried out");
            RunRecord::not_carried_out(plan, &error, started.elapsed())
        }
    }
}

/// Removes what an earlier run of the same name left: its containers, mounts and state.
fn clear_run_dir(dir: &Path) {
    world::unmount_leftovers(dir);
    if !dir.exists() {
        return;
    }
    for node in world::visible_dirs(dir) {
        let runc_root = node.join("kubelet").join("runc");
        for container in world::visible_dirs(&runc_root) {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force"])
                .arg(container.file_name().unwrap_or_default())
                .output();
        }
    }
    if let Err(error) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), %error, "leftovers of an earlier run");
    }
}

/// One run: cluster, the protected pod, the fault, the verdict.
#[tracing::instrument(name = "fault_run", skip_all, fields(run = %plan.name()))]
pub async fn run_one(
    settings: &SuiteSettings,
    reference: &Reference,
    plan: &FaultPlan,
) -> Result<RunRecord, FaultError> {
    let name = plan.name();
    let run_dir = settings.root.join(&name);
    let started = Instant::now();
    let started_at = unix_now();
    let load_at_start = load_average();
    clear_run_dir(&run_dir);
    std::fs::create_dir_all(&run_dir)
        .map_err(|error| FaultError::Setup(format!("{}: {error}", run_dir.display())))?;
    let mut config = KubeClusterConfig::line(
        settings.nodes,
        Duration::from_millis(settings.rtt_step_ms),
        run_dir.clone(),
        settings.bin_dir.clone(),
    );
    config.name_prefix = name.clone();
    let policy_file = run_dir.join("suite-policy.yaml");
    std::fs::write(&policy_file, &settings.policy)
        .map_err(|error| FaultError::Setup(format!("{}: {error}", policy_file.display())))?;
    config.policies = vec![policy_file.clone()];
    config.controller_env = vec![(
        "AUTOMIGRATE_DEAD_NODE_FENCING".into(),
        plan.kind.fencing().name().into(),
    )];
    let nodes = config.nodes.clone();
    let mounts = if plan.kind == FaultKind::TargetDiskFull {
        world::mount_small_disks(&run_dir, &nodes, HOME_NODE, settings.disk_mib)
            .map_err(FaultError::Setup)?
    } else {
        Vec::new()
    };
    let cluster = match KubeCluster::create(config).await {
        Ok(cluster) => Arc::new(cluster),
        Err(error) => {
            world::unmount(&mounts);
            return Err(error.into());
        }
    };
    let cluster_up_s = started.elapsed().as_secs_f64();
    let outcome = drive(settings, plan, &cluster, &run_dir, &policy_file).await;
    // A blocking call the fault made (a power-off, a node condition) may still hold the
    // cluster for a moment after the fault task was stopped.
    let waited = Instant::now();
    while Arc::strong_count(&cluster) > 1 && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cluster = Arc::try_unwrap(cluster).map_err(|_| {
        FaultError::Setup(format!(
            "run {name}: the cluster is still shared at the end of the run"
        ))
    })?;
    if let Err(error) = cluster.teardown().await {
        tracing::warn!(%error, "teardown");
    }
    let (mut record, damaged) = match outcome {
        Ok(parts) => parts,
        Err(error) => {
            world::unmount(&mounts);
            return Err(error);
        }
    };
    // Every agent is stopped now: the stores hold still while they are verified.
    let dataset = settings.dataset.name.clone();
    let verification = {
        let run_dir = run_dir.clone();
        let nodes = nodes.clone();
        let damaged = damaged.clone();
        tokio::task::spawn_blocking(move || {
            world::verify_files(&run_dir, &nodes, &dataset, damaged.as_ref())
        })
        .await
        .map_err(|error| FaultError::Setup(format!("verification task: {error}")))?
    };
    record.verification_problems = verification.problems;
    record.checkpoints_verified = verification.checkpoints;
    record.datasets_verified = verification.datasets;
    record.receiver_refusals = world::receiver_refusals(&run_dir, &nodes);
    world::unmount(&mounts);
    world::unmount_leftovers(&run_dir);
    if !settings.keep
        && let Err(error) = std::fs::remove_dir_all(&run_dir)
    {
        tracing::warn!(%error, "run storage left behind");
    }
    record.name = name;
    record.started_at = started_at;
    record.wall_s = started.elapsed().as_secs_f64();
    record.cluster_up_s = cluster_up_s;
    record.load_average = (load_at_start, load_average());
    verdict(&mut record, reference, settings, damaged.as_ref());
    Ok(record)
}

/// Where the pod finds its dataset, work directory and program on every node, under
/// [`NODE_HOST_DIR`] (each local node has its own, the kubelets' `--host-path-map`).
pub const DATA_DIR: &str = "data";
pub const WORK_DIR: &str = "work/trainer";
pub const APP_DIR: &str = "app";
/// The image the pod names: any reference that is not a checkpoint image in a node's store
/// resolves to the host's root file system in the local cluster (python3 and numpy are there);
/// a `localhost/` reference would be taken for a missing checkpoint image (ErrImagePull).
pub const TRAINER_IMAGE: &str = "docker.io/library/python:3.13-slim";

/// The protected training pod as a user would write it: the trainer (image references resolve
/// to the host's root file system in the local cluster), its dataset, program and work
/// directories as `hostPath` volumes under `/var/lib/automigrate` (every node has its own), the
/// `automigrate.dev/` annotations. The same conventions as the demo's pod.
pub fn trainer_pod(settings: &SuiteSettings) -> Value {
    let node_path = |dir: &str| format!("{NODE_HOST_DIR}/{dir}");
    let mut command = vec![
        workload::PYTHON.to_string(),
        format!("/app/{}", workload::TRAINER_FILE),
        "/data".to_string(),
        "/work".to_string(),
    ];
    command.extend(training::trainer_args(&settings.trainer));
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD_NAME,
            "namespace": POD_NAMESPACE,
            "labels": {"app": "trainer"},
            "annotations": {
                automigrate_core::annotations::PROTECT: "true",
                automigrate_core::annotations::MODE: "transparent",
                automigrate_core::annotations::CHECKPOINT_INTERVAL: settings.checkpoint_interval,
                automigrate_core::annotations::DATASET:
                    node_path(&format!("{DATA_DIR}/{}", settings.dataset.name)),
            },
        },
        "spec": {
            "nodeName": HOME_NODE,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "volumes": [
                {"name": "data", "hostPath": {"path": node_path(&format!("{DATA_DIR}/{}", settings.dataset.name))}},
                {"name": "app", "hostPath": {"path": node_path(APP_DIR)}},
                {"name": "work", "hostPath": {"path": node_path(WORK_DIR)}},
            ],
            "containers": [{
                "name": CONTAINER_NAME,
                "image": TRAINER_IMAGE,
                "command": command,
                "workingDir": "/work",
                "env": [
                    {"name": "OPENBLAS_NUM_THREADS", "value": "1"},
                    {"name": "OMP_NUM_THREADS", "value": "1"},
                ],
                "volumeMounts": [
                    {"name": "data", "mountPath": "/data"},
                    {"name": "app", "mountPath": "/app", "readOnly": true},
                    {"name": "work", "mountPath": "/work"},
                ],
            }],
        },
    })
}

/// The progress log of every node (each node's copies append to its own), merged.
pub fn progress_logs(run_dir: &Path, nodes: &[String]) -> Vec<(String, workload::Progress)> {
    nodes
        .iter()
        .map(|node| {
            let path = run_dir
                .join(node)
                .join(WORK_DIR)
                .join(workload::PROGRESS_FILE);
            (
                node.clone(),
                workload::read_progress(&path).unwrap_or_default(),
            )
        })
        .collect()
}

/// Everything between the cluster's creation and its teardown.
async fn drive(
    settings: &SuiteSettings,
    plan: &FaultPlan,
    cluster: &Arc<KubeCluster>,
    run_dir: &Path,
    policy_file: &Path,
) -> Result<(RunRecord, Option<(String, String)>), FaultError> {
    let api = api::ApiReader::from_kubeconfig(cluster.kubeconfig()).map_err(FaultError::Setup)?;
    // The workload: the program on every node (its "image"), the dataset on the home node (in
    // its agent's data root, where the controller has it sent from).
    let nodes = cluster.nodes().to_vec();
    for node in &nodes {
        let dir = cluster.node_dir(node);
        workload::install_program(&dir.join(APP_DIR))?;
        let work = dir.join(WORK_DIR);
        std::fs::create_dir_all(&work)
            .map_err(|error| FaultError::Setup(format!("{}: {error}", work.display())))?;
    }
    // The controller copies a dataset only from a live source (Syncing); where the home node
    // dies or is cut off, nothing could copy it, so it is put on every node beforehand (as the
    // demo does for its hard failures, and as a shared dataset store would provide).
    let provisioned: Vec<String> =
        if plan.trigger == Trigger::Degradation && !plan.kind.strikes_home_node() {
            vec![HOME_NODE.to_string()]
        } else {
            nodes.clone()
        };
    for node in &provisioned {
        workload::generate_dataset(
            &cluster
                .node_dir(node)
                .join(DATA_DIR)
                .join(&settings.dataset.name),
            &settings.dataset,
        )?;
    }
    cluster.apply(&json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": POD_NAMESPACE},
    }))?;
    cluster.apply(&trainer_pod(settings))?;
    let home_progress = cluster
        .node_dir(HOME_NODE)
        .join(WORK_DIR)
        .join(workload::PROGRESS_FILE);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = api
            .get(&format!(
                "/api/v1/namespaces/{POD_NAMESPACE}/pods/{POD_NAME}"
            ))
            .is_ok_and(|pod| pod["status"]["phase"] == "Running");
        let progress = workload::read_progress(&home_progress).unwrap_or_default();
        if running && progress.last_epoch().is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err(FaultError::Setup(
                "the trainer pod did not run and report an epoch within 120 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sampler = sampler::CopySampler::start(
        Arc::clone(cluster),
        format!("{POD_NAMESPACE}_"),
        CONTAINER_NAME.to_string(),
        Duration::from_millis(50),
    );
    let context = world::FaultContext::new(
        Arc::clone(cluster),
        api.clone(),
        run_dir.to_path_buf(),
        settings.trainer.epochs,
        policy_file.to_path_buf(),
        "default".into(),
    );
    let task = tokio::spawn(inject(context.clone(), plan.clone()));
    let started = Instant::now();
    let limit = Duration::from_secs(settings.run_deadline_s);
    let settle = Duration::from_secs(settings.settle_s);
    let mut done_at: Option<Instant> = None;
    let mut deadline_hit = false;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let finished = progress_logs(run_dir, &nodes)
            .iter()
            .any(|(_, progress)| progress.done().is_some());
        if finished {
            let since = *done_at.get_or_insert_with(Instant::now);
            let all_terminal = api
                .views()
                .iter()
                .all(|view| view.phase.is_some_and(Phase::is_terminal));
            // A little past the end, so a second copy still running shows.
            if (all_terminal && since.elapsed() > Duration::from_secs(2))
                || since.elapsed() > settle
            {
                break;
            }
        }
        if started.elapsed() > limit {
            deadline_hit = true;
            break;
        }
    }
    task.abort();
    // The aborted task drops its hold on the cluster once it is polled again.
    let _ = task.await;
    let copies = sampler.stop();
    // Only now (the copies were counted) undo what outlives the fault.
    context.heal();
    let objects = api.migrations();
    let migrations = api::outcomes(&objects);
    let logs = progress_logs(run_dir, &nodes);
    let analysis = training::analyse_nodes(&logs);
    let injection = context.injection();
    let downtime = downtime::measure(&logs, injection.at);
    let cutoff = work_cutoff(plan.kind, injection.at, &migrations);
    let lost_epochs = lost_before(&analysis, &logs, cutoff);
    let policy_events = policy_events(&api, context.policy_name());
    let policy_outcome = injection.expected_policy.as_ref().map(|_| {
        if policy_events
            .iter()
            .any(|event| event.starts_with("InvalidPolicy"))
        {
            "refused".to_string()
        } else if policy_events
            .iter()
            .filter(|event| event.starts_with("PolicyLoaded"))
            .count()
            > 0
        {
            "applied".to_string()
        } else {
            "no event".to_string()
        }
    });
    let damaged = injection.damaged_checkpoint.clone();
    let damaged_name = damaged.as_ref().map(|(node, id)| format!("{id} on {node}"));
    let resumable_before_fault: Vec<String> = injection
        .checkpoints_at_strike
        .iter()
        .filter(|listed| Some(*listed) != damaged_name.as_ref())
        .cloned()
        .collect();
    let record = RunRecord {
        plan: plan.clone(),
        name: String::new(),
        started_at: 0.0,
        wall_s: 0.0,
        cluster_up_s: 0.0,
        load_average: (String::new(), String::new()),
        fault_fired: injection.at.is_some(),
        injection,
        outcome: outcome_of(&migrations),
        migrations,
        deadline_hit,
        training_finished: analysis.finished,
        training_finished_at: analysis.finished_at,
        final_epoch: analysis.final_epoch,
        final_loss_hex: analysis.final_loss_hex.clone(),
        loss_identical: false,
        resumed_from: analysis.resumed_from.clone(),
        fresh_starts: analysis.fresh_starts,
        redone_epochs: analysis.redone_epochs.clone(),
        lost_epochs,
        work_cutoff_at: cutoff,
        redone_allowed: 0,
        segments: analysis.segments.len(),
        copies,
        progress_interleaved: analysis.interleaved,
        verification_problems: Vec::new(),
        checkpoints_verified: 0,
        resumable_before_fault,
        datasets_verified: 0,
        dataset_provisioned_on: provisioned,
        receiver_refusals: 0,
        downtime,
        policy_events,
        policy_outcome,
        findings: Vec::new(),
    };
    Ok((record, damaged))
}

/// The controller's Events about the policy ConfigMap `name`: `reason: note (×count)`.
fn policy_events(api: &api::ApiReader, name: &str) -> Vec<String> {
    api.events(crate::kube::SYSTEM_NAMESPACE)
        .iter()
        .filter(|event| {
            event["involvedObject"]["kind"] == "ConfigMap"
                && event["involvedObject"]["name"] == name
        })
        .map(|event| {
            format!(
                "{}: {} (×{})",
                event["reason"].as_str().unwrap_or("?"),
                event["message"]
                    .as_str()
                    .or(event["note"].as_str())
                    .unwrap_or(""),
                event["count"].as_u64().unwrap_or(1)
            )
        })
        .collect()
}

/// Runs the plan's fault.
async fn inject(context: world::FaultContext, plan: FaultPlan) {
    let outcome = match &plan.params {
        FaultParams::ControllerKill { .. } => controller_kill::inject(&context, &plan).await,
        FaultParams::AgentKill { .. } => agent_kill::inject(&context, &plan).await,
        FaultParams::AgentOutage { .. } => agent_outage::inject(&context, &plan).await,
        FaultParams::ResumeDamage { .. } => resume_damage::inject(&context, &plan).await,
        FaultParams::ApiCut { .. } => api_cut::inject(&context, &plan).await,
        FaultParams::HomeNode { .. } => home_node::inject(&context, &plan).await,
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

/// The migrations' end phases in order, repeats counted: `Failed×3+Succeeded`.
fn outcome_of(migrations: &[MigrationOutcome]) -> String {
    if migrations.is_empty() {
        return "none".into();
    }
    let mut parts: Vec<(String, usize)> = Vec::new();
    for migration in migrations {
        let phase = migration.phase_name();
        match parts.last_mut() {
            Some((last, count)) if *last == phase => *count += 1,
            _ => parts.push((phase, 1)),
        }
    }
    parts
        .iter()
        .map(|(phase, count)| {
            if *count > 1 {
                format!("{phase}×{count}")
            } else {
                phase.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("+")
}

/// Judges the runs of a written report again with this build's rules (the measured fields
/// stay as they were): for a report whose runs were judged by an earlier rule.
pub fn rejudge(report: &mut report::SuiteReport) {
    for run in &mut report.runs {
        if run.outcome == "not run" {
            continue;
        }
        run.outcome = outcome_of(&run.migrations);
        let damaged = run.injection.damaged_checkpoint.clone();
        verdict(run, &report.reference, &report.settings, damaged.as_ref());
    }
    report::recount(report);
}

/// From when the workload's old copy computed work that no product could have saved: the
/// earliest of the moment a fault cut its live node off ([`FaultKind::strands_live_work`]) and
/// the end of a live migration's final dump (the start of its Transferring phase). The kubelet
/// checkpoint API leaves the container running, so the source goes on training until it is
/// fenced; the replacement resumes from the dump, and what the source computed meanwhile is
/// computed again. A migration that stops the source at the dump would lose the same
/// wall-clock time (the workload would simply not run meanwhile), so this is the migration's
/// own duration, not lost checkpoints. A powered-off node computes nothing after the fault.
fn work_cutoff(
    kind: FaultKind,
    fault_at: Option<f64>,
    migrations: &[MigrationOutcome],
) -> Option<f64> {
    let cut = fault_at.filter(|_| kind.strands_live_work());
    let dumps = migrations.iter().filter_map(|migration| {
        let dumped = migration
            .history
            .iter()
            .any(|step| step.phase == "Checkpointing");
        dumped
            .then(|| {
                migration
                    .history
                    .iter()
                    .find(|step| step.phase == "Transferring")
                    .and_then(|step| step.started_at)
            })
            .flatten()
    });
    cut.into_iter().chain(dumps).min_by(f64::total_cmp)
}

/// Per break of the progress log: the epochs computed again that some copy had computed by
/// `cutoff` (all of them when there is no cutoff or the break came first).
fn lost_before(
    analysis: &training::TrainingRecord,
    logs: &[(String, crate::workload::Progress)],
    cutoff: Option<f64>,
) -> Vec<u32> {
    analysis
        .resumed_from
        .iter()
        .zip(&analysis.redone_epochs)
        .zip(analysis.segments.iter().skip(1))
        .map(|((from, redone), segment)| match cutoff {
            Some(at) if at < segment.first_at => training::epoch_at(logs, at)
                .saturating_sub(*from)
                .min(*redone),
            _ => *redone,
        })
        .collect()
}

/// Decides the findings of a finished run.
fn verdict(
    record: &mut RunRecord,
    reference: &Reference,
    settings: &SuiteSettings,
    damaged: Option<&(String, String)>,
) {
    let mut findings = Vec::new();
    let interval_s = automigrate_core::units::parse_duration(&settings.checkpoint_interval)
        .map(|interval| interval.as_secs_f64())
        .unwrap_or(1.0);
    let window_s = interval_s + CONTROLLER_PASSES_S;
    record.redone_allowed = (window_s / reference.epoch_s.max(1e-3)).ceil() as u32 + 1;
    if record.double_running() {
        findings.push(format!(
            "double running: at most {} copies ran at once in runc ({} of {} samples with two or more); two copies appended to the progress log at once: {}",
            record.copies.max_running,
            record.copies.overlapping_samples,
            record.copies.samples,
            record.progress_interleaved
        ));
    }
    if let Some((node, id)) = damaged {
        let restored_damaged = record.migrations.iter().any(|migration| {
            migration.checkpoint.as_deref() == Some(id.as_str())
                && &migration.target == node
                && migration.phase == Some(Phase::Succeeded)
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
        .filter(|migration| !migration.is_terminal())
        .collect();
    if record.deadline_hit || !unfinished.is_empty() {
        findings.push(format!(
            "{STUCK}: deadline hit: {}; migrations not in a terminal phase: {}",
            record.deadline_hit,
            unfinished
                .iter()
                .map(|migration| format!(
                    "{} in {} ({})",
                    migration.name,
                    migration.phase_name(),
                    migration.message.as_deref().unwrap_or("no message")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for migration in &record.migrations {
        if migration.is_terminal()
            && migration
                .message
                .as_ref()
                .is_none_or(|message| message.trim().is_empty())
        {
            findings.push(format!(
                "migration {} ended {} without a reason",
                migration.name,
                migration.phase_name()
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
            "training did not finish (last epoch {:?})",
            record.final_epoch
        ));
    } else if !record.loss_identical {
        findings.push(format!(
            "final loss {} differs from the reference {}",
            record.final_loss_hex.as_deref().unwrap_or("?"),
            reference.loss_hex
        ));
    }
    if let Some(expected) = &record.injection.expected_policy
        && record.policy_outcome.as_ref() != Some(expected)
    {
        findings.push(format!(
            "the controller did not do what it must with the policy edit: expected {expected}, saw {} ({})",
            record.policy_outcome.as_deref().unwrap_or("nothing"),
            record.policy_events.join("; ")
        ));
    }
    if record.fresh_starts > 0 && !record.resumable_before_fault.is_empty() {
        findings.push(format!(
            "a copy started training from the beginning although intact checkpoints existed: {}",
            record.resumable_before_fault.join(", ")
        ));
    }
    let allowed = record.redone_allowed;
    let lost = if record.lost_epochs.len() == record.redone_epochs.len() {
        &record.lost_epochs
    } else {
        &record.redone_epochs
    };
    let resumed_redone: Vec<u32> = record
        .resumed_from
        .iter()
        .zip(lost)
        .filter(|(from, redone)| **from > 0 && **redone > allowed)
        .map(|(_, redone)| *redone)
        .collect();
    if !resumed_redone.is_empty() {
        findings.push(format!(
            "epochs lost beyond one checkpoint interval: lost {resumed_redone:?} computed before the work cutoff, allowed {allowed} (redone in all {:?})",
            record.redone_epochs
        ));
    }
    if record.fault_fired {
        findings.extend(home_node_findings(record));
    }
    record.findings = findings;
}

/// Issue 16's expectations beyond the common rules. `peer-cut`: the node still reaches the
/// API server, so nothing may be fenced, moved or stopped: any migration (in a run that
/// provoked a live migration itself: any migration with another trigger than that one) and any
/// copy begun after the fault are findings. `api-cut`: the training must run again on another
/// node than the one cut off (with no human action: the suite never acts for one).
fn home_node_findings(record: &RunRecord) -> Vec<String> {
    let mut findings = Vec::new();
    match record.plan.kind {
        FaultKind::PeerCut => {
            let provoked = record.plan.trigger == Trigger::Degradation;
            let provoked_trigger = record
                .migrations
                .first()
                .filter(|_| provoked)
                .map(|migration| migration.trigger.clone());
            let moved: Vec<String> = record
                .migrations
                .iter()
                .filter(|migration| Some(&migration.trigger) != provoked_trigger.as_ref())
                .map(|migration| {
                    format!(
                        "{} ({}, {} → {}, {})",
                        migration.name,
                        migration.trigger,
                        migration.source,
                        migration.target,
                        migration.phase_name()
                    )
                })
                .collect();
            if !moved.is_empty() {
                findings.push(format!(
                    "a node cut off from its peers only (still reaching the API server) had its training moved: {}",
                    moved.join(", ")
                ));
            }
            if !provoked && (record.downtime.restarted() || record.fresh_starts > 0) {
                findings.push(format!(
                    "a node cut off from its peers only had its training stopped or restarted: a copy began after the fault ({})",
                    record.downtime.describe()
                ));
            }
        }
        FaultKind::ApiCut => {
            let cut = record.injection.node.as_deref().unwrap_or(HOME_NODE);
            let elsewhere = matches!(
                &record.downtime,
                downtime::Downtime::Resumed { node, .. } if node != cut
            );
            // Training that ended on the cut node before its agent had to stop it (the
            // self-fence window after the cut) was never the product's to move.
            let ended_in_window = matches!(record.downtime, downtime::Downtime::NotStopped)
                && record
                    .training_finished_at
                    .zip(record.injection.at)
                    .is_some_and(|(done, cut_at)| done <= cut_at + SELF_FENCE_WINDOW_S);
            if !elsewhere && !ended_in_window {
                findings.push(format!(
                    "the training of a node cut off from the API server but alive ({cut}) was not resumed on another node (downtime: {})",
                    record.downtime.describe()
                ));
            }
        }
        _ => {}
    }
    findings
}

/// The local cluster's self-fence window after a cut: `selfFenceAfter` (3 s, counted from
/// the last heartbeat, which is no later than the cut) plus `stopTime` (2 s)
/// ([`crate::kube::KubeClusterConfig::self_fence_timing`]). A training that ends on a cut
/// node within it ended before the node had to be fenced.
const SELF_FENCE_WINDOW_S: f64 = 5.0;

/// Every kind.
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
        "source-partition of the embedded suite (the home node partitioned, fenced out of band by \
         the embedded controller's SIGKILL): the real controller has no such power; the same \
         situation is api-cut-taint and api-cut-administrator, reported on their own lines"
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

    #[test]
    fn controller_kills_aim_at_every_phase_in_turn() {
        let plans = plan_runs(3, 7, &[FaultKind::ControllerKill]);
        let phases: Vec<Phase> = plans
            .iter()
            .filter_map(|plan| match plan.params {
                FaultParams::ControllerKill { phase, .. } => Some(phase),
                _ => None,
            })
            .collect();
        let expected: Vec<Phase> = controller_kill::PHASES
            .iter()
            .map(|(phase, _)| *phase)
            .collect();
        assert_eq!(phases, expected);
    }

    fn settings() -> SuiteSettings {
        standard_settings(
            PathBuf::from("/nonexistent"),
            PathBuf::from("/nonexistent"),
            1,
            1,
            all_kinds(),
        )
    }

    fn judged(change: impl FnOnce(&mut RunRecord)) -> RunRecord {
        let plan = plan_runs(1, 1, &[FaultKind::TargetDeath]).remove(0);
        let mut record = RunRecord::not_carried_out(
            &plan,
            &FaultError::Setup("test".into()),
            Duration::from_secs(1),
        );
        record.findings.clear();
        record.training_finished = true;
        record.final_epoch = Some(160);
        record.final_loss_hex = Some("0x1p-5".into());
        change(&mut record);
        let reference = Reference {
            loss_hex: "0x1p-5".into(),
            training_s: 16.0,
            epoch_s: 0.1,
        };
        verdict(&mut record, &reference, &settings(), None);
        record
    }

    fn migration(phase: Option<Phase>, message: Option<&str>) -> MigrationOutcome {
        MigrationOutcome {
            name: "trainer-x".into(),
            trigger: "NodeFailed".into(),
            source: "node-a".into(),
            target: "node-b".into(),
            phase,
            message: message.map(str::to_string),
            checkpoint: Some("c-2".into()),
            fresh_start: false,
            old_pod: "trainer".into(),
            replacement_pod: Some("trainer-m".into()),
            history: Vec::new(),
            downtime_s: None,
        }
    }

    #[test]
    fn a_clean_run_has_no_findings_and_each_violation_is_one() {
        assert!(judged(|_| {}).findings.is_empty());
        let double = judged(|record| record.copies.max_running = 2);
        assert!(double.double_running() && double.findings.len() == 1);
        let interleaved = judged(|record| record.progress_interleaved = true);
        assert!(interleaved.double_running());
        let stuck = judged(|record| record.deadline_hit = true);
        assert!(stuck.stuck());
        let loss = judged(|record| record.final_loss_hex = Some("0x1p-4".into()));
        assert!(!loss.loss_identical && loss.findings.len() == 1);
        let restart = judged(|record| {
            record.fresh_starts = 1;
            record.resumable_before_fault = vec!["c-2 on node-b".into()];
        });
        assert_eq!(restart.findings.len(), 1);
        // 5 s interval + 2 s of controller passes at 0.1 s per epoch: 70 + 1.
        let lost = judged(|record| {
            record.resumed_from = vec![10];
            record.redone_epochs = vec![72];
        });
        assert_eq!(lost.redone_allowed, 71);
        assert_eq!(lost.findings.len(), 1, "{:?}", lost.findings);
        let policy = judged(|record| {
            record.injection.expected_policy = Some("refused".into());
            record.policy_outcome = Some("applied".into());
        });
        assert_eq!(policy.findings.len(), 1);
    }

    #[test]
    fn work_the_source_did_after_its_final_dump_is_not_counted_as_lost() {
        // A live migration: the dump ended (Transferring began) at 10 s, epoch 20; the source
        // trained on to epoch 120 until it was fenced; the replacement resumed after 20.
        let line =
            |epoch: u32, at: f64| format!("epoch={epoch} loss=0.5 hex=0x1.0p-1 run=1 t={at}");
        // Epoch 20 at 10 s, epoch 120 at 20 s.
        let old: Vec<String> = (1..=120u32)
            .map(|epoch| line(epoch, 8.0 + f64::from(epoch) * 0.1))
            .collect();
        let parse = |lines: &[String]| crate::workload::Progress {
            lines: lines
                .iter()
                .filter_map(|line| crate::workload::parse_line(line))
                .collect(),
        };
        let logs = vec![
            ("node-a".to_string(), parse(&old)),
            (
                "node-b".to_string(),
                parse(&[line(21, 22.0), line(22, 22.1)]),
            ),
        ];
        let analysis = training::analyse_nodes(&logs);
        assert_eq!(analysis.redone_epochs, vec![100]);
        let mut migration = migration(Some(Phase::Succeeded), Some("done"));
        migration.history = ["Pending", "Checkpointing", "Transferring", "Fencing"]
            .iter()
            .enumerate()
            .map(|(index, phase)| api::PhaseStep {
                phase: (*phase).into(),
                seconds: 1.0,
                started_at: Some(7.0 + index as f64 * 1.5),
            })
            .collect();
        let cutoff = work_cutoff(FaultKind::AgentOutage, Some(12.0), &[migration]);
        assert_eq!(cutoff, Some(10.0));
        assert_eq!(lost_before(&analysis, &logs, cutoff), vec![0]);
        // No live dump and a fault that does not strand the node: all 100 count.
        assert_eq!(work_cutoff(FaultKind::PowerOff, Some(12.0), &[]), None);
        assert_eq!(lost_before(&analysis, &logs, None), vec![100]);
        // Cut off from the API server at 12 s (epoch 20 by then): only work before it counts.
        assert_eq!(work_cutoff(FaultKind::ApiCut, Some(12.0), &[]), Some(12.0));
        let judged_lost = |lost: Vec<u32>| {
            judged(|record| {
                record.resumed_from = vec![20];
                record.redone_epochs = vec![100];
                record.lost_epochs = lost.clone();
            })
        };
        assert!(judged_lost(vec![0]).findings.is_empty());
        assert_eq!(judged_lost(vec![100]).findings.len(), 1);
    }

    #[test]
    fn a_migration_ending_without_a_reason_or_mid_way_is_a_finding() {
        let silent = judged(|record| {
            record.migrations = vec![migration(Some(Phase::Failed), None)];
        });
        assert_eq!(silent.findings.len(), 1);
        let midway = judged(|record| {
            record.migrations = vec![migration(Some(Phase::Fencing), Some("waiting"))];
        });
        assert!(midway.stuck());
        let unstarted = judged(|record| record.migrations = vec![migration(None, None)]);
        assert!(unstarted.stuck());
        let damaged = plan_runs(1, 1, &[FaultKind::CorruptAtRest]).remove(0);
        let mut record = judged(|record| {
            record.migrations = vec![migration(Some(Phase::Succeeded), Some("moved"))];
        });
        record.plan = damaged;
        let reference = Reference {
            loss_hex: "0x1p-5".into(),
            training_s: 16.0,
            epoch_s: 0.1,
        };
        verdict(
            &mut record,
            &reference,
            &settings(),
            Some(&("node-b".into(), "c-2".into())),
        );
        assert!(record.corrupted_restore());
    }

    fn home_plan(kind: FaultKind, moment: home_node::Moment) -> FaultPlan {
        let trigger = match moment {
            home_node::Moment::MigrationPhase { .. } => Trigger::Degradation,
            _ => Trigger::TheFault,
        };
        FaultPlan {
            index: 0,
            kind,
            seed: 1,
            trigger,
            percent: 30,
            params: FaultParams::HomeNode { moment },
        }
    }

    fn resumed_on(node: &str) -> downtime::Downtime {
        downtime::Downtime::Resumed {
            seconds: 9.0,
            node: node.into(),
        }
    }

    #[test]
    fn a_peer_cut_node_whose_training_moves_or_stops_is_a_finding() {
        let peer_cut = |moment, change: &dyn Fn(&mut RunRecord)| {
            judged(|record| {
                record.plan = home_plan(FaultKind::PeerCut, moment);
                record.fault_fired = true;
                record.injection.node = Some(HOME_NODE.into());
                record.downtime = downtime::Downtime::NotStopped;
                change(record);
            })
        };
        let percent = home_node::Moment::Percent;
        assert!(peer_cut(percent, &|_| {}).findings.is_empty());
        let moved = peer_cut(percent, &|record| {
            record.migrations = vec![migration(Some(Phase::Succeeded), Some("moved"))];
        });
        assert_eq!(moved.findings.len(), 1, "{:?}", moved.findings);
        assert!(moved.findings[0].contains("moved"), "{:?}", moved.findings);
        let stopped = peer_cut(percent, &|record| record.downtime = resumed_on("node-a"));
        assert_eq!(stopped.findings.len(), 1, "{:?}", stopped.findings);
        assert!(stopped.findings[0].contains("stopped or restarted"));
        // A live migration the run provoked (degradation) is allowed; one for a failure is not.
        let phase = home_node::Moment::MigrationPhase {
            phase: Phase::Transferring,
            delay_ms: 0,
        };
        let degradation = |trigger: &str| {
            let mut migration = migration(Some(Phase::RolledBack), Some("rolled back"));
            migration.trigger = trigger.into();
            migration
        };
        let provoked = peer_cut(phase, &|record| {
            record.migrations = vec![degradation("NodeCondition")];
            record.downtime = resumed_on("node-a");
        });
        assert!(provoked.findings.is_empty(), "{:?}", provoked.findings);
        let failed_over = peer_cut(phase, &|record| {
            record.migrations = vec![degradation("NodeCondition"), degradation("NodeFailed")];
        });
        assert_eq!(failed_over.findings.len(), 1, "{:?}", failed_over.findings);
        // Other kinds are not judged by it.
        let other = judged(|record| {
            record.fault_fired = true;
            record.migrations = vec![migration(Some(Phase::Succeeded), Some("moved"))];
            record.downtime = resumed_on("node-b");
        });
        assert!(other.findings.is_empty(), "{:?}", other.findings);
    }

    #[test]
    fn an_api_cut_node_whose_training_does_not_resume_elsewhere_is_a_finding() {
        let api_cut = |downtime: downtime::Downtime| {
            judged(|record| {
                record.plan = home_plan(FaultKind::ApiCut, home_node::Moment::Percent);
                record.fault_fired = true;
                record.injection.node = Some(HOME_NODE.into());
                record.downtime = downtime;
            })
        };
        assert!(api_cut(resumed_on("node-b")).findings.is_empty());
        // Trained on where it was cut off (nobody fenced it), or restarted there.
        assert_eq!(api_cut(downtime::Downtime::NotStopped).findings.len(), 1);
        assert_eq!(api_cut(resumed_on(HOME_NODE)).findings.len(), 1);
        // The training ended on the cut node 3 s after the cut, inside the self-fence window:
        // there was nothing to move. 10 s after: its agent should have stopped it.
        let ended_after = |seconds: f64| {
            judged(|record| {
                record.plan = home_plan(FaultKind::ApiCut, home_node::Moment::Percent);
                record.fault_fired = true;
                record.injection.node = Some(HOME_NODE.into());
                record.injection.at = Some(100.0);
                record.training_finished_at = Some(100.0 + seconds);
                record.downtime = downtime::Downtime::NotStopped;
            })
        };
        assert!(ended_after(3.0).findings.is_empty());
        assert_eq!(ended_after(10.0).findings.len(), 1);
    }

    #[test]
    fn outcomes_count_repeated_phases() {
        assert_eq!(outcome_of(&[]), "none");
        let migrations = [
            migration(Some(Phase::Failed), Some("x")),
            migration(Some(Phase::Failed), Some("x")),
            migration(Some(Phase::Succeeded), Some("x")),
        ];
        assert_eq!(outcome_of(&migrations), "Failed×2+Succeeded");
    }

    #[test]
    fn kinds_parse_by_name_and_run_names_are_short() {
        for kind in FaultKind::ALL {
            assert_eq!(kind.name().parse::<FaultKind>().unwrap(), kind);
        }
        assert!("nonsense".parse::<FaultKind>().is_err());
        for plan in plan_runs(3, 30, &all_kinds()) {
            assert!(plan.name().len() <= 12, "{}", plan.name());
            assert!((20..=55).contains(&plan.percent));
        }
    }

    #[test]
    fn the_trainer_pod_is_protected_and_runs_on_the_home_node() {
        let pod = trainer_pod(&settings());
        assert_eq!(pod["spec"]["nodeName"], HOME_NODE);
        assert_eq!(
            pod["metadata"]["annotations"]["automigrate.dev/protect"],
            "true"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["automigrate.dev/checkpoint-interval"],
            "5s"
        );
        assert_eq!(pod["spec"]["containers"][0]["command"][4], "160");
    }

    #[test]
    fn the_suite_policy_loads_and_the_prepared_edits_apply_to_it() {
        use automigrate_core::Policy;
        use automigrate_core::policy::configmaps_from_yaml;
        let documents = configmaps_from_yaml(SUITE_POLICY).unwrap();
        let text = documents[0].policy_text().unwrap().to_string();
        assert!(Policy::from_yaml("default", &text).is_ok());
        for (from, to) in policy_edit::VALID_EDITS {
            assert!(text.contains(from), "{from}");
            assert!(
                Policy::from_yaml("default", &text.replacen(from, to, 1)).is_ok(),
                "{to}"
            );
        }
        for (from, to) in policy_edit::INVALID_EDITS {
            assert!(text.contains(from), "{from}");
            assert!(
                Policy::from_yaml("default", &text.replacen(from, to, 1)).is_err(),
                "{to}"
            );
        }
    }
}
