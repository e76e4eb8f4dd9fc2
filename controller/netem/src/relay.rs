//! The packet relay: moves IPv4 packets between the TUN devices of the emulated nodes, through the
//! `Shaper` of the directed link they cross.
//!
//! Threads and data model, for `N` nodes:
//! - one reader thread per node: blocks on its TUN device, stamps each packet with the time it
//!   left the sender's kernel, finds the destination node from the IPv4 destination address
//!   (`10.213.ID.(index+1)`), asks that directed link's shaper for a verdict and, if the packet is
//!   to be delivered, puts it in the destination's outbox;
//! - one writer thread per node: sleeps until the earliest packet in its outbox is due, then
//!   writes it to its TUN device (which hands it to that namespace's IP stack).
//!
//! Threads are named `nm{ID}rx{i}` and `nm{ID}tx{i}` (network id, node index), so `top -H` shows
//! whose relay is busy.
//!
//! Outboxes are binary heaps ordered by (arrival instant, enqueue sequence); a shaper never
//! schedules a packet before the one ahead of it on the same link, so links stay FIFO.
//! Writers use plain blocking threads rather than tokio timers because tokio's timer wheel has
//! 1 ms resolution (it would add up to 1 ms per direction, the whole error budget), and they set
//! their timer slack to 1 ns so the kernel does not batch their wake-ups (the default slack is
//! 50 µs).
//!
//! Optionally (`realtime_priority`), relay threads run under `SCHED_FIFO`, as the kernel's own
//! qdiscs effectively do (softirq context preempts every process): on a 2-core machine shared
//! with other work, a normal-priority reader that is descheduled for a few milliseconds lets the
//! emulated bottleneck idle (packets wait in the TUN queue, unseen), and a late writer adds delay.
//! The priority is set by running `chrt` on the thread's id, since the standard library and nix
//! have no safe `sched_setscheduler`.
//!
//! Cutting a link bumps that link's epoch; packets scheduled under an older epoch are discarded at
//! delivery, so a cut also loses what was in flight, as a pulled cable would.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tun_rs::{InterruptEvent, SyncDevice};

use crate::link::Link;
use crate::shaper::{DropReason, Shaper, Verdict};

/// Upper bounds (µs) of the buckets of [`LinkStats::lateness`]; the last bucket is open-ended.
pub const LATENESS_BOUNDS_US: [u64; 9] = [10, 25, 50, 100, 250, 500, 1_000, 5_000, 10_000];

/// Counters of one directed link since the network was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets the sender's kernel handed to the link.
    pub offered_packets: u64,
    /// Packets written to the receiver's interface.
    pub delivered_packets: u64,
    /// IP bytes of the delivered packets.
    pub delivered_bytes: u64,
    /// Packets dropped because the link was cut (including those in flight at the cut).
    pub dropped_cut: u64,
    /// Packets dropped by the full bottleneck queue.
    pub dropped_queue: u64,
    /// Packets lost at random.
    pub dropped_loss: u64,
    /// Packets the receiving interface refused (write error).
    pub write_errors: u64,
    /// How late the relay wrote delivered packets relative to their scheduled arrival: bucket
    /// `i` counts deliveries at most [`LATENESS_BOUNDS_US`]`[i]` µs late, the last one the rest.
    /// This is the emulator's own timing error on the receiving side (wake-up latency and
    /// queueing behind other due packets), separate from how the endpoints are scheduled.
    pub lateness: [u64; LATENESS_BOUNDS_US.len() + 1],
    /// The latest any packet was delivered, in nanoseconds.
    pub max_lateness_ns: u64,
}

impl LinkStats {
    /// The bucket upper bound under which at least `quantile` of the deliveries fell (`None` if
    /// nothing was delivered, `Some(Duration::MAX)` for the open-ended bucket).
    #[must_use]
    pub fn lateness_quantile(&self, quantile: f64) -> Option<Duration> {
        let total: u64 = self.lateness.iter().sum();
        if total == 0 {
            return None;
        }
        let needed = (quantile.clamp(0.0, 1.0) * total as f64).ceil() as u64;
        let mut seen = 0;
        for (bucket, &count) in self.lateness.iter().enumerate() {
            seen += count;
            if seen >= needed.max(1) {
                return Some(
                    LATENESS_BOUNDS_US
                        .get(bucket)
                        .map_or(Duration::MAX, |&bound| Duration::from_micros(bound)),
                );
            }
        }
        Some(Duration::MAX)
    }

    /// The counters accumulated since `earlier` (a snapshot of the same link).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        let mut lateness = self.lateness;
        for (bucket, before) in lateness.iter_mut().zip(earlier.lateness) {
            *bucket = bucket.saturating_sub(before);
        }
        Self {
            offered_packets: self.offered_packets.saturating_sub(earlier.offered_packets),
            delivered_packets: self
                .delivered_packets
                .saturating_sub(earlier.delivered_packets),
            delivered_bytes: self.delivered_bytes.saturating_sub(earlier.delivered_bytes),
            dropped_cut: self.dropped_cut.saturating_sub(earlier.dropped_cut),
            dropped_queue: self.dropped_queue.saturating_sub(earlier.dropped_queue),
            dropped_loss: self.dropped_loss.saturating_sub(earlier.dropped_loss),
            write_errors: self.write_errors.saturating_sub(earlier.write_errors),
            lateness,
            // A maximum cannot be windowed; keep the later one (an upper bound of the window's).
            max_lateness_ns: self.max_lateness_ns,
        }
    }
}

/// What went wrong starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A TUN device could not be switched to non-blocking mode or the stop event not created.
    #[error("cannot prepare the relay: {0}")]
    Setup(#[source] std::io::Error),
    /// A relay thread could not be started.
    #[error("cannot start relay thread {name}: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct LinkCounters {
    offered_packets: AtomicU64,
    delivered_packets: AtomicU64,
    delivered_bytes: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_loss: AtomicU64,
    write_errors: AtomicU64,
    lateness: [AtomicU64; LATENESS_BOUNDS_US.len() + 1],
    max_lateness_ns: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl LinkCounters {
    fn snapshot(&self) -> LinkStats {
        LinkStats {
            offered_packets: self.offered_packets.load(Ordering::Relaxed),
            delivered_packets: self.delivered_packets.load(Ordering::Relaxed),
            delivered_bytes: self.delivered_bytes.load(Ordering::Relaxed),
            dropped_cut: self.dropped_cut.load(Ordering::Relaxed),
            dropped_queue: self.dropped_queue.load(Ordering::Relaxed),
            dropped_loss: self.dropped_loss.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
            lateness: std::array::from_fn(|bucket| {
                self.lateness
                    .get(bucket)
                    .map_or(0, |count| count.load(Ordering::Relaxed))
            }),
            max_lateness_ns: self.max_lateness_ns.load(Ordering::Relaxed),
        }
    }

    fn record_lateness(&self, lateness: Duration) {
        let micros = u64::try_from(lateness.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENESS_BOUNDS_US
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENESS_BOUNDS_US.len());
        if let Some(count) = self.lateness.get(bucket) {
            bump(count, 1);
        }
        let nanos = u64::try_from(lateness.as_nanos()).unwrap_or(u64::MAX);
        self.max_lateness_ns.fetch_max(nanos, Ordering::Relaxed);
    }
}

/// One directed link: its model, counters, and cut epoch.
#[derive(Debug)]
struct DirectedLink {
    shaper: Mutex<Shaper>,
    counters: LinkCounters,
    epoch: AtomicU64,
}

/// A packet waiting in an outbox.
#[derive(Debug)]
struct Scheduled {
    arrival: Instant,
    sequence: u64,
    link_index: usize,
    epoch: u64,
    packet: Vec<u8>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest arrival first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.arrival, other.sequence).cmp(&(self.arrival, self.sequence))
    }
}

#[derive(Debug, Default)]
struct OutboxState {
    heap: BinaryHeap<Scheduled>,
    next_sequence: u64,
    stopping: bool,
}

/// Packets due at one node, and the condition its writer sleeps on.
#[derive(Debug, Default)]
struct Outbox {
    state: Mutex<OutboxState>,
    wake: Condvar,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something ever did, the data (a heap or a
    // shaper) is still consistent enough to keep relaying.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Shared {
    subnet: [u8; 3],
    node_count: usize,
    links: Vec<DirectedLink>,
    outboxes: Vec<Outbox>,
    unroutable: AtomicU64,
    stopping: AtomicBool,
    interrupt: InterruptEvent,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // InterruptEvent has no Debug.
        formatter
            .debug_struct("Shared")
            .field("subnet", &self.subnet)
            .field("node_count", &self.node_count)
            .field("stopping", &self.stopping)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn link_index(&self, from: usize, to: usize) -> usize {
        from * self.node_count + to
    }

    /// The node an IPv4 packet is addressed to, if it is one of ours.
    fn destination(&self, packet: &[u8]) -> Option<usize> {
        let version = packet.first()? >> 4;
        let destination = packet.get(16..20)?;
        if version != 4 || destination.get(..3)? != self.subnet {
            return None;
        }
        let index = usize::from(destination.get(3)?.checked_sub(1)?);
        (index < self.node_count).then_some(index)
    }

    fn route(&self, from: usize, packet: &[u8], sent_at: Instant) {
        let Some(to) = self.destination(packet).filter(|&to| to != from) else {
            bump(&self.unroutable, 1);
            return;
        };
        let link_index = self.link_index(from, to);
        let Some(link) = self.links.get(link_index) else {
            return;
        };
        bump(&link.counters.offered_packets, 1);
        let (verdict, epoch) = {
            let mut shaper = lock(&link.shaper);
            // Read under the shaper lock: `set_cut` changes both together.
            (
                shaper.offer(sent_at, packet.len()),
                link.epoch.load(Ordering::Relaxed),
            )
        };
        match verdict {
            Verdict::DeliverAt(arrival) => {
                if let Some(outbox) = self.outboxes.get(to) {
                    outbox.push(Scheduled {
                        arrival,
                        sequence: 0,
                        link_index,
                        epoch,
                        packet: packet.to_vec(),
                    });
                }
            }
            Verdict::Drop(DropReason::Cut) => bump(&link.counters.dropped_cut, 1),
            Verdict::Drop(DropReason::QueueFull) => bump(&link.counters.dropped_queue, 1),
            Verdict::Drop(DropReason::Loss) => bump(&link.counters.dropped_loss, 1),
        }
    }

    fn deliver(&self, device: &SyncDevice, scheduled: &Scheduled) {
        let Some(link) = self.links.get(scheduled.link_index) else {
            return;
        };
        if link.epoch.load(Ordering::Relaxed) != scheduled.epoch {
            bump(&link.counters.dropped_cut, 1);
            return;
        }
        let lateness = Instant::now().saturating_duration_since(scheduled.arrival);
        match device.send(&scheduled.packet) {
            Ok(_) => {
                link.counters.record_lateness(lateness);
                bump(&link.counters.delivered_packets, 1);
                bump(
                    &link.counters.delivered_bytes,
                    u64::try_from(scheduled.packet.len()).unwrap_or(u64::MAX),
                );
            }
            Err(error) => {
                bump(&link.counters.write_errors, 1);
                tracing::debug!(%error, "TUN write failed");
            }
        }
    }
}

impl Outbox {
    fn push(&self, mut scheduled: Scheduled) {
        let mut state = lock(&self.state);
        scheduled.sequence = state.next_sequence;
        state.next_sequence = state.next_sequence.wrapping_add(1);
        let new_head = state
            .heap
            .peek()
            .is_none_or(|head| scheduled.arrival < head.arrival);
        state.heap.push(scheduled);
        drop(state);
        if new_head {
            self.wake.notify_one();
        }
    }
}

/// Puts the calling thread under `SCHED_FIFO` at `priority` (best effort: logs and carries on at
/// normal priority if `chrt` is missing or refused).
fn raise_to_realtime(priority: u8) {
    let thread_id = nix::unistd::gettid().to_string();
    let outcome = std::process::Command::new("chrt")
        .args(["--fifo", "--pid", &priority.to_string(), &thread_id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output();
    match outcome {
        Ok(output) if output.status.success() => {}
        Ok(output) => tracing::warn!(
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "chrt refused; the relay runs at normal priority"
        ),
        Err(error) => tracing::warn!(%error, "cannot run chrt; the relay runs at normal priority"),
    }
}

/// `nm{network}{rx|tx}{node}`: unique per network, within the kernel's 15-byte thread name limit.
pub(crate) fn relay_thread_name(network_id: u8, role: &str, node: usize) -> String {
    format!("nm{network_id}{role}{node}")
}

fn prepare_thread(realtime_priority: Option<u8>, ready: &std::sync::mpsc::Sender<()>) {
    if let Some(priority) = realtime_priority {
        raise_to_realtime(priority);
    }
    // The receiver only disappears if `start` already returned; nothing to tell then.
    let _ = ready.send(());
}

fn read_loop(shared: &Shared, node: usize, device: &SyncDevice) {
    let mut buffer = vec![0_u8; 65_536];
    loop {
        match device.recv_intr(&mut buffer, &shared.interrupt) {
            Ok(length) => {
                shared.route(
                    node,
                    buffer.get(..length).unwrap_or_default(),
                    Instant::now(),
                );
                // The device is non-blocking: drain what is already queued without a poll(2) per packet.
                while !shared.stopping.load(Ordering::Relaxed) {
                    match device.recv(&mut buffer) {
                        Ok(length) => shared.route(
                            node,
                            buffer.get(..length).unwrap_or_default(),
                            Instant::now(),
                        ),
                        Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                        Err(error) => {
                            tracing::warn!(node, %error, "TUN read failed");
                            break;
                        }
                    }
                }
            }
            Err(_) if shared.stopping.load(Ordering::Relaxed) => return,
            Err(error)
                if matches!(error.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(error) => {
                tracing::warn!(node, %error, "TUN read failed");
                // A device that keeps failing must not spin a core.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn write_loop(shared: &Shared, node: usize, device: &SyncDevice) {
    if let Err(error) = nix::sys::prctl::set_timerslack(1) {
        tracing::debug!(%error, "could not lower timer slack; wake-ups may be up to 50 µs late");
    }
    let Some(outbox) = shared.outboxes.get(node) else {
        return;
    };
    let mut due = Vec::new();
    let mut state = lock(&outbox.state);
    loop {
        if state.stopping {
            return;
        }
        let now = Instant::now();
        while let Some(head) = state.heap.peek()
            && head.arrival <= now
        {
            due.extend(state.heap.pop());
        }
        if !due.is_empty() {
            drop(state);
            for scheduled in due.drain(..) {
                shared.deliver(device, &scheduled);
            }
            state = lock(&outbox.state);
            continue;
        }
        state = match state.heap.peek().map(|head| head.arrival - now) {
            Some(wait) => {
                outbox
                    .wake
                    .wait_timeout(state, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => outbox
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
        };
    }
}

/// The running relay of one emulated network. Dropping it stops and joins its threads and closes
/// the TUN devices (which removes them from their namespaces).
#[derive(Debug)]
pub(crate) struct Relay {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying between `devices` (device `i` belongs to the node at `10.213.ID.(i+1)`,
    /// where `subnet` is `[10, 213, ID]`), with `link_for(from, to)` on each directed link.
    #[tracing::instrument(level = "debug", skip(devices, link_for))]
    pub(crate) fn start(
        subnet: [u8; 3],
        devices: Vec<SyncDevice>,
        link_for: impl Fn(usize, usize) -> Link,
        realtime_priority: Option<u8>,
    ) -> Result<Self, RelayError> {
        let node_count = devices.len();
        let mut links = Vec::with_capacity(node_count * node_count);
        for from in 0..node_count {
            for to in 0..node_count {
                links.push(DirectedLink {
                    shaper: Mutex::new(Shaper::new(link_for(from, to))),
                    counters: LinkCounters::default(),
                    epoch: AtomicU64::new(0),
                });
            }
        }
        let shared = Arc::new(Shared {
            subnet,
            node_count,
            links,
            outboxes: (0..node_count).map(|_| Outbox::default()).collect(),
            unroutable: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            interrupt: InterruptEvent::new().map_err(RelayError::Setup)?,
        });
        let mut relay = Self {
            shared,
            threads: Vec::with_capacity(2 * node_count),
        };
        // Every thread reports once its priority is set, so that when `start` returns the relay
        // runs as configured (no window where early packets see a normal-priority relay).
        let (ready_sender, ready) = std::sync::mpsc::channel::<()>();
        let network_id = subnet[2];
        // On an early return, `relay`'s Drop stops the threads already started.
        for (node, device) in devices.into_iter().enumerate() {
            device.set_nonblocking(true).map_err(RelayError::Setup)?;
            let device = Arc::new(device);
            let (shared, reader_device) = (Arc::clone(&relay.shared), Arc::clone(&device));
            let reader_ready = ready_sender.clone();
            relay.spawn(relay_thread_name(network_id, "rx", node), move || {
                prepare_thread(realtime_priority, &reader_ready);
                read_loop(&shared, node, &reader_device);
            })?;
            let shared = Arc::clone(&relay.shared);
            let writer_ready = ready_sender.clone();
            relay.spawn(relay_thread_name(network_id, "tx", node), move || {
                prepare_thread(realtime_priority, &writer_ready);
                write_loop(&shared, node, &device);
            })?;
        }
        drop(ready_sender);
        // Ends early only if a thread died before reporting (then all senders are gone).
        for _ in 0..relay.threads.len() {
            if ready.recv().is_err() {
                break;
            }
        }
        Ok(relay)
    }

    fn spawn(
        &mut self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<(), RelayError> {
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(body)
            .map_err(|source| RelayError::Spawn { name, source })?;
        self.threads.push(thread);
        Ok(())
    }

    fn directed(&self, from: usize, to: usize) -> Option<&DirectedLink> {
        self.shared.links.get(self.shared.link_index(from, to))
    }

    /// Replaces the parameters of the directed link `from -> to` (indices already checked).
    pub(crate) fn set_link(&self, from: usize, to: usize, link: Link) {
        if let Some(directed) = self.directed(from, to) {
            lock(&directed.shaper).reconfigure(link);
        }
    }

    /// The parameters of the directed link `from -> to`.
    pub(crate) fn link(&self, from: usize, to: usize) -> Option<Link> {
        self.directed(from, to)
            .map(|directed| lock(&directed.shaper).link())
    }

    /// Cuts or restores the directed link `from -> to`.
    pub(crate) fn set_cut(&self, from: usize, to: usize, cut: bool) {
        if let Some(directed) = self.directed(from, to) {
            let mut shaper = lock(&directed.shaper);
            if cut && !shaper.is_cut() {
                directed.epoch.fetch_add(1, Ordering::Relaxed);
            }
            shaper.set_cut(cut);
        }
    }

    /// Whether the directed link `from -> to` is cut.
    pub(crate) fn is_cut(&self, from: usize, to: usize) -> bool {
        self.directed(from, to)
            .is_some_and(|directed| lock(&directed.shaper).is_cut())
    }

    /// Counters of the directed link `from -> to`.
    pub(crate) fn stats(&self, from: usize, to: usize) -> LinkStats {
        self.directed(from, to)
            .map(|directed| directed.counters.snapshot())
            .unwrap_or_default()
    }

    /// Packets read from a device that were not addressed to another node of the network.
    pub(crate) fn unroutable_packets(&self) -> u64 {
        self.shared.unroutable.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        if let Err(error) = self.shared.interrupt.trigger() {
            tracing::warn!(%error, "could not interrupt relay readers");
        }
        for outbox in &self.shared.outboxes {
            lock(&outbox.state).stopping = true;
            outbox.wake.notify_all();
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::warn!("a relay thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_is_bucketed_and_windowed() {
        let counters = LinkCounters::default();
        for micros in [5, 5, 5, 40, 40, 2_000, 20_000] {
            counters.record_lateness(Duration::from_micros(micros));
        }
        let stats = counters.snapshot();
        assert_eq!(stats.lateness, [3, 0, 2, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(stats.max_lateness_ns, 20_000_000);
        assert_eq!(
            stats.lateness_quantile(0.4),
            Some(Duration::from_micros(10))
        );
        assert_eq!(
            stats.lateness_quantile(0.7),
            Some(Duration::from_micros(50))
        );
        assert_eq!(
            stats.lateness_quantile(0.8),
            Some(Duration::from_micros(5_000))
        );
        assert_eq!(stats.lateness_quantile(1.0), Some(Duration::MAX));
        assert_eq!(LinkStats::default().lateness_quantile(0.5), None);
        counters.record_lateness(Duration::from_micros(5));
        let window = counters.snapshot().since(&stats);
        assert_eq!(window.lateness, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn outbox_heap_pops_earliest_arrival_then_enqueue_order() {
        let start = Instant::now();
        let item = |arrival_ms: u64, sequence: u64| Scheduled {
            arrival: start + Duration::from_millis(arrival_ms),
            sequence,
            link_index: 0,
            epoch: 0,
            packet: Vec::new(),
        };
        let mut heap = BinaryHeap::new();
        heap.extend([item(5, 0), item(1, 1), item(5, 2), item(3, 3)]);
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|s| s.sequence)).collect();
        assert_eq!(order, vec![1, 3, 0, 2]);
    }
}
