//! Self-fencing for real in the local cluster ([`KubeCluster`]): the agents kill their node's
//! protected containers through the kubelet's runc root, the controller (`--dead-node-fencing
//! self-fence`, the default) waits out the safe time.
//!
//! A protected counter pod runs on node-a with periodic checkpoints replicated to node-b; once
//! the controller has recorded one on node-b:
//!
//! - cut off from the API server but alive (node-a <-> control links cut, node-a <-> node-b
//!   kept): node-a's agent kills the counter by itself, the controller restores it on node-b,
//!   nobody else acts, and runc on every node is sampled throughout: never two running copies.
//! - cut off from its peers only (node-a <-> node-b cut): nothing is fenced, moved or stopped
//!   for 20 s (no Migration, the counter keeps running and counting on node-a).
//!
//! Needs root, runc, CRIU and the binaries built first:
//! `cargo build -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent
//! -p automigrate-operator -p automigrate --locked`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_embedded::kube::{
    FAST_DEFAULT_POLICY, KubeCluster, KubeClusterConfig, RuncStatus, find_bin_dir, runc_status,
    tmpfs_root,
};
use serde_json::{Value, json};

const POD: &str = "counter";

/// One cluster at a time: the tests of this file share two cores with everything else.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn progress(work: &Path) -> Option<u64> {
    std::fs::read_to_string(work.join("progress"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

fn phase(migration: &Value) -> String {
    migration["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Polls `check` every 250 ms for up to `limit`.
async fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints what the cluster looked like, and every log's end, when the test fails.
struct DumpOnFailure(Arc<KubeCluster>);

impl Drop for DumpOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let cluster = &self.0;
        for what in ["migrations.automigrate.dev", "pods", "nodes", "leases"] {
            let text = cluster.kubectl(&["get", what, "-A", "-o", "yaml"]);
            eprintln!(
                "===== kubectl get {what} -A =====\n{}",
                text.unwrap_or_else(|e| e.to_string())
            );
        }
        let logs = std::fs::read_dir(cluster.logs_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path());
        for path in logs {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("===== {} (last {} lines) =====", path.display(), tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The counter's running copies at one sample: `(node, container id)`.
type Copies = Vec<(String, String)>;

/// Samples the counter's running copies on every node (runc state) every 50 ms: the original
/// (`default_counter_<uid8>`) and its replacement (`default_counter-<n>_...`).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    samples: Arc<Mutex<Vec<(Instant, Copies)>>>,
}

impl Sampler {
    fn start(cluster: Arc<KubeCluster>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let running: Copies = cluster
                        .running_containers()
                        .into_iter()
                        .filter(|(_, id)| id.starts_with(&format!("default_{POD}")))
                        .collect();
                    samples.lock().unwrap().push((Instant::now(), running));
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
            samples,
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn samples(&self) -> Vec<(Instant, Copies)> {
        self.samples.lock().unwrap().clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The checkpoints of the counter pod in a node's agent store.
fn stored_checkpoints(cluster: &KubeCluster, node: &str) -> usize {
    std::fs::read_dir(cluster.node_dir(node).join("checkpoints/default").join(POD))
        .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

/// A two-node cluster with the fast default policy, the protected counter running on node-a
/// and a checkpoint of it on node-b that the controller has recorded (what it restores from
/// once node-a is gone). Returns the cluster, its root and the counter's work directory.
async fn cluster_with_a_replicated_counter(prefix: &str) -> (Arc<KubeCluster>, PathBuf, PathBuf) {
    let bin_dir = find_bin_dir().expect("the workspace's binaries (cargo build first)");
    let policy_dir = tempfile::tempdir().unwrap();
    let policy = policy_dir.path().join("default-fast.yaml");
    std::fs::write(&policy, FAST_DEFAULT_POLICY).unwrap();
    let mut config = KubeClusterConfig::line(
        2,
        Duration::from_millis(10),
        tmpfs_root("self-fence"),
        bin_dir,
    );
    config.name_prefix = prefix.into();
    config.policies = vec![policy];
    let root = config.root.clone();
    let cluster = Arc::new(KubeCluster::create(config).await.unwrap());
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    cluster
        .apply(&json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": POD,
                "namespace": "default",
                "annotations": {
                    "automigrate.dev/protect": "true",
                    "automigrate.dev/mode": "transparent",
                    "automigrate.dev/checkpoint-interval": "5s",
                },
            },
            "spec": {
                "nodeName": "node-a",
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 2,
                "volumes": [{"name": "work", "hostPath": {"path": work.to_str().unwrap()}}],
                "containers": [{
                    "name": "count",
                    "image": "docker.io/library/busybox:1.36",
                    "command": ["/bin/sh", "-c",
                        "echo started >> /work/starts; i=0; while true; do i=$((i+1)); \
                         echo $i > /work/progress; sleep 0.2; done"],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }],
            },
        }))
        .unwrap();
    {
        let dump = DumpOnFailure(cluster.clone());
        eventually(
            "the counter Running on node-a",
            Duration::from_secs(60),
            || {
                let pod = dump.0.get(&["pod", POD, "-n", "default"])?;
                (pod["status"]["phase"] == "Running" && progress(&work).unwrap_or(0) >= 10)
                    .then_some(())
            },
        )
        .await;
        let latest = || -> Option<Value> {
            let pod = dump.0.get(&["pod", POD, "-n", "default"])?;
            serde_json::from_str(
                pod["metadata"]["annotations"]["checkpoint.automigrate.dev/latest"].as_str()?,
            )
            .ok()
        };
        eventually(
            "a checkpoint of the counter on node-b, recorded by the controller",
            Duration::from_secs(120),
            || {
                let latest = latest()?;
                let on_b = latest["heldOn"]
                    .as_array()?
                    .iter()
                    .any(|node| node == "node-b");
                (on_b && stored_checkpoints(&dump.0, "node-b") > 0).then_some(())
            },
        )
        .await;
    }
    (cluster, root, work)
}

async fn teardown(cluster: Arc<KubeCluster>, root: &Path) {
    let cluster = Arc::try_unwrap(cluster).expect("the sampler let go of the cluster");
    cluster.teardown().await.unwrap();
    let _ = std::fs::remove_dir_all(root);
}

fn agent_log(cluster: &KubeCluster, node: &str) -> String {
    std::fs::read_to_string(cluster.logs_dir().join(format!("agent-{node}.log")))
        .unwrap_or_default()
}

/// The counter's container id on node-a (it runs there).
fn counter_on_a(cluster: &KubeCluster) -> String {
    let running: Copies = cluster
        .running_containers()
        .into_iter()
        .filter(|(node, id)| node == "node-a" && id.starts_with(&format!("default_{POD}")))
        .collect();
    assert_eq!(running.len(), 1, "the counter on node-a: {running:?}");
    running[0].1.clone()
}

/// The agent's self-fence events (`event=fencing|would_fence|fenced|...` in its text log).
fn fence_events(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| {
            [
                "fencing",
                "would_fence",
                "fenced",
                "stop_failed",
                "stop_overdue",
            ]
            .iter()
            .any(|kind| {
                line.contains(&format!("event={kind}"))
                    || line.contains(&format!("event=\"{kind}\""))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_api_server_fences_itself_and_its_pod_resumes_on_the_other_node() {
    if !common::privileged("self_fence cut from the API server") {
        return;
    }
    common::init_logs();
    let _one = ONE_CLUSTER.lock().await;
    let (cluster, root, work) = cluster_with_a_replicated_counter("sfapi").await;
    let dump = DumpOnFailure(cluster.clone());
    let mut sampler = Sampler::start(cluster.clone());
    let before = progress(&work).unwrap();
    let original = counter_on_a(&cluster);

    let cut_at = Instant::now();
    let cut_wall = jiff::Timestamp::now();
    cluster.cut_from_api("node-a").unwrap();
    // Alive: its agent and kubelet run on, only the API server is out of reach.
    assert!(cluster.agent_pid("node-a").is_some());

    // node-a's agent kills the counter by itself (stopped, not only frozen by a checkpoint).
    let runc_root = cluster.runc_root("node-a");
    eventually(
        "node-a's agent to stop the counter",
        Duration::from_secs(60),
        || {
            matches!(
                runc_status(&runc_root, &original),
                Some(RuncStatus::Stopped) | None
            )
            .then_some(())
        },
    )
    .await;
    let stopped_after = cut_at.elapsed();
    assert!(
        cluster.agent_pid("node-a").is_some(),
        "node-a's agent died: the counter stopped with it, not by a fence"
    );
    let log = agent_log(&cluster, "node-a");
    assert!(
        fence_events(&log)
            .iter()
            .any(|line| line.contains("fenced")),
        "node-a's agent log records no fence:\n{log}"
    );

    // The controller restores it on node-b, with no one else acting.
    let migration = eventually("the Migration to end", Duration::from_secs(240), || {
        let migration = cluster
            .migrations()
            .into_iter()
            .find(|m| m["metadata"]["namespace"] == "default")?;
        matches!(
            phase(&migration).as_str(),
            "Succeeded" | "RolledBack" | "Restarted" | "Failed"
        )
        .then_some(migration)
    })
    .await;
    assert_eq!(
        phase(&migration),
        "Succeeded",
        "the Migration ended otherwise: {:#}",
        migration["status"]
    );
    let replacement = migration["status"]["replacementPod"]
        .as_str()
        .expect("the Migration names its replacement pod")
        .to_string();
    let pod = eventually("the replacement Running", Duration::from_secs(60), || {
        let pod = cluster.get(&["pod", &replacement, "-n", "default"])?;
        (pod["status"]["phase"] == "Running").then_some(pod)
    })
    .await;
    let running_after = cut_at.elapsed();
    assert_eq!(pod["spec"]["nodeName"], "node-b");
    let resumed = progress(&work).unwrap_or(0);
    eventually(
        "the restored counter to count on",
        Duration::from_secs(30),
        || (progress(&work).unwrap_or(0) > resumed).then_some(()),
    )
    .await;
    sampler.stop();

    let samples = sampler.samples();
    assert!(
        samples.len() > 10,
        "runc was sampled only {} times",
        samples.len()
    );
    let doubles: Vec<&Copies> = samples
        .iter()
        .map(|(_, copies)| copies)
        .filter(|copies| copies.len() > 1)
        .collect();
    assert!(doubles.is_empty(), "two copies ran at once: {doubles:?}");
    let now: Copies = cluster
        .running_containers()
        .into_iter()
        .filter(|(_, id)| id.starts_with(&format!("default_{POD}")))
        .collect();
    assert_eq!(now.len(), 1, "counter containers running: {now:?}");
    assert_eq!(now[0].0, "node-b");
    // The gap no copy ran, as runc was sampled.
    let last_on_a = samples
        .iter()
        .filter(|(_, copies)| copies.iter().any(|(node, _)| node == "node-a"))
        .map(|(at, _)| *at)
        .max()
        .unwrap();
    let first_on_b = samples
        .iter()
        .filter(|(_, copies)| copies.iter().any(|(node, _)| node == "node-b"))
        .map(|(at, _)| *at)
        .min()
        .unwrap();
    assert!(first_on_b > last_on_a);

    let history: Vec<String> = migration["status"]["history"]
        .as_array()
        .map(|history| {
            history
                .iter()
                .map(|timing| {
                    format!(
                        "{} at {} for {}",
                        timing["phase"].as_str().unwrap_or_default(),
                        timing["startedAt"].as_str().unwrap_or_default(),
                        timing["duration"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "cut node-a from the API server at {cut_wall}; its agent stopped the counter after \
         {stopped_after:?} (last sample on node-a {:?} after the cut, first on node-b {:?}); the \
         replacement {replacement} was Running on node-b {running_after:?} after the cut; \
         counter {before} at the cut, resumed at {resumed}; {} runc samples, never two copies; \
         Migration history: {history:#?}",
        last_on_a - cut_at,
        first_on_b - cut_at,
        samples.len()
    );

    drop(dump);
    drop(sampler);
    teardown(cluster, &root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_its_peers_only_is_neither_fenced_nor_moved() {
    if !common::privileged("self_fence cut from peers") {
        return;
    }
    common::init_logs();
    let _one = ONE_CLUSTER.lock().await;
    let (cluster, root, work) = cluster_with_a_replicated_counter("sfpeer").await;
    let dump = DumpOnFailure(cluster.clone());
    let mut sampler = Sampler::start(cluster.clone());

    let original = counter_on_a(&cluster);
    cluster.cut_from_peers("node-a").unwrap();
    let before = progress(&work).unwrap();
    let cut_at = Instant::now();
    while cut_at.elapsed() < Duration::from_secs(20) {
        let migrations: Vec<Value> = cluster
            .migrations()
            .into_iter()
            .filter(|m| m["metadata"]["namespace"] == "default")
            .collect();
        assert!(
            migrations.is_empty(),
            "a Migration for a node cut off from its peers only: {migrations:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sampler.stop();
    let after = progress(&work).unwrap();
    let samples = sampler.samples();
    assert!(
        samples.len() > 10,
        "runc was sampled only {} times",
        samples.len()
    );
    // Every sample: at most the original container, on node-a (a periodic checkpoint's freeze
    // counts as running: a paused container is still a copy).
    let off: Vec<&Copies> = samples
        .iter()
        .map(|(_, copies)| copies)
        .filter(|copies| {
            copies
                .iter()
                .any(|copy| *copy != ("node-a".to_string(), original.clone()))
        })
        .collect();
    assert!(off.is_empty(), "the counter moved or was replaced: {off:?}");
    assert_eq!(
        runc_status(&cluster.runc_root("node-a"), &original),
        Some(RuncStatus::Running),
        "the counter stopped on node-a"
    );
    assert!(
        after > before + 20,
        "the counter stalled: {before} -> {after}"
    );
    let starts = std::fs::read_to_string(work.join("starts")).unwrap();
    assert_eq!(starts.lines().count(), 1, "the counter was started again");
    let pod = cluster.get(&["pod", POD, "-n", "default"]).unwrap();
    assert_eq!(pod["status"]["phase"], "Running");
    let log = agent_log(&cluster, "node-a");
    let events = fence_events(&log);
    assert!(
        events.is_empty(),
        "node-a's agent went for a fence: {events:#?}"
    );
    eprintln!(
        "node-a cut off from its peers for 20 s: no Migration, the counter ran on node-a in all \
         {} runc samples and counted {before} -> \
         {after}",
        samples.len()
    );

    cluster.restore_peers("node-a").unwrap();
    drop(dump);
    drop(sampler);
    teardown(cluster, &root).await;
}
