//! Where a pod may go, and how the places it may go compare.
//!
//! Two stages. *Eligibility* is per policy and per node: healthy, Ready, not cordoned, carrying
//! the required labels, no taint the policy does not tolerate. *Ranking* is per pod: among
//! eligible nodes that are not the source, that fit the pod after the pass's earlier placements,
//! that do not break anti-affinity and (for a mobility move) are close enough to the user, score
//! each on four criteria in `[0, 1]` and take the weighted mean. Every rejection is counted by
//! reason and every score keeps its parts, so a decision can say why it chose a node and why no
//! node was good enough.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::health::Assessment;
use crate::index::{ClusterIndex, lookup_sorted};
use crate::model::{Node, NodeName, ProtectedPod, Resources, TaintEffect};
use crate::policy::Policy;

/// The parts of a candidate's score, each in `[0, 1]`; `None` when the criterion does not apply
/// to this pod (no user, nothing to move).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScoreParts {
    pub free_resources: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_latency: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_latency: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_locality: Option<f64>,
}

/// One ranked node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CandidateScore {
    pub node: NodeName,
    pub score: f64,
    pub parts: ScoreParts,
}

impl fmt::Display for CandidateScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:.3} (free {:.2}",
            self.node, self.score, self.parts.free_resources
        )?;
        if let Some(value) = self.parts.source_latency {
            write!(f, ", source latency {value:.2}")?;
        }
        if let Some(value) = self.parts.user_latency {
            write!(f, ", user latency {value:.2}")?;
        }
        if let Some(value) = self.parts.data_locality {
            write!(f, ", data locality {value:.2}")?;
        }
        f.write_str(")")
    }
}

/// How many nodes were turned down, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejections(pub BTreeMap<String, usize>);

impl Rejections {
    pub fn add(&mut self, reason: &str) {
        *self.0.entry(reason.to_string()).or_default() += 1;
    }

    pub fn total(&self) -> usize {
        self.0.values().sum()
    }
}

impl fmt::Display for Rejections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut by_count: Vec<(&String, &usize)> = self.0.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (index, (reason, count)) in by_count.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{count} {reason}")?;
        }
        Ok(())
    }
}

/// Why a node can never take a pod under a policy this pass, or `None` if it can.
pub(crate) fn static_rejection(
    node: &Node,
    assessment: &Assessment,
    policy: &Policy,
) -> Option<&'static str> {
    if !assessment.schedulable {
        return Some(if node.unschedulable {
            "cordoned"
        } else {
            "not healthy"
        });
    }
    let targeting = &policy.targeting;
    if !targeting
        .required_labels
        .iter()
        .all(|(key, value)| node.labels.get(key) == Some(value))
    {
        return Some("missing a required label");
    }
    let blocked = node.taints.iter().any(|taint| {
        taint.effect != TaintEffect::PreferNoSchedule
            && !targeting
                .tolerated_taints
                .iter()
                .any(|t| t.tolerates(taint))
    });
    if blocked {
        return Some("tainted");
    }
    None
}

/// Everything that bears on where one pod goes.
#[derive(Debug)]
pub(crate) struct TargetQuery<'q> {
    pub pod: &'q ProtectedPod,
    pub policy: &'q Policy,
    pub source: usize,
    /// Nodes the checkpoint would be sent from (the live source, or surviving replicas).
    pub data_from: &'q [usize],
    /// The pod's user's latency to nodes, sorted by node.
    pub user: Option<&'q [(usize, Duration)]>,
    /// Only nodes at most this far from the user qualify (mobility moves).
    pub max_user_latency: Option<Duration>,
    pub dataset_nodes: &'q [usize],
    pub dataset_bytes: u64,
    pub checkpoint_nodes: &'q [usize],
    pub checkpoint_bytes: u64,
    /// Nodes that already run a pod this one must not share a node with.
    pub avoid: &'q [usize],
}

fn latency_score(rtt: Duration, reference: Duration) -> f64 {
    let reference = reference.as_secs_f64();
    reference / (reference + rtt.as_secs_f64())
}

/// A scored node, by position; names are looked up only for the few that are kept.
#[derive(Debug, Clone, Copy)]
struct Scored {
    node: usize,
    score: f64,
    parts: ScoreParts,
}

/// Scores one node for a query, or says why it does not qualify.
fn score(
    index: &ClusterIndex<'_>,
    candidate: usize,
    reserved: Resources,
    query: &TargetQuery<'_>,
) -> Result<Scored, &'static str> {
    let node = index.snapshot.nodes.get(candidate).ok_or("unknown")?;
    if candidate == query.source {
        return Err("is the source");
    }
    let free = node.free().saturating_sub(reserved);
    if let Some(short) = free.shortfall(query.pod.requests) {
        return Err(match short {
            "cpu" => "short of cpu",
            "memory" => "short of memory",
            _ => "short of gpu",
        });
    }
    if query.avoid.binary_search(&candidate).is_ok() {
        return Err("anti-affinity");
    }
    let user_latency = query.user.and_then(|list| lookup_sorted(list, candidate));
    if let Some(limit) = query.max_user_latency {
        match user_latency {
            Some(latency) if latency <= limit => {}
            _ => return Err("too far from the user"),
        }
    }

    let after = free.saturating_sub(query.pod.requests);
    let fraction = |left: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            left as f64 / total as f64
        }
    };
    let mut free_resources = fraction(after.cpu.0, node.allocatable.cpu.0)
        .min(fraction(after.memory.0, node.allocatable.memory.0));
    if query.pod.requests.gpu > 0 {
        free_resources = free_resources.min(fraction(after.gpu, node.allocatable.gpu));
    }

    let reference = query.policy.targeting.latency_reference;
    let source_latency = if query.data_from.is_empty() {
        None
    } else if query.data_from.contains(&candidate) {
        Some(1.0)
    } else {
        Some(
            query
                .data_from
                .iter()
                .filter_map(|&from| index.rtt(from, candidate))
                .min()
                .map_or(0.0, |rtt| latency_score(rtt, reference)),
        )
    };
    let user_score = query
        .user
        .map(|_| user_latency.map_or(0.0, |latency| latency_score(latency, reference)));
    let total_bytes = query.dataset_bytes + query.checkpoint_bytes;
    let data_locality = (total_bytes > 0).then(|| {
        let mut present = 0;
        if query.dataset_nodes.binary_search(&candidate).is_ok() {
            present += query.dataset_bytes;
        }
        if query.checkpoint_nodes.contains(&candidate) {
            present += query.checkpoint_bytes;
        }
        present as f64 / total_bytes as f64
    });

    let weights = &query.policy.targeting.weights;
    let mut weighted = weights.free_resources * free_resources;
    let mut weight_sum = weights.free_resources;
    for (weight, part) in [
        (weights.source_latency, source_latency),
        (weights.user_latency, user_score),
        (weights.data_locality, data_locality),
    ] {
        if let Some(part) = part {
            weighted += weight * part;
            weight_sum += weight;
        }
    }
    let score = if weight_sum > 0.0 {
        weighted / weight_sum
    } else {
        0.0
    };
    Ok(Scored {
        node: candidate,
        score,
        parts: ScoreParts {
            free_resources,
            source_latency,
            user_latency: user_score,
            data_locality,
        },
    })
}

/// Higher score first. Equal scores are ordered by a hash of the pod's and the node's names,
/// so the result depends neither on input order nor on which other nodes the snapshot holds,
/// yet pods displaced onto a uniform cluster spread out instead of all landing on the
/// lowest-named nodes. (Names break the vanishingly rare hash tie.)
fn better(index: &ClusterIndex<'_>, pod_seed: u64, a: &Scored, b: &Scored) -> bool {
    if a.score != b.score {
        return a.score > b.score;
    }
    let tiebreak = |node: usize| {
        (
            mix64(pod_seed ^ index.name_hash(node)),
            index.name_rank(node),
        )
    };
    tiebreak(a.node) < tiebreak(b.node)
}

/// SplitMix64's finaliser: a fixed, well-spread bijection on `u64`.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A per-pod seed for tie-breaking that depends only on the pod's identity.
fn pod_seed(pod: &ProtectedPod) -> u64 {
    crate::index::stable_hash([pod.namespace.as_bytes(), b"/", pod.name.as_bytes()])
}

/// Ranks `candidates` and keeps the best `keep`, counting every rejection.
pub(crate) fn rank(
    index: &ClusterIndex<'_>,
    static_rejections: &[Option<&'static str>],
    reserved: &[Resources],
    query: &TargetQuery<'_>,
    candidates: impl Iterator<Item = usize>,
    keep: usize,
) -> (Vec<CandidateScore>, Rejections) {
    let mut best: Vec<Scored> = Vec::with_capacity(keep + 1);
    let seed = pod_seed(query.pod);
    let mut rejections = Rejections::default();
    for candidate in candidates {
        if let Some(Some(reason)) = static_rejections.get(candidate) {
            if candidate != query.source {
                rejections.add(reason);
            }
            continue;
        }
        let reserved_here = reserved.get(candidate).copied().unwrap_or_default();
        match score(index, candidate, reserved_here, query) {
            Ok(scored) => {
                if best.len() < keep
                    || best
                        .last()
                        .is_some_and(|worst| better(index, seed, &scored, worst))
                {
                    let position = best
                        .iter()
                        .position(|existing| better(index, seed, &scored, existing))
                        .unwrap_or(best.len());
                    best.insert(position, scored);
                    best.truncate(keep);
                }
            }
            Err("is the source") => {}
            Err(reason) => rejections.add(reason),
        }
    }
    let ranked = best
        .into_iter()
        .map(|scored| CandidateScore {
            node: index.node_name(scored.node).to_string(),
            score: scored.score,
            parts: scored.parts,
        })
        .collect();
    (ranked, rejections)
}
