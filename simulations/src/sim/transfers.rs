//! Transfer times on the true links, through the engine's transfer plans and stream controller.

use automigrate_core::decide::PlannedTransfer;
use automigrate_core::transfer::FileSpec;

use crate::network::{Link, RoundSettings};

use super::clock::Ms;
use super::costs::{engine_transfer, planned_transfer};
use super::simulation::Simulation;
use super::state::{node_index, true_link};

impl Simulation<'_> {
    pub(super) fn link(&self, from: usize, to: usize) -> Link {
        true_link(self.scenario, &self.nodes, from, to)
    }

    pub(super) fn rounds(&self) -> RoundSettings {
        RoundSettings {
            round: self.scenario.settings.transfer_round,
        }
    }

    /// Time to copy one blob of `bytes` (a checkpoint image) with the engine's plan.
    pub(super) fn transfer_time_bytes(&mut self, from: usize, to: usize, bytes: u64) -> Ms {
        if from == to || bytes == 0 {
            return 0;
        }
        let link = self.link(from, to);
        let key = (bytes, 1, link.rtt.as_micros() as u64, 0, 0, false);
        if let Some(&cached) = self.transfer_cache.get(&key) {
            return cached;
        }
        let files = [FileSpec {
            path: "checkpoint".into(),
            size: bytes,
        }];
        let time = engine_transfer(
            &files,
            &link,
            &self.transfer_settings,
            self.rounds(),
            &self.scenario.transfer,
        );
        self.transfer_cache.insert(key, time);
        time
    }

    /// Time to stage a dataset's files from `from` to `to` with the engine's plan.
    pub(super) fn transfer_time_files(&mut self, from: usize, to: usize, dataset: usize) -> Ms {
        if from == to {
            return 0;
        }
        let link = self.link(from, to);
        let files = &self.dataset_files[dataset];
        let bytes: u64 = files.iter().map(|file| file.size).sum();
        let key = (bytes, files.len(), link.rtt.as_micros() as u64, 0, 0, true);
        if let Some(&cached) = self.transfer_cache.get(&key) {
            return cached;
        }
        let time = engine_transfer(
            files,
            &link,
            &self.transfer_settings,
            self.rounds(),
            &self.scenario.transfer,
        );
        self.transfer_cache.insert(key, time);
        time
    }

    /// Time to carry out a transfer the engine planned, on the true link.
    pub(super) fn planned_transfer_time(&mut self, transfer: &PlannedTransfer) -> Ms {
        let (Some(from), Some(to)) = (node_index(&transfer.from), node_index(&transfer.to)) else {
            return 0;
        };
        let link = self.link(from, to);
        let plan = &transfer.plan;
        let key = (
            plan.total_bytes,
            plan.units.len(),
            link.rtt.as_micros() as u64,
            plan.initial_streams,
            plan.max_streams,
            true,
        );
        if let Some(&cached) = self.transfer_cache.get(&key) {
            return cached;
        }
        let time = planned_transfer(plan, &link, self.rounds(), &self.scenario.transfer);
        self.transfer_cache.insert(key, time);
        time
    }
}
