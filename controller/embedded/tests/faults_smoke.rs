//! The fault-injection suite's smoke subset (the full suite is `automigrate faults`,
//! `sudo scripts/faults.sh`): one run each of a few kinds whose runs are short, with a fixed
//! seed, over real runc, CRIU and agent daemons in network namespaces. Every run must end
//! without a finding: no two copies, no restore from damaged bytes, no stuck migration, every
//! migration ended with a reason, every file verifies, the final loss bit-identical to the
//! uninterrupted run. Needs root, runc, CRIU >= 4, iptables, python3-numpy, the agent binary
//! (`cargo build -p automigrate-agent`) and the controller program (built with this package's
//! tests); with `AUTOMIGRATE_SKIP_PRIVILEGED=1` it skips, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{agent_binary, init_logs, policies_dir, privileged};

use automigrate_embedded::faults::{self, FaultKind, FaultParams, report};
use automigrate_embedded::policies::load_policies;

/// The kinds of the smoke subset, one run each (in the order the seed shuffles them).
const SMOKE_KINDS: [FaultKind; 5] = [
    FaultKind::ControllerKill,
    FaultKind::SourcePartition,
    FaultKind::SourceAgentKill,
    FaultKind::CorruptAtRest,
    FaultKind::PolicyEditInvalid,
];
const SMOKE_SEED: u64 = 20261123;

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
    let agent = agent_binary();
    init_logs();
    let root = tempfile::tempdir().unwrap();
    let settings = faults::standard_settings(
        root.path().to_path_buf(),
        policies_dir(),
        agent,
        SMOKE_SEED,
        SMOKE_KINDS.len(),
        SMOKE_KINDS.to_vec(),
    );
    let policies = load_policies(&settings.demo.policies_dir).unwrap();
    let (reference, records) = faults::run_suite(&settings, &policies, |_, _| {})
        .await
        .unwrap();
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
            "{}: the copy monitor barely ran",
            run.name
        );
        assert!(
            run.training_finished && run.loss_identical,
            "{}\n{text}",
            run.name
        );
        // A partition that heals before the node's lease runs out is rightly not acted on.
        if run.plan.kind != FaultKind::SourcePartition {
            assert!(
                !run.migrations.is_empty(),
                "{}: no migration\n{text}",
                run.name
            );
        }
        for migration in &run.migrations {
            assert!(migration.phase.is_terminal(), "{}\n{text}", run.name);
            assert!(migration.message.is_some(), "{}\n{text}", run.name);
        }
        match &run.plan.params {
            // The damaged copy is never what a replacement runs from.
            FaultParams::CorruptAtRest { .. } => {
                let (node, id) = run.injection.damaged_checkpoint.clone().unwrap();
                assert!(
                    !run.migrations
                        .iter()
                        .any(|migration| migration.target == node
                            && migration.checkpoint.as_deref() == Some(id.as_str())
                            && migration.phase.is_terminal()
                            && migration.phase == automigrate_core::migration::Phase::Succeeded),
                    "{}\n{text}",
                    run.name
                );
            }
            // The refused edit left the shipped policy in force.
            FaultParams::PolicyEdit { .. } => {
                assert_eq!(
                    run.policy_in_force, run.injection.expected_policy,
                    "{}",
                    run.name
                );
                assert!(
                    run.injection
                        .notes
                        .iter()
                        .any(|note| note.contains("refused the edit")),
                    "{}\n{text}",
                    run.name
                );
            }
            _ => {}
        }
    }
    assert!(report.goals_met(), "{text}");
}
