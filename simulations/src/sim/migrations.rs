//! Migrations: each one starts from the engine's decision as the core driver's first run
//! ([`driver::begin`]), and the core driver carries it out through the simulator's port
//! ([`super::port`]). Every migration rule (the loop, the lost source and target, checkpoint
//! choice, fencing, restore failure, rollback) is the driver's; this file only wakes the
//! driver when something it waits on may have changed (an effect completing on the cost
//! model, a retry's backoff, a phase deadline, a Lease or Ready condition running out) and
//! settles what the end means for the job and the metrics.

use automigrate_core::decide::{CheckpointSource, MigrationDecision, Trigger};
use automigrate_core::driver::{self, DeadNodeFencing};

use super::clock::{Ms, SECOND, ms, sim_time, timestamp};
use super::simulation::Simulation;
use super::state::{Event, JobState, SimCheckpointCopy, SimMigration, node_index};

impl Simulation<'_> {
    pub(super) fn start_migration(&mut self, job: usize, decision: &MigrationDecision) {
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
        let dataset = self.dataset_index(job);
        let dataset_path = format!("/datasets/{}", self.scenario.workload.datasets[dataset].id);
        let run = driver::begin(
            decision,
            Some(&dataset_path),
            &self.policy.engine,
            timestamp(self.now),
        );
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
            run,
            // Only a stored checkpoint's copy and datasets are sent as planned; a fresh dump's
            // copy is timed on its own image.
            transfers: decision
                .transfers
                .iter()
                .filter(|planned| {
                    planned.payload != automigrate_core::decide::Payload::Checkpoint
                        || matches!(decision.checkpoint, CheckpointSource::Stored { .. })
                })
                .cloned()
                .collect(),
            dump_progress: None,
            in_flight: Vec::new(),
            transfers_started: 0,
            seq: 0,
            target_reserved: true,
            source_released: false,
            job_on_target: false,
            started_fresh_on_target: false,
            ended: false,
        });
        self.jobs[job].migration = Some(id);
        self.advance_migration(id);
    }

    pub(super) fn next_seq(&mut self, id: usize) -> u64 {
        self.migrations[id].seq += 1;
        self.migrations[id].seq
    }

    /// Wakes the driver at the first time what it waits on may have changed: an effect in
    /// flight completing, a retry's backoff, the phase deadline, and for a node that is down
    /// its Ready condition, its Lease timeout and its fencing time running out.
    pub(super) fn schedule_wake(&mut self, id: usize) {
        let migration = &self.migrations[id];
        let state = &migration.run.state;
        let mut times: Vec<Ms> = migration.in_flight.iter().map(|f| f.done_at).collect();
        times.extend(state.retry_at.map(sim_time));
        if let Some(limit) = migration.run.limits.deadline(state.phase) {
            times.push(sim_time(state.phase_started_at) + ms(limit));
        }
        let lease_timeout = migration.run.lease_timeout;
        for node in [migration.source, migration.target] {
            if !self.nodes[node].alive {
                let renewed = self.lease_renewed(node);
                times.push(renewed + ms(self.policy.kubernetes.node_monitor_grace));
                times.push(renewed + ms(lease_timeout));
                times.push(renewed + ms(DeadNodeFencing::default().dead_after(lease_timeout)));
            }
        }
        let now = self.now;
        if let Some(at) = times.into_iter().filter(|&at| at > now).min() {
            let seq = self.next_seq(id);
            self.schedule(at, Event::MigrationStep { migration: id, seq });
        }
    }

    /// Drops the migration without the driver: its job finished, so there is nothing to move.
    pub(super) fn abandon_migration(&mut self, id: usize) {
        if self.migrations[id].ended {
            return;
        }
        self.migrations[id].ended = true;
        self.migrations[id].seq += 1;
        self.migrations[id].in_flight = Vec::new();
        self.migrations[id].transfers = Vec::new();
        self.release_target(id);
        let job = self.migrations[id].job;
        self.jobs[job].migration = None;
    }

    pub(super) fn release_target(&mut self, id: usize) {
        if self.migrations[id].target_reserved && !self.migrations[id].job_on_target {
            let job = self.migrations[id].job;
            let requests = self.requests(job);
            let target = self.migrations[id].target;
            self.release(target, requests);
            self.migrations[id].target_reserved = false;
        }
    }

    /// What the end of a migration means for its job, read from the simulated world (not
    /// from the phase): the workload runs on the target from a checkpoint (a migration), from
    /// the beginning (a restart), or not there at all (a failed migration: the job runs where
    /// the rollback left it, or comes back on its node, or waits for recovery).
    pub(super) fn end_migration(&mut self, id: usize) {
        let migration = &mut self.migrations[id];
        migration.ended = true;
        // The plans hold every work unit; a year of migrations would otherwise keep gigabytes.
        migration.transfers = Vec::new();
        migration.in_flight = Vec::new();
        let job = migration.job;
        if self.jobs[job].migration != Some(id) {
            return;
        }
        self.jobs[job].migration = None;
        let (source, target) = (self.migrations[id].source, self.migrations[id].target);
        let on_target = self.migrations[id].job_on_target;
        let runs_on_target = on_target
            && matches!(self.jobs[job].state, JobState::Running { node, .. } if node == target);
        if runs_on_target {
            self.jobs[job].last_migration = Some((self.now, self.migrations[id].run.state.phase));
            if self.migrations[id].started_fresh_on_target {
                // No checkpoint survived, or the rollback restarted it: training starts over.
                self.jobs[job].restarts += 1;
                if self.migrations[id].run.state.rollback.is_some() {
                    self.metrics.failed_migrations += 1;
                }
                return;
            }
            self.jobs[job].migrations += 1;
            self.metrics.migrations += 1;
            let dump = format!("mig-{id}");
            if let Some(progress) = self.migrations[id].dump_progress
                && self.migrations[id].run.state.checkpoint_id.as_deref() == Some(dump.as_str())
            {
                // The migration's dump is a checkpoint the target and the source both hold.
                let mut held_on = vec![target];
                if self.nodes[source].alive {
                    held_on.push(source);
                }
                self.jobs[job].checkpoint = Some(SimCheckpointCopy {
                    id: dump,
                    progress,
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
        let home = if on_target { target } else { source };
        if !on_target && self.migrations[id].source_released {
            let requests = self.requests(job);
            self.reserve(source, requests);
            self.migrations[id].source_released = false;
        }
        match self.jobs[job].state {
            JobState::Running { .. } => {}
            _ if self.nodes[home].alive => {
                // Given up with its node alive: the workload comes back where it was, from
                // the state it stopped at.
                let progress = self.jobs[job].progress;
                self.resume(job, home, progress);
            }
            _ => {
                self.jobs[job].state = JobState::Down { node: home };
                if self.policy.recovery.waits_for_eviction() {
                    self.schedule(self.now, Event::Eviction(home));
                } else {
                    self.schedule(self.now + SECOND, Event::FailureCheck(home));
                }
            }
        }
    }
}
