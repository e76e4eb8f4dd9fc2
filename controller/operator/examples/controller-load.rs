//! Load run of the controller: its real reflectors, policy loader, writer, decision pass,
//! checkpoint orchestrator and executor against automigrate-kube-fake holding a large cluster
//! while nodes flap, with the time and memory that costs. It prints what it measured and
//! asserts nothing about it (timing goals live in docs/benchmarks.md, not in code).
//!
//! ```sh
//! cargo build --release -p automigrate-operator --example controller-load
//! nice -n -10 target/release/examples/controller-load --passes 40 --interval 10s
//! ```
//!
//! The cluster is the core's decision-pass benchmark cluster
//! (`automigrate_core::fixtures::SyntheticCluster`, seed 7: 5,000 nodes in 8 zones, 50,000
//! protected pods, 10 failed and 10 DiskPressure nodes, 8 probed peers per node, 1,000 users
//! with the mobility trigger on, checkpoint ages spread over 0–610 s) written as Kubernetes
//! objects: Nodes, Leases in `kube-node-lease`, Pods carrying the `automigrate.dev/*`
//! annotations and their newest checkpoint, and the `default` policy ConfigMap. Datasets are
//! not part of it: the controller has no source for them yet.
//!
//! What runs, as in the `automigrate-controller` process (`Controller::start`, then the loops of
//! `Controller::run` mirrored here so each pass can be timed):
//! - the decision loop: a pass every `--interval` at the wall clock's now; its checkpoint
//!   decisions run as jobs through the checkpoint orchestrator (which writes each pod's
//!   checkpoint annotation back through the API);
//! - the executor loop every 2 s over the active Migrations;
//! - the probe loop every 30 s: every agent's peers, and the users' latency recorded as a
//!   PromQL query's answer would be.
//!
//! What the simulated kubelets do meanwhile (written straight into the fake's store, as another
//! client's writes: a real API server runs elsewhere, so only the controller's side of the
//! traffic, the watch streams, their decoding and the reflectors, is this process's work):
//! - every live node renews its Lease every 10 s (500 renewals/s at 5,000 nodes);
//! - every live node reports its status every 5 minutes (kubelet's `nodeStatusReportFrequency`);
//! - every 10 s, `--flap-percent` of the nodes go NotReady (`Ready=Unknown`) and stop renewing
//!   for `--flap-for`, then come back Ready: shorter than the policy's 20 s grace, so a flap is
//!   judged and must not start a migration.
//!
//! The agents are a stand-in that answers at once (checkpoints now, transfers done, the
//! synthetic peers) and keeps nothing, so its memory is not counted against the controller.
//!
//! Measured: each pass's time (total, and its snapshot / engine / actions parts, see
//! `PassTimings`), p50/p95/max over the passes after the first (the first one starts the
//! migrations of the failed and degraded nodes' pods and is reported alone); the reflectors'
//! initial sync; how far the reflectors lag behind a write under load (a Lease every second, a
//! pod annotation every second); after the passes, still under load, how long a second
//! replica's reflectors take to list everything (what a restarted controller waits for); VmRSS at each stage and the peak (VmHWM) from
//! /proc/self/status. The fake API server lives in the same process: its copy of every object
//! is in those figures, and "before the controller" shows how much.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use automigrate_core::fixtures::SyntheticCluster;
use automigrate_core::model::{self, ConditionStatus, PodRef, UserObservation};
use automigrate_kube_fake::{FakeCluster, FakeClusterOptions};
use automigrate_operator::agent::{
    AgentResult, CheckpointKind, CheckpointTaken, NodeAgent, PeerLatency, TransferProgress,
    TransferState,
};
use automigrate_operator::clock::{Clock, SystemClock};
use automigrate_operator::controller::{Config, Controller};
use automigrate_operator::crd::TransferPayload;
use automigrate_operator::decider::PassTimings;
use automigrate_operator::executor::InFlight;
use automigrate_operator::leader::Leadership;
use automigrate_operator::probes::Source;
use automigrate_operator::snapshot::{LATEST_CHECKPOINT, NODE_LEASE_NAMESPACE};
use automigrate_operator::stores::Stores;
use clap::Parser;
use futures::FutureExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, NodeCondition, NodeStatus, Pod, PodCondition, PodSpec, PodStatus,
    ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};

const POLICY_NAMESPACE: &str = "automigrate-system";
const POLICY: &str = "triggers:\n  mobility: {threshold: 40ms, hysteresis: 15ms, dwell: 30s}\n";
const MARKER: &str = "load.automigrate.dev/marker";

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| error.to_string())
}

#[derive(Debug, Parser)]
#[command(about = "Controller load run against the in-process API server")]
struct Args {
    #[arg(long, default_value_t = 5_000)]
    nodes: usize,
    #[arg(long, default_value_t = 50_000)]
    pods: usize,
    /// Decision passes to run (the first one is reported alone).
    #[arg(long, default_value_t = 40)]
    passes: usize,
    /// Time between the starts of two passes (the controller's default, 10s).
    #[arg(long, default_value = "10s", value_parser = duration)]
    interval: Duration,
    /// Share of the nodes that go NotReady every 10 s, in percent.
    #[arg(long, default_value_t = 1.0)]
    flap_percent: f64,
    /// How long a flapping node stays NotReady (below the policy's 20 s grace).
    #[arg(long, default_value = "15s", value_parser = duration)]
    flap_for: Duration,
}

// ---------------------------------------------------------------------------------------------
// The synthetic cluster as Kubernetes objects.

fn since_or(time: Option<Timestamp>, fallback: Timestamp) -> Time {
    Time(time.unwrap_or(fallback))
}

fn condition_status(status: ConditionStatus) -> String {
    match status {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
    .to_string()
}

fn k8s_node(node: &model::Node, long_ago: Timestamp, now: Timestamp) -> Node {
    let mut allocatable = BTreeMap::from([
        (
            "cpu".to_string(),
            Quantity(format!("{}m", node.allocatable.cpu.0)),
        ),
        (
            "memory".to_string(),
            Quantity(node.allocatable.memory.0.to_string()),
        ),
    ]);
    if node.allocatable.gpu > 0 {
        allocatable.insert(
            "nvidia.com/gpu".into(),
            Quantity(node.allocatable.gpu.to_string()),
        );
    }
    Node {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            labels: Some(node.labels.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
        status: Some(NodeStatus {
            allocatable: Some(allocatable),
            conditions: Some(
                node.conditions
                    .iter()
                    .map(|condition| NodeCondition {
                        type_: condition.kind.clone(),
                        status: condition_status(condition.status),
                        last_transition_time: Some(since_or(condition.since, long_ago)),
                        last_heartbeat_time: Some(Time(now)),
                        ..NodeCondition::default()
                    })
                    .collect(),
            ),
            ..NodeStatus::default()
        }),
    }
}

fn lease(node: &str, renewed: Timestamp) -> Lease {
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

fn k8s_pod(pod: &model::ProtectedPod) -> anyhow::Result<Pod> {
    let mut annotations = pod.annotations.clone();
    if let Some(checkpoint) = &pod.last_checkpoint {
        annotations.insert(LATEST_CHECKPOINT.into(), serde_json::to_string(checkpoint)?);
    }
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(format!("uid-{}-{}", pod.namespace, pod.name)),
            labels: Some(pod.labels.clone()),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(pod.node.clone()),
            containers: vec![Container {
                name: "train".into(),
                image: Some("registry.example/train:1".into()),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".into(), Quantity(format!("{}m", pod.requests.cpu.0))),
                        ("memory".into(), Quantity(pod.requests.memory.0.to_string())),
                    ])),
                    ..ResourceRequirements::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
    })
}

fn policy_map() -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some("default".into()),
            namespace: Some(POLICY_NAMESPACE.into()),
            labels: Some(BTreeMap::from([(
                "automigrate.dev/policy".into(),
                "true".into(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("policy.yaml".into(), POLICY.into())])),
        ..ConfigMap::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Agents that answer at once and keep nothing.

#[derive(Debug)]
struct InstantAgents {
    peers: BTreeMap<String, Vec<PeerLatency>>,
    clock: SystemClock,
    counter: std::sync::atomic::AtomicU64,
}

impl InstantAgents {
    fn next(&self) -> u64 {
        self.counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

impl NodeAgent for InstantAgents {
    fn checkpoint<'a>(
        &'a self,
        _node: &'a str,
        pod: &'a PodRef,
        _container: &'a str,
        _kind: CheckpointKind,
    ) -> AgentResult<'a, CheckpointTaken> {
        let taken = CheckpointTaken {
            id: format!("{}-ck-{}", pod.name, self.next()),
            created_at: self.clock.now(),
            bytes: 1 << 30,
            freeze: Duration::from_millis(400),
            verified: true,
        };
        async move { Ok(taken) }.boxed()
    }

    fn checkpoints<'a>(
        &'a self,
        _node: &'a str,
        _pod: &'a PodRef,
    ) -> AgentResult<'a, Vec<CheckpointTaken>> {
        async move { Ok(Vec::new()) }.boxed()
    }

    fn start_transfer<'a>(
        &'a self,
        _from: &'a str,
        _payload: &'a TransferPayload,
        _to: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        let progress = TransferProgress {
            id: format!("tx-{}", self.next()),
            state: TransferState::Succeeded,
            bytes_total: 1 << 30,
            bytes_done: 1 << 30,
            error: None,
        };
        async move { Ok(progress) }.boxed()
    }

    fn transfer_status<'a>(
        &'a self,
        _node: &'a str,
        id: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        let progress = TransferProgress {
            id: id.to_string(),
            state: TransferState::Succeeded,
            bytes_total: 1 << 30,
            bytes_done: 1 << 30,
            error: None,
        };
        async move { Ok(progress) }.boxed()
    }

    fn build_image<'a>(
        &'a self,
        _node: &'a str,
        checkpoint_id: &'a str,
    ) -> AgentResult<'a, String> {
        let image = format!("localhost/automigrate/{checkpoint_id}:restore");
        async move { Ok(image) }.boxed()
    }

    fn peers<'a>(&'a self, node: &'a str) -> AgentResult<'a, Vec<PeerLatency>> {
        let peers = self.peers.get(node).cloned().unwrap_or_default();
        async move { Ok(peers) }.boxed()
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring.

/// `VmRSS` and `VmHWM` of this process in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], percent: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1000.0)
}

fn summary(name: &str, samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    format!(
        "| {name} | {} | {} | {} | {} |",
        sorted.len(),
        ms(percentile(&sorted, 50.0)),
        ms(percentile(&sorted, 95.0)),
        ms(sorted.last().copied().unwrap_or_default()),
    )
}

/// Polls `check` every millisecond; how long until it held, `None` after 30 s.
async fn wait_until(check: impl Fn() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while !check() {
        if started.elapsed() > Duration::from_secs(30) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Some(started.elapsed())
}

/// A fixed-rate tick for the kubelet threads; a late tick runs at once (as tokio's default).
struct Ticker {
    period: Duration,
    next: Instant,
}

impl Ticker {
    fn new(period: Duration) -> Self {
        Self {
            period,
            next: Instant::now(),
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.next > now {
            std::thread::sleep(self.next - now);
        }
        self.next += self.period;
    }
}

/// Nodes that are not renewing their Lease right now (flapping, or failed for good).
#[derive(Debug, Default)]
struct Down {
    nodes: BTreeSet<usize>,
}

fn stage(label: &str, started: Instant) {
    let (rss, hwm) = memory();
    eprintln!(
        "[{:>7.1}s] {label}: VmRSS {rss:.0} MiB, VmHWM {hwm:.0} MiB",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run_started = Instant::now();
    let metrics = automigrate_operator::metrics::install().context("metrics recorder")?;
    stage("start", run_started);

    // The synthetic cluster, as of now.
    let built_at = SystemClock.now();
    let synthetic = SyntheticCluster {
        seed: 7,
        nodes: args.nodes,
        pods: args.pods,
        zones: 8,
        failed_nodes: 10,
        degraded_nodes: 10,
        probes_per_node: 8,
        users: 1_000,
        datasets: 0,
        max_checkpoint_age: 610,
    }
    .build(built_at);
    let long_ago = built_at
        .checked_sub(jiff::SignedDuration::from_hours(24))
        .unwrap_or(built_at);
    let cluster = FakeCluster::with_options(FakeClusterOptions {
        record_requests: false,
        ..FakeClusterOptions::default()
    });
    let put_started = Instant::now();
    let mut node_objects = Vec::with_capacity(synthetic.nodes.len());
    for node in &synthetic.nodes {
        let object = k8s_node(node, long_ago, built_at);
        cluster.put(&object);
        node_objects.push(object);
        if let Some(heartbeat) = node.last_heartbeat {
            cluster.put(&lease(&node.name, heartbeat));
        }
    }
    for pod in &synthetic.pods {
        cluster.put(&k8s_pod(pod)?);
    }
    cluster.put(&policy_map());
    let failed: BTreeSet<usize> = (0..10.min(args.nodes)).collect();
    let mut peers: BTreeMap<String, Vec<PeerLatency>> = BTreeMap::new();
    for link in &synthetic.links {
        peers
            .entry(link.from.clone())
            .or_default()
            .push(PeerLatency {
                node: link.to.clone(),
                rtt: link.rtt,
                loss: link.loss,
                answering: link.answering,
            });
    }
    let users: Vec<UserObservation> = synthetic.users.clone();
    let node_names: Vec<String> = synthetic
        .nodes
        .iter()
        .map(|node| node.name.clone())
        .collect();
    let pod_refs: Vec<PodRef> = synthetic.pods.iter().map(|pod| pod.pod_ref()).collect();
    drop(synthetic);
    eprintln!(
        "put {} nodes, {} Leases, {} pods into the fake: {:.1} s",
        node_objects.len(),
        node_objects.len(),
        pod_refs.len(),
        put_started.elapsed().as_secs_f64()
    );
    stage("before the controller", run_started);
    let (rss_before_controller, _) = memory();

    // The controller.
    let agents: Arc<dyn NodeAgent> = Arc::new(InstantAgents {
        peers,
        clock: SystemClock,
        counter: Default::default(),
    });
    let sync_started = Instant::now();
    let controller = Controller::start(
        cluster.client(),
        |_| agents,
        Leadership::always(),
        Arc::new(SystemClock),
        Config {
            policy_namespace: POLICY_NAMESPACE.into(),
            ..Config::default()
        },
    );
    controller.stores.ready().await.context("reflectors")?;
    let initial_sync = sync_started.elapsed();
    while controller
        .policies
        .read()
        .map(|policies| policies.get("default").is_none())
        .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "reflectors synced ({} nodes, {} Leases, {} pods): {:.2} s",
        controller.stores.nodes.state().len(),
        controller.stores.leases.state().len(),
        controller.stores.pods.state().len(),
        initial_sync.as_secs_f64()
    );
    stage("reflectors synced", run_started);
    let (rss_synced, _) = memory();

    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let down = Arc::new(Mutex::new(Down {
        nodes: failed.clone(),
    }));
    let mut tasks = Vec::new();
    // The simulated kubelets run on their own threads, like the separate machines they stand
    // for: a busy controller runtime must not delay their writes.
    let mut kubelets: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let renewals = Arc::new(std::sync::atomic::AtomicU64::new(0));

    // Kubelets: Lease renewals, every node every 10 s, in 100 slices of 100 ms.
    {
        let cluster = cluster.clone();
        let down = down.clone();
        let names = node_names.clone();
        let stopping = stopping.clone();
        let renewals = renewals.clone();
        kubelets.push(std::thread::spawn(move || {
            let mut tick = Ticker::new(Duration::from_millis(100));
            let mut slice = 0usize;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick();
                let now = SystemClock.now();
                let skip = down
                    .lock()
                    .map(|down| down.nodes.clone())
                    .unwrap_or_default();
                for index in (slice..names.len()).step_by(100) {
                    if !skip.contains(&index) {
                        cluster.put(&lease(&names[index], now));
                        renewals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                slice = (slice + 1) % 100;
            }
        }));
    }
    // Kubelets: node status reports, every node every 5 minutes, and the flaps.
    let flaps = Arc::new(Mutex::new(0u64));
    {
        let cluster = cluster.clone();
        let down = down.clone();
        let stopping = stopping.clone();
        let flaps = flaps.clone();
        let mut nodes = node_objects;
        let flap_count = ((args.nodes as f64) * args.flap_percent / 100.0).round() as usize;
        let flap_for = args.flap_for;
        let failed = failed.clone();
        kubelets.push(std::thread::spawn(move || {
            let set_ready = |node: &mut Node, status: &str, now: Timestamp, transition: bool| {
                if let Some(conditions) = node
                    .status
                    .as_mut()
                    .and_then(|status| status.conditions.as_mut())
                {
                    for condition in conditions.iter_mut() {
                        condition.last_heartbeat_time = Some(Time(now));
                        if condition.type_ == "Ready" {
                            if transition && condition.status != status {
                                condition.last_transition_time = Some(Time(now));
                            }
                            condition.status = status.into();
                        }
                    }
                }
            };
            let mut tick = Ticker::new(Duration::from_secs(1));
            let mut second = 0u64;
            let mut cursor = 0usize;
            let mut rng = 0x9E37_79B9_7F4A_7C15u64;
            let mut flapping: Vec<(usize, Instant)> = Vec::new();
            let per_second = nodes.len().div_ceil(300);
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick();
                let now = SystemClock.now();
                // Back from a flap.
                let (back, still): (Vec<_>, Vec<_>) = flapping
                    .into_iter()
                    .partition(|(_, since)| since.elapsed() >= flap_for);
                flapping = still;
                for (index, _) in back {
                    set_ready(&mut nodes[index], "True", now, true);
                    cluster.put(&nodes[index]);
                    cluster.put(&lease(
                        nodes[index].metadata.name.as_deref().unwrap_or_default(),
                        now,
                    ));
                    if let Ok(mut down) = down.lock() {
                        down.nodes.remove(&index);
                    }
                }
                // A new round of flaps every 10 s.
                if second.is_multiple_of(10) && !nodes.is_empty() {
                    for _ in 0..flap_count {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let index = (rng % nodes.len() as u64) as usize;
                        let busy = flapping.iter().any(|(other, _)| *other == index);
                        if failed.contains(&index) || busy {
                            continue;
                        }
                        set_ready(&mut nodes[index], "Unknown", now, true);
                        cluster.put(&nodes[index]);
                        if let Ok(mut down) = down.lock() {
                            down.nodes.insert(index);
                        }
                        flapping.push((index, Instant::now()));
                        if let Ok(mut flaps) = flaps.lock() {
                            *flaps += 1;
                        }
                    }
                }
                // Routine status reports of live nodes.
                for _ in 0..per_second {
                    cursor = (cursor + 1) % nodes.len().max(1);
                    let live = !failed.contains(&cursor)
                        && !flapping.iter().any(|(other, _)| *other == cursor);
                    if live {
                        set_ready(&mut nodes[cursor], "True", now, false);
                        cluster.put(&nodes[cursor]);
                    }
                }
                second += 1;
            }
        }));
    }
    // Reflector lag: a Lease renewal and a pod annotation every second, timed until the
    // controller's stores show them.
    let lease_lag = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let pod_lag = Arc::new(Mutex::new(Vec::<Duration>::new()));
    {
        let cluster = cluster.clone();
        let stores = controller.stores.clone();
        let down = down.clone();
        let names = node_names.clone();
        let pods = pod_refs.clone();
        let stopping = stopping.clone();
        let lease_lag = lease_lag.clone();
        let pod_lag = pod_lag.clone();
        let client = cluster.client();
        tasks.push(tokio::spawn(async move {
            let mut sample = 0usize;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                sample += 1;
                let index = (sample * 7919) % names.len().max(1);
                let live = down
                    .lock()
                    .map(|down| !down.nodes.contains(&index))
                    .unwrap_or(false);
                if live {
                    // Lease times are stored to the microsecond.
                    let now = Timestamp::from_microsecond(SystemClock.now().as_microsecond())
                        .unwrap_or_else(|_| SystemClock.now());
                    cluster.put(&lease(&names[index], now));
                    let seen = wait_until(|| {
                        stores
                            .node_lease(&names[index])
                            .and_then(|lease| lease.spec.clone())
                            .and_then(|spec| spec.renew_time)
                            .is_some_and(|renewed| renewed.0 >= now)
                    })
                    .await;
                    if let (Some(lag), Ok(mut lags)) = (seen, lease_lag.lock()) {
                        lags.push(lag);
                    }
                }
                let pod = &pods[(sample * 104_729) % pods.len().max(1)];
                let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
                let marker = sample.to_string();
                let patch = serde_json::json!({"metadata": {"annotations": {MARKER: marker}}});
                let written = Instant::now();
                if api
                    .patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .is_ok()
                {
                    let seen = wait_until(|| {
                        stores.pod(&pod.namespace, &pod.name).is_some_and(|pod| {
                            pod.metadata
                                .annotations
                                .as_ref()
                                .and_then(|annotations| annotations.get(MARKER))
                                .is_some_and(|value| *value == marker)
                        })
                    })
                    .await;
                    if seen.is_some()
                        && let Ok(mut lags) = pod_lag.lock()
                    {
                        lags.push(written.elapsed());
                    }
                }
            }
        }));
    }
    // The probe loop (agents' peers; users as PromQL would give them) and the executor loop.
    {
        let controller = controller.clone();
        let names = node_names.clone();
        let stopping = stopping.clone();
        tasks.push(tokio::spawn(async move {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                controller.refresh_signals(&names).await;
                controller
                    .users
                    .record(Source::Prometheus, users.clone(), SystemClock.now());
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }));
    }
    {
        let controller = controller.clone();
        let stopping = stopping.clone();
        tasks.push(tokio::spawn(async move {
            let in_flight = InFlight::default();
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                for migration in controller.executor.active() {
                    let Some(guard) = in_flight.try_start(&migration) else {
                        continue;
                    };
                    let executor = controller.executor.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        let _ = executor.advance(&migration, SystemClock.now()).await;
                    });
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }));
    }

    // The decision loop.
    let mut totals = Vec::new();
    let mut parts: Vec<PassTimings> = Vec::new();
    let mut first = None;
    let mut started_migrations = 0usize;
    let mut checkpoint_jobs = 0usize;
    let mut deferred = 0usize;
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let loop_started = Instant::now();
    for pass in 0..args.passes {
        tick.tick().await;
        let timer = Instant::now();
        let report = controller.decider.pass(SystemClock.now()).await?;
        let total = timer.elapsed();
        started_migrations += report.started.len();
        checkpoint_jobs += report.checkpoints.len();
        deferred += report.decisions.deferred.len();
        for decision in report.checkpoints.clone() {
            let orchestrator = controller.checkpoints.clone();
            tokio::spawn(async move {
                let _ = orchestrator.run(&decision).await;
            });
        }
        eprintln!(
            "pass {pass:>3}: {:>7} ms (snapshot {}, engine {}, actions {}); {} migrations started, {} checkpoints, {} deferred",
            ms(total),
            ms(report.timings.snapshot),
            ms(report.timings.engine),
            ms(report.timings.actions),
            report.started.len(),
            report.checkpoints.len(),
            report.decisions.deferred.len(),
        );
        if pass == 0 {
            first = Some((
                total,
                report.timings,
                report.started.len(),
                report.checkpoints.len(),
            ));
        } else {
            totals.push(total);
            parts.push(report.timings);
        }
    }
    let loop_time = loop_started.elapsed();
    stage("after the passes", run_started);
    let (rss_end, hwm_after_passes) = memory();

    // A restarted replica while the load goes on: its reflectors list everything again.
    let restart_started = Instant::now();
    let fresh = Stores::spawn(&cluster.client());
    fresh
        .ready()
        .await
        .context("the second set of reflectors")?;
    let restart_sync = restart_started.elapsed();
    let restart_pods = fresh.pods.state().len();

    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }
    for kubelet in kubelets {
        let _ = kubelet.join();
    }
    let renewals = renewals.load(std::sync::atomic::Ordering::Relaxed);

    let mut phases: BTreeMap<String, usize> = BTreeMap::new();
    for migration in controller.stores.migrations.state() {
        let phase = migration
            .status
            .as_ref()
            .map_or("(no status)".to_string(), |status| {
                status.state.phase.to_string()
            });
        *phases.entry(phase).or_default() += 1;
    }
    let render_started = Instant::now();
    let rendered = metrics.render();
    let render_time = render_started.elapsed();
    stage("end", run_started);
    let (_, hwm) = memory();

    // The report, as Markdown for docs/benchmarks.md.
    let lease_lag = lease_lag
        .lock()
        .map(|lags| lags.clone())
        .unwrap_or_default();
    let pod_lag = pod_lag.lock().map(|lags| lags.clone()).unwrap_or_default();
    let flaps = flaps.lock().map(|flaps| *flaps).unwrap_or(0);
    println!(
        "{} nodes, {} protected pods; {} passes every {} over {:.0} s; load average {}",
        args.nodes,
        args.pods,
        args.passes,
        humantime::format_duration(args.interval),
        loop_time.as_secs_f64(),
        load_average()
    );
    println!(
        "kubelet writes: {renewals} Lease renewals ({:.0}/s), {flaps} node flaps of {} ({} % of nodes every 10 s)",
        renewals as f64 / loop_time.as_secs_f64().max(1e-9),
        humantime::format_duration(args.flap_for),
        args.flap_percent
    );
    println!(
        "controller work: {started_migrations} migrations started, {checkpoint_jobs} checkpoint jobs, {deferred} deferrals over all passes; Migrations by phase at the end: {phases:?}"
    );
    if let Some((total, timings, started, checkpoints)) = first {
        println!(
            "first pass: {} ms (snapshot {}, engine {}, actions {}); {started} migrations started, {checkpoints} checkpoints",
            ms(total),
            ms(timings.snapshot),
            ms(timings.engine),
            ms(timings.actions)
        );
    }
    println!();
    println!(
        "| passes 2–{} | samples | p50 ms | p95 ms | max ms |",
        args.passes
    );
    println!("|---|---|---|---|---|");
    println!("{}", summary("whole pass", &totals));
    let pick = |f: fn(&PassTimings) -> Duration| parts.iter().map(f).collect::<Vec<_>>();
    println!(
        "{}",
        summary("— snapshot from the reflectors", &pick(|t| t.snapshot))
    );
    println!("{}", summary("— engine (`decide`)", &pick(|t| t.engine)));
    println!(
        "{}",
        summary("— actions (writes, Events, gauges)", &pick(|t| t.actions))
    );
    let rest: Vec<Duration> = totals
        .iter()
        .zip(&parts)
        .map(|(total, part)| total.saturating_sub(part.total()))
        .collect();
    println!(
        "{}",
        summary("— the rest (freeing the pass's decisions)", &rest)
    );
    println!("{}", summary("reflector lag, Lease", &lease_lag));
    println!("{}", summary("reflector lag, pod annotation", &pod_lag));
    println!();
    println!(
        "reflectors' sync: at start (idle cluster) {:.2} s; a second replica's under load ({restart_pods} pods) {:.2} s",
        initial_sync.as_secs_f64(),
        restart_sync.as_secs_f64(),
    );
    println!(
        "memory (MiB): before the controller {rss_before_controller:.0}, synced {rss_synced:.0}, after the passes {rss_end:.0}, peak after the passes {hwm_after_passes:.0}, peak at the end {hwm:.0} (VmHWM; the fake API server's objects included)"
    );
    println!(
        "/metrics render: {} ms, {} bytes",
        ms(render_time),
        rendered.len()
    );
    Ok(())
}
