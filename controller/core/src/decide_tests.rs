use std::time::Duration;

use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::annotations::{CHECKPOINT_INTERVAL, DATASET, POLICY, PROTECT, REPLICATE_TO, USER};
use crate::fixtures::{NodeBuilder, PodBuilder, SyntheticCluster, link_both_ways};
use crate::migration::Phase;
use crate::model::*;

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn policies(entries: &[(&str, &str)]) -> PolicySet {
    let mut set = PolicySet::new();
    for (name, text) in entries {
        set.apply(name, text).unwrap();
    }
    set
}

fn run(snapshot: &ClusterSnapshot, set: &PolicySet, now: Timestamp) -> Decisions {
    decide(snapshot, set, &EngineMemory::default(), now).0
}

/// Three nodes: `a` (the pod's), `b` near it, `c` far; the pod's checkpoint is on a and b.
/// No leases, so only the Ready condition speaks for health at any `now`.
fn triangle() -> ClusterSnapshot {
    let mut links = Vec::new();
    links.extend(link_both_ways("a", "b", Duration::from_millis(2)));
    links.extend(link_both_ways("a", "c", Duration::from_millis(30)));
    links.extend(link_both_ways("b", "c", Duration::from_millis(30)));
    ClusterSnapshot {
        nodes: vec![
            NodeBuilder::new("a").build(),
            NodeBuilder::new("b").build(),
            NodeBuilder::new("c").build(),
        ],
        pods: vec![
            PodBuilder::new("ml", "train", "a")
                .checkpoint("ck-7", t(-60), 1 << 30, &["a", "b"])
                .build(),
        ],
        links,
        ..ClusterSnapshot::default()
    }
}

fn fail_node(snapshot: &mut ClusterSnapshot, name: &str) {
    let node = snapshot.nodes.iter_mut().find(|n| n.name == name).unwrap();
    *node = NodeBuilder::new(name)
        .heartbeat(t(-100))
        .not_ready_since(t(-60))
        .build();
}

#[test]
fn failed_node_moves_the_pod_to_the_replica_holder() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert_eq!(decisions.migrations.len(), 1, "{decisions:#?}");
    let migration = &decisions.migrations[0];
    assert_eq!((migration.from.as_str(), migration.to.as_str()), ("a", "b"));
    assert_eq!(migration.trigger, Trigger::NodeFailed);
    assert!(
        migration.reason.starts_with("node a failed: "),
        "{}",
        migration.reason
    );
    assert_eq!(migration.failed_at, Some(t(-100)));
    match &migration.checkpoint {
        CheckpointSource::Stored { id, from, age, .. } => {
            assert_eq!((id.as_str(), from.as_str()), ("ck-7", "b"));
            assert_eq!(*age, Duration::from_secs(60));
        }
        other => panic!("expected the stored checkpoint, got {other:?}"),
    }
    assert!(
        migration.transfers.is_empty(),
        "the checkpoint is already on b"
    );
    assert_eq!(migration.candidates[0].node, "b");
    assert_eq!(migration.candidates[1].node, "c");
    assert!(
        decisions.checkpoints.is_empty(),
        "a dead node cannot checkpoint"
    );
    assert_eq!(decisions.nodes.len(), 1);
    assert_eq!(decisions.nodes[0].assessment.state, NodeState::Failed);
}

#[test]
fn no_surviving_checkpoint_means_restart_from_the_beginning() {
    let mut snapshot = triangle();
    snapshot.pods[0].last_checkpoint.as_mut().unwrap().held_on = vec!["a".into()];
    fail_node(&mut snapshot, "a");
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    let migration = &decisions.migrations[0];
    assert_eq!(migration.checkpoint, CheckpointSource::None);
    assert!(migration.reason.contains("restarts from the beginning"));
}

#[test]
fn degraded_node_migrates_with_a_fresh_incremental_checkpoint() {
    let mut snapshot = triangle();
    snapshot.nodes[0] = NodeBuilder::new("a")
        .condition("DiskPressure", ConditionStatus::True)
        .build();
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    let migration = &decisions.migrations[0];
    assert_eq!(migration.trigger, Trigger::NodeDegraded);
    assert_eq!(
        migration.reason,
        "node a is degrading: DiskPressure is True"
    );
    assert_eq!(
        migration.checkpoint,
        CheckpointSource::Fresh {
            base: Some("ck-7".into())
        }
    );
    assert_eq!(migration.to, "b");
    assert_eq!(migration.transfers.len(), 1);
    assert_eq!(migration.transfers[0].payload, Payload::Checkpoint);
    assert_eq!(migration.transfers[0].bytes, Bytes(1 << 30));
    assert!(!migration.transfers[0].link_assumed);
}

#[test]
fn never_targets_a_node_that_cannot_fit_and_says_why() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    snapshot.nodes[1] = NodeBuilder::new("b").requested(0, 30 << 30, 0).build();
    snapshot.nodes[2] = NodeBuilder::new("c").requested(7800, 0, 0).build();
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert!(decisions.migrations.is_empty());
    let deferred = &decisions.deferred[0];
    assert_eq!(deferred.trigger, Trigger::NodeFailed);
    assert!(deferred.no_target, "{deferred:?}");
    assert!(
        deferred
            .reason
            .ends_with("no node can take it: of 2 considered, 1 short of cpu, 1 short of memory"),
        "{}",
        deferred.reason
    );
}

#[test]
fn earlier_placements_reserve_room() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    // b has room for one 4 GiB pod only, c for several.
    snapshot.nodes[1] = NodeBuilder::new("b").requested(0, 27 << 30, 0).build();
    snapshot.pods = (0..3)
        .map(|i| {
            PodBuilder::new("ml", &format!("p{i}"), "a")
                .checkpoint(&format!("ck-{i}"), t(-60), 1 << 30, &["a", "b"])
                .build()
        })
        .collect();
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    let targets: Vec<&str> = decisions.migrations.iter().map(|m| m.to.as_str()).collect();
    assert_eq!(targets, ["b", "c", "c"]);
}

#[test]
fn taints_and_required_labels_exclude_nodes() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    snapshot.nodes[1] = NodeBuilder::new("b")
        .taint("dedicated", TaintEffect::NoSchedule)
        .label("pool", "training")
        .build();
    snapshot.nodes[2] = NodeBuilder::new("c").build();
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert_eq!(
        decisions.migrations[0].to, "c",
        "b's taint is not tolerated"
    );

    let set = policies(&[(
        "default",
        "targeting:\n  requiredLabels: {pool: training}\n  toleratedTaints: [{key: dedicated}]\n",
    )]);
    let decisions = run(&snapshot, &set, t(0));
    assert_eq!(decisions.migrations[0].to, "b");
    assert_eq!(
        decisions.migrations[0].rejected.to_string(),
        "1 missing a required label"
    );
}

fn attempt(phase: Phase, source: &str, finished: i64) -> MigrationRecord {
    MigrationRecord {
        pod: PodRef::new("ml", "train"),
        phase,
        source: source.into(),
        target: Some("b".into()),
        started_at: t(finished - 5),
        finished_at: Some(t(finished)),
    }
}

#[test]
fn failed_attempts_off_a_failed_node_back_off_exponentially() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    let set = PolicySet::new(); // retryBackoff 10s, retryBackoffMax 5m
    snapshot.migrations.push(attempt(Phase::Failed, "a", -4));
    let decisions = run(&snapshot, &set, t(0));
    assert!(decisions.migrations.is_empty(), "{decisions:?}");
    assert_eq!(decisions.deferred[0].trigger, Trigger::NodeFailed);
    assert!(
        decisions.deferred[0]
            .reason
            .ends_with("but the last attempt failed; retrying in 6s"),
        "{}",
        decisions.deferred[0].reason
    );
    assert_eq!(
        run(&snapshot, &set, t(6)).migrations.len(),
        1,
        "10s after it"
    );

    // Two in a row: 20s; a rolled-back attempt counts as failed too.
    snapshot
        .migrations
        .insert(0, attempt(Phase::RolledBack, "a", -30));
    let decisions = run(&snapshot, &set, t(6));
    assert!(
        decisions.deferred[0]
            .reason
            .ends_with("the last 2 attempts failed; retrying in 10s"),
        "{}",
        decisions.deferred[0].reason
    );
    assert_eq!(run(&snapshot, &set, t(16)).migrations.len(), 1);

    // Many: capped at retryBackoffMax.
    for finished in (-400..-30).step_by(10) {
        snapshot
            .migrations
            .push(attempt(Phase::Failed, "a", finished));
    }
    assert!(run(&snapshot, &set, t(295)).migrations.is_empty());
    assert_eq!(run(&snapshot, &set, t(296)).migrations.len(), 1);

    // A success since, or failures moving off another node, do not count.
    snapshot.migrations.push(attempt(Phase::Succeeded, "c", -2));
    assert_eq!(run(&snapshot, &set, t(0)).migrations.len(), 1);
    snapshot.migrations.push(attempt(Phase::Failed, "c", -1));
    assert_eq!(run(&snapshot, &set, t(0)).migrations.len(), 1);
}

#[test]
fn a_retry_avoids_the_node_where_the_last_attempt_failed() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    let set = PolicySet::new();
    assert_eq!(
        run(&snapshot, &set, t(0)).migrations[0].to,
        "b",
        "b holds the checkpoint"
    );
    snapshot.migrations.push(attempt(Phase::Failed, "a", -4)); // a → b failed
    let retry = run(&snapshot, &set, t(6));
    assert_eq!(retry.migrations[0].to, "c", "{retry:?}");

    // With c gone too, b is the only node left: the pod waits, and says why.
    snapshot.nodes.retain(|node| node.name != "c");
    let decisions = run(&snapshot, &set, t(6));
    assert!(decisions.migrations.is_empty());
    assert!(
        decisions.deferred[0]
            .reason
            .contains("an attempt there failed recently"),
        "{}",
        decisions.deferred[0].reason
    );
    // After retryBackoffMax (5m) b is a candidate again.
    assert_eq!(run(&snapshot, &set, t(300)).migrations[0].to, "b");
}

#[test]
fn a_failed_manual_request_is_retried_with_back_off() {
    let mut snapshot = triangle();
    snapshot.requests.push(MigrationRequest {
        pod: PodRef::new("ml", "train"),
        target: Some("c".into()),
    });
    snapshot
        .migrations
        .push(attempt(Phase::RolledBack, "a", -4));
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert!(decisions.migrations.is_empty());
    assert_eq!(decisions.deferred[0].trigger, Trigger::Manual);
    assert_eq!(
        decisions.deferred[0].reason,
        "requested by a user, but the last attempt failed; retrying in 6s"
    );
    assert_eq!(run(&snapshot, &PolicySet::new(), t(6)).migrations.len(), 1);
}

#[test]
fn retry_back_off_settings_are_checked() {
    let mut set = PolicySet::new();
    let error = set
        .apply(
            "default",
            "restore: {retryBackoff: 1m, retryBackoffMax: 30s}",
        )
        .unwrap_err()
        .to_string();
    assert!(error.contains("restore.retryBackoffMax"), "{error}");
    let error = set
        .apply("default", "restore: {retryBackoff: 0s}")
        .unwrap_err()
        .to_string();
    assert!(error.contains("restore.retryBackoff"), "{error}");
}

#[test]
fn cooldown_defers_voluntary_moves_but_not_failures() {
    let mut snapshot = triangle();
    snapshot.nodes[0] = NodeBuilder::new("a")
        .condition("MemoryPressure", ConditionStatus::True)
        .build();
    snapshot.migrations.push(MigrationRecord {
        pod: PodRef::new("ml", "train"),
        phase: Phase::Succeeded,
        source: "c".into(),
        target: Some("a".into()),
        started_at: t(-300),
        finished_at: Some(t(-240)),
    });
    let set = policies(&[("default", "checkpoint: {interval: 1m}")]);
    let decisions = run(&snapshot, &set, t(0));
    assert!(decisions.migrations.is_empty());
    assert_eq!(
        decisions.deferred[0].reason,
        "node a is degrading (MemoryPressure is True), but in cooldown for 6m more (last migration ended 4m ago)"
    );
    assert!(
        !decisions.deferred[0].no_target,
        "a cooldown is not a lack of targets"
    );
    assert_eq!(
        decisions.checkpoints.len(),
        1,
        "still checkpointed while it waits"
    );

    let decisions = run(&snapshot, &PolicySet::new(), t(360));
    assert_eq!(decisions.migrations.len(), 1, "cooldown over");

    fail_node(&mut snapshot, "a");
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert_eq!(
        decisions.migrations.len(),
        1,
        "a failed node ignores the cooldown"
    );
}

#[test]
fn a_pod_with_a_migration_in_flight_is_left_alone() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    snapshot.migrations.push(MigrationRecord {
        pod: PodRef::new("ml", "train"),
        phase: Phase::Transferring,
        source: "a".into(),
        target: Some("b".into()),
        started_at: t(-10),
        finished_at: None,
    });
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert!(decisions.migrations.is_empty());
    assert!(decisions.checkpoints.is_empty());
    assert_eq!(decisions.summary.migrating_pods, 1);
}

fn mobility_snapshot(latency_a: u64, latency_c: u64) -> ClusterSnapshot {
    let mut snapshot = triangle();
    snapshot.pods[0] = PodBuilder::new("ml", "train", "a")
        .annotation(USER, "alice")
        .checkpoint("ck-7", t(-60), 1 << 30, &["a", "b"])
        .build();
    snapshot.users = vec![
        UserObservation {
            user: "alice".into(),
            node: "a".into(),
            latency: Duration::from_millis(latency_a),
        },
        UserObservation {
            user: "alice".into(),
            node: "b".into(),
            latency: Duration::from_millis(latency_a),
        },
        UserObservation {
            user: "alice".into(),
            node: "c".into(),
            latency: Duration::from_millis(latency_c),
        },
    ];
    snapshot
}

const MOBILITY: &str = "triggers:\n  mobility: {threshold: 40ms, hysteresis: 15ms, dwell: 30s}\n";

#[test]
fn mobility_waits_for_the_dwell_time_then_follows_the_user() {
    let set = policies(&[("default", MOBILITY)]);
    let snapshot = mobility_snapshot(60, 10);
    let (first, memory) = decide(&snapshot, &set, &EngineMemory::default(), t(0));
    assert!(first.migrations.is_empty());
    assert!(
        first.deferred[0]
            .reason
            .contains("waiting out the dwell time (0s of 30s)"),
        "{}",
        first.deferred[0].reason
    );
    let (second, memory) = decide(&snapshot, &set, &memory, t(20));
    assert!(second.migrations.is_empty());
    let (third, memory) = decide(&snapshot, &set, &memory, t(30));
    assert_eq!(third.migrations.len(), 1);
    assert_eq!(third.migrations[0].trigger, Trigger::Mobility);
    assert_eq!(
        third.migrations[0].to, "c",
        "only c is within 25ms of alice"
    );
    // The user comes back: the timer resets.
    let (_, memory) = decide(&mobility_snapshot(20, 10), &set, &memory, t(40));
    assert!(memory.mobility_since.is_empty());
}

#[test]
fn mobility_hysteresis_prevents_ping_pong() {
    let set = policies(&[("default", MOBILITY)]);
    // After moving to c, alice drifts: c is now 35 ms away (under the 40 ms threshold) and a is
    // 5 ms. a is much closer, but c is still good enough: no move back.
    let mut snapshot = mobility_snapshot(5, 35);
    snapshot.pods[0].node = "c".into();
    let memory = EngineMemory::default();
    let (decisions, memory) = decide(&snapshot, &set, &memory, t(0));
    let (later, _) = decide(&snapshot, &set, &memory, t(3600));
    assert!(decisions.migrations.is_empty() && later.migrations.is_empty());
    assert!(decisions.deferred.is_empty(), "nothing is even pending");
}

#[test]
fn checkpoints_fall_due_at_the_interval_and_keep_their_standby() {
    let snapshot = triangle();
    let set = policies(&[("default", "checkpoint: {interval: 2m}")]);
    assert!(
        run(&snapshot, &set, t(59)).checkpoints.is_empty(),
        "taken at -60"
    );
    let decisions = run(&snapshot, &set, t(60));
    let checkpoint = &decisions.checkpoints[0];
    assert_eq!(
        checkpoint.reason,
        "last checkpoint ck-7 is 2m old; interval 2m"
    );
    assert_eq!(checkpoint.incremental_on.as_deref(), Some("ck-7"));
    assert_eq!(checkpoint.replicate_to, ["b"]);
    assert_eq!(checkpoint.mode, annotations::CheckpointMode::Transparent);
}

/// Node `a` holds six pods whose checkpoints are due, aged 3–8 minutes (interval 2m), one of
/// them never checkpointed; node `b` holds one due pod.
fn crowded_node(running_on_a: usize) -> ClusterSnapshot {
    let mut snapshot = triangle();
    snapshot.pods.clear();
    for (name, age) in [
        ("p1", 180),
        ("p2", 480),
        ("p3", 300),
        ("p4", 240),
        ("p5", 420),
    ] {
        snapshot.pods.push(
            PodBuilder::new("ml", name, "a")
                .checkpoint(&format!("{name}-1"), t(-age), 1 << 20, &["a"])
                .build(),
        );
    }
    snapshot.pods.push(PodBuilder::new("ml", "p6", "a").build());
    snapshot.pods.push(
        PodBuilder::new("ml", "q1", "b")
            .checkpoint("q1-1", t(-600), 1 << 20, &["b"])
            .build(),
    );
    for index in 0..running_on_a {
        let mut pod = PodBuilder::new("ml", &format!("busy{index}"), "a")
            .checkpoint(&format!("busy{index}-1"), t(-900), 1 << 20, &["a"])
            .build();
        pod.checkpoint_in_progress = true;
        snapshot.pods.push(pod);
    }
    snapshot
}

fn checkpointed(decisions: &Decisions) -> Vec<&str> {
    decisions
        .checkpoints
        .iter()
        .map(|checkpoint| checkpoint.pod.name.as_str())
        .collect()
}

#[test]
fn a_node_runs_at_most_max_concurrent_checkpoints_the_most_overdue_first() {
    let set = policies(&[(
        "default",
        "checkpoint: {interval: 2m, maxConcurrentPerNode: 3}",
    )]);
    let decisions = run(&crowded_node(0), &set, t(0));
    // p6 has none yet, then p2 (8m) and p5 (7m); b's only pod is not held back by a's crowd.
    assert_eq!(checkpointed(&decisions), ["p2", "p5", "p6", "q1"]);
    assert_eq!(decisions.summary.checkpoints_postponed, 3);

    // Checkpoints already running on the node count against the cap.
    let decisions = run(&crowded_node(2), &set, t(0));
    assert_eq!(checkpointed(&decisions), ["p6", "q1"]);
    assert_eq!(decisions.summary.checkpoints_postponed, 5);
    let decisions = run(&crowded_node(3), &set, t(0));
    assert_eq!(checkpointed(&decisions), ["q1"]);
    assert_eq!(decisions.summary.checkpoints_postponed, 6);

    // Room for all of them: nothing is postponed.
    let roomy = policies(&[(
        "default",
        "checkpoint: {interval: 2m, maxConcurrentPerNode: 6}",
    )]);
    let decisions = run(&crowded_node(0), &roomy, t(0));
    assert_eq!(
        checkpointed(&decisions),
        ["p1", "p2", "p3", "p4", "p5", "p6", "q1"]
    );
    assert_eq!(decisions.summary.checkpoints_postponed, 0);
}

#[test]
fn overdue_is_measured_against_each_pods_own_interval() {
    let mut snapshot = crowded_node(0);
    // p1, 5m old on its own 1m interval, is five intervals late; p2, 8m old on the policy's 2m,
    // only four: p1 goes first although p2's checkpoint is older.
    snapshot.pods[0] = PodBuilder::new("ml", "p1", "a")
        .annotation(CHECKPOINT_INTERVAL, "1m")
        .checkpoint("p1-1", t(-300), 1 << 20, &["a"])
        .build();
    snapshot.pods.remove(5); // p6, never checkpointed, would go first
    let set = policies(&[(
        "default",
        "checkpoint: {interval: 2m, maxConcurrentPerNode: 1}",
    )]);
    assert_eq!(checkpointed(&run(&snapshot, &set, t(0))), ["p1", "q1"]);
}

#[test]
fn a_pod_interval_outside_its_policys_bounds_is_reported_and_not_applied() {
    let mut snapshot = triangle();
    // 5s is above the 1s floor every interval obeys, but below this policy's minInterval.
    snapshot.pods[0] = PodBuilder::new("ml", "train", "a")
        .annotation(CHECKPOINT_INTERVAL, "5s")
        .checkpoint("ck-7", t(-60), 1 << 20, &["a"])
        .build();
    let set = policies(&[("default", "checkpoint: {interval: 2m, minInterval: 30s}")]);
    let decisions = run(&snapshot, &set, t(0));
    assert!(
        decisions.checkpoints.is_empty(),
        "the policy's 2m applies, and the last checkpoint is 1m old: {:?}",
        decisions.checkpoints
    );
    let problems: Vec<&str> = decisions
        .problems
        .iter()
        .map(|problem| problem.message.as_str())
        .collect();
    assert_eq!(
        problems,
        [
            "pod ml/train: annotation automigrate.dev/checkpoint-interval: 5s is outside checkpoint.minInterval..maxInterval (30s..1h) of policy `default`; the policy's interval applies"
        ]
    );
}

#[test]
fn zero_concurrent_checkpoints_is_refused_with_its_field() {
    let mut set = PolicySet::new();
    let error = set
        .apply("default", "checkpoint: {maxConcurrentPerNode: 0}")
        .unwrap_err()
        .to_string();
    assert!(error.contains("checkpoint.maxConcurrentPerNode"), "{error}");
}

#[test]
fn auto_interval_follows_young_daly() {
    assert_eq!(
        young_daly_interval(Duration::from_secs(2), Duration::from_secs(86_400)).as_secs(),
        587
    );
    let mut snapshot = triangle();
    snapshot.pods[0] = PodBuilder::new("ml", "train", "a")
        .annotation(CHECKPOINT_INTERVAL, "auto")
        .checkpoint("ck-7", t(-600), 1 << 30, &["a"])
        .build();
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    let checkpoint = &decisions.checkpoints[0];
    assert_eq!(checkpoint.interval.as_secs(), 587);
    assert!(
        checkpoint
            .reason
            .contains("auto: sqrt(2 × 2s measured cost × MTBF 1day)"),
        "{}",
        checkpoint.reason
    );
    assert_eq!(
        checkpoint.replicate_to,
        ["b"],
        "the nearest peer becomes the standby"
    );
}

#[test]
fn bad_annotations_are_reported_against_the_pod() {
    let mut snapshot = triangle();
    snapshot.pods.push(
        PodBuilder::new("ml", "typo", "a")
            .annotation(PROTECT, "yes")
            .build(),
    );
    snapshot.pods.push(
        PodBuilder::new("ml", "missing-policy", "a")
            .annotation(POLICY, "nope")
            .annotation(REPLICATE_TO, "many")
            .build(),
    );
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    let problems: Vec<String> = decisions
        .problems
        .iter()
        .map(|p| format!("{:?} {}", p.severity, p.message))
        .collect();
    assert_eq!(
        problems,
        [
            "Error pod ml/missing-policy names policy `nope`, which does not exist; using (built-in defaults)",
            "Error pod ml/missing-policy: annotation automigrate.dev/replicate-to=\"many\": expected a whole number from 0 to 10",
            "Error pod ml/typo: annotation automigrate.dev/protect=\"yes\": expected `true` or `false`",
        ]
    );
    assert_eq!(decisions.summary.unprotected_pods, 1);
    assert_eq!(decisions.summary.protected_pods, 2);
}

#[test]
fn alerts_move_the_pods_they_name_when_the_policy_honours_them() {
    let mut snapshot = triangle();
    snapshot.alerts.push(Alert {
        name: "TrainingStalled".into(),
        status: AlertStatus::Firing,
        labels: [("namespace", "ml"), ("pod", "train")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
        starts_at: None,
    });
    assert!(
        run(&snapshot, &PolicySet::new(), t(0))
            .migrations
            .is_empty()
    );
    let set = policies(&[("default", "triggers: {alerts: [TrainingStalled]}")]);
    let decisions = run(&snapshot, &set, t(0));
    assert_eq!(decisions.migrations[0].trigger, Trigger::Alert);
    assert_eq!(
        decisions.migrations[0].reason,
        "alert TrainingStalled is firing for the pod"
    );
}

#[test]
fn a_manual_request_goes_where_asked_or_says_why_not() {
    let mut snapshot = triangle();
    snapshot.requests.push(MigrationRequest {
        pod: PodRef::new("ml", "train"),
        target: Some("c".into()),
    });
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert_eq!(decisions.migrations[0].to, "c");
    assert_eq!(decisions.migrations[0].trigger, Trigger::Manual);

    snapshot.nodes[2].unschedulable = true;
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    assert!(decisions.migrations.is_empty());
    assert!(
        decisions.deferred[0]
            .reason
            .ends_with("of 1 considered, 1 cordoned")
    );
}

#[test]
fn anti_affinity_keeps_pods_of_one_job_apart() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    snapshot.pods = vec![
        PodBuilder::new("ml", "worker-0", "a")
            .label("job", "j1")
            .build(),
        PodBuilder::new("ml", "worker-1", "b")
            .label("job", "j1")
            .build(),
    ];
    let set = policies(&[("default", "targeting: {antiAffinityLabel: job}")]);
    let decisions = run(&snapshot, &set, t(0));
    assert_eq!(
        decisions.migrations[0].to, "c",
        "b already runs a pod of job j1"
    );
}

#[test]
fn dataset_moves_from_its_nearest_surviving_copy() {
    let mut snapshot = triangle();
    fail_node(&mut snapshot, "a");
    snapshot.pods[0] = PodBuilder::new("ml", "train", "a")
        .annotation(DATASET, "/data/esc50")
        .checkpoint("ck-7", t(-60), 1 << 30, &["a", "c"])
        .build();
    snapshot.datasets.push(Dataset {
        id: "/data/esc50".into(),
        total_bytes: Bytes(600 << 20),
        file_count: 1000,
        files: Vec::new(),
        present_on: vec!["a".into(), "b".into()],
    });
    let decisions = run(&snapshot, &PolicySet::new(), t(0));
    let migration = &decisions.migrations[0];
    // c holds the checkpoint (1 GiB), b the dataset (600 MiB): c wins on locality and moves the
    // dataset from b.
    assert_eq!(migration.to, "c");
    assert_eq!(migration.transfers.len(), 1);
    let transfer = &migration.transfers[0];
    assert_eq!(
        (transfer.payload, transfer.from.as_str()),
        (Payload::Dataset, "b")
    );
    assert_eq!(transfer.plan.file_count, 1000);
    assert!(
        transfer.plan.units.len() < 200,
        "small files are packed, not one unit each"
    );
}

/// A synthetic cluster with the knobs the properties vary.
fn cluster(seed: u64, nodes: usize, failed: usize, degraded: usize) -> ClusterSnapshot {
    SyntheticCluster {
        seed,
        nodes,
        pods: nodes * 6,
        zones: 3,
        failed_nodes: failed,
        degraded_nodes: degraded,
        probes_per_node: 4,
        users: 10,
        datasets: 5,
        max_checkpoint_age: 1200,
    }
    .build(t(0))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn same_input_same_output_in_any_order(seed in any::<u64>(), failed in 0usize..4, degraded in 0usize..4) {
        let snapshot = cluster(seed, 20, failed, degraded);
        let set = PolicySet::new();
        let first = run(&snapshot, &set, t(0));
        let mut shuffled = snapshot.clone();
        shuffled.pods.reverse();
        shuffled.nodes.reverse();
        let second = run(&shuffled, &set, t(0));
        prop_assert_eq!(&first.migrations, &second.migrations);
        prop_assert_eq!(&first.checkpoints, &second.checkpoints);
        prop_assert_eq!(&first.deferred, &second.deferred);
        prop_assert_eq!(first, run(&snapshot, &set, t(0)));
    }

    #[test]
    fn targets_are_healthy_fit_and_never_the_source(seed in any::<u64>(), failed in 1usize..5, degraded in 0usize..3) {
        let snapshot = cluster(seed, 12, failed, degraded);
        let decisions = run(&snapshot, &PolicySet::new(), t(0));
        let mut placed: HashMap<&str, Resources> = HashMap::new();
        for migration in &decisions.migrations {
            prop_assert_ne!(&migration.from, &migration.to);
            let target = snapshot.nodes.iter().find(|n| n.name == migration.to).unwrap();
            let (assessment, _) = health::assess(target, Signals::default(), &Policy::default(), t(0));
            prop_assert_eq!(assessment.state, NodeState::Healthy, "target {}", target.name);
            prop_assert!(!target.unschedulable);
            let pod = snapshot.pods.iter().find(|p| p.pod_ref() == migration.pod).unwrap();
            let total = placed.entry(target.name.as_str()).or_default();
            *total = total.saturating_add(pod.requests);
            prop_assert!(target.free().shortfall(*total).is_none(), "{} overcommitted", target.name);
        }
        // Every pod on a failed node is either moved or deferred with a reason.
        let failed_pods = snapshot.pods.iter().filter(|p| {
            snapshot.nodes.iter().position(|n| n.name == p.node).unwrap() < failed
        }).count();
        let handled = decisions.migrations.iter().filter(|m| m.trigger == Trigger::NodeFailed).count()
            + decisions.deferred.iter().filter(|d| d.trigger == Trigger::NodeFailed).count();
        prop_assert_eq!(handled, failed_pods);
    }

    #[test]
    fn cooldown_is_always_respected(seed in any::<u64>(), ended_ago in 0i64..1200) {
        let mut snapshot = cluster(seed, 10, 0, 2);
        for pod in &snapshot.pods {
            snapshot.migrations.push(MigrationRecord {
                pod: pod.pod_ref(),
                phase: Phase::Succeeded,
                source: "elsewhere".into(),
                target: Some(pod.node.clone()),
                started_at: t(-ended_ago - 60),
                finished_at: Some(t(-ended_ago)),
            });
        }
        let decisions = run(&snapshot, &PolicySet::new(), t(0));
        if ended_ago < 600 {
            prop_assert!(decisions.migrations.is_empty());
        } else {
            prop_assert!(!decisions.migrations.is_empty());
        }
    }
}

#[test]
fn equal_candidates_are_spread_across_pods_not_piled_on_the_first_name() {
    let mut chosen = std::collections::BTreeSet::new();
    for index in 0..24 {
        let mut snapshot = ClusterSnapshot {
            nodes: ["dead", "n1", "n2", "n3", "n4"]
                .map(|name| NodeBuilder::new(name).build())
                .to_vec(),
            pods: vec![PodBuilder::new("ml", &format!("job-{index}"), "dead").build()],
            ..ClusterSnapshot::default()
        };
        fail_node(&mut snapshot, "dead");
        let decisions = run(&snapshot, &PolicySet::new(), t(0));
        let first = decisions.migrations[0].to.clone();
        // The same pod always gets the same answer.
        assert_eq!(
            run(&snapshot, &PolicySet::new(), t(0)).migrations[0].to,
            first
        );
        chosen.insert(first);
    }
    assert!(chosen.len() >= 3, "ties all went to {chosen:?}");
}

#[test]
fn dwell_timers_of_pods_missing_from_a_partial_snapshot_are_kept() {
    let set = policies(&[("default", MOBILITY)]);
    let snapshot = mobility_snapshot(60, 10);
    let (_, memory) = decide(&snapshot, &set, &EngineMemory::default(), t(0));
    assert!(memory.mobility_since.contains_key("ml/train"));
    let mut partial = snapshot.clone();
    partial.pods.clear();
    let (_, memory) = decide(&partial, &set, &memory, t(10));
    assert_eq!(memory.mobility_since.get("ml/train"), Some(&t(0)));
}

/// The local cluster's timing: Leases renewed every second, a 15 s Lease timeout.
const FAST_HEARTBEAT: &str = "triggers: {heartbeatInterval: 1s, leaseTimeout: 15s}";

/// Node `a` powered off at t(-3): its last heartbeat is 3 s old (its Ready still reads True,
/// nobody is left to change it) and `b` and `c`, whose agents probe it, say `answering` as
/// given; `a`'s own agent last said it reached both.
fn powered_off(b_answered: bool, c_answered: Option<bool>) -> ClusterSnapshot {
    let mut snapshot = triangle();
    snapshot.nodes[0] = NodeBuilder::new("a").heartbeat(t(-3)).build();
    for link in &mut snapshot.links {
        link.answering = match (link.from.as_str(), link.to.as_str()) {
            ("b", "a") => Some(b_answered),
            ("c", "a") => c_answered,
            _ => Some(true),
        };
    }
    snapshot
}

/// A powered-off node whose heartbeat stopped and which no probing peer reaches has its pod
/// migrated 3 s after its last heartbeat, 12 s before its Lease timeout. Fails while decide
/// passes no peer reach to the health rule (the node stays healthy until the Lease timeout).
#[test]
fn a_node_no_peer_reaches_is_failed_before_its_lease_timeout() {
    let set = policies(&[("default", FAST_HEARTBEAT)]);
    let decisions = run(&powered_off(false, Some(false)), &set, t(0));
    assert_eq!(decisions.migrations.len(), 1, "{decisions:#?}");
    let migration = &decisions.migrations[0];
    assert_eq!((migration.from.as_str(), migration.to.as_str()), ("a", "b"));
    assert_eq!(migration.trigger, Trigger::NodeFailed);
    assert_eq!(migration.failed_at, Some(t(-3)));
    assert!(
        migration
            .reason
            .contains("none of the 2 peers probing it reaches it"),
        "{}",
        migration.reason
    );
}

/// One peer that still gets answers, or only one peer saying anything, keeps the node from
/// failing before its Lease timeout; nothing moves. Fails if one signal alone condemns it.
#[test]
fn one_reaching_or_too_few_probing_peers_keep_the_node() {
    let set = policies(&[("default", FAST_HEARTBEAT)]);
    for snapshot in [powered_off(true, Some(false)), powered_off(false, None)] {
        let decisions = run(&snapshot, &set, t(0));
        assert!(decisions.migrations.is_empty(), "{decisions:#?}");
        // At the Lease timeout the node fails anyway.
        let decisions = run(&snapshot, &set, t(12));
        assert_eq!(decisions.migrations.len(), 1, "{decisions:#?}");
    }
    // Unreachable, but its heartbeat is fresh (a peer partition): only suspect.
    let mut partitioned = powered_off(false, Some(false));
    partitioned.nodes[0] = NodeBuilder::new("a").heartbeat(t(0)).build();
    let decisions = run(&partitioned, &set, t(0));
    assert!(decisions.migrations.is_empty(), "{decisions:#?}");
}
