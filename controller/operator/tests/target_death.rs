//! The target node powered off while the replacement was being verified (fault suite on the
//! local cluster, f007-td): the controller retried on the dead target until the phase
//! deadline, then the rollback waited for the replacement's pod on the dead node to go, which
//! no kubelet would ever confirm, and timed out too; the Migration ended `Failed` with the
//! training stopped. Now a target whose Lease expired is lost: the phase fails at once, the
//! replacement's pod on the fenced node is deleted forcibly, and the workload is restored on
//! the live source.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use automigrate_core::migration::Phase;
use automigrate_kube_fake::{FakeCluster, FakeClusterOptions};
use automigrate_operator::agent::RecordingAgent;
use k8s_openapi::api::core::v1::Pod;

mod common;
use common::*;

#[tokio::test]
async fn a_dead_target_while_verifying_rolls_back_to_the_source_at_once() {
    // Graceful pod deletion as a real API server does it: a pod on a node stays Terminating
    // until its kubelet confirms.
    let cluster = FakeCluster::with_options(FakeClusterOptions {
        graceful_pod_deletion: true,
        ..FakeClusterOptions::default()
    });
    let h = Harness::start(&cluster, &RecordingAgent::new()).await;
    healthy_cluster(&h, "{}").await;
    let name = h
        .request_migration("trainer", Some("edge-3"), "maintenance")
        .await;
    h.agent.set_now(at(0));
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    // The live source's kubelet confirms the source pod's deletion (the fencing stop).
    let kubelet = h.cluster.clone();
    h.drive(&name, at(0), |a| {
        if kubelet
            .get::<Pod>(Some(NS), "trainer")
            .is_some_and(|pod| pod.metadata.deletion_timestamp.is_some())
        {
            kubelet.remove::<Pod>(Some(NS), "trainer");
        }
        a.phase == Phase::Verifying
    })
    .await;
    let replacement = h.replacement(&name);

    // edge-3 powers off: NotReady, its Lease never renewed again. Much later (past the
    // self-fence safe time), the source and edge-1 still renew theirs.
    let now = at(900);
    h.cluster.put(&node("edge-3", "Unknown", at(1)));
    for live in ["edge-1", "edge-2"] {
        h.cluster.put(&lease(live, now));
    }
    h.lease_seen("edge-1", now).await;
    h.lease_seen("edge-2", now).await;

    let advanced = h
        .drive(&name, now, |a| {
            a.phase.is_terminal()
                || (a.phase == Phase::RollingBack
                    && h.cluster.get::<Pod>(Some(NS), &replacement).is_none()
                    && a.waiting
                        .as_deref()
                        .is_some_and(|why| why.contains("Ready")))
        })
        .await;
    if !advanced.phase.is_terminal() {
        let restored = h
            .cluster
            .list::<Pod>()
            .into_iter()
            .filter_map(|pod| pod.metadata.name)
            .find(|pod| pod != &replacement)
            .unwrap();
        h.kubelet_runs(&restored).await;
        h.drive(&name, now, |a| a.phase.is_terminal()).await;
    }
    let status = h.status(&name);
    assert_eq!(
        status.state.phase,
        Phase::RolledBack,
        "{:?}",
        status.state.message
    );
    assert!(
        status
            .state
            .message
            .as_deref()
            .is_some_and(|message| message.contains("target node edge-3 lost")),
        "{:?}",
        status.state.message
    );
    // The replacement's pod on the dead node is gone, and nothing else was put there.
    let pods = h.cluster.list::<Pod>();
    let on_edge_3: Vec<_> = pods
        .iter()
        .filter(|pod| {
            pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some("edge-3")
        })
        .map(|pod| pod.metadata.name.clone())
        .collect();
    assert!(on_edge_3.is_empty(), "{on_edge_3:?}");
    assert!(
        pods.iter().any(
            |pod| pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some("edge-2")
        ),
        "restored on the source: {pods:#?}"
    );
}
