//! Reading the files the CLI is pointed at: snapshots, policy ConfigMaps, engine memory.
//! Errors name the file; policy errors are collected, not stopped at, so a user sees them all.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use automigrate_core::policy::{self, PolicyError};
use automigrate_core::{ClusterSnapshot, EngineMemory, PolicySet};

pub fn snapshot(path: &Path) -> Result<ClusterSnapshot> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading snapshot {}", path.display()))?;
    ClusterSnapshot::from_yaml(&text).with_context(|| format!("in {}", path.display()))
}

pub fn memory(path: &Path) -> Result<EngineMemory> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading engine memory {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("in {}", path.display()))
}

/// Policies found under a path, and every rejected one.
#[derive(Debug, Default)]
pub struct LoadedPolicies {
    pub set: PolicySet,
    pub errors: Vec<String>,
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
    for file in policy_files(path)? {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let documents = match policy::configmaps_from_yaml(&text) {
            Ok(documents) => documents,
            Err(error) => {
                loaded.errors.push(format!("{}: {error}", file.display()));
                continue;
            }
        };
        for document in documents {
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
