//! The pod side of a migration: the final dump of the source (by its agent), stopping the
//! source, creating the replacement (or the rollback's pod) from the recorded source, waiting
//! for it to be Ready, and stopping it again.

use automigrate_core::annotations::CheckpointMode;
use automigrate_core::driver::{Outcome, Run, target_fenced};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::port::OperatorPort;
use crate::agent::{AgentError, CheckpointKind};
use crate::replacement::{self, Restore};
use crate::snapshot::{is_ready, is_terminated};
use crate::writer::WriteError;

/// How often a step that waits on a node's agent looks at that node's Lease.
const LEASE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) fn agent_failure(error: &AgentError) -> Outcome {
    Outcome::Failed {
        reason: error.to_string(),
        retryable: error.retryable(),
    }
}

pub(super) fn write_failure(error: &WriteError) -> Outcome {
    Outcome::Failed {
        reason: error.to_string(),
        retryable: !matches!(error, WriteError::NotLeader),
    }
}

fn unrecorded() -> Outcome {
    Outcome::Failed {
        reason: "the source pod was not recorded when the migration began".into(),
        retryable: false,
    }
}

impl OperatorPort<'_> {
    fn namespace(&self) -> String {
        self.current.namespace().unwrap_or_default()
    }

    /// The final stop-and-dump of the pod's first container, by the source's agent.
    pub(super) async fn final_checkpoint(&self, run: &Run) -> Outcome {
        let Some(container) = self
            .status
            .source_pod
            .as_ref()
            .and_then(|pod| pod.pointer("/spec/containers/0/name"))
            .and_then(|name| name.as_str())
        else {
            return Outcome::Failed {
                reason: "the recorded source pod has no container".into(),
                retryable: false,
            };
        };
        let pod = self.pod_ref();
        let dump = self.executor.agent.checkpoint(
            &run.state.source,
            &pod,
            container,
            CheckpointKind::Final,
        );
        // A dump asked of a node that then dies never answers (its TCP peer is gone without a
        // word): the call is given up once the node's Lease expires, so that the driver sees
        // the lost source and goes on from a stored checkpoint (fault suite, issue 16
        // campaign: a node powered off or cut off 0.1–0.3 s into Checkpointing held the phase
        // 31 s). Biased: a dump that did finish wins.
        tokio::select! {
            biased;
            answer = dump => match answer {
                Ok(taken) => Outcome::Done {
                    checkpoint_id: Some(taken.id),
                },
                Err(error) => agent_failure(&error),
            },
            reason = self.lease_expiry(&run.state.source, run.lease_timeout, "dumping") => Outcome::Failed {
                reason,
                retryable: true,
            },
        }
    }

    /// Resolves once `node`'s Lease is `lease_timeout` old (never while it has none), with
    /// the reason (`doing`: what the call to the node was doing); checks every second.
    pub(super) async fn lease_expiry(
        &self,
        node: &str,
        lease_timeout: std::time::Duration,
        doing: &str,
    ) -> String {
        loop {
            if let Some(age) = self.lease_age(node)
                && age >= lease_timeout
            {
                return format!(
                    "node {node} stopped renewing its Lease ({} old, timeout {}) while {doing}; the call is given up",
                    automigrate_core::units::format_duration(age),
                    automigrate_core::units::format_duration(lease_timeout)
                );
            }
            tokio::time::sleep(LEASE_CHECK_INTERVAL).await;
        }
    }

    /// How long ago `node` last renewed its Lease, by the round's clock (none without a Lease).
    fn lease_age(&self, node: &str) -> Option<std::time::Duration> {
        let renewed = self.lease_renewed(node)?;
        Some(automigrate_core::units::age(self.clock_now(), renewed))
    }

    /// `call`'s answer, or the reason it was given up (`Err`): a node powered off or cut off
    /// never answers (no TCP word comes from it), so a call to `node` ends once the node's
    /// Lease expires ([`Self::lease_expiry`]) and the next round sees the lost node. Only a
    /// Lease still fresh when the call begins cuts it short: a call to a node whose Lease had
    /// already expired is not (its kubelet may be down while its agent serves; the driver's
    /// own rules decide what such a node means). Biased: an answer that did come wins.
    pub(super) async fn unless_lease_expires<T>(
        &self,
        node: &str,
        lease_timeout: std::time::Duration,
        doing: &str,
        call: impl std::future::Future<Output = T>,
    ) -> Result<T, String> {
        let expiry = async {
            if self.lease_age(node).is_some_and(|age| age >= lease_timeout) {
                std::future::pending::<()>().await;
            }
            self.lease_expiry(node, lease_timeout, doing).await
        };
        tokio::select! {
            biased;
            answer = call => Ok(answer),
            reason = expiry => Err(reason),
        }
    }

    /// Stops a live source: delete its pod and wait until it is gone.
    pub(super) async fn stop_source(&self) -> Outcome {
        let Some(pod) = self.source_pod() else {
            return Outcome::done();
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Outcome::waiting("the source pod is terminating");
        }
        match self
            .executor
            .writer
            .delete_pod(
                &self.namespace(),
                &pod.name_any(),
                pod.metadata.uid.clone(),
                None,
            )
            .await
        {
            Ok(()) => Outcome::waiting("the source pod was asked to stop"),
            Err(error) => write_failure(&error),
        }
    }

    /// The deterministic name of the migration's replacement.
    fn replacement_name(&self) -> Option<String> {
        let record: Pod = serde_json::from_value(self.status.source_pod.clone()?).ok()?;
        let uid = self
            .current
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| self.current.name_any());
        Some(replacement::replacement_name(&record, &uid))
    }

    /// Creates the migration's replacement, or the rollback's pod (named apart, `-r`), on
    /// `node` from checkpoint `from` (fresh without one).
    pub(super) async fn start_replacement(
        &mut self,
        node: &str,
        from: Option<&str>,
        rollback: bool,
    ) -> Outcome {
        let Some(base) = self.replacement_name() else {
            return unrecorded();
        };
        let name = if rollback {
            format!("{}-r", base.chars().take(61).collect::<String>())
        } else {
            base
        };
        self.status.replacement_pod = Some(name.clone());
        self.create_pod(&name, node, from).await
    }

    /// Creates a pod from the recorded source on `node`, unless one named `name` exists.
    async fn create_pod(&self, name: &str, node: &str, from: Option<&str>) -> Outcome {
        let namespace = self.namespace();
        if self.executor.stores.pod(&namespace, name).is_some() {
            return Outcome::done();
        }
        let Some(record) = self.status.source_pod.as_ref() else {
            return unrecorded();
        };
        let restore = match (from, self.status.mode) {
            (None, _) => Restore::Fresh,
            (Some(id), CheckpointMode::Transparent) => {
                // A target that dies while it builds the image: the next round sees it lost and
                // rolls back or places the pod again (fault suite, issue 12 campaign: a target
                // powered off in Restoring held the phase 31 s with a 15 s lease timeout).
                let build = self.executor.agent.build_image(node, id);
                let doing = "building the restore image";
                match self
                    .unless_lease_expires(node, self.status.lease_timeout, doing, build)
                    .await
                {
                    Ok(Ok(image)) => Restore::Transparent {
                        image,
                        checkpoint_id: id.to_string(),
                    },
                    Ok(Err(error)) => return agent_failure(&error),
                    Err(reason) => {
                        return Outcome::Failed {
                            reason,
                            retryable: true,
                        };
                    }
                }
            }
            // The agents' store layout: `<root>/<namespace>/<pod>/<id>/`, keyed by the pod the
            // checkpoint was taken of.
            (Some(id), CheckpointMode::Application) => Restore::Application {
                host_path: format!(
                    "{}/{namespace}/{}/{id}",
                    self.executor.config.checkpoint_root.trim_end_matches('/'),
                    self.current.spec.pod
                ),
                checkpoint_id: id.to_string(),
            },
        };
        let pod = match replacement::build(record, name, node, &self.current.name_any(), &restore) {
            Ok(pod) => pod,
            Err(error) => {
                return Outcome::Failed {
                    reason: error.to_string(),
                    retryable: false,
                };
            }
        };
        match self.executor.writer.create_pod(pod).await {
            Ok(_) => Outcome::done(),
            Err(error) if error.is_conflict() => Outcome::done(),
            Err(error) => write_failure(&error),
        }
    }

    /// Done once the replacement is Ready; then removes what is left of the source (on a dead
    /// node the object lingers until deleted: the kubelet that would confirm a graceful delete
    /// is gone, so it is deleted forcibly).
    pub(super) async fn check_replacement(&self, source_dead: bool) -> Outcome {
        let namespace = self.namespace();
        let Some(name) = self.status.replacement_pod.as_deref() else {
            return Outcome::Failed {
                reason: "no replacement pod recorded".into(),
                retryable: false,
            };
        };
        let Some(pod) = self.executor.stores.pod(&namespace, name) else {
            return Outcome::waiting(format!("replacement pod {name} not seen yet"));
        };
        if is_terminated(&pod) {
            return Outcome::Failed {
                reason: format!("replacement pod {name} terminated before becoming Ready"),
                retryable: false,
            };
        }
        if !is_ready(&pod) {
            return Outcome::waiting(format!("replacement pod {name} is not Ready yet"));
        }
        if let Some(old) = self.source_pod() {
            let grace = source_dead.then_some(0);
            if let Err(error) = self
                .executor
                .writer
                .delete_pod(&namespace, &old.name_any(), old.metadata.uid.clone(), grace)
                .await
            {
                return write_failure(&error);
            }
        }
        Outcome::done()
    }

    /// Stops the replacement; done once it is gone.
    pub(super) async fn stop_replacement(&self, run: &Run, now: Timestamp) -> Outcome {
        let namespace = self.namespace();
        let Some(name) = self.status.replacement_pod.clone() else {
            return Outcome::done();
        };
        let Some(pod) = self.executor.stores.pod(&namespace, &name) else {
            return Outcome::done();
        };
        // On a node that counts as fenced (dead by the fencing rule, or out of service) no
        // kubelet will confirm a graceful delete: the pod would stay Terminating and the
        // rollback behind it would wait until its deadline (fault suite f007-td). Its
        // containers cannot run, so the object is removed at once, as a dead source's is.
        let node = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.node_name.clone())
            .unwrap_or_else(|| run.state.target.clone());
        let fenced = target_fenced(
            &node,
            &self.target_observation(&node),
            run.lease_timeout,
            &self.executor.config.dead_node_fencing,
            now,
        );
        if (pod.metadata.deletion_timestamp.is_none() || fenced)
            && let Err(error) = self
                .executor
                .writer
                .delete_pod(
                    &namespace,
                    &name,
                    pod.metadata.uid.clone(),
                    fenced.then_some(0),
                )
                .await
        {
            return write_failure(&error);
        }
        Outcome::waiting(format!("stopping the replacement pod {name}"))
    }
}
