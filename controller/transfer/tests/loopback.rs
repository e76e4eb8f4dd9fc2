//! End-to-end transfers over loopback with real TLS: correctness, connection counts, resume,
//! visibility, corruption.

#[cfg(test)]
mod common;

use std::time::Duration;

use automigrate_core::transfer::{TransferSettings, TransferStrategy};
use automigrate_transfer::manifest::Source;
use automigrate_transfer::receiver::ReceiverConfig;
use automigrate_transfer::sender::{SendError, SendOptions, TestHooks, send};
use common::*;

const MIB: u64 = 1024 * 1024;

fn options(max_streams: u32, chunk_size: u64) -> SendOptions {
    SendOptions {
        settings: TransferSettings {
            strategy: TransferStrategy::Parallel,
            max_streams,
            chunk_size,
            rate_limit_bps: None,
        },
        round: Some(Duration::from_millis(200)),
        // Small, so "only what was in flight is sent again" is a tight bound in these tests.
        window_units: 4,
        ..SendOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_tree_arrives_byte_for_byte() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 3, 3 * MIB as usize + 5, 150, 3000);
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;

    let report = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options(6, 1 << 20),
    )
    .await
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    assert!(
        staging_leftovers(dest.path()).is_empty(),
        "staging left behind"
    );
    assert_eq!(report.files, 3 + 150 + 2);
    assert_eq!(report.units_resent, 0);
    assert_eq!(report.hash_mismatches, 0);
    // Every unit once, apart from endgame copies of the last units; every byte once, unless
    // a transmission was cut off because its copy arrived first (then less than once on that
    // stream, and the copy carried it).
    assert_eq!(
        report.units_sent - report.units_duplicated,
        report.units_total
    );
    if report.units_abandoned == 0 {
        assert_eq!(
            report.bytes_sent - report.bytes_duplicated,
            report.total_bytes,
            "{report:#?}"
        );
    } else {
        assert!(
            report.bytes_sent - report.bytes_duplicated <= report.total_bytes,
            "{report:#?}"
        );
    }
    let stats = running.receiver.stats();
    assert_eq!(stats.sessions_completed, 1);
    assert_eq!(stats.files_completed, report.files);
    assert!(
        report.connections <= 6,
        "{} connections",
        report.connections
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_directory_is_honoured_and_sending_again_sends_nothing() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 1, 2 * MIB as usize, 20, 1000);
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let mut options = options(4, 1 << 20);
    options.target = Some("ckpt/lstm-000041".into());

    send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options,
    )
    .await
    .unwrap();
    assert_same_tree(source.path(), &dest.path().join("ckpt/lstm-000041"));

    let again = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options,
    )
    .await
    .unwrap();
    assert_eq!(again.units_skipped, again.units_total);
    assert_eq!(again.bytes_sent, 0);
    assert_eq!(again.bytes_skipped, again.total_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_files_share_a_few_connections() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    for index in 0..2000 {
        write(
            source.path(),
            &format!("f/{:04}", index),
            &bytes(index, 700),
        );
    }
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let max_streams = 4;

    let report = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options(max_streams, 256 * 1024),
    )
    .await
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    let accepted = running.receiver.stats().connections_accepted;
    assert!(
        accepted <= u64::from(max_streams),
        "2000 files took {accepted} connections; at most {max_streams} expected"
    );
    assert_eq!(report.connections, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sender_resumes_with_only_the_missing_units() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    // 40 chunks and 3 packs: far more units than can be in flight when the sender dies.
    mixed_tree(source.path(), 4, 10 * 256 * 1024, 30, 2000);
    let mut config = ReceiverConfig::new(dest.path());
    config.durable_acks = true;
    let running = start_receiver(config, &pki.receiver, None).await;
    let source = Source::Dir(source.path().into());

    let mut first = options(3, 256 * 1024);
    first.hooks = TestHooks {
        abort_after_acks: Some(8),
        ..TestHooks::default()
    };
    let error = send(&source, running.addr, &pki.sender, &first)
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Aborted), "{error}");

    let second = send(&source, running.addr, &pki.sender, &options(3, 256 * 1024))
        .await
        .unwrap();
    let Source::Dir(root) = &source else {
        unreachable!()
    };
    assert_same_tree(root, dest.path());
    // Every unit acknowledged before the kill was durable (durable acks), so it is skipped.
    assert!(second.units_skipped >= 8, "{second:#?}");
    assert!(second.units_skipped < second.units_total, "{second:#?}");
    assert_eq!(second.units_resent, 0);
    assert_eq!(
        second.units_sent - second.units_duplicated + second.units_skipped,
        second.units_total
    );
    let once = second.bytes_sent - second.bytes_duplicated + second.bytes_skipped;
    if second.units_abandoned == 0 {
        assert_eq!(once, second.total_bytes, "{second:#?}");
    } else {
        // A transmission cut off because its copy arrived first sent less than its unit.
        assert!(once <= second.total_bytes, "{second:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_resend_only_what_was_in_flight() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 4, 8 * 256 * 1024, 30, 2000);
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let mut options = options(3, 256 * 1024);
    options.hooks.drop_connections_after_acks = Some(6);

    let report = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options,
    )
    .await
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    // At most a window's worth per stream was unacknowledged when they were cut.
    let in_flight_bound = 3 * u64::from(options.window_units);
    assert!(report.units_resent <= in_flight_bound, "{report:#?}");
    assert_eq!(
        report.units_sent,
        report.units_total + report.units_resent + report.units_duplicated
    );
    assert!(
        report.connections > 3,
        "new connections were opened: {report:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_receiver_comes_back_and_the_transfer_completes() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 4, 16 * 128 * 1024, 20, 2000);
    let mut config = ReceiverConfig::new(dest.path());
    config.durable_acks = true;
    let first = start_receiver(config.clone(), &pki.receiver, None).await;
    let addr = first.addr;

    // Kill the receiver (every task, no last commit) once 10 units are acknowledged, and
    // bring a new one up on the same port.
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let killed_tx = std::sync::Mutex::new(Some(killed_tx));
    let mut options = options(3, 128 * 1024);
    options.settings.rate_limit_bps = Some(64_000_000);
    options.retry.min_delay = Duration::from_millis(50);
    options.progress = Some(std::sync::Arc::new(move |progress| {
        if progress.units_done >= 10
            && let Some(tx) = killed_tx.lock().unwrap().take()
        {
            let _ = tx.send(());
        }
    }));
    let source_dir = source.path().to_path_buf();
    let sender_tls = pki.sender.clone();
    let sending =
        tokio::spawn(
            async move { send(&Source::Dir(source_dir), addr, &sender_tls, &options).await },
        );
    killed_rx.await.unwrap();
    first.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = start_receiver(config, &pki.receiver, Some(addr)).await;

    let report = sending.await.unwrap().unwrap();
    assert_same_tree(source.path(), dest.path());
    assert!(report.sessions >= 2, "{report:#?}");
    // Only what was in flight at the kill went again.
    assert!(report.units_resent <= 3 * 4, "{report:#?}");
    assert_eq!(second.receiver.stats().sessions_completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_invisible_until_complete_and_verified() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 2, 2 * MIB as usize, 40, 20_000);
    let (expected, _) = snapshot(source.path());
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let mut options = options(2, 256 * 1024);
    options.settings.rate_limit_bps = Some(40_000_000);

    let source_dir = source.path().to_path_buf();
    let addr = running.addr;
    let tls = pki.sender.clone();
    let sending =
        tokio::spawn(async move { send(&Source::Dir(source_dir), addr, &tls, &options).await });
    let mut looks = 0;
    let mut seen_partial_set = false;
    while !sending.is_finished() {
        let (visible, _) = snapshot(dest.path());
        for (path, hash) in &visible {
            assert_eq!(
                expected.get(path),
                Some(hash),
                "{path} is visible but not complete"
            );
        }
        seen_partial_set |= !visible.is_empty() && visible.len() < expected.len();
        looks += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sending.await.unwrap().unwrap();
    assert_same_tree(source.path(), dest.path());
    assert!(
        looks > 1,
        "the transfer ended before the destination could be watched"
    );
    // Complete files appear as they complete, not all at the end.
    assert!(
        seen_partial_set,
        "never saw some files in place while others were still coming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_piece_is_refused_and_sent_again() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 2, 6 * 256 * 1024, 10, 5000);
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let mut options = options(2, 256 * 1024);
    options.hooks.corrupt_sends = vec![0, 4];

    let report = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options,
    )
    .await
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    assert_eq!(report.hash_mismatches, 2, "{report:#?}");
    assert_eq!(report.units_resent, 2);
    assert_eq!(running.receiver.stats().pieces_rejected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_that_never_verifies_fails_the_transfer_by_name() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    write(source.path(), "only", &bytes(3, 5000));
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;
    let mut options = options(1, 256 * 1024);
    options.hooks.corrupt_sends = (0..100).collect();

    let error = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, SendError::Verification { ref path, attempts: 4 } if path == "only"),
        "{error}"
    );
    assert!(!dest.path().join("only").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_damaged_on_the_receivers_disk_is_caught_and_sent_again() {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    mixed_tree(source.path(), 2, 4 * 256 * 1024, 10, 5000);
    // A chunk of a large file and a whole small file, damaged on disk after they verified in
    // memory.
    let manifest = automigrate_transfer::manifest::scan(
        &Source::Dir(source.path().into()),
        None,
        256 * 1024,
        1,
    )
    .unwrap()
    .manifest;
    let locations: Vec<_> = (0..manifest.piece_count())
        .map(|piece| (piece, manifest.locate(piece).unwrap()))
        .collect();
    let chunk = locations.iter().find(|(_, l)| l.chunked).unwrap().0;
    let small = locations
        .iter()
        .find(|(_, l)| !l.chunked && l.len > 0)
        .unwrap()
        .0;
    let mut config = ReceiverConfig::new(dest.path());
    config.damage_after_write = vec![chunk, small];
    let running = start_receiver(config, &pki.receiver, None).await;

    // One stream: no endgame copy can overwrite the damage before it is found.
    let report = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options(1, 256 * 1024),
    )
    .await
    .unwrap();

    assert_same_tree(source.path(), dest.path());
    // Caught by the read-back at commit, reported Missing at Done, sent once more: exactly the
    // two units. (Once, the control stream took those units after its Done, on a connection
    // the receiver closes after answering, and they went a third time: about one run in
    // eight. The stream that sent Done now carries nothing more.)
    assert_eq!(report.units_resent, 2, "{report:#?}");
    assert_eq!(report.units_sent, report.units_total + 2, "{report:#?}");
    assert_eq!(report.hash_mismatches, 0);
}

/// Flips one byte in the middle of a piece the receiver's journal records as stored, in that
/// piece's staging file, as a failing disk or a stray hand would between an interrupted
/// transfer and its resume. Returns the damaged piece.
///
/// Layout (see `journal.rs` and `receiver.rs`): `<dest>/.automigrate-staging/<transfer id in
/// hex>/journal` is a 40-byte header and 16-byte records (tag `1` = piece stored, `2` = file
/// placed; then the `u64` little-endian piece or file index; then 7 check bytes); piece `p` of
/// file `i` lies at `manifest.locate(p).offset` in `<same dir>/f<i>`.
#[cfg(test)]
fn damage_a_journaled_piece(
    dest: &std::path::Path,
    manifest: &automigrate_transfer::manifest::Manifest,
) -> u64 {
    let id = manifest.transfer_id().unwrap();
    let staging = dest
        .join(".automigrate-staging")
        .join(automigrate_transfer::receiver::hex(&id));
    let journal = std::fs::read(staging.join("journal")).unwrap();
    let (piece, location) = journal[40..]
        .chunks_exact(16)
        .filter(|record| record[0] == 1)
        .map(|record| u64::from_le_bytes(record[1..9].try_into().unwrap()))
        .find_map(|piece| {
            let location = manifest.locate(piece)?;
            location.chunked.then_some((piece, location))
        })
        .expect("the interrupted transfer journaled a chunk of an incomplete file");
    // One byte changed in place: rewriting the whole file would race with the interrupted
    // session, which may still be writing other pieces of it.
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(staging.join(format!("f{}", location.file)))
        .unwrap();
    let at = location.offset + location.len / 2;
    let mut byte = [0_u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    piece
}

/// Sends a tree, stops the sender after 8 durable acks, damages a journaled piece in staging,
/// optionally restarts the receiver, and sends again: the resumed transfer must place exactly
/// the source's bytes, sending the damaged piece again and nothing else that it had.
#[cfg(test)]
async fn resume_after_damage_in_staging(restart_receiver: bool) {
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    const CHUNK: u64 = 64 * 1024;
    // 40 chunks a large file: more than the 8 acknowledged units plus a window in flight, so
    // no large file can be complete before the resume.
    mixed_tree(source.path(), 2, 40 * CHUNK as usize, 20, 3000);
    let manifest =
        automigrate_transfer::manifest::scan(&Source::Dir(source.path().into()), None, CHUNK, 1)
            .unwrap()
            .manifest;
    let mut config = ReceiverConfig::new(dest.path());
    // Acknowledged means journaled, so the 8 acknowledged units are on disk and in the journal
    // when the sender stops.
    config.durable_acks = true;
    let first = start_receiver(config.clone(), &pki.receiver, None).await;
    let dir = Source::Dir(source.path().into());

    // One stream: no endgame copy of a piece can rewrite the damage.
    let mut interrupted = options(1, CHUNK);
    interrupted.hooks.abort_after_acks = Some(8);
    let error = send(&dir, first.addr, &pki.sender, &interrupted)
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::Aborted), "{error}");

    let running = if restart_receiver {
        first.stop();
        start_receiver(config, &pki.receiver, None).await
    } else {
        first
    };
    let damaged = damage_a_journaled_piece(dest.path(), &manifest);

    let report = send(&dir, running.addr, &pki.sender, &options(1, CHUNK))
        .await
        .unwrap_or_else(|error| panic!("the resumed transfer failed: {error}"));
    // Before whole-file verification at placement, the resumed transfer reported success and
    // the damaged byte was placed.
    assert_same_tree(source.path(), dest.path());
    assert!(
        report.units_skipped >= 8,
        "the resume skipped little: {report:#?}"
    );
    // The damaged piece was counted as held (skipped), reported Missing at Done and sent
    // then: exactly one unit more than the pieces the receiver lacked.
    assert_eq!(
        report.units_sent - report.units_duplicated,
        report.units_total - report.units_skipped + 1,
        "damaged piece {damaged}: {report:#?}"
    );
    assert_eq!(report.units_resent, 0, "{report:#?}");
    assert_eq!(report.hash_mismatches, 0);
    assert!(staging_leftovers(dest.path()).is_empty());
    let stats = running.receiver.stats();
    assert_eq!(stats.pieces_damaged_on_disk, 1, "{stats:#?}");
    assert!(stats.bytes_rechecked >= 7 * CHUNK, "{stats:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journaled_piece_damaged_in_staging_is_sent_again_when_the_sender_resumes() {
    resume_after_damage_in_staging(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journaled_piece_damaged_in_staging_is_sent_again_after_a_receiver_restart() {
    resume_after_damage_in_staging(true).await;
}

/// The receiver's journal record for `piece` stored (tag 1), as `journal.rs` encodes it.
#[cfg(test)]
fn journal_piece_record(id: &[u8; 32], piece: u64) -> Vec<u8> {
    let mut record = vec![1_u8];
    record.extend_from_slice(&piece.to_le_bytes());
    let check = blake3::keyed_hash(id, &record);
    record.extend_from_slice(&check.as_bytes()[..7]);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_held_whole_in_staging_is_checked_before_it_is_placed() {
    // What a receiver leaves when a commit found one piece of a file damaged, journaled the
    // file's other pieces, and stopped before the damaged one came again: a staging file with
    // every piece journaled, one of them damaged.
    let pki = pki();
    let source = tempfile::tempdir().unwrap();
    let dest = tempfile::tempdir().unwrap();
    const CHUNK: u64 = 64 * 1024;
    mixed_tree(source.path(), 2, 12 * CHUNK as usize, 5, 3000);
    let manifest =
        automigrate_transfer::manifest::scan(&Source::Dir(source.path().into()), None, CHUNK, 1)
            .unwrap()
            .manifest;
    let id = manifest.transfer_id().unwrap();
    let file = manifest
        .files
        .iter()
        .position(|entry| entry.path.to_string() == "large/file-0.bin")
        .unwrap();
    let staging = dest
        .path()
        .join(".automigrate-staging")
        .join(automigrate_transfer::receiver::hex(&id));
    std::fs::create_dir_all(&staging).unwrap();
    let mut content = std::fs::read(source.path().join("large/file-0.bin")).unwrap();
    content[5 * CHUNK as usize + 100] ^= 0x01;
    std::fs::write(staging.join(format!("f{file}")), &content).unwrap();
    let mut journal = b"AMXJ".to_vec();
    journal.extend_from_slice(&1_u32.to_le_bytes());
    journal.extend_from_slice(&id);
    for piece in manifest.pieces_of(file) {
        journal.extend_from_slice(&journal_piece_record(&id, piece));
    }
    std::fs::write(staging.join("journal"), &journal).unwrap();
    let running = start_receiver(ReceiverConfig::new(dest.path()), &pki.receiver, None).await;

    let report = send(
        &Source::Dir(source.path().into()),
        running.addr,
        &pki.sender,
        &options(1, CHUNK),
    )
    .await
    .unwrap_or_else(|error| panic!("the transfer failed: {error}"));

    // Before, the file stayed in staging while the receiver answered Complete.
    assert_same_tree(source.path(), dest.path());
    assert_eq!(report.units_skipped, 12, "{report:#?}");
    // Only the damaged chunk went again.
    assert_eq!(
        report.units_sent - report.units_duplicated,
        report.units_total - report.units_skipped + 1,
        "{report:#?}"
    );
    assert_eq!(running.receiver.stats().pieces_damaged_on_disk, 1);
    assert!(staging_leftovers(dest.path()).is_empty());
}
