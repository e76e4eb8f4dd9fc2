//! Real checkpoints with CRIU and runc: a Python counter is dumped, restored, and must continue
//! from where it was (same run tag, next value), never restart. Needs root, CRIU >= 4 and runc
//! (scripts/install-node-deps.sh); see common::privileged for how a missing one is reported.

// Test code, helpers included: a failed step fails the test (clippy.toml allows this in #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use automigrate_checkpoint::archive::{self, ArchiveError};
use automigrate_checkpoint::bundle::{Bundle, BundleSpec};
use automigrate_checkpoint::command::SystemRunner;
use automigrate_checkpoint::process::{
    ProcessBackend, ProcessError, ProcessRestoreTarget, ProcessWorkload,
};
use automigrate_checkpoint::runc::{RuncBackend, RuncContainer, RuncError, RuncRestoreTarget};
use automigrate_checkpoint::{
    CheckpointBackend, CheckpointStore, DumpKind, FreezeSource, Subject, checkpoint_into_store,
};
use automigrate_core::model::PodRef;
use common::{Cleanup, highest, prepare_counter, privileged, records, unique, wait_for, wipe};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the counter script in its own session (so CRIU can dump it as a whole tree), with
/// stdio on /dev/null (CRIU cannot restore descriptors pointing at files it cannot find).
fn spawn_counter(script: &Path, log: &Path, dir: &Path) -> (tokio::process::Child, i32) {
    let child = tokio::process::Command::new("setsid")
        .arg("/usr/bin/python3")
        .arg(script)
        .arg(log)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap() as i32;
    (child, pid)
}

fn subject(name: &str) -> Subject {
    Subject {
        pod: PodRef::new("test", name),
        container: "counter".to_string(),
    }
}

/// The tag of the run that wrote the log so far (all records must share it).
fn single_tag(log: &Path) -> u64 {
    let written = records(log);
    let tag = written[0].1;
    assert!(written.iter().all(|record| record.1 == tag), "{written:?}");
    tag
}

/// After a restore: the program wrote `first` next, kept its tag, and counts on.
fn assert_continues(log: &Path, tag: u64, first: std::ops::RangeInclusive<usize>) {
    wait_for("the restored counter to write 5 records", || {
        records(log).len() >= 5
    });
    let written = records(log);
    let (slot, new_tag, value) = written[0];
    assert!(
        first.contains(&slot),
        "restored counter wrote slot {slot} first, expected one in {first:?} (1 would mean a restart)"
    );
    assert_eq!(value as usize, slot);
    assert_eq!(
        new_tag, tag,
        "the restored program has a new run tag: it restarted"
    );
    for pair in written.windows(2) {
        assert_eq!(
            pair[1].0,
            pair[0].0 + 1,
            "records must be consecutive: {written:?}"
        );
        assert_eq!(pair[1].1, tag);
    }
}

#[tokio::test]
async fn process_is_dumped_and_restored_and_continues_counting() {
    if !privileged("process_is_dumped_and_restored_and_continues_counting") {
        return;
    }
    let mut cleanup = Cleanup::default();
    let dir = tempfile::tempdir().unwrap();
    let (script, log) = prepare_counter(dir.path());
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let (mut child, pid) = spawn_counter(&script, &log, dir.path());
    cleanup.pids.push(pid);
    wait_for("the counter to start", || highest(&log) >= 20);
    let tag = single_tag(&log);

    let backend = ProcessBackend::new(SystemRunner, "criu");
    let subject = subject(&unique("proc"));
    let stored = checkpoint_into_store(
        &backend,
        &store,
        &subject,
        &ProcessWorkload { pid },
        DumpKind::Final,
        None,
        TIMEOUT,
    )
    .await
    .unwrap();
    // CRIU killed the dumped process; reap it so its pid is free for the restore.
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    let last_before = highest(&log);

    let manifest = &stored.manifest;
    assert_eq!(manifest.kind, DumpKind::Final);
    assert_eq!(
        manifest.criu_version.as_deref().map(|v| &v[..2]),
        Some("4.")
    );
    let freeze = manifest.freeze.unwrap();
    assert_eq!(freeze.source, FreezeSource::CriuStats);
    assert!(freeze.micros > 0);
    for expected in [
        "checkpoint/inventory.img",
        "checkpoint/dump.log",
        "stats-dump",
        "config.dump",
    ] {
        assert!(
            manifest.files.iter().any(|file| file.path() == expected),
            "{expected} missing from {:?}",
            manifest.files
        );
    }

    wipe(&log);
    let verified = store.verified(&subject.pod, &manifest.id).unwrap();
    let restored_pid = backend
        .restore(
            &verified,
            &ProcessRestoreTarget {
                work_dir: dir.path().join("restore-work"),
                timeout: TIMEOUT,
            },
        )
        .await
        .unwrap();
    cleanup.pids.push(restored_pid);
    assert_eq!(restored_pid, pid, "CRIU restores the original pid");
    assert_continues(&log, tag, last_before + 1..=last_before + 1);
    // The restore wrote nothing into the sealed archive.
    archive::verify(&stored.dir).unwrap();
}

#[tokio::test]
async fn a_tampered_checkpoint_is_not_restored() {
    if !privileged("a_tampered_checkpoint_is_not_restored") {
        return;
    }
    let mut cleanup = Cleanup::default();
    let dir = tempfile::tempdir().unwrap();
    let (script, log) = prepare_counter(dir.path());
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let (mut child, pid) = spawn_counter(&script, &log, dir.path());
    cleanup.pids.push(pid);
    wait_for("the counter to start", || highest(&log) >= 5);
    let backend = ProcessBackend::new(SystemRunner, "criu");
    let subject = subject(&unique("tamper"));
    let stored = checkpoint_into_store(
        &backend,
        &store,
        &subject,
        &ProcessWorkload { pid },
        DumpKind::Periodic,
        None,
        TIMEOUT,
    )
    .await
    .unwrap();
    // A periodic dump leaves the process running.
    let after = highest(&log);
    wait_for("the counter to go on after --leave-running", || {
        highest(&log) > after + 5
    });
    cleanup.pids.clear();
    child.kill().await.unwrap();

    let pages = stored
        .manifest
        .files
        .iter()
        .map(|file| file.path().to_string())
        .find(|path| path.starts_with("checkpoint/pages-"))
        .unwrap();
    let path = stored.dir.join(&pages);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let error = store
        .verified(&subject.pod, &stored.manifest.id)
        .unwrap_err();
    assert!(
        matches!(&error, automigrate_checkpoint::store::StoreError::Archive(ArchiveError::HashMismatch { file, .. }) if *file == pages),
        "{error}"
    );
    assert!(error.to_string().contains(&pages), "{error}");
}

#[tokio::test]
async fn incremental_checkpoints_follow_the_kernel() {
    if !privileged("incremental_checkpoints_follow_the_kernel") {
        return;
    }
    let mut cleanup = Cleanup::default();
    let dir = tempfile::tempdir().unwrap();
    let (script, log) = prepare_counter(dir.path());
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let (mut child, pid) = spawn_counter(&script, &log, dir.path());
    cleanup.pids.push(pid);
    wait_for("the counter to start", || highest(&log) >= 5);
    let tag = single_tag(&log);
    let backend = ProcessBackend::new(SystemRunner, "criu");
    let subject = subject(&unique("incr"));
    let workload = ProcessWorkload { pid };
    let capabilities = backend.capabilities().await.unwrap();

    if !capabilities.incremental {
        // This kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY): CRIU's pre-dump
        // aborts there. The backend must refuse cleanly, before touching the workload.
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!(
                "\n************************************************************\n\
             NOTE incremental_checkpoints_follow_the_kernel: this kernel has no memory dirty\n\
             tracking ({:?}); checking that incremental requests are refused.\n\
             The pre-dump/parent restore path did NOT run on this machine.\n\
             ************************************************************\n",
                capabilities.notes
            ),
        );
        let pre = checkpoint_into_store(
            &backend,
            &store,
            &subject,
            &workload,
            DumpKind::PreDump,
            None,
            TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                pre,
                automigrate_checkpoint::backend::TakeError::Backend(
                    ProcessError::IncrementalUnavailable
                )
            ),
            "{pre}"
        );
        let full = checkpoint_into_store(
            &backend,
            &store,
            &subject,
            &workload,
            DumpKind::Periodic,
            None,
            TIMEOUT,
        )
        .await
        .unwrap();
        let on_parent = checkpoint_into_store(
            &backend,
            &store,
            &subject,
            &workload,
            DumpKind::Periodic,
            Some(&full.manifest.id),
            TIMEOUT,
        )
        .await
        .unwrap_err();
        assert!(
            on_parent.to_string().contains("CONFIG_MEM_SOFT_DIRTY"),
            "{on_parent}"
        );
        // Nothing half-written was left in the store.
        assert_eq!(store.list(&subject.pod).unwrap().len(), 1);
        return;
    }

    // A kernel with dirty tracking: pre-dump, then a final dump on top of it, then restore.
    let pre = checkpoint_into_store(
        &backend,
        &store,
        &subject,
        &workload,
        DumpKind::PreDump,
        None,
        TIMEOUT,
    )
    .await
    .unwrap();
    let last = checkpoint_into_store(
        &backend,
        &store,
        &subject,
        &workload,
        DumpKind::Final,
        Some(&pre.manifest.id),
        TIMEOUT,
    )
    .await
    .unwrap();
    child.wait().await.unwrap();
    let last_before = highest(&log);
    assert_eq!(
        last.manifest.parent.as_deref(),
        Some(pre.manifest.id.as_str())
    );
    let verified = store.verified(&subject.pod, &last.manifest.id).unwrap();
    assert_eq!(verified.ancestors().len(), 1);
    wipe(&log);
    let restored = backend
        .restore(
            &verified,
            &ProcessRestoreTarget {
                work_dir: dir.path().join("restore-work"),
                timeout: TIMEOUT,
            },
        )
        .await
        .unwrap();
    cleanup.pids.push(restored);
    assert_continues(&log, tag, last_before + 1..=last_before + 1);
}

struct Container {
    backend: RuncBackend<SystemRunner>,
    bundle: Bundle,
    id: String,
    log: std::path::PathBuf,
    dir: tempfile::TempDir,
    cleanup: Cleanup,
}

async fn start_counter_container(prefix: &str) -> Container {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let (_, log) = prepare_counter(&work);
    let runc_root = dir.path().join("runc-root");
    let bundle = Bundle::create(
        &dir.path().join("bundle"),
        &BundleSpec::new(["/usr/bin/python3", "/work/counter.py", "/work/count.log"])
            .writable(&work, "/work")
            .cwd("/work"),
    )
    .unwrap();
    let backend = RuncBackend::new(SystemRunner, "runc", "criu").with_root(&runc_root);
    let id = unique(prefix);
    let cleanup = Cleanup {
        pids: Vec::new(),
        runc_root: Some(runc_root),
        containers: vec![id.clone()],
    };
    backend
        .run_detached(&id, bundle.dir(), &dir.path().join("runc-run.log"))
        .await
        .unwrap();
    wait_for("the container's counter to start", || highest(&log) >= 20);
    Container {
        backend,
        bundle,
        id,
        log,
        dir,
        cleanup,
    }
}

#[tokio::test]
async fn runc_container_final_checkpoint_restores_and_continues() {
    if !privileged("runc_container_final_checkpoint_restores_and_continues") {
        return;
    }
    let container = start_counter_container("am-final").await;
    let log = &container.log;
    let tag = single_tag(log);
    let store = CheckpointStore::open(&container.dir.path().join("store")).unwrap();
    let subject = subject(&container.id);
    let stored = checkpoint_into_store(
        &container.backend,
        &store,
        &subject,
        &RuncContainer {
            id: container.id.clone(),
        },
        DumpKind::Final,
        None,
        TIMEOUT,
    )
    .await
    .unwrap();
    // Stop-and-dump: runc removed the container (runc's "does not exist" is its own error).
    let gone = container.backend.state(&container.id).await.unwrap_err();
    assert!(matches!(gone, RuncError::NoContainer { .. }), "{gone:?}");
    let last_before = highest(log);
    let manifest = &stored.manifest;
    assert_eq!(
        manifest.runtime.as_deref().map(|r| r.starts_with("runc ")),
        Some(true)
    );
    assert_eq!(manifest.freeze.unwrap().source, FreezeSource::CriuStats);
    for expected in [
        "spec.dump",
        "config.dump",
        "stats-dump",
        "checkpoint/inventory.img",
        "checkpoint/descriptors.json",
    ] {
        assert!(
            manifest.files.iter().any(|file| file.path() == expected),
            "{expected}"
        );
    }

    wipe(log);
    let verified = store.verified(&subject.pod, &manifest.id).unwrap();
    let restored = container
        .backend
        .restore(
            &verified,
            &RuncRestoreTarget {
                container_id: container.id.clone(),
                bundle: container.bundle.dir().to_path_buf(),
                work_dir: container.dir.path().join("restore-work"),
                timeout: TIMEOUT,
            },
        )
        .await
        .unwrap();
    let state = container.backend.state(&restored.id).await.unwrap();
    assert_eq!(state.status, "running");
    assert_eq!(state.pid, restored.pid);
    assert_continues(log, tag, last_before + 1..=last_before + 1);
    archive::verify(&stored.dir).unwrap();
    drop(container.cleanup);
}

#[tokio::test]
async fn runc_periodic_checkpoint_leaves_it_running_and_restores_after_a_crash() {
    if !privileged("runc_periodic_checkpoint_leaves_it_running_and_restores_after_a_crash") {
        return;
    }
    let container = start_counter_container("am-periodic").await;
    let log = &container.log;
    let tag = single_tag(log);
    let store = CheckpointStore::open(&container.dir.path().join("store")).unwrap();
    let subject = subject(&container.id);
    let before = highest(log);
    let stored = checkpoint_into_store(
        &container.backend,
        &store,
        &subject,
        &RuncContainer {
            id: container.id.clone(),
        },
        DumpKind::Periodic,
        None,
        TIMEOUT,
    )
    .await
    .unwrap();
    let after = highest(log);
    assert_eq!(stored.manifest.kind, DumpKind::Periodic);
    // --leave-running: the same container goes on counting.
    wait_for("the container to go on counting", || {
        highest(log) > after + 20
    });
    assert_eq!(
        container.backend.state(&container.id).await.unwrap().status,
        "running"
    );
    // The node "fails": the container dies, the output is lost.
    container.backend.delete(&container.id).await.unwrap();
    wipe(log);

    let verified = store.verified(&subject.pod, &stored.manifest.id).unwrap();
    container
        .backend
        .restore(
            &verified,
            &RuncRestoreTarget {
                container_id: container.id.clone(),
                bundle: container.bundle.dir().to_path_buf(),
                work_dir: container.dir.path().join("restore-work"),
                timeout: TIMEOUT,
            },
        )
        .await
        .unwrap();
    // It resumes from the checkpoint: after what it had written before, and no later than
    // what it had written when the checkpoint returned.
    assert_continues(log, tag, before + 1..=after + 1);
    drop(container.cleanup);
}
