//! The node agent's state and operations, behind the HTTP API of [`crate::server`].
//!
//! Data model:
//! - The [`CheckpointStore`] under the store root holds this node's checkpoints and those
//!   received from peers. `verified` remembers which (pod, id) this process has seen pass
//!   verification: sealed here, received and verified, or checked by the start-up pass.
//! - At most one checkpoint per pod runs at a time (`busy`); a second request is a conflict.
//! - Periodic checkpoints build on the previous one (incremental) when the backend can and
//!   `full_every > 1`: every `full_every`-th one is full. Final checkpoints are always full, so
//!   they can become a checkpoint image.
//! - Transfers out are tasks tracked by id (`Transfers`), with live progress from the transfer
//!   engine's callback. A checkpoint goes with its parent chain to
//!   `<peer data root>/.automigrate-incoming/checkpoints/<namespace>/<pod>/`, where the peer's
//!   [`crate::incoming`] moves it into its store once it verifies; a dataset goes to the same
//!   relative path under the peer's data root.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_checkpoint::manifest::{FileEntry, MANIFEST_FILE};
use automigrate_checkpoint::store::StoreError;
use automigrate_checkpoint::{
    Capabilities, CheckpointStore, DumpKind, Retention, SealedCheckpoint, Subject,
};
use automigrate_core::transfer::TransferSettings;
use automigrate_transfer::sender::{Progress, SendOptions};
use automigrate_transfer::{Source, TlsConfig};

use crate::api::{
    self, CheckpointKind, CheckpointQuery, CheckpointRequest, CheckpointSummary, ImageRequest,
    ImageResponse, Payload, PeerLatency, TransferRequest, TransferState, TransferStatus,
    ValidationError,
};
use crate::checkpointer::{Checkpointer, CheckpointerError};
use crate::image::{self, ImageError, ImageOptions};
use crate::metrics::{AgentMetrics, names};
use crate::prober::Latencies;
use automigrate_core::model::PodRef;

/// Directory under the data root where checkpoints from peers arrive.
pub const INCOMING_DIR: &str = ".automigrate-incoming";
/// Under [`INCOMING_DIR`]: `<namespace>/<pod>/<id>/`.
pub const INCOMING_CHECKPOINTS: &str = "checkpoints";
/// Finished transfers kept for `GET /v1/transfers/{id}`.
const FINISHED_TRANSFERS_KEPT: usize = 512;

/// Why an operation failed; each maps to an HTTP status and an [`api::error_kind`].
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Checkpoint(CheckpointerError),
    #[error("checkpoint store: {0}")]
    Store(StoreError),
    #[error("image: {0}")]
    Image(ImageError),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl AgentError {
    /// HTTP status and error kind.
    pub fn status_and_kind(&self) -> (u16, &'static str) {
        use api::error_kind::*;
        match self {
            Self::Invalid(_) => (400, INVALID),
            Self::NotFound(_) => (404, NOT_FOUND),
            Self::Conflict(_) => (409, CONFLICT),
            Self::Checkpoint(CheckpointerError::NoWorkload { .. }) => (404, NOT_FOUND),
            Self::Checkpoint(CheckpointerError::Store(error)) | Self::Store(error) => {
                store_status(error)
            }
            Self::Checkpoint(_) => (500, CHECKPOINT_FAILED),
            Self::Image(ImageError::Incremental { .. }) => (409, CONFLICT),
            Self::Image(_) => (500, IMAGE_FAILED),
            Self::Unavailable(_) => (503, UNAVAILABLE),
            Self::Internal(_) => (500, INTERNAL),
        }
    }
}

fn store_status(error: &StoreError) -> (u16, &'static str) {
    use api::error_kind::*;
    match error {
        StoreError::NotFound { .. } => (404, NOT_FOUND),
        StoreError::BadName { .. } => (400, INVALID),
        StoreError::AlreadyPresent { .. } | StoreError::ParentOfKept { .. } => (409, CONFLICT),
        _ => (500, STORE),
    }
}

impl From<ValidationError> for AgentError {
    fn from(error: ValidationError) -> Self {
        Self::Invalid(error.to_string())
    }
}

impl From<StoreError> for AgentError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

fn join_error(error: tokio::task::JoinError) -> AgentError {
    AgentError::Internal(format!("background task failed: {error}"))
}

/// Everything the agent is configured with (see [`crate::config`] for the flags).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub node_name: String,
    pub data_root: PathBuf,
    pub store_root: PathBuf,
    pub retention: Retention,
    pub checkpoint_timeout: Duration,
    /// Every n-th periodic checkpoint is full, the others build on the previous one; 1: all
    /// full.
    pub full_every: u32,
    pub tls: TlsConfig,
    pub transfer_settings: TransferSettings,
    pub congestion_control: Option<String>,
    pub images: ImageOptions,
}

impl AgentOptions {
    /// Defaults for everything but the node, the two roots and the TLS identity.
    pub fn new(
        node_name: impl Into<String>,
        data_root: impl Into<PathBuf>,
        store_root: impl Into<PathBuf>,
        tls: TlsConfig,
    ) -> Self {
        let store_root = store_root.into();
        Self {
            node_name: node_name.into(),
            data_root: data_root.into(),
            images: ImageOptions::new(store_root.join(".images")),
            store_root,
            retention: Retention {
                count: 3,
                max_bytes: None,
            },
            checkpoint_timeout: Duration::from_secs(300),
            full_every: 1,
            tls,
            transfer_settings: TransferSettings::default(),
            congestion_control: None,
        }
    }

    pub fn incoming_dir(&self) -> PathBuf {
        self.data_root.join(INCOMING_DIR)
    }
}

#[derive(Debug)]
struct TransferEntry {
    status: TransferStatus,
    payload: &'static str,
    rate_bps: f64,
}

#[derive(Debug, Default)]
struct Transfers {
    entries: HashMap<String, TransferEntry>,
    finished: VecDeque<String>,
}

/// The agent. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    options: AgentOptions,
    store: CheckpointStore,
    checkpointer: Arc<dyn Checkpointer>,
    capabilities: Mutex<Option<Capabilities>>,
    metrics: AgentMetrics,
    latencies: Latencies,
    busy: Mutex<HashSet<PodRef>>,
    verified: Mutex<HashSet<(String, String, String)>>,
    transfers: Mutex<Transfers>,
    next_transfer: AtomicU64,
    boot: u64,
    ready: AtomicBool,
    not_ready_reason: Mutex<String>,
    ingest: tokio::sync::Mutex<()>,
    background: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.inner.options.node_name)
            .field("store", &self.inner.options.store_root)
            .finish_non_exhaustive()
    }
}

/// Marks a pod busy until dropped.
struct BusyGuard {
    agent: Arc<Inner>,
    pod: PodRef,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.agent.busy.lock() {
            busy.remove(&self.pod);
        }
    }
}

impl Agent {
    /// Opens the store and the data root (creating them). Blocking I/O: call before serving.
    pub fn new(
        options: AgentOptions,
        checkpointer: Arc<dyn Checkpointer>,
        metrics: AgentMetrics,
        latencies: Latencies,
    ) -> Result<Self, AgentError> {
        let store = CheckpointStore::open(&options.store_root)?;
        for dir in [
            &options.data_root,
            &options.incoming_dir(),
            &options.images.root,
        ] {
            std::fs::create_dir_all(dir).map_err(|error| {
                AgentError::Internal(format!("creating {}: {error}", dir.display()))
            })?;
        }
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or_default();
        Ok(Self {
            inner: Arc::new(Inner {
                options,
                store,
                checkpointer,
                capabilities: Mutex::new(None),
                metrics,
                latencies,
                busy: Mutex::new(HashSet::new()),
                verified: Mutex::new(HashSet::new()),
                transfers: Mutex::new(Transfers::default()),
                next_transfer: AtomicU64::new(1),
                boot,
                ready: AtomicBool::new(false),
                not_ready_reason: Mutex::new("starting".to_string()),
                ingest: tokio::sync::Mutex::new(()),
                background: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn options(&self) -> &AgentOptions {
        &self.inner.options
    }

    pub fn store(&self) -> &CheckpointStore {
        &self.inner.store
    }

    pub fn metrics(&self) -> &AgentMetrics {
        &self.inner.metrics
    }

    /// Asks the backend what it can do; the agent is ready once it answered.
    #[tracing::instrument(name = "agent_probe_backend", skip_all)]
    pub async fn probe_backend(&self) -> Result<Capabilities, AgentError> {
        match self.inner.checkpointer.capabilities().await {
            Ok(capabilities) => {
                tracing::info!(backend = %self.inner.checkpointer.backend(), ?capabilities, "checkpoint backend ready");
                if let Ok(mut slot) = self.inner.capabilities.lock() {
                    *slot = Some(capabilities.clone());
                }
                self.set_ready(true, "");
                Ok(capabilities)
            }
            Err(error) => {
                self.set_ready(false, &format!("checkpoint backend unusable: {error}"));
                Err(AgentError::Checkpoint(error))
            }
        }
    }

    pub fn set_ready(&self, ready: bool, reason: &str) {
        if let Ok(mut slot) = self.inner.not_ready_reason.lock() {
            *slot = reason.to_string();
        }
        self.inner.ready.store(ready, Ordering::SeqCst);
    }

    /// `Ok` when ready, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.inner.ready.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(self
                .inner
                .not_ready_reason
                .lock()
                .map(|reason| reason.clone())
                .unwrap_or_default())
        }
    }

    /// Verifies every stored checkpoint once (start-up), so listings can say `verified`.
    #[tracing::instrument(name = "agent_verify_store", skip_all)]
    pub async fn verify_store(&self) -> Result<(), AgentError> {
        let agent = self.clone();
        tokio::task::spawn_blocking(move || -> Result<(), AgentError> {
            let store = &agent.inner.store;
            for pod in store.pods()? {
                for stored in store.list(&pod)? {
                    let id = stored.manifest.id.clone();
                    match store.verified(&pod, &id) {
                        Ok(_) => agent.mark_verified(&pod.namespace, &pod.name, &id),
                        Err(error) => {
                            tracing::error!(%pod, %id, %error, "stored checkpoint does not verify");
                        }
                    }
                }
            }
            agent.refresh_store_metrics();
            Ok(())
        })
        .await
        .map_err(join_error)?
    }

    /// Records that checkpoint `id` of `namespace/pod` passed verification.
    pub(crate) fn mark_verified(&self, namespace: &str, pod: &str, id: &str) {
        if let Ok(mut verified) = self.inner.verified.lock() {
            verified.insert((namespace.to_string(), pod.to_string(), id.to_string()));
        }
    }

    /// Records that checkpoint `id` of `namespace/pod` failed verification.
    fn unmark_verified(&self, namespace: &str, pod: &str, id: &str) {
        if let Ok(mut verified) = self.inner.verified.lock() {
            verified.remove(&(namespace.to_string(), pod.to_string(), id.to_string()));
        }
    }

    fn is_verified(&self, namespace: &str, pod: &str, id: &str) -> bool {
        self.inner
            .verified
            .lock()
            .map(|verified| {
                verified.contains(&(namespace.to_string(), pod.to_string(), id.to_string()))
            })
            .unwrap_or(false)
    }

    fn summary(&self, stored: &SealedCheckpoint) -> CheckpointSummary {
        let manifest = &stored.manifest;
        let pod = PodRef::new(&manifest.pod.namespace, &manifest.pod.name);
        CheckpointSummary {
            id: manifest.id.clone(),
            verified: self.is_verified(&pod.namespace, &pod.name, &manifest.id),
            pod,
            container: manifest.container.clone(),
            created_at: manifest.created_at,
            bytes: manifest.total_bytes(),
            files: manifest.files.len() as u64,
            freeze: manifest
                .freeze
                .map(|freeze| freeze.duration())
                .unwrap_or_default(),
            parent: manifest.parent.clone(),
        }
    }

    /// Sums the store for the gauges. Blocking.
    pub(crate) fn refresh_store_metrics(&self) {
        let store = &self.inner.store;
        let (mut count, mut bytes) = (0u64, 0u64);
        if let Ok(pods) = store.pods() {
            for pod in pods {
                for stored in store.list(&pod).unwrap_or_default() {
                    count += 1;
                    bytes += stored.manifest.total_bytes();
                }
            }
        }
        self.inner.metrics.store_size(count, bytes);
    }

    /// `POST /v1/checkpoints`.
    #[tracing::instrument(name = "agent_checkpoint", skip_all, fields(pod = %request.pod, container = %request.container, kind = ?request.kind))]
    pub async fn checkpoint(
        &self,
        request: &CheckpointRequest,
    ) -> Result<CheckpointSummary, AgentError> {
        request.validate()?;
        self.readiness().map_err(AgentError::Unavailable)?;
        let pod = automigrate_core::model::PodRef::new(&request.pod.namespace, &request.pod.name);
        let _busy = self.claim(&request.pod)?;
        let kind = match request.kind {
            CheckpointKind::Periodic => DumpKind::Periodic,
            CheckpointKind::Final => DumpKind::Final,
        };
        let parent = if kind == DumpKind::Periodic {
            self.incremental_parent(&pod).await?
        } else {
            None
        };
        let subject = Subject {
            pod: pod.clone(),
            container: request.container.clone(),
        };
        let started = Instant::now();
        let backend = self.inner.checkpointer.backend().to_string();
        let kind_label = match request.kind {
            CheckpointKind::Periodic => "periodic",
            CheckpointKind::Final => "final",
        };
        let stored = self
            .inner
            .checkpointer
            .checkpoint(
                &self.inner.store,
                &subject,
                kind,
                parent.as_deref(),
                self.inner.options.checkpoint_timeout,
            )
            .await
            .map_err(|error| {
                self.inner.metrics.checkpoint_failed(&backend, kind_label);
                match &error {
                    CheckpointerError::NoWorkload { .. } => {
                        tracing::warn!(%error, "nothing to checkpoint");
                    }
                    _ => tracing::error!(%error, "checkpoint failed"),
                }
                AgentError::Checkpoint(error)
            })?;
        self.mark_verified(
            &request.pod.namespace,
            &request.pod.name,
            &stored.manifest.id,
        );
        let summary = self.summary(&stored);
        self.after_store_change(pod).await;
        self.inner.metrics.checkpoint_taken(
            &backend,
            kind_label,
            stored.manifest.freeze.map(|freeze| freeze.duration()),
            started.elapsed(),
            summary.bytes,
        );
        tracing::info!(id = %summary.id, bytes = summary.bytes, freeze = ?summary.freeze, parent = ?summary.parent, "checkpoint taken");
        Ok(summary)
    }

    fn claim(&self, pod: &PodRef) -> Result<BusyGuard, AgentError> {
        let mut busy = self
            .inner
            .busy
            .lock()
            .map_err(|_| AgentError::Internal("busy set poisoned".into()))?;
        if !busy.insert(pod.clone()) {
            return Err(AgentError::Conflict(format!(
                "a checkpoint of pod {pod} is already running"
            )));
        }
        Ok(BusyGuard {
            agent: self.inner.clone(),
            pod: pod.clone(),
        })
    }

    /// The parent for the next periodic checkpoint, when incremental ones are on and allowed.
    async fn incremental_parent(
        &self,
        pod: &automigrate_core::model::PodRef,
    ) -> Result<Option<String>, AgentError> {
        let full_every = self.inner.options.full_every;
        let incremental = self
            .inner
            .capabilities
            .lock()
            .map(|capabilities| capabilities.as_ref().is_some_and(|c| c.incremental))
            .unwrap_or(false);
        if full_every <= 1 || !incremental {
            return Ok(None);
        }
        let store = self.inner.store.clone();
        let pod = pod.clone();
        tokio::task::spawn_blocking(move || -> Result<Option<String>, AgentError> {
            let all = store.list(&pod)?;
            let Some(latest) = all
                .iter()
                .rev()
                .find(|s| s.manifest.kind == DumpKind::Periodic)
            else {
                return Ok(None);
            };
            // Length of the chain the latest one ends: full (1) + its incrementals.
            let mut depth = 1u32;
            let mut parent = latest.manifest.parent.clone();
            while let Some(id) = parent {
                depth += 1;
                parent = all
                    .iter()
                    .find(|s| s.manifest.id == id)
                    .and_then(|s| s.manifest.parent.clone());
            }
            Ok((depth < full_every).then(|| latest.manifest.id.clone()))
        })
        .await
        .map_err(join_error)?
    }

    /// Retention and gauges after a checkpoint was added.
    pub(crate) async fn after_store_change(&self, pod: automigrate_core::model::PodRef) {
        let agent = self.clone();
        let retention = self.inner.options.retention;
        let outcome = tokio::task::spawn_blocking(move || {
            let report = agent.inner.store.apply_retention(&pod, &retention);
            agent.refresh_store_metrics();
            report
        })
        .await;
        match outcome {
            Ok(Ok(report)) if !report.deleted.is_empty() || report.over_budget_by.is_some() => {
                tracing::info!(deleted = ?report.deleted, over_budget_by = ?report.over_budget_by, "retention applied");
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "retention failed"),
            Err(error) => tracing::warn!(%error, "retention task failed"),
        }
    }

    /// `GET /v1/checkpoints`: received checkpoints are taken in first, so a transfer that has
    /// finished is listed.
    #[tracing::instrument(name = "agent_list_checkpoints", skip_all)]
    pub async fn list_checkpoints(
        &self,
        query: &CheckpointQuery,
    ) -> Result<Vec<CheckpointSummary>, AgentError> {
        // `?namespace=&pod=` (empty values) means no filter.
        let query = &CheckpointQuery {
            namespace: query.namespace.clone().filter(|value| !value.is_empty()),
            pod: query.pod.clone().filter(|value| !value.is_empty()),
        };
        if let Some(namespace) = &query.namespace {
            api::validate_namespace(namespace)?;
        }
        if let Some(pod) = &query.pod {
            api::validate_pod_name(pod)?;
            if query.namespace.is_none() {
                return Err(AgentError::Invalid(
                    "`pod` needs `namespace` too".to_string(),
                ));
            }
        }
        if let Err(error) = self.ingest_incoming().await {
            tracing::warn!(%error, "taking in received checkpoints failed");
        }
        let agent = self.clone();
        let query = query.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<CheckpointSummary>, AgentError> {
            let store = &agent.inner.store;
            let mut found: Vec<(CheckpointSummary, Option<u64>)> = Vec::new();
            for pod in store.pods()? {
                if query
                    .namespace
                    .as_ref()
                    .is_some_and(|ns| *ns != pod.namespace)
                    || query.pod.as_ref().is_some_and(|name| *name != pod.name)
                {
                    continue;
                }
                for stored in store.list(&pod)? {
                    found.push((agent.summary(&stored), stored.sequence));
                }
            }
            found.sort_by(|(a, a_seq), (b, b_seq)| {
                (b.created_at, b_seq, &b.id).cmp(&(a.created_at, a_seq, &a.id))
            });
            Ok(found.into_iter().map(|(summary, _)| summary).collect())
        })
        .await
        .map_err(join_error)?
    }

    /// Finds a checkpoint by id in any pod; an id found in two namespaces is a conflict.
    fn find_checkpoint(&self, id: &str) -> Result<SealedCheckpoint, AgentError> {
        api::validate_checkpoint_id(id)?;
        let store = &self.inner.store;
        let mut found = Vec::new();
        for pod in store.pods()? {
            match store.get(&pod, id) {
                Ok(stored) => found.push(stored),
                Err(StoreError::NotFound { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        match found.len() {
            0 => Err(AgentError::NotFound(format!(
                "checkpoint {id} is not in this node's store"
            ))),
            1 => Ok(found.remove(0)),
            _ => Err(AgentError::Conflict(format!(
                "checkpoint id {id} exists for several pods: {}",
                found
                    .iter()
                    .map(|stored| stored.manifest.pod.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// `POST /v1/transfers`: checks the request, starts the transfer, answers at once.
    #[tracing::instrument(name = "agent_start_transfer", skip_all, fields(to = %request.to.node))]
    pub async fn start_transfer(
        &self,
        request: &TransferRequest,
    ) -> Result<TransferStatus, AgentError> {
        api::validate_pod_name(&request.to.node)
            .map_err(|error| AgentError::Invalid(format!("peer node: {error}")))?;
        crate::prober::validate_address(&request.to.address)
            .map_err(|reason| AgentError::Invalid(format!("peer address: {reason}")))?;
        let agent = self.clone();
        let payload = request.payload.clone();
        let (source, target, payload_label) =
            tokio::task::spawn_blocking(move || agent.transfer_source(&payload))
                .await
                .map_err(join_error)??;
        let id = format!(
            "t-{:x}-{}",
            self.inner.boot,
            self.inner.next_transfer.fetch_add(1, Ordering::Relaxed)
        );
        let status = TransferStatus {
            id: id.clone(),
            state: TransferState::Running,
            bytes_total: 0,
            bytes_done: 0,
            streams: 0,
            error: None,
        };
        self.with_transfers(|transfers| {
            transfers.entries.insert(
                id.clone(),
                TransferEntry {
                    status: status.clone(),
                    payload: payload_label,
                    rate_bps: 0.0,
                },
            );
        });
        self.refresh_transfer_gauges();
        let agent = self.clone();
        let peer = request.to.clone();
        let span = tracing::info_span!("transfer", %id, to = %peer.node, payload = payload_label);
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                let unfinished = UnfinishedTransfer {
                    agent: agent.clone(),
                    id: Some(id.clone()),
                };
                let outcome = agent.run_transfer(&id, &peer, source, target).await;
                unfinished.disarm();
                agent.finish_transfer(&id, outcome);
            },
            span,
        ));
        self.track(task.abort_handle());
        Ok(status)
    }

    /// What to send for a payload: the source, the target directory at the peer, a label.
    fn transfer_source(
        &self,
        payload: &Payload,
    ) -> Result<(Source, Option<String>, &'static str), AgentError> {
        match payload {
            Payload::Checkpoint { id } => {
                let stored = self.find_checkpoint(id)?;
                let pod = stored.manifest.pod.clone();
                let pod_dir = self.inner.store.pod_dir(&pod)?;
                // The chain, oldest first: the peer needs every parent to verify and restore.
                let mut chain = vec![stored.manifest.id.clone()];
                let mut parent = stored.manifest.parent.clone();
                while let Some(id) = parent {
                    if chain.contains(&id) {
                        return Err(AgentError::Internal(format!(
                            "checkpoint chain of {} loops at {id}",
                            stored.manifest.id
                        )));
                    }
                    parent = self.inner.store.get(&pod, &id)?.manifest.parent;
                    chain.push(id);
                }
                chain.reverse();
                let target = format!(
                    "{INCOMING_DIR}/{INCOMING_CHECKPOINTS}/{}/{}",
                    pod.namespace, pod.name
                );
                // File by file: the transfer engine sends regular files only; the symlink CRIU
                // links an incremental dump to its parent with is listed in the manifest and
                // made again by the receiver (see `crate::incoming`).
                let mut paths = Vec::new();
                for id in chain {
                    let manifest = self.inner.store.get(&pod, &id)?.manifest;
                    paths.push(Path::new(&id).join(MANIFEST_FILE));
                    for entry in &manifest.files {
                        if let FileEntry::File { path, .. } = entry {
                            paths.push(Path::new(&id).join(path));
                        }
                    }
                }
                Ok((
                    Source::Paths {
                        base: pod_dir,
                        paths,
                    },
                    Some(target),
                    "checkpoint",
                ))
            }
            Payload::Dataset { path } => Ok((self.dataset_source(path)?, None, "dataset")),
        }
    }

    /// What a transfer of the dataset `path` reads: `path` confined beneath the data root.
    /// The check here answers early (404, 400); the confinement itself is in the transfer
    /// engine, which opens every directory and file of a [`Source::Beneath`] through a handle
    /// on the data root with no symlink followed, at the scan and again when it sends. So a
    /// directory swapped for a symlink after this check cannot lead a read outside the root
    /// (checking a canonical path, then reading by path, could).
    pub fn dataset_source(&self, path: &str) -> Result<Source, AgentError> {
        api::validate_relative_path(path)?;
        let relative = automigrate_transfer::paths::RelPath::parse(path)
            .map_err(|error| AgentError::Invalid(format!("dataset `{path}`: {error}")))?;
        if path == INCOMING_DIR || path.starts_with(&format!("{INCOMING_DIR}/")) {
            return Err(AgentError::Invalid(format!(
                "dataset `{path}` is inside the agent's incoming directory"
            )));
        }
        let root = &self.inner.options.data_root;
        let handle = automigrate_transfer::beneath::open_root(root).map_err(|error| {
            AgentError::Internal(format!("data root {}: {error}", root.display()))
        })?;
        match automigrate_transfer::beneath::open(&handle, Path::new(path), false) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(AgentError::NotFound(format!(
                    "dataset `{path}` does not exist under the data root"
                )));
            }
            Err(error)
                if error.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32)
                    || error.raw_os_error() == Some(nix::errno::Errno::EXDEV as i32) =>
            {
                return Err(AgentError::Invalid(format!(
                    "dataset `{path}` goes through a symlink; datasets are read beneath the \
                     data root without following symlinks"
                )));
            }
            Err(error) => {
                return Err(AgentError::Invalid(format!("dataset `{path}`: {error}")));
            }
        }
        tracing::debug!(root = %root.display(), path, "dataset source");
        Ok(Source::Beneath {
            root: root.clone(),
            paths: vec![relative],
        })
    }

    async fn run_transfer(
        &self,
        id: &str,
        peer: &api::Peer,
        source: Source,
        target: Option<String>,
    ) -> Result<automigrate_transfer::Report, String> {
        let address = tokio::net::lookup_host(&peer.address)
            .await
            .map_err(|error| format!("resolving {}: {error}", peer.address))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", peer.address))?;
        let agent = self.clone();
        let progress_id = id.to_string();
        let progress: automigrate_transfer::ProgressFn = Arc::new(move |progress: &Progress| {
            agent.transfer_progress(&progress_id, progress);
        });
        let options = SendOptions {
            target,
            settings: self.inner.options.transfer_settings.clone(),
            congestion_control: self.inner.options.congestion_control.clone(),
            // The certificate must name the node we mean to send to.
            server_name: Some(peer.node.clone()),
            progress: Some(progress),
            ..SendOptions::default()
        };
        automigrate_transfer::send(&source, address, &self.inner.options.tls, &options)
            .await
            .map_err(|error| error.to_string())
    }

    fn transfer_progress(&self, id: &str, progress: &Progress) {
        let previous = self.with_transfers(|transfers| {
            transfers.entries.get_mut(id).map(|entry| {
                let previous = entry.status.bytes_done;
                entry.status.bytes_total = progress.bytes_total;
                entry.status.bytes_done = progress.bytes_done;
                entry.status.streams = progress.streams;
                entry.rate_bps = progress.rate_bps;
                previous
            })
        });
        if let Some(Some(previous)) = previous {
            self.inner
                .metrics
                .counter(names::TRANSFER_BYTES, &[])
                .increment(progress.bytes_done.saturating_sub(previous));
        }
        self.refresh_transfer_gauges();
    }

    fn finish_transfer(&self, id: &str, outcome: Result<automigrate_transfer::Report, String>) {
        let label = self.with_transfers(|transfers| {
            let entry = transfers.entries.get_mut(id)?;
            match &outcome {
                Ok(report) => {
                    entry.status.state = TransferState::Succeeded;
                    entry.status.bytes_total = report.total_bytes;
                    entry.status.bytes_done = report.total_bytes;
                    entry.status.streams = report.max_streams_used;
                }
                Err(error) => {
                    entry.status.state = TransferState::Failed;
                    entry.status.error = Some(error.clone());
                    entry.status.streams = 0;
                }
            }
            entry.rate_bps = 0.0;
            transfers.finished.push_back(id.to_string());
            while transfers.finished.len() > FINISHED_TRANSFERS_KEPT {
                if let Some(old) = transfers.finished.pop_front() {
                    transfers.entries.remove(&old);
                }
            }
            transfers.entries.get(id).map(|entry| entry.payload)
        });
        let payload = label.flatten().unwrap_or("unknown");
        match &outcome {
            Ok(report) => tracing::info!(
                bytes = report.total_bytes,
                secs = report.duration_secs,
                streams = report.max_streams_used,
                resent = report.units_resent,
                "transfer succeeded"
            ),
            Err(error) => tracing::error!(%error, "transfer failed"),
        }
        let result = if outcome.is_ok() {
            "succeeded"
        } else {
            "failed"
        };
        self.inner
            .metrics
            .counter(
                names::TRANSFERS,
                &[("payload", payload), ("result", result)],
            )
            .increment(1);
        self.refresh_transfer_gauges();
    }

    fn refresh_transfer_gauges(&self) {
        let sums = self.with_transfers(|transfers| {
            transfers
                .entries
                .values()
                .filter(|entry| entry.status.state == TransferState::Running)
                .fold((0u64, 0u64, 0f64), |(count, streams, rate), entry| {
                    (
                        count + 1,
                        streams + u64::from(entry.status.streams),
                        rate + entry.rate_bps,
                    )
                })
        });
        if let Some((count, streams, rate)) = sums {
            let metrics = &self.inner.metrics;
            metrics
                .gauge(names::TRANSFERS_ACTIVE, &[])
                .set(count as f64);
            metrics
                .gauge(names::TRANSFER_STREAMS, &[])
                .set(streams as f64);
            metrics.gauge(names::TRANSFER_RATE, &[]).set(rate);
        }
    }

    fn with_transfers<T>(&self, f: impl FnOnce(&mut Transfers) -> T) -> Option<T> {
        self.inner
            .transfers
            .lock()
            .ok()
            .map(|mut transfers| f(&mut transfers))
    }

    /// `GET /v1/transfers/{id}`.
    pub fn transfer_status(&self, id: &str) -> Result<TransferStatus, AgentError> {
        let valid = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(AgentError::Invalid(format!("`{id}` is not a transfer id")));
        }
        self.with_transfers(|transfers| transfers.entries.get(id).map(|entry| entry.status.clone()))
            .flatten()
            .ok_or_else(|| AgentError::NotFound(format!("no transfer {id} on this node")))
    }

    /// `POST /v1/images`.
    #[tracing::instrument(name = "agent_build_image", skip_all, fields(checkpoint = %request.checkpoint_id))]
    pub async fn build_image(&self, request: &ImageRequest) -> Result<ImageResponse, AgentError> {
        api::validate_checkpoint_id(&request.checkpoint_id)?;
        // A checkpoint that just arrived may still be in the incoming directory.
        if let Err(error) = self.ingest_incoming().await {
            tracing::warn!(%error, "taking in received checkpoints failed");
        }
        let agent = self.clone();
        let id = request.checkpoint_id.clone();
        let root = self.inner.options.images.root.clone();
        let built = tokio::task::spawn_blocking(move || {
            let stored = agent.find_checkpoint(&id)?;
            let pod = &stored.manifest.pod;
            let verified = match agent.inner.store.verified(pod, &stored.manifest.id) {
                Ok(verified) => verified,
                Err(error) => {
                    // Damaged since it was verified: listings say so from now on. The
                    // controller tells a damaged image from a node that refuses an intact one
                    // by this flag (fault suite, issue 12: f005-car, a truncated standby copy
                    // still listed verified was taken for a full disk's refusal).
                    agent.unmark_verified(&pod.namespace, &pod.name, &stored.manifest.id);
                    return Err(error.into());
                }
            };
            let layout = image::write_layout(&verified, &root).map_err(AgentError::Image)?;
            Ok::<_, AgentError>((verified, layout))
        })
        .await
        .map_err(join_error)?;
        let (verified, layout) = match built {
            Ok(built) => built,
            Err(error) => {
                self.count_image("error");
                return Err(error);
            }
        };
        match image::import(&self.inner.options.images, &layout, &verified).await {
            Ok(image) => {
                self.count_image("ok");
                Ok(ImageResponse { image })
            }
            Err(error) => {
                self.count_image("error");
                Err(AgentError::Image(error))
            }
        }
    }

    fn count_image(&self, result: &str) {
        self.inner
            .metrics
            .counter(names::IMAGES, &[("result", result)])
            .increment(1);
    }

    /// `GET /v1/peers`.
    pub fn peers(&self) -> Vec<PeerLatency> {
        self.inner.latencies.snapshot()
    }

    /// Takes in checkpoints that peers finished sending (see [`crate::incoming`]).
    pub async fn ingest_incoming(&self) -> Result<crate::incoming::IngestReport, AgentError> {
        let _one_at_a_time = self.inner.ingest.lock().await;
        let agent = self.clone();
        let report = tokio::task::spawn_blocking(move || crate::incoming::ingest(&agent))
            .await
            .map_err(join_error)??;
        for pod in &report.pods {
            self.after_store_change(pod.clone()).await;
        }
        Ok(report)
    }

    /// Keeps a background task to abort at shutdown.
    pub(crate) fn track(&self, handle: tokio::task::AbortHandle) {
        if let Ok(mut background) = self.inner.background.lock() {
            background.retain(|handle| !handle.is_finished());
            background.push(handle);
        }
    }

    /// Stops transfers and background tasks (a transfer resumes from the receiver's journal
    /// when started again).
    pub fn abort_background(&self) {
        if let Ok(mut background) = self.inner.background.lock() {
            for handle in background.drain(..) {
                handle.abort();
            }
        }
    }

    pub(crate) fn incoming_checkpoints_dir(&self) -> PathBuf {
        self.inner.options.incoming_dir().join(INCOMING_CHECKPOINTS)
    }

    pub(crate) fn metrics_ref(&self) -> &AgentMetrics {
        &self.inner.metrics
    }
}

/// Marks a transfer Failed if its task ends without a result (a panic, or an abort at
/// shutdown): a transfer left `Running` would keep its caller polling until a deadline.
struct UnfinishedTransfer {
    agent: Agent,
    id: Option<String>,
}

impl UnfinishedTransfer {
    fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for UnfinishedTransfer {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.agent.finish_transfer(
                &id,
                Err("the transfer task ended without a result (panicked or stopped)".into()),
            );
        }
    }
}
