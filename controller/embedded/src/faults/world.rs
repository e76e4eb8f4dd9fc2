//! What the fault kinds share: the view of the world a fault task has (the Migrations the
//! controller writes to the API server, the workload's progress log, the agents' checkpoint
//! stores on disk) and the tools it acts with: `kill -9` and SIGSTOP of processes, power-offs,
//! link cuts, full disks, damaged files, edits of the policy ConfigMap. Nothing here rescues the
//! system under test: an agent killed is started again by its kubelet (its pod's
//! `restartPolicy: Always`), a dead controller replica is replaced by the other one, and what
//! the harness undoes at the end of a run (a frozen agent thawed, ballast removed, a cut link
//! restored) is undone after the run's copies were counted.
//!
//! Data model: a [`FaultContext`] is cheap to clone and shared between the run and its fault
//! task. It holds the cluster, the API reader, the progress log's path, what the fault did so
//! far ([`Injection`]) and the list of things to undo ([`Undo`]).

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_checkpoint::archive;
use automigrate_core::migration::Phase;

use super::api::{ApiReader, MigrationView};
use super::sampler::unix_now;
use super::{Damage, FaultPlan, Injection, Trigger};
use crate::kube::KubeCluster;
use crate::workload;

/// How often the fault task looks at the Migrations: a phase such as Restoring lasts tens of
/// milliseconds.
const POLL: Duration = Duration::from_millis(10);
/// The node the protected pod starts on.
pub const HOME_NODE: &str = "node-a";
/// The namespace and name of the protected pod, and its container.
pub const POD_NAMESPACE: &str = "ml";
pub const POD_NAME: &str = "trainer";
pub const CONTAINER_NAME: &str = "trainer";
/// The condition a degradation sets on the home node, as node-problem-detector reports a hung
/// kernel task (one of the default triggers' conditions; the kubelet keeps conditions it does
/// not own, such as this one, but overwrites DiskPressure with its own view).
pub const DEGRADATION_CONDITION: &str = "KernelDeadlock";

/// Something a fault left that is undone once the run's copies were counted.
#[derive(Debug)]
enum Undo {
    Ballast(PathBuf),
    /// An agent frozen with SIGSTOP (its pid).
    Frozen(i32),
    /// A node cut off from the API server.
    ApiCut(String),
    /// A node cut off from its peers.
    PeerCut(String),
}

#[derive(Debug)]
struct Inner {
    cluster: Arc<KubeCluster>,
    api: ApiReader,
    /// The run's directory: every node's progress log is under it.
    run_dir: PathBuf,
    epochs: u32,
    /// The suite's policy ConfigMap as applied (what an edit starts from).
    policy_file: PathBuf,
    policy: String,
    injection: Mutex<Injection>,
    undo: Mutex<Vec<Undo>>,
}

/// What a fault task works with (see the module header).
#[derive(Debug, Clone)]
pub struct FaultContext {
    inner: Arc<Inner>,
}

/// A stored checkpoint as read from an agent's store on disk (read only: opening the store
/// would clean up what the agent is writing right now).
#[derive(Debug, Clone)]
pub struct StoredOnDisk {
    pub node: String,
    pub id: String,
    pub dir: PathBuf,
    pub created: jiff::Timestamp,
    pub restorable: bool,
}

impl FaultContext {
    pub fn new(
        cluster: Arc<KubeCluster>,
        api: ApiReader,
        run_dir: PathBuf,
        epochs: u32,
        policy_file: PathBuf,
        policy: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cluster,
                api,
                run_dir,
                epochs,
                policy_file,
                policy,
                injection: Mutex::new(Injection::default()),
                undo: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn cluster(&self) -> &Arc<KubeCluster> {
        &self.inner.cluster
    }

    pub fn api(&self) -> &ApiReader {
        &self.inner.api
    }

    pub fn policy_file(&self) -> &Path {
        &self.inner.policy_file
    }

    pub fn policy_name(&self) -> &str {
        &self.inner.policy
    }

    pub fn injection(&self) -> Injection {
        self.inner
            .injection
            .lock()
            .map(|injection| injection.clone())
            .unwrap_or_default()
    }

    fn with_injection(&self, change: impl FnOnce(&mut Injection)) {
        if let Ok(mut injection) = self.inner.injection.lock() {
            change(&mut injection);
        }
    }

    /// Writes a line of what happened.
    pub fn note(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(%line, "fault");
        self.with_injection(|injection| injection.notes.push(line));
    }

    /// Every node's progress log, merged in time order.
    fn progress(&self) -> workload::Progress {
        super::training::merge(&super::progress_logs(
            &self.inner.run_dir,
            self.inner.cluster.nodes(),
        ))
    }

    /// The last epoch any copy of the workload reported.
    pub fn last_epoch(&self) -> Option<u32> {
        self.progress().last_epoch().map(|record| record.epoch)
    }

    /// Records the moment the fault struck, with the phases seen around it.
    pub fn strike(&self, node: &str, phase_before: Option<Phase>) {
        let epoch = self.last_epoch();
        let after = self.latest_migration().and_then(|view| view.phase);
        let listed: Vec<String> = self
            .inner
            .cluster
            .nodes()
            .iter()
            .filter(|other| {
                other.as_str() != HOME_NODE && !self.inner.cluster.is_powered_off(other)
            })
            .flat_map(|other| self.stored(other))
            .filter(|stored| stored.restorable)
            .map(|stored| format!("{} on {}", stored.id, stored.node))
            .collect();
        self.with_injection(|injection| {
            injection.at = Some(unix_now());
            injection.epoch = epoch;
            injection.node = Some(node.to_string());
            injection.phase_before = phase_before;
            injection.phase_after = after;
            injection.checkpoints_at_strike = listed;
        });
    }

    pub fn set_damaged(&self, node: &str, id: &str) {
        self.with_injection(|injection| {
            injection.damaged_checkpoint = Some((node.to_string(), id.to_string()));
        });
    }

    /// Policy edits: what the controller must do with the edit (`applied` or `refused`).
    pub fn expect_policy(&self, expected: &str) {
        self.with_injection(|injection| injection.expected_policy = Some(expected.to_string()));
    }

    /// The checkpoints of the protected pod in a node's store, oldest first.
    pub fn stored(&self, node: &str) -> Vec<StoredOnDisk> {
        let dir = self
            .inner
            .cluster
            .node_dir(node)
            .join("checkpoints")
            .join(POD_NAMESPACE)
            .join(POD_NAME);
        let mut found: Vec<StoredOnDisk> = visible_dirs(&dir)
            .into_iter()
            .filter_map(|dir| {
                let manifest = archive::read_manifest(&dir).ok()?;
                Some(StoredOnDisk {
                    node: node.to_string(),
                    id: manifest.id.clone(),
                    created: manifest.created_at,
                    restorable: manifest.kind.restorable(),
                    dir,
                })
            })
            .collect();
        found.sort_by_key(|stored| stored.created);
        found
    }

    /// Waits until the workload has done `percent` % of its epochs; then, with
    /// `wait_for_standby`, until a node other than the home node holds a restorable checkpoint
    /// taken after the first epoch (so a restore can resume rather than restart). `Err` when
    /// training ended first.
    pub async fn wait_for_percent(
        &self,
        percent: u32,
        wait_for_standby: bool,
    ) -> Result<u32, String> {
        let epoch = epoch_at_percent(self.inner.epochs, percent);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let progress = self.progress();
            if progress.done().is_some() {
                return Err("training ended before the fault's point".into());
            }
            if progress
                .last_epoch()
                .is_some_and(|last| last.epoch >= epoch)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("epoch {epoch} not reached within 120 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if wait_for_standby {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self.standby_after_first_epoch() {
                if self.progress().done().is_some() {
                    return Err("training ended before a standby copy existed".into());
                }
                if Instant::now() > deadline {
                    return Err("no standby copy of a checkpoint after epoch 1 within 60 s".into());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(self.last_epoch().unwrap_or(epoch))
    }

    /// Whether a node other than the home node holds a restorable checkpoint taken after the
    /// first epoch was reported.
    fn standby_after_first_epoch(&self) -> bool {
        let Some(first) = self
            .progress()
            .epochs()
            .find(|record| record.epoch == 1)
            .map(|record| record.at)
        else {
            return false;
        };
        self.inner
            .cluster
            .nodes()
            .iter()
            .filter(|node| node.as_str() != HOME_NODE)
            .flat_map(|node| self.stored(node))
            .any(|stored| {
                stored.restorable && stored.created.as_millisecond() as f64 / 1000.0 > first
            })
    }

    /// Provokes the migration the plan's fault strikes (at its percent of training).
    pub async fn trigger(&self, plan: &FaultPlan) -> Result<(), String> {
        match plan.trigger {
            Trigger::Degradation => {
                let epoch = self.wait_for_percent(plan.percent, false).await?;
                let cluster = Arc::clone(&self.inner.cluster);
                tokio::task::spawn_blocking(move || {
                    cluster.set_node_condition(
                        HOME_NODE,
                        DEGRADATION_CONDITION,
                        "True",
                        "FaultSuite",
                    )
                })
                .await
                .map_err(|error| error.to_string())?
                .map_err(|error| error.to_string())?;
                self.note(format!(
                    "{HOME_NODE} reports {DEGRADATION_CONDITION} (set as node-problem-detector would) at epoch {epoch}"
                ));
            }
            Trigger::NodeFailure => {
                let epoch = self.wait_for_percent(plan.percent, true).await?;
                self.power_off(HOME_NODE).await?;
                self.note(format!("{HOME_NODE} powered off at epoch {epoch}"));
            }
            Trigger::TheFault => {}
        }
        Ok(())
    }

    /// Powers a node off: its kubelet, agent and every container die together and its links
    /// are cut ([`KubeCluster::power_off`]).
    pub async fn power_off(&self, node: &str) -> Result<(), String> {
        let cluster = Arc::clone(&self.inner.cluster);
        let node = node.to_string();
        tokio::task::spawn_blocking(move || cluster.power_off(&node))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())
    }

    /// Cuts a node off from the API server (and the control plane); it lives on, and so does
    /// its workload.
    pub fn cut_from_api(&self, node: &str) -> Result<(), String> {
        self.inner
            .cluster
            .cut_from_api(node)
            .map_err(|error| error.to_string())?;
        self.push_undo(Undo::ApiCut(node.to_string()));
        Ok(())
    }

    /// Cuts a node off from its peers only (it still reaches the API server).
    pub fn cut_from_peers(&self, node: &str) -> Result<(), String> {
        self.inner
            .cluster
            .cut_from_peers(node)
            .map_err(|error| error.to_string())?;
        self.push_undo(Undo::PeerCut(node.to_string()));
        Ok(())
    }

    /// Records the moment the fault fired (Unix time, taken right before it acted: a
    /// power-off takes a while) and what that moment was, for the downtime and the report.
    pub fn fired_at(&self, at: f64, moment: String) {
        self.with_injection(|injection| {
            injection.at = Some(at);
            injection.moment = Some(moment);
        });
    }

    fn push_undo(&self, undo: Undo) {
        if let Ok(mut list) = self.inner.undo.lock() {
            list.push(undo);
        }
    }

    /// The newest Migration, as the API server has it.
    pub fn latest_migration(&self) -> Option<MigrationView> {
        self.inner.api.views().into_iter().last()
    }

    /// Waits (at most `limit`) for a migration whose phase is `phase` or later. A phase that
    /// passed between two looks is answered by the later phase (the caller records it).
    pub async fn wait_for_phase(
        &self,
        phase: Phase,
        limit: Duration,
    ) -> Result<MigrationView, String> {
        self.wait_for(limit, |view| view.phase.is_some_and(|seen| seen >= phase))
            .await
            .ok_or_else(|| format!("no migration reached {phase} within {limit:?}"))
    }

    pub async fn wait_for(
        &self,
        limit: Duration,
        mut accept: impl FnMut(&MigrationView) -> bool,
    ) -> Option<MigrationView> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(view) = self.latest_migration()
                && accept(&view)
            {
                return Some(view);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The replica holding the controller's leader Lease, read from the API server.
    pub fn controller_leader(&self) -> Option<usize> {
        let lease = self
            .inner
            .api
            .get(&format!(
                "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{}",
                crate::kube::SYSTEM_NAMESPACE,
                crate::kube::LEADER_LEASE
            ))
            .ok()?;
        lease["spec"]["holderIdentity"]
            .as_str()?
            .strip_prefix("automigrate-controller-")?
            .parse()
            .ok()
    }

    /// `kill -9` of a node's agent (its pod's container); its kubelet starts it again, as
    /// for any container of a `restartPolicy: Always` pod.
    pub fn kill_agent(&self, node: &str) -> Result<i32, String> {
        let pid = self.agent_pid(node)?;
        signal(pid, nix::sys::signal::Signal::SIGKILL)?;
        Ok(pid)
    }

    /// Freezes a node's agent (SIGSTOP): its sockets stay open, nothing answers. The undo
    /// list thaws it, so no run ends with a frozen agent.
    pub fn freeze_agent(&self, node: &str) -> Result<i32, String> {
        let pid = self.agent_pid(node)?;
        signal(pid, nix::sys::signal::Signal::SIGSTOP)?;
        self.push_undo(Undo::Frozen(pid));
        Ok(pid)
    }

    /// Thaws an agent [`Self::freeze_agent`] froze (SIGCONT): the outage ends.
    pub fn thaw(&self, pid: i32) -> Result<(), String> {
        signal(pid, nix::sys::signal::Signal::SIGCONT)?;
        if let Ok(mut list) = self.inner.undo.lock() {
            list.retain(|undo| !matches!(undo, Undo::Frozen(frozen) if *frozen == pid));
        }
        Ok(())
    }

    fn agent_pid(&self, node: &str) -> Result<i32, String> {
        self.inner
            .cluster
            .agent_pid(node)
            .ok_or_else(|| format!("no running agent on {node}"))
    }

    /// Fills a node's disk, leaving `free_kib` KiB; returns the ballast's size.
    pub fn fill_disk(&self, node: &str, free_kib: u64) -> Result<u64, String> {
        let path = self.inner.cluster.node_dir(node).join("ballast");
        self.push_undo(Undo::Ballast(path.clone()));
        fill(&path, free_kib)
    }

    /// Staging files of transfers arriving on a node
    /// (`<data root>/.automigrate-staging/<id>/f<n>`).
    pub fn staging_files(&self, node: &str) -> Vec<(PathBuf, u64)> {
        let staging = self
            .inner
            .cluster
            .node_dir(node)
            .join("data")
            .join(automigrate_transfer::paths::STAGING_DIR);
        checkpoint_files(&staging)
            .into_iter()
            .filter(|(path, size)| {
                *size > 0
                    && path
                        .file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.starts_with('f'))
            })
            .collect()
    }

    /// Undoes what outlives a fault, once the run's copies were counted: frozen agents thawed,
    /// cut links restored, ballast removed.
    pub fn heal(&self) {
        let undo: Vec<Undo> = self
            .inner
            .undo
            .lock()
            .map(|mut list| std::mem::take(&mut *list))
            .unwrap_or_default();
        for item in undo {
            match item {
                Undo::Ballast(path) => {
                    let _ = std::fs::remove_file(&path);
                }
                Undo::Frozen(pid) => {
                    let _ = signal(pid, nix::sys::signal::Signal::SIGCONT);
                }
                Undo::ApiCut(node) => {
                    if let Err(error) = self.inner.cluster.restore_api(&node) {
                        tracing::debug!(%node, %error, "restoring the API link");
                    }
                }
                Undo::PeerCut(node) => {
                    if let Err(error) = self.inner.cluster.restore_peers(&node) {
                        tracing::debug!(%node, %error, "restoring the peer links");
                    }
                }
            }
        }
    }
}

/// The epoch at which `percent` % of the training is done (at least 1).
pub fn epoch_at_percent(epochs: u32, percent: u32) -> u32 {
    (u64::from(epochs) * u64::from(percent))
        .div_ceil(100)
        .clamp(1, u64::from(epochs.max(1))) as u32
}

/// Directories under `dir` whose names do not start with a dot, sorted.
pub fn visible_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
                .map(|entry| entry.path())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) -> Result<(), String> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .map_err(|error| format!("{signal} to {pid}: {error}"))
}

/// Mounts a `mib` MiB tmpfs as the state directory of every node but `home`, before the
/// cluster creates its layout there; returns the mount points.
pub fn mount_small_disks(
    run_dir: &Path,
    nodes: &[String],
    home: &str,
    mib: u64,
) -> Result<Vec<PathBuf>, String> {
    let mut mounted = Vec::new();
    for node in nodes.iter().filter(|node| node.as_str() != home) {
        let point = run_dir.join(node);
        if let Err(error) = mount_tmpfs(&point, mib) {
            unmount(&mounted);
            return Err(error);
        }
        mounted.push(point);
    }
    Ok(mounted)
}

/// Writes zeros until the filesystem is full, then gives back `free_kib`.
fn fill(path: &Path, free_kib: u64) -> Result<u64, String> {
    let mut file =
        std::fs::File::create(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let block = vec![0u8; 1 << 20];
    let mut written: u64 = 0;
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(count) => written += count as u64,
            Err(error) if error.raw_os_error() == Some(28) => break,
            Err(error) => return Err(format!("{}: {error}", path.display())),
        }
    }
    // ENOSPC may leave a partial block: write byte-wise-sized blocks until nothing fits.
    let mut small = vec![0u8; 4096];
    while let Ok(count) = file.write(&small) {
        if count == 0 {
            break;
        }
        written += count as u64;
        small.truncate(4096);
    }
    let keep = written.saturating_sub(free_kib * 1024);
    file.set_len(keep)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    Ok(keep)
}

fn mount_tmpfs(point: &Path, mib: u64) -> Result<(), String> {
    std::fs::create_dir_all(point).map_err(|error| format!("{}: {error}", point.display()))?;
    let status = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0755"),
            "automigrate-faults",
        ])
        .arg(point)
        .status()
        .map_err(|error| format!("mount: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount -t tmpfs on {} failed ({status})",
            point.display()
        ))
    }
}

pub fn unmount(points: &[PathBuf]) {
    for point in points {
        let _ = Command::new("umount").arg("-l").arg(point).status();
    }
}

/// Unmounts whatever an interrupted earlier run left mounted under `dir`.
pub fn unmount_leftovers(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return;
    };
    let points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    unmount(&points);
}

/// The files of a checkpoint directory, largest first.
pub fn checkpoint_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                let size = entry.metadata().map(|meta| meta.len()).unwrap_or(0);
                files.push((entry.path(), size));
            }
        }
    }
    files.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    files
}

/// Damages one file; says what was done.
pub fn damage_file(path: &Path, size: u64, damage: Damage) -> Result<String, String> {
    let error = |error: std::io::Error| format!("{}: {error}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(error)?;
    match damage {
        Damage::Truncate { keep_permille } => {
            let keep = size * u64::from(keep_permille.min(999)) / 1000;
            file.set_len(keep).map_err(error)?;
            Ok(format!(
                "truncated {} from {size} to {keep} bytes",
                path.display()
            ))
        }
        Damage::BitFlip {
            offset_permille,
            bit,
        } => {
            if size == 0 {
                return Err(format!("{} is empty", path.display()));
            }
            let offset = (size * u64::from(offset_permille.min(999)) / 1000).min(size - 1);
            let mut byte = [0u8; 1];
            file.read_exact_at(&mut byte, offset).map_err(error)?;
            byte[0] ^= 1 << (bit % 8);
            file.write_all_at(&byte, offset).map_err(error)?;
            Ok(format!(
                "flipped bit {} of byte {offset} of {} ({size} bytes)",
                bit % 8,
                path.display()
            ))
        }
    }
}

/// What the end-of-run verification found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub problems: Vec<String>,
    pub checkpoints: usize,
    pub datasets: usize,
}

/// Verifies the dataset on every node holding a copy and every checkpoint in every node's
/// store (`<run dir>/<node>/checkpoints`), of every pod (a replacement's checkpoints are kept
/// under its own name): all must verify, except the one the fault damaged on purpose. Read
/// only; run it once the agents are stopped.
pub fn verify_files(
    run_dir: &Path,
    nodes: &[String],
    dataset: &str,
    damaged: Option<&(String, String)>,
) -> Verification {
    let mut verification = Verification::default();
    for node in nodes {
        let data = run_dir.join(node).join("data").join(dataset);
        if data.join(workload::DATASET_META).exists() {
            match workload::verify_dataset(&data) {
                Ok(_) => verification.datasets += 1,
                Err(error) => verification
                    .problems
                    .push(format!("dataset on {node}: {error}")),
            }
        }
        let store = run_dir.join(node).join("checkpoints");
        for namespace in visible_dirs(&store) {
            for pod in visible_dirs(&namespace) {
                for dir in visible_dirs(&pod) {
                    let id = dir
                        .file_name()
                        .map(|name| name.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let on_purpose = damaged.is_some_and(|(where_, which)| {
                        where_ == node && (which == &id || dir.ends_with(which))
                    });
                    match (archive::verify_chain(&dir), on_purpose) {
                        (Ok(_), false) => verification.checkpoints += 1,
                        (Err(error), false) => verification
                            .problems
                            .push(format!("checkpoint {} on {node}: {error}", dir.display())),
                        (Err(_), true) => {}
                        (Ok(_), true) => {
                            tracing::info!(%id, "the damaged checkpoint verifies: the damage did not stick")
                        }
                    }
                }
            }
        }
    }
    verification
}

/// Lines in the agents' logs where received data failed its hash or an archive was refused.
pub fn receiver_refusals(run_dir: &Path, nodes: &[String]) -> usize {
    const SIGNS: [&str; 5] = [
        "does not match its hash",
        "refused a piece",
        "received checkpoint refused",
        "has the wrong size",
        // A piece damaged in staging after it was written (checked before placement).
        "no longer match their hashes",
    ];
    nodes
        .iter()
        .map(|node| run_dir.join("logs").join(format!("agent-{node}.log")))
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| {
            text.lines()
                .filter(|line| SIGNS.iter().any(|sign| line.contains(sign)))
                .count()
        })
        .sum()
}
