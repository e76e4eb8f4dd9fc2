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

use std::time::{Duration, Instant, SystemTime};

use jiff::Timestamp;

/// Why a clock could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("the policy clock scale must be 1 to 3600, got {0}")]
    Scale(u32),
    #[error("the system clock is outside the range a timestamp can hold")]
    OutOfRange,
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
    fn scale_is_bounded() {
        assert!(matches!(PolicyClock::start(0), Err(ClockError::Scale(0))));
        assert!(PolicyClock::start(3601).is_err());
    }
}
