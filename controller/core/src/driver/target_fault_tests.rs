//! A target that refuses an intact checkpoint (fault suite, issue 12: f045-tdf, the target's
//! disk full while the source was dead): its own store verifies the checkpoint, the restore
//! fails for good. Starting the workload from the beginning there threw the intact checkpoint
//! away; the migration fails instead, nothing started, and the decision engine places the pod
//! again elsewhere. A checkpoint the target's store does not verify is the image's fault: the
//! older-checkpoint retry and the fallback's fresh start stay as they were.

use std::time::Duration;

use jiff::Timestamp;

use super::advance_once as advance;
use super::port::{
    Action, CheckpointCopy, Observation, Outcome, PersistError, Port, StepFailure,
    TargetObservation, TransferStatus,
};
use super::run::{RestoreSource, Run, TransferRecord};
use crate::migration::{Limits, MigrationState, Phase};
use crate::policy::{Fallback, Policy};

const STORED: &str = "ck-7";

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

/// The source is dead (out of service); the target is alive and holds `ck-7`, verified or
/// not by its store; every restore from a checkpoint there fails for good (no space left),
/// a fresh start succeeds.
struct FullTarget {
    /// How the port lists the target's copy of `ck-7`: one entry per listing (recorded,
    /// checked by the store), each verified or not.
    target_listings: Vec<bool>,
    actions: Vec<Action>,
}

impl Port for FullTarget {
    fn now(&mut self) -> Timestamp {
        t(100)
    }

    async fn observe(&mut self, _run: &Run) -> Observation {
        Observation {
            source_reachable: false,
            source_running: false,
            target_running: false,
            source_known: true,
            source_renewed_at: Some(t(0)),
            source_out_of_service: true,
        }
    }

    async fn observe_target(&mut self, _run: &Run) -> TargetObservation {
        TargetObservation {
            gone: false,
            renewed_at: Some(t(100)),
            out_of_service: false,
        }
    }

    async fn final_dump_since(&mut self, _since: Timestamp) -> Option<String> {
        None
    }

    async fn stored_checkpoints(&mut self, _run: &Run) -> Vec<CheckpointCopy> {
        self.target_listings
            .iter()
            .map(|&verified| CheckpointCopy {
                id: STORED.into(),
                taken_at: t(50),
                node: "target".into(),
                verified,
                rtt_to_target: None,
            })
            .collect()
    }

    async fn transfer(&mut self, _record: &TransferRecord) -> Result<TransferStatus, StepFailure> {
        Ok(TransferStatus::Unknown)
    }

    async fn act(&mut self, _run: &Run, action: &Action) -> Outcome {
        self.actions.push(action.clone());
        match action {
            Action::StartReplacement { from: Some(_), .. } => Outcome::Failed {
                reason: "agent on node target refused (imageFailed): No space left on device"
                    .into(),
                retryable: false,
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

impl FullTarget {
    fn started_fresh(&self) -> bool {
        self.actions
            .iter()
            .any(|action| matches!(action, Action::StartReplacement { from: None, .. }))
    }
}

/// A dead-source migration in Restoring (fenced) from the target's own copy of `ck-7`.
fn restoring(fallback: Fallback) -> Run {
    let mut state = MigrationState::new("source".into(), "target".into(), false, t(0), Some(t(0)));
    state.phase = Phase::Restoring;
    state.phase_started_at = t(90);
    state.source_fenced = true;
    let mut limits = Limits::from_policy(&Policy::default());
    limits.fallback = fallback;
    let mut run = Run::new(state, limits, Duration::from_secs(15));
    run.stored_checkpoint = Some(RestoreSource {
        id: STORED.into(),
        from: "target".into(),
    });
    run
}

#[test]
fn an_intact_checkpoint_the_target_refuses_is_not_thrown_away_for_a_fresh_start() {
    for fallback in [Fallback::Rollback, Fallback::Fail] {
        let mut port = FullTarget {
            target_listings: vec![true, true],
            actions: Vec::new(),
        };
        let run = advance(&mut port, restoring(fallback));
        assert_eq!(run.state.phase, Phase::Failed, "{:?}", run.state.message);
        assert!(!port.started_fresh(), "{fallback:?}: {:?}", port.actions);
        let message = run.state.message.unwrap_or_default();
        assert!(
            message.contains("at fault") && message.contains(STORED),
            "{message}"
        );
    }
}

#[test]
fn a_restart_policy_or_a_damaged_image_still_starts_fresh() {
    // `fallback: restart` asked for a fresh start whatever the cause.
    let mut port = FullTarget {
        target_listings: vec![true],
        actions: Vec::new(),
    };
    let run = advance(&mut port, restoring(Fallback::Restart));
    assert_eq!(run.state.phase, Phase::Restarted, "{:?}", run.state.message);
    assert!(port.started_fresh());
    // The target's store does not verify the image (whatever the pod's record says): the
    // image is at fault, and none older is left, so the rollback starts the workload fresh
    // as before.
    for target_listings in [vec![false], vec![true, false]] {
        let mut port = FullTarget {
            target_listings,
            actions: Vec::new(),
        };
        let run = advance(&mut port, restoring(Fallback::Rollback));
        assert_eq!(run.state.phase, Phase::Restarted, "{:?}", run.state.message);
        assert!(port.started_fresh());
    }
}
