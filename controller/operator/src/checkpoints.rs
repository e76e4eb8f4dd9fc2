//! Checkpoint orchestration: the operator's side of the periodic checkpoints the decision pass
//! asks for. The rules (admission, take, when the pod's record changes, replication order,
//! what a failure does) are the driver's ([`automigrate_core::driver::periodic`]); this file
//! carries out its steps through a [`PeriodicPort`]: the agent on the pod's node takes the
//! checkpoint, the agents copy it to the standby nodes the engine chose, and the pod's
//! [`LATEST_CHECKPOINT`](crate::snapshot::LATEST_CHECKPOINT) annotation records it (id, time,
//! size, freeze time and the nodes that hold it; the next decision pass reads it from there).
//!
//! A pod with a checkpoint in progress is marked so the engine does not ask for another one
//! meanwhile, and so two jobs never run for one pod.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_core::decide::CheckpointDecision;
use automigrate_core::driver::periodic::{self, Periodic, PeriodicPort, PodNow, Refusal};
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

/// What one periodic checkpoint came to (the driver's account).
pub use automigrate_core::driver::periodic::Checkpointed;

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
        let pod = self.stores.pod(&pod_ref.namespace, &pod_ref.name);
        let recorded = pod.as_deref().and_then(crate::snapshot::latest_checkpoint);
        let now = pod.as_ref().map(|pod| PodNow {
            running: pod
                .status
                .as_ref()
                .and_then(|status| status.phase.as_deref())
                == Some("Running"),
            recorded: recorded.as_ref(),
        });
        let job =
            Periodic::start(&decision.node, &decision.replicate_to, now).map_err(|refusal| {
                match refusal {
                    Refusal::Gone => CheckpointError::PodGone(pod_ref.clone()),
                    Refusal::NotRunning => CheckpointError::NotRunning(pod_ref.clone()),
                }
            })?;
        let container = pod
            .as_ref()
            .and_then(|pod| pod.spec.as_ref())
            .and_then(|spec| spec.containers.first())
            .map(|container| container.name.clone())
            .ok_or_else(|| CheckpointError::NoContainer(pod_ref.clone()))?;
        let mut port = Job {
            orchestrator: self,
            pod: &pod_ref,
            container,
        };
        periodic::carry_out(&mut port, job).await
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

/// One periodic checkpoint of one pod, as the driver's [`PeriodicPort`].
struct Job<'a> {
    orchestrator: &'a CheckpointOrchestrator,
    pod: &'a PodRef,
    container: String,
}

impl PeriodicPort for Job<'_> {
    type Error = CheckpointError;

    async fn take(&mut self, node: &str) -> Result<CheckpointInfo, CheckpointError> {
        let taken = self
            .orchestrator
            .agent
            .checkpoint(node, self.pod, &self.container, CheckpointKind::Periodic)
            .await?;
        tracing::info!(checkpoint = %taken.id, bytes = taken.bytes, "checkpoint taken");
        Ok(CheckpointInfo {
            id: taken.id,
            taken_at: taken.created_at,
            size: Bytes(taken.bytes),
            freeze: Some(taken.freeze),
            held_on: vec![node.to_string()],
            epoch: None,
        })
    }

    async fn record(&mut self, info: &CheckpointInfo) -> Result<(), CheckpointError> {
        Ok(self.orchestrator.record(self.pod, info).await?)
    }

    async fn replicate(&mut self, from: &str, checkpoint: &str, to: &str) -> Result<(), String> {
        let payload = TransferPayload::checkpoint(checkpoint);
        match self.orchestrator.replicate(from, &payload, to).await {
            Ok(bytes) => {
                metrics::counter!(crate::metrics::BYTES_MOVED, "payload" => "replica")
                    .increment(bytes);
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(standby = %to, %reason, "replication failed");
                Err(reason)
            }
        }
    }
}
