//! The target node dies while the replacement is being restored on it.
//!
//! The migration is provoked by a degradation (the source lives: the fallback restores it
//! there) or a hard failure of the home node (nothing to go back to: the engine must find
//! another node once the target's death is seen). Powering the target off kills its agent, its
//! links, its heartbeat and every process working on it (the restore itself included).

use std::time::Duration;

use automigrate_core::migration::Phase;

use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, Trigger};

pub fn draw(draw: &mut Draw) -> (Trigger, FaultParams) {
    let trigger = draw
        .pick(&[Trigger::Degradation, Trigger::NodeFailure])
        .unwrap_or(Trigger::Degradation);
    (
        trigger,
        FaultParams::TargetDeath {
            delay_ms: draw.range(0, 300),
        },
    )
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::TargetDeath { delay_ms } = plan.params else {
        return Err("not a target-death plan".into());
    };
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(Phase::Restoring, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let before = context.latest_migration().map(|view| view.phase);
    context.fail_node(&view.target).await?;
    context.strike(&view.target, before);
    context.note(format!(
        "{} powered off during the restore (phase seen: {before:?})",
        view.target
    ));
    Ok(())
}
