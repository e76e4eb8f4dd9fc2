//! The object store and its write semantics (what an API server's registry does).
//!
//! Data model: `types: BTreeMap<type key, TypeStore>` where the type key is the collection
//! path prefix (`/api/v1/pods`, `/apis/{group}/{version}/{plural}`), and each [`TypeStore`]
//! holds `objects: BTreeMap<(namespace, name), Arc<Value>>` (namespace empty for
//! cluster-scoped objects), the type's kept watch history and its watch channel. Objects are
//! immutable `Arc<Value>`s: a write builds a new value and swaps it in, so lists, watches and
//! history share objects instead of cloning them, and a namespace list is a BTreeMap range.
//!
//! Write rules implemented here (Kubernetes API conventions): one global resourceVersion
//! counter; uid, creationTimestamp and generation set by the server; optimistic concurrency
//! (a stale `metadata.resourceVersion` in a PUT or patch is a 409 Conflict); updates that change
//! nothing are no-ops (no new resourceVersion, no watch event); the `/status` subresource owns
//! `.status` for resources that have one; finalizers turn DELETE into setting
//! `deletionTimestamp`, and the object goes away when an update empties its finalizers and no
//! grace period is pending (`deletionGracePeriodSeconds` 0; a Terminating pod waits for its
//! kubelet's zero-grace DELETE); no new finalizers once deletion started; generateName;
//! DNS-subdomain names.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::path::ResourceType;
use crate::watch::{Change, ChangeKind, Filter, WatchSignal};

/// Store key of one object: (namespace or "", name).
pub(crate) type ObjectKey = (String, String);

/// Tunables of the store (copied from [`crate::FakeClusterOptions`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoreLimits {
    pub history_per_type: usize,
    pub watch_channel_capacity: usize,
    pub graceful_pod_deletion: bool,
}

/// All objects of one resource type.
#[derive(Debug)]
pub(crate) struct TypeStore {
    /// Learned from the first write that named it, else [`ResourceType::default_kind`].
    pub kind: String,
    pub objects: BTreeMap<ObjectKey, Arc<Value>>,
    pub history: VecDeque<Arc<Change>>,
    /// resourceVersion of the newest change dropped from `history`: watches from older
    /// versions get 410 Expired.
    pub compacted_through: u64,
    /// Channel to open watches; created by the first watch, so types nobody watches cost
    /// nothing per write.
    signals: Option<broadcast::Sender<WatchSignal>>,
    channel_capacity: usize,
}

impl TypeStore {
    /// A receiver of every signal sent from now on.
    pub fn subscribe(&mut self) -> broadcast::Receiver<WatchSignal> {
        match &self.signals {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = broadcast::channel(self.channel_capacity);
                self.signals = Some(sender);
                receiver
            }
        }
    }

    fn send(&self, signal: WatchSignal) {
        if let Some(sender) = &self.signals {
            // No open watch is not an error.
            let _ = sender.send(signal);
        }
    }

    /// Objects in one namespace (or all), in (namespace, name) order.
    pub fn scoped<'a>(
        &'a self,
        namespace: Option<&'a str>,
    ) -> Box<dyn Iterator<Item = (&'a ObjectKey, &'a Arc<Value>)> + 'a> {
        match namespace {
            None => Box::new(self.objects.iter()),
            Some(ns) => Box::new(
                self.objects
                    .range((ns.to_owned(), String::new())..)
                    .take_while(move |((object_ns, _), _)| object_ns == ns),
            ),
        }
    }
}

/// How an existing object is to be changed.
#[derive(Debug, Clone)]
pub(crate) enum Update {
    /// PUT: the whole object.
    Replace(Value),
    /// JSON merge patch (also used for strategic merge patches).
    Merge(Value),
    /// RFC 6902 JSON patch.
    Json(Value),
    /// Server-side apply, approximated as create-or-merge.
    Apply(Value),
}

/// Result of a DELETE.
#[derive(Debug, Clone)]
pub(crate) enum Deletion {
    /// Finalizers hold the object; it now carries a deletionTimestamp.
    Pending(Arc<Value>),
    /// The object is gone; this was its last state.
    Removed(Arc<Value>),
}

/// The whole object store.
#[derive(Debug)]
pub(crate) struct Store {
    pub resource_version: u64,
    pub types: BTreeMap<String, TypeStore>,
    limits: StoreLimits,
    uid_counter: u64,
    name_counter: u64,
    frozen_time: Option<jiff::Timestamp>,
}

fn meta(object: &Value) -> Option<&Map<String, Value>> {
    object.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    meta(object)
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn meta_mut(object: &mut Value) -> Option<&mut Map<String, Value>> {
    let map = object.as_object_mut()?;
    let metadata = map.entry("metadata").or_insert_with(|| json!({}));
    if !metadata.is_object() {
        *metadata = json!({});
    }
    metadata.as_object_mut()
}

fn finalizers(object: &Value) -> Vec<&str> {
    meta(object)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `metadata.deletionGracePeriodSeconds`, 0 when absent.
fn deletion_grace(object: &Value) -> i64 {
    meta(object)
        .and_then(|m| m.get("deletionGracePeriodSeconds"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// Whether a write leaves the object deleted: its deletion started, no finalizer holds it, and
/// no grace period is pending. A Terminating pod (grace > 0) stays through status writes and
/// finalizer removal until a zero-grace DELETE, as in the real registry's
/// `shouldDeleteDuringUpdate`.
fn deletion_finished(object: &Value) -> bool {
    meta_str(object, "deletionTimestamp").is_some()
        && finalizers(object).is_empty()
        && deletion_grace(object) == 0
}

/// Everything except metadata and status: what `generation` tracks.
fn spec_part(object: &Value) -> Vec<(&String, &Value)> {
    object
        .as_object()
        .map(|map| {
            map.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "kind" | "apiVersion")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A lowercase RFC 1123 subdomain, as object names must be.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// splitmix64: a deterministic spread of a counter, so generated names are reproducible.
fn spread(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Store {
    pub fn new(limits: StoreLimits) -> Self {
        Store {
            resource_version: 0,
            types: BTreeMap::new(),
            limits,
            uid_counter: 0,
            name_counter: 0,
            frozen_time: None,
        }
    }

    pub fn set_time(&mut self, time: Option<jiff::Timestamp>) {
        self.frozen_time = time;
    }

    /// RFC 3339 seconds-precision timestamp, as the API server writes `metav1.Time`.
    fn now(&self) -> String {
        self.timestamp_in(0)
    }

    /// The timestamp `seconds` from now.
    fn timestamp_in(&self, seconds: i64) -> String {
        let now = self.frozen_time.unwrap_or_else(jiff::Timestamp::now);
        let then = now
            .checked_add(jiff::SignedDuration::from_secs(seconds))
            .unwrap_or(now);
        then.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    }

    fn next_uid(&mut self) -> String {
        self.uid_counter += 1;
        let x = spread(self.uid_counter);
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            x >> 32,
            (x >> 16) & 0xffff,
            x & 0xfff,
            (self.uid_counter >> 48) & 0xfff,
            self.uid_counter & 0xffff_ffff_ffff
        )
    }

    fn generated_suffix(&mut self) -> String {
        // The alphabet of apimachinery's utilrand.String: no vowels, no confusable digits.
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        self.name_counter += 1;
        let mut x = spread(self.name_counter);
        (0..5)
            .map(|_| {
                let c = ALPHABET[(x % ALPHABET.len() as u64) as usize];
                x /= ALPHABET.len() as u64;
                c as char
            })
            .collect()
    }

    /// The type's store, created on first use.
    pub fn type_store(&mut self, resource: &ResourceType) -> &mut TypeStore {
        let capacity = self.limits.watch_channel_capacity.max(1);
        self.types
            .entry(resource.key())
            .or_insert_with(|| TypeStore {
                kind: resource.default_kind(),
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted_through: 0,
                signals: None,
                channel_capacity: capacity,
            })
    }

    pub fn existing(&self, resource: &ResourceType) -> Option<&TypeStore> {
        self.types.get(&resource.key())
    }

    fn learn_kind(&mut self, resource: &ResourceType, object: &Value) {
        if let Some(kind) = object.get("kind").and_then(Value::as_str)
            && !kind.is_empty()
        {
            let store = self.type_store(resource);
            if store.kind != kind {
                store.kind = kind.to_owned();
            }
        }
    }

    fn fill_type_meta(&mut self, resource: &ResourceType, object: &mut Value) {
        let kind = self.type_store(resource).kind.clone();
        if let Some(map) = object.as_object_mut() {
            map.insert("apiVersion".into(), Value::String(resource.api_version()));
            map.entry("kind")
                .and_modify(|k| {
                    if k.as_str().is_none_or(str::is_empty) {
                        *k = Value::String(kind.clone());
                    }
                })
                .or_insert_with(|| Value::String(kind.clone()));
        }
    }

    fn bump(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Records a change in the type's history and tells open watches.
    fn emit(&mut self, resource: &ResourceType, change: Change) {
        let limit = self.limits.history_per_type;
        let store = self.type_store(resource);
        let change = Arc::new(change);
        store.history.push_back(change.clone());
        while store.history.len() > limit {
            if let Some(dropped) = store.history.pop_front() {
                store.compacted_through = dropped.rv;
            }
        }
        store.send(WatchSignal::Change(change));
    }

    fn key(namespace: Option<&str>, name: &str) -> ObjectKey {
        (namespace.unwrap_or_default().to_owned(), name.to_owned())
    }

    fn not_found(resource: &ResourceType, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: resource.plural.clone(),
            group: resource.group.clone(),
            name: name.to_owned(),
        }
    }

    fn conflict(resource: &ResourceType, name: &str, why: &str) -> ApiError {
        ApiError::Conflict {
            resource: resource.plural.clone(),
            group: resource.group.clone(),
            name: name.to_owned(),
            message: format!("Operation cannot be fulfilled on {resource} \"{name}\": {why}"),
        }
    }

    fn invalid(&self, resource: &ResourceType, name: &str, why: &str) -> ApiError {
        let kind = self
            .existing(resource)
            .map_or_else(|| resource.default_kind(), |s| s.kind.clone());
        ApiError::Invalid {
            resource: resource.plural.clone(),
            group: resource.group.clone(),
            name: name.to_owned(),
            message: format!("{kind} \"{name}\" is invalid: {why}"),
        }
    }

    pub fn get(
        &self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Arc<Value>, ApiError> {
        self.existing(resource)
            .and_then(|store| store.objects.get(&Self::key(namespace, name)))
            .cloned()
            .ok_or_else(|| Self::not_found(resource, name))
    }

    /// Matching objects in (namespace, name) order; the list is current at `resource_version`.
    pub fn list(&self, resource: &ResourceType, filter: &Filter) -> Vec<Arc<Value>> {
        let Some(store) = self.existing(resource) else {
            return Vec::new();
        };
        store
            .scoped(filter.namespace.as_deref())
            .filter(|((ns, _), object)| filter.matches(ns, object))
            .map(|(_, object)| object.clone())
            .collect()
    }

    pub fn kind_of(&self, resource: &ResourceType) -> String {
        self.existing(resource)
            .map_or_else(|| resource.default_kind(), |s| s.kind.clone())
    }

    /// POST: creates a new object.
    pub fn create(
        &mut self,
        resource: &ResourceType,
        namespace: Option<&str>,
        mut body: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        if !body.is_object() {
            return Err(ApiError::BadRequest(
                "the body of the request must be a JSON object".into(),
            ));
        }
        self.learn_kind(resource, &body);
        let name = match meta_str(&body, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_owned(),
            None => match meta_str(&body, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => {
                    let prefix = prefix.to_owned();
                    loop {
                        let candidate = format!("{prefix}{}", self.generated_suffix());
                        let taken = self.existing(resource).is_some_and(|s| {
                            s.objects.contains_key(&Self::key(namespace, &candidate))
                        });
                        if !taken {
                            break candidate;
                        }
                    }
                }
                None => {
                    return Err(self.invalid(
                        resource,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        if !valid_name(&name) {
            return Err(self.invalid(
                resource,
                &name,
                &format!(
                    "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        if let Some(ns) = namespace
            && let Some(body_ns) = meta_str(&body, "namespace").filter(|n| !n.is_empty())
            && body_ns != ns
        {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        if meta_str(&body, "resourceVersion").is_some_and(|rv| !rv.is_empty()) {
            return Err(ApiError::Internal(
                "resourceVersion should not be set on objects to be created".into(),
            ));
        }
        let key = Self::key(namespace, &name);
        if self
            .existing(resource)
            .is_some_and(|s| s.objects.contains_key(&key))
        {
            return Err(ApiError::AlreadyExists {
                resource: resource.plural.clone(),
                group: resource.group.clone(),
                name,
            });
        }
        if resource.has_status_subresource()
            && let Some(map) = body.as_object_mut()
        {
            // The status subresource owns .status; a create starts it from scratch.
            if resource.group.is_empty() && resource.plural == "pods" {
                map.insert("status".into(), json!({ "phase": "Pending" }));
            } else {
                map.remove("status");
            }
        }
        let now = self.now();
        let uid = self.next_uid();
        self.fill_type_meta(resource, &mut body);
        let rv = if dry_run {
            self.resource_version
        } else {
            self.bump()
        };
        if let Some(m) = meta_mut(&mut body) {
            m.insert("name".into(), Value::String(name.clone()));
            match namespace {
                Some(ns) => m.insert("namespace".into(), Value::String(ns.to_owned())),
                None => m.remove("namespace"),
            };
            m.insert("uid".into(), Value::String(uid));
            m.insert("creationTimestamp".into(), Value::String(now));
            m.insert("generation".into(), json!(1));
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
        }
        let object = Arc::new(body);
        if dry_run {
            return Ok(object);
        }
        self.type_store(resource)
            .objects
            .insert(key.clone(), object.clone());
        self.emit(
            resource,
            Change {
                rv,
                kind: ChangeKind::Added,
                namespace: key.0,
                object: object.clone(),
                previous: None,
            },
        );
        Ok(object)
    }

    /// PUT / PATCH, on the main resource or (with `status_only`) its `/status` subresource.
    pub fn update(
        &mut self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        update: Update,
        status_only: bool,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let key = Self::key(namespace, name);
        let old = self
            .existing(resource)
            .and_then(|s| s.objects.get(&key))
            .cloned();
        let Some(old) = old else {
            if let Update::Apply(mut body) = update
                && !status_only
            {
                if let Some(m) = meta_mut(&mut body) {
                    m.entry("name")
                        .or_insert_with(|| Value::String(name.to_owned()));
                }
                return self.create(resource, namespace, body, dry_run);
            }
            return Err(Self::not_found(resource, name));
        };
        let candidate = match update {
            Update::Replace(body) => body,
            Update::Merge(patch) | Update::Apply(patch) => {
                if !patch.is_object() {
                    return Err(ApiError::BadRequest(
                        "a merge patch must be a JSON object".into(),
                    ));
                }
                let mut merged = (*old).clone();
                json_patch::merge(&mut merged, &patch);
                merged
            }
            Update::Json(ops) => {
                let ops: json_patch::Patch = serde_json::from_value(ops)
                    .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch: {e}")))?;
                let mut patched = (*old).clone();
                json_patch::patch(&mut patched, &ops).map_err(|e| {
                    self.invalid(
                        resource,
                        name,
                        &format!("JSON patch could not be applied: {e}"),
                    )
                })?;
                patched
            }
        };
        self.commit_update(resource, key, old, candidate, status_only, dry_run)
    }

    fn commit_update(
        &mut self,
        resource: &ResourceType,
        key: ObjectKey,
        old: Arc<Value>,
        candidate: Value,
        status_only: bool,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let name = key.1.clone();
        if !candidate.is_object() {
            return Err(ApiError::BadRequest(
                "the body of the request must be a JSON object".into(),
            ));
        }
        let old_rv = meta_str(&old, "resourceVersion")
            .unwrap_or_default()
            .to_owned();
        if let Some(rv) = meta_str(&candidate, "resourceVersion").filter(|rv| !rv.is_empty())
            && rv != old_rv
        {
            return Err(Self::conflict(
                resource,
                &name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ));
        }
        if let Some(body_name) = meta_str(&candidate, "name").filter(|n| !n.is_empty())
            && body_name != name
        {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if !key.0.is_empty()
            && let Some(body_ns) = meta_str(&candidate, "namespace").filter(|n| !n.is_empty())
            && body_ns != key.0
        {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        if let Some(uid) = meta_str(&candidate, "uid").filter(|u| !u.is_empty())
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(Self::conflict(
                resource,
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }

        let mut new = if status_only {
            let mut new = (*old).clone();
            if let Some(map) = new.as_object_mut() {
                match candidate.get("status") {
                    Some(status) => map.insert("status".into(), status.clone()),
                    None => map.remove("status"),
                };
            }
            new
        } else {
            let mut new = candidate;
            if resource.has_status_subresource()
                && let Some(map) = new.as_object_mut()
            {
                match old.get("status") {
                    Some(status) => map.insert("status".into(), status.clone()),
                    None => map.remove("status"),
                };
            }
            new
        };

        if meta_str(&old, "deletionTimestamp").is_some() {
            let before = finalizers(&old);
            if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(self.invalid(
                    resource,
                    &name,
                    &format!(
                        "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]"
                    ),
                ));
            }
        }

        let old_generation = meta(&old)
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let generation = if !status_only && spec_part(&new) != spec_part(&old) {
            old_generation + 1
        } else {
            old_generation
        };
        self.fill_type_meta(resource, &mut new);
        if let Some(m) = meta_mut(&mut new) {
            let old_meta = meta(&old);
            // Server-owned fields are never taken from the request.
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match old_meta.and_then(|om| om.get(field)) {
                    Some(value) => m.insert(field.into(), value.clone()),
                    None => m.remove(field),
                };
            }
            m.insert("name".into(), Value::String(name.clone()));
            if !key.0.is_empty() {
                m.insert("namespace".into(), Value::String(key.0.clone()));
            }
            m.insert("generation".into(), json!(generation));
            m.insert("resourceVersion".into(), Value::String(old_rv));
        }
        if new == *old {
            // A no-op write: the real server neither bumps resourceVersion nor notifies watches.
            return Ok(old);
        }
        if dry_run {
            return Ok(Arc::new(new));
        }
        let rv = self.bump();
        if let Some(m) = meta_mut(&mut new) {
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let object = Arc::new(new);
        let finished_deleting = deletion_finished(&object);
        let store = self.type_store(resource);
        let kind = if finished_deleting {
            store.objects.remove(&key);
            ChangeKind::Deleted
        } else {
            store.objects.insert(key.clone(), object.clone());
            ChangeKind::Modified
        };
        self.emit(
            resource,
            Change {
                rv,
                kind,
                namespace: key.0,
                object: object.clone(),
                previous: Some(old),
            },
        );
        Ok(object)
    }

    /// DELETE of one object, honouring DeleteOptions preconditions and finalizers.
    pub fn delete(
        &mut self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
        options: &Value,
        dry_run: bool,
    ) -> Result<Deletion, ApiError> {
        let key = Self::key(namespace, name);
        let old = self.get(resource, namespace, name)?;
        if let Some(pre) = options.get("preconditions") {
            if let Some(uid) = pre.get("uid").and_then(Value::as_str)
                && Some(uid) != meta_str(&old, "uid")
            {
                return Err(Self::conflict(
                    resource,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid").unwrap_or_default()
                    ),
                ));
            }
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str)
                && Some(rv) != meta_str(&old, "resourceVersion")
            {
                return Err(Self::conflict(
                    resource,
                    name,
                    &format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        meta_str(&old, "resourceVersion").unwrap_or_default()
                    ),
                ));
            }
        }
        if meta_str(&old, "deletionTimestamp").is_some() {
            return Ok(self.delete_again(resource, key, old, options, dry_run));
        }
        let grace = self.termination_grace(resource, &old, options);
        if grace > 0 || !finalizers(&old).is_empty() {
            if dry_run {
                return Ok(Deletion::Pending(old));
            }
            let mut new = (*old).clone();
            let deadline = self.timestamp_in(grace);
            let rv = self.bump();
            if let Some(m) = meta_mut(&mut new) {
                m.insert("deletionTimestamp".into(), Value::String(deadline));
                m.insert("deletionGracePeriodSeconds".into(), json!(grace));
                m.insert("resourceVersion".into(), Value::String(rv.to_string()));
            }
            let object = Arc::new(new);
            self.type_store(resource)
                .objects
                .insert(key.clone(), object.clone());
            self.emit(
                resource,
                Change {
                    rv,
                    kind: ChangeKind::Modified,
                    namespace: key.0,
                    object: object.clone(),
                    previous: Some(old),
                },
            );
            return Ok(Deletion::Pending(object));
        }
        if dry_run {
            return Ok(Deletion::Removed(old));
        }
        Ok(Deletion::Removed(self.remove_now(resource, key, old)))
    }

    /// DELETE of an object whose deletion already started. As the real registry does, it may
    /// only shorten the pending grace period (an explicit, smaller `gracePeriodSeconds`: the
    /// kubelet's zero-grace confirmation), and the object goes when its grace is 0 and no
    /// finalizer holds it; otherwise the deletion stays pending as it was.
    fn delete_again(
        &mut self,
        resource: &ResourceType,
        key: ObjectKey,
        old: Arc<Value>,
        options: &Value,
        dry_run: bool,
    ) -> Deletion {
        let pending = deletion_grace(&old);
        let shorter = options
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .map(|g| g.max(0))
            .filter(|g| *g < pending);
        let current = match shorter {
            None => old.clone(),
            Some(grace) => {
                let mut new = (*old).clone();
                // The deadline moves by the seconds no longer granted.
                let deadline = meta_str(&old, "deletionTimestamp")
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .and_then(|t| {
                        t.checked_sub(jiff::SignedDuration::from_secs(pending - grace))
                            .ok()
                    })
                    .map_or_else(
                        || self.timestamp_in(grace),
                        |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    );
                if let Some(m) = meta_mut(&mut new) {
                    m.insert("deletionTimestamp".into(), Value::String(deadline));
                    m.insert("deletionGracePeriodSeconds".into(), json!(grace));
                }
                Arc::new(new)
            }
        };
        if dry_run {
            return if deletion_finished(&current) {
                Deletion::Removed(current)
            } else {
                Deletion::Pending(current)
            };
        }
        if deletion_finished(&current) {
            return Deletion::Removed(self.remove_now(resource, key, current));
        }
        if shorter.is_none() {
            return Deletion::Pending(old);
        }
        let mut new = (*current).clone();
        let rv = self.bump();
        if let Some(m) = meta_mut(&mut new) {
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let object = Arc::new(new);
        self.type_store(resource)
            .objects
            .insert(key.clone(), object.clone());
        self.emit(
            resource,
            Change {
                rv,
                kind: ChangeKind::Modified,
                namespace: key.0,
                object: object.clone(),
                previous: Some(old),
            },
        );
        Deletion::Pending(object)
    }

    /// Seconds a DELETE leaves a pod terminating: with graceful pod deletion on, a scheduled
    /// pod stays (deletionTimestamp set) until its kubelet confirms with a zero-grace DELETE.
    fn termination_grace(&self, resource: &ResourceType, old: &Value, options: &Value) -> i64 {
        let scheduled_pod = resource.group.is_empty()
            && resource.plural == "pods"
            && old
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
        if !self.limits.graceful_pod_deletion || !scheduled_pod {
            return 0;
        }
        options
            .get("gracePeriodSeconds")
            .and_then(Value::as_i64)
            .or_else(|| {
                old.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0)
    }

    fn remove_now(
        &mut self,
        resource: &ResourceType,
        key: ObjectKey,
        old: Arc<Value>,
    ) -> Arc<Value> {
        let rv = self.bump();
        let mut last = (*old).clone();
        if let Some(m) = meta_mut(&mut last) {
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let object = Arc::new(last);
        self.type_store(resource).objects.remove(&key);
        self.emit(
            resource,
            Change {
                rv,
                kind: ChangeKind::Deleted,
                namespace: key.0,
                object: object.clone(),
                previous: Some(old),
            },
        );
        object
    }

    /// Test set-up write: create or replace as given (status included), no validation.
    pub fn put_direct(
        &mut self,
        resource: &ResourceType,
        mut object: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let name = meta_str(&object, "name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::BadRequest("put needs metadata.name".into()))?
            .to_owned();
        let namespace = meta_str(&object, "namespace")
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        let key = Self::key(namespace.as_deref(), &name);
        self.learn_kind(resource, &object);
        self.fill_type_meta(resource, &mut object);
        let old = self
            .existing(resource)
            .and_then(|s| s.objects.get(&key))
            .cloned();
        let now = self.now();
        let fresh_uid = self.next_uid();
        let rv = self.bump();
        let generation = match &old {
            None => 1,
            Some(old) => {
                let g = meta(old)
                    .and_then(|m| m.get("generation"))
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                if spec_part(old) != spec_part(&object) {
                    g + 1
                } else {
                    g
                }
            }
        };
        if let Some(m) = meta_mut(&mut object) {
            let old_meta = old.as_deref().and_then(meta);
            for (field, fallback) in [
                ("uid", Value::String(fresh_uid)),
                ("creationTimestamp", Value::String(now)),
            ] {
                if m.get(field)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    let value = old_meta
                        .and_then(|om| om.get(field))
                        .cloned()
                        .unwrap_or(fallback);
                    m.insert(field.into(), value);
                }
            }
            m.insert("generation".into(), json!(generation));
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let object = Arc::new(object);
        let finished_deleting = old.is_some() && deletion_finished(&object);
        let store = self.type_store(resource);
        let kind = if finished_deleting {
            store.objects.remove(&key);
            ChangeKind::Deleted
        } else {
            store.objects.insert(key.clone(), object.clone());
            if old.is_some() {
                ChangeKind::Modified
            } else {
                ChangeKind::Added
            }
        };
        self.emit(
            resource,
            Change {
                rv,
                kind,
                namespace: key.0,
                object: object.clone(),
                previous: old,
            },
        );
        Ok(object)
    }

    /// Test set-up removal: gone at once, finalizers or not.
    pub fn remove_direct(
        &mut self,
        resource: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let key = Self::key(namespace, name);
        let Some(old) = self
            .existing(resource)
            .and_then(|s| s.objects.get(&key))
            .cloned()
        else {
            return false;
        };
        self.remove_now(resource, key, old);
        true
    }

    /// Drops all kept watch history: watches resuming from any older version get 410.
    pub fn compact_history(&mut self) {
        let rv = self.resource_version;
        for store in self.types.values_mut() {
            store.history.clear();
            store.compacted_through = rv;
        }
    }

    /// Sends a signal to every open watch of every type.
    pub fn signal_all(&self, signal: &WatchSignal) {
        for store in self.types.values() {
            store.send(signal.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(StoreLimits {
            history_per_type: 3,
            watch_channel_capacity: 16,
            graceful_pod_deletion: false,
        })
    }

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}})
    }

    #[test]
    fn names_uids_and_history_bound() {
        let cms = ResourceType::new("", "v1", "configmaps");
        let mut s = store();
        let a = s.create(&cms, Some("ns"), cm("a"), false).unwrap();
        assert_eq!(meta_str(&a, "resourceVersion"), Some("1"));
        assert_eq!(meta_str(&a, "namespace"), Some("ns"));
        let generated = s
            .create(
                &cms,
                Some("ns"),
                json!({"metadata": {"generateName": "gen-"}}),
                false,
            )
            .unwrap();
        let gname = meta_str(&generated, "name").unwrap();
        assert!(gname.starts_with("gen-") && gname.len() == 9, "{gname}");
        assert_ne!(meta_str(&a, "uid"), meta_str(&generated, "uid"));
        assert!(matches!(
            s.create(&cms, Some("ns"), cm("Bad_Name"), false),
            Err(ApiError::Invalid { .. })
        ));
        for i in 0..5 {
            s.update(
                &cms,
                Some("ns"),
                "a",
                Update::Merge(json!({"data": {"i": i.to_string()}})),
                false,
                false,
            )
            .unwrap();
        }
        let ts = s.existing(&cms).unwrap();
        assert_eq!(ts.history.len(), 3);
        assert_eq!(ts.compacted_through, s.resource_version - 3);
        assert_eq!(ts.kind, "ConfigMap");
    }

    #[test]
    fn noop_update_keeps_resource_version() {
        let cms = ResourceType::new("", "v1", "configmaps");
        let mut s = store();
        let a = s.create(&cms, None, cm("a"), false).unwrap();
        let same = s
            .update(
                &cms,
                None,
                "a",
                Update::Merge(json!({"data": {"a": "1"}})),
                false,
                false,
            )
            .unwrap();
        assert_eq!(
            meta_str(&same, "resourceVersion"),
            meta_str(&a, "resourceVersion")
        );
        assert_eq!(s.resource_version, 1);
    }
}
