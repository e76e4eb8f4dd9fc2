//! `automigrate-apiserver`: the local cluster's API server (see the crate docs and
//! `docs/local-cluster.md`).
//!
//! Listens on `127.0.0.1:6443` by default (the port Kubernetes API servers use; a busy port is
//! reported, `--listen 127.0.0.1:0` picks a free one), writes a kubeconfig with `--kubeconfig`,
//! and stops gracefully on SIGTERM or SIGINT. State lives in memory only: a restart is an
//! empty cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use automigrate_apiserver::{Options, start};
use clap::{ArgAction, Parser};
use tokio::signal::unix::{SignalKind, signal};

/// The local cluster's API server: an in-memory Kubernetes API on plain HTTP, loopback only.
#[derive(Debug, Parser)]
#[command(name = "automigrate-apiserver", version)]
struct Args {
    /// Address to listen on; repeat for several. Port 0 picks a free port. The kubeconfig
    /// names the first.
    #[arg(
        long = "listen",
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:6443"
    )]
    listen: Vec<SocketAddr>,
    /// Allow listen addresses that are not loopback (there is no authentication: use only a
    /// host-only address no other machine can reach).
    #[arg(long)]
    allow_non_loopback: bool,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long, value_name = "PATH", env = "AUTOMIGRATE_APISERVER_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Deleting a pod bound to a node only marks it (deletionTimestamp) until its kubelet
    /// confirms with a zero-grace delete, as on a real cluster.
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    graceful_pod_deletion: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        .init();

    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let running = start(&Options {
        listen: args.listen,
        allow_non_loopback: args.allow_non_loopback,
        kubeconfig: args.kubeconfig,
        graceful_pod_deletion: args.graceful_pod_deletion,
    })
    .await
    .context("starting the API server")?;
    for addr in &running.addrs {
        tracing::info!(server = %format!("http://{addr}"), "serving");
    }
    let signal = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(signal, "stopping");
    running.stop().await.context("stopping the API server")?;
    tracing::info!("stopped");
    Ok(())
}
