//! The Alertmanager webhook receiver: Alertmanager's standard webhook payload (version 4) in,
//! [`Alert`]s for the decision engine out.
//!
//! [`decode`] is a pure function from the request body to alerts (it is fuzzed). The labels
//! `node`, `pod` and `namespace` say what an alert is about; the engine turns a firing alert
//! whose name a policy lists in `triggers.alerts` into a proactive migration of that node's pods
//! or of that pod. The receiver keeps firing alerts in an [`AlertBook`] until Alertmanager
//! reports them resolved, or until they have not been repeated for the book's time to live
//! (Alertmanager repeats firing alerts every `repeat_interval`; a lost "resolved" message must
//! not pin a node as degraded forever).
//!
//! Two replicas sit behind one Service, and Alertmanager posts to whichever it reaches, so a
//! received alert must not live only in the memory of the replica that got it. The book is
//! shared through the API ([`AlertBook::shared`]): the receiving replica, leader or not, writes
//! each alert into the ConfigMap [`ALERTS_CONFIG_MAP`] in the controller's namespace before it
//! answers 200 (a failed write answers 503, so Alertmanager retries), keyed by a stable
//! fingerprint of its name and labels, with its labels, `startsAt`, `endsAt` and when it was
//! received; a resolved alert's entry is removed, and entries past the time to live are pruned,
//! oldest first beyond [`MAX_PERSISTED`] entries or [`MAX_PERSISTED_BYTES`]. Every replica
//! follows the ConfigMap with a reflector; the leader's decision pass reads the book from it
//! (and is woken by each change), so an alert posted to the standby is acted on, and firing
//! alerts survive a restart or a failover. The write is a direct, idempotent merge patch, not
//! a [`Writer`](crate::writer::Writer) write, which refuses everything from a standby.
//!
//! Requests must carry `Authorization: Bearer <token>`; the token is compared in constant time
//! (its length is not secret). Bodies over [`MAX_BODY_BYTES`] get 413; malformed ones get 400
//! with the reason in the body.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use automigrate_core::model::{Alert, AlertStatus};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use backon::{ExponentialBuilder, Retryable};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::clock::Clock;

/// Path the receiver listens on.
pub const PATH: &str = "/v1/alerts";
/// Largest accepted body. Alertmanager groups are small; 1 MiB holds thousands of alerts.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most alerts accepted in one payload.
pub const MAX_ALERTS: usize = 10_000;
/// The ConfigMap, in the controller's namespace, that holds the alerts any replica received.
pub const ALERTS_CONFIG_MAP: &str = "automigrate-alerts";
/// Most alerts kept in [`ALERTS_CONFIG_MAP`]; beyond it the oldest received are dropped.
pub const MAX_PERSISTED: usize = 2_000;
/// Most bytes of alert entries kept in [`ALERTS_CONFIG_MAP`] (a ConfigMap holds at most 1 MiB).
pub const MAX_PERSISTED_BYTES: usize = 768 * 1024;
/// Writes of this replica that its reflector has not shown yet, kept to overlay the store.
const MAX_PENDING: usize = 64;

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a webhook payload: {0}")]
    Json(String),
    #[error("unsupported payload version {0:?}: only version \"4\" is understood")]
    Version(String),
    #[error("{count} alerts in one payload; at most {MAX_ALERTS} are accepted")]
    TooManyAlerts { count: usize },
    #[error("alerts[{index}]: label `alertname` is missing or empty")]
    MissingAlertName { index: usize },
    #[error("alerts[{index}]: status {status:?} is neither \"firing\" nor \"resolved\"")]
    Status { index: usize, status: String },
    #[error("alerts[{index}]: startsAt {value:?} is not an RFC 3339 time")]
    StartsAt { index: usize, value: String },
    #[error("alerts[{index}]: label `pod` without `namespace`: the pod cannot be identified")]
    PodWithoutNamespace { index: usize },
}

impl DecodeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Json(_) => "json",
            Self::Version(_) => "version",
            Self::TooManyAlerts { .. } => "too_many_alerts",
            Self::MissingAlertName { .. } => "missing_alertname",
            Self::Status { .. } => "status",
            Self::StartsAt { .. } => "starts_at",
            Self::PodWithoutNamespace { .. } => "pod_without_namespace",
        }
    }
}

#[derive(Deserialize)]
struct Payload {
    version: String,
    alerts: Vec<WireAlert>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAlert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    starts_at: Option<String>,
    #[serde(default)]
    ends_at: Option<String>,
}

/// Decodes an Alertmanager webhook body (payload version 4). Every alert must be named and have
/// a known status; the fields Alertmanager sends that the engine does not use are ignored.
pub fn decode(body: &[u8]) -> Result<Vec<Alert>, DecodeError> {
    Ok(decode_with_end(body)?
        .into_iter()
        .map(|(alert, _)| alert)
        .collect())
}

/// [`decode`], with each alert's `endsAt` when it names a real time (Alertmanager sends the
/// zero time `0001-01-01T00:00:00Z` for "not ended"; an unreadable one is ignored, being
/// information only).
fn decode_with_end(body: &[u8]) -> Result<Vec<(Alert, Option<Timestamp>)>, DecodeError> {
    let payload: Payload =
        serde_json::from_slice(body).map_err(|error| DecodeError::Json(error.to_string()))?;
    if payload.version != "4" {
        return Err(DecodeError::Version(payload.version));
    }
    if payload.alerts.len() > MAX_ALERTS {
        return Err(DecodeError::TooManyAlerts {
            count: payload.alerts.len(),
        });
    }
    payload
        .alerts
        .into_iter()
        .enumerate()
        .map(|(index, wire)| {
            let name = wire
                .labels
                .get("alertname")
                .filter(|name| !name.is_empty())
                .cloned()
                .ok_or(DecodeError::MissingAlertName { index })?;
            let status = match wire.status.as_str() {
                "firing" => AlertStatus::Firing,
                "resolved" => AlertStatus::Resolved,
                _ => {
                    return Err(DecodeError::Status {
                        index,
                        status: wire.status,
                    });
                }
            };
            if wire.labels.contains_key("pod") && !wire.labels.contains_key("namespace") {
                return Err(DecodeError::PodWithoutNamespace { index });
            }
            let starts_at = match wire.starts_at {
                Some(value) => Some(
                    value
                        .parse::<Timestamp>()
                        .map_err(|_| DecodeError::StartsAt { index, value })?,
                ),
                None => None,
            };
            let ends_at = wire
                .ends_at
                .and_then(|value| value.parse::<Timestamp>().ok())
                .filter(|end| end.as_second() > 0);
            Ok((
                Alert {
                    name,
                    status,
                    labels: wire.labels,
                    starts_at,
                },
                ends_at,
            ))
        })
        .collect()
}

/// Why a received alert could not be stored in the API.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("writing ConfigMap {ALERTS_CONFIG_MAP} failed: {0}")]
    Api(#[from] kube::Error),
    #[error("encoding an alert failed: {0}")]
    Encode(#[from] serde_json::Error),
}

impl PersistError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Api(kube::Error::Api(status)) if status.code == 403 => "forbidden",
            Self::Api(kube::Error::Api(_)) => "api",
            Self::Api(_) => "transport",
            Self::Encode(_) => "encode",
        }
    }
}

/// One alert as kept in [`ALERTS_CONFIG_MAP`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    name: String,
    labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    starts_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ends_at: Option<Timestamp>,
    received_at: Timestamp,
}

impl Stored {
    fn alert(&self) -> Alert {
        Alert {
            name: self.name.clone(),
            status: AlertStatus::Firing,
            labels: self.labels.clone(),
            starts_at: self.starts_at,
        }
    }
}

/// A write of this replica and the resourceVersion the API answered it with.
#[derive(Debug)]
struct Pending {
    version: u64,
    changes: BTreeMap<String, Option<Stored>>,
}

/// The book's place in the API: the ConfigMap and this replica's reflector of it.
#[derive(Debug)]
struct Shared {
    api: Api<ConfigMap>,
    store: Store<ConfigMap>,
    /// Writes the store does not show yet (a pass right after a POST sees them).
    pending: Mutex<Vec<Pending>>,
}

/// The firing alerts, keyed by name and labels: in the API when [`AlertBook::shared`] (what
/// the controller runs), else in this process only.
#[derive(Debug, Clone)]
pub struct AlertBook {
    alerts: Arc<Mutex<BTreeMap<String, (Alert, Timestamp)>>>,
    shared: Option<Arc<Shared>>,
    ttl: Duration,
}

/// A stable name for an alert (its name and labels): 64-bit FNV-1a in hex, a valid ConfigMap
/// key that is the same on every replica and every version of the controller.
pub fn fingerprint(alert: &Alert) -> String {
    format!(
        "{:016x}",
        crate::writer::stable_hash(&AlertBook::key(alert))
    )
}

fn version_of(map: &ConfigMap) -> u64 {
    map.metadata
        .resource_version
        .as_deref()
        .and_then(|version| version.parse().ok())
        .unwrap_or(0)
}

fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        _ => true,
    }
}

impl AlertBook {
    /// A book in this process's memory only (tests, single-process tools).
    pub fn new(ttl: Duration) -> Self {
        Self {
            alerts: Arc::default(),
            shared: None,
            ttl,
        }
    }

    /// A book kept in [`ALERTS_CONFIG_MAP`] through `api` (its namespace), read from `store`,
    /// a reflector of that ConfigMap.
    pub fn shared(ttl: Duration, api: Api<ConfigMap>, store: Store<ConfigMap>) -> Self {
        Self {
            alerts: Arc::default(),
            shared: Some(Arc::new(Shared {
                api,
                store,
                pending: Mutex::default(),
            })),
            ttl,
        }
    }

    /// Waits until the shared book's reflector holds its initial list (at once for a book in
    /// memory).
    pub async fn ready(&self) -> bool {
        match &self.shared {
            Some(shared) => shared.store.wait_until_ready().await.is_ok(),
            None => true,
        }
    }

    fn key(alert: &Alert) -> String {
        let mut key = alert.name.clone();
        for (label, value) in &alert.labels {
            key.push('\u{1f}');
            key.push_str(label);
            key.push('=');
            key.push_str(value);
        }
        key
    }

    /// Records what Alertmanager said in this process only: firing alerts are kept, resolved
    /// ones dropped. The webhook uses [`AlertBook::receive`], which shares them.
    pub fn record(&self, alerts: Vec<Alert>, received_at: Timestamp) {
        let Ok(mut book) = self.alerts.lock() else {
            return;
        };
        for alert in alerts {
            let key = Self::key(&alert);
            match alert.status {
                AlertStatus::Firing => {
                    book.insert(key, (alert, received_at));
                }
                AlertStatus::Resolved => {
                    book.remove(&key);
                }
            }
        }
    }

    /// What the shared book holds: the ConfigMap as the reflector shows it, with this
    /// replica's writes it does not show yet laid over it. Pending writes it shows are dropped.
    fn shared_view(&self, shared: &Shared) -> BTreeMap<String, Stored> {
        let map = shared
            .store
            .get(&ObjectRef::new(ALERTS_CONFIG_MAP).within(&shared.api_namespace()));
        let shown = map.as_deref().map_or(0, version_of);
        let mut view: BTreeMap<String, Stored> = map
            .as_deref()
            .and_then(|map| map.data.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|(key, text)| Some((key.clone(), serde_json::from_str(text).ok()?)))
            .collect();
        let mut pending = shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending.retain(|write| write.version > shown);
        for write in pending.iter() {
            for (key, change) in &write.changes {
                match change {
                    Some(stored) => view.insert(key.clone(), stored.clone()),
                    None => view.remove(key),
                };
            }
        }
        view
    }

    /// The alerts firing at `now`, dropping those not repeated within the time to live.
    pub fn firing(&self, now: Timestamp) -> Vec<Alert> {
        let ttl = self.ttl;
        let fresh = |received: Timestamp| automigrate_core::units::age(now, received) < ttl;
        let mut firing: BTreeMap<String, Alert> = BTreeMap::new();
        if let Some(shared) = &self.shared {
            for stored in self.shared_view(shared).into_values() {
                if fresh(stored.received_at) {
                    let alert = stored.alert();
                    firing.insert(Self::key(&alert), alert);
                }
            }
        }
        if let Ok(mut book) = self.alerts.lock() {
            book.retain(|_, (_, received)| fresh(*received));
            for (key, (alert, _)) in book.iter() {
                firing.entry(key.clone()).or_insert_with(|| alert.clone());
            }
        }
        firing.into_values().collect()
    }

    /// Records a webhook payload received at `now`. A shared book writes it to the API first
    /// (resolved alerts removed, stale and excess entries pruned) and fails if it cannot, so
    /// the webhook can answer with an error and Alertmanager send it again.
    pub async fn receive(
        &self,
        alerts: Vec<(Alert, Option<Timestamp>)>,
        now: Timestamp,
    ) -> Result<(), PersistError> {
        let Some(shared) = &self.shared else {
            self.record(alerts.into_iter().map(|(alert, _)| alert).collect(), now);
            return Ok(());
        };
        let mut changes: BTreeMap<String, Option<Stored>> = BTreeMap::new();
        for (alert, ends_at) in alerts {
            let key = fingerprint(&alert);
            let stored = (alert.status == AlertStatus::Firing).then_some(Stored {
                name: alert.name,
                labels: alert.labels,
                starts_at: alert.starts_at,
                ends_at,
                received_at: now,
            });
            changes.insert(key, stored);
        }
        let mut view = self.shared_view(shared);
        for (key, change) in &changes {
            match change {
                Some(stored) => view.insert(key.clone(), stored.clone()),
                None => view.remove(key),
            };
        }
        // Prune: stale entries, then the oldest received beyond the count and size limits.
        let mut by_age: Vec<(&String, &Stored, usize)> = Vec::with_capacity(view.len());
        for (key, stored) in &view {
            let size = key.len() + serde_json::to_string(stored)?.len();
            by_age.push((key, stored, size));
        }
        by_age.sort_by(|a, b| b.1.received_at.cmp(&a.1.received_at).then(a.0.cmp(b.0)));
        let (mut kept, mut bytes) = (0usize, 0usize);
        let mut dropped = Vec::new();
        for (key, stored, size) in by_age {
            let stale = automigrate_core::units::age(now, stored.received_at) >= self.ttl;
            if stale || kept >= MAX_PERSISTED || bytes + size > MAX_PERSISTED_BYTES {
                dropped.push(key.clone());
            } else {
                kept += 1;
                bytes += size;
            }
        }
        for key in dropped {
            changes.insert(key, None);
        }
        let written = self.write(shared, &changes).await?;
        let mut pending = shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= MAX_PENDING {
            pending.remove(0);
        }
        pending.push(Pending {
            version: version_of(&written),
            changes,
        });
        Ok(())
    }

    /// A merge patch of the changed keys (`null` removes one), creating the ConfigMap when it
    /// does not exist yet; transient errors are retried with backoff. Idempotent: the same
    /// payload written twice leaves the same ConfigMap.
    async fn write(
        &self,
        shared: &Shared,
        changes: &BTreeMap<String, Option<Stored>>,
    ) -> Result<ConfigMap, PersistError> {
        let mut data = serde_json::Map::new();
        for (key, change) in changes {
            let value = match change {
                Some(stored) => serde_json::Value::String(serde_json::to_string(stored)?),
                None => serde_json::Value::Null,
            };
            data.insert(key.clone(), value);
        }
        let patch = serde_json::json!({ "data": data });
        let created = ConfigMap {
            metadata: ObjectMeta {
                name: Some(ALERTS_CONFIG_MAP.into()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    crate::writer::FIELD_MANAGER.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(
                changes
                    .iter()
                    .filter_map(|(key, change)| {
                        Some((key.clone(), serde_json::to_string(change.as_ref()?).ok()?))
                    })
                    .collect(),
            ),
            ..ConfigMap::default()
        };
        let params = PatchParams {
            field_manager: Some(crate::writer::FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let post = PostParams {
            field_manager: Some(crate::writer::FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let once = || async {
            match shared
                .api
                .patch(ALERTS_CONFIG_MAP, &params, &Patch::Merge(&patch))
                .await
            {
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    match shared.api.create(&post, &created).await {
                        // Another replica created it meanwhile: patch that one.
                        Err(kube::Error::Api(status)) if status.code == 409 => {
                            shared
                                .api
                                .patch(ALERTS_CONFIG_MAP, &params, &Patch::Merge(&patch))
                                .await
                        }
                        other => other,
                    }
                }
                other => other,
            }
        };
        let written = once
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(3),
            )
            .when(is_transient)
            .await?;
        Ok(written)
    }
}

impl Shared {
    fn api_namespace(&self) -> String {
        self.api.namespace().unwrap_or_default().to_string()
    }
}

/// What the receiver needs to answer a request.
#[derive(Debug, Clone)]
pub struct Receiver {
    pub token: Arc<str>,
    pub book: AlertBook,
    pub clock: Arc<dyn Clock>,
    /// Woken after every accepted payload, so a decision pass runs without waiting its period.
    pub wake: Arc<Notify>,
}

/// The receiver's routes, with the body size limit applied.
pub fn router(receiver: Receiver) -> Router {
    Router::new()
        .route(PATH, post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(receiver)
}

/// Equal length and equal bytes, in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()))
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&headers, &receiver.token) {
        metrics::counter!(crate::metrics::WEBHOOK_REQUESTS, "result" => "unauthorized")
            .increment(1);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response();
    }
    match decode_with_end(&body) {
        Ok(alerts) => {
            let count = alerts.len();
            if let Err(error) = receiver.book.receive(alerts, receiver.clock.now()).await {
                tracing::error!(%error, "alertmanager payload not stored; answering 503 so it is sent again");
                crate::metrics::error("webhook", error.metric_label());
                metrics::counter!(crate::metrics::WEBHOOK_REQUESTS, "result" => "not_stored")
                    .increment(1);
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("alerts not stored: {error}\n"),
                )
                    .into_response();
            }
            tracing::info!(alerts = count, "alertmanager payload accepted");
            receiver.wake.notify_one();
            metrics::counter!(crate::metrics::WEBHOOK_REQUESTS, "result" => "accepted")
                .increment(1);
            (
                StatusCode::OK,
                Json(serde_json::json!({ "accepted": count })),
            )
                .into_response()
        }
        Err(error) => {
            tracing::warn!(%error, "alertmanager payload rejected");
            metrics::counter!(crate::metrics::WEBHOOK_REQUESTS, "result" => error.metric_label())
                .increment(1);
            (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    const SAMPLE: &str = r#"{
      "version": "4",
      "groupKey": "{}:{alertname=\"NodeDiskFailing\"}",
      "truncatedAlerts": 0,
      "status": "firing",
      "receiver": "automigrate",
      "groupLabels": {"alertname": "NodeDiskFailing"},
      "commonLabels": {"alertname": "NodeDiskFailing"},
      "commonAnnotations": {},
      "externalURL": "http://alertmanager:9093",
      "alerts": [
        {"status": "firing", "labels": {"alertname": "NodeDiskFailing", "node": "edge-2"},
         "annotations": {"summary": "disk"}, "startsAt": "2026-11-22T10:00:00Z",
         "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom", "fingerprint": "abc"},
        {"status": "resolved", "labels": {"alertname": "TrainerStalled", "namespace": "ml", "pod": "t-0"},
         "startsAt": "2026-11-22T09:00:00Z", "endsAt": "2026-11-22T09:30:00Z"}
      ]
    }"#;

    #[test]
    fn decodes_the_standard_payload() {
        let alerts = decode(SAMPLE.as_bytes()).unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0].name, "NodeDiskFailing");
        assert_eq!(alerts[0].status, AlertStatus::Firing);
        assert_eq!(alerts[0].labels["node"], "edge-2");
        assert_eq!(
            alerts[0].starts_at,
            Some("2026-11-22T10:00:00Z".parse().unwrap())
        );
        assert_eq!(alerts[1].status, AlertStatus::Resolved);
        assert_eq!(alerts[1].labels["pod"], "t-0");
    }

    #[test]
    fn refuses_bad_payloads_with_a_reason() {
        let cases: [(&str, &str); 6] = [
            ("not json", "json"),
            (r#"{"version":"3","alerts":[]}"#, "version"),
            (
                r#"{"version":"4","alerts":[{"status":"firing","labels":{}}]}"#,
                "missing_alertname",
            ),
            (
                r#"{"version":"4","alerts":[{"status":"pending","labels":{"alertname":"A"}}]}"#,
                "status",
            ),
            (
                r#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":"A"},"startsAt":"yesterday"}]}"#,
                "starts_at",
            ),
            (
                r#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":"A","pod":"p"}}]}"#,
                "pod_without_namespace",
            ),
        ];
        for (body, label) in cases {
            let error = decode(body.as_bytes()).unwrap_err();
            assert_eq!(error.metric_label(), label, "{body}: {error}");
        }
    }

    #[test]
    fn book_keeps_firing_until_resolved_or_stale() {
        let book = AlertBook::new(Duration::from_secs(600));
        let t0: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        let mut alerts = decode(SAMPLE.as_bytes()).unwrap();
        book.record(alerts.clone(), t0);
        assert_eq!(book.firing(t0).len(), 1, "the resolved alert is not kept");
        alerts[0].status = AlertStatus::Resolved;
        book.record(vec![alerts[0].clone()], t0);
        assert!(book.firing(t0).is_empty());
        alerts[0].status = AlertStatus::Firing;
        book.record(vec![alerts[0].clone()], t0);
        let later = automigrate_core::units::after(t0, Duration::from_secs(600));
        assert!(book.firing(later).is_empty(), "not repeated: dropped");
    }

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }

    proptest::proptest! {
        /// Any bytes: an answer, never a panic.
        #[test]
        fn decode_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode(&body);
        }

        /// Whatever alerts Alertmanager sends, their names, statuses and labels come through.
        #[test]
        fn alerts_round_trip(
            alerts in proptest::collection::vec(
                ("[A-Za-z]{1,12}", proptest::prelude::any::<bool>(), proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,12}", 0..4)),
                0..8,
            )
        ) {
            let wire: Vec<serde_json::Value> = alerts.iter().map(|(name, firing, labels)| {
                let mut labels = labels.clone();
                labels.remove("pod");
                labels.insert("alertname".into(), name.clone());
                serde_json::json!({"status": if *firing { "firing" } else { "resolved" }, "labels": labels})
            }).collect();
            let body = serde_json::json!({"version": "4", "alerts": wire}).to_string();
            let decoded = decode(body.as_bytes()).unwrap();
            proptest::prop_assert_eq!(decoded.len(), alerts.len());
            for (alert, (name, firing, _)) in decoded.iter().zip(&alerts) {
                proptest::prop_assert_eq!(&alert.name, name);
                proptest::prop_assert_eq!(alert.status == AlertStatus::Firing, *firing);
                proptest::prop_assert_eq!(&alert.labels["alertname"], name);
            }
        }
    }

    fn receiver() -> Receiver {
        Receiver {
            token: Arc::from("s3cret"),
            book: AlertBook::new(Duration::from_secs(3600)),
            clock: Arc::new(ManualClock::new("2026-11-22T10:00:00Z".parse().unwrap())),
            wake: Arc::new(Notify::new()),
        }
    }

    async fn post(receiver: &Receiver, token: Option<&str>, body: Vec<u8>) -> (StatusCode, String) {
        let mut request = Request::post(PATH);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = router(receiver.clone())
            .oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn http_answers_per_token_and_payload() {
        let receiver = receiver();
        let (status, _) = post(&receiver, None, SAMPLE.into()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = post(&receiver, Some("wrong!"), SAMPLE.into()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(receiver.book.firing(receiver.clock.now()).is_empty());

        let (status, body) = post(&receiver, Some("s3cret"), b"{}".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("not a webhook payload"), "{body}");

        let (status, body) = post(&receiver, Some("s3cret"), SAMPLE.into()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(receiver.book.firing(receiver.clock.now()).len(), 1);

        let (status, _) = post(&receiver, Some("s3cret"), vec![b' '; MAX_BODY_BYTES + 1]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
