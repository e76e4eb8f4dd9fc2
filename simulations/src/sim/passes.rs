//! Decision passes (full and compact) and carrying out their decisions.

use std::collections::{BTreeMap, BTreeSet};

use automigrate_core::decide::{CheckpointDecision, Decisions, Trigger};
use automigrate_core::model::{ClusterSnapshot, Dataset, MigrationRequest};
use automigrate_core::{EngineMemory, decide};

use crate::scenario::Recovery;

use super::clock::{SECOND, ms, timestamp};
use super::results::RecordedPass;
use super::simulation::Simulation;
use super::state::{Event, job_index, node_index, node_name};

impl Simulation<'_> {
    /// A pass over the whole cluster.
    pub(super) fn full_pass(&mut self, requests: Vec<MigrationRequest>) {
        let memory = self.memory.clone();
        let decisions = self.full_decisions(requests, &memory, true);
        self.stats.full_passes += 1;
        self.apply(decisions);
    }

    /// The engine's decisions on the whole cluster. `for_real` passes go through
    /// [`Self::run_decide`] (counted, recorded, memory kept); a check only asks.
    pub(super) fn full_decisions(
        &mut self,
        requests: Vec<MigrationRequest>,
        memory: &EngineMemory,
        for_real: bool,
    ) -> Decisions {
        for node in 0..self.nodes.len() {
            self.refresh_node(node);
        }
        self.refresh_datasets();
        let mut pods = Vec::new();
        let mut users = Vec::new();
        let mut records = Vec::new();
        let mobility = self.mobility_enabled();
        for job in 0..self.jobs.len() {
            if let Some(pod) = self.pod(job) {
                pods.push(pod);
                if mobility {
                    self.user_observations(job, &mut users);
                }
                if let Some(record) = self.migration_record(job) {
                    records.push(record);
                }
            }
        }
        let mut world = std::mem::take(&mut self.world);
        world.pods = pods;
        world.users = users;
        world.migrations = records;
        world.requests = requests;
        let decisions = if for_real {
            self.run_decide(&world, false)
        } else {
            decide(&world, &self.policies, memory, timestamp(self.now)).0
        };
        world.pods = Vec::new();
        world.users = Vec::new();
        world.migrations = Vec::new();
        world.requests = Vec::new();
        self.world = world;
        decisions
    }

    /// Counts the compact pass's decisions that a full pass with the same memory would not
    /// have made (the audit's `compact_mismatches`).
    pub(super) fn verify_compact(
        &mut self,
        compact: &Decisions,
        pods: &[String],
        memory: &EngineMemory,
    ) {
        let full = self.full_decisions(Vec::new(), memory, false);
        self.audit.compact_checks += 1;
        for pod in pods {
            let key = |decision: &CheckpointDecision| {
                (
                    decision.node.clone(),
                    decision.replicate_to.clone(),
                    decision.interval,
                    decision.incremental_on.clone(),
                    decision.reason.clone(),
                )
            };
            let ours = compact
                .checkpoints
                .iter()
                .find(|c| &c.pod.name == pod)
                .map(key);
            let theirs = full
                .checkpoints
                .iter()
                .find(|c| &c.pod.name == pod)
                .map(key);
            let moved = |decisions: &Decisions| {
                decisions
                    .migrations
                    .iter()
                    .find(|m| &m.pod.name == pod)
                    .map(|m| (m.to.clone(), m.trigger))
            };
            if ours != theirs || moved(compact) != moved(&full) {
                self.audit.compact_mismatches += 1;
            }
        }
    }

    /// A pass over `jobs` and every node their decisions can name. Returns false (and applies
    /// nothing) when the outcome might differ from a full pass.
    pub(super) fn compact_pass(&mut self, jobs: &[usize], allow_mobility: bool) -> bool {
        if self.full_pass_would_move_pods() {
            // Its placements would reserve room that changes other choices (standbys too).
            return false;
        }
        let mut included: BTreeSet<usize> = BTreeSet::new();
        // Where each pod's standby may come from in this snapshot; a standby from anywhere else
        // was picked from the engine's whole-cluster fallback, which a compact snapshot cannot
        // reproduce.
        let mut standby_candidates: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
        let mut pods = Vec::new();
        let mut users = Vec::new();
        let mut records = Vec::new();
        let mobility = self.mobility_enabled();
        for &job in jobs {
            let Some(pod) = self.pod(job) else { continue };
            let Some(node) = self.bound_node(job) else {
                continue;
            };
            included.insert(node);
            let holders: Vec<usize> = self.jobs[job]
                .checkpoint
                .as_ref()
                .map(|checkpoint| checkpoint.held_on.clone())
                .unwrap_or_default();
            included.extend(holders.iter().copied());
            // A standby is chosen among current holders first, then among the node's peers
            // (the nodes it probes and those probing it); the peers are needed unless a live
            // holder other than the node remains.
            let live_holder = holders
                .iter()
                .any(|&holder| holder != node && self.nodes[holder].alive);
            let mut candidates: BTreeSet<usize> = holders.iter().copied().collect();
            if !live_holder {
                let peers = self.nodes[node].peers.iter().map(|&(peer, _)| peer);
                let peers: Vec<usize> = peers
                    .chain(self.nodes[node].probed_by.iter().copied())
                    .collect();
                candidates.extend(peers.iter().copied());
                included.extend(peers);
            }
            standby_candidates.insert(job, candidates);
            if mobility && let Some(user) = self.jobs[job].user {
                included.extend(self.cell_nodes[self.users[user].cell].iter().copied());
                self.user_observations(job, &mut users);
            }
            if let Some(record) = self.migration_record(job) {
                records.push(record);
            }
            pods.push(pod);
        }
        if pods.is_empty() {
            return true;
        }
        for &node in &included {
            self.refresh_node(node);
        }
        let datasets: BTreeSet<usize> = jobs.iter().map(|&job| self.dataset_index(job)).collect();
        let snapshot = ClusterSnapshot {
            nodes: included
                .iter()
                .map(|&node| self.world.nodes[node].clone())
                .collect(),
            links: included
                .iter()
                .flat_map(|&node| self.nodes[node].peers.iter())
                .filter(|(peer, _)| included.contains(peer))
                .map(|&(_, link)| self.world.links[link].clone())
                .collect(),
            datasets: datasets
                .iter()
                .map(|&index| {
                    let dataset = &self.world.datasets[index];
                    Dataset {
                        id: dataset.id.clone(),
                        total_bytes: dataset.total_bytes,
                        file_count: dataset.file_count,
                        files: Vec::new(),
                        present_on: self.dataset_holders[index]
                            .nodes()
                            .filter(|node| included.contains(node))
                            .map(node_name)
                            .collect(),
                    }
                })
                .collect(),
            pods,
            users,
            migrations: records,
            ..ClusterSnapshot::default()
        };
        let before = self.memory.clone();
        let decisions = self.run_decide(&snapshot, true);
        self.stats.compact_passes += 1;
        let wanted = self.policy.engine.checkpoint.replicate_to as usize;
        let unexpected = decisions
            .migrations
            .iter()
            .any(|migration| !(allow_mobility && migration.trigger == Trigger::Mobility))
            || decisions
                .deferred
                .iter()
                .any(|deferred| deferred.trigger != Trigger::Mobility)
            || decisions.checkpoints.iter().any(|checkpoint| {
                checkpoint.replicate_to.len() < wanted
                    || checkpoint.replicate_to.iter().any(|standby| {
                        let allowed = job_index(&checkpoint.pod.name)
                            .and_then(|job| standby_candidates.get(&job));
                        match (allowed, node_index(standby)) {
                            (Some(allowed), Some(node)) => !allowed.contains(&node),
                            _ => true,
                        }
                    })
            });
        if unexpected {
            self.memory = before;
            self.stats.compact_fallbacks += 1;
            return false;
        }
        if self.options.verify_compact {
            let names: Vec<String> = snapshot.pods.iter().map(|pod| pod.name.clone()).collect();
            self.verify_compact(&decisions, &names, &before);
        }
        self.apply(decisions);
        true
    }

    /// Whether a full pass would want to move some pod now: one stranded on a dead node, or
    /// on a degrading node under a policy that drains those.
    pub(super) fn full_pass_would_move_pods(&self) -> bool {
        let drains = self.policy.recovery == Recovery::Engine
            && !self.policy.engine.triggers.conditions.is_empty();
        self.troubled_nodes.iter().any(|&node| {
            let dead = !self.nodes[node].alive;
            (dead || drains)
                && self.nodes[node]
                    .jobs
                    .iter()
                    .any(|&job| self.jobs[job].migration.is_none())
        })
    }

    pub(super) fn run_decide(&mut self, snapshot: &ClusterSnapshot, compact: bool) -> Decisions {
        let now = timestamp(self.now);
        let (decisions, memory) = decide(snapshot, &self.policies, &self.memory, now);
        self.stats.decide_calls += 1;
        if self.recorded.len() < self.options.record_passes && !decisions.migrations.is_empty() {
            self.recorded.push(RecordedPass {
                snapshot: snapshot.clone(),
                memory: self.memory.clone(),
                now,
                decisions: decisions.clone(),
                compact,
            });
        }
        if compact && !self.memory.mobility_since.is_empty() {
            // A compact pass saw only some pods: keep the dwell timers of the others. (The
            // engine rebuilds `mobility_since` from the pods it saw; see the report.)
            let seen: BTreeSet<String> = snapshot
                .pods
                .iter()
                .map(|pod| pod.pod_ref().to_string())
                .collect();
            let mut merged = memory;
            for (key, since) in &self.memory.mobility_since {
                if !seen.contains(key) {
                    merged.mobility_since.insert(key.clone(), *since);
                }
            }
            self.memory = merged;
        } else {
            self.memory = memory;
        }
        decisions
    }

    pub(super) fn apply(&mut self, decisions: Decisions) {
        self.stats.migration_decisions += decisions.migrations.len() as u64;
        self.stats.checkpoint_decisions += decisions.checkpoints.len() as u64;
        for decision in &decisions.migrations {
            let Some(job) = job_index(&decision.pod.name) else {
                continue;
            };
            if job >= self.jobs.len() || self.jobs[job].migration.is_some() {
                continue;
            }
            let recovery = self.policy.recovery;
            match decision.trigger {
                Trigger::NodeFailed => {
                    if self.stats.first_failure_reason.is_none() {
                        self.stats.first_failure_reason = Some(decision.reason.clone());
                    }
                    if recovery.waits_for_eviction() {
                        let evictable =
                            self.jobs[job].evictable_at.is_some_and(|at| at <= self.now);
                        if evictable {
                            self.start_restart(job, decision);
                        }
                    } else {
                        self.start_migration(job, decision);
                    }
                }
                Trigger::NodeDegraded | Trigger::Alert | Trigger::Mobility => {
                    if recovery == Recovery::Engine {
                        self.start_migration(job, decision);
                    }
                }
                Trigger::Manual => {
                    if recovery == Recovery::SpeconLike {
                        self.start_migration(job, decision);
                    }
                }
            }
        }
        for deferred in &decisions.deferred {
            if deferred.trigger == Trigger::Mobility
                && let Some(job) = job_index(&deferred.pod.name)
                && let Some(mobility) = self.policy.engine.triggers.mobility
            {
                let at = self.now + ms(mobility.dwell).max(SECOND);
                self.schedule(at, Event::MobilityCheck(job));
            }
        }
        if self.policy.recovery.takes_periodic_checkpoints() {
            for decision in &decisions.checkpoints {
                if let Some(job) = job_index(&decision.pod.name) {
                    self.start_checkpoint(job, decision);
                }
            }
        }
    }
}
