//! One full decision pass over a large synthetic cluster: 5,000 nodes, 50,000 protected pods,
//! 10 failed and 10 degraded nodes (≈200 pods to place), 40,000 link observations, 1,000 users
//! with mobility enabled, 100 datasets. Two cases differ only in how many checkpoints are due:
//!
//! - `steady`: checkpoint ages spread over 0..610 s with a 10-minute interval, so about one pod
//!   in sixty is due, as when the controller runs a pass every 10 s;
//! - `catch_up`: ages spread over 0..1,200 s, so half the pods (≈25,000) are due at once, as
//!   after a controller outage.
//!
//! The goal is ≤ 50 ms per pass on the project's 2-core machine; results are recorded in
//! docs/benchmarks.md. Run: `cargo bench -p automigrate-core --bench decide`
//!
//! Each case also prints a digest of its decisions (FNV-1a of their JSON), so that a change
//! meant only to make the pass faster can show it decides exactly as before.

use std::hint::black_box;

use automigrate_core::fixtures::SyntheticCluster;
use automigrate_core::{EngineMemory, PolicySet, decide};
use criterion::{Criterion, criterion_group, criterion_main};

fn full_pass(c: &mut Criterion) {
    let now = jiff::Timestamp::from_second(1_800_000_000).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let mobility = "triggers:\n  mobility: {threshold: 40ms, hysteresis: 15ms, dwell: 30s}\n";
    // `steady` and `catch_up` lift the per-node checkpoint cap out of the way, so they measure
    // the same work as before the cap existed (and print the same digests); `catch_up_capped`
    // is what the default cap of 2 does to the catch-up pass.
    let uncapped = format!("{mobility}checkpoint: {{maxConcurrentPerNode: 1000}}\n");
    let mut policy_sets = Vec::new();
    for text in [uncapped.as_str(), mobility] {
        let mut policies = PolicySet::new();
        if let Err(error) = policies.apply("default", text) {
            eprintln!("{error}");
            return;
        }
        policy_sets.push(policies);
    }
    let [uncapped, capped] = policy_sets.as_slice() else {
        return;
    };
    let memory = EngineMemory::default();
    let mut group = c.benchmark_group("decide_5000_nodes_50000_pods");
    group.sample_size(20);
    for (case, max_checkpoint_age, policies) in [
        ("steady", 610, uncapped),
        ("catch_up", 1200, uncapped),
        ("catch_up_capped", 1200, capped),
    ] {
        let snapshot = SyntheticCluster {
            seed: 7,
            nodes: 5_000,
            pods: 50_000,
            zones: 8,
            failed_nodes: 10,
            degraded_nodes: 10,
            probes_per_node: 8,
            users: 1_000,
            datasets: 100,
            max_checkpoint_age,
        }
        .build(now);
        let (decisions, _) = decide(&snapshot, policies, &memory, now);
        let digest = serde_json::to_vec(&decisions).map_or(0, |json| fnv1a(&json));
        eprintln!(
            "{case}: {} migrations, {} checkpoints ({} postponed), {} deferred, {} problems, decisions digest {digest:016x}",
            decisions.migrations.len(),
            decisions.checkpoints.len(),
            decisions.summary.checkpoints_postponed,
            decisions.deferred.len(),
            decisions.problems.len()
        );
        group.bench_function(case, |b| {
            b.iter(|| decide(black_box(&snapshot), policies, &memory, now))
        });
    }
    group.finish();
}

/// FNV-1a, 64 bits: the same digest on every machine.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

criterion_group!(benches, full_pass);
criterion_main!(benches);
