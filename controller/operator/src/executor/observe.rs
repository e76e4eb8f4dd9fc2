//! What the driver reads of the cluster: the source node and pod, the replacement, the node's
//! Lease and taints (from the reflectors), a final dump that completed before a crash and the
//! stored checkpoints' copies (from the agents and the pod's latest-checkpoint annotation).

use std::sync::Arc;

use automigrate_core::driver::{CheckpointCopy, Observation, Run, TargetObservation, target_lost};
use automigrate_core::model::PodRef;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::OUT_OF_SERVICE_TAINT;
use super::port::OperatorPort;
use crate::snapshot::{self, is_terminated};

impl OperatorPort<'_> {
    pub(super) fn pod_ref(&self) -> PodRef {
        PodRef::new(
            self.current.namespace().unwrap_or_default(),
            &self.current.spec.pod,
        )
    }

    /// The source pod, unless a pod of the same name with another UID replaced it.
    pub(super) fn source_pod(&self) -> Option<Arc<Pod>> {
        let namespace = self.current.namespace()?;
        let pod = self
            .executor
            .stores
            .pod(&namespace, &self.current.spec.pod)?;
        match &self.status.source_pod_uid {
            Some(uid) if pod.metadata.uid.as_deref() != Some(uid.as_str()) => None,
            _ => Some(pod),
        }
    }

    /// A node is unreachable when its Ready condition is not True, or it is gone.
    pub(super) fn node_unreachable(&self, node: &str) -> bool {
        let Some(node) = self.executor.stores.node(node) else {
            return true;
        };
        !node
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|condition| condition.type_ == "Ready" && condition.status == "True")
            })
    }

    /// The node's last heartbeat: its Lease's renewTime.
    pub(super) fn lease_renewed(&self, node: &str) -> Option<Timestamp> {
        let lease = self.executor.stores.node_lease(node)?;
        Some(lease.spec.as_ref()?.renew_time.as_ref()?.0)
    }

    pub(super) fn observation(&self, run: &Run) -> Observation {
        let source = &run.state.source;
        let node = self.executor.stores.node(source);
        let source_running = self
            .source_pod()
            .is_some_and(|pod| !is_terminated(&pod) && pod.metadata.deletion_timestamp.is_none());
        let target_running = self
            .status
            .replacement_pod
            .as_deref()
            .zip(self.current.namespace())
            .and_then(|(name, namespace)| self.executor.stores.pod(&namespace, name))
            .is_some_and(|pod| {
                pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            });
        let out_of_service = self.out_of_service(source);
        Observation {
            source_reachable: !self.node_unreachable(source),
            source_running,
            target_running,
            source_known: node.is_some(),
            source_renewed_at: self.lease_renewed(source),
            source_out_of_service: out_of_service,
        }
    }

    /// Whether the node carries the out-of-service taint.
    fn out_of_service(&self, node: &str) -> bool {
        self.executor
            .stores
            .node(node)
            .as_ref()
            .and_then(|node| node.spec.as_ref())
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|taint| taint.key == OUT_OF_SERVICE_TAINT))
    }

    /// What the reflectors show of `node` as a target: gone, its Lease, its taint.
    pub(super) fn target_observation(&self, node: &str) -> TargetObservation {
        TargetObservation {
            gone: self.executor.stores.node(node).is_none(),
            renewed_at: self.lease_renewed(node),
            out_of_service: self.out_of_service(node),
        }
    }

    /// A verified checkpoint on the source taken at or after `since` (a final dump that
    /// completed before a crash).
    pub(super) async fn final_dump(&self, since: Timestamp) -> Option<String> {
        let pod = self.pod_ref();
        let list = self
            .executor
            .agent
            .checkpoints(&self.status.state.source, &pod)
            .await
            .ok()?;
        list.into_iter()
            .find(|checkpoint| checkpoint.verified && checkpoint.created_at >= since)
            .map(|checkpoint| checkpoint.id)
    }

    /// Whether a node cannot send a checkpoint it holds: unreachable ([`Self::node_unreachable`])
    /// or lost by the same rule as a target ([`target_lost`]: out of service, removed, or its
    /// Lease unrenewed for the lease timeout). Ready alone is not enough: it stays True on a
    /// dead node until Kubernetes' node lifecycle controller marks it 40–50 s later (never in
    /// the local cluster), and a copy chosen on a dead node was asked for until the phase
    /// deadline (issue 12 campaign, f084-td).
    fn holder_lost(&self, node: &str, run: &Run) -> bool {
        self.node_unreachable(node)
            || target_lost(
                node,
                &self.target_observation(node),
                run.lease_timeout,
                self.clock_now(),
            )
            .is_some()
    }

    /// The copies of the pod's stored checkpoints on nodes that can send them
    /// ([`Self::holder_lost`]): the latest one, from the pod's annotation (its holders verified
    /// it), and every checkpoint of the pod that the agent of such a node other than the
    /// source lists, with its verification.
    pub(super) async fn checkpoint_copies(&self, run: &Run) -> Vec<CheckpointCopy> {
        let latest = self
            .source_pod()
            .and_then(|pod| snapshot::latest_checkpoint(&pod))
            .or_else(|| {
                let record = self.status.source_pod.as_ref()?;
                let pod: Pod = serde_json::from_value(record.clone()).ok()?;
                snapshot::latest_checkpoint(&pod)
            });
        let mut copies = Vec::new();
        if let Some(info) = &latest {
            for node in &info.held_on {
                if self.holder_lost(node, run) {
                    continue;
                }
                copies.push(CheckpointCopy {
                    id: info.id.clone(),
                    taken_at: info.taken_at,
                    node: node.clone(),
                    verified: true,
                    rtt_to_target: None,
                });
            }
        }
        // The annotation names a replica only once the controller saw its transfer succeed,
        // by polling the sender: a copy that landed just before the source died is held but
        // never recorded, and without it the workload would restart from the beginning. So
        // every surviving agent is asked what it holds (each verifies what it stores); the
        // driver chooses among all of it. Asked only when the driver chooses a checkpoint.
        let pod = self.pod_ref();
        let mut survivors: Vec<String> = self
            .executor
            .stores
            .nodes
            .state()
            .iter()
            .filter_map(|node| node.metadata.name.clone())
            .collect();
        survivors.sort();
        for node in survivors {
            if node == run.state.source || self.holder_lost(&node, run) {
                continue;
            }
            // A node that dies while it is asked holds nothing.
            let listing = self.executor.agent.checkpoints(&node, &pod);
            let doing = "listing its checkpoints";
            let Ok(Ok(list)) = self
                .unless_lease_expires(&node, run.lease_timeout, doing, listing)
                .await
            else {
                continue;
            };
            copies.extend(list.into_iter().map(|checkpoint| CheckpointCopy {
                id: checkpoint.id,
                taken_at: checkpoint.created_at,
                node: node.clone(),
                verified: checkpoint.verified,
                rtt_to_target: None,
            }));
        }
        copies
    }
}
