//! The discrete-event simulator of a cluster that runs training jobs while its nodes fail.
//!
//! Data model. Time is whole milliseconds from the start of the run ([`Ms`]); the engine sees
//! it as a [`jiff::Timestamp`] from a fixed epoch. Events sit in a `BTreeMap` keyed by
//! `(time, sequence)`, so ties resolve in the order events were scheduled and a run is a pure
//! function of its scenario, policy and seed. Nodes, jobs and migrations live in `Vec`s and are
//! named by index; every other collection is ordered (`BTreeMap`/`BTreeSet`), never hashed.
//!
//! The cluster the engine sees is a persistent [`ClusterSnapshot`] (`world`) whose nodes and
//! links are updated in place, so a decision pass does not rebuild a thousand nodes. A pass is
//! run only on an event that can change a decision: a failure the engine can now detect, a
//! degradation signal, a batch of checkpoint timers falling due, a user's move, a SpeCon
//! milestone, Kubernetes' eviction time. Timer batches and user moves use a *compact* snapshot
//! holding only the pods concerned and every node their decisions can name (their nodes, the
//! holders of their checkpoints, their nodes' probed peers, their users' nodes); a compact pass
//! whose outcome could differ from a full one (a migration it did not expect, or fewer standbys
//! than asked for) is thrown away and re-run on the full snapshot.
//!
//! What the engine decides, the simulator carries out: periodic checkpoints follow the
//! driver's periodic rules (`automigrate_core::driver::periodic`: when the pod's record names
//! the new checkpoint, which standby gets a copy next, what a failed copy leaves on record),
//! each take freezing the job for the CRIU dump time and each copy a transfer on the true link
//! ([`checkpoints`]); migrations are carried out by the
//! controller's own migration driver (`automigrate_core::driver`, every rule of it) through the
//! simulator's implementation of the driver's port ([`port`]), each effect taking the time the
//! cost model gives it (transfers by [`crate::network::run_plan`] on the engine's own transfer
//! plans). Recovery behaviour the engine does not own, Kubernetes' eviction and restart
//! and the SpeCon-like speculative moves, is modelled here and asks the engine where to place.
//!
//! Files. The leaf modules hold the shared types and import nothing from their siblings except
//! the clock: [`clock`] (time), [`results`] (what a run returns), [`state`] (events, jobs, nodes,
//! migrations in flight, names and links), [`costs`] (the cost model: how long a dump, a seal, a
//! transfer, a restore take, as pure functions of the scenario's calibrated constants). [`simulation`] holds the [`Simulation`] itself and
//! its event loop; every other file is one `impl Simulation` block named after the operation it
//! carries out, and none imports another: [`setup`] (building a run), [`failures`] (failures,
//! repairs, degradation, detection), [`jobs`] (placing, running, stopping, finishing),
//! [`snapshot`] (what the engine sees), [`passes`] (decision passes and carrying out their
//! decisions), [`checkpoints`], [`transfers`], [`restarts`] (Kubernetes' own recovery),
//! [`migrations`] (starting migrations, scheduling the driver's wake-ups, settling their end),
//! [`port`] (the driver's port on the cost model, and running the driver), [`users`] (users and SpeCon), and
//! [`summary`] (audit and results).

mod checkpoints;
mod clock;
pub mod costs;
mod failures;
mod jobs;
mod migrations;
mod passes;
mod port;
mod restarts;
mod results;
mod setup;
mod simulation;
mod snapshot;
mod state;
mod summary;
mod transfers;
mod users;

pub use clock::{Ms, timestamp};
pub use results::{
    Audit, EngineStats, JobOutcome, Metrics, RecordedPass, RunOptions, RunResult, SimError,
};
pub use simulation::Simulation;
pub use state::{job_name, node_name};

use crate::scenario::{ClusterScenario, FailureModel, SimPolicy};

/// Runs `policy` on `scenario`.
pub fn run(
    scenario: &ClusterScenario,
    policy: &SimPolicy,
    options: RunOptions,
) -> Result<RunResult, SimError> {
    let trace = if scenario.failures.model == FailureModel::Trace {
        scenario.load_trace()?
    } else {
        Vec::new()
    };
    let mut simulation = Simulation::new(scenario, policy, options, &trace)?;
    simulation.run_to_end();
    Ok(simulation.finish())
}
