//! Frames over an async byte stream (a TLS stream in practice), and TCP socket set-up.
//!
//! The reader checks each header against its kind's ceiling before reading the payload, so a
//! peer can make it buffer at most one bounded frame. Data payloads are written straight after
//! their header without building a frame, so file bytes are copied once into TLS.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::wire::{self, FRAME_HEADER_LEN, Frame, FrameKind, WireError};

/// Why a frame could not be read or written, or a socket set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The bytes were not a valid frame.
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    /// The stream failed.
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The reason.
        source: std::io::Error,
    },
    /// The peer closed the stream in the middle of a frame.
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    /// Nothing arrived in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// The congestion control algorithm could not be set.
    #[error(
        "setting congestion control `{name}`: {source} (is the module loaded? see /proc/sys/net/ipv4/tcp_available_congestion_control)"
    )]
    Congestion {
        /// The algorithm.
        name: String,
        /// The errno.
        source: nix::errno::Errno,
    },
}

/// Reads frames.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a byte stream.
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// The next frame and its encoded length; `None` when the peer closed the stream cleanly
    /// between frames.
    pub async fn next(&mut self) -> Result<Option<(Frame, usize)>, ConnError> {
        let mut header = [0_u8; FRAME_HEADER_LEN];
        let mut filled = 0;
        while filled < FRAME_HEADER_LEN {
            let read = self
                .inner
                .read(&mut header[filled..])
                .await
                .map_err(|source| ConnError::Io { op: "read", source })?;
            if read == 0 {
                return if filled == 0 {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
            filled += read;
        }
        let (kind, len) = wire::decode_header(&header)?;
        let mut payload = BytesMut::zeroed(len);
        self.inner
            .read_exact(&mut payload)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::UnexpectedEof => ConnError::Truncated,
                _ => ConnError::Io { op: "read", source },
            })?;
        let frame = wire::decode_payload(kind, payload.freeze())?;
        Ok(Some((frame, FRAME_HEADER_LEN + len)))
    }

    /// The byte stream, with whatever it had buffered.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Like [`FrameReader::next`] with a time limit; a clean close is an error here.
    pub async fn expect(
        &mut self,
        limit: Duration,
        what: &'static str,
    ) -> Result<Frame, ConnError> {
        match tokio::time::timeout(limit, self.next()).await {
            Err(_) => Err(ConnError::Timeout(limit, what)),
            Ok(Ok(Some((frame, _)))) => Ok(frame),
            Ok(Ok(None)) => Err(ConnError::Truncated),
            Ok(Err(error)) => Err(error),
        }
    }
}

/// Writes frames.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    buffer: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps a byte stream.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buffer: Vec::with_capacity(256),
        }
    }

    /// The byte stream.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Writes one frame (not flushed).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        self.buffer.clear();
        frame.encode(&mut self.buffer)?;
        self.inner
            .write_all(&self.buffer)
            .await
            .map_err(|source| ConnError::Io {
                op: "write",
                source,
            })
    }

    /// Writes a `Data` frame carrying `data` (at most `MAX_DATA_PAYLOAD` bytes; not flushed).
    pub async fn send_data(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let header = wire::encode_header(FrameKind::Data, data.len())?;
        self.buffer.clear();
        self.buffer.extend_from_slice(&header);
        self.buffer.extend_from_slice(data);
        self.inner
            .write_all(&self.buffer)
            .await
            .map_err(|source| ConnError::Io {
                op: "write",
                source,
            })
    }

    /// Pushes buffered bytes to the peer.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        self.inner.flush().await.map_err(|source| ConnError::Io {
            op: "flush",
            source,
        })
    }

    /// Ends the stream (TLS close_notify, then FIN).
    pub async fn shutdown(&mut self) -> Result<(), ConnError> {
        self.inner.shutdown().await.map_err(|source| ConnError::Io {
            op: "shutdown",
            source,
        })
    }
}

/// Sets the congestion control algorithm of a socket.
pub fn set_congestion<S: std::os::fd::AsFd>(socket: &S, name: &str) -> Result<(), ConnError> {
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::TcpCongestion,
        &OsString::from(name),
    )
    .map_err(|source| ConnError::Congestion {
        name: name.to_owned(),
        source,
    })
}

/// Closes `stream` with a reset: bytes still in its send buffer are dropped instead of being
/// delivered before a FIN. For a connection whose remaining bytes nobody needs.
pub fn reset(stream: TcpStream) {
    // On failure the close is merely orderly: the peer reads the rest, then the end.
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Connects with an optional congestion control algorithm and a time limit; returns the
/// stream and how long the TCP handshake took (about one round trip).
pub async fn connect(
    peer: SocketAddr,
    congestion: Option<&str>,
    limit: Duration,
) -> Result<(TcpStream, Duration), ConnError> {
    let socket = match peer {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|source| ConnError::Io {
        op: "socket",
        source,
    })?;
    if let Some(name) = congestion {
        set_congestion(&socket, name)?;
    }
    let started = std::time::Instant::now();
    let stream = tokio::time::timeout(limit, socket.connect(peer))
        .await
        .map_err(|_| ConnError::Timeout(limit, "the TCP connection"))?
        .map_err(|source| ConnError::Io {
            op: "connect",
            source,
        })?;
    let handshake = started.elapsed();
    stream.set_nodelay(true).map_err(|source| ConnError::Io {
        op: "set TCP_NODELAY",
        source,
    })?;
    Ok((stream, handshake))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_cross_a_stream_and_a_cut_is_named() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut writer = FrameWriter::new(client);
        writer.send(&Frame::Ack { unit: 5 }).await.unwrap();
        writer.send_data(b"hello").await.unwrap();
        writer.flush().await.unwrap();
        // Half a header, then the end.
        let mut inner = writer.inner;
        inner.write_all(&[0x22, 8]).await.unwrap();
        drop(inner);
        let mut reader = FrameReader::new(server);
        assert_eq!(
            reader.next().await.unwrap().unwrap().0,
            Frame::Ack { unit: 5 }
        );
        assert_eq!(
            reader.next().await.unwrap().unwrap().0,
            Frame::Data(bytes::Bytes::from_static(b"hello"))
        );
        assert!(matches!(reader.next().await, Err(ConnError::Truncated)));
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_before_allocating() {
        let (mut client, server) = tokio::io::duplex(64);
        client
            .write_all(&[0x21, 0xff, 0xff, 0xff, 0x7f])
            .await
            .unwrap();
        let mut reader = FrameReader::new(server);
        assert!(matches!(
            reader.next().await,
            Err(ConnError::Wire(WireError::FrameTooLarge { .. }))
        ));
    }
}
