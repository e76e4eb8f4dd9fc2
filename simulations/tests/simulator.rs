//! The simulator's invariants on a small cluster (40 nodes, 120 jobs, frequent failures), and
//! proof that it drives the shared engine rather than deciding by itself.

use std::path::{Path, PathBuf};

use automigrate_core::decide;
use automigrate_sim::scenario::{ClusterScenario, FailureModel, SimPolicy};
use automigrate_sim::sim::{self, RunOptions, RunResult};

/// Shared set-up; a `cfg(test)` module so the lints treat it as the test code it is.
#[cfg(test)]
mod support {
    use super::*;

    pub fn scenarios() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
    }

    pub fn small() -> ClusterScenario {
        ClusterScenario::load(&scenarios().join("test-small.yaml")).unwrap()
    }

    pub fn policy(scenario: &ClusterScenario, name: &str) -> SimPolicy {
        scenario
            .load_policies()
            .unwrap()
            .into_iter()
            .find(|policy| policy.name == name)
            .unwrap()
    }

    pub fn audited(scenario: &ClusterScenario, name: &str) -> RunResult {
        let options = RunOptions {
            audit: true,
            record_passes: 3,
            verify_compact: false,
        };
        sim::run(scenario, &policy(scenario, name), options).unwrap()
    }

    /// Also re-runs every compact pass on the full snapshot (slower).
    pub fn verified(scenario: &ClusterScenario, name: &str) -> RunResult {
        let options = RunOptions {
            audit: true,
            record_passes: 0,
            verify_compact: true,
        };
        sim::run(scenario, &policy(scenario, name), options).unwrap()
    }
}

use support::{audited, policy, scenarios, small, verified};

const POLICIES: [&str; 6] = [
    "kubernetes-default",
    "periodic-only",
    "reactive",
    "proactive",
    "young-daly",
    "specon-like",
];

#[test]
fn every_policy_keeps_the_invariants() {
    let scenario = small();
    for name in POLICIES {
        let result = audited(&scenario, name);
        let audit = &result.audit;
        assert!(audit.checks > 100, "{name}: the audit ran ({audit:?})");
        assert_eq!(
            audit.running_on_dead_node, 0,
            "{name}: a job ran on a dead node"
        );
        assert_eq!(audit.running_twice, 0, "{name}: a job ran twice");
        assert_eq!(
            audit.overcommitted_nodes, 0,
            "{name}: a node was overcommitted"
        );
        assert_eq!(
            audit.work_not_conserved, 0,
            "{name}: work was created or lost"
        );
        assert_eq!(
            result.metrics.jobs_finished, result.metrics.jobs,
            "{name}: every job finishes"
        );
        // Conservation of work: a job's running time is its work plus the work it did again.
        for job in &result.jobs {
            assert_eq!(
                job.run_time,
                job.work + job.lost_work,
                "{name}: job {} ran {} ms for {} ms of work and {} ms re-done",
                job.id,
                job.run_time,
                job.work,
                job.lost_work
            );
            let finished = job.finished.unwrap();
            assert!(
                finished >= job.arrival + job.work,
                "{name}: job {} too fast",
                job.id
            );
        }
        assert!(
            result.metrics.node_failures > 0,
            "{name}: failures happened"
        );
    }
}

#[test]
fn compact_passes_decide_what_full_passes_decide() {
    let scenario = small();
    for name in ["periodic-only", "young-daly"] {
        let result = verified(&scenario, name);
        assert!(
            result.audit.compact_checks > 100,
            "{name}: {:?}",
            result.audit
        );
        assert_eq!(
            result.audit.compact_mismatches, 0,
            "{name}: {:?}",
            result.audit
        );
    }
}

#[test]
fn runs_are_deterministic_per_seed() {
    let scenario = small();
    for name in ["kubernetes-default", "proactive", "specon-like"] {
        let policy = policy(&scenario, name);
        let first = sim::run(&scenario, &policy, RunOptions::default()).unwrap();
        let second = sim::run(&scenario, &policy, RunOptions::default()).unwrap();
        assert_eq!(first.metrics, second.metrics, "{name}");
        assert_eq!(first.jobs, second.jobs, "{name}");
        assert_eq!(first.engine, second.engine, "{name}");

        let mut reseeded = scenario.clone();
        reseeded.seed += 1;
        let other = sim::run(&reseeded, &policy, RunOptions::default()).unwrap();
        assert_ne!(first.jobs, other.jobs, "{name}: another seed, another run");
    }
}

#[test]
fn migrations_go_where_the_shared_engine_says() {
    let scenario = small();
    let result = audited(&scenario, "reactive");
    assert!(result.engine.decide_calls > 0);
    let reason = result.engine.first_failure_reason.as_deref().unwrap();
    assert!(
        reason.contains("failed") && reason.contains("lease not renewed"),
        "the engine's own reason text: {reason}"
    );
    assert!(
        !result.recorded.is_empty(),
        "a pass that migrated was recorded"
    );
    for pass in &result.recorded {
        // The same inputs give the engine's same answer…
        let policies = {
            let mut set = automigrate_core::PolicySet::new();
            let reactive = policy(&scenario, "reactive");
            set.insert(&reactive.name, reactive.engine.clone());
            set
        };
        let (again, _) = decide(&pass.snapshot, &policies, &pass.memory, pass.now);
        assert_eq!(again, pass.decisions);
        // …and the simulator moved the pod to the target the engine chose.
        for migration in &pass.decisions.migrations {
            let id: usize = migration
                .pod
                .name
                .trim_start_matches("job-")
                .parse()
                .unwrap();
            let job = &result.jobs[id];
            assert!(
                job.placements.contains(&migration.to),
                "job {id} never ran on {} ({:?})",
                migration.to,
                job.placements
            );
        }
    }
}

#[test]
fn policies_rank_as_their_mechanisms_predict() {
    let scenario = small();
    let kubernetes = audited(&scenario, "kubernetes-default").metrics;
    let reactive = audited(&scenario, "reactive").metrics;
    let proactive = audited(&scenario, "proactive").metrics;
    // Checkpoints turn restarts from zero into small losses.
    assert!(reactive.redone_node_hours * 5.0 < kubernetes.redone_node_hours);
    // The engine detects a failure in 30 s, Kubernetes evicts after 350 s.
    assert!(reactive.downtime_node_hours < kubernetes.downtime_node_hours);
    // Draining degrading nodes means fewer failures catch a job.
    assert!(proactive.failures_hitting_jobs < reactive.failures_hitting_jobs);
    assert!(proactive.proactive_migrations > 0);
    assert_eq!(kubernetes.checkpoints, 0);
    assert_eq!(kubernetes.migrations, 0);
}

#[test]
fn a_failure_trace_drives_the_failures() {
    let mut scenario = small();
    scenario.failures.model = FailureModel::Trace;
    scenario.failures.trace = Some("test-trace.csv".into());
    scenario.failures.precursor.false_alarms_per_node_year = 0.0;
    let rows = scenario.load_trace().unwrap();
    let result = audited(&scenario, "proactive");
    let before_end: Vec<_> = rows
        .iter()
        .filter(|row| row.fail_at * 1000.0 < result.ended_at as f64)
        .collect();
    assert_eq!(result.metrics.node_failures as usize, before_end.len());
    assert_eq!(result.audit.running_on_dead_node, 0);
}

#[test]
fn shipped_scenarios_and_policies_load() {
    let scale = ClusterScenario::load(&scenarios().join("scale-1000.yaml")).unwrap();
    assert_eq!(scale.cluster.nodes, 1000);
    let policies = scale.load_policies().unwrap();
    let names: Vec<&str> = policies.iter().map(|policy| policy.name.as_str()).collect();
    assert_eq!(names, POLICIES);
    let paper =
        automigrate_sim::scenario::PaperScenario::load(&scenarios().join("paper.yaml")).unwrap();
    assert_eq!(paper.load_published().unwrap().table3.len(), 12);
}

#[test]
fn a_typo_in_a_scenario_names_its_field() {
    let dir = std::env::temp_dir().join(format!("automigrate-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(scenarios().join("test-small.yaml"))
        .unwrap()
        .replace("probesPerNode", "probesPerNodes");
    let path = dir.join("typo.yaml");
    std::fs::write(&path, text).unwrap();
    let error = ClusterScenario::load(&path).unwrap_err().to_string();
    assert!(error.contains("probesPerNodes"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mobility_moves_follow_the_user() {
    let mut scenario = small();
    // Spread the cells out so a user can end up far from the job's node.
    scenario.cluster.cells = 20;
    let users = scenario.users.as_mut().unwrap();
    users.latency_per_hop = std::time::Duration::from_millis(8);
    users.move_mean = std::time::Duration::from_secs(1800);
    let result = verified(&scenario, "proactive");
    assert!(
        result.metrics.mobility_migrations > 0,
        "{:?}",
        result.metrics
    );
    assert!(result.audit.compact_checks > 0);
    assert_eq!(result.audit.compact_mismatches, 0);
}
