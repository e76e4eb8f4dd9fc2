//! [`NodeAgent`] over HTTP: the agent crate's [`AgentClient`], with each node's agent found in
//! the pod store.
//!
//! The agents run as a DaemonSet; the agent on node N is the Running pod in the agent namespace
//! whose labels match the agent selector and whose `spec.nodeName` is N. Its API is at
//! `http(s)://<pod IP>:<api port>` and its transfer engine at `<pod IP>:<transfer port>` (what a
//! sending agent is told to connect to). Dataset paths from the `automigrate.dev/dataset`
//! annotation are absolute on the node; the agents take them relative to their data root, so
//! a path outside that root is refused here rather than sent.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use automigrate_agent::AgentClient;
use automigrate_agent::api::{
    CheckpointKind as WireKind, CheckpointRequest, CheckpointSummary, ImageRequest, Payload, Peer,
    TransferRequest, TransferState as WireState, TransferStatus,
};
use automigrate_agent::client::{ClientError, ClientOptions};
use automigrate_core::model::PodRef;
use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;

use crate::agent::{
    AgentError, AgentResult, CheckpointKind, CheckpointTaken, NodeAgent, PeerLatency,
    TransferProgress, TransferState,
};
use crate::crd::TransferPayload;
use crate::stores::Stores;

/// How to find and reach the agents.
#[derive(Debug, Clone)]
pub struct AgentDirectoryConfig {
    pub namespace: String,
    /// `key=value` pairs every agent pod carries.
    pub selector: BTreeMap<String, String>,
    pub api_port: u16,
    pub transfer_port: u16,
    /// `http` or `https`.
    pub scheme: String,
    pub token: Option<String>,
    /// CA certificates for `https` agents.
    pub ca_pem: Option<Vec<u8>>,
    /// The agents' data root: dataset paths are sent relative to it.
    pub data_root: String,
    /// Limit for one call (a synchronous checkpoint included).
    pub timeout: Duration,
}

/// TCP (and TLS) set-up limit for a call to an agent. Agents are on the cluster network,
/// where a connect takes milliseconds and one lost SYN is resent after 1 s; the client's 10 s
/// default, three tries per idempotent call, held a migration step 30 s on a node that was cut
/// off (fault suite, issue 16 campaign: an api-cut during Checkpointing sat 31 s in the call).
pub const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Parses `a=b,c=d` into a label map.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.split_once('=')
                .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
                .filter(|(key, _)| !key.is_empty())
                .ok_or_else(|| format!("`{part}` is not key=value"))
        })
        .collect()
}

#[derive(Debug)]
pub struct HttpAgents {
    stores: Stores,
    config: AgentDirectoryConfig,
    clients: Mutex<HashMap<String, AgentClient>>,
}

fn host(ip: &str) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{ip}]"),
        _ => ip.to_string(),
    }
}

fn convert_error(node: &str, error: ClientError) -> AgentError {
    if error.is_transient() {
        return AgentError::Unreachable {
            node: node.into(),
            reason: error.to_string(),
        };
    }
    match error {
        ClientError::NotFound { message, .. } => AgentError::NotFound {
            node: node.into(),
            what: message,
        },
        other => AgentError::Refused {
            node: node.into(),
            kind: other.kind().unwrap_or("client").to_string(),
            reason: other.to_string(),
        },
    }
}

/// Runs an idempotent call (a read, or the image build, which the agent keys by checkpoint),
/// retrying it here a couple of times with backoff (backon) when the agent refused the
/// connection or answered 503: a blip of a second then costs no executor round. Longer outages
/// are the migration state machine's to ride out (its retry backoff, persisted in the
/// Migration). Timeouts are not retried here (the call already used its whole limit), and calls
/// that start work (a checkpoint, a transfer) never are: one whose answer was lost may have
/// started.
async fn idempotent<T, F, Fut>(node: &str, call: F) -> Result<T, AgentError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    use backon::{ExponentialBuilder, Retryable};
    call.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(400))
            .with_max_times(2),
    )
    .when(|error| {
        matches!(
            error,
            ClientError::Unreachable { .. } | ClientError::Unavailable { .. }
        )
    })
    .await
    .map_err(|error| convert_error(node, error))
}

fn taken(summary: CheckpointSummary) -> CheckpointTaken {
    CheckpointTaken {
        id: summary.id,
        created_at: summary.created_at,
        bytes: summary.bytes,
        freeze: summary.freeze,
        verified: summary.verified,
    }
}

fn progress(status: TransferStatus) -> TransferProgress {
    TransferProgress {
        id: status.id,
        state: match status.state {
            WireState::Running => TransferState::Running,
            WireState::Succeeded => TransferState::Succeeded,
            WireState::Failed => TransferState::Failed,
        },
        bytes_total: status.bytes_total,
        bytes_done: status.bytes_done,
        error: status.error,
    }
}

impl HttpAgents {
    pub fn new(stores: Stores, config: AgentDirectoryConfig) -> Self {
        Self {
            stores,
            config,
            clients: Mutex::default(),
        }
    }

    fn is_agent_on(&self, pod: &Pod, node: &str) -> bool {
        let metadata = &pod.metadata;
        metadata.namespace.as_deref() == Some(self.config.namespace.as_str())
            && metadata.deletion_timestamp.is_none()
            && pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref()) == Some(node)
            && pod
                .status
                .as_ref()
                .and_then(|status| status.phase.as_deref())
                == Some("Running")
            && self.config.selector.iter().all(|(key, value)| {
                metadata.labels.as_ref().and_then(|labels| labels.get(key)) == Some(value)
            })
    }

    /// The IP of the agent pod on `node`.
    fn agent_ip(&self, node: &str) -> Result<String, AgentError> {
        self.stores
            .find_pod(|pod| self.is_agent_on(pod, node))
            .and_then(|pod| pod.status.as_ref()?.pod_ip.clone())
            .ok_or_else(|| AgentError::NoAgent(node.into()))
    }

    fn client(&self, node: &str) -> Result<AgentClient, AgentError> {
        let base = format!(
            "{}://{}:{}",
            self.config.scheme,
            host(&self.agent_ip(node)?),
            self.config.api_port
        );
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| AgentError::NoAgent(node.into()))?;
        if let Some(client) = clients.get(&base) {
            return Ok(client.clone());
        }
        let options = ClientOptions {
            ca_pem: self.config.ca_pem.clone(),
            request_timeout: Some(self.config.timeout),
            connect_timeout: AGENT_CONNECT_TIMEOUT,
        };
        let client = AgentClient::with_options(&base, self.config.token.clone(), options)
            .map_err(|error| convert_error(node, error))?;
        clients.insert(base, client.clone());
        Ok(client)
    }

    fn wire_payload(&self, node: &str, payload: &TransferPayload) -> Result<Payload, AgentError> {
        match (&payload.checkpoint, &payload.dataset) {
            (Some(id), _) => Ok(Payload::Checkpoint { id: id.clone() }),
            (None, Some(path)) => {
                let root = self.config.data_root.trim_end_matches('/');
                let relative = path
                    .strip_prefix(root)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .filter(|rest| !rest.is_empty())
                    .ok_or_else(|| AgentError::Refused {
                        node: node.into(),
                        kind: "invalid".into(),
                        reason: format!(
                            "dataset {path} is outside the agents' data root {root}; it cannot be moved"
                        ),
                    })?;
                Ok(Payload::Dataset {
                    path: relative.to_string(),
                })
            }
            (None, None) => Err(AgentError::Refused {
                node: node.into(),
                kind: "invalid".into(),
                reason: "a transfer with no payload".into(),
            }),
        }
    }
}

impl NodeAgent for HttpAgents {
    fn checkpoint<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
        container: &'a str,
        kind: CheckpointKind,
    ) -> AgentResult<'a, CheckpointTaken> {
        async move {
            let client = self.client(node)?;
            let request = CheckpointRequest {
                pod: pod.clone(),
                container: container.to_string(),
                kind: match kind {
                    CheckpointKind::Periodic => WireKind::Periodic,
                    CheckpointKind::Final => WireKind::Final,
                },
            };
            client
                .checkpoint(&request)
                .await
                .map(taken)
                .map_err(|error| convert_error(node, error))
        }
        .boxed()
    }

    fn checkpoints<'a>(
        &'a self,
        node: &'a str,
        pod: &'a PodRef,
    ) -> AgentResult<'a, Vec<CheckpointTaken>> {
        async move {
            let client = self.client(node)?;
            idempotent(node, || client.checkpoints(pod))
                .await
                .map(|list| list.into_iter().map(taken).collect())
        }
        .boxed()
    }

    fn start_transfer<'a>(
        &'a self,
        from: &'a str,
        payload: &'a TransferPayload,
        to: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        async move {
            let client = self.client(from)?;
            let request = TransferRequest {
                payload: self.wire_payload(from, payload)?,
                to: Peer {
                    node: to.to_string(),
                    address: format!(
                        "{}:{}",
                        host(&self.agent_ip(to)?),
                        self.config.transfer_port
                    ),
                },
            };
            client
                .start_transfer(&request)
                .await
                .map(progress)
                .map_err(|error| convert_error(from, error))
        }
        .boxed()
    }

    fn transfer_status<'a>(
        &'a self,
        node: &'a str,
        id: &'a str,
    ) -> AgentResult<'a, TransferProgress> {
        async move {
            let client = self.client(node)?;
            idempotent(node, || client.transfer_status(id))
                .await
                .map(progress)
        }
        .boxed()
    }

    fn build_image<'a>(&'a self, node: &'a str, checkpoint_id: &'a str) -> AgentResult<'a, String> {
        async move {
            let client = self.client(node)?;
            let request = ImageRequest {
                checkpoint_id: checkpoint_id.to_string(),
            };
            idempotent(node, || client.build_image(&request))
                .await
                .map(|response| response.image)
        }
        .boxed()
    }

    fn peers<'a>(&'a self, node: &'a str) -> AgentResult<'a, Vec<PeerLatency>> {
        async move {
            let client = self.client(node)?;
            idempotent(node, || client.peers()).await.map(|list| {
                list.into_iter()
                    .map(|peer| PeerLatency {
                        node: peer.node,
                        rtt: peer.rtt,
                        loss: peer.loss,
                        answering: peer.answering,
                    })
                    .collect()
            })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse() {
        let selector =
            parse_selector("app.kubernetes.io/name=automigrate, app.kubernetes.io/component=agent")
                .unwrap();
        assert_eq!(selector.len(), 2);
        assert_eq!(selector["app.kubernetes.io/component"], "agent");
        assert!(parse_selector("novalue").is_err());
        assert!(parse_selector("").unwrap().is_empty());
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(host("10.0.0.5"), "10.0.0.5");
        assert_eq!(host("fd00::5"), "[fd00::5]");
    }
}
