//! The local cluster: N nodes, each a network namespace of one emulated network with its own
//! storage root, kubelet part and agent.
//!
//! Data model: a [`ClusterConfig`] names the nodes, gives the round-trip time of every pair
//! (the emulated links carry half of it each way), the node labels and capacity, and the storage
//! root. [`LocalCluster::create`] builds the [`EmulatedNetwork`], a throw-away CA with one
//! certificate per node (for the agents' mutual TLS), the [`LocalNode`]s and their
//! agents ([`AgentMode`]), and starts the nodes' heartbeats ([`Kubelets`]).
//!
//! Failures are injected here because they cross all three: [`LocalCluster::fail_node`] powers
//! the node off (heartbeat stops, its containers get SIGKILL), kills its agent and cuts every
//! link of its namespace. [`LocalCluster::teardown`] removes every container the nodes started
//! and the network; dropping the cluster does the same as well as it can.
//!
//! A controller may run in another process than the one owning the cluster (to be killed and
//! restarted). [`LocalCluster::create`] writes `<root>/cluster.json` ([`ClusterManifest`]: the
//! config and every node's namespace and address); [`LocalCluster::attach`] builds the same
//! cluster from it in the controller's process, owning nothing: its nodes are
//! [`LocalNode::observer`]s (status read from the kubelets' posts, which
//! [`LocalCluster::post_node_status`] turns on), its agents the daemons
//! reached over their API ([`DaemonAgent::attach`]), and it neither injects failures nor tears
//! anything down.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use automigrate_core::model::Resources;
use automigrate_netem::{EmulatedNetwork, Link, NetworkError};
use automigrate_transfer::TlsConfig;
use automigrate_transfer::devcerts::DevCa;

use serde::{Deserialize, Serialize};

use crate::agent::{AgentDirectory, AgentHandle, InProcessAgent, ProbeTarget};
use crate::daemon::{DaemonAgent, DaemonSetup};
use crate::node::{Kubelets, LocalNode, NodeError, NodeLayout};

/// Which agent each node runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum AgentMode {
    /// The agent's library pieces inside this process ([`InProcessAgent`]).
    InProcess,
    /// The `automigrate-agent` daemon, one process per node in its namespace.
    Daemon { binary: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot create the emulated network: {0}")]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("certificates: {0}")]
    Certificates(String),
    #[error("agent of {node}: {reason}")]
    Agent { node: String, reason: String },
    #[error("no node named {0}")]
    NoSuchNode(String),
    #[error("the cluster needs 2 to 16 nodes, got {0}")]
    NodeCount(usize),
    #[error("cluster manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "a controller in another process reaches agents over their API: the cluster must run agent daemons (AgentMode::Daemon)"
    )]
    NeedsDaemons,
    #[error("this process only attached to the cluster; it cannot {0}")]
    Attached(&'static str),
}

/// What a process needs to attach to a running cluster (`<root>/cluster.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterManifest {
    pub name_prefix: String,
    pub nodes: Vec<ManifestNode>,
    pub rtt_micros: Vec<Vec<u64>>,
    pub labels: BTreeMap<String, String>,
    pub allocatable: Resources,
    pub root: PathBuf,
    pub heartbeat_micros: u64,
    pub agent: AgentMode,
    pub retain_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestNode {
    pub name: String,
    pub namespace: String,
    pub address: Ipv4Addr,
}

impl ClusterManifest {
    /// Where [`LocalCluster::create`] writes it.
    pub fn path(root: &std::path::Path) -> PathBuf {
        root.join("cluster.json")
    }

    fn micros(duration: Duration) -> u64 {
        u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
    }

    fn of(cluster: &LocalCluster) -> Self {
        let config = &cluster.config;
        Self {
            name_prefix: config.name_prefix.clone(),
            nodes: cluster
                .nodes
                .iter()
                .map(|node| ManifestNode {
                    name: node.name().to_string(),
                    namespace: node.namespace().to_string(),
                    address: node.address(),
                })
                .collect(),
            rtt_micros: config
                .rtt
                .iter()
                .map(|row| row.iter().map(|rtt| Self::micros(*rtt)).collect())
                .collect(),
            labels: config.labels.clone(),
            allocatable: config.allocatable,
            root: config.root.clone(),
            heartbeat_micros: Self::micros(config.heartbeat),
            agent: config.agent.clone(),
            retain_count: config.retain_count,
        }
    }

    fn config(&self) -> ClusterConfig {
        ClusterConfig {
            name_prefix: self.name_prefix.clone(),
            nodes: self.nodes.iter().map(|node| node.name.clone()).collect(),
            rtt: self
                .rtt_micros
                .iter()
                .map(|row| row.iter().map(|rtt| Duration::from_micros(*rtt)).collect())
                .collect(),
            labels: self.labels.clone(),
            allocatable: self.allocatable,
            root: self.root.clone(),
            heartbeat: Duration::from_micros(self.heartbeat_micros),
            agent: self.agent.clone(),
            retain_count: self.retain_count,
        }
    }
}

/// What the cluster is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Names the network namespaces (`amnet<ID>-<prefix>-<i>`); 1-12 of `[a-z0-9-]`.
    pub name_prefix: String,
    pub nodes: Vec<String>,
    /// Round-trip time between nodes `i` and `j` (`i != j`).
    pub rtt: Vec<Vec<Duration>>,
    /// Labels every node carries (besides `kubernetes.io/hostname`).
    pub labels: BTreeMap<String, String>,
    pub allocatable: Resources,
    /// Storage root: every node gets `<root>/<node>/`.
    pub root: PathBuf,
    /// How often a node's kubelet renews its heartbeat.
    pub heartbeat: Duration,
    pub agent: AgentMode,
    /// Checkpoints a daemon agent keeps per pod (the in-process agent leaves retention to the
    /// controller, which applies the policy's).
    pub retain_count: u32,
}

impl ClusterConfig {
    /// `count` nodes `node-a`, `node-b`, … on a line: the RTT between nodes `i` and `j` is
    /// `step × |i − j|` (with `step` 10 ms, node-a reaches b, c, d in 10, 20, 30 ms).
    pub fn line(count: usize, step: Duration, root: PathBuf) -> Self {
        let nodes = (0..count)
            .map(|index| format!("node-{}", char::from(b'a' + (index % 26) as u8)))
            .collect();
        let rtt = (0..count)
            .map(|i| (0..count).map(|j| step * (i.abs_diff(j) as u32)).collect())
            .collect();
        Self {
            name_prefix: "demo".into(),
            nodes,
            rtt,
            labels: BTreeMap::new(),
            allocatable: Resources::new(2000, 4 << 30, 0),
            root,
            heartbeat: Duration::from_millis(100),
            agent: AgentMode::InProcess,
            retain_count: 3,
        }
    }

    pub fn rtt_between(&self, a: usize, b: usize) -> Duration {
        self.rtt
            .get(a)
            .and_then(|row| row.get(b))
            .copied()
            .unwrap_or_default()
    }
}

/// The running local cluster.
#[derive(Debug)]
pub struct LocalCluster {
    config: ClusterConfig,
    nodes: Vec<Arc<LocalNode>>,
    agents: Vec<AgentHandle>,
    kubelets: Option<Kubelets>,
    // Last: torn down after the agents stopped using its namespaces.
    network: Option<EmulatedNetwork>,
    /// Built by [`LocalCluster::attach`]: another process owns all of it.
    attached: bool,
}

impl LocalCluster {
    /// Builds the network, the nodes and their agents. Needs root, `/dev/net/tun`, runc and
    /// CRIU (and the agent binary for [`AgentMode::Daemon`]).
    #[tracing::instrument(name = "cluster_create", skip(config), fields(nodes = config.nodes.len()))]
    pub async fn create(config: ClusterConfig) -> Result<Self, ClusterError> {
        let count = config.nodes.len();
        if !(2..=16).contains(&count) {
            return Err(ClusterError::NodeCount(count));
        }
        let network = EmulatedNetwork::create_with(&config.name_prefix, count, |from, to| {
            Link::delayed(config.rtt_between(from, to) / 2)
        })?;
        let ca = DevCa::generate("automigrate demo CA", 2)
            .map_err(|error| ClusterError::Certificates(error.to_string()))?;
        let directory = Arc::new(AgentDirectory::default());
        let mut addresses = Vec::with_capacity(count);
        for index in 0..count {
            addresses.push(network.addr(index)?);
        }
        let mut nodes = Vec::with_capacity(count);
        let mut agents = Vec::with_capacity(count);
        for (index, name) in config.nodes.iter().enumerate() {
            let address: Ipv4Addr = addresses.get(index).copied().unwrap_or(Ipv4Addr::LOCALHOST);
            let node = Arc::new(LocalNode::new(
                name.clone(),
                index,
                network.namespace(index)?.to_string(),
                address,
                NodeLayout::new(config.root.join(name)),
            )?);
            let cert = ca
                .node(name, &[address.to_string()], 2)
                .map_err(|error| ClusterError::Certificates(error.to_string()))?;
            let tls = TlsConfig::from_pem(
                ca.cert_pem().as_bytes(),
                cert.cert_pem.as_bytes(),
                cert.key_pem.as_bytes(),
            )
            .map_err(|error| ClusterError::Certificates(error.to_string()))?;
            let peers = config
                .nodes
                .iter()
                .enumerate()
                .filter(|(other, _)| *other != index)
                .map(|(other, peer)| ProbeTarget {
                    node: peer.clone(),
                    address: addresses.get(other).copied().unwrap_or(Ipv4Addr::LOCALHOST),
                })
                .collect();
            let agent_error = |error: crate::agent::AgentError| ClusterError::Agent {
                node: name.clone(),
                reason: error.to_string(),
            };
            let agent = match &config.agent {
                AgentMode::InProcess => AgentHandle::InProcess(
                    InProcessAgent::start(Arc::clone(&node), tls, Arc::clone(&directory), peers)
                        .map_err(agent_error)?,
                ),
                AgentMode::Daemon { binary } => {
                    let pki = config.root.join("pki");
                    let (ca_path, cert_path, key_path) = (
                        pki.join("ca.pem"),
                        pki.join(format!("{name}.pem")),
                        pki.join(format!("{name}-key.pem")),
                    );
                    write_pem(&ca_path, ca.cert_pem(), 0o644)?;
                    write_pem(&cert_path, &cert.cert_pem, 0o644)?;
                    write_pem(&key_path, &cert.key_pem, 0o600)?;
                    let setup = DaemonSetup {
                        binary: binary.clone(),
                        ca: ca_path,
                        cert: cert_path,
                        key: key_path,
                        peers,
                        retain_count: config.retain_count,
                    };
                    AgentHandle::Daemon(
                        DaemonAgent::start(Arc::clone(&node), &setup)
                            .await
                            .map_err(agent_error)?,
                    )
                }
            };
            nodes.push(node);
            agents.push(agent);
        }
        tracing::info!(nodes = ?config.nodes, network = network.id(), agent = ?config.agent, "local cluster up");
        let kubelets = Kubelets::start(nodes.clone(), config.heartbeat);
        let cluster = Self {
            config,
            nodes,
            agents,
            kubelets: Some(kubelets),
            network: Some(network),
            attached: false,
        };
        let manifest_path = ClusterManifest::path(&cluster.config.root);
        write_json(&manifest_path, &ClusterManifest::of(&cluster))?;
        Ok(cluster)
    }

    /// The cluster another process created under `root`, seen from this process (see the
    /// module header). Needs agent daemons; starts no process and changes nothing.
    #[tracing::instrument(name = "cluster_attach", skip_all, fields(root = %root.display()))]
    pub fn attach(root: &std::path::Path) -> Result<Self, ClusterError> {
        let path = ClusterManifest::path(root);
        let manifest: ClusterManifest = std::fs::read(&path)
            .map_err(|error| error.to_string())
            .and_then(|text| serde_json::from_slice(&text).map_err(|error| error.to_string()))
            .map_err(|reason| ClusterError::Manifest {
                path: path.clone(),
                reason,
            })?;
        if !matches!(manifest.agent, AgentMode::Daemon { .. }) {
            return Err(ClusterError::NeedsDaemons);
        }
        let config = manifest.config();
        let mut nodes = Vec::with_capacity(manifest.nodes.len());
        let mut agents = Vec::with_capacity(manifest.nodes.len());
        for (index, entry) in manifest.nodes.iter().enumerate() {
            let node = Arc::new(LocalNode::observer(
                entry.name.clone(),
                index,
                entry.namespace.clone(),
                entry.address,
                NodeLayout::new(config.root.join(&entry.name)),
            )?);
            let agent =
                DaemonAgent::attach(Arc::clone(&node)).map_err(|error| ClusterError::Agent {
                    node: entry.name.clone(),
                    reason: error.to_string(),
                })?;
            nodes.push(node);
            agents.push(AgentHandle::Daemon(agent));
        }
        Ok(Self {
            config,
            nodes,
            agents,
            kubelets: None,
            network: None,
            attached: true,
        })
    }

    /// Has every node's kubelet post its status for a controller in another process
    /// ([`LocalNode::start_posting_status`]).
    pub fn post_node_status(&self) {
        for node in &self.nodes {
            node.start_posting_status();
        }
    }

    /// Whether this process only attached to the cluster (see [`LocalCluster::attach`]).
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    pub fn nodes(&self) -> &[Arc<LocalNode>] {
        &self.nodes
    }

    pub fn agents(&self) -> &[AgentHandle] {
        &self.agents
    }

    pub fn index_of(&self, name: &str) -> Result<usize, ClusterError> {
        self.nodes
            .iter()
            .position(|node| node.name() == name)
            .ok_or_else(|| ClusterError::NoSuchNode(name.to_string()))
    }

    pub fn node(&self, name: &str) -> Result<&Arc<LocalNode>, ClusterError> {
        let index = self.index_of(name)?;
        self.nodes
            .get(index)
            .ok_or_else(|| ClusterError::NoSuchNode(name.to_string()))
    }

    pub fn agent(&self, name: &str) -> Result<&AgentHandle, ClusterError> {
        let index = self.index_of(name)?;
        self.agents
            .get(index)
            .ok_or_else(|| ClusterError::NoSuchNode(name.to_string()))
    }

    /// The RTT the emulated link between two nodes was set up with.
    pub fn configured_rtt(&self, a: &str, b: &str) -> Result<Duration, ClusterError> {
        Ok(self
            .config
            .rtt_between(self.index_of(a)?, self.index_of(b)?))
    }

    /// Node `name` fails hard: powered off (heartbeat stops, containers SIGKILLed), agent
    /// killed, every link cut.
    #[tracing::instrument(name = "fail_node", skip(self))]
    pub async fn fail_node(&self, name: &str) -> Result<(), ClusterError> {
        if self.attached {
            return Err(ClusterError::Attached("fail a node"));
        }
        let index = self.index_of(name)?;
        if let Some(network) = &self.network {
            network.isolate(index)?;
        }
        if let Some(agent) = self.agents.get(index) {
            agent.kill();
        }
        if let Some(node) = self.nodes.get(index) {
            node.power_off().await;
        }
        Ok(())
    }

    /// Changes the RTT between two nodes (both directions carry half).
    pub fn set_rtt(&self, a: &str, b: &str, rtt: Duration) -> Result<(), ClusterError> {
        let (a, b) = (self.index_of(a)?, self.index_of(b)?);
        if let Some(network) = &self.network {
            network.set_link_both(a, b, Link::delayed(rtt / 2))?;
        }
        Ok(())
    }

    /// Removes every container, stops the agents and deletes the network.
    pub async fn teardown(mut self) -> Result<(), ClusterError> {
        if self.attached {
            return Err(ClusterError::Attached("tear the cluster down"));
        }
        for node in &self.nodes {
            for id in node.runc_container_ids() {
                if let Err(error) = node.remove_container(&id).await {
                    tracing::warn!(node = %node.name(), %id, %error, "container left behind");
                }
            }
            node.remove_cgroups();
        }
        self.stop_agents();
        if let Some(network) = self.network.take() {
            network.shutdown()?;
        }
        Ok(())
    }

    fn stop_agents(&mut self) {
        for agent in &self.agents {
            agent.kill();
        }
        if let Some(mut kubelets) = self.kubelets.take() {
            kubelets.stop();
        }
    }
}

/// Writes a JSON file atomically (temporary file, then rename).
fn write_json(path: &std::path::Path, value: &impl Serialize) -> Result<(), ClusterError> {
    let error = |reason: String| ClusterError::Manifest {
        path: path.to_path_buf(),
        reason,
    };
    let text = serde_json::to_vec_pretty(value).map_err(|e| error(e.to_string()))?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text).map_err(|e| error(e.to_string()))?;
    std::fs::rename(&temporary, path).map_err(|e| error(e.to_string()))
}

/// Writes one PEM file for a daemon (keys owner-only).
fn write_pem(path: &std::path::Path, text: &str, mode: u32) -> Result<(), ClusterError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let error =
        |error: std::io::Error| ClusterError::Certificates(format!("{}: {error}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.network.is_none() {
            return;
        }
        // Not torn down properly (an error or a failed test): remove containers synchronously
        // so no trainer outlives the demo.
        for node in &self.nodes {
            for id in node.runc_container_ids() {
                let _ = std::process::Command::new("runc")
                    .arg("--root")
                    .arg(node.layout().runc_root())
                    .args(["delete", "--force", &id])
                    .output();
            }
            node.remove_cgroups();
        }
        self.stop_agents();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_gives_back_the_config() {
        let mut config = ClusterConfig::line(3, Duration::from_micros(10_500), "/srv/run".into());
        config.agent = AgentMode::Daemon {
            binary: "/usr/bin/automigrate-agent".into(),
        };
        config.labels.insert("edge".into(), String::new());
        let manifest = ClusterManifest {
            name_prefix: config.name_prefix.clone(),
            nodes: config
                .nodes
                .iter()
                .enumerate()
                .map(|(index, name)| ManifestNode {
                    name: name.clone(),
                    namespace: format!("amnet1-demo-{index}"),
                    address: Ipv4Addr::new(10, 0, 0, index as u8 + 1),
                })
                .collect(),
            rtt_micros: config
                .rtt
                .iter()
                .map(|row| row.iter().map(|rtt| rtt.as_micros() as u64).collect())
                .collect(),
            labels: config.labels.clone(),
            allocatable: config.allocatable,
            root: config.root.clone(),
            heartbeat_micros: config.heartbeat.as_micros() as u64,
            agent: config.agent.clone(),
            retain_count: config.retain_count,
        };
        let text = serde_json::to_string(&manifest).unwrap();
        let read: ClusterManifest = serde_json::from_str(&text).unwrap();
        assert_eq!(read, manifest);
        assert_eq!(read.config(), config);
    }

    #[test]
    fn attaching_needs_a_manifest_and_daemons() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            LocalCluster::attach(root.path()),
            Err(ClusterError::Manifest { .. })
        ));
        let manifest = ClusterManifest {
            name_prefix: "demo".into(),
            nodes: Vec::new(),
            rtt_micros: Vec::new(),
            labels: BTreeMap::new(),
            allocatable: Resources::default(),
            root: root.path().to_path_buf(),
            heartbeat_micros: 100_000,
            agent: AgentMode::InProcess,
            retain_count: 3,
        };
        write_json(&ClusterManifest::path(root.path()), &manifest).unwrap();
        assert!(matches!(
            LocalCluster::attach(root.path()),
            Err(ClusterError::NeedsDaemons)
        ));
    }
}
