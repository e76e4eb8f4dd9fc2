//! Two agents on loopback with the real CRIU process backend: agent A checkpoints a running
//! Python counter (final: stop and dump), sends the checkpoint to agent B over the mutual-TLS
//! transfer engine, and B lists it verified. The copy B holds is then restored with CRIU and
//! the counter continues from where it was (same run tag, next value), proving the bytes that
//! crossed are the workload. Needs root and CRIU >= 4; skips only with
//! AUTOMIGRATE_SKIP_PRIVILEGED=1, loudly.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use automigrate_agent::api::{
    CheckpointKind, CheckpointRequest, Payload, TransferRequest, TransferState,
};
use automigrate_agent::checkpointer::{self, PID_FILE, WorkloadsDir};
use automigrate_checkpoint::CheckpointBackend as _;
use automigrate_checkpoint::command::SystemRunner;
use automigrate_checkpoint::process::{ProcessBackend, ProcessRestoreTarget};
use automigrate_core::model::PodRef;
use common::{
    COUNTER_PY, KillOnDrop, Pki, SLOT, SLOTS, Setup, finished_transfer, privileged, records,
    start_agent, wait_until,
};

#[tokio::test]
async fn a_real_process_checkpoint_moves_between_two_agents_and_restores_from_the_copy() {
    if !privileged("a_real_process_checkpoint_moves_between_two_agents_and_restores_from_the_copy")
    {
        return;
    }
    let mut kill = KillOnDrop::default();
    let work = tempfile::tempdir().unwrap();
    let script = work.path().join("counter.py");
    let log = work.path().join("count.log");
    std::fs::write(&script, COUNTER_PY).unwrap();
    std::fs::write(&log, vec![0u8; SLOT * SLOTS]).unwrap();

    // The workload: in its own session, stdio on /dev/null, so CRIU can dump it whole.
    let mut child = tokio::process::Command::new("setsid")
        .arg("/usr/bin/python3")
        .arg(&script)
        .arg(&log)
        .current_dir(work.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap() as i32;
    kill.0.push(pid);
    // Registered where agent A's process backend looks for it.
    let workloads = work.path().join("workloads");
    let registration = workloads.join("ml/trainer/main");
    std::fs::create_dir_all(&registration).unwrap();
    std::fs::write(registration.join(PID_FILE), pid.to_string()).unwrap();
    wait_until("the counter to count", || {
        let log = log.clone();
        async move { records(&log).len() >= 20 }
    })
    .await;
    let tag = records(&log)[0].1;

    let pki = Pki::new();
    let a = start_agent(
        &pki,
        "node-a",
        Setup {
            checkpointer: Some(checkpointer::process(
                ProcessBackend::new(SystemRunner, "criu"),
                WorkloadsDir(workloads.clone()),
            )),
            ..Setup::default()
        },
    )
    .await;
    let b = start_agent(&pki, "node-b", Setup::default()).await;

    let taken = a
        .client
        .checkpoint(&CheckpointRequest {
            pod: PodRef::new("ml", "trainer"),
            container: "main".into(),
            kind: CheckpointKind::Final,
        })
        .await
        .unwrap();
    // CRIU stopped the dumped process; reap it so its pid is free for the restore.
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    let last_before = records(&log).last().unwrap().0;
    assert!(taken.verified);
    assert!(taken.freeze > Duration::ZERO, "CRIU reports the freeze");
    assert!(taken.bytes > 0);

    let started = a
        .client
        .start_transfer(&TransferRequest {
            payload: Payload::Checkpoint {
                id: taken.id.clone(),
            },
            to: b.peer(),
        })
        .await
        .unwrap();
    let done = finished_transfer(&a.client, &started.id).await;
    assert_eq!(done.state, TransferState::Succeeded, "{:?}", done.error);

    let at_b = b
        .client
        .checkpoints(&PodRef::new("ml", "trainer"))
        .await
        .unwrap();
    assert_eq!(at_b.len(), 1, "{at_b:?}");
    assert_eq!(at_b[0].id, taken.id);
    assert!(at_b[0].verified);
    assert_eq!(at_b[0].bytes, taken.bytes);
    assert_eq!(at_b[0].freeze, taken.freeze);

    // Restore from B's copy (A's is not touched): the counter goes on.
    std::fs::write(&log, vec![0u8; SLOT * SLOTS]).unwrap();
    let verified = b
        .agent()
        .store()
        .verified(
            &automigrate_core::model::PodRef::new("ml", "trainer"),
            &taken.id,
        )
        .unwrap();
    assert!(verified.dir().starts_with(b.store_root()));
    let restored = ProcessBackend::new(SystemRunner, "criu")
        .restore(
            &verified,
            &ProcessRestoreTarget {
                work_dir: work.path().join("restore-work"),
                timeout: Duration::from_secs(120),
            },
        )
        .await
        .unwrap();
    kill.0.push(restored);
    wait_until("the restored counter to write 5 records", || {
        let log = log.clone();
        async move { records(&log).len() >= 5 }
    })
    .await;
    let written = records(&log);
    assert_eq!(
        written[0].0,
        last_before + 1,
        "the restored counter continues with the next record (1 would be a restart)"
    );
    assert!(
        written.iter().all(|record| record.1 == tag),
        "same run tag: {written:?}"
    );
}
