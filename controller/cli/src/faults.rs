//! `automigrate faults`: the fault-injection suite over the local cluster of real components
//! (crate automigrate-embedded, modules `kube` and `faults`) and its report. Everything it does
//! lives in that crate; this file turns flags into settings and writes the report as the runs
//! finish.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use automigrate_embedded::faults::{self, FaultKind, report};

/// `automigrate faults …`
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Number of randomized runs.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Suite seed: it decides every run's fault kind and parameters.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fault kinds (comma-separated), run in rounds: controller-kill, source-agent-kill,
    /// target-agent-kill, target-death, target-disk-full, corrupt-at-rest, corrupt-in-flight,
    /// policy-edit-valid, policy-edit-invalid, agent-outage, resume-damage, api-cut-taint,
    /// api-cut-administrator (these two: a node cut off from the API server but alive, the
    /// known split brain, reported on their own lines), and issue 16's kinds with the default
    /// self-fence mode at drawn moments: api-cut, peer-cut, power-off. Default: all.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Where the report goes (report.md, report.json, runs.csv), rewritten after every run.
    #[arg(long, default_value = "docs/faults/local-cluster")]
    out: PathBuf,
    /// State of every run's cluster (one directory per run, removed after it unless --keep).
    /// Keep it on tmpfs: a kubelet reports DiskPressure below 10 % free.
    #[arg(long, default_value = "/dev/shm/automigrate-faults")]
    root: PathBuf,
    /// Where automigrate-apiserver, -kubelet, -agent and -controller are (default: next to
    /// this program, else $AUTOMIGRATE_BIN_DIR).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep every run's state: component logs, stores, manifests.
    #[arg(long)]
    keep: bool,
    /// A run that has not finished training by then is stopped and counted stuck.
    #[arg(long, default_value_t = 420)]
    run_deadline_s: u64,
    /// Runs carried out at once, each on its own cluster (its own state directory, network
    /// namespaces and cgroups); the report lists them in plan order.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    jobs: u32,
    /// Epochs of the protected trainer (and of the uninterrupted reference it must match bit
    /// for bit); default 160 (about 20 s uninterrupted on 2 cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(10..))]
    epochs: Option<u32>,
    /// Print the runs the seed plans (kind, trigger, percent, drawn parameters) and exit.
    #[arg(long)]
    plan_only: bool,
    /// Only check that this machine can run the suite.
    #[arg(long)]
    check: bool,
    /// Run nothing: judge the runs of an existing report.json again with this build's rules
    /// (the measured fields stay) and write the report to --out.
    #[arg(long, value_name = "REPORT_JSON")]
    rejudge: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if let Some(path) = &args.rejudge {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut report: report::SuiteReport = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a fault-injection report", path.display()))?;
        faults::rejudge(&mut report);
        report.rejudged = Some(format!(
            "judged again at {} by `{}` (the runs' measurements are those of the original run)",
            jiff::Timestamp::now(),
            std::env::args().collect::<Vec<_>>().join(" ")
        ));
        return finish(&report, &args.out);
    }
    if args.plan_only {
        let kinds = parse_kinds(&args.kinds)?;
        for plan in faults::plan_runs(args.seed, args.runs, &kinds) {
            println!("{} {}", plan.name(), plan.describe());
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The suite needs what the demo needs.
    let missing = automigrate_embedded::demo::missing_prerequisites();
    if !missing.is_empty() {
        eprintln!("automigrate faults cannot run on this machine. Missing:");
        for item in &missing {
            eprintln!("  - {item}");
        }
        return Ok(ExitCode::from(3));
    }
    let Some(bin_dir) = args.bin_dir.clone().or_else(bin_dir_default) else {
        anyhow::bail!("cannot tell where the cluster's binaries are: pass --bin-dir");
    };
    let missing_binaries: Vec<String> = [
        "automigrate-apiserver",
        "automigrate-kubelet",
        "automigrate-agent",
        "automigrate-controller",
        "automigrate",
    ]
    .iter()
    .filter(|name| !bin_dir.join(name).is_file())
    .map(|name| name.to_string())
    .collect();
    if !missing_binaries.is_empty() {
        anyhow::bail!(
            "missing in {}: {} (build them: cargo build --release --locked -p automigrate \
             -p automigrate-apiserver -p automigrate-kubelet -p automigrate-agent \
             -p automigrate-operator)",
            bin_dir.display(),
            missing_binaries.join(", ")
        );
    }
    let kubectl = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !kubectl {
        anyhow::bail!("kubectl is not on PATH (the harness applies manifests with it)");
    }
    if args.check {
        println!(
            "ok: root, network namespaces, TUN, runc, CRIU >= 4, iptables, python3-numpy, kubectl, binaries in {}",
            bin_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let kinds = parse_kinds(&args.kinds)?;
    let mut settings = faults::standard_settings(args.root, bin_dir, args.seed, args.runs, kinds);
    settings.keep = args.keep;
    settings.run_deadline_s = args.run_deadline_s;
    settings.jobs = args.jobs as usize;
    if let Some(epochs) = args.epochs {
        settings.trainer.epochs = epochs;
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let commit = report::git_commit();
    let machine = automigrate_embedded::report::Machine::probe();
    let left_out = faults::left_out(&settings.kinds);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let out = args.out.clone();
    let write_partial = |reference: &faults::Reference, records: &[faults::RunRecord]| {
        if let Some(last) = records.last() {
            println!(
                "[faults] {:>3}/{} {} {} -> {}, downtime {} ({:.1} s){}",
                records.len(),
                settings.runs,
                last.name,
                last.plan.describe(),
                last.outcome,
                last.downtime.describe(),
                last.wall_s,
                if last.findings.is_empty() {
                    String::new()
                } else {
                    format!("\n          FINDINGS: {}", last.findings.join("; "))
                }
            );
        }
        let partial = report::build(
            &settings,
            reference.clone(),
            records.to_vec(),
            &command,
            &commit,
            machine.clone(),
            left_out.clone(),
        );
        if let Err(error) = report::write(&out, &partial) {
            eprintln!("warning: writing the partial report: {error}");
        }
    };
    // On SIGINT or SIGTERM the suite is dropped: the run's cluster tears itself down (its
    // components and containers stop, its namespaces go); the report written after the last
    // finished run stays.
    let outcome = runtime.block_on(async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("listening for SIGTERM")?;
        tokio::select! {
            outcome = faults::run_suite(&settings, write_partial) => Ok(Some(outcome)),
            _ = tokio::signal::ctrl_c() => Ok::<_, anyhow::Error>(None),
            _ = terminate.recv() => Ok(None),
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(30));
    let Some(outcome) = outcome? else {
        eprintln!(
            "interrupted: the cluster of the run in progress was torn down; the report in {} \
             covers the runs that finished",
            args.out.display()
        );
        return Ok(ExitCode::from(130));
    };
    let (reference, records) = outcome?;
    let report = report::build(
        &settings, reference, records, &command, &commit, machine, left_out,
    );
    finish(&report, &args.out)
}

/// `--kinds` (all when empty).
fn parse_kinds(kinds: &[String]) -> Result<Vec<FaultKind>> {
    if kinds.is_empty() {
        return Ok(faults::all_kinds());
    }
    Ok(kinds
        .iter()
        .map(|kind| kind.parse::<FaultKind>())
        .collect::<Result<Vec<_>, _>>()?)
}

/// The directory of this program (target/release or target/debug), else $AUTOMIGRATE_BIN_DIR.
fn bin_dir_default() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(std::path::Path::to_path_buf))
        .filter(|dir| dir.join("automigrate-controller").is_file())
        .or_else(automigrate_embedded::kube::find_bin_dir)
}

/// Writes the report, prints the table, and says whether any run has a finding.
fn finish(report: &report::SuiteReport, out: &std::path::Path) -> Result<ExitCode> {
    let written = report::write(out, report)?;
    println!();
    print!("{}", report::render_table(report));
    println!();
    for path in &written {
        println!("wrote {}", path.display());
    }
    Ok(if report.goals_met() && report.findings() == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} run(s) with findings: see {}",
            report.findings(),
            out.join("report.md").display()
        );
        ExitCode::from(1)
    })
}
