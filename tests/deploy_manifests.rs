//! Every manifest in `deploy/` parses into the Kubernetes type it claims to be, with no field the
//! type does not know (a typo would otherwise be dropped silently by `kubectl apply`), the
//! kustomization lists exactly the installable files, and every metric an alert rule uses is
//! exported by the code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use automigrate_tests::repo_root;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

fn yaml_files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files_under(&path));
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .into_iter()
        .filter(|document| !document.is_null())
        .collect()
}

/// Every field of `original` is still there after a trip through the typed struct: a field the
/// type does not know would be missing.
fn assert_no_unknown_fields(original: &Value, typed: &Value, at: &str, file: &Path) {
    match (original, typed) {
        (Value::Object(left), Value::Object(right)) => {
            for (key, value) in left {
                let Some(other) = right.get(key) else {
                    panic!("{}: unknown or misspelt field `{at}.{key}`", file.display());
                };
                assert_no_unknown_fields(value, other, &format!("{at}.{key}"), file);
            }
        }
        (Value::Array(left), Value::Array(right)) => {
            assert_eq!(left.len(), right.len(), "{}: {at}", file.display());
            for (index, (value, other)) in left.iter().zip(right).enumerate() {
                assert_no_unknown_fields(value, other, &format!("{at}[{index}]"), file);
            }
        }
        _ => {}
    }
}

fn check_typed<T: serde::de::DeserializeOwned + serde::Serialize>(document: &Value, file: &Path) {
    let typed: T = serde_json::from_value(document.clone())
        .unwrap_or_else(|error| panic!("{}: {error}", file.display()));
    let back = serde_json::to_value(&typed).unwrap();
    assert_no_unknown_fields(document, &back, "", file);
}

/// Checks one document and returns its kind.
fn check_document(document: &Value, file: &Path) -> String {
    let api_version = document["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kind = document["kind"].as_str().unwrap_or_default().to_string();
    assert!(
        document["metadata"]["name"].is_string(),
        "{}: a {kind} without a name",
        file.display()
    );
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => check_typed::<Namespace>(document, file),
        ("v1", "ServiceAccount") => check_typed::<ServiceAccount>(document, file),
        ("v1", "ConfigMap") => check_typed::<ConfigMap>(document, file),
        ("v1", "Secret") => check_typed::<Secret>(document, file),
        ("v1", "Service") => check_typed::<Service>(document, file),
        ("v1", "Pod") => check_typed::<Pod>(document, file),
        ("apps/v1", "Deployment") => check_typed::<Deployment>(document, file),
        ("apps/v1", "DaemonSet") => check_typed::<DaemonSet>(document, file),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            check_typed::<ClusterRole>(document, file)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            check_typed::<ClusterRoleBinding>(document, file)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => check_typed::<Role>(document, file),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            check_typed::<RoleBinding>(document, file)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            check_typed::<CustomResourceDefinition>(document, file)
        }
        // prometheus-operator kinds have no k8s-openapi type: check the parts we rely on.
        ("monitoring.coreos.com/v1", "PrometheusRule") => {
            for group in document["spec"]["groups"].as_array().unwrap() {
                for rule in group["rules"].as_array().unwrap() {
                    assert!(rule["alert"].is_string(), "{}: {rule}", file.display());
                    assert!(rule["expr"].is_string(), "{}: {rule}", file.display());
                }
            }
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor" | "PodMonitor")
        | ("monitoring.coreos.com/v1alpha1", "AlertmanagerConfig") => {
            assert!(document["spec"].is_object(), "{}", file.display());
        }
        other => panic!("{}: no check for {other:?}; add one", file.display()),
    }
    kind
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let deploy = repo_root().join("deploy");
    let mut kinds = BTreeSet::new();
    for file in yaml_files_under(&deploy) {
        if file
            .file_name()
            .is_some_and(|name| name == "kustomization.yaml")
        {
            continue;
        }
        let is_patch = file.to_string_lossy().ends_with("-patch.yaml");
        for document in documents(&file) {
            if is_patch {
                // A kustomize patch is a partial object: it names its target and nothing more.
                assert!(
                    document["metadata"]["name"].is_string(),
                    "{}",
                    file.display()
                );
                continue;
            }
            kinds.insert(check_document(&document, &file));
        }
    }
    // What an install needs is all there.
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "Deployment",
        "DaemonSet",
        "Service",
        "ConfigMap",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(kind), "deploy/ has no {kind}");
    }
}

#[test]
fn kustomization_lists_every_installable_manifest() {
    let deploy = repo_root().join("deploy");
    let kustomization = documents(&deploy.join("kustomization.yaml")).remove(0);
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = yaml_files_under(&deploy)
        .iter()
        .map(|file| {
            file.strip_prefix(&deploy)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        // Examples are adapted by hand before use; the kustomization itself is not a resource.
        .filter(|name| !name.starts_with("examples/") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "deploy/kustomization.yaml resources");
}

#[test]
fn every_metric_in_an_alert_rule_is_exported_by_the_code() {
    let mut source = String::new();
    for dir in ["controller/operator/src", "controller/agent/src"] {
        for file in fs::read_dir(repo_root().join(dir)).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "rs") {
                source.push_str(&fs::read_to_string(path).unwrap());
            }
        }
    }
    let rules = documents(&repo_root().join("deploy/monitoring/prometheus-rules.yaml"));
    let mut checked = 0;
    for rule in rules[0]["spec"]["groups"][0]["rules"].as_array().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("automigrate_") {
                assert!(
                    source.contains(&format!("\"{word}\"")),
                    "alert {} uses {word}, which no code exports",
                    rule["alert"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 4, "the rules name our metrics");
}
