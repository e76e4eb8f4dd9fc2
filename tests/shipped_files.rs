//! The files the project ships are valid and say what they claim: every example policy parses
//! and validates, every broken fixture fails with its expected message, the example snapshot
//! produces the outcomes its header describes, and the README documents every annotation.

// Test code: a failed unwrap is a failed test, with the reason in the message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::path::PathBuf;

use automigrate_core::annotations::KNOWN;
use automigrate_core::decide::{CheckpointSource, Trigger};
use automigrate_core::policy::configmaps_from_yaml;
use automigrate_core::{ClusterSnapshot, EngineMemory, PolicySet, decide};
use automigrate_tests::repo_root;

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {dir}");
    files
}

fn shipped_policies() -> PolicySet {
    let mut set = PolicySet::new();
    for file in yaml_files("policies") {
        let text = fs::read_to_string(&file).unwrap();
        let documents = configmaps_from_yaml(&text).unwrap();
        assert_eq!(
            documents.len(),
            1,
            "{} holds one policy ConfigMap",
            file.display()
        );
        for document in documents {
            let name = &document.metadata.name;
            assert_eq!(
                file.file_stem().unwrap().to_str().unwrap(),
                name,
                "file name matches the policy name"
            );
            let policy_text = document.policy_text().unwrap();
            if let Err(error) = set.apply(name, policy_text) {
                panic!("{}: {error}", file.display());
            }
        }
    }
    set
}

#[test]
fn every_example_policy_is_valid() {
    let set = shipped_policies();
    let names: Vec<&str> = set.names().collect();
    assert_eq!(
        names,
        [
            "default",
            "edge-mobility",
            "fast-failover",
            "gpu-application"
        ]
    );
}

#[test]
fn every_broken_policy_fails_with_its_expected_message() {
    for file in yaml_files("tests/fixtures/broken-policies") {
        let text = fs::read_to_string(&file).unwrap();
        let expected = text
            .lines()
            .find_map(|line| line.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let documents = configmaps_from_yaml(&text).unwrap();
        let document = &documents[0];
        let mut set = PolicySet::new();
        let error = document
            .policy_text()
            .and_then(|policy| set.apply(&document.metadata.name, policy))
            .expect_err(&format!("{} should be rejected", file.display()))
            .to_string();
        assert!(
            error.contains(expected),
            "{}:\n  expected: {expected}\n  got:      {error}",
            file.display()
        );
        assert!(set.is_empty(), "a rejected policy is never added");
    }
}

#[test]
fn example_snapshot_gives_the_outcomes_it_describes() {
    let text = fs::read_to_string(repo_root().join("examples/cluster-snapshot.yaml")).unwrap();
    let snapshot = ClusterSnapshot::from_yaml(&text).unwrap();
    let now = snapshot.taken_at.unwrap();
    let (decisions, memory) = decide(
        &snapshot,
        &shipped_policies(),
        &EngineMemory::default(),
        now,
    );

    let moves: Vec<(String, &str, &str, Trigger)> = decisions
        .migrations
        .iter()
        .map(|m| (m.pod.to_string(), m.from.as_str(), m.to.as_str(), m.trigger))
        .collect();
    assert_eq!(
        moves,
        [
            (
                "research/lstm-trainer".to_string(),
                "edge-2",
                "edge-3",
                Trigger::NodeFailed
            ),
            (
                "gpu/ocr-cnn".to_string(),
                "gpu-1",
                "gpu-2",
                Trigger::NodeDegraded
            ),
            (
                "ml/cnn-trainer".to_string(),
                "edge-4",
                "edge-5",
                Trigger::NodeDegraded
            ),
        ]
    );
    assert!(matches!(
        &decisions.migrations[0].checkpoint,
        CheckpointSource::Stored { from, epoch: Some(41), .. } if from == "edge-3"
    ));
    let due: Vec<String> = decisions
        .checkpoints
        .iter()
        .map(|c| c.pod.to_string())
        .collect();
    assert_eq!(due, ["ml/rnn-forecast", "ml/typo-pod"]);
    assert_eq!(decisions.deferred.len(), 1);
    assert_eq!(decisions.deferred[0].trigger, Trigger::Mobility);
    assert!(memory.mobility_since.contains_key("edge/speech-assistant"));
    assert_eq!(decisions.problems.len(), 1);
    assert!(
        decisions.problems[0]
            .message
            .contains("checkpoint-intreval")
    );

    // 30 s later (the live nodes having renewed their leases) the dwell time is over and the
    // pod follows alice to edge-6.
    let thirty_seconds = jiff::SignedDuration::from_secs(30);
    let later = now.checked_add(thirty_seconds).unwrap();
    let mut snapshot = snapshot;
    for node in snapshot
        .nodes
        .iter_mut()
        .filter(|node| node.name != "edge-2")
    {
        node.last_heartbeat = node
            .last_heartbeat
            .map(|at| at.checked_add(thirty_seconds).unwrap());
    }
    let (decisions, _) = decide(&snapshot, &shipped_policies(), &memory, later);
    let follow = decisions
        .migrations
        .iter()
        .find(|m| m.trigger == Trigger::Mobility)
        .expect("the pod follows its user");
    assert_eq!(
        (follow.from.as_str(), follow.to.as_str()),
        ("edge-5", "edge-6")
    );
}

/// Every Pod manifest under examples/ (recursively).
fn example_pods() -> Vec<(PathBuf, k8s_openapi::api::core::v1::Pod)> {
    fn walk(dir: &std::path::Path, found: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "yaml") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root().join("examples"), &mut files);
    files.sort();
    let mut pods = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for document in serde_saphyr::from_multiple::<serde_json::Value>(&text)
            .unwrap_or_else(|error| panic!("{}: {error}", file.display()))
        {
            if document["kind"] == "Pod" {
                let pod = serde_json::from_value(document)
                    .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
                pods.push((file.clone(), pod));
            }
        }
    }
    pods
}

#[test]
fn example_pods_are_protected_and_run_on_the_local_cluster() {
    let pods = example_pods();
    let names: Vec<String> = pods
        .iter()
        .map(|(file, _)| {
            file.strip_prefix(repo_root())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert!(
        names.iter().any(|name| name == "examples/pytorch/pod.yaml"),
        "{names:?}"
    );
    for (file, pod) in &pods {
        let file = file.display();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let annotations = pod.metadata.annotations.clone().unwrap_or_default();
        let (settings, errors) =
            automigrate_core::annotations::parse("default", name, &annotations);
        assert!(errors.is_empty(), "{file}: {errors:?}");
        assert!(settings.protect, "{file}: not protected");
        let spec = pod.spec.as_ref().unwrap();
        // What the local kubelet needs: a node (no scheduler), a command (no image
        // entrypoint), and only hostPath and emptyDir volumes.
        assert!(spec.node_name.is_some(), "{file}: no nodeName");
        for container in &spec.containers {
            assert!(
                container.command.is_some(),
                "{file}: {} has no command",
                container.name
            );
        }
        for volume in spec.volumes.iter().flatten() {
            assert!(
                volume.host_path.is_some() || volume.empty_dir.is_some(),
                "{file}: volume {} is neither hostPath nor emptyDir",
                volume.name
            );
        }
    }
    // The PyTorch pod runs the script shipped next to it, from its read-only /app mount.
    let (_, pytorch) = &pods[names
        .iter()
        .position(|n| n == "examples/pytorch/pod.yaml")
        .unwrap()];
    let container = &pytorch.spec.as_ref().unwrap().containers[0];
    assert!(
        container
            .command
            .iter()
            .flatten()
            .any(|arg| arg == "/app/train.py"),
        "{:?}",
        container.command
    );
    assert!(repo_root().join("examples/pytorch/train.py").is_file());
}

#[test]
fn readme_documents_every_annotation() {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    for (key, _) in KNOWN {
        assert!(readme.contains(&format!("`{key}`")), "README lacks {key}");
    }
}

#[test]
fn readme_shows_the_real_built_in_defaults() {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let defaults = serde_saphyr::to_string(&automigrate_core::Policy::default()).unwrap();
    let block = format!("```yaml\n{}\n```", defaults.trim_end());
    assert!(
        readme.contains(&block),
        "README's defaults block is stale; regenerate it with\n  cargo run -p automigrate-core --example print_default_policy\n{block}"
    );
}

#[test]
fn deployed_policies_are_the_examples() {
    // kustomize cannot reach outside deploy/, so the policy it installs is a copy: keep it exact.
    let deployed = repo_root().join("deploy/policies");
    for entry in fs::read_dir(&deployed).unwrap() {
        let path = entry.unwrap().path();
        let example = repo_root().join("policies").join(path.file_name().unwrap());
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            fs::read_to_string(&example).unwrap(),
            "{} differs from {}",
            path.display(),
            example.display()
        );
    }
}
