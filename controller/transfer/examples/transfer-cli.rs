//! The `automigrate transfer` subcommands as a standalone binary: the very module the
//! `automigrate` CLI mounts (`controller/cli/src/transfer.rs`), built here so this crate can
//! test it and the benchmark can drive it without the rest of the CLI.
//!
//! `cargo run --release -p automigrate-transfer --example transfer-cli -- send|receive|certs …`

#[path = "../../cli/src/transfer.rs"]
mod transfer;

use clap::Parser as _;

#[derive(Debug, clap::Parser)]
#[command(name = "transfer-cli", about = "automigrate transfer, standalone")]
struct Cli {
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "AUTOMIGRATE_LOG", default_value = "warn", global = true)]
    log: String,
    #[command(flatten)]
    transfer: transfer::Args,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match transfer::run(cli.transfer) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
