//! The kubelet checkpoint API: `POST /checkpoint/{namespace}/{pod}/{container}[?timeout=N]`
//! answers `{"items":["<path>"]}`, the archive a real kubelet (with CRI-O, or containerd >= 2.1)
//! writes into `<root-dir>/checkpoints` as `checkpoint-<pod>_<namespace>-<container>-<RFC 3339
//! time>.tar`: CRIU's images under `checkpoint/`, the OCI spec as `spec.dump`, the container's
//! metadata as `config.dump`, CRIU's `stats-dump` at the root. The container keeps running
//! (`runc checkpoint --leave-running`), as a kubelet checkpoint always leaves it.
//!
//! The path reported is under [`automigrate_checkpoint::kubelet::KUBELET_CHECKPOINT_DIR`] (what a
//! kubelet with the default `--root-dir` reports, and what the agent maps into its mount of that
//! directory), while the file is written into this kubelet's own checkpoint directory: the
//! local cluster mounts that directory where the node's agent expects the kubelet's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use automigrate_checkpoint::runc::RuncContainer;
use automigrate_checkpoint::{CheckpointBackend, CheckpointRequest, DumpKind};
use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use crate::pods::{ContainerKey, Registry};
use crate::runtime::Runtime;

/// How long a checkpoint may take when the request names no timeout (the kubelet's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(240);

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("container {container} of pod {namespace}/{pod} is not running on this node")]
    NotFound {
        namespace: String,
        pod: String,
        container: String,
    },
    #[error("checkpointing failed: {0}")]
    Runtime(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("archive task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl IntoResponse for CheckpointError {
    fn into_response(self) -> Response {
        let status = match self {
            CheckpointError::NotFound { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

/// What the checkpoint API needs.
#[derive(Debug, Clone)]
pub struct CheckpointApi {
    pub runtime: Arc<Runtime>,
    pub registry: Registry,
    /// The directory the answer names (a real kubelet's default: `/var/lib/kubelet/checkpoints`).
    pub reported_dir: PathBuf,
}

#[derive(Debug, serde::Deserialize)]
struct Params {
    timeout: Option<u64>,
}

/// The kubelet API's routes (only the checkpoint call; anything else is the kubelet's
/// `404 page not found`).
pub fn router(api: CheckpointApi) -> Router {
    Router::new()
        .route("/checkpoint/{namespace}/{pod}/{container}", post(handle))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found\n") })
        .with_state(api)
}

async fn handle(
    State(api): State<CheckpointApi>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(params): Query<Params>,
) -> Result<axum::Json<serde_json::Value>, CheckpointError> {
    let timeout = params.timeout.map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    let key = ContainerKey {
        namespace,
        pod,
        container,
    };
    let reported = checkpoint(&api, &key, timeout).await?;
    Ok(axum::Json(serde_json::json!({ "items": [reported] })))
}

/// Checkpoints one container into an archive; returns the path as the kubelet reports it.
#[tracing::instrument(skip(api), fields(pod = %key.pod, container = %key.container))]
pub async fn checkpoint(
    api: &CheckpointApi,
    key: &ContainerKey,
    timeout: Duration,
) -> Result<String, CheckpointError> {
    let id = api
        .registry
        .get(key)
        .ok_or_else(|| CheckpointError::NotFound {
            namespace: key.namespace.clone(),
            pod: key.pod.clone(),
            container: key.container.clone(),
        })?;
    let dir = api.runtime.layout().checkpoints();
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let name = format!(
        "checkpoint-{}_{}-{}-{}.tar",
        key.pod,
        key.namespace,
        key.container,
        jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ")
    );
    let staging = dir.join(format!(".{name}.d"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_error(&staging))?;
    let request = CheckpointRequest::new(DumpKind::Periodic, timeout);
    let outcome = api
        .runtime
        .runc()
        .checkpoint(&RuncContainer { id }, &request, &staging)
        .await;
    if let Err(error) = outcome {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(CheckpointError::Runtime(error.to_string()));
    }
    let archive = dir.join(&name);
    let source = staging.clone();
    let target = archive.clone();
    let written = tokio::task::spawn_blocking(move || write_tar(&source, &target)).await?;
    let _ = std::fs::remove_dir_all(&staging);
    written?;
    tracing::info!(archive = %archive.display(), "checkpoint archive written");
    Ok(api.reported_dir.join(&name).display().to_string())
}

/// The staging directory as a tar file, written under a temporary name and renamed, so the
/// agent never reads a half-written archive.
fn write_tar(source: &Path, target: &Path) -> Result<(), CheckpointError> {
    let partial = target.with_extension("tar.partial");
    let file = std::fs::File::create(&partial).map_err(io_error(&partial))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    builder
        .append_dir_all(".", source)
        .map_err(io_error(source))?;
    let writer = builder.into_inner().map_err(io_error(&partial))?;
    let file = writer
        .into_inner()
        .map_err(|error| io_error(&partial)(error.into_error()))?;
    file.sync_all().map_err(io_error(&partial))?;
    std::fs::rename(&partial, target).map_err(io_error(target))
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}
