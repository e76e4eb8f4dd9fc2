//! The target's disk fills up as the migration starts.
//!
//! Every node but the home node keeps its state (kubelet root, agent data root, checkpoint
//! store) on a small tmpfs; once the migration's target is known, a ballast file fills it,
//! leaving a few KiB to MiB. The target's kubelet then reports `DiskPressure` itself (less than
//! 10 % free, the real kubelet's nodefs threshold). What must hold: the migration ends failed,
//! rolled back or restarted with a reason, or another target is chosen; nothing half-restored
//! runs, and no checkpoint that does not verify is ever listed.

use std::time::Duration;

use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, Trigger};

pub fn draw(draw: &mut Draw) -> (Trigger, FaultParams) {
    let trigger = draw
        .pick(&[
            Trigger::Degradation,
            Trigger::Degradation,
            Trigger::NodeFailure,
        ])
        .unwrap_or(Trigger::Degradation);
    let free_kib = draw.pick(&[0, 16, 256, 4096, 16384]).unwrap_or(0);
    (trigger, FaultParams::DiskFull { free_kib })
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::DiskFull { free_kib } = plan.params else {
        return Err("not a disk-full plan".into());
    };
    context.trigger(plan).await?;
    let view = context
        .wait_for(Duration::from_secs(90), |_| true)
        .await
        .ok_or("no migration within 90 s")?;
    let before = view.phase;
    let ballast = context.fill_disk(&view.target, free_kib)?;
    context.strike(&view.target, before);
    context.note(format!(
        "{}'s disk filled with {} MiB of ballast, {free_kib} KiB left (phase seen: {before:?})",
        view.target,
        ballast >> 20
    ));
    Ok(())
}
