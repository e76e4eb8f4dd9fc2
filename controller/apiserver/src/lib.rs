//! automigrate-apiserver: the local cluster's API server.
//!
//! The store and REST semantics are `automigrate-kube-fake` (the same in-process API server
//! the controller's tests run against); its `server` feature puts it on a TCP socket. This crate
//! owns what makes that a usable single-machine cluster for kubectl and for the real
//! `automigrate-controller` and agents: [`Options`] and [`start`] (bind, seed the namespaces a
//! cluster starts with, write the kubeconfig, serve until told to stop), and the policy that
//! the server listens on loopback unless explicitly told otherwise ([`check_listen`]).
//!
//! Why plain HTTP without authentication is acceptable here: the server binds 127.0.0.1 by
//! default, so only processes on this machine reach it, and on a single-machine cluster those
//! processes (the controller, the agents, the kubelets, the user's kubectl) run as the same
//! user as the server or as root, which could read or replace its memory anyway. A non-loopback
//! address (for example a host-only bridge that node network namespaces reach) needs
//! `--allow-non-loopback`, and must never be reachable from another machine: every client is
//! cluster-admin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use automigrate_kube_fake::server::{ServeError, kubeconfig, serve};
use automigrate_kube_fake::{FakeCluster, FakeClusterOptions, ResourceType};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Namespaces every cluster starts with.
pub const INITIAL_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// How long a stop waits for open requests before giving up on them.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// What can go wrong starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// A listen address is not loopback and `allow_non_loopback` is off.
    #[error(
        "refusing to listen on {0}: the API server has no authentication, so it listens on loopback only (pass --allow-non-loopback for a host-only address of this machine)"
    )]
    NotLoopback(SocketAddr),
    /// No listen address was given.
    #[error("no listen address")]
    NoListenAddress,
    /// Binding a listen address failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Writing the kubeconfig failed.
    #[error("writing the kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Its path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Seeding the initial objects failed.
    #[error("creating namespace {name}: {source}")]
    Seed {
        /// The namespace.
        name: String,
        /// What the store said.
        #[source]
        source: Box<automigrate_kube_fake::ApiError>,
    },
    /// Serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Open requests (a watch that did not end, a slow client) outlived the stop grace; they
    /// were dropped.
    #[error("open requests did not finish within {0:?} of the stop; they were dropped")]
    StopTimedOut(Duration),
    /// A server task panicked or was cancelled.
    #[error("a server task ended abnormally: {0}")]
    Task(String),
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Addresses to listen on (port 0 picks a free port); the kubeconfig names the first.
    pub listen: Vec<SocketAddr>,
    /// Allow addresses that are not loopback.
    pub allow_non_loopback: bool,
    /// Where to write a kubeconfig pointing at the server, if anywhere.
    pub kubeconfig: Option<PathBuf>,
    /// Graceful pod deletion as a real API server does it: deleting a pod bound to a node
    /// only marks it; the node's kubelet removes it once its containers stopped.
    pub graceful_pod_deletion: bool,
}

/// Refuses non-loopback addresses unless allowed (see the crate docs for why).
pub fn check_listen(addr: SocketAddr, allow_non_loopback: bool) -> Result<(), ApiServerError> {
    if addr.ip().is_loopback() || allow_non_loopback {
        Ok(())
    } else {
        Err(ApiServerError::NotLoopback(addr))
    }
}

/// Creates the namespaces every cluster starts with (`Active`).
pub fn seed(cluster: &FakeCluster) -> Result<(), ApiServerError> {
    let namespaces = ResourceType::new("", "v1", "namespaces");
    for name in INITIAL_NAMESPACES {
        cluster
            .put_value(
                &namespaces,
                json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                }),
            )
            .map_err(|source| ApiServerError::Seed {
                name: (*name).to_owned(),
                source: Box::new(source),
            })?;
    }
    Ok(())
}

/// Writes the kubeconfig for `addr` atomically (a reader never sees half a file).
pub fn write_kubeconfig(path: &Path, addr: SocketAddr) -> Result<(), ApiServerError> {
    let error = |source| ApiServerError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    std::fs::write(&partial, kubeconfig(&format!("http://{addr}"))).map_err(error)?;
    std::fs::rename(&partial, path).map_err(error)
}

/// A running server: its cluster, bound addresses, and the handle that stops it.
#[derive(Debug)]
pub struct Running {
    /// The cluster behind the server (for seeding or inspecting from the same process).
    pub cluster: FakeCluster,
    /// The bound addresses, in the order of [`Options::listen`].
    pub addrs: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<Result<(), ServeError>>,
}

impl Running {
    /// Stops gracefully (ends watches, finishes open requests) and waits, at most
    /// [`STOP_GRACE`], for the listeners to close; past that the remaining requests are
    /// dropped and the stop is reported as [`ApiServerError::StopTimedOut`].
    pub async fn stop(mut self) -> Result<(), ApiServerError> {
        // Ignored error: every server task already ended.
        let _ = self.stop.send(true);
        let tasks = &mut self.tasks;
        let drained = tokio::time::timeout(STOP_GRACE, async move {
            let mut first_error = None;
            while let Some(joined) = tasks.join_next().await {
                let result = match joined {
                    Ok(served) => served.map_err(ApiServerError::from),
                    Err(error) => Err(ApiServerError::Task(error.to_string())),
                };
                if let Err(error) = result {
                    first_error.get_or_insert(error);
                }
            }
            first_error
        })
        .await;
        match drained {
            Ok(None) => Ok(()),
            Ok(Some(error)) => Err(error),
            Err(_) => {
                self.tasks.abort_all();
                Err(ApiServerError::StopTimedOut(STOP_GRACE))
            }
        }
    }
}

/// Binds every address, seeds the cluster, writes the kubeconfig, and serves in background
/// tasks (call inside a Tokio runtime).
pub async fn start(options: &Options) -> Result<Running, ApiServerError> {
    if options.listen.is_empty() {
        return Err(ApiServerError::NoListenAddress);
    }
    for addr in &options.listen {
        check_listen(*addr, options.allow_non_loopback)?;
    }
    let cluster = FakeCluster::with_options(FakeClusterOptions {
        // A long-lived server must not keep every request it ever answered.
        record_requests: false,
        graceful_pod_deletion: options.graceful_pod_deletion,
        ..FakeClusterOptions::default()
    });
    seed(&cluster)?;
    let mut listeners = Vec::with_capacity(options.listen.len());
    let mut addrs = Vec::with_capacity(options.listen.len());
    for addr in &options.listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiServerError::Bind {
                addr: *addr,
                source,
            })?;
        let bound = listener
            .local_addr()
            .map_err(|source| ApiServerError::Bind {
                addr: *addr,
                source,
            })?;
        listeners.push(listener);
        addrs.push(bound);
    }
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for listener in listeners {
        let mut stopping = stopping.clone();
        tasks.spawn(serve(cluster.clone(), listener, async move {
            // A dropped sender (the Running handle is gone) stops the server too.
            let _ = stopping.wait_for(|stop| *stop).await;
        }));
    }
    if let (Some(path), Some(first)) = (&options.kubeconfig, addrs.first()) {
        write_kubeconfig(path, *first)?;
        tracing::info!(path = %path.display(), server = %format!("http://{first}"), "kubeconfig written");
    }
    Ok(Running {
        cluster,
        addrs,
        stop,
        tasks,
    })
}
