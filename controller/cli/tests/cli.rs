//! The `automigrate` binary as a user runs it: exit codes, output and error messages.

// Test code: a failed unwrap is a failed test, with the reason in the message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn automigrate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_automigrate"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[test]
fn plan_prints_decisions_with_reasons() {
    let snapshot = repo("examples/cluster-snapshot.yaml");
    let policies = repo("policies");
    let (code, stdout, stderr) = automigrate(&[
        "plan",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--policies",
        policies.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Migrations (3)"), "{stdout}");
    assert!(
        stdout.contains(
            "research/lstm-trainer  edge-2 -> edge-3  (NodeFailed, policy fast-failover)"
        )
    );
    assert!(stdout.contains("why: node edge-2 failed: Ready is Unknown for 1m 20s (grace 10s)"));
    assert!(
        stdout.contains("checkpoint: stored lstm-trainer-000041 (5m old, epoch 41) from edge-3")
    );
    assert!(stdout.contains("waiting out the dwell time"));
}

#[test]
fn plan_json_round_trips_and_memory_chains() {
    let dir = std::env::temp_dir().join(format!("automigrate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let memory = dir.join("memory.json");
    let snapshot = repo("examples/cluster-snapshot.yaml");
    let policies = repo("policies");
    let base = [
        "plan",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--policies",
        policies.to_str().unwrap(),
        "--output",
        "json",
    ];
    let mut first = base.to_vec();
    first.extend(["--save-memory", memory.to_str().unwrap()]);
    let (code, stdout, stderr) = automigrate(&first);
    assert_eq!(code, 0, "{stderr}");
    let decisions: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(decisions["migrations"].as_array().unwrap().len(), 3);

    // Ten seconds later, the dwell timer saved by the first pass has run for 10 s; without the
    // memory it starts again from zero.
    let later = ["--now", "2026-11-22T12:00:10Z"];
    let dwell = |stdout: &str| {
        let decisions: serde_json::Value = serde_json::from_str(stdout).unwrap();
        decisions["deferred"][0]["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut second = base.to_vec();
    second.extend(later);
    second.extend(["--memory", memory.to_str().unwrap()]);
    let (code, stdout, stderr) = automigrate(&second);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        dwell(&stdout).ends_with("(10s of 30s)"),
        "{}",
        dwell(&stdout)
    );
    let mut fresh = base.to_vec();
    fresh.extend(later);
    let (_, stdout, _) = automigrate(&fresh);
    assert!(
        dwell(&stdout).ends_with("(0s of 30s)"),
        "{}",
        dwell(&stdout)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn invalid_policies_fail_the_plan_with_every_reason() {
    let snapshot = repo("examples/cluster-snapshot.yaml");
    let broken = repo("tests/fixtures/broken-policies");
    let (code, _, stderr) = automigrate(&[
        "plan",
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--policies",
        broken.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("transfer.maxStreams: 100 is outside 1..64"),
        "{stderr}"
    );
    assert!(stderr.contains("11 invalid policies"), "{stderr}");
}

#[test]
fn check_reports_each_policy() {
    let (code, stdout, _) = automigrate(&["check", repo("policies").to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("ok ")).count(), 4);
    let (code, stdout, _) = automigrate(&[
        "check",
        repo("tests/fixtures/broken-policies").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("invalid ")).count(),
        11
    );
}

#[test]
fn a_missing_or_malformed_snapshot_says_which_file_and_where() {
    let (code, _, stderr) = automigrate(&["plan", "--snapshot", "/nonexistent.yaml"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("reading snapshot /nonexistent.yaml"),
        "{stderr}"
    );

    let dir = std::env::temp_dir().join(format!("automigrate-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "nodes:\n  - name: a\n    allocatable: {cpu: lots}\n").unwrap();
    let (code, _, stderr) = automigrate(&["plan", "--snapshot", bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(stderr.contains("nodes[0].allocatable.cpu"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
