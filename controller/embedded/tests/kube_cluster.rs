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
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_embedded::kube::{AGENT_PORT, API_PORT, KubeCluster};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_powered_off_node_s_protected_pod_is_restored_on_the_other_node_by_the_real_controller() {
    let Some(_one) = common::begin("kube_cluster power-off").await else {
        return;
    };
    // The protected workload on node-a: a counter whose state is only in the shell's memory,
    // checkpointed every 5 s (the policy replicates each checkpoint to one more node).
    let (cluster, root, work) =
        protected_pod_cluster("kubet", "kube-test", "node-a", COUNTER_SCRIPT).await;
    let dump = DumpOnFailure(&cluster);
    await_counter_counting(&cluster, &work, "the counter Running on node-a").await;
    // Both agents and the counter.
    assert_running_as_runc_lists(&cluster, 3).await;
    let mut sampler = Sampler::start(cluster.clone(), Some(work.clone()));
    // A checkpoint taken after the counter reached 10, replicated to node-b, and the
    // controller knows it (the pod's checkpoint annotation lists node-b): the newest checkpoint
    // it records, what it restores from once node-a is gone.
    let what = "a new checkpoint of the counter on node-b, recorded by the controller";
    await_recorded_checkpoint(&cluster, "node-b", (true, true), 120, what).await;

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

    let (migration, _, pod) = await_replacement_running(&cluster).await;
    assert_eq!(pod["spec"]["nodeName"], "node-b");
    assert_runs_a_checkpoint_image(&pod, "");
    let resumed = progress(&work).unwrap_or(0);
    await_counting_past(&work, resumed, "the restored counter to count on").await;
    sampler.stop();

    // Restored, not restarted: the command ran once, and the count after the power-off never
    // fell below 10 (the newest recorded checkpoint was taken after it reached 10; a fresh
    // start counts from 1).
    sampler.assert_resumed(&work, powered_off_at, "power-off: ");
    let after = progress(&work).unwrap();
    let doubles = sampler.doubles();
    let samples = sampler.samples().len();
    assert!(samples > 10, "runc was sampled only {samples} times");
    assert!(doubles.is_empty(), "two copies ran at once: {doubles:?}");
    let running = counter_copies(&cluster);
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
    let Some(_one) = common::begin("kube_cluster controls").await else {
        return;
    };
    let mut config = two_nodes("kubec", "kube-test");
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
    let log = controller_log(&cluster, new_leader);
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
    let Some(_one) = common::begin("kube_cluster hard failure mid-run").await else {
        return;
    };
    let job = format!(
        "echo started >> /work/starts; i=0; while [ $i -lt {JOB_END} ]; do i=$((i+1)); \
         echo $i >> /work/log; echo $i >> /work/progress; sleep 0.1; done; \
         echo done $i >> /work/done"
    );
    let (cluster, root, work) = protected_pod_cluster("kubeh", "kube-test", "node-a", &job).await;
    let dump = DumpOnFailure(&cluster);
    let half = JOB_END / 2;
    eventually("the job half way", Duration::from_secs(120), || {
        (progress(&work).unwrap_or(0) >= half).then_some(())
    })
    .await;
    let mut sampler = Sampler::start(cluster.clone(), Some(work.clone()));
    // A checkpoint taken past half way, held on node-b and recorded by the controller.
    let what = "a checkpoint taken past half way, on node-b, recorded";
    await_recorded_checkpoint(&cluster, "node-b", (true, false), 60, what).await;
    cluster.power_off("node-a").unwrap();
    let at_power_off = progress(&work).unwrap();
    assert!(
        at_power_off < JOB_END && !work.join("done").exists(),
        "the job ended before the power-off ({at_power_off}): make it longer"
    );

    let migration = await_migration_end(&cluster).await;
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
    assert_eq!(starts(&work), 1, "the command ran again");
    let done = std::fs::read_to_string(work.join("done")).unwrap();
    assert_eq!(done, format!("done {JOB_END}\n"), "the job ended otherwise");
    let doubles = sampler.doubles();
    let samples = sampler.samples().len();
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
