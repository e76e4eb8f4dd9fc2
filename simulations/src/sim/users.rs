//! Edge users who move, and the SpeCon-like progress monitor.

use automigrate_core::model::{MigrationRequest, PodRef};

use super::clock::{HOUR, Ms, SECOND, ms};
use super::simulation::Simulation;
use super::state::{Event, JobState, NAMESPACE, job_name};

impl Simulation<'_> {
    pub(super) fn user_pause(&mut self, user: usize) -> Ms {
        let mean = self
            .scenario
            .users
            .as_ref()
            .map_or(HOUR as f64, |spec| spec.move_mean.as_secs_f64() * 1000.0);
        self.users[user].stream.exponential(mean) as Ms
    }

    pub(super) fn user_moved(&mut self, user: usize) {
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

    pub(super) fn mobility_pass(&mut self, job: usize) {
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

    pub(super) fn schedule_specon_check(&mut self, job: usize, epoch: u64, at: Ms) {
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
    pub(super) fn specon_tick(&mut self, batch: Ms) {
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
}
