//! The kubelet checkpoint API, reached the way the agent reaches it (the API server's node
//! proxy), writes an archive the agent's kubelet backend accepts (root, runc and CRIU needed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use automigrate_checkpoint::kubelet::{KubeletBackend, KubeletError, PodContainer};
use automigrate_checkpoint::{CheckpointBackend, CheckpointRequest, DumpKind};
use common::{
    KubeTransport, NODE, RuncGuard, cluster, eventually, forward, skip_privileged, start,
};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

const NS: &str = "ml";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_through_the_node_proxy_is_an_archive_the_agent_accepts() {
    if skip_privileged("a_checkpoint_through_the_node_proxy_is_an_archive_the_agent_accepts") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let guard = RuncGuard::new(root.path().join("runc"));
    let cluster = cluster();
    let kubelet = start(&cluster, root.path()).await;
    let addr = kubelet.api_addr().unwrap();
    cluster.set_node_proxy_handler(NODE, move |request| forward(addr, request));
    // The Node advertises the port the API listens on.
    let node: k8s_openapi::api::core::v1::Node = cluster.get(None, NODE).unwrap();
    let port = node
        .status
        .unwrap()
        .daemon_endpoints
        .unwrap()
        .kubelet_endpoint
        .unwrap()
        .port;
    assert_eq!(port, i32::from(addr.port()));

    let pods: Api<Pod> = Api::namespaced(cluster.client(), NS);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("counter".into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "main".into(),
                image: Some("local/host".into()),
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "i=0; while :; do i=$((i+1)); sleep 0.1; done".into(),
                ]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    };
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually("the container running", || {
        cluster
            .get::<Pod>(Some(NS), "counter")
            .and_then(|p| {
                p.status?
                    .container_statuses?
                    .first()?
                    .state
                    .clone()?
                    .running
            })
            .is_some()
    })
    .await;

    let local_dir = root.path().join("checkpoints");
    let backend = KubeletBackend::new(KubeTransport(cluster.client()), NODE, &local_dir);
    let staging = tempfile::tempdir().unwrap();
    let outcome = backend
        .checkpoint(
            &PodContainer {
                namespace: NS.into(),
                pod: "counter".into(),
                container: "main".into(),
            },
            &CheckpointRequest::new(DumpKind::Periodic, Duration::from_secs(120)),
            staging.path(),
        )
        .await
        .unwrap_or_else(|error| panic!("the agent's kubelet backend refused it: {error}"));
    // CRIU's statistics were found and read (the freeze time comes from them).
    assert!(outcome.dump_stats.is_some(), "{outcome:?}");
    assert_eq!(outcome.runtime.as_deref(), Some("runc"));
    let images: Vec<String> = std::fs::read_dir(staging.path().join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(images.iter().any(|n| n.starts_with("pages-")), "{images:?}");
    assert!(staging.path().join("spec.dump").exists());
    assert!(staging.path().join("config.dump").exists());
    // The agent removed the kubelet's archive after importing it, as on a real node.
    assert_eq!(std::fs::read_dir(&local_dir).unwrap().count(), 0);
    // The container was left running.
    assert_eq!(guard.containers().len(), 1);
    assert_eq!(guard.containers()[0].1, "running");

    // A container this node does not run: a 404 that is not the kubelet's "page not found".
    let missing = backend
        .checkpoint(
            &PodContainer {
                namespace: NS.into(),
                pod: "absent".into(),
                container: "main".into(),
            },
            &CheckpointRequest::new(DumpKind::Periodic, Duration::from_secs(10)),
            tempfile::tempdir().unwrap().path(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(missing, KubeletError::NotFound { .. }),
        "{missing}"
    );
    kubelet.shutdown().await.unwrap();
}
