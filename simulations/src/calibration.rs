//! The cost model against the project's own measurements.
//!
//! `scenarios/measured.yaml` holds the measurements the cost model's constants were fitted on
//! (and one it was not), each with its source. [`section`] writes the report's section 5: every
//! constant of `scale-1000.yaml`'s `criu`, `transfer` and `settings` beside the figure it came
//! from, the model's timing of the same operations ([`crate::sim::costs`], the functions the
//! simulator itself calls), and one modelled migration beside the measured one. [`moved`]
//! writes section 6: every figure of the results that moved when the model was calibrated,
//! against the results kept in `scenarios/uncalibrated/` (those of the model before).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use automigrate_core::transfer::{FileSpec, TransferSettings};
use automigrate_core::units::{self, BitRate, Bytes};
use serde::Deserialize;

use crate::network::{Link, RoundSettings};
use crate::scenario::{ClusterScenario, ScenarioError, TransferCost, parse, read};
use crate::sim::costs::{engine_transfer, live_migration};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FreezeBench {
    pub source: String,
    pub image: Bytes,
    pub periodic_freezes_ms: Vec<u64>,
    #[serde(with = "units::duration")]
    pub final_dump: Duration,
    #[serde(with = "units::duration")]
    pub restore: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandMeasurement {
    pub source: String,
    pub image: Bytes,
    #[serde(with = "units::duration")]
    pub dump: Duration,
    #[serde(with = "units::duration")]
    pub restore: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DemoMigration {
    pub source: String,
    pub image: Bytes,
    #[serde(with = "units::duration")]
    pub mean_periodic_freeze: Duration,
    #[serde(with = "units::duration")]
    pub rtt: Duration,
    pub capacity: BitRate,
    #[serde(with = "units::duration")]
    pub checkpointing: Duration,
    #[serde(with = "units::duration")]
    pub transferring: Duration,
    #[serde(with = "units::duration")]
    pub fencing: Duration,
    #[serde(with = "units::duration")]
    pub restoring: Duration,
    #[serde(with = "units::duration")]
    pub verifying: Duration,
    #[serde(with = "units::duration")]
    pub downtime: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalCluster {
    pub source: String,
    #[serde(with = "units::duration")]
    pub fencing: Duration,
    #[serde(with = "units::duration")]
    pub restoring: Duration,
    #[serde(with = "units::duration")]
    pub verifying: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransferCell {
    pub what: String,
    #[serde(with = "units::duration")]
    pub rtt: Duration,
    pub loss: f64,
    pub files: u64,
    pub bytes: Bytes,
    #[serde(with = "units::duration")]
    pub measured: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransferBench {
    pub source: String,
    pub chunk_size: Bytes,
    pub max_streams: u32,
    pub capacity: BitRate,
    pub cells: Vec<TransferCell>,
}

/// The project's measurements (`scenarios/measured.yaml`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Measured {
    pub freeze_bench: FreezeBench,
    pub hand_measurement: HandMeasurement,
    pub demo: DemoMigration,
    pub local_cluster: LocalCluster,
    pub transfers: TransferBench,
}

impl Measured {
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = read(path)?;
        parse(path, &text)
    }
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn ms_f(millis: u64) -> f64 {
    millis as f64 / 1000.0
}

fn median_ms(values: &[u64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2] as f64 / 1000.0,
        n => (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2000.0,
    }
}

/// One row of "measured against modelled".
fn row(out: &mut String, what: &str, measured: f64, modelled: f64, note: &str) {
    let ratio = if measured > 0.0 {
        format!("{:.2}", modelled / measured)
    } else {
        "–".to_string()
    };
    let _ = writeln!(
        out,
        "| {what} | {measured:.3} | {modelled:.3} | {ratio} | {note} |"
    );
}

/// Section 5 of the report: the cost model against the measurements.
pub fn section(measured: &Measured, scale: &ClusterScenario) -> String {
    let mut out = String::new();
    let criu = &scale.criu;
    let bench = &measured.freeze_bench;
    let demo = &measured.demo;
    let hand = &measured.hand_measurement;
    let _ = writeln!(
        out,
        "## 5. Calibration: the cost model against the project's measurements\n"
    );
    let _ = writeln!(
        out,
        "The cost model's constants (`scenarios/{}.yaml`: `criu`, `transfer`, `settings`; each cites its figure there) are fitted on the project's own measurements, transcribed with their sources in `scenarios/measured.yaml`. Below, each measurement beside the model's timing of the same thing, computed by the functions the simulator itself calls (`sim::costs`). Two-point fits match their two points by construction; the rows marked *not fitted* are out-of-sample checks.\n",
        scale.name
    );
    let _ = writeln!(out, "### CRIU: freeze, seal, restore\n");
    let _ = writeln!(
        out,
        "| what | measured (s) | model (s) | model / measured | source |\n|---|---|---|---|---|"
    );
    let big = bench.image.0;
    row(
        &mut out,
        &format!("periodic freeze, {}", bench.image),
        median_ms(&bench.periodic_freezes_ms),
        secs(criu.dump_time(big)),
        "freeze bench, median of the six steady-state freezes (fitted)",
    );
    row(
        &mut out,
        &format!("periodic freeze, {} B (demo)", demo.image.0),
        secs(demo.mean_periodic_freeze),
        secs(criu.dump_time(demo.image.0)),
        "demo, mean of 47 periodic freezes (fitted)",
    );
    row(
        &mut out,
        &format!("final stop-and-dump and seal, {}", bench.image),
        secs(bench.final_dump),
        secs(criu.final_dump_time(big)),
        "freeze bench, final dump wall time (fitted)",
    );
    row(
        &mut out,
        &format!("restore, {}", bench.image),
        secs(bench.restore),
        secs(criu.restore_time(big)),
        "freeze bench, `runc restore` (fitted)",
    );
    row(
        &mut out,
        &format!("dump, {} (by hand)", hand.image),
        secs(hand.dump),
        secs(criu.final_dump_time(hand.image.0)),
        "hand measurement, as a final dump with sealing (*not fitted*)",
    );
    row(
        &mut out,
        &format!("restore, {} (by hand)", hand.image),
        secs(hand.restore),
        secs(criu.restore_time(hand.image.0)),
        "hand measurement (*not fitted*)",
    );
    let _ = writeln!(
        out,
        "\nSources: freeze bench = {}; demo = {}; by hand = {}.\n",
        bench.source, demo.source, hand.source
    );

    // Transfers.
    let transfers = &measured.transfers;
    let settings = TransferSettings {
        chunk_size: transfers.chunk_size.0,
        max_streams: transfers.max_streams,
        ..TransferSettings::default()
    };
    let rounds = RoundSettings {
        round: scale.settings.transfer_round,
    };
    let _ = writeln!(out, "### The transfer engine\n");
    let _ = writeln!(
        out,
        "Each cell is the benchmark's link ({} cap) and data set, planned by the engine with the benchmark's settings ({} chunks, at most {} streams) and run by the link model: with the fitted `transfer` costs (payload share {:.3}, {} + {:.1} RTTs per transfer, {} per file), and without them (the model before).\n",
        transfers.capacity,
        transfers.chunk_size,
        transfers.max_streams,
        scale.transfer.payload_share,
        units::format_duration(scale.transfer.setup),
        scale.transfer.setup_rtts,
        units::format_duration(scale.transfer.per_file),
    );
    let _ = writeln!(
        out,
        "| cell | measured (s) | model (s) | model / measured | model before (s) |\n|---|---|---|---|---|"
    );
    for cell in &transfers.cells {
        let files = split_files(cell.bytes.0, cell.files);
        let link = Link {
            rtt: cell.rtt,
            capacity_bps: transfers.capacity.0 as f64,
            loss: cell.loss,
        };
        let model = engine_transfer(&files, &link, &settings, rounds, &scale.transfer);
        let before = engine_transfer(&files, &link, &settings, rounds, &TransferCost::default());
        row(
            &mut out,
            &cell.what,
            secs(cell.measured),
            ms_f(model),
            &format!("{:.3}", ms_f(before)),
        );
    }
    let _ = writeln!(out, "\nSource: {}.\n", transfers.source);

    // One migration, modelled and measured.
    let link = Link {
        rtt: demo.rtt,
        capacity_bps: demo.capacity.0 as f64,
        loss: 0.0,
    };
    let modelled = live_migration(scale, &TransferSettings::default(), demo.image.0, &link);
    let local = &measured.local_cluster;
    let _ = writeln!(out, "### One migration, modelled and measured\n");
    let _ = writeln!(
        out,
        "The demo's proactive migration (run `degradation-50`: a live source on a degrading node, a full final dump of {} bytes, sent over an emulated {} RTT link) beside the simulator's timing of the same migration: the phases `sim::costs::live_migration` gives, which are the durations the simulator's migration steps take. The local cluster's phases (real controller, agents and kubelets) are shown where the model follows them instead of the demo.\n",
        demo.image.0,
        units::format_duration(demo.rtt)
    );
    let _ = writeln!(
        out,
        "| phase | demo (s) | local cluster (s) | model (s) | what the model charges |\n|---|---|---|---|---|"
    );
    let phases: [(&str, Duration, Option<Duration>, u64, &str); 5] = [
        (
            "Checkpointing",
            demo.checkpointing,
            None,
            modelled.checkpointing,
            "freeze + seal of the image",
        ),
        (
            "Transferring",
            demo.transferring,
            None,
            modelled.transferring,
            "the engine's plan on the link, plus the fitted transfer costs",
        ),
        (
            "Fencing",
            demo.fencing,
            Some(local.fencing),
            modelled.fencing,
            "`stopSource`: a pod's graceful deletion through its kubelet (the demo stops runc directly)",
        ),
        (
            "Restoring",
            demo.restoring,
            Some(local.restoring),
            modelled.restoring,
            "container start + image at the restore rate",
        ),
        (
            "Verifying",
            demo.verifying,
            Some(local.verifying),
            modelled.verifying,
            "`verify` (the workload runs again during it)",
        ),
    ];
    for (phase, demo_time, local_time, model, charge) in phases {
        let _ = writeln!(
            out,
            "| {phase} | {:.3} | {} | {:.3} | {charge} |",
            secs(demo_time),
            local_time.map_or("–".to_string(), |t| format!("{:.3}", secs(t))),
            ms_f(model)
        );
    }
    let _ = writeln!(
        out,
        "| **downtime** (final dump to restored) | **{:.3}** | – | **{:.3}** | Checkpointing + Transferring + Fencing + Restoring |",
        secs(demo.downtime),
        ms_f(modelled.downtime())
    );
    let _ = writeln!(
        out,
        "\nThe modelled downtime is longer than the demo's almost entirely because of Fencing: the simulator models a Kubernetes cluster, where stopping the source is a pod deletion through its kubelet ({} in the local cluster), not the demo's direct `runc kill` ({} ms). With the demo's fencing the model gives {:.3} s against the measured {:.3} s. Sources: demo = {}; local cluster = {}.\n",
        units::format_duration(local.fencing),
        demo.fencing.as_millis(),
        ms_f(modelled.downtime() - modelled.fencing) + secs(demo.fencing),
        secs(demo.downtime),
        demo.source,
        local.source
    );
    out
}

/// `count` files sharing `bytes` evenly (the benchmark's data sets are uniform).
fn split_files(bytes: u64, count: u64) -> Vec<FileSpec> {
    let count = count.max(1);
    (0..count)
        .map(|index| FileSpec {
            path: format!("file-{index:04}"),
            size: bytes / count + u64::from(index < bytes % count),
        })
        .collect()
}

/// Splits one CSV line, honouring double quotes (as `report::csv_line` writes them).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// A results CSV as rows of named fields.
pub fn read_csv(path: &Path) -> Result<Vec<Vec<(String, String)>>, ScenarioError> {
    let text = read(path)?;
    let mut lines = text.lines();
    let header = lines.next().map(csv_fields).unwrap_or_default();
    Ok(lines
        .filter(|line| !line.trim().is_empty())
        .map(|line| header.iter().cloned().zip(csv_fields(line)).collect())
        .collect())
}

fn field<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    row.iter()
        .find(|(key, _)| key == name)
        .map_or("", |(_, value)| value.as_str())
}

/// The heading and the sentence that says what "before" is, for [`moved`].
#[derive(Debug, Clone, Copy)]
pub struct MovedSection<'a> {
    pub heading: &'a str,
    pub before: &'a str,
}

/// Section 6 (and 7): every figure that moved between earlier results (`before_*`) and these
/// (`after_*`, the same CSVs this run writes), with the reasons.
#[allow(clippy::too_many_arguments)]
pub fn moved(
    section: MovedSection<'_>,
    before_policies: &[Vec<(String, String)>],
    after_policies: &[Vec<(String, String)>],
    before_table3: &[Vec<(String, String)>],
    after_table3: &[Vec<(String, String)>],
    before_fig5: &[Vec<(String, String)>],
    after_fig5: &[Vec<(String, String)>],
    reasons: &[(&str, String)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## {}\n", section.heading);
    let _ = writeln!(
        out,
        "Before = {}; after = this run. Only figures that changed are listed; wall times are left out (they measure the machine, not the model).\n",
        section.before
    );
    let columns = [
        ("lost_node_hours", "lost node-h"),
        ("redone_node_hours", "re-done node-h"),
        ("downtime_node_hours", "downtime node-h"),
        ("checkpoint_node_hours", "freeze node-h"),
        ("jct_mean_hours", "JCT mean h"),
        ("jct_p95_hours", "JCT p95 h"),
        ("makespan_hours", "makespan h"),
        ("bytes_moved_gb", "moved GB"),
        ("checkpoint_copy_gb", "checkpoint copies GB"),
        ("recovery_gb", "recovery GB"),
        ("migrations", "migrations"),
        ("proactive_migrations", "proactive"),
        ("mobility_migrations", "mobility"),
        ("failed_migrations", "failed migrations"),
        ("restarts", "restarts"),
        ("checkpoints", "checkpoints"),
        ("node_failures", "node failures"),
        ("failures_hitting_jobs", "failures hitting a job"),
        ("jobs_finished", "jobs finished"),
        ("decide_calls", "decide calls"),
        ("full_passes", "full passes"),
        ("compact_passes", "compact passes"),
    ];
    let _ = writeln!(out, "### Policies (section 3)\n");
    let _ = writeln!(
        out,
        "| policy | figure | before | after | change |\n|---|---|---|---|---|"
    );
    for after in after_policies {
        let policy = field(after, "policy");
        let Some(before) = before_policies
            .iter()
            .find(|row| field(row, "policy") == policy)
        else {
            let _ = writeln!(out, "| {policy} | (new policy) | – | – | – |");
            continue;
        };
        for (column, label) in columns {
            let (old, new) = (field(before, column), field(after, column));
            if old == new {
                continue;
            }
            let change = match (old.parse::<f64>(), new.parse::<f64>()) {
                (Ok(old), Ok(new)) if old != 0.0 => {
                    format!("{:+.1} %", (new - old) / old.abs() * 100.0)
                }
                _ => "–".to_string(),
            };
            let _ = writeln!(out, "| {policy} | {label} | {old} | {new} | {change} |");
        }
    }
    let _ = writeln!(out, "\n### Table III (section 1)\n");
    let _ = writeln!(
        out,
        "| model | latency ms | f % | MDT s before → after | NDT s before → after | % more, before → after |\n|---|---|---|---|---|---|"
    );
    for after in after_table3 {
        let key = |row: &[(String, String)]| {
            (
                field(row, "model").to_string(),
                field(row, "latency_ms").to_string(),
                field(row, "failure_percent").to_string(),
            )
        };
        let Some(before) = before_table3.iter().find(|row| key(row) == key(after)) else {
            continue;
        };
        let changed = [
            "migration_downtime_s",
            "restart_downtime_s",
            "increase_percent_ours",
            "calibrated_training_min",
        ]
        .iter()
        .any(|column| field(before, column) != field(after, column));
        if !changed {
            continue;
        }
        let (model, latency, percent) = key(after);
        let _ = writeln!(
            out,
            "| {model} | {latency} | {percent} | {} → {} | {} → {} | {} → {} |",
            field(before, "migration_downtime_s"),
            field(after, "migration_downtime_s"),
            field(before, "restart_downtime_s"),
            field(after, "restart_downtime_s"),
            field(before, "increase_percent_ours"),
            field(after, "increase_percent_ours"),
        );
    }
    let _ = writeln!(out, "\n### Fig. 5 (section 2)\n");
    let _ = writeln!(
        out,
        "| data set | latency ms | approach | seconds before → after | peak parallel before → after |\n|---|---|---|---|---|"
    );
    for after in after_fig5 {
        let key = |row: &[(String, String)]| {
            (
                field(row, "dataset").to_string(),
                field(row, "latency_ms").to_string(),
                field(row, "approach").to_string(),
            )
        };
        let Some(before) = before_fig5.iter().find(|row| key(row) == key(after)) else {
            continue;
        };
        if ["seconds", "peak_parallel"]
            .iter()
            .all(|column| field(before, column) == field(after, column))
        {
            continue;
        }
        let (dataset, latency, approach) = key(after);
        let _ = writeln!(
            out,
            "| {dataset} | {latency} | {approach} | {} → {} | {} → {} |",
            field(before, "seconds"),
            field(after, "seconds"),
            field(before, "peak_parallel"),
            field(after, "peak_parallel"),
        );
    }
    let _ = writeln!(out, "\n### Why\n");
    for (what, why) in reasons {
        let _ = writeln!(out, "- **{what}**: {why}");
    }
    let _ = writeln!(out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_keep_quoted_commas() {
        assert_eq!(
            csv_fields(r#"young-daly,"Ours, Young/Daly interval",30000"#),
            vec!["young-daly", "Ours, Young/Daly interval", "30000"]
        );
        assert_eq!(csv_fields(r#""say ""hi""",x"#), vec![r#"say "hi""#, "x"]);
    }

    #[test]
    fn split_files_keeps_every_byte() {
        let files = split_files(1001, 4);
        assert_eq!(files.len(), 4);
        assert_eq!(files.iter().map(|file| file.size).sum::<u64>(), 1001);
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert!((median_ms(&[817, 624, 539, 505, 491, 515]) - 0.527).abs() < 1e-9);
        assert!((median_ms(&[3, 1, 2]) - 0.002).abs() < 1e-9);
    }
}
