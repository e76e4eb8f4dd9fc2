//! A source powered off (or cut off from the API server) in the middle of a live migration
//! (fault suite, issue 16: f001-po and f005-ac of seed 7/12): its Ready condition stays True
//! (nothing marks it in the local cluster; Kubernetes' node lifecycle controller does so only
//! 40–50 s later), but its Lease stops. The driver must count the source as lost by its Lease,
//! in Checkpointing and in Transferring while the final dump has not reached the target, and
//! go on from the newest stored checkpoint, instead of retrying the dead source until the
//! phase deadline (5 min for a checkpoint, 30 min for a transfer).

use std::time::Duration;

use jiff::Timestamp;

use super::advance_once as advance;
use super::port::{
    Action, CheckpointCopy, Observation, Outcome, PersistError, Port, StepFailure,
    TargetObservation, TransferStatus,
};
use super::run::{RestoreSource, Run, TransferPayload, TransferRecord};
use crate::migration::{Limits, MigrationState, Phase};
use crate::policy::Policy;

const LEASE_TIMEOUT: Duration = Duration::from_secs(15);
const FINAL_DUMP: &str = "ck-final";
const STORED: &str = "ck-stored";

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

/// The source node still shows Ready (`source_reachable`), its Lease was last renewed at
/// `source_renewed`; a standby holds the verified stored checkpoint; every action on the
/// source fails as an unreachable agent does.
struct SilentSource {
    now: Timestamp,
    source_renewed: Timestamp,
    source_reachable: bool,
    /// The stored copy the port lists: `(id, holder)`.
    stored: (&'static str, &'static str),
    /// Holders besides the source that died: their agents never answer.
    dead_holders: Vec<&'static str>,
    actions: Vec<Action>,
    /// (checkpoint, from) of every transfer asked for.
    transfers: Vec<(String, String)>,
}

impl SilentSource {
    fn new(source_renewed: Timestamp) -> Self {
        Self {
            now: t(100),
            source_renewed,
            source_reachable: true,
            stored: (STORED, "standby"),
            dead_holders: Vec::new(),
            actions: Vec::new(),
            transfers: Vec::new(),
        }
    }
}

impl Port for SilentSource {
    fn now(&mut self) -> Timestamp {
        self.now
    }

    async fn observe(&mut self, _run: &Run) -> Observation {
        Observation {
            source_reachable: self.source_reachable,
            source_running: true,
            target_running: false,
            source_known: true,
            source_renewed_at: Some(self.source_renewed),
            source_out_of_service: false,
        }
    }

    async fn observe_target(&mut self, _run: &Run) -> TargetObservation {
        TargetObservation {
            gone: false,
            renewed_at: Some(self.now),
            out_of_service: false,
        }
    }

    async fn final_dump_since(&mut self, _since: Timestamp) -> Option<String> {
        None
    }

    async fn stored_checkpoints(&mut self, _run: &Run) -> Vec<CheckpointCopy> {
        vec![CheckpointCopy {
            id: self.stored.0.into(),
            taken_at: t(50),
            node: self.stored.1.into(),
            verified: true,
            rtt_to_target: Some(Duration::from_millis(10)),
        }]
    }

    async fn transfer(&mut self, record: &TransferRecord) -> Result<TransferStatus, StepFailure> {
        let id = record.payload.checkpoint.clone().unwrap_or_default();
        self.transfers.push((id, record.from.clone()));
        if record.from == "source" || self.dead_holders.contains(&record.from.as_str()) {
            return Err(StepFailure {
                reason: format!("agent on node {} unreachable", record.from),
                retryable: true,
            });
        }
        Ok(TransferStatus::Running {
            id: "x-1".into(),
            bytes_done: 1,
            bytes_total: 10,
        })
    }

    async fn act(&mut self, _run: &Run, action: &Action) -> Outcome {
        self.actions.push(action.clone());
        Outcome::Failed {
            reason: "agent on node source unreachable".into(),
            retryable: true,
        }
    }

    async fn persist(
        &mut self,
        _run: &Run,
        _previous: Option<&MigrationState>,
    ) -> Result<(), PersistError> {
        Ok(())
    }
}

/// A live migration from `source` to `target` in `phase` since 90 s.
fn live_run(phase: Phase) -> Run {
    let mut state = MigrationState::new("source".into(), "target".into(), true, t(0), None);
    state.phase = phase;
    state.phase_started_at = t(90);
    if phase == Phase::Transferring {
        state.checkpoint_id = Some(FINAL_DUMP.into());
    }
    let mut run = Run::new(
        state,
        Limits::from_policy(&Policy::default()),
        LEASE_TIMEOUT,
    );
    if phase == Phase::Transferring {
        run.transfers.push(TransferRecord::new(
            TransferPayload::checkpoint(FINAL_DUMP),
            "source",
            "target",
        ));
    }
    run
}

fn sends_stored_from_standby(port: &SilentSource) -> bool {
    port.transfers
        .iter()
        .any(|(id, from)| id == STORED && from == "standby")
}

#[test]
fn a_source_whose_lease_stopped_during_checkpointing_is_lost() {
    // Renewed 20 s ago: past the 15 s lease timeout, although Ready still says True.
    let mut port = SilentSource::new(t(80));
    let run = advance(&mut port, live_run(Phase::Checkpointing));
    assert!(!run.state.source_alive, "{:?}", run.state);
    assert_eq!(run.state.phase, Phase::Transferring);
    assert!(
        !port.actions.contains(&Action::FinalCheckpoint),
        "asked the dead source for a dump: {:?}",
        port.actions
    );
    assert!(sends_stored_from_standby(&port), "{:?}", port.transfers);
}

#[test]
fn a_source_whose_lease_stopped_before_its_dump_arrived_is_lost() {
    let mut port = SilentSource::new(t(80));
    let run = advance(&mut port, live_run(Phase::Transferring));
    assert!(!run.state.source_alive, "{:?}", run.state);
    assert_eq!(
        run.state.checkpoint_id, None,
        "the stranded dump is forgotten"
    );
    assert_eq!(run.state.phase, Phase::Transferring);
    assert!(sends_stored_from_standby(&port), "{:?}", port.transfers);
    assert!(
        !port.transfers.iter().any(|(_, from)| from == "source"),
        "retried the dead source: {:?}",
        port.transfers
    );
}

#[test]
fn a_short_silence_or_a_ready_flap_keeps_the_final_dump() {
    // The Lease is 5 s old (under the timeout); Ready flapped to Unknown.
    let mut port = SilentSource::new(t(95));
    port.source_reachable = false;
    let run = advance(&mut port, live_run(Phase::Transferring));
    assert!(run.state.source_alive, "{:?}", run.state);
    assert_eq!(run.state.checkpoint_id.as_deref(), Some(FINAL_DUMP));
    assert!(!sends_stored_from_standby(&port), "{:?}", port.transfers);
}

#[test]
fn a_dump_that_reached_the_target_is_kept_when_the_source_dies() {
    let mut port = SilentSource::new(t(80));
    let mut run = live_run(Phase::Transferring);
    run.transfers[0].done = true;
    let run = advance(&mut port, run);
    assert!(run.state.source_alive, "{:?}", run.state);
    assert_eq!(run.state.checkpoint_id.as_deref(), Some(FINAL_DUMP));
    assert_ne!(run.state.phase, Phase::Transferring);
}

#[test]
fn a_lost_source_is_not_polled_for_a_dump_that_reached_the_target_anyway() {
    // The source's agent sent the whole dump over the peer links before the controller lost
    // it: the target lists the dump verified, the controller's record of the send is not done.
    let mut port = SilentSource::new(t(80));
    port.stored = (FINAL_DUMP, "target");
    let run = advance(&mut port, live_run(Phase::Transferring));
    assert!(!run.state.source_alive, "{:?}", run.state);
    assert!(
        !port.transfers.iter().any(|(_, from)| from == "source"),
        "polled the dead source: {:?}",
        port.transfers
    );
    assert_ne!(
        run.state.phase,
        Phase::Transferring,
        "{:?}",
        run.state.message
    );
}

#[test]
fn a_stored_copy_whose_holder_died_too_is_replaced_by_a_surviving_copy() {
    // The source died; the migration syncs the stored checkpoint from `standby`, which dies
    // as well: its agent never answers and the port no longer lists its copy (its Lease
    // expired), while `standby-2` holds the same checkpoint. Asking the dead holder again
    // until the phase deadline left the pod down (issue 12 campaign, f084-td).
    let mut port = SilentSource::new(t(80));
    port.dead_holders.push("standby");
    port.stored = (STORED, "standby-2");
    let mut state = MigrationState::new("source".into(), "target".into(), false, t(0), Some(t(80)));
    state.phase = Phase::Syncing;
    state.phase_started_at = t(90);
    let mut run = Run::new(
        state,
        Limits::from_policy(&Policy::default()),
        LEASE_TIMEOUT,
    );
    run.stored_checkpoint = Some(RestoreSource {
        id: STORED.into(),
        from: "standby".into(),
    });
    run.transfers.push(TransferRecord::new(
        TransferPayload::checkpoint(STORED),
        "standby",
        "target",
    ));
    let run = advance(&mut port, run);
    assert_eq!(run.state.attempts, 1, "{:?}", run.state);
    // After the retry's backoff.
    port.now = t(200);
    let run = advance(&mut port, run);
    assert_eq!(
        run.stored_checkpoint
            .as_ref()
            .map(|stored| stored.from.as_str()),
        Some("standby-2"),
        "{:?}",
        run.state.message
    );
    assert!(
        port.transfers
            .iter()
            .any(|(id, from)| id == STORED && from == "standby-2"),
        "{:?}",
        port.transfers
    );
    assert_eq!(
        port.transfers
            .iter()
            .filter(|(_, from)| from == "standby")
            .count(),
        1,
        "asked the dead holder again: {:?}",
        port.transfers
    );
    assert!(
        run.transfers.iter().all(|record| record.from != "standby"),
        "{:?}",
        run.transfers
    );
}
