//! Building a run: topology, probed links, datasets, the workload's jobs and users, the first
//! events.

use std::collections::{BTreeMap, BTreeSet};

use automigrate_core::model::{ClusterSnapshot, Dataset, LinkObservation, Node};
use automigrate_core::units::BitRate;
use automigrate_core::{EngineMemory, PolicySet};

use crate::random::Stream;
use crate::scenario::{ClusterScenario, SimPolicy, TraceRow};

use super::clock::{Ms, ms};
use super::results::{Audit, EngineStats, Metrics, RunOptions, SimError};
use super::simulation::Simulation;
use super::state::{
    DatasetCopies, Event, Job, JobState, SimNode, SimUser, job_name, node_name, true_link,
};

impl<'a> Simulation<'a> {
    pub(super) fn new(
        scenario: &'a ClusterScenario,
        policy: &'a SimPolicy,
        options: RunOptions,
        trace: &[TraceRow],
    ) -> Result<Self, SimError> {
        let mut policies = PolicySet::new();
        let issues = policy.engine.validate();
        if let Some(issue) = issues.first() {
            return Err(SimError::Policy {
                name: policy.name.clone(),
                reason: issue.to_string(),
            });
        }
        policies.insert(&policy.name, policy.engine.clone());

        let cluster = &scenario.cluster;
        let seed = scenario.seed;
        let heartbeat = ms(cluster.heartbeat).max(1);
        let mut topology = Stream::new(seed, 1);
        let cell_of = |index: usize| index * cluster.cells / cluster.nodes;
        let mut cell_nodes = vec![Vec::new(); cluster.cells];
        for index in 0..cluster.nodes {
            cell_nodes[cell_of(index)].push(index);
        }
        let mut nodes: Vec<SimNode> = (0..cluster.nodes)
            .map(|index| SimNode {
                alive: true,
                cell: cell_of(index),
                heartbeat_phase: (index as u64).wrapping_mul(7919) % heartbeat,
                failed_at: None,
                out_of_service: false,
                warning_since: None,
                warning_real: false,
                jobs: BTreeSet::new(),
                failures: Stream::new(seed, 1_000_000 + index as u64),
                alarms: Stream::new(seed, 2_000_000 + index as u64),
                peers: Vec::new(),
                probed_by: Vec::new(),
            })
            .collect();
        let world_nodes: Vec<Node> = (0..cluster.nodes)
            .map(|index| {
                automigrate_core::fixtures::NodeBuilder::new(&node_name(index))
                    .zone(&format!("cell-{:03}", cell_of(index)))
                    .allocatable(
                        cluster.allocatable.cpu.0,
                        cluster.allocatable.memory.0,
                        cluster.allocatable.gpu,
                    )
                    .build()
            })
            .collect();
        let mut links = Vec::new();
        for index in 0..cluster.nodes {
            let cell = &cell_nodes[cell_of(index)];
            let position = cell.iter().position(|&n| n == index).unwrap_or(0);
            let local = (cluster.probes_per_node / 2).min(cell.len().saturating_sub(1));
            let mut peers: Vec<usize> = (1..=local)
                .map(|step| cell[(position + step) % cell.len()])
                .collect();
            let mut attempts = 0;
            while peers.len() < cluster.probes_per_node.min(cluster.nodes - 1) && attempts < 100 {
                attempts += 1;
                let peer = topology.below(cluster.nodes as u64) as usize;
                if peer != index && !peers.contains(&peer) {
                    peers.push(peer);
                }
            }
            for peer in peers {
                let link = true_link(scenario, &nodes, index, peer);
                nodes[index].peers.push((peer, links.len()));
                nodes[peer].probed_by.push(index);
                links.push(LinkObservation {
                    from: node_name(index),
                    to: node_name(peer),
                    rtt: link.rtt,
                    bandwidth: Some(BitRate(cluster.bandwidth.0)),
                    loss: cluster.loss,
                    answering: None,
                });
            }
        }

        let mut data = Stream::new(seed, 2);
        let mut dataset_holders = Vec::new();
        let mut dataset_files = Vec::new();
        let mut datasets = Vec::new();
        for spec in &scenario.workload.datasets {
            let mut holders = DatasetCopies::default();
            while holders.origins.len() < spec.replicas.min(cluster.nodes) {
                holders
                    .origins
                    .insert(data.below(cluster.nodes as u64) as usize);
            }
            let dataset = Dataset {
                id: spec.id.clone(),
                total_bytes: spec.total_bytes,
                file_count: spec.files,
                files: Vec::new(),
                present_on: Vec::new(),
            };
            dataset_files.push(dataset.file_specs());
            datasets.push(dataset);
            dataset_holders.push(holders);
        }

        let mut workload = Stream::new(seed, 3);
        let horizon = ms(scenario.horizon);
        let mut arrivals: Vec<Ms> = (0..scenario.workload.jobs)
            .map(|_| (workload.unit() * horizon as f64) as Ms)
            .collect();
        arrivals.sort_unstable();
        let weights: Vec<f64> = scenario
            .workload
            .classes
            .iter()
            .map(|class| class.weight.max(0.0))
            .collect();
        let mut users = Vec::new();
        let mut jobs = Vec::with_capacity(arrivals.len());
        for (id, arrival) in arrivals.into_iter().enumerate() {
            let class_index = workload.weighted(&weights);
            let class = &scenario.workload.classes[class_index];
            let work = (workload
                .log_normal(class.duration_median.as_secs_f64(), class.duration_sigma)
                * 1000.0)
                .max(60_000.0) as Ms;
            let has_user = workload.chance(class.user_fraction);
            let specon_fraction = policy
                .specon
                .as_ref()
                .map(|spec| workload.uniform(spec.slow_growth_from, spec.slow_growth_to));
            let user_cell = workload.below(cluster.cells as u64) as usize;
            let user = (has_user && scenario.users.is_some()).then(|| {
                users.push(SimUser {
                    job: id,
                    cell: user_cell,
                    stream: Stream::new(seed, 3_000_000 + id as u64),
                });
                users.len() - 1
            });
            jobs.push(Job {
                name: job_name(id),
                class: class_index,
                arrival,
                work,
                progress: 0,
                state: JobState::NotArrived,
                epoch: 0,
                stopped_at: None,
                checkpoint: None,
                pending: None,
                checkpoint_seq: 0,
                interval: None,
                migration: None,
                last_migration: None,
                evictable_at: None,
                user,
                specon_at: specon_fraction.map(|fraction| (work as f64 * fraction) as Ms),
                specon_requested: false,
                restart_from: 0,
                finished: None,
                run_time: 0,
                lost_work: 0,
                downtime: 0,
                checkpoint_overhead: 0,
                migrations: 0,
                restarts: 0,
                placements: Vec::new(),
            });
        }

        let unfinished = jobs.len();
        let mut simulation = Self {
            scenario,
            policy,
            policies,
            memory: EngineMemory::default(),
            options,
            now: 0,
            sequence: 0,
            queue: BTreeMap::new(),
            world: ClusterSnapshot {
                nodes: world_nodes,
                links,
                datasets,
                ..ClusterSnapshot::default()
            },
            datasets_dirty: true,
            dataset_holders,
            dataset_files,
            nodes,
            cell_nodes,
            jobs,
            users,
            migrations: Vec::new(),
            queued: BTreeSet::new(),
            checkpoint_batches: BTreeMap::new(),
            troubled_nodes: BTreeSet::new(),
            specon_batches: BTreeMap::new(),
            placement: Stream::new(seed, 4),
            transfer_cache: BTreeMap::new(),
            transfer_settings: policy.engine.transfer.settings(),
            unfinished,
            stats: EngineStats::default(),
            audit: Audit::default(),
            metrics: Metrics {
                jobs: unfinished,
                ..Metrics::default()
            },
            recorded: Vec::new(),
        };
        for id in 0..simulation.jobs.len() {
            let arrival = simulation.jobs[id].arrival;
            simulation.schedule(arrival, Event::JobArrival(id));
        }
        for user in 0..simulation.users.len() {
            let job = simulation.users[user].job;
            let first = simulation.jobs[job].arrival + simulation.user_pause(user);
            simulation.schedule(first, Event::UserMove(user));
        }
        simulation.schedule_failures(trace);
        Ok(simulation)
    }
}
