//! The port: every effect the migration driver has on the world, and every fact it reads from
//! it, behind one narrow trait. The operator implements it with the API server and the node
//! agents, the simulator with its cost model, the tests with a recording double.
//!
//! A port serves one migration (it knows the pod, its nodes and where to persist). Its
//! methods return futures so a port may do I/O; a port that answers at once (the simulator, a
//! test double) drives the driver with [`super::Driver::advance_ready`].

use std::future::Future;
use std::time::Duration;

use jiff::Timestamp;

use super::run::{Run, TransferRecord};
use crate::migration::MigrationState;
use crate::model::NodeName;

/// What the port sees of the source node and pod, read fresh on every turn of the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Whether the source node is reachable (the operator: its Ready condition is True).
    pub source_reachable: bool,
    /// Whether the source workload runs (meaningful when the node is reachable).
    pub source_running: bool,
    /// Whether the replacement the migration started runs.
    pub target_running: bool,
    /// Whether the source node is known at all (the operator: a Node object exists).
    pub source_known: bool,
    /// When the source node last renewed its Lease; `None` without a Lease.
    pub source_renewed_at: Option<Timestamp>,
    /// Whether the source node is marked out of service (its pods cannot run any more).
    pub source_out_of_service: bool,
}

/// What the port sees of the target node, read on the turns where losing it matters
/// ([`crate::migration::target_loss_matters`]). The default is a node that looks alive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetObservation {
    /// The target node is not known any more (the operator: no Node object).
    pub gone: bool,
    /// When the target node last renewed its Lease; `None` without a Lease.
    pub renewed_at: Option<Timestamp>,
    /// The target node is marked out of service.
    pub out_of_service: bool,
}

/// One copy of a stored checkpoint of the migrating pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointCopy {
    pub id: String,
    pub taken_at: Timestamp,
    /// The node that holds this copy.
    pub node: NodeName,
    /// The holder's store checked the copy against its manifest.
    pub verified: bool,
    /// Measured round trip from the holder to the target; `None` when not measured.
    pub rtt_to_target: Option<Duration>,
}

/// A replacement is started by the migration itself or by its rollback (the port names them
/// apart: both may exist while a rollback stops the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Migration,
    Rollback,
}

/// The effects the driver asks for, besides transfers and persisting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop-and-dump the source; `Done` names the checkpoint.
    FinalCheckpoint,
    /// Stop the source workload; `Done` once it is gone.
    StopSource,
    /// Mark the dead source node out of service, so its pods cannot run again; `reason` says
    /// why it counts as dead.
    MarkOutOfService { reason: String },
    /// Start the workload on `node`, from checkpoint `from` (a verified one), or fresh.
    StartReplacement {
        node: NodeName,
        from: Option<String>,
        role: Role,
    },
    /// `Done` once the replacement runs and makes progress; then remove what is left of the
    /// source (forcibly when `source_dead`).
    CheckReplacement { source_dead: bool },
    /// Stop the replacement the migration started; `Done` once it is gone.
    StopReplacement,
}

/// What carrying out an action came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done { checkpoint_id: Option<String> },
    Failed { reason: String, retryable: bool },
    Waiting { why: String },
}

impl Outcome {
    pub fn done() -> Self {
        Self::Done {
            checkpoint_id: None,
        }
    }

    pub fn waiting(why: impl Into<String>) -> Self {
        Self::Waiting { why: why.into() }
    }
}

/// How a transfer stands on the sending node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferStatus {
    Running {
        id: String,
        bytes_done: u64,
        bytes_total: u64,
    },
    Succeeded {
        id: String,
        bytes_done: u64,
        bytes_total: u64,
    },
    Failed {
        reason: String,
    },
    /// The sender does not know the transfer (it restarted): start it again.
    Unknown,
}

/// A step the port could not carry out at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    pub reason: String,
    pub retryable: bool,
}

/// A persisted state could not be written: the driver stops and the migration resumes from
/// the last state that was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("persisting the migration failed: {reason}")]
pub struct PersistError {
    pub reason: String,
    /// A label for metrics.
    pub label: &'static str,
}

/// Everything the driver does to the world.
pub trait Port {
    /// The time now. The driver reads no clock; the port says how time passes while it works
    /// (the simulator's virtual time, the operator's clock, a test's script).
    fn now(&mut self) -> Timestamp;

    /// What is true of the source and the replacement now.
    fn observe(&mut self, run: &Run) -> impl Future<Output = Observation> + Send;

    /// What is true of the target node now. A port that cannot tell answers the default (a
    /// live node): the driver then never treats the target as lost.
    fn observe_target(&mut self, _run: &Run) -> impl Future<Output = TargetObservation> + Send {
        std::future::ready(TargetObservation::default())
    }

    /// The id of a verified checkpoint of this pod the source holds, taken at or after `since`
    /// (a final dump that completed before a crash); asked only while Checkpointing.
    fn final_dump_since(&mut self, since: Timestamp)
    -> impl Future<Output = Option<String>> + Send;

    /// The stored checkpoints of the pod on nodes the port can reach (the driver chooses): what
    /// the holders hold, not only what was recorded (a replica may land unseen when its
    /// sender dies before the transfer's success is read).
    fn stored_checkpoints(&mut self, run: &Run)
    -> impl Future<Output = Vec<CheckpointCopy>> + Send;

    /// Starts `record` when it has no id, else reads its status.
    fn transfer(
        &mut self,
        record: &TransferRecord,
    ) -> impl Future<Output = Result<TransferStatus, StepFailure>> + Send;

    /// Carries out one action.
    fn act(&mut self, run: &Run, action: &Action) -> impl Future<Output = Outcome> + Send;

    /// Persists `run`. `previous` is the state before the event that moved it, when a
    /// state-machine event did (for phase metrics, logs and Events).
    fn persist(
        &mut self,
        run: &Run,
        previous: Option<&MigrationState>,
    ) -> impl Future<Output = Result<(), PersistError>> + Send;
}
