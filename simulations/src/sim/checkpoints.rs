//! Periodic checkpoints: timers in batches, the freeze, the copy to the standby, the commit.

use std::time::Duration;

use automigrate_core::decide::CheckpointDecision;
use automigrate_core::driver::periodic;

use super::clock::{Ms, ms, sim_time, timestamp};
use super::simulation::Simulation;
use super::state::{Event, JobState, PendingCheckpoint, SimCheckpointCopy, node_index};

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

    pub(super) fn start_checkpoint(&mut self, job: usize, decision: &CheckpointDecision) {
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
        // The job runs again after the freeze; the archive can be copied once it is sealed.
        let sealed = ms(self.scenario.criu.seal_time(delta));
        self.schedule(now + freeze + sealed, Event::CheckpointDone { job, seq });
    }

    pub(super) fn checkpoint_done(&mut self, job: usize, seq: u64) {
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

    pub(super) fn replica_done(&mut self, job: usize, seq: u64) {
        let JobState::Running { node, .. } = self.jobs[job].state else {
            return;
        };
        let Some(pending) = self.jobs[job].pending.clone().filter(|p| p.seq == seq) else {
            return;
        };
        let standby = pending.standby.filter(|&standby| self.nodes[standby].alive);
        self.commit_checkpoint(job, node, standby);
    }

    pub(super) fn commit_checkpoint(&mut self, job: usize, node: usize, standby: Option<usize>) {
        let Some(pending) = self.jobs[job].pending.take() else {
            return;
        };
        let mut held_on = vec![node];
        held_on.extend(standby);
        self.jobs[job].checkpoint = Some(SimCheckpointCopy {
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
}
