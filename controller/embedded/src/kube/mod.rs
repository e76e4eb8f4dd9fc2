//! The local Kubernetes cluster of real components: [`KubeCluster`].
//!
//! Every node is a network namespace of one [`EmulatedNetwork`], plus one more namespace,
//! `control`, joined to every node by an emulated link ([`KubeClusterConfig::control_rtt`]).
//! In `control` run `automigrate-apiserver` and two `automigrate-controller` replicas with
//! leader election; in every node namespace run `automigrate-kubelet`, which runs the node's
//! `automigrate-agent` as its DaemonSet pod (`hostNetwork`, `--backend kubelet`). Every
//! component is its own child process, entered into its namespace with `nsenter --net` (not
//! `ip netns exec`, whose private /sys lacks the cgroup mounts runc and CRIU need). The recipe
//! is `controller/kubelet/tests/e2e_migration.rs`'s, moved into namespaces.
//!
//! The host reaches the API server through a port forward (`forward.rs`): a host loopback port
//! whose connections are made from inside `control`. [`KubeCluster::kubeconfig`] names it, so
//! `kubectl --kubeconfig <root>/kubeconfig get migrations -A` works from the host;
//! [`KubeCluster::cluster_kubeconfig`] names the API server's address in `control`, for
//! components inside the namespaces.
//!
//! Failures are link cuts and kills, never rescues: [`KubeCluster::power_off`] (kubelet, agent
//! and every container of the node die together, all its links are cut, and the node's
//! processes are kept dead), [`KubeCluster::cut_from_api`] (node <-> control links only),
//! [`KubeCluster::cut_from_peers`] (node <-> other nodes only), [`KubeCluster::set_rtt`],
//! [`KubeCluster::set_node_condition`] (as node-problem-detector would),
//! [`KubeCluster::kill_controller`] / [`KubeCluster::start_controller`]. The harness never
//! deletes a pod, kills a container to prevent a second copy or patches a Migration.
//!
//! Layout of [`KubeClusterConfig::root`] (keep it on tmpfs, `/dev/shm`: the kubelets report
//! DiskPressure below 10 % free on their file system, and the controller moves nothing to a
//! node under pressure):
//!
//! ```text
//! <root>/kubeconfig            host kubeconfig (through the port forward)
//! <root>/control/kubeconfig    in-cluster kubeconfig (the API server's address in `control`)
//! <root>/logs/<component>.log  apiserver, controller-<i>, kubelet-<node>, agent-<node>
//! <root>/agent-token           the agents' bearer token (the Secret automigrate-agent-token)
//! <root>/tls/                  node certificates (`automigrate transfer certs`)
//! <root>/peers                 the agents' peer list (the ConfigMap automigrate-peers)
//! <root>/manifests/            what the harness applied
//! <root>/<node>/kubelet/       the kubelet's root dir (runc/ state, images/, checkpoints/)
//! <root>/<node>/data/          the agent's data root
//! <root>/<node>/checkpoints/   the agent's checkpoint store
//! ```
//!
//! # Where this differs from `deploy/`
//!
//! The same binaries run with the settings of `deploy/agent.yaml` and `deploy/controller.yaml`
//! except:
//!
//! - The controller replicas are processes in the `control` namespace, not pods: there are no
//!   controller Deployment, Service, RBAC or security context (the API server has no
//!   authentication). They listen on `<control address>:8080` and `:8081` (`AUTOMIGRATE_LISTEN`;
//!   deploy: `0.0.0.0:8080` in each pod's own network) and log as text, not JSON. Their
//!   identities are `automigrate-controller-<i>` (deploy: the pod name).
//! - The controller runs with `AUTOMIGRATE_DECISION_INTERVAL=1s` and
//!   `AUTOMIGRATE_EXECUTOR_INTERVAL=1s` (deploy: the defaults 10s and 2s), so a test or demo
//!   does not wait for the next pass; [`KubeClusterConfig::controller_env`] overrides them.
//!   There is no webhook token (no Alertmanager here).
//! - The kubelets post Node status and renew their Lease every 1 s
//!   (`--node-status-update-frequency 1s --lease-renew-interval 1s`; the real kubelet's
//!   defaults are 10 s), see [`KubeClusterConfig::kubelet_status_interval`].
//! - The agent pod is applied per node by the harness (no DaemonSet controller here), named
//!   `automigrate-agent-<node>`, with the labels the controller selects agents by. Its container
//!   runs the workspace's binary through `/bin/sh -c 'exec ... >> <root>/logs/agent-<node>.log'`
//!   (the local kubelet keeps no container logs). Its token, certificates, peer list and state
//!   directories are `hostPath` paths under `<root>` instead of Secrets, a ConfigMap and
//!   `/var/lib/...` (the environment variables carry those paths), and
//!   `AUTOMIGRATE_KUBE_API` names the API server (in deploy the in-cluster service). The image
//!   import command is `automigrate-kubelet import-image` (deploy leaves it to the node's runtime
//!   tooling). No seccomp, capability or read-only-root settings: the local kubelet does not
//!   apply them.
//! - Self-fencing runs for real: the agent pod is `hostPID` (runc signals a container's init by
//!   its host pid; deploy/agent.yaml is too), `AUTOMIGRATE_RUNC_ROOT` is the node's
//!   `<root>/<node>/kubelet/runc` (deploy: containerd's `/run/containerd/runc/k8s.io`) and
//!   `AUTOMIGRATE_SELF_FENCE_CONTAINER_ID` is the local kubelet's container id
//!   [`SELF_FENCE_CONTAINER_ID`] (deploy: the runc id template's default; containerd's ids are
//!   hashes). The timing follows the 1 s Lease renewals ([`KubeClusterConfig::self_fence_timing`]):
//!   agents and controller run with `AUTOMIGRATE_HEARTBEAT_INTERVAL=1s`,
//!   `AUTOMIGRATE_SELF_FENCE_AFTER=3s`, `AUTOMIGRATE_SELF_FENCE_STOP_TIME=2s` (deploy: 10s, 15s,
//!   5s), the controller also with `AUTOMIGRATE_CLOCK_SKEW_ALLOWANCE=1s` (one host clock) and
//!   `AUTOMIGRATE_FENCE_MARGIN=1s` (deploy: 2s, 3s): a safe time of 7 s instead of 25 s, so a
//!   node cut off from the API server counts as fenced once it counts as failed (at the
//!   policy's `leaseTimeout`, or sooner by peer-confirmed failure) and 7 s have passed since its
//!   last heartbeat. For peer-confirmed failure the agents probe every second
//!   (`AUTOMIGRATE_PROBE_INTERVAL=1s`; deploy: 5s) and the controller reads their probes every
//!   second while a Lease is late (`AUTOMIGRATE_PEER_REACH_INTERVAL=1s`; deploy: 2s);
//!   [`FAST_DEFAULT_POLICY`] says `heartbeatInterval: 1s` (default 10s).
//!   [`KubeClusterConfig::controller_env`] and [`KubeClusterConfig::agent_env`] override them.
//! - The default policy is `deploy/policies/default.yaml`, applied first;
//!   [`KubeClusterConfig::policies`] are applied after it (a test may replace `default` with
//!   shorter triggers, see [`FAST_DEFAULT_POLICY`]).

mod forward;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use automigrate_netem::{EmulatedNetwork, Link, NETNS_RUN_DIR, NetworkError};
use serde_json::{Value, json};

use forward::Forward;

/// The API server's port in `control`.
pub const API_PORT: u16 = 6443;
/// The agent's API port on every node (deploy/agent.yaml's `api` port; each node namespace has
/// its own port space, so every agent uses it, as on a cluster).
pub const AGENT_PORT: u16 = 9460;
/// The agent's transfer and probe port on every node.
pub const AGENT_TRANSFER_PORT: u16 = 9461;
/// The first controller replica's metrics/health port in `control` (replica `i`: `+ i`).
pub const CONTROLLER_PORT: u16 = 8080;
/// The path every node has of its own (a kubelet `--host-path-map` to [`KubeCluster::node_dir`]):
/// `data/` is the agent's data root there, as `AUTOMIGRATE_AGENT_DATA_ROOT`'s default
/// `/var/lib/automigrate/data` tells the controller.
pub const NODE_HOST_DIR: &str = "/var/lib/automigrate";
/// The namespace of the controller, its Lease, the agents and the policies.
pub const SYSTEM_NAMESPACE: &str = "automigrate-system";
/// The controller's leader election Lease (in [`SYSTEM_NAMESPACE`]).
pub const LEADER_LEASE: &str = "automigrate-controller";
/// The agents' bearer token (any 32+ characters; the Secret automigrate-agent-token on a
/// cluster).
const AGENT_TOKEN: &str = "local-kube-cluster-agent-token-0123456789";

/// The manifests of `deploy/` the cluster installs (what `kubectl apply -k deploy/` installs
/// that the local cluster uses).
const DEPLOY_NAMESPACE: &str = include_str!("../../../../deploy/namespace.yaml");
const DEPLOY_CRD: &str = include_str!("../../../../deploy/crd.yaml");
const DEPLOY_DEFAULT_POLICY: &str = include_str!("../../../../deploy/policies/default.yaml");

/// A `default` policy like deploy's with the shortest failure triggers the policy floors
/// allow (`leaseTimeout: 15s`, `notReadyGrace: 10s`), the local kubelets' 1 s renewals
/// (`heartbeatInterval: 1s`: peer-confirmed failure after 3 s) and a 1-minute cooldown: for
/// tests and demos that power nodes off and should not wait 30 s + for the controller to notice.
pub const FAST_DEFAULT_POLICY: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: default
  namespace: automigrate-system
  labels:
    automigrate.dev/policy: \"true\"
data:
  policy.yaml: |
    checkpoint:
      interval: 10m
      minInterval: 1s
      retention: {count: 3}
      incremental: true
      replicateTo: 1
    triggers:
      notReadyGrace: 10s
      leaseTimeout: 15s
      heartbeatInterval: 1s
      cooldown: 1m
    restore:
      timeout: 5m
      fallback: rollback
";

/// The agents' `AUTOMIGRATE_SELF_FENCE_CONTAINER_ID`: the local kubelet's runc container id
/// (`automigrate_kubelet::runtime::container_id`).
pub const SELF_FENCE_CONTAINER_ID: &str = "{namespace}_{pod}_{container}_{uid8}";

/// How long [`KubeCluster::create`] waits for each stage (API server, nodes Ready, agents
/// serving, a controller leader).
const STAGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often waits poll.
const POLL: Duration = Duration::from_millis(200);
/// How often the power-off keeper looks at a powered-off node's runc root.
const KEEPER_POLL: Duration = Duration::from_millis(100);

/// What a [`KubeCluster`] is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeClusterConfig {
    /// Names the network namespaces (`amnet<ID>-<prefix>-<i>`); 1-12 of `[a-z0-9-]`.
    pub name_prefix: String,
    /// Node names (Kubernetes names: lower-case letters, digits, `-`).
    pub nodes: Vec<String>,
    /// Round-trip time between nodes `i` and `j` (`i != j`); an empty matrix means 0.
    pub rtt: Vec<Vec<Duration>>,
    /// Round-trip time between the control plane and every node.
    pub control_rtt: Duration,
    /// Labels set on each node's Node object once it registered (node name -> labels).
    pub node_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// State directory (see the module header); keep it on tmpfs (`/dev/shm`).
    pub root: PathBuf,
    /// Where the binaries are: automigrate-apiserver, automigrate-kubelet, automigrate-agent,
    /// automigrate-controller, automigrate (target/debug or target/release).
    pub bin_dir: PathBuf,
    /// Policy ConfigMap YAML files applied after deploy/policies/default.yaml.
    pub policies: Vec<PathBuf>,
    /// Extra environment of both controller replicas (fencing mode, intervals); applied last,
    /// so it overrides the harness's settings.
    pub controller_env: Vec<(String, String)>,
    /// Extra environment of every agent pod's container; applied last.
    pub agent_env: Vec<(String, String)>,
    /// The kubelets' `--node-status-update-frequency` and `--lease-renew-interval`.
    pub kubelet_status_interval: Duration,
    /// How many controller replicas run (deploy: 2).
    pub controller_replicas: usize,
}

impl KubeClusterConfig {
    /// `count` nodes `node-a`, `node-b`, … on a line (RTT between `i` and `j` is
    /// `step × |i − j|`), 1 ms to the control plane, 2 controller replicas, the binaries in
    /// `bin_dir`, state in `root`.
    pub fn line(count: usize, step: Duration, root: PathBuf, bin_dir: PathBuf) -> Self {
        let nodes = (0..count)
            .map(|index| format!("node-{}", char::from(b'a' + (index % 26) as u8)))
            .collect();
        let rtt = (0..count)
            .map(|i| {
                (0..count)
                    .map(|j| step * u32::try_from(i.abs_diff(j)).unwrap_or(u32::MAX))
                    .collect()
            })
            .collect();
        Self {
            name_prefix: "kube".into(),
            nodes,
            rtt,
            control_rtt: Duration::from_millis(1),
            node_labels: BTreeMap::new(),
            root,
            bin_dir,
            policies: Vec::new(),
            controller_env: Vec::new(),
            agent_env: Vec::new(),
            kubelet_status_interval: Duration::from_secs(1),
            controller_replicas: 2,
        }
    }

    /// The self-fencing timing agents and controller replicas share: the kubelets' renewal
    /// period as the heartbeat interval, the agents' 1 s check, and the shortest
    /// `selfFenceAfter` that renewal period allows (3 s at 1 s renewals), a 2 s stop time,
    /// 1 s clock-skew allowance (one host clock) and 1 s margin: a safe time of 7 s.
    pub fn self_fence_timing(&self) -> automigrate_core::fencing::SelfFenceTiming {
        let mut timing = automigrate_core::fencing::SelfFenceTiming {
            heartbeat_interval: self.kubelet_status_interval,
            check_interval: Duration::from_secs(1),
            stop_time: Duration::from_secs(2),
            clock_skew: Duration::from_secs(1),
            margin: Duration::from_secs(1),
            ..Default::default()
        };
        timing.self_fence_after = timing.least_self_fence_after();
        timing
    }

    /// [`Self::self_fence_timing`] as the agents' (`controller: false`) or the controller's
    /// environment.
    fn self_fence_env(&self, controller: bool) -> Vec<(&'static str, String)> {
        let timing = self.self_fence_timing();
        let text = |duration: Duration| format!("{}ms", duration.as_millis());
        let mut env = vec![
            (
                "AUTOMIGRATE_HEARTBEAT_INTERVAL",
                text(timing.heartbeat_interval),
            ),
            (
                "AUTOMIGRATE_SELF_FENCE_CHECK_INTERVAL",
                text(timing.check_interval),
            ),
            (
                "AUTOMIGRATE_SELF_FENCE_AFTER",
                text(timing.self_fence_after),
            ),
            ("AUTOMIGRATE_SELF_FENCE_STOP_TIME", text(timing.stop_time)),
        ];
        // Peer-confirmed failure: the agents say within 2-3 s that a peer stopped answering,
        // and the controller reads that every second while some Lease is late.
        if controller {
            env.push((
                "AUTOMIGRATE_PEER_REACH_INTERVAL",
                text(Duration::from_secs(1)),
            ));
        } else {
            env.push(("AUTOMIGRATE_PROBE_INTERVAL", text(Duration::from_secs(1))));
        }
        if controller {
            env.push(("AUTOMIGRATE_CLOCK_SKEW_ALLOWANCE", text(timing.clock_skew)));
            env.push(("AUTOMIGRATE_FENCE_MARGIN", text(timing.margin)));
        }
        env
    }

    /// The RTT between nodes `a` and `b` (0 where the matrix has no entry).
    pub fn rtt_between(&self, a: usize, b: usize) -> Duration {
        self.rtt
            .get(a)
            .and_then(|row| row.get(b))
            .copied()
            .unwrap_or_default()
    }
}

/// A fresh state directory on tmpfs: `/dev/shm/automigrate-<label>-<pid>-<n>` (not created).
pub fn tmpfs_root(label: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    PathBuf::from("/dev/shm").join(format!("automigrate-{label}-{}-{n}", std::process::id()))
}

/// The directory of the workspace's binaries, found as [`crate::programs::find_program`] finds
/// `automigrate-apiserver` (`$AUTOMIGRATE_BIN_DIR` first).
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("AUTOMIGRATE_BIN_DIR") {
        return Some(PathBuf::from(dir));
    }
    crate::programs::find_program("automigrate-apiserver", "AUTOMIGRATE_APISERVER_BIN")
        .and_then(|path| path.parent().map(Path::to_path_buf))
}

/// What went wrong building or driving the cluster.
#[derive(Debug, thiserror::Error)]
pub enum KubeClusterError {
    #[error("invalid cluster config: {0}")]
    Config(String),
    #[error("{} is missing: build it first with `cargo build -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent -p automigrate-operator -p automigrate --locked`", .0.display())]
    MissingBinary(PathBuf),
    #[error("emulated network: {0}")]
    Network(#[from] NetworkError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting {component}: {source}")]
    Spawn {
        component: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{component} exited ({status}); its log ends:\n{log}")]
    Exited {
        component: String,
        status: String,
        log: String,
    },
    #[error("timed out after {limit:?} waiting for {what}")]
    Timeout { what: String, limit: Duration },
    #[error("no node named {0}")]
    NoSuchNode(String),
    #[error("no controller replica {0}")]
    NoSuchReplica(usize),
    #[error("node {0} is powered off")]
    PoweredOff(String),
    #[error("the cluster was torn down")]
    TornDown,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KubeClusterError {
    let path = path.to_path_buf();
    move |source| KubeClusterError::Io { what, path, source }
}

/// A child process of the harness and where its output goes.
#[derive(Debug)]
struct Component {
    child: Child,
    log: PathBuf,
}

/// The local cluster; see the module header. Dropping it tears it down as well as it can.
#[derive(Debug)]
pub struct KubeCluster {
    config: KubeClusterConfig,
    network: Option<EmulatedNetwork>,
    /// Index of the `control` namespace in the network (after the nodes).
    control: usize,
    kubeconfig: PathBuf,
    cluster_kubeconfig: PathBuf,
    api_url: String,
    token_file: PathBuf,
    forward: Option<Forward>,
    /// Running components by name: `apiserver`, `controller-<i>`, `kubelet-<node>`.
    components: Mutex<BTreeMap<String, Component>>,
    /// runc roots of powered-off nodes, whose containers the keeper keeps dead.
    powered_off: Arc<Mutex<BTreeMap<String, PathBuf>>>,
    keeper_stop: Arc<AtomicBool>,
    keeper: Option<JoinHandle<()>>,
    applied: AtomicU64,
    torn_down: bool,
}

impl KubeCluster {
    /// Builds the network, starts the API server, installs deploy's namespace, CRD and
    /// policies, starts a kubelet per node and the agent pods, then the controller replicas;
    /// returns once every node is Ready, every agent serves and a controller leads. A failure
    /// tears down what was started.
    pub async fn create(config: KubeClusterConfig) -> Result<Self, KubeClusterError> {
        check_config(&config)?;
        if let Some(pid) = running_cluster_pid(&config.root) {
            return Err(KubeClusterError::Config(format!(
                "a cluster already runs in {} (process {pid})",
                config.root.display()
            )));
        }
        for binary in BINARIES {
            let path = config.bin_dir.join(binary);
            if !path.is_file() {
                return Err(KubeClusterError::MissingBinary(path));
            }
        }
        std::fs::create_dir_all(config.root.join("logs"))
            .map_err(io_error("creating", &config.root))?;
        std::fs::create_dir_all(config.root.join("control"))
            .map_err(io_error("creating", &config.root))?;
        std::fs::create_dir_all(config.root.join("manifests"))
            .map_err(io_error("creating", &config.root))?;
        let count = config.nodes.len();
        let network = {
            let config = config.clone();
            EmulatedNetwork::create_with(&config.name_prefix.clone(), count + 1, move |i, j| {
                let rtt = if i == count || j == count {
                    config.control_rtt
                } else {
                    config.rtt_between(i, j)
                };
                Link::delayed(rtt / 2)
            })?
        };
        let control_ip = network.addr(count)?;
        let api_url = format!("http://{}", SocketAddr::from((control_ip, API_PORT)));
        let keeper_stop = Arc::new(AtomicBool::new(false));
        let powered_off = Arc::new(Mutex::new(BTreeMap::new()));
        let keeper = {
            let (stop, roots) = (keeper_stop.clone(), powered_off.clone());
            std::thread::Builder::new()
                .name("kube-power-off-keeper".into())
                .spawn(move || keep_powered_off_dead(&stop, &roots))
                .map_err(|source| KubeClusterError::Spawn {
                    component: "the power-off keeper thread".into(),
                    source,
                })?
        };
        let mut cluster = Self {
            kubeconfig: config.root.join("kubeconfig"),
            cluster_kubeconfig: config.root.join("control").join("kubeconfig"),
            token_file: config.root.join("agent-token"),
            config,
            network: Some(network),
            control: count,
            api_url,
            forward: None,
            components: Mutex::new(BTreeMap::new()),
            powered_off,
            keeper_stop,
            keeper: Some(keeper),
            applied: AtomicU64::new(0),
            torn_down: false,
        };
        // On failure the cluster drops here, which tears down what was started.
        cluster.bring_up(control_ip).await?;
        Ok(cluster)
    }

    async fn bring_up(&mut self, control_ip: Ipv4Addr) -> Result<(), KubeClusterError> {
        // The API server in `control`; its kubeconfig (the in-cluster one) appears once it
        // listens.
        let _ = std::fs::remove_file(&self.cluster_kubeconfig);
        let mut apiserver = Command::new(self.binary("automigrate-apiserver"));
        apiserver
            .arg("--listen")
            .arg(SocketAddr::from((control_ip, API_PORT)).to_string())
            .arg("--allow-non-loopback")
            .arg("--kubeconfig")
            .arg(&self.cluster_kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        self.spawn_in(self.control, "apiserver", apiserver)?;
        let kubeconfig = self.cluster_kubeconfig.clone();
        self.wait("the API server's kubeconfig", STAGE_TIMEOUT, |_| {
            kubeconfig.exists().then_some(())
        })
        .await?;

        // The host's way in: the port forward and the host kubeconfig.
        let forward = Forward::start(forward::connect_in_namespace(
            self.namespace_of(self.control)?.to_string(),
            SocketAddr::from((control_ip, API_PORT)),
        ))
        .map_err(|source| KubeClusterError::Spawn {
            component: "the port forward".into(),
            source,
        })?;
        let host_url = format!("http://{}", forward.local_addr());
        self.forward = Some(forward);
        let text = std::fs::read_to_string(&self.cluster_kubeconfig)
            .map_err(io_error("reading", &self.cluster_kubeconfig))?;
        let host_text = text.replace(&self.api_url, &host_url);
        if host_text == text {
            return Err(KubeClusterError::Config(format!(
                "the API server's kubeconfig does not name {}",
                self.api_url
            )));
        }
        write_file(&self.kubeconfig, host_text.as_bytes())?;
        self.wait(
            "the API server through the port forward",
            STAGE_TIMEOUT,
            |c| c.kubectl(&["get", "namespaces"]).ok().map(|_| ()),
        )
        .await?;

        // What `kubectl apply -k deploy/` installs that the local cluster uses.
        for (name, manifest) in [
            ("namespace.yaml", DEPLOY_NAMESPACE),
            ("crd.yaml", DEPLOY_CRD),
            ("policies-default.yaml", DEPLOY_DEFAULT_POLICY),
        ] {
            let path = self.config.root.join("manifests").join(name);
            write_file(&path, manifest.as_bytes())?;
            self.apply_file(&path)?;
        }
        for policy in self.config.policies.clone() {
            self.apply_file(&policy)?;
        }

        // Secrets as README's "Install on a cluster" makes them.
        write_file(&self.token_file, format!("{AGENT_TOKEN}\n").as_bytes())?;
        let tls = self.tls_dir();
        let mut certs = Command::new(self.binary("automigrate"));
        certs.args(["transfer", "certs", "--out"]).arg(&tls);
        for (index, node) in self.config.nodes.iter().enumerate() {
            certs.arg("--node").arg(node);
            certs
                .arg("--san")
                .arg(self.network()?.addr(index)?.to_string());
        }
        run_checked(&mut certs)?;
        // The agents' peer list (the ConfigMap automigrate-peers): every node's transfer port.
        let mut peers = String::new();
        for (index, node) in self.config.nodes.iter().enumerate() {
            let addr = SocketAddr::from((self.network()?.addr(index)?, AGENT_TRANSFER_PORT));
            peers.push_str(&format!("{node}={addr}\n"));
        }
        write_file(&self.config.root.join("peers"), peers.as_bytes())?;

        // The nodes: a kubelet each.
        for index in 0..self.config.nodes.len() {
            self.start_kubelet(index)?;
        }
        let count = self.config.nodes.len();
        self.wait("every node Ready", STAGE_TIMEOUT, |c| {
            let nodes = c.get(&["nodes"])?;
            let ready = nodes["items"]
                .as_array()?
                .iter()
                .filter(|node| condition_is(node, "Ready", "True"))
                .count();
            (ready == count).then_some(())
        })
        .await?;
        for (node, labels) in self.config.node_labels.clone() {
            let mut args = vec![
                "label".to_string(),
                "node".into(),
                node,
                "--overwrite".into(),
            ];
            args.extend(labels.iter().map(|(key, value)| format!("{key}={value}")));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.kubectl(&args)?;
        }

        // The agent DaemonSet's pod on every node.
        for index in 0..count {
            let pod = self.agent_pod(index)?;
            self.apply(&pod)?;
        }
        self.wait("every agent pod Running", STAGE_TIMEOUT, |c| {
            let pods = c.get(&["pods", "-n", SYSTEM_NAMESPACE])?;
            let running = pods["items"]
                .as_array()?
                .iter()
                .filter(|pod| {
                    pod["status"]["phase"] == "Running" && pod["status"]["podIP"].is_string()
                })
                .count();
            (running == count).then_some(())
        })
        .await?;
        self.wait("every agent serving", STAGE_TIMEOUT, |c| {
            (0..count).all(|index| c.agent_serving(index)).then_some(())
        })
        .await?;

        // The controller, as deploy/controller.yaml runs it: replicas, one leader.
        for replica in 0..self.config.controller_replicas {
            self.start_controller(replica)?;
        }
        if self.config.controller_replicas > 0 {
            self.wait("a controller leader", STAGE_TIMEOUT, |c| {
                c.controller_leader()
            })
            .await?;
        }
        write_file(
            &pid_file(&self.config.root),
            format!("{}\n", std::process::id()).as_bytes(),
        )?;
        tracing::info!(
            root = %self.config.root.display(),
            nodes = count,
            api = %self.api_url,
            "local kube cluster up"
        );
        Ok(())
    }

    // ----- where things are -----

    /// The host-side kubeconfig (through the port forward): `<root>/kubeconfig`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The kubeconfig for processes inside the cluster's namespaces (the API server's address
    /// in `control`): `<root>/control/kubeconfig`.
    pub fn cluster_kubeconfig(&self) -> &Path {
        &self.cluster_kubeconfig
    }

    /// The API server's URL inside the cluster's namespaces.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &KubeClusterConfig {
        &self.config
    }

    /// Node names, in order.
    pub fn nodes(&self) -> &[String] {
        &self.config.nodes
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.config.root
    }

    /// The emulated network (nodes `0..n` in config order, then `control`), for link
    /// parameters the named methods do not cover (loss, rate).
    pub fn network(&self) -> Result<&EmulatedNetwork, KubeClusterError> {
        self.network.as_ref().ok_or(KubeClusterError::TornDown)
    }

    /// A node's index in [`KubeClusterConfig::nodes`] (and in the network).
    pub fn node_index(&self, node: &str) -> Result<usize, KubeClusterError> {
        self.config
            .nodes
            .iter()
            .position(|name| name == node)
            .ok_or_else(|| KubeClusterError::NoSuchNode(node.to_string()))
    }

    /// A node's address (its InternalIP, every hostNetwork pod's IP).
    pub fn node_address(&self, node: &str) -> Result<Ipv4Addr, KubeClusterError> {
        Ok(self.network()?.addr(self.node_index(node)?)?)
    }

    /// The control plane's address.
    pub fn control_address(&self) -> Result<Ipv4Addr, KubeClusterError> {
        Ok(self.network()?.addr(self.control)?)
    }

    /// A node's network namespace name.
    pub fn node_namespace(&self, node: &str) -> Result<String, KubeClusterError> {
        Ok(self.namespace_of(self.node_index(node)?)?.to_string())
    }

    /// The control plane's network namespace name.
    pub fn control_namespace(&self) -> Result<String, KubeClusterError> {
        Ok(self.namespace_of(self.control)?.to_string())
    }

    /// A node's state directory: `kubelet/` (runc state, images, kubelet checkpoints),
    /// `data/` (the agent's data root), `checkpoints/` (the agent's store).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.config.root.join(node)
    }

    /// A node's runc root (where its kubelet's containers are).
    pub fn runc_root(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("kubelet").join("runc")
    }

    /// Where every component's log is: `apiserver.log`, `controller-<i>.log`,
    /// `kubelet-<node>.log`, `agent-<node>.log`.
    pub fn logs_dir(&self) -> PathBuf {
        self.config.root.join("logs")
    }

    fn tls_dir(&self) -> PathBuf {
        self.config.root.join("tls")
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.config.bin_dir.join(name)
    }

    fn namespace_of(&self, index: usize) -> Result<&str, KubeClusterError> {
        Ok(self.network()?.namespace(index)?)
    }

    // ----- the API -----

    /// Runs kubectl on the host kubeconfig; its stdout, or its stderr as the error.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, KubeClusterError> {
        let output = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| KubeClusterError::Spawn {
                component: "kubectl".into(),
                source,
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(KubeClusterError::Command {
                command: format!("kubectl {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            })
        }
    }

    /// `kubectl apply --validate=false` of one object (written under `<root>/manifests/`).
    pub fn apply(&self, object: &Value) -> Result<(), KubeClusterError> {
        let n = self.applied.fetch_add(1, Ordering::Relaxed);
        let name = object["metadata"]["name"].as_str().unwrap_or("object");
        let path = self
            .config
            .root
            .join("manifests")
            .join(format!("{n:04}-{name}.json"));
        write_file(&path, object.to_string().as_bytes())?;
        self.apply_file(&path)
    }

    /// `kubectl apply --validate=false -f <path>` (YAML or JSON, one or more objects).
    pub fn apply_file(&self, path: &Path) -> Result<(), KubeClusterError> {
        let path = path.to_string_lossy();
        self.kubectl(&["apply", "--validate=false", "-f", &path])
            .map(|_| ())
    }

    /// `kubectl get -o json <args>`, parsed; `None` where it fails (not found, unreachable).
    pub fn get(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        self.kubectl(&all)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
    }

    /// Every Migration object, all namespaces, as the API server has them (empty where the
    /// API cannot be read).
    pub fn migrations(&self) -> Vec<Value> {
        self.get(&["migrations.automigrate.dev", "-A"])
            .and_then(|list| list["items"].as_array().cloned())
            .unwrap_or_default()
    }

    // ----- what runs where -----

    /// Every running container on every node, from runc's state (not from the API):
    /// `(node, container id)`. Container ids are `<namespace>_<pod>_<container>_<uid8>`.
    /// Read as `runc list` decides a container's status (see [`runc_status`]) without starting
    /// a process per node, so a monitor may call it every few tens of milliseconds. A paused
    /// container (frozen while a checkpoint is taken) counts: it is still a live copy, and a
    /// check that sampled it mid-checkpoint must not read "nothing runs".
    pub fn running_containers(&self) -> Vec<(String, String)> {
        let mut running = Vec::new();
        for node in &self.config.nodes {
            let root = self.runc_root(node);
            let Ok(entries) = std::fs::read_dir(&root) else {
                continue;
            };
            let mut ids: Vec<String> = entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|id| {
                    matches!(
                        runc_status(&root, id),
                        Some(RuncStatus::Running | RuncStatus::Paused)
                    )
                })
                .collect();
            ids.sort();
            running.extend(ids.into_iter().map(|id| (node.clone(), id)));
        }
        running
    }

    /// [`Self::running_containers`] as `runc list` reports it (one `runc` process per node):
    /// the reference the fast reading is checked against.
    pub fn running_containers_by_runc_list(&self) -> Vec<(String, String)> {
        let mut running = Vec::new();
        for node in &self.config.nodes {
            let mut ids: Vec<String> = runc_list(&self.runc_root(node))
                .into_iter()
                .filter(|(_, status)| status == "running" || status == "paused")
                .map(|(id, _)| id)
                .collect();
            ids.sort();
            running.extend(ids.into_iter().map(|id| (node.clone(), id)));
        }
        running
    }

    /// The pid (in the host's pid namespace) of the node's agent: its pod's container init,
    /// the agent itself (its shell wrapper `exec`s it). `None` if it is not running.
    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        let prefix = format!("{SYSTEM_NAMESPACE}_{}_agent_", agent_pod_name(node));
        let root = self.runc_root(node);
        runc_list_full(&root)
            .into_iter()
            .find(|entry| {
                entry["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(&prefix))
                    && entry["status"] == "running"
            })
            .and_then(|entry| entry["pid"].as_i64())
            .and_then(|pid| i32::try_from(pid).ok())
            .filter(|pid| *pid > 0)
    }

    /// The replica holding the controller's leader Lease (`automigrate-controller-<i>`), if
    /// any holds it.
    pub fn controller_leader(&self) -> Option<usize> {
        let lease = self.get(&["lease", LEADER_LEASE, "-n", SYSTEM_NAMESPACE])?;
        let holder = lease["spec"]["holderIdentity"].as_str()?;
        holder.strip_prefix("automigrate-controller-")?.parse().ok()
    }

    /// Whether a node was powered off.
    pub fn is_powered_off(&self, node: &str) -> bool {
        self.powered_off
            .lock()
            .map(|off| off.contains_key(node))
            .unwrap_or(false)
    }

    // ----- failures -----

    /// Powers the node off: all its links are cut, its kubelet (with its process group) gets
    /// SIGKILL, and so does every container in its runc root (the agent pod included); from
    /// then on the harness keeps that runc root dead (a container a dying `runc` still starts
    /// there is killed: a powered-off machine runs nothing). The node's Node, Lease and pods
    /// stay in the API as the kubelet last wrote them.
    pub fn power_off(&self, node: &str) -> Result<(), KubeClusterError> {
        let index = self.node_index(node)?;
        let network = self.network()?;
        network.isolate(index)?;
        let root = self.runc_root(node);
        self.kill_component(&kubelet_name(node));
        kill_all_containers(&root);
        for _ in 0..100 {
            if runc_list(&root)
                .iter()
                .all(|(_, status)| status != "running")
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // From now on the keeper kills whatever still appears running there.
        if let Ok(mut off) = self.powered_off.lock() {
            off.insert(node.to_string(), root);
        }
        tracing::info!(node, "node powered off");
        Ok(())
    }

    /// Powers a powered-off node on again, as a reboot: the runtime state (runc's, under
    /// `/run` on a real node) is gone, so every container record in its runc root is deleted;
    /// its links come back (to the control plane and to every node that is not powered off)
    /// and its kubelet starts again on the same state directory, which re-registers the node
    /// and runs the pods bound to it (its agent pod among them). What happens to a pod the
    /// controller moved away meanwhile is the product's business.
    pub fn power_on(&self, node: &str) -> Result<(), KubeClusterError> {
        let index = self.node_index(node)?;
        let root = self.runc_root(node);
        let was_off = self
            .powered_off
            .lock()
            .map(|mut off| off.remove(node).is_some())
            .unwrap_or(false);
        if !was_off {
            return Ok(());
        }
        remove_containers(&root);
        let network = self.network()?;
        network.restore(index, self.control)?;
        for (other, name) in self.config.nodes.iter().enumerate() {
            if other != index && !self.is_powered_off(name) {
                network.restore(index, other)?;
            }
        }
        self.start_kubelet(index)?;
        tracing::info!(node, "node powered on");
        Ok(())
    }

    /// SIGKILLs the node's kubelet only (a kubelet crash): its containers run on, as under
    /// CRI-O or containerd, and its Node and Lease go stale.
    pub fn kill_kubelet(&self, node: &str) -> Result<(), KubeClusterError> {
        self.node_index(node)?;
        // Only the kubelet: its containers must survive, so not its process group.
        let component = self
            .components
            .lock()
            .ok()
            .and_then(|mut components| components.remove(&kubelet_name(node)));
        if let Some(mut component) = component {
            let _ = component.child.kill();
            let _ = component.child.wait();
        }
        Ok(())
    }

    /// Starts the node's kubelet again after [`Self::kill_kubelet`] (a running one is left
    /// alone; a powered-off node stays off: use [`Self::power_on`]).
    pub fn restart_kubelet(&self, node: &str) -> Result<(), KubeClusterError> {
        let index = self.live_node(node)?;
        if self.component_running(&kubelet_name(node)) {
            return Ok(());
        }
        self.start_kubelet(index)
    }

    /// Cuts the node's link to the control plane only: the node lives and reaches its peers,
    /// but its kubelet and agent no longer reach the API server (nor the controller it).
    pub fn cut_from_api(&self, node: &str) -> Result<(), KubeClusterError> {
        let index = self.node_index(node)?;
        Ok(self.network()?.cut(index, self.control)?)
    }

    /// Undoes [`Self::cut_from_api`].
    pub fn restore_api(&self, node: &str) -> Result<(), KubeClusterError> {
        let index = self.live_node(node)?;
        Ok(self.network()?.restore(index, self.control)?)
    }

    /// Cuts the node's links to every other node (it still reaches the control plane).
    pub fn cut_from_peers(&self, node: &str) -> Result<(), KubeClusterError> {
        let index = self.node_index(node)?;
        let network = self.network()?;
        for other in (0..self.config.nodes.len()).filter(|other| *other != index) {
            network.cut(index, other)?;
        }
        Ok(())
    }

    /// Undoes [`Self::cut_from_peers`] (links to powered-off nodes stay cut).
    pub fn restore_peers(&self, node: &str) -> Result<(), KubeClusterError> {
        let index = self.live_node(node)?;
        let network = self.network()?;
        for (other, name) in self.config.nodes.iter().enumerate() {
            if other != index && !self.is_powered_off(name) {
                network.restore(index, other)?;
            }
        }
        Ok(())
    }

    /// Sets the round-trip time between two nodes (half each way), keeping a cut link cut.
    pub fn set_rtt(&self, a: &str, b: &str, rtt: Duration) -> Result<(), KubeClusterError> {
        let (a, b) = (self.node_index(a)?, self.node_index(b)?);
        let network = self.network()?;
        for (from, to) in [(a, b), (b, a)] {
            let link = Link {
                delay: rtt / 2,
                ..network.link(from, to)?
            };
            network.set_link(from, to, link)?;
        }
        Ok(())
    }

    /// Sets a condition in the node's status as node-problem-detector does (`type_` e.g.
    /// `KernelDeadlock`, `GPUUnhealthy`; `status` `True`/`False`/`Unknown`), keeping the
    /// others; the kubelet keeps conditions it does not own. Retried on a conflicting write
    /// and checked to have landed.
    pub fn set_node_condition(
        &self,
        node: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Result<(), KubeClusterError> {
        self.node_index(node)?;
        let mut last_error = None;
        for _ in 0..20 {
            match self.try_set_node_condition(node, type_, status, reason) {
                Ok(()) => {
                    // The kubelet read-modify-writes its status; a write of ours that lands
                    // between its read and its write is lost: check it stayed.
                    std::thread::sleep(self.config.kubelet_status_interval + POLL);
                    let stayed = self
                        .get(&["node", node])
                        .is_some_and(|current| condition_is(&current, type_, status));
                    if stayed {
                        return Ok(());
                    }
                }
                Err(error) => last_error = Some(error),
            }
            std::thread::sleep(POLL);
        }
        Err(last_error.unwrap_or_else(|| KubeClusterError::Timeout {
            what: format!("condition {type_}={status} to stay on node {node}"),
            limit: Duration::from_secs(20),
        }))
    }

    fn try_set_node_condition(
        &self,
        node: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Result<(), KubeClusterError> {
        let current = self
            .get(&["node", node])
            .ok_or_else(|| KubeClusterError::Command {
                command: format!("kubectl get node {node}"),
                stderr: "not found or unreachable".into(),
            })?;
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let mut conditions: Vec<Value> = current["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let previous = conditions.iter().position(|c| c["type"] == type_);
        let transition = previous
            .and_then(|at| conditions.get(at))
            .filter(|c| c["status"] == status)
            .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_string))
            .unwrap_or_else(|| now.clone());
        let condition = json!({
            "type": type_,
            "status": status,
            "reason": reason,
            "message": format!("set by the local cluster harness ({reason})"),
            "lastHeartbeatTime": now,
            "lastTransitionTime": transition,
        });
        match previous.and_then(|at| conditions.get_mut(at)) {
            Some(slot) => *slot = condition,
            None => conditions.push(condition),
        }
        let patch = json!({
            "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
            "status": {"conditions": conditions},
        });
        self.kubectl(&[
            "patch",
            "node",
            node,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .map(|_| ())
    }

    /// SIGKILLs a controller replica (`kill -9`, as a crash or an OOM kill would).
    pub fn kill_controller(&self, replica: usize) -> Result<(), KubeClusterError> {
        if replica >= self.config.controller_replicas {
            return Err(KubeClusterError::NoSuchReplica(replica));
        }
        self.kill_component(&controller_name(replica));
        Ok(())
    }

    /// Starts a controller replica (again, after [`Self::kill_controller`]); a running one is
    /// left alone. Its log is appended to.
    pub fn start_controller(&self, replica: usize) -> Result<(), KubeClusterError> {
        if replica >= self.config.controller_replicas {
            return Err(KubeClusterError::NoSuchReplica(replica));
        }
        let name = controller_name(replica);
        if self.component_running(&name) {
            return Ok(());
        }
        let listen = SocketAddr::from((
            self.control_address()?,
            CONTROLLER_PORT + u16::try_from(replica).unwrap_or(0),
        ));
        let mut command = Command::new(self.binary("automigrate-controller"));
        command
            .args(["--log-format", "text"])
            .env("KUBECONFIG", &self.cluster_kubeconfig)
            .env(
                "AUTOMIGRATE_IDENTITY",
                format!("automigrate-controller-{replica}"),
            )
            .env("AUTOMIGRATE_NAMESPACE", SYSTEM_NAMESPACE)
            .env("AUTOMIGRATE_AGENT_TOKEN_FILE", &self.token_file)
            .env("AUTOMIGRATE_LISTEN", listen.to_string())
            .env("AUTOMIGRATE_DECISION_INTERVAL", "1s")
            .env("AUTOMIGRATE_EXECUTOR_INTERVAL", "1s")
            .envs(self.config.self_fence_env(true))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        for (key, value) in &self.config.controller_env {
            command.env(key, value);
        }
        self.spawn_in(self.control, &name, command)
    }

    // ----- internals -----

    fn live_node(&self, node: &str) -> Result<usize, KubeClusterError> {
        let index = self.node_index(node)?;
        if self.is_powered_off(node) {
            return Err(KubeClusterError::PoweredOff(node.to_string()));
        }
        Ok(index)
    }

    fn start_kubelet(&self, index: usize) -> Result<(), KubeClusterError> {
        let node = self
            .config
            .nodes
            .get(index)
            .cloned()
            .ok_or_else(|| KubeClusterError::NoSuchNode(index.to_string()))?;
        let kubelet_dir = self.node_dir(&node).join("kubelet");
        std::fs::create_dir_all(&kubelet_dir).map_err(io_error("creating", &kubelet_dir))?;
        let interval = format!(
            "{}ms",
            self.config.kubelet_status_interval.as_millis().max(1)
        );
        let mut command = Command::new(self.binary("automigrate-kubelet"));
        command
            .arg("--node-name")
            .arg(&node)
            .arg("--node-ip")
            .arg(self.network()?.addr(index)?.to_string())
            .arg("--node-status-update-frequency")
            .arg(&interval)
            .arg("--lease-renew-interval")
            .arg(&interval)
            .arg("--kubeconfig")
            .arg(&self.cluster_kubeconfig)
            .arg("--root-dir")
            .arg(&kubelet_dir)
            // Every node has its own /var/lib/automigrate (deploy/agent.yaml's store hostPath,
            // the agents' data root and store): a pod's hostPath under it is this node's
            // directory, so a moved pod finds the target's dataset, not the source's.
            .arg("--host-path-map")
            .arg(format!(
                "{NODE_HOST_DIR}={}",
                self.node_dir(&node).display()
            ))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        self.spawn_in(index, &kubelet_name(&node), command)
    }

    /// The agent DaemonSet's pod for a node, as deploy/agent.yaml makes it (see the module
    /// header for the differences).
    fn agent_pod(&self, index: usize) -> Result<Value, KubeClusterError> {
        let node = self
            .config
            .nodes
            .get(index)
            .cloned()
            .ok_or_else(|| KubeClusterError::NoSuchNode(index.to_string()))?;
        let root = &self.config.root;
        let node_dir = self.node_dir(&node);
        let kubelet_dir = node_dir.join("kubelet");
        let tls = self.tls_dir();
        let bin_dir = &self.config.bin_dir;
        let import = format!(
            "{} import-image --root-dir {} oci:{{layout}}:{{tag}} {{image}}",
            self.binary("automigrate-kubelet").display(),
            kubelet_dir.display()
        );
        let log = self.logs_dir().join(format!("agent-{node}.log"));
        let mut env: Vec<(String, String)> = [
            ("NODE_NAME", node.clone()),
            (
                "AUTOMIGRATE_TOKEN_FILE",
                self.token_file.display().to_string(),
            ),
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
            (
                "AUTOMIGRATE_PEERS_FILE",
                root.join("peers").display().to_string(),
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
            ("AUTOMIGRATE_KUBE_API", self.api_url.clone()),
            ("AUTOMIGRATE_IMAGE_IMPORT_COMMAND", import),
            // Self-fencing kills the node's protected containers in the kubelet's runc root,
            // by the local kubelet's container ids (`runtime::container_id`).
            (
                "AUTOMIGRATE_RUNC_ROOT",
                kubelet_dir.join("runc").display().to_string(),
            ),
            (
                "AUTOMIGRATE_SELF_FENCE_CONTAINER_ID",
                SELF_FENCE_CONTAINER_ID.to_string(),
            ),
            ("RUST_LOG", "info".to_string()),
            ("NO_COLOR", "1".to_string()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .chain(
            self.config
                .self_fence_env(false)
                .into_iter()
                .map(|(name, value)| (name.to_string(), value)),
        )
        .collect();
        for (key, value) in &self.config.agent_env {
            env.retain(|(name, _)| name != key);
            env.push((key.clone(), value.clone()));
        }
        let env: Vec<Value> = env
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect();
        Ok(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": agent_pod_name(&node),
                "namespace": SYSTEM_NAMESPACE,
                "labels": {
                    "app.kubernetes.io/name": "automigrate",
                    "app.kubernetes.io/component": "agent",
                },
            },
            "spec": {
                "nodeName": node,
                "hostNetwork": true,
                // runc signals a container's init by its host pid: the self-fence kill needs
                // the host's PID namespace.
                "hostPID": true,
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 5,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{
                    "name": "agent",
                    "image": "ghcr.io/automigrate/automigrate-agent:0.1.0",
                    "command": ["/bin/sh", "-c",
                        format!("exec \"$0\" \"$@\" >> {} 2>&1", log.display()),
                        self.binary("automigrate-agent").display().to_string(),
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
        }))
    }

    /// Whether the node's agent accepts connections on its API port (tried from inside the
    /// node's namespace).
    fn agent_serving(&self, index: usize) -> bool {
        let Ok(network) = self.network() else {
            return false;
        };
        let Ok(ip) = network.addr(index) else {
            return false;
        };
        network
            .run_in(index, || {
                std::net::TcpStream::connect_timeout(
                    &SocketAddr::from((ip, AGENT_PORT)),
                    Duration::from_secs(1),
                )
                .is_ok()
            })
            .unwrap_or(false)
    }

    /// Starts `command` inside namespace `index` (`nsenter --net`, which execs the program:
    /// the child's pid is the component's), in its own process group, output to its log.
    fn spawn_in(&self, index: usize, name: &str, command: Command) -> Result<(), KubeClusterError> {
        let namespace = self.namespace_of(index)?.to_string();
        let log = self.logs_dir().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_error("opening", &log))?;
        let file_err = file.try_clone().map_err(io_error("opening", &log))?;
        let mut wrapped = Command::new("nsenter");
        wrapped
            .arg(format!("--net={NETNS_RUN_DIR}/{namespace}"))
            .arg("--")
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file_err);
        let child = wrapped.spawn().map_err(|source| KubeClusterError::Spawn {
            component: name.to_string(),
            source,
        })?;
        if let Ok(mut components) = self.components.lock() {
            components.insert(name.to_string(), Component { child, log });
        }
        Ok(())
    }

    fn component_running(&self, name: &str) -> bool {
        self.components
            .lock()
            .ok()
            .and_then(|mut components| {
                components
                    .get_mut(name)
                    .map(|component| matches!(component.child.try_wait(), Ok(None)))
            })
            .unwrap_or(false)
    }

    /// SIGKILLs a component's whole process group and reaps it.
    fn kill_component(&self, name: &str) {
        let component = self
            .components
            .lock()
            .ok()
            .and_then(|mut components| components.remove(name));
        if let Some(mut component) = component {
            kill_group(&mut component.child);
        }
    }

    /// The first component that exited, with its log's end.
    fn exited_component(&self) -> Option<KubeClusterError> {
        let mut components = self.components.lock().ok()?;
        for (name, component) in components.iter_mut() {
            if let Ok(Some(status)) = component.child.try_wait() {
                return Some(KubeClusterError::Exited {
                    component: name.clone(),
                    status: status.to_string(),
                    log: log_tail(&component.log, 30),
                });
            }
        }
        None
    }

    /// Polls `check` until it answers, failing early when a component exited.
    async fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T, KubeClusterError> {
        let start = Instant::now();
        loop {
            if let Some(value) = check(self) {
                return Ok(value);
            }
            if let Some(error) = self.exited_component() {
                return Err(error);
            }
            if start.elapsed() > limit {
                return Err(KubeClusterError::Timeout {
                    what: what.to_string(),
                    limit,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Kills every component and container, removes every container, stops the port forward
    /// and deletes the network. Reports the first failure; everything is attempted.
    pub async fn teardown(mut self) -> Result<(), KubeClusterError> {
        self.stop_everything()
    }

    fn stop_everything(&mut self) -> Result<(), KubeClusterError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let _ = std::fs::remove_file(pid_file(&self.config.root));
        // Controllers first (they start nothing new), then the kubelets (they leave their
        // containers running, as CRI-O does), then every container, then the API server.
        let names: Vec<String> = self
            .components
            .lock()
            .map(|components| components.keys().cloned().collect())
            .unwrap_or_default();
        for name in names.iter().filter(|name| name.starts_with("controller-")) {
            self.kill_component(name);
        }
        for name in names.iter().filter(|name| name.starts_with("kubelet-")) {
            self.kill_component(name);
        }
        self.keeper_stop.store(true, Ordering::SeqCst);
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        for node in self.config.nodes.clone() {
            remove_containers(&self.runc_root(&node));
        }
        if let Some(mut forward) = self.forward.take() {
            forward.stop();
        }
        let names: Vec<String> = self
            .components
            .lock()
            .map(|components| components.keys().cloned().collect())
            .unwrap_or_default();
        for name in &names {
            self.kill_component(name);
        }
        match self.network.take() {
            Some(network) => network.shutdown().map_err(KubeClusterError::from),
            None => Ok(()),
        }
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        if let Err(error) = self.stop_everything() {
            tracing::warn!(%error, "local kube cluster teardown");
        }
    }
}

/// The programs the cluster runs, all in [`KubeClusterConfig::bin_dir`].
const BINARIES: [&str; 5] = [
    "automigrate-apiserver",
    "automigrate-kubelet",
    "automigrate-agent",
    "automigrate-controller",
    "automigrate",
];

fn check_config(config: &KubeClusterConfig) -> Result<(), KubeClusterError> {
    let count = config.nodes.len();
    if !(1..=16).contains(&count) {
        return Err(KubeClusterError::Config(format!(
            "the cluster needs 1 to 16 nodes, got {count}"
        )));
    }
    let valid_prefix = (1..=12).contains(&config.name_prefix.len())
        && config
            .name_prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid_prefix {
        return Err(KubeClusterError::Config(format!(
            "name prefix {:?}: use 1-12 of [a-z0-9-]",
            config.name_prefix
        )));
    }
    let mut seen = BTreeSet::new();
    for node in &config.nodes {
        let valid = (1..=40).contains(&node.len())
            && node
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !node.starts_with('-')
            && !node.ends_with('-');
        if !valid {
            return Err(KubeClusterError::Config(format!(
                "node name {node:?}: use 1-40 of [a-z0-9-]"
            )));
        }
        if !seen.insert(node) {
            return Err(KubeClusterError::Config(format!(
                "node {node} appears twice"
            )));
        }
    }
    if !config.rtt.is_empty()
        && (config.rtt.len() != count || config.rtt.iter().any(|row| row.len() != count))
    {
        return Err(KubeClusterError::Config(format!(
            "the RTT matrix must be {count}x{count} (or empty)"
        )));
    }
    for node in config.node_labels.keys() {
        if !config.nodes.contains(node) {
            return Err(KubeClusterError::NoSuchNode(node.clone()));
        }
    }
    if config.controller_replicas > 8 {
        return Err(KubeClusterError::Config(
            "at most 8 controller replicas".into(),
        ));
    }
    Ok(())
}

/// `<root>/cluster.pid`: the process that owns the cluster running on `root` (written once it
/// is up, removed by the teardown).
fn pid_file(root: &Path) -> PathBuf {
    root.join("cluster.pid")
}

/// The process owning a cluster on `root`, if one is alive.
fn running_cluster_pid(root: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(root))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (pid > 0 && Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Asks the process owning the cluster on `root` (`automigrate cluster up`) to stop, with
/// SIGTERM; false if none runs there.
pub fn stop_running_cluster(root: &Path) -> Result<bool, KubeClusterError> {
    let Some(pid) = running_cluster_pid(root) else {
        return Ok(false);
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|errno| KubeClusterError::Io {
        what: "signalling the cluster's process named in",
        path: pid_file(root),
        source: std::io::Error::from(errno),
    })?;
    Ok(true)
}

fn kubelet_name(node: &str) -> String {
    format!("kubelet-{node}")
}

fn controller_name(replica: usize) -> String {
    format!("controller-{replica}")
}

/// The agent pod of a node (the DaemonSet's pod there).
pub fn agent_pod_name(node: &str) -> String {
    format!("automigrate-agent-{node}")
}

/// Whether an object's `status.conditions` has `type_` with `status`.
fn condition_is(object: &Value, type_: &str, status: &str) -> bool {
    object["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == type_ && c["status"] == status)
        })
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), KubeClusterError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
    }
    let mut file = std::fs::File::create(path).map_err(io_error("writing", path))?;
    file.write_all(contents).map_err(io_error("writing", path))
}

fn run_checked(command: &mut Command) -> Result<(), KubeClusterError> {
    let output =
        command
            .stdin(Stdio::null())
            .output()
            .map_err(|source| KubeClusterError::Spawn {
                component: format!("{:?}", command.get_program()),
                source,
            })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(KubeClusterError::Command {
            command: format!("{command:?}"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// SIGKILL to the child's process group (the component and whatever it forked that did not
/// leave the group), then reap the child.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A container's status as runc decides it (`libcontainer`'s `currentStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuncStatus {
    /// `runc create` done, the user process not started (`exec.fifo` still there).
    Created,
    Running,
    /// Frozen (a checkpoint in progress, or `runc pause`).
    Paused,
    Stopped,
}

/// The status of container `id` in runc root `root`, read from its `state.json`, `/proc` and
/// the freezer cgroup as runc does: the init process gone (or a different process with its
/// pid) is Stopped; `exec.fifo` present is Created; a frozen cgroup is Paused; else Running.
/// `None` where there is no such container.
pub fn runc_status(root: &Path, id: &str) -> Option<RuncStatus> {
    let dir = root.join(id);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).ok()?).ok()?;
    let pid = state["init_process_pid"].as_i64().unwrap_or(0);
    let start = state["init_process_start"].as_u64();
    if pid <= 0 || start.is_none() || !process_matches(pid, start.unwrap_or(0)) {
        return Some(RuncStatus::Stopped);
    }
    if dir.join("exec.fifo").exists() {
        return Some(RuncStatus::Created);
    }
    let paths = &state["cgroup_paths"];
    let frozen_v1 = paths["freezer"].as_str().is_some_and(|path| {
        std::fs::read_to_string(Path::new(path).join("freezer.state"))
            .is_ok_and(|text| text.trim() == "FROZEN")
    });
    let frozen_v2 = paths[""].as_str().is_some_and(|path| {
        std::fs::read_to_string(Path::new(path).join("cgroup.freeze"))
            .is_ok_and(|text| text.trim() == "1")
    });
    if frozen_v1 || frozen_v2 {
        return Some(RuncStatus::Paused);
    }
    Some(RuncStatus::Running)
}

/// Whether process `pid` is alive (not a zombie) and started at `start` (clock ticks after
/// boot, `/proc/<pid>/stat` field 22): not another process that got the pid later.
fn process_matches(pid: i64, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The command name is in parentheses and may hold spaces: parse after the last `)`.
    let Some(rest) = stat.rfind(')').and_then(|end| stat.get(end + 2..)) else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or("Z");
    let started = fields.get(19).and_then(|value| value.parse::<u64>().ok());
    state != "Z" && state != "X" && started == Some(start)
}

/// `runc list` of a root as JSON entries (none where the root does not exist: `runc list`
/// would create it, and a removed root must stay removed).
fn runc_list_full(root: &Path) -> Vec<Value> {
    if !root.exists() {
        return Vec::new();
    }
    let Ok(output) = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "--format", "json"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    serde_json::from_slice::<Option<Vec<Value>>>(output.stdout.trim_ascii())
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// `(id, status)` of every container of a runc root.
fn runc_list(root: &Path) -> Vec<(String, String)> {
    runc_list_full(root)
        .iter()
        .map(|entry| {
            (
                entry["id"].as_str().unwrap_or_default().to_string(),
                entry["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn runc(root: &Path, args: &[&str]) {
    let _ = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs every container of a runc root that is not stopped; the ids it killed. Reads the
/// state files first ([`runc_status`]), so a root with nothing alive costs no `runc` process
/// (the power-off keeper looks every 100 ms).
fn kill_all_containers(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut killed = Vec::new();
    for entry in entries.flatten() {
        let id = entry.file_name().to_string_lossy().into_owned();
        if matches!(
            runc_status(root, &id),
            Some(RuncStatus::Created | RuncStatus::Running | RuncStatus::Paused)
        ) {
            runc(root, &["kill", "--all", &id, "KILL"]);
            killed.push(id);
        }
    }
    killed
}

/// Kills every container of a runc root, waits for them to stop, deletes them (a forced delete
/// of a container still dying leaves its cgroups behind).
fn remove_containers(root: &Path) {
    kill_all_containers(root);
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
        runc(root, &["delete", "--force", &id]);
    }
}

/// The power-off keeper: a powered-off node runs nothing, so any container that appears
/// running in its runc root (started by a `runc` process that was already on its way when
/// the node went down) is killed at once, and said so in the harness's log.
fn keep_powered_off_dead(stop: &AtomicBool, roots: &Mutex<BTreeMap<String, PathBuf>>) {
    while !stop.load(Ordering::SeqCst) {
        let current: Vec<(String, PathBuf)> = roots
            .lock()
            .map(|roots| roots.iter().map(|(n, r)| (n.clone(), r.clone())).collect())
            .unwrap_or_default();
        for (node, root) in current {
            let killed = kill_all_containers(&root);
            if !killed.is_empty() {
                tracing::warn!(node, ?killed, "killed containers on a powered-off node");
            }
        }
        std::thread::sleep(KEEPER_POLL);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// This process's start time as `/proc/<pid>/stat` gives it.
    fn own_start() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace().nth(19).unwrap().parse().unwrap()
    }

    fn container(root: &Path, id: &str, state: &Value) -> PathBuf {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
        dir
    }

    #[test]
    fn runc_status_reads_state_proc_and_freezer_as_runc_does() {
        let root = tempfile::tempdir().unwrap();
        let cgroup = root.path().join("freezer-cgroup");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("freezer.state"), "THAWED\n").unwrap();
        let pid = i64::from(std::process::id());
        let alive = json!({
            "init_process_pid": pid,
            "init_process_start": own_start(),
            "cgroup_paths": {"freezer": cgroup.display().to_string()},
        });
        container(root.path(), "running", &alive);
        assert_eq!(
            runc_status(root.path(), "running"),
            Some(RuncStatus::Running)
        );

        std::fs::write(cgroup.join("freezer.state"), "FROZEN\n").unwrap();
        assert_eq!(
            runc_status(root.path(), "running"),
            Some(RuncStatus::Paused)
        );
        std::fs::write(cgroup.join("freezer.state"), "THAWED\n").unwrap();

        let created = container(root.path(), "created", &alive);
        std::fs::write(created.join("exec.fifo"), "").unwrap();
        assert_eq!(
            runc_status(root.path(), "created"),
            Some(RuncStatus::Created)
        );

        // Our pid with another start time: the pid was reused, the container's init is gone.
        let reused = json!({"init_process_pid": pid, "init_process_start": own_start() + 1});
        container(root.path(), "reused", &reused);
        assert_eq!(
            runc_status(root.path(), "reused"),
            Some(RuncStatus::Stopped)
        );

        let none = json!({"init_process_pid": 0, "init_process_start": 0});
        container(root.path(), "stopped", &none);
        assert_eq!(
            runc_status(root.path(), "stopped"),
            Some(RuncStatus::Stopped)
        );
        assert_eq!(runc_status(root.path(), "missing"), None);
    }

    #[test]
    fn configs_are_checked_before_anything_starts() {
        let root = PathBuf::from("/nonexistent");
        let good = KubeClusterConfig::line(2, Duration::from_millis(10), root.clone(), root);
        assert!(check_config(&good).is_ok());
        let mut bad = good.clone();
        bad.nodes = vec!["node-a".into(), "node-a".into()];
        assert!(check_config(&bad).is_err());
        let mut bad = good.clone();
        bad.nodes.push("Node_C".into());
        assert!(check_config(&bad).is_err());
        let mut bad = good.clone();
        bad.rtt.pop();
        assert!(check_config(&bad).is_err());
        let mut bad = good.clone();
        bad.name_prefix = "much-too-long-prefix".into();
        assert!(check_config(&bad).is_err());
        let mut bad = good;
        bad.node_labels.insert("node-z".into(), BTreeMap::new());
        assert!(matches!(
            check_config(&bad),
            Err(KubeClusterError::NoSuchNode(_))
        ));
    }

    #[test]
    fn the_fast_policy_keeps_to_the_policy_floors() {
        let data: Value = serde_saphyr::from_str(FAST_DEFAULT_POLICY).unwrap();
        let policy = data["data"]["policy.yaml"].as_str().unwrap();
        automigrate_core::policy::Policy::from_yaml("default", policy).unwrap();
    }
}
