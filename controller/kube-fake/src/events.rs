//! One Event storage, two API versions: `events.k8s.io/v1` Events read back as core `v1`.
//!
//! A real API server keeps a single Event resource and serves it as both `v1` and
//! `events.k8s.io/v1`. This server stores the two paths separately, so the Events the
//! controller writes through kube's recorder (`events.k8s.io/v1`) would be invisible to
//! `kubectl describe`, which lists core `v1` Events by `involvedObject`. A core Event list
//! therefore also returns every `events.k8s.io/v1` Event, converted as the real server converts
//! it (`regarding` is `involvedObject`, `note` is `message`, the `deprecated*` fields are the
//! core fields, `reportingController` names the source). Lists only: a core Event watch does
//! not see them (kubectl describe does not watch).

use serde_json::{Map, Value, json};

use crate::path::ResourceType;

/// Whether `resource` is the core `v1` Event resource.
pub(crate) fn is_core_events(resource: &ResourceType) -> bool {
    resource.group.is_empty() && resource.version == "v1" && resource.plural == "events"
}

/// The `events.k8s.io/v1` Event resource.
pub(crate) fn events_v1() -> ResourceType {
    ResourceType::new("events.k8s.io", "v1", "events")
}

/// An `events.k8s.io/v1` Event as a core `v1` Event.
pub(crate) fn to_core(event: &Value) -> Value {
    let mut core = Map::new();
    core.insert("apiVersion".into(), json!("v1"));
    core.insert("kind".into(), json!("Event"));
    let renamed = [
        ("metadata", "metadata"),
        ("regarding", "involvedObject"),
        ("related", "related"),
        ("reason", "reason"),
        ("note", "message"),
        ("type", "type"),
        ("action", "action"),
        ("eventTime", "eventTime"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("reportingController", "reportingComponent"),
        ("reportingInstance", "reportingInstance"),
    ];
    for (from, to) in renamed {
        if let Some(value) = event.get(from).filter(|v| !v.is_null()) {
            core.insert(to.into(), value.clone());
        }
    }
    let component = event
        .pointer("/deprecatedSource/component")
        .or_else(|| event.get("reportingController"))
        .cloned();
    let host = event.pointer("/deprecatedSource/host").cloned();
    let mut source = Map::new();
    if let Some(component) = component {
        source.insert("component".into(), component);
    }
    if let Some(host) = host {
        source.insert("host".into(), host);
    }
    if !source.is_empty() {
        core.insert("source".into(), Value::Object(source));
    }
    if let Some(series) = event.get("series").filter(|s| s.is_object()) {
        core.insert(
            "series".into(),
            json!({
                "count": series.get("count").cloned().unwrap_or(Value::Null),
                "lastObservedTime": series.get("lastObservedTime").cloned().unwrap_or(Value::Null),
            }),
        );
        if !core.contains_key("count")
            && let Some(count) = series.get("count")
        {
            core.insert("count".into(), count.clone());
        }
    }
    Value::Object(core)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_the_recorder_fields() {
        let event = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": "m1.abc", "namespace": "default"},
            "regarding": {"kind": "Migration", "name": "m1", "namespace": "default", "uid": "u1"},
            "reason": "Checkpointed",
            "note": "checkpoint 3 on node-a",
            "type": "Normal",
            "action": "Checkpoint",
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "reportingController": "automigrate-controller",
            "reportingInstance": "controller-0",
            "series": {"count": 4, "lastObservedTime": "2026-01-01T00:01:00.000000Z"},
        });
        let core = to_core(&event);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "m1");
        assert_eq!(core["message"], "checkpoint 3 on node-a");
        assert_eq!(core["source"]["component"], "automigrate-controller");
        assert_eq!(core["reportingComponent"], "automigrate-controller");
        assert_eq!(core["count"], 4);
        assert_eq!(
            core["series"]["lastObservedTime"],
            "2026-01-01T00:01:00.000000Z"
        );
        assert!(core.get("note").is_none() && core.get("regarding").is_none());
    }
}
