//! A pod whose image is a checkpoint image (the OCI image the agent builds, imported into the
//! node's image store the way the agent's import command does it) is restored, not started
//! fresh (root, runc and CRIU needed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use automigrate_checkpoint::kubelet::{KubeletBackend, PodContainer};
use automigrate_checkpoint::store::CheckpointStore;
use automigrate_checkpoint::{DumpKind, PodKey, Subject, checkpoint_into_store};
use automigrate_kubelet::images::{self, Resolved};
use common::{
    KubeTransport, NODE, RuncGuard, cluster, eventually, forward, skip_privileged, start,
};
use k8s_openapi::api::core::v1::{
    Container, HostPathVolumeSource, Pod, PodSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};

const NS: &str = "ml";
/// Notes each start in `starts`, then counts in `count`: a fresh start adds a line to
/// `starts`, a restore goes on counting from where the checkpoint was taken.
const SCRIPT: &str = "echo start >> /work/starts; i=0; while :; do i=$((i+1)); echo $i > /work/count; sleep 0.05; done";

fn pod(name: &str, image: &str, work: &Path) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "main".into(),
                image: Some(image.into()),
                command: Some(vec!["/bin/sh".into(), "-c".into(), SCRIPT.into()]),
                volume_mounts: Some(vec![VolumeMount {
                    name: "work".into(),
                    mount_path: "/work".into(),
                    ..VolumeMount::default()
                }]),
                ..Container::default()
            }],
            volumes: Some(vec![Volume {
                name: "work".into(),
                host_path: Some(HostPathVolumeSource {
                    path: work.display().to_string(),
                    type_: None,
                }),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

fn count(work: &Path) -> u64 {
    std::fs::read_to_string(work.join("count"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

fn running(cluster: &automigrate_kube_fake::FakeCluster, name: &str) -> bool {
    cluster
        .get::<Pod>(Some(NS), name)
        .and_then(|p| {
            p.status?
                .container_statuses?
                .first()?
                .state
                .clone()?
                .running
        })
        .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_from_a_checkpoint_image_is_restored_not_started_fresh() {
    if skip_privileged("a_pod_from_a_checkpoint_image_is_restored_not_started_fresh") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let guard = RuncGuard::new(root.path().join("runc"));
    let cluster = cluster();
    let kubelet = start(&cluster, root.path()).await;
    let addr = kubelet.api_addr().unwrap();
    cluster.set_node_proxy_handler(NODE, move |request| forward(addr, request));
    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    pods.create(
        &PostParams::default(),
        &pod("counter", "docker.io/library/debian:12", work.path()),
    )
    .await
    .unwrap();
    eventually("the counter past 5", || count(work.path()) >= 5).await;

    // The agent's path: kubelet checkpoint through the node proxy, sealed into its store, made
    // into a checkpoint OCI image, imported into the node's image store.
    let backend = KubeletBackend::new(
        KubeTransport(cluster.client()),
        NODE,
        root.path().join("checkpoints"),
    );
    let store_dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(store_dir.path()).unwrap();
    let subject = Subject {
        pod: PodKey::new(NS, "counter"),
        container: "main".into(),
    };
    let stored = checkpoint_into_store(
        &backend,
        &store,
        &subject,
        &PodContainer {
            namespace: NS.into(),
            pod: "counter".into(),
            container: "main".into(),
        },
        DumpKind::Periodic,
        None,
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    let at_checkpoint = count(work.path());
    let verified = store.verified(&subject.pod, &stored.manifest.id).unwrap();
    let layout_root = tempfile::tempdir().unwrap();
    let layout = automigrate_agent::image::write_layout(&verified, layout_root.path()).unwrap();
    let reference = format!("localhost/automigrate/ml-counter:{}", stored.manifest.id);
    images::import(
        &root.path().join("images"),
        &layout.oci_reference(),
        &reference,
    )
    .unwrap();
    assert!(matches!(
        images::resolve(&root.path().join("images"), &reference).unwrap(),
        Resolved::Checkpoint { ref container, .. } if container == "main"
    ));

    // The source goes away first: never two copies.
    pods.delete(
        "counter",
        &DeleteParams {
            grace_period_seconds: Some(1),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    eventually("the source pod removed", || {
        cluster.get::<Pod>(Some(NS), "counter").is_none()
    })
    .await;
    assert!(guard.containers().is_empty());
    let before_restore = count(work.path());
    assert!(before_restore >= at_checkpoint);

    pods.create(
        &PostParams::default(),
        &pod("counter-restored", &reference, work.path()),
    )
    .await
    .unwrap();
    eventually("the restored pod running", || {
        running(&cluster, "counter-restored")
    })
    .await;
    // It counts on (from the checkpoint's value, which the file passed already) ...
    std::fs::write(work.path().join("count"), "0").unwrap();
    eventually("the restored process counting", || {
        count(work.path()) > at_checkpoint
    })
    .await;
    // ... and never started again from the top.
    let starts = std::fs::read_to_string(work.path().join("starts")).unwrap();
    assert_eq!(starts.lines().count(), 1, "{starts}");
    assert_eq!(guard.containers().len(), 1);
    kubelet.shutdown().await.unwrap();
}
