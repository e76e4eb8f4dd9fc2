//! The link model and the transfer simulator.
//!
//! A [`Link`] is what the simulator takes to be true about a path: RTT, capacity and loss. One
//! TCP stream on it gets the engine's own model, [`model_stream_bps`] (the lesser of the Mathis
//! loss bound and the window bound), capped by the capacity; `n` parallel streams share the
//! capacity, so together they get `min(capacity, n · per-stream)`.
//!
//! [`run_plan`] moves a [`TransferPlan`] made by the engine's [`plan_transfer`] over a link in
//! rounds. Each round it asks the engine's [`StreamController`] how many streams to run, lets
//! those streams take work units off the plan's largest-first queue, and feeds the measured
//! round back to the controller: the same loop the agent's mover runs, with the network replaced
//! by the fluid model above. [`run_sequential_files`] covers tools that send one file after the
//! other on one connection (scp, a repository download, a tar stream), and [`run_per_file`]
//! tools that open a connection per file with a bounded parallel window.

use std::time::Duration;

use automigrate_core::transfer::{
    FileSpec, LinkEstimate, RoundSample, StreamController, StreamMode, TransferPlan,
    TransferPlanError, TransferSettings, model_stream_bps, plan_transfer,
};

/// A network path as the simulator models it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub rtt: Duration,
    /// Capacity in bits per second.
    pub capacity_bps: f64,
    /// Packet loss probability.
    pub loss: f64,
}

impl Link {
    /// Throughput of one TCP stream: the engine's model, capped by the capacity.
    pub fn per_stream_bps(&self) -> f64 {
        model_stream_bps(self.rtt, self.loss).min(self.capacity_bps)
    }

    /// Throughput of one stream whose application caps its in-flight data at `window` bytes
    /// (an SSH channel window, an NFS client's outstanding reads).
    pub fn per_stream_bps_with_window(&self, window_bytes: f64) -> f64 {
        let window_bps = window_bytes * 8.0 / self.rtt.as_secs_f64().max(1e-5);
        self.per_stream_bps().min(window_bps)
    }

    /// Throughput of `streams` parallel streams sharing the link.
    pub fn aggregate_bps(&self, streams: u32) -> f64 {
        (f64::from(streams) * self.per_stream_bps()).min(self.capacity_bps)
    }

    /// What the engine is told about the link: the truth, as measured by the agents' probes.
    pub fn estimate(&self) -> LinkEstimate {
        LinkEstimate {
            rtt: self.rtt,
            bandwidth_bps: Some(self.capacity_bps.max(1.0) as u64),
            loss: self.loss,
        }
    }
}

/// How a simulated transfer went.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferOutcome {
    pub duration: Duration,
    pub bytes: u64,
    /// Rounds the stream controller was consulted (0 for single-stream transfers).
    pub rounds: u32,
    /// Streams in use when the transfer ended.
    pub final_streams: u32,
    /// The most streams used at once.
    pub peak_streams: u32,
}

/// Knobs of the round-based simulation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundSettings {
    /// Length of one controller round.
    pub round: Duration,
}

impl Default for RoundSettings {
    fn default() -> Self {
        Self {
            round: Duration::from_secs(1),
        }
    }
}

/// Plans `files` with the engine and moves the plan over `link`.
pub fn plan_and_run(
    files: &[FileSpec],
    link: &Link,
    settings: &TransferSettings,
    rounds: RoundSettings,
) -> Result<(TransferPlan, TransferOutcome), TransferPlanError> {
    let plan = plan_transfer(files, &link.estimate(), settings)?;
    let outcome = run_plan(&plan, link, rounds);
    Ok((plan, outcome))
}

/// Moves an engine plan over a link, round by round, with the engine's stream controller.
///
/// Every connection costs two RTTs of handshakes before it carries data (as in the planner's
/// estimate). Streams beyond the number of units left are idle, so the round's throughput uses
/// only `min(streams, units left)` streams. The round in which the last byte arrives is cut
/// short at that byte, so durations are not rounded up to whole rounds.
pub fn run_plan(plan: &TransferPlan, link: &Link, rounds: RoundSettings) -> TransferOutcome {
    let setup = link.rtt.as_secs_f64() * 2.0;
    if plan.units.is_empty() {
        return TransferOutcome {
            duration: Duration::ZERO,
            bytes: 0,
            rounds: 0,
            final_streams: 0,
            peak_streams: 0,
        };
    }
    let unit_sizes: Vec<f64> = plan.units.iter().map(|unit| unit.bytes() as f64).collect();
    if plan.mode == StreamMode::Single {
        let bits = plan.total_bytes as f64 * 8.0;
        let secs = setup + bits / link.per_stream_bps().max(1.0);
        return TransferOutcome {
            duration: Duration::from_secs_f64(secs),
            bytes: plan.total_bytes,
            rounds: 0,
            final_streams: 1,
            peak_streams: 1,
        };
    }

    let mut controller = StreamController::new(plan.initial_streams, plan.max_streams);
    let round_secs = rounds.round.as_secs_f64().max(1e-3);
    let mut next_unit = 0usize;
    // Bytes left in the units currently assigned to streams (one entry per busy stream).
    let mut in_flight: Vec<f64> = Vec::new();
    let mut elapsed = 0.0;
    let mut round_count = 0u32;
    let mut open_connections = 0u32;
    let mut peak = 0u32;
    let mut streams = controller.streams();
    // A generous bound: a transfer that has not finished in this many rounds has a link model
    // that delivers nothing; stopping keeps the simulator from looping forever.
    let round_limit = 10_000_000u32;
    while (next_unit < unit_sizes.len() || !in_flight.is_empty()) && round_count < round_limit {
        while in_flight.len() < streams as usize && next_unit < unit_sizes.len() {
            in_flight.push(unit_sizes[next_unit]);
            next_unit += 1;
        }
        let busy = in_flight.len() as u32;
        peak = peak.max(busy);
        // New connections spend their handshake time idle.
        let new_connections = busy.saturating_sub(open_connections);
        open_connections = open_connections.max(busy);
        let per_stream = link.aggregate_bps(busy.max(1)) / f64::from(busy.max(1)) / 8.0;
        let mut delivered = 0.0;
        let mut round_used = 0.0f64;
        for (position, left) in in_flight.iter_mut().enumerate() {
            let idle = if (position as u32) >= busy - new_connections {
                setup.min(round_secs)
            } else {
                0.0
            };
            // A stream that finishes its unit takes the next one from the queue within the
            // same round, as the agent's mover does; it stops at the round's end or when the
            // queue is empty.
            let mut budget = round_secs - idle;
            let mut used = idle;
            loop {
                let can_send = per_stream * budget;
                let sent = can_send.min(*left);
                *left -= sent;
                delivered += sent;
                if sent >= can_send || per_stream <= 0.0 {
                    used = round_secs;
                    break;
                }
                let took = sent / per_stream;
                used += took;
                budget -= took;
                if *left > 0.5 || next_unit >= unit_sizes.len() {
                    break;
                }
                *left = unit_sizes[next_unit];
                next_unit += 1;
            }
            round_used = round_used.max(used);
        }
        in_flight.retain(|left| *left > 0.5);
        let finished = next_unit >= unit_sizes.len() && in_flight.is_empty();
        let this_round = if finished { round_used } else { round_secs };
        elapsed += this_round;
        round_count += 1;
        streams = controller.observe(RoundSample {
            streams: busy.max(1),
            bytes: delivered as u64,
            elapsed: Duration::from_secs_f64(round_secs),
        });
    }
    TransferOutcome {
        duration: Duration::from_secs_f64(elapsed),
        bytes: plan.total_bytes,
        rounds: round_count,
        final_streams: streams,
        peak_streams: peak,
    }
}

/// One connection that sends files one after the other, paying `per_file` (protocol round
/// trips, headers) for each and `setup` once, at `bps`.
pub fn run_sequential_files(
    files: &[FileSpec],
    bps: f64,
    setup: Duration,
    per_file: Duration,
) -> Duration {
    let bits: f64 = files.iter().map(|file| file.size as f64 * 8.0).sum();
    let overhead = setup.as_secs_f64() + per_file.as_secs_f64() * files.len() as f64;
    Duration::from_secs_f64(overhead + bits / bps.max(1.0))
}

/// A tool that opens one connection per file (each paying `per_file_setup`) with a parallel
/// window the engine's stream controller adjusts every round, as the seed study's middleware
/// did. Files are taken in input order; a stream finishing its file in mid-round starts the next
/// one in the same round.
pub fn run_per_file(
    files: &[FileSpec],
    link_bps_for: &dyn Fn(u32) -> f64,
    per_file_setup: Duration,
    initial_window: u32,
    max_window: u32,
    rounds: RoundSettings,
) -> TransferOutcome {
    let mut controller = StreamController::new(initial_window, max_window);
    let round_secs = rounds.round.as_secs_f64().max(1e-3);
    let setup = per_file_setup.as_secs_f64();
    // (setup seconds left, bytes left) for each file being sent, one per busy slot.
    let mut active: Vec<(f64, f64)> = Vec::new();
    let mut next_file = 0usize;
    let mut elapsed = 0.0;
    let mut round_count = 0u32;
    let mut peak = 0u32;
    let mut window = controller.streams() as usize;
    let total: u64 = files.iter().map(|file| file.size).sum();
    while (next_file < files.len() || !active.is_empty()) && round_count < 10_000_000 {
        while active.len() < window && next_file < files.len() {
            active.push((setup, files[next_file].size as f64));
            next_file += 1;
        }
        let busy = active.len().max(1) as u32;
        peak = peak.max(busy);
        let per_stream_bytes = link_bps_for(busy) / f64::from(busy) / 8.0;
        let mut delivered = 0.0;
        let mut round_used = 0.0f64;
        let mut still_active = Vec::with_capacity(active.len());
        for entry in active.drain(..) {
            let (mut setup_left, mut bytes_left) = entry;
            let mut used = 0.0;
            loop {
                let setup_spent = setup_left.min(round_secs - used);
                used += setup_spent;
                setup_left -= setup_spent;
                let sent = (per_stream_bytes * (round_secs - used)).min(bytes_left);
                bytes_left -= sent;
                delivered += sent;
                used += if per_stream_bytes > 0.0 {
                    sent / per_stream_bytes
                } else {
                    round_secs - used
                };
                let done = bytes_left <= 0.5 && setup_left <= 0.0;
                if !done {
                    still_active.push((setup_left, bytes_left));
                    break;
                }
                // The freed slot starts the next file within this round.
                if used < round_secs && next_file < files.len() {
                    setup_left = setup;
                    bytes_left = files[next_file].size as f64;
                    next_file += 1;
                    continue;
                }
                break;
            }
            round_used = round_used.max(used);
        }
        active = still_active;
        let finished = next_file >= files.len() && active.is_empty();
        elapsed += if finished { round_used } else { round_secs };
        round_count += 1;
        window = controller.observe(RoundSample {
            streams: busy,
            bytes: delivered as u64,
            elapsed: Duration::from_secs_f64(round_secs),
        }) as usize;
    }
    TransferOutcome {
        duration: Duration::from_secs_f64(elapsed),
        bytes: total,
        rounds: round_count,
        final_streams: window as u32,
        peak_streams: peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(rtt_ms: u64, mbps: f64, loss: f64) -> Link {
        Link {
            rtt: Duration::from_millis(rtt_ms),
            capacity_bps: mbps * 1e6,
            loss,
        }
    }

    fn files(count: u64, size: u64) -> Vec<FileSpec> {
        (0..count)
            .map(|index| FileSpec {
                path: format!("f{index}"),
                size,
            })
            .collect()
    }

    #[test]
    fn per_stream_follows_mathis_and_is_capped_by_the_link() {
        let lossy = link(10, 10_000.0, 1e-4);
        let mathis = 1448.0 * 8.0 / 0.010 * 1.22 / 1e-2;
        assert!((lossy.per_stream_bps() - mathis).abs() / mathis < 1e-9);
        let narrow = link(10, 50.0, 1e-4);
        assert_eq!(narrow.per_stream_bps(), 50e6);
        assert_eq!(lossy.aggregate_bps(1000), 10_000e6);
        assert!((lossy.aggregate_bps(3) - 3.0 * mathis).abs() < 1.0);
    }

    #[test]
    fn a_stream_sends_more_than_one_small_unit_per_round() {
        // 128 MiB in 256 KiB units over 10 ms and 0.1 % loss: five streams at the Mathis bound
        // (≈ 45 Mbit/s each) fill the 200 Mbit/s link, so the transfer takes about 5.4 s plus a
        // short ramp. A stream that stopped at the end of its unit until the next round moved
        // 256 KiB per stream per round and took 13.1 s.
        let path = link(10, 200.0, 0.001);
        let data = files(4, 32 << 20);
        let settings = TransferSettings {
            chunk_size: 256 << 10,
            max_streams: 64,
            ..TransferSettings::default()
        };
        let (plan, outcome) =
            plan_and_run(&data, &path, &settings, RoundSettings::default()).unwrap();
        assert!(plan.units.len() > 100, "{} units", plan.units.len());
        let ideal = (128u64 << 20) as f64 * 8.0 / 200e6;
        let took = outcome.duration.as_secs_f64();
        assert!(
            took < ideal * 1.15,
            "took {took:.2} s, the link alone needs {ideal:.2} s"
        );
        assert!(
            took >= ideal,
            "took {took:.2} s, faster than the link ({ideal:.2} s)"
        );
    }

    #[test]
    fn parallel_plan_beats_one_stream_on_a_lossy_long_link() {
        let path = link(70, 500.0, 1e-4);
        let data = files(10, 376_000_000);
        let (plan, outcome) = plan_and_run(
            &data,
            &path,
            &TransferSettings::default(),
            RoundSettings::default(),
        )
        .unwrap();
        assert_eq!(plan.mode, StreamMode::Parallel);
        let single =
            run_sequential_files(&data, path.per_stream_bps(), Duration::ZERO, Duration::ZERO);
        assert!(
            outcome.duration.as_secs_f64() < single.as_secs_f64() / 3.0,
            "{outcome:?} vs {single:?}"
        );
        // It can never beat the capacity.
        let floor = 3_760_000_000.0 * 8.0 / 500e6;
        assert!(outcome.duration.as_secs_f64() >= floor, "{outcome:?}");
        assert!(outcome.rounds > 0 && outcome.peak_streams > 1);
    }

    #[test]
    fn per_file_setup_dominates_many_small_files() {
        // One stream fills this link, so parallel files only add their set-up costs.
        let path = link(10, 500.0, 0.0);
        let small = files(1000, 432_000);
        let per_file = run_per_file(
            &small,
            &|n| path.aggregate_bps(n),
            Duration::from_millis(800),
            4,
            16,
            RoundSettings::default(),
        );
        let tar = run_sequential_files(
            &small,
            path.per_stream_bps(),
            Duration::from_secs(1),
            Duration::ZERO,
        );
        assert!(per_file.duration > tar, "{per_file:?} vs {tar:?}");
        assert_eq!(per_file.bytes, 432_000_000);
    }
}
