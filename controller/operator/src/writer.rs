//! The one task that writes to the API server.
//!
//! Every change the controller makes (Migrations and their status, replacement pods, deleting a
//! fenced pod, the out-of-service taint, the checkpoint annotation, Events) is sent to this task
//! as a [`Write`] and answered on a oneshot channel. One writer means one place that checks
//! leadership before each write (a deposed leader's in-flight work cannot write anything), one
//! place that counts API failures, and writes applied in the order they were decided.
//!
//! Events are the exception to "refused when not leader": a standby (or a leader that has not
//! won yet) queues them, at most [`MAX_QUEUED_EVENTS`], and publishes them once it leads, so a
//! policy already broken when the controller starts still gets its Event. Each distinct
//! (object, reason, type, action, note) is its own Event, named by a hash of all of them: a
//! second, different problem on one object is a second visible Event, while the same one again
//! (from this replica or another) raises the existing Event's series count.

use std::collections::{BTreeMap, HashMap, VecDeque};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Taint};
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{EventType, Reporter};
use kube::{Api, Client};
use tokio::sync::{mpsc, oneshot};

use crate::crd::{Migration, MigrationStatus};
use crate::leader::Leadership;

/// Field manager name on every write.
pub const FIELD_MANAGER: &str = "automigrate-controller";
/// Most Events held while this replica does not lead; beyond it the oldest are dropped.
pub const MAX_QUEUED_EVENTS: usize = 1_000;
/// Events this process published, remembered for their series count; forgotten past this.
const MAX_EVENT_CACHE: usize = 4_096;

/// 64-bit FNV-1a: a hash that is the same on every replica and every build, for names that
/// must agree between replicas (Events, stored alerts).
pub fn stable_hash(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("not the leader: write refused")]
    NotLeader,
    #[error("the writer task has stopped")]
    Stopped,
    #[error("API request failed: {0}")]
    Api(#[from] kube::Error),
}

impl WriteError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::NotLeader => "not_leader",
            Self::Stopped => "stopped",
            Self::Api(kube::Error::Api(status)) => match status.code {
                404 => "not_found",
                409 => "conflict",
                403 => "forbidden",
                422 => "invalid",
                _ => "api",
            },
            Self::Api(_) => "transport",
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api(kube::Error::Api(status)) if status.code == 404)
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Api(kube::Error::Api(status)) if status.code == 409)
    }
}

type Reply<T> = oneshot::Sender<Result<T, WriteError>>;

/// One change to make.
#[derive(Debug)]
enum Write {
    CreateMigration(Box<Migration>, Reply<Migration>),
    PatchMigrationStatus {
        namespace: String,
        name: String,
        status: Box<MigrationStatus>,
        reply: Reply<Migration>,
    },
    CreatePod(Box<Pod>, Reply<Pod>),
    DeletePod {
        namespace: String,
        name: String,
        uid: Option<String>,
        grace_seconds: Option<u32>,
        reply: Reply<()>,
    },
    AnnotatePod {
        namespace: String,
        name: String,
        annotations: BTreeMap<String, String>,
        reply: Reply<()>,
    },
    AddNodeTaint {
        node: String,
        taint: Box<Taint>,
        reply: Reply<()>,
    },
    Event {
        regarding: ObjectReference,
        event_type: EventType,
        reason: String,
        note: String,
        action: String,
        reply: Reply<()>,
    },
}

/// The handle every component writes through. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Writer {
    sender: mpsc::Sender<Write>,
}

impl Writer {
    /// Starts the writer task. It ends when every handle is dropped.
    pub fn spawn(client: Client, leadership: Leadership, reporter: Reporter) -> Self {
        let (sender, receiver) = mpsc::channel(256);
        let task = WriterTask {
            events: EventPublisher {
                client: client.clone(),
                reporter,
                published: HashMap::new(),
            },
            client,
            leadership,
            queued: VecDeque::new(),
        };
        tokio::spawn(task.run(receiver));
        Self { sender }
    }

    async fn send<T>(&self, make: impl FnOnce(Reply<T>) -> Write) -> Result<T, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(make(reply))
            .await
            .map_err(|_| WriteError::Stopped)?;
        answer.await.map_err(|_| WriteError::Stopped)?
    }

    pub async fn create_migration(&self, migration: Migration) -> Result<Migration, WriteError> {
        self.send(|reply| Write::CreateMigration(Box::new(migration), reply))
            .await
    }

    pub async fn patch_migration_status(
        &self,
        namespace: &str,
        name: &str,
        status: MigrationStatus,
    ) -> Result<Migration, WriteError> {
        self.send(|reply| Write::PatchMigrationStatus {
            namespace: namespace.into(),
            name: name.into(),
            status: Box::new(status),
            reply,
        })
        .await
    }

    pub async fn create_pod(&self, pod: Pod) -> Result<Pod, WriteError> {
        self.send(|reply| Write::CreatePod(Box::new(pod), reply))
            .await
    }

    /// Deletes a pod; one already gone counts as deleted. With `uid`, only that incarnation.
    pub async fn delete_pod(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<String>,
        grace_seconds: Option<u32>,
    ) -> Result<(), WriteError> {
        self.send(|reply| Write::DeletePod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            grace_seconds,
            reply,
        })
        .await
    }

    pub async fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), WriteError> {
        self.send(|reply| Write::AnnotatePod {
            namespace: namespace.into(),
            name: name.into(),
            annotations,
            reply,
        })
        .await
    }

    /// Replaces a node's taints with `taints` (the caller read the current list).
    /// Adds `taint` to `node` unless a taint with its key is already there, never touching the
    /// node's other taints (see [`add_node_taint`]).
    pub async fn add_node_taint(&self, node: &str, taint: Taint) -> Result<(), WriteError> {
        self.send(|reply| Write::AddNodeTaint {
            node: node.into(),
            taint: Box::new(taint),
            reply,
        })
        .await
    }

    /// Publishes an Event; failures are logged and counted, never fatal to the caller.
    pub async fn event(
        &self,
        regarding: ObjectReference,
        event_type: EventType,
        reason: &str,
        note: String,
        action: &str,
    ) {
        let result = self
            .send(|reply| Write::Event {
                regarding,
                event_type,
                reason: reason.into(),
                note,
                action: action.into(),
                reply,
            })
            .await;
        if let Err(error) = result {
            tracing::warn!(%error, reason, "event not published");
        }
    }
}

struct WriterTask {
    client: Client,
    events: EventPublisher,
    leadership: Leadership,
    /// Events raised while not leading, published once this replica leads.
    queued: VecDeque<PendingEvent>,
}

/// An Event to publish.
#[derive(Debug, Clone)]
struct PendingEvent {
    regarding: ObjectReference,
    event_type: EventType,
    reason: String,
    note: String,
    action: String,
}

/// Publishes Events (events.k8s.io/v1), one per distinct note; see the module docs.
struct EventPublisher {
    client: Client,
    reporter: Reporter,
    /// Events published by name, with what was last written.
    published: HashMap<String, K8sEvent>,
}

impl EventPublisher {
    fn type_name(event_type: EventType) -> &'static str {
        match event_type {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }

    /// `<object>.<hash>`: the same on every replica for the same object, reason, type, action
    /// and note.
    fn name(&self, event: &PendingEvent) -> String {
        let regarding = &event.regarding;
        let key = [
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default(),
            regarding.uid.as_deref().unwrap_or_default(),
            &self.reporter.controller,
            Self::type_name(event.event_type),
            &event.reason,
            &event.action,
            &event.note,
        ]
        .join("\u{1f}");
        let object: String = regarding
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller)
            .chars()
            .take(200)
            .collect();
        format!("{object}.{:016x}", stable_hash(&key))
    }

    async fn publish(&mut self, event: &PendingEvent) -> Result<(), kube::Error> {
        match self.publish_once(event).await {
            // The Event expired (the API server deletes Events after its TTL) since this
            // process last wrote it: publish it afresh.
            Err(kube::Error::Api(status)) if status.code == 404 => {
                self.published.remove(&self.name(event));
                self.publish_once(event).await
            }
            other => other,
        }
    }

    async fn publish_once(&mut self, event: &PendingEvent) -> Result<(), kube::Error> {
        let name = self.name(event);
        let namespace = event
            .regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let now = MicroTime(Timestamp::now());
        let existing = match self.published.get(&name) {
            Some(known) => Some(known.clone()),
            None => {
                let fresh = K8sEvent {
                    action: Some(event.action.clone()),
                    reason: Some(event.reason.clone()),
                    event_time: Some(now.clone()),
                    regarding: Some(event.regarding.clone()),
                    note: Some(event.note.clone()),
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    reporting_controller: Some(self.reporter.controller.clone()),
                    reporting_instance: Some(
                        self.reporter
                            .instance
                            .clone()
                            .unwrap_or_else(|| self.reporter.controller.clone()),
                    ),
                    type_: Some(Self::type_name(event.event_type).into()),
                    ..K8sEvent::default()
                };
                let post = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PostParams::default()
                };
                match api.create(&post, &fresh).await {
                    Ok(created) => {
                        self.remember(name, created);
                        return Ok(());
                    }
                    // Published before: by another replica, or by this one before a restart.
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        Some(api.get(&name).await?)
                    }
                    Err(error) => return Err(error),
                }
            }
        };
        let count = existing
            .as_ref()
            .and_then(|event| event.series.as_ref())
            .map_or(2, |series| series.count.saturating_add(1));
        let patch = serde_json::json!({
            "series": EventSeries { count, last_observed_time: now },
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let patched = api.patch(&name, &params, &Patch::Merge(&patch)).await?;
        self.remember(name, patched);
        Ok(())
    }

    fn remember(&mut self, name: String, event: K8sEvent) {
        if self.published.len() >= MAX_EVENT_CACHE {
            self.published.clear();
        }
        self.published.insert(name, event);
    }
}

/// The JSON patch that appends `taint` to `node` as read, guarded by a `test` of the node's
/// resourceVersion: it fails (and nothing is written) if the node changed since it was read.
fn taint_patch(node: &Node, taint: &Taint) -> Result<json_patch::Patch, serde_json::Error> {
    let version = node.metadata.resource_version.clone().unwrap_or_default();
    let add = match node.spec.as_ref().map(|spec| spec.taints.is_some()) {
        Some(true) => serde_json::json!({ "op": "add", "path": "/spec/taints/-", "value": taint }),
        Some(false) => serde_json::json!({ "op": "add", "path": "/spec/taints", "value": [taint] }),
        None => serde_json::json!({ "op": "add", "path": "/spec", "value": { "taints": [taint] } }),
    };
    serde_json::from_value(serde_json::json!([
        { "op": "test", "path": "/metadata/resourceVersion", "value": version },
        add,
    ]))
}

/// Adds `taint` to `node` from a fresh read of the node, never from a cache: a taint another
/// controller set meanwhile (the node lifecycle controller's `unreachable`) must survive. The
/// patch only appends, with a resourceVersion precondition; when the node changed between the
/// read and the patch (409, or 422 for the failed `test`), it is read again and retried with
/// backoff.
async fn add_node_taint(api: &Api<Node>, node: &str, taint: &Taint) -> Result<(), kube::Error> {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || async {
        let current = api.get(node).await?;
        let present = current
            .spec
            .as_ref()
            .and_then(|spec| spec.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == taint.key));
        if present {
            return Ok(());
        }
        let patch = taint_patch(&current, taint).map_err(kube::Error::SerdeError)?;
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        api.patch(node, &params, &Patch::Json::<()>(patch))
            .await
            .map(|_| ())
    };
    attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(50))
                .with_max_delay(std::time::Duration::from_secs(1))
                .with_max_times(5),
        )
        .when(|error| matches!(error, kube::Error::Api(status) if status.code == 409 || status.code == 422))
        .await
}

impl WriterTask {
    async fn run(mut self, mut receiver: mpsc::Receiver<Write>) {
        let mut election = self.leadership.clone();
        let mut election_over = false;
        loop {
            let waiting = !self.queued.is_empty() && !election_over && !election.is_leader();
            tokio::select! {
                write = receiver.recv() => match write {
                    Some(write) => self.take(write).await,
                    None => break,
                },
                acquired = election.acquired(), if waiting => election_over = !acquired,
            }
            if !self.queued.is_empty() && self.leadership.is_leader() {
                self.flush().await;
            }
        }
        tracing::debug!("writer stopped: no handles left");
    }

    /// Applies a write; an Event raised while not leading is queued instead (and answered Ok:
    /// it will be published).
    async fn take(&mut self, write: Write) {
        match write {
            Write::Event {
                regarding,
                event_type,
                reason,
                note,
                action,
                reply,
            } if !self.leadership.is_leader() => {
                if self.queued.len() >= MAX_QUEUED_EVENTS {
                    self.queued.pop_front();
                    crate::metrics::error("writer", "event_queue_full");
                }
                self.queued.push_back(PendingEvent {
                    regarding,
                    event_type,
                    reason,
                    note,
                    action,
                });
                let _ = reply.send(Ok(()));
            }
            write => self.apply(write).await,
        }
    }

    /// Publishes the Events queued while not leading, oldest first.
    async fn flush(&mut self) {
        tracing::info!(
            events = self.queued.len(),
            "leading: publishing the Events queued meanwhile"
        );
        while let Some(event) = self.queued.pop_front() {
            if !self.leadership.is_leader() {
                self.queued.push_front(event);
                return;
            }
            if let Err(error) = self.events.publish(&event).await {
                tracing::warn!(%error, reason = %event.reason, "queued event not published");
                crate::metrics::error("writer", WriteError::Api(error).metric_label());
            }
        }
    }

    fn check<T>(&self, reply: Reply<T>) -> Option<Reply<T>> {
        if self.leadership.is_leader() {
            Some(reply)
        } else {
            let _ = reply.send(Err(WriteError::NotLeader));
            None
        }
    }

    fn answer<T>(reply: Reply<T>, what: &'static str, result: Result<T, kube::Error>) {
        let result = result.map_err(WriteError::from);
        if let Err(error) = &result {
            tracing::debug!(%error, what, "write failed");
            crate::metrics::error("writer", error.metric_label());
        }
        let _ = reply.send(result);
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn apply(&mut self, write: Write) {
        let params = PatchParams::apply(FIELD_MANAGER);
        let post = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match write {
            Write::CreateMigration(migration, reply) => {
                let Some(reply) = self.check(reply) else {
                    return;
                };
                let namespace = migration.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Migration> = Api::namespaced(self.client.clone(), &namespace);
                Self::answer(
                    reply,
                    "create migration",
                    api.create(&post, &migration).await,
                );
            }
            Write::PatchMigrationStatus {
                namespace,
                name,
                status,
                reply,
            } => {
                let Some(reply) = self.check(reply) else {
                    return;
                };
                let api: Api<Migration> = Api::namespaced(self.client.clone(), &namespace);
                let patch = serde_json::json!({ "status": status });
                let merge = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                Self::answer(
                    reply,
                    "patch migration status",
                    api.patch_status(&name, &merge, &Patch::Merge(&patch)).await,
                );
            }
            Write::CreatePod(pod, reply) => {
                let Some(reply) = self.check(reply) else {
                    return;
                };
                let namespace = pod.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                Self::answer(reply, "create pod", api.create(&post, &pod).await);
            }
            Write::DeletePod {
                namespace,
                name,
                uid,
                grace_seconds,
                reply,
            } => {
                let Some(reply) = self.check(reply) else {
                    return;
                };
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                let params = DeleteParams {
                    grace_period_seconds: grace_seconds,
                    preconditions: uid.map(|uid| Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                let result = match api.delete(&name, &params).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(error) => Err(error),
                };
                Self::answer(reply, "delete pod", result);
            }
            Write::AnnotatePod {
                namespace,
                name,
                annotations,
                reply,
            } => {
                let Some(reply) = self.check(reply) else {
                    return;
                };
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
                let merge = PatchParams {
                    field_manager: params.field_manager.clone(),
                    ..PatchParams::default()
                };
                let result = api
                    .patch(&name, &merge, &Patch::Merge(&patch))
                    .await
                    .map(|_| ());
                Self::answer(reply, "annotate pod", result);
            }
            Write::AddNodeTaint { node, taint, reply } => {
                let Some(reply) = self.check(reply) else {
                    return;
                };
                let api: Api<Node> = Api::all(self.client.clone());
                let result = add_node_taint(&api, &node, &taint).await;
                Self::answer(reply, "taint node", result);
            }
            Write::Event {
                regarding,
                event_type,
                reason,
                note,
                action,
                reply,
            } => {
                let Some(reply) = self.check(reply) else {
                    return;
                };
                let event = PendingEvent {
                    regarding,
                    event_type,
                    reason,
                    note,
                    action,
                };
                let result = self.events.publish(&event).await;
                Self::answer(reply, "publish event", result);
            }
        }
    }
}
