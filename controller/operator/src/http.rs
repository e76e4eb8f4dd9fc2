//! The controller's HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process
//! serves), `/readyz` (every reflector holds its initial list), and the Alertmanager webhook
//! when a token is configured.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::alertmanager::{self, Receiver};

/// Readiness, set once the stores are synced.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
}

impl Readiness {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
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
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "stores not synced yet\n")
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
