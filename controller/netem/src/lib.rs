//! User-space link emulator: network namespaces joined by links with one-way delay, random loss
//! and a rate cap, for tests and benchmarks on kernels without the `netem` qdisc.
//!
//! # Design
//!
//! Every node is a network namespace with one TUN interface (`emu0`, `10.213.ID.(i+1)/24`). The
//! relay in this process reads the IP packets each node's kernel sends into its TUN device,
//! passes them through the model of the directed link they cross (`shaper.rs`: drop-tail
//! bottleneck queue, serialisation at the rate cap, seeded Bernoulli loss, propagation delay) and
//! writes them into the destination node's TUN device when they are due (`relay.rs`).
//!
//! Why TUN and not the alternatives considered:
//! - NFQUEUE only gives a verdict (accept/drop) on packets still owned by the kernel; delaying
//!   means holding thousands of unverdicted packets, the queue length is capped by the kernel,
//!   and rate caps would still need a separate shaper. A TUN relay owns each packet outright.
//! - veth + `AF_PACKET` works at layer 2 (ARP to forward, Ethernet headers to strip) and the root
//!   namespace's own stack also sees the frames. TUN is layer 3 with nothing else attached.
//! - The TUN device is created by a thread that has entered the node's namespace, so the device
//!   is born there (no root-namespace name to keep unique, no `ip link set netns` race), and its
//!   file descriptor keeps working from the relay threads in the root namespace.
//! - The relay runs on plain threads, not tokio: tokio's timers have 1 ms resolution, which alone
//!   would use up the ±1 ms RTT fidelity budget. By default those threads run under
//!   `SCHED_FIFO` 10 (like the softirq context kernel qdiscs run in), because on two shared cores
//!   a normal-priority relay was measured delivering packets up to 23 ms late
//!   ([`NetworkOptions`] turns it off).
//!
//! Fidelity (measured RTT and throughput against the settings) is measured by
//! `automigrate-netem fidelity`; results and their limits are in `docs/netem.md`.
//!
//! # Using it
//!
//! ```no_run
//! use std::time::Duration;
//! use automigrate_netem::{EmulatedPair, Link, Side};
//!
//! # fn main() -> Result<(), automigrate_netem::NetworkError> {
//! let link = Link::delayed(Duration::from_millis(10)).with_rate_bps(50_000_000);
//! let pair = EmulatedPair::symmetric("demo", link)?; // 20 ms RTT, 50 Mbit/s each way
//! let listener = pair.run_in(Side::B, || std::net::TcpListener::bind((pair.addr(Side::B), 0)))?;
//! pair.cut()?;      // both directions lose everything
//! pair.restore()?;
//! # drop(listener);
//! # Ok(()) }
//! ```
//!
//! [`EmulatedNetwork`] is the N-node form (per-directed-pair links, `isolate`/`rejoin`).

mod claim;
mod congestion;
mod link;
mod namespace;
mod network;
mod relay;
mod shaper;

pub use claim::{ClaimError, LOCK_DIR, MAX_NETWORKS};
pub use congestion::{
    CongestionError, allow_congestion_control_host_wide, allowed_congestion_controls,
    available_congestion_controls, set_socket_congestion_control, socket_congestion_control,
};
pub use link::{Link, LinkError, MIN_QUEUE_BYTES, MTU_BYTES};
pub use namespace::{
    NETNS_RUN_DIR, NamespaceError, enter_namespace, namespace_command, namespace_sysctl,
    run_in_namespace, set_namespace_sysctl,
};
pub use network::{
    DEFAULT_REALTIME_PRIORITY, EmulatedNetwork, EmulatedPair, INTERFACE, MAX_NODES, NetworkError,
    NetworkOptions, Side, TUN_QUEUE_PACKETS,
};
pub use relay::{LATENESS_BOUNDS_US, LinkStats, RelayError};

/// Environment variable that lets privileged tests skip (loudly) where namespaces and TUN
/// devices cannot be created.
pub const SKIP_PRIVILEGED_ENV: &str = "AUTOMIGRATE_SKIP_PRIVILEGED";

/// What this process lacks to create emulated networks, or `None` when everything is there:
/// root, `/dev/net/tun`, and the `ip` command.
#[must_use]
pub fn missing_prerequisites() -> Option<String> {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root (effective uid 0)".to_owned());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_owned());
    }
    let ip_works = std::process::Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|output| output.status.success());
    if !ip_works {
        missing.push("the `ip` command (iproute2)".to_owned());
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}
