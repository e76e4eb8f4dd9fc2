//! The `automigrate.dev/*` pod annotations: how a user protects a pod and overrides its policy.
//!
//! A pod's raw annotation map goes in; [`PodSettings`] or every [`AnnotationError`] comes out.
//! Every key under the `automigrate.dev/` domain must be one this module knows, so a typo such
//! as `automigrate.dev/protected` is reported instead of leaving a pod silently unprotected.
//!
//! [`USER_LATENCY`] is the one annotation written by a program rather than by a person: whatever
//! knows where the pod's user is (the user's client, an edge gateway) keeps it current, and a
//! driver turns it into [`UserObservation`](crate::model::UserObservation)s for the user named
//! by [`USER`]. The engine itself reads it only to validate it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::PodRef;
use crate::policy::IntervalSetting;
use crate::units;

pub const DOMAIN: &str = "automigrate.dev/";
pub const PROTECT: &str = "automigrate.dev/protect";
pub const POLICY: &str = "automigrate.dev/policy";
pub const MODE: &str = "automigrate.dev/mode";
pub const DATASET: &str = "automigrate.dev/dataset";
pub const USER: &str = "automigrate.dev/user";
pub const CHECKPOINT_INTERVAL: &str = "automigrate.dev/checkpoint-interval";
pub const REPLICATE_TO: &str = "automigrate.dev/replicate-to";
pub const COOLDOWN: &str = "automigrate.dev/cooldown";
pub const USER_LATENCY: &str = "automigrate.dev/user-latency";

/// Every annotation key this version understands, with what it takes (for errors and docs).
pub const KNOWN: [(&str, &str); 9] = [
    (PROTECT, "`true` or `false`"),
    (POLICY, "the name of a policy ConfigMap"),
    (
        MODE,
        "`transparent` (CRIU) or `application` (the program saves itself)",
    ),
    (DATASET, "an absolute path on the node, or `pvc:NAME`"),
    (USER, "a user id whose latency the pod should follow"),
    (CHECKPOINT_INTERVAL, "a duration such as `10m`, or `auto`"),
    (
        REPLICATE_TO,
        "how many standby nodes hold the latest checkpoint, 0 to 10",
    ),
    (COOLDOWN, "a duration such as `15m`"),
    (
        USER_LATENCY,
        "the user's latency to nodes now, `NODE=DURATION` pairs separated by commas (`edge-1=12ms, edge-2=55ms`)",
    ),
];

/// How a pod's state is captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    /// CRIU freezes and dumps the whole process tree; the program needs no changes.
    #[default]
    Transparent,
    /// The program saves its own framework state when signalled (GPUs, or what CRIU cannot dump).
    Application,
}

impl std::str::FromStr for CheckpointMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "transparent" => Ok(Self::Transparent),
            "application" => Ok(Self::Application),
            _ => Err("expected `transparent` or `application`".to_string()),
        }
    }
}

/// Where the pod's training data lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetRef {
    Path(String),
    Pvc(String),
}

impl DatasetRef {
    /// The key under which the snapshot lists this dataset (the annotation value as written).
    pub fn id(&self) -> std::borrow::Cow<'_, str> {
        match self {
            DatasetRef::Path(path) => path.as_str().into(),
            DatasetRef::Pvc(name) => format!("pvc:{name}").into(),
        }
    }
}

/// What a pod's annotations say, after validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSettings {
    pub protect: bool,
    pub policy: Option<String>,
    pub mode: Option<CheckpointMode>,
    pub dataset: Option<DatasetRef>,
    pub user: Option<String>,
    pub checkpoint_interval: Option<IntervalSetting>,
    pub replicate_to: Option<u32>,
    pub cooldown: Option<Duration>,
    /// The user's latency to each listed node ([`USER_LATENCY`]); empty when not annotated.
    pub user_latency: BTreeMap<String, Duration>,
}

/// One bad annotation: which pod, which key, what value, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AnnotationError {
    pub pod: PodRef,
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod {}: annotation {}={:?}: {}",
            self.pod, self.key, self.value, self.reason
        )
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.'
        })
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Reads a [`USER_LATENCY`] value: `NODE=DURATION` pairs separated by commas, each node once.
pub fn parse_user_latency(value: &str) -> Result<BTreeMap<String, Duration>, String> {
    let mut latencies = BTreeMap::new();
    for pair in value.split(',').map(str::trim) {
        if pair.is_empty() {
            continue;
        }
        let Some((node, latency)) = pair.split_once('=') else {
            return Err(format!("`{pair}` is not `NODE=DURATION`"));
        };
        let node = node.trim();
        if !is_dns_subdomain(node) {
            return Err(format!("`{node}` is not a node name"));
        }
        let latency = units::parse_duration(latency).map_err(|error| format!("{node}: {error}"))?;
        if latencies.insert(node.to_string(), latency).is_some() {
            return Err(format!("node `{node}` is listed twice"));
        }
    }
    if latencies.is_empty() {
        return Err("expected at least one `NODE=DURATION` pair".into());
    }
    Ok(latencies)
}

fn parse_value(key: &str, value: &str, settings: &mut PodSettings) -> Result<(), String> {
    let value = value.trim();
    match key {
        PROTECT => {
            settings.protect = match value {
                "true" => true,
                "false" => false,
                _ => return Err("expected `true` or `false`".to_string()),
            }
        }
        POLICY => {
            if !is_dns_subdomain(value) {
                return Err(
                    "expected a ConfigMap name (lowercase letters, digits, `-`, `.`)".into(),
                );
            }
            settings.policy = Some(value.to_string());
        }
        MODE => settings.mode = Some(value.parse()?),
        DATASET => {
            settings.dataset = Some(if let Some(claim) = value.strip_prefix("pvc:") {
                if !is_dns_subdomain(claim) {
                    return Err("`pvc:` must be followed by a PersistentVolumeClaim name".into());
                }
                DatasetRef::Pvc(claim.to_string())
            } else if value.starts_with('/') {
                if value.split('/').any(|part| part == "..") {
                    return Err("the path must not contain `..`".into());
                }
                DatasetRef::Path(value.to_string())
            } else {
                return Err("expected an absolute path or `pvc:NAME`".into());
            })
        }
        USER => {
            if value.is_empty() || value.len() > 253 {
                return Err("expected a non-empty user id of at most 253 characters".into());
            }
            settings.user = Some(value.to_string());
        }
        CHECKPOINT_INTERVAL => {
            let interval = value.parse::<IntervalSetting>()?;
            // The floor every policy's minInterval obeys, in the same words; the policy's own
            // minInterval..maxInterval is only known once the pod's policy is chosen.
            if let IntervalSetting::Every(every) = interval {
                crate::policy::check_interval_floor(every)?;
            }
            settings.checkpoint_interval = Some(interval);
        }
        REPLICATE_TO => {
            let count: u32 = value
                .parse()
                .map_err(|_| "expected a whole number from 0 to 10".to_string())?;
            if count > 10 {
                return Err("expected a whole number from 0 to 10".into());
            }
            settings.replicate_to = Some(count);
        }
        COOLDOWN => {
            settings.cooldown = Some(units::parse_duration(value).map_err(|e| e.to_string())?);
        }
        USER_LATENCY => settings.user_latency = parse_user_latency(value)?,
        _ => {
            let known: Vec<&str> = KNOWN.iter().map(|(key, _)| *key).collect();
            return Err(format!(
                "unknown annotation; known keys: {}",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

/// Reads a pod's `automigrate.dev/*` annotations: the settings from every valid key, and every
/// problem (not just the first, so a user fixes them in one go). A bad key leaves its setting
/// unset (the policy's value applies); a bad `protect` leaves the pod unprotected.
pub fn parse(
    namespace: &str,
    name: &str,
    annotations: &BTreeMap<String, String>,
) -> (PodSettings, Vec<AnnotationError>) {
    let mut settings = PodSettings::default();
    let mut errors = Vec::new();
    // A pod has a handful of annotations: a scan beats a B-tree range search here.
    for (key, value) in annotations {
        if !key.starts_with(DOMAIN) {
            continue;
        }
        if let Err(reason) = parse_value(key, value, &mut settings) {
            errors.push(AnnotationError {
                pod: PodRef::new(namespace, name),
                key: key.clone(),
                value: value.clone(),
                reason,
            });
        }
    }
    // Latencies without a user belong to no one: say so rather than ignore them.
    if !settings.user_latency.is_empty() && settings.user.is_none() {
        settings.user_latency.clear();
        if let Some(value) = annotations.get(USER_LATENCY) {
            errors.push(AnnotationError {
                pod: PodRef::new(namespace, name),
                key: USER_LATENCY.to_string(),
                value: value.clone(),
                reason: format!("needs {USER}: the latencies are that user's"),
            });
        }
    }
    (settings, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn reads_every_known_annotation() {
        let (settings, errors) = parse(
            "ml",
            "trainer-0",
            &annotations(&[
                (PROTECT, "true"),
                (POLICY, "gpu-training"),
                (MODE, "application"),
                (DATASET, "pvc:imagenet"),
                (USER, "alice"),
                (CHECKPOINT_INTERVAL, "15m"),
                (REPLICATE_TO, "2"),
                (COOLDOWN, "1h"),
                (USER_LATENCY, "edge-1=12ms, edge-2 = 1s 5ms"),
                ("unrelated.io/key", "ignored"),
            ]),
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert!(settings.protect);
        assert_eq!(settings.policy.as_deref(), Some("gpu-training"));
        assert_eq!(settings.mode, Some(CheckpointMode::Application));
        assert_eq!(settings.dataset, Some(DatasetRef::Pvc("imagenet".into())));
        assert_eq!(settings.user.as_deref(), Some("alice"));
        assert_eq!(
            settings.checkpoint_interval,
            Some(IntervalSetting::Every(Duration::from_secs(900)))
        );
        assert_eq!(settings.replicate_to, Some(2));
        assert_eq!(settings.cooldown, Some(Duration::from_secs(3600)));
        assert_eq!(
            settings.user_latency,
            BTreeMap::from([
                ("edge-1".to_string(), Duration::from_millis(12)),
                ("edge-2".to_string(), Duration::from_millis(1005)),
            ])
        );
    }

    #[test]
    fn user_latency_is_validated() {
        for (value, reason) in [
            ("edge-1", "`edge-1` is not `NODE=DURATION`"),
            ("Edge_1=5ms", "`Edge_1` is not a node name"),
            ("edge-1=soon", "edge-1: "),
            ("edge-1=5ms,edge-1=6ms", "node `edge-1` is listed twice"),
            (" , ", "expected at least one `NODE=DURATION` pair"),
        ] {
            let (settings, errors) = parse(
                "ml",
                "p",
                &annotations(&[(USER, "alice"), (USER_LATENCY, value)]),
            );
            assert!(settings.user_latency.is_empty(), "{value}");
            assert_eq!(errors.len(), 1, "{value}: {errors:?}");
            assert!(
                errors[0].reason.starts_with(reason),
                "{value}: {} does not start with {reason}",
                errors[0].reason
            );
        }
    }

    #[test]
    fn user_latency_needs_a_user() {
        let (settings, errors) = parse("ml", "p", &annotations(&[(USER_LATENCY, "edge-1=5ms")]));
        assert!(settings.user_latency.is_empty());
        assert_eq!(
            errors[0].to_string(),
            "pod ml/p: annotation automigrate.dev/user-latency=\"edge-1=5ms\": needs automigrate.dev/user: the latencies are that user's"
        );
    }

    #[test]
    fn auto_interval_and_paths() {
        let (settings, errors) = parse(
            "ml",
            "trainer-0",
            &annotations(&[(CHECKPOINT_INTERVAL, "auto"), (DATASET, "/data/esc50")]),
        );
        assert!(errors.is_empty());
        assert_eq!(settings.checkpoint_interval, Some(IntervalSetting::Auto));
        assert_eq!(
            settings.dataset,
            Some(DatasetRef::Path("/data/esc50".into()))
        );
        assert!(!settings.protect, "protect defaults to false");
    }

    #[test]
    fn reports_every_bad_annotation_with_pod_key_and_reason() {
        let (settings, errors) = parse(
            "ml",
            "trainer-0",
            &annotations(&[
                (USER, "bob"),
                (PROTECT, "yes"),
                (MODE, "fast"),
                (DATASET, "data/relative"),
                (REPLICATE_TO, "11"),
                ("automigrate.dev/protected", "true"),
                (CHECKPOINT_INTERVAL, "often"),
            ]),
        );
        assert!(!settings.protect, "a malformed protect does not protect");
        assert_eq!(
            settings.user.as_deref(),
            Some("bob"),
            "valid keys still apply"
        );
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 6, "{messages:#?}");
        let expected = [
            "pod ml/trainer-0: annotation automigrate.dev/checkpoint-interval=\"often\": ",
            "pod ml/trainer-0: annotation automigrate.dev/dataset=\"data/relative\": expected an absolute path or `pvc:NAME`",
            "pod ml/trainer-0: annotation automigrate.dev/mode=\"fast\": expected `transparent` or `application`",
            "pod ml/trainer-0: annotation automigrate.dev/protect=\"yes\": expected `true` or `false`",
            "pod ml/trainer-0: annotation automigrate.dev/protected=\"true\": unknown annotation; known keys: ",
            "pod ml/trainer-0: annotation automigrate.dev/replicate-to=\"11\": expected a whole number from 0 to 10",
        ];
        for (message, prefix) in messages.iter().zip(expected) {
            assert!(
                message.starts_with(prefix),
                "{message} does not start with {prefix}"
            );
        }
    }

    #[test]
    fn checkpoint_interval_obeys_the_policy_floor() {
        // Issue 14, finding 4: `0s` was taken, a checkpoint every pass; a policy refuses it.
        for value in ["0s", "0ms", "500ms"] {
            let (settings, errors) =
                parse("ml", "p", &annotations(&[(CHECKPOINT_INTERVAL, value)]));
            assert_eq!(settings.checkpoint_interval, None, "{value} is not applied");
            assert_eq!(errors.len(), 1, "{value}: {errors:?}");
            assert!(
                errors[0]
                    .reason
                    .contains("is below 1s, the shortest checkpoint interval"),
                "{value}: {}",
                errors[0].reason
            );
        }
        // The same words as a policy's refusal of the same value.
        let policy_issues =
            crate::policy::Policy::from_yaml("p", "checkpoint: {minInterval: 0s, interval: 0s}")
                .unwrap_err()
                .issues;
        let (_, errors) = parse("ml", "p", &annotations(&[(CHECKPOINT_INTERVAL, "0s")]));
        assert!(
            policy_issues
                .iter()
                .any(|issue| issue.reason == errors[0].reason),
            "{policy_issues:?} vs {}",
            errors[0].reason
        );
        let (settings, errors) = parse("ml", "p", &annotations(&[(CHECKPOINT_INTERVAL, "1s")]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            settings.checkpoint_interval,
            Some(IntervalSetting::Every(Duration::from_secs(1)))
        );
    }

    #[test]
    fn rejects_traversal_in_dataset_paths() {
        let (_, errors) = parse(
            "ml",
            "trainer-0",
            &annotations(&[(DATASET, "/data/../etc")]),
        );
        assert_eq!(errors[0].reason, "the path must not contain `..`");
    }
}
