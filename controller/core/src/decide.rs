//! One decision pass: snapshot, policies and memory in; decisions and new memory out.
//!
//! The pass reads every protected pod once. For each it resolves its annotations and policy,
//! judges its node, and either wants it moved (node failed; a user asked; node degrading or an
//! alert on the pod; its user moved away) or checks whether a checkpoint is due. Moves are then
//! placed in priority order (failed nodes first), each reserving room on its target so two pods
//! never count on the same free memory. Everything the pass does not do that a user might expect
//! (a cooldown, no room anywhere, a dwell time not yet over) is listed in `deferred` with the
//! reason, and everything wrong with the input is listed in `problems`.
//!
//! The pass reads no clock: `now` is an argument. Its only state between passes is
//! [`EngineMemory`] (hysteresis bits and dwell timers), which the caller stores and hands back.
//!
//! It must stay fast at 5,000 nodes and 50,000 pods (docs/benchmarks.md), which is mostly a
//! matter of memory: each pod's strings are separate allocations, so pods are read in batches
//! whose strings are touched first (`warm_*`); whether a checkpoint is due is settled while the
//! pod is in cache; and due checkpoints are built in pod order from small sort keys. None of
//! this may change a decision: the same input gives the same output, byte for byte.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use foldhash::{HashMap, HashMapExt, HashSet};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::annotations::{self, PodSettings};
use crate::health::{self, Assessment, NodeState, Signals};
use crate::index::{ClusterIndex, lookup_sorted};
use crate::migration::Phase;
use crate::model::{ClusterSnapshot, NodeName, PodRef, ProtectedPod, Resources};
use crate::policy::{IntervalSetting, Policy, PolicySet, SelectedBy};
use crate::targeting::{
    self, CandidateScore, RankBuffers, RejectionCounts, Rejections, StaticRejections, TargetQuery,
};
use crate::transfer::{self, FileSpec, LinkEstimate, TransferPlan};
use crate::units::{self, Bytes, format_duration};

/// What the engine remembers between passes. Persist it with the driver's other state; an empty
/// memory is always valid (hysteresis then starts from "not tripped", dwell timers from now).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EngineMemory {
    /// (policy, node) pairs whose latency trigger is tripped.
    #[serde(default)]
    pub latency_degraded: BTreeSet<(String, NodeName)>,
    /// Since when each pod's user has been far from it with a closer node available.
    #[serde(default)]
    pub mobility_since: BTreeMap<String, Timestamp>,
}

/// Why a pod should move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Trigger {
    NodeFailed,
    Manual,
    NodeDegraded,
    Alert,
    Mobility,
}

/// Where the state the replacement resumes from comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum CheckpointSource {
    /// Stop and dump the source now; `base` is the checkpoint an incremental dump builds on.
    Fresh { base: Option<String> },
    /// The source is gone: use the newest stored checkpoint, sent from `from`.
    #[serde(rename_all = "camelCase")]
    Stored {
        id: String,
        from: NodeName,
        taken_at: Timestamp,
        #[serde(with = "units::duration")]
        age: Duration,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    /// No copy of any checkpoint survives: the pod restarts from the beginning.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Payload {
    Checkpoint,
    Dataset,
}

/// One transfer a migration needs, with its plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedTransfer {
    pub payload: Payload,
    pub from: NodeName,
    pub to: NodeName,
    pub bytes: Bytes,
    /// No link between the two nodes was measured; the plan assumes [`ASSUMED_LINK`].
    pub link_assumed: bool,
    pub plan: TransferPlan,
}

/// The link assumed between two nodes that have never probed each other.
pub const ASSUMED_LINK: LinkEstimate = LinkEstimate {
    rtt: Duration::from_millis(10),
    bandwidth_bps: None,
    loss: 0.0,
};

/// Move a pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationDecision {
    pub pod: PodRef,
    pub from: NodeName,
    pub to: NodeName,
    pub trigger: Trigger,
    pub reason: String,
    pub policy: String,
    /// The source node stopped working at this time (failed nodes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<Timestamp>,
    pub checkpoint: CheckpointSource,
    pub transfers: Vec<PlannedTransfer>,
    /// The best candidates, best first: the chosen target and the runners-up.
    pub candidates: Vec<CandidateScore>,
    /// Nodes turned down, by reason.
    pub rejected: Rejections,
}

/// Take a periodic checkpoint of a pod (leaving it running).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointDecision {
    pub pod: PodRef,
    pub node: NodeName,
    pub reason: String,
    pub policy: String,
    pub mode: annotations::CheckpointMode,
    #[serde(with = "units::duration")]
    pub interval: Duration,
    /// Dump only pages changed since this checkpoint (CRIU parent images).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental_on: Option<String>,
    /// Standby nodes to copy the new checkpoint to.
    pub replicate_to: Vec<NodeName>,
}

/// Something the pass wanted to do and did not, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deferred {
    pub pod: PodRef,
    pub trigger: Trigger,
    pub reason: String,
    /// No node could take the pod (capacity, constraints), as opposed to a wait the policy
    /// asks for (cooldown, dwell). Drivers alert on it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_target: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Severity {
    Warning,
    Error,
}

/// Something wrong with the input that a user should fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    pub severity: Severity,
    pub message: String,
}

/// A node that hosts protected pods and is not healthy under their policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: NodeName,
    pub policy: String,
    #[serde(flatten)]
    pub assessment: Assessment,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub nodes: usize,
    pub protected_pods: usize,
    /// Pods in the snapshot whose `protect` annotation is not `true`.
    pub unprotected_pods: usize,
    /// Pods with a migration in flight (left alone this pass).
    pub migrating_pods: usize,
    /// Due periodic checkpoints held back because their node already runs
    /// `checkpoint.maxConcurrentPerNode` of them; they are due again next pass.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoints_postponed: usize,
    pub policies: usize,
}

/// Consecutive failed attempts to move a pod off `node`, counted back from the newest finished
/// migration, and when the newest ended; `None` when the newest succeeded or there is none.
fn failed_attempts_off(
    records: &[&crate::model::MigrationRecord],
    node: &str,
) -> Option<(u32, Timestamp)> {
    let mut finished: Vec<(Timestamp, &crate::model::MigrationRecord)> = records
        .iter()
        .filter_map(|&record| record.finished_at.map(|at| (at, record)))
        .collect();
    finished.sort_by_key(|&(at, _)| at);
    let failed = |record: &crate::model::MigrationRecord| {
        record.source == node
            && matches!(
                record.phase,
                crate::migration::Phase::Failed | crate::migration::Phase::RolledBack
            )
    };
    let attempts = finished
        .iter()
        .rev()
        .take_while(|(_, record)| failed(record))
        .count();
    let last = finished.last().map(|&(at, _)| at)?;
    (attempts > 0).then(|| (u32::try_from(attempts).unwrap_or(u32::MAX), last))
}

/// `retryBackoff` doubled for each failed attempt after the first, at most `retryBackoffMax`.
fn retry_backoff(restore: &crate::policy::RestorePolicy, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    restore
        .retry_backoff
        .saturating_mul(1 << doublings)
        .min(restore.retry_backoff_max)
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

/// The output of one pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decisions {
    pub now: Timestamp,
    pub summary: Summary,
    pub migrations: Vec<MigrationDecision>,
    pub checkpoints: Vec<CheckpointDecision>,
    pub deferred: Vec<Deferred>,
    pub problems: Vec<Problem>,
    pub nodes: Vec<NodeReport>,
}

/// Young/Daly optimal checkpoint interval `sqrt(2 · C · MTBF)` for checkpoint cost `C`.
pub fn young_daly_interval(cost: Duration, mtbf: Duration) -> Duration {
    Duration::from_secs_f64((2.0 * cost.as_secs_f64() * mtbf.as_secs_f64()).sqrt())
}

/// The policy in force for one pod, and per-policy caches.
struct PolicyContext<'p> {
    name: &'p str,
    policy: &'p Policy,
    assessments: Vec<Option<Assessment>>,
    latency_tripped: Vec<Option<bool>>,
    static_rejections: Option<StaticRejections>,
    hosts_pods: Vec<bool>,
}

impl<'p> PolicyContext<'p> {
    fn new(name: &'p str, policy: &'p Policy, nodes: usize) -> Self {
        Self {
            name,
            policy,
            assessments: vec![None; nodes],
            latency_tripped: vec![None; nodes],
            static_rejections: None,
            hosts_pods: vec![false; nodes],
        }
    }

    fn assess(
        &mut self,
        index: &ClusterIndex<'_>,
        memory: &EngineMemory,
        node: usize,
        now: Timestamp,
    ) -> Option<&Assessment> {
        if self.assessments.get(node)?.is_none() {
            let node_ref = index.snapshot.nodes.get(node)?;
            let was = memory
                .latency_degraded
                .contains(&(self.name.to_string(), node_ref.name.clone()));
            let alerts = index
                .node_alerts
                .get(node)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let signals = Signals {
                median_peer_rtt: index.median_peer_rtt.get(node).copied().flatten(),
                alerts,
                latency_was_degraded: was,
                // What the peers' agents said last about answers now: an input like the
                // links, so this pass reads no clock.
                peer_reach: index.peer_reach.get(node).copied().flatten(),
            };
            let (assessment, tripped) = health::assess(node_ref, signals, self.policy, now);
            *self.assessments.get_mut(node)? = Some(assessment);
            *self.latency_tripped.get_mut(node)? = Some(tripped);
        }
        self.assessments.get(node)?.as_ref()
    }

    fn state(
        &mut self,
        index: &ClusterIndex<'_>,
        memory: &EngineMemory,
        node: usize,
        now: Timestamp,
    ) -> NodeState {
        self.assess(index, memory, node, now)
            .map_or(NodeState::Failed, |assessment| assessment.state)
    }

    /// Computes, once per pass, which nodes can never take a pod under this policy.
    fn ensure_static_rejections(
        &mut self,
        index: &ClusterIndex<'_>,
        memory: &EngineMemory,
        now: Timestamp,
    ) {
        if self.static_rejections.is_none() {
            let mut rejections = StaticRejections::default();
            for (position, node) in index.snapshot.nodes.iter().enumerate() {
                let policy = self.policy;
                let reason = match self.assess(index, memory, position, now) {
                    Some(assessment) => targeting::static_rejection(node, assessment, policy),
                    None => Some("not healthy"),
                };
                rejections.push(reason);
            }
            self.static_rejections = Some(rejections);
        }
    }
}

/// A move the pass wants, before a target is chosen.
struct Want {
    trigger: Trigger,
    pod: usize,
    context: usize,
    reason: String,
    pinned: Option<usize>,
    settings: PodSettings,
}

/// A pod that stays where it is and whose periodic checkpoint is due. Whether it is due is
/// settled while the pod is read in the first stage, so that the checkpoint stage touches only
/// these pods.
struct Due {
    pod: usize,
    node: usize,
    context: usize,
    interval: Duration,
    /// The interval is the policy's or the pod's `auto` (the reason explains it).
    auto: bool,
    /// The pod's own settings that a checkpoint decision reads; its user and dataset as keys
    /// into the index, looked up while the pod's annotations are still in cache.
    mode: Option<annotations::CheckpointMode>,
    replicate_to: Option<u32>,
    user: Option<usize>,
    dataset: Option<usize>,
}

/// The Young/Daly derivation of one pod's checkpoint interval.
struct AutoInterval {
    cost: Duration,
    measured: bool,
    mtbf: Duration,
    raw: Duration,
    clamped: bool,
}

/// The checkpoint interval in force for a pod (its annotation, else its policy's), and whether
/// it is `auto`.
fn checkpoint_interval(
    pod: &ProtectedPod,
    settings: &PodSettings,
    policy: &Policy,
) -> (Duration, bool) {
    match settings
        .checkpoint_interval
        .unwrap_or(policy.checkpoint.interval)
    {
        IntervalSetting::Every(interval) => (interval, false),
        IntervalSetting::Auto => (auto_interval(pod, policy).0, true),
    }
}

/// An `auto` checkpoint interval and how it was worked out.
fn auto_interval(pod: &ProtectedPod, policy: &Policy) -> (Duration, AutoInterval) {
    let checkpoint = &policy.checkpoint;
    let measured = pod.last_checkpoint.as_ref().and_then(|c| c.freeze);
    let cost = measured.unwrap_or(checkpoint.estimated_cost);
    let raw = young_daly_interval(cost, checkpoint.mtbf);
    let clamped = raw.clamp(checkpoint.min_interval, checkpoint.max_interval);
    (
        clamped,
        AutoInterval {
            cost,
            measured: measured.is_some(),
            mtbf: checkpoint.mtbf,
            raw,
            clamped: clamped != raw,
        },
    )
}

/// [`format_duration`] texts already written in this pass: checkpoint reasons repeat the same
/// few intervals and ages thousands of times after a controller outage.
#[derive(Debug, Default)]
struct DurationTexts(HashMap<Duration, String>);

impl DurationTexts {
    fn get(&mut self, duration: Duration) -> &str {
        self.0
            .entry(duration)
            .or_insert_with(|| format_duration(duration))
    }
}

/// The ` (auto: …)` note of a checkpoint reason.
struct AutoNote<'n>(&'n AutoInterval);

impl std::fmt::Display for AutoNote<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auto = self.0;
        write!(
            f,
            " (auto: sqrt(2 × {} {} × MTBF {}) = {}{})",
            format_duration(auto.cost),
            if auto.measured {
                "measured cost"
            } else {
                "estimated cost"
            },
            format_duration(auto.mtbf),
            format_duration(auto.raw),
            if auto.clamped {
                ", clamped to the policy's bounds"
            } else {
                ""
            }
        )
    }
}

/// Pods read ahead by the `warm_*` functions.
const WARM_BATCH: usize = 32;

/// The first byte of a string, to make the processor fetch it.
fn first_byte(text: &str) -> u8 {
    text.as_bytes().first().copied().unwrap_or(0)
}

/// Reads the first byte of every string that classifying `pods` reads (the node, the annotations,
/// and the namespace and name when they are looked up: `keyed`), and nothing else.
///
/// Each string of a pod is an allocation of its own, so handling one pod waits on a handful of
/// cache misses, one after another: over 50,000 pods that was most of the pass. This loop does no
/// work between the loads, so the processor has many of them in flight at once, and the work that
/// follows finds the data in cache. (Plain loops: iterator chains here measured slower.)
fn warm_for_classify(pods: &[ProtectedPod], keyed: bool) {
    let mut touched = 0u8;
    for pod in pods {
        touched ^= first_byte(&pod.node);
        if keyed {
            touched ^= first_byte(&pod.namespace) ^ first_byte(&pod.name);
        }
        for (key, value) in &pod.annotations {
            touched ^= first_byte(key) ^ first_byte(value);
        }
    }
    std::hint::black_box(touched);
}

/// [`warm_for_classify`] for the strings that order checkpoint decisions: namespace and name.
fn warm_identities<'p>(pods: impl Iterator<Item = &'p ProtectedPod>) {
    let mut touched = 0u8;
    for pod in pods {
        touched ^= first_byte(&pod.namespace) ^ first_byte(&pod.name);
    }
    std::hint::black_box(touched);
}

/// [`warm_for_classify`] for the strings a checkpoint decision copies: the pod's identity and
/// node, its last checkpoint's id and holders.
fn warm_for_checkpoints<'p>(pods: impl Iterator<Item = &'p ProtectedPod>) {
    let mut touched = 0u8;
    for pod in pods {
        touched ^= first_byte(&pod.namespace) ^ first_byte(&pod.name) ^ first_byte(&pod.node);
        if let Some(checkpoint) = &pod.last_checkpoint {
            touched ^= first_byte(&checkpoint.id);
            for holder in &checkpoint.held_on {
                touched ^= first_byte(holder);
            }
        }
    }
    std::hint::black_box(touched);
}

/// A name's first 16 bytes as a number, zero-padded: comparing two of them orders names as
/// comparing the names does, except that equal prefixes need the names to decide.
fn name_prefix(name: &str) -> u128 {
    let mut bytes = [0u8; 16];
    for (slot, byte) in bytes.iter_mut().zip(name.bytes()) {
        *slot = byte;
    }
    u128::from_be_bytes(bytes)
}

/// Runs one decision pass. Same inputs, same outputs.
pub fn decide(
    snapshot: &ClusterSnapshot,
    policies: &PolicySet,
    memory: &EngineMemory,
    now: Timestamp,
) -> (Decisions, EngineMemory) {
    let span = tracing::debug_span!(
        "decide",
        nodes = snapshot.nodes.len(),
        pods = snapshot.pods.len()
    );
    let _entered = span.enter();
    let mut pass = Pass::new(snapshot, policies, memory, now);
    pass.classify();
    pass.place_migrations();
    pass.plan_checkpoints();
    pass.finish()
}

struct Pass<'a> {
    index: ClusterIndex<'a>,
    policies: &'a PolicySet,
    memory: &'a EngineMemory,
    now: Timestamp,
    contexts: Vec<PolicyContext<'a>>,
    context_by_name: HashMap<&'a str, usize>,
    last_context: Option<(&'a str, usize)>,
    /// File lists of the datasets planned for so far in this pass.
    dataset_files: HashMap<usize, Vec<FileSpec>>,
    /// What this pass's placements have taken from each node.
    reserved: Vec<Resources>,
    /// Each node's free room less `reserved`, as ranking reads it.
    available: Vec<Resources>,
    /// Per anti-affinity label key: label value → nodes hosting such a pod (sorted).
    anti_affinity: HashMap<String, HashMap<String, Vec<usize>>>,
    wants: Vec<Want>,
    due: Vec<Due>,
    /// Per node: protected pods whose checkpoint is in progress.
    checkpoints_running: Vec<u32>,
    rank_buffers: RankBuffers,
    /// Scratch list of node positions, reused by every standby choice.
    scratch_nodes: Vec<usize>,
    scratch_counts: RejectionCounts,
    new_mobility: BTreeMap<String, Timestamp>,
    decisions: Decisions,
}

impl<'a> Pass<'a> {
    fn new(
        snapshot: &'a ClusterSnapshot,
        policies: &'a PolicySet,
        memory: &'a EngineMemory,
        now: Timestamp,
    ) -> Self {
        let index = ClusterIndex::new(snapshot);
        let available = index.free.clone();
        Self {
            index,
            policies,
            memory,
            now,
            contexts: Vec::new(),
            context_by_name: HashMap::new(),
            last_context: None,
            dataset_files: HashMap::new(),
            reserved: vec![Resources::default(); snapshot.nodes.len()],
            available,
            anti_affinity: HashMap::new(),
            wants: Vec::new(),
            due: Vec::new(),
            checkpoints_running: vec![0; snapshot.nodes.len()],
            rank_buffers: RankBuffers::default(),
            scratch_nodes: Vec::new(),
            scratch_counts: RejectionCounts::default(),
            new_mobility: BTreeMap::new(),
            decisions: Decisions {
                now,
                summary: Summary {
                    nodes: snapshot.nodes.len(),
                    policies: policies.len(),
                    ..Summary::default()
                },
                migrations: Vec::new(),
                checkpoints: Vec::new(),
                deferred: Vec::new(),
                problems: Vec::new(),
                nodes: Vec::new(),
            },
        }
    }

    fn problem(&mut self, pod: Option<PodRef>, severity: Severity, message: String) {
        self.decisions.problems.push(Problem {
            pod,
            severity,
            message,
        });
    }

    fn defer(&mut self, pod: &ProtectedPod, trigger: Trigger, reason: String) {
        self.defer_with(pod, trigger, reason, false);
    }

    fn defer_with(
        &mut self,
        pod: &ProtectedPod,
        trigger: Trigger,
        reason: String,
        no_target: bool,
    ) {
        tracing::debug!(pod = %pod.pod_ref(), ?trigger, %reason, no_target, "deferred");
        self.decisions.deferred.push(Deferred {
            pod: pod.pod_ref(),
            trigger,
            reason,
            no_target,
        });
    }

    fn context_for(&mut self, name: &'a str, policy: &'a Policy) -> usize {
        // Consecutive pods mostly share a policy: the same name, the same string.
        if let Some((last, position)) = self.last_context
            && std::ptr::eq(last, name)
        {
            return position;
        }
        if let Some(&position) = self.context_by_name.get(name) {
            self.last_context = Some((name, position));
            return position;
        }
        let position = self.contexts.len();
        self.contexts.push(PolicyContext::new(
            name,
            policy,
            self.index.snapshot.nodes.len(),
        ));
        self.context_by_name.insert(name, position);
        self.last_context = Some((name, position));
        position
    }

    /// Stage 1: read every pod, judge its node, collect wanted moves.
    fn classify(&mut self) {
        // Pods are independent of each other in this stage, so snapshot order is fine; the
        // outputs are sorted in `finish` so they never depend on it.
        let snapshot = self.index.snapshot;
        // A pod's namespace and name are read to look up its migrations, requests and alerts.
        let keyed = !(self.index.migrations.is_empty()
            && self.index.requests.is_empty()
            && self.index.pod_alerts.is_empty());
        let mut pod_index = 0;
        for batch in snapshot.pods.chunks(WARM_BATCH) {
            warm_for_classify(batch, keyed);
            for pod in batch {
                self.classify_pod(pod_index, pod);
                pod_index += 1;
            }
        }
    }

    fn classify_pod(&mut self, pod_index: usize, pod: &'a ProtectedPod) {
        let (mut settings, errors) =
            annotations::parse(&pod.namespace, &pod.name, &pod.annotations);
        let pod_ref = || pod.pod_ref();
        for error in errors {
            self.problem(Some(pod_ref()), Severity::Error, error.to_string());
        }
        if !settings.protect {
            self.decisions.summary.unprotected_pods += 1;
            return;
        }
        self.decisions.summary.protected_pods += 1;
        let Some(node) = self.index.node(&pod.node) else {
            self.problem(
                Some(pod_ref()),
                Severity::Error,
                format!("bound to node `{}`, which is not in the snapshot", pod.node),
            );
            return;
        };
        if pod.checkpoint_in_progress
            && let Some(running) = self.checkpoints_running.get_mut(node)
        {
            *running += 1;
        }
        let (policy_name, policy, selected_by, note) =
            self.policies.select(pod, settings.policy.as_deref());
        if let Some(note) = note {
            let severity = if selected_by == SelectedBy::Fallback {
                Severity::Error
            } else {
                Severity::Warning
            };
            self.problem(Some(pod_ref()), severity, note);
        }
        // A pod's own interval obeys its policy's bounds, as the policy's interval does.
        if let Some(interval) = settings.checkpoint_interval
            && let Err(reason) = policy.checkpoint.check_interval(interval)
        {
            self.problem(
                Some(pod_ref()),
                Severity::Error,
                format!(
                    "pod {}/{}: annotation {}: {reason} of policy `{policy_name}`; the policy's interval applies",
                    pod.namespace,
                    pod.name,
                    annotations::CHECKPOINT_INTERVAL
                ),
            );
            settings.checkpoint_interval = None;
        }
        let context = self.context_for(policy_name, policy);
        let key = (pod.namespace.as_str(), pod.name.as_str());

        let records = self
            .index
            .migrations
            .get(&key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if records.iter().any(|record| !record.phase.is_terminal()) {
            self.decisions.summary.migrating_pods += 1;
            return;
        }
        let last_finished = records.iter().filter_map(|record| record.finished_at).max();
        let cooldown = settings.cooldown.unwrap_or(policy.triggers.cooldown);
        let cooling_until = last_finished
            .map(|finished| units::after(finished, cooldown))
            .filter(|until| *until > self.now);

        let (memory, now) = (self.memory, self.now);
        let ctx = &mut self.contexts[context];
        if let Some(flag) = ctx.hosts_pods.get_mut(node) {
            *flag = true;
        }
        let Some(assessment) = ctx.assess(&self.index, memory, node, now) else {
            return;
        };
        let state = assessment.state;
        // Reasons are only spelt out for nodes that are not healthy: most pods' are.
        let reasons = match state {
            NodeState::Failed | NodeState::Degraded => assessment.reasons.join("; "),
            NodeState::Healthy | NodeState::Suspect => String::new(),
        };
        let pinned_request = self.index.requests.get(&key).copied();

        let want = |trigger: Trigger, reason: String, pinned: Option<usize>| Want {
            trigger,
            pod: pod_index,
            context,
            reason,
            pinned,
            settings: PodSettings::default(),
        };
        let pinned = match pinned_request.and_then(|request| request.target.as_deref()) {
            Some(target) => match self.index.node(target) {
                Some(position) => Some(position),
                None => {
                    let message = format!(
                        "migration requested to node `{target}`, which is not in the snapshot"
                    );
                    self.problem(Some(pod_ref()), Severity::Error, message);
                    return;
                }
            },
            None => None,
        };
        let retry_wait = failed_attempts_off(records, &pod.node).and_then(|(attempts, last)| {
            let until = units::after(last, retry_backoff(&policy.restore, attempts));
            (until > now).then(|| {
                format!(
                    "the last {} failed; retrying in {}",
                    if attempts == 1 {
                        "attempt".to_string()
                    } else {
                        format!("{attempts} attempts")
                    },
                    format_duration(units::age(until, now))
                )
            })
        });
        let cooldown_reason = |until: Timestamp| {
            format!(
                "in cooldown for {} more (last migration ended {} ago)",
                format_duration(units::age(until, now)),
                format_duration(units::age(now, last_finished.unwrap_or(now)))
            )
        };

        let wanted = match state {
            NodeState::Failed => match retry_wait {
                Some(wait) => {
                    self.defer(
                        pod,
                        Trigger::NodeFailed,
                        format!("node {} failed ({reasons}), but {wait}", pod.node),
                    );
                    None
                }
                None => Some(want(
                    Trigger::NodeFailed,
                    format!("node {} failed: {reasons}", pod.node),
                    pinned,
                )),
            },
            _ if pinned_request.is_some() => match retry_wait {
                Some(wait) => {
                    self.defer(
                        pod,
                        Trigger::Manual,
                        format!("requested by a user, but {wait}"),
                    );
                    None
                }
                None => Some(want(Trigger::Manual, "requested by a user".into(), pinned)),
            },
            NodeState::Degraded => match cooling_until {
                Some(until) => {
                    self.defer(
                        pod,
                        Trigger::NodeDegraded,
                        format!(
                            "node {} is degrading ({reasons}), but {}",
                            pod.node,
                            cooldown_reason(until)
                        ),
                    );
                    None
                }
                None => Some(want(
                    Trigger::NodeDegraded,
                    format!("node {} is degrading: {reasons}", pod.node),
                    None,
                )),
            },
            NodeState::Suspect => None,
            NodeState::Healthy => {
                let alert = self.index.pod_alerts.get(&key).and_then(|alerts| {
                    alerts
                        .iter()
                        .find(|alert| policy.triggers.alerts.contains(&alert.name))
                });
                match (alert, cooling_until) {
                    (Some(alert), Some(until)) => {
                        self.defer(
                            pod,
                            Trigger::Alert,
                            format!(
                                "alert {} is firing, but {}",
                                alert.name,
                                cooldown_reason(until)
                            ),
                        );
                        None
                    }
                    (Some(alert), None) => Some(want(
                        Trigger::Alert,
                        format!("alert {} is firing for the pod", alert.name),
                        None,
                    )),
                    (None, _) => self
                        .mobility(
                            pod,
                            node,
                            policy,
                            &settings,
                            cooling_until.map(cooldown_reason),
                        )
                        .map(|reason| want(Trigger::Mobility, reason, None)),
                }
            }
        };

        match wanted {
            Some(mut wanted) => {
                wanted.settings = settings;
                self.wants.push(wanted);
            }
            None if matches!(state, NodeState::Healthy | NodeState::Degraded)
                && !pod.checkpoint_in_progress =>
            {
                let (interval, auto) = checkpoint_interval(pod, &settings, policy);
                let last_taken_at = pod.last_checkpoint.as_ref().map(|last| last.taken_at);
                if crate::driver::periodic::is_due(now, last_taken_at, interval) {
                    self.due.push(Due {
                        pod: pod_index,
                        node,
                        context,
                        interval,
                        auto,
                        mode: settings.mode,
                        replicate_to: settings.replicate_to,
                        user: settings
                            .user
                            .as_deref()
                            .and_then(|user| self.index.user(user)),
                        dataset: settings
                            .dataset
                            .as_ref()
                            .and_then(|dataset| self.index.dataset(&dataset.id())),
                    });
                }
            }
            None => {}
        }
    }

    /// Whether the pod should follow its user now; keeps the dwell timer.
    fn mobility(
        &mut self,
        pod: &ProtectedPod,
        node: usize,
        policy: &Policy,
        settings: &PodSettings,
        cooldown: Option<String>,
    ) -> Option<String> {
        let mobility = policy.triggers.mobility?;
        let user = settings.user.as_deref()?;
        let list = self.index.user_latency(self.index.user(user)?);
        let current = lookup_sorted(list, node)?;
        let closer_exists = list
            .iter()
            .any(|&(other, latency)| other != node && latency <= mobility.clear_below());
        if current <= mobility.threshold || !closer_exists {
            return None;
        }
        let key = pod.pod_ref().to_string();
        let since = self
            .memory
            .mobility_since
            .get(&key)
            .copied()
            .unwrap_or(self.now);
        self.new_mobility.insert(key, since);
        let waited = units::age(self.now, since);
        let far = format!(
            "user {user} is {} from node {} (threshold {}), a node within {} exists",
            format_duration(current),
            pod.node,
            format_duration(mobility.threshold),
            format_duration(mobility.clear_below())
        );
        if waited < mobility.dwell {
            self.defer(
                pod,
                Trigger::Mobility,
                format!(
                    "{far}; waiting out the dwell time ({} of {})",
                    format_duration(waited),
                    format_duration(mobility.dwell)
                ),
            );
            return None;
        }
        if let Some(cooldown) = cooldown {
            self.defer(pod, Trigger::Mobility, format!("{far}, but {cooldown}"));
            return None;
        }
        Some(format!("{far} for {}", format_duration(waited)))
    }

    /// The nodes hosting a pod with the same anti-affinity label value (sorted).
    fn avoid_list(&mut self, label_key: &str, value: &str) -> Vec<usize> {
        let snapshot = self.index.snapshot;
        let index = &self.index;
        let by_value = self
            .anti_affinity
            .entry(label_key.to_string())
            .or_insert_with(|| {
                let mut map: HashMap<String, Vec<usize>> = HashMap::new();
                for pod in &snapshot.pods {
                    if let (Some(value), Some(node)) =
                        (pod.labels.get(label_key), index.node(&pod.node))
                    {
                        map.entry(value.clone()).or_default().push(node);
                    }
                }
                for nodes in map.values_mut() {
                    nodes.sort_unstable();
                    nodes.dedup();
                }
                map
            });
        by_value.get(value).cloned().unwrap_or_default()
    }

    fn record_placement(&mut self, label_key: Option<&str>, value: Option<&String>, target: usize) {
        if let (Some(key), Some(value)) = (label_key, value)
            && let Some(map) = self.anti_affinity.get_mut(key)
        {
            let nodes = map.entry(value.clone()).or_default();
            if let Err(position) = nodes.binary_search(&target) {
                nodes.insert(position, target);
            }
        }
    }

    /// Nodes (not failed under the policy) from a list of names.
    fn alive_nodes(&mut self, context: usize, names: &[NodeName]) -> Vec<usize> {
        let (memory, now) = (self.memory, self.now);
        let mut alive: Vec<usize> = names
            .iter()
            .filter_map(|name| self.index.node(name))
            .filter(|&node| {
                self.contexts[context].state(&self.index, memory, node, now) != NodeState::Failed
            })
            .collect();
        alive.sort_unstable();
        alive.dedup();
        alive
    }

    /// Stage 2: choose targets, most urgent first.
    fn place_migrations(&mut self) {
        let mut wants = std::mem::take(&mut self.wants);
        let snapshot = self.index.snapshot;
        wants.sort_by(|a, b| {
            let (pa, pb) = (&snapshot.pods[a.pod], &snapshot.pods[b.pod]);
            (a.trigger, &pa.namespace, &pa.name).cmp(&(b.trigger, &pb.namespace, &pb.name))
        });
        for want in wants {
            self.place(want);
        }
    }

    fn place(&mut self, want: Want) {
        let snapshot = self.index.snapshot;
        let Some(pod) = snapshot.pods.get(want.pod) else {
            return;
        };
        let Some(source) = self.index.node(&pod.node) else {
            return;
        };
        let settings = &want.settings;
        let (memory, now) = (self.memory, self.now);
        let policy = self.contexts[want.context].policy;
        let policy_name = self.contexts[want.context].name;
        let source_assessment = self.contexts[want.context]
            .assess(&self.index, memory, source, now)
            .cloned();
        let source_alive = source_assessment
            .as_ref()
            .is_some_and(|a| a.state != NodeState::Failed);

        let checkpoint_nodes = pod
            .last_checkpoint
            .as_ref()
            .map(|checkpoint| self.alive_nodes(want.context, &checkpoint.held_on))
            .unwrap_or_default();
        let checkpoint_bytes = pod
            .last_checkpoint
            .as_ref()
            .map_or(pod.requests.memory.0, |checkpoint| checkpoint.size.0);
        let data_from: Vec<usize> = if source_alive {
            vec![source]
        } else {
            checkpoint_nodes.clone()
        };

        let dataset_key = settings
            .dataset
            .as_ref()
            .and_then(|dataset| self.index.dataset(&dataset.id()));
        let dataset = dataset_key
            .and_then(|key| self.index.dataset_holders(key))
            .map(|(dataset, _)| dataset);
        let dataset_nodes = match dataset {
            Some(dataset) => self.alive_nodes(want.context, &dataset.present_on),
            None => Vec::new(),
        };
        let dataset_bytes = dataset.map_or(0, |dataset| dataset.total_bytes.0);

        let label_key = policy.targeting.anti_affinity_label.as_deref();
        let label_value = label_key.and_then(|key| pod.labels.get(key));
        let avoid = match (label_key, label_value) {
            (Some(key), Some(value)) => self.avoid_list(key, value),
            _ => Vec::new(),
        };

        // Targets of this pod's failed attempts within `retryBackoffMax`: a disk that filled
        // up or a runtime that refused the restore would likely refuse it again.
        let mut recently_failed: Vec<usize> = self
            .index
            .migrations
            .get(&(pod.namespace.as_str(), pod.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|record| {
                matches!(record.phase, Phase::Failed | Phase::RolledBack)
                    && record.finished_at.is_some_and(|finished| {
                        units::age(now, finished) < policy.restore.retry_backoff_max
                    })
            })
            .filter_map(|record| record.target.as_deref())
            .filter_map(|target| self.index.node(target))
            .collect();
        recently_failed.sort_unstable();
        recently_failed.dedup();

        let user = settings
            .user
            .as_deref()
            .and_then(|user| self.index.user(user))
            .map(|user| self.index.user_latency(user));
        let max_user_latency = (want.trigger == Trigger::Mobility)
            .then(|| {
                policy
                    .triggers
                    .mobility
                    .map(|mobility| mobility.clear_below())
            })
            .flatten();
        let query = TargetQuery {
            pod,
            policy,
            source,
            data_from: &data_from,
            user,
            max_user_latency,
            dataset_nodes: &dataset_nodes,
            dataset_bytes,
            checkpoint_nodes: &checkpoint_nodes,
            checkpoint_bytes,
            avoid: &avoid,
            // A user who named the target gets that node, failed before or not.
            recently_failed: if want.pinned.is_some() {
                &[]
            } else {
                &recently_failed
            },
        };
        self.contexts[want.context].ensure_static_rejections(&self.index, memory, now);
        let rejections = self.contexts[want.context]
            .static_rejections
            .as_ref()
            .unwrap_or(&targeting::NO_STATIC_REJECTIONS);
        let (index, available) = (&self.index, self.available.as_slice());
        let (considered, (ranked, rejected)) = match (want.pinned, want.trigger, user) {
            (Some(pinned), _, _) => (
                usize::from(pinned != source),
                targeting::rank(
                    index,
                    rejections,
                    available,
                    &query,
                    std::iter::once(pinned),
                    3,
                ),
            ),
            (None, Trigger::Mobility, Some(user)) => (
                user.iter().filter(|&&(node, _)| node != source).count(),
                targeting::rank(
                    index,
                    rejections,
                    available,
                    &query,
                    user.iter().map(|&(node, _)| node),
                    3,
                ),
            ),
            _ => {
                let all = 0..snapshot.nodes.len();
                (
                    all.len() - usize::from(all.contains(&source)),
                    targeting::rank(index, rejections, available, &query, all, 3),
                )
            }
        };

        let Some(best) = ranked.first() else {
            let reason = if considered == 0 {
                "no candidate node".to_string()
            } else {
                format!("no node can take it: of {considered} considered, {rejected}")
            };
            self.defer_with(
                pod,
                want.trigger,
                format!("{}; {reason}", want.reason),
                true,
            );
            return;
        };
        let Some(target) = self.index.node(&best.node) else {
            return;
        };
        if let Some(reserved) = self.reserved.get_mut(target) {
            *reserved = reserved.saturating_add(pod.requests);
            if let (Some(available), Some(free)) =
                (self.available.get_mut(target), self.index.free.get(target))
            {
                *available = free.saturating_sub(*reserved);
            }
        }
        self.record_placement(label_key, label_value, target);

        let checkpoint = if source_alive {
            CheckpointSource::Fresh {
                base: pod
                    .last_checkpoint
                    .as_ref()
                    .filter(|checkpoint| {
                        policy.checkpoint.incremental && checkpoint.held_on.contains(&pod.node)
                    })
                    .map(|checkpoint| checkpoint.id.clone()),
            }
        } else {
            match (
                &pod.last_checkpoint,
                self.nearest(&checkpoint_nodes, target),
            ) {
                (Some(checkpoint), Some(from)) => CheckpointSource::Stored {
                    id: checkpoint.id.clone(),
                    from: self.index.node_name(from).to_string(),
                    taken_at: checkpoint.taken_at,
                    age: units::age(now, checkpoint.taken_at),
                    epoch: checkpoint.epoch,
                },
                _ => CheckpointSource::None,
            }
        };

        let mut reason = want.reason;
        let mut transfers = Vec::new();
        let checkpoint_from = match &checkpoint {
            CheckpointSource::Fresh { .. } => Some(source),
            CheckpointSource::Stored { from, .. } => self.index.node(from),
            CheckpointSource::None => {
                reason.push_str(
                    "; no stored checkpoint survives, so the pod restarts from the beginning",
                );
                None
            }
        };
        if let Some(from) = checkpoint_from.filter(|&from| from != target) {
            let files = [FileSpec {
                path: "checkpoint".into(),
                size: checkpoint_bytes,
            }];
            transfers.extend(self.plan(pod, policy, Payload::Checkpoint, from, target, &files));
        }
        if let (Some(dataset), Some(key)) = (dataset, dataset_key) {
            if dataset_nodes.binary_search(&target).is_err() {
                match self.nearest(&dataset_nodes, target) {
                    Some(from) => {
                        // Pods sharing a dataset share its file list (one entry per file).
                        let files = self
                            .dataset_files
                            .remove(&key)
                            .unwrap_or_else(|| dataset.file_specs());
                        transfers.extend(self.plan(
                            pod,
                            policy,
                            Payload::Dataset,
                            from,
                            target,
                            &files,
                        ));
                        self.dataset_files.insert(key, files);
                    }
                    None => reason.push_str(&format!(
                        "; dataset {} has no surviving copy, the pod must fetch it again",
                        dataset.id
                    )),
                }
            }
        } else if let Some(annotations::DatasetRef::Path(path)) = &settings.dataset
            && !source_alive
        {
            // A live source still holds the dataset and the controller copies it from there;
            // only a dead source leaves the pod without it.
            self.problem(
                Some(pod.pod_ref()),
                Severity::Warning,
                format!(
                    "dataset {path} is not reported by any agent; it will not be moved with the pod"
                ),
            );
        }

        tracing::debug!(pod = %pod.pod_ref(), from = %pod.node, to = %best.node, trigger = ?want.trigger, "migrate");
        self.decisions.migrations.push(MigrationDecision {
            pod: pod.pod_ref(),
            from: pod.node.clone(),
            to: best.node.clone(),
            trigger: want.trigger,
            reason,
            policy: policy_name.to_string(),
            failed_at: source_assessment.and_then(|assessment| assessment.failed_at),
            checkpoint,
            transfers,
            candidates: ranked,
            rejected,
        });
    }

    /// The node in `from` with the lowest measured RTT to `to` (ties and unknowns by name).
    fn nearest(&self, from: &[usize], to: usize) -> Option<usize> {
        if from.contains(&to) {
            return Some(to);
        }
        from.iter().copied().min_by_key(|&node| {
            (
                self.index.rtt(node, to).unwrap_or(Duration::MAX),
                self.index.name_rank(node),
            )
        })
    }

    fn plan(
        &mut self,
        pod: &ProtectedPod,
        policy: &Policy,
        payload: Payload,
        from: usize,
        to: usize,
        files: &[FileSpec],
    ) -> Option<PlannedTransfer> {
        let link = self.index.link(from, to);
        let estimate = link.map_or(ASSUMED_LINK, |link| LinkEstimate {
            rtt: link.rtt,
            bandwidth_bps: link.bandwidth.map(|rate| rate.0),
            loss: link.loss,
        });
        match transfer::plan_transfer(files, &estimate, &policy.transfer.settings()) {
            Ok(plan) => Some(PlannedTransfer {
                payload,
                from: self.index.node_name(from).to_string(),
                to: self.index.node_name(to).to_string(),
                bytes: Bytes(plan.total_bytes),
                link_assumed: link.is_none(),
                plan,
            }),
            Err(error) => {
                self.problem(
                    Some(pod.pod_ref()),
                    Severity::Error,
                    format!("cannot plan the {payload:?} transfer: {error}"),
                );
                None
            }
        }
    }

    /// Stage 3: periodic checkpoints for the pods that stay and are due.
    fn plan_checkpoints(&mut self) {
        let due = std::mem::take(&mut self.due);
        let due = self.limit_per_node(due);
        let snapshot = self.index.snapshot;
        // Decisions come out in pod order. After a controller outage there are tens of
        // thousands: sorting small keys and building the decisions in that order costs far less
        // than sorting the decisions. Keys compare as numbers where they can: a namespace by its
        // rank among the (few) namespaces, a name by its first 16 bytes; the whole name only
        // breaks a tie there.
        let mut namespaces: HashMap<&str, u32> = HashMap::new();
        let mut keys: Vec<(u32, u128, &str, usize)> = Vec::with_capacity(due.len());
        for (start, batch) in (0..).step_by(WARM_BATCH).zip(due.chunks(WARM_BATCH)) {
            let pods = || batch.iter().filter_map(|due| snapshot.pods.get(due.pod));
            warm_identities(pods());
            for (position, pod) in (start..).zip(pods()) {
                let next = u32::try_from(namespaces.len()).unwrap_or(u32::MAX);
                let namespace = *namespaces.entry(pod.namespace.as_str()).or_insert(next);
                keys.push((
                    namespace,
                    name_prefix(&pod.name),
                    pod.name.as_str(),
                    position,
                ));
            }
        }
        let mut by_name: Vec<(&str, u32)> = namespaces.into_iter().collect();
        by_name.sort_unstable();
        let mut rank = vec![0u32; by_name.len()];
        for (position, &(_, first_seen)) in (0u32..).zip(&by_name) {
            if let Some(slot) = rank.get_mut(first_seen as usize) {
                *slot = position;
            }
        }
        for key in &mut keys {
            key.0 = rank.get(key.0 as usize).copied().unwrap_or(u32::MAX);
        }
        keys.sort_unstable();
        let unique = keys
            .windows(2)
            .all(|pair| matches!(pair, [a, b] if (a.0, a.2) != (b.0, b.2)));
        let mut texts = DurationTexts::default();
        if unique {
            self.decisions.checkpoints.reserve(keys.len());
            for batch in keys.chunks(WARM_BATCH) {
                let dues = || {
                    batch
                        .iter()
                        .filter_map(|&(_, _, _, position)| due.get(position))
                };
                warm_for_checkpoints(dues().filter_map(|due| snapshot.pods.get(due.pod)));
                for due in dues() {
                    if let Some(decision) = self.plan_checkpoint(due, &mut texts) {
                        self.decisions.checkpoints.push(decision);
                    }
                }
            }
        } else {
            // A pod listed twice (an invalid snapshot): the order its entries always had.
            for due in &due {
                if let Some(decision) = self.plan_checkpoint(due, &mut texts) {
                    self.decisions.checkpoints.push(decision);
                }
            }
            self.decisions
                .checkpoints
                .sort_unstable_by(|a, b| a.pod.cmp(&b.pod));
        }
    }

    /// Keeps, per node, as many due checkpoints as the pods' `checkpoint.maxConcurrentPerNode`
    /// allows next to those already running there, the most overdue first (no checkpoint yet
    /// counts as most overdue; then age over interval; then pod order). Returns the kept ones in
    /// their original order.
    fn limit_per_node(&mut self, due: Vec<Due>) -> Vec<Due> {
        let snapshot = self.index.snapshot;
        let cap = |due: &Due| {
            self.contexts.get(due.context).map_or(u32::MAX, |context| {
                context.policy.checkpoint.max_concurrent_per_node
            })
        };
        let mut wanted = vec![0u32; self.checkpoints_running.len()];
        for entry in &due {
            if let Some(count) = wanted.get_mut(entry.node) {
                *count += 1;
            }
        }
        let running = |node: usize| self.checkpoints_running.get(node).copied().unwrap_or(0);
        let crowded = due.iter().any(|entry| {
            running(entry.node).saturating_add(wanted.get(entry.node).copied().unwrap_or(0))
                > cap(entry)
        });
        if !crowded {
            return due;
        }
        // Overdue as age / interval, compared by cross-multiplying whole nanoseconds.
        let age = |entry: &Due| {
            snapshot
                .pods
                .get(entry.pod)
                .and_then(|pod| pod.last_checkpoint.as_ref())
                .map(|last| units::age(self.now, last.taken_at).as_nanos())
        };
        let mut order: Vec<usize> = (0..due.len()).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (&due[a], &due[b]);
            x.node.cmp(&y.node).then_with(|| {
                let more_overdue = match (age(x), age(y)) {
                    (None, None) => std::cmp::Ordering::Equal,
                    (None, Some(_)) => std::cmp::Ordering::Less,
                    (Some(_), None) => std::cmp::Ordering::Greater,
                    (Some(ax), Some(ay)) => (ay.saturating_mul(x.interval.as_nanos()))
                        .cmp(&ax.saturating_mul(y.interval.as_nanos())),
                };
                // Then by pod, not by position, so the input's order never matters.
                more_overdue.then_with(|| {
                    let pod = |entry: &Due| {
                        snapshot
                            .pods
                            .get(entry.pod)
                            .map(|pod| (pod.namespace.as_str(), pod.name.as_str()))
                    };
                    pod(x).cmp(&pod(y))
                })
            })
        });
        let due_count = due.len();
        let mut started = vec![0u32; self.checkpoints_running.len()];
        let mut keep = vec![false; due.len()];
        for position in order {
            let entry = &due[position];
            let Some(count) = started.get_mut(entry.node) else {
                continue;
            };
            if running(entry.node).saturating_add(*count) < cap(entry) {
                *count += 1;
                keep[position] = true;
            }
        }
        let kept: Vec<Due> = due
            .into_iter()
            .zip(keep)
            .filter_map(|(entry, keep)| keep.then_some(entry))
            .collect();
        self.decisions.summary.checkpoints_postponed = due_count.saturating_sub(kept.len());
        kept
    }

    fn plan_checkpoint(
        &mut self,
        due: &Due,
        texts: &mut DurationTexts,
    ) -> Option<CheckpointDecision> {
        let snapshot = self.index.snapshot;
        let pod = snapshot.pods.get(due.pod)?;
        let policy = self.contexts[due.context].policy;
        let checkpoint = &policy.checkpoint;
        let interval = due.interval;
        let mut reason = String::with_capacity(96);
        match &pod.last_checkpoint {
            None => reason.push_str("no checkpoint yet; interval "),
            Some(last) => {
                reason.push_str("last checkpoint ");
                reason.push_str(&last.id);
                reason.push_str(" is ");
                reason.push_str(texts.get(units::age(self.now, last.taken_at)));
                reason.push_str(" old; interval ");
            }
        }
        reason.push_str(texts.get(interval));
        if due.auto {
            let (_, auto) = auto_interval(pod, policy);
            // Writing to a String cannot fail.
            let _ = write!(reason, "{}", AutoNote(&auto));
        }
        let incremental_on = pod
            .last_checkpoint
            .as_ref()
            .filter(|last| checkpoint.incremental && last.held_on.contains(&pod.node))
            .map(|last| last.id.clone());
        let replicas = due.replicate_to.unwrap_or(checkpoint.replicate_to) as usize;
        let replicate_to = self.standbys(pod, due, replicas);
        Some(CheckpointDecision {
            pod: pod.pod_ref(),
            node: pod.node.clone(),
            reason,
            policy: self.contexts[due.context].name.to_string(),
            mode: due.mode.unwrap_or(checkpoint.mode),
            interval,
            incremental_on,
            replicate_to,
        })
    }

    /// Standby nodes for a pod's checkpoints: current holders that still qualify (so nothing is
    /// copied again), then the best-ranked of the node's probed peers, then of all nodes.
    fn standbys(&mut self, pod: &'a ProtectedPod, due: &Due, wanted: usize) -> Vec<NodeName> {
        if wanted == 0 {
            return Vec::new();
        }
        let (memory, now) = (self.memory, self.now);
        let context = due.context;
        let policy = self.contexts[context].policy;
        self.contexts[context].ensure_static_rejections(&self.index, memory, now);
        let rejections = self.contexts[context]
            .static_rejections
            .as_ref()
            .unwrap_or(&targeting::NO_STATIC_REJECTIONS);
        let user = due.user.map(|user| self.index.user_latency(user));
        let (dataset_bytes, dataset_nodes) = due
            .dataset
            .and_then(|dataset| self.index.dataset_holders(dataset))
            .map(|(dataset, nodes)| (dataset.total_bytes.0, nodes))
            .unwrap_or_default();
        let data_from = [due.node];
        let query = TargetQuery {
            pod,
            policy,
            source: due.node,
            data_from: &data_from,
            user,
            max_user_latency: None,
            dataset_nodes,
            dataset_bytes,
            checkpoint_nodes: &[],
            checkpoint_bytes: 0,
            avoid: &[],
            recently_failed: &[],
        };
        let mut holders = std::mem::take(&mut self.scratch_nodes);
        holders.clear();
        holders.extend(
            pod.last_checkpoint
                .iter()
                .flat_map(|checkpoint| checkpoint.held_on.iter())
                .filter_map(|name| self.index.node(name))
                .filter(|&node| node != due.node),
        );
        let mut buffers = std::mem::take(&mut self.rank_buffers);
        // Standby choices report no rejections; the counts are only kept to be reused.
        let mut counts = std::mem::take(&mut self.scratch_counts);
        counts.clear();
        // Names are copied from the index's compact copy, which is in cache.
        let mut chosen: Vec<NodeName> = match holders.as_slice() {
            // The usual case, one other holder: kept if it qualifies, no ranking needed.
            &[holder] => targeting::qualifies(rejections, &self.available, &query, holder)
                .then(|| self.index.compact_name(holder).to_string())
                .into_iter()
                .collect(),
            _ => {
                targeting::rank_into(
                    &self.index,
                    rejections,
                    &self.available,
                    &query,
                    holders.iter().copied(),
                    wanted,
                    &mut buffers,
                    &mut counts,
                );
                buffers
                    .ranked()
                    .map(|node| self.index.compact_name(node).to_string())
                    .collect()
            }
        };
        for wide in [false, true] {
            if chosen.len() >= wanted {
                break;
            }
            let keep = wanted + chosen.len();
            if wide {
                let all = 0..self.index.snapshot.nodes.len();
                targeting::rank_into(
                    &self.index,
                    rejections,
                    &self.available,
                    &query,
                    all,
                    keep,
                    &mut buffers,
                    &mut counts,
                );
            } else {
                targeting::rank_into(
                    &self.index,
                    rejections,
                    &self.available,
                    &query,
                    self.index.peers(due.node),
                    keep,
                    &mut buffers,
                    &mut counts,
                );
            }
            for node in buffers.ranked() {
                if chosen.len() >= wanted {
                    break;
                }
                let name = self.index.compact_name(node);
                if !chosen.iter().any(|chosen| chosen == name) {
                    chosen.push(name.to_string());
                }
            }
        }
        self.scratch_nodes = holders;
        self.rank_buffers = buffers;
        self.scratch_counts = counts;
        chosen
    }

    fn finish(mut self) -> (Decisions, EngineMemory) {
        let mut latency_degraded: BTreeSet<(String, NodeName)> = self
            .memory
            .latency_degraded
            .iter()
            .filter(|(policy, node)| {
                // Keep what this pass did not look at; replace what it did.
                let looked = self.context_by_name.get(policy.as_str()).and_then(|&c| {
                    let position = self.index.node(node)?;
                    self.contexts
                        .get(c)?
                        .latency_tripped
                        .get(position)
                        .copied()
                        .flatten()
                });
                looked.is_none()
            })
            .cloned()
            .collect();
        for context in &self.contexts {
            for (position, tripped) in context.latency_tripped.iter().enumerate() {
                if *tripped == Some(true) {
                    latency_degraded.insert((
                        context.name.to_string(),
                        self.index.node_name(position).to_string(),
                    ));
                }
            }
            for (position, assessment) in context.assessments.iter().enumerate() {
                let hosts = context.hosts_pods.get(position).copied().unwrap_or(false);
                if let Some(assessment) = assessment
                    .as_ref()
                    .filter(|a| hosts && a.state != NodeState::Healthy)
                {
                    self.decisions.nodes.push(NodeReport {
                        node: self.index.node_name(position).to_string(),
                        policy: context.name.to_string(),
                        assessment: assessment.clone(),
                    });
                }
            }
        }
        // Checkpoints are already in pod order (see `plan_checkpoints`).
        self.decisions
            .deferred
            .sort_by(|a, b| (&a.pod, a.trigger).cmp(&(&b.pod, b.trigger)));
        self.decisions
            .nodes
            .sort_by(|a, b| (&a.node, &a.policy).cmp(&(&b.node, &b.policy)));
        self.decisions.problems.sort_by(|a, b| {
            (&a.pod, a.severity, &a.message).cmp(&(&b.pod, b.severity, &b.message))
        });
        // Dwell timers of pods this snapshot does not contain are kept (a driver may pass a
        // partial snapshot); those of pods it contains were re-evaluated above.
        let mut mobility_since = self.new_mobility;
        if !self.memory.mobility_since.is_empty() {
            let present: HashSet<(&str, &str)> = self
                .index
                .snapshot
                .pods
                .iter()
                .map(|pod| (pod.namespace.as_str(), pod.name.as_str()))
                .collect();
            for (key, since) in &self.memory.mobility_since {
                if !names_a_pod(&present, key) {
                    mobility_since.entry(key.clone()).or_insert(*since);
                }
            }
        }
        let memory = EngineMemory {
            latency_degraded,
            mobility_since,
        };
        (self.decisions, memory)
    }
}

/// Whether a dwell-timer key (`namespace/name`, as [`PodRef`]'s `Display` writes it) is one of
/// `present`'s pods. Tried at every `/`, so names that contain one cannot confuse it.
fn names_a_pod(present: &HashSet<(&str, &str)>, key: &str) -> bool {
    key.match_indices('/').any(|(slash, _)| {
        matches!(
            (key.get(..slash), key.get(slash + 1..)),
            (Some(namespace), Some(name)) if present.contains(&(namespace, name))
        )
    })
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;

#[cfg(test)]
mod speed_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn name_prefixes_order_names_as_the_names_do(a in "[a-z0-9./-]{0,24}", b in "[a-z0-9./-]{0,24}") {
            let (prefix_a, prefix_b) = (name_prefix(&a), name_prefix(&b));
            if prefix_a != prefix_b {
                prop_assert_eq!(prefix_a.cmp(&prefix_b), a.cmp(&b));
            }
        }
    }

    #[test]
    fn dwell_timer_keys_are_matched_at_any_slash() {
        let present: HashSet<(&str, &str)> = [("ml", "trainer"), ("a/b", "c"), ("x", "y/z")]
            .into_iter()
            .collect();
        for key in ["ml/trainer", "a/b/c", "x/y/z"] {
            assert!(names_a_pod(&present, key), "{key}");
        }
        for key in ["ml/other", "ml", "mltrainer", "a/b", "/ml/trainer"] {
            assert!(!names_a_pod(&present, key), "{key}");
        }
    }
}
