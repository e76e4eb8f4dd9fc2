//! `automigrate-embedded-controller --state-dir <dir>`: the embedded mode's controller as its
//! own process, started (and SIGKILLed, and started again) by a harness that owns the local
//! cluster; see `automigrate_embedded::process`. Logs go to stderr (`AUTOMIGRATE_LOG` filters).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let state_dir = match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(dir), None) if flag == "--state-dir" => PathBuf::from(dir),
        _ => {
            eprintln!("usage: automigrate-embedded-controller --state-dir <dir>");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AUTOMIGRATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Logging is best effort: a failed write must not panic (a full disk under the log).
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(automigrate_embedded::process::run_child(&state_dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "controller stopped");
            ExitCode::FAILURE
        }
    }
}
