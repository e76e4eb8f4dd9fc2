//! Transfers as the agents carry them out: started on the sending agent, then polled by id.

use automigrate_core::driver::{StepFailure, TransferRecord, TransferStatus};

use super::port::OperatorPort;
use crate::agent::{AgentError, TransferState};

impl OperatorPort<'_> {
    pub(super) async fn drive_transfer(
        &self,
        record: &TransferRecord,
    ) -> Result<TransferStatus, StepFailure> {
        let agent = &self.executor.agent;
        let progress = match &record.id {
            None => {
                agent
                    .start_transfer(&record.from, &record.payload, &record.to)
                    .await
            }
            Some(id) => agent.transfer_status(&record.from, id).await,
        };
        let progress = match progress {
            Ok(progress) => progress,
            Err(AgentError::NotFound { .. }) => return Ok(TransferStatus::Unknown),
            Err(error) => {
                return Err(StepFailure {
                    reason: error.to_string(),
                    retryable: error.retryable(),
                });
            }
        };
        let payload = if record.payload.checkpoint.is_some() {
            "checkpoint"
        } else {
            "dataset"
        };
        let delta = progress.bytes_done.saturating_sub(record.bytes_done);
        metrics::counter!(crate::metrics::BYTES_MOVED, "payload" => payload).increment(delta);
        Ok(match progress.state {
            TransferState::Succeeded => TransferStatus::Succeeded {
                id: progress.id,
                bytes_done: progress.bytes_done,
                bytes_total: progress.bytes_total,
            },
            TransferState::Running => TransferStatus::Running {
                id: progress.id,
                bytes_done: progress.bytes_done,
                bytes_total: progress.bytes_total,
            },
            TransferState::Failed => TransferStatus::Failed {
                reason: progress.error.unwrap_or_else(|| "no reason given".into()),
            },
        })
    }
}
