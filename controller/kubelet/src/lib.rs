//! automigrate-kubelet: the local cluster's kubelet, one per node.
//!
//! It reaches the API server the way a kubelet does (a `kube::Client` from a kubeconfig) and,
//! for this product, does what a real kubelet with CRI-O or containerd >= 2.1 does:
//! - [`node`]: registers its Node, keeps its conditions current, renews its Lease in
//!   `kube-node-lease`;
//! - [`pods`]: runs the pods bound to it (`spec.nodeName`) as runc containers, writes their
//!   status, stops them on deletion honouring the grace period and removes the pod;
//! - [`runtime`]: the runc side (bundles from pod specs, `runc run`, SIGTERM/SIGKILL);
//! - [`images`]: the node's image store; checkpoint images are restored, not started;
//! - [`checkpoint`]: the kubelet checkpoint API (`POST /checkpoint/{namespace}/{pod}/{container}`).
//!
//! See docs/local-cluster.md ("Local kubelet") for what differs from a real kubelet.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

pub mod checkpoint;
pub mod images;
pub mod node;
pub mod pods;
pub mod runtime;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error(transparent)]
    Node(#[from] node::NodeError),
    #[error(transparent)]
    Pods(#[from] pods::PodError),
    #[error("kubelet API on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("a kubelet task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Everything one kubelet needs.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeletConfig {
    pub node: node::NodeConfig,
    pub pods: pods::PodConfig,
    pub runc: String,
    /// Where the kubelet API (checkpoint calls) listens; `None`: not served.
    pub api_listen: Option<SocketAddr>,
    /// The checkpoint directory named in checkpoint answers.
    pub reported_checkpoint_dir: PathBuf,
}

/// A started kubelet: its pieces run as tasks until [`Kubelet::shutdown`].
#[derive(Debug)]
pub struct Kubelet {
    shutdown: watch::Sender<bool>,
    registry: pods::Registry,
    runtime: Arc<runtime::Runtime>,
    api_addr: Option<SocketAddr>,
    node_task: tokio::task::JoinHandle<Result<(), node::NodeError>>,
    pod_task: tokio::task::JoinHandle<Result<(), pods::PodError>>,
}

impl Kubelet {
    /// Registers the node (returns once registered) and starts the status, lease and pod loops.
    pub async fn start(
        client: kube::Client,
        mut config: KubeletConfig,
    ) -> Result<Self, KubeletError> {
        let layout = runtime::Layout::new(config.node.root_dir.clone())
            .with_host_path_map(config.pods.host_path_map.clone());
        let runtime = Arc::new(runtime::Runtime::new(layout, config.runc.clone()));
        config.node.runtime_version = runtime.version().await;
        let registry = pods::Registry::default();
        let api = checkpoint::CheckpointApi {
            runtime: runtime.clone(),
            registry: registry.clone(),
            reported_dir: config.reported_checkpoint_dir.clone(),
        };
        let listener = match config.api_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| KubeletError::Listen { addr, source })?,
            ),
            None => None,
        };
        let api_addr = match &listener {
            Some(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(|source| KubeletError::Listen {
                        addr: config
                            .api_listen
                            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                        source,
                    })?;
                config.node.port = addr.port();
                Some(addr)
            }
            None => None,
        };
        node::register(&client, &config.node).await?;
        let (shutdown, receiver) = watch::channel(false);
        if let Some(listener) = listener {
            let mut stop = receiver.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, checkpoint::router(api))
                    .with_graceful_shutdown(async move { pods::stopped(&mut stop).await })
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "kubelet API stopped");
                }
            });
        }
        let node_task = tokio::spawn(node::run(client.clone(), config.node, receiver.clone()));
        let pod_task = tokio::spawn(pods::run(
            client,
            runtime.clone(),
            config.pods,
            registry.clone(),
            receiver,
        ));
        Ok(Self {
            shutdown,
            registry,
            runtime,
            api_addr,
            node_task,
            pod_task,
        })
    }

    pub fn registry(&self) -> &pods::Registry {
        &self.registry
    }

    /// Where the kubelet API listens (the port the Node advertises).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    pub fn runtime(&self) -> &Arc<runtime::Runtime> {
        &self.runtime
    }

    /// Stops the loops (containers keep running, as they outlive a restarted kubelet).
    pub async fn shutdown(self) -> Result<(), KubeletError> {
        let _ = self.shutdown.send(true);
        self.node_task.await??;
        self.pod_task.await??;
        Ok(())
    }

    /// Waits until a loop ends by itself (it only does on an error).
    pub async fn wait(&mut self) -> Result<(), KubeletError> {
        tokio::select! {
            result = &mut self.node_task => result??,
            result = &mut self.pod_task => result??,
        }
        Ok(())
    }
}
