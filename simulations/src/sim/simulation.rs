//! The simulation of one policy on one scenario: its state, its event queue and the loop that
//! hands each event to the operation that owns it.

use std::collections::{BTreeMap, BTreeSet};

use automigrate_core::model::ClusterSnapshot;
use automigrate_core::transfer::{FileSpec, TransferSettings};
use automigrate_core::{EngineMemory, PolicySet};

use crate::random::Stream;
use crate::scenario::{ClusterScenario, SimPolicy};

use super::clock::{Ms, ms};
use super::results::{Audit, EngineStats, Metrics, RecordedPass, RunOptions};
use super::state::{DatasetCopies, Event, Job, JobState, SimMigration, SimNode, SimUser};

/// One simulation run of one policy on one scenario.
#[derive(Debug)]
pub struct Simulation<'a> {
    pub(super) scenario: &'a ClusterScenario,
    pub(super) policy: &'a SimPolicy,
    pub(super) policies: PolicySet,
    pub(super) memory: EngineMemory,
    pub(super) options: RunOptions,
    pub(super) now: Ms,
    pub(super) sequence: u64,
    pub(super) queue: BTreeMap<(Ms, u64), Event>,
    pub(super) world: ClusterSnapshot,
    pub(super) datasets_dirty: bool,
    pub(super) dataset_holders: Vec<DatasetCopies>,
    pub(super) dataset_files: Vec<Vec<FileSpec>>,
    pub(super) nodes: Vec<SimNode>,
    pub(super) cell_nodes: Vec<Vec<usize>>,
    pub(super) jobs: Vec<Job>,
    pub(super) users: Vec<SimUser>,
    pub(super) migrations: Vec<SimMigration>,
    pub(super) queued: BTreeSet<usize>,
    pub(super) checkpoint_batches: BTreeMap<Ms, BTreeSet<usize>>,
    /// Nodes that are dead or report a degradation condition.
    pub(super) troubled_nodes: BTreeSet<usize>,
    pub(super) specon_batches: BTreeMap<Ms, BTreeSet<(usize, u64)>>,
    pub(super) placement: Stream,
    pub(super) transfer_cache: BTreeMap<(u64, usize, u64, u32, u32, bool), Ms>,
    pub(super) transfer_settings: TransferSettings,
    pub(super) unfinished: usize,
    pub(super) stats: EngineStats,
    pub(super) audit: Audit,
    pub(super) metrics: Metrics,
    pub(super) recorded: Vec<RecordedPass>,
}

impl Simulation<'_> {
    pub(super) fn schedule(&mut self, at: Ms, event: Event) {
        self.sequence += 1;
        self.queue.insert((at.max(self.now), self.sequence), event);
    }

    pub(super) fn run_to_end(&mut self) {
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

    pub(super) fn handle(&mut self, event: Event) {
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
                if self.migrations[migration].seq == seq {
                    self.advance_migration(migration);
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
}
