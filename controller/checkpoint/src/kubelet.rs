//! The kubelet backend: a container checkpoint through the kubelet's checkpoint API (feature
//! `ContainerCheckpoint`, beta and on by default since Kubernetes 1.30), reached through the API
//! server's node proxy, with CRI-O or containerd and CRIU doing the work on the node.
//!
//! `POST /api/v1/nodes/{node}/proxy/checkpoint/{namespace}/{pod}/{container}?timeout={seconds}`
//! answers `{"items":["/var/lib/kubelet/checkpoints/checkpoint-<pod>_<namespace>-<container>-<time>.tar"]}`.
//! The agent runs on that node with the kubelet's checkpoint directory mounted, so the backend
//! maps the reported path into its mount, unpacks the archive (its layout is already the one
//! checkpointctl reads: `checkpoint/`, `config.dump`, `spec.dump`, `rootfs-diff.tar`, …) into
//! the staging directory, and the store seals it with our manifest.
//!
//! The HTTP request goes through [`ApiTransport`]; the real transport (the kube client) comes
//! with the controller. Here the backend is tested against recorded exchanges only: it runs for
//! real only on a cluster. Restoring through Kubernetes means creating a pod from a checkpoint
//! OCI image, which is the controller's job: [`KubeletBackend::restore`] says so.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::archive::{self, ArchiveError, VerifiedCheckpoint};
use crate::backend::{Capabilities, CheckpointBackend, CheckpointOutcome, CheckpointRequest};
use crate::criu::{self, STATS_DUMP_FILE};
use crate::manifest::{BackendKind, CONFIG_DUMP_FILE, CRIU_IMAGES_DIR, Freeze, FreezeSource};

/// The kubelet's default checkpoint directory (`--root-dir` + `/checkpoints`).
pub const KUBELET_CHECKPOINT_DIR: &str = "/var/lib/kubelet/checkpoints";

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("the API server did not answer within {after:?}")]
    TransportTimeout { after: Duration },
    #[error("request to the API server failed: {0}")]
    Transport(String),
    #[error(
        "the kubelet on node {node} has no checkpoint API (404 page not found): enable the \
         ContainerCheckpoint feature gate (Kubernetes >= 1.25; on by default since 1.30) with a \
         runtime that implements the CRI CheckpointContainer call (CRI-O, or containerd 2.x)"
    )]
    FeatureDisabled { node: String },
    #[error("not found on node {node}: {message}")]
    NotFound { node: String, message: String },
    #[error(
        "not allowed to checkpoint (HTTP {status}; the agent needs `create` on `nodes/proxy`): {message}"
    )]
    Forbidden { status: u16, message: String },
    #[error("the runtime could not checkpoint the container: {message}")]
    CheckpointFailed { message: String },
    #[error("the checkpoint did not finish in time (HTTP {status}): {message}")]
    TimedOut { status: u16, message: String },
    #[error("unexpected answer HTTP {status}: {body}")]
    Unexpected { status: u16, body: String },
    #[error(
        "the kubelet reported archive `{path}`, which is not a checkpoint archive under {expected_dir}"
    )]
    UnexpectedArchivePath { path: String, expected_dir: String },
    #[error("the kubelet API cannot {what}")]
    Unsupported { what: &'static str },
    #[error("importing {path}: {source}")]
    Import { path: PathBuf, source: ArchiveError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("import task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// An HTTP answer: status code and body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

/// POSTs to the API server. Implementations report their own failures as
/// [`KubeletError::Transport`] or [`KubeletError::TransportTimeout`]; an HTTP error status is
/// an answer, not a transport failure.
pub trait ApiTransport: Send + Sync {
    fn post(&self, path: &str) -> impl Future<Output = Result<ApiResponse, KubeletError>> + Send;
}

/// A container of a pod, as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

#[derive(Debug)]
pub struct KubeletBackend<T> {
    transport: T,
    node: String,
    /// Where the kubelet writes archives, as it reports them.
    kubelet_dir: PathBuf,
    /// Where that directory is mounted in the agent.
    local_dir: PathBuf,
    /// The kubelet never deletes its archives; the agent does once it holds a sealed copy.
    remove_after_import: bool,
}

impl<T: ApiTransport> KubeletBackend<T> {
    pub fn new(transport: T, node: impl Into<String>, local_dir: impl Into<PathBuf>) -> Self {
        Self {
            transport,
            node: node.into(),
            kubelet_dir: PathBuf::from(KUBELET_CHECKPOINT_DIR),
            local_dir: local_dir.into(),
            remove_after_import: true,
        }
    }

    pub fn keep_kubelet_archives(mut self) -> Self {
        self.remove_after_import = false;
        self
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The API server path for a checkpoint request.
    pub fn request_path(
        &self,
        target: &PodContainer,
        timeout: Duration,
    ) -> Result<String, KubeletError> {
        for name in [
            &self.node,
            &target.namespace,
            &target.pod,
            &target.container,
        ] {
            if !is_kubernetes_name(name) {
                return Err(KubeletError::NotFound {
                    node: self.node.clone(),
                    message: format!("`{name}` is not a valid Kubernetes name"),
                });
            }
        }
        let seconds = timeout.as_secs().max(1);
        Ok(format!(
            "/api/v1/nodes/{}/proxy/checkpoint/{}/{}/{}?timeout={seconds}",
            self.node, target.namespace, target.pod, target.container
        ))
    }

    fn interpret(&self, response: ApiResponse) -> Result<String, KubeletError> {
        let message = response.body.trim().to_string();
        match response.status {
            200 => {
                #[derive(serde::Deserialize)]
                struct Items {
                    items: Vec<String>,
                }
                let items: Items =
                    serde_json::from_str(&response.body).map_err(|_| KubeletError::Unexpected {
                        status: 200,
                        body: message.clone(),
                    })?;
                items
                    .items
                    .into_iter()
                    .next()
                    .ok_or(KubeletError::Unexpected {
                        status: 200,
                        body: message,
                    })
            }
            404 if message.starts_with("404 page not found") => {
                Err(KubeletError::FeatureDisabled {
                    node: self.node.clone(),
                })
            }
            404 => Err(KubeletError::NotFound {
                node: self.node.clone(),
                message,
            }),
            401 | 403 => Err(KubeletError::Forbidden {
                status: response.status,
                message,
            }),
            500 if message.contains("DeadlineExceeded")
                || message.contains("context deadline exceeded") =>
            {
                Err(KubeletError::TimedOut {
                    status: 500,
                    message,
                })
            }
            500 => Err(KubeletError::CheckpointFailed { message }),
            504 => Err(KubeletError::TimedOut {
                status: 504,
                message,
            }),
            status => Err(KubeletError::Unexpected {
                status,
                body: message,
            }),
        }
    }

    /// The reported node path, mapped into the agent's mount of the kubelet's directory.
    fn local_archive(&self, reported: &str) -> Result<PathBuf, KubeletError> {
        let unexpected = || KubeletError::UnexpectedArchivePath {
            path: reported.to_string(),
            expected_dir: self.kubelet_dir.display().to_string(),
        };
        let name = Path::new(reported)
            .strip_prefix(&self.kubelet_dir)
            .map_err(|_| unexpected())?
            .to_str()
            .ok_or_else(unexpected)?;
        let plain = !name.is_empty()
            && !name.contains('/')
            && name.starts_with("checkpoint-")
            && name.ends_with(".tar");
        if plain {
            Ok(self.local_dir.join(name))
        } else {
            Err(unexpected())
        }
    }
}

impl<T: ApiTransport> CheckpointBackend for KubeletBackend<T> {
    type Workload = PodContainer;
    type RestoreTarget = ();
    type Restored = ();
    type Error = KubeletError;

    fn kind(&self) -> BackendKind {
        BackendKind::Kubelet
    }

    async fn capabilities(&self) -> Result<Capabilities, KubeletError> {
        Ok(Capabilities {
            restore: false,
            incremental: false,
            notes: vec![
                "restore is a pod created from a checkpoint OCI image (done by the controller)"
                    .to_string(),
                "the kubelet API has no pre-dump or parent images".to_string(),
            ],
        })
    }

    /// A kubelet checkpoint always leaves the container running; for a migration's final
    /// checkpoint the controller deletes the pod afterwards.
    #[tracing::instrument(name = "kubelet_checkpoint", skip(self, request, archive_dir), fields(node = %self.node))]
    async fn checkpoint(
        &self,
        target: &PodContainer,
        request: &CheckpointRequest,
        archive_dir: &Path,
    ) -> Result<CheckpointOutcome, KubeletError> {
        if request.is_incremental() {
            return Err(KubeletError::Unsupported {
                what: "take incremental checkpoints (pre-dump or parent images)",
            });
        }
        let path = self.request_path(target, request.timeout)?;
        let started = Instant::now();
        let response = self.transport.post(&path).await?;
        let elapsed = started.elapsed();
        tracing::debug!(status = response.status, "kubelet answered");
        let reported = self.interpret(response)?;
        let local = self.local_archive(&reported)?;
        let destination = archive_dir.to_path_buf();
        let source = local.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&source).map_err(|error| KubeletError::Io {
                path: source.clone(),
                source: error,
            })?;
            archive::extract_foreign_tar(std::io::BufReader::new(file), &destination).map_err(
                |error| KubeletError::Import {
                    path: source.clone(),
                    source: error,
                },
            )
        })
        .await??;
        // CRI-O puts CRIU's statistics at the archive root; look in the images too.
        let stats_path = [
            archive_dir.join(STATS_DUMP_FILE),
            archive_dir.join(CRIU_IMAGES_DIR).join(STATS_DUMP_FILE),
        ]
        .into_iter()
        .find(|path| path.exists());
        let dump_stats = match stats_path {
            Some(path) => {
                Some(
                    criu::read_dump_stats(&path).map_err(|error| KubeletError::Import {
                        path: local.clone(),
                        source: ArchiveError::BadTarEntry {
                            file: STATS_DUMP_FILE.to_string(),
                            reason: error.to_string(),
                        },
                    })?,
                )
            }
            None => None,
        };
        let freeze = match dump_stats {
            Some(stats) => Freeze::new(stats.frozen_time, FreezeSource::CriuStats),
            None => Freeze::new(elapsed, FreezeSource::WallClock),
        };
        let runtime = std::fs::read(archive_dir.join(CONFIG_DUMP_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .and_then(|config| config.get("runtime")?.as_str().map(str::to_string));
        if self.remove_after_import {
            std::fs::remove_file(&local).map_err(|source| KubeletError::Io {
                path: local.clone(),
                source,
            })?;
        }
        tracing::info!(archive = %reported, freeze_us = freeze.micros, "kubelet checkpoint imported");
        Ok(CheckpointOutcome {
            freeze: Some(freeze),
            dump_stats,
            runtime,
            criu_version: None,
            epoch: None,
            elapsed,
        })
    }

    async fn restore(&self, _: &VerifiedCheckpoint, _: &()) -> Result<(), KubeletError> {
        Err(KubeletError::Unsupported {
            what: "restore by itself: a kubelet checkpoint is restored by creating a pod from a \
                   checkpoint OCI image built from the archive (the controller's job)",
        })
    }
}

fn is_kubernetes_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.'
        })
}

/// One recorded request and its answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RecordedExchange {
    pub name: String,
    pub method: String,
    pub path: String,
    /// `None` when the transport failed instead of answering.
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub body: String,
    /// For a transport failure: seconds after which the client gave up.
    #[serde(default)]
    pub timeout_after_seconds: Option<u64>,
}

/// A test double that replays recorded exchanges in order and checks each request path
/// against the recording.
#[derive(Debug)]
pub struct RecordedTransport {
    exchanges: Mutex<std::collections::VecDeque<RecordedExchange>>,
    requested: Mutex<Vec<String>>,
}

impl RecordedTransport {
    pub fn new(exchanges: impl IntoIterator<Item = RecordedExchange>) -> Self {
        Self {
            exchanges: Mutex::new(exchanges.into_iter().collect()),
            requested: Mutex::new(Vec::new()),
        }
    }

    pub fn requested(&self) -> Vec<String> {
        self.requested
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ApiTransport for RecordedTransport {
    async fn post(&self, path: &str) -> Result<ApiResponse, KubeletError> {
        self.requested
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(path.to_string());
        let next = self
            .exchanges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front();
        let Some(exchange) = next else {
            return Err(KubeletError::Transport(format!(
                "no recorded exchange left for POST {path}"
            )));
        };
        if exchange.method != "POST" || exchange.path != path {
            return Err(KubeletError::Transport(format!(
                "recorded `{}` expects {} {}, got POST {path}",
                exchange.name, exchange.method, exchange.path
            )));
        }
        match (exchange.status, exchange.timeout_after_seconds) {
            (Some(status), _) => Ok(ApiResponse {
                status,
                body: exchange.body,
            }),
            (None, Some(seconds)) => Err(KubeletError::TransportTimeout {
                after: Duration::from_secs(seconds),
            }),
            (None, None) => Err(KubeletError::Transport(exchange.body)),
        }
    }
}
