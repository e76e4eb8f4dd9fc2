//! Migrations, through the engine's state machine: each step takes the time the cost model
//! gives it.

use automigrate_core::decide::{CheckpointSource, MigrationDecision, Trigger};
use automigrate_core::migration::{self, Limits, MigrationState, Phase, RollbackAction, Step};

use super::clock::{Ms, SECOND, ms, timestamp};
use super::simulation::Simulation;
use super::state::{Event, JobState, SimMigration, StoredCheckpoint, node_index};

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
    pub(super) fn drive(&mut self, id: usize) {
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
                // The job stays stopped while the archive is sealed, until it can be sent.
                ms(self.scenario.criu.final_dump_time(bytes))
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
    pub(super) fn stored_checkpoint_copy(&mut self, id: usize) -> Ms {
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

    pub(super) fn complete_step(&mut self, id: usize) {
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

    pub(super) fn apply_event(&mut self, id: usize, event: &migration::Event) {
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

    pub(super) fn source_lost(&mut self, id: usize) {
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

    pub(super) fn target_lost(&mut self, id: usize) {
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

    pub(super) fn abandon_migration(&mut self, id: usize, reason: &str) {
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

    pub(super) fn release_target(&mut self, id: usize) {
        if self.migrations[id].target_reserved && !self.migrations[id].job_on_target {
            let job = self.migrations[id].job;
            let requests = self.requests(job);
            let target = self.migrations[id].target;
            self.release(target, requests);
            self.migrations[id].target_reserved = false;
        }
    }

    pub(super) fn end_migration(&mut self, id: usize) {
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
}
