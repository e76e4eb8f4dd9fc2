//! The protected workload of the fault suite, as the suite sees it: the uninterrupted reference
//! run (the trainer as a plain process on the host, the same python and numpy the containers
//! bind read-only) and the analysis of a run's progress log.
//!
//! Every copy of the trainer appends to `progress.log` in its node's work directory, one line
//! per write, each line with its time. [`merge`] puts every node's lines in time order and
//! [`analyse`] cuts them into segments: a segment ends where the epoch count does not go up by
//! one. A restored copy goes back to the epoch after its checkpoint (same run tag); a fresh
//! start writes a `start` line with a new run tag; two copies writing at the same time make the
//! count jump forward, which no single copy does, and their segments on different nodes overlap
//! in time ([`analyse_nodes`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::workload::{self, DatasetSpec, Progress, ProgressLine, TrainerSpec};

#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error(transparent)]
    Workload(#[from] workload::WorkloadError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the reference trainer failed: {0}")]
    Failed(String),
}

/// The suite's reference: the uninterrupted run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    pub loss_hex: String,
    pub training_s: f64,
    pub epoch_s: f64,
}

/// Runs the trainer to the end as a host process in `dir` (dataset, program, work directory
/// created there): the loss every faulted run must reproduce bit for bit.
pub fn reference_run(
    dir: &Path,
    dataset: &DatasetSpec,
    trainer: &TrainerSpec,
    limit: Duration,
) -> Result<Reference, TrainingError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainingError::Io { path, source }
    };
    let data = dir.join("data");
    let app = dir.join("app");
    let work = dir.join("work");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(&work))?;
    }
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    workload::generate_dataset(&data, dataset)?;
    workload::install_program(&app)?;
    let started = Instant::now();
    let mut child = std::process::Command::new(workload::PYTHON)
        .arg(app.join(workload::TRAINER_FILE))
        .arg(&data)
        .arg(&work)
        .args(trainer_args(trainer))
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(io(Path::new(workload::PYTHON)))?;
    loop {
        if let Some(status) = child.try_wait().map_err(io(&work))? {
            if !status.success() {
                let mut text = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
                }
                return Err(TrainingError::Failed(format!("{status}: {text}")));
            }
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TrainingError::Failed(format!(
                "not finished within {limit:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let progress = workload::read_progress(&work.join(workload::PROGRESS_FILE))?;
    let analysis = analyse(&progress);
    let (Some(loss_hex), Some(training_s)) = (analysis.final_loss_hex, analysis.training_s) else {
        return Err(TrainingError::Failed(
            "the reference run wrote no final epoch".into(),
        ));
    };
    Ok(Reference {
        loss_hex,
        training_s,
        epoch_s: training_s / f64::from(trainer.epochs.max(1)),
    })
}

/// The trainer's arguments after its data and work directories.
pub fn trainer_args(trainer: &TrainerSpec) -> Vec<String> {
    vec![
        trainer.epochs.to_string(),
        trainer.hidden.to_string(),
        trainer.seed.to_string(),
        format!("{:?}", trainer.learning_rate),
    ]
}

/// A stretch of the progress log written by one copy without a break.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Segment {
    pub run_tag: u64,
    /// The copy wrote a `start` line: it began from the first epoch, not from a checkpoint.
    pub fresh: bool,
    pub first_epoch: Option<u32>,
    pub last_epoch: Option<u32>,
    pub first_at: f64,
    pub last_at: f64,
}

/// What a run's progress log says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRecord {
    pub segments: Vec<Segment>,
    /// A `done` line was written.
    pub finished: bool,
    /// The furthest epoch any copy reached, and its loss.
    pub final_epoch: Option<u32>,
    pub final_loss_hex: Option<String>,
    /// From the first line to the `done` line.
    pub training_s: Option<f64>,
    /// When the `done` line was written (Unix seconds).
    #[serde(default)]
    pub finished_at: Option<f64>,
    /// The epoch count jumped forward somewhere: two copies appended at the same time.
    pub interleaved: bool,
    /// Per segment after the first: the last epoch it did not compute again (0: from the
    /// beginning).
    pub resumed_from: Vec<u32>,
    /// Per segment after the first: epochs computed again (the highest epoch written before it
    /// minus where it resumed).
    pub redone_epochs: Vec<u32>,
    /// Segments after the first that began from the first epoch.
    pub fresh_starts: usize,
}

fn line_at(line: &ProgressLine) -> f64 {
    match line {
        ProgressLine::Start { at, .. } | ProgressLine::Done { at, .. } => *at,
        ProgressLine::Epoch(record) => record.at,
    }
}

/// The furthest epoch any copy had written at or before `at` (Unix seconds); 0 if none.
pub fn epoch_at(logs: &[(String, Progress)], at: f64) -> u32 {
    logs.iter()
        .flat_map(|(_, progress)| progress.lines.iter())
        .filter_map(|line| match line {
            ProgressLine::Epoch(record) if record.at <= at => Some(record.epoch),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Every node's progress log merged into one, in time order (each line carries its time).
pub fn merge(logs: &[(String, Progress)]) -> Progress {
    let mut lines: Vec<ProgressLine> = logs
        .iter()
        .flat_map(|(_, progress)| progress.lines.iter().cloned())
        .collect();
    lines.sort_by(|a, b| line_at(a).total_cmp(&line_at(b)));
    Progress { lines }
}

/// [`analyse`] of the merged logs; two copies on different nodes whose segments overlap in time
/// also count as [`TrainingRecord::interleaved`].
pub fn analyse_nodes(logs: &[(String, Progress)]) -> TrainingRecord {
    let mut record = analyse(&merge(logs));
    let spans: Vec<(usize, f64, f64)> = logs
        .iter()
        .enumerate()
        .flat_map(|(index, (_, progress))| {
            analyse(progress)
                .segments
                .into_iter()
                .map(move |segment| (index, segment.first_at, segment.last_at))
        })
        .collect();
    let overlap = spans.iter().enumerate().any(|(i, a)| {
        spans
            .iter()
            .skip(i + 1)
            .any(|b| a.0 != b.0 && a.1 < b.2 && b.1 < a.2)
    });
    record.interleaved |= overlap;
    record
}

/// Cuts the log into segments and measures what every break cost (see the module header).
pub fn analyse(progress: &Progress) -> TrainingRecord {
    let mut record = TrainingRecord::default();
    let mut previous_epoch: Option<u32> = None;
    let mut pending_start: Option<(u64, f64)> = None;
    let mut first_at: Option<f64> = None;
    for line in &progress.lines {
        match line {
            ProgressLine::Start { run, at } => {
                first_at.get_or_insert(*at);
                pending_start = Some((*run, *at));
                previous_epoch = None;
            }
            ProgressLine::Epoch(epoch) => {
                first_at.get_or_insert(epoch.at);
                let continues = pending_start.is_none()
                    && previous_epoch.is_some_and(|previous| epoch.epoch == previous + 1)
                    && record
                        .segments
                        .last()
                        .is_some_and(|segment| segment.run_tag == epoch.run);
                if previous_epoch.is_some_and(|previous| epoch.epoch > previous + 1) {
                    record.interleaved = true;
                }
                if continues {
                    if let Some(segment) = record.segments.last_mut() {
                        segment.last_epoch = Some(epoch.epoch);
                        segment.last_at = epoch.at;
                    }
                } else {
                    let (fresh, at) = match pending_start.take() {
                        Some((_, at)) => (true, at),
                        None => (false, epoch.at),
                    };
                    record.segments.push(Segment {
                        run_tag: epoch.run,
                        fresh,
                        first_epoch: Some(epoch.epoch),
                        last_epoch: Some(epoch.epoch),
                        first_at: at,
                        last_at: epoch.at,
                    });
                }
                previous_epoch = Some(epoch.epoch);
                // The furthest epoch any copy reached, and its loss as first written (two
                // copies that both get there must agree; the verdict compares it).
                if record
                    .final_epoch
                    .is_none_or(|furthest| epoch.epoch > furthest)
                {
                    record.final_epoch = Some(epoch.epoch);
                    record.final_loss_hex = Some(epoch.loss_hex.clone());
                }
            }
            ProgressLine::Done { at, .. } => {
                record.finished = true;
                record.training_s = first_at.map(|first| at - first);
                record.finished_at = Some(*at);
            }
        }
    }
    // A start line with no epoch after it (the copy died at once) is a segment too.
    if let Some((run, at)) = pending_start {
        record.segments.push(Segment {
            run_tag: run,
            fresh: true,
            first_epoch: None,
            last_epoch: None,
            first_at: at,
            last_at: at,
        });
    }
    let mut highest: u32 = 0;
    for (index, segment) in record.segments.iter().enumerate() {
        if index > 0 {
            let from = if segment.fresh {
                0
            } else {
                segment
                    .first_epoch
                    .map_or(0, |epoch| epoch.saturating_sub(1))
            };
            record.resumed_from.push(from);
            record.redone_epochs.push(highest.saturating_sub(from));
            if segment.fresh {
                record.fresh_starts += 1;
            }
        }
        highest = highest.max(segment.last_epoch.unwrap_or(0));
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(lines: &[&str]) -> Progress {
        Progress {
            lines: lines
                .iter()
                .filter_map(|line| workload::parse_line(line))
                .collect(),
        }
    }

    fn epoch(epoch: u32, run: u64, at: f64) -> String {
        format!("epoch={epoch} loss=0.5 hex=0x1.0p-1 run={run} t={at}")
    }

    #[test]
    fn a_restore_is_a_segment_that_goes_back_to_the_epoch_after_its_checkpoint() {
        let mut lines = vec!["start run=7 t=0.0".to_string()];
        for n in 1..=10 {
            lines.push(epoch(n, 7, f64::from(n)));
        }
        // Restored from a checkpoint taken after epoch 6.
        for n in 7..=12 {
            lines.push(epoch(n, 7, 20.0 + f64::from(n)));
        }
        lines.push("done epochs=12 run=7 t=40.0".into());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let record = analyse(&log(&refs));
        assert_eq!(record.segments.len(), 2);
        assert_eq!(record.resumed_from, vec![6]);
        assert_eq!(record.redone_epochs, vec![4]);
        assert_eq!(record.fresh_starts, 0);
        assert!(record.finished && !record.interleaved);
        assert_eq!(record.final_epoch, Some(12));
        assert_eq!(record.training_s, Some(40.0));
    }

    #[test]
    fn a_fresh_start_and_two_writers_are_told_apart() {
        let mut lines = vec!["start run=7 t=0.0".to_string()];
        for n in 1..=5 {
            lines.push(epoch(n, 7, f64::from(n)));
        }
        lines.push("start run=9 t=10.0".into());
        lines.push(epoch(1, 9, 11.0));
        lines.push(epoch(2, 9, 12.0));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let fresh = analyse(&log(&refs));
        assert_eq!(fresh.resumed_from, vec![0]);
        assert_eq!(fresh.redone_epochs, vec![5]);
        assert_eq!(fresh.fresh_starts, 1);
        assert!(!fresh.interleaved && !fresh.finished);

        // The source goes on after a copy restored at epoch 3 started: 5, 4, 6.
        let two = [
            epoch(4, 7, 4.0),
            epoch(5, 7, 5.0),
            epoch(4, 7, 5.5),
            epoch(6, 7, 6.0),
        ];
        let refs: Vec<&str> = two.iter().map(String::as_str).collect();
        assert!(analyse(&log(&refs)).interleaved);
    }

    #[test]
    fn copies_on_two_nodes_are_merged_in_time_and_overlapping_ones_are_caught() {
        let source = log(&[&epoch(1, 7, 1.0), &epoch(2, 7, 2.0), &epoch(3, 7, 3.0)]);
        // Restored after epoch 2, once the source had stopped.
        let moved = log(&[&epoch(3, 7, 5.0), &epoch(4, 7, 6.0)]);
        let record = analyse_nodes(&[("node-a".into(), source.clone()), ("node-b".into(), moved)]);
        assert_eq!(record.segments.len(), 2);
        assert_eq!(record.resumed_from, vec![2]);
        assert_eq!(record.redone_epochs, vec![1]);
        assert!(!record.interleaved);
        // The same restore while the source still ran: epochs 3 and 4 at the same times.
        let alongside = log(&[&epoch(3, 7, 2.5), &epoch(4, 7, 3.5)]);
        let record = analyse_nodes(&[("node-a".into(), source), ("node-b".into(), alongside)]);
        assert!(record.interleaved);
    }
}
