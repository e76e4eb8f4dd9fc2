//! Loading the policy ConfigMaps from a directory (`policies/`) into the engine's
//! [`PolicySet`], exactly as the Kubernetes controller applies them: every YAML document that is
//! a ConfigMap labelled `automigrate.dev/policy: "true"` goes through [`PolicySet::apply`].

use std::path::{Path, PathBuf};

use automigrate_core::PolicySet;
use automigrate_core::policy::configmaps_from_yaml;

#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid policies: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("policy `{name}` is not in {dir} (found: {found})")]
    Missing {
        name: String,
        dir: PathBuf,
        found: String,
    },
}

/// Every policy in the `*.yaml` / `*.yml` files of `dir`. Any invalid one is an error: the demo
/// must run the policies as shipped.
pub fn load_policies(dir: &Path) -> Result<PolicySet, PolicyLoadError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyLoadError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.is_file()
                && matches!(
                    path.extension().and_then(|ext| ext.to_str()),
                    Some("yaml" | "yml")
                )
        })
        .collect();
    files.sort();
    let mut set = PolicySet::new();
    let mut errors = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(io(&file))?;
        let documents = match configmaps_from_yaml(&text) {
            Ok(documents) => documents,
            Err(error) => {
                errors.push(format!("{}: {error}", file.display()));
                continue;
            }
        };
        for document in documents {
            let name = document.metadata.name.clone();
            let applied = document
                .policy_text()
                .and_then(|text| set.apply(&name, text));
            if let Err(error) = applied {
                errors.push(format!("{}: {error}", file.display()));
            }
        }
    }
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(PolicyLoadError::Invalid(errors))
    }
}

/// Fails unless `set` holds every policy in `names`.
pub fn require(set: &PolicySet, dir: &Path, names: &[&str]) -> Result<(), PolicyLoadError> {
    for name in names {
        if set.get(name).is_none() {
            return Err(PolicyLoadError::Missing {
                name: (*name).to_string(),
                dir: dir.to_path_buf(),
                found: set.names().collect::<Vec<_>>().join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
    }

    #[test]
    fn the_shipped_policies_load_and_include_what_the_demo_uses() {
        let set = load_policies(&shipped()).unwrap();
        require(&set, &shipped(), &["default", "edge-mobility"]).unwrap();
    }

    #[test]
    fn an_invalid_policy_is_reported_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bad.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bad\n  labels:\n    automigrate.dev/policy: \"true\"\ndata:\n  policy.yaml: |\n    checkpoint:\n      intervall: 10m\n",
        )
        .unwrap();
        let error = load_policies(dir.path()).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("bad.yaml"), "{text}");
        assert!(text.contains("intervall"), "{text}");
        let empty = tempfile::tempdir().unwrap();
        let set = load_policies(empty.path()).unwrap();
        assert!(matches!(
            require(&set, empty.path(), &["default"]),
            Err(PolicyLoadError::Missing { .. })
        ));
    }
}
