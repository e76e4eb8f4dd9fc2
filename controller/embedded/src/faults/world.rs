//! What the fault kinds share: the view of the world a fault task has (the controller's
//! persisted migration states, the workload's progress) and the tools it acts with (killing and
//! restarting agent daemons, partitions, full disks, damaged files), and the undoing of whatever
//! must not outlive a run.
//!
//! Data model: a [`FaultContext`] is cheap to clone and shared between the run and its fault
//! task. It holds the cluster, the controller's [`Shared`] record (read only: which standby
//! copies exist), the controller's policy inbox, the state directory, what the fault did so far
//! ([`Injection`]) and the list of things to undo ([`Undo`]): daemons the supervisor started
//! again, partitions and ballast files.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_core::migration::Phase;

use super::{Damage, FaultPlan, Injection, MigrationOutcome, Trigger, store_pod};
use crate::cluster::{ClusterConfig, LocalCluster};
use crate::controller::{PolicyEdits, unix_now};
use crate::daemon::API_PORT;
use crate::scenario::{DEGRADATION_CONDITION, HOME_NODE, epoch_at_percent};
use crate::worker::Shared;
use crate::workload;

/// How often the fault task looks at the persisted migration state: phases such as Fencing
/// last a few milliseconds.
const POLL: Duration = Duration::from_millis(5);

/// Something a fault left that must be undone before the run is judged and torn down.
#[derive(Debug)]
enum Undo {
    /// A daemon the supervisor started again (the cluster only knows the original).
    Daemon(Child),
    Partition(String),
    Ballast(PathBuf),
    /// A thread that keeps a dead node's processes dead.
    Reaper(Arc<std::sync::atomic::AtomicBool>),
    /// An agent daemon frozen with SIGSTOP.
    Frozen(i32),
}

/// The migration a fault task sees in the controller's state directory.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationView {
    pub file: PathBuf,
    pub sequence: u32,
    pub phase: Phase,
    pub source: String,
    pub target: String,
    pub checkpoint_id: Option<String>,
}

#[derive(Debug)]
struct Inner {
    cluster: Arc<LocalCluster>,
    /// The in-process controller's record; `None` when the controller is its own process
    /// (then its journal in the state directory is read).
    shared: Option<Arc<Shared>>,
    policy_edits: PolicyEdits,
    state_dir: PathBuf,
    home_progress: PathBuf,
    epochs: u32,
    policies_dir: PathBuf,
    policy: String,
    injection: Mutex<Injection>,
    undo: Mutex<Vec<Undo>>,
}

/// What a fault task works with (see the module header).
#[derive(Debug, Clone)]
pub struct FaultContext {
    inner: Arc<Inner>,
}

impl FaultContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster: Arc<LocalCluster>,
        shared: Option<Arc<Shared>>,
        policy_edits: PolicyEdits,
        state_dir: PathBuf,
        home_progress: PathBuf,
        epochs: u32,
        policies_dir: PathBuf,
        policy: String,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cluster,
                shared,
                policy_edits,
                state_dir,
                home_progress,
                epochs,
                policies_dir,
                policy,
                injection: Mutex::new(Injection::default()),
                undo: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn cluster(&self) -> &Arc<LocalCluster> {
        &self.inner.cluster
    }

    pub fn policies_dir(&self) -> &Path {
        &self.inner.policies_dir
    }

    pub fn policy_name(&self) -> &str {
        &self.inner.policy
    }

    pub fn policy_edits(&self) -> &PolicyEdits {
        &self.inner.policy_edits
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

    /// The last epoch the home node's container reported.
    pub fn home_epoch(&self) -> Option<u32> {
        workload::read_progress(&self.inner.home_progress)
            .ok()
            .and_then(|progress| progress.last_epoch().map(|record| record.epoch))
    }

    /// Records the moment the fault struck, with the phases seen around it.
    pub fn strike(&self, node: &str, phase_before: Option<Phase>) {
        let epoch = self.home_epoch();
        let after = self.latest_migration().map(|view| view.phase);
        let listed: Vec<String> = self
            .inner
            .cluster
            .nodes()
            .iter()
            .filter(|other| other.is_alive() && other.name() != HOME_NODE)
            .flat_map(|other| {
                other
                    .store()
                    .list(&store_pod())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|stored| stored.manifest.kind.restorable())
                    .map(|stored| format!("{} on {}", stored.manifest.id, other.name()))
                    .collect::<Vec<_>>()
            })
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

    pub fn expect_policy(&self, debug: String) {
        self.with_injection(|injection| injection.expected_policy = Some(debug));
    }

    /// Waits until the home container has done `percent` % of its epochs; then, with
    /// `wait_for_standby`, until a checkpoint taken after epoch 1 has a standby copy (so a
    /// restore can resume rather than restart). `Err` when training ended first.
    pub async fn wait_for_percent(
        &self,
        percent: u32,
        wait_for_standby: bool,
    ) -> Result<u32, String> {
        let epoch = epoch_at_percent(self.inner.epochs, percent);
        let reached = crate::scenario::wait_for_epoch(&self.inner.home_progress, epoch)
            .await
            .ok_or("training ended before the fault's point")?;
        if wait_for_standby {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self.standby_holds_epoch(1) {
                if Instant::now() > deadline {
                    return Err("no standby copy of a checkpoint after epoch 1 within 60 s".into());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(self.home_epoch().unwrap_or(reached))
    }

    /// Whether a checkpoint taken after `epoch` has a complete standby copy.
    fn standby_holds_epoch(&self, epoch: u32) -> bool {
        match &self.inner.shared {
            Some(shared) => shared.standby_holds_epoch(epoch),
            None => {
                let timeline = crate::worker::read_timeline(&self.inner.state_dir);
                timeline.iter().any(|event| match event {
                    crate::controller::TimelineEvent::Transfer {
                        what,
                        purpose: crate::controller::Purpose::Replication,
                        error: None,
                        ..
                    } => what.strip_prefix("checkpoint ").is_some_and(|copied| {
                        timeline.iter().any(|event| {
                            matches!(event, crate::controller::TimelineEvent::Checkpoint { id, epoch_before: Some(before), .. }
                                if id == copied && *before >= epoch)
                        })
                    }),
                    _ => false,
                })
            }
        }
    }

    /// Provokes the migration the plan's fault strikes (at its percent of training).
    pub async fn trigger(&self, plan: &FaultPlan) -> Result<(), String> {
        match plan.trigger {
            Trigger::Degradation => {
                let epoch = self.wait_for_percent(plan.percent, false).await?;
                self.node(HOME_NODE)?
                    .inject_condition(DEGRADATION_CONDITION);
                self.note(format!(
                    "{HOME_NODE} reports {DEGRADATION_CONDITION} at epoch {epoch}"
                ));
            }
            Trigger::NodeFailure => {
                let epoch = self.wait_for_percent(plan.percent, true).await?;
                self.fail_node(HOME_NODE).await?;
                self.note(format!("{HOME_NODE} failed hard at epoch {epoch}"));
            }
            Trigger::TheFault => {}
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> Result<&Arc<crate::node::LocalNode>, String> {
        self.inner
            .cluster
            .node(name)
            .map_err(|error| error.to_string())
    }

    /// Powers a node off: heartbeat, agent, links, and every process of its containers, also
    /// those a restore in flight creates after the power went (a reaper keeps them dead).
    pub async fn fail_node(&self, name: &str) -> Result<(), String> {
        self.inner
            .cluster
            .fail_node(name)
            .await
            .map_err(|error| error.to_string())?;
        let node = Arc::clone(self.node(name)?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name(format!("reaper-{name}"))
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    for id in node.runc_container_ids() {
                        if node.container_running(&id) {
                            let _ = Command::new("runc")
                                .arg("--root")
                                .arg(node.layout().runc_root())
                                .args(["kill", &id, "KILL"])
                                .stdout(Stdio::null())
                                .stderr(Stdio::null())
                                .status();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
        if spawned.is_ok() {
            self.push_undo(Undo::Reaper(stop));
        }
        // Whatever its agent had started (a dump, a restore) dies with the node.
        for pid in processes_mentioning(&node_root_text(self.node(name)?)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(())
    }

    fn push_undo(&self, undo: Undo) {
        if let Ok(mut list) = self.inner.undo.lock() {
            list.push(undo);
        }
    }

    /// The newest migration's persisted state.
    pub fn latest_migration(&self) -> Option<MigrationView> {
        migration_views(&self.inner.state_dir).into_iter().last()
    }

    /// Waits (at most `limit`) for a migration whose phase is `phase` or later. A phase that
    /// passed between two looks is answered by the later phase (the caller records it).
    pub async fn wait_for_phase(
        &self,
        phase: Phase,
        limit: Duration,
    ) -> Result<MigrationView, String> {
        self.wait_for(limit, |view| view.phase >= phase)
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

    /// `kill -9` of a node's agent daemon; returns its command line (to start it again).
    pub fn kill_agent(&self, node: &str) -> Result<Vec<String>, String> {
        let store = self.node(node)?.layout().store();
        let store = store.to_string_lossy().into_owned();
        let (pid, argv) = agent_process(&store)
            .ok_or_else(|| format!("no agent daemon process of {node} found"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|error| format!("kill -9 {pid}: {error}"))?;
        Ok(argv)
    }

    /// Freezes a node's agent daemon (SIGSTOP): its sockets stay open, nothing answers. The
    /// undo list thaws it, so no run ends with a frozen daemon.
    pub fn freeze_agent(&self, node: &str) -> Result<(), String> {
        let pid = self.agent_pid(node)?;
        signal(pid, nix::sys::signal::Signal::SIGSTOP)?;
        self.push_undo(Undo::Frozen(pid));
        Ok(())
    }

    /// Thaws a daemon [`Self::freeze_agent`] froze (SIGCONT).
    pub fn thaw_agent(&self, node: &str) -> Result<(), String> {
        let pid = self.agent_pid(node)?;
        signal(pid, nix::sys::signal::Signal::SIGCONT)?;
        if let Ok(mut list) = self.inner.undo.lock() {
            list.retain(|undo| !matches!(undo, Undo::Frozen(frozen) if *frozen == pid));
        }
        Ok(())
    }

    fn agent_pid(&self, node: &str) -> Result<i32, String> {
        let store = self.node(node)?.layout().store();
        agent_process(&store.to_string_lossy())
            .map(|(pid, _)| pid)
            .ok_or_else(|| format!("no agent daemon process of {node} found"))
    }

    /// Starts a killed daemon again with the same command line, in its node's namespace, as
    /// its supervisor (systemd, a DaemonSet) would.
    pub fn restart_agent(&self, node: &str, argv: &[String]) -> Result<(), String> {
        let local = self.node(node)?;
        let log_path = local.layout().logs().join("agent-restarted.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|error| format!("{}: {error}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|error| error.to_string())?;
        let (program, args) = argv.split_first().ok_or("empty command line")?;
        let child = Command::new("nsenter")
            .arg(format!(
                "--net={}/{}",
                automigrate_netem::NETNS_RUN_DIR,
                local.namespace()
            ))
            .arg("--")
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|error| format!("starting the agent again: {error}"))?;
        self.push_undo(Undo::Daemon(child));
        Ok(())
    }

    /// Cuts a node off: every link (peers' probes and transfers), the controller's access to
    /// its agent, and its heartbeat; the node and its containers run on.
    pub fn partition(&self, node: &str) -> Result<(), String> {
        self.set_partitioned(node, true)?;
        self.push_undo(Undo::Partition(node.to_string()));
        Ok(())
    }

    /// Inserts (or deletes) the partition's firewall rules in the node's namespace and marks
    /// the node accordingly.
    fn set_partitioned(&self, node: &str, partitioned: bool) -> Result<(), String> {
        let local = self.node(node)?;
        let action = if partitioned { "-I" } else { "-D" };
        for rule in partition_rules() {
            iptables(local.namespace(), action, &rule)?;
        }
        local.set_partitioned(partitioned);
        Ok(())
    }

    /// Ends a partition.
    pub fn heal_partition(&self, node: &str) -> Result<(), String> {
        self.set_partitioned(node, false)?;
        if let Ok(mut list) = self.inner.undo.lock() {
            list.retain(|undo| !matches!(undo, Undo::Partition(name) if name == node));
        }
        Ok(())
    }

    /// Fills a node's disk, leaving `free_kib` KiB; returns the ballast's size.
    pub fn fill_disk(&self, node: &str, free_kib: u64) -> Result<u64, String> {
        let path = self.node(node)?.layout().root().join("ballast");
        self.push_undo(Undo::Ballast(path.clone()));
        fill(&path, free_kib)
    }

    /// Undoes what outlives a fault: restarted daemons are stopped, partitions healed, ballast
    /// removed, reapers stopped.
    pub async fn heal(&self) {
        let undo: Vec<Undo> = self
            .inner
            .undo
            .lock()
            .map(|mut list| std::mem::take(&mut *list))
            .unwrap_or_default();
        for item in undo {
            match item {
                Undo::Daemon(mut child) => {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                Undo::Partition(node) => {
                    if let Err(error) = self.heal_partition(&node) {
                        tracing::warn!(%node, %error, "healing a partition");
                    }
                }
                Undo::Ballast(path) => {
                    let _ = std::fs::remove_file(&path);
                }
                Undo::Reaper(stop) => stop.store(true, std::sync::atomic::Ordering::SeqCst),
                Undo::Frozen(pid) => {
                    let _ = signal(pid, nix::sys::signal::Signal::SIGCONT);
                }
            }
        }
    }
}

fn node_root_text(node: &crate::node::LocalNode) -> String {
    node.layout().root().to_string_lossy().into_owned()
}

/// The rules that cut a node off, for `iptables -I` and `-D` in its namespace: everything but
/// loopback is dropped (its links), and the agent's API refuses the controller's connections
/// (which reach it over loopback from inside the namespace).
fn partition_rules() -> Vec<Vec<String>> {
    let api = API_PORT.to_string();
    [
        vec!["INPUT", "!", "-i", "lo", "-j", "DROP"],
        vec!["OUTPUT", "!", "-o", "lo", "-j", "DROP"],
        vec![
            "INPUT",
            "-i",
            "lo",
            "-p",
            "tcp",
            "--dport",
            api.as_str(),
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    ]
    .into_iter()
    .map(|rule| rule.into_iter().map(str::to_string).collect())
    .collect()
}

fn iptables(namespace: &str, action: &str, rule: &[String]) -> Result<(), String> {
    let output = Command::new("nsenter")
        .arg(format!(
            "--net={}/{namespace}",
            automigrate_netem::NETNS_RUN_DIR
        ))
        .args(["--", "iptables", "-w", action])
        .args(rule)
        .output()
        .map_err(|error| format!("iptables: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {action} {}: {}",
            rule.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|byte| *byte == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The agent daemon whose store is `store`: (pid, command line).
fn agent_process(store: &str) -> Option<(i32, Vec<String>)> {
    pids().into_iter().find_map(|pid| {
        let argv = cmdline(pid)?;
        let is_agent = argv
            .first()
            .is_some_and(|program| program.ends_with(crate::daemon::AGENT_PROGRAM));
        let its_store = argv
            .windows(2)
            .any(|pair| pair[0] == "--store-root" && pair[1] == store);
        (is_agent && its_store && !is_zombie(pid)).then_some((pid, argv))
    })
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) -> Result<(), String> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .map_err(|error| format!("{signal} to {pid}: {error}"))
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rfind(')')
                .and_then(|end| stat.get(end + 2..end + 3))
                .map(|state| state == "Z")
        })
        .unwrap_or(true)
}

/// Processes other than agents whose command line names something under `root` (a runc
/// restore or CRIU working for a node).
fn processes_mentioning(root: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    pids()
        .into_iter()
        .filter(|pid| *pid != me)
        .filter(|pid| {
            cmdline(*pid).is_some_and(|argv| {
                let agent = argv
                    .first()
                    .is_some_and(|program| program.ends_with(crate::daemon::AGENT_PROGRAM));
                !agent && argv.iter().any(|arg| arg.starts_with(root))
            })
        })
        .collect()
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

/// Size of the tmpfs a node's logs get in disk-full runs.
const LOG_DISK_MIB: u64 = 64;

/// Mounts a `mib` MiB tmpfs as the storage root of every node but `home`, before the cluster
/// creates its layout there; returns the mount points, each node's log mount before its root.
///
/// A node's logs get a tmpfs of their own, as `/var/log` often has on a real node: the agent's
/// account of what the full disk did to it is the point of the run.
pub fn mount_small_disks(
    config: &ClusterConfig,
    home: &str,
    mib: u64,
) -> Result<Vec<PathBuf>, String> {
    let mut mounted = Vec::new();
    for node in config.nodes.iter().filter(|node| node.as_str() != home) {
        let dir = config.root.join(node);
        let logs = dir.join("logs");
        for (point, size) in [(&dir, mib), (&logs, LOG_DISK_MIB)] {
            if let Err(error) = mount_tmpfs(point, size) {
                unmount(&mounted);
                return Err(error);
            }
            mounted.insert(0, point.clone());
        }
    }
    Ok(mounted)
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

/// Copies `<point>/logs` to `<point>-logs` for each mount point (before it is unmounted).
pub fn keep_logs(points: &[PathBuf]) {
    for point in points.iter().filter(|point| point.join("logs").is_dir()) {
        let mut kept = point.clone().into_os_string();
        kept.push("-logs");
        let _ = Command::new("cp")
            .arg("-a")
            .arg(point.join("logs"))
            .arg(&kept)
            .status();
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

fn sequence_of(path: &Path) -> Option<u32> {
    path.file_stem()?.to_str()?.rsplit('-').next()?.parse().ok()
}

fn migration_views(state_dir: &Path) -> Vec<MigrationView> {
    let dir = state_dir.join("migrations");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut views: Vec<MigrationView> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .filter_map(|path| {
            let value: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
            let state = value.get("state")?;
            Some(MigrationView {
                sequence: sequence_of(&path)?,
                phase: serde_json::from_value(state.get("phase")?.clone()).ok()?,
                source: state.get("source")?.as_str()?.to_string(),
                target: state.get("target")?.as_str()?.to_string(),
                checkpoint_id: state
                    .get("checkpointId")
                    .and_then(|id| id.as_str())
                    .map(str::to_string),
                file: path,
            })
        })
        .collect();
    views.sort_by_key(|view| view.sequence);
    views
}

/// Every migration's persisted end state.
pub fn read_migrations(state_dir: &Path) -> Vec<MigrationOutcome> {
    migration_views(state_dir)
        .into_iter()
        .filter_map(|view| {
            let value: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&view.file).ok()?).ok()?;
            let text = |key: &str| {
                value
                    .get(key)
                    .and_then(|field| field.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            Some(MigrationOutcome {
                file: view
                    .file
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                trigger: text("trigger"),
                source: view.source,
                target: view.target,
                phase: view.phase,
                message: value
                    .get("state")
                    .and_then(|state| state.get("message"))
                    .and_then(|message| message.as_str())
                    .map(str::to_string),
                checkpoint: value
                    .pointer("/driver/checkpointUsed")
                    .and_then(|id| id.as_str())
                    .map(str::to_string)
                    .or(view.checkpoint_id),
                fresh_start: value
                    .pointer("/driver/freshStart")
                    .and_then(serde_json::Value::as_bool),
                old_container: text("oldContainer"),
                new_container: text("newContainer"),
            })
        })
        .collect()
}

/// The dataset holders a controller process recorded (`<state dir>/shared.json`).
pub fn read_holders(state_dir: &Path) -> BTreeSet<String> {
    std::fs::read(state_dir.join("shared.json"))
        .ok()
        .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
        .and_then(|value| {
            value.get("holders").and_then(|holders| {
                holders.as_array().map(|holders| {
                    holders
                        .iter()
                        .filter_map(|holder| holder.as_str().map(str::to_string))
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// What the end-of-run verification found.
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub problems: Vec<String>,
    pub checkpoints: usize,
    pub datasets: usize,
    /// Checkpoints that verify, on nodes alive at the end: (node, id, created, Unix seconds).
    pub intact_on_live_nodes: Vec<(String, String, f64)>,
}

/// Verifies the dataset on every node holding it and every checkpoint in every node's store
/// (all of them must verify, except the one the fault damaged on purpose, which must not).
pub fn verify_files(
    cluster: &LocalCluster,
    dataset: &str,
    holders: &BTreeSet<String>,
    damaged: Option<&(String, String)>,
) -> Verification {
    let mut verification = Verification::default();
    let pod = store_pod();
    for node in cluster.nodes() {
        if holders.contains(node.name()) {
            match workload::verify_dataset(&node.layout().dataset(dataset)) {
                Ok(_) => verification.datasets += 1,
                Err(error) => verification
                    .problems
                    .push(format!("dataset on {}: {error}", node.name())),
            }
        }
        // Every archive directory, also those whose manifest cannot be read (which a listing
        // leaves out).
        let ids: Vec<String> = node
            .store()
            .pod_dir(&pod)
            .ok()
            .and_then(|dir| std::fs::read_dir(dir).ok())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        for id in ids {
            let on_purpose = damaged
                .is_some_and(|(where_, which)| where_.as_str() == node.name() && which == &id);
            match (node.store().verified(&pod, &id), on_purpose) {
                (Ok(verified), false) => {
                    verification.checkpoints += 1;
                    if node.is_alive() {
                        let created =
                            verified.manifest().created_at.as_millisecond() as f64 / 1000.0;
                        verification.intact_on_live_nodes.push((
                            node.name().to_string(),
                            id.clone(),
                            created,
                        ));
                    }
                }
                (Err(error), false) => verification
                    .problems
                    .push(format!("checkpoint {id} on {}: {error}", node.name())),
                (Err(_), true) => {}
                (Ok(_), true) => {
                    tracing::info!(%id, "the damaged checkpoint verifies: the damage did not stick")
                }
            }
        }
    }
    verification
}

/// Lines in the nodes' agent logs where received data failed its hash or an archive was refused.
pub fn receiver_refusals(cluster: &LocalCluster) -> usize {
    const SIGNS: [&str; 5] = [
        "does not match its hash",
        "refused a piece",
        "received checkpoint refused",
        "has the wrong size",
        // A piece damaged in staging after it was written (checked before placement).
        "no longer match their hashes",
    ];
    cluster
        .nodes()
        .iter()
        .flat_map(|node| {
            ["agent.log", "agent-restarted.log"]
                .into_iter()
                .map(|name| node.layout().logs().join(name))
                .collect::<Vec<_>>()
        })
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| {
            text.lines()
                .filter(|line| SIGNS.iter().any(|sign| line.contains(sign)))
                .count()
        })
        .sum()
}
