//! The agent's Prometheus metrics: names, help texts, and the recorder they are kept in.
//!
//! Each [`AgentMetrics`] owns its own `PrometheusRecorder` instead of installing a global one,
//! so several agents in one process (tests, the embedded mode) keep separate numbers. Values are
//! recorded through the `metrics::Recorder` trait on that recorder and rendered by `/metrics`.
//!
//! Names (all prefixed `automigrate_agent_`) are listed in [`names`]; the README of the crate
//! repeats them for dashboards.

use std::sync::Arc;
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Metric names.
pub mod names {
    pub const CHECKPOINTS: &str = "automigrate_agent_checkpoints_total";
    pub const CHECKPOINT_FREEZE: &str = "automigrate_agent_checkpoint_freeze_seconds";
    pub const CHECKPOINT_DURATION: &str = "automigrate_agent_checkpoint_duration_seconds";
    pub const CHECKPOINT_BYTES: &str = "automigrate_agent_checkpoint_bytes_total";
    pub const STORE_BYTES: &str = "automigrate_agent_store_bytes";
    pub const STORE_CHECKPOINTS: &str = "automigrate_agent_store_checkpoints";
    pub const TRANSFERS: &str = "automigrate_agent_transfers_total";
    pub const TRANSFERS_ACTIVE: &str = "automigrate_agent_transfers_active";
    pub const TRANSFER_BYTES: &str = "automigrate_agent_transfer_bytes_total";
    pub const TRANSFER_RATE: &str = "automigrate_agent_transfer_rate_bits_per_second";
    pub const TRANSFER_STREAMS: &str = "automigrate_agent_transfer_streams";
    pub const RECEIVED_BYTES: &str = "automigrate_agent_received_bytes_total";
    pub const RECEIVED_CHECKPOINTS: &str = "automigrate_agent_received_checkpoints_total";
    pub const TLS_REJECTED: &str = "automigrate_agent_transfer_tls_rejected_total";
    pub const IMAGES: &str = "automigrate_agent_images_total";
    pub const PEER_RTT: &str = "automigrate_agent_peer_rtt_seconds";
    pub const PEER_LOSS: &str = "automigrate_agent_peer_loss_ratio";
    pub const PROBES: &str = "automigrate_agent_probes_total";
    /// Self-fencing events by `event` (fencing, fenced, stop_failed, stop_overdue, restored, would_fence).
    pub const SELF_FENCE_EVENTS: &str = "automigrate_agent_self_fence_events_total";
}

/// Buckets for freeze and checkpoint duration: 1 ms to 5 min.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn bucketed() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let mut builder = PrometheusBuilder::new();
    for name in [names::CHECKPOINT_FREEZE, names::CHECKPOINT_DURATION] {
        builder =
            builder.set_buckets_for_metric(Matcher::Full(name.to_string()), SECONDS_BUCKETS)?;
    }
    Ok(builder)
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// One agent's metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let builder = bucketed().unwrap_or_else(|error| {
            tracing::warn!(%error, "histogram buckets refused; exporting summaries");
            PrometheusBuilder::new()
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let metrics = Self {
            recorder: Arc::new(recorder),
            handle,
        };
        metrics.describe();
        metrics
    }

    fn describe(&self) {
        use names::*;
        let counters: &[(&str, Option<Unit>, &str)] = &[
            (
                CHECKPOINTS,
                None,
                "Checkpoints taken, by backend, kind and result.",
            ),
            (
                CHECKPOINT_BYTES,
                Some(Unit::Bytes),
                "Bytes of sealed checkpoints taken here.",
            ),
            (TRANSFERS, None, "Transfers sent, by payload and result."),
            (
                TRANSFER_BYTES,
                Some(Unit::Bytes),
                "Bytes the peers acknowledged of transfers sent (what a peer already held counts when a transfer starts).",
            ),
            (
                RECEIVED_BYTES,
                Some(Unit::Bytes),
                "Bytes written by the transfer receiver.",
            ),
            (
                RECEIVED_CHECKPOINTS,
                None,
                "Received checkpoints moved into the store (result=stored) or refused.",
            ),
            (
                TLS_REJECTED,
                None,
                "Transfer connections that failed mutual TLS.",
            ),
            (IMAGES, None, "Checkpoint images built, by result."),
            (PROBES, None, "Latency probes to peers, by peer and result."),
        ];
        for (name, unit, help) in counters {
            self.recorder
                .describe_counter(KeyName::from(*name), *unit, SharedString::from(*help));
        }
        let gauges: &[(&str, Option<Unit>, &str)] = &[
            (
                STORE_BYTES,
                Some(Unit::Bytes),
                "Bytes of all checkpoints in the store.",
            ),
            (STORE_CHECKPOINTS, None, "Checkpoints in the store."),
            (TRANSFERS_ACTIVE, None, "Transfers being sent now."),
            (
                TRANSFER_RATE,
                None,
                "Delivered rate of the latest round of the transfers being sent, summed.",
            ),
            (
                TRANSFER_STREAMS,
                None,
                "TLS streams open for transfers being sent.",
            ),
            (
                PEER_RTT,
                Some(Unit::Seconds),
                "Median round-trip time to the peer over the probe window.",
            ),
            (
                PEER_LOSS,
                None,
                "Fraction of probes to the peer lost over the probe window.",
            ),
        ];
        for (name, unit, help) in gauges {
            self.recorder
                .describe_gauge(KeyName::from(*name), *unit, SharedString::from(*help));
        }
        let histograms: &[(&str, &str)] = &[
            (
                CHECKPOINT_FREEZE,
                "How long the workload was frozen for a checkpoint.",
            ),
            (
                CHECKPOINT_DURATION,
                "Wall-clock time of a whole checkpoint (dump, seal, retention).",
            ),
        ];
        for (name, help) in histograms {
            self.recorder.describe_histogram(
                KeyName::from(*name),
                Some(Unit::Seconds),
                SharedString::from(*help),
            );
        }
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        Key::from_parts(
            name,
            labels
                .iter()
                .map(|(key, value)| Label::new(*key, value.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &METADATA)
    }

    pub fn checkpoint_taken(
        &self,
        backend: &str,
        kind: &str,
        freeze: Option<Duration>,
        duration: Duration,
        bytes: u64,
    ) {
        let labels = [("backend", backend), ("kind", kind)];
        self.counter(
            names::CHECKPOINTS,
            &[("backend", backend), ("kind", kind), ("result", "ok")],
        )
        .increment(1);
        if let Some(freeze) = freeze {
            self.histogram(names::CHECKPOINT_FREEZE, &labels)
                .record(freeze.as_secs_f64());
        }
        self.histogram(names::CHECKPOINT_DURATION, &labels)
            .record(duration.as_secs_f64());
        self.counter(names::CHECKPOINT_BYTES, &[]).increment(bytes);
    }

    pub fn checkpoint_failed(&self, backend: &str, kind: &str) {
        self.counter(
            names::CHECKPOINTS,
            &[("backend", backend), ("kind", kind), ("result", "error")],
        )
        .increment(1);
    }

    pub fn store_size(&self, checkpoints: u64, bytes: u64) {
        self.gauge(names::STORE_CHECKPOINTS, &[])
            .set(checkpoints as f64);
        self.gauge(names::STORE_BYTES, &[]).set(bytes as f64);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }
}
