//! `kill -9` of the controller in a migration phase, and a new controller process started on
//! the same state directory (it must resume the migration, or end it safely).
//!
//! The controller runs as its own OS process ([`crate::process::ControllerProcess`]); the run
//! holds it still for a moment before the chosen phase's step (`step_delay`), so a kill can
//! land in phases that otherwise pass in milliseconds, and kills it during the pause or once
//! the step is under way. What must hold: the restarted controller never starts a second copy,
//! every migration still ends in a terminal phase with a reason, and training ends with the
//! reference loss.

use std::sync::Arc;
use std::time::Duration;

use automigrate_core::migration::Phase;

use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, Trigger};
use crate::process::ControllerProcess;

pub fn draw(draw: &mut Draw) -> (Trigger, FaultParams) {
    let trigger = draw
        .pick(&[Trigger::Degradation, Trigger::NodeFailure])
        .unwrap_or(Trigger::Degradation);
    // A dead source goes from Syncing straight to Fencing.
    let phases: &[Phase] = match trigger {
        Trigger::NodeFailure => &[
            Phase::Pending,
            Phase::Syncing,
            Phase::Fencing,
            Phase::Restoring,
            Phase::Verifying,
        ],
        _ => &[
            Phase::Pending,
            Phase::Syncing,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Fencing,
            Phase::Restoring,
            Phase::Verifying,
        ],
    };
    let phase = draw.pick(phases).unwrap_or(Phase::Syncing);
    let pause_ms = draw.range(200, 800);
    (
        trigger,
        FaultParams::ControllerKill {
            phase,
            pause_ms,
            delay_ms: draw.range(0, pause_ms + 300),
            restart_after_ms: draw.range(100, 2000),
        },
    )
}

pub async fn inject(
    context: &FaultContext,
    plan: &FaultPlan,
    controller: Arc<tokio::sync::Mutex<ControllerProcess>>,
) -> Result<(), String> {
    let FaultParams::ControllerKill {
        phase,
        delay_ms,
        restart_after_ms,
        ..
    } = plan.params
    else {
        return Err("not a controller-kill plan".into());
    };
    context.trigger(plan).await?;
    context
        .wait_for_phase(phase, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    // Held until the new process runs: the run must not take the gap for the end.
    let mut process = controller.lock().await;
    let before = context.latest_migration().map(|view| view.phase);
    let pid = process.pid();
    process.kill9().map_err(|error| error.to_string())?;
    context.strike("controller", before);
    context.note(format!(
        "kill -9 of the controller process {pid:?} (waited for {phase}, saw {before:?})"
    ));
    tokio::time::sleep(Duration::from_millis(restart_after_ms)).await;
    let pid = process.restart().map_err(|error| error.to_string())?;
    context.note(format!(
        "a new controller process {pid} started on the same state directory after {restart_after_ms} ms"
    ));
    Ok(())
}
