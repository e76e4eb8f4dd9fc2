//! A dead node whose only checkpoint does not restore (found by the fault suite on the local
//! cluster, f003): the rollback started the training fresh on another node and the Migration
//! ended `Restarted`, but the dead node's pod `trainer` was never deleted. The next decision
//! pass saw a protected pod on a failed node and migrated it again, which restarted it fresh
//! again: one new Migration and one more running copy every pass (40 copies).
//!
//! - the rollback's fresh start waits for its pod and then deletes what is left of the source,
//!   as a migration's end does (forcibly: its node is dead);
//! - a pod that a `Succeeded` or `Restarted` Migration already moved is never migrated again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use automigrate_core::migration::{Phase, RollbackAction};
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::RecordingAgent;
use automigrate_operator::crd::MigrationStatus;
use k8s_openapi::api::core::v1::Pod;

mod common;
use common::*;

async fn harness() -> Harness {
    let agent = RecordingAgent::new();
    // The only checkpoint: verified where it is stored, damaged where it is restored (every
    // node's store finds it damaged when it builds the image: what a BLAKE3 mismatch does).
    holds_verified(&agent, "edge-3", "trainer-ck-1");
    for node in ["edge-1", "edge-2", "edge-3"] {
        agent.refuse_images_on(node, "build image", "BLAKE3 mismatch");
    }
    Harness::start(&FakeCluster::new(), &agent).await
}

/// edge-2 failed with the trainer on it; the decision pass at 60 s migrates it, the restore is
/// refused, the rollback starts it fresh (the kubelet runs that pod). Returns the Migration
/// driven to its end.
async fn restarted_after_a_corrupt_checkpoint(h: &Harness) -> (String, MigrationStatus) {
    let (name, now) = h.dead_edge_2_migration().await;
    // The fresh pod is created by the rollback; before the fix the Migration ended at once.
    let advanced = h
        .drive(&name, now, |a| {
            a.phase.is_terminal()
                || (a.phase == Phase::RollingBack
                    && a.waiting
                        .as_deref()
                        .is_some_and(|why| why.contains("Ready")))
        })
        .await;
    if !advanced.phase.is_terminal() {
        let cluster = h.cluster.clone();
        eventually("the rollback's pod", || {
            cluster.list::<Pod>().iter().any(|pod| {
                pod.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.ends_with("-r"))
            })
        })
        .await;
        let pod = pod_names(h)
            .into_iter()
            .find(|pod| pod.ends_with("-r"))
            .unwrap();
        h.kubelet_runs(&pod).await;
        h.drive(&name, now, |a| a.phase.is_terminal()).await;
    }
    let status = h.status(&name);
    assert_eq!(
        status.state.phase,
        Phase::Restarted,
        "{name}: {:?}",
        status.state.message
    );
    assert_eq!(status.state.rollback, Some(RollbackAction::RestartFresh));
    (name, status)
}

fn pod_names(h: &Harness) -> Vec<String> {
    let mut names: Vec<String> = h
        .cluster
        .list::<Pod>()
        .into_iter()
        .filter_map(|pod| pod.metadata.name)
        .collect();
    names.sort();
    names
}

fn migration_phases(h: &Harness) -> Vec<(String, Option<Phase>)> {
    h.migrations()
        .into_iter()
        .map(|m| (m.metadata.name.clone().unwrap_or_default(), m.phase()))
        .collect()
}

/// A few decision passes after the end, each once the stores have caught up; returns how many
/// Migrations exist then.
async fn passes_after(h: &Harness, pods: usize) -> usize {
    h.settle(3, pods).await;
    for second in 61..65 {
        h.controller.decider.pass(at(second)).await.unwrap();
        let (stores, count) = (h.controller.stores.clone(), h.migrations().len());
        eventually("the store to see every Migration", || {
            stores.migrations.state().len() == count
        })
        .await;
    }
    h.migrations().len()
}

#[tokio::test]
async fn a_fresh_restart_deletes_the_dead_source_and_is_not_repeated() {
    let h = harness().await;
    let (_, status) = restarted_after_a_corrupt_checkpoint(&h).await;
    let fresh = status.replacement_pod.clone().unwrap();
    assert_eq!(
        pod_names(&h),
        vec![fresh],
        "one trainer: the fresh copy, the dead node's pod deleted"
    );
    assert_eq!(
        passes_after(&h, 1).await,
        1,
        "a second Migration: {:?}",
        migration_phases(&h)
    );
}

#[tokio::test]
async fn a_pod_a_restarted_migration_moved_is_never_migrated_again() {
    let h = harness().await;
    let (_, status) = restarted_after_a_corrupt_checkpoint(&h).await;
    // Whatever removes it may not have yet (a deletion the API server has not finished, a
    // controller that crashed before it): the recorded source pod is still there.
    let mut left: Pod = serde_json::from_value(status.source_pod.clone().unwrap()).unwrap();
    left.metadata.uid = status.source_pod_uid.clone();
    left.metadata.resource_version = None;
    h.cluster.put(&left);
    assert_eq!(
        passes_after(&h, 2).await,
        1,
        "a second Migration of the leftover: {:?}",
        migration_phases(&h)
    );
}
