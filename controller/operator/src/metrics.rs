//! Metric names and the Prometheus recorder. Every metric the controller exports is named here,
//! so `/metrics` and the PrometheusRule in `deploy/` agree on one list.
//!
//! - `automigrate_migrations_total{result,reason}`: migrations that ended, by final phase and
//!   trigger.
//! - `automigrate_migration_phase_seconds{phase}`: how long each phase took (histogram).
//! - `automigrate_migration_downtime_seconds`: time the workload made no progress (histogram).
//! - `automigrate_bytes_moved_total{payload}`: bytes sent between agents for migrations and
//!   checkpoint replication.
//! - `automigrate_checkpoint_age_seconds{namespace,pod}`: age of each protected pod's newest
//!   checkpoint at the last decision pass. A pod that is gone is no longer set, and its series
//!   is dropped once no pass has set it for [`gauge_idle_timeout`] (gauges are dropped when
//!   idle; every other gauge is set at least once per pass or election round).
//! - `automigrate_checkpoints_total{result}`: periodic checkpoints asked of agents.
//! - `automigrate_decision_pass_seconds`: latency of one decision pass (histogram).
//! - `automigrate_errors_total{component,kind}`: failures by where and what (each error enum's
//!   `metric_label`).
//! - `automigrate_webhook_requests_total{result}`: Alertmanager webhook answers.
//! - `automigrate_policy_rejections_total{policy}`: invalid policy edits kept out.
//! - `automigrate_migrations_failed`: Migrations that ended `Failed` after they began to act
//!   and have not been deleted (what a person must look at; set every decision pass).
//! - `automigrate_leader`: 1 while this replica holds the leader Lease, 0 on every other replica
//!   (set every election round).
//! - `automigrate_signal_queries_total{source,result}`: latency reads, `source` `agent` (one
//!   agent's `GET /v1/peers`) or `prometheus` (one PromQL query), `result` `ok` or `error`.

use std::time::Duration;

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

pub const MIGRATIONS: &str = "automigrate_migrations_total";
pub const PHASE_SECONDS: &str = "automigrate_migration_phase_seconds";
pub const DOWNTIME_SECONDS: &str = "automigrate_migration_downtime_seconds";
pub const BYTES_MOVED: &str = "automigrate_bytes_moved_total";
pub const CHECKPOINT_AGE: &str = "automigrate_checkpoint_age_seconds";
pub const CHECKPOINTS: &str = "automigrate_checkpoints_total";
pub const DECISION_SECONDS: &str = "automigrate_decision_pass_seconds";
pub const ERRORS: &str = "automigrate_errors_total";
pub const WEBHOOK_REQUESTS: &str = "automigrate_webhook_requests_total";
pub const POLICY_REJECTIONS: &str = "automigrate_policy_rejections_total";
pub const PODS_WITHOUT_TARGET: &str = "automigrate_pods_without_target";
pub const CHECKPOINTS_POSTPONED: &str = "automigrate_checkpoints_postponed";
pub const LEADER: &str = "automigrate_leader";
pub const FAILED_MIGRATIONS: &str = "automigrate_migrations_failed";
pub const SIGNAL_QUERIES: &str = "automigrate_signal_queries_total";

/// Shortest time a gauge may go unset before its series is dropped.
pub const GAUGE_IDLE_MIN: Duration = Duration::from_secs(300);

/// How long a gauge may go unset before its series is dropped: ten decision passes, at least
/// [`GAUGE_IDLE_MIN`]. Long enough that a live pod's series never lapses between passes.
pub fn gauge_idle_timeout(decision_interval: Duration) -> Duration {
    decision_interval.saturating_mul(10).max(GAUGE_IDLE_MIN)
}

/// [`install_with`] the idle timeout of the default decision interval.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    install_with(gauge_idle_timeout(Duration::from_secs(10)))
}

/// Installs the global Prometheus recorder with histogram buckets suited to each metric, and
/// returns the handle `/metrics` renders. A gauge unset for `gauge_idle` is dropped from the
/// output (so the checkpoint age of a deleted pod does not stay frozen, firing its alert for
/// ever); counters and histograms are kept.
pub fn install_with(gauge_idle: Duration) -> Result<PrometheusHandle, BuildError> {
    let phase_buckets = [
        0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    ];
    let decision_buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let recorder = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::GAUGE, Some(gauge_idle))
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PHASE_SECONDS.into()),
            &phase_buckets,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(DOWNTIME_SECONDS.into()),
            &phase_buckets,
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(DECISION_SECONDS.into()),
            &decision_buckets,
        )?
        .install_recorder()?;
    describe();
    Ok(recorder)
}

fn describe() {
    metrics::describe_counter!(
        MIGRATIONS,
        "Migrations that ended, by final phase and trigger"
    );
    metrics::describe_histogram!(
        PHASE_SECONDS,
        metrics::Unit::Seconds,
        "Duration of each migration phase"
    );
    metrics::describe_histogram!(
        DOWNTIME_SECONDS,
        metrics::Unit::Seconds,
        "Time a migrated workload made no progress"
    );
    metrics::describe_counter!(
        BYTES_MOVED,
        metrics::Unit::Bytes,
        "Bytes sent between agents"
    );
    metrics::describe_gauge!(
        CHECKPOINT_AGE,
        metrics::Unit::Seconds,
        "Age of each protected pod's newest checkpoint"
    );
    metrics::describe_counter!(
        CHECKPOINTS,
        "Periodic checkpoints asked of agents, by result"
    );
    metrics::describe_histogram!(
        DECISION_SECONDS,
        metrics::Unit::Seconds,
        "Latency of one decision pass"
    );
    metrics::describe_counter!(ERRORS, "Failures by component and kind");
    metrics::describe_counter!(WEBHOOK_REQUESTS, "Alertmanager webhook requests by result");
    metrics::describe_counter!(POLICY_REJECTIONS, "Policy edits rejected as invalid");
    metrics::describe_gauge!(
        PODS_WITHOUT_TARGET,
        "Protected pods that should move but no node can take (last decision pass)"
    );
    metrics::describe_gauge!(
        FAILED_MIGRATIONS,
        "Migrations that ended Failed after they began and are not deleted yet (a person must look)"
    );
    metrics::describe_gauge!(
        CHECKPOINTS_POSTPONED,
        "Due periodic checkpoints held back by checkpoint.maxConcurrentPerNode (last decision pass)"
    );
    metrics::describe_gauge!(LEADER, "1 while this replica is the leader");
    metrics::describe_counter!(
        SIGNAL_QUERIES,
        "Latency reads from agents and Prometheus, by source and result"
    );
}

/// Counts one failure of `component` of kind `kind` (an error's `metric_label`).
pub fn error(component: &'static str, kind: &'static str) {
    metrics::counter!(ERRORS, "component" => component, "kind" => kind).increment(1);
}

/// Counts one latency read from `source`.
pub fn signal_query(source: crate::probes::Source, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!(SIGNAL_QUERIES, "source" => source.label(), "result" => result).increment(1);
}
