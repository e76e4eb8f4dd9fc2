//! The local Kubernetes cluster of real components ([`KubeCluster`]): a node powered off, the
//! real `automigrate-controller` moves its protected pod to the other node.
//!
//! Two nodes, each a network namespace with its `automigrate-kubelet` and the agent DaemonSet
//! pod; the API server and two controller replicas in the `control` namespace. A protected
//! counter pod runs on node-a with periodic checkpoints (replicated to node-b by the policy);
//! once node-b holds one, node-a is powered off (links cut, kubelet, agent and containers
//! SIGKILLed). The test reads the Migration back from the API server through the host
//! kubeconfig (Succeeded; `kubectl get migrations -A` lists it), finds the replacement Running
//! on node-b restored from a checkpoint image (the counter goes on from the checkpoint, the
//! pod's command never ran again), and samples every node's runc state throughout: never two
//! running copies.
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
    FAST_DEFAULT_POLICY, KubeCluster, KubeClusterConfig, find_bin_dir, tmpfs_root,
};
use serde_json::{Value, json};

const POD: &str = "counter";

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
struct DumpOnFailure<'a>(&'a KubeCluster);

impl Drop for DumpOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let cluster = self.0;
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
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("===== {} (last {} lines) =====", path.display(), tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Running copies at one sample: `(node, container id)`.
type Copies = Vec<(String, String)>;

/// Samples running copies of the counter on every node (runc state) and its progress.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    doubles: Arc<Mutex<Vec<Copies>>>,
    samples: Arc<Mutex<u64>>,
    counts: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Sampler {
    fn start(cluster: Arc<KubeCluster>, work: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let doubles = Arc::new(Mutex::new(Vec::new()));
        let samples = Arc::new(Mutex::new(0));
        let counts = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, doubles, samples, counts) = (
                stop.clone(),
                doubles.clone(),
                samples.clone(),
                counts.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let running: Vec<(String, String)> = cluster
                        .running_containers()
                        .into_iter()
                        .filter(|(_, id)| id.starts_with(&format!("default_{POD}")))
                        .collect();
                    if running.len() > 1 {
                        doubles.lock().unwrap().push(running);
                    }
                    *samples.lock().unwrap() += 1;
                    let at = Instant::now();
                    if let Some(count) = progress(&work) {
                        counts.lock().unwrap().push((at, count));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
            doubles,
            samples,
            counts,
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_powered_off_node_s_protected_pod_is_restored_on_the_other_node_by_the_real_controller() {
    if !common::privileged("kube_cluster power-off") {
        return;
    }
    common::init_logs();
    let bin_dir = find_bin_dir().expect("the workspace's binaries (cargo build first)");
    let policy_dir = tempfile::tempdir().unwrap();
    let policy = policy_dir.path().join("default-fast.yaml");
    std::fs::write(&policy, FAST_DEFAULT_POLICY).unwrap();
    let mut config = KubeClusterConfig::line(
        2,
        Duration::from_millis(10),
        tmpfs_root("kube-test"),
        bin_dir,
    );
    config.name_prefix = "kubet".into();
    config.policies = vec![policy];
    let root = config.root.clone();
    let cluster = Arc::new(KubeCluster::create(config).await.unwrap());
    let dump = DumpOnFailure(&cluster);

    // The protected workload on node-a: a counter whose state is only in the shell's memory,
    // checkpointed every 5 s (the policy replicates each checkpoint to one more node).
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
    eventually(
        "the counter Running on node-a",
        Duration::from_secs(60),
        || {
            let pod = cluster.get(&["pod", POD, "-n", "default"])?;
            (pod["status"]["phase"] == "Running" && progress(&work).unwrap_or(0) >= 10)
                .then_some(())
        },
    )
    .await;
    let mut sampler = Sampler::start(cluster.clone(), work.clone());
    // A checkpoint taken after the counter reached 10, replicated to node-b, and the
    // controller knows it (the pod's checkpoint annotation lists node-b): the newest checkpoint
    // it records, what it restores from once node-a is gone. (A copy on node-b that the
    // controller has not recorded yet does not count for it: it restarts the pod fresh then,
    // "no stored checkpoint survives".)
    let latest = || -> Option<Value> {
        let pod = cluster.get(&["pod", POD, "-n", "default"])?;
        serde_json::from_str(
            pod["metadata"]["annotations"]["checkpoint.automigrate.dev/latest"].as_str()?,
        )
        .ok()
    };
    let earlier = latest().map(|latest| latest["id"].clone());
    eventually(
        "a new checkpoint of the counter on node-b, recorded by the controller",
        Duration::from_secs(120),
        || {
            let latest = latest()?;
            let on_b = latest["heldOn"]
                .as_array()?
                .iter()
                .any(|node| node == "node-b");
            (Some(&latest["id"]) != earlier.as_ref()
                && on_b
                && stored_checkpoints(&cluster, "node-b") > 0)
                .then_some(())
        },
    )
    .await;

    let before = progress(&work).unwrap();
    let powered_off_at = Instant::now();
    cluster.power_off("node-a").unwrap();
    assert!(
        cluster.agent_pid("node-a").is_none(),
        "node-a's agent survived"
    );
    assert!(
        !cluster
            .running_containers()
            .iter()
            .any(|(node, _)| node == "node-a"),
        "containers still run on node-a"
    );

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
    assert_eq!(pod["spec"]["nodeName"], "node-b");
    let image = pod["spec"]["containers"][0]["image"].as_str().unwrap();
    assert!(
        image.starts_with("localhost/automigrate/"),
        "the replacement runs {image}, not a checkpoint image"
    );
    let resumed = progress(&work).unwrap_or(0);
    eventually(
        "the restored counter to count on",
        Duration::from_secs(30),
        || (progress(&work).unwrap_or(0) > resumed).then_some(()),
    )
    .await;
    sampler.stop();

    // Restored, not restarted: the command ran once, and the count after the power-off never
    // fell below 10 (the newest recorded checkpoint was taken after it reached 10; a fresh
    // start counts from 1).
    let starts = std::fs::read_to_string(work.join("starts")).unwrap();
    assert_eq!(
        starts.lines().count(),
        1,
        "the pod's command ran again instead of a restore"
    );
    let lowest = sampler
        .counts
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at >= powered_off_at)
        .map(|(_, count)| *count)
        .min()
        .unwrap();
    assert!(
        lowest >= 10,
        "the counter fell to {lowest} after the power-off: restarted, not restored"
    );
    let after = progress(&work).unwrap();
    let doubles = sampler.doubles.lock().unwrap().clone();
    let samples = *sampler.samples.lock().unwrap();
    assert!(samples > 10, "runc was sampled only {samples} times");
    assert!(doubles.is_empty(), "two copies ran at once: {doubles:?}");
    let running: Vec<(String, String)> = cluster
        .running_containers()
        .into_iter()
        .filter(|(_, id)| id.starts_with(&format!("default_{POD}")))
        .collect();
    assert_eq!(running.len(), 1, "containers running: {running:?}");
    assert_eq!(running[0].0, "node-b");

    // The host kubeconfig reaches the API server through the port forward.
    let table = cluster.kubectl(&["get", "migrations", "-A"]).unwrap();
    let name = migration["metadata"]["name"].as_str().unwrap();
    assert!(
        table.contains(name) && table.contains("Succeeded"),
        "kubectl get migrations -A does not list {name}:\n{table}"
    );
    let history: Vec<String> = migration["status"]["history"]
        .as_array()
        .map(|history| {
            history
                .iter()
                .map(|timing| timing["phase"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "migration {name} succeeded after the power-off: phases {history:?}; counter {before} at \
         the power-off, resumed at {resumed}, {after} at the end; {samples} runc samples, never \
         two copies\n$ kubectl get migrations -A\n{table}"
    );

    drop(dump);
    let cluster = Arc::try_unwrap(cluster).expect("the sampler let go of the cluster");
    cluster.teardown().await.unwrap();
    assert!(
        !std::path::Path::new(&root)
            .join("node-b/kubelet/runc")
            .exists()
            || automigrate_embedded_runc_empty(&root.join("node-b/kubelet/runc")),
        "containers left on node-b"
    );
}

/// Whether a runc root has no containers left.
fn automigrate_embedded_runc_empty(root: &Path) -> bool {
    let output = std::process::Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "-q"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().is_empty()
}
