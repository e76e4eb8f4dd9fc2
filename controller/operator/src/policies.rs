//! Policy ConfigMaps (label `automigrate.dev/policy: "true"`, YAML under `policy.yaml`) loaded
//! into the engine's [`PolicySet`] as they change: hot reload without a restart.
//!
//! Validation and the last-valid rule are the core's ([`PolicySet::apply`]): an edit that does
//! not validate leaves the previous version of that policy in force. The loader adds what only
//! a controller can do: a Warning Event `InvalidPolicy` on the ConfigMap naming every issue (so
//! `kubectl describe configmap` shows why the edit did nothing), a Normal Event `PolicyLoaded`
//! for accepted edits, and removal of policies whose ConfigMap was deleted or lost the label
//! (including those that vanished while the watch was down: a relist drops every name it did not
//! see).

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use automigrate_core::fencing::FencingMode;
use automigrate_core::policy::{
    Applied, ConfigMapDocument, POLICY_LABEL, Policy, PolicyError, PolicyIssue, PolicySet,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::events::EventType;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};

use crate::writer::Writer;

/// The policies in force, shared by the loader (writes) and the decision pass (reads).
pub type SharedPolicies = Arc<RwLock<PolicySet>>;

/// Label selector of policy ConfigMaps.
pub fn label_selector() -> String {
    format!("{POLICY_LABEL}=true")
}

/// What one ConfigMap did to the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied(Applied),
    Rejected(PolicyError),
}

#[derive(Debug, Clone)]
pub struct PolicyLoader {
    policies: SharedPolicies,
    writer: Writer,
    /// The dead-node fencing mode in force: in self-fence mode its timing refuses policies
    /// under which its rule cannot work ([`automigrate_core::fencing::SelfFenceTiming::check_policy`]).
    fencing: FencingMode,
}

impl PolicyLoader {
    pub fn new(policies: SharedPolicies, writer: Writer) -> Self {
        Self {
            policies,
            writer,
            fencing: FencingMode::default(),
        }
    }

    /// Checks every policy against `fencing` too.
    pub fn with_fencing(mut self, fencing: FencingMode) -> Self {
        self.fencing = fencing;
        self
    }

    /// The issues the fencing mode finds with `policy`.
    fn fencing_issues(&self, policy: &Policy) -> Vec<PolicyIssue> {
        match &self.fencing {
            FencingMode::SelfFence(timing) => timing.check_policy(policy),
            FencingMode::Taint | FencingMode::Administrator => Vec::new(),
        }
    }

    fn document(config_map: &ConfigMap) -> Result<ConfigMapDocument, PolicyError> {
        let mut value = serde_json::to_value(config_map).map_err(|error| PolicyError {
            policy: config_map.metadata.name.clone().unwrap_or_default(),
            issues: vec![automigrate_core::policy::PolicyIssue {
                path: "(configmap)".into(),
                reason: error.to_string(),
            }],
        })?;
        if let Some(object) = value.as_object_mut() {
            object.insert("kind".into(), "ConfigMap".into());
        }
        serde_json::from_value(value).map_err(|error| PolicyError {
            policy: config_map.metadata.name.clone().unwrap_or_default(),
            issues: vec![automigrate_core::policy::PolicyIssue {
                path: "(configmap)".into(),
                reason: error.to_string(),
            }],
        })
    }

    /// Applies one ConfigMap's policy and reports it with an Event.
    #[tracing::instrument(level = "info", skip_all, fields(configmap = config_map.metadata.name.as_deref().unwrap_or("")))]
    pub async fn apply(&self, config_map: &ConfigMap) -> Outcome {
        let name = config_map.metadata.name.clone().unwrap_or_default();
        let result = Self::document(config_map).and_then(|document| {
            let text = document.policy_text()?.to_string();
            let mut set = self.policies.write().map_err(|_| PolicyError {
                policy: name.clone(),
                issues: vec![],
            })?;
            set.apply_checked(&name, &text, |policy| self.fencing_issues(policy))
        });
        let reference = config_map.object_ref(&());
        match result {
            Ok(applied) => {
                if applied != Applied::Unchanged {
                    tracing::info!(policy = %name, ?applied, "policy loaded");
                    self.writer
                        .event(
                            reference,
                            EventType::Normal,
                            "PolicyLoaded",
                            format!("policy `{name}` is in force ({applied:?})"),
                            "LoadPolicy",
                        )
                        .await;
                }
                Outcome::Applied(applied)
            }
            Err(error) => {
                let kept = self
                    .policies
                    .read()
                    .map(|set| set.get(&name).is_some())
                    .unwrap_or(false);
                tracing::warn!(policy = %name, %error, kept_previous = kept, "policy rejected");
                metrics::counter!(crate::metrics::POLICY_REJECTIONS, "policy" => name.clone())
                    .increment(1);
                let note = if kept {
                    format!("{error}; the last valid version stays in force")
                } else {
                    format!(
                        "{error}; no valid version exists, pods fall back to the default policy"
                    )
                };
                self.writer
                    .event(
                        reference,
                        EventType::Warning,
                        "InvalidPolicy",
                        note,
                        "LoadPolicy",
                    )
                    .await;
                Outcome::Rejected(error)
            }
        }
    }

    pub fn remove(&self, name: &str) -> bool {
        let removed = self
            .policies
            .write()
            .map(|mut set| set.delete(name))
            .unwrap_or(false);
        if removed {
            tracing::info!(policy = name, "policy removed");
        }
        removed
    }

    /// Follows the policy ConfigMaps until the watch stream ends.
    pub async fn run(self, api: Api<ConfigMap>) {
        let config = watcher::Config::default().labels(&label_selector());
        let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
        let mut relisted: Option<BTreeSet<String>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => relisted = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(config_map)) => {
                    if let (Some(seen), Some(name)) = (relisted.as_mut(), &config_map.metadata.name)
                    {
                        seen.insert(name.clone());
                    }
                    self.apply(&config_map).await;
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = relisted.take() {
                        let known: Vec<String> = self
                            .policies
                            .read()
                            .map(|set| set.names().map(String::from).collect())
                            .unwrap_or_default();
                        for name in known.iter().filter(|name| !seen.contains(*name)) {
                            self.remove(name);
                        }
                    }
                }
                Ok(watcher::Event::Apply(config_map)) => {
                    self.apply(&config_map).await;
                }
                Ok(watcher::Event::Delete(config_map)) => {
                    if let Some(name) = &config_map.metadata.name {
                        self.remove(name);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "policy watch error; the watcher backs off and retries");
                    crate::metrics::error("policies", "watch");
                }
            }
        }
    }
}
