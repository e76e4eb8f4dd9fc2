//! The independent witness of "never two copies": a thread that runs `runc list` on every
//! node's runc root ([`KubeCluster::running_containers`]) every few tens of milliseconds and
//! counts the running containers of the protected pod's workload, wherever they are and
//! whatever pod they belong to (the source, a replacement, a copy started from the beginning).
//! It reads runc's state, not the API server's or the controller's view.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kube::KubeCluster;

/// What the sampler saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyReport {
    pub samples: u64,
    pub period_ms: u64,
    pub max_running: usize,
    /// Samples with more than one running copy: (Unix time, `node/container` ids); at most
    /// [`MAX_KEPT`] kept.
    pub overlaps: Vec<(f64, Vec<String>)>,
    /// Samples with more than one running copy, all of them counted.
    #[serde(default)]
    pub overlapping_samples: u64,
}

/// Overlapping samples kept in the report (the count is kept whole).
pub const MAX_KEPT: usize = 20;

/// A running sampler; [`CopySampler::stop`] ends it and returns what it saw.
#[derive(Debug)]
pub struct CopySampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<CopyReport>>,
}

impl CopySampler {
    /// Samples the containers whose runc id starts with `prefix` (`<namespace>_`) and names
    /// the container `container` (`_<container>_`).
    pub fn start(
        cluster: Arc<KubeCluster>,
        prefix: String,
        container: String,
        period: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let needle = format!("_{container}_");
        let thread = std::thread::Builder::new()
            .name("copy-sampler".into())
            .spawn(move || {
                let mut report = CopyReport {
                    period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
                    ..CopyReport::default()
                };
                while !stopped.load(Ordering::SeqCst) {
                    let running: Vec<String> = cluster
                        .running_containers()
                        .into_iter()
                        .filter(|(_, id)| id.starts_with(&prefix) && id.contains(&needle))
                        .map(|(node, id)| format!("{node}/{id}"))
                        .collect();
                    report.samples += 1;
                    report.max_running = report.max_running.max(running.len());
                    if running.len() > 1 {
                        report.overlapping_samples += 1;
                        if report.overlaps.len() < MAX_KEPT {
                            report.overlaps.push((unix_now(), running));
                        }
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

impl Drop for CopySampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0)
}
