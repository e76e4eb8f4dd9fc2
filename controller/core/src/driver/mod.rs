//! The migration driver: the one implementation of carrying out a migration, shared by the
//! Kubernetes operator, the simulator and the tests. It owns the loop and every rule; its
//! effects go through one narrow trait, the [`Port`] ([`port`]), which each of them
//! implements (the operator with the API server and the node agents, the simulator with its
//! cost model, the tests with a recording double). No Kubernetes, no sockets, no clock: the
//! port says what time it is.
//!
//! # The loop
//!
//! [`Driver::advance`] takes the persisted [`Run`] and, until the migration must wait or ends:
//!
//! 1. **observe**: asks the port what is true ([`Observation`]; while Checkpointing, also
//!    whether a final dump completed) and applies the event it implies ([`lost`]): a dump
//!    that finished before a crash, a replacement already running, a lost source;
//! 2. **timeouts**: applies the phase deadline's failure ([`migration::timeout`]);
//! 3. **act**: unless a retry's backoff is pending, carries out [`migration::step`]'s step
//!    through the port;
//! 4. **apply** the outcome as a state-machine event, and
//! 5. **persist** the run after every change.
//!
//! Every step is idempotent and keyed by persisted data (transfer ids, the replacement's
//! role), so a driver that crashed anywhere is rebuilt from the last persisted [`Run`] and
//! runs the same loop: it re-observes, then resumes or rolls back. Pending has nothing to do
//! (the decision already planned the transfers, [`plan::begin`]): its step succeeds at once.
//!
//! # The rules, one answer each
//!
//! - **Lost source** ([`lost`]): a live source whose node stops being reachable (Ready not
//!   True, or its Lease unrenewed for the lease timeout) before the final dump is taken, or
//!   whose Lease expires while that dump is still on its way to the target, is lost; the
//!   migration goes on from the newest verified stored checkpoint. A short silence or a Ready
//!   flap after the dump is ridden out by retries, never guessed dead.
//! - **Lost target** ([`lost`], [`fence::target_lost`]): a target node marked out of
//!   service, removed, or whose Lease went unrenewed for the lease timeout is lost while the
//!   migration sends to it, starts or waits on the workload there, or would restart it fresh
//!   there ([`migration::target_loss_matters`]): the phase fails for good at once (no retries
//!   until the deadline) and the rollback restores on a live source; with no live source, or
//!   a fresh start that would name the lost node, the migration ends `Failed` saying what a
//!   person must do. Never a replacement on a lost node.
//! - **Checkpoint choice** ([`choose`]): the newest *verified* checkpoint; among its copies the
//!   target's own, then the holder nearest the target by round trip. Newest, because it
//!   repeats the least work; verified, because restoring an unverified image may start a
//!   corrupt workload, which is worse than repeating work; the target's copy needs no
//!   transfer, and the nearest holder sends fastest (the decision engine plans with the same
//!   order from the checkpoint it knows, so the plan and the driver agree).
//! - **Restore failure** ([`restore`]): with a dead source, retry once from the next older
//!   verified checkpoint, then roll back. With a live source, roll back at once: the rollback
//!   restores the migration's own final dump on the source, losing nothing. A target that
//!   refuses a checkpoint its own store verifies intact is at fault, not the image
//!   ([`migration::Event::TargetAtFault`]): with a dead source the migration fails without a
//!   fresh start there, and the pod is placed again on another node from that checkpoint.
//! - **Fencing** ([`fence`]): a live source is stopped and awaited; a silent node counts as
//!   fenced only by the fencing mode's rule ([`crate::fencing::dead_node`]: never while its
//!   Lease is fresh or missing, which may be a partition; in the self-fence mode not before the
//!   safe time after its last heartbeat), and is then marked out of service. Nothing starts
//!   the workload again before the source is fenced.
//! - **Transfers** ([`transfers`]): every transfer is recorded before it starts and polled by
//!   id; a sender that forgot it is asked again; a failed transfer is a retryable failure.
//! - **Roll back** ([`rollback`]): stop the replacement first, then keep the source, restore
//!   the final dump on it, or start fresh, as the state machine says. A fresh start waits
//!   for the new copy and removes what is left of the source, as a migration's end does.
//! - **Periodic checkpoints** ([`periodic`]): outside any migration, a checkpoint the engine
//!   asked for is taken on the pod's node and copied to each standby in turn; the pod's record
//!   never trades a copy a standby holds for one only the node holds while standbys were asked
//!   for; a failed copy goes on to the next standby. Its own state machine and port
//!   ([`periodic::Periodic`], [`periodic::PeriodicPort`]): a job keeps no state across a
//!   crash; one cut off is asked for again by the engine's next pass.
//! - **A fresh start is a restart**: a replacement started with no checkpoint (none
//!   survived) ends the migration `Restarted`, never `Succeeded`
//!   ([`crate::migration::MigrationState::started_fresh`]).

pub mod choose;
pub mod fence;
mod lost;
pub mod periodic;
pub mod plan;
pub mod port;
mod restore;
mod rollback;
pub mod run;
mod transfers;

#[cfg(test)]
mod periodic_tests;
#[cfg(test)]
mod source_lost_tests;
#[cfg(test)]
mod target_fault_tests;
#[cfg(test)]
mod target_lost_tests;
#[cfg(test)]
mod tests;

use std::pin::pin;
use std::task::{Context, Poll, Waker};

pub use choose::choose_checkpoint;
pub use fence::{
    DeadNodeFencing, FenceStep, fence_step, lease_expired, target_fenced, target_lost,
};
pub use plan::begin;
pub use port::{
    Action, CheckpointCopy, Observation, Outcome, PersistError, Port, Role, StepFailure,
    TargetObservation, TransferStatus,
};
pub use run::{RestoreSource, Run, TransferPayload, TransferRecord};

use crate::migration::{self, Event, Phase, Step, TransitionError};
use restore::Next;

/// How the driver behaves, per deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverConfig {
    pub dead_node_fencing: DeadNodeFencing,
    /// Most turns of the loop one `advance` makes before yielding to other migrations.
    pub max_transitions: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            dead_node_fencing: DeadNodeFencing::default(),
            max_transitions: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("state machine refused the event: {0}")]
    Transition(#[from] TransitionError),
    #[error("the port did not answer at once (advance_ready needs a port that never waits)")]
    PortPending,
}

/// Where one `advance` left a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advanced {
    /// The run as last persisted.
    pub run: Run,
    /// Why it stopped here (the step it waits on), when not ended.
    pub waiting: Option<String>,
}

impl Advanced {
    pub fn phase(&self) -> Phase {
        self.run.state.phase
    }
}

/// Carries out migrations. Stateless between calls: everything is in the persisted [`Run`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Driver {
    pub config: DriverConfig,
}

impl Driver {
    pub fn new(config: DriverConfig) -> Self {
        Self { config }
    }

    /// [`Driver::advance`] for a port whose futures are always ready (the simulator, tests).
    pub fn advance_ready<P: Port>(&self, port: &mut P, run: Run) -> Result<Advanced, DriverError> {
        let mut future = pin!(self.advance(port, run));
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(result) => result,
            Poll::Pending => Err(DriverError::PortPending),
        }
    }

    /// Runs the loop for one migration until it must wait or has ended.
    pub async fn advance<P: Port>(
        &self,
        port: &mut P,
        mut run: Run,
    ) -> Result<Advanced, DriverError> {
        let mut waiting = None;
        for _ in 0..self.config.max_transitions {
            if run.state.phase.is_terminal() {
                break;
            }
            let now = port.now();
            let observation = port.observe(&run).await;
            let final_dump = if run.state.phase == Phase::Checkpointing {
                port.final_dump_since(run.state.phase_started_at).await
            } else {
                None
            };
            let implied = lost::implied(port, &run, &observation, final_dump.as_deref(), now)
                .await
                .or_else(|| migration::timeout(&run.state, &run.limits, now));
            if let Some(event) = implied {
                run = transition(port, run, &event, now).await?;
                continue;
            }
            // A failed step is tried again only once its backoff has passed (persisted, so a
            // restarted driver keeps the schedule); the deadline above still applies.
            if let Some(retry_at) = run.state.retry_at.filter(|at| *at > now) {
                waiting = Some(format!("retrying a failed step at {retry_at}"));
                break;
            }
            let mut working = run.clone();
            let next = self.perform(port, &mut working, &observation, now).await;
            // The step may have taken a while: what it led to happened now.
            let now = port.now();
            match next {
                Next::Again => {
                    port.persist(&working, None).await?;
                    run = working;
                }
                Next::Outcome(Outcome::Done { checkpoint_id }) => {
                    run = transition(port, working, &Event::StepSucceeded { checkpoint_id }, now)
                        .await?;
                }
                Next::Outcome(Outcome::Failed { reason, retryable }) => {
                    let before = working.state.phase;
                    run = transition(port, working, &Event::StepFailed { reason, retryable }, now)
                        .await?;
                    if run.state.phase == before {
                        // A retry: give the failing party until the next round.
                        waiting = Some("retrying a failed step".into());
                        break;
                    }
                }
                Next::Event(event) => {
                    run = transition(port, working, &event, now).await?;
                }
                Next::Outcome(Outcome::Waiting { why }) => {
                    if working != run {
                        port.persist(&working, None).await?;
                        run = working;
                    }
                    waiting = Some(why);
                    break;
                }
            }
        }
        let ended = run.state.phase.is_terminal();
        Ok(Advanced {
            run,
            waiting: if ended { None } else { waiting },
        })
    }

    /// Carries out the step the state machine asks for now.
    async fn perform<P: Port>(
        &self,
        port: &mut P,
        run: &mut Run,
        observation: &Observation,
        now: jiff::Timestamp,
    ) -> Next {
        let outcome = match migration::step(&run.state) {
            // Pending: the decision planned everything; the step is only to begin.
            Step::SyncData if run.state.phase == Phase::Pending => Outcome::done(),
            Step::SyncData => transfers::sync(port, run).await,
            Step::Checkpoint => port.act(run, &Action::FinalCheckpoint).await,
            Step::TransferCheckpoint => transfers::transfer_checkpoint(port, run).await,
            Step::Fence { source_alive } => {
                match fence_step(
                    &run.state.source,
                    source_alive,
                    observation,
                    run.lease_timeout,
                    &self.config.dead_node_fencing,
                    now,
                ) {
                    FenceStep::StopSource => port.act(run, &Action::StopSource).await,
                    FenceStep::Fenced => Outcome::done(),
                    FenceStep::MarkOutOfService(reason) => {
                        port.act(run, &Action::MarkOutOfService { reason }).await
                    }
                    FenceStep::Wait(why) => Outcome::Waiting { why },
                }
            }
            Step::Restore => return restore::restore(port, run).await,
            Step::Verify => {
                let source_dead = lease_expired(observation, run.lease_timeout, now);
                port.act(run, &Action::CheckReplacement { source_dead })
                    .await
            }
            Step::RollBack {
                stop_target,
                action,
            } => {
                let source_dead = lease_expired(observation, run.lease_timeout, now);
                return rollback::roll_back(port, run, stop_target, action, source_dead).await;
            }
            Step::Done => Outcome::waiting("ended"),
        };
        Next::Outcome(outcome)
    }
}

/// One `advance` with the default configuration, for tests whose port answers at once.
#[cfg(test)]
fn advance_once<P: Port>(port: &mut P, run: Run) -> Run {
    Driver::new(DriverConfig::default())
        .advance_ready(port, run)
        .expect("the driver advances")
        .run
}

/// Applies one event and persists the result.
async fn transition<P: Port>(
    port: &mut P,
    mut run: Run,
    event: &Event,
    now: jiff::Timestamp,
) -> Result<Run, DriverError> {
    let previous = run.state.clone();
    if run.state.phase == Phase::Restoring && matches!(event, Event::StepSucceeded { .. }) {
        // The replacement runs from the checkpoint the run names (the stored one is the
        // driver's, not the state machine's), or from the beginning: then the migration must
        // end Restarted, not Succeeded. Set here, on the restore's success however it was
        // seen (its step, or a replacement found running after a crash).
        run.state.started_fresh = run.restore_from().is_none();
    }
    run.state = migration::apply(&run.state, event, &run.limits, now)?;
    port.persist(&run, Some(&previous)).await?;
    Ok(run)
}
