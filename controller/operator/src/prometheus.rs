//! PromQL signals: the queries the valid policies name under `signals`
//! (`linkLatencyQuery`, `userLatencyQuery`), run as instant queries against `--prometheus-url`
//! every `--probe-interval` by the probe loop, their results recorded in the
//! [`LinkBook`] and [`UserBook`] with the poll's time.
//!
//! The result contract (documented in `automigrate_core::policy::Signals`): an instant vector,
//! values in seconds; link series carry labels `from` and `to` (node names), user series `user`
//! and `node`. A series without those labels, or with a value that is not a finite number of
//! seconds ≥ 0, is skipped and counted. A query that fails (Prometheus unreachable, a PromQL
//! error, a result that is not a vector) changes nothing: earlier observations stay until they
//! expire. The same query named by several policies runs once.
//!
//! HTTP: the `prometheus-http-query` client over a reqwest client built here. reqwest is
//! compiled with `rustls-no-provider`, so building it needs a process-wide rustls provider; the
//! binary installs ring at start-up, and [`PromSignals::new`] installs ring itself if nothing
//! is installed yet (tests, other embedders) instead of letting reqwest panic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use automigrate_core::model::{LinkObservation, UserObservation};
use automigrate_core::policy::PolicySet;
use jiff::Timestamp;
use prometheus_http_query::response::{Data, InstantVector};

use crate::probes::{LinkBook, Source, UserBook};

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("--prometheus-url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("building the HTTP client: {0}")]
    Client(String),
    #[error("query {query:?} failed: {reason}")]
    Query { query: String, reason: String },
    #[error("query {query:?} returned a {kind}, not an instant vector")]
    NotAVector { query: String, kind: &'static str },
}

impl PromError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Url { .. } => "url",
            Self::Client(_) => "client",
            Self::Query { .. } => "query",
            Self::NotAVector { .. } => "not_a_vector",
        }
    }
}

/// The distinct queries of a policy set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queries {
    pub links: BTreeSet<String>,
    pub users: BTreeSet<String>,
}

impl Queries {
    pub fn of(policies: &PolicySet) -> Self {
        let mut queries = Self::default();
        for policy in policies.names().filter_map(|name| policies.get(name)) {
            if let Some(query) = &policy.signals.link_latency_query {
                queries.links.insert(query.clone());
            }
            if let Some(query) = &policy.signals.user_latency_query {
                queries.users.insert(query.clone());
            }
        }
        queries
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty() && self.users.is_empty()
    }
}

/// What one refresh did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refreshed {
    pub links: usize,
    pub users: usize,
    /// Series without the expected labels or with an unusable value.
    pub skipped: usize,
    pub failed_queries: usize,
}

/// Runs the policies' PromQL queries.
#[derive(Clone)]
pub struct PromSignals {
    client: prometheus_http_query::Client,
    /// The last failure of each query, so a standing failure is logged once.
    failures: std::sync::Arc<Mutex<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for PromSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromSignals")
            .field("url", &self.client.base_url().as_str())
            .finish_non_exhaustive()
    }
}

fn install_ring_if_no_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is then installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

impl PromSignals {
    /// A client for the Prometheus HTTP API at `url` (e.g. `http://prometheus-operated.monitoring:9090`);
    /// every query gives up after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, PromError> {
        let bad_url = |reason: String| PromError::Url {
            url: url.to_string(),
            reason,
        };
        install_ring_if_no_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|error| PromError::Client(error.to_string()))?;
        let client = prometheus_http_query::Client::from(http, url)
            .map_err(|error| bad_url(error.to_string()))?;
        let scheme = client.base_url().scheme();
        if scheme != "http" && scheme != "https" {
            return Err(bad_url(format!(
                "scheme {scheme:?}; expected http or https"
            )));
        }
        Ok(Self {
            client,
            failures: Default::default(),
        })
    }

    async fn vector(&self, query: &str) -> Result<Vec<InstantVector>, PromError> {
        // GET: the policy caps a query at 4 KiB, so it fits a URL, and GET is what read-only
        // proxies in front of Prometheus allow most often.
        let result = self
            .client
            .query(query)
            .get()
            .await
            .map_err(|error| PromError::Query {
                query: query.to_string(),
                reason: error.to_string(),
            })?;
        match result.into_inner().0 {
            Data::Vector(vector) => Ok(vector),
            Data::Matrix(_) => Err(PromError::NotAVector {
                query: query.to_string(),
                kind: "range vector",
            }),
            Data::Scalar(_) => Err(PromError::NotAVector {
                query: query.to_string(),
                kind: "scalar",
            }),
        }
    }

    /// Logs a query's failure when it differs from the last one seen, and clears it on success.
    fn note(&self, query: &str, outcome: Result<(), &PromError>) {
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        match outcome {
            Ok(()) => {
                if failures.remove(query).is_some() {
                    tracing::info!(query, "PromQL query works again");
                }
            }
            Err(error) => {
                let reason = error.to_string();
                if failures.get(query) != Some(&reason) {
                    tracing::warn!(%error, "PromQL signal query failed; keeping earlier observations until they expire");
                    failures.insert(query.to_string(), reason);
                }
                crate::metrics::error("prometheus", error.metric_label());
            }
        }
        crate::metrics::signal_query(Source::Prometheus, outcome.is_ok());
    }

    /// Runs every query of `policies` once and records the results at `now`.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn refresh(
        &self,
        policies: &PolicySet,
        links: &LinkBook,
        users: &UserBook,
        now: Timestamp,
    ) -> Refreshed {
        let queries = Queries::of(policies);
        let mut refreshed = Refreshed::default();
        for query in &queries.links {
            match self.vector(query).await {
                Ok(vector) => {
                    self.note(query, Ok(()));
                    let (found, skipped) = links_from(&vector);
                    refreshed.skipped += skipped;
                    refreshed.links += links.record(Source::Prometheus, found, now);
                }
                Err(error) => {
                    self.note(query, Err(&error));
                    refreshed.failed_queries += 1;
                }
            }
        }
        for query in &queries.users {
            match self.vector(query).await {
                Ok(vector) => {
                    self.note(query, Ok(()));
                    let (found, skipped) = users_from(&vector);
                    refreshed.skipped += skipped;
                    refreshed.users += users.record(Source::Prometheus, found, now);
                }
                Err(error) => {
                    self.note(query, Err(&error));
                    refreshed.failed_queries += 1;
                }
            }
        }
        if refreshed.skipped > 0 {
            tracing::debug!(
                skipped = refreshed.skipped,
                "PromQL series without the expected labels or with unusable values"
            );
        }
        refreshed
    }
}

/// Seconds as a duration: finite and not negative (NaN and ±Inf are what PromQL gives for a
/// division by zero or an empty histogram).
fn seconds(value: f64) -> Option<Duration> {
    (value.is_finite() && value >= 0.0)
        .then(|| Duration::try_from_secs_f64(value).ok())
        .flatten()
}

fn labelled<'a>(
    series: &'a InstantVector,
    first: &str,
    second: &str,
) -> Option<(&'a str, &'a str)> {
    let labels = series.metric();
    let first = labels.get(first).filter(|value| !value.is_empty())?;
    let second = labels.get(second).filter(|value| !value.is_empty())?;
    Some((first, second))
}

/// Link observations from a link query's vector, and how many series were skipped.
pub fn links_from(vector: &[InstantVector]) -> (Vec<LinkObservation>, usize) {
    let mut skipped = 0;
    let links = vector
        .iter()
        .filter_map(|series| {
            let found = labelled(series, "from", "to").and_then(|(from, to)| {
                Some(LinkObservation {
                    from: from.to_string(),
                    to: to.to_string(),
                    rtt: seconds(series.sample().value())?,
                    bandwidth: None,
                    loss: 0.0,
                    answering: None,
                })
            });
            skipped += usize::from(found.is_none());
            found
        })
        .collect();
    (links, skipped)
}

/// User observations from a user query's vector, and how many series were skipped.
pub fn users_from(vector: &[InstantVector]) -> (Vec<UserObservation>, usize) {
    let mut skipped = 0;
    let users = vector
        .iter()
        .filter_map(|series| {
            let found = labelled(series, "user", "node").and_then(|(user, node)| {
                Some(UserObservation {
                    user: user.to_string(),
                    node: node.to_string(),
                    latency: seconds(series.sample().value())?,
                })
            });
            skipped += usize::from(found.is_none());
            found
        })
        .collect();
    (users, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(json: &str) -> Vec<InstantVector> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn series_become_observations_and_bad_ones_are_skipped() {
        let series = vector(
            r#"[
                {"metric": {"from": "a", "to": "b", "job": "x"}, "value": [1700000000.5, "0.012"]},
                {"metric": {"from": "a"}, "value": [1700000000.5, "0.5"]},
                {"metric": {"from": "a", "to": "c"}, "value": [1700000000.5, "NaN"]},
                {"metric": {"from": "a", "to": "d"}, "value": [1700000000.5, "-1"]},
                {"metric": {"from": "a", "to": "e"}, "value": [1700000000.5, "+Inf"]}
            ]"#,
        );
        let (links, skipped) = links_from(&series);
        assert_eq!(skipped, 4);
        assert_eq!(links.len(), 1);
        assert_eq!((links[0].from.as_str(), links[0].to.as_str()), ("a", "b"));
        assert_eq!(links[0].rtt, Duration::from_millis(12));

        let series = vector(
            r#"[{"metric": {"user": "alice", "node": "b"}, "value": [1, "0.08"]},
                {"metric": {"user": "", "node": "b"}, "value": [1, "0.08"]}]"#,
        );
        let (users, skipped) = users_from(&series);
        assert_eq!(skipped, 1);
        assert_eq!(users[0].latency, Duration::from_millis(80));
    }

    #[test]
    fn queries_are_collected_once_from_every_valid_policy() {
        let mut policies = PolicySet::new();
        policies
            .apply(
                "a",
                "signals: {linkLatencyQuery: 'q1', userLatencyQuery: 'u'}",
            )
            .unwrap();
        policies
            .apply("b", "signals: {linkLatencyQuery: 'q1'}")
            .unwrap();
        policies
            .apply("c", "signals: {linkLatencyQuery: 'q2'}")
            .unwrap();
        assert!(
            policies
                .apply("c", "signals: {linkLatencyQuery: 'q3('}")
                .is_err()
        );
        let queries = Queries::of(&policies);
        assert_eq!(
            queries.links.iter().map(String::as_str).collect::<Vec<_>>(),
            ["q1", "q2"],
            "the rejected edit of c is not run; its last valid query is"
        );
        assert_eq!(queries.users.len(), 1);
    }

    #[test]
    fn urls_are_checked() {
        assert!(PromSignals::new("http://127.0.0.1:9090", Duration::from_secs(1)).is_ok());
        let error = PromSignals::new("not a url", Duration::from_secs(1)).unwrap_err();
        assert_eq!(error.metric_label(), "url");
        let error = PromSignals::new("ftp://host/", Duration::from_secs(1)).unwrap_err();
        assert!(
            error.to_string().contains("expected http or https"),
            "{error}"
        );
    }
}
