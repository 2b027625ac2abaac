//! A timer table: at most one deadline per key, earliest first.
//!
//! Keys are ordered, and ties on the deadline break by key, so expiry order is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

#[derive(Debug)]
pub(crate) struct Timers<K: Ord + Copy> {
    by_key: BTreeMap<K, Instant>,
    by_time: BTreeSet<(Instant, K)>,
}

impl<K: Ord + Copy> Timers<K> {
    pub(crate) fn new() -> Self {
        Self {
            by_key: BTreeMap::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Sets (or moves) the deadline of `key`.
    pub(crate) fn set(&mut self, key: K, at: Instant) {
        if let Some(old) = self.by_key.insert(key, at) {
            self.by_time.remove(&(old, key));
        }
        self.by_time.insert((at, key));
    }

    pub(crate) fn cancel(&mut self, key: K) {
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, key));
        }
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Removes and returns one key whose deadline is at or before `now`.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<K> {
        let (at, key) = *self.by_time.first()?;
        if at > now {
            return None;
        }
        self.by_time.pop_first();
        self.by_key.remove(&key);
        Some(key)
    }

    /// Whether `key` has a deadline.
    #[cfg(any(test, feature = "invariants"))]
    pub(crate) fn is_set(&self, key: K) -> bool {
        self.by_key.contains_key(&key)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.by_key.len(), self.by_time.len());
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn earliest_first_and_moves_replace() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Timers::new();
        t.set(2u32, t0 + ms(20));
        t.set(1, t0 + ms(30));
        t.set(3, t0 + ms(20));
        t.set(1, t0 + ms(10)); // moved earlier
        assert_eq!(t.len(), 3);
        assert_eq!(t.next(), Some(t0 + ms(10)));
        assert_eq!(t.pop_expired(t0 + ms(5)), None);
        assert_eq!(t.pop_expired(t0 + ms(25)), Some(1));
        assert_eq!(t.pop_expired(t0 + ms(25)), Some(2)); // tie broken by key
        t.cancel(3);
        assert_eq!(t.pop_expired(t0 + ms(25)), None);
        assert_eq!(t.next(), None);
    }
}
