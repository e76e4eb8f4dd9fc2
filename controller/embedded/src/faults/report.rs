//! The suite's report: `report.md` (fault kinds × outcomes with counts, the goals, every run's
//! parameters and outcome, the findings), `report.json` (everything measured) and `runs.csv`
//! (one line per run).
//!
//! Data model: [`SuiteReport`] is built from the measured [`RunRecord`]s only, with the command,
//! the date, the git commit and the machine (CPUs, kernel, CRIU, runc, load average).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{FaultKind, Reference, RunRecord, SuiteSettings};
use crate::report::Machine;

#[derive(Debug, thiserror::Error)]
pub enum FaultReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding the report: {0}")]
    Encode(String),
}

/// One row of the kinds × outcomes table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KindRow {
    pub kind: String,
    pub runs: usize,
    pub fault_fired: usize,
    /// End phase of the runs' migrations (joined with `+` for several) → runs.
    pub outcomes: BTreeMap<String, usize>,
    pub resumed_from_checkpoint: usize,
    pub loss_identical: usize,
    pub double_running: usize,
    pub corrupted_restores: usize,
    pub stuck: usize,
    pub runs_with_findings: usize,
    pub mean_wall_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuiteReport {
    pub generated_at: String,
    pub command: String,
    pub git_commit: String,
    pub machine: Machine,
    pub load_average_at_end: String,
    pub settings: SuiteSettings,
    pub reference: Reference,
    pub rows: Vec<KindRow>,
    pub total: KindRow,
    pub runs: Vec<RunRecord>,
    /// Kinds the suite could not run here, with why.
    pub left_out: Vec<String>,
    /// When the runs were judged again by a later build's rules (`--rejudge`), and by what.
    #[serde(default)]
    pub rejudged: Option<String>,
}

impl SuiteReport {
    /// The goals: no double running, no corrupted restore, no stuck migration.
    pub fn goals_met(&self) -> bool {
        self.total.double_running == 0
            && self.total.corrupted_restores == 0
            && self.total.stuck == 0
    }

    pub fn findings(&self) -> usize {
        self.total.runs_with_findings
    }
}

fn git(args: &[&str]) -> Option<String> {
    std::process::Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The commit the suite ran on, and whether the work tree had changes.
pub fn git_commit() -> String {
    match git(&["rev-parse", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|status| !status.is_empty());
            if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            }
        }
        None => "unknown".into(),
    }
}

fn row_of(kind: String, records: &[&RunRecord]) -> KindRow {
    let mut row = KindRow {
        kind,
        runs: records.len(),
        ..KindRow::default()
    };
    for record in records {
        *row.outcomes.entry(record.outcome.clone()).or_default() += 1;
        row.fault_fired += usize::from(record.fault_fired);
        row.resumed_from_checkpoint +=
            usize::from(!record.resumed_from.is_empty() && !record.resumed_from.contains(&0));
        row.loss_identical += usize::from(record.loss_identical);
        row.double_running += usize::from(record.double_running());
        row.corrupted_restores += usize::from(record.corrupted_restore());
        row.stuck += usize::from(record.stuck());
        row.runs_with_findings += usize::from(!record.findings.is_empty());
        row.mean_wall_s += record.wall_s;
    }
    if !records.is_empty() {
        row.mean_wall_s /= records.len() as f64;
    }
    row
}

/// Recomputes the table's rows from the runs.
pub fn recount(report: &mut SuiteReport) {
    let mut rows = Vec::new();
    for kind in FaultKind::ALL {
        let of_kind: Vec<&RunRecord> = report
            .runs
            .iter()
            .filter(|run| run.plan.kind == kind)
            .collect();
        if !of_kind.is_empty() {
            rows.push(row_of(kind.name().to_string(), &of_kind));
        }
    }
    let all: Vec<&RunRecord> = report.runs.iter().collect();
    report.total = row_of("all".into(), &all);
    report.rows = rows;
}

/// `git_commit`: [`git_commit`] read when the suite started (commits made while it runs do
/// not change what it ran).
pub fn build(
    settings: &SuiteSettings,
    reference: Reference,
    runs: Vec<RunRecord>,
    command: &str,
    git_commit: &str,
    machine: Machine,
    left_out: Vec<String>,
) -> SuiteReport {
    let mut report = SuiteReport {
        generated_at: jiff::Timestamp::now().to_string(),
        command: command.to_string(),
        git_commit: git_commit.to_string(),
        machine,
        load_average_at_end: crate::scenario::load_average(),
        settings: settings.clone(),
        reference,
        rows: Vec::new(),
        total: KindRow::default(),
        runs,
        left_out,
        rejudged: None,
    };
    recount(&mut report);
    report
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The kinds × outcomes table (also printed by the command).
pub fn render_table(report: &SuiteReport) -> String {
    let mut outcomes: Vec<String> = report.total.outcomes.keys().cloned().collect();
    outcomes.sort();
    let mut text = String::new();
    let _ = write!(text, "| fault kind | runs | fault fired |");
    for outcome in &outcomes {
        let _ = write!(text, " {} |", cell(outcome));
    }
    let _ = writeln!(
        text,
        " resumed from a checkpoint | loss identical | double running | corrupted restore | stuck | runs with findings | mean s/run |"
    );
    let _ = write!(text, "|---|---:|---:|");
    for _ in &outcomes {
        let _ = write!(text, "---:|");
    }
    let _ = writeln!(text, "---:|---:|---:|---:|---:|---:|---:|");
    for row in report.rows.iter().chain(std::iter::once(&report.total)) {
        let _ = write!(
            text,
            "| {} | {} | {} |",
            row.kind, row.runs, row.fault_fired
        );
        for outcome in &outcomes {
            let _ = write!(
                text,
                " {} |",
                row.outcomes.get(outcome).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            text,
            " {} | {} | {} | {} | {} | {} | {:.1} |",
            row.resumed_from_checkpoint,
            row.loss_identical,
            row.double_running,
            row.corrupted_restores,
            row.stuck,
            row.runs_with_findings,
            row.mean_wall_s
        );
    }
    text
}

/// The migrations a run's listing shows: all of up to eight; else the first four and the
/// last two, with a line saying how many are left out (report.json has them all).
fn shown<'a>(
    migrations: &'a [super::MigrationOutcome],
    text: &mut String,
) -> Vec<&'a super::MigrationOutcome> {
    if migrations.len() <= 8 {
        return migrations.iter().collect();
    }
    let _ = writeln!(
        text,
        "  - {} migrations; the first four and the last two follow (all in report.json)",
        migrations.len()
    );
    migrations
        .iter()
        .take(4)
        .chain(migrations.iter().skip(migrations.len() - 2))
        .collect()
}

fn params_text(record: &RunRecord) -> String {
    serde_json::to_string(&record.plan.params).unwrap_or_default()
}

/// `report.md`.
pub fn render_markdown(report: &SuiteReport) -> String {
    let settings = &report.settings;
    let demo = &settings.demo;
    let mut text = String::new();
    let _ = writeln!(text, "# automigrate fault-injection report\n");
    let _ = writeln!(
        text,
        "Generated {} by `{}` at commit {} on {} CPUs, kernel {}, {}, {} (load average at start: {}; at end: {}).\n",
        report.generated_at,
        report.command,
        report.git_commit,
        report.machine.cpus,
        report.machine.kernel,
        report.machine.criu,
        report.machine.runc,
        report.machine.load_average_at_start,
        report.load_average_at_end
    );
    let _ = writeln!(
        text,
        "Each run: a fresh local cluster of {} nodes (network namespaces, emulated links of {} ms RTT per hop, one `automigrate-agent` daemon per node), {} epochs of the deterministic numpy trainer in runc on node-a under the local controller (policy `{}` from `{}`, policy clock ×{}, checkpoint interval {} = {:.1} s real), one fault. Suite seed {}; {} runs; kinds: {}. Run deadline {} s. Uninterrupted reference: {:.2} s of training ({:.3} s/epoch), final loss `{}`.\n",
        demo.nodes,
        demo.rtt_step_ms,
        demo.trainer.epochs,
        demo.failure_policy,
        demo.policies_dir.display(),
        demo.time_scale,
        demo.checkpoint_interval,
        automigrate_core::units::parse_duration(&demo.checkpoint_interval)
            .map(|interval| interval.as_secs_f64() / f64::from(demo.time_scale.max(1)))
            .unwrap_or_default(),
        settings.seed,
        report.runs.len(),
        settings
            .kinds
            .iter()
            .map(|kind| kind.name())
            .collect::<Vec<_>>()
            .join(", "),
        settings.run_deadline_s,
        report.reference.training_s,
        report.reference.epoch_s,
        report.reference.loss_hex
    );
    for line in &report.left_out {
        let _ = writeln!(text, "Left out: {line}\n");
    }
    if let Some(rejudged) = &report.rejudged {
        let _ = writeln!(text, "Verdicts: {rejudged}\n");
    }
    let _ = writeln!(text, "## Faults × outcomes\n");
    let _ = writeln!(
        text,
        "Outcome columns are the end phases of the runs' migrations (`+` joins several in one run; `none`: no migration). \"resumed from a checkpoint\": every replacement resumed after an epoch > 0.\n"
    );
    text.push_str(&render_table(report));
    let _ = writeln!(text, "\n## Goals\n");
    let total = &report.total;
    for (goal, count) in [
        ("double running (two copies at once)", total.double_running),
        ("corrupted restores", total.corrupted_restores),
        (
            "stuck migrations (non-terminal at the end, or run deadline hit)",
            total.stuck,
        ),
    ] {
        let _ = writeln!(
            text,
            "- {} {goal}: {count} of {} runs",
            if count == 0 { "PASS" } else { "FAIL" },
            total.runs
        );
    }
    let _ = writeln!(
        text,
        "- {} ≥ 100 randomized runs: {}",
        if total.runs >= 100 { "PASS" } else { "NOT MET" },
        total.runs
    );
    let _ = writeln!(text, "\n## Findings\n");
    let with_findings: Vec<&RunRecord> = report
        .runs
        .iter()
        .filter(|run| !run.findings.is_empty())
        .collect();
    if with_findings.is_empty() {
        let _ = writeln!(text, "None.");
    }
    for run in with_findings {
        let _ = writeln!(
            text,
            "- **{}** ({}): {}",
            run.name,
            run.plan.describe(),
            run.findings.join("; ")
        );
        for note in &run.injection.notes {
            let _ = writeln!(text, "  - {}", cell(note));
        }
        for migration in shown(&run.migrations, &mut text) {
            let _ = writeln!(
                text,
                "  - migration {} {} → {}: {} ({})",
                migration.file,
                migration.source,
                migration.target,
                migration.phase,
                migration.message.as_deref().unwrap_or("no reason")
            );
        }
    }
    let _ = writeln!(text, "\n## Runs\n");
    let _ = writeln!(
        text,
        "| run | kind | trigger | at % | parameters | struck in phase | node | outcome | resumed after epoch | redone epochs (allowed) | loss identical | max copies | files verified (ckpt/dataset) | receiver refusals | s | load average at start | findings |"
    );
    let _ = writeln!(
        text,
        "|---|---|---|---:|---|---|---|---|---|---|---|---:|---|---:|---:|---|---|"
    );
    for run in &report.runs {
        let _ = writeln!(
            text,
            "| {} | {} | {:?} | {} | `{}` | {} | {} | {} | {:?} | {:?} ({}) | {} | {} | {}/{} | {} | {:.1} | {} | {} |",
            run.name,
            run.plan.kind,
            run.plan.trigger,
            run.plan.percent,
            cell(&params_text(run)),
            run.injection
                .phase_before
                .map_or_else(|| "–".to_string(), |phase| phase.to_string()),
            run.injection.node.as_deref().unwrap_or("–"),
            run.outcome,
            run.resumed_from,
            run.redone_epochs,
            run.redone_allowed,
            if run.loss_identical { "yes" } else { "NO" },
            run.copies.max_running,
            run.checkpoints_verified,
            run.datasets_verified,
            run.receiver_refusals,
            run.wall_s,
            cell(&run.load_average.0),
            if run.findings.is_empty() {
                "–".to_string()
            } else {
                cell(&run.findings.join("; "))
            }
        );
    }
    let _ = writeln!(text, "\n## What each run did\n");
    for run in &report.runs {
        let _ = writeln!(text, "- **{}** {}", run.name, cell(&run.plan.describe()));
        for note in &run.injection.notes {
            let _ = writeln!(text, "  - {}", cell(note));
        }
        for migration in shown(&run.migrations, &mut text) {
            let _ = writeln!(
                text,
                "  - migration {} → {} ({}): {} — {}",
                migration.source,
                migration.target,
                migration.trigger,
                migration.phase,
                cell(migration.message.as_deref().unwrap_or("no reason"))
            );
        }
        if let Some(error) = &run.controller_error {
            let _ = writeln!(text, "  - controller stopped: {}", cell(error));
        }
    }
    text
}

/// `runs.csv`.
pub fn render_csv(report: &SuiteReport) -> String {
    let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    let mut text = String::from(
        "run,kind,seed,trigger,percent,params,fault_fired,phase_before,phase_after,node,outcome,resumed_from,redone_epochs,redone_allowed,training_finished,loss_identical,max_running,progress_overlap,checkpoints_verified,datasets_verified,verification_problems,receiver_refusals,deadline_hit,wall_s,load_average_start,findings\n",
    );
    for run in &report.runs {
        let fields = [
            run.name.clone(),
            run.plan.kind.name().to_string(),
            format!("{:#x}", run.plan.seed),
            format!("{:?}", run.plan.trigger),
            run.plan.percent.to_string(),
            quote(&params_text(run)),
            run.fault_fired.to_string(),
            run.injection
                .phase_before
                .map(|phase| phase.to_string())
                .unwrap_or_default(),
            run.injection
                .phase_after
                .map(|phase| phase.to_string())
                .unwrap_or_default(),
            run.injection.node.clone().unwrap_or_default(),
            run.outcome.clone(),
            quote(&format!("{:?}", run.resumed_from)),
            quote(&format!("{:?}", run.redone_epochs)),
            run.redone_allowed.to_string(),
            run.training_finished.to_string(),
            run.loss_identical.to_string(),
            run.copies.max_running.to_string(),
            run.progress_overlap.to_string(),
            run.checkpoints_verified.to_string(),
            run.datasets_verified.to_string(),
            run.verification_problems.len().to_string(),
            run.receiver_refusals.to_string(),
            run.deadline_hit.to_string(),
            format!("{:.2}", run.wall_s),
            quote(&run.load_average.0),
            quote(&run.findings.join("; ")),
        ];
        text.push_str(&fields.join(","));
        text.push('\n');
    }
    text
}

/// Writes `report.md`, `report.json` and `runs.csv` into `dir`.
pub fn write(dir: &Path, report: &SuiteReport) -> Result<Vec<PathBuf>, FaultReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FaultReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = serde_json::to_string_pretty(report)
        .map_err(|error| FaultReportError::Encode(error.to_string()))?;
    let files = [
        ("report.md", render_markdown(report)),
        ("report.json", json),
        ("runs.csv", render_csv(report)),
    ];
    let mut written = Vec::new();
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}
