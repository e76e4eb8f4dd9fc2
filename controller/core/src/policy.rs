//! Policies: what a user writes in a ConfigMap to say when to checkpoint, when to migrate, where
//! to, and how to move the data.
//!
//! A policy is YAML under the data key [`POLICY_DATA_KEY`] of a ConfigMap labelled
//! `automigrate.dev/policy: "true"`; its name is the ConfigMap's name. Every field has a default,
//! so `{}` is a valid policy. Parsing rejects unknown fields and names the path of the bad one;
//! [`Policy::validate`] then checks the values against each other. [`PolicySet`] is the index of
//! valid policies that drivers keep: `apply` an edit, `delete` a removal. An invalid edit is
//! recorded as rejected and never replaces the last valid version.
//!
//! [`Signals`] is the one section the engine does not read: it names PromQL queries whose
//! results a driver puts into the snapshot's links and users.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::annotations::{CheckpointMode, PodSettings};
use crate::model::{ProtectedPod, Taint};
use crate::transfer::{TransferSettings, TransferStrategy};
use crate::units::{self, BitRate, Bytes};

/// The label that marks a ConfigMap as a policy.
pub const POLICY_LABEL: &str = "automigrate.dev/policy";
/// The ConfigMap data key that holds the policy YAML.
pub const POLICY_DATA_KEY: &str = "policy.yaml";
/// The policy that applies to protected pods no other policy selects. A user ConfigMap with this
/// name replaces the built-in defaults.
pub const FALLBACK_POLICY: &str = "default";

/// Parses YAML into `T`; on failure returns the field path (`checkpoint.interval`) and reason.
/// The YAML parser's default budget applies (250,000 YAML nodes and more), ample for policies.
pub fn from_yaml_with_path<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (String, String)> {
    from_yaml_under_budget(text, serde_saphyr::Options::default())
        .map_err(|(path, reason, _)| (path, reason))
}

/// Parses YAML into `T` reading at most `max_nodes` YAML nodes (every scalar, list and map;
/// a cluster snapshot has about 30 per node or pod). On failure returns the field path, the
/// reason, and whether it was the node limit that stopped the parse.
pub fn from_yaml_with_node_limit<T: serde::de::DeserializeOwned>(
    text: &str,
    max_nodes: usize,
) -> Result<T, (String, String, bool)> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = max_nodes;
    // The other counts grow with the node count; keep them from stopping the parse first.
    // Every node is one event, every list and map one more for its end.
    budget.max_events = budget
        .max_events
        .max(max_nodes.saturating_mul(2).saturating_add(64));
    budget.max_total_scalar_bytes = budget
        .max_total_scalar_bytes
        .max(max_nodes.saturating_mul(64));
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    from_yaml_under_budget(text, options)
}

fn from_yaml_under_budget<T: serde::de::DeserializeOwned>(
    text: &str,
    options: serde_saphyr::Options,
) -> Result<T, (String, String, bool)> {
    let mut failed_path = None;
    let result =
        serde_saphyr::with_deserializer_from_str_with_options(text, options, |deserializer| {
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                failed_path = Some(error.path().to_string());
                error.into_inner()
            })
        });
    result.map_err(|error| {
        let path = match failed_path {
            Some(path) if path != "." => path,
            _ => "(document)".to_string(),
        };
        let mut inner = &error;
        while let serde_saphyr::Error::WithSnippet { error, .. }
        | serde_saphyr::Error::AliasError { error, .. } = inner
        {
            inner = error;
        }
        let too_many_nodes = matches!(
            inner,
            serde_saphyr::Error::Budget {
                breach: serde_saphyr::budget::BudgetBreach::Nodes { .. },
                ..
            }
        );
        // One line, so the reason fits a Kubernetes Event and a log line; the position stays.
        let reason = error.without_snippet().to_string();
        let reason = reason
            .strip_prefix("error: ")
            .unwrap_or(&reason)
            .to_string();
        (path, reason, too_many_nodes)
    })
}

/// The shortest checkpoint interval anything may ask for: the floor of a policy's
/// `checkpoint.minInterval` and of a pod's `automigrate.dev/checkpoint-interval`. Each dump
/// freezes the pod (`checkpoint.timeout` is at least 1s too); more often than this the pod
/// would do little but stop for dumps.
pub const MIN_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Checks an interval against [`MIN_CHECKPOINT_INTERVAL`]. One check for policies and pod
/// annotations, so both refuse the same values in the same words.
pub fn check_interval_floor(interval: Duration) -> Result<(), String> {
    if interval < MIN_CHECKPOINT_INTERVAL {
        return Err(format!(
            "{} is below {}, the shortest checkpoint interval",
            units::format_duration(interval),
            units::format_duration(MIN_CHECKPOINT_INTERVAL)
        ));
    }
    Ok(())
}

/// How often a kubelet renews its node's Lease (`nodeLeaseDurationSeconds` 40 × 0.25) and
/// computes its node status (`nodeStatusUpdateFrequency`): 10 s in every Kubernetes release
/// since Leases exist. Kubernetes' own node-monitor grace period is 40-50 s.
pub const KUBELET_HEARTBEAT: Duration = Duration::from_secs(10);

/// The least `triggers.leaseTimeout`: a healthy node's Lease is up to one renewal period
/// ([`KUBELET_HEARTBEAT`]) old, plus the API server's and our watch's delay; 5 s of slack
/// over the period keeps one late renewal from failing a healthy node.
pub const MIN_LEASE_TIMEOUT: Duration = Duration::from_secs(15);

/// The least `triggers.notReadyGrace`: a kubelet corrects a `Ready` condition it reported
/// wrongly at its next status update, one [`KUBELET_HEARTBEAT`] later; a shorter grace fails
/// a node over a blip that heals by itself.
pub const MIN_NOT_READY_GRACE: Duration = Duration::from_secs(10);

/// How often to checkpoint: a fixed period, or derived from failure rate and checkpoint cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalSetting {
    Every(Duration),
    /// Young/Daly: `sqrt(2 · C · MTBF)`, with C the measured checkpoint freeze time.
    Auto,
}

impl FromStr for IntervalSetting {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim() == "auto" {
            return Ok(Self::Auto);
        }
        units::parse_duration(text)
            .map(Self::Every)
            .map_err(|error| format!("{error}, or `auto`"))
    }
}

impl fmt::Display for IntervalSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Every(duration) => f.write_str(&units::format_duration(*duration)),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for IntervalSetting {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IntervalSetting {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which pods a policy applies to. Empty lists match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Selector {
    pub namespaces: Vec<String>,
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    pub fn matches(&self, pod: &ProtectedPod) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&pod.namespace))
            && self
                .match_labels
                .iter()
                .all(|(key, value)| pod.labels.get(key) == Some(value))
    }

    /// More constraints win when two policies select the same pod.
    fn specificity(&self) -> usize {
        usize::from(!self.namespaces.is_empty()) + self.match_labels.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Retention {
    /// Checkpoints kept per pod on each node (the newest ones).
    pub count: u32,
    /// Upper bound on the bytes kept per pod on each node, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Bytes>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            count: 3,
            bytes: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CheckpointPolicy {
    pub interval: IntervalSetting,
    #[serde(with = "units::duration")]
    pub min_interval: Duration,
    #[serde(with = "units::duration")]
    pub max_interval: Duration,
    /// Mean time between failures of a node, for `interval: auto`.
    #[serde(with = "units::duration")]
    pub mtbf: Duration,
    /// Checkpoint cost assumed for `interval: auto` until one has been measured.
    #[serde(with = "units::duration")]
    pub estimated_cost: Duration,
    pub retention: Retention,
    pub mode: CheckpointMode,
    /// Use CRIU pre-dumps and parent images so a periodic checkpoint writes only dirty pages.
    pub incremental: bool,
    /// Standby nodes that receive a copy of each new checkpoint.
    pub replicate_to: u32,
    /// Periodic checkpoints that may run at once on one node, counting those in progress. The
    /// most overdue start first; the others wait for a later pass. Without it, a controller
    /// that comes back after an outage would start every overdue dump on a node together and
    /// saturate its disk.
    pub max_concurrent_per_node: u32,
    /// Longest a single checkpoint may take before it is abandoned.
    #[serde(with = "units::duration")]
    pub timeout: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            interval: IntervalSetting::Every(Duration::from_secs(600)),
            min_interval: Duration::from_secs(60),
            max_interval: Duration::from_secs(3600),
            mtbf: Duration::from_secs(24 * 3600),
            estimated_cost: Duration::from_secs(10),
            retention: Retention::default(),
            mode: CheckpointMode::Transparent,
            incremental: true,
            replicate_to: 1,
            max_concurrent_per_node: 2,
            timeout: Duration::from_secs(300),
        }
    }
}

impl CheckpointPolicy {
    /// Checks a fixed interval against this policy's `minInterval..maxInterval` (`auto` is
    /// clamped to them anyway). The policy's own `interval` is checked with it; so can be a
    /// pod's `automigrate.dev/checkpoint-interval` once its policy is known, in the same words.
    pub fn check_interval(&self, interval: IntervalSetting) -> Result<(), String> {
        match interval {
            IntervalSetting::Every(every)
                if every < self.min_interval || every > self.max_interval =>
            {
                Err(format!(
                    "{} is outside checkpoint.minInterval..maxInterval ({}..{})",
                    units::format_duration(every),
                    units::format_duration(self.min_interval),
                    units::format_duration(self.max_interval)
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A threshold with a hysteresis band: it trips above `threshold` and clears only below
/// `threshold - hysteresis`, so a value hovering near the line does not flap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Band {
    #[serde(with = "units::duration")]
    pub threshold: Duration,
    #[serde(with = "units::duration")]
    pub hysteresis: Duration,
}

impl Band {
    pub fn clear_below(&self) -> Duration {
        self.threshold.saturating_sub(self.hysteresis)
    }
}

/// Follow a user: move when the user's latency to the pod's node exceeds `threshold`, only to a
/// node within `threshold - hysteresis` of the user, and only after the better node has been
/// better for `dwell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MobilityTrigger {
    #[serde(with = "units::duration")]
    pub threshold: Duration,
    #[serde(with = "units::duration")]
    pub hysteresis: Duration,
    #[serde(with = "units::duration")]
    pub dwell: Duration,
}

impl MobilityTrigger {
    /// A target must be at most this far from the user.
    pub fn clear_below(&self) -> Duration {
        self.threshold.saturating_sub(self.hysteresis)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Triggers {
    /// A node whose `Ready` condition has not been `True` for this long has failed.
    #[serde(with = "units::duration")]
    pub not_ready_grace: Duration,
    /// A node whose Lease has not been renewed for this long has failed.
    #[serde(with = "units::duration")]
    pub lease_timeout: Duration,
    /// How often the nodes' kubelets renew their Lease ([`KUBELET_HEARTBEAT`] for a stock
    /// kubelet). A node no peer reaches is failed once its Lease is this plus
    /// [`crate::health::PEER_CONFIRMED_SLACK`] old (peer-confirmed failure), sooner than
    /// `leaseTimeout`.
    #[serde(with = "units::duration")]
    pub heartbeat_interval: Duration,
    /// Node conditions that mean "degrading": migrate away proactively while the node still
    /// works. kubelet's pressure conditions and node-problem-detector's problems.
    pub conditions: Vec<String>,
    /// A node whose median RTT to its peers crosses this band is degrading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Band>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mobility: Option<MobilityTrigger>,
    /// Alertmanager alert names that trigger a migration of the node or pod they label.
    pub alerts: Vec<String>,
    /// Least time between two voluntary migrations of one pod (a failed node overrides it).
    #[serde(with = "units::duration")]
    pub cooldown: Duration,
}

impl Default for Triggers {
    fn default() -> Self {
        Self {
            not_ready_grace: Duration::from_secs(20),
            lease_timeout: Duration::from_secs(30),
            heartbeat_interval: KUBELET_HEARTBEAT,
            conditions: [
                "MemoryPressure",
                "DiskPressure",
                "PIDPressure",
                "NetworkUnavailable",
                "KernelDeadlock",
                "ReadonlyFilesystem",
            ]
            .map(String::from)
            .to_vec(),
            latency: None,
            mobility: None,
            alerts: Vec::new(),
            cooldown: Duration::from_secs(600),
        }
    }
}

/// How much each criterion counts when ranking target nodes. Scores are in `[0, 1]` and the total
/// is their weighted mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Weights {
    /// Headroom left on the node after the pod lands.
    pub free_resources: f64,
    /// Closeness to the node the checkpoint is sent from.
    pub source_latency: f64,
    /// Closeness to the pod's user, when it has one.
    pub user_latency: f64,
    /// Share of the dataset and checkpoint bytes already on the node.
    pub data_locality: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            free_resources: 1.0,
            source_latency: 1.0,
            user_latency: 1.0,
            data_locality: 1.0,
        }
    }
}

/// A taint the policy lets migrated pods land on. `value` and `effect` unset match any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<crate::model::TaintEffect>,
}

impl Toleration {
    pub fn tolerates(&self, taint: &Taint) -> bool {
        self.key == taint.key
            && self
                .value
                .as_ref()
                .is_none_or(|value| Some(value) == taint.value.as_ref())
            && self.effect.is_none_or(|effect| effect == taint.effect)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Targeting {
    pub weights: Weights,
    /// Labels a target node must carry.
    pub required_labels: BTreeMap<String, String>,
    /// Taints a target may carry; a node with any other NoSchedule/NoExecute taint is excluded.
    pub tolerated_taints: Vec<Toleration>,
    /// Never put two protected pods with the same value of this pod label on one node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anti_affinity_label: Option<String>,
    /// The RTT at which a latency score is one half: score = ref / (ref + rtt).
    #[serde(with = "units::duration")]
    pub latency_reference: Duration,
}

impl Default for Targeting {
    fn default() -> Self {
        Self {
            weights: Weights::default(),
            required_labels: BTreeMap::new(),
            tolerated_taints: Vec::new(),
            anti_affinity_label: None,
            latency_reference: Duration::from_millis(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TransferPolicy {
    pub strategy: TransferStrategy,
    pub max_streams: u32,
    pub chunk_size: Bytes,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<BitRate>,
    /// Longest the data transfer of one migration may take.
    #[serde(with = "units::duration")]
    pub timeout: Duration,
}

impl Default for TransferPolicy {
    fn default() -> Self {
        let settings = TransferSettings::default();
        Self {
            strategy: settings.strategy,
            max_streams: settings.max_streams,
            chunk_size: Bytes(settings.chunk_size),
            rate_limit: settings.rate_limit_bps.map(BitRate),
            timeout: Duration::from_secs(1800),
        }
    }
}

impl TransferPolicy {
    pub fn settings(&self) -> TransferSettings {
        TransferSettings {
            strategy: self.strategy,
            max_streams: self.max_streams,
            chunk_size: self.chunk_size.0,
            rate_limit_bps: self.rate_limit.map(|rate| rate.0),
        }
    }
}

/// What to do when a restore cannot complete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Keep (or restart) the pod where it was, if that node still works; else restart fresh.
    #[default]
    Rollback,
    /// Start the pod from the beginning on the target (what Kubernetes would have done).
    Restart,
    /// Stop and report; a person decides.
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RestorePolicy {
    /// Longest from "start the replacement" to "it runs and makes progress".
    #[serde(with = "units::duration")]
    pub timeout: Duration,
    /// Longest to wait for proof that the source is stopped or dead.
    #[serde(with = "units::duration")]
    pub fence_timeout: Duration,
    pub fallback: Fallback,
    /// Wait after a failed attempt to move a pod off a failed node (or a failed manual
    /// request) before the next; doubled after each further failure up to `retryBackoffMax`.
    /// Without it a migration that cannot succeed would be retried every pass.
    #[serde(with = "units::duration")]
    pub retry_backoff: Duration,
    #[serde(with = "units::duration")]
    pub retry_backoff_max: Duration,
}

impl Default for RestorePolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            fence_timeout: Duration::from_secs(120),
            fallback: Fallback::Rollback,
            retry_backoff: Duration::from_secs(10),
            retry_backoff_max: Duration::from_secs(300),
        }
    }
}

/// Longest PromQL query a policy may hold: it travels in the URL of an instant query.
pub const MAX_QUERY_BYTES: usize = 4096;

/// Signals a driver reads from Prometheus for the engine: PromQL instant queries whose results
/// become link and user observations in the snapshot. Links and users are facts about the
/// cluster, not about one pod, so a driver runs the queries of every valid policy and every pod
/// sees their results. Values are seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Signals {
    /// Node-to-node round-trip time: one series per link, labels `from` and `to` (node names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_latency_query: Option<String>,
    /// User-to-node latency: one series per pair, labels `user` (the pods'
    /// `automigrate.dev/user`) and `node`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_latency_query: Option<String>,
}

impl Signals {
    pub fn is_empty(&self) -> bool {
        self.link_latency_query.is_none() && self.user_latency_query.is_none()
    }
}

/// A cheap sanity check of a PromQL query; Prometheus parses it for real. Catches what a YAML
/// edit most often breaks: an empty value, a cut-off line (unbalanced brackets or quotes).
fn check_query(query: &str) -> Result<(), String> {
    if query.trim().is_empty() {
        return Err("empty query (leave the field out for none)".into());
    }
    if query.len() > MAX_QUERY_BYTES {
        return Err(format!("{} bytes; at most {MAX_QUERY_BYTES}", query.len()));
    }
    if query.chars().any(|c| c.is_control() && !c.is_whitespace()) {
        return Err("contains a control character".into());
    }
    let mut open: Vec<char> = Vec::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in query.chars() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' && q != '`' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '(' | '[' | '{' => open.push(c),
            ')' | ']' | '}' => {
                let expected = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open.pop() != Some(expected) {
                    return Err(format!("unbalanced `{c}`"));
                }
            }
            _ => {}
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated string (opened with {q})"));
    }
    if let Some(c) = open.pop() {
        return Err(format!("unclosed `{c}`"));
    }
    Ok(())
}

/// A whole policy document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Policy {
    pub selector: Selector,
    pub checkpoint: CheckpointPolicy,
    pub triggers: Triggers,
    pub targeting: Targeting,
    pub transfer: TransferPolicy,
    pub restore: RestorePolicy,
    /// Left out of the defaults: none is read unless a policy names a query.
    #[serde(skip_serializing_if = "Signals::is_empty")]
    pub signals: Signals,
}

/// One problem with a policy: where and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyIssue {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for PolicyIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// A policy that cannot be used, with every issue found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub policy: String,
    pub issues: Vec<PolicyIssue>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy `{}` rejected: ", self.policy)?;
        for (index, issue) in self.issues.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

impl Policy {
    /// Parses and validates one policy document.
    pub fn from_yaml(name: &str, text: &str) -> Result<Policy, PolicyError> {
        // An empty data key means "all defaults", as `{}` does.
        let policy: Policy = if text.trim().is_empty() {
            Policy::default()
        } else {
            from_yaml_with_path(text).map_err(|(path, reason)| PolicyError {
                policy: name.to_string(),
                issues: vec![PolicyIssue { path, reason }],
            })?
        };
        let issues = policy.validate();
        if issues.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError {
                policy: name.to_string(),
                issues,
            })
        }
    }

    /// Checks values against each other. Returns every issue found.
    pub fn validate(&self) -> Vec<PolicyIssue> {
        let mut issues = Vec::new();
        let mut issue = |path: &str, reason: String| {
            issues.push(PolicyIssue {
                path: path.to_string(),
                reason,
            })
        };
        let show = |duration: Duration| units::format_duration(duration);

        let checkpoint = &self.checkpoint;
        if let Err(reason) = check_interval_floor(checkpoint.min_interval) {
            issue("checkpoint.minInterval", reason);
        }
        if checkpoint.min_interval > checkpoint.max_interval {
            issue(
                "checkpoint.maxInterval",
                format!(
                    "{} is below checkpoint.minInterval ({})",
                    show(checkpoint.max_interval),
                    show(checkpoint.min_interval)
                ),
            );
        }
        if let Err(reason) = checkpoint.check_interval(checkpoint.interval) {
            issue("checkpoint.interval", reason);
        }
        if checkpoint.mtbf.is_zero() {
            issue("checkpoint.mtbf", "must be greater than zero".into());
        }
        if checkpoint.estimated_cost.is_zero() {
            issue(
                "checkpoint.estimatedCost",
                "must be greater than zero".into(),
            );
        }
        if checkpoint.retention.count == 0 {
            issue(
                "checkpoint.retention.count",
                "must keep at least one checkpoint".into(),
            );
        }
        if checkpoint.replicate_to > 10 {
            issue("checkpoint.replicateTo", "at most 10 standby nodes".into());
        }
        if checkpoint.max_concurrent_per_node == 0 {
            issue(
                "checkpoint.maxConcurrentPerNode",
                "must allow at least one checkpoint at a time".into(),
            );
        }
        if checkpoint.timeout < Duration::from_secs(1) {
            issue("checkpoint.timeout", "must be at least 1s".into());
        }

        let triggers = &self.triggers;
        if triggers.not_ready_grace < MIN_NOT_READY_GRACE {
            issue(
                "triggers.notReadyGrace",
                format!(
                    "{} is below {}: a kubelet posts its node status every {} s and corrects a wrong Ready at the next post, so a shorter grace fails nodes over blips that heal by themselves",
                    show(triggers.not_ready_grace),
                    show(MIN_NOT_READY_GRACE),
                    KUBELET_HEARTBEAT.as_secs()
                ),
            );
        }
        if triggers.lease_timeout < MIN_LEASE_TIMEOUT {
            issue(
                "triggers.leaseTimeout",
                format!(
                    "{} is below {}: a kubelet renews its Lease every {} s, so a healthy node's Lease is up to that old and a shorter timeout marks healthy nodes failed",
                    show(triggers.lease_timeout),
                    show(MIN_LEASE_TIMEOUT),
                    KUBELET_HEARTBEAT.as_secs()
                ),
            );
        }
        if triggers.heartbeat_interval.is_zero() {
            issue("triggers.heartbeatInterval", "must be more than 0s".into());
        }
        for (index, condition) in triggers.conditions.iter().enumerate() {
            let path = format!("triggers.conditions[{index}]");
            if condition.trim().is_empty() {
                issue(&path, "empty condition type".into());
            } else if condition == "Ready" {
                issue(
                    &path,
                    "`Ready` is watched through triggers.notReadyGrace; list only problem conditions"
                        .into(),
                );
            }
        }
        if let Some(band) = &triggers.latency {
            if band.threshold.is_zero() {
                issue(
                    "triggers.latency.threshold",
                    "must be greater than zero".into(),
                );
            }
            if band.hysteresis >= band.threshold {
                issue(
                    "triggers.latency.hysteresis",
                    format!(
                        "{} must be below the threshold ({})",
                        show(band.hysteresis),
                        show(band.threshold)
                    ),
                );
            }
        }
        if let Some(mobility) = &triggers.mobility {
            if mobility.threshold.is_zero() {
                issue(
                    "triggers.mobility.threshold",
                    "must be greater than zero".into(),
                );
            }
            if mobility.hysteresis >= mobility.threshold {
                issue(
                    "triggers.mobility.hysteresis",
                    format!(
                        "{} must be below the threshold ({})",
                        show(mobility.hysteresis),
                        show(mobility.threshold)
                    ),
                );
            }
        }
        for (index, alert) in triggers.alerts.iter().enumerate() {
            if alert.trim().is_empty() {
                issue(
                    &format!("triggers.alerts[{index}]"),
                    "empty alert name".into(),
                );
            }
        }

        let weights = &self.targeting.weights;
        let named = [
            ("freeResources", weights.free_resources),
            ("sourceLatency", weights.source_latency),
            ("userLatency", weights.user_latency),
            ("dataLocality", weights.data_locality),
        ];
        for (name, weight) in named {
            if !weight.is_finite() || weight < 0.0 {
                issue(
                    &format!("targeting.weights.{name}"),
                    format!("{weight} is not a finite number ≥ 0"),
                );
            }
        }
        if named.iter().map(|(_, weight)| weight.max(0.0)).sum::<f64>() <= 0.0 {
            issue(
                "targeting.weights",
                "at least one weight must be above zero".into(),
            );
        }
        if self.targeting.latency_reference.is_zero() {
            issue(
                "targeting.latencyReference",
                "must be greater than zero".into(),
            );
        }
        for (index, toleration) in self.targeting.tolerated_taints.iter().enumerate() {
            if toleration.key.trim().is_empty() {
                issue(
                    &format!("targeting.toleratedTaints[{index}].key"),
                    "empty key".into(),
                );
            }
        }

        let transfer = &self.transfer;
        if !(1..=64).contains(&transfer.max_streams) {
            issue(
                "transfer.maxStreams",
                format!("{} is outside 1..64", transfer.max_streams),
            );
        }
        if transfer.chunk_size < Bytes(64 << 10) || transfer.chunk_size > Bytes(1 << 30) {
            issue(
                "transfer.chunkSize",
                format!("{} is outside 64Ki..1Gi", transfer.chunk_size),
            );
        }
        if transfer.rate_limit == Some(BitRate(0)) {
            issue(
                "transfer.rateLimit",
                "must be above zero (leave it out for no limit)".into(),
            );
        }
        if self.restore.timeout < Duration::from_secs(1) {
            issue("restore.timeout", "must be at least 1s".into());
        }
        if self.restore.fence_timeout < Duration::from_secs(1) {
            issue("restore.fenceTimeout", "must be at least 1s".into());
        }
        if self.restore.retry_backoff < Duration::from_secs(1) {
            issue("restore.retryBackoff", "must be at least 1s".into());
        }
        if self.restore.retry_backoff_max < self.restore.retry_backoff {
            issue(
                "restore.retryBackoffMax",
                format!(
                    "{} is below retryBackoff ({})",
                    units::format_duration(self.restore.retry_backoff_max),
                    units::format_duration(self.restore.retry_backoff)
                ),
            );
        }
        let queries = [
            ("signals.linkLatencyQuery", &self.signals.link_latency_query),
            ("signals.userLatencyQuery", &self.signals.user_latency_query),
        ];
        for (path, query) in queries {
            if let Some(Err(reason)) = query.as_deref().map(check_query) {
                issue(path, reason);
            }
        }
        issues
    }

    /// This policy with a pod's annotation overrides applied.
    pub fn with_overrides(&self, settings: &PodSettings) -> Policy {
        let mut policy = self.clone();
        if let Some(interval) = settings.checkpoint_interval {
            policy.checkpoint.interval = interval;
        }
        if let Some(count) = settings.replicate_to {
            policy.checkpoint.replicate_to = count;
        }
        if let Some(mode) = settings.mode {
            policy.checkpoint.mode = mode;
        }
        if let Some(cooldown) = settings.cooldown {
            policy.triggers.cooldown = cooldown;
        }
        policy
    }
}

/// The parts of a ConfigMap a policy loader reads. Other fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigMapDocument {
    #[serde(default)]
    pub kind: String,
    pub metadata: ConfigMapMetadata,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConfigMapMetadata {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ConfigMapDocument {
    pub fn is_policy(&self) -> bool {
        self.kind == "ConfigMap"
            && self.metadata.labels.get(POLICY_LABEL).map(String::as_str) == Some("true")
    }

    /// Why this document is not a policy; `None` when it is one.
    pub fn not_a_policy(&self) -> Option<NotAPolicy> {
        if self.is_policy() {
            return None;
        }
        let name = &self.metadata.name;
        let label = format!("label {POLICY_LABEL}: \"true\"");
        let (reason, likely_mistake) = if self.kind != "ConfigMap" {
            let kind = if self.kind.is_empty() {
                "a document without `kind`"
            } else {
                &self.kind
            };
            (format!("{kind} {name} is not a ConfigMap"), false)
        } else if let Some(value) = self.metadata.labels.get(POLICY_LABEL) {
            (
                format!("ConfigMap {name}: label {POLICY_LABEL} is {value:?}, not \"true\""),
                true,
            )
        } else if let Some(typo) = self.metadata.labels.keys().find(|key| {
            edit_distance(&key.to_ascii_lowercase(), POLICY_LABEL) <= 3
                || (key.contains("automigrate") && key.ends_with("policy"))
        }) {
            (
                format!(
                    "ConfigMap {name} lacks {label}; did you mean {POLICY_LABEL} instead of {typo}?"
                ),
                true,
            )
        } else if self.data.contains_key(POLICY_DATA_KEY) {
            (
                format!("ConfigMap {name} has {POLICY_DATA_KEY} but lacks {label}"),
                true,
            )
        } else {
            (format!("ConfigMap {name} lacks {label}"), false)
        };
        Some(NotAPolicy {
            reason,
            likely_mistake,
        })
    }

    /// The policy text, or the reason there is none.
    pub fn policy_text(&self) -> Result<&str, PolicyError> {
        self.data
            .get(POLICY_DATA_KEY)
            .map(String::as_str)
            .ok_or_else(|| PolicyError {
                policy: self.metadata.name.clone(),
                issues: vec![PolicyIssue {
                    path: format!("data.{POLICY_DATA_KEY}"),
                    reason: "missing: a policy ConfigMap keeps its YAML under this key".into(),
                }],
            })
    }
}

/// Reads every YAML document in a file (`---`-separated) and keeps the policy ConfigMaps.
pub fn configmaps_from_yaml(text: &str) -> Result<Vec<ConfigMapDocument>, PolicyError> {
    Ok(documents_from_yaml(text)?
        .into_iter()
        .filter(ConfigMapDocument::is_policy)
        .collect())
}

/// Reads every YAML document in a file (`---`-separated), policies or not: a checker says why
/// each of the others is not a policy ([`ConfigMapDocument::not_a_policy`]).
pub fn documents_from_yaml(text: &str) -> Result<Vec<ConfigMapDocument>, PolicyError> {
    serde_saphyr::from_multiple(text).map_err(|error| PolicyError {
        policy: "(file)".into(),
        issues: vec![PolicyIssue {
            path: "(document)".into(),
            reason: error.to_string(),
        }],
    })
}

/// Why a document is not a policy, for a user who may have meant it to be one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAPolicy {
    pub reason: String,
    /// It looks meant as a policy (a `policy.yaml` key, a near-miss or wrong-valued label):
    /// a checker should fail on it rather than skip it.
    pub likely_mistake: bool,
}

/// Edits (insert, delete, substitute) between two short strings, to spot a mistyped label.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// What [`PolicySet::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Added,
    Updated,
    Unchanged,
}

/// How a pod's policy was chosen, for the decision's explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SelectedBy {
    Annotation,
    Selector,
    Fallback,
}

/// The valid policies, by name, and the last rejection of each name.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    valid: BTreeMap<String, Policy>,
    rejected: BTreeMap<String, PolicyError>,
    builtin_fallback: Policy,
}

impl PolicySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a policy from its YAML. On error the last valid version stays in force
    /// and the error is remembered for [`PolicySet::rejected`].
    pub fn apply(&mut self, name: &str, text: &str) -> Result<Applied, PolicyError> {
        self.apply_checked(name, text, |_| Vec::new())
    }

    /// [`PolicySet::apply`] with checks only the controller can make (its flags, e.g.
    /// [`crate::fencing::SelfFenceTiming::check_policy`]): their issues reject the policy
    /// like validation issues do.
    pub fn apply_checked(
        &mut self,
        name: &str,
        text: &str,
        check: impl Fn(&Policy) -> Vec<PolicyIssue>,
    ) -> Result<Applied, PolicyError> {
        let checked = Policy::from_yaml(name, text).and_then(|policy| {
            let issues = check(&policy);
            if issues.is_empty() {
                Ok(policy)
            } else {
                Err(PolicyError {
                    policy: name.to_string(),
                    issues,
                })
            }
        });
        match checked {
            Ok(policy) => {
                self.rejected.remove(name);
                Ok(self.insert(name, policy))
            }
            Err(error) => {
                self.rejected.insert(name.to_string(), error.clone());
                Err(error)
            }
        }
    }

    /// Adds or replaces an already validated policy.
    pub fn insert(&mut self, name: &str, policy: Policy) -> Applied {
        match self.valid.insert(name.to_string(), policy.clone()) {
            None => Applied::Added,
            Some(previous) if previous == policy => Applied::Unchanged,
            Some(_) => Applied::Updated,
        }
    }

    pub fn delete(&mut self, name: &str) -> bool {
        self.rejected.remove(name);
        self.valid.remove(name).is_some()
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.valid.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.valid.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.valid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.valid.is_empty()
    }

    /// Rejected edits still outstanding (the name's last valid version, if any, is in force).
    pub fn rejected(&self) -> impl Iterator<Item = &PolicyError> {
        self.rejected.values()
    }

    /// The fallback policy: a user's `default` policy, or the built-in defaults.
    pub fn fallback(&self) -> (&str, &Policy) {
        match self.valid.get(FALLBACK_POLICY) {
            Some(policy) => (FALLBACK_POLICY, policy),
            None => ("(built-in defaults)", &self.builtin_fallback),
        }
    }

    /// Chooses the policy for a pod: the one its annotation names; else the most specific
    /// selector match (ties by name); else the fallback. Returns the name, the policy, how it
    /// was chosen, and a note when the choice deserves the user's attention.
    pub fn select<'a>(
        &'a self,
        pod: &ProtectedPod,
        named: Option<&str>,
    ) -> (&'a str, &'a Policy, SelectedBy, Option<String>) {
        if let Some(name) = named {
            if let Some((key, policy)) = self.valid.get_key_value(name) {
                return (key.as_str(), policy, SelectedBy::Annotation, None);
            }
            let (fallback_name, fallback) = self.fallback();
            return (
                fallback_name,
                fallback,
                SelectedBy::Fallback,
                Some(format!(
                    "pod {}/{} names policy `{name}`, which does not exist{}; using {fallback_name}",
                    pod.namespace,
                    pod.name,
                    if self.rejected.contains_key(name) {
                        " (its last edit was rejected)"
                    } else {
                        ""
                    }
                )),
            );
        }
        let mut best: Option<(&String, &Policy)> = None;
        let mut matched = 0usize;
        for (name, policy) in &self.valid {
            if name == FALLBACK_POLICY || !policy.selector.matches(pod) {
                continue;
            }
            matched += 1;
            let better = match best {
                None => true,
                Some((_, current)) => {
                    policy.selector.specificity() > current.selector.specificity()
                }
            };
            if better {
                best = Some((name, policy));
            }
        }
        match best {
            Some((name, policy)) => {
                let note = (matched > 1).then(|| {
                    format!(
                        "pod {}/{} is selected by {matched} policies; using `{name}` (most specific, then first by name)",
                        pod.namespace, pod.name
                    )
                });
                (name.as_str(), policy, SelectedBy::Selector, note)
            }
            None => {
                let (name, policy) = self.fallback();
                (name, policy, SelectedBy::Fallback, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_is_all_defaults() {
        assert_eq!(Policy::from_yaml("p", "").unwrap(), Policy::default());
        assert_eq!(Policy::from_yaml("p", "{}").unwrap(), Policy::default());
        assert!(Policy::default().validate().is_empty());
    }

    #[test]
    fn parses_durations_sizes_and_rates() {
        let policy = Policy::from_yaml(
            "p",
            "checkpoint:\n  interval: auto\n  mtbf: 12h\ntransfer:\n  chunkSize: 4MiB\n  rateLimit: 200Mbit/s\ntriggers:\n  latency: {threshold: 50ms, hysteresis: 15ms}\n",
        )
        .unwrap();
        assert_eq!(policy.checkpoint.interval, IntervalSetting::Auto);
        assert_eq!(policy.checkpoint.mtbf, Duration::from_secs(12 * 3600));
        assert_eq!(policy.transfer.chunk_size, Bytes(4 << 20));
        assert_eq!(policy.transfer.rate_limit, Some(BitRate(200_000_000)));
        assert_eq!(
            policy.triggers.latency.unwrap().clear_below(),
            Duration::from_millis(35)
        );
    }

    #[test]
    fn unknown_field_names_its_path() {
        let error = Policy::from_yaml("p", "checkpoint:\n  intervall: 5m\n").unwrap_err();
        assert_eq!(error.issues.len(), 1);
        assert_eq!(error.issues[0].path, "checkpoint.intervall");
        assert!(error.issues[0].reason.contains("intervall"), "{error}");
    }

    #[test]
    fn bad_value_names_its_path() {
        let error = Policy::from_yaml("p", "checkpoint:\n  interval: sometimes\n").unwrap_err();
        assert_eq!(error.issues[0].path, "checkpoint.interval");
        assert!(error.issues[0].reason.contains("or `auto`"), "{error}");
    }

    #[test]
    fn round_trips_through_yaml() {
        let mut policy = Policy::default();
        policy.triggers.mobility = Some(MobilityTrigger {
            threshold: Duration::from_millis(40),
            hysteresis: Duration::from_millis(15),
            dwell: Duration::from_secs(30),
        });
        policy.transfer.rate_limit = Some(BitRate(100_000_000));
        let text = serde_saphyr::to_string(&policy).unwrap();
        assert_eq!(Policy::from_yaml("p", &text).unwrap(), policy, "{text}");
    }

    #[test]
    fn signal_queries_parse_and_are_checked() {
        let policy = Policy::from_yaml(
            "p",
            "signals:\n  linkLatencyQuery: 'max by (from, to) (link_rtt_seconds{job=\"probe\"})'\n",
        )
        .unwrap();
        assert_eq!(
            policy.signals.link_latency_query.as_deref(),
            Some("max by (from, to) (link_rtt_seconds{job=\"probe\"})")
        );
        assert!(policy.signals.user_latency_query.is_none());
        let text = serde_saphyr::to_string(&policy).unwrap();
        assert_eq!(Policy::from_yaml("p", &text).unwrap(), policy, "{text}");
        assert!(
            !serde_saphyr::to_string(&Policy::default())
                .unwrap()
                .contains("signals"),
            "no signals section in the defaults"
        );

        for (query, reason) in [
            ("  ", "empty query (leave the field out for none)"),
            ("max(rtt{a=\"b\"}", "unclosed `(`"),
            ("rtt{a=\"b)\"}) ", "unbalanced `)`"),
            ("rtt{a=\"b}", "unterminated string (opened with \")"),
            ("rate(x[5m)]", "unbalanced `)`"),
        ] {
            let mut policy = Policy::default();
            policy.signals.user_latency_query = Some(query.to_string());
            let issues = policy.validate();
            assert_eq!(issues.len(), 1, "{query}: {issues:?}");
            assert_eq!(issues[0].path, "signals.userLatencyQuery");
            assert_eq!(issues[0].reason, reason, "{query}");
        }
        let mut policy = Policy::default();
        policy.signals.link_latency_query = Some("x".repeat(MAX_QUERY_BYTES + 1));
        assert_eq!(policy.validate()[0].path, "signals.linkLatencyQuery");
        // Brackets inside strings are not counted.
        policy.signals.link_latency_query =
            Some(r#"label_replace(rtt, "to", "$1", "peer", "(.*)")"#.into());
        assert!(policy.validate().is_empty());
        let error = Policy::from_yaml("p", "signals:\n  linkLatency: x\n").unwrap_err();
        assert_eq!(error.issues[0].path, "signals.linkLatency");
    }

    #[test]
    fn invalid_edit_keeps_last_valid_policy() {
        let mut set = PolicySet::new();
        assert_eq!(
            set.apply("train", "triggers:\n  cooldown: 5m\n").unwrap(),
            Applied::Added
        );
        let error = set
            .apply(
                "train",
                "triggers:\n  cooldown: 5m\ntransfer:\n  maxStreams: 0\n",
            )
            .unwrap_err();
        assert_eq!(error.issues[0].path, "transfer.maxStreams");
        assert_eq!(
            set.get("train").unwrap().triggers.cooldown,
            Duration::from_secs(300)
        );
        assert_eq!(set.rejected().count(), 1);
        assert_eq!(
            set.apply("train", "triggers:\n  cooldown: 5m\n").unwrap(),
            Applied::Unchanged
        );
        assert_eq!(
            set.rejected().count(),
            0,
            "a valid edit clears the rejection"
        );
    }

    #[test]
    fn a_rejected_new_policy_is_not_added() {
        let mut set = PolicySet::new();
        assert!(set.apply("new", "checkpoint: {replicateTo: 99}").is_err());
        assert!(set.get("new").is_none());
    }

    #[test]
    fn heartbeat_timeouts_a_kubelet_cannot_meet_are_refused() {
        // Issue 14, finding 5: 1s passed; a kubelet renews its Lease and posts its status
        // every 10 s, so every healthy node would read as failed.
        let error =
            Policy::from_yaml("p", "triggers: {leaseTimeout: 1s, notReadyGrace: 1s}").unwrap_err();
        let paths: Vec<&str> = error.issues.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["triggers.notReadyGrace", "triggers.leaseTimeout"],
            "{error}"
        );
        assert!(
            error.issues[1].reason.starts_with("1s is below 15s:")
                && error.issues[1]
                    .reason
                    .contains("renews its Lease every 10 s"),
            "{error}"
        );
        assert!(
            error.issues[0].reason.starts_with("1s is below 10s:")
                && error.issues[0].reason.contains("every 10 s"),
            "{error}"
        );
        for text in [
            "triggers: {leaseTimeout: 14s}",
            "triggers: {notReadyGrace: 9s}",
        ] {
            assert!(Policy::from_yaml("p", text).is_err(), "{text}");
        }
        // The floors themselves are allowed (policies/fast-failover.yaml uses them).
        assert!(
            Policy::from_yaml("p", "triggers: {leaseTimeout: 15s, notReadyGrace: 10s}").is_ok()
        );
    }

    #[test]
    fn checkpoint_min_interval_has_a_floor() {
        let error =
            Policy::from_yaml("p", "checkpoint: {minInterval: 0s, interval: 1m}").unwrap_err();
        assert_eq!(error.issues[0].path, "checkpoint.minInterval", "{error}");
        assert_eq!(
            error.issues[0].reason,
            "0s is below 1s, the shortest checkpoint interval"
        );
    }

    #[test]
    fn documents_that_are_not_policies_say_why() {
        let documents = documents_from_yaml(
            "kind: ConfigMap\nmetadata: {name: a, labels: {automigrate.dev/Policy: \"true\"}}\n---\nkind: ConfigMap\nmetadata: {name: b}\ndata: {other: x}\n---\nkind: Deployment\nmetadata: {name: c}\n",
        )
        .unwrap();
        let reasons: Vec<NotAPolicy> = documents.iter().filter_map(|d| d.not_a_policy()).collect();
        assert_eq!(reasons.len(), 3);
        assert!(
            reasons[0]
                .reason
                .contains("instead of automigrate.dev/Policy?"),
            "{reasons:?}"
        );
        assert!(reasons[0].likely_mistake);
        assert_eq!(
            reasons[1].reason,
            "ConfigMap b lacks label automigrate.dev/policy: \"true\""
        );
        assert!(
            !reasons[1].likely_mistake,
            "an unrelated ConfigMap is only skipped"
        );
        assert_eq!(reasons[2].reason, "Deployment c is not a ConfigMap");
        assert_eq!(edit_distance("automigrate.dev/polciy", POLICY_LABEL), 2);
    }

    #[test]
    fn configmap_without_data_key_is_reported() {
        let docs = configmaps_from_yaml(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  labels: {automigrate.dev/policy: \"true\"}\ndata: {other: y}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated}\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 1, "the unlabelled ConfigMap is not a policy");
        let error = docs[0].policy_text().unwrap_err();
        assert_eq!(error.issues[0].path, "data.policy.yaml");
    }
}
