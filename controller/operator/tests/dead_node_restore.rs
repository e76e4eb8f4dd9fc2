//! A dead node's pod and the checkpoint it comes back from (found by running the real
//! controller on the local cluster):
//!
//! - a replica is recorded on the pod only once the controller sees its transfer succeed by
//!   polling the *source* agent; a source that dies after the standby stored the checkpoint
//!   but before that poll leaves the copy unrecorded. The surviving agents are asked what they
//!   hold, and the verified copy is restored instead of restarting the training;
//! - a copy on a node that is dead too is no copy: a node whose Lease went unrenewed for the
//!   lease timeout still shows Ready (nothing marks it in the local cluster; Kubernetes does
//!   40–50 s later), and choosing its copy retried the transfer from it until the deadline
//!   (issue 12 campaign, f084-td: the first target died in Restoring, and the next migration
//!   synced from it, 10 attempts, never done);
//! - a target that refuses a checkpoint its own store verifies intact (its disk is full) is at
//!   fault, not the checkpoint: the Migration fails without a fresh start there, and the next
//!   decision pass after the retry backoff resumes the pod on another node from that
//!   checkpoint (issue 12 campaign, f045-tdf: it restarted training from the beginning on the
//!   full node);
//! - when no checkpoint survives anywhere, the pod restarts from the beginning, and the
//!   Migration says so (`Restarted`, with why), never `Succeeded`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use automigrate_core::migration::Phase;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::RecordingAgent;
use automigrate_operator::crd::MigrationStatus;
use automigrate_operator::replacement;
use k8s_openapi::api::core::v1::Pod;

mod common;
use common::*;

/// edge-2 failed (silent since -5 s) with the trainer on it; its recorded checkpoint
/// `trainer-ck-1` is held on edge-2 only. Returns the Migration the decision pass at 60 s
/// started, driven to its end (the kubelet runs the replacement).
async fn dead_node_migration(h: &Harness) -> (String, MigrationStatus) {
    dead_node_migration_with(h, &[]).await
}

/// [`dead_node_migration`] with more nodes (see `Harness::dead_edge_2_migration_with`).
async fn dead_node_migration_with(
    h: &Harness,
    more_nodes: &[(&str, jiff::Timestamp)],
) -> (String, MigrationStatus) {
    let (name, now) = h.dead_edge_2_migration_with(&["edge-2"], more_nodes).await;
    h.drive(&name, now, |a| a.phase == Phase::Verifying).await;
    h.kubelet_runs(&h.replacement(&name)).await;
    h.drive(&name, now, |a| a.phase.is_terminal()).await;
    let status = h.status(&name);
    (name, status)
}

fn restored_from(h: &Harness, status: &MigrationStatus) -> Option<String> {
    let replacement: Pod = h
        .cluster
        .get(Some(NS), status.replacement_pod.as_ref().unwrap())
        .unwrap();
    replacement
        .metadata
        .annotations
        .unwrap_or_default()
        .get(replacement::RESTORED_FROM_ANNOTATION)
        .cloned()
}

#[tokio::test]
async fn a_verified_replica_nobody_recorded_is_restored_instead_of_restarting() {
    let agent = RecordingAgent::new();
    // The replica of trainer-ck-1 landed on edge-3 and its agent verified it; the source died
    // before the controller's poll saw the transfer succeed, so the pod does not name it.
    holds_verified(&agent, "edge-3", "trainer-ck-1");
    let h = Harness::start(&automigrate_kube_fake::FakeCluster::new(), &agent).await;
    let (name, status) = dead_node_migration(&h).await;
    assert_eq!(
        status.state.phase,
        Phase::Succeeded,
        "{name}: {:?}",
        status.state.message
    );
    let stored = status.stored_checkpoint.as_ref().unwrap();
    assert_eq!(
        (stored.id.as_str(), stored.from.as_str()),
        ("trainer-ck-1", "edge-3")
    );
    assert_eq!(restored_from(&h, &status).as_deref(), Some("trainer-ck-1"));
}

#[tokio::test]
async fn a_copy_on_a_node_whose_lease_expired_is_not_restored_from() {
    let agent = RecordingAgent::new();
    // edge-4 holds a verified replica and still shows Ready, but its Lease has been silent
    // for 90 s (timeout 15 s): it is dead, and its agent can send nothing.
    holds_verified(&agent, "edge-4", "trainer-ck-1");
    let h = Harness::start(&automigrate_kube_fake::FakeCluster::new(), &agent).await;
    let (name, status) = dead_node_migration_with(&h, &[("edge-4", at(-30))]).await;
    assert_eq!(
        status.stored_checkpoint, None,
        "{name}: the copy on the dead edge-4 was chosen: {:?}",
        status.state.message
    );
    assert!(
        status
            .transfers
            .iter()
            .all(|record| record.from != "edge-4"),
        "{:#?}",
        status.transfers
    );
    assert_eq!(
        status.state.phase,
        Phase::Restarted,
        "{name}: {:?}",
        status.state.message
    );
}

#[tokio::test]
async fn a_full_target_that_refuses_an_intact_checkpoint_fails_and_the_pod_resumes_elsewhere() {
    let agent = RecordingAgent::new();
    holds_verified(&agent, "edge-3", "trainer-ck-1");
    // edge-3's disk is full.
    agent.refuse_images_on(
        "edge-3",
        "imageFailed",
        "No space left on device (os error 28)",
    );
    let h = Harness::start(&FakeCluster::new(), &agent).await;
    let (first, now) = h
        .dead_edge_2_migration_with(&["edge-2", "edge-3"], &[])
        .await;
    h.drive(&first, now, |a| a.phase.is_terminal()).await;
    let status = h.status(&first);
    assert_eq!(status.state.target, "edge-3", "{status:#?}");
    assert_eq!(
        status.state.phase,
        Phase::Failed,
        "{first}: {:?}",
        status.state.message
    );
    let message = status.state.message.clone().unwrap_or_default();
    assert!(message.contains("at fault"), "{message}");
    let pods: Vec<String> = h
        .cluster
        .list::<Pod>()
        .into_iter()
        .filter_map(|pod| pod.metadata.name)
        .collect();
    assert_eq!(pods, ["trainer"], "nothing started on the full node");

    // After the retry backoff (10 s), the next pass places the pod elsewhere.
    let later = at(75);
    for node in ["edge-1", "edge-3"] {
        h.cluster.put(&lease(node, later));
        h.lease_seen(node, later).await;
    }
    h.controller.decider.pass(later).await.unwrap();
    let (stores, cluster) = (h.controller.stores.clone(), h.cluster.clone());
    eventually("the second Migration in the store", || {
        cluster.list::<automigrate_operator::crd::Migration>().len() == 2
            && stores.migrations.state().len() == 2
    })
    .await;
    let second = h
        .migrations()
        .into_iter()
        .filter_map(|migration| migration.metadata.name)
        .find(|name| *name != first)
        .unwrap();
    h.drive(&second, later, |a| a.phase == Phase::Verifying)
        .await;
    h.kubelet_runs(&h.replacement(&second)).await;
    h.drive(&second, later, |a| a.phase.is_terminal()).await;
    let status = h.status(&second);
    assert_eq!(
        status.state.phase,
        Phase::Succeeded,
        "{second}: {:?}",
        status.state.message
    );
    assert_ne!(status.state.target, "edge-3");
    let stored = status.stored_checkpoint.as_ref().unwrap();
    assert_eq!(
        (stored.id.as_str(), stored.from.as_str()),
        ("trainer-ck-1", "edge-3")
    );
    assert_eq!(restored_from(&h, &status).as_deref(), Some("trainer-ck-1"));
}

#[tokio::test]
async fn a_dead_node_with_no_surviving_checkpoint_ends_restarted_and_says_why() {
    let h = Harness::new().await;
    let (name, status) = dead_node_migration(&h).await;
    assert_eq!(
        restored_from(&h, &status),
        None,
        "nothing survived to restore"
    );
    assert_eq!(
        status.state.phase,
        Phase::Restarted,
        "{name}: {:?}",
        status.state.message
    );
    let message = status.state.message.clone().unwrap();
    assert!(
        message.contains("restarted from scratch")
            && message.contains("no verified checkpoint")
            && message.contains("edge-2"),
        "{message}"
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "Restarted"),
        "{:#?}",
        status.conditions
    );
    eventually("the Restarted events", || {
        h.has_event(&name, "Restarted") && h.has_event("trainer", "MigrationRestarted")
    })
    .await;
    assert!(!h.has_event(&name, "Succeeded") && !h.has_event("trainer", "Migrated"));
}
