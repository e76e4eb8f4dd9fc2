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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_embedded::kube::{
    AGENT_PORT, API_PORT, FAST_DEFAULT_POLICY, KubeCluster, KubeClusterConfig, find_bin_dir,
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
    let _one = ONE_CLUSTER.lock().await;
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
    // Both agents and the counter.
    assert_running_as_runc_lists(&cluster, 3).await;
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
    // node-b's agent only.
    assert_running_as_runc_lists(&cluster, 1).await;

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
    // node-b's agent and the restored counter.
    assert_running_as_runc_lists(&cluster, 2).await;

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
    let namespaces = namespaces_of(&cluster);
    cluster.teardown().await.unwrap();
    assert_torn_down(&root, &namespaces).await;
}

/// The fast reading of runc's state agrees with `runc list` (retried: a container may change
/// state between the two readings), and holds `expected` containers.
async fn assert_running_as_runc_lists(cluster: &KubeCluster, expected: usize) {
    let mut last = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let fast = cluster.running_containers();
        let listed = cluster.running_containers_by_runc_list();
        if fast == listed && fast.len() == expected {
            return;
        }
        last = (fast, listed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "running containers: {:?} from the state files, {:?} from runc list; {expected} expected",
        last.0, last.1
    );
}

/// Every network namespace of the cluster.
fn namespaces_of(cluster: &KubeCluster) -> Vec<String> {
    let mut namespaces: Vec<String> = cluster
        .nodes()
        .iter()
        .map(|node| cluster.node_namespace(node).unwrap())
        .collect();
    namespaces.push(cluster.control_namespace().unwrap());
    namespaces
}

/// Processes whose command line names `dir` (components, containers, the kubelets' runc
/// wrappers).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(&needle) {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// After a teardown: no process of the cluster, no container in any runc root, no namespace;
/// then the state directory is removed.
async fn assert_torn_down(root: &Path, namespaces: &[String]) {
    let mut left = processes_under(root);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = processes_under(root);
    }
    assert!(left.is_empty(), "processes left: {left:?}");
    for node in ["node-a", "node-b"] {
        let runc_root = root.join(node).join("kubelet/runc");
        if runc_root.exists() {
            let output = std::process::Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["list", "-q"])
                .output()
                .unwrap();
            let ids = String::from_utf8_lossy(&output.stdout).trim().to_string();
            assert!(ids.is_empty(), "containers left on {node}: {ids}");
        }
    }
    let listed = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    for namespace in namespaces {
        assert!(
            !listed
                .lines()
                .any(|line| line.split_whitespace().next() == Some(namespace.as_str())),
            "namespace {namespace} left"
        );
    }
    std::fs::remove_dir_all(root).unwrap();
}

/// Whether a TCP connection to `target` can be made from inside the node `from` (index).
fn reaches(cluster: &KubeCluster, from: usize, target: SocketAddr) -> bool {
    cluster
        .network()
        .unwrap()
        .run_in(from, || {
            std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)).is_ok()
        })
        .unwrap()
}

fn lease_renew_time(cluster: &KubeCluster, node: &str) -> Option<String> {
    let lease = cluster.get(&["lease", node, "-n", "kube-node-lease"])?;
    lease["spec"]["renewTime"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_cuts_links_sets_conditions_and_kills_the_leader_controller() {
    if !common::privileged("kube_cluster controls") {
        return;
    }
    common::init_logs();
    let _one = ONE_CLUSTER.lock().await;
    let bin_dir = find_bin_dir().expect("the workspace's binaries (cargo build first)");
    let mut config = KubeClusterConfig::line(
        2,
        Duration::from_millis(10),
        tmpfs_root("kube-test"),
        bin_dir,
    );
    config.name_prefix = "kubec".into();
    config.node_labels.insert(
        "node-b".into(),
        [("topology.kubernetes.io/zone".to_string(), "b".to_string())].into(),
    );
    let root = config.root.clone();
    let cluster = KubeCluster::create(config).await.unwrap();
    let dump = DumpOnFailure(&cluster);
    let (a, b) = (0, 1);
    let control_api = SocketAddr::from((cluster.control_address().unwrap(), API_PORT));
    let agent_of = |node: &str| SocketAddr::from((cluster.node_address(node).unwrap(), AGENT_PORT));

    // The labels asked for, the agents as their pods' containers.
    let node_b = cluster.get(&["node", "node-b"]).unwrap();
    assert_eq!(
        node_b["metadata"]["labels"]["topology.kubernetes.io/zone"], "b",
        "node-b's labels: {}",
        node_b["metadata"]["labels"]
    );
    for node in ["node-a", "node-b"] {
        let pid = cluster.agent_pid(node).expect("the agent runs");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("automigrate-agent"),
            "pid {pid} on {node} is not the agent"
        );
    }

    // A node condition as node-problem-detector sets it; the kubelet keeps it.
    cluster
        .set_node_condition("node-a", "KernelDeadlock", "True", "HarnessTest")
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let node_a = cluster.get(&["node", "node-a"]).unwrap();
    let conditions = node_a["status"]["conditions"].as_array().unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "KernelDeadlock" && c["status"] == "True"),
        "the condition did not stay: {conditions:?}"
    );
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        "the kubelet's own conditions went: {conditions:?}"
    );

    // Cut off from the API server: the node still reaches its peer, not the control plane,
    // and its Lease stops being renewed; restored, it is renewed again.
    assert!(reaches(&cluster, b, control_api) && reaches(&cluster, b, agent_of("node-a")));
    cluster.cut_from_api("node-b").unwrap();
    assert!(
        !reaches(&cluster, b, control_api),
        "node-b still reaches the API server"
    );
    assert!(
        reaches(&cluster, b, agent_of("node-a")),
        "node-b lost its peer too"
    );
    let frozen = lease_renew_time(&cluster, "node-b");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lease_renew_time(&cluster, "node-b"),
        frozen,
        "node-b's Lease was renewed while it was cut off"
    );
    cluster.restore_api("node-b").unwrap();
    assert!(
        reaches(&cluster, b, control_api),
        "node-b's API link did not come back"
    );
    eventually(
        "node-b's Lease renewed again",
        Duration::from_secs(30),
        || (lease_renew_time(&cluster, "node-b") != frozen).then_some(()),
    )
    .await;

    // Cut off from its peers: the control plane still reaches it.
    cluster.cut_from_peers("node-a").unwrap();
    assert!(
        !reaches(&cluster, a, agent_of("node-b")),
        "node-a still reaches node-b"
    );
    assert!(
        reaches(&cluster, a, control_api),
        "node-a lost the API server too"
    );
    cluster.restore_peers("node-a").unwrap();
    assert!(
        reaches(&cluster, a, agent_of("node-b")),
        "node-a's peer link did not come back"
    );

    // Link latency between nodes.
    cluster
        .set_rtt("node-a", "node-b", Duration::from_millis(80))
        .unwrap();
    let network = cluster.network().unwrap();
    for (from, to) in [(a, b), (b, a)] {
        assert_eq!(
            network.link(from, to).unwrap().delay,
            Duration::from_millis(40)
        );
    }

    // The leader controller killed: the other replica takes the Lease over; the killed one
    // comes back as a standby.
    let leader = cluster.controller_leader().expect("a leader");
    cluster.kill_controller(leader).unwrap();
    let new_leader = eventually("another leader", Duration::from_secs(60), || {
        cluster.controller_leader().filter(|new| *new != leader)
    })
    .await;
    cluster.start_controller(leader).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.controller_leader(), Some(new_leader));
    let log = std::fs::read_to_string(
        cluster
            .logs_dir()
            .join(format!("controller-{new_leader}.log")),
    )
    .unwrap();
    assert!(
        log.contains("lead"),
        "controller-{new_leader}'s log says nothing of leading"
    );

    // A kubelet crash: its containers run on; restarted, it renews the Lease again.
    let agent_before = cluster.agent_pid("node-a").unwrap();
    cluster.kill_kubelet("node-a").unwrap();
    let stale = lease_renew_time(&cluster, "node-a");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lease_renew_time(&cluster, "node-a"),
        stale,
        "a dead kubelet renewed"
    );
    assert_eq!(
        cluster.agent_pid("node-a"),
        Some(agent_before),
        "the agent died with the kubelet"
    );
    cluster.restart_kubelet("node-a").unwrap();
    eventually(
        "node-a's Lease renewed again",
        Duration::from_secs(30),
        || (lease_renew_time(&cluster, "node-a") != stale).then_some(()),
    )
    .await;

    // Power off and on again: nothing runs on the node, then its kubelet starts its agent pod
    // again, reachable from its peer.
    cluster.power_off("node-b").unwrap();
    assert!(cluster.is_powered_off("node-b"));
    assert!(
        cluster.agent_pid("node-b").is_none(),
        "node-b's agent survived"
    );
    assert!(!reaches(&cluster, a, agent_of("node-b")));
    assert!(
        cluster.restore_api("node-b").is_err(),
        "a powered-off node's links came back"
    );
    cluster.power_on("node-b").unwrap();
    assert!(!cluster.is_powered_off("node-b"));
    eventually(
        "node-b's agent serving again",
        Duration::from_secs(60),
        || {
            (cluster.agent_pid("node-b").is_some() && reaches(&cluster, a, agent_of("node-b")))
                .then_some(())
        },
    )
    .await;

    drop(dump);
    let namespaces = namespaces_of(&cluster);
    cluster.teardown().await.unwrap();
    assert_torn_down(&root, &namespaces).await;
}

/// What `controller/embedded/tests/hard_failure.rs` proved of the embedded controller, on the
/// real components: a job powered off at a point of its run (past half of it) resumes on the
/// other node from the checkpoint the controller recorded, at the checkpointed point (not from
/// the start, not past the power-off), as the same process with its memory intact, and ends
/// once with the uninterrupted run's result. The job is a finite counter (its state only in the
/// shell's memory) that appends every value to a log and ends at [`JOB_END`]; its log is the
/// analogue of the trainer's per-epoch loss: an intact restore continues the sequence with no
/// gap and no repeat beyond the checkpoint, and the job's last line is the same as an
/// uninterrupted run's. (The numpy trainer with its bit-identical final loss at 25/50/75 % is
/// `scripts/demo.sh`'s hard-failure scenarios, on the same cluster.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_powered_off_past_half_way_resumes_at_its_checkpoint_and_ends_once() {
    if !common::privileged("kube_cluster hard failure mid-run") {
        return;
    }
    common::init_logs();
    let _one = ONE_CLUSTER.lock().await;
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
    config.name_prefix = "kubeh".into();
    config.policies = vec![policy];
    let root = config.root.clone();
    let cluster = Arc::new(KubeCluster::create(config).await.unwrap());
    let dump = DumpOnFailure(&cluster);

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
                    "command": ["/bin/sh", "-c", format!(
                        "echo started >> /work/starts; i=0; while [ $i -lt {JOB_END} ]; do \
                         i=$((i+1)); echo $i >> /work/log; echo $i > /work/progress; \
                         sleep 0.1; done; echo done $i >> /work/done")],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }],
            },
        }))
        .unwrap();
    let half = JOB_END / 2;
    eventually("the job half way", Duration::from_secs(120), || {
        (progress(&work).unwrap_or(0) >= half).then_some(())
    })
    .await;
    let mut sampler = Sampler::start(cluster.clone(), work.clone());
    // A checkpoint taken past half way, held on node-b and recorded by the controller.
    let latest = || -> Option<Value> {
        let pod = cluster.get(&["pod", POD, "-n", "default"])?;
        serde_json::from_str(
            pod["metadata"]["annotations"]["checkpoint.automigrate.dev/latest"].as_str()?,
        )
        .ok()
    };
    let earlier = latest().map(|latest| latest["id"].clone());
    eventually(
        "a checkpoint taken past half way, on node-b, recorded",
        Duration::from_secs(60),
        || {
            let latest = latest()?;
            let on_b = latest["heldOn"]
                .as_array()?
                .iter()
                .any(|node| node == "node-b");
            (Some(&latest["id"]) != earlier.as_ref() && on_b).then_some(())
        },
    )
    .await;
    cluster.power_off("node-a").unwrap();
    let at_power_off = progress(&work).unwrap();
    assert!(
        at_power_off < JOB_END && !work.join("done").exists(),
        "the job ended before the power-off ({at_power_off}): make it longer"
    );

    let migration = eventually("the Migration to end", Duration::from_secs(240), || {
        let migration = cluster.migrations().into_iter().next()?;
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
    eventually("the job to end", Duration::from_secs(120), || {
        work.join("done").exists().then_some(())
    })
    .await;
    sampler.stop();

    // The log: 1..=k from node-a (k at or past the power-off count, a write may follow the
    // sample), then the restored process from r+1 on, where r is the value the checkpoint
    // held: past half way (taken after the job passed it), not past the power-off.
    let log: Vec<u64> = std::fs::read_to_string(work.join("log"))
        .unwrap()
        .lines()
        .map(|line| line.trim().parse().unwrap())
        .collect();
    let restart = log
        .windows(2)
        .position(|pair| pair[1] != pair[0] + 1)
        .map(|at| at + 1)
        .expect("the log never went back: no restore from a checkpoint");
    let (before, after) = log.split_at(restart);
    assert!(
        before.iter().copied().eq(1..=before.len() as u64),
        "node-a's run is not 1..: {before:?}"
    );
    let resumed_at = after[0];
    assert!(
        resumed_at >= half && resumed_at <= *before.last().unwrap(),
        "resumed at {resumed_at}: the checkpoint was taken at {half} or later, node-a reached {}",
        before.last().unwrap()
    );
    assert!(
        after.iter().copied().eq(resumed_at..=JOB_END),
        "the restored run is not {resumed_at}..={JOB_END}: its memory was not intact"
    );
    // Once: one start of the command, one end, the uninterrupted run's last line.
    let starts = std::fs::read_to_string(work.join("starts")).unwrap();
    assert_eq!(starts.lines().count(), 1, "the command ran again");
    let done = std::fs::read_to_string(work.join("done")).unwrap();
    assert_eq!(done, format!("done {JOB_END}\n"), "the job ended otherwise");
    let doubles = sampler.doubles.lock().unwrap().clone();
    let samples = *sampler.samples.lock().unwrap();
    assert!(samples > 10, "runc was sampled only {samples} times");
    assert!(doubles.is_empty(), "two copies ran at once: {doubles:?}");
    eprintln!(
        "hard failure past half way: node-a powered off at {at_power_off} of {JOB_END}, \
         resumed on node-b at {resumed_at} from the recorded checkpoint, ended once at \
         {JOB_END}; {samples} runc samples, never two copies"
    );

    drop(dump);
    let cluster = Arc::try_unwrap(cluster).expect("the sampler let go of the cluster");
    let namespaces = namespaces_of(&cluster);
    cluster.teardown().await.unwrap();
    assert_torn_down(&root, &namespaces).await;
}

/// The finite job's last value (0.1 s a value: about 40 s uninterrupted).
const JOB_END: u64 = 400;
