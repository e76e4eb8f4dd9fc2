//! automigrate-kube-fake: an in-process Kubernetes API server behind `kube::Client`.
//!
//! [`FakeCluster`] is a `tower::Service` ([`FakeService`]) speaking the real REST paths and JSON,
//! so controller code and tests run the real kube client stack (`Api`, patch params, watchers,
//! reflectors, event recorders, leases) with no network. Objects are stored as
//! `serde_json::Value`, so every resource works, custom resources of any group included, with
//! no registration.
//!
//! What it implements (see the module docs for the details):
//! - [`path`]: core `/api/v1/...` and `/apis/{group}/{version}/...` paths, namespaced and
//!   cluster-scoped, all-namespace lists, subresources, node proxy, `/version`.
//! - `store` (private): GET, LIST, POST (generateName, AlreadyExists), PUT (409
//!   Conflict on a stale resourceVersion), PATCH (merge, strategic-as-merge, JSON patch, apply
//!   as create-or-merge), DELETE (finalizers and deletionTimestamp, preconditions), the
//!   `/status` subresource, deletecollection, pod eviction, dry runs; one global
//!   resourceVersion, uid, creationTimestamp, generation; no-op writes stay no-ops.
//! - [`selector`]: label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and field
//!   selectors limited to the fields a real server indexes.
//! - `watch` (private): chunked newline-delimited WatchEvents with initial
//!   state, history replay, `410 Expired` for compacted versions, bookmarks, streaming lists
//!   (`sendInitialEvents`), selector transitions, `timeoutSeconds`.
//! - [`error`]: `Status` error bodies with the right code and reason.
//! - [`fault`]: injected failures (status answers or transport errors).
//! - [`proxy`]: node proxy handlers registered by tests.
//!
//! Not implemented (a real cluster does these, this server does not): admission, defaulting
//! and schema validation (beyond names), garbage collection through ownerReferences, graceful
//! pod termination unless [`FakeClusterOptions::graceful_pod_deletion`] is set (by default
//! pods without finalizers go away at once), kubelets (nothing runs pods or changes their
//! status: tests do that), scheduling, PodDisruptionBudgets on eviction, `limit`/`continue`
//! paging (lists are returned whole), field managers and managedFields, authentication and
//! RBAC, protobuf, YAML request bodies, aggregated discovery, OpenAPI (`/openapi/v2`,
//! `/openapi/v3` answer 404, so kubectl needs `--validate=false`).
//!
//! For kubectl (see `docs/local-cluster.md`):
//! - `discovery` (private): legacy discovery documents (`/api`, `/api/v1`, `/apis`,
//!   `/apis/{group}[/{version}]`) for the built-in types, `Migration` and stored CRDs.
//! - `table` (private): `Table` answers (`Accept: ...;as=Table`) with the columns of
//!   `kubectl get`, CRD printer columns included.
//! - `events` (private): `events.k8s.io/v1` Events also listed as core `v1` Events (one
//!   storage on a real server), so `kubectl describe` shows what the controller recorded.
//! - [`server`] (feature `server`): the whole service on a real HTTP/1.1 socket.
//!
//! [`FakeCluster::client`] must be called inside a Tokio runtime (kube's client spawns its
//! request buffer there).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

mod discovery;
pub mod error;
mod events;
pub mod fault;
pub mod path;
pub mod proxy;
pub mod selector;
#[cfg(feature = "server")]
pub mod server;
mod service;
mod store;
mod table;
mod watch;

pub use error::ApiError;
pub use fault::{Fault, FaultEffect, InjectedUnreachable};
pub use path::ResourceType;
pub use proxy::{NodeProxyRequest, NodeProxyResponse};
pub use service::{BoxError, FakeService};

use proxy::ProxyHandler;
use store::{Store, StoreLimits};
use watch::WatchSignal;

/// One HTTP call the fake server received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: http::Method,
    /// Path without the query, e.g. `/api/v1/namespaces/default/pods/p1`.
    pub path: String,
    /// Raw (still URL-encoded) query string, empty when none.
    pub query: String,
    /// The body parsed as JSON, `None` when empty or not JSON.
    pub body: Option<Value>,
}

/// Tunables of a [`FakeCluster`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeClusterOptions {
    /// Changes kept per resource type for watches resuming from a resourceVersion; a watch
    /// from an older version gets `410 Expired` and the client re-lists.
    pub watch_history_per_type: usize,
    /// Events an open watch may fall behind by before it is ended with `410 Expired`.
    pub watch_channel_capacity: usize,
    /// Whether every request is kept for [`FakeCluster::requests`] (turn off for load runs).
    pub record_requests: bool,
    /// Model graceful pod termination: a DELETE of a pod bound to a node (with a grace period
    /// above zero: `gracePeriodSeconds`, else `spec.terminationGracePeriodSeconds`, else 30)
    /// only sets `deletionTimestamp` (now + grace) and `deletionGracePeriodSeconds`; the pod
    /// stays until a DELETE with `gracePeriodSeconds: 0` (what the kubelet sends once the
    /// containers stopped; a partitioned kubelet never does) or [`FakeCluster::remove`].
    /// Writes in between (status, labels, finalizer removal) keep it Terminating; a shorter
    /// explicit grace on a second DELETE shortens the pending one.
    /// Off by default: pods without finalizers then go away at once.
    pub graceful_pod_deletion: bool,
}

impl Default for FakeClusterOptions {
    fn default() -> Self {
        FakeClusterOptions {
            watch_history_per_type: 4_096,
            watch_channel_capacity: 16_384,
            record_requests: true,
            graceful_pod_deletion: false,
        }
    }
}

/// Everything behind the cluster's one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) store: Store,
    pub(crate) requests: Vec<RecordedRequest>,
    pub(crate) record_requests: bool,
    pub(crate) faults: Vec<Fault>,
    pub(crate) proxy_handlers: BTreeMap<String, ProxyHandler>,
}

/// An in-process Kubernetes API server. Cloning shares the same cluster.
#[derive(Clone)]
pub struct FakeCluster {
    inner: Arc<Mutex<State>>,
}

impl fmt::Debug for FakeCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("FakeCluster")
            .field("resource_version", &state.store.resource_version)
            .field("types", &state.store.types.len())
            .field("requests", &state.requests.len())
            .finish()
    }
}

impl Default for FakeCluster {
    fn default() -> Self {
        Self::new()
    }
}

fn resource_type<K: kube::Resource<DynamicType = ()>>() -> ResourceType {
    ResourceType::new(&K::group(&()), &K::version(&()), &K::plural(&()))
}

/// Whether `K` is namespaced. kube's `Resource::Scope` is k8s-openapi's
/// `NamespaceResourceScope` or `ClusterResourceScope` for built-in and derived resources; the
/// contract's signatures carry no `'static` bound for a `TypeId` comparison, so the type name
/// decides.
fn is_namespaced<K: kube::Resource>() -> bool {
    std::any::type_name::<K::Scope>().ends_with("NamespaceResourceScope")
}

impl FakeCluster {
    /// An empty cluster with default options.
    pub fn new() -> Self {
        Self::with_options(FakeClusterOptions::default())
    }

    /// An empty cluster with the given options.
    pub fn with_options(options: FakeClusterOptions) -> Self {
        FakeCluster {
            inner: Arc::new(Mutex::new(State {
                store: Store::new(StoreLimits {
                    history_per_type: options.watch_history_per_type,
                    watch_channel_capacity: options.watch_channel_capacity,
                    graceful_pod_deletion: options.graceful_pod_deletion,
                }),
                requests: Vec::new(),
                record_requests: options.record_requests,
                faults: Vec::new(),
                proxy_handlers: BTreeMap::new(),
            })),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (only possible in a test closure) must not wedge
        // every later request; the store is consistent between statements.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A `kube::Client` talking to this cluster (default namespace `default`). Call inside a
    /// Tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.service(), "default")
    }

    /// The raw `tower::Service`, for stacking layers before `kube::Client::new`.
    pub fn service(&self) -> FakeService {
        FakeService {
            cluster: self.clone(),
        }
    }

    /// Creates or replaces an object directly (bypassing HTTP), status included. Bumps the
    /// resourceVersion and notifies watches as if another client wrote it. A namespaced object
    /// without `metadata.namespace` goes to `default` (the client's default namespace);
    /// objects without `metadata.name` are refused (logged).
    pub fn put<K: kube::Resource<DynamicType = ()> + Serialize>(&self, obj: &K) {
        let resource = resource_type::<K>();
        let mut value = match serde_json::to_value(obj) {
            Ok(value) => value,
            Err(error) => {
                tracing::error!(%error, %resource, "FakeCluster::put: object does not serialize");
                return;
            }
        };
        if is_namespaced::<K>()
            && obj.meta().namespace.as_deref().is_none_or(str::is_empty)
            && let Some(metadata) = value.get_mut("metadata").and_then(Value::as_object_mut)
        {
            metadata.insert("namespace".into(), Value::String("default".into()));
        }
        if let Err(error) = self.lock().store.put_direct(&resource, value) {
            tracing::error!(%error, %resource, "FakeCluster::put refused the object");
        }
    }

    /// Creates or replaces a schema-less object of any resource type (e.g. a custom resource
    /// without a Rust type). Same semantics as [`FakeCluster::put`].
    pub fn put_value(&self, resource: &ResourceType, object: Value) -> Result<Value, ApiError> {
        self.lock()
            .store
            .put_direct(resource, object)
            .map(|o| (*o).clone())
    }

    /// One object as stored, `None` when absent (or when it does not deserialize as `K`, which
    /// is logged).
    pub fn get<K: kube::Resource<DynamicType = ()> + DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let resource = resource_type::<K>();
        let object = self.lock().store.get(&resource, namespace, name).ok()?;
        match K::deserialize(object.as_ref()) {
            Ok(typed) => Some(typed),
            Err(error) => {
                tracing::error!(%error, %resource, name, "FakeCluster::get: stored object does not deserialize");
                None
            }
        }
    }

    /// One schema-less object as stored.
    pub fn get_value(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.lock()
            .store
            .get(resource, namespace, name)
            .ok()
            .map(|o| (*o).clone())
    }

    /// Every object of type `K` in all namespaces, ordered by (namespace, name).
    pub fn list<K: kube::Resource<DynamicType = ()> + DeserializeOwned>(&self) -> Vec<K> {
        let resource = resource_type::<K>();
        let objects = self.lock().store.list(&resource, &watch::Filter::default());
        objects
            .iter()
            .filter_map(|object| match K::deserialize(object.as_ref()) {
                Ok(typed) => Some(typed),
                Err(error) => {
                    tracing::error!(%error, %resource, "FakeCluster::list: stored object does not deserialize");
                    None
                }
            })
            .collect()
    }

    /// Removes an object at once (finalizers are not consulted); `false` when it was absent.
    /// Watches see a DELETED event.
    pub fn remove<K: kube::Resource<DynamicType = ()>>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        self.lock()
            .store
            .remove_direct(&resource_type::<K>(), namespace, name)
    }

    /// Every HTTP call so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Adds a fault; faults are matched in the order they were injected.
    pub fn inject_fault(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Registers what `/api/v1/nodes/{node}/proxy/...` answers (replacing an earlier handler).
    pub fn set_node_proxy_handler<F>(&self, node: &str, handler: F)
    where
        F: Fn(&NodeProxyRequest) -> NodeProxyResponse + Send + Sync + 'static,
    {
        self.lock()
            .proxy_handlers
            .insert(node.to_owned(), ProxyHandler(Arc::new(handler)));
    }

    /// Removes a node's proxy handler (its proxy answers 404 again).
    pub fn clear_node_proxy_handler(&self, node: &str) {
        self.lock().proxy_handlers.remove(node);
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().store.resource_version
    }

    /// Freezes the clock used for creationTimestamp and deletionTimestamp (`None`: system
    /// clock again).
    pub fn set_time(&self, time: Option<jiff::Timestamp>) {
        self.lock().store.set_time(time);
    }

    /// Ends every open watch stream, as an API server restart would; watchers resume from
    /// their last resourceVersion.
    pub fn close_watches(&self) {
        self.lock().store.signal_all(&WatchSignal::Close);
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch that allowed them.
    pub fn send_bookmarks(&self) {
        let state = self.lock();
        let rv = state.store.resource_version;
        state.store.signal_all(&WatchSignal::Bookmark(rv));
    }

    /// Drops all kept watch history (like an etcd compaction): a watch resuming from any
    /// version before now gets `410 Expired` and must re-list.
    pub fn compact_watch_history(&self) {
        self.lock().store.compact_history();
    }
}
