//! What one direction of an emulated link does to the packets that cross it.
//!
//! Data model: a [`Link`] is plain configuration (one-way propagation delay, random loss
//! probability, optional rate cap with its bottleneck queue, and the seed of the loss draws).
//! It is `Copy` and validated with [`Link::validate`]; the relay turns each directed pair of nodes
//! into a `Shaper` (see `shaper.rs`) built from one of these.
//!
//! Queue sizing: a rate-capped link models a bottleneck router with a drop-tail FIFO. Unless
//! [`Link::queue_bytes`] is set, the queue holds one bandwidth-delay product, computed with the
//! round trip this link would have if the reverse direction had the same delay
//! (`rate × 2 × delay`), and never less than [`MIN_QUEUE_BYTES`] (64 full-size packets). One BDP
//! is the classic rule for keeping a single Reno/CUBIC flow at full utilisation after a
//! multiplicative decrease while adding at most one RTT of queueing delay; the floor keeps links
//! with almost no delay from dropping a burst of a dozen packets.

use std::time::Duration;

/// Largest IPv4 packet the relay forwards; also the MTU of the emulated interfaces.
pub const MTU_BYTES: u16 = 1500;

/// The smallest default bottleneck queue: 64 packets of [`MTU_BYTES`].
pub const MIN_QUEUE_BYTES: u64 = 64 * MTU_BYTES as u64;

/// Parameters of one direction of an emulated link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// One-way propagation delay added to every packet.
    pub delay: Duration,
    /// Probability in `[0, 1]` that a packet is lost on the wire (independent draws).
    pub loss: f64,
    /// Bottleneck rate in bits per second of IP packet bytes; `None` means unlimited.
    pub rate_bps: Option<u64>,
    /// Bottleneck queue limit in bytes; `None` picks one BDP (see the module header).
    /// Ignored when `rate_bps` is `None` (no bottleneck, no queue).
    pub queue_bytes: Option<u64>,
    /// Seed of the loss draws: the same seed drops the same packet indices.
    pub seed: u64,
}

/// Why a [`Link`] was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LinkError {
    /// `loss` is not a probability.
    #[error("loss must be a probability in [0, 1], got {0}")]
    LossOutOfRange(f64),
    /// `rate_bps` is `Some(0)`: a link that carries nothing should be cut instead.
    #[error("rate cap must be positive (use cut() for a link that carries nothing)")]
    ZeroRate,
    /// The queue cannot hold even one full-size packet, so every packet would be dropped.
    #[error("queue of {bytes} bytes cannot hold one {MTU_BYTES}-byte packet")]
    QueueTooSmall {
        /// The configured queue size.
        bytes: u64,
    },
}

impl Default for Link {
    fn default() -> Self {
        Self::ideal()
    }
}

impl Link {
    /// No delay, no loss, no rate cap.
    #[must_use]
    pub const fn ideal() -> Self {
        Self {
            delay: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_bytes: None,
            seed: 0,
        }
    }

    /// An otherwise ideal link with this one-way delay.
    #[must_use]
    pub const fn delayed(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::ideal()
        }
    }

    /// The same link with this loss probability.
    #[must_use]
    pub const fn with_loss(self, loss: f64) -> Self {
        Self { loss, ..self }
    }

    /// The same link with this rate cap in bits per second.
    #[must_use]
    pub const fn with_rate_bps(self, rate_bps: u64) -> Self {
        Self {
            rate_bps: Some(rate_bps),
            ..self
        }
    }

    /// The same link with an explicit bottleneck queue size in bytes.
    #[must_use]
    pub const fn with_queue_bytes(self, queue_bytes: u64) -> Self {
        Self {
            queue_bytes: Some(queue_bytes),
            ..self
        }
    }

    /// The same link with this loss seed.
    #[must_use]
    pub const fn with_seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    /// Checks that the parameters describe a link that can exist.
    pub fn validate(&self) -> Result<(), LinkError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(LinkError::LossOutOfRange(self.loss));
        }
        if self.rate_bps == Some(0) {
            return Err(LinkError::ZeroRate);
        }
        if let Some(bytes) = self.queue_bytes
            && bytes < u64::from(MTU_BYTES)
        {
            return Err(LinkError::QueueTooSmall { bytes });
        }
        Ok(())
    }

    /// The bottleneck queue limit in bytes, or `None` when the link has no rate cap.
    #[must_use]
    pub fn queue_limit_bytes(&self) -> Option<u64> {
        let rate_bps = self.rate_bps?;
        if let Some(bytes) = self.queue_bytes {
            return Some(bytes);
        }
        let round_trip_ns = self.delay.as_nanos().saturating_mul(2);
        let bdp_bytes = u128::from(rate_bps).saturating_mul(round_trip_ns) / 8 / 1_000_000_000;
        let bdp_bytes = u64::try_from(bdp_bytes).unwrap_or(u64::MAX);
        Some(bdp_bytes.max(MIN_QUEUE_BYTES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_queue_is_one_round_trip_bdp_with_a_floor() {
        // 200 Mbit/s, 35 ms one way: 70 ms round trip, BDP = 200e6 * 0.070 / 8 = 1_750_000 bytes.
        let link = Link::delayed(Duration::from_millis(35)).with_rate_bps(200_000_000);
        assert_eq!(link.queue_limit_bytes(), Some(1_750_000));
        // A link with no delay still queues 64 full packets.
        let fast = Link::ideal().with_rate_bps(50_000_000);
        assert_eq!(fast.queue_limit_bytes(), Some(MIN_QUEUE_BYTES));
        assert_eq!(
            Link::delayed(Duration::from_millis(5)).queue_limit_bytes(),
            None
        );
        assert_eq!(
            fast.with_queue_bytes(3000).queue_limit_bytes(),
            Some(3000),
            "an explicit size wins"
        );
    }

    #[test]
    fn validation_rejects_impossible_links() {
        assert_eq!(
            Link::ideal().with_loss(1.5).validate(),
            Err(LinkError::LossOutOfRange(1.5))
        );
        assert!(Link::ideal().with_loss(f64::NAN).validate().is_err());
        assert_eq!(
            Link::ideal().with_rate_bps(0).validate(),
            Err(LinkError::ZeroRate)
        );
        assert_eq!(
            Link::ideal()
                .with_rate_bps(1_000_000)
                .with_queue_bytes(100)
                .validate(),
            Err(LinkError::QueueTooSmall { bytes: 100 })
        );
        assert_eq!(Link::ideal().with_loss(1.0).validate(), Ok(()));
    }
}
