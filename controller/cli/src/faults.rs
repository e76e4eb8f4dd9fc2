//! `automigrate faults`: the fault-injection suite over the embedded mode (crate
//! automigrate-embedded, module `faults`) and its report. Everything it does lives in that
//! crate; this file turns flags into settings and writes the report as the runs finish.

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
    /// target-agent-kill, source-partition, target-death, target-disk-full, corrupt-at-rest,
    /// corrupt-in-flight, policy-edit-valid, policy-edit-invalid, agent-outage, resume-damage.
    /// Default: all.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Policy ConfigMaps (the runs use `default`).
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// Where the report goes (report.md, report.json, runs.csv), rewritten after every run.
    #[arg(long, default_value = "docs/faults")]
    out: PathBuf,
    /// Storage of the local nodes (one directory per run, removed after it unless --keep).
    #[arg(long, default_value = "/var/tmp/automigrate-faults")]
    root: PathBuf,
    /// Keep every run's node storage, checkpoints, logs and controller state.
    #[arg(long)]
    keep: bool,
    /// A run that has not finished training by then is stopped and counted stuck.
    #[arg(long, default_value_t = 150)]
    run_deadline_s: u64,
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
    // The suite needs what the demo needs.
    let missing = automigrate_embedded::demo::missing_prerequisites();
    if !missing.is_empty() {
        eprintln!("automigrate faults cannot run on this machine. Missing:");
        for item in &missing {
            eprintln!("  - {item}");
        }
        return Ok(ExitCode::from(3));
    }
    let Some(agent) = automigrate_embedded::daemon::find_agent_binary() else {
        anyhow::bail!(
            "no automigrate-agent binary next to this program, on PATH or in $AUTOMIGRATE_AGENT_BIN \
             (build it: cargo build --release -p automigrate-agent): the suite kills and restarts \
             real agent daemons"
        );
    };
    let needs_controller_program = args.kinds.is_empty()
        || args
            .kinds
            .iter()
            .any(|kind| kind == FaultKind::ControllerKill.name());
    if needs_controller_program && automigrate_embedded::process::find_controller_binary().is_none()
    {
        anyhow::bail!(
            "no automigrate-embedded-controller program next to this one, on PATH or in \
             $AUTOMIGRATE_CONTROLLER_BIN (build it: cargo build --release -p automigrate-embedded): \
             controller-kill runs kill and restart the controller as its own process"
        );
    }
    if args.check {
        println!(
            "ok: root, network namespaces, TUN, runc, CRIU >= 4, iptables, python3-numpy, {}",
            agent.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let kinds = if args.kinds.is_empty() {
        faults::all_kinds()
    } else {
        args.kinds
            .iter()
            .map(|kind| kind.parse::<FaultKind>())
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut settings =
        faults::standard_settings(args.root, args.policies, agent, args.seed, args.runs, kinds);
    settings.demo.keep = args.keep;
    settings.run_deadline_s = args.run_deadline_s;
    let policies = automigrate_embedded::policies::load_policies(&settings.demo.policies_dir)?;
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
                "[faults] {:>3}/{} {} {} -> {} ({:.1} s){}",
                records.len(),
                settings.runs,
                last.name,
                last.plan.describe(),
                last.outcome,
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
    let outcome = runtime.block_on(faults::run_suite(&settings, &policies, write_partial));
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    let (reference, records) = outcome?;
    let report = report::build(
        &settings, reference, records, &command, &commit, machine, left_out,
    );
    finish(&report, &args.out)
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
