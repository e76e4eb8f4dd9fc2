//! The kubelet checkpoint API, reached the way the agent reaches it (the API server's node
//! proxy), writes an archive the agent's kubelet backend accepts (root, runc and CRIU needed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use automigrate_checkpoint::kubelet::{KubeletBackend, KubeletError};
use automigrate_checkpoint::{CheckpointBackend, CheckpointRequest, DumpKind};
use common::{
    KubeTransport, NODE, TestNode, create_pod, eventually, main_container, shell_pod,
    skip_privileged,
};

const NS: &str = "ml";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_through_the_node_proxy_is_an_archive_the_agent_accepts() {
    if skip_privileged("a_checkpoint_through_the_node_proxy_is_an_archive_the_agent_accepts") {
        return;
    }
    let (node, kubelet) = TestNode::start().await;
    let addr = node.serve_node_proxy(&kubelet);
    // The Node advertises the port the API listens on.
    let node_object: k8s_openapi::api::core::v1::Node = node.cluster.get(None, NODE).unwrap();
    let port = node_object
        .status
        .unwrap()
        .daemon_endpoints
        .unwrap()
        .kubelet_endpoint
        .unwrap()
        .port;
    assert_eq!(port, i32::from(addr.port()));

    let pod = shell_pod(
        NS,
        "counter",
        "local/host",
        "i=0; while :; do i=$((i+1)); sleep 0.1; done",
    );
    create_pod(&node.pods(NS), &pod).await;
    eventually("the container running", || {
        node.first_container_running(NS, "counter")
    })
    .await;

    let local_dir = node.root.path().join("checkpoints");
    let backend = KubeletBackend::new(KubeTransport(node.cluster.client()), NODE, &local_dir);
    let staging = tempfile::tempdir().unwrap();
    let outcome = backend
        .checkpoint(
            &main_container(NS, "counter"),
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
    assert_eq!(node.guard.containers().len(), 1);
    assert_eq!(node.guard.containers()[0].1, "running");

    // A container this node does not run: a 404 that is not the kubelet's "page not found".
    let missing = backend
        .checkpoint(
            &main_container(NS, "absent"),
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
