//! The migration state machine: one migration of one pod from a source node to a target node.
//!
//! The whole state is [`MigrationState`], plain serialisable data that a driver persists (the
//! Kubernetes controller keeps it in the Migration resource's status). A driver's loop is:
//!
//! 1. [`observe`] what is true now (is the source running, is the target running, did the step
//!    in flight finish) and turn it into an [`Event`];
//! 2. [`apply`] events, including [`timeout`] ones, to move between phases;
//! 3. carry out [`step`], the one action the current phase asks for.
//!
//! Every step is idempotent, so a driver that crashed in any phase restarts by running the same
//! loop from the persisted state: it re-observes, then resumes or rolls back. The phases are
//!
//! ```text
//! Pending → Syncing → Checkpointing → Transferring → Fencing → Restoring → Verifying → Succeeded
//!              └──── (source dead: use the latest checkpoint) ───┘                  └─→ Restarted
//! any failure → RollingBack → RolledBack | Restarted,   or → Failed
//! ```
//!
//! Availability comes first: no migration may end with the workload stopped and nowhere
//! running while it could still be brought back. The retry and escalation rules:
//!
//! - A **retryable** step failure (an agent or the API server unreachable for a moment) never
//!   leaves the phase: the step is tried again after a backoff computed from the attempt count
//!   alone ([`retry_delay`]: 1 s, 2 s, 4 s … capped at 30 s), recorded as
//!   [`MigrationState::retry_at`] so a restarted driver honours it. Only the phase's deadline
//!   ([`timeout`]) or a non-retryable failure ends the phase. Drivers pass `now`; this module
//!   reads no clock.
//! - A **rollback** that cannot complete does not give up on the workload: when its deadline
//!   passes (or its step fails for good) while it was restoring the checkpoint on the source,
//!   it escalates once to starting the workload fresh on the target
//!   ([`RollbackAction::RestartFresh`]), unless the policy's fallback is `fail`.
//! - A rollback that starts the workload again (restored on the source, or fresh) first fences
//!   the source if the migration had not: after a final dump the source pod still exists,
//!   stopped, and a runtime that restarts its container would make a second copy.
//! - [`Phase::Failed`] is left for what a person must look at: a source that cannot be proven
//!   stopped (fencing), a policy whose fallback is `fail`, or a rollback that has exhausted
//!   its escalation. Drivers raise an alert for it.
//!
//! The fencing rule: the replacement may start only once the source is stopped or confirmed
//! dead (`source_fenced`), and a rollback that starts the workload again first stops the
//! replacement. So at no point may two copies of one training pod run.

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::NodeName;
use crate::policy::{Fallback, Policy};
use crate::units;

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
pub enum Phase {
    /// Decided; nothing done yet.
    #[default]
    Pending,
    /// Copying the dataset and the newest checkpoint to the target while the source still runs.
    Syncing,
    /// Final stop-and-dump of the source.
    Checkpointing,
    /// Sending the final checkpoint (only what the target does not have yet).
    Transferring,
    /// Making sure the source cannot run: stopped by us, or its node confirmed dead.
    Fencing,
    /// Starting the replacement on the target from the checkpoint.
    Restoring,
    /// Waiting for the replacement to run and make progress.
    Verifying,
    /// Undoing: stop the replacement if it started, then bring the workload back per policy.
    RollingBack,
    Succeeded,
    /// The workload runs where it was, from the checkpoint or never stopped.
    RolledBack,
    /// The workload was started from the beginning: no checkpoint survived to restore from
    /// ([`MigrationState::started_fresh`]), or a rollback fell back to a fresh start.
    Restarted,
    /// Stopped without moving or restarting the workload; the reason says why.
    Failed,
}

impl Phase {
    /// The migration ended with the workload started on the target: restored (`Succeeded`)
    /// or from scratch (`Restarted`). The source's pod is then the migration's to remove, and
    /// a decision must never move that pod again.
    pub fn moved_the_workload(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Restarted)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::RolledBack | Phase::Restarted | Phase::Failed
        )
    }

    /// The transitions the machine may make. [`apply`] never makes any other.
    pub fn can_become(self, next: Phase) -> bool {
        use Phase::*;
        match self {
            Pending => matches!(next, Syncing | RollingBack | Failed),
            Syncing => matches!(next, Checkpointing | Fencing | RollingBack | Failed),
            Checkpointing => matches!(next, Transferring | RollingBack | Failed),
            Transferring => matches!(next, Fencing | RollingBack | Failed),
            Fencing => matches!(next, Restoring | RollingBack | Failed),
            Restoring => matches!(next, Verifying | RollingBack | Failed),
            Verifying => matches!(next, Succeeded | Restarted | RollingBack | Failed),
            RollingBack => matches!(next, RolledBack | Restarted | Failed),
            Succeeded | RolledBack | Restarted | Failed => false,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// How a rollback brings the workload back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum RollbackAction {
    /// The source never stopped: just clean up on the target.
    KeepSource,
    /// Restore the checkpoint on the source node (it still works).
    RestoreOnSource,
    /// Start the workload from the beginning on the target.
    RestartFresh,
}

/// The one thing the driver should do now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "step")]
pub enum Step {
    /// Copy dataset and newest checkpoint to the target; the source keeps running.
    SyncData,
    /// Stop-and-dump the source.
    Checkpoint,
    /// Send the final checkpoint to the target.
    TransferCheckpoint,
    /// Ensure the source cannot run: stop and delete it if its node is alive; otherwise confirm
    /// the node is dead (lease expired, out-of-service taint).
    Fence { source_alive: bool },
    /// Start the replacement on the target. Only ever asked for once the source is fenced.
    Restore,
    /// Check that the replacement runs and makes progress.
    Verify,
    /// Stop the replacement first when `stop_target`, then bring the workload back.
    RollBack {
        stop_target: bool,
        action: RollbackAction,
    },
    /// Nothing to do: the migration has ended.
    Done,
}

/// What happened since the last step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "event")]
pub enum Event {
    /// The current phase's step finished. A checkpoint step names the checkpoint it made.
    StepSucceeded { checkpoint_id: Option<String> },
    /// The current phase's step failed. Retryable failures are retried with a backoff until
    /// the phase's deadline; others end the phase at once.
    StepFailed { reason: String, retryable: bool },
    /// The source node died during the migration: no fresh checkpoint can be taken any more.
    SourceLost,
    /// A person or the engine called the migration off.
    Cancel { reason: String },
    /// The target node is lost (its Lease expired, or it left the cluster): nothing started
    /// there can be reached, so the current phase fails for good at once and the rollback
    /// never starts the workload there ([`target_loss_matters`] says when it is applied).
    TargetLost { reason: String },
    /// The target refused to start the workload from a checkpoint that its own store still
    /// verifies intact: the target is at fault (a full disk, a runtime that refuses), not the
    /// image. Applied in Restoring; see [`MigrationState::target_at_fault`].
    TargetAtFault { reason: String },
}

/// What the driver sees when it (re)starts work on a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Facts {
    /// Is the source workload running? `None` when its node cannot be reached.
    pub source_running: Option<bool>,
    /// Is the replacement running on the target?
    pub target_running: bool,
    /// Does the store hold a complete checkpoint taken by this migration?
    pub checkpoint_complete: bool,
}

/// Phase deadlines and retry budget, from the pod's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    #[serde(with = "units::duration")]
    #[cfg_attr(feature = "schemars", schemars(with = "String"))]
    pub sync: Duration,
    #[serde(with = "units::duration")]
    #[cfg_attr(feature = "schemars", schemars(with = "String"))]
    pub checkpoint: Duration,
    #[serde(with = "units::duration")]
    #[cfg_attr(feature = "schemars", schemars(with = "String"))]
    pub transfer: Duration,
    #[serde(with = "units::duration")]
    #[cfg_attr(feature = "schemars", schemars(with = "String"))]
    pub fence: Duration,
    #[serde(with = "units::duration")]
    #[cfg_attr(feature = "schemars", schemars(with = "String"))]
    pub restore: Duration,
    /// No longer ends retrying (the phase deadline does); kept so stored statuses still parse.
    pub max_attempts: u32,
    pub fallback: Fallback,
}

impl Limits {
    pub fn from_policy(policy: &Policy) -> Self {
        Self {
            sync: policy.transfer.timeout,
            checkpoint: policy.checkpoint.timeout,
            transfer: policy.transfer.timeout,
            fence: policy.restore.fence_timeout,
            restore: policy.restore.timeout,
            max_attempts: 3,
            fallback: policy.restore.fallback,
        }
    }

    /// How long a phase may last; `None` for phases that wait on nothing.
    pub fn deadline(&self, phase: Phase) -> Option<Duration> {
        match phase {
            Phase::Syncing => Some(self.sync),
            Phase::Checkpointing => Some(self.checkpoint),
            Phase::Transferring => Some(self.transfer),
            Phase::Fencing => Some(self.fence),
            Phase::Restoring | Phase::Verifying | Phase::RollingBack => Some(self.restore),
            Phase::Pending
            | Phase::Succeeded
            | Phase::RolledBack
            | Phase::Restarted
            | Phase::Failed => None,
        }
    }
}

/// How long one phase took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct PhaseTiming {
    pub phase: Phase,
    pub started_at: Timestamp,
    #[serde(with = "units::duration")]
    #[cfg_attr(feature = "schemars", schemars(with = "String"))]
    pub duration: Duration,
}

/// Everything persisted about one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct MigrationState {
    pub phase: Phase,
    pub source: NodeName,
    pub target: NodeName,
    /// Whether the source node was alive when the migration began; if so a fresh
    /// stop-and-dump checkpoint is taken, otherwise the newest stored one is used.
    pub source_alive: bool,
    /// The source cannot run any more (stopped by us or its node confirmed dead).
    pub source_fenced: bool,
    /// The replacement has been started (it may or may not run now).
    pub target_started: bool,
    pub checkpoint_id: Option<String>,
    pub started_at: Timestamp,
    pub phase_started_at: Timestamp,
    /// Attempts made in the current phase.
    pub attempts: u32,
    /// After a retryable failure: the step is not tried again before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    /// When the workload stopped making progress (the freeze, or the node failure).
    pub downtime_started_at: Option<Timestamp>,
    #[serde(default, with = "units::option_duration")]
    #[cfg_attr(feature = "schemars", schemars(with = "Option<String>"))]
    pub downtime: Option<Duration>,
    pub rollback: Option<RollbackAction>,
    pub history: Vec<PhaseTiming>,
    /// Why the migration is where it is: the last failure, or why it ended.
    pub message: Option<String>,
    /// The replacement was started from the beginning, with no checkpoint to restore (set by
    /// the driver as the restore succeeds; the stored checkpoint it would use is the driver's).
    /// Verifying then ends [`Phase::Restarted`], not `Succeeded`: the training lost its
    /// progress, and users, reports and alerts must not read that as a migration.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started_fresh: bool,
}

/// An event that the current phase cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("migration in phase {phase} cannot take event {event}")]
pub struct TransitionError {
    pub phase: Phase,
    pub event: String,
}

impl MigrationState {
    /// A new migration. `source_alive` is false when the source node has already failed; then
    /// `failed_at` (its last heartbeat) starts the downtime clock.
    pub fn new(
        source: NodeName,
        target: NodeName,
        source_alive: bool,
        now: Timestamp,
        failed_at: Option<Timestamp>,
    ) -> Self {
        Self {
            phase: Phase::Pending,
            source,
            target,
            source_alive,
            source_fenced: false,
            target_started: false,
            checkpoint_id: None,
            started_at: now,
            phase_started_at: now,
            attempts: 0,
            retry_at: None,
            downtime_started_at: if source_alive {
                None
            } else {
                Some(failed_at.unwrap_or(now))
            },
            downtime: None,
            rollback: None,
            history: Vec::new(),
            message: None,
            started_fresh: false,
        }
    }

    fn enter(&mut self, next: Phase, now: Timestamp) -> Result<(), TransitionError> {
        if !self.phase.can_become(next) {
            return Err(TransitionError {
                phase: self.phase,
                event: format!("transition to {next}"),
            });
        }
        self.close_phase_timing(now);
        self.phase = next;
        Ok(())
    }

    /// Records how long the current phase's step ran and starts its clock and retry budget
    /// afresh at `now` (entering a phase, or the same phase with another step).
    fn close_phase_timing(&mut self, now: Timestamp) {
        self.history.push(PhaseTiming {
            phase: self.phase,
            started_at: self.phase_started_at,
            duration: units::age(now, self.phase_started_at),
        });
        self.phase_started_at = now;
        self.reset_retries();
    }

    fn reset_retries(&mut self) {
        self.attempts = 0;
        self.retry_at = None;
    }

    /// A rollback that starts the workload again must fence the source first (the fencing
    /// rule, which both [`step`] and the step's success follow).
    fn rollback_must_fence_first(&self) -> bool {
        self.phase == Phase::RollingBack && self.rollback_starts_a_copy() && !self.source_fenced
    }

    /// Whether the rollback starts the workload again (rather than keeping the source).
    fn rollback_starts_a_copy(&self) -> bool {
        matches!(
            self.rollback,
            Some(RollbackAction::RestoreOnSource | RollbackAction::RestartFresh)
        )
    }

    /// Why the migration is rolling back: its message without the rollback's retry note.
    fn rollback_cause(&self) -> String {
        let message = self.message.as_deref().unwrap_or_default();
        message
            .split(ROLLBACK_RETRY)
            .next()
            .unwrap_or(message)
            .to_string()
    }

    /// Ended `Failed` after it began to act: what a person must look at (an alert stays up
    /// until the Migration is deleted). A request refused before it started is answered to the
    /// person who asked and does not count.
    pub fn needs_attention(&self) -> bool {
        self.phase == Phase::Failed
            && self
                .history
                .iter()
                .any(|timing| timing.phase != Phase::Pending)
    }

    /// Whether the current phase has run past its deadline at `now`.
    pub fn past_deadline(&self, limits: &Limits, now: Timestamp) -> bool {
        limits
            .deadline(self.phase)
            .is_some_and(|deadline| units::age(now, self.phase_started_at) >= deadline)
    }

    /// Whether the driver should wait before trying the step again.
    pub fn retry_pending(&self, now: Timestamp) -> bool {
        self.retry_at.is_some_and(|at| at > now)
    }

    /// A rollback that cannot complete: escalate to a fresh start on the target when the
    /// policy allows and that is not what already failed; otherwise a person must look.
    fn rollback_failed(
        &mut self,
        reason: &str,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<(), TransitionError> {
        let escalate = self.rollback == Some(RollbackAction::RestoreOnSource)
            && limits.fallback != Fallback::Fail;
        if !escalate {
            self.message = Some(format!("rollback failed: {reason}"));
            return self.enter(Phase::Failed, now);
        }
        self.close_phase_timing(now);
        self.rollback = Some(RollbackAction::RestartFresh);
        self.message = Some(format!(
            "restoring on the source failed ({reason}); starting the workload fresh on {} per the policy's fallback",
            self.target
        ));
        Ok(())
    }

    /// The target node is lost: fail the phase for good and never pick the lost node again.
    /// Restoring or Verifying roll back to the source when it lives (whatever the fallback
    /// but `fail`: a fresh start would name the lost target); a rollback that was to start
    /// fresh on the target fails. Other phases fail by their own rule.
    fn target_lost(
        &mut self,
        reason: &str,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<(), TransitionError> {
        let lost = format!("target node {} lost: {reason}", self.target);
        let nowhere = || {
            "the workload runs nowhere: a person must start it on a live node (deleting this \
             Migration lets the controller place the pod again)"
        };
        match self.phase {
            Phase::Restoring | Phase::Verifying => {
                self.message = Some(format!("{} failed: {lost}", self.phase));
                if self.source_alive && limits.fallback != Fallback::Fail {
                    self.rollback = Some(RollbackAction::RestoreOnSource);
                    return self.enter(Phase::RollingBack, now);
                }
                if !self.source_alive {
                    // The pod is still on a failed node, so the decision engine places it
                    // again after `retryBackoff` (seen in the issue 12 campaign, f084-td).
                    self.message = Some(format!(
                        "{} failed: {lost}; the source node {} is dead too: the workload runs \
                         nowhere until the controller places it again on a live node after the \
                         retry backoff, from the newest checkpoint that survives",
                        self.phase, self.source,
                    ));
                }
                self.enter(Phase::Failed, now)
            }
            Phase::RollingBack => {
                self.message = Some(format!(
                    "rollback failed: {lost}, so the workload cannot start fresh there; {}",
                    nowhere()
                ));
                self.enter(Phase::Failed, now)
            }
            _ => self.fail(lost, limits, now),
        }
    }

    /// The target refused an intact checkpoint. With a dead source, starting the workload
    /// from the beginning there (what `rollback` falls back to once no source is left) would
    /// throw away a checkpoint that another node can restore, and on the node that just
    /// refused (fault suite, issue 12: f045-tdf, a full disk): the migration fails instead,
    /// nothing having started, and the decision engine places the pod again after
    /// `retryBackoff`, on another node (a node where an attempt failed is left out) and from
    /// the checkpoint. `Failed`, because a node that refuses intact checkpoints needs a
    /// person's look. With a live source (its final dump comes back on it) or
    /// `fallback: restart` (the person asked for a fresh start), the phase fails by its own
    /// rule.
    fn target_at_fault(
        &mut self,
        reason: &str,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<(), TransitionError> {
        if self.source_alive
            || self.phase != Phase::Restoring
            || limits.fallback == Fallback::Restart
        {
            return self.fail(reason.to_string(), limits, now);
        }
        self.message = Some(format!(
            "Restoring failed: {reason}; {} is at fault, not the checkpoint, so the workload is \
             not started from the beginning there: the controller places it on another node from \
             that checkpoint after the retry backoff",
            self.target
        ));
        self.enter(Phase::Failed, now)
    }

    /// Where to go when the current phase cannot complete.
    fn fail(
        &mut self,
        reason: String,
        limits: &Limits,
        now: Timestamp,
    ) -> Result<(), TransitionError> {
        use Phase::*;
        self.message = Some(format!("{} failed: {reason}", self.phase));
        let action = match self.phase {
            // The source has not been touched: it keeps running, or it is dead and there is
            // nothing to roll back to.
            Pending | Syncing | Checkpointing => {
                if self.source_alive {
                    Some(RollbackAction::KeepSource)
                } else {
                    None
                }
            }
            // The source was stopped by the dump (live) or is dead.
            Transferring => self.source_alive.then_some(RollbackAction::RestoreOnSource),
            // Without proof that the source is stopped, starting anything would risk two
            // copies. Stop and let a person look.
            Fencing => None,
            Restoring | Verifying => match limits.fallback {
                Fallback::Rollback if self.source_alive => Some(RollbackAction::RestoreOnSource),
                Fallback::Rollback | Fallback::Restart => Some(RollbackAction::RestartFresh),
                Fallback::Fail => None,
            },
            RollingBack | Succeeded | RolledBack | Restarted | Failed => None,
        };
        match action {
            Some(action) => {
                self.rollback = Some(action);
                self.enter(RollingBack, now)
            }
            None => self.enter(Failed, now),
        }
    }

    fn succeed(
        &mut self,
        checkpoint_id: Option<String>,
        now: Timestamp,
    ) -> Result<(), TransitionError> {
        use Phase::*;
        match self.phase {
            Pending => self.enter(Syncing, now),
            Syncing if self.source_alive => {
                self.downtime_started_at = Some(now);
                self.enter(Checkpointing, now)
            }
            Syncing => self.enter(Fencing, now),
            Checkpointing => {
                if checkpoint_id.is_some() {
                    self.checkpoint_id = checkpoint_id;
                }
                self.enter(Transferring, now)
            }
            Transferring => self.enter(Fencing, now),
            Fencing => {
                self.source_fenced = true;
                self.enter(Restoring, now)
            }
            Restoring => {
                self.target_started = true;
                self.enter(Verifying, now)
            }
            Verifying => {
                self.downtime = self.downtime_started_at.map(|since| units::age(now, since));
                if self.started_fresh {
                    let why = if self.source_alive {
                        "the migration had no checkpoint to restore from".to_string()
                    } else {
                        format!(
                            "no verified checkpoint of the workload survived the loss of node {}",
                            self.source
                        )
                    };
                    self.message = Some(format!(
                        "training restarted from scratch on {}: {why}; its progress is lost",
                        self.target
                    ));
                    return self.enter(Restarted, now);
                }
                self.message = Some("the replacement runs and makes progress".into());
                self.enter(Succeeded, now)
            }
            // A rollback that starts a copy fences the source first (see `step`).
            RollingBack if self.rollback_must_fence_first() => {
                self.source_fenced = true;
                self.reset_retries();
                Ok(())
            }
            RollingBack => {
                let ended = match self.rollback {
                    Some(RollbackAction::RestartFresh) => Restarted,
                    _ => RolledBack,
                };
                self.target_started = false;
                // The message says why it rolled back, not the rollback's last retry.
                self.message = Some(self.rollback_cause());
                self.enter(ended, now)
            }
            Succeeded | RolledBack | Restarted | Failed => Err(TransitionError {
                phase: self.phase,
                event: "StepSucceeded".into(),
            }),
        }
    }
}

/// Moves the machine by one event. Terminal phases take no event.
pub fn apply(
    state: &MigrationState,
    event: &Event,
    limits: &Limits,
    now: Timestamp,
) -> Result<MigrationState, TransitionError> {
    let mut next = state.clone();
    if state.phase.is_terminal() {
        return Err(TransitionError {
            phase: state.phase,
            event: format!("{event:?}"),
        });
    }
    match event {
        Event::StepSucceeded { checkpoint_id } => next.succeed(checkpoint_id.clone(), now)?,
        Event::StepFailed { reason, retryable } => {
            if *retryable && !next.past_deadline(limits, now) {
                next.attempts = next.attempts.saturating_add(1);
                let delay = retry_delay(next.attempts);
                next.retry_at = Some(units::after(now, delay));
                let retrying = format!(
                    "attempt {} failed, retrying in {}: {reason}",
                    next.attempts,
                    units::format_duration(delay)
                );
                next.message = Some(if next.phase == Phase::RollingBack {
                    // Keep why it is rolling back; the rollback's own retry follows.
                    format!("{}{ROLLBACK_RETRY}{retrying}", next.rollback_cause())
                } else {
                    format!("{} {retrying}", next.phase)
                });
            } else if next.phase == Phase::RollingBack {
                next.rollback_failed(reason, limits, now)?;
            } else {
                next.fail(reason.clone(), limits, now)?;
            }
        }
        Event::SourceLost => {
            next.source_alive = false;
            match next.phase {
                // No fresh checkpoint is possible: go on with the newest stored one.
                Phase::Pending | Phase::Syncing | Phase::Checkpointing => {
                    next.downtime_started_at.get_or_insert(now);
                    next.message = Some(
                        "source node failed; continuing from the newest stored checkpoint".into(),
                    );
                    if next.phase == Phase::Checkpointing {
                        next.enter(Phase::Transferring, now)?;
                    }
                }
                // The final dump is stranded on the dead node (the driver applies this only
                // while it has not reached the target): forget it and go on with the newest
                // stored checkpoint, as before the dump.
                Phase::Transferring => {
                    next.downtime_started_at.get_or_insert(now);
                    next.checkpoint_id = None;
                    next.message = Some(
                        "source node failed before its final checkpoint reached the target; continuing from the newest stored checkpoint".into(),
                    );
                }
                // Later phases already hold the checkpoint; fencing will confirm the death.
                _ => {}
            }
        }
        // Cancelling is a failure of the current phase, whose rule decides what is safe: a
        // clean rollback before the source is touched, never a second copy after.
        Event::Cancel { reason } => next.fail(format!("cancelled: {reason}"), limits, now)?,
        Event::TargetLost { reason } => next.target_lost(reason, limits, now)?,
        Event::TargetAtFault { reason } => next.target_at_fault(reason, limits, now)?,
    }
    Ok(next)
}

/// Separates a rollback's retry note from the cause in [`MigrationState::message`].
const ROLLBACK_RETRY: &str = "; rollback ";

/// How long to wait before retry number `attempt` (1 for the first retry): 1 s doubling up
/// to 30 s. A pure function of the count, so a restarted driver computes the same schedule.
pub fn retry_delay(attempt: u32) -> Duration {
    const CAP: Duration = Duration::from_secs(30);
    let exponent = attempt.saturating_sub(1).min(5);
    Duration::from_secs(1u64 << exponent).min(CAP)
}

/// The event a deadline produces, if the current phase has run too long.
pub fn timeout(state: &MigrationState, limits: &Limits, now: Timestamp) -> Option<Event> {
    let deadline = limits.deadline(state.phase)?;
    let elapsed = units::age(now, state.phase_started_at);
    (elapsed >= deadline).then(|| Event::StepFailed {
        reason: format!(
            "timed out after {} (limit {})",
            units::format_duration(elapsed),
            units::format_duration(deadline)
        ),
        retryable: false,
    })
}

/// Turns what a (re)started driver sees into the event it implies, so a crash in any phase
/// resumes without redoing finished work and without guessing.
pub fn observe(state: &MigrationState, facts: &Facts) -> Option<Event> {
    match state.phase {
        // A dump that completed before the crash: the source is stopped and the images exist.
        Phase::Checkpointing
            if facts.checkpoint_complete && facts.source_running == Some(false) =>
        {
            Some(Event::StepSucceeded {
                checkpoint_id: None,
            })
        }
        // The dump never happened and the source is gone: it died under us.
        Phase::Checkpointing if facts.source_running.is_none() => Some(Event::SourceLost),
        // The replacement was created before the crash.
        Phase::Restoring if facts.target_running => Some(Event::StepSucceeded {
            checkpoint_id: None,
        }),
        _ => None,
    }
}

/// Whether losing the target node changes what the current phase does, so a driver applies
/// [`Event::TargetLost`] only then: every phase that sends to the target or starts or waits
/// on the workload there, and a rollback that would start it fresh there. Not Checkpointing
/// (the final dump runs on the source; the transfer after it fails instead) nor Fencing (the
/// source is being stopped; Restoring after it fails instead).
pub fn target_loss_matters(state: &MigrationState) -> bool {
    match state.phase {
        Phase::Pending
        | Phase::Syncing
        | Phase::Transferring
        | Phase::Restoring
        | Phase::Verifying => true,
        Phase::RollingBack => state.rollback == Some(RollbackAction::RestartFresh),
        _ => false,
    }
}

/// What the driver should do in the current phase.
pub fn step(state: &MigrationState) -> Step {
    match state.phase {
        Phase::Pending | Phase::Syncing => Step::SyncData,
        Phase::Checkpointing => Step::Checkpoint,
        Phase::Transferring => Step::TransferCheckpoint,
        Phase::Fencing => Step::Fence {
            source_alive: state.source_alive,
        },
        // The fencing rule, enforced where the step is chosen.
        Phase::Restoring if state.source_fenced => Step::Restore,
        Phase::Restoring => Step::Fence {
            source_alive: state.source_alive,
        },
        Phase::Verifying => Step::Verify,
        // The fencing rule again: a rollback that starts a copy (restored on the source or
        // fresh on the target) needs the source stopped or dead first. After a final dump the
        // source pod still exists, stopped; a runtime that restarts its container would make a
        // second copy.
        Phase::RollingBack if state.rollback_must_fence_first() => Step::Fence {
            source_alive: state.source_alive,
        },
        Phase::RollingBack => Step::RollBack {
            stop_target: state.target_started,
            action: state.rollback.unwrap_or(RollbackAction::KeepSource),
        },
        Phase::Succeeded | Phase::RolledBack | Phase::Restarted | Phase::Failed => Step::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn limits() -> Limits {
        Limits::from_policy(&Policy::default())
    }

    fn ok() -> Event {
        Event::StepSucceeded {
            checkpoint_id: None,
        }
    }

    fn run(state: &MigrationState, events: &[Event]) -> MigrationState {
        let mut state = state.clone();
        for (index, event) in events.iter().enumerate() {
            state = apply(&state, event, &limits(), t(10 * (index as i64 + 1))).unwrap();
        }
        state
    }

    #[test]
    fn live_source_goes_through_every_phase() {
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let mut state = start.clone();
        let mut seen = vec![(state.phase, step(&state))];
        let mut now = 0;
        while !state.phase.is_terminal() {
            now += 10;
            let event = Event::StepSucceeded {
                checkpoint_id: (state.phase == Phase::Checkpointing).then(|| "ck-1".to_string()),
            };
            state = apply(&state, &event, &limits(), t(now)).unwrap();
            seen.push((state.phase, step(&state)));
        }
        let phases: Vec<Phase> = seen.iter().map(|(phase, _)| *phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Pending,
                Phase::Syncing,
                Phase::Checkpointing,
                Phase::Transferring,
                Phase::Fencing,
                Phase::Restoring,
                Phase::Verifying,
                Phase::Succeeded
            ]
        );
        assert_eq!(state.checkpoint_id.as_deref(), Some("ck-1"));
        assert_eq!(state.history.len(), 7);
        // Downtime runs from the final dump (entered at t=20) to verification (t=70).
        assert_eq!(state.downtime, Some(Duration::from_secs(50)));
        assert_eq!(step(&state), Step::Done);
    }

    #[test]
    fn dead_source_skips_the_dump() {
        let start = MigrationState::new("a".into(), "b".into(), false, t(0), Some(t(-30)));
        let state = run(&start, &[ok(), ok()]);
        assert_eq!(state.phase, Phase::Fencing);
        assert_eq!(
            step(&state),
            Step::Fence {
                source_alive: false
            }
        );
        let state = run(&state, &[ok(), ok(), ok()]);
        assert_eq!(state.phase, Phase::Succeeded);
        // From the last heartbeat (t=-30) to verification (t=30), not from the decision.
        assert_eq!(state.downtime, Some(Duration::from_secs(60)));
    }

    #[test]
    fn a_replacement_started_from_the_beginning_ends_restarted_not_succeeded() {
        let start = MigrationState::new("a".into(), "b".into(), false, t(0), Some(t(-30)));
        let mut state = run(&start, &[ok(), ok(), ok()]);
        assert_eq!(state.phase, Phase::Restoring);
        // The driver: no checkpoint survived, the replacement starts fresh.
        state.started_fresh = true;
        let state = run(&state, &[ok(), ok()]);
        assert_eq!(state.phase, Phase::Restarted);
        let message = state.message.unwrap();
        assert!(
            message.contains("restarted from scratch") && message.contains("loss of node a"),
            "{message}"
        );
    }

    #[test]
    fn checkpoint_failure_keeps_the_source_running() {
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let failure = Event::StepFailed {
            reason: "criu: dump failed".into(),
            retryable: false,
        };
        let state = run(&start, &[ok(), ok(), failure]);
        assert_eq!(state.phase, Phase::RollingBack);
        assert_eq!(
            step(&state),
            Step::RollBack {
                stop_target: false,
                action: RollbackAction::KeepSource
            }
        );
        let state = run(&state, &[ok()]);
        assert_eq!(state.phase, Phase::RolledBack);
        assert!(state.message.unwrap().contains("criu: dump failed"));
    }

    #[test]
    fn failed_verification_stops_the_replacement_before_rolling_back() {
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let failure = Event::StepFailed {
            reason: "replacement crashed".into(),
            retryable: false,
        };
        let state = run(&start, &[ok(), ok(), ok(), ok(), ok(), ok(), failure]);
        assert_eq!(
            step(&state),
            Step::RollBack {
                stop_target: true,
                action: RollbackAction::RestoreOnSource
            }
        );
    }

    #[test]
    fn unfenced_source_never_gets_a_replacement() {
        let start = MigrationState::new("a".into(), "b".into(), false, t(0), None);
        let state = run(&start, &[ok(), ok()]);
        assert_eq!(state.phase, Phase::Fencing);
        let state = apply(
            &state,
            &timeout(&state, &limits(), t(10_000)).unwrap(),
            &limits(),
            t(10_000),
        )
        .unwrap();
        assert_eq!(state.phase, Phase::Failed);
        assert!(!state.target_started);
        assert!(state.message.unwrap().contains("timed out"));
    }

    fn flaky() -> Event {
        Event::StepFailed {
            reason: "agent unreachable".into(),
            retryable: true,
        }
    }

    #[test]
    fn retryable_failures_back_off_until_the_deadline() {
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let limits = limits();
        let mut state = apply(&start, &ok(), &limits, t(0)).unwrap();
        assert_eq!(state.phase, Phase::Syncing);
        // Many more failures than the old three attempts: still Syncing, each retry later.
        let mut now = 0;
        for attempt in 1..=12u32 {
            state = apply(&state, &flaky(), &limits, t(now)).unwrap();
            assert_eq!((state.phase, state.attempts), (Phase::Syncing, attempt));
            let delay = retry_delay(attempt);
            assert_eq!(state.retry_at, Some(units::after(t(now), delay)));
            assert!(state.retry_pending(t(now)));
            assert!(!state.retry_pending(state.retry_at.unwrap()));
            now += delay.as_secs() as i64;
        }
        assert!(
            state
                .message
                .as_deref()
                .unwrap()
                .contains("retrying in 30s")
        );
        // The deadline, not a count, ends it.
        let deadline = limits.sync.as_secs() as i64;
        let event = timeout(&state, &limits, t(deadline)).unwrap();
        let state = apply(&state, &event, &limits, t(deadline)).unwrap();
        assert_eq!(state.phase, Phase::RollingBack);
        assert_eq!((state.attempts, state.retry_at), (0, None));
    }

    #[test]
    fn retry_delay_doubles_and_is_capped() {
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(30));
    }

    /// The defect this replaces: agents unreachable for ~9 s during the transfer ended the
    /// migration in Failed with the source already stopped.
    #[test]
    fn a_short_agent_outage_while_transferring_is_ridden_out() {
        let limits = limits();
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let mut state = run(&start, &[ok(), ok(), ok()]);
        assert_eq!(state.phase, Phase::Transferring);
        for second in 31..=40 {
            if !state.retry_pending(t(second)) {
                state = apply(&state, &flaky(), &limits, t(second)).unwrap();
            }
            assert_eq!(state.phase, Phase::Transferring);
        }
        let state = apply(&state, &ok(), &limits, t(41)).unwrap();
        assert_eq!(state.phase, Phase::Fencing);
    }

    #[test]
    fn a_rollback_that_cannot_restore_on_the_source_restarts_fresh_after_fencing() {
        let limits = limits();
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let state = run(&start, &[ok(), ok(), ok()]);
        assert_eq!(state.phase, Phase::Transferring);
        let state = apply(
            &state,
            &timeout(&state, &limits, t(100_000)).unwrap(),
            &limits,
            t(100_000),
        )
        .unwrap();
        assert_eq!(state.rollback, Some(RollbackAction::RestoreOnSource));
        // The source's agent stays away: retries, then the rollback's own deadline.
        let state = apply(&state, &flaky(), &limits, t(100_001)).unwrap();
        assert_eq!(state.phase, Phase::RollingBack);
        let later = t(200_000);
        let state = apply(
            &state,
            &timeout(&state, &limits, later).unwrap(),
            &limits,
            later,
        )
        .unwrap();
        assert_eq!(state.phase, Phase::RollingBack, "escalated, not Failed");
        assert_eq!(state.rollback, Some(RollbackAction::RestartFresh));
        assert_eq!(state.phase_started_at, later);
        assert!(!state.source_fenced);
        assert_eq!(step(&state), Step::Fence { source_alive: true });
        let state = apply(&state, &ok(), &limits, t(200_010)).unwrap();
        assert!(state.source_fenced);
        assert_eq!(
            step(&state),
            Step::RollBack {
                stop_target: false,
                action: RollbackAction::RestartFresh
            }
        );
        let state = apply(&state, &ok(), &limits, t(200_020)).unwrap();
        assert_eq!(state.phase, Phase::Restarted);
    }

    #[test]
    fn a_rolled_back_migration_says_why_not_its_last_retry() {
        let limits = limits();
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let state = run(&start, &[ok(), ok(), ok()]);
        let state = apply(
            &state,
            &timeout(&state, &limits, t(100_000)).unwrap(),
            &limits,
            t(100_000),
        )
        .unwrap();
        let state = apply(&state, &flaky(), &limits, t(100_001)).unwrap();
        let state = apply(&state, &flaky(), &limits, t(100_003)).unwrap();
        let message = state.message.clone().unwrap();
        assert!(
            message.starts_with("Transferring failed: timed out")
                && message.contains("; rollback attempt 2 failed, retrying in 2s")
                && message.matches("attempt").count() == 1,
            "{message}"
        );
        // The dumped source is fenced before the checkpoint is restored beside it.
        assert_eq!(step(&state), Step::Fence { source_alive: true });
        let state = apply(&state, &ok(), &limits, t(100_010)).unwrap();
        assert!(state.source_fenced);
        assert_eq!(
            step(&state),
            Step::RollBack {
                stop_target: false,
                action: RollbackAction::RestoreOnSource
            }
        );
        let state = apply(&state, &ok(), &limits, t(100_011)).unwrap();
        assert_eq!(state.phase, Phase::RolledBack);
        let message = state.message.unwrap();
        assert!(
            message.starts_with("Transferring failed: timed out"),
            "{message}"
        );
        assert!(!message.contains("attempt"), "{message}");
    }

    #[test]
    fn a_rollback_under_fallback_fail_ends_failed_for_a_person() {
        let limits = Limits {
            fallback: Fallback::Fail,
            ..limits()
        };
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let mut state = start;
        for _ in 0..3 {
            state = apply(&state, &ok(), &limits, t(0)).unwrap();
        }
        let state = apply(
            &state,
            &timeout(&state, &limits, t(100_000)).unwrap(),
            &limits,
            t(100_000),
        )
        .unwrap();
        let state = apply(
            &state,
            &timeout(&state, &limits, t(200_000)).unwrap(),
            &limits,
            t(200_000),
        )
        .unwrap();
        assert_eq!(state.phase, Phase::Failed);
        assert!(state.message.unwrap().starts_with("rollback failed"));
    }

    #[test]
    fn a_status_written_before_retry_at_existed_still_parses() {
        let state = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let mut value = serde_json::to_value(&state).unwrap();
        assert!(value.get("retryAt").is_none(), "skipped when unset");
        value.as_object_mut().unwrap().remove("retryAt");
        assert_eq!(
            serde_json::from_value::<MigrationState>(value).unwrap(),
            state
        );
    }

    #[test]
    fn source_lost_while_syncing_uses_the_stored_checkpoint() {
        let start = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let state = run(&start, &[ok(), Event::SourceLost, ok()]);
        assert_eq!(state.phase, Phase::Fencing);
        assert!(!state.source_alive);
    }

    #[test]
    fn resume_after_a_crash_uses_what_is_observed() {
        let mut state = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        state = run(&state, &[ok(), ok()]);
        assert_eq!(state.phase, Phase::Checkpointing);
        let finished = Facts {
            source_running: Some(false),
            target_running: false,
            checkpoint_complete: true,
        };
        assert_eq!(observe(&state, &finished), Some(ok()));
        let unreachable = Facts {
            source_running: None,
            ..Facts::default()
        };
        assert_eq!(observe(&state, &unreachable), Some(Event::SourceLost));
        let still_running = Facts {
            source_running: Some(true),
            ..Facts::default()
        };
        assert_eq!(observe(&state, &still_running), None, "redo the dump");
        assert_eq!(step(&state), Step::Checkpoint);
    }

    #[test]
    fn only_a_restore_or_a_fresh_start_moves_the_workload() {
        let moved: Vec<Phase> = [
            Phase::Pending,
            Phase::Syncing,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Fencing,
            Phase::Restoring,
            Phase::Verifying,
            Phase::RollingBack,
            Phase::Succeeded,
            Phase::RolledBack,
            Phase::Restarted,
            Phase::Failed,
        ]
        .into_iter()
        .filter(|phase| phase.moved_the_workload())
        .collect();
        assert_eq!(moved, [Phase::Succeeded, Phase::Restarted]);
    }

    #[test]
    fn terminal_phases_take_no_events() {
        let state = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let state = apply(
            &state,
            &Event::Cancel {
                reason: "user".into(),
            },
            &limits(),
            t(1),
        )
        .unwrap();
        assert_eq!(state.phase, Phase::RollingBack);
        let state = apply(&state, &ok(), &limits(), t(2)).unwrap();
        assert_eq!(state.phase, Phase::RolledBack);
        assert!(apply(&state, &ok(), &limits(), t(3)).is_err());
    }

    #[test]
    fn state_round_trips_through_json() {
        let state = MigrationState::new("a".into(), "b".into(), true, t(0), None);
        let state = run(&state, &[ok(), ok()]);
        let text = serde_json::to_string(&state).unwrap();
        assert_eq!(
            serde_json::from_str::<MigrationState>(&text).unwrap(),
            state
        );
    }

    fn any_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => Just(Event::StepSucceeded { checkpoint_id: Some("ck".into()) }),
            2 => any::<bool>().prop_map(|retryable| Event::StepFailed { reason: "x".into(), retryable }),
            1 => Just(Event::SourceLost),
            1 => Just(Event::Cancel { reason: "y".into() }),
            1 => Just(Event::TargetLost { reason: "z".into() }),
            1 => Just(Event::TargetAtFault { reason: "w".into() }),
        ]
    }

    fn any_fallback() -> impl Strategy<Value = Fallback> {
        prop_oneof![
            Just(Fallback::Rollback),
            Just(Fallback::Restart),
            Just(Fallback::Fail)
        ]
    }

    proptest! {
        /// Whatever happens, the replacement starts only after the source is fenced, a rollback
        /// that brings the workload back stops the replacement first, and only allowed
        /// transitions are made.
        #[test]
        fn never_two_copies(
            alive in any::<bool>(),
            fallback in any_fallback(),
            events in proptest::collection::vec((any_event(), proptest::bool::weighted(0.2)), 0..40),
        ) {
            let limits = Limits { fallback, ..limits() };
            let mut state = MigrationState::new("a".into(), "b".into(), alive, t(0), None);
            let mut now = 0;
            for (event, late) in &events {
                let before = state.phase;
                // Sometimes a phase's deadline passes first (rollback escalation included).
                now += if *late { 100_000 } else { 1 };
                let event = if *late {
                    timeout(&state, &limits, t(now)).unwrap_or_else(|| event.clone())
                } else {
                    event.clone()
                };
                match apply(&state, &event, &limits, t(now)) {
                    Ok(next) => state = next,
                    Err(_) => { prop_assert!(before.is_terminal()); break; }
                }
                if before != state.phase {
                    prop_assert!(before.can_become(state.phase), "{before} -> {}", state.phase);
                }
                match step(&state) {
                    Step::Restore => prop_assert!(state.source_fenced),
                    Step::RollBack { stop_target, action } => {
                        prop_assert_eq!(stop_target, state.target_started);
                        if action != RollbackAction::KeepSource {
                            prop_assert!(state.source_fenced);
                        }
                    }
                    _ => {}
                }
                prop_assert!(!state.target_started || state.source_fenced);
            }
        }

        /// Deadlines alone bring every migration to an end: none is stuck.
        #[test]
        fn timeouts_always_terminate(
            alive in any::<bool>(),
            events in proptest::collection::vec(any_event(), 0..10),
        ) {
            let limits = limits();
            let mut state = MigrationState::new("a".into(), "b".into(), alive, t(0), None);
            for event in &events {
                if let Ok(next) = apply(&state, event, &limits, t(0)) { state = next; }
            }
            // Pending has no deadline: the driver starts it at once. Step it in, then let time run.
            if state.phase == Phase::Pending {
                state = apply(&state, &ok(), &limits, t(0)).unwrap();
            }
            let mut now = 0;
            for _ in 0..10 {
                if state.phase.is_terminal() { break; }
                now += 100_000;
                let event = timeout(&state, &limits, t(now)).expect("every live phase has a deadline");
                state = apply(&state, &event, &limits, t(now)).unwrap();
            }
            prop_assert!(state.phase.is_terminal(), "stuck in {}", state.phase);
        }

        /// Retryable failures alone never move a migration out of its phase before the
        /// phase's deadline, however many there are and however they are spaced.
        #[test]
        fn retryable_failures_never_leave_the_phase_before_its_deadline(
            alive in any::<bool>(),
            fallback in any_fallback(),
            prefix in proptest::collection::vec(any_event(), 0..8),
            gaps in proptest::collection::vec(0i64..120, 1..60),
        ) {
            let limits = Limits { fallback, ..limits() };
            let mut state = MigrationState::new("a".into(), "b".into(), alive, t(0), None);
            for event in &prefix {
                if let Ok(next) = apply(&state, event, &limits, t(0)) { state = next; }
            }
            prop_assume!(!state.phase.is_terminal());
            let phase = state.phase;
            let rollback = state.rollback;
            let mut now = 0;
            for gap in gaps {
                now += gap;
                if state.past_deadline(&limits, t(now)) { break; }
                state = apply(&state, &flaky(), &limits, t(now)).unwrap();
                prop_assert_eq!(state.phase, phase);
                prop_assert_eq!(state.rollback, rollback);
                let retry_at = state.retry_at.unwrap();
                prop_assert!(retry_at > t(now));
                prop_assert!(units::age(retry_at, t(now)) <= Duration::from_secs(30));
            }
        }
    }
}
