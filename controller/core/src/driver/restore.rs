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

use super::choose::{choose_checkpoint, taken_at};
use super::port::{Action, Outcome, Port, Role};
use super::run::Run;
use super::transfers;

/// What a step came to, for the loop: an outcome, or "the run changed, go round again".
pub(crate) enum Next {
    Outcome(Outcome),
    Again,
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
        } if !run.state.source_alive && run.failed_restores.is_empty() => {
            let Some(failed) = from else {
                return Next::Outcome(Outcome::Failed {
                    reason,
                    retryable: false,
                });
            };
            let copies = port.stored_checkpoints(run).await;
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
