//! The Migration's status as the executor writes it: the driver's [`Run`] field for field, the
//! Ready/Progressing conditions, and how ended phases are timed and logged. A leaf module:
//! pure functions of the status, shared by the port's files.

use automigrate_core::driver::Run;
use automigrate_core::migration::{MigrationState, Phase};
use automigrate_core::units;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::MigrationStatus;

/// The driver's view of a status.
pub(crate) fn run_of(status: &MigrationStatus) -> Run {
    Run {
        state: status.state.clone(),
        limits: status.limits,
        lease_timeout: status.lease_timeout,
        stored_checkpoint: status.stored_checkpoint.clone(),
        base_checkpoint: status.base_checkpoint.clone(),
        transfers: status.transfers.clone(),
        bytes_moved: status.bytes_moved,
        failed_restores: status.failed_restores.clone(),
    }
}

/// Writes the driver's run into a status, keeping the operator's own fields.
pub(crate) fn set_run(status: &mut MigrationStatus, run: &Run) {
    status.state = run.state.clone();
    status.limits = run.limits;
    status.lease_timeout = run.lease_timeout;
    status.stored_checkpoint = run.stored_checkpoint.clone();
    status.base_checkpoint = run.base_checkpoint.clone();
    status.transfers = run.transfers.clone();
    status.bytes_moved = run.bytes_moved;
    status.failed_restores = run.failed_restores.clone();
}

/// The Ready/Progressing conditions for a status.
pub(crate) fn conditions(
    state: &MigrationState,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let time = Time(now);
    let message = state.message.clone().unwrap_or_default();
    let (ready, ready_reason) = match state.phase {
        Phase::Succeeded => ("True", "Succeeded".to_string()),
        phase if phase.is_terminal() => ("False", phase.to_string()),
        phase => ("Unknown", phase.to_string()),
    };
    let progressing = if state.phase.is_terminal() {
        "False"
    } else {
        "True"
    };
    vec![
        Condition {
            type_: "Ready".into(),
            status: ready.into(),
            reason: ready_reason,
            message: message.clone(),
            last_transition_time: time.clone(),
            observed_generation: generation,
        },
        Condition {
            type_: "Progressing".into(),
            status: progressing.into(),
            reason: state.phase.to_string(),
            message,
            last_transition_time: time,
            observed_generation: generation,
        },
    ]
}

/// Keeps each condition's `lastTransitionTime` unless its status changed.
pub(crate) fn merge_conditions(previous: &[Condition], mut next: Vec<Condition>) -> Vec<Condition> {
    for condition in &mut next {
        if let Some(old) = previous
            .iter()
            .find(|old| old.type_ == condition.type_ && old.status == condition.status)
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    next
}

/// The phases recorded in `state.history` from index `from` on, with their durations in
/// seconds: from the phase's start to the start of what followed it (the next entry, or the
/// current phase), as persisted.
pub(crate) fn ended_phase_seconds(state: &MigrationState, from: usize) -> Vec<(Phase, f64)> {
    let history = &state.history;
    (from..history.len())
        .map(|index| {
            let timing = &history[index];
            let next_started = history
                .get(index + 1)
                .map_or(state.phase_started_at, |next| next.started_at);
            let seconds = units::age(next_started, timing.started_at).as_secs_f64();
            (timing.phase, seconds)
        })
        .collect()
}

/// The log line of a phase change. The migration's message goes in `detail`: a field named
/// `message` would collide with the event's own message in JSON output (two `"message"` keys,
/// and readers keep one).
pub(crate) fn log_phase_change(before: Phase, after: Phase, detail: Option<&str>) {
    tracing::info!(
        from = %before,
        to = %after,
        detail = detail.unwrap_or(""),
        "migration phase changed"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use automigrate_core::migration::{self, Event};

    use super::*;

    /// An `io::Write` into a shared buffer, to read what a subscriber printed.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A phase change's JSON log line has one `message` key (the event's), and the migration's
    /// message under `detail`. It used to carry a field named `message` too: two keys, and
    /// JSON readers keep only one of them.
    #[test]
    fn a_phase_change_logs_one_message_key_and_the_detail() {
        let captured = Captured::default();
        for flatten in [false, true] {
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(flatten)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                log_phase_change(
                    Phase::Transferring,
                    Phase::RollingBack,
                    Some("Transferring failed: agent unreachable"),
                );
            });
            let text = String::from_utf8(std::mem::take(&mut *captured.0.lock().unwrap())).unwrap();
            let line = text.lines().next().unwrap();
            assert_eq!(line.matches("\"message\"").count(), 1, "{line}");
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let fields = if flatten { &value } else { &value["fields"] };
            assert_eq!(fields["message"], "migration phase changed", "{line}");
            assert_eq!(
                fields["detail"], "Transferring failed: agent unreachable",
                "{line}"
            );
            assert_eq!(fields["to"], "RollingBack", "{line}");
        }
    }

    #[test]
    fn ended_phases_are_timed_from_the_persisted_timestamps() {
        let at = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let mut state = MigrationState::new("a".into(), "b".into(), true, at(0), None);
        let limits = migration::Limits::from_policy(&automigrate_core::policy::Policy::default());
        let ok = Event::StepSucceeded {
            checkpoint_id: None,
        };
        state = migration::apply(&state, &ok, &limits, at(0)).unwrap();
        state = migration::apply(&state, &ok, &limits, at(7)).unwrap();
        state = migration::apply(&state, &ok, &limits, at(27)).unwrap();
        assert_eq!(state.phase, Phase::Transferring);
        let timed = ended_phase_seconds(&state, 0);
        assert_eq!(
            timed,
            [
                (Phase::Pending, 0.0),
                (Phase::Syncing, 7.0),
                (Phase::Checkpointing, 20.0)
            ]
        );
        assert_eq!(
            ended_phase_seconds(&state, 2),
            [(Phase::Checkpointing, 20.0)]
        );
        assert!(ended_phase_seconds(&state, 3).is_empty());
    }

    #[test]
    fn conditions_follow_the_phase() {
        let state = MigrationState::new("a".into(), "b".into(), true, Timestamp::UNIX_EPOCH, None);
        let list = conditions(&state, Some(1), Timestamp::UNIX_EPOCH);
        assert_eq!(list[0].status, "Unknown");
        assert_eq!(list[1].status, "True");
        let mut done = state.clone();
        done.phase = Phase::Succeeded;
        let later = Timestamp::from_second(10).unwrap();
        let next = merge_conditions(&list, conditions(&done, Some(1), later));
        assert_eq!(next[0].status, "True");
        assert_eq!(next[0].last_transition_time, Time(later));
        let again = merge_conditions(
            &next,
            conditions(&done, Some(1), Timestamp::from_second(20).unwrap()),
        );
        assert_eq!(
            again[0].last_transition_time,
            Time(later),
            "unchanged status keeps its time"
        );
    }
}
