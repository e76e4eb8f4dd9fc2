//! REST path parsing: which resource, namespace, object and subresource a URL addresses.
//!
//! Owns [`ResourceType`] (group, version, plural: the store's first index level, written as the
//! collection path prefix `/api/v1/pods` or `/apis/{group}/{version}/{plural}`) and [`Target`],
//! the parsed form of a request path. Also the static facts the store needs about built-in
//! resources and that a schema-less server cannot learn: the `kind` for a plural nobody has
//! written yet, and which resources have a `/status` subresource.

use std::fmt;

/// One resource type: group, version and plural name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceType {
    /// API group, empty for the core group.
    pub group: String,
    /// API version, e.g. `v1`.
    pub version: String,
    /// Lower-case plural resource name, e.g. `pods`.
    pub plural: String,
}

impl ResourceType {
    /// A resource type from its parts.
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        ResourceType {
            group: group.to_owned(),
            version: version.to_owned(),
            plural: plural.to_owned(),
        }
    }

    /// `apiVersion` of objects of this type (`v1` or `group/version`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The collection path prefix that keys this type in the store.
    pub fn key(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}/{}", self.version, self.plural)
        } else {
            format!("/apis/{}/{}/{}", self.group, self.version, self.plural)
        }
    }

    /// Whether writes to the main resource keep `.status` (and `/status` exists).
    pub fn has_status_subresource(&self) -> bool {
        if !is_builtin_group(&self.group) {
            // Custom resources: the CRDs this project defines all enable the status subresource.
            return true;
        }
        let with_status: &[&str] = match self.group.as_str() {
            "" => &[
                "pods",
                "nodes",
                "namespaces",
                "services",
                "persistentvolumes",
                "persistentvolumeclaims",
                "replicationcontrollers",
                "resourcequotas",
            ],
            "apps" => &["deployments", "statefulsets", "daemonsets", "replicasets"],
            "batch" => &["jobs", "cronjobs"],
            "autoscaling" => &["horizontalpodautoscalers"],
            "policy" => &["poddisruptionbudgets"],
            "networking.k8s.io" => &["ingresses", "servicecidrs"],
            "apiextensions.k8s.io" => &["customresourcedefinitions"],
            "certificates.k8s.io" => &["certificatesigningrequests"],
            "storage.k8s.io" => &["volumeattachments"],
            "apiregistration.k8s.io" => &["apiservices"],
            "flowcontrol.apiserver.k8s.io" => &["flowschemas", "prioritylevelconfigurations"],
            "resource.k8s.io" => &["resourceclaims"],
            _ => &[],
        };
        with_status.contains(&self.plural.as_str())
    }

    /// Whether a DELETE that removes the object at once answers with the object (pods and
    /// custom resources) rather than a Success `Status`, as the real registry does.
    pub fn returns_deleted_object(&self) -> bool {
        !is_builtin_group(&self.group) || (self.group.is_empty() && self.plural == "pods")
    }

    /// The `kind` of this resource when no object of it has been written yet.
    pub fn default_kind(&self) -> String {
        let known = match self.plural.as_str() {
            "pods" => Some("Pod"),
            "nodes" => Some("Node"),
            "namespaces" => Some("Namespace"),
            "configmaps" => Some("ConfigMap"),
            "secrets" => Some("Secret"),
            "services" => Some("Service"),
            "endpoints" => Some("Endpoints"),
            "events" => Some("Event"),
            "leases" => Some("Lease"),
            "serviceaccounts" => Some("ServiceAccount"),
            "persistentvolumes" => Some("PersistentVolume"),
            "persistentvolumeclaims" => Some("PersistentVolumeClaim"),
            "deployments" => Some("Deployment"),
            "statefulsets" => Some("StatefulSet"),
            "daemonsets" => Some("DaemonSet"),
            "replicasets" => Some("ReplicaSet"),
            "jobs" => Some("Job"),
            "cronjobs" => Some("CronJob"),
            "poddisruptionbudgets" => Some("PodDisruptionBudget"),
            "customresourcedefinitions" => Some("CustomResourceDefinition"),
            "endpointslices" => Some("EndpointSlice"),
            "priorityclasses" => Some("PriorityClass"),
            _ => None,
        };
        if let Some(kind) = known {
            return kind.to_owned();
        }
        // Custom resources: `migrations` -> `Migration`, `policies` -> `Policy`.
        let singular = if let Some(stem) = self.plural.strip_suffix("ies") {
            format!("{stem}y")
        } else if let Some(stem) = self.plural.strip_suffix("ses") {
            format!("{stem}s")
        } else if let Some(stem) = self.plural.strip_suffix('s') {
            stem.to_owned()
        } else {
            self.plural.clone()
        };
        let mut chars = singular.chars();
        match chars.next() {
            Some(first) => first.to_uppercase().chain(chars).collect(),
            None => singular,
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            write!(f, "{}", self.plural)
        } else {
            write!(f, "{}.{}", self.plural, self.group)
        }
    }
}

/// Groups served by Kubernetes itself; anything else is a custom resource.
fn is_builtin_group(group: &str) -> bool {
    matches!(
        group,
        "" | "apps"
            | "batch"
            | "autoscaling"
            | "policy"
            | "networking.k8s.io"
            | "rbac.authorization.k8s.io"
            | "storage.k8s.io"
            | "coordination.k8s.io"
            | "events.k8s.io"
            | "discovery.k8s.io"
            | "scheduling.k8s.io"
            | "node.k8s.io"
            | "certificates.k8s.io"
            | "admissionregistration.k8s.io"
            | "apiextensions.k8s.io"
            | "apiregistration.k8s.io"
            | "flowcontrol.apiserver.k8s.io"
            | "resource.k8s.io"
            | "authentication.k8s.io"
            | "authorization.k8s.io"
            | "storagemigration.k8s.io"
            | "internal.apiserver.k8s.io"
    )
}

/// What a request path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A collection: all objects of a type, optionally within one namespace.
    Collection {
        /// The resource type.
        resource: ResourceType,
        /// Namespace scope (`None`: cluster-scoped type or all namespaces).
        namespace: Option<String>,
    },
    /// One named object, or one of its subresources.
    Object {
        /// The resource type.
        resource: ResourceType,
        /// Namespace (`None` for cluster-scoped objects).
        namespace: Option<String>,
        /// Object name.
        name: String,
        /// Subresource (`status`, ...), if any.
        subresource: Option<String>,
    },
    /// `/api/v1/nodes/{node}/proxy/{path}`.
    NodeProxy {
        /// Node name (any `:port` suffix removed).
        node: String,
        /// Path below `proxy`, starting with `/`.
        path: String,
    },
    /// `/version`.
    Version,
}

/// Parses a request path (without query).
pub fn parse(path: &str) -> Option<Target> {
    if path == "/version" || path == "/version/" {
        return Some(Target::Version);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    if version.is_empty() || rest.is_empty() || rest.iter().any(|s| s.is_empty()) {
        return None;
    }
    let resource = |plural: &str| ResourceType::new(group, version, plural);
    match rest {
        ["namespaces"] => Some(Target::Collection {
            resource: resource("namespaces"),
            namespace: None,
        }),
        ["namespaces", ns] => Some(Target::Object {
            resource: resource("namespaces"),
            namespace: None,
            name: (*ns).to_owned(),
            subresource: None,
        }),
        // A namespace's own subresources; no resource is named like these.
        ["namespaces", ns, sub @ ("status" | "finalize")] => Some(Target::Object {
            resource: resource("namespaces"),
            namespace: None,
            name: (*ns).to_owned(),
            subresource: Some((*sub).to_owned()),
        }),
        ["namespaces", ns, plural] => Some(Target::Collection {
            resource: resource(plural),
            namespace: Some((*ns).to_owned()),
        }),
        ["namespaces", ns, plural, name, sub @ ..] => object(resource(plural), Some(ns), name, sub),
        [plural] => Some(Target::Collection {
            resource: resource(plural),
            namespace: None,
        }),
        [plural, name, sub @ ..] => {
            if group.is_empty() && *plural == "nodes" && sub.first() == Some(&"proxy") {
                let node = name.split(':').next().unwrap_or(name).to_owned();
                let below = sub.get(1..).unwrap_or_default().join("/");
                return Some(Target::NodeProxy {
                    node,
                    path: format!("/{below}"),
                });
            }
            object(resource(plural), None, name, sub)
        }
        [] => None,
    }
}

fn object(
    resource: ResourceType,
    namespace: Option<&str>,
    name: &str,
    sub: &[&str],
) -> Option<Target> {
    let subresource = match sub {
        [] => None,
        [one] => Some((*one).to_owned()),
        _ => return None,
    };
    Some(Target::Object {
        resource,
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
        subresource,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_core_and_group_paths() {
        assert_eq!(
            parse("/api/v1/namespaces/default/pods/p1/status"),
            Some(Target::Object {
                resource: ResourceType::new("", "v1", "pods"),
                namespace: Some("default".into()),
                name: "p1".into(),
                subresource: Some("status".into()),
            })
        );
        assert_eq!(
            parse("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"),
            Some(Target::Collection {
                resource: ResourceType::new("coordination.k8s.io", "v1", "leases"),
                namespace: Some("kube-node-lease".into()),
            })
        );
        assert_eq!(
            parse("/api/v1/nodes"),
            Some(Target::Collection {
                resource: ResourceType::new("", "v1", "nodes"),
                namespace: None,
            })
        );
        assert_eq!(
            parse("/api/v1/namespaces/kube-system"),
            Some(Target::Object {
                resource: ResourceType::new("", "v1", "namespaces"),
                namespace: None,
                name: "kube-system".into(),
                subresource: None,
            })
        );
        assert_eq!(
            parse("/api/v1/nodes/n1:10250/proxy/checkpoint/ns/pod/c"),
            Some(Target::NodeProxy {
                node: "n1".into(),
                path: "/checkpoint/ns/pod/c".into(),
            })
        );
        assert_eq!(parse("/healthz"), None);
        assert_eq!(parse("/api/v1/"), None);
    }

    #[test]
    fn kinds_and_status_subresources() {
        assert_eq!(
            ResourceType::new("automigrate.dev", "v1alpha1", "migrations").default_kind(),
            "Migration"
        );
        assert_eq!(
            ResourceType::new("x.dev", "v1", "policies").default_kind(),
            "Policy"
        );
        assert_eq!(
            ResourceType::new("", "v1", "configmaps").default_kind(),
            "ConfigMap"
        );
        assert!(ResourceType::new("", "v1", "pods").has_status_subresource());
        assert!(!ResourceType::new("", "v1", "configmaps").has_status_subresource());
        assert!(!ResourceType::new("coordination.k8s.io", "v1", "leases").has_status_subresource());
        assert!(
            ResourceType::new("automigrate.dev", "v1alpha1", "migrations").has_status_subresource()
        );
        assert_eq!(
            ResourceType::new("apps", "v1", "deployments").key(),
            "/apis/apps/v1/deployments"
        );
    }
}
