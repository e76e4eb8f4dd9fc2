//! The latency prober: each agent measures round-trip time and loss to its peers, for
//! `GET /v1/peers` and the metrics the controller's link model reads.
//!
//! Protocol: a tiny UDP echo on the transfer port number (UDP and TCP ports are separate, so
//! it shares the number, and the firewall rule, with the transfer engine without touching its
//! TLS listener). A probe is [`PROBE_LEN`] bytes: the magic `AMPROBE1`, a sequence number and a
//! per-prober nonce. The [`Responder`] sends back exactly what it received, nothing for anything
//! else, and at most [`RESPONDER_MAX_PER_SECOND`] answers a second, so it cannot amplify or be
//! used to flood. The [`Prober`] sends one probe per peer per interval and waits up to
//! `timeout` for its echo (late or foreign answers are ignored). Per peer it keeps the last
//! `window` outcomes: RTT is the median of the answered ones, loss the fraction unanswered.
//! Apart from that window it says whether the peer answers *now* ([`ANSWERING_PROBES`]): the
//! controller's peer-confirmed failure detection needs that, not a 20-probe average.
//! UDP rather than a TCP connect measures loss directly (a lost SYN shows up as a 1 s
//! retransmit, not as loss) and costs the peer no TLS handshake.
//!
//! Peers come from a [`PeerSource`]: a fixed list and/or a file re-read every round, lines
//! `node host:port` or `node=host:port` (`#` comments), so a ConfigMap update needs no restart.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::api::{Peer, PeerLatency};
use crate::metrics::{AgentMetrics, names};

pub const PROBE_MAGIC: &[u8; 8] = b"AMPROBE1";
pub const PROBE_LEN: usize = 24;
pub const RESPONDER_MAX_PER_SECOND: u32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum PeerListError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peer entry `{entry}`: {reason}")]
    Entry { entry: String, reason: String },
}

/// Parses `node=host:port` or `node host:port`.
pub fn parse_peer(entry: &str) -> Result<Peer, PeerListError> {
    let bad = |reason: &str| PeerListError::Entry {
        entry: entry.to_string(),
        reason: reason.to_string(),
    };
    let entry = entry.trim();
    let (node, address) = entry
        .split_once('=')
        .or_else(|| entry.split_once(char::is_whitespace))
        .ok_or_else(|| bad("write `node=host:port`"))?;
    let (node, address) = (node.trim(), address.trim());
    crate::api::validate_pod_name(node).map_err(|error| bad(&error.to_string()))?;
    validate_address(address).map_err(|reason| bad(&reason))?;
    Ok(Peer {
        node: node.to_string(),
        address: address.to_string(),
    })
}

/// `host:port` with a non-zero port (host a name, an IPv4, or `[IPv6]`).
pub fn validate_address(address: &str) -> Result<(), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` is not host:port"))?;
    let port: u16 = port.parse().map_err(|_| format!("`{address}`: bad port"))?;
    if port == 0 {
        return Err(format!("`{address}`: port 0"));
    }
    let host = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{address}`: bad host"))
    }
}

/// Parses a peers file's text.
pub fn parse_peers(text: &str) -> Result<Vec<Peer>, PeerListError> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty())
        .map(parse_peer)
        .collect()
}

/// Where the peer list comes from.
#[derive(Debug, Clone, Default)]
pub struct PeerSource {
    pub fixed: Vec<Peer>,
    pub file: Option<PathBuf>,
}

impl PeerSource {
    /// The current peers (file entries override fixed ones of the same node).
    pub async fn load(&self) -> Result<Vec<Peer>, PeerListError> {
        let mut peers: BTreeMap<String, Peer> = self
            .fixed
            .iter()
            .map(|peer| (peer.node.clone(), peer.clone()))
            .collect();
        if let Some(path) = &self.file {
            let text =
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| PeerListError::Io {
                        path: path.clone(),
                        source,
                    })?;
            for peer in parse_peers(&text)? {
                peers.insert(peer.node.clone(), peer);
            }
        }
        Ok(peers.into_values().collect())
    }
}

/// Answers probes on a UDP socket until dropped, and, with [`Responder::with_standing`],
/// peers' self-fencing questions ([`crate::standing`]) within the same rate limit.
#[derive(Debug)]
pub struct Responder {
    socket: Arc<UdpSocket>,
    standing: Option<crate::standing::StandingService>,
}

impl Responder {
    pub fn new(socket: UdpSocket) -> Self {
        Self {
            socket: Arc::new(socket),
            standing: None,
        }
    }

    /// Also answers peers' questions about their standing.
    pub fn with_standing(mut self, service: crate::standing::StandingService) -> Self {
        self.standing = Some(service);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub async fn serve(self) {
        let mut buffer = [0u8; 512];
        let mut window_start = Instant::now();
        let mut answered = 0u32;
        loop {
            let (len, from) = match self.socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "probe receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let question = len > 8 && &buffer[..8] == crate::standing::REQUEST_MAGIC;
            if !question && (len != PROBE_LEN || &buffer[..8] != PROBE_MAGIC) {
                continue;
            }
            if window_start.elapsed() >= Duration::from_secs(1) {
                window_start = Instant::now();
                answered = 0;
            }
            if answered >= RESPONDER_MAX_PER_SECOND {
                continue;
            }
            answered += 1;
            if question {
                if let Some(standing) = &self.standing {
                    standing.answer(self.socket.clone(), buffer[..len].to_vec(), from);
                }
                continue;
            }
            if let Err(error) = self.socket.send_to(&buffer[..len], from).await {
                tracing::debug!(%error, %from, "probe answer failed");
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    pub interval: Duration,
    pub timeout: Duration,
    pub window: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            window: 20,
        }
    }
}

/// A peer answers now when one of its last this many probes was answered: one lost UDP
/// datagram does not make a healthy peer look gone.
pub const ANSWERING_PROBES: u32 = 2;

#[derive(Debug, Default)]
struct PeerWindow {
    samples: VecDeque<Option<Duration>>,
    /// Probes lost in a row since the last answer (or since probing began).
    missed: u32,
    /// When the last outcome (answer or loss) was recorded, and how long after it the
    /// outcomes stop speaking for "now" (the prober stalled or the peer left the list).
    last_outcome: Option<(Instant, Duration)>,
}

impl PeerWindow {
    fn push(&mut self, sample: Option<Duration>, window: usize) {
        self.samples.push_back(sample);
        while self.samples.len() > window.max(1) {
            self.samples.pop_front();
        }
        self.missed = match sample {
            Some(_) => 0,
            None => self.missed.saturating_add(1),
        };
    }

    /// Whether the peer answers now: one of its last [`ANSWERING_PROBES`] probes was
    /// answered, and the last outcome is recent. `None`: no recent outcome to say.
    fn answering(&self, now: Instant) -> Option<bool> {
        let (at, fresh_for) = self.last_outcome?;
        (now.saturating_duration_since(at) <= fresh_for).then_some(self.missed < ANSWERING_PROBES)
    }

    fn latency(&self, node: &str) -> PeerLatency {
        let mut answered: Vec<Duration> = self.samples.iter().flatten().copied().collect();
        answered.sort();
        let rtt = match answered.len() {
            0 => Duration::ZERO,
            n if n % 2 == 1 => answered[n / 2],
            n => (answered[n / 2 - 1] + answered[n / 2]) / 2,
        };
        let total = self.samples.len().max(1) as f64;
        let lost = self
            .samples
            .iter()
            .filter(|sample| sample.is_none())
            .count() as f64;
        PeerLatency {
            node: node.to_string(),
            rtt,
            loss: lost / total,
            answering: None,
            missed: Some(self.missed),
        }
    }

    fn latency_at(&self, node: &str, now: Instant) -> PeerLatency {
        PeerLatency {
            answering: self.answering(now),
            ..self.latency(node)
        }
    }
}

/// Latest measurements, shared with the HTTP API.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Arc<Mutex<BTreeMap<String, PeerWindow>>>);

impl Latencies {
    /// Peers with at least one probe, by node name.
    pub fn snapshot(&self) -> Vec<PeerLatency> {
        self.0
            .lock()
            .map(|peers| {
                peers
                    .iter()
                    .filter(|(_, window)| !window.samples.is_empty())
                    .map(|(node, window)| window.latency_at(node, Instant::now()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Records one probe's outcome; `fresh_for`: how long it speaks for "now" (two probe
    /// intervals plus the probe timeout).
    fn record(
        &self,
        node: &str,
        sample: Option<Duration>,
        window: usize,
        fresh_for: Duration,
    ) -> Option<PeerLatency> {
        let mut peers = self.0.lock().ok()?;
        let entry = peers.entry(node.to_string()).or_default();
        entry.push(sample, window);
        entry.last_outcome = Some((Instant::now(), fresh_for));
        Some(entry.latency(node))
    }

    fn retain(&self, nodes: &[String]) {
        if let Ok(mut peers) = self.0.lock() {
            peers.retain(|node, _| nodes.contains(node));
        }
    }
}

/// Probes every peer each interval, forever.
#[derive(Debug)]
pub struct Prober {
    pub source: PeerSource,
    pub options: ProbeOptions,
    pub latencies: Latencies,
    pub metrics: AgentMetrics,
    pub nonce: u64,
}

impl Prober {
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(self.options.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sequence = 0u64;
        loop {
            ticker.tick().await;
            let peers = match self.source.load().await {
                Ok(peers) => peers,
                Err(error) => {
                    tracing::warn!(%error, "cannot read the peer list; keeping the last results");
                    continue;
                }
            };
            self.latencies.retain(
                &peers
                    .iter()
                    .map(|peer| peer.node.clone())
                    .collect::<Vec<_>>(),
            );
            let mut probes = tokio::task::JoinSet::new();
            for peer in peers {
                sequence += 1;
                let (nonce, timeout) = (self.nonce, self.options.timeout);
                probes.spawn(async move {
                    let outcome = probe_once(&peer.address, sequence, nonce, timeout).await;
                    (peer, outcome)
                });
            }
            while let Some(joined) = probes.join_next().await {
                let Ok((peer, outcome)) = joined else {
                    continue;
                };
                let sample = match outcome {
                    Ok(rtt) => Some(rtt),
                    Err(error) => {
                        tracing::debug!(peer = %peer.node, %error, "probe lost");
                        None
                    }
                };
                let result = if sample.is_some() { "answered" } else { "lost" };
                self.metrics
                    .counter(names::PROBES, &[("peer", &peer.node), ("result", result)])
                    .increment(1);
                let fresh_for = self
                    .options
                    .interval
                    .saturating_mul(2)
                    .saturating_add(self.options.timeout);
                if let Some(latency) =
                    self.latencies
                        .record(&peer.node, sample, self.options.window, fresh_for)
                {
                    self.metrics
                        .gauge(names::PEER_RTT, &[("peer", &peer.node)])
                        .set(latency.rtt.as_secs_f64());
                    self.metrics
                        .gauge(names::PEER_LOSS, &[("peer", &peer.node)])
                        .set(latency.loss);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("resolving {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One probe: its round-trip time.
pub async fn probe_once(
    address: &str,
    sequence: u64,
    nonce: u64,
    timeout: Duration,
) -> Result<Duration, ProbeError> {
    let target = tokio::net::lookup_host(address)
        .await
        .map_err(|error| ProbeError::Resolve {
            address: address.to_string(),
            reason: error.to_string(),
        })?
        .next()
        .ok_or_else(|| ProbeError::Resolve {
            address: address.to_string(),
            reason: "no address".to_string(),
        })?;
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(target).await?;
    let mut probe = [0u8; PROBE_LEN];
    probe[..8].copy_from_slice(PROBE_MAGIC);
    probe[8..16].copy_from_slice(&sequence.to_be_bytes());
    probe[16..24].copy_from_slice(&nonce.to_be_bytes());
    let sent = Instant::now();
    socket.send(&probe).await?;
    let deadline = sent + timeout;
    let mut buffer = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, socket.recv(&mut buffer)).await {
            Err(_) => return Err(ProbeError::Timeout(timeout)),
            Ok(Err(error)) => return Err(error.into()),
            Ok(Ok(len)) if len == PROBE_LEN && buffer[..PROBE_LEN] == probe => {
                return Ok(sent.elapsed());
            }
            Ok(Ok(_)) => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_entries_parse_both_ways_and_refuse_junk() {
        let peers = parse_peers("# peers\nnode-b=10.0.0.2:9461\nnode-c  host-c.local:9461 # c\n\n")
            .unwrap();
        assert_eq!(
            peers,
            [
                Peer {
                    node: "node-b".into(),
                    address: "10.0.0.2:9461".into()
                },
                Peer {
                    node: "node-c".into(),
                    address: "host-c.local:9461".into()
                }
            ]
        );
        parse_peer("v6=[::1]:9461").unwrap();
        for bad in [
            "node-b",
            "node-b=10.0.0.2",
            "Node=1.2.3.4:1",
            "b=1.2.3.4:0",
            "b=a/b:1",
            "b=:1",
        ] {
            assert!(parse_peer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_window_gives_median_rtt_and_loss() {
        let mut window = PeerWindow::default();
        for sample in [Some(3), None, Some(1), Some(2), None] {
            window.push(sample.map(Duration::from_millis), 4);
        }
        // The first sample fell out of the window of 4: [None, 1, 2, None].
        let latency = window.latency("b");
        assert_eq!(latency.rtt, Duration::from_micros(1500));
        assert_eq!(latency.loss, 0.5);
    }

    /// A peer that stops answering is "not answering" after two lost probes, although its
    /// 20-probe window still shows 10 % loss; one answer makes it answering again; outcomes
    /// older than their freshness say nothing. Fails while the agent reports only the window.
    #[test]
    fn answering_follows_the_last_probes_not_the_window() {
        let latencies = Latencies::default();
        let fresh = Duration::from_secs(3);
        for _ in 0..18 {
            latencies.record("b", Some(Duration::from_millis(1)), 20, fresh);
        }
        let answering = |latencies: &Latencies| latencies.snapshot()[0].answering;
        assert_eq!(answering(&latencies), Some(true));
        latencies.record("b", None, 20, fresh);
        assert_eq!(
            answering(&latencies),
            Some(true),
            "one lost probe is not enough"
        );
        latencies.record("b", None, 20, fresh);
        let gone = latencies.snapshot().remove(0);
        assert_eq!((gone.answering, gone.missed), (Some(false), Some(2)));
        assert!(gone.loss < 0.2, "the window still looks healthy: {gone:?}");
        latencies.record("b", Some(Duration::from_millis(1)), 20, fresh);
        assert_eq!(answering(&latencies), Some(true));
        // A stale outcome says nothing about now.
        let mut window = PeerWindow::default();
        window.push(None, 20);
        let start = Instant::now();
        window.last_outcome = Some((start, fresh));
        assert_eq!(window.answering(start + fresh), Some(true));
        assert_eq!(
            window.answering(start + fresh + Duration::from_millis(1)),
            None
        );
        // The wire form: absent fields read as unknown (an older agent).
        let old: PeerLatency =
            serde_json::from_str(r#"{"node":"b","rtt":"1ms","loss":0.0}"#).unwrap();
        assert_eq!((old.answering, old.missed), (None, None));
    }

    #[tokio::test]
    async fn probes_are_echoed_and_junk_is_not() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap().to_string();
        let responder = tokio::spawn(Responder::new(socket).serve());
        let rtt = probe_once(&address, 1, 42, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(rtt < Duration::from_secs(5));
        // A datagram that is not a probe gets no answer.
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(&address).await.unwrap();
        client
            .send(b"hello there, echo me please!!!")
            .await
            .unwrap();
        let mut buffer = [0u8; 64];
        let answer =
            tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buffer)).await;
        assert!(answer.is_err(), "junk was answered");
        responder.abort();
        // Nobody answers any more: the probe is lost.
        let lost = probe_once(&address, 2, 42, Duration::from_millis(200)).await;
        assert!(matches!(
            lost,
            Err(ProbeError::Timeout(_)) | Err(ProbeError::Io(_))
        ));
    }
}
