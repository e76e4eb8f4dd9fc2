//! The kubelet backend against recorded API server exchanges (tests/fixtures). No cluster is
//! reachable from the development machines, so this is as far as it runs here.

// Test code, helpers included: a failed step fails the test (clippy.toml allows this in #[test]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use automigrate_checkpoint::backend::TakeError;
use automigrate_checkpoint::kubelet::{
    KubeletBackend, KubeletError, PodContainer, RecordedExchange, RecordedTransport,
};
use automigrate_checkpoint::{
    BackendKind, CheckpointBackend, CheckpointStore, DumpKind, FreezeSource, Subject, archive,
    checkpoint_into_store,
};
use automigrate_core::model::PodRef;

#[derive(serde::Deserialize)]
struct Fixtures {
    #[allow(dead_code)]
    about: String,
    exchanges: Vec<RecordedExchange>,
}

fn exchange(name: &str) -> RecordedExchange {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubelet-exchanges.json"),
    )
    .unwrap();
    let fixtures: Fixtures = serde_json::from_str(&text).unwrap();
    fixtures
        .exchanges
        .into_iter()
        .find(|exchange| exchange.name == name)
        .unwrap_or_else(|| panic!("no fixture {name}"))
}

const ARCHIVE_NAME: &str = "checkpoint-lstm-trainer_research-trainer-2026-11-22T10:15:04Z.tar";

/// `stats-dump` as CRIU 4.1.1 wrote it on this project's dev machine.
const STATS_DUMP: [u8; 49] = [
    0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x25, 0x00, 0x00, 0x00, 0x0a, 0x23, 0x08, 0xdf,
    0x16, 0x10, 0x9a, 0x87, 0x08, 0x18, 0xdb, 0x18, 0x20, 0xa1, 0x0e, 0x28, 0xfe, 0x05, 0x30, 0x00,
    0x38, 0xb9, 0x05, 0x40, 0x00, 0x48, 0x00, 0x50, 0x08, 0x58, 0x08, 0x60, 0x00, 0x68, 0x00, 0x70,
    0x00,
];

/// Writes an archive laid out as CRI-O writes one for the kubelet.
fn write_kubelet_archive(path: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    };
    add("checkpoint/inventory.img", b"inventory-bytes");
    add("checkpoint/pages-1.img", &vec![0xabu8; 8192]);
    add(
        "checkpoint/dump.log",
        b"(00.000001) Dumping finished successfully\n",
    );
    add("stats-dump", &STATS_DUMP);
    add(
        "config.dump",
        br#"{"id":"5d1b0f7c2a","name":"k8s_trainer_lstm-trainer_research_0","rootfsImageName":"registry.example/trainer:1","runtime":"runc","createdTime":"2026-11-22T09:00:00Z"}"#,
    );
    add("spec.dump", br#"{"ociVersion":"1.1.0"}"#);
    add("rootfs-diff.tar", &[0u8; 1024]);
    builder.into_inner().unwrap();
}

fn target() -> PodContainer {
    PodContainer {
        namespace: "research".into(),
        pod: "lstm-trainer".into(),
        container: "trainer".into(),
    }
}

fn subject() -> Subject {
    Subject {
        pod: PodRef::new("research", "lstm-trainer"),
        container: "trainer".into(),
    }
}

async fn take(
    backend: &KubeletBackend<RecordedTransport>,
    store: &CheckpointStore,
) -> Result<automigrate_checkpoint::SealedCheckpoint, TakeError<KubeletError>> {
    checkpoint_into_store(
        backend,
        store,
        &subject(),
        &target(),
        DumpKind::Periodic,
        None,
        Duration::from_secs(120),
    )
    .await
}

#[tokio::test]
async fn a_successful_checkpoint_is_imported_sealed_and_the_kubelet_copy_removed() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet_dir = dir.path().join("kubelet-checkpoints");
    std::fs::create_dir(&kubelet_dir).unwrap();
    write_kubelet_archive(&kubelet_dir.join(ARCHIVE_NAME));
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let recorded = exchange("success");
    let backend = KubeletBackend::new(
        RecordedTransport::new([recorded.clone()]),
        "edge-2",
        &kubelet_dir,
    );

    let stored = take(&backend, &store).await.unwrap();

    assert_eq!(backend.transport().requested(), [recorded.path]);
    let manifest = &stored.manifest;
    assert_eq!(manifest.backend, BackendKind::Kubelet);
    assert_eq!(manifest.runtime.as_deref(), Some("runc"));
    let freeze = manifest.freeze.unwrap();
    assert_eq!(freeze.source, FreezeSource::CriuStats);
    assert_eq!(freeze.micros, 131_994);
    let paths: Vec<&str> = manifest.files.iter().map(|file| file.path()).collect();
    assert_eq!(
        paths,
        [
            "checkpoint/dump.log",
            "checkpoint/inventory.img",
            "checkpoint/pages-1.img",
            "config.dump",
            "rootfs-diff.tar",
            "spec.dump",
            "stats-dump"
        ]
    );
    archive::verify(&stored.dir).unwrap();
    assert!(!kubelet_dir.join(ARCHIVE_NAME).exists());
    let info = manifest.to_checkpoint_info(vec!["edge-2".into()]);
    assert_eq!(info.id, "lstm-trainer-000001");
    assert_eq!(info.freeze, Some(Duration::from_micros(131_994)));
}

async fn failure(name: &str) -> KubeletError {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let backend = KubeletBackend::new(
        RecordedTransport::new([exchange(name)]),
        "edge-2",
        dir.path().join("kubelet-checkpoints"),
    );
    let error = take(&backend, &store).await.unwrap_err();
    // A failed checkpoint leaves nothing in the store, not even a staging directory.
    assert!(store.list(&subject().pod).unwrap().is_empty());
    let pod_dir = store.pod_dir(&subject().pod).unwrap();
    assert_eq!(std::fs::read_dir(pod_dir).unwrap().count(), 0);
    match error {
        TakeError::Backend(error) => error,
        other => panic!("expected a backend error, got {other}"),
    }
}

#[tokio::test]
async fn feature_gate_off_is_reported_as_such() {
    let error = failure("feature-gate-off").await;
    assert!(
        matches!(&error, KubeletError::FeatureDisabled { node } if node == "edge-2"),
        "{error}"
    );
    assert!(error.to_string().contains("ContainerCheckpoint"));
}

#[tokio::test]
async fn missing_pod_is_not_found() {
    let error = failure("pod-missing").await;
    assert!(
        matches!(&error, KubeletError::NotFound { message, .. } if message == "pod does not exist"),
        "{error}"
    );
}

#[tokio::test]
async fn criu_failure_carries_the_runtime_message() {
    let error = failure("criu-failure").await;
    assert!(
        matches!(&error, KubeletError::CheckpointFailed { message } if message.contains("criu failed")),
        "{error}"
    );
}

#[tokio::test]
async fn timeouts_are_recognised_wherever_they_happen() {
    assert!(matches!(
        failure("runtime-deadline").await,
        KubeletError::TimedOut { status: 500, .. }
    ));
    assert!(matches!(
        failure("apiserver-timeout").await,
        KubeletError::TimedOut { status: 504, .. }
    ));
    assert!(matches!(
        failure("client-timeout").await,
        KubeletError::TransportTimeout { after } if after == Duration::from_secs(130)
    ));
}

#[tokio::test]
async fn missing_rbac_is_forbidden() {
    let error = failure("forbidden").await;
    assert!(
        matches!(error, KubeletError::Forbidden { status: 403, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("nodes/proxy"));
}

#[tokio::test]
async fn an_archive_path_outside_the_kubelet_directory_is_refused() {
    let mut recorded = exchange("success");
    recorded.body = r#"{"items":["/etc/shadow"]}"#.to_string();
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let backend = KubeletBackend::new(RecordedTransport::new([recorded]), "edge-2", dir.path());
    let error = take(&backend, &store).await.unwrap_err();
    assert!(
        matches!(
            error,
            TakeError::Backend(KubeletError::UnexpectedArchivePath { .. })
        ),
        "{error}"
    );
}

#[tokio::test]
async fn incremental_requests_and_restore_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(&dir.path().join("store")).unwrap();
    let backend = KubeletBackend::new(RecordedTransport::new([]), "edge-2", dir.path());
    let error = checkpoint_into_store(
        &backend,
        &store,
        &subject(),
        &target(),
        DumpKind::PreDump,
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, TakeError::Backend(KubeletError::Unsupported { .. })),
        "{error}"
    );
    assert!(backend.transport().requested().is_empty());
    assert!(!backend.capabilities().await.unwrap().restore);
}

#[test]
fn request_paths_reject_names_that_are_not_kubernetes_names() {
    let backend = KubeletBackend::new(RecordedTransport::new([]), "edge-2", "/x");
    let mut bad = target();
    bad.pod = "../../secrets".into();
    assert!(backend.request_path(&bad, Duration::from_secs(1)).is_err());
    assert_eq!(
        backend
            .request_path(&target(), Duration::from_millis(10))
            .unwrap(),
        "/api/v1/nodes/edge-2/proxy/checkpoint/research/lstm-trainer/trainer?timeout=1"
    );
}
