//! Kubernetes-style restarts: a pod evicted from a failed node starts again elsewhere.

use automigrate_core::decide::{CheckpointSource, MigrationDecision};

use crate::scenario::Recovery;

use super::simulation::Simulation;
use super::state::{Event, JobState, node_index};

impl Simulation<'_> {
    pub(super) fn start_restart(&mut self, job: usize, decision: &MigrationDecision) {
        let JobState::Down { node: source } = self.jobs[job].state else {
            return;
        };
        let Some(target) = node_index(&decision.to) else {
            return;
        };
        if !self.nodes[target].alive {
            return;
        }
        let requests = self.requests(job);
        self.release(source, requests);
        self.unbind(job, source);
        self.reserve(target, requests);
        self.bind(job, target);
        let uses_checkpoint = self.policy.recovery != Recovery::KubernetesDefault
            && matches!(decision.checkpoint, CheckpointSource::Stored { .. });
        let mut delay = 0;
        for transfer in &decision.transfers {
            let is_checkpoint = transfer.payload == automigrate_core::decide::Payload::Checkpoint;
            if is_checkpoint && !uses_checkpoint {
                continue;
            }
            delay += self.planned_transfer_time(transfer);
            self.metrics.bytes_recovery += transfer.bytes.0;
        }
        delay += self.start_delay(job, uses_checkpoint);
        let resume = if uses_checkpoint {
            self.jobs[job].checkpoint.as_ref().map_or(0, |c| c.progress)
        } else {
            0
        };
        let state = &mut self.jobs[job];
        state.state = JobState::Restarting { node: target };
        state.restart_from = resume;
        state.restarts += 1;
        state.epoch += 1;
        let epoch = state.epoch;
        self.schedule(self.now + delay, Event::RestartReady { job, epoch });
    }
}
