//! A set of piece numbers, as a bitmap: what a receiver holds, what a sender still owes.
//! Converted to and from the run-length ranges the wire carries.

use crate::wire::PieceRange;

/// Pieces `0..len`, each present or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceSet {
    words: Vec<u64>,
    len: u64,
    present: u64,
}

impl PieceSet {
    /// No piece of `len`.
    pub fn empty(len: u64) -> Self {
        let words = usize::try_from(len.div_ceil(64)).unwrap_or(0);
        Self {
            words: vec![0; words],
            len,
            present: 0,
        }
    }

    /// Every piece of `len`.
    pub fn full(len: u64) -> Self {
        let mut set = Self::empty(len);
        set.insert_range(0..len);
        set
    }

    /// Number of pieces the set ranges over.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it ranges over no piece.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pieces present.
    pub fn count(&self) -> u64 {
        self.present
    }

    /// Whether every piece is present.
    pub fn is_full(&self) -> bool {
        self.present == self.len
    }

    /// Whether `piece` is present; pieces past the end are not.
    pub fn contains(&self, piece: u64) -> bool {
        let Some(word) = usize::try_from(piece / 64)
            .ok()
            .and_then(|w| self.words.get(w))
        else {
            return false;
        };
        piece < self.len && word & (1 << (piece % 64)) != 0
    }

    /// Adds `piece`; returns whether it was new. Pieces past the end are ignored.
    pub fn insert(&mut self, piece: u64) -> bool {
        if piece >= self.len {
            return false;
        }
        let Some(word) = usize::try_from(piece / 64)
            .ok()
            .and_then(|w| self.words.get_mut(w))
        else {
            return false;
        };
        let bit = 1 << (piece % 64);
        let new = *word & bit == 0;
        *word |= bit;
        if new {
            self.present += 1;
        }
        new
    }

    /// Removes `piece`; returns whether it was present.
    pub fn remove(&mut self, piece: u64) -> bool {
        if !self.contains(piece) {
            return false;
        }
        if let Some(word) = usize::try_from(piece / 64)
            .ok()
            .and_then(|w| self.words.get_mut(w))
        {
            *word &= !(1 << (piece % 64));
            self.present -= 1;
        }
        true
    }

    /// Adds every piece of `range` (clipped to the set).
    pub fn insert_range(&mut self, range: std::ops::Range<u64>) {
        for piece in range.start..range.end.min(self.len) {
            self.insert(piece);
        }
    }

    /// Adds wire ranges; returns false (adding nothing more) at the first range that reaches
    /// past the end, which a correct peer never sends.
    pub fn insert_wire_ranges(&mut self, ranges: &[PieceRange]) -> bool {
        for range in ranges {
            let Some(end) = range.start.checked_add(range.count) else {
                return false;
            };
            if end > self.len {
                return false;
            }
            self.insert_range(range.start..end);
        }
        true
    }

    /// Present pieces as maximal runs.
    pub fn ranges(&self) -> Vec<PieceRange> {
        let mut ranges = Vec::new();
        let mut run: Option<PieceRange> = None;
        for piece in self.iter() {
            match &mut run {
                Some(open) if open.start + open.count == piece => open.count += 1,
                _ => {
                    if let Some(done) = run.take() {
                        ranges.push(done);
                    }
                    run = Some(PieceRange {
                        start: piece,
                        count: 1,
                    });
                }
            }
        }
        ranges.extend(run);
        ranges
    }

    /// Present pieces in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(move |(index, &word)| {
                let base = index as u64 * 64;
                (0..64)
                    .filter(move |bit| word & (1 << bit) != 0)
                    .map(move |bit| base + bit)
            })
    }

    /// Pieces of `0..len` not in this set.
    pub fn complement(&self) -> Self {
        let mut missing = Self::empty(self.len);
        for piece in 0..self.len {
            if !self.contains(piece) {
                missing.insert(piece);
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_round_trip(len in 0_u64..300, members in proptest::collection::vec(0_u64..300, 0..100)) {
            let mut set = PieceSet::empty(len);
            for piece in &members {
                set.insert(*piece);
            }
            let mut again = PieceSet::empty(len);
            prop_assert!(again.insert_wire_ranges(&set.ranges()));
            prop_assert_eq!(&again, &set);
            prop_assert_eq!(set.count(), members.iter().filter(|&&p| p < len).collect::<std::collections::BTreeSet<_>>().len() as u64);
            let complement = set.complement();
            prop_assert_eq!(complement.count() + set.count(), len);
            for piece in 0..len {
                prop_assert_ne!(complement.contains(piece), set.contains(piece));
            }
        }
    }

    #[test]
    fn ranges_past_the_end_are_refused() {
        let mut set = PieceSet::empty(10);
        assert!(!set.insert_wire_ranges(&[PieceRange { start: 5, count: 6 }]));
        assert!(!set.insert_wire_ranges(&[PieceRange {
            start: u64::MAX,
            count: 2
        }]));
        assert_eq!(set.count(), 0);
        assert!(!set.contains(10) && !set.insert(10) && !set.remove(3));
    }
}
