//! The runc backend: `runc checkpoint` / `runc restore` of an OCI container, with runc driving
//! CRIU (`criu swrk`) underneath.
//!
//! A checkpoint archive from this backend holds CRIU's images in `checkpoint/` (runc's work
//! path is the image path, so `dump.log` lands there too, as with CRI-O), the container's OCI
//! spec as `spec.dump`, its metadata as `config.dump` and CRIU's `stats-dump` at the root.
//! Restore needs a bundle whose `config.json` matches the one dumped (same mounts at the same
//! host paths); it runs `runc restore --detach` against a symlink view of the verified images so
//! the archive itself is never written to.
//!
//! Container lifecycle helpers ([`RuncBackend::run_detached`], [`RuncBackend::kill`],
//! [`RuncBackend::delete`], [`RuncBackend::state`]) go through the same [`CommandRunner`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::archive::VerifiedCheckpoint;
use crate::backend::{Capabilities, CheckpointBackend, CheckpointOutcome, CheckpointRequest};
use crate::command::{CommandError, CommandOutput, CommandRunner, Invocation};
use crate::criu::{self, CriuError, CriuFacts};
use crate::manifest::{
    BackendKind, CONFIG_DUMP_FILE, CRIU_IMAGES_DIR, ContainerConfigDump, DumpKind, Freeze,
    FreezeSource, SPEC_DUMP_FILE,
};

#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(
        "incremental checkpoints need memory dirty tracking, which this kernel lacks \
         (CONFIG_MEM_SOFT_DIRTY is not set; `criu check --feature mem_dirty_track` fails): take a full dump"
    )]
    IncrementalUnavailable,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}`: {source}")]
    Command {
        command: String,
        source: CommandError,
    },
    #[error("`{command}` failed (exit code {exit_code:?}): {detail}")]
    Failed {
        command: String,
        exit_code: Option<i32>,
        detail: String,
    },
    #[error("`runc state {id}` printed something unexpected: {reason}")]
    BadState { id: String, reason: String },
    /// runc knows no container by this id: nothing to checkpoint (the agent answers 404).
    #[error("runc has no container `{id}`: {detail}")]
    NoContainer { id: String, detail: String },
    #[error("checkpoint {id} was taken by the {found} backend, not by runc")]
    WrongBackend { id: String, found: BackendKind },
    #[error("checkpoint {id} is a pre-dump: it can only serve as the parent of a dump")]
    NotRestorable { id: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RuncError + '_ {
    move |source| RuncError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncContainer {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncRestoreTarget {
    /// Id of the restored container (may equal the dumped one once that is gone).
    pub container_id: String,
    pub bundle: PathBuf,
    /// Logs, pid file and the images view go here, never into the archive.
    pub work_dir: PathBuf,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredContainer {
    pub id: String,
    pub pid: i32,
}

/// The fields of `runc state` this crate uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub pid: i32,
    pub status: String,
    pub bundle: PathBuf,
    pub created: jiff::Timestamp,
}

#[derive(Debug)]
pub struct RuncBackend<R> {
    runner: R,
    runc: String,
    criu: String,
    root: Option<PathBuf>,
    facts: OnceCell<CriuFacts>,
    runc_version: OnceCell<String>,
}

impl<R: CommandRunner> RuncBackend<R> {
    /// `runc` and `criu` are the programs to run; runc finds CRIU on PATH itself, `criu` here is
    /// only asked for its version and the kernel's capabilities.
    pub fn new(runner: R, runc: impl Into<String>, criu: impl Into<String>) -> Self {
        Self {
            runner,
            runc: runc.into(),
            criu: criu.into(),
            root: None,
            facts: OnceCell::new(),
            runc_version: OnceCell::new(),
        }
    }

    /// runc's state directory (`runc --root`), to keep test containers apart from others.
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    fn runc(&self) -> Invocation {
        let invocation = Invocation::new(&self.runc);
        match &self.root {
            Some(root) => invocation.args(["--root".to_string(), root.display().to_string()]),
            None => invocation,
        }
    }

    async fn run(&self, invocation: Invocation) -> Result<CommandOutput, RuncError> {
        let output = self
            .runner
            .run(&invocation)
            .await
            .map_err(|source| RuncError::Command {
                command: invocation.to_string(),
                source,
            })?;
        Ok(output)
    }

    async fn run_ok(&self, invocation: Invocation) -> Result<CommandOutput, RuncError> {
        let command = invocation.to_string();
        let output = self.run(invocation).await?;
        if output.succeeded() {
            Ok(output)
        } else {
            Err(RuncError::Failed {
                command,
                exit_code: output.exit_code,
                detail: output.stderr.trim().to_string(),
            })
        }
    }

    async fn facts(&self) -> Result<&CriuFacts, RuncError> {
        Ok(self
            .facts
            .get_or_try_init(|| criu::probe(&self.runner, &self.criu))
            .await?)
    }

    async fn runc_version(&self) -> Result<&String, RuncError> {
        self.runc_version
            .get_or_try_init(|| async {
                let output = self
                    .run_ok(Invocation::new(&self.runc).arg("--version"))
                    .await?;
                Ok(output
                    .stdout
                    .lines()
                    .find_map(|line| line.strip_prefix("runc version "))
                    .map(|version| format!("runc {}", version.trim()))
                    .unwrap_or_else(|| "runc".to_string()))
            })
            .await
    }

    /// Starts a container from `bundle` in the background (`runc run --detach`), stdio on
    /// `/dev/null`; runc's own messages go to `log`.
    #[tracing::instrument(name = "runc_run", skip(self))]
    pub async fn run_detached(&self, id: &str, bundle: &Path, log: &Path) -> Result<(), RuncError> {
        let invocation = self
            .runc()
            .args(["--log".to_string(), log.display().to_string()])
            .arg("run")
            .args(["--bundle".to_string(), bundle.display().to_string()])
            .arg("--detach")
            .arg(id)
            .timeout(Duration::from_secs(60))
            .without_output();
        let command = invocation.to_string();
        let output = self.run(invocation).await?;
        if output.succeeded() {
            Ok(())
        } else {
            Err(RuncError::Failed {
                command,
                exit_code: output.exit_code,
                detail: criu::log_tail(log, 10),
            })
        }
    }

    pub async fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        let invocation = self.runc().args(["state", id]);
        let command = invocation.to_string();
        let output = self.run(invocation).await?;
        if !output.succeeded() {
            let detail = output.stderr.trim().to_string();
            // libcontainer's ErrNotExist, as `delete` recognises it.
            if detail.contains("does not exist") {
                return Err(RuncError::NoContainer {
                    id: id.to_string(),
                    detail,
                });
            }
            return Err(RuncError::Failed {
                command,
                exit_code: output.exit_code,
                detail,
            });
        }
        serde_json::from_str(&output.stdout).map_err(|error| RuncError::BadState {
            id: id.to_string(),
            reason: error.to_string(),
        })
    }

    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), RuncError> {
        self.run_ok(self.runc().args(["kill", id, signal])).await?;
        Ok(())
    }

    /// `runc delete --force`: stops and removes the container; fine if it is already gone.
    pub async fn delete(&self, id: &str) -> Result<(), RuncError> {
        let output = self
            .run(self.runc().args(["delete", "--force", id]))
            .await?;
        if output.succeeded() || output.stderr.contains("does not exist") {
            Ok(())
        } else {
            Err(RuncError::Failed {
                command: format!("runc delete --force {id}"),
                exit_code: output.exit_code,
                detail: output.stderr.trim().to_string(),
            })
        }
    }

    /// The `runc checkpoint` invocation for a request.
    pub fn checkpoint_invocation(
        &self,
        container: &RuncContainer,
        request: &CheckpointRequest,
        images_dir: &Path,
    ) -> Invocation {
        let mut invocation = self
            .runc()
            .arg("checkpoint")
            .args(["--image-path".to_string(), images_dir.display().to_string()])
            .timeout(request.timeout);
        match request.kind {
            DumpKind::Periodic => invocation = invocation.arg("--leave-running"),
            DumpKind::PreDump => invocation = invocation.arg("--pre-dump"),
            DumpKind::Final => {}
        }
        if let Some(parent) = &request.parent {
            invocation = invocation.args([
                "--parent-path".to_string(),
                parent.relative_images_dir.display().to_string(),
            ]);
        }
        invocation.arg(&container.id)
    }
}

impl<R: CommandRunner> CheckpointBackend for RuncBackend<R> {
    type Workload = RuncContainer;
    type RestoreTarget = RuncRestoreTarget;
    type Restored = RestoredContainer;
    type Error = RuncError;

    fn kind(&self) -> BackendKind {
        BackendKind::Runc
    }

    async fn capabilities(&self) -> Result<Capabilities, RuncError> {
        Ok(Capabilities::of_criu(self.facts().await?))
    }

    #[tracing::instrument(name = "runc_checkpoint", skip(self, request, archive_dir), fields(container = %container.id, kind = ?request.kind))]
    async fn checkpoint(
        &self,
        container: &RuncContainer,
        request: &CheckpointRequest,
        archive_dir: &Path,
    ) -> Result<CheckpointOutcome, RuncError> {
        let facts = self.facts().await?.clone();
        if request.is_incremental() && !facts.dirty_tracking {
            return Err(RuncError::IncrementalUnavailable);
        }
        let runtime = self.runc_version().await?.clone();
        // Before the dump: a final checkpoint removes the container and its state with it.
        let state = self.state(&container.id).await?;
        let spec_source = state.bundle.join("config.json");
        let spec_dump = archive_dir.join(SPEC_DUMP_FILE);
        std::fs::copy(&spec_source, &spec_dump).map_err(io_error(&spec_source))?;

        let images_dir = archive_dir.join(CRIU_IMAGES_DIR);
        std::fs::create_dir_all(&images_dir).map_err(io_error(&images_dir))?;
        let invocation = self.checkpoint_invocation(container, request, &images_dir);
        let command = invocation.to_string();
        let started = Instant::now();
        let output = self.run(invocation).await?;
        let elapsed = started.elapsed();
        if !output.succeeded() {
            let log_name = if request.kind == DumpKind::PreDump {
                "pre-dump.log"
            } else {
                "dump.log"
            };
            return Err(RuncError::Failed {
                command,
                exit_code: output.exit_code,
                detail: format!(
                    "{}\n{}",
                    output.stderr.trim(),
                    criu::log_tail(&images_dir.join(log_name), 15)
                ),
            });
        }
        let dump_stats = criu::collect_stats(&images_dir, archive_dir)?;
        let freeze = match dump_stats {
            Some(stats) => Freeze::new(stats.frozen_time, FreezeSource::CriuStats),
            None => Freeze::new(elapsed, FreezeSource::WallClock),
        };
        let config = ContainerConfigDump {
            id: container.id.clone(),
            name: container.id.clone(),
            rootfs_image_name: None,
            runtime: "runc".to_string(),
            created_time: state.created,
            checkpointed_time: Some(jiff::Timestamp::now()),
        };
        let config_path = archive_dir.join(CONFIG_DUMP_FILE);
        crate::archive::write_json(&config_path, &config).map_err(io_error(&config_path))?;
        tracing::info!(freeze_us = freeze.micros, source = ?freeze.source, "checkpointed");
        Ok(CheckpointOutcome {
            freeze: Some(freeze),
            dump_stats,
            runtime: Some(runtime),
            criu_version: Some(facts.version),
            epoch: None,
            elapsed,
        })
    }

    #[tracing::instrument(name = "runc_restore", skip_all, fields(id = %checkpoint.manifest().id, container = %target.container_id))]
    async fn restore(
        &self,
        checkpoint: &VerifiedCheckpoint,
        target: &RuncRestoreTarget,
    ) -> Result<RestoredContainer, RuncError> {
        let manifest = checkpoint.manifest();
        if manifest.backend != BackendKind::Runc {
            return Err(RuncError::WrongBackend {
                id: manifest.id.clone(),
                found: manifest.backend,
            });
        }
        if !manifest.kind.restorable() {
            return Err(RuncError::NotRestorable {
                id: manifest.id.clone(),
            });
        }
        std::fs::create_dir_all(&target.work_dir).map_err(io_error(&target.work_dir))?;
        let images = criu::restore_view(checkpoint, &target.work_dir)?;
        let log = target.work_dir.join("runc.log");
        let pid_file = target.work_dir.join("restore.pid");
        let invocation = self
            .runc()
            .args(["--log".to_string(), log.display().to_string()])
            .arg("restore")
            .args(["--image-path".to_string(), images.display().to_string()])
            .args([
                "--work-path".to_string(),
                target.work_dir.display().to_string(),
            ])
            .args(["--bundle".to_string(), target.bundle.display().to_string()])
            .arg("--detach")
            .args(["--pid-file".to_string(), pid_file.display().to_string()])
            .arg(&target.container_id)
            .timeout(target.timeout)
            .without_output();
        let command = invocation.to_string();
        let output = self.run(invocation).await?;
        if !output.succeeded() {
            return Err(RuncError::Failed {
                command,
                exit_code: output.exit_code,
                detail: format!(
                    "{}\n{}",
                    criu::log_tail(&log, 5),
                    criu::log_tail(&target.work_dir.join("restore.log"), 15)
                ),
            });
        }
        let content = std::fs::read_to_string(&pid_file).map_err(io_error(&pid_file))?;
        let pid = content.trim().parse().map_err(|_| RuncError::BadState {
            id: target.container_id.clone(),
            reason: format!("pid file {} holds {content:?}", pid_file.display()),
        })?;
        tracing::info!(pid, "restored");
        Ok(RestoredContainer {
            id: target.container_id.clone(),
            pid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ParentImages;
    use crate::command::RecordingRunner;

    fn backend() -> (RuncBackend<RecordingRunner>, tempfile::TempDir) {
        let bundle = tempfile::tempdir().unwrap();
        std::fs::write(
            bundle.path().join("config.json"),
            "{\"ociVersion\":\"1.0.2\"}",
        )
        .unwrap();
        let runner = RecordingRunner::new();
        runner.answer_when(
            ["criu", "--version"],
            CommandOutput::success("Version: 4.1.1\n"),
        );
        runner.answer_when(["criu", "check"], CommandOutput::success("Looks good.\n"));
        runner.answer_when(
            ["runc", "--version"],
            CommandOutput::success("runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\n"),
        );
        runner.answer_when(
            ["runc", "--root", "/run/test-runc", "state"],
            CommandOutput::success(format!(
                r#"{{"ociVersion":"1.0.2","id":"trainer","pid":4242,"status":"running","bundle":"{}","rootfs":"/x","created":"2026-11-22T10:00:00.5Z","owner":""}}"#,
                bundle.path().display()
            )),
        );
        (
            RuncBackend::new(runner, "runc", "criu").with_root("/run/test-runc"),
            bundle,
        )
    }

    #[tokio::test]
    async fn periodic_checkpoint_argv_and_archive_metadata() {
        let (backend, _bundle) = backend();
        let archive = tempfile::tempdir().unwrap();
        let request = CheckpointRequest::new(DumpKind::Periodic, Duration::from_secs(30));
        let outcome = backend
            .checkpoint(
                &RuncContainer {
                    id: "trainer".into(),
                },
                &request,
                archive.path(),
            )
            .await
            .unwrap();
        let images = archive.path().join("checkpoint").display().to_string();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "runc",
                "--root",
                "/run/test-runc",
                "checkpoint",
                "--image-path",
                &images,
                "--leave-running",
                "trainer"
            ]
        );
        assert_eq!(outcome.runtime.as_deref(), Some("runc 1.1.5+ds1"));
        assert_eq!(
            std::fs::read_to_string(archive.path().join("spec.dump")).unwrap(),
            "{\"ociVersion\":\"1.0.2\"}"
        );
        let config: ContainerConfigDump = serde_json::from_str(
            &std::fs::read_to_string(archive.path().join("config.dump")).unwrap(),
        )
        .unwrap();
        assert_eq!(config.id, "trainer");
        assert_eq!(config.runtime, "runc");
    }

    #[tokio::test]
    async fn pre_dump_and_incremental_final_argv() {
        let (backend, _bundle) = backend();
        let archive = tempfile::tempdir().unwrap();
        let images = archive.path().join("checkpoint").display().to_string();
        let container = RuncContainer {
            id: "trainer".into(),
        };
        let parent = ParentImages {
            id: "trainer-000003".into(),
            relative_images_dir: "../../trainer-000003/checkpoint".into(),
        };
        let pre = CheckpointRequest::new(DumpKind::PreDump, Duration::from_secs(30))
            .with_parent(parent.clone());
        backend
            .checkpoint(&container, &pre, archive.path())
            .await
            .unwrap();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "runc",
                "--root",
                "/run/test-runc",
                "checkpoint",
                "--image-path",
                &images,
                "--pre-dump",
                "--parent-path",
                "../../trainer-000003/checkpoint",
                "trainer"
            ]
        );
        let last =
            CheckpointRequest::new(DumpKind::Final, Duration::from_secs(30)).with_parent(parent);
        backend
            .checkpoint(&container, &last, archive.path())
            .await
            .unwrap();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "runc",
                "--root",
                "/run/test-runc",
                "checkpoint",
                "--image-path",
                &images,
                "--parent-path",
                "../../trainer-000003/checkpoint",
                "trainer"
            ]
        );
    }

    #[tokio::test]
    async fn restore_argv_uses_a_view_and_never_writes_the_archive() {
        let (backend, _bundle) = backend();
        let root = tempfile::tempdir().unwrap();
        let archive_dir = root.path().join("trainer-000001");
        std::fs::create_dir_all(archive_dir.join("checkpoint")).unwrap();
        std::fs::write(archive_dir.join("checkpoint/pages-1.img"), b"pages").unwrap();
        let mut manifest = crate::manifest::Manifest {
            format_version: crate::manifest::FORMAT_VERSION,
            id: "trainer-000001".into(),
            pod: automigrate_core::model::PodRef::new("ml", "trainer"),
            container: "main".into(),
            backend: BackendKind::Runc,
            runtime: None,
            criu_version: None,
            created_at: "2026-11-22T10:00:00Z".parse().unwrap(),
            parent: None,
            mode: automigrate_core::annotations::CheckpointMode::Transparent,
            kind: DumpKind::Final,
            freeze: None,
            epoch: None,
            files: Vec::new(),
        };
        manifest = crate::archive::seal(&archive_dir, manifest).unwrap();
        let verified = crate::archive::verify_chain(&archive_dir).unwrap();
        let work = root.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        // The double starts nothing: write the pid file runc would write.
        std::fs::write(work.join("restore.pid"), "4242").unwrap();
        let restored = backend
            .restore(
                &verified,
                &RuncRestoreTarget {
                    container_id: "trainer-2".into(),
                    bundle: "/bundles/trainer".into(),
                    work_dir: work.clone(),
                    timeout: Duration::from_secs(30),
                },
            )
            .await
            .unwrap();
        assert_eq!(
            restored,
            RestoredContainer {
                id: "trainer-2".into(),
                pid: 4242
            }
        );
        let w = work.display().to_string();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "runc".to_string(),
                "--root".into(),
                "/run/test-runc".into(),
                "--log".into(),
                format!("{w}/runc.log"),
                "restore".into(),
                "--image-path".into(),
                format!("{w}/images"),
                "--work-path".into(),
                w.clone(),
                "--bundle".into(),
                "/bundles/trainer".into(),
                "--detach".into(),
                "--pid-file".into(),
                format!("{w}/restore.pid"),
                "trainer-2".into()
            ]
        );
        assert_eq!(
            std::fs::read(work.join("images/pages-1.img")).unwrap(),
            b"pages"
        );
        assert_eq!(crate::archive::verify(&archive_dir).unwrap(), manifest);
    }

    #[tokio::test]
    async fn lifecycle_argv() {
        let (backend, _bundle) = backend();
        backend
            .run_detached("c1", Path::new("/b"), Path::new("/w/runc.log"))
            .await
            .unwrap();
        backend.kill("c1", "KILL").await.unwrap();
        backend.delete("c1").await.unwrap();
        assert_eq!(
            backend.runner().argvs(),
            [
                vec![
                    "runc",
                    "--root",
                    "/run/test-runc",
                    "--log",
                    "/w/runc.log",
                    "run",
                    "--bundle",
                    "/b",
                    "--detach",
                    "c1"
                ],
                vec!["runc", "--root", "/run/test-runc", "kill", "c1", "KILL"],
                vec![
                    "runc",
                    "--root",
                    "/run/test-runc",
                    "delete",
                    "--force",
                    "c1"
                ],
            ]
        );
        // Detached runs must not capture output: the container would inherit the pipes.
        assert!(!backend.runner().calls()[0].capture_output);
    }
}
