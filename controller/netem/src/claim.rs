//! Host-wide unique network ids, so that emulated networks created at the same time by parallel
//! test threads and by other processes never share a namespace name or a subnet.
//!
//! Data model: id `N` (0..=255) is owned by whoever holds an exclusive `flock` on
//! `/run/automigrate-netem/net-N.lock`. The kernel releases the lock when its holder dies, so a
//! crashed test cannot leak an id. Every namespace of network `N` is named `amnetN-...`; whoever
//! claims an id afterwards also sweeps the namespaces of every network whose lock is free (their
//! owner died without cleaning up, e.g. on SIGKILL). Lock files are never deleted: deleting
//! one while another process is about to lock it would let two owners hold the "same" id.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::namespace::{NETNS_RUN_DIR, run_ip};

/// Directory of the id lock files.
pub const LOCK_DIR: &str = "/run/automigrate-netem";

/// How many networks can exist on one host at once (one /24 each in 10.213.0.0/16).
pub const MAX_NETWORKS: u32 = 256;

/// Why no id could be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The lock directory or a lock file could not be created.
    #[error("cannot create lock file {path}: {source}")]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `flock` failed for a reason other than the id being taken.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: Errno,
    },
    /// Every id is in use.
    #[error("all {MAX_NETWORKS} emulated network ids on this host are in use")]
    Exhausted,
}

/// The namespace name prefix every namespace of network `id` starts with.
pub(crate) fn namespace_prefix(id: u8) -> String {
    format!("amnet{id}-")
}

/// An id held for as long as this value lives.
#[derive(Debug)]
pub(crate) struct NetworkClaim {
    id: u8,
    _lock: Flock<File>,
}

impl NetworkClaim {
    /// The claimed id.
    pub(crate) fn id(&self) -> u8 {
        self.id
    }
}

/// Claims a free id, starting the search at a per-process, per-call offset so concurrent callers
/// rarely contend for the same lock file.
#[tracing::instrument(level = "debug")]
pub(crate) fn claim_network_id() -> Result<NetworkClaim, ClaimError> {
    static NEXT_START: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id()
        .wrapping_mul(31)
        .wrapping_add(NEXT_START.fetch_add(1, Ordering::Relaxed));
    std::fs::create_dir_all(LOCK_DIR).map_err(|source| ClaimError::LockFile {
        path: PathBuf::from(LOCK_DIR),
        source,
    })?;
    for step in 0..MAX_NETWORKS {
        let Ok(id) = u8::try_from(start.wrapping_add(step) % MAX_NETWORKS) else {
            continue;
        };
        if let Some(lock) = try_lock(id)? {
            remove_stale_namespaces(id);
            sweep_dead_networks(id);
            return Ok(NetworkClaim { id, _lock: lock });
        }
    }
    Err(ClaimError::Exhausted)
}

/// The lock of `id` if nobody holds it.
fn try_lock(id: u8) -> Result<Option<Flock<File>>, ClaimError> {
    let path = Path::new(LOCK_DIR).join(format!("net-{id}.lock"));
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ClaimError::LockFile {
            path: path.clone(),
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, source)) => Err(ClaimError::Lock { path, source }),
    }
}

/// The network id a namespace name belongs to, if it is one of ours.
fn network_of(namespace: &str) -> Option<u8> {
    let (id, _) = namespace.strip_prefix("amnet")?.split_once('-')?;
    id.parse().ok()
}

/// Deletes the namespaces of every other network whose lock is free (its owner is gone).
fn sweep_dead_networks(own: u8) {
    let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return;
    };
    let ids: BTreeSet<u8> = entries
        .flatten()
        .filter_map(|entry| network_of(&entry.file_name().to_string_lossy()))
        .filter(|&id| id != own)
        .collect();
    for id in ids {
        // Held only for the sweep; a concurrent claimer of this id just moves on to the next.
        if let Ok(Some(_lock)) = try_lock(id) {
            remove_stale_namespaces(id);
        }
    }
}

/// Deletes namespaces of network `id` left by a holder that died without cleaning up.
fn remove_stale_namespaces(id: u8) {
    let prefix = namespace_prefix(id);
    let Ok(entries) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            match run_ip(&["netns", "delete", &name]) {
                Ok(()) => tracing::warn!(%name, "deleted a namespace left by a dead emulator"),
                Err(error) => tracing::warn!(%name, %error, "could not delete stale namespace"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names_map_back_to_their_network() {
        assert_eq!(network_of("amnet7-pair-0"), Some(7));
        assert_eq!(
            network_of(&format!("{}x-1", namespace_prefix(255))),
            Some(255)
        );
        assert_eq!(network_of("amnet256-x-0"), None);
        assert_eq!(network_of("amnetx-0"), None);
        assert_eq!(network_of("other-ns"), None);
    }
}
