//! Checkpoints damaged at rest and in flight.
//!
//! At rest: one file of a stored checkpoint is truncated or has one bit flipped, either the
//! newest standby copy right before the home node fails (the copy the engine will choose), or
//! the migration's final checkpoint once it sits in the target's store, before the restore.
//! In flight: a byte of a checkpoint file is flipped in the receiver's staging area while it
//! lands, before the transfer engine has checked the file against its BLAKE3 hashes.
//!
//! What must hold: no replacement is ever restored from damaged bytes (the store verifies the
//! archive before a restore; the receiver verifies every piece and every file); the migration
//! ends with a reason; training still ends with the reference loss.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use automigrate_core::migration::Phase;

use super::world::{self, FaultContext, HOME_NODE};
use super::{Damage, Draw, FaultParams, FaultPlan, RestPlace, Trigger};

fn draw_damage(draw: &mut Draw) -> Damage {
    if draw.chance(50) {
        Damage::Truncate {
            keep_permille: draw.range(0, 990) as u32,
        }
    } else {
        Damage::BitFlip {
            offset_permille: draw.range(0, 999) as u32,
            bit: draw.range(0, 7) as u8,
        }
    }
}

pub fn draw_at_rest(draw: &mut Draw) -> (Trigger, FaultParams) {
    let place = draw
        .pick(&[RestPlace::Standby, RestPlace::Target])
        .unwrap_or(RestPlace::Standby);
    let trigger = match place {
        RestPlace::Standby => Trigger::NodeFailure,
        RestPlace::Target => Trigger::Degradation,
    };
    let damage = draw_damage(draw);
    (
        trigger,
        FaultParams::CorruptAtRest {
            place,
            damage,
            file_pick: draw.range(0, 3) as u32,
        },
    )
}

pub fn draw_in_flight(draw: &mut Draw) -> (Trigger, FaultParams) {
    (
        Trigger::Degradation,
        FaultParams::CorruptInFlight {
            offset_permille: draw.range(0, 999) as u32,
            bit: draw.range(0, 7) as u8,
        },
    )
}

/// Damages one file of checkpoint `id` in `node`'s store.
fn damage_stored(
    context: &FaultContext,
    node: &str,
    id: &str,
    damage: Damage,
    file_pick: u32,
) -> Result<String, String> {
    let stored = context
        .stored(node)
        .into_iter()
        .find(|stored| stored.id == id)
        .ok_or_else(|| format!("checkpoint {id} is not in {node}'s store"))?;
    let files: Vec<_> = world::checkpoint_files(&stored.dir)
        .into_iter()
        .filter(|(path, _)| {
            path.file_name()
                .is_none_or(|name| name != automigrate_checkpoint::manifest::MANIFEST_FILE)
        })
        .collect();
    if files.is_empty() {
        return Err(format!("checkpoint {id} on {node} has no files"));
    }
    let (path, size) = files
        .get(file_pick as usize % files.len())
        .cloned()
        .ok_or("no file to damage")?;
    let done = world::damage_file(&path, size, damage)?;
    context.set_damaged(node, id);
    Ok(done)
}

pub async fn inject_at_rest(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::CorruptAtRest {
        place,
        damage,
        file_pick,
    } = plan.params
    else {
        return Err("not a corrupt-at-rest plan".into());
    };
    match place {
        RestPlace::Standby => {
            let epoch = context.wait_for_percent(plan.percent, true).await?;
            // The newest checkpoint any other node holds: the one a restore will pick.
            let mut newest: Option<(String, String, jiff::Timestamp)> = None;
            for node in context.cluster().nodes() {
                if node == HOME_NODE {
                    continue;
                }
                for stored in context.stored(node) {
                    if stored.restorable
                        && newest
                            .as_ref()
                            .is_none_or(|(_, _, at)| stored.created > *at)
                    {
                        newest = Some((node.clone(), stored.id, stored.created));
                    }
                }
            }
            let (node, id, _) = newest.ok_or("no standby copy to damage")?;
            let done = damage_stored(context, &node, &id, damage, file_pick)?;
            context.strike(&node, None);
            context.note(format!(
                "standby copy {id} on {node} damaged at epoch {epoch}: {done}"
            ));
            context.power_off(HOME_NODE).await?;
            context.note(format!("{HOME_NODE} powered off right after"));
        }
        RestPlace::Target => {
            context.trigger(plan).await?;
            let view = context
                .wait_for(Duration::from_secs(90), |view| {
                    view.checkpoint_id.is_some()
                        && view.phase.is_some_and(|phase| phase >= Phase::Transferring)
                })
                .await
                .ok_or("no final checkpoint within 90 s")?;
            let id = view.checkpoint_id.clone().unwrap_or_default();
            let target = TargetStore {
                context,
                node: view.target.clone(),
            };
            // Wait for it to arrive in the target's store; strike before the restore begins.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let phase = context.latest_migration().and_then(|view| view.phase);
                if phase.is_some_and(|phase| phase >= Phase::Restoring) {
                    context.note(format!(
                        "the final checkpoint {id} was not seen in {}'s store before the restore ({phase:?}): not damaged",
                        target.node
                    ));
                    return Ok(());
                }
                if target.holds(&id) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{id} never reached {}'s store", target.node));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let before = context.latest_migration().and_then(|view| view.phase);
            let done = damage_stored(context, &target.node, &id, damage, file_pick)?;
            context.strike(&target.node, before);
            context.note(format!(
                "final checkpoint {id} damaged in {}'s store (phase seen: {before:?}): {done}",
                target.node
            ));
        }
    }
    Ok(())
}

struct TargetStore<'a> {
    context: &'a FaultContext,
    node: String,
}

impl TargetStore<'_> {
    fn holds(&self, id: &str) -> bool {
        self.context
            .stored(&self.node)
            .iter()
            .any(|stored| stored.id == id)
    }
}

/// Staging files of transfers arriving on a node.
pub(super) fn staging_files(context: &FaultContext, node: &str) -> Vec<(PathBuf, u64)> {
    context.staging_files(node)
}

pub async fn inject_in_flight(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::CorruptInFlight {
        offset_permille,
        bit,
    } = plan.params
    else {
        return Err("not a corrupt-in-flight plan".into());
    };
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(Phase::Checkpointing, Duration::from_secs(90))
        .await?;
    let landed = while_checkpoint_lands(context, &view.target, |files| {
        let (path, size) = files.into_iter().next()?;
        let before = context.latest_migration().and_then(|view| view.phase);
        match world::damage_file(
            &path,
            size,
            super::Damage::BitFlip {
                offset_permille,
                bit,
            },
        ) {
            Ok(done) => Some((before, done)),
            // The file was completed and moved into place between the look and the write.
            Err(error) => {
                tracing::debug!(%error, "staging file gone");
                None
            }
        }
    })
    .await;
    match landed {
        Ok((before, done)) => {
            context.strike(&view.target, before);
            context.note(format!(
                "a file landing on {} damaged in the receiver's staging area (phase seen: {before:?}): {done}",
                view.target
            ));
        }
        Err(phase) => context.note(format!(
            "no file was seen landing on {} while the final checkpoint moved ({phase:?}): not damaged",
            view.target
        )),
    }
    Ok(())
}

/// Polls the staging files of transfers arriving on `node` until `take` makes something of
/// them. `Err` with the phase seen once the migration has gone past the transfer of its final
/// checkpoint (Fencing or later) or 30 s have passed.
pub(super) async fn while_checkpoint_lands<T>(
    context: &FaultContext,
    node: &str,
    mut take: impl FnMut(Vec<(PathBuf, u64)>) -> Option<T>,
) -> Result<T, Option<Phase>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(taken) = take(staging_files(context, node)) {
            return Ok(taken);
        }
        let phase = context.latest_migration().and_then(|view| view.phase);
        if phase.is_some_and(|phase| phase >= Phase::Fencing) || Instant::now() > deadline {
            return Err(phase);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
