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
    let service = tower::service_fn(move |request: Request<Body>| {
        answer(cluster.clone(), stopping.clone(), request)
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
