//! The per-direction link model: decides, for each packet offered at an instant, whether it is
//! delivered and when, or why it is dropped. Pure (no I/O, time is passed in), so its arithmetic
//! is unit-tested exactly.
//!
//! Data model: a [`Shaper`] holds the [`Link`] it emulates, the instant the bottleneck finishes
//! serialising what it already accepted (`busy_until`), the arrival instant of the last packet it
//! scheduled (so it never reorders), whether the link is cut, and the loss draw generator.
//!
//! Order of operations for one packet, mirroring a router feeding a lossy wire:
//! 1. a cut link drops it;
//! 2. with a rate cap, it joins a drop-tail FIFO: dropped if the bytes still waiting
//!    (`busy_until - now`, converted at the rate) plus its own exceed the queue limit, otherwise
//!    it leaves the bottleneck when the packets ahead of it and its own serialisation are done;
//! 3. it is lost on the wire with probability `loss` (it has used its share of the link);
//! 4. it arrives one propagation `delay` after leaving, but never before the packet ahead of it
//!    (lowering the delay at runtime must not reorder packets already in flight).

use std::time::{Duration, Instant};

use crate::link::Link;

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand the packet to the receiving interface at this instant.
    DeliverAt(Instant),
    /// The packet never arrives.
    Drop(DropReason),
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// The link is cut.
    Cut,
    /// The bottleneck queue was full.
    QueueFull,
    /// Random wire loss.
    Loss,
}

/// SplitMix64: tiny, fast, good enough for Bernoulli loss draws, and fully determined by its seed.
#[derive(Debug, Clone)]
struct LossDraws {
    state: u64,
}

impl LossDraws {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A uniform draw in `[0, 1)` with 53 bits of precision.
    fn next_unit(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1_u64 << 53) as f64
    }
}

/// One direction of an emulated link.
#[derive(Debug, Clone)]
pub(crate) struct Shaper {
    link: Link,
    queue_limit_bytes: Option<u64>,
    draws: LossDraws,
    busy_until: Option<Instant>,
    last_arrival: Option<Instant>,
    cut: bool,
}

/// Time to serialise `bytes` at `rate_bps`, rounded to the nearest nanosecond.
fn serialization_time(bytes: usize, rate_bps: u64) -> Duration {
    let bits = u128::try_from(bytes).unwrap_or(u128::MAX).saturating_mul(8);
    let rate = u128::from(rate_bps.max(1));
    let nanos = bits.saturating_mul(1_000_000_000).saturating_add(rate / 2) / rate;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Bytes a bottleneck at `rate_bps` sends in `time` (rounded down).
fn bytes_in(time: Duration, rate_bps: u64) -> u64 {
    let bytes = time.as_nanos().saturating_mul(u128::from(rate_bps)) / 8 / 1_000_000_000;
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

impl Shaper {
    /// A shaper for `link`, assumed already validated.
    pub(crate) fn new(link: Link) -> Self {
        Self {
            link,
            queue_limit_bytes: link.queue_limit_bytes(),
            draws: LossDraws::new(link.seed),
            busy_until: None,
            last_arrival: None,
            cut: false,
        }
    }

    /// The link being emulated.
    pub(crate) fn link(&self) -> Link {
        self.link
    }

    /// Applies new parameters to packets offered from now on. Packets already scheduled keep
    /// their arrival time; the loss draws restart from the new seed so a run is reproducible
    /// from its configuration alone.
    pub(crate) fn reconfigure(&mut self, link: Link) {
        self.link = link;
        self.queue_limit_bytes = link.queue_limit_bytes();
        self.draws = LossDraws::new(link.seed);
        if link.rate_bps.is_none() {
            self.busy_until = None;
        }
    }

    /// Cuts (`true`) or restores (`false`) the link.
    pub(crate) fn set_cut(&mut self, cut: bool) {
        self.cut = cut;
        if cut {
            // The bottleneck queue empties into the void when the link goes down.
            self.busy_until = None;
        }
    }

    /// Whether the link is cut.
    pub(crate) fn is_cut(&self) -> bool {
        self.cut
    }

    /// Decides the fate of a packet of `bytes` bytes offered at `now`.
    pub(crate) fn offer(&mut self, now: Instant, bytes: usize) -> Verdict {
        if self.cut {
            return Verdict::Drop(DropReason::Cut);
        }
        let departure = match self.link.rate_bps {
            None => now,
            Some(rate_bps) => {
                let start = self.busy_until.map_or(now, |busy| busy.max(now));
                let waiting_bytes = bytes_in(start.saturating_duration_since(now), rate_bps);
                let bytes_u64 = u64::try_from(bytes).unwrap_or(u64::MAX);
                if let Some(limit) = self.queue_limit_bytes
                    && waiting_bytes.saturating_add(bytes_u64) > limit
                {
                    return Verdict::Drop(DropReason::QueueFull);
                }
                let departure = start + serialization_time(bytes, rate_bps);
                self.busy_until = Some(departure);
                departure
            }
        };
        if self.link.loss > 0.0 && self.draws.next_unit() < self.link.loss {
            return Verdict::Drop(DropReason::Loss);
        }
        let arrival = departure + self.link.delay;
        let arrival = self.last_arrival.map_or(arrival, |last| last.max(arrival));
        self.last_arrival = Some(arrival);
        Verdict::DeliverAt(arrival)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn delay_only_link_delivers_after_the_delay() {
        let start = Instant::now();
        let mut shaper = Shaper::new(Link::delayed(ms(20)));
        assert_eq!(
            shaper.offer(start, 1500),
            Verdict::DeliverAt(start + ms(20))
        );
        assert_eq!(
            shaper.offer(start + ms(1), 60),
            Verdict::DeliverAt(start + ms(21))
        );
    }

    #[test]
    fn rate_cap_serialises_back_to_back_packets() {
        let start = Instant::now();
        // 12 Mbit/s: a 1500-byte packet takes exactly 1 ms on the wire.
        let mut shaper = Shaper::new(Link::delayed(ms(5)).with_rate_bps(12_000_000));
        for index in 0..10_u64 {
            assert_eq!(
                shaper.offer(start, 1500),
                Verdict::DeliverAt(start + ms(5) + ms(index + 1)),
                "packet {index} waits for the ones ahead of it"
            );
        }
        // After the burst drains, a new packet only pays its own serialisation.
        let later = start + ms(100);
        assert_eq!(shaper.offer(later, 1500), Verdict::DeliverAt(later + ms(6)));
    }

    #[test]
    fn full_queue_drops_the_tail_and_recovers_as_it_drains() {
        let start = Instant::now();
        let link = Link::ideal()
            .with_rate_bps(12_000_000)
            .with_queue_bytes(4 * 1500);
        let mut shaper = Shaper::new(link);
        let verdicts: Vec<Verdict> = (0..6).map(|_| shaper.offer(start, 1500)).collect();
        assert!(
            verdicts[..4]
                .iter()
                .all(|v| matches!(v, Verdict::DeliverAt(_)))
        );
        assert_eq!(verdicts[4], Verdict::Drop(DropReason::QueueFull));
        assert_eq!(verdicts[5], Verdict::Drop(DropReason::QueueFull));
        // 1 ms later one packet has left: room for exactly one more.
        assert_eq!(
            shaper.offer(start + ms(1), 1500),
            Verdict::DeliverAt(start + ms(5))
        );
        assert_eq!(
            shaper.offer(start + ms(1), 1500),
            Verdict::Drop(DropReason::QueueFull)
        );
    }

    #[test]
    fn loss_is_reproducible_from_the_seed_and_close_to_the_setting() {
        let start = Instant::now();
        let link = Link::ideal().with_loss(0.01).with_seed(42);
        let pattern = |link: Link| -> Vec<bool> {
            let mut shaper = Shaper::new(link);
            (0..100_000)
                .map(|_| shaper.offer(start, 100) == Verdict::Drop(DropReason::Loss))
                .collect()
        };
        let first = pattern(link);
        assert_eq!(first, pattern(link), "same seed, same drops");
        assert_ne!(
            first,
            pattern(link.with_seed(43)),
            "another seed, other drops"
        );
        let lost = first.iter().filter(|&&lost| lost).count();
        // 100k draws at p = 0.01: mean 1000, sd ~31.5; this band is > 6 sd wide, and the draws
        // are deterministic anyway, so this cannot flake.
        assert!((800..=1200).contains(&lost), "lost {lost} of 100000");
    }

    #[test]
    fn total_loss_and_cut_drop_everything_and_restore_heals() {
        let start = Instant::now();
        let mut lossy = Shaper::new(Link::ideal().with_loss(1.0));
        assert!((0..1000).all(|_| lossy.offer(start, 100) == Verdict::Drop(DropReason::Loss)));

        let mut shaper = Shaper::new(Link::delayed(ms(1)));
        shaper.set_cut(true);
        assert_eq!(shaper.offer(start, 100), Verdict::Drop(DropReason::Cut));
        shaper.set_cut(false);
        assert_eq!(shaper.offer(start, 100), Verdict::DeliverAt(start + ms(1)));
    }

    #[test]
    fn lowering_the_delay_never_reorders_packets_in_flight() {
        let start = Instant::now();
        let mut shaper = Shaper::new(Link::delayed(ms(50)));
        assert_eq!(shaper.offer(start, 100), Verdict::DeliverAt(start + ms(50)));
        shaper.reconfigure(Link::delayed(ms(10)));
        assert_eq!(
            shaper.offer(start + ms(1), 100),
            Verdict::DeliverAt(start + ms(50)),
            "held behind the packet ahead"
        );
        assert_eq!(
            shaper.offer(start + ms(45), 100),
            Verdict::DeliverAt(start + ms(55))
        );
    }

    #[test]
    fn serialization_time_rounds_to_nanoseconds() {
        assert_eq!(
            serialization_time(1500, 200_000_000),
            Duration::from_micros(60)
        );
        assert_eq!(
            serialization_time(1, 3),
            Duration::from_nanos(2_666_666_667)
        );
        assert_eq!(bytes_in(ms(8), 1_000_000), 1000);
    }
}
