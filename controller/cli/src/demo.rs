//! `automigrate demo`: the trainer as a Pod on the local cluster of real components
//! (`automigrate-apiserver`, `automigrate-kubelet`, `automigrate-agent`, `automigrate-controller`;
//! crate automigrate-embedded, module `demo_runs`), with real failures, migrations and resumes,
//! and its report. This file only turns flags into a plan.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use automigrate_embedded::demo::{self, Plan, Scenario};

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
    /// The demo's policy ConfigMaps (the failure runs use `demo`, the mobility run
    /// `demo-mobility`), applied after deploy/policies/default.yaml.
    #[arg(long, default_value = "examples/demo-policies.yaml")]
    policies: PathBuf,
    /// Where the report goes.
    #[arg(long, default_value = "docs/demo")]
    out: PathBuf,
    /// State of the local clusters, one directory per run (removed after it unless --keep);
    /// keep it on tmpfs: the kubelets report DiskPressure on a nearly full disk.
    #[arg(long, default_value = "/dev/shm/automigrate-demo")]
    root: PathBuf,
    /// Where the cluster's programs are (automigrate-apiserver, -kubelet, -agent,
    /// automigrate-controller, automigrate); default: next to this program, or
    /// $AUTOMIGRATE_BIN_DIR.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep every run's cluster state: component logs, node storage, checkpoints.
    #[arg(long)]
    keep: bool,
    /// Only check that this machine can run the demo.
    #[arg(long)]
    check: bool,
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
        println!(
            "ok: root, network namespaces, TUN, runc, CRIU >= 4, iptables, python3-numpy, kubectl"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => automigrate_embedded::kube::find_bin_dir().context(
            "the local cluster's programs were not found next to this program: build them with \
             `cargo build --release --locked -p automigrate -p automigrate-apiserver -p \
             automigrate-kubelet -p automigrate-agent -p automigrate-operator`, or name their \
             directory with --bin-dir",
        )?,
    };
    let mut plan = Plan::standard(args.root, bin_dir, args.policies);
    plan.scenarios = args.scenarios;
    plan.failure_points = args.failure_points;
    plan.settings.trainer.epochs = args.epochs;
    plan.settings.keep = args.keep;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Ctrl-C drops the run in progress, and with it its cluster, which tears itself down
    // (components, containers, network namespaces) instead of leaking them.
    let report = runtime.block_on(async {
        tokio::select! {
            report = demo::run_demo(&plan, &command) => Some(report),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    let Some(report) = report else {
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        eprintln!("interrupted: the run in progress was torn down; no report written");
        return Ok(ExitCode::from(130));
    };
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
