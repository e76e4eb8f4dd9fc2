//! [`RefusedImages`]: the recording agent double, except that checkpoint images cannot be built
//! on some nodes (a store that finds the checkpoint damaged, a disk that is full).

use automigrate_core::model::PodRef;
use automigrate_operator::agent::{
    AgentError, AgentResult, CheckpointKind, CheckpointTaken, NodeAgent, PeerLatency,
    RecordingAgent, TransferProgress,
};
use automigrate_operator::crd::TransferPayload;
use futures::FutureExt;

#[derive(Debug)]
pub struct RefusedImages {
    pub agent: RecordingAgent,
    /// The nodes that refuse; `None`: every node.
    pub on: Option<&'static str>,
    /// The refusal's kind and reason, as the agent reports them.
    pub kind: &'static str,
    pub reason: &'static str,
}

impl NodeAgent for RefusedImages {
    fn checkpoint<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
        container: &'a str,
        kind: CheckpointKind,
    ) -> AgentResult<'a, CheckpointTaken> {
        self.agent.checkpoint(node, pod, container, kind)
    }

    fn checkpoints<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
    ) -> AgentResult<'a, Vec<CheckpointTaken>> {
        self.agent.checkpoints(node, pod)
    }

    fn start_transfer<'a>(
        &'a self,
        from: &'a str,
        payload: &'a TransferPayload,
        to: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        self.agent.start_transfer(from, payload, to)
    }

    fn transfer_status<'a>(
        &'a self,
        node: &'a str,
        id: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        self.agent.transfer_status(node, id)
    }

    fn build_image<'a>(&'a self, node: &'a str, checkpoint_id: &'a str) -> AgentResult<'a, String> {
        if self.on.is_some_and(|refusing| refusing != node) {
            return self.agent.build_image(node, checkpoint_id);
        }
        let refused = AgentError::Refused {
            node: node.into(),
            kind: self.kind.into(),
            reason: format!("checkpoint {checkpoint_id}: {} (scripted)", self.reason),
        };
        async move { Err(refused) }.boxed()
    }

    fn peers<'a>(&'a self, node: &'a str) -> AgentResult<'a, Vec<PeerLatency>> {
        self.agent.peers(node)
    }
}
