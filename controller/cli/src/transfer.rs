//! `automigrate transfer`: the agent-to-agent transfer engine by hand, for operators trying it
//! out and for benchmarks.
//!
//! - `send` moves a directory (or files under a base directory) to a receiving agent over
//!   mutual TLS, showing bytes, rate and streams in use; `--report FILE` writes the JSON report.
//! - `receive` serves a destination directory until interrupted (or until `--exit-after`
//!   transfers completed, which scripts use).
//! - `certs` writes a throw-away CA and node certificates to try the other two with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use automigrate_core::transfer::{LinkEstimate, TransferSettings, TransferStrategy};
use automigrate_core::units::{BitRate, Bytes, parse_duration};
use automigrate_transfer::manifest::Source;
use automigrate_transfer::receiver::{Receiver, ReceiverConfig};
use automigrate_transfer::sender::{Progress, SendOptions, send};
use automigrate_transfer::tls::TlsConfig;

/// `automigrate transfer …`
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Send a directory, or files under a base directory, to a receiving agent.
    Send(SendArgs),
    /// Receive transfers into a directory until interrupted.
    Receive(ReceiveArgs),
    /// Write a development CA and node certificates (never for production).
    Certs(CertsArgs),
}

/// This agent's identity and the CA it trusts, as PEM files (in Kubernetes: a mounted Secret).
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// CA certificate(s) that sign every agent's certificate.
    #[arg(long, env = "AUTOMIGRATE_TLS_CA")]
    ca: PathBuf,
    /// This agent's certificate chain.
    #[arg(long, env = "AUTOMIGRATE_TLS_CERT")]
    cert: PathBuf,
    /// This agent's private key.
    #[arg(long, env = "AUTOMIGRATE_TLS_KEY")]
    key: PathBuf,
}

impl TlsArgs {
    fn load(&self) -> Result<TlsConfig> {
        TlsConfig::from_pem_files(&self.ca, &self.cert, &self.key).context("loading TLS material")
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Strategy {
    /// The link model and the feedback controller decide.
    Auto,
    /// One stream.
    Single,
    /// At least two streams.
    Parallel,
}

#[derive(Debug, clap::Args)]
struct SendArgs {
    /// Receiver address, `host:port`.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Name the receiver's certificate must carry (default: the address dialled).
    #[arg(long)]
    server_name: Option<String>,
    /// Directory under the receiver's root to write into (default: the root).
    #[arg(long)]
    target: Option<String>,
    /// Paths are sent relative to this directory (default: a single directory argument is
    /// sent as the root itself).
    #[arg(long)]
    base: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "auto")]
    strategy: Strategy,
    /// Most parallel streams.
    #[arg(long, default_value_t = 16)]
    max_streams: u32,
    /// Chunk size for large files, and the most bytes packed together (`8MiB`).
    #[arg(long, default_value = "256KiB", value_parser = parse_bytes)]
    chunk_size: u64,
    /// Cap for the whole transfer (`200Mbit/s`).
    #[arg(long, value_parser = parse_rate)]
    rate_limit: Option<u64>,
    /// Known round-trip time (`70ms`); with --bandwidth and --loss it seeds the plan.
    #[arg(long, value_parser = parse_duration_arg)]
    rtt: Option<Duration>,
    /// Known link capacity (`1Gbit/s`).
    #[arg(long, value_parser = parse_rate)]
    bandwidth: Option<u64>,
    /// Known packet loss: a fraction from 0 to 1 (`0.001`), or a percentage (`0.1%`).
    #[arg(long, default_value = "0", value_parser = parse_loss)]
    loss: f64,
    /// Least length of a measurement round (`1s`); default from the RTT.
    #[arg(long, value_parser = parse_duration_arg)]
    round: Option<Duration>,
    /// TCP congestion control for our sockets (`cubic`, `bbr`).
    #[arg(long)]
    congestion: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// A directory, or files/directories under --base.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ReceiveArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7847")]
    listen: SocketAddr,
    /// Everything received lands under this directory.
    #[arg(long)]
    dest: PathBuf,
    #[command(flatten)]
    tls: TlsArgs,
    /// TCP congestion control for accepted sockets.
    #[arg(long)]
    congestion: Option<String>,
    /// Exit after this many transfers completed (for scripts); default: run until interrupted.
    #[arg(long)]
    exit_after: Option<u64>,
    /// Print the receiver's counters as JSON on exit.
    #[arg(long)]
    stats: bool,
}

#[derive(Debug, clap::Args)]
struct CertsArgs {
    /// Directory to write `ca.pem`, `<node>.pem` and `<node>-key.pem` into.
    #[arg(long)]
    out: PathBuf,
    /// Node names (repeat the flag); each gets a certificate.
    #[arg(long = "node", default_values_t = [String::from("node-a"), String::from("node-b")])]
    nodes: Vec<String>,
    /// More DNS names or IP addresses every node certificate is valid for (repeat the flag).
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 30)]
    days: u32,
}

fn parse_bytes(input: &str) -> Result<u64, String> {
    input
        .parse::<Bytes>()
        .map(|bytes| bytes.0)
        .map_err(|error| error.to_string())
}

fn parse_rate(input: &str) -> Result<u64, String> {
    input
        .parse::<BitRate>()
        .map(|rate| rate.0)
        .map_err(|error| error.to_string())
}

/// A packet loss probability: a fraction in `0..=1`, or a percentage in `0%..=100%`, the bound
/// the link model ([`LinkEstimate::loss`]) takes. `7` is refused, not read as 700 % or 7 %.
fn parse_loss(input: &str) -> Result<f64, String> {
    let text = input.trim();
    let (number, scale, bounds) = match text.strip_suffix('%') {
        Some(percent) => (percent.trim(), 100.0, "a loss percentage in 0%..100%"),
        None => (text, 1.0, "a loss fraction in 0..1"),
    };
    let hint = if scale == 1.0 {
        " (write 0.001 or 0.1% for 0.1 %)"
    } else {
        ""
    };
    match number.parse::<f64>() {
        Ok(value) if (0.0..=scale).contains(&value) => Ok(value / scale),
        _ => Err(format!("{text} is not {bounds}{hint}")),
    }
}

fn parse_duration_arg(input: &str) -> Result<Duration, String> {
    parse_duration(input).map_err(|error| error.to_string())
}

/// Runs `automigrate transfer …`.
pub fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Certs(certs) => run_certs(certs),
        Command::Send(send_args) => runtime()?.block_on(run_send(send_args)),
        Command::Receive(receive_args) => runtime()?.block_on(run_receive(receive_args)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_certs(args: CertsArgs) -> Result<()> {
    let written = automigrate_transfer::devcerts::write_dev_pki(
        &args.out,
        &args.nodes,
        &args.sans,
        args.days,
    )
    .context("writing development certificates")?;
    println!("CA           {}", written.ca.display());
    for (node, cert, key) in &written.nodes {
        println!("{node:<12} {}  {}", cert.display(), key.display());
    }
    println!("These are development certificates: use your cluster's CA in production.");
    Ok(())
}

async fn run_send(args: SendArgs) -> Result<()> {
    let tls = args.tls.load()?;
    let peer = tokio::net::lookup_host(&args.to)
        .await
        .with_context(|| format!("resolving {}", args.to))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.to))?;
    let source = match (&args.base, args.paths.as_slice()) {
        (None, [single]) if single.is_dir() => Source::Dir(single.clone()),
        (None, _) => bail!("give one directory, or --base DIR and paths under it"),
        (Some(base), paths) => Source::Paths {
            base: base.clone(),
            paths: paths.to_vec(),
        },
    };
    let link = args.rtt.map(|rtt| LinkEstimate {
        rtt,
        bandwidth_bps: args.bandwidth,
        loss: args.loss,
    });
    let bar = (!args.quiet).then(progress_bar);
    let progress = bar.clone().map(|bar| {
        Arc::new(move |progress: &Progress| {
            bar.set_length(progress.bytes_total);
            bar.set_position(progress.bytes_done);
            bar.set_message(format!(
                "{} streams, {}",
                progress.streams,
                automigrate_core::units::approx_rate(progress.rate_bps)
            ));
        }) as automigrate_transfer::sender::ProgressFn
    });
    let options = SendOptions {
        target: args.target.clone(),
        settings: TransferSettings {
            strategy: match args.strategy {
                Strategy::Auto => TransferStrategy::Auto,
                Strategy::Single => TransferStrategy::Single,
                Strategy::Parallel => TransferStrategy::Parallel,
            },
            max_streams: args.max_streams,
            chunk_size: args.chunk_size,
            rate_limit_bps: args.rate_limit,
        },
        link,
        round: args.round,
        congestion_control: args.congestion.clone(),
        server_name: args.server_name.clone(),
        progress,
        ..SendOptions::default()
    };
    let result = send(&source, peer, &tls, &options).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = result.with_context(|| format!("sending to {peer}"))?;
    let rate = report.total_bytes.saturating_sub(report.bytes_skipped) as f64 * 8.0
        / report.duration_secs.max(1e-9);
    println!(
        "sent {} files ({}) in {:.2} s, {}; {} units sent, {} resent, {} skipped; {} connections, at most {} streams",
        report.files,
        automigrate_core::units::approx_bytes(report.total_bytes),
        report.duration_secs,
        automigrate_core::units::approx_rate(rate),
        report.units_sent,
        report.units_resent,
        report.units_skipped,
        report.connections,
        report.max_streams_used,
    );
    println!("plan: {}", report.plan.rationale);
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}  {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn run_receive(args: ReceiveArgs) -> Result<()> {
    let tls = args.tls.load()?;
    std::fs::create_dir_all(&args.dest)
        .with_context(|| format!("creating {}", args.dest.display()))?;
    let mut config = ReceiverConfig::new(&args.dest);
    config.congestion_control = args.congestion.clone();
    let receiver = Receiver::new(config, &tls)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "receiving into {} on {}",
        args.dest.display(),
        listener.local_addr()?
    );
    let watcher = receiver.clone();
    let exit_after = args.exit_after;
    let enough = async move {
        let Some(count) = exit_after else {
            return std::future::pending().await;
        };
        while watcher.stats().sessions_completed < count {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let the last answers reach the sender, which then closes its connections.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while watcher.stats().connections_open > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        served = receiver.serve(listener) => served?,
        _ = tokio::signal::ctrl_c() => eprintln!("interrupted"),
        () = enough => {}
    }
    if args.stats {
        println!("{}", serde_json::to_string(&receiver.stats())?);
    }
    Ok(())
}
