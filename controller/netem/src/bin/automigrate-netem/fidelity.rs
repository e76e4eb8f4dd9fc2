//! `automigrate-netem fidelity`: builds emulated pairs with known settings, measures them with the
//! probes, and prints Markdown tables of setting vs measurement with the acceptance checks
//! (median RTT within ±1 ms of the setting; rate within 5 % of the cap).

use std::time::Duration;

use anyhow::bail;
use automigrate_netem::{
    EmulatedPair, Link, LinkStats, NetworkOptions, Side, missing_prerequisites,
};
use clap::Args;

use crate::probes;

/// Options of the fidelity run. Lists are comma-separated.
#[derive(Debug, Args)]
pub struct FidelityArgs {
    /// Which measurements to run.
    #[arg(long, value_delimiter = ',', default_value = "rtt,throughput,loss")]
    only: Vec<Measurement>,
    /// Round-trip times to emulate, in milliseconds (split evenly between the two directions).
    #[arg(long, value_delimiter = ',', default_value = "0,10,20,30,70")]
    rtts_ms: Vec<u64>,
    /// Pings per RTT setting.
    #[arg(long, default_value_t = 1000)]
    pings: u64,
    /// Interval between pings.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2ms")]
    ping_interval: Duration,
    /// Rate caps to test, in Mbit/s (same cap both ways).
    #[arg(long, value_delimiter = ',', default_value = "50,200")]
    rates_mbps: Vec<u64>,
    /// Bottleneck queue size in bytes for the throughput runs (default: the library's, one BDP
    /// with a 64-packet floor).
    #[arg(long)]
    queue_bytes: Option<u64>,
    /// Parallel TCP stream counts to test.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    streams: Vec<usize>,
    /// TCP congestion control algorithms to test (set on every socket).
    #[arg(long, value_delimiter = ',', default_value = "bbr,cubic")]
    congestion_control: Vec<String>,
    /// Time from the start of a transfer to the start of its measured window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    warmup: Duration,
    /// Length of the measured window of a transfer.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "8s")]
    window: Duration,
    /// Loss probabilities to test, in percent.
    #[arg(long, value_delimiter = ',', default_value = "0.1,1")]
    losses_percent: Vec<f64>,
    /// Datagrams per loss setting.
    #[arg(long, default_value_t = 100_000)]
    loss_packets: u64,
    /// Run the relay threads under SCHED_FIFO at this priority (0: normal priority; default: the
    /// library's default).
    #[arg(long)]
    realtime_priority: Option<u8>,
    /// Seed of the loss draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl FidelityArgs {
    fn options(&self) -> NetworkOptions {
        match self.realtime_priority {
            None => NetworkOptions::default(),
            Some(0) => NetworkOptions {
                realtime_priority: None,
            },
            Some(priority) => NetworkOptions {
                realtime_priority: Some(priority),
            },
        }
    }
}

/// One kind of measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Measurement {
    Rtt,
    Throughput,
    Loss,
}

/// TCP buffer limits for the measurement namespaces: large enough that the endpoints never limit
/// a window of a few bandwidth-delay products (200 Mbit/s × 70 ms = 1.75 MB), so the table shows
/// the emulated link and not the default socket buffers.
const TCP_RMEM: &str = "4096 131072 33554432";
const TCP_WMEM: &str = "4096 16384 33554432";

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The `quantile`-th sample of sorted `samples` (nearest rank).
fn nearest_rank(samples: &[Duration], quantile: f64) -> Duration {
    let rank = (quantile * samples.len() as f64).ceil() as usize;
    samples
        .get(rank.saturating_sub(1).min(samples.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// The 1, 5 and 15 minute load averages: other work on the host is the main source of error.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Both directions' counters as one (for lateness over a round trip's packets).
fn merged(a: &LinkStats, b: &LinkStats) -> LinkStats {
    let mut lateness = a.lateness;
    for (bucket, other) in lateness.iter_mut().zip(b.lateness) {
        *bucket += other;
    }
    LinkStats {
        lateness,
        max_lateness_ns: a.max_lateness_ns.max(b.max_lateness_ns),
        ..LinkStats::default()
    }
}

/// "≤ 50 µs"-style rendering of a lateness bucket bound.
fn lateness_bound(stats: &LinkStats, quantile: f64) -> String {
    match stats.lateness_quantile(quantile) {
        None => "–".to_owned(),
        Some(Duration::MAX) => "> 10 ms".to_owned(),
        Some(bound) => format!("≤ {}", bound.as_micros()),
    }
}

fn check(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

/// Runs the requested measurements and prints their tables.
pub fn run(args: &FidelityArgs) -> anyhow::Result<()> {
    if let Some(missing) = missing_prerequisites() {
        bail!("the fidelity run needs {missing}");
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "Host: Linux {}, {cores} cores. Seed {}. Relay priority: {}. Load average at start: {}.\n",
        kernel.trim(),
        args.seed,
        args.options()
            .realtime_priority
            .map_or_else(|| "normal".to_owned(), |p| format!("SCHED_FIFO {p}")),
        load_average()
    );
    if args.only.contains(&Measurement::Rtt) {
        rtt_table(args)?;
    }
    if args.only.contains(&Measurement::Throughput) {
        throughput_table(args)?;
    }
    if args.only.contains(&Measurement::Loss) {
        loss_table(args)?;
    }
    println!("Load average at end: {}.", load_average());
    Ok(())
}

fn rtt_table(args: &FidelityArgs) -> anyhow::Result<()> {
    println!(
        "### RTT: UDP ping-pong A -> B -> A, {} pings every {} per setting, no rate cap\n",
        args.pings,
        humantime::format_duration(args.ping_interval)
    );
    println!(
        "| set RTT (ms) | replies | min (ms) | median (ms) | p99 (ms) | max (ms) | median − set (ms) | within ±1 ms | relay late p50 / p99 (µs) | relay late max (µs) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|");
    for &rtt_ms in &args.rtts_ms {
        let rtt = Duration::from_millis(rtt_ms);
        let pair = EmulatedPair::create_with_options(
            "fid-rtt",
            Link::delayed(rtt / 2),
            Link::delayed(rtt / 2),
            args.options(),
        )?;
        let mut samples = probes::udp_rtt(&pair, args.pings, args.ping_interval, rtt)?;
        let relay = merged(&pair.stats(Side::A)?, &pair.stats(Side::B)?);
        pair.shutdown()?;
        samples.sort_unstable();
        let median = nearest_rank(&samples, 0.5);
        let error_ms = millis(median) - rtt_ms as f64;
        println!(
            "| {rtt_ms} | {}/{} | {:.3} | {:.3} | {:.3} | {:.3} | {:+.3} | {} | {} / {} | {} |",
            samples.len(),
            args.pings,
            millis(samples.first().copied().unwrap_or_default()),
            millis(median),
            millis(nearest_rank(&samples, 0.99)),
            millis(samples.last().copied().unwrap_or_default()),
            error_ms,
            check(!samples.is_empty() && error_ms.abs() <= 1.0),
            lateness_bound(&relay, 0.5),
            lateness_bound(&relay, 0.99),
            relay.max_lateness_ns / 1000
        );
    }
    println!();
    Ok(())
}

fn throughput_table(args: &FidelityArgs) -> anyhow::Result<()> {
    println!(
        "### Throughput: TCP A -> B, warm-up {}, measured over {}; rate = IP bytes leaving the \
         bottleneck, goodput = application bytes received\n",
        humantime::format_duration(args.warmup),
        humantime::format_duration(args.window)
    );
    println!(
        "| CC | cap (Mbit/s) | RTT (ms) | streams | IP rate (Mbit/s) | rate/cap | goodput (Mbit/s) | goodput/cap | queue drops | rate within 5 % | relay late p99 (µs) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|");
    for algorithm in &args.congestion_control {
        for &rate_mbps in &args.rates_mbps {
            for &rtt_ms in &args.rtts_ms {
                for &streams in &args.streams {
                    let rate_bps = rate_mbps * 1_000_000;
                    let mut link = Link::delayed(Duration::from_millis(rtt_ms) / 2)
                        .with_rate_bps(rate_bps)
                        .with_seed(args.seed);
                    if let Some(queue_bytes) = args.queue_bytes {
                        link = link.with_queue_bytes(queue_bytes);
                    }
                    let pair =
                        EmulatedPair::create_with_options("fid-tput", link, link, args.options())?;
                    for side in [Side::A, Side::B] {
                        pair.network()
                            .set_sysctl(side.node(), "net.ipv4.tcp_rmem", TCP_RMEM)?;
                        pair.network()
                            .set_sysctl(side.node(), "net.ipv4.tcp_wmem", TCP_WMEM)?;
                    }
                    let result =
                        probes::tcp_bulk(&pair, algorithm, streams, args.warmup, args.window)?;
                    pair.shutdown()?;
                    let cap = rate_bps as f64;
                    let rate_ratio = result.ip_rate_bps / cap;
                    println!(
                        "| {algorithm} | {rate_mbps} | {rtt_ms} | {streams} | {:.1} | {:.1} % | {:.1} | {:.1} % | {} | {} | {} |",
                        result.ip_rate_bps / 1e6,
                        rate_ratio * 100.0,
                        result.goodput_bps / 1e6,
                        result.goodput_bps / cap * 100.0,
                        result.window_stats.dropped_queue,
                        check((rate_ratio - 1.0).abs() <= 0.05),
                        lateness_bound(&result.window_stats, 0.99)
                    );
                }
            }
        }
    }
    println!();
    Ok(())
}

fn loss_table(args: &FidelityArgs) -> anyhow::Result<()> {
    const PACKETS_PER_SECOND: u64 = 20_000;
    println!(
        "### Loss: {} numbered UDP datagrams A -> B at {PACKETS_PER_SECOND}/s per setting, no delay\n",
        args.loss_packets
    );
    println!(
        "| set loss | received | measured loss | 95 % range of a Bernoulli sample this size | within range | relay read | relay dropped (random) | relay wrote |"
    );
    println!("|---:|---:|---:|---:|:---:|---:|---:|---:|");
    for &percent in &args.losses_percent {
        let probability = percent / 100.0;
        let link = Link::ideal().with_loss(probability).with_seed(args.seed);
        let pair =
            EmulatedPair::create_with_options("fid-loss", link, Link::ideal(), args.options())?;
        let result = probes::udp_loss(&pair, args.loss_packets, PACKETS_PER_SECOND)?;
        pair.shutdown()?;
        let sent = result.sent as f64;
        let measured = 1.0 - result.received as f64 / sent;
        let half_width = 1.96 * (probability * (1.0 - probability) / sent).sqrt();
        let (low, high) = (
            (probability - half_width).max(0.0),
            probability + half_width,
        );
        println!(
            "| {percent} % | {}/{} | {:.3} % | {:.3} – {:.3} % | {} | {} | {} | {} |",
            result.received,
            result.sent,
            measured * 100.0,
            low * 100.0,
            high * 100.0,
            check((low..=high).contains(&measured)),
            result.relay_offered,
            result.relay_lost,
            result.relay_delivered
        );
    }
    println!();
    Ok(())
}
