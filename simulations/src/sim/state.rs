//! The simulator's own records of the cluster: events, jobs, nodes, users, migrations in flight,
//! dataset copies, and the names and links derived from indices.

use std::collections::{BTreeMap, BTreeSet};

use automigrate_core::decide::PlannedTransfer;
use automigrate_core::driver::periodic::Periodic;
use automigrate_core::driver::{Role, Run};
use automigrate_core::migration::Phase;
use automigrate_core::model::Resources;

use crate::network::Link;
use crate::random::Stream;
use crate::scenario::ClusterScenario;

use super::clock::Ms;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Event {
    JobArrival(usize),
    JobStarted {
        job: usize,
        epoch: u64,
    },
    JobFinish(usize),
    NodeFail(usize),
    NodeRepair(usize),
    Warning {
        node: usize,
        real: bool,
    },
    WarningClear(usize),
    FalseAlarm(usize),
    FailureCheck(usize),
    Eviction(usize),
    CheckpointTick(Ms),
    CheckpointDone {
        job: usize,
        seq: u64,
    },
    ReplicaDone {
        job: usize,
        seq: u64,
    },
    MigrationStep {
        migration: usize,
        seq: u64,
    },
    RestartReady {
        job: usize,
        epoch: u64,
    },
    UserMove(usize),
    MobilityCheck(usize),
    /// The SpeCon-like monitor looks at job progress (one batch per monitoring period).
    SpeconTick(Ms),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobState {
    NotArrived,
    Queued,
    Starting { node: usize },
    Running { node: usize, since: Ms },
    Down { node: usize },
    Restarting { node: usize },
    Finished,
}

/// The newest stored checkpoint of a job and every node that holds a copy of it (the
/// simulator keeps one per job: a newer one replaces it).
#[derive(Debug, Clone)]
pub(super) struct SimCheckpointCopy {
    pub(super) id: String,
    pub(super) progress: Ms,
    pub(super) taken_at: Ms,
    pub(super) size: u64,
    pub(super) freeze: Ms,
    pub(super) held_on: Vec<usize>,
}

/// A periodic checkpoint in progress: the core driver's job ([`Periodic`]: what to record,
/// where to copy next) and what the cost model needs to time and record it.
#[derive(Debug, Clone)]
pub(super) struct PendingCheckpoint {
    pub(super) seq: u64,
    /// The driver's rules for this checkpoint; the simulator carries out its steps.
    pub(super) periodic: Periodic,
    /// The node it is taken on.
    pub(super) node: usize,
    pub(super) progress: Ms,
    pub(super) taken_at: Ms,
    pub(super) freeze: Ms,
    pub(super) size: u64,
    pub(super) delta: u64,
    /// The standby a copy is on its way to (the driver's `Replicate` step in progress).
    pub(super) replicating: Option<usize>,
}

#[derive(Debug, Clone)]
pub(super) struct Job {
    /// The pod's name, `job-NNNNNN`.
    pub(super) name: String,
    pub(super) class: usize,
    pub(super) arrival: Ms,
    pub(super) work: Ms,
    pub(super) progress: Ms,
    pub(super) state: JobState,
    /// Bumped whenever the job stops or restarts, so stale events are ignored.
    pub(super) epoch: u64,
    pub(super) stopped_at: Option<Ms>,
    pub(super) checkpoint: Option<SimCheckpointCopy>,
    pub(super) pending: Option<PendingCheckpoint>,
    pub(super) checkpoint_seq: u64,
    /// The interval the engine last gave for this job's checkpoints.
    pub(super) interval: Option<Ms>,
    pub(super) migration: Option<usize>,
    /// When the job's last migration ended with the workload on its target, and the phase it
    /// ended in (what the engine reads of it).
    pub(super) last_migration: Option<(Ms, Phase)>,
    /// Kubernetes may evict the job's pod from its failed node from this time on.
    pub(super) evictable_at: Option<Ms>,
    pub(super) user: Option<usize>,
    pub(super) specon_at: Option<Ms>,
    pub(super) specon_requested: bool,
    /// Progress a Kubernetes-style restart resumes from (zero, or a stored checkpoint's).
    pub(super) restart_from: Ms,
    pub(super) finished: Option<Ms>,
    pub(super) run_time: Ms,
    pub(super) lost_work: Ms,
    pub(super) downtime: Ms,
    pub(super) checkpoint_overhead: Ms,
    pub(super) migrations: u32,
    pub(super) restarts: u32,
    pub(super) placements: Vec<String>,
}

#[derive(Debug, Clone)]
pub(super) struct SimNode {
    pub(super) alive: bool,
    pub(super) cell: usize,
    pub(super) heartbeat_phase: Ms,
    pub(super) failed_at: Option<Ms>,
    /// Marked out of service by a migration's fencing (Kubernetes' taint): its pods cannot
    /// run again. Cleared when the node is repaired.
    pub(super) out_of_service: bool,
    pub(super) warning_since: Option<Ms>,
    pub(super) warning_real: bool,
    pub(super) jobs: BTreeSet<usize>,
    pub(super) failures: Stream,
    pub(super) alarms: Stream,
    /// Probed peers with the index of the link observation in `world.links`.
    pub(super) peers: Vec<(usize, usize)>,
    /// Nodes that probe this one: the engine counts them as its peers too.
    pub(super) probed_by: Vec<usize>,
}

#[derive(Debug, Clone)]
pub(super) struct SimUser {
    pub(super) job: usize,
    pub(super) cell: usize,
    pub(super) stream: Stream,
}

/// One migration the core driver carries out: the run it persists, and what the simulator's
/// port ([`super::port`]) needs to time and apply its effects.
#[derive(Debug, Clone)]
pub(super) struct SimMigration {
    pub(super) job: usize,
    pub(super) source: usize,
    pub(super) target: usize,
    /// The driver's persisted state of the migration.
    pub(super) run: Run,
    /// The engine's transfer plans, timed on the true links when the driver starts them.
    pub(super) transfers: Vec<PlannedTransfer>,
    /// Progress the migration's final dump holds, once it was taken.
    pub(super) dump_progress: Option<Ms>,
    /// Effects in progress: each completes at its time on the cost model.
    pub(super) in_flight: Vec<InFlight>,
    /// Transfers started so far (names the next one's id).
    pub(super) transfers_started: u64,
    /// Bumped whenever the migration is woken, so stale wake-ups are ignored.
    pub(super) seq: u64,
    pub(super) target_reserved: bool,
    pub(super) source_released: bool,
    /// The job is bound to the target (its replacement was started there).
    pub(super) job_on_target: bool,
    /// The replacement on the target was started with no checkpoint (training starts over).
    pub(super) started_fresh_on_target: bool,
    /// The driver ended it, or the simulator dropped it (its job finished).
    pub(super) ended: bool,
}

/// An effect of the driver's port that takes time on the cost model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Effect {
    FinalDump,
    StopSource,
    Start { node: usize, role: Role },
    CheckReplacement,
    StopReplacement,
    Transfer(String),
}

/// One effect in progress and when it completes.
#[derive(Debug, Clone)]
pub(super) struct InFlight {
    pub(super) effect: Effect,
    pub(super) done_at: Ms,
    /// What a transfer moves.
    pub(super) bytes: u64,
}

/// Where copies of one dataset are: its origin replicas, and the nodes whose running pods
/// hold one (counted, since two pods on a node share a copy).
#[derive(Debug, Clone, Default)]
pub(super) struct DatasetCopies {
    pub(super) origins: BTreeSet<usize>,
    pub(super) users: BTreeMap<usize, u32>,
}

impl DatasetCopies {
    pub(super) fn contains(&self, node: usize) -> bool {
        self.origins.contains(&node) || self.users.contains_key(&node)
    }

    /// Every node with a copy, ascending, each once.
    pub(super) fn nodes(&self) -> impl Iterator<Item = usize> + '_ {
        let mut merged: Vec<usize> = self.origins.iter().copied().collect();
        merged.extend(
            self.users
                .keys()
                .copied()
                .filter(|node| !self.origins.contains(node)),
        );
        merged.sort_unstable();
        merged.into_iter()
    }
}

/// The share of a node a job holds: its largest share of any resource the node has.
pub(super) fn node_share(requests: Resources, allocatable: Resources) -> f64 {
    let share = |asked: u64, has: u64| {
        if has == 0 {
            0.0
        } else {
            asked as f64 / has as f64
        }
    };
    share(requests.cpu.0, allocatable.cpu.0)
        .max(share(requests.memory.0, allocatable.memory.0))
        .max(share(requests.gpu, allocatable.gpu))
}

/// The namespace of every simulated pod.
pub(super) const NAMESPACE: &str = "training";

pub fn node_name(index: usize) -> String {
    format!("node-{index:04}")
}

pub(super) fn node_index(name: &str) -> Option<usize> {
    name.strip_prefix("node-")?.parse().ok()
}

pub fn job_name(index: usize) -> String {
    format!("job-{index:06}")
}

pub(super) fn job_index(name: &str) -> Option<usize> {
    name.strip_prefix("job-")?.parse().ok()
}

pub(super) fn user_name(job: usize) -> String {
    format!("user-{job:06}")
}

pub(super) fn cell_hops(a: usize, b: usize, cells: usize) -> usize {
    let distance = a.abs_diff(b);
    distance.min(cells.saturating_sub(distance))
}

/// The true path between two nodes: RTT from the cells between them, the cluster's bandwidth
/// and loss.
pub(super) fn true_link(
    scenario: &ClusterScenario,
    nodes: &[SimNode],
    from: usize,
    to: usize,
) -> Link {
    let cluster = &scenario.cluster;
    let hops = cell_hops(nodes[from].cell, nodes[to].cell, cluster.cells);
    Link {
        rtt: cluster.intra_cell_rtt + cluster.rtt_per_hop * hops as u32,
        capacity_bps: cluster.bandwidth.0 as f64,
        loss: cluster.loss,
    }
}
