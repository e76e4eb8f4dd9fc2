//! The copy monitor: an observer, independent of the controller, that checks the fencing rule
//! on the real system — never two running copies of the workload.
//!
//! Data model: a thread polls every node's runc state directory every `period`, counts the
//! containers whose init process is alive ([`LocalNode::container_running`]: runc's state file
//! and `/proc`, no process started, so a dead node is still seen), and keeps the largest count
//! and every sample where more than one ran. The verdict is [`CopyReport`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::controller::unix_now;
use crate::node::LocalNode;

/// What the monitor saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyReport {
    pub samples: u64,
    pub period_ms: u64,
    pub max_running: usize,
    /// Samples with more than one running copy: (Unix time, `node/container` ids).
    pub overlaps: Vec<(f64, Vec<String>)>,
}

/// A running monitor; [`CopyMonitor::stop`] ends it and returns the report.
#[derive(Debug)]
pub struct CopyMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<CopyReport>>,
}

impl CopyMonitor {
    pub fn start(nodes: Vec<Arc<LocalNode>>, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("copy-monitor".into())
            .spawn(move || {
                let mut report = CopyReport {
                    period_ms: period.as_millis() as u64,
                    ..CopyReport::default()
                };
                while !flag.load(Ordering::SeqCst) {
                    let running: Vec<String> = nodes
                        .iter()
                        .flat_map(|node| {
                            node.runc_container_ids()
                                .into_iter()
                                .filter(|id| node.container_running(id))
                                .map(|id| format!("{}/{id}", node.name()))
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    report.samples += 1;
                    report.max_running = report.max_running.max(running.len());
                    if running.len() > 1 {
                        tracing::error!(?running, "two copies of the workload are running");
                        report.overlaps.push((unix_now(), running));
                    }
                    std::thread::sleep(period);
                }
                report
            })
            .ok();
        Self { stop, thread }
    }

    pub fn stop(mut self) -> CopyReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|thread| thread.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for CopyMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
