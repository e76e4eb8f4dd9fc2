//! The embedded controller dies in the middle of a migration and a new one, started on the same
//! state directory, finishes it: training resumes from a checkpoint with the loss of an
//! uninterrupted run, and two copies never run at once.
//!
//! - In this process: [`LocalController::with_halt`] stops the first controller as if killed
//!   right after it persisted each phase of a live migration (a degraded node: every phase from
//!   Syncing to Verifying), in the middle of its final dump, and in two phases of a dead-source
//!   migration; [`LocalController::open`] starts the second one.
//! - For real: the controller runs as the `automigrate-embedded-controller` child process over
//!   agent daemons and gets SIGKILL in each phase of a hard-failure migration (Syncing, Fencing,
//!   while its `runc restore` runs) and of a degraded node's live one (while the agent takes the
//!   final dump, while the checkpoint is sent, before Verifying); a new process resumes.
//!
//! Needs root, runc, CRIU >= 4, iptables, python3-numpy and, for the daemons, the agent binary
//! (`cargo build -p automigrate-agent`); with `AUTOMIGRATE_SKIP_PRIVILEGED=1` it skips, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::{agent_binary, init_logs, policies_dir, privileged};
use std::sync::Arc;
use std::time::Duration;

use automigrate_agent::api::PodKey;
use automigrate_core::PolicySet;
use automigrate_core::migration::Phase;
use automigrate_embedded::clock::PolicyClock;
use automigrate_embedded::cluster::{AgentMode, ClusterConfig, LocalCluster};
use automigrate_embedded::controller::{
    ControllerError, ControllerOptions, HaltPoint, LocalController, PodConfig, Purpose, Recovery,
    TimelineEvent,
};
use automigrate_embedded::monitor::{CopyMonitor, CopyReport};
use automigrate_embedded::policies::load_policies;
use automigrate_embedded::process::{ControllerLaunch, ControllerProcess, StepDelay};
use automigrate_embedded::workload::{self, DatasetMeta, DatasetSpec, TrainerSpec};

const HOME: &str = "node-a";
// Long enough that the node failure (injected once the standby holds a checkpoint from after
// epoch 1) lands before training ends, also on a loaded machine: with 20, training ended first
// in two dead-source cases of one CI run.
const EPOCHS: u32 = 40;

/// One cluster at a time: two training at once on two cores would only slow both.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn dataset_spec() -> DatasetSpec {
    DatasetSpec {
        name: "small".into(),
        files: 4,
        rows_per_file: 4096,
        features: 32,
        classes: 4,
        seed: 5,
    }
}

fn trainer() -> TrainerSpec {
    TrainerSpec {
        epochs: EPOCHS,
        hidden: 128,
        seed: 3,
        learning_rate: 0.05,
    }
}

fn pod() -> PodConfig {
    PodConfig::new(
        PodKey::new("ml", "trainer"),
        "default",
        &dataset_spec().name,
        trainer(),
        // 1 s of real time at scale 30.
        &[(automigrate_core::annotations::CHECKPOINT_INTERVAL, "30s")],
    )
}

fn cluster_config(root: &Path, prefix: &str, agent: AgentMode) -> ClusterConfig {
    let mut config = ClusterConfig::line(4, Duration::from_millis(10), root.to_path_buf());
    config.name_prefix = prefix.into();
    config.agent = agent;
    config
}

/// The final loss of a container that trained alone from start to end, once per test binary.
async fn reference_loss(root: &Path) -> String {
    static REFERENCE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    REFERENCE
        .get_or_init(|| async {
            let mut plan = automigrate_embedded::demo::DemoPlan::standard(
                root.join("reference"),
                policies_dir(),
            );
            plan.settings.dataset = dataset_spec();
            plan.settings.trainer = trainer();
            plan.settings.agent = AgentMode::InProcess;
            let reference = automigrate_embedded::scenario::reference_run(&plan.settings)
                .await
                .unwrap();
            assert_eq!(reference.final_epoch, Some(EPOCHS));
            reference.final_loss_hex.unwrap()
        })
        .await
        .clone()
}

/// What happens to node-a once the home container has reported `at_epoch`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Trouble {
    /// `DiskPressure`: a live migration with a final stop-and-dump.
    Degraded,
    /// Power off, once a checkpoint taken after epoch 1 has a standby copy.
    Failed,
}

/// A cluster with the dataset on node-a.
struct World {
    cluster: Arc<LocalCluster>,
    meta: DatasetMeta,
    state_dir: PathBuf,
}

async fn world(root: &Path, prefix: &str, agent: AgentMode) -> World {
    let cluster = Arc::new(
        LocalCluster::create(cluster_config(root, prefix, agent))
            .await
            .unwrap(),
    );
    let home = cluster.node(HOME).unwrap();
    let meta = workload::generate_dataset(
        &home.layout().dataset(&dataset_spec().name),
        &dataset_spec(),
    )
    .unwrap();
    World {
        cluster,
        meta,
        state_dir: root.join("controller"),
    }
}

fn home_progress(world: &World) -> PathBuf {
    world
        .cluster
        .node(HOME)
        .unwrap()
        .layout()
        .progress("trainer-node-a-1")
}

async fn wait_for_epoch(path: &Path, epoch: u32) -> u32 {
    loop {
        if let Some(last) = workload::read_progress(path)
            .ok()
            .and_then(|progress| progress.last_epoch().map(|record| record.epoch))
            && last >= epoch
        {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a checkpoint taken after `epoch` reached a standby, from a journaled timeline.
fn standby_holds_epoch(timeline: &[TimelineEvent], epoch: u32) -> bool {
    let late: Vec<&String> = timeline
        .iter()
        .filter_map(|event| match event {
            TimelineEvent::Checkpoint {
                id, epoch_before, ..
            } if epoch_before.is_some_and(|before| before >= epoch) => Some(id),
            _ => None,
        })
        .collect();
    timeline.iter().any(|event| match event {
        TimelineEvent::Transfer {
            what,
            purpose: Purpose::Replication,
            error: None,
            ..
        } => late.iter().any(|id| *what == format!("checkpoint {id}")),
        _ => false,
    })
}

/// Injects the trouble once the home container reached `at_epoch` (and, for a failure, a
/// standby holds a checkpoint taken after epoch 1).
fn inject(
    world: &World,
    trouble: Trouble,
    at_epoch: u32,
    timeline: impl Fn() -> Vec<TimelineEvent> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let cluster = Arc::clone(&world.cluster);
    let progress = home_progress(world);
    tokio::spawn(async move {
        wait_for_epoch(&progress, at_epoch).await;
        match trouble {
            Trouble::Degraded => cluster.node(HOME).unwrap().inject_condition("DiskPressure"),
            Trouble::Failed => {
                while !standby_holds_epoch(&timeline(), 1) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                cluster.fail_node(HOME).await.unwrap();
            }
        }
    })
}

/// Every container's progress file on every node: `(node, container, progress)`.
fn all_progress(world: &World) -> Vec<(String, String, workload::Progress)> {
    let mut found = Vec::new();
    for node in world.cluster.nodes() {
        let work = node.layout().root().join("work");
        for entry in std::fs::read_dir(&work).unwrap().filter_map(Result::ok) {
            let container = entry.file_name().to_string_lossy().into_owned();
            if let Ok(progress) = workload::read_progress(&node.layout().progress(&container)) {
                found.push((node.name().to_string(), container, progress));
            }
        }
    }
    found
}

/// The checks every restarted run must pass.
fn check_outcome(
    label: &str,
    world: &World,
    reference: &str,
    copies: &CopyReport,
    expect_phase: Phase,
) {
    let migrations =
        automigrate_embedded::controller::PersistedMigration::read_all(&world.state_dir).unwrap();
    assert_eq!(migrations.len(), 1, "{label}: {migrations:#?}");
    let (_, migration) = &migrations[0];
    assert_eq!(
        migration.state.phase,
        expect_phase,
        "{label}: {:?}\n{:#?}",
        migration.state.message,
        automigrate_embedded::worker::read_timeline(&world.state_dir)
    );
    assert!(migration.driver.resumed_by >= 1, "{label}: not resumed");
    // Never two copies.
    assert!(copies.samples > 10, "{label}: {copies:?}");
    assert_eq!(copies.max_running, 1, "{label}: {copies:?}");
    assert!(copies.overlaps.is_empty(), "{label}: {copies:?}");
    // Training ended once, in the replacement, which resumed after epoch 0 (from a checkpoint)
    // with the same process (the run tag) and the reference's loss.
    let progress = all_progress(world);
    let finished: Vec<_> = progress
        .iter()
        .filter(|(_, _, progress)| progress.done().is_some())
        .collect();
    assert_eq!(finished.len(), 1, "{label}: {progress:#?}");
    let (node, container, last) = finished[0];
    assert_eq!(*container, migration.new_container, "{label}");
    assert_eq!(*node, migration.state.target, "{label}");
    let first = last.epochs().next().unwrap().epoch;
    assert!(
        first > 1,
        "{label}: the replacement started at epoch {first}"
    );
    let final_epoch = last.last_epoch().unwrap();
    assert_eq!(final_epoch.epoch, EPOCHS, "{label}");
    assert_eq!(final_epoch.loss_hex, reference, "{label}: a different loss");
    let home = progress
        .iter()
        .find(|(node, container, _)| node == HOME && container == "trainer-node-a-1")
        .unwrap();
    let home_runs: Vec<u64> = home.2.epochs().map(|record| record.run).collect();
    assert!(
        last.epochs().all(|record| home_runs.contains(&record.run)),
        "{label}: the replacement is not the same process (a restart)"
    );
}

fn open(world: &World, policies: &PolicySet, clock: PolicyClock) -> LocalController {
    LocalController::open(
        Arc::clone(&world.cluster),
        policies.clone(),
        clock,
        pod(),
        world.meta.clone(),
        HOME,
        ControllerOptions {
            tick: Duration::from_millis(100),
            recovery: Recovery::Resume,
            state_dir: world.state_dir.clone(),
        },
    )
    .unwrap()
    .with_dataset_origin(dataset_spec())
}

/// One run: the first controller halts at `halt`, a second one finishes.
async fn halted_and_resumed(
    base: &Path,
    prefix: &str,
    trouble: Trouble,
    halt: HaltPoint,
    reference: &str,
) {
    let label = format!("{trouble:?} halted at {halt:?}");
    let root = base.join(prefix);
    let world = world(&root, prefix, AgentMode::InProcess).await;
    let policies = load_policies(&policies_dir()).unwrap();
    let clock = PolicyClock::start(30).unwrap();
    let monitor = CopyMonitor::start(world.cluster.nodes().to_vec(), Duration::from_millis(20));

    let mut first = open(&world, &policies, clock).with_halt(halt);
    first.deploy_once().await.unwrap();
    let shared = first.shared();
    let at_epoch = match trouble {
        Trouble::Degraded => 8,
        Trouble::Failed => 12,
    };
    let injector = inject(&world, trouble, at_epoch, move || shared.timeline());
    let ran = tokio::time::timeout(Duration::from_secs(60), first.run_until(|_| false)).await;
    match ran {
        Ok(Err(ControllerError::Halted { phase })) => assert_eq!(phase, halt.phase, "{label}"),
        Ok(other) => panic!("{label}: the first controller ended with {other:?}"),
        Err(_) => panic!("{label}: the first controller never halted"),
    }
    injector.abort();
    drop(first);

    let mut second = open(&world, &policies, clock);
    assert_eq!(second.pending_phase(), Some(halt.phase), "{label}");
    assert!(second.deployed(), "{label}");
    second.deploy_once().await.unwrap();
    match tokio::time::timeout(Duration::from_secs(60), second.run_until(|_| false)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            // The phases with their messages say where the migration went wrong.
            let phases: Vec<String> = second
                .timeline()
                .iter()
                .filter_map(|event| match event {
                    TimelineEvent::Phase { phase, message, .. } => {
                        Some(format!("{phase}: {}", message.as_deref().unwrap_or("")))
                    }
                    _ => None,
                })
                .collect();
            panic!("{label}: {error}\nphases: {phases:#?}")
        }
        Err(_) => panic!("{label}: training did not finish after the restart"),
    }
    assert!(second.training_done(), "{label}");
    let restarted = second.timeline().iter().any(|event| {
        matches!(event, TimelineEvent::ControllerStarted { migration_phase, .. }
            if *migration_phase == Some(halt.phase))
    });
    assert!(restarted, "{label}: no ControllerStarted event");
    drop(second);
    let copies = monitor.stop();
    check_outcome(&label, &world, reference, &copies, Phase::Succeeded);
    let cluster = Arc::try_unwrap(world.cluster).unwrap();
    cluster.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_migration_resumes_after_the_controller_stops_in_any_phase() {
    if !privileged("a_live_migration_resumes_after_the_controller_stops_in_any_phase") {
        return;
    }
    let _one_at_a_time = SERIAL.lock().await;
    init_logs();
    let base = tempfile::tempdir().unwrap();
    let reference = reference_loss(base.path()).await;
    let phases = [
        Phase::Syncing,
        Phase::Checkpointing,
        Phase::Transferring,
        Phase::Fencing,
        Phase::Restoring,
        Phase::Verifying,
    ];
    for (index, phase) in phases.into_iter().enumerate() {
        let halt = HaltPoint { phase, after: None };
        halted_and_resumed(
            base.path(),
            &format!("live{index}"),
            Trouble::Degraded,
            halt,
            &reference,
        )
        .await;
    }
    // In the middle of the final dump: the dump is abandoned with the controller.
    let halt = HaltPoint {
        phase: Phase::Checkpointing,
        after: Some(Duration::from_millis(150)),
    };
    halted_and_resumed(base.path(), "livedump", Trouble::Degraded, halt, &reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_source_migration_resumes_after_the_controller_stops() {
    if !privileged("a_dead_source_migration_resumes_after_the_controller_stops") {
        return;
    }
    let _one_at_a_time = SERIAL.lock().await;
    init_logs();
    let base = tempfile::tempdir().unwrap();
    let reference = reference_loss(base.path()).await;
    for (index, halt) in [
        HaltPoint {
            phase: Phase::Syncing,
            after: None,
        },
        HaltPoint {
            phase: Phase::Fencing,
            after: None,
        },
        // The restore is abandoned mid-way.
        HaltPoint {
            phase: Phase::Restoring,
            after: Some(Duration::from_millis(100)),
        },
    ]
    .into_iter()
    .enumerate()
    {
        halted_and_resumed(
            base.path(),
            &format!("dead{index}"),
            Trouble::Failed,
            halt,
            &reference,
        )
        .await;
    }
}

/// When in a phase the controller process gets SIGKILL.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// Once the phase is persisted, before its step starts (the step waits 3 s first).
    BeforeStep,
    /// This long after the step started.
    InStep(Duration),
}

/// The controller as a child process gets SIGKILL in `phase`, and a new process finishes the
/// migration.
async fn killed_and_restarted(
    base: &Path,
    prefix: &str,
    trouble: Trouble,
    phase: Phase,
    kill: KillAt,
) {
    let reference = reference_loss(base).await;
    let label = format!("{trouble:?}, controller process killed in {phase} ({kill:?})");
    let root = base.join(prefix);
    let world = world(
        &root,
        prefix,
        AgentMode::Daemon {
            binary: agent_binary(),
        },
    )
    .await;
    let clock = PolicyClock::start(30).unwrap();
    let monitor = CopyMonitor::start(world.cluster.nodes().to_vec(), Duration::from_millis(20));
    let mut launch = ControllerLaunch::new(
        &world.cluster,
        world.state_dir.clone(),
        policies_dir(),
        clock.anchor(),
        pod(),
        world.meta.clone(),
        HOME,
    );
    launch.dataset_origin = Some(dataset_spec());
    if matches!(kill, KillAt::BeforeStep) {
        launch.step_delay = Some(StepDelay {
            phase,
            millis: 3000,
        });
    }
    let mut controller = ControllerProcess::spawn_with(
        &world.cluster,
        launch,
        PathBuf::from(env!("CARGO_BIN_EXE_automigrate-embedded-controller")),
    )
    .unwrap();
    let first_pid = controller.pid().unwrap();
    let state_dir = world.state_dir.clone();
    let at_epoch = match trouble {
        Trouble::Degraded => 8,
        Trouble::Failed => 12,
    };
    let injector = inject(&world, trouble, at_epoch, move || {
        automigrate_embedded::worker::read_timeline(&state_dir)
    });

    // Kill in the phase: before its step, or once the step was asked for (persisted then).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let wanted = [phase];
        let current = controller.wait_for_phase(&wanted, Duration::from_secs(60));
        let current = current.await.unwrap_or_else(|error| {
            panic!(
                "{label}: {error}\n{:#?}",
                automigrate_embedded::worker::read_timeline(&world.state_dir)
            )
        });
        match kill {
            KillAt::BeforeStep => break,
            KillAt::InStep(_) if current.driver.in_flight.is_some() => break,
            KillAt::InStep(_) => {}
        }
        assert!(std::time::Instant::now() < deadline, "{label}: no step");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if let KillAt::InStep(into_step) = kill {
        tokio::time::sleep(into_step).await;
    }
    controller.kill9().unwrap();
    let killed_in = controller.current_migration().unwrap().unwrap();
    assert_eq!(killed_in.state.phase, phase, "{label}");
    if matches!(kill, KillAt::BeforeStep) {
        assert_eq!(killed_in.driver.in_flight, None, "{label}");
    }
    assert!(
        controller.exit_record().is_none(),
        "{label}: it was not killed"
    );
    injector.abort();

    controller.restart().unwrap();
    assert_ne!(controller.pid(), Some(first_pid));
    let exit = controller.wait(Duration::from_secs(90)).await.unwrap();
    let record = exit
        .record
        .unwrap_or_else(|| panic!("{label}: no exit record"));
    assert!(
        record.training_done,
        "{label}: {record:?}\n{}",
        std::fs::read_to_string(controller.log_path(2)).unwrap_or_default()
    );
    assert_eq!(exit.code, Some(0));
    let timeline = controller.timeline();
    // What the restarted controller found and did (shown with --nocapture).
    for event in &timeline {
        if matches!(
            event,
            TimelineEvent::ControllerStarted { .. }
                | TimelineEvent::Checkpoint { .. }
                | TimelineEvent::Phase { .. }
                | TimelineEvent::Resumed { .. }
        ) {
            eprintln!("{label}: {event:?}");
        }
    }
    assert!(
        timeline.iter().any(|event| matches!(
            event,
            TimelineEvent::ControllerStarted {
                migration_phase: Some(_),
                ..
            }
        )),
        "{label}: killed in {:?}, no resume: {timeline:#?}",
        killed_in.state.phase
    );
    drop(controller);
    let copies = monitor.stop();
    check_outcome(&label, &world, &reference, &copies, Phase::Succeeded);
    let cluster = Arc::try_unwrap(world.cluster).unwrap();
    cluster.teardown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_process_killed_in_each_phase_is_replaced() {
    if !privileged("a_controller_process_killed_in_each_phase_is_replaced") {
        return;
    }
    let _one_at_a_time = SERIAL.lock().await;
    init_logs();
    let base = tempfile::tempdir().unwrap();
    let cases = [
        // Dead source: the stored checkpoint is restored on a standby.
        (Trouble::Failed, Phase::Syncing, KillAt::BeforeStep),
        (Trouble::Failed, Phase::Fencing, KillAt::BeforeStep),
        // Its `runc restore` goes on without it: the next one waits, then finds it done.
        (
            Trouble::Failed,
            Phase::Restoring,
            KillAt::InStep(Duration::from_millis(100)),
        ),
        // Live source: the agent is taking the final dump when the controller dies.
        (
            Trouble::Degraded,
            Phase::Checkpointing,
            KillAt::InStep(Duration::from_millis(150)),
        ),
        (
            Trouble::Degraded,
            Phase::Transferring,
            KillAt::InStep(Duration::from_millis(50)),
        ),
        (Trouble::Degraded, Phase::Verifying, KillAt::BeforeStep),
    ];
    for (index, (trouble, phase, kill)) in cases.into_iter().enumerate() {
        killed_and_restarted(base.path(), &format!("kill{index}"), trouble, phase, kill).await;
    }
}
