//! Detecting a lost source, and what else a (re)started driver learns from looking.
//!
//! The rule: a source that was alive when the migration began counts as lost when its node
//! stops being reachable before the final dump is taken (Pending, Syncing, Checkpointing with
//! no dump on record): no fresh checkpoint is possible, so the migration goes on from the
//! newest verified stored one ([`super::choose`]). From Transferring on, the final dump exists
//! and the source pod is stopped; an unreachable source is not acted on here: the steps that
//! need it fail and retry until the phase deadline, the rollback then restores on the source
//! (fencing it first, which waits for its Lease to expire) or escalates to a fresh start.
//! Treating a short partition during the transfer as a death would throw away the fresh dump
//! for an older checkpoint and could strand the stopped workload at fencing.

use jiff::Timestamp;

use super::fence::target_lost;
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
    if let Some(event) = implied_event(run, observation, final_dump) {
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
) -> Option<Event> {
    let facts = Facts {
        source_running: observation
            .source_reachable
            .then_some(observation.source_running),
        target_running: observation.target_running,
        checkpoint_complete: final_dump.is_some(),
    };
    let early = matches!(run.state.phase, Phase::Pending | Phase::Syncing);
    let lost_early = early && run.state.source_alive && !observation.source_reachable;
    match migration::observe(&run.state, &facts) {
        // A dump that completed before a crash: keep its id, the replacement restores it.
        Some(Event::StepSucceeded {
            checkpoint_id: None,
        }) if run.state.phase == Phase::Checkpointing => Some(Event::StepSucceeded {
            checkpoint_id: final_dump.map(String::from),
        }),
        Some(event) => Some(event),
        None => lost_early.then_some(Event::SourceLost),
    }
}
