//! The receiving agent: accepts authenticated connections, verifies every piece against the
//! manifest before writing it, journals what is durable, and moves files into place only when
//! complete and verified.
//!
//! Data model:
//! - A *session* is one transfer id being received. The first connection opens it with the
//!   manifest; more connections join it by id and session number. An `Open` of an id that
//!   already has a session supersedes it (the old one is cancelled and committed first), which
//!   is how a restarted sender takes over.
//! - Staging: `<root>/.automigrate-staging/<id hex>/` holds `f<index>` per file being received
//!   and the [`Journal`]. Staging names are derived from indexes, never from peer paths.
//! - Each connection reads a unit's pieces into memory (bounded by a receiver-wide budget),
//!   hashes them as they arrive, and writes a piece only if its hash matches the manifest: a
//!   corrupted piece is never written anywhere, it is refused with `Nack` and sent again.
//! - A per-session *committer* task batches durability: it syncs written staging files,
//!   reads each new piece back and checks its hash, checks every other piece of a completed
//!   file the same way (pieces trusted from the journal after a resume included), moves
//!   complete files into place (`renameat` after walking the parents without following
//!   links), syncs the directories, and only then appends to the journal. Acks may precede
//!   the commit (the sender learns of lost work from `Have` when it reconnects), unless
//!   `durable_acks` is set.
//! - Every path was checked twice before anything is written: by name when the manifest
//!   arrives ([`crate::paths::RelPath`]), and against the filesystem (no symlink or file on the
//!   way) before the session starts, and again when each file is moved into place.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::conn::{ConnError, FrameReader, FrameWriter};
use crate::journal::{Journal, JournalError, Record};
use crate::manifest::{Manifest, ManifestAssembler, ManifestError, ManifestLimits};
use crate::paths::{Dir, Existing, PathError, RelPath, STAGING_DIR};
use crate::pieceset::PieceSet;
use crate::tls::TlsConfig;
use crate::wire::{
    ErrorCode, Frame, Hash, Intent, MAX_RANGES_PER_FRAME, PROTOCOL_VERSION, UnitBody, UnitStart,
    Welcome,
};

/// Bytes of memory a permit of the receive budget stands for.
const PERMIT_BYTES: u64 = 64 * 1024;
/// Send a `Received` progress frame after this many new data bytes on a connection. The
/// sender's controller compares rounds 5 % apart; with 40 streams a 1 s round at 200 Mbit/s
/// is then measured to about ±1.5 % (each stream's count is at most this much behind).
const RECEIVED_EVERY: u64 = 16 * 1024;
/// Units a connection may have verified but not yet written; more and it stops reading, which
/// pushes back on the sender through TCP.
const WRITES_IN_FLIGHT: u32 = 2;
/// Lock shards that order writes to a file against moving it into place.
const FILE_LOCK_SHARDS: usize = 64;

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The destination root could not be opened.
    #[error("destination: {0}")]
    Root(#[source] PathError),
    /// Accepting connections failed for good.
    #[error("accepting connections: {0}")]
    Accept(#[source] std::io::Error),
    /// A connection failed (reported per connection, never fatal to the receiver).
    #[error("{0}")]
    Conn(#[from] ConnError),
    /// The peer broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer's manifest was refused.
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    /// A path was refused or a confined operation failed.
    #[error("{0}")]
    Path(#[from] PathError),
    /// The journal failed.
    #[error("{0}")]
    Journal(#[from] JournalError),
    /// Writing or reading staging data failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// Which file (relative to the destination).
        path: String,
        /// The reason.
        source: std::io::Error,
    },
    /// The peer reported an error.
    #[error("the sender reported {code}: {message}")]
    Peer {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The session was replaced or shut down.
    #[error("the session was superseded by a newer connection for the same transfer")]
    Superseded,
    /// A background task died.
    #[error("internal: {0}")]
    Internal(String),
}

impl ReceiveError {
    /// The code to tell the peer.
    fn code(&self) -> ErrorCode {
        match self {
            Self::Protocol(_) | Self::Conn(ConnError::Wire(_)) => ErrorCode::Protocol,
            Self::Manifest(ManifestError::TooLarge { .. }) => ErrorCode::LimitExceeded,
            Self::Manifest(ManifestError::Path(_) | ManifestError::Conflict(_)) | Self::Path(_) => {
                ErrorCode::PathRejected
            }
            Self::Manifest(_) => ErrorCode::Protocol,
            Self::Superseded => ErrorCode::Superseded,
            other if out_of_space(other) => ErrorCode::NoSpace,
            _ => ErrorCode::Io,
        }
    }
}

/// Whether an I/O error in `error`'s chain says the disk is full or the quota spent.
fn out_of_space(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        {
            return true;
        }
        current = error.source();
    }
    false
}

/// How the receiver behaves.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Every received path lands under this directory.
    pub dest_root: PathBuf,
    /// Limits on a peer's manifest.
    pub manifest_limits: ManifestLimits,
    /// Most connections in one session.
    pub max_streams_per_session: u32,
    /// Bytes of received-but-unwritten data the receiver holds at most, over all connections.
    /// At least the largest chunk size (64 MiB) so any single piece fits.
    pub memory_budget: u64,
    /// Commit (sync, move into place, journal) at least this often while data arrives.
    pub commit_interval: Duration,
    /// Also commit once this many pieces are waiting.
    pub commit_every_pieces: usize,
    /// Acknowledge a unit only once it is journaled. Slower; what was acknowledged then
    /// survives a crash of the receiver, which tests rely on.
    pub durable_acks: bool,
    /// Time for the TLS handshake and the `Hello`.
    pub handshake_timeout: Duration,
    /// A connection with nothing to read for this long is closed.
    pub idle_timeout: Duration,
    /// A session whose connections are all gone is committed and dropped after this long
    /// (its journal stays, so the transfer can still resume later).
    pub session_linger: Duration,
    /// Congestion control for accepted sockets (the ack direction), e.g. `cubic`.
    pub congestion_control: Option<String>,
    /// Fault injection for tests only: flip a byte on disk right after writing these pieces
    /// (first write only), as a failing disk would; the read-back check must catch it.
    #[doc(hidden)]
    pub damage_after_write: Vec<u64>,
}

impl ReceiverConfig {
    /// Defaults for `dest_root`.
    pub fn new(dest_root: impl Into<PathBuf>) -> Self {
        Self {
            dest_root: dest_root.into(),
            manifest_limits: ManifestLimits::default(),
            max_streams_per_session: 128,
            memory_budget: 256 << 20,
            commit_interval: Duration::from_secs(1),
            commit_every_pieces: 256,
            durable_acks: false,
            handshake_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(300),
            session_linger: Duration::from_secs(120),
            congestion_control: None,
            damage_after_write: Vec::new(),
        }
    }
}

/// Counters since the receiver was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceiverStats {
    /// TCP connections accepted (before TLS).
    pub connections_accepted: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections that failed the TLS handshake (no or untrusted certificate, wrong ALPN).
    pub tls_rejected: u64,
    /// Sessions opened.
    pub sessions_opened: u64,
    /// Sessions completed (every file in place).
    pub sessions_completed: u64,
    /// Units verified and written.
    pub units_written: u64,
    /// Pieces refused because their hash did not match.
    pub pieces_rejected: u64,
    /// Bytes written to staging files.
    pub bytes_written: u64,
    /// Files moved into place.
    pub files_completed: u64,
    /// Bytes read back and hashed again right before their file was moved into place: pieces
    /// checked in an earlier commit or trusted from the journal of an earlier session (the
    /// cost of whole-file verification beyond the read-back of each new piece).
    pub bytes_rechecked: u64,
    /// Pieces whose bytes in staging did not match their hash when read back (a disk that
    /// lost or changed them); each is sent again.
    pub pieces_damaged_on_disk: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections_accepted: AtomicU64,
    connections_open: AtomicU64,
    tls_rejected: AtomicU64,
    sessions_opened: AtomicU64,
    sessions_completed: AtomicU64,
    units_written: AtomicU64,
    pieces_rejected: AtomicU64,
    bytes_written: AtomicU64,
    files_completed: AtomicU64,
    bytes_rechecked: AtomicU64,
    pieces_damaged_on_disk: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ReceiverStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ReceiverStats {
            connections_accepted: get(&self.connections_accepted),
            connections_open: self.connections_open.load(Ordering::Acquire),
            tls_rejected: get(&self.tls_rejected),
            sessions_opened: get(&self.sessions_opened),
            sessions_completed: get(&self.sessions_completed),
            units_written: get(&self.units_written),
            pieces_rejected: get(&self.pieces_rejected),
            bytes_written: get(&self.bytes_written),
            files_completed: get(&self.files_completed),
            bytes_rechecked: get(&self.bytes_rechecked),
            pieces_damaged_on_disk: get(&self.pieces_damaged_on_disk),
        }
    }
}

/// Counts a connection as open until dropped, however its task ends.
struct OpenConnection(Arc<Inner>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .counters
            .connections_open
            // Release, paired with the Acquire in `Counters::snapshot`: a snapshot that sees
            // this connection closed also sees every counter it bumped (its TLS refusal, say).
            .fetch_sub(1, Ordering::Release);
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A receiving agent. Cheap to clone; clones share sessions and counters.
#[derive(Clone, Debug)]
pub struct Receiver {
    inner: Arc<Inner>,
}

struct Inner {
    config: ReceiverConfig,
    root: Dir,
    acceptor: tokio_rustls::TlsAcceptor,
    sessions: tokio::sync::Mutex<HashMap<Hash, Arc<Session>>>,
    memory: Arc<Semaphore>,
    counters: Counters,
    next_session: AtomicU64,
    /// Pieces the test hook has damaged already.
    damaged: Mutex<std::collections::HashSet<u64>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("dest_root", &self.config.dest_root)
            .field("stats", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// A receiver writing under `config.dest_root`, authenticating peers with `tls`.
    pub fn new(config: ReceiverConfig, tls: &TlsConfig) -> Result<Self, ReceiveError> {
        let root = Dir::open_root(&config.dest_root).map_err(ReceiveError::Root)?;
        let permits = config
            .memory_budget
            .max(crate::manifest::MAX_CHUNK_SIZE)
            .div_ceil(PERMIT_BYTES);
        let permits = usize::try_from(permits).unwrap_or(Semaphore::MAX_PERMITS);
        // Session numbers only need to differ between sessions of one receiver and from a
        // previous run of it; the clock's nanoseconds make a restarted receiver's numbers new.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1);
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                acceptor: tls.acceptor(),
                sessions: tokio::sync::Mutex::new(HashMap::new()),
                memory: Arc::new(Semaphore::new(permits.min(Semaphore::MAX_PERMITS))),
                counters: Counters::default(),
                next_session: AtomicU64::new(seed),
                damaged: Mutex::new(std::collections::HashSet::new()),
                config,
            }),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> ReceiverStats {
        self.inner.counters.snapshot()
    }

    /// Accepts connections until the future is dropped (which stops every connection and
    /// session task of this call, like a killed agent) or accepting fails for good.
    pub async fn serve(&self, listener: TcpListener) -> Result<(), ReceiveError> {
        let mut connections = JoinSet::new();
        let _teardown = Teardown(self.inner.clone());
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let inner = self.inner.clone();
                        connections.spawn(
                            async move { connection(inner, stream, peer).await }
                                .instrument(info_span!("receive_connection", %peer)),
                        );
                    }
                    Err(error) if is_transient_accept_error(&error) => {
                        warn!(%error, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(error) => return Err(ReceiveError::Accept(error)),
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
}

fn is_transient_accept_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(error.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE || code == nix::libc::ENOBUFS || code == nix::libc::ENOMEM)
}

/// When `serve` ends or is dropped, its sessions go too: their committers are stopped without
/// a final commit, as if the process had died.
struct Teardown(Arc<Inner>);

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.0.sessions.try_lock() {
            for (_, session) in sessions.drain() {
                session.kill();
            }
        }
    }
}

async fn connection(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    bump(&inner.counters.connections_accepted, 1);
    bump(&inner.counters.connections_open, 1);
    let _open = OpenConnection(inner.clone());
    if let Some(name) = &inner.config.congestion_control
        && let Err(error) = crate::conn::set_congestion(&stream, name)
    {
        warn!(%error, "could not set congestion control");
    }
    if let Err(error) = stream.set_nodelay(true) {
        debug!(%error, "could not set TCP_NODELAY");
    }
    let limit = inner.config.handshake_timeout;
    let tls = match tokio::time::timeout(limit, inner.acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            bump(&inner.counters.tls_rejected, 1);
            warn!(%peer, %error, "TLS handshake refused; nothing was read from this peer");
            return;
        }
        Err(_) => {
            bump(&inner.counters.tls_rejected, 1);
            warn!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let (read_half, write_half) = tokio::io::split(tls);
    let mut reader = FrameReader::new(read_half);
    let (out, out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(write_frames(FrameWriter::new(write_half), out_rx));
    let result = converse(&inner, &mut reader, &out).await;
    if let Err(error) = &result {
        match error {
            ReceiveError::Conn(ConnError::Io { .. } | ConnError::Truncated) => {
                info!(%error, "connection ended");
            }
            _ => warn!(%error, "connection failed"),
        }
        if !matches!(
            error,
            ReceiveError::Peer { .. } | ReceiveError::Conn(ConnError::Io { .. })
        ) {
            let _ = out.send(Frame::Error {
                code: error.code(),
                message: error.to_string(),
            });
        }
    }
    drop(out);
    let _ = writer.await;
}

/// Sends queued frames in order, flushing whenever the queue runs dry.
async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: FrameWriter<W>,
    mut frames: mpsc::UnboundedReceiver<Frame>,
) {
    while let Some(frame) = frames.recv().await {
        if writer.send(&frame).await.is_err() {
            return;
        }
        let mut failed = false;
        while let Ok(frame) = frames.try_recv() {
            if writer.send(&frame).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed || writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

async fn converse<R: AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    reader: &mut FrameReader<R>,
    out: &mpsc::UnboundedSender<Frame>,
) -> Result<(), ReceiveError> {
    let hello = match reader
        .expect(inner.config.handshake_timeout, "Hello")
        .await?
    {
        Frame::Hello(hello) => hello,
        other => {
            return Err(ReceiveError::Protocol(format!(
                "expected Hello, got {}",
                other.kind()
            )));
        }
    };
    if !(hello.min_version..=hello.max_version).contains(&PROTOCOL_VERSION) {
        let _ = out.send(Frame::Error {
            code: ErrorCode::UnsupportedVersion,
            message: format!(
                "this receiver speaks version {PROTOCOL_VERSION}, the sender {}..={}",
                hello.min_version, hello.max_version
            ),
        });
        return Ok(());
    }
    let session = match hello.intent {
        Intent::Open { transfer_id } => open_session(inner, reader, out, transfer_id).await?,
        Intent::Join {
            transfer_id,
            session,
        } => {
            let found = inner.sessions.lock().await.get(&transfer_id).cloned();
            match found {
                Some(found) if found.number == session && !found.is_closed() => {
                    out.send(Frame::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        session,
                    }))
                    .map_err(|_| ReceiveError::Internal("writer gone".into()))?;
                    found
                }
                _ => {
                    let _ = out.send(Frame::Error {
                        code: ErrorCode::UnknownSession,
                        message: format!(
                            "no session {session} for transfer {}; open it again",
                            hex(&transfer_id)
                        ),
                    });
                    return Ok(());
                }
            }
        }
    };
    let Some(_connection) = session.enter(inner.config.max_streams_per_session) else {
        let _ = out.send(Frame::Error {
            code: ErrorCode::LimitExceeded,
            message: format!(
                "more than {} connections for one transfer",
                inner.config.max_streams_per_session
            ),
        });
        return Ok(());
    };
    receive_units(inner, &session, reader, out)
        .instrument(info_span!("session", id = %short(&session.id), number = session.number))
        .await
}

/// Reads the manifest, checks every path, loads the journal and answers with `Have`.
async fn open_session<R: AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    reader: &mut FrameReader<R>,
    out: &mpsc::UnboundedSender<Frame>,
    transfer_id: Hash,
) -> Result<Arc<Session>, ReceiveError> {
    let number = inner.next_session.fetch_add(1, Ordering::Relaxed);
    out.send(Frame::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        session: number,
    }))
    .map_err(|_| ReceiveError::Internal("writer gone".into()))?;

    let mut assembler = ManifestAssembler::new(inner.config.manifest_limits);
    let manifest = loop {
        let (frame, len) = match tokio::time::timeout(inner.config.idle_timeout, reader.next())
            .await
        {
            Err(_) => {
                return Err(ConnError::Timeout(inner.config.idle_timeout, "the manifest").into());
            }
            Ok(Ok(Some(read))) => read,
            Ok(Ok(None)) => return Err(ConnError::Truncated.into()),
            Ok(Err(error)) => return Err(error.into()),
        };
        if let Some(manifest) = assembler.push(frame, len)? {
            break manifest;
        }
    };
    let computed = manifest
        .transfer_id()
        .map_err(|error| ReceiveError::Protocol(error.to_string()))?;
    if computed != transfer_id {
        return Err(ManifestError::IdMismatch.into());
    }
    let manifest = Arc::new(manifest);

    // Anything left of an earlier session of this transfer is cancelled and committed first,
    // so exactly one session writes its staging directory.
    let previous = inner.sessions.lock().await.remove(&transfer_id);
    if let Some(previous) = previous {
        info!(
            previous = previous.number,
            "superseding the previous session of this transfer"
        );
        previous.close_and_wait().await;
    }

    let prepared = {
        let inner = inner.clone();
        let manifest = manifest.clone();
        tokio::task::spawn_blocking(move || prepare(&inner, &manifest, &transfer_id))
            .await
            .map_err(|error| ReceiveError::Internal(error.to_string()))??
    };
    let have = prepared.state.durable.clone();
    let session = Session::start(inner, transfer_id, number, manifest, prepared);
    inner
        .sessions
        .lock()
        .await
        .insert(transfer_id, session.clone());
    bump(&inner.counters.sessions_opened, 1);
    info!(
        id = %short(&transfer_id),
        files = session.manifest.files.len(),
        have = have.count(),
        of = have.len(),
        "session opened"
    );
    let ranges = have.ranges();
    let mut batches = ranges.chunks(MAX_RANGES_PER_FRAME).peekable();
    if batches.peek().is_none() {
        out.send(Frame::Have {
            ranges: Vec::new(),
            last: true,
        })
        .map_err(|_| ReceiveError::Internal("writer gone".into()))?;
    }
    while let Some(batch) = batches.next() {
        out.send(Frame::Have {
            ranges: batch.to_vec(),
            last: batches.peek().is_none(),
        })
        .map_err(|_| ReceiveError::Internal("writer gone".into()))?;
    }
    Ok(session)
}

/// What `prepare` found on disk.
struct Prepared {
    fs: Arc<SessionFs>,
    state: CommitState,
}

/// Checks every destination path against the filesystem, opens the staging directory and the
/// journal, and works out which pieces are really there.
fn prepare(inner: &Inner, manifest: &Arc<Manifest>, id: &Hash) -> Result<Prepared, ReceiveError> {
    // Walk every destination parent without creating anything, so a symlink or a file in the
    // way is reported before a byte is accepted. Files are sorted by path, so neighbours share
    // parents and one open directory at a time is enough.
    let mut last_parent: Option<(String, Option<Dir>)> = None;
    for file in &manifest.files {
        let full = file.path.under(manifest.target.as_ref())?;
        let (parents, name) = full.split_last();
        let key = parents.join("/");
        if last_parent.as_ref().is_none_or(|(last, _)| *last != key) {
            let dir = inner.root.walk_existing(parents.iter().copied())?;
            last_parent = Some((key, dir));
        }
        if let Some((_, Some(parent))) = &last_parent {
            match parent.existing(name)? {
                Existing::Dir => return Err(PathError::IsADirectory(full.to_string()).into()),
                Existing::Other => return Err(PathError::NotADirectory(full.to_string()).into()),
                Existing::Nothing | Existing::File(_) | Existing::Symlink => {}
            }
        }
    }
    for dir in &manifest.dirs {
        let full = dir.path.under(manifest.target.as_ref())?;
        if let Some(existing) = inner.root.walk_existing(full.components())? {
            drop(existing);
        }
    }

    let staging_parent = inner.root.open_dir(STAGING_DIR, Some(0o700))?;
    let staging_name = hex(id);
    let staging = staging_parent.open_dir(&staging_name, Some(0o700))?;
    let (journal, records) = Journal::open(&staging, id)?;
    let file_count = manifest.files.len() as u64;
    let mut durable = PieceSet::empty(manifest.piece_count());
    let mut done = PieceSet::empty(file_count);
    for record in records {
        match record {
            Record::Piece(piece) => {
                durable.insert(piece);
            }
            Record::FileDone(file) => {
                done.insert(file);
            }
        }
    }
    let fs = Arc::new(SessionFs {
        root: inner.root.try_clone()?,
        target: manifest.target.clone(),
        staging_parent,
        staging_name,
        staging,
        locks: (0..FILE_LOCK_SHARDS).map(|_| Mutex::new(())).collect(),
        done: (0..manifest.files.len())
            .map(|_| AtomicBool::new(false))
            .collect(),
    });
    let mut journal_records = Vec::new();
    // Trust the journal only as far as the disk agrees: a finished file must still be at its
    // destination with its size, a partial one must still have its staging file.
    for (index, file) in manifest.files.iter().enumerate() {
        let pieces = manifest.pieces_of(index);
        if done.contains(index as u64) {
            let full = file.path.under(manifest.target.as_ref())?;
            let (parents, name) = full.split_last();
            let present = match inner.root.walk_existing(parents.iter().copied())? {
                Some(parent) => parent.existing(name)? == Existing::File(file.size),
                None => false,
            };
            if present {
                durable.insert_range(pieces);
                fs.done[index].store(true, Ordering::Relaxed);
            } else {
                done.remove(index as u64);
                for piece in pieces {
                    durable.remove(piece);
                }
            }
        } else if pieces.clone().any(|piece| durable.contains(piece)) {
            if !matches!(
                fs.staging.existing(&staging_file(index))?,
                Existing::File(_)
            ) {
                for piece in pieces {
                    durable.remove(piece);
                }
            }
        } else if already_in_place(&inner.root, manifest, index)? {
            // Sent before (the journal is removed on completion, or the sender never saw
            // Complete): a file already at its destination with the right content is kept.
            done.insert(index as u64);
            journal_records.push(Record::FileDone(index as u64));
            durable.insert_range(pieces);
            fs.done[index].store(true, Ordering::Relaxed);
        }
    }
    let mut journal = journal;
    journal.append(&journal_records)?;
    let state = CommitState {
        journal,
        manifest: manifest.clone(),
        fs: fs.clone(),
        durable,
        done,
        pending: Vec::new(),
        pending_set: PieceSet::empty(manifest.piece_count()),
        dirs_made: false,
    };
    Ok(Prepared { fs, state })
}

/// Whether file `index` is already at its destination with the manifest's size and hash.
fn already_in_place(root: &Dir, manifest: &Manifest, index: usize) -> Result<bool, ReceiveError> {
    let entry = &manifest.files[index];
    let full = entry.path.under(manifest.target.as_ref())?;
    let (parents, name) = full.split_last();
    let Some(parent) = root.walk_existing(parents.iter().copied())? else {
        return Ok(false);
    };
    if parent.existing(name)? != Existing::File(entry.size) {
        return Ok(false);
    }
    let Some(file) = parent.open_file(name, false)? else {
        return Ok(false);
    };
    let mut buffer = vec![0_u8; 1 << 20];
    let (size, hash, _) = crate::manifest::hash_content(&file, manifest.chunk_size, &mut buffer)
        .map_err(|source| ReceiveError::Io {
            op: "read existing",
            path: full.to_string(),
            source,
        })?;
    Ok(size == entry.size && hash == entry.hash)
}

fn staging_file(index: usize) -> String {
    format!("f{index}")
}

/// Lowercase hex of a hash.
pub fn hex(hash: &Hash) -> String {
    use std::fmt::Write as _;
    hash.iter()
        .fold(String::with_capacity(64), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

fn short(hash: &Hash) -> String {
    hex(hash)[..12].to_owned()
}

/// Filesystem handles of a session, shared by its connections and its committer.
#[derive(Debug)]
struct SessionFs {
    root: Dir,
    target: Option<RelPath>,
    staging_parent: Dir,
    staging_name: String,
    staging: Dir,
    /// Writers hold a file's shard while writing it; the committer holds it while moving the
    /// file into place, so no write can recreate a staging file that was just moved.
    locks: Vec<Mutex<()>>,
    /// Files already in place: later copies of their pieces are dropped, not written.
    done: Vec<AtomicBool>,
}

impl SessionFs {
    fn lock(&self, file: usize) -> std::sync::MutexGuard<'_, ()> {
        let shard = &self.locks[file % self.locks.len()];
        shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

enum CommitMsg {
    Written {
        pieces: Vec<u64>,
        committed: Option<oneshot::Sender<()>>,
    },
    Finish {
        reply: oneshot::Sender<Result<FinishOutcome, String>>,
    },
}

enum FinishOutcome {
    Complete { files: u64, bytes: u64 },
    Missing(PieceSet),
}

/// One transfer being received.
#[derive(Debug)]
struct Session {
    id: Hash,
    number: u64,
    manifest: Arc<Manifest>,
    fs: Arc<SessionFs>,
    commits: mpsc::UnboundedSender<CommitMsg>,
    cancel: watch::Sender<bool>,
    connections: AtomicU64,
    /// Every connection and write task of the session holds a clone; closing waits for all of
    /// them to be dropped.
    activity: Mutex<Option<mpsc::Sender<()>>>,
    activity_done: tokio::sync::Mutex<mpsc::Receiver<()>>,
    committer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for CommitMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Written { pieces, .. } => write!(f, "Written({} pieces)", pieces.len()),
            Self::Finish { .. } => f.write_str("Finish"),
        }
    }
}

/// Held by a connection while it is in the session.
struct Entered {
    session: Arc<Session>,
    _activity: mpsc::Sender<()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.session.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    fn start(
        inner: &Arc<Inner>,
        id: Hash,
        number: u64,
        manifest: Arc<Manifest>,
        prepared: Prepared,
    ) -> Arc<Self> {
        let (commits, commit_rx) = mpsc::unbounded_channel();
        let (cancel, cancel_rx) = watch::channel(false);
        let (activity, activity_done) = mpsc::channel(1);
        let session = Arc::new(Self {
            id,
            number,
            manifest,
            fs: prepared.fs,
            commits,
            cancel,
            connections: AtomicU64::new(0),
            activity: Mutex::new(Some(activity)),
            activity_done: tokio::sync::Mutex::new(activity_done),
            committer: Mutex::new(None),
        });
        let handle = tokio::spawn(
            committer(
                inner.clone(),
                Arc::downgrade(&session),
                prepared.state,
                commit_rx,
                cancel_rx,
            )
            .instrument(info_span!("committer", id = %short(&id), number)),
        );
        if let Ok(mut slot) = session.committer.lock() {
            *slot = Some(handle);
        }
        session
    }

    fn is_closed(&self) -> bool {
        *self.cancel.borrow()
    }

    fn activity(&self) -> Option<mpsc::Sender<()>> {
        self.activity.lock().ok().and_then(|slot| slot.clone())
    }

    /// Registers a connection; `None` when the session is closed or full.
    fn enter(self: &Arc<Self>, max: u32) -> Option<Entered> {
        let activity = self.activity()?;
        if self.is_closed() {
            return None;
        }
        let before = self.connections.fetch_add(1, Ordering::Relaxed);
        let entered = Entered {
            session: self.clone(),
            _activity: activity,
        };
        (before < u64::from(max)).then_some(entered)
    }

    /// Stops the session's connections, waits for their writes, and lets the committer make a
    /// last commit before it exits.
    async fn close_and_wait(&self) {
        self.cancel.send_replace(true);
        if let Ok(mut slot) = self.activity.lock() {
            slot.take();
        }
        // Every holder drops its sender when it ends; `recv` then returns `None`.
        let mut done = self.activity_done.lock().await;
        while done.recv().await.is_some() {}
        let handle = self.committer.lock().ok().and_then(|mut slot| slot.take());
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }

    /// Stops everything at once, committing nothing more: a killed agent.
    fn kill(&self) {
        self.cancel.send_replace(true);
        if let Some(handle) = self.committer.lock().ok().and_then(|mut slot| slot.take()) {
            handle.abort();
        }
    }
}

/// Reads units until `Done`, the end of the stream or cancellation.
async fn receive_units<R: AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
    reader: &mut FrameReader<R>,
    out: &mpsc::UnboundedSender<Frame>,
) -> Result<(), ReceiveError> {
    let mut cancelled = session.cancel.subscribe();
    let writes = Arc::new(Semaphore::new(WRITES_IN_FLIGHT as usize));
    let mut received = 0_u64;
    let mut reported = 0_u64;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(inner.config.idle_timeout, reader.next()) => next,
            _ = cancelled.wait_for(|closed| *closed) => return Err(ReceiveError::Superseded),
        };
        let frame = match next {
            Err(_) => return Err(ConnError::Timeout(inner.config.idle_timeout, "a frame").into()),
            Ok(Ok(Some((frame, _)))) => frame,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(error)) => return Err(error.into()),
        };
        match frame {
            Frame::UnitStart(start) => {
                let unit = receive_unit(
                    inner,
                    session,
                    reader,
                    out,
                    &mut cancelled,
                    start,
                    &mut received,
                    &mut reported,
                )
                .await?;
                let permit = tokio::select! {
                    permit = writes.clone().acquire_owned() => permit.map_err(|_| ReceiveError::Internal("write semaphore closed".into()))?,
                    _ = cancelled.wait_for(|closed| *closed) => return Err(ReceiveError::Superseded),
                };
                let Some(activity) = session.activity() else {
                    return Err(ReceiveError::Superseded);
                };
                tokio::spawn(
                    write_unit(
                        inner.clone(),
                        session.clone(),
                        unit,
                        out.clone(),
                        permit,
                        activity,
                    )
                    .in_current_span(),
                );
            }
            Frame::Done => {
                // Let this connection's writes land so the committer has seen every piece.
                let all = writes
                    .acquire_many(WRITES_IN_FLIGHT)
                    .await
                    .map_err(|_| ReceiveError::Internal("write semaphore closed".into()))?;
                drop(all);
                return finish(inner, session, out).await;
            }
            Frame::Error { code, message } => return Err(ReceiveError::Peer { code, message }),
            other => {
                return Err(ReceiveError::Protocol(format!(
                    "unexpected {} frame during the transfer",
                    other.kind()
                )));
            }
        }
    }
}

/// A unit read and checked, waiting to be written.
struct ReceivedUnit {
    unit: u64,
    /// Verified pieces: (piece, file, offset, data, memory permit).
    good: Vec<(u64, usize, u64, Vec<u8>, tokio::sync::OwnedSemaphorePermit)>,
    /// The first file whose hash did not match.
    bad_file: Option<u32>,
}

#[allow(clippy::too_many_arguments)]
async fn receive_unit<R: AsyncRead + Unpin>(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
    reader: &mut FrameReader<R>,
    out: &mpsc::UnboundedSender<Frame>,
    cancelled: &mut watch::Receiver<bool>,
    start: UnitStart,
    received: &mut u64,
    reported: &mut u64,
) -> Result<ReceivedUnit, ReceiveError> {
    let manifest = &session.manifest;
    // (piece, file, offset, len, expected hash)
    let mut pieces: Vec<(u64, usize, u64, u64, Hash)> = Vec::new();
    match &start.body {
        UnitBody::Chunk { file, index } => {
            let file = *file as usize;
            let piece = manifest
                .chunk_piece(file, u64::from(*index))
                .ok_or_else(|| {
                    ReceiveError::Protocol(format!("no chunk {index} of file {file}"))
                })?;
            let location = manifest
                .locate(piece)
                .ok_or_else(|| ReceiveError::Protocol(format!("no piece {piece}")))?;
            let hash = manifest.files[file].chunk_hashes[*index as usize];
            pieces.push((piece, file, location.offset, location.len, hash));
        }
        UnitBody::Pack { files } => {
            let mut previous: Option<u32> = None;
            for &file in files {
                if previous.is_some_and(|previous| previous >= file) {
                    return Err(ReceiveError::Protocol(
                        "pack files must be in increasing order".into(),
                    ));
                }
                previous = Some(file);
                let index = file as usize;
                let entry = manifest
                    .files
                    .get(index)
                    .ok_or_else(|| ReceiveError::Protocol(format!("no file {file}")))?;
                if manifest.is_chunked(index) {
                    return Err(ReceiveError::Protocol(format!(
                        "file {file} is sent in chunks, not packed"
                    )));
                }
                pieces.push((
                    manifest.pieces_of(index).start,
                    index,
                    0,
                    entry.size,
                    entry.hash,
                ));
            }
        }
    }

    let mut unit = ReceivedUnit {
        unit: start.unit,
        good: Vec::with_capacity(pieces.len()),
        bad_file: None,
    };
    for (piece, file, offset, len, expected) in pieces {
        let permits = u32::try_from(len.div_ceil(PERMIT_BYTES)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            permit = inner.memory.clone().acquire_many_owned(permits) => permit.map_err(|_| ReceiveError::Internal("memory semaphore closed".into()))?,
            _ = cancelled.wait_for(|closed| *closed) => return Err(ReceiveError::Superseded),
        };
        let capacity =
            usize::try_from(len).map_err(|_| ReceiveError::Protocol("piece too large".into()))?;
        let mut data = Vec::with_capacity(capacity);
        let mut hasher = blake3::Hasher::new();
        while (data.len() as u64) < len {
            let frame = tokio::select! {
                next = tokio::time::timeout(inner.config.idle_timeout, reader.next()) => match next {
                    Err(_) => return Err(ConnError::Timeout(inner.config.idle_timeout, "unit data").into()),
                    Ok(Ok(Some((frame, _)))) => frame,
                    Ok(Ok(None)) => return Err(ConnError::Truncated.into()),
                    Ok(Err(error)) => return Err(error.into()),
                },
                _ = cancelled.wait_for(|closed| *closed) => return Err(ReceiveError::Superseded),
            };
            let Frame::Data(bytes) = frame else {
                return Err(ReceiveError::Protocol(format!(
                    "expected data for unit {}, got {}",
                    start.unit,
                    frame.kind()
                )));
            };
            if bytes.len() as u64 > len - data.len() as u64 {
                return Err(ReceiveError::Protocol(format!(
                    "unit {} sent more data than its piece holds",
                    start.unit
                )));
            }
            hasher.update(&bytes);
            data.extend_from_slice(&bytes);
            *received += bytes.len() as u64;
            if *received - *reported >= RECEIVED_EVERY {
                *reported = *received;
                let _ = out.send(Frame::Received { bytes: *received });
            }
        }
        if *hasher.finalize().as_bytes() == expected {
            unit.good.push((piece, file, offset, data, permit));
        } else {
            bump(&inner.counters.pieces_rejected, 1);
            warn!(
                unit = start.unit,
                file = %session.manifest.files[file].path,
                offset,
                "piece failed its BLAKE3 check; refused, not written"
            );
            unit.bad_file.get_or_insert(file as u32);
        }
    }
    if *received > *reported {
        *reported = *received;
        let _ = out.send(Frame::Received { bytes: *received });
    }
    Ok(unit)
}

/// Writes a verified unit's pieces into their staging files, tells the committer, and acks.
async fn write_unit(
    inner: Arc<Inner>,
    session: Arc<Session>,
    unit: ReceivedUnit,
    out: mpsc::UnboundedSender<Frame>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _activity: mpsc::Sender<()>,
) {
    let ReceivedUnit {
        unit: unit_number,
        good,
        bad_file,
    } = unit;
    let fs = session.fs.clone();
    let manifest = session.manifest.clone();
    let damage = (!inner.config.damage_after_write.is_empty()).then(|| inner.clone());
    let written = tokio::task::spawn_blocking(move || -> Result<(Vec<u64>, u64), ReceiveError> {
        let mut pieces = Vec::with_capacity(good.len());
        let mut bytes = 0_u64;
        for (piece, file, offset, data, permit) in good {
            let _guard = fs.lock(file);
            if fs.done[file].load(Ordering::Acquire) {
                // Already in place from an earlier copy of this piece; nothing to write.
                drop(permit);
                continue;
            }
            let chunked = manifest.is_chunked(file);
            let name = staging_file(file);
            let io = |op| {
                let path = manifest.files[file].path.to_string();
                move |source| ReceiveError::Io { op, path, source }
            };
            let handle = fs.staging.create_file(&name, !chunked)?;
            handle.write_all_at(&data, offset).map_err(io("write"))?;
            if let Some(inner) = &damage
                && inner.config.damage_after_write.contains(&piece)
                && !data.is_empty()
                && inner
                    .damaged
                    .lock()
                    .is_ok_and(|mut damaged| damaged.insert(piece))
            {
                warn!(
                    piece,
                    "test hook: damaging a piece on disk after writing it"
                );
                handle
                    .write_all_at(&[data[0] ^ 0xff], offset)
                    .map_err(io("write"))?;
            }
            bytes += data.len() as u64;
            drop(permit);
            pieces.push(piece);
        }
        Ok((pieces, bytes))
    })
    .await;
    let (pieces, bytes) = match written {
        Ok(Ok(written)) => written,
        Ok(Err(error)) => {
            warn!(%error, unit = unit_number, "writing a unit failed");
            let _ = out.send(Frame::Error {
                code: error.code(),
                message: error.to_string(),
            });
            return;
        }
        Err(error) => {
            warn!(%error, "write task failed");
            return;
        }
    };
    bump(&inner.counters.bytes_written, bytes);
    let (committed, wait) = if inner.config.durable_acks {
        let (sender, receiver) = oneshot::channel();
        (Some(sender), Some(receiver))
    } else {
        (None, None)
    };
    if session
        .commits
        .send(CommitMsg::Written { pieces, committed })
        .is_err()
    {
        return;
    }
    if let Some(wait) = wait
        && wait.await.is_err()
    {
        // The committer stopped before committing: do not acknowledge.
        return;
    }
    let frame = match bad_file {
        None => {
            bump(&inner.counters.units_written, 1);
            Frame::Ack { unit: unit_number }
        }
        Some(file) => Frame::Nack {
            unit: unit_number,
            file,
        },
    };
    let _ = out.send(frame);
}

async fn finish(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
    out: &mpsc::UnboundedSender<Frame>,
) -> Result<(), ReceiveError> {
    let (reply, outcome) = oneshot::channel();
    session
        .commits
        .send(CommitMsg::Finish { reply })
        .map_err(|_| ReceiveError::Superseded)?;
    let outcome = outcome
        .await
        .map_err(|_| ReceiveError::Superseded)?
        .map_err(ReceiveError::Internal)?;
    match outcome {
        FinishOutcome::Complete { files, bytes } => {
            {
                let mut sessions = inner.sessions.lock().await;
                if sessions
                    .get(&session.id)
                    .is_some_and(|current| current.number == session.number)
                {
                    sessions.remove(&session.id);
                }
            }
            bump(&inner.counters.sessions_completed, 1);
            info!(files, bytes, "transfer complete");
            let _ = out.send(Frame::Complete { files, bytes });
        }
        FinishOutcome::Missing(missing) => {
            info!(
                missing = missing.count(),
                "finish asked, pieces still missing"
            );
            let ranges = missing.ranges();
            let mut batches = ranges.chunks(MAX_RANGES_PER_FRAME).peekable();
            while let Some(batch) = batches.next() {
                let _ = out.send(Frame::Missing {
                    ranges: batch.to_vec(),
                    last: batches.peek().is_none(),
                });
            }
        }
    }
    Ok(())
}

/// Durable state of a session, owned by its committer.
struct CommitState {
    journal: Journal,
    manifest: Arc<Manifest>,
    fs: Arc<SessionFs>,
    /// Pieces journaled (or in files in place).
    durable: PieceSet,
    /// Files in place (by index).
    done: PieceSet,
    /// Pieces written but not yet journaled.
    pending: Vec<u64>,
    pending_set: PieceSet,
    dirs_made: bool,
}

async fn committer(
    inner: Arc<Inner>,
    session: std::sync::Weak<Session>,
    mut state: CommitState,
    mut messages: mpsc::UnboundedReceiver<CommitMsg>,
    mut cancelled: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(inner.config.commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut idle_since: Option<tokio::time::Instant> = None;
    loop {
        let mut finish: Option<oneshot::Sender<Result<FinishOutcome, String>>> = None;
        let mut stop = false;
        let mut ticked = false;
        tokio::select! {
            message = messages.recv() => match message {
                Some(CommitMsg::Written { pieces, committed }) => {
                    state.add_written(pieces);
                    waiting.extend(committed);
                }
                Some(CommitMsg::Finish { reply }) => finish = Some(reply),
                None => stop = true,
            },
            _ = tick.tick() => {
                ticked = true;
                let connections = session.upgrade().map_or(0, |session| session.connections.load(Ordering::Relaxed));
                if connections == 0 {
                    let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= inner.config.session_linger {
                        info!("no connection for the linger time; committing and closing the session");
                        stop = true;
                    }
                } else {
                    idle_since = None;
                }
            }
            _ = cancelled.wait_for(|closed| *closed) => stop = true,
        }
        // Take whatever else is queued, so one commit covers it.
        while let Ok(message) = messages.try_recv() {
            match message {
                CommitMsg::Written { pieces, committed } => {
                    state.add_written(pieces);
                    waiting.extend(committed);
                }
                CommitMsg::Finish { reply } => finish = Some(reply),
            }
        }
        let due = stop
            || finish.is_some()
            || !waiting.is_empty()
            || state.pending.len() >= inner.config.commit_every_pieces
            || (ticked && !state.pending.is_empty());
        if due {
            let inner_for_commit = inner.clone();
            let want_finish = finish.is_some();
            let result = tokio::task::spawn_blocking(move || {
                let result = state.commit(&inner_for_commit, want_finish);
                (state, result)
            })
            .await;
            let (returned, result) = match result {
                Ok(pair) => pair,
                Err(error) => {
                    warn!(%error, "commit task failed; the session stops");
                    return;
                }
            };
            state = returned;
            match result {
                Ok(outcome) => {
                    for waiter in waiting.drain(..) {
                        let _ = waiter.send(());
                    }
                    if let (Some(reply), Some(outcome)) = (finish.take(), outcome) {
                        let complete = matches!(outcome, FinishOutcome::Complete { .. });
                        let _ = reply.send(Ok(outcome));
                        if complete {
                            return;
                        }
                    }
                }
                Err(error) => {
                    warn!(%error, "commit failed");
                    waiting.clear();
                    if let Some(reply) = finish.take() {
                        let _ = reply.send(Err(error.to_string()));
                    }
                }
            }
        }
        if stop {
            if let Some(session) = session.upgrade() {
                session.cancel.send_replace(true);
                let mut sessions = inner.sessions.lock().await;
                if sessions
                    .get(&session.id)
                    .is_some_and(|current| current.number == session.number)
                {
                    sessions.remove(&session.id);
                }
            }
            return;
        }
    }
}

impl CommitState {
    fn add_written(&mut self, pieces: Vec<u64>) {
        for piece in pieces {
            if !self.durable.contains(piece) && self.pending_set.insert(piece) {
                self.pending.push(piece);
            }
        }
    }

    /// Syncs, verifies and moves completed files into place, then journals. With `finish`,
    /// also makes the directories and says whether anything is missing.
    fn commit(
        &mut self,
        inner: &Inner,
        finish: bool,
    ) -> Result<Option<FinishOutcome>, ReceiveError> {
        let _span = info_span!("commit", pending = self.pending.len(), finish).entered();
        let started = std::time::Instant::now();
        let mut files: Vec<usize> = Vec::new();
        for &piece in &self.pending {
            if let Some(location) = self.manifest.locate(piece)
                && files.last() != Some(&location.file)
            {
                files.push(location.file);
            }
        }
        if finish {
            // A file can be held whole but not in place: its pieces were journaled by a commit
            // that found another of its pieces damaged (the good ones are kept), then the
            // receiver restarted and the journal announced them all. It is checked and placed
            // now, or its damaged pieces are reported missing; never is `Complete` answered
            // with a file left in staging.
            for file in 0..self.manifest.files.len() {
                if !self.done.contains(file as u64)
                    && self
                        .manifest
                        .pieces_of(file)
                        .all(|piece| self.durable.contains(piece))
                {
                    files.push(file);
                }
            }
        }
        files.sort_unstable();
        files.dedup();

        let mut records = Vec::new();
        let mut synced_dirs: HashMap<String, Dir> = HashMap::new();
        for file in files {
            if self.done.contains(file as u64) {
                continue;
            }
            let entry = &self.manifest.files[file];
            let name = staging_file(file);
            let handle = match self.fs.staging.open_file(&name, false)? {
                Some(handle) => handle,
                // An empty file has no bytes to write, so nothing may have created it yet.
                None if entry.size == 0 => self.fs.staging.create_file(&name, true)?,
                // Pieces whose file is gone cannot be trusted, journaled ones included; they
                // will be missing.
                None => {
                    for piece in self.manifest.pieces_of(file) {
                        self.durable.remove(piece);
                    }
                    continue;
                }
            };
            handle.sync_data().map_err(|source| ReceiveError::Io {
                op: "sync",
                path: entry.path.to_string(),
                source,
            })?;
            // Each piece was checked in memory before it was written; reading it back checks
            // that the disk holds what was checked. Under the file's lock: a second copy of a
            // piece (a resend, an endgame copy) may be rewriting it right now.
            let fs = self.fs.clone();
            let guard = fs.lock(file);
            let mut stored = Vec::new();
            for piece in self.manifest.pieces_of(file) {
                if !self.pending_set.contains(piece) {
                    continue;
                }
                if self.stored_intact(piece, &handle)? {
                    self.durable.insert(piece);
                    stored.push(piece);
                } else {
                    bump(&inner.counters.pieces_damaged_on_disk, 1);
                    warn!(file = %entry.path, piece, "a piece read back from disk does not match its hash; it will be sent again");
                }
            }
            let complete = self
                .manifest
                .pieces_of(file)
                .all(|piece| self.durable.contains(piece));
            if !complete {
                drop(guard);
                records.extend(stored.into_iter().map(Record::Piece));
                continue;
            }
            // Whole-file check before the file becomes visible: the pieces of earlier commits
            // and of earlier sessions (trusted from the journal) are read and hashed again, so
            // bytes damaged in staging since they were checked are never moved into place.
            // Those just read back above are not read twice. A damaged piece stops counting
            // as received; `Finish` then reports it `Missing` and the sender sends it again.
            let damaged = self.damaged_earlier_pieces(inner, file, &handle)?;
            if !damaged.is_empty() {
                drop(guard);
                warn!(file = %entry.path, pieces = ?damaged, "pieces in staging no longer match their hashes; they will be sent again");
                for piece in damaged {
                    self.durable.remove(piece);
                }
                records.extend(stored.into_iter().map(Record::Piece));
                continue;
            }
            match self.place(inner, file, &handle, &mut synced_dirs, guard) {
                Ok(()) => {
                    records.push(Record::FileDone(file as u64));
                    self.done.insert(file as u64);
                    bump(&inner.counters.files_completed, 1);
                }
                Err(PlaceError::Verification) => {
                    warn!(file = %self.manifest.files[file].path, "the stored file has the wrong size; it will be sent again");
                    for piece in self.manifest.pieces_of(file) {
                        self.durable.remove(piece);
                    }
                    let _ = self.fs.staging.remove_file(&staging_file(file));
                }
                Err(PlaceError::Other(error)) => return Err(error),
            }
        }
        for dir in synced_dirs.values() {
            dir.sync()?;
        }
        self.journal.append(&records)?;
        for piece in self.pending.drain(..) {
            self.pending_set.remove(piece);
        }
        debug!(
            records = records.len(),
            dirs = synced_dirs.len(),
            millis = started.elapsed().as_millis() as u64,
            "committed"
        );

        if !finish {
            return Ok(None);
        }
        let missing = self.durable.complement();
        if missing.count() > 0 {
            return Ok(Some(FinishOutcome::Missing(missing)));
        }
        if !self.dirs_made {
            self.make_dirs()?;
            self.dirs_made = true;
        }
        // Everything is in place: the staging directory and its journal go.
        self.fs.staging.remove_file(crate::journal::JOURNAL_FILE)?;
        for file in 0..self.manifest.files.len() {
            self.fs.staging.remove_file(&staging_file(file))?;
        }
        self.fs.staging_parent.remove_dir(&self.fs.staging_name)?;
        self.fs.staging_parent.sync()?;
        Ok(Some(FinishOutcome::Complete {
            files: self.manifest.files.len() as u64,
            bytes: self.manifest.total_bytes(),
        }))
    }

    /// The pieces of `file` that were not read back in this commit and whose bytes in the
    /// staging file no longer hash to the manifest's values. With [`Self::stored_intact`] for
    /// the pieces of this commit, every piece of the file is checked against the manifest's
    /// hash list (whose hash is the file's hash) right before the file is placed.
    fn damaged_earlier_pieces(
        &self,
        inner: &Inner,
        file: usize,
        handle: &std::fs::File,
    ) -> Result<Vec<u64>, ReceiveError> {
        let mut damaged = Vec::new();
        for piece in self.manifest.pieces_of(file) {
            if self.pending_set.contains(piece) {
                continue;
            }
            bump(
                &inner.counters.bytes_rechecked,
                self.manifest.piece_len(piece),
            );
            if !self.stored_intact(piece, handle)? {
                bump(&inner.counters.pieces_damaged_on_disk, 1);
                damaged.push(piece);
            }
        }
        Ok(damaged)
    }

    /// Whether the bytes of `piece` in its staging file hash to the manifest's value.
    fn stored_intact(&self, piece: u64, handle: &std::fs::File) -> Result<bool, ReceiveError> {
        let Some(location) = self.manifest.locate(piece) else {
            return Ok(false);
        };
        let entry = &self.manifest.files[location.file];
        let expected = if location.chunked {
            let index = usize::try_from(location.chunk).unwrap_or(usize::MAX);
            match entry.chunk_hashes.get(index) {
                Some(hash) => *hash,
                None => return Ok(false),
            }
        } else {
            entry.hash
        };
        let mut buffer = vec![0_u8; usize::try_from(location.len).unwrap_or(0)];
        match handle.read_exact_at(&mut buffer, location.offset) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(source) => {
                return Err(ReceiveError::Io {
                    op: "read back",
                    path: entry.path.to_string(),
                    source,
                });
            }
        }
        Ok(*blake3::hash(&buffer).as_bytes() == expected)
    }

    /// Makes the manifest's directories (empty ones included) and sets their modes.
    fn make_dirs(&self) -> Result<(), ReceiveError> {
        let target: Vec<&str> = self
            .fs
            .target
            .as_ref()
            .map(|target| target.components().collect())
            .unwrap_or_default();
        let mut parents: HashMap<String, Dir> = HashMap::new();
        for dir in &self.manifest.dirs {
            let (parent_components, _) = dir.path.split_last();
            let handle = self.fs.root.walk(
                target.iter().copied().chain(dir.path.components()),
                Some(0o755),
            )?;
            handle.set_mode(dir.mode)?;
            let parent = self
                .fs
                .root
                .walk(target.iter().copied().chain(parent_components), Some(0o755))?;
            parents.insert(parent.shown().to_owned(), parent);
        }
        for parent in parents.values() {
            parent.sync()?;
        }
        Ok(())
    }

    /// Moves a complete file, every piece of which was just read back and verified, to its
    /// destination. `_guard` is the file's lock, held since the check, so no write lands
    /// between the check and the rename.
    fn place(
        &mut self,
        inner: &Inner,
        file: usize,
        handle: &std::fs::File,
        synced_dirs: &mut HashMap<String, Dir>,
        _guard: std::sync::MutexGuard<'_, ()>,
    ) -> Result<(), PlaceError> {
        let entry = &self.manifest.files[file];
        let name = staging_file(file);
        let io = |op| {
            let path = entry.path.to_string();
            move |source| PlaceError::Other(ReceiveError::Io { op, path, source })
        };
        let length = handle.metadata().map_err(io("stat"))?.len();
        if length != entry.size {
            return Err(PlaceError::Verification);
        }
        handle.sync_all().map_err(io("sync"))?;
        let mode = nix::sys::stat::Mode::from_bits_truncate(entry.mode & 0o777);
        nix::sys::stat::fchmod(handle, mode).map_err(|errno| {
            PlaceError::Other(
                PathError::Io {
                    op: "chmod",
                    path: entry.path.to_string(),
                    source: errno,
                }
                .into(),
            )
        })?;
        let full = entry
            .path
            .under(self.fs.target.as_ref())
            .map_err(|error| PlaceError::Other(error.into()))?;
        let (parents, final_name) = full.split_last();
        let parent = inner
            .root
            .walk(parents.iter().copied(), Some(0o755))
            .map_err(|error| PlaceError::Other(error.into()))?;
        self.fs
            .staging
            .rename_to(&name, &parent, final_name)
            .map_err(|error| PlaceError::Other(error.into()))?;
        self.fs.done[file].store(true, Ordering::Release);
        synced_dirs
            .entry(parent.shown().to_owned())
            .or_insert(parent);
        Ok(())
    }
}

enum PlaceError {
    Verification,
    Other(ReceiveError),
}

impl From<PathError> for PlaceError {
    fn from(error: PathError) -> Self {
        Self::Other(error.into())
    }
}
