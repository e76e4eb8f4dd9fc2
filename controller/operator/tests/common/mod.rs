//! What the reconcile-level tests share: objects as a kubelet and an administrator would write
//! them (nodes, Leases, protected pods, policy ConfigMaps), times relative to a fixed start, and
//! a [`Harness`] that starts the controller's real code against automigrate-kube-fake with the
//! recording agent double.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use automigrate_core::model::{CheckpointInfo, PodRef};
use automigrate_core::units::Bytes;
use automigrate_kube_fake::FakeCluster;
use automigrate_operator::agent::{CheckpointTaken, NodeAgent, RecordingAgent};
use automigrate_operator::clock::ManualClock;
use automigrate_operator::controller::{Config, Controller};
use automigrate_operator::crd::{Migration, MigrationStatus};
use automigrate_operator::executor::Advanced;
use automigrate_operator::leader::Leadership;
use automigrate_operator::snapshot::{LATEST_CHECKPOINT, NODE_LEASE_NAMESPACE};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, NodeCondition, NodeStatus, Pod, PodCondition, PodSpec, PodStatus,
    ResourceRequirements,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};

pub const NS: &str = "ml";
pub const POLICY_NS: &str = "automigrate-system";

pub fn t0() -> Timestamp {
    "2030-01-01T00:00:00Z".parse().unwrap()
}

pub fn at(seconds: i64) -> Timestamp {
    t0().checked_add(jiff::SignedDuration::from_secs(seconds))
        .unwrap()
}

pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn node(name: &str, ready: &str, since: Timestamp) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/hostname".into(),
                name.into(),
            )])),
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

pub fn lease(node: &str, renewed: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(node.into()),
            namespace: Some(NODE_LEASE_NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }),
    }
}

pub fn checkpoint_annotation(id: &str, held_on: &[&str]) -> String {
    serde_json::to_string(&CheckpointInfo {
        id: id.into(),
        taken_at: at(-300),
        size: Bytes(1 << 20),
        freeze: Some(Duration::from_millis(400)),
        held_on: held_on.iter().map(|node| node.to_string()).collect(),
        epoch: Some(41),
    })
    .unwrap()
}

/// The agent on `node` holds a verified copy of the trainer's checkpoint `id` (taken at
/// -300 s, 1 MiB, a 400 ms freeze): a replica the pod's annotation may not name.
pub fn holds_verified(agent: &RecordingAgent, node: &str, id: &str) {
    agent.holds(
        node,
        &PodRef::new(NS, "trainer"),
        CheckpointTaken {
            id: id.into(),
            created_at: at(-300),
            bytes: 1 << 20,
            freeze: Duration::from_millis(400),
            verified: true,
        },
    );
}

pub fn protected_pod(name: &str, node: &str, extra: &[(&str, &str)]) -> Pod {
    let mut annotations =
        BTreeMap::from([("automigrate.dev/protect".to_string(), "true".to_string())]);
    for (key, value) in extra {
        annotations.insert(key.to_string(), value.to_string());
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(BTreeMap::from([("app".into(), "trainer".into())])),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            containers: vec![Container {
                name: "train".into(),
                image: Some("python:3.11".into()),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".into(), Quantity("1".into())),
                        ("memory".into(), Quantity("2Gi".into())),
                    ])),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..PodStatus::default()
        }),
    }
}

pub fn policy_map(name: &str, yaml: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(POLICY_NS.into()),
            labels: Some(BTreeMap::from([(
                "automigrate.dev/policy".into(),
                "true".into(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("policy.yaml".into(), yaml.into())])),
        ..ConfigMap::default()
    }
}

pub struct Harness {
    pub cluster: FakeCluster,
    pub agent: RecordingAgent,
    pub clock: ManualClock,
    pub controller: Controller,
}

impl Harness {
    /// Asks for a migration of `pod` as `kubectl migrate` does (a Migration without status)
    /// and waits until the controller's store holds it; returns its name.
    pub async fn request_migration(&self, pod: &str, to: Option<&str>, reason: &str) -> String {
        let api: kube::Api<Migration> = kube::Api::namespaced(self.cluster.clone().client(), NS);
        let name = automigrate_operator::manual::request(&api, pod, to, reason)
            .await
            .unwrap()
            .metadata
            .name
            .unwrap();
        let stores = self.controller.stores.clone();
        eventually("the request to reach the store", || {
            stores.migration(NS, &name).is_some()
        })
        .await;
        name
    }

    pub async fn start(cluster: &FakeCluster, agent: &RecordingAgent) -> Self {
        Self::start_with(cluster, agent, Config::default()).await
    }

    /// Starts the controller with `config` (its policy namespace set to [`POLICY_NS`]).
    pub async fn start_with(cluster: &FakeCluster, agent: &RecordingAgent, config: Config) -> Self {
        let clock = ManualClock::new(t0());
        Self::start_with_agent(cluster, agent, Arc::new(agent.clone()), clock, config).await
    }

    /// Starts the controller on `clock` with `agent` in place of the recording double (a test
    /// double that wraps `recording`, which the test scripts and reads), its policy namespace
    /// set to [`POLICY_NS`].
    pub async fn start_with_agent(
        cluster: &FakeCluster,
        recording: &RecordingAgent,
        agent: Arc<dyn NodeAgent>,
        clock: ManualClock,
        config: Config,
    ) -> Self {
        let controller = Controller::start(
            cluster.client(),
            move |_| agent,
            Leadership::always(),
            Arc::new(clock.clone()),
            Config {
                policy_namespace: POLICY_NS.into(),
                ..config
            },
        );
        controller.stores.ready().await.unwrap();
        Self {
            cluster: cluster.clone(),
            agent: recording.clone(),
            clock,
            controller,
        }
    }

    pub async fn new() -> Self {
        Self::start(&FakeCluster::new(), &RecordingAgent::new()).await
    }

    /// Waits until the reflectors hold `pods` pods and `nodes` nodes.
    pub async fn settle(&self, nodes: usize, pods: usize) {
        let stores = self.controller.stores.clone();
        eventually("stores to see the cluster", || {
            stores.nodes.state().len() == nodes && stores.pods.state().len() == pods
        })
        .await;
    }

    /// Waits until the reflector holds `node`'s Lease renewed at `renewed`.
    pub async fn lease_seen(&self, node: &str, renewed: Timestamp) {
        let stores = self.controller.stores.clone();
        eventually("the store to see the Lease", || {
            stores
                .node_lease(node)
                .and_then(|lease| lease.spec.clone())
                .and_then(|spec| spec.renew_time)
                .is_some_and(|time| time.0 == renewed)
        })
        .await;
    }

    /// Waits until the controller's store holds the Migration `name` with a status.
    pub async fn migration_seen(&self, name: &str) {
        let stores = self.controller.stores.clone();
        eventually("the store to show the Migration", || {
            stores
                .migration(NS, name)
                .is_some_and(|m| m.status.is_some())
        })
        .await;
    }

    /// The status of the Migration `name` as the API server holds it.
    pub fn status(&self, name: &str) -> MigrationStatus {
        self.cluster
            .get::<Migration>(Some(NS), name)
            .unwrap()
            .status
            .unwrap()
    }

    /// The replacement pod the Migration `name` names.
    pub fn replacement(&self, name: &str) -> String {
        self.status(name).replacement_pod.unwrap()
    }

    /// edge-2 fails (NotReady, its Lease silent since -5 s) with the trainer on it, whose
    /// recorded checkpoint `trainer-ck-1` is held on edge-2 only; edge-1 and edge-3 renew at
    /// 60 s. The decision pass at 60 s starts one Migration; returns its name once the store
    /// shows it, and that time.
    pub async fn dead_edge_2_migration(&self) -> (String, Timestamp) {
        self.dead_edge_2_migration_with(&["edge-2"], &[]).await
    }

    /// [`Self::dead_edge_2_migration`] with the recorded checkpoint held on `held_on`, and
    /// more nodes: each shows Ready (since -3600 s) and last renewed its Lease at the time
    /// given (a silent one is dead by its Lease alone).
    pub async fn dead_edge_2_migration_with(
        &self,
        held_on: &[&str],
        more_nodes: &[(&str, Timestamp)],
    ) -> (String, Timestamp) {
        for (name, ready, since) in [
            ("edge-1", "True", at(-3600)),
            ("edge-2", "Unknown", at(-5)),
            ("edge-3", "True", at(-3600)),
        ] {
            self.cluster.put(&node(name, ready, since));
        }
        let now = at(60);
        self.cluster.put(&lease("edge-1", now));
        self.cluster.put(&lease("edge-2", at(-5)));
        self.cluster.put(&lease("edge-3", now));
        for (name, renewed) in more_nodes {
            self.cluster.put(&node(name, "True", at(-3600)));
            self.cluster.put(&lease(name, *renewed));
        }
        self.cluster.put(&protected_pod(
            "trainer",
            "edge-2",
            &[(
                LATEST_CHECKPOINT,
                &checkpoint_annotation("trainer-ck-1", held_on),
            )],
        ));
        self.settle(3 + more_nodes.len(), 1).await;
        self.lease_seen("edge-3", now).await;
        self.lease_seen("edge-1", now).await;
        for (name, renewed) in more_nodes {
            self.lease_seen(name, *renewed).await;
        }

        let report = self.controller.decider.pass(now).await.unwrap();
        assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
        let name = self.only_migration().metadata.name.unwrap();
        self.migration_seen(&name).await;
        (name, now)
    }

    pub fn migrations(&self) -> Vec<Migration> {
        self.cluster.list::<Migration>()
    }

    pub fn only_migration(&self) -> Migration {
        let migrations = self.migrations();
        assert_eq!(migrations.len(), 1, "{migrations:#?}");
        migrations.into_iter().next().unwrap()
    }

    /// Runs executor rounds at `now` until `done` holds for the round's result.
    pub async fn drive(
        &self,
        name: &str,
        now: Timestamp,
        done: impl Fn(&Advanced) -> bool,
    ) -> Advanced {
        let mut last = None;
        for _ in 0..300 {
            if let Some(migration) = self.controller.stores.migration(NS, name) {
                let advanced = self
                    .controller
                    .executor
                    .advance(&migration, now)
                    .await
                    .unwrap();
                if done(&advanced) {
                    return advanced;
                }
                last = Some(advanced);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("migration {name} never got there; last round: {last:?}");
    }

    /// What a kubelet would do: the pod runs and is Ready.
    pub async fn kubelet_runs(&self, name: &str) {
        let cluster = self.cluster.clone();
        eventually("the pod to be created", || {
            cluster.get::<Pod>(Some(NS), name).is_some()
        })
        .await;
        let mut pod: Pod = self.cluster.get(Some(NS), name).unwrap();
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        self.cluster.put(&pod);
    }

    pub fn event_reasons(&self) -> Vec<(String, String)> {
        self.cluster
            .list::<Event>()
            .into_iter()
            .map(|event| {
                (
                    event.regarding.and_then(|r| r.name).unwrap_or_default(),
                    event.reason.unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn has_event(&self, object: &str, reason: &str) -> bool {
        self.event_reasons()
            .iter()
            .any(|(name, found)| name == object && found == reason)
    }
}

/// The HTTP calls the fake saw, as `METHOD path`.
pub fn calls(cluster: &FakeCluster) -> Vec<String> {
    cluster
        .requests()
        .into_iter()
        .filter(|request| request.method != http::Method::GET)
        .map(|request| format!("{} {}", request.method, request.path))
        .collect()
}

/// Three healthy nodes with fresh Leases, a protected pod on edge-2 with a checkpoint there.
pub async fn healthy_cluster(h: &Harness, policy: &str) {
    h.cluster.put(&policy_map("default", policy));
    for name in ["edge-1", "edge-2", "edge-3"] {
        h.cluster.put(&node(name, "True", at(-3600)));
        h.cluster.put(&lease(name, at(0)));
    }
    h.cluster.put(&protected_pod(
        "trainer",
        "edge-2",
        &[
            ("automigrate.dev/dataset", "/data/esc50"),
            (
                LATEST_CHECKPOINT,
                &checkpoint_annotation("trainer-ck-3", &["edge-2"]),
            ),
        ],
    ));
    h.settle(3, 1).await;
    let policies = h.controller.policies.clone();
    eventually("the policy to load", || {
        policies.read().unwrap().get("default").is_some()
    })
    .await;
}
