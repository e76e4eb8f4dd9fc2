//! Node assessment: is a node healthy, degrading, failed, or not yet known to be either?
//!
//! The verdict depends on the policy (which conditions count, which grace periods, which alerts),
//! so it is computed per (policy, node). The latency trigger has a hysteresis band, which needs
//! to remember whether the node was already over the line: that bit lives in the engine's
//! memory and is passed in and out, keeping this function pure.

use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::{Alert, ConditionStatus, Node};
use crate::policy::Policy;
use crate::units::{self, format_duration};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeState {
    Healthy,
    /// Something is off but not yet past its grace period (e.g. NotReady for 5 s of 20 s).
    /// Not a migration target, not a reason to migrate yet.
    Suspect,
    /// Still running, but a problem condition, latency or alert says it will not for long:
    /// migrate its pods away proactively, with a fresh checkpoint.
    Degraded,
    /// Gone: its pods must be restored elsewhere from a stored checkpoint.
    Failed,
}

/// A node's verdict and the reasons behind it, in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Assessment {
    pub state: NodeState,
    pub reasons: Vec<String>,
    /// When the node stopped working (last heartbeat or Ready transition), for failed nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<Timestamp>,
    /// The node may receive a migrated pod (healthy, Ready, not cordoned).
    pub schedulable: bool,
}

/// What besides the node object bears on its health.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signals<'a> {
    /// Median RTT of the links measured to or from this node.
    pub median_peer_rtt: Option<Duration>,
    /// Firing alerts whose `node` label names this node.
    pub alerts: &'a [&'a Alert],
    /// Whether the latency trigger was tripped for this node in the previous pass.
    pub latency_was_degraded: bool,
    /// What the other nodes' agents see of this node right now (`None`: not measured).
    pub peer_reach: Option<PeerReach>,
}

/// How many peers probe a node and how many of them get answers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerReach {
    pub probing: usize,
    pub reaching: usize,
}

/// Peer-confirmed failure needs at least this many peers probing the node, so that one flaky
/// probe path cannot condemn it.
pub const PEER_CONFIRMED_MIN_PEERS: usize = 2;

/// Slack past one heartbeat period before a peer-confirmed failure: a healthy node's Lease is
/// up to one renewal old, plus the API server's and the watch's delay and renewal jitter.
pub const PEER_CONFIRMED_SLACK: Duration = Duration::from_secs(2);

/// The heartbeat silence after which a node no peer reaches counts as failed: one renewal
/// period (`triggers.heartbeatInterval`) plus [`PEER_CONFIRMED_SLACK`], so at least one renewal
/// was missed. Never longer than the Lease timeout (which fails the node on its own).
pub fn peer_confirmed_silence(heartbeat_interval: Duration, lease_timeout: Duration) -> Duration {
    heartbeat_interval
        .saturating_add(PEER_CONFIRMED_SLACK)
        .min(lease_timeout)
}

/// Judges one node under one policy. Returns the verdict and whether the latency trigger is
/// tripped now (to remember for the next pass).
pub fn assess(
    node: &Node,
    signals: Signals<'_>,
    policy: &Policy,
    now: Timestamp,
) -> (Assessment, bool) {
    let triggers = &policy.triggers;
    let mut failed = Vec::new();
    let mut failed_at: Option<Timestamp> = None;
    let mut suspect = Vec::new();
    let mut degraded = Vec::new();

    let ready = node.condition("Ready");
    match ready {
        Some(condition) if condition.status != ConditionStatus::True => {
            let since = condition.since.unwrap_or(now);
            let how_long = units::age(now, since);
            let text = format!(
                "Ready is {:?} for {} (grace {})",
                condition.status,
                format_duration(how_long),
                format_duration(triggers.not_ready_grace)
            );
            if how_long >= triggers.not_ready_grace {
                failed.push(text);
                failed_at = Some(since);
            } else {
                suspect.push(text);
            }
        }
        Some(_) => {}
        None => suspect.push("no Ready condition reported yet".to_string()),
    }

    // Peer-confirmed failure: no peer reaches the node AND its heartbeat has stopped. Either
    // alone is not enough (a flaky probe path; a slow Lease renewal).
    let unreachable = signals
        .peer_reach
        .filter(|reach| reach.probing >= PEER_CONFIRMED_MIN_PEERS && reach.reaching == 0);
    if let Some(heartbeat) = node.last_heartbeat {
        let silent = units::age(now, heartbeat);
        let confirmed_after =
            peer_confirmed_silence(triggers.heartbeat_interval, triggers.lease_timeout);
        if silent >= triggers.lease_timeout {
            failed.push(format!(
                "lease not renewed for {} (timeout {})",
                format_duration(silent),
                format_duration(triggers.lease_timeout)
            ));
            failed_at = Some(failed_at.map_or(heartbeat, |at| at.min(heartbeat)));
        } else if let Some(reach) = unreachable
            && silent >= confirmed_after
        {
            failed.push(format!(
                "none of the {} peers probing it reaches it and its lease is {} old (peer-confirmed after {})",
                reach.probing,
                format_duration(silent),
                format_duration(confirmed_after)
            ));
            failed_at = Some(failed_at.map_or(heartbeat, |at| at.min(heartbeat)));
        }
    }
    if let Some(reach) = unreachable
        && failed.is_empty()
    {
        suspect.push(format!(
            "none of the {} peers probing it reaches it",
            reach.probing
        ));
    }

    for condition in &node.conditions {
        if condition.status == ConditionStatus::True
            && triggers.conditions.contains(&condition.kind)
        {
            let mut text = format!("{} is True", condition.kind);
            if let Some(reason) = &condition.reason {
                text.push_str(&format!(" ({reason})"));
            }
            degraded.push(text);
        }
    }

    let mut latency_degraded = false;
    if let (Some(band), Some(rtt)) = (&triggers.latency, signals.median_peer_rtt) {
        latency_degraded = if signals.latency_was_degraded {
            rtt >= band.clear_below()
        } else {
            rtt > band.threshold
        };
        if latency_degraded {
            degraded.push(format!(
                "median peer RTT {} over threshold {} (clears below {})",
                format_duration(rtt),
                format_duration(band.threshold),
                format_duration(band.clear_below())
            ));
        }
    }

    for alert in signals.alerts {
        if triggers.alerts.contains(&alert.name) {
            degraded.push(format!("alert {} is firing", alert.name));
        }
    }

    let (state, reasons) = if !failed.is_empty() {
        (NodeState::Failed, failed)
    } else if !degraded.is_empty() {
        degraded.extend(suspect);
        (NodeState::Degraded, degraded)
    } else if !suspect.is_empty() {
        (NodeState::Suspect, suspect)
    } else {
        (NodeState::Healthy, Vec::new())
    };
    let schedulable = state == NodeState::Healthy && !node.unschedulable;
    let assessment = Assessment {
        state,
        reasons,
        failed_at: if state == NodeState::Failed {
            failed_at
        } else {
            None
        },
        schedulable,
    };
    (assessment, latency_degraded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::NodeBuilder;
    use crate::model::AlertStatus;
    use crate::policy::Band;

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    #[test]
    fn ready_node_with_fresh_lease_is_healthy() {
        let node = NodeBuilder::new("a").heartbeat(t(-5)).build();
        let (assessment, _) = assess(&node, Signals::default(), &Policy::default(), t(0));
        assert_eq!(assessment.state, NodeState::Healthy);
        assert!(assessment.schedulable);
    }

    #[test]
    fn not_ready_is_suspect_within_grace_and_failed_after() {
        let node = NodeBuilder::new("a").not_ready_since(t(0)).build();
        let policy = Policy::default();
        let (early, _) = assess(&node, Signals::default(), &policy, t(5));
        assert_eq!(early.state, NodeState::Suspect);
        assert!(!early.schedulable);
        let (late, _) = assess(&node, Signals::default(), &policy, t(20));
        assert_eq!(late.state, NodeState::Failed);
        assert_eq!(late.failed_at, Some(t(0)));
        assert_eq!(late.reasons, ["Ready is Unknown for 20s (grace 20s)"]);
    }

    #[test]
    fn stale_lease_means_failed_even_if_ready_is_stale_true() {
        let node = NodeBuilder::new("a").heartbeat(t(-31)).build();
        let (assessment, _) = assess(&node, Signals::default(), &Policy::default(), t(0));
        assert_eq!(assessment.state, NodeState::Failed);
        assert_eq!(assessment.failed_at, Some(t(-31)));
    }

    #[test]
    fn problem_conditions_and_alerts_degrade() {
        let node = NodeBuilder::new("a")
            .condition("KernelDeadlock", ConditionStatus::True)
            .build();
        let mut policy = Policy::default();
        let (assessment, _) = assess(&node, Signals::default(), &policy, t(0));
        assert_eq!(assessment.state, NodeState::Degraded);
        assert_eq!(assessment.reasons, ["KernelDeadlock is True"]);

        let healthy = NodeBuilder::new("b").build();
        let alert = Alert {
            name: "NodeDiskFailing".into(),
            status: AlertStatus::Firing,
            labels: [("node".to_string(), "b".to_string())].into(),
            starts_at: None,
        };
        let alerts = [&alert];
        let signals = Signals {
            alerts: &alerts,
            ..Signals::default()
        };
        let (ignored, _) = assess(&healthy, signals, &policy, t(0));
        assert_eq!(
            ignored.state,
            NodeState::Healthy,
            "alert not honoured by the policy"
        );
        policy.triggers.alerts.push("NodeDiskFailing".into());
        let (honoured, _) = assess(&healthy, signals, &policy, t(0));
        assert_eq!(honoured.state, NodeState::Degraded);
    }

    #[test]
    fn latency_trigger_has_hysteresis() {
        let node = NodeBuilder::new("a").build();
        let mut policy = Policy::default();
        policy.triggers.latency = Some(Band {
            threshold: Duration::from_millis(50),
            hysteresis: Duration::from_millis(15),
        });
        let mut tripped = false;
        let mut states = Vec::new();
        for rtt in [40, 55, 45, 36, 34, 45, 51] {
            let signals = Signals {
                median_peer_rtt: Some(Duration::from_millis(rtt)),
                latency_was_degraded: tripped,
                ..Signals::default()
            };
            let (assessment, now_tripped) = assess(&node, signals, &policy, t(0));
            tripped = now_tripped;
            states.push(assessment.state == NodeState::Degraded);
        }
        assert_eq!(states, [false, true, true, true, false, false, true]);
    }

    fn reach(probing: usize, reaching: usize) -> Signals<'static> {
        Signals {
            peer_reach: Some(PeerReach { probing, reaching }),
            ..Signals::default()
        }
    }

    /// Both signals must agree: unreachable by every peer but renewing, or silent but
    /// reachable, is not failed; both together fail it one renewal period plus 2 s after its
    /// last heartbeat, long before the Lease timeout. Fails if either signal alone condemns
    /// the node, if one probing peer is enough, or if the silence does not follow
    /// `triggers.heartbeatInterval`.
    #[test]
    fn peer_confirmed_failure_needs_both_signals() {
        let policy = Policy::default(); // heartbeat 10 s, leaseTimeout 30 s: after 12 s.
        let renewing = NodeBuilder::new("a").heartbeat(t(-3)).build();
        let (assessment, _) = assess(&renewing, reach(3, 0), &policy, t(0));
        assert_eq!(assessment.state, NodeState::Suspect, "{assessment:?}");
        assert!(!assessment.schedulable);
        let silent = NodeBuilder::new("a").heartbeat(t(-12)).build();
        let (assessment, _) = assess(&silent, reach(3, 1), &policy, t(0));
        assert_eq!(assessment.state, NodeState::Healthy, "{assessment:?}");
        let (assessment, _) = assess(&silent, Signals::default(), &policy, t(0));
        assert_eq!(assessment.state, NodeState::Healthy, "{assessment:?}");
        let (assessment, _) = assess(&silent, reach(3, 0), &policy, t(0));
        assert_eq!(assessment.state, NodeState::Failed, "{assessment:?}");
        assert_eq!(assessment.failed_at, Some(t(-12)));
        assert!(
            assessment.reasons[0].contains("peer-confirmed after 12s"),
            "{assessment:?}"
        );
        // A second earlier it is not.
        let (assessment, _) = assess(&silent, reach(3, 0), &policy, t(-1));
        assert_eq!(assessment.state, NodeState::Suspect, "{assessment:?}");
        // One probing peer is not enough.
        let (assessment, _) = assess(&silent, reach(1, 0), &policy, t(0));
        assert_eq!(assessment.state, NodeState::Healthy, "{assessment:?}");
    }

    /// With the local cluster's 1 s renewals, two probing peers that both lose the node fail
    /// it 3 s after its last heartbeat, 12 s before its 15 s Lease timeout; one peer that
    /// still reaches it, or only one peer probing, keeps it from failing until the timeout.
    /// Fails while the silence is a fixed 12 s (the stock kubelet's 10 s + 2 s) whatever
    /// `heartbeatInterval` says.
    #[test]
    fn peer_confirmed_failure_follows_the_heartbeat_interval() {
        let mut policy = Policy::default();
        policy.triggers.heartbeat_interval = Duration::from_secs(1);
        policy.triggers.lease_timeout = Duration::from_secs(15);
        let node = NodeBuilder::new("a").heartbeat(t(0)).build();
        let (assessment, _) = assess(&node, reach(2, 0), &policy, t(3));
        assert_eq!(assessment.state, NodeState::Failed, "{assessment:?}");
        assert_eq!(assessment.failed_at, Some(t(0)));
        let (assessment, _) = assess(&node, reach(2, 0), &policy, t(2));
        assert_eq!(assessment.state, NodeState::Suspect, "{assessment:?}");
        for blocked in [reach(2, 1), reach(1, 0), Signals::default()] {
            let (assessment, _) = assess(&node, blocked, &policy, t(14));
            assert_eq!(assessment.state, NodeState::Healthy, "{assessment:?}");
            let (assessment, _) = assess(&node, blocked, &policy, t(15));
            assert_eq!(assessment.state, NodeState::Failed, "{assessment:?}");
            assert!(
                assessment.reasons[0].contains("lease not renewed"),
                "{assessment:?}"
            );
        }
    }

    #[test]
    fn peer_confirmed_silence_stays_between_a_renewal_and_the_lease_timeout() {
        let second = Duration::from_secs(1);
        assert_eq!(
            peer_confirmed_silence(10 * second, 30 * second),
            12 * second
        );
        assert_eq!(peer_confirmed_silence(second, 15 * second), 3 * second);
        // Never longer than the Lease timeout.
        assert_eq!(
            peer_confirmed_silence(10 * second, 11 * second),
            11 * second
        );
    }
}
