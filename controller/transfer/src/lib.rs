//! The agent-to-agent transfer engine: moves a checkpoint or a dataset directory from one node
//! to another over mutually authenticated TLS, fast on long and lossy links, verified piece by
//! piece, resumable after any failure.
//!
//! How a transfer goes (see `docs/transfer.md` for the full story and the measurements):
//!
//! 1. The sender lists and hashes the source ([`manifest::scan`]): every file gets a BLAKE3
//!    hash, and files larger than the chunk size one per chunk. The manifest's own hash is the
//!    transfer id, so the same content to the same place is the same transfer.
//! 2. It opens a session ([`wire`]: `Hello`, manifest, `Have`): the receiver checks every path
//!    ([`paths`]), loads its [`journal`] and says which pieces it already holds durably.
//! 3. The work units of `automigrate_core::transfer::plan_transfer` (chunks of large files,
//!    packs of small ones) go over parallel TLS streams pulling from one queue; the
//!    `StreamController` sets the number of streams round by round from the measured delivered
//!    throughput ([`sender`]). Nothing opens a connection per file.
//! 4. The receiver hashes each piece as it arrives and writes only what matches; it syncs,
//!    reads back, journals, and moves each file into place once complete ([`receiver`]).
//! 5. `Done` / `Complete` ends the session; a lost connection, a refused piece or a restarted
//!    agent leads to resending only what is missing. A receiver out of disk space refuses with
//!    `NoSpace`, which ends the transfer at once: another session would fail the same way.
//!
//! Modules: [`wire`] (frames, pure `decode`), [`conn`] (frames over a stream, sockets),
//! [`manifest`] (scan, hashes, piece numbering, transfer id), [`pieceset`] (piece bitmaps),
//! [`paths`] (confinement to the destination root), [`beneath`] (a source read without leaving
//! its root), [`journal`] (durable record of verified pieces), [`tls`] (mutual TLS from PEM
//! files), [`devcerts`] (a throw-away CA for trying it), [`ratelimit`] (token bucket shared by
//! streams), [`sender`] ([`send`]), [`receiver`] ([`Receiver`]).

pub mod beneath;
pub mod conn;
pub mod devcerts;
pub mod journal;
pub mod manifest;
pub mod paths;
pub mod pieceset;
pub mod ratelimit;
pub mod receiver;
pub mod sender;
pub mod tls;
pub mod wire;

pub use manifest::Source;
pub use receiver::{Receiver, ReceiverConfig, ReceiverStats};
pub use sender::{Progress, ProgressFn, Report, SendOptions, send};
pub use tls::TlsConfig;
