//! Reconcile-level regression tests for issue 15 (the controller run against an API server no
//! one here wrote): each drives the controller's real code against automigrate-kube-fake and
//! failed before its fix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use automigrate_kube_fake::FakeCluster;
use k8s_openapi::api::events::v1::Event;

mod common;
use common::*;

/// The notes of every Event about `object`, with their reasons.
fn notes(cluster: &FakeCluster, object: &str) -> Vec<(String, String)> {
    cluster
        .list::<Event>()
        .into_iter()
        .filter(|event| event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .map(|event| {
            (
                event.reason.unwrap_or_default(),
                event.note.unwrap_or_default(),
            )
        })
        .collect()
}

// Defect 4: a pod without the exact `protect` key was skipped before its annotations were read,
// so `automigrate.dev/protected: "true"` (the typo the README promises is never ignored) was.
#[tokio::test]
async fn a_misspelled_protect_key_is_reported_on_the_pod() {
    let h = Harness::new().await;
    healthy_cluster(&h, "{}").await;
    let mut typo = protected_pod("typo", "edge-1", &[]);
    typo.metadata.annotations = Some(
        [("automigrate.dev/protected".to_string(), "true".to_string())]
            .into_iter()
            .collect(),
    );
    h.cluster.put(&typo);
    let mut plain = protected_pod("plain", "edge-1", &[]);
    plain.metadata.annotations = None;
    h.cluster.put(&plain);
    h.settle(3, 3).await;

    let report = h.controller.decider.pass(at(0)).await.unwrap();
    let problems: Vec<&str> = report
        .decisions
        .problems
        .iter()
        .filter(|problem| problem.pod.as_ref().is_some_and(|pod| pod.name == "typo"))
        .map(|problem| problem.message.as_str())
        .collect();
    assert_eq!(problems.len(), 1, "{:#?}", report.decisions.problems);
    assert!(
        problems[0].contains("automigrate.dev/protected"),
        "{}",
        problems[0]
    );
    assert!(
        report
            .decisions
            .problems
            .iter()
            .all(|problem| problem.pod.as_ref().is_none_or(|pod| pod.name != "plain")),
        "a pod with no automigrate.dev/ key is not the controller's business"
    );
    let cluster = h.cluster.clone();
    eventually("an Event on the pod", || {
        notes(&cluster, "typo")
            .iter()
            .any(|(reason, note)| reason == "AutomigrateProblem" && note.contains("protected"))
    })
    .await;
    assert!(
        report.decisions.migrations.is_empty() && report.checkpoints.len() <= 1,
        "the typo does not protect the pod: {report:#?}"
    );
    assert!(
        report.checkpoints.iter().all(|c| c.pod.name != "typo"),
        "{report:#?}"
    );
}
