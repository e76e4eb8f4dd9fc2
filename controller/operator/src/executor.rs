//! The migration executor: drives each Migration through the core state machine
//! ([`automigrate_core::migration`]) and persists [`MigrationState`] into the Migration's status
//! after every transition.
//!
//! One call of [`Executor::advance`] runs the driver loop of the core module until the migration
//! has to wait (a transfer running, a pod terminating, a replacement not Ready yet) or ends:
//!
//! 1. gather [`Facts`] from the reflectors (is the source pod running, is its node reachable, is
//!    the replacement running, did a final dump complete) and apply what [`observe`] implies;
//! 2. apply a [`timeout`] if the phase ran past its deadline;
//! 3. carry out [`step`] and apply its outcome.
//!
//! Because every step is idempotent and keyed by persisted data (transfer ids, the
//! deterministic replacement name), a restarted controller re-enters the same loop from the
//! status and resumes or rolls back; nothing is redone blindly.
//!
//! The steps, as this driver carries them out:
//! - **Sync** (`Syncing`): every transfer recorded at the start (dataset, the base of an
//!   incremental dump, or the stored checkpoint when the source is dead) is started on the
//!   sending agent and polled until done; a source that dies meanwhile turns into
//!   [`Event::SourceLost`] and the newest stored checkpoint is used.
//! - **Checkpoint**: a final checkpoint of the pod's first container on the source's agent.
//! - **Transfer**: the final (or stored) checkpoint to the target's agent.
//! - **Fence**: a live source pod is deleted and the step waits until it is gone. A dead node is
//!   fenced only when its Lease has expired (renewTime older than the policy's lease timeout):
//!   a fresh or missing Lease means the node may only be partitioned and still running the pod,
//!   so the step waits, and the phase deadline fails the migration without ever starting a
//!   second copy. Once the Lease has expired, the node gets the `node.kubernetes.io/out-of-service`
//!   taint (`NoExecute`), the Kubernetes signal for non-graceful node shutdown: the pod
//!   garbage collector may then force-delete its pods, and a kubelet that comes back evicts them
//!   instead of resuming. With [`DeadNodeFencing::Administrator`] the controller waits for a
//!   person to set that taint instead of setting it. The taint is added alone, from a fresh read
//!   of the node with a resourceVersion precondition ([`Writer::add_node_taint`]), never by
//!   writing back the cached list: taints set meanwhile by others (the node lifecycle
//!   controller's `unreachable`) survive.
//! - **Restore**: the replacement pod ([`crate::replacement`]) on the target, from the
//!   checkpoint image the target's agent builds (transparent) or with the checkpoint mounted
//!   (application), or fresh when no checkpoint survives.
//! - **Verify**: the replacement reports Ready; then the old pod object is deleted (forcibly,
//!   when its node is dead) and Events go to both pods and the Migration.
//! - **Roll back**: the replacement is deleted first if it was started, then the workload comes
//!   back as the state machine says (kept running, restored on the source, or restarted fresh).
//!   A rollback that starts the workload again (restored on the source, or fresh) fences the
//!   source first if the migration had not (the Fence step above): the dumped source pod must
//!   be gone before a copy starts.
//!
//! Failures: an unreachable agent or a transient API error is retryable. The state machine
//! keeps the phase and records `retryAt` (backoff from the attempt count); this driver does not
//! carry out the step again before then, and the phase deadline ends the retrying. So an agent
//! outage shorter than the phase's timeout delays a migration but never ends it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_core::annotations::CheckpointMode;
use automigrate_core::migration::{
    self, Event, Facts, MigrationState, Phase, RollbackAction, Step, observe, step, timeout,
};
use automigrate_core::model::{CheckpointInfo, PodRef};
use automigrate_core::units;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::agent::{AgentError, CheckpointKind, NodeAgent, TransferState};
use crate::clock::Clock;
use crate::crd::{Migration, MigrationStatus, StoredCheckpoint, TransferPayload, TransferRecord};
use crate::replacement::{self, Restore};
use crate::snapshot::{self, is_ready, is_terminated};
use crate::stores::Stores;
use crate::writer::{WriteError, Writer};

/// The taint that marks a node as shut down (non-graceful node shutdown).
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// Who confirms that a dead node's pods cannot run any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadNodeFencing {
    /// The controller sets the out-of-service taint once the node's Lease has expired.
    #[default]
    Taint,
    /// The controller waits for an administrator to set the out-of-service taint.
    Administrator,
}

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub dead_node_fencing: DeadNodeFencing,
    /// Directory of the agents' checkpoint store on every node (application-mode mounts).
    pub checkpoint_root: String,
    /// Most transitions one `advance` makes before yielding to other migrations.
    pub max_transitions: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            dead_node_fencing: DeadNodeFencing::Taint,
            checkpoint_root: "/var/lib/automigrate/checkpoints".into(),
            max_transitions: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("migration {0} has no namespace or name")]
    Unnamed(String),
    #[error("writing the migration's status failed: {0}")]
    Persist(#[source] WriteError),
    #[error("state machine refused the event: {0}")]
    Transition(#[from] migration::TransitionError),
}

impl ExecError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Unnamed(_) => "unnamed",
            Self::Persist(error) => error.metric_label(),
            Self::Transition(_) => "transition",
        }
    }
}

/// What carrying out one step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Done { checkpoint_id: Option<String> },
    Failed { reason: String, retryable: bool },
    Waiting { why: String },
}

impl Outcome {
    fn done() -> Self {
        Self::Done {
            checkpoint_id: None,
        }
    }

    fn waiting(why: impl Into<String>) -> Self {
        Self::Waiting { why: why.into() }
    }

    fn agent(error: &AgentError) -> Self {
        Self::Failed {
            reason: error.to_string(),
            retryable: error.retryable(),
        }
    }

    fn write(error: &WriteError) -> Self {
        Self::Failed {
            reason: error.to_string(),
            retryable: !matches!(error, WriteError::NotLeader),
        }
    }
}

/// Where one `advance` left a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advanced {
    pub phase: Phase,
    /// Why it stopped here (the step it waits on), when not terminal.
    pub waiting: Option<String>,
}

/// Drives Migrations. Holds the newest status it wrote per Migration, because the reflector may
/// not have seen its own last write yet when the next `advance` comes.
#[derive(Debug)]
pub struct Executor {
    stores: Stores,
    writer: Writer,
    agent: Arc<dyn NodeAgent>,
    config: ExecutorConfig,
    written: Mutex<BTreeMap<String, Migration>>,
    /// Measures how long the steps of one `advance` take (see [`Executor::with_clock`]).
    clock: Option<Arc<dyn Clock>>,
}

fn pod_reference(namespace: &str, name: &str, uid: Option<&str>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid: uid.map(String::from),
        ..ObjectReference::default()
    }
}

fn migration_key(migration: &Migration) -> String {
    migration.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            migration.namespace().unwrap_or_default(),
            migration.name_any()
        )
    })
}

/// The Ready/Progressing conditions for a status.
fn conditions(state: &MigrationState, generation: Option<i64>, now: Timestamp) -> Vec<Condition> {
    let time = Time(now);
    let message = state.message.clone().unwrap_or_default();
    let (ready, ready_reason) = match state.phase {
        Phase::Succeeded => ("True", "Succeeded".to_string()),
        phase if phase.is_terminal() => ("False", phase.to_string()),
        phase => ("Unknown", phase.to_string()),
    };
    let progressing = if state.phase.is_terminal() {
        "False"
    } else {
        "True"
    };
    vec![
        Condition {
            type_: "Ready".into(),
            status: ready.into(),
            reason: ready_reason,
            message: message.clone(),
            last_transition_time: time.clone(),
            observed_generation: generation,
        },
        Condition {
            type_: "Progressing".into(),
            status: progressing.into(),
            reason: state.phase.to_string(),
            message,
            last_transition_time: time,
            observed_generation: generation,
        },
    ]
}

/// Keeps each condition's `lastTransitionTime` unless its status changed.
fn merge_conditions(previous: &[Condition], mut next: Vec<Condition>) -> Vec<Condition> {
    for condition in &mut next {
        if let Some(old) = previous
            .iter()
            .find(|old| old.type_ == condition.type_ && old.status == condition.status)
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    next
}

impl Executor {
    pub fn new(
        stores: Stores,
        writer: Writer,
        agent: Arc<dyn NodeAgent>,
        config: ExecutorConfig,
    ) -> Self {
        Self {
            stores,
            writer,
            agent,
            config,
            written: Mutex::default(),
            clock: None,
        }
    }

    /// Lets `advance` see time pass while it works. A step may take long (a synchronous final
    /// checkpoint, an API call), and several phases may end in one `advance`; without a clock
    /// every transition of one `advance` is stamped with the `now` it was called with, and those
    /// phases read as 0 s in the history, the phase-duration histogram and the downtime. With
    /// it, each transition is stamped `now` plus the clock's progress since the call began (a
    /// manual clock that nobody moves keeps tests exact).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The newest version of a Migration this executor knows: its own last write, unless the
    /// reflector has a newer one.
    fn newest(&self, migration: &Migration) -> Migration {
        let key = migration_key(migration);
        let Ok(written) = self.written.lock() else {
            return migration.clone();
        };
        match written.get(&key) {
            Some(ours) => {
                let version = |m: &Migration| {
                    m.metadata
                        .resource_version
                        .as_deref()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if version(migration) > version(ours) {
                    migration.clone()
                } else {
                    ours.clone()
                }
            }
            None => migration.clone(),
        }
    }

    /// Migrations that still need driving: non-terminal, with a status.
    pub fn active(&self) -> Vec<Migration> {
        self.stores
            .migrations
            .state()
            .iter()
            .map(|migration| self.newest(migration))
            .filter(|migration| migration.phase().is_some_and(|phase| !phase.is_terminal()))
            .collect()
    }

    /// Runs the driver loop for one Migration until it must wait or has ended.
    #[tracing::instrument(level = "info", skip_all, fields(migration = %migration.name_any(), namespace = migration.namespace().unwrap_or_default()))]
    pub async fn advance(
        &self,
        migration: &Migration,
        now: Timestamp,
    ) -> Result<Advanced, ExecError> {
        let mut current = self.newest(migration);
        let mut waiting = None;
        // `now` moves with the clock while this call works (see `with_clock`).
        let base = now;
        let clock_at_start = self.clock.as_ref().map(|clock| clock.now());
        let current_time = || match (&self.clock, clock_at_start) {
            (Some(clock), Some(start)) => units::after(base, units::age(clock.now(), start)),
            _ => base,
        };
        for _ in 0..self.config.max_transitions {
            let now = current_time();
            let Some(status) = current.status.clone() else {
                return Ok(Advanced {
                    phase: Phase::Pending,
                    waiting: Some("not started by the decision pass yet".into()),
                });
            };
            if status.state.phase.is_terminal() {
                break;
            }
            let facts = self.facts(&current, &status).await;
            let implied = observe(&status.state, &facts)
                .or_else(|| self.source_lost(&status, &facts))
                .or_else(|| timeout(&status.state, &status.limits, now));
            if let Some(event) = implied {
                current = self.transition(&current, status, &event, now).await?;
                continue;
            }
            // A failed step is tried again only once its backoff has passed (persisted, so a
            // restarted controller keeps the schedule); the deadline above still applies.
            if let Some(retry_at) = status.state.retry_at.filter(|at| *at > now) {
                waiting = Some(format!("retrying a failed step at {retry_at}"));
                break;
            }
            let mut working = status.clone();
            let outcome = self.perform(&current, &mut working, now).await;
            // The step may have taken a while: what it led to happened now.
            let now = current_time();
            match outcome {
                Outcome::Done { checkpoint_id } => {
                    current = self
                        .transition(
                            &current,
                            working,
                            &Event::StepSucceeded { checkpoint_id },
                            now,
                        )
                        .await?;
                }
                Outcome::Failed { reason, retryable } => {
                    tracing::warn!(%reason, retryable, phase = %working.state.phase, "step failed");
                    let before = working.state.phase;
                    current = self
                        .transition(
                            &current,
                            working,
                            &Event::StepFailed { reason, retryable },
                            now,
                        )
                        .await?;
                    if current.phase() == Some(before) {
                        // A retry: give the failing party until the next round.
                        waiting = Some("retrying a failed step".into());
                        break;
                    }
                }
                Outcome::Waiting { why } => {
                    if working != status {
                        current = self.persist(&current, working, now).await?;
                    }
                    tracing::debug!(%why, "waiting");
                    waiting = Some(why);
                    break;
                }
            }
        }
        let phase = current.phase().unwrap_or(Phase::Pending);
        Ok(Advanced {
            phase,
            waiting: if phase.is_terminal() { None } else { waiting },
        })
    }

    fn source_lost(&self, status: &MigrationStatus, facts: &Facts) -> Option<Event> {
        let early = matches!(status.state.phase, Phase::Pending | Phase::Syncing);
        (early && status.state.source_alive && facts.source_running.is_none())
            .then_some(Event::SourceLost)
    }

    async fn persist(
        &self,
        current: &Migration,
        mut status: MigrationStatus,
        now: Timestamp,
    ) -> Result<Migration, ExecError> {
        let namespace = current
            .namespace()
            .ok_or_else(|| ExecError::Unnamed(current.name_any()))?;
        status.observed_generation = current.metadata.generation;
        status.conditions = merge_conditions(
            &status.conditions,
            conditions(&status.state, current.metadata.generation, now),
        );
        let updated = self
            .writer
            .patch_migration_status(&namespace, &current.name_any(), status)
            .await
            .map_err(ExecError::Persist)?;
        if let Ok(mut written) = self.written.lock() {
            written.insert(migration_key(&updated), updated.clone());
        }
        Ok(updated)
    }

    async fn transition(
        &self,
        current: &Migration,
        mut status: MigrationStatus,
        event: &Event,
        now: Timestamp,
    ) -> Result<Migration, ExecError> {
        let before = status.state.phase;
        let recorded = status.state.history.len();
        status.state = migration::apply(&status.state, event, &status.limits, now)?;
        let after = status.state.phase;
        let updated = self.persist(current, status.clone(), now).await?;
        // Every phase (or escalated rollback stage) this event ended, timed from the persisted
        // phase timestamps.
        for (phase, seconds) in ended_phase_seconds(&status.state, recorded) {
            metrics::histogram!(crate::metrics::PHASE_SECONDS, "phase" => phase.to_string())
                .record(seconds);
        }
        if before != after {
            log_phase_change(before, after, status.state.message.as_deref());
            let warning = matches!(
                after,
                Phase::RollingBack | Phase::Failed | Phase::RolledBack | Phase::Restarted
            );
            self.writer
                .event(
                    updated.object_ref(&()),
                    if warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    &after.to_string(),
                    status
                        .state
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("{before} → {after}")),
                    "Migrate",
                )
                .await;
            if after.is_terminal() {
                self.finished(&updated, &status).await;
            }
        }
        Ok(updated)
    }

    /// Metrics and pod Events when a migration ends.
    async fn finished(&self, migration: &Migration, status: &MigrationStatus) {
        let state = &status.state;
        let reason = migration
            .spec
            .trigger
            .map(|trigger| format!("{trigger:?}"))
            .unwrap_or_else(|| "Manual".into());
        metrics::counter!(crate::metrics::MIGRATIONS, "result" => state.phase.to_string(), "reason" => reason)
            .increment(1);
        if let Some(downtime) = state.downtime {
            metrics::histogram!(crate::metrics::DOWNTIME_SECONDS).record(downtime.as_secs_f64());
        }
        let namespace = migration.namespace().unwrap_or_default();
        let message = state.message.clone().unwrap_or_default();
        let (event_type, reason) = match state.phase {
            Phase::Succeeded => (EventType::Normal, "Migrated"),
            Phase::RolledBack => (EventType::Warning, "MigrationRolledBack"),
            Phase::Restarted => (EventType::Warning, "MigrationRestarted"),
            _ => (EventType::Warning, "MigrationFailed"),
        };
        let note = format!(
            "migration {} from {} to {}: {} ({message})",
            migration.name_any(),
            state.source,
            state.target,
            state.phase
        );
        self.writer
            .event(
                pod_reference(
                    &namespace,
                    &migration.spec.pod,
                    status.source_pod_uid.as_deref(),
                ),
                event_type,
                reason,
                note.clone(),
                "Migrate",
            )
            .await;
        if state.phase == Phase::Succeeded
            && let Some(replacement) = &status.replacement_pod
        {
            let uid = self
                .stores
                .pod(&namespace, replacement)
                .and_then(|pod| pod.metadata.uid.clone());
            self.writer
                .event(
                    pod_reference(&namespace, replacement, uid.as_deref()),
                    EventType::Normal,
                    "Restored",
                    note,
                    "Migrate",
                )
                .await;
        }
    }

    fn source_pod(&self, migration: &Migration, status: &MigrationStatus) -> Option<Arc<Pod>> {
        let namespace = migration.namespace()?;
        let pod = self.stores.pod(&namespace, &migration.spec.pod)?;
        match &status.source_pod_uid {
            Some(uid) if pod.metadata.uid.as_deref() != Some(uid.as_str()) => None,
            _ => Some(pod),
        }
    }

    /// A node is unreachable when its Ready condition is not True, or it is gone.
    fn node_unreachable(&self, node: &str) -> bool {
        let Some(node) = self.stores.node(node) else {
            return true;
        };
        !node
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|condition| condition.type_ == "Ready" && condition.status == "True")
            })
    }

    /// How long ago the node's kubelet last renewed its Lease; `None` if there is no Lease.
    fn lease_age(&self, node: &str, now: Timestamp) -> Option<Duration> {
        let lease = self.stores.node_lease(node)?;
        let renewed = lease.spec.as_ref()?.renew_time.as_ref()?.0;
        Some(units::age(now, renewed))
    }

    async fn facts(&self, migration: &Migration, status: &MigrationStatus) -> Facts {
        let state = &status.state;
        let source_running = if self.node_unreachable(&state.source) {
            None
        } else {
            Some(self.source_pod(migration, status).is_some_and(|pod| {
                !is_terminated(&pod) && pod.metadata.deletion_timestamp.is_none()
            }))
        };
        let target_running = status
            .replacement_pod
            .as_deref()
            .zip(migration.namespace())
            .and_then(|(name, namespace)| self.stores.pod(&namespace, name))
            .is_some_and(|pod| {
                pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            });
        let checkpoint_complete = if state.phase == Phase::Checkpointing {
            let pod = PodRef::new(
                migration.namespace().unwrap_or_default(),
                &migration.spec.pod,
            );
            match self.agent.checkpoints(&state.source, &pod).await {
                Ok(list) => list.iter().any(|checkpoint| {
                    checkpoint.verified && checkpoint.created_at >= state.phase_started_at
                }),
                Err(_) => false,
            }
        } else {
            false
        };
        Facts {
            source_running,
            target_running,
            checkpoint_complete,
        }
    }

    async fn perform(
        &self,
        migration: &Migration,
        status: &mut MigrationStatus,
        now: Timestamp,
    ) -> Outcome {
        match step(&status.state) {
            Step::SyncData => match status.state.phase {
                Phase::Pending => Outcome::done(),
                _ => self.sync(migration, status).await,
            },
            Step::Checkpoint => self.checkpoint(migration, status).await,
            Step::TransferCheckpoint => self.transfer_checkpoint(migration, status).await,
            Step::Fence { source_alive } => self.fence(migration, status, source_alive, now).await,
            Step::Restore => self.restore(migration, status).await,
            Step::Verify => self.verify(migration, status, now).await,
            Step::RollBack {
                stop_target,
                action,
            } => self.roll_back(migration, status, stop_target, action).await,
            Step::Done => Outcome::waiting("ended"),
        }
    }

    /// Starts or polls every transfer in `status.transfers` that `select` picks.
    async fn drive_transfers(
        &self,
        status: &mut MigrationStatus,
        select: impl Fn(&TransferRecord) -> bool,
    ) -> Outcome {
        let mut running = Vec::new();
        for record in status
            .transfers
            .iter_mut()
            .filter(|record| !record.done && select(record))
        {
            let progress = match &record.id {
                None => {
                    self.agent
                        .start_transfer(&record.from, &record.payload, &record.to)
                        .await
                }
                Some(id) => self.agent.transfer_status(&record.from, id).await,
            };
            let progress = match progress {
                Ok(progress) => progress,
                Err(AgentError::NotFound { .. }) => {
                    // The sender forgot it (restarted): start again; the receiver's journal
                    // keeps what already arrived.
                    record.id = None;
                    running.push(format!("{} restarting", describe(record)));
                    continue;
                }
                Err(error) => return Outcome::agent(&error),
            };
            let payload = if record.payload.checkpoint.is_some() {
                "checkpoint"
            } else {
                "dataset"
            };
            let delta = progress.bytes_done.saturating_sub(record.bytes_done);
            metrics::counter!(crate::metrics::BYTES_MOVED, "payload" => payload).increment(delta);
            status.bytes_moved = status.bytes_moved.saturating_add(delta);
            record.id = Some(progress.id.clone());
            record.bytes_total = progress.bytes_total;
            record.bytes_done = progress.bytes_done;
            match progress.state {
                TransferState::Succeeded => record.done = true,
                TransferState::Running => running.push(format!(
                    "{} {}/{} bytes",
                    describe(record),
                    progress.bytes_done,
                    progress.bytes_total
                )),
                TransferState::Failed => {
                    record.id = None;
                    return Outcome::Failed {
                        reason: format!(
                            "{} failed: {}",
                            describe(record),
                            progress.error.unwrap_or_else(|| "no reason given".into())
                        ),
                        retryable: true,
                    };
                }
            }
        }
        if running.is_empty() {
            Outcome::done()
        } else {
            Outcome::waiting(format!("transfers running: {}", running.join(", ")))
        }
    }

    /// The newest stored checkpoint held on a node other than the (dead) source.
    fn find_stored(
        &self,
        migration: &Migration,
        status: &MigrationStatus,
    ) -> Option<StoredCheckpoint> {
        let info: CheckpointInfo = self
            .source_pod(migration, status)
            .and_then(|pod| snapshot::latest_checkpoint(&pod))
            .or_else(|| {
                let record = status.source_pod.as_ref()?;
                let pod: Pod = serde_json::from_value(record.clone()).ok()?;
                snapshot::latest_checkpoint(&pod)
            })?;
        let holders: Vec<&String> = info
            .held_on
            .iter()
            .filter(|node| **node != status.state.source && !self.node_unreachable(node))
            .collect();
        let from = holders
            .iter()
            .find(|node| ***node == status.state.target)
            .or_else(|| holders.first())?;
        Some(StoredCheckpoint {
            id: info.id.clone(),
            from: (*from).clone(),
        })
    }

    /// Makes sure a dead-source migration knows its stored checkpoint and has its transfer.
    fn ensure_stored_transfer(&self, migration: &Migration, status: &mut MigrationStatus) {
        if status.state.source_alive || status.state.checkpoint_id.is_some() {
            return;
        }
        if status.stored_checkpoint.is_none() {
            status.stored_checkpoint = self.find_stored(migration, status);
        }
        if let Some(stored) = status.stored_checkpoint.clone()
            && stored.from != status.state.target
            && !status
                .transfers
                .iter()
                .any(|record| record.payload.checkpoint.as_deref() == Some(stored.id.as_str()))
        {
            status.transfers.push(TransferRecord {
                payload: TransferPayload::checkpoint(stored.id),
                from: stored.from,
                to: status.state.target.clone(),
                id: None,
                bytes_total: 0,
                bytes_done: 0,
                done: false,
            });
        }
    }

    async fn sync(&self, migration: &Migration, status: &mut MigrationStatus) -> Outcome {
        self.ensure_stored_transfer(migration, status);
        // A dead source cannot send: its transfers are dropped (the dataset must be fetched
        // again by the workload; the checkpoint comes from a replica).
        if !status.state.source_alive {
            let source = status.state.source.clone();
            status
                .transfers
                .retain(|record| record.from != source || record.done);
        }
        self.drive_transfers(status, |_| true).await
    }

    async fn checkpoint(&self, migration: &Migration, status: &MigrationStatus) -> Outcome {
        let Some(container) = status
            .source_pod
            .as_ref()
            .and_then(|pod| pod.pointer("/spec/containers/0/name"))
            .and_then(|name| name.as_str())
        else {
            return Outcome::Failed {
                reason: "the recorded source pod has no container".into(),
                retryable: false,
            };
        };
        let pod = PodRef::new(
            migration.namespace().unwrap_or_default(),
            &migration.spec.pod,
        );
        match self
            .agent
            .checkpoint(&status.state.source, &pod, container, CheckpointKind::Final)
            .await
        {
            Ok(taken) => Outcome::Done {
                checkpoint_id: Some(taken.id),
            },
            Err(error) => Outcome::agent(&error),
        }
    }

    async fn transfer_checkpoint(
        &self,
        migration: &Migration,
        status: &mut MigrationStatus,
    ) -> Outcome {
        self.ensure_stored_transfer(migration, status);
        let (id, from) = match (&status.state.checkpoint_id, &status.stored_checkpoint) {
            (Some(id), _) => (id.clone(), status.state.source.clone()),
            (None, Some(stored)) => (stored.id.clone(), stored.from.clone()),
            (None, None) => return Outcome::done(),
        };
        if from == status.state.target {
            return Outcome::done();
        }
        if !status
            .transfers
            .iter()
            .any(|record| record.payload.checkpoint.as_deref() == Some(id.as_str()))
        {
            status.transfers.push(TransferRecord {
                payload: TransferPayload::checkpoint(id.clone()),
                from,
                to: status.state.target.clone(),
                id: None,
                bytes_total: 0,
                bytes_done: 0,
                done: false,
            });
        }
        self.drive_transfers(status, |record| {
            record.payload.checkpoint.as_deref() == Some(id.as_str())
        })
        .await
    }

    async fn fence(
        &self,
        migration: &Migration,
        status: &MigrationStatus,
        source_alive: bool,
        now: Timestamp,
    ) -> Outcome {
        let node = status.state.source.clone();
        let lease_expired = self
            .lease_age(&node, now)
            .is_some_and(|age| age >= status.lease_timeout);
        if source_alive && !lease_expired {
            return self.stop_source(migration, status).await;
        }
        let Some(node_object) = self.stores.node(&node) else {
            return if self.stores.node_lease(&node).is_none() {
                Outcome::done()
            } else {
                Outcome::waiting(format!(
                    "node {node} is not in the node list but its Lease exists"
                ))
            };
        };
        match self.lease_age(&node, now) {
            None => {
                return Outcome::waiting(format!(
                    "node {node} has no Lease renewal on record: it may be partitioned, not dead; not fencing"
                ));
            }
            Some(age) if age < status.lease_timeout => {
                return Outcome::waiting(format!(
                    "node {node} renewed its Lease {} ago (timeout {}): it may be partitioned, not dead; not fencing",
                    units::format_duration(age),
                    units::format_duration(status.lease_timeout)
                ));
            }
            Some(_) => {}
        }
        let taints: Vec<Taint> = node_object
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.clone())
            .unwrap_or_default();
        if taints.iter().any(|taint| taint.key == OUT_OF_SERVICE_TAINT) {
            return Outcome::done();
        }
        match self.config.dead_node_fencing {
            DeadNodeFencing::Administrator => Outcome::waiting(format!(
                "node {node}'s Lease expired; waiting for an administrator to confirm shutdown with the {OUT_OF_SERVICE_TAINT} taint"
            )),
            DeadNodeFencing::Taint => {
                // Only our taint is added, from a fresh read with a precondition: the cached
                // list may miss a taint set meanwhile, which a whole-list write would drop.
                let taint = Taint {
                    key: OUT_OF_SERVICE_TAINT.into(),
                    value: Some("nodeshutdown".into()),
                    effect: "NoExecute".into(),
                    time_added: Some(Time(now)),
                };
                if let Err(error) = self.writer.add_node_taint(&node, taint).await {
                    return Outcome::write(&error);
                }
                self.writer
                    .event(
                        node_object.object_ref(&()),
                        EventType::Warning,
                        "OutOfService",
                        format!(
                            "Lease not renewed for over {}: tainted {OUT_OF_SERVICE_TAINT} to fence pods before migration {}",
                            units::format_duration(status.lease_timeout),
                            migration.name_any()
                        ),
                        "Fence",
                    )
                    .await;
                Outcome::done()
            }
        }
    }

    /// Stops a live source: delete its pod and wait until it is gone.
    async fn stop_source(&self, migration: &Migration, status: &MigrationStatus) -> Outcome {
        let Some(pod) = self.source_pod(migration, status) else {
            return Outcome::done();
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return Outcome::waiting("the source pod is terminating");
        }
        let namespace = migration.namespace().unwrap_or_default();
        match self
            .writer
            .delete_pod(&namespace, &pod.name_any(), pod.metadata.uid.clone(), None)
            .await
        {
            Ok(()) => Outcome::waiting("the source pod was asked to stop"),
            Err(error) => Outcome::write(&error),
        }
    }

    fn checkpoint_to_restore(status: &MigrationStatus) -> Option<String> {
        status.state.checkpoint_id.clone().or_else(|| {
            status
                .stored_checkpoint
                .as_ref()
                .map(|stored| stored.id.clone())
        })
    }

    /// Creates a pod from the recorded source on `node`, unless one named `name` exists.
    async fn create_pod(
        &self,
        migration: &Migration,
        status: &MigrationStatus,
        name: &str,
        node: &str,
        fresh: bool,
    ) -> Outcome {
        let namespace = migration.namespace().unwrap_or_default();
        if self.stores.pod(&namespace, name).is_some() {
            return Outcome::done();
        }
        let Some(record) = status.source_pod.as_ref() else {
            return Outcome::Failed {
                reason: "the source pod was not recorded when the migration began".into(),
                retryable: false,
            };
        };
        let checkpoint = if fresh {
            None
        } else {
            Self::checkpoint_to_restore(status)
        };
        let restore = match (checkpoint, status.mode) {
            (None, _) => Restore::Fresh,
            (Some(id), CheckpointMode::Transparent) => {
                match self.agent.build_image(node, &id).await {
                    Ok(image) => Restore::Transparent {
                        image,
                        checkpoint_id: id,
                    },
                    Err(error) => return Outcome::agent(&error),
                }
            }
            // The agents' store layout: `<root>/<namespace>/<pod>/<id>/`, keyed by the pod the
            // checkpoint was taken of.
            (Some(id), CheckpointMode::Application) => Restore::Application {
                host_path: format!(
                    "{}/{namespace}/{}/{id}",
                    self.config.checkpoint_root.trim_end_matches('/'),
                    migration.spec.pod
                ),
                checkpoint_id: id,
            },
        };
        let pod = match replacement::build(record, name, node, &migration.name_any(), &restore) {
            Ok(pod) => pod,
            Err(error) => {
                return Outcome::Failed {
                    reason: error.to_string(),
                    retryable: false,
                };
            }
        };
        match self.writer.create_pod(pod).await {
            Ok(_) => Outcome::done(),
            Err(error) if error.is_conflict() => Outcome::done(),
            Err(error) => Outcome::write(&error),
        }
    }

    fn replacement_name(migration: &Migration, status: &MigrationStatus) -> Option<String> {
        let record: Pod = serde_json::from_value(status.source_pod.clone()?).ok()?;
        let uid = migration
            .metadata
            .uid
            .clone()
            .unwrap_or_else(|| migration.name_any());
        Some(replacement::replacement_name(&record, &uid))
    }

    async fn restore(&self, migration: &Migration, status: &mut MigrationStatus) -> Outcome {
        let Some(name) = Self::replacement_name(migration, status) else {
            return Outcome::Failed {
                reason: "the source pod was not recorded when the migration began".into(),
                retryable: false,
            };
        };
        status.replacement_pod = Some(name.clone());
        let target = status.state.target.clone();
        self.create_pod(migration, status, &name, &target, false)
            .await
    }

    async fn verify(
        &self,
        migration: &Migration,
        status: &MigrationStatus,
        now: Timestamp,
    ) -> Outcome {
        let namespace = migration.namespace().unwrap_or_default();
        let Some(name) = status.replacement_pod.as_deref() else {
            return Outcome::Failed {
                reason: "no replacement pod recorded".into(),
                retryable: false,
            };
        };
        let Some(pod) = self.stores.pod(&namespace, name) else {
            return Outcome::waiting(format!("replacement pod {name} not seen yet"));
        };
        if is_terminated(&pod) {
            return Outcome::Failed {
                reason: format!("replacement pod {name} terminated before becoming Ready"),
                retryable: false,
            };
        }
        if !is_ready(&pod) {
            return Outcome::waiting(format!("replacement pod {name} is not Ready yet"));
        }
        // The replacement runs: remove what is left of the source (on a dead node the object
        // lingers until deleted; the kubelet that would confirm a graceful delete is gone).
        if let Some(old) = self.source_pod(migration, status) {
            let dead = self
                .lease_age(&status.state.source, now)
                .is_some_and(|age| age >= status.lease_timeout);
            let grace = dead.then_some(0);
            if let Err(error) = self
                .writer
                .delete_pod(&namespace, &old.name_any(), old.metadata.uid.clone(), grace)
                .await
            {
                return Outcome::write(&error);
            }
        }
        Outcome::done()
    }

    async fn roll_back(
        &self,
        migration: &Migration,
        status: &mut MigrationStatus,
        stop_target: bool,
        action: RollbackAction,
    ) -> Outcome {
        let namespace = migration.namespace().unwrap_or_default();
        if stop_target
            && let Some(name) = status.replacement_pod.clone()
            && let Some(pod) = self.stores.pod(&namespace, &name)
        {
            if pod.metadata.deletion_timestamp.is_none()
                && let Err(error) = self
                    .writer
                    .delete_pod(&namespace, &name, pod.metadata.uid.clone(), None)
                    .await
            {
                return Outcome::write(&error);
            }
            return Outcome::waiting(format!("stopping the replacement pod {name}"));
        }
        let Some(base) = Self::replacement_name(migration, status) else {
            return match action {
                RollbackAction::KeepSource => Outcome::done(),
                _ => Outcome::Failed {
                    reason: "the source pod was not recorded when the migration began".into(),
                    retryable: false,
                },
            };
        };
        let name = format!("{}-r", base.chars().take(61).collect::<String>());
        match action {
            RollbackAction::KeepSource => Outcome::done(),
            RollbackAction::RestoreOnSource => {
                let source = status.state.source.clone();
                status.replacement_pod = Some(name.clone());
                self.create_pod(migration, status, &name, &source, false)
                    .await
            }
            RollbackAction::RestartFresh => {
                let target = status.state.target.clone();
                status.replacement_pod = Some(name.clone());
                self.create_pod(migration, status, &name, &target, true)
                    .await
            }
        }
    }
}

/// The phases recorded in `state.history` from index `from` on, with their durations in
/// seconds: from the phase's start to the start of what followed it (the next entry, or the
/// current phase), as persisted.
fn ended_phase_seconds(state: &MigrationState, from: usize) -> Vec<(Phase, f64)> {
    let history = &state.history;
    (from..history.len())
        .map(|index| {
            let timing = &history[index];
            let next_started = history
                .get(index + 1)
                .map_or(state.phase_started_at, |next| next.started_at);
            let seconds = units::age(next_started, timing.started_at).as_secs_f64();
            (timing.phase, seconds)
        })
        .collect()
}

/// The log line of a phase change. The migration's message goes in `detail`: a field named
/// `message` would collide with the event's own message in JSON output (two `"message"` keys,
/// and readers keep one).
fn log_phase_change(before: Phase, after: Phase, detail: Option<&str>) {
    tracing::info!(
        from = %before,
        to = %after,
        detail = detail.unwrap_or(""),
        "migration phase changed"
    );
}

fn describe(record: &TransferRecord) -> String {
    let what = match (&record.payload.checkpoint, &record.payload.dataset) {
        (Some(id), _) => format!("checkpoint {id}"),
        (None, Some(path)) => format!("dataset {path}"),
        (None, None) => "transfer".to_string(),
    };
    format!("{what} {} → {}", record.from, record.to)
}

/// Migrations this executor drives at the moment, so the loop never runs two `advance`s of one
/// Migration at once.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<BTreeSet<String>>>,
}

impl InFlight {
    pub fn try_start(&self, migration: &Migration) -> Option<InFlightGuard> {
        let key = migration_key(migration);
        let mut keys = self.keys.lock().ok()?;
        keys.insert(key.clone()).then(|| InFlightGuard {
            keys: self.keys.clone(),
            key,
        })
    }
}

#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Mutex<BTreeSet<String>>>,
    key: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `io::Write` into a shared buffer, to read what a subscriber printed.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A phase change's JSON log line has one `message` key (the event's), and the migration's
    /// message under `detail`. It used to carry a field named `message` too: two keys, and
    /// JSON readers keep only one of them.
    #[test]
    fn a_phase_change_logs_one_message_key_and_the_detail() {
        let captured = Captured::default();
        for flatten in [false, true] {
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(flatten)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                log_phase_change(
                    Phase::Transferring,
                    Phase::RollingBack,
                    Some("Transferring failed: agent unreachable"),
                );
            });
            let text = String::from_utf8(std::mem::take(&mut *captured.0.lock().unwrap())).unwrap();
            let line = text.lines().next().unwrap();
            assert_eq!(line.matches("\"message\"").count(), 1, "{line}");
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let fields = if flatten { &value } else { &value["fields"] };
            assert_eq!(fields["message"], "migration phase changed", "{line}");
            assert_eq!(
                fields["detail"], "Transferring failed: agent unreachable",
                "{line}"
            );
            assert_eq!(fields["to"], "RollingBack", "{line}");
        }
    }

    #[test]
    fn ended_phases_are_timed_from_the_persisted_timestamps() {
        let at = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let mut state = MigrationState::new("a".into(), "b".into(), true, at(0), None);
        let limits = migration::Limits::from_policy(&automigrate_core::policy::Policy::default());
        let ok = Event::StepSucceeded {
            checkpoint_id: None,
        };
        state = migration::apply(&state, &ok, &limits, at(0)).unwrap();
        state = migration::apply(&state, &ok, &limits, at(7)).unwrap();
        state = migration::apply(&state, &ok, &limits, at(27)).unwrap();
        assert_eq!(state.phase, Phase::Transferring);
        let timed = ended_phase_seconds(&state, 0);
        assert_eq!(
            timed,
            [
                (Phase::Pending, 0.0),
                (Phase::Syncing, 7.0),
                (Phase::Checkpointing, 20.0)
            ]
        );
        assert_eq!(
            ended_phase_seconds(&state, 2),
            [(Phase::Checkpointing, 20.0)]
        );
        assert!(ended_phase_seconds(&state, 3).is_empty());
    }

    #[test]
    fn conditions_follow_the_phase() {
        let state = MigrationState::new("a".into(), "b".into(), true, Timestamp::UNIX_EPOCH, None);
        let list = conditions(&state, Some(1), Timestamp::UNIX_EPOCH);
        assert_eq!(list[0].status, "Unknown");
        assert_eq!(list[1].status, "True");
        let mut done = state.clone();
        done.phase = Phase::Succeeded;
        let later = Timestamp::from_second(10).unwrap();
        let next = merge_conditions(&list, conditions(&done, Some(1), later));
        assert_eq!(next[0].status, "True");
        assert_eq!(next[0].last_transition_time, Time(later));
        let again = merge_conditions(
            &next,
            conditions(&done, Some(1), Timestamp::from_second(20).unwrap()),
        );
        assert_eq!(
            again[0].last_transition_time,
            Time(later),
            "unchanged status keeps its time"
        );
    }
}
