//! `automigrate demo`: checks what the machine needs, runs the selected scenarios in order on
//! the local cluster of real components ([`crate::demo_runs`]) and writes the report.
//!
//! Order: the uninterrupted reference run first (its loss is what every other run must
//! reproduce bit for bit, and its duration paces the mobility trace), then for each failure
//! point a migration run and a fresh-restart run, then degradation, then mobility.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::demo_runs::{self, DemoSettings, Recovery, RunError, RunKind, RunResult};
use crate::report::{self, DemoReport, Machine, ReportError};
use crate::workload::{DatasetSpec, PYTHON, TrainerSpec};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("this machine cannot run the demo; missing: {}", .0.join("; "))]
    Missing(Vec<String>),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Run(#[from] Box<RunError>),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Which scenarios to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    HardFailure,
    Degradation,
    Mobility,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "hard-failure" => Ok(Self::HardFailure),
            "degradation" => Ok(Self::Degradation),
            "mobility" => Ok(Self::Mobility),
            other => Err(format!(
                "unknown scenario `{other}`: expected hard-failure, degradation or mobility"
            )),
        }
    }
}

/// The demo on the local cluster: which runs, on what.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub settings: DemoSettings,
    pub scenarios: Vec<Scenario>,
    /// Hard-failure points, percent of the epochs.
    pub failure_points: Vec<u32>,
    /// When the degradation is injected, percent of the epochs.
    pub degradation_point: u32,
}

impl Plan {
    /// The demo as `automigrate demo` runs it by default (about 10 minutes on 2 cores).
    pub fn standard(root: PathBuf, bin_dir: PathBuf, policies_file: PathBuf) -> Self {
        Self {
            settings: DemoSettings {
                root,
                bin_dir,
                policies_file,
                nodes: 4,
                rtt_step_ms: 10,
                dataset: DatasetSpec {
                    name: "clusters".into(),
                    files: 16,
                    rows_per_file: 8192,
                    features: 32,
                    classes: 4,
                    seed: 20211220,
                },
                trainer: TrainerSpec {
                    epochs: 30,
                    hidden: 128,
                    seed: 7,
                    learning_rate: 0.05,
                },
                checkpoint_interval: "5s".into(),
                failure_policy: "demo".into(),
                mobility_policy: "demo-mobility".into(),
                keep: false,
            },
            scenarios: vec![
                Scenario::HardFailure,
                Scenario::Degradation,
                Scenario::Mobility,
            ],
            failure_points: vec![25, 50, 75],
            degradation_point: 50,
        }
    }
}

fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// Everything the demo needs that this machine lacks, each with how to get it.
pub fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if let Some(netem) = automigrate_netem::missing_prerequisites() {
        missing.push(format!("{netem} (network namespaces and TUN devices)"));
    }
    let install = "run `sudo scripts/install-node-deps.sh`";
    if !command_works("runc", &["--version"]) {
        missing.push(format!("runc on PATH ({install})"));
    }
    match Command::new("criu").arg("--version").output() {
        Ok(output) => {
            let text = String::from_utf8_lossy(&output.stdout).to_string();
            let major = text
                .lines()
                .find_map(|line| line.strip_prefix("Version: "))
                .and_then(|version| version.split('.').next())
                .and_then(|major| major.trim().parse::<u32>().ok());
            if major.is_none_or(|major| major < 4) {
                missing.push(format!("CRIU >= 4 (found `{}`; {install})", text.trim()));
            } else if !command_works("criu", &["check"]) {
                missing
                    .push("a passing `criu check` (CRIU cannot checkpoint on this kernel)".into());
            }
        }
        Err(_) => missing.push(format!("criu on PATH ({install})")),
    }
    if !command_works("iptables-restore", &["--version"]) {
        missing.push(format!(
            "iptables (CRIU locks the container's network; {install})"
        ));
    }
    if !command_works("kubectl", &["version", "--client"]) {
        missing.push(
            "kubectl on PATH (the local cluster is driven and read through it; Debian: kubernetes-client)"
                .into(),
        );
    }
    if !command_works(PYTHON, &["-c", "import numpy"]) {
        missing.push(format!("{PYTHON} with numpy (python3-numpy; {install})"));
    }
    missing
}

/// Runs the plan and builds the report (not yet written).
pub async fn run_demo(plan: &Plan, command: &str) -> Result<DemoReport, DemoError> {
    let missing = missing_prerequisites();
    if !missing.is_empty() {
        return Err(DemoError::Missing(missing));
    }
    let settings = &plan.settings;
    if !settings.policies_file.is_file() {
        return Err(DemoError::Setup(format!(
            "the demo policies {} are missing",
            settings.policies_file.display()
        )));
    }
    let machine = Machine::probe();
    say(&format!(
        "local cluster: {} nodes, automigrate-apiserver, -kubelet, -agent and 2 automigrate-controller replicas from {}; policies {}",
        settings.nodes,
        settings.bin_dir.display(),
        settings.policies_file.display()
    ));
    let mut runs: Vec<RunResult> = Vec::new();
    say("reference: the trainer pod alone, unprotected, uninterrupted");
    let reference = demo_runs::run(settings, RunKind::Reference, 0.0)
        .await
        .map_err(Box::new)?;
    say(&format!(
        "  trained {} epochs in {:.2} s, final loss {}",
        reference.final_epoch.unwrap_or_default(),
        reference.training_s.unwrap_or_default(),
        reference.final_loss_hex.as_deref().unwrap_or("?")
    ));
    let reference_s = reference.training_s.unwrap_or(20.0);
    runs.push(reference);
    let mut kinds = Vec::new();
    for scenario in &plan.scenarios {
        match scenario {
            Scenario::HardFailure => {
                for &percent in &plan.failure_points {
                    for recovery in [Recovery::Resume, Recovery::FreshRestart] {
                        kinds.push(RunKind::HardFailure { percent, recovery });
                    }
                }
            }
            Scenario::Degradation => kinds.push(RunKind::Degradation {
                percent: plan.degradation_point,
            }),
            Scenario::Mobility => kinds.push(RunKind::Mobility),
        }
    }
    for kind in kinds {
        say(&kind.name());
        let run = demo_runs::run(settings, kind, reference_s)
            .await
            .map_err(Box::new)?;
        say(&describe_run(&run));
        runs.push(run);
    }
    Ok(report::build_report(settings, runs, command, machine)?)
}

fn say(line: &str) {
    println!("[demo] {line}");
}

fn describe_run(run: &RunResult) -> String {
    let mut parts = vec![format!(
        "  trained {} epochs in {:.2} s",
        run.final_epoch.unwrap_or_default(),
        run.training_s.unwrap_or_default()
    )];
    for migration in &run.migrations {
        let phases: Vec<String> = migration
            .history
            .iter()
            .map(|span| format!("{} {:.1}s", span.phase, span.seconds))
            .collect();
        parts.push(format!(
            "Migration {} {} -> {} ({}, {}: {})",
            migration.name,
            migration.from,
            migration.to,
            migration.trigger,
            migration.phase,
            phases.join(", ")
        ));
    }
    if let Some(downtime) = run.downtime_s {
        parts.push(format!("downtime {downtime:.2} s"));
    }
    if let Some(epoch) = run.resumed_from_epoch {
        parts.push(format!("resumed after epoch {epoch}"));
    }
    parts.join("; ")
}

/// Writes the report and prints the table and the checks.
pub fn publish(report: &DemoReport, out_dir: &Path) -> Result<Vec<PathBuf>, DemoError> {
    let written = report::write_report(out_dir, report)?;
    println!();
    print!("{}", report::render_table(report));
    println!();
    for check in &report.checks {
        println!(
            "{} {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.name
        );
    }
    Ok(written)
}
