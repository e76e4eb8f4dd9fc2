//! `kill -9` of the source's or the target's agent daemon while a migration moves the final
//! checkpoint (or in a phase next to it), and, usually, its supervisor starting it again.
//!
//! The migration is provoked by a degradation of the home node (a live source: a fresh final
//! dump is taken and sent). What must hold: the migration ends in a terminal phase with a reason
//! (succeeded, or rolled back onto the source, or resumed from a stored checkpoint), never two
//! copies, and training ends with the reference loss.

use std::time::Duration;

use automigrate_core::migration::Phase;

use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, Side, Trigger};

pub fn draw(draw: &mut Draw, source: bool) -> (Trigger, FaultParams) {
    let phases: &[Phase] = if source {
        &[
            Phase::Transferring,
            Phase::Transferring,
            Phase::Checkpointing,
            Phase::Syncing,
        ]
    } else {
        &[
            Phase::Transferring,
            Phase::Transferring,
            Phase::Syncing,
            Phase::Restoring,
        ]
    };
    let phase = draw.pick(phases).unwrap_or(Phase::Transferring);
    let delay_ms = draw.range(0, 150);
    let restart_after_ms = draw.chance(80).then(|| draw.range(200, 2500));
    (
        Trigger::Degradation,
        FaultParams::AgentKill {
            side: if source { Side::Source } else { Side::Target },
            phase,
            delay_ms,
            restart_after_ms,
        },
    )
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::AgentKill {
        side,
        phase,
        delay_ms,
        restart_after_ms,
    } = plan.params
    else {
        return Err("not an agent-kill plan".into());
    };
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(phase, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let node = match side {
        Side::Source => view.source.clone(),
        Side::Target => view.target.clone(),
    };
    let before = context.latest_migration().map(|view| view.phase);
    let argv = context.kill_agent(&node)?;
    context.strike(&node, before);
    context.note(format!(
        "kill -9 of {node}'s agent daemon (waited for {phase}, saw {before:?})"
    ));
    if let Some(after) = restart_after_ms {
        tokio::time::sleep(Duration::from_millis(after)).await;
        context.restart_agent(&node, &argv)?;
        context.note(format!(
            "{node}'s agent daemon started again after {after} ms"
        ));
    }
    Ok(())
}
