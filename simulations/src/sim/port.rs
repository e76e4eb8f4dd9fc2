//! `SimPort`: the simulator's implementation of the core driver's [`Port`], and running the
//! driver on a migration at the simulated time ([`Simulation::advance_migration`]). The driver
//! (`automigrate_core::driver`) owns every migration rule; this port only says what is true
//! in the simulated cluster and how long each effect takes on the cost model ([`super::costs`]
//! through [`super::transfers`], the scenario's calibrated `criu` and `settings`).
//!
//! Time. The driver reads the simulator's clock ([`Port::now`]) and never waits: an effect
//! that takes time is recorded as in flight ([`InFlight`]) with its completion time, the port
//! answers `Waiting` (a transfer: `Running`), and the migration is woken at that time
//! ([`super::migrations`]); the same request then finds the effect complete, applies what it
//! did to the jobs and nodes, and answers `Done`. So every step costs what the cost model
//! says, and deadlines, retries and Lease-based fencing run on simulated time.
//!
//! What the port sees is what the operator's port would: a node's agent answers only while
//! the node is up; the source's Ready condition stays true until the node-monitor grace after
//! its last heartbeat; Leases renew on the node's heartbeat phase until the node dies.

use std::future::{Future, ready};

use automigrate_core::driver::{
    Action, CheckpointCopy, DeadNodeFencing, Driver, Observation, Outcome, PersistError, Port, Run,
    StepFailure, TargetObservation, TransferRecord, TransferStatus, target_fenced,
};
use automigrate_core::migration::MigrationState;
use jiff::Timestamp;

use super::clock::{Ms, ms, timestamp};
use super::simulation::Simulation;
use super::state::{Effect, Event, InFlight, JobState, node_index, node_name};

/// The driver's port onto one migration of the simulation.
pub(super) struct SimPort<'s, 'a> {
    pub(super) sim: &'s mut Simulation<'a>,
    pub(super) id: usize,
}

impl Port for SimPort<'_, '_> {
    fn now(&mut self) -> Timestamp {
        timestamp(self.sim.now)
    }

    fn observe(&mut self, _run: &Run) -> impl Future<Output = Observation> + Send {
        ready(self.sim.observe_source(self.id))
    }

    fn observe_target(&mut self, _run: &Run) -> impl Future<Output = TargetObservation> + Send {
        let target = self.sim.migrations[self.id].target;
        ready(self.sim.observe_node(target))
    }

    /// The simulated driver never crashes, so a final dump that completed was already handed
    /// to it by its own step: there is never one to find.
    fn final_dump_since(
        &mut self,
        _since: Timestamp,
    ) -> impl Future<Output = Option<String>> + Send {
        ready(None)
    }

    fn stored_checkpoints(
        &mut self,
        _run: &Run,
    ) -> impl Future<Output = Vec<CheckpointCopy>> + Send {
        ready(self.sim.checkpoint_copies(self.id))
    }

    fn transfer(
        &mut self,
        record: &TransferRecord,
    ) -> impl Future<Output = Result<TransferStatus, StepFailure>> + Send {
        ready(self.sim.port_transfer(self.id, record))
    }

    fn act(&mut self, run: &Run, action: &Action) -> impl Future<Output = Outcome> + Send {
        ready(self.sim.port_act(self.id, run, action))
    }

    /// Kept where the simulator reads it (a refused event ends the migration as it stood).
    fn persist(
        &mut self,
        run: &Run,
        _previous: Option<&MigrationState>,
    ) -> impl Future<Output = Result<(), PersistError>> + Send {
        self.sim.migrations[self.id].run = run.clone();
        ready(Ok(()))
    }
}

/// The answer of an agent on a node that is down.
fn unreachable(node: usize) -> String {
    format!("the agent on {} does not answer", node_name(node))
}

impl Simulation<'_> {
    /// Runs the core driver on the migration at the simulated time now.
    pub(super) fn advance_migration(&mut self, id: usize) {
        if self.migrations[id].ended {
            return;
        }
        self.stats.migration_steps += 1;
        let run = self.migrations[id].run.clone();
        let advanced = Driver::default().advance_ready(&mut SimPort { sim: self, id }, run);
        match advanced {
            Ok(advanced) => {
                let ended = advanced.run.state.phase.is_terminal();
                let used_its_turns = advanced.waiting.is_none();
                self.migrations[id].run = advanced.run;
                if ended {
                    self.end_migration(id);
                } else if used_its_turns {
                    let seq = self.next_seq(id);
                    self.schedule(self.now, Event::MigrationStep { migration: id, seq });
                } else {
                    self.schedule_wake(id);
                }
            }
            // The state machine refused an event: the migration is over as it was persisted
            // (the job comes back where it can, as after a failed migration).
            Err(_) => self.end_migration(id),
        }
    }

    /// The Lease renewal the control plane last saw from `node`.
    pub(super) fn lease_renewed(&self, node: usize) -> Ms {
        let at = match self.nodes[node].failed_at {
            Some(failed) if !self.nodes[node].alive => failed,
            _ => self.now,
        };
        self.last_heartbeat(node, at)
    }

    /// Whether the node's Ready condition is still true: up, or down for less than the node
    /// monitor's grace after its last heartbeat.
    pub(super) fn node_ready(&self, node: usize) -> bool {
        self.nodes[node].alive
            || self.now < self.lease_renewed(node) + ms(self.policy.kubernetes.node_monitor_grace)
    }

    pub(super) fn observe_source(&self, id: usize) -> Observation {
        let migration = &self.migrations[id];
        let (job, source, target) = (migration.job, migration.source, migration.target);
        let running_on = |node: usize| {
            self.nodes[node].alive
                && matches!(self.jobs[job].state, JobState::Running { node: at, .. } if at == node)
        };
        Observation {
            source_reachable: self.node_ready(source),
            source_running: !migration.job_on_target && running_on(source),
            target_running: migration.job_on_target && running_on(target),
            source_known: true,
            source_renewed_at: Some(timestamp(self.lease_renewed(source))),
            source_out_of_service: self.nodes[source].out_of_service,
        }
    }

    pub(super) fn observe_node(&self, node: usize) -> TargetObservation {
        TargetObservation {
            gone: false,
            renewed_at: Some(timestamp(self.lease_renewed(node))),
            out_of_service: self.nodes[node].out_of_service,
        }
    }

    /// The copies of the job's stored checkpoint on nodes whose agents answer, each verified
    /// (the simulator does not model damaged images), with the true round trip to the target.
    pub(super) fn checkpoint_copies(&self, id: usize) -> Vec<CheckpointCopy> {
        let migration = &self.migrations[id];
        let Some(checkpoint) = &self.jobs[migration.job].checkpoint else {
            return Vec::new();
        };
        checkpoint
            .held_on
            .iter()
            .copied()
            .filter(|&node| self.nodes[node].alive)
            .map(|node| CheckpointCopy {
                id: checkpoint.id.clone(),
                taken_at: timestamp(checkpoint.taken_at),
                node: node_name(node),
                verified: true,
                rtt_to_target: Some(self.link(node, migration.target).rtt),
            })
            .collect()
    }

    fn final_dump_id(id: usize) -> String {
        format!("mig-{id}")
    }

    /// Bytes of the migration's final dump: the dirty share of the image when it builds on
    /// a base checkpoint (incremental), else the whole image.
    fn final_dump_bytes(&self, id: usize, run: &Run) -> u64 {
        let class = self.class(self.migrations[id].job);
        let image = class.memory_image.0;
        if run.base_checkpoint.is_some() {
            (image as f64 * class.dirty_fraction) as u64
        } else {
            image
        }
    }

    /// Progress the job resumes from when started from checkpoint `from`.
    fn progress_of(&self, id: usize, from: Option<&str>) -> Ms {
        let migration = &self.migrations[id];
        match from {
            None => 0,
            Some(from) if from == Self::final_dump_id(id) => migration.dump_progress.unwrap_or(0),
            Some(from) => self.jobs[migration.job]
                .checkpoint
                .as_ref()
                .filter(|checkpoint| checkpoint.id == from)
                .map_or(0, |checkpoint| checkpoint.progress),
        }
    }

    /// How long a transfer takes and what it moves: the engine's own plan for it when the
    /// decision made one, else one plan for the dataset's files or the checkpoint's image on
    /// the true link; nothing when the receiver already holds it.
    fn transfer_cost(&mut self, id: usize, record: &TransferRecord) -> (Ms, u64) {
        let (Some(from), Some(to)) = (node_index(&record.from), node_index(&record.to)) else {
            return (0, 0);
        };
        let is_checkpoint = record.payload.checkpoint.is_some();
        let planned = self.migrations[id]
            .transfers
            .iter()
            .find(|planned| {
                planned.from == record.from
                    && planned.to == record.to
                    && (planned.payload == automigrate_core::decide::Payload::Checkpoint)
                        == is_checkpoint
            })
            .cloned();
        if let Some(planned) = planned {
            return (self.planned_transfer_time(&planned), planned.bytes.0);
        }
        let job = self.migrations[id].job;
        match &record.payload.checkpoint {
            None => {
                let dataset = self.dataset_index(job);
                if self.dataset_holders[dataset].contains(to) {
                    return (0, 0);
                }
                let bytes = self.dataset_files[dataset]
                    .iter()
                    .map(|file| file.size)
                    .sum();
                (self.transfer_time_files(from, to, dataset), bytes)
            }
            Some(checkpoint) => {
                let run = self.migrations[id].run.clone();
                let bytes = if *checkpoint == Self::final_dump_id(id) {
                    self.final_dump_bytes(id, &run)
                } else {
                    match &self.jobs[job].checkpoint {
                        Some(stored)
                            if stored.id == *checkpoint && stored.held_on.contains(&to) =>
                        {
                            return (0, 0);
                        }
                        Some(stored) if stored.id == *checkpoint => stored.size,
                        _ => self.class(job).memory_image.0,
                    }
                };
                (self.transfer_time_bytes(from, to, bytes), bytes)
            }
        }
    }

    pub(super) fn port_transfer(
        &mut self,
        id: usize,
        record: &TransferRecord,
    ) -> Result<TransferStatus, StepFailure> {
        let ends = [node_index(&record.from), node_index(&record.to)];
        if let Some(down) = ends.into_iter().flatten().find(|&n| !self.nodes[n].alive) {
            if let Some(started) = &record.id {
                let effect = Effect::Transfer(started.clone());
                self.migrations[id].in_flight.retain(|f| f.effect != effect);
            }
            return Err(StepFailure {
                reason: unreachable(down),
                retryable: true,
            });
        }
        let now = self.now;
        let Some(started) = &record.id else {
            let (duration, bytes) = self.transfer_cost(id, record);
            self.metrics.bytes_recovery += bytes;
            let migration = &mut self.migrations[id];
            migration.transfers_started += 1;
            let started = format!("t{id}-{}", migration.transfers_started);
            if duration == 0 {
                return Ok(TransferStatus::Succeeded {
                    id: started,
                    bytes_done: bytes,
                    bytes_total: bytes,
                });
            }
            migration.in_flight.push(InFlight {
                effect: Effect::Transfer(started.clone()),
                done_at: now + duration,
                bytes,
            });
            return Ok(TransferStatus::Running {
                id: started,
                bytes_done: 0,
                bytes_total: bytes,
            });
        };
        let effect = Effect::Transfer(started.clone());
        let migration = &mut self.migrations[id];
        let Some(index) = migration.in_flight.iter().position(|f| f.effect == effect) else {
            return Ok(TransferStatus::Unknown);
        };
        let flight = &migration.in_flight[index];
        let bytes = flight.bytes;
        if now < flight.done_at {
            return Ok(TransferStatus::Running {
                id: started.clone(),
                bytes_done: 0,
                bytes_total: bytes,
            });
        }
        migration.in_flight.remove(index);
        Ok(TransferStatus::Succeeded {
            id: started.clone(),
            bytes_done: bytes,
            bytes_total: bytes,
        })
    }

    pub(super) fn port_act(&mut self, id: usize, run: &Run, action: &Action) -> Outcome {
        let (source, target) = (self.migrations[id].source, self.migrations[id].target);
        let (effect, node) = match action {
            Action::FinalCheckpoint => (Effect::FinalDump, source),
            Action::StopSource => (Effect::StopSource, source),
            Action::MarkOutOfService { .. } => {
                // The API server takes the taint at once; the node's pods cannot run again.
                self.nodes[source].out_of_service = true;
                return Outcome::done();
            }
            Action::StartReplacement { node, role, .. } => {
                let Some(node) = node_index(node) else {
                    return Outcome::Failed {
                        reason: format!("no node {node}"),
                        retryable: false,
                    };
                };
                (Effect::Start { node, role: *role }, node)
            }
            Action::CheckReplacement { .. } => (Effect::CheckReplacement, target),
            Action::StopReplacement => (Effect::StopReplacement, target),
        };
        if !self.nodes[node].alive {
            self.migrations[id].in_flight.retain(|f| f.effect != effect);
            if effect == Effect::StopReplacement && self.target_counts_fenced(id, run) {
                // Its pod is deleted forcibly: nothing can run on a fenced node.
                return self.complete_effect(id, action);
            }
            return Outcome::Failed {
                reason: unreachable(node),
                retryable: true,
            };
        }
        if let Effect::Start { node, .. } = effect
            && self.nodes[node].jobs.contains(&self.migrations[id].job)
            && matches!(self.jobs[self.migrations[id].job].state, JobState::Running { node: at, .. } if at == node)
        {
            // Already started there (the driver asks again on a later turn, as the operator's
            // port finds the pod it created): nothing to start.
            return Outcome::done();
        }
        let migration = &mut self.migrations[id];
        if let Some(index) = migration.in_flight.iter().position(|f| f.effect == effect) {
            if self.now < migration.in_flight[index].done_at {
                return Outcome::waiting(format!("{effect:?} in progress"));
            }
            migration.in_flight.remove(index);
            return self.complete_effect(id, action);
        }
        let duration = self.begin_effect(id, run, action);
        if duration == 0 {
            return self.complete_effect(id, action);
        }
        let done_at = self.now + duration;
        self.migrations[id].in_flight.push(InFlight {
            effect: effect.clone(),
            done_at,
            bytes: 0,
        });
        Outcome::waiting(format!("{effect:?} in progress"))
    }

    fn target_counts_fenced(&self, id: usize, run: &Run) -> bool {
        let target = self.migrations[id].target;
        target_fenced(
            &node_name(target),
            &self.observe_node(target),
            run.lease_timeout,
            &DeadNodeFencing::default(),
            timestamp(self.now),
        )
    }

    /// Starts an effect: what happens at once, and how long the rest takes.
    fn begin_effect(&mut self, id: usize, run: &Run, action: &Action) -> Ms {
        let job = self.migrations[id].job;
        let class = self.class(job);
        let (image, container) = (class.memory_image.0, class.container_image.0);
        match action {
            Action::FinalCheckpoint => {
                // The final stop-and-dump: the job stops making progress here and stays
                // stopped while the archive is sealed, until it can be sent.
                self.stop(job);
                self.migrations[id].dump_progress = Some(self.jobs[job].progress);
                let bytes = self.final_dump_bytes(id, run);
                ms(self.scenario.criu.final_dump_time(bytes))
            }
            Action::StopSource => {
                if matches!(self.jobs[job].state, JobState::Running { .. }) {
                    self.stop(job);
                }
                ms(self.scenario.settings.stop_source)
            }
            Action::StartReplacement { from: Some(_), .. } => {
                ms(self.scenario.criu.restore_time(image))
            }
            Action::StartReplacement { from: None, .. } => {
                ms(self.scenario.criu.fresh_start_time(container))
            }
            Action::CheckReplacement { .. } => ms(self.scenario.settings.verify),
            Action::StopReplacement => ms(self.scenario.settings.stop_source),
            Action::MarkOutOfService { .. } => 0,
        }
    }

    /// Completes an effect: what it did to the job and the nodes.
    fn complete_effect(&mut self, id: usize, action: &Action) -> Outcome {
        let (job, source, target) = (
            self.migrations[id].job,
            self.migrations[id].source,
            self.migrations[id].target,
        );
        let requests = self.requests(job);
        match action {
            Action::FinalCheckpoint => Outcome::Done {
                checkpoint_id: Some(Self::final_dump_id(id)),
            },
            Action::StopSource => {
                self.release_source(id);
                Outcome::done()
            }
            Action::StartReplacement { node, from, .. } => {
                let Some(node) = node_index(node) else {
                    return Outcome::done();
                };
                let progress = self.progress_of(id, from.as_deref());
                if matches!(self.jobs[job].state, JobState::Running { .. }) {
                    // Never two copies: the driver fenced the source first, so this is a
                    // driver bug; the audit counts it.
                    self.audit.running_twice += 1;
                    self.stop(job);
                }
                let home = if self.migrations[id].job_on_target {
                    target
                } else {
                    source
                };
                if home != node {
                    self.unbind(job, home);
                    self.bind(job, node);
                }
                if node == target {
                    self.release_source(id);
                    self.migrations[id].job_on_target = true;
                    self.migrations[id].started_fresh_on_target = from.is_none();
                } else {
                    if self.migrations[id].source_released {
                        self.reserve(source, requests);
                        self.migrations[id].source_released = false;
                    }
                    self.migrations[id].job_on_target = false;
                    self.release_target(id);
                }
                self.resume(job, node, progress);
                Outcome::done()
            }
            Action::CheckReplacement { .. } => Outcome::done(),
            Action::StopReplacement => {
                if self.migrations[id].job_on_target {
                    self.stop(job);
                    // The replacement's pod is gone: the job is the source's pod again.
                    self.unbind(job, target);
                    self.bind(job, source);
                    self.jobs[job].state = JobState::Down { node: source };
                    self.migrations[id].job_on_target = false;
                }
                Outcome::done()
            }
            Action::MarkOutOfService { .. } => Outcome::done(),
        }
    }

    /// The source's share of its node is free once the source is stopped or dead.
    pub(super) fn release_source(&mut self, id: usize) {
        if !self.migrations[id].source_released {
            let requests = self.requests(self.migrations[id].job);
            self.release(self.migrations[id].source, requests);
            self.migrations[id].source_released = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use automigrate_core::driver::{Action, Outcome, Role, Run};
    use automigrate_core::migration::{Limits, MigrationState};

    use crate::scenario::ClusterScenario;
    use crate::sim::RunOptions;
    use crate::sim::clock::timestamp;
    use crate::sim::simulation::Simulation;
    use crate::sim::state::{JobState, SimMigration, node_name};

    /// The driver asks for a fresh start again on a later turn of a rollback (it waits for the
    /// new copy there); the port must find the copy it started, not start a second one.
    #[test]
    fn a_replacement_asked_for_again_is_not_started_twice() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/test-small.yaml");
        let scenario = ClusterScenario::load(&path).unwrap();
        let policies = scenario.load_policies().unwrap();
        let policy = policies.iter().find(|p| p.name == "reactive").unwrap();
        let mut sim = Simulation::new(&scenario, policy, RunOptions::default(), &[]).unwrap();
        let (job, source, target) = (0, 1, 2);
        sim.bind(job, source);
        sim.jobs[job].state = JobState::Down { node: source };
        let state = MigrationState::new(
            node_name(source),
            node_name(target),
            false,
            timestamp(sim.now),
            None,
        );
        let limits = Limits::from_policy(&policy.engine);
        let run = Run::new(state, limits, policy.engine.triggers.lease_timeout);
        sim.migrations.push(SimMigration {
            job,
            source,
            target,
            run: run.clone(),
            transfers: Vec::new(),
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
        let start = Action::StartReplacement {
            node: node_name(target),
            from: None,
            role: Role::Rollback,
        };
        assert!(matches!(
            sim.port_act(0, &run, &start),
            Outcome::Waiting { .. }
        ));
        sim.now = sim.migrations[0].in_flight[0].done_at;
        assert_eq!(sim.port_act(0, &run, &start), Outcome::done());
        let epoch = sim.jobs[job].epoch;
        assert!(matches!(sim.jobs[job].state, JobState::Running { node, .. } if node == target));

        assert_eq!(
            sim.port_act(0, &run, &start),
            Outcome::done(),
            "the copy already runs on the target"
        );
        assert!(
            sim.migrations[0].in_flight.is_empty(),
            "nothing started again"
        );
        assert_eq!(sim.jobs[job].epoch, epoch, "the job was not restarted");
        assert_eq!(sim.audit.running_twice, 0);
    }
}
