//! The host's way into the control plane: a TCP port forward from a host loopback port to the
//! API server inside the `control` namespace, as `kubectl port-forward` would give a user.
//!
//! Data model: one accept thread on the host listener (non-blocking, polled, so [`Forward`]
//! can stop it); per accepted connection, the upstream socket is created and connected on a
//! thread that entered the control namespace ([`EmulatedNetwork::run_in`]: a socket keeps the
//! namespace it was made in, wherever its descriptor is used later), then two threads copy the
//! bytes each way. The copy threads end when either side closes, or when [`Forward::stop`]
//! shuts every open socket down.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the accept loop sleeps when nothing is waiting (also its stop latency).
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// How long connecting to the API server from the control namespace may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running port forward; stops (and closes every forwarded connection) on drop.
#[derive(Debug)]
pub(crate) struct Forward {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Arc<Open>,
    thread: Option<JoinHandle<()>>,
}

/// The forwarded connections still open (both sockets of each, by connection number), so
/// that [`Forward::stop`] can shut them down; each removes itself when its copying ends.
type Open = Mutex<BTreeMap<u64, [TcpStream; 2]>>;

/// Connects to `target` from inside the control namespace.
pub(crate) type Connector = Arc<dyn Fn() -> std::io::Result<TcpStream> + Send + Sync>;

impl Forward {
    /// Listens on `127.0.0.1:0` and forwards every connection through `connect`.
    pub(crate) fn start(connect: Connector) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(BTreeMap::new()));
        let thread = {
            let (stop, open) = (stop.clone(), open.clone());
            std::thread::Builder::new()
                .name("kube-forward".into())
                .spawn(move || accept_loop(&listener, &connect, &stop, &open))?
        };
        Ok(Self {
            local,
            stop,
            open,
            thread: Some(thread),
        })
    }

    /// The host address kubectl connects to.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting and shuts every forwarded connection down.
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Ok(mut open) = self.open.lock() {
            for stream in std::mem::take(&mut *open).into_values().flatten() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A connector that makes the socket inside a namespace, with a bounded connect.
pub(crate) fn connect_in_namespace(namespace: String, target: SocketAddr) -> Connector {
    Arc::new(move || {
        automigrate_netem::run_in_namespace(&namespace, || {
            TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        })
        .map_err(|error| std::io::Error::other(error.to_string()))?
    })
}

fn accept_loop(listener: &TcpListener, connect: &Connector, stop: &AtomicBool, open: &Arc<Open>) {
    let next = AtomicU64::new(0);
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let connect = connect.clone();
                let open = open.clone();
                let number = next.fetch_add(1, Ordering::Relaxed);
                // Connecting may take a while when the control namespace is slow; never block
                // the accept loop on it.
                let spawned = std::thread::Builder::new()
                    .name("kube-forward-conn".into())
                    .spawn(move || forward_one(number, client, &connect, &open));
                if let Err(error) = spawned {
                    tracing::warn!(%error, "port forward: cannot start a connection thread");
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(error) => {
                tracing::warn!(%error, "port forward: accept failed");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

fn forward_one(number: u64, client: TcpStream, connect: &Connector, open: &Open) {
    let _ = client.set_nonblocking(false);
    let upstream = match connect() {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::debug!(%error, "port forward: cannot reach the API server");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client_read), Ok(upstream_write), Ok(client_keep), Ok(upstream_keep)) = (
        client.try_clone(),
        upstream.try_clone(),
        client.try_clone(),
        upstream.try_clone(),
    ) else {
        return;
    };
    if let Ok(mut open) = open.lock() {
        open.insert(number, [client_keep, upstream_keep]);
    }
    let up = std::thread::Builder::new()
        .name("kube-forward-up".into())
        .spawn(move || copy(client_read, upstream_write));
    copy(upstream, client);
    if let Ok(up) = up {
        let _ = up.join();
    }
    if let Ok(mut open) = open.lock() {
        open.remove(&number);
    }
}

/// Copies until EOF or error, then closes the writing side and the reading side.
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = [0_u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => {
                if to
                    .write_all(buffer.get(..read).unwrap_or_default())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An echo server on the host loopback, and a forward to it.
    fn echo_forward() -> Forward {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in server.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut reader = stream.try_clone().unwrap();
                    let mut writer = stream;
                    let _ = std::io::copy(&mut reader, &mut writer);
                });
            }
        });
        Forward::start(Arc::new(move || TcpStream::connect(target))).unwrap()
    }

    fn open_count(forward: &Forward) -> usize {
        forward.open.lock().unwrap().len()
    }

    #[test]
    fn bytes_cross_both_ways_and_finished_connections_are_forgotten() {
        let forward = echo_forward();
        for round in 0..20_u8 {
            let mut client = TcpStream::connect(forward.local_addr()).unwrap();
            client.write_all(&[round; 1000]).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut echoed = Vec::new();
            client.read_to_end(&mut echoed).unwrap();
            assert_eq!(echoed, vec![round; 1000]);
        }
        // Every connection closed: none may stay in the table (each held two descriptors,
        // and a long demo makes thousands of kubectl calls).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while open_count(&forward) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(open_count(&forward), 0);
    }

    #[test]
    fn stop_closes_open_connections() {
        let mut forward = echo_forward();
        let mut client = TcpStream::connect(forward.local_addr()).unwrap();
        client.write_all(b"ping").unwrap();
        let mut answer = [0_u8; 4];
        client.read_exact(&mut answer).unwrap();
        forward.stop();
        let mut rest = Vec::new();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The forward shut the connection down: EOF (or a reset), not a hang.
        let read = client.read_to_end(&mut rest);
        assert!(read.is_ok_and(|n| n == 0) || rest.is_empty());
    }
}
