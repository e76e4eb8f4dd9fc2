//! What every privileged test of the embedded mode shares: the rule for running or skipping,
//! where the shipped policies are, and the log set-up; and, for the end-to-end tests on the
//! local cluster of real components ([`KubeCluster`]), the one set-up they all build: a
//! two-node cluster with the fast default policy, the protected counter pod on node-a and the
//! controller's record of its checkpoints, the runc sampler that proves there are never two
//! running copies, the waits, and what a failing test prints.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_embedded::demo::missing_prerequisites;
use automigrate_embedded::kube::{
    FAST_DEFAULT_POLICY, KubeCluster, KubeClusterConfig, find_bin_dir, tmpfs_root,
};
use serde_json::{Value, json};

pub const SKIP_VARIABLE: &str = "AUTOMIGRATE_SKIP_PRIVILEGED";

/// True when the test may run; a missing prerequisite fails the test unless skipping was asked
/// for, and a skip is never silent.
pub fn privileged(test: &str) -> bool {
    if std::env::var(SKIP_VARIABLE).as_deref() == Ok("1") {
        let _ = writeln!(
            std::io::stderr(),
            "\n************************************************************\n\
             SKIPPED {test}: {SKIP_VARIABLE}=1 is set.\n\
             This test needs root, network namespaces, TUN, runc, CRIU >= 4,\n\
             iptables, python3-numpy and the automigrate-agent binary;\n\
             it did NOT run. CI never sets {SKIP_VARIABLE}.\n\
             ************************************************************\n"
        );
        return false;
    }
    let missing = missing_prerequisites();
    assert!(
        missing.is_empty(),
        "{test} cannot run: missing {}.\nInstall them with `sudo scripts/install-node-deps.sh`, \
         or set {SKIP_VARIABLE}=1 to skip privileged tests (loudly).",
        missing.join("; ")
    );
    true
}

pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// Logs to the test's output at `warn`, or as `AUTOMIGRATE_LOG` says:
/// `AUTOMIGRATE_LOG=automigrate_embedded=info cargo test … -- --nocapture` shows each step.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AUTOMIGRATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The protected workload's pod, in namespace `default`.
pub const POD: &str = "counter";

/// The counter: its state only in the shell's memory; every start of the command is appended
/// to `/work/starts`, the count appended to `/work/progress` every 0.2 s.
pub const COUNTER_SCRIPT: &str = "echo started >> /work/starts; i=0; while true; do i=$((i+1)); \
                                  echo $i >> /work/progress; sleep 0.2; done";

/// One cluster at a time: the tests of a file share two cores with everything else.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a privileged cluster test: `None` when it skips (loudly, see [`privileged`]); else
/// the logs are set up and the returned guard keeps the other tests of the file waiting.
pub async fn begin(test: &str) -> Option<tokio::sync::MutexGuard<'static, ()>> {
    if !privileged(test) {
        return None;
    }
    init_logs();
    Some(ONE_CLUSTER.lock().await)
}

/// A two-node line cluster (10 ms RTT) of the workspace's built binaries, its state under a
/// fresh tmpfs directory named after `state`, its names prefixed with `prefix`.
pub fn two_nodes(prefix: &str, state: &str) -> KubeClusterConfig {
    let bin_dir = find_bin_dir().expect("the workspace's binaries (cargo build first)");
    let mut config =
        KubeClusterConfig::line(2, Duration::from_millis(10), tmpfs_root(state), bin_dir);
    config.name_prefix = prefix.into();
    config
}

/// [`two_nodes`] running with the fast default policy (periodic checkpoints, each replicated
/// to one more node) and `script` as the protected pod [`POD`] on `node` (see
/// [`apply_protected_pod`]). Returns the cluster, its state directory and the pod's `/work`.
pub async fn protected_pod_cluster(
    prefix: &str,
    state: &str,
    node: &str,
    script: &str,
) -> (Arc<KubeCluster>, PathBuf, PathBuf) {
    let (cluster, root) = fast_policy_cluster(prefix, state).await;
    let work = root.join("work");
    {
        let _dump = DumpOnFailure(&cluster);
        apply_protected_pod(&cluster, node, &work, script);
    }
    (cluster, root, work)
}

/// [`two_nodes`] running with the fast default policy. Returns the cluster and its state
/// directory.
pub async fn fast_policy_cluster(prefix: &str, state: &str) -> (Arc<KubeCluster>, PathBuf) {
    let mut config = two_nodes(prefix, state);
    // The cluster applies its policies while it is created: the file may go afterwards.
    let policy_dir = tempfile::tempdir().unwrap();
    let policy = policy_dir.path().join("default-fast.yaml");
    std::fs::write(&policy, FAST_DEFAULT_POLICY).unwrap();
    config.policies = vec![policy];
    let root = config.root.clone();
    let cluster = KubeCluster::create(config).await.unwrap();
    (Arc::new(cluster), root)
}

/// Runs `script` as the protected pod [`POD`] on `node` in transparent mode, checkpointed every
/// 5 s, with `work` (created here) as its `/work`.
pub fn apply_protected_pod(cluster: &KubeCluster, node: &str, work: &Path, script: &str) {
    std::fs::create_dir_all(work).unwrap();
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
                "nodeName": node,
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 2,
                "volumes": [{"name": "work", "hostPath": {"path": work.to_str().unwrap()}}],
                "containers": [{
                    "name": "count",
                    "image": "docker.io/library/busybox:1.36",
                    "command": ["/bin/sh", "-c", script],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }],
            },
        }))
        .unwrap();
}

/// The count the workload last appended to `work/progress`. The workloads append, never
/// rewrite: CRIU refuses to restore a file held open for a truncating write whose size changed
/// since the dump, and the kubelet checkpoint leaves the source writing.
pub fn progress(work: &Path) -> Option<u64> {
    std::fs::read_to_string(work.join("progress"))
        .ok()
        .and_then(|text| text.lines().last()?.trim().parse().ok())
}

/// How many times the workload's command started (lines of `work/starts`).
pub fn starts(work: &Path) -> usize {
    std::fs::read_to_string(work.join("starts"))
        .unwrap()
        .lines()
        .count()
}

pub fn phase(migration: &Value) -> String {
    migration["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Polls `check` every 250 ms for up to `limit`.
pub async fn eventually<T>(what: &str, limit: Duration, check: impl FnMut() -> Option<T>) -> T {
    eventually_every(Duration::from_millis(250), what, limit, check).await
}

/// Polls `check` every `every` for up to `limit`.
pub async fn eventually_every<T>(
    every: Duration,
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(every).await;
    }
}

/// Waits (60 s at most) until [`POD`] is Running and has counted to 10.
pub async fn await_counter_counting(cluster: &KubeCluster, work: &Path, what: &str) {
    eventually(what, Duration::from_secs(60), || {
        let pod = cluster.get(&["pod", POD, "-n", "default"])?;
        (pod["status"]["phase"] == "Running" && progress(work).unwrap_or(0) >= 10).then_some(())
    })
    .await;
}

/// The newest checkpoint of [`POD`] the controller recorded (the pod's
/// `checkpoint.automigrate.dev/latest` annotation): what it restores from once the pod's node
/// is gone. (A copy on a node that the controller has not recorded yet does not count for it:
/// it restarts the pod fresh then, "no stored checkpoint survives".)
pub fn recorded_checkpoint(cluster: &KubeCluster) -> Option<Value> {
    let pod = cluster.get(&["pod", POD, "-n", "default"])?;
    serde_json::from_str(
        pod["metadata"]["annotations"]["checkpoint.automigrate.dev/latest"].as_str()?,
    )
    .ok()
}

/// Waits up to `limit_s` seconds until the controller has recorded a checkpoint of [`POD`]
/// held on `node` (with `new`, another than the one it had recorded when the wait began), and,
/// with `on_disk`, until `node`'s agent store holds one too.
pub async fn await_recorded_checkpoint(
    cluster: &KubeCluster,
    node: &str,
    (new, on_disk): (bool, bool),
    limit_s: u64,
    what: &str,
) {
    let earlier = recorded_checkpoint(cluster)
        .filter(|_| new)
        .map(|latest| latest["id"].clone());
    let earlier = earlier.as_ref();
    eventually(what, Duration::from_secs(limit_s), || {
        let latest = recorded_checkpoint(cluster)?;
        let held = latest["heldOn"].as_array()?.iter().any(|on| on == node);
        (Some(&latest["id"]) != earlier
            && held
            && (!on_disk || stored_checkpoints(cluster, node) > 0))
            .then_some(())
    })
    .await;
}

/// The checkpoints of [`POD`] in a node's agent store.
pub fn stored_checkpoints(cluster: &KubeCluster, node: &str) -> usize {
    std::fs::read_dir(cluster.node_dir(node).join("checkpoints/default").join(POD))
        .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

/// Waits (240 s at most) until the Migration of a pod in `default` ends; returns it.
pub async fn await_migration_end(cluster: &KubeCluster) -> Value {
    eventually("the Migration to end", Duration::from_secs(240), || {
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
    .await
}

/// Waits for the Migration to end [`await_migration_end`], which must be `Succeeded`, and then
/// (60 s at most) for its replacement pod to run. Returns the Migration, the replacement's name
/// and the pod.
pub async fn await_replacement_running(cluster: &KubeCluster) -> (Value, String, Value) {
    let migration = await_migration_end(cluster).await;
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
    let pod = await_pod_running(cluster, &replacement, "the replacement Running").await;
    (migration, replacement, pod)
}

/// The pod runs a checkpoint image (a restore), not the workload's own image (a fresh start).
pub fn assert_runs_a_checkpoint_image(pod: &Value, label: &str) {
    let image = pod["spec"]["containers"][0]["image"].as_str().unwrap();
    assert!(
        image.starts_with("localhost/automigrate/"),
        "{label}the replacement runs {image}, not a checkpoint image"
    );
}

/// Waits (60 s at most) until the pod `name` in `default` is Running; returns it.
pub async fn await_pod_running(cluster: &KubeCluster, name: &str, what: &str) -> Value {
    eventually(what, Duration::from_secs(60), || {
        let pod = cluster.get(&["pod", name, "-n", "default"])?;
        (pod["status"]["phase"] == "Running").then_some(pod)
    })
    .await
}

/// Waits (30 s at most) until the workload counts past `from`.
pub async fn await_counting_past(work: &Path, from: u64, what: &str) {
    eventually(what, Duration::from_secs(30), || {
        (progress(work).unwrap_or(0) > from).then_some(())
    })
    .await;
}

/// Prints what the cluster looked like, and every log's end, when the test fails.
pub struct DumpOnFailure<'a>(pub &'a KubeCluster);

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
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("===== {} (last {} lines) =====", path.display(), tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The log of the controller replica `replica` (`automigrate-controller-<replica>`).
pub fn controller_log(cluster: &KubeCluster, replica: usize) -> String {
    std::fs::read_to_string(cluster.logs_dir().join(format!("controller-{replica}.log"))).unwrap()
}

/// Running copies of [`POD`] at one sample: `(node, container id)`.
pub type Copies = Vec<(String, String)>;

/// The running copies of [`POD`] on every node (runc state; a paused container counts): the
/// original (`default_counter_<uid8>`) and any replacement (`default_counter-<n>_...`).
pub fn counter_copies(cluster: &KubeCluster) -> Copies {
    cluster
        .running_containers()
        .into_iter()
        .filter(|(_, id)| id.starts_with(&format!("default_{POD}")))
        .collect()
}

/// Samples [`counter_copies`] every 50 ms, and the workload's count where it is given a work
/// directory, until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    samples: Arc<Mutex<Vec<(Instant, Copies)>>>,
    counts: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Sampler {
    pub fn start(cluster: Arc<KubeCluster>, work: Option<PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, samples, counts) = (stop.clone(), samples.clone(), counts.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let running = counter_copies(&cluster);
                    samples.lock().unwrap().push((Instant::now(), running));
                    if let Some(count) = work.as_deref().and_then(progress) {
                        counts.lock().unwrap().push((Instant::now(), count));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
            samples,
            counts,
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Every sample: when, and the copies running then.
    pub fn samples(&self) -> Vec<(Instant, Copies)> {
        self.samples.lock().unwrap().clone()
    }

    /// The samples that found two or more running copies.
    pub fn doubles(&self) -> Vec<Copies> {
        self.samples()
            .into_iter()
            .map(|(_, copies)| copies)
            .filter(|copies| copies.len() > 1)
            .collect()
    }

    /// Restored, never restarted: the workload's command ran once, and the count sampled at or
    /// after `since` (the trouble) never fell below 10 (the checkpoints a migration may use were
    /// taken after it reached 10; a fresh start counts from 1). Returns that lowest count.
    pub fn assert_resumed(&self, work: &Path, since: Instant, label: &str) -> u64 {
        assert_eq!(
            starts(work),
            1,
            "{label}the pod's command ran again: a restart, not a restore"
        );
        let lowest = self.lowest_count_since(since).unwrap();
        assert!(
            lowest >= 10,
            "{label}the count fell to {lowest} after the trouble: restarted, not restored"
        );
        lowest
    }

    /// The lowest count sampled at or after `since`.
    pub fn lowest_count_since(&self, since: Instant) -> Option<u64> {
        self.counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, count)| *count)
            .min()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Tears the cluster down (the sampler must have let go of it) and removes its state.
pub async fn teardown(cluster: Arc<KubeCluster>, root: &Path) {
    let cluster = Arc::try_unwrap(cluster).expect("the sampler let go of the cluster");
    cluster.teardown().await.unwrap();
    let _ = std::fs::remove_dir_all(root);
}
