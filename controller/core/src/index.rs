//! The snapshot indexed for one decision pass: names to positions, links by node, users, alerts
//! and migrations by pod. Built once per pass in time linear in the snapshot, so that the pass
//! itself never scans a list inside a loop over pods.

use foldhash::{HashMap, HashMapExt};
use std::time::Duration;

use crate::model::{
    Alert, AlertStatus, ClusterSnapshot, Dataset, LinkObservation, MigrationRecord,
    MigrationRequest,
};

pub(crate) type PodKey<'a> = (&'a str, &'a str);

#[derive(Debug)]
pub(crate) struct ClusterIndex<'a> {
    pub snapshot: &'a ClusterSnapshot,
    pub node_by_name: HashMap<&'a str, usize>,
    /// Each node's position in name order: ties between equal candidates are broken by name,
    /// so results never depend on the snapshot's order, and comparing ranks is cheap.
    pub name_rank: Vec<u32>,
    /// A hash of each node's name that is the same in every process and every snapshot.
    name_hash: Vec<u64>,
    /// Per node: (peer, link) for links measured from this node, sorted by peer.
    outgoing: Vec<Vec<(usize, usize)>>,
    /// Per node: (peer, RTT) for links measured in either direction, sorted by peer; the
    /// lower RTT where both directions were measured.
    neighbours: Vec<Vec<(usize, Duration)>>,
    /// Median RTT of the links measured to or from each node.
    pub median_peer_rtt: Vec<Option<Duration>>,
    /// Per user: (node, latency), sorted by node.
    pub user_latency: HashMap<&'a str, Vec<(usize, Duration)>>,
    /// Per dataset id: the dataset and the nodes holding it, sorted.
    pub datasets: HashMap<&'a str, (&'a Dataset, Vec<usize>)>,
    /// Firing alerts by the node they label.
    pub node_alerts: Vec<Vec<&'a Alert>>,
    /// Firing alerts by the pod they label.
    pub pod_alerts: HashMap<PodKey<'a>, Vec<&'a Alert>>,
    pub migrations: HashMap<PodKey<'a>, Vec<&'a MigrationRecord>>,
    pub requests: HashMap<PodKey<'a>, &'a MigrationRequest>,
}

impl<'a> ClusterIndex<'a> {
    pub fn new(snapshot: &'a ClusterSnapshot) -> Self {
        let node_count = snapshot.nodes.len();
        let node_by_name: HashMap<&str, usize> = snapshot
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| (node.name.as_str(), index))
            .collect();

        let mut by_name: Vec<usize> = (0..node_count).collect();
        by_name.sort_unstable_by_key(|&node| snapshot.nodes.get(node).map(|n| n.name.as_str()));
        let mut name_rank = vec![0u32; node_count];
        for (rank, &node) in by_name.iter().enumerate() {
            if let Some(slot) = name_rank.get_mut(node) {
                *slot = u32::try_from(rank).unwrap_or(u32::MAX);
            }
        }

        let name_hash = snapshot
            .nodes
            .iter()
            .map(|node| stable_hash([node.name.as_bytes()]))
            .collect();

        let mut outgoing: Vec<Vec<(usize, usize)>> = vec![Vec::new(); node_count];
        for (link_index, link) in snapshot.links.iter().enumerate() {
            if let (Some(&from), Some(&to)) = (
                node_by_name.get(link.from.as_str()),
                node_by_name.get(link.to.as_str()),
            ) && let Some(list) = outgoing.get_mut(from)
            {
                list.push((to, link_index));
            }
        }
        // A link's RTT speaks for both ends, whichever end measured it.
        let mut neighbours: Vec<Vec<(usize, Duration)>> = vec![Vec::new(); node_count];
        for (from, list) in outgoing.iter_mut().enumerate() {
            // A later observation of the same pair wins: the driver appends newer ones.
            list.sort_by_key(|&(peer, link)| (peer, std::cmp::Reverse(link)));
            list.dedup_by_key(|(peer, _)| *peer);
            for &(to, link) in list.iter() {
                if let Some(rtt) = snapshot.links.get(link).map(|link| link.rtt) {
                    for (end, other) in [(from, to), (to, from)] {
                        if let Some(list) = neighbours.get_mut(end) {
                            list.push((other, rtt));
                        }
                    }
                }
            }
        }
        let mut median_peer_rtt = Vec::with_capacity(node_count);
        for list in &mut neighbours {
            let mut rtts: Vec<Duration> = list.iter().map(|&(_, rtt)| rtt).collect();
            rtts.sort_unstable();
            median_peer_rtt.push(rtts.get(rtts.len() / 2).copied());
            list.sort_unstable();
            list.dedup_by_key(|(peer, _)| *peer);
        }

        let mut user_latency: HashMap<&str, Vec<(usize, Duration)>> = HashMap::new();
        for observation in &snapshot.users {
            if let Some(&node) = node_by_name.get(observation.node.as_str()) {
                user_latency
                    .entry(observation.user.as_str())
                    .or_default()
                    .push((node, observation.latency));
            }
        }
        for list in user_latency.values_mut() {
            list.sort_by_key(|&(node, _)| node);
            list.dedup_by_key(|(node, _)| *node);
        }

        let datasets = snapshot
            .datasets
            .iter()
            .map(|dataset| {
                let mut holders: Vec<usize> = dataset
                    .present_on
                    .iter()
                    .filter_map(|name| node_by_name.get(name.as_str()).copied())
                    .collect();
                holders.sort_unstable();
                holders.dedup();
                (dataset.id.as_str(), (dataset, holders))
            })
            .collect();

        let mut node_alerts: Vec<Vec<&Alert>> = vec![Vec::new(); node_count];
        let mut pod_alerts: HashMap<PodKey, Vec<&Alert>> = HashMap::new();
        for alert in snapshot
            .alerts
            .iter()
            .filter(|a| a.status == AlertStatus::Firing)
        {
            if let Some(list) = alert
                .labels
                .get("node")
                .and_then(|node| node_by_name.get(node.as_str()))
                .and_then(|&position| node_alerts.get_mut(position))
            {
                list.push(alert);
            }
            if let (Some(namespace), Some(pod)) =
                (alert.labels.get("namespace"), alert.labels.get("pod"))
            {
                pod_alerts
                    .entry((namespace.as_str(), pod.as_str()))
                    .or_default()
                    .push(alert);
            }
        }

        let mut migrations: HashMap<PodKey, Vec<&MigrationRecord>> = HashMap::new();
        for record in &snapshot.migrations {
            migrations
                .entry((record.pod.namespace.as_str(), record.pod.name.as_str()))
                .or_default()
                .push(record);
        }
        let requests = snapshot
            .requests
            .iter()
            .map(|request| {
                (
                    (request.pod.namespace.as_str(), request.pod.name.as_str()),
                    request,
                )
            })
            .collect();

        Self {
            snapshot,
            node_by_name,
            name_rank,
            name_hash,
            outgoing,
            neighbours,
            median_peer_rtt,
            user_latency,
            datasets,
            node_alerts,
            pod_alerts,
            migrations,
            requests,
        }
    }

    /// The measured link between two nodes, in either direction (from `a` preferred).
    pub fn link(&self, a: usize, b: usize) -> Option<&'a LinkObservation> {
        let find = |from: usize, to: usize| {
            let list = self.outgoing.get(from)?;
            let position = list.binary_search_by_key(&to, |&(peer, _)| peer).ok()?;
            let &(_, link) = list.get(position)?;
            self.snapshot.links.get(link)
        };
        find(a, b).or_else(|| find(b, a))
    }

    pub fn rtt(&self, a: usize, b: usize) -> Option<Duration> {
        lookup_sorted(self.neighbours.get(a)?, b)
    }

    /// Nodes this node probes or is probed by: the natural standby candidates.
    pub fn peers(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.neighbours
            .get(node)
            .into_iter()
            .flatten()
            .map(|&(peer, _)| peer)
    }

    pub fn name_hash(&self, node: usize) -> u64 {
        self.name_hash.get(node).copied().unwrap_or(0)
    }

    pub fn name_rank(&self, node: usize) -> u32 {
        self.name_rank.get(node).copied().unwrap_or(u32::MAX)
    }

    pub fn node_name(&self, node: usize) -> &'a str {
        self.snapshot
            .nodes
            .get(node)
            .map_or("", |n| n.name.as_str())
    }
}

/// Looks a node up in a list sorted by node.
pub(crate) fn lookup_sorted(list: &[(usize, Duration)], node: usize) -> Option<Duration> {
    list.binary_search_by_key(&node, |&(n, _)| n)
        .ok()
        .and_then(|position| list.get(position))
        .map(|&(_, latency)| latency)
}

/// FNV-1a over byte strings: the same value on every machine and in every process, unlike the
/// seeded hashers used for the pass's maps.
pub(crate) fn stable_hash<'b>(parts: impl IntoIterator<Item = &'b [u8]>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.into_iter().flatten() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
