//! Checkpoint orchestration: the periodic checkpoints the decision pass asks for, taken by the
//! agent on the pod's node, then replicated to the standby nodes the engine chose, so a hard
//! loss of the node can still be restored from a replica.
//!
//! After the checkpoint and again after each replica lands, the pod's
//! [`LATEST_CHECKPOINT`](crate::snapshot::LATEST_CHECKPOINT) annotation is rewritten with the
//! checkpoint's id, time, size, freeze time and the nodes that hold it; the next decision pass
//! reads it from there. A pod with a checkpoint in progress is marked so the engine does not
//! ask for another one meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_core::decide::CheckpointDecision;
use automigrate_core::model::{CheckpointInfo, PodRef};
use automigrate_core::units::Bytes;

use crate::agent::{AgentError, CheckpointKind, NodeAgent, TransferState};
use crate::crd::TransferPayload;
use crate::snapshot::LATEST_CHECKPOINT;
use crate::stores::Stores;
use crate::writer::{WriteError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("pod {0} is not in the pod store")]
    PodGone(PodRef),
    #[error("pod {0} has no containers")]
    NoContainer(PodRef),
    #[error("a checkpoint of {0} is already in progress")]
    Busy(PodRef),
    #[error("pod {0} is not running yet (no status, or phase not Running): nothing to checkpoint")]
    NotRunning(PodRef),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("recording the checkpoint on the pod failed: {0}")]
    Record(#[from] WriteError),
}

impl CheckpointError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::PodGone(_) => "pod_gone",
            Self::NoContainer(_) => "no_container",
            Self::Busy(_) => "busy",
            Self::NotRunning(_) => "not_running",
            Self::Agent(error) => error.metric_label(),
            Self::Record(error) => error.metric_label(),
        }
    }
}

/// What one periodic checkpoint came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpointed {
    pub info: CheckpointInfo,
    /// Standby nodes that could not receive a copy, with the reason.
    pub replica_failures: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct CheckpointOrchestrator {
    stores: Stores,
    writer: Writer,
    agent: Arc<dyn NodeAgent>,
    in_progress: Arc<Mutex<BTreeSet<PodRef>>>,
    /// Wait between polls of a running replication.
    pub poll_interval: Duration,
    /// Most polls of one replication before giving up on that replica.
    pub max_polls: u32,
}

struct Busy {
    set: Arc<Mutex<BTreeSet<PodRef>>>,
    pod: PodRef,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.pod);
        }
    }
}

impl CheckpointOrchestrator {
    pub fn new(stores: Stores, writer: Writer, agent: Arc<dyn NodeAgent>) -> Self {
        Self {
            stores,
            writer,
            agent,
            in_progress: Arc::default(),
            poll_interval: Duration::from_secs(2),
            max_polls: 900,
        }
    }

    pub fn in_progress(&self) -> BTreeSet<PodRef> {
        self.in_progress
            .lock()
            .map(|set| set.clone())
            .unwrap_or_default()
    }

    fn claim(&self, pod: &PodRef) -> Option<Busy> {
        let mut set = self.in_progress.lock().ok()?;
        set.insert(pod.clone()).then(|| Busy {
            set: self.in_progress.clone(),
            pod: pod.clone(),
        })
    }

    async fn record(&self, pod: &PodRef, info: &CheckpointInfo) -> Result<(), WriteError> {
        let text = serde_json::to_string(info).unwrap_or_default();
        self.writer
            .annotate_pod(
                &pod.namespace,
                &pod.name,
                BTreeMap::from([(LATEST_CHECKPOINT.to_string(), text)]),
            )
            .await
    }

    /// Takes one periodic checkpoint and replicates it.
    #[tracing::instrument(level = "info", skip_all, fields(pod = %decision.pod, node = %decision.node))]
    pub async fn run(
        &self,
        decision: &CheckpointDecision,
    ) -> Result<Checkpointed, CheckpointError> {
        let result = self.run_inner(decision).await;
        let label = match &result {
            Ok(_) => "succeeded",
            Err(error) => error.metric_label(),
        };
        metrics::counter!(crate::metrics::CHECKPOINTS, "result" => label).increment(1);
        if let Err(error) = &result {
            tracing::warn!(%error, "periodic checkpoint failed");
        }
        result
    }

    async fn run_inner(
        &self,
        decision: &CheckpointDecision,
    ) -> Result<Checkpointed, CheckpointError> {
        let pod_ref = decision.pod.clone();
        let _busy = self
            .claim(&pod_ref)
            .ok_or_else(|| CheckpointError::Busy(pod_ref.clone()))?;
        let pod = self
            .stores
            .pod(&pod_ref.namespace, &pod_ref.name)
            .ok_or_else(|| CheckpointError::PodGone(pod_ref.clone()))?;
        // A replacement pod is bound to its node before the kubelet starts it: until it runs
        // there is no process to dump (and a restore may still be writing its files).
        let running = pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            == Some("Running");
        if !running {
            return Err(CheckpointError::NotRunning(pod_ref));
        }
        let container = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.containers.first())
            .map(|container| container.name.clone())
            .ok_or_else(|| CheckpointError::NoContainer(pod_ref.clone()))?;
        let taken = self
            .agent
            .checkpoint(
                &decision.node,
                &pod_ref,
                &container,
                CheckpointKind::Periodic,
            )
            .await?;
        let mut info = CheckpointInfo {
            id: taken.id.clone(),
            taken_at: taken.created_at,
            size: Bytes(taken.bytes),
            freeze: Some(taken.freeze),
            held_on: vec![decision.node.clone()],
            epoch: None,
        };
        // The pod names one checkpoint, the one a failure of its node restores from. A new
        // one held only on that node must not replace one a standby holds: if the node died
        // before (or without) a replica landing, nothing would survive it on record and the
        // pod would restart from the beginning. So with standbys asked for, the new
        // checkpoint is recorded once the first one holds it, unless the recorded one has no
        // copy off the node either.
        let recorded_survives = crate::snapshot::latest_checkpoint(&pod)
            .is_some_and(|last| last.held_on.iter().any(|node| *node != decision.node));
        if decision.replicate_to.is_empty() || !recorded_survives {
            self.record(&pod_ref, &info).await?;
        }
        tracing::info!(checkpoint = %info.id, bytes = taken.bytes, "checkpoint taken");

        let mut replica_failures = Vec::new();
        let payload = TransferPayload::checkpoint(&taken.id);
        for standby in &decision.replicate_to {
            match self.replicate(&decision.node, &payload, standby).await {
                Ok(bytes) => {
                    metrics::counter!(crate::metrics::BYTES_MOVED, "payload" => "replica")
                        .increment(bytes);
                    info.held_on.push(standby.clone());
                    self.record(&pod_ref, &info).await?;
                }
                Err(reason) => {
                    tracing::warn!(standby = %standby, %reason, "replication failed");
                    replica_failures.push((standby.clone(), reason));
                }
            }
        }
        Ok(Checkpointed {
            info,
            replica_failures,
        })
    }

    async fn replicate(
        &self,
        from: &str,
        payload: &TransferPayload,
        to: &str,
    ) -> Result<u64, String> {
        let started = self
            .agent
            .start_transfer(from, payload, to)
            .await
            .map_err(|error| error.to_string())?;
        let mut progress = started;
        for _ in 0..self.max_polls {
            match progress.state {
                TransferState::Succeeded => return Ok(progress.bytes_done),
                TransferState::Failed => {
                    return Err(progress.error.unwrap_or_else(|| "transfer failed".into()));
                }
                TransferState::Running => {}
            }
            progress = self
                .agent
                .transfer_status(from, &progress.id)
                .await
                .map_err(|error| error.to_string())?;
            if progress.state == TransferState::Running {
                tokio::time::sleep(self.poll_interval).await;
            }
        }
        Err(format!("still running after {} polls", self.max_polls))
    }
}
