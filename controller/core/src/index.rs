//! The snapshot indexed for one decision pass: names to positions, links by node, users, alerts
//! and migrations by pod. Built once per pass in time linear in the snapshot, so that the pass
//! itself never scans a list inside a loop over pods.
//!
//! Lookups by node name happen once per pod and once per link, so they dominate a pass over a
//! large cluster: [`NodeNames`] keeps a copy of every name side by side, which makes the string
//! comparison at the end of a lookup read memory that is already cached instead of one scattered
//! allocation per node. The resources that ranking reads for every candidate node are likewise
//! copied into dense arrays ([`ClusterIndex::free`], [`ClusterIndex::allocatable`]).

use crate::health::PeerReach;
use foldhash::{HashMap, HashMapExt};
use std::hash::BuildHasher;
use std::time::Duration;

use crate::model::{
    Alert, AlertStatus, ClusterSnapshot, Dataset, LinkObservation, MigrationRecord,
    MigrationRequest, Resources,
};

/// A pod's namespace and name, borrowed from the snapshot: what the per-pass indexes key by, so
/// a lookup allocates nothing. The owned pod identity is [`crate::model::PodRef`].
pub(crate) type PodNames<'a> = (&'a str, &'a str);

/// Node name to position, like a `HashMap<&str, usize>` built from the nodes in order (a name
/// listed twice maps to its last position), but with the names copied into one buffer.
#[derive(Debug)]
pub(crate) struct NodeNames {
    hasher: foldhash::fast::RandomState,
    /// Every node's name, one after the other.
    text: String,
    /// Per node: where its name starts and ends in `text`.
    spans: Vec<(usize, usize)>,
    hashes: Vec<u64>,
    /// Open addressing with linear probing, at most half full: 0 is empty, otherwise the node's
    /// position + 1.
    slots: Vec<usize>,
}

impl NodeNames {
    fn new<'n>(names: impl ExactSizeIterator<Item = &'n str>) -> Self {
        let count = names.len();
        let capacity = count.saturating_mul(2).max(8).next_power_of_two();
        let mut table = Self {
            hasher: foldhash::fast::RandomState::default(),
            text: String::new(),
            spans: Vec::with_capacity(count),
            hashes: Vec::with_capacity(count),
            slots: vec![0; capacity],
        };
        for (position, name) in names.enumerate() {
            let start = table.text.len();
            table.text.push_str(name);
            table.spans.push((start, table.text.len()));
            let hash = table.hasher.hash_one(name);
            table.hashes.push(hash);
            let slot = table.probe(name, hash);
            if let Some(entry) = table.slots.get_mut(slot) {
                *entry = position + 1;
            }
        }
        table
    }

    fn name(&self, node: usize) -> &str {
        self.spans
            .get(node)
            .and_then(|&(start, end)| self.text.get(start..end))
            .unwrap_or_default()
    }

    /// The slot holding `name`, or the empty slot where it would go.
    fn probe(&self, name: &str, hash: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut slot = (hash as usize) & mask;
        loop {
            match self.slots.get(slot).copied() {
                Some(0) | None => return slot,
                Some(entry) => {
                    let node = entry - 1;
                    if self.hashes.get(node) == Some(&hash) && self.name(node) == name {
                        return slot;
                    }
                }
            }
            slot = (slot + 1) & mask;
        }
    }

    pub fn get(&self, name: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(name);
        match self.slots.get(self.probe(name, hash)).copied() {
            Some(0) | None => None,
            Some(entry) => Some(entry - 1),
        }
    }
}

#[derive(Debug)]
pub(crate) struct ClusterIndex<'a> {
    pub snapshot: &'a ClusterSnapshot,
    node_by_name: NodeNames,
    /// Each node's position in name order: ties between equal candidates are broken by name,
    /// so results never depend on the snapshot's order, and comparing ranks is cheap.
    pub name_rank: Vec<u32>,
    /// A hash of each node's name that is the same in every process and every snapshot.
    name_hash: Vec<u64>,
    /// Per node: allocatable minus requested (saturating), as [`crate::model::Node::free`].
    pub free: Vec<Resources>,
    /// Per node: allocatable.
    pub allocatable: Vec<Resources>,
    /// Per node: `1 / allocatable` cpu and memory (0 where allocatable is 0), which let ranking
    /// estimate a score without dividing; kept apart because ranking reads them for every node.
    pub inverse_allocatable: Vec<[f64; 2]>,
    /// Per node: `1 / allocatable` gpus, likewise.
    pub inverse_allocatable_gpu: Vec<f64>,
    /// Per node: (peer, link) for links measured from this node, sorted by peer.
    outgoing: Vec<Vec<(usize, usize)>>,
    /// Per node: (peer, RTT) for links measured in either direction, sorted by peer; the
    /// lower RTT where both directions were measured.
    neighbours: Vec<Vec<(usize, Duration)>>,
    /// Median RTT of the links measured to or from each node.
    pub median_peer_rtt: Vec<Option<Duration>>,
    /// Per node: how many peers report probing it now and how many of them get answers
    /// (links that say whether they are [`LinkObservation::answering`]); `None`: no peer says.
    pub peer_reach: Vec<Option<PeerReach>>,
    /// Per user (by [`Self::user`]): (node, latency), sorted by node.
    user_latency: Vec<Vec<(usize, Duration)>>,
    user_ids: HashMap<&'a str, usize>,
    /// Per dataset (by [`Self::dataset`]): the dataset and the nodes holding it, sorted.
    datasets: Vec<(&'a Dataset, Vec<usize>)>,
    dataset_ids: HashMap<&'a str, usize>,
    /// Firing alerts by the node they label.
    pub node_alerts: Vec<Vec<&'a Alert>>,
    /// Firing alerts by the pod they label.
    pub pod_alerts: HashMap<PodNames<'a>, Vec<&'a Alert>>,
    pub migrations: HashMap<PodNames<'a>, Vec<&'a MigrationRecord>>,
    pub requests: HashMap<PodNames<'a>, &'a MigrationRequest>,
}

impl<'a> ClusterIndex<'a> {
    pub fn new(snapshot: &'a ClusterSnapshot) -> Self {
        let node_count = snapshot.nodes.len();
        let node_by_name = NodeNames::new(snapshot.nodes.iter().map(|node| node.name.as_str()));

        let mut by_name: Vec<usize> = (0..node_count).collect();
        by_name.sort_unstable_by_key(|&node| node_by_name.name(node));
        let mut name_rank = vec![0u32; node_count];
        for (rank, &node) in by_name.iter().enumerate() {
            if let Some(slot) = name_rank.get_mut(node) {
                *slot = u32::try_from(rank).unwrap_or(u32::MAX);
            }
        }

        let name_hash = (0..node_count)
            .map(|node| stable_hash([node_by_name.name(node).as_bytes()]))
            .collect();
        let free = snapshot.nodes.iter().map(|node| node.free()).collect();
        let allocatable: Vec<Resources> =
            snapshot.nodes.iter().map(|node| node.allocatable).collect();
        let inverse = |total: u64| if total == 0 { 0.0 } else { 1.0 / total as f64 };
        let inverse_allocatable = allocatable
            .iter()
            .map(|resources| [inverse(resources.cpu.0), inverse(resources.memory.0)])
            .collect();
        let inverse_allocatable_gpu = allocatable
            .iter()
            .map(|resources| inverse(resources.gpu))
            .collect();

        let mut outgoing: Vec<Vec<(usize, usize)>> = vec![Vec::new(); node_count];
        // Agents report their probes together, so consecutive links mostly share `from`.
        let mut previous_from: Option<(&str, Option<usize>)> = None;
        for (link_index, link) in snapshot.links.iter().enumerate() {
            let from = match previous_from {
                Some((name, position)) if name == link.from => position,
                _ => {
                    let position = node_by_name.get(&link.from);
                    previous_from = Some((link.from.as_str(), position));
                    position
                }
            };
            if let (Some(from), Some(to)) = (from, node_by_name.get(&link.to))
                && let Some(list) = outgoing.get_mut(from)
            {
                list.push((to, link_index));
            }
        }
        // A later observation of the same pair wins: the driver appends newer ones.
        let mut ends = vec![0usize; node_count];
        for (from, list) in outgoing.iter_mut().enumerate() {
            list.sort_by_key(|&(peer, link)| (peer, std::cmp::Reverse(link)));
            list.dedup_by_key(|(peer, _)| *peer);
            for &(to, _) in list.iter() {
                for end in [from, to] {
                    if let Some(count) = ends.get_mut(end) {
                        *count += 1;
                    }
                }
            }
        }
        // Reach is directional: `from`'s probes say whether `to` answers `from` now.
        let mut peer_reach: Vec<Option<PeerReach>> = vec![None; node_count];
        for (from, list) in outgoing.iter().enumerate() {
            for &(to, link) in list.iter() {
                let answering = snapshot.links.get(link).and_then(|link| link.answering);
                if let (Some(answering), Some(reach)) = (answering, peer_reach.get_mut(to))
                    && from != to
                {
                    let reach = reach.get_or_insert(PeerReach {
                        probing: 0,
                        reaching: 0,
                    });
                    reach.probing += 1;
                    reach.reaching += usize::from(answering);
                }
            }
        }
        // A link's RTT speaks for both ends, whichever end measured it.
        let mut neighbours: Vec<Vec<(usize, Duration)>> = ends
            .iter()
            .map(|&count| Vec::with_capacity(count))
            .collect();
        for (from, list) in outgoing.iter().enumerate() {
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
        let mut rtts: Vec<Duration> = Vec::new();
        for list in &mut neighbours {
            rtts.clear();
            rtts.extend(list.iter().map(|&(_, rtt)| rtt));
            rtts.sort_unstable();
            median_peer_rtt.push(rtts.get(rtts.len() / 2).copied());
            list.sort_unstable();
            list.dedup_by_key(|(peer, _)| *peer);
        }

        let mut user_ids: HashMap<&str, usize> = HashMap::new();
        let mut user_latency: Vec<Vec<(usize, Duration)>> = Vec::new();
        for observation in &snapshot.users {
            if let Some(node) = node_by_name.get(&observation.node) {
                let next = user_latency.len();
                let id = *user_ids.entry(observation.user.as_str()).or_insert(next);
                if id == next {
                    user_latency.push(Vec::new());
                }
                if let Some(list) = user_latency.get_mut(id) {
                    list.push((node, observation.latency));
                }
            }
        }
        for list in &mut user_latency {
            list.sort_by_key(|&(node, _)| node);
            list.dedup_by_key(|(node, _)| *node);
        }

        let datasets: Vec<(&Dataset, Vec<usize>)> = snapshot
            .datasets
            .iter()
            .map(|dataset| {
                let mut holders: Vec<usize> = dataset
                    .present_on
                    .iter()
                    .filter_map(|name| node_by_name.get(name))
                    .collect();
                holders.sort_unstable();
                holders.dedup();
                (dataset, holders)
            })
            .collect();
        // A dataset listed twice: the later entry counts.
        let dataset_ids = datasets
            .iter()
            .enumerate()
            .map(|(position, (dataset, _))| (dataset.id.as_str(), position))
            .collect();

        let mut node_alerts: Vec<Vec<&Alert>> = vec![Vec::new(); node_count];
        let mut pod_alerts: HashMap<PodNames, Vec<&Alert>> = HashMap::new();
        for alert in snapshot
            .alerts
            .iter()
            .filter(|a| a.status == AlertStatus::Firing)
        {
            if let Some(list) = alert
                .labels
                .get("node")
                .and_then(|node| node_by_name.get(node))
                .and_then(|position| node_alerts.get_mut(position))
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

        let mut migrations: HashMap<PodNames, Vec<&MigrationRecord>> = HashMap::new();
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
            free,
            allocatable,
            inverse_allocatable,
            inverse_allocatable_gpu,
            outgoing,
            neighbours,
            median_peer_rtt,
            peer_reach,
            user_latency,
            user_ids,
            datasets,
            dataset_ids,
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

    /// (peer, RTT) for the links measured to or from a node, sorted by peer, one per peer.
    pub fn neighbours(&self, node: usize) -> &[(usize, Duration)] {
        self.neighbours.get(node).map_or(&[], Vec::as_slice)
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

    /// A node's name, read from the index's compact copy (the same text as [`Self::node_name`]).
    pub fn compact_name(&self, node: usize) -> &str {
        self.node_by_name.name(node)
    }

    /// A user's key for [`Self::user_latency`], if any of the user's latencies was measured.
    pub fn user(&self, user: &str) -> Option<usize> {
        self.user_ids.get(user).copied()
    }

    /// A user's latency to nodes, sorted by node.
    pub fn user_latency(&self, user: usize) -> &[(usize, Duration)] {
        self.user_latency.get(user).map_or(&[], Vec::as_slice)
    }

    /// A dataset's key for [`Self::dataset_holders`], by the id pods name it by.
    pub fn dataset(&self, id: &str) -> Option<usize> {
        self.dataset_ids.get(id).copied()
    }

    /// A dataset and the nodes holding it, sorted.
    pub fn dataset_holders(&self, dataset: usize) -> Option<(&'a Dataset, &[usize])> {
        self.datasets
            .get(dataset)
            .map(|(dataset, holders)| (*dataset, holders.as_slice()))
    }

    /// A node's position by name.
    pub fn node(&self, name: &str) -> Option<usize> {
        self.node_by_name.get(name)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn node_names_find_every_node_and_the_last_of_a_repeated_name() {
        let names: Vec<String> = (0..100).map(|i| format!("node-{i:03}")).collect();
        let mut listed: Vec<&str> = names.iter().map(String::as_str).collect();
        listed.push("node-007");
        let table = NodeNames::new(listed.iter().copied());
        for (position, name) in names.iter().enumerate().filter(|(p, _)| *p != 7) {
            assert_eq!(table.get(name), Some(position), "{name}");
            assert_eq!(table.name(position), name);
        }
        assert_eq!(
            table.get("node-007"),
            Some(100),
            "a later entry wins, as in a HashMap"
        );
        assert_eq!(table.get("node-1000"), None);
        assert_eq!(table.get(""), None);
        assert_eq!(NodeNames::new(std::iter::empty()).get("a"), None);
    }
}
