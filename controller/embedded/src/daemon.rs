//! Node agents as daemons: one `automigrate-agent` process per node, started inside the node's
//! network namespace (`nsenter --net`) and talked to with `automigrate_agent::client::AgentClient`
//! over its HTTP API — the same program and the same client the Kubernetes deployment uses.
//!
//! Data model of a [`DaemonAgent`]:
//! - the child process (killed with SIGKILL when the node fails, as a crashed daemon would be);
//! - the daemon listens on the node's emulated address: API on 9460, transfers (TCP, mutual TLS)
//!   and latency probes (UDP) on 9461; it has no root-namespace address, so the controller's
//!   HTTP calls run on a thread that entered the node's namespace, with its own
//!   current-thread runtime ([`NamespacedCalls`]); callers hand it closures over the client;
//! - its storage is the node's: data root `exchange/data`, store `checkpoints/`, runc state
//!   `runc/`; containers are named by [`crate::node::RUNC_ID_TEMPLATE`];
//! - its log: `<node>/logs/agent.log`.
//!
//! A controller in another process reaches the same daemons with [`DaemonAgent::attach`]: a
//! client in the node's namespace and no child process (its `kill` only stops using it).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_agent::api::{
    CheckpointRequest, CheckpointSummary, PeerLatency, PodKey, TransferRequest, TransferStatus,
};
use automigrate_agent::client::{AgentClient, ClientError, ClientOptions};

use crate::agent::{AgentError, NodeAgent, PROBE_WINDOW, ProbeTarget, TRANSFER_PORT};
use crate::node::{LocalNode, RUNC_ID_TEMPLATE};

/// The daemon's API port.
pub const API_PORT: u16 = 9460;
/// The daemon's program name.
pub const AGENT_PROGRAM: &str = "automigrate-agent";
const QUICK_CALL: Duration = Duration::from_secs(3);
const CHECKPOINT_CALL: Duration = Duration::from_secs(180);
const STARTUP: Duration = Duration::from_secs(30);

/// Where the daemon's binary is: `$AUTOMIGRATE_AGENT_BIN`, else as [`find_program`] looks.
pub fn find_agent_binary() -> Option<PathBuf> {
    find_program(AGENT_PROGRAM, "AUTOMIGRATE_AGENT_BIN")
}

/// Where one of the workspace's programs is: `$override_var`, else next to the running program
/// (or one directory up, for test binaries in `target/<profile>/deps`), else on `PATH`.
pub fn find_program(name: &str, override_var: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(override_var) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let beside = exe.parent().map(|dir| dir.join(name));
    let above = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name));
    if let Some(found) = [beside, above]
        .into_iter()
        .flatten()
        .find(|path| path.is_file())
    {
        return Some(found);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

type Job = Box<dyn FnOnce(AgentClient) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Runs `AgentClient` calls on a thread inside a network namespace.
#[derive(Debug)]
pub struct NamespacedCalls {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl NamespacedCalls {
    /// Starts the thread. Calls run concurrently on its runtime; it ends when this is dropped.
    pub fn start(namespace: &str, client: AgentClient) -> Result<Self, String> {
        let (jobs, mut queue) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let namespace = namespace.to_string();
        std::thread::Builder::new()
            .name(format!("agent-client-{namespace}"))
            .spawn(move || {
                if let Err(error) = automigrate_netem::enter_namespace(&namespace) {
                    tracing::error!(%error, "agent client cannot enter the node's namespace");
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(%error, "agent client runtime");
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    while let Some(job) = queue.recv().await {
                        tokio::task::spawn_local(job(client.clone()));
                    }
                });
            })
            .map_err(|error| error.to_string())?;
        Ok(Self { jobs })
    }

    /// Runs `call` with the client in the namespace and waits (at most `limit`) for its result.
    pub async fn call<T, F, Fut>(&self, limit: Duration, call: F) -> Option<Result<T, ClientError>>
    where
        T: Send + 'static,
        F: FnOnce(AgentClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ClientError>> + 'static,
    {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |client| {
            Box::pin(async move {
                let _ = answer.send(call(client).await);
            })
        });
        self.jobs.send(job).ok()?;
        tokio::time::timeout(limit, answered).await.ok()?.ok()
    }
}

/// What a daemon needs besides the node.
#[derive(Debug, Clone)]
pub struct DaemonSetup {
    pub binary: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub peers: Vec<ProbeTarget>,
    /// Checkpoints kept per pod.
    pub retain_count: u32,
}

/// One node's agent daemon (see the module header).
#[derive(Debug)]
pub struct DaemonAgent {
    node: Arc<LocalNode>,
    child: Mutex<Option<Child>>,
    calls: NamespacedCalls,
    dead: AtomicBool,
    log: PathBuf,
}

impl DaemonAgent {
    /// Starts the daemon in the node's namespace and waits until it is ready.
    #[tracing::instrument(name = "daemon_start", skip_all, fields(node = %node.name()))]
    pub async fn start(node: Arc<LocalNode>, setup: &DaemonSetup) -> Result<Arc<Self>, AgentError> {
        let name = node.name().to_string();
        let failed = |message: String| AgentError::Failed {
            node: name.clone(),
            kind: automigrate_agent::api::error_kind::INTERNAL.into(),
            message,
        };
        let address = node.address();
        let layout = node.layout().clone();
        let log = layout.logs().join("agent.log");
        let log_file = std::fs::File::create(&log)
            .map_err(|error| failed(format!("{}: {error}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(|error| failed(format!("{}: {error}", log.display())))?;
        let peers: Vec<String> = setup
            .peers
            .iter()
            .map(|peer| {
                format!(
                    "{}={}",
                    peer.node,
                    SocketAddr::from((peer.address, TRANSFER_PORT))
                )
            })
            .collect();
        // `nsenter --net` switches the network namespace only: `ip netns exec` would also give the
        // daemon a private /sys without the cgroup mounts, where CRIU cannot freeze anything.
        let mut command = std::process::Command::new("nsenter");
        command
            .arg(format!(
                "--net={}/{}",
                automigrate_netem::NETNS_RUN_DIR,
                node.namespace()
            ))
            .arg("--")
            .arg(&setup.binary);
        command
            .arg("--node-name")
            .arg(&name)
            .arg("--api-listen")
            .arg(SocketAddr::from((address, API_PORT)).to_string())
            .arg("--transfer-listen")
            .arg(SocketAddr::from((address, TRANSFER_PORT)).to_string())
            .arg("--allow-unauthenticated")
            .arg("--data-root")
            .arg(layout.data_root())
            .arg("--store-root")
            .arg(layout.store())
            .arg("--tls-ca")
            .arg(&setup.ca)
            .arg("--tls-cert")
            .arg(&setup.cert)
            .arg("--tls-key")
            .arg(&setup.key)
            .args(["--backend", "runc", "--runc-root"])
            .arg(layout.runc_root())
            .args(["--runc-container-id", RUNC_ID_TEMPLATE])
            .args(["--checkpoint-timeout", "2m"])
            .args(["--retain-count", &setup.retain_count.max(1).to_string()])
            .args(["--probe-interval", "250ms"])
            .args(["--probe-window", &PROBE_WINDOW.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        if !peers.is_empty() {
            command.arg("--peer").arg(peers.join(","));
        }
        let child = command
            .spawn()
            .map_err(|error| failed(format!("starting {}: {error}", setup.binary.display())))?;
        let client = Self::client(address).map_err(|error| failed(error.to_string()))?;
        let calls = NamespacedCalls::start(node.namespace(), client).map_err(failed)?;
        let agent = Arc::new(Self {
            node,
            child: Mutex::new(Some(child)),
            calls,
            dead: AtomicBool::new(false),
            log,
        });
        let deadline = Instant::now() + STARTUP;
        loop {
            let ready = agent
                .calls
                .call(QUICK_CALL, |client| async move { client.ready().await })
                .await;
            if matches!(ready, Some(Ok(()))) {
                tracing::info!("agent daemon ready");
                return Ok(agent);
            }
            let exited = agent
                .child
                .lock()
                .ok()
                .and_then(|mut child| child.as_mut().and_then(|child| child.try_wait().ok()))
                .flatten();
            if let Some(status) = exited {
                return Err(failed(format!(
                    "the agent daemon exited ({status}): {}",
                    automigrate_checkpoint::criu::log_tail(&agent.log, 10)
                )));
            }
            if Instant::now() > deadline {
                agent.kill();
                return Err(failed(format!(
                    "the agent daemon was not ready within {STARTUP:?}: {}",
                    automigrate_checkpoint::criu::log_tail(&agent.log, 10)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the daemon dies with whatever it was doing.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Ok(mut child) = self.child.lock()
            && let Some(mut process) = child.take()
        {
            let _ = process.kill();
            let _ = process.wait();
            tracing::info!(node = %self.node.name(), "agent daemon killed");
        }
    }

    /// The daemon another process started on `node`, reached over its API without owning it.
    pub fn attach(node: Arc<LocalNode>) -> Result<Arc<Self>, AgentError> {
        let failed = |message: String| AgentError::Failed {
            node: node.name().to_string(),
            kind: automigrate_agent::api::error_kind::INTERNAL.into(),
            message,
        };
        let client = Self::client(node.address()).map_err(|error| failed(error.to_string()))?;
        let calls = NamespacedCalls::start(node.namespace(), client).map_err(failed)?;
        let log = node.layout().logs().join("agent.log");
        Ok(Arc::new(Self {
            node,
            child: Mutex::new(None),
            calls,
            dead: AtomicBool::new(false),
            log,
        }))
    }

    fn client(address: std::net::Ipv4Addr) -> Result<AgentClient, ClientError> {
        AgentClient::with_options(
            &format!("http://{}", SocketAddr::from((address, API_PORT))),
            None,
            ClientOptions {
                ca_pem: None,
                connect_timeout: Duration::from_secs(2),
                request_timeout: None,
            },
        )
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    fn error(&self, error: Option<Result<(), ClientError>>) -> AgentError {
        let node = self.node.name().to_string();
        match error {
            None | Some(Ok(())) => AgentError::Unreachable { node },
            Some(Err(error)) => match error {
                ClientError::Unreachable { .. }
                | ClientError::Timeout { .. }
                | ClientError::Unavailable { .. } => AgentError::Unreachable { node },
                ClientError::NotFound { message, .. } => AgentError::NotFound {
                    node,
                    what: message,
                },
                ClientError::InvalidArgument(reason) => AgentError::Invalid { node, reason },
                other => AgentError::Failed {
                    node,
                    kind: other
                        .kind()
                        .unwrap_or(automigrate_agent::api::error_kind::INTERNAL)
                        .to_string(),
                    message: other.to_string(),
                },
            },
        }
    }

    async fn call<T, F, Fut>(&self, limit: Duration, call: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: FnOnce(AgentClient) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ClientError>> + 'static,
    {
        if self.dead.load(Ordering::SeqCst) {
            return Err(self.error(None));
        }
        match self.calls.call(limit, call).await {
            Some(Ok(value)) => Ok(value),
            Some(Err(error)) => Err(self.error(Some(Err(error)))),
            None => Err(self.error(None)),
        }
    }
}

impl Drop for DaemonAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

impl NodeAgent for DaemonAgent {
    fn node(&self) -> &str {
        self.node.name()
    }

    fn transfer_address(&self) -> String {
        SocketAddr::from((self.node.address(), TRANSFER_PORT)).to_string()
    }

    async fn health(&self) -> Result<(), AgentError> {
        self.call(QUICK_CALL, |client| async move { client.health().await })
            .await
    }

    async fn peers(&self) -> Result<Vec<PeerLatency>, AgentError> {
        self.call(QUICK_CALL, |client| async move { client.peers().await })
            .await
    }

    async fn checkpoint(
        &self,
        request: &CheckpointRequest,
    ) -> Result<CheckpointSummary, AgentError> {
        let request = request.clone();
        self.call(CHECKPOINT_CALL, move |client| async move {
            client.checkpoint(&request).await
        })
        .await
    }

    async fn checkpoints(&self, pod: &PodKey) -> Result<Vec<CheckpointSummary>, AgentError> {
        let pod = pod.clone();
        self.call(QUICK_CALL, move |client| async move {
            client.checkpoints(&pod).await
        })
        .await
    }

    async fn start_transfer(
        &self,
        request: &TransferRequest,
    ) -> Result<TransferStatus, AgentError> {
        let request = request.clone();
        self.call(QUICK_CALL, move |client| async move {
            client.start_transfer(&request).await
        })
        .await
    }

    async fn transfer_status(&self, id: &str) -> Result<TransferStatus, AgentError> {
        let id = id.to_string();
        self.call(QUICK_CALL, move |client| async move {
            client.transfer_status(&id).await
        })
        .await
    }
}
