//! Which stored checkpoint a migration restores from when its source cannot take a fresh one.
//!
//! The rule: the newest **verified** checkpoint (by the time it was taken) that has not
//! already failed to restore; among the copies of it, the target's own (nothing to send),
//! then the holder nearest the target by measured round trip, holders never measured last,
//! ties by node name. The dead source's own copies are never used: it cannot send.

use std::cmp::Reverse;

use jiff::Timestamp;

use super::port::CheckpointCopy;
use super::run::RestoreSource;

/// The checkpoint to restore from, or `None` when no verified copy survives (the workload
/// then starts fresh). `rejected` are checkpoints that failed to restore; `older_than`, when
/// set, keeps only checkpoints taken before it (the restore-failure retry).
pub fn choose_checkpoint(
    copies: &[CheckpointCopy],
    source: &str,
    target: &str,
    rejected: &[String],
    older_than: Option<Timestamp>,
) -> Option<RestoreSource> {
    let usable = |copy: &&CheckpointCopy| {
        copy.verified
            && copy.node != source
            && !rejected.contains(&copy.id)
            && older_than.is_none_or(|limit| copy.taken_at < limit)
    };
    // Newest first; the id breaks a tie in time so the choice never depends on list order.
    let newest = copies
        .iter()
        .filter(usable)
        .max_by_key(|copy| (copy.taken_at, Reverse(copy.id.as_str())))?;
    let holder = copies
        .iter()
        .filter(usable)
        .filter(|copy| copy.id == newest.id)
        .min_by_key(|copy| {
            (
                copy.node != target,
                copy.rtt_to_target.is_none(),
                copy.rtt_to_target,
                copy.node.as_str(),
            )
        })?;
    Some(RestoreSource {
        id: holder.id.clone(),
        from: holder.node.clone(),
    })
}

/// When checkpoint `id` was taken, per the copies seen.
pub(crate) fn taken_at(copies: &[CheckpointCopy], id: &str) -> Option<Timestamp> {
    copies
        .iter()
        .find(|copy| copy.id == id)
        .map(|copy| copy.taken_at)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn copy(id: &str, at: i64, node: &str, verified: bool, rtt_ms: Option<u64>) -> CheckpointCopy {
        CheckpointCopy {
            id: id.into(),
            taken_at: Timestamp::from_second(1_800_000_000 + at).unwrap(),
            node: node.into(),
            verified,
            rtt_to_target: rtt_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn newest_verified_then_target_then_nearest() {
        let copies = [
            copy("new-unverified", 30, "t", false, None),
            copy("mid", 20, "far", true, Some(80)),
            copy("mid", 20, "near", true, Some(5)),
            copy("mid", 20, "unmeasured", true, None),
            copy("old", 10, "t", true, None),
            copy("src", 40, "s", true, Some(1)),
        ];
        let chosen = choose_checkpoint(&copies, "s", "t", &[], None).unwrap();
        assert_eq!((chosen.id.as_str(), chosen.from.as_str()), ("mid", "near"));
        let with_target = [copies.as_slice(), &[copy("mid", 20, "t", true, None)]].concat();
        let chosen = choose_checkpoint(&with_target, "s", "t", &[], None).unwrap();
        assert_eq!(chosen.from, "t", "the target's own copy needs no transfer");
        let retry = choose_checkpoint(&copies, "s", "t", &["mid".into()], None).unwrap();
        assert_eq!(retry.id, "old");
        assert!(
            choose_checkpoint(&copies, "s", "t", &["mid".into(), "old".into()], None).is_none()
        );
    }
}
