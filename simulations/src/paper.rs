//! The seed paper's testbed experiments, re-run on the simulator's models.
//!
//! Table III compares the total training time when a failed job is migrated (MTT = T + MDT) with
//! a fresh restart (NTT = f·T + NDT + T) for a failure after a fraction f of the training time
//! T. MDT, the migration downtime, is the MigratingPod path the paper measured: CRIU dump, the
//! dump written to the master's NFS export and read back by the destination, then a CRIU
//! restore. NDT, a fresh start, is a container start plus loading the framework. The paper does
//! not publish T, nor how long a fresh start spends preparing its data, so [`table3`] calibrates
//! these two numbers per model on one latency's published row (two equations, two unknowns) and
//! predicts the other latencies with the link model alone.
//!
//! Fig. 5 times moving each of the paper's three datasets by each approach; every approach is a
//! model over [`crate::network`], and ours is the engine's own planner and stream controller.

use std::time::Duration;

use automigrate_core::transfer::FileSpec;

use crate::network::{self, Link, RoundSettings};
use crate::scenario::{PaperModel, PaperScenario, Published, ScenarioError, secs};

/// One cell of our Table III.
#[derive(Debug, Clone, PartialEq)]
pub struct Table3Cell {
    pub model: String,
    pub latency: Duration,
    pub fraction: f64,
    pub memory_image: u64,
    pub training: Duration,
    /// Calibrated data preparation time of a fresh start.
    pub preparation: Duration,
    pub exact_calibration: bool,
    pub migration_downtime: Duration,
    pub restart_downtime: Duration,
    pub increase_percent: f64,
}

/// What the published numbers imply, for one model and latency: the downtimes as shares of T.
#[derive(Debug, Clone, PartialEq)]
pub struct ImpliedRatios {
    pub model: String,
    pub latency: Duration,
    pub migration_downtime_over_t: f64,
    pub restart_downtime_over_t: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table3 {
    pub cells: Vec<Table3Cell>,
    pub implied: Vec<ImpliedRatios>,
    pub calibrated_on: Duration,
    /// The fitted latency-independent part of MigratingPod's downtime (zero when not fitted).
    pub fixed_overhead: Duration,
}

/// Percent more time a fresh restart takes than a migration.
fn increase_percent(fraction: f64, training: f64, mdt: f64, ndt: f64) -> f64 {
    let migrated = training + mdt;
    let restarted = fraction * training + ndt + training;
    (restarted - migrated) / migrated * 100.0
}

/// The CRIU image of a model's training process under the scenario's assumption.
pub fn memory_image(scenario: &PaperScenario, model: &PaperModel) -> u64 {
    let spec = &scenario.memory_image;
    (model.container_image.0 as f64 * spec.container_image_fraction
        + model.model_size.0 as f64 * spec.model_copies) as u64
}

/// One bulk copy on one TCP connection: two round trips of handshakes, then the bytes.
fn one_stream(link: &Link, bytes: u64) -> Duration {
    network::run_sequential_files(
        &[FileSpec {
            path: "image".into(),
            size: bytes,
        }],
        link.per_stream_bps(),
        link.rtt * 2,
        Duration::ZERO,
    )
}

/// One NFS leg of the dump: every image file costs a few round trips (create, write-back,
/// commit, or lookup, open, read), then the bytes flow on one TCP connection.
fn nfs_leg(scenario: &PaperScenario, link: &Link, bytes: u64) -> Duration {
    let nfs = &scenario.nfs;
    let per_file = link.rtt * nfs.rtts_per_file * nfs.image_files;
    one_stream(link, bytes) + per_file
}

/// MigratingPod's downtime: dump, NFS write to the master, NFS read from it, restore.
pub fn migration_downtime(
    scenario: &PaperScenario,
    model: &PaperModel,
    latency: Duration,
) -> Duration {
    let image = memory_image(scenario, model);
    let to_master = scenario.network.master_link(latency);
    scenario.criu.dump_time(image)
        + nfs_leg(scenario, &to_master, image)
        + nfs_leg(scenario, &to_master, image)
        + scenario.criu.restore_time(image)
}

/// A fresh container's start: container start and framework load, before any data preparation.
pub fn fresh_start(scenario: &PaperScenario, model: &PaperModel) -> Duration {
    scenario.criu.fresh_start_time(model.container_image.0)
}

/// The two unpublished quantities of one model, calibrated on one published row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Uninterrupted training time T.
    pub training: f64,
    /// Data preparation a fresh start repeats on top of [`fresh_start`] (loading and
    /// preprocessing the dataset); zero when the row does not call for any.
    pub preparation: f64,
    /// Whether both published numbers are met exactly (otherwise T is a least-squares fit).
    pub exact: bool,
}

/// Solves the published row's two equations for T and the data preparation time, given our
/// MDT: T = MDT / (MDT/T)_paper, NDT = (NDT/T)_paper · T. When that needs a negative
/// preparation time, falls back to no preparation and a least-squares T.
pub fn calibrate(fractions: &[f64], mdt: f64, base_ndt: f64, min: f64, max: f64) -> Calibration {
    let first = fractions.iter().copied().fold(f64::INFINITY, f64::min);
    let last = fractions.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (mdt_over_t, ndt_over_t) = implied_ratios(first, last, min, max);
    if mdt_over_t > 0.0 && mdt_over_t.is_finite() {
        let training = mdt / mdt_over_t;
        let preparation = ndt_over_t * training - base_ndt;
        if preparation >= 0.0 {
            return Calibration {
                training,
                preparation,
                exact: true,
            };
        }
    }
    Calibration {
        training: fit_training_time(fractions, mdt, base_ndt, min, max),
        preparation: 0.0,
        exact: false,
    }
}

/// (MDT/T, NDT/T) from the increase at the first and last failure fractions.
pub fn implied_ratios(first: f64, last: f64, min: f64, max: f64) -> (f64, f64) {
    let one_plus_b = (last - first) / ((max - min) / 100.0);
    let a = (1.0 + min / 100.0) * one_plus_b - 1.0 - first;
    (one_plus_b - 1.0, a)
}

/// Runs Table III: calibrates T and the data preparation time per model on the published row
/// at `calibrate_on`, then fills every cell with our MDT at each latency.
pub fn table3(scenario: &PaperScenario, published: &Published) -> Result<Table3, ScenarioError> {
    let spec = &scenario.table3;
    let rows = spec
        .models
        .iter()
        .map(|model| {
            published
                .table3
                .iter()
                .find(|row| row.model == model.name && row.latency == spec.calibrate_on)
                .map(|row| (row.min, row.max))
                .ok_or_else(|| ScenarioError::Invalid {
                    path: scenario.base_dir.join(&scenario.published),
                    reason: format!(
                        "no published Table III row for {} at {:?}",
                        model.name, spec.calibrate_on
                    ),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let overhead = if spec.fit_fixed_overhead {
        fit_fixed_overhead(scenario, published, &rows)
    } else {
        0.0
    };
    let cells = table3_cells(scenario, &rows, overhead);
    let first = spec
        .failure_fractions
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let last = spec
        .failure_fractions
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    let implied = published
        .table3
        .iter()
        .map(|row| {
            let (mdt_over_t, ndt_over_t) = implied_ratios(first, last, row.min, row.max);
            ImpliedRatios {
                model: row.model.clone(),
                latency: row.latency,
                migration_downtime_over_t: mdt_over_t,
                restart_downtime_over_t: ndt_over_t,
            }
        })
        .collect();
    Ok(Table3 {
        cells,
        implied,
        calibrated_on: spec.calibrate_on,
        fixed_overhead: secs(overhead),
    })
}

/// Every cell of Table III with `overhead` seconds added to each migration's downtime.
fn table3_cells(scenario: &PaperScenario, rows: &[(f64, f64)], overhead: f64) -> Vec<Table3Cell> {
    let spec = &scenario.table3;
    let mut cells = Vec::new();
    for (model, &(min, max)) in spec.models.iter().zip(rows) {
        let mdt_at =
            |latency| migration_downtime(scenario, model, latency).as_secs_f64() + overhead;
        let base_ndt = fresh_start(scenario, model).as_secs_f64();
        let calibration = calibrate(
            &spec.failure_fractions,
            mdt_at(spec.calibrate_on),
            base_ndt,
            min,
            max,
        );
        let ndt = base_ndt + calibration.preparation;
        for &latency in &spec.latencies {
            let mdt = mdt_at(latency);
            for &fraction in &spec.failure_fractions {
                cells.push(Table3Cell {
                    model: model.name.clone(),
                    latency,
                    fraction,
                    memory_image: memory_image(scenario, model),
                    training: secs(calibration.training),
                    preparation: secs(calibration.preparation),
                    exact_calibration: calibration.exact,
                    migration_downtime: secs(mdt),
                    restart_downtime: secs(ndt),
                    increase_percent: increase_percent(fraction, calibration.training, mdt, ndt),
                });
            }
        }
    }
    cells
}

/// The one latency-independent migration cost, shared by all models, that best matches the
/// published rows at the latencies not used for calibration (least squares over their min and
/// max, golden-section search over 0 to 1 hour).
fn fit_fixed_overhead(scenario: &PaperScenario, published: &Published, rows: &[(f64, f64)]) -> f64 {
    let calibrate_on = scenario.table3.calibrate_on;
    let error = |overhead: f64| {
        let cells = table3_cells(scenario, rows, overhead);
        let mut total = 0.0;
        for row in published
            .table3
            .iter()
            .filter(|row| row.latency != calibrate_on)
        {
            let values: Vec<f64> = cells
                .iter()
                .filter(|cell| cell.model == row.model && cell.latency == row.latency)
                .map(|cell| cell.increase_percent)
                .collect();
            if values.is_empty() {
                continue;
            }
            let low = values.iter().copied().fold(f64::INFINITY, f64::min);
            let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            total += (low - row.min).powi(2) + (high - row.max).powi(2);
        }
        total
    };
    let ratio = (5.0_f64.sqrt() - 1.0) / 2.0;
    let (mut low, mut high) = (0.0_f64, 3600.0_f64);
    for _ in 0..100 {
        let left = high - ratio * (high - low);
        let right = low + ratio * (high - low);
        if error(left) < error(right) {
            high = right;
        } else {
            low = left;
        }
    }
    (low + high) / 2.0
}

/// The training time T whose min and max increases over `fractions` best match the published
/// pair, by golden-section search on log T between one second and a week.
pub fn fit_training_time(fractions: &[f64], mdt: f64, ndt: f64, min: f64, max: f64) -> f64 {
    let error = |log_t: f64| {
        let t = log_t.exp();
        let values: Vec<f64> = fractions
            .iter()
            .map(|&fraction| increase_percent(fraction, t, mdt, ndt))
            .collect();
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (low - min).powi(2) + (high - max).powi(2)
    };
    let ratio = (5.0_f64.sqrt() - 1.0) / 2.0;
    let (mut low, mut high) = (1.0_f64.ln(), (7.0 * 86_400.0_f64).ln());
    for _ in 0..200 {
        let left = high - ratio * (high - low);
        let right = low + ratio * (high - low);
        if error(left) < error(right) {
            high = right;
        } else {
            low = left;
        }
    }
    ((low + high) / 2.0).exp()
}

/// The approaches of Fig. 5, in the order the report shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Approach {
    Repository,
    Scp,
    KubectlCp,
    Middleware,
    Ours,
}

impl Approach {
    pub const ALL: [Approach; 5] = [
        Approach::Repository,
        Approach::Scp,
        Approach::KubectlCp,
        Approach::Middleware,
        Approach::Ours,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Repository => "repository download",
            Self::Scp => "scp",
            Self::KubectlCp => "kubectl cp",
            Self::Middleware => "per-file parallel middleware",
            Self::Ours => "ours (packing, adaptive)",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fig5Cell {
    pub dataset: String,
    pub latency: Duration,
    pub approach: Approach,
    pub time: Duration,
    /// Streams or files in flight at the peak, where the approach runs several.
    pub peak_parallel: u32,
}

fn dataset_files(total: u64, count: u64) -> Vec<FileSpec> {
    let count = count.max(1);
    (0..count)
        .map(|index| FileSpec {
            path: format!("file-{index:05}"),
            size: total / count + u64::from(index < total % count),
        })
        .collect()
}

/// Runs Fig. 5 for every dataset, latency and approach.
pub fn fig5(scenario: &PaperScenario) -> Result<Vec<Fig5Cell>, ScenarioError> {
    let spec = &scenario.fig5;
    let rounds = RoundSettings {
        round: scenario.transfer_round,
    };
    let mut cells = Vec::new();
    for dataset in &spec.datasets {
        let files = dataset_files(dataset.total_bytes.0, dataset.files);
        for &latency in &spec.latencies {
            let worker = scenario.network.worker_link(latency);
            let master = scenario.network.master_link(latency);
            for approach in Approach::ALL {
                let (time, peak) = match approach {
                    Approach::Repository => {
                        let link = Link {
                            rtt: spec.repository.rtt,
                            capacity_bps: spec.repository.capacity.0 as f64,
                            loss: spec.repository.loss,
                        };
                        let time = network::run_sequential_files(
                            &files,
                            link.per_stream_bps(),
                            link.rtt * 2,
                            link.rtt * spec.repository.rtts_per_file,
                        );
                        (time, 1)
                    }
                    Approach::Scp => {
                        let bps = worker
                            .per_stream_bps_with_window(spec.scp.channel_window.0 as f64)
                            .min(spec.scp.cipher_rate.0 as f64);
                        let time = network::run_sequential_files(
                            &files,
                            bps,
                            worker.rtt * spec.scp.setup_rtts + spec.scp.setup_cpu,
                            worker.rtt * spec.scp.rtts_per_file,
                        );
                        (time, 1)
                    }
                    Approach::KubectlCp => {
                        let leg_bps = master
                            .per_stream_bps()
                            .min(spec.kubectl.api_server_cap.0 as f64);
                        // One tar stream from the source pod to kubectl on the master, then one
                        // from the master into the destination pod.
                        let tarred: Vec<FileSpec> = files
                            .iter()
                            .map(|file| FileSpec {
                                path: file.path.clone(),
                                size: file.size.div_ceil(512) * 512 + spec.kubectl.tar_header.0,
                            })
                            .collect();
                        let leg = network::run_sequential_files(
                            &tarred,
                            leg_bps,
                            spec.kubectl.exec_setup + master.rtt * spec.kubectl.setup_rtts,
                            Duration::ZERO,
                        );
                        (leg * 2, 1)
                    }
                    Approach::Middleware => {
                        // One `kubectl cp` per file (two legs through the master, each with its
                        // own exec setup); the window of files in flight follows the feedback
                        // controller, modelled by ours.
                        let per_file_setup =
                            (spec.kubectl.exec_setup + master.rtt * spec.kubectl.setup_rtts) * 2;
                        let outcome = network::run_per_file(
                            &files,
                            &|streams| {
                                master
                                    .aggregate_bps(streams)
                                    .min(spec.kubectl.api_server_cap.0 as f64)
                                    / 2.0
                            },
                            per_file_setup,
                            spec.middleware.initial_window,
                            spec.middleware.max_window,
                            rounds,
                        );
                        (outcome.duration, outcome.peak_streams)
                    }
                    Approach::Ours => {
                        let (_, outcome) = network::plan_and_run(
                            &files,
                            &worker,
                            &scenario.engine_transfer_settings(),
                            rounds,
                        )
                        .map_err(|error| ScenarioError::Invalid {
                            path: scenario.base_dir.clone(),
                            reason: format!(
                                "fig5: the engine cannot plan {}: {error}",
                                dataset.name
                            ),
                        })?;
                        (outcome.duration, outcome.peak_streams)
                    }
                };
                cells.push(Fig5Cell {
                    dataset: dataset.name.clone(),
                    latency,
                    approach,
                    time,
                    peak_parallel: peak,
                });
            }
        }
    }
    Ok(cells)
}

/// The time of one approach in one cell of Fig. 5.
pub fn fig5_time(
    cells: &[Fig5Cell],
    dataset: &str,
    latency: Duration,
    approach: Approach,
) -> Option<f64> {
    cells
        .iter()
        .find(|cell| {
            cell.dataset == dataset && cell.latency == latency && cell.approach == approach
        })
        .map(|cell| cell.time.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increase_grows_with_the_fraction_trained() {
        let values: Vec<f64> = [0.25, 0.5, 0.75]
            .iter()
            .map(|&f| increase_percent(f, 600.0, 60.0, 30.0))
            .collect();
        assert!(
            values.windows(2).all(|pair| pair[0] < pair[1]),
            "{values:?}"
        );
        // With free downtimes the increase is exactly the fraction re-done.
        assert!((increase_percent(0.5, 100.0, 0.0, 0.0) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn calibration_meets_both_published_numbers_when_it_can() {
        let fractions = [0.25, 0.5, 0.75];
        let (t, mdt, ndt) = (300.0, 60.0, 100.0);
        let min = increase_percent(0.25, t, mdt, ndt);
        let max = increase_percent(0.75, t, mdt, ndt);
        let calibration = calibrate(&fractions, mdt, 10.0, min, max);
        assert!(calibration.exact);
        assert!((calibration.training - t).abs() < 1e-6, "{calibration:?}");
        assert!(
            (calibration.preparation - 90.0).abs() < 1e-6,
            "{calibration:?}"
        );
    }

    #[test]
    fn fit_recovers_the_training_time_that_made_the_numbers() {
        let fractions = [0.25, 0.5, 0.75];
        let (mdt, ndt, t) = (40.0, 25.0, 900.0);
        let min = increase_percent(0.25, t, mdt, ndt);
        let max = increase_percent(0.75, t, mdt, ndt);
        let fitted = fit_training_time(&fractions, mdt, ndt, min, max);
        assert!((fitted - t).abs() / t < 1e-4, "{fitted}");
    }
}
