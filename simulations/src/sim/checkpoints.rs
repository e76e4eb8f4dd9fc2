//! Periodic checkpoints: timers in batches, and carrying out the checkpoints the engine asks
//! for on the cost model. The rules (admission, when the pod's record changes, which standby
//! gets a copy next, what a failed copy does) are the core driver's
//! ([`automigrate_core::driver::periodic`], the operator's too); this file times its steps: the
//! take is a freeze and a seal, a copy a transfer on the true link, a record is at once.

use std::time::Duration;

use automigrate_core::decide::CheckpointDecision;
use automigrate_core::driver::periodic::{self, Periodic, PeriodicStep, PodNow};
use automigrate_core::model::CheckpointInfo;
use automigrate_core::units::Bytes;

use super::clock::{Ms, ms, sim_time, timestamp};
use super::simulation::Simulation;
use super::state::{Event, JobState, PendingCheckpoint, SimCheckpointCopy, node_index, node_name};

impl Simulation<'_> {
    /// When to look at the job again for its next checkpoint: the driver's rule
    /// ([`periodic::next_check_at`]).
    pub(super) fn next_checkpoint_check(&self, job: usize) -> Ms {
        let state = &self.jobs[job];
        sim_time(periodic::next_check_at(
            timestamp(self.now),
            state
                .checkpoint
                .as_ref()
                .map(|checkpoint| timestamp(checkpoint.taken_at)),
            state.interval.map(Duration::from_millis),
            self.policy.engine.checkpoint.min_interval,
        ))
    }

    pub(super) fn schedule_checkpoint_check(&mut self, job: usize, at: Ms) {
        let batch = ms(self.scenario.settings.checkpoint_batch).max(1);
        let at = at.max(self.now).div_ceil(batch) * batch;
        let jobs = self.checkpoint_batches.entry(at).or_default();
        let new_batch = jobs.is_empty();
        jobs.insert(job);
        if new_batch {
            self.schedule(at, Event::CheckpointTick(at));
        }
    }

    pub(super) fn checkpoint_tick(&mut self, batch: Ms) {
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

    /// The job's recorded checkpoint as the pod's record shows it (what the engine and the
    /// driver read).
    pub(super) fn recorded_checkpoint(&self, job: usize) -> Option<CheckpointInfo> {
        self.jobs[job]
            .checkpoint
            .as_ref()
            .map(|checkpoint| CheckpointInfo {
                id: checkpoint.id.clone(),
                taken_at: timestamp(checkpoint.taken_at),
                size: Bytes(checkpoint.size),
                freeze: Some(Duration::from_millis(checkpoint.freeze)),
                held_on: checkpoint
                    .held_on
                    .iter()
                    .map(|&node| self.world.nodes[node].name.clone())
                    .collect(),
                epoch: None,
            })
    }

    /// Starts the checkpoint the engine asked for, if the driver admits it
    /// ([`Periodic::start`]), with the driver's first step: the take, a freeze on the cost
    /// model.
    pub(super) fn start_checkpoint(&mut self, job: usize, decision: &CheckpointDecision) {
        let JobState::Running { node, since } = self.jobs[job].state else {
            return;
        };
        // The operator's equivalents: one job per pod at a time (its `Busy`), and a decision
        // made for the node the pod still runs on.
        if self.jobs[job].pending.is_some()
            || self.jobs[job].migration.is_some()
            || node_index(&decision.node) != Some(node)
        {
            return;
        }
        let recorded = self.recorded_checkpoint(job);
        let pod = PodNow {
            // A job restoring or in a freeze has no running process to dump yet.
            running: since <= self.now,
            recorded: recorded.as_ref(),
        };
        let Ok(periodic) = Periodic::start(&decision.node, &decision.replicate_to, Some(pod))
        else {
            return;
        };
        let PeriodicStep::Take { node: take_on } = periodic.next() else {
            return;
        };
        if node_index(&take_on) != Some(node) {
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
        state.interval = Some(ms(decision.interval));
        let seq = state.checkpoint_seq;
        state.pending = Some(PendingCheckpoint {
            seq,
            periodic,
            node,
            progress: state.progress,
            taken_at: now,
            freeze,
            size,
            delta,
            replicating: None,
        });
        let finish_at = now + freeze + state.work.saturating_sub(state.progress);
        self.metrics.checkpoints += 1;
        self.schedule(finish_at, Event::JobFinish(job));
        // The job runs again after the freeze; the take is done (the archive sealed, ready
        // to copy) after the seal.
        let sealed = ms(self.scenario.criu.seal_time(delta));
        self.schedule(now + freeze + sealed, Event::CheckpointDone { job, seq });
    }

    /// The pending checkpoint `seq` of a job still running on the node it was taken on.
    fn pending_checkpoint(&mut self, job: usize, seq: u64) -> Option<&mut PendingCheckpoint> {
        let JobState::Running { node, .. } = self.jobs[job].state else {
            return None;
        };
        self.jobs[job]
            .pending
            .as_mut()
            .filter(|pending| pending.seq == seq && pending.node == node)
    }

    /// The take is done: the driver learns of the new checkpoint, held on the job's node.
    pub(super) fn checkpoint_done(&mut self, job: usize, seq: u64) {
        let Some(pending) = self.pending_checkpoint(job, seq) else {
            return;
        };
        let info = CheckpointInfo {
            id: format!("ck-{job}-{seq}"),
            taken_at: timestamp(pending.taken_at),
            size: Bytes(pending.size),
            freeze: Some(Duration::from_millis(pending.freeze)),
            held_on: Vec::new(),
            epoch: None,
        };
        pending.periodic.taken(info);
        self.drive_checkpoint(job);
    }

    /// A copy to a standby ended: it landed if the standby is still alive.
    pub(super) fn replica_done(&mut self, job: usize, seq: u64) {
        let Some(pending) = self.pending_checkpoint(job, seq) else {
            return;
        };
        let Some(standby) = pending.replicating.take() else {
            return;
        };
        let result = if self.nodes[standby].alive {
            Ok(())
        } else {
            self.stats.periodic_replica_failures += 1;
            Err(format!(
                "standby {} failed during the copy",
                node_name(standby)
            ))
        };
        if let Some(pending) = self.jobs[job].pending.as_mut() {
            pending.periodic.replicated(result);
        }
        self.drive_checkpoint(job);
    }

    /// Carries out the driver's steps for the job's checkpoint, up to one that takes time on
    /// the cost model (a copy) or the end.
    fn drive_checkpoint(&mut self, job: usize) {
        loop {
            let Some(pending) = &self.jobs[job].pending else {
                return;
            };
            match pending.periodic.next() {
                // Only `start_checkpoint` takes; its freeze and seal are under way.
                PeriodicStep::Take { .. } => return,
                PeriodicStep::Record(info) => {
                    self.record_checkpoint(job, &info);
                    if let Some(pending) = self.jobs[job].pending.as_mut() {
                        pending.periodic.recorded();
                    }
                }
                PeriodicStep::Replicate { from, to, .. } => {
                    let (seq, delta) = (pending.seq, pending.delta);
                    match (node_index(&from), node_index(&to)) {
                        (Some(from), Some(standby))
                            if self.nodes[from].alive && self.nodes[standby].alive =>
                        {
                            let time = self.transfer_time_bytes(from, standby, delta);
                            self.metrics.bytes_checkpoint_copies += delta;
                            if let Some(pending) = self.jobs[job].pending.as_mut() {
                                pending.replicating = Some(standby);
                            }
                            self.schedule(self.now + time, Event::ReplicaDone { job, seq });
                            return;
                        }
                        _ => {
                            self.stats.periodic_replica_failures += 1;
                            if let Some(pending) = self.jobs[job].pending.as_mut() {
                                pending
                                    .periodic
                                    .replicated(Err(format!("standby {to} is down")));
                            }
                        }
                    }
                }
                PeriodicStep::Done(done) => {
                    if !done.recorded {
                        self.stats.periodic_kept_older += 1;
                    }
                    self.jobs[job].pending = None;
                    let next = self.next_checkpoint_check(job);
                    self.schedule_checkpoint_check(job, next);
                    return;
                }
            }
        }
    }

    /// The pod's record names `info` now (the driver's `Record` step), with its holders.
    fn record_checkpoint(&mut self, job: usize, info: &CheckpointInfo) {
        let Some(pending) = &self.jobs[job].pending else {
            return;
        };
        if info.held_on.len() == 1 {
            self.stats.periodic_recorded_at_once += 1;
        }
        self.jobs[job].checkpoint = Some(SimCheckpointCopy {
            id: info.id.clone(),
            progress: pending.progress,
            taken_at: pending.taken_at,
            size: pending.size,
            freeze: pending.freeze,
            held_on: info
                .held_on
                .iter()
                .filter_map(|name| node_index(name))
                .collect(),
        });
    }
}

#[cfg(test)]
mod tests {
    //! The driver's periodic rules as the simulator carries them out: each test fails if the
    //! simulator recorded or copied checkpoints by a rule of its own.

    use std::path::Path;
    use std::time::Duration;

    use automigrate_core::annotations::CheckpointMode;
    use automigrate_core::decide::CheckpointDecision;
    use automigrate_core::model::PodRef;

    use crate::scenario::{ClusterScenario, SimPolicy};
    use crate::sim::RunOptions;
    use crate::sim::simulation::Simulation;
    use crate::sim::state::{Event, JobState, NAMESPACE, SimCheckpointCopy, job_name, node_name};

    const JOB: usize = 0;
    const NODE: usize = 1;

    fn scenario() -> ClusterScenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/test-small.yaml");
        ClusterScenario::load(&path).unwrap()
    }

    fn reactive(scenario: &ClusterScenario) -> SimPolicy {
        let policies = scenario.load_policies().unwrap();
        policies.into_iter().find(|p| p.name == "reactive").unwrap()
    }

    /// Job 0 running on node 1 of the small scenario.
    fn running<'a>(scenario: &'a ClusterScenario, policy: &'a SimPolicy) -> Simulation<'a> {
        let mut sim = Simulation::new(scenario, policy, RunOptions::default(), &[]).unwrap();
        sim.bind(JOB, NODE);
        sim.jobs[JOB].state = JobState::Running {
            node: NODE,
            since: sim.now,
        };
        sim
    }

    fn decision(standbys: &[usize]) -> CheckpointDecision {
        CheckpointDecision {
            pod: PodRef::new(NAMESPACE, job_name(JOB)),
            node: node_name(NODE),
            reason: "due".into(),
            policy: "reactive".into(),
            mode: CheckpointMode::Transparent,
            interval: Duration::from_secs(600),
            incremental_on: None,
            replicate_to: standbys.iter().map(|&node| node_name(node)).collect(),
        }
    }

    /// Handles the next checkpoint event of the queue (the take or a copy ending), at its time;
    /// false when none is left.
    fn next_checkpoint_event(sim: &mut Simulation<'_>) -> bool {
        let Some(key) = sim
            .queue
            .iter()
            .find(|(_, event)| {
                matches!(
                    event,
                    Event::CheckpointDone { .. } | Event::ReplicaDone { .. }
                )
            })
            .map(|(key, _)| *key)
        else {
            return false;
        };
        let event = sim.queue.remove(&key).unwrap();
        sim.now = key.0;
        sim.handle(event);
        true
    }

    fn recorded(sim: &Simulation<'_>) -> Option<(String, Vec<usize>)> {
        sim.jobs[JOB]
            .checkpoint
            .as_ref()
            .map(|checkpoint| (checkpoint.id.clone(), checkpoint.held_on.clone()))
    }

    /// With nothing on record, the new checkpoint is recorded as soon as it is taken, before
    /// its copy lands (the driver's `records_at_once`), then again with the standby.
    #[test]
    fn a_first_checkpoint_is_recorded_once_taken_then_with_its_standby() {
        let scenario = scenario();
        let policy = reactive(&scenario);
        let mut sim = running(&scenario, &policy);
        sim.start_checkpoint(JOB, &decision(&[2]));
        assert!(sim.jobs[JOB].pending.is_some());
        assert_eq!(recorded(&sim), None, "nothing recorded during the freeze");

        assert!(next_checkpoint_event(&mut sim), "the take ends");
        assert_eq!(
            recorded(&sim),
            Some(("ck-0-1".to_string(), vec![NODE])),
            "recorded at once, held on the node only"
        );
        assert!(sim.jobs[JOB].pending.is_some(), "the copy is under way");

        assert!(next_checkpoint_event(&mut sim), "the copy lands");
        assert_eq!(recorded(&sim), Some(("ck-0-1".to_string(), vec![NODE, 2])));
        assert!(sim.jobs[JOB].pending.is_none(), "done");
        assert_eq!(sim.stats.periodic_recorded_at_once, 1);
    }

    /// A recorded checkpoint a standby holds is not replaced by one held on the node only: if
    /// the standby fails during the copy, the record keeps the older one, which survives a
    /// loss of the node.
    #[test]
    fn a_failed_copy_keeps_the_older_checkpoint_a_standby_holds() {
        let scenario = scenario();
        let policy = reactive(&scenario);
        let mut sim = running(&scenario, &policy);
        sim.jobs[JOB].checkpoint = Some(SimCheckpointCopy {
            id: "older".into(),
            progress: 0,
            taken_at: sim.now,
            size: 1,
            freeze: 1,
            held_on: vec![NODE, 3],
        });
        sim.start_checkpoint(JOB, &decision(&[2]));
        assert!(next_checkpoint_event(&mut sim), "the take ends");
        assert_eq!(
            recorded(&sim),
            Some(("older".to_string(), vec![NODE, 3])),
            "not recorded before a copy lands"
        );
        sim.nodes[2].alive = false;
        assert!(next_checkpoint_event(&mut sim), "the copy ends");
        assert_eq!(
            recorded(&sim),
            Some(("older".to_string(), vec![NODE, 3])),
            "the standby failed: the record keeps the older checkpoint"
        );
        assert!(sim.jobs[JOB].pending.is_none(), "done");
        assert_eq!(sim.stats.periodic_replica_failures, 1);
        assert_eq!(sim.stats.periodic_kept_older, 1);
        assert!(!next_checkpoint_event(&mut sim), "nothing more to do");
    }

    /// Every standby the engine asked for is tried in turn: a dead first one does not leave the
    /// checkpoint without a copy.
    #[test]
    fn a_dead_standby_is_skipped_for_the_next_one() {
        let scenario = scenario();
        let policy = reactive(&scenario);
        let mut sim = running(&scenario, &policy);
        sim.nodes[2].alive = false;
        sim.start_checkpoint(JOB, &decision(&[2, 3]));
        assert!(next_checkpoint_event(&mut sim), "the take ends");
        assert_eq!(recorded(&sim), Some(("ck-0-1".to_string(), vec![NODE])));
        assert!(
            next_checkpoint_event(&mut sim),
            "the copy to the second standby lands"
        );
        assert_eq!(recorded(&sim), Some(("ck-0-1".to_string(), vec![NODE, 3])));
        assert_eq!(sim.stats.periodic_replica_failures, 1);
        assert!(sim.jobs[JOB].pending.is_none(), "done");
    }

    /// A job whose process does not run yet (restoring, or in a freeze) is not checkpointed:
    /// the driver's admission.
    #[test]
    fn a_job_not_running_yet_is_not_checkpointed() {
        let scenario = scenario();
        let policy = reactive(&scenario);
        let mut sim = running(&scenario, &policy);
        sim.jobs[JOB].state = JobState::Running {
            node: NODE,
            since: sim.now + 1_000,
        };
        sim.start_checkpoint(JOB, &decision(&[2]));
        assert!(sim.jobs[JOB].pending.is_none());
        assert_eq!(sim.metrics.checkpoints, 0);
    }
}
