//! The leading `automigrate-controller` replica dies (`kill -9`) in the middle of a migration
//! and the other replica, once it holds the leader Lease, finishes that same migration from
//! what the API server holds: resumed, never restarted, never two copies.
//!
//! On the local cluster of real components ([`KubeCluster`]: the API server and two controller
//! replicas in `control`, a kubelet and the agent pod per node): a protected counter pod runs
//! on node-a with periodic checkpoints replicated to node-b. Each case starts a migration to
//! node-b (a live one: node-a reports `KernelDeadlock` as node-problem-detector would; or a
//! dead-source one: node-a is powered off once node-b holds a recorded checkpoint), watches the
//! Migration's `status.phase` on the API server every few milliseconds (plain HTTP, not a
//! `kubectl` process per look) and SIGKILLs the leader as soon as the phase is one of the
//! case's phases. The killed replica is started again (as its Deployment would) only once the
//! other one holds the Lease, so it is the other replica that finishes.
//!
//! Checked in every case: the phase the API server showed when the leader died is one of the
//! case's phases (else the case did not test what it says, and fails); the other replica took
//! the Lease; the same Migration object ended `Succeeded` (`RolledBack` is accepted only with
//! the workload running exactly once, as the operator's rules allow a rollback); the pod's
//! command ran once (a restore, not a fresh start) and its count never fell below 10 once the
//! trouble began (the checkpoints a migration may use were taken after it reached 10; a fresh
//! start counts from 1), nor, for a live migration (whose final dump is taken after the
//! trouble), below the count it had then; sampled from runc on every node every 50 ms, never
//! two running copies; at the end exactly one copy runs.
//!
//! Phases: the controller cannot be paused inside a step, and the harness adds no hook, so only
//! phases that last long enough to be seen by polling are aimed at. Live: `Checkpointing` (the
//! final dump, about 0.5 s), `Transferring` (its send, 0.5-1 s), `Fencing` (the source stopped
//! and fenced, about 3 s), `Restoring` or `Verifying` (the target kubelet restores the
//! checkpoint image in tens of milliseconds, then the pod becomes Ready in about 1 s: the case
//! takes whichever it sees first). Dead source: `Fencing`, `Restoring` or `Verifying`, whichever
//! is seen first (its Fencing lasts about 10 ms, so a look may miss it; Verifying always lasts
//! long enough). Not aimed at: `Pending` and `Syncing` (about 1 s each, before anything moved;
//! the fault suite's controller-kill kind kills in them; a dead source's Syncing lasts
//! milliseconds), `RollingBack` (no rollback happens here). Each case prints the phase it hit
//! and the phase durations the controller recorded. This replaces
//! `controller_restart.rs`, which killed the embedded controller at exact points it could halt
//! at; the real controller has no such hooks, and the harness adds none.
//!
//! Needs root, runc, CRIU and the binaries built first:
//! `cargo build -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent
//! -p automigrate-operator -p automigrate --locked`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_embedded::faults::api::ApiReader;
use automigrate_embedded::kube::KubeCluster;
use common::*;
use serde_json::Value;

const HOME: &str = "node-a";
const TARGET: &str = "node-b";

/// What moves the counter away from node-a.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Trouble {
    /// node-a reports `KernelDeadlock`: a live migration with a final dump.
    Degraded,
    /// node-a is powered off: the recorded checkpoint on node-b is restored.
    PoweredOff,
}

/// The phases the controller recorded, each with how long it took: `"Fencing 1s 20ms"`.
fn history(migration: &Value) -> Vec<String> {
    migration["status"]["history"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|step| {
                    format!(
                        "{} {}",
                        step["phase"].as_str().unwrap_or_default(),
                        step["duration"].as_str().unwrap_or("-")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` every 100 ms for up to `limit`.
async fn eventually<T>(what: &str, limit: Duration, check: impl FnMut() -> Option<T>) -> T {
    eventually_every(Duration::from_millis(100), what, limit, check).await
}

/// What the killer saw.
#[derive(Debug, Clone)]
struct Kill {
    replica: usize,
    migration: String,
    /// The phase the API server showed right before the kill.
    phase_before: String,
    /// The phase it showed right after (a write the leader had in flight may have landed).
    phase_after: String,
}

/// Watches the Migrations on the API server every 2 ms and SIGKILLs `leader` as soon as one is
/// in one of `phases`.
fn kill_leader_in(
    cluster: Arc<KubeCluster>,
    api: ApiReader,
    leader: usize,
    phases: &'static [&'static str],
    limit: Duration,
) -> std::thread::JoinHandle<Option<Kill>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            let seen = api
                .migrations()
                .into_iter()
                .find(|m| phases.contains(&phase(m).as_str()));
            if let Some(migration) = seen {
                cluster.kill_controller(leader).unwrap();
                let name = migration["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let after = api
                    .migrations()
                    .into_iter()
                    .find(|m| m["metadata"]["name"] == name.as_str())
                    .map(|m| phase(&m))
                    .unwrap_or_default();
                return Some(Kill {
                    replica: leader,
                    migration: name,
                    phase_before: phase(&migration),
                    phase_after: after,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    })
}

/// One case: a migration of the counter to node-b, the leader killed in one of `phases`.
async fn leader_killed_in(prefix: &str, trouble: Trouble, phases: &'static [&'static str]) {
    let label = format!("{trouble:?}, leader killed in {phases:?}");
    let state = format!("failover-{prefix}");
    let (cluster, root, work) = protected_pod_cluster(prefix, &state, HOME, COUNTER_SCRIPT).await;
    let dump = DumpOnFailure(&cluster);
    let api = ApiReader::from_kubeconfig(cluster.kubeconfig()).unwrap();

    await_counter_counting(
        &cluster,
        &work,
        &format!("{label}: the counter Running on {HOME}"),
    )
    .await;
    let mut sampler = Sampler::start(cluster.clone(), Some(work.clone()));

    // A checkpoint taken after the count reached 10, held on node-b and recorded by the
    // controller: what a dead-source migration restores (and a floor for the count).
    let what = format!("{label}: a new checkpoint on {TARGET}, recorded by the controller");
    await_recorded_checkpoint(&cluster, TARGET, (true, false), 120, &what).await;
    assert!(api.migrations().is_empty(), "{label}: a migration already");

    let leader = cluster.controller_leader().expect("a leader");
    let killer = kill_leader_in(
        cluster.clone(),
        api.clone(),
        leader,
        phases,
        Duration::from_secs(180),
    );
    let count_at_trouble = progress(&work).unwrap();
    let trouble_at = Instant::now();
    match trouble {
        Trouble::Degraded => cluster
            .set_node_condition(HOME, "KernelDeadlock", "True", "FailoverTest")
            .unwrap(),
        Trouble::PoweredOff => cluster.power_off(HOME).unwrap(),
    }
    let kill = tokio::task::spawn_blocking(move || killer.join().unwrap())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{label}: no Migration was seen in {phases:?}"));
    eprintln!("{label}: {kill:?}");
    assert!(
        phases.contains(&kill.phase_before.as_str()),
        "{label}: killed in {}",
        kill.phase_before
    );

    // The other replica takes the Lease over (once it expires); then the killed one comes back
    // as a standby, as its Deployment would restart it.
    let new_leader = eventually(
        &format!("{label}: the other replica leading"),
        Duration::from_secs(90),
        || {
            cluster
                .controller_leader()
                .filter(|new| *new != kill.replica)
        },
    )
    .await;
    cluster.start_controller(kill.replica).unwrap();

    let migration = eventually(
        &format!("{label}: the Migration to end"),
        Duration::from_secs(240),
        || {
            let migration = api
                .migrations()
                .into_iter()
                .find(|m| m["metadata"]["name"] == kill.migration.as_str())?;
            matches!(
                phase(&migration).as_str(),
                "Succeeded" | "RolledBack" | "Restarted" | "Failed"
            )
            .then_some(migration)
        },
    )
    .await;
    let ended = phase(&migration);
    let steps = history(&migration);
    // One migration: the new leader went on with the Migration it found, it started none.
    let all = api.migrations();
    assert_eq!(
        all.len(),
        1,
        "{label}: more than one Migration: {:#?}",
        all.iter()
            .map(|m| (m["metadata"]["name"].clone(), phase(m)))
            .collect::<Vec<_>>()
    );
    assert!(
        ended == "Succeeded" || ended == "RolledBack",
        "{label}: the Migration ended {ended}: {:#}",
        migration["status"]
    );
    assert!(
        steps
            .iter()
            .any(|step| step.split(' ').next() == Some(kill.phase_before.as_str())),
        "{label}: the history {steps:?} lacks the phase of the kill"
    );
    let log = controller_log(&cluster, new_leader);
    assert!(
        log.contains(&kill.migration),
        "controller-{new_leader}'s log never names {}",
        kill.migration
    );

    // Where the counter runs now: node-b after a success; after a rollback, wherever it is,
    // once.
    let expected_node = (ended == "Succeeded").then_some(TARGET);
    if let Some(replacement) = migration["status"]["replacementPod"].as_str()
        && ended == "Succeeded"
    {
        let pod = eventually(
            &format!("{label}: the replacement Running"),
            Duration::from_secs(60),
            || {
                let pod = cluster.get(&["pod", replacement, "-n", "default"])?;
                (pod["status"]["phase"] == "Running").then_some(pod)
            },
        )
        .await;
        assert_eq!(pod["spec"]["nodeName"], TARGET, "{label}");
        assert_runs_a_checkpoint_image(&pod, &format!("{label}: "));
    }
    let resumed = eventually(
        &format!("{label}: the counter counting again"),
        Duration::from_secs(60),
        || {
            let copies = counter_copies(&cluster);
            (copies.len() == 1).then_some(())?;
            progress(&work)
        },
    )
    .await;
    await_counting_past(&work, resumed, &format!("{label}: the counter counting on")).await;
    sampler.stop();

    // Resumed, never restarted: the command ran once, and the count never fell below what it
    // had reached before the recorded checkpoint the migration could use.
    let lowest = sampler.assert_resumed(
        &work,
        trouble_at,
        &format!("{label} (count {count_at_trouble} when the trouble began): "),
    );
    if trouble == Trouble::Degraded {
        assert!(
            lowest >= count_at_trouble,
            "{label}: the count fell to {lowest} below {count_at_trouble}, its value when the \
             live migration began: not the final dump"
        );
    }
    let samples = sampler.samples().len();
    let doubles = sampler.doubles();
    assert!(samples > 10, "{label}: runc sampled only {samples} times");
    assert!(
        doubles.is_empty(),
        "{label}: two copies ran at once: {doubles:?}"
    );
    let running = counter_copies(&cluster);
    assert_eq!(running.len(), 1, "{label}: running {running:?}");
    if let Some(node) = expected_node {
        assert_eq!(running[0].0, node, "{label}");
    }
    eprintln!(
        "{label}: {} killed automigrate-controller-{} with the API server at {} (then {}); \
         automigrate-controller-{new_leader} took over; the Migration ended {ended}, phases \
         {steps:?}; count {count_at_trouble} at the trouble, lowest after {lowest}, {} at the \
         end; {samples} runc samples, never two copies",
        kill.migration,
        kill.replica,
        kill.phase_before,
        kill.phase_after,
        progress(&work).unwrap_or(0),
    );

    drop(dump);
    drop(sampler);
    teardown(cluster, &root).await;
}

async fn case(prefix: &str, trouble: Trouble, phases: &'static [&'static str]) {
    let Some(_one) = common::begin(&format!("controller_failover {prefix}")).await else {
        return;
    };
    leader_killed_in(prefix, trouble, phases).await;
}

// A live migration (node-a degraded): the final dump (about 0.5 s), its transfer (0.5-1 s),
// the source stopped and fenced (about 3 s), then the restore on node-b (Restoring lasts tens of milliseconds; Verifying, about 1 s, is
// what a late look catches).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_during_the_final_dump_of_a_live_migration() {
    case("cfdump", Trouble::Degraded, &["Checkpointing"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_a_live_migration_s_checkpoint_is_sent() {
    case("cfsend", Trouble::Degraded, &["Transferring"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_restoring_or_verifying_a_live_migration() {
    case("cfrestore", Trouble::Degraded, &["Restoring", "Verifying"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_a_live_migration_fences_the_source() {
    case("cffence", Trouble::Degraded, &["Fencing"]).await;
}

// A dead source (node-a powered off): Syncing and Fencing last milliseconds there (the node
// counted as dead before the Migration began), Restoring tens of milliseconds, Verifying about
// 1 s: the case takes whichever of the last three it sees first.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_while_a_powered_off_node_s_pod_is_fenced_or_restored() {
    case(
        "cfdead",
        Trouble::PoweredOff,
        &["Fencing", "Restoring", "Verifying"],
    )
    .await;
}
