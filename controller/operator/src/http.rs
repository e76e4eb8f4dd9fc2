//! The controller's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process
//! serves), `/readyz` (every reflector holds its initial list and every watch task runs), and
//! the Alertmanager webhook when a token is configured.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::alertmanager::{self, Receiver};
use crate::stores::WatchHealth;

/// Readiness: the stores have synced, and every watch task still runs.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    watches: Option<WatchHealth>,
}

impl Readiness {
    /// Ready once synced and while every watch of `watches` runs.
    pub fn following(watches: WatchHealth) -> Self {
        Self {
            ready: Arc::default(),
            watches: Some(watches),
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.why_not().is_none()
    }

    /// Why this replica is not ready, `None` when it is.
    pub fn why_not(&self) -> Option<String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Some("stores not synced yet".into());
        }
        let down = self.watches.as_ref().map(WatchHealth::down)?;
        (!down.is_empty()).then(|| format!("watch not running: {}", down.join(", ")))
    }
}

pub fn router(
    metrics: Option<PrometheusHandle>,
    readiness: Readiness,
    webhook: Option<Receiver>,
) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let why_not = readiness.why_not();
                async move {
                    match why_not {
                        None => (StatusCode::OK, "ready\n".to_string()),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        );
    if let Some(handle) = metrics {
        router = router.route("/metrics", get(move || async move { handle.render() }));
    }
    if let Some(receiver) = webhook {
        router = router.merge(alertmanager::router(receiver));
    }
    router
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get_status(router: &Router, path: &str) -> StatusCode {
        router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn readyz_follows_readiness_and_webhook_is_optional() {
        let readiness = Readiness::default();
        let router = router(None, readiness.clone(), None);
        assert_eq!(get_status(&router, "/healthz").await, StatusCode::OK);
        assert_eq!(
            get_status(&router, "/readyz").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        readiness.set_ready();
        assert_eq!(get_status(&router, "/readyz").await, StatusCode::OK);
        let post = router
            .clone()
            .oneshot(
                Request::post(alertmanager::PATH)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(post.status(), StatusCode::NOT_FOUND, "no token, no webhook");
    }
}
