//! Transfers as the agents carry them out: started on the sending agent, then polled by id.

use automigrate_core::driver::{StepFailure, TransferRecord, TransferStatus};

use super::port::OperatorPort;
use crate::agent::{AgentError, TransferProgress, TransferState};

impl OperatorPort<'_> {
    pub(super) async fn drive_transfer(
        &self,
        record: &TransferRecord,
    ) -> Result<TransferStatus, StepFailure> {
        let agent = &self.executor.agent;
        let call = async {
            match &record.id {
                None => {
                    agent
                        .start_transfer(&record.from, &record.payload, &record.to)
                        .await
                }
                Some(id) => agent.transfer_status(&record.from, id).await,
            }
        };
        // A sender that dies during the call (fault suite, session 8: a source powered off or
        // cut off 30–280 ms into Transferring held the round, and the training, 33–35 s).
        let progress = match self
            .unless_lease_expires(
                &record.from,
                self.status.lease_timeout,
                "transferring",
                call,
            )
            .await
        {
            Ok(Ok(progress)) => progress,
            Ok(Err(AgentError::NotFound { .. })) => return Ok(TransferStatus::Unknown),
            Err(reason) => {
                return Err(StepFailure {
                    reason,
                    retryable: true,
                });
            }
            Ok(Err(error)) => {
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
        status_of(record, progress)
    }
}

/// What the sender's report says of the transfer. A receiver out of space fails it for good:
/// every retry until the phase deadline would be refused the same way (fault suite
/// f003-tdf), so the migration rolls back now and the decision engine, which skips a pod's
/// recently failed targets, picks another node.
fn status_of(
    record: &TransferRecord,
    progress: TransferProgress,
) -> Result<TransferStatus, StepFailure> {
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
        TransferState::Failed => {
            let reason = progress.error.unwrap_or_else(|| "no reason given".into());
            if out_of_space(&reason) {
                return Err(StepFailure {
                    reason: format!(
                        "{} → {}: the target is out of space: {reason}",
                        record.from, record.to
                    ),
                    retryable: false,
                });
            }
            TransferStatus::Failed { reason }
        }
    })
}

/// Whether a failed transfer's reason says the receiver ran out of space: the transfer
/// protocol's `NoSpace` refusal (`the receiver refused (NoSpace): …`), an HTTP 507, or the
/// OS error itself.
fn out_of_space(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    [
        "nospace",
        "no space left",
        "507 insufficient storage",
        "insufficient storage",
    ]
    .iter()
    .any(|needle| reason.contains(needle))
}

#[cfg(test)]
mod tests {
    use automigrate_core::driver::{TransferPayload, TransferRecord, TransferStatus};

    use super::{TransferProgress, TransferState, out_of_space, status_of};

    fn failed(error: &str) -> TransferProgress {
        TransferProgress {
            id: "t-1".into(),
            state: TransferState::Failed,
            bytes_total: 10,
            bytes_done: 3,
            error: Some(error.into()),
        }
    }

    #[test]
    fn a_receiver_out_of_space_fails_the_transfer_for_good() {
        let record = TransferRecord::new(TransferPayload::checkpoint("ck-1"), "node-a", "node-c");
        let full = "the receiver refused (NoSpace): write `faults/dataset.json`: No space left on device (os error 28)";
        match status_of(&record, failed(full)) {
            Err(failure) => {
                assert!(!failure.retryable, "{failure:?}");
                assert!(failure.reason.contains("node-c"), "{failure:?}");
            }
            other => panic!("a full target disk must fail for good: {other:?}"),
        }
        // Any other failure stays a (retryable) failed transfer.
        assert_eq!(
            status_of(&record, failed("connection reset by peer")),
            Ok(TransferStatus::Failed {
                reason: "connection reset by peer".into()
            })
        );
    }

    #[test]
    fn a_full_target_disk_is_out_of_space_and_other_failures_are_not() {
        // As the fault suite's f003-tdf saw it from the sending agent.
        assert!(out_of_space(
            "the receiver refused (NoSpace): write `faults/dataset.json`: No space left on device (os error 28)"
        ));
        assert!(out_of_space("No space left on device (os error 28)"));
        assert!(out_of_space("HTTP 507 Insufficient Storage"));
        assert!(!out_of_space("connection reset by peer"));
        assert!(!out_of_space(
            "the receiver refused (Corrupt): digest mismatch"
        ));
        assert!(!out_of_space("no reason given"));
    }
}
