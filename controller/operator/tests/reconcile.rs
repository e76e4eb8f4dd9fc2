//! Reconcile-level acceptance tests: the controller's real code (reflectors, policy loader,
//! writer, decision pass, executor, webhook) through the real kube client stack against
//! automigrate-kube-fake, an in-process API server. Node agents are the recording double.
//!
//! Time is explicit: every decision pass and executor round gets its `now`, and the objects'
//! timestamps (node conditions, Leases) are set relative to a fixed start, so each test is
//! deterministic. Waiting happens only for the reflectors to see the fake's writes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use automigrate_core::decide::Trigger;
use automigrate_core::migration::Phase;
use automigrate_core::model::{CheckpointInfo, PodRef};
use automigrate_core::units;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::{AgentCall, CheckpointKind, RecordingAgent};
use automigrate_operator::alertmanager::{self, Receiver};
use automigrate_operator::crd::{Migration, Origin};
use automigrate_operator::executor::OUT_OF_SERVICE_TAINT;
use automigrate_operator::snapshot::LATEST_CHECKPOINT;
use automigrate_operator::{manual, replacement};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use tower::ServiceExt;

mod common;
use common::*;

#[tokio::test]
async fn failed_node_past_grace_is_migrated_and_the_old_pod_removed() {
    // The only test in this file that reads metrics: it installs the process's recorder.
    let metrics = automigrate_operator::metrics::install().unwrap();
    let h = Harness::new().await;
    // edge-2 stopped reporting 5 s before t0: NotReady, but still inside the 20 s grace.
    h.cluster.put(&node("edge-1", "True", at(-3600)));
    h.cluster.put(&node("edge-2", "Unknown", at(-5)));
    h.cluster.put(&node("edge-3", "True", at(-3600)));
    h.cluster.put(&lease("edge-1", at(0)));
    h.cluster.put(&lease("edge-2", at(-5)));
    h.cluster.put(&lease("edge-3", at(0)));
    h.cluster.put(&protected_pod(
        "trainer",
        "edge-2",
        &[(
            LATEST_CHECKPOINT,
            &checkpoint_annotation("trainer-ck-7", &["edge-2", "edge-3"]),
        )],
    ));
    h.settle(3, 1).await;

    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert!(
        report.decisions.migrations.is_empty(),
        "inside the grace period: {report:#?}"
    );
    assert!(h.migrations().is_empty());

    // A minute later the grace period is over and the Lease has expired: the node failed.
    let now = at(60);
    h.cluster.put(&lease("edge-1", now));
    h.cluster.put(&lease("edge-3", now));
    h.lease_seen("edge-3", now).await;
    let report = h.controller.decider.pass(now).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    let decision = &report.decisions.migrations[0];
    assert_eq!(decision.trigger, Trigger::NodeFailed);
    assert_eq!(decision.from, "edge-2");
    let target = decision.to.clone();
    assert_ne!(target, "edge-2");

    let migration = h.only_migration();
    assert_eq!(migration.spec.origin, Origin::Automatic);
    assert_eq!(migration.spec.trigger, Some(Trigger::NodeFailed));
    let name = migration.metadata.name.clone().unwrap();
    let status = migration.status.as_ref().unwrap();
    assert_eq!(status.state.phase, Phase::Pending);
    assert_eq!(
        (status.state.source.as_str(), status.state.target.as_str()),
        ("edge-2", target.as_str())
    );
    assert!(!status.state.source_alive);
    assert_eq!(
        status.stored_checkpoint.as_ref().unwrap().id,
        "trainer-ck-7"
    );

    // A second pass while the first migration is in flight starts nothing new.
    h.migration_seen(&name).await;
    let again = h.controller.decider.pass(now).await.unwrap();
    assert!(again.started.is_empty(), "{again:#?}");
    assert_eq!(h.migrations().len(), 1);

    let waiting = h.drive(&name, now, |a| a.phase == Phase::Verifying).await;
    assert!(
        waiting.waiting.unwrap().contains("not"),
        "waits for the replacement"
    );

    // Fenced before anything was created: the node carries the out-of-service taint.
    let tainted: Node = h.cluster.get(None, "edge-2").unwrap();
    let taints = tainted.spec.unwrap().taints.unwrap();
    assert!(
        taints
            .iter()
            .any(|taint| taint.key == OUT_OF_SERVICE_TAINT && taint.effect == "NoExecute")
    );

    let replacement_name = h
        .cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap()
        .replacement_pod
        .unwrap();
    let replacement: Pod = h.cluster.get(Some(NS), &replacement_name).unwrap();
    let spec = replacement.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(target.as_str()));
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("localhost/automigrate/trainer-ck-7:restore")
    );
    let annotations = replacement.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations[replacement::RESTORED_FROM_ANNOTATION],
        "trainer-ck-7"
    );
    assert_eq!(
        replacement.metadata.labels.as_ref().unwrap()["app"],
        "trainer"
    );
    assert!(h.agent.calls().contains(&AgentCall::BuildImage {
        node: target.clone(),
        checkpoint_id: "trainer-ck-7".into()
    }));
    assert!(
        h.cluster.get::<Pod>(Some(NS), "trainer").is_some(),
        "the old pod stays until the replacement is Ready"
    );

    h.kubelet_runs(&replacement_name).await;
    h.drive(&name, now, |a| a.phase == Phase::Succeeded).await;

    assert!(
        h.cluster.get::<Pod>(Some(NS), "trainer").is_none(),
        "the old pod is deleted"
    );
    let delete = h
        .cluster
        .requests()
        .into_iter()
        .find(|r| r.method == http::Method::DELETE && r.path.ends_with("/pods/trainer"))
        .unwrap();
    assert_eq!(
        delete.body.unwrap()["gracePeriodSeconds"],
        0,
        "forced: the node is dead"
    );
    let status = h
        .cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.state.phase, Phase::Succeeded);
    let phases: Vec<Phase> = status
        .state
        .history
        .iter()
        .map(|timing| timing.phase)
        .collect();
    assert_eq!(
        phases,
        [
            Phase::Pending,
            Phase::Syncing,
            Phase::Fencing,
            Phase::Restoring,
            Phase::Verifying
        ]
    );
    assert_eq!(
        status.state.downtime,
        Some(Duration::from_secs(65)),
        "from the last heartbeat at -5 s to 60 s"
    );
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );

    eventually("events to be published", || {
        h.has_event(&name, "Started")
            && h.has_event(&name, "Succeeded")
            && h.has_event("trainer", "MigrationStarted")
            && h.has_event("trainer", "Migrated")
            && h.has_event(&replacement_name, "Restored")
            && h.has_event("edge-2", "OutOfService")
    })
    .await;

    let text = metrics.render();
    let line = |name: &str, labels: &[&str]| {
        text.lines()
            .find(|line| line.starts_with(name) && labels.iter().all(|label| line.contains(label)))
            .map(String::from)
    };
    let migrated = line(
        "automigrate_migrations_total",
        &["result=\"Succeeded\"", "reason=\"NodeFailed\""],
    );
    assert_eq!(
        migrated.as_deref().and_then(|l| l.rsplit(' ').next()),
        Some("1"),
        "{text}"
    );
    assert!(
        line(
            "automigrate_migration_phase_seconds_bucket",
            &["phase=\"Fencing\""]
        )
        .is_some(),
        "{text}"
    );
    assert!(
        line("automigrate_migration_downtime_seconds_count", &[]).is_some(),
        "{text}"
    );
    assert!(
        line("automigrate_decision_pass_seconds_count", &[]).is_some(),
        "{text}"
    );
}

const ALERT_PAYLOAD: &str = r#"{
  "version": "4", "status": "firing", "receiver": "automigrate", "groupKey": "g",
  "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "",
  "alerts": [{"status": "firing", "labels": {"alertname": "NodeDiskFailing", "node": "edge-2", "severity": "warning"},
              "annotations": {}, "startsAt": "2030-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
              "generatorURL": "", "fingerprint": "f1"}]
}"#;

async fn post_alert(h: &Harness, body: &str) -> StatusCode {
    let receiver = Receiver {
        token: Arc::from("hook-token"),
        book: h.controller.alerts.clone(),
        clock: Arc::new(h.clock.clone()),
        wake: h.controller.wake.clone(),
    };
    alertmanager::router(receiver)
        .oneshot(
            Request::post(alertmanager::PATH)
                .header(header::AUTHORIZATION, "Bearer hook-token")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn alert_from_the_webhook_moves_the_pod_proactively() {
    let h = Harness::new().await;
    healthy_cluster(&h, "triggers:\n  alerts: [NodeDiskFailing]\n").await;
    let now = at(0);
    h.agent.set_now(now);

    let report = h.controller.decider.pass(now).await.unwrap();
    assert!(
        report.decisions.migrations.is_empty(),
        "no alert yet: nothing moves"
    );

    assert_eq!(
        post_alert(&h, "{\"version\":\"4\"}").await,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(post_alert(&h, ALERT_PAYLOAD).await, StatusCode::OK);

    let report = h.controller.decider.pass(now).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    let decision = &report.decisions.migrations[0];
    assert_eq!(decision.from, "edge-2");
    assert!(
        decision.reason.contains("NodeDiskFailing"),
        "{}",
        decision.reason
    );
    let target = decision.to.clone();
    let migration = h.only_migration();
    let name = migration.metadata.name.clone().unwrap();
    let status = migration.status.unwrap();
    assert!(
        status.state.source_alive,
        "the node still works: fresh checkpoint"
    );
    assert_eq!(status.base_checkpoint.as_deref(), Some("trainer-ck-3"));
    let payloads: Vec<_> = status.transfers.iter().map(|t| t.payload.clone()).collect();
    assert!(
        payloads
            .iter()
            .any(|p| p.dataset.as_deref() == Some("/data/esc50")),
        "{payloads:?}"
    );
    assert!(
        payloads
            .iter()
            .any(|p| p.checkpoint.as_deref() == Some("trainer-ck-3")),
        "{payloads:?}"
    );

    let replacement = h.drive(&name, now, |a| a.phase == Phase::Verifying).await;
    assert!(replacement.waiting.is_some());
    let status = h
        .cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    let replacement_name = status.replacement_pod.clone().unwrap();
    h.kubelet_runs(&replacement_name).await;
    h.drive(&name, now, |a| a.phase == Phase::Succeeded).await;

    let calls = h.agent.calls();
    let final_checkpoint = calls
        .iter()
        .position(|call| matches!(call, AgentCall::Checkpoint { node, kind: CheckpointKind::Final, container, .. } if node == "edge-2" && container == "train"))
        .expect("a final checkpoint on the source");
    let dataset_sent = calls
        .iter()
        .position(|call| matches!(call, AgentCall::StartTransfer { from, payload, to } if from == "edge-2" && to == &target && payload.dataset.is_some()))
        .expect("the dataset sent to the target");
    assert!(
        dataset_sent < final_checkpoint,
        "data syncs while the source still runs"
    );
    assert!(calls.iter().any(|call| matches!(call, AgentCall::StartTransfer { payload, .. } if payload.checkpoint.as_deref() == Some("trainer-ck-1"))));

    // Fencing rule: the source pod was deleted before the replacement was created.
    let writes = calls_in_order(&h.cluster);
    let deleted = writes
        .iter()
        .position(|w| w == "DELETE /api/v1/namespaces/ml/pods/trainer")
        .unwrap();
    let created = writes
        .iter()
        .position(|w| w == "POST /api/v1/namespaces/ml/pods")
        .unwrap();
    assert!(deleted < created, "{writes:#?}");

    let pod: Pod = h.cluster.get(Some(NS), &replacement_name).unwrap();
    assert_eq!(
        pod.spec.unwrap().node_name.as_deref(),
        Some(target.as_str())
    );
    let status = h
        .cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.state.checkpoint_id.as_deref(), Some("trainer-ck-1"));
    assert!(status.bytes_moved > 0);
    assert_eq!(
        status.state.downtime,
        Some(Duration::ZERO),
        "explicit time did not move"
    );
    let untainted: Node = h.cluster.get(None, "edge-2").unwrap();
    assert!(
        untainted.spec.and_then(|s| s.taints).is_none(),
        "a live node is not tainted"
    );
}

fn calls_in_order(cluster: &FakeCluster) -> Vec<String> {
    calls(cluster)
}

#[tokio::test]
async fn invalid_policy_edit_is_reported_and_the_last_valid_kept() {
    let h = Harness::new().await;
    h.cluster
        .put(&policy_map("gpu", "triggers:\n  notReadyGrace: 45s\n"));
    let policies = h.controller.policies.clone();
    eventually("the valid policy to load", || {
        policies.read().unwrap().get("gpu").is_some()
    })
    .await;
    eventually("PolicyLoaded event", || h.has_event("gpu", "PolicyLoaded")).await;

    h.cluster.put(&policy_map(
        "gpu",
        "triggers:\n  notReadyGrace: soon\n  unknownKnob: 1\n",
    ));
    eventually("InvalidPolicy event", || {
        h.has_event("gpu", "InvalidPolicy")
    })
    .await;
    let grace = policies
        .read()
        .unwrap()
        .get("gpu")
        .unwrap()
        .triggers
        .not_ready_grace;
    assert_eq!(
        grace,
        Duration::from_secs(45),
        "the last valid version stays in force"
    );
    let event = h
        .cluster
        .list::<Event>()
        .into_iter()
        .find(|event| event.reason.as_deref() == Some("InvalidPolicy"))
        .unwrap();
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let note = event.note.unwrap();
    assert!(
        note.contains("notReadyGrace") && note.contains("last valid version"),
        "{note}"
    );

    // The engine decides with the kept policy: a pod naming it is judged with 45 s of grace.
    h.cluster.put(&node("edge-1", "True", at(-3600)));
    h.cluster.put(&node("edge-2", "Unknown", at(-30)));
    h.cluster.put(&lease("edge-1", at(0)));
    h.cluster.put(&protected_pod(
        "trainer",
        "edge-2",
        &[("automigrate.dev/policy", "gpu")],
    ));
    h.settle(2, 1).await;
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert!(
        report.decisions.migrations.is_empty(),
        "30 s < 45 s grace: {report:#?}"
    );

    h.cluster
        .put(&policy_map("gpu", "triggers:\n  notReadyGrace: 20s\n"));
    eventually("the fixed policy to load", || {
        policies
            .read()
            .unwrap()
            .get("gpu")
            .unwrap()
            .triggers
            .not_ready_grace
            == Duration::from_secs(20)
    })
    .await;
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(
        report.decisions.migrations.len(),
        1,
        "30 s > 20 s grace: {report:#?}"
    );

    h.cluster.remove::<ConfigMap>(Some(POLICY_NS), "gpu");
    eventually("the deleted policy to go", || {
        policies.read().unwrap().get("gpu").is_none()
    })
    .await;
}

#[tokio::test]
async fn restarted_controller_resumes_a_migration_in_flight() {
    let cluster = FakeCluster::new();
    let agent = RecordingAgent::new();
    let first = Harness::start(&cluster, &agent).await;
    healthy_cluster(&first, "triggers:\n  alerts: [NodeDiskFailing]\n").await;
    let now = at(0);
    agent.set_now(now);
    assert_eq!(post_alert(&first, ALERT_PAYLOAD).await, StatusCode::OK);
    first.controller.decider.pass(now).await.unwrap();
    let name = first.only_migration().metadata.name.unwrap();

    // The first controller stops right after it started sending the final checkpoint.
    let stuck = first
        .drive(&name, now, |a| a.phase == Phase::Transferring)
        .await;
    assert!(stuck.waiting.unwrap().contains("trainer-ck-1"));
    let status = cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    let transfer_id = status
        .transfers
        .iter()
        .find(|t| t.payload.checkpoint.as_deref() == Some("trainer-ck-1"))
        .and_then(|t| t.id.clone())
        .expect("the transfer id is persisted");
    drop(first);

    // A new controller (new reflectors, empty caches) picks the migration up from its status.
    let second = Harness::start(&cluster, &agent).await;
    second.settle(3, 1).await;
    let stores = second.controller.stores.clone();
    eventually("the new store to hold the Migration", || {
        stores.migration(NS, &name).is_some()
    })
    .await;
    let active = second.controller.executor.active();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].phase(), Some(Phase::Transferring));

    second
        .drive(&name, now, |a| a.phase == Phase::Verifying)
        .await;
    let status = cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    second
        .kubelet_runs(status.replacement_pod.as_deref().unwrap())
        .await;
    second
        .drive(&name, now, |a| a.phase == Phase::Succeeded)
        .await;

    let calls = agent.calls();
    let finals = calls
        .iter()
        .filter(|call| {
            matches!(
                call,
                AgentCall::Checkpoint {
                    kind: CheckpointKind::Final,
                    ..
                }
            )
        })
        .count();
    assert_eq!(finals, 1, "the final dump is not redone");
    let starts = calls
        .iter()
        .filter(|call| matches!(call, AgentCall::StartTransfer { payload, .. } if payload.checkpoint.as_deref() == Some("trainer-ck-1")))
        .count();
    assert_eq!(starts, 1, "the transfer is polled, not started again");
    assert!(calls.contains(&AgentCall::TransferStatus {
        node: "edge-2".into(),
        id: transfer_id
    }));
    let pods: Vec<Pod> = cluster.list();
    assert_eq!(pods.len(), 1, "exactly one copy: {pods:#?}");
}

/// A node that is NotReady past its grace period but whose Lease is fresh (or missing) may be
/// partitioned and still running the pod: the migration may prepare, but never fences and
/// never starts a second copy; its fencing deadline fails it.
async fn partitioned_source_is_never_duplicated(lease_renewed: Option<i64>) {
    let h = Harness::new().await;
    h.cluster.put(&node("edge-1", "True", at(-3600)));
    h.cluster.put(&node("edge-2", "Unknown", at(-60)));
    h.cluster.put(&lease("edge-1", at(0)));
    if let Some(renewed) = lease_renewed {
        h.cluster.put(&lease("edge-2", at(renewed)));
    }
    h.cluster.put(&protected_pod(
        "trainer",
        "edge-2",
        &[(
            LATEST_CHECKPOINT,
            &checkpoint_annotation("trainer-ck-7", &["edge-2", "edge-1"]),
        )],
    ));
    h.settle(2, 1).await;
    let now = at(0);
    h.controller.decider.pass(now).await.unwrap();
    let name = h.only_migration().metadata.name.unwrap();

    let fencing = h
        .drive(&name, now, |a| {
            a.phase == Phase::Fencing && a.waiting.is_some()
        })
        .await;
    assert!(fencing.waiting.unwrap().contains("partitioned"));
    // Time passes; a fresh Lease stays fresh (the kubelet still talks to the API server).
    for seconds in [30, 60, 90] {
        if lease_renewed.is_some() {
            h.cluster.put(&lease("edge-2", at(seconds)));
            h.lease_seen("edge-2", at(seconds)).await;
        }
        let round = h.drive(&name, at(seconds), |_| true).await;
        assert_eq!(round.phase, Phase::Fencing);
    }
    // The fence deadline (2 m by default) ends it.
    let ended = h.drive(&name, at(200), |a| a.phase.is_terminal()).await;
    assert_eq!(ended.phase, Phase::Failed);

    let writes = calls(&h.cluster);
    assert!(
        !writes
            .iter()
            .any(|w| w.starts_with("POST /api/v1/namespaces/ml/pods")),
        "{writes:#?}"
    );
    assert!(
        !writes
            .iter()
            .any(|w| w.starts_with("DELETE /api/v1/namespaces/ml/pods")),
        "{writes:#?}"
    );
    assert!(
        !writes.iter().any(|w| w.starts_with("PATCH /api/v1/nodes")),
        "no taint: {writes:#?}"
    );
    assert!(h.cluster.get::<Pod>(Some(NS), "trainer").is_some());
    let status = h
        .cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    assert!(status.state.message.unwrap().contains("Fencing failed"));
    assert!(!status.state.target_started && !status.state.source_fenced);
}

#[tokio::test]
async fn partitioned_source_with_a_fresh_lease_is_never_duplicated() {
    partitioned_source_is_never_duplicated(Some(-1)).await;
}

#[tokio::test]
async fn partitioned_source_without_a_lease_is_never_duplicated() {
    partitioned_source_is_never_duplicated(None).await;
}

#[tokio::test]
async fn manual_requests_are_taken_or_refused_with_a_reason() {
    let h = Harness::new().await;
    healthy_cluster(&h, "{}").await;
    let mut unprotected = protected_pod("web", "edge-1", &[]);
    unprotected.metadata.annotations = None;
    h.cluster.put(&unprotected);
    h.settle(3, 2).await;
    let api: Api<Migration> = Api::namespaced(h.cluster.clone().client(), NS);

    let request = manual::request(&api, "trainer", Some("edge-3"), "maintenance")
        .await
        .unwrap();
    let refused = manual::request(&api, "web", None, "why not").await.unwrap();
    let missing = manual::request(&api, "ghost", None, "").await.unwrap();
    let stores = h.controller.stores.clone();
    eventually("the requests to reach the store", || {
        stores.migrations.state().len() == 3
    })
    .await;

    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    assert_eq!(report.decisions.migrations[0].trigger, Trigger::Manual);
    assert_eq!(
        report.decisions.migrations[0].to, "edge-3",
        "the named node"
    );
    assert_eq!(report.refused.len(), 2, "{:#?}", report.refused);

    let taken: Migration = h
        .cluster
        .get(Some(NS), &request.metadata.name.unwrap())
        .unwrap();
    assert_eq!(taken.status.unwrap().state.target, "edge-3");

    let web = refused.metadata.name.unwrap();
    let phase = manual::follow(&api, &web, |_| {}).await.unwrap();
    assert_eq!(phase, Phase::Failed);
    let status = h
        .cluster
        .get::<Migration>(Some(NS), &web)
        .unwrap()
        .status
        .unwrap();
    assert!(status.state.message.unwrap().contains("not protected"));
    let ghost = h
        .cluster
        .get::<Migration>(Some(NS), &missing.metadata.name.unwrap())
        .unwrap();
    assert!(
        ghost
            .status
            .unwrap()
            .state
            .message
            .unwrap()
            .contains("does not exist")
    );
    assert!(
        h.has_event(&web, "Refused") || {
            eventually("Refused event", || h.has_event(&web, "Refused")).await;
            true
        }
    );
}

#[tokio::test]
async fn periodic_checkpoints_are_taken_replicated_and_recorded_on_the_pod() {
    let h = Harness::new().await;
    healthy_cluster(&h, "checkpoint:\n  interval: 1m\n  replicateTo: 1\n").await;
    let now = at(0);
    h.agent.set_now(now);
    let report = h.controller.decider.pass(now).await.unwrap();
    assert_eq!(
        report.checkpoints.len(),
        1,
        "the last checkpoint is 5 m old: {report:#?}"
    );
    let decision = &report.checkpoints[0];
    assert_eq!(decision.node, "edge-2");
    assert_eq!(decision.replicate_to.len(), 1);
    let done = h.controller.checkpoints.run(decision).await.unwrap();
    assert!(done.replica_failures.is_empty());
    assert_eq!(done.info.held_on.len(), 2);

    let pod: Pod = h.cluster.get(Some(NS), "trainer").unwrap();
    let recorded: CheckpointInfo =
        serde_json::from_str(&pod.metadata.annotations.unwrap()[LATEST_CHECKPOINT]).unwrap();
    assert_eq!(recorded, done.info);
    assert_eq!(recorded.id, "trainer-ck-1");
    assert_eq!(units::age(now, recorded.taken_at), Duration::ZERO);

    // The next pass reads it back from the pod: nothing is due for another minute.
    let stores = h.controller.stores.clone();
    eventually("the store to see the annotation", || {
        stores
            .pod(NS, "trainer")
            .and_then(|pod| automigrate_operator::snapshot::latest_checkpoint(&pod))
            .is_some_and(|info| info.id == "trainer-ck-1" && info.held_on.len() == 2)
    })
    .await;
    let report = h.controller.decider.pass(at(30)).await.unwrap();
    assert!(report.checkpoints.is_empty(), "{report:#?}");
    let _ = PodRef::new(NS, "trainer");
}

#[tokio::test]
async fn a_failed_final_checkpoint_rolls_back_and_the_source_keeps_running() {
    let h = Harness::new().await;
    healthy_cluster(&h, "triggers:\n  alerts: [NodeDiskFailing]\n").await;
    h.agent.fail_checkpoints_on("edge-2");
    assert_eq!(post_alert(&h, ALERT_PAYLOAD).await, StatusCode::OK);
    let now = at(0);
    h.controller.decider.pass(now).await.unwrap();
    let name = h.only_migration().metadata.name.unwrap();

    let ended = h.drive(&name, now, |a| a.phase.is_terminal()).await;
    assert_eq!(ended.phase, Phase::RolledBack);
    let status = h
        .cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        status.state.rollback,
        Some(automigrate_core::migration::RollbackAction::KeepSource)
    );
    assert!(status.state.message.unwrap().contains("criu dump failed"));
    assert!(
        h.cluster.get::<Pod>(Some(NS), "trainer").is_some(),
        "the source was never stopped"
    );
    let writes = calls(&h.cluster);
    assert!(
        !writes.iter().any(|w| w.contains("/pods")),
        "no pod written: {writes:#?}"
    );
    eventually("the rollback events", || {
        h.has_event(&name, "RolledBack") && h.has_event("trainer", "MigrationRolledBack")
    })
    .await;
}

#[tokio::test]
async fn pods_of_controllers_that_recreate_them_are_not_migrated() {
    let h = Harness::new().await;
    h.cluster.put(&node("edge-1", "True", at(-3600)));
    h.cluster.put(&node("edge-2", "Unknown", at(-60)));
    h.cluster.put(&lease("edge-1", at(0)));
    let mut pod = protected_pod("web-0", "edge-2", &[]);
    pod.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            name: "web".into(),
            uid: "sts-uid".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    ]);
    h.cluster.put(&pod);
    h.settle(2, 1).await;
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(
        report.decisions.migrations.len(),
        1,
        "the engine would move it"
    );
    assert!(report.started.is_empty());
    assert!(
        h.migrations().is_empty(),
        "but the controller does not fight the StatefulSet"
    );
    eventually("the OwnerNotSupported event", || {
        h.has_event("web-0", "OwnerNotSupported")
    })
    .await;
}

/// Cooldown follows the workload across the renames its migrations make. A manual migration
/// moves `trainer` to edge-3 (the replacement is `trainer-<suffix>`); six minutes later an
/// alert fires for edge-3. The policy's 10 m cooldown holds the workload where it is: it was
/// looked up by pod name, and the renamed pod had no history, so the alert moved it again.
#[tokio::test]
async fn cooldown_follows_the_workload_across_renames() {
    let h = Harness::new().await;
    healthy_cluster(
        &h,
        "triggers:\n  alerts: [NodeDiskFailing]\n  cooldown: 10m\n",
    )
    .await;
    let first = h
        .request_migration("trainer", Some("edge-3"), "maintenance")
        .await;
    let stores = h.controller.stores.clone();
    h.agent.set_now(at(0));
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    h.drive(&first, at(0), |a| a.phase == Phase::Verifying)
        .await;
    let replacement_name = h
        .cluster
        .get::<Migration>(Some(NS), &first)
        .unwrap()
        .status
        .unwrap()
        .replacement_pod
        .unwrap();
    assert_ne!(replacement_name, "trainer", "the migration renames the pod");
    h.kubelet_runs(&replacement_name).await;
    h.drive(&first, at(0), |a| a.phase == Phase::Succeeded)
        .await;
    eventually("the store to show the moved workload", || {
        stores.pod(NS, "trainer").is_none()
            && stores
                .pod(NS, &replacement_name)
                .is_some_and(|pod| automigrate_operator::snapshot::is_ready(&pod))
            && stores
                .migration(NS, &first)
                .is_some_and(|m| m.phase() == Some(Phase::Succeeded))
    })
    .await;

    // Six minutes later the disk of edge-3, where the workload now runs, starts failing.
    let alert = ALERT_PAYLOAD
        .replace("\"node\": \"edge-2\"", "\"node\": \"edge-3\"")
        .replace("2030-01-01T00:00:00Z", "2030-01-01T00:06:00Z");
    h.clock.set(at(360));
    for name in ["edge-1", "edge-2", "edge-3"] {
        h.cluster.put(&lease(name, at(360)));
    }
    h.lease_seen("edge-3", at(360)).await;
    assert_eq!(post_alert(&h, &alert).await, StatusCode::OK);
    let report = h.controller.decider.pass(at(360)).await.unwrap();
    assert!(
        report.decisions.migrations.is_empty(),
        "inside the cooldown: {report:#?}"
    );
    assert!(report.started.is_empty(), "{report:#?}");
    assert_eq!(h.migrations().len(), 1, "no second migration");
    let deferred = report
        .decisions
        .deferred
        .iter()
        .find(|deferral| deferral.pod.name == replacement_name)
        .unwrap_or_else(|| panic!("the renamed pod is deferred: {report:#?}"));
    assert!(deferred.reason.contains("cooldown"), "{}", deferred.reason);

    // Past the cooldown the same alert moves it: the test above is not vacuous.
    h.clock.set(at(660));
    for name in ["edge-1", "edge-2", "edge-3"] {
        h.cluster.put(&lease(name, at(660)));
    }
    h.lease_seen("edge-3", at(660)).await;
    let report = h.controller.decider.pass(at(660)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    assert_eq!(report.decisions.migrations[0].pod.name, replacement_name);
}

/// The fence adds the out-of-service taint without losing a taint the controller's cache has
/// not seen yet. The node watch stalls (the cache keeps edge-2 without taints) while the node
/// lifecycle controller taints edge-2 `unreachable` on the server; writing the whole taint list
/// from the cache as a merge patch dropped that taint.
#[tokio::test]
async fn the_out_of_service_taint_keeps_taints_the_cache_has_not_seen() {
    use automigrate_kube_fake::Fault;
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    let h = Harness::new().await;
    h.cluster.put(&node("edge-1", "True", at(-3600)));
    h.cluster.put(&node("edge-2", "Unknown", at(-120)));
    h.cluster.put(&lease("edge-1", at(0)));
    h.cluster.put(&lease("edge-2", at(-120)));
    h.cluster.put(&protected_pod(
        "trainer",
        "edge-2",
        &[(
            LATEST_CHECKPOINT,
            &checkpoint_annotation("trainer-ck-7", &["edge-2", "edge-1"]),
        )],
    ));
    h.settle(2, 1).await;

    // Node watches fail from now on; the open ones are closed, so the cache goes stale.
    h.cluster.inject_fault(
        Fault::unreachable()
            .path("/api/v1/nodes")
            .watches(true)
            .always(),
    );
    h.cluster.close_watches();
    let mut tainted = node("edge-2", "Unknown", at(-120));
    tainted.spec = Some(NodeSpec {
        taints: Some(vec![Taint {
            key: "node.kubernetes.io/unreachable".into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(at(-100))),
            value: None,
        }]),
        ..NodeSpec::default()
    });
    h.cluster.put(&tainted);
    h.settle(2, 1).await;
    assert!(
        h.controller
            .stores
            .node("edge-2")
            .unwrap()
            .spec
            .clone()
            .and_then(|spec| spec.taints)
            .is_none(),
        "the cache must be stale for this test"
    );

    // The node also changes between the fence's read and its patch once: a conflict, retried.
    h.cluster
        .inject_fault(Fault::status(409).on(http::Method::PATCH, "/api/v1/nodes/edge-2"));
    h.controller.decider.pass(at(0)).await.unwrap();
    let name = h.only_migration().metadata.name.unwrap();
    h.drive(&name, at(0), |a| a.phase == Phase::Verifying).await;

    let server: Node = h.cluster.get(None, "edge-2").unwrap();
    let keys: Vec<String> = server
        .spec
        .unwrap()
        .taints
        .unwrap()
        .into_iter()
        .map(|taint| taint.key)
        .collect();
    assert_eq!(
        keys,
        ["node.kubernetes.io/unreachable", OUT_OF_SERVICE_TAINT],
        "both taints survive"
    );
    let patches: Vec<_> = h
        .cluster
        .requests()
        .into_iter()
        .filter(|r| r.method == http::Method::PATCH && r.path == "/api/v1/nodes/edge-2")
        .collect();
    assert_eq!(patches.len(), 2, "the conflict was retried: {patches:#?}");
    let ops = patches[1].body.clone().unwrap();
    assert_eq!(ops[0]["op"], "test", "guarded by a precondition: {ops}");
    assert_eq!(ops[1]["path"], "/spec/taints/-", "appends only ours: {ops}");
    h.cluster.clear_faults();
}
