//! The agent's HTTP API (axum) and the composition of a running agent: API server, transfer
//! receiver, probe responder, latency prober, ingest loop; graceful shutdown.
//!
//! HTTP: routes as in [`crate::api`]. `/healthz`, `/readyz` and `/metrics` need no token (the
//! kubelet and Prometheus scrape them); every `/v1/` route needs `Authorization: Bearer
//! <token>` when the agent has a token (compared in constant time). Bodies are JSON and limited
//! to [`MAX_BODY_BYTES`]; a malformed body, query or path is a 400 with an [`ErrorBody`] of kind
//! `invalid`, an unknown route a 404 `notFound`; every error answer is an [`ErrorBody`].
//!
//! Connections ([`HttpLimits`], served here rather than by `axum::serve`, which has none of
//! these): a request head must arrive within the header-read timeout, which also closes a
//! kept-alive connection that sends no next request (like the transfer port's handshake
//! timeout); a request body or an answer that stops moving for the idle timeout ends the
//! connection; past the connection cap a new connection is closed at once.
//!
//! Shutdown ([`RunningAgent::shutdown`]): readiness goes false, the API stops accepting, closes
//! idle connections and finishes the requests in flight (a checkpoint runs to its end) for at
//! most the shutdown timeout, then closes what is left; then transfers, the prober and the
//! receiver stop (the receiver's journal lets a sender resume later).

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::agent::{Agent, AgentError};
use crate::api::{
    CheckpointQuery, CheckpointRequest, ErrorBody, ImageRequest, TransferRequest, error_kind,
};
use crate::metrics::names;
use crate::prober::{Latencies, PeerSource, ProbeOptions, Prober, Responder};

pub const MAX_BODY_BYTES: usize = 64 * 1024;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (status, kind) = self.status_and_kind();
        error_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            kind,
            self.to_string(),
        )
    }
}

/// Longest message a client error (4xx) carries: such messages quote the caller's input (a
/// path, a field, the JSON parser's view of the body), which must not come back whole.
pub const MAX_CLIENT_ERROR_CHARS: usize = 400;

/// `message` cut to `max` characters, saying how much was left out.
fn truncated(message: String, max: usize) -> String {
    match message.char_indices().nth(max) {
        None => message,
        Some((cut, _)) => format!(
            "{}… [truncated: {} more bytes]",
            &message[..cut],
            message.len() - cut
        ),
    }
}

fn error_response(status: StatusCode, kind: &str, error: String) -> Response {
    let error = if status.is_client_error() {
        truncated(error, MAX_CLIENT_ERROR_CHARS)
    } else {
        error
    };
    if status.is_server_error() {
        tracing::error!(%status, kind, %error, "request failed");
    } else {
        tracing::info!(%status, kind, %error, "request refused");
    }
    (
        status,
        Json(ErrorBody {
            error,
            kind: kind.to_string(),
        }),
    )
        .into_response()
}

/// `Json` whose rejections are [`ErrorBody`]s.
struct ApiJson<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> Response {
    let status = match &rejection {
        JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        JsonRejection::BytesRejection(_) if caused_by_idle_body(&rejection) => {
            StatusCode::REQUEST_TIMEOUT
        }
        JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    error_response(status, error_kind::INVALID, rejection.body_text())
}

fn caused_by_idle_body(rejection: &JsonRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<BodyIdle>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// `Query` whose rejections are [`ErrorBody`]s.
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|rejection: QueryRejection| {
                error_response(
                    StatusCode::BAD_REQUEST,
                    error_kind::INVALID,
                    rejection.body_text(),
                )
            })
    }
}

#[derive(Clone)]
struct AppState {
    agent: Agent,
    token: Option<Arc<str>>,
}

/// The HTTP router for an agent. `token`: the bearer token `/v1/` requires (`None`: none).
pub fn router(agent: Agent, token: Option<String>) -> Router {
    let state = AppState {
        agent,
        token: token.map(Arc::from),
    };
    let v1 = Router::new()
        .route(
            "/v1/checkpoints",
            post(take_checkpoint).get(list_checkpoints),
        )
        .route("/v1/transfers", post(start_transfer))
        .route("/v1/transfers/{id}", get(transfer_status))
        .route("/v1/images", post(build_image))
        .route("/v1/peers", get(peers))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

/// One span per request, so the spans of the operation nest under it.
async fn request_span(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        status = tracing::field::Empty,
    );
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}

async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => error_response(
            StatusCode::UNAUTHORIZED,
            error_kind::UNAUTHORIZED,
            "the bearer token is wrong".to_string(),
        ),
        None => error_response(
            StatusCode::UNAUTHORIZED,
            error_kind::UNAUTHORIZED,
            "this agent needs `Authorization: Bearer <token>`".to_string(),
        ),
    }
}

/// Compares without an early exit on the first differing byte (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found(request: Request) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        error_kind::NOT_FOUND,
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        error_kind::INVALID,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.agent.readiness() {
        Ok(()) => "ready".into_response(),
        Err(reason) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            error_kind::UNAVAILABLE,
            format!("not ready: {reason}"),
        ),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.agent.metrics().render(),
    )
        .into_response()
}

async fn take_checkpoint(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CheckpointRequest>,
) -> Result<Response, AgentError> {
    // The dump runs in its own task: if the caller goes away (a controller killed mid-request),
    // the dump still finishes and is stored, where the caller's successor finds it, instead of
    // CRIU being killed halfway with the container frozen or stopped.
    let agent = state.agent.clone();
    let summary = tokio::spawn(async move { agent.checkpoint(&request).await })
        .await
        .map_err(|error| AgentError::Internal(format!("checkpoint task: {error}")))??;
    Ok(Json(summary).into_response())
}

async fn list_checkpoints(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<CheckpointQuery>,
) -> Result<Response, AgentError> {
    Ok(Json(state.agent.list_checkpoints(&query).await?).into_response())
}

async fn start_transfer(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<TransferRequest>,
) -> Result<Response, AgentError> {
    let status = state.agent.start_transfer(&request).await?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

async fn transfer_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AgentError> {
    Ok(Json(state.agent.transfer_status(&id)?).into_response())
}

async fn build_image(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ImageRequest>,
) -> Result<Response, AgentError> {
    Ok(Json(state.agent.build_image(&request).await?).into_response())
}

async fn peers(State(state): State<AppState>) -> Response {
    Json(state.agent.peers()).into_response()
}

/// Bounds on the API's connections (see the module header).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// From waiting for a request (a new connection, or the next request on a kept-alive one)
    /// to its complete head.
    pub header_read_timeout: Duration,
    /// Longest a request body or an answer may stop moving.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Longest a shutdown waits for requests in flight before closing their connections.
    pub shutdown_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            // The transfer port's handshake timeout.
            header_read_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            // Inside Kubernetes' default 30 s termination grace period.
            shutdown_timeout: Duration::from_secs(20),
        }
    }
}

/// A request body stopped arriving for the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body stopped arriving for {0:?}")]
struct BodyIdle(Duration);

/// A request body that fails once no data arrives for `timeout`.
struct IdleBody {
    inner: axum::body::Body,
    timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for IdleBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.stalled = None;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let stalled = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stalled.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyIdle(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn idle_body(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    let request = request.map(|inner| {
        axum::body::Body::new(IdleBody {
            inner,
            timeout,
            stalled: None,
        })
    });
    next.run(request).await
}

/// An accepted API connection: holds its slot under the cap, and fails a write that makes no
/// progress for the idle timeout (a client that stopped reading its answer).
struct ApiConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle_timeout: Duration,
    write_stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ApiConnection {
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let timeout = self.idle_timeout;
        let stalled = self
            .write_stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing of the answer for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for ApiConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ApiConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Ready(result) => {
                self.write_stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stalled(cx),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(result) => {
                self.write_stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stalled(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves the API on `listener` within `limits` until `stop` turns true, then shuts down
/// gracefully for at most `limits.shutdown_timeout`.
async fn serve_api(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = app.layer(middleware::from_fn_with_state(
        limits.idle_timeout,
        idle_body,
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors, most likely: a pause lets connections end.
                        tracing::warn!(%error, "accepting an API connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(
                        %peer,
                        limit = limits.max_connections,
                        "API connection refused: at the connection limit"
                    );
                    drop(stream);
                    continue;
                };
                let io = ApiConnection {
                    stream,
                    _slot: slot,
                    idle_timeout: limits.idle_timeout,
                    write_stalled: None,
                };
                let connection = builder.serve_connection(
                    hyper_util::rt::TokioIo::new(io),
                    hyper_util::service::TowerToHyperService::new(app.clone()),
                );
                let mut stop = stop.clone();
                connections.spawn(async move {
                    tokio::pin!(connection);
                    let result = tokio::select! {
                        result = connection.as_mut() => result,
                        () = stopped(&mut stop) => {
                            // Closes it if idle, else after the answer in flight.
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                    };
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "API connection ended");
                    }
                });
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            bound = ?limits.shutdown_timeout,
            "closing API connections still open at the shutdown bound"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// Returns once `stop` is true (or its sender is gone); holds no borrow of the value.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The sockets a running agent uses, bound by the caller (the binary binds the configured
/// addresses; tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    pub api: TcpListener,
    pub transfer: TcpListener,
    /// The probe responder, on the transfer port number over UDP.
    pub probe: UdpSocket,
}

impl Listeners {
    /// Binds the API on `api` and the transfer engine (TCP) and probe responder (UDP) on
    /// `transfer`; a port 0 for `transfer` picks one that is free for both.
    pub async fn bind(api: SocketAddr, transfer: SocketAddr) -> std::io::Result<Self> {
        let api = TcpListener::bind(api).await?;
        let transfer_listener = TcpListener::bind(transfer).await?;
        let bound = transfer_listener.local_addr()?;
        let probe = UdpSocket::bind(bound).await?;
        Ok(Self {
            api,
            transfer: transfer_listener,
            probe,
        })
    }
}

/// How a running agent is wired.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub token: Option<String>,
    pub peers: PeerSource,
    pub probe: ProbeOptions,
    /// How often to look for received checkpoints when the receiver completed files.
    pub ingest_interval: Duration,
    pub receiver: automigrate_transfer::ReceiverConfig,
    /// Bounds on the API's connections.
    pub http: HttpLimits,
    /// Self-fencing ([`crate::fence`]); `None`: off.
    pub self_fence: Option<crate::standing::SelfFenceOptions>,
}

impl ServeOptions {
    /// Receiving into `data_root`, no token, no peers.
    pub fn new(data_root: impl Into<std::path::PathBuf>) -> Self {
        Self {
            token: None,
            peers: PeerSource::default(),
            probe: ProbeOptions::default(),
            ingest_interval: Duration::from_millis(500),
            receiver: automigrate_transfer::ReceiverConfig::new(data_root),
            http: HttpLimits::default(),
            self_fence: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("transfer receiver: {0}")]
    Receiver(#[from] automigrate_transfer::receiver::ReceiveError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Agent(#[from] AgentError),
}

/// A running agent.
#[derive(Debug)]
pub struct RunningAgent {
    pub agent: Agent,
    pub api_addr: SocketAddr,
    pub transfer_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// Starts everything on the given sockets. The agent is ready once its backend answered.
    pub async fn start(
        agent: Agent,
        listeners: Listeners,
        options: ServeOptions,
        latencies: Latencies,
    ) -> Result<Self, ServeError> {
        let api_addr = listeners.api.local_addr()?;
        let transfer_addr = listeners.transfer.local_addr()?;
        let mut tasks = Vec::new();

        let receiver =
            automigrate_transfer::Receiver::new(options.receiver.clone(), &agent.options().tls)?;
        let serving = receiver.clone();
        let transfer_listener = listeners.transfer;
        tasks.push(tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(error) = serving.serve(transfer_listener).await {
                    tracing::error!(%error, "transfer receiver stopped");
                }
            },
            tracing::info_span!("receiver", addr = %transfer_addr),
        )));
        let mut responder = Responder::new(listeners.probe);
        if let Some(service) = options
            .self_fence
            .as_ref()
            .and_then(|fence| fence.service(&agent.options().node_name))
        {
            responder = responder.with_standing(service);
        }
        tasks.push(tokio::spawn(responder.serve()));
        tasks.push(tokio::spawn(tracing::Instrument::instrument(
            Prober {
                source: options.peers.clone(),
                options: options.probe,
                latencies,
                metrics: agent.metrics().clone(),
                nonce: u64::from(api_addr.port()) << 32 | u64::from(std::process::id()),
            }
            .run(),
            tracing::info_span!("prober"),
        )));
        tasks.push(tokio::spawn(ingest_loop(
            agent.clone(),
            receiver,
            options.ingest_interval,
        )));
        {
            let agent = agent.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = agent.verify_store().await {
                    tracing::error!(%error, "verifying the store failed");
                }
            }));
        }
        let startup = agent.clone();
        tasks.push(tokio::spawn(async move {
            // Ready once the backend answers; retried, since CRIU may be installed later.
            let mut delay = Duration::from_millis(200);
            while startup.probe_backend().await.is_err() {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }));

        let (shutdown, stop) = watch::channel(false);
        if let Some(fence) = options.self_fence.clone() {
            tasks.push(tokio::spawn(tracing::Instrument::instrument(
                fence.run(
                    agent.options().node_name.clone(),
                    options.peers.clone(),
                    agent.metrics().clone(),
                    shutdown.subscribe(),
                ),
                tracing::info_span!("self_fence"),
            )));
        }
        let app = router(agent.clone(), options.token.clone());
        let http = tokio::spawn(serve_api(listeners.api, app, options.http, stop));
        tracing::info!(api = %api_addr, transfer = %transfer_addr, node = %agent.options().node_name, "agent serving");
        Ok(Self {
            agent,
            api_addr,
            transfer_addr,
            shutdown,
            http,
            tasks,
        })
    }

    /// `http://<api addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// Graceful shutdown: see the module header.
    #[tracing::instrument(name = "agent_shutdown", skip_all)]
    pub async fn shutdown(self) {
        self.agent.set_ready(false, "shutting down");
        let _ = self.shutdown.send(true);
        match self.http.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "API server ended with an error"),
            Err(error) => tracing::warn!(%error, "API server task failed"),
        }
        self.agent.abort_background();
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        tracing::info!("agent stopped");
    }
}

/// Takes in received checkpoints whenever the receiver completed files, and exports its
/// counters.
async fn ingest_loop(agent: Agent, receiver: automigrate_transfer::Receiver, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = receiver.stats();
    let mut first = true;
    loop {
        ticker.tick().await;
        let stats = receiver.stats();
        let metrics = agent.metrics();
        metrics
            .counter(names::RECEIVED_BYTES, &[])
            .increment(stats.bytes_written.saturating_sub(seen.bytes_written));
        metrics
            .counter(names::TLS_REJECTED, &[])
            .increment(stats.tls_rejected.saturating_sub(seen.tls_rejected));
        let completed = stats.files_completed != seen.files_completed
            || stats.sessions_completed != seen.sessions_completed;
        seen = stats;
        // The first pass takes in whatever arrived before a restart.
        if completed || first {
            first = false;
            if let Err(error) = agent.ingest_incoming().await {
                tracing::warn!(%error, "taking in received checkpoints failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// A client that stopped reading: once the socket buffers are full, the write fails after
    /// the idle timeout instead of holding the connection (and its slot) forever.
    #[tokio::test]
    async fn an_answer_the_client_does_not_read_fails_after_the_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut connection = ApiConnection {
            stream,
            _slot: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
            idle_timeout: Duration::from_millis(100),
            write_stalled: None,
        };
        // Far more than any socket buffer; the client never reads.
        let answer = vec![0_u8; 256 << 20];
        let error = tokio::time::timeout(Duration::from_secs(20), connection.write_all(&answer))
            .await
            .expect("the stalled write never failed")
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        drop(client);
    }
}
