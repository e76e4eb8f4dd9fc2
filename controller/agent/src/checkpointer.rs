//! How the agent turns "checkpoint container C of pod P" into a call of one of the
//! `automigrate_checkpoint` backends.
//!
//! The backends are generic (each has its own workload type), the agent picks one at start-up,
//! so [`Checkpointer`] is the object-safe view the agent holds: a backend plus a *resolver*
//! that finds the backend's workload for a pod's container:
//! - runc: the container id from a template ([`RuncIdTemplate`], `{namespace}`, `{pod}`,
//!   `{container}`), e.g. the names the embedded mode gives its containers.
//! - process and application: a *workloads directory* ([`WorkloadsDir`]) where whoever starts
//!   the workload registers it: `<dir>/<namespace>/<pod>/<container>/pid` holds its pid; for
//!   application mode `save/` is the directory the program saves into, and an optional `hook`
//!   file (`host:port/path`) asks for an HTTP POST instead of `SIGUSR1`.
//! - kubelet: the pod container itself, through the API server (see [`crate::kubeapi`]).
//!
//! [`testing::FakeBackend`] is a backend that writes synthetic images, for tests and demos of
//! everything around a checkpoint without root.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use automigrate_checkpoint::application::{AppWorkload, ApplicationBackend, Trigger};
use automigrate_checkpoint::backend::TakeError;
use automigrate_checkpoint::command::CommandRunner;
use automigrate_checkpoint::kubelet::{ApiTransport, KubeletBackend, PodContainer};
use automigrate_checkpoint::process::{ProcessBackend, ProcessWorkload};
use automigrate_checkpoint::runc::{RuncBackend, RuncContainer, RuncError};
use automigrate_checkpoint::store::StoreError;
use automigrate_checkpoint::{
    BackendKind, Capabilities, CheckpointBackend, CheckpointStore, DumpKind, SealedCheckpoint,
    Subject, checkpoint_into_store,
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a checkpoint could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointerError {
    /// The pod's container is not known to this node's backend.
    #[error("no workload for pod {pod} container `{container}`: {reason}")]
    NoWorkload {
        pod: String,
        container: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backend (CRIU, runc, the kubelet, the program) failed.
    #[error("{backend} checkpoint failed: {message}")]
    Backend {
        backend: BackendKind,
        message: String,
    },
    #[error("checkpoint task failed: {0}")]
    Join(String),
}

/// A backend and its resolver, as the agent uses them.
pub trait Checkpointer: Send + Sync + 'static {
    fn backend(&self) -> BackendKind;

    fn capabilities(&self) -> BoxFuture<'_, Result<Capabilities, CheckpointerError>>;

    /// Takes one checkpoint of the subject into the store (stage, dump, seal, publish).
    fn checkpoint<'a>(
        &'a self,
        store: &'a CheckpointStore,
        subject: &'a Subject,
        kind: DumpKind,
        parent: Option<&'a str>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<SealedCheckpoint, CheckpointerError>>;
}

/// Finds a backend's workload for a subject.
pub trait Resolve<W>: Send + Sync + 'static {
    fn resolve(&self, subject: &Subject) -> Result<W, String>;
}

impl<W, F: Fn(&Subject) -> Result<W, String> + Send + Sync + 'static> Resolve<W> for F {
    fn resolve(&self, subject: &Subject) -> Result<W, String> {
        self(subject)
    }
}

/// [`Checkpointer`] for any backend with a resolver.
#[derive(Debug)]
pub struct BackendCheckpointer<B, R> {
    backend: B,
    resolver: R,
}

impl<B, R> BackendCheckpointer<B, R> {
    pub fn new(backend: B, resolver: R) -> Self {
        Self { backend, resolver }
    }

    pub fn backend_ref(&self) -> &B {
        &self.backend
    }
}

impl<B, R> Checkpointer for BackendCheckpointer<B, R>
where
    B: CheckpointBackend + 'static,
    R: Resolve<B::Workload>,
{
    fn backend(&self) -> BackendKind {
        self.backend.kind()
    }

    fn capabilities(&self) -> BoxFuture<'_, Result<Capabilities, CheckpointerError>> {
        Box::pin(async move {
            self.backend
                .capabilities()
                .await
                .map_err(|error| CheckpointerError::Backend {
                    backend: self.backend.kind(),
                    message: error.to_string(),
                })
        })
    }

    fn checkpoint<'a>(
        &'a self,
        store: &'a CheckpointStore,
        subject: &'a Subject,
        kind: DumpKind,
        parent: Option<&'a str>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<SealedCheckpoint, CheckpointerError>> {
        Box::pin(async move {
            let workload =
                self.resolver
                    .resolve(subject)
                    .map_err(|reason| CheckpointerError::NoWorkload {
                        pod: subject.pod.to_string(),
                        container: subject.container.clone(),
                        reason,
                    })?;
            checkpoint_into_store(
                &self.backend,
                store,
                subject,
                &workload,
                kind,
                parent,
                timeout,
            )
            .await
            .map_err(|error| match error {
                TakeError::Store(error) => CheckpointerError::Store(error),
                // The runtime knows no such container: the pod is not on this node (404), not
                // a failed dump (500).
                TakeError::Backend(error)
                    if matches!(
                        (&error as &dyn std::error::Error).downcast_ref::<RuncError>(),
                        Some(RuncError::NoContainer { .. })
                    ) =>
                {
                    CheckpointerError::NoWorkload {
                        pod: subject.pod.to_string(),
                        container: subject.container.clone(),
                        reason: error.to_string(),
                    }
                }
                TakeError::Backend(error) => CheckpointerError::Backend {
                    backend: self.backend.kind(),
                    message: error.to_string(),
                },
                TakeError::Join(error) => CheckpointerError::Join(error.to_string()),
            })
        })
    }
}

/// A runc container id made from the pod's names: `{namespace}`, `{pod}` and `{container}`
/// are replaced.
#[derive(Debug, Clone)]
pub struct RuncIdTemplate(pub String);

impl RuncIdTemplate {
    pub fn id_for(&self, subject: &Subject) -> String {
        self.0
            .replace("{namespace}", &subject.pod.namespace)
            .replace("{pod}", &subject.pod.name)
            .replace("{container}", &subject.container)
    }
}

impl Resolve<RuncContainer> for RuncIdTemplate {
    fn resolve(&self, subject: &Subject) -> Result<RuncContainer, String> {
        Ok(RuncContainer {
            id: self.id_for(subject),
        })
    }
}

/// The registry of workloads started outside a container runtime (see the module header).
#[derive(Debug, Clone)]
pub struct WorkloadsDir(pub PathBuf);

/// File holding the pid, in a workload's directory.
pub const PID_FILE: &str = "pid";
/// Directory an application-mode program saves into.
pub const SAVE_DIR: &str = "save";
/// Optional file naming an HTTP hook (`host:port/path`) for application mode.
pub const HOOK_FILE: &str = "hook";

impl WorkloadsDir {
    /// `<dir>/<namespace>/<pod>/<container>` (names were validated by the API).
    pub fn dir_of(&self, subject: &Subject) -> PathBuf {
        self.0
            .join(&subject.pod.namespace)
            .join(&subject.pod.name)
            .join(&subject.container)
    }

    pub fn pid_of(&self, subject: &Subject) -> Result<i32, String> {
        let path = self.dir_of(subject).join(PID_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|error| format!("reading {}: {error}", path.display()))?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| format!("{} does not hold a pid: {:?}", path.display(), text.trim()))?;
        if pid <= 1 {
            return Err(format!(
                "{} holds pid {pid}, which cannot be dumped",
                path.display()
            ));
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!(
                "process {pid} (from {}) is not running",
                path.display()
            ));
        }
        Ok(pid)
    }
}

impl Resolve<ProcessWorkload> for WorkloadsDir {
    fn resolve(&self, subject: &Subject) -> Result<ProcessWorkload, String> {
        Ok(ProcessWorkload {
            pid: self.pid_of(subject)?,
        })
    }
}

impl Resolve<AppWorkload> for WorkloadsDir {
    fn resolve(&self, subject: &Subject) -> Result<AppWorkload, String> {
        let pid = self.pid_of(subject)?;
        let dir = self.dir_of(subject);
        let save_dir = dir.join(SAVE_DIR);
        if !save_dir.is_dir() {
            return Err(format!("{} is not a directory", save_dir.display()));
        }
        let hook = dir.join(HOOK_FILE);
        let trigger = match std::fs::read_to_string(&hook) {
            Ok(text) => {
                parse_hook(text.trim()).map_err(|reason| format!("{}: {reason}", hook.display()))?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Trigger::Signal(nix::sys::signal::Signal::SIGUSR1)
            }
            Err(error) => return Err(format!("reading {}: {error}", hook.display())),
        };
        Ok(AppWorkload {
            pid,
            save_dir,
            trigger,
        })
    }
}

/// `127.0.0.1:8080/checkpoint` → an HTTP POST trigger.
fn parse_hook(text: &str) -> Result<Trigger, String> {
    let (address, path) = match text.find('/') {
        Some(slash) => (&text[..slash], &text[slash..]),
        None => (text, "/"),
    };
    let address = address
        .parse()
        .map_err(|_| format!("`{address}` is not an ip:port"))?;
    Ok(Trigger::HttpPost {
        address,
        path: path.to_string(),
    })
}

/// The kubelet backend's resolver: the pod container is the workload.
pub fn pod_container(subject: &Subject) -> Result<PodContainer, String> {
    Ok(PodContainer {
        namespace: subject.pod.namespace.clone(),
        pod: subject.pod.name.clone(),
        container: subject.container.clone(),
    })
}

/// A runc backend resolving containers by id template.
pub fn runc<R: CommandRunner + 'static>(
    backend: RuncBackend<R>,
    template: RuncIdTemplate,
) -> Arc<dyn Checkpointer> {
    Arc::new(BackendCheckpointer::new(backend, template))
}

/// A CRIU process backend resolving pids from the workloads directory.
pub fn process<R: CommandRunner + 'static>(
    backend: ProcessBackend<R>,
    workloads: WorkloadsDir,
) -> Arc<dyn Checkpointer> {
    Arc::new(BackendCheckpointer::new(backend, workloads))
}

/// An application-mode backend resolving programs from the workloads directory.
pub fn application(backend: ApplicationBackend, workloads: WorkloadsDir) -> Arc<dyn Checkpointer> {
    Arc::new(BackendCheckpointer::new(backend, workloads))
}

/// A kubelet backend.
pub fn kubelet<T: ApiTransport + 'static>(backend: KubeletBackend<T>) -> Arc<dyn Checkpointer> {
    Arc::new(BackendCheckpointer::new(
        backend,
        pod_container as fn(&Subject) -> Result<PodContainer, String>,
    ))
}

/// Test doubles.
pub mod testing {
    use std::sync::Mutex;
    use std::time::Duration;

    use automigrate_checkpoint::criu::DumpStats;
    use automigrate_checkpoint::manifest::{CONFIG_DUMP_FILE, CRIU_IMAGES_DIR};
    use automigrate_checkpoint::{
        BackendKind, Capabilities, CheckpointBackend, CheckpointOutcome, CheckpointRequest, Freeze,
        FreezeSource, VerifiedCheckpoint,
    };

    use super::*;

    /// What [`FakeBackend`] was asked to do.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FakeCall {
        pub workload: String,
        pub kind: DumpKind,
        pub parent: Option<String>,
    }

    /// A backend that "dumps" by writing synthetic CRIU-like images (`checkpoint/pages-1.img`
    /// of `image_bytes` bytes derived from the workload name and call number, an inventory and
    /// a `config.dump`), reports a fixed freeze, and records every call. Workloads are names;
    /// a name in `failing` makes the dump fail. For tests and demos only: nothing is frozen.
    #[derive(Debug)]
    pub struct FakeBackend {
        image_bytes: usize,
        freeze: Duration,
        incremental: bool,
        failing: Vec<String>,
        delay: Duration,
        gate: Option<Arc<tokio::sync::Semaphore>>,
        calls: Mutex<Vec<FakeCall>>,
    }

    impl Default for FakeBackend {
        fn default() -> Self {
            Self {
                image_bytes: 64 * 1024,
                freeze: Duration::from_millis(7),
                incremental: true,
                failing: Vec::new(),
                delay: Duration::ZERO,
                gate: None,
                calls: Mutex::new(Vec::new()),
            }
        }
    }

    impl FakeBackend {
        /// Bytes of the synthetic `pages-1.img` (64 KiB by default).
        pub fn with_image_bytes(mut self, bytes: usize) -> Self {
            self.image_bytes = bytes;
            self
        }

        /// Workloads (`<namespace>/<pod>/<container>`) whose dump fails.
        pub fn with_failing(mut self, workloads: Vec<String>) -> Self {
            self.failing = workloads;
            self
        }

        /// How long each dump takes (to test overlapping requests and shutdown).
        pub fn with_delay(mut self, delay: Duration) -> Self {
            self.delay = delay;
            self
        }

        /// Each dump waits for a permit of `gate` after it was recorded (permits are given
        /// back), so a test decides exactly when dumps finish.
        pub fn with_gate(mut self, gate: Arc<tokio::sync::Semaphore>) -> Self {
            self.gate = Some(gate);
            self
        }

        /// Whether it claims incremental dumps (default: yes).
        pub fn with_incremental(mut self, incremental: bool) -> Self {
            self.incremental = incremental;
            self
        }

        pub fn calls(&self) -> Vec<FakeCall> {
            self.calls
                .lock()
                .map(|calls| calls.clone())
                .unwrap_or_default()
        }
    }

    #[derive(Debug, thiserror::Error)]
    pub enum FakeError {
        #[error("fake dump of `{0}` failed as configured")]
        Configured(String),
        #[error("{0}")]
        Io(#[from] std::io::Error),
        #[error("the fake backend cannot restore")]
        NoRestore,
    }

    impl CheckpointBackend for FakeBackend {
        type Workload = String;
        type RestoreTarget = ();
        type Restored = ();
        type Error = FakeError;

        fn kind(&self) -> BackendKind {
            BackendKind::CriuProcess
        }

        async fn capabilities(&self) -> Result<Capabilities, FakeError> {
            Ok(Capabilities {
                restore: false,
                incremental: self.incremental,
                notes: vec!["fake backend: synthetic images".to_string()],
            })
        }

        async fn checkpoint(
            &self,
            workload: &String,
            request: &CheckpointRequest,
            archive_dir: &Path,
        ) -> Result<CheckpointOutcome, FakeError> {
            let number = {
                let mut calls = self
                    .calls
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?;
                calls.push(FakeCall {
                    workload: workload.clone(),
                    kind: request.kind,
                    parent: request.parent.as_ref().map(|parent| parent.id.clone()),
                });
                calls.len()
            };
            if let Some(gate) = &self.gate {
                drop(
                    gate.acquire()
                        .await
                        .map_err(|_| std::io::Error::other("gate closed"))?,
                );
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.failing.contains(workload) {
                return Err(FakeError::Configured(workload.clone()));
            }
            let images = archive_dir.join(CRIU_IMAGES_DIR);
            std::fs::create_dir_all(&images)?;
            let seed = blake3::hash(format!("{workload}/{number}").as_bytes());
            let mut pages = Vec::with_capacity(self.image_bytes);
            let mut reader = blake3::Hasher::new_keyed(seed.as_bytes()).finalize_xof();
            pages.resize(self.image_bytes, 0);
            reader.fill(&mut pages);
            std::fs::write(images.join("pages-1.img"), pages)?;
            std::fs::write(
                images.join("inventory.img"),
                format!("fake {workload} {number}\n"),
            )?;
            if let Some(parent) = &request.parent {
                std::os::unix::fs::symlink(&parent.relative_images_dir, images.join("parent"))?;
            }
            std::fs::write(
                archive_dir.join(CONFIG_DUMP_FILE),
                format!("{{\"id\":\"{workload}\",\"name\":\"{workload}\"}}"),
            )?;
            Ok(CheckpointOutcome {
                freeze: Some(Freeze::new(self.freeze, FreezeSource::CriuStats)),
                dump_stats: None::<DumpStats>,
                runtime: None,
                criu_version: Some("4.1.1 (fake)".to_string()),
                epoch: None,
                elapsed: self.freeze,
            })
        }

        async fn restore(
            &self,
            _checkpoint: &VerifiedCheckpoint,
            _target: &(),
        ) -> Result<(), FakeError> {
            Err(FakeError::NoRestore)
        }
    }

    /// The fake backend resolving each subject to `<namespace>/<pod>/<container>`.
    pub fn fake(backend: FakeBackend) -> (Arc<dyn Checkpointer>, Arc<FakeBackend>) {
        let backend = Arc::new(backend);
        let shared = SharedFake(backend.clone());
        let resolver = |subject: &Subject| -> Result<String, String> {
            Ok(format!("{}/{}", subject.pod, subject.container))
        };
        (
            Arc::new(BackendCheckpointer::new(shared, resolver)),
            backend,
        )
    }

    /// Lets a test keep a handle on the backend the agent uses.
    #[derive(Debug)]
    struct SharedFake(Arc<FakeBackend>);

    impl CheckpointBackend for SharedFake {
        type Workload = String;
        type RestoreTarget = ();
        type Restored = ();
        type Error = FakeError;

        fn kind(&self) -> BackendKind {
            self.0.kind()
        }

        async fn capabilities(&self) -> Result<Capabilities, FakeError> {
            self.0.capabilities().await
        }

        async fn checkpoint(
            &self,
            workload: &String,
            request: &CheckpointRequest,
            archive_dir: &Path,
        ) -> Result<CheckpointOutcome, FakeError> {
            self.0.checkpoint(workload, request, archive_dir).await
        }

        async fn restore(
            &self,
            checkpoint: &VerifiedCheckpoint,
            target: &(),
        ) -> Result<(), FakeError> {
            self.0.restore(checkpoint, target).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automigrate_core::model::PodRef;

    fn subject() -> Subject {
        Subject {
            pod: PodRef::new("ml", "trainer"),
            container: "main".to_string(),
        }
    }

    #[test]
    fn runc_ids_come_from_the_template() {
        let template = RuncIdTemplate("{namespace}-{pod}-{container}".into());
        assert_eq!(template.id_for(&subject()), "ml-trainer-main");
    }

    #[test]
    fn workloads_are_found_by_pid_file() {
        let root = tempfile::tempdir().unwrap();
        let registry = WorkloadsDir(root.path().to_path_buf());
        let error = Resolve::<ProcessWorkload>::resolve(&registry, &subject()).unwrap_err();
        assert!(error.contains("reading"), "{error}");
        let dir = registry.dir_of(&subject());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(PID_FILE), format!("{}\n", std::process::id())).unwrap();
        let found = Resolve::<ProcessWorkload>::resolve(&registry, &subject()).unwrap();
        assert_eq!(found.pid, std::process::id() as i32);
        std::fs::write(dir.join(PID_FILE), "1").unwrap();
        assert!(Resolve::<ProcessWorkload>::resolve(&registry, &subject()).is_err());
        std::fs::write(dir.join(PID_FILE), "nope").unwrap();
        assert!(Resolve::<ProcessWorkload>::resolve(&registry, &subject()).is_err());
    }

    #[test]
    fn application_workloads_need_a_save_dir_and_may_name_a_hook() {
        let root = tempfile::tempdir().unwrap();
        let registry = WorkloadsDir(root.path().to_path_buf());
        let dir = registry.dir_of(&subject());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(PID_FILE), std::process::id().to_string()).unwrap();
        assert!(Resolve::<AppWorkload>::resolve(&registry, &subject()).is_err());
        std::fs::create_dir(dir.join(SAVE_DIR)).unwrap();
        let found = Resolve::<AppWorkload>::resolve(&registry, &subject()).unwrap();
        assert_eq!(
            found.trigger,
            Trigger::Signal(nix::sys::signal::Signal::SIGUSR1)
        );
        std::fs::write(dir.join(HOOK_FILE), "127.0.0.1:8080/save\n").unwrap();
        let found = Resolve::<AppWorkload>::resolve(&registry, &subject()).unwrap();
        assert_eq!(
            found.trigger,
            Trigger::HttpPost {
                address: "127.0.0.1:8080".parse().unwrap(),
                path: "/save".into()
            }
        );
        std::fs::write(dir.join(HOOK_FILE), "not an address").unwrap();
        assert!(Resolve::<AppWorkload>::resolve(&registry, &subject()).is_err());
    }
}
