//! The migration executor: the Kubernetes side of the one migration driver
//! ([`automigrate_core::driver`]). The driver owns the loop and every rule (lost source,
//! checkpoint choice, restore failure, fencing, rollback); this module implements its port with
//! the API server (reflector stores and the writer) and the node agents, and persists the
//! driver's run into the Migration's status after every change.
//!
//! One call of [`Executor::advance`] builds a port for the Migration and runs the driver until
//! the migration has to wait (a transfer running, a pod terminating, a replacement not Ready
//! yet) or ends. Because every step is idempotent and keyed by persisted data (transfer ids,
//! the deterministic replacement name), a restarted controller re-enters the same loop from the
//! status and resumes or rolls back; nothing is redone blindly.
//!
//! The files, by what they do:
//! - [`port`]: the port itself, dispatching each effect to the files below;
//! - [`observe`]: what the driver reads (source node and pod, replacement, Lease, taints, a
//!   final dump that completed before a crash, the stored checkpoints' copies);
//! - [`transfers`]: starting and polling transfers on the sending agent;
//! - [`pods`]: the final dump, stopping the source, creating, checking and stopping the
//!   replacement (transparent restore from the checkpoint image the target's agent builds, or
//!   application restore with the checkpoint mounted, or fresh);
//! - [`fence`]: the `node.kubernetes.io/out-of-service` taint on a node the driver judged dead;
//! - [`persist`]: the status write, phase metrics, logs and Events;
//! - [`status`]: the status's conditions and timings (a leaf: pure functions);
//! - [`inflight`]: per-Migration exclusion, so two `advance`s of one Migration never overlap.
//!
//! Failures: an unreachable agent or a transient API error is retryable. The state machine
//! keeps the phase and records `retryAt` (backoff from the attempt count); the driver does not
//! carry out the step again before then, and the phase deadline ends the retrying. So an agent
//! outage shorter than the phase's timeout delays a migration but never ends it.

mod fence;
mod inflight;
mod observe;
mod persist;
mod pods;
mod port;
mod status;
mod transfers;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use automigrate_core::driver::{Driver, DriverConfig, DriverError};
use automigrate_core::migration::{self, Phase};
use jiff::Timestamp;
use kube::ResourceExt;

pub use inflight::{InFlight, InFlightGuard};
pub(crate) use status::run_of;

use crate::agent::NodeAgent;
use crate::clock::Clock;
use crate::crd::Migration;
use crate::stores::Stores;
use crate::writer::{WriteError, Writer};

/// The taint that marks a node as shut down (non-graceful node shutdown).
pub const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";

/// Who confirms that a dead node's pods cannot run any more (the modes and the safe-time rule:
/// [`automigrate_core::fencing`]).
pub use automigrate_core::fencing::FencingMode as DeadNodeFencing;

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub dead_node_fencing: DeadNodeFencing,
    /// Directory of the agents' checkpoint store on every node (application-mode mounts).
    pub checkpoint_root: String,
    /// Most transitions one `advance` makes before yielding to other migrations.
    pub max_transitions: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            dead_node_fencing: DeadNodeFencing::default(),
            checkpoint_root: "/var/lib/automigrate/checkpoints".into(),
            max_transitions: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("migration {0} has no namespace or name")]
    Unnamed(String),
    #[error("writing the migration's status failed: {0}")]
    Persist(#[source] WriteError),
    #[error("state machine refused the event: {0}")]
    Transition(#[from] migration::TransitionError),
    #[error("the migration driver stopped: {0}")]
    Driver(String),
}

impl ExecError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Unnamed(_) => "unnamed",
            Self::Persist(error) => error.metric_label(),
            Self::Transition(_) => "transition",
            Self::Driver(_) => "driver",
        }
    }
}

/// Where one `advance` left a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advanced {
    pub phase: Phase,
    /// Why it stopped here (the step it waits on), when not terminal.
    pub waiting: Option<String>,
}

/// Drives Migrations. Holds the newest status it wrote per Migration, because the reflector may
/// not have seen its own last write yet when the next `advance` comes.
#[derive(Debug)]
pub struct Executor {
    stores: Stores,
    writer: Writer,
    agent: Arc<dyn NodeAgent>,
    config: ExecutorConfig,
    written: Mutex<BTreeMap<String, Migration>>,
    /// Measures how long the steps of one `advance` take (see [`Executor::with_clock`]).
    clock: Option<Arc<dyn Clock>>,
}

fn migration_key(migration: &Migration) -> String {
    migration.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            migration.namespace().unwrap_or_default(),
            migration.name_any()
        )
    })
}

impl Executor {
    pub fn new(
        stores: Stores,
        writer: Writer,
        agent: Arc<dyn NodeAgent>,
        config: ExecutorConfig,
    ) -> Self {
        Self {
            stores,
            writer,
            agent,
            config,
            written: Mutex::default(),
            clock: None,
        }
    }

    /// Lets `advance` see time pass while it works. A step may take long (a synchronous final
    /// checkpoint, an API call), and several phases may end in one `advance`; without a clock
    /// every transition of one `advance` is stamped with the `now` it was called with, and those
    /// phases read as 0 s in the history, the phase-duration histogram and the downtime. With
    /// it, each transition is stamped `now` plus the clock's progress since the call began (a
    /// manual clock that nobody moves keeps tests exact).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The newest version of a Migration this executor knows: its own last write, unless the
    /// reflector has a newer one.
    fn newest(&self, migration: &Migration) -> Migration {
        let key = migration_key(migration);
        let Ok(written) = self.written.lock() else {
            return migration.clone();
        };
        match written.get(&key) {
            Some(ours) => {
                let version = |m: &Migration| {
                    m.metadata
                        .resource_version
                        .as_deref()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if version(migration) > version(ours) {
                    migration.clone()
                } else {
                    ours.clone()
                }
            }
            None => migration.clone(),
        }
    }

    /// Migrations that still need driving: non-terminal, with a status.
    pub fn active(&self) -> Vec<Migration> {
        self.stores
            .migrations
            .state()
            .iter()
            .map(|migration| self.newest(migration))
            .filter(|migration| migration.phase().is_some_and(|phase| !phase.is_terminal()))
            .collect()
    }

    /// Runs the migration driver for one Migration until it must wait or has ended.
    #[tracing::instrument(level = "info", skip_all, fields(migration = %migration.name_any(), namespace = migration.namespace().unwrap_or_default()))]
    pub async fn advance(
        &self,
        migration: &Migration,
        now: Timestamp,
    ) -> Result<Advanced, ExecError> {
        let current = self.newest(migration);
        let Some(status) = current.status.clone() else {
            return Ok(Advanced {
                // The phase a migration starts in.
                phase: Default::default(),
                waiting: Some("not started by the decision pass yet".into()),
            });
        };
        let run = run_of(&status);
        let driver = Driver::new(DriverConfig {
            dead_node_fencing: self.config.dead_node_fencing,
            max_transitions: self.config.max_transitions,
        });
        let mut port = port::OperatorPort::new(self, current, status, now);
        match driver.advance(&mut port, run).await {
            Ok(advanced) => Ok(Advanced {
                phase: advanced.phase(),
                waiting: advanced.waiting,
            }),
            Err(DriverError::Persist(error)) => Err(match port.write_error.take() {
                Some(write) => ExecError::Persist(write),
                None => ExecError::Unnamed(format!("{}: {error}", port.current.name_any())),
            }),
            Err(DriverError::Transition(error)) => Err(ExecError::Transition(error)),
            Err(error @ DriverError::PortPending) => Err(ExecError::Driver(error.to_string())),
        }
    }
}
