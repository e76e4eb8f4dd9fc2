//! Node failures, repairs and degradation signals, and how each is noticed (the engine's lease
//! check or Kubernetes' eviction).

use automigrate_core::model::{ConditionStatus, NodeCondition};

use crate::scenario::{FailureModel, Recovery, TraceRow};

use super::clock::{HOUR, Ms, SECOND, ms, timestamp};
use super::simulation::Simulation;
use super::state::{Event, JobState};

/// How long to wait before asking the engine again about a failed node it did not act on
/// (still `Suspect`, or no room anywhere).
const RETRY: Ms = 15 * SECOND;

impl Simulation<'_> {
    pub(super) fn schedule_failures(&mut self, trace: &[TraceRow]) {
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

    pub(super) fn schedule_next_failure(&mut self, node: usize, from: Ms) {
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

    pub(super) fn schedule_false_alarm(&mut self, node: usize) {
        let rate = self.scenario.failures.precursor.false_alarms_per_node_year;
        let mean = 365.0 * 24.0 * HOUR as f64 / rate;
        let wait = self.nodes[node].alarms.exponential(mean) as Ms;
        let at = self.now + wait.max(1);
        self.schedule(at, Event::FalseAlarm(node));
    }

    pub(super) fn node_failed(&mut self, node: usize) {
        if !self.nodes[node].alive {
            return;
        }
        self.metrics.node_failures += 1;
        self.nodes[node].alive = false;
        self.troubled_nodes.insert(node);
        self.nodes[node].failed_at = Some(self.now);
        let heartbeat = self.last_heartbeat(node, self.now);
        let mut hit = false;

        // The node's jobs stop with it, those in a migration too: the driver finds out by
        // looking (an agent that does not answer, a Ready condition and a Lease running out).
        let jobs: Vec<usize> = self.nodes[node].jobs.iter().copied().collect();
        for job in jobs {
            hit = true;
            self.stop(job);
            if self.jobs[job].migration.is_some() {
                continue;
            }
            let eviction = &self.policy.kubernetes;
            self.jobs[job].evictable_at =
                Some(heartbeat + ms(eviction.node_monitor_grace) + ms(eviction.toleration));
        }
        for migration in 0..self.migrations.len() {
            let touched = self.migrations[migration].target == node
                || self.migrations[migration].source == node;
            if touched && !self.migrations[migration].ended {
                self.advance_migration(migration);
            }
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

    pub(super) fn node_repaired(&mut self, node: usize) {
        if self.nodes[node].alive {
            return;
        }
        self.nodes[node].alive = true;
        self.nodes[node].failed_at = None;
        // Repaired, it joins the cluster afresh: the out-of-service taint is removed.
        self.nodes[node].out_of_service = false;
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

    pub(super) fn local_resume_point(&self, job: usize, node: usize) -> Option<Ms> {
        if self.policy.recovery == Recovery::KubernetesDefault {
            return None;
        }
        self.jobs[job]
            .checkpoint
            .as_ref()
            .filter(|checkpoint| checkpoint.held_on.contains(&node))
            .map(|checkpoint| checkpoint.progress)
    }

    pub(super) fn start_delay(&self, job: usize, from_checkpoint: bool) -> Ms {
        let class = self.class(job);
        let criu = &self.scenario.criu;
        if from_checkpoint {
            ms(criu.restore_time(class.memory_image.0))
        } else {
            ms(criu.fresh_start_time(class.container_image.0))
        }
    }

    pub(super) fn warning(&mut self, node: usize, real: bool) {
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

    pub(super) fn set_warning(&mut self, node: usize, since: Option<Ms>) {
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

    pub(super) fn failure_check(&mut self, node: usize) {
        if self.nodes[node].alive || !self.has_stranded_jobs(node) {
            return;
        }
        self.full_pass(Vec::new());
        if self.has_stranded_jobs(node) {
            self.schedule(self.now + RETRY, Event::FailureCheck(node));
        }
    }

    pub(super) fn eviction(&mut self, node: usize) {
        if self.nodes[node].alive || !self.has_stranded_jobs(node) {
            return;
        }
        self.full_pass(Vec::new());
        if self.has_stranded_jobs(node) {
            self.schedule(self.now + RETRY, Event::Eviction(node));
        }
    }

    /// Jobs on a dead node that nothing is recovering yet.
    pub(super) fn has_stranded_jobs(&self, node: usize) -> bool {
        self.nodes[node].jobs.iter().any(|&job| {
            self.jobs[job].migration.is_none()
                && matches!(self.jobs[job].state, JobState::Down { .. })
        })
    }

    pub(super) fn last_heartbeat(&self, node: usize, at: Ms) -> Ms {
        let period = ms(self.scenario.cluster.heartbeat).max(1);
        let phase = self.nodes[node].heartbeat_phase;
        let offset = (at + period - phase) % period;
        at.saturating_sub(offset)
    }
}
