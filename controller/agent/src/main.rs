//! `automigrate-agent`: the node agent daemon. Flags and environment: see
//! `automigrate_agent::config::Args` (`automigrate-agent --help`). Stops gracefully on SIGTERM
//! or SIGINT.

use anyhow::Context as _;
use automigrate_agent::agent::Agent;
use automigrate_agent::config::{Args, LogFormat};
use automigrate_agent::metrics::AgentMetrics;
use automigrate_agent::prober::Latencies;
use automigrate_agent::server::{Listeners, RunningAgent};
use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    // reqwest (kubelet backend) and rustls find the ring provider as the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log write that fails (a full disk under the file stdout goes to) must not take the
    // agent down: by default the subscriber reports it with `eprintln!`, which panics when
    // stderr cannot be written either. Logging is best effort.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (api, transfer) = (args.api_listen, args.transfer_listen);
    let parts = args.into_parts().context("configuration")?;
    let latencies = Latencies::default();
    let agent = Agent::new(
        parts.options,
        parts.checkpointer,
        AgentMetrics::new(),
        latencies.clone(),
    )
    .context("opening the store and data root")?;
    let listeners = Listeners::bind(api, transfer)
        .await
        .with_context(|| format!("binding {api} (API) and {transfer} (transfers, TCP and UDP)"))?;
    let running = RunningAgent::start(agent, listeners, parts.serve, latencies)
        .await
        .context("starting the agent")?;
    wait_for_signal().await?;
    tracing::info!("signal received; shutting down");
    running.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
