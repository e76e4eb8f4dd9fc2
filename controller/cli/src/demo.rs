//! `automigrate demo`: the embedded single-machine mode (crate automigrate-embedded) with real
//! failures, migrations and resumes, and its report. Everything it does lives in that crate;
//! this file only turns flags into a plan.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use automigrate_embedded::cluster::AgentMode;
use automigrate_embedded::demo::{self, DemoPlan, Scenario};

/// `automigrate demo …`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenarios to run (comma-separated): hard-failure, degradation, mobility.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "hard-failure,degradation,mobility"
    )]
    scenarios: Vec<Scenario>,
    /// Hard-failure points, percent of the epochs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "25,50,75")]
    failure_points: Vec<u32>,
    /// Epochs of every training run.
    #[arg(long, default_value_t = 30)]
    epochs: u32,
    /// Policy time runs this many times faster than real time.
    #[arg(long, default_value_t = 30)]
    time_scale: u32,
    /// Policy ConfigMaps (the failure runs use `default`, the mobility run `edge-mobility`).
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// Where the report goes.
    #[arg(long, default_value = "docs/demo")]
    out: PathBuf,
    /// Storage of the local nodes (one directory per run, removed after it unless --keep).
    #[arg(long, default_value = "/var/tmp/automigrate-demo")]
    root: PathBuf,
    /// Keep every run's node storage, checkpoints and controller state.
    #[arg(long)]
    keep: bool,
    /// Only check that this machine can run the demo.
    #[arg(long)]
    check: bool,
    /// Node agents: the `automigrate-agent` daemon per node (found next to this program, or
    /// $AUTOMIGRATE_AGENT_BIN), or its library pieces in this process; `auto` prefers the
    /// daemon.
    #[arg(long, value_enum, default_value = "auto")]
    agent: AgentChoice,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AgentChoice {
    Auto,
    Daemon,
    InProcess,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let missing = demo::missing_prerequisites();
    if !missing.is_empty() {
        eprintln!("automigrate demo cannot run on this machine. Missing:");
        for item in &missing {
            eprintln!("  - {item}");
        }
        return Ok(ExitCode::from(3));
    }
    if args.check {
        println!("ok: root, network namespaces, TUN, runc, CRIU >= 4, iptables, python3-numpy");
        return Ok(ExitCode::SUCCESS);
    }
    let mut plan = DemoPlan::standard(args.root, args.policies);
    plan.scenarios = args.scenarios;
    plan.failure_points = args.failure_points;
    plan.settings.trainer.epochs = args.epochs;
    plan.settings.time_scale = args.time_scale;
    plan.settings.keep = args.keep;
    plan.settings.agent = match (
        args.agent,
        automigrate_embedded::daemon::find_agent_binary(),
    ) {
        (AgentChoice::InProcess, _) | (AgentChoice::Auto, None) => AgentMode::InProcess,
        (AgentChoice::Daemon | AgentChoice::Auto, Some(binary)) => AgentMode::Daemon { binary },
        (AgentChoice::Daemon, None) => anyhow::bail!(
            "--agent daemon: no automigrate-agent binary next to this program, on PATH or in \
             $AUTOMIGRATE_AGENT_BIN (build it: cargo build --release -p automigrate-agent)"
        ),
    };
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(demo::run_demo(&plan, &command));
    // Sends abandoned on failed nodes may still be winding down; they have nothing to finish.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    let report = report?;
    let written = demo::publish(&report, &args.out)?;
    println!();
    for path in &written {
        println!("wrote {}", path.display());
    }
    Ok(if report.all_checks_passed() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "some checks FAILED: see {}",
            args.out.join("report.md").display()
        );
        ExitCode::from(1)
    })
}
