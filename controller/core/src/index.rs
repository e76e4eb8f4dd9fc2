//! The snapshot indexed for one decision pass: names to positions, links by node, users, alerts
//! and migrations by pod. Built once per pass in time linear in the snapshot, so that the pass
//! itself never scans a list inside a loop over pods.

use std::collections::HashMap;
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
    /// Per node: (peer, link) for links measured from this node, sorted by peer.
    outgoing: Vec<Vec<(usize, usize)>>,
    /// Median RTT of each node's outgoing probes.
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
        let mut median_peer_rtt = Vec::with_capacity(node_count);
        for list in &mut outgoing {
            // A later observation of the same pair wins: the driver appends newer ones.
            list.sort_by_key(|&(peer, link)| (peer, std::cmp::Reverse(link)));
            list.dedup_by_key(|(peer, _)| *peer);
            let mut rtts: Vec<Duration> = list
                .iter()
                .filter_map(|&(_, link)| snapshot.links.get(link).map(|l| l.rtt))
                .collect();
            rtts.sort_unstable();
            median_peer_rtt.push(rtts.get(rtts.len() / 2).copied());
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
            outgoing,
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
        self.link(a, b).map(|link| link.rtt)
    }

    /// Nodes this node probes or is probed by: the natural standby candidates.
    pub fn peers(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.outgoing
            .get(node)
            .into_iter()
            .flatten()
            .map(|&(peer, _)| peer)
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
