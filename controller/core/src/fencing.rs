//! Dead-node fencing: when may the controller treat a node that stopped renewing its Lease as
//! fenced (nothing of it runs any more), so that a replacement may start elsewhere?
//!
//! The controller cannot tell a powered-off node from one cut off from the API server but
//! still running its pods: both stop renewing their Lease. Three modes answer differently:
//!
//! - [`FencingMode::SelfFence`] (the default): every node's agent fences itself, following
//!   medik8s Self Node Remediation. The agent watches its own node's heartbeat (the Lease's
//!   `renewTime`), read from the API server directly or through a peer agent that reaches it.
//!   When the freshest heartbeat it knows of is `selfFenceAfter` old, it kills the protected
//!   pods' containers on its node (and, where enabled, lets the hardware watchdog reboot the
//!   node when that does not finish in `stopTime`). The controller waits for that to be over:
//!
//!   **The safe-time rule.** Let `renewTime` be the node's last heartbeat. The controller treats
//!   the node as fenced only once its own clock reads at least `renewTime + safe`, where
//!   `safe = selfFenceAfter + stopTime + clockSkew + margin`:
//!   - `selfFenceAfter`: the heartbeat age at which the agent starts killing. The agent only
//!     ever knows heartbeats that were written, so the heartbeat it counts from is never newer
//!     than the one the controller counts from: it starts killing no later than
//!     `renewTime + selfFenceAfter`.
//!   - `stopTime`: the longest the agent takes from starting to kill until every protected
//!     container is gone (its kill deadline; past it, the watchdog reboots the node).
//!   - `clockSkew`: how far the node's clock (which wrote `renewTime`, and which its agent
//!     counts with) and the controller's clock may disagree.
//!   - `margin`: scheduling delays, a check interval and rounding.
//!
//!   Nothing in the rule depends on `leaseTimeout`: that is when the node counts as *failed*
//!   (so that its migration starts), not when its pods are gone. A node failed sooner, because
//!   its heartbeat stopped and none of its peers reaches it ([`crate::health`]'s peer-confirmed
//!   failure), is fenced at `renewTime + safe` too; one failed by its Lease timeout after that
//!   is fenced at once. (Before, the wait was `max(leaseTimeout, safe)`, which only delayed a
//!   peer-confirmed failure without making it any safer.)
//!
//!   The rule assumes that the agent runs whenever the node's pods do (a DaemonSet pod; with
//!   the watchdog enabled, a hung or dead agent stops feeding it and the node reboots), that
//!   every agent's `selfFenceAfter` and `stopTime` are at most the controller's, and that the
//!   clocks are synchronised within `clockSkew` (NTP). It costs a false kill when the whole
//!   API server is down for longer than `selfFenceAfter`: no agent can learn a fresh
//!   heartbeat, so every agent fences (SNR stays up when no peer reaches the API server either;
//!   we do not, because the controller could not tell afterwards which nodes held back).
//!
//! - [`FencingMode::Taint`]: the node counts as dead as soon as its Lease is `leaseTimeout`
//!   old. It assumes a node whose Lease expired is really down: a node cut off from the API
//!   server but alive keeps running its copy next to the replacement.
//! - [`FencingMode::Administrator`]: a person (or an external remediation system) confirms the
//!   shutdown by setting the `node.kubernetes.io/out-of-service` taint. It assumes they check.
//!
//! In `SelfFence` and `Taint` mode the controller itself sets the out-of-service taint once the
//! node counts as fenced, so that the pod garbage collector may force-delete its pods and a
//! kubelet that comes back evicts them rather than resuming them.
//!
//! [`SelfFenceTiming::validate`] refuses settings under which the rule does not hold or under
//! which healthy nodes would fence themselves; [`SelfFenceTiming::check_policy`] refuses a
//! policy under which a dead node's migration could never get past fencing.

use std::time::Duration;

use jiff::Timestamp;

use crate::policy::{Policy, PolicyIssue};
use crate::units::{self, format_duration};

/// Default heartbeat age at which an agent fences its node: one kubelet Lease renewal period
/// ([`crate::policy::KUBELET_HEARTBEAT`], 10 s), the agent's check interval and slack.
pub const DEFAULT_SELF_FENCE_AFTER: Duration = Duration::from_secs(15);
/// Default longest time to kill every protected container on a node (SIGKILL, then waiting for
/// the runtime to report it stopped).
pub const DEFAULT_STOP_TIME: Duration = Duration::from_secs(5);
/// Default allowance for the difference between a node's clock and the controller's clock
/// (NTP keeps them within milliseconds; this also covers a step correction).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(2);
/// Default margin for scheduling delays and rounding.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(3);
/// Default period between two of the agent's checks of its heartbeat (its own read of the
/// Lease, or its question to the peers).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The least margin: one check interval can always be late.
pub const MIN_MARGIN: Duration = Duration::from_secs(1);
/// Slack, past one heartbeat period and one check interval, before a healthy node's heartbeat
/// may look stale to its agent (API server and network delay, renewal jitter).
pub const HEARTBEAT_SLACK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FencingError {
    #[error("{setting}: {reason}")]
    Setting {
        setting: &'static str,
        reason: String,
    },
}

/// The timing both sides of self-fencing agree on (agent flags and controller flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfFenceTiming {
    /// Heartbeat age at which the agent starts killing its node's protected containers.
    pub self_fence_after: Duration,
    /// Longest the agent takes to have them all stopped.
    pub stop_time: Duration,
    /// Allowed difference between node and controller clocks.
    pub clock_skew: Duration,
    /// Scheduling delays and rounding.
    pub margin: Duration,
    /// How often the node's Lease is renewed (the kubelet's renewal period).
    pub heartbeat_interval: Duration,
    /// How often the agent checks its heartbeat.
    pub check_interval: Duration,
}

impl Default for SelfFenceTiming {
    fn default() -> Self {
        Self {
            self_fence_after: DEFAULT_SELF_FENCE_AFTER,
            stop_time: DEFAULT_STOP_TIME,
            clock_skew: DEFAULT_CLOCK_SKEW,
            margin: DEFAULT_MARGIN,
            heartbeat_interval: crate::policy::KUBELET_HEARTBEAT,
            check_interval: DEFAULT_CHECK_INTERVAL,
        }
    }
}

impl SelfFenceTiming {
    /// `selfFenceAfter + stopTime + clockSkew + margin`: from the last heartbeat until every
    /// protected container of a node that lost its standing is stopped, with allowances.
    pub fn safe_time(&self) -> Duration {
        self.self_fence_after
            .saturating_add(self.stop_time)
            .saturating_add(self.clock_skew)
            .saturating_add(self.margin)
    }

    /// The Lease age from which a node counts as fenced: the safe time. By then its agent has
    /// stopped its protected containers, however the node came to count as failed.
    pub fn fenced_after(&self) -> Duration {
        self.safe_time()
    }

    /// The least `selfFenceAfter` at which a healthy node never fences itself: its heartbeat
    /// is up to one renewal period old, read up to one check interval late, plus slack.
    pub fn least_self_fence_after(&self) -> Duration {
        self.heartbeat_interval
            .saturating_add(self.check_interval)
            .saturating_add(HEARTBEAT_SLACK)
    }

    /// Refuses settings under which the rule does not hold, or under which healthy nodes
    /// would fence themselves.
    pub fn validate(&self) -> Result<(), FencingError> {
        let refuse = |setting, reason: String| Err(FencingError::Setting { setting, reason });
        if self.check_interval.is_zero() {
            return refuse("check interval", "must be more than 0s".into());
        }
        if self.heartbeat_interval.is_zero() {
            return refuse("heartbeat interval", "must be more than 0s".into());
        }
        if self.stop_time < self.check_interval {
            return refuse(
                "stop time",
                format!(
                    "{} is below the check interval {}: the agent could not even confirm that the containers stopped",
                    format_duration(self.stop_time),
                    format_duration(self.check_interval)
                ),
            );
        }
        if self.margin < MIN_MARGIN.max(self.check_interval) {
            return refuse(
                "margin",
                format!(
                    "{} is below {}: one check of the agent may always come that late",
                    format_duration(self.margin),
                    format_duration(MIN_MARGIN.max(self.check_interval))
                ),
            );
        }
        let least = self.least_self_fence_after();
        if self.self_fence_after < least {
            return refuse(
                "self-fence-after",
                format!(
                    "{} is below {} (heartbeat every {}, checked every {}, {} slack): a healthy node's heartbeat gets that old between two renewals, so healthy nodes would kill their own pods",
                    format_duration(self.self_fence_after),
                    format_duration(least),
                    format_duration(self.heartbeat_interval),
                    format_duration(self.check_interval),
                    format_duration(HEARTBEAT_SLACK)
                ),
            );
        }
        Ok(())
    }

    /// Issues with a policy under this timing:
    /// - A dead node's migration enters the Fencing phase no earlier than its last heartbeat
    ///   and must stay there until the node counts as fenced, the safe time after that
    ///   heartbeat: a shorter `fenceTimeout` fails every such migration in Fencing and nothing
    ///   would ever resume.
    /// - The policy's `triggers.heartbeatInterval` must not be shorter than the kubelets'
    ///   renewal period: peer-confirmed failure would then count a healthy node that only its
    ///   peers lost (a peer partition) as failed between two of its renewals.
    pub fn check_policy(&self, policy: &Policy) -> Vec<PolicyIssue> {
        let needed = self.fenced_after();
        let mut issues = Vec::new();
        if policy.restore.fence_timeout <= needed {
            issues.push(PolicyIssue {
                path: "restore.fenceTimeout".into(),
                reason: format!(
                    "{} is not above {} (the self-fencing safe time): a dead node counts as fenced only that long after its last heartbeat, so its migrations would time out in Fencing",
                    format_duration(policy.restore.fence_timeout),
                    format_duration(needed),
                ),
            });
        }
        if policy.triggers.heartbeat_interval < self.heartbeat_interval {
            issues.push(PolicyIssue {
                path: "triggers.heartbeatInterval".into(),
                reason: format!(
                    "{} is below the kubelets' renewal period {} (--heartbeat-interval): a healthy node that only its peers lost would count as failed between two renewals",
                    format_duration(policy.triggers.heartbeat_interval),
                    format_duration(self.heartbeat_interval),
                ),
            });
        }
        issues
    }
}

/// Who confirms that a dead node's pods cannot run any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencingMode {
    /// The node's agent fences itself; the controller waits out the safe time.
    SelfFence(SelfFenceTiming),
    /// The controller assumes a node whose Lease expired is down.
    Taint,
    /// A person confirms the shutdown with the out-of-service taint.
    Administrator,
}

impl Default for FencingMode {
    fn default() -> Self {
        Self::SelfFence(SelfFenceTiming::default())
    }
}

impl FencingMode {
    /// The Lease age from which a node counts as dead in this mode: the safe time when nodes
    /// fence themselves, the Lease timeout otherwise.
    pub fn dead_after(&self, lease_timeout: Duration) -> Duration {
        match self {
            Self::SelfFence(timing) => timing.fenced_after(),
            Self::Taint | Self::Administrator => lease_timeout,
        }
    }
}

/// What the controller may do about a node that stopped running its pods' source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadNode {
    /// Not (yet) known to be fenced: wait. The reason, in words.
    Wait(String),
    /// Fenced by the rule of the mode: the controller sets the out-of-service taint and the
    /// replacement may start. The reason, in words (for an Event).
    Fenced(String),
    /// Dead by its Lease, but only a person may confirm it (administrator mode).
    AskAdministrator(String),
}

/// The one decision: may a node whose last Lease renewal was `renewed` count as fenced at
/// `now`? (`None`: no renewal on record, so it may be partitioned, not dead.)
pub fn dead_node(
    mode: &FencingMode,
    node: &str,
    lease_timeout: Duration,
    renewed: Option<Timestamp>,
    now: Timestamp,
) -> DeadNode {
    let Some(renewed) = renewed else {
        return DeadNode::Wait(format!(
            "node {node} has no Lease renewal on record: it may be partitioned, not dead; not fencing"
        ));
    };
    let age = units::age(now, renewed);
    let needed = mode.dead_after(lease_timeout);
    if age < needed {
        let why = match mode {
            FencingMode::SelfFence(timing) => format!(
                "node {node} renewed its Lease {} ago: it may be partitioned, not dead; waiting until {} after it (self-fence safe time: {} self-fence-after + {} stop + {} clock skew + {} margin) before treating it as fenced",
                format_duration(age),
                format_duration(needed),
                format_duration(timing.self_fence_after),
                format_duration(timing.stop_time),
                format_duration(timing.clock_skew),
                format_duration(timing.margin)
            ),
            _ => format!(
                "node {node} renewed its Lease {} ago (timeout {}): it may be partitioned, not dead; not fencing",
                format_duration(age),
                format_duration(lease_timeout)
            ),
        };
        return DeadNode::Wait(why);
    }
    match mode {
        FencingMode::SelfFence(timing) => DeadNode::Fenced(format!(
            "Lease not renewed for {} (at least {}, the self-fence safe time after its agent's deadline): its agent has stopped its protected containers",
            format_duration(age),
            format_duration(timing.fenced_after())
        )),
        FencingMode::Taint => DeadNode::Fenced(format!(
            "Lease not renewed for over {}",
            format_duration(lease_timeout)
        )),
        FencingMode::Administrator => DeadNode::AskAdministrator(format!(
            "node {node}'s Lease expired; waiting for an administrator to confirm shutdown with the node.kubernetes.io/out-of-service taint"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn timing() -> SelfFenceTiming {
        SelfFenceTiming {
            self_fence_after: 4 * SECOND,
            stop_time: 2 * SECOND,
            clock_skew: SECOND,
            margin: SECOND,
            heartbeat_interval: SECOND,
            check_interval: SECOND,
        }
    }

    #[test]
    fn safe_time_is_the_sum_of_its_parts() {
        assert_eq!(timing().safe_time(), 8 * SECOND);
        assert_eq!(SelfFenceTiming::default().safe_time(), 25 * SECOND);
        assert_eq!(timing().fenced_after(), 8 * SECOND);
    }

    #[test]
    fn the_defaults_hold() {
        SelfFenceTiming::default().validate().unwrap();
        timing().validate().unwrap();
        assert!(
            SelfFenceTiming::default()
                .check_policy(&Policy::default())
                .is_empty()
        );
    }

    /// Every second of the safe time after the heartbeat, the controller waits; at the safe
    /// time it fences. Fails if any term is dropped from the sum or the comparison is off by
    /// one (e.g. `>` for `>=` at exactly the safe time is fine, fencing a second early is not).
    #[test]
    fn self_fence_waits_out_the_safe_time_from_the_heartbeat() {
        let mode = FencingMode::SelfFence(timing());
        let lease_timeout = 5 * SECOND;
        for second in 0..8 {
            let verdict = dead_node(&mode, "n", lease_timeout, Some(at(0)), at(second));
            assert!(
                matches!(verdict, DeadNode::Wait(_)),
                "{second}: {verdict:?}"
            );
        }
        for second in 8..12 {
            let verdict = dead_node(&mode, "n", lease_timeout, Some(at(0)), at(second));
            assert!(
                matches!(verdict, DeadNode::Fenced(_)),
                "{second}: {verdict:?}"
            );
        }
        // A longer Lease timeout does not delay it: the safe time alone says the agent is done.
        let verdict = dead_node(&mode, "n", 20 * SECOND, Some(at(0)), at(8));
        assert!(matches!(verdict, DeadNode::Fenced(_)), "{verdict:?}");
        // The reason names the parts.
        let DeadNode::Wait(reason) = dead_node(&mode, "n", lease_timeout, Some(at(0)), at(7))
        else {
            unreachable!()
        };
        assert!(
            reason.contains("8s") && reason.contains("4s self-fence-after"),
            "{reason}"
        );
    }

    /// Whatever the settings and however the heartbeat and the agent's knowledge of it relate,
    /// the controller never counts a node as fenced before its agent's kill deadline plus the
    /// stop time and skew: the property the rule exists for.
    #[test]
    fn fenced_never_before_the_agent_is_done() {
        for self_fence_after in 3..20u32 {
            for stop in 1..6u32 {
                for skew in 0..3u32 {
                    let timing = SelfFenceTiming {
                        self_fence_after: self_fence_after * SECOND,
                        stop_time: stop * SECOND,
                        clock_skew: skew * SECOND,
                        margin: SECOND,
                        heartbeat_interval: SECOND,
                        check_interval: SECOND,
                    };
                    let mode = FencingMode::SelfFence(timing);
                    // The node's clock runs `skew` ahead of the controller's: the heartbeat it
                    // wrote reads `skew` later than it was, in the worst direction.
                    for lease_timeout in [1u32, 15, 30] {
                        let heartbeat = at(0);
                        // The agent is done at heartbeat + self_fence_after + stop (node clock),
                        // which the controller's clock reads as up to `skew` later.
                        let done = i64::from(self_fence_after + stop + skew);
                        for second in 0..=done {
                            let verdict = dead_node(
                                &mode,
                                "n",
                                lease_timeout * SECOND,
                                Some(heartbeat),
                                at(second),
                            );
                            assert!(
                                !matches!(verdict, DeadNode::Fenced(_)),
                                "fenced at {second}s, agent done at {done}s: {timing:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn without_a_renewal_on_record_nothing_is_fenced() {
        for mode in [
            FencingMode::SelfFence(timing()),
            FencingMode::Taint,
            FencingMode::Administrator,
        ] {
            let verdict = dead_node(&mode, "n", SECOND, None, at(1000));
            assert!(
                matches!(verdict, DeadNode::Wait(_)),
                "{mode:?}: {verdict:?}"
            );
        }
    }

    #[test]
    fn taint_and_administrator_go_by_the_lease_timeout() {
        let verdict = dead_node(&FencingMode::Taint, "n", 30 * SECOND, Some(at(0)), at(29));
        assert!(matches!(verdict, DeadNode::Wait(_)), "{verdict:?}");
        let verdict = dead_node(&FencingMode::Taint, "n", 30 * SECOND, Some(at(0)), at(30));
        assert!(matches!(verdict, DeadNode::Fenced(_)), "{verdict:?}");
        let verdict = dead_node(
            &FencingMode::Administrator,
            "n",
            30 * SECOND,
            Some(at(0)),
            at(30),
        );
        assert!(
            matches!(verdict, DeadNode::AskAdministrator(_)),
            "{verdict:?}"
        );
        assert_eq!(
            FencingMode::default(),
            FencingMode::SelfFence(SelfFenceTiming::default())
        );
    }

    #[test]
    fn settings_under_which_the_rule_fails_are_refused_with_the_reason() {
        let refused = |timing: SelfFenceTiming, setting: &str| {
            let error = timing.validate().unwrap_err();
            assert!(error.to_string().starts_with(setting), "{error}");
            error.to_string()
        };
        // A healthy node's heartbeat is up to 10 s old: 10 s would fence healthy nodes.
        let reason = refused(
            SelfFenceTiming {
                self_fence_after: 10 * SECOND,
                ..SelfFenceTiming::default()
            },
            "self-fence-after",
        );
        assert!(reason.contains("healthy nodes would kill"), "{reason}");
        refused(
            SelfFenceTiming {
                margin: Duration::ZERO,
                ..timing()
            },
            "margin",
        );
        refused(
            SelfFenceTiming {
                stop_time: Duration::from_millis(500),
                ..timing()
            },
            "stop time",
        );
        refused(
            SelfFenceTiming {
                check_interval: Duration::ZERO,
                ..timing()
            },
            "check interval",
        );
        refused(
            SelfFenceTiming {
                heartbeat_interval: Duration::ZERO,
                ..timing()
            },
            "heartbeat interval",
        );
        // Exactly at the least value is accepted.
        SelfFenceTiming {
            self_fence_after: SelfFenceTiming::default().least_self_fence_after(),
            ..SelfFenceTiming::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn a_fence_timeout_shorter_than_the_wait_is_refused() {
        let mut policy = Policy::default();
        policy.triggers.lease_timeout = 15 * SECOND;
        let timing = SelfFenceTiming {
            self_fence_after: 60 * SECOND,
            ..SelfFenceTiming::default()
        };
        // safe = 60 + 5 + 2 + 3 = 70 s.
        policy.restore.fence_timeout = 70 * SECOND;
        let issues = timing.check_policy(&policy);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "restore.fenceTimeout");
        assert!(issues[0].reason.contains("1m 10s"), "{}", issues[0]);
        policy.restore.fence_timeout = 71 * SECOND;
        assert!(timing.check_policy(&policy).is_empty());
        // The Lease timeout does not count: a node is fenced the safe time after its last
        // heartbeat however long the Lease timeout is.
        policy.triggers.lease_timeout = 100 * SECOND;
        assert!(timing.check_policy(&policy).is_empty());
    }

    /// A policy that assumes faster Lease renewals than the kubelets make would fail a node
    /// that only its peers lost between two renewals. Fails if check_policy lets it through.
    #[test]
    fn a_heartbeat_interval_below_the_kubelets_is_refused() {
        let mut policy = Policy::default();
        let timing = SelfFenceTiming::default(); // 10 s renewals
        policy.triggers.heartbeat_interval = 9 * SECOND;
        let issues = timing.check_policy(&policy);
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].path, "triggers.heartbeatInterval");
        policy.triggers.heartbeat_interval = 10 * SECOND;
        assert!(timing.check_policy(&policy).is_empty());
    }
}
