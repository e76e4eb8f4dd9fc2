//! automigrate-kubelet: the local cluster's kubelet, one per node.
//!
//! It reaches the API server the way a kubelet does (a `kube::Client` from a kubeconfig) and,
//! for this product, does what a real kubelet with CRI-O or containerd >= 2.1 does:
//! - [`node`]: registers its Node, keeps its conditions current, renews its Lease in
//!   `kube-node-lease`;
//! - [`pods`]: runs the pods bound to it (`spec.nodeName`) as runc containers, writes their
//!   status, stops them on deletion honouring the grace period and removes the pod;
//! - [`runtime`]: the runc side (bundles from pod specs, `runc run`, SIGTERM/SIGKILL).
//!
//! See docs/local-cluster.md ("Local kubelet") for what differs from a real kubelet.

use std::sync::Arc;

use tokio::sync::watch;

pub mod node;
pub mod pods;
pub mod runtime;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error(transparent)]
    Node(#[from] node::NodeError),
    #[error(transparent)]
    Pods(#[from] pods::PodError),
    #[error("a kubelet task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Everything one kubelet needs.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeletConfig {
    pub node: node::NodeConfig,
    pub pods: pods::PodConfig,
    pub runc: String,
}

/// A started kubelet: its pieces run as tasks until [`Kubelet::shutdown`].
#[derive(Debug)]
pub struct Kubelet {
    shutdown: watch::Sender<bool>,
    registry: pods::Registry,
    runtime: Arc<runtime::Runtime>,
    node_task: tokio::task::JoinHandle<Result<(), node::NodeError>>,
    pod_task: tokio::task::JoinHandle<Result<(), pods::PodError>>,
}

impl Kubelet {
    /// Registers the node (returns once registered) and starts the status, lease and pod loops.
    pub async fn start(
        client: kube::Client,
        mut config: KubeletConfig,
    ) -> Result<Self, KubeletError> {
        let layout = runtime::Layout::new(config.node.root_dir.clone());
        let runtime = Arc::new(runtime::Runtime::new(layout, config.runc.clone()));
        config.node.runtime_version = runtime.version().await;
        node::register(&client, &config.node).await?;
        let (shutdown, receiver) = watch::channel(false);
        let registry = pods::Registry::default();
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
            node_task,
            pod_task,
        })
    }

    pub fn registry(&self) -> &pods::Registry {
        &self.registry
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
