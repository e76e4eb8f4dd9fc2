//! The discrete-event simulator of a cluster that runs training jobs while its nodes fail.
//!
//! Data model. Time is whole milliseconds from the start of the run ([`Ms`]); the engine sees
//! it as a [`jiff::Timestamp`] from a fixed epoch. Events sit in a `BTreeMap` keyed by
//! `(time, sequence)`, so ties resolve in the order events were scheduled and a run is a pure
//! function of its scenario, policy and seed. Nodes, jobs and migrations live in `Vec`s and are
//! named by index; every other collection is ordered (`BTreeMap`/`BTreeSet`), never hashed.
//!
//! The cluster the engine sees is a persistent [`ClusterSnapshot`] (`world`) whose nodes and
//! links are updated in place, so a decision pass does not rebuild a thousand nodes. A pass is
//! run only on an event that can change a decision: a failure the engine can now detect, a
//! degradation signal, a batch of checkpoint timers falling due, a user's move, a SpeCon
//! milestone, Kubernetes' eviction time. Timer batches and user moves use a *compact* snapshot
//! holding only the pods concerned and every node their decisions can name (their nodes, the
//! holders of their checkpoints, their nodes' probed peers, their users' nodes); a compact pass
//! whose outcome could differ from a full one (a migration it did not expect, or fewer standbys
//! than asked for) is thrown away and re-run on the full snapshot.
//!
//! What the engine decides, the simulator carries out: checkpoints freeze the job for the CRIU
//! dump time and are copied to the standby the engine chose; migrations run through the engine's
//! migration state machine ([`migration::step`] / [`migration::apply`]), each step taking the
//! time the models give it (transfers by [`crate::network::run_plan`] on the engine's own
//! transfer plans). Recovery behaviour the engine does not own, Kubernetes' eviction and restart
//! and the SpeCon-like speculative moves, is modelled here and asks the engine where to place.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use automigrate_core::annotations;
use automigrate_core::decide::{
    CheckpointDecision, CheckpointSource, Decisions, MigrationDecision, PlannedTransfer, Trigger,
};
use automigrate_core::migration::{self, Limits, MigrationState, Phase, RollbackAction, Step};
use automigrate_core::model::{
    CheckpointInfo, ClusterSnapshot, ConditionStatus, Dataset, LinkObservation, MigrationRecord,
    MigrationRequest, Node, NodeCondition, PodRef, ProtectedPod, Resources, UserObservation,
};
use automigrate_core::transfer::{FileSpec, TransferSettings, plan_transfer};
use automigrate_core::units::{BitRate, Bytes};
use automigrate_core::{EngineMemory, PolicySet, decide};
use jiff::Timestamp;

use crate::network::{Link, RoundSettings, run_plan};
use crate::random::Stream;
use crate::scenario::{ClusterScenario, FailureModel, Recovery, SimPolicy, TraceRow};

/// Simulated time: milliseconds since the start of the run.
pub type Ms = u64;

const SECOND: Ms = 1000;
const HOUR: Ms = 3_600_000;
/// 2026-01-01T00:00:00Z: the engine's clock reads this at the start of every run.
const EPOCH_MS: i64 = 1_767_225_600_000;
const NAMESPACE: &str = "training";
/// How long to wait before asking the engine again about a failed node it did not act on
/// (still `Suspect`, or no room anywhere).
const RETRY: Ms = 15 * SECOND;

/// The engine's view of simulated time.
pub fn timestamp(at: Ms) -> Timestamp {
    let millis = i64::try_from(at)
        .unwrap_or(i64::MAX)
        .saturating_add(EPOCH_MS);
    Timestamp::from_millisecond(millis).unwrap_or(Timestamp::MAX)
}

fn ms(duration: Duration) -> Ms {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn hours(value: Ms) -> f64 {
    value as f64 / HOUR as f64
}

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

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
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
enum JobState {
    NotArrived,
    Queued,
    Starting { node: usize },
    Running { node: usize, since: Ms },
    Down { node: usize },
    Restarting { node: usize },
    Finished,
}

#[derive(Debug, Clone)]
struct StoredCheckpoint {
    id: String,
    progress: Ms,
    taken_at: Ms,
    size: u64,
    freeze: Ms,
    held_on: Vec<usize>,
}

#[derive(Debug, Clone)]
struct PendingCheckpoint {
    seq: u64,
    progress: Ms,
    taken_at: Ms,
    freeze: Ms,
    size: u64,
    delta: u64,
    standby: Option<usize>,
    interval: Ms,
}

#[derive(Debug, Clone)]
struct Job {
    /// The pod's name, `job-NNNNNN`.
    name: String,
    class: usize,
    arrival: Ms,
    work: Ms,
    progress: Ms,
    state: JobState,
    /// Bumped whenever the job stops or restarts, so stale events are ignored.
    epoch: u64,
    stopped_at: Option<Ms>,
    checkpoint: Option<StoredCheckpoint>,
    pending: Option<PendingCheckpoint>,
    checkpoint_seq: u64,
    /// The interval the engine last gave for this job's checkpoints.
    interval: Option<Ms>,
    migration: Option<usize>,
    last_migration_end: Option<Ms>,
    /// Kubernetes may evict the job's pod from its failed node from this time on.
    evictable_at: Option<Ms>,
    user: Option<usize>,
    specon_at: Option<Ms>,
    specon_requested: bool,
    /// Progress a Kubernetes-style restart resumes from (zero, or a stored checkpoint's).
    restart_from: Ms,
    finished: Option<Ms>,
    run_time: Ms,
    lost_work: Ms,
    downtime: Ms,
    checkpoint_overhead: Ms,
    migrations: u32,
    restarts: u32,
    placements: Vec<String>,
}

#[derive(Debug, Clone)]
struct SimNode {
    alive: bool,
    cell: usize,
    heartbeat_phase: Ms,
    failed_at: Option<Ms>,
    warning_since: Option<Ms>,
    warning_real: bool,
    jobs: BTreeSet<usize>,
    failures: Stream,
    alarms: Stream,
    /// Probed peers with the index of the link observation in `world.links`.
    peers: Vec<(usize, usize)>,
    /// Nodes that probe this one: the engine counts them as its peers too.
    probed_by: Vec<usize>,
}

#[derive(Debug, Clone)]
struct SimUser {
    job: usize,
    cell: usize,
    stream: Stream,
}

#[derive(Debug, Clone)]
struct SimMigration {
    job: usize,
    source: usize,
    target: usize,
    state: MigrationState,
    limits: Limits,
    transfers: Vec<PlannedTransfer>,
    /// A fresh dump of the live source is (or will be) the state to resume from.
    fresh: bool,
    /// The engine planned the copy of a stored checkpoint (its source had already failed).
    planned_stored: bool,
    incremental: bool,
    /// Progress the replacement resumes from, once known.
    resume: Option<Ms>,
    seq: u64,
    target_reserved: bool,
    source_released: bool,
    job_on_target: bool,
    /// The step in flight would outlast its phase's deadline: its completion is a timeout.
    timed_out: bool,
}

/// One simulation run of one policy on one scenario.
#[derive(Debug)]
pub struct Simulation<'a> {
    scenario: &'a ClusterScenario,
    policy: &'a SimPolicy,
    policies: PolicySet,
    memory: EngineMemory,
    options: RunOptions,
    now: Ms,
    sequence: u64,
    queue: BTreeMap<(Ms, u64), Event>,
    world: ClusterSnapshot,
    datasets_dirty: bool,
    dataset_holders: Vec<DatasetCopies>,
    dataset_files: Vec<Vec<FileSpec>>,
    nodes: Vec<SimNode>,
    cell_nodes: Vec<Vec<usize>>,
    jobs: Vec<Job>,
    users: Vec<SimUser>,
    migrations: Vec<SimMigration>,
    queued: BTreeSet<usize>,
    checkpoint_batches: BTreeMap<Ms, BTreeSet<usize>>,
    /// Nodes that are dead or report a degradation condition.
    troubled_nodes: BTreeSet<usize>,
    specon_batches: BTreeMap<Ms, BTreeSet<(usize, u64)>>,
    placement: Stream,
    transfer_cache: BTreeMap<(u64, usize, u64, u32, u32, bool), Ms>,
    transfer_settings: TransferSettings,
    unfinished: usize,
    stats: EngineStats,
    audit: Audit,
    metrics: Metrics,
    recorded: Vec<RecordedPass>,
}

/// Runs `policy` on `scenario`.
pub fn run(
    scenario: &ClusterScenario,
    policy: &SimPolicy,
    options: RunOptions,
) -> Result<RunResult, SimError> {
    let trace = if scenario.failures.model == FailureModel::Trace {
        scenario.load_trace()?
    } else {
        Vec::new()
    };
    let mut simulation = Simulation::new(scenario, policy, options, &trace)?;
    simulation.run_to_end();
    Ok(simulation.finish())
}

impl<'a> Simulation<'a> {
    fn new(
        scenario: &'a ClusterScenario,
        policy: &'a SimPolicy,
        options: RunOptions,
        trace: &[TraceRow],
    ) -> Result<Self, SimError> {
        let mut policies = PolicySet::new();
        let issues = policy.engine.validate();
        if let Some(issue) = issues.first() {
            return Err(SimError::Policy {
                name: policy.name.clone(),
                reason: issue.to_string(),
            });
        }
        policies.insert(&policy.name, policy.engine.clone());

        let cluster = &scenario.cluster;
        let seed = scenario.seed;
        let heartbeat = ms(cluster.heartbeat).max(1);
        let mut topology = Stream::new(seed, 1);
        let cell_of = |index: usize| index * cluster.cells / cluster.nodes;
        let mut cell_nodes = vec![Vec::new(); cluster.cells];
        for index in 0..cluster.nodes {
            cell_nodes[cell_of(index)].push(index);
        }
        let mut nodes: Vec<SimNode> = (0..cluster.nodes)
            .map(|index| SimNode {
                alive: true,
                cell: cell_of(index),
                heartbeat_phase: (index as u64).wrapping_mul(7919) % heartbeat,
                failed_at: None,
                warning_since: None,
                warning_real: false,
                jobs: BTreeSet::new(),
                failures: Stream::new(seed, 1_000_000 + index as u64),
                alarms: Stream::new(seed, 2_000_000 + index as u64),
                peers: Vec::new(),
                probed_by: Vec::new(),
            })
            .collect();
        let world_nodes: Vec<Node> = (0..cluster.nodes)
            .map(|index| {
                automigrate_core::fixtures::NodeBuilder::new(&node_name(index))
                    .zone(&format!("cell-{:03}", cell_of(index)))
                    .allocatable(
                        cluster.allocatable.cpu.0,
                        cluster.allocatable.memory.0,
                        cluster.allocatable.gpu,
                    )
                    .build()
            })
            .collect();
        let mut links = Vec::new();
        for index in 0..cluster.nodes {
            let cell = &cell_nodes[cell_of(index)];
            let position = cell.iter().position(|&n| n == index).unwrap_or(0);
            let local = (cluster.probes_per_node / 2).min(cell.len().saturating_sub(1));
            let mut peers: Vec<usize> = (1..=local)
                .map(|step| cell[(position + step) % cell.len()])
                .collect();
            let mut attempts = 0;
            while peers.len() < cluster.probes_per_node.min(cluster.nodes - 1) && attempts < 100 {
                attempts += 1;
                let peer = topology.below(cluster.nodes as u64) as usize;
                if peer != index && !peers.contains(&peer) {
                    peers.push(peer);
                }
            }
            for peer in peers {
                let link = true_link(scenario, &nodes, index, peer);
                nodes[index].peers.push((peer, links.len()));
                nodes[peer].probed_by.push(index);
                links.push(LinkObservation {
                    from: node_name(index),
                    to: node_name(peer),
                    rtt: link.rtt,
                    bandwidth: Some(BitRate(cluster.bandwidth.0)),
                    loss: cluster.loss,
                });
            }
        }

        let mut data = Stream::new(seed, 2);
        let mut dataset_holders = Vec::new();
        let mut dataset_files = Vec::new();
        let mut datasets = Vec::new();
        for spec in &scenario.workload.datasets {
            let mut holders = DatasetCopies::default();
            while holders.origins.len() < spec.replicas.min(cluster.nodes) {
                holders
                    .origins
                    .insert(data.below(cluster.nodes as u64) as usize);
            }
            let dataset = Dataset {
                id: spec.id.clone(),
                total_bytes: spec.total_bytes,
                file_count: spec.files,
                files: Vec::new(),
                present_on: Vec::new(),
            };
            dataset_files.push(dataset.file_specs());
            datasets.push(dataset);
            dataset_holders.push(holders);
        }

        let mut workload = Stream::new(seed, 3);
        let horizon = ms(scenario.horizon);
        let mut arrivals: Vec<Ms> = (0..scenario.workload.jobs)
            .map(|_| (workload.unit() * horizon as f64) as Ms)
            .collect();
        arrivals.sort_unstable();
        let weights: Vec<f64> = scenario
            .workload
            .classes
            .iter()
            .map(|class| class.weight.max(0.0))
            .collect();
        let mut users = Vec::new();
        let mut jobs = Vec::with_capacity(arrivals.len());
        for (id, arrival) in arrivals.into_iter().enumerate() {
            let class_index = workload.weighted(&weights);
            let class = &scenario.workload.classes[class_index];
            let work = (workload
                .log_normal(class.duration_median.as_secs_f64(), class.duration_sigma)
                * 1000.0)
                .max(60_000.0) as Ms;
            let has_user = workload.chance(class.user_fraction);
            let specon_fraction = policy
                .specon
                .as_ref()
                .map(|spec| workload.uniform(spec.slow_growth_from, spec.slow_growth_to));
            let user_cell = workload.below(cluster.cells as u64) as usize;
            let user = (has_user && scenario.users.is_some()).then(|| {
                users.push(SimUser {
                    job: id,
                    cell: user_cell,
                    stream: Stream::new(seed, 3_000_000 + id as u64),
                });
                users.len() - 1
            });
            jobs.push(Job {
                name: job_name(id),
                class: class_index,
                arrival,
                work,
                progress: 0,
                state: JobState::NotArrived,
                epoch: 0,
                stopped_at: None,
                checkpoint: None,
                pending: None,
                checkpoint_seq: 0,
                interval: None,
                migration: None,
                last_migration_end: None,
                evictable_at: None,
                user,
                specon_at: specon_fraction.map(|fraction| (work as f64 * fraction) as Ms),
                specon_requested: false,
                restart_from: 0,
                finished: None,
                run_time: 0,
                lost_work: 0,
                downtime: 0,
                checkpoint_overhead: 0,
                migrations: 0,
                restarts: 0,
                placements: Vec::new(),
            });
        }

        let unfinished = jobs.len();
        let mut simulation = Self {
            scenario,
            policy,
            policies,
            memory: EngineMemory::default(),
            options,
            now: 0,
            sequence: 0,
            queue: BTreeMap::new(),
            world: ClusterSnapshot {
                nodes: world_nodes,
                links,
                datasets,
                ..ClusterSnapshot::default()
            },
            datasets_dirty: true,
            dataset_holders,
            dataset_files,
            nodes,
            cell_nodes,
            jobs,
            users,
            migrations: Vec::new(),
            queued: BTreeSet::new(),
            checkpoint_batches: BTreeMap::new(),
            troubled_nodes: BTreeSet::new(),
            specon_batches: BTreeMap::new(),
            placement: Stream::new(seed, 4),
            transfer_cache: BTreeMap::new(),
            transfer_settings: policy.engine.transfer.settings(),
            unfinished,
            stats: EngineStats::default(),
            audit: Audit::default(),
            metrics: Metrics {
                jobs: unfinished,
                ..Metrics::default()
            },
            recorded: Vec::new(),
        };
        for id in 0..simulation.jobs.len() {
            let arrival = simulation.jobs[id].arrival;
            simulation.schedule(arrival, Event::JobArrival(id));
        }
        for user in 0..simulation.users.len() {
            let job = simulation.users[user].job;
            let first = simulation.jobs[job].arrival + simulation.user_pause(user);
            simulation.schedule(first, Event::UserMove(user));
        }
        simulation.schedule_failures(trace);
        Ok(simulation)
    }

    fn schedule(&mut self, at: Ms, event: Event) {
        self.sequence += 1;
        self.queue.insert((at.max(self.now), self.sequence), event);
    }

    fn user_pause(&mut self, user: usize) -> Ms {
        let mean = self
            .scenario
            .users
            .as_ref()
            .map_or(HOUR as f64, |spec| spec.move_mean.as_secs_f64() * 1000.0);
        self.users[user].stream.exponential(mean) as Ms
    }

    // ------------------------------------------------------------------------------------------
    // Failure processes

    fn schedule_failures(&mut self, trace: &[TraceRow]) {
        let failures = &self.scenario.failures;
        if failures.model == FailureModel::Trace {
            for row in trace {
                let fail_at = (row.fail_at * 1000.0) as Ms;
                if let Some(warn) = row.warn_at {
                    self.schedule(
                        (warn * 1000.0) as Ms,
                        Event::Warning {
                            node: row.node,
                            real: true,
                        },
                    );
                }
                self.schedule(fail_at, Event::NodeFail(row.node));
                self.schedule((row.repair_at * 1000.0) as Ms, Event::NodeRepair(row.node));
            }
        } else {
            for node in 0..self.nodes.len() {
                self.schedule_next_failure(node, 0);
            }
        }
        if failures.precursor.false_alarms_per_node_year > 0.0 {
            for node in 0..self.nodes.len() {
                self.schedule_false_alarm(node);
            }
        }
    }

    fn schedule_next_failure(&mut self, node: usize, from: Ms) {
        let spec = &self.scenario.failures;
        let mean = spec.mtbf.as_secs_f64() * 1000.0;
        let stream = &mut self.nodes[node].failures;
        let uptime = match spec.model {
            FailureModel::Weibull => stream.weibull(spec.shape, mean),
            _ => stream.exponential(mean),
        };
        let fail_at = from + uptime.max(1.0) as Ms;
        let warned = stream.chance(spec.precursor.probability);
        let lead = stream.exponential(spec.precursor.lead_mean.as_secs_f64() * 1000.0) as Ms;
        let repair = stream
            .log_normal(spec.repair_median.as_secs_f64() * 1000.0, spec.repair_sigma)
            .max(1000.0) as Ms;
        if warned {
            self.schedule(
                fail_at.saturating_sub(lead).max(from),
                Event::Warning { node, real: true },
            );
        }
        self.schedule(fail_at, Event::NodeFail(node));
        self.schedule(fail_at + repair, Event::NodeRepair(node));
    }

    fn schedule_false_alarm(&mut self, node: usize) {
        let rate = self.scenario.failures.precursor.false_alarms_per_node_year;
        let mean = 365.0 * 24.0 * HOUR as f64 / rate;
        let wait = self.nodes[node].alarms.exponential(mean) as Ms;
        let at = self.now + wait.max(1);
        self.schedule(at, Event::FalseAlarm(node));
    }

    // ------------------------------------------------------------------------------------------
    // The main loop

    fn run_to_end(&mut self) {
        let stop_at = ms(self.scenario.horizon) + ms(self.scenario.settings.drain_limit);
        while let Some(((at, _), event)) = self.queue.pop_first() {
            if self.unfinished == 0 || at > stop_at {
                break;
            }
            self.now = at;
            self.handle(event);
            if self.options.audit {
                self.check_invariants();
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::JobArrival(job) => {
                self.jobs[job].state = JobState::Queued;
                self.queued.insert(job);
                self.place_queued();
            }
            Event::JobStarted { job, epoch } => {
                if self.jobs[job].epoch == epoch
                    && let JobState::Starting { node } = self.jobs[job].state
                {
                    self.resume(job, node, 0);
                }
            }
            Event::JobFinish(job) => self.maybe_finish(job),
            Event::NodeFail(node) => self.node_failed(node),
            Event::NodeRepair(node) => self.node_repaired(node),
            Event::Warning { node, real } => self.warning(node, real),
            Event::WarningClear(node) => {
                if self.nodes[node].alive && !self.nodes[node].warning_real {
                    self.set_warning(node, None);
                }
            }
            Event::FalseAlarm(node) => {
                if self.nodes[node].alive && self.nodes[node].warning_since.is_none() {
                    self.warning(node, false);
                    let clear = ms(self.scenario.failures.precursor.false_alarm_duration);
                    self.schedule(self.now + clear, Event::WarningClear(node));
                }
                self.schedule_false_alarm(node);
            }
            Event::FailureCheck(node) => self.failure_check(node),
            Event::Eviction(node) => self.eviction(node),
            Event::CheckpointTick(batch) => self.checkpoint_tick(batch),
            Event::CheckpointDone { job, seq } => self.checkpoint_done(job, seq),
            Event::ReplicaDone { job, seq } => self.replica_done(job, seq),
            Event::MigrationStep { migration, seq } => {
                if self.migrations[migration].seq == seq
                    && !self.migrations[migration].state.phase.is_terminal()
                {
                    self.complete_step(migration);
                }
            }
            Event::RestartReady { job, epoch } => {
                if self.jobs[job].epoch == epoch
                    && let JobState::Restarting { node } = self.jobs[job].state
                {
                    let resume = self.jobs[job].restart_from;
                    self.resume(job, node, resume);
                }
            }
            Event::UserMove(user) => self.user_moved(user),
            Event::MobilityCheck(job) => self.mobility_pass(job),
            Event::SpeconTick(batch) => self.specon_tick(batch),
        }
    }

    // ------------------------------------------------------------------------------------------
    // Jobs

    fn class(&self, job: usize) -> &crate::scenario::JobClass {
        &self.scenario.workload.classes[self.jobs[job].class]
    }

    fn requests(&self, job: usize) -> Resources {
        self.class(job).requests
    }

    fn reserve(&mut self, node: usize, requests: Resources) {
        let world = &mut self.world.nodes[node];
        world.requested = world.requested.saturating_add(requests);
    }

    fn release(&mut self, node: usize, requests: Resources) {
        let world = &mut self.world.nodes[node];
        world.requested = world.requested.saturating_sub(requests);
    }

    fn bind(&mut self, job: usize, node: usize) {
        self.nodes[node].jobs.insert(job);
        self.jobs[job].placements.push(node_name(node));
        let dataset = self.dataset_index(job);
        *self.dataset_holders[dataset].users.entry(node).or_default() += 1;
        self.datasets_dirty = true;
    }

    /// The job leaves the node, and with its pod the pod's copy of the dataset (the seed
    /// datasets' origin replicas stay).
    fn unbind(&mut self, job: usize, node: usize) {
        if !self.nodes[node].jobs.remove(&job) {
            return;
        }
        let dataset = self.dataset_index(job);
        let users = &mut self.dataset_holders[dataset].users;
        if let Some(count) = users.get_mut(&node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                users.remove(&node);
            }
        }
        self.datasets_dirty = true;
    }

    /// Kubernetes' scheduler, as far as the simulation needs it: a uniformly random node among
    /// the healthy ones with room (the default scorers spread pods; which one they pick is not
    /// what this study compares).
    fn pick_node_for_new_job(&mut self, requests: Resources) -> Option<usize> {
        let count = self.nodes.len();
        let fits = |sim: &Self, node: usize| {
            sim.nodes[node].alive
                && sim.nodes[node].warning_since.is_none()
                && sim.world.nodes[node].free().shortfall(requests).is_none()
        };
        for _ in 0..64 {
            let node = self.placement.below(count as u64) as usize;
            if fits(self, node) {
                return Some(node);
            }
        }
        let start = self.placement.below(count as u64) as usize;
        (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&node| fits(self, node))
    }

    fn place_queued(&mut self) {
        let waiting: Vec<usize> = self.queued.iter().copied().collect();
        for job in waiting {
            let requests = self.requests(job);
            let Some(node) = self.pick_node_for_new_job(requests) else {
                break;
            };
            self.queued.remove(&job);
            self.reserve(node, requests);
            self.bind(job, node);
            let dataset = self.dataset_index(job);
            let mut delay = ms(self
                .scenario
                .criu
                .fresh_start_time(self.class(job).container_image.0));
            if !self.dataset_holders[dataset].contains(node) {
                // Staged before the job starts, from the nearest copy; the same for every policy.
                let from = self.nearest_holder(dataset, node).unwrap_or(node);
                delay += self.transfer_time_files(from, node, dataset);
            }
            self.jobs[job].state = JobState::Starting { node };
            let epoch = self.jobs[job].epoch;
            self.schedule(self.now + delay, Event::JobStarted { job, epoch });
        }
    }

    fn dataset_index(&self, job: usize) -> usize {
        let id = &self.class(job).dataset;
        self.scenario
            .workload
            .datasets
            .iter()
            .position(|dataset| &dataset.id == id)
            .unwrap_or(0)
    }

    fn nearest_holder(&self, dataset: usize, to: usize) -> Option<usize> {
        self.dataset_holders[dataset]
            .nodes()
            .filter(|&node| self.nodes[node].alive)
            .min_by_key(|&node| {
                (
                    ms(true_link(self.scenario, &self.nodes, node, to).rtt),
                    node,
                )
            })
    }

    /// Starts (or restarts) the job running on `node` from `progress`.
    fn resume(&mut self, job: usize, node: usize, progress: Ms) {
        let now = self.now;
        let state = &mut self.jobs[job];
        state.lost_work += state.progress.saturating_sub(progress);
        state.progress = progress;
        if let Some(stopped) = state.stopped_at.take() {
            state.downtime += now.saturating_sub(stopped);
        }
        state.state = JobState::Running { node, since: now };
        state.epoch += 1;
        let epoch = state.epoch;
        let finish_at = now + state.work.saturating_sub(progress);
        self.schedule(finish_at, Event::JobFinish(job));
        if let Some(milestone) = self.jobs[job].specon_at
            && !self.jobs[job].specon_requested
        {
            let at = now + milestone.saturating_sub(progress);
            self.schedule_specon_check(job, epoch, at);
        }
        if self.policy.recovery.takes_periodic_checkpoints() {
            let at = self.next_checkpoint_check(job);
            self.schedule_checkpoint_check(job, at);
        }
    }

    /// Stops a running job (its node failed, or a migration froze it for the last time).
    fn stop(&mut self, job: usize) {
        let now = self.now;
        let state = &mut self.jobs[job];
        let node = match state.state {
            JobState::Running { node, since } => {
                let ran = now.saturating_sub(since);
                state.progress += ran;
                state.run_time += ran;
                if since > now {
                    // Stopped during a checkpoint freeze: the rest of the freeze never happens.
                    state.checkpoint_overhead =
                        state.checkpoint_overhead.saturating_sub(since - now);
                }
                node
            }
            JobState::Starting { node }
            | JobState::Restarting { node }
            | JobState::Down { node } => node,
            _ => return,
        };
        state.state = JobState::Down { node };
        state.stopped_at.get_or_insert(now);
        state.epoch += 1;
        state.pending = None;
    }

    fn maybe_finish(&mut self, job: usize) {
        let JobState::Running { node, since } = self.jobs[job].state else {
            return;
        };
        let state = &self.jobs[job];
        if since > self.now || state.progress + (self.now - since) < state.work {
            return;
        }
        if let Some(migration) = self.jobs[job].migration {
            self.abandon_migration(migration, "the job finished");
        }
        let now = self.now;
        let state = &mut self.jobs[job];
        let ran = now - since;
        state.progress += ran;
        state.run_time += ran;
        state.state = JobState::Finished;
        state.finished = Some(now);
        state.pending = None;
        if state.run_time != state.work + state.lost_work {
            self.audit.work_not_conserved += 1;
        }
        let requests = self.requests(job);
        self.release(node, requests);
        self.unbind(job, node);
        self.unfinished = self.unfinished.saturating_sub(1);
        self.place_queued();
    }

    // ------------------------------------------------------------------------------------------
    // Node events

    fn node_failed(&mut self, node: usize) {
        if !self.nodes[node].alive {
            return;
        }
        self.metrics.node_failures += 1;
        self.nodes[node].alive = false;
        self.troubled_nodes.insert(node);
        self.nodes[node].failed_at = Some(self.now);
        let heartbeat = self.last_heartbeat(node, self.now);
        let mut hit = false;

        // Migrations touching the node first: they decide what happens to their jobs.
        for migration in 0..self.migrations.len() {
            if self.migrations[migration].state.phase.is_terminal() {
                continue;
            }
            if self.migrations[migration].target == node {
                self.target_lost(migration);
            } else if self.migrations[migration].source == node {
                self.source_lost(migration);
            }
        }
        let jobs: Vec<usize> = self.nodes[node].jobs.iter().copied().collect();
        for job in jobs {
            hit = true;
            if self.jobs[job].migration.is_some() {
                continue;
            }
            self.stop(job);
            let eviction = &self.policy.kubernetes;
            self.jobs[job].evictable_at =
                Some(heartbeat + ms(eviction.node_monitor_grace) + ms(eviction.toleration));
        }
        if hit {
            self.metrics.failures_hitting_jobs += 1;
            if self.policy.recovery.waits_for_eviction() {
                let eviction = &self.policy.kubernetes;
                let at = heartbeat + ms(eviction.node_monitor_grace) + ms(eviction.toleration);
                self.schedule(at, Event::Eviction(node));
            } else {
                let at = heartbeat + ms(self.policy.engine.triggers.lease_timeout);
                self.schedule(at, Event::FailureCheck(node));
            }
        }
    }

    fn node_repaired(&mut self, node: usize) {
        if self.nodes[node].alive {
            return;
        }
        self.nodes[node].alive = true;
        self.nodes[node].failed_at = None;
        self.set_warning(node, None);
        self.troubled_nodes.remove(&node);
        // Pods still bound to the node (nothing moved them yet) come back with it: kubelet
        // restarts their containers, from their local checkpoint if the policy keeps one.
        let jobs: Vec<usize> = self.nodes[node].jobs.iter().copied().collect();
        for job in jobs {
            if self.jobs[job].migration.is_some() {
                continue;
            }
            if let JobState::Down { .. } = self.jobs[job].state {
                let resume = self.local_resume_point(job, node);
                let delay = self.start_delay(job, resume.is_some());
                self.jobs[job].state = JobState::Restarting { node };
                self.jobs[job].restart_from = resume.unwrap_or(0);
                self.jobs[job].restarts += 1;
                self.jobs[job].epoch += 1;
                let epoch = self.jobs[job].epoch;
                self.schedule(self.now + delay, Event::RestartReady { job, epoch });
            }
        }
        if self.scenario.failures.model != FailureModel::Trace {
            self.schedule_next_failure(node, self.now);
        }
        self.place_queued();
    }

    fn local_resume_point(&self, job: usize, node: usize) -> Option<Ms> {
        if self.policy.recovery == Recovery::KubernetesDefault {
            return None;
        }
        self.jobs[job]
            .checkpoint
            .as_ref()
            .filter(|checkpoint| checkpoint.held_on.contains(&node))
            .map(|checkpoint| checkpoint.progress)
    }

    fn start_delay(&self, job: usize, from_checkpoint: bool) -> Ms {
        let class = self.class(job);
        let criu = &self.scenario.criu;
        if from_checkpoint {
            ms(criu.restore_time(class.memory_image.0))
        } else {
            ms(criu.fresh_start_time(class.container_image.0))
        }
    }

    fn warning(&mut self, node: usize, real: bool) {
        if !self.nodes[node].alive {
            return;
        }
        self.nodes[node].warning_real = real;
        self.set_warning(node, Some(self.now));
        let acts_on_degradation = self.policy.recovery == Recovery::Engine
            && !self.policy.engine.triggers.conditions.is_empty();
        if acts_on_degradation && !self.nodes[node].jobs.is_empty() {
            self.full_pass(Vec::new());
        }
    }

    fn set_warning(&mut self, node: usize, since: Option<Ms>) {
        self.nodes[node].warning_since = since;
        if since.is_some() {
            self.troubled_nodes.insert(node);
        } else if self.nodes[node].alive {
            self.troubled_nodes.remove(&node);
        }
        let condition = &self.scenario.failures.precursor.condition;
        let world = &mut self.world.nodes[node];
        world
            .conditions
            .retain(|existing| &existing.kind != condition);
        if let Some(since) = since {
            world.conditions.push(NodeCondition {
                kind: condition.clone(),
                status: ConditionStatus::True,
                since: Some(timestamp(since)),
                reason: Some("PrecursorDetected".into()),
                message: None,
            });
        }
    }

    fn failure_check(&mut self, node: usize) {
        if self.nodes[node].alive || !self.has_stranded_jobs(node) {
            return;
        }
        self.full_pass(Vec::new());
        if self.has_stranded_jobs(node) {
            self.schedule(self.now + RETRY, Event::FailureCheck(node));
        }
    }

    fn eviction(&mut self, node: usize) {
        if self.nodes[node].alive || !self.has_stranded_jobs(node) {
            return;
        }
        self.full_pass(Vec::new());
        if self.has_stranded_jobs(node) {
            self.schedule(self.now + RETRY, Event::Eviction(node));
        }
    }

    /// Jobs on a dead node that nothing is recovering yet.
    fn has_stranded_jobs(&self, node: usize) -> bool {
        self.nodes[node].jobs.iter().any(|&job| {
            self.jobs[job].migration.is_none()
                && matches!(self.jobs[job].state, JobState::Down { .. })
        })
    }

    fn last_heartbeat(&self, node: usize, at: Ms) -> Ms {
        let period = ms(self.scenario.cluster.heartbeat).max(1);
        let phase = self.nodes[node].heartbeat_phase;
        let offset = (at + period - phase) % period;
        at.saturating_sub(offset)
    }

    // ------------------------------------------------------------------------------------------
    // Snapshots and passes

    fn refresh_node(&mut self, node: usize) {
        let now = self.now;
        let grace = ms(self.policy.kubernetes.node_monitor_grace);
        let beat = match self.nodes[node].failed_at {
            Some(failed) => self.last_heartbeat(node, failed),
            None => self.last_heartbeat(node, now),
        };
        let alive = self.nodes[node].alive;
        let world = &mut self.world.nodes[node];
        world.last_heartbeat = Some(timestamp(beat));
        if let Some(ready) = world.conditions.iter_mut().find(|c| c.kind == "Ready") {
            // The node lifecycle controller marks a silent node Unknown after its grace period.
            if !alive && now >= beat + grace {
                ready.status = ConditionStatus::Unknown;
                ready.since = Some(timestamp(beat + grace));
            } else {
                ready.status = ConditionStatus::True;
                ready.since = None;
            }
        }
    }

    fn refresh_datasets(&mut self) {
        if !self.datasets_dirty {
            return;
        }
        for (index, dataset) in self.world.datasets.iter_mut().enumerate() {
            dataset.present_on = self.dataset_holders[index].nodes().map(node_name).collect();
        }
        self.datasets_dirty = false;
    }

    fn pod(&self, job: usize) -> Option<ProtectedPod> {
        let state = &self.jobs[job];
        let node = match state.state {
            JobState::Running { node, .. } | JobState::Down { node } => node,
            _ => return None,
        };
        let class = self.class(job);
        let mut annotations = BTreeMap::new();
        annotations.insert(annotations::PROTECT.to_string(), "true".to_string());
        annotations.insert(annotations::POLICY.to_string(), self.policy.name.clone());
        annotations.insert(annotations::DATASET.to_string(), class.dataset.clone());
        if state.user.is_some() {
            annotations.insert(annotations::USER.to_string(), user_name(job));
        }
        let source = self.jobs[job]
            .migration
            .map(|migration| self.migrations[migration].source)
            .unwrap_or(node);
        Some(ProtectedPod {
            namespace: NAMESPACE.to_string(),
            name: state.name.clone(),
            node: self.world.nodes[source].name.clone(),
            owner: None,
            requests: class.requests,
            labels: BTreeMap::new(),
            annotations,
            last_checkpoint: state.checkpoint.as_ref().map(|checkpoint| CheckpointInfo {
                id: checkpoint.id.clone(),
                taken_at: timestamp(checkpoint.taken_at),
                size: Bytes(checkpoint.size),
                freeze: Some(Duration::from_millis(checkpoint.freeze)),
                held_on: checkpoint
                    .held_on
                    .iter()
                    .map(|&n| self.world.nodes[n].name.clone())
                    .collect(),
                epoch: None,
            }),
            checkpoint_in_progress: state.pending.is_some(),
        })
    }

    fn migration_record(&self, job: usize) -> Option<MigrationRecord> {
        let state = &self.jobs[job];
        if let Some(migration) = state.migration {
            let migration = &self.migrations[migration];
            return Some(MigrationRecord {
                pod: PodRef::new(NAMESPACE, job_name(job)),
                phase: migration.state.phase,
                source: node_name(migration.source),
                target: Some(node_name(migration.target)),
                started_at: migration.state.started_at,
                finished_at: None,
            });
        }
        state.last_migration_end.map(|end| MigrationRecord {
            pod: PodRef::new(NAMESPACE, job_name(job)),
            phase: Phase::Succeeded,
            source: String::new(),
            target: None,
            started_at: timestamp(end),
            finished_at: Some(timestamp(end)),
        })
    }

    fn user_observations(&self, job: usize, into: &mut Vec<UserObservation>) {
        let Some(user) = self.jobs[job].user else {
            return;
        };
        let mut nodes: BTreeSet<usize> = self.cell_nodes[self.users[user].cell]
            .iter()
            .copied()
            .collect();
        if let Some(node) = self.bound_node(job) {
            nodes.insert(node);
        }
        for node in nodes {
            into.push(UserObservation {
                user: user_name(job),
                node: node_name(node),
                latency: self.user_latency(user, node),
            });
        }
    }

    fn user_latency(&self, user: usize, node: usize) -> Duration {
        let Some(spec) = &self.scenario.users else {
            return Duration::ZERO;
        };
        let hops = cell_hops(
            self.users[user].cell,
            self.nodes[node].cell,
            self.scenario.cluster.cells,
        );
        spec.access_latency + spec.latency_per_hop * hops as u32
    }

    fn bound_node(&self, job: usize) -> Option<usize> {
        match self.jobs[job].state {
            JobState::Running { node, .. }
            | JobState::Down { node }
            | JobState::Starting { node }
            | JobState::Restarting { node } => Some(node),
            _ => None,
        }
    }

    fn mobility_enabled(&self) -> bool {
        self.policy.recovery == Recovery::Engine && self.policy.engine.triggers.mobility.is_some()
    }

    /// A pass over the whole cluster.
    fn full_pass(&mut self, requests: Vec<MigrationRequest>) {
        let memory = self.memory.clone();
        let decisions = self.full_decisions(requests, &memory, true);
        self.stats.full_passes += 1;
        self.apply(decisions);
    }

    /// The engine's decisions on the whole cluster. `for_real` passes go through
    /// [`Self::run_decide`] (counted, recorded, memory kept); a check only asks.
    fn full_decisions(
        &mut self,
        requests: Vec<MigrationRequest>,
        memory: &EngineMemory,
        for_real: bool,
    ) -> Decisions {
        for node in 0..self.nodes.len() {
            self.refresh_node(node);
        }
        self.refresh_datasets();
        let mut pods = Vec::new();
        let mut users = Vec::new();
        let mut records = Vec::new();
        let mobility = self.mobility_enabled();
        for job in 0..self.jobs.len() {
            if let Some(pod) = self.pod(job) {
                pods.push(pod);
                if mobility {
                    self.user_observations(job, &mut users);
                }
                if let Some(record) = self.migration_record(job) {
                    records.push(record);
                }
            }
        }
        let mut world = std::mem::take(&mut self.world);
        world.pods = pods;
        world.users = users;
        world.migrations = records;
        world.requests = requests;
        let decisions = if for_real {
            self.run_decide(&world, false)
        } else {
            decide(&world, &self.policies, memory, timestamp(self.now)).0
        };
        world.pods = Vec::new();
        world.users = Vec::new();
        world.migrations = Vec::new();
        world.requests = Vec::new();
        self.world = world;
        decisions
    }

    /// Counts the compact pass's decisions that a full pass with the same memory would not
    /// have made (the audit's `compact_mismatches`).
    fn verify_compact(&mut self, compact: &Decisions, pods: &[String], memory: &EngineMemory) {
        let full = self.full_decisions(Vec::new(), memory, false);
        self.audit.compact_checks += 1;
        for pod in pods {
            let key = |decision: &CheckpointDecision| {
                (
                    decision.node.clone(),
                    decision.replicate_to.clone(),
                    decision.interval,
                    decision.incremental_on.clone(),
                    decision.reason.clone(),
                )
            };
            let ours = compact
                .checkpoints
                .iter()
                .find(|c| &c.pod.name == pod)
                .map(key);
            let theirs = full
                .checkpoints
                .iter()
                .find(|c| &c.pod.name == pod)
                .map(key);
            let moved = |decisions: &Decisions| {
                decisions
                    .migrations
                    .iter()
                    .find(|m| &m.pod.name == pod)
                    .map(|m| (m.to.clone(), m.trigger))
            };
            if ours != theirs || moved(compact) != moved(&full) {
                self.audit.compact_mismatches += 1;
            }
        }
    }

    /// A pass over `jobs` and every node their decisions can name. Returns false (and applies
    /// nothing) when the outcome might differ from a full pass.
    fn compact_pass(&mut self, jobs: &[usize], allow_mobility: bool) -> bool {
        if self.full_pass_would_move_pods() {
            // Its placements would reserve room that changes other choices (standbys too).
            return false;
        }
        let mut included: BTreeSet<usize> = BTreeSet::new();
        // Where each pod's standby may come from in this snapshot; a standby from anywhere else
        // was picked from the engine's whole-cluster fallback, which a compact snapshot cannot
        // reproduce.
        let mut standby_candidates: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut pods = Vec::new();
        let mut users = Vec::new();
        let mut records = Vec::new();
        let mobility = self.mobility_enabled();
        for &job in jobs {
            let Some(pod) = self.pod(job) else { continue };
            let Some(node) = self.bound_node(job) else {
                continue;
            };
            included.insert(node);
            let holders: Vec<usize> = self.jobs[job]
                .checkpoint
                .as_ref()
                .map(|checkpoint| checkpoint.held_on.clone())
                .unwrap_or_default();
            included.extend(holders.iter().copied());
            // A standby is chosen among current holders first, then among the node's peers
            // (the nodes it probes and those probing it); the peers are needed unless a live
            // holder other than the node remains.
            let live_holder = holders
                .iter()
                .any(|&holder| holder != node && self.nodes[holder].alive);
            let mut candidates: BTreeSet<usize> = holders.iter().copied().collect();
            if !live_holder {
                let peers = self.nodes[node].peers.iter().map(|&(peer, _)| peer);
                let peers: Vec<usize> = peers
                    .chain(self.nodes[node].probed_by.iter().copied())
                    .collect();
                candidates.extend(peers.iter().copied());
                included.extend(peers);
            }
            standby_candidates.insert(job, candidates);
            if mobility && let Some(user) = self.jobs[job].user {
                included.extend(self.cell_nodes[self.users[user].cell].iter().copied());
                self.user_observations(job, &mut users);
            }
            if let Some(record) = self.migration_record(job) {
                records.push(record);
            }
            pods.push(pod);
        }
        if pods.is_empty() {
            return true;
        }
        for &node in &included {
            self.refresh_node(node);
        }
        let datasets: BTreeSet<usize> = jobs.iter().map(|&job| self.dataset_index(job)).collect();
        let snapshot = ClusterSnapshot {
            nodes: included
                .iter()
                .map(|&node| self.world.nodes[node].clone())
                .collect(),
            links: included
                .iter()
                .flat_map(|&node| self.nodes[node].peers.iter())
                .filter(|(peer, _)| included.contains(peer))
                .map(|&(_, link)| self.world.links[link].clone())
                .collect(),
            datasets: datasets
                .iter()
                .map(|&index| {
                    let dataset = &self.world.datasets[index];
                    Dataset {
                        id: dataset.id.clone(),
                        total_bytes: dataset.total_bytes,
                        file_count: dataset.file_count,
                        files: Vec::new(),
                        present_on: self.dataset_holders[index]
                            .nodes()
                            .filter(|node| included.contains(node))
                            .map(node_name)
                            .collect(),
                    }
                })
                .collect(),
            pods,
            users,
            migrations: records,
            ..ClusterSnapshot::default()
        };
        let before = self.memory.clone();
        let decisions = self.run_decide(&snapshot, true);
        self.stats.compact_passes += 1;
        let wanted = self.policy.engine.checkpoint.replicate_to as usize;
        let unexpected = decisions
            .migrations
            .iter()
            .any(|migration| !(allow_mobility && migration.trigger == Trigger::Mobility))
            || decisions
                .deferred
                .iter()
                .any(|deferred| deferred.trigger != Trigger::Mobility)
            || decisions.checkpoints.iter().any(|checkpoint| {
                checkpoint.replicate_to.len() < wanted
                    || checkpoint.replicate_to.iter().any(|standby| {
                        let allowed = job_index(&checkpoint.pod.name)
                            .and_then(|job| standby_candidates.get(&job));
                        match (allowed, node_index(standby)) {
                            (Some(allowed), Some(node)) => !allowed.contains(&node),
                            _ => true,
                        }
                    })
            });
        if unexpected {
            self.memory = before;
            self.stats.compact_fallbacks += 1;
            return false;
        }
        if self.options.verify_compact {
            let names: Vec<String> = snapshot.pods.iter().map(|pod| pod.name.clone()).collect();
            self.verify_compact(&decisions, &names, &before);
        }
        self.apply(decisions);
        true
    }

    /// Whether a full pass would want to move some pod now: one stranded on a dead node, or
    /// on a degrading node under a policy that drains those.
    fn full_pass_would_move_pods(&self) -> bool {
        let drains = self.policy.recovery == Recovery::Engine
            && !self.policy.engine.triggers.conditions.is_empty();
        self.troubled_nodes.iter().any(|&node| {
            let dead = !self.nodes[node].alive;
            (dead || drains)
                && self.nodes[node]
                    .jobs
                    .iter()
                    .any(|&job| self.jobs[job].migration.is_none())
        })
    }

    fn run_decide(&mut self, snapshot: &ClusterSnapshot, compact: bool) -> Decisions {
        let now = timestamp(self.now);
        let (decisions, memory) = decide(snapshot, &self.policies, &self.memory, now);
        self.stats.decide_calls += 1;
        if self.recorded.len() < self.options.record_passes && !decisions.migrations.is_empty() {
            self.recorded.push(RecordedPass {
                snapshot: snapshot.clone(),
                memory: self.memory.clone(),
                now,
                decisions: decisions.clone(),
                compact,
            });
        }
        if compact && !self.memory.mobility_since.is_empty() {
            // A compact pass saw only some pods: keep the dwell timers of the others. (The
            // engine rebuilds `mobility_since` from the pods it saw; see the report.)
            let seen: BTreeSet<String> = snapshot
                .pods
                .iter()
                .map(|pod| pod.pod_ref().to_string())
                .collect();
            let mut merged = memory;
            for (key, since) in &self.memory.mobility_since {
                if !seen.contains(key) {
                    merged.mobility_since.insert(key.clone(), *since);
                }
            }
            self.memory = merged;
        } else {
            self.memory = memory;
        }
        decisions
    }

    fn apply(&mut self, decisions: Decisions) {
        self.stats.migration_decisions += decisions.migrations.len() as u64;
        self.stats.checkpoint_decisions += decisions.checkpoints.len() as u64;
        for decision in &decisions.migrations {
            let Some(job) = job_index(&decision.pod.name) else {
                continue;
            };
            if job >= self.jobs.len() || self.jobs[job].migration.is_some() {
                continue;
            }
            let recovery = self.policy.recovery;
            match decision.trigger {
                Trigger::NodeFailed => {
                    if self.stats.first_failure_reason.is_none() {
                        self.stats.first_failure_reason = Some(decision.reason.clone());
                    }
                    if recovery.waits_for_eviction() {
                        let evictable =
                            self.jobs[job].evictable_at.is_some_and(|at| at <= self.now);
                        if evictable {
                            self.start_restart(job, decision);
                        }
                    } else {
                        self.start_migration(job, decision);
                    }
                }
                Trigger::NodeDegraded | Trigger::Alert | Trigger::Mobility => {
                    if recovery == Recovery::Engine {
                        self.start_migration(job, decision);
                    }
                }
                Trigger::Manual => {
                    if recovery == Recovery::SpeconLike {
                        self.start_migration(job, decision);
                    }
                }
            }
        }
        for deferred in &decisions.deferred {
            if deferred.trigger == Trigger::Mobility
                && let Some(job) = job_index(&deferred.pod.name)
                && let Some(mobility) = self.policy.engine.triggers.mobility
            {
                let at = self.now + ms(mobility.dwell).max(SECOND);
                self.schedule(at, Event::MobilityCheck(job));
            }
        }
        if self.policy.recovery.takes_periodic_checkpoints() {
            for decision in &decisions.checkpoints {
                if let Some(job) = job_index(&decision.pod.name) {
                    self.start_checkpoint(job, decision);
                }
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Checkpoints

    fn next_checkpoint_check(&self, job: usize) -> Ms {
        let state = &self.jobs[job];
        match (&state.checkpoint, state.interval) {
            (Some(checkpoint), Some(interval)) => (checkpoint.taken_at + interval).max(self.now),
            (Some(_), None) => self.now + ms(self.policy.engine.checkpoint.min_interval),
            (None, _) => self.now,
        }
    }

    fn schedule_checkpoint_check(&mut self, job: usize, at: Ms) {
        let batch = ms(self.scenario.settings.checkpoint_batch).max(1);
        let at = at.max(self.now).div_ceil(batch) * batch;
        let jobs = self.checkpoint_batches.entry(at).or_default();
        let new_batch = jobs.is_empty();
        jobs.insert(job);
        if new_batch {
            self.schedule(at, Event::CheckpointTick(at));
        }
    }

    fn checkpoint_tick(&mut self, batch: Ms) {
        let Some(jobs) = self.checkpoint_batches.remove(&batch) else {
            return;
        };
        let due: Vec<usize> = jobs
            .into_iter()
            .filter(|&job| {
                let state = &self.jobs[job];
                matches!(state.state, JobState::Running { .. })
                    && state.migration.is_none()
                    && state.pending.is_none()
            })
            .collect();
        if due.is_empty() {
            return;
        }
        if !self.compact_pass(&due, false) {
            self.full_pass(Vec::new());
        }
        // Jobs the engine did not checkpoint (not due after all) need another look later.
        for job in due {
            let state = &self.jobs[job];
            if state.pending.is_none()
                && state.migration.is_none()
                && matches!(state.state, JobState::Running { .. })
            {
                let next = self
                    .next_checkpoint_check(job)
                    .max(self.now + ms(self.scenario.settings.checkpoint_batch));
                self.schedule_checkpoint_check(job, next);
            }
        }
    }

    fn start_checkpoint(&mut self, job: usize, decision: &CheckpointDecision) {
        let JobState::Running { node, since } = self.jobs[job].state else {
            return;
        };
        if since > self.now
            || self.jobs[job].pending.is_some()
            || self.jobs[job].migration.is_some()
            || node_index(&decision.node) != Some(node)
        {
            return;
        }
        let class = self.class(job);
        let size = class.memory_image.0;
        let delta = if decision.incremental_on.is_some() {
            (size as f64 * class.dirty_fraction) as u64
        } else {
            size
        };
        let freeze = ms(self.scenario.criu.dump_time(delta));
        let standby = decision
            .replicate_to
            .first()
            .and_then(|name| node_index(name));
        let now = self.now;
        let state = &mut self.jobs[job];
        let ran = now - since;
        state.progress += ran;
        state.run_time += ran;
        state.state = JobState::Running {
            node,
            since: now + freeze,
        };
        state.checkpoint_overhead += freeze;
        state.checkpoint_seq += 1;
        let seq = state.checkpoint_seq;
        state.pending = Some(PendingCheckpoint {
            seq,
            progress: state.progress,
            taken_at: now,
            freeze,
            size,
            delta,
            standby,
            interval: ms(decision.interval),
        });
        let finish_at = now + freeze + state.work.saturating_sub(state.progress);
        self.metrics.checkpoints += 1;
        self.schedule(finish_at, Event::JobFinish(job));
        self.schedule(now + freeze, Event::CheckpointDone { job, seq });
    }

    fn checkpoint_done(&mut self, job: usize, seq: u64) {
        let JobState::Running { node, .. } = self.jobs[job].state else {
            return;
        };
        let Some(pending) = self.jobs[job].pending.clone().filter(|p| p.seq == seq) else {
            return;
        };
        match pending.standby.filter(|&standby| self.nodes[standby].alive) {
            Some(standby) => {
                let time = self.transfer_time_bytes(node, standby, pending.delta);
                self.metrics.bytes_checkpoint_copies += pending.delta;
                self.schedule(self.now + time, Event::ReplicaDone { job, seq });
            }
            None => self.commit_checkpoint(job, node, None),
        }
    }

    fn replica_done(&mut self, job: usize, seq: u64) {
        let JobState::Running { node, .. } = self.jobs[job].state else {
            return;
        };
        let Some(pending) = self.jobs[job].pending.clone().filter(|p| p.seq == seq) else {
            return;
        };
        let standby = pending.standby.filter(|&standby| self.nodes[standby].alive);
        self.commit_checkpoint(job, node, standby);
    }

    fn commit_checkpoint(&mut self, job: usize, node: usize, standby: Option<usize>) {
        let Some(pending) = self.jobs[job].pending.take() else {
            return;
        };
        let mut held_on = vec![node];
        held_on.extend(standby);
        self.jobs[job].checkpoint = Some(StoredCheckpoint {
            id: format!("ck-{job}-{}", pending.seq),
            progress: pending.progress,
            taken_at: pending.taken_at,
            size: pending.size,
            freeze: pending.freeze,
            held_on,
        });
        self.jobs[job].interval = Some(pending.interval);
        let next = self.next_checkpoint_check(job);
        self.schedule_checkpoint_check(job, next);
    }

    // ------------------------------------------------------------------------------------------
    // Transfers

    fn link(&self, from: usize, to: usize) -> Link {
        true_link(self.scenario, &self.nodes, from, to)
    }

    fn rounds(&self) -> RoundSettings {
        RoundSettings {
            round: self.scenario.settings.transfer_round,
        }
    }

    /// Time to copy one blob of `bytes` (a checkpoint image) with the engine's plan.
    fn transfer_time_bytes(&mut self, from: usize, to: usize, bytes: u64) -> Ms {
        if from == to || bytes == 0 {
            return 0;
        }
        let link = self.link(from, to);
        let key = (bytes, 1, link.rtt.as_micros() as u64, 0, 0, false);
        if let Some(&cached) = self.transfer_cache.get(&key) {
            return cached;
        }
        let files = [FileSpec {
            path: "checkpoint".into(),
            size: bytes,
        }];
        let time = match plan_transfer(&files, &link.estimate(), &self.transfer_settings) {
            Ok(plan) => ms(run_plan(&plan, &link, self.rounds()).duration),
            Err(_) => ms(Duration::from_secs_f64(
                bytes as f64 * 8.0 / link.per_stream_bps(),
            )),
        };
        self.transfer_cache.insert(key, time);
        time
    }

    fn transfer_time_files(&mut self, from: usize, to: usize, dataset: usize) -> Ms {
        if from == to {
            return 0;
        }
        let link = self.link(from, to);
        let files = &self.dataset_files[dataset];
        let bytes: u64 = files.iter().map(|file| file.size).sum();
        let key = (bytes, files.len(), link.rtt.as_micros() as u64, 0, 0, true);
        if let Some(&cached) = self.transfer_cache.get(&key) {
            return cached;
        }
        let time = match plan_transfer(files, &link.estimate(), &self.transfer_settings) {
            Ok(plan) => ms(run_plan(&plan, &link, self.rounds()).duration),
            Err(_) => ms(Duration::from_secs_f64(
                bytes as f64 * 8.0 / link.per_stream_bps(),
            )),
        };
        self.transfer_cache.insert(key, time);
        time
    }

    /// Time to carry out a transfer the engine planned, on the true link.
    fn planned_transfer_time(&mut self, transfer: &PlannedTransfer) -> Ms {
        let (Some(from), Some(to)) = (node_index(&transfer.from), node_index(&transfer.to)) else {
            return 0;
        };
        let link = self.link(from, to);
        let plan = &transfer.plan;
        let key = (
            plan.total_bytes,
            plan.units.len(),
            link.rtt.as_micros() as u64,
            plan.initial_streams,
            plan.max_streams,
            true,
        );
        if let Some(&cached) = self.transfer_cache.get(&key) {
            return cached;
        }
        let time = ms(run_plan(plan, &link, self.rounds()).duration);
        self.transfer_cache.insert(key, time);
        time
    }

    // ------------------------------------------------------------------------------------------
    // Kubernetes restarts

    fn start_restart(&mut self, job: usize, decision: &MigrationDecision) {
        let JobState::Down { node: source } = self.jobs[job].state else {
            return;
        };
        let Some(target) = node_index(&decision.to) else {
            return;
        };
        if !self.nodes[target].alive {
            return;
        }
        let requests = self.requests(job);
        self.release(source, requests);
        self.unbind(job, source);
        self.reserve(target, requests);
        self.bind(job, target);
        let uses_checkpoint = self.policy.recovery != Recovery::KubernetesDefault
            && matches!(decision.checkpoint, CheckpointSource::Stored { .. });
        let mut delay = 0;
        for transfer in &decision.transfers {
            let is_checkpoint = transfer.payload == automigrate_core::decide::Payload::Checkpoint;
            if is_checkpoint && !uses_checkpoint {
                continue;
            }
            delay += self.planned_transfer_time(transfer);
            self.metrics.bytes_recovery += transfer.bytes.0;
        }
        delay += self.start_delay(job, uses_checkpoint);
        let resume = if uses_checkpoint {
            self.jobs[job].checkpoint.as_ref().map_or(0, |c| c.progress)
        } else {
            0
        };
        let state = &mut self.jobs[job];
        state.state = JobState::Restarting { node: target };
        state.restart_from = resume;
        state.restarts += 1;
        state.epoch += 1;
        let epoch = state.epoch;
        self.schedule(self.now + delay, Event::RestartReady { job, epoch });
    }

    // ------------------------------------------------------------------------------------------
    // Migrations, through the engine's state machine

    fn start_migration(&mut self, job: usize, decision: &MigrationDecision) {
        let (Some(source), Some(target)) = (node_index(&decision.from), node_index(&decision.to))
        else {
            return;
        };
        let running =
            matches!(self.jobs[job].state, JobState::Running { node, .. } if node == source);
        let down = matches!(self.jobs[job].state, JobState::Down { node } if node == source);
        if !(running || down) || !self.nodes[target].alive {
            return;
        }
        if running
            && matches!(self.jobs[job].state, JobState::Running { since, .. } if since > self.now)
        {
            // Mid-freeze: the checkpoint in progress is abandoned by the migration's own dump.
            self.jobs[job].pending = None;
        }
        // What the engine believed: a fresh dump means it saw the source alive. The source may
        // have died since its last heartbeat; the driver finds out when it tries (below).
        let fresh = matches!(decision.checkpoint, CheckpointSource::Fresh { .. });
        let planned_stored = matches!(decision.checkpoint, CheckpointSource::Stored { .. });
        let source_alive = fresh;
        let incremental = matches!(
            decision.checkpoint,
            CheckpointSource::Fresh { base: Some(_) }
        );
        let resume = match &decision.checkpoint {
            CheckpointSource::Fresh { .. } => None,
            CheckpointSource::Stored { .. } => {
                Some(self.jobs[job].checkpoint.as_ref().map_or(0, |c| c.progress))
            }
            CheckpointSource::None => Some(0),
        };
        let state = MigrationState::new(
            decision.from.clone(),
            decision.to.clone(),
            source_alive,
            timestamp(self.now),
            decision.failed_at,
        );
        let limits = Limits::from_policy(&self.policy.engine);
        let requests = self.requests(job);
        self.reserve(target, requests);
        match decision.trigger {
            Trigger::NodeDegraded | Trigger::Alert => self.metrics.proactive_migrations += 1,
            Trigger::Mobility => self.metrics.mobility_migrations += 1,
            _ => {}
        }
        let id = self.migrations.len();
        self.migrations.push(SimMigration {
            job,
            source,
            target,
            state,
            limits,
            transfers: decision.transfers.clone(),
            fresh,
            planned_stored,
            incremental,
            resume,
            seq: 0,
            target_reserved: true,
            source_released: false,
            job_on_target: false,
            timed_out: false,
        });
        self.jobs[job].migration = Some(id);
        if fresh && !self.nodes[source].alive {
            self.source_lost(id);
        } else {
            self.drive(id);
        }
    }

    /// Schedules the completion of the step the state machine asks for now.
    fn drive(&mut self, id: usize) {
        self.stats.migration_steps += 1;
        let step = migration::step(&self.migrations[id].state);
        let phase = self.migrations[id].state.phase;
        let job = self.migrations[id].job;
        let (source, target) = (self.migrations[id].source, self.migrations[id].target);
        let class_memory = self.class(job).memory_image.0;
        let dirty = self.class(job).dirty_fraction;
        let duration = match step {
            Step::SyncData if phase == Phase::Pending => 0,
            Step::SyncData => {
                // Dataset (and, for a dead source, the stored checkpoint) while the source runs.
                let transfers = self.migrations[id].transfers.clone();
                let (fresh, planned_stored) = (
                    self.migrations[id].fresh,
                    self.migrations[id].planned_stored,
                );
                let mut total = 0;
                for transfer in &transfers {
                    let is_checkpoint =
                        transfer.payload == automigrate_core::decide::Payload::Checkpoint;
                    // A planned checkpoint copy is the fresh dump's (sent later, in
                    // Transferring) unless the engine planned it from a stored copy.
                    if is_checkpoint && !planned_stored {
                        continue;
                    }
                    total += self.planned_transfer_time(transfer);
                    self.metrics.bytes_recovery += transfer.bytes.0;
                }
                if !fresh && !planned_stored {
                    total += self.stored_checkpoint_copy(id);
                }
                total
            }
            Step::Checkpoint => {
                // The final stop-and-dump: the job stops making progress here.
                self.stop(job);
                self.migrations[id].resume = Some(self.jobs[job].progress);
                let bytes = if self.migrations[id].incremental {
                    (class_memory as f64 * dirty) as u64
                } else {
                    class_memory
                };
                ms(self.scenario.criu.dump_time(bytes))
            }
            Step::TransferCheckpoint => {
                if self.migrations[id].fresh {
                    let bytes = if self.migrations[id].incremental {
                        (class_memory as f64 * dirty) as u64
                    } else {
                        class_memory
                    };
                    self.metrics.bytes_recovery += bytes;
                    self.transfer_time_bytes(source, target, bytes)
                } else {
                    self.stored_checkpoint_copy(id)
                }
            }
            Step::Fence { source_alive } => {
                if source_alive {
                    ms(self.scenario.settings.stop_source)
                } else {
                    0
                }
            }
            Step::Restore => ms(self.scenario.criu.restore_time(class_memory)),
            Step::Verify => ms(self.scenario.settings.verify),
            Step::RollBack { action, .. } => {
                ms(self.scenario.settings.stop_source)
                    + match action {
                        RollbackAction::KeepSource => 0,
                        RollbackAction::RestoreOnSource => {
                            ms(self.scenario.criu.restore_time(class_memory))
                        }
                        RollbackAction::RestartFresh => ms(self
                            .scenario
                            .criu
                            .fresh_start_time(self.class(job).container_image.0)),
                    }
            }
            Step::Done => {
                self.end_migration(id);
                return;
            }
        };
        // A step that would outlast its phase's deadline fails at the deadline instead.
        let deadline = self.migrations[id].limits.deadline(phase).map(ms);
        let seq = self.migrations[id].seq + 1;
        self.migrations[id].seq = seq;
        let timed_out = deadline.is_some_and(|limit| duration > limit)
            && !matches!(step, Step::RollBack { .. });
        self.migrations[id].timed_out = timed_out;
        let at = match deadline {
            Some(limit) if timed_out => self.now + limit,
            _ => self.now + duration,
        };
        self.schedule(at, Event::MigrationStep { migration: id, seq });
    }

    /// Copies the newest surviving stored checkpoint to the target; the resume point follows.
    fn stored_checkpoint_copy(&mut self, id: usize) -> Ms {
        let job = self.migrations[id].job;
        let target = self.migrations[id].target;
        let holder = self.jobs[job].checkpoint.as_ref().and_then(|checkpoint| {
            checkpoint
                .held_on
                .iter()
                .copied()
                .filter(|&node| self.nodes[node].alive)
                .min_by_key(|&node| (ms(self.link(node, target).rtt), node))
                .map(|node| (node, checkpoint.size, checkpoint.progress))
        });
        match holder {
            Some((node, size, progress)) => {
                self.migrations[id].resume = Some(progress);
                if node == target {
                    0
                } else {
                    self.metrics.bytes_recovery += size;
                    self.transfer_time_bytes(node, target, size)
                }
            }
            None => {
                self.migrations[id].resume = Some(0);
                0
            }
        }
    }

    fn complete_step(&mut self, id: usize) {
        let phase = self.migrations[id].state.phase;
        let job = self.migrations[id].job;
        if std::mem::take(&mut self.migrations[id].timed_out)
            && let Some(event) = migration::timeout(
                &self.migrations[id].state,
                &self.migrations[id].limits,
                timestamp(self.now),
            )
        {
            self.apply_event(id, &event);
            return;
        }
        match phase {
            Phase::Fencing if !self.migrations[id].source_released => {
                let requests = self.requests(job);
                let source = self.migrations[id].source;
                self.release(source, requests);
                self.migrations[id].source_released = true;
                if matches!(self.jobs[job].state, JobState::Running { .. }) {
                    // Fencing a source that still runs (a dead source never gets here
                    // running): stop it so two copies never run.
                    self.stop(job);
                }
            }
            Phase::Restoring => {
                let target = self.migrations[id].target;
                let source = self.migrations[id].source;
                self.unbind(job, source);
                self.bind(job, target);
                self.migrations[id].job_on_target = true;
                let resume = self.migrations[id].resume.unwrap_or(0);
                self.resume(job, target, resume);
            }
            _ => {}
        }
        let checkpoint_id = (phase == Phase::Checkpointing).then(|| format!("mig-{id}"));
        self.apply_event(id, &migration::Event::StepSucceeded { checkpoint_id });
    }

    fn apply_event(&mut self, id: usize, event: &migration::Event) {
        let now = timestamp(self.now);
        let next = migration::apply(
            &self.migrations[id].state,
            event,
            &self.migrations[id].limits,
            now,
        );
        match next {
            Ok(state) => {
                self.migrations[id].state = state;
                self.drive(id);
            }
            Err(_) => {
                // The machine refused the event: the migration is over as far as it goes.
                self.end_migration(id);
            }
        }
    }

    fn source_lost(&mut self, id: usize) {
        let job = self.migrations[id].job;
        let phase = self.migrations[id].state.phase;
        match phase {
            Phase::Pending | Phase::Syncing | Phase::Checkpointing => {
                self.stop(job);
                self.migrations[id].fresh = false;
                self.migrations[id].incremental = false;
                let seq = self.migrations[id].seq + 1;
                self.migrations[id].seq = seq;
                self.apply_event(id, &migration::Event::SourceLost);
            }
            Phase::Transferring if self.migrations[id].fresh => {
                // The dump lies on the dead source and never arrives.
                let lost = migration::apply(
                    &self.migrations[id].state,
                    &migration::Event::SourceLost,
                    &self.migrations[id].limits,
                    timestamp(self.now),
                );
                if let Ok(state) = lost {
                    self.migrations[id].state = state;
                }
                self.apply_event(
                    id,
                    &migration::Event::StepFailed {
                        reason: "source node failed during the transfer".into(),
                        retryable: false,
                    },
                );
            }
            _ => {}
        }
    }

    fn target_lost(&mut self, id: usize) {
        let phase = self.migrations[id].state.phase;
        if phase == Phase::Verifying {
            // The replacement already runs on the target; the migration is done and the job
            // fails with its new node like any running job.
            self.apply_event(
                id,
                &migration::Event::StepSucceeded {
                    checkpoint_id: None,
                },
            );
            return;
        }
        self.apply_event(
            id,
            &migration::Event::StepFailed {
                reason: "target node failed".into(),
                retryable: false,
            },
        );
    }

    fn abandon_migration(&mut self, id: usize, reason: &str) {
        if self.migrations[id].state.phase.is_terminal() {
            return;
        }
        self.migrations[id].seq += 1;
        let cancelled = migration::apply(
            &self.migrations[id].state,
            &migration::Event::Cancel {
                reason: reason.to_string(),
            },
            &self.migrations[id].limits,
            timestamp(self.now),
        );
        if let Ok(state) = cancelled {
            self.migrations[id].state = state;
        }
        self.release_target(id);
        let job = self.migrations[id].job;
        self.jobs[job].migration = None;
    }

    fn release_target(&mut self, id: usize) {
        if self.migrations[id].target_reserved && !self.migrations[id].job_on_target {
            let job = self.migrations[id].job;
            let requests = self.requests(job);
            let target = self.migrations[id].target;
            self.release(target, requests);
            self.migrations[id].target_reserved = false;
        }
    }

    fn end_migration(&mut self, id: usize) {
        let job = self.migrations[id].job;
        // The plans hold every work unit; a year of migrations would otherwise keep gigabytes.
        self.migrations[id].transfers = Vec::new();
        if self.jobs[job].migration != Some(id) {
            return;
        }
        self.jobs[job].migration = None;
        let phase = self.migrations[id].state.phase;
        let source = self.migrations[id].source;
        let target = self.migrations[id].target;
        if phase == Phase::Succeeded && self.migrations[id].job_on_target {
            self.jobs[job].migrations += 1;
            self.jobs[job].last_migration_end = Some(self.now);
            self.metrics.migrations += 1;
            if let Some(resume) = self.migrations[id].resume
                && self.migrations[id].fresh
            {
                // The migration's dump is a checkpoint the target and the source both hold.
                let mut held_on = vec![target];
                if self.nodes[source].alive {
                    held_on.push(source);
                }
                self.jobs[job].checkpoint = Some(StoredCheckpoint {
                    id: format!("mig-{id}"),
                    progress: resume,
                    taken_at: self.now,
                    size: self.class(job).memory_image.0,
                    freeze: self.jobs[job]
                        .checkpoint
                        .as_ref()
                        .map_or(0, |checkpoint| checkpoint.freeze),
                    held_on,
                });
            }
            return;
        }
        self.metrics.failed_migrations += 1;
        self.release_target(id);
        if self.migrations[id].job_on_target {
            return;
        }
        if self.migrations[id].source_released {
            let requests = self.requests(job);
            self.reserve(source, requests);
            self.migrations[id].source_released = false;
        }
        match self.jobs[job].state {
            JobState::Running { .. } => {}
            _ if self.nodes[source].alive => {
                // Rolled back (or given up) with the source alive: the workload comes back
                // where it was, from the state it stopped at.
                let progress = self.jobs[job].progress;
                self.resume(job, source, progress);
            }
            _ => {
                self.jobs[job].state = JobState::Down { node: source };
                if self.policy.recovery.waits_for_eviction() {
                    self.schedule(self.now, Event::Eviction(source));
                } else {
                    self.schedule(self.now + SECOND, Event::FailureCheck(source));
                }
            }
        }
    }

    // ------------------------------------------------------------------------------------------
    // Users and SpeCon

    fn user_moved(&mut self, user: usize) {
        let job = self.users[user].job;
        if self.jobs[job].finished.is_some() {
            return;
        }
        let cells = self.scenario.cluster.cells as u64;
        self.users[user].cell = self.users[user].stream.below(cells) as usize;
        let pause = self.user_pause(user);
        self.schedule(self.now + pause.max(SECOND), Event::UserMove(user));
        self.mobility_pass(job);
    }

    fn mobility_pass(&mut self, job: usize) {
        if !self.mobility_enabled()
            || self.jobs[job].migration.is_some()
            || !matches!(self.jobs[job].state, JobState::Running { .. })
        {
            return;
        }
        if !self.compact_pass(&[job], true) {
            self.full_pass(Vec::new());
        }
    }

    fn schedule_specon_check(&mut self, job: usize, epoch: u64, at: Ms) {
        let period = self
            .policy
            .specon
            .as_ref()
            .map_or(HOUR, |spec| ms(spec.monitor_period))
            .max(1);
        let at = at.max(self.now).div_ceil(period) * period;
        let jobs = self.specon_batches.entry(at).or_default();
        let new_batch = jobs.is_empty();
        jobs.insert((job, epoch));
        if new_batch {
            self.schedule(at, Event::SpeconTick(at));
        }
    }

    /// Asks the engine to place every job whose progress has slowed since the last look.
    fn specon_tick(&mut self, batch: Ms) {
        let Some(jobs) = self.specon_batches.remove(&batch) else {
            return;
        };
        let mut requests = Vec::new();
        for (job, epoch) in jobs {
            if self.jobs[job].epoch != epoch || self.jobs[job].specon_requested {
                continue;
            }
            let JobState::Running { since, .. } = self.jobs[job].state else {
                continue;
            };
            let Some(milestone) = self.jobs[job].specon_at else {
                continue;
            };
            let progress = self.jobs[job].progress + self.now.saturating_sub(since);
            if progress < milestone {
                let at = self.now + milestone.saturating_sub(progress).max(SECOND);
                self.schedule_specon_check(job, epoch, at);
                continue;
            }
            self.jobs[job].specon_requested = true;
            requests.push(MigrationRequest {
                pod: PodRef::new(NAMESPACE, job_name(job)),
                target: None,
            });
        }
        if !requests.is_empty() {
            self.full_pass(requests);
        }
    }

    // ------------------------------------------------------------------------------------------
    // Invariants and results

    fn check_invariants(&mut self) {
        self.audit.checks += 1;
        let mut running_jobs = BTreeSet::new();
        for (id, job) in self.jobs.iter().enumerate() {
            if let JobState::Running { node, .. } = job.state {
                if !self.nodes[node].alive {
                    self.audit.running_on_dead_node += 1;
                }
                if !running_jobs.insert(id) || !self.nodes[node].jobs.contains(&id) {
                    self.audit.running_twice += 1;
                }
            }
        }
        for node in &self.world.nodes {
            if node.allocatable.shortfall(node.requested).is_some() {
                self.audit.overcommitted_nodes += 1;
            }
        }
    }

    fn finish(mut self) -> RunResult {
        let mut jct: Vec<Ms> = Vec::new();
        let mut makespan = 0;
        let allocatable = self.scenario.cluster.allocatable;
        let mut outcomes = Vec::with_capacity(self.jobs.len());
        for (id, job) in self.jobs.iter().enumerate() {
            let class = &self.scenario.workload.classes[job.class];
            let share = node_share(class.requests, allocatable);
            self.metrics.redone_node_hours += hours(job.lost_work) * share;
            self.metrics.downtime_node_hours += hours(job.downtime) * share;
            self.metrics.checkpoint_node_hours += hours(job.checkpoint_overhead) * share;
            self.metrics.restarts += u64::from(job.restarts);
            if let Some(finished) = job.finished {
                jct.push(finished - job.arrival);
                makespan = makespan.max(finished);
            }
            outcomes.push(JobOutcome {
                id,
                class: class.name.clone(),
                arrival: job.arrival,
                finished: job.finished,
                work: job.work,
                run_time: job.run_time,
                lost_work: job.lost_work,
                downtime: job.downtime,
                checkpoint_overhead: job.checkpoint_overhead,
                migrations: job.migrations,
                restarts: job.restarts,
                placements: job.placements.clone(),
            });
        }
        let metrics = &mut self.metrics;
        metrics.lost_node_hours =
            metrics.redone_node_hours + metrics.downtime_node_hours + metrics.checkpoint_node_hours;
        metrics.jobs_finished = jct.len();
        jct.sort_unstable();
        if !jct.is_empty() {
            metrics.jct_mean_hours = jct.iter().map(|&t| hours(t)).sum::<f64>() / jct.len() as f64;
            let rank = ((jct.len() as f64) * 0.95).ceil() as usize;
            metrics.jct_p95_hours = hours(jct[rank.clamp(1, jct.len()) - 1]);
        }
        metrics.makespan_hours = hours(makespan);
        metrics.bytes_moved = metrics.bytes_checkpoint_copies + metrics.bytes_recovery;
        RunResult {
            scenario: self.scenario.name.clone(),
            policy: self.policy.name.clone(),
            label: self.policy.label.clone(),
            metrics: self.metrics,
            engine: self.stats,
            audit: self.audit,
            jobs: outcomes,
            recorded: self.recorded,
            ended_at: self.now,
        }
    }
}

/// Where copies of one dataset are: its origin replicas, and the nodes whose running pods
/// hold one (counted, since two pods on a node share a copy).
#[derive(Debug, Clone, Default)]
struct DatasetCopies {
    origins: BTreeSet<usize>,
    users: BTreeMap<usize, u32>,
}

impl DatasetCopies {
    fn contains(&self, node: usize) -> bool {
        self.origins.contains(&node) || self.users.contains_key(&node)
    }

    /// Every node with a copy, ascending, each once.
    fn nodes(&self) -> impl Iterator<Item = usize> + '_ {
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
fn node_share(requests: Resources, allocatable: Resources) -> f64 {
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

pub fn node_name(index: usize) -> String {
    format!("node-{index:04}")
}

fn node_index(name: &str) -> Option<usize> {
    name.strip_prefix("node-")?.parse().ok()
}

pub fn job_name(index: usize) -> String {
    format!("job-{index:06}")
}

fn job_index(name: &str) -> Option<usize> {
    name.strip_prefix("job-")?.parse().ok()
}

fn user_name(job: usize) -> String {
    format!("user-{job:06}")
}

fn cell_hops(a: usize, b: usize, cells: usize) -> usize {
    let distance = a.abs_diff(b);
    distance.min(cells.saturating_sub(distance))
}

/// The true path between two nodes: RTT from the cells between them, the cluster's bandwidth
/// and loss.
fn true_link(scenario: &ClusterScenario, nodes: &[SimNode], from: usize, to: usize) -> Link {
    let cluster = &scenario.cluster;
    let hops = cell_hops(nodes[from].cell, nodes[to].cell, cluster.cells);
    Link {
        rtt: cluster.intra_cell_rtt + cluster.rtt_per_hop * hops as u32,
        capacity_bps: cluster.bandwidth.0 as f64,
        loss: cluster.loss,
    }
}
