//! A container whose image is a `localhost/...` image missing from the node's image store (a
//! checkpoint image that was never imported here) is not started: the pod waits with
//! `ErrImagePull`, then `ImagePullBackOff`, as on a real node where nothing can pull it
//! (root and runc needed: without the check the kubelet would start it fresh with runc).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{TestNode, create_pod, eventually, shell_pod, skip_privileged, with_work_dir};
use k8s_openapi::api::core::v1::Pod;

const NS: &str = "ml";

/// The waiting reason of the pod's first container, in the status the kubelet wrote.
fn waiting_reason(node: &TestNode, name: &str) -> Option<String> {
    node.cluster
        .get::<Pod>(Some(NS), name)?
        .status?
        .container_statuses?
        .first()?
        .state
        .clone()?
        .waiting?
        .reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_local_checkpoint_image_is_a_pull_error_not_a_fresh_start() {
    if skip_privileged("a_missing_local_checkpoint_image_is_a_pull_error_not_a_fresh_start") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (node, kubelet) = TestNode::start().await;
    let pods = node.pods(NS);
    let pod = with_work_dir(
        shell_pod(
            NS,
            "restored",
            "localhost/automigrate/ml-counter:never-imported",
            "echo start >> /work/starts; sleep 1000",
        ),
        work.path(),
    );
    create_pod(&pods, &pod).await;

    // ErrImagePull first; ImagePullBackOff once a retry (100 ms back-off in tests) failed too.
    eventually("ErrImagePull reported", || {
        waiting_reason(&node, "restored")
            .is_some_and(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
    })
    .await;
    eventually("ImagePullBackOff reported", || {
        waiting_reason(&node, "restored").as_deref() == Some("ImagePullBackOff")
    })
    .await;
    let stored = node.cluster.get::<Pod>(Some(NS), "restored").unwrap();
    let status = stored.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let message = status.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap()
        .message
        .unwrap_or_default();
    assert!(message.contains("never-imported"), "{message}");
    // Never started: no runc container, and the script never ran.
    assert!(
        node.guard.containers().is_empty(),
        "{:?}",
        node.guard.containers()
    );
    assert!(!work.path().join("starts").exists());
    kubelet.shutdown().await.unwrap();
}
