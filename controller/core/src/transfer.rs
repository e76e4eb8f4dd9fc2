//! Transfer planning: how the bytes of a checkpoint or data set are cut into work units, how
//! many parallel TCP streams carry them, and how that number is tuned while the copy runs.
//!
//! This module only decides; another crate moves the bytes. Keeping the decision pure (no
//! sockets, no clock) makes every plan reproducible from its inputs and testable without a
//! network.
//!
//! Data model, and why it looks this way:
//!
//! - The input is a list of [`FileSpec`]s. Units refer to files by their index in that list, so
//!   a plan stays small and cannot disagree with the list about names.
//! - A [`WorkUnit`] is what one stream sends in one go. A file larger than the chunk size is cut
//!   into [`WorkUnit::Chunk`]s so a few huge files can still use many streams. Files no larger
//!   than the chunk size are grouped into [`WorkUnit::Pack`]s and sent back to back. The seed
//!   study lost to a single `kubectl cp` tar stream on 1,000 small files because it opened one
//!   connection per file; packing means the number of connections depends on the bytes and the
//!   link, never on how many files there are.
//! - Units are ordered largest first, so the last units to finish are the small ones and a
//!   straggler cannot hold the whole transfer back by much.
//! - The [`TransferPlan`] gives the mode, the first round's stream count and a ceiling. The
//!   [`StreamController`] then adjusts the count round by round from measured throughput,
//!   because the link model is only an estimate.
//!
//! Link model (see [`plan_transfer`]): one TCP stream gets the lesser of the Mathis et al.
//! loss bound, `(MSS / RTT) · 1.22 / sqrt(p)`, and the receive-window bound, `max_window / RTT`.
//! Enough streams are opened to fill the link's capacity, the lesser of the measured bandwidth
//! and the configured rate limit.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One file to transfer, with its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Path relative to the transfer root; the mover interprets it, the planner does not.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
}

/// What is known about the network path between the two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkEstimate {
    /// Round-trip time. Zero is allowed and treated as a very short RTT.
    pub rtt: Duration,
    /// Link capacity in bits per second; `None` when unknown.
    pub bandwidth_bps: Option<u64>,
    /// Packet loss probability, `0.0..=1.0`.
    pub loss: f64,
}

/// How the operator wants streams chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferStrategy {
    /// Let the link model decide between one stream and several.
    #[default]
    Auto,
    /// Always one stream.
    Single,
    /// Always at least two streams, when there are at least two units to send.
    Parallel,
}

/// Operator settings for a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferSettings {
    /// How streams are chosen.
    pub strategy: TransferStrategy,
    /// Ceiling on parallel streams; at least 1.
    pub max_streams: u32,
    /// Bytes per chunk, and the most bytes in one pack; at least [`MIN_CHUNK_SIZE`].
    pub chunk_size: u64,
    /// Cap on the whole transfer in bits per second, so a migration cannot starve the
    /// workloads that share the link.
    pub rate_limit_bps: Option<u64>,
}

impl Default for TransferSettings {
    fn default() -> Self {
        Self {
            strategy: TransferStrategy::Auto,
            max_streams: DEFAULT_MAX_STREAMS,
            chunk_size: DEFAULT_CHUNK_SIZE,
            rate_limit_bps: None,
        }
    }
}

impl TransferSettings {
    /// Checks the settings on their own, without a link or files.
    pub fn validate(&self) -> Result<(), TransferPlanError> {
        if self.max_streams == 0 {
            return Err(TransferPlanError::ZeroMaxStreams);
        }
        if self.chunk_size < MIN_CHUNK_SIZE {
            return Err(TransferPlanError::ChunkSizeTooSmall {
                chunk_size: self.chunk_size,
                minimum: MIN_CHUNK_SIZE,
            });
        }
        if self.rate_limit_bps == Some(0) {
            return Err(TransferPlanError::ZeroRateLimit);
        }
        Ok(())
    }
}

/// Whether the mover opens one stream or several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// One stream carries every unit in order; no controller runs.
    Single,
    /// Several streams take units from a shared queue; the [`StreamController`] sets how many.
    Parallel,
}

/// What one stream sends in one go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WorkUnit {
    /// A slice of one large file: `len` bytes from `offset` of input file number `file`.
    Chunk {
        /// Index into the planned file list.
        file: usize,
        /// Byte offset of the slice in the file.
        offset: u64,
        /// Length of the slice in bytes.
        len: u64,
    },
    /// Several small whole files, sent back to back on one stream.
    Pack {
        /// Indexes into the planned file list, in input order.
        files: Vec<usize>,
        /// Sum of the sizes of those files.
        bytes: u64,
    },
}

impl WorkUnit {
    /// Bytes of file content this unit carries.
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Chunk { len, .. } => *len,
            Self::Pack { bytes, .. } => *bytes,
        }
    }

    /// The lowest file index in the unit; used to break ties when ordering units.
    pub fn first_file(&self) -> usize {
        match self {
            Self::Chunk { file, .. } => *file,
            Self::Pack { files, .. } => files.first().copied().unwrap_or(usize::MAX),
        }
    }

    fn offset(&self) -> u64 {
        match self {
            Self::Chunk { offset, .. } => *offset,
            Self::Pack { .. } => 0,
        }
    }
}

/// The planner's answer: how to cut the data and how many streams to start with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferPlan {
    /// One stream or several.
    pub mode: StreamMode,
    /// Streams for the first round.
    pub initial_streams: u32,
    /// Ceiling for the [`StreamController`]: the configured maximum, lowered to the number of
    /// units because a stream without a unit to send is idle.
    pub max_streams: u32,
    /// Chunk size the units were cut with.
    pub chunk_size: u64,
    /// Work units, largest first, ties by first file index then offset.
    pub units: Vec<WorkUnit>,
    /// Sum of all file sizes.
    pub total_bytes: u64,
    /// Number of input files.
    pub file_count: usize,
    /// Model estimate of one TCP stream's throughput on this link, in bits per second.
    pub per_stream_bps: f64,
    /// Model estimate of the whole transfer's throughput, in bits per second.
    pub effective_bps: f64,
    /// Model estimate of the transfer time, handshakes included.
    pub estimated_duration: Duration,
    /// One sentence with the numbers behind the choice, for logs and events.
    pub rationale: String,
}

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TransferPlanError {
    /// `max_streams` was zero; at least one stream is needed to move anything.
    #[error("max_streams must be at least 1")]
    ZeroMaxStreams,
    /// `chunk_size` was below the minimum.
    #[error("chunk_size of {chunk_size} bytes is below the minimum of {minimum} bytes")]
    ChunkSizeTooSmall {
        /// The configured chunk size.
        chunk_size: u64,
        /// The smallest chunk size accepted.
        minimum: u64,
    },
    /// The loss estimate was NaN or outside `0.0..=1.0`.
    #[error("packet loss {loss} is not a probability in 0.0..=1.0")]
    LossOutOfRange {
        /// The rejected loss value.
        loss: f64,
    },
    /// A known link bandwidth of zero would make every transfer take forever.
    #[error("link bandwidth must be positive when it is known")]
    ZeroBandwidth,
    /// A rate limit of zero would make every transfer take forever.
    #[error("rate limit must be positive when it is set")]
    ZeroRateLimit,
    /// The file sizes add up to more than `u64::MAX` bytes.
    #[error("the total size of the files does not fit in 64 bits")]
    TotalSizeOverflow,
    /// The plan would hold more units than [`MAX_WORK_UNITS`].
    #[error(
        "the plan would need {units} work units, more than the limit of {limit}; raise chunk_size"
    )]
    TooManyUnits {
        /// Units the plan would need (at least).
        units: u64,
        /// The largest number of units accepted.
        limit: u64,
    },
}

/// Smallest accepted chunk size. Below this, per-unit bookkeeping and request round trips cost
/// more than the parallelism gains.
pub const MIN_CHUNK_SIZE: u64 = 64 * 1024;
/// Default chunk size: large enough that a chunk takes many RTTs to send even on a fast link.
pub const DEFAULT_CHUNK_SIZE: u64 = 8 * 1024 * 1024;
/// Default stream ceiling.
pub const DEFAULT_MAX_STREAMS: u32 = 16;
/// Upper bound on units in one plan. The plan is held in memory and serialized; at roughly 32
/// bytes a unit this keeps it near 128 MiB, which is 32 TiB at the default chunk size.
pub const MAX_WORK_UNITS: u64 = 1 << 22;

/// TCP payload per segment on a 1500-byte MTU with timestamps (1500 - 20 IP - 32 TCP).
const TCP_MSS_BYTES: f64 = 1448.0;
/// The constant sqrt(3/2) of the Mathis et al. model for periodic loss with delayed ACKs off.
const MATHIS_CONSTANT: f64 = 1.22;
/// Linux's default `net.ipv4.tcp_rmem` maximum; autotuning does not grow the window beyond it.
const MAX_TCP_WINDOW_BYTES: f64 = 6.0 * 1024.0 * 1024.0;
/// Capacity assumed when the link bandwidth is unknown: the common node NIC speed.
const ASSUMED_CAPACITY_BPS: u64 = 1_000_000_000;
/// RTT used for a measured zero, roughly a loopback round trip; avoids dividing by zero.
const MIN_MODEL_RTT: Duration = Duration::from_micros(10);
/// TCP and TLS handshakes; all connections open at once, so this is paid once.
const SETUP_ROUND_TRIPS: u32 = 2;
/// A transfer that one stream finishes within this many RTTs is sent on one stream: extra
/// streams start in slow start and need a few RTTs to ramp up, so they cannot pay back.
const SINGLE_STREAM_MAX_RTTS: u32 = 4;

/// Model throughput of one TCP stream, in bits per second, before any link capacity applies.
///
/// The lesser of the Mathis et al. loss bound `(MSS / RTT) · 1.22 / sqrt(p)` (only when
/// `loss > 0`) and the window bound `max_window / RTT`. A zero RTT counts as 10 µs.
pub fn model_stream_bps(rtt: Duration, loss: f64) -> f64 {
    stream_limit(rtt, loss).0
}

/// What caps one stream in the model; named in the rationale so an operator knows what to tune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamLimit {
    /// Packet loss (Mathis bound).
    Loss,
    /// Receive window over RTT.
    Window,
    /// The link itself: one stream already fills it.
    Link,
}

impl StreamLimit {
    fn describe(self) -> &'static str {
        match self {
            Self::Loss => "loss-limited, Mathis model",
            Self::Window => "window-limited, 6 MiB / RTT",
            Self::Link => "link-limited: it fills the capacity alone",
        }
    }
}

fn stream_limit(rtt: Duration, loss: f64) -> (f64, StreamLimit) {
    let rtt_secs = rtt.max(MIN_MODEL_RTT).as_secs_f64();
    let window_bps = MAX_TCP_WINDOW_BYTES * 8.0 / rtt_secs;
    if loss > 0.0 {
        let mathis_bps = TCP_MSS_BYTES * 8.0 / rtt_secs * (MATHIS_CONSTANT / loss.sqrt());
        if mathis_bps < window_bps {
            return (mathis_bps, StreamLimit::Loss);
        }
    }
    (window_bps, StreamLimit::Window)
}

/// Where the capacity figure came from; said in the rationale because an assumed figure should
/// be read with suspicion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CapacitySource {
    Measured,
    Assumed,
    RateLimit,
}

/// Why the mode and stream count came out as they did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Choice {
    ConfiguredSingle,
    ConfiguredParallel,
    OneStreamFillsLink,
    MaxStreamsIsOne,
    TooFewUnits,
    ShortTransfer,
    FillLink,
}

/// Plans a transfer of `files` over `link` under `settings`.
///
/// The model, step by step:
///
/// 1. Capacity is the lesser of the link bandwidth and the rate limit. An unknown bandwidth is
///    assumed to be 1 Gbit/s, and the rationale says so.
/// 2. One stream's throughput is [`model_stream_bps`], capped at the capacity.
/// 3. Streams wanted = ceil(capacity / per-stream), clamped to `[1, max_streams]` and to the
///    number of units.
/// 4. Units: files larger than `chunk_size` are cut into `chunk_size` chunks (the last may be
///    shorter); the other files, empty ones included because they must still be created, are
///    packed greedily in input order into packs of at most `chunk_size` bytes.
/// 5. Mode: `Single` strategy, or `Auto` when one stream is enough or when one stream would
///    finish in under 4 RTTs, gives one stream; otherwise several. `Parallel` strategy asks for
///    at least two.
/// 6. Estimated duration = 2 RTT of handshakes (connections open in parallel) + bits /
///    effective rate, where effective = min(capacity, streams · per-stream).
///
/// Because small files share packs, neither the number of connections nor the handshake cost
/// grows with the file count.
pub fn plan_transfer(
    files: &[FileSpec],
    link: &LinkEstimate,
    settings: &TransferSettings,
) -> Result<TransferPlan, TransferPlanError> {
    settings.validate()?;
    if !(0.0..=1.0).contains(&link.loss) {
        return Err(TransferPlanError::LossOutOfRange { loss: link.loss });
    }
    if link.bandwidth_bps == Some(0) {
        return Err(TransferPlanError::ZeroBandwidth);
    }

    let total_bytes = files
        .iter()
        .try_fold(0_u64, |sum, file| sum.checked_add(file.size))
        .ok_or(TransferPlanError::TotalSizeOverflow)?;
    let units = cut_into_units(files, settings.chunk_size)?;

    let link_bps = link.bandwidth_bps.unwrap_or(ASSUMED_CAPACITY_BPS);
    let (capacity_bps, capacity_source) = match settings.rate_limit_bps {
        Some(limit) if limit < link_bps => (limit, CapacitySource::RateLimit),
        _ if link.bandwidth_bps.is_none() => (link_bps, CapacitySource::Assumed),
        _ => (link_bps, CapacitySource::Measured),
    };
    let capacity = capacity_bps as f64;

    let (tcp_bps, tcp_limit) = stream_limit(link.rtt, link.loss);
    let (per_stream_bps, per_stream_limit) = if tcp_bps >= capacity {
        (capacity, StreamLimit::Link)
    } else {
        (tcp_bps, tcp_limit)
    };

    let unit_count = u32::try_from(units.len()).unwrap_or(u32::MAX).max(1);
    let stream_ceiling = settings.max_streams.min(unit_count);
    let wanted_by_link = ceil_to_u32(capacity / per_stream_bps).max(1);
    let wanted = wanted_by_link.min(stream_ceiling);

    let rtt = link.rtt.max(MIN_MODEL_RTT);
    let total_bits = total_bytes as f64 * 8.0;
    let single_stream_secs = total_bits / per_stream_bps;
    let single_stream_budget = rtt.saturating_mul(SINGLE_STREAM_MAX_RTTS);

    let (mode, initial_streams, choice) = match settings.strategy {
        TransferStrategy::Single => (StreamMode::Single, 1, Choice::ConfiguredSingle),
        TransferStrategy::Parallel => (
            StreamMode::Parallel,
            wanted_by_link.max(2).min(stream_ceiling),
            Choice::ConfiguredParallel,
        ),
        TransferStrategy::Auto if wanted == 1 => {
            let why = if wanted_by_link == 1 {
                Choice::OneStreamFillsLink
            } else if settings.max_streams == 1 {
                Choice::MaxStreamsIsOne
            } else {
                Choice::TooFewUnits
            };
            (StreamMode::Single, 1, why)
        }
        TransferStrategy::Auto if single_stream_secs < single_stream_budget.as_secs_f64() => {
            (StreamMode::Single, 1, Choice::ShortTransfer)
        }
        TransferStrategy::Auto => (StreamMode::Parallel, wanted, Choice::FillLink),
    };
    let max_streams = match mode {
        StreamMode::Single => 1,
        StreamMode::Parallel => stream_ceiling,
    };

    let effective_bps = capacity.min(f64::from(initial_streams) * per_stream_bps);
    let estimated_duration = if units.is_empty() {
        Duration::ZERO
    } else {
        rtt.saturating_mul(SETUP_ROUND_TRIPS)
            .saturating_add(secs_to_duration(total_bits / effective_bps))
    };

    let rationale = Rationale {
        choice,
        mode,
        initial_streams,
        wanted_by_link,
        max_streams_setting: settings.max_streams,
        unit_count: units.len(),
        per_stream_bps,
        per_stream_limit,
        rtt: link.rtt,
        loss: link.loss,
        capacity,
        capacity_source,
        single_stream_secs,
        single_stream_budget,
        file_count: files.len(),
        total_bytes,
        chunk_count: units
            .iter()
            .filter(|unit| matches!(unit, WorkUnit::Chunk { .. }))
            .count(),
        chunk_size: settings.chunk_size,
        effective_bps,
        estimated_duration,
    }
    .sentence();

    Ok(TransferPlan {
        mode,
        initial_streams,
        max_streams,
        chunk_size: settings.chunk_size,
        units,
        total_bytes,
        file_count: files.len(),
        per_stream_bps,
        effective_bps,
        estimated_duration,
        rationale,
    })
}

/// Cuts files into chunks and packs, then orders the units largest first.
fn cut_into_units(files: &[FileSpec], chunk_size: u64) -> Result<Vec<WorkUnit>, TransferPlanError> {
    // Count chunks before allocating any, so an absurd input fails fast instead of exhausting
    // memory. Packs cannot outnumber the files, which are already in memory.
    let chunk_count = files
        .iter()
        .filter(|file| file.size > chunk_size)
        .fold(0_u64, |sum, file| {
            sum.saturating_add(file.size.div_ceil(chunk_size))
        });
    let small_count = files.iter().filter(|file| file.size <= chunk_size).count();
    let upper_bound = chunk_count.saturating_add(u64::try_from(small_count).unwrap_or(u64::MAX));
    if chunk_count > MAX_WORK_UNITS {
        return Err(TransferPlanError::TooManyUnits {
            units: chunk_count,
            limit: MAX_WORK_UNITS,
        });
    }

    let mut units =
        Vec::with_capacity(usize::try_from(upper_bound.min(MAX_WORK_UNITS)).unwrap_or(0));
    let mut open_pack: Vec<usize> = Vec::new();
    let mut open_pack_bytes = 0_u64;
    for (index, file) in files.iter().enumerate() {
        if file.size > chunk_size {
            let mut offset = 0;
            while offset < file.size {
                let len = chunk_size.min(file.size - offset);
                units.push(WorkUnit::Chunk {
                    file: index,
                    offset,
                    len,
                });
                offset += len;
            }
            continue;
        }
        // Greedy first fit in input order: close the pack when this file would overflow it.
        // Input order keeps files of one directory together, which the receiver writes faster.
        if !open_pack.is_empty() && open_pack_bytes + file.size > chunk_size {
            units.push(WorkUnit::Pack {
                files: std::mem::take(&mut open_pack),
                bytes: open_pack_bytes,
            });
            open_pack_bytes = 0;
        }
        open_pack.push(index);
        open_pack_bytes += file.size;
    }
    if !open_pack.is_empty() {
        units.push(WorkUnit::Pack {
            files: open_pack,
            bytes: open_pack_bytes,
        });
    }

    let unit_count = u64::try_from(units.len()).unwrap_or(u64::MAX);
    if unit_count > MAX_WORK_UNITS {
        return Err(TransferPlanError::TooManyUnits {
            units: unit_count,
            limit: MAX_WORK_UNITS,
        });
    }
    units.sort_by(largest_first);
    Ok(units)
}

/// Largest first so stragglers are small; ties by first file then offset, so the order is a
/// total order and the plan is the same on every run.
fn largest_first(a: &WorkUnit, b: &WorkUnit) -> Ordering {
    b.bytes()
        .cmp(&a.bytes())
        .then_with(|| a.first_file().cmp(&b.first_file()))
        .then_with(|| a.offset().cmp(&b.offset()))
}

/// Rounds up and saturates: `as` already saturates and maps NaN to 0, which the callers clamp.
fn ceil_to_u32(value: f64) -> u32 {
    value.ceil() as u32
}

/// Seconds to a duration, saturating instead of panicking on overflow, NaN or a negative.
fn secs_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// Everything the rationale sentence mentions, gathered so the sentence is built in one place.
struct Rationale {
    choice: Choice,
    mode: StreamMode,
    initial_streams: u32,
    wanted_by_link: u32,
    max_streams_setting: u32,
    unit_count: usize,
    per_stream_bps: f64,
    per_stream_limit: StreamLimit,
    rtt: Duration,
    loss: f64,
    capacity: f64,
    capacity_source: CapacitySource,
    single_stream_secs: f64,
    single_stream_budget: Duration,
    file_count: usize,
    total_bytes: u64,
    chunk_count: usize,
    chunk_size: u64,
    effective_bps: f64,
    estimated_duration: Duration,
}

impl Rationale {
    fn sentence(&self) -> String {
        let mut text = match self.mode {
            StreamMode::Single => String::from("Single stream"),
            StreamMode::Parallel => format!("Parallel with {} streams", self.initial_streams),
        };
        let link = format!(
            "one TCP stream reaches {} ({}) at {} RTT and {:.2}% loss, against {} of capacity ({})",
            crate::units::approx_rate(self.per_stream_bps),
            self.per_stream_limit.describe(),
            crate::units::approx_duration(self.rtt),
            self.loss * 100.0,
            crate::units::approx_rate(self.capacity),
            match self.capacity_source {
                CapacitySource::Measured => "measured link bandwidth",
                CapacitySource::Assumed => "assumed 1 Gbit/s because the link bandwidth is unknown",
                CapacitySource::RateLimit => "rate limit",
            },
        );
        // Writing to a String cannot fail; the results are ignored for that reason.
        let _ = match self.choice {
            Choice::ConfiguredSingle => write!(
                text,
                " as configured, although the model wants {} because {link}",
                self.wanted_by_link
            ),
            Choice::ConfiguredParallel => write!(
                text,
                " as configured (at least 2); the model wants {} because {link}",
                self.wanted_by_link
            ),
            Choice::OneStreamFillsLink => write!(text, " because {link}"),
            Choice::MaxStreamsIsOne => write!(
                text,
                " because max_streams is 1, although the model wants {} because {link}",
                self.wanted_by_link
            ),
            Choice::TooFewUnits => write!(
                text,
                " because there is only {} to send; {link}",
                counted(self.unit_count, "work unit")
            ),
            Choice::ShortTransfer => write!(
                text,
                " because one stream finishes in {}, under the {} ({} RTTs) that extra streams \
                 need to ramp up; {link}",
                crate::units::approx_duration(secs_to_duration(self.single_stream_secs)),
                crate::units::approx_duration(self.single_stream_budget),
                SINGLE_STREAM_MAX_RTTS
            ),
            Choice::FillLink => write!(text, " to fill the link, because {link}"),
        };
        if self.mode == StreamMode::Parallel && self.initial_streams < self.wanted_by_link {
            let _ = if self.initial_streams == self.max_streams_setting {
                write!(text, ", capped by max_streams {}", self.max_streams_setting)
            } else {
                write!(text, ", capped by the {} work units", self.unit_count)
            };
        }
        let _ = write!(
            text,
            "; {} ({}) in {} ({} of up to {}, {}); model throughput {}, estimated {}.",
            counted(self.file_count, "file"),
            crate::units::approx_bytes(self.total_bytes),
            counted(self.unit_count, "unit"),
            counted(self.chunk_count, "chunk"),
            crate::units::approx_bytes(self.chunk_size),
            counted(self.unit_count.saturating_sub(self.chunk_count), "pack"),
            crate::units::approx_rate(self.effective_bps),
            crate::units::approx_duration(self.estimated_duration),
        );
        text
    }
}

/// "1 file", "2 files": the rationale is read by people.
fn counted(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// One measured round of a running transfer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundSample {
    /// Streams that were running during the round.
    pub streams: u32,
    /// Bytes delivered during the round, all streams together.
    pub bytes: u64,
    /// Length of the round.
    pub elapsed: Duration,
}

/// A higher stream count must beat the reference throughput by more than this factor to be
/// kept, and a lower count may fall short of it by at most this factor to replace it. Below 5%
/// a difference is indistinguishable from round-to-round noise on a shared link.
const IMPROVEMENT_FACTOR: f64 = 1.05;
/// A drop of more than 10% at the held count is taken as a change of the link, not noise.
const DROP_FACTOR: f64 = 0.90;
/// Rounds at the held count before probing upwards again.
const STABLE_ROUNDS_BEFORE_PROBE: u32 = 5;
/// Weight of a new measurement of the held count in its reference throughput.
const REFERENCE_SMOOTHING: f64 = 0.5;
/// The first step of a climb, a descent or a probe is this fraction of the current count.
/// One stream more changes throughput by only 1/n, under the 5% threshold once n > 20, so a
/// one-stream step could never show an improvement on a wide transfer.
const STEP_DIVISOR: u32 = 8;

/// The count with the reference throughput: the fewest streams found that deliver it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Reference {
    streams: u32,
    bps: f64,
}

/// Where the controller is in its search. Each phase determines the count asked for next.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
enum SearchPhase {
    /// Trying `reference + step`; the step doubles after every success, so a poor initial
    /// estimate is corrected in logarithmically many rounds. `too_few` is the largest count
    /// known to fall short, if any.
    Climbing { step: u32, too_few: Option<u32> },
    /// A climb stopped helping at `too_many`; bisecting between the reference and it, in case
    /// the best count lies between.
    RefiningUp { too_many: u32, too_few: Option<u32> },
    /// No lower bound is known yet: trying `reference - step`, doubling the step while the
    /// lower count still delivers the reference throughput.
    Descending { step: u32 },
    /// Bisecting between `too_few` and the reference for the fewest streams that deliver it.
    RefiningDown { too_few: u32 },
    /// Staying at the reference count.
    Holding { stable_rounds: u32 },
    /// Trying `reference + step` once, to notice a link that got better.
    Probing { step: u32 },
}

/// Feedback controller for the number of parallel streams.
///
/// The search looks for the fewest streams that deliver the best throughput found, within 5%:
///
/// 1. Climb: from the first measured count, try more streams with a step that doubles after
///    each success (each success must beat the reference by more than 5%).
/// 2. When a step up fails to help (a plateau, or a drop from too many streams), back off to
///    the best count and bisect the gap above it, because the step may have jumped over the
///    best count.
/// 3. Trim: bisect down towards the largest count known to fall short (or, when none is
///    known, step down with a doubling step until one does), keeping the lowest count whose
///    throughput is within 5% of the reference. This removes the overshoot of the doubling
///    steps, and of a model estimate that was too high.
/// 4. Hold, smoothing the reference with each new measurement of the held count so one lucky
///    round cannot set an unreachable target. After 5 stable rounds, or at once after a drop of
///    more than 10%, probe one step up; if that helps by more than 5%, climb again, otherwise
///    return to the held count.
///
/// Rounds with zero bytes, zero elapsed time, zero streams or more streams than the ceiling
/// carry no usable measurement and are ignored, as are rounds run at a count the controller is
/// not evaluating (the mover lagging behind a change). The count is always in `[1, max]`.
///
/// On a throughput curve that rises to the link capacity and stays there, the search settles
/// on the fewest streams within 5% of the plateau, i.e. close to ceil(capacity / per-stream).
/// On a curve that peaks and then falls (contention past some count), a search that starts
/// above the peak can step over it; it then keeps a count within 5% of the best throughput it
/// measured, which is at worst about 10% below the peak, and later probes can still find it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamController {
    max_streams: u32,
    current: u32,
    reference: Option<Reference>,
    phase: SearchPhase,
}

impl StreamController {
    /// A controller that starts at `initial` streams, clamped to `[1, max]`; a `max` of 0 is
    /// taken as 1.
    pub fn new(initial: u32, max: u32) -> Self {
        let max_streams = max.max(1);
        Self {
            max_streams,
            current: initial.clamp(1, max_streams),
            reference: None,
            phase: SearchPhase::Climbing {
                step: 1,
                too_few: None,
            },
        }
    }

    /// Streams for the next round.
    pub fn streams(&self) -> u32 {
        self.current.clamp(1, self.max_streams.max(1))
    }

    /// The ceiling the controller never exceeds.
    pub fn max_streams(&self) -> u32 {
        self.max_streams.max(1)
    }

    /// The fewest streams known to deliver the reference throughput, once a round was measured.
    pub fn best_streams(&self) -> Option<u32> {
        self.reference.map(|reference| reference.streams)
    }

    /// The reference throughput in bits per second, once a round was measured.
    pub fn best_throughput_bps(&self) -> Option<f64> {
        self.reference.map(|reference| reference.bps)
    }

    /// Takes one measured round into account and returns the streams for the next round.
    pub fn observe(&mut self, sample: RoundSample) -> u32 {
        // A deserialized controller may carry any numbers; repair them before use.
        self.max_streams = self.max_streams.max(1);
        self.current = self.current.clamp(1, self.max_streams);

        let Some(bps) = throughput_bps(&sample) else {
            return self.current;
        };
        let measured = sample.streams;
        if measured == 0 || measured > self.max_streams {
            return self.current;
        }

        let Some(mut reference) = self.reference else {
            self.reference = Some(Reference {
                streams: measured,
                bps,
            });
            self.phase = SearchPhase::Climbing {
                step: first_step(measured),
                too_few: None,
            };
            self.settle();
            return self.current;
        };

        if measured == reference.streams {
            // A new measurement of the reference count: track the link as it drifts.
            let dropped = bps < reference.bps * DROP_FACTOR;
            reference.bps += REFERENCE_SMOOTHING * (bps - reference.bps);
            self.reference = Some(reference);
            if let SearchPhase::Holding { stable_rounds } = self.phase {
                let stable_rounds = stable_rounds.saturating_add(1);
                self.phase = if dropped || stable_rounds >= STABLE_ROUNDS_BEFORE_PROBE {
                    SearchPhase::Probing {
                        step: first_step(reference.streams),
                    }
                } else {
                    SearchPhase::Holding { stable_rounds }
                };
            }
            self.settle();
            return self.current;
        }
        if measured != self.current {
            return self.current;
        }

        let improves = bps > reference.bps * IMPROVEMENT_FACTOR;
        let delivers = bps * IMPROVEMENT_FACTOR >= reference.bps;
        let raise_to = Reference {
            streams: measured,
            bps,
        };
        // Fewer streams that deliver the reference replace its count but keep the higher of the
        // two throughputs, so a chain of slightly worse counts cannot ratchet the target down.
        let lower_to = Reference {
            streams: measured,
            bps: bps.max(reference.bps),
        };
        let previous = reference.streams;
        match self.phase {
            SearchPhase::Climbing { step, too_few } => {
                if improves {
                    self.reference = Some(raise_to);
                    self.phase = SearchPhase::Climbing {
                        step: step.saturating_mul(2),
                        too_few: Some(previous),
                    };
                } else {
                    self.phase = SearchPhase::RefiningUp {
                        too_many: measured,
                        too_few,
                    };
                }
            }
            SearchPhase::RefiningUp { too_many, too_few } => {
                if improves {
                    self.reference = Some(raise_to);
                    self.phase = SearchPhase::RefiningUp {
                        too_many,
                        too_few: Some(previous),
                    };
                } else {
                    self.phase = SearchPhase::RefiningUp {
                        too_many: measured,
                        too_few,
                    };
                }
            }
            SearchPhase::Descending { step } => {
                if delivers {
                    self.reference = Some(lower_to);
                    self.phase = SearchPhase::Descending {
                        step: step.saturating_mul(2),
                    };
                } else {
                    self.phase = SearchPhase::RefiningDown { too_few: measured };
                }
            }
            SearchPhase::RefiningDown { .. } if delivers => {
                self.reference = Some(lower_to);
            }
            SearchPhase::RefiningDown { .. } => {
                self.phase = SearchPhase::RefiningDown { too_few: measured };
            }
            SearchPhase::Probing { step } => {
                if improves {
                    self.reference = Some(raise_to);
                    self.phase = SearchPhase::Climbing {
                        step: step.saturating_mul(2),
                        too_few: Some(previous),
                    };
                } else {
                    self.phase = SearchPhase::Holding { stable_rounds: 0 };
                }
            }
            // The held count is the reference count, handled above.
            SearchPhase::Holding { .. } => {}
        }
        self.settle();
        self.current
    }

    /// Sets `current` to the count the phase asks for, moving on to the next phase when the
    /// current one has nothing left to try (a bracket closed, or a bound reached).
    fn settle(&mut self) {
        let Some(reference) = self.reference else {
            return;
        };
        let best = reference.streams.clamp(1, self.max_streams);
        // Each transition below moves to a later phase, so a handful of passes always ends.
        for _ in 0..8 {
            let next = match self.phase {
                SearchPhase::Climbing { step, too_few } => {
                    let candidate = best.saturating_add(step).min(self.max_streams);
                    if candidate > best {
                        Some(candidate)
                    } else {
                        self.phase = after_climb(best, too_few);
                        None
                    }
                }
                SearchPhase::RefiningUp { too_many, too_few } => {
                    let candidate = midpoint_between(best, too_many.min(self.max_streams));
                    if candidate.is_none() {
                        self.phase = after_climb(best, too_few);
                    }
                    candidate
                }
                SearchPhase::Descending { step } => {
                    let candidate = best.saturating_sub(step).max(1);
                    if candidate < best {
                        Some(candidate)
                    } else {
                        self.phase = SearchPhase::Holding { stable_rounds: 0 };
                        None
                    }
                }
                SearchPhase::RefiningDown { too_few } => {
                    let candidate = midpoint_between(too_few, best);
                    if candidate.is_none() {
                        self.phase = SearchPhase::Holding { stable_rounds: 0 };
                    }
                    candidate
                }
                SearchPhase::Holding { .. } => Some(best),
                SearchPhase::Probing { step } => {
                    let candidate = best.saturating_add(step).min(self.max_streams);
                    if candidate > best {
                        Some(candidate)
                    } else {
                        // Already at the ceiling: nothing above to probe.
                        self.phase = SearchPhase::Holding { stable_rounds: 0 };
                        Some(best)
                    }
                }
            };
            if let Some(streams) = next {
                self.current = streams.clamp(1, self.max_streams);
                return;
            }
        }
        self.current = best;
    }
}

/// After climbing, trim: bisect down to a known shortfall, or search down for one.
fn after_climb(best: u32, too_few: Option<u32>) -> SearchPhase {
    match too_few {
        Some(too_few) if too_few < best => SearchPhase::RefiningDown { too_few },
        _ => SearchPhase::Descending {
            step: first_step(best),
        },
    }
}

fn first_step(streams: u32) -> u32 {
    (streams / STEP_DIVISOR).max(1)
}

/// A count strictly between `low` and `high`, if there is one.
fn midpoint_between(low: u32, high: u32) -> Option<u32> {
    (high > low.saturating_add(1)).then(|| low + (high - low) / 2)
}

/// Throughput of a round in bits per second, or `None` when the round measured nothing.
fn throughput_bps(sample: &RoundSample) -> Option<f64> {
    let secs = sample.elapsed.as_secs_f64();
    if sample.bytes == 0 || secs <= 0.0 {
        return None;
    }
    let bps = sample.bytes as f64 * 8.0 / secs;
    (bps.is_finite() && bps > 0.0).then_some(bps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * 1024 * 1024;

    fn file(path: &str, size: u64) -> FileSpec {
        FileSpec {
            path: path.to_owned(),
            size,
        }
    }

    fn link(rtt_ms: u64, bandwidth_bps: Option<u64>, loss: f64) -> LinkEstimate {
        LinkEstimate {
            rtt: Duration::from_millis(rtt_ms),
            bandwidth_bps,
            loss,
        }
    }

    fn esc50_files(count: usize, size: u64) -> Vec<FileSpec> {
        (0..count)
            .map(|index| file(&format!("audio/{index}.wav"), size))
            .collect()
    }

    #[test]
    fn chunks_large_files_and_packs_small_ones_exactly() {
        let files = vec![
            file("a", 150 * KIB),
            file("b", 10 * KIB),
            file("c", 0),
            file("d", 60 * KIB),
            file("e", 64 * KIB),
            file("f", 5 * KIB),
        ];
        let settings = TransferSettings {
            chunk_size: 64 * KIB,
            ..TransferSettings::default()
        };
        let plan = plan_transfer(&files, &link(1, None, 0.0), &settings).unwrap();
        let chunk = |offset: u64, len: u64| WorkUnit::Chunk {
            file: 0,
            offset,
            len,
        };
        let pack = |files: Vec<usize>, bytes: u64| WorkUnit::Pack { files, bytes };
        assert_eq!(
            plan.units,
            vec![
                chunk(0, 64 * KIB),
                chunk(64 * KIB, 64 * KIB),
                // Exactly one chunk's worth is packed, not split.
                pack(vec![4], 64 * KIB),
                pack(vec![3], 60 * KIB),
                chunk(128 * KIB, 22 * KIB),
                // The empty file rides along with its neighbour.
                pack(vec![1, 2], 10 * KIB),
                pack(vec![5], 5 * KIB),
            ]
        );
        assert_eq!(plan.total_bytes, 289 * KIB);
        assert_eq!(plan.file_count, 6);
        assert_eq!(plan.chunk_size, 64 * KIB);
    }

    #[test]
    fn only_empty_files_make_one_pack() {
        let files = vec![file("x", 0), file("y", 0)];
        let plan =
            plan_transfer(&files, &link(5, None, 0.0), &TransferSettings::default()).unwrap();
        assert_eq!(
            plan.units,
            vec![WorkUnit::Pack {
                files: vec![0, 1],
                bytes: 0
            }]
        );
        assert_eq!(plan.mode, StreamMode::Single);
        assert_eq!(plan.estimated_duration, Duration::from_millis(10));
    }

    #[test]
    fn no_files_make_an_empty_plan() {
        let plan = plan_transfer(&[], &link(5, None, 0.0), &TransferSettings::default()).unwrap();
        assert!(plan.units.is_empty());
        assert_eq!(plan.total_bytes, 0);
        assert_eq!(plan.initial_streams, 1);
        assert_eq!(plan.estimated_duration, Duration::ZERO);
    }

    #[test]
    fn thousand_small_files_share_few_units() {
        // ESC-50: 2,000 five-second clips of about 432 KiB; the seed study used 1,000 of them.
        let files = esc50_files(1000, 432 * KIB);
        let plan = plan_transfer(
            &files,
            &link(70, Some(200_000_000), 0.001),
            &TransferSettings::default(),
        )
        .unwrap();
        // 18 files of 432 KiB fit in 8 MiB: 55 full packs and one of 10 files.
        assert_eq!(plan.units.len(), 56);
        assert!(plan.units.len() * 10 < files.len());
        assert!(
            plan.units
                .iter()
                .all(|unit| matches!(unit, WorkUnit::Pack { .. }))
        );
        assert_eq!(plan.mode, StreamMode::Parallel);
        assert!(plan.initial_streams as usize <= plan.units.len());
    }

    #[test]
    fn stream_count_does_not_follow_file_count() {
        let lossy_link = link(70, Some(200_000_000), 0.001);
        let settings = TransferSettings {
            max_streams: 64,
            ..TransferSettings::default()
        };
        // The same 421.9 MiB as 1,000 files, 4,000 files, and 4 files.
        let thousand =
            plan_transfer(&esc50_files(1000, 432 * KIB), &lossy_link, &settings).unwrap();
        let four_thousand =
            plan_transfer(&esc50_files(4000, 108 * KIB), &lossy_link, &settings).unwrap();
        let four = plan_transfer(&esc50_files(4, 108_000 * KIB), &lossy_link, &settings).unwrap();
        assert_eq!(thousand.total_bytes, four.total_bytes);
        assert_eq!(four_thousand.total_bytes, four.total_bytes);
        assert_eq!(thousand.initial_streams, four.initial_streams);
        assert_eq!(four_thousand.initial_streams, four.initial_streams);
        assert!(four_thousand.units.len() < 100);

        // When the link wants more streams than there are units, the unit count is the cap,
        // and only then.
        let fast_lossy_link = link(70, Some(10_000_000_000), 0.001);
        let capped =
            plan_transfer(&esc50_files(1000, 432 * KIB), &fast_lossy_link, &settings).unwrap();
        assert_eq!(capped.initial_streams as usize, capped.units.len());
        assert_eq!(capped.max_streams as usize, capped.units.len());
    }

    #[test]
    fn long_lossy_link_goes_parallel_and_fills_it() {
        let files = esc50_files(4, 2 * GIB);
        let lossy_link = link(70, Some(200_000_000), 0.001);
        let settings = TransferSettings {
            max_streams: 64,
            ..TransferSettings::default()
        };
        let plan = plan_transfer(&files, &lossy_link, &settings).unwrap();
        assert_eq!(plan.mode, StreamMode::Parallel);
        // Mathis: 1448 B · 8 / 70 ms · 1.22 / sqrt(0.001) ≈ 6.39 Mbit/s per stream.
        assert!(
            (plan.per_stream_bps - 6.385e6).abs() < 0.01e6,
            "{}",
            plan.per_stream_bps
        );
        assert_eq!(plan.initial_streams, 32);
        assert!(plan.effective_bps >= 0.9 * 200e6);
        assert!(f64::from(plan.initial_streams) * plan.per_stream_bps >= 0.9 * 200e6);
        assert_eq!(plan.max_streams, 64);
        // 8 GiB at 200 Mbit/s is about 344 s, plus 140 ms of handshakes.
        let secs = plan.estimated_duration.as_secs_f64();
        assert!(
            (secs - (8.0 * GIB as f64 * 8.0 / 200e6 + 0.14)).abs() < 0.01,
            "{secs}"
        );
        assert!(
            plan.rationale.contains("loss-limited"),
            "{}",
            plan.rationale
        );
        assert!(plan.rationale.contains("32 streams"), "{}", plan.rationale);

        // With the default ceiling the plan is still parallel, and says what capped it.
        let default_plan =
            plan_transfer(&files, &lossy_link, &TransferSettings::default()).unwrap();
        assert_eq!(default_plan.mode, StreamMode::Parallel);
        assert_eq!(default_plan.initial_streams, 16);
        assert!(default_plan.rationale.contains("capped by max_streams 16"));
    }

    #[test]
    fn short_clean_link_stays_single() {
        let files = esc50_files(4, 2 * GIB);
        for bandwidth in [None, Some(10_000_000_000)] {
            let plan = plan_transfer(
                &files,
                &link(1, bandwidth, 0.0),
                &TransferSettings::default(),
            )
            .unwrap();
            assert_eq!(plan.mode, StreamMode::Single);
            assert_eq!(plan.initial_streams, 1);
            assert_eq!(plan.max_streams, 1);
            assert!(
                plan.rationale.contains("window-limited")
                    || plan.rationale.contains("link-limited")
            );
        }
        let unknown =
            plan_transfer(&files, &link(1, None, 0.0), &TransferSettings::default()).unwrap();
        assert!(
            unknown.rationale.contains("assumed 1 Gbit/s"),
            "{}",
            unknown.rationale
        );
    }

    #[test]
    fn tiny_transfer_on_a_slow_stream_stays_single() {
        // 100 KiB on a lossy long link: one stream needs about 130 ms, less than 4 RTTs.
        let files = vec![file("a", 70 * KIB), file("b", 70 * KIB)];
        let settings = TransferSettings {
            chunk_size: 64 * KIB,
            ..TransferSettings::default()
        };
        let plan = plan_transfer(&files, &link(70, Some(200_000_000), 0.001), &settings).unwrap();
        assert_eq!(plan.mode, StreamMode::Single);
        assert!(plan.rationale.contains("RTTs"), "{}", plan.rationale);
    }

    #[test]
    fn configured_strategies_win_over_the_model() {
        let files = esc50_files(4, 2 * GIB);
        let single = TransferSettings {
            strategy: TransferStrategy::Single,
            ..TransferSettings::default()
        };
        let plan = plan_transfer(&files, &link(70, Some(200_000_000), 0.001), &single).unwrap();
        assert_eq!(plan.mode, StreamMode::Single);
        assert_eq!((plan.initial_streams, plan.max_streams), (1, 1));
        assert!((plan.effective_bps - plan.per_stream_bps).abs() < 1.0);

        let parallel = TransferSettings {
            strategy: TransferStrategy::Parallel,
            ..TransferSettings::default()
        };
        let plan = plan_transfer(&files, &link(1, None, 0.0), &parallel).unwrap();
        assert_eq!(plan.mode, StreamMode::Parallel);
        assert_eq!(plan.initial_streams, 2);
        assert_eq!(plan.max_streams, 16);
    }

    #[test]
    fn rate_limit_caps_capacity() {
        let files = esc50_files(4, 2 * GIB);
        let settings = TransferSettings {
            rate_limit_bps: Some(50_000_000),
            max_streams: 64,
            ..TransferSettings::default()
        };
        let plan = plan_transfer(&files, &link(70, Some(200_000_000), 0.001), &settings).unwrap();
        assert!(plan.effective_bps <= 50e6);
        assert_eq!(plan.initial_streams, 8);
        assert!(plan.rationale.contains("rate limit"), "{}", plan.rationale);
    }

    #[test]
    fn zero_rtt_is_a_tiny_rtt() {
        let plan = plan_transfer(
            &esc50_files(2, GIB),
            &LinkEstimate {
                rtt: Duration::ZERO,
                bandwidth_bps: Some(100_000_000_000),
                loss: 0.0,
            },
            &TransferSettings::default(),
        )
        .unwrap();
        assert!(plan.per_stream_bps.is_finite() && plan.per_stream_bps > 0.0);
        assert!(plan.estimated_duration > Duration::ZERO);
    }

    #[test]
    fn rejects_invalid_inputs() {
        let files = esc50_files(2, MIB);
        let good_link = link(10, None, 0.0);
        let with = |change: fn(&mut TransferSettings)| {
            let mut settings = TransferSettings::default();
            change(&mut settings);
            plan_transfer(&files, &good_link, &settings)
        };
        assert_eq!(
            with(|settings| settings.max_streams = 0),
            Err(TransferPlanError::ZeroMaxStreams)
        );
        assert_eq!(
            with(|settings| settings.chunk_size = 64 * KIB - 1),
            Err(TransferPlanError::ChunkSizeTooSmall {
                chunk_size: 64 * KIB - 1,
                minimum: 64 * KIB
            })
        );
        assert_eq!(
            with(|settings| settings.rate_limit_bps = Some(0)),
            Err(TransferPlanError::ZeroRateLimit)
        );
        for loss in [-0.01, 1.01, f64::INFINITY] {
            assert_eq!(
                plan_transfer(&files, &link(10, None, loss), &TransferSettings::default()),
                Err(TransferPlanError::LossOutOfRange { loss })
            );
        }
        assert!(matches!(
            plan_transfer(&files, &link(10, None, f64::NAN), &TransferSettings::default()),
            Err(TransferPlanError::LossOutOfRange { loss }) if loss.is_nan()
        ));
        assert_eq!(
            plan_transfer(
                &files,
                &link(10, Some(0), 0.0),
                &TransferSettings::default()
            ),
            Err(TransferPlanError::ZeroBandwidth)
        );
        assert_eq!(
            plan_transfer(
                &[file("a", u64::MAX), file("b", 1)],
                &good_link,
                &TransferSettings::default()
            ),
            Err(TransferPlanError::TotalSizeOverflow)
        );
        assert!(matches!(
            plan_transfer(
                &[file("huge", 1 << 50)],
                &good_link,
                &TransferSettings {
                    chunk_size: MIN_CHUNK_SIZE,
                    ..TransferSettings::default()
                }
            ),
            Err(TransferPlanError::TooManyUnits { .. })
        ));
        // A loss of exactly 1 and a zero RTT are legal, if grim.
        assert!(plan_transfer(&files, &link(0, None, 1.0), &TransferSettings::default()).is_ok());
    }

    #[test]
    fn plan_serializes_with_lowercase_tags() {
        let plan = plan_transfer(
            &[file("big", 10 * MIB), file("small", KIB)],
            &link(70, Some(200_000_000), 0.001),
            &TransferSettings::default(),
        )
        .unwrap();
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.contains(r#""kind":"chunk""#), "{json}");
        assert!(json.contains(r#""kind":"pack""#), "{json}");
        let back: TransferPlan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
        let settings: TransferSettings = serde_json::from_str(
            r#"{"strategy":"parallel","max_streams":4,"chunk_size":1048576,"rate_limit_bps":null}"#,
        )
        .unwrap();
        assert_eq!(settings.strategy, TransferStrategy::Parallel);
    }

    /// Runs the controller against a throughput function for `rounds` rounds, returning the
    /// stream counts it chose.
    fn drive(
        controller: &mut StreamController,
        rounds: usize,
        mut throughput_bps: impl FnMut(u32, usize) -> f64,
    ) -> Vec<u32> {
        let mut chosen = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let streams = controller.streams();
            let bytes = bytes_per_second(throughput_bps(streams, round));
            chosen.push(controller.observe(RoundSample {
                streams,
                bytes,
                elapsed: Duration::from_secs(1),
            }));
        }
        chosen
    }

    fn bytes_per_second(bps: f64) -> u64 {
        (bps / 8.0) as u64
    }

    /// The fewest streams whose throughput a 5% improvement threshold cannot tell apart from
    /// the best, and the fewest that reach the best: the controller's target range. Computed
    /// on the whole bytes the controller sees, so borderline cases round the same way.
    fn target_streams(max: u32, throughput: impl Fn(u32) -> f64) -> (u32, u32) {
        let throughput = |n: u32| bytes_per_second(throughput(n)) as f64 * 8.0;
        let best = (1..=max).map(&throughput).fold(0.0, f64::max);
        let fewest = (1..=max)
            .find(|&n| throughput(n) * IMPROVEMENT_FACTOR >= best)
            .unwrap();
        let full = (1..=max).find(|&n| throughput(n) >= best * 0.999).unwrap();
        (fewest, full)
    }

    #[test]
    fn controller_clamps_its_bounds() {
        assert_eq!(StreamController::new(0, 0).streams(), 1);
        assert_eq!(StreamController::new(100, 8).streams(), 8);
        assert_eq!(StreamController::new(3, 8).streams(), 3);
        let mut single = StreamController::new(5, 1);
        for _ in 0..20 {
            assert_eq!(
                single.observe(RoundSample {
                    streams: 1,
                    bytes: 1_000_000,
                    elapsed: Duration::from_secs(1)
                }),
                1
            );
        }
    }

    #[test]
    fn controller_ignores_empty_rounds() {
        let mut controller = StreamController::new(4, 16);
        let before = controller.clone();
        for sample in [
            RoundSample {
                streams: 4,
                bytes: 0,
                elapsed: Duration::from_secs(1),
            },
            RoundSample {
                streams: 4,
                bytes: 1 << 20,
                elapsed: Duration::ZERO,
            },
            RoundSample {
                streams: 0,
                bytes: 1 << 20,
                elapsed: Duration::from_secs(1),
            },
        ] {
            assert_eq!(controller.observe(sample), 4);
        }
        assert_eq!(controller, before);
    }

    #[test]
    fn controller_climbs_then_trims_to_the_link() {
        // 6.4 Mbit/s per stream into 200 Mbit/s: 32 streams fill the link.
        let per_stream = 6.385e6;
        let capacity = 200e6;
        let throughput = |n: u32| (f64::from(n) * per_stream).min(capacity);
        let mut controller = StreamController::new(1, 64);
        let chosen = drive(&mut controller, 40, |n, _| throughput(n));
        let (fewest, full) = target_streams(64, throughput);
        let best = controller.best_streams().unwrap();
        assert!(
            (fewest..=full).contains(&best),
            "{best} not in {fewest}..={full}: {chosen:?}"
        );
        // Reached within 20 rounds and then held, apart from probes.
        assert!(
            chosen[20..].iter().filter(|&&n| n == best).count() >= 15,
            "{chosen:?}"
        );
    }

    #[test]
    fn controller_backs_off_when_more_streams_hurt() {
        // Beyond 12 streams the receiver's disk thrashes and throughput falls.
        let throughput = |n: u32| {
            let n = f64::from(n);
            if n <= 12.0 {
                n * 10e6
            } else {
                120e6 * 12.0 / n
            }
        };
        let mut controller = StreamController::new(4, 64);
        let chosen = drive(&mut controller, 40, |n, _| throughput(n));
        assert_eq!(controller.best_streams(), Some(12), "{chosen:?}");
        assert!(chosen[20..].iter().all(|&n| n <= 13), "{chosen:?}");
    }

    #[test]
    fn controller_trims_an_overestimate() {
        let throughput = |n: u32| (f64::from(n) * 10e6).min(100e6);
        let mut controller = StreamController::new(64, 64);
        let chosen = drive(&mut controller, 40, |n, _| throughput(n));
        assert_eq!(controller.best_streams(), Some(10), "{chosen:?}");
    }

    #[test]
    fn controller_follows_a_link_that_improves() {
        // The capacity doubles at round 30: 10 streams, then 20.
        let mut controller = StreamController::new(1, 64);
        let before = drive(&mut controller, 30, |n, _| (f64::from(n) * 10e6).min(100e6));
        assert_eq!(controller.best_streams(), Some(10), "{before:?}");
        let after = drive(&mut controller, 50, |n, _| (f64::from(n) * 10e6).min(200e6));
        let best = controller.best_streams().unwrap();
        assert!((20..=21).contains(&best), "{best}: {after:?}");
    }

    #[test]
    fn controller_survives_serde() {
        let mut controller = StreamController::new(2, 32);
        drive(&mut controller, 7, |n, _| f64::from(n) * 1e6);
        let json = serde_json::to_string(&controller).unwrap();
        let back: StreamController = serde_json::from_str(&json).unwrap();
        assert_eq!(back, controller);
    }

    fn arbitrary_files() -> impl Strategy<Value = (Vec<FileSpec>, u64)> {
        let chunk_size = prop_oneof![Just(MIN_CHUNK_SIZE), MIN_CHUNK_SIZE..=4 * MIB];
        chunk_size.prop_flat_map(|chunk_size| {
            let size = prop_oneof![
                Just(0_u64),
                0..=chunk_size,
                Just(chunk_size),
                Just(chunk_size + 1),
                0..=5 * chunk_size,
            ];
            (
                proptest::collection::vec(size, 0..40).prop_map(|sizes| {
                    sizes
                        .into_iter()
                        .enumerate()
                        .map(|(index, size)| file(&format!("f{index}"), size))
                        .collect::<Vec<_>>()
                }),
                Just(chunk_size),
            )
        })
    }

    fn arbitrary_link() -> impl Strategy<Value = LinkEstimate> {
        (
            0_u64..500_000,
            proptest::option::of(1_u64..100_000_000_000),
            prop_oneof![Just(0.0), 0.0..=1.0, 1e-6..0.05],
        )
            .prop_map(|(rtt_micros, bandwidth_bps, loss)| LinkEstimate {
                rtt: Duration::from_micros(rtt_micros),
                bandwidth_bps,
                loss,
            })
    }

    fn arbitrary_settings(chunk_size: u64) -> impl Strategy<Value = TransferSettings> {
        (
            prop_oneof![
                Just(TransferStrategy::Auto),
                Just(TransferStrategy::Single),
                Just(TransferStrategy::Parallel)
            ],
            1_u32..=128,
            proptest::option::of(1_u64..10_000_000_000),
        )
            .prop_map(
                move |(strategy, max_streams, rate_limit_bps)| TransferSettings {
                    strategy,
                    max_streams,
                    chunk_size,
                    rate_limit_bps,
                },
            )
    }

    fn arbitrary_problem() -> impl Strategy<Value = (Vec<FileSpec>, LinkEstimate, TransferSettings)>
    {
        (arbitrary_files(), arbitrary_link()).prop_flat_map(|((files, chunk_size), link)| {
            (Just(files), Just(link), arbitrary_settings(chunk_size))
        })
    }

    proptest! {
        #[test]
        fn every_byte_is_covered_once((files, link, settings) in arbitrary_problem()) {
            let plan = plan_transfer(&files, &link, &settings).unwrap();
            let mut chunks_of: Vec<Vec<(u64, u64)>> = vec![Vec::new(); files.len()];
            let mut packed = vec![0_usize; files.len()];
            for unit in &plan.units {
                match unit {
                    WorkUnit::Chunk { file, offset, len } => {
                        prop_assert!(files[*file].size > settings.chunk_size);
                        prop_assert!(*len > 0 && *len <= settings.chunk_size);
                        chunks_of[*file].push((*offset, *len));
                    }
                    WorkUnit::Pack { files: members, bytes } => {
                        prop_assert!(!members.is_empty());
                        prop_assert!(*bytes <= settings.chunk_size);
                        prop_assert_eq!(*bytes, members.iter().map(|&i| files[i].size).sum::<u64>());
                        prop_assert!(members.windows(2).all(|pair| pair[0] < pair[1]));
                        for &member in members {
                            prop_assert!(files[member].size <= settings.chunk_size);
                            packed[member] += 1;
                        }
                    }
                }
            }
            for (index, file) in files.iter().enumerate() {
                if file.size > settings.chunk_size {
                    prop_assert_eq!(packed[index], 0);
                    let mut slices = chunks_of[index].clone();
                    slices.sort_unstable();
                    let mut next = 0;
                    for (offset, len) in slices {
                        prop_assert_eq!(offset, next);
                        next = offset + len;
                    }
                    prop_assert_eq!(next, file.size);
                } else {
                    prop_assert_eq!(packed[index], 1);
                    prop_assert!(chunks_of[index].is_empty());
                }
            }
            prop_assert_eq!(plan.total_bytes, files.iter().map(|f| f.size).sum::<u64>());
            prop_assert_eq!(plan.units.iter().map(WorkUnit::bytes).sum::<u64>(), plan.total_bytes);
            prop_assert!(plan.units.windows(2).all(|pair| largest_first(&pair[0], &pair[1]) == Ordering::Less));
        }

        #[test]
        fn streams_stay_within_bounds((files, link, settings) in arbitrary_problem()) {
            let plan = plan_transfer(&files, &link, &settings).unwrap();
            prop_assert!(plan.initial_streams >= 1);
            prop_assert!(plan.initial_streams <= plan.max_streams);
            prop_assert!(plan.max_streams <= settings.max_streams);
            prop_assert!(plan.initial_streams as usize <= plan.units.len().max(1));
            if plan.mode == StreamMode::Single {
                prop_assert_eq!((plan.initial_streams, plan.max_streams), (1, 1));
            }
            if settings.strategy == TransferStrategy::Single {
                prop_assert_eq!(plan.mode, StreamMode::Single);
            }
            prop_assert!(plan.per_stream_bps > 0.0 && plan.per_stream_bps.is_finite());
            prop_assert!(plan.effective_bps > 0.0 && plan.effective_bps >= plan.per_stream_bps * 0.999_999);
            if let Some(limit) = settings.rate_limit_bps {
                prop_assert!(plan.effective_bps <= limit as f64);
            }
            prop_assert!(!plan.rationale.is_empty());
        }

        #[test]
        fn planning_is_deterministic((files, link, settings) in arbitrary_problem()) {
            let first = plan_transfer(&files, &link, &settings).unwrap();
            let second = plan_transfer(&files, &link, &settings).unwrap();
            prop_assert_eq!(first, second);
        }

        #[test]
        fn controller_converges_near_the_fill_point(
            per_stream_mbps in 1.0_f64..50.0,
            capacity_mbps in 1.0_f64..2000.0,
            knee in proptest::option::of(1_u32..64),
            initial in 1_u32..=64,
            max in 1_u32..=64,
        ) {
            // Linear up to the capacity; past an optional knee, contention costs throughput.
            let throughput = |n: u32| {
                let linear = (f64::from(n) * per_stream_mbps * 1e6).min(capacity_mbps * 1e6);
                match knee {
                    Some(knee) if n > knee => linear * f64::from(knee) / f64::from(n),
                    _ => linear,
                }
            };
            let mut controller = StreamController::new(initial, max);
            let chosen = drive(&mut controller, 60, |n, _| throughput(n));
            let (fewest, full) = target_streams(max, throughput);
            let best = controller.best_streams().unwrap();
            prop_assert!(chosen.iter().all(|&n| (1..=max).contains(&n)));
            prop_assert!(best <= full, "best {} above {}: {:?}", best, full, chosen);
            if knee.is_none() {
                // Monotone: exactly the fewest streams the 5% threshold cannot tell from the
                // best, which is ceil(capacity / per stream) within 5% when that fits.
                prop_assert!(best == fewest, "best {} not {}: {:?}", best, fewest, chosen);
                let fill = (capacity_mbps / per_stream_mbps).ceil().min(f64::from(max));
                prop_assert!(f64::from(best) <= fill && f64::from(best) * IMPROVEMENT_FACTOR >= fill - 1.0);
            } else {
                // A hump: the search may step over the peak from above, but it keeps a count
                // within 5% of a measurement that was itself within 5% of the peak.
                let peak = (1..=max).map(throughput).fold(0.0, f64::max);
                prop_assert!(
                    throughput(best) * IMPROVEMENT_FACTOR * IMPROVEMENT_FACTOR >= peak,
                    "best {} gives {} of {}: {:?}", best, throughput(best), peak, chosen
                );
            }
        }

        #[test]
        fn controller_converges_under_noise(
            per_stream_mbps in 1.0_f64..50.0,
            capacity_mbps in 10.0_f64..2000.0,
            seed in any::<u64>(),
        ) {
            let max = 64;
            let mut state = seed | 1;
            let mut controller = StreamController::new(1, max);
            let clean = |n: u32| (f64::from(n) * per_stream_mbps * 1e6).min(capacity_mbps * 1e6);
            drive(&mut controller, 80, |n, _| {
                // xorshift: ±2% multiplicative noise, reproducible from the seed.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let noise = (state % 4001) as f64 / 100_000.0 - 0.02;
                clean(n) * (1.0 + noise)
            });
            let fill = (capacity_mbps / per_stream_mbps).ceil().min(f64::from(max));
            let best = f64::from(controller.best_streams().unwrap());
            prop_assert!(best >= (fill * 0.85).floor() && best <= (fill * 1.15).ceil(), "best {} fill {}", best, fill);
        }

        #[test]
        fn controller_never_leaves_its_bounds(
            initial in 0_u32..300,
            max in 0_u32..300,
            samples in proptest::collection::vec(
                (any::<bool>(), 0_u32..400, any::<u64>(), 0_u64..10_000_000_000),
                0..200,
            ),
        ) {
            let mut controller = StreamController::new(initial, max);
            let ceiling = max.max(1);
            prop_assert!((1..=ceiling).contains(&controller.streams()));
            for (follows, other_streams, bytes, nanos) in samples {
                // Half the rounds run what the controller asked for, so its search advances.
                let streams = if follows { controller.streams() } else { other_streams };
                let next = controller.observe(RoundSample {
                    streams,
                    bytes,
                    elapsed: Duration::from_nanos(nanos),
                });
                prop_assert!((1..=ceiling).contains(&next));
                prop_assert_eq!(next, controller.streams());
                if let Some(bps) = controller.best_throughput_bps() {
                    prop_assert!(bps.is_finite() && bps > 0.0);
                }
            }
        }
    }
}
