//! API discovery: the documents kubectl reads to map `pods`, `mig` or `lease` to a REST path.
//!
//! Owns the catalogue of resource types this server advertises ([`resources`]) and the legacy
//! (unaggregated) discovery documents built from it: `/api` (`APIVersions`), `/api/v1` and
//! `/apis/{group}/{version}` (`APIResourceList`), `/apis` (`APIGroupList`) and `/apis/{group}`
//! (`APIGroup`).
//!
//! The catalogue is the core resources and built-in groups this product and its manifests use
//! (pods, nodes, events, leases, RBAC for `deploy/`...), the project's own `Migration` resource
//! (`automigrate.dev/v1alpha1`, as `deploy/crd.yaml` defines it: namespaced, short name `mig`,
//! category `automigrate`, status subresource, printer columns), and every
//! CustomResourceDefinition stored in the cluster, so `kubectl apply -f` of a CRD makes its
//! resource usable like on a real server.
//!
//! Why only legacy discovery: kubectl 1.30+ first asks `/api` and `/apis` for aggregated
//! discovery (`Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,
//! ...,application/json`). client-go decides by the response's `Content-Type`: a plain
//! `application/json` answer is read as the legacy `APIVersions`/`APIGroupList`, and it then
//! fetches each group version's `APIResourceList`. One format keeps the two document sets from
//! drifting apart; the cost is a few more requests per (cached) discovery.

use serde_json::{Value, json};

use crate::path::ResourceType;
use crate::store::Store;

/// Every verb of a plain resource.
const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
/// Verbs of a `/status` subresource.
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

/// A printer column of a custom resource (`additionalPrinterColumns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrinterColumn {
    pub name: String,
    /// `string`, `integer`, `number`, `boolean` or `date`.
    pub type_: String,
    /// Simple JSONPath (`.status.phase`).
    pub json_path: String,
    pub priority: i64,
    pub description: String,
}

/// One advertised resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiResource {
    pub resource: ResourceType,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Subresources: (name, kind, group of that kind, verbs).
    pub subresources: Vec<(String, String, String, Vec<String>)>,
    /// Printer columns of a custom resource; empty for built-ins (see `crate::table`).
    pub printer_columns: Vec<PrinterColumn>,
}

/// A built-in entry: (group, version, plural, kind, namespaced, short names, subresources).
type Builtin = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    bool,
    &'static [&'static str],
    &'static [&'static str],
);

/// The built-in catalogue. Subresource `status` gets STATUS_VERBS; the others are listed
/// explicitly in [`builtin_subresource`].
const BUILTINS: &[Builtin] = &[
    (
        "",
        "v1",
        "pods",
        "Pod",
        true,
        &["po"],
        &["status", "eviction"],
    ),
    (
        "",
        "v1",
        "nodes",
        "Node",
        false,
        &["no"],
        &["status", "proxy"],
    ),
    (
        "",
        "v1",
        "namespaces",
        "Namespace",
        false,
        &["ns"],
        &["status", "finalize"],
    ),
    ("", "v1", "events", "Event", true, &["ev"], &[]),
    ("", "v1", "configmaps", "ConfigMap", true, &["cm"], &[]),
    ("", "v1", "secrets", "Secret", true, &[], &[]),
    ("", "v1", "services", "Service", true, &["svc"], &["status"]),
    ("", "v1", "endpoints", "Endpoints", true, &["ep"], &[]),
    (
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        &[],
    ),
    (
        "",
        "v1",
        "persistentvolumes",
        "PersistentVolume",
        false,
        &["pv"],
        &["status"],
    ),
    (
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        true,
        &["pvc"],
        &["status"],
    ),
    (
        "apps",
        "v1",
        "deployments",
        "Deployment",
        true,
        &["deploy"],
        &["status"],
    ),
    (
        "apps",
        "v1",
        "daemonsets",
        "DaemonSet",
        true,
        &["ds"],
        &["status"],
    ),
    (
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        true,
        &["sts"],
        &["status"],
    ),
    (
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        true,
        &["rs"],
        &["status"],
    ),
    ("batch", "v1", "jobs", "Job", true, &[], &["status"]),
    (
        "batch",
        "v1",
        "cronjobs",
        "CronJob",
        true,
        &["cj"],
        &["status"],
    ),
    (
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        true,
        &["pdb"],
        &["status"],
    ),
    (
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        true,
        &[],
        &[],
    ),
    ("events.k8s.io", "v1", "events", "Event", true, &[], &[]),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "roles",
        "Role",
        true,
        &[],
        &[],
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "rolebindings",
        "RoleBinding",
        true,
        &[],
        &[],
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "ClusterRole",
        false,
        &[],
        &[],
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
        &[],
        &[],
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        &["status"],
    ),
];

/// (kind, group of the kind, verbs) of a non-`status` built-in subresource.
fn builtin_subresource(name: &str) -> (&'static str, &'static str, &'static [&'static str]) {
    match name {
        "eviction" => ("Eviction", "policy", &["create"]),
        "proxy" => (
            "NodeProxyOptions",
            "",
            &["create", "delete", "get", "patch", "update"],
        ),
        "finalize" => ("Namespace", "", &["update"]),
        _ => ("", "", STATUS_VERBS),
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The `Migration` custom resource as `deploy/crd.yaml` (generated from
/// `controller/operator/src/crd.rs`) defines it. Advertised even before the CRD is applied,
/// because the local cluster exists to run this product's controller.
fn migration() -> ApiResource {
    let column = |name: &str, type_: &str, json_path: &str, priority: i64, description: &str| {
        PrinterColumn {
            name: name.into(),
            type_: type_.into(),
            json_path: json_path.into(),
            priority,
            description: description.into(),
        }
    };
    ApiResource {
        resource: ResourceType::new("automigrate.dev", "v1alpha1", "migrations"),
        singular: "migration".into(),
        kind: "Migration".into(),
        namespaced: true,
        short_names: strings(&["mig"]),
        categories: strings(&["automigrate"]),
        subresources: vec![(
            "status".into(),
            "Migration".into(),
            "automigrate.dev".into(),
            strings(STATUS_VERBS),
        )],
        printer_columns: vec![
            column(
                "Phase",
                "string",
                ".status.phase",
                0,
                "Where the migration is in its state machine",
            ),
            column("Pod", "string", ".spec.pod", 0, "The pod being moved"),
            column(
                "Source",
                "string",
                ".status.source",
                0,
                "The node the pod ran on",
            ),
            column(
                "Target",
                "string",
                ".status.target",
                0,
                "The node the pod is moved to",
            ),
            column(
                "Trigger",
                "string",
                ".spec.trigger",
                1,
                "Why the pod is moved",
            ),
            column("Age", "date", ".metadata.creationTimestamp", 0, ""),
        ],
    }
}

/// The resource types a stored CustomResourceDefinition serves (one per served version).
fn from_crd(crd: &Value) -> Vec<ApiResource> {
    let text = |pointer: &str| {
        crd.pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let list = |pointer: &str| -> Vec<String> {
        crd.pointer(pointer)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let group = text("/spec/group");
    let plural = text("/spec/names/plural");
    let kind = text("/spec/names/kind");
    if group.is_empty() || plural.is_empty() || kind.is_empty() {
        return Vec::new();
    }
    let singular = match text("/spec/names/singular") {
        s if s.is_empty() => kind.to_lowercase(),
        s => s,
    };
    let namespaced = text("/spec/scope") != "Cluster";
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    versions
        .iter()
        .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
        .filter_map(|v| {
            let version = v.get("name").and_then(Value::as_str)?;
            let mut subresources = Vec::new();
            if v.pointer("/subresources/status").is_some() {
                subresources.push((
                    "status".to_owned(),
                    kind.clone(),
                    group.clone(),
                    strings(STATUS_VERBS),
                ));
            }
            let printer_columns = v
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
                .map(|columns| {
                    columns
                        .iter()
                        .filter_map(|c| {
                            Some(PrinterColumn {
                                name: c.get("name")?.as_str()?.to_owned(),
                                type_: c.get("type")?.as_str()?.to_owned(),
                                json_path: c.get("jsonPath")?.as_str()?.to_owned(),
                                priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                                description: c
                                    .get("description")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_owned(),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(ApiResource {
                resource: ResourceType::new(&group, version, &plural),
                singular: singular.clone(),
                kind: kind.clone(),
                namespaced,
                short_names: list("/spec/names/shortNames"),
                categories: list("/spec/names/categories"),
                subresources,
                printer_columns,
            })
        })
        .collect()
}

/// Every advertised resource type: built-ins, `Migration`, then stored CRDs (a CRD that
/// redefines an advertised type replaces it, as applying `deploy/crd.yaml` does).
pub(crate) fn resources(store: &Store) -> Vec<ApiResource> {
    let mut all: Vec<ApiResource> = BUILTINS
        .iter()
        .map(
            |&(group, version, plural, kind, namespaced, short_names, subresources)| ApiResource {
                resource: ResourceType::new(group, version, plural),
                singular: kind.to_lowercase(),
                kind: kind.to_owned(),
                namespaced,
                short_names: strings(short_names),
                // `kubectl get all`, as a real server groups it.
                categories: if matches!(
                    plural,
                    "pods"
                        | "services"
                        | "deployments"
                        | "daemonsets"
                        | "statefulsets"
                        | "replicasets"
                        | "jobs"
                        | "cronjobs"
                ) {
                    strings(&["all"])
                } else {
                    Vec::new()
                },
                subresources: subresources
                    .iter()
                    .map(|&name| {
                        let (sub_kind, sub_group, verbs) = builtin_subresource(name);
                        let sub_kind = if sub_kind.is_empty() { kind } else { sub_kind };
                        (
                            name.to_owned(),
                            sub_kind.to_owned(),
                            sub_group.to_owned(),
                            strings(verbs),
                        )
                    })
                    .collect(),
                printer_columns: Vec::new(),
            },
        )
        .collect();
    all.push(migration());
    let crds = ResourceType::new("apiextensions.k8s.io", "v1", "customresourcedefinitions");
    for crd in store.list(&crds, &crate::watch::Filter::default()) {
        for defined in from_crd(&crd) {
            all.retain(|known| known.resource != defined.resource);
            all.push(defined);
        }
    }
    all
}

/// The advertised type of `resource`, if any.
pub(crate) fn find(store: &Store, resource: &ResourceType) -> Option<ApiResource> {
    resources(store)
        .into_iter()
        .find(|r| &r.resource == resource)
}

/// Groups with their versions, in first-seen order (the core group excluded).
fn groups(resources: &[ApiResource]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for r in resources.iter().filter(|r| !r.resource.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == r.resource.group) {
            Some((_, versions)) if !versions.contains(&r.resource.version) => {
                versions.push(r.resource.version.clone());
            }
            Some(_) => {}
            None => groups.push((r.resource.group.clone(), vec![r.resource.version.clone()])),
        }
    }
    groups
}

fn group_document(group: &str, versions: &[String]) -> Value {
    let version = |v: &String| json!({ "groupVersion": format!("{group}/{v}"), "version": v });
    json!({
        "name": group,
        "versions": versions.iter().map(version).collect::<Vec<_>>(),
        "preferredVersion": versions.first().map(version).unwrap_or(Value::Null),
    })
}

fn resource_list(group_version: &str, resources: &[&ApiResource]) -> Value {
    let mut entries = Vec::new();
    for r in resources {
        let mut entry = json!({
            "name": r.resource.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": ALL_VERBS,
        });
        if let Some(map) = entry.as_object_mut() {
            if !r.short_names.is_empty() {
                map.insert("shortNames".into(), json!(r.short_names));
            }
            if !r.categories.is_empty() {
                map.insert("categories".into(), json!(r.categories));
            }
        }
        entries.push(entry);
        for (name, kind, group, verbs) in &r.subresources {
            let mut sub = json!({
                "name": format!("{}/{name}", r.resource.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind,
                "verbs": verbs,
            });
            if *group != r.resource.group
                && let Some(map) = sub.as_object_mut()
            {
                map.insert("group".into(), json!(group));
                map.insert("version".into(), json!("v1"));
            }
            entries.push(sub);
        }
    }
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": entries,
    })
}

/// The discovery document at `path`, `None` when `path` is not a discovery path (or names a
/// group or version this server does not serve).
pub(crate) fn document(store: &Store, path: &str) -> Option<Value> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let all = resources(store);
    match segments.as_slice() {
        ["api"] => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [],
        })),
        ["api", "v1"] => {
            let core: Vec<&ApiResource> =
                all.iter().filter(|r| r.resource.group.is_empty()).collect();
            Some(resource_list("v1", &core))
        }
        ["apis"] => Some(json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": groups(&all)
                .iter()
                .map(|(g, versions)| group_document(g, versions))
                .collect::<Vec<_>>(),
        })),
        ["apis", group] => {
            let (name, versions) = groups(&all).into_iter().find(|(g, _)| g == group)?;
            let mut document = group_document(&name, &versions);
            if let Some(map) = document.as_object_mut() {
                map.insert("kind".into(), json!("APIGroup"));
                map.insert("apiVersion".into(), json!("v1"));
            }
            Some(document)
        }
        ["apis", group, version] => {
            let served: Vec<&ApiResource> = all
                .iter()
                .filter(|r| r.resource.group == *group && r.resource.version == *version)
                .collect();
            if served.is_empty() {
                return None;
            }
            Some(resource_list(&format!("{group}/{version}"), &served))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreLimits;

    fn store() -> Store {
        Store::new(StoreLimits {
            history_per_type: 16,
            watch_channel_capacity: 16,
            graceful_pod_deletion: false,
        })
    }

    #[test]
    fn core_list_has_pods_with_subresources_and_short_names() {
        let doc = document(&store(), "/api/v1").unwrap();
        let resources = doc["resources"].as_array().unwrap();
        let pods = resources.iter().find(|r| r["name"] == "pods").unwrap();
        assert_eq!(pods["kind"], "Pod");
        assert_eq!(pods["namespaced"], true);
        assert_eq!(pods["shortNames"], json!(["po"]));
        let eviction = resources
            .iter()
            .find(|r| r["name"] == "pods/eviction")
            .unwrap();
        assert_eq!(eviction["group"], "policy");
        assert_eq!(eviction["kind"], "Eviction");
        let nodes = resources.iter().find(|r| r["name"] == "nodes").unwrap();
        assert_eq!(nodes["namespaced"], false);
    }

    #[test]
    fn groups_include_migrations_and_stored_crds() {
        let mut store = store();
        let doc = document(&store, "/apis").unwrap();
        let names: Vec<&str> = doc["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"automigrate.dev"));
        assert!(names.contains(&"coordination.k8s.io"));
        assert!(!names.contains(&"example.dev"));
        let migrations = document(&store, "/apis/automigrate.dev/v1alpha1").unwrap();
        assert_eq!(migrations["resources"][0]["shortNames"], json!(["mig"]));
        assert_eq!(migrations["resources"][1]["name"], "migrations/status");

        let crds = ResourceType::new("apiextensions.k8s.io", "v1", "customresourcedefinitions");
        store
            .put_direct(
                &crds,
                json!({
                    "apiVersion": "apiextensions.k8s.io/v1",
                    "kind": "CustomResourceDefinition",
                    "metadata": {"name": "widgets.example.dev"},
                    "spec": {
                        "group": "example.dev",
                        "scope": "Cluster",
                        "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                        "versions": [{"name": "v2", "served": true, "storage": true,
                            "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}]}],
                    },
                }),
            )
            .unwrap();
        let group = document(&store, "/apis/example.dev").unwrap();
        assert_eq!(group["preferredVersion"]["groupVersion"], "example.dev/v2");
        let widgets = document(&store, "/apis/example.dev/v2").unwrap();
        assert_eq!(widgets["resources"][0]["namespaced"], false);
        assert_eq!(widgets["resources"][0]["singularName"], "widget");
        let found = find(&store, &ResourceType::new("example.dev", "v2", "widgets")).unwrap();
        assert_eq!(found.printer_columns[0].json_path, ".spec.size");
        assert_eq!(document(&store, "/apis/nothing.dev/v1"), None);
    }
}
