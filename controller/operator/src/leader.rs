//! Leader election with a `coordination.k8s.io/v1` Lease, so only one controller replica acts.
//!
//! The protocol is the one client-go uses: a replica holds the Lease while it renews
//! `spec.renewTime` more often than `spec.leaseDurationSeconds`; another replica takes it over
//! only once `renewTime + leaseDuration` has passed. Every write is a replace with the
//! `resourceVersion` just read, so two replicas racing for an expired Lease cannot both win (the
//! loser gets 409 Conflict). A leader that cannot renew within its lease duration steps down
//! ([`Leadership`] turns false) before any other replica may take over, and the writer refuses
//! every write from then on. Transient API errors are retried with backoff (backon) inside one
//! round. On graceful shutdown the leader releases the Lease so a successor need not wait.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

use crate::clock::Clock;

/// Whether this replica is the leader now. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership {
    receiver: watch::Receiver<bool>,
}

impl Leadership {
    /// Always the leader (single-replica runs and tests).
    pub fn always() -> Self {
        let (_sender, receiver) = watch::channel(true);
        Self { receiver }
    }

    pub fn from_receiver(receiver: watch::Receiver<bool>) -> Self {
        Self { receiver }
    }

    pub fn is_leader(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Waits until this replica leads; `false` if the election ended first.
    pub async fn acquired(&mut self) -> bool {
        self.receiver.wait_for(|leader| *leader).await.is_ok()
    }

    /// Waits until this replica stops leading. A closed election whose last word was "leader"
    /// ([`Leadership::always`]) never ends.
    pub async fn lost(&mut self) {
        if self.receiver.wait_for(|leader| !*leader).await.is_err() && *self.receiver.borrow() {
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease API request failed: {0}")]
    Api(#[from] kube::Error),
}

impl LeaderError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Api(kube::Error::Api(_)) => "api",
            Self::Api(_) => "transport",
        }
    }
}

/// One candidate for the Lease `namespace/name`.
#[derive(Debug, Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    clock: Arc<dyn Clock>,
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        _ => true,
    }
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        lease_duration: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration,
            clock,
        }
    }

    fn held_by_other(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) else {
            return false;
        };
        if holder == self.identity {
            return false;
        }
        let duration = spec
            .lease_duration_seconds
            .map_or(self.lease_duration, |seconds| {
                Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
            });
        match &spec.renew_time {
            Some(renewed) => automigrate_core::units::age(now, renewed.0) < duration,
            None => false,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let was_mine = previous
            .and_then(|spec| spec.holder_identity.as_deref())
            .is_some_and(|holder| holder == self.identity);
        let transitions = previous
            .and_then(|spec| spec.lease_transitions)
            .unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if was_mine {
                previous.and_then(|spec| spec.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if was_mine || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// One round: take the Lease if it is free or expired, renew it if ours. `Ok(true)` means
    /// this replica holds it now.
    #[tracing::instrument(level = "debug", skip(self), fields(lease = %self.name, identity = %self.identity))]
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let round = || async {
            let now = self.clock.now();
            match self.api.get_opt(&self.name).await? {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(self.spec(None, now)),
                    };
                    match self.api.create(&PostParams::default(), &lease).await {
                        Ok(_) => Ok(true),
                        Err(error) if is_conflict(&error) => Ok(false),
                        Err(error) => Err(error),
                    }
                }
                Some(mut lease) => {
                    let previous = lease.spec.clone().unwrap_or_default();
                    if self.held_by_other(&previous, now) {
                        return Ok(false);
                    }
                    lease.spec = Some(self.spec(Some(&previous), now));
                    match self
                        .api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await
                    {
                        Ok(_) => Ok(true),
                        Err(error) if is_conflict(&error) => Ok(false),
                        Err(error) => Err(error),
                    }
                }
            }
        };
        let held = round
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(1))
                    .with_max_times(3),
            )
            .when(is_transient)
            .await?;
        Ok(held)
    }

    /// Gives the Lease up if this replica holds it, so a successor can take over at once.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let mine = lease
            .spec
            .as_ref()
            .and_then(|spec| spec.holder_identity.as_deref())
            == Some(self.identity.as_str());
        if !mine {
            return Ok(());
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.acquire_time = None;
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if is_conflict(&error) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Runs the election until `shutdown` turns true: a round every `retry_period`; the
    /// returned [`Leadership`] follows the outcome. A leader whose renewals fail for longer
    /// than the lease duration steps down. The task ends after releasing the Lease.
    pub fn spawn(
        self,
        retry_period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut last_renewed: Option<Timestamp> = None;
            loop {
                let leading = match self.try_acquire_or_renew().await {
                    Ok(true) => {
                        last_renewed = Some(self.clock.now());
                        true
                    }
                    Ok(false) => false,
                    Err(error) => {
                        tracing::warn!(%error, "leader election round failed");
                        crate::metrics::error("leader", error.metric_label());
                        // Keep leading only while the last renewal is still within the lease.
                        last_renewed.is_some_and(|renewed| {
                            automigrate_core::units::age(self.clock.now(), renewed)
                                < self.lease_duration
                        })
                    }
                };
                // Every round, on every replica: a standby exports 0, and the series never
                // goes idle.
                metrics::gauge!(crate::metrics::LEADER).set(if leading { 1.0 } else { 0.0 });
                if *sender.borrow() != leading {
                    tracing::info!(leading, identity = %self.identity, "leadership changed");
                    let _ = sender.send(leading);
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry_period) => {}
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
            let _ = sender.send(false);
            metrics::gauge!(crate::metrics::LEADER).set(0.0);
            if let Err(error) = self.release().await {
                tracing::warn!(%error, "could not release the leader lease");
            }
        });
        (Leadership::from_receiver(receiver), task)
    }
}
