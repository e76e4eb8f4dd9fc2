//! The application-mode backend (`automigrate.dev/mode: application`): the training program
//! saves its own state (framework checkpoint files) when asked, for workloads CRIU cannot dump
//! (GPUs) or that prefer a framework-level checkpoint.
//!
//! Protocol with the program: it owns a save directory. The backend removes a stale completion
//! marker, asks for a checkpoint (a signal, `SIGUSR1` by default, or an HTTP POST to a hook),
//! and waits, up to the request's timeout, for the marker file to appear. The program writes
//! its files first and the marker last (write to a temporary name, then rename). The marker may
//! hold JSON such as `{"epoch": 12}`; the epoch is recorded. Everything else in the save
//! directory is copied into the archive's `app/` directory, and the time from request to marker
//! is reported as the freeze (the program paused training to save). Restore copies `app/` into
//! the directory the new program loads from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::archive::VerifiedCheckpoint;
use crate::backend::{Capabilities, CheckpointBackend, CheckpointOutcome, CheckpointRequest};
use crate::manifest::{APP_FILES_DIR, BackendKind, Freeze, FreezeSource};
use automigrate_core::annotations::CheckpointMode;

/// The file the program creates in its save directory when its checkpoint is complete.
pub const DEFAULT_MARKER: &str = "automigrate-checkpoint-done";

#[derive(Debug, thiserror::Error)]
pub enum ApplicationError {
    #[error("cannot signal pid {pid} with {signal}: {source}")]
    Signal {
        pid: i32,
        signal: Signal,
        source: nix::Error,
    },
    #[error("checkpoint hook {address}{path} failed: {reason}")]
    Hook {
        address: SocketAddr,
        path: String,
        reason: String,
    },
    #[error("the program did not write {marker} within {timeout:?}")]
    TimedOut { marker: PathBuf, timeout: Duration },
    #[error("application checkpoints cannot be incremental")]
    Incremental,
    #[error("checkpoint {id} was taken by the {found} backend, not by application mode")]
    WrongBackend { id: String, found: BackendKind },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ApplicationError + '_ {
    move |source| ApplicationError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How the program is asked to save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Signal(Signal),
    /// `POST {path}` over HTTP/1.1 to a hook the program serves; any 2xx is an acceptance.
    HttpPost {
        address: SocketAddr,
        path: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppWorkload {
    pub pid: i32,
    pub save_dir: PathBuf,
    pub trigger: Trigger,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRestoreTarget {
    /// Where the restarted program loads its checkpoint from.
    pub load_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ApplicationBackend {
    marker: String,
    poll_interval: Duration,
}

impl Default for ApplicationBackend {
    fn default() -> Self {
        Self {
            marker: DEFAULT_MARKER.to_string(),
            poll_interval: Duration::from_millis(20),
        }
    }
}

impl ApplicationBackend {
    pub fn with_marker(marker: impl Into<String>) -> Self {
        Self {
            marker: marker.into(),
            ..Self::default()
        }
    }

    async fn trigger(&self, workload: &AppWorkload) -> Result<(), ApplicationError> {
        match &workload.trigger {
            Trigger::Signal(signal) => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(workload.pid), *signal).map_err(
                    |source| ApplicationError::Signal {
                        pid: workload.pid,
                        signal: *signal,
                        source,
                    },
                )
            }
            Trigger::HttpPost { address, path } => post_hook(*address, path).await,
        }
    }
}

/// A minimal HTTP/1.1 POST with an empty body: the hook is a local endpoint of the program, so
/// a full HTTP client would be a heavy dependency for one request line.
async fn post_hook(address: SocketAddr, path: &str) -> Result<(), ApplicationError> {
    let failed = |reason: String| ApplicationError::Hook {
        address,
        path: path.to_string(),
        reason,
    };
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|error| failed(error.to_string()))?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| failed(error.to_string()))?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .await
        .map_err(|error| failed(error.to_string()))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| failed(format!("not an HTTP answer: {status_line:?}")))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(failed(format!("answered {status_line}")))
    }
}

impl CheckpointBackend for ApplicationBackend {
    type Workload = AppWorkload;
    type RestoreTarget = AppRestoreTarget;
    type Restored = PathBuf;
    type Error = ApplicationError;

    fn kind(&self) -> BackendKind {
        BackendKind::Application
    }

    fn mode(&self) -> CheckpointMode {
        CheckpointMode::Application
    }

    async fn capabilities(&self) -> Result<Capabilities, ApplicationError> {
        Ok(Capabilities {
            restore: true,
            incremental: false,
            notes: vec!["the program saves and loads its own state".to_string()],
        })
    }

    #[tracing::instrument(name = "app_checkpoint", skip(self, request, archive_dir), fields(pid = workload.pid))]
    async fn checkpoint(
        &self,
        workload: &AppWorkload,
        request: &CheckpointRequest,
        archive_dir: &Path,
    ) -> Result<CheckpointOutcome, ApplicationError> {
        if request.is_incremental() {
            return Err(ApplicationError::Incremental);
        }
        let marker = workload.save_dir.join(&self.marker);
        match tokio::fs::remove_file(&marker).await {
            Ok(()) => tracing::debug!("removed a stale marker"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ApplicationError::Io {
                    path: marker,
                    source,
                });
            }
        }
        let started = Instant::now();
        self.trigger(workload).await?;
        let deadline = started + request.timeout;
        while !tokio::fs::try_exists(&marker)
            .await
            .map_err(io_error(&marker))?
        {
            if Instant::now() >= deadline {
                return Err(ApplicationError::TimedOut {
                    marker,
                    timeout: request.timeout,
                });
            }
            tokio::time::sleep(self.poll_interval).await;
        }
        let saved_in = started.elapsed();
        let marker_text = tokio::fs::read_to_string(&marker)
            .await
            .map_err(io_error(&marker))?;
        let epoch = serde_json::from_str::<serde_json::Value>(&marker_text)
            .ok()
            .and_then(|value| value.get("epoch")?.as_u64());
        let source = workload.save_dir.clone();
        let destination = archive_dir.join(APP_FILES_DIR);
        let skip = self.marker.clone();
        tokio::task::spawn_blocking(move || copy_tree(&source, &destination, Some(&skip)))
            .await
            .map_err(|error| ApplicationError::Io {
                path: workload.save_dir.clone(),
                source: std::io::Error::other(error),
            })??;
        tokio::fs::remove_file(&marker)
            .await
            .map_err(io_error(&marker))?;
        tracing::info!(
            saved_ms = saved_in.as_millis() as u64,
            ?epoch,
            "application saved"
        );
        Ok(CheckpointOutcome {
            freeze: Some(Freeze::new(saved_in, FreezeSource::Application)),
            dump_stats: None,
            runtime: None,
            criu_version: None,
            epoch,
            elapsed: saved_in,
        })
    }

    #[tracing::instrument(name = "app_restore", skip_all, fields(id = %checkpoint.manifest().id))]
    async fn restore(
        &self,
        checkpoint: &VerifiedCheckpoint,
        target: &AppRestoreTarget,
    ) -> Result<PathBuf, ApplicationError> {
        let manifest = checkpoint.manifest();
        if manifest.backend != BackendKind::Application {
            return Err(ApplicationError::WrongBackend {
                id: manifest.id.clone(),
                found: manifest.backend,
            });
        }
        let source = checkpoint.dir().join(APP_FILES_DIR);
        let destination = target.load_dir.clone();
        tokio::task::spawn_blocking(move || copy_tree(&source, &destination, None))
            .await
            .map_err(|error| ApplicationError::Io {
                path: target.load_dir.clone(),
                source: std::io::Error::other(error),
            })??;
        Ok(target.load_dir.clone())
    }
}

/// Copies regular files and directories from `source` into `destination` (created), skipping a
/// top-level file named `skip`.
fn copy_tree(
    source: &Path,
    destination: &Path,
    skip: Option<&str>,
) -> Result<(), ApplicationError> {
    std::fs::create_dir_all(destination).map_err(io_error(destination))?;
    let mut pending = vec![(source.to_path_buf(), destination.to_path_buf(), true)];
    while let Some((from, to, top)) = pending.pop() {
        for entry in std::fs::read_dir(&from).map_err(io_error(&from))? {
            let entry = entry.map_err(io_error(&from))?;
            let name = entry.file_name();
            if top && skip.is_some_and(|skip| name == skip) {
                continue;
            }
            let file_type = entry.file_type().map_err(io_error(&entry.path()))?;
            let target = to.join(&name);
            if file_type.is_dir() {
                std::fs::create_dir_all(&target).map_err(io_error(&target))?;
                pending.push((entry.path(), target, false));
            } else if file_type.is_file() {
                std::fs::copy(entry.path(), &target).map_err(io_error(&entry.path()))?;
            }
        }
    }
    Ok(())
}
