//! What the driver persists about one migration ([`Run`]) and the records inside it. A leaf
//! module: plain serialisable data, no behaviour beyond reading it, so every other file of the
//! driver and every port can use it without importing each other.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::migration::{Limits, MigrationState};
use crate::units;

/// One transfer the migration needs, and how far it got (kept so a restart polls the same
/// transfer instead of starting another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct TransferRecord {
    pub payload: TransferPayload,
    /// Node whose agent sends.
    pub from: String,
    /// Node whose agent receives.
    pub to: String,
    /// The sending agent's transfer id, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub done: bool,
}

impl TransferRecord {
    /// A transfer not started yet.
    pub fn new(payload: TransferPayload, from: &str, to: &str) -> Self {
        Self {
            payload,
            from: from.to_string(),
            to: to.to_string(),
            id: None,
            bytes_total: 0,
            bytes_done: 0,
            done: false,
        }
    }

    /// Whether it moves checkpoint `id`.
    pub fn carries_checkpoint(&self, id: &str) -> bool {
        self.payload.checkpoint.as_deref() == Some(id)
    }

    /// How it reads in a log line or a wait reason.
    pub fn describe(&self) -> String {
        let what = match (&self.payload.checkpoint, &self.payload.dataset) {
            (Some(id), _) => format!("checkpoint {id}"),
            (None, Some(path)) => format!("dataset {path}"),
            (None, None) => "transfer".to_string(),
        };
        format!("{what} {} → {}", self.from, self.to)
    }
}

/// What a transfer moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct TransferPayload {
    /// A checkpoint id (exactly one of `checkpoint` and `dataset` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// An absolute dataset path on the sending node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

impl TransferPayload {
    pub fn checkpoint(id: impl Into<String>) -> Self {
        Self {
            checkpoint: Some(id.into()),
            dataset: None,
        }
    }

    pub fn dataset(path: impl Into<String>) -> Self {
        Self {
            checkpoint: None,
            dataset: Some(path.into()),
        }
    }
}

/// Where a migration restores from when its source cannot take a fresh checkpoint: a stored
/// checkpoint and a node that holds a verified copy of it (chosen by [`super::choose_checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schemars", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    pub id: String,
    /// A node that holds a verified copy.
    pub from: String,
}

/// Everything the driver persists about one migration: the state machine plus what it needs
/// to resume. A port stores it however it likes (the operator: the Migration's status, field
/// for field) and hands it back after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    #[serde(flatten)]
    pub state: MigrationState,
    pub limits: Limits,
    /// How long a node's Lease may go unrenewed before the node counts as dead (fencing).
    #[serde(with = "units::duration")]
    pub lease_timeout: Duration,
    /// The stored checkpoint chosen when the source cannot take a fresh one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_checkpoint: Option<RestoreSource>,
    /// The checkpoint an incremental final dump builds on (sent while syncing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_checkpoint: Option<String>,
    #[serde(default)]
    pub transfers: Vec<TransferRecord>,
    /// Bytes sent to the target so far, over every transfer of this migration.
    #[serde(default)]
    pub bytes_moved: u64,
    /// Checkpoints that failed to restore on the target, oldest failure first (the
    /// restore-failure rule retries an older one once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_restores: Vec<String>,
}

impl Run {
    pub fn new(state: MigrationState, limits: Limits, lease_timeout: Duration) -> Self {
        Self {
            state,
            limits,
            lease_timeout,
            stored_checkpoint: None,
            base_checkpoint: None,
            transfers: Vec::new(),
            bytes_moved: 0,
            failed_restores: Vec::new(),
        }
    }

    /// The checkpoint the replacement starts from: this migration's final dump, else the
    /// stored one chosen; `None` starts the workload fresh.
    pub fn restore_from(&self) -> Option<&str> {
        self.state.checkpoint_id.as_deref().or(self
            .stored_checkpoint
            .as_ref()
            .map(|stored| stored.id.as_str()))
    }

    /// Records a transfer of checkpoint `id` from `from` to the target unless one exists or
    /// the target is the sender.
    pub(crate) fn ensure_checkpoint_transfer(&mut self, id: &str, from: &str) {
        if from == self.state.target
            || self
                .transfers
                .iter()
                .any(|record| record.carries_checkpoint(id))
        {
            return;
        }
        let target = self.state.target.clone();
        self.transfers.push(TransferRecord::new(
            TransferPayload::checkpoint(id),
            from,
            &target,
        ));
    }
}
