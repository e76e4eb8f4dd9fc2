//! The host's way into the control plane: a TCP port forward from a host loopback port to the
//! API server inside the `control` namespace, as `kubectl port-forward` would give a user.
//!
//! Data model: one accept thread on the host listener (non-blocking, polled, so [`Forward`]
//! can stop it); per accepted connection, the upstream socket is created and connected on a
//! thread that entered the control namespace ([`EmulatedNetwork::run_in`]: a socket keeps the
//! namespace it was made in, wherever its descriptor is used later), then two threads copy the
//! bytes each way. The copy threads end when either side closes, or when [`Forward::stop`]
//! shuts every open socket down.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
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
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

/// Connects to `target` from inside the control namespace.
pub(crate) type Connector = Arc<dyn Fn() -> std::io::Result<TcpStream> + Send + Sync>;

impl Forward {
    /// Listens on `127.0.0.1:0` and forwards every connection through `connect`.
    pub(crate) fn start(connect: Connector) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
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
            for stream in open.drain(..) {
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

fn accept_loop(
    listener: &TcpListener,
    connect: &Connector,
    stop: &AtomicBool,
    open: &Arc<Mutex<Vec<TcpStream>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let connect = connect.clone();
                let open = open.clone();
                // Connecting may take a while when the control namespace is slow; never block
                // the accept loop on it.
                let spawned = std::thread::Builder::new()
                    .name("kube-forward-conn".into())
                    .spawn(move || forward_one(client, &connect, &open));
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

fn forward_one(client: TcpStream, connect: &Connector, open: &Mutex<Vec<TcpStream>>) {
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
        // Forget connections that are done (both ends were shut down by their copy threads).
        open.retain(|stream| stream.peer_addr().is_ok());
        open.push(client_keep);
        open.push(upstream_keep);
    }
    let up = std::thread::Builder::new()
        .name("kube-forward-up".into())
        .spawn(move || copy(client_read, upstream_write));
    copy(upstream, client);
    if let Ok(up) = up {
        let _ = up.join();
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
