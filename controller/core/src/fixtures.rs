//! Builders for nodes and pods, and a deterministic synthetic cluster.
//!
//! Tests, the benchmark and the simulator all need clusters; building them through one set of
//! builders keeps them short and means a change to the model is fixed in one place. The
//! synthetic cluster is seeded and uses its own small generator, so the same seed gives the same
//! cluster on every machine.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;

use crate::annotations;
use crate::model::*;
use crate::units::{self, Bytes};

/// Builds a [`Node`] that is Ready, uncordoned, 8 CPUs and 32 GiB, with nothing requested.
#[derive(Debug, Clone)]
pub struct NodeBuilder(Node);

impl NodeBuilder {
    pub fn new(name: &str) -> Self {
        Self(Node {
            name: name.to_string(),
            zone: None,
            labels: BTreeMap::new(),
            taints: Vec::new(),
            conditions: vec![NodeCondition {
                kind: "Ready".into(),
                status: ConditionStatus::True,
                since: None,
                reason: None,
                message: None,
            }],
            last_heartbeat: None,
            allocatable: Resources::new(8000, 32 << 30, 0),
            requested: Resources::default(),
            unschedulable: false,
        })
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.0.zone = Some(zone.to_string());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn taint(mut self, key: &str, effect: TaintEffect) -> Self {
        self.0.taints.push(Taint {
            key: key.to_string(),
            value: None,
            effect,
        });
        self
    }

    /// Sets a condition, replacing one of the same type.
    pub fn condition(mut self, kind: &str, status: ConditionStatus) -> Self {
        self.0.conditions.retain(|condition| condition.kind != kind);
        self.0.conditions.push(NodeCondition {
            kind: kind.to_string(),
            status,
            since: None,
            reason: None,
            message: None,
        });
        self
    }

    pub fn not_ready_since(mut self, since: Timestamp) -> Self {
        self = self.condition("Ready", ConditionStatus::Unknown);
        if let Some(ready) = self.0.conditions.iter_mut().find(|c| c.kind == "Ready") {
            ready.since = Some(since);
        }
        self
    }

    pub fn heartbeat(mut self, at: Timestamp) -> Self {
        self.0.last_heartbeat = Some(at);
        self
    }

    pub fn allocatable(mut self, cpu_millis: u64, memory: u64, gpu: u64) -> Self {
        self.0.allocatable = Resources::new(cpu_millis, memory, gpu);
        self
    }

    pub fn requested(mut self, cpu_millis: u64, memory: u64, gpu: u64) -> Self {
        self.0.requested = Resources::new(cpu_millis, memory, gpu);
        self
    }

    pub fn cordoned(mut self) -> Self {
        self.0.unschedulable = true;
        self
    }

    pub fn build(self) -> Node {
        self.0
    }
}

/// Builds a protected pod (1 CPU, 4 GiB) on a node.
#[derive(Debug, Clone)]
pub struct PodBuilder(ProtectedPod);

impl PodBuilder {
    pub fn new(namespace: &str, name: &str, node: &str) -> Self {
        Self(ProtectedPod {
            namespace: namespace.to_string(),
            name: name.to_string(),
            node: node.to_string(),
            owner: None,
            requests: Resources::new(1000, 4 << 30, 0),
            labels: BTreeMap::new(),
            annotations: [(annotations::PROTECT.to_string(), "true".to_string())].into(),
            last_checkpoint: None,
            checkpoint_in_progress: false,
        })
    }

    pub fn requests(mut self, cpu_millis: u64, memory: u64, gpu: u64) -> Self {
        self.0.requests = Resources::new(cpu_millis, memory, gpu);
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0.labels.insert(key.to_string(), value.to_string());
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.0
            .annotations
            .insert(key.to_string(), value.to_string());
        self
    }

    pub fn owner(mut self, kind: &str, name: &str) -> Self {
        self.0.owner = Some(OwnerRef {
            kind: kind.to_string(),
            name: name.to_string(),
        });
        self
    }

    pub fn checkpoint(
        mut self,
        id: &str,
        taken_at: Timestamp,
        size: u64,
        held_on: &[&str],
    ) -> Self {
        self.0.last_checkpoint = Some(CheckpointInfo {
            id: id.to_string(),
            taken_at,
            size: Bytes(size),
            freeze: Some(Duration::from_secs(2)),
            held_on: held_on.iter().map(|node| node.to_string()).collect(),
            epoch: None,
        });
        self
    }

    pub fn build(self) -> ProtectedPod {
        self.0
    }
}

/// A link observation in both directions.
pub fn link_both_ways(a: &str, b: &str, rtt: Duration) -> [LinkObservation; 2] {
    let one = |from: &str, to: &str| LinkObservation {
        from: from.to_string(),
        to: to.to_string(),
        rtt,
        bandwidth: None,
        loss: 0.0,
        answering: None,
    };
    [one(a, b), one(b, a)]
}

/// SplitMix64: tiny, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The shape of a synthetic cluster.
#[derive(Debug, Clone)]
pub struct SyntheticCluster {
    pub seed: u64,
    pub nodes: usize,
    pub pods: usize,
    pub zones: usize,
    /// Nodes whose lease stopped long ago (their pods need reactive migration).
    pub failed_nodes: usize,
    /// Nodes with a problem condition (their pods need proactive migration).
    pub degraded_nodes: usize,
    /// Peers each node's agent probes.
    pub probes_per_node: usize,
    pub users: usize,
    pub datasets: usize,
    /// Checkpoint ages are uniform in `0..max_checkpoint_age` seconds: with the default 10-minute
    /// interval, 610 s makes about one pod in sixty due (a pass every 10 s in steady state);
    /// 1,200 s makes half of them due (a controller catching up after a restart).
    pub max_checkpoint_age: u64,
}

impl Default for SyntheticCluster {
    fn default() -> Self {
        Self {
            seed: 1,
            nodes: 100,
            pods: 1000,
            zones: 4,
            failed_nodes: 1,
            degraded_nodes: 1,
            probes_per_node: 8,
            users: 50,
            datasets: 20,
            max_checkpoint_age: 1200,
        }
    }
}

impl SyntheticCluster {
    pub fn node_name(index: usize) -> String {
        format!("node-{index:05}")
    }

    /// Builds the snapshot as seen at `now`. Failed and degraded nodes are the first ones, so
    /// tests know which they are.
    pub fn build(&self, now: Timestamp) -> ClusterSnapshot {
        let mut rng = SplitMix64::new(self.seed);
        let zones = self.zones.max(1);
        let ago = |seconds: u64| {
            now.checked_sub(jiff::SignedDuration::from_secs(seconds as i64))
                .unwrap_or(now)
        };

        let mut nodes: Vec<Node> = (0..self.nodes)
            .map(|index| {
                let name = Self::node_name(index);
                let zone = format!("zone-{}", index % zones);
                let mut builder = NodeBuilder::new(&name)
                    .zone(&zone)
                    .label("topology.kubernetes.io/zone", &zone)
                    .allocatable(32_000, 128 << 30, u64::from(index % 10 == 0) * 4)
                    .heartbeat(ago(rng.below(10)));
                if index < self.failed_nodes {
                    builder = builder.heartbeat(ago(120)).not_ready_since(ago(70));
                } else if index < self.failed_nodes + self.degraded_nodes {
                    builder = builder.condition("DiskPressure", ConditionStatus::True);
                }
                builder.build()
            })
            .collect();

        let mut links = Vec::with_capacity(self.nodes * self.probes_per_node);
        for index in 0..self.nodes {
            for probe in 1..=self.probes_per_node.min(self.nodes.saturating_sub(1)) {
                let peer = (index + probe * 7 + (rng.below(3) as usize)) % self.nodes;
                if peer == index {
                    continue;
                }
                let same_zone = index % zones == peer % zones;
                let base = if same_zone {
                    1
                } else {
                    10 + 10 * ((index + peer) % 3) as u64
                };
                links.push(LinkObservation {
                    from: Self::node_name(index),
                    to: Self::node_name(peer),
                    rtt: Duration::from_micros(base * 1000 + rng.below(2000)),
                    bandwidth: Some(units::BitRate(1_000_000_000)),
                    loss: 0.0,
                    answering: None,
                });
            }
        }

        let datasets: Vec<Dataset> = (0..self.datasets)
            .map(|index| Dataset {
                id: format!("/data/set-{index}"),
                total_bytes: Bytes((1 + rng.below(8)) << 30),
                file_count: 10 + rng.below(1000),
                files: Vec::new(),
                present_on: (0..3)
                    .map(|_| Self::node_name(rng.below(self.nodes as u64) as usize))
                    .collect(),
            })
            .collect();

        let mut users = Vec::new();
        for user in 0..self.users {
            for _ in 0..10 {
                users.push(UserObservation {
                    user: format!("user-{user}"),
                    node: Self::node_name(rng.below(self.nodes as u64) as usize),
                    latency: Duration::from_millis(2 + rng.below(80)),
                });
            }
        }

        let mut pods = Vec::with_capacity(self.pods);
        for index in 0..self.pods {
            let node_index = index % self.nodes.max(1);
            let node = Self::node_name(node_index);
            let peer = Self::node_name((node_index + 7) % self.nodes.max(1));
            let age = rng.below(self.max_checkpoint_age);
            let mut builder = PodBuilder::new(
                &format!("team-{}", index % 20),
                &format!("train-{index:06}"),
                &node,
            )
            .requests(1000 + rng.below(3) * 1000, (2 + rng.below(6)) << 30, 0)
            .label("app", &format!("job-{}", index / 4))
            .checkpoint(
                &format!("ck-{index}"),
                ago(age),
                (1 + rng.below(4)) << 30,
                &[&node, &peer],
            );
            if self.datasets > 0 && index % 2 == 0 {
                builder = builder.annotation(
                    annotations::DATASET,
                    &format!("/data/set-{}", index % self.datasets),
                );
            }
            if self.users > 0 && index % 5 == 0 {
                builder =
                    builder.annotation(annotations::USER, &format!("user-{}", index % self.users));
            }
            let pod = builder.build();
            if let Some(node) = nodes.get_mut(node_index) {
                node.requested = node.requested.saturating_add(pod.requests);
            }
            pods.push(pod);
        }

        ClusterSnapshot {
            taken_at: Some(now),
            nodes,
            pods,
            datasets,
            links,
            users,
            alerts: Vec::new(),
            migrations: Vec::new(),
            requests: Vec::new(),
        }
    }
}
