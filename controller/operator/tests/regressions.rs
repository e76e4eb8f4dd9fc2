//! Reconcile-level regression tests for issue 15 (the controller run against an API server no
//! one here wrote): each drives the controller's real code against automigrate-kube-fake and
//! failed before its fix.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use automigrate_core::migration::Phase;
use automigrate_kube_fake::{FakeCluster, Fault};
use automigrate_operator::agent::{AgentCall, RecordingAgent};
use automigrate_operator::clock::ManualClock;
use automigrate_operator::controller::{Config, Controller};
use automigrate_operator::crd::Migration;
use automigrate_operator::leader::Leadership;
use automigrate_operator::manual;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use tokio::sync::watch;

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

// Defect 9 (first part): the decision loop ran before the stores had synced, so a pass over an
// empty pod store refused a person's request with "pod does not exist".
#[tokio::test]
async fn the_first_decision_pass_waits_for_every_store() {
    let cluster = FakeCluster::new();
    let agent = RecordingAgent::new();
    cluster.put(&policy_map("default", "{}"));
    for name in ["edge-1", "edge-2", "edge-3"] {
        cluster.put(&node(name, "True", at(-3600)));
        cluster.put(&lease(name, at(0)));
    }
    cluster.put(&protected_pod("trainer", "edge-2", &[]));
    let api: Api<Migration> = Api::namespaced(cluster.client(), NS);
    let request = manual::request(&api, "trainer", Some("edge-3"), "maintenance")
        .await
        .unwrap();
    let name = request.metadata.name.unwrap();
    // The pod list fails until cleared: the pod store cannot sync.
    cluster.inject_fault(
        Fault::status(500)
            .on(http::Method::GET, "/api/v1/pods")
            .always(),
    );
    let controller = Controller::start(
        cluster.client(),
        |_| Arc::new(agent.clone()),
        Leadership::always(),
        Arc::new(ManualClock::new(at(0))),
        Config {
            policy_namespace: POLICY_NS.into(),
            decision_interval: Duration::from_millis(20),
            executor_interval: Duration::from_secs(3600),
            probe_interval: Duration::from_secs(3600),
            ..Config::default()
        },
    );
    let (stop, shutdown) = watch::channel(false);
    let running = {
        let controller = controller.clone();
        tokio::spawn(async move { controller.run(Leadership::always(), shutdown).await })
    };
    // Every other store syncs, and the pod list has failed a few times: without the wait, the
    // loop has run many passes by now.
    let stores = controller.stores.clone();
    eventually("the Migration store to sync", || {
        stores.migrations.state().len() == 1
    })
    .await;
    for _ in 0..3 {
        let seen = cluster.clone();
        eventually("a failed pod list", || {
            seen.requests()
                .iter()
                .filter(|request| request.path == "/api/v1/pods")
                .count()
                >= 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waiting: Migration = cluster.get(Some(NS), &name).unwrap();
    assert!(
        waiting.status.is_none(),
        "decided over an unsynced pod store: {:?}",
        waiting.status.map(|status| status.state.message)
    );

    cluster.clear_faults();
    let seen = cluster.clone();
    eventually("the request to be taken", || {
        seen.get::<Migration>(Some(NS), &name)
            .and_then(|migration| migration.status)
            .is_some()
    })
    .await;
    let taken: Migration = cluster.get(Some(NS), &name).unwrap();
    let state = taken.status.unwrap().state;
    assert_ne!(state.phase, Phase::Failed, "{:?}", state.message);
    assert_eq!(state.target, "edge-3");
    stop.send(true).unwrap();
    running.await.unwrap();
}

// Defect 9 (second part): a live source's dataset is copied by the controller, yet an Event
// said it "will not be moved".
#[tokio::test]
async fn a_dataset_the_migration_moves_is_not_reported_as_left_behind() {
    let h = Harness::new().await;
    healthy_cluster(&h, "triggers:\n  alerts: [NodeDiskFailing]\n").await;
    let now = at(0);
    h.agent.set_now(now);
    h.controller.alerts.record(
        vec![automigrate_core::model::Alert {
            name: "NodeDiskFailing".into(),
            status: automigrate_core::model::AlertStatus::Firing,
            labels: [
                ("alertname".to_string(), "NodeDiskFailing".to_string()),
                ("node".to_string(), "edge-2".to_string()),
            ]
            .into_iter()
            .collect(),
            starts_at: Some(now),
        }],
        now,
    );
    let report = h.controller.decider.pass(now).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    let status = h.only_migration().status.unwrap();
    assert!(status.state.source_alive);
    assert!(
        status
            .transfers
            .iter()
            .any(|transfer| transfer.payload.dataset.as_deref() == Some("/data/esc50")),
        "the dataset is moved: {:?}",
        status.transfers
    );
    let said: Vec<String> = report
        .decisions
        .problems
        .iter()
        .map(|problem| problem.message.clone())
        .chain(
            notes(&h.cluster, "trainer")
                .into_iter()
                .map(|(_, note)| note),
        )
        .collect();
    assert!(
        said.iter().all(|note| !note.contains("will not be moved")),
        "{said:#?}"
    );
}

// Defect 9 (third part): a replacement pod is bound to its node before the kubelet starts it;
// it was checkpointed while it had no status.
#[tokio::test]
async fn a_pod_that_is_not_running_yet_is_not_checkpointed() {
    let h = Harness::new().await;
    healthy_cluster(&h, "checkpoint:\n  interval: 1m\n").await;
    let mut fresh = protected_pod("trainer-5ca520", "edge-3", &[]);
    fresh.status = None;
    h.cluster.put(&fresh);
    h.settle(3, 2).await;
    let now = at(0);
    h.agent.set_now(now);
    let report = h.controller.decider.pass(now).await.unwrap();
    let decision = report
        .checkpoints
        .iter()
        .find(|decision| decision.pod.name == "trainer-5ca520");
    if let Some(decision) = decision {
        let result = h.controller.checkpoints.run(decision).await;
        let error = result.expect_err("a pod with no status is not dumped");
        assert!(error.to_string().contains("not running"), "{error}");
    }
    let running = report
        .checkpoints
        .iter()
        .find(|decision| decision.pod.name == "trainer")
        .expect("the running pod is due");
    h.controller.checkpoints.run(running).await.unwrap();
    let dumped: Vec<String> = h
        .agent
        .calls()
        .into_iter()
        .filter_map(|call| match call {
            AgentCall::Checkpoint { pod, .. } => Some(pod.name),
            _ => None,
        })
        .collect();
    assert_eq!(dumped, vec!["trainer".to_string()], "only the running pod");
    let untouched: Pod = h.cluster.get(Some(NS), "trainer-5ca520").unwrap();
    assert!(untouched.status.is_none());
}

/// A client whose every pod list also carries a pod without a name, as the API server the
/// issue was found on once sent.
#[derive(Clone)]
struct NamelessPodInLists {
    inner: automigrate_kube_fake::FakeService,
}

impl tower::Service<http::Request<kube::client::Body>> for NamelessPodInLists {
    type Response = http::Response<axum::body::Body>;
    type Error = automigrate_kube_fake::BoxError;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let list = request.method() == http::Method::GET
            && request.uri().path() == "/api/v1/pods"
            && !request.uri().query().unwrap_or_default().contains("watch=");
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let response = tower::Service::call(&mut inner, request).await?;
            let (mut parts, body) = response.into_parts();
            let body = axum::body::Body::new(body);
            if !list || parts.status != http::StatusCode::OK {
                return Ok(http::Response::from_parts(parts, body));
            }
            let bytes = axum::body::to_bytes(body, usize::MAX).await?;
            let mut value: serde_json::Value = serde_json::from_slice(&bytes)?;
            if let Some(items) = value["items"].as_array_mut() {
                items.push(serde_json::json!({
                    "metadata": {"namespace": NS, "annotations": {"automigrate.dev/protect": "true"}},
                    "spec": {"nodeName": "edge-1", "containers": [{"name": "x"}]},
                }));
            }
            parts.headers.remove(http::header::CONTENT_LENGTH);
            Ok(http::Response::from_parts(
                parts,
                axum::body::Body::from(serde_json::to_vec(&value)?),
            ))
        })
    }
}

// Defect 8 (first part): an object without a name made kube's reflector panic, which killed the
// pod watch for good while the process kept running.
#[tokio::test]
async fn an_object_without_a_name_does_not_kill_the_pod_watch() {
    let cluster = FakeCluster::new();
    healthy_objects(&cluster);
    let client = kube::Client::new(
        NamelessPodInLists {
            inner: cluster.service(),
        },
        "default",
    );
    let controller = Controller::start(
        client,
        |_| Arc::new(RecordingAgent::new()),
        Leadership::always(),
        Arc::new(ManualClock::new(at(0))),
        Config {
            policy_namespace: POLICY_NS.into(),
            ..Config::default()
        },
    );
    tokio::time::timeout(Duration::from_secs(10), controller.stores.ready())
        .await
        .expect("the stores sync despite the nameless pod")
        .expect("no store writer was dropped");
    assert!(controller.stores.watches.all_running());
    // The watch still follows the cluster.
    cluster.put(&protected_pod("later", "edge-3", &[]));
    let stores = controller.stores.clone();
    eventually("the pod store to see a pod created afterwards", || {
        stores.pod(NS, "later").is_some()
    })
    .await;
    assert_eq!(stores.pods.state().len(), 2, "the nameless pod is not kept");
    let report = controller.decider.pass(at(0)).await.unwrap();
    assert!(report.decisions.problems.is_empty(), "{report:#?}");
}

/// Three healthy nodes with fresh Leases, a default policy and a protected pod on edge-2.
fn healthy_objects(cluster: &FakeCluster) {
    cluster.put(&policy_map("default", "{}"));
    for name in ["edge-1", "edge-2", "edge-3"] {
        cluster.put(&node(name, "True", at(-3600)));
        cluster.put(&lease(name, at(0)));
    }
    cluster.put(&protected_pod("trainer", "edge-2", &[]));
}

// Defect 8 (second part): a watch task that ended left `/readyz` saying ready and was never
// started again.
#[tokio::test]
async fn a_watch_task_that_dies_fails_readyz_and_is_restarted() {
    use automigrate_operator::http::{Readiness, router};
    use automigrate_operator::stores::{WatchHealth, supervise};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    let health = WatchHealth::default();
    let readiness = Readiness::following(health.clone());
    readiness.set_ready();
    let readyz = {
        let app = router(None, readiness.clone(), None);
        move || {
            let app = app.clone();
            async move {
                app.oneshot(
                    http::Request::get("/readyz")
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap()
                .status()
            }
        }
    };
    assert_eq!(readyz().await, http::StatusCode::OK);
    let starts = Arc::new(AtomicUsize::new(0));
    let (dead, mut died) = tokio::sync::mpsc::unbounded_channel::<()>();
    let counted = starts.clone();
    let _supervisor = supervise("pods", health.clone(), move || {
        let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
        let dead = dead.clone();
        async move {
            if first {
                let _ = dead.send(());
                panic!("a watch task panics");
            }
            std::future::pending::<()>().await;
        }
    });
    died.recv().await.unwrap();
    let down = health.clone();
    eventually("the watch marked down", || !down.all_running()).await;
    assert_eq!(health.down(), vec!["pods"]);
    assert_eq!(readyz().await, http::StatusCode::SERVICE_UNAVAILABLE);
    let restarted = starts.clone();
    for _ in 0..10 {
        if restarted.load(Ordering::SeqCst) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(starts.load(Ordering::SeqCst), 2, "started again");
    let up = health.clone();
    eventually("the watch running again", || up.all_running()).await;
    assert_eq!(readyz().await, http::StatusCode::OK);
}

/// A webhook payload with one alert about `node`, `status` "firing" or "resolved".
fn alert_payload(node: &str, status: &str) -> String {
    serde_json::json!({
        "version": "4", "status": status, "receiver": "automigrate",
        "alerts": [{
            "status": status,
            "labels": {"alertname": "NodeDiskFailing", "node": node},
            "startsAt": "2030-01-01T00:00:00Z",
            "endsAt": if status == "resolved" { "2030-01-01T00:05:00Z" } else { "0001-01-01T00:00:00Z" },
        }],
    })
    .to_string()
}

/// POSTs `body` to the webhook of `controller` (whatever its leadership).
async fn post_to(controller: &Controller, clock: &ManualClock, body: String) -> http::StatusCode {
    use tower::ServiceExt;
    let receiver = automigrate_operator::alertmanager::Receiver {
        token: Arc::from("hook-token"),
        book: controller.alerts.clone(),
        clock: Arc::new(clock.clone()),
        wake: controller.wake.clone(),
    };
    automigrate_operator::alertmanager::router(receiver)
        .oneshot(
            http::Request::post(automigrate_operator::alertmanager::PATH)
                .header(http::header::AUTHORIZATION, "Bearer hook-token")
                .body(axum::body::Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap()
        .status()
}

/// A second replica on `cluster` that does not lead.
async fn standby(cluster: &FakeCluster) -> (Controller, ManualClock, watch::Sender<bool>) {
    let clock = ManualClock::new(t0());
    let (leading, receiver) = watch::channel(false);
    let controller = Controller::start(
        cluster.client(),
        |_| Arc::new(RecordingAgent::new()),
        Leadership::from_receiver(receiver),
        Arc::new(clock.clone()),
        Config {
            policy_namespace: POLICY_NS.into(),
            ..Config::default()
        },
    );
    controller.stores.ready().await.unwrap();
    (controller, clock, leading)
}

// Defect 2 (first part): an alert posted to the standby got 200 and nothing happened: it lived
// in the standby's memory only.
#[tokio::test]
async fn an_alert_posted_to_the_standby_is_acted_on_by_the_leader() {
    let h = Harness::new().await;
    healthy_cluster(&h, "triggers:\n  alerts: [NodeDiskFailing]\n").await;
    let (standby, standby_clock, _leading) = standby(&h.cluster).await;
    let now = at(0);
    h.agent.set_now(now);

    assert_eq!(
        post_to(&standby, &standby_clock, alert_payload("edge-2", "firing")).await,
        http::StatusCode::OK
    );
    let book = h.controller.alerts.clone();
    eventually("the leader to hear of the alert", || {
        book.firing(now).len() == 1
    })
    .await;
    let report = h.controller.decider.pass(now).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    assert_eq!(report.decisions.migrations[0].from, "edge-2");
    assert!(
        report.decisions.migrations[0]
            .reason
            .contains("NodeDiskFailing")
    );
    // The standby wrote nothing else: no Migration, no Event of its own.
    assert_eq!(h.migrations().len(), 1);

    // What is kept, and where: one entry, named by a stable fingerprint.
    let stored: k8s_openapi::api::core::v1::ConfigMap = h
        .cluster
        .get(
            Some("automigrate-system"),
            automigrate_operator::alertmanager::ALERTS_CONFIG_MAP,
        )
        .unwrap();
    let data = stored.data.unwrap();
    assert_eq!(data.len(), 1, "{data:?}");
    let entry: serde_json::Value = serde_json::from_str(data.values().next().unwrap()).unwrap();
    assert_eq!(entry["labels"]["node"], "edge-2");
    assert_eq!(entry["startsAt"], "2030-01-01T00:00:00Z");
    assert_eq!(entry["receivedAt"], "2030-01-01T00:00:00Z");

    // Resolved on the standby: the leader forgets it too.
    assert_eq!(
        post_to(
            &standby,
            &standby_clock,
            alert_payload("edge-2", "resolved")
        )
        .await,
        http::StatusCode::OK
    );
    eventually("the leader to hear it resolved", || {
        book.firing(now).is_empty()
    })
    .await;
}

// Defect 2 (second part): after a restart or a failover, firing alerts were forgotten until
// Alertmanager repeated them.
#[tokio::test]
async fn firing_alerts_survive_a_controller_restart() {
    let h = Harness::new().await;
    healthy_cluster(&h, "triggers:\n  alerts: [NodeDiskFailing]\n").await;
    assert_eq!(
        post_to(&h.controller, &h.clock, alert_payload("edge-2", "firing")).await,
        http::StatusCode::OK
    );
    // A new process: nothing of the old one's memory.
    let restarted = Harness::start(&h.cluster, &RecordingAgent::new()).await;
    let now = at(5);
    restarted.agent.set_now(now);
    let book = restarted.controller.alerts.clone();
    eventually("the restarted controller to load the alert", || {
        book.firing(now).len() == 1
    })
    .await;
    let policies = restarted.controller.policies.clone();
    eventually("the policy to load", || {
        policies.read().unwrap().get("default").is_some()
    })
    .await;
    let report = restarted.controller.decider.pass(now).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    // Past the time to live without a repeat, it no longer counts.
    let later = at(4 * 3600 + 1);
    assert!(restarted.controller.alerts.firing(later).is_empty());
}

// Defect 2: a write the API refuses is not answered 200 (Alertmanager would not send it again).
#[tokio::test]
async fn an_alert_that_cannot_be_stored_is_refused_for_a_retry() {
    let h = Harness::new().await;
    healthy_cluster(&h, "{}").await;
    h.cluster.inject_fault(
        Fault::status(403)
            .on(
                http::Method::PATCH,
                "/api/v1/namespaces/automigrate-system/configmaps",
            )
            .always(),
    );
    assert_eq!(
        post_to(&h.controller, &h.clock, alert_payload("edge-2", "firing")).await,
        http::StatusCode::SERVICE_UNAVAILABLE
    );
}

fn pod_reference(name: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(NS.into()),
        uid: Some(format!("uid-{name}")),
        ..Default::default()
    }
}

// Defect 5 (first part): Events sharing an object and a reason were merged, so a second,
// different problem showed only the first note.
#[tokio::test]
async fn a_distinct_problem_gets_its_own_event() {
    use kube::runtime::events::EventType;
    let h = Harness::new().await;
    let writer = h.controller.writer.clone();
    for note in ["first problem", "second problem", "first problem"] {
        writer
            .event(
                pod_reference("trainer"),
                EventType::Warning,
                "AutomigrateProblem",
                note.into(),
                "Decide",
            )
            .await;
    }
    let mut seen = notes(&h.cluster, "trainer");
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                "AutomigrateProblem".to_string(),
                "first problem".to_string()
            ),
            (
                "AutomigrateProblem".to_string(),
                "second problem".to_string()
            ),
        ],
        "one Event per distinct note"
    );
    let repeated = h
        .cluster
        .list::<Event>()
        .into_iter()
        .find(|event| event.note.as_deref() == Some("first problem"))
        .unwrap();
    assert_eq!(
        repeated.series.map(|series| series.count),
        Some(2),
        "the same problem again counts on its Event"
    );
}

// Defect 5 (second part): Events raised on a replica that did not lead were dropped, so a
// policy already broken when the controller started got no Event at all.
#[tokio::test]
async fn events_raised_before_leading_are_published_once_leading() {
    use kube::runtime::events::EventType;
    let cluster = FakeCluster::new();
    cluster.put(&policy_map("broken", "checkpoint: {interval: soon}\n"));
    let (replica, _clock, leading) = standby(&cluster).await;
    replica
        .writer
        .event(
            pod_reference("trainer"),
            EventType::Warning,
            "AutomigrateProblem",
            "raised while standing by".into(),
            "Decide",
        )
        .await;
    assert!(
        cluster.list::<Event>().is_empty(),
        "a standby publishes nothing"
    );

    leading.send(true).unwrap();
    let seen = cluster.clone();
    eventually("the queued Event published", || {
        notes(&seen, "trainer")
            .iter()
            .any(|(_, note)| note == "raised while standing by")
    })
    .await;
    eventually("the broken policy's Event", || {
        !notes(&seen, "broken").is_empty()
    })
    .await;
}

/// One HTTP/1.1 exchange with 127.0.0.1:`port`.
async fn http_exchange(port: u16, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

// Defect 2, as found: two replicas behind one Service; the POST reached the standby, which
// answered 200, and nothing happened.
#[tokio::test]
async fn two_processes_the_standby_receives_the_alert_and_the_leader_migrates() {
    use automigrate_operator::clock::SystemClock;
    use automigrate_operator::run::{Election, run};
    use k8s_openapi::api::coordination::v1::Lease;
    let cluster = FakeCluster::new();
    let now = jiff::Timestamp::now();
    cluster.put(&policy_map(
        "default",
        "triggers:\n  alerts: [NodeDiskFailing]\n",
    ));
    for name in ["edge-1", "edge-2", "edge-3"] {
        cluster.put(&node(
            name,
            "True",
            now - jiff::SignedDuration::from_secs(3600),
        ));
        cluster.put(&lease(name, now));
    }
    cluster.put(&protected_pod("trainer", "edge-2", &[]));
    let config = || Config {
        decision_interval: Duration::from_millis(50),
        executor_interval: Duration::from_secs(3600),
        probe_interval: Duration::from_secs(3600),
        policy_namespace: POLICY_NS.into(),
        ..Config::default()
    };
    let election = |identity: &str| Election {
        namespace: POLICY_NS.into(),
        lease: "automigrate-controller".into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(15),
        retry_period: Duration::from_millis(50),
    };
    let holder = |cluster: &FakeCluster| {
        cluster
            .get::<Lease>(Some(POLICY_NS), "automigrate-controller")
            .and_then(|lease| lease.spec)
            .and_then(|spec| spec.holder_identity)
    };
    let (stop, shutdown) = watch::channel(false);
    let mut ports = Vec::new();
    let mut processes = Vec::new();
    for identity in ["replica-a", "replica-b"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        processes.push(tokio::spawn(run(
            cluster.client(),
            listener,
            Some(election(identity)),
            config(),
            |_| Arc::new(RecordingAgent::new()),
            Some("hook-token".into()),
            None,
            Arc::new(SystemClock),
            shutdown.clone(),
        )));
        let seen = cluster.clone();
        eventually("a leader", || holder(&seen).is_some()).await;
    }
    let standby = if holder(&cluster).as_deref() == Some("replica-a") {
        ports[1]
    } else {
        ports[0]
    };
    for _ in 0..500 {
        if http_exchange(
            standby,
            "GET /readyz HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n",
        )
        .await
        .starts_with("HTTP/1.1 200")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = alert_payload("edge-2", "firing");
    let answer = http_exchange(
        standby,
        &format!(
            "POST /v1/alerts HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer hook-token\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = cluster.clone();
    eventually("the leader to start a Migration", || {
        seen.list::<Migration>()
            .iter()
            .any(|migration| migration.spec.reason.contains("NodeDiskFailing"))
    })
    .await;
    stop.send(true).unwrap();
    for process in processes {
        let _ = tokio::time::timeout(Duration::from_secs(10), process).await;
    }
}

// Defect 5: an Event the API server deleted (its TTL) is published afresh, not patched in vain.
#[tokio::test]
async fn an_expired_event_is_published_again() {
    use kube::runtime::events::EventType;
    let h = Harness::new().await;
    let publish = || {
        h.controller.writer.event(
            pod_reference("trainer"),
            EventType::Warning,
            "AutomigrateProblem",
            "a standing problem".into(),
            "Decide",
        )
    };
    publish().await;
    let first = h.cluster.list::<Event>();
    assert_eq!(first.len(), 1);
    let name = first[0].metadata.name.clone().unwrap();
    assert!(h.cluster.remove::<Event>(Some(NS), &name));
    publish().await;
    let again = h.cluster.list::<Event>();
    assert_eq!(again.len(), 1, "{again:#?}");
    assert_eq!(again[0].note.as_deref(), Some("a standing problem"));
}

// Defect 2: the shared book stays bounded: at most MAX_PERSISTED entries, stale ones pruned.
#[tokio::test]
async fn the_shared_alert_book_stays_bounded() {
    use automigrate_operator::alertmanager::{ALERTS_CONFIG_MAP, MAX_PERSISTED};
    let h = Harness::new().await;
    let alerts: Vec<serde_json::Value> = (0..MAX_PERSISTED + 100)
        .map(|i| {
            serde_json::json!({
                "status": "firing",
                "labels": {"alertname": "NodeDiskFailing", "node": format!("node-{i}")},
            })
        })
        .collect();
    let body = serde_json::json!({"version": "4", "alerts": alerts}).to_string();
    assert_eq!(
        post_to(&h.controller, &h.clock, body).await,
        http::StatusCode::OK
    );
    let stored = || {
        h.cluster
            .get::<k8s_openapi::api::core::v1::ConfigMap>(
                Some("automigrate-system"),
                ALERTS_CONFIG_MAP,
            )
            .and_then(|map| map.data)
            .unwrap_or_default()
    };
    assert_eq!(stored().len(), MAX_PERSISTED);

    // Past the time to live, the next payload prunes every stale entry.
    h.clock.set(at(4 * 3600 + 1));
    let book = h.controller.alerts.clone();
    eventually("the store to show the book", || {
        book.firing(at(0)).len() == MAX_PERSISTED
    })
    .await;
    assert_eq!(
        post_to(&h.controller, &h.clock, alert_payload("edge-1", "firing")).await,
        http::StatusCode::OK
    );
    let left = stored();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left.values().all(|entry| entry.contains("edge-1")));
}
