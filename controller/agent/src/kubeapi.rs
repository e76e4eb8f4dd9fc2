//! The kubelet backend's way to the API server from inside a pod: HTTPS to
//! `KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT` with the pod's service-account token and
//! CA (the agent needs `create` on `nodes/proxy`). The token file is read on every request,
//! since the kubelet rotates projected tokens.
//!
//! It implements `automigrate_checkpoint::kubelet::ApiTransport`, which only POSTs a path and
//! returns the status and body; the backend interprets them.

use std::path::PathBuf;
use std::time::Duration;

use automigrate_checkpoint::kubelet::{ApiResponse, ApiTransport, KubeletError};

pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
    #[error("API server URL: {0}")]
    Url(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    Client(String),
}

/// POSTs to the API server with a bearer token.
#[derive(Debug, Clone)]
pub struct ApiServerTransport {
    http: reqwest::Client,
    base: reqwest::Url,
    token_file: Option<PathBuf>,
    timeout: Duration,
}

impl ApiServerTransport {
    /// `base` like `https://10.96.0.1:443`; `ca_pem` trusted for it (none for plain HTTP);
    /// `token_file` read on every request.
    pub fn new(
        base: &str,
        ca_pem: Option<&[u8]>,
        token_file: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<Self, KubeApiError> {
        let base =
            reqwest::Url::parse(base).map_err(|error| KubeApiError::Url(error.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(pem) = ca_pem {
            use rustls_pki_types::CertificateDer;
            use rustls_pki_types::pem::PemObject as _;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|error| KubeApiError::Client(format!("CA: {error}")))?;
                roots
                    .add(cert)
                    .map_err(|error| KubeApiError::Client(format!("CA: {error}")))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| KubeApiError::Client(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| KubeApiError::Client(error.to_string()))?;
        Ok(Self {
            http,
            base,
            token_file,
            timeout,
        })
    }

    /// From the pod environment: `KUBERNETES_SERVICE_HOST`/`_PORT` and the service account.
    pub fn in_cluster(timeout: Duration) -> Result<Self, KubeApiError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            KubeApiError::Url("KUBERNETES_SERVICE_HOST is not set: not running in a pod".into())
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let ca = std::fs::read(SERVICE_ACCOUNT_CA).map_err(|source| KubeApiError::Io {
            path: SERVICE_ACCOUNT_CA.into(),
            source,
        })?;
        Self::new(
            &format!("https://{host}:{port}"),
            Some(&ca),
            Some(SERVICE_ACCOUNT_TOKEN.into()),
            timeout,
        )
    }
}

impl ApiServerTransport {
    /// GETs `path` (self-fencing reads its node's Lease and the pods on it).
    pub async fn get(&self, path: &str) -> Result<ApiResponse, KubeletError> {
        self.send(reqwest::Method::GET, path).await
    }

    /// The same transport with another per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn send(&self, method: reqwest::Method, path: &str) -> Result<ApiResponse, KubeletError> {
        let url = self
            .base
            .join(path)
            .map_err(|error| KubeletError::Transport(format!("path `{path}`: {error}")))?;
        let mut request = self.http.request(method, url).timeout(self.timeout);
        if let Some(file) = &self.token_file {
            let token = tokio::fs::read_to_string(file).await.map_err(|error| {
                KubeletError::Transport(format!("reading token {}: {error}", file.display()))
            })?;
            request = request.bearer_auth(token.trim());
        }
        let response = request.send().await.map_err(|error| {
            if error.is_timeout() {
                KubeletError::TransportTimeout {
                    after: self.timeout,
                }
            } else {
                KubeletError::Transport(error.to_string())
            }
        })?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|error| KubeletError::Transport(error.to_string()))?;
        Ok(ApiResponse { status, body })
    }
}

impl ApiTransport for ApiServerTransport {
    async fn post(&self, path: &str) -> Result<ApiResponse, KubeletError> {
        self.send(reqwest::Method::POST, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A one-shot HTTP server answering `status` and `body`; returns what it was sent.
    async fn answer_once(
        status: &'static str,
        body: &'static str,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                let read = stream.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..read]);
            }
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (format!("http://{address}"), task)
    }

    #[tokio::test]
    async fn posts_with_the_current_token_and_passes_the_answer_on() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "first-token\n").unwrap();
        let (base, server) = answer_once("200 OK", r#"{"items":["/x.tar"]}"#).await;
        let transport =
            ApiServerTransport::new(&base, None, Some(token.clone()), Duration::from_secs(10))
                .unwrap();
        let path = "/api/v1/nodes/n/proxy/checkpoint/ml/p/c?timeout=60";
        let response = transport.post(path).await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, r#"{"items":["/x.tar"]}"#);
        let request = server.await.unwrap();
        assert!(
            request.starts_with(&format!("POST {path} HTTP/1.1")),
            "{request}"
        );
        assert!(
            request
                .to_lowercase()
                .contains("authorization: bearer first-token"),
            "{request}"
        );

        // A rotated token is picked up; an error status is an answer, not a failure.
        std::fs::write(&token, "second-token").unwrap();
        let (base, server) = answer_once("403 Forbidden", "nodes/proxy is forbidden").await;
        let transport =
            ApiServerTransport::new(&base, None, Some(token), Duration::from_secs(10)).unwrap();
        let response = transport.post(path).await.unwrap();
        assert_eq!(response.status, 403);
        assert!(server.await.unwrap().contains("second-token"));
    }

    #[tokio::test]
    async fn nothing_listening_is_a_transport_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let transport = ApiServerTransport::new(
            &format!("http://{address}"),
            None,
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        let error = transport.post("/api").await.unwrap_err();
        assert!(matches!(error, KubeletError::Transport(_)), "{error}");
    }
}
