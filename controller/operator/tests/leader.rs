//! Leader election over a Lease and the writer's leadership gate, against the in-process API
//! server, with an explicit clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use automigrate_kube_fake::FakeCluster;
use automigrate_operator::clock::ManualClock;
use automigrate_operator::leader::{LeaderElector, Leadership};
use automigrate_operator::writer::{WriteError, Writer};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectMeta;
use kube::runtime::events::Reporter;
use tokio::sync::watch;

const NS: &str = "automigrate-system";

fn elector(cluster: &FakeCluster, identity: &str, clock: &ManualClock) -> LeaderElector {
    LeaderElector::new(
        cluster.client(),
        NS,
        "automigrate-controller",
        identity,
        Duration::from_secs(15),
        Arc::new(clock.clone()),
    )
}

fn holder(cluster: &FakeCluster) -> (Option<String>, Option<i32>) {
    let lease: Lease = cluster.get(Some(NS), "automigrate-controller").unwrap();
    let spec = lease.spec.unwrap();
    (spec.holder_identity, spec.lease_transitions)
}

#[tokio::test]
async fn one_leader_until_its_lease_expires() {
    let cluster = FakeCluster::new();
    let clock = ManualClock::new("2030-01-01T00:00:00Z".parse().unwrap());
    let a = elector(&cluster, "replica-a", &clock);
    let b = elector(&cluster, "replica-b", &clock);

    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "a free Lease is taken"
    );
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "a held Lease is not"
    );
    assert_eq!(holder(&cluster), (Some("replica-a".into()), Some(0)));

    clock.advance(Duration::from_secs(10));
    assert!(a.try_acquire_or_renew().await.unwrap(), "the holder renews");
    clock.advance(Duration::from_secs(10));
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "renewed 10 s ago: still held"
    );

    // a stops renewing; once 15 s have passed since its last renewal, b takes over.
    clock.advance(Duration::from_secs(6));
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&cluster), (Some("replica-b".into()), Some(1)));
    assert!(
        !a.try_acquire_or_renew().await.unwrap(),
        "the old leader does not get it back"
    );

    // A graceful shutdown hands the Lease over at once.
    b.release().await.unwrap();
    assert_eq!(holder(&cluster).0, None);
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&cluster), (Some("replica-a".into()), Some(2)));
}

#[tokio::test]
async fn a_racing_replica_loses_on_the_resource_version() {
    let cluster = FakeCluster::new();
    let clock = ManualClock::new("2030-01-01T00:00:00Z".parse().unwrap());
    let a = elector(&cluster, "replica-a", &clock);
    let b = elector(&cluster, "replica-b", &clock);
    // Both see an expired Lease at the same moment; only one replace can win.
    assert!(a.try_acquire_or_renew().await.unwrap());
    clock.advance(Duration::from_secs(60));
    let (first, second) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let wins = [first.unwrap(), second.unwrap()];
    assert_eq!(wins.iter().filter(|won| **won).count(), 1, "{wins:?}");
}

#[tokio::test]
async fn the_writer_refuses_every_write_without_leadership() {
    let cluster = FakeCluster::new();
    let (sender, receiver) = watch::channel(false);
    let writer = Writer::spawn(
        cluster.client(),
        Leadership::from_receiver(receiver),
        Reporter {
            controller: "test".into(),
            instance: None,
        },
    );
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    };
    let refused = writer.create_pod(pod.clone()).await.unwrap_err();
    assert!(matches!(refused, WriteError::NotLeader), "{refused}");
    assert!(
        cluster.requests().is_empty(),
        "nothing reached the API server"
    );

    sender.send(true).unwrap();
    writer.create_pod(pod).await.unwrap();
    assert!(cluster.get::<Pod>(Some("default"), "p").is_some());
}
