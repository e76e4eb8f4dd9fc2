//! Shared by the integration tests: the privileged-test gate, the counter workload and cleanup.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const SKIP_VARIABLE: &str = "AUTOMIGRATE_SKIP_PRIVILEGED";

/// Returns true when the test may run. With `AUTOMIGRATE_SKIP_PRIVILEGED=1` it says loudly that
/// it skips; otherwise a missing prerequisite FAILS the test, naming it and the install script.
pub fn privileged(test: &str) -> bool {
    if std::env::var(SKIP_VARIABLE).as_deref() == Ok("1") {
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests, and a
        // skip must never be silent.
        let _ = writeln!(
            std::io::stderr(),
            "\n************************************************************\n\
             SKIPPED {test}: {SKIP_VARIABLE}=1 is set.\n\
             This test needs root, CRIU >= 4 (criu check passing) and runc;\n\
             it did NOT run. CI never sets {SKIP_VARIABLE}.\n\
             ************************************************************\n"
        );
        return false;
    }
    let mut missing = Vec::new();
    let uid = Command::new("id").arg("-u").output();
    if !matches!(&uid, Ok(out) if String::from_utf8_lossy(&out.stdout).trim() == "0") {
        missing.push("root (run the tests as root)".to_string());
    }
    match Command::new("criu").arg("--version").output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let major = text
                .lines()
                .find_map(|line| line.strip_prefix("Version: "))
                .and_then(|version| version.split('.').next())
                .and_then(|major| major.trim().parse::<u32>().ok());
            if major.is_none_or(|major| major < 4) {
                missing.push(format!("criu >= 4 (found: {})", text.trim()));
            } else if !Command::new("criu")
                .arg("check")
                .output()
                .is_ok_and(|out| out.status.success())
            {
                missing.push("a passing `criu check`".to_string());
            }
        }
        Err(error) => missing.push(format!("criu on PATH ({error})")),
    }
    if Command::new("runc").arg("--version").output().is_err() {
        missing.push("runc on PATH".to_string());
    }
    if !Path::new("/usr/bin/python3").exists() {
        missing.push("/usr/bin/python3".to_string());
    }
    assert!(
        missing.is_empty(),
        "{test} cannot run: missing {}.\nInstall them with `sudo scripts/install-node-deps.sh`, \
         or set {SKIP_VARIABLE}=1 to skip privileged tests (loudly).",
        missing.join(", ")
    );
    true
}

/// Bytes per counter record: `TTTTTTTTTT IIIIIIIII\n`.
pub const SLOT: usize = 21;
pub const SLOTS: usize = 200_000;

/// The workload: a Python counter that keeps its output file open and writes record `i` (its
/// run tag and `i`) at offset `21 * i` every 10 ms. The file is preallocated, so its size never
/// changes (CRIU checks the size of open files on restore). The tag is random per program
/// start: a restored program keeps it, a restarted one would not.
pub const COUNTER_PY: &str = r#"
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
tag = random.randrange(1, 2_000_000_000)
i = 0
while True:
    i += 1
    os.pwrite(fd, b"%010d %09d\n" % (tag, i), 21 * i)
    time.sleep(0.01)
"#;

/// Creates `dir/counter.py` and the preallocated `dir/count.log`.
pub fn prepare_counter(dir: &Path) -> (PathBuf, PathBuf) {
    let script = dir.join("counter.py");
    let log = dir.join("count.log");
    std::fs::write(&script, COUNTER_PY).unwrap();
    std::fs::write(&log, vec![0u8; SLOT * SLOTS]).unwrap();
    (script, log)
}

/// Written records as (slot, tag, value), in slot order.
pub fn records(log: &Path) -> Vec<(usize, u64, u64)> {
    let bytes = std::fs::read(log).unwrap();
    bytes
        .chunks(SLOT)
        .enumerate()
        .filter(|(_, chunk)| chunk[0] != 0)
        .map(|(slot, chunk)| {
            let text = std::str::from_utf8(chunk).unwrap();
            let tag = text[..10].parse().unwrap();
            let value = text[11..20].parse().unwrap();
            (slot, tag, value)
        })
        .collect()
}

pub fn highest(log: &Path) -> usize {
    records(log).last().map_or(0, |record| record.0)
}

/// Zeroes the log in place (same inode, same size).
pub fn wipe(log: &Path) {
    std::fs::write(log, vec![0u8; SLOT * SLOTS]).unwrap();
}

/// Polls until `condition` holds. The limit only guards against a hang; no test asserts on it.
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills what a test started, even when it fails half-way.
#[derive(Default)]
pub struct Cleanup {
    pub pids: Vec<i32>,
    pub runc_root: Option<PathBuf>,
    pub containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
        if let Some(root) = &self.runc_root {
            for id in &self.containers {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
    }
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
