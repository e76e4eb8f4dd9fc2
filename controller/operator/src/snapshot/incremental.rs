//! The decision pass's [`ClusterSnapshot`] kept from one pass to the next and brought up to date
//! from the reflectors' stores, instead of translated anew: at 50,000 pods [`build`](super::build)
//! clones and parses every pod every pass and the pass then frees all of it, which cost far more
//! than the engine (docs/benchmarks.md, "Controller load"). The result must equal
//! [`build`](super::build)'s, field for field and in the same order; the tests below hold the two
//! side by side over random sequences of adds, updates, relists and deletes.
//!
//! What is kept:
//! - `snapshot`: what the engine reads. Its nodes (by name) and pods (by namespace/name) are
//!   changed in place: a changed object's entry is replaced where it stands, and only when
//!   objects come or go are the vectors re-laid out (moved, never cloned).
//! - One entry per Pod and per Node the stores hold, with the store's `Arc` of it. An object is
//!   translated again only if the store holds a different allocation for it AND its
//!   `resourceVersion` (or uid) differs: a relist hands out new allocations of unchanged objects.
//!   Holding the `Arc` keeps its address from being reused while the entry lives, so a known
//!   address is the object translated before; finding the store's objects by address reads no
//!   object, which matters at 50,000 pods.
//! - Per node name, the sum of the requests of the non-terminated pods bound to it, kept exact
//!   (u128) and saturated on the way out, which is what the builder's saturating fold gives.
//! - The set of pods being checkpointed at the last pass, so only pods that entered or left it
//!   are touched; and which pods carry a user-latency annotation, so users are derived from
//!   those alone.
//!
//! - The link and user-latency lists the books handed out last (shared allocations that stay
//!   the same until an observation changes), so those are copied only when they changed; users
//!   are derived again when those or an annotated pod changed.
//!
//! Not kept: Lease heartbeats (every kubelet renews every 10 s, so all would change anyway; they
//! are read whole each pass), alerts and Migrations, which are few.
//!
//! Contract: within one input, objects are unique by (namespace, name), as in a reflector store.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use automigrate_core::annotations;
use automigrate_core::model::{
    self, ClusterSnapshot, LinkObservation, PodRef, ProtectedPod, Resources, UserObservation,
};
use automigrate_core::units::{Bytes, MilliCpu};
use foldhash::fast::RandomState;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{
    Inputs, convert_node, is_terminated, migration_records, node_heartbeats, pod_node, pod_order,
    pod_requests, protected_pod, user_observations,
};

/// The address of an object a store handed out.
type Address = usize;

fn address<K>(object: &Arc<K>) -> Address {
    Arc::as_ptr(object).addr()
}

/// The same version of the same object: equal uid and a resourceVersion both have.
fn same_version(old: &ObjectMeta, new: &ObjectMeta) -> bool {
    old.resource_version.is_some()
        && old.resource_version == new.resource_version
        && old.uid == new.uid
}

fn pod_key(pod: &Pod) -> PodRef {
    PodRef::new(
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

/// What one [`IncrementalSnapshot::update`] did, for tracing and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refresh {
    /// Pods translated (new, or changed since the last pass).
    pub pods_translated: usize,
    /// Pods held at a new address with the same resourceVersion: kept as they were.
    pub pods_same_version: usize,
    pub pods_removed: usize,
    pub nodes_translated: usize,
    pub nodes_same_version: usize,
    pub nodes_removed: usize,
    /// Protected pods came or went, so `snapshot.pods` was re-laid out (positions changed).
    pub pods_relaid: bool,
}

#[derive(Debug)]
struct PodEntry {
    object: Arc<Pod>,
    /// What the pod adds to its node's `requested`: it is bound and not terminated.
    load: Option<(String, Resources)>,
    /// Its place in `snapshot.pods`, if it is a protected pod the engine sees.
    position: Option<usize>,
    /// Never reused; stays with the pod while it is known (see [`IncrementalSnapshot::pod_ids`]).
    id: u64,
}

#[derive(Debug)]
struct NodeEntry {
    object: Arc<Node>,
    position: usize,
}

/// Entries in a vector, found by key and by address; a removed entry's slot is reused.
#[derive(Debug)]
struct Table<K, E> {
    entries: Vec<Option<E>>,
    free: Vec<usize>,
    by_key: HashMap<K, usize, RandomState>,
    by_address: HashMap<Address, usize, RandomState>,
}

impl<K: std::hash::Hash + Eq, E> Default for Table<K, E> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::default(),
            by_address: HashMap::default(),
        }
    }
}

impl<K: std::hash::Hash + Eq, E> Table<K, E> {
    fn insert(&mut self, key: K, address: Address, entry: E) -> usize {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.entries[slot] = Some(entry);
                slot
            }
            None => {
                self.entries.push(Some(entry));
                self.entries.len() - 1
            }
        };
        self.by_key.insert(key, slot);
        self.by_address.insert(address, slot);
        slot
    }

    fn remove(&mut self, slot: usize, key: &K, address: Address) -> Option<E> {
        self.by_key.remove(key);
        self.by_address.remove(&address);
        let entry = self.entries.get_mut(slot)?.take();
        if entry.is_some() {
            self.free.push(slot);
        }
        entry
    }

    fn entry_mut(&mut self, slot: usize) -> Option<&mut E> {
        self.entries.get_mut(slot)?.as_mut()
    }

    /// The slots of the entries whose object is not among `objects`.
    fn absent<K2>(&self, objects: &[Arc<K2>], address_of: impl Fn(&E) -> Address) -> Vec<usize> {
        let present: HashSet<Address, RandomState> = objects.iter().map(address).collect();
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| {
                entry
                    .as_ref()
                    .filter(|entry| !present.contains(&address_of(entry)))
                    .map(|_| slot)
            })
            .collect()
    }
}

/// A node's requested resources, exact.
#[derive(Debug, Default, Clone, Copy)]
struct Load {
    cpu: u128,
    memory: u128,
    gpu: u128,
    pods: usize,
}

impl Load {
    fn saturated(self) -> Resources {
        let clamp = |value: u128| u64::try_from(value).unwrap_or(u64::MAX);
        Resources {
            cpu: MilliCpu(clamp(self.cpu)),
            memory: Bytes(clamp(self.memory)),
            gpu: clamp(self.gpu),
        }
    }
}

/// The snapshot, kept between passes. See the module header.
#[derive(Debug, Default)]
pub struct IncrementalSnapshot {
    snapshot: ClusterSnapshot,
    pods: Table<PodRef, PodEntry>,
    /// Per position in `snapshot.pods`: the slot of its entry.
    pod_slots: Vec<usize>,
    /// Per position in `snapshot.pods`: its entry's id.
    pod_ids: Vec<u64>,
    next_pod_id: u64,
    /// Bumped whenever positions in `snapshot.pods` change.
    pod_layout: u64,
    /// Slots of pods whose translation carries a user-latency annotation.
    user_latency: BTreeSet<usize>,
    /// Such a pod changed since `snapshot.users` was derived.
    users_stale: bool,
    /// The inputs `snapshot.users` and `snapshot.links` were made from (held, so an equal
    /// address is the same list).
    queried_users: Option<Arc<[UserObservation]>>,
    links: Option<Arc<[LinkObservation]>>,
    nodes: Table<String, NodeEntry>,
    node_slots: Vec<usize>,
    loads: HashMap<String, Load, RandomState>,
    in_progress: BTreeSet<PodRef>,
}

/// Changes to a vector kept in order, collected during an update and applied at once.
#[derive(Debug)]
struct Layout<T> {
    removed: Vec<usize>,
    added: Vec<(usize, T)>,
}

impl<T> Default for Layout<T> {
    fn default() -> Self {
        Self {
            removed: Vec::new(),
            added: Vec::new(),
        }
    }
}

impl<T> Layout<T> {
    fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }

    /// Drops the items at the removed positions and puts the added ones where `order` says,
    /// moving the others. `items` is sorted by `order` and stays so; `slots` follows it.
    fn apply(
        self,
        items: &mut Vec<T>,
        slots: &mut Vec<usize>,
        order: impl Fn(&T, &T) -> std::cmp::Ordering,
    ) {
        let Self { removed, mut added } = self;
        let mut gone = vec![false; items.len()];
        for position in removed {
            if let Some(flag) = gone.get_mut(position) {
                *flag = true;
            }
        }
        added.sort_by(|a, b| order(&a.1, &b.1));
        // Where each added item goes among the old ones (removed ones included: their keys
        // still sort), found by binary search rather than by comparing every old item.
        let mut places: Vec<usize> = added
            .iter()
            .map(|(_, item)| items.partition_point(|old| order(old, item).is_lt()))
            .collect();
        places.push(usize::MAX);
        let old_items = std::mem::take(items);
        let old_slots = std::mem::take(slots);
        items.reserve(old_items.len() + added.len());
        slots.reserve(old_items.len() + added.len());
        let mut added = added.into_iter().zip(places.iter().copied()).peekable();
        for (position, (item, slot)) in old_items.into_iter().zip(old_slots).enumerate() {
            while let Some(((added_slot, added_item), _)) =
                added.next_if(|(_, place)| *place <= position)
            {
                items.push(added_item);
                slots.push(added_slot);
            }
            if !gone[position] {
                items.push(item);
                slots.push(slot);
            }
        }
        for ((added_slot, added_item), _) in added {
            items.push(added_item);
            slots.push(added_slot);
        }
    }
}

impl IncrementalSnapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// The snapshot as of the last [`update`](Self::update).
    pub fn snapshot(&self) -> &ClusterSnapshot {
        &self.snapshot
    }

    /// The snapshot as of the last update, for the driver's own additions to its migrations
    /// and requests (replaced at every update; nodes and pods must be left as they are).
    pub fn snapshot_mut(&mut self) -> &mut ClusterSnapshot {
        &mut self.snapshot
    }

    /// Per pod of the snapshot, in its order, an id that stays with the pod (namespace/name) as
    /// long as it is known and is never given to another, so a caller can keep things per pod
    /// (a metric handle) across passes and re-layouts.
    pub fn pod_ids(&self) -> &[u64] {
        &self.pod_ids
    }

    /// Changes whenever pods' positions in the snapshot change.
    pub fn pod_layout(&self) -> u64 {
        self.pod_layout
    }

    /// Brings the snapshot up to date with `inputs` at `now`: afterwards it equals
    /// [`build`](super::build)`(&inputs, now)`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn update(&mut self, inputs: Inputs<'_>, now: Timestamp) -> Refresh {
        let mut refresh = Refresh::default();
        self.update_pods(inputs.pods, inputs.checkpoints_in_progress, &mut refresh);
        self.update_in_progress(inputs.checkpoints_in_progress);
        self.update_nodes(inputs.nodes, &mut refresh);
        self.update_heartbeats_and_loads(inputs.leases);
        let queried_same = self
            .queried_users
            .as_ref()
            .is_some_and(|kept| Arc::ptr_eq(kept, &inputs.users));
        if self.users_stale || !queried_same {
            let annotated = self
                .user_latency
                .iter()
                .filter_map(|&slot| self.pods.entries.get(slot)?.as_ref()?.position)
                .filter_map(|position| self.snapshot.pods.get(position));
            self.snapshot.users = user_observations(annotated, &inputs.users);
            self.queried_users = Some(inputs.users);
            self.users_stale = false;
        }
        if !self
            .links
            .as_ref()
            .is_some_and(|kept| Arc::ptr_eq(kept, &inputs.links))
        {
            self.snapshot.links = inputs.links.to_vec();
            self.links = Some(inputs.links);
        }
        let (migrations, requests) = migration_records(inputs.migrations);
        let snapshot = &mut self.snapshot;
        snapshot.taken_at = Some(now);
        snapshot.alerts = inputs.alerts;
        snapshot.migrations = migrations;
        snapshot.requests = requests;
        snapshot.datasets.clear();
        tracing::debug!(?refresh, "snapshot updated");
        refresh
    }

    fn update_pods(
        &mut self,
        pods: &[Arc<Pod>],
        in_progress: &BTreeSet<PodRef>,
        refresh: &mut Refresh,
    ) {
        // Objects the store held at the last update, found by address without reading them;
        // counting them tells whether any entry's object is gone without marking every entry.
        let mut changed: Vec<&Arc<Pod>> = Vec::new();
        let mut known = 0usize;
        for object in pods {
            if self.pods.by_address.contains_key(&address(object)) {
                known += 1;
            } else {
                changed.push(object);
            }
        }
        let mut layout: Layout<ProtectedPod> = Layout::default();
        for object in changed {
            let key = pod_key(object);
            match self.pods.by_key.get(&key).copied() {
                Some(slot) => {
                    let Some(entry) = self.pods.entry_mut(slot) else {
                        continue;
                    };
                    let unchanged = same_version(&entry.object.metadata, &object.metadata);
                    let old = std::mem::replace(&mut entry.object, object.clone());
                    self.pods.by_address.remove(&address(&old));
                    self.pods.by_address.insert(address(object), slot);
                    known += 1;
                    if unchanged {
                        refresh.pods_same_version += 1;
                    } else {
                        refresh.pods_translated += 1;
                        self.translate_pod(slot, in_progress, &mut layout);
                    }
                }
                None => {
                    refresh.pods_translated += 1;
                    self.next_pod_id += 1;
                    let entry = PodEntry {
                        object: object.clone(),
                        load: None,
                        position: None,
                        id: self.next_pod_id,
                    };
                    let slot = self.pods.insert(key, address(object), entry);
                    known += 1;
                    self.translate_pod(slot, in_progress, &mut layout);
                }
            }
        }
        if known < self.pods.by_key.len() {
            for slot in self.pods.absent(pods, |entry| address(&entry.object)) {
                refresh.pods_removed += 1;
                self.remove_pod(slot, &mut layout);
            }
        }
        if !layout.is_empty() {
            refresh.pods_relaid = true;
            layout.apply(&mut self.snapshot.pods, &mut self.pod_slots, pod_order);
            self.pod_ids.clear();
            for (position, &slot) in self.pod_slots.iter().enumerate() {
                if let Some(entry) = self.pods.entry_mut(slot) {
                    entry.position = Some(position);
                    self.pod_ids.push(entry.id);
                }
            }
            self.pod_layout += 1;
        }
    }

    /// Translates the pod in `slot` again: its load on its node, its protected pod (replaced in
    /// place, or queued to be added or removed).
    fn translate_pod(
        &mut self,
        slot: usize,
        in_progress: &BTreeSet<PodRef>,
        layout: &mut Layout<ProtectedPod>,
    ) {
        let Some(entry) = self.pods.entry_mut(slot) else {
            return;
        };
        let pod = &entry.object;
        let load = pod_node(pod)
            .filter(|_| !is_terminated(pod))
            .map(|node| (node.to_string(), pod_requests(pod)));
        let protected = protected_pod(pod, in_progress);
        let old_load = std::mem::replace(&mut entry.load, load.clone());
        let position = entry.position;
        self.move_load(old_load, load);
        let annotated = protected
            .as_ref()
            .is_some_and(|pod| pod.annotations.contains_key(annotations::USER_LATENCY));
        let was_annotated = if annotated {
            !self.user_latency.insert(slot)
        } else {
            self.user_latency.remove(&slot)
        };
        self.users_stale |= annotated || was_annotated;
        match (protected, position) {
            (Some(protected), Some(position)) => {
                if let Some(kept) = self.snapshot.pods.get_mut(position) {
                    *kept = protected;
                }
            }
            (Some(protected), None) => layout.added.push((slot, protected)),
            (None, Some(position)) => {
                layout.removed.push(position);
                if let Some(entry) = self.pods.entry_mut(slot) {
                    entry.position = None;
                }
            }
            (None, None) => {}
        }
    }

    fn remove_pod(&mut self, slot: usize, layout: &mut Layout<ProtectedPod>) {
        let Some(entry) = self.pods.entries.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let key = pod_key(&entry.object);
        let object_address = address(&entry.object);
        let Some(entry) = self.pods.remove(slot, &key, object_address) else {
            return;
        };
        self.move_load(entry.load, None);
        self.users_stale |= self.user_latency.remove(&slot);
        if let Some(position) = entry.position {
            layout.removed.push(position);
        }
    }

    fn move_load(&mut self, from: Option<(String, Resources)>, to: Option<(String, Resources)>) {
        if from == to {
            return;
        }
        if let Some((node, requests)) = from
            && let Some(load) = self.loads.get_mut(&node)
        {
            load.cpu -= u128::from(requests.cpu.0);
            load.memory -= u128::from(requests.memory.0);
            load.gpu -= u128::from(requests.gpu);
            load.pods -= 1;
            if load.pods == 0 {
                self.loads.remove(&node);
            }
        }
        if let Some((node, requests)) = to {
            let load = self.loads.entry(node).or_default();
            load.cpu += u128::from(requests.cpu.0);
            load.memory += u128::from(requests.memory.0);
            load.gpu += u128::from(requests.gpu);
            load.pods += 1;
        }
    }

    /// Marks the pods that started or finished a checkpoint since the last update.
    fn update_in_progress(&mut self, in_progress: &BTreeSet<PodRef>) {
        if *in_progress == self.in_progress {
            return;
        }
        for pod_ref in in_progress.symmetric_difference(&self.in_progress) {
            let position = self
                .pods
                .by_key
                .get(pod_ref)
                .and_then(|&slot| self.pods.entries.get(slot)?.as_ref()?.position);
            if let Some(pod) = position.and_then(|position| self.snapshot.pods.get_mut(position)) {
                pod.checkpoint_in_progress = in_progress.contains(pod_ref);
            }
        }
        self.in_progress.clone_from(in_progress);
    }

    fn update_nodes(&mut self, nodes: &[Arc<Node>], refresh: &mut Refresh) {
        let mut known = 0usize;
        let mut layout: Layout<model::Node> = Layout::default();
        for object in nodes {
            if self.nodes.by_address.contains_key(&address(object)) {
                known += 1;
                continue;
            }
            let Some(name) = object.metadata.name.as_deref() else {
                continue;
            };
            // Heartbeat and requested are filled for every node afterwards.
            let translate = || convert_node(object, None, Resources::default());
            match self.nodes.by_key.get(name).copied() {
                Some(slot) => {
                    let Some(entry) = self.nodes.entry_mut(slot) else {
                        continue;
                    };
                    let unchanged = same_version(&entry.object.metadata, &object.metadata);
                    let old = std::mem::replace(&mut entry.object, object.clone());
                    let position = entry.position;
                    self.nodes.by_address.remove(&address(&old));
                    self.nodes.by_address.insert(address(object), slot);
                    known += 1;
                    if unchanged {
                        refresh.nodes_same_version += 1;
                    } else if let Some(kept) = self.snapshot.nodes.get_mut(position) {
                        refresh.nodes_translated += 1;
                        *kept = translate();
                    }
                }
                None => {
                    refresh.nodes_translated += 1;
                    let entry = NodeEntry {
                        object: object.clone(),
                        position: usize::MAX,
                    };
                    let slot = self.nodes.insert(name.to_string(), address(object), entry);
                    known += 1;
                    layout.added.push((slot, translate()));
                }
            }
        }
        if known < self.nodes.by_key.len() {
            for slot in self.nodes.absent(nodes, |entry| address(&entry.object)) {
                let Some(entry) = self.nodes.entries.get(slot).and_then(Option::as_ref) else {
                    continue;
                };
                let name = entry.object.metadata.name.clone().unwrap_or_default();
                let object_address = address(&entry.object);
                if let Some(entry) = self.nodes.remove(slot, &name, object_address) {
                    refresh.nodes_removed += 1;
                    layout.removed.push(entry.position);
                }
            }
        }
        if !layout.is_empty() {
            layout.apply(&mut self.snapshot.nodes, &mut self.node_slots, |a, b| {
                a.name.cmp(&b.name)
            });
            for (position, &slot) in self.node_slots.iter().enumerate() {
                if let Some(entry) = self.nodes.entry_mut(slot) {
                    entry.position = position;
                }
            }
        }
    }

    /// Every node's heartbeat (from its Lease) and requested resources (from the pods' loads).
    fn update_heartbeats_and_loads(
        &mut self,
        leases: &[Arc<k8s_openapi::api::coordination::v1::Lease>],
    ) {
        let heartbeats: HashMap<&str, Timestamp, RandomState> = node_heartbeats(leases);
        for node in &mut self.snapshot.nodes {
            node.last_heartbeat = heartbeats.get(node.name.as_str()).copied();
            node.requested = self
                .loads
                .get(node.name.as_str())
                .map(|load| load.saturated())
                .unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests;
