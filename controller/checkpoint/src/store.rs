//! The node-local checkpoint store: where a node keeps the archives of the pods it protects or
//! stands by for.
//!
//! Layout: `<root>/<namespace>/<pod>/<id>/` holds one sealed archive; ids are
//! `<pod>-<sequence>` with a six-digit sequence that grows per pod, so order never depends on a
//! clock. A checkpoint is written into `<root>/<namespace>/<pod>/.staging-<id>/` (a sibling of
//! its final place, so the relative `checkpoint/parent` link CRIU writes for an incremental dump
//! stays valid), sealed, flushed to disk and then renamed into place: a reader sees a complete,
//! sealed archive or nothing. Deletion renames to `.deleting-<id>` first for the same reason.
//! Leftovers of a crash are removed by [`CheckpointStore::open`], which is why a store has one
//! owner at a time (the node's agent): another process opening the same root while the owner
//! writes would take the owner's staging directory for a leftover and delete it. Readers in
//! other processes read archives by path ([`archive::verify_chain`]) instead.
//!
//! Retention keeps, per pod, the newest `count` checkpoints within an optional byte budget, and
//! never removes a checkpoint that a kept one builds on (its parent chain).
//!
//! All methods block on disk I/O (hashing reads every byte); async callers use
//! `tokio::task::spawn_blocking`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::archive::{self, ArchiveError, VerifiedCheckpoint};
use crate::manifest::{CRIU_IMAGES_DIR, DumpKind, Manifest};
use automigrate_core::model::PodRef;

const STAGING_PREFIX: &str = ".staging-";
const DELETING_PREFIX: &str = ".deleting-";
const FAILED_PREFIX: &str = ".failed-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("`{name}` cannot be used as a directory name in the checkpoint store")]
    BadName { name: String },
    #[error("checkpoint {id} of pod {pod} is not in the store")]
    NotFound { pod: PodRef, id: String },
    #[error(
        "checkpoint {id} of pod {pod} is the parent of {child}, which is kept; delete {child} first"
    )]
    ParentOfKept {
        pod: PodRef,
        id: String,
        child: String,
    },
    #[error("checkpoint {id} of pod {pod} is already in the store")]
    AlreadyPresent { pod: PodRef, id: String },
    #[error(
        "sealing a final checkpoint failed ({source}); its files are kept in {dir} for recovery"
    )]
    FinalDumpKept {
        dir: PathBuf,
        source: Box<StoreError>,
    },
    #[error("archive {id} belongs to pod {found}, not {expected}")]
    WrongPod {
        id: String,
        expected: PodRef,
        found: PodRef,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How many checkpoints of a pod to keep, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// At least one is always kept.
    pub count: u32,
    pub max_bytes: Option<u64>,
}

impl From<&automigrate_core::policy::Retention> for Retention {
    fn from(policy: &automigrate_core::policy::Retention) -> Self {
        Self {
            count: policy.count,
            max_bytes: policy.bytes.map(|bytes| bytes.0),
        }
    }
}

/// What [`CheckpointStore::apply_retention`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub kept: Vec<String>,
    pub deleted: Vec<String>,
    pub kept_bytes: u64,
    /// The byte budget could not be met without deleting the newest checkpoint or a parent of a
    /// kept one; the store stays over budget by this much.
    pub over_budget_by: Option<u64>,
}

/// A checkpoint sealed in this node's store: its directory and its manifest as read (not
/// re-verified; [`CheckpointStore::verified`] checks the files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedCheckpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub sequence: Option<u64>,
}

/// A checkpoint being written. Dropping it without [`CheckpointStore::commit`] removes it.
#[derive(Debug)]
pub struct Staging {
    pod: PodRef,
    id: String,
    parent: Option<String>,
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The empty directory the backend writes the archive into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn parent(&self) -> Option<&str> {
        self.parent.as_deref()
    }

    /// The parent's CRIU images directory relative to this checkpoint's images directory,
    /// which is what `criu --prev-images-dir` and `runc --parent-path` want. Valid both while
    /// staging and after the commit, since both are siblings of the parent.
    pub fn parent_images_relative(&self) -> Option<PathBuf> {
        self.parent
            .as_ref()
            .map(|parent| Path::new("../..").join(parent).join(CRIU_IMAGES_DIR))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Debug, Clone)]
pub struct CheckpointStore {
    root: PathBuf,
}

impl CheckpointStore {
    /// Opens (creating) the store at `root` and removes what a crash left half-written.
    ///
    /// The root is made owner-only (0700): a checkpoint is a copy of process memory, keys and
    /// tokens included, and no other local user may reach it (docs/security.md).
    #[tracing::instrument(name = "store_open")]
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(root).map_err(io_error(root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_error(root))?;
        let store = Self {
            root: root.to_path_buf(),
        };
        for pod in store.pods()? {
            let pod_dir = store.pod_dir(&pod)?;
            for entry in fs::read_dir(&pod_dir).map_err(io_error(&pod_dir))? {
                let entry = entry.map_err(io_error(&pod_dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(STAGING_PREFIX) || name.starts_with(DELETING_PREFIX) {
                    tracing::info!(path = %entry.path().display(), "removing leftover of an interrupted write");
                    fs::remove_dir_all(entry.path()).map_err(io_error(&entry.path()))?;
                }
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pod_dir(&self, pod: &PodRef) -> Result<PathBuf, StoreError> {
        Ok(self
            .root
            .join(safe_name(&pod.namespace)?)
            .join(safe_name(&pod.name)?))
    }

    /// Every pod with a directory in the store.
    pub fn pods(&self) -> Result<Vec<PodRef>, StoreError> {
        let mut pods = Vec::new();
        for namespace in sorted_dirs(&self.root)? {
            for name in sorted_dirs(&self.root.join(&namespace))? {
                pods.push(PodRef::new(namespace.clone(), name));
            }
        }
        Ok(pods)
    }

    /// Reserves the next id for `pod` and creates its staging directory. `parent` must be a
    /// checkpoint of the same pod in this store.
    #[tracing::instrument(name = "store_begin", skip(self), fields(pod = %pod))]
    pub fn begin(&self, pod: &PodRef, parent: Option<&str>) -> Result<Staging, StoreError> {
        let pod_dir = self.pod_dir(pod)?;
        fs::create_dir_all(&pod_dir).map_err(io_error(&pod_dir))?;
        if let Some(parent) = parent {
            self.get(pod, parent)?;
        }
        let mut sequence = self.highest_sequence(pod)? + 1;
        loop {
            let id = format!("{}-{sequence:06}", pod.name);
            let dir = pod_dir.join(format!("{STAGING_PREFIX}{id}"));
            match fs::create_dir(&dir) {
                Ok(()) => {
                    tracing::debug!(%id, "staging");
                    return Ok(Staging {
                        pod: pod.clone(),
                        id,
                        parent: parent.map(str::to_string),
                        dir,
                        committed: false,
                    });
                }
                // Another writer reserved this sequence number meanwhile: take the next one.
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => sequence += 1,
                Err(source) => return Err(StoreError::Io { path: dir, source }),
            }
        }
    }

    /// Seals the staged archive (`manifest`'s id, pod and parent are set from the staging) and
    /// moves it into place atomically. If that fails for a final (stop-and-dump) checkpoint, the
    /// staged files are kept as `.failed-<id>` rather than removed: the workload is gone, and
    /// its images are all that is left of it.
    #[tracing::instrument(name = "store_commit", skip_all, fields(id = %staging.id))]
    pub fn commit(
        &self,
        mut staging: Staging,
        mut manifest: Manifest,
    ) -> Result<SealedCheckpoint, StoreError> {
        manifest.id = staging.id.clone();
        manifest.pod = staging.pod.clone();
        manifest.parent = staging.parent.clone();
        let kind = manifest.kind;
        let pod_dir = self.pod_dir(&staging.pod)?;
        match self.publish(&mut staging, manifest, &pod_dir) {
            Err(error) if kind == DumpKind::Final => {
                let kept = pod_dir.join(format!("{FAILED_PREFIX}{}", staging.id));
                if fs::rename(&staging.dir, &kept).is_ok() {
                    staging.committed = true;
                    tracing::error!(dir = %kept.display(), %error, "final checkpoint kept unsealed");
                }
                Err(StoreError::FinalDumpKept {
                    dir: kept,
                    source: Box::new(error),
                })
            }
            result => result,
        }
    }

    fn publish(
        &self,
        staging: &mut Staging,
        manifest: Manifest,
        pod_dir: &Path,
    ) -> Result<SealedCheckpoint, StoreError> {
        let manifest = archive::seal(&staging.dir, manifest)?;
        let final_dir = pod_dir.join(&staging.id);
        fs::rename(&staging.dir, &final_dir).map_err(io_error(&final_dir))?;
        staging.committed = true;
        archive::sync_dir(pod_dir)?;
        tracing::info!(
            bytes = manifest.total_bytes(),
            files = manifest.files.len(),
            "checkpoint stored"
        );
        Ok(SealedCheckpoint {
            dir: final_dir,
            sequence: sequence_of(&staging.pod, &manifest.id),
            manifest,
        })
    }

    /// Imports an exported archive (a tar stream) of `pod`, verifying it before it becomes
    /// visible. Its parent, if any, must be imported first.
    #[tracing::instrument(name = "store_import", skip(self, reader), fields(pod = %pod))]
    pub fn import_tar<R: Read>(
        &self,
        pod: &PodRef,
        reader: R,
    ) -> Result<SealedCheckpoint, StoreError> {
        let pod_dir = self.pod_dir(pod)?;
        fs::create_dir_all(&pod_dir).map_err(io_error(&pod_dir))?;
        let staging = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .tempdir_in(&pod_dir)
            .map_err(io_error(&pod_dir))?;
        let unpacked = staging.path().join("archive");
        let manifest = archive::import_tar(reader, &unpacked)?;
        if &manifest.pod != pod {
            return Err(StoreError::WrongPod {
                id: manifest.id,
                expected: pod.clone(),
                found: manifest.pod,
            });
        }
        let final_dir = pod_dir.join(safe_name(&manifest.id)?);
        if final_dir.exists() {
            return Err(StoreError::AlreadyPresent {
                pod: pod.clone(),
                id: manifest.id,
            });
        }
        // The chain must be whole on this node too, before the archive becomes visible.
        if let Some(parent) = &manifest.parent {
            let parent_dir = pod_dir.join(safe_name(parent)?);
            archive::verify_chain(&parent_dir).map_err(|error| ArchiveError::ParentUnusable {
                archive: final_dir.clone(),
                parent: parent.clone(),
                reason: error.to_string(),
            })?;
        }
        archive::sync_tree(&unpacked)?;
        fs::rename(&unpacked, &final_dir).map_err(io_error(&final_dir))?;
        archive::sync_dir(&pod_dir)?;
        Ok(SealedCheckpoint {
            dir: final_dir,
            sequence: sequence_of(pod, &manifest.id),
            manifest,
        })
    }

    /// The pod's checkpoints, oldest first. A checkpoint whose manifest cannot be read (damaged
    /// on disk) is left out and logged: one damaged archive must not hide the others, which a
    /// restore can still use.
    pub fn list(&self, pod: &PodRef) -> Result<Vec<SealedCheckpoint>, StoreError> {
        let pod_dir = self.pod_dir(pod)?;
        if !pod_dir.exists() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for name in sorted_dirs(&pod_dir)? {
            let dir = pod_dir.join(&name);
            let manifest = match archive::read_manifest(&dir) {
                Ok(manifest) => manifest,
                Err(error) => {
                    tracing::error!(dir = %dir.display(), %error, "stored checkpoint has an unreadable manifest; left out");
                    continue;
                }
            };
            found.push(SealedCheckpoint {
                sequence: sequence_of(pod, &manifest.id),
                dir,
                manifest,
            });
        }
        found.sort_by(|a, b| {
            (a.sequence, a.manifest.created_at).cmp(&(b.sequence, b.manifest.created_at))
        });
        Ok(found)
    }

    /// The newest checkpoint that can be restored (pre-dumps cannot).
    pub fn latest(&self, pod: &PodRef) -> Result<Option<SealedCheckpoint>, StoreError> {
        Ok(self
            .list(pod)?
            .into_iter()
            .rev()
            .find(|stored| stored.manifest.kind.restorable()))
    }

    pub fn get(&self, pod: &PodRef, id: &str) -> Result<SealedCheckpoint, StoreError> {
        let dir = self.pod_dir(pod)?.join(safe_name(id)?);
        match archive::read_manifest(&dir) {
            Ok(manifest) => Ok(SealedCheckpoint {
                sequence: sequence_of(pod, &manifest.id),
                dir,
                manifest,
            }),
            Err(ArchiveError::ManifestMissing { .. }) => Err(StoreError::NotFound {
                pod: pod.clone(),
                id: id.to_string(),
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// Verifies a checkpoint and its parents, as a restore needs.
    #[tracing::instrument(name = "store_verify", skip(self), fields(pod = %pod))]
    pub fn verified(&self, pod: &PodRef, id: &str) -> Result<VerifiedCheckpoint, StoreError> {
        let stored = self.get(pod, id)?;
        Ok(archive::verify_chain(&stored.dir)?)
    }

    /// Deletes one checkpoint; refuses while another stored checkpoint builds on it.
    #[tracing::instrument(name = "store_delete", skip(self), fields(pod = %pod))]
    pub fn delete(&self, pod: &PodRef, id: &str) -> Result<(), StoreError> {
        let stored = self.get(pod, id)?;
        if let Some(child) = self
            .list(pod)?
            .into_iter()
            .find(|other| other.manifest.parent.as_deref() == Some(id))
        {
            return Err(StoreError::ParentOfKept {
                pod: pod.clone(),
                id: id.to_string(),
                child: child.manifest.id,
            });
        }
        self.remove_dir(pod, &stored)
    }

    /// Keeps the newest `retention.count` checkpoints (and the parents they need) within
    /// `retention.max_bytes`, deleting the rest.
    #[tracing::instrument(name = "store_retention", skip(self), fields(pod = %pod))]
    pub fn apply_retention(
        &self,
        pod: &PodRef,
        retention: &Retention,
    ) -> Result<RetentionReport, StoreError> {
        let all = self.list(pod)?;
        let by_id = |id: &str| all.iter().find(|stored| stored.manifest.id == id);
        let mut kept: BTreeSet<String> = BTreeSet::new();
        let mut kept_bytes = 0u64;
        let mut chosen = 0u32;
        for stored in all.iter().rev() {
            if chosen >= retention.count.max(1) {
                break;
            }
            if kept.contains(&stored.manifest.id) {
                chosen += 1;
                continue;
            }
            // This checkpoint and every ancestor not yet kept.
            let mut closure = vec![stored];
            let mut parent = stored.manifest.parent.as_deref();
            while let Some(id) = parent {
                match by_id(id) {
                    Some(ancestor) if !kept.contains(id) => {
                        closure.push(ancestor);
                        parent = ancestor.manifest.parent.as_deref();
                    }
                    _ => break,
                }
            }
            let added: u64 = closure.iter().map(|s| s.manifest.total_bytes()).sum();
            let within_budget = retention
                .max_bytes
                .is_none_or(|budget| kept_bytes + added <= budget);
            if chosen > 0 && !within_budget {
                break;
            }
            kept_bytes += added;
            chosen += 1;
            kept.extend(closure.iter().map(|s| s.manifest.id.clone()));
        }
        let mut report = RetentionReport {
            kept: all
                .iter()
                .filter(|s| kept.contains(&s.manifest.id))
                .map(|s| s.manifest.id.clone())
                .collect(),
            kept_bytes,
            over_budget_by: retention
                .max_bytes
                .filter(|budget| kept_bytes > *budget)
                .map(|budget| kept_bytes - budget),
            ..RetentionReport::default()
        };
        // Newest first, so a child always goes before its parent.
        for stored in all.iter().rev() {
            if !kept.contains(&stored.manifest.id) {
                self.remove_dir(pod, stored)?;
                report.deleted.push(stored.manifest.id.clone());
            }
        }
        tracing::info!(kept = ?report.kept, deleted = ?report.deleted, "retention applied");
        Ok(report)
    }

    fn highest_sequence(&self, pod: &PodRef) -> Result<u64, StoreError> {
        let pod_dir = self.pod_dir(pod)?;
        let mut highest = 0;
        for entry in fs::read_dir(&pod_dir).map_err(io_error(&pod_dir))? {
            let entry = entry.map_err(io_error(&pod_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = [STAGING_PREFIX, FAILED_PREFIX]
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))
                .unwrap_or(&name);
            if let Some(sequence) = sequence_of(pod, id) {
                highest = highest.max(sequence);
            }
        }
        Ok(highest)
    }

    fn remove_dir(&self, pod: &PodRef, stored: &SealedCheckpoint) -> Result<(), StoreError> {
        let pod_dir = self.pod_dir(pod)?;
        let doomed = pod_dir.join(format!("{DELETING_PREFIX}{}", stored.manifest.id));
        fs::rename(&stored.dir, &doomed).map_err(io_error(&stored.dir))?;
        fs::remove_dir_all(&doomed).map_err(io_error(&doomed))?;
        tracing::debug!(id = %stored.manifest.id, "deleted");
        Ok(())
    }
}

fn sequence_of(pod: &PodRef, id: &str) -> Option<u64> {
    id.strip_prefix(&pod.name)?.strip_prefix('-')?.parse().ok()
}

fn safe_name(name: &str) -> Result<&str, StoreError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0');
    if ok {
        Ok(name)
    } else {
        Err(StoreError::BadName {
            name: name.to_string(),
        })
    }
}

/// Names of the visible subdirectories of `dir`, sorted.
fn sorted_dirs(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type().map_err(io_error(dir))?.is_dir() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BackendKind, DumpKind, FORMAT_VERSION};
    use automigrate_core::annotations::CheckpointMode;

    fn pod() -> PodRef {
        PodRef::new("ml", "trainer")
    }

    fn manifest(kind: DumpKind) -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            id: String::new(),
            pod: pod(),
            container: "main".into(),
            backend: BackendKind::CriuProcess,
            runtime: None,
            criu_version: None,
            created_at: "2026-11-22T10:00:00Z".parse().unwrap(),
            parent: None,
            mode: CheckpointMode::Transparent,
            kind,
            freeze: None,
            epoch: None,
            files: Vec::new(),
        }
    }

    /// Stores a checkpoint whose only file has `bytes` bytes.
    fn put(store: &CheckpointStore, parent: Option<&str>, bytes: usize, kind: DumpKind) -> String {
        let staging = store.begin(&pod(), parent).unwrap();
        fs::create_dir(staging.dir().join("checkpoint")).unwrap();
        fs::write(
            staging.dir().join("checkpoint/pages-1.img"),
            vec![1u8; bytes],
        )
        .unwrap();
        if let Some(relative) = staging.parent_images_relative() {
            std::os::unix::fs::symlink(relative, staging.dir().join("checkpoint/parent")).unwrap();
        }
        store.commit(staging, manifest(kind)).unwrap().manifest.id
    }

    fn ids(store: &CheckpointStore) -> Vec<String> {
        store
            .list(&pod())
            .unwrap()
            .into_iter()
            .map(|s| s.manifest.id)
            .collect()
    }

    #[test]
    fn ids_grow_and_list_is_oldest_first() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        let first = put(&store, None, 10, DumpKind::Periodic);
        let second = put(&store, None, 10, DumpKind::Periodic);
        assert_eq!(first, "trainer-000001");
        assert_eq!(second, "trainer-000002");
        assert_eq!(ids(&store), [first, second.clone()]);
        assert_eq!(store.latest(&pod()).unwrap().unwrap().manifest.id, second);
        assert_eq!(store.pods().unwrap(), [pod()]);
    }

    #[test]
    fn a_damaged_manifest_hides_only_its_own_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        let first = put(&store, None, 10, DumpKind::Periodic);
        let second = put(&store, None, 10, DumpKind::Periodic);
        let manifest = store
            .get(&pod(), &second)
            .unwrap()
            .dir
            .join(crate::manifest::MANIFEST_FILE);
        let text = fs::read(&manifest).unwrap();
        fs::write(&manifest, &text[..text.len() / 2]).unwrap();
        assert_eq!(ids(&store), std::slice::from_ref(&first));
        assert_eq!(store.latest(&pod()).unwrap().unwrap().manifest.id, first);
        assert!(store.verified(&pod(), &second).is_err());
        // The damaged one keeps its sequence number: the next id does not reuse it.
        assert_eq!(put(&store, None, 10, DumpKind::Periodic), "trainer-000003");
    }

    #[test]
    fn latest_skips_pre_dumps() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        let full = put(&store, None, 10, DumpKind::Periodic);
        put(&store, Some(&full), 10, DumpKind::PreDump);
        assert_eq!(store.latest(&pod()).unwrap().unwrap().manifest.id, full);
    }

    #[test]
    fn an_uncommitted_staging_is_invisible_and_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        let staging = store.begin(&pod(), None).unwrap();
        fs::write(staging.dir().join("half"), b"x").unwrap();
        let staged_dir = staging.dir().to_path_buf();
        assert!(ids(&store).is_empty());
        // A crash: the staging directory stays behind; opening the store again removes it.
        std::mem::forget(staging);
        assert!(staged_dir.exists());
        CheckpointStore::open(root.path()).unwrap();
        assert!(!staged_dir.exists());
        // Dropping an uncommitted staging removes it too.
        let staging = store.begin(&pod(), None).unwrap();
        let staged_dir = staging.dir().to_path_buf();
        drop(staging);
        assert!(!staged_dir.exists());
    }

    #[test]
    fn a_final_dump_that_cannot_be_sealed_is_kept_for_recovery() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        for kind in [DumpKind::Periodic, DumpKind::Final] {
            let staging = store.begin(&pod(), None).unwrap();
            fs::write(staging.dir().join("pages-1.img"), b"only copy").unwrap();
            // A FIFO cannot be sealed into an archive: sealing fails.
            let fifo = staging.dir().join("fifo");
            assert!(
                std::process::Command::new("mkfifo")
                    .arg(&fifo)
                    .status()
                    .unwrap()
                    .success()
            );
            let id = staging.id().to_string();
            let error = store.commit(staging, manifest(kind)).unwrap_err();
            let kept = store.pod_dir(&pod()).unwrap().join(format!(".failed-{id}"));
            if kind == DumpKind::Final {
                assert!(matches!(error, StoreError::FinalDumpKept { .. }), "{error}");
                assert_eq!(fs::read(kept.join("pages-1.img")).unwrap(), b"only copy");
            } else {
                assert!(matches!(error, StoreError::Archive(_)), "{error}");
                assert!(!kept.exists());
            }
        }
        // Reopening keeps it, it is not listed, and its id (the failed periodic one's was freed
        // and reused: 000001) is not reused again.
        let store = CheckpointStore::open(root.path()).unwrap();
        assert!(ids(&store).is_empty());
        assert!(
            store
                .pod_dir(&pod())
                .unwrap()
                .join(".failed-trainer-000001")
                .exists()
        );
        assert_eq!(put(&store, None, 1, DumpKind::Periodic), "trainer-000002");
    }

    #[test]
    fn retention_by_count_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        for _ in 0..5 {
            put(&store, None, 100, DumpKind::Periodic);
        }
        let report = store
            .apply_retention(
                &pod(),
                &Retention {
                    count: 2,
                    max_bytes: None,
                },
            )
            .unwrap();
        assert_eq!(report.kept, ["trainer-000004", "trainer-000005"]);
        assert_eq!(
            report.deleted,
            ["trainer-000003", "trainer-000002", "trainer-000001"]
        );
        assert_eq!(ids(&store), ["trainer-000004", "trainer-000005"]);
        // The sequence goes on after deletions.
        assert_eq!(put(&store, None, 1, DumpKind::Periodic), "trainer-000006");
    }

    #[test]
    fn retention_by_bytes_keeps_at_least_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        put(&store, None, 300, DumpKind::Periodic);
        put(&store, None, 300, DumpKind::Periodic);
        put(&store, None, 300, DumpKind::Periodic);
        let report = store
            .apply_retention(
                &pod(),
                &Retention {
                    count: 10,
                    max_bytes: Some(700),
                },
            )
            .unwrap();
        assert_eq!(report.kept, ["trainer-000002", "trainer-000003"]);
        assert_eq!(report.kept_bytes, 600);
        assert_eq!(report.over_budget_by, None);

        let report = store
            .apply_retention(
                &pod(),
                &Retention {
                    count: 10,
                    max_bytes: Some(100),
                },
            )
            .unwrap();
        assert_eq!(report.kept, ["trainer-000003"]);
        assert_eq!(report.over_budget_by, Some(200));
    }

    #[test]
    fn retention_never_deletes_the_parent_of_a_kept_incremental() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        let base = put(&store, None, 1000, DumpKind::Periodic); // 1
        let delta1 = put(&store, Some(&base), 10, DumpKind::Periodic); // 2
        let delta2 = put(&store, Some(&delta1), 10, DumpKind::Periodic); // 3
        let unrelated_old = put(&store, None, 10, DumpKind::Periodic); // 4
        let newest = put(&store, Some(&delta2), 10, DumpKind::Periodic); // 5
        let report = store
            .apply_retention(
                &pod(),
                &Retention {
                    count: 1,
                    max_bytes: None,
                },
            )
            .unwrap();
        assert_eq!(
            report.kept,
            [base.clone(), delta1.clone(), delta2.clone(), newest.clone()]
        );
        assert_eq!(report.deleted, [unrelated_old]);
        store.verified(&pod(), &newest).unwrap();

        let error = store.delete(&pod(), &delta1).unwrap_err();
        assert!(
            matches!(&error, StoreError::ParentOfKept { child, .. } if *child == delta2),
            "{error}"
        );
        store.delete(&pod(), &newest).unwrap();
        store.delete(&pod(), &delta2).unwrap();
        store.delete(&pod(), &delta1).unwrap();
        assert_eq!(ids(&store), [base]);
    }

    #[test]
    fn byte_budget_counts_the_chain_a_checkpoint_needs() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        let base = put(&store, None, 500, DumpKind::Periodic);
        let delta = put(&store, Some(&base), 50, DumpKind::Periodic);
        let lone = put(&store, None, 400, DumpKind::Periodic);
        // Newest (lone, 400) fits; delta would need base too (550 more): over 900.
        let report = store
            .apply_retention(
                &pod(),
                &Retention {
                    count: 3,
                    max_bytes: Some(900),
                },
            )
            .unwrap();
        assert_eq!(report.kept, [lone]);
        assert_eq!(report.deleted, [delta, base]);
    }

    #[test]
    fn export_import_between_stores_keeps_the_chain() {
        let source_root = tempfile::tempdir().unwrap();
        let target_root = tempfile::tempdir().unwrap();
        let source = CheckpointStore::open(source_root.path()).unwrap();
        let target = CheckpointStore::open(target_root.path()).unwrap();
        let base = put(&source, None, 5000, DumpKind::Periodic);
        let delta = put(&source, Some(&base), 50, DumpKind::Periodic);

        let delta_tar =
            archive::export_tar(&source.get(&pod(), &delta).unwrap().dir, Vec::new()).unwrap();
        // Without its parent the delta is refused and leaves nothing behind.
        let error = target.import_tar(&pod(), delta_tar.as_slice()).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::Archive(ArchiveError::ParentUnusable { .. })
            ),
            "{error}"
        );
        assert!(matches!(
            target.get(&pod(), &delta).unwrap_err(),
            StoreError::NotFound { .. }
        ));
        assert!(target.list(&pod()).unwrap().is_empty());

        let base_tar =
            archive::export_tar(&source.get(&pod(), &base).unwrap().dir, Vec::new()).unwrap();
        target.import_tar(&pod(), base_tar.as_slice()).unwrap();
        target.import_tar(&pod(), delta_tar.as_slice()).unwrap();
        let verified = target.verified(&pod(), &delta).unwrap();
        assert_eq!(verified.ancestors()[0].1.id, base);
        assert!(matches!(
            target.import_tar(&pod(), base_tar.as_slice()).unwrap_err(),
            StoreError::AlreadyPresent { .. }
        ));
        // The next local checkpoint continues the imported sequence.
        assert_eq!(
            put(&target, Some(&delta), 1, DumpKind::Periodic),
            "trainer-000003"
        );
    }

    #[test]
    fn the_store_root_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        CheckpointStore::open(&root).unwrap();
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "checkpoints hold process memory: {mode:o}");
    }

    #[test]
    fn names_that_would_escape_the_store_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(root.path()).unwrap();
        for bad in ["..", "a/b", "", ".hidden"] {
            assert!(matches!(
                store.begin(&PodRef::new(bad, "x"), None).unwrap_err(),
                StoreError::BadName { .. }
            ));
        }
    }

    #[test]
    fn retention_from_policy() {
        let policy = automigrate_core::policy::Retention {
            count: 4,
            bytes: Some(automigrate_core::units::Bytes(1 << 30)),
        };
        assert_eq!(
            Retention::from(&policy),
            Retention {
                count: 4,
                max_bytes: Some(1 << 30)
            }
        );
    }
}
