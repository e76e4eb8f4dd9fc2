//! [`AgentClient`]: the HTTP client of the agent API (see [`crate::api`]) that the controller
//! and the embedded driver use. Light on purpose: it builds without the crate's `server`
//! feature.
//!
//! TLS: reqwest is built with `rustls-no-provider`; the client hands reqwest its own rustls
//! configuration on the ring provider, so it works whether or not a process-wide provider was
//! installed. `https://` agents are verified against the CA given in [`ClientOptions::ca_pem`]
//! (agents use a cluster-private CA; there are no public roots here).
//!
//! Errors: one [`ClientError`] variant per failure class; those that come from an agent's
//! [`ErrorBody`] keep its `kind` ([`ClientError::kind`]).

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    CheckpointQuery, CheckpointRequest, CheckpointSummary, ErrorBody, ImageRequest, ImageResponse,
    PeerLatency, TransferRequest, TransferStatus,
};
use automigrate_core::model::PodRef;

/// Why a call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is unusable.
    #[error("agent URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    /// The HTTP client or its TLS configuration could not be built.
    #[error("setting up the HTTP client: {0}")]
    Setup(String),
    /// The request was refused before it was sent (an argument fails validation).
    #[error("request not sent: {0}")]
    InvalidArgument(String),
    /// No answer: connection refused or reset, DNS, TLS handshake.
    #[error("agent at {url} unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// No answer in time.
    #[error("agent at {url} did not answer in time")]
    Timeout { url: String },
    /// 401/403: no or wrong token.
    #[error("agent refused our credentials ({kind}): {message}")]
    Unauthorized { kind: String, message: String },
    /// 404: the pod, checkpoint, transfer or route is unknown to the agent.
    #[error("not found on the agent ({kind}): {message}")]
    NotFound { kind: String, message: String },
    /// Another 4xx: the agent refused the request (bad input, conflict).
    #[error("agent rejected the request with {status} ({kind}): {message}")]
    Rejected {
        status: u16,
        kind: String,
        message: String,
    },
    /// 503: the agent is starting or shutting down; try again later.
    #[error("agent unavailable ({kind}): {message}")]
    Unavailable { kind: String, message: String },
    /// Another 5xx: the agent failed doing it.
    #[error("agent failed with {status} ({kind}): {message}")]
    Agent {
        status: u16,
        kind: String,
        message: String,
    },
    /// A non-2xx answer that is not an [`ErrorBody`] (a proxy, a wrong port).
    #[error("agent answered {status} without an error body: {body}")]
    UnexpectedStatus { status: u16, body: String },
    /// A 2xx answer whose body is not what the API promises.
    #[error("agent's answer from {url} could not be read: {reason}")]
    Decode { url: String, reason: String },
}

impl ClientError {
    /// The agent's [`ErrorBody::kind`], when the agent sent one.
    pub fn kind(&self) -> Option<&str> {
        match self {
            Self::Unauthorized { kind, .. }
            | Self::NotFound { kind, .. }
            | Self::Rejected { kind, .. }
            | Self::Unavailable { kind, .. }
            | Self::Agent { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// Whether the same call may succeed later without changing it (the agent was down, slow,
    /// or busy), as opposed to being refused for what it asked.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Unreachable { .. } | Self::Timeout { .. } | Self::Unavailable { .. }
        )
    }
}

/// How the client talks to agents.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// PEM CA certificates trusted for `https://` agents.
    pub ca_pem: Option<Vec<u8>>,
    /// TCP (and TLS) set-up limit.
    pub connect_timeout: Duration,
    /// Limit for a whole call; `None` for none. Checkpoints are synchronous and may take
    /// minutes, so the default leaves it to the caller (e.g. `tokio::time::timeout`).
    pub request_timeout: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            ca_pem: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
        }
    }
}

/// A client of one agent. Cheap to clone.
#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    base: Url,
    token: Option<Arc<str>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client of the agent at `base_url` (`http://10.0.0.5:9460`), sending `token` as a
    /// bearer token when given.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_options(base_url, token, ClientOptions::default())
    }

    pub fn with_options(
        base_url: &str,
        token: Option<String>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let url_error = |reason: &str| ClientError::Url {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let mut base = Url::parse(base_url).map_err(|error| url_error(&error.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(url_error("the scheme must be http or https"));
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(url_error("needs a host"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(url_error("no query or fragment"));
        }
        // `join` replaces the last path segment unless the path ends with a slash.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        if let Some(token) = &token
            && (token.is_empty() || token.chars().any(|c| c.is_control() || c == ' '))
        {
            return Err(ClientError::Setup(
                "the token must be non-empty and free of spaces and control characters".to_string(),
            ));
        }
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(rustls_config(options.ca_pem.as_deref())?)
            .connect_timeout(options.connect_timeout)
            .user_agent(concat!(
                "automigrate-agent-client/",
                env!("CARGO_PKG_VERSION")
            ));
        if let Some(timeout) = options.request_timeout {
            builder = builder.timeout(timeout);
        }
        let http = builder
            .build()
            .map_err(|error| ClientError::Setup(error.to_string()))?;
        Ok(Self {
            http,
            base,
            token: token.map(Arc::from),
        })
    }

    /// The agent's base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// `POST /v1/checkpoints`: takes a checkpoint now and answers when it is sealed.
    #[tracing::instrument(name = "agent_checkpoint", skip_all, fields(agent = %self.base, pod = %request.pod, kind = ?request.kind))]
    pub async fn checkpoint(
        &self,
        request: &CheckpointRequest,
    ) -> Result<CheckpointSummary, ClientError> {
        request
            .validate()
            .map_err(|error| ClientError::InvalidArgument(error.to_string()))?;
        self.call(Method::POST, &["v1", "checkpoints"], None, Some(request))
            .await
    }

    /// `GET /v1/checkpoints?namespace=&pod=`: the pod's checkpoints on this agent, newest first.
    #[tracing::instrument(name = "agent_checkpoints", skip_all, fields(agent = %self.base, pod = %pod))]
    pub async fn checkpoints(&self, pod: &PodRef) -> Result<Vec<CheckpointSummary>, ClientError> {
        self.list_checkpoints(&CheckpointQuery {
            namespace: Some(pod.namespace.clone()),
            pod: Some(pod.name.clone()),
        })
        .await
    }

    /// `GET /v1/checkpoints` with any filter (none: every pod on the agent).
    #[tracing::instrument(name = "agent_list_checkpoints", skip_all, fields(agent = %self.base))]
    pub async fn list_checkpoints(
        &self,
        query: &CheckpointQuery,
    ) -> Result<Vec<CheckpointSummary>, ClientError> {
        let mut pairs = Vec::new();
        if let Some(namespace) = &query.namespace {
            pairs.push(("namespace", namespace.as_str()));
        }
        if let Some(pod) = &query.pod {
            pairs.push(("pod", pod.as_str()));
        }
        self.call::<(), _>(Method::GET, &["v1", "checkpoints"], Some(&pairs), None)
            .await
    }

    /// `POST /v1/transfers`: starts moving a checkpoint or dataset to a peer; answers at once.
    #[tracing::instrument(name = "agent_start_transfer", skip_all, fields(agent = %self.base, to = %request.to.node))]
    pub async fn start_transfer(
        &self,
        request: &TransferRequest,
    ) -> Result<TransferStatus, ClientError> {
        self.call(Method::POST, &["v1", "transfers"], None, Some(request))
            .await
    }

    /// `GET /v1/transfers/{id}`.
    #[tracing::instrument(name = "agent_transfer_status", skip_all, fields(agent = %self.base, id))]
    pub async fn transfer_status(&self, id: &str) -> Result<TransferStatus, ClientError> {
        if id.is_empty() {
            return Err(ClientError::InvalidArgument(
                "empty transfer id".to_string(),
            ));
        }
        self.call::<(), _>(Method::GET, &["v1", "transfers", id], None, None)
            .await
    }

    /// `POST /v1/images`: builds a checkpoint image from a checkpoint in the agent's store.
    #[tracing::instrument(name = "agent_build_image", skip_all, fields(agent = %self.base, checkpoint = %request.checkpoint_id))]
    pub async fn build_image(&self, request: &ImageRequest) -> Result<ImageResponse, ClientError> {
        self.call(Method::POST, &["v1", "images"], None, Some(request))
            .await
    }

    /// `GET /v1/peers`: the agent's latency probes to its peers.
    #[tracing::instrument(name = "agent_peers", skip_all, fields(agent = %self.base))]
    pub async fn peers(&self) -> Result<Vec<PeerLatency>, ClientError> {
        self.call::<(), _>(Method::GET, &["v1", "peers"], None, None)
            .await
    }

    /// `GET /healthz`: the agent process is alive.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.probe("healthz").await
    }

    /// `GET /readyz`: the agent can take checkpoints and receive transfers.
    pub async fn ready(&self) -> Result<(), ClientError> {
        self.probe("readyz").await
    }

    /// `GET /metrics`: Prometheus text.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let response = self
            .send::<()>(Method::GET, &["metrics"], None, None)
            .await?;
        let url = response.url().to_string();
        let response = check_status(response).await?;
        response.text().await.map_err(|error| ClientError::Decode {
            url,
            reason: error.to_string(),
        })
    }

    async fn probe(&self, path: &str) -> Result<(), ClientError> {
        let response = self.send::<()>(Method::GET, &[path], None, None).await?;
        check_status(response).await.map(drop)
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: Option<&[(&str, &str)]>,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, segments, query, body).await?;
        let url = response.url().to_string();
        let response = check_status(response).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|error| transport(&url, error))?;
        serde_json::from_slice(&bytes).map_err(|error| ClientError::Decode {
            url,
            reason: error.to_string(),
        })
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        segments: &[&str],
        query: Option<&[(&str, &str)]>,
        body: Option<&B>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().map_err(|()| ClientError::Url {
                url: self.base.to_string(),
                reason: "cannot be a base".to_string(),
            })?;
            path.pop_if_empty().extend(segments);
        }
        if let Some(query) = query.filter(|pairs| !pairs.is_empty()) {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut request = self.http.request(method, url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        tracing::debug!(%url, "calling agent");
        request
            .send()
            .await
            .map_err(|error| transport(url.as_str(), error))
    }
}

fn transport(url: &str, error: reqwest::Error) -> ClientError {
    if error.is_timeout() {
        ClientError::Timeout {
            url: url.to_string(),
        }
    } else if error.is_decode() || error.is_body() {
        ClientError::Decode {
            url: url.to_string(),
            reason: error.to_string(),
        }
    } else {
        ClientError::Unreachable {
            url: url.to_string(),
            source: error,
        }
    }
}

/// Passes a 2xx response on; turns anything else into the matching [`ClientError`].
async fn check_status(response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let url = response.url().to_string();
    let text = response
        .text()
        .await
        .map_err(|error| transport(&url, error))?;
    let Ok(ErrorBody { error, kind }) = serde_json::from_str::<ErrorBody>(&text) else {
        return Err(ClientError::UnexpectedStatus {
            status: status.as_u16(),
            body: text.chars().take(512).collect(),
        });
    };
    let message = error;
    Err(match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            ClientError::Unauthorized { kind, message }
        }
        StatusCode::NOT_FOUND => ClientError::NotFound { kind, message },
        StatusCode::SERVICE_UNAVAILABLE => ClientError::Unavailable { kind, message },
        status if status.is_client_error() => ClientError::Rejected {
            status: status.as_u16(),
            kind,
            message,
        },
        status => ClientError::Agent {
            status: status.as_u16(),
            kind,
            message,
        },
    })
}

/// rustls on the ring provider, trusting only the given CA (no public roots: agents use a
/// cluster-private CA; plain `http://` needs none).
fn rustls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, ClientError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;

    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|error| ClientError::Setup(format!("CA PEM: {error}")))?;
            roots
                .add(cert)
                .map_err(|error| ClientError::Setup(format!("CA certificate: {error}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(ClientError::Setup(
                "the CA PEM holds no certificate".to_string(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ClientError::Setup(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
