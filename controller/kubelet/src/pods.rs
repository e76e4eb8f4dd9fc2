//! The pods bound to this node: a list+watch of `spec.nodeName=<node>` feeds one worker per pod
//! (the real kubelet's pod workers). A worker starts the pod's containers, restarts them as
//! `restartPolicy` says, writes the pod's status, and on deletion stops the containers with the
//! pod's `deletionGracePeriodSeconds` (SIGTERM, wait, SIGKILL) before removing the object with a
//! zero-grace DELETE preconditioned on the pod's uid, which is how a kubelet confirms a pod is gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::images::{self, Resolved};
use crate::runtime::{Launch, Running, Runtime, RuntimeError, launch_for, wait_exit};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("API request `{what}` failed: {source}")]
    Api {
        what: &'static str,
        source: kube::Error,
    },
}

/// Pod-side settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodConfig {
    pub node: String,
    /// The node's address: every pod's `hostIP` (and `podIP` of host-network pods).
    pub host_ip: String,
    /// The first restart delay of a container that ended (doubles up to `max_backoff`), as the
    /// real kubelet's CrashLoopBackOff.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// `hostPath` prefixes resolved elsewhere on this host, `(from, to)`; see
    /// [`crate::runtime::Layout::with_host_path_map`].
    pub host_path_map: Vec<(std::path::PathBuf, std::path::PathBuf)>,
}

impl PodConfig {
    pub fn new(node: impl Into<String>, host_ip: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            host_ip: host_ip.into(),
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            host_path_map: Vec::new(),
        }
    }
}

/// A running container, as the checkpoint API finds it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerKey {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// Which runc container runs each pod container on this node now.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<BTreeMap<ContainerKey, String>>>,
}

impl Registry {
    pub fn get(&self, key: &ContainerKey) -> Option<String> {
        self.lock().get(key).cloned()
    }

    fn insert(&self, key: ContainerKey, id: String) {
        self.lock().insert(key, id);
    }

    fn remove(&self, key: &ContainerKey) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ContainerKey, String>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Context {
    client: kube::Client,
    /// The kubelet's shutdown signal, for loops that would otherwise retry forever.
    shutdown: watch::Receiver<bool>,
    runtime: Arc<Runtime>,
    config: PodConfig,
    registry: Registry,
}

/// Watches the pods bound to this node and runs them until `shutdown` turns true. Containers
/// keep running after shutdown (as they outlive a restarted kubelet).
pub async fn run(
    client: kube::Client,
    runtime: Arc<Runtime>,
    config: PodConfig,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PodError> {
    let api: Api<Pod> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", config.node);
    let context = Arc::new(Context {
        client,
        shutdown: shutdown.clone(),
        runtime,
        config,
        registry,
    });
    let mut events = watcher::watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    loop {
        let event = tokio::select! {
            () = stopped(&mut shutdown) => return Ok(()),
            event = events.next() => event,
        };
        let Some(event) = event else {
            return Ok(());
        };
        match event {
            Ok(Event::Apply(pod) | Event::InitApply(pod)) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    listed.insert(uid.clone());
                    dispatch(&context, &mut workers, uid, Some(pod));
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.clone() {
                    dispatch(&context, &mut workers, uid, None);
                }
            }
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitDone) => {
                // Pods that went away while the watch was down.
                let gone: Vec<String> = workers
                    .keys()
                    .filter(|uid| !listed.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    dispatch(&context, &mut workers, uid, None);
                }
            }
            Err(error) => tracing::warn!(%error, "pod watch failed; retrying"),
        }
        workers.retain(|_, sender| !sender.is_closed());
    }
}

fn dispatch(
    context: &Arc<Context>,
    workers: &mut HashMap<String, watch::Sender<Option<Pod>>>,
    uid: String,
    pod: Option<Pod>,
) {
    if let Some(sender) = workers.get(&uid) {
        let _ = sender.send(pod);
        return;
    }
    let Some(pod) = pod else {
        return;
    };
    let (sender, receiver) = watch::channel(Some(pod));
    workers.insert(uid, sender);
    tokio::spawn(Worker::new(context.clone()).run(receiver));
}

/// One container of a worker's pod.
#[derive(Debug, Clone)]
enum Slot {
    Waiting {
        reason: &'static str,
        message: Option<String>,
        /// When to (re)start; `None`: never (a configuration error).
        start_at: Option<tokio::time::Instant>,
    },
    Running(Running),
    Terminated(Ended),
}

#[derive(Debug, Clone)]
struct Ended {
    id: String,
    code: i32,
    started: Timestamp,
    finished: Timestamp,
}

#[derive(Debug, Clone)]
struct ContainerRecord {
    slot: Slot,
    restarts: i32,
    last: Option<Ended>,
}

/// How soon a refused pod status write or confirming DELETE is tried again (doubling, up to
/// 10 s, for the DELETE).
const STATUS_RETRY: Duration = Duration::from_secs(1);

/// A container of the pod ended: its name and exit code.
type Exit = (String, i32);

struct Worker {
    context: Arc<Context>,
    containers: BTreeMap<String, ContainerRecord>,
    start_time: Timestamp,
    written: Option<serde_json::Value>,
    transitions: BTreeMap<String, (String, Timestamp)>,
    exits: (mpsc::Sender<Exit>, mpsc::Receiver<Exit>),
    /// The pod had already ended when this worker first saw it (a kubelet restarted after it
    /// finished): its containers never run again and its status stays as written.
    finished_before: bool,
    /// When to write the status again after the API server refused it (the real status
    /// manager retries too).
    status_retry: Option<tokio::time::Instant>,
}

impl Worker {
    fn new(context: Arc<Context>) -> Self {
        Self {
            context,
            containers: BTreeMap::new(),
            start_time: Timestamp::now(),
            written: None,
            transitions: BTreeMap::new(),
            exits: mpsc::channel(16),
            finished_before: false,
            status_retry: None,
        }
    }

    async fn run(mut self, mut updates: watch::Receiver<Option<Pod>>) {
        let mut last_pod: Option<Pod> = None;
        if let Some(status) = updates
            .borrow()
            .as_ref()
            .and_then(|pod| pod.status.as_ref())
        {
            // What an earlier kubelet process wrote stands: the start time, and a terminal phase.
            if let Some(start) = &status.start_time {
                self.start_time = start.0;
            }
            self.finished_before = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
        }
        loop {
            let current = updates.borrow_and_update().clone();
            let Some(pod) = current else {
                // The object is gone without this kubelet confirming it (force deletion):
                // stop the containers with the pod's own grace period, as the kubelet does.
                if let Some(pod) = &last_pod {
                    let grace = termination_grace(pod);
                    self.stop_all(pod, grace).await;
                    self.cleanup(pod);
                }
                return;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                self.terminate(&pod).await;
                return;
            }
            if !self.finished_before {
                self.start_due(&pod).await;
                self.write_status(&pod).await;
            }
            last_pod = Some(pod);
            let next_start = self
                .containers
                .values()
                .filter_map(|record| match record.slot {
                    Slot::Waiting { start_at, .. } => start_at,
                    _ => None,
                })
                .min()
                .into_iter()
                .chain(self.status_retry)
                .min();
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        // The manager stopped (kubelet shutdown): leave the containers running.
                        return;
                    }
                }
                Some((name, code)) = self.exits.1.recv() => self.ended(last_pod.as_ref(), &name, code),
                () = sleep_until(next_start) => {}
            }
        }
    }

    /// Starts every container whose start is due.
    async fn start_due(&mut self, pod: &Pod) {
        let Some(spec) = &pod.spec else {
            return;
        };
        let now = tokio::time::Instant::now();
        for container in &spec.containers {
            let record = self
                .containers
                .entry(container.name.clone())
                .or_insert(ContainerRecord {
                    slot: Slot::Waiting {
                        reason: "ContainerCreating",
                        message: None,
                        start_at: Some(now),
                    },
                    restarts: 0,
                    last: None,
                });
            let due = matches!(record.slot, Slot::Waiting { start_at: Some(at), .. } if at <= now);
            if !due {
                continue;
            }
            match launch_for(self.context.runtime.layout(), pod, container) {
                Ok(launch) => {
                    self.start_one(pod, &container.name, &launch, container.image.as_deref())
                        .await;
                }
                Err(error) => {
                    tracing::warn!(container = %container.name, %error, "container cannot be created");
                    if let Some(record) = self.containers.get_mut(&container.name) {
                        record.slot = Slot::Waiting {
                            reason: "CreateContainerConfigError",
                            message: Some(error.to_string()),
                            start_at: None,
                        };
                    }
                }
            }
        }
    }

    /// Starts (or, for a checkpoint image, restores) one container.
    async fn start_one(&mut self, pod: &Pod, name: &str, launch: &Launch, image: Option<&str>) {
        let runtime = &self.context.runtime;
        let result = if let Some(running) = runtime.adopt(launch).await {
            Ok(running)
        } else {
            self.create(launch, name, image).await
        };
        self.started(pod, name, result);
    }

    /// Starts the container fresh, or restores it when its image is a checkpoint image.
    async fn create(
        &self,
        launch: &Launch,
        name: &str,
        image: Option<&str>,
    ) -> Result<Running, RuntimeError> {
        let runtime = &self.context.runtime;
        match images::resolve(&runtime.layout().images(), image.unwrap_or_default()) {
            Ok(Resolved::Host) => runtime.start(launch).await,
            Ok(Resolved::Checkpoint { layout, container }) => {
                tracing::info!(container = name, checkpointed = %container, image = ?image, "restoring from a checkpoint image");
                runtime.restore(launch, &layout).await
            }
            Err(error) => Err(RuntimeError::Image(error)),
        }
    }

    fn started(&mut self, pod: &Pod, name: &str, result: Result<Running, RuntimeError>) {
        let backoff = self.backoff(name);
        let Some(record) = self.containers.get_mut(name) else {
            return;
        };
        match result {
            Ok(running) => {
                self.context
                    .registry
                    .insert(container_key(pod, name), running.id.clone());
                let sender = self.exits.0.clone();
                let mut exit = running.exit.clone();
                let container = name.to_string();
                tokio::spawn(async move {
                    if let Some(code) = wait_exit(&mut exit).await {
                        let _ = sender.send((container, code)).await;
                    }
                });
                record.slot = Slot::Running(running);
            }
            Err(error) => {
                tracing::warn!(container = name, %error, "container did not start");
                // As the real kubelet: the first failed pull is ErrImagePull, the waits between
                // the retries that fail again are ImagePullBackOff.
                let pulled_before = matches!(
                    record.slot,
                    Slot::Waiting {
                        reason: "ErrImagePull" | "ImagePullBackOff",
                        ..
                    }
                );
                let reason = match error {
                    RuntimeError::Config { .. } => "CreateContainerConfigError",
                    RuntimeError::Image(_) if pulled_before => "ImagePullBackOff",
                    RuntimeError::Image(_) => "ErrImagePull",
                    _ => "RunContainerError",
                };
                record.slot = Slot::Waiting {
                    reason,
                    message: Some(error.to_string()),
                    start_at: Some(tokio::time::Instant::now() + backoff),
                };
            }
        }
    }

    fn backoff(&self, name: &str) -> Duration {
        let restarts = self
            .containers
            .get(name)
            .map_or(0, |record| record.restarts);
        let config = &self.context.config;
        let factor = 1u32 << restarts.clamp(0, 16);
        config
            .initial_backoff
            .saturating_mul(factor)
            .min(config.max_backoff)
    }

    /// A container ended: record it and decide, from `restartPolicy`, whether it restarts.
    fn ended(&mut self, pod: Option<&Pod>, name: &str, code: i32) {
        let policy = pod
            .and_then(|pod| pod.spec.as_ref())
            .and_then(|spec| spec.restart_policy.clone())
            .unwrap_or_else(|| "Always".to_string());
        let backoff = self.backoff(name);
        let Some(record) = self.containers.get_mut(name) else {
            return;
        };
        let Slot::Running(running) = &record.slot else {
            return;
        };
        let ended = Ended {
            id: running.id.clone(),
            code,
            started: running.started_at,
            finished: Timestamp::now(),
        };
        if let Some(pod) = pod {
            self.context.registry.remove(&container_key(pod, name));
        }
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if restart {
            record.restarts += 1;
            record.last = Some(ended);
            record.slot = Slot::Waiting {
                reason: "CrashLoopBackOff",
                message: Some(format!("back-off {backoff:?} restarting failed container")),
                start_at: Some(tokio::time::Instant::now() + backoff),
            };
        } else {
            record.slot = Slot::Terminated(ended);
        }
    }

    async fn stop_all(&mut self, pod: &Pod, grace: Duration) {
        let runtime = self.context.runtime.clone();
        let stops = self
            .containers
            .iter()
            .filter_map(|(name, record)| match &record.slot {
                Slot::Running(running) => Some((name.clone(), running.clone())),
                _ => None,
            })
            .map(|(name, running)| {
                let runtime = runtime.clone();
                async move {
                    let code = runtime.stop(&running, grace).await;
                    (name, running, code)
                }
            });
        let stopped = futures::future::join_all(stops).await;
        for (name, running, code) in stopped {
            self.context.registry.remove(&container_key(pod, &name));
            if let Some(record) = self.containers.get_mut(&name) {
                record.slot = Slot::Terminated(Ended {
                    id: running.id,
                    code,
                    started: running.started_at,
                    finished: Timestamp::now(),
                });
            }
        }
        // Containers waiting for a (re)start never will.
        for record in self.containers.values_mut() {
            if let Slot::Waiting { start_at, .. } = &mut record.slot {
                *start_at = None;
            }
        }
    }

    /// Graceful deletion: stop, report, then confirm with a zero-grace DELETE.
    async fn terminate(&mut self, pod: &Pod) {
        if self.finished_before {
            // Nothing runs; the status written when it ended stays.
            self.delete_confirmed(pod).await;
            self.cleanup(pod);
            return;
        }
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .map_or_else(|| termination_grace(pod), seconds);
        tracing::info!(pod = ?pod.metadata.name, ?grace, "stopping the pod's containers");
        self.stop_all(pod, grace).await;
        self.write_status(pod).await;
        self.delete_confirmed(pod).await;
        self.cleanup(pod);
    }

    /// The kubelet's zero-grace DELETE, preconditioned on the pod's uid.
    async fn delete_confirmed(&self, pod: &Pod) {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        // Until it is done: a pod left Terminating would never go away (a partition that
        // heals must still end in the confirmation).
        let mut delay = STATUS_RETRY;
        loop {
            match api.delete(name, &params).await {
                Ok(_) => {
                    tracing::info!(pod = name, "pod removed");
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                    tracing::info!(pod = name, "pod already gone or replaced");
                    return;
                }
                Err(error) => {
                    tracing::warn!(pod = name, %error, ?delay, "pod not removed; retrying");
                }
            }
            if self.context.shutdown.has_changed().is_err() || *self.context.shutdown.borrow() {
                return;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    fn cleanup(&self, pod: &Pod) {
        for name in self.containers.keys() {
            self.context.registry.remove(&container_key(pod, name));
        }
        if let Some(uid) = &pod.metadata.uid {
            self.context.runtime.remove_pod_dir(uid);
        }
    }

    fn condition(&mut self, kind: &str, ready: bool, now: Timestamp) -> PodCondition {
        let status = if ready { "True" } else { "False" }.to_string();
        let entry = self
            .transitions
            .entry(kind.to_string())
            .or_insert_with(|| (status.clone(), now));
        if entry.0 != status {
            *entry = (status.clone(), now);
        }
        PodCondition {
            type_: kind.to_string(),
            status,
            last_transition_time: Some(Time(entry.1)),
            ..PodCondition::default()
        }
    }

    /// The pod's status from its containers, written when it changed.
    async fn write_status(&mut self, pod: &Pod) {
        let Some(spec) = &pod.spec else {
            return;
        };
        let now = Timestamp::now();
        let mut statuses = Vec::new();
        for container in &spec.containers {
            let Some(record) = self.containers.get(&container.name) else {
                continue;
            };
            statuses.push(container_status(
                &container.name,
                &container.image.clone().unwrap_or_default(),
                record,
            ));
        }
        let records: Vec<&ContainerRecord> = self.containers.values().collect();
        let all_running = !records.is_empty()
            && records
                .iter()
                .all(|record| matches!(record.slot, Slot::Running(_)));
        let all_terminated = !records.is_empty()
            && records
                .iter()
                .all(|record| matches!(record.slot, Slot::Terminated(_)));
        let ever_started = records
            .iter()
            .any(|record| !matches!(record.slot, Slot::Waiting { .. }) || record.last.is_some());
        let phase = if all_terminated {
            let failed = records
                .iter()
                .any(|record| matches!(&record.slot, Slot::Terminated(ended) if ended.code != 0));
            if failed { "Failed" } else { "Succeeded" }
        } else if ever_started {
            "Running"
        } else {
            "Pending"
        };
        let conditions = vec![
            self.condition("PodScheduled", true, now),
            self.condition("Initialized", true, now),
            self.condition("ContainersReady", all_running, now),
            self.condition("Ready", all_running, now),
        ];
        let host_ip = self.context.config.host_ip.clone();
        let host_network = spec.host_network == Some(true);
        let status = PodStatus {
            phase: Some(phase.to_string()),
            conditions: Some(conditions),
            container_statuses: Some(statuses),
            host_ip: Some(host_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: host_ip.clone(),
            }]),
            pod_ip: host_network.then(|| host_ip.clone()),
            pod_ips: host_network.then(|| {
                vec![PodIP {
                    ip: host_ip.clone(),
                }]
            }),
            start_time: Some(Time(self.start_time)),
            ..PodStatus::default()
        };
        let body = json!({ "status": status });
        if self.written.as_ref() == Some(&body) {
            return;
        }
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), namespace);
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => {
                self.written = Some(body);
                self.status_retry = None;
            }
            Err(error) => {
                tracing::warn!(pod = name, %error, "pod status not written; retrying");
                self.status_retry = Some(tokio::time::Instant::now() + STATUS_RETRY);
            }
        }
    }
}

fn container_status(name: &str, image: &str, record: &ContainerRecord) -> ContainerStatus {
    let terminated = |ended: &Ended| ContainerStateTerminated {
        container_id: Some(format!("runc://{}", ended.id)),
        exit_code: ended.code,
        reason: Some(
            if ended.code == 0 {
                "Completed"
            } else {
                "Error"
            }
            .to_string(),
        ),
        started_at: Some(Time(ended.started)),
        finished_at: Some(Time(ended.finished)),
        ..ContainerStateTerminated::default()
    };
    let (state, id, running) = match &record.slot {
        Slot::Waiting {
            reason, message, ..
        } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some((*reason).to_string()),
                    message: message.clone(),
                }),
                ..ContainerState::default()
            },
            None,
            false,
        ),
        Slot::Running(running) => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(running.started_at)),
                }),
                ..ContainerState::default()
            },
            Some(running.id.clone()),
            true,
        ),
        Slot::Terminated(ended) => (
            ContainerState {
                terminated: Some(terminated(ended)),
                ..ContainerState::default()
            },
            Some(ended.id.clone()),
            false,
        ),
    };
    ContainerStatus {
        name: name.to_string(),
        image: image.to_string(),
        image_id: format!("local://{image}"),
        container_id: id.map(|id| format!("runc://{id}")),
        ready: running,
        started: Some(running),
        restart_count: record.restarts,
        state: Some(state),
        last_state: record.last.as_ref().map(|ended| ContainerState {
            terminated: Some(terminated(ended)),
            ..ContainerState::default()
        }),
        ..ContainerStatus::default()
    }
}

fn container_key(pod: &Pod, container: &str) -> ContainerKey {
    ContainerKey {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod: pod.metadata.name.clone().unwrap_or_default(),
        container: container.to_string(),
    }
}

fn seconds(value: i64) -> Duration {
    Duration::from_secs(u64::try_from(value).unwrap_or(0))
}

/// `spec.terminationGracePeriodSeconds`, 30 s when unset (the API default).
fn termination_grace(pod: &Pod) -> Duration {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.termination_grace_period_seconds)
        .map_or(Duration::from_secs(30), seconds)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
