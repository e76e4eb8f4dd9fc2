//! What the fault suite reads from the API server: the Migration objects the controller writes
//! (phase, source, target, checkpoint, replacement pod, the phase history, the reason), and the
//! Events about the policy ConfigMap.
//!
//! A fault task looks at the Migrations every few milliseconds (a phase such as Restoring lasts
//! tens of milliseconds), too often for a `kubectl` process per look. [`ApiReader`] makes a plain
//! HTTP/1.0 GET through the cluster's host port forward (the local API server has no
//! authentication, and answers an HTTP/1.0 request with a plain body that ends with the
//! connection). It only reads.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use automigrate_core::migration::Phase;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Path of every Migration, all namespaces.
const MIGRATIONS: &str = "/apis/automigrate.dev/v1alpha1/migrations";
/// How long one read may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the API server through the host kubeconfig's address (see the module header).
#[derive(Debug, Clone)]
pub struct ApiReader {
    /// `host:port` of the API server as the host reaches it.
    address: String,
}

impl ApiReader {
    /// The reader of the API server named by a kubeconfig (`server: http://<host:port>`).
    pub fn from_kubeconfig(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        let address = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("server:"))
            .map(|server| server.trim().trim_matches('"').trim_matches('\''))
            .find_map(|server| server.strip_prefix("http://"))
            .map(|rest| rest.trim_end_matches('/').to_string())
            .ok_or_else(|| format!("{} names no http:// server", path.display()))?;
        Ok(Self { address })
    }

    /// GET `path`, parsed as JSON.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        let mut stream = TcpStream::connect(&self.address)
            .map_err(|error| format!("connecting to {}: {error}", self.address))?;
        stream
            .set_read_timeout(Some(TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
            .map_err(|error| error.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n\r\n",
            self.address
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|error| format!("GET {path}: {error}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .map_err(|error| format!("GET {path}: {error}"))?;
        let split = response
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .ok_or_else(|| format!("GET {path}: no end of headers"))?;
        let head = String::from_utf8_lossy(&response[..split]);
        let status = head
            .lines()
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .unwrap_or("?");
        let body = &response[split + 4..];
        if status != "200" {
            return Err(format!(
                "GET {path}: {status} {}",
                String::from_utf8_lossy(body)
                    .chars()
                    .take(300)
                    .collect::<String>()
            ));
        }
        serde_json::from_slice(body).map_err(|error| format!("GET {path}: {error}"))
    }

    /// Every Migration object (empty where the API cannot be read).
    pub fn migrations(&self) -> Vec<Value> {
        match self.get(MIGRATIONS) {
            Ok(list) => list["items"].as_array().cloned().unwrap_or_default(),
            Err(error) => {
                tracing::debug!(%error, "reading the Migrations");
                Vec::new()
            }
        }
    }

    /// The Migrations as a fault task sees them, oldest first.
    pub fn views(&self) -> Vec<MigrationView> {
        let mut views: Vec<MigrationView> = self.migrations().iter().filter_map(view).collect();
        views.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        views
    }

    /// Events of one namespace.
    pub fn events(&self, namespace: &str) -> Vec<Value> {
        self.get(&format!("/api/v1/namespaces/{namespace}/events"))
            .ok()
            .and_then(|list| list["items"].as_array().cloned())
            .unwrap_or_default()
    }
}

/// A Migration as a fault task sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationView {
    pub name: String,
    pub created: String,
    /// `None` until the controller has started it.
    pub phase: Option<Phase>,
    pub source: String,
    pub target: String,
    pub checkpoint_id: Option<String>,
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

fn phase_of(value: &Value) -> Option<Phase> {
    serde_json::from_value(value.clone()).ok()
}

/// The view of one Migration object.
pub fn view(object: &Value) -> Option<MigrationView> {
    Some(MigrationView {
        name: object["metadata"]["name"].as_str()?.to_string(),
        created: text(&object["metadata"]["creationTimestamp"]),
        phase: phase_of(&object["status"]["phase"]),
        source: text(&object["status"]["source"]),
        target: object["status"]["target"]
            .as_str()
            .or(object["spec"]["target"].as_str())
            .unwrap_or_default()
            .to_string(),
        checkpoint_id: object["status"]["checkpointId"]
            .as_str()
            .map(str::to_string),
    })
}

/// One phase of a migration as the controller recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseStep {
    pub phase: String,
    pub seconds: f64,
    /// When the phase began (Unix seconds), as the controller recorded it.
    #[serde(default)]
    pub started_at: Option<f64>,
}

/// One migration as the run ended with it, read from the API server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationOutcome {
    /// The Migration object's name.
    pub name: String,
    pub trigger: String,
    pub source: String,
    pub target: String,
    /// `None`: the controller never started it (no status).
    pub phase: Option<Phase>,
    pub message: Option<String>,
    /// The checkpoint the migration moved or restored.
    pub checkpoint: Option<String>,
    /// The replacement was started from the beginning (`Restarted`).
    pub fresh_start: bool,
    pub old_pod: String,
    pub replacement_pod: Option<String>,
    /// The phases in order, with how long each took.
    pub history: Vec<PhaseStep>,
    /// Downtime as the controller measured it.
    pub downtime_s: Option<f64>,
}

impl MigrationOutcome {
    pub fn is_terminal(&self) -> bool {
        self.phase.is_some_and(Phase::is_terminal)
    }

    pub fn phase_name(&self) -> String {
        self.phase
            .map_or_else(|| "NotStarted".to_string(), |phase| phase.to_string())
    }
}

fn seconds(value: &Value) -> Option<f64> {
    automigrate_core::units::parse_duration(value.as_str()?)
        .ok()
        .map(|duration| duration.as_secs_f64())
}

/// The outcome of one Migration object.
pub fn outcome(object: &Value) -> Option<MigrationOutcome> {
    let view = view(object)?;
    let status = &object["status"];
    let history = status["history"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|step| PhaseStep {
                    phase: text(&step["phase"]),
                    seconds: seconds(&step["duration"]).unwrap_or(0.0),
                    started_at: step["startedAt"]
                        .as_str()
                        .and_then(|at| at.parse::<jiff::Timestamp>().ok())
                        .map(|at| at.as_millisecond() as f64 / 1000.0),
                })
                .collect()
        })
        .unwrap_or_default();
    Some(MigrationOutcome {
        name: view.name,
        trigger: object["spec"]["trigger"]
            .as_str()
            .or(object["spec"]["origin"].as_str())
            .unwrap_or_default()
            .to_string(),
        source: view.source,
        target: view.target,
        phase: view.phase,
        message: status["message"].as_str().map(str::to_string),
        checkpoint: view.checkpoint_id.or_else(|| {
            status["storedCheckpoint"]["id"]
                .as_str()
                .map(str::to_string)
        }),
        fresh_start: view.phase == Some(Phase::Restarted),
        old_pod: text(&object["spec"]["pod"]),
        replacement_pod: status["replacementPod"].as_str().map(str::to_string),
        history,
        downtime_s: seconds(&status["downtime"]),
    })
}

/// Every Migration's outcome, oldest first.
pub fn outcomes(objects: &[Value]) -> Vec<MigrationOutcome> {
    let mut sorted: Vec<&Value> = objects.iter().collect();
    sorted.sort_by_key(|object| text(&object["metadata"]["creationTimestamp"]));
    sorted.into_iter().filter_map(outcome).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_migration_object_reads_as_its_outcome() {
        let object = json!({
            "metadata": {"name": "trainer-x1", "creationTimestamp": "2026-12-06T15:00:00Z"},
            "spec": {"pod": "trainer", "origin": "automatic", "trigger": "NodeFailed"},
            "status": {
                "phase": "Succeeded", "source": "node-a", "target": "node-b",
                "checkpointId": "c-7", "replacementPod": "trainer-m1",
                "message": "moved", "downtime": "4s 500ms",
                "history": [{"phase": "Pending", "startedAt": "2026-12-06T15:00:00Z", "duration": "1s"},
                            {"phase": "Fencing", "startedAt": "2026-12-06T15:00:01Z", "duration": "250ms"}],
            },
        });
        let outcome = outcome(&object).unwrap();
        assert_eq!(outcome.phase, Some(Phase::Succeeded));
        assert_eq!(outcome.trigger, "NodeFailed");
        assert_eq!(outcome.checkpoint.as_deref(), Some("c-7"));
        assert_eq!(outcome.replacement_pod.as_deref(), Some("trainer-m1"));
        assert_eq!(outcome.history.len(), 2);
        assert!((outcome.history[1].seconds - 0.25).abs() < 1e-9);
        assert_eq!(outcome.downtime_s, Some(4.5));
        assert!(outcome.is_terminal() && !outcome.fresh_start);
        let unstarted = json!({"metadata": {"name": "m"}, "spec": {"pod": "trainer"}});
        assert_eq!(
            super::outcome(&unstarted).unwrap().phase_name(),
            "NotStarted"
        );
    }

    #[test]
    fn the_server_address_comes_from_the_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nclusters:\n- cluster:\n    server: http://127.0.0.1:4321\n  name: local\n",
        )
        .unwrap();
        let reader = ApiReader::from_kubeconfig(&path).unwrap();
        assert_eq!(reader.address, "127.0.0.1:4321");
    }
}
