//! Periodic checkpoints and the checkpoint a pod has on record: a new checkpoint held only on
//! the pod's node must not replace a recorded one that a standby node holds, or a failure of
//! the node before the replica lands leaves nothing to restore from (found by the demo on the
//! local cluster: node-a powered off during a replication, "no stored checkpoint survives, so
//! the pod restarts from the beginning", while node-c held the previous checkpoint).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use automigrate_core::model::CheckpointInfo;
use automigrate_operator::snapshot::LATEST_CHECKPOINT;
use k8s_openapi::api::core::v1::Pod;

mod common;
use common::*;

fn recorded(h: &Harness) -> CheckpointInfo {
    let pod: Pod = h.cluster.get(Some(NS), "trainer").unwrap();
    serde_json::from_str(&pod.metadata.annotations.unwrap()[LATEST_CHECKPOINT]).unwrap()
}

#[tokio::test]
async fn a_checkpoint_no_standby_received_does_not_replace_one_a_standby_holds() {
    let h = Harness::new().await;
    healthy_cluster(&h, "checkpoint:\n  interval: 1m\n  replicateTo: 1\n").await;
    // The recorded checkpoint is on the pod's node and on a standby.
    let mut pod: Pod = h.cluster.get(Some(NS), "trainer").unwrap();
    pod.metadata.annotations.as_mut().unwrap().insert(
        LATEST_CHECKPOINT.into(),
        checkpoint_annotation("trainer-ck-0", &["edge-2", "edge-1"]),
    );
    h.cluster.put(&pod);
    let stores = h.controller.stores.clone();
    eventually("the store to see the replicated checkpoint", || {
        stores
            .pod(NS, "trainer")
            .and_then(|pod| automigrate_operator::snapshot::latest_checkpoint(&pod))
            .is_some_and(|info| info.id == "trainer-ck-0")
    })
    .await;

    let now = at(0);
    h.agent.set_now(now);
    let report = h.controller.decider.pass(now).await.unwrap();
    let decision = report.checkpoints.first().expect("a checkpoint is due");
    assert_eq!(decision.replicate_to.len(), 1, "{decision:#?}");
    let standby = decision.replicate_to[0].clone();
    h.agent.fail_transfers_to(&standby);
    let done = h.controller.checkpoints.run(decision).await.unwrap();
    assert_eq!(done.info.held_on, ["edge-2"]);
    assert_eq!(done.replica_failures.len(), 1);

    let kept = recorded(&h);
    assert_eq!(
        (kept.id.as_str(), kept.held_on.clone()),
        (
            "trainer-ck-0",
            vec!["edge-2".to_string(), "edge-1".to_string()]
        ),
        "the pod's record lost the checkpoint a standby holds"
    );
}

#[tokio::test]
async fn a_checkpoint_is_recorded_at_once_when_nothing_better_is_on_record() {
    // healthy_cluster's pod records a checkpoint held only on its node: the new one, even
    // unreplicated, is no worse.
    let h = Harness::new().await;
    healthy_cluster(&h, "checkpoint:\n  interval: 1m\n  replicateTo: 1\n").await;
    let now = at(0);
    h.agent.set_now(now);
    let report = h.controller.decider.pass(now).await.unwrap();
    let decision = report.checkpoints.first().expect("a checkpoint is due");
    h.agent.fail_transfers_to(&decision.replicate_to[0]);
    let done = h.controller.checkpoints.run(decision).await.unwrap();
    assert_eq!(recorded(&h), done.info);
}
