//! The process backend: `criu dump -t PID` and `criu restore` of a plain process tree, outside
//! any container. The agent uses the container backends; this one serves tests, benchmarks and
//! workloads run directly on a node.
//!
//! The dumped tree must be restorable where it is restored: same files at the same paths (CRIU
//! checks the size of open regular files), no controlling terminal (start it with `setsid`), and
//! its pids free (CRIU restores the original pids; a parent must reap a dumped child first).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use crate::archive::VerifiedCheckpoint;
use crate::backend::{Capabilities, CheckpointBackend, CheckpointOutcome, CheckpointRequest};
use crate::command::{CommandError, CommandRunner, Invocation};
use crate::criu::{self, CriuError, CriuFacts};
use crate::manifest::{
    BackendKind, CONFIG_DUMP_FILE, CRIU_IMAGES_DIR, ContainerConfigDump, DumpKind, Freeze,
    FreezeSource,
};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
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
    #[error("`{command}` failed (exit code {exit_code:?}); last lines of {log}:\n{log_tail}")]
    CriuFailed {
        command: String,
        exit_code: Option<i32>,
        log: PathBuf,
        log_tail: String,
    },
    #[error("checkpoint {id} was taken by the {found} backend, not by criu-process")]
    WrongBackend { id: String, found: BackendKind },
    #[error("checkpoint {id} is a pre-dump: it can only serve as the parent of a dump")]
    NotRestorable { id: String },
    #[error("criu wrote no usable pid to {path}: {content:?}")]
    BadPidFile { path: PathBuf, content: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ProcessError + '_ {
    move |source| ProcessError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The root of the process tree to dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessWorkload {
    pub pid: i32,
}

/// Where `criu restore` may write its log and pid file (never into the archive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRestoreTarget {
    pub work_dir: PathBuf,
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct ProcessBackend<R> {
    runner: R,
    criu: String,
    facts: OnceCell<CriuFacts>,
}

impl<R: CommandRunner> ProcessBackend<R> {
    /// `criu` is the program to run (`"criu"` finds the wrapper the install script puts on PATH).
    pub fn new(runner: R, criu: impl Into<String>) -> Self {
        Self {
            runner,
            criu: criu.into(),
            facts: OnceCell::new(),
        }
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    async fn facts(&self) -> Result<&CriuFacts, ProcessError> {
        Ok(self
            .facts
            .get_or_try_init(|| criu::probe(&self.runner, &self.criu))
            .await?)
    }

    /// The `criu dump` / `criu pre-dump` invocation for a request.
    pub fn dump_invocation(
        &self,
        workload: &ProcessWorkload,
        request: &CheckpointRequest,
        images_dir: &Path,
    ) -> Invocation {
        let action = match request.kind {
            DumpKind::PreDump => "pre-dump",
            DumpKind::Final | DumpKind::Periodic => "dump",
        };
        let log = format!("{action}.log");
        let mut invocation = Invocation::new(&self.criu)
            .arg(action)
            .args(["-t", &workload.pid.to_string()])
            .args(["-D", &images_dir.display().to_string()])
            .args(["-o", &log, "-v4"])
            .timeout(request.timeout);
        if request.kind == DumpKind::Periodic {
            invocation = invocation.arg("--leave-running");
        }
        if request.kind == DumpKind::PreDump || request.parent.is_some() {
            invocation = invocation.arg("--track-mem");
        }
        if let Some(parent) = &request.parent {
            invocation = invocation.args([
                "--prev-images-dir".to_string(),
                parent.relative_images_dir.display().to_string(),
            ]);
        }
        invocation
    }
}

impl<R: CommandRunner> CheckpointBackend for ProcessBackend<R> {
    type Workload = ProcessWorkload;
    type RestoreTarget = ProcessRestoreTarget;
    type Restored = i32;
    type Error = ProcessError;

    fn kind(&self) -> BackendKind {
        BackendKind::CriuProcess
    }

    async fn capabilities(&self) -> Result<Capabilities, ProcessError> {
        Ok(Capabilities::of_criu(self.facts().await?))
    }

    #[tracing::instrument(name = "criu_dump", skip(self, request, archive_dir), fields(pid = workload.pid, kind = ?request.kind))]
    async fn checkpoint(
        &self,
        workload: &ProcessWorkload,
        request: &CheckpointRequest,
        archive_dir: &Path,
    ) -> Result<CheckpointOutcome, ProcessError> {
        let facts = self.facts().await?.clone();
        if request.is_incremental() && !facts.dirty_tracking {
            return Err(ProcessError::IncrementalUnavailable);
        }
        let images_dir = archive_dir.join(CRIU_IMAGES_DIR);
        std::fs::create_dir_all(&images_dir).map_err(io_error(&images_dir))?;
        let name = std::fs::read_to_string(format!("/proc/{}/comm", workload.pid))
            .map(|comm| comm.trim().to_string())
            .unwrap_or_else(|_| format!("pid-{}", workload.pid));
        let invocation = self.dump_invocation(workload, request, &images_dir);
        let started = Instant::now();
        let output =
            self.runner
                .run(&invocation)
                .await
                .map_err(|source| ProcessError::Command {
                    command: invocation.to_string(),
                    source,
                })?;
        let elapsed = started.elapsed();
        if !output.succeeded() {
            let log = images_dir.join(format!("{}.log", invocation.args[0]));
            return Err(ProcessError::CriuFailed {
                command: invocation.to_string(),
                exit_code: output.exit_code,
                log_tail: criu::log_tail(&log, 15),
                log,
            });
        }
        let dump_stats = criu::collect_stats(&images_dir, archive_dir)?;
        let freeze = match dump_stats {
            Some(stats) => Freeze::new(stats.frozen_time, FreezeSource::CriuStats),
            None => Freeze::new(elapsed, FreezeSource::WallClock),
        };
        let now = jiff::Timestamp::now();
        let config = ContainerConfigDump {
            id: workload.pid.to_string(),
            name,
            rootfs_image_name: None,
            runtime: format!("criu {}", facts.version),
            created_time: now,
            checkpointed_time: Some(now),
        };
        let config_path = archive_dir.join(CONFIG_DUMP_FILE);
        crate::archive::write_json(&config_path, &config).map_err(io_error(&config_path))?;
        tracing::info!(freeze_us = freeze.micros, source = ?freeze.source, "dumped");
        Ok(CheckpointOutcome {
            freeze: Some(freeze),
            dump_stats,
            runtime: None,
            criu_version: Some(facts.version),
            epoch: None,
            elapsed,
        })
    }

    #[tracing::instrument(name = "criu_restore", skip_all, fields(id = %checkpoint.manifest().id))]
    async fn restore(
        &self,
        checkpoint: &VerifiedCheckpoint,
        target: &ProcessRestoreTarget,
    ) -> Result<i32, ProcessError> {
        let manifest = checkpoint.manifest();
        if manifest.backend != BackendKind::CriuProcess {
            return Err(ProcessError::WrongBackend {
                id: manifest.id.clone(),
                found: manifest.backend,
            });
        }
        if !manifest.kind.restorable() {
            return Err(ProcessError::NotRestorable {
                id: manifest.id.clone(),
            });
        }
        std::fs::create_dir_all(&target.work_dir).map_err(io_error(&target.work_dir))?;
        let images = criu::restore_view(checkpoint, &target.work_dir)?;
        let log = target.work_dir.join("restore.log");
        let pid_file = target.work_dir.join("restore.pid");
        let invocation = Invocation::new(&self.criu)
            .arg("restore")
            .args(["-D", &images.display().to_string()])
            .args(["-W", &target.work_dir.display().to_string()])
            .args(["-o", &log.display().to_string(), "-v4"])
            .arg("--restore-detached")
            .args(["--pidfile", &pid_file.display().to_string()])
            .timeout(target.timeout)
            .without_output();
        let output =
            self.runner
                .run(&invocation)
                .await
                .map_err(|source| ProcessError::Command {
                    command: invocation.to_string(),
                    source,
                })?;
        if !output.succeeded() {
            return Err(ProcessError::CriuFailed {
                command: invocation.to_string(),
                exit_code: output.exit_code,
                log_tail: criu::log_tail(&log, 15),
                log,
            });
        }
        let content = std::fs::read_to_string(&pid_file).map_err(io_error(&pid_file))?;
        let pid = content
            .trim()
            .parse()
            .map_err(|_| ProcessError::BadPidFile {
                path: pid_file.clone(),
                content: content.clone(),
            })?;
        tracing::info!(pid, "restored");
        Ok(pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ParentImages;
    use crate::command::{CommandOutput, RecordingRunner};

    fn backend_with(dirty_tracking: bool) -> ProcessBackend<RecordingRunner> {
        let runner = RecordingRunner::new();
        runner.answer_when(
            ["criu", "--version"],
            CommandOutput::success("Version: 4.1.1\n"),
        );
        runner.answer_when(
            ["criu", "check"],
            if dirty_tracking {
                CommandOutput::success("Looks good.\n")
            } else {
                CommandOutput::failure(1, "Dirty tracking is OFF")
            },
        );
        ProcessBackend::new(runner, "criu")
    }

    #[tokio::test]
    async fn periodic_dump_argv() {
        let backend = backend_with(true);
        let dir = tempfile::tempdir().unwrap();
        let request = CheckpointRequest::new(DumpKind::Periodic, Duration::from_secs(60));
        let outcome = backend
            .checkpoint(&ProcessWorkload { pid: 4242 }, &request, dir.path())
            .await
            .unwrap();
        let images = dir.path().join("checkpoint").display().to_string();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "criu",
                "dump",
                "-t",
                "4242",
                "-D",
                &images,
                "-o",
                "dump.log",
                "-v4",
                "--leave-running"
            ]
        );
        // The double wrote no stats-dump: the freeze falls back to the wall clock, and says so.
        assert_eq!(outcome.freeze.unwrap().source, FreezeSource::WallClock);
        assert_eq!(outcome.criu_version.as_deref(), Some("4.1.1"));
    }

    #[tokio::test]
    async fn final_incremental_dump_and_pre_dump_argv() {
        let backend = backend_with(true);
        let dir = tempfile::tempdir().unwrap();
        let parent = ParentImages {
            id: "trainer-000001".into(),
            relative_images_dir: "../../trainer-000001/checkpoint".into(),
        };
        let images = dir.path().join("checkpoint").display().to_string();
        let workload = ProcessWorkload { pid: 7 };

        let pre = CheckpointRequest::new(DumpKind::PreDump, Duration::from_secs(5));
        backend
            .checkpoint(&workload, &pre, dir.path())
            .await
            .unwrap();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "criu",
                "pre-dump",
                "-t",
                "7",
                "-D",
                &images,
                "-o",
                "pre-dump.log",
                "-v4",
                "--track-mem"
            ]
        );

        let last =
            CheckpointRequest::new(DumpKind::Final, Duration::from_secs(5)).with_parent(parent);
        backend
            .checkpoint(&workload, &last, dir.path())
            .await
            .unwrap();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "criu",
                "dump",
                "-t",
                "7",
                "-D",
                &images,
                "-o",
                "dump.log",
                "-v4",
                "--track-mem",
                "--prev-images-dir",
                "../../trainer-000001/checkpoint"
            ]
        );
    }

    #[tokio::test]
    async fn restore_argv() {
        let backend = backend_with(true);
        let root = tempfile::tempdir().unwrap();
        let archive_dir = root.path().join("p-000001");
        std::fs::create_dir_all(archive_dir.join("checkpoint")).unwrap();
        std::fs::write(archive_dir.join("checkpoint/core-1.img"), b"core").unwrap();
        let manifest = crate::manifest::Manifest {
            format_version: crate::manifest::FORMAT_VERSION,
            id: "p-000001".into(),
            pod: automigrate_core::model::PodRef::new("ml", "p"),
            container: "main".into(),
            backend: BackendKind::CriuProcess,
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
        crate::archive::seal(&archive_dir, manifest).unwrap();
        let verified = crate::archive::verify_chain(&archive_dir).unwrap();
        let work = root.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("restore.pid"), "77\n").unwrap();
        let target = ProcessRestoreTarget {
            work_dir: work.clone(),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(backend.restore(&verified, &target).await.unwrap(), 77);
        let w = work.display().to_string();
        assert_eq!(
            backend.runner().argvs().last().unwrap(),
            &[
                "criu".to_string(),
                "restore".into(),
                "-D".into(),
                format!("{w}/images"),
                "-W".into(),
                w.clone(),
                "-o".into(),
                format!("{w}/restore.log"),
                "-v4".into(),
                "--restore-detached".into(),
                "--pidfile".into(),
                format!("{w}/restore.pid")
            ]
        );
    }

    #[tokio::test]
    async fn incremental_is_refused_without_dirty_tracking() {
        let backend = backend_with(false);
        let dir = tempfile::tempdir().unwrap();
        let capabilities = backend.capabilities().await.unwrap();
        assert!(!capabilities.incremental);
        let request = CheckpointRequest::new(DumpKind::PreDump, Duration::from_secs(5));
        let error = backend
            .checkpoint(&ProcessWorkload { pid: 7 }, &request, dir.path())
            .await
            .unwrap_err();
        assert!(
            matches!(error, ProcessError::IncrementalUnavailable),
            "{error}"
        );
        // Only the two probe calls ran, and only once for both uses.
        assert_eq!(backend.runner().calls().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_dump_reports_the_log() {
        let backend = backend_with(true);
        backend
            .runner()
            .answer_when(["criu", "dump"], CommandOutput::failure(1, ""));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoint")).unwrap();
        std::fs::write(
            dir.path().join("checkpoint/dump.log"),
            "Error (criu/cr-dump.c:1): boom\n",
        )
        .unwrap();
        let request = CheckpointRequest::new(DumpKind::Final, Duration::from_secs(5));
        let error = backend
            .checkpoint(&ProcessWorkload { pid: 7 }, &request, dir.path())
            .await
            .unwrap_err();
        assert!(error.to_string().contains("boom"), "{error}");
    }
}
