//! End to end, for real: a numpy training job in a runc container on node-a of a 4-node local
//! cluster (network namespaces, emulated links), periodic CRIU checkpoints with a standby copy,
//! node-a fails hard at 75 % of the epochs (agent killed, workload SIGKILLed, links cut), the local controller
//! detects it through the shared engine, restores on the node the policy picks, and training
//! finishes. Needs root, runc, CRIU >= 4, iptables and python3-numpy
//! (`sudo scripts/install-node-deps.sh`); with `AUTOMIGRATE_SKIP_PRIVILEGED=1` it skips, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::{agent_binary, init_logs, policies_dir, privileged};

use automigrate_core::migration::Phase;
use automigrate_embedded::cluster::AgentMode;
use automigrate_embedded::controller::Recovery;
use automigrate_embedded::demo::DemoPlan;
use automigrate_embedded::node::NodeLayout;
use automigrate_embedded::policies::load_policies;
use automigrate_embedded::scenario::{self, RunKind};
use automigrate_embedded::workload::{DatasetSpec, TrainerSpec, verify_dataset};

/// One run at a time: two clusters training at once on two cores would only slow both.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Long enough that a checkpoint taken after the first epoch reaches its standby well before
/// the failure at 75 %: the failure waits for that copy. With 20 epochs, a quiet machine
/// finished training first (CI, 2026-11-23 07:54 UTC: the checkpoint due after 1 s was taken
/// at epoch 15, so about 70 ms an epoch).
const EPOCHS: u32 = 60;

/// A short run: a few seconds of training on a small dataset.
fn short_plan(root: &Path) -> DemoPlan {
    let mut plan = DemoPlan::standard(root.to_path_buf(), policies_dir());
    plan.settings.dataset = DatasetSpec {
        name: "small".into(),
        files: 4,
        rows_per_file: 4096,
        features: 32,
        classes: 4,
        seed: 5,
    };
    plan.settings.trainer = TrainerSpec {
        epochs: EPOCHS,
        hidden: 128,
        seed: 3,
        learning_rate: 0.05,
    };
    // 1 s of real time at scale 30.
    plan.settings.checkpoint_interval = "30s".into();
    plan.settings.keep = true;
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_failure_resumes_from_the_checkpoint_with_the_same_loss() {
    if !privileged("hard_failure_resumes_from_the_checkpoint_with_the_same_loss") {
        return;
    }
    hard_failure_at_75_percent(AgentMode::InProcess).await;
}

/// The same with the `automigrate-agent` daemon on every node (in its namespace, over its HTTP
/// API). The daemon is another package's binary: it is used from `target/<profile>/` (built by
/// `cargo build -p automigrate-agent`, or by `cargo test --workspace` with the agent's tests)
/// or from `$AUTOMIGRATE_AGENT_BIN`; without it the test says so loudly and does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_failure_with_agent_daemons() {
    if !privileged("hard_failure_with_agent_daemons") {
        return;
    }
    hard_failure_at_75_percent(AgentMode::Daemon {
        binary: agent_binary(),
    })
    .await;
}

async fn hard_failure_at_75_percent(agent: AgentMode) {
    let _one_at_a_time = SERIAL.lock().await;
    init_logs();
    let root = tempfile::tempdir().unwrap();
    let mut plan = short_plan(root.path());
    plan.settings.agent = agent;
    let settings = &plan.settings;
    let policies = load_policies(&settings.policies_dir).unwrap();

    let reference = scenario::reference_run(settings).await.unwrap();
    let reference_loss = reference.final_loss_hex.clone().unwrap();
    assert_eq!(reference.final_epoch, Some(EPOCHS));

    // Late enough that a checkpoint taken after the first epochs has reached its standby (the
    // first one is taken at start-up, before any epoch).
    let kind = RunKind::HardFailure {
        percent: 75,
        recovery: Recovery::Resume,
    };
    let run = scenario::controlled_run(settings, &policies, kind, reference.training_s.unwrap())
        .await
        .unwrap();

    // The engine saw the failure and moved the pod.
    assert_eq!(run.migrations.len(), 1, "{:#?}", run.timeline);
    let migration = &run.migrations[0];
    assert_eq!(migration.trigger, "NodeFailed");
    assert_eq!(migration.from, "node-a");
    assert_eq!(migration.phase, Phase::Succeeded, "{:#?}", run.timeline);
    assert_ne!(migration.to, "node-a");

    // Resumed at the checkpointed epoch, not from zero, and as the same process.
    let resumed = run.resumed_from_epoch.unwrap();
    assert!(resumed > 0, "resumed from epoch {resumed}: a restart");
    let (Some(low), Some(high)) = run.checkpoint_epochs.unwrap() else {
        panic!("the restored checkpoint's epochs are unknown: {run:#?}");
    };
    assert!(
        (low..=high).contains(&resumed),
        "resumed after epoch {resumed}, the checkpoint was taken between epochs {low} and {high}"
    );
    assert!(resumed <= run.epoch_at_event.unwrap());
    assert_eq!(
        run.same_process,
        Some(true),
        "the run tag changed: a restart"
    );

    // Bit-identical final loss.
    assert_eq!(run.final_epoch, Some(EPOCHS));
    assert_eq!(run.final_loss_hex.as_deref(), Some(reference_loss.as_str()));

    // Never two copies: the monitor's samples and the progress spans agree.
    assert!(run.copies.samples > 10, "{:?}", run.copies);
    assert_eq!(run.copies.max_running, 1, "{:?}", run.copies);
    assert!(run.copies.overlaps.is_empty(), "{:?}", run.copies.overlaps);
    assert!(!run.progress_overlap, "{:#?}", run.containers);

    // The dataset on the target verifies (every file's BLAKE3 against dataset.json).
    assert!(run.dataset_verified_on.contains(&migration.to));
    let target_dataset = NodeLayout::new(root.path().join(&run.name).join(&migration.to))
        .dataset(&settings.dataset.name);
    let meta = verify_dataset(&target_dataset).unwrap();
    assert_eq!(meta.total_bytes(), settings.dataset.bytes());

    // The migration's state was persisted after every transition and ended Succeeded.
    let persisted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&migration.state_file).unwrap()).unwrap();
    assert_eq!(persisted["state"]["phase"], "Succeeded");
    assert_eq!(persisted["trigger"], "NodeFailed");
}
