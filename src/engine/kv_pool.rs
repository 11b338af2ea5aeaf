//! Per-session KV caches under one memory budget, evicted least recently
//! used first.
//!
//! A session's cache is checked out for a request and checked back in with
//! the tokens it now holds; the next request for that session reuses the
//! longest common prefix of its prompt with those tokens.

use crate::model::KvCache;
use std::collections::HashMap;

pub struct Entry {
    pub cache: KvCache,
    /// The tokens whose keys and values the cache holds, in order.
    pub tokens: Vec<u32>,
    last_used: u64,
}

pub struct KvPool {
    entries: HashMap<String, Entry>,
    budget_bytes: usize,
    clock: u64,
    pub evictions: u64,
}

impl KvPool {
    pub fn new(budget_bytes: usize) -> Self {
        Self { entries: HashMap::new(), budget_bytes, clock: 0, evictions: 0 }
    }

    /// Takes the session's cache out of the pool (or `None` if it has none).
    pub fn checkout(&mut self, session: &str) -> Option<(KvCache, Vec<u32>)> {
        self.entries.remove(session).map(|e| (e.cache, e.tokens))
    }

    /// Returns a cache to the pool, then evicts the least recently used
    /// sessions until the pool fits its budget. A single cache larger than
    /// the whole budget is not kept.
    pub fn checkin(&mut self, session: &str, cache: KvCache, tokens: Vec<u32>) {
        self.clock += 1;
        if cache.bytes() > self.budget_bytes {
            self.evictions += 1;
            return;
        }
        self.entries.insert(session.to_owned(), Entry { cache, tokens, last_used: self.clock });
        while self.bytes() > self.budget_bytes {
            let oldest = self
                .entries
                .iter()
                .filter(|(k, _)| k.as_str() != session)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.entries.remove(&k);
                    self.evictions += 1;
                }
                None => break,
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.cache.bytes()).sum()
    }

    pub fn sessions(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, session: &str) -> bool {
        self.entries.contains_key(session)
    }
}

/// Length of the common prefix of two token sequences.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny_model;

    #[test]
    fn lru_eviction_keeps_the_pool_inside_its_budget() {
        let m = tiny_model("llama", 5);
        let mk = |n: usize| {
            let mut c = m.new_cache();
            m.forward(&vec![1u32; n], &mut c).unwrap();
            c
        };
        let one = mk(10).bytes();
        let mut pool = KvPool::new(one * 2 + one / 2);
        pool.checkin("a", mk(10), vec![1; 10]);
        pool.checkin("b", mk(10), vec![1; 10]);
        // Touch "a" so that "b" is the least recently used.
        let (c, t) = pool.checkout("a").unwrap();
        pool.checkin("a", c, t);
        pool.checkin("c", mk(10), vec![1; 10]);
        assert!(pool.contains("a") && pool.contains("c") && !pool.contains("b"));
        assert!(pool.bytes() <= one * 2 + one / 2);
        assert_eq!(pool.evictions, 1);
    }

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[5, 6], &[5, 6]), 2);
    }
}
