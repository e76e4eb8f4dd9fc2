//! The real kubectl against the real `automigrate-apiserver` binary: discovery, apply, get
//! (server-side Tables, all namespaces, several types at once), a watch that sees a change,
//! describe, delete (immediate and graceful), and a SIGTERM stop with a watch open.
//!
//! kubectl must be on PATH (scripts/test.sh checks it); without it this test fails, unless
//! AUTOMIGRATE_SKIP_PRIVILEGED=1 says this machine cannot run the outside tools, in which case
//! it prints loudly that it skips.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound on waiting for something that should happen at once; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(60);

const OBJECTS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: train
  annotations:
    automigrate.dev/protect: "true"
spec:
  containers:
  - name: main
    image: local/trainer
---
apiVersion: v1
kind: Pod
metadata:
  name: bound
spec:
  nodeName: node-a
  containers:
  - name: main
    image: local/trainer
---
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels:
    node-role.kubernetes.io/worker: ""
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: node-a
  namespace: kube-node-lease
spec:
  holderIdentity: node-a
  leaseDurationSeconds: 40
---
apiVersion: automigrate.dev/v1alpha1
kind: Migration
metadata:
  name: train-1
spec:
  pod: train
  trigger: Degradation
"#;

fn kubectl_available() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var("AUTOMIGRATE_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!(
            "\n!!!!!!!! SKIPPED: kubectl is not on PATH (AUTOMIGRATE_SKIP_PRIVILEGED=1): the kubectl test of automigrate-apiserver did NOT run !!!!!!!!\n"
        );
        return false;
    }
    panic!(
        "kubectl is not on PATH: install it (scripts/test.sh needs it) or set AUTOMIGRATE_SKIP_PRIVILEGED=1 to skip loudly"
    );
}

struct Server {
    child: Child,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_automigrate-apiserver"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(dir.path().join("kubeconfig"))
            .env("RUST_LOG", "info,automigrate_kube_fake=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = Server { child, dir };
        let started = Instant::now();
        while !server.kubeconfig().exists() {
            assert!(
                started.elapsed() < PATIENCE,
                "no kubeconfig written; log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn kubectl(&self, args: &[&str]) -> Command {
        let mut command = Command::new("kubectl");
        command
            .env("KUBECONFIG", self.kubeconfig())
            // A per-test discovery cache: nothing leaks in from ~/.kube or another run.
            .env("KUBECACHEDIR", self.dir.path().join("cache"))
            .arg("--request-timeout=30s")
            .args(args);
        command
    }

    /// Runs kubectl, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {stderr}\n{stdout}\nserver log:\n{}",
            self.log()
        );
        println!("$ kubectl {}\n{stdout}{stderr}", args.join(" "));
        stdout
    }

    /// Runs kubectl, asserts failure, returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.kubectl(args).output().unwrap();
        assert!(!output.status.success(), "kubectl {args:?} should fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Starts a long-running kubectl whose stdout lines arrive on the returned channel.
    fn follow(&self, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
        let mut child = self
            .kubectl(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("[watch] {line}");
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        (child, receiver)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Ignored errors: the server may already have exited (the SIGTERM step).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for a line satisfying `wanted`, failing after PATIENCE.
fn expect_line(
    lines: &mpsc::Receiver<String>,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return line,
            Ok(_) => {}
            Err(error) => panic!("no watch line with {what}: {error}"),
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

fn columns(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn kubectl_get_apply_watch_describe_delete() {
    if !kubectl_available() {
        return;
    }
    let server = Server::start();
    let manifest = write(server.dir.path(), "objects.yaml", OBJECTS);

    // No OpenAPI is served, so kubectl's client-side validation cannot run.
    let refused = server.fails(&["apply", "-f", &manifest]);
    assert!(refused.contains("--validate=false"), "{refused}");

    let applied = server.ok(&["apply", "--validate=false", "-f", &manifest]);
    for created in [
        "pod/train created",
        "pod/bound created",
        "node/node-a created",
        "lease.coordination.k8s.io/node-a created",
        "migration.automigrate.dev/train-1 created",
    ] {
        assert!(applied.contains(created), "{applied}");
    }
    let again = server.ok(&["apply", "--validate=false", "-f", &manifest]);
    assert!(again.contains("pod/train unchanged"), "{again}");

    // Re-applying a changed manifest: a changed annotation merges; a changed container list
    // would need strategic-merge list semantics, so it is refused and the pod stays whole.
    let annotated = write(
        server.dir.path(),
        "annotated.yaml",
        &OBJECTS.replace(
            r#"automigrate.dev/protect: "true""#,
            r#"automigrate.dev/protect: "false""#,
        ),
    );
    let configured = server.ok(&["apply", "--validate=false", "-f", &annotated]);
    assert!(configured.contains("pod/train configured"), "{configured}");
    let protect = server.ok(&[
        "get",
        "pod",
        "train",
        "-o",
        r"jsonpath={.metadata.annotations.automigrate\.dev/protect}",
    ]);
    assert_eq!(protect, "false");
    let reimaged = write(
        server.dir.path(),
        "reimaged.yaml",
        &OBJECTS.replacen("image: local/trainer", "image: local/other", 1),
    );
    let refused = server.fails(&["apply", "--validate=false", "-f", &reimaged]);
    assert!(
        refused.contains("not supported by this API server"),
        "{refused}"
    );
    let image = server.ok(&[
        "get",
        "pod",
        "train",
        "-o",
        "jsonpath={.spec.containers[0].image}",
    ]);
    assert_eq!(image, "local/trainer");

    // A watch that sees the controller's status write.
    let (mut watch, lines) = server.follow(&["get", "migrations", "-w", "--output-watch-events"]);
    expect_line(&lines, "the ADDED migration", |l| {
        l.starts_with("ADDED") && l.contains("train-1")
    });
    server.ok(&[
        "patch",
        "migration",
        "train-1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Checkpointing","source":"node-a","target":"node-b"}}"#,
    ]);
    let modified = expect_line(&lines, "the MODIFIED migration", |l| {
        l.starts_with("MODIFIED")
    });
    assert_eq!(
        columns(&modified)[..6],
        [
            "MODIFIED",
            "train-1",
            "Checkpointing",
            "train",
            "node-a",
            "node-b"
        ],
        "{modified}"
    );
    watch.kill().unwrap();
    watch.wait().unwrap();

    // Several types, all namespaces, server-side columns (the migration's PHASE).
    let all = server.ok(&["get", "nodes,pods,migrations", "-A"]);
    let migration = all
        .lines()
        .find(|l| l.contains("migration.automigrate.dev/train-1"))
        .unwrap_or_else(|| panic!("{all}"));
    assert_eq!(
        columns(migration)[..6],
        [
            "default",
            "migration.automigrate.dev/train-1",
            "Checkpointing",
            "train",
            "node-a",
            "node-b"
        ]
    );
    assert!(all.contains("PHASE"), "{all}");
    let node = all.lines().find(|l| l.contains("node/node-a")).unwrap();
    assert_eq!(columns(node)[..3], ["node/node-a", "Unknown", "worker"]);
    let pod = all.lines().find(|l| l.contains("pod/train")).unwrap();
    assert_eq!(
        columns(pod)[..4],
        ["default", "pod/train", "0/1", "Pending"]
    );

    let leases = server.ok(&["get", "lease", "-n", "kube-node-lease"]);
    let lease = leases.lines().find(|l| l.starts_with("node-a")).unwrap();
    assert_eq!(columns(lease)[..2], ["node-a", "node-a"]);

    let described = server.ok(&["describe", "migration", "train-1"]);
    assert!(described.contains("Kind:         Migration"), "{described}");
    assert!(
        described
            .lines()
            .any(|l| columns(l) == ["Phase:", "Checkpointing"]),
        "{described}"
    );
    // An Event the controller records (events.k8s.io/v1) shows in describe.
    let uid = server.ok(&[
        "get",
        "migration",
        "train-1",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let event = write(
        server.dir.path(),
        "event.yaml",
        &format!(
            r#"
apiVersion: events.k8s.io/v1
kind: Event
metadata:
  name: train-1.checkpointed
eventTime: "2026-01-01T00:00:00.000000Z"
reportingController: automigrate-controller
reportingInstance: controller-0
action: Checkpoint
reason: Checkpointed
note: checkpoint 3 written on node-a
type: Normal
regarding:
  apiVersion: automigrate.dev/v1alpha1
  kind: Migration
  name: train-1
  namespace: default
  uid: {uid}
"#
        ),
    );
    server.ok(&["create", "--validate=false", "-f", &event]);
    let described = server.ok(&["describe", "migration", "train-1"]);
    let line = described
        .lines()
        .find(|l| l.contains("Checkpointed"))
        .unwrap_or_else(|| panic!("no event in describe:\n{described}"));
    assert!(
        line.contains("automigrate-controller") && line.contains("checkpoint 3 written on node-a"),
        "{line}"
    );
    let short = server.ok(&["get", "mig", "train-1", "-o", "name"]);
    assert_eq!(short.trim(), "migration.automigrate.dev/train-1");

    // An unbound pod goes at once; a pod bound to a node waits for its kubelet.
    let deleted = server.ok(&["delete", "pod", "train"]);
    assert!(deleted.contains("pod \"train\" deleted"), "{deleted}");
    let gone = server.fails(&["get", "pod", "train"]);
    assert!(gone.contains("NotFound"), "{gone}");
    server.ok(&["delete", "pod", "bound", "--wait=false"]);
    let terminating = server.ok(&["get", "pod", "bound"]);
    let row = terminating
        .lines()
        .find(|l| l.starts_with("bound"))
        .unwrap();
    assert_eq!(columns(row)[2], "Terminating", "{terminating}");

    // SIGTERM with a watch open: the watch ends and the server exits cleanly.
    let (mut watch, lines) = server.follow(&["get", "pods", "-w"]);
    expect_line(&lines, "the bound pod", |l| l.starts_with("bound"));
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut server = server;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the server did not stop; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit {status}; log:\n{}", server.log());
    assert!(server.log().contains("stopped"), "{}", server.log());
    // Ignored errors: kubectl may have exited on its own after the server went away.
    let _ = watch.kill();
    let _ = watch.wait();
}
