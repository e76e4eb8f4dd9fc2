//! Turning the engine's decision into a migration: its first [`Run`], with the state
//! machine's start, the policy's limits and every transfer the migration will need.

use jiff::Timestamp;

use super::run::{RestoreSource, Run, TransferPayload, TransferRecord};
use crate::decide::{CheckpointSource, MigrationDecision, Payload};
use crate::migration::{Limits, MigrationState};
use crate::policy::Policy;

/// The first state of the migration `decision` asks for. `dataset_path` is the pod's dataset
/// path (its `automigrate.dev/dataset` annotation), when it names one.
pub fn begin(
    decision: &MigrationDecision,
    dataset_path: Option<&str>,
    policy: &Policy,
    now: Timestamp,
) -> Run {
    let source_alive = matches!(decision.checkpoint, CheckpointSource::Fresh { .. });
    let failed_at = (!source_alive).then_some(decision.failed_at).flatten();
    let state = MigrationState::new(
        decision.from.clone(),
        decision.to.clone(),
        source_alive,
        now,
        failed_at,
    );
    let mut transfers = Vec::new();
    for planned in &decision.transfers {
        match (planned.payload, &decision.checkpoint) {
            (Payload::Dataset, _) => {
                if let Some(path) = dataset_path {
                    transfers.push(TransferRecord::new(
                        TransferPayload::dataset(path),
                        &planned.from,
                        &planned.to,
                    ));
                }
            }
            (Payload::Checkpoint, CheckpointSource::Stored { id, .. }) => {
                transfers.push(TransferRecord::new(
                    TransferPayload::checkpoint(id),
                    &planned.from,
                    &planned.to,
                ));
            }
            // A fresh checkpoint is sent after the final dump; nothing to send without one.
            (Payload::Checkpoint, CheckpointSource::Fresh { .. } | CheckpointSource::None) => {}
        }
    }
    if source_alive && decision.from != decision.to {
        if let Some(path) = dataset_path
            && !transfers.iter().any(|t| t.payload.dataset.is_some())
        {
            // The agents do not report datasets to the engine yet, so it cannot plan this one;
            // the source holds it.
            transfers.push(TransferRecord::new(
                TransferPayload::dataset(path),
                &decision.from,
                &decision.to,
            ));
        }
        if let CheckpointSource::Fresh { base: Some(base) } = &decision.checkpoint {
            transfers.push(TransferRecord::new(
                TransferPayload::checkpoint(base),
                &decision.from,
                &decision.to,
            ));
        }
    }
    let mut run = Run::new(
        state,
        Limits::from_policy(policy),
        policy.triggers.lease_timeout,
    );
    run.stored_checkpoint = match &decision.checkpoint {
        CheckpointSource::Stored { id, from, .. } => Some(RestoreSource {
            id: id.clone(),
            from: from.clone(),
        }),
        _ => None,
    };
    run.base_checkpoint = match &decision.checkpoint {
        CheckpointSource::Fresh { base } => base.clone(),
        _ => None,
    };
    run.transfers = transfers;
    run
}
