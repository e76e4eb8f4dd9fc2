//! The home node partitioned but alive: every link cut, its agent unreachable, its heartbeat no
//! longer arriving, while its workload keeps training there.
//!
//! The engine sees a node whose lease expired and moves the pod from the newest standby copy.
//! What must hold: the controller fences the still-running source (out of band, as a power
//! controller would) before the replacement starts, so the copy monitor never sees two copies;
//! the partition may heal in the middle of it all.

use std::time::Duration;

use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, Trigger};
use crate::scenario::HOME_NODE;

pub fn draw(draw: &mut Draw) -> (Trigger, FaultParams) {
    let heal_after_ms = draw.chance(50).then(|| draw.range(300, 5000));
    (Trigger::TheFault, FaultParams::Partition { heal_after_ms })
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::Partition { heal_after_ms } = plan.params else {
        return Err("not a partition plan".into());
    };
    let epoch = context.wait_for_percent(plan.percent, true).await?;
    context.partition(HOME_NODE)?;
    context.strike(HOME_NODE, None);
    context.note(format!(
        "{HOME_NODE} partitioned at epoch {epoch}: links dropped, agent API refused, heartbeat stopped"
    ));
    if let Some(after) = heal_after_ms {
        tokio::time::sleep(Duration::from_millis(after)).await;
        let phase = context.latest_migration().map(|view| view.phase);
        context.heal_partition(HOME_NODE)?;
        context.note(format!(
            "partition healed after {after} ms (migration phase then: {phase:?})"
        ));
    }
    Ok(())
}
