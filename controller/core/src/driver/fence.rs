//! Fencing: making sure the source cannot run before anything else starts the workload.
//!
//! The rule (the operator's, now everyone's): a source whose node is alive is stopped and the
//! step waits until it is gone. A node counts as dead only once its Lease has gone unrenewed
//! for the policy's lease timeout; a fresh or missing Lease means the node may only be
//! partitioned and still running the pod, so the step waits, and the phase deadline ends the
//! migration in `Failed` without ever starting a second copy. When a silent node counts as
//! fenced is the fencing mode's rule, [`crate::fencing::dead_node`] (in the default self-fence
//! mode: once the self-fence safe time after its last heartbeat has passed, as well as the
//! lease timeout). It is then marked out of service (Kubernetes' non-graceful shutdown taint:
//! its pods are force-deleted and a kubelet that comes back evicts them instead of
//! resuming), by the driver or, in the administrator mode, by a person the driver waits for.

use std::time::Duration;

use jiff::Timestamp;

use super::port::{Observation, TargetObservation};
use crate::fencing::{self, DeadNode};
use crate::units;

/// Who confirms that a dead node's pods cannot run any more, and when: the modes and the
/// self-fence safe-time rule of [`crate::fencing`].
pub use crate::fencing::FencingMode as DeadNodeFencing;

/// What fencing needs now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceStep {
    /// Stop the live source and wait until it is gone.
    StopSource,
    /// The source cannot run: fenced.
    Fenced,
    /// Mark the dead node out of service; the reason says why it counts as dead.
    MarkOutOfService(String),
    /// Not provable yet; the phase deadline bounds the wait.
    Wait(String),
}

/// Whether the node's Lease has gone unrenewed for at least `lease_timeout`.
pub fn lease_expired(observation: &Observation, lease_timeout: Duration, now: Timestamp) -> bool {
    lease_age(observation, now).is_some_and(|age| age >= lease_timeout)
}

/// How long ago the source node last renewed its Lease.
fn lease_age(observation: &Observation, now: Timestamp) -> Option<Duration> {
    observation
        .source_renewed_at
        .map(|renewed| units::age(now, renewed))
}

/// The fencing rule. `source_alive` is what the migration believes (a fresh dump was
/// possible); the Lease decides whether a node that looks alive may be treated as dead.
pub fn fence_step(
    source: &str,
    source_alive: bool,
    observation: &Observation,
    lease_timeout: Duration,
    mode: &DeadNodeFencing,
    now: Timestamp,
) -> FenceStep {
    let expired = lease_expired(observation, lease_timeout, now);
    if source_alive && !expired {
        return FenceStep::StopSource;
    }
    if !observation.source_known {
        return if observation.source_renewed_at.is_none() {
            // Neither the node nor its Lease exists: it was removed from the cluster.
            FenceStep::Fenced
        } else {
            FenceStep::Wait(format!(
                "node {source} is not in the node list but its Lease exists"
            ))
        };
    }
    match fencing::dead_node(
        mode,
        source,
        lease_timeout,
        observation.source_renewed_at,
        now,
    ) {
        DeadNode::Wait(why) => FenceStep::Wait(why),
        _ if observation.source_out_of_service => FenceStep::Fenced,
        DeadNode::AskAdministrator(why) => FenceStep::Wait(why),
        DeadNode::Fenced(reason) => FenceStep::MarkOutOfService(reason),
    }
}

/// Why the target node counts as lost, or `None` while it may be alive. Lost: marked out of
/// service, removed from the cluster (no Node, no Lease), or its Lease unrenewed for the lease
/// timeout (the node that failed the fault suite's f007-td was powered off). A lost target is
/// not retried on: nothing started there can be reached, so the migration rolls back at once
/// instead of retrying until the phase deadline. Lost is not fenced: whether what runs there
/// has stopped is still [`target_fenced`]'s question.
pub fn target_lost(
    target: &str,
    observed: &TargetObservation,
    lease_timeout: Duration,
    now: Timestamp,
) -> Option<String> {
    if observed.out_of_service {
        return Some(format!("node {target} is marked out of service"));
    }
    match observed.renewed_at {
        None if observed.gone => Some(format!("node {target} was removed from the cluster")),
        Some(renewed) if units::age(now, renewed) >= lease_timeout => Some(format!(
            "node {target} has not renewed its Lease for {} (timeout {})",
            units::format_duration(units::age(now, renewed)),
            units::format_duration(lease_timeout)
        )),
        _ => None,
    }
}

/// Whether what runs on the target node can no longer run, by the same rule as a dead
/// source ([`crate::fencing::dead_node`], or the out-of-service taint): only then may the
/// replacement's pod object there be removed without the node's kubelet confirming it.
pub fn target_fenced(
    target: &str,
    observed: &TargetObservation,
    lease_timeout: Duration,
    mode: &DeadNodeFencing,
    now: Timestamp,
) -> bool {
    observed.out_of_service
        || (observed.gone && observed.renewed_at.is_none())
        || matches!(
            fencing::dead_node(mode, target, lease_timeout, observed.renewed_at, now),
            DeadNode::Fenced(_)
        )
}
