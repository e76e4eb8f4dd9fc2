//! The automigrate Kubernetes controller: watches the cluster, runs the shared decision engine,
//! orchestrates checkpoints through the node agents, and drives every migration through the
//! core state machine, persisting it in the Migration custom resource.
//!
//! Modules:
//! - [`crd`]: the Migration custom resource (spec = the request, status = the persisted state
//!   machine), generated into `deploy/crd.yaml` by the `crdgen` binary.
//! - [`alertmanager`]: the Alertmanager webhook receiver (payload version 4), and the alert
//!   book every replica shares through the ConfigMap `automigrate-alerts`.
//! - [`stores`]: reflectors for Nodes, node Leases, Pods and Migrations, each a supervised
//!   watch (one that ends fails `/readyz` and is restarted).
//! - [`policies`]: policy ConfigMaps, hot reloaded; invalid edits rejected with an Event.
//! - [`snapshot`]: Kubernetes objects to the engine's `ClusterSnapshot` (pure).
//! - [`decider`]: the periodic decision pass, which calls `automigrate_core::decide`.
//! - [`checkpoints`]: periodic checkpoints and their replication to standby nodes.
//! - [`executor`]: drives Migrations through `automigrate_core::migration`, with fencing.
//! - [`replacement`]: the replacement pod, and how pod owners are handled.
//! - [`agent`]: the narrow `NodeAgent` trait the controller talks to agents through, and a
//!   recording double; [`agent_http`]: the same over HTTP to the real agents; [`probes`]: link
//!   and user latency kept between passes (the agents' peer probes, PromQL);
//!   [`prometheus`]: the policies' PromQL signal queries.
//! - [`writer`]: the one task that writes to the API server.
//! - [`leader`]: leader election with a Lease.
//! - [`controller`]: wiring and the loops; [`run`]: the process (election, HTTP, stop); [`http`]: `/metrics`, `/healthz`, `/readyz`;
//!   [`metrics`]: metric names; [`clock`]: the injectable clock; [`manual`]: `kubectl migrate`.

pub mod agent;
pub mod agent_http;
pub mod alertmanager;
pub mod checkpoints;
pub mod clock;
pub mod controller;
pub mod crd;
pub mod decider;
pub mod executor;
pub mod http;
pub mod leader;
pub mod manual;
pub mod metrics;
pub mod policies;
pub mod probes;
pub mod prometheus;
pub mod replacement;
pub mod run;
pub mod snapshot;
pub mod stores;
pub mod writer;
