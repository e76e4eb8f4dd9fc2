//! One local node: its storage, its "kubelet" (heartbeat, node conditions, container runtime)
//! and its agent.
//!
//! Data model: a node is a network namespace of the emulated network (index, name, address)
//! plus a storage root laid out by [`NodeLayout`]:
//!
//! ```text
//! <root>/<node>/
//!   exchange/              what peers may write into (the transfer receiver's root):
//!     data/<dataset>/        the node's copy of a dataset (the agent's data root)
//!     incoming/              checkpoints being received, before they are verified and adopted
//!   checkpoints/           the agent's checkpoint store (<namespace>/<pod>/<id>/)
//!   app/                   the training program (the "image")
//!   work/<container>/      one container's /work (its progress.log)
//!   bundles/<container>/   one container's OCI bundle
//!   restore/<container>/   runc/CRIU restore logs and the images view
//!   runc/                  runc's state directory for this node
//! ```
//!
//! The kubelet part renews the node's heartbeat (the Lease) while the node lives (driven by the
//! cluster's [`Kubelets`] thread) and reports
//! the conditions a test or scenario injects (as node-problem-detector would). Killing the node
//! stops both, kills its agent ([`crate::agent::InProcessAgent::kill`]) and SIGKILLs its
//! containers; the emulated network is cut separately by the cluster.
//!
//! The kubelet posts its status as a kubelet posts to the API server: once
//! [`LocalNode::start_posting_status`] was called, every change (heartbeat, condition,
//! power-off) is written atomically to `<root>/<node>/kubelet-status.json` ([`PublishedStatus`]). A controller in another process builds the node with
//! [`LocalNode::observer`]: it owns nothing of the node and reads liveness, heartbeat and
//! conditions from that file (the last good read when a read fails).
//!
//! The runtime part starts, restores and stops the trainer's runc containers on this node.
//! [`LocalNode::container_running`] reads runc's state file and `/proc` directly (no process
//! started), so the copy monitor can poll it often.

use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use automigrate_agent::api::PodKey;
use automigrate_checkpoint::command::SystemRunner;
use automigrate_checkpoint::runc::{RestoredContainer, RuncBackend, RuncError, RuncRestoreTarget};
use automigrate_checkpoint::{CheckpointBackend, CheckpointStore};
use automigrate_core::model::{ConditionStatus, NodeCondition};

use crate::workload::{self, ContainerMounts, TrainerSpec, WorkloadError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {node} is down")]
    Down { node: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runc(#[from] RuncError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Store(#[from] automigrate_checkpoint::store::StoreError),
    #[error(transparent)]
    Archive(#[from] automigrate_checkpoint::archive::ArchiveError),
    #[error("container {id} on node {node}: {reason}")]
    Container {
        node: String,
        id: String,
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where a node keeps what (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    root: PathBuf,
}

impl NodeLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The transfer receiver's root: peers can write here and nowhere else on the node.
    pub fn exchange(&self) -> PathBuf {
        self.root.join("exchange")
    }

    /// The agent's data root: datasets live at the same relative path on every node.
    pub fn data_root(&self) -> PathBuf {
        self.exchange().join("data")
    }

    pub fn dataset(&self, name: &str) -> PathBuf {
        self.data_root().join(name)
    }

    pub fn store(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    pub fn incoming(&self) -> PathBuf {
        self.exchange().join("incoming")
    }

    pub fn app(&self) -> PathBuf {
        self.root.join("app")
    }

    pub fn work(&self, container: &str) -> PathBuf {
        self.root.join("work").join(container)
    }

    pub fn progress(&self, container: &str) -> PathBuf {
        self.work(container).join(workload::PROGRESS_FILE)
    }

    pub fn bundle(&self, container: &str) -> PathBuf {
        self.root.join("bundles").join(container)
    }

    pub fn restore_work(&self, container: &str) -> PathBuf {
        self.root.join("restore").join(container)
    }

    pub fn runc_root(&self) -> PathBuf {
        self.root.join("runc")
    }

    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// What the node's kubelet last posted ([`PublishedStatus`]).
    pub fn status_file(&self) -> PathBuf {
        self.root.join("kubelet-status.json")
    }

    /// Creates every directory of the layout.
    pub fn create(&self) -> Result<(), NodeError> {
        for dir in [
            self.data_root(),
            self.store(),
            self.incoming(),
            self.app(),
            self.root.join("work"),
            self.root.join("bundles"),
            self.root.join("restore"),
            self.runc_root(),
            self.logs(),
        ] {
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        Ok(())
    }
}

/// The cgroup every demo container lives under: `/<parent>/<node namespace>/<instance>`.
pub const CGROUP_PARENT: &str = "automigrate-embedded";

/// How the agents name a pod's container in runc (`--runc-container-id` of the daemon).
pub const RUNC_ID_TEMPLATE: &str = "{namespace}-{pod}-{container}";

/// The runc container id of a pod's container, the same on every node (each node has its own
/// runc state directory), so an agent finds it from the pod alone.
pub fn runtime_id(pod: &PodKey, container: &str) -> String {
    RUNC_ID_TEMPLATE
        .replace("{namespace}", &pod.namespace)
        .replace("{pod}", &pod.name)
        .replace("{container}", container)
}

/// How a container of the trainer is set up on a node.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub pod: PodKey,
    /// The container's name in the pod.
    pub container: String,
    /// This incarnation of the container, unique in a run (`<pod>-<node>-<generation>`): it
    /// names its work directory (its progress file), its bundle and its cgroup.
    pub instance: String,
    pub dataset: String,
    pub trainer: TrainerSpec,
}

impl ContainerSpec {
    pub fn runtime_id(&self) -> String {
        runtime_id(&self.pod, &self.container)
    }
}

/// What the node's kubelet last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    pub alive: bool,
    pub last_heartbeat: SystemTime,
    pub conditions: Vec<NodeCondition>,
}

/// The kubelet's status as written to [`NodeLayout::status_file`] (times in Unix nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedStatus {
    pub alive: bool,
    pub heartbeat_unix_nanos: u128,
    /// Injected conditions, with the wall time each began.
    pub conditions: Vec<PublishedCondition>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedCondition {
    pub kind: String,
    pub since_unix_nanos: u128,
}

fn unix_nanos(time: SystemTime) -> u128 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| since.as_nanos())
        .unwrap_or_default()
}

fn from_unix_nanos(nanos: u128) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Whose view of the node's status this is.
#[derive(Debug)]
enum StatusSide {
    /// This process runs the node's kubelet; once `posting` (see
    /// [`LocalNode::start_posting_status`]) it posts its status.
    Kubelet {
        posting: AtomicBool,
        publish: Mutex<()>,
    },
    /// Another process does; its posts are read back (the last good one kept).
    Observer {
        last: Mutex<Option<PublishedStatus>>,
    },
}

/// One node. Shared (`Arc`) between the cluster, the controller and the agent.
#[derive(Debug)]
pub struct LocalNode {
    name: String,
    index: usize,
    namespace: String,
    address: std::net::Ipv4Addr,
    layout: NodeLayout,
    alive: AtomicBool,
    /// Cut off from the control plane (a network partition): the node and its containers
    /// run on, but its heartbeat no longer arrives.
    partitioned: AtomicBool,
    heartbeat: Mutex<SystemTime>,
    /// Conditions injected by a scenario, with the wall time they began.
    conditions: Mutex<Vec<(String, SystemTime)>>,
    runc: RuncBackend<SystemRunner>,
    store: CheckpointStore,
    /// The containers this node's runtime started, by pod (what the agent checkpoints).
    containers: Mutex<Vec<(PodKey, String)>>,
    side: StatusSide,
}

impl LocalNode {
    pub fn new(
        name: String,
        index: usize,
        namespace: String,
        address: std::net::Ipv4Addr,
        layout: NodeLayout,
    ) -> Result<Self, NodeError> {
        layout.create()?;
        let store = CheckpointStore::open(&layout.store())?;
        workload::install_program(&layout.app())?;
        Ok(Self::assemble(
            (name, index, namespace, address, layout),
            store,
            SystemTime::now(),
            StatusSide::Kubelet {
                posting: AtomicBool::new(false),
                publish: Mutex::new(()),
            },
        ))
    }

    /// The parts a kubelet-side node and an observer share: a live, connected node with no
    /// conditions and no containers yet.
    fn assemble(
        (name, index, namespace, address, layout): (
            String,
            usize,
            String,
            std::net::Ipv4Addr,
            NodeLayout,
        ),
        store: CheckpointStore,
        heartbeat: SystemTime,
        side: StatusSide,
    ) -> Self {
        let runc = RuncBackend::new(SystemRunner, "runc", "criu").with_root(layout.runc_root());
        Self {
            name,
            index,
            namespace,
            address,
            layout,
            alive: AtomicBool::new(true),
            partitioned: AtomicBool::new(false),
            heartbeat: Mutex::new(heartbeat),
            conditions: Mutex::new(Vec::new()),
            runc,
            store,
            containers: Mutex::new(Vec::new()),
            side,
        }
    }

    /// From now on every status change is posted for observers (the first post is now). Off
    /// by default: only a controller in another process needs it, and the heartbeats run on a
    /// real-time thread that should not wait for a disk otherwise.
    pub fn start_posting_status(&self) {
        if let StatusSide::Kubelet { posting, .. } = &self.side {
            posting.store(true, Ordering::SeqCst);
            self.publish_status();
        }
    }

    /// The node as a controller in another process sees it: the same storage and runtime
    /// state, with the status its kubelet posts (see the module header).
    ///
    /// It does not open the node's checkpoint store: opening one clears the staging
    /// directories of interrupted writes, and the agent may be writing a checkpoint right then.
    /// Its [`LocalNode::store`] is an empty stand-in (`<node>/observer-store/`); it reads the
    /// real store through [`LocalNode::has_checkpoint`] and [`LocalNode::verified_checkpoint`].
    pub fn observer(
        name: String,
        index: usize,
        namespace: String,
        address: std::net::Ipv4Addr,
        layout: NodeLayout,
    ) -> Result<Self, NodeError> {
        let store = CheckpointStore::open(&layout.root().join("observer-store"))?;
        let node = Self::assemble(
            (name, index, namespace, address, layout),
            store,
            SystemTime::UNIX_EPOCH,
            StatusSide::Observer {
                last: Mutex::new(None),
            },
        );
        node.read_published();
        Ok(node)
    }

    /// Whether this process only observes the node (its kubelet runs elsewhere).
    pub fn is_observer(&self) -> bool {
        matches!(self.side, StatusSide::Observer { .. })
    }

    /// Writes the kubelet's status where observers read it (temporary file, then rename).
    fn publish_status(&self) {
        let StatusSide::Kubelet { posting, publish } = &self.side else {
            return;
        };
        if !posting.load(Ordering::SeqCst) {
            return;
        }
        let Ok(_one_writer) = publish.lock() else {
            return;
        };
        let status = PublishedStatus {
            alive: self.alive.load(Ordering::SeqCst),
            heartbeat_unix_nanos: self
                .heartbeat
                .lock()
                .map(|heartbeat| unix_nanos(*heartbeat))
                .unwrap_or_default(),
            conditions: self
                .conditions
                .lock()
                .map(|conditions| {
                    conditions
                        .iter()
                        .map(|(kind, since)| PublishedCondition {
                            kind: kind.clone(),
                            since_unix_nanos: unix_nanos(*since),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let path = self.layout.status_file();
        let temporary = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&status)
            .map_err(std::io::Error::other)
            .and_then(|text| std::fs::write(&temporary, text))
            .and_then(|()| std::fs::rename(&temporary, &path));
        if let Err(error) = written {
            tracing::warn!(node = %self.name, %error, "cannot post the node status");
        }
    }

    /// An observer's read of the posted status; the last good one when this read fails.
    fn read_published(&self) -> Option<PublishedStatus> {
        let StatusSide::Observer { last } = &self.side else {
            return None;
        };
        let fresh = std::fs::read(self.layout.status_file())
            .ok()
            .and_then(|text| serde_json::from_slice::<PublishedStatus>(&text).ok());
        let mut last = last.lock().ok()?;
        if let Some(fresh) = fresh {
            *last = Some(fresh);
        }
        last.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn address(&self) -> std::net::Ipv4Addr {
        self.address
    }

    pub fn layout(&self) -> &NodeLayout {
        &self.layout
    }

    /// The node's checkpoint store (an empty stand-in on an [`LocalNode::observer`]).
    pub fn store(&self) -> &CheckpointStore {
        &self.store
    }

    /// Where the store keeps checkpoint `id` of `pod` (the store's layout:
    /// `checkpoints/<namespace>/<pod>/<id>/`), for reading it without opening the store.
    pub fn checkpoint_dir(
        &self,
        pod: &automigrate_checkpoint::PodKey,
        id: &str,
    ) -> Result<PathBuf, NodeError> {
        let parts = [pod.namespace.as_str(), pod.name.as_str(), id];
        if let Some(bad) = parts.iter().find(|part| {
            part.is_empty() || part.starts_with('.') || part.contains('/') || part.contains('\0')
        }) {
            return Err(NodeError::Container {
                node: self.name.clone(),
                id: id.to_string(),
                reason: format!("{bad:?} cannot name a checkpoint directory"),
            });
        }
        Ok(parts
            .iter()
            .fold(self.layout.store(), |dir, part| dir.join(part)))
    }

    /// Whether the store holds checkpoint `id` of `pod` (its manifest is there: stores
    /// publish a checkpoint by renaming its finished directory into place).
    pub fn has_checkpoint(&self, pod: &automigrate_checkpoint::PodKey, id: &str) -> bool {
        self.checkpoint_dir(pod, id)
            .is_ok_and(|dir| automigrate_checkpoint::archive::read_manifest(&dir).is_ok())
    }

    /// Checkpoint `id` of `pod` and its parents, every file checked against the manifests, as
    /// a restore needs. Blocking.
    pub fn verified_checkpoint(
        &self,
        pod: &automigrate_checkpoint::PodKey,
        id: &str,
    ) -> Result<automigrate_checkpoint::VerifiedCheckpoint, NodeError> {
        let dir = self.checkpoint_dir(pod, id)?;
        Ok(automigrate_checkpoint::archive::verify_chain(&dir)?)
    }

    pub fn runc(&self) -> &RuncBackend<SystemRunner> {
        &self.runc
    }

    pub fn is_alive(&self) -> bool {
        if self.is_observer() {
            // Never posted: nothing says the node lives.
            return self.read_published().is_some_and(|status| status.alive);
        }
        self.alive.load(Ordering::SeqCst)
    }

    fn ensure_alive(&self) -> Result<(), NodeError> {
        if self.is_alive() {
            Ok(())
        } else {
            Err(NodeError::Down {
                node: self.name.clone(),
            })
        }
    }

    /// The kubelet's heartbeat: renews the Lease while the node lives.
    pub fn renew_heartbeat(&self) {
        if self.is_observer() || !self.is_alive() || self.partitioned.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(mut heartbeat) = self.heartbeat.lock() {
            *heartbeat = SystemTime::now();
        }
        self.publish_status();
    }

    /// Starts (`true`) or ends a network partition between the node and the control plane:
    /// the heartbeat stops arriving while the node and its containers keep running.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.partitioned.store(partitioned, Ordering::SeqCst);
    }

    /// Sets a node condition to `True` (as node-problem-detector or the kubelet's eviction
    /// manager would), e.g. `DiskPressure`.
    pub fn inject_condition(&self, kind: &str) {
        if let Ok(mut conditions) = self.conditions.lock()
            && !conditions.iter().any(|(existing, _)| existing == kind)
        {
            tracing::info!(node = %self.name, condition = kind, "condition injected");
            conditions.push((kind.to_string(), SystemTime::now()));
        }
        self.publish_status();
    }

    pub fn clear_conditions(&self) {
        if let Ok(mut conditions) = self.conditions.lock() {
            conditions.clear();
        }
        self.publish_status();
    }

    /// The node's status as its kubelet last reported it, with conditions in policy time.
    pub fn status(&self, policy_time: impl Fn(SystemTime) -> jiff::Timestamp) -> NodeStatus {
        if self.is_observer() {
            let posted = self.read_published().unwrap_or_default();
            return NodeStatus {
                alive: posted.alive,
                last_heartbeat: from_unix_nanos(posted.heartbeat_unix_nanos),
                conditions: posted
                    .conditions
                    .iter()
                    .map(|condition| NodeCondition {
                        kind: condition.kind.clone(),
                        status: ConditionStatus::True,
                        since: Some(policy_time(from_unix_nanos(condition.since_unix_nanos))),
                        reason: Some("Injected".into()),
                        message: Some("injected by the demo scenario".into()),
                    })
                    .collect(),
            };
        }
        let last_heartbeat = self
            .heartbeat
            .lock()
            .map(|heartbeat| *heartbeat)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let conditions = self
            .conditions
            .lock()
            .map(|conditions| {
                conditions
                    .iter()
                    .map(|(kind, since)| NodeCondition {
                        kind: kind.clone(),
                        status: ConditionStatus::True,
                        since: Some(policy_time(*since)),
                        reason: Some("Injected".into()),
                        message: Some("injected by the demo scenario".into()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        NodeStatus {
            alive: self.is_alive(),
            last_heartbeat,
            conditions,
        }
    }

    /// The node dies: heartbeat stops, every container it runs gets SIGKILL. (The agent and
    /// the network links are stopped by the cluster.)
    ///
    /// Every container runc has state for on this node is killed, including ones a controller
    /// in another process started.
    #[tracing::instrument(name = "node_power_off", skip(self), fields(node = %self.name))]
    pub async fn power_off(&self) {
        if self.is_observer() {
            tracing::warn!("an observer cannot power a node off");
            return;
        }
        self.alive.store(false, Ordering::SeqCst);
        self.publish_status();
        let mut containers: Vec<String> = self
            .containers
            .lock()
            .map(|list| list.iter().map(|(_, id)| id.clone()).collect())
            .unwrap_or_default();
        containers.extend(self.runc_container_ids());
        containers.sort();
        containers.dedup();
        for id in containers {
            if let Err(error) = self.runc.kill(&id, "KILL").await {
                tracing::debug!(%id, %error, "kill on power-off");
            }
        }
    }

    /// The container id this node runs for `pod`, if any (the agent's view of the CRI).
    pub fn container_of(&self, pod: &PodKey) -> Option<String> {
        self.containers.lock().ok().and_then(|list| {
            list.iter()
                .rev()
                .find(|(key, _)| key == pod)
                .map(|(_, id)| id.clone())
        })
    }

    fn register(&self, pod: &PodKey, id: &str) {
        if let Ok(mut list) = self.containers.lock() {
            list.retain(|(key, _)| key != pod);
            list.push((pod.clone(), id.to_string()));
        }
    }

    fn unregister(&self, id: &str) {
        if let Ok(mut list) = self.containers.lock() {
            list.retain(|(_, existing)| existing != id);
        }
    }

    fn mounts(&self, spec: &ContainerSpec) -> ContainerMounts {
        ContainerMounts {
            data: self.layout.dataset(&spec.dataset),
            work: self.layout.work(&spec.instance),
            app: self.layout.app(),
        }
    }

    /// Every incarnation gets its own cgroup: runc ids repeat across nodes, cgroups are global.
    fn cgroups_path(&self, spec: &ContainerSpec) -> String {
        format!("/{CGROUP_PARENT}/{}/{}", self.namespace, spec.instance)
    }

    /// Removes the node's (empty) cgroup directories in every hierarchy once its containers
    /// are gone: runc removes a container's own cgroup, not the parents it created for it.
    /// Anything still in use stays (`rmdir` refuses).
    pub fn remove_cgroups(&self) {
        let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for hierarchy in hierarchies.filter_map(Result::ok) {
            let parent = hierarchy.path().join(CGROUP_PARENT);
            let node_dir = parent.join(&self.namespace);
            if let Ok(children) = std::fs::read_dir(&node_dir) {
                for child in children.filter_map(Result::ok) {
                    if child.file_type().is_ok_and(|kind| kind.is_dir()) {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&node_dir);
            let _ = std::fs::remove_dir(&parent);
        }
    }

    /// Starts the trainer from its beginning (`runc run --detach`).
    #[tracing::instrument(name = "runtime_run", skip(self, spec), fields(node = %self.name, instance = %spec.instance))]
    pub async fn run_fresh(&self, spec: &ContainerSpec) -> Result<(), NodeError> {
        self.ensure_alive()?;
        let bundle = workload::create_bundle(
            &self.layout.bundle(&spec.instance),
            &self.mounts(spec),
            &spec.trainer,
            &self.cgroups_path(spec),
        )?;
        let log = self
            .layout
            .logs()
            .join(format!("{}-run.log", spec.instance));
        let id = spec.runtime_id();
        self.runc.run_detached(&id, bundle.dir(), &log).await?;
        self.register(&spec.pod, &id);
        Ok(())
    }

    /// Restores the trainer from a checkpoint in this node's store (verified first).
    #[tracing::instrument(name = "runtime_restore", skip(self, spec), fields(node = %self.name, instance = %spec.instance))]
    pub async fn restore(
        &self,
        spec: &ContainerSpec,
        checkpoint_id: &str,
        timeout: Duration,
    ) -> Result<RestoredContainer, NodeError> {
        self.ensure_alive()?;
        let store_pod = automigrate_checkpoint::PodKey::new(&spec.pod.namespace, &spec.pod.name);
        let verified = {
            let dir = self.checkpoint_dir(&store_pod, checkpoint_id)?;
            tokio::task::spawn_blocking(move || automigrate_checkpoint::archive::verify_chain(&dir))
                .await
                .map_err(|error| NodeError::Container {
                    node: self.name.clone(),
                    id: spec.instance.clone(),
                    reason: format!("verification task: {error}"),
                })??
        };
        let bundle = workload::create_bundle(
            &self.layout.bundle(&spec.instance),
            &self.mounts(spec),
            &spec.trainer,
            &self.cgroups_path(spec),
        )?;
        let work_dir = self.layout.restore_work(&spec.instance);
        // A restore tried before with this instance (a retry, or a controller that died in it)
        // left its images view: views are hard links into the store, and making one over an
        // old one would copy each archive file onto itself, truncating the stored checkpoint.
        // The old one is moved aside (what a killed restore left may not be removable).
        if work_dir.exists() {
            let aside = work_dir.with_extension(format!(
                "abandoned-{}",
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|since| since.as_nanos())
                    .unwrap_or_default()
            ));
            std::fs::rename(&work_dir, &aside).map_err(io_error(&work_dir))?;
            tracing::warn!(node = %self.name, aside = %aside.display(), "an earlier restore's work directory was moved aside");
        }
        let id = spec.runtime_id();
        let restored = self
            .runc
            .restore(
                &verified,
                &RuncRestoreTarget {
                    container_id: id.clone(),
                    bundle: bundle.dir().to_path_buf(),
                    work_dir,
                    timeout,
                },
            )
            .await?;
        self.register(&spec.pod, &id);
        Ok(restored)
    }

    /// Stops and removes a container (`runc delete --force`); fine if it is gone.
    pub async fn remove_container(&self, id: &str) -> Result<(), NodeError> {
        self.runc.delete(id).await?;
        // A `runc restore` or `runc run` killed early leaves the container's state directory
        // without its state file: runc then neither deletes it ("does not exist") nor creates
        // the id again ("already exists").
        // A killed `runc restore` also leaves the root filesystem bind-mounted in it
        // (`criu-root`), which must go first.
        let state_dir = self.layout.runc_root().join(id);
        if state_dir.is_dir() && !state_dir.join("state.json").exists() {
            tracing::warn!(node = %self.name, %id, "removing a half-made container's runc state");
            for mount in mounts_under(&state_dir) {
                let unmounted = tokio::process::Command::new("umount")
                    .arg("--lazy")
                    .arg(&mount)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await;
                if !unmounted
                    .as_ref()
                    .is_ok_and(|output| output.status.success())
                {
                    tracing::warn!(mount = %mount.display(), ?unmounted, "cannot unmount");
                }
            }
            std::fs::remove_dir_all(&state_dir).map_err(io_error(&state_dir))?;
        }
        self.unregister(id);
        Ok(())
    }

    /// Whether the container's init process is alive (not a zombie), read from runc's state
    /// file and `/proc` without starting any process. A node that is down still answers:
    /// this is the demo's out-of-band view (like a power controller), not the agent's.
    pub fn container_running(&self, id: &str) -> bool {
        let state_path = self.layout.runc_root().join(id).join("state.json");
        let Ok(text) = std::fs::read_to_string(&state_path) else {
            return false;
        };
        let Ok(state) = serde_json::from_str::<serde_json::Value>(&text) else {
            return false;
        };
        let (Some(pid), Some(start)) = (
            state["init_process_pid"].as_i64(),
            state["init_process_start"].as_u64(),
        ) else {
            return false;
        };
        process_matches(pid, start)
    }

    /// Containers this node's runtime started and which still exist in runc's state.
    pub fn known_containers(&self) -> Vec<String> {
        self.containers
            .lock()
            .map(|list| list.iter().map(|(_, id)| id.clone()).collect())
            .unwrap_or_default()
    }

    /// Every container id runc has state for on this node.
    pub fn runc_container_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.layout.runc_root()) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().join("state.json").exists())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    }

    /// Processes of `runc` working on this node's runtime state now (`--root` names it), read
    /// from `/proc`: an operation a killed controller started goes on after it died.
    pub fn runtime_operations(&self) -> Vec<u32> {
        let root = self.layout.runc_root();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let own = std::process::id();
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != own)
            .filter(|pid| {
                let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
                let is_runc = args
                    .first()
                    .and_then(|program| program.rsplit(|byte| *byte == b'/').next())
                    .is_some_and(|name| name == b"runc");
                is_runc
                    && args.windows(2).any(|pair| {
                        pair.first().is_some_and(|flag| *flag == b"--root")
                            && pair.get(1).is_some_and(|path| {
                                Path::new(std::ffi::OsStr::from_bytes(path)) == root
                            })
                    })
            })
            .collect()
    }

    /// Whether CRIU on this node can take incremental dumps (the kernel's dirty tracking).
    pub async fn incremental_supported(&self) -> bool {
        self.runc
            .capabilities()
            .await
            .is_ok_and(|capabilities| capabilities.incremental)
    }
}

/// The nodes' kubelets: one thread renewing every live node's heartbeat every `period`.
///
/// It runs under `SCHED_FIFO` (via `chrt`, best effort), as each node's kubelet would have its
/// own CPU: on this machine all nodes share two cores with the emulator's real-time relay
/// threads and other work, and a heartbeat starved for a second would read as a node failure
/// (the default policy's 30 s lease is 1 s of real time at clock scale 30).
#[derive(Debug)]
pub struct Kubelets {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Above the emulator's relay threads (10), so a busy link cannot starve the heartbeats.
pub const KUBELET_PRIORITY: u8 = 20;

impl Kubelets {
    pub fn start(nodes: Vec<Arc<LocalNode>>, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("kubelets".into())
            .spawn(move || {
                raise_to_realtime(KUBELET_PRIORITY);
                while !flag.load(Ordering::SeqCst) {
                    for node in &nodes {
                        node.renew_heartbeat();
                    }
                    std::thread::sleep(period);
                }
            })
            .ok();
        Self { stop, thread }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Kubelets {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Puts the calling thread under `SCHED_FIFO` (the standard library has no safe call for it,
/// so `chrt` does it on the thread's id); logs and carries on at normal priority otherwise.
fn raise_to_realtime(priority: u8) {
    // `/proc/thread-self` links to `<pid>/task/<tid>`.
    let Some(thread_id) = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| {
            link.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
    else {
        tracing::warn!("cannot find this thread's id; heartbeats run at normal priority");
        return;
    };
    let outcome = std::process::Command::new("chrt")
        .args(["--fifo", "--pid", &priority.to_string(), &thread_id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output();
    match outcome {
        Ok(output) if output.status.success() => {}
        Ok(output) => tracing::warn!(
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "chrt refused; heartbeats run at normal priority"
        ),
        Err(error) => tracing::warn!(%error, "cannot run chrt; heartbeats run at normal priority"),
    }
}

/// Mount points at or under `dir` in this process's mount namespace, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    // Field 5 is the mount point, with spaces and the like escaped as octal (`\040`).
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(escaped.replace("\\040", " ")))
        .filter(|mount| mount.starts_with(dir))
        .collect();
    found.sort_by_key(|mount| std::cmp::Reverse(mount.components().count()));
    found.dedup();
    found
}

/// `/proc/<pid>/stat`: the process exists, started at `start` (clock ticks since boot, as runc
/// records it) and is not a zombie.
fn process_matches(pid: i64, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The command name is in parentheses and may hold spaces: parse after the last `)`.
    let Some(rest) = stat.rfind(')').and_then(|end| stat.get(end + 2..)) else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line (index 0 here), starttime field 22 (19).
    let state = fields.first().copied().unwrap_or("Z");
    let started = fields.get(19).and_then(|value| value.parse::<u64>().ok());
    state != "Z" && state != "X" && started == Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_keeps_containers_apart() {
        let layout = NodeLayout::new("/srv/demo/node-a");
        assert_eq!(
            layout.dataset("set"),
            Path::new("/srv/demo/node-a/exchange/data/set")
        );
        assert!(layout.incoming().starts_with(layout.exchange()));
        assert!(!layout.store().starts_with(layout.exchange()));
        let spec = ContainerSpec {
            pod: PodKey::new("ml", "trainer"),
            container: "main".into(),
            instance: "trainer-node-a-1".into(),
            dataset: "set".into(),
            trainer: TrainerSpec {
                epochs: 1,
                hidden: 1,
                seed: 1,
                learning_rate: 0.1,
            },
        };
        assert_eq!(spec.runtime_id(), "ml-trainer-main");
        assert_eq!(
            layout.progress("trainer-node-a-1"),
            Path::new("/srv/demo/node-a/work/trainer-node-a-1/progress.log")
        );
        assert_ne!(layout.bundle("x"), layout.bundle("y"));
    }

    fn node(layout: &NodeLayout, observer: bool) -> LocalNode {
        let make = if observer {
            LocalNode::observer
        } else {
            LocalNode::new
        };
        make(
            "node-a".into(),
            0,
            "amnet-test-0".into(),
            std::net::Ipv4Addr::LOCALHOST,
            layout.clone(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn an_observer_reads_what_the_kubelet_posts() {
        let root = tempfile::tempdir().unwrap();
        let layout = NodeLayout::new(root.path().join("node-a"));
        let kubelet = node(&layout, false);
        let observer = node(&layout, true);
        let policy_time = |_| jiff::Timestamp::UNIX_EPOCH;
        assert!(observer.is_observer() && !kubelet.is_observer());
        // Nothing is posted until asked for.
        assert!(!observer.is_alive());
        assert!(!layout.status_file().exists());
        kubelet.start_posting_status();
        assert!(observer.is_alive());
        let posted = kubelet.status(policy_time).last_heartbeat;
        assert_eq!(observer.status(policy_time).last_heartbeat, posted);

        std::thread::sleep(Duration::from_millis(5));
        kubelet.renew_heartbeat();
        kubelet.inject_condition("DiskPressure");
        let seen = observer.status(policy_time);
        assert!(seen.last_heartbeat > posted);
        assert_eq!(
            seen.last_heartbeat,
            kubelet.status(policy_time).last_heartbeat
        );
        assert_eq!(seen.conditions.len(), 1);
        assert_eq!(seen.conditions[0].kind, "DiskPressure");
        assert_eq!(seen.conditions[0].status, ConditionStatus::True);

        // An observer posts nothing and cannot power the node off.
        observer.renew_heartbeat();
        observer.power_off().await;
        assert!(kubelet.is_alive());
        assert_eq!(observer.status(policy_time), seen);

        kubelet.power_off().await;
        assert!(!observer.is_alive());
        // A post that cannot be read leaves the last good one.
        std::fs::write(layout.status_file(), "{").unwrap();
        assert!(!observer.is_alive());
        assert_eq!(observer.status(policy_time).conditions.len(), 1);
    }

    #[test]
    fn an_observer_never_posted_to_sees_no_live_node() {
        let root = tempfile::tempdir().unwrap();
        let layout = NodeLayout::new(root.path().join("node-a"));
        layout.create().unwrap();
        assert!(!node(&layout, true).is_alive());
    }

    #[test]
    fn checkpoints_are_found_by_the_store_layout() {
        let root = tempfile::tempdir().unwrap();
        let layout = NodeLayout::new(root.path().join("node-a"));
        let observer = node(&layout, true);
        let pod = automigrate_checkpoint::PodKey::new("ml", "trainer");
        assert_eq!(
            observer.checkpoint_dir(&pod, "trainer-000007").unwrap(),
            layout.store().join("ml/trainer/trainer-000007")
        );
        for bad in ["", "..", ".staging-1", "a/b"] {
            assert!(observer.checkpoint_dir(&pod, bad).is_err(), "{bad:?}");
        }
        assert!(!observer.has_checkpoint(&pod, "trainer-000007"));
        assert!(
            observer
                .verified_checkpoint(&pod, "trainer-000007")
                .is_err()
        );
        // The observer opened no store over the real one.
        assert_ne!(observer.store().root(), layout.store());
    }

    #[test]
    fn runtime_operations_are_runc_processes_naming_the_node_root() {
        use std::os::unix::process::CommandExt as _;
        let root = tempfile::tempdir().unwrap();
        let layout = NodeLayout::new(root.path().join("node-a"));
        let observer = node(&layout, true);
        let other = root.path().join("node-b").join("runc");
        let start = |runc_root: &Path| {
            // `read` is a shell builtin, so the shell keeps its command line and forks no
            // child: a forked child carries the parent's command line until it execs, and was
            // seen here as a second process naming the root. It waits on a pipe never written.
            std::process::Command::new("/bin/sh")
                .arg0("runc")
                .args(["-c", "read -r line; true", "--root"])
                .arg(runc_root)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut busy = start(&layout.runc_root());
        let mut elsewhere = start(&other);
        // A vfork parent wakes inside the child's execve, before the kernel has set the new
        // argument pointers: until then /proc/PID/cmdline reads empty.
        for child in [&busy, &elsewhere] {
            let cmdline = format!("/proc/{}/cmdline", child.id());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !std::fs::read(&cmdline)
                .unwrap()
                .windows(b"--root".len())
                .any(|window| window == b"--root")
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{cmdline} never filled"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let found = observer.runtime_operations();
        busy.kill().unwrap();
        elsewhere.kill().unwrap();
        let _ = (busy.wait(), elsewhere.wait());
        assert_eq!(found, vec![busy.id()]);
        assert!(observer.runtime_operations().is_empty());
    }

    #[test]
    fn own_process_matches_its_start_time_and_others_do_not() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let start: u64 = rest.split_whitespace().nth(19).unwrap().parse().unwrap();
        let pid = i64::from(std::process::id());
        assert!(process_matches(pid, start));
        assert!(!process_matches(pid, start + 1));
        assert!(!process_matches(i64::from(i32::MAX), start));
    }
}
