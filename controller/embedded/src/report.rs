//! The demo report: the figures of every run, the checks they must pass, and the seed paper's
//! Table III next to ours.
//!
//! Data model: [`DemoReport`] holds the settings, the machine, every [`RunResult`], one
//! [`ReportRow`] per scenario and failure point, and the [`Check`]s. It is written as
//! `report.json` (everything, raw runs included), `report.csv` (the rows), `report.md` (the
//! printed table, the checks and the notes) and two SVG plots (`training-time.svg`,
//! `downtime.svg`). The paper's figures are read from the same file the simulator quotes them
//! from (`simulations/scenarios/seed-paper-figures.yaml`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::demo_runs::{DemoSettings, Recovery, RunKind, RunResult};
use crate::svg::{BarChart, Series};

const PAPER_FIGURES: &str = include_str!("../../../simulations/scenarios/seed-paper-figures.yaml");

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the seed paper's figures: {0}")]
    PaperFigures(String),
    #[error("serialising the report: {0}")]
    Serialise(String),
}

/// One Table III range of the seed paper.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PaperRange {
    pub model: String,
    pub latency: String,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Deserialize)]
struct PaperFigures {
    source: String,
    table3: Vec<PaperRange>,
}

/// The paper's Table III and where it is quoted from.
pub fn paper_table3() -> Result<(String, Vec<PaperRange>), ReportError> {
    // Other keys (Fig. 5's findings) are not needed here and are ignored.
    let figures: PaperFigures = serde_saphyr::from_str(PAPER_FIGURES)
        .map_err(|error| ReportError::PaperFigures(error.to_string()))?;
    Ok((figures.source, figures.table3))
}

/// Where the demo ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub criu: String,
    pub runc: String,
    pub load_average_at_start: String,
}

impl Machine {
    pub fn probe() -> Self {
        let first_line = |program: &str, arg: &str| {
            std::process::Command::new(program)
                .arg(arg)
                .output()
                .ok()
                .and_then(|output| {
                    String::from_utf8_lossy(&output.stdout)
                        .lines()
                        .next()
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "unknown".into())
        };
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|text| text.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        };
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: read("/proc/sys/kernel/osrelease"),
            criu: first_line("criu", "--version").replace("Version: ", "CRIU "),
            runc: first_line("runc", "--version"),
            load_average_at_start: read("/proc/loadavg"),
        }
    }
}

/// One line of the table: a scenario at one failure point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportRow {
    pub scenario: String,
    pub point: String,
    /// RTT of the emulated link between the failed/left node and the target.
    pub link_rtt_ms: Option<u64>,
    pub target: Option<String>,
    /// Total training time with migration.
    pub mtt_s: Option<f64>,
    /// Total training time with a fresh restart (hard failure only).
    pub ntt_s: Option<f64>,
    /// The uninterrupted reference run's training time.
    pub reference_s: Option<f64>,
    pub mdt_s: Option<f64>,
    pub ndt_s: Option<f64>,
    pub detection_s: Option<f64>,
    pub resumed_from_epoch: Option<u32>,
    pub lost_epochs: Option<u32>,
    /// Bytes the migration moved when it happened.
    pub recovery_bytes: u64,
    /// Bytes of standby copies made during training.
    pub replication_bytes: u64,
    pub checkpoints: usize,
    pub mean_freeze_ms: Option<f64>,
    pub loss_reference: Option<String>,
    pub loss_migrated: Option<String>,
    pub loss_restarted: Option<String>,
    pub loss_identical: bool,
    /// (NTT − MTT) / MTT, the seed paper's Table III measure.
    pub restart_increase_percent: Option<f64>,
    /// (NTT − MTT) / NTT: the share of training time migration saved.
    pub saved_percent: Option<f64>,
    /// Epochs trained twice: reported before the failure and trained again by the replacement.
    pub redone_epochs_migrated: Option<u32>,
    pub redone_epochs_restarted: Option<u32>,
    /// Table III's measure with the background load taken out: both totals at the reference
    /// run's pace, `T + downtime + redone epochs × T / epochs`, from the measured T, MDT, NDT
    /// and redone epochs (the wall-clock MTT and NTT also carry whatever else the shared
    /// machine ran during each run).
    pub paced_increase_percent: Option<f64>,
    /// The paper's Table III ranges at the row's latency, per model.
    pub paper_range: Option<String>,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DemoReport {
    pub generated_at: String,
    pub command: String,
    pub machine: Machine,
    pub settings: DemoSettings,
    pub paper_source: String,
    pub paper_table3: Vec<PaperRange>,
    pub rows: Vec<ReportRow>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    pub runs: Vec<RunResult>,
}

impl DemoReport {
    pub fn all_checks_passed(&self) -> bool {
        self.checks.iter().all(|check| check.passed)
    }
}

fn paper_ranges_at(paper: &[PaperRange], rtt_ms: u64) -> Option<String> {
    let latency = format!("{rtt_ms}ms");
    let matching: Vec<String> = paper
        .iter()
        .filter(|range| range.latency == latency)
        .map(|range| format!("{} {:.1}–{:.1}", range.model, range.min, range.max))
        .collect();
    (!matching.is_empty()).then(|| matching.join(", "))
}

fn rtt_ms(settings: &DemoSettings, from: &str, to: &str) -> Option<u64> {
    let index = |name: &str| -> Option<usize> {
        let letter = name.strip_prefix("node-")?.bytes().next()?;
        Some(usize::from(letter.checked_sub(b'a')?))
    };
    Some(settings.rtt_step_ms * index(from)?.abs_diff(index(to)?) as u64)
}

fn percent(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator * 100.0)
}

fn check(checks: &mut Vec<Check>, name: impl Into<String>, passed: bool, detail: String) {
    checks.push(Check {
        name: name.into(),
        passed,
        detail,
    });
}

/// Builds rows and checks from the runs.
pub fn build_report(
    settings: &DemoSettings,
    runs: Vec<RunResult>,
    command: &str,
    machine: Machine,
) -> Result<DemoReport, ReportError> {
    let (paper_source, paper) = paper_table3()?;
    let reference = runs
        .iter()
        .find(|run| run.kind == RunKind::Reference)
        .cloned();
    let reference_loss = reference
        .as_ref()
        .and_then(|run| run.final_loss_hex.clone());
    let reference_s = reference.as_ref().and_then(|run| run.training_s);
    let mut rows = Vec::new();
    let mut checks = Vec::new();

    for run in &runs {
        let copies_ok = run.copies.samples > 0
            && run.copies.max_running <= 1
            && run.copies.overlaps.is_empty()
            && !run.progress_overlap;
        check(
            &mut checks,
            format!("{}: never two copies", run.name),
            copies_ok,
            format!(
                "{} samples every {} ms, at most {} running; progress spans overlap: {}",
                run.copies.samples,
                run.copies.period_ms,
                run.copies.max_running,
                run.progress_overlap
            ),
        );
        let identical = run.final_loss_hex.is_some() && run.final_loss_hex == reference_loss;
        check(
            &mut checks,
            format!("{}: final loss equals the uninterrupted run's", run.name),
            identical,
            format!(
                "{} vs reference {}",
                run.final_loss_hex.as_deref().unwrap_or("(none)"),
                reference_loss.as_deref().unwrap_or("(none)")
            ),
        );
        check(
            &mut checks,
            format!("{}: trained every epoch", run.name),
            run.final_epoch == Some(run.epochs),
            format!("last epoch {:?} of {}", run.final_epoch, run.epochs),
        );
        // A run whose pod keeps no standby copy has nothing to resume from: the controller
        // starts it fresh, and says so with `Restarted` (never `Succeeded`).
        let (expected, ended) = if matches!(
            run.kind,
            RunKind::HardFailure {
                recovery: Recovery::FreshRestart,
                ..
            }
        ) {
            (automigrate_core::migration::Phase::Restarted, "restarted")
        } else {
            (automigrate_core::migration::Phase::Succeeded, "succeeded")
        };
        for migration in &run.migrations {
            let verified = run.dataset_verified_on.contains(&migration.to);
            let moved_by = if run.dataset_provisioned_on.contains(&migration.to) {
                "put there by the harness before the run"
            } else {
                "moved there by the controller"
            };
            let phases: Vec<String> = migration
                .history
                .iter()
                .map(|span| format!("{} {:.2} s", span.phase, span.seconds))
                .collect();
            check(
                &mut checks,
                format!(
                    "{}: Migration {} ({} -> {}, {}) {ended} with the dataset verified on the target",
                    run.name, migration.name, migration.from, migration.to, migration.trigger
                ),
                migration.phase == expected && verified,
                format!(
                    "phase {} (as the API server has it; history: {}){}; dataset verified on {:?} ({moved_by})",
                    migration.phase,
                    phases.join(", "),
                    migration
                        .message
                        .as_deref()
                        .map(|message| format!("; message: {message}"))
                        .unwrap_or_default(),
                    run.dataset_verified_on
                ),
            );
        }
        if !matches!(run.kind, RunKind::Reference) && run.migrations.is_empty() {
            check(
                &mut checks,
                format!("{}: the controller made a Migration", run.name),
                false,
                "no Migration object in the pod's namespace".into(),
            );
        }
    }

    let mut percents: Vec<u32> = runs
        .iter()
        .filter_map(|run| match run.kind {
            RunKind::HardFailure { percent, .. } => Some(percent),
            _ => None,
        })
        .collect();
    percents.sort_unstable();
    percents.dedup();
    for point in percents {
        let find = |recovery: Recovery| {
            runs.iter().find(|run| {
                run.kind
                    == RunKind::HardFailure {
                        percent: point,
                        recovery,
                    }
            })
        };
        let (migrated, restarted) = (find(Recovery::Resume), find(Recovery::FreshRestart));
        if let Some(run) = migrated {
            let range = run.checkpoint_epochs;
            let resumed = run.resumed_from_epoch;
            let within = match (resumed, range) {
                (Some(resumed), Some((Some(low), Some(high)))) => resumed >= low && resumed <= high,
                _ => false,
            };
            check(
                &mut checks,
                format!("{}: resumed at the checkpointed epoch, not zero", run.name),
                resumed.is_some_and(|epoch| epoch > 0) && within && run.same_process == Some(true),
                format!(
                    "resumed after epoch {resumed:?}; the restored checkpoint was taken between epochs {range:?}; same process (run tag kept): {:?}",
                    run.same_process
                ),
            );
        }
        if let Some(run) = restarted {
            check(
                &mut checks,
                format!("{}: the fresh restart began at epoch 1", run.name),
                run.resumed_from_epoch == Some(0) && run.same_process == Some(false),
                format!(
                    "first epoch after the failure: {:?}",
                    run.resumed_from_epoch.map(|epoch| epoch + 1)
                ),
            );
        }
        let migration = migrated.and_then(|run| run.migrations.first());
        let link = migration.and_then(|m| rtt_ms(settings, &m.from, &m.to));
        let mtt = migrated.and_then(|run| run.training_s);
        let ntt = restarted.and_then(|run| run.training_s);
        let increase = match (mtt, ntt) {
            (Some(mtt), Some(ntt)) => percent(ntt - mtt, mtt),
            _ => None,
        };
        let saved = match (mtt, ntt) {
            (Some(mtt), Some(ntt)) => percent(ntt - mtt, ntt),
            _ => None,
        };
        let loss_migrated = migrated.and_then(|run| run.final_loss_hex.clone());
        let loss_restarted = restarted.and_then(|run| run.final_loss_hex.clone());
        let redone_migrated = migrated.and_then(|run| run.lost_epochs);
        let redone_restarted = restarted.and_then(|run| run.lost_epochs);
        let paced = match (
            reference_s,
            migrated.and_then(|run| run.downtime_s),
            restarted.and_then(|run| run.downtime_s),
            redone_migrated,
            redone_restarted,
        ) {
            (Some(t), Some(mdt), Some(ndt), Some(redo_m), Some(redo_r)) => {
                let epoch = t / f64::from(settings.trainer.epochs.max(1));
                let mtt = t + mdt + f64::from(redo_m) * epoch;
                let ntt = t + ndt + f64::from(redo_r) * epoch;
                percent(ntt - mtt, mtt)
            }
            _ => None,
        };
        rows.push(ReportRow {
            scenario: "hard failure".into(),
            point: format!("{point} %"),
            link_rtt_ms: link,
            target: migration.map(|m| m.to.clone()),
            mtt_s: mtt,
            ntt_s: ntt,
            reference_s,
            mdt_s: migrated.and_then(|run| run.downtime_s),
            ndt_s: restarted.and_then(|run| run.downtime_s),
            detection_s: migrated.and_then(|run| run.detection_s),
            resumed_from_epoch: migrated.and_then(|run| run.resumed_from_epoch),
            lost_epochs: migrated.and_then(|run| run.lost_epochs),
            recovery_bytes: migrated.map_or(0, |run| run.recovery_bytes),
            replication_bytes: migrated.map_or(0, |run| run.replication_bytes),
            checkpoints: migrated.map_or(0, |run| run.checkpoints),
            mean_freeze_ms: migrated.and_then(|run| run.mean_freeze_ms),
            loss_identical: loss_migrated.is_some()
                && loss_migrated == reference_loss
                && loss_restarted == reference_loss,
            loss_reference: reference_loss.clone(),
            loss_migrated,
            loss_restarted,
            restart_increase_percent: increase,
            saved_percent: saved,
            redone_epochs_migrated: redone_migrated,
            redone_epochs_restarted: redone_restarted,
            paced_increase_percent: paced,
            paper_range: link.and_then(|rtt| paper_ranges_at(&paper, rtt)),
            note: migration
                .map(|m| m.reason.clone())
                .unwrap_or_else(|| "no migration happened".into()),
        });
    }

    for run in runs
        .iter()
        .filter(|run| matches!(run.kind, RunKind::Degradation { .. }))
    {
        let migration = run.migrations.first();
        // The replacement resumes from the final dump: nothing the source had computed when
        // the dump began is lost. Epochs the source computes after it (the kubelet checkpoint
        // API leaves the container running until it is fenced, as CRI-O does) are computed
        // again by the replacement: reported, they are not progress the dump held.
        let resumed_at_dump = match (run.resumed_from_epoch, run.epoch_at_final_dump) {
            (Some(resumed), Some(at_dump)) => resumed >= at_dump,
            _ => false,
        };
        check(
            &mut checks,
            format!(
                "{}: proactive migration lost no epoch (resumed from the final dump)",
                run.name
            ),
            migration.is_some() && resumed_at_dump && run.same_process == Some(true),
            format!(
                "the source had reported epoch {:?} when the final dump began and epoch {:?} \
                 when it was fenced; the replacement resumed after epoch {:?}, so {} epoch(s) \
                 the source computed after the dump were computed again; same process: {:?}",
                run.epoch_at_final_dump,
                run.lost_epochs
                    .zip(run.resumed_from_epoch)
                    .map(|(lost, resumed)| lost + resumed),
                run.resumed_from_epoch,
                run.lost_epochs.unwrap_or(0),
                run.same_process
            ),
        );
        let point = match run.kind {
            RunKind::Degradation { percent } => format!("{percent} %"),
            _ => String::new(),
        };
        rows.push(row_for_live(
            settings,
            run,
            "degradation",
            point,
            reference.as_ref(),
        ));
    }

    for run in runs.iter().filter(|run| run.kind == RunKind::Mobility) {
        let mobility: Vec<_> = run
            .migrations
            .iter()
            .filter(|migration| migration.trigger == "Mobility")
            .collect();
        let ping_pong = run
            .migrations
            .windows(2)
            .any(|pair| pair[1].to == pair[0].from);
        check(
            &mut checks,
            format!("{}: followed the user once, no ping-pong", run.name),
            mobility.len() == 1 && !ping_pong,
            format!(
                "{} mobility migration(s), path {}",
                mobility.len(),
                run.path.join(" -> ")
            ),
        );
        rows.push(row_for_live(
            settings,
            run,
            "user mobility",
            format!("{} move(s)", run.migrations.len()),
            reference.as_ref(),
        ));
    }

    let notes = vec![
        "Every migration here was decided and driven by automigrate-controller (2 replicas, leader \
         election) against the local cluster's API server, with automigrate-agent pods and \
         automigrate-kubelets on the nodes; the harness only powered node-a off, set a node \
         condition or wrote the user's latency on the pod. Each Migration is named as the API \
         server has it, with the phases and timings the controller wrote in status.history."
            .into(),
        format!(
            "The controller runs in real time. The pods name the demo policies `{}` and `{}` \
             from {} (shorter checkpoint floor, lease timeout and dwell than the shipped ones, \
             see that file's header) and ask for a checkpoint every {}.",
            settings.failure_policy,
            settings.mobility_policy,
            settings.policies_file.display(),
            settings.checkpoint_interval
        ),
        "MTT/NTT: the pod applied to the last epoch's line. MDT/NDT: the failure (or, for a live \
         source, the start of the final dump: the Checkpointing phase) until the end of the \
         Restoring phase the controller recorded. Detection: the failure or event until the \
         Migration's startedAt."
            .into(),
        "A hard failure strikes once node-a has reported the failure point's epoch and a \
         checkpoint taken after epoch 1 is on a standby node (on node-a for the restart run); the \
         epoch it struck at is in report.json (epochAtEvent). The restart run's pod sets \
         automigrate.dev/replicate-to: \"0\", so no checkpoint survives node-a and the controller \
         starts the replacement from the beginning (NTT)."
            .into(),
        "The controller moves a dataset only from a live source; for a dead node it leaves the \
         dataset to the workload. So the hard-failure runs start with the dataset on every node \
         (as a replicated or shared read-only dataset would be), and their dataset check verifies \
         the target's copy against its manifest; in the degradation and mobility runs the dataset \
         starts on node-a only and the controller moves it."
            .into(),
        "The kubelet checkpoint API leaves the container running after the final dump (as CRI-O \
         does), so a live source trains on until it is fenced and the replacement, restored \
         from the dump, computes those epochs again: they are the redone epochs of the \
         degradation and mobility rows."
            .into(),
        "The restored checkpoint's epochs: the last epoch node-a had reported before the dump \
         began (its recorded time minus its freeze time, minus 0.5 s of slack) and 0.5 s after \
         it was recorded."
            .into(),
        "Never two copies: every node's runc state (`runc list`) sampled every 20 ms, not the \
         controller's view."
            .into(),
        "Wall-clock times on this machine move with its other work (the load average at the start \
         and end of every run is in report.json, loadAverage): the restart +% at the reference \
         pace puts both totals at the uninterrupted run's pace — T + downtime + redone epochs × \
         T/epochs — from measured T, MDT, NDT and redone epochs."
            .into(),
        "The seed paper's workloads trained for minutes to hours on AWS; ours trains for seconds on \
         a 2-core machine shared with other work, so absolute times differ and only the shape is \
         comparable."
            .into(),
    ];

    Ok(DemoReport {
        generated_at: jiff::Timestamp::now().to_string(),
        command: command.to_string(),
        machine,
        settings: settings.clone(),
        paper_source,
        paper_table3: paper,
        rows,
        checks,
        notes,
        runs,
    })
}

fn row_for_live(
    settings: &DemoSettings,
    run: &RunResult,
    scenario: &str,
    point: String,
    reference: Option<&RunResult>,
) -> ReportRow {
    let migration = run.migrations.first();
    let link = migration.and_then(|m| rtt_ms(settings, &m.from, &m.to));
    let reference_loss = reference.and_then(|run| run.final_loss_hex.clone());
    ReportRow {
        scenario: scenario.into(),
        point,
        link_rtt_ms: link,
        target: migration.map(|m| m.to.clone()),
        mtt_s: run.training_s,
        ntt_s: None,
        reference_s: reference.and_then(|run| run.training_s),
        mdt_s: run.downtime_s,
        ndt_s: None,
        detection_s: run.detection_s,
        resumed_from_epoch: run.resumed_from_epoch,
        lost_epochs: run.lost_epochs,
        recovery_bytes: run.recovery_bytes,
        replication_bytes: run.replication_bytes,
        checkpoints: run.checkpoints,
        mean_freeze_ms: run.mean_freeze_ms,
        loss_identical: run.final_loss_hex.is_some() && run.final_loss_hex == reference_loss,
        loss_reference: reference_loss,
        loss_migrated: run.final_loss_hex.clone(),
        loss_restarted: None,
        restart_increase_percent: None,
        saved_percent: None,
        redone_epochs_migrated: run.lost_epochs,
        redone_epochs_restarted: None,
        paced_increase_percent: None,
        // Table III compares restarting with migrating after a failure; a live move has no
        // restart to compare with.
        paper_range: None,
        note: migration
            .map(|m| m.reason.clone())
            .unwrap_or_else(|| "no migration happened".into()),
    }
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "–".into(), |value| format!("{value:.2}"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// The table printed at the end of the demo.
pub fn render_table(report: &DemoReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | point | link | MTT s | NTT s | ref s | MDT s | NDT s | detect s | resumed after epoch | redone epochs (migrate / restart) | moved MiB (standby MiB) | final loss identical | restart +% (wall clock) | saved % (wall clock) | restart +% (at reference pace) | paper Table III at this latency (+%) |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} |",
            row.scenario,
            row.point,
            match (&row.target, row.link_rtt_ms) {
                (Some(target), Some(rtt)) => format!("→{target} {rtt} ms"),
                _ => "–".into(),
            },
            seconds(row.mtt_s),
            seconds(row.ntt_s),
            seconds(row.reference_s),
            seconds(row.mdt_s),
            seconds(row.ndt_s),
            seconds(row.detection_s),
            row.resumed_from_epoch
                .map_or_else(|| "–".into(), |epoch| epoch.to_string()),
            match (row.redone_epochs_migrated, row.redone_epochs_restarted) {
                (Some(migrated), Some(restarted)) => format!("{migrated} / {restarted}"),
                (Some(migrated), None) => migrated.to_string(),
                _ => "–".into(),
            },
            mib(row.recovery_bytes),
            mib(row.replication_bytes),
            if row.loss_identical { "yes" } else { "NO" },
            row.restart_increase_percent
                .map_or_else(|| "–".into(), |value| format!("{value:.1}")),
            row.saved_percent
                .map_or_else(|| "–".into(), |value| format!("{value:.1}")),
            row.paced_increase_percent
                .map_or_else(|| "–".into(), |value| format!("{value:.1}")),
            row.paper_range.as_deref().unwrap_or("–"),
        );
    }
    out
}

fn markdown(report: &DemoReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# automigrate demo report\n");
    let _ = writeln!(
        out,
        "Generated {} by `{}` on {} CPUs, kernel {}, {}, {} (load average at start: {}).\n",
        report.generated_at,
        report.command,
        report.machine.cpus,
        report.machine.kernel,
        report.machine.criu,
        report.machine.runc,
        report.machine.load_average_at_start
    );
    let settings = &report.settings;
    let _ = writeln!(
        out,
        "Workload: {} epochs of a {}-unit tanh network on {} ({} files × {} rows × {} features), \
         run as a Pod on a local cluster of real components; {} nodes on a line, {} ms RTT per hop; policies `{}` (failure, \
         degradation) and `{}` (mobility) from `{}`.\n",
        settings.trainer.epochs,
        settings.trainer.hidden,
        settings.dataset.name,
        settings.dataset.files,
        settings.dataset.rows_per_file,
        settings.dataset.features,
        settings.nodes,
        settings.rtt_step_ms,
        settings.failure_policy,
        settings.mobility_policy,
        settings.policies_file.display()
    );
    out.push_str(&render_table(report));
    let _ = writeln!(out, "\n## Runs\n");
    let _ = writeln!(
        out,
        "| run | trained s | epochs | pod's path | failure/event at epoch | checkpoints (mean freeze ms) | load average at start → end |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for run in &report.runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} ({}) | {} → {} |",
            run.name,
            seconds(run.training_s),
            run.final_epoch
                .map_or_else(|| "–".into(), |epoch| epoch.to_string()),
            if run.path.is_empty() {
                "node-a".to_string()
            } else {
                run.path.join(" → ")
            },
            run.epoch_at_event
                .map_or_else(|| "–".into(), |epoch| epoch.to_string()),
            run.checkpoints,
            run.mean_freeze_ms
                .map_or_else(|| "–".into(), |ms| format!("{ms:.0}")),
            run.load_average.0,
            run.load_average.1
        );
    }
    let _ = writeln!(out, "\n## Migrations, as the API server has them\n");
    let _ = writeln!(
        out,
        "Every Migration object of every run, read back with `kubectl get migrations -o json` \
         when the run ended: the phase and the history the controller wrote in its status.\n"
    );
    let _ = writeln!(
        out,
        "| run | Migration | trigger | from → to | phase | phases (s) | moved MiB | restored from | reason |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for run in &report.runs {
        for migration in &run.migrations {
            let phases: Vec<String> = migration
                .history
                .iter()
                .map(|span| format!("{} {:.2}", span.phase, span.seconds))
                .collect();
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} → {} | {} | {} | {} | {} | {} |",
                run.name,
                migration.name,
                migration.trigger,
                migration.from,
                migration.to,
                migration.phase,
                phases.join(", "),
                mib(migration.bytes_moved),
                migration
                    .checkpoint
                    .as_deref()
                    .unwrap_or("nothing (started fresh)"),
                migration.reason.replace('|', "/")
            );
        }
    }
    let _ = writeln!(out, "\n## Checks\n");
    for check in &report.checks {
        let _ = writeln!(
            out,
            "- {} {}: {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    let _ = writeln!(out, "\n## The seed paper's Table III\n");
    let _ = writeln!(out, "Source: {}.\n", report.paper_source);
    let _ = writeln!(
        out,
        "| model | latency | % increase of a fresh restart (min–max) |"
    );
    let _ = writeln!(out, "|---|---|---|");
    for range in &report.paper_table3 {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2}–{:.2} |",
            range.model, range.latency, range.min, range.max
        );
    }
    let _ = writeln!(out, "\n## Notes\n");
    for note in &report.notes {
        let _ = writeln!(out, "- {note}");
    }
    let _ = writeln!(
        out,
        "\nRaw figures of every run (every node's progress, the checkpoints the controller \
         recorded, every Migration with its phases) are in `report.json`."
    );
    out
}

fn csv(report: &DemoReport) -> String {
    let mut out = String::from(
        "scenario,point,target,link_rtt_ms,mtt_s,ntt_s,reference_s,mdt_s,ndt_s,detection_s,resumed_from_epoch,lost_epochs,recovery_bytes,replication_bytes,checkpoints,mean_freeze_ms,loss_reference,loss_migrated,loss_restarted,loss_identical,restart_increase_percent,saved_percent,redone_epochs_migrated,redone_epochs_restarted,paced_increase_percent,paper_range\n",
    );
    let number = |value: Option<f64>| value.map_or(String::new(), |value| format!("{value:.4}"));
    let whole = |value: Option<u32>| value.map_or(String::new(), |value| value.to_string());
    let quoted = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    for row in &report.rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            quoted(&row.scenario),
            quoted(&row.point),
            row.target.as_deref().unwrap_or(""),
            row.link_rtt_ms.map_or(String::new(), |rtt| rtt.to_string()),
            number(row.mtt_s),
            number(row.ntt_s),
            number(row.reference_s),
            number(row.mdt_s),
            number(row.ndt_s),
            number(row.detection_s),
            whole(row.resumed_from_epoch),
            whole(row.lost_epochs),
            row.recovery_bytes,
            row.replication_bytes,
            row.checkpoints,
            number(row.mean_freeze_ms),
            row.loss_reference.as_deref().unwrap_or(""),
            row.loss_migrated.as_deref().unwrap_or(""),
            row.loss_restarted.as_deref().unwrap_or(""),
            row.loss_identical,
            number(row.restart_increase_percent),
            number(row.saved_percent),
            whole(row.redone_epochs_migrated),
            whole(row.redone_epochs_restarted),
            number(row.paced_increase_percent),
            quoted(row.paper_range.as_deref().unwrap_or("")),
        );
    }
    out
}

fn charts(report: &DemoReport) -> (BarChart, BarChart) {
    let groups: Vec<String> = report
        .rows
        .iter()
        .map(|row| format!("{} {}", row.scenario, row.point))
        .collect();
    let column = |pick: fn(&crate::report::ReportRow) -> Option<f64>| -> Vec<Option<f64>> {
        report.rows.iter().map(pick).collect()
    };
    let time = BarChart {
        title: "Total training time: migration (MTT) vs fresh restart (NTT)".into(),
        y_label: "seconds".into(),
        groups: groups.clone(),
        series: vec![
            Series {
                name: "MTT (migrate)".into(),
                values: column(|row| row.mtt_s),
            },
            Series {
                name: "NTT (restart)".into(),
                values: column(|row| row.ntt_s),
            },
            Series {
                name: "uninterrupted".into(),
                values: column(|row| row.reference_s),
            },
        ],
    };
    let downtime = BarChart {
        title: "Downtime: migration (MDT) vs fresh restart (NDT)".into(),
        y_label: "seconds".into(),
        groups,
        series: vec![
            Series {
                name: "MDT (migrate)".into(),
                values: column(|row| row.mdt_s),
            },
            Series {
                name: "NDT (restart)".into(),
                values: column(|row| row.ndt_s),
            },
        ],
    };
    (time, downtime)
}

/// Writes `report.json`, `report.csv`, `report.md`, `training-time.svg` and `downtime.svg`.
pub fn write_report(dir: &Path, report: &DemoReport) -> Result<Vec<PathBuf>, ReportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let json = serde_json::to_string_pretty(report)
        .map_err(|error| ReportError::Serialise(error.to_string()))?;
    let (time, downtime) = charts(report);
    let files = [
        ("report.json", json + "\n"),
        ("report.csv", csv(report)),
        ("report.md", markdown(report)),
        ("training-time.svg", time.to_svg()),
        ("downtime.svg", downtime.to_svg()),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_figures_parse() {
        let (source, table) = paper_table3().unwrap();
        assert!(source.contains("HPCC 2021"));
        assert_eq!(table.len(), 12);
        let rnn = table
            .iter()
            .find(|range| range.model == "RNN" && range.latency == "10ms")
            .unwrap();
        assert_eq!((rnn.min, rnn.max), (41.06, 73.38));
        assert_eq!(
            paper_ranges_at(&table, 10).unwrap(),
            "RNN 41.1–73.4, CNN1 25.1–64.8, CNN2 34.3–67.8, LSTM 31.5–62.9"
        );
        assert_eq!(paper_ranges_at(&table, 40), None);
    }
}
