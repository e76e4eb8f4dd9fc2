//! `automigrate-netem`: command-line front end of the link emulator. Today it has one job,
//! `fidelity`, which builds emulated links and measures what they really do (RTT, throughput
//! under a rate cap, loss) against what they were set to, printing Markdown tables.

mod fidelity;
mod probes;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "automigrate-netem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure the emulator against its settings (needs root; creates and removes namespaces).
    Fidelity(fidelity::FidelityArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Fidelity(args) => fidelity::run(&args),
    }
}
