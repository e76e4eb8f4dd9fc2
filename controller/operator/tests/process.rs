//! The whole controller process (`run`: leader election, the loops on the system clock, the
//! HTTP endpoints on a real socket, orderly stop) against the in-process API server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use automigrate_core::migration::Phase;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::RecordingAgent;
use automigrate_operator::clock::SystemClock;
use automigrate_operator::controller::Config;
use automigrate_operator::crd::Migration;
use automigrate_operator::run::{Election, Stopped, run};
use automigrate_operator::snapshot::NODE_LEASE_NAMESPACE;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Container, Node, NodeCondition, NodeStatus, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const NS: &str = "automigrate-system";

async fn http(port: u16, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

async fn get(port: u16, path: &str) -> String {
    http(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: controller\r\nConnection: close\r\n\r\n"),
    )
    .await
}

async fn eventually_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn ago(seconds: i64) -> Timestamp {
    Timestamp::now() - SignedDuration::from_secs(seconds)
}

fn node(name: &str, ready: &str, since: Timestamp) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(NodeStatus {
            allocatable: Some(BTreeMap::from([
                ("cpu".into(), Quantity("8".into())),
                ("memory".into(), Quantity("32Gi".into())),
            ])),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: ready.into(),
                last_transition_time: Some(Time(since)),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
    }
}

fn node_lease(name: &str, renewed: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NODE_LEASE_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }),
    }
}

fn election(identity: &str) -> Election {
    Election {
        namespace: NS.into(),
        lease: "automigrate-controller".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        retry_period: Duration::from_millis(50),
    }
}

fn fast_config() -> Config {
    Config {
        decision_interval: Duration::from_millis(50),
        executor_interval: Duration::from_millis(50),
        probe_interval: Duration::from_secs(3600),
        policy_namespace: NS.into(),
        ..Config::default()
    }
}

fn lease_holder(cluster: &FakeCluster) -> Option<String> {
    cluster
        .get::<Lease>(Some(NS), "automigrate-controller")
        .and_then(|lease| lease.spec)
        .and_then(|spec| spec.holder_identity)
}

#[tokio::test]
async fn the_process_leads_serves_migrates_and_stops_cleanly() {
    let cluster = FakeCluster::new();
    cluster.put(&node("edge-1", "True", ago(3600)));
    cluster.put(&node("edge-2", "Unknown", ago(120)));
    cluster.put(&node_lease("edge-1", Timestamp::now()));
    cluster.put(&node_lease("edge-2", ago(120)));
    cluster.put(&Pod {
        metadata: ObjectMeta {
            name: Some("trainer".into()),
            namespace: Some("ml".into()),
            uid: Some("uid-trainer".into()),
            annotations: Some(BTreeMap::from([(
                "automigrate.dev/protect".into(),
                "true".into(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some("edge-2".into()),
            containers: vec![Container {
                name: "train".into(),
                image: Some("python:3.11".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    });

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (shutdown, receiver) = watch::channel(false);
    let agent = RecordingAgent::new();
    let process = tokio::spawn(run(
        cluster.client(),
        listener,
        Some(election("replica-a")),
        fast_config(),
        move |_| Arc::new(agent),
        Some("hook-token".into()),
        None,
        Arc::new(SystemClock),
        receiver,
    ));

    eventually_async("/readyz to answer 200", || async {
        get(port, "/readyz").await.starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(get(port, "/healthz").await.starts_with("HTTP/1.1 200"));
    let unauthorized = http(
        port,
        "POST /v1/alerts HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert!(unauthorized.starts_with("HTTP/1.1 401"), "{unauthorized}");
    let cluster_for_lease = cluster.clone();
    eventually_async("the leader Lease", || {
        let cluster = cluster_for_lease.clone();
        async move { lease_holder(&cluster).as_deref() == Some("replica-a") }
    })
    .await;

    // The loops run on their own: the dead node's pod gets a Migration and a replacement
    // (no checkpoint exists, so it starts fresh on edge-1), which waits for a kubelet.
    let cluster_for_pods = cluster.clone();
    eventually_async("the replacement pod", || {
        let cluster = cluster_for_pods.clone();
        async move {
            cluster
                .list::<Pod>()
                .iter()
                .any(|pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("edge-1"))
        }
    })
    .await;
    // The driver records Verifying in a write after the one that created the pod.
    let cluster_for_phase = cluster.clone();
    eventually_async("the Migration in Verifying", || {
        let cluster = cluster_for_phase.clone();
        async move {
            cluster
                .list::<Migration>()
                .iter()
                .any(|migration| migration.phase() == Some(Phase::Verifying))
        }
    })
    .await;
    assert_eq!(cluster.list::<Migration>().len(), 1);

    shutdown.send(true).unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), process)
        .await
        .expect("the process stops")
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Stopped::Requested);
    assert_eq!(
        lease_holder(&cluster),
        None,
        "the Lease is released on the way out"
    );
}

#[tokio::test]
async fn the_process_stops_when_another_replica_takes_the_lease() {
    let cluster = FakeCluster::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_shutdown, receiver) = watch::channel(false);
    let process = tokio::spawn(run(
        cluster.client(),
        listener,
        Some(election("replica-a")),
        fast_config(),
        |_| Arc::new(RecordingAgent::new()),
        None,
        None,
        Arc::new(SystemClock),
        receiver,
    ));
    let cluster_for_lease = cluster.clone();
    eventually_async("the leader Lease", || {
        let cluster = cluster_for_lease.clone();
        async move { lease_holder(&cluster).as_deref() == Some("replica-a") }
    })
    .await;
    // Someone else writes itself into the Lease (as after a partition from the API server).
    let mut lease: Lease = cluster.get(Some(NS), "automigrate-controller").unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("replica-b".into());
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    cluster.put(&lease);
    let stopped = tokio::time::timeout(Duration::from_secs(10), process)
        .await
        .expect("the process stops")
        .unwrap()
        .unwrap();
    assert_eq!(stopped, Stopped::LostLeadership);
    assert_eq!(
        lease_holder(&cluster).as_deref(),
        Some("replica-b"),
        "not released: not ours"
    );
}
