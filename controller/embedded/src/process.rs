//! The local controller as a separate OS process, so that it can be killed for real (SIGKILL
//! at any moment) and restarted on the same state directory.
//!
//! Two sides:
//!
//! - the harness (the process that owns the [`LocalCluster`]: namespaces, link emulator, agent
//!   daemons, runc containers, kubelets) starts the controller with [`ControllerProcess::spawn`];
//! - the child, the `automigrate-embedded-controller` program ([`run_child`]), attaches to the
//!   cluster ([`LocalCluster::attach`]), opens the state directory ([`LocalController::open`]:
//!   resuming whatever an earlier controller left) and runs passes until training ends.
//!
//! What crosses the process boundary, and how (nothing else is shared):
//!
//! ```text
//! <cluster root>/cluster.json              harness → child: nodes, namespaces, addresses, config
//! <cluster root>/<node>/kubelet-status.json harness → child: heartbeat, conditions, power
//!                                          (posted from `spawn` on: LocalCluster::post_node_status)
//! agents' HTTP API (in the node namespaces) child → daemons (AgentMode::Daemon only)
//! <node>/runc, checkpoints/, work/*/progress.log   runtime state, stores, training progress
//! <state dir>/launch.json                  harness → child: pod, dataset, policies, clock, options
//! <state dir>/users.json                   harness → child: simulated users ([`ControllerProcess::set_users`])
//! <state dir>/migrations/<pod>-<n>.json    child → harness: [`PersistedMigration`] (phase etc.)
//! <state dir>/timeline.jsonl, shared.json  child → harness: timeline, epochs, dataset holders
//! <state dir>/engine-memory.json           child → child: the engine's memory across restarts
//! <state dir>/exit.json                    child → harness: how the child ended ([`ExitRecord`])
//! <state dir>/controller-<start>.log       the child's stdout and stderr, per start
//! ```
//!
//! The policy clock is saved as a [`ClockAnchor`] in `launch.json`, so every controller reads
//! the same policy time. The harness API:
//!
//! ```text
//! let launch = ControllerLaunch::new(&cluster, state_dir, policies_dir, clock.anchor(), pod,
//!                                    dataset_meta, "node-a");
//! let mut controller = ControllerProcess::spawn(&cluster, launch)?;   // first start: deploys
//! controller.wait_for_phase(&[Phase::Transferring], limit).await?;     // reads the JSON
//! controller.kill9()?;                                                 // SIGKILL, reaped
//! controller.restart()?;                                               // same state dir
//! let exit = controller.wait(limit).await?;                            // ExitRecord
//! controller.current_migration()?;  controller.timeline();  controller.pid();
//! ```
//!
//! `launch.step_delay` pauses the controller before the step of one phase (once per process),
//! so a kill can be aimed at a phase whose step would otherwise pass in milliseconds. The
//! program is found like the agent daemon: `$AUTOMIGRATE_CONTROLLER_BIN`, next to the running
//! program or one directory up (test binaries), else on `PATH`; `cargo build -p
//! automigrate-embedded` (or `cargo test -p automigrate-embedded`) builds it.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_core::migration::Phase;
use automigrate_core::model::UserObservation;
use serde::{Deserialize, Serialize};

use crate::clock::{ClockAnchor, PolicyClock};
use crate::cluster::{AgentMode, ClusterError, LocalCluster};
use crate::controller::{
    ControllerError, ControllerOptions, LocalController, PersistedMigration, PodConfig, Recovery,
    TimelineEvent,
};
use crate::workload::{DatasetMeta, DatasetSpec};

/// The controller program's name.
pub const CONTROLLER_PROGRAM: &str = "automigrate-embedded-controller";
pub const LAUNCH_FILE: &str = "launch.json";
pub const EXIT_FILE: &str = "exit.json";
pub const USERS_FILE: &str = "users.json";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(
        "no {CONTROLLER_PROGRAM} program next to this one and no $AUTOMIGRATE_CONTROLLER_BIN; build it: cargo build -p automigrate-embedded"
    )]
    NoBinary,
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("starting {binary}: {reason}")]
    Spawn { binary: PathBuf, reason: String },
    #[error("the controller process {pid} still runs")]
    StillRunning { pid: u32 },
    #[error("waited {limit:?} for {what}")]
    TimedOut { limit: Duration, what: String },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Controller(#[from] Box<ControllerError>),
    #[error("policies: {0}")]
    Policies(String),
    #[error("clock: {0}")]
    Clock(#[from] crate::clock::ClockError),
    #[error("the process that started this controller is gone")]
    Orphaned,
}

impl From<ControllerError> for ProcessError {
    fn from(error: ControllerError) -> Self {
        Self::Controller(Box::new(error))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProcessError + '_ {
    move |error| ProcessError::Io {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

/// A pause before the step of `phase` (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepDelay {
    pub phase: Phase,
    pub millis: u64,
}

/// Everything the controller program needs (`<state dir>/launch.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ControllerLaunch {
    /// The cluster's storage root, where [`LocalCluster::create`] wrote `cluster.json`.
    pub cluster_root: PathBuf,
    pub state_dir: PathBuf,
    pub policies_dir: PathBuf,
    pub clock: ClockAnchor,
    pub pod: PodConfig,
    pub dataset: DatasetMeta,
    /// Where the dataset is fetched again when no node holds it any more.
    pub dataset_origin: Option<DatasetSpec>,
    /// The node the pod starts on, holding the first copy of its dataset.
    pub home_node: String,
    pub tick_ms: u64,
    pub recovery: Recovery,
    /// Deploy the pod on its home node unless a controller on this state dir did.
    pub deploy: bool,
    pub step_delay: Option<StepDelay>,
}

impl ControllerLaunch {
    /// Defaults: 100 ms passes, resume from checkpoints, deploy at the first start.
    pub fn new(
        cluster: &LocalCluster,
        state_dir: PathBuf,
        policies_dir: PathBuf,
        clock: ClockAnchor,
        pod: PodConfig,
        dataset: DatasetMeta,
        home_node: &str,
    ) -> Self {
        Self {
            cluster_root: cluster.config().root.clone(),
            state_dir,
            policies_dir,
            clock,
            pod,
            dataset,
            dataset_origin: None,
            home_node: home_node.to_string(),
            tick_ms: 100,
            recovery: Recovery::Resume,
            deploy: true,
            step_delay: None,
        }
    }
}

/// How a controller process ended (`<state dir>/exit.json`, written by the child).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    pub pid: u32,
    /// True when training ended; false when the controller stopped on an error.
    pub training_done: bool,
    pub error: Option<String>,
    /// Unix seconds.
    pub at: f64,
}

/// What [`ControllerProcess::wait`] saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildExit {
    pub code: Option<i32>,
    /// `None` when the child wrote none (it was killed).
    pub record: Option<ExitRecord>,
}

/// Where the controller program is (see the module header).
pub fn find_controller_binary() -> Option<PathBuf> {
    crate::daemon::find_program(CONTROLLER_PROGRAM, "AUTOMIGRATE_CONTROLLER_BIN")
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), ProcessError> {
    let text = serde_json::to_vec_pretty(value).map_err(|error| ProcessError::Io {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text).map_err(io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io(path))
}

/// The controller running as a child process of the harness (see the module header).
#[derive(Debug)]
pub struct ControllerProcess {
    launch: ControllerLaunch,
    binary: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl ControllerProcess {
    /// Writes `launch.json` and starts the first controller process, with the program found
    /// by [`find_controller_binary`]. The cluster must run agent daemons.
    pub fn spawn(cluster: &LocalCluster, launch: ControllerLaunch) -> Result<Self, ProcessError> {
        let binary = find_controller_binary().ok_or(ProcessError::NoBinary)?;
        Self::spawn_with(cluster, launch, binary)
    }

    /// [`ControllerProcess::spawn`] with a given program.
    pub fn spawn_with(
        cluster: &LocalCluster,
        launch: ControllerLaunch,
        binary: PathBuf,
    ) -> Result<Self, ProcessError> {
        if !matches!(cluster.config().agent, AgentMode::Daemon { .. }) {
            return Err(ClusterError::NeedsDaemons.into());
        }
        cluster.post_node_status();
        std::fs::create_dir_all(&launch.state_dir).map_err(io(&launch.state_dir))?;
        write_json(&launch.state_dir.join(LAUNCH_FILE), &launch)?;
        let mut process = Self {
            launch,
            binary,
            child: None,
            starts: 0,
        };
        process.start()?;
        Ok(process)
    }

    fn start(&mut self) -> Result<u32, ProcessError> {
        let state_dir = &self.launch.state_dir;
        let exit = state_dir.join(EXIT_FILE);
        match std::fs::remove_file(&exit) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&exit)(error));
            }
            _ => {}
        }
        self.starts += 1;
        let log = self.log_path(self.starts);
        let out = std::fs::File::create(&log).map_err(io(&log))?;
        let err = out.try_clone().map_err(io(&log))?;
        let child = std::process::Command::new(&self.binary)
            .arg("--state-dir")
            .arg(state_dir)
            .env(
                "AUTOMIGRATE_LOG",
                std::env::var("AUTOMIGRATE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|error| ProcessError::Spawn {
                binary: self.binary.clone(),
                reason: error.to_string(),
            })?;
        let pid = child.id();
        tracing::info!(pid, start = self.starts, "controller process started");
        self.child = Some(child);
        Ok(pid)
    }

    /// The running controller's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How many controller processes were started on this state dir.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn launch(&self) -> &ControllerLaunch {
        &self.launch
    }

    pub fn state_dir(&self) -> &Path {
        &self.launch.state_dir
    }

    /// The log (stdout and stderr) of the `start`-th process (from 1).
    pub fn log_path(&self, start: u32) -> PathBuf {
        self.launch
            .state_dir
            .join(format!("controller-{start}.log"))
    }

    /// Whether the process still runs (reaps it when it ended).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => false,
            None => false,
        }
    }

    /// SIGKILL, then reaps it: whatever it was doing stops there (programs it started, such as
    /// `runc restore`, go on as orphans, as they would after a real crash). Fine if it ended.
    pub fn kill9(&mut self) -> Result<(), ProcessError> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            if let Err(error) = child.kill()
                && error.kind() != std::io::ErrorKind::InvalidInput
            {
                return Err(ProcessError::Io {
                    path: PathBuf::from(format!("/proc/{pid}")),
                    reason: error.to_string(),
                });
            }
            let _ = child.wait();
            tracing::info!(pid, "controller process killed (SIGKILL)");
        }
        Ok(())
    }

    /// Starts a new controller process on the same state dir (it resumes). The previous one
    /// must have ended (see [`ControllerProcess::kill9`]).
    pub fn restart(&mut self) -> Result<u32, ProcessError> {
        if self.is_running()
            && let Some(pid) = self.pid()
        {
            return Err(ProcessError::StillRunning { pid });
        }
        self.child = None;
        self.start()
    }

    /// Waits (at most `limit`) for the process to end by itself.
    pub async fn wait(&mut self, limit: Duration) -> Result<ChildExit, ProcessError> {
        let deadline = Instant::now() + limit;
        loop {
            let status = match self.child.as_mut() {
                Some(child) => child
                    .try_wait()
                    .map_err(io(Path::new("controller process")))?,
                None => {
                    return Ok(ChildExit {
                        code: None,
                        record: self.exit_record(),
                    });
                }
            };
            if let Some(status) = status {
                self.child = None;
                return Ok(ChildExit {
                    code: status.code(),
                    record: self.exit_record(),
                });
            }
            if Instant::now() > deadline {
                return Err(ProcessError::TimedOut {
                    limit,
                    what: "the controller process to end".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the newest persisted migration (every 5 ms) until its phase is one of `phases`;
    /// returns it. Fails when the process ends first or after `limit`.
    pub async fn wait_for_phase(
        &mut self,
        phases: &[Phase],
        limit: Duration,
    ) -> Result<PersistedMigration, ProcessError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(current) = self.current_migration()?
                && phases.contains(&current.state.phase)
            {
                return Ok(current);
            }
            if !self.is_running() {
                return Err(ProcessError::TimedOut {
                    limit,
                    what: format!("a migration in {phases:?} (the controller ended first)"),
                });
            }
            if Instant::now() > deadline {
                return Err(ProcessError::TimedOut {
                    limit,
                    what: format!("a migration in {phases:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the last process wrote when it ended (none after a kill).
    pub fn exit_record(&self) -> Option<ExitRecord> {
        std::fs::read(self.launch.state_dir.join(EXIT_FILE))
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok())
    }

    /// Every migration persisted so far, in the order decided.
    pub fn migrations(&self) -> Result<Vec<PersistedMigration>, ProcessError> {
        Ok(PersistedMigration::read_all(&self.launch.state_dir)?
            .into_iter()
            .map(|(_, persisted)| persisted)
            .collect())
    }

    /// The newest persisted migration (its `state.phase` is the persisted phase).
    pub fn current_migration(&self) -> Result<Option<PersistedMigration>, ProcessError> {
        Ok(self.migrations()?.pop())
    }

    /// The timeline journaled so far (by every process on this state dir).
    pub fn timeline(&self) -> Vec<TimelineEvent> {
        crate::worker::read_timeline(&self.launch.state_dir)
    }

    /// Sets the simulated users' latencies every pass of the controller reads.
    pub fn set_users(&self, users: &[UserObservation]) -> Result<(), ProcessError> {
        write_json(&self.launch.state_dir.join(USERS_FILE), &users)
    }
}

impl Drop for ControllerProcess {
    /// No controller outlives its harness.
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// The controller program's work: attach, open the state dir, deploy once, run until training
/// ends; writes [`ExitRecord`] either way. It also ends when its harness dies (its parent
/// changes): a harness killed without [`ControllerProcess`]'s drop leaves no controller behind.
pub async fn run_child(state_dir: &Path) -> Result<(), ProcessError> {
    let parent = std::os::unix::process::parent_id();
    let orphaned = async move {
        while std::os::unix::process::parent_id() == parent {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let outcome = tokio::select! {
        outcome = run_controller(state_dir) => outcome,
        () = orphaned => {
            tracing::warn!("the harness is gone; stopping");
            return Err(ProcessError::Orphaned);
        }
    };
    let record = ExitRecord {
        pid: std::process::id(),
        training_done: outcome.is_ok(),
        error: outcome.as_ref().err().map(ToString::to_string),
        at: crate::controller::unix_now(),
    };
    write_json(&state_dir.join(EXIT_FILE), &record)?;
    outcome
}

async fn run_controller(state_dir: &Path) -> Result<(), ProcessError> {
    let launch_path = state_dir.join(LAUNCH_FILE);
    let launch: ControllerLaunch = std::fs::read(&launch_path)
        .map_err(io(&launch_path))
        .and_then(|text| {
            serde_json::from_slice(&text).map_err(|error| ProcessError::Io {
                path: launch_path.clone(),
                reason: error.to_string(),
            })
        })?;
    let cluster = Arc::new(LocalCluster::attach(&launch.cluster_root)?);
    let policies = crate::policies::load_policies(&launch.policies_dir)
        .map_err(|error| ProcessError::Policies(error.to_string()))?;
    let clock = PolicyClock::resume(launch.clock)?;
    let mut controller = LocalController::open(
        cluster,
        policies,
        clock,
        launch.pod.clone(),
        launch.dataset.clone(),
        &launch.home_node,
        ControllerOptions {
            tick: Duration::from_millis(launch.tick_ms),
            recovery: launch.recovery,
            state_dir: launch.state_dir.clone(),
        },
    )?
    .with_users_file(launch.state_dir.join(USERS_FILE));
    if let Some(origin) = launch.dataset_origin.clone() {
        controller = controller.with_dataset_origin(origin);
    }
    if let Some(delay) = launch.step_delay {
        controller = controller.with_step_delay(delay.phase, Duration::from_millis(delay.millis));
    }
    tracing::info!(pending = ?controller.pending_phase(), pid = std::process::id(), "controller process up");
    if launch.deploy {
        controller.deploy_once().await?;
    }
    controller.run_until(|_| false).await?;
    Ok(())
}
