//! Starting the replacement from the chosen checkpoint, the restore-failure rule, and
//! verification.
//!
//! The restore-failure rule: when the replacement cannot be started from a stored checkpoint
//! for good (the target's store or runtime rejects it: damaged, incomplete) and the source is
//! dead, the driver retries **once** with the next older verified checkpoint (chosen by the
//! same rule as the first, among those taken before the one that failed), sending it to the
//! target first if needed; if that fails too, or none is older, the phase fails and the state
//! machine rolls back. Once, because each retry costs a transfer and a restore inside the same
//! phase deadline, and each older checkpoint repeats more work: two bad checkpoints in a row
//! say the store or the target is at fault, not one image. Only with a dead source, because a
//! live source still holds the migration's own final dump: the rollback restores that on the
//! source, losing no work, which beats any older checkpoint on the target.
//!
//! Before that rule, who is at fault: when the target's own store still lists the checkpoint
//! that failed as verified, the image is intact and the target refused it (a full disk, a
//! runtime that refuses). An older checkpoint would fail there the same way, and a fresh start
//! there would throw the intact one away: the state machine gets [`Event::TargetAtFault`]
//! instead, and with a dead source the migration fails so that the pod is placed again on
//! another node, from that checkpoint.

use super::choose::{choose_checkpoint, taken_at};
use super::port::{Action, CheckpointCopy, Outcome, Port, Role};
use super::run::Run;
use super::transfers;
use crate::migration::Event;

/// What a step came to, for the loop: an outcome, an event for the state machine other than
/// the step's success or failure, or "the run changed, go round again".
pub(crate) enum Next {
    Outcome(Outcome),
    Event(Event),
    Again,
}

/// Whether `target` holds checkpoint `id` intact: listed, and verified by every listing of
/// it there (a port may list a copy twice, as recorded and as the target's store checked it
/// just now; the store's word that it is damaged wins).
fn target_holds_intact(copies: &[CheckpointCopy], id: &str, target: &str) -> bool {
    let mut listed = copies
        .iter()
        .filter(|copy| copy.id == id && copy.node == target)
        .peekable();
    listed.peek().is_some() && listed.all(|copy| copy.verified)
}

/// The restore step.
pub(crate) async fn restore<P: Port>(port: &mut P, run: &mut Run) -> Next {
    let from = run.restore_from().map(String::from);
    if let Some(id) = &from
        && run
            .transfers
            .iter()
            .any(|record| record.carries_checkpoint(id) && !record.done)
    {
        // A retry's older checkpoint is still on its way to the target.
        let sent = transfers::drive(port, run, |record| record.carries_checkpoint(id)).await;
        if sent != Outcome::done() {
            return Next::Outcome(sent);
        }
    }
    let action = Action::StartReplacement {
        node: run.state.target.clone(),
        from: from.clone(),
        role: Role::Migration,
    };
    match port.act(run, &action).await {
        Outcome::Failed {
            reason,
            retryable: false,
        } if !run.state.source_alive => {
            let Some(failed) = from else {
                return Next::Outcome(Outcome::Failed {
                    reason,
                    retryable: false,
                });
            };
            let copies = port.stored_checkpoints(run).await;
            let target = &run.state.target;
            if target_holds_intact(&copies, &failed, target) {
                return Next::Event(Event::TargetAtFault {
                    reason: format!(
                        "checkpoint {failed} did not restore on {target} ({reason}), although \
                         {target}'s store verifies it intact"
                    ),
                });
            }
            if !run.failed_restores.is_empty() {
                return Next::Outcome(Outcome::Failed {
                    reason,
                    retryable: false,
                });
            }
            let older_than = taken_at(&copies, &failed);
            run.failed_restores.push(failed.clone());
            match choose_checkpoint(
                &copies,
                &run.state.source,
                &run.state.target,
                &run.failed_restores,
                older_than,
            ) {
                Some(older) => {
                    run.state.message = Some(format!(
                        "checkpoint {failed} did not restore on {} ({reason}); restoring the older {}",
                        run.state.target, older.id
                    ));
                    run.state.checkpoint_id = None;
                    run.ensure_checkpoint_transfer(&older.id, &older.from);
                    run.stored_checkpoint = Some(older);
                    Next::Again
                }
                None => Next::Outcome(Outcome::Failed {
                    reason: format!("{reason}; no older verified checkpoint to retry"),
                    retryable: false,
                }),
            }
        }
        other => Next::Outcome(other),
    }
}
