//! The policy clock: the `now` the embedded controller hands the decision engine.
//!
//! The policies in `policies/` are written for real clusters (a 10-minute checkpoint interval,
//! a 30-second lease timeout, a 10-minute cooldown). A demo on one machine cannot wait that
//! long, and shrinking the policy files would mean the demo runs a different policy than the
//! one shipped. So the policy clock runs `scale` times faster than the wall clock: with scale
//! 30, one real second is 30 policy seconds, the 30 s lease timeout is 1 s of real time and a
//! 10-minute interval is 20 s. Every duration the engine and the migration state machine see
//! (ages, deadlines, dwell timers, cooldowns) is in policy time; every figure the demo reports
//! (training time, downtime) is measured in real time.
//!
//! Data model: the wall-clock instant the clock started (`origin`), a monotonic [`Instant`]
//! taken at the same moment, and the integer scale. Policy time is
//! `origin + scale × (monotonic elapsed)`, so it never jumps backwards.
//!
//! A controller restarted on an existing state directory must read the same policy time as the
//! one that died (persisted migration deadlines and engine timers are policy timestamps), so the
//! clock is saved as a [`ClockAnchor`] (start in Unix nanoseconds, scale) and
//! [`PolicyClock::resume`] rebuilds it: the monotonic start is placed where the wall start lies
//! in the past, and runs monotonically from there.

use std::time::{Duration, Instant, SystemTime};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Why a clock could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("the policy clock scale must be 1 to 3600, got {0}")]
    Scale(u32),
    #[error("the system clock is outside the range a timestamp can hold")]
    OutOfRange,
    #[error("the clock's start lies in the future or too far in the past to resume it")]
    Anchor,
}

/// What a [`PolicyClock`] needs to be rebuilt in another process: its wall-clock start and scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockAnchor {
    /// The wall-clock start, nanoseconds since the Unix epoch.
    pub started_unix_nanos: u128,
    pub scale: u32,
}

/// Wall clock and policy clock, started together.
#[derive(Debug, Clone, Copy)]
pub struct PolicyClock {
    origin: Timestamp,
    started: Instant,
    started_wall: SystemTime,
    scale: u32,
}

impl PolicyClock {
    /// A clock starting now that runs `scale` times faster than real time.
    pub fn start(scale: u32) -> Result<Self, ClockError> {
        if !(1..=3600).contains(&scale) {
            return Err(ClockError::Scale(scale));
        }
        let started_wall = SystemTime::now();
        let origin = Timestamp::try_from(started_wall).map_err(|_| ClockError::OutOfRange)?;
        Ok(Self {
            origin,
            started: Instant::now(),
            started_wall,
            scale,
        })
    }

    /// The clock that `anchor` describes, as the process that saved it reads it now.
    pub fn resume(anchor: ClockAnchor) -> Result<Self, ClockError> {
        if !(1..=3600).contains(&anchor.scale) {
            return Err(ClockError::Scale(anchor.scale));
        }
        let since_epoch = Duration::from_nanos(
            u64::try_from(anchor.started_unix_nanos).map_err(|_| ClockError::Anchor)?,
        );
        let started_wall = SystemTime::UNIX_EPOCH + since_epoch;
        let origin = Timestamp::try_from(started_wall).map_err(|_| ClockError::OutOfRange)?;
        let ago = SystemTime::now()
            .duration_since(started_wall)
            .map_err(|_| ClockError::Anchor)?;
        let started = Instant::now().checked_sub(ago).ok_or(ClockError::Anchor)?;
        Ok(Self {
            origin,
            started,
            started_wall,
            scale: anchor.scale,
        })
    }

    /// What [`PolicyClock::resume`] needs.
    pub fn anchor(&self) -> ClockAnchor {
        ClockAnchor {
            started_unix_nanos: self
                .started_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|since| since.as_nanos())
                .unwrap_or_default(),
            scale: self.scale,
        }
    }

    pub fn scale(&self) -> u32 {
        self.scale
    }

    /// Real time since the clock started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Policy time now.
    pub fn now(&self) -> Timestamp {
        self.at(self.started.elapsed())
    }

    /// Policy time at `elapsed` real time after the start.
    pub fn at(&self, elapsed: Duration) -> Timestamp {
        let policy = elapsed.saturating_mul(self.scale);
        let span = jiff::SignedDuration::try_from(policy).unwrap_or(jiff::SignedDuration::MAX);
        self.origin
            .checked_add(span)
            .unwrap_or(jiff::Timestamp::MAX)
    }

    /// Policy time of a wall-clock instant (a heartbeat, a file's timestamp).
    pub fn policy_time_of(&self, wall: SystemTime) -> Timestamp {
        let elapsed = wall
            .duration_since(self.started_wall)
            .unwrap_or(Duration::ZERO);
        self.at(elapsed)
    }

    /// A policy duration in real time.
    pub fn to_real(&self, policy: Duration) -> Duration {
        policy / self.scale
    }

    /// A real duration in policy time.
    pub fn to_policy(&self, real: Duration) -> Duration {
        real.saturating_mul(self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_time_runs_scale_times_faster() {
        let clock = PolicyClock::start(30).unwrap();
        let one_second = clock.at(Duration::from_secs(1));
        let start = clock.at(Duration::ZERO);
        assert_eq!(
            one_second.duration_since(start),
            jiff::SignedDuration::from_secs(30)
        );
        assert_eq!(
            clock.to_real(Duration::from_secs(600)),
            Duration::from_secs(20)
        );
        assert_eq!(
            clock.to_policy(Duration::from_millis(500)),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn wall_instants_before_the_start_map_to_the_start() {
        let clock = PolicyClock::start(10).unwrap();
        let earlier = SystemTime::UNIX_EPOCH;
        assert_eq!(clock.policy_time_of(earlier), clock.at(Duration::ZERO));
    }

    #[test]
    fn a_resumed_clock_reads_the_same_policy_time() {
        let clock = PolicyClock::start(30).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let resumed = PolicyClock::resume(clock.anchor()).unwrap();
        let (original, again) = (clock.now(), resumed.now());
        let apart = original.duration_since(again).unsigned_abs();
        // Both read "now" a few microseconds apart; 30x that stays far below a second.
        assert!(apart < Duration::from_millis(300), "{original} vs {again}");
        assert_eq!(resumed.anchor(), clock.anchor());
        assert!(resumed.elapsed() >= Duration::from_millis(20));
        let future = ClockAnchor {
            started_unix_nanos: clock.anchor().started_unix_nanos + 3_600_000_000_000,
            scale: 30,
        };
        assert!(matches!(
            PolicyClock::resume(future),
            Err(ClockError::Anchor)
        ));
    }

    #[test]
    fn scale_is_bounded() {
        assert!(matches!(PolicyClock::start(0), Err(ClockError::Scale(0))));
        assert!(PolicyClock::start(3601).is_err());
    }
}
