//! The controller's hands: moving checkpoints and datasets between agents, and periodic
//! checkpoints with their standby copies, which run in the background so the controller's passes
//! (and with them failure detection) never wait for bytes to move.
//!
//! Data model: [`Shared`] is what the controller and its background jobs both write: the
//! timeline, the epochs the workload had reported around each checkpoint, and the nodes holding
//! a verified copy of the dataset. [`Worker`] carries out transfers through the sending node's
//! agent and records them; [`CheckpointJob`] is one periodic checkpoint decision carried out to
//! the end (dump, dataset and checkpoint to each standby, retention on every holder).
//!
//! A [`Shared`] made with [`Shared::journaled`] also writes itself to the controller's state
//! directory, so a restarted controller (and the process that started it) can read it back:
//! every timeline event is appended as one JSON line to `timeline.jsonl` (a line cut short by a
//! kill is skipped on reading), the epochs and dataset holders are rewritten atomically to
//! `shared.json` on every change.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automigrate_agent::api::{
    CheckpointKind, CheckpointRequest, Payload as AgentPayload, Peer, PodKey, TransferRequest,
};
use automigrate_core::decide::CheckpointDecision;

use crate::agent::{AgentError, NodeAgent, transfer_to_end};
use crate::cluster::LocalCluster;
use crate::controller::{ControllerError, Purpose, TimelineEvent, unix_now};
use crate::workload::{self, DatasetSpec, WorkloadError};

/// Longest one data transfer may take before the poll gives up (phase deadlines are the real
/// limits for migrations).
const TRANSFER_LIMIT: Duration = Duration::from_secs(300);
/// How long a received checkpoint may take to appear in the receiving agent's store.
const STORE_WAIT: Duration = Duration::from_secs(30);

/// Epochs reported before and after a checkpoint was taken.
pub type EpochRange = (Option<u32>, Option<u32>);

/// What the controller and its background jobs record together.
#[derive(Debug, Default)]
pub struct Shared {
    timeline: Mutex<Vec<TimelineEvent>>,
    epochs: Mutex<BTreeMap<String, EpochRange>>,
    holders: Mutex<BTreeSet<String>>,
    /// The state directory it is journaled to, if any.
    journal: Option<PathBuf>,
}

/// `shared.json`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SharedRecords {
    epochs: BTreeMap<String, EpochRange>,
    holders: BTreeSet<String>,
}

pub const TIMELINE_FILE: &str = "timeline.jsonl";
const RECORDS_FILE: &str = "shared.json";

/// The timeline journaled in `state_dir` (lines cut short or unreadable are skipped).
pub fn read_timeline(state_dir: &Path) -> Vec<TimelineEvent> {
    std::fs::read_to_string(state_dir.join(TIMELINE_FILE))
        .map(|text| {
            text.lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Shared {
    /// A record journaled to `state_dir`: with `resume`, what is there already is read back
    /// first; otherwise it starts empty (an earlier journal is replaced).
    pub fn journaled(state_dir: &Path, resume: bool) -> Result<Self, ControllerError> {
        let error = |path: &Path, reason: String| ControllerError::Persist {
            path: path.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(state_dir).map_err(|e| error(state_dir, e.to_string()))?;
        let timeline_path = state_dir.join(TIMELINE_FILE);
        let records_path = state_dir.join(RECORDS_FILE);
        let (timeline, records) = if resume {
            let records = match std::fs::read(&records_path) {
                Ok(text) => serde_json::from_slice::<SharedRecords>(&text)
                    .map_err(|e| error(&records_path, e.to_string()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => SharedRecords::default(),
                Err(e) => return Err(error(&records_path, e.to_string())),
            };
            // A line cut short by a kill is ended, so the next event starts a line of its own.
            let ends_cut_short = std::fs::read(&timeline_path)
                .is_ok_and(|text| text.last().is_some_and(|last| *last != b'\n'));
            if ends_cut_short {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&timeline_path)
                    .and_then(|mut file| file.write_all(b"\n"))
                    .map_err(|e| error(&timeline_path, e.to_string()))?;
            }
            (read_timeline(state_dir), records)
        } else {
            for path in [&timeline_path, &records_path] {
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(error(path, e.to_string()));
                    }
                    _ => {}
                }
            }
            (Vec::new(), SharedRecords::default())
        };
        Ok(Self {
            timeline: Mutex::new(timeline),
            epochs: Mutex::new(records.epochs),
            holders: Mutex::new(records.holders),
            journal: Some(state_dir.to_path_buf()),
        })
    }

    fn append_to_journal(&self, event: &TimelineEvent) {
        let Some(dir) = &self.journal else {
            return;
        };
        let path = dir.join(TIMELINE_FILE);
        let written = serde_json::to_string(event)
            .map_err(std::io::Error::other)
            .and_then(|line| {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                // One write per line, so a reader never sees two events interleaved.
                file.write_all(format!("{line}\n").as_bytes())
            });
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot journal a timeline event");
        }
    }

    fn save_records(&self) {
        let Some(dir) = &self.journal else {
            return;
        };
        let records = SharedRecords {
            epochs: self.epochs(),
            holders: self.holders(),
        };
        let path = dir.join(RECORDS_FILE);
        let temporary = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&records)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&temporary, text))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot save epochs and dataset holders");
        }
    }

    pub fn push(&self, event: TimelineEvent) {
        if let Ok(mut timeline) = self.timeline.lock() {
            self.append_to_journal(&event);
            timeline.push(event);
        }
    }

    pub fn timeline(&self) -> Vec<TimelineEvent> {
        self.timeline
            .lock()
            .map(|timeline| timeline.clone())
            .unwrap_or_default()
    }

    pub fn set_epochs(&self, id: &str, range: EpochRange) {
        if let Ok(mut epochs) = self.epochs.lock() {
            epochs.insert(id.to_string(), range);
        }
        self.save_records();
    }

    pub fn epochs(&self) -> BTreeMap<String, EpochRange> {
        self.epochs
            .lock()
            .map(|epochs| epochs.clone())
            .unwrap_or_default()
    }

    /// Whether a checkpoint taken after the workload reported `epoch` has reached a standby.
    pub fn standby_holds_epoch(&self, epoch: u32) -> bool {
        let epochs = self.epochs();
        self.timeline().iter().any(|event| match event {
            TimelineEvent::Transfer {
                what,
                purpose: Purpose::Replication,
                error: None,
                ..
            } => what
                .strip_prefix("checkpoint ")
                .and_then(|id| epochs.get(id))
                .is_some_and(|(before, _)| before.is_some_and(|before| before >= epoch)),
            _ => false,
        })
    }

    pub fn add_holder(&self, node: &str) {
        let added = self
            .holders
            .lock()
            .is_ok_and(|mut holders| holders.insert(node.to_string()));
        if added {
            self.save_records();
        }
    }

    pub fn holders(&self) -> BTreeSet<String> {
        self.holders
            .lock()
            .map(|holders| holders.clone())
            .unwrap_or_default()
    }
}

/// Carries out transfers and records them (cheap to clone).
#[derive(Debug, Clone)]
pub struct Worker {
    pub cluster: Arc<LocalCluster>,
    /// The dataset's directory under every node's data root.
    pub dataset: String,
    /// Where the dataset comes from when no node holds a copy any more (its "repository"):
    /// the demo's datasets are generated from their spec, so fetching again means generating.
    pub origin: Option<DatasetSpec>,
    pub shared: Arc<Shared>,
}

impl Worker {
    /// The last epoch a container has reported.
    pub fn last_epoch(&self, node: &str, container: &str) -> Option<u32> {
        let node = self.cluster.node(node).ok()?;
        workload::read_progress(&node.layout().progress(container))
            .ok()?
            .last_epoch()
            .map(|record| record.epoch)
    }

    /// Moves `payload` from `from` to `to` through `from`'s agent; returns the bytes sent.
    #[tracing::instrument(name = "transfer", skip(self, payload), fields(%from, %to))]
    pub async fn transfer(
        &self,
        from: &str,
        to: &str,
        payload: AgentPayload,
        purpose: Purpose,
    ) -> Result<u64, ControllerError> {
        let sender = self.cluster.agent(from)?.clone();
        let address = self.cluster.agent(to)?.transfer_address();
        let what = match &payload {
            AgentPayload::Checkpoint { id } => format!("checkpoint {id}"),
            AgentPayload::Dataset { path } => format!("dataset {path}"),
        };
        let request = TransferRequest {
            payload,
            to: Peer {
                node: to.to_string(),
                address,
            },
        };
        let at = unix_now();
        let started = Instant::now();
        let result = transfer_to_end(&sender, &request, TRANSFER_LIMIT).await;
        let took_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (bytes, bytes_sent, error) = match &result {
            Ok(status) => (
                status.bytes_total,
                sender.bytes_sent(&status.id).unwrap_or(status.bytes_total),
                None,
            ),
            Err(error) => (0, 0, Some(error.to_string())),
        };
        self.shared.push(TimelineEvent::Transfer {
            at,
            from: from.to_string(),
            to: to.to_string(),
            what,
            purpose,
            bytes,
            bytes_sent,
            took_ms,
            error,
        });
        result.map(|_| bytes_sent).map_err(ControllerError::from)
    }

    /// Sends the dataset to `to` unless it holds a verified copy, then verifies it there.
    pub async fn ensure_dataset(
        &self,
        from: &str,
        to: &str,
        purpose: Purpose,
    ) -> Result<u64, ControllerError> {
        if self.shared.holders().contains(to) {
            return Ok(0);
        }
        let sent = self
            .transfer(
                from,
                to,
                AgentPayload::Dataset {
                    path: self.dataset.clone(),
                },
                purpose,
            )
            .await?;
        let dir = self.cluster.node(to)?.layout().dataset(&self.dataset);
        let meta = tokio::task::spawn_blocking(move || workload::verify_dataset(&dir))
            .await
            .map_err(|error| {
                ControllerError::Workload(WorkloadError::Io {
                    path: PathBuf::from("dataset verification task"),
                    source: std::io::Error::other(error),
                })
            })??;
        self.shared.push(TimelineEvent::DatasetVerified {
            at: unix_now(),
            node: to.to_string(),
            bytes: meta.total_bytes(),
            files: meta.files.len(),
        });
        self.shared.add_holder(to);
        Ok(sent)
    }

    /// Fetches the dataset onto `to` from its origin (no node holds a copy any more).
    pub async fn fetch_from_origin(&self, to: &str) -> Result<u64, ControllerError> {
        let Some(spec) = self.origin.clone() else {
            return Err(ControllerError::NoDatasetCopy {
                node: to.to_string(),
            });
        };
        let dir = self.cluster.node(to)?.layout().dataset(&self.dataset);
        let started = Instant::now();
        let at = unix_now();
        let meta = tokio::task::spawn_blocking(move || {
            workload::generate_dataset(&dir, &spec)?;
            workload::verify_dataset(&dir)
        })
        .await
        .map_err(|error| {
            ControllerError::Workload(WorkloadError::Io {
                path: PathBuf::from("dataset fetch task"),
                source: std::io::Error::other(error),
            })
        })??;
        self.shared.push(TimelineEvent::DatasetFetched {
            at,
            node: to.to_string(),
            bytes: meta.total_bytes(),
            took_ms: started.elapsed().as_secs_f64() * 1000.0,
        });
        self.shared.add_holder(to);
        Ok(meta.total_bytes())
    }

    /// Sends checkpoint `id` from `from` to `to` unless `to` holds it already.
    pub async fn copy_checkpoint(
        &self,
        pod: &PodKey,
        from: &str,
        to: &str,
        id: &str,
        purpose: Purpose,
    ) -> Result<u64, ControllerError> {
        if from == to || self.holds_checkpoint(pod, to, id).await {
            return Ok(0);
        }
        let sent = self
            .transfer(
                from,
                to,
                AgentPayload::Checkpoint { id: id.to_string() },
                purpose,
            )
            .await?;
        // The transfer ends when the bytes are there; the receiving agent verifies the archive
        // and moves it into its store afterwards. Nothing may use it before the agent lists it.
        let deadline = Instant::now() + STORE_WAIT;
        while !self.holds_checkpoint(pod, to, id).await {
            if Instant::now() > deadline {
                return Err(ControllerError::NotStored {
                    node: to.to_string(),
                    id: id.to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(sent)
    }

    pub async fn holds_checkpoint(&self, pod: &PodKey, node: &str, id: &str) -> bool {
        match self.cluster.agent(node) {
            Ok(agent) => agent
                .checkpoints(pod)
                .await
                .is_ok_and(|list| list.iter().any(|summary| summary.id == id)),
            Err(_) => false,
        }
    }
}

/// One periodic checkpoint decision, carried out in the background.
#[derive(Debug)]
pub struct CheckpointJob {
    pub worker: Worker,
    pub pod: PodKey,
    /// The container's name in the pod (what the agent is asked to checkpoint).
    pub container_name: String,
    /// The runtime's container id (whose progress file tells the epochs).
    pub container: String,
    pub decision: CheckpointDecision,
    pub retention: automigrate_checkpoint::Retention,
    /// Say once in the timeline that the policy's incremental dumps are not available.
    pub note_incremental: bool,
}

impl CheckpointJob {
    #[tracing::instrument(name = "periodic_checkpoint", skip_all, fields(node = %self.decision.node))]
    pub async fn run(self) {
        let shared = &self.worker.shared;
        let node = self.decision.node.clone();
        if self.note_incremental {
            let supported = match self.worker.cluster.node(&node) {
                Ok(local) => local.incremental_supported().await,
                Err(_) => false,
            };
            if !supported {
                shared.push(TimelineEvent::Problem {
                    at: unix_now(),
                    message: "the policy asks for incremental checkpoints, but this kernel has \
                              no memory dirty tracking (CONFIG_MEM_SOFT_DIRTY): every dump is full"
                        .into(),
                });
            }
        }
        let before = self.worker.last_epoch(&node, &self.container);
        let at = unix_now();
        let started = Instant::now();
        let request = CheckpointRequest {
            pod: self.pod.clone(),
            container: self.container_name.clone(),
            kind: CheckpointKind::Periodic,
        };
        let result = match self.worker.cluster.agent(&node) {
            Ok(agent) => agent.checkpoint(&request).await,
            Err(error) => Err(AgentError::Unreachable {
                node: format!("{node} ({error})"),
            }),
        };
        let after = self.worker.last_epoch(&node, &self.container);
        let summary = match result {
            Ok(summary) => summary,
            Err(error) => {
                shared.push(TimelineEvent::CheckpointFailed {
                    at,
                    node,
                    error: error.to_string(),
                });
                return;
            }
        };
        shared.set_epochs(&summary.id, (before, after));
        shared.push(TimelineEvent::Checkpoint {
            at,
            node: node.clone(),
            id: summary.id.clone(),
            kind: "periodic".into(),
            bytes: summary.bytes,
            freeze_ms: summary.freeze.as_secs_f64() * 1000.0,
            took_ms: started.elapsed().as_secs_f64() * 1000.0,
            epoch_before: before,
            epoch_after: after,
            reason: self.decision.reason.clone(),
        });
        let mut holders = vec![node.clone()];
        for standby in &self.decision.replicate_to {
            let replicated = async {
                self.worker
                    .ensure_dataset(&node, standby, Purpose::Replication)
                    .await?;
                self.worker
                    .copy_checkpoint(&self.pod, &node, standby, &summary.id, Purpose::Replication)
                    .await
            }
            .await;
            match replicated {
                Ok(_) => holders.push(standby.clone()),
                Err(error) => tracing::warn!(%standby, %error, "standby copy failed"),
            }
        }
        let store_pod = automigrate_checkpoint::PodKey::new(&self.pod.namespace, &self.pod.name);
        for holder in holders {
            let agent_does_it = self
                .worker
                .cluster
                .agent(&holder)
                .is_ok_and(|agent| agent.applies_retention());
            if agent_does_it {
                continue;
            }
            if let Ok(local) = self.worker.cluster.node(&holder)
                && let Err(error) = local.store().apply_retention(&store_pod, &self.retention)
            {
                tracing::warn!(node = %holder, %error, "retention failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(message: &str) -> TimelineEvent {
        TimelineEvent::Problem {
            at: 1.5,
            message: message.into(),
        }
    }

    #[test]
    fn a_journaled_record_is_read_back_by_the_next_controller() {
        let dir = tempfile::tempdir().unwrap();
        let first = Shared::journaled(dir.path(), false).unwrap();
        first.push(problem("one"));
        first.set_epochs("ck-1", (Some(3), Some(4)));
        first.add_holder("node-a");
        first.add_holder("node-b");
        first.push(problem("two"));
        drop(first);
        // A kill in the middle of a write leaves half a line: it is skipped.
        let mut journal = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(TIMELINE_FILE))
            .unwrap();
        journal.write_all(br#"{"event":"problem","at":2"#).unwrap();

        let second = Shared::journaled(dir.path(), true).unwrap();
        assert_eq!(second.timeline(), vec![problem("one"), problem("two")]);
        assert_eq!(second.epochs().get("ck-1"), Some(&(Some(3), Some(4))));
        assert_eq!(
            second.holders().into_iter().collect::<Vec<_>>(),
            ["node-a", "node-b"]
        );
        second.push(problem("three"));
        assert_eq!(read_timeline(dir.path()).len(), 3);

        // Starting afresh replaces the journal.
        let fresh = Shared::journaled(dir.path(), false).unwrap();
        assert!(fresh.timeline().is_empty() && fresh.holders().is_empty());
        assert!(read_timeline(dir.path()).is_empty());
    }

    #[test]
    fn an_unjournaled_record_writes_nothing() {
        let shared = Shared::default();
        shared.push(problem("in memory"));
        shared.add_holder("node-a");
        assert_eq!(shared.timeline().len(), 1);
    }
}
