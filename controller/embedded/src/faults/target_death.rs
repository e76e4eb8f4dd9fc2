//! The target node is powered off while the replacement is being restored on it: its kubelet,
//! its agent and every container on it die together and its links are cut
//! ([`crate::kube::KubeCluster::power_off`]).
//!
//! The migration is provoked by a degradation (the source lives: the fallback restores it
//! there) or by powering the home node off (nothing to go back to: the controller must find
//! another node once the target's death is seen).

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
        .wait_for_phase(Phase::Restoring, Duration::from_secs(120))
        .await?;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let before = context.latest_migration().and_then(|view| view.phase);
    context.power_off(&view.target).await?;
    context.strike(&view.target, before);
    context.note(format!(
        "{} powered off during the restore (phase seen: {before:?})",
        view.target
    ));
    Ok(())
}
