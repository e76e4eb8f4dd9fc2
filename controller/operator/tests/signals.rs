//! Latency signals end to end at reconcile level: each source of latency the controller reads
//! reaches the decision pass and moves a pod, through the real reflectors and policy loader
//! against automigrate-kube-fake.
//!
//! - the agents' peer probes (`GET /v1/peers`, the recording double answers) → the latency
//!   trigger;
//! - a pod's `automigrate.dev/user-latency` annotation, updated by a PATCH as a user's gateway
//!   would → the mobility trigger;
//! - the policy's PromQL queries against a stand-in Prometheus on loopback (the real
//!   `prometheus-http-query` client over HTTP) → links and the mobility trigger, and a failing
//!   query keeps the earlier observations until they expire.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_core::decide::Trigger;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::{PeerLatency, RecordingAgent};
use automigrate_operator::controller::Config;
use automigrate_operator::prometheus::PromSignals;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

mod common;
use common::*;

fn peers(list: &[(&str, u64)]) -> Vec<PeerLatency> {
    list.iter()
        .map(|(node, millis)| PeerLatency {
            node: node.to_string(),
            rtt: Duration::from_millis(*millis),
            loss: 0.0,
            answering: None,
        })
        .collect()
}

fn node_names(h: &Harness) -> Vec<String> {
    let mut names: Vec<String> = h
        .controller
        .stores
        .nodes
        .state()
        .iter()
        .filter_map(|node| node.metadata.name.clone())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn agent_probes_over_the_latency_threshold_move_pods_off_the_node() {
    let h = Harness::new().await;
    healthy_cluster(
        &h,
        "triggers:\n  latency: {threshold: 50ms, hysteresis: 15ms}\n",
    )
    .await;
    h.cluster.put(&node("edge-4", "True", at(-3600)));
    h.cluster.put(&lease("edge-4", at(0)));
    h.lease_seen("edge-4", at(0)).await;
    let stores = h.controller.stores.clone();
    eventually("edge-4 in the store", || stores.nodes.state().len() == 4).await;
    h.agent.set_now(at(0));

    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert!(
        report.decisions.migrations.is_empty(),
        "no probes read yet: {report:#?}"
    );

    // edge-2's links are slow in both directions; the others are close to each other.
    h.agent.set_peers(
        "edge-1",
        peers(&[("edge-2", 120), ("edge-3", 4), ("edge-4", 5)]),
    );
    h.agent.set_peers(
        "edge-2",
        peers(&[("edge-1", 120), ("edge-3", 130), ("edge-4", 125)]),
    );
    h.agent.set_peers(
        "edge-3",
        peers(&[("edge-1", 4), ("edge-2", 130), ("edge-4", 6)]),
    );
    h.agent.set_peers(
        "edge-4",
        peers(&[("edge-1", 5), ("edge-2", 125), ("edge-3", 6)]),
    );
    h.controller.refresh_signals(&node_names(&h)).await;
    assert_eq!(h.controller.links.current(at(0)).len(), 12);

    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    let decision = &report.decisions.migrations[0];
    assert_eq!(decision.trigger, Trigger::NodeDegraded);
    assert_eq!(decision.from, "edge-2");
    assert_ne!(decision.to, "edge-2");
    assert!(decision.reason.contains("RTT"), "{}", decision.reason);
    let migration = h.only_migration();
    assert_eq!(migration.spec.trigger, Some(Trigger::NodeDegraded));
}

#[tokio::test]
async fn agent_links_expire_when_the_agents_go_silent() {
    let h = Harness::start_with(
        &FakeCluster::new(),
        &RecordingAgent::new(),
        Config {
            signal_max_age: Some(Duration::from_secs(60)),
            ..Config::default()
        },
    )
    .await;
    healthy_cluster(&h, "{}").await;
    h.agent.set_peers("edge-1", peers(&[("edge-2", 10)]));
    h.controller.refresh_signals(&node_names(&h)).await;
    assert_eq!(h.controller.links.current(at(0)).len(), 1);

    h.agent.unreachable("edge-1");
    h.clock.set(at(45));
    h.controller.refresh_signals(&node_names(&h)).await;
    assert_eq!(
        h.controller.links.current(at(45)).len(),
        1,
        "one missed poll keeps the link"
    );
    assert!(
        h.controller.links.current(at(61)).is_empty(),
        "older than signal_max_age: gone"
    );
}

#[tokio::test]
async fn an_updated_user_latency_annotation_makes_the_pod_follow_its_user() {
    let h = Harness::new().await;
    healthy_cluster(
        &h,
        "triggers:\n  mobility: {threshold: 40ms, hysteresis: 15ms, dwell: 10s}\n",
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(h.cluster.client(), NS);
    let annotate = |value: &str| {
        Patch::Merge(json!({"metadata": {"annotations": {
            "automigrate.dev/user": "alice",
            "automigrate.dev/user-latency": value,
        }}}))
    };
    pods.patch(
        "trainer",
        &PatchParams::default(),
        &annotate("edge-2=10ms, edge-3=60ms"),
    )
    .await
    .unwrap();
    let stores = h.controller.stores.clone();
    let annotated = |value: &'static str| {
        let stores = stores.clone();
        move || {
            stores.pod(NS, "trainer").is_some_and(|pod| {
                pod.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("automigrate.dev/user-latency"))
                    .is_some_and(|v| v == value)
            })
        }
    };
    eventually(
        "the reflector to see the annotation",
        annotated("edge-2=10ms, edge-3=60ms"),
    )
    .await;
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert!(
        report.decisions.migrations.is_empty() && report.decisions.deferred.is_empty(),
        "the user is close to edge-2: {report:#?}"
    );

    // The user moved: their gateway rewrites the annotation.
    pods.patch(
        "trainer",
        &PatchParams::default(),
        &annotate("edge-2=80ms, edge-3=8ms"),
    )
    .await
    .unwrap();
    eventually(
        "the reflector to see the update",
        annotated("edge-2=80ms, edge-3=8ms"),
    )
    .await;
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert!(report.decisions.migrations.is_empty(), "{report:#?}");
    assert_eq!(report.decisions.deferred.len(), 1, "{report:#?}");
    assert_eq!(report.decisions.deferred[0].trigger, Trigger::Mobility);

    let report = h.controller.decider.pass(at(10)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    let decision = &report.decisions.migrations[0];
    assert_eq!(decision.trigger, Trigger::Mobility);
    assert_eq!(
        (decision.from.as_str(), decision.to.as_str()),
        ("edge-2", "edge-3")
    );
    assert!(
        decision.reason.contains("user alice"),
        "{}",
        decision.reason
    );
    assert_eq!(h.only_migration().spec.trigger, Some(Trigger::Mobility));
}

/// A stand-in for Prometheus's `GET /api/v1/query`: answers each query from a table (a vector
/// of `(labels, seconds)`, or an error) and records the queries it was asked.
/// A vector of `(labels, seconds)`, or the error Prometheus reports.
type Answer = Result<Vec<(Value, f64)>, String>;

#[derive(Clone, Default)]
struct FakePrometheus {
    answers: Arc<Mutex<BTreeMap<String, Answer>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

impl FakePrometheus {
    fn answer(&self, query: &str, answer: Answer) {
        self.answers.lock().unwrap().insert(query.into(), answer);
    }

    async fn serve(&self) -> String {
        async fn query(
            State(prometheus): State<FakePrometheus>,
            Query(params): Query<BTreeMap<String, String>>,
        ) -> (StatusCode, Json<Value>) {
            let query = params.get("query").cloned().unwrap_or_default();
            prometheus.asked.lock().unwrap().push(query.clone());
            match prometheus.answers.lock().unwrap().get(&query) {
                Some(Ok(series)) => {
                    let result: Vec<Value> = series
                        .iter()
                        .map(|(labels, value)| {
                            json!({"metric": labels, "value": [1_893_456_000.0, value.to_string()]})
                        })
                        .collect();
                    (
                        StatusCode::OK,
                        Json(
                            json!({"status": "success", "data": {"resultType": "vector", "result": result}}),
                        ),
                    )
                }
                Some(Err(reason)) => (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"status": "error", "errorType": "bad_data", "error": reason})),
                ),
                None => (
                    StatusCode::OK,
                    Json(
                        json!({"status": "success", "data": {"resultType": "vector", "result": []}}),
                    ),
                ),
            }
        }
        let router = axum::Router::new()
            .route("/api/v1/query", get(query))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{address}")
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

const LINK_QUERY: &str = "max by (from, to) (probe_rtt_seconds)";
const USER_QUERY: &str = "avg by (user, node) (user_rtt_seconds{app=\"ml\"})";

#[tokio::test]
async fn policy_promql_feeds_links_and_user_latency() {
    let prometheus = FakePrometheus::default();
    let url = prometheus.serve().await;
    let h = Harness::start_with(
        &FakeCluster::new(),
        &RecordingAgent::new(),
        Config {
            prometheus: Some(PromSignals::new(&url, Duration::from_secs(5)).unwrap()),
            signal_max_age: Some(Duration::from_secs(60)),
            ..Config::default()
        },
    )
    .await;
    let policy = format!(
        "triggers:\n  mobility: {{threshold: 40ms, hysteresis: 15ms, dwell: 0s}}\nsignals:\n  linkLatencyQuery: '{LINK_QUERY}'\n  userLatencyQuery: '{USER_QUERY}'\n"
    );
    healthy_cluster(&h, &policy).await;
    let pods: Api<Pod> = Api::namespaced(h.cluster.client(), NS);
    pods.patch(
        "trainer",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"automigrate.dev/user": "bob"}}})),
    )
    .await
    .unwrap();
    let stores = h.controller.stores.clone();
    eventually("the reflector to see the user", || {
        stores.pod(NS, "trainer").is_some_and(|pod| {
            pod.metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key("automigrate.dev/user")
        })
    })
    .await;

    prometheus.answer(
        LINK_QUERY,
        Ok(vec![
            (json!({"from": "edge-1", "to": "edge-2"}), 0.004),
            (json!({"from": "edge-2", "to": "edge-3"}), 0.007),
            (json!({"to": "edge-3"}), 0.5),
        ]),
    );
    prometheus.answer(
        USER_QUERY,
        Ok(vec![
            (json!({"user": "bob", "node": "edge-2"}), 0.090),
            (json!({"user": "bob", "node": "edge-3"}), 0.012),
        ]),
    );
    h.controller.refresh_signals(&node_names(&h)).await;
    assert_eq!(prometheus.asked(), [LINK_QUERY, USER_QUERY]);
    let links: Vec<(String, String, Duration)> = h
        .controller
        .links
        .current(at(0))
        .into_iter()
        .map(|link| (link.from, link.to, link.rtt))
        .collect();
    assert_eq!(
        links,
        [
            ("edge-1".into(), "edge-2".into(), Duration::from_millis(4)),
            ("edge-2".into(), "edge-3".into(), Duration::from_millis(7)),
        ],
        "the series without `from` is skipped"
    );

    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    let decision = &report.decisions.migrations[0];
    assert_eq!(decision.trigger, Trigger::Mobility);
    assert_eq!(
        (decision.from.as_str(), decision.to.as_str()),
        ("edge-2", "edge-3")
    );
    assert!(
        decision.reason.contains("user bob is 90ms"),
        "{}",
        decision.reason
    );

    // Prometheus now rejects the link query: the earlier links stay until they expire.
    prometheus.answer(LINK_QUERY, Err("parse error".into()));
    h.clock.set(at(30));
    h.controller.refresh_signals(&node_names(&h)).await;
    assert_eq!(prometheus.asked().len(), 4);
    assert_eq!(h.controller.links.current(at(30)).len(), 2);
    assert!(h.controller.links.current(at(61)).is_empty());
    assert_eq!(
        h.controller.users.current(at(61)).len(),
        2,
        "the user query still answered at 30 s"
    );
}

/// What one agent says of its peers: each `(peer, answers now)`.
fn reach(list: &[(&str, bool)]) -> Vec<PeerLatency> {
    list.iter()
        .map(|(node, answering)| PeerLatency {
            node: node.to_string(),
            rtt: Duration::from_millis(2),
            loss: 0.0,
            answering: Some(*answering),
        })
        .collect()
}

/// The local cluster's timing: Leases renewed every second, self-fencing safe after 7 s.
fn fast_heartbeat_config() -> Config {
    use automigrate_core::fencing::{FencingMode, SelfFenceTiming};
    let second = Duration::from_secs(1);
    Config {
        heartbeat_interval: second,
        executor: automigrate_operator::executor::ExecutorConfig {
            dead_node_fencing: FencingMode::SelfFence(SelfFenceTiming {
                self_fence_after: 3 * second,
                stop_time: 2 * second,
                clock_skew: second,
                margin: second,
                heartbeat_interval: second,
                check_interval: second,
            }),
            ..Default::default()
        },
        ..Config::default()
    }
}

/// edge-2 (the trainer's node) powers off just after its Lease renewal at 0 s. At 1 s its
/// Lease is not late yet and the reach round asks nobody; at 3 s it is, the round reads the
/// agents, edge-1's and edge-3's both say edge-2 does not answer, and the pass fails edge-2
/// and moves the trainer: 12 s before the 15 s Lease timeout. Fails while the agents'
/// "answers now" does not reach the snapshot (no migration before the Lease timeout) or the
/// reach round does not poll.
#[tokio::test]
async fn a_node_its_peers_lose_is_failed_once_its_lease_is_late() {
    let h = Harness::start_with(
        &FakeCluster::new(),
        &RecordingAgent::new(),
        fast_heartbeat_config(),
    )
    .await;
    healthy_cluster(&h, "triggers: {heartbeatInterval: 1s, leaseTimeout: 15s}").await;
    h.agent
        .set_peers("edge-1", reach(&[("edge-2", false), ("edge-3", true)]));
    h.agent
        .set_peers("edge-3", reach(&[("edge-1", true), ("edge-2", false)]));
    h.agent.unreachable("edge-2");

    h.clock.set(at(1));
    assert!(
        !h.controller.refresh_reach().await,
        "no Lease is late at 1 s"
    );
    assert!(h.controller.links.current(at(1)).is_empty());
    // Every other node renews on time.
    for node in ["edge-1", "edge-3"] {
        h.cluster.put(&lease(node, at(3)));
        h.lease_seen(node, at(3)).await;
    }
    h.clock.set(at(3));
    assert!(h.controller.refresh_reach().await, "edge-2's Lease is late");
    let report = h.controller.decider.pass(at(3)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    let decision = &report.decisions.migrations[0];
    assert_eq!(decision.trigger, Trigger::NodeFailed);
    assert_eq!(decision.from, "edge-2");
    assert!(
        decision
            .reason
            .contains("none of the 2 peers probing it reaches it"),
        "{}",
        decision.reason
    );
}

/// A policy assuming faster renewals than the kubelets make (the controller's
/// `--heartbeat-interval`) is refused in self-fence mode, and the default stays in force:
/// peer-confirmed failure would otherwise fail a node only its peers lost between two
/// renewals. Fails while the loader does not call `SelfFenceTiming::check_policy`.
#[tokio::test]
async fn a_policy_the_self_fencing_rule_cannot_serve_is_refused() {
    let h = Harness::new().await; // default timing: renewals every 10 s
    h.cluster.put(&policy_map(
        "default",
        "triggers: {heartbeatInterval: 1s, leaseTimeout: 15s}",
    ));
    let policies = h.controller.policies.clone();
    eventually("the policy to be refused", || {
        policies
            .read()
            .unwrap()
            .rejected()
            .any(|error| error.to_string().contains("triggers.heartbeatInterval"))
    })
    .await;
    assert!(policies.read().unwrap().get("default").is_none());
}
