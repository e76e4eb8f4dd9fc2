//! An outage of the source's agent, the target's agent, or both, for 5–30 s, starting in a
//! drawn migration phase: the agents are frozen with SIGSTOP and thawed with SIGCONT when the
//! drawn outage ends, so their sockets stay open but nothing answers, as with a network blip, a
//! node under memory pressure or an agent upgrade at the wrong moment.
//!
//! The migration is provoked by a degradation of the home node. What must hold: the run ends
//! with training finished somewhere, resumed from a checkpoint or restarted per the policy,
//! never stopped for good and never two copies.

use std::time::Duration;

use automigrate_core::migration::Phase;

use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, OutageSides, Trigger};

/// Shortest and longest outage, as the issue that asked for this kind sets them.
const OUTAGE_MS: (u64, u64) = (5_000, 30_000);

pub fn draw(draw: &mut Draw) -> (Trigger, FaultParams) {
    let sides = draw
        .pick(&[OutageSides::Source, OutageSides::Target, OutageSides::Both])
        .unwrap_or(OutageSides::Both);
    let phase = draw
        .pick(&[
            Phase::Syncing,
            Phase::Checkpointing,
            Phase::Transferring,
            Phase::Transferring,
            Phase::Fencing,
            Phase::Restoring,
            Phase::Verifying,
        ])
        .unwrap_or(Phase::Transferring);
    let delay_ms = draw.range(0, 150);
    let outage_ms = draw.range(OUTAGE_MS.0, OUTAGE_MS.1);
    (
        Trigger::Degradation,
        FaultParams::AgentOutage {
            sides,
            phase,
            delay_ms,
            outage_ms,
        },
    )
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::AgentOutage {
        sides,
        phase,
        delay_ms,
        outage_ms,
    } = plan.params
    else {
        return Err("not an agent-outage plan".into());
    };
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(phase, Duration::from_secs(90))
        .await?;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let nodes: Vec<String> = match sides {
        OutageSides::Source => vec![view.source.clone()],
        OutageSides::Target => vec![view.target.clone()],
        OutageSides::Both => vec![view.source.clone(), view.target.clone()],
    };
    let before = context.latest_migration().and_then(|view| view.phase);
    let mut frozen = Vec::new();
    for node in &nodes {
        match context.freeze_agent(node) {
            Ok(pid) => frozen.push((node.clone(), pid)),
            Err(error) => context.note(format!("could not freeze {node}'s agent: {error}")),
        }
    }
    let Some((first, _)) = frozen.first() else {
        return Err("no agent could be frozen".into());
    };
    let names: Vec<String> = frozen.iter().map(|(node, _)| node.clone()).collect();
    context.strike(first, before);
    context.note(format!(
        "SIGSTOP of the agent of {} for {outage_ms} ms (waited for {phase}, saw {before:?})",
        names.join(" and ")
    ));
    tokio::time::sleep(Duration::from_millis(outage_ms)).await;
    for (_, pid) in &frozen {
        context.thaw(*pid)?;
    }
    let after = context.latest_migration().and_then(|view| view.phase);
    context.note(format!(
        "SIGCONT of the agent of {}; the migration was in {after:?}",
        names.join(" and ")
    ));
    Ok(())
}
