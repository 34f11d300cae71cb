//! Sets and indexes keyed by user id for the large in-memory joins: a flat array over the ids'
//! range where the ids are dense (the serial keys most hosts have), else a hash table.
//!
//! Why: at 10M users the joins look up tens of millions of rows in sets of millions of ids. A
//! hash table that size misses the cache on every lookup and costs ~17 bytes an entry; a bitmap
//! over a dense range is a bit an id and a `u32` array 4 bytes a slot, and the scans come in
//! about id order, so their lookups walk the array. Ids spread thinly over their range (random
//! or time-based keys, a shard's eighth) keep the hash table.

use crate::program::{Fast, FastSet};

/// Whether `len` ids over `[min, max]` fill their range well enough for an array of
/// `bits_per_slot` bits a slot: at most `budget_bits` bits per id (plus a small floor).
fn dense_span(
    min: i64,
    max: i64,
    len: usize,
    bits_per_slot: u64,
    budget_bits: u64,
) -> Option<usize> {
    let span = (max as i128 - min as i128 + 1) as u128;
    let budget = (len as u128) * budget_bits as u128 + 65_536;
    (span * bits_per_slot as u128 <= budget && span <= usize::MAX as u128 / 2)
        .then_some(span as usize)
}

fn bounds(ids: impl Iterator<Item = i64> + Clone) -> Option<(i64, i64)> {
    ids.clone().min().zip(ids.max())
}

/// A set of user ids.
#[derive(Debug, Clone)]
pub enum IdSet {
    /// Bit `id - min` of `bits`.
    Dense {
        min: i64,
        bits: Vec<u64>,
    },
    Sparse(FastSet<i64>),
}

impl IdSet {
    pub fn new(ids: &[i64]) -> IdSet {
        // A bit a slot, at most 128 bits an id: about a hash set's size (8 bytes a key, a
        // control byte, at most 7/8 full).
        let dense = bounds(ids.iter().copied())
            .and_then(|(min, max)| Some((min, dense_span(min, max, ids.len(), 1, 128)?)));
        match dense {
            Some((min, span)) => {
                let mut bits = vec![0u64; span.div_ceil(64)];
                for &id in ids {
                    let k = (id - min) as usize;
                    bits[k / 64] |= 1 << (k % 64);
                }
                IdSet::Dense { min, bits }
            }
            None => IdSet::Sparse(ids.iter().copied().collect()),
        }
    }

    #[inline]
    pub fn contains(&self, id: i64) -> bool {
        match self {
            IdSet::Dense { min, bits } => {
                // Wrapping: an id below `min` becomes a huge offset, out of range.
                let k = id.wrapping_sub(*min) as u64;
                usize::try_from(k / 64)
                    .ok()
                    .and_then(|w| bits.get(w))
                    .is_some_and(|w| id >= *min && w & (1 << (k % 64)) != 0)
            }
            IdSet::Sparse(s) => s.contains(&id),
        }
    }

    pub fn is_dense(&self) -> bool {
        matches!(self, IdSet::Dense { .. })
    }
}

/// The ids that occur more than once, sorted, each once. Over a dense range one pass over a
/// bitmap (at most a quarter of the ids' own size) finds them; otherwise one sort of the ids.
/// The snapshot checks its referred users and subscriptions so (4M and 7M at 10M users), after
/// its last scan.
pub fn repeated(mut ids: Vec<i64>) -> Vec<i64> {
    let dense = bounds(ids.iter().copied())
        .and_then(|(min, max)| Some((min, dense_span(min, max, ids.len(), 1, 16)?)));
    let mut out: Vec<i64> = Vec::new();
    match dense {
        Some((min, span)) => {
            let mut seen = vec![0u64; span.div_ceil(64)];
            for &id in &ids {
                let k = (id - min) as usize;
                let (word, bit) = (&mut seen[k / 64], 1u64 << (k % 64));
                if *word & bit != 0 {
                    out.push(id);
                }
                *word |= bit;
            }
            out.sort_unstable();
            out.dedup();
        }
        None => {
            ids.sort_unstable();
            for w in ids.windows(2) {
                if w[0] == w[1] && out.last() != Some(&w[0]) {
                    out.push(w[0]);
                }
            }
        }
    }
    out
}

/// Each user id's position in the list it was built from (the last one for a repeated id).
#[derive(Debug, Clone)]
pub struct IdIndex {
    map: Positions,
    /// The list's length.
    len: usize,
    /// Whether an id is at more than one position.
    repeated: bool,
}

#[derive(Debug, Clone)]
enum Positions {
    /// Slot `id - min` of `slots` holds the position, `u32::MAX` for none.
    Dense {
        min: i64,
        slots: Vec<u32>,
    },
    Sparse(Fast<i64, usize>),
}

const NONE: u32 = u32::MAX;

impl IdIndex {
    pub fn new(ids: &[i64]) -> IdIndex {
        IdIndex::of(ids, |&id| id)
    }

    /// Each item's position by its id.
    pub fn of<T>(items: &[T], id: impl Fn(&T) -> i64) -> IdIndex {
        let ids = items.iter().map(&id);
        // 32 bits a slot, at most 128 bits an id: about a hash map's size at its fullest.
        let dense = bounds(ids.clone())
            .filter(|_| items.len() < NONE as usize)
            .and_then(|(min, max)| Some((min, dense_span(min, max, items.len(), 32, 128)?)));
        let mut repeated = false;
        let map = match dense {
            Some((min, span)) => {
                let mut slots = vec![NONE; span];
                for (i, id) in ids.enumerate() {
                    let slot = &mut slots[(id - min) as usize];
                    repeated |= *slot != NONE;
                    *slot = i as u32;
                }
                Positions::Dense { min, slots }
            }
            None => {
                let mut map = Fast::with_capacity_and_hasher(items.len(), Default::default());
                for (i, id) in ids.enumerate() {
                    repeated |= map.insert(id, i).is_some();
                }
                Positions::Sparse(map)
            }
        };
        IdIndex {
            map,
            len: items.len(),
            repeated,
        }
    }

    #[inline]
    pub fn get(&self, id: i64) -> Option<usize> {
        match &self.map {
            Positions::Dense { min, slots } => {
                if id < *min {
                    return None;
                }
                let k = id.wrapping_sub(*min) as u64;
                match slots.get(usize::try_from(k).ok()?) {
                    Some(&i) if i != NONE => Some(i as usize),
                    _ => None,
                }
            }
            Positions::Sparse(m) => m.get(&id).copied(),
        }
    }

    #[inline]
    pub fn contains(&self, id: i64) -> bool {
        self.get(id).is_some()
    }

    /// The length of the list the index was built from.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// For values kept by position beside the list (`ids`: the list's ids, in order), filled in
    /// at the position [`IdIndex::get`] gives: copies each repeated id's value to its other
    /// positions. Nothing to do, and no pass, without a repeated id.
    pub fn spread<T: Copy>(&self, ids: impl Iterator<Item = i64>, values: &mut [T]) {
        if !self.repeated {
            return;
        }
        for (i, id) in ids.enumerate() {
            match self.get(id) {
                Some(j) if j != i => values[i] = values[j],
                _ => {}
            }
        }
    }

    pub fn is_dense(&self) -> bool {
        matches!(self.map, Positions::Dense { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dense_and_sparse_by_how_the_ids_fill_their_range() {
        let serial: Vec<i64> = (1..=100_000).collect();
        assert!(IdSet::new(&serial).is_dense());
        assert!(IdIndex::new(&serial).is_dense());
        // One id in ten: a bitmap is still smaller than a hash set, an array of positions not.
        let tenth: Vec<i64> = (1..=1_000_000).step_by(10).collect();
        assert!(IdSet::new(&tenth).is_dense());
        assert!(!IdIndex::new(&tenth).is_dense());
        // A few ids spread over all of i64: a hash table (an array would not fit).
        let spread = [i64::MIN, -5, 0, 7, i64::MAX];
        assert!(!IdSet::new(&spread).is_dense());
        assert!(!IdIndex::new(&spread).is_dense());
        assert!(!IdSet::new(&[]).contains(0));
        assert_eq!(IdIndex::new(&[]).get(0), None);
    }

    #[test]
    fn dense_ranges_at_the_ends_of_i64() {
        // An id from the other end wraps to a small offset: it must not alias a set bit.
        for ids in [[i64::MAX - 1, i64::MAX], [i64::MIN, i64::MIN + 1]] {
            let (set, index) = (IdSet::new(&ids), IdIndex::new(&ids));
            assert!(set.is_dense() && index.is_dense());
            for id in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX] {
                let want = ids.iter().position(|&x| x == id);
                assert_eq!(set.contains(id), want.is_some(), "{id}");
                assert_eq!(index.get(id), want, "{id}");
            }
        }
    }

    #[test]
    fn edges_of_a_dense_range() {
        let ids = [-3, 0, 64, 65, 200];
        let (set, index) = (IdSet::new(&ids), IdIndex::new(&ids));
        assert!(set.is_dense() && index.is_dense());
        for id in [i64::MIN, -4, -2, 1, 63, 66, 199, 201, 256, i64::MAX] {
            assert!(!set.contains(id), "{id}");
            assert_eq!(index.get(id), None, "{id}");
        }
        for (i, id) in ids.iter().enumerate() {
            assert!(set.contains(*id));
            assert_eq!(index.get(*id), Some(i));
        }
    }

    proptest! {
        // Both forms answer as a hash map built from the same ids would.
        #[test]
        fn same_answers_as_a_hash_map(
            ids in prop::collection::vec(prop_oneof![-50i64..50, any::<i64>()], 0..60),
            probes in prop::collection::vec(prop_oneof![-60i64..60, any::<i64>()], 0..60),
        ) {
            let map: std::collections::HashMap<i64, usize> =
                ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
            let (set, index) = (IdSet::new(&ids), IdIndex::new(&ids));
            for id in probes.iter().chain(&ids) {
                prop_assert_eq!(set.contains(*id), map.contains_key(id));
                prop_assert_eq!(index.get(*id), map.get(id).copied());
            }
        }

        // The bitmap pass (ids in a small range) and the sort (ids over all of i64) agree
        // with counting.
        #[test]
        fn repeated_ids_are_those_counted_twice(
            ids in prop::collection::vec(prop_oneof![-50i64..50, any::<i64>()], 0..80),
        ) {
            let mut counts = std::collections::BTreeMap::<i64, usize>::new();
            for id in &ids {
                *counts.entry(*id).or_default() += 1;
            }
            let want: Vec<i64> = counts.into_iter().filter(|(_, n)| *n > 1).map(|(id, _)| id).collect();
            prop_assert_eq!(repeated(ids), want);
        }
    }

    #[test]
    fn repeated_over_a_dense_range_and_a_sparse_one() {
        let mut dense: Vec<i64> = (1..=100_000).collect();
        dense.extend([7, 99_999, 7]);
        let mut sparse = vec![i64::MIN, 0, i64::MAX, 0, i64::MIN];
        assert_eq!(repeated(dense), vec![7, 99_999]);
        assert_eq!(repeated(std::mem::take(&mut sparse)), vec![i64::MIN, 0]);
        assert_eq!(repeated(vec![]), Vec::<i64>::new());
    }
}
