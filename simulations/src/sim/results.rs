//! What a run gives back: its metrics, the engine's use counts, the audit, per-job outcomes.

use automigrate_core::EngineMemory;
use automigrate_core::decide::Decisions;
use automigrate_core::model::ClusterSnapshot;
use jiff::Timestamp;

use super::clock::Ms;

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Scenario(#[from] crate::scenario::ScenarioError),
    #[error("policy `{name}`: {reason}")]
    Policy { name: String, reason: String },
}

/// What to keep besides the metrics; tests turn these on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Check the invariants after every event.
    pub audit: bool,
    /// Keep this many decision passes that produced a migration, with their inputs.
    pub record_passes: usize,
    /// Re-run every compact pass on the full snapshot and count differing decisions.
    pub verify_compact: bool,
}

/// A decision pass kept for inspection: the exact inputs and what the engine said.
#[derive(Debug, Clone)]
pub struct RecordedPass {
    pub snapshot: ClusterSnapshot,
    pub memory: EngineMemory,
    pub now: Timestamp,
    pub decisions: Decisions,
    pub compact: bool,
}

/// Counts of the simulator's use of the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub decide_calls: u64,
    pub full_passes: u64,
    pub compact_passes: u64,
    /// Compact passes re-run on the full snapshot.
    pub compact_fallbacks: u64,
    pub migration_decisions: u64,
    pub checkpoint_decisions: u64,
    pub migration_steps: u64,
    /// Periodic checkpoints the pod's record named as soon as they were taken, before any
    /// copy landed (the driver's `records_at_once`).
    pub periodic_recorded_at_once: u64,
    /// Copies to a standby that did not land (the standby was down or failed during the copy).
    pub periodic_replica_failures: u64,
    /// Periodic checkpoints that ended with the pod's record still naming an older one that a
    /// standby holds (no copy of the new one landed).
    pub periodic_kept_older: u64,
    /// The reason text of the first migration the engine decided for a failed node.
    pub first_failure_reason: Option<String>,
}

/// Invariant violations found by the audit (all zero in a correct run).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    pub checks: u64,
    pub running_on_dead_node: u64,
    pub overcommitted_nodes: u64,
    pub work_not_conserved: u64,
    pub running_twice: u64,
    /// Compact passes checked against a full pass, and decisions that differed.
    pub compact_checks: u64,
    pub compact_mismatches: u64,
}

/// What happened to one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub id: usize,
    pub class: String,
    pub arrival: Ms,
    pub finished: Option<Ms>,
    pub work: Ms,
    pub run_time: Ms,
    pub lost_work: Ms,
    pub downtime: Ms,
    pub checkpoint_overhead: Ms,
    pub migrations: u32,
    pub restarts: u32,
    /// Node names the job ran on, in order.
    pub placements: Vec<String>,
}

/// The headline numbers of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub jobs: usize,
    pub jobs_finished: usize,
    pub node_failures: u64,
    pub failures_hitting_jobs: u64,
    /// Training work done again, plus time jobs stood still (recovery and checkpoint freezes),
    /// each weighted by the share of a node the job holds.
    pub lost_node_hours: f64,
    pub redone_node_hours: f64,
    pub downtime_node_hours: f64,
    pub checkpoint_node_hours: f64,
    pub jct_mean_hours: f64,
    pub jct_p95_hours: f64,
    pub makespan_hours: f64,
    pub bytes_moved: u64,
    pub bytes_checkpoint_copies: u64,
    pub bytes_recovery: u64,
    pub migrations: u64,
    pub proactive_migrations: u64,
    pub mobility_migrations: u64,
    pub failed_migrations: u64,
    pub restarts: u64,
    pub checkpoints: u64,
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub scenario: String,
    pub policy: String,
    pub label: String,
    pub metrics: Metrics,
    pub engine: EngineStats,
    pub audit: Audit,
    pub jobs: Vec<JobOutcome>,
    pub recorded: Vec<RecordedPass>,
    /// Simulated time at the end of the run.
    pub ended_at: Ms,
}
