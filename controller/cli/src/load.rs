//! Reading the files the CLI is pointed at: snapshots, policy ConfigMaps, engine memory.
//! Errors name the file; policy errors are collected, not stopped at, so a user sees them all.

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

/// Loads every policy ConfigMap (label `automigrate.dev/policy: "true"`) in a file or directory.
pub fn policies(path: &Path) -> Result<LoadedPolicies> {
    let mut loaded = LoadedPolicies::default();
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
        let documents = match policy::documents_from_yaml(&text) {
            Ok(documents) => documents,
            Err(error) => {
                loaded.errors.push(format!("{}: {error}", file.display()));
                continue;
            }
        };
        let not_policies: Vec<_> = documents
            .iter()
            .filter_map(policy::ConfigMapDocument::not_a_policy)
            .collect();
        if documents.is_empty() {
            loaded.missing.push(format!(
                "{}: no policy found: the file holds no YAML document",
                file.display()
            ));
        } else if not_policies.len() == documents.len() {
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
    Ok(loaded)
}
