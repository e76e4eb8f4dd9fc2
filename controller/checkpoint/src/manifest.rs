//! The manifest of a checkpoint archive (`automigrate-manifest.json`) and the archive's layout.
//!
//! An archive is a directory laid out like the container checkpoint archives that the kubelet
//! (CRI-O, containerd) writes and that `checkpointctl` reads, plus our manifest:
//!
//! ```text
//! <id>/
//!   automigrate-manifest.json   this file: who, how, when, parent, freeze, and every file's hash
//!   checkpoint/                 CRIU images (runc and process backends, kubelet archives)
//!   config.dump                 container metadata, checkpointctl's `ContainerConfig` fields
//!   spec.dump                   the container's OCI runtime spec (config.json)
//!   stats-dump                  CRIU's dump statistics, where checkpointctl looks for them
//!   rootfs-diff.tar             changes to the container's root filesystem (kubelet archives)
//!   app/                        files an application-mode workload saved itself
//! ```
//!
//! The manifest lists EVERY other file with its size and BLAKE3 hash (and symlinks with their
//! target: CRIU links an incremental dump to its parent with `checkpoint/parent`), so a copy
//! can be checked end to end before anything is restored from it.

use std::time::Duration;

use automigrate_core::annotations::CheckpointMode;
use automigrate_core::model::PodRef;
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "automigrate-manifest.json";
pub const CRIU_IMAGES_DIR: &str = "checkpoint";
pub const CONFIG_DUMP_FILE: &str = "config.dump";
pub const SPEC_DUMP_FILE: &str = "spec.dump";
pub const ROOTFS_DIFF_TAR: &str = "rootfs-diff.tar";
pub const APP_FILES_DIR: &str = "app";

/// Which backend took the checkpoint (and so which one can restore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    /// `runc checkpoint` of a container.
    Runc,
    /// `criu dump -t PID` of a plain process tree.
    CriuProcess,
    /// The kubelet's checkpoint API (CRI-O or containerd underneath).
    Kubelet,
    /// The workload saved its own state when signalled.
    Application,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Runc => "runc",
            Self::CriuProcess => "criu-process",
            Self::Kubelet => "kubelet",
            Self::Application => "application",
        })
    }
}

/// What kind of dump an archive holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DumpKind {
    /// Stop and dump: the workload is gone afterwards (a migration's last checkpoint).
    Final,
    /// Dump and leave running (`--leave-running`): a periodic checkpoint.
    Periodic,
    /// Memory only, workload left running; not restorable alone, only as a parent.
    PreDump,
}

impl DumpKind {
    pub fn restorable(self) -> bool {
        !matches!(self, Self::PreDump)
    }
}

/// How the freeze duration was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FreezeSource {
    /// `frozen_time` from CRIU's `stats-dump`.
    CriuStats,
    /// The wall-clock time of the whole checkpoint step (no better source was available).
    WallClock,
    /// From the signal to the completion marker of an application-mode checkpoint.
    Application,
}

/// How long the workload was stopped to take the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Freeze {
    pub micros: u64,
    pub source: FreezeSource,
}

impl Freeze {
    pub fn new(duration: Duration, source: FreezeSource) -> Self {
        Self {
            micros: u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            source,
        }
    }

    pub fn duration(&self) -> Duration {
        Duration::from_micros(self.micros)
    }
}

/// One file of the archive, relative to its root with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum FileEntry {
    File {
        path: String,
        size: u64,
        blake3: String,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl FileEntry {
    pub fn path(&self) -> &str {
        match self {
            Self::File { path, .. } | Self::Symlink { path, .. } => path,
        }
    }

    pub fn size(&self) -> u64 {
        match self {
            Self::File { size, .. } => *size,
            Self::Symlink { .. } => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub pod: PodRef,
    pub container: String,
    pub backend: BackendKind,
    /// The container runtime and its version, when one was involved (`runc 1.1.5+ds1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_version: Option<String>,
    pub created_at: jiff::Timestamp,
    /// The checkpoint whose images this one builds on; it must be present to restore this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub mode: CheckpointMode,
    pub kind: DumpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<Freeze>,
    /// Training progress the workload reported with the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Bytes of all files (not counting the manifest itself).
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(FileEntry::size).sum()
    }

    /// What the decision engine needs to know about this checkpoint.
    pub fn to_checkpoint_info(
        &self,
        held_on: Vec<automigrate_core::model::NodeName>,
    ) -> automigrate_core::model::CheckpointInfo {
        automigrate_core::model::CheckpointInfo {
            id: self.id.clone(),
            taken_at: self.created_at,
            size: automigrate_core::units::Bytes(self.total_bytes()),
            freeze: self.freeze.map(|freeze| freeze.duration()),
            held_on,
            epoch: self.epoch,
        }
    }
}

/// `config.dump`: the container metadata that `checkpointctl show` reads (the fields of its
/// `ContainerConfig`, which follow Podman's and CRI-O's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerConfigDump {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_image_name: Option<String>,
    #[serde(rename = "runtime")]
    pub runtime: String,
    pub created_time: jiff::Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed_time: Option<jiff::Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest is written into every archive and read back by other nodes and other
    /// versions: its JSON must not change when the Rust types behind it move or are renamed.
    #[test]
    fn manifest_json_keeps_its_shape() {
        let json = serde_json::json!({
            "formatVersion": 1,
            "id": "trainer-000003",
            "pod": {"namespace": "ml", "name": "trainer"},
            "container": "main",
            "backend": "criu-process",
            "runtime": "runc 1.1.5",
            "criuVersion": "3.19",
            "createdAt": "2026-11-22T10:00:00Z",
            "parent": "trainer-000002",
            "mode": "transparent",
            "kind": "periodic",
            "freeze": {"micros": 527000, "source": "criuStats"},
            "epoch": 7,
            "files": [
                {"type": "file", "path": "checkpoint/pages-1.img", "size": 4096, "blake3": "ab"},
                {"type": "symlink", "path": "checkpoint/parent", "target": "../x/checkpoint"}
            ]
        });
        let manifest: Manifest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(manifest.pod.namespace, "ml");
        assert_eq!(manifest.pod.name, "trainer");
        assert_eq!(manifest.pod.to_string(), "ml/trainer");
        assert_eq!(serde_json::to_value(&manifest).unwrap(), json);

        // A misspelt or extra field in the pod is an error, not silently dropped.
        let mut extra = json;
        extra["pod"]["uid"] = serde_json::json!("u1");
        assert!(serde_json::from_value::<Manifest>(extra).is_err());
    }
}
