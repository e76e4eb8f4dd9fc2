//! Self-fencing: the agent stops its node's protected pods when the node loses its standing
//! with the API server, so that the controller may start their replacements elsewhere a safe
//! time later without a second copy (medik8s Self Node Remediation's model; the rule and its
//! proof are in `automigrate_core::fencing`).
//!
//! The node's standing is its heartbeat: the `renewTime` of its Lease, written by its kubelet
//! with the node's clock, which is also the agent's clock. The agent learns heartbeats by
//! reading its Lease itself and, when that fails or the heartbeat looks stale, by asking its
//! peers (who read it for it: [`crate::standing`]). It only ever learns heartbeats that were
//! written, so the freshest one it knows is never newer than the one the controller counts
//! from. When that heartbeat is `selfFenceAfter` old it kills the protected pods' containers
//! (and keeps them down); if that does not finish within `stopTime`, it stops feeding the
//! hardware watchdog (when enabled), which reboots the node.
//!
//! It never kills while the API server, read directly or through a peer, shows a heartbeat
//! younger than `selfFenceAfter`: a peer that reaches the API server and sees the node renew
//! keeps it up, as in SNR. Unlike SNR it does fence when its peers do not reach the API server
//! either (a whole-cluster API outage): the controller cannot tell afterwards which nodes held
//! back, so holding back would break the rule.
//!
//! [`SelfFence`] is the pure state machine: time (the agent's monotonic clock) and
//! observations in, [`Action`]s out. [`FenceLoop`] is the thin async loop that reads, asks,
//! kills and feeds the watchdog through the [`Standing`], [`Stopper`] and [`Watchdog`] traits,
//! so tests drive it with recording doubles.

use std::future::Future;
use std::time::Duration;

use automigrate_core::fencing::SelfFenceTiming;
use automigrate_core::units::format_duration;

/// A point on the agent's monotonic clock (time since an arbitrary origin).
pub type Mono = Duration;

/// What the agent learned about its node's standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// Its own read of its node's Lease: the heartbeat was `age` old when read (node clock).
    OwnLease { age: Duration },
    /// Its own read failed (API server unreachable, an error, no Lease).
    OwnLeaseUnreadable { error: String },
    /// A peer reaches the API server and saw the node's heartbeat `age` old.
    PeerSawHeartbeat { peer: String, age: Duration },
    /// A peer answered that it does not reach the API server either.
    PeerNoApi { peer: String },
    /// The stop the machine asked for finished: `Ok(containers killed)` or why it failed.
    Stopped { result: Result<usize, String> },
}

/// What the agent records (a log line and a metric each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceEvent {
    /// The heartbeat is `selfFenceAfter` old: stopping the protected containers.
    Fencing { heartbeat_age: Duration },
    /// Self-fencing is off: it would have fenced now.
    WouldFence { heartbeat_age: Duration },
    /// Every protected container is stopped, `took` after the fence began.
    Fenced { took: Duration, killed: usize },
    /// A stop attempt failed; it is retried every check.
    StopFailed { error: String },
    /// The stop did not finish within `stopTime`: the watchdog is no longer fed.
    StopOverdue { after: Duration },
    /// A fresh heartbeat again: the node is back in standing (condemned pods stay down).
    Restored { heartbeat_age: Duration },
}

impl FenceEvent {
    /// The metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fencing { .. } => "fencing",
            Self::WouldFence { .. } => "would_fence",
            Self::Fenced { .. } => "fenced",
            Self::StopFailed { .. } => "stop_failed",
            Self::StopOverdue { .. } => "stop_overdue",
            Self::Restored { .. } => "restored",
        }
    }
}

impl std::fmt::Display for FenceEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fencing { heartbeat_age } => write!(
                f,
                "no heartbeat younger than {} from the API server or any peer: stopping this node's protected pods",
                format_duration(*heartbeat_age)
            ),
            Self::WouldFence { heartbeat_age } => write!(
                f,
                "no heartbeat younger than {}: self-fencing is off, so this node's protected pods keep running and the controller may start second copies",
                format_duration(*heartbeat_age)
            ),
            Self::Fenced { took, killed } => write!(
                f,
                "self-fenced: {killed} protected container(s) stopped in {}",
                format_duration(*took)
            ),
            Self::StopFailed { error } => {
                write!(f, "stopping protected containers failed: {error}")
            }
            Self::StopOverdue { after } => write!(
                f,
                "protected containers not stopped after {}: no longer feeding the watchdog",
                format_duration(*after)
            ),
            Self::Restored { heartbeat_age } => write!(
                f,
                "heartbeat {} old again: back in standing (pods stopped by the fence stay down)",
                format_duration(*heartbeat_age)
            ),
        }
    }
}

/// What the machine asks the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the peers whether they reach the API server and see this node's heartbeat.
    AskPeers,
    /// Kill the protected pods' containers on this node (idempotent); they are condemned: kept
    /// down for good.
    StopProtected,
    /// Kill the containers of pods an earlier fence condemned, if any runs again (a kubelet
    /// restarting them); nothing else.
    KeepDown,
    /// Feed the hardware watchdog (ignored where it is off).
    PetWatchdog,
    /// Log and count.
    Record(FenceEvent),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencePhase {
    /// The node has standing (or has not been without it for `selfFenceAfter`).
    Standing,
    /// Stopping the protected containers since `since`.
    Fencing { since: Mono },
    /// They are stopped; they are kept down while the heartbeat stays stale.
    Fenced { since: Mono },
}

/// The self-fencing state machine. Pure: every method takes the time.
#[derive(Debug, Clone)]
pub struct SelfFence {
    timing: SelfFenceTiming,
    enabled: bool,
    /// The freshest heartbeat known, on the monotonic axis (may lie before the origin).
    heartbeat: Option<Heartbeat>,
    started: Mono,
    phase: FencePhase,
    own_read_failed: bool,
    /// Pods were stopped by a fence: keep them down for good.
    condemned: bool,
    overdue_recorded: bool,
    would_fence_recorded: bool,
}

/// A heartbeat `ago` before monotonic instant `seen` (kept as a pair so that a heartbeat older
/// than the origin needs no negative time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heartbeat {
    seen: Mono,
    ago: Duration,
}

impl Heartbeat {
    fn age_at(&self, now: Mono) -> Duration {
        self.ago.saturating_add(now.saturating_sub(self.seen))
    }
}

impl SelfFence {
    /// A machine started at `now`. `enabled: false` records what it would do and never stops
    /// anything.
    pub fn new(timing: SelfFenceTiming, enabled: bool, now: Mono) -> Self {
        Self {
            timing,
            enabled,
            heartbeat: None,
            started: now,
            phase: FencePhase::Standing,
            own_read_failed: false,
            condemned: false,
            overdue_recorded: false,
            would_fence_recorded: false,
        }
    }

    pub fn phase(&self) -> FencePhase {
        self.phase
    }

    /// Before any heartbeat is known (a restart while cut off), the agent may wait this long for
    /// its first read or peer answer; then it counts as if its last heartbeat were
    /// `selfFenceAfter` old. Three checks: a read, a peer round, and one late.
    pub fn startup_grace(&self) -> Duration {
        self.timing
            .check_interval
            .saturating_mul(3)
            .min(self.timing.self_fence_after)
    }

    /// How old the freshest known heartbeat is at `now`.
    pub fn heartbeat_age(&self, now: Mono) -> Duration {
        match self.heartbeat {
            Some(heartbeat) => heartbeat.age_at(now),
            None => {
                let unknown_for = now.saturating_sub(self.started);
                (self.timing.self_fence_after - self.startup_grace()).saturating_add(unknown_for)
            }
        }
    }

    fn learn(&mut self, now: Mono, age: Duration) {
        let candidate = Heartbeat {
            seen: now,
            ago: age,
        };
        // Keep the fresher one: an old answer (a slow peer, a replay) never makes it older.
        let fresher = self
            .heartbeat
            .is_none_or(|known| candidate.age_at(now) < known.age_at(now));
        if fresher {
            self.heartbeat = Some(candidate);
        }
    }

    /// Whether to ask the peers at `now`: the own read failed, or the heartbeat is older than a
    /// healthy node's ever is (one renewal period and one check), so a second opinion is due
    /// before the deadline.
    pub fn needs_peers(&self, now: Mono) -> bool {
        let healthy_at_most = self
            .timing
            .heartbeat_interval
            .saturating_add(self.timing.check_interval);
        self.own_read_failed || self.heartbeat_age(now) > healthy_at_most
    }

    /// Takes in one observation made at `now`.
    pub fn observe(&mut self, now: Mono, observation: Observation) -> Vec<Action> {
        let mut actions = Vec::new();
        match observation {
            Observation::OwnLease { age } => {
                self.own_read_failed = false;
                self.learn(now, age);
            }
            Observation::OwnLeaseUnreadable { .. } => self.own_read_failed = true,
            Observation::PeerSawHeartbeat { age, .. } => self.learn(now, age),
            Observation::PeerNoApi { .. } => {}
            Observation::Stopped { result } => match (self.phase, result) {
                (FencePhase::Fencing { since }, Ok(killed)) => {
                    self.phase = FencePhase::Fenced { since };
                    actions.push(Action::Record(FenceEvent::Fenced {
                        took: now.saturating_sub(since),
                        killed,
                    }));
                }
                (_, Err(error)) => {
                    actions.push(Action::Record(FenceEvent::StopFailed { error }));
                }
                (_, Ok(_)) => {}
            },
        }
        actions
    }

    /// One check at `now`: what to do.
    pub fn tick(&mut self, now: Mono) -> Vec<Action> {
        let mut actions = Vec::new();
        let age = self.heartbeat_age(now);
        let stale = age >= self.timing.self_fence_after;
        match self.phase {
            FencePhase::Standing if stale && self.enabled => {
                self.phase = FencePhase::Fencing { since: now };
                self.condemned = true;
                actions.push(Action::Record(FenceEvent::Fencing { heartbeat_age: age }));
            }
            FencePhase::Standing if stale => {
                if !self.would_fence_recorded {
                    self.would_fence_recorded = true;
                    actions.push(Action::Record(FenceEvent::WouldFence {
                        heartbeat_age: age,
                    }));
                }
            }
            FencePhase::Standing => self.would_fence_recorded = false,
            FencePhase::Fencing { .. } | FencePhase::Fenced { .. } if !stale => {
                self.phase = FencePhase::Standing;
                self.overdue_recorded = false;
                actions.push(Action::Record(FenceEvent::Restored { heartbeat_age: age }));
            }
            FencePhase::Fencing { .. } | FencePhase::Fenced { .. } => {}
        }
        if self.needs_peers(now) {
            actions.push(Action::AskPeers);
        }
        // While fenced, every protected pod here is condemned and kept down at every check (a
        // kubelet cut off from the API server would restart them); after a fence, the pods it
        // condemned stay down even in standing (the controller may have replaced them).
        match self.phase {
            FencePhase::Fencing { .. } | FencePhase::Fenced { .. } => {
                actions.push(Action::StopProtected)
            }
            FencePhase::Standing if self.condemned => actions.push(Action::KeepDown),
            FencePhase::Standing => {}
        }
        match self.phase {
            FencePhase::Fencing { since } if now.saturating_sub(since) >= self.timing.stop_time => {
                if !self.overdue_recorded {
                    self.overdue_recorded = true;
                    actions.push(Action::Record(FenceEvent::StopOverdue {
                        after: now.saturating_sub(since),
                    }));
                }
            }
            _ => actions.push(Action::PetWatchdog),
        }
        actions
    }
}

/// Where the agent learns its heartbeat: its own read, and its peers.
pub trait Standing: Send + Sync {
    /// The age of this node's heartbeat (now minus the Lease's renewTime, node clock).
    fn own_heartbeat_age(&self) -> impl Future<Output = Result<Duration, String>> + Send;
    /// Every peer's answer (peers that do not answer are left out).
    fn ask_peers(&self) -> impl Future<Output = Vec<Observation>> + Send;
}

/// Kills the protected pods' containers on this node and keeps them down.
pub trait Stopper: Send + Sync {
    /// Condemns every protected pod on this node and kills whatever of their containers runs;
    /// `Ok(how many were killed)` once none runs.
    fn stop_protected(&self) -> impl Future<Output = Result<usize, String>> + Send;
    /// Kills whatever container of an already condemned pod runs.
    fn keep_down(&self) -> impl Future<Output = Result<usize, String>> + Send;
}

/// The hardware watchdog: fed at every check; when the agent stops feeding it (a stop overdue,
/// a hung or dead agent), it reboots the node.
pub trait Watchdog: Send {
    fn pet(&mut self) -> Result<(), String>;
    /// A graceful stop of the agent: disarm (the magic close) so the node is not rebooted.
    fn disarm(&mut self) -> Result<(), String>;
}

impl Watchdog for Box<dyn Watchdog> {
    fn pet(&mut self) -> Result<(), String> {
        (**self).pet()
    }
    fn disarm(&mut self) -> Result<(), String> {
        (**self).disarm()
    }
}

/// No watchdog (the default; tests, nodes without one).
#[derive(Debug, Default)]
pub struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn pet(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn disarm(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// `/dev/watchdog`: any write feeds it; writing `V` before closing disarms it. Its timeout is
/// the device's (set it, e.g. with the driver's module parameter, to at most the stop time).
#[derive(Debug)]
pub struct DeviceWatchdog {
    file: std::fs::File,
}

impl DeviceWatchdog {
    /// Opens (and so arms) the device.
    pub fn open(path: &std::path::Path) -> Result<Self, String> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map(|file| Self { file })
            .map_err(|error| format!("{}: {error}", path.display()))
    }
}

impl Watchdog for DeviceWatchdog {
    fn pet(&mut self) -> Result<(), String> {
        use std::io::Write as _;
        self.file
            .write_all(b"\0")
            .and_then(|()| self.file.flush())
            .map_err(|error| error.to_string())
    }
    fn disarm(&mut self) -> Result<(), String> {
        use std::io::Write as _;
        self.file
            .write_all(b"V")
            .and_then(|()| self.file.flush())
            .map_err(|error| error.to_string())
    }
}

/// What one check did, for the loop's caller and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub events: Vec<FenceEvent>,
    pub asked_peers: bool,
    pub stops: usize,
    pub keep_downs: usize,
    pub petted: bool,
}

/// The thin async loop around [`SelfFence`].
pub struct FenceLoop<S, K, W> {
    pub machine: SelfFence,
    pub standing: S,
    pub stopper: K,
    pub watchdog: W,
    pub metrics: Option<crate::metrics::AgentMetrics>,
}

impl<S, K, W> std::fmt::Debug for FenceLoop<S, K, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FenceLoop")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

impl<S: Standing, K: Stopper, W: Watchdog> FenceLoop<S, K, W> {
    /// One check at `now` (monotonic): read, ask the peers if in doubt, act. Every action the
    /// machine asks for is carried out here and nowhere else.
    pub async fn check(&mut self, now: Mono) -> CheckReport {
        let mut report = CheckReport::default();
        let own = match self.standing.own_heartbeat_age().await {
            Ok(age) => Observation::OwnLease { age },
            Err(error) => Observation::OwnLeaseUnreadable { error },
        };
        let mut pending = self.machine.observe(now, own);
        // Ask the peers before deciding, so that a peer's fresh heartbeat can hold back a
        // fence this very check.
        if self.machine.needs_peers(now) {
            report.asked_peers = true;
            for answer in self.standing.ask_peers().await {
                pending.extend(self.machine.observe(now, answer));
            }
        }
        pending.extend(self.machine.tick(now));
        let mut index = 0;
        while index < pending.len() {
            match pending[index].clone() {
                Action::AskPeers => {}
                Action::StopProtected => {
                    report.stops += 1;
                    let result = self.stopper.stop_protected().await;
                    pending.extend(self.machine.observe(now, Observation::Stopped { result }));
                }
                Action::KeepDown => {
                    report.keep_downs += 1;
                    if let Err(error) = self.stopper.keep_down().await {
                        let event = FenceEvent::StopFailed { error };
                        self.record(&event);
                        report.events.push(event);
                    }
                }
                Action::PetWatchdog => match self.watchdog.pet() {
                    Ok(()) => report.petted = true,
                    Err(error) => tracing::error!(%error, "feeding the watchdog failed"),
                },
                Action::Record(event) => {
                    self.record(&event);
                    report.events.push(event);
                }
            }
            index += 1;
        }
        report
    }

    fn record(&self, event: &FenceEvent) {
        match event {
            FenceEvent::Fenced { .. } | FenceEvent::Restored { .. } => {
                tracing::warn!(event = event.kind(), "{event}")
            }
            _ => tracing::error!(event = event.kind(), "{event}"),
        }
        if let Some(metrics) = &self.metrics {
            metrics
                .counter(
                    crate::metrics::names::SELF_FENCE_EVENTS,
                    &[("event", event.kind())],
                )
                .increment(1);
        }
    }

    /// Checks every `interval` until `shutdown` fires; then disarms the watchdog.
    pub async fn run(
        mut self,
        interval: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let origin = tokio::time::Instant::now();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => break,
            }
            let now = origin.elapsed();
            self.check(now).await;
        }
        if let Err(error) = self.watchdog.disarm() {
            tracing::error!(%error, "disarming the watchdog failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    /// selfFenceAfter 4 s (the least for a 1 s heartbeat and 1 s checks is 3 s), stop 2 s.
    fn timing() -> SelfFenceTiming {
        SelfFenceTiming {
            self_fence_after: 4 * S,
            stop_time: 2 * S,
            clock_skew: S,
            margin: S,
            heartbeat_interval: S,
            check_interval: S,
        }
    }

    fn started() -> SelfFence {
        let mut machine = SelfFence::new(timing(), true, Duration::ZERO);
        machine.observe(
            Duration::ZERO,
            Observation::OwnLease {
                age: Duration::ZERO,
            },
        );
        machine
    }

    fn fencing(actions: &[Action]) -> bool {
        actions
            .iter()
            .any(|action| matches!(action, Action::Record(FenceEvent::Fencing { .. })))
    }

    fn stops(actions: &[Action]) -> bool {
        actions.contains(&Action::StopProtected)
    }

    #[test]
    fn a_healthy_node_never_fences_nor_asks_its_peers() {
        // A real kubelet's timing: renewal every 10 s, read every second; the heartbeat the
        // agent reads is up to 10 s and some latency old, under the least selfFenceAfter.
        let timing = SelfFenceTiming::default();
        let mut machine = SelfFence::new(timing, true, Duration::ZERO);
        for second in 0..3600u32 {
            let now = second * S;
            let age = (second % 10) * S + 300 * MS;
            assert!(
                machine
                    .observe(now, Observation::OwnLease { age })
                    .is_empty()
            );
            let actions = machine.tick(now);
            assert_eq!(actions, [Action::PetWatchdog], "at {second} s");
        }
    }

    /// Cut off from the API server and the peers: the fence starts exactly when the last known
    /// heartbeat is selfFenceAfter old, not a check earlier. Fails if the deadline is counted
    /// from the last read instead of the heartbeat (1.5 s later here) or compared with `>`.
    #[test]
    fn cut_off_it_fences_at_the_deadline_counted_from_the_heartbeat() {
        let mut machine = SelfFence::new(timing(), true, Duration::ZERO);
        // The last read, at 1.5 s, saw a heartbeat 1.5 s old: written at 0.
        machine.observe(1500 * MS, Observation::OwnLease { age: 1500 * MS });
        let mut first = None;
        for step in 0..40u32 {
            let now = 2 * S + step * 250 * MS;
            machine.observe(
                now,
                Observation::OwnLeaseUnreadable {
                    error: "connect: timed out".into(),
                },
            );
            let actions = machine.tick(now);
            assert!(
                actions.contains(&Action::AskPeers),
                "asks its peers when it cannot read"
            );
            if fencing(&actions) && first.is_none() {
                first = Some(now);
                assert!(stops(&actions));
            }
            if now < 4 * S {
                assert!(!stops(&actions), "stopped at {now:?}");
            }
        }
        assert_eq!(first, Some(4 * S));
        assert!(matches!(machine.phase(), FencePhase::Fencing { .. }));
    }

    #[test]
    fn a_peer_that_sees_a_fresh_heartbeat_holds_the_fence_back() {
        let mut machine = started();
        for second in 1..600u32 {
            let now = second * S;
            machine.observe(
                now,
                Observation::OwnLeaseUnreadable {
                    error: "no route".into(),
                },
            );
            machine.observe(
                now,
                Observation::PeerSawHeartbeat {
                    peer: "b".into(),
                    age: 700 * MS,
                },
            );
            let actions = machine.tick(now);
            assert!(!stops(&actions) && !fencing(&actions), "at {second} s");
            assert!(actions.contains(&Action::PetWatchdog));
        }
    }

    /// SNR stays up when no peer reaches the API server either; this rule may not (see the
    /// module header): fails if "every peer lacks the API server too" holds the fence back.
    #[test]
    fn peers_that_do_not_reach_the_api_server_do_not_hold_it_back() {
        let mut machine = started();
        let mut fenced_at = None;
        for second in 1..10u32 {
            let now = second * S;
            machine.observe(now, Observation::OwnLeaseUnreadable { error: "x".into() });
            machine.observe(now, Observation::PeerNoApi { peer: "b".into() });
            machine.observe(now, Observation::PeerNoApi { peer: "c".into() });
            if fencing(&machine.tick(now)) {
                fenced_at.get_or_insert(now);
            }
        }
        assert_eq!(fenced_at, Some(4 * S));
    }

    /// The API server answers but the node's kubelet stopped renewing: the controller will
    /// treat the node as dead, so the agent must fence although it reaches the API server.
    #[test]
    fn a_readable_but_stale_heartbeat_fences() {
        let mut machine = started();
        let mut fenced_at = None;
        for second in 1..10u32 {
            let now = second * S;
            machine.observe(now, Observation::OwnLease { age: now });
            if fencing(&machine.tick(now)) {
                fenced_at.get_or_insert(now);
            }
        }
        assert_eq!(fenced_at, Some(4 * S));
    }

    #[test]
    fn cut_off_from_its_peers_only_it_never_fences() {
        let mut machine = started();
        for step in 1..2400u32 {
            let now = step * 250 * MS;
            // Its own reads work; no peer answers (nothing is observed from them).
            machine.observe(
                now,
                Observation::OwnLease {
                    age: (step % 4) * 250 * MS,
                },
            );
            let actions = machine.tick(now);
            assert_eq!(actions, [Action::PetWatchdog], "at {now:?}");
        }
    }

    #[test]
    fn switched_off_it_says_what_it_would_do_once_and_stops_nothing() {
        let mut machine = SelfFence::new(timing(), false, Duration::ZERO);
        machine.observe(
            Duration::ZERO,
            Observation::OwnLease {
                age: Duration::ZERO,
            },
        );
        let mut would = 0;
        for second in 1..60u32 {
            let now = second * S;
            machine.observe(now, Observation::OwnLeaseUnreadable { error: "x".into() });
            let actions = machine.tick(now);
            assert!(!stops(&actions) && !actions.contains(&Action::KeepDown));
            would += actions
                .iter()
                .filter(|a| matches!(a, Action::Record(FenceEvent::WouldFence { .. })))
                .count();
        }
        assert_eq!(would, 1);
        assert_eq!(machine.phase(), FencePhase::Standing);
    }

    /// Fails if a stop that never finishes keeps feeding the watchdog (the last resort would
    /// never fire) or if the stop is not retried.
    #[test]
    fn a_stop_that_does_not_finish_in_time_starves_the_watchdog() {
        let mut machine = started();
        let mut overdue = 0;
        for step in 0..40u32 {
            let now = 4 * S + step * 250 * MS;
            machine.observe(now, Observation::OwnLeaseUnreadable { error: "x".into() });
            let actions = machine.tick(now);
            assert!(stops(&actions), "retried at every check");
            let failed = machine.observe(
                now,
                Observation::Stopped {
                    result: Err("runc kill: permission denied".into()),
                },
            );
            assert!(matches!(
                failed.as_slice(),
                [Action::Record(FenceEvent::StopFailed { .. })]
            ));
            let fed = actions.contains(&Action::PetWatchdog);
            // The fence began at 4 s; the stop time is 2 s.
            assert_eq!(fed, now < 6 * S, "at {now:?}");
            overdue += actions
                .iter()
                .filter(|a| matches!(a, Action::Record(FenceEvent::StopOverdue { .. })))
                .count();
        }
        assert_eq!(overdue, 1);
    }

    #[test]
    fn fenced_pods_stay_down_after_the_node_is_back() {
        let mut machine = started();
        for second in 1..=5u32 {
            machine.observe(
                second * S,
                Observation::OwnLeaseUnreadable { error: "x".into() },
            );
            machine.tick(second * S);
        }
        let done = machine.observe(5 * S, Observation::Stopped { result: Ok(2) });
        assert_eq!(
            done,
            [Action::Record(FenceEvent::Fenced { took: S, killed: 2 })]
        );
        assert!(matches!(machine.phase(), FencePhase::Fenced { .. }));
        // Still cut off: kept down (and the watchdog fed).
        let actions = machine.tick(6 * S);
        assert!(stops(&actions) && actions.contains(&Action::PetWatchdog));
        // Back: standing again, but what was condemned stays down; new pods are not touched.
        machine.observe(7 * S, Observation::OwnLease { age: 100 * MS });
        let actions = machine.tick(7 * S);
        assert!(matches!(
            actions[0],
            Action::Record(FenceEvent::Restored { .. })
        ));
        assert!(actions.contains(&Action::KeepDown) && !stops(&actions));
        assert_eq!(machine.phase(), FencePhase::Standing);
    }

    /// A restarted agent that learns nothing fences after the startup grace: it cannot know
    /// how old its heartbeat already is. One that reads a fresh heartbeat does not.
    #[test]
    fn a_restart_without_any_heartbeat_fences_after_the_startup_grace() {
        let origin = 100 * S;
        let mut machine = SelfFence::new(timing(), true, origin);
        assert_eq!(machine.startup_grace(), 3 * S);
        let mut fenced_at = None;
        for step in 0..20u32 {
            let now = origin + step * 500 * MS;
            machine.observe(now, Observation::OwnLeaseUnreadable { error: "x".into() });
            if fencing(&machine.tick(now)) {
                fenced_at.get_or_insert(now);
            }
        }
        assert_eq!(fenced_at, Some(origin + 3 * S));

        let mut machine = SelfFence::new(timing(), true, origin);
        machine.observe(origin + S, Observation::OwnLease { age: 200 * MS });
        for step in 0..8u32 {
            assert!(!fencing(&machine.tick(origin + S + step * 250 * MS)));
        }
    }

    #[test]
    fn an_old_answer_never_makes_the_heartbeat_older() {
        let mut machine = started();
        machine.observe(
            2 * S,
            Observation::PeerSawHeartbeat {
                peer: "b".into(),
                age: 100 * MS,
            },
        );
        // A slow peer's (or a replayed) answer with an older heartbeat.
        machine.observe(
            3 * S,
            Observation::PeerSawHeartbeat {
                peer: "c".into(),
                age: 3 * S,
            },
        );
        assert_eq!(machine.heartbeat_age(3 * S), 1100 * MS);
    }

    /// Every sequence of five kinds of checks over 7 s (78 125 runs): the machine starts a
    /// fence exactly at the first check where the freshest heartbeat it was told of is
    /// selfFenceAfter old, and never while it is younger, whatever it was told.
    #[test]
    fn exhaustive_fence_only_and_always_at_the_deadline() {
        #[derive(Clone, Copy, Debug)]
        enum Check {
            OwnFresh,
            OwnFails,
            OwnStale,
            PeerFresh,
            PeerNoApi,
        }
        const KINDS: [Check; 5] = [
            Check::OwnFresh,
            Check::OwnFails,
            Check::OwnStale,
            Check::PeerFresh,
            Check::PeerNoApi,
        ];
        let ticks = 7u32;
        for mut code in 0..5usize.pow(ticks) {
            let mut checks = Vec::new();
            for _ in 0..ticks {
                checks.push(KINDS[code % 5]);
                code /= 5;
            }
            let mut machine = started();
            // The model: the freshest heartbeat (on the monotonic axis) the machine was told of.
            let mut freshest = Duration::ZERO;
            let mut started_fence = false;
            for (index, check) in checks.iter().enumerate() {
                let now = (index as u32 + 1) * S;
                let told = match check {
                    Check::OwnFresh => Observation::OwnLease { age: 200 * MS },
                    Check::OwnFails => Observation::OwnLeaseUnreadable { error: "x".into() },
                    Check::OwnStale => Observation::OwnLease { age: now },
                    Check::PeerFresh => Observation::PeerSawHeartbeat {
                        peer: "b".into(),
                        age: 200 * MS,
                    },
                    Check::PeerNoApi => Observation::PeerNoApi { peer: "b".into() },
                };
                if matches!(check, Check::OwnFresh | Check::PeerFresh) {
                    freshest = freshest.max(now - 200 * MS);
                }
                machine.observe(now, told);
                let actions = machine.tick(now);
                let stale = now - freshest >= 4 * S;
                if fencing(&actions) {
                    assert!(stale, "{checks:?}: fenced at {now:?}");
                    started_fence = true;
                }
                if stale && !started_fence {
                    panic!("{checks:?}: not fencing at {now:?}");
                }
                if !stale {
                    assert!(!stops(&actions), "{checks:?}: stop at {now:?}");
                }
            }
        }
    }

    // ---- the loop, with recording doubles ----

    #[derive(Clone, Default)]
    struct Script {
        own: Arc<Mutex<Vec<Result<Duration, String>>>>,
        peers: Arc<Mutex<Vec<Observation>>>,
        calls: Arc<Mutex<Vec<String>>>,
        stop_results: Arc<Mutex<Vec<Result<usize, String>>>>,
    }

    impl Script {
        fn own(&self, result: Result<Duration, String>) {
            *self.own.lock().unwrap() = vec![result];
        }
        fn peers(&self, answers: Vec<Observation>) {
            *self.peers.lock().unwrap() = answers;
        }
        fn calls(&self) -> Vec<String> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl Standing for Script {
        async fn own_heartbeat_age(&self) -> Result<Duration, String> {
            self.calls.lock().unwrap().push("read".into());
            self.own.lock().unwrap()[0].clone()
        }
        async fn ask_peers(&self) -> Vec<Observation> {
            self.calls.lock().unwrap().push("ask".into());
            self.peers.lock().unwrap().clone()
        }
    }

    impl Stopper for Script {
        async fn stop_protected(&self) -> Result<usize, String> {
            self.calls.lock().unwrap().push("stop".into());
            self.stop_results.lock().unwrap().pop().unwrap_or(Ok(1))
        }
        async fn keep_down(&self) -> Result<usize, String> {
            self.calls.lock().unwrap().push("keep-down".into());
            Ok(0)
        }
    }

    struct Dog(Arc<Mutex<Vec<String>>>);

    impl Watchdog for Dog {
        fn pet(&mut self) -> Result<(), String> {
            self.0.lock().unwrap().push("pet".into());
            Ok(())
        }
        fn disarm(&mut self) -> Result<(), String> {
            self.0.lock().unwrap().push("disarm".into());
            Ok(())
        }
    }

    fn fence_loop(script: &Script) -> FenceLoop<Script, Script, Dog> {
        FenceLoop {
            machine: SelfFence::new(timing(), true, Duration::ZERO),
            standing: script.clone(),
            stopper: script.clone(),
            watchdog: Dog(script.calls.clone()),
            metrics: None,
        }
    }

    #[tokio::test]
    async fn the_loop_reads_asks_kills_and_feeds_in_that_order() {
        let script = Script::default();
        let mut fence = fence_loop(&script);
        script.own(Ok(100 * MS));
        let report = fence.check(Duration::ZERO).await;
        assert_eq!(script.calls(), ["read", "pet"]);
        assert!(report.events.is_empty() && report.petted);

        // Cut off: it asks the peers at every check; nobody answers.
        script.own(Err("timed out".into()));
        for second in 1..4u32 {
            fence.check(second * S).await;
            assert_eq!(script.calls(), ["read", "ask", "pet"], "at {second} s");
        }
        // The deadline (heartbeat at -0.1 s, selfFenceAfter 4 s): the peers first, then the
        // kill, then the watchdog.
        let report = fence.check(4 * S).await;
        assert_eq!(script.calls(), ["read", "ask", "stop", "pet"]);
        assert!(matches!(
            report.events.as_slice(),
            [
                FenceEvent::Fencing { .. },
                FenceEvent::Fenced { killed: 1, .. }
            ]
        ));
    }

    /// The answer of a peer asked during the deadline check itself holds the fence back.
    /// Fails if the loop decides before it has heard the peers.
    #[tokio::test]
    async fn a_peer_answer_in_the_deadline_check_holds_the_kill_back() {
        let script = Script::default();
        let mut fence = fence_loop(&script);
        script.own(Ok(Duration::ZERO));
        fence.check(Duration::ZERO).await;
        script.own(Err("timed out".into()));
        for second in 1..4u32 {
            fence.check(second * S).await;
        }
        script.calls();
        script.peers(vec![Observation::PeerSawHeartbeat {
            peer: "b".into(),
            age: 300 * MS,
        }]);
        let report = fence.check(4 * S).await;
        assert_eq!(script.calls(), ["read", "ask", "pet"]);
        assert!(report.events.is_empty());
    }

    #[tokio::test]
    async fn a_failed_kill_is_recorded_retried_and_ends_the_watchdog_feeding() {
        let script = Script::default();
        *script.stop_results.lock().unwrap() = vec![Err("denied".into()); 20];
        let mut fence = fence_loop(&script);
        script.own(Err("timed out".into()));
        // No heartbeat ever: the startup grace (3 s) is the deadline.
        for second in 0..3u32 {
            fence.check(second * S).await;
        }
        script.calls();
        let report = fence.check(3 * S).await;
        assert_eq!(script.calls(), ["read", "ask", "stop", "pet"]);
        assert!(matches!(
            report.events.as_slice(),
            [FenceEvent::Fencing { .. }, FenceEvent::StopFailed { .. }]
        ));
        fence.check(4 * S).await;
        assert_eq!(script.calls(), ["read", "ask", "stop", "pet"]);
        let report = fence.check(5 * S).await;
        assert_eq!(
            script.calls(),
            ["read", "ask", "stop"],
            "no pet past the stop time"
        );
        assert!(matches!(
            report.events.as_slice(),
            [
                FenceEvent::StopOverdue { .. },
                FenceEvent::StopFailed { .. }
            ]
        ));
    }
}
