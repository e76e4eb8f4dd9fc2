//! The wire format between two agents: explicit, length-prefixed frames.
//!
//! Every frame is a 5-byte header, `kind: u8` and `payload length: u32` (little endian),
//! followed by the payload. All integers are little endian. Strings are a `u16` byte length and
//! UTF-8 bytes. Lists are a `u32` count and the items. Hashes are 32 raw BLAKE3 bytes.
//!
//! A connection, after the TLS handshake (which authenticates both ends first, so nothing here
//! is read from an unauthenticated peer):
//!
//! ```text
//! sender                                   receiver
//! Hello{versions, Open{id} | Join{id, s}} ─►
//!                                        ◄─ Welcome{version, session} | Error
//! (Open only) ManifestStart, ManifestEntry*, ChunkHashes*, ManifestEnd ─►
//!                                        ◄─ (Open only) Have{ranges, last}+ | Error
//! UnitStart, Data* ─►   (repeated, pipelined)
//!                                        ◄─ Received{bytes} (progress), Ack{unit} | Nack{unit, file}
//! Done ─►
//!                                        ◄─ Complete{files, bytes} | Missing{ranges, last}+
//! ```
//!
//! Why it looks this way:
//! - The receiver derives every length from the manifest, so a unit header names only pieces
//!   (a chunk of a large file, or whole small files) and cannot disagree with the manifest about
//!   sizes; data frames simply follow until the unit's bytes are complete.
//! - Each frame kind has its own payload ceiling, checked on the header before anything is
//!   allocated: a hostile or broken peer can make the reader hold at most [`MAX_FRAME_PAYLOAD`]
//!   bytes per frame, and lists are bounded by that too.
//! - [`decode`] is a pure function over a byte slice that never panics, so it can be fuzzed;
//!   the async reader uses the same [`decode_header`] and [`decode_payload`].

use bytes::Bytes;

/// First bytes of every `Hello`, so a peer speaking something else is named as such.
pub const MAGIC: [u8; 4] = *b"AMXF";
/// The only protocol version so far.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes in a frame header: kind (1) and payload length (4).
pub const FRAME_HEADER_LEN: usize = 5;
/// Largest payload of any control frame.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;
/// Largest payload of a `Data` frame. Small enough that a frame is a few TLS records and a
/// slow stream holds little data in flight; large enough that headers cost nothing.
pub const MAX_DATA_PAYLOAD: usize = 256 * 1024;
/// Longest path, in bytes, like Linux's PATH_MAX.
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest error message carried in an `Error` frame.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Most files in one `Pack` unit header; larger packs (many empty files) are split.
pub const MAX_PACK_FILES: usize = 4096;
/// Most hashes in one `ChunkHashes` frame (256 KiB).
pub const MAX_HASHES_PER_FRAME: usize = 8192;
/// Most piece ranges in one `Have` or `Missing` frame (512 KiB).
pub const MAX_RANGES_PER_FRAME: usize = 32 * 1024;

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// Why bytes could not be decoded as a frame, or a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The header names a frame kind this version does not know.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The header announces a payload over the ceiling for its kind.
    #[error("{kind} frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Frame kind.
        kind: FrameKind,
        /// Announced payload length.
        len: usize,
        /// Ceiling for this kind.
        max: usize,
    },
    /// The payload ended before a field did.
    #[error("{kind} frame is truncated: {field} needs {needed} more bytes")]
    Truncated {
        /// Frame kind.
        kind: FrameKind,
        /// The field being read.
        field: &'static str,
        /// Bytes missing.
        needed: usize,
    },
    /// Bytes were left over after the last field.
    #[error("{kind} frame has {extra} trailing bytes")]
    TrailingBytes {
        /// Frame kind.
        kind: FrameKind,
        /// Bytes left over.
        extra: usize,
    },
    /// The `Hello` did not start with [`MAGIC`]: the peer does not speak this protocol.
    #[error("bad magic: the peer does not speak the automigrate transfer protocol")]
    BadMagic,
    /// A string was not UTF-8.
    #[error("{kind} frame: {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Frame kind.
        kind: FrameKind,
        /// The field.
        field: &'static str,
    },
    /// A string or list is longer than its limit.
    #[error("{kind} frame: {field} has {len} items/bytes, more than the limit of {max}")]
    TooLong {
        /// Frame kind.
        kind: FrameKind,
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An enum tag byte has no meaning.
    #[error("{kind} frame: {field} has unknown tag {tag}")]
    BadTag {
        /// Frame kind.
        kind: FrameKind,
        /// The field.
        field: &'static str,
        /// The tag.
        tag: u8,
    },
}

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// [`Frame::Hello`]
    Hello,
    /// [`Frame::Welcome`]
    Welcome,
    /// [`Frame::ManifestStart`]
    ManifestStart,
    /// [`Frame::ManifestEntry`]
    ManifestEntry,
    /// [`Frame::ChunkHashes`]
    ChunkHashes,
    /// [`Frame::ManifestEnd`]
    ManifestEnd,
    /// [`Frame::Have`]
    Have,
    /// [`Frame::UnitStart`]
    UnitStart,
    /// [`Frame::Data`]
    Data,
    /// [`Frame::Ack`]
    Ack,
    /// [`Frame::Nack`]
    Nack,
    /// [`Frame::Received`]
    Received,
    /// [`Frame::Done`]
    Done,
    /// [`Frame::Complete`]
    Complete,
    /// [`Frame::Missing`]
    Missing,
    /// [`Frame::Error`]
    Error,
}

impl FrameKind {
    const ALL: [FrameKind; 16] = [
        Self::Hello,
        Self::Welcome,
        Self::ManifestStart,
        Self::ManifestEntry,
        Self::ChunkHashes,
        Self::ManifestEnd,
        Self::Have,
        Self::UnitStart,
        Self::Data,
        Self::Ack,
        Self::Nack,
        Self::Received,
        Self::Done,
        Self::Complete,
        Self::Missing,
        Self::Error,
    ];

    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::Hello => 0x01,
            Self::Welcome => 0x02,
            Self::ManifestStart => 0x10,
            Self::ManifestEntry => 0x11,
            Self::ChunkHashes => 0x12,
            Self::ManifestEnd => 0x13,
            Self::Have => 0x14,
            Self::UnitStart => 0x20,
            Self::Data => 0x21,
            Self::Ack => 0x22,
            Self::Nack => 0x23,
            Self::Received => 0x24,
            Self::Done => 0x30,
            Self::Complete => 0x31,
            Self::Missing => 0x32,
            Self::Error => 0x3f,
        }
    }

    /// The kind for a wire byte.
    pub fn from_code(code: u8) -> Result<Self, WireError> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.code() == code)
            .ok_or(WireError::UnknownKind(code))
    }

    /// Payload ceiling for this kind.
    pub fn max_payload(self) -> usize {
        match self {
            Self::Data => MAX_DATA_PAYLOAD,
            Self::ManifestEnd | Self::Done => 0,
            Self::Ack | Self::Received => 8,
            _ => MAX_FRAME_PAYLOAD,
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Start (or resume) the transfer whose manifest hashes to `transfer_id`; a manifest follows.
    Open {
        /// BLAKE3 of the canonical manifest.
        transfer_id: Hash,
    },
    /// Add a stream to the session the receiver opened for `transfer_id`.
    Join {
        /// BLAKE3 of the canonical manifest.
        transfer_id: Hash,
        /// Session number from the `Welcome` of the opening connection.
        session: u64,
    },
}

/// First frame on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub min_version: u16,
    /// Newest protocol version the sender speaks.
    pub max_version: u16,
    /// Open or join.
    pub intent: Intent,
}

/// The receiver's answer to `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The version both will speak.
    pub version: u16,
    /// The session: new for `Open`, the joined one for `Join`.
    pub session: u64,
}

/// Start of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestStart {
    /// Directory under the receiver's root the paths are relative to; empty for the root.
    pub target: String,
    /// Chunk size: files larger than this arrive as chunks of this size.
    pub chunk_size: u64,
    /// Number of `File` entries that follow.
    pub files: u64,
    /// Number of `Dir` entries that follow.
    pub dirs: u64,
    /// Sum of the file sizes.
    pub total_bytes: u64,
}

/// One manifest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestEntry {
    /// A regular file. A file larger than the chunk size is followed by `ChunkHashes` frames
    /// carrying one hash per chunk, in order.
    File {
        /// Path relative to the target.
        path: String,
        /// Size in bytes.
        size: u64,
        /// Permission bits (the receiver keeps only `0o777`).
        mode: u32,
        /// BLAKE3 of the whole content.
        hash: Hash,
    },
    /// A directory, so empty ones exist at the destination too.
    Dir {
        /// Path relative to the target.
        path: String,
        /// Permission bits (the receiver keeps only `0o777`).
        mode: u32,
    },
}

/// A run of piece numbers: `start..start + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceRange {
    /// First piece.
    pub start: u64,
    /// Number of pieces.
    pub count: u64,
}

/// What a unit carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitBody {
    /// Chunk `index` of file `file` (a file larger than the chunk size).
    Chunk {
        /// File index in the manifest.
        file: u32,
        /// Chunk number; the offset is `index * chunk_size`.
        index: u32,
    },
    /// Whole small files, back to back in this order.
    Pack {
        /// File indexes in the manifest.
        files: Vec<u32>,
    },
}

/// Header of a unit; its data frames follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitStart {
    /// The sender's number for this unit, echoed in `Ack` and `Nack`.
    pub unit: u64,
    /// What it carries.
    pub body: UnitBody,
}

/// Why a connection is being closed; carried in `Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No common protocol version.
    UnsupportedVersion,
    /// A frame was malformed or out of order.
    Protocol,
    /// A path was rejected (traversal, absolute, symlink, reserved, conflict).
    PathRejected,
    /// `Join` named a session the receiver does not have (it restarted, or it was superseded).
    UnknownSession,
    /// A newer `Open` of the same transfer replaced this session.
    Superseded,
    /// A configured limit was exceeded (manifest size, files, streams).
    LimitExceeded,
    /// The receiver failed to read or write its disk.
    Io,
    /// A file failed its whole-file check.
    Verification,
    /// The receiver's disk is full (or its quota spent): another session fails the same way
    /// until space is freed there, so the sender gives up at once. An older sender reads it as
    /// `Other(9)`, which it does not retry either.
    NoSpace,
    /// Any other code, kept so that a newer peer's code is reported rather than rejected.
    Other(u16),
}

impl ErrorCode {
    /// The number on the wire.
    pub fn code(self) -> u16 {
        match self {
            Self::UnsupportedVersion => 1,
            Self::Protocol => 2,
            Self::PathRejected => 3,
            Self::UnknownSession => 4,
            Self::Superseded => 5,
            Self::LimitExceeded => 6,
            Self::Io => 7,
            Self::Verification => 8,
            Self::NoSpace => 9,
            Self::Other(code) => code,
        }
    }

    /// The code for a wire number.
    pub fn from_code(code: u16) -> Self {
        match code {
            1 => Self::UnsupportedVersion,
            2 => Self::Protocol,
            3 => Self::PathRejected,
            4 => Self::UnknownSession,
            5 => Self::Superseded,
            6 => Self::LimitExceeded,
            7 => Self::Io,
            8 => Self::Verification,
            9 => Self::NoSpace,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Other(code) => write!(f, "error code {code}"),
            known => std::fmt::Debug::fmt(known, f),
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Sender → receiver, first on every connection.
    Hello(Hello),
    /// Receiver → sender: the version and session.
    Welcome(Welcome),
    /// Sender → receiver: manifest header.
    ManifestStart(ManifestStart),
    /// Sender → receiver: one file or directory.
    ManifestEntry(ManifestEntry),
    /// Sender → receiver: chunk hashes of the last large file, continued over frames.
    ChunkHashes(Vec<Hash>),
    /// Sender → receiver: end of the manifest.
    ManifestEnd,
    /// Receiver → sender: pieces already stored durably; `last` ends the list.
    Have {
        /// Piece ranges.
        ranges: Vec<PieceRange>,
        /// Whether this is the last `Have` frame.
        last: bool,
    },
    /// Sender → receiver: a unit begins.
    UnitStart(UnitStart),
    /// Sender → receiver: unit content.
    Data(Bytes),
    /// Receiver → sender: the unit verified and was written.
    Ack {
        /// The unit.
        unit: u64,
    },
    /// Receiver → sender: a file or chunk of the unit failed its hash; nothing of it was
    /// written. The sender sends the unit again.
    Nack {
        /// The unit.
        unit: u64,
        /// The first file that failed.
        file: u32,
    },
    /// Receiver → sender: data bytes received on this connection so far; the sender measures
    /// delivered throughput with it at a finer grain than unit acks.
    Received {
        /// Cumulative data bytes on this connection.
        bytes: u64,
    },
    /// Sender → receiver: every unit was acknowledged; finalize.
    Done,
    /// Receiver → sender: every file is in place and verified.
    Complete {
        /// Files in place.
        files: u64,
        /// Bytes in place.
        bytes: u64,
    },
    /// Receiver → sender: these pieces are still missing (lost, or failed the whole-file
    /// check); send them and `Done` again. `last` ends the list.
    Missing {
        /// Piece ranges.
        ranges: Vec<PieceRange>,
        /// Whether this is the last `Missing` frame.
        last: bool,
    },
    /// Either way: a fatal error; the connection closes after it.
    Error {
        /// What kind of error.
        code: ErrorCode,
        /// For people.
        message: String,
    },
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Hello(_) => FrameKind::Hello,
            Self::Welcome(_) => FrameKind::Welcome,
            Self::ManifestStart(_) => FrameKind::ManifestStart,
            Self::ManifestEntry(_) => FrameKind::ManifestEntry,
            Self::ChunkHashes(_) => FrameKind::ChunkHashes,
            Self::ManifestEnd => FrameKind::ManifestEnd,
            Self::Have { .. } => FrameKind::Have,
            Self::UnitStart(_) => FrameKind::UnitStart,
            Self::Data(_) => FrameKind::Data,
            Self::Ack { .. } => FrameKind::Ack,
            Self::Nack { .. } => FrameKind::Nack,
            Self::Received { .. } => FrameKind::Received,
            Self::Done => FrameKind::Done,
            Self::Complete { .. } => FrameKind::Complete,
            Self::Missing { .. } => FrameKind::Missing,
            Self::Error { .. } => FrameKind::Error,
        }
    }

    /// Appends the encoded frame (header and payload) to `out`. Fails, leaving `out` as it
    /// was, when a field is over its limit, so nothing is sent that the peer would reject.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
        let result = self.encode_payload(out);
        if let Err(error) = result {
            out.truncate(start);
            return Err(error);
        }
        let kind = self.kind();
        let len = out.len() - start - FRAME_HEADER_LEN;
        if len > kind.max_payload() {
            out.truncate(start);
            return Err(WireError::FrameTooLarge {
                kind,
                len,
                max: kind.max_payload(),
            });
        }
        let header = encode_header(kind, len)?;
        out[start..start + FRAME_HEADER_LEN].copy_from_slice(&header);
        Ok(())
    }

    /// The encoded frame as a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let kind = self.kind();
        match self {
            Self::Hello(hello) => {
                out.extend_from_slice(&MAGIC);
                put_u16(out, hello.min_version);
                put_u16(out, hello.max_version);
                match hello.intent {
                    Intent::Open { transfer_id } => {
                        out.push(0);
                        out.extend_from_slice(&transfer_id);
                    }
                    Intent::Join {
                        transfer_id,
                        session,
                    } => {
                        out.push(1);
                        out.extend_from_slice(&transfer_id);
                        put_u64(out, session);
                    }
                }
            }
            Self::Welcome(welcome) => {
                put_u16(out, welcome.version);
                put_u64(out, welcome.session);
            }
            Self::ManifestStart(start) => {
                put_str(out, kind, "target", &start.target, MAX_PATH_BYTES)?;
                put_u64(out, start.chunk_size);
                put_u64(out, start.files);
                put_u64(out, start.dirs);
                put_u64(out, start.total_bytes);
            }
            Self::ManifestEntry(ManifestEntry::File {
                path,
                size,
                mode,
                hash,
            }) => {
                out.push(0);
                put_str(out, kind, "path", path, MAX_PATH_BYTES)?;
                put_u64(out, *size);
                put_u32(out, *mode);
                out.extend_from_slice(hash);
            }
            Self::ManifestEntry(ManifestEntry::Dir { path, mode }) => {
                out.push(1);
                put_str(out, kind, "path", path, MAX_PATH_BYTES)?;
                put_u32(out, *mode);
            }
            Self::ChunkHashes(hashes) => {
                put_count(out, kind, "hashes", hashes.len(), MAX_HASHES_PER_FRAME)?;
                for hash in hashes {
                    out.extend_from_slice(hash);
                }
            }
            Self::ManifestEnd | Self::Done => {}
            Self::Have { ranges, last } | Self::Missing { ranges, last } => {
                out.push(u8::from(*last));
                put_count(out, kind, "ranges", ranges.len(), MAX_RANGES_PER_FRAME)?;
                for range in ranges {
                    put_u64(out, range.start);
                    put_u64(out, range.count);
                }
            }
            Self::UnitStart(start) => {
                put_u64(out, start.unit);
                match &start.body {
                    UnitBody::Chunk { file, index } => {
                        out.push(0);
                        put_u32(out, *file);
                        put_u32(out, *index);
                    }
                    UnitBody::Pack { files } => {
                        out.push(1);
                        put_count(out, kind, "files", files.len(), MAX_PACK_FILES)?;
                        for file in files {
                            put_u32(out, *file);
                        }
                    }
                }
            }
            Self::Data(data) => {
                if data.len() > MAX_DATA_PAYLOAD {
                    return Err(WireError::FrameTooLarge {
                        kind,
                        len: data.len(),
                        max: MAX_DATA_PAYLOAD,
                    });
                }
                out.extend_from_slice(data);
            }
            Self::Ack { unit } => put_u64(out, *unit),
            Self::Nack { unit, file } => {
                put_u64(out, *unit);
                put_u32(out, *file);
            }
            Self::Received { bytes } => put_u64(out, *bytes),
            Self::Complete { files, bytes } => {
                put_u64(out, *files);
                put_u64(out, *bytes);
            }
            Self::Error { code, message } => {
                put_u16(out, code.code());
                // A long message is cut at a character boundary rather than refused: an error
                // report must always be sendable.
                let mut end = message.len().min(MAX_MESSAGE_BYTES);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                put_str(out, kind, "message", &message[..end], MAX_MESSAGE_BYTES)?;
            }
        }
        Ok(())
    }
}

/// The 5-byte header for a frame of `kind` with a `len`-byte payload.
pub fn encode_header(kind: FrameKind, len: usize) -> Result<[u8; FRAME_HEADER_LEN], WireError> {
    if len > kind.max_payload() {
        return Err(WireError::FrameTooLarge {
            kind,
            len,
            max: kind.max_payload(),
        });
    }
    let len = u32::try_from(len).map_err(|_| WireError::FrameTooLarge {
        kind,
        len,
        max: kind.max_payload(),
    })?;
    let mut header = [0; FRAME_HEADER_LEN];
    header[0] = kind.code();
    header[1..].copy_from_slice(&len.to_le_bytes());
    Ok(header)
}

/// Reads a frame header: the kind and the payload length, already checked against the
/// kind's ceiling.
pub fn decode_header(header: &[u8; FRAME_HEADER_LEN]) -> Result<(FrameKind, usize), WireError> {
    let kind = FrameKind::from_code(header[0])?;
    let len = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > kind.max_payload() {
        return Err(WireError::FrameTooLarge {
            kind,
            len,
            max: kind.max_payload(),
        });
    }
    Ok((kind, len))
}

/// Decodes one frame from the start of `buf`. `Ok(None)` means more bytes are needed;
/// otherwise the frame and the number of bytes it took. Never panics, whatever `buf` holds.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_LEN>() else {
        return Ok(None);
    };
    let (kind, len) = decode_header(header)?;
    let Some(payload) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
        return Ok(None);
    };
    let frame = decode_payload(kind, Bytes::copy_from_slice(payload))?;
    Ok(Some((frame, FRAME_HEADER_LEN + len)))
}

/// Decodes a payload of a known kind. `Data` keeps the buffer without copying.
pub fn decode_payload(kind: FrameKind, payload: Bytes) -> Result<Frame, WireError> {
    if payload.len() > kind.max_payload() {
        return Err(WireError::FrameTooLarge {
            kind,
            len: payload.len(),
            max: kind.max_payload(),
        });
    }
    if kind == FrameKind::Data {
        return Ok(Frame::Data(payload));
    }
    let mut cursor = Cursor {
        kind,
        buf: &payload,
        pos: 0,
    };
    let frame = match kind {
        FrameKind::Hello => {
            if cursor.take(MAGIC.len(), "magic")? != MAGIC {
                return Err(WireError::BadMagic);
            }
            let min_version = cursor.u16("min_version")?;
            let max_version = cursor.u16("max_version")?;
            let intent = match cursor.u8("intent")? {
                0 => Intent::Open {
                    transfer_id: cursor.hash("transfer_id")?,
                },
                1 => Intent::Join {
                    transfer_id: cursor.hash("transfer_id")?,
                    session: cursor.u64("session")?,
                },
                tag => {
                    return Err(WireError::BadTag {
                        kind,
                        field: "intent",
                        tag,
                    });
                }
            };
            Frame::Hello(Hello {
                min_version,
                max_version,
                intent,
            })
        }
        FrameKind::Welcome => Frame::Welcome(Welcome {
            version: cursor.u16("version")?,
            session: cursor.u64("session")?,
        }),
        FrameKind::ManifestStart => Frame::ManifestStart(ManifestStart {
            target: cursor.string("target", MAX_PATH_BYTES)?,
            chunk_size: cursor.u64("chunk_size")?,
            files: cursor.u64("files")?,
            dirs: cursor.u64("dirs")?,
            total_bytes: cursor.u64("total_bytes")?,
        }),
        FrameKind::ManifestEntry => match cursor.u8("entry")? {
            0 => Frame::ManifestEntry(ManifestEntry::File {
                path: cursor.string("path", MAX_PATH_BYTES)?,
                size: cursor.u64("size")?,
                mode: cursor.u32("mode")?,
                hash: cursor.hash("hash")?,
            }),
            1 => Frame::ManifestEntry(ManifestEntry::Dir {
                path: cursor.string("path", MAX_PATH_BYTES)?,
                mode: cursor.u32("mode")?,
            }),
            tag => {
                return Err(WireError::BadTag {
                    kind,
                    field: "entry",
                    tag,
                });
            }
        },
        FrameKind::ChunkHashes => {
            let count = cursor.count("hashes", MAX_HASHES_PER_FRAME, 32)?;
            let mut hashes = Vec::with_capacity(count);
            for _ in 0..count {
                hashes.push(cursor.hash("hash")?);
            }
            Frame::ChunkHashes(hashes)
        }
        FrameKind::ManifestEnd => Frame::ManifestEnd,
        FrameKind::Have | FrameKind::Missing => {
            let last = cursor.bool("last")?;
            let count = cursor.count("ranges", MAX_RANGES_PER_FRAME, 16)?;
            let mut ranges = Vec::with_capacity(count);
            for _ in 0..count {
                ranges.push(PieceRange {
                    start: cursor.u64("start")?,
                    count: cursor.u64("count")?,
                });
            }
            if kind == FrameKind::Have {
                Frame::Have { ranges, last }
            } else {
                Frame::Missing { ranges, last }
            }
        }
        FrameKind::UnitStart => {
            let unit = cursor.u64("unit")?;
            let body = match cursor.u8("body")? {
                0 => UnitBody::Chunk {
                    file: cursor.u32("file")?,
                    index: cursor.u32("index")?,
                },
                1 => {
                    let count = cursor.count("files", MAX_PACK_FILES, 4)?;
                    let mut files = Vec::with_capacity(count);
                    for _ in 0..count {
                        files.push(cursor.u32("file")?);
                    }
                    UnitBody::Pack { files }
                }
                tag => {
                    return Err(WireError::BadTag {
                        kind,
                        field: "body",
                        tag,
                    });
                }
            };
            Frame::UnitStart(UnitStart { unit, body })
        }
        FrameKind::Data => Frame::Data(payload.clone()),
        FrameKind::Ack => Frame::Ack {
            unit: cursor.u64("unit")?,
        },
        FrameKind::Nack => Frame::Nack {
            unit: cursor.u64("unit")?,
            file: cursor.u32("file")?,
        },
        FrameKind::Received => Frame::Received {
            bytes: cursor.u64("bytes")?,
        },
        FrameKind::Done => Frame::Done,
        FrameKind::Complete => Frame::Complete {
            files: cursor.u64("files")?,
            bytes: cursor.u64("bytes")?,
        },
        FrameKind::Error => Frame::Error {
            code: ErrorCode::from_code(cursor.u16("code")?),
            message: cursor.string("message", MAX_MESSAGE_BYTES)?,
        },
    };
    cursor.finish()?;
    Ok(frame)
}

/// Reads fields from a payload, failing (never panicking) on short input.
struct Cursor<'a> {
    kind: FrameKind,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        let available = self.buf.len().saturating_sub(self.pos);
        if len > available {
            return Err(WireError::Truncated {
                kind: self.kind,
                field,
                needed: len - available,
            });
        }
        let bytes = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(WireError::BadTag {
                kind: self.kind,
                field,
                tag,
            }),
        }
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn hash(&mut self, field: &'static str) -> Result<Hash, WireError> {
        self.array(field)
    }

    /// A list count, checked against its limit and against the bytes left, so a lying count
    /// cannot make the decoder reserve memory the payload does not back.
    fn count(
        &mut self,
        field: &'static str,
        max: usize,
        item_len: usize,
    ) -> Result<usize, WireError> {
        let count = usize::try_from(self.u32(field)?).unwrap_or(usize::MAX);
        if count > max {
            return Err(WireError::TooLong {
                kind: self.kind,
                field,
                len: count,
                max,
            });
        }
        let available = self.buf.len().saturating_sub(self.pos);
        let needed = count.saturating_mul(item_len);
        if needed > available {
            return Err(WireError::Truncated {
                kind: self.kind,
                field,
                needed: needed - available,
            });
        }
        Ok(count)
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, WireError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(WireError::TooLong {
                kind: self.kind,
                field,
                len,
                max,
            });
        }
        let bytes = self.take(len, field)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::InvalidUtf8 {
            kind: self.kind,
            field,
        })
    }

    fn finish(&self) -> Result<(), WireError> {
        let extra = self.buf.len().saturating_sub(self.pos);
        if extra > 0 {
            return Err(WireError::TrailingBytes {
                kind: self.kind,
                extra,
            });
        }
        Ok(())
    }
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_count(
    out: &mut Vec<u8>,
    kind: FrameKind,
    field: &'static str,
    len: usize,
    max: usize,
) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::TooLong {
            kind,
            field,
            len,
            max,
        });
    }
    // `max` is far below u32::MAX, so the conversion cannot fail after the check.
    put_u32(out, u32::try_from(len).unwrap_or(u32::MAX));
    Ok(())
}

fn put_str(
    out: &mut Vec<u8>,
    kind: FrameKind,
    field: &'static str,
    value: &str,
    max: usize,
) -> Result<(), WireError> {
    let len = value.len();
    let wire_len = u16::try_from(len).ok().filter(|_| len <= max);
    let Some(wire_len) = wire_len else {
        return Err(WireError::TooLong {
            kind,
            field,
            len,
            max,
        });
    };
    put_u16(out, wire_len);
    out.extend_from_slice(value.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arbitrary_string(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..40).prop_map(move |chars| {
            let mut text: String = chars.into_iter().collect();
            while text.len() > max {
                text.pop();
            }
            text
        })
    }

    fn arbitrary_ranges() -> impl Strategy<Value = Vec<PieceRange>> {
        proptest::collection::vec(
            (any::<u64>(), any::<u64>()).prop_map(|(start, count)| PieceRange { start, count }),
            0..20,
        )
    }

    fn arbitrary_frame() -> impl Strategy<Value = Frame> {
        let hash = any::<[u8; 32]>();
        prop_oneof![
            (
                any::<u16>(),
                any::<u16>(),
                hash,
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(min_version, max_version, transfer_id, session)| {
                    Frame::Hello(Hello {
                        min_version,
                        max_version,
                        intent: match session {
                            Some(session) => Intent::Join {
                                transfer_id,
                                session,
                            },
                            None => Intent::Open { transfer_id },
                        },
                    })
                }),
            (any::<u16>(), any::<u64>())
                .prop_map(|(version, session)| Frame::Welcome(Welcome { version, session })),
            (
                arbitrary_string(100),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(target, chunk_size, files, dirs, total_bytes)| {
                    Frame::ManifestStart(ManifestStart {
                        target,
                        chunk_size,
                        files,
                        dirs,
                        total_bytes,
                    })
                }),
            (arbitrary_string(200), any::<u64>(), any::<u32>(), hash).prop_map(
                |(path, size, mode, hash)| Frame::ManifestEntry(ManifestEntry::File {
                    path,
                    size,
                    mode,
                    hash
                })
            ),
            (arbitrary_string(200), any::<u32>())
                .prop_map(|(path, mode)| Frame::ManifestEntry(ManifestEntry::Dir { path, mode })),
            proptest::collection::vec(hash, 0..10).prop_map(Frame::ChunkHashes),
            Just(Frame::ManifestEnd),
            (arbitrary_ranges(), any::<bool>())
                .prop_map(|(ranges, last)| Frame::Have { ranges, last }),
            (arbitrary_ranges(), any::<bool>())
                .prop_map(|(ranges, last)| Frame::Missing { ranges, last }),
            (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(unit, file, index)| {
                Frame::UnitStart(UnitStart {
                    unit,
                    body: UnitBody::Chunk { file, index },
                })
            }),
            (any::<u64>(), proptest::collection::vec(any::<u32>(), 0..50)).prop_map(
                |(unit, files)| Frame::UnitStart(UnitStart {
                    unit,
                    body: UnitBody::Pack { files },
                })
            ),
            proptest::collection::vec(any::<u8>(), 0..2000)
                .prop_map(|data| Frame::Data(Bytes::from(data))),
            any::<u64>().prop_map(|unit| Frame::Ack { unit }),
            (any::<u64>(), any::<u32>()).prop_map(|(unit, file)| Frame::Nack { unit, file }),
            any::<u64>().prop_map(|bytes| Frame::Received { bytes }),
            Just(Frame::Done),
            (any::<u64>(), any::<u64>())
                .prop_map(|(files, bytes)| Frame::Complete { files, bytes }),
            (any::<u16>(), arbitrary_string(300)).prop_map(|(code, message)| Frame::Error {
                code: ErrorCode::from_code(code),
                message
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in arbitrary_frame()) {
            let bytes = frame.to_bytes().unwrap();
            let (decoded, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(decoded, frame);
        }

        #[test]
        fn a_prefix_asks_for_more_and_never_misdecodes(frame in arbitrary_frame(), cut in any::<proptest::sample::Index>()) {
            let bytes = frame.to_bytes().unwrap();
            let cut = cut.index(bytes.len());
            prop_assert_eq!(decode(&bytes[..cut]), Ok(None));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            // Whatever comes back, it must come back; and a frame it accepts must re-encode to
            // the same bytes, so the decoder never invents content.
            if let Ok(Some((frame, used))) = decode(&bytes) {
                prop_assert!(used <= bytes.len());
                let again = frame.to_bytes().unwrap();
                prop_assert_eq!(&again[..], &bytes[..used]);
            }
        }

        #[test]
        fn valid_header_with_garbage_payload_never_panics(
            kind in proptest::sample::select(FrameKind::ALL.to_vec()),
            payload in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let len = payload.len().min(kind.max_payload());
            let mut bytes = encode_header(kind, len).unwrap().to_vec();
            bytes.extend_from_slice(&payload[..len]);
            let _ = decode(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(frame in arbitrary_frame(), position in any::<proptest::sample::Index>(), flip in 1_u8..=255) {
            let mut bytes = frame.to_bytes().unwrap();
            let position = position.index(bytes.len());
            bytes[position] ^= flip;
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn oversized_announcements_are_refused_before_reading() {
        let mut header = encode_header(FrameKind::Data, 0).unwrap();
        header[1..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&header),
            Err(WireError::FrameTooLarge {
                kind: FrameKind::Data,
                ..
            })
        ));
        let mut header = encode_header(FrameKind::ManifestEntry, 0).unwrap();
        header[1..].copy_from_slice(&((MAX_FRAME_PAYLOAD as u32) + 1).to_le_bytes());
        assert!(matches!(
            decode(&header),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn a_lying_list_count_is_refused_without_allocating() {
        // A ChunkHashes frame claiming 8192 hashes but carrying none.
        let payload = 8192_u32.to_le_bytes();
        let mut bytes = encode_header(FrameKind::ChunkHashes, payload.len())
            .unwrap()
            .to_vec();
        bytes.extend_from_slice(&payload);
        assert!(matches!(
            decode(&bytes),
            Err(WireError::Truncated {
                field: "hashes",
                ..
            })
        ));
        // One claiming more than the limit.
        let payload = (MAX_HASHES_PER_FRAME as u32 + 1).to_le_bytes();
        let mut bytes = encode_header(FrameKind::ChunkHashes, payload.len())
            .unwrap()
            .to_vec();
        bytes.extend_from_slice(&payload);
        assert!(matches!(decode(&bytes), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn hello_without_magic_is_named() {
        let mut bytes = Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            intent: Intent::Open {
                transfer_id: [7; 32],
            },
        })
        .to_bytes()
        .unwrap();
        bytes[FRAME_HEADER_LEN] = b'X';
        assert_eq!(decode(&bytes), Err(WireError::BadMagic));
    }

    #[test]
    fn unknown_kinds_and_tags_are_errors() {
        assert_eq!(
            decode(&[0xee, 0, 0, 0, 0]),
            Err(WireError::UnknownKind(0xee))
        );
        let mut bytes = Frame::Have {
            ranges: vec![],
            last: true,
        }
        .to_bytes()
        .unwrap();
        bytes[FRAME_HEADER_LEN] = 2;
        assert!(matches!(decode(&bytes), Err(WireError::BadTag { .. })));
    }

    #[test]
    fn encoding_refuses_what_decoding_would_refuse() {
        let long = "x".repeat(MAX_PATH_BYTES + 1);
        let frame = Frame::ManifestEntry(ManifestEntry::Dir {
            path: long,
            mode: 0,
        });
        let mut out = vec![9];
        assert!(matches!(
            frame.encode(&mut out),
            Err(WireError::TooLong { .. })
        ));
        assert_eq!(out, vec![9], "a failed encode leaves the buffer as it was");
        let too_many = Frame::UnitStart(UnitStart {
            unit: 0,
            body: UnitBody::Pack {
                files: vec![0; MAX_PACK_FILES + 1],
            },
        });
        assert!(too_many.to_bytes().is_err());
    }

    #[test]
    fn long_error_messages_are_cut_not_refused() {
        let frame = Frame::Error {
            code: ErrorCode::Io,
            message: "é".repeat(MAX_MESSAGE_BYTES),
        };
        let bytes = frame.to_bytes().unwrap();
        let (decoded, _) = decode(&bytes).unwrap().unwrap();
        let Frame::Error { message, .. } = decoded else {
            panic!("not an error frame")
        };
        assert!(message.len() <= MAX_MESSAGE_BYTES && message.chars().all(|c| c == 'é'));
    }
}
