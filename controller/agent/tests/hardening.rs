//! Regression tests for issue 14 (the agent's part): dataset confinement that cannot race,
//! bounded HTTP connections, and error answers that say what the README promises.
#![cfg(feature = "server")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use automigrate_transfer::manifest::{MIN_CHUNK_SIZE, scan};
use common::{Pki, Setup, start_agent, write};

/// The check and the read are one step: after `dataset_source` has checked `sets/ds`, its
/// parent directory is swapped for a symlink to a tree outside the data root holding the same
/// names. Reading the source must not list or read that tree (it did: the check resolved the
/// path, and the scan then read the path string again, following the new symlink).
#[tokio::test]
async fn a_dataset_swapped_for_a_symlink_after_the_check_is_not_read_outside_the_root() {
    let pki = Pki::new();
    let a = start_agent(&pki, "node-a", Setup::default()).await;
    write(&a.data_root(), "sets/ds/inside", b"in");
    let outside = tempfile::tempdir().unwrap();
    write(outside.path(), "ds/secret", b"from outside the data root");

    let source = a.agent().dataset_source("sets/ds").unwrap();
    std::fs::rename(a.data_root().join("sets"), a.data_root().join("sets.old")).unwrap();
    std::os::unix::fs::symlink(outside.path(), a.data_root().join("sets")).unwrap();

    let scanned = tokio::task::spawn_blocking(move || scan(&source, None, MIN_CHUNK_SIZE, 1))
        .await
        .unwrap();
    if let Ok(scanned) = scanned {
        let files: Vec<_> = scanned
            .manifest
            .files
            .iter()
            .map(|file| file.path.to_string())
            .collect();
        panic!("the swapped-in tree outside the data root was read: {files:?}");
    }
}
