//! The pure core of automigrate: everything that decides, nothing that acts.
//!
//! Drivers (the Kubernetes controller, the embedded single-machine mode, the simulator) build a
//! [`ClusterSnapshot`] from what they observe, hold a [`PolicySet`] and the engine's
//! [`EngineMemory`], and call [`decide`] with the time they read from their own clock. They carry
//! out the returned [`Decisions`] and drive each migration through the [`migration`] state
//! machine. Nothing here touches Kubernetes, sockets, files or clocks, so the same input always
//! gives the same output and every driver shares one implementation.
//!
//! Modules:
//! - [`model`]: the cluster as the engine sees it (nodes, protected pods, links, users, alerts).
//! - [`units`]: Kubernetes-style quantities, byte sizes, rates and humantime durations.
//! - [`annotations`]: the `automigrate.dev/*` pod annotations and their validation.
//! - [`policy`]: policy documents (from ConfigMaps), validation and the last-valid registry.
//! - [`health`]: node assessment (healthy, degraded, failed) with latency hysteresis.
//! - [`targeting`]: where a pod may go and how candidate nodes are scored.
//! - [`decide`]: the decision pass.
//! - [`migration`]: the migration state machine, its timeouts, resume rules and fencing.
//! - [`driver`]: the one migration driver (the loop and its rules) behind the [`driver::Port`].
//! - [`fencing`]: when a dead node counts as fenced (the self-fence safe-time rule, the modes).
//! - [`transfer`]: transfer planning and the feedback controller for parallel streams.
//! - [`fixtures`]: builders and a deterministic synthetic cluster for tests and benchmarks.

pub mod annotations;
pub mod decide;
pub mod driver;
pub mod fencing;
pub mod fixtures;
pub mod health;
mod index;
pub mod migration;
pub mod model;
pub mod policy;
pub mod targeting;
pub mod transfer;
pub mod units;

pub use decide::{Decisions, EngineMemory, decide};
pub use model::ClusterSnapshot;
pub use policy::{Policy, PolicySet};
