//! Self-fencing for real in the local cluster ([`KubeCluster`]): the agents kill their node's
//! protected containers through the kubelet's runc root, the controller (`--dead-node-fencing
//! self-fence`, the default) waits out the safe time.
//!
//! A protected counter pod runs on node-a with periodic checkpoints replicated to node-b; once
//! the controller has recorded one on node-b:
//!
//! - cut off from the API server but alive (node-a <-> control links cut, node-a <-> node-b
//!   kept): node-a's agent kills the counter by itself, the controller restores it on node-b,
//!   nobody else acts, and runc on every node is sampled throughout: never two running copies.
//! - cut off from its peers only (node-a <-> node-b cut): nothing is fenced, moved or stopped
//!   for 20 s (no Migration, the counter keeps running and counting on node-a).
//!
//! Needs root, runc, CRIU and the binaries built first:
//! `cargo build -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent
//! -p automigrate-operator -p automigrate --locked`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(dead_code)]
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automigrate_embedded::kube::{KubeCluster, RuncStatus, runc_status};
use common::*;
use serde_json::Value;

/// A two-node cluster with the fast default policy, the protected counter running on node-a
/// and a checkpoint of it on node-b that the controller has recorded (what it restores from
/// once node-a is gone). Returns the cluster, its root and the counter's work directory.
async fn cluster_with_a_replicated_counter(prefix: &str) -> (Arc<KubeCluster>, PathBuf, PathBuf) {
    let (cluster, root, work) =
        protected_pod_cluster(prefix, "self-fence", "node-a", COUNTER_SCRIPT).await;
    {
        let _dump = DumpOnFailure(&cluster);
        await_counter_counting(&cluster, &work, "the counter Running on node-a").await;
        let what = "a checkpoint of the counter on node-b, recorded by the controller";
        await_recorded_checkpoint(&cluster, "node-b", (false, true), 120, what).await;
    }
    (cluster, root, work)
}

fn agent_log(cluster: &KubeCluster, node: &str) -> String {
    std::fs::read_to_string(cluster.logs_dir().join(format!("agent-{node}.log")))
        .unwrap_or_default()
}

/// The counter's container id on node-a (it runs there).
fn counter_on_a(cluster: &KubeCluster) -> String {
    let running: Copies = counter_copies(cluster)
        .into_iter()
        .filter(|(node, _)| node == "node-a")
        .collect();
    assert_eq!(running.len(), 1, "the counter on node-a: {running:?}");
    running[0].1.clone()
}

/// The agent's self-fence events (`event=fencing|would_fence|fenced|...` in its text log).
fn fence_events(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| {
            [
                "fencing",
                "would_fence",
                "fenced",
                "stop_failed",
                "stop_overdue",
            ]
            .iter()
            .any(|kind| {
                line.contains(&format!("event={kind}"))
                    || line.contains(&format!("event=\"{kind}\""))
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_api_server_fences_itself_and_its_pod_resumes_on_the_other_node() {
    let Some(_one) = common::begin("self_fence cut from the API server").await else {
        return;
    };
    let (cluster, root, work) = cluster_with_a_replicated_counter("sfapi").await;
    let dump = DumpOnFailure(&cluster);
    let mut sampler = Sampler::start(cluster.clone(), None);
    let before = progress(&work).unwrap();
    let original = counter_on_a(&cluster);

    let cut_at = Instant::now();
    let cut_wall = jiff::Timestamp::now();
    cluster.cut_from_api("node-a").unwrap();
    // Alive: its agent and kubelet run on, only the API server is out of reach.
    assert!(cluster.agent_pid("node-a").is_some());

    // node-a's agent kills the counter by itself (stopped, not only frozen by a checkpoint).
    let runc_root = cluster.runc_root("node-a");
    eventually(
        "node-a's agent to stop the counter",
        Duration::from_secs(60),
        || {
            matches!(
                runc_status(&runc_root, &original),
                Some(RuncStatus::Stopped) | None
            )
            .then_some(())
        },
    )
    .await;
    let stopped_after = cut_at.elapsed();
    assert!(
        cluster.agent_pid("node-a").is_some(),
        "node-a's agent died: the counter stopped with it, not by a fence"
    );
    // The agent logs its fence once `runc state` confirms the kill, a little after the process
    // is seen gone here, so the log line is waited for (30 s at most) before it is asserted.
    let fenced = |log: &str| fence_events(log).iter().any(|line| line.contains("fenced"));
    let logged_by = Instant::now() + Duration::from_secs(30);
    while !fenced(&agent_log(&cluster, "node-a")) && Instant::now() < logged_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = agent_log(&cluster, "node-a");
    assert!(fenced(&log), "node-a's agent log records no fence:\n{log}");

    // The controller restores it on node-b, with no one else acting.
    let (migration, replacement, pod) = await_replacement_running(&cluster).await;
    let running_after = cut_at.elapsed();
    assert_eq!(pod["spec"]["nodeName"], "node-b");
    let resumed = progress(&work).unwrap_or(0);
    await_counting_past(&work, resumed, "the restored counter to count on").await;
    sampler.stop();

    let samples = sampler.samples();
    assert!(
        samples.len() > 10,
        "runc was sampled only {} times",
        samples.len()
    );
    let doubles = sampler.doubles();
    assert!(doubles.is_empty(), "two copies ran at once: {doubles:?}");
    let now = counter_copies(&cluster);
    assert_eq!(now.len(), 1, "counter containers running: {now:?}");
    assert_eq!(now[0].0, "node-b");
    // The gap no copy ran, as runc was sampled.
    let last_on_a = samples
        .iter()
        .filter(|(_, copies)| copies.iter().any(|(node, _)| node == "node-a"))
        .map(|(at, _)| *at)
        .max()
        .unwrap();
    let first_on_b = samples
        .iter()
        .filter(|(_, copies)| copies.iter().any(|(node, _)| node == "node-b"))
        .map(|(at, _)| *at)
        .min()
        .unwrap();
    assert!(first_on_b > last_on_a);

    let history: Vec<String> = migration["status"]["history"]
        .as_array()
        .map(|history| {
            history
                .iter()
                .map(|timing| {
                    format!(
                        "{} at {} for {}",
                        timing["phase"].as_str().unwrap_or_default(),
                        timing["startedAt"].as_str().unwrap_or_default(),
                        timing["duration"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "cut node-a from the API server at {cut_wall}; its agent stopped the counter after \
         {stopped_after:?} (last sample on node-a {:?} after the cut, first on node-b {:?}); the \
         replacement {replacement} was Running on node-b {running_after:?} after the cut; \
         counter {before} at the cut, resumed at {resumed}; {} runc samples, never two copies; \
         Migration history: {history:#?}",
        last_on_a - cut_at,
        first_on_b - cut_at,
        samples.len()
    );

    drop(dump);
    drop(sampler);
    teardown(cluster, &root).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_its_peers_only_is_neither_fenced_nor_moved() {
    let Some(_one) = common::begin("self_fence cut from peers").await else {
        return;
    };
    let (cluster, root, work) = cluster_with_a_replicated_counter("sfpeer").await;
    let dump = DumpOnFailure(&cluster);
    let mut sampler = Sampler::start(cluster.clone(), None);

    let original = counter_on_a(&cluster);
    cluster.cut_from_peers("node-a").unwrap();
    let before = progress(&work).unwrap();
    let cut_at = Instant::now();
    while cut_at.elapsed() < Duration::from_secs(20) {
        let migrations: Vec<Value> = cluster
            .migrations()
            .into_iter()
            .filter(|m| m["metadata"]["namespace"] == "default")
            .collect();
        assert!(
            migrations.is_empty(),
            "a Migration for a node cut off from its peers only: {migrations:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sampler.stop();
    let after = progress(&work).unwrap();
    let samples = sampler.samples();
    assert!(
        samples.len() > 10,
        "runc was sampled only {} times",
        samples.len()
    );
    // Every sample: at most the original container, on node-a (a periodic checkpoint's freeze
    // counts as running: a paused container is still a copy).
    let off: Vec<&Copies> = samples
        .iter()
        .map(|(_, copies)| copies)
        .filter(|copies| {
            copies
                .iter()
                .any(|copy| *copy != ("node-a".to_string(), original.clone()))
        })
        .collect();
    assert!(off.is_empty(), "the counter moved or was replaced: {off:?}");
    assert_eq!(
        runc_status(&cluster.runc_root("node-a"), &original),
        Some(RuncStatus::Running),
        "the counter stopped on node-a"
    );
    assert!(
        after > before + 20,
        "the counter stalled: {before} -> {after}"
    );
    assert_eq!(starts(&work), 1, "the counter was started again");
    let pod = cluster.get(&["pod", POD, "-n", "default"]).unwrap();
    assert_eq!(pod["status"]["phase"], "Running");
    let log = agent_log(&cluster, "node-a");
    let events = fence_events(&log);
    assert!(
        events.is_empty(),
        "node-a's agent went for a fence: {events:#?}"
    );
    eprintln!(
        "node-a cut off from its peers for 20 s: no Migration, the counter ran on node-a in all \
         {} runc samples and counted {before} -> \
         {after}",
        samples.len()
    );

    cluster.restore_peers("node-a").unwrap();
    drop(dump);
    drop(sampler);
    teardown(cluster, &root).await;
}
