//! Node registration, status updates and Lease renewal against the in-process API server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use automigrate_kubelet::node::{KUBELET_VERSION, NODE_LEASE_NAMESPACE};
use common::{NODE, NODE_IP, cluster, eventually, start};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;

fn condition(node: &Node, kind: &str) -> k8s_openapi::api::core::v1::NodeCondition {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == kind).cloned())
        .unwrap_or_else(|| panic!("no {kind} condition"))
}

#[tokio::test]
async fn registers_the_node_and_keeps_status_and_lease_current() {
    let root = tempfile::tempdir().unwrap();
    let cluster = cluster();
    let kubelet = start(&cluster, root.path()).await;

    let node: Node = cluster.get(None, NODE).unwrap();
    let labels = node.metadata.labels.clone().unwrap();
    assert_eq!(labels["kubernetes.io/hostname"], NODE);
    assert_eq!(labels["kubernetes.io/os"], "linux");
    let status = node.status.clone().unwrap();
    let addresses: Vec<_> = status
        .addresses
        .unwrap()
        .into_iter()
        .map(|a| (a.type_, a.address))
        .collect();
    assert_eq!(
        addresses,
        [
            ("InternalIP".to_string(), NODE_IP.to_string()),
            ("Hostname".to_string(), NODE.to_string())
        ]
    );
    let info = status.node_info.unwrap();
    assert_eq!(info.kubelet_version, KUBELET_VERSION);
    assert_eq!(info.operating_system, "linux");
    assert!(info.container_runtime_version.starts_with("runc://"));
    assert!(status.allocatable.unwrap().contains_key("cpu"));
    assert_eq!(
        status
            .daemon_endpoints
            .unwrap()
            .kubelet_endpoint
            .unwrap()
            .port,
        i32::from(kubelet.api_addr().unwrap().port())
    );
    for kind in [
        "MemoryPressure",
        "DiskPressure",
        "PIDPressure",
        "NetworkUnavailable",
    ] {
        assert_eq!(condition(&node, kind).status, "False", "{kind}");
    }
    let ready = condition(&node, "Ready");
    assert_eq!(ready.status, "True");
    assert_eq!(ready.reason.as_deref(), Some("KubeletReady"));
    let first_heartbeat = ready.last_heartbeat_time.clone().unwrap().0;
    let transition = ready.last_transition_time.clone().unwrap().0;

    // The status keeps being posted: the heartbeat moves, the transition time stays.
    eventually("a newer node heartbeat", || {
        let node: Node = cluster.get(None, NODE).unwrap();
        condition(&node, "Ready").last_heartbeat_time.unwrap().0 > first_heartbeat
    })
    .await;
    let node: Node = cluster.get(None, NODE).unwrap();
    assert_eq!(
        condition(&node, "Ready").last_transition_time.unwrap().0,
        transition
    );

    // The Lease, as the controller reads it: holder = node, 40 s, renewTime moving.
    eventually("the node lease", || {
        cluster
            .get::<Lease>(Some(NODE_LEASE_NAMESPACE), NODE)
            .is_some()
    })
    .await;
    let lease: Lease = cluster.get(Some(NODE_LEASE_NAMESPACE), NODE).unwrap();
    let spec = lease.spec.clone().unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some(NODE));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    let owner = &lease.metadata.owner_references.unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Node", NODE));
    assert_eq!(Some(owner.uid.clone()), node.metadata.uid);
    let renewed = spec.renew_time.unwrap().0;
    eventually("a lease renewal", || {
        let lease: Lease = cluster.get(Some(NODE_LEASE_NAMESPACE), NODE).unwrap();
        lease.spec.unwrap().renew_time.unwrap().0 > renewed
    })
    .await;

    kubelet.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_kubelet_takes_over_its_registered_node() {
    let root = tempfile::tempdir().unwrap();
    let cluster = cluster();
    let kubelet = start(&cluster, root.path()).await;
    let before: Node = cluster.get(None, NODE).unwrap();
    kubelet.shutdown().await.unwrap();

    // Registration finds the Node already there (409) and goes on from its stored status.
    let kubelet = start(&cluster, root.path()).await;
    let after: Node = cluster.get(None, NODE).unwrap();
    assert_eq!(after.metadata.uid, before.metadata.uid);
    assert_eq!(
        condition(&after, "Ready").last_transition_time,
        condition(&before, "Ready").last_transition_time
    );
    assert!(
        condition(&after, "Ready").last_heartbeat_time.unwrap().0
            >= condition(&before, "Ready").last_heartbeat_time.unwrap().0
    );
    kubelet.shutdown().await.unwrap();
}
