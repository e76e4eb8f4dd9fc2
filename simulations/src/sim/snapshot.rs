//! What the engine sees: nodes, pods, migration records and user observations, kept in a
//! persistent snapshot updated in place.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use automigrate_core::annotations;
use automigrate_core::model::{
    ConditionStatus, MigrationRecord, PodRef, ProtectedPod, UserObservation,
};

use crate::scenario::Recovery;

use super::clock::{ms, timestamp};
use super::simulation::Simulation;
use super::state::{JobState, NAMESPACE, cell_hops, job_name, node_name, user_name};

impl Simulation<'_> {
    pub(super) fn refresh_node(&mut self, node: usize) {
        let now = self.now;
        let grace = ms(self.policy.kubernetes.node_monitor_grace);
        let beat = match self.nodes[node].failed_at {
            Some(failed) => self.last_heartbeat(node, failed),
            None => self.last_heartbeat(node, now),
        };
        let alive = self.nodes[node].alive;
        let world = &mut self.world.nodes[node];
        world.last_heartbeat = Some(timestamp(beat));
        if let Some(ready) = world.conditions.iter_mut().find(|c| c.kind == "Ready") {
            // The node lifecycle controller marks a silent node Unknown after its grace period.
            if !alive && now >= beat + grace {
                ready.status = ConditionStatus::Unknown;
                ready.since = Some(timestamp(beat + grace));
            } else {
                ready.status = ConditionStatus::True;
                ready.since = None;
            }
        }
    }

    pub(super) fn refresh_datasets(&mut self) {
        if !self.datasets_dirty {
            return;
        }
        for (index, dataset) in self.world.datasets.iter_mut().enumerate() {
            dataset.present_on = self.dataset_holders[index].nodes().map(node_name).collect();
        }
        self.datasets_dirty = false;
    }

    pub(super) fn pod(&self, job: usize) -> Option<ProtectedPod> {
        let state = &self.jobs[job];
        let node = match state.state {
            JobState::Running { node, .. } | JobState::Down { node } => node,
            _ => return None,
        };
        let class = self.class(job);
        let mut annotations = BTreeMap::new();
        annotations.insert(annotations::PROTECT.to_string(), "true".to_string());
        annotations.insert(annotations::POLICY.to_string(), self.policy.name.clone());
        annotations.insert(annotations::DATASET.to_string(), class.dataset.clone());
        if state.user.is_some() {
            annotations.insert(annotations::USER.to_string(), user_name(job));
        }
        let source = self.jobs[job]
            .migration
            .map(|migration| self.migrations[migration].source)
            .unwrap_or(node);
        Some(ProtectedPod {
            namespace: NAMESPACE.to_string(),
            name: state.name.clone(),
            node: self.world.nodes[source].name.clone(),
            owner: None,
            requests: class.requests,
            labels: BTreeMap::new(),
            annotations,
            last_checkpoint: self.recorded_checkpoint(job),
            checkpoint_in_progress: state.pending.is_some(),
        })
    }

    pub(super) fn migration_record(&self, job: usize) -> Option<MigrationRecord> {
        let state = &self.jobs[job];
        if let Some(migration) = state.migration {
            let migration = &self.migrations[migration];
            return Some(MigrationRecord {
                pod: PodRef::new(NAMESPACE, job_name(job)),
                phase: migration.run.state.phase,
                source: node_name(migration.source),
                target: Some(node_name(migration.target)),
                started_at: migration.run.state.started_at,
                finished_at: None,
            });
        }
        state.last_migration.map(|(end, phase)| MigrationRecord {
            pod: PodRef::new(NAMESPACE, job_name(job)),
            phase,
            source: String::new(),
            target: None,
            started_at: timestamp(end),
            finished_at: Some(timestamp(end)),
        })
    }

    pub(super) fn user_observations(&self, job: usize, into: &mut Vec<UserObservation>) {
        let Some(user) = self.jobs[job].user else {
            return;
        };
        let mut nodes: BTreeSet<usize> = self.cell_nodes[self.users[user].cell]
            .iter()
            .copied()
            .collect();
        if let Some(node) = self.bound_node(job) {
            nodes.insert(node);
        }
        for node in nodes {
            into.push(UserObservation {
                user: user_name(job),
                node: node_name(node),
                latency: self.user_latency(user, node),
            });
        }
    }

    pub(super) fn user_latency(&self, user: usize, node: usize) -> Duration {
        let Some(spec) = &self.scenario.users else {
            return Duration::ZERO;
        };
        let hops = cell_hops(
            self.users[user].cell,
            self.nodes[node].cell,
            self.scenario.cluster.cells,
        );
        spec.access_latency + spec.latency_per_hop * hops as u32
    }

    pub(super) fn bound_node(&self, job: usize) -> Option<usize> {
        match self.jobs[job].state {
            JobState::Running { node, .. }
            | JobState::Down { node }
            | JobState::Starting { node }
            | JobState::Restarting { node } => Some(node),
            _ => None,
        }
    }

    pub(super) fn mobility_enabled(&self) -> bool {
        self.policy.recovery == Recovery::Engine && self.policy.engine.triggers.mobility.is_some()
    }
}
