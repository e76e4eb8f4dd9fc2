//! Downtime of a run (issue 16): from the moment the fault fired until the training runs
//! again, read from the progress logs the copies write (every node's own log, each line with
//! its time), and the per-kind median and maximum the report shows next to Kubernetes' and
//! medik8s' figures.
//!
//! "Runs again" is the first line of a copy that began after the fault: a node's log is cut
//! into segments ([`super::training::analyse`]; a restored copy goes back to the epoch after
//! its checkpoint, a copy on another node starts that node's log, a fresh start writes a
//! `start` line), and the earliest segment that began after the fault ends the downtime. A
//! restored copy's first line is written when its first epoch after the restore is done, so
//! the figure includes one epoch of training (about 0.1 s with the suite's trainer). Where no
//! copy began after the fault and the training finished, it never stopped (`not stopped`, 0 s);
//! where none began and it did not finish, it never ran again.

use serde::{Deserialize, Serialize};

use super::training;
use crate::workload::Progress;

/// A run's downtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum Downtime {
    /// The fault never fired (or the run could not be carried out).
    #[default]
    NoFault,
    /// No copy began after the fault and the training finished: it never stopped.
    NotStopped,
    /// A copy began on `node` `seconds` after the fault.
    #[serde(rename_all = "camelCase")]
    Resumed { seconds: f64, node: String },
    /// No copy began after the fault and the training did not finish.
    NeverResumed,
}

impl Downtime {
    /// Seconds the training was down: 0 where it never stopped.
    pub fn seconds(&self) -> Option<f64> {
        match self {
            Downtime::NotStopped => Some(0.0),
            Downtime::Resumed { seconds, .. } => Some(*seconds),
            Downtime::NoFault | Downtime::NeverResumed => None,
        }
    }

    /// A copy began after the fault: the training was stopped or restarted.
    pub fn restarted(&self) -> bool {
        matches!(self, Downtime::Resumed { .. })
    }

    pub fn describe(&self) -> String {
        match self {
            Downtime::NoFault => "–".into(),
            Downtime::NotStopped => "not stopped".into(),
            Downtime::Resumed { seconds, node } => format!("{seconds:.2} s (on {node})"),
            Downtime::NeverResumed => "never resumed".into(),
        }
    }
}

/// The downtime of a run whose fault fired at `fault_at` (Unix seconds), from every node's
/// progress log.
pub fn measure(logs: &[(String, Progress)], fault_at: Option<f64>) -> Downtime {
    let Some(fault_at) = fault_at else {
        return Downtime::NoFault;
    };
    let first_after = logs
        .iter()
        .flat_map(|(node, progress)| {
            training::analyse(progress)
                .segments
                .into_iter()
                .filter(|segment| segment.first_at > fault_at)
                .map(move |segment| (segment.first_at, node))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((at, node)) = first_after {
        return Downtime::Resumed {
            seconds: at - fault_at,
            node: node.clone(),
        };
    }
    if training::analyse_nodes(logs).finished {
        Downtime::NotStopped
    } else {
        Downtime::NeverResumed
    }
}

/// Median and maximum of a kind's downtimes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DowntimeSummary {
    /// Runs whose fault fired.
    pub fired: usize,
    /// Runs where the training stopped and ran again.
    pub resumed: usize,
    pub not_stopped: usize,
    pub never_resumed: usize,
    /// Over the runs where it stopped and ran again; `None` if none did.
    pub median_s: Option<f64>,
    pub max_s: Option<f64>,
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    })
}

pub fn summarize<'a>(downtimes: impl IntoIterator<Item = &'a Downtime>) -> DowntimeSummary {
    let mut summary = DowntimeSummary::default();
    let mut values = Vec::new();
    for downtime in downtimes {
        match downtime {
            Downtime::NoFault => continue,
            Downtime::NotStopped => summary.not_stopped += 1,
            Downtime::NeverResumed => summary.never_resumed += 1,
            Downtime::Resumed { seconds, .. } => {
                summary.resumed += 1;
                values.push(*seconds);
            }
        }
        summary.fired += 1;
    }
    summary.median_s = median(&values);
    summary.max_s = values.iter().copied().reduce(f64::max);
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload;

    fn log(lines: &[String]) -> Progress {
        Progress {
            lines: lines
                .iter()
                .filter_map(|line| workload::parse_line(line))
                .collect(),
        }
    }

    fn epochs(range: std::ops::RangeInclusive<u32>, run: u64, start_at: f64) -> Vec<String> {
        range
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "epoch={n} loss=0.5 hex=0x1.0p-1 run={run} t={}",
                    start_at + i as f64 * 0.1
                )
            })
            .collect()
    }

    #[test]
    fn downtime_runs_from_the_fault_to_the_first_line_of_a_copy_begun_after_it() {
        // node-a trains epochs 1..=40 (t 0.0..3.9), is cut at t=2.0 and self-fences at 3.9;
        // node-b resumes after epoch 30 at t=9.5.
        let mut a = epochs(1..=40, 7, 0.0);
        a.insert(0, "start run=7 t=0.0".into());
        let mut b = epochs(31..=100, 7, 9.5);
        b.push("done epochs=100 run=7 t=20.0".into());
        let logs = vec![
            ("node-a".to_string(), log(&a)),
            ("node-b".to_string(), log(&b)),
            ("node-c".to_string(), Progress::default()),
        ];
        let downtime = measure(&logs, Some(2.0));
        let Downtime::Resumed { seconds, node } = &downtime else {
            panic!("{downtime:?}")
        };
        assert!((seconds - 7.5).abs() < 1e-9, "{seconds}");
        assert_eq!(node, "node-b");
        assert!(downtime.restarted());
        assert_eq!(measure(&logs, None), Downtime::NoFault);
    }

    #[test]
    fn a_restore_on_the_same_node_counts_and_an_unbroken_run_is_not_stopped() {
        // Rolled back on node-a: after epoch 40 at t=3.9 it goes back to epoch 31 at t=6.0.
        let mut a = epochs(1..=40, 7, 0.0);
        a.extend(epochs(31..=100, 7, 6.0));
        let logs = vec![("node-a".to_string(), log(&a))];
        let downtime = measure(&logs, Some(3.0));
        assert_eq!(downtime.seconds(), Some(3.0));
        // Never broken, finished.
        let mut whole = epochs(1..=100, 7, 0.0);
        whole.push("done epochs=100 run=7 t=10.0".into());
        let logs = vec![("node-a".to_string(), log(&whole))];
        assert_eq!(measure(&logs, Some(3.0)), Downtime::NotStopped);
        assert_eq!(Downtime::NotStopped.seconds(), Some(0.0));
        // Stopped and never back.
        let logs = vec![("node-a".to_string(), log(&epochs(1..=40, 7, 0.0)))];
        assert_eq!(measure(&logs, Some(3.0)), Downtime::NeverResumed);
    }

    #[test]
    fn median_and_maximum_per_kind() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[4.0]), Some(4.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[8.0, 2.0, 4.0, 6.0]), Some(5.0));
        let runs = [
            Downtime::Resumed {
                seconds: 12.0,
                node: "node-b".into(),
            },
            Downtime::NoFault,
            Downtime::Resumed {
                seconds: 8.0,
                node: "node-c".into(),
            },
            Downtime::NotStopped,
            Downtime::Resumed {
                seconds: 30.0,
                node: "node-b".into(),
            },
            Downtime::NeverResumed,
        ];
        let summary = summarize(&runs);
        assert_eq!(summary.fired, 5);
        assert_eq!(summary.resumed, 3);
        assert_eq!(summary.not_stopped, 1);
        assert_eq!(summary.never_resumed, 1);
        assert_eq!(summary.median_s, Some(12.0));
        assert_eq!(summary.max_s, Some(30.0));
        let quiet = summarize(&[Downtime::NotStopped, Downtime::NotStopped]);
        assert_eq!((quiet.fired, quiet.not_stopped), (2, 2));
        assert_eq!((quiet.median_s, quiet.max_s), (None, None));
    }
}
