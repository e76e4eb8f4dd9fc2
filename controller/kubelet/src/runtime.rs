//! The container runtime: a pod's container becomes an OCI bundle and a `runc run` that this
//! kubelet waits on, the way conmon waits on a CRI-O container, so the container's exit code is
//! known when it ends.
//!
//! There is no registry: every image reference resolves to the host's root filesystem, bound
//! read-only (`/usr`, `/etc`, and `/lib`, `/lib64`, `/bin`, `/sbin` as the host has them), which
//! is [`automigrate_checkpoint::bundle`]'s layout, the one the embedded demo runs. The container's
//! stdio is `/dev/null` (CRIU cannot dump host files outside the container's mounts).
//! Volumes: `hostPath` and `emptyDir` (a directory under the pod's directory), bound at their
//! `mountPath`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use automigrate_checkpoint::archive;
use automigrate_checkpoint::bundle::{Bundle, BundleError, BundleSpec};
use automigrate_checkpoint::command::SystemRunner;
use automigrate_checkpoint::criu;
use automigrate_checkpoint::manifest::SPEC_DUMP_FILE;
use automigrate_checkpoint::runc::{RuncBackend, RuncError};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Runc(#[from] RuncError),
    #[error("container {container}: {reason}")]
    Config { container: String, reason: String },
    #[error("`runc run {id}` ended before the container ran (exit code {exit_code:?}): {detail}")]
    StartFailed {
        id: String,
        exit_code: Option<i32>,
        detail: String,
    },
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    #[error(transparent)]
    Archive(#[from] automigrate_checkpoint::archive::ArchiveError),
    #[error("container {id} did not start within {after:?}")]
    StartTimedOut { id: String, after: Duration },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where this kubelet keeps things, all under its root directory, and where `hostPath`
/// volumes are on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
    /// `hostPath` prefixes that are elsewhere on this host (see [`Layout::host_path`]).
    host_path_map: Vec<(PathBuf, PathBuf)>,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            host_path_map: Vec::new(),
        }
    }

    /// Resolves `hostPath` volumes under each `from` to the same relative path under its `to`
    /// (the first matching prefix, whole components only). Several local nodes share one host
    /// file system; mapping e.g. `/var/lib/automigrate` to each node's own directory gives
    /// every node its own `/var/lib/automigrate`, as separate machines have, so a pod moved to
    /// another node finds that node's files under the same path in its spec.
    pub fn with_host_path_map(mut self, map: Vec<(PathBuf, PathBuf)>) -> Self {
        self.host_path_map = map;
        self
    }

    /// Where a pod's `hostPath` is on this host.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        self.host_path_map
            .iter()
            .find_map(|(from, to)| {
                path.strip_prefix(from).ok().map(|rest| {
                    if rest.as_os_str().is_empty() {
                        to.clone()
                    } else {
                        to.join(rest)
                    }
                })
            })
            .unwrap_or_else(|| path.to_path_buf())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// runc's state directory (`runc --root`): one per node, so nodes never see each other's
    /// containers.
    pub fn runc_root(&self) -> PathBuf {
        self.root.join("runc")
    }

    /// The cgroup every container of this node goes under (`cgroupsPath` `<parent>/<id>`):
    /// named after the root directory, so two kubelets on one host (the local cluster's nodes,
    /// or two local clusters) never share a container's cgroup. runc's default, the id alone,
    /// put same-named containers of different nodes in one cgroup, where one node's
    /// `runc kill --all` or checkpoint freeze hit the other's processes.
    pub fn cgroup_parent(&self) -> String {
        // FNV-1a: stable across builds, so a restarted kubelet names the same parent.
        let hash = self
            .root
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("/automigrate-kubelet-{hash:016x}")
    }

    /// The cgroup of container `id` (see [`Layout::cgroup_parent`]).
    pub fn cgroups_path(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent())
    }

    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root.join("pods").join(uid)
    }

    pub fn container_dir(&self, uid: &str, container: &str) -> PathBuf {
        self.pod_dir(uid).join("containers").join(container)
    }

    pub fn empty_dir(&self, uid: &str, volume: &str) -> PathBuf {
        self.pod_dir(uid).join("volumes/empty-dir").join(volume)
    }

    /// The node's image store (see [`crate::images`]).
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where checkpoint archives go (the real kubelet's `<root-dir>/checkpoints`).
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
}

/// The runc container id of a pod's container: unique per pod incarnation (the uid) so a pod
/// recreated under the same name never collides with a container still being stopped.
pub fn container_id(pod: &Pod, container: &str) -> String {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or("");
    let uid = pod.metadata.uid.as_deref().unwrap_or("");
    let short: String = uid
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    format!("{namespace}_{name}_{container}_{short}")
}

/// What it takes to start one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub id: String,
    pub dir: PathBuf,
    pub spec: BundleSpec,
    /// Container paths bound read-only (`volumeMounts[].readOnly`).
    pub read_only: Vec<String>,
    pub host_network: bool,
    /// `hostPID`: the container stays in the host's PID namespace (the agent, whose self-fence
    /// `runc kill` signals containers by their host pid).
    pub host_pid: bool,
}

/// Translates a pod's container into a [`Launch`]; the image only names the (host) root
/// filesystem, so the command must be given.
pub fn launch_for(
    layout: &Layout,
    pod: &Pod,
    container: &Container,
) -> Result<Launch, RuntimeError> {
    let config = |reason: String| RuntimeError::Config {
        container: container.name.clone(),
        reason,
    };
    let uid = pod
        .metadata
        .uid
        .as_deref()
        .ok_or_else(|| config("the pod has no uid".into()))?;
    let spec_of_pod = pod
        .spec
        .as_ref()
        .ok_or_else(|| config("the pod has no spec".into()))?;
    let args: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .cloned()
        .collect();
    let mut spec = BundleSpec::new(args);
    spec.hostname = pod.metadata.name.clone().unwrap_or_default();
    if let Some(dir) = &container.working_dir {
        spec = spec.cwd(dir.clone());
    }
    for variable in container.env.iter().flatten() {
        spec = spec.env(format!(
            "{}={}",
            variable.name,
            variable.value.clone().unwrap_or_default()
        ));
    }
    let volumes: BTreeMap<&str, _> = spec_of_pod
        .volumes
        .iter()
        .flatten()
        .map(|volume| (volume.name.as_str(), volume))
        .collect();
    let mut read_only = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = volumes
            .get(mount.name.as_str())
            .ok_or_else(|| config(format!("volume `{}` is not declared", mount.name)))?;
        let host = if let Some(host_path) = &volume.host_path {
            layout.host_path(Path::new(&host_path.path))
        } else if volume.empty_dir.is_some() {
            layout.empty_dir(uid, &volume.name)
        } else {
            return Err(config(format!(
                "volume `{}`: only hostPath and emptyDir volumes are supported here",
                volume.name
            )));
        };
        std::fs::create_dir_all(&host).map_err(io_error(&host))?;
        if mount.read_only == Some(true) {
            read_only.push(mount.mount_path.clone());
        }
        spec = spec.writable(host, mount.mount_path.clone());
    }
    Ok(Launch {
        id: container_id(pod, &container.name),
        dir: layout.container_dir(uid, &container.name),
        spec,
        read_only,
        host_network: spec_of_pod.host_network == Some(true),
        host_pid: spec_of_pod.host_pid == Some(true),
    })
}

/// A container `runc run` is running; `exit` turns `Some(code)` when it ends (a signal `n`
/// reads `128 + n`, as the runtimes report it).
#[derive(Debug, Clone)]
pub struct Running {
    pub id: String,
    pub started_at: Timestamp,
    pub exit: watch::Receiver<Option<i32>>,
}

#[derive(Debug)]
pub struct Runtime {
    layout: Layout,
    runc_program: String,
    runc: RuncBackend<SystemRunner>,
    start_timeout: Duration,
}

impl Runtime {
    pub fn new(layout: Layout, runc_program: impl Into<String>) -> Self {
        let runc_program = runc_program.into();
        let runc = RuncBackend::new(SystemRunner, runc_program.clone(), "criu")
            .with_root(layout.runc_root());
        Self {
            layout,
            runc_program,
            runc,
            start_timeout: Duration::from_secs(60),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn runc(&self) -> &RuncBackend<SystemRunner> {
        &self.runc
    }

    /// `runc --version`'s version as nodeInfo's `containerRuntimeVersion` (`runc://1.1.5`).
    pub async fn version(&self) -> String {
        let output = tokio::process::Command::new(&self.runc_program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .await;
        output
            .ok()
            .and_then(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .find_map(|line| line.strip_prefix("runc version "))
                    .map(|version| format!("runc://{}", version.trim()))
            })
            .unwrap_or_else(|| "runc://unknown".to_string())
    }

    fn write_bundle(&self, launch: &Launch) -> Result<Bundle, RuntimeError> {
        let bundle_dir = launch.dir.join("bundle");
        if bundle_dir.exists() {
            std::fs::remove_dir_all(&bundle_dir).map_err(io_error(&bundle_dir))?;
        }
        let bundle = Bundle::create(&bundle_dir, &launch.spec)?;
        let path = bundle.config_path();
        let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
        let bad = |reason: String| RuntimeError::Config {
            container: launch.id.clone(),
            reason,
        };
        let mut config: serde_json::Value =
            serde_json::from_str(&text).map_err(|error| bad(error.to_string()))?;
        if let Some(linux) = config
            .get_mut("linux")
            .and_then(serde_json::Value::as_object_mut)
        {
            linux.insert(
                "cgroupsPath".into(),
                self.layout.cgroups_path(&launch.id).into(),
            );
        }
        if let Some(namespaces) = config
            .pointer_mut("/linux/namespaces")
            .and_then(serde_json::Value::as_array_mut)
        {
            namespaces.retain(|namespace| {
                !(launch.host_network && namespace["type"] == "network"
                    || launch.host_pid && namespace["type"] == "pid")
            });
        }
        if let Some(mounts) = config
            .get_mut("mounts")
            .and_then(serde_json::Value::as_array_mut)
        {
            for mount in mounts.iter_mut().filter(|mount| {
                launch
                    .read_only
                    .iter()
                    .any(|path| mount["destination"] == path.as_str())
            }) {
                if let Some(options) = mount
                    .get_mut("options")
                    .and_then(serde_json::Value::as_array_mut)
                {
                    for option in options.iter_mut().filter(|option| *option == "rw") {
                        *option = "ro".into();
                    }
                }
            }
        }
        let text = serde_json::to_string_pretty(&config).map_err(|error| bad(error.to_string()))?;
        std::fs::write(&path, text).map_err(io_error(&path))?;
        Ok(bundle)
    }

    /// Starts the container and returns once runc reports it running.
    #[tracing::instrument(skip_all, fields(id = %launch.id))]
    pub async fn start(&self, launch: &Launch) -> Result<Running, RuntimeError> {
        if launch.spec.args.is_empty() {
            return Err(RuntimeError::Config {
                container: launch.id.clone(),
                reason: "no `command`: images resolve to the host's root filesystem, which has \
                         no entrypoint"
                    .into(),
            });
        }
        std::fs::create_dir_all(&launch.dir).map_err(io_error(&launch.dir))?;
        let bundle = self.write_bundle(launch)?;
        let log = launch.dir.join("runc.log");
        let args = vec![
            "run".into(),
            "--bundle".into(),
            bundle.dir().as_os_str().to_owned(),
            launch.id.clone().into(),
        ];
        self.run_until_running(&launch.id, &log, args, &log).await
    }

    /// Restores the container from a checkpoint image instead of starting it fresh, as CRI-O
    /// and containerd do for a checkpoint image: the archive (the image's one layer) is
    /// unpacked and verified, the bundle's `config.json` is the dumped `spec.dump` with its
    /// bind mounts pointed at this pod's volumes, and `runc restore` runs in the foreground so
    /// the exit code is known, like `runc run` in [`Runtime::start`].
    #[tracing::instrument(skip_all, fields(id = %launch.id, image = %image.dir.display()))]
    pub async fn restore(
        &self,
        launch: &Launch,
        image: &automigrate_agent::image::ImageLayout,
    ) -> Result<Running, RuntimeError> {
        std::fs::create_dir_all(&launch.dir).map_err(io_error(&launch.dir))?;
        let layer = automigrate_agent::image::blob_path(&image.dir, &image.layer_digest)
            .ok_or_else(|| RuntimeError::Config {
                container: launch.id.clone(),
                reason: format!("bad layer digest {}", image.layer_digest),
            })?;
        let unpacked = launch.dir.join("checkpoint");
        if unpacked.exists() {
            std::fs::remove_dir_all(&unpacked).map_err(io_error(&unpacked))?;
        }
        let dest = unpacked.clone();
        let verified = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&layer).map_err(io_error(&layer))?;
            archive::import_tar(std::io::BufReader::new(file), &dest)?;
            Ok::<_, RuntimeError>(archive::verify_chain(&dest)?)
        })
        .await
        .map_err(|error| RuntimeError::Config {
            container: launch.id.clone(),
            reason: format!("unpacking the checkpoint: {error}"),
        })??;
        // The process comes from the checkpoint; the pod's command (often the original one)
        // only has to make a valid bundle, which the dumped spec then replaces.
        let mut bundle_launch = launch.clone();
        if bundle_launch.spec.args.is_empty() {
            bundle_launch.spec.args = vec!["/bin/true".into()];
        }
        let bundle = self.write_bundle(&bundle_launch)?;
        restore_config(
            &bundle.config_path(),
            &unpacked.join(SPEC_DUMP_FILE),
            launch,
            &self.layout.cgroups_path(&launch.id),
        )?;
        let work = launch.dir.join("restore");
        std::fs::create_dir_all(&work).map_err(io_error(&work))?;
        let images = criu::restore_view(&verified, &work).map_err(RuncError::from)?;
        let log = launch.dir.join("runc.log");
        let args = vec![
            "restore".into(),
            "--image-path".into(),
            images.into_os_string(),
            "--work-path".into(),
            work.clone().into_os_string(),
            "--bundle".into(),
            bundle.dir().as_os_str().to_owned(),
            launch.id.clone().into(),
        ];
        self.run_until_running(&launch.id, &log, args, &work.join("restore.log"))
            .await
    }

    /// Spawns `runc --root <root> --log <log> <args>` in the foreground and returns once runc
    /// reports the container running; a task then waits for its exit code.
    async fn run_until_running(
        &self,
        id: &str,
        log: &Path,
        args: Vec<std::ffi::OsString>,
        detail_log: &Path,
    ) -> Result<Running, RuntimeError> {
        let runc_root = self.layout.runc_root();
        let exit_file = exit_file(log);
        // A fresh log per attempt: an error line in it is how a failed start is told apart
        // from a container that ran and ended before it was seen running.
        if let Err(error) = std::fs::remove_file(log)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            return Err(io_error(log)(error));
        }
        // conmon's job, in one line of shell: runc's exit code (the container's) lands in a
        // file, so a kubelet that restarted while the container ran still learns it.
        let mut child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(EXIT_CODE_WRAPPER)
            .arg(&exit_file)
            .arg(&self.runc_program)
            .arg("--root")
            .arg(&runc_root)
            .arg("--log")
            .arg(log)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // The container outlives this kubelet (as it outlives a restarted CRI-O).
            .kill_on_drop(false)
            .spawn()
            .map_err(io_error(Path::new(&self.runc_program)))?;
        let deadline = tokio::time::Instant::now() + self.start_timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(io_error(log))? {
                if !runc_reported_error(log) {
                    // It ran, and ended between two looks: its exit code is the container's.
                    let (_, exit) = watch::channel(Some(exit_code(status)));
                    return Ok(Running {
                        id: id.to_string(),
                        started_at: Timestamp::now(),
                        exit,
                    });
                }
                return Err(RuntimeError::StartFailed {
                    id: id.to_string(),
                    exit_code: status.code(),
                    detail: format!(
                        "{}\n{}",
                        criu::log_tail(log, 10),
                        criu::log_tail(detail_log, 15)
                    ),
                });
            }
            if let Ok(state) = self.runc.state(id).await
                && state.status == "running"
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = self.runc.delete(id).await;
                return Err(RuntimeError::StartTimedOut {
                    id: id.to_string(),
                    after: self.start_timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (sender, exit) = watch::channel(None);
        let task_id = id.to_string();
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => exit_code(status),
                Err(error) => {
                    tracing::warn!(id = %task_id, %error, "lost the container's runc process");
                    255
                }
            };
            tracing::info!(id = %task_id, code, "container exited");
            let _ = sender.send(Some(code));
        });
        Ok(Running {
            id: id.to_string(),
            started_at: Timestamp::now(),
            exit,
        })
    }

    /// Takes over a container a previous kubelet process started (it is still running under
    /// the same id); its exit code comes from the exit file. A stopped leftover is deleted and
    /// `None` returned, so the caller starts it afresh.
    pub async fn adopt(&self, launch: &Launch) -> Option<Running> {
        let state = self.runc.state(&launch.id).await.ok()?;
        if state.status == "stopped" {
            if let Err(error) = self.runc.delete(&launch.id).await {
                tracing::warn!(id = %launch.id, %error, "stale container not deleted");
            }
            return None;
        }
        tracing::info!(id = %launch.id, status = %state.status, "adopting a running container");
        let (sender, exit) = watch::channel(None);
        let exit_path = exit_file(&launch.dir.join("runc.log"));
        let runc = RuncBackend::new(SystemRunner, self.runc_program.clone(), "criu")
            .with_root(self.layout.runc_root());
        let id = launch.id.clone();
        tokio::spawn(async move {
            let mut gone_since: Option<tokio::time::Instant> = None;
            let code = loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some(code) = read_exit_file(&exit_path) {
                    break code;
                }
                if runc.state(&id).await.is_ok() {
                    continue;
                }
                // runc removes its state just before it exits; the wrapper writes right after.
                let since = *gone_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(%id, "adopted container ended without an exit code");
                    break 255;
                }
            };
            tracing::info!(%id, code, "adopted container exited");
            let _ = sender.send(Some(code));
        });
        Some(Running {
            id: launch.id.clone(),
            started_at: state.created,
            exit,
        })
    }

    /// Stops a container as the runtime's StopContainer does: SIGTERM, up to `grace` for it to
    /// end, then SIGKILL; returns its exit code.
    #[tracing::instrument(skip_all, fields(id = %running.id, grace = ?grace))]
    pub async fn stop(&self, running: &Running, grace: Duration) -> i32 {
        let mut exit = running.exit.clone();
        if let Some(code) = *exit.borrow() {
            return code;
        }
        if !grace.is_zero() {
            if let Err(error) = self.runc.kill(&running.id, "TERM").await {
                tracing::debug!(%error, "SIGTERM not delivered (container ending?)");
            }
            if let Ok(Some(code)) = tokio::time::timeout(grace, wait_exit(&mut exit)).await {
                return code;
            }
        }
        if let Err(error) = self.runc.kill(&running.id, "KILL").await {
            tracing::debug!(%error, "SIGKILL not delivered (container ending?)");
        }
        let code = match tokio::time::timeout(Duration::from_secs(30), wait_exit(&mut exit)).await {
            Ok(Some(code)) => code,
            _ => {
                tracing::warn!("container did not end after SIGKILL; deleting it");
                137
            }
        };
        if let Err(error) = self.runc.delete(&running.id).await {
            tracing::warn!(%error, "runc delete failed");
        }
        code
    }

    /// Removes the pod's directory (bundles, logs, emptyDir volumes) once its containers are gone.
    pub fn remove_pod_dir(&self, uid: &str) {
        let dir = self.layout.pod_dir(uid);
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), %error, "pod directory not removed");
        }
    }
}

/// Waits for a container's exit code (`None`: its watcher ended without one).
pub async fn wait_exit(exit: &mut watch::Receiver<Option<i32>>) -> Option<i32> {
    match exit.wait_for(Option::is_some).await {
        Ok(code) => *code,
        Err(_) => None,
    }
}

/// Writes the restore bundle's `config.json`: the dumped spec, with each bind mount whose
/// destination this pod also mounts taking this pod's source (a new pod's emptyDir lives under
/// its own uid), and the root file system this bundle provides.
fn restore_config(
    config_path: &Path,
    spec_dump: &Path,
    launch: &Launch,
    cgroups_path: &str,
) -> Result<(), RuntimeError> {
    let bad = |reason: String| RuntimeError::Config {
        container: launch.id.clone(),
        reason,
    };
    let text = std::fs::read_to_string(spec_dump).map_err(io_error(spec_dump))?;
    let mut spec: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| bad(format!("spec.dump: {error}")))?;
    if let Some(mounts) = spec
        .get_mut("mounts")
        .and_then(serde_json::Value::as_array_mut)
    {
        for mount in mounts.iter_mut() {
            let Some(bind) = launch
                .spec
                .writable
                .iter()
                .find(|bind| mount["destination"] == bind.container.as_str())
            else {
                continue;
            };
            mount["source"] = bind.host.display().to_string().into();
        }
    }
    spec["root"] = serde_json::json!({"path": "rootfs", "readonly": true});
    // This node's cgroup, not the source's (see `Layout::cgroup_parent`).
    if let Some(linux) = spec
        .get_mut("linux")
        .and_then(serde_json::Value::as_object_mut)
    {
        linux.insert("cgroupsPath".into(), cgroups_path.into());
    }
    let text = serde_json::to_string_pretty(&spec).map_err(|error| bad(error.to_string()))?;
    std::fs::write(config_path, text).map_err(io_error(config_path))
}

/// `sh -c` script: `$0` is the exit file, `$@` the runc command line.
const EXIT_CODE_WRAPPER: &str =
    r#"rm -f "$0"; "$@"; code=$?; echo "$code" > "$0.tmp" && mv "$0.tmp" "$0"; exit "$code""#;

fn exit_file(log: &Path) -> PathBuf {
    log.with_file_name("exit-code")
}

/// Whether runc logged an error (its `--log` holds only warnings and errors of runc itself,
/// never the container's output).
fn runc_reported_error(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|text| {
        text.lines()
            .any(|line| line.contains("level=error") || line.contains("\"level\":\"error\""))
    })
}

fn read_exit_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(255)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn pod_with_host_paths(paths: &[(&str, &str)]) -> Pod {
        let volumes: Vec<serde_json::Value> = paths
            .iter()
            .enumerate()
            .map(|(i, (host, _))| serde_json::json!({"name": format!("v{i}"), "hostPath": {"path": host}}))
            .collect();
        let mounts: Vec<serde_json::Value> = paths
            .iter()
            .enumerate()
            .map(|(i, (_, at))| serde_json::json!({"name": format!("v{i}"), "mountPath": at}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ml", "uid": "0123456789"},
            "spec": {
                "volumes": volumes,
                "containers": [{"name": "c", "command": ["true"], "volumeMounts": mounts}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn host_paths_under_a_mapped_prefix_are_bound_from_the_nodes_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("node-b");
        let prefix = dir.path().join("var/lib/automigrate");
        let layout = Layout::new(dir.path().join("kubelet"))
            .with_host_path_map(vec![(prefix.clone(), node.clone())]);
        let text = |path: &Path| path.to_str().unwrap().to_string();
        let dataset = text(&prefix.join("data/clusters"));
        let whole = text(&prefix);
        // Not under the prefix: a sibling whose name only starts the same way.
        let sibling = dir.path().join("var/lib/automigrate-other");
        let shared = dir.path().join("shared");
        let (sibling_text, shared_text) = (text(&sibling), text(&shared));
        let pod = pod_with_host_paths(&[
            (&dataset, "/data"),
            (&whole, "/all"),
            (&sibling_text, "/other"),
            (&shared_text, "/shared"),
        ]);
        let container = pod.spec.as_ref().unwrap().containers[0].clone();
        let launch = launch_for(&layout, &pod, &container).unwrap();
        let binds: Vec<(PathBuf, String)> = launch
            .spec
            .writable
            .iter()
            .map(|bind| (bind.host.clone(), bind.container.clone()))
            .collect();
        assert_eq!(
            binds,
            [
                (node.join("data/clusters"), "/data".to_string()),
                (node.clone(), "/all".to_string()),
                (sibling, "/other".to_string()),
                (shared, "/shared".to_string()),
            ]
        );
        assert!(!prefix.exists(), "the mapped prefix itself was created");
    }

    /// The namespaces of the bundle the runtime writes for a pod with these host settings.
    fn bundle_namespaces(host_network: bool, host_pid: bool) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        bundle_config(&dir.path().join("kubelet"), host_network, host_pid)["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|namespace| namespace["type"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn same_named_containers_of_two_kubelets_get_separate_cgroups() {
        let dir = tempfile::tempdir().unwrap();
        let path = |node: &str| {
            bundle_config(&dir.path().join(node).join("kubelet"), false, false)["linux"]
                ["cgroupsPath"]
                .as_str()
                .map(str::to_string)
        };
        let (a, b) = (path("node-a").unwrap(), path("node-b").unwrap());
        assert_ne!(a, b, "one cgroup for two nodes' containers");
        assert!(
            a.starts_with("/automigrate-kubelet-") && a.ends_with("/ml_p_c_01234567"),
            "{a}"
        );
        assert_eq!(
            path("node-a").unwrap(),
            a,
            "the same node names the same cgroup"
        );
    }

    /// The `config.json` the runtime writes for a pod of a kubelet rooted at `root`.
    fn bundle_config(root: &Path, host_network: bool, host_pid: bool) -> serde_json::Value {
        let layout = Layout::new(root);
        let mut pod = pod_with_host_paths(&[]);
        let spec = pod.spec.as_mut().unwrap();
        spec.host_network = Some(host_network);
        spec.host_pid = Some(host_pid);
        let container = spec.containers[0].clone();
        let launch = launch_for(&layout, &pod, &container).unwrap();
        assert_eq!(
            (launch.host_network, launch.host_pid),
            (host_network, host_pid)
        );
        std::fs::create_dir_all(&launch.dir).unwrap();
        let bundle = Runtime::new(layout, "runc").write_bundle(&launch).unwrap();
        serde_json::from_str(&std::fs::read_to_string(bundle.config_path()).unwrap()).unwrap()
    }

    #[test]
    fn host_pid_and_host_network_keep_the_container_in_the_hosts_namespaces() {
        let own = bundle_namespaces(false, false);
        assert!(own.contains(&"pid".to_string()), "{own:?}");
        assert!(own.contains(&"network".to_string()), "{own:?}");
        let host_pid = bundle_namespaces(false, true);
        assert!(!host_pid.contains(&"pid".to_string()), "{host_pid:?}");
        assert!(host_pid.contains(&"network".to_string()), "{host_pid:?}");
        let both = bundle_namespaces(true, true);
        assert!(!both.contains(&"pid".to_string()), "{both:?}");
        assert!(!both.contains(&"network".to_string()), "{both:?}");
        assert!(both.contains(&"mount".to_string()), "{both:?}");
    }
}
