//! The sending agent: scans and hashes the source, opens a session on the receiver, and moves
//! the work units of `automigrate_core::transfer::plan_transfer` over a varying number of
//! parallel TLS streams, round by round, as the `StreamController` asks.
//!
//! Data model:
//! - A *transfer* is one call of [`send`]. It runs one or more *sessions*: each starts with an
//!   `Open` that sends the manifest and learns from `Have` which pieces the receiver already
//!   holds, so a retry after a failure (or a new `send` after a killed one) only sends what is
//!   missing.
//! - Work units come from the core planner (large files in chunks, small files packed, largest
//!   first). A unit whose pieces the receiver has is skipped; a pack it partly has is trimmed.
//! - Streams pull units from one shared queue. A stream keeps a window of sent but
//!   unacknowledged units, sized each round from its share of the measured rate; when a
//!   stream dies, its unacknowledged units go back to the front of the queue (a *resend*); a
//!   `Nack` (hash mismatch at the receiver) does the same, up to a bounded number of attempts.
//! - The coordinator runs *rounds*: a round is a stretch of at least `round` during which the
//!   set of streams did not change and the queue never ran dry. It measures delivered bytes
//!   (the receiver's `Received` counts) and asks the controller for the next stream count
//!   (also in a plan for one stream, under the `Auto` strategy); streams above the new count
//!   finish their unit and park, new ones are opened. Near the end the count stays.
//! - *Endgame*: idle data streams send copies of the oldest unacknowledged units; a stream
//!   still writing a unit acknowledged through a copy is cut off and its connection reset.
//! - When every unit is acknowledged, the control stream sends `Done`, its last frame; the
//!   receiver answers `Complete`, or `Missing` pieces, which are queued again for a new
//!   control stream.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_core::transfer::{
    LinkEstimate, RoundSample, StreamController, StreamMode, TransferPlan, TransferPlanError,
    TransferSettings, TransferStrategy, WorkUnit, plan_transfer,
};
use backon::BackoffBuilder as _;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::conn::{ConnError, FrameReader, FrameWriter};
use crate::manifest::{Manifest, ManifestError, Scanned, Source, scan};
use crate::paths::RelPath;
use crate::pieceset::PieceSet;
use crate::ratelimit::TokenBucket;
use crate::receiver::hex;
use crate::tls::{TlsConfig, TlsError};
use crate::wire::{
    ErrorCode, Frame, Hello, Intent, MAX_DATA_PAYLOAD, MAX_PACK_FILES, PROTOCOL_VERSION,
    PieceRange, UnitBody, UnitStart, WireError,
};

/// Bytes read from a source file at a time.
const READ_BLOCK: usize = 1 << 20;
/// Rounds a change of the stream count needs to pay back: one to measure it, one to undo it
/// if it was worse, one to gain from it.
const ROUNDS_FOR_A_CHANGE_TO_PAY: u32 = 3;
/// The fewest units a stream may owe: one being acknowledged while the next is written.
const MIN_WINDOW_UNITS: u32 = 2;
/// How many times the receiver may answer `Missing` before the transfer gives up.
const MAX_FINISH_ROUNDS: u32 = 4;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The settings were refused by the planner.
    #[error("transfer settings: {0}")]
    Plan(#[from] TransferPlanError),
    /// The target directory name was refused.
    #[error("target directory: {0}")]
    Target(#[from] crate::paths::PathError),
    /// The source could not be listed or hashed.
    #[error("{0}")]
    Scan(#[from] ManifestError),
    /// A frame could not be encoded (a bug, or a limit).
    #[error("encoding: {0}")]
    Wire(#[from] WireError),
    /// The TLS configuration or server name is unusable.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The receiver could not be reached.
    #[error("connecting to {peer}: {source}")]
    Connect {
        /// The receiver.
        peer: SocketAddr,
        /// Why.
        source: ConnError,
    },
    /// TLS failed: the receiver's certificate was not trusted, or it refused ours.
    #[error("TLS with {peer} failed (certificates from the same CA on both nodes?): {message}")]
    Handshake {
        /// The receiver.
        peer: SocketAddr,
        /// rustls' reason.
        message: String,
    },
    /// A connection failed in the middle of the transfer.
    #[error("connection to {peer}: {source}")]
    Stream {
        /// The receiver.
        peer: SocketAddr,
        /// Why.
        source: ConnError,
    },
    /// The receiver refused the transfer.
    #[error("the receiver refused ({code}): {message}")]
    Rejected {
        /// Its code.
        code: ErrorCode,
        /// Its reason.
        message: String,
    },
    /// The receiver no longer has the session (it restarted, or the session was superseded).
    #[error("the receiver lost the session: {0}")]
    SessionLost(String),
    /// A unit kept failing its hash at the receiver.
    #[error(
        "`{path}` failed verification at the receiver {attempts} times: the source changed during the transfer, or data is corrupted on the way"
    )]
    Verification {
        /// The file.
        path: String,
        /// Attempts made.
        attempts: u32,
    },
    /// A source file could not be read (or changed size) after it was scanned.
    #[error("reading `{path}`: {source}")]
    Source {
        /// The local path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The receiver broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The receiver still reports missing pieces after several finish rounds.
    #[error("the receiver still misses {0} pieces after {MAX_FINISH_ROUNDS} finish rounds")]
    Incomplete(u64),
    /// Stopped by a test hook.
    #[error("aborted by a test hook")]
    Aborted,
    /// A task failed.
    #[error("internal: {0}")]
    Internal(String),
}

impl SendError {
    /// Whether a new session might succeed where this one failed.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Stream { .. } | Self::SessionLost(_)
        ) || matches!(
            self,
            Self::Rejected {
                code: ErrorCode::Superseded | ErrorCode::UnknownSession | ErrorCode::Io,
                ..
            }
        )
    }
}

/// Progress, reported after every acknowledged unit and every round.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Progress {
    /// Bytes the receiver holds (acknowledged now, or already there before).
    pub bytes_done: u64,
    /// Bytes in the transfer.
    pub bytes_total: u64,
    /// Units acknowledged or skipped.
    pub units_done: u64,
    /// Units in the plan.
    pub units_total: u64,
    /// Streams open now.
    pub streams: u32,
    /// Delivered throughput of the last round, bits per second.
    pub rate_bps: f64,
    /// Units sent again so far.
    pub units_resent: u64,
}

/// A progress callback.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// Retries of connections and sessions.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Consecutive failed attempts before giving up.
    pub attempts: usize,
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 8,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Fault injection for tests of the failure paths. Never set outside tests.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Flip a byte in the first data frame of these unit transmissions (numbered from 0 in
    /// the order they start), after the data was read: the receiver must refuse them.
    pub corrupt_sends: Vec<u64>,
    /// Once this many units are acknowledged, drop every connection abruptly (once).
    pub drop_connections_after_acks: Option<u64>,
    /// Once this many units are acknowledged, stop at once with [`SendError::Aborted`], as if
    /// the sending agent had been killed.
    pub abort_after_acks: Option<u64>,
}

/// How to send.
#[derive(Clone)]
pub struct SendOptions {
    /// Directory under the receiver's root to put the files in; `None` for the root.
    pub target: Option<String>,
    /// Strategy, stream ceiling, chunk size, rate limit.
    pub settings: TransferSettings,
    /// What is known about the link; `None` measures the RTT at connect and assumes no loss
    /// and unknown bandwidth, leaving the rest to the controller.
    pub link: Option<LinkEstimate>,
    /// Least length of a round; `None` picks `max(1 s, 10 RTT)`, at most 3 s.
    pub round: Option<Duration>,
    /// Congestion control for our sockets, e.g. `cubic` or `bbr`; `None` keeps the default.
    pub congestion_control: Option<String>,
    /// The name the receiver's certificate must carry; `None` uses its IP address.
    pub server_name: Option<String>,
    /// Time limit for TCP and TLS set-up.
    pub connect_timeout: Duration,
    /// A connection with unacknowledged units and nothing received for this long is dropped.
    pub idle_timeout: Duration,
    /// Reconnection and session retries.
    pub retry: RetryPolicy,
    /// How many times one unit may fail its hash before the transfer fails.
    pub max_unit_attempts: u32,
    /// Most unacknowledged units per stream. After each measured round the sender lowers a
    /// stream's window to its share of the rate over two round trips plus one unit (at least
    /// 2), so this ceiling only has to cover one stream alone on a long, fast link: 4 units of
    /// 256 KiB capped a single stream near 110 Mbit/s at 70 ms.
    pub window_units: u32,
    /// Threads hashing the source.
    pub hash_threads: usize,
    /// Called with progress.
    pub progress: Option<ProgressFn>,
    /// Fault injection, for tests only.
    pub hooks: TestHooks,
}

impl std::fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendOptions")
            .field("target", &self.target)
            .field("settings", &self.settings)
            .field("link", &self.link)
            .field("round", &self.round)
            .field("congestion_control", &self.congestion_control)
            .field("server_name", &self.server_name)
            .field("retry", &self.retry)
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            target: None,
            settings: TransferSettings::default(),
            link: None,
            round: None,
            congestion_control: None,
            server_name: None,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            max_unit_attempts: 4,
            window_units: 64,
            hash_threads: std::thread::available_parallelism().map_or(2, usize::from),
            progress: None,
            hooks: TestHooks::default(),
        }
    }
}

/// One measured round.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RoundReport {
    /// Seconds from the start of the transfer to the end of the round.
    pub at_secs: f64,
    /// Streams during the round.
    pub streams: u32,
    /// Bytes delivered during the round.
    pub bytes: u64,
    /// Length of the round in seconds.
    pub secs: f64,
    /// Delivered throughput, bits per second.
    pub bps: f64,
    /// Streams the controller asked for next.
    pub next_streams: u32,
}

/// What the planner decided.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanSummary {
    /// `single` or `parallel`.
    pub mode: String,
    /// Streams in the first round.
    pub initial_streams: u32,
    /// The controller's ceiling.
    pub max_streams: u32,
    /// Chunk size.
    pub chunk_size: u64,
    /// The planner's sentence.
    pub rationale: String,
}

/// What a transfer did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    /// Transfer id (hex).
    pub transfer_id: String,
    /// Files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Bytes of all files.
    pub total_bytes: u64,
    /// Units in the plan.
    pub units_total: u64,
    /// Units the receiver already had when the transfer started.
    pub units_skipped: u64,
    /// Bytes the receiver already had when the transfer started.
    pub bytes_skipped: u64,
    /// Unit transmissions, resends included.
    pub units_sent: u64,
    /// Transmissions of a unit that had been sent before (after a dropped connection, a hash
    /// mismatch, or a receiver that lost it).
    pub units_resent: u64,
    /// Extra copies of unacknowledged units sent by idle streams at the very end, so one slow
    /// stream cannot hold the transfer back (the first copy acknowledged wins).
    pub units_duplicated: u64,
    /// File bytes of those copies that were written.
    pub bytes_duplicated: u64,
    /// Transmissions cut off in the middle because the unit was acknowledged through another
    /// copy (or the session ended); their connection was reset, so the rest never went out.
    pub units_abandoned: u64,
    /// File bytes sent, resends and duplicates included.
    pub bytes_sent: u64,
    /// File bytes sent again.
    pub bytes_resent: u64,
    /// Pieces the receiver refused because their hash did not match.
    pub hash_mismatches: u64,
    /// TCP connections opened.
    pub connections: u64,
    /// Sessions opened (more than one after the receiver lost one).
    pub sessions: u64,
    /// Most streams open at once.
    pub max_streams_used: u32,
    /// Measured rounds.
    pub rounds: Vec<RoundReport>,
    /// The plan.
    pub plan: PlanSummary,
    /// Time to list and hash the source, seconds.
    pub scan_secs: f64,
    /// Time of the whole call, seconds.
    pub duration_secs: f64,
}

/// Counters over the whole transfer.
#[derive(Debug, Default)]
struct Counters {
    units_sent: AtomicU64,
    units_resent: AtomicU64,
    units_duplicated: AtomicU64,
    bytes_duplicated: AtomicU64,
    units_abandoned: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_resent: AtomicU64,
    hash_mismatches: AtomicU64,
    connections: AtomicU64,
    units_acked: AtomicU64,
    sends_started: AtomicU64,
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A unit as the sender tracks it.
#[derive(Debug, Clone)]
struct UnitTask {
    id: u64,
    body: UnitBody,
    pieces: Vec<u64>,
    bytes: u64,
    mismatches: u32,
}

/// Sends `source` to the receiver at `peer`.
pub async fn send(
    source: &Source,
    peer: SocketAddr,
    tls: &TlsConfig,
    options: &SendOptions,
) -> Result<Report, SendError> {
    let started = Instant::now();
    let target = options.target.as_deref().map(RelPath::parse).transpose()?;
    options.settings.validate()?;
    let span = info_span!("send", %peer);
    async move {
        let server_name = crate::tls::server_name(options.server_name.as_deref(), peer.ip())?;
        let counters = Arc::new(Counters::default());
        let dialer = Dialer {
            peer,
            connector: tls.connector(),
            server_name: server_name.clone(),
            congestion_control: options.congestion_control.clone(),
            connect_timeout: options.connect_timeout,
            counters: counters.clone(),
        };
        // The TCP and TLS handshakes need nothing from the source: do them while it is hashed.
        let predialed = tokio::spawn(async move { dialer.dial().await });
        let scanned = {
            let source = source.clone();
            let chunk_size = options.settings.chunk_size;
            let threads = options.hash_threads;
            tokio::task::spawn_blocking(move || scan(&source, target, chunk_size, threads))
                .await
                .map_err(|error| SendError::Internal(error.to_string()))??
        };
        let scan_secs = started.elapsed().as_secs_f64();
        let Scanned {
            manifest,
            local_paths,
            beneath,
        } = scanned;
        let transfer_id = manifest.transfer_id()?;
        info!(
            id = %hex(&transfer_id),
            files = manifest.files.len(),
            bytes = manifest.total_bytes(),
            scan_secs,
            "source scanned"
        );
        let mut transfer = Transfer {
            manifest: Arc::new(manifest),
            local_paths: Arc::new(local_paths),
            beneath,
            transfer_id,
            peer,
            connector: tls.connector(),
            server_name,
            options: options.clone(),
            counters,
            sent_before: Arc::new(Mutex::new(PieceSet::empty(0))),
            plan: None,
            controller: None,
            rounds: Vec::new(),
            started,
            skipped: None,
            sessions: 0,
            max_streams_used: 0,
            next_unit_id: 0,
            predialed: Some(predialed),
        };
        transfer.run().await?;
        Ok(transfer.report(scan_secs))
    }
    .instrument(span)
    .await
}

/// State of one `send` call across its sessions.
struct Transfer {
    manifest: Arc<Manifest>,
    local_paths: Arc<Vec<PathBuf>>,
    /// A confined source's root handle: local paths are opened through it, never by path.
    beneath: Option<Arc<std::os::fd::OwnedFd>>,
    transfer_id: [u8; 32],
    peer: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    options: SendOptions,
    counters: Arc<Counters>,
    /// Pieces transmitted at least once, to count resends.
    sent_before: Arc<Mutex<PieceSet>>,
    plan: Option<TransferPlan>,
    controller: Option<StreamController>,
    rounds: Vec<RoundReport>,
    started: Instant,
    /// (units, bytes) the receiver had at the first `Have`.
    skipped: Option<(u64, u64)>,
    sessions: u64,
    max_streams_used: u32,
    next_unit_id: u64,
    /// The first control connection, dialled while the source was being hashed.
    predialed: Option<tokio::task::JoinHandle<Result<Dialed, SendError>>>,
}

type TlsReader = FrameReader<ReadHalf<TlsStream<TcpStream>>>;
type TlsWriter = FrameWriter<WriteHalf<TlsStream<TcpStream>>>;

/// What a connection needs to be opened; cloned into stream tasks.
#[derive(Clone)]
struct Dialer {
    peer: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    server_name: rustls_pki_types::ServerName<'static>,
    congestion_control: Option<String>,
    connect_timeout: Duration,
    counters: Arc<Counters>,
}

/// A connection whose TCP and TLS handshakes are done, before `Hello`.
struct Dialed {
    reader: TlsReader,
    writer: TlsWriter,
    /// The TCP handshake time, about one round trip.
    rtt: Duration,
    /// When the handshakes finished: the receiver closes a connection that says nothing for
    /// its handshake timeout, so an old one is not used.
    at: Instant,
}

/// How old a dialled connection may be before its `Hello`; receivers wait 15 s by default.
const PREDIAL_MAX_AGE: Duration = Duration::from_secs(10);

impl Dialer {
    /// TCP and TLS.
    async fn dial(&self) -> Result<Dialed, SendError> {
        let peer = self.peer;
        let (tcp, rtt) = crate::conn::connect(
            peer,
            self.congestion_control.as_deref(),
            self.connect_timeout,
        )
        .await
        .map_err(|source| SendError::Connect { peer, source })?;
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let tls = tokio::time::timeout(
            self.connect_timeout,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| SendError::Connect {
            peer,
            source: ConnError::Timeout(self.connect_timeout, "the TLS handshake"),
        })?
        .map_err(|error| {
            // A TLS alert or a certificate rustls refused surfaces as invalid data; anything
            // else (a reset, an early close) is the network, and worth a retry.
            if error.kind() == std::io::ErrorKind::InvalidData {
                SendError::Handshake {
                    peer,
                    message: error.to_string(),
                }
            } else {
                SendError::Connect {
                    peer,
                    source: ConnError::Io {
                        op: "TLS handshake",
                        source: error,
                    },
                }
            }
        })?;
        let (read_half, write_half) = tokio::io::split(tls);
        Ok(Dialed {
            reader: FrameReader::new(read_half),
            writer: FrameWriter::new(write_half),
            rtt,
            at: Instant::now(),
        })
    }

    /// Sends `Hello` (flushing only when `flush`: an `Open` sends the manifest right behind it,
    /// saving a round trip).
    async fn hello(
        &self,
        dialed: &mut Dialed,
        intent: Intent,
        flush: bool,
    ) -> Result<(), SendError> {
        let peer = self.peer;
        let stream_error = |source| SendError::Stream { peer, source };
        let hello = Frame::Hello(Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            intent,
        });
        dialed.writer.send(&hello).await.map_err(stream_error)?;
        if flush {
            dialed.writer.flush().await.map_err(stream_error)?;
        }
        Ok(())
    }

    /// Reads `Welcome`; returns the session number.
    async fn welcome(&self, dialed: &mut Dialed) -> Result<u64, SendError> {
        let peer = self.peer;
        // With TLS 1.3 the receiver checks our certificate after our side of the handshake is
        // done, so its refusal arrives here, as the first read.
        let welcome = dialed
            .reader
            .expect(self.connect_timeout, "Welcome")
            .await
            .map_err(|source| match source {
                // rustls reports a TLS alert (certificate refused) as invalid data; a reset or
                // an early close is an ordinary connection failure and worth a retry.
                ConnError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::InvalidData =>
                {
                    SendError::Handshake {
                        peer,
                        message: source.to_string(),
                    }
                }
                other => SendError::Stream {
                    peer,
                    source: other,
                },
            })?;
        match welcome {
            Frame::Welcome(welcome) if welcome.version == PROTOCOL_VERSION => Ok(welcome.session),
            Frame::Welcome(welcome) => Err(SendError::Protocol(format!(
                "the receiver chose version {}, which this sender does not speak",
                welcome.version
            ))),
            Frame::Error {
                code: ErrorCode::UnknownSession,
                message,
            } => Err(SendError::SessionLost(message)),
            Frame::Error { code, message } => Err(SendError::Rejected { code, message }),
            other => Err(SendError::Protocol(format!(
                "expected Welcome, got {}",
                other.kind()
            ))),
        }
    }

    /// A data stream: dialled now (or earlier, `predialed`), joined to `session`.
    async fn join(
        &self,
        predialed: Option<tokio::task::JoinHandle<Result<Dialed, SendError>>>,
        intent: Intent,
    ) -> Result<Dialed, SendError> {
        let mut dialed = match predialed {
            Some(task) => match task
                .await
                .map_err(|error| SendError::Internal(error.to_string()))??
            {
                fresh if fresh.at.elapsed() < PREDIAL_MAX_AGE => fresh,
                _ => self.dial().await?,
            },
            None => self.dial().await?,
        };
        // Units follow the Hello at once; the stream's reader takes the Welcome (or the refusal,
        // which sends whatever went out back to the queue), saving a round trip per stream.
        self.hello(&mut dialed, intent, true).await?;
        Ok(dialed)
    }
}

impl Transfer {
    fn dialer(&self) -> Dialer {
        Dialer {
            peer: self.peer,
            connector: self.connector.clone(),
            server_name: self.server_name.clone(),
            congestion_control: self.options.congestion_control.clone(),
            connect_timeout: self.options.connect_timeout,
            counters: self.counters.clone(),
        }
    }

    /// Sessions until one completes, retrying transient failures with backoff.
    async fn run(&mut self) -> Result<(), SendError> {
        let retry = self.options.retry;
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(retry.min_delay)
            .with_max_delay(retry.max_delay)
            .with_max_times(retry.attempts)
            .with_jitter();
        let mut backoff = builder.build();
        loop {
            let acked_before = get(&self.counters.units_acked);
            self.sessions += 1;
            let span = info_span!("session", attempt = self.sessions);
            let result = self.run_session().instrument(span).await;
            match result {
                Ok(()) => return Ok(()),
                Err(error) if error.is_transient() => {
                    if get(&self.counters.units_acked) > acked_before {
                        // Progress was made; a long transfer may survive many separate faults.
                        backoff = builder.build();
                    }
                    let Some(delay) = backoff.next() else {
                        return Err(error);
                    };
                    warn!(%error, ?delay, "session failed; opening a new one");
                    tokio::time::sleep(delay).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Opens a session and runs it to completion.
    async fn run_session(&mut self) -> Result<(), SendError> {
        let dialer = self.dialer();
        let mut control = match self.predialed.take() {
            Some(task) => match task.await {
                Ok(Ok(dialed)) if dialed.at.elapsed() < PREDIAL_MAX_AGE => dialed,
                Ok(Ok(_)) => dialer.dial().await?,
                Ok(Err(error)) => return Err(error),
                Err(error) => return Err(SendError::Internal(error.to_string())),
            },
            None => dialer.dial().await?,
        };
        let rtt = control.rtt;
        if self.plan.is_none() {
            let link = self.options.link.unwrap_or(LinkEstimate {
                rtt,
                bandwidth_bps: None,
                loss: 0.0,
            });
            let plan = plan_transfer(&self.manifest.file_specs(), &link, &self.options.settings)?;
            let plan = if self.options.link.is_none() {
                measured_single_stream(plan, &self.options.settings)
            } else {
                plan
            };
            info!(rationale = %plan.rationale, "planned");
            if let Ok(mut sent) = self.sent_before.lock() {
                *sent = PieceSet::empty(self.manifest.piece_count());
            }
            self.controller = Some(StreamController::new(
                plan.initial_streams,
                plan.max_streams,
            ));
            self.plan = Some(plan);
        }
        // Dial the first round's data streams while the manifest goes across; they join once
        // the receiver has answered it.
        let wanted = match self.plan.as_ref().map(|plan| plan.mode) {
            Some(StreamMode::Parallel) => self
                .controller
                .as_ref()
                .map_or(1, StreamController::streams),
            _ => 1,
        };
        let predialed: Vec<_> = (1..wanted)
            .map(|_| {
                let dialer = dialer.clone();
                tokio::spawn(async move { dialer.dial().await })
            })
            .collect();

        let peer = self.peer;
        let stream_error = |source| SendError::Stream { peer, source };
        dialer
            .hello(
                &mut control,
                Intent::Open {
                    transfer_id: self.transfer_id,
                },
                false,
            )
            .await?;
        for frame in self.manifest.frames() {
            control.writer.send(&frame).await.map_err(stream_error)?;
        }
        control.writer.flush().await.map_err(stream_error)?;
        let session = dialer.welcome(&mut control).await?;
        let Dialed {
            mut reader, writer, ..
        } = control;
        let mut have = PieceSet::empty(self.manifest.piece_count());
        loop {
            match reader
                .expect(self.options.idle_timeout, "Have")
                .await
                .map_err(stream_error)?
            {
                Frame::Have { ranges, last } => {
                    if !have.insert_wire_ranges(&ranges) {
                        return Err(SendError::Protocol(
                            "Have names pieces that do not exist".into(),
                        ));
                    }
                    if last {
                        break;
                    }
                }
                Frame::Error { code, message } => {
                    return Err(SendError::Rejected { code, message });
                }
                other => {
                    return Err(SendError::Protocol(format!(
                        "expected Have, got {}",
                        other.kind()
                    )));
                }
            }
        }

        let Some(plan) = self.plan.clone() else {
            return Err(SendError::Internal("no plan".into()));
        };
        let (units, skipped_units) = self.units_for(&plan, &have);
        if self.skipped.is_none() {
            let skipped_bytes = have
                .iter()
                .map(|piece| self.manifest.piece_len(piece))
                .sum();
            self.skipped = Some((skipped_units, skipped_bytes));
            info!(
                skipped_units,
                skipped_bytes,
                to_send = units.len(),
                "the receiver already holds part of the transfer"
            );
        }
        let round = self
            .options
            .round
            .unwrap_or_else(|| (rtt * 10).clamp(Duration::from_secs(1), Duration::from_secs(3)));
        let mode = plan.mode;
        let mut session_run =
            SessionRun::new(self, dialer, session, have, units, (round, rtt), mode);
        session_run.start_control(reader, writer);
        session_run.start_predialed(predialed);
        let result = session_run.coordinate().await;
        self.next_unit_id = session_run.shared.next_unit_id.load(Ordering::Relaxed);
        self.max_streams_used = self.max_streams_used.max(session_run.max_streams_used);
        self.rounds.append(&mut session_run.rounds);
        if let Some(controller) = session_run.controller.take() {
            self.controller = Some(controller);
        }
        result
    }

    /// The plan's units, without the pieces the receiver has; and how many plan units it
    /// has entirely.
    fn units_for(&mut self, plan: &TransferPlan, have: &PieceSet) -> (Vec<UnitTask>, u64) {
        let manifest = &self.manifest;
        let mut units = Vec::with_capacity(plan.units.len());
        let mut skipped = 0_u64;
        for unit in &plan.units {
            match unit {
                WorkUnit::Chunk { file, offset, len } => {
                    let index = offset / manifest.chunk_size;
                    let Some(piece) = manifest.chunk_piece(*file, index) else {
                        continue;
                    };
                    if have.contains(piece) {
                        skipped += 1;
                        continue;
                    }
                    units.push(UnitTask {
                        id: 0,
                        body: UnitBody::Chunk {
                            file: u32::try_from(*file).unwrap_or(u32::MAX),
                            index: u32::try_from(index).unwrap_or(u32::MAX),
                        },
                        pieces: vec![piece],
                        bytes: *len,
                        mismatches: 0,
                    });
                }
                WorkUnit::Pack { files, .. } => {
                    let missing: Vec<usize> = files
                        .iter()
                        .copied()
                        .filter(|&file| !have.contains(manifest.pieces_of(file).start))
                        .collect();
                    if missing.is_empty() {
                        skipped += 1;
                    }
                    for group in missing.chunks(MAX_PACK_FILES) {
                        units.push(UnitTask {
                            id: 0,
                            body: UnitBody::Pack {
                                files: group
                                    .iter()
                                    .map(|&file| u32::try_from(file).unwrap_or(u32::MAX))
                                    .collect(),
                            },
                            pieces: group
                                .iter()
                                .map(|&file| manifest.pieces_of(file).start)
                                .collect(),
                            bytes: group.iter().map(|&file| manifest.files[file].size).sum(),
                            mismatches: 0,
                        });
                    }
                }
            }
        }
        for unit in &mut units {
            unit.id = self.next_unit_id;
            self.next_unit_id += 1;
        }
        (units, skipped)
    }

    fn report(&self, scan_secs: f64) -> Report {
        let (units_skipped, bytes_skipped) = self.skipped.unwrap_or((0, 0));
        let plan = self.plan.as_ref();
        Report {
            transfer_id: hex(&self.transfer_id),
            files: self.manifest.files.len() as u64,
            dirs: self.manifest.dirs.len() as u64,
            total_bytes: self.manifest.total_bytes(),
            units_total: plan.map_or(0, |plan| plan.units.len() as u64),
            units_skipped,
            bytes_skipped,
            units_sent: get(&self.counters.units_sent),
            units_resent: get(&self.counters.units_resent),
            units_duplicated: get(&self.counters.units_duplicated),
            bytes_duplicated: get(&self.counters.bytes_duplicated),
            units_abandoned: get(&self.counters.units_abandoned),
            bytes_sent: get(&self.counters.bytes_sent),
            bytes_resent: get(&self.counters.bytes_resent),
            hash_mismatches: get(&self.counters.hash_mismatches),
            connections: get(&self.counters.connections),
            sessions: self.sessions,
            max_streams_used: self.max_streams_used,
            rounds: self.rounds.clone(),
            plan: PlanSummary {
                mode: match plan.map(|plan| plan.mode) {
                    Some(StreamMode::Parallel) => "parallel".into(),
                    _ => "single".into(),
                },
                initial_streams: plan.map_or(0, |plan| plan.initial_streams),
                max_streams: plan.map_or(0, |plan| plan.max_streams),
                chunk_size: self.manifest.chunk_size,
                rationale: plan.map(|plan| plan.rationale.clone()).unwrap_or_default(),
            },
            scan_secs,
            duration_secs: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// Without a link estimate, under the `Auto` strategy, a plan for one stream still starts at
/// one stream but lets the controller measure whether more help.
///
/// The planner picks one stream when its model says one fills the link. Without an estimate
/// (no probe results yet) that model rests on an assumed clean 1 Gbit/s link, so at 10 ms and
/// 0.1 % loss it would keep one loss-bound stream (about 45 Mbit/s) for the whole transfer.
/// With an estimate the model is trusted: probing a link one stream already fills costs
/// time, because every new stream's slow start overflows the bottleneck queue and the first
/// stream backs off (docs/transfer.md has the measurement).
fn measured_single_stream(mut plan: TransferPlan, settings: &TransferSettings) -> TransferPlan {
    if settings.strategy != TransferStrategy::Auto || plan.mode != StreamMode::Single {
        return plan;
    }
    let ceiling = settings
        .max_streams
        .min(u32::try_from(plan.units.len()).unwrap_or(u32::MAX))
        .max(1);
    if ceiling > 1 {
        plan.mode = StreamMode::Parallel;
        plan.max_streams = ceiling;
        plan.initial_streams = 1;
        plan.rationale.push_str(&format!(
            " Starting on one stream; the controller adds streams (up to {ceiling}) when the measured rounds show they help."
        ));
    }
    plan
}

/// What the receiver said to `Done`.
enum FinishReply {
    Complete,
    Missing(Vec<PieceRange>),
}

/// State shared by the streams of one session and its coordinator.
struct Shared {
    manifest: Arc<Manifest>,
    local_paths: Arc<Vec<PathBuf>>,
    beneath: Option<Arc<std::os::fd::OwnedFd>>,
    peer: SocketAddr,
    counters: Arc<Counters>,
    sent_before: Arc<Mutex<PieceSet>>,
    hooks: TestHooks,
    rate: Option<Arc<TokenBucket>>,
    idle_timeout: Duration,
    window_units: u32,
    /// Units a stream may owe now, at most `window_units`: enough to cover its share of the
    /// delivered rate for two round trips and one unit more, from the last measured round.
    window_now: AtomicU32,
    max_unit_attempts: u32,
    queue: Mutex<VecDeque<UnitTask>>,
    /// Units not yet acknowledged, queued or in flight.
    outstanding: AtomicU64,
    /// Work queued again, a unit acknowledged, a stream ended: everyone re-checks.
    wake: Notify,
    /// Streams in slots at or above this stop taking work.
    target: AtomicU32,
    /// Data bytes the receiver reported, over all streams.
    delivered: AtomicU64,
    /// A stream found the queue empty during the current round.
    starved: AtomicBool,
    fatal: Mutex<Option<SendError>>,
    finish_reply: Mutex<Option<oneshot::Sender<FinishReply>>>,
    /// Pieces the receiver has (acknowledged or reported in `Have`).
    acked: Mutex<PieceSet>,
    /// Units being sent or awaiting their ack: when they started and how many copies are out.
    flights: Mutex<HashMap<u64, Flight>>,
    /// Units acknowledged; a later ack of another copy is not counted again.
    completed: Mutex<std::collections::HashSet<u64>>,
    bytes_done: AtomicU64,
    units_done: AtomicU64,
    units_total: u64,
    drop_requested: AtomicBool,
    drop_done: AtomicBool,
    /// The session is over: streams close their connections.
    shutdown: AtomicBool,
    /// Numbers for units made during the session (pieces missing at finish).
    next_unit_id: AtomicU64,
    progress: Option<ProgressFn>,
    streams_open: AtomicU32,
    last_rate_bps: Mutex<f64>,
}

impl Shared {
    fn set_fatal(&self, error: SendError) {
        if let Ok(mut fatal) = self.fatal.lock()
            && fatal.is_none()
        {
            *fatal = Some(error);
        }
        self.wake.notify_waiters();
    }

    fn take(&self) -> Option<UnitTask> {
        let unit = self.queue.lock().ok()?.pop_front();
        if unit.is_none() && !self.starved.swap(true, Ordering::Relaxed) {
            debug!(
                outstanding = self.outstanding.load(Ordering::Relaxed),
                "the queue ran dry"
            );
        }
        unit
    }

    /// Fewer units queued than streams open: the last ones should go to idle streams.
    fn endgame(&self) -> bool {
        self.queued() < self.streams_open.load(Ordering::Relaxed) as usize
    }

    fn requeue(&self, unit: UnitTask) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.push_front(unit);
        }
        self.wake.notify_waiters();
    }

    fn queued(&self) -> usize {
        self.queue.lock().map_or(0, |queue| queue.len())
    }

    fn report_progress(&self) {
        let Some(progress) = &self.progress else {
            return;
        };
        progress(&Progress {
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.manifest.total_bytes(),
            units_done: self.units_done.load(Ordering::Relaxed),
            units_total: self.units_total,
            streams: self.streams_open.load(Ordering::Relaxed),
            rate_bps: self.last_rate_bps.lock().map_or(0.0, |rate| *rate),
            units_resent: get(&self.counters.units_resent),
        });
    }

    /// Records that `unit` is being sent (again, or as an endgame copy).
    fn fly(&self, unit: &UnitTask, copy: bool) {
        if let Ok(mut flights) = self.flights.lock() {
            match flights.get_mut(&unit.id) {
                Some(flight) if copy => flight.copies += 1,
                _ => {
                    flights.insert(
                        unit.id,
                        Flight {
                            unit: unit.clone(),
                            since: Instant::now(),
                            copies: 1,
                        },
                    );
                }
            }
        }
    }

    /// Whether `unit` was acknowledged already (through another copy).
    fn is_completed(&self, unit: u64) -> bool {
        self.completed
            .lock()
            .is_ok_and(|completed| completed.contains(&unit))
    }

    /// Endgame: the oldest unacknowledged unit with a single copy out, for an idle stream to
    /// send as well.
    fn pick_duplicate(&self, own: &Mutex<HashMap<u64, UnitTask>>) -> Option<UnitTask> {
        let own: std::collections::HashSet<u64> = own.lock().ok()?.keys().copied().collect();
        let mut flights = self.flights.lock().ok()?;
        let flight = flights
            .values_mut()
            .filter(|flight| flight.copies == 1 && !own.contains(&flight.unit.id))
            .min_by_key(|flight| flight.since)?;
        flight.copies += 1;
        Some(flight.unit.clone())
    }

    /// A copy of `unit` stopped being in flight without an ack (its stream died); true when
    /// it must go back to the queue (no other copy is out).
    fn grounded(&self, unit: &UnitTask) -> bool {
        if self.is_completed(unit.id) {
            return false;
        }
        let Ok(mut flights) = self.flights.lock() else {
            return true;
        };
        match flights.get_mut(&unit.id) {
            Some(flight) if flight.copies > 1 => {
                flight.copies -= 1;
                false
            }
            _ => {
                flights.remove(&unit.id);
                true
            }
        }
    }

    fn on_ack(&self, unit: UnitTask) {
        let first = self
            .completed
            .lock()
            .map_or(true, |mut completed| completed.insert(unit.id));
        if !first {
            // Another copy was acknowledged first; this stream's window freed up all the same.
            self.wake.notify_waiters();
            return;
        }
        if let Ok(mut flights) = self.flights.lock()
            && let Some(flight) = flights.remove(&unit.id)
            && self.queued() == 0
        {
            debug!(
                unit = unit.id,
                secs = flight.since.elapsed().as_secs_f64(),
                copies = flight.copies,
                "endgame: unit acknowledged"
            );
        }
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        let acked = self.counters.units_acked.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut set) = self.acked.lock() {
            for piece in &unit.pieces {
                set.insert(*piece);
            }
        }
        self.bytes_done.fetch_add(unit.bytes, Ordering::Relaxed);
        self.units_done.fetch_add(1, Ordering::Relaxed);
        if self.hooks.abort_after_acks == Some(acked) {
            self.set_fatal(SendError::Aborted);
        }
        if self.hooks.drop_connections_after_acks == Some(acked) {
            self.drop_requested.store(true, Ordering::Relaxed);
        }
        self.report_progress();
        self.wake.notify_waiters();
    }

    fn on_nack(&self, mut unit: UnitTask, file: u32) {
        if !self.grounded(&unit) {
            // Another copy is still out, or one was already acknowledged.
            return;
        }
        self.counters
            .hash_mismatches
            .fetch_add(1, Ordering::Relaxed);
        unit.mismatches += 1;
        let path = self
            .manifest
            .files
            .get(file as usize)
            .map(|entry| entry.path.to_string())
            .unwrap_or_default();
        warn!(unit = unit.id, %path, attempts = unit.mismatches, "the receiver refused a piece (hash mismatch); sending it again");
        if unit.mismatches >= self.max_unit_attempts {
            self.set_fatal(SendError::Verification {
                path,
                attempts: unit.mismatches,
            });
            return;
        }
        self.requeue(unit);
    }
}

/// A unit on the way.
struct Flight {
    unit: UnitTask,
    since: Instant,
    copies: u32,
}

/// A stream slot as the coordinator sees it.
struct Slot {
    inflight: Arc<Mutex<HashMap<u64, UnitTask>>>,
    connected: bool,
    finish: Option<mpsc::UnboundedSender<()>>,
}

enum StreamEvent {
    Connected(usize),
}

/// One session: the coordinator and its streams.
struct SessionRun {
    shared: Arc<Shared>,
    dialer: Dialer,
    session: u64,
    transfer_id: [u8; 32],
    slots: Vec<Option<Slot>>,
    tasks: JoinSet<(usize, Result<(), SendError>)>,
    events_tx: mpsc::UnboundedSender<StreamEvent>,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    controller: Option<StreamController>,
    mode: StreamMode,
    round: Duration,
    /// The round trip measured by the first TCP handshake.
    rtt: Duration,
    rounds: Vec<RoundReport>,
    started: Instant,
    max_streams_used: u32,
    retry: RetryPolicy,
    connect_failures: usize,
    next_connect_at: tokio::time::Instant,
    last_connect_error: Option<SendError>,
    /// Bumped whenever the set of running streams changes; a round spans one epoch.
    epoch: u64,
}

impl SessionRun {
    fn new(
        transfer: &mut Transfer,
        dialer: Dialer,
        session: u64,
        have: PieceSet,
        units: Vec<UnitTask>,
        (round, rtt): (Duration, Duration),
        mode: StreamMode,
    ) -> Self {
        let controller = transfer.controller.take();
        let max = controller.as_ref().map_or(1, StreamController::max_streams) as usize;
        let initial = match mode {
            StreamMode::Single => 1,
            StreamMode::Parallel => controller.as_ref().map_or(1, StreamController::streams),
        };
        let initial = initial
            .min(u32::try_from(units.len()).unwrap_or(u32::MAX))
            .max(1);
        let units_total = transfer
            .plan
            .as_ref()
            .map_or(0, |plan| plan.units.len() as u64);
        let skipped_units = transfer.skipped.map_or(0, |(units, _)| units);
        let have_bytes = have
            .iter()
            .map(|piece| transfer.manifest.piece_len(piece))
            .sum();
        let (events_tx, events) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            manifest: transfer.manifest.clone(),
            local_paths: transfer.local_paths.clone(),
            beneath: transfer.beneath.clone(),
            peer: transfer.peer,
            counters: transfer.counters.clone(),
            sent_before: transfer.sent_before.clone(),
            hooks: transfer.options.hooks.clone(),
            rate: transfer
                .options
                .settings
                .rate_limit_bps
                .map(|bps| Arc::new(TokenBucket::new(bps))),
            idle_timeout: transfer.options.idle_timeout,
            window_units: transfer.options.window_units.max(1),
            window_now: AtomicU32::new(transfer.options.window_units.max(1)),
            max_unit_attempts: transfer.options.max_unit_attempts.max(1),
            outstanding: AtomicU64::new(units.len() as u64),
            queue: Mutex::new(units.into()),
            wake: Notify::new(),
            target: AtomicU32::new(initial),
            delivered: AtomicU64::new(0),
            starved: AtomicBool::new(false),
            fatal: Mutex::new(None),
            finish_reply: Mutex::new(None),
            acked: Mutex::new(have),
            flights: Mutex::new(HashMap::new()),
            completed: Mutex::new(std::collections::HashSet::new()),
            bytes_done: AtomicU64::new(have_bytes),
            units_done: AtomicU64::new(skipped_units),
            units_total,
            drop_requested: AtomicBool::new(false),
            drop_done: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            next_unit_id: AtomicU64::new(transfer.next_unit_id),
            progress: transfer.options.progress.clone(),
            streams_open: AtomicU32::new(0),
            last_rate_bps: Mutex::new(0.0),
        });
        Self {
            shared,
            dialer,
            session,
            transfer_id: transfer.transfer_id,
            slots: (0..max.max(1)).map(|_| None).collect(),
            tasks: JoinSet::new(),
            events_tx,
            events,
            controller,
            mode,
            round,
            rtt,
            rounds: Vec::new(),
            started: transfer.started,
            max_streams_used: 0,
            retry: transfer.options.retry,
            connect_failures: 0,
            next_connect_at: tokio::time::Instant::now(),
            last_connect_error: None,
            epoch: 0,
        }
    }

    /// Runs the opening connection as the control stream in slot 0.
    fn start_control(&mut self, reader: TlsReader, writer: TlsWriter) {
        let inflight = Arc::new(Mutex::new(HashMap::new()));
        let (finish_tx, finish_rx) = mpsc::unbounded_channel();
        self.slots[0] = Some(Slot {
            inflight: inflight.clone(),
            connected: true,
            finish: Some(finish_tx),
        });
        self.shared.streams_open.fetch_add(1, Ordering::Relaxed);
        self.epoch += 1;
        let shared = self.shared.clone();
        self.tasks.spawn(
            async move {
                let result =
                    run_stream(shared.clone(), 0, reader, writer, inflight, Some(finish_rx)).await;
                shared.streams_open.fetch_sub(1, Ordering::Relaxed);
                (0, result)
            }
            .instrument(info_span!("stream", slot = 0)),
        );
    }

    /// Runs connections dialled during the manifest exchange in slots 1, 2, ...
    fn start_predialed(
        &mut self,
        predialed: Vec<tokio::task::JoinHandle<Result<Dialed, SendError>>>,
    ) {
        for (index, task) in predialed.into_iter().enumerate() {
            let slot = index + 1;
            if slot < self.slots.len() && self.slots[slot].is_none() {
                self.open_stream_with(slot, Some(task));
            } else {
                task.abort();
            }
        }
    }

    /// Opens a stream into `slot` in the background.
    fn open_stream(&mut self, slot: usize) {
        self.open_stream_with(slot, None);
    }

    fn open_stream_with(
        &mut self,
        slot: usize,
        predialed: Option<tokio::task::JoinHandle<Result<Dialed, SendError>>>,
    ) {
        let inflight = Arc::new(Mutex::new(HashMap::new()));
        let (finish_tx, finish_rx) = if slot == 0 {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.slots[slot] = Some(Slot {
            inflight: inflight.clone(),
            connected: false,
            finish: finish_tx,
        });
        let shared = self.shared.clone();
        let dialer = self.dialer.clone();
        let events = self.events_tx.clone();
        let intent = Intent::Join {
            transfer_id: self.transfer_id,
            session: self.session,
        };
        self.tasks.spawn(
            async move {
                let Dialed { reader, writer, .. } = match dialer.join(predialed, intent).await {
                    Ok(joined) => joined,
                    Err(error) => return (slot, Err(error)),
                };
                shared.streams_open.fetch_add(1, Ordering::Relaxed);
                let _ = events.send(StreamEvent::Connected(slot));
                let result =
                    run_stream(shared.clone(), slot, reader, writer, inflight, finish_rx).await;
                shared.streams_open.fetch_sub(1, Ordering::Relaxed);
                (slot, result)
            }
            .instrument(info_span!("stream", slot)),
        );
    }

    /// Whether a stream above the target still has units in flight.
    fn draining(&self) -> bool {
        let target = self.shared.target.load(Ordering::Relaxed) as usize;
        self.slots.iter().skip(target).flatten().any(|slot| {
            slot.inflight
                .lock()
                .is_ok_and(|inflight| !inflight.is_empty())
        })
    }

    /// Opens streams into the empty slots below the target, at most one per queued unit.
    fn maintain(&mut self) {
        let target = self.shared.target.load(Ordering::Relaxed) as usize;
        if tokio::time::Instant::now() < self.next_connect_at {
            return;
        }
        let mut open_more = self.shared.queued();
        for slot in 0..target.min(self.slots.len()) {
            if open_more == 0 {
                break;
            }
            if self.slots[slot].is_none() {
                self.open_stream(slot);
                open_more -= 1;
            }
        }
    }

    /// Handles a finished stream task: its unacknowledged units go back to the queue.
    fn reap(&mut self, slot: usize, result: Result<(), SendError>) -> Result<(), SendError> {
        let Some(state) = self.slots.get_mut(slot).and_then(Option::take) else {
            return Ok(());
        };
        self.epoch += 1;
        let orphans: Vec<UnitTask> = state
            .inflight
            .lock()
            .map(|mut inflight| inflight.drain().map(|(_, unit)| unit).collect())
            .unwrap_or_default();
        for unit in orphans {
            if self.shared.grounded(&unit) {
                debug!(unit = unit.id, slot, "unit goes back to the queue");
                self.shared.requeue(unit);
            }
        }
        if slot == 0
            && let Ok(mut reply) = self.shared.finish_reply.lock()
        {
            // Done may have been sent on the stream that died: ask again on a new one.
            reply.take();
        }
        match result {
            Ok(()) => {
                if state.connected {
                    self.connect_failures = 0;
                }
                Ok(())
            }
            Err(
                error @ (SendError::SessionLost(_)
                | SendError::Rejected { .. }
                | SendError::Handshake { .. }
                | SendError::Protocol(_)),
            ) => Err(error),
            Err(error) => {
                if state.connected {
                    info!(slot, %error, "stream ended; its units will be sent again");
                    self.connect_failures = 0;
                    self.next_connect_at = tokio::time::Instant::now();
                } else {
                    self.connect_failures += 1;
                    let delay = self
                        .retry
                        .min_delay
                        .saturating_mul(1 << self.connect_failures.min(16))
                        .min(self.retry.max_delay);
                    self.next_connect_at = tokio::time::Instant::now() + delay;
                    warn!(slot, %error, failures = self.connect_failures, "could not open a stream");
                    if self.connect_failures >= self.retry.attempts {
                        return Err(error);
                    }
                    self.last_connect_error = Some(error);
                }
                Ok(())
            }
        }
    }

    fn abort_all(&mut self) {
        self.tasks.abort_all();
    }

    /// The session's main loop.
    async fn coordinate(&mut self) -> Result<(), SendError> {
        let result = self.coordinate_inner().await;
        if result.is_ok() {
            // Let the streams close their connections properly (TLS close_notify), briefly.
            self.shared.shutdown.store(true, Ordering::Relaxed);
            self.shared.wake.notify_waiters();
            let closing = async { while self.tasks.join_next().await.is_some() {} };
            let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
        }
        self.abort_all();
        // Let aborted tasks finish so their sockets close now, not when the runtime gets to it.
        while self.tasks.join_next().await.is_some() {}
        result
    }

    async fn coordinate_inner(&mut self) -> Result<(), SendError> {
        self.maintain();
        let mut round_started = tokio::time::Instant::now();
        let mut round_bytes = self.shared.delivered.load(Ordering::Relaxed);
        let mut round_epoch = self.epoch;
        self.shared.starved.store(false, Ordering::Relaxed);
        let mut finish: Option<oneshot::Receiver<FinishReply>> = None;
        let mut finish_rounds = 0_u32;
        loop {
            if let Some(error) = self
                .shared
                .fatal
                .lock()
                .ok()
                .and_then(|mut fatal| fatal.take())
            {
                return Err(error);
            }
            if self.shared.drop_requested.load(Ordering::Relaxed)
                && !self.shared.drop_done.swap(true, Ordering::Relaxed)
            {
                warn!("test hook: dropping every connection");
                self.abort_all();
                while self.tasks.join_next().await.is_some() {}
                for slot in 0..self.slots.len() {
                    self.reap(slot, Ok(()))?;
                }
                self.shared.streams_open.store(0, Ordering::Relaxed);
            }
            self.max_streams_used = self
                .max_streams_used
                .max(self.shared.streams_open.load(Ordering::Relaxed));

            // Every unit acknowledged: ask the receiver to finish, on the control stream.
            if self.shared.outstanding.load(Ordering::Relaxed) == 0 && finish.is_none() {
                match self.slots[0].as_ref().and_then(|slot| slot.finish.clone()) {
                    Some(control) => {
                        let (reply_tx, reply_rx) = oneshot::channel();
                        if let Ok(mut reply) = self.shared.finish_reply.lock() {
                            *reply = Some(reply_tx);
                        }
                        if control.send(()).is_ok() {
                            finish = Some(reply_rx);
                        }
                    }
                    None if self.slots[0].is_none()
                        && tokio::time::Instant::now() >= self.next_connect_at =>
                    {
                        self.open_stream(0);
                    }
                    None => {}
                }
            }

            let round_deadline = round_started + self.round;
            let next_connect = self.next_connect_at;
            let wake = self.shared.wake.notified();
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep_until(round_deadline) => {
                    self.end_round(round_started, round_bytes, round_epoch);
                    round_started = tokio::time::Instant::now();
                    round_bytes = self.shared.delivered.load(Ordering::Relaxed);
                    round_epoch = self.epoch;
                    self.shared.starved.store(false, Ordering::Relaxed);
                }
                _ = tokio::time::sleep_until(next_connect), if next_connect > tokio::time::Instant::now() => {}
                Some(event) = self.events.recv() => match event {
                    StreamEvent::Connected(slot) => {
                        if let Some(state) = self.slots.get_mut(slot).and_then(Option::as_mut) {
                            state.connected = true;
                        }
                        self.epoch += 1;
                    }
                },
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    let (slot, result) = match joined {
                        Ok(pair) => pair,
                        Err(error) => return Err(SendError::Internal(error.to_string())),
                    };
                    if slot == 0
                        && let Some(mut pending) = finish.take()
                    {
                        // The receiver closes the control connection right after answering
                        // Done, so the answer may already be waiting when the stream ends.
                        if let Ok(reply) = pending.try_recv()
                            && self.on_finish_reply(reply, &mut finish_rounds)?
                        {
                            return Ok(());
                        }
                    }
                    self.reap(slot, result)?;
                }
                reply = async { match finish.as_mut() { Some(rx) => rx.await, None => std::future::pending().await } } => {
                    finish = None;
                    if let Ok(reply) = reply
                        && self.on_finish_reply(reply, &mut finish_rounds)?
                    {
                        return Ok(());
                    }
                }
            }
            self.maintain();
            if self.draining() {
                // Streams the controller retired still finish their units; their bytes would
                // be credited to the new, smaller count. The round starts once they are idle.
                round_epoch = u64::MAX;
            }
            if self.epoch != round_epoch {
                // The set of streams changed: a round only counts at a steady count.
                round_started = tokio::time::Instant::now();
                round_bytes = self.shared.delivered.load(Ordering::Relaxed);
                round_epoch = self.epoch;
                self.shared.starved.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Handles the answer to `Done`; true when the transfer is complete.
    fn on_finish_reply(
        &mut self,
        reply: FinishReply,
        finish_rounds: &mut u32,
    ) -> Result<bool, SendError> {
        match reply {
            FinishReply::Complete => {
                info!("the receiver has every file in place");
                Ok(true)
            }
            FinishReply::Missing(ranges) => {
                *finish_rounds += 1;
                let mut missing = PieceSet::empty(self.shared.manifest.piece_count());
                if !missing.insert_wire_ranges(&ranges) {
                    return Err(SendError::Protocol(
                        "Missing names pieces that do not exist".into(),
                    ));
                }
                if *finish_rounds >= MAX_FINISH_ROUNDS {
                    return Err(SendError::Incomplete(missing.count()));
                }
                warn!(
                    pieces = missing.count(),
                    "the receiver misses pieces at finish; sending them again"
                );
                self.requeue_missing(&missing);
                Ok(false)
            }
        }
    }

    fn requeue_missing(&mut self, missing: &PieceSet) {
        let manifest = self.shared.manifest.clone();
        let mut small: Vec<usize> = Vec::new();
        let mut units = Vec::new();
        for piece in missing.iter() {
            let Some(location) = manifest.locate(piece) else {
                continue;
            };
            if location.chunked {
                units.push((
                    UnitBody::Chunk {
                        file: u32::try_from(location.file).unwrap_or(u32::MAX),
                        index: u32::try_from(location.chunk).unwrap_or(u32::MAX),
                    },
                    vec![piece],
                    location.len,
                ));
            } else {
                small.push(location.file);
            }
        }
        // Pack the small files again, up to a chunk's worth each.
        let mut group: Vec<usize> = Vec::new();
        let mut group_bytes = 0;
        let flush = |group: &mut Vec<usize>, group_bytes: &mut u64, units: &mut Vec<_>| {
            if group.is_empty() {
                return;
            }
            units.push((
                UnitBody::Pack {
                    files: group
                        .iter()
                        .map(|&f| u32::try_from(f).unwrap_or(u32::MAX))
                        .collect(),
                },
                group.iter().map(|&f| manifest.pieces_of(f).start).collect(),
                *group_bytes,
            ));
            group.clear();
            *group_bytes = 0;
        };
        for file in small {
            let size = manifest.files[file].size;
            if !group.is_empty()
                && (group_bytes + size > manifest.chunk_size || group.len() >= MAX_PACK_FILES)
            {
                flush(&mut group, &mut group_bytes, &mut units);
            }
            group.push(file);
            group_bytes += size;
        }
        flush(&mut group, &mut group_bytes, &mut units);
        for (body, pieces, bytes) in units {
            self.shared.outstanding.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut acked) = self.shared.acked.lock() {
                for piece in &pieces {
                    acked.remove(*piece);
                }
            }
            self.shared.requeue(UnitTask {
                id: self.shared.next_unit_id.fetch_add(1, Ordering::Relaxed),
                body,
                pieces,
                bytes,
                mismatches: 0,
            });
        }
    }

    /// Sets how many units a stream may owe, from its share of the delivered rate.
    ///
    /// Units a stream owes sit in its socket buffer or in flight, and leave in order. Owing
    /// more than its rate needs only queues them behind each other: a loss-bound stream on a
    /// long link (5 Mbit/s of 190 over 37 streams at 70 ms) then holds a second or more of
    /// units that other streams, idle at the end, cannot take. Enough to keep a stream busy
    /// is its share of two round trips (data in flight, and the acknowledgement coming back)
    /// plus the unit being written; the share at least doubles within a round if the stream
    /// can go faster, so the window never holds the rate down for long.
    fn resize_window(&self, stream_bps: f64) {
        let chunk = self.shared.manifest.chunk_size.max(1) as f64;
        let owed_bytes = stream_bps / 8.0 * 2.0 * self.rtt.as_secs_f64();
        let units = (owed_bytes / chunk).ceil() + 1.0;
        let window = if units.is_finite() {
            (units as u32).clamp(
                MIN_WINDOW_UNITS,
                self.shared.window_units.max(MIN_WINDOW_UNITS),
            )
        } else {
            self.shared.window_units
        };
        let previous = self.shared.window_now.swap(window, Ordering::Relaxed);
        if window != previous {
            debug!(window, previous, stream_bps, "units a stream may owe");
            self.shared.wake.notify_waiters();
        }
    }

    /// Closes a round: records it, and in parallel mode lets the controller pick the next
    /// stream count when the round was clean.
    fn end_round(
        &mut self,
        started: tokio::time::Instant,
        bytes_at_start: u64,
        epoch_at_start: u64,
    ) {
        let elapsed = started.elapsed();
        let bytes = self
            .shared
            .delivered
            .load(Ordering::Relaxed)
            .saturating_sub(bytes_at_start);
        let target = self.shared.target.load(Ordering::Relaxed);
        let streams = self
            .slots
            .iter()
            .take(target as usize)
            .filter(|slot| slot.as_ref().is_some_and(|slot| slot.connected))
            .count() as u32;
        let bps = bytes as f64 * 8.0 / elapsed.as_secs_f64().max(1e-9);
        if let Ok(mut rate) = self.shared.last_rate_bps.lock() {
            *rate = bps;
        }
        let clean = epoch_at_start == self.epoch
            && !self.shared.starved.load(Ordering::Relaxed)
            && streams == target;
        if clean && streams > 0 && bytes > 0 {
            self.resize_window(bps / f64::from(streams));
        }
        let mut next = target;
        // A new count is measured for a round, undone in the next if it was worse, and only
        // pays back in the rounds after that. When the rest of the transfer takes fewer rounds
        // than that at the current rate, a step (a trim to fewer streams above all) can only
        // cost time: the count stays as it is to the end.
        let remaining_bits =
            self.shared
                .manifest
                .total_bytes()
                .saturating_sub(self.shared.bytes_done.load(Ordering::Relaxed)) as f64
                * 8.0;
        let final_stretch = remaining_bits / bps.max(1.0)
            < elapsed.as_secs_f64() * f64::from(ROUNDS_FOR_A_CHANGE_TO_PAY);
        if final_stretch && clean {
            debug!(
                streams,
                remaining_secs = remaining_bits / bps.max(1.0),
                "final stretch: the stream count stays"
            );
        }
        if clean
            && !final_stretch
            && self.mode == StreamMode::Parallel
            && let Some(controller) = self.controller.as_mut()
        {
            next = controller.observe(RoundSample {
                streams,
                bytes,
                elapsed,
            });
            let queued = u32::try_from(self.shared.queued()).unwrap_or(u32::MAX);
            // No point opening streams that would find nothing to send.
            let next_target = next.min(streams + queued).max(1);
            let previous = self.shared.target.swap(next_target, Ordering::Relaxed);
            if next_target != previous {
                self.epoch += 1;
                self.shared.wake.notify_waiters();
            }
        }
        if !clean {
            debug!(
                streams,
                target,
                epoch_changed = epoch_at_start != self.epoch,
                starved = self.shared.starved.load(Ordering::Relaxed),
                "round not used"
            );
        }
        if clean {
            let at_secs = self.started.elapsed().as_secs_f64();
            debug!(streams, bytes, bps, next, "round");
            self.rounds.push(RoundReport {
                at_secs,
                streams,
                bytes,
                secs: elapsed.as_secs_f64(),
                bps,
                next_streams: next,
            });
        }
        self.shared.report_progress();
    }
}

/// One stream: sends units from the queue and handles the receiver's answers, until it is
/// retired, runs out of work, or fails.
async fn run_stream(
    shared: Arc<Shared>,
    slot: usize,
    mut reader: TlsReader,
    mut writer: TlsWriter,
    inflight: Arc<Mutex<HashMap<u64, UnitTask>>>,
    finish: Option<mpsc::UnboundedReceiver<()>>,
) -> Result<(), SendError> {
    let window = Arc::new(tokio::sync::Semaphore::new(shared.window_units as usize));
    let closing = Arc::new(AtomicBool::new(false));
    let control = finish.is_some();
    let mut abandoned = false;
    let result = {
        let reading = read_loop(&shared, &mut reader, &inflight, &window, &closing, control);
        let writing = write_loop(&shared, slot, &mut writer, &inflight, &window, finish);
        tokio::pin!(reading, writing);
        let mut writing_done = false;
        loop {
            tokio::select! {
                read = &mut reading => break read,
                written = &mut writing, if !writing_done => {
                    match written {
                        Err(error) => break Err(error),
                        Ok(WriteEnd::Abandoned) => {
                            abandoned = true;
                            break Ok(());
                        }
                        Ok(WriteEnd::Finished) => {}
                    }
                    writing_done = true;
                    closing.store(true, Ordering::Relaxed);
                    let owes = inflight.lock().is_ok_and(|inflight| !inflight.is_empty());
                    if !owes {
                        break Ok(());
                    }
                    if shared.shutdown.load(Ordering::Relaxed) {
                        // The session is complete: what this stream still owes are copies of
                        // acknowledged units, not worth delivering.
                        abandoned = true;
                        break Ok(());
                    }
                }
            }
        }
    };
    // A unit cut off in the middle leaves the stream unusable, and bytes of units nobody
    // needs any more would still use the link: reset the connection, which discards them,
    // instead of flushing them behind a close_notify.
    if abandoned {
        let stream = reader.into_inner().unsplit(writer.into_inner());
        crate::conn::reset(stream.into_inner().0);
    } else if result.is_ok() {
        let _ = writer.shutdown().await;
    }
    result
}

/// How a stream's writing ended without an error.
enum WriteEnd {
    /// Between units: the connection can be closed properly.
    Finished,
    /// In the middle of a unit that no longer needs sending.
    Abandoned,
}

/// Resolves when the unit being written on this stream is no longer needed: the session is
/// over, or (on a data stream) every unit the stream still owes was acknowledged through
/// another copy. Those bytes would only compete with the units still missing at the very end.
async fn superseded(shared: &Shared, inflight: &Mutex<HashMap<u64, UnitTask>>, control: bool) {
    loop {
        let wake = shared.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        if shared.shutdown.load(Ordering::Relaxed) {
            return;
        }
        // The control stream is never cut: it carries `Done`, and it takes no copies.
        let owes_only_copies_done = !control
            && inflight.lock().is_ok_and(|inflight| {
                !inflight.is_empty() && inflight.keys().all(|unit| shared.is_completed(*unit))
            });
        if owes_only_copies_done {
            return;
        }
        wake.await;
    }
}

async fn read_loop(
    shared: &Shared,
    reader: &mut TlsReader,
    inflight: &Mutex<HashMap<u64, UnitTask>>,
    window: &tokio::sync::Semaphore,
    closing: &AtomicBool,
    control: bool,
) -> Result<(), SendError> {
    let peer = shared.peer;
    let mut last_received = 0_u64;
    let mut missing: Vec<PieceRange> = Vec::new();
    let mut answered = false;
    loop {
        let frame = match tokio::time::timeout(shared.idle_timeout, reader.next()).await {
            Err(_) => {
                let idle = inflight.lock().map_or(true, |inflight| inflight.is_empty());
                if idle {
                    // Nothing is owed on this stream, so a quiet peer is expected. (A frame
                    // cut by the timeout cannot be pending: the receiver only sends while
                    // units are in flight, or in answer to Done.)
                    continue;
                }
                return Err(SendError::Stream {
                    peer,
                    source: ConnError::Timeout(shared.idle_timeout, "an acknowledgement"),
                });
            }
            Ok(Ok(Some((frame, _)))) => frame,
            Ok(Ok(None)) => {
                return if inflight.lock().map_or(true, |inflight| inflight.is_empty())
                    && (closing.load(Ordering::Relaxed) || answered)
                {
                    Ok(())
                } else {
                    Err(SendError::Stream {
                        peer,
                        source: ConnError::Truncated,
                    })
                };
            }
            Ok(Err(source)) => return Err(SendError::Stream { peer, source }),
        };
        match frame {
            Frame::Ack { unit } => {
                let acked = inflight
                    .lock()
                    .ok()
                    .and_then(|mut inflight| inflight.remove(&unit));
                if let Some(task) = acked {
                    window.add_permits(1);
                    shared.on_ack(task);
                }
            }
            Frame::Nack { unit, file } => {
                let refused = inflight
                    .lock()
                    .ok()
                    .and_then(|mut inflight| inflight.remove(&unit));
                if let Some(task) = refused {
                    window.add_permits(1);
                    shared.on_nack(task, file);
                }
            }
            Frame::Welcome(welcome) if welcome.version == PROTOCOL_VERSION => {}
            Frame::Received { bytes } => {
                let delta = bytes.saturating_sub(last_received);
                last_received = last_received.max(bytes);
                shared.delivered.fetch_add(delta, Ordering::Relaxed);
            }
            Frame::Complete { .. } if control => {
                answered = true;
                if let Some(reply) = shared
                    .finish_reply
                    .lock()
                    .ok()
                    .and_then(|mut reply| reply.take())
                {
                    let _ = reply.send(FinishReply::Complete);
                }
            }
            Frame::Missing { ranges, last } if control => {
                missing.extend(ranges);
                if last {
                    // The receiver closes the connection after its answer: an expected end.
                    answered = true;
                    let ranges = std::mem::take(&mut missing);
                    if let Some(reply) = shared
                        .finish_reply
                        .lock()
                        .ok()
                        .and_then(|mut reply| reply.take())
                    {
                        let _ = reply.send(FinishReply::Missing(ranges));
                    }
                }
            }
            Frame::Error {
                code: ErrorCode::UnknownSession | ErrorCode::Superseded,
                message,
            } => return Err(SendError::SessionLost(message)),
            Frame::Error { code, message } => return Err(SendError::Rejected { code, message }),
            other => {
                return Err(SendError::Protocol(format!(
                    "unexpected {} frame from the receiver",
                    other.kind()
                )));
            }
        }
        if closing.load(Ordering::Relaxed)
            && inflight.lock().map_or(true, |inflight| inflight.is_empty())
        {
            return Ok(());
        }
    }
}

async fn write_loop(
    shared: &Shared,
    slot: usize,
    writer: &mut TlsWriter,
    inflight: &Mutex<HashMap<u64, UnitTask>>,
    window: &tokio::sync::Semaphore,
    mut finish: Option<mpsc::UnboundedReceiver<()>>,
) -> Result<WriteEnd, SendError> {
    let mut buffer = vec![0_u8; READ_BLOCK];
    let mut done_sent = false;
    let control = finish.is_some();
    loop {
        let wake = shared.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        if shared.shutdown.load(Ordering::Relaxed) {
            return Ok(WriteEnd::Finished);
        }
        if done_sent {
            // `Done` is the last frame the receiver reads on a connection: it answers and
            // closes. A unit queued after it (the pieces of a `Missing` answer) would be lost
            // with the connection and counted as one more resend, so it goes on a new one.
            wake.await;
            continue;
        }
        let owes = inflight.lock().is_ok_and(|inflight| !inflight.is_empty());
        // Above the controller's count: park on the open connection, so a later increase
        // reuses it instead of opening another. In the endgame (fewer units queued than
        // streams), leave the last units to streams that are free now rather than queue one
        // behind this stream's unacknowledged data.
        if slot as u32 >= shared.target.load(Ordering::Relaxed) || (shared.endgame() && owes) {
            match idle(shared, writer, wake, finish.as_mut()).await? {
                Idled::Woken => {}
                Idled::DoneSent => done_sent = true,
                Idled::Close => return Ok(WriteEnd::Finished),
            }
            continue;
        }
        let owed = inflight.lock().map_or(0, |inflight| inflight.len());
        if owed >= shared.window_now.load(Ordering::Relaxed) as usize {
            // Wait for an acknowledgement (every one wakes the streams).
            match idle(shared, writer, wake, finish.as_mut()).await? {
                Idled::Woken => {}
                Idled::DoneSent => done_sent = true,
                Idled::Close => return Ok(WriteEnd::Finished),
            }
            continue;
        }
        let permit = window
            .acquire()
            .await
            .map_err(|_| SendError::Internal("window closed".into()))?;
        let taken = match shared.take() {
            Some(unit) => Some((unit, false)),
            // Not on the control stream, which must stay free to send `Done` at once.
            None if !owes && !control => shared.pick_duplicate(inflight).map(|unit| (unit, true)),
            None => None,
        };
        let Some((unit, copy)) = taken else {
            drop(permit);
            // Nothing to send now; work may come back (a dropped stream's units, a Nack).
            match idle(shared, writer, wake, finish.as_mut()).await? {
                Idled::Woken => {}
                Idled::DoneSent => done_sent = true,
                Idled::Close => return Ok(WriteEnd::Finished),
            }
            continue;
        };
        permit.forget();
        if let Ok(mut inflight) = inflight.lock() {
            inflight.insert(unit.id, unit.clone());
        }
        if copy {
            debug!(
                unit = unit.id,
                slot, "endgame: sending a copy of a slow unit"
            );
        } else {
            shared.fly(&unit, false);
        }
        tokio::select! {
            sent = send_unit(shared, writer, &unit, copy, &mut buffer) => sent?,
            () = superseded(shared, inflight, control) => {
                shared.counters.units_abandoned.fetch_add(1, Ordering::Relaxed);
                debug!(unit = unit.id, slot, "the unit being sent was acknowledged through another copy (or the session ended): dropping this stream");
                return Ok(WriteEnd::Abandoned);
            }
        }
    }
}

/// How an idle stream's wait ended.
enum Idled {
    /// Something changed: look for work again.
    Woken,
    /// The control stream sent `Done`: it carries no more units.
    DoneSent,
    /// The coordinator is gone: close the stream.
    Close,
}

/// Waits for something to change. The control stream also answers the coordinator's request
/// to finish by sending `Done`.
async fn idle(
    shared: &Shared,
    writer: &mut TlsWriter,
    wake: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    finish: Option<&mut mpsc::UnboundedReceiver<()>>,
) -> Result<Idled, SendError> {
    let peer = shared.peer;
    let Some(commands) = finish else {
        wake.await;
        return Ok(Idled::Woken);
    };
    tokio::select! {
        _ = wake => Ok(Idled::Woken),
        command = commands.recv() => {
            if command.is_none() {
                return Ok(Idled::Close);
            }
            writer.send(&Frame::Done).await.map_err(|source| SendError::Stream { peer, source })?;
            writer.flush().await.map_err(|source| SendError::Stream { peer, source })?;
            Ok(Idled::DoneSent)
        }
    }
}

/// Writes one unit: its header and its pieces' bytes, read from the source files.
async fn send_unit(
    shared: &Shared,
    writer: &mut TlsWriter,
    unit: &UnitTask,
    copy: bool,
    buffer: &mut Vec<u8>,
) -> Result<(), SendError> {
    let peer = shared.peer;
    let stream_error = |source| SendError::Stream { peer, source };
    let send_number = shared
        .counters
        .sends_started
        .fetch_add(1, Ordering::Relaxed);
    let mut corrupt = shared.hooks.corrupt_sends.contains(&send_number);
    let resend = shared
        .sent_before
        .lock()
        .map(|mut sent| {
            let mut before = false;
            for piece in &unit.pieces {
                before |= !sent.insert(*piece);
            }
            before
        })
        .unwrap_or(false);
    shared.counters.units_sent.fetch_add(1, Ordering::Relaxed);
    if copy {
        shared
            .counters
            .units_duplicated
            .fetch_add(1, Ordering::Relaxed);
    } else if resend {
        shared.counters.units_resent.fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .bytes_resent
            .fetch_add(unit.bytes, Ordering::Relaxed);
    }
    writer
        .send(&Frame::UnitStart(UnitStart {
            unit: unit.id,
            body: unit.body.clone(),
        }))
        .await
        .map_err(stream_error)?;
    for &piece in &unit.pieces {
        let Some(location) = shared.manifest.locate(piece) else {
            return Err(SendError::Internal(format!("piece {piece} out of range")));
        };
        let path = shared.local_paths[location.file].clone();
        let mut offset = location.offset;
        let end = location.offset + location.len;
        let mut file: Option<Arc<std::fs::File>> = None;
        while offset < end {
            let want = usize::try_from((end - offset).min(READ_BLOCK as u64)).unwrap_or(READ_BLOCK);
            let mut block = std::mem::take(buffer);
            block.resize(want, 0);
            let opened = file.clone();
            let read_path = path.clone();
            let beneath = shared.beneath.clone();
            let (block, opened) = tokio::task::spawn_blocking(move || {
                let opened = match (opened, beneath) {
                    (Some(opened), _) => opened,
                    (None, Some(root)) => Arc::new(crate::beneath::open_file(&*root, &read_path)?),
                    (None, None) => Arc::new(std::fs::File::open(&read_path)?),
                };
                opened.read_exact_at(&mut block, offset)?;
                Ok::<_, std::io::Error>((block, opened))
            })
            .await
            .map_err(|error| SendError::Internal(error.to_string()))?
            .map_err(|source| SendError::Source {
                path: path.clone(),
                source,
            })?;
            file = Some(opened);
            let mut block = block;
            if corrupt && !block.is_empty() {
                block[0] ^= 0x5a;
                corrupt = false;
                warn!(
                    unit = unit.id,
                    "test hook: corrupted a byte after reading it"
                );
            }
            for frame in block.chunks(MAX_DATA_PAYLOAD) {
                if let Some(rate) = &shared.rate {
                    rate.take(frame.len()).await;
                }
                writer.send_data(frame).await.map_err(stream_error)?;
                shared
                    .counters
                    .bytes_sent
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
                if copy {
                    shared
                        .counters
                        .bytes_duplicated
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
            }
            offset += block.len() as u64;
            *buffer = block;
        }
    }
    writer.flush().await.map_err(stream_error)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use automigrate_core::transfer::{
        FileSpec, LinkEstimate, StreamMode, TransferSettings, TransferStrategy, plan_transfer,
    };

    use super::measured_single_stream;

    fn files(count: usize, size: u64) -> Vec<FileSpec> {
        (0..count)
            .map(|index| FileSpec {
                path: format!("f{index}"),
                size,
            })
            .collect()
    }

    /// What `send` assumes without an estimate: the handshake RTT, no loss, unknown bandwidth.
    fn blind(rtt_ms: u64) -> LinkEstimate {
        LinkEstimate {
            rtt: Duration::from_millis(rtt_ms),
            bandwidth_bps: None,
            loss: 0.0,
        }
    }

    fn settings(strategy: TransferStrategy, max_streams: u32) -> TransferSettings {
        TransferSettings {
            strategy,
            max_streams,
            chunk_size: 256 * 1024,
            rate_limit_bps: None,
        }
    }

    #[test]
    fn a_blind_single_stream_plan_lets_the_controller_climb() {
        let settings = settings(TransferStrategy::Auto, 64);
        let plan = plan_transfer(&files(4, 64 << 20), &blind(10), &settings).unwrap();
        assert_eq!(plan.mode, StreamMode::Single, "the model's verdict changed");
        let plan = measured_single_stream(plan, &settings);
        assert_eq!(plan.mode, StreamMode::Parallel);
        assert_eq!(plan.initial_streams, 1);
        assert_eq!(plan.max_streams, 64);
        assert!(
            plan.rationale.contains("Starting on one stream"),
            "{}",
            plan.rationale
        );
    }

    #[test]
    fn the_ceiling_is_the_unit_count_when_there_are_fewer_units() {
        let settings = settings(TransferStrategy::Auto, 64);
        let plan = plan_transfer(&files(3, 256 * 1024), &blind(10), &settings).unwrap();
        let plan = measured_single_stream(plan, &settings);
        assert_eq!(plan.max_streams, 3);
    }

    #[test]
    fn a_configured_single_stream_and_a_single_unit_stay_single() {
        let single = settings(TransferStrategy::Single, 64);
        let plan = plan_transfer(&files(4, 64 << 20), &blind(70), &single).unwrap();
        let plan = measured_single_stream(plan, &single);
        assert_eq!((plan.mode, plan.max_streams), (StreamMode::Single, 1));

        let auto = settings(TransferStrategy::Auto, 64);
        let plan = plan_transfer(&files(1, 1000), &blind(10), &auto).unwrap();
        let plan = measured_single_stream(plan, &auto);
        assert_eq!((plan.mode, plan.max_streams), (StreamMode::Single, 1));

        let one = settings(TransferStrategy::Auto, 1);
        let plan = plan_transfer(&files(4, 64 << 20), &blind(10), &one).unwrap();
        let plan = measured_single_stream(plan, &one);
        assert_eq!((plan.mode, plan.max_streams), (StreamMode::Single, 1));
    }
}
