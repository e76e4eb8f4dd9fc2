//! Moving data: the sync step (dataset, the base of an incremental dump, or the stored
//! checkpoint when the source is dead, all while the source still runs) and the transfer of
//! the checkpoint the replacement restores from. Every transfer is a [`TransferRecord`] in the
//! persisted [`Run`], started once and polled by its id, so a restarted driver polls the same
//! transfer instead of starting another.

use super::choose::choose_checkpoint;
use super::port::{Outcome, Port, TransferStatus};
use super::run::{Run, TransferRecord};

/// Makes sure a dead-source migration has chosen its stored checkpoint and has its transfer.
///
/// After a failed attempt, a choice whose copy has not arrived is checked again: a holder
/// that died too (the port lists only nodes that can send) would be asked until the phase
/// deadline, so its unfinished transfer is dropped and the copy chosen again among those
/// left, or none (the workload then starts fresh). Only after a failure, because listing asks
/// every node's agent.
pub(crate) async fn ensure_stored<P: Port>(port: &mut P, run: &mut Run) {
    if run.state.source_alive || run.state.checkpoint_id.is_some() {
        return;
    }
    let mut listed = None;
    if let Some(stored) = run.stored_checkpoint.clone()
        && run.state.attempts > 0
        && stored.from != run.state.target
        && !run
            .transfers
            .iter()
            .any(|record| record.carries_checkpoint(&stored.id) && record.done)
    {
        let copies = port.stored_checkpoints(run).await;
        let still_held = copies
            .iter()
            .any(|copy| copy.id == stored.id && copy.node == stored.from && copy.verified);
        if !still_held {
            run.transfers.retain(|record| {
                record.done
                    || !(record.carries_checkpoint(&stored.id) && record.from == stored.from)
            });
            run.stored_checkpoint = None;
        }
        listed = Some(copies);
    }
    if run.stored_checkpoint.is_none() {
        let copies = match listed {
            Some(copies) => copies,
            None => port.stored_checkpoints(run).await,
        };
        run.stored_checkpoint = choose_checkpoint(
            &copies,
            &run.state.source,
            &run.state.target,
            &run.failed_restores,
            None,
        );
    }
    if let Some(stored) = run.stored_checkpoint.clone() {
        run.ensure_checkpoint_transfer(&stored.id, &stored.from);
    }
}

/// A dead source cannot send: its unfinished transfers are dropped (the dataset must be
/// fetched again by the workload; the checkpoint comes from a replica, or is already on the
/// target). Kept, a send of the final dump from a source lost in Transferring was polled on the
/// dead node for ever whenever the replica chosen instead was that same dump, arrived whole on
/// the target (issue 16 campaign, f094-ac: an api-cut node's agent had sent it over the peer
/// links, but the controller could not hear so; 15 attempts, stuck until the run's deadline).
fn forget_dead_source_sends(run: &mut Run) {
    if !run.state.source_alive {
        let source = run.state.source.clone();
        run.transfers
            .retain(|record| record.from != source || record.done);
    }
}

/// The sync step.
pub(crate) async fn sync<P: Port>(port: &mut P, run: &mut Run) -> Outcome {
    ensure_stored(port, run).await;
    forget_dead_source_sends(run);
    drive(port, run, |_| true).await
}

/// The transfer step: the final dump (or the stored checkpoint) to the target.
pub(crate) async fn transfer_checkpoint<P: Port>(port: &mut P, run: &mut Run) -> Outcome {
    ensure_stored(port, run).await;
    forget_dead_source_sends(run);
    let (id, from) = match (&run.state.checkpoint_id, &run.stored_checkpoint) {
        (Some(id), _) => (id.clone(), run.state.source.clone()),
        (None, Some(stored)) => (stored.id.clone(), stored.from.clone()),
        (None, None) => return Outcome::done(),
    };
    run.ensure_checkpoint_transfer(&id, &from);
    drive(port, run, |record| record.carries_checkpoint(&id)).await
}

/// Starts or polls every unfinished transfer that `select` picks; `Done` once all are done.
pub(crate) async fn drive<P: Port>(
    port: &mut P,
    run: &mut Run,
    select: impl Fn(&TransferRecord) -> bool,
) -> Outcome {
    let mut running = Vec::new();
    for index in 0..run.transfers.len() {
        let record = &run.transfers[index];
        if record.done || !select(record) {
            continue;
        }
        let status = match port.transfer(record).await {
            Ok(status) => status,
            Err(failure) => {
                return Outcome::Failed {
                    reason: failure.reason,
                    retryable: failure.retryable,
                };
            }
        };
        let record = &mut run.transfers[index];
        let (id, bytes_done, bytes_total, finished) = match status {
            TransferStatus::Unknown => {
                // The sender forgot it (restarted): start again; the receiver's journal keeps
                // what already arrived.
                record.id = None;
                running.push(format!("{} restarting", record.describe()));
                continue;
            }
            TransferStatus::Failed { reason } => {
                record.id = None;
                return Outcome::Failed {
                    reason: format!("{} failed: {reason}", record.describe()),
                    retryable: true,
                };
            }
            TransferStatus::Running {
                id,
                bytes_done,
                bytes_total,
            } => (id, bytes_done, bytes_total, false),
            TransferStatus::Succeeded {
                id,
                bytes_done,
                bytes_total,
            } => (id, bytes_done, bytes_total, true),
        };
        let delta = bytes_done.saturating_sub(record.bytes_done);
        run.bytes_moved = run.bytes_moved.saturating_add(delta);
        let record = &mut run.transfers[index];
        record.id = Some(id);
        record.bytes_total = bytes_total;
        record.bytes_done = bytes_done;
        record.done = finished;
        if !finished {
            running.push(format!(
                "{} {bytes_done}/{bytes_total} bytes",
                record.describe()
            ));
        }
    }
    if running.is_empty() {
        Outcome::done()
    } else {
        Outcome::waiting(format!("transfers running: {}", running.join(", ")))
    }
}
