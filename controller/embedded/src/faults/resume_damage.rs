//! A committed piece damaged, then the transfer resumed: while the final checkpoint lands on
//! the target, the sending agent is killed (`kill -9`); the receiver journals what it holds;
//! one bit is flipped in every 64 KiB stretch of each partly received staging file (so every
//! stored piece, whatever the chunk size, is damaged); the receiver may be killed too; each
//! killed agent's kubelet starts it again (its pod's `restartPolicy: Always`), and the
//! controller asks the restarted sender for the transfer again, which resumes from the
//! receiver's journal.
//!
//! What must hold: no damaged byte is ever placed. The receiver checks what it resumes from
//! before a file becomes visible, so the damaged pieces are fetched again (or the transfer fails
//! and the migration rolls back); every stored checkpoint verifies afterwards, no replacement is
//! restored from damaged bytes, and training ends with the reference loss.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use automigrate_core::migration::Phase;
use automigrate_core::transfer::MIN_CHUNK_SIZE;

use super::corruption::{staging_files, while_checkpoint_lands};
use super::world::FaultContext;
use super::{Draw, FaultParams, FaultPlan, Trigger};

/// Journal layout (controller/transfer/src/journal.rs): a 40-byte header, then 16-byte records
/// whose first byte is the tag; tag 1 records a stored piece.
const JOURNAL_HEADER: u64 = 40;
const JOURNAL_RECORD: usize = 16;
const PIECE_TAG: u8 = 1;
/// At most this many bits flipped per staging file.
const MAX_FLIPS_PER_FILE: u64 = 4096;

pub fn draw(draw: &mut Draw) -> (Trigger, FaultParams) {
    (
        Trigger::Degradation,
        FaultParams::ResumeDamage {
            kill_receiver: draw.chance(50),
            min_bytes: draw.range(64, 2048) * 1024,
        },
    )
}

/// Pieces a journal records as stored.
fn journaled_pieces(journal: &Path) -> usize {
    let Ok(bytes) = std::fs::read(journal) else {
        return 0;
    };
    bytes
        .get(JOURNAL_HEADER as usize..)
        .unwrap_or_default()
        .chunks_exact(JOURNAL_RECORD)
        .filter(|record| record.first() == Some(&PIECE_TAG))
        .count()
}

/// The staging files of transfers on `node` whose journal records at least `min_pieces`
/// stored pieces, with that count.
fn committed_staging(
    context: &FaultContext,
    node: &str,
    min_pieces: usize,
) -> Vec<(PathBuf, u64, usize)> {
    staging_files(context, node)
        .into_iter()
        .filter_map(|(path, size)| {
            let journal = path.parent()?.join("journal");
            let pieces = journaled_pieces(&journal);
            (pieces >= min_pieces).then_some((path, size, pieces))
        })
        .collect()
}

/// Flips one bit in every [`MIN_CHUNK_SIZE`] stretch of the file; returns how many.
fn flip_every_stretch(path: &Path, size: u64) -> Result<u64, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    let mut flipped = 0;
    let mut stretch = 0;
    while stretch * MIN_CHUNK_SIZE < size && flipped < MAX_FLIPS_PER_FILE {
        // Somewhere inside the stretch, not always at its start.
        let offset = stretch * MIN_CHUNK_SIZE + (stretch * 7919 + 13) % MIN_CHUNK_SIZE;
        if offset < size {
            let mut byte = [0_u8; 1];
            file.read_exact_at(&mut byte, offset)
                .map_err(|error| format!("{} at {offset}: {error}", path.display()))?;
            byte[0] ^= 1 << (stretch % 8);
            file.write_all_at(&byte, offset)
                .map_err(|error| format!("{} at {offset}: {error}", path.display()))?;
            flipped += 1;
        }
        stretch += 1;
    }
    file.sync_all()
        .map_err(|error| format!("{}: {error}", path.display()))?;
    Ok(flipped)
}

pub async fn inject(context: &FaultContext, plan: &FaultPlan) -> Result<(), String> {
    let FaultParams::ResumeDamage {
        kill_receiver,
        min_bytes,
    } = plan.params
    else {
        return Err("not a resume-damage plan".into());
    };
    context.trigger(plan).await?;
    let view = context
        .wait_for_phase(Phase::Checkpointing, Duration::from_secs(90))
        .await?;
    // 1. Wait until a file of the final checkpoint is partly on the target.
    let landed = while_checkpoint_lands(context, &view.target, |files| {
        (files.iter().map(|(_, size)| size).sum::<u64>() >= min_bytes).then_some(())
    })
    .await;
    if let Err(phase) = landed {
        context.note(format!(
            "fewer than {min_bytes} bytes were seen landing on {} while the final checkpoint moved ({phase:?}): not damaged",
            view.target
        ));
        return Ok(());
    }
    // 2. Kill the sender. The receiver's session ends, and its committer journals what is
    //    durable: those are the committed pieces a resume would trust.
    let before = context.latest_migration().and_then(|view| view.phase);
    let sender = view.source.clone();
    context.kill_agent(&sender)?;
    context.strike(&view.target, before);
    let settle = Instant::now() + Duration::from_secs(2);
    while committed_staging(context, &view.target, 1).is_empty() && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 3. Damage every stretch of every partly received file.
    let mut damaged = Vec::new();
    for (path, size) in staging_files(context, &view.target) {
        let pieces = path
            .parent()
            .map(|dir| journaled_pieces(&dir.join("journal")))
            .unwrap_or(0);
        match flip_every_stretch(&path, size) {
            Ok(flips) => damaged.push(format!(
                "{} ({size} bytes; the journal records {pieces} stored pieces): {flips} bits",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("?")
            )),
            // Completed and moved into place between the look and the write.
            Err(error) => tracing::debug!(%error, "staging file gone"),
        }
    }
    context.note(format!(
        "kill -9 of the sender, {sender}'s agent (phase seen: {before:?}; its kubelet restarts it); damaged on {}: {}",
        view.target,
        if damaged.is_empty() {
            "nothing (every staging file was already placed)".to_string()
        } else {
            damaged.join(", ")
        }
    ));
    // 4. Half the time the receiver is killed too (its kubelet restarts it; it then resumes
    //    from its journal on disk).
    if kill_receiver {
        context.kill_agent(&view.target)?;
        context.note(format!(
            "the receiver, {}'s agent, was killed too (its kubelet restarts it)",
            view.target
        ));
    }
    Ok(())
}
