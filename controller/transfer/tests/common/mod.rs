//! Helpers shared by the integration tests: a development PKI, a receiver on loopback, source
//! trees and byte-for-byte comparison.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use automigrate_transfer::devcerts::DevCa;
use automigrate_transfer::manifest::Source;
use automigrate_transfer::receiver::{Receiver, ReceiverConfig, ReceiverStats};
use automigrate_transfer::sender::{SendError, SendOptions, send};
use automigrate_transfer::tls::TlsConfig;

/// A CA with two node identities.
pub struct Pki {
    pub ca_pem: String,
    pub sender: TlsConfig,
    pub receiver: TlsConfig,
}

pub fn pki() -> Pki {
    let ca = DevCa::generate("test CA", 2).unwrap();
    let identity = |name: &str| {
        let node = ca
            .node(name, &["127.0.0.1".into(), "localhost".into()], 2)
            .unwrap();
        TlsConfig::from_pem(
            ca.cert_pem().as_bytes(),
            node.cert_pem.as_bytes(),
            node.key_pem.as_bytes(),
        )
        .unwrap()
    };
    Pki {
        ca_pem: ca.cert_pem().to_owned(),
        sender: identity("node-a"),
        receiver: identity("node-b"),
    }
}

/// A receiver serving on 127.0.0.1 in the background; dropping it stops it.
pub struct Running {
    pub receiver: Receiver,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn stop(self) {
        self.task.abort();
    }

    /// The counters once every connection the receiver accepted has been closed.
    ///
    /// A refused peer can see its refusal (the TLS alert, or a closed socket) before the
    /// receiver's connection task has counted it, so counters read right after a refused send
    /// race with that task. A closed connection's counters are all visible (see
    /// `OpenConnection`), so waiting for the close makes the reading exact. The wait ends on the
    /// close; its ceiling only turns a receiver that never closes into a failure, not a hang.
    pub async fn settled(&self) -> ReceiverStats {
        let ceiling = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let stats = self.receiver.stats();
            if stats.connections_accepted > 0 && stats.connections_open == 0 {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < ceiling,
                "the receiver still holds a connection open: {stats:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_receiver(
    config: ReceiverConfig,
    tls: &TlsConfig,
    addr: Option<SocketAddr>,
) -> Running {
    let listener =
        tokio::net::TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()))
            .await
            .unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = Receiver::new(config, tls).unwrap();
    let serving = receiver.clone();
    let task = tokio::spawn(async move {
        let _ = serving.serve(listener).await;
    });
    Running {
        receiver,
        addr,
        task,
    }
}

/// Deterministic bytes: a cheap generator seeded per file, so contents differ between files.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn write(root: &Path, relative: &str, data: &[u8]) {
    let path = root.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// Large, small, empty files and nested and empty directories.
pub fn mixed_tree(root: &Path, large: usize, large_size: usize, small: usize, small_size: usize) {
    for index in 0..large {
        write(
            root,
            &format!("large/file-{index}.bin"),
            &bytes(index as u64 + 1, large_size + index * 7),
        );
    }
    for index in 0..small {
        write(
            root,
            &format!("small/d{}/s-{index}.txt", index % 5),
            &bytes(1000 + index as u64, small_size + index % 13),
        );
    }
    write(root, "empty-file", b"");
    write(root, "deep/a/b/c/zero", b"");
    std::fs::create_dir_all(root.join("empty-dir/inside-empty")).unwrap();
}

/// Every file (relative path → BLAKE3) and every directory under `root`, staging excluded.
pub fn snapshot(root: &Path) -> (BTreeMap<String, [u8; 32]>, Vec<String>) {
    let mut files = BTreeMap::new();
    let mut dirs = Vec::new();
    fn walk(
        base: &Path,
        dir: &Path,
        files: &mut BTreeMap<String, [u8; 32]>,
        dirs: &mut Vec<String>,
    ) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let relative = path
                .strip_prefix(base)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            if relative == ".automigrate-staging" {
                continue;
            }
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                dirs.push(relative);
                walk(base, &path, files, dirs);
            } else {
                files.insert(
                    relative,
                    *blake3::hash(&std::fs::read(&path).unwrap()).as_bytes(),
                );
            }
        }
    }
    walk(root, root, &mut files, &mut dirs);
    (files, dirs)
}

pub fn assert_same_tree(source: &Path, dest: &Path) {
    let (source_files, source_dirs) = snapshot(source);
    let (dest_files, dest_dirs) = snapshot(dest);
    assert_eq!(source_files.len(), dest_files.len(), "file count differs");
    for (path, hash) in &source_files {
        assert_eq!(
            dest_files.get(path),
            Some(hash),
            "{path} differs or is missing"
        );
    }
    assert_eq!(source_dirs, dest_dirs);
}

/// Staging directories left under the destination (should be none after completion).
pub fn staging_leftovers(dest: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dest.join(".automigrate-staging")) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

pub fn progress_counter() -> (
    automigrate_transfer::sender::ProgressFn,
    Arc<std::sync::atomic::AtomicU64>,
) {
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = done.clone();
    let callback: automigrate_transfer::sender::ProgressFn = Arc::new(move |progress| {
        seen.store(progress.bytes_done, std::sync::atomic::Ordering::Relaxed);
    });
    (callback, done)
}

/// Sends the directory `source` to `to` with default options, expecting the transfer to fail.
pub async fn send_refused(source: &Path, to: SocketAddr, tls: &TlsConfig) -> SendError {
    send(
        &Source::Dir(source.into()),
        to,
        tls,
        &SendOptions::default(),
    )
    .await
    .unwrap_err()
}
