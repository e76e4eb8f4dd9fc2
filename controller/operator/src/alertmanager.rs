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
//! Requests must carry `Authorization: Bearer <token>`; the token is compared in constant time
//! (its length is not secret). Bodies over [`MAX_BODY_BYTES`] get 413; malformed ones get 400
//! with the reason in the body.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automigrate_core::model::{Alert, AlertStatus};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use jiff::Timestamp;
use serde::Deserialize;
use tokio::sync::Notify;

use crate::clock::Clock;

/// Path the receiver listens on.
pub const PATH: &str = "/v1/alerts";
/// Largest accepted body. Alertmanager groups are small; 1 MiB holds thousands of alerts.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most alerts accepted in one payload.
pub const MAX_ALERTS: usize = 10_000;

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
}

/// Decodes an Alertmanager webhook body (payload version 4). Every alert must be named and have
/// a known status; the fields Alertmanager sends that the engine does not use are ignored.
pub fn decode(body: &[u8]) -> Result<Vec<Alert>, DecodeError> {
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
            Ok(Alert {
                name,
                status,
                labels: wire.labels,
                starts_at,
            })
        })
        .collect()
}

/// The firing alerts the receiver has heard of, keyed by name and labels.
#[derive(Debug, Clone)]
pub struct AlertBook {
    alerts: Arc<Mutex<BTreeMap<String, (Alert, Timestamp)>>>,
    ttl: Duration,
}

impl AlertBook {
    pub fn new(ttl: Duration) -> Self {
        Self {
            alerts: Arc::default(),
            ttl,
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

    /// Records what Alertmanager said: firing alerts are kept, resolved ones dropped.
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

    /// The alerts firing at `now`, dropping those not repeated within the time to live.
    pub fn firing(&self, now: Timestamp) -> Vec<Alert> {
        let Ok(mut book) = self.alerts.lock() else {
            return Vec::new();
        };
        let ttl = self.ttl;
        book.retain(|_, (_, received)| automigrate_core::units::age(now, *received) < ttl);
        book.values().map(|(alert, _)| alert.clone()).collect()
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
    match decode(&body) {
        Ok(alerts) => {
            let count = alerts.len();
            tracing::info!(alerts = count, "alertmanager payload accepted");
            receiver.book.record(alerts, receiver.clock.now());
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
