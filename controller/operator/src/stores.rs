//! The reflectors: in-memory copies of what the decision pass and the executor read, kept
//! current by watches (kube-runtime `watcher` + a store writer, with the default backoff).
//! Each watch runs as a supervised task ([`supervise`]): one that ends or panics is marked down
//! in [`WatchHealth`] (`/readyz` fails) and restarted into the same store.
//!
//! - Nodes (all): health, taints, allocatable.
//! - Leases in `kube-node-lease`: each kubelet's heartbeat.
//! - Pods (all namespaces): protected pods, every pod's requests (a node's free room), the agent
//!   pod on each node, replacement pods. Managed fields are dropped to save memory.
//! - Migrations (all namespaces).
//!
//! Policy ConfigMaps are not kept here: [`crate::policies`] follows them as a stream of changes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::{Notify, watch};

use crate::crd::Migration;
use crate::snapshot::NODE_LEASE_NAMESPACE;

#[derive(Debug, Clone)]
pub struct Stores {
    pub nodes: Store<Node>,
    pub leases: Store<Lease>,
    pub pods: Store<Pod>,
    pub migrations: Store<Migration>,
    /// Which watch tasks run now; `/readyz` fails while one does not.
    pub watches: WatchHealth,
    /// `Some(true)` once every store holds its initial list, `Some(false)` if one never can.
    synced: watch::Receiver<Option<bool>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a store's writer stopped before its initial list arrived")]
    NeverSynced,
}

impl StoreError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NeverSynced => "never_synced",
        }
    }
}

/// The watch tasks that are not running now (ended or panicked, waiting to be restarted).
#[derive(Debug, Clone, Default)]
pub struct WatchHealth {
    down: Arc<Mutex<BTreeSet<&'static str>>>,
}

impl WatchHealth {
    fn set(&self, name: &'static str, running: bool) {
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        if running {
            down.remove(name);
        } else {
            down.insert(name);
        }
    }

    /// Every watch task runs.
    pub fn all_running(&self) -> bool {
        self.down().is_empty()
    }

    /// The watches that do not run now, by store name.
    pub fn down(&self) -> Vec<&'static str> {
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }
}

/// First wait before restarting a watch task that ended; doubled per restart in a row, up to
/// [`RESTART_MAX`].
pub const RESTART_MIN: Duration = Duration::from_secs(1);
pub const RESTART_MAX: Duration = Duration::from_secs(30);
/// A task that ran this long before ending starts its restarts from [`RESTART_MIN`] again.
const RESTART_RESET_AFTER: Duration = Duration::from_secs(300);

/// Runs the task `start` makes and, whenever it ends or panics, marks `name` down in `health`
/// (so `/readyz` fails), waits (backing off), and starts a new one. A watch task is meant to
/// run for ever: kube's watcher retries API errors itself, so one that ends is a bug or a
/// panic, and a replica whose store silently stopped following the cluster must not look
/// healthy. Returns the supervisor's handle (it ends only with the runtime).
pub fn supervise<F, Fut>(
    name: &'static str,
    health: WatchHealth,
    mut start: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut delay = RESTART_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let outcome = tokio::spawn(start()).await;
            health.set(name, false);
            match outcome {
                Ok(()) => tracing::error!(store = name, "watch task ended; restarting it"),
                Err(error) if error.is_panic() => {
                    tracing::error!(store = name, "watch task panicked; restarting it");
                }
                // Cancelled: the runtime is shutting down.
                Err(_) => return,
            }
            crate::metrics::error("watch_restarted", name);
            if started.elapsed() >= RESTART_RESET_AFTER {
                delay = RESTART_MIN;
            }
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2).min(RESTART_MAX);
            health.set(name, true);
        }
    })
}

/// A store of `K` kept by a supervised watch of `api` (see [`supervise`]). The store's writer
/// outlives each watch task, so a restarted task refills the same store every reader holds.
/// Objects without a name are dropped (kube's reflector panics on them). `changed`, if given,
/// is notified after every change the store applies.
pub fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    name: &'static str,
    health: WatchHealth,
    changed: Option<Arc<Notify>>,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let writer = Arc::new(Mutex::new(writer));
    supervise(name, health, move || {
        let stream = watcher(api.clone(), config.clone())
            .default_backoff()
            .modify(|object: &mut K| {
                object.managed_fields_mut().clear();
            });
        drain(stream, writer.clone(), name, changed.clone())
    });
    reader
}

fn named<K: Resource>(object: &K) -> bool {
    object
        .meta()
        .name
        .as_deref()
        .is_some_and(|name| !name.is_empty())
}

async fn drain<S, K>(
    stream: S,
    writer: Arc<Mutex<reflector::store::Writer<K>>>,
    name: &'static str,
    changed: Option<Arc<Notify>>,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    K: Resource<DynamicType = ()> + Clone,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, store = name, "watch error; the watcher backs off and retries");
                crate::metrics::error("reflector", name);
                continue;
            }
        };
        let keep = match &event {
            watcher::Event::Apply(object)
            | watcher::Event::Delete(object)
            | watcher::Event::InitApply(object) => named(object),
            watcher::Event::Init | watcher::Event::InitDone => true,
        };
        if !keep {
            tracing::warn!(
                store = name,
                "the API server sent an object without a name; ignored"
            );
            crate::metrics::error("reflector", "unnamed_object");
            continue;
        }
        writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .apply_watcher_event(&event);
        if let Some(changed) = &changed
            && !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_))
        {
            changed.notify_one();
        }
    }
}

impl Stores {
    /// Starts every reflector on the runtime; the stores fill as the initial lists arrive.
    pub fn spawn(client: &Client) -> Self {
        let watches = WatchHealth::default();
        let all = || watcher::Config::default();
        let nodes = reflect(
            Api::<Node>::all(client.clone()),
            all(),
            "nodes",
            watches.clone(),
            None,
        );
        let leases = reflect(
            Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE),
            all(),
            "leases",
            watches.clone(),
            None,
        );
        let pods = reflect(
            Api::<Pod>::all(client.clone()),
            all(),
            "pods",
            watches.clone(),
            None,
        );
        let migrations = reflect(
            Api::<Migration>::all(client.clone()),
            all(),
            "migrations",
            watches.clone(),
            None,
        );
        // One task waits on the stores and tells every other waiter: kube's readiness future
        // wakes only the last task that polled it, so two tasks awaiting one store directly
        // can leave one of them waiting for ever.
        let (sender, synced) = watch::channel(None);
        {
            let (nodes, leases, pods, migrations) = (
                nodes.clone(),
                leases.clone(),
                pods.clone(),
                migrations.clone(),
            );
            tokio::spawn(async move {
                let synced = nodes.wait_until_ready().await.is_ok()
                    && leases.wait_until_ready().await.is_ok()
                    && pods.wait_until_ready().await.is_ok()
                    && migrations.wait_until_ready().await.is_ok();
                let _ = sender.send(Some(synced));
            });
        }
        Self {
            nodes,
            leases,
            pods,
            migrations,
            watches,
            synced,
        }
    }

    /// Waits until every store holds its initial list. Any number of tasks may wait at once.
    pub async fn ready(&self) -> Result<(), StoreError> {
        let mut synced = self.synced.clone();
        let synced = synced
            .wait_for(Option::is_some)
            .await
            .map(|synced| *synced == Some(true));
        match synced {
            Ok(true) => Ok(()),
            _ => Err(StoreError::NeverSynced),
        }
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(&reflector::ObjectRef::new(name))
    }

    pub fn node_lease(&self, node: &str) -> Option<Arc<Lease>> {
        self.leases
            .get(&reflector::ObjectRef::new(node).within(NODE_LEASE_NAMESPACE))
    }

    pub fn migration(&self, namespace: &str, name: &str) -> Option<Arc<Migration>> {
        self.migrations
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// Pods with `name` matching `pred`: the agent on a node, a pod's replacement.
    pub fn find_pod(&self, predicate: impl Fn(&Pod) -> bool) -> Option<Arc<Pod>> {
        self.pods.find(|pod| predicate(pod))
    }

    pub fn pod_names(&self) -> Vec<String> {
        self.pods.state().iter().map(|pod| pod.name_any()).collect()
    }
}
