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

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("automigrate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const VALID_POLICY: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ok-policy\n  labels: {automigrate.dev/policy: \"true\"}\ndata:\n  policy.yaml: \"{}\"\n";

#[test]
fn check_fails_and_says_why_on_files_without_a_policy() {
    // Issue 14, finding 6: each of these passed `check` silently with exit 0.
    let dir = scratch("nopolicy");
    let cases = [
        (
            "unlabelled.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: unlabelled}\ndata:\n  policy.yaml: \"checkpoint: {intervall: 5m}\"\n",
            "ConfigMap unlabelled has policy.yaml but lacks label automigrate.dev/policy: \"true\"",
        ),
        (
            "typo.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: typo\n  labels: {automigrate.dev/polciy: \"true\"}\ndata:\n  policy.yaml: \"{}\"\n",
            "did you mean automigrate.dev/policy instead of automigrate.dev/polciy?",
        ),
        (
            "not-true.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: yes-policy\n  labels: {automigrate.dev/policy: \"yes\"}\ndata:\n  policy.yaml: \"{}\"\n",
            "label automigrate.dev/policy is \"yes\", not \"true\"",
        ),
        (
            "secret.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {policy.yaml: \"{}\"}\n",
            "Secret creds is not a ConfigMap",
        ),
        ("empty.yaml", "", "holds no YAML document"),
    ];
    for (file, text, why) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = automigrate(&["check", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{file}: {stdout}{stderr}");
        assert!(
            stdout.contains(&format!("{}: no policy found", path.display())),
            "{file}: {stdout}"
        );
        assert!(stdout.contains(why), "{file}: {stdout} lacks {why}");
    }
    // A file with a policy next to other objects passes, and says what it skipped.
    let mixed = dir.join("mixed.yaml");
    std::fs::write(
        &mixed,
        format!("{VALID_POLICY}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: creds}}\n"),
    )
    .unwrap();
    let (code, stdout, _) = automigrate(&["check", mixed.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("ok      ok-policy"), "{stdout}");
    assert!(
        stdout.contains("Secret creds is not a ConfigMap"),
        "{stdout}"
    );
    // A directory with nothing to read.
    let empty_dir = dir.join("nothing");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let (code, stdout, _) = automigrate(&["check", empty_dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("no *.yaml or *.yml file"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_follows_a_kustomization_instead_of_failing_on_it() {
    // `check deploy/` used to fail: kustomization.yaml was read as a policy ConfigMap
    // ("missing field `metadata`"), and every other manifest there as a file without a policy.
    let (code, stdout, _) = automigrate(&["check", repo("deploy").to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("ok      default"), "{stdout}");
    assert!(
        stdout.contains("kustomization.yaml: a kustomize Kustomization, not a policy"),
        "{stdout}"
    );
    assert!(!stdout.contains("invalid "), "{stdout}");

    let dir = scratch("kustomize");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "kustomization.yaml",
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - policy.yaml\n  - secret.yaml\n  - more\n",
    );
    write("policy.yaml", VALID_POLICY);
    write(
        "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\n",
    );
    write("more/kustomization.yml", "resources: [bad.yaml]\n");
    write(
        "more/bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n  labels: {automigrate.dev/policy: \"true\"}\ndata:\n  policy.yaml: \"checkpoint: {intervall: 5m}\"\n",
    );
    // Not listed: kustomize does not install it, so it is not checked (and says so).
    write("stray.yaml", "not: [a policy\n");
    let (code, stdout, _) = automigrate(&["check", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("ok      ok-policy"), "{stdout}");
    assert!(stdout.contains("more/bad.yaml"), "{stdout}");
    assert!(stdout.contains("intervall"), "{stdout}");
    assert!(
        stdout.contains("Secret creds is not a ConfigMap"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stray.yaml: not among the kustomization's resources"),
        "{stdout}"
    );

    // The good part alone passes; the file itself may be named too.
    write(
        "kustomization.yaml",
        "kind: Kustomization\nresources: [policy.yaml, secret.yaml]\n",
    );
    let kustomization = dir.join("kustomization.yaml");
    let (code, stdout, _) = automigrate(&["check", kustomization.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("ok      ok-policy"), "{stdout}");

    // A kustomization that installs no policy, or names a file that is not there, fails.
    write("kustomization.yaml", "resources: [secret.yaml]\n");
    let (code, stdout, _) = automigrate(&["check", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("no policy found"), "{stdout}");
    write(
        "kustomization.yaml",
        "resources: [policy.yaml, gone.yaml]\n",
    );
    let (code, stdout, _) = automigrate(&["check", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("gone.yaml"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A snapshot of `count` healthy nodes (about 30 YAML nodes each).
fn big_snapshot(count: usize) -> String {
    let mut text = String::from("takenAt: 2026-11-22T12:00:00Z\nnodes:\n");
    for index in 0..count {
        text.push_str(&format!(
            "  - name: node-{index}\n    zone: z{zone}\n    labels: {{role: worker}}\n    conditions: [{{type: Ready, status: \"True\"}}]\n    lastHeartbeat: 2026-11-22T11:59:55Z\n    allocatable: {{cpu: \"4\", memory: 16Gi}}\n    requested: {{cpu: \"1\", memory: 6Gi}}\n",
            zone = index % 7
        ));
    }
    text
}

#[test]
fn a_large_snapshot_is_read_and_the_limit_is_named_with_its_flag() {
    // Issue 14, finding 7: 20,000 nodes were refused with "budget breached: Nodes { nodes:
    // 250001 }", naming neither the limit nor how to raise it.
    let dir = scratch("bigsnapshot");
    let path = dir.join("snapshot.yaml");
    std::fs::write(&path, big_snapshot(20_000)).unwrap();
    let (code, stdout, stderr) = automigrate(&["plan", "--snapshot", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("20000"), "{stdout}");

    let (code, _, stderr) = automigrate(&[
        "plan",
        "--snapshot",
        path.to_str().unwrap(),
        "--max-yaml-nodes",
        "100000",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("more than 100000 YAML nodes"),
        "the limit is named: {stderr}"
    );
    assert!(
        stderr.contains("--max-yaml-nodes"),
        "the way to raise it is named: {stderr}"
    );
    assert!(!stderr.contains("Nodes {"), "no debug output: {stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn transfer_refuses_a_loss_that_is_not_a_probability() {
    // Issue 14, finding 7: `--loss 7` was accepted.
    let dir = scratch("loss");
    let file = dir.join("none.pem");
    let file = file.to_str().unwrap();
    for (loss, why) in [
        ("7", "7 is not a loss fraction in 0..1"),
        ("-0.1", "-0.1 is not a loss fraction in 0..1"),
        ("NaN", "NaN is not a loss fraction in 0..1"),
        ("150%", "150% is not a loss percentage in 0%..100%"),
    ] {
        let (code, _, stderr) = automigrate(&[
            "transfer",
            "send",
            "--to",
            "127.0.0.1:9",
            "--ca",
            file,
            "--cert",
            file,
            "--key",
            file,
            "--rtt",
            "10ms",
            &format!("--loss={loss}"),
            dir.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{loss}: {stderr}");
        assert!(
            stderr.contains("--loss") && stderr.contains(why),
            "{loss}: {stderr}"
        );
        assert!(
            !stderr.contains("TLS"),
            "refused before anything else: {stderr}"
        );
    }
    // A fraction and a percentage are both taken (the TLS files are what fails next).
    for loss in ["0.001", "0.1%", "1"] {
        let (_, _, stderr) = automigrate(&[
            "transfer",
            "send",
            "--to",
            "127.0.0.1:9",
            "--ca",
            file,
            "--cert",
            file,
            "--key",
            file,
            &format!("--loss={loss}"),
            dir.to_str().unwrap(),
        ]);
        assert!(!stderr.contains("--loss"), "{loss}: {stderr}");
        assert!(stderr.contains("TLS"), "{loss}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
