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

use super::port::Observation;
use super::run::Run;
use crate::migration::{self, Event, Facts, Phase};

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
