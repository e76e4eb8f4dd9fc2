//! `kill -9` of the leading `automigrate-controller` replica in a migration phase (read from
//! the API server right before the kill), and the killed replica started again after a while,
//! as its Deployment would. The other replica takes the leader Lease once it expires and must
//! resume the migration from what the API server holds, or end it safely.
//!
//! The phase is not drawn at random: the suite's controller-kill runs go through the phases in
//! turn ([`PHASES`]), so a suite of at least that many runs of this kind aims at every phase.
//! The real controller cannot be paused before a step, so a short phase (Restoring lasts tens
//! of milliseconds) may have passed when the kill lands; the run records the phase the API
//! server showed right before the kill. What must hold: never a second copy, every migration
//! ends in a terminal phase with a reason, and training ends with the reference loss.

use std::time::Duration;

use automigrate_core::migration::Phase;

use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, Trigger};

/// The phases aimed at, in turn, with the trigger each needs (a dead source goes from Syncing
/// straight to Fencing: Checkpointing and Transferring need a live one).
pub const PHASES: [(Phase, Trigger); 7] = [
    (Phase::Pending, Trigger::NodeFailure),
    (Phase::Syncing, Trigger::Degradation),
    (Phase::Checkpointing, Trigger::Degradation),
    (Phase::Transferring, Trigger::Degradation),
    (Phase::Fencing, Trigger::NodeFailure),
    (Phase::Restoring, Trigger::Degradation),
    (Phase::Verifying, Trigger::NodeFailure),
];

/// `occurrence`: how many controller-kill runs the suite planned before this one.
pub fn draw(draw: &mut Draw, occurrence: usize) -> (Trigger, FaultParams) {
    let (phase, trigger) = PHASES[occurrence % PHASES.len()];
    (
        trigger,
        FaultParams::ControllerKill {
            phase,
            delay_ms: draw.range(0, 50),
            restart_after_ms: draw.range(500, 5000),
        },
    )
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::ControllerKill {
        phase,
        delay_ms,
        restart_after_ms,
    } = plan.params
    else {
        return Err("not a controller-kill plan".into());
    };
    context.trigger(plan).await?;
    let leader = context
        .controller_leader()
        .ok_or("no controller replica holds the leader Lease")?;
    context
        .wait_for_phase(phase, Duration::from_secs(120))
        .await?;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let before = context.latest_migration().and_then(|view| view.phase);
    context
        .cluster()
        .kill_controller(leader)
        .map_err(|error| error.to_string())?;
    context.strike("controller", before);
    context.note(format!(
        "kill -9 of the leader, automigrate-controller-{leader} (aimed at {phase}; the API server showed {before:?})"
    ));
    tokio::time::sleep(Duration::from_millis(restart_after_ms)).await;
    context
        .cluster()
        .start_controller(leader)
        .map_err(|error| error.to_string())?;
    context.note(format!(
        "automigrate-controller-{leader} started again after {restart_after_ms} ms (as its Deployment would)"
    ));
    Ok(())
}
