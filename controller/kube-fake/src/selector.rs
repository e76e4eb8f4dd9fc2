//! Label and field selectors, parsed from the `labelSelector` / `fieldSelector` query values.
//!
//! Owns [`LabelSelector`] (the set-based grammar: `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
//! `k notin (a,b)`, `k`, `!k`) and [`FieldSelector`] (`field=v`, `field==v`, `field!=v`, terms
//! joined by commas). Field selectors accept only the fields the real API server indexes for the
//! resource (metadata.name and metadata.namespace everywhere, plus per-type fields such as
//! `spec.nodeName` on pods); any other field is a BadRequest there, so it is one here too, and
//! controller code cannot rely on a selector a real cluster would refuse.

use serde_json::Value;

use crate::error::ApiError;
use crate::path::ResourceType;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<LabelRequirement>,
}

impl LabelSelector {
    /// Parses a `labelSelector` query value.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut requirements = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            requirements.push(parse_label_term(term)?);
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether an object (its `metadata.labels`) satisfies every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        if self.requirements.is_empty() {
            return true;
        }
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.requirements.iter().all(|req| match req {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelRequirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "unable to parse requirement: invalid label selector term {term:?}"
        ))
    };
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(LabelRequirement::NotExists(key.to_owned()))
        } else {
            Err(bad())
        };
    }
    if let Some(open) = term.find('(') {
        let close = term.rfind(')').ok_or_else(bad)?;
        if close != term.len() - 1 || close < open {
            return Err(bad());
        }
        let head: Vec<&str> = term[..open].split_whitespace().collect();
        let values: Vec<String> = term[open + 1..close]
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        return match head.as_slice() {
            [key, "in"] if valid_key(key) => Ok(LabelRequirement::In((*key).to_owned(), values)),
            [key, "notin"] if valid_key(key) => {
                Ok(LabelRequirement::NotIn((*key).to_owned(), values))
            }
            _ => Err(bad()),
        };
    }
    let (key, value, negate) = if let Some((k, v)) = term.split_once("!=") {
        (k, v, true)
    } else if let Some((k, v)) = term.split_once("==") {
        (k, v, false)
    } else if let Some((k, v)) = term.split_once('=') {
        (k, v, false)
    } else {
        let key = term.trim();
        return if valid_key(key) {
            Ok(LabelRequirement::Exists(key.to_owned()))
        } else {
            Err(bad())
        };
    };
    let (key, value) = (key.trim(), value.trim());
    if !valid_key(key) || value.contains([' ', '=', '!', '(', ')']) {
        return Err(bad());
    }
    Ok(if negate {
        LabelRequirement::NotEquals(key.to_owned(), value.to_owned())
    } else {
        LabelRequirement::Equals(key.to_owned(), value.to_owned())
    })
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// A parsed field selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    /// (field, value, negated)
    terms: Vec<(String, String, bool)>,
}

impl FieldSelector {
    /// Parses a `fieldSelector` query value, refusing fields the resource does not index.
    pub fn parse(text: &str, resource: &ResourceType) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in text.split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid selector: '{text}'; can't understand '{term}'"
                )));
            };
            let field = field.trim();
            if !field_supported(resource, field) {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {field} (resource {resource})"
                )));
            }
            terms.push((field.to_owned(), value.trim().to_owned(), negated));
        }
        Ok(FieldSelector { terms })
    }

    /// Whether an object satisfies every term.
    pub fn matches(&self, object: &Value) -> bool {
        self.terms.iter().all(|(field, value, negated)| {
            let equal = match field_value(object, field) {
                FieldValue::Str(actual) => actual == value,
                FieldValue::Other(actual) => actual == *value,
            };
            equal != *negated
        })
    }
}

fn field_supported(resource: &ResourceType, field: &str) -> bool {
    if matches!(field, "metadata.name" | "metadata.namespace") {
        return true;
    }
    let extra: &[&str] = match (resource.group.as_str(), resource.plural.as_str()) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "namespaces") => &["status.phase"],
        ("", "secrets") => &["type"],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
        ("batch", "jobs") => &["status.successful"],
        _ => &[],
    };
    extra.contains(&field)
}

/// A field's value as the API server compares it: strings borrowed (the common case, so a
/// selector over 50,000 pods allocates nothing), other scalars rendered.
enum FieldValue<'a> {
    Str(&'a str),
    Other(String),
}

/// The value of a dotted field path, `""` when absent.
fn field_value<'a>(object: &'a Value, field: &str) -> FieldValue<'a> {
    // core/v1 Event's `source` selector means the reporting component.
    let path = if field == "source" {
        "source.component"
    } else {
        field
    };
    let mut current = object;
    for part in path.split('.') {
        match current.get(part) {
            Some(next) => current = next,
            None => return FieldValue::Str(""),
        }
    }
    match current {
        Value::String(s) => FieldValue::Str(s),
        Value::Null => FieldValue::Str(""),
        Value::Bool(b) => FieldValue::Other(b.to_string()),
        Value::Number(n) => FieldValue::Other(n.to_string()),
        other => FieldValue::Other(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labeled(labels: Value) -> Value {
        json!({"metadata": {"labels": labels}})
    }

    #[test]
    fn label_selector_grammar() {
        let obj = labeled(json!({"app": "train", "tier": "gpu", "automigrate.dev/policy": "true"}));
        let yes = [
            "app=train",
            "app==train",
            "app!=web",
            "tier in (gpu, cpu)",
            "tier notin (cpu)",
            "app",
            "!missing",
            "automigrate.dev/policy=true,app in (train)",
            "",
        ];
        let no = [
            "app=web",
            "app!=train",
            "tier in (cpu)",
            "tier notin (gpu,cpu)",
            "missing",
            "!app",
        ];
        for s in yes {
            assert!(
                LabelSelector::parse(s).unwrap().matches(&obj),
                "{s} should match"
            );
        }
        for s in no {
            assert!(
                !LabelSelector::parse(s).unwrap().matches(&obj),
                "{s} should not match"
            );
        }
        assert!(LabelSelector::parse("missing!=x").unwrap().matches(&obj));
        assert!(
            !LabelSelector::parse("missing in (x)")
                .unwrap()
                .matches(&obj)
        );
        assert!(
            LabelSelector::parse("missing notin (x)")
                .unwrap()
                .matches(&obj)
        );
        assert!(LabelSelector::parse("a in b").is_err());
        assert!(LabelSelector::parse("a=b c").is_err());
    }

    #[test]
    fn field_selector_supported_fields_only() {
        let pods = ResourceType::new("", "v1", "pods");
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        assert!(
            FieldSelector::parse("spec.nodeName=n1", &pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            !FieldSelector::parse("spec.nodeName!=n1", &pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            FieldSelector::parse("metadata.name=p,metadata.namespace==ns", &pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(
            FieldSelector::parse("status.phase=", &pods)
                .unwrap()
                .matches(&pod)
        );
        assert!(FieldSelector::parse("spec.containers=x", &pods).is_err());
        let cms = ResourceType::new("", "v1", "configmaps");
        assert!(FieldSelector::parse("spec.nodeName=n1", &cms).is_err());
        let nodes = ResourceType::new("", "v1", "nodes");
        let node = json!({"metadata": {"name": "n"}, "spec": {"unschedulable": true}});
        assert!(
            FieldSelector::parse("spec.unschedulable=true", &nodes)
                .unwrap()
                .matches(&node)
        );
    }
}
