//! The reflectors: in-memory copies of what the decision pass and the executor read, kept
//! current by watches (kube-runtime `watcher` + `reflector`, with the default backoff).
//!
//! - Nodes (all): health, taints, allocatable.
//! - Leases in `kube-node-lease`: each kubelet's heartbeat.
//! - Pods (all namespaces): protected pods, every pod's requests (a node's free room), the agent
//!   pod on each node, replacement pods. Managed fields are dropped to save memory.
//! - Migrations (all namespaces).
//!
//! Policy ConfigMaps are not kept here: [`crate::policies`] follows them as a stream of changes.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};

use crate::crd::Migration;
use crate::snapshot::NODE_LEASE_NAMESPACE;

#[derive(Debug, Clone)]
pub struct Stores {
    pub nodes: Store<Node>,
    pub leases: Store<Lease>,
    pub pods: Store<Pod>,
    pub migrations: Store<Migration>,
}

fn reflect<K>(api: Api<K>, name: &'static str) -> (Store<K>, impl Future<Output = ()> + Send)
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
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|object: &mut K| {
            object.managed_fields_mut().clear();
        });
    let task = drain(reflector::reflector(writer, stream), name);
    (reader, task)
}

async fn drain<S, K>(stream: S, name: &'static str)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        if let Err(error) = event {
            tracing::warn!(%error, store = name, "watch error; the watcher backs off and retries");
            crate::metrics::error("reflector", name);
        }
    }
}

impl Stores {
    /// Starts every reflector on the runtime; the stores fill as the initial lists arrive.
    pub fn spawn(client: &Client) -> Self {
        let (nodes, nodes_task) = reflect(Api::<Node>::all(client.clone()), "nodes");
        let (leases, leases_task) = reflect(
            Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE),
            "leases",
        );
        let (pods, pods_task) = reflect(Api::<Pod>::all(client.clone()), "pods");
        let (migrations, migrations_task) =
            reflect(Api::<Migration>::all(client.clone()), "migrations");
        tokio::spawn(nodes_task);
        tokio::spawn(leases_task);
        tokio::spawn(pods_task);
        tokio::spawn(migrations_task);
        Self {
            nodes,
            leases,
            pods,
            migrations,
        }
    }

    /// Waits until every store holds its initial list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.nodes.wait_until_ready().await?;
        self.leases.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.migrations.wait_until_ready().await?;
        Ok(())
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
