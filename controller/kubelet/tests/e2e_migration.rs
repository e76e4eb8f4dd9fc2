//! End to end on the local cluster: the real `automigrate-controller` and `automigrate-agent`
//! binaries move a running process from one local kubelet to another.
//!
//! Every component runs as its own child process, configured as `deploy/` configures it:
//! `automigrate-apiserver` on loopback; two `automigrate-kubelet`s (node-a on 127.0.0.2,
//! node-b on 127.0.0.3); on each node an `automigrate-agent` with `--backend kubelet` (bearer
//! token, node TLS certificates from `automigrate transfer certs`, the kubelet checkpoint API
//! through the API server's node proxy, checkpoint images imported into the node's image store
//! with `automigrate-kubelet import-image`); two `automigrate-controller` replicas with leader
//! election. The nodes' state lives on tmpfs (`/dev/shm`), so a nearly full build disk does not
//! put them under DiskPressure, where the controller moves nothing to them.
//! Each agent runs as its node's agent DaemonSet pod (`hostNetwork`, as deploy/agent.yaml's
//! labels and settings), started by that node's kubelet under runc, and the controller finds it
//! as on a cluster: the Running agent pod on the node, its pod IP and the agent port (see
//! docs/local-cluster.md, "End to end").
//!
//! A protected pod on node-a counts in a shell; `kubectl-migrate` asks for a move to node-b.
//! The test reads the Migration back from the API server (Succeeded, its phases in the history),
//! finds the replacement Running on node-b, checks the counter went on from where it was
//! (its command never ran again, it never restarted at 1), and samples `runc list` on both
//! nodes throughout: never two running copies. Every child process and container is removed
//! when the test ends, also when it fails (the logs of every component are printed then).
//!
//! Needs root, runc and CRIU, and the binaries built first:
//! `cargo build -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent
//! -p automigrate-operator -p automigrate --locked`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const NODES: [(&str, Ipv4Addr); 2] = [
    ("node-a", Ipv4Addr::new(127, 0, 0, 2)),
    ("node-b", Ipv4Addr::new(127, 0, 0, 3)),
];
const AGENT_TOKEN: &str = "local-cluster-e2e-agent-token-0123456789";
const POD: &str = "counter";

/// A binary of the workspace: the kubelet's is this crate's; the others are built beside it.
fn binary(name: &str) -> PathBuf {
    if name == "automigrate-kubelet" {
        return PathBuf::from(env!("CARGO_BIN_EXE_automigrate-kubelet"));
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p automigrate-apiserver -p \
         automigrate-kubelet -p automigrate-agent -p automigrate-operator -p automigrate --locked`",
        path.display()
    );
    path
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port free on every node address (for the agents, whose port the controller takes as one
/// setting for all nodes).
fn free_port_on_all_nodes() -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind(SocketAddr::from((NODES[0].1, 0))).unwrap();
        let port = first.local_addr().unwrap().port();
        if TcpListener::bind(SocketAddr::from((NODES[1].1, port))).is_ok() {
            return port;
        }
    }
    panic!("no port free on both node addresses");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The running cluster: its children, its runc roots and its directory. Dropping it kills every
/// child, removes every container and, if the test is failing, prints every log.
struct Cluster {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    children: Vec<(String, Child)>,
    runc_roots: Vec<PathBuf>,
}

impl Cluster {
    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    fn spawn(&mut self, name: &str, command: &mut Command) {
        std::fs::create_dir_all(self.dir.path().join("logs")).unwrap();
        let log = std::fs::File::create(self.log(name)).unwrap();
        let child = command
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {name}: {error}"));
        self.children.push((name.to_string(), child));
    }

    /// Fails at once, with its log, if a component has exited.
    fn check_alive(&mut self) {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(
                    self.dir.path().join("logs").join(format!("{name}.log")),
                )
                .unwrap_or_default();
                panic!("{name} exited ({status}):\n{log}");
            }
        }
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        self.kubectl(&all)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
    }

    fn apply_json(&self, object: &Value) {
        let path = self.dir.path().join("object.json");
        std::fs::write(&path, object.to_string()).unwrap();
        self.kubectl(&["apply", "--validate=false", "-f", path.to_str().unwrap()])
            .unwrap_or_else(|error| panic!("kubectl apply {object}: {error}"));
    }

    /// Polls `check` every 250 ms for up to `limit`, failing early if a component died.
    fn eventually<T>(
        &mut self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            self.check_alive();
            assert!(start.elapsed() < limit, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn stop(&mut self) {
        self.stop_children();
        for root in &self.runc_roots {
            remove_containers(root);
        }
    }

    fn stop_children(&mut self) {
        // The controller first, so it starts nothing new; kubelets leave their containers
        // running (as CRI-O does), so the runc roots are emptied afterwards.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for what in [
                "migrations.automigrate.dev",
                "events",
                "pods",
                "nodes",
                "leases",
            ] {
                let text = self.kubectl(&["get", what, "-A", "-o", "yaml"]);
                eprintln!(
                    "===== kubectl get {what} -A =====\n{}",
                    text.unwrap_or_else(|e| e)
                );
            }
            let logs = std::fs::read_dir(self.dir.path().join("logs"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path());
            for path in logs {
                let name = path.display();
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("===== {name} (last {} lines) =====", tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
            if std::env::var_os("AUTOMIGRATE_E2E_KEEP").is_some() {
                eprintln!("keeping {}", self.dir.path().display());
                let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            }
        }
        self.stop();
    }
}

/// `runc list`: the ids of the containers in a runc root, with their status (none where runc
/// cannot be run: the sampler and the teardown go on).
fn runc_list(root: &Path) -> Vec<(String, String)> {
    common::runc_list(root).unwrap_or_default()
}

/// Kills every container of a runc root, waits for it to stop, deletes it (a forced delete of
/// a container still dying leaves its cgroups behind).
fn remove_containers(root: &Path) {
    if !root.exists() {
        return;
    }
    let runc = |args: &[&str]| {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(root)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    for (id, _) in runc_list(root) {
        runc(&["kill", &id, "KILL"]);
    }
    for _ in 0..100 {
        if runc_list(root)
            .iter()
            .all(|(_, status)| status != "running")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (id, _) in runc_list(root) {
        runc(&["delete", "--force", &id]);
    }
}

/// `runc list` on every node: the running containers of the counter pod (source or
/// replacement), with their node.
fn running_counters(roots: &[(String, PathBuf)]) -> Vec<(String, String)> {
    let mut running = Vec::new();
    for (node, root) in roots {
        for (id, status) in runc_list(root) {
            if id.starts_with(&format!("default_{POD}")) && status == "running" {
                running.push((node.clone(), id));
            }
        }
    }
    running
}

/// Processes whose command line names `dir` (the kubelets' `runc run` wrappers, containers).
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

/// The sampling thread, stopped and joined before the cluster is torn down (it is declared
/// after the cluster), also when the test fails: a `runc list` on a removed root recreates it.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
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

/// The counter's last value (`None` before its first). The counter appends, never rewrites:
/// CRIU refuses to restore a file held open for a truncating write whose size changed since
/// the dump, and the kubelet checkpoint leaves the source writing.
fn progress(work: &Path) -> Option<u64> {
    std::fs::read_to_string(work.join("progress"))
        .ok()
        .and_then(|text| text.lines().last()?.trim().parse().ok())
}

fn phase(migration: &Value) -> String {
    migration["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn controller_and_agents_migrate_a_running_process_between_local_kubelets() {
    if common::skip_privileged(
        "controller_and_agents_migrate_a_running_process_between_local_kubelets",
    ) {
        return;
    }
    // On tmpfs: the kubelets report DiskPressure below 10 % free on their root dir's file
    // system (the real kubelet's nodefs threshold), and the controller takes no pod to a node
    // under pressure; a build machine's disk is often that full.
    let dir = tempfile::Builder::new()
        .prefix("automigrate-e2e-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let root = dir.path().to_path_buf();
    let mut cluster = Cluster {
        kubeconfig: root.join("kubeconfig"),
        dir,
        children: Vec::new(),
        runc_roots: NODES
            .iter()
            .map(|(node, _)| root.join(node).join("kubelet/runc"))
            .collect(),
    };

    // The API server; its kubeconfig appears once it listens.
    let kubeconfig = cluster.kubeconfig.clone();
    cluster.spawn(
        "apiserver",
        Command::new(binary("automigrate-apiserver"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(&kubeconfig),
    );
    cluster.eventually(
        "the API server's kubeconfig",
        Duration::from_secs(30),
        |c| c.kubeconfig.exists().then_some(()),
    );
    let server: serde_json::Value = {
        let text = cluster.kubectl(&["config", "view", "-o", "json"]).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let api_url = server["clusters"][0]["cluster"]["server"]
        .as_str()
        .unwrap()
        .to_string();

    // What `kubectl apply -k deploy/` installs that the local cluster uses: the namespace, the
    // CRD and the default policy.
    let deploy = repo().join("deploy");
    for manifest in ["namespace.yaml", "crd.yaml", "policies/default.yaml"] {
        let path = deploy.join(manifest);
        cluster
            .kubectl(&["apply", "--validate=false", "-f", path.to_str().unwrap()])
            .unwrap_or_else(|error| panic!("applying {manifest}: {error}"));
    }

    // Secrets as README's "Install on a cluster" makes them: the agents' token, node certificates.
    let token_file = root.join("agent-token");
    std::fs::write(&token_file, format!("{AGENT_TOKEN}\n")).unwrap();
    let tls = root.join("tls");
    let status = Command::new(binary("automigrate"))
        .args(["transfer", "certs", "--out"])
        .arg(&tls)
        .args(["--node", "node-a", "--node", "node-b"])
        .args(["--san", "127.0.0.2", "--san", "127.0.0.3"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "automigrate transfer certs failed");

    // The nodes: a kubelet each, the agent's DaemonSet pod, the agent beside it.
    let agent_port = free_port_on_all_nodes();
    let transfer_port = free_port_on_all_nodes();
    for (node, ip) in NODES {
        let node_dir = root.join(node);
        let kubelet_dir = node_dir.join("kubelet");
        std::fs::create_dir_all(&kubelet_dir).unwrap();
        cluster.spawn(
            &format!("kubelet-{node}"),
            Command::new(binary("automigrate-kubelet"))
                .args([
                    "--node-name",
                    node,
                    "--node-ip",
                    &ip.to_string(),
                    "--port",
                    "0",
                ])
                .args([
                    "--node-status-update-frequency",
                    "1s",
                    "--lease-renew-interval",
                    "1s",
                ])
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .arg("--root-dir")
                .arg(&kubelet_dir),
        );
    }
    cluster.eventually("both nodes Ready", Duration::from_secs(60), |c| {
        let nodes = c.get(&["nodes"])?;
        let ready = nodes["items"]
            .as_array()?
            .iter()
            .filter(|node| {
                node["status"]["conditions"]
                    .as_array()
                    .is_some_and(|conditions| {
                        conditions
                            .iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            })
            .count();
        (ready == 2).then_some(())
    });
    // The agent DaemonSet's pod on each node, as deploy/agent.yaml makes it, run by the node's
    // kubelet: `hostNetwork` (its pod IP is the node's, where the controller calls it), the
    // binary and the node's directories as `hostPath` volumes at their host paths (the store,
    // the kubelet's checkpoint directory, the token and TLS files, the image store that the
    // import command writes). Its output goes to a log file: the kubelet keeps no logs.
    let bin_dir = binary("automigrate-agent").parent().unwrap().to_path_buf();
    for (node, ip) in NODES {
        let node_dir = root.join(node);
        let kubelet_dir = node_dir.join("kubelet");
        let import = format!(
            "{} import-image --root-dir {} oci:{{layout}}:{{tag}} {{image}}",
            binary("automigrate-kubelet").display(),
            kubelet_dir.display()
        );
        let log = cluster.log(&format!("agent-{node}"));
        let env = [
            ("NODE_NAME", node.to_string()),
            ("AUTOMIGRATE_TOKEN_FILE", token_file.display().to_string()),
            (
                "AUTOMIGRATE_TLS_CERT",
                tls.join(format!("{node}.pem")).display().to_string(),
            ),
            (
                "AUTOMIGRATE_TLS_KEY",
                tls.join(format!("{node}-key.pem")).display().to_string(),
            ),
            (
                "AUTOMIGRATE_TLS_CA",
                tls.join("ca.pem").display().to_string(),
            ),
            ("AUTOMIGRATE_API_LISTEN", format!("{ip}:{agent_port}")),
            (
                "AUTOMIGRATE_TRANSFER_LISTEN",
                format!("{ip}:{transfer_port}"),
            ),
            (
                "AUTOMIGRATE_DATA_ROOT",
                node_dir.join("data").display().to_string(),
            ),
            (
                "AUTOMIGRATE_STORE_ROOT",
                node_dir.join("checkpoints").display().to_string(),
            ),
            (
                "AUTOMIGRATE_KUBELET_CHECKPOINT_DIR",
                kubelet_dir.join("checkpoints").display().to_string(),
            ),
            ("AUTOMIGRATE_KUBE_API", api_url.clone()),
            ("AUTOMIGRATE_IMAGE_IMPORT_COMMAND", import),
            ("RUST_LOG", "info".to_string()),
            ("NO_COLOR", "1".to_string()),
        ]
        .map(|(name, value)| json!({"name": name, "value": value}));
        cluster.apply_json(&json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": format!("automigrate-agent-{node}"),
                "namespace": "automigrate-system",
                "labels": {
                    "app.kubernetes.io/name": "automigrate",
                    "app.kubernetes.io/component": "agent",
                },
            },
            "spec": {
                "nodeName": node,
                "hostNetwork": true,
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "agent",
                    "image": "ghcr.io/automigrate/automigrate-agent:0.1.0",
                    "command": ["/bin/sh", "-c", format!("exec \"$0\" \"$@\" >> {} 2>&1", log.display()),
                        binary("automigrate-agent").display().to_string(),
                        "--backend", "kubelet", "--log-format", "text"],
                    "env": env,
                    "volumeMounts": [
                        {"name": "bin", "mountPath": bin_dir.display().to_string(), "readOnly": true},
                        {"name": "cluster", "mountPath": root.display().to_string()},
                    ],
                }],
                "volumes": [
                    {"name": "bin", "hostPath": {"path": bin_dir.display().to_string()}},
                    {"name": "cluster", "hostPath": {"path": root.display().to_string()}},
                ],
            },
        }));
    }
    cluster.eventually("the agent pods Running", Duration::from_secs(60), |c| {
        let pods = c.get(&["pods", "-n", "automigrate-system"])?;
        let running = pods["items"]
            .as_array()?
            .iter()
            .filter(|pod| pod["status"]["phase"] == "Running" && pod["status"]["podIP"].is_string())
            .count();
        (running == 2).then_some(())
    });
    cluster.eventually("both agents serving", Duration::from_secs(60), |_| {
        NODES
            .iter()
            .all(|(_, ip)| std::net::TcpStream::connect((*ip, agent_port)).is_ok())
            .then_some(())
    });
    // The port accepts once it is bound, before the agent logs that it serves and before its
    // startup task has probed the backend, so the log lines are waited for (60 s at most)
    // before they are asserted.
    let agent_log = |node: &str| {
        std::fs::read_to_string(cluster.log(&format!("agent-{node}"))).unwrap_or_default()
    };
    let is_the_agent = |log: &str| log.contains("agent serving") && log.contains("backend=kubelet");
    let logged_by = Instant::now() + Duration::from_secs(60);
    while !NODES.iter().all(|(node, _)| is_the_agent(&agent_log(node)))
        && Instant::now() < logged_by
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (node, _) in NODES {
        let log = agent_log(node);
        assert!(
            is_the_agent(&log),
            "the agent pod on {node} is not the agent:\n{log}"
        );
    }

    // The controller, as deploy/controller.yaml runs it: two replicas, one leader.
    for replica in 0..2 {
        cluster.spawn(
            &format!("controller-{replica}"),
            Command::new(binary("automigrate-controller"))
                .args(["--log-format", "text"])
                .env(
                    "AUTOMIGRATE_IDENTITY",
                    format!("automigrate-controller-{replica}"),
                )
                .env("AUTOMIGRATE_NAMESPACE", "automigrate-system")
                .env("AUTOMIGRATE_AGENT_TOKEN_FILE", &token_file)
                .env("AUTOMIGRATE_LISTEN", format!("127.0.0.1:{}", free_port()))
                .env("AUTOMIGRATE_AGENT_PORT", agent_port.to_string())
                .env("AUTOMIGRATE_AGENT_TRANSFER_PORT", transfer_port.to_string())
                .env("AUTOMIGRATE_DECISION_INTERVAL", "1s")
                .env("AUTOMIGRATE_EXECUTOR_INTERVAL", "1s")
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
        );
    }

    // The protected workload on node-a: a counter whose state is only in the shell's memory.
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    cluster.apply_json(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD,
            "namespace": "default",
            "annotations": {
                "automigrate.dev/protect": "true",
                "automigrate.dev/mode": "transparent",
                "automigrate.dev/checkpoint-interval": "1m",
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
                     echo $i >> /work/progress; sleep 0.2; done"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }],
        },
    }));
    cluster.eventually(
        "the counter Running on node-a",
        Duration::from_secs(60),
        |c| {
            let pod = c.get(&["pod", POD, "-n", "default"])?;
            (pod["status"]["phase"] == "Running" && progress(&work).unwrap_or(0) >= 10)
                .then_some(())
        },
    );

    // Sample every node's runc state from now on (never two running copies), and the counter.
    let roots: Vec<(String, PathBuf)> = NODES
        .iter()
        .map(|(node, _)| (node.to_string(), root.join(node).join("kubelet/runc")))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let doubles = Arc::new(Mutex::new(Vec::new()));
    let samples = Arc::new(Mutex::new(0_u64));
    let counts = Arc::new(Mutex::new(Vec::new()));
    let mut sampler = {
        let (stopped, doubles, samples, counts, roots, work) = (
            stop.clone(),
            doubles.clone(),
            samples.clone(),
            counts.clone(),
            roots.clone(),
            work.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let running = running_counters(&roots);
                if running.len() > 1 {
                    doubles.lock().unwrap().push(running);
                }
                *samples.lock().unwrap() += 1;
                // Stamped before the read: a value stamped after the request was read after it.
                let at = Instant::now();
                if let Some(count) = progress(&work) {
                    counts.lock().unwrap().push((at, count));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Sampler {
            stop: stop.clone(),
            thread: Some(thread),
        }
    };

    // Ask for the move as `kubectl migrate` does.
    let before = progress(&work).unwrap();
    let requested_at = Instant::now();
    let output = Command::new(binary("kubectl-migrate"))
        .args([POD, "--to", "node-b", "-n", "default", "--no-follow"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl-migrate: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let migration = cluster.eventually("the Migration to end", Duration::from_secs(180), |c| {
        let list = c.get(&["migrations.automigrate.dev", "-n", "default"])?;
        let migration = list["items"].as_array()?.first()?.clone();
        let phase = phase(&migration);
        matches!(
            phase.as_str(),
            "Succeeded" | "RolledBack" | "Restarted" | "Failed"
        )
        .then_some(migration)
    });
    assert_eq!(
        phase(&migration),
        "Succeeded",
        "the Migration ended otherwise: {:#}",
        migration["status"]
    );
    let history: Vec<String> = migration["status"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|timing| timing["phase"].as_str().unwrap_or_default().to_string())
        .collect();
    for expected in [
        "Checkpointing",
        "Transferring",
        "Fencing",
        "Restoring",
        "Verifying",
    ] {
        assert!(
            history.iter().any(|phase| phase == expected),
            "phase {expected} missing from the history {history:?}"
        );
    }

    // The replacement runs on node-b, restored, and counts on.
    let replacement = migration["status"]["replacementPod"]
        .as_str()
        .expect("the Migration names its replacement pod")
        .to_string();
    let pod = cluster.eventually("the replacement Running", Duration::from_secs(60), |c| {
        let pod = c.get(&["pod", &replacement, "-n", "default"])?;
        (pod["status"]["phase"] == "Running").then_some(pod)
    });
    assert_eq!(pod["spec"]["nodeName"], "node-b");
    // Restored from the checkpoint image the target's agent built and imported.
    let image = pod["spec"]["containers"][0]["image"].as_str().unwrap();
    assert!(
        image.starts_with("localhost/automigrate/"),
        "the replacement runs {image}, not a checkpoint image"
    );
    assert!(
        pod["metadata"]["annotations"]["migration.automigrate.dev/restored-from"].is_string(),
        "the replacement does not say which checkpoint it was restored from"
    );
    let resumed = progress(&work).unwrap_or(0);
    cluster.eventually(
        "the restored counter to count on",
        Duration::from_secs(30),
        |_| (progress(&work).unwrap_or(0) > resumed).then_some(()),
    );
    let after = progress(&work).unwrap();
    assert!(
        after > before,
        "the counter went back: {after} after the move, {before} before it (restarted?)"
    );
    // Resumed from the checkpoint taken after the request: the count never fell below the
    // value it had then (a fresh start would count from 1 again).
    let lowest = counts
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at >= requested_at)
        .map(|(_, count)| *count)
        .min()
        .unwrap();
    assert!(
        lowest >= before,
        "the counter fell to {lowest} after the request (it was {before}): restarted, not restored"
    );
    // The kubelet checkpoint API leaves the source running (`--leave-running`, as CRI-O does),
    // so the source counts on until it is fenced and the restored copy repeats those counts:
    // reported, not asserted (it depends on timing).
    let repeated = counts
        .lock()
        .unwrap()
        .windows(2)
        .map(|pair| pair[0].1.saturating_sub(pair[1].1))
        .max()
        .unwrap_or(0);
    eprintln!("counts repeated after the restore (source ran on after its checkpoint): {repeated}");
    let starts = std::fs::read_to_string(work.join("starts")).unwrap();
    assert_eq!(
        starts.lines().count(),
        1,
        "the pod's command ran again instead of a restore"
    );
    assert!(
        cluster.get(&["pod", POD, "-n", "default"]).is_none(),
        "the source pod is still there"
    );
    let running = running_counters(&roots);
    assert_eq!(running.len(), 1, "containers running: {running:?}");
    assert_eq!(running[0].0, "node-b");

    sampler.stop();
    let doubles = doubles.lock().unwrap().clone();
    let samples = *samples.lock().unwrap();
    assert!(samples > 10, "runc was sampled only {samples} times");
    assert!(doubles.is_empty(), "two copies ran at once: {doubles:?}");
    eprintln!(
        "migration {} succeeded: phases {history:?}; counter {before} before, {after} after; \
         {samples} runc samples, never two copies",
        migration["metadata"]["name"]
    );

    for what in ["nodes,pods,migrations", "lease"] {
        let table = cluster.kubectl(&["get", what, "-A", "-o", "wide"]);
        eprintln!(
            "$ kubectl get {what} -A -o wide\n{}",
            table.unwrap_or_else(|e| e)
        );
    }
    eprintln!("history: {:#}", migration["status"]["history"]);

    // Everything goes away: children, containers and their processes.
    cluster.stop();
    let mut left = processes_under(&root);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = processes_under(&root);
    }
    assert!(left.is_empty(), "processes left: {left:?}");
    for (_, root) in &roots {
        let left = runc_list(root);
        assert!(
            left.is_empty(),
            "containers left in {}: {left:?}",
            root.display()
        );
    }
}
