//! Receiving: the agent's transfer receiver writes under the data root; checkpoints from peers
//! arrive in `<data root>/.automigrate-incoming/checkpoints/<namespace>/<pod>/<id>/` and are
//! moved into the checkpoint store here, once they verify.
//!
//! The transfer engine makes each file visible only when it is complete and matches its hash,
//! but a checkpoint is many files: an archive is complete when every file its manifest lists is
//! there and verifies ([`archive::verify`]). So [`ingest`] looks at each incoming archive:
//! - no manifest yet, or a listed file still missing: not complete, left for later;
//! - any other verification failure (a hash, a size, an extra file, a manifest that names
//!   another pod or id): refused, removed, counted and logged: a receiver never lists an
//!   archive that does not verify;
//! - already in the store: the copy is dropped;
//! - its parent not (yet) in the store: left for later (parents are ingested first, in sequence
//!   order, when they came in the same transfer);
//! - otherwise it is flushed and renamed into the store (same filesystem), or copied through
//!   the store's tar import (which verifies again) when the data root and the store are on
//!   different filesystems.
//!
//! [`ingest`] runs when a listing or an image asks for checkpoints and whenever the receiver
//! completes files (see [`crate::server`]).

use std::fs;
use std::path::{Path, PathBuf};

use automigrate_checkpoint::archive::{self, ArchiveError};
use automigrate_checkpoint::manifest::{CRIU_IMAGES_DIR, FileEntry, Manifest};
use automigrate_checkpoint::store::StoreError;
use automigrate_core::model::PodRef;

use crate::agent::{Agent, AgentError};
use crate::metrics::names;

/// What one [`ingest`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// `(pod, id)` moved into the store.
    pub stored: Vec<(PodRef, String)>,
    /// `(pod, id, reason)` refused and removed.
    pub refused: Vec<(PodRef, String, String)>,
    /// Archives still arriving (or waiting for their parent).
    pub pending: usize,
    /// Pods whose store changed (retention runs for them next).
    pub pods: Vec<PodRef>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |error| AgentError::Internal(format!("{}: {error}", path.display()))
}

fn sorted_subdirs(dir: &Path) -> Result<Vec<String>, AgentError> {
    let mut names = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(error) => return Err(io(dir)(error)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type().map_err(io(dir))?.is_dir() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// One pass over the incoming directory. Blocking.
#[tracing::instrument(name = "ingest", skip_all)]
pub fn ingest(agent: &Agent) -> Result<IngestReport, AgentError> {
    let root = agent.incoming_checkpoints_dir();
    let mut report = IngestReport::default();
    for namespace in sorted_subdirs(&root)? {
        let namespace_dir = root.join(&namespace);
        for pod_name in sorted_subdirs(&namespace_dir)? {
            let pod = PodRef::new(&namespace, &pod_name);
            let pod_dir = namespace_dir.join(&pod_name);
            let mut ids = sorted_subdirs(&pod_dir)?;
            // Parents before children: ids are `<pod>-<sequence>`.
            ids.sort_by_key(|id| sequence_of(&pod_name, id));
            let mut changed = false;
            for id in ids {
                match ingest_one(agent, &pod, &pod_dir.join(&id), &id) {
                    Outcome::Stored => {
                        agent.mark_verified(&namespace, &pod_name, &id);
                        count(agent, "stored");
                        tracing::info!(%pod, %id, "received checkpoint verified and stored");
                        report.stored.push((pod.clone(), id));
                        changed = true;
                    }
                    Outcome::Duplicate => {}
                    Outcome::Pending(why) => {
                        tracing::debug!(%pod, %id, %why, "received checkpoint not complete yet");
                        report.pending += 1;
                    }
                    Outcome::Refused(reason) => {
                        count(agent, "refused");
                        tracing::error!(%pod, %id, %reason, "received checkpoint refused and removed");
                        report.refused.push((pod.clone(), id, reason));
                    }
                }
            }
            if changed {
                report.pods.push(pod);
            }
        }
    }
    Ok(report)
}

fn count(agent: &Agent, result: &str) {
    agent
        .metrics_ref()
        .counter(names::RECEIVED_CHECKPOINTS, &[("result", result)])
        .increment(1);
}

fn sequence_of(pod: &str, id: &str) -> (u64, String) {
    let sequence = id
        .strip_prefix(pod)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(u64::MAX);
    (sequence, id.to_string())
}

enum Outcome {
    Stored,
    Duplicate,
    Pending(String),
    Refused(String),
}

fn ingest_one(agent: &Agent, pod: &PodRef, dir: &Path, id: &str) -> Outcome {
    let store = agent.store();
    let refuse = |reason: String| {
        if let Err(error) = fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), %error, "could not remove a refused archive");
        }
        Outcome::Refused(reason)
    };
    if let Err(outcome) = restore_symlinks(dir).and_then(|listed| all_files_present(dir, &listed)) {
        return match outcome {
            Outcome::Refused(reason) => refuse(reason),
            other => other,
        };
    }
    // Complete: now every byte is read and hashed.
    let manifest = match archive::verify(dir) {
        Ok(manifest) => manifest,
        Err(ArchiveError::ManifestMissing { .. }) => {
            return Outcome::Pending("no manifest yet".into());
        }
        Err(ArchiveError::MissingFile { file, .. }) => {
            return Outcome::Pending(format!("`{file}` not here yet"));
        }
        Err(error) => return refuse(error.to_string()),
    };
    if manifest.id != id || &manifest.pod != pod {
        return refuse(format!(
            "its manifest names checkpoint {} of pod {}, but it arrived as {id} of {pod}",
            manifest.id, manifest.pod
        ));
    }
    match store.get(pod, id) {
        Ok(_) => {
            tracing::debug!(%pod, %id, "already in the store; dropping the received copy");
            let _ = fs::remove_dir_all(dir);
            return Outcome::Duplicate;
        }
        Err(StoreError::NotFound { .. }) => {}
        Err(error) => return Outcome::Pending(format!("store: {error}")),
    }
    if let Some(parent) = &manifest.parent {
        match store.verified(pod, parent) {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => {
                return Outcome::Pending(format!("waiting for parent {parent}"));
            }
            Err(error) => return refuse(format!("its parent {parent} does not verify: {error}")),
        }
    }
    match move_into_store(agent, pod, dir, id) {
        Ok(()) => Outcome::Stored,
        Err(error) => Outcome::Pending(format!("moving into the store: {error}")),
    }
}

/// Whether every listed file has arrived, from metadata only: hashing an archive that is still
/// arriving, on every pass, would read gigabytes for nothing.
fn all_files_present(dir: &Path, manifest: &Manifest) -> Result<(), Outcome> {
    for entry in &manifest.files {
        if let FileEntry::File { path, .. } = entry
            && fs::symlink_metadata(dir.join(path)).is_err()
        {
            return Err(Outcome::Pending(format!("`{path}` not here yet")));
        }
    }
    Ok(())
}

/// Makes the symlinks the manifest lists (the transfer engine sends regular files only), and
/// returns the manifest. The only link an archive may hold is the one CRIU links an
/// incremental dump to its parent's images with, `checkpoint/parent -> ../../<parent
/// id>/checkpoint`; anything else is refused.
fn restore_symlinks(dir: &Path) -> Result<Manifest, Outcome> {
    let manifest = match archive::read_manifest(dir) {
        Ok(manifest) => manifest,
        Err(ArchiveError::ManifestMissing { .. }) => {
            return Err(Outcome::Pending("no manifest yet".into()));
        }
        Err(error) => return Err(Outcome::Refused(error.to_string())),
    };
    for entry in &manifest.files {
        let FileEntry::Symlink { path, target } = entry else {
            continue;
        };
        let expected = manifest
            .parent
            .as_ref()
            .map(|parent| format!("../../{parent}/{CRIU_IMAGES_DIR}"));
        let allowed = path == &format!("{CRIU_IMAGES_DIR}/parent")
            && expected.as_deref() == Some(target.as_str())
            && manifest
                .parent
                .as_deref()
                .is_some_and(|parent| crate::api::validate_checkpoint_id(parent).is_ok());
        if !allowed {
            return Err(Outcome::Refused(format!(
                "symlink `{path}` -> `{target}` is not the link to its parent's images"
            )));
        }
        let link = dir.join(path);
        if fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        let made = link
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| std::os::unix::fs::symlink(target, &link));
        if let Err(error) = made {
            return Err(Outcome::Pending(format!("making {path}: {error}")));
        }
    }
    Ok(manifest)
}

/// Renames a verified archive into the store, or copies it through a tar stream across
/// filesystems.
fn move_into_store(agent: &Agent, pod: &PodRef, dir: &Path, id: &str) -> Result<(), AgentError> {
    let store = agent.store();
    let pod_dir = store.pod_dir(pod)?;
    fs::create_dir_all(&pod_dir).map_err(io(&pod_dir))?;
    let final_dir: PathBuf = pod_dir.join(id);
    archive::sync_tree(dir).map_err(|error| AgentError::Internal(error.to_string()))?;
    match fs::rename(dir, &final_dir) {
        Ok(()) => {
            archive::sync_dir(&pod_dir).map_err(|error| AgentError::Internal(error.to_string()))
        }
        Err(error) if error.kind() == std::io::ErrorKind::CrossesDevices => {
            tracing::debug!("data root and store on different filesystems: copying");
            copy_through_tar(agent, pod, dir)?;
            fs::remove_dir_all(dir).map_err(io(dir))
        }
        Err(error) => Err(io(&final_dir)(error)),
    }
}

fn copy_through_tar(agent: &Agent, pod: &PodRef, dir: &Path) -> Result<(), AgentError> {
    let (reader, writer) = std::io::pipe().map_err(io(dir))?;
    let source = dir.to_path_buf();
    let exporter = std::thread::spawn(move || archive::export_tar(&source, writer).map(drop));
    let imported = agent.store().import_tar(pod, reader);
    let exported = exporter
        .join()
        .map_err(|_| AgentError::Internal("tar export thread panicked".into()))?;
    imported?;
    exported.map_err(|error| AgentError::Internal(error.to_string()))
}
