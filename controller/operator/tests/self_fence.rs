//! The self-fence mode (the default) at the one place the executor judges a dead node fenced:
//! a node whose Lease expired counts as fenced only `max(leaseTimeout, safe)` after its last
//! heartbeat, `safe = selfFenceAfter + stopTime + clockSkew + margin`
//! (`automigrate_core::fencing`). Before that, no taint, no replacement.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use automigrate_core::fencing::{FencingMode, SelfFenceTiming};
use automigrate_core::migration::Phase;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::RecordingAgent;
use automigrate_operator::controller::Config;
use automigrate_operator::executor::{DeadNodeFencing, ExecutorConfig, OUT_OF_SERVICE_TAINT};
use automigrate_operator::snapshot::LATEST_CHECKPOINT;
use k8s_openapi::api::core::v1::{Node, Pod};

mod common;
use common::*;

/// safe = 40 + 5 + 2 + 3 = 50 s, longer than the default 30 s Lease timeout.
fn timing() -> SelfFenceTiming {
    SelfFenceTiming {
        self_fence_after: Duration::from_secs(40),
        ..SelfFenceTiming::default()
    }
}

fn tainted(h: &Harness, node: &str) -> bool {
    let node: Node = h.cluster.get(None, node).unwrap();
    node.spec
        .and_then(|spec| spec.taints)
        .unwrap_or_default()
        .iter()
        .any(|taint| taint.key == OUT_OF_SERVICE_TAINT)
}

#[test]
fn self_fence_is_the_default_mode() {
    assert_eq!(
        ExecutorConfig::default().dead_node_fencing,
        FencingMode::SelfFence(SelfFenceTiming::default())
    );
}

/// Fails when the executor fences at the Lease timeout (the taint mode's rule) instead of the
/// safe time: the taint and the replacement would come at 35 s after the heartbeat, while the
/// node's agent may still be killing its containers until 50 s.
#[tokio::test]
async fn an_expired_node_counts_as_fenced_only_after_the_safe_time() {
    let mut config = Config::default();
    config.executor.dead_node_fencing = DeadNodeFencing::SelfFence(timing());
    let h = Harness::start_with(&FakeCluster::new(), &RecordingAgent::new(), config).await;
    // edge-2's last heartbeat was 35 s before t0: past the 30 s Lease timeout.
    h.cluster.put(&node("edge-1", "True", at(-3600)));
    h.cluster.put(&node("edge-2", "Unknown", at(-60)));
    h.cluster.put(&lease("edge-1", at(0)));
    h.cluster.put(&lease("edge-2", at(-35)));
    h.cluster.put(&protected_pod(
        "trainer",
        "edge-2",
        &[(
            LATEST_CHECKPOINT,
            &checkpoint_annotation("trainer-ck-7", &["edge-2", "edge-1"]),
        )],
    ));
    h.settle(2, 1).await;
    h.lease_seen("edge-2", at(-35)).await;
    h.controller.decider.pass(at(0)).await.unwrap();
    let name = h.only_migration().metadata.name.unwrap();

    // Lease 35 s, 45 s and 49 s old: expired, but inside the safe time.
    for now in [0, 10, 14] {
        let round = h
            .drive(&name, at(now), |a| {
                a.phase == Phase::Fencing && a.waiting.is_some()
            })
            .await;
        let waiting = round.waiting.unwrap();
        assert!(
            waiting.contains("self-fence safe time") && waiting.contains("50s"),
            "{waiting}"
        );
        assert!(!tainted(&h, "edge-2"), "tainted {now} s after t0");
    }
    let writes = calls(&h.cluster);
    assert!(
        !writes
            .iter()
            .any(|w| w.starts_with("POST /api/v1/namespaces/ml/pods")),
        "no replacement inside the safe time: {writes:#?}"
    );

    // 50 s after the heartbeat: fenced, tainted, and the replacement may start.
    h.drive(&name, at(15), |a| a.phase != Phase::Fencing).await;
    assert!(tainted(&h, "edge-2"));
    let cluster = h.cluster.clone();
    eventually("the replacement to be created", || {
        cluster.list::<Pod>().len() == 2
    })
    .await;
}
