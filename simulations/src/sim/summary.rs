//! The audit of invariants after each event, and the run's results at the end.

use std::collections::BTreeSet;

use super::clock::{Ms, hours};
use super::results::{JobOutcome, RunResult};
use super::simulation::Simulation;
use super::state::{JobState, node_share};

impl Simulation<'_> {
    pub(super) fn check_invariants(&mut self) {
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

    pub(super) fn finish(mut self) -> RunResult {
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
