//! automigrate's simulator: the seed paper's experiments and recovery policies at scale.
//!
//! The simulator never decides anything itself that the controller would decide: it links
//! `automigrate-core` and calls [`automigrate_core::decide`], the migration state machine, the
//! transfer planner and the stream controller, exactly as the controller does, and models only
//! what the real world would supply (time, failures, the network, CRIU's costs, Kubernetes' own
//! behaviour).
//!
//! Modules:
//! - [`calibration`]: the cost model against the project's measurements, and what moved.
//! - [`random`]: reproducible random variates (exponential, Weibull, log-normal) per stream.
//! - [`scenario`]: scenario and policy files (YAML) and their validation.
//! - [`network`]: the link model (Mathis per stream, shared capacity) and transfer simulation.
//! - [`sim`]: the discrete-event cluster simulator and its metrics.
//! - [`paper`]: the seed paper's Table III and Fig. 5 on the same models.
//! - [`report`]: CSV, SVG and the markdown report.
//! - [`svg`]: a small SVG bar-chart writer.

pub mod calibration;
pub mod network;
pub mod paper;
pub mod random;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod svg;
