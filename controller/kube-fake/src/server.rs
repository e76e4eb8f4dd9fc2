//! The fake API server on a real socket: HTTP/1.1 over TCP, for kubectl and for programs in
//! other processes (the local cluster's controller, agents and kubelets).
//!
//! Owns [`serve`], the adapter from hyper (through axum's server loop, already in the tree for
//! the operator and the agent) to the same request pipeline [`crate::FakeService`] runs for
//! in-process clients: the request body is collected, handed to the cluster, and the answer's
//! body is streamed back. Watch answers have no length, so hyper sends them chunked and flushes
//! every event line as it is produced; nothing is buffered per watch beyond what the cluster
//! already queues.
//!
//! Graceful stop: when the `shutdown` future completes, the listener stops accepting, requests
//! that arrive on open connections are answered 503, every open watch stream ends (a watch
//! would otherwise keep its connection, and the server, alive for up to 30 minutes), and
//! [`serve`] returns once the in-flight answers are written. Clients see what an API server
//! restart looks like: a watch that ends, then refused connections.
//!
//! Node proxy: `/api/v1/nodes/{node}[:port]/proxy/{path}` is forwarded to that node's kubelet,
//! found as a real API server finds it, from the Node object: the first address of type
//! `InternalIP` (else `Hostname`, else `ExternalIP`) in `status.addresses`, and the port in
//! `status.daemonEndpoints.kubeletEndpoint.Port` (else the one in the path, else 10250). This is
//! how the agent reaches the kubelet checkpoint API (`POST .../proxy/checkpoint/{ns}/{pod}/
//! {container}`). Unlike a real API server it speaks plain HTTP to the kubelet and presents no
//! client certificate: the local kubelets serve plain HTTP on a host-only network. A node with
//! a handler registered in-process ([`FakeCluster::set_node_proxy_handler`]) is answered by
//! that handler instead, as before.
//!
//! Also owns [`kubeconfig`], the kubeconfig text that points kubectl and kube clients here.
//!
//! There is no TLS and no authentication: whoever can connect is cluster-admin. Callers bind
//! loopback (or a host-only address of a single-machine cluster), see `automigrate-apiserver`.

use std::convert::Infallible;
use std::future::Future;
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::FakeCluster;

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener's address could not be read.
    #[error("reading the listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// The HTTP client that forwards node proxy requests could not be built.
    #[error("building the kubelet proxy client: {0}")]
    ProxyClient(String),
    /// The server loop failed.
    #[error("serving HTTP on {addr}: {source}")]
    Serve {
        /// The listening address.
        addr: std::net::SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// Serves `cluster` on `listener` until `shutdown` completes, then stops gracefully (see the
/// module docs). Returns once every connection is closed.
pub async fn serve<F>(
    cluster: FakeCluster,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let (stop_sender, stopping) = watch::channel(false);
    let kubelets = kubelet_client()?;
    let service = tower::service_fn(move |request: Request<Body>| {
        answer(cluster.clone(), kubelets.clone(), stopping.clone(), request)
    });
    let app = axum::Router::new().fallback_service(service);
    tracing::info!(%addr, "API server listening (plain HTTP, no authentication)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!(%addr, "API server stopping: ending watches, finishing open requests");
            // Ignored error: no open request holds a receiver, nothing to tell.
            let _ = stop_sender.send(true);
        })
        .await
        .map_err(|source| ServeError::Serve { addr, source })?;
    tracing::info!(%addr, "API server stopped");
    Ok(())
}

/// Completes once the server is stopping.
async fn stopped(mut stopping: watch::Receiver<bool>) {
    // A closed channel means the server loop is gone: stopping too.
    let _ = stopping.wait_for(|stop| *stop).await;
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn answer(
    cluster: FakeCluster,
    kubelets: reqwest::Client,
    stopping: watch::Receiver<bool>,
    request: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    if *stopping.borrow() {
        return Ok(status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "the API server is shutting down",
        ));
    }
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let body: Bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::debug!(%error, "request body could not be read");
            return Ok(status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the request body could not be read",
            ));
        }
    };
    let is_watch = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|pair| pair == "watch=true" || pair == "watch=1");
    if let Some(target) = node_proxy_target(&parts.uri)
        && !cluster.lock().proxy_handlers.contains_key(&target.node)
    {
        let response = forward_to_kubelet(&cluster, &kubelets, &parts, body, target).await;
        tracing::debug!(
            method = %parts.method,
            uri = %parts.uri,
            status = response.status().as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "node proxy request"
        );
        return Ok(response);
    }
    let response = match cluster.handle(&parts, body) {
        Ok(response) if is_watch => response.map(|body| {
            // End the stream when the server stops, or graceful shutdown would wait for it.
            let events = body.into_data_stream().take_until(stopped(stopping));
            Body::from_stream(events)
        }),
        Ok(response) => response.map(Body::new),
        // Only an injected "unreachable" fault fails the service; over a socket the nearest
        // thing a client can see without the connection dying is a 503.
        Err(error) => status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            &error.to_string(),
        ),
    };
    tracing::debug!(
        method = %parts.method,
        uri = %parts.uri,
        status = response.status().as_u16(),
        watch = is_watch,
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    Ok(response)
}

/// A kubeconfig (YAML) whose current context points at `server` (e.g. `http://127.0.0.1:6443`)
/// with no credentials, default namespace `default`.
pub fn kubeconfig(server: &str) -> String {
    format!(
        "# Written by automigrate-apiserver: a local API server on plain HTTP without\n\
         # authentication (loopback only). See docs/local-cluster.md.\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: automigrate-local\n\
         \x20 cluster:\n\
         \x20   server: {server}\n\
         contexts:\n\
         - name: automigrate-local\n\
         \x20 context:\n\
         \x20   cluster: automigrate-local\n\
         \x20   user: automigrate-local\n\
         \x20   namespace: default\n\
         current-context: automigrate-local\n\
         preferences: {{}}\n\
         users:\n\
         - name: automigrate-local\n\
         \x20 user: {{}}\n"
    )
}

/// The HTTP client for kubelets: plain HTTP in practice; the TLS stack is configured with ring
/// explicitly (reqwest is built without a default provider) and trusts nothing, so an
/// `https` kubelet address fails instead of being trusted blindly.
fn kubelet_client() -> Result<reqwest::Client, ServeError> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ServeError::ProxyClient(error.to_string()))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        // HTTP_PROXY and friends are for this machine's way out, not for its own nodes.
        .no_proxy()
        .build()
        .map_err(|error| ServeError::ProxyClient(error.to_string()))
}

/// A `nodes/{node}[:port]/proxy/{path}` request. Failures to reach the kubelet are answered as
/// a real API server answers them: 500 with an empty (Unknown) reason, which clients do not
/// retry (kube retries 503s for minutes).
#[derive(Debug, PartialEq, Eq)]
struct NodeProxyTarget {
    node: String,
    port: Option<u16>,
    /// Path below `proxy`, starting with `/`, with the query if any.
    path_and_query: String,
}

fn node_proxy_target(uri: &http::Uri) -> Option<NodeProxyTarget> {
    let rest = uri.path().strip_prefix("/api/v1/nodes/")?;
    let (name, below) = rest.split_once('/')?;
    let below = match below.strip_prefix("proxy") {
        Some("") => "/",
        Some(path) if path.starts_with('/') => path,
        _ => return None,
    };
    let (node, port) = match name.split_once(':') {
        Some((node, port)) => (node, Some(port.parse().ok()?)),
        None => (name, None),
    };
    if node.is_empty() {
        return None;
    }
    let path_and_query = match uri.query() {
        Some(query) => format!("{below}?{query}"),
        None => below.to_owned(),
    };
    Some(NodeProxyTarget {
        node: node.to_owned(),
        port,
        path_and_query,
    })
}

/// The kubelet base URL a real API server would use for `node` (see the module docs).
fn kubelet_base(node: &serde_json::Value, port_in_path: Option<u16>) -> Option<String> {
    let addresses = node.pointer("/status/addresses")?.as_array()?;
    let address = ["InternalIP", "Hostname", "ExternalIP"]
        .iter()
        .find_map(|wanted| {
            addresses
                .iter()
                .find(|a| a.get("type").and_then(serde_json::Value::as_str) == Some(wanted))
                .and_then(|a| a.get("address").and_then(serde_json::Value::as_str))
        })
        .filter(|a| !a.is_empty())?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(serde_json::Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .or(port_in_path)
        .unwrap_or(10250);
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_owned()
    };
    Some(format!("http://{host}:{port}"))
}

async fn forward_to_kubelet(
    cluster: &FakeCluster,
    kubelets: &reqwest::Client,
    parts: &http::request::Parts,
    body: Bytes,
    target: NodeProxyTarget,
) -> Response<Body> {
    let nodes = crate::ResourceType::new("", "v1", "nodes");
    let Some(node) = cluster.get_value(&nodes, None, &target.node) else {
        return status_response(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{}\" not found", target.node),
        );
    };
    let Some(base) = kubelet_base(&node, target.port) else {
        return status_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "",
            &format!(
                "no kubelet address for node {:?}: its status.addresses has no InternalIP, Hostname or ExternalIP",
                target.node
            ),
        );
    };
    let url = format!("{base}{}", target.path_and_query);
    let mut forwarded = kubelets.request(parts.method.clone(), &url).body(body);
    for name in [header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name) {
            forwarded = forwarded.header(name, value.clone());
        }
    }
    let answered = match forwarded.send().await {
        Ok(answered) => answered,
        Err(error) => {
            return status_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                &format!(
                    "error dialing backend: error trying to reach the kubelet of node {:?} at {url}: {error}",
                    target.node
                ),
            );
        }
    };
    let status = answered.status();
    let content_type = answered.headers().get(header::CONTENT_TYPE).cloned();
    match answered.bytes().await {
        Ok(bytes) => {
            let mut response = Response::new(Body::from(bytes));
            *response.status_mut() = status;
            if let Some(content_type) = content_type {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type);
            }
            response
        }
        Err(error) => status_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "",
            &format!(
                "reading the answer of the kubelet of node {:?} at {url}: {error}",
                target.node
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_proxy_paths() {
        let uri: http::Uri = "/api/v1/nodes/n1:10250/proxy/checkpoint/ml/p/c?timeout=60"
            .parse()
            .unwrap();
        assert_eq!(
            node_proxy_target(&uri),
            Some(NodeProxyTarget {
                node: "n1".into(),
                port: Some(10250),
                path_and_query: "/checkpoint/ml/p/c?timeout=60".into(),
            })
        );
        let bare: http::Uri = "/api/v1/nodes/n1/proxy".parse().unwrap();
        assert_eq!(node_proxy_target(&bare).unwrap().path_and_query, "/");
        for other in [
            "/api/v1/nodes/n1",
            "/api/v1/nodes/n1/status",
            "/api/v1/nodes/n1/proxyx/a",
            "/api/v1/namespaces/n/pods/p",
        ] {
            assert_eq!(node_proxy_target(&other.parse().unwrap()), None, "{other}");
        }
    }

    #[test]
    fn kubelet_address_as_the_api_server_picks_it() {
        let node = json!({"status": {
            "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.77.0.2"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10255}},
        }});
        assert_eq!(kubelet_base(&node, None).unwrap(), "http://10.77.0.2:10255");
        let v6 = json!({"status": {"addresses": [{"type": "InternalIP", "address": "fd00::2"}]}});
        assert_eq!(
            kubelet_base(&v6, Some(1234)).unwrap(),
            "http://[fd00::2]:1234"
        );
        assert_eq!(kubelet_base(&v6, None).unwrap(), "http://[fd00::2]:10250");
        assert_eq!(kubelet_base(&json!({"status": {}}), None), None);
    }
}
