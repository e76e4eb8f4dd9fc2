//! Server-side printing: `meta.k8s.io/v1` `Table` answers for `kubectl get`.
//!
//! kubectl asks for `Accept: application/json;as=Table;v=v1;g=meta.k8s.io,...` on `get` (lists,
//! single objects and watches). A server that answers with plain objects still works, but
//! kubectl then prints only NAME and AGE; a Table carries the columns a real server prints, so
//! `kubectl get migrations -A` shows the phase. Owns [`TableSpec`] (the columns of one resource
//! type and how much of each object rides along in its row, `includeObject`) and the cell
//! formatting, including Kubernetes' `HumanDuration` for ages.
//!
//! Columns: custom resources (the project's `Migration` included) print their CRD's
//! `additionalPrinterColumns` after NAME, as the apiextensions server does (a date column is
//! rendered as an age); pods, nodes and leases print a subset of the built-in printers' columns
//! (READY, STATUS, RESTARTS, AGE, IP, NODE; STATUS, ROLES, AGE, VERSION; HOLDER, AGE); any other
//! type prints NAME and AGE.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::discovery::ApiResource;
use crate::path::ResourceType;

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Include {
    None,
    /// `PartialObjectMetadata` (the default; kubectl needs it for the NAMESPACE column).
    Metadata,
    Object,
}

impl Include {
    pub fn from_query(value: Option<&str>) -> Self {
        match value {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// Where a cell's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Name,
    Age,
    /// A CRD printer column: a simple JSONPath.
    Path(String),
    /// A CRD printer column of type `date`, printed as an age.
    DatePath(String),
    PodReady,
    PodStatus,
    PodRestarts,
    PodIp,
    PodNode,
    NodeStatus,
    NodeRoles,
    NodeVersion,
    LeaseHolder,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    name: String,
    type_: String,
    format: String,
    description: String,
    priority: i64,
    source: Source,
}

impl Column {
    fn new(name: &str, type_: &str, priority: i64, source: Source) -> Self {
        Column {
            name: name.into(),
            type_: type_.into(),
            format: if source == Source::Name {
                "name".into()
            } else {
                String::new()
            },
            description: String::new(),
            priority,
            source,
        }
    }
}

/// The columns of one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableSpec {
    columns: Vec<Column>,
    include: Include,
}

impl TableSpec {
    /// The columns for `resource`; `advertised` is its discovery entry (custom resources carry
    /// their printer columns there).
    pub fn for_resource(
        resource: &ResourceType,
        advertised: Option<&ApiResource>,
        include: Include,
    ) -> Arc<Self> {
        use Source::*;
        let name = Column::new("Name", "string", 0, Name);
        let age = Column::new("Age", "string", 0, Age);
        let columns = match (resource.group.as_str(), resource.plural.as_str()) {
            ("", "pods") => vec![
                name,
                Column::new("Ready", "string", 0, PodReady),
                Column::new("Status", "string", 0, PodStatus),
                Column::new("Restarts", "string", 0, PodRestarts),
                age,
                Column::new("IP", "string", 1, PodIp),
                Column::new("Node", "string", 1, PodNode),
            ],
            ("", "nodes") => vec![
                name,
                Column::new("Status", "string", 0, NodeStatus),
                Column::new("Roles", "string", 0, NodeRoles),
                age,
                Column::new("Version", "string", 0, NodeVersion),
            ],
            ("coordination.k8s.io", "leases") => {
                vec![name, Column::new("Holder", "string", 0, LeaseHolder), age]
            }
            _ => match advertised {
                Some(api) if !api.printer_columns.is_empty() => {
                    let mut columns = vec![name];
                    columns.extend(api.printer_columns.iter().map(|c| Column {
                        name: c.name.clone(),
                        // Dates are printed as ages, so they travel as strings.
                        type_: if c.type_ == "date" {
                            "string".into()
                        } else {
                            c.type_.clone()
                        },
                        format: String::new(),
                        description: c.description.clone(),
                        priority: c.priority,
                        source: if c.type_ == "date" {
                            DatePath(c.json_path.clone())
                        } else {
                            Path(c.json_path.clone())
                        },
                    }));
                    columns
                }
                _ => vec![name, age],
            },
        };
        Arc::new(TableSpec { columns, include })
    }

    fn column_definitions(&self) -> Vec<Value> {
        self.columns
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "type": c.type_,
                    "format": c.format,
                    "description": c.description,
                    "priority": c.priority,
                })
            })
            .collect()
    }

    fn row(&self, object: &Value, now: jiff::Timestamp) -> Value {
        let cells: Vec<Value> = self
            .columns
            .iter()
            .map(|c| cell(&c.source, object, now))
            .collect();
        let mut row = json!({ "cells": cells });
        let attached = match self.include {
            Include::None => None,
            Include::Object => Some(object.clone()),
            Include::Metadata => Some(json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": object.get("metadata").cloned().unwrap_or_else(|| json!({})),
            })),
        };
        if let (Some(attached), Some(map)) = (attached, row.as_object_mut()) {
            map.insert("object".into(), attached);
        }
        row
    }

    /// A Table of `objects` (`resource_version`: the list's, `None` for a single object or a
    /// watch event).
    pub fn table<'a>(
        &self,
        objects: impl IntoIterator<Item = &'a Value>,
        resource_version: Option<u64>,
        now: jiff::Timestamp,
    ) -> Value {
        let metadata = match resource_version {
            Some(rv) => json!({ "resourceVersion": rv.to_string() }),
            None => json!({}),
        };
        json!({
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "columnDefinitions": self.column_definitions(),
            "rows": objects.into_iter().map(|o| self.row(o, now)).collect::<Vec<_>>(),
        })
    }
}

fn text<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object.pointer(pointer).and_then(Value::as_str)
}

/// Follows a simple JSONPath (`.status.phase`, `.spec.containers[0].image`).
fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut node = object;
    for step in path.trim_start_matches('.').split('.') {
        if step.is_empty() {
            continue;
        }
        let (key, index) = match step.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (step, None),
        };
        if !key.is_empty() {
            node = node.get(key)?;
        }
        if let Some(index) = index {
            node = node.get(index)?;
        }
    }
    Some(node)
}

fn cell(source: &Source, object: &Value, now: jiff::Timestamp) -> Value {
    match source {
        Source::Name => json!(text(object, "/metadata/name").unwrap_or_default()),
        Source::Age => age(text(object, "/metadata/creationTimestamp"), now),
        Source::DatePath(path) => match json_path(object, path).and_then(Value::as_str) {
            Some(timestamp) => age(Some(timestamp), now),
            None => Value::Null,
        },
        Source::Path(path) => match json_path(object, path) {
            None | Some(Value::Null) => Value::Null,
            Some(Value::String(s)) => json!(s),
            Some(other @ (Value::Number(_) | Value::Bool(_))) => other.clone(),
            Some(other) => json!(other.to_string()),
        },
        Source::PodReady => {
            let total = object
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let ready = statuses(object)
                .iter()
                .filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            json!(format!("{ready}/{total}"))
        }
        Source::PodStatus => json!(pod_status(object)),
        Source::PodRestarts => {
            let restarts: i64 = statuses(object)
                .iter()
                .filter_map(|s| s.get("restartCount").and_then(Value::as_i64))
                .sum();
            json!(restarts.to_string())
        }
        Source::PodIp => json!(text(object, "/status/podIP").unwrap_or("<none>")),
        Source::PodNode => json!(text(object, "/spec/nodeName").unwrap_or("<none>")),
        Source::NodeStatus => json!(node_status(object)),
        Source::NodeRoles => {
            let roles: Vec<&str> = object
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|labels| {
                    labels
                        .keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .filter(|r| !r.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            if roles.is_empty() {
                json!("<none>")
            } else {
                json!(roles.join(","))
            }
        }
        Source::NodeVersion => json!(text(object, "/status/nodeInfo/kubeletVersion").unwrap_or("")),
        Source::LeaseHolder => json!(text(object, "/spec/holderIdentity").unwrap_or("")),
    }
}

fn statuses(pod: &Value) -> Vec<&Value> {
    pod.pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

/// kubectl's pod STATUS: the phase, overridden by a container's waiting or terminated reason,
/// `Terminating` once deletion started.
fn pod_status(pod: &Value) -> String {
    let mut reason = text(pod, "/status/reason")
        .or_else(|| text(pod, "/status/phase"))
        .unwrap_or("Pending")
        .to_owned();
    for status in statuses(pod) {
        if let Some(waiting) = text(status, "/state/waiting/reason") {
            reason = waiting.to_owned();
        } else if let Some(terminated) = status.pointer("/state/terminated") {
            reason = match (
                text(terminated, "/reason"),
                terminated.get("signal").and_then(Value::as_i64),
            ) {
                (Some(r), _) => r.to_owned(),
                (None, Some(signal)) if signal != 0 => format!("Signal:{signal}"),
                _ => format!(
                    "ExitCode:{}",
                    terminated
                        .get("exitCode")
                        .and_then(Value::as_i64)
                        .unwrap_or_default()
                ),
            };
        }
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if text(pod, "/status/reason") == Some("NodeLost") {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    reason
}

fn node_status(node: &Value) -> String {
    let ready = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| text(c, "/type") == Some("Ready")))
        .and_then(|c| text(c, "/status"));
    let mut status = match ready {
        Some("True") => "Ready".to_owned(),
        Some("False") => "NotReady".to_owned(),
        _ => "Unknown".to_owned(),
    };
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    status
}

fn age(timestamp: Option<&str>, now: jiff::Timestamp) -> Value {
    match timestamp.and_then(|t| t.parse::<jiff::Timestamp>().ok()) {
        Some(then) => json!(human_duration(now.as_second() - then.as_second())),
        None => json!("<unknown>"),
    }
}

/// Kubernetes' `duration.HumanDuration` (what AGE columns print), from whole seconds.
pub(crate) fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    let y = d / 365;
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        match s % 60 {
            0 => format!("{m}m"),
            rest => format!("{m}m{rest}s"),
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            rest => format!("{h}h{rest}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        match h % 24 {
            0 => format!("{d}d"),
            rest => format!("{d}d{rest}h"),
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        match d % 365 {
            0 => format!("{y}y"),
            rest => format!("{y}y{rest}d"),
        }
    } else {
        format!("{y}y")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        "2026-01-01T01:00:00Z".parse().unwrap()
    }

    #[test]
    fn human_durations_match_kubernetes() {
        let cases = [
            (-5, "<invalid>"),
            (0, "0s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 120, "3h2m"),
            (30 * 3600, "30h"),
            (3 * 86_400 + 3600, "3d1h"),
            (40 * 86_400, "40d"),
            (3 * 365 * 86_400, "3y"),
        ];
        for (seconds, printed) in cases {
            assert_eq!(human_duration(seconds), printed, "{seconds}s");
        }
    }

    #[test]
    fn migration_rows_print_printer_columns() {
        let store = crate::store::Store::new(crate::store::StoreLimits {
            history_per_type: 4,
            watch_channel_capacity: 4,
            graceful_pod_deletion: false,
        });
        let resource = ResourceType::new("automigrate.dev", "v1alpha1", "migrations");
        let api = crate::discovery::find(&store, &resource);
        let spec = TableSpec::for_resource(&resource, api.as_ref(), Include::Metadata);
        let migration = json!({
            "metadata": {"name": "m1", "namespace": "ml", "creationTimestamp": "2026-01-01T00:55:00Z"},
            "spec": {"pod": "train-0", "trigger": "Degradation"},
            "status": {"phase": "Restoring", "source": "n1"},
        });
        let table = spec.table([&migration], Some(7), now());
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["Name", "Phase", "Pod", "Source", "Target", "Trigger", "Age"]
        );
        assert_eq!(table["columnDefinitions"][5]["priority"], 1);
        assert_eq!(
            table["rows"][0]["cells"],
            json!([
                "m1",
                "Restoring",
                "train-0",
                "n1",
                null,
                "Degradation",
                "5m"
            ])
        );
        assert_eq!(table["rows"][0]["object"]["metadata"]["namespace"], "ml");
        assert_eq!(table["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn pod_and_node_columns() {
        let pods =
            TableSpec::for_resource(&ResourceType::new("", "v1", "pods"), None, Include::None);
        let pod = json!({
            "metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:59:00Z"},
            "spec": {"nodeName": "n1", "containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.2", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 1, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 2, "state": {"waiting": {"reason": "CrashLoopBackOff"}}},
            ]},
        });
        let table = pods.table([&pod], None, now());
        assert_eq!(
            table["rows"][0]["cells"],
            json!(["p", "1/2", "CrashLoopBackOff", "3", "60s", "10.0.0.2", "n1"])
        );
        assert!(table["rows"][0].get("object").is_none());
        let mut deleting = pod.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T01:00:00Z");
        assert_eq!(pod_status(&deleting), "Terminating");

        let nodes =
            TableSpec::for_resource(&ResourceType::new("", "v1", "nodes"), None, Include::Object);
        let node = json!({
            "metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"node-role.kubernetes.io/worker": ""}},
            "spec": {"unschedulable": true},
            "status": {"conditions": [{"type": "Ready", "status": "False"}],
                "nodeInfo": {"kubeletVersion": "v1.33.0"}},
        });
        let table = nodes.table([&node], None, now());
        assert_eq!(
            table["rows"][0]["cells"],
            json!([
                "n1",
                "NotReady,SchedulingDisabled",
                "worker",
                "60m",
                "v1.33.0"
            ])
        );
        assert_eq!(table["rows"][0]["object"]["spec"]["unschedulable"], true);
    }
}
