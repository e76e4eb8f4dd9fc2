//! Application mode with real programs: a Python trainer that saves its state on SIGUSR1, and
//! an HTTP hook served on loopback.

// Test code, helpers included: a failed step fails the test (clippy.toml allows this in #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use automigrate_checkpoint::application::{
    AppRestoreTarget, AppWorkload, ApplicationBackend, ApplicationError, DEFAULT_MARKER, Trigger,
};
use automigrate_checkpoint::backend::TakeError;
use automigrate_checkpoint::{
    BackendKind, CheckpointBackend, CheckpointStore, DumpKind, FreezeSource, Subject,
    checkpoint_into_store,
};
use automigrate_core::annotations::CheckpointMode;
use automigrate_core::model::PodRef;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Trains "epochs" (a counter) and, on SIGUSR1, saves its state the way a framework would:
/// data files first, then the marker via rename, holding the epoch.
const TRAINER_PY: &str = r#"
import json, os, signal, sys, time
save = sys.argv[1]
state = {"epoch": 0, "weights": [0.0] * 64}
requested = False
def on_signal(signum, frame):
    global requested
    requested = True
signal.signal(signal.SIGUSR1, on_signal)
open(os.path.join(save, "ready"), "w").close()
while True:
    state["epoch"] += 1
    state["weights"] = [w + 0.5 for w in state["weights"]]
    if requested:
        requested = False
        os.makedirs(os.path.join(save, "shards"), exist_ok=True)
        with open(os.path.join(save, "model.json"), "w") as f:
            json.dump(state, f)
        with open(os.path.join(save, "shards", "optimizer.bin"), "wb") as f:
            f.write(bytes(range(256)) * 16)
        with open(os.path.join(save, "marker.tmp"), "w") as f:
            json.dump({"epoch": state["epoch"]}, f)
        os.rename(os.path.join(save, "marker.tmp"), os.path.join(save, "automigrate-checkpoint-done"))
    time.sleep(0.01)
"#;

fn subject() -> Subject {
    Subject {
        pod: PodRef::new("ml", "app-trainer"),
        container: "trainer".into(),
    }
}

fn wait_for_file(path: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn a_signalled_program_saves_and_the_files_restore() {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");
    std::fs::create_dir(&save).unwrap();
    let script = dir.path().join("trainer.py");
    std::fs::write(&script, TRAINER_PY).unwrap();
    let mut child = tokio::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(&save)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_file(&save.join("ready"));
    // A stale marker from an earlier round must not be taken for this one.
    std::fs::write(save.join(DEFAULT_MARKER), r#"{"epoch": 1}"#).unwrap();

    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let backend = ApplicationBackend::default();
    let workload = AppWorkload {
        pid: child.id().unwrap() as i32,
        save_dir: save.clone(),
        trigger: Trigger::Signal(Signal::SIGUSR1),
    };
    let stored = checkpoint_into_store(
        &backend,
        &store,
        &subject(),
        &workload,
        DumpKind::Periodic,
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    child.kill().await.unwrap();

    let manifest = &stored.manifest;
    assert_eq!(manifest.backend, BackendKind::Application);
    assert_eq!(manifest.mode, CheckpointMode::Application);
    assert_eq!(manifest.freeze.unwrap().source, FreezeSource::Application);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stored.dir.join("app/model.json")).unwrap())
            .unwrap();
    let epoch = saved["epoch"].as_u64().unwrap();
    assert!(epoch > 1);
    assert_eq!(
        manifest.epoch,
        Some(epoch),
        "the epoch comes from this round's marker"
    );
    let paths: Vec<&str> = manifest.files.iter().map(|file| file.path()).collect();
    assert_eq!(
        paths,
        ["app/model.json", "app/ready", "app/shards/optimizer.bin"]
    );
    assert!(
        !save.join(DEFAULT_MARKER).exists(),
        "the marker is consumed"
    );

    let verified = store.verified(&subject().pod, &manifest.id).unwrap();
    let load = dir.path().join("load");
    backend
        .restore(
            &verified,
            &AppRestoreTarget {
                load_dir: load.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(load.join("model.json")).unwrap(),
        std::fs::read(stored.dir.join("app/model.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(load.join("shards/optimizer.bin")).unwrap(),
        std::fs::read(save.join("shards/optimizer.bin")).unwrap()
    );
}

#[tokio::test]
async fn a_program_that_never_answers_times_out_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new("sleep")
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    // `sleep` ignores nothing but SIGCONT is harmless: the program is never told to save.
    let workload = AppWorkload {
        pid: child.id().unwrap() as i32,
        save_dir: dir.path().to_path_buf(),
        trigger: Trigger::Signal(Signal::SIGCONT),
    };
    let error = checkpoint_into_store(
        &ApplicationBackend::default(),
        &store,
        &subject(),
        &workload,
        DumpKind::Periodic,
        None,
        Duration::from_millis(300),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, TakeError::Backend(ApplicationError::TimedOut { .. })),
        "{error}"
    );
    assert!(store.list(&subject().pod).unwrap().is_empty());
    child.kill().await.unwrap();
}

#[tokio::test]
async fn an_http_hook_triggers_the_save() {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");
    std::fs::create_dir(&save).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let save_in_server = save.clone();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut request = vec![0u8; 1024];
        let read = stream.read(&mut request).await.unwrap();
        let request = String::from_utf8_lossy(&request[..read]).to_string();
        std::fs::write(save_in_server.join("weights.bin"), [1u8, 2, 3]).unwrap();
        std::fs::write(save_in_server.join(DEFAULT_MARKER), r#"{"epoch": 7}"#).unwrap();
        stream
            .write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        request
    });
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let workload = AppWorkload {
        pid: std::process::id() as i32,
        save_dir: save,
        trigger: Trigger::HttpPost {
            address,
            path: "/automigrate/checkpoint".into(),
        },
    };
    let stored = checkpoint_into_store(
        &ApplicationBackend::default(),
        &store,
        &subject(),
        &workload,
        DumpKind::Final,
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let request = server.await.unwrap();
    assert!(
        request.starts_with("POST /automigrate/checkpoint HTTP/1.1\r\n"),
        "{request}"
    );
    assert_eq!(stored.manifest.epoch, Some(7));
    assert_eq!(
        std::fs::read(stored.dir.join("app/weights.bin")).unwrap(),
        [1, 2, 3]
    );
}

#[tokio::test]
async fn a_refusing_hook_is_an_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = [0u8; 1024];
        let _ = stream.read(&mut buffer).await.unwrap();
        stream
            .write_all(b"HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let workload = AppWorkload {
        pid: std::process::id() as i32,
        save_dir: dir.path().to_path_buf(),
        trigger: Trigger::HttpPost {
            address,
            path: "/save".into(),
        },
    };
    let error = checkpoint_into_store(
        &ApplicationBackend::default(),
        &store,
        &subject(),
        &workload,
        DumpKind::Periodic,
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("409"), "{error}");
}
