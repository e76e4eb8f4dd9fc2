//! Where a pod may go, and how the places it may go compare.
//!
//! Two stages. *Eligibility* is per policy and per node: healthy, Ready, not cordoned, carrying
//! the required labels, no taint the policy does not tolerate. *Ranking* is per pod: among
//! eligible nodes that are not the source, that fit the pod after the pass's earlier placements,
//! that do not break anti-affinity and (for a mobility move) are close enough to the user, score
//! each on four criteria in `[0, 1]` and take the weighted mean. Every rejection is counted by
//! reason and every score keeps its parts, so a decision can say why it chose a node and why no
//! node was good enough.
//!
//! Ranking a displaced pod visits every node, so it skips work it can prove useless, never
//! changing the result: once the best few are known, a candidate whose score is certainly below
//! the worst of them is not scored exactly (a division-free estimate with slack decides), and a
//! node that is neither near the source nor the user nor holding the pod's data is screened
//! before any lookup. A property test compares the result with exact scoring of every node.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::health::Assessment;
use crate::index::ClusterIndex;
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

/// [`static_rejection`] of every node under one policy, one byte per node, since ranking reads
/// it for every candidate.
#[derive(Debug, Default)]
pub(crate) struct StaticRejections {
    /// Per node: 0 when it may take a pod, else 1 + the reason's position in `reasons`.
    codes: Vec<u8>,
    reasons: Vec<&'static str>,
}

/// Verdicts for no nodes at all.
pub(crate) static NO_STATIC_REJECTIONS: StaticRejections = StaticRejections {
    codes: Vec::new(),
    reasons: Vec::new(),
};

impl StaticRejections {
    /// Appends the next node's verdict.
    pub fn push(&mut self, reason: Option<&'static str>) {
        let code = match reason {
            None => 0,
            Some(reason) => match self.reasons.iter().position(|known| *known == reason) {
                Some(position) => position + 1,
                None => {
                    self.reasons.push(reason);
                    self.reasons.len()
                }
            },
        };
        // Reasons come from a handful of literals, far fewer than 255.
        self.codes.push(u8::try_from(code).unwrap_or(u8::MAX));
    }

    /// Like `slice::get` on the verdicts: `None` past the last node.
    #[inline(always)]
    fn get(&self, node: usize) -> Option<Option<&'static str>> {
        let code = *self.codes.get(node)?;
        Some(match code {
            0 => None,
            code => self.reasons.get(usize::from(code) - 1).copied(),
        })
    }
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
    /// Nodes where an attempt to move this pod failed recently (sorted): trying the same node
    /// again would likely fail the same way (its disk is full, its runtime is broken).
    pub recently_failed: &'q [usize],
}

fn latency_score(rtt: Duration, reference: Duration) -> f64 {
    let reference = reference.as_secs_f64();
    reference / (reference + rtt.as_secs_f64())
}

/// A scored node, by position; names are looked up only for the few that are kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scored {
    node: usize,
    score: f64,
    parts: ScoreParts,
}

/// An entry of a list sorted by node.
trait ByNode {
    fn node(&self) -> usize;
}

impl ByNode for usize {
    fn node(&self) -> usize {
        *self
    }
}

impl ByNode for (usize, Duration) {
    fn node(&self) -> usize {
        self.0
    }
}

/// A list sorted by node with one entry per node, looked up by candidates that mostly come in
/// ascending order (ranking walks nodes by position): a forward-only cursor answers those in
/// amortised constant time, and a candidate below the previous one falls back to a binary search.
/// Same answers as a binary search, since nodes are unique in the list.
struct SortedCursor<'l, T> {
    list: &'l [T],
    /// Position of the first entry not below the last node asked for.
    next: usize,
    /// That entry's node, `usize::MAX` past the end: most candidates are below it, and answered
    /// by one comparison.
    next_node: usize,
    previous: usize,
}

impl<'l, T: ByNode> SortedCursor<'l, T> {
    fn new(list: &'l [T]) -> Self {
        let mut cursor = Self {
            list,
            next: 0,
            next_node: usize::MAX,
            previous: 0,
        };
        cursor.seek(0);
        cursor
    }

    fn seek(&mut self, next: usize) {
        self.next = next;
        self.next_node = self.list.get(next).map_or(usize::MAX, ByNode::node);
    }

    #[inline(always)]
    fn find(&mut self, node: usize) -> Option<&'l T> {
        if node < self.previous {
            self.seek(self.list.partition_point(|entry| entry.node() < node));
        }
        self.previous = node;
        if node < self.next_node {
            return None;
        }
        while self.next_node < node {
            self.seek(self.next + 1);
        }
        if self.next_node == node {
            self.list.get(self.next)
        } else {
            None
        }
    }
}

/// The per-query lookups of [`score`], each a cursor over a list sorted by node.
struct Lookups<'l> {
    /// Lowest RTT from any of the query's `data_from` nodes, per node.
    source_rtt: SortedCursor<'l, (usize, Duration)>,
    user: Option<SortedCursor<'l, (usize, Duration)>>,
    dataset: SortedCursor<'l, usize>,
    avoid: SortedCursor<'l, usize>,
    recently_failed: SortedCursor<'l, usize>,
}

/// What a candidate must beat to enter a full list of the best: the worst kept score. Lets
/// [`score`] skip the divisions of a candidate whose score provably falls short.
#[derive(Debug, Clone, Copy)]
struct Cutoff {
    worst: f64,
    inverse_weight_sum: f64,
}

impl Cutoff {
    /// Relative slack on the estimate: far above its rounding error (a few units in the last
    /// place, ~1e-15), far below any difference that matters.
    const SLACK: f64 = 1e-9;

    /// Whether a score whose weighted sum is at most about `weighted` is certainly below
    /// `worst`. The estimate multiplies by precomputed inverses where the score divides; both
    /// round, so it is compared with slack and never prunes a score equal to `worst`.
    fn excludes(&self, weighted: f64) -> bool {
        weighted * self.inverse_weight_sum * (1.0 + Self::SLACK) + 1e-200 < self.worst
    }

    /// The weight sum a query's scores divide by, when the fast estimate is sound for it:
    /// every weight 0 or of a sane magnitude (no subnormal products), none negative.
    fn weight_sum(query: &TargetQuery<'_>) -> Option<f64> {
        let weights = &query.policy.targeting.weights;
        let sane = |weight: f64| weight == 0.0 || (1e-100..=1e100).contains(&weight);
        let mut sum = weights.free_resources;
        let mut all_sane = sane(weights.free_resources);
        // The same parts as in `score`: which ones apply depends only on the query.
        for (weight, applies) in [
            (weights.source_latency, !query.data_from.is_empty()),
            (weights.user_latency, query.user.is_some()),
            (
                weights.data_locality,
                query.dataset_bytes + query.checkpoint_bytes > 0,
            ),
        ] {
            if applies {
                sum += weight;
                all_sane &= sane(weight);
            }
        }
        (all_sane && (1e-100..=1e100).contains(&sum)).then_some(sum)
    }
}

/// `value as f64`, through the single-instruction signed conversion when the value allows it
/// (the result is the same: both round the same integer to nearest).
#[inline(always)]
fn to_f64(value: u64) -> f64 {
    match i64::try_from(value) {
        Ok(signed) => signed as f64,
        Err(_) => value as f64,
    }
}

/// The free-resources part of a score, multiplied by inverses instead of divided: within a few
/// units in the last place of the exact part, for [`Cutoff::excludes`].
#[inline(always)]
fn free_estimate(
    index: &ClusterIndex<'_>,
    candidate: usize,
    after: Resources,
    query: &TargetQuery<'_>,
) -> Option<f64> {
    let &[cpu, memory] = index.inverse_allocatable.get(candidate)?;
    let mut estimate = (to_f64(after.cpu.0) * cpu).min(to_f64(after.memory.0) * memory);
    if query.pod.requests.gpu > 0 {
        let gpu = index.inverse_allocatable_gpu.get(candidate)?;
        estimate = estimate.min(to_f64(after.gpu) * gpu);
    }
    Some(estimate)
}

/// The rejection reason for a [`Resources::shortfall`].
fn shortfall_reason(short: &str) -> &'static str {
    match short {
        "cpu" => "short of cpu",
        "memory" => "short of memory",
        _ => "short of gpu",
    }
}

/// Lists at least this long go through the plain-node screen in [`rank_into`]; shorter ones
/// are not worth building its list of special nodes for.
const PLAIN_SCREEN_MIN: usize = 64;

/// The checks [`score`] makes before scoring, in its order: a node's free room and the user's
/// latency to it, or why the node cannot take the pod.
#[inline(always)]
fn admit(
    candidate: usize,
    available: &[Resources],
    query: &TargetQuery<'_>,
    avoid: &mut SortedCursor<'_, usize>,
    recently_failed: &mut SortedCursor<'_, usize>,
    user: Option<&mut SortedCursor<'_, (usize, Duration)>>,
) -> Result<(Resources, Option<Duration>), &'static str> {
    let Some(&free) = available.get(candidate) else {
        return Err("unknown");
    };
    if candidate == query.source {
        return Err("is the source");
    }
    if let Some(short) = free.shortfall(query.pod.requests) {
        return Err(shortfall_reason(short));
    }
    if avoid.find(candidate).is_some() {
        return Err("anti-affinity");
    }
    if recently_failed.find(candidate).is_some() {
        return Err("an attempt there failed recently");
    }
    let user_latency = user
        .and_then(|user| user.find(candidate))
        .map(|&(_, latency)| latency);
    if let Some(limit) = query.max_user_latency {
        match user_latency {
            Some(latency) if latency <= limit => {}
            _ => return Err("too far from the user"),
        }
    }
    Ok((free, user_latency))
}

/// Whether [`rank_into`] keeps `candidate` when it is the only candidate (and at least one is
/// kept): whether it passes every check. Cheaper than ranking a list of one.
pub(crate) fn qualifies(
    static_rejections: &StaticRejections,
    available: &[Resources],
    query: &TargetQuery<'_>,
    candidate: usize,
) -> bool {
    !matches!(static_rejections.get(candidate), Some(Some(_)))
        && admit(
            candidate,
            available,
            query,
            &mut SortedCursor::new(query.avoid),
            &mut SortedCursor::new(query.recently_failed),
            query.user.map(SortedCursor::new).as_mut(),
        )
        .is_ok()
}

/// Scores one node for a query, or says why it does not qualify. With a `cutoff`, returns
/// `Ok(None)` instead of the score when it is certainly below the cutoff.
#[inline(always)]
fn score(
    index: &ClusterIndex<'_>,
    candidate: usize,
    available: &[Resources],
    query: &TargetQuery<'_>,
    lookups: &mut Lookups<'_>,
    cutoff: Option<Cutoff>,
) -> Result<Option<Scored>, &'static str> {
    let (free, user_latency) = admit(
        candidate,
        available,
        query,
        &mut lookups.avoid,
        &mut lookups.recently_failed,
        lookups.user.as_mut(),
    )?;
    let after = free.saturating_sub(query.pod.requests);

    let reference = query.policy.targeting.latency_reference;
    let source_latency = if query.data_from.is_empty() {
        None
    } else if query.data_from.contains(&candidate) {
        Some(1.0)
    } else {
        Some(
            lookups
                .source_rtt
                .find(candidate)
                .map_or(0.0, |&(_, rtt)| latency_score(rtt, reference)),
        )
    };
    let user_score = query
        .user
        .map(|_| user_latency.map_or(0.0, |latency| latency_score(latency, reference)));
    let total_bytes = query.dataset_bytes + query.checkpoint_bytes;
    let data_locality = if total_bytes > 0 {
        let mut present = 0;
        if lookups.dataset.find(candidate).is_some() {
            present += query.dataset_bytes;
        }
        if query.checkpoint_nodes.contains(&candidate) {
            present += query.checkpoint_bytes;
        }
        // Most nodes hold nothing; 0 / total is exactly 0.0, without waiting on a division.
        Some(if present == 0 {
            0.0
        } else {
            present as f64 / total_bytes as f64
        })
    } else {
        None
    };
    let weights = &query.policy.targeting.weights;
    let others = [
        (weights.source_latency, source_latency),
        (weights.user_latency, user_score),
        (weights.data_locality, data_locality),
    ];

    if let (Some(cutoff), Some(free_estimate)) =
        (cutoff, free_estimate(index, candidate, after, query))
    {
        let mut weighted = weights.free_resources * free_estimate;
        for (weight, part) in others {
            if let Some(part) = part {
                weighted += weight * part;
            }
        }
        if cutoff.excludes(weighted) {
            return Ok(None);
        }
    }

    let fraction = |left: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            left as f64 / total as f64
        }
    };
    let allocatable = index
        .allocatable
        .get(candidate)
        .copied()
        .unwrap_or_default();
    let mut free_resources = fraction(after.cpu.0, allocatable.cpu.0)
        .min(fraction(after.memory.0, allocatable.memory.0));
    if query.pod.requests.gpu > 0 {
        free_resources = free_resources.min(fraction(after.gpu, allocatable.gpu));
    }
    let mut weighted = weights.free_resources * free_resources;
    let mut weight_sum = weights.free_resources;
    for (weight, part) in others {
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
    Ok(Some(Scored {
        node: candidate,
        score,
        parts: ScoreParts {
            free_resources,
            source_latency,
            user_latency: user_score,
            data_locality,
        },
    }))
}

/// Higher score first. Equal scores are ordered by a hash of the pod's and the node's names,
/// so the result depends neither on input order nor on which other nodes the snapshot holds,
/// yet pods displaced onto a uniform cluster spread out instead of all landing on the
/// lowest-named nodes. (Names break the vanishingly rare hash tie.)
fn better(index: &ClusterIndex<'_>, seed: &mut TieSeed<'_>, a: &Scored, b: &Scored) -> bool {
    if a.score != b.score {
        return a.score > b.score;
    }
    let pod_seed = seed.get();
    let tiebreak = |node: usize| {
        (
            mix64(pod_seed ^ index.name_hash(node)),
            index.name_rank(node),
        )
    };
    tiebreak(a.node) < tiebreak(b.node)
}

/// A pod's tie-break seed, hashed from its name the first time two scores tie.
struct TieSeed<'q> {
    pod: &'q ProtectedPod,
    seed: Option<u64>,
}

impl TieSeed<'_> {
    fn get(&mut self) -> u64 {
        *self.seed.get_or_insert_with(|| pod_seed(self.pod))
    }
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

/// Rejections counted by reason without allocating, turned into [`Rejections`] once.
#[derive(Debug, Default)]
pub(crate) struct RejectionCounts(Vec<(&'static str, usize)>);

impl RejectionCounts {
    pub fn clear(&mut self) {
        self.0.clear();
    }

    fn add(&mut self, reason: &'static str) {
        match self.0.iter_mut().find(|(known, _)| *known == reason) {
            Some((_, count)) => *count += 1,
            None => self.0.push((reason, 1)),
        }
    }

    pub fn into_rejections(self) -> Rejections {
        let mut rejections = Rejections::default();
        for (reason, count) in self.0 {
            *rejections.0.entry(reason.to_string()).or_default() += count;
        }
        rejections
    }
}

/// Buffers that ranking reuses, so that a pass ranking thousands of times allocates once.
#[derive(Debug, Default)]
pub(crate) struct RankBuffers {
    best: Vec<Scored>,
    source_rtt: Vec<(usize, Duration)>,
    special: Vec<usize>,
}

impl RankBuffers {
    /// The nodes kept by the last [`rank_into`], best first.
    pub fn ranked(&self) -> impl Iterator<Item = usize> + '_ {
        self.best.iter().map(|scored| scored.node)
    }
}

/// Ranks `candidates` and keeps the best `keep`, counting every rejection. `available` is each
/// node's free room after the pass's earlier placements.
pub(crate) fn rank(
    index: &ClusterIndex<'_>,
    static_rejections: &StaticRejections,
    available: &[Resources],
    query: &TargetQuery<'_>,
    candidates: impl Iterator<Item = usize>,
    keep: usize,
) -> (Vec<CandidateScore>, Rejections) {
    let mut buffers = RankBuffers::default();
    let mut counts = RejectionCounts::default();
    rank_into(
        index,
        static_rejections,
        available,
        query,
        candidates,
        keep,
        &mut buffers,
        &mut counts,
    );
    let ranked = buffers
        .best
        .iter()
        .map(|scored| CandidateScore {
            node: index.node_name(scored.node).to_string(),
            score: scored.score,
            parts: scored.parts,
        })
        .collect();
    (ranked, counts.into_rejections())
}

/// [`rank`] into reusable buffers: the best `keep` end up in `buffers` (see
/// [`RankBuffers::ranked`]) and the rejections are added to `counts`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rank_into(
    index: &ClusterIndex<'_>,
    static_rejections: &StaticRejections,
    available: &[Resources],
    query: &TargetQuery<'_>,
    candidates: impl Iterator<Item = usize>,
    keep: usize,
    buffers: &mut RankBuffers,
    counts: &mut RejectionCounts,
) {
    let RankBuffers {
        best,
        source_rtt,
        special,
    } = buffers;
    best.clear();
    // One source (the usual case) needs no merging: its own neighbour list is sorted.
    let source_list: &[(usize, Duration)] = match query.data_from {
        [from] => index.neighbours(*from),
        several => {
            source_rtt.clear();
            for &from in several {
                source_rtt.extend_from_slice(index.neighbours(from));
            }
            source_rtt.sort_unstable();
            source_rtt.dedup_by_key(|(peer, _)| *peer);
            source_rtt
        }
    };
    let mut lookups = Lookups {
        source_rtt: SortedCursor::new(source_list),
        user: query.user.map(SortedCursor::new),
        dataset: SortedCursor::new(query.dataset_nodes),
        avoid: SortedCursor::new(query.avoid),
        recently_failed: SortedCursor::new(query.recently_failed),
    };
    let mut seed = TieSeed {
        pod: query.pod,
        seed: None,
    };
    let inverse_weight_sum = Cutoff::weight_sum(query).map(|sum| 1.0 / sum);
    // Most candidates of a long list are plain: not the source, not near it, not near the user,
    // holding neither the dataset nor the checkpoint, not to be avoided. Such a node's score
    // depends on its free room alone, so it is screened with a few comparisons and one estimate
    // (the one `score` would make) before any lookup.
    let mut plain_nodes = match inverse_weight_sum {
        Some(_) if candidates.size_hint().0 >= PLAIN_SCREEN_MIN => {
            special.clear();
            special.push(query.source);
            special.extend_from_slice(query.data_from);
            special.extend(source_list.iter().map(|&(node, _)| node));
            special.extend(query.user.unwrap_or_default().iter().map(|&(node, _)| node));
            special.extend_from_slice(query.dataset_nodes);
            special.extend_from_slice(query.checkpoint_nodes);
            special.extend_from_slice(query.avoid);
            special.extend_from_slice(query.recently_failed);
            special.sort_unstable();
            special.dedup();
            Some(SortedCursor::new(special.as_slice()))
        }
        _ => None,
    };
    for candidate in candidates {
        let verdict = static_rejections.get(candidate);
        if let Some(Some(reason)) = verdict {
            if candidate != query.source {
                counts.add(reason);
            }
            continue;
        }
        // Once the list is full, a candidate must beat its worst entry to get in.
        let cutoff = match (best.len() >= keep, best.last(), inverse_weight_sum) {
            (true, Some(worst), Some(inverse_weight_sum)) => Some(Cutoff {
                worst: worst.score,
                inverse_weight_sum,
            }),
            _ => None,
        };
        if let (Some(plain_nodes), Some(None), Some(&free)) =
            (plain_nodes.as_mut(), verdict, available.get(candidate))
            && plain_nodes.find(candidate).is_none()
        {
            if let Some(short) = free.shortfall(query.pod.requests) {
                counts.add(shortfall_reason(short));
                continue;
            }
            if query.max_user_latency.is_some() {
                counts.add("too far from the user");
                continue;
            }
            let after = free.saturating_sub(query.pod.requests);
            if let (Some(cutoff), Some(free_estimate)) =
                (cutoff, free_estimate(index, candidate, after, query))
            {
                // The other parts are all 0 here, which adds nothing to the weighted sum.
                let weighted = query.policy.targeting.weights.free_resources * free_estimate;
                if cutoff.excludes(weighted) {
                    continue;
                }
            }
        }
        match score(index, candidate, available, query, &mut lookups, cutoff) {
            Ok(Some(scored)) => {
                if best.len() < keep
                    || best
                        .last()
                        .is_some_and(|worst| better(index, &mut seed, &scored, worst))
                {
                    let mut position = best.len();
                    for (at, existing) in best.iter().enumerate() {
                        if better(index, &mut seed, &scored, existing) {
                            position = at;
                            break;
                        }
                    }
                    best.insert(position, scored);
                    best.truncate(keep);
                }
            }
            Ok(None) | Err("is the source") => {}
            Err(reason) => counts.add(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;

    use super::*;
    use crate::fixtures::{SplitMix64, SyntheticCluster};
    use crate::index::ClusterIndex;

    proptest! {
        #[test]
        fn sorted_cursor_answers_like_a_binary_search(
            nodes in proptest::collection::btree_set(0usize..200, 0..40),
            queries in proptest::collection::vec(0usize..220, 0..120),
        ) {
            let list: Vec<usize> = nodes.into_iter().collect();
            let mut cursor = SortedCursor::new(list.as_slice());
            // Mostly ascending, as ranking asks, with the occasional step back.
            let mut sorted = queries.clone();
            sorted.sort_unstable();
            for node in sorted.into_iter().chain(queries) {
                prop_assert_eq!(cursor.find(node).copied(), list.binary_search(&node).ok().map(|_| node));
            }
        }
    }

    /// Kept nodes with their scores' bits, and rejection counts by reason.
    type Ranking = (Vec<(usize, u64)>, Vec<(&'static str, usize)>);

    /// The ranking as it was before the cutoff and the plain-node screen: every qualifying
    /// candidate scored exactly, then kept by [`better`].
    fn exact_ranking(
        index: &ClusterIndex<'_>,
        rejections: &StaticRejections,
        available: &[Resources],
        query: &TargetQuery<'_>,
        candidates: &[usize],
        keep: usize,
    ) -> Ranking {
        let mut merged: Vec<(usize, Duration)> = query
            .data_from
            .iter()
            .flat_map(|&from| index.neighbours(from).iter().copied())
            .collect();
        merged.sort_unstable();
        merged.dedup_by_key(|(node, _)| *node);
        let mut lookups = Lookups {
            source_rtt: SortedCursor::new(merged.as_slice()),
            user: query.user.map(SortedCursor::new),
            dataset: SortedCursor::new(query.dataset_nodes),
            avoid: SortedCursor::new(query.avoid),
            recently_failed: SortedCursor::new(query.recently_failed),
        };
        let mut seed = TieSeed {
            pod: query.pod,
            seed: None,
        };
        let mut best: Vec<Scored> = Vec::new();
        let mut counts = RejectionCounts::default();
        for &candidate in candidates {
            if let Some(Some(reason)) = rejections.get(candidate) {
                if candidate != query.source {
                    counts.add(reason);
                }
                continue;
            }
            match score(index, candidate, available, query, &mut lookups, None) {
                Ok(Some(scored)) => {
                    let position = best
                        .iter()
                        .position(|existing| better(index, &mut seed, &scored, existing))
                        .unwrap_or(best.len());
                    best.insert(position, scored);
                    best.truncate(keep);
                }
                Ok(None) | Err("is the source") => {}
                Err(reason) => counts.add(reason),
            }
        }
        let mut counted = counts.0;
        counted.sort_unstable();
        (
            best.iter()
                .map(|scored| (scored.node, scored.score.to_bits()))
                .collect(),
            counted,
        )
    }

    fn sorted_sample(rng: &mut SplitMix64, nodes: usize, count: u64) -> Vec<usize> {
        let mut sample: Vec<usize> = (0..rng.below(count + 1))
            .map(|_| rng.below(nodes as u64) as usize)
            .collect();
        sample.sort_unstable();
        sample.dedup();
        sample
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The cutoff and the plain-node screen only skip work: the kept nodes, their exact
        /// scores and every rejection count are those of scoring every candidate exactly.
        #[test]
        fn skipping_work_never_changes_a_ranking(seed in any::<u64>()) {
            let mut rng = SplitMix64::new(seed);
            let snapshot = SyntheticCluster {
                seed,
                nodes: 70 + rng.below(130) as usize,
                pods: 400,
                zones: 1 + rng.below(4) as usize,
                failed_nodes: rng.below(4) as usize,
                degraded_nodes: rng.below(4) as usize,
                probes_per_node: rng.below(10) as usize,
                users: 5,
                datasets: 0,
                max_checkpoint_age: 600,
            }
            .build(jiff::Timestamp::UNIX_EPOCH);
            let index = ClusterIndex::new(&snapshot);
            let nodes = snapshot.nodes.len();
            let mut rejections = StaticRejections::default();
            for _ in 0..nodes {
                rejections.push(match rng.below(12) {
                    0 => Some("cordoned"),
                    1 => Some("tainted"),
                    _ => None,
                });
            }
            // A third of the nodes get the same room, so that equal scores (broken by the
            // tie-break, never by the cutoff) are common.
            let available: Vec<Resources> = index
                .free
                .iter()
                .map(|free| match rng.below(3) {
                    0 => Resources::new(16_000, 64 << 30, 0),
                    _ => free.saturating_sub(Resources::new(rng.below(30_000), rng.below(120 << 30), 0)),
                })
                .collect();
            let mut policy = Policy::default();
            let weights = &mut policy.targeting.weights;
            for weight in [
                &mut weights.free_resources,
                &mut weights.source_latency,
                &mut weights.user_latency,
                &mut weights.data_locality,
            ] {
                *weight = [0.0, 0.5, 1.0, 3.0][rng.below(4) as usize];
            }
            weights.free_resources += 0.25;
            let pod = &snapshot.pods[rng.below(snapshot.pods.len() as u64) as usize];
            let source = index.node(&pod.node).unwrap();
            let data_from = if rng.below(3) == 0 { sorted_sample(&mut rng, nodes, 3) } else { vec![source] };
            let user = (rng.below(2) == 0)
                .then(|| index.user(&format!("user-{}", rng.below(5))))
                .flatten()
                .map(|user| index.user_latency(user));
            let dataset_nodes = sorted_sample(&mut rng, nodes, 4);
            let checkpoint_nodes = sorted_sample(&mut rng, nodes, 3);
            let avoid = sorted_sample(&mut rng, nodes, 20);
            let recently_failed = sorted_sample(&mut rng, nodes, 5);
            let query = TargetQuery {
                pod,
                policy: &policy,
                source,
                data_from: &data_from,
                user,
                max_user_latency: (rng.below(4) == 0).then(|| Duration::from_millis(rng.below(80))),
                dataset_nodes: &dataset_nodes,
                dataset_bytes: rng.below(3) << 30,
                checkpoint_nodes: &checkpoint_nodes,
                checkpoint_bytes: rng.below(3) << 30,
                avoid: &avoid,
                recently_failed: &recently_failed,
            };
            let keep = 1 + rng.below(4) as usize;
            // All nodes in order (the screen applies), or a shuffled few (it does not).
            let candidates: Vec<usize> = if rng.below(3) == 0 {
                let mut few = sorted_sample(&mut rng, nodes, 40);
                for at in (1..few.len()).rev() {
                    few.swap(at, rng.below(at as u64 + 1) as usize);
                }
                few
            } else {
                (0..nodes).collect()
            };

            let mut buffers = RankBuffers::default();
            let mut counts = RejectionCounts::default();
            rank_into(&index, &rejections, &available, &query, candidates.iter().copied(), keep, &mut buffers, &mut counts);
            let kept: Vec<(usize, u64)> = buffers.best.iter().map(|scored| (scored.node, scored.score.to_bits())).collect();
            let mut counted = counts.0;
            counted.sort_unstable();
            prop_assert_eq!((kept, counted), exact_ranking(&index, &rejections, &available, &query, &candidates, keep));

            // A list of one: kept exactly when it qualifies.
            for &candidate in candidates.iter().take(20) {
                let mut ignored = RejectionCounts::default();
                rank_into(&index, &rejections, &available, &query, std::iter::once(candidate), keep, &mut buffers, &mut ignored);
                prop_assert_eq!(
                    qualifies(&rejections, &available, &query, candidate),
                    buffers.ranked().next() == Some(candidate)
                );
            }
        }
    }

    #[test]
    fn static_rejections_read_back_as_pushed() {
        let verdicts = [
            None,
            Some("cordoned"),
            Some("tainted"),
            None,
            Some("cordoned"),
        ];
        let mut rejections = StaticRejections::default();
        for verdict in verdicts {
            rejections.push(verdict);
        }
        for (node, verdict) in verdicts.into_iter().enumerate() {
            assert_eq!(rejections.get(node), Some(verdict));
        }
        assert_eq!(rejections.get(verdicts.len()), None, "past the last node");
    }
}
