//! The fault-injection suite's smoke subset (the full suite is `automigrate faults`,
//! `sudo scripts/faults.sh`): one run each of two kinds, with a fixed seed, on the local
//! cluster of real components (API server, two controller replicas, a kubelet and an agent pod
//! per node). Every run must end without a finding: no two copies in runc, no restore from
//! damaged bytes, no stuck migration, every migration ended with a reason, every file verifies,
//! the final loss bit-identical to the uninterrupted run. Needs root, runc, CRIU >= 4,
//! iptables, python3-numpy, kubectl, and the binaries built first (`cargo build -p automigrate
//! -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent -p automigrate-operator
//! --locked`); with `AUTOMIGRATE_SKIP_PRIVILEGED=1` it skips, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
mod common;

use common::{init_logs, privileged};

use automigrate_embedded::faults::{self, FaultKind, FaultParams, report};

/// The kinds of the smoke subset, one run each (in the order the seed shuffles them).
const SMOKE_KINDS: [FaultKind; 2] = [FaultKind::ControllerKill, FaultKind::CorruptAtRest];
const SMOKE_SEED: u64 = 20261206;

#[test]
fn the_smoke_plan_is_one_run_per_kind_and_fixed_by_the_seed() {
    let plans = faults::plan_runs(SMOKE_SEED, SMOKE_KINDS.len(), &SMOKE_KINDS);
    let mut kinds: Vec<FaultKind> = plans.iter().map(|plan| plan.kind).collect();
    kinds.sort();
    let mut expected = SMOKE_KINDS.to_vec();
    expected.sort();
    assert_eq!(kinds, expected);
    assert_eq!(
        plans,
        faults::plan_runs(SMOKE_SEED, SMOKE_KINDS.len(), &SMOKE_KINDS)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_smoke_subset_has_no_findings() {
    if !privileged("fault_injection_smoke_subset_has_no_findings") {
        return;
    }
    let Some(bin_dir) = automigrate_embedded::kube::find_bin_dir() else {
        panic!(
            "the cluster's binaries were not found: build them first with `cargo build -p \
             automigrate -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent \
             -p automigrate-operator --locked`"
        );
    };
    init_logs();
    let root = tempfile::Builder::new()
        .prefix("automigrate-faults-smoke-")
        .tempdir_in("/dev/shm")
        .unwrap();
    let settings = faults::standard_settings(
        root.path().to_path_buf(),
        bin_dir,
        SMOKE_SEED,
        SMOKE_KINDS.len(),
        SMOKE_KINDS.to_vec(),
    );
    let (reference, records) = faults::run_suite(&settings, |_, _| {}).await.unwrap();
    let report = report::build(
        &settings,
        reference,
        records,
        "cargo test -p automigrate-embedded --test faults_smoke",
        &report::git_commit(),
        automigrate_embedded::report::Machine::probe(),
        Vec::new(),
    );
    let text = report::render_markdown(&report);
    println!("{text}");
    assert_eq!(report.runs.len(), SMOKE_KINDS.len());
    for run in &report.runs {
        assert!(
            run.fault_fired,
            "{}: the fault never struck\n{text}",
            run.name
        );
        assert!(
            run.findings.is_empty(),
            "{}: {:?}\n{text}",
            run.name,
            run.findings
        );
        assert!(
            run.copies.samples > 10,
            "{}: the runc sampler barely ran",
            run.name
        );
        assert!(
            run.training_finished && run.loss_identical,
            "{}\n{text}",
            run.name
        );
        assert!(
            !run.migrations.is_empty(),
            "{}: no migration\n{text}",
            run.name
        );
        for migration in &run.migrations {
            assert!(migration.is_terminal(), "{}\n{text}", run.name);
            assert!(migration.message.is_some(), "{}\n{text}", run.name);
        }
        // The damaged copy is never what a replacement runs from.
        if let FaultParams::CorruptAtRest { .. } = &run.plan.params {
            let (node, id) = run.injection.damaged_checkpoint.clone().unwrap();
            assert!(
                !run.migrations
                    .iter()
                    .any(|migration| migration.target == node
                        && migration.checkpoint.as_deref() == Some(id.as_str())
                        && migration.phase == Some(automigrate_core::migration::Phase::Succeeded)),
                "{}\n{text}",
                run.name
            );
        }
    }
    assert!(report.goals_met(), "{text}");
}
