//! The [`CheckpointBackend`] trait every way of checkpointing a workload implements, the request
//! and outcome types they share, and [`checkpoint_into_store`], which runs one checkpoint from
//! staging to sealed archive.
//!
//! Data model: a backend knows how to name a workload (`Workload`: a runc container id, a pid, a
//! pod container, a signalled program) and where to restore it (`RestoreTarget`). A
//! [`CheckpointRequest`] says what kind of dump ([`DumpKind`]) and, for an incremental one, which
//! parent's images to build on. The backend writes the archive's files into an empty staging
//! directory and returns a [`CheckpointOutcome`] (freeze duration and how it was measured,
//! versions, progress); the store seals and publishes it. Restore takes a
//! [`VerifiedCheckpoint`], so an archive that fails verification cannot be restored.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use automigrate_core::annotations::CheckpointMode;

use crate::archive::VerifiedCheckpoint;
use crate::criu::DumpStats;
use crate::manifest::{BackendKind, DumpKind, FORMAT_VERSION, Freeze, Manifest};
use crate::store::{CheckpointStore, SealedCheckpoint, StoreError};
use automigrate_core::model::PodRef;

/// What a backend can do on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub restore: bool,
    /// Pre-dumps and dumps on top of a parent (only changed pages written).
    pub incremental: bool,
    /// Why something is unavailable, for the operator.
    pub notes: Vec<String>,
}

impl Capabilities {
    /// What a CRIU-driven backend (runc or plain process) can do, given what this node's CRIU
    /// and kernel support: restores always, incremental dumps only with dirty-memory tracking.
    pub fn of_criu(facts: &crate::criu::CriuFacts) -> Self {
        let mut notes = Vec::new();
        if !facts.dirty_tracking {
            notes.push(
                "no memory dirty tracking (CONFIG_MEM_SOFT_DIRTY): full dumps only".to_string(),
            );
        }
        Self {
            restore: true,
            incremental: facts.dirty_tracking,
            notes,
        }
    }
}

/// The previous dump an incremental one builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentImages {
    pub id: String,
    /// The parent's CRIU images directory relative to the new images directory
    /// (see [`crate::store::Staging::parent_images_relative`]).
    pub relative_images_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRequest {
    pub kind: DumpKind,
    pub parent: Option<ParentImages>,
    /// Longest the whole checkpoint may take.
    pub timeout: Duration,
}

impl CheckpointRequest {
    pub fn new(kind: DumpKind, timeout: Duration) -> Self {
        Self {
            kind,
            parent: None,
            timeout,
        }
    }

    pub fn with_parent(mut self, parent: ParentImages) -> Self {
        self.parent = Some(parent);
        self
    }

    pub fn is_incremental(&self) -> bool {
        self.parent.is_some() || self.kind == DumpKind::PreDump
    }
}

/// What a backend reports about a checkpoint it wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOutcome {
    pub freeze: Option<Freeze>,
    pub dump_stats: Option<DumpStats>,
    pub runtime: Option<String>,
    pub criu_version: Option<String>,
    pub epoch: Option<u64>,
    /// Wall-clock time of the whole backend step, for logs and benchmarks.
    pub elapsed: Duration,
}

/// One way of checkpointing and restoring workloads.
pub trait CheckpointBackend: Send + Sync {
    type Workload: Send + Sync;
    type RestoreTarget: Send + Sync;
    /// What a restore hands back (a pid, a container id, a directory).
    type Restored: Send;
    type Error: std::error::Error + Send + Sync + 'static;

    fn kind(&self) -> BackendKind;

    fn mode(&self) -> CheckpointMode {
        CheckpointMode::Transparent
    }

    fn capabilities(&self) -> impl Future<Output = Result<Capabilities, Self::Error>> + Send;

    /// Writes the checkpoint into `archive_dir` (empty) in the archive layout of
    /// [`crate::manifest`], all but the manifest.
    fn checkpoint(
        &self,
        workload: &Self::Workload,
        request: &CheckpointRequest,
        archive_dir: &Path,
    ) -> impl Future<Output = Result<CheckpointOutcome, Self::Error>> + Send;

    fn restore(
        &self,
        checkpoint: &VerifiedCheckpoint,
        target: &Self::RestoreTarget,
    ) -> impl Future<Output = Result<Self::Restored, Self::Error>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum TakeError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("checkpoint failed: {0}")]
    Backend(#[source] E),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Who and what is being checkpointed, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub pod: PodRef,
    pub container: String,
}

/// Takes one checkpoint of `workload` into `store`: stage, run the backend, seal, publish.
/// `parent` (an id in the store) makes it incremental. Retention is the caller's next step.
#[tracing::instrument(name = "take_checkpoint", skip_all, fields(pod = %subject.pod, backend = %backend.kind(), kind = ?kind))]
pub async fn checkpoint_into_store<B: CheckpointBackend>(
    backend: &B,
    store: &CheckpointStore,
    subject: &Subject,
    workload: &B::Workload,
    kind: DumpKind,
    parent: Option<&str>,
    timeout: Duration,
) -> Result<SealedCheckpoint, TakeError<B::Error>> {
    let staging = {
        let store = store.clone();
        let pod = subject.pod.clone();
        let parent = parent.map(str::to_string);
        tokio::task::spawn_blocking(move || store.begin(&pod, parent.as_deref())).await??
    };
    let mut request = CheckpointRequest::new(kind, timeout);
    if let (Some(id), Some(relative)) = (staging.parent(), staging.parent_images_relative()) {
        request = request.with_parent(ParentImages {
            id: id.to_string(),
            relative_images_dir: relative,
        });
    }
    let outcome = backend
        .checkpoint(workload, &request, staging.dir())
        .await
        .map_err(TakeError::Backend)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        id: staging.id().to_string(),
        pod: subject.pod.clone(),
        container: subject.container.clone(),
        backend: backend.kind(),
        runtime: outcome.runtime,
        criu_version: outcome.criu_version,
        created_at: jiff::Timestamp::now(),
        parent: staging.parent().map(str::to_string),
        mode: backend.mode(),
        kind,
        freeze: outcome.freeze,
        epoch: outcome.epoch,
        files: Vec::new(),
    };
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || store.commit(staging, manifest)).await??)
}
