//! The controller's Prometheus series, read from the process-wide recorder: a deleted pod
//! loses its checkpoint-age series, a standby exports `automigrate_leader 0`, and Failed
//! migrations stay counted until deleted.
//!
//! These tests have their own binary because the recorder is global: any controller running
//! in the same process writes the same unlabelled gauges (`automigrate_leader`,
//! `automigrate_migrations_failed`). Here no other test runs a controller, and [`serial`]
//! keeps these from running at the same time as each other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use automigrate_core::migration::Phase;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::clock::ManualClock;
use automigrate_operator::crd::Migration;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{Mutex, MutexGuard, watch};

mod common;
use common::*;

/// Held for a whole test, so no other test of this binary writes the recorder meanwhile.
async fn serial() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());
    ONE_AT_A_TIME.lock().await
}

/// This binary's Prometheus recorder, with gauges dropped after 1 s without a write (long
/// enough that a loaded machine does not drop one between a pass and the render that reads it).
fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        automigrate_operator::metrics::install_with(Duration::from_secs(1)).unwrap()
    })
}

// Defect 6: `automigrate_checkpoint_age_seconds` kept a frozen series for every deleted pod, so
// the alert rule on it could fire for ever.
#[tokio::test]
async fn a_deleted_pod_loses_its_checkpoint_age_series() {
    let _serial = serial().await;
    let metrics = recorder();
    let h = Harness::new().await;
    healthy_cluster(&h, "checkpoint:\n  interval: 1h\n").await;
    h.cluster.put(&protected_pod(
        "vanishing",
        "edge-1",
        &[(
            automigrate_operator::snapshot::LATEST_CHECKPOINT,
            &checkpoint_annotation("vanishing-ck-1", &["edge-1"]),
        )],
    ));
    h.settle(3, 2).await;
    let series = "automigrate_checkpoint_age_seconds{namespace=\"ml\",pod=\"vanishing\"}";
    h.controller.decider.pass(at(0)).await.unwrap();
    assert!(metrics.render().contains(series), "{}", metrics.render());

    h.cluster.remove::<Pod>(Some(NS), "vanishing");
    h.settle(3, 1).await;
    h.controller.decider.pass(at(10)).await.unwrap();
    let mut rendered = metrics.render();
    for _ in 0..100 {
        if !rendered.contains(series) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rendered = metrics.render();
    }
    assert!(!rendered.contains(series), "still exported:\n{rendered}");
}

// Defect 6: a standby exported no `automigrate_leader` series.
#[tokio::test]
async fn a_standby_exports_leader_zero() {
    use automigrate_operator::leader::LeaderElector;
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    let _serial = serial().await;
    let metrics = recorder();
    let cluster = FakeCluster::new();
    cluster.put(&Lease {
        metadata: ObjectMeta {
            name: Some("automigrate-controller".into()),
            namespace: Some("automigrate-system".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("replica-a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t0())),
            ..LeaseSpec::default()
        }),
    });
    let (stop, shutdown) = watch::channel(false);
    let (leadership, task) = LeaderElector::new(
        cluster.client(),
        "automigrate-system",
        "automigrate-controller",
        "replica-b",
        Duration::from_secs(15),
        Arc::new(ManualClock::new(t0())),
    )
    .spawn(Duration::from_millis(20), shutdown);
    let lease = cluster.clone();
    eventually("a few election rounds", || {
        lease
            .requests()
            .iter()
            .filter(|request| request.path.ends_with("/leases/automigrate-controller"))
            .count()
            >= 3
    })
    .await;
    assert!(!leadership.is_leader());
    let rendered = metrics.render();
    assert!(
        rendered.lines().any(|line| line == "automigrate_leader 0"),
        "{rendered}"
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

// Defect 1's rule "`Failed` raises an alert": the counter-based alert cleared itself 15 minutes
// after the migration ended, although a Failed migration waits for a person. The gauge counts
// Failed migrations that began to act until they are deleted; a refused request is not one.
#[tokio::test]
async fn failed_migrations_stay_counted_until_deleted() {
    let _serial = serial().await;
    let metrics = recorder();
    let h = Harness::new().await;
    healthy_cluster(&h, "{}").await;
    h.settle(3, 1).await;
    let refused_name = h.request_migration("ghost", None, "").await;
    let stores = h.controller.stores.clone();
    h.controller.decider.pass(at(0)).await.unwrap();
    let mut stuck: Migration = h.cluster.get(Some(NS), &refused_name).unwrap();
    let status = stuck.status.as_ref().unwrap();
    assert_eq!(status.state.phase, Phase::Failed, "refused: {status:?}");

    let gauge = |value: &str| format!("automigrate_migrations_failed {value}");
    h.controller.decider.pass(at(10)).await.unwrap();
    assert!(
        metrics.render().contains(&gauge("0")),
        "a refused request is not counted:\n{}",
        metrics.render()
    );

    // The same Migration as if it had begun: Syncing in its history before Failed.
    stuck.metadata.name = Some("began-then-failed".into());
    stuck.metadata.resource_version = None;
    stuck.metadata.uid = None;
    if let Some(status) = stuck.status.as_mut()
        && let Some(first) = status.state.history.first().cloned()
    {
        let mut syncing = first;
        syncing.phase = Phase::Syncing;
        status.state.history.push(syncing);
    }
    h.cluster.put(&stuck);
    eventually("the failed migration to reach the store", || {
        stores.migrations.state().len() == 2
    })
    .await;
    for second in [20, 2_000] {
        h.controller.decider.pass(at(second)).await.unwrap();
        assert!(
            metrics.render().contains(&gauge("1")),
            "counted at {second}s:\n{}",
            metrics.render()
        );
    }

    h.cluster.remove::<Migration>(Some(NS), "began-then-failed");
    eventually("the deletion to reach the store", || {
        stores.migrations.state().len() == 1
    })
    .await;
    h.controller.decider.pass(at(2_010)).await.unwrap();
    assert!(
        metrics.render().contains(&gauge("0")),
        "{}",
        metrics.render()
    );
}
