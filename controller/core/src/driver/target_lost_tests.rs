//! A lost target (fault suite f007-td: the target node powered off while Restoring): the
//! driver rolls back at once instead of retrying on the dead node until the phase deadline,
//! and no rollback starts the workload on the lost node. Also a target whose disk is full
//! (f003-tdf): the port reports the refused transfer as non-retryable, and the migration
//! rolls back at once instead of retrying until the deadline.

use std::time::Duration;

use jiff::Timestamp;

use super::advance_once as advance;
use super::port::{
    Action, CheckpointCopy, Observation, Outcome, PersistError, Port, Role, StepFailure,
    TargetObservation, TransferStatus,
};
use super::run::{Run, TransferRecord};
use crate::migration::{Limits, MigrationState, Phase, RollbackAction};
use crate::policy::{Fallback, Policy};

const LEASE_TIMEOUT: Duration = Duration::from_secs(40);

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

/// A port whose target node stopped renewing its Lease at 0 s (powered off): every action on
/// it fails as an unreachable agent does (retryable); the source node is alive.
struct DeadTarget {
    now: Timestamp,
    source_alive: bool,
    /// The target's last Lease renewal (0 s: dead by now).
    target_renewed: Timestamp,
    /// What a transfer to the target fails with.
    transfer_failure: StepFailure,
    actions: Vec<Action>,
    transfers: usize,
}

impl DeadTarget {
    fn new(source_alive: bool) -> Self {
        Self {
            now: t(100),
            source_alive,
            target_renewed: t(0),
            transfer_failure: StepFailure {
                reason: "agent on node target unreachable".into(),
                retryable: true,
            },
            actions: Vec::new(),
            transfers: 0,
        }
    }

    fn started_on(&self, node: &str) -> bool {
        self.actions
            .iter()
            .any(|action| matches!(action, Action::StartReplacement { node: on, .. } if on == node))
    }
}

impl Port for DeadTarget {
    fn now(&mut self) -> Timestamp {
        self.now
    }

    async fn observe(&mut self, _run: &Run) -> Observation {
        Observation {
            source_reachable: self.source_alive,
            source_running: false,
            target_running: false,
            source_known: true,
            source_renewed_at: Some(if self.source_alive { self.now } else { t(0) }),
            source_out_of_service: !self.source_alive,
        }
    }

    async fn observe_target(&mut self, _run: &Run) -> TargetObservation {
        TargetObservation {
            gone: false,
            renewed_at: Some(self.target_renewed),
            out_of_service: false,
        }
    }

    async fn final_dump_since(&mut self, _since: Timestamp) -> Option<String> {
        None
    }

    async fn stored_checkpoints(&mut self, _run: &Run) -> Vec<CheckpointCopy> {
        Vec::new()
    }

    async fn transfer(&mut self, _record: &TransferRecord) -> Result<TransferStatus, StepFailure> {
        self.transfers += 1;
        Err(self.transfer_failure.clone())
    }

    async fn act(&mut self, _run: &Run, action: &Action) -> Outcome {
        self.actions.push(action.clone());
        match action {
            Action::StartReplacement { node, .. } if node == "target" => Outcome::Failed {
                reason: "agent on node target unreachable".into(),
                retryable: true,
            },
            _ => Outcome::done(),
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

/// A run in `phase` with the source fenced (stopped by the migration's final dump `ck-1`).
fn run_in(phase: Phase, source_alive: bool, fallback: Fallback) -> Run {
    let mut state = MigrationState::new("source".into(), "target".into(), source_alive, t(0), None);
    state.phase = phase;
    state.phase_started_at = t(90);
    state.source_fenced = true;
    state.checkpoint_id = source_alive.then(|| "ck-1".to_string());
    let mut limits = Limits::from_policy(&Policy::default());
    limits.fallback = fallback;
    Run::new(state, limits, LEASE_TIMEOUT)
}

#[test]
fn a_lost_target_while_restoring_rolls_back_to_the_source_at_once() {
    for fallback in [Fallback::Rollback, Fallback::Restart] {
        let mut port = DeadTarget::new(true);
        let run = advance(&mut port, run_in(Phase::Restoring, true, fallback));
        assert!(
            !port.started_on("target"),
            "{fallback:?}: started on the lost target: {:?}",
            port.actions
        );
        assert_eq!(
            port.actions,
            vec![Action::StartReplacement {
                node: "source".into(),
                from: Some("ck-1".into()),
                role: Role::Rollback,
            }],
            "{fallback:?}"
        );
        assert_eq!(run.state.phase, Phase::RolledBack, "{fallback:?}");
        assert!(
            run.state
                .message
                .as_deref()
                .is_some_and(|message| message.contains("target node target lost")),
            "{:?}",
            run.state.message
        );
    }
}

#[test]
fn a_lost_target_with_a_dead_source_fails_saying_the_pod_is_placed_again() {
    for phase in [Phase::Restoring, Phase::Verifying] {
        let mut port = DeadTarget::new(false);
        let mut run = run_in(phase, false, Fallback::Rollback);
        run.state.target_started = phase == Phase::Verifying;
        let run = advance(&mut port, run);
        assert!(!port.started_on("target"), "{phase}: {:?}", port.actions);
        assert_eq!(run.state.phase, Phase::Failed, "{phase}");
        let message = run.state.message.unwrap_or_default();
        assert!(
            message.contains("target node target lost")
                && message.contains("places it again on a live node"),
            "{phase}: {message}"
        );
    }
}

#[test]
fn a_fresh_start_never_picks_a_lost_target() {
    let mut port = DeadTarget::new(true);
    let mut run = run_in(Phase::RollingBack, true, Fallback::Rollback);
    run.state.rollback = Some(RollbackAction::RestartFresh);
    let run = advance(&mut port, run);
    assert!(!port.started_on("target"), "{:?}", port.actions);
    assert_eq!(run.state.phase, Phase::Failed);
    assert!(
        run.state
            .message
            .as_deref()
            .is_some_and(|message| message.contains("a person must")),
        "{:?}",
        run.state.message
    );
}

#[test]
fn a_target_that_renews_its_lease_is_not_lost() {
    let fresh = TargetObservation {
        gone: false,
        renewed_at: Some(t(70)),
        out_of_service: false,
    };
    assert_eq!(
        super::target_lost("target", &fresh, LEASE_TIMEOUT, t(100)),
        None
    );
    assert!(super::target_lost("target", &fresh, LEASE_TIMEOUT, t(110)).is_some());
    // No Node and no Lease: removed from the cluster. No Node but a Lease: not yet.
    let gone = TargetObservation {
        gone: true,
        renewed_at: None,
        out_of_service: false,
    };
    assert!(super::target_lost("target", &gone, LEASE_TIMEOUT, t(100)).is_some());
    let default = TargetObservation::default();
    assert_eq!(
        super::target_lost("target", &default, LEASE_TIMEOUT, t(100)),
        None
    );
}

#[test]
fn a_full_target_disk_rolls_back_at_once_instead_of_retrying() {
    let mut port = DeadTarget::new(true);
    port.target_renewed = port.now; // alive, but its disk is full
    port.transfer_failure = StepFailure {
        reason:
            "dataset node-a → target: the target is out of space: the receiver refused (NoSpace)"
                .into(),
        retryable: false,
    };
    let mut run = run_in(Phase::Syncing, true, Fallback::Rollback);
    run.state.source_fenced = false;
    run.state.checkpoint_id = None;
    run.transfers.push(TransferRecord::new(
        super::run::TransferPayload::checkpoint("ck-0"),
        "source",
        "target",
    ));
    let run = advance(&mut port, run);
    assert_eq!(port.transfers, 1, "tried once, not retried");
    assert!(port.actions.is_empty(), "{:?}", port.actions);
    // The source never stopped: it keeps running, and the decider's recently failed target
    // rule (RolledBack within retryBackoffMax) steers the next attempt elsewhere.
    assert_eq!(
        run.state.phase,
        Phase::RolledBack,
        "{:?}",
        run.state.message
    );
    assert_eq!(run.state.rollback, Some(RollbackAction::KeepSource));
}
