//! The automigrate node agent, and the HTTP client the controller uses to talk to it.
//!
//! Always built (the controller depends on the crate with `default-features = false`):
//! - [`api`]: the wire types of the agent's HTTP API (JSON, camelCase, humantime durations).
//! - [`client`]: [`client::AgentClient`], the reqwest client of that API.
//!
//! With the `server` feature (default), the daemon behind the `automigrate-agent` binary:
//! - [`server`]: the axum HTTP API, bearer-token auth, validation, error bodies.
//! - [`agent`]: the node's state: checkpoint backend, store and retention, transfers out.
//! - [`checkpointer`]: the chosen checkpoint backend and how it finds a pod's workload.
//! - [`kubeapi`]: the kubelet backend's HTTPS transport to the API server.
//! - [`incoming`]: the transfer receiver and the hand-over of received checkpoints into the
//!   store (verified) and datasets into the data root.
//! - [`image`]: checkpoint OCI image layouts built from stored checkpoints.
//! - [`fence`]: self-fencing (the node stops its protected pods when it loses its standing).
//! - [`standing`]: what self-fencing acts through: Lease and pod reads, the authenticated peer
//!   question, runc kills.
//! - [`prober`]: the latency prober (TCP connect RTT and loss to each peer).
//! - [`metrics`]: metric names and the Prometheus recorder.
//! - [`config`]: the command line (flags with environment fallbacks).

pub mod api;
pub mod client;

#[cfg(feature = "server")]
pub mod agent;
#[cfg(feature = "server")]
pub mod checkpointer;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod fence;
#[cfg(feature = "server")]
pub mod image;
#[cfg(feature = "server")]
pub mod incoming;
#[cfg(feature = "server")]
pub mod kubeapi;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod prober;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod standing;

pub use client::{AgentClient, ClientError};
