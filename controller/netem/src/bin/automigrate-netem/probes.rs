//! Traffic probes run across an [`EmulatedPair`], from side A to side B: UDP ping-pong for RTT,
//! bulk TCP for throughput, and a numbered UDP stream for loss. Each probe opens its sockets
//! inside the namespaces (through `run_in`) and drives them from ordinary threads of this
//! process; all traffic stays between the pair's two addresses.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use automigrate_netem::{
    EmulatedPair, LinkStats, Side, set_socket_congestion_control, socket_congestion_control,
};

/// How long blocking socket calls wait before re-checking the stop flag.
const POLL: Duration = Duration::from_millis(100);

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Sleeps until `deadline` (no-op if it has passed).
fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        thread::sleep(deadline - now);
    }
}

fn bind_udp(pair: &EmulatedPair, side: Side) -> anyhow::Result<UdpSocket> {
    let address = SocketAddr::from((pair.addr(side), 0));
    let socket = pair
        .run_in(side, || UdpSocket::bind(address))?
        .with_context(|| format!("binding UDP on {address}"))?;
    socket.set_read_timeout(Some(POLL))?;
    Ok(socket)
}

/// Round-trip times of `count` UDP pings from A to an echo on B, one sent every `interval`
/// (pipelined: a ping does not wait for the previous reply). Lost pings are simply missing.
pub fn udp_rtt(
    pair: &EmulatedPair,
    count: u64,
    interval: Duration,
    expected_rtt: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let server = bind_udp(pair, Side::B)?;
    let client = bind_udp(pair, Side::A)?;
    client.connect(server.local_addr()?)?;
    let stop = AtomicBool::new(false);
    let base = Instant::now();
    thread::scope(|scope| -> anyhow::Result<Vec<Duration>> {
        scope.spawn(|| {
            let mut buffer = [0_u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((length, from)) = server.recv_from(&mut buffer) {
                    // A lost echo is just a missing sample.
                    let _ = server.send_to(buffer.get(..length).unwrap_or_default(), from);
                }
            }
        });
        let receiver = scope.spawn(|| {
            let mut rtts = Vec::new();
            let mut buffer = [0_u8; 64];
            while !stop.load(Ordering::Relaxed) && (rtts.len() as u64) < count {
                if let Ok(16) = client.recv(&mut buffer) {
                    let mut sent_ns = [0_u8; 8];
                    sent_ns.copy_from_slice(buffer.get(8..16).unwrap_or(&[0; 8]));
                    let sent = Duration::from_nanos(u64::from_le_bytes(sent_ns));
                    rtts.push(base.elapsed().saturating_sub(sent));
                }
            }
            rtts
        });
        for sequence in 0..count {
            sleep_until(base + interval * u32::try_from(sequence).unwrap_or(u32::MAX));
            let sent_ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let mut payload = [0_u8; 16];
            payload[..8].copy_from_slice(&sequence.to_le_bytes());
            payload[8..].copy_from_slice(&sent_ns.to_le_bytes());
            client.send(&payload).context("sending a ping")?;
        }
        // Let the last replies come back, then stop whatever is still waiting.
        let grace = (expected_rtt * 3).max(Duration::from_millis(300));
        let deadline = Instant::now() + grace;
        while !receiver.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        receiver
            .join()
            .map_err(|_| anyhow::anyhow!("RTT receiver panicked"))
    })
}

/// What a bulk TCP transfer achieved during its measured window.
#[derive(Debug, Clone, Copy)]
pub struct BulkResult {
    /// Application bytes received per second, in bits per second.
    pub goodput_bps: f64,
    /// IP bytes the relay delivered A -> B per second, in bits per second.
    pub ip_rate_bps: f64,
    /// The A -> B link's counters over the window.
    pub window_stats: LinkStats,
}

/// Runs `streams` parallel TCP connections A -> B with congestion control `algorithm`; measures
/// from `warmup` after the start for `window`.
pub fn tcp_bulk(
    pair: &EmulatedPair,
    algorithm: &str,
    streams: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<BulkResult> {
    let address = SocketAddr::from((pair.addr(Side::B), 0));
    let listener = pair
        .run_in(Side::B, || TcpListener::bind(address))?
        .context("binding the TCP sink")?;
    let server = listener.local_addr()?;
    let mut senders = Vec::with_capacity(streams);
    let mut receivers = Vec::with_capacity(streams);
    for _ in 0..streams {
        let sender = pair
            .run_in(Side::A, || {
                TcpStream::connect_timeout(&server, Duration::from_secs(5))
            })?
            .context("connecting a TCP stream across the pair")?;
        let (receiver, _) = listener.accept().context("accepting a TCP stream")?;
        // Per socket: a namespace default of `cubic` is refused by the kernel unless the host
        // allows it (see the library's congestion module).
        for stream in [&sender, &receiver] {
            set_socket_congestion_control(stream, algorithm)?;
        }
        let in_use = socket_congestion_control(&sender)?;
        if in_use != algorithm {
            bail!("asked for congestion control {algorithm}, the socket uses {in_use}");
        }
        sender.set_write_timeout(Some(POLL))?;
        receiver.set_read_timeout(Some(POLL))?;
        senders.push(sender);
        receivers.push(receiver);
    }
    let stop = AtomicBool::new(false);
    let received = AtomicU64::new(0);
    thread::scope(|scope| -> anyhow::Result<BulkResult> {
        for mut receiver in receivers {
            let (stop, received) = (&stop, &received);
            scope.spawn(move || {
                let mut buffer = vec![0_u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match receiver.read(&mut buffer) {
                        Ok(0) => return,
                        Ok(length) => {
                            received.fetch_add(length as u64, Ordering::Relaxed);
                        }
                        Err(error) if is_timeout(&error) => {}
                        Err(_) => return,
                    }
                }
            });
        }
        for mut sender in senders {
            let stop = &stop;
            scope.spawn(move || {
                let buffer = vec![0x5a_u8; 128 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match sender.write(&buffer) {
                        Ok(_) => {}
                        Err(error) if is_timeout(&error) => {}
                        Err(_) => return,
                    }
                }
            });
        }
        let snapshot = || -> anyhow::Result<(Instant, u64, LinkStats)> {
            Ok((
                Instant::now(),
                received.load(Ordering::Relaxed),
                pair.stats(Side::A)?,
            ))
        };
        thread::sleep(warmup);
        let before = snapshot();
        thread::sleep(window);
        let after = snapshot();
        stop.store(true, Ordering::Relaxed);
        let ((t0, app0, stats0), (t1, app1, stats1)) = (before?, after?);
        let seconds = (t1 - t0).as_secs_f64();
        let window_stats = stats1.since(&stats0);
        Ok(BulkResult {
            goodput_bps: (app1 - app0) as f64 * 8.0 / seconds,
            ip_rate_bps: window_stats.delivered_bytes as f64 * 8.0 / seconds,
            window_stats,
        })
    })
}

/// Outcome of a numbered UDP stream.
#[derive(Debug, Clone, Copy)]
pub struct LossResult {
    /// Datagrams sent by A.
    pub sent: u64,
    /// Datagrams received by B.
    pub received: u64,
    /// Packets the relay read from A (fewer than `sent` if A's TUN queue overflowed).
    pub relay_offered: u64,
    /// Packets the relay dropped as random loss.
    pub relay_lost: u64,
    /// Packets the relay wrote to B (more than `received` if B's socket buffer overflowed).
    pub relay_delivered: u64,
}

/// Sends `count` small datagrams A -> B at about `packets_per_second` and counts arrivals.
pub fn udp_loss(
    pair: &EmulatedPair,
    count: u64,
    packets_per_second: u64,
) -> anyhow::Result<LossResult> {
    if packets_per_second == 0 {
        bail!("packet rate must be positive");
    }
    let sink = bind_udp(pair, Side::B)?;
    // Measure the link, not the sink: a 4 MiB buffer rides out the sink thread being descheduled.
    nix::sys::socket::setsockopt(&sink, nix::sys::socket::sockopt::RcvBufForce, &(4 << 20))
        .context("enlarging the UDP sink's receive buffer")?;
    let source = bind_udp(pair, Side::A)?;
    source.connect(sink.local_addr()?)?;
    let stop = AtomicBool::new(false);
    let before = pair.stats(Side::A)?;
    let received = thread::scope(|scope| -> anyhow::Result<u64> {
        let counter = scope.spawn(|| {
            let mut received = 0_u64;
            let mut buffer = [0_u8; 128];
            while !stop.load(Ordering::Relaxed) {
                if sink.recv(&mut buffer).is_ok() {
                    received += 1;
                }
            }
            received
        });
        // Bursts of up to one millisecond's worth keep the pacing cheap and the bursts small.
        let per_burst = packets_per_second.div_ceil(1000).max(1);
        let start = Instant::now();
        let payload = [0xa5_u8; 64];
        let mut sent = 0;
        let mut burst = 0_u32;
        while sent < count {
            sleep_until(start + Duration::from_millis(1) * burst);
            for _ in 0..per_burst.min(count - sent) {
                source.send(&payload).context("sending a datagram")?;
                sent += 1;
            }
            burst += 1;
        }
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        counter
            .join()
            .map_err(|_| anyhow::anyhow!("UDP counter panicked"))
    })?;
    let window = pair.stats(Side::A)?.since(&before);
    Ok(LossResult {
        sent: count,
        received,
        relay_offered: window.offered_packets,
        relay_lost: window.dropped_loss,
        relay_delivered: window.delivered_packets,
    })
}
