//! Simulated time: whole milliseconds since the start of the run, and the engine's view of it.

use std::time::Duration;

use jiff::Timestamp;

/// Simulated time: milliseconds since the start of the run.
pub type Ms = u64;

pub(super) const SECOND: Ms = 1000;
pub(super) const HOUR: Ms = 3_600_000;
/// 2026-01-01T00:00:00Z: the engine's clock reads this at the start of every run.
pub(super) const EPOCH_MS: i64 = 1_767_225_600_000;

/// The engine's view of simulated time.
pub fn timestamp(at: Ms) -> Timestamp {
    let millis = i64::try_from(at)
        .unwrap_or(i64::MAX)
        .saturating_add(EPOCH_MS);
    Timestamp::from_millisecond(millis).unwrap_or(Timestamp::MAX)
}

/// Simulated time of an engine timestamp (the inverse of [`timestamp`]; before the start
/// reads as the start).
pub(super) fn sim_time(at: Timestamp) -> Ms {
    u64::try_from(at.as_millisecond().saturating_sub(EPOCH_MS)).unwrap_or(0)
}

pub(super) fn ms(duration: Duration) -> Ms {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

pub(super) fn hours(value: Ms) -> f64 {
    value as f64 / HOUR as f64
}
