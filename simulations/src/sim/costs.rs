//! The cost model: how long each thing the simulator carries out takes, as pure functions of
//! the scenario's calibrated constants (`criu`, `transfer`, `settings`; each cites its
//! measurement in the scenario file) and the true link. The operations call these, and the
//! report uses the same functions to set a modelled migration beside a measured one.

use std::time::Duration;

use automigrate_core::transfer::{FileSpec, TransferPlan, TransferSettings, plan_transfer};

use crate::network::{Link, RoundSettings, run_plan};
use crate::scenario::{ClusterScenario, TransferCost};

use super::clock::{Ms, ms};

/// The link as the engine's streams use it: the payload share of its rate.
fn payload_link(link: &Link, cost: &TransferCost) -> Link {
    Link {
        capacity_bps: link.capacity_bps * cost.payload_share.clamp(0.01, 1.0),
        ..*link
    }
}

/// Time to carry out a plan the engine made, on the true link.
pub fn planned_transfer(
    plan: &TransferPlan,
    link: &Link,
    rounds: RoundSettings,
    cost: &TransferCost,
) -> Ms {
    if plan.total_bytes == 0 {
        return 0;
    }
    let streams = run_plan(plan, &payload_link(link, cost), rounds).duration;
    ms(streams + cost.overhead(link.rtt, plan.file_count))
}

/// Time to send `files` with the engine: it plans on what the agents measured (the true
/// link), then the plan runs on the link.
pub fn engine_transfer(
    files: &[FileSpec],
    link: &Link,
    settings: &TransferSettings,
    rounds: RoundSettings,
    cost: &TransferCost,
) -> Ms {
    let bytes: u64 = files.iter().map(|file| file.size).sum();
    if bytes == 0 {
        return 0;
    }
    match plan_transfer(files, &link.estimate(), settings) {
        Ok(plan) => planned_transfer(&plan, link, rounds, cost),
        Err(_) => {
            let payload = payload_link(link, cost);
            ms(
                Duration::from_secs_f64(bytes as f64 * 8.0 / payload.per_stream_bps().max(1.0))
                    + cost.overhead(link.rtt, files.len()),
            )
        }
    }
}

/// The phases of a migration whose source is alive, as the simulator times them (the
/// `Syncing` of a dataset already on the target takes nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveMigrationCost {
    /// The final stop-and-dump, sealing included.
    pub checkpointing: Ms,
    pub transferring: Ms,
    pub fencing: Ms,
    pub restoring: Ms,
    pub verifying: Ms,
}

impl LiveMigrationCost {
    /// From the start of the final dump until the restore returned: what the workload stands
    /// still (it runs again during Verifying; the demo's MDT is measured the same way).
    pub fn downtime(&self) -> Ms {
        self.checkpointing + self.transferring + self.fencing + self.restoring
    }
}

/// A migration of a live source with a full (not incremental) dump of `image` bytes over
/// `link`, with the scenario's cost model and the engine's transfer `settings`.
pub fn live_migration(
    scenario: &ClusterScenario,
    settings: &TransferSettings,
    image: u64,
    link: &Link,
) -> LiveMigrationCost {
    let rounds = RoundSettings {
        round: scenario.settings.transfer_round,
    };
    let files = [FileSpec {
        path: "checkpoint".into(),
        size: image,
    }];
    LiveMigrationCost {
        checkpointing: ms(scenario.criu.final_dump_time(image)),
        transferring: engine_transfer(&files, link, settings, rounds, &scenario.transfer),
        fencing: ms(scenario.settings.stop_source),
        restoring: ms(scenario.criu.restore_time(image)),
        verifying: ms(scenario.settings.verify),
    }
}

#[cfg(test)]
mod tests {
    use super::LiveMigrationCost;

    #[test]
    fn downtime_ends_when_the_restore_returns() {
        let cost = LiveMigrationCost {
            checkpointing: 285,
            transferring: 412,
            fencing: 7,
            restoring: 204,
            verifying: 1000,
        };
        assert_eq!(cost.downtime(), 908);
    }
}
