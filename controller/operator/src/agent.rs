//! What the controller asks of the node agents, behind one narrow trait.
//!
//! [`NodeAgent`] has exactly the calls the controller makes: take a checkpoint of a pod on a
//! node, list a pod's checkpoints there, start and poll a transfer from one node's agent to
//! another's, have a node's agent build a checkpoint image, and read an agent's peer latency
//! probes. Nodes are named, not addressed: the implementation finds the agent on a node. The
//! [`RecordingAgent`] double records every call and answers from a script, so reconcile tests
//! run without agents; the HTTP implementation over the agent crate's client lives in
//! [`crate::agent_http`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_core::model::PodRef;
use futures::FutureExt;
use futures::future::BoxFuture;
use jiff::Timestamp;

use crate::crd::TransferPayload;

/// Periodic (the pod keeps running) or final (stop and dump, before a migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    Periodic,
    Final,
}

/// A checkpoint an agent holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointTaken {
    pub id: String,
    pub created_at: Timestamp,
    pub bytes: u64,
    /// How long the workload was frozen.
    pub freeze: Duration,
    pub verified: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferProgress {
    pub id: String,
    pub state: TransferState,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub error: Option<String>,
}

/// One link an agent measured to a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerLatency {
    pub node: String,
    pub rtt: Duration,
    pub loss: f64,
    /// Whether the peer answers the agent's probes now (`None`: the agent does not say).
    pub answering: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("no agent is known on node {0}")]
    NoAgent(String),
    #[error("agent on node {node} unreachable: {reason}")]
    Unreachable { node: String, reason: String },
    #[error("agent on node {node} refused ({kind}): {reason}")]
    Refused {
        node: String,
        kind: String,
        reason: String,
    },
    #[error("agent on node {node} does not know {what}")]
    NotFound { node: String, what: String },
}

impl AgentError {
    /// Worth trying again: the agent may come back, or the request may pass next time.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::NoAgent(_) | Self::Unreachable { .. })
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NoAgent(_) => "no_agent",
            Self::Unreachable { .. } => "unreachable",
            Self::Refused { .. } => "refused",
            Self::NotFound { .. } => "not_found",
        }
    }
}

pub type AgentResult<'a, T> = BoxFuture<'a, Result<T, AgentError>>;

/// The calls the controller makes to node agents.
pub trait NodeAgent: Send + Sync + std::fmt::Debug {
    /// Checkpoints `container` of `pod` on `node`; returns when the checkpoint is stored.
    fn checkpoint<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
        container: &'a str,
        kind: CheckpointKind,
    ) -> AgentResult<'a, CheckpointTaken>;

    /// The checkpoints of `pod` that `node`'s agent holds, newest first.
    fn checkpoints<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
    ) -> AgentResult<'a, Vec<CheckpointTaken>>;

    /// Has `from`'s agent send `payload` to `to`'s agent.
    fn start_transfer<'a>(
        &'a self,
        from: &'a str,
        payload: &'a TransferPayload,
        to: &'a str,
    ) -> AgentResult<'a, TransferProgress>;

    fn transfer_status<'a>(
        &'a self,
        node: &'a str,
        id: &'a str,
    ) -> AgentResult<'a, TransferProgress>;

    /// Has `node`'s agent build a checkpoint OCI image the runtime can restore; returns its
    /// reference.
    fn build_image<'a>(&'a self, node: &'a str, checkpoint_id: &'a str) -> AgentResult<'a, String>;

    /// The agent's own latency probes to its peers.
    fn peers<'a>(&'a self, node: &'a str) -> AgentResult<'a, Vec<PeerLatency>>;
}

/// One call the controller made, as the double saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentCall {
    Checkpoint {
        node: String,
        pod: PodRef,
        container: String,
        kind: CheckpointKind,
    },
    Checkpoints {
        node: String,
        pod: PodRef,
    },
    StartTransfer {
        from: String,
        payload: TransferPayload,
        to: String,
    },
    TransferStatus {
        node: String,
        id: String,
    },
    BuildImage {
        node: String,
        checkpoint_id: String,
    },
    Peers {
        node: String,
    },
}

#[derive(Debug, Default)]
struct Script {
    calls: Vec<AgentCall>,
    unreachable: BTreeSet<String>,
    failing_checkpoints: BTreeSet<String>,
    /// Transfers to these nodes fail as soon as they start.
    failing_transfers_to: BTreeSet<String>,
    /// Image builds on these nodes are refused: (kind, reason) of the refusal.
    refused_images: BTreeMap<String, (String, String)>,
    /// Polls a transfer stays `Running` before it succeeds.
    transfer_polls: u32,
    transfers: BTreeMap<String, (u32, u64)>,
    stored: BTreeMap<(String, PodRef), Vec<CheckpointTaken>>,
    peers: BTreeMap<String, Vec<PeerLatency>>,
    checkpoints_taken: u64,
    transfers_started: u64,
    now: Option<Timestamp>,
}

/// A scripted [`NodeAgent`] that records every call. By default every call succeeds at once:
/// checkpoints are `{pod}-ck-{n}` of 1 MiB, transfers move 4 MiB and are done on the first
/// poll, images are `localhost/automigrate/{checkpoint}:restore`.
#[derive(Debug, Clone, Default)]
pub struct RecordingAgent {
    script: Arc<Mutex<Script>>,
}

pub const FAKE_CHECKPOINT_BYTES: u64 = 1 << 20;
pub const FAKE_TRANSFER_BYTES: u64 = 4 << 20;

impl RecordingAgent {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Script) -> T) -> Option<T> {
        self.script.lock().ok().map(|mut script| f(&mut script))
    }

    pub fn calls(&self) -> Vec<AgentCall> {
        self.with(|script| script.calls.clone()).unwrap_or_default()
    }

    /// Calls to `node`'s agent answer "unreachable" until [`RecordingAgent::reachable`].
    pub fn unreachable(&self, node: &str) {
        self.with(|script| script.unreachable.insert(node.to_string()));
    }

    pub fn reachable(&self, node: &str) {
        self.with(|script| script.unreachable.remove(node));
    }

    /// Checkpoints on `node` are refused.
    pub fn fail_checkpoints_on(&self, node: &str) {
        self.with(|script| script.failing_checkpoints.insert(node.to_string()));
    }

    /// Transfers to `node` fail (the sender cannot reach it).
    pub fn fail_transfers_to(&self, node: &str) {
        self.with(|script| script.failing_transfers_to.insert(node.to_string()));
    }

    /// Image builds on `node` are refused, as the agent reports it: `kind` and `reason` (a
    /// store that finds the checkpoint damaged, a full disk).
    pub fn refuse_images_on(&self, node: &str, kind: &str, reason: &str) {
        self.with(|script| {
            script
                .refused_images
                .insert(node.to_string(), (kind.to_string(), reason.to_string()))
        });
    }

    /// Transfers stay running for `polls` status polls.
    pub fn transfer_polls(&self, polls: u32) {
        self.with(|script| script.transfer_polls = polls);
    }

    /// The time stamped on new checkpoints (the double reads no clock).
    pub fn set_now(&self, now: Timestamp) {
        self.with(|script| script.now = Some(now));
    }

    pub fn set_peers(&self, node: &str, peers: Vec<PeerLatency>) {
        self.with(|script| script.peers.insert(node.to_string(), peers));
    }

    /// `node`'s agent holds `checkpoint` of `pod` (a replica that landed, seen or not).
    pub fn holds(&self, node: &str, pod: &PodRef, checkpoint: CheckpointTaken) {
        self.with(|script| {
            script
                .stored
                .entry((node.to_string(), pod.clone()))
                .or_default()
                .insert(0, checkpoint)
        });
    }

    fn answer<T>(
        &self,
        call: AgentCall,
        node: &str,
        f: impl FnOnce(&mut Script) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        self.with(|script| {
            script.calls.push(call);
            if script.unreachable.contains(node) {
                return Err(AgentError::Unreachable {
                    node: node.to_string(),
                    reason: "connection refused (scripted)".into(),
                });
            }
            f(script)
        })
        .unwrap_or_else(|| Err(AgentError::NoAgent(node.to_string())))
    }
}

impl NodeAgent for RecordingAgent {
    fn checkpoint<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
        container: &'a str,
        kind: CheckpointKind,
    ) -> AgentResult<'a, CheckpointTaken> {
        let call = AgentCall::Checkpoint {
            node: node.into(),
            pod: pod.clone(),
            container: container.into(),
            kind,
        };
        let result = self.answer(call, node, |script| {
            if script.failing_checkpoints.contains(node) {
                return Err(AgentError::Refused {
                    node: node.into(),
                    kind: "checkpoint".into(),
                    reason: "criu dump failed (scripted)".into(),
                });
            }
            script.checkpoints_taken += 1;
            let taken = CheckpointTaken {
                id: format!("{}-ck-{}", pod.name, script.checkpoints_taken),
                created_at: script.now.unwrap_or(Timestamp::UNIX_EPOCH),
                bytes: FAKE_CHECKPOINT_BYTES,
                freeze: Duration::from_millis(500),
                verified: true,
            };
            script
                .stored
                .entry((node.to_string(), pod.clone()))
                .or_default()
                .insert(0, taken.clone());
            Ok(taken)
        });
        async move { result }.boxed()
    }

    fn checkpoints<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
    ) -> AgentResult<'a, Vec<CheckpointTaken>> {
        let call = AgentCall::Checkpoints {
            node: node.into(),
            pod: pod.clone(),
        };
        let result = self.answer(call, node, |script| {
            Ok(script
                .stored
                .get(&(node.to_string(), pod.clone()))
                .cloned()
                .unwrap_or_default())
        });
        async move { result }.boxed()
    }

    fn start_transfer<'a>(
        &'a self,
        from: &'a str,
        payload: &'a TransferPayload,
        to: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        let call = AgentCall::StartTransfer {
            from: from.into(),
            payload: payload.clone(),
            to: to.into(),
        };
        let result = self.answer(call, from, |script| {
            script.transfers_started += 1;
            let id = format!("tx-{}", script.transfers_started);
            if script.failing_transfers_to.contains(to) {
                return Ok(TransferProgress {
                    id,
                    state: TransferState::Failed,
                    bytes_total: 0,
                    bytes_done: 0,
                    error: Some(format!("connecting to {to}: connection refused (scripted)")),
                });
            }
            let bytes = if payload.checkpoint.is_some() {
                FAKE_CHECKPOINT_BYTES
            } else {
                FAKE_TRANSFER_BYTES
            };
            script.transfers.insert(id.clone(), (0, bytes));
            Ok(TransferProgress {
                id,
                state: TransferState::Running,
                bytes_total: bytes,
                bytes_done: 0,
                error: None,
            })
        });
        async move { result }.boxed()
    }

    fn transfer_status<'a>(
        &'a self,
        node: &'a str,
        id: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        let call = AgentCall::TransferStatus {
            node: node.into(),
            id: id.into(),
        };
        let result = self.answer(call, node, |script| {
            let limit = script.transfer_polls;
            let Some((polls, bytes)) = script.transfers.get_mut(id) else {
                return Err(AgentError::NotFound {
                    node: node.into(),
                    what: format!("transfer {id}"),
                });
            };
            *polls += 1;
            let done = *polls > limit;
            Ok(TransferProgress {
                id: id.into(),
                state: if done {
                    TransferState::Succeeded
                } else {
                    TransferState::Running
                },
                bytes_total: *bytes,
                bytes_done: if done { *bytes } else { *bytes / 2 },
                error: None,
            })
        });
        async move { result }.boxed()
    }

    fn build_image<'a>(&'a self, node: &'a str, checkpoint_id: &'a str) -> AgentResult<'a, String> {
        let call = AgentCall::BuildImage {
            node: node.into(),
            checkpoint_id: checkpoint_id.into(),
        };
        let result = self.answer(call, node, |script| {
            if let Some((kind, reason)) = script.refused_images.get(node) {
                return Err(AgentError::Refused {
                    node: node.into(),
                    kind: kind.clone(),
                    reason: format!("checkpoint {checkpoint_id}: {reason} (scripted)"),
                });
            }
            Ok(format!("localhost/automigrate/{checkpoint_id}:restore"))
        });
        async move { result }.boxed()
    }

    fn peers<'a>(&'a self, node: &'a str) -> AgentResult<'a, Vec<PeerLatency>> {
        let call = AgentCall::Peers { node: node.into() };
        let result = self.answer(call, node, |script| {
            Ok(script.peers.get(node).cloned().unwrap_or_default())
        });
        async move { result }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn double_records_and_follows_its_script() {
        let agent = RecordingAgent::new();
        let pod = PodRef::new("ml", "t");
        let taken = agent
            .checkpoint("n1", &pod, "main", CheckpointKind::Periodic)
            .await
            .unwrap();
        assert_eq!(taken.id, "t-ck-1");
        assert_eq!(agent.checkpoints("n1", &pod).await.unwrap(), vec![taken]);
        agent.transfer_polls(1);
        let payload = TransferPayload::checkpoint("t-ck-1");
        let started = agent.start_transfer("n1", &payload, "n2").await.unwrap();
        let first = agent.transfer_status("n1", &started.id).await.unwrap();
        assert_eq!(first.state, TransferState::Running);
        let second = agent.transfer_status("n1", &started.id).await.unwrap();
        assert_eq!(second.state, TransferState::Succeeded);
        agent.unreachable("n1");
        let error = agent.peers("n1").await.unwrap_err();
        assert!(error.retryable());
        agent.fail_checkpoints_on("n2");
        let error = agent
            .checkpoint("n2", &pod, "main", CheckpointKind::Final)
            .await
            .unwrap_err();
        assert_eq!(error.metric_label(), "refused");
        assert_eq!(agent.calls().len(), 7);
    }
}
