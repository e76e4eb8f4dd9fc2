//! `kill -9` of the source's or the target's agent while a migration moves the final
//! checkpoint (or in a phase next to it). The agent runs as its node's DaemonSet pod
//! (`restartPolicy: Always`), so its kubelet starts it again; the harness does not.
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
    (
        Trigger::Degradation,
        FaultParams::AgentKill {
            side: if source { Side::Source } else { Side::Target },
            phase,
            delay_ms,
        },
    )
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::AgentKill {
        side,
        phase,
        delay_ms,
    } = plan.params
    else {
        return Err("not an agent-kill plan".into());
    };
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(phase, Duration::from_secs(90))
        .await?;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let node = match side {
        Side::Source => view.source.clone(),
        Side::Target => view.target.clone(),
    };
    let before = context.latest_migration().and_then(|view| view.phase);
    let pid = context.kill_agent(&node)?;
    context.strike(&node, before);
    context.note(format!(
        "kill -9 of {node}'s agent (pid {pid}; waited for {phase}, saw {before:?}); its kubelet restarts the container"
    ));
    Ok(())
}
