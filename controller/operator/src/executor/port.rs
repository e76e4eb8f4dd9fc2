//! The operator's side of the migration driver's [`Port`]: one [`OperatorPort`] per `advance`
//! of one Migration, carrying out what the driver asks with the API server (reflector stores
//! and the writer) and the node agents. The calls themselves live in the files named after
//! what they do: [`super::observe`], [`super::transfers`], [`super::pods`], [`super::fence`],
//! [`super::persist`].

use automigrate_core::driver::{
    Action, CheckpointCopy, Observation, Outcome, PersistError, Port, Role, Run, StepFailure,
    TargetObservation, TransferRecord, TransferStatus,
};
use automigrate_core::migration::MigrationState;
use automigrate_core::units;
use jiff::Timestamp;

use super::Executor;
use crate::crd::{Migration, MigrationStatus};
use crate::writer::WriteError;

/// One Migration as the driver works on it.
pub(crate) struct OperatorPort<'a> {
    pub(super) executor: &'a Executor,
    /// The Migration as last persisted.
    pub(super) current: Migration,
    /// Its status as last persisted, plus what the port's own steps changed since (the
    /// replacement's name); the driver's run is merged in when it persists.
    pub(super) status: MigrationStatus,
    /// `now` as the caller gave it, and the clock's reading then (see `Executor::with_clock`).
    base: Timestamp,
    clock_at_start: Option<Timestamp>,
    /// Why the last persist failed, for the caller's error.
    pub(super) write_error: Option<WriteError>,
}

impl<'a> OperatorPort<'a> {
    pub(super) fn new(
        executor: &'a Executor,
        current: Migration,
        status: MigrationStatus,
        now: Timestamp,
    ) -> Self {
        Self {
            executor,
            current,
            status,
            base: now,
            clock_at_start: executor.clock.as_ref().map(|clock| clock.now()),
            write_error: None,
        }
    }
}

impl OperatorPort<'_> {
    /// The round's `now`, moved on by the clock since the round began.
    pub(super) fn clock_now(&self) -> Timestamp {
        match (&self.executor.clock, self.clock_at_start) {
            (Some(clock), Some(start)) => units::after(self.base, units::age(clock.now(), start)),
            _ => self.base,
        }
    }
}

impl Port for OperatorPort<'_> {
    fn now(&mut self) -> Timestamp {
        self.clock_now()
    }

    async fn observe(&mut self, run: &Run) -> Observation {
        self.observation(run)
    }

    async fn observe_target(&mut self, run: &Run) -> TargetObservation {
        self.target_observation(&run.state.target)
    }

    async fn final_dump_since(&mut self, since: Timestamp) -> Option<String> {
        self.final_dump(since).await
    }

    async fn stored_checkpoints(&mut self, run: &Run) -> Vec<CheckpointCopy> {
        self.checkpoint_copies(run).await
    }

    async fn transfer(&mut self, record: &TransferRecord) -> Result<TransferStatus, StepFailure> {
        self.drive_transfer(record).await
    }

    async fn act(&mut self, run: &Run, action: &Action) -> Outcome {
        match action {
            Action::FinalCheckpoint => self.final_checkpoint(run).await,
            Action::StopSource => self.stop_source().await,
            Action::MarkOutOfService { reason } => {
                let now = self.now();
                self.mark_out_of_service(&run.state.source, reason, now)
                    .await
            }
            Action::StartReplacement { node, from, role } => {
                self.start_replacement(node, from.as_deref(), *role == Role::Rollback)
                    .await
            }
            Action::CheckReplacement { source_dead } => self.check_replacement(*source_dead).await,
            Action::StopReplacement => {
                let now = self.now();
                self.stop_replacement(run, now).await
            }
        }
    }

    async fn persist(
        &mut self,
        run: &Run,
        previous: Option<&MigrationState>,
    ) -> Result<(), PersistError> {
        let now = self.now();
        self.save(run, previous, now).await
    }
}
