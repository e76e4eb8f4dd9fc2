//! A receiver whose disk is full refuses with `NoSpace`, which the sender does not retry (an
//! `Io` refusal it retries, session after session, until its attempts run out). Needs root (it mounts a small
//! tmpfs); with `AUTOMIGRATE_SKIP_PRIVILEGED=1` it skips loudly, otherwise a failed mount fails
//! it by name.

#![cfg(test)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use automigrate_netem::SKIP_PRIVILEGED_ENV;
use automigrate_transfer::receiver::ReceiverConfig;
use automigrate_transfer::sender::SendError;
use automigrate_transfer::wire::ErrorCode;
use common::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(test: &str, point: &Path, size: &str) -> Option<Self> {
        if std::env::var(SKIP_PRIVILEGED_ENV).is_ok_and(|value| value == "1") {
            let _ = writeln!(
                std::io::stderr(),
                "\n************************************************************\n\
                 SKIPPED {test}: {SKIP_PRIVILEGED_ENV}=1 is set.\n\
                 It needs root to mount a tmpfs; it did NOT run.\n\
                 CI never sets {SKIP_PRIVILEGED_ENV}.\n\
                 ************************************************************\n"
            );
            return None;
        }
        std::fs::create_dir_all(point).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "automigrate-test",
            ])
            .arg(point)
            .status();
        assert!(
            status.is_ok_and(|status| status.success()),
            "{test} mounts a tmpfs, which needs root; or set {SKIP_PRIVILEGED_ENV}=1 to skip it (loudly)"
        );
        Some(Self(point.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the filesystem under it has no room left.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 64 * 1024];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::StorageFull => break,
            Err(error) => panic!("filling {}: {error}", path.display()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_receiver_disk_ends_the_transfer_at_once() {
    let test = "a_full_receiver_disk_ends_the_transfer_at_once";
    let base = tempfile::tempdir().unwrap();
    let dest = base.path().join("dest");
    let Some(_mounted) = Tmpfs::mount(test, &dest, "1m") else {
        return;
    };
    fill(&dest.join("ballast"));
    let source = tempfile::tempdir().unwrap();
    write(source.path(), "set/file", &bytes(1, 512 * 1024));
    let pki = pki();
    let running = start_receiver(ReceiverConfig::new(&dest), &pki.receiver, None).await;
    let error = send_refused(source.path(), running.addr, &pki.sender).await;
    match &error {
        SendError::Rejected { code, message } => {
            assert_eq!(*code, ErrorCode::NoSpace, "{message}");
        }
        other => panic!("expected a NoSpace refusal, got {other}"),
    }
    assert!(!dest.join("set/file").exists());
}
