//! The controller process, minus what only a binary does (flags, logging, signals): leader
//! election, the controller, the HTTP endpoints, and an orderly stop. The
//! `automigrate-controller` binary calls [`run`]; tests call it with the in-process API server.
//!
//! Stopping: when `shutdown` turns true (the binary sets it on SIGTERM or SIGINT), the loops
//! stop, the HTTP server drains, and the leader Lease is released so another replica takes over
//! at once. When leadership is lost after it was held, [`run`] stops the same way and reports
//! it, so the process exits non-zero and restarts as a follower: a replica that may no longer
//! lead must not keep acting on what it last saw.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::NodeAgent;
use crate::alertmanager::Receiver;
use crate::clock::Clock;
use crate::controller::{Config, Controller};
use crate::http::{self, Readiness};
use crate::leader::{LeaderElector, Leadership};
use crate::stores::Stores;

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub lease: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub retry_period: Duration,
}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` was signalled.
    Requested,
    /// This replica led and then lost the Lease.
    LostLeadership,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

impl RunError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Serve(_) => "serve",
        }
    }
}

/// Runs the controller until `shutdown` turns true or leadership is lost.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    listener: TcpListener,
    election: Option<Election>,
    config: Config,
    agent: impl FnOnce(&Stores) -> Arc<dyn NodeAgent>,
    webhook_token: Option<String>,
    metrics: Option<PrometheusHandle>,
    clock: Arc<dyn Clock>,
    shutdown: watch::Receiver<bool>,
) -> Result<Stopped, RunError> {
    // The controller's own stop signal: set by the caller's `shutdown` or by lost leadership.
    let (stop_sender, stop) = watch::channel(false);
    let (leadership, elector) = match election {
        Some(election) => {
            let elector = LeaderElector::new(
                client.clone(),
                &election.namespace,
                &election.lease,
                &election.identity,
                election.lease_duration,
                clock.clone(),
            );
            let (leadership, task) = elector.spawn(election.retry_period, stop.clone());
            (leadership, Some(task))
        }
        None => {
            tracing::warn!("leader election is off: run exactly one replica");
            metrics::gauge!(crate::metrics::LEADER).set(1.0);
            (Leadership::always(), None)
        }
    };
    let controller = Controller::start(client, agent, leadership.clone(), clock.clone(), config);

    let readiness = Readiness::following(controller.stores.watches.clone());
    {
        let stores = controller.stores.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            if stores.ready().await.is_ok() {
                tracing::info!("stores synced");
                readiness.set_ready();
            }
        });
    }
    let webhook = match webhook_token {
        Some(token) => Some(Receiver {
            token: Arc::from(token),
            book: controller.alerts.clone(),
            clock: clock.clone(),
            wake: controller.wake.clone(),
        }),
        None => {
            tracing::warn!("no webhook token: the Alertmanager webhook is off");
            None
        }
    };
    let router = http::router(metrics, readiness, webhook);
    let mut server_stop = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|stopped| *stopped).await;
            })
            .await
    });

    let lost = {
        let sender = stop_sender.clone();
        let mut watching = leadership.clone();
        let mut requested = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = requested.wait_for(|stop| *stop) => {
                    let _ = sender.send(true);
                    Stopped::Requested
                }
                lost = async {
                    if watching.acquired().await {
                        tracing::info!("leading");
                        watching.lost().await;
                        true
                    } else {
                        false
                    }
                } => {
                    let stopped = if lost && !*sender.borrow() {
                        tracing::error!("leadership lost; stopping");
                        Stopped::LostLeadership
                    } else {
                        Stopped::Requested
                    };
                    let _ = sender.send(true);
                    stopped
                }
            }
        })
    };

    controller.run(leadership, stop).await;
    let stopped = lost.await.unwrap_or(Stopped::Requested);
    let served = server.await;
    if let Some(elector) = elector
        && tokio::time::timeout(Duration::from_secs(5), elector)
            .await
            .is_err()
    {
        tracing::warn!("the leader Lease was not released within 5 s");
    }
    match served {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(RunError::Serve(error)),
        Err(error) => tracing::error!(%error, "HTTP server task failed"),
    }
    tracing::info!(?stopped, "stopped");
    Ok(stopped)
}
