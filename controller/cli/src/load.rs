//! Reading the files the CLI is pointed at: snapshots, policy ConfigMaps, engine memory.
//! Errors name the file; policy errors are collected, not stopped at, so a user sees them all.
//!
//! A directory with a kustomization (`kustomization.yaml`, `kustomization.yml` or
//! `Kustomization`, as kustomize looks for them), or such a file named directly, is read as
//! kustomize reads it: the policies checked are those among its `resources` (and `bases`,
//! `components`), following listed directories into their own kustomizations. Its other
//! manifests are skipped, not failed, and so is the Kustomization itself: it is not a policy.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use automigrate_core::model::SnapshotError;
use automigrate_core::policy::{self, PolicyError};
use automigrate_core::{ClusterSnapshot, EngineMemory, PolicySet};

/// Reads a snapshot, reading at most `max_yaml_nodes` YAML nodes (`plan --max-yaml-nodes`).
pub fn snapshot(path: &Path, max_yaml_nodes: usize) -> Result<ClusterSnapshot> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading snapshot {}", path.display()))?;
    match ClusterSnapshot::from_yaml_with_limit(&text, max_yaml_nodes) {
        Ok(snapshot) => Ok(snapshot),
        // Say how to raise the limit: the count of nodes hit is no use to a user.
        Err(error @ SnapshotError::TooLarge { .. }) => Err(anyhow::anyhow!(
            "in {}: {error}; raise it with --max-yaml-nodes (e.g. --max-yaml-nodes {})",
            path.display(),
            max_yaml_nodes.saturating_mul(4)
        )),
        Err(error) => Err(error).with_context(|| format!("in {}", path.display())),
    }
}

pub fn memory(path: &Path) -> Result<EngineMemory> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading engine memory {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))
}

/// Policies found under a path, every rejected one, and what held no policy.
#[derive(Debug, Default)]
pub struct LoadedPolicies {
    pub set: PolicySet,
    pub errors: Vec<String>,
    /// A file (or directory) with no policy, or a document that looks meant as one but is not:
    /// where, and why. `check` fails on these.
    pub missing: Vec<String>,
    /// Other documents next to policies (a Secret, an unrelated ConfigMap), and why skipped.
    pub skipped: Vec<String>,
}

fn policy_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("reading policy directory {}", path.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|file| {
            file.is_file()
                && matches!(
                    file.extension().and_then(|ext| ext.to_str()),
                    Some("yaml" | "yml")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The file names kustomize looks for in a directory, in its order.
const KUSTOMIZATION_NAMES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

fn kustomization_in(dir: &Path) -> Option<PathBuf> {
    KUSTOMIZATION_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|file| file.is_file())
}

/// Whether a file is a kustomization: by its name, or by its `kind` (a Kustomization or
/// Component written under another name).
fn is_kustomization(file: &Path, text: &str) -> bool {
    if file
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| KUSTOMIZATION_NAMES.contains(&name))
    {
        return true;
    }
    serde_saphyr::from_multiple::<serde_json::Value>(text).is_ok_and(|documents| {
        documents.iter().any(|document| {
            matches!(
                document.get("kind").and_then(serde_json::Value::as_str),
                Some("Kustomization" | "Component")
            )
        })
    })
}

/// Loads every policy ConfigMap (label `automigrate.dev/policy: "true"`) in a file or directory.
pub fn policies(path: &Path) -> Result<LoadedPolicies> {
    let mut loaded = LoadedPolicies::default();
    if path.is_dir()
        && let Some(kustomization) = kustomization_in(path)
    {
        from_kustomization(&kustomization, &mut loaded)?;
        return Ok(loaded);
    }
    let files = policy_files(path)?;
    if files.is_empty() {
        loaded.missing.push(format!(
            "{}: no policy found: no *.yaml or *.yml file in the directory",
            path.display()
        ));
    }
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        if is_kustomization(&file, &text) {
            if path.is_file() {
                from_kustomization(&file, &mut loaded)?;
            } else {
                loaded.skipped.push(format!(
                    "{}: a kustomize Kustomization, not a policy",
                    file.display()
                ));
            }
            continue;
        }
        check_file(&file, &text, false, &mut loaded);
    }
    Ok(loaded)
}

/// What a kustomization installs: the files its resources name, found recursively.
#[derive(Debug, Default)]
struct Resources {
    files: Vec<PathBuf>,
    /// Kustomizations read, against cycles.
    seen: Vec<PathBuf>,
}

/// Checks the policies among a kustomization's resources; fails when there are none.
fn from_kustomization(kustomization: &Path, loaded: &mut LoadedPolicies) -> Result<()> {
    let mut resources = Resources::default();
    collect_resources(kustomization, &mut resources, loaded)?;
    loaded.skipped.push(format!(
        "{}: a kustomize Kustomization, not a policy: checked the policies among its {} resource file(s)",
        kustomization.display(),
        resources.files.len()
    ));
    // A file next to it that it does not list is not installed by it: say so, do not check it.
    if let Some(dir) = kustomization.parent() {
        for file in policy_files(dir)? {
            let listed = resources
                .files
                .iter()
                .any(|listed| same_file(listed, &file));
            if !listed && !resources.seen.iter().any(|seen| same_file(seen, &file)) {
                loaded.skipped.push(format!(
                    "{}: not among the kustomization's resources, not checked",
                    file.display()
                ));
            }
        }
    }
    let before = loaded.set.names().count() + loaded.errors.len();
    for file in &resources.files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        check_file(file, &text, true, loaded);
    }
    if loaded.set.names().count() + loaded.errors.len() == before {
        loaded.missing.push(format!(
            "{}: no policy found: none of its resources is a policy ConfigMap",
            kustomization.display()
        ));
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn collect_resources(
    kustomization: &Path,
    resources: &mut Resources,
    loaded: &mut LoadedPolicies,
) -> Result<()> {
    if resources
        .seen
        .iter()
        .any(|seen| same_file(seen, kustomization))
    {
        return Ok(());
    }
    resources.seen.push(kustomization.to_path_buf());
    let text = std::fs::read_to_string(kustomization)
        .with_context(|| format!("reading {}", kustomization.display()))?;
    let document: serde_json::Value = match serde_saphyr::from_str(&text) {
        Ok(document) => document,
        Err(error) => {
            loaded.errors.push(format!(
                "{}: not a kustomization: {error}",
                kustomization.display()
            ));
            return Ok(());
        }
    };
    let dir = kustomization.parent().unwrap_or(Path::new("."));
    if document.get("configMapGenerator").is_some() {
        loaded.skipped.push(format!(
            "{}: configMapGenerator ConfigMaps are not checked (check the output of `kubectl kustomize`)",
            kustomization.display()
        ));
    }
    let entries = ["resources", "bases", "components"]
        .iter()
        .filter_map(|key| document.get(*key).and_then(serde_json::Value::as_array))
        .flatten()
        .filter_map(serde_json::Value::as_str);
    for entry in entries {
        if entry.contains("://") || entry.contains("?ref=") || entry.starts_with("github.com/") {
            loaded.skipped.push(format!(
                "{}: remote resource {entry} not checked",
                kustomization.display()
            ));
            continue;
        }
        let path = dir.join(entry);
        if path.is_dir() {
            match kustomization_in(&path) {
                Some(inner) => collect_resources(&inner, resources, loaded)?,
                None => loaded.errors.push(format!(
                    "{}: resource {entry}: a directory without a kustomization",
                    kustomization.display()
                )),
            }
        } else if path.is_file() {
            if !resources.files.iter().any(|file| same_file(file, &path)) {
                resources.files.push(path);
            }
        } else {
            loaded.errors.push(format!(
                "{}: resource {entry}: no such file or directory",
                kustomization.display()
            ));
        }
    }
    Ok(())
}

/// Checks one file's documents. A file given as a policy file that holds none fails; one of a
/// kustomization's manifests (`among_manifests`) holding none is skipped, unless a document in
/// it looks meant as a policy.
fn check_file(file: &Path, text: &str, among_manifests: bool, loaded: &mut LoadedPolicies) {
    let documents = match policy::documents_from_yaml(text) {
        Ok(documents) => documents,
        Err(error) => {
            loaded.errors.push(format!("{}: {error}", file.display()));
            return;
        }
    };
    let not_policies: Vec<_> = documents
        .iter()
        .filter_map(policy::ConfigMapDocument::not_a_policy)
        .collect();
    if documents.is_empty() && among_manifests {
        loaded
            .skipped
            .push(format!("{}: holds no YAML document", file.display()));
    } else if documents.is_empty() {
        loaded.missing.push(format!(
            "{}: no policy found: the file holds no YAML document",
            file.display()
        ));
    } else if not_policies.len() == documents.len() && !among_manifests {
        let reasons: Vec<&str> = not_policies.iter().map(|n| n.reason.as_str()).collect();
        loaded.missing.push(format!(
            "{}: no policy found: {}",
            file.display(),
            reasons.join("; ")
        ));
    } else {
        for not_policy in not_policies {
            if not_policy.likely_mistake {
                loaded.missing.push(format!(
                    "{}: not a policy: {}",
                    file.display(),
                    not_policy.reason
                ));
            } else {
                loaded
                    .skipped
                    .push(format!("{}: {}", file.display(), not_policy.reason));
            }
        }
    }
    for document in documents
        .into_iter()
        .filter(policy::ConfigMapDocument::is_policy)
    {
        let name = document.metadata.name.clone();
        let result = document
            .policy_text()
            .and_then(|text| loaded.set.apply(&name, text).map_err(|e: PolicyError| e));
        if let Err(error) = result {
            loaded.errors.push(format!("{}: {error}", file.display()));
        }
    }
}
