//! The node agent as the embedded controller sees it, and the in-process agent behind it.
//!
//! [`NodeAgent`] is the agent's HTTP API (`automigrate_agent::api`, the contract in
//! controller/agent) as a trait: checkpoints, transfers, peer latencies, health. The embedded
//! controller only ever talks to a node through it, so a node's agent can be the daemon behind
//! an `AgentClient` or, as here, [`InProcessAgent`]: the same library pieces the daemon is made
//! of (the checkpoint crate's runc backend and store, the transfer crate's mutual-TLS sender and
//! receiver), run in this process with their sockets inside the node's network namespace.
//!
//! Data model of [`InProcessAgent`]:
//! - the node ([`LocalNode`]: store, runtime registry of which container runs which pod);
//! - a transfer receiver listening on `<node address>:9461` inside the node's namespace, writing
//!   only under the node's `exchange/` directory; a finished checkpoint transfer lands in
//!   `exchange/incoming/` and is verified (every BLAKE3 hash of its manifest) before the
//!   receiving agent moves it into its store; a dataset lands at the same path under the data
//!   root (`exchange/data/`);
//! - a latency prober: a thread inside the namespace that times TCP handshakes (one RTT) to
//!   each peer's probe port every 250 ms, keeping the last [`PROBE_WINDOW`] results per peer;
//! - the transfers it started, by id, with their status.
//!
//! [`InProcessAgent::kill`] stops all of it at once, as a crashed daemon would: every later call
//! answers [`AgentError::Unreachable`].

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use automigrate_agent::api::{
    CheckpointKind, CheckpointRequest, CheckpointSummary, Payload, PeerLatency, PodKey,
    TransferRequest, TransferState, TransferStatus,
};
use automigrate_checkpoint::runc::RuncContainer;
use automigrate_checkpoint::{DumpKind, StoredCheckpoint, Subject, checkpoint_into_store};
use automigrate_transfer::receiver::{Receiver, ReceiverConfig};
use automigrate_transfer::sender::{Progress, RetryPolicy, SendOptions, send};
use automigrate_transfer::{Source, TlsConfig};

use crate::node::LocalNode;

/// The transfer engine's port on every node.
pub const TRANSFER_PORT: u16 = 9461;
/// The port the latency prober connects to.
pub const PROBE_PORT: u16 = 9462;
/// Probe results kept per peer.
pub const PROBE_WINDOW: usize = 6;
const PROBE_PERIOD: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Longest one checkpoint may take.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why an agent call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("agent on {node} is unreachable")]
    Unreachable { node: String },
    #[error("agent on {node}: not found: {what}")]
    NotFound { node: String, what: String },
    #[error("agent on {node}: invalid request: {reason}")]
    Invalid { node: String, reason: String },
    #[error("agent on {node}: {kind}: {message}")]
    Failed {
        node: String,
        kind: String,
        message: String,
    },
}

impl AgentError {
    /// The `ErrorBody.kind` this error would carry over HTTP.
    pub fn kind(&self) -> &str {
        use automigrate_agent::api::error_kind;
        match self {
            AgentError::Unreachable { .. } => error_kind::UNAVAILABLE,
            AgentError::NotFound { .. } => error_kind::NOT_FOUND,
            AgentError::Invalid { .. } => error_kind::INVALID,
            AgentError::Failed { kind, .. } => kind,
        }
    }
}

/// The node agent's API (see controller/agent's `api` module for the wire contract).
pub trait NodeAgent: Send + Sync {
    fn node(&self) -> &str;

    /// `GET /healthz`.
    fn health(&self) -> impl Future<Output = Result<(), AgentError>> + Send;

    /// `GET /v1/peers`.
    fn peers(&self) -> impl Future<Output = Result<Vec<PeerLatency>, AgentError>> + Send;

    /// `POST /v1/checkpoints` (synchronous).
    fn checkpoint(
        &self,
        request: &CheckpointRequest,
    ) -> impl Future<Output = Result<CheckpointSummary, AgentError>> + Send;

    /// `GET /v1/checkpoints?namespace=&pod=`, newest first.
    fn checkpoints(
        &self,
        pod: &PodKey,
    ) -> impl Future<Output = Result<Vec<CheckpointSummary>, AgentError>> + Send;

    /// `POST /v1/transfers`.
    fn start_transfer(
        &self,
        request: &TransferRequest,
    ) -> impl Future<Output = Result<TransferStatus, AgentError>> + Send;

    /// `GET /v1/transfers/{id}`.
    fn transfer_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<TransferStatus, AgentError>> + Send;

    /// The address peers send to (`host:port` of this node's transfer engine).
    fn transfer_address(&self) -> String;
}

/// Agents by node name, so a sending agent can hand a finished checkpoint transfer to the
/// receiving agent (the daemon notices the completed session itself).
#[derive(Debug, Default)]
pub struct AgentDirectory {
    agents: RwLock<BTreeMap<String, Weak<InProcessAgent>>>,
}

impl AgentDirectory {
    pub fn register(&self, agent: &Arc<InProcessAgent>) {
        if let Ok(mut agents) = self.agents.write() {
            agents.insert(agent.node.name().to_string(), Arc::downgrade(agent));
        }
    }

    fn get(&self, node: &str) -> Option<Arc<InProcessAgent>> {
        self.agents
            .read()
            .ok()
            .and_then(|agents| agents.get(node).and_then(Weak::upgrade))
    }
}

/// A peer to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub node: String,
    pub address: Ipv4Addr,
}

#[derive(Debug, Default)]
struct TransferRecord {
    status: Option<TransferStatus>,
    bytes_sent: u64,
}

/// The agent of one local node, in this process (see the module header).
#[derive(Debug)]
pub struct InProcessAgent {
    node: Arc<LocalNode>,
    tls: TlsConfig,
    directory: Arc<AgentDirectory>,
    dead: Arc<AtomicBool>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    probes: Arc<Mutex<BTreeMap<String, VecDeque<Option<Duration>>>>>,
    transfers: Arc<Mutex<BTreeMap<String, TransferRecord>>>,
    next_transfer: AtomicU64,
    /// One checkpoint at a time per agent, as the daemon answers `conflict` to a second one.
    checkpointing: tokio::sync::Mutex<()>,
}

fn failed(node: &str, kind: &str, message: impl std::fmt::Display) -> AgentError {
    AgentError::Failed {
        node: node.to_string(),
        kind: kind.to_string(),
        message: message.to_string(),
    }
}

impl InProcessAgent {
    /// Starts the agent of `node`: its transfer receiver and probe listener inside the node's
    /// namespace, and its prober. Must be called inside a tokio runtime.
    pub fn start(
        node: Arc<LocalNode>,
        tls: TlsConfig,
        directory: Arc<AgentDirectory>,
        peers: Vec<ProbeTarget>,
    ) -> Result<Arc<Self>, AgentError> {
        use automigrate_agent::api::error_kind::INTERNAL;
        let name = node.name().to_string();
        let address = node.address();
        let namespace = node.namespace().to_string();
        let bind = |port: u16| {
            automigrate_netem::run_in_namespace(&namespace, || {
                let listener = std::net::TcpListener::bind((address, port))?;
                listener.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(listener)
            })
            .map_err(|error| failed(&name, INTERNAL, error))?
            .map_err(|error| failed(&name, INTERNAL, format!("bind {address}:{port}: {error}")))
        };
        let transfer_listener = tokio::net::TcpListener::from_std(bind(TRANSFER_PORT)?)
            .map_err(|error| failed(&name, INTERNAL, error))?;
        let probe_listener = tokio::net::TcpListener::from_std(bind(PROBE_PORT)?)
            .map_err(|error| failed(&name, INTERNAL, error))?;
        let receiver = Receiver::new(ReceiverConfig::new(node.layout().exchange()), &tls)
            .map_err(|error| failed(&name, INTERNAL, error))?;
        let receiving = tokio::spawn(async move {
            if let Err(error) = receiver.serve(transfer_listener).await {
                tracing::warn!(%error, "transfer receiver stopped");
            }
        });
        let probing = tokio::spawn(async move {
            // Completing the handshake is all a probe needs; close at once.
            while let Ok((stream, _)) = probe_listener.accept().await {
                drop(stream);
            }
        });
        let agent = Arc::new(Self {
            node,
            tls,
            directory: Arc::clone(&directory),
            dead: Arc::new(AtomicBool::new(false)),
            tasks: Mutex::new(vec![receiving.abort_handle(), probing.abort_handle()]),
            probes: Arc::new(Mutex::new(BTreeMap::new())),
            transfers: Arc::new(Mutex::new(BTreeMap::new())),
            next_transfer: AtomicU64::new(1),
            checkpointing: tokio::sync::Mutex::new(()),
        });
        directory.register(&agent);
        agent.spawn_prober(peers)?;
        Ok(agent)
    }

    fn spawn_prober(&self, peers: Vec<ProbeTarget>) -> Result<(), AgentError> {
        let namespace = self.node.namespace().to_string();
        let dead = Arc::clone(&self.dead);
        let probes = Arc::clone(&self.probes);
        let name = self.node.name().to_string();
        std::thread::Builder::new()
            .name(format!("prober-{name}"))
            .spawn(move || {
                if let Err(error) = automigrate_netem::enter_namespace(&namespace) {
                    tracing::warn!(%error, node = %name, "prober cannot enter the node's namespace");
                    return;
                }
                while !dead.load(Ordering::SeqCst) {
                    for peer in &peers {
                        let target = SocketAddr::from((peer.address, PROBE_PORT));
                        let started = Instant::now();
                        let result = std::net::TcpStream::connect_timeout(&target, PROBE_TIMEOUT)
                            .ok()
                            .map(|_| started.elapsed());
                        if let Ok(mut probes) = probes.lock() {
                            let window = probes.entry(peer.node.clone()).or_default();
                            window.push_back(result);
                            while window.len() > PROBE_WINDOW {
                                window.pop_front();
                            }
                        }
                    }
                    std::thread::sleep(PROBE_PERIOD);
                }
            })
            .map(|_| ())
            .map_err(|error| {
                failed(
                    self.node.name(),
                    automigrate_agent::api::error_kind::INTERNAL,
                    error,
                )
            })
    }

    pub fn local_node(&self) -> &Arc<LocalNode> {
        &self.node
    }

    /// The agent dies: no more answers, no receiver, no probes.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
        tracing::info!(node = %self.node.name(), "agent killed");
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn ensure_alive(&self) -> Result<(), AgentError> {
        if self.is_dead() || !self.node.is_alive() {
            Err(AgentError::Unreachable {
                node: self.node.name().to_string(),
            })
        } else {
            Ok(())
        }
    }

    /// File bytes a finished or running transfer has put on the wire (resends included).
    pub fn bytes_sent(&self, id: &str) -> Option<u64> {
        self.transfers
            .lock()
            .ok()
            .and_then(|transfers| transfers.get(id).map(|record| record.bytes_sent))
    }

    fn summary(&self, stored: &StoredCheckpoint) -> CheckpointSummary {
        let manifest = &stored.manifest;
        CheckpointSummary {
            id: manifest.id.clone(),
            pod: PodKey::new(&manifest.pod.namespace, &manifest.pod.name),
            container: manifest.container.clone(),
            created_at: manifest.created_at,
            bytes: manifest.total_bytes(),
            files: manifest.files.len() as u64,
            freeze: manifest
                .freeze
                .map(|freeze| freeze.duration())
                .unwrap_or_default(),
            parent: manifest.parent.clone(),
            // The store holds only archives this agent sealed itself or verified on arrival.
            verified: true,
        }
    }

    /// Finds a checkpoint id in the store, whichever pod it belongs to.
    fn find_checkpoint(&self, id: &str) -> Result<StoredCheckpoint, AgentError> {
        let store = self.node.store();
        let not_found = || AgentError::NotFound {
            node: self.node.name().to_string(),
            what: format!("checkpoint {id}"),
        };
        let pods = store.pods().map_err(|error| {
            failed(
                self.node.name(),
                automigrate_agent::api::error_kind::STORE,
                error,
            )
        })?;
        pods.iter()
            .find_map(|pod| store.get(pod, id).ok())
            .ok_or_else(not_found)
    }

    /// The receiving side of a finished checkpoint transfer: verify what arrived in
    /// `incoming/<namespace>/<pod>/<id>` and move it into the store.
    fn adopt_checkpoint(&self, pod: &PodKey, id: &str) -> Result<(), AgentError> {
        use automigrate_agent::api::error_kind::STORE;
        let name = self.node.name();
        let arrived = self
            .node
            .layout()
            .incoming()
            .join(&pod.namespace)
            .join(&pod.name)
            .join(id);
        automigrate_checkpoint::archive::verify_chain(&arrived)
            .map_err(|error| failed(name, STORE, format!("received checkpoint {id}: {error}")))?;
        let store_pod = automigrate_checkpoint::PodKey::new(&pod.namespace, &pod.name);
        let pod_dir = self
            .node
            .store()
            .pod_dir(&store_pod)
            .map_err(|error| failed(name, STORE, error))?;
        std::fs::create_dir_all(&pod_dir).map_err(|error| failed(name, STORE, error))?;
        let destination = pod_dir.join(id);
        if destination.exists() {
            // Already held (a replica sent twice): the copy that arrived is redundant.
            std::fs::remove_dir_all(&arrived).map_err(|error| failed(name, STORE, error))?;
            return Ok(());
        }
        std::fs::rename(&arrived, &destination).map_err(|error| failed(name, STORE, error))?;
        automigrate_checkpoint::archive::sync_dir(&pod_dir)
            .map_err(|error| failed(name, STORE, error))?;
        tracing::info!(node = %name, %id, "received checkpoint verified and stored");
        Ok(())
    }

    fn set_status(
        transfers: &Mutex<BTreeMap<String, TransferRecord>>,
        id: &str,
        update: impl FnOnce(&mut TransferRecord),
    ) {
        if let Ok(mut transfers) = transfers.lock() {
            update(transfers.entry(id.to_string()).or_default());
        }
    }
}

/// Sends `source` from inside `namespace`: the sockets must be born in the sending node's
/// namespace, so the whole send runs on its own thread there, on a current-thread runtime.
/// A killed agent's sends stop at once, as they would with the daemon's process gone.
fn send_from_namespace(
    namespace: &str,
    source: Source,
    peer: SocketAddr,
    tls: TlsConfig,
    options: SendOptions,
    dead: Arc<AtomicBool>,
) -> Result<automigrate_transfer::Report, String> {
    automigrate_netem::run_in_namespace(namespace, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| error.to_string())?;
        runtime.block_on(async {
            let killed = async {
                while !dead.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::select! {
                sent = send(&source, peer, &tls, &options) => sent.map_err(|error| error.to_string()),
                () = killed => Err("the sending agent was killed".to_string()),
            }
        })
    })
    .map_err(|error| error.to_string())?
}

impl NodeAgent for InProcessAgent {
    fn node(&self) -> &str {
        self.node.name()
    }

    fn transfer_address(&self) -> String {
        SocketAddr::from((self.node.address(), TRANSFER_PORT)).to_string()
    }

    async fn health(&self) -> Result<(), AgentError> {
        self.ensure_alive()
    }

    async fn peers(&self) -> Result<Vec<PeerLatency>, AgentError> {
        self.ensure_alive()?;
        let probes = self.probes.lock().map_err(|_| {
            failed(
                self.node.name(),
                automigrate_agent::api::error_kind::INTERNAL,
                "probe table poisoned",
            )
        })?;
        Ok(probes
            .iter()
            .filter(|(_, window)| !window.is_empty())
            .map(|(peer, window)| {
                let mut rtts: Vec<Duration> = window.iter().flatten().copied().collect();
                rtts.sort_unstable();
                let failures = window.len() - rtts.len();
                PeerLatency {
                    node: peer.clone(),
                    rtt: rtts.get(rtts.len() / 2).copied().unwrap_or_default(),
                    loss: failures as f64 / window.len() as f64,
                }
            })
            .collect())
    }

    #[tracing::instrument(name = "agent_checkpoint", skip_all, fields(node = %self.node.name(), pod = %request.pod, kind = ?request.kind))]
    async fn checkpoint(
        &self,
        request: &CheckpointRequest,
    ) -> Result<CheckpointSummary, AgentError> {
        use automigrate_agent::api::error_kind::{CHECKPOINT_FAILED, CONFLICT};
        self.ensure_alive()?;
        request.validate().map_err(|error| AgentError::Invalid {
            node: self.node.name().to_string(),
            reason: error.to_string(),
        })?;
        let _one_at_a_time = self
            .checkpointing
            .try_lock()
            .map_err(|_| failed(self.node.name(), CONFLICT, "a checkpoint is running"))?;
        let container =
            self.node
                .container_of(&request.pod)
                .ok_or_else(|| AgentError::NotFound {
                    node: self.node.name().to_string(),
                    what: format!("a container of pod {}", request.pod),
                })?;
        let kind = match request.kind {
            CheckpointKind::Periodic => DumpKind::Periodic,
            CheckpointKind::Final => DumpKind::Final,
        };
        let subject = Subject {
            pod: automigrate_checkpoint::PodKey::new(&request.pod.namespace, &request.pod.name),
            container: request.container.clone(),
        };
        // Incremental dumps only where the kernel tracks dirty memory; this agent then builds
        // on its newest checkpoint of the pod.
        let parent = if self.node.incremental_supported().await {
            self.node
                .store()
                .latest(&subject.pod)
                .ok()
                .flatten()
                .map(|stored| stored.manifest.id)
        } else {
            None
        };
        let stored = checkpoint_into_store(
            self.node.runc(),
            self.node.store(),
            &subject,
            &RuncContainer { id: container },
            kind,
            parent.as_deref(),
            CHECKPOINT_TIMEOUT,
        )
        .await
        .map_err(|error| failed(self.node.name(), CHECKPOINT_FAILED, error))?;
        Ok(self.summary(&stored))
    }

    async fn checkpoints(&self, pod: &PodKey) -> Result<Vec<CheckpointSummary>, AgentError> {
        self.ensure_alive()?;
        let store_pod = automigrate_checkpoint::PodKey::new(&pod.namespace, &pod.name);
        let mut list = self.node.store().list(&store_pod).map_err(|error| {
            failed(
                self.node.name(),
                automigrate_agent::api::error_kind::STORE,
                error,
            )
        })?;
        list.reverse();
        Ok(list.iter().map(|stored| self.summary(stored)).collect())
    }

    #[tracing::instrument(name = "agent_transfer", skip_all, fields(node = %self.node.name(), to = %request.to.node))]
    async fn start_transfer(
        &self,
        request: &TransferRequest,
    ) -> Result<TransferStatus, AgentError> {
        self.ensure_alive()?;
        let name = self.node.name().to_string();
        let invalid = |reason: String| AgentError::Invalid {
            node: name.clone(),
            reason,
        };
        let peer: SocketAddr =
            request.to.address.parse().map_err(|error| {
                invalid(format!("peer address {}: {error}", request.to.address))
            })?;
        let (source, target, adopt): (PathBuf, String, Option<(PodKey, String)>) = match &request
            .payload
        {
            Payload::Checkpoint { id } => {
                automigrate_agent::api::validate_checkpoint_id(id)
                    .map_err(|error| invalid(error.to_string()))?;
                let stored = self.find_checkpoint(id)?;
                let pod = PodKey::new(&stored.manifest.pod.namespace, &stored.manifest.pod.name);
                let target = format!("incoming/{}/{}/{id}", pod.namespace, pod.name);
                (stored.dir, target, Some((pod, id.clone())))
            }
            Payload::Dataset { path } => {
                automigrate_agent::api::validate_relative_path(path)
                    .map_err(|error| invalid(error.to_string()))?;
                let source = self.node.layout().data_root().join(path);
                if !source.is_dir() {
                    return Err(AgentError::NotFound {
                        node: name.clone(),
                        what: format!("dataset {path}"),
                    });
                }
                (source, format!("data/{path}"), None)
            }
        };
        let id = format!(
            "{}-{}",
            name,
            self.next_transfer.fetch_add(1, Ordering::Relaxed)
        );
        let running = TransferStatus {
            id: id.clone(),
            state: TransferState::Running,
            bytes_total: 0,
            bytes_done: 0,
            streams: 0,
            error: None,
        };
        Self::set_status(&self.transfers, &id, |record| {
            record.status = Some(running.clone());
        });
        let transfers = Arc::clone(&self.transfers);
        let progress_id = id.clone();
        let options = SendOptions {
            target: Some(target),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            retry: RetryPolicy {
                attempts: 2,
                min_delay: Duration::from_millis(200),
                max_delay: Duration::from_secs(1),
            },
            progress: Some(Arc::new(move |progress: &Progress| {
                Self::set_status(&transfers, &progress_id, |record| {
                    if let Some(status) = record.status.as_mut() {
                        status.bytes_total = progress.bytes_total;
                        status.bytes_done = progress.bytes_done;
                        status.streams = progress.streams;
                    }
                });
            })),
            ..SendOptions::default()
        };
        let namespace = self.node.namespace().to_string();
        let tls = self.tls.clone();
        let transfers = Arc::clone(&self.transfers);
        let directory = Arc::clone(&self.directory);
        let to_node = request.to.node.clone();
        let task_id = id.clone();
        let dead = Arc::clone(&self.dead);
        tokio::spawn(async move {
            let sent = tokio::task::spawn_blocking(move || {
                send_from_namespace(&namespace, Source::Dir(source), peer, tls, options, dead)
            })
            .await
            .map_err(|error| error.to_string())
            .and_then(|result| result);
            let outcome = match sent {
                Ok(report) => {
                    let handed_over = match &adopt {
                        Some((pod, checkpoint)) => match directory.get(&to_node) {
                            Some(receiver) => receiver
                                .adopt_checkpoint(pod, checkpoint)
                                .map_err(|error| error.to_string()),
                            None => Err(format!("no agent for node {to_node}")),
                        },
                        None => Ok(()),
                    };
                    handed_over.map(|()| report)
                }
                Err(error) => Err(error),
            };
            Self::set_status(&transfers, &task_id, |record| {
                if let Some(status) = record.status.as_mut() {
                    match &outcome {
                        Ok(report) => {
                            status.state = TransferState::Succeeded;
                            status.bytes_total = report.total_bytes;
                            status.bytes_done = report.total_bytes;
                            status.streams = report.max_streams_used;
                            record.bytes_sent = report.bytes_sent;
                        }
                        Err(error) => {
                            status.state = TransferState::Failed;
                            status.error = Some(error.clone());
                        }
                    }
                }
            });
        });
        Ok(running)
    }

    async fn transfer_status(&self, id: &str) -> Result<TransferStatus, AgentError> {
        self.ensure_alive()?;
        self.transfers
            .lock()
            .ok()
            .and_then(|transfers| transfers.get(id).and_then(|record| record.status.clone()))
            .ok_or_else(|| AgentError::NotFound {
                node: self.node.name().to_string(),
                what: format!("transfer {id}"),
            })
    }
}

/// Starts a transfer and polls it to the end (or until `limit`).
pub async fn transfer_to_end<A: NodeAgent>(
    agent: &A,
    request: &TransferRequest,
    limit: Duration,
) -> Result<TransferStatus, AgentError> {
    let started = agent.start_transfer(request).await?;
    let deadline = Instant::now() + limit;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let status = agent.transfer_status(&started.id).await?;
        match status.state {
            TransferState::Running if Instant::now() < deadline => continue,
            TransferState::Running => {
                return Err(failed(
                    agent.node(),
                    automigrate_agent::api::error_kind::INTERNAL,
                    format!("transfer {} still running after {limit:?}", started.id),
                ));
            }
            TransferState::Succeeded => return Ok(status),
            TransferState::Failed => {
                return Err(failed(
                    agent.node(),
                    automigrate_agent::api::error_kind::INTERNAL,
                    status.error.unwrap_or_else(|| "transfer failed".into()),
                ));
            }
        }
    }
}

/// A node's agent, whichever kind runs it.
#[derive(Debug, Clone)]
pub enum AgentHandle {
    /// The library pieces in this process.
    InProcess(Arc<InProcessAgent>),
    /// The `automigrate-agent` daemon in the node's namespace.
    Daemon(Arc<crate::daemon::DaemonAgent>),
}

impl AgentHandle {
    /// The agent dies (a crashed process): every later call is [`AgentError::Unreachable`].
    pub fn kill(&self) {
        match self {
            AgentHandle::InProcess(agent) => agent.kill(),
            AgentHandle::Daemon(agent) => agent.kill(),
        }
    }

    /// Bytes a transfer put on the wire, where the agent tells it (the API reports the bytes
    /// the receiver holds instead).
    pub fn bytes_sent(&self, id: &str) -> Option<u64> {
        match self {
            AgentHandle::InProcess(agent) => agent.bytes_sent(id),
            AgentHandle::Daemon(_) => None,
        }
    }

    /// Whether the agent applies checkpoint retention itself (the daemon does, with its
    /// `--retain-count`); otherwise the controller applies the policy's retention.
    pub fn applies_retention(&self) -> bool {
        matches!(self, AgentHandle::Daemon(_))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            AgentHandle::InProcess(_) => "in-process",
            AgentHandle::Daemon(_) => "daemon",
        }
    }
}

impl NodeAgent for AgentHandle {
    fn node(&self) -> &str {
        match self {
            AgentHandle::InProcess(agent) => agent.node(),
            AgentHandle::Daemon(agent) => agent.node(),
        }
    }

    fn transfer_address(&self) -> String {
        match self {
            AgentHandle::InProcess(agent) => agent.transfer_address(),
            AgentHandle::Daemon(agent) => agent.transfer_address(),
        }
    }

    async fn health(&self) -> Result<(), AgentError> {
        match self {
            AgentHandle::InProcess(agent) => agent.health().await,
            AgentHandle::Daemon(agent) => agent.health().await,
        }
    }

    async fn peers(&self) -> Result<Vec<PeerLatency>, AgentError> {
        match self {
            AgentHandle::InProcess(agent) => agent.peers().await,
            AgentHandle::Daemon(agent) => agent.peers().await,
        }
    }

    async fn checkpoint(
        &self,
        request: &CheckpointRequest,
    ) -> Result<CheckpointSummary, AgentError> {
        match self {
            AgentHandle::InProcess(agent) => agent.checkpoint(request).await,
            AgentHandle::Daemon(agent) => agent.checkpoint(request).await,
        }
    }

    async fn checkpoints(&self, pod: &PodKey) -> Result<Vec<CheckpointSummary>, AgentError> {
        match self {
            AgentHandle::InProcess(agent) => agent.checkpoints(pod).await,
            AgentHandle::Daemon(agent) => agent.checkpoints(pod).await,
        }
    }

    async fn start_transfer(
        &self,
        request: &TransferRequest,
    ) -> Result<TransferStatus, AgentError> {
        match self {
            AgentHandle::InProcess(agent) => agent.start_transfer(request).await,
            AgentHandle::Daemon(agent) => agent.start_transfer(request).await,
        }
    }

    async fn transfer_status(&self, id: &str) -> Result<TransferStatus, AgentError> {
        match self {
            AgentHandle::InProcess(agent) => agent.transfer_status(id).await,
            AgentHandle::Daemon(agent) => agent.transfer_status(id).await,
        }
    }
}
