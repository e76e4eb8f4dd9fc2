//! Issue 16's kinds: the node the training runs on is cut off from the API server but stays
//! alive (`api-cut`), cut off from its peers only (`peer-cut`), or powered off (`power-off`),
//! with the controller in its default fencing mode, `self-fence`.
//!
//! The moment the fault fires is drawn from the run's seed ([`Moment`]):
//! - at a percent of training (the plan's `percent`);
//! - while a periodic checkpoint of the pod is being taken (a new entry in the home node's
//!   kubelet checkpoint directory or its agent's store: an archive, a `.staging-` directory, a
//!   checkpoint) or replicated (a new entry in another node's transfer staging or store), the
//!   first seen after the plan's percent;
//! - in a phase of a live migration the run provokes by setting `KernelDeadlock` on the home
//!   node (as node-problem-detector would): Checkpointing, Transferring, Fencing or Restoring,
//!   a drawn 0–300 ms after the phase is seen; the node struck is the migration's source.
//!
//! A cut lasts until the run ends (it is restored after the run's copies were counted), so the
//! cut node never comes back during the run: what the product does with a node that stays cut
//! off is what is measured. A powered-off node stays off.
//!
//! Expected (judged in [`super::verdict`] besides the common rules): `api-cut` and `power-off`
//! resume the training elsewhere with no human action and never two copies; `peer-cut` fences
//! nothing, moves nothing and stops nothing (a migration, or a copy begun after the fault, is a
//! finding).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use automigrate_core::migration::Phase;
use serde::{Deserialize, Serialize};

use super::sampler::unix_now;
use super::world::{FaultContext, HOME_NODE, POD_NAME, POD_NAMESPACE};
use super::{Draw, FaultKind, FaultParams, FaultPlan, Trigger};

/// The live migration's phases a fault may strike in.
pub const PHASES: [Phase; 4] = [
    Phase::Checkpointing,
    Phase::Transferring,
    Phase::Fencing,
    Phase::Restoring,
];

/// How long the run waits for a periodic checkpoint's activity before firing anyway.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// Which part of a periodic checkpoint the fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CheckpointStage {
    /// Taken on the home node (kubelet archive, agent store).
    Taking,
    /// Copied to a standby node (its transfer staging or store).
    Replicating,
}

/// When the fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "at")]
pub enum Moment {
    /// At the plan's percent of training.
    Percent,
    /// While a periodic checkpoint is taken or replicated, after the plan's percent.
    #[serde(rename_all = "camelCase")]
    PeriodicCheckpoint { stage: CheckpointStage },
    /// In a phase of a live migration (degradation of the home node at the plan's percent).
    #[serde(rename_all = "camelCase")]
    MigrationPhase { phase: Phase, delay_ms: u64 },
}

impl Moment {
    pub fn describe(&self) -> String {
        match self {
            Moment::Percent => "at a percent of training".into(),
            Moment::PeriodicCheckpoint { stage } => format!(
                "while a periodic checkpoint is {}",
                match stage {
                    CheckpointStage::Taking => "taken",
                    CheckpointStage::Replicating => "replicated",
                }
            ),
            Moment::MigrationPhase { phase, delay_ms } => {
                format!("{delay_ms} ms into a live migration's {phase}")
            }
        }
    }
}

/// Draws the moment. `in_migrations`: a live migration's phases are among the moments. Not
/// for a peer cut: a live migration moves its checkpoint over the peer links the cut takes
/// away, so it can only wait out its transfer deadline (30 min by policy) while the training
/// runs on where it was; that says nothing about fencing, which is what the kind tests.
pub fn draw(draw: &mut Draw, in_migrations: bool) -> (Trigger, FaultParams) {
    let moment = match draw.range(0, if in_migrations { 2 } else { 1 }) {
        0 => Moment::Percent,
        1 => Moment::PeriodicCheckpoint {
            stage: if draw.chance(50) {
                CheckpointStage::Taking
            } else {
                CheckpointStage::Replicating
            },
        },
        _ => Moment::MigrationPhase {
            phase: draw.pick(&PHASES).unwrap_or(Phase::Checkpointing),
            delay_ms: draw.range(0, 300),
        },
    };
    let trigger = match moment {
        Moment::MigrationPhase { .. } => Trigger::Degradation,
        _ => Trigger::TheFault,
    };
    (trigger, FaultParams::HomeNode { moment })
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::HomeNode { moment } = plan.params else {
        return Err("not a home-node plan".into());
    };
    let (node, phase_before, seen) = match moment {
        Moment::Percent => {
            let epoch = context.wait_for_percent(plan.percent, true).await?;
            (
                HOME_NODE.to_string(),
                None,
                format!("{} % of training (epoch {epoch})", plan.percent),
            )
        }
        Moment::PeriodicCheckpoint { stage } => {
            let epoch = context.wait_for_percent(plan.percent, true).await?;
            let seen = wait_for_checkpoint_activity(context, stage).await;
            (
                HOME_NODE.to_string(),
                None,
                format!(
                    "after {} % of training (epoch {epoch}): {seen}",
                    plan.percent
                ),
            )
        }
        Moment::MigrationPhase { phase, delay_ms } => {
            context.trigger(plan).await?;
            let view = context
                .wait_for_phase(phase, Duration::from_secs(120))
                .await?;
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let before = context.latest_migration().and_then(|view| view.phase);
            (
                view.source.clone(),
                before,
                format!(
                    "migration {} {} → {} seen in {:?}, struck {delay_ms} ms later in {before:?}",
                    view.name, view.source, view.target, view.phase
                ),
            )
        }
    };
    let at = unix_now();
    match plan.kind {
        FaultKind::ApiCut => context.cut_from_api(&node)?,
        FaultKind::PeerCut => context.cut_from_peers(&node)?,
        FaultKind::PowerOff => context.power_off(&node).await?,
        other => return Err(format!("{other} is not a home-node kind")),
    }
    context.strike(&node, phase_before);
    context.fired_at(at, format!("{}: {seen}", moment.describe()));
    context.note(format!(
        "{node} {} (--dead-node-fencing self-fence) at {seen}",
        match plan.kind {
            FaultKind::ApiCut =>
                "cut off from the API server, alive (the cut lasts until the run ends)",
            FaultKind::PeerCut =>
                "cut off from its peers only, still reaching the API server (the cut lasts until the run ends)",
            _ => "powered off: kubelet, agent and containers died together",
        }
    ));
    Ok(())
}

/// Entries (hidden ones too) of the directories where a periodic checkpoint shows while it is
/// taken or replicated.
fn watched(context: &FaultContext, stage: CheckpointStage) -> Vec<PathBuf> {
    let cluster = context.cluster();
    let store = |node: &str| {
        cluster
            .node_dir(node)
            .join("checkpoints")
            .join(POD_NAMESPACE)
            .join(POD_NAME)
    };
    match stage {
        CheckpointStage::Taking => vec![
            cluster
                .node_dir(HOME_NODE)
                .join("kubelet")
                .join("checkpoints"),
            store(HOME_NODE),
        ],
        CheckpointStage::Replicating => cluster
            .nodes()
            .iter()
            .filter(|node| node.as_str() != HOME_NODE)
            .flat_map(|node| {
                [
                    cluster
                        .node_dir(node)
                        .join("data")
                        .join(automigrate_transfer::paths::STAGING_DIR),
                    store(node),
                ]
            })
            .collect(),
    }
}

fn entries(dirs: &[PathBuf]) -> BTreeSet<PathBuf> {
    dirs.iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|listing| listing.filter_map(Result::ok).map(|entry| entry.path()))
        .collect()
}

/// Waits (at most [`CHECKPOINT_WAIT`]) for a new entry where a periodic checkpoint shows;
/// says what was seen (or that nothing was, and the fault fires anyway).
async fn wait_for_checkpoint_activity(context: &FaultContext, stage: CheckpointStage) -> String {
    let dirs = watched(context, stage);
    let before = entries(&dirs);
    let deadline = Instant::now() + CHECKPOINT_WAIT;
    while Instant::now() < deadline {
        let now = entries(&dirs);
        if let Some(new) = now.difference(&before).next() {
            return format!("new checkpoint entry {}", new.display());
        }
        tokio::time::sleep(POLL).await;
    }
    format!(
        "no periodic checkpoint activity seen within {} s; fired anyway",
        CHECKPOINT_WAIT.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::plan_runs;

    #[test]
    fn home_node_plans_are_decided_by_the_seed_and_reach_every_moment() {
        let kinds = [FaultKind::ApiCut, FaultKind::PeerCut, FaultKind::PowerOff];
        let a = plan_runs(7, 60, &kinds);
        assert_eq!(a, plan_runs(7, 60, &kinds));
        assert_ne!(a, plan_runs(8, 60, &kinds));
        let mut percent = 0;
        let mut stages = BTreeSet::new();
        let mut phases: Vec<Phase> = Vec::new();
        for plan in &a {
            assert!(plan.kind.strikes_home_node());
            assert_eq!(plan.kind.fencing(), super::super::Fencing::SelfFence);
            let FaultParams::HomeNode { moment } = plan.params else {
                panic!("{plan:?}")
            };
            match moment {
                Moment::Percent => {
                    percent += 1;
                    assert_eq!(plan.trigger, Trigger::TheFault);
                }
                Moment::PeriodicCheckpoint { stage } => {
                    stages.insert(format!("{stage:?}"));
                    assert_eq!(plan.trigger, Trigger::TheFault);
                }
                Moment::MigrationPhase { phase, delay_ms } => {
                    assert_ne!(plan.kind, FaultKind::PeerCut, "a peer cut mid-migration");
                    assert!(PHASES.contains(&phase));
                    assert!(delay_ms <= 300);
                    if !phases.contains(&phase) {
                        phases.push(phase);
                    }
                    assert_eq!(plan.trigger, Trigger::Degradation);
                }
            }
        }
        assert!(percent > 0);
        assert_eq!(stages.len(), 2, "{stages:?}");
        assert_eq!(phases.len(), PHASES.len(), "{phases:?}");
        // Every kind once per round, 20 each.
        for kind in kinds {
            assert_eq!(a.iter().filter(|plan| plan.kind == kind).count(), 20);
        }
    }
}
