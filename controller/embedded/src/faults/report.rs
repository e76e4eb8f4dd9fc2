//! The suite's report: `report.md` (fault kinds × outcomes with counts, the goals, the known
//! split brain on its own lines, the comparison with the last report of the old embedded
//! controller, every run's parameters and outcome, the findings), `report.json` (everything
//! measured) and `runs.csv` (one line per run).
//!
//! Data model: [`SuiteReport`] is built from the measured [`RunRecord`]s only, with the command,
//! the date, the git commit and the machine (CPUs, kernel, CRIU, runc, load average).
//! [`EMBEDDED_BASELINE`] holds the figures of the embedded controller's last full report, copied
//! from `docs/faults/report.md` as committed before the suite moved onto the local cluster.

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
    /// Every run of the kinds that count toward the goals (not the known split brain).
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
    let counted: Vec<&RunRecord> = report
        .runs
        .iter()
        .filter(|run| !run.plan.kind.known_split_brain())
        .collect();
    report.total = row_of("all counted".into(), &counted);
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
    // Lanes (`--jobs`) finish runs out of order: the report lists them in plan order.
    let mut runs = runs;
    runs.sort_by_key(|run| run.plan.index);
    let mut report = SuiteReport {
        generated_at: jiff::Timestamp::now().to_string(),
        command: command.to_string(),
        git_commit: git_commit.to_string(),
        machine,
        load_average_at_end: super::load_average(),
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

fn is_split_brain(kind: &str) -> bool {
    kind.parse::<FaultKind>()
        .is_ok_and(|kind| kind.known_split_brain())
}

/// One kind's figures in the embedded controller's last full report.
#[derive(Debug, Clone, Copy)]
pub struct BaselineRow {
    pub kind: &'static str,
    pub runs: usize,
    /// End phases → runs, as that report's columns wrote them.
    pub outcomes: &'static str,
    pub loss_identical: usize,
    pub double_running: usize,
    pub corrupted_restores: usize,
    pub stuck: usize,
    pub runs_with_findings: usize,
    pub mean_wall_s: f64,
}

/// Where [`EMBEDDED_BASELINE`] comes from.
pub const EMBEDDED_BASELINE_SOURCE: &str = "docs/faults/report.md as committed in session 5 \
    (100 runs, seed 1, commit 282b67b, the embedded LocalController with in-process fencing); \
    agent-outage and resume-damage from docs/faults/outage-resume/report.md (20 runs each, seed \
    12, commit 81e7ffb)";

/// The old embedded controller's figures per kind (see [`EMBEDDED_BASELINE_SOURCE`]).
pub const EMBEDDED_BASELINE: [BaselineRow; 12] = [
    BaselineRow {
        kind: "controller-kill",
        runs: 10,
        outcomes: "Succeeded 10",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 11.7,
    },
    BaselineRow {
        kind: "source-agent-kill",
        runs: 10,
        outcomes: "RolledBack 7, Succeeded 3",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 9.6,
    },
    BaselineRow {
        kind: "target-agent-kill",
        runs: 10,
        outcomes: "RolledBack 5, Succeeded 5",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 41.6,
    },
    BaselineRow {
        kind: "source-partition",
        runs: 10,
        outcomes: "Succeeded 10 (the source SIGKILLed out of band)",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 11.7,
    },
    BaselineRow {
        kind: "target-death",
        runs: 10,
        outcomes: "Failed+Succeeded 6, RolledBack 3, Succeeded×2 1",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 12.1,
    },
    BaselineRow {
        kind: "target-disk-full",
        runs: 10,
        outcomes: "Failed+Succeeded 1, RolledBack 4, Succeeded 5",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 40.9,
    },
    BaselineRow {
        kind: "corrupt-at-rest",
        runs: 10,
        outcomes: "RolledBack 5, Succeeded 5",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 18.6,
    },
    BaselineRow {
        kind: "corrupt-in-flight",
        runs: 10,
        outcomes: "Succeeded 10",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 11.1,
    },
    BaselineRow {
        kind: "policy-edit-valid",
        runs: 10,
        outcomes: "Succeeded 10",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 10.2,
    },
    BaselineRow {
        kind: "policy-edit-invalid",
        runs: 10,
        outcomes: "Succeeded 10",
        loss_identical: 10,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 10.6,
    },
    BaselineRow {
        kind: "agent-outage",
        runs: 20,
        outcomes: "RolledBack 7, Succeeded 13",
        loss_identical: 20,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 23.0,
    },
    BaselineRow {
        kind: "resume-damage",
        runs: 20,
        outcomes: "RolledBack 2, Succeeded 18",
        loss_identical: 20,
        double_running: 0,
        corrupted_restores: 0,
        stuck: 0,
        runs_with_findings: 0,
        mean_wall_s: 19.6,
    },
];

/// Kubernetes without remediation: the node lifecycle controller marks a node NotReady after
/// `node-monitor-grace-period` (40 s) and evicts its pods after the default
/// `tolerationSeconds` of 300 s for `node.kubernetes.io/unreachable`: about 350 s until a
/// replacement is scheduled (issue 16).
pub const KUBERNETES_DOWNTIME: &str =
    "≈350 s (40 s node-monitor-grace-period + 300 s unreachable toleration, then scheduling)";
/// medik8s NodeHealthCheck + Self Node Remediation with their defaults (issue 16).
pub const NHC_SNR_DOWNTIME: &str = "≈5 min to detect + ≈180 s for the reboot (≈480 s)";

fn seconds_cell(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), |value| format!("{value:.2}"))
}

/// The downtime table (issue 16): per kind, from the fault until the training ran again
/// ([`super::downtime`]), median and maximum over the runs where it stopped and ran again,
/// next to Kubernetes' and medik8s' figures.
pub fn render_downtime(report: &SuiteReport) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "| fault kind | runs (fault fired) | stopped and ran again | not stopped | never ran again | median s | max s |"
    );
    let _ = writeln!(text, "|---|---:|---:|---:|---:|---:|---:|");
    for kind in FaultKind::ALL {
        let runs: Vec<&RunRecord> = report
            .runs
            .iter()
            .filter(|run| run.plan.kind == kind)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let summary = super::downtime::summarize(runs.iter().map(|run| &run.downtime));
        let (median, max) = if summary.resumed == 0 && summary.not_stopped > 0 {
            ("0 (not stopped)".to_string(), "0 (not stopped)".to_string())
        } else {
            (seconds_cell(summary.median_s), seconds_cell(summary.max_s))
        };
        let _ = writeln!(
            text,
            "| {kind} | {} ({}) | {} | {} | {} | {median} | {max} |",
            runs.len(),
            summary.fired,
            summary.resumed,
            summary.not_stopped,
            summary.never_resumed
        );
    }
    let _ = writeln!(
        text,
        "| *Kubernetes, node lifecycle eviction after a dead node* | – | – | – | – | {KUBERNETES_DOWNTIME} | |"
    );
    let _ = writeln!(
        text,
        "| *medik8s NodeHealthCheck + Self Node Remediation* | – | – | – | – | {NHC_SNR_DOWNTIME} | |"
    );
    text
}

/// Issue 16's acceptance lines, for the kinds of it that ran.
fn render_issue16(report: &SuiteReport, text: &mut String) {
    let kinds = [FaultKind::ApiCut, FaultKind::PeerCut, FaultKind::PowerOff];
    if !report.runs.iter().any(|run| kinds.contains(&run.plan.kind)) {
        return;
    }
    let _ = writeln!(
        text,
        "\n## Issue 16: a node cut off or powered off, default fencing (`self-fence`)\n"
    );
    let _ = writeln!(
        text,
        "The fault strikes the node the training runs on at a moment drawn from the seed: at a percent of training, while a periodic checkpoint is taken or replicated (a new entry seen in the home node's kubelet checkpoint directory or store, or in a standby node's staging or store), or in a phase of a live migration provoked by `KernelDeadlock` on the home node (the node struck is the migration's source). A cut lasts until the run ends. These kinds count toward the goals and are judged by the common rules, plus: `api-cut`: the training must run again on another node; `peer-cut`: any migration (other than the provoked live one) and any copy begun after the fault is a finding.\n"
    );
    for kind in kinds {
        let runs: Vec<&RunRecord> = report
            .runs
            .iter()
            .filter(|run| run.plan.kind == kind)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let fired = runs.iter().filter(|run| run.fault_fired).count();
        let double = runs.iter().filter(|run| run.double_running()).count();
        let clean = runs.iter().filter(|run| run.findings.is_empty()).count();
        let expected = match kind {
            FaultKind::ApiCut => {
                "its agent fences itself and the training resumes elsewhere, no human action"
            }
            FaultKind::PeerCut => "not fenced, nothing moved or stopped",
            _ => "the training resumes elsewhere",
        };
        let _ = writeln!(
            text,
            "- **{kind}** (expected: {expected}): {} runs, fault fired in {fired}; double running in {double}; without findings: {clean}",
            runs.len()
        );
    }
}

/// The comparison table: every kind of either suite, the old figures next to the new.
pub fn render_comparison(report: &SuiteReport) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "| fault kind | embedded: runs | embedded: outcomes | embedded: double / corrupted / stuck / findings | embedded: s/run | local cluster: runs | local cluster: outcomes | local cluster: double / corrupted / stuck / findings | local cluster: s/run |"
    );
    let _ = writeln!(text, "|---|---:|---|---|---:|---:|---|---|---:|");
    let mut kinds: Vec<String> = EMBEDDED_BASELINE
        .iter()
        .map(|row| row.kind.to_string())
        .collect();
    for row in &report.rows {
        if !kinds.contains(&row.kind) {
            kinds.push(row.kind.clone());
        }
    }
    for kind in kinds {
        let old = EMBEDDED_BASELINE.iter().find(|row| row.kind == kind);
        let new = report.rows.iter().find(|row| row.kind == kind);
        let old_cells = old.map_or_else(
            || "– | – | – | –".to_string(),
            |row| {
                format!(
                    "{} | {} | {} / {} / {} / {} | {:.1}",
                    row.runs,
                    row.outcomes,
                    row.double_running,
                    row.corrupted_restores,
                    row.stuck,
                    row.runs_with_findings,
                    row.mean_wall_s
                )
            },
        );
        let new_cells = new.map_or_else(
            || "– | not run here | – | –".to_string(),
            |row| {
                format!(
                    "{} | {} | {} / {} / {} / {} | {:.1}",
                    row.runs,
                    row.outcomes
                        .iter()
                        .map(|(outcome, count)| format!("{} {count}", cell(outcome)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    row.double_running,
                    row.corrupted_restores,
                    row.stuck,
                    row.runs_with_findings,
                    row.mean_wall_s
                )
            },
        );
        let _ = writeln!(text, "| {kind} | {old_cells} | {new_cells} |");
    }
    let old_runs: usize = EMBEDDED_BASELINE.iter().map(|row| row.runs).sum();
    let _ = writeln!(
        text,
        "| all counted | {old_runs} | – | 0 / 0 / 0 / 0 | – | {} | – | {} / {} / {} / {} | {:.1} |",
        report.total.runs,
        report.total.double_running,
        report.total.corrupted_restores,
        report.total.stuck,
        report.total.runs_with_findings,
        report.total.mean_wall_s
    );
    text
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The kinds × outcomes table of the counted kinds, with their total (also printed by the
/// command), then the known split brain's kinds under their own heading line.
pub fn render_table(report: &SuiteReport) -> String {
    let mut outcomes: Vec<String> = report
        .rows
        .iter()
        .flat_map(|row| row.outcomes.keys().cloned())
        .collect();
    outcomes.sort();
    outcomes.dedup();
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
    let counted = report.rows.iter().filter(|row| !is_split_brain(&row.kind));
    let split: Vec<&KindRow> = report
        .rows
        .iter()
        .filter(|row| is_split_brain(&row.kind))
        .collect();
    let split_heading = KindRow {
        kind: "**known split brain (issue 16), not counted:**".into(),
        ..KindRow::default()
    };
    let rows = counted
        .chain(std::iter::once(&report.total))
        .chain(split.first().map(|_| &split_heading))
        .chain(split.iter().copied());
    for row in rows {
        if row.runs == 0 && row.kind == split_heading.kind {
            let _ = writeln!(text, "| {} |", row.kind);
            continue;
        }
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
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# automigrate fault-injection report (local cluster)\n"
    );
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
        "Each run: a fresh local cluster of real components (`automigrate-apiserver` and two `automigrate-controller` replicas with leader election in a `control` network namespace; {} nodes, each a network namespace with an `automigrate-kubelet` running the node's `automigrate-agent` as its DaemonSet-style pod; emulated links of {} ms RTT per hop between nodes, 1 ms to the control plane). The protected pod, applied to node-a as a user would apply it: {} epochs of the deterministic numpy trainer (checkpoint interval annotation {}, policy `default` as below). One fault per run. Migrations are made by `automigrate-controller` and read back from the API server; copies are counted from `runc list` on every node every {} ms. Suite seed {}; {} runs; kinds: {}. Run deadline {} s; after training ends a run waits up to {} s for every migration to end. Uninterrupted reference (the same trainer as a host process): {:.2} s of training ({:.3} s/epoch), final loss `{}`.\n",
        settings.nodes,
        settings.rtt_step_ms,
        settings.trainer.epochs,
        settings.checkpoint_interval,
        report.runs.first().map_or(50, |run| run.copies.period_ms),
        settings.seed,
        report.runs.len(),
        settings
            .kinds
            .iter()
            .map(|kind| kind.name())
            .collect::<Vec<_>>()
            .join(", "),
        settings.run_deadline_s,
        settings.settle_s,
        report.reference.training_s,
        report.reference.epoch_s,
        report.reference.loss_hex
    );
    let _ = writeln!(
        text,
        "The dataset is put on node-a, and in runs where node-a is powered off or cut off also on every other node beforehand: the controller copies a dataset to the target only from a live source (Syncing), so a replacement elsewhere would find none (the replacement then dies and the controller starts migration after migration: seen in a trial run before this rule, 76 `Restarted` migrations in 4 minutes).\n"
    );
    let _ = writeln!(
        text,
        "The policy (deploy's `default` with the shortest failure triggers the policy floors allow and pod intervals down to 1 s):\n\n```yaml\n{}```\n",
        settings.policy
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
    let _ = writeln!(
        text,
        "Over every run of the counted kinds ({} runs; the known split brain below is not counted):\n",
        total.runs
    );
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
        if report.runs.len() >= 100 {
            "PASS"
        } else {
            "NOT MET"
        },
        report.runs.len()
    );
    let _ = writeln!(
        text,
        "\n## Known split brain: a node cut off from the API server but alive (issue 16)\n"
    );
    let split: Vec<&RunRecord> = report
        .runs
        .iter()
        .filter(|run| run.plan.kind.known_split_brain())
        .collect();
    if split.is_empty() {
        let _ = writeln!(text, "Not run in this suite (--kinds).");
    }
    for kind in [FaultKind::ApiCutTaint, FaultKind::ApiCutAdministrator] {
        let runs: Vec<&&RunRecord> = split.iter().filter(|run| run.plan.kind == kind).collect();
        if runs.is_empty() {
            continue;
        }
        let double = runs.iter().filter(|run| run.double_running()).count();
        let stuck = runs.iter().filter(|run| run.stuck()).count();
        let finished = runs.iter().filter(|run| run.training_finished).count();
        let _ = writeln!(
            text,
            "- **{kind}** (`--dead-node-fencing {}`): {} runs; a second copy ran in {double}; a migration left waiting (stuck) in {stuck}; training finished in {finished}. NOT PASSING: {}",
            kind.fencing().name(),
            runs.len(),
            match kind {
                FaultKind::ApiCutTaint =>
                    "the controller takes the expired Lease for a dead node, taints it out-of-service and starts a replacement while the original still trains on the cut-off node",
                _ =>
                    "the controller waits for a person to confirm the node is fenced; nothing moves and the training stays where it was until someone acts",
            }
        );
    }
    render_issue16(report, &mut text);
    let _ = writeln!(
        text,
        "\n## Downtime: from the fault until the training runs again\n\nFrom the moment the fault fired until the first progress line of a copy begun after it (on any node; a restored copy's first line comes one epoch after the restore). \"not stopped\": no copy began after the fault and the training finished. Median and maximum over the runs where the training stopped and ran again. Detection in this local cluster follows its policy (`leaseTimeout` {}) and the kubelets' 1 s Lease renewals.\n",
        report
            .settings
            .policy
            .lines()
            .find_map(|line| line.trim().strip_prefix("leaseTimeout: "))
            .unwrap_or("?")
    );
    text.push_str(&render_downtime(report));
    let _ = writeln!(
        text,
        "\n## Compared with the embedded controller's last report\n\nThe old figures are those of {EMBEDDED_BASELINE_SOURCE}. That controller ran in the harness's process (or as its own program for controller-kill), fenced a partitioned node by SIGKILLing its container out of band, and ran on a policy clock 30 times faster than real time; this suite runs the deployed controller and agents, in real time, with no out-of-band kill.\n"
    );
    text.push_str(&render_comparison(report));
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
                "  - Migration {} {} → {}: {} ({})",
                migration.name,
                migration.source,
                migration.target,
                migration.phase_name(),
                cell(migration.message.as_deref().unwrap_or("no reason"))
            );
        }
    }
    let _ = writeln!(text, "\n## Runs\n");
    let _ = writeln!(
        text,
        "| run | kind | trigger | at % | parameters | struck in phase | node | outcome | downtime | resumed after epoch | redone epochs / lost before the work cutoff (allowed) | loss identical | max copies (runc) | files verified (ckpt/dataset) | receiver refusals | cluster up s | s | load average at start | findings |"
    );
    let _ = writeln!(
        text,
        "|---|---|---|---:|---|---|---|---|---|---|---|---|---:|---|---:|---:|---:|---|---|"
    );
    for run in &report.runs {
        let _ = writeln!(
            text,
            "| {} | {} | {:?} | {} | `{}` | {} | {} | {} | {} | {:?} | {:?} / {:?} ({}) | {} | {} | {}/{} | {} | {:.1} | {:.1} | {} | {} |",
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
            run.downtime.describe(),
            run.resumed_from,
            run.redone_epochs,
            run.lost_epochs,
            run.redone_allowed,
            if run.loss_identical { "yes" } else { "NO" },
            run.copies.max_running,
            run.checkpoints_verified,
            run.datasets_verified,
            run.receiver_refusals,
            run.cluster_up_s,
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
        if let Some(moment) = &run.injection.moment {
            let _ = writeln!(
                text,
                "  - fired {}; downtime {}",
                cell(moment),
                run.downtime.describe()
            );
        }
        for note in &run.injection.notes {
            let _ = writeln!(text, "  - {}", cell(note));
        }
        for migration in shown(&run.migrations, &mut text) {
            let phases = migration
                .history
                .iter()
                .map(|step| format!("{} {:.2} s", step.phase, step.seconds))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                text,
                "  - Migration {} {} → {} ({}): {} — {} [phases: {}]",
                migration.name,
                migration.source,
                migration.target,
                migration.trigger,
                migration.phase_name(),
                cell(migration.message.as_deref().unwrap_or("no reason")),
                phases
            );
        }
        for event in &run.policy_events {
            let _ = writeln!(text, "  - policy Event {}", cell(event));
        }
    }
    text
}

/// `runs.csv`.
pub fn render_csv(report: &SuiteReport) -> String {
    let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    let mut text = String::from(
        "run,kind,seed,trigger,percent,params,fault_fired,phase_before,phase_after,node,outcome,resumed_from,redone_epochs,lost_epochs,redone_allowed,training_finished,loss_identical,max_running,progress_interleaved,checkpoints_verified,datasets_verified,verification_problems,receiver_refusals,deadline_hit,wall_s,load_average_start,moment,downtime_s,downtime,findings\n",
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
            quote(&format!("{:?}", run.lost_epochs)),
            run.redone_allowed.to_string(),
            run.training_finished.to_string(),
            run.loss_identical.to_string(),
            run.copies.max_running.to_string(),
            run.progress_interleaved.to_string(),
            run.checkpoints_verified.to_string(),
            run.datasets_verified.to_string(),
            run.verification_problems.len().to_string(),
            run.receiver_refusals.to_string(),
            run.deadline_hit.to_string(),
            format!("{:.2}", run.wall_s),
            quote(&run.load_average.0),
            quote(run.injection.moment.as_deref().unwrap_or("")),
            run.downtime
                .seconds()
                .map(|seconds| format!("{seconds:.3}"))
                .unwrap_or_default(),
            quote(&run.downtime.describe()),
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
