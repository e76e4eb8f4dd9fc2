//! Agent outages during a live migration, at the reconcile level: the controller's real
//! executor against automigrate-kube-fake, with the recording agent double made unreachable
//! for a while. Time is virtual: each executor round is one second later than the one before,
//! and outages are scheduled in those seconds, so every run is deterministic.
//!
//! The property under test is availability: whatever the outage, every migration ends with
//! the workload running somewhere (moved, rolled back, or restarted per policy), never with
//! it stopped for good, and never with two running copies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::Duration;

use automigrate_core::migration::Phase;
use automigrate_operator::crd::Migration;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};

mod common;
use common::*;

/// What a kubelet would do: every pod still Pending (the controller's replacements) runs and
/// is Ready.
fn kubelet(h: &Harness) {
    for mut pod in h.cluster.list::<Pod>() {
        let phase = pod.status.as_ref().and_then(|status| status.phase.clone());
        if phase.as_deref().is_some_and(|phase| phase != "Pending")
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        pod.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        });
        h.cluster.put(&pod);
    }
}

/// The running copies of the training workload. The original pod stops running once the
/// migration's final checkpoint (stop-and-dump) has been taken of it.
fn running_copies(h: &Harness, name: &str) -> Vec<String> {
    let dumped = h
        .cluster
        .get::<Migration>(Some(NS), name)
        .and_then(|migration| migration.status)
        .is_some_and(|status| status.state.checkpoint_id.is_some());
    h.cluster
        .list::<Pod>()
        .into_iter()
        .filter(|pod| {
            pod.metadata
                .labels
                .as_ref()
                .is_some_and(|labels| labels.get("app").map(String::as_str) == Some("trainer"))
        })
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter(|pod| !(dumped && pod.metadata.name.as_deref() == Some("trainer")))
        .map(|pod| pod.metadata.name.unwrap_or_default())
        .collect()
}

/// Pods of the workload that exist but do not run: the original stopped by the final dump. One
/// left behind after the migration ended is a second copy as soon as its runtime restarts it.
fn stopped_leftovers(h: &Harness, name: &str) -> Vec<String> {
    let running = running_copies(h, name);
    h.cluster
        .list::<Pod>()
        .into_iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| pod.metadata.name)
        .filter(|pod| !running.contains(pod))
        .collect()
}

/// Asks for a manual migration of `trainer` to edge-3 and has the decision pass take it.
async fn manual_migration(h: &Harness) -> String {
    let name = h
        .request_migration("trainer", Some("edge-3"), "outage test")
        .await;
    let stores = h.controller.stores.clone();
    let report = h.controller.decider.pass(at(0)).await.unwrap();
    assert_eq!(report.decisions.migrations.len(), 1, "{report:#?}");
    eventually("the started Migration to reach the store", || {
        stores
            .migration(NS, &name)
            .is_some_and(|m| m.status.is_some())
    })
    .await;
    name
}

/// An agent outage: `nodes`' agents answer "unreachable" for `seconds`, from the first round
/// at which the migration is in `from` or a later phase.
struct Outage {
    nodes: Vec<String>,
    from: Phase,
    seconds: i64,
}

/// What one run came to.
#[derive(Debug)]
struct Ended {
    phase: Phase,
    message: String,
    running: Vec<String>,
    leftovers: Vec<String>,
    outage_started: Option<i64>,
    phases: Vec<Phase>,
}

/// Drives the migration one virtual second per round, the outage applied on schedule, until it
/// ends. After every round: never two running copies.
async fn drive_through(h: &Harness, name: &str, outage: &Outage) -> Ended {
    let mut phase = Phase::Pending;
    let mut started: Option<i64> = None;
    let mut phases = vec![phase];
    for second in 1..=3_000i64 {
        let now = at(second);
        h.agent.set_now(now);
        // The kubelets stay alive: only the agents go away.
        for node in ["edge-1", "edge-2", "edge-3"] {
            h.cluster.put(&lease(node, now));
        }
        if started.is_none() && phase >= outage.from && !phase.is_terminal() {
            started = Some(second);
            for node in &outage.nodes {
                h.agent.unreachable(node);
            }
        }
        if started.is_some_and(|start| second >= start + outage.seconds) {
            for node in &outage.nodes {
                h.agent.reachable(node);
            }
        }
        let migration = h.controller.stores.migration(NS, name).unwrap();
        let advanced = h
            .controller
            .executor
            .advance(&migration, now)
            .await
            .unwrap();
        phase = advanced.phase;
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
        kubelet(h);
        let running = running_copies(h, name);
        assert!(
            running.len() <= 1,
            "two running copies at {second}s in {phase}: {running:?}"
        );
        if phase.is_terminal() {
            // Let the reflector see the kubelet's last write before counting.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let status = h
                .cluster
                .get::<Migration>(Some(NS), name)
                .unwrap()
                .status
                .unwrap();
            return Ended {
                phase,
                message: status.state.message.unwrap_or_default(),
                running: running_copies(h, name),
                leftovers: stopped_leftovers(h, name),
                outage_started: started,
                phases,
            };
        }
        // The reflectors catch up with the round's writes (the kubelet's included).
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    panic!("migration {name} never ended; phases {phases:?}");
}

/// The defect: every agent unreachable for about 9 s while the final checkpoint was being
/// sent. Three attempts 2 s apart put the migration into RollingBack, whose restore on the
/// source failed the same way, and it ended Failed with the source already stopped by the
/// dump: training ended. Now the retries ride the outage out within the phase's deadline.
#[tokio::test]
async fn a_nine_second_agent_outage_while_transferring_does_not_end_training() {
    let h = Harness::new().await;
    healthy_cluster(&h, "{}").await;
    h.agent.set_now(at(0));
    h.agent.transfer_polls(2);
    let name = manual_migration(&h).await;
    let outage = Outage {
        nodes: vec!["edge-1".into(), "edge-2".into(), "edge-3".into()],
        from: Phase::Transferring,
        seconds: 9,
    };
    let ended = drive_through(&h, &name, &outage).await;
    assert!(ended.outage_started.is_some(), "{ended:#?}");
    assert_eq!(ended.phase, Phase::Succeeded, "{ended:#?}");
    assert_eq!(ended.running.len(), 1, "{ended:#?}");
    assert!(ended.leftovers.is_empty(), "{ended:#?}");
    assert_ne!(ended.running[0], "trainer", "moved: {ended:#?}");
    let pod: Pod = h.cluster.get(Some(NS), &ended.running[0]).unwrap();
    assert_eq!(
        pod.spec.unwrap().node_name.as_deref(),
        Some("edge-3"),
        "{ended:#?}"
    );
}

/// Splitmix64: a fixed, dependency-free generator, so each seed replays the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// One seeded run: a policy with short or long phase timeouts and a `rollback` or `restart`
/// fallback, the source's, the target's or both agents unreachable for 5–30 s from a random
/// phase on. Returns what it came to.
async fn seeded_run(seed: u64) -> (String, Ended) {
    let mut rng = Rng(seed);
    let checkpoint = rng.pick(&["15s", "5m"]);
    let transfer = rng.pick(&["10s", "20s", "30m"]);
    let restore = rng.pick(&["15s", "5m"]);
    let fallback = rng.pick(&["rollback", "restart"]);
    let policy = format!(
        "checkpoint:\n  timeout: {checkpoint}\ntransfer:\n  timeout: {transfer}\nrestore:\n  timeout: {restore}\n  fallback: {fallback}\n"
    );
    let nodes: Vec<String> = match rng.below(3) {
        0 => vec!["edge-2".into()],
        1 => vec!["edge-3".into()],
        _ => vec!["edge-2".into(), "edge-3".into()],
    };
    let from = *rng.pick(&[
        Phase::Syncing,
        Phase::Checkpointing,
        Phase::Transferring,
        Phase::Fencing,
        Phase::Restoring,
        Phase::Verifying,
    ]);
    let seconds = 5 + rng.below(26) as i64;
    let polls = rng.below(4) as u32;
    let what = format!(
        "seed {seed}: agents of {nodes:?} down {seconds}s from {from}; transfer polls {polls}; policy {policy:?}"
    );

    let h = Harness::new().await;
    healthy_cluster(&h, &policy).await;
    h.agent.set_now(at(0));
    h.agent.transfer_polls(polls);
    let name = manual_migration(&h).await;
    let outage = Outage {
        nodes,
        from,
        seconds,
    };
    let ended = drive_through(&h, &name, &outage).await;
    (what, ended)
}

/// Twenty fixed seeds: every run ends with training running exactly once: moved, rolled back
/// or restarted per policy, never stopped for good.
#[tokio::test]
async fn random_agent_outages_never_leave_training_stopped() {
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for seed in 0..20u64 {
        let (what, ended) = seeded_run(seed).await;
        assert!(
            matches!(
                ended.phase,
                Phase::Succeeded | Phase::RolledBack | Phase::Restarted
            ),
            "{what}: ended {} ({}) after {:?}",
            ended.phase,
            ended.message,
            ended.phases
        );
        assert_eq!(
            ended.running.len(),
            1,
            "{what}: training must run exactly once: {ended:#?}"
        );
        assert!(
            ended.leftovers.is_empty(),
            "{what}: a stopped copy left behind: {ended:#?}"
        );
        *outcomes.entry(ended.phase.to_string()).or_default() += 1;
        println!(
            "{what}\n  -> {} via {:?}: {}",
            ended.phase, ended.phases, ended.message
        );
    }
    println!("outcomes over 20 seeds: {outcomes:?}");
}

/// The rollback's own target stays unreachable: the source's agent is gone for good after the
/// final dump, so the checkpoint cannot be restored there. Past the rollback's deadline the
/// workload is started fresh on the target (fallback `rollback`), and only after the source
/// pod is gone: never Failed with nothing running, never two copies.
#[tokio::test]
async fn a_rollback_whose_source_agent_never_returns_restarts_fresh_after_fencing() {
    let h = Harness::new().await;
    healthy_cluster(
        &h,
        "transfer:\n  timeout: 10s\nrestore:\n  timeout: 15s\n  fallback: rollback\n",
    )
    .await;
    h.agent.set_now(at(0));
    h.agent.transfer_polls(2);
    let name = manual_migration(&h).await;
    let outage = Outage {
        nodes: vec!["edge-2".into()],
        from: Phase::Transferring,
        seconds: 100_000,
    };
    let ended = drive_through(&h, &name, &outage).await;
    assert_eq!(ended.phase, Phase::Restarted, "{ended:#?}");
    assert_eq!(ended.running.len(), 1, "{ended:#?}");
    let pod: Pod = h.cluster.get(Some(NS), &ended.running[0]).unwrap();
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("edge-3"));
    assert!(
        h.cluster.get::<Pod>(Some(NS), "trainer").is_none(),
        "the source pod was fenced: {ended:#?} {:#?}",
        calls(&h.cluster)
    );
    let writes = calls(&h.cluster);
    let deleted = writes
        .iter()
        .position(|w| w == "DELETE /api/v1/namespaces/ml/pods/trainer")
        .expect("the source pod deleted");
    let created = writes
        .iter()
        .position(|w| w == "POST /api/v1/namespaces/ml/pods")
        .expect("a fresh pod created");
    assert!(
        deleted < created,
        "fenced before the fresh start: {writes:#?}"
    );
    let status = h
        .cluster
        .get::<Migration>(Some(NS), &name)
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        status.state.rollback,
        Some(automigrate_core::migration::RollbackAction::RestartFresh)
    );
}
