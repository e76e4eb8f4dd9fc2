//! Jobs on nodes: resources, binding, kube-scheduler's placement of new jobs, running, stopping
//! and finishing.

use automigrate_core::model::Resources;

use super::clock::{Ms, ms};
use super::simulation::Simulation;
use super::state::{Event, JobState, node_name, true_link};

impl Simulation<'_> {
    pub(super) fn class(&self, job: usize) -> &crate::scenario::JobClass {
        &self.scenario.workload.classes[self.jobs[job].class]
    }

    pub(super) fn requests(&self, job: usize) -> Resources {
        self.class(job).requests
    }

    pub(super) fn reserve(&mut self, node: usize, requests: Resources) {
        let world = &mut self.world.nodes[node];
        world.requested = world.requested.saturating_add(requests);
    }

    pub(super) fn release(&mut self, node: usize, requests: Resources) {
        let world = &mut self.world.nodes[node];
        world.requested = world.requested.saturating_sub(requests);
    }

    pub(super) fn bind(&mut self, job: usize, node: usize) {
        self.nodes[node].jobs.insert(job);
        self.jobs[job].placements.push(node_name(node));
        let dataset = self.dataset_index(job);
        *self.dataset_holders[dataset].users.entry(node).or_default() += 1;
        self.datasets_dirty = true;
    }

    /// The job leaves the node, and with its pod the pod's copy of the dataset (the seed
    /// datasets' origin replicas stay).
    pub(super) fn unbind(&mut self, job: usize, node: usize) {
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
    pub(super) fn pick_node_for_new_job(&mut self, requests: Resources) -> Option<usize> {
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

    pub(super) fn place_queued(&mut self) {
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

    pub(super) fn dataset_index(&self, job: usize) -> usize {
        let id = &self.class(job).dataset;
        self.scenario
            .workload
            .datasets
            .iter()
            .position(|dataset| &dataset.id == id)
            .unwrap_or(0)
    }

    pub(super) fn nearest_holder(&self, dataset: usize, to: usize) -> Option<usize> {
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
    pub(super) fn resume(&mut self, job: usize, node: usize, progress: Ms) {
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
    pub(super) fn stop(&mut self, job: usize) {
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

    pub(super) fn maybe_finish(&mut self, job: usize) {
        let JobState::Running { node, since } = self.jobs[job].state else {
            return;
        };
        let state = &self.jobs[job];
        if since > self.now || state.progress + (self.now - since) < state.work {
            return;
        }
        if let Some(migration) = self.jobs[job].migration {
            self.abandon_migration(migration);
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
}
