//! The one task that writes to the API server.
//!
//! Every change the controller makes (Migrations and their status, replacement pods, deleting a
//! fenced pod, the out-of-service taint, the checkpoint annotation, Events) is sent to this task
//! as a [`Write`] and answered on a oneshot channel. One writer means one place that checks
//! leadership before each write (a deposed leader's in-flight work cannot write anything), one
//! place that counts API failures, and writes applied in the order they were decided.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Taint};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use tokio::sync::{mpsc, oneshot};

use crate::crd::{Migration, MigrationStatus};
use crate::leader::Leadership;

/// Field manager name on every write.
pub const FIELD_MANAGER: &str = "automigrate-controller";

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
            recorder: Recorder::new(client.clone(), reporter),
            client,
            leadership,
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
    recorder: Recorder,
    leadership: Leadership,
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
    async fn run(self, mut receiver: mpsc::Receiver<Write>) {
        while let Some(write) = receiver.recv().await {
            self.apply(write).await;
        }
        tracing::debug!("writer stopped: no handles left");
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
    async fn apply(&self, write: Write) {
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
                let event = Event {
                    type_: event_type,
                    reason,
                    note: Some(note),
                    action,
                    secondary: None,
                };
                Self::answer(
                    reply,
                    "publish event",
                    self.recorder.publish(&event, &regarding).await,
                );
            }
        }
    }
}
