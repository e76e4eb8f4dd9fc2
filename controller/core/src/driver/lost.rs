//! Detecting a lost source, and what else a (re)started driver learns from looking.
//!
//! Unreachable: the source node's Ready condition is not True, or its Lease has gone unrenewed
//! for the policy's lease timeout (the same rule as a lost target). The Lease matters because
//! Ready flips only when Kubernetes' node lifecycle controller marks the node, 40–50 s after its
//! last heartbeat (never in the local cluster, which has none); the Lease is the heartbeat
//! itself.
//!
//! The rule: a source that was alive when the migration began counts as lost when its node
//! stops being reachable before its final dump is safely off the node: in Pending, Syncing,
//! Checkpointing with no dump on record, and Transferring while the dump has not reached the
//! target. No fresh checkpoint is possible (or the one taken cannot be fetched), so the
//! migration goes on from the newest verified stored one ([`super::choose`]: the target's own
//! copy first, which is the final dump itself if it arrived whole). From Fencing on, the final
//! dump is on the target: an unreachable source is not acted on here; fencing waits for the
//! dead-node rule before anything starts.
//! Only the Lease (not a short Ready flap or an agent that does not answer) condemns a source
//! whose dump is already taken, so a brief partition during the transfer never throws away the
//! fresh dump; a source cut off but alive is stopped by its own agent (self-fencing) before the
//! fencing rule lets the replacement start.

use jiff::Timestamp;

use super::fence::{lease_expired, target_lost};
use super::port::{Observation, Port};
use super::run::Run;
use crate::migration::{self, Event, Facts, Phase};

/// What the loop applies before acting, if anything: [`implied_event`], else a lost target
/// ([`target_lost`]) where losing it matters ([`migration::target_loss_matters`]). A lost
/// target is not retried on until the phase deadline: the phase fails at once and the
/// rollback never starts the workload on it.
pub(crate) async fn implied<P: Port>(
    port: &mut P,
    run: &Run,
    observation: &Observation,
    final_dump: Option<&str>,
    now: Timestamp,
) -> Option<Event> {
    if let Some(event) = implied_event(run, observation, final_dump, now) {
        return Some(event);
    }
    if !migration::target_loss_matters(&run.state) {
        return None;
    }
    let target = port.observe_target(run).await;
    target_lost(&run.state.target, &target, run.lease_timeout, now)
        .map(|reason| Event::TargetLost { reason })
}

/// The event that what the driver sees implies, if any. `final_dump` is the id of a verified
/// checkpoint the source holds from this migration's Checkpointing phase (asked only then).
pub(crate) fn implied_event(
    run: &Run,
    observation: &Observation,
    final_dump: Option<&str>,
    now: Timestamp,
) -> Option<Event> {
    let lease_gone = lease_expired(observation, run.lease_timeout, now);
    let reachable = observation.source_reachable && !lease_gone;
    let facts = Facts {
        source_running: reachable.then_some(observation.source_running),
        target_running: observation.target_running,
        checkpoint_complete: final_dump.is_some(),
    };
    let early = matches!(run.state.phase, Phase::Pending | Phase::Syncing);
    let lost_early = early && run.state.source_alive && !reachable;
    // After the dump only the Lease condemns the source (see the module header).
    let lost_in_transfer = run.state.phase == Phase::Transferring
        && run.state.source_alive
        && lease_gone
        && !dump_arrived(run);
    match migration::observe(&run.state, &facts) {
        // A dump that completed before a crash: keep its id, the replacement restores it.
        Some(Event::StepSucceeded {
            checkpoint_id: None,
        }) if run.state.phase == Phase::Checkpointing => Some(Event::StepSucceeded {
            checkpoint_id: final_dump.map(String::from),
        }),
        Some(event) => Some(event),
        None => (lost_early || lost_in_transfer).then_some(Event::SourceLost),
    }
}

/// Whether the migration's final dump is on the target: no transfer of it is on record (it
/// needs none) or its transfer finished.
fn dump_arrived(run: &Run) -> bool {
    let Some(id) = run.state.checkpoint_id.as_deref() else {
        return false;
    };
    run.transfers
        .iter()
        .filter(|record| record.carries_checkpoint(id))
        .all(|record| record.done)
}
