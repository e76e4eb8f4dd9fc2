//! The decision pass: the reflectors' contents become a [`ClusterSnapshot`], the shared engine
//! ([`automigrate_core::decide`], the same code the simulator and `automigrate plan` run)
//! decides, and the pass turns its decisions into Migrations and checkpoint jobs.
//!
//! The snapshot is kept between passes ([`IncrementalSnapshot`]): each pass translates only the
//! objects that changed since the last one, and the result equals a full
//! [`snapshot::build`]. The per-pod checkpoint-age gauges are kept the same way.
//!
//! - A migration decision starts a Migration: the person's request if one is waiting for this
//!   pod (a Migration without status), else a new one (`origin: Automatic`). Its first status
//!   records the state machine's start, the policy's limits, the transfers the engine planned,
//!   and the source pod itself (the replacement is built from it once the source is gone).
//! - Requests the engine did not act on are either deferred (an Event says why, the request
//!   waits) or refused (pod missing, not protected, owned by a controller that recreates its
//!   pods, already migrating): their status ends `Failed` through the state machine's cancel.
//! - Checkpoint decisions are returned to the caller, which runs them with the
//!   [`CheckpointOrchestrator`](crate::checkpoints::CheckpointOrchestrator).
//! - Problems with pods (bad annotations, unknown policies) become Warning Events on the pod,
//!   once per message.
//! - Links and user latency come from the [`LinkBook`] and [`UserBook`] (fresh entries only)
//!   and from the pods' `automigrate.dev/user-latency` annotations (see [`crate::snapshot`]).
//!
//! - Cooldown and history follow the workload, not its pod name: every migration renames the
//!   pod (`trainer` → `trainer-5ca520`), so before the engine runs, the records of a workload's
//!   earlier migrations are also filed under the name its pod has now. The identity is the
//!   [`replacement::ORIGIN_LABEL`] the controller sets on every replacement (the original pod's
//!   name, kept across further moves); a Migration's workload is that label on the pod it
//!   recorded, or the pod it names.
//!
//! The pass reads no clock: `now` is an argument, so tests step time explicitly. Only the
//! decision latency metric and the report's [`PassTimings`] read a monotonic timer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use automigrate_core::annotations::{self, DatasetRef};
use automigrate_core::decide::{CheckpointDecision, Decisions, EngineMemory, MigrationDecision};
use automigrate_core::driver;
use automigrate_core::migration::{self, Event, Limits, MigrationState};
use automigrate_core::model::{MigrationRecord, PodRef};
use automigrate_core::policy::PolicySet;
use automigrate_core::units;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::alertmanager::AlertBook;
use crate::checkpoints::CheckpointOrchestrator;
use crate::crd::{self, Migration, MigrationSpec, MigrationStatus, Origin};
use crate::policies::SharedPolicies;
use crate::probes::{LinkBook, UserBook};
use crate::replacement::{self, OwnerHandling};
use crate::snapshot::{self, IncrementalSnapshot, Inputs};
use crate::stores::Stores;
use crate::writer::{WriteError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("the policy set lock is poisoned")]
    Poisoned,
}

impl DecideError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Poisoned => "poisoned",
        }
    }
}

/// How long a started Migration counts as in flight without the reflector showing it.
const STARTED_MEMORY: std::time::Duration = std::time::Duration::from_secs(300);

/// Where one pass's time went (monotonic clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassTimings {
    /// Bringing the kept snapshot up to date from the reflectors and books (listing the
    /// stores included), copying policies and engine memory.
    pub snapshot: std::time::Duration,
    /// `automigrate_core::decide` alone (what the `automigrate_decision_pass_seconds` metric
    /// and the core's decision-pass benchmark measure).
    pub engine: std::time::Duration,
    /// Acting on the decisions: checkpoint-age gauges, Migrations started, requests answered,
    /// Events.
    pub actions: std::time::Duration,
}

impl PassTimings {
    pub fn total(&self) -> std::time::Duration {
        self.snapshot + self.engine + self.actions
    }
}

/// What one pass did.
#[derive(Debug)]
pub struct PassReport {
    pub timings: PassTimings,
    pub decisions: Decisions,
    /// Migrations started this pass (`namespace/name`).
    pub started: Vec<String>,
    /// Requests refused this pass (`namespace/name`), with the reason.
    pub refused: Vec<(String, String)>,
    /// Periodic checkpoints to take now.
    pub checkpoints: Vec<CheckpointDecision>,
}

/// What the locked part of a pass hands to the part that writes.
struct Decided {
    decisions: Decisions,
    /// The snapshot's migration records (with this decider's unseen starts).
    records: Vec<MigrationRecord>,
    snapshot_time: std::time::Duration,
    engine_time: std::time::Duration,
    /// When the engine started.
    timer: std::time::Instant,
}

/// The `automigrate_checkpoint_age_seconds` handle of each pod of the kept snapshot, in its
/// order. Looking a labelled gauge up builds its key and searches the registry; at 50,000 pods
/// that is most of a pass's actions, while setting a kept handle is one store.
#[derive(Debug, Default)]
struct CheckpointAgeGauges {
    /// The snapshot's pod layout `gauges` follows.
    layout: Option<u64>,
    /// The snapshot's pod ids, in its order, as of `layout`.
    ids: Vec<u64>,
    /// Created the first time the pod has a checkpoint to report.
    gauges: Vec<Option<metrics::Gauge>>,
}

impl CheckpointAgeGauges {
    fn set(&mut self, kept: &IncrementalSnapshot, now: Timestamp) {
        if self.layout != Some(kept.pod_layout()) {
            let mut old: std::collections::HashMap<u64, metrics::Gauge> = self
                .ids
                .drain(..)
                .zip(self.gauges.drain(..))
                .filter_map(|(id, gauge)| Some((id, gauge?)))
                .collect();
            self.ids.extend_from_slice(kept.pod_ids());
            self.gauges.extend(self.ids.iter().map(|id| old.remove(id)));
            self.layout = Some(kept.pod_layout());
        }
        for (pod, gauge) in kept.snapshot().pods.iter().zip(self.gauges.iter_mut()) {
            if let Some(checkpoint) = &pod.last_checkpoint {
                gauge
                    .get_or_insert_with(|| {
                        metrics::gauge!(crate::metrics::CHECKPOINT_AGE, "namespace" => pod.namespace.clone(), "pod" => pod.name.clone())
                    })
                    .set(units::age(now, checkpoint.taken_at).as_secs_f64());
            }
        }
    }
}

#[derive(Debug)]
pub struct Decider {
    stores: Stores,
    policies: SharedPolicies,
    alerts: AlertBook,
    links: LinkBook,
    users: UserBook,
    writer: Writer,
    checkpoints: CheckpointOrchestrator,
    memory: Mutex<EngineMemory>,
    /// The snapshot kept between passes (see [`IncrementalSnapshot`]).
    snapshot: Mutex<IncrementalSnapshot>,
    checkpoint_ages: Mutex<CheckpointAgeGauges>,
    /// Migrations this pass started that the reflector may not show yet: pod → (name, when).
    started: Mutex<BTreeMap<PodRef, (String, Timestamp)>>,
    /// Messages already published as Events, so a standing problem is reported once.
    reported: Mutex<BTreeSet<String>>,
}

fn name_of(migration: &Migration) -> String {
    format!(
        "{}/{}",
        migration.namespace().unwrap_or_default(),
        migration.name_any()
    )
}

/// A Migration name for `pod` started at `now`: `<pod>-<unix seconds>`, at most 63 characters.
pub fn migration_name(pod: &str, now: Timestamp) -> String {
    let suffix = now.as_second().to_string();
    let keep = 63usize.saturating_sub(suffix.len() + 1);
    let base: String = pod.chars().take(keep).collect();
    format!("{}-{suffix}", base.trim_end_matches('-'))
}

impl Decider {
    pub fn new(
        stores: Stores,
        policies: SharedPolicies,
        alerts: AlertBook,
        links: LinkBook,
        users: UserBook,
        writer: Writer,
        checkpoints: CheckpointOrchestrator,
    ) -> Self {
        Self {
            stores,
            policies,
            alerts,
            links,
            users,
            writer,
            checkpoints,
            memory: Mutex::default(),
            snapshot: Mutex::default(),
            checkpoint_ages: Mutex::default(),
            started: Mutex::default(),
            reported: Mutex::default(),
        }
    }

    /// One decision pass at `now`.
    #[tracing::instrument(level = "info", skip_all)]
    pub async fn pass(&self, now: Timestamp) -> Result<PassReport, DecideError> {
        let started_at = std::time::Instant::now();
        let migrations = self.stores.migrations.state();
        let policies: PolicySet = self
            .policies
            .read()
            .map_err(|_| DecideError::Poisoned)?
            .clone();
        let Decided {
            decisions,
            records,
            snapshot_time,
            engine_time,
            timer,
        } = self.decide_now(&migrations, &policies, now, started_at)?;
        let mut started = Vec::new();
        let mut decided: BTreeSet<PodRef> = BTreeSet::new();
        for decision in &decisions.migrations {
            decided.insert(decision.pod.clone());
            if let Some(name) = self.start(decision, &migrations, &policies, now).await {
                started.push(name);
            }
        }
        let refused = self
            .answer_requests(&migrations, &decided, &decisions, &records, now)
            .await;
        self.report_problems(&decisions).await;
        let without_target = decisions
            .deferred
            .iter()
            .filter(|deferred| deferred.no_target)
            .count();
        metrics::gauge!(crate::metrics::PODS_WITHOUT_TARGET).set(without_target as f64);
        metrics::gauge!(crate::metrics::FAILED_MIGRATIONS)
            .set(needing_attention(&migrations) as f64);
        metrics::gauge!(crate::metrics::CHECKPOINTS_POSTPONED)
            .set(decisions.summary.checkpoints_postponed as f64);
        let checkpoints = decisions.checkpoints.clone();
        Ok(PassReport {
            timings: PassTimings {
                snapshot: snapshot_time,
                engine: engine_time,
                actions: timer.elapsed().saturating_sub(engine_time),
            },
            decisions,
            started,
            refused,
            checkpoints,
        })
    }

    /// The part of a pass that holds the kept snapshot: bring it up to date, decide, set the
    /// checkpoint ages. Nothing here awaits, so the lock is never held across a write.
    fn decide_now(
        &self,
        migrations: &[std::sync::Arc<Migration>],
        policies: &PolicySet,
        now: Timestamp,
        started_at: std::time::Instant,
    ) -> Result<Decided, DecideError> {
        let memory = self
            .memory
            .lock()
            .map_err(|_| DecideError::Poisoned)?
            .clone();
        let mut kept = self.snapshot.lock().map_err(|_| DecideError::Poisoned)?;
        let (refresh, moved) = {
            // The listings are dropped before the engine runs (50,000 reference counts).
            let nodes = self.stores.nodes.state();
            let leases = self.stores.leases.state();
            let pods = self.stores.pods.state();
            let in_progress = self.checkpoints.in_progress();
            let moved = moved_workloads(&pods);
            let refresh = kept.update(
                Inputs {
                    nodes: &nodes,
                    leases: &leases,
                    pods: &pods,
                    migrations,
                    alerts: self.alerts.firing(now),
                    links: self.links.current_shared(now),
                    users: self.users.current_shared(now),
                    checkpoints_in_progress: &in_progress,
                },
                now,
            );
            (refresh, moved)
        };
        follow_workloads(kept.snapshot_mut(), migrations, &moved);
        self.add_unseen_starts(kept.snapshot_mut(), migrations, now);
        let snapshot = kept.snapshot();

        let timer = std::time::Instant::now();
        let snapshot_time = timer.duration_since(started_at);
        let (decisions, memory) = automigrate_core::decide(snapshot, policies, &memory, now);
        let engine_time = timer.elapsed();
        metrics::histogram!(crate::metrics::DECISION_SECONDS).record(engine_time.as_secs_f64());
        if let Ok(mut remembered) = self.memory.lock() {
            *remembered = memory;
        }
        tracing::info!(
            migrations = decisions.migrations.len(),
            checkpoints = decisions.checkpoints.len(),
            deferred = decisions.deferred.len(),
            problems = decisions.problems.len(),
            pods_translated = refresh.pods_translated,
            nodes_translated = refresh.nodes_translated,
            "decision pass"
        );
        if let Ok(mut gauges) = self.checkpoint_ages.lock() {
            gauges.set(&kept, now);
        }
        Ok(Decided {
            decisions,
            records: kept.snapshot().migrations.clone(),
            snapshot_time,
            engine_time,
            timer,
        })
    }

    /// Counts migrations this decider started as in flight until the reflector shows them, so a
    /// quick second pass does not start another for the same pod.
    fn add_unseen_starts(
        &self,
        snapshot: &mut automigrate_core::ClusterSnapshot,
        migrations: &[std::sync::Arc<Migration>],
        now: Timestamp,
    ) {
        let Ok(mut started) = self.started.lock() else {
            return;
        };
        // Forget a start once the reflector shows it, or after a while in any case (a
        // Migration deleted before the reflector saw it must not block the pod for ever).
        if !started.is_empty() {
            let shown: std::collections::HashSet<String> = migrations
                .iter()
                .filter(|migration| migration.status.is_some())
                .map(|migration| name_of(migration))
                .collect();
            started.retain(|_, (name, at)| {
                units::age(now, *at) < STARTED_MEMORY && !shown.contains(name.as_str())
            });
        }
        for (pod, (_, at)) in started.iter() {
            snapshot.requests.retain(|request| request.pod != *pod);
            snapshot
                .migrations
                .push(MigrationRecord::just_started(pod.clone(), *at));
        }
    }

    async fn report(
        &self,
        key: String,
        reference: k8s_openapi::api::core::v1::ObjectReference,
        reason: &str,
        note: String,
    ) {
        let fresh = self
            .reported
            .lock()
            .map(|mut reported| {
                if reported.len() > 10_000 {
                    reported.clear();
                }
                reported.insert(key)
            })
            .unwrap_or(false);
        if fresh {
            self.writer
                .event(reference, EventType::Warning, reason, note, "Decide")
                .await;
        }
    }

    fn pod_reference(pod: &Pod) -> k8s_openapi::api::core::v1::ObjectReference {
        pod.object_ref(&())
    }

    async fn start(
        &self,
        decision: &MigrationDecision,
        migrations: &[std::sync::Arc<Migration>],
        policies: &PolicySet,
        now: Timestamp,
    ) -> Option<String> {
        let pod_ref = &decision.pod;
        let Some(pod) = self.stores.pod(&pod_ref.namespace, &pod_ref.name) else {
            tracing::warn!(pod = %pod_ref, "decided to migrate a pod the store no longer holds");
            return None;
        };
        let owner = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|owner| owner.controller == Some(true));
        if OwnerHandling::for_owner(owner.map(|owner| owner.kind.as_str()))
            == OwnerHandling::NotSupported
        {
            let kind = owner.map(|owner| owner.kind.clone()).unwrap_or_default();
            self.report(
                format!("owner/{pod_ref}/{}", decision.from),
                Self::pod_reference(&pod),
                "OwnerNotSupported",
                format!(
                    "would migrate from {} ({}), but the pod is owned by a {kind}, which recreates its pods from its own template; not migrating (see the controller's replacement docs)",
                    decision.from, decision.reason
                ),
            )
            .await;
            return None;
        }
        if let Some(moved) = moved_away(&pod, migrations) {
            // What is left of a workload that already runs elsewhere (a dead node's pod lingers
            // until deleted): migrating it would start one more copy.
            self.report(
                format!("moved/{pod_ref}/{moved}"),
                Self::pod_reference(&pod),
                "AlreadyMoved",
                format!(
                    "would migrate from {} ({}), but Migration {moved} already moved this pod; not migrating what is left of it",
                    decision.from, decision.reason
                ),
            )
            .await;
            return None;
        }
        let request = migrations.iter().find(|migration| {
            migration.is_request()
                && migration.namespace().as_deref() == Some(pod_ref.namespace.as_str())
                && migration.spec.pod == pod_ref.name
        });
        let migration = match request {
            Some(request) => (**request).clone(),
            None => {
                let migration = Migration {
                    metadata: ObjectMeta {
                        name: Some(migration_name(&pod_ref.name, now)),
                        namespace: Some(pod_ref.namespace.clone()),
                        labels: Some(crd::labels_for(&pod_ref.name)),
                        ..ObjectMeta::default()
                    },
                    spec: MigrationSpec {
                        pod: pod_ref.name.clone(),
                        target: None,
                        origin: Origin::Automatic,
                        trigger: Some(decision.trigger),
                        reason: decision.reason.clone(),
                    },
                    status: None,
                };
                match self.writer.create_migration(migration).await {
                    Ok(created) => created,
                    Err(error) => {
                        tracing::warn!(pod = %pod_ref, %error, "could not create a Migration");
                        crate::metrics::error("decider", error.metric_label());
                        return None;
                    }
                }
            }
        };
        let status = initial_status(decision, &pod, policies, migration.metadata.generation, now);
        let name = name_of(&migration);
        match self
            .writer
            .patch_migration_status(&pod_ref.namespace, &migration.name_any(), status)
            .await
        {
            Ok(updated) => {
                if let Ok(mut started) = self.started.lock() {
                    started.insert(pod_ref.clone(), (name.clone(), now));
                }
                let note = format!(
                    "{} → {} ({:?}): {}",
                    decision.from, decision.to, decision.trigger, decision.reason
                );
                self.writer
                    .event(
                        updated.object_ref(&()),
                        EventType::Normal,
                        "Started",
                        note.clone(),
                        "Migrate",
                    )
                    .await;
                self.writer
                    .event(
                        Self::pod_reference(&pod),
                        EventType::Normal,
                        "MigrationStarted",
                        format!("migration {name}: {note}"),
                        "Migrate",
                    )
                    .await;
                Some(name)
            }
            Err(error) => {
                tracing::warn!(migration = %name, %error, "could not start the Migration");
                crate::metrics::error("decider", error.metric_label());
                None
            }
        }
    }

    async fn answer_requests(
        &self,
        migrations: &[std::sync::Arc<Migration>],
        decided: &BTreeSet<PodRef>,
        decisions: &Decisions,
        records: &[MigrationRecord],
        now: Timestamp,
    ) -> Vec<(String, String)> {
        let mut refused = Vec::new();
        for migration in migrations.iter().filter(|migration| migration.is_request()) {
            let Some(namespace) = migration.namespace() else {
                continue;
            };
            let pod_ref = PodRef::new(&namespace, &migration.spec.pod);
            if decided.contains(&pod_ref) {
                continue;
            }
            if let Some(deferred) = decisions
                .deferred
                .iter()
                .find(|deferred| deferred.pod == pod_ref)
            {
                self.writer
                    .event(
                        migration.object_ref(&()),
                        EventType::Normal,
                        "Deferred",
                        deferred.reason.clone(),
                        "Decide",
                    )
                    .await;
                continue;
            }
            let pod = self.stores.pod(&namespace, &migration.spec.pod);
            let problems: Vec<&str> = decisions
                .problems
                .iter()
                .filter(|problem| problem.pod.as_ref() == Some(&pod_ref))
                .map(|problem| problem.message.as_str())
                .collect();
            let reason = match &pod {
                None => format!("pod {pod_ref} does not exist"),
                Some(_)
                    if records
                        .iter()
                        .any(|record| record.pod == pod_ref && !record.phase.is_terminal()) =>
                {
                    format!("another migration of {pod_ref} is in flight")
                }
                Some(pod) if !is_protected(pod) => format!(
                    "pod {pod_ref} is not protected (annotation {}=\"true\" is missing)",
                    annotations::PROTECT
                ),
                Some(pod) if snapshot::pod_node(pod).is_none() => {
                    format!("pod {pod_ref} is not bound to a node")
                }
                Some(pod) => {
                    let owner = pod
                        .metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .find(|owner| owner.controller == Some(true))
                        .map(|owner| owner.kind.clone());
                    if OwnerHandling::for_owner(owner.as_deref()) == OwnerHandling::NotSupported {
                        format!(
                            "pod {pod_ref} is owned by a {}, which recreates its pods itself",
                            owner.unwrap_or_default()
                        )
                    } else if problems.is_empty() {
                        // The engine neither moved nor deferred it and said nothing: leave the
                        // request for the next pass rather than guess.
                        continue;
                    } else {
                        problems.join("; ")
                    }
                }
            };
            let source = pod
                .as_deref()
                .and_then(snapshot::pod_node)
                .unwrap_or_default()
                .to_string();
            let target = migration.spec.target.clone().unwrap_or_default();
            let limits = Limits::from_policy(&PolicySet::new().fallback().1.clone());
            let state = MigrationState::new(source, target, false, now, None);
            let state = match migration::apply(
                &state,
                &Event::Cancel {
                    reason: reason.clone(),
                },
                &limits,
                now,
            ) {
                Ok(state) => state,
                Err(error) => {
                    tracing::warn!(%error, "state machine refused to cancel a new migration");
                    continue;
                }
            };
            let status = MigrationStatus {
                state,
                limits,
                policy: String::new(),
                mode: annotations::CheckpointMode::default(),
                lease_timeout: automigrate_core::Policy::default().triggers.lease_timeout,
                stored_checkpoint: None,
                base_checkpoint: None,
                transfers: Vec::new(),
                bytes_moved: 0,
                source_pod: None,
                source_pod_uid: None,
                failed_restores: Vec::new(),
                replacement_pod: None,
                conditions: Vec::new(),
                observed_generation: migration.metadata.generation,
            };
            match self
                .writer
                .patch_migration_status(&namespace, &migration.name_any(), status)
                .await
            {
                Ok(updated) => {
                    self.writer
                        .event(
                            updated.object_ref(&()),
                            EventType::Warning,
                            "Refused",
                            reason.clone(),
                            "Decide",
                        )
                        .await;
                    refused.push((name_of(migration), reason));
                }
                Err(error) => log_write(&error, migration),
            }
        }
        refused
    }

    async fn report_problems(&self, decisions: &Decisions) {
        for problem in &decisions.problems {
            let Some(pod_ref) = &problem.pod else {
                tracing::warn!(message = %problem.message, "problem");
                continue;
            };
            let Some(pod) = self.stores.pod(&pod_ref.namespace, &pod_ref.name) else {
                continue;
            };
            self.report(
                format!("problem/{pod_ref}/{}", problem.message),
                Self::pod_reference(&pod),
                "AutomigrateProblem",
                problem.message.clone(),
            )
            .await;
        }
    }
}

/// The Migration that already moved this very pod (by uid) and ended with its workload
/// running elsewhere (`Succeeded`, or `Restarted` fresh), if any.
fn moved_away(pod: &Pod, migrations: &[std::sync::Arc<Migration>]) -> Option<String> {
    let uid = pod.metadata.uid.as_deref()?;
    migrations
        .iter()
        .filter(|migration| {
            migration.metadata.namespace == pod.metadata.namespace
                && Some(migration.spec.pod.as_str()) == pod.metadata.name.as_deref()
                && migration
                    .phase()
                    .is_some_and(migration::Phase::moved_the_workload)
        })
        .find(|migration| {
            migration
                .status
                .as_ref()
                .and_then(|status| status.source_pod_uid.as_deref())
                == Some(uid)
        })
        .map(|migration| name_of(migration))
}

/// `(namespace, workload)` → the names of the pods that carry it now, for pods that a
/// migration created (they have the origin label); other pods are their own workload.
type MovedWorkloads = std::collections::HashMap<(String, String), Vec<String>>;

fn moved_workloads(pods: &[std::sync::Arc<Pod>]) -> MovedWorkloads {
    let mut moved = MovedWorkloads::new();
    for pod in pods {
        let Some(origin) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(replacement::ORIGIN_LABEL))
        else {
            continue;
        };
        let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            continue;
        };
        if name != origin {
            moved
                .entry((namespace.clone(), origin.clone()))
                .or_default()
                .push(name.clone());
        }
    }
    moved
}

/// The workload a Migration moved: the origin label of the pod it recorded when it began
/// (a pod that was itself a replacement), else the pod it names.
fn workload_of(migration: &Migration) -> String {
    migration
        .status
        .as_ref()
        .and_then(|status| status.source_pod.as_ref())
        .and_then(|pod| {
            pod.get("metadata")?
                .get("labels")?
                .get(replacement::ORIGIN_LABEL)
        })
        .and_then(serde_json::Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| migration.spec.pod.clone())
}

/// Files every migration record also under the current names of its workload's pods, so the
/// engine's cooldown, retry backoff and failed-node memory (all looked up by pod) follow a
/// workload across the renames its migrations make.
fn follow_workloads(
    snapshot: &mut automigrate_core::ClusterSnapshot,
    migrations: &[std::sync::Arc<Migration>],
    moved: &MovedWorkloads,
) {
    if moved.is_empty() {
        return;
    }
    let workloads: std::collections::HashMap<(&str, &str), String> = migrations
        .iter()
        .filter(|migration| migration.status.is_some())
        .filter_map(|migration| {
            let namespace = migration.metadata.namespace.as_deref()?;
            Some((
                (namespace, migration.spec.pod.as_str()),
                workload_of(migration),
            ))
        })
        .collect();
    let mut extra = Vec::new();
    for record in &snapshot.migrations {
        let namespace = record.pod.namespace.as_str();
        let workload = workloads
            .get(&(namespace, record.pod.name.as_str()))
            .cloned()
            .unwrap_or_else(|| record.pod.name.clone());
        let Some(names) = moved.get(&(namespace.to_string(), workload)) else {
            continue;
        };
        for name in names.iter().filter(|name| **name != record.pod.name) {
            let mut copy = record.clone();
            copy.pod = PodRef::new(namespace, name.as_str());
            extra.push(copy);
        }
    }
    snapshot.migrations.extend(extra);
}

fn log_write(error: &WriteError, migration: &Migration) {
    tracing::warn!(migration = %name_of(migration), %error, "status write failed");
    crate::metrics::error("decider", error.metric_label());
}

fn is_protected(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(annotations::PROTECT))
        .is_some_and(|value| value == "true")
}

/// The first status of a migration the engine decided: the migration driver's first run
/// ([`automigrate_core::driver::begin`]: the state machine's start, the policy's limits, the
/// transfers) and the source pod itself (the replacement is built from it once the source is
/// gone).
pub fn initial_status(
    decision: &MigrationDecision,
    pod: &Pod,
    policies: &PolicySet,
    generation: Option<i64>,
    now: Timestamp,
) -> MigrationStatus {
    let policy = policies
        .get(&decision.policy)
        .unwrap_or_else(|| policies.fallback().1);
    let namespace = pod.namespace().unwrap_or_default();
    let raw = pod.metadata.annotations.clone().unwrap_or_default();
    let (settings, _) = annotations::parse(&namespace, &pod.name_any(), &raw);
    let dataset_path = match &settings.dataset {
        Some(DatasetRef::Path(path)) => Some(path.as_str()),
        _ => None,
    };
    let run = driver::begin(decision, dataset_path, policy, now);
    MigrationStatus {
        state: run.state,
        limits: run.limits,
        policy: decision.policy.clone(),
        mode: settings.mode.unwrap_or(policy.checkpoint.mode),
        lease_timeout: run.lease_timeout,
        stored_checkpoint: run.stored_checkpoint,
        base_checkpoint: run.base_checkpoint,
        transfers: run.transfers,
        bytes_moved: run.bytes_moved,
        source_pod: Some(replacement::record_source(pod)),
        source_pod_uid: pod.metadata.uid.clone(),
        failed_restores: run.failed_restores,
        replacement_pod: None,
        conditions: Vec::new(),
        observed_generation: generation,
    }
}

/// Migrations that ended `Failed` after they began to act (a request refused before it started
/// is answered to the person who asked and is not counted). They stay counted until a person
/// deletes the Migration: `Failed` is what a person must look at, so its alert must not clear
/// on its own.
pub fn needing_attention(migrations: &[std::sync::Arc<Migration>]) -> usize {
    migrations
        .iter()
        .filter_map(|migration| migration.status.as_ref())
        .filter(|status| status.state.needs_attention())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_names_fit_and_are_stamped() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        assert_eq!(migration_name("trainer", now), "trainer-1800000000");
        assert_eq!(migration_name(&"p".repeat(80), now).len(), 63);
    }
}
