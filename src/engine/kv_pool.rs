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
        self.evict_until(self.budget_bytes, Some(session));
    }

    /// Evicts least recently used sessions until the pool holds at most
    /// `bytes` (running requests' caches take precedence over idle ones).
    pub fn shrink_to(&mut self, bytes: usize) {
        self.evict_until(bytes, None);
    }

    fn evict_until(&mut self, bytes: usize, spare: Option<&str>) {
        while self.bytes() > bytes {
            let oldest = self
                .entries
                .iter()
                .filter(|(k, _)| Some(k.as_str()) != spare)
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

    /// For a session with no cache of its own: a copy of the longest prefix
    /// of `tokens` that another session's cache holds (the system prompt and
    /// tool list are the same for every conversation), if it is at least
    /// `min_len` tokens long.
    ///
    /// The prefix is cut to a multiple of `align` (the prefill chunk): those
    /// positions were computed in the same chunks a fresh prefill would use,
    /// so the result is bit-for-bit what the session would have computed
    /// itself, and greedy replies do not depend on which session came first.
    pub fn shared_prefix(&self, tokens: &[u32], min_len: usize, align: usize) -> Option<(KvCache, Vec<u32>)> {
        let align = align.max(1);
        let (n, e) = self
            .entries
            .values()
            .map(|e| {
                let n = common_prefix(&e.tokens, tokens).min(e.cache.len());
                (n / align * align, e)
            })
            .max_by_key(|(n, _)| *n)?;
        if n < min_len.max(1) {
            return None;
        }
        let cache = e.cache.copy_prefix(n).ok()?;
        Some((cache, tokens[..n].to_vec()))
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
    fn shrinking_for_running_requests_evicts_the_oldest_first() {
        let m = tiny_model("llama", 5);
        let mk = || {
            let mut c = m.new_cache();
            m.forward(&[1u32; 10], &mut c).unwrap();
            c
        };
        let one = mk().bytes();
        let mut pool = KvPool::new(usize::MAX);
        for s in ["a", "b", "c"] {
            pool.checkin(s, mk(), vec![1; 10]);
        }
        pool.shrink_to(one * 2);
        assert!(!pool.contains("a") && pool.contains("b") && pool.contains("c"));
        pool.shrink_to(0);
        assert_eq!(pool.sessions(), 0);
        assert_eq!(pool.evictions, 3);
    }

    #[test]
    fn a_new_session_starts_from_another_sessions_prefix() {
        let m = tiny_model("llama", 5);
        let mut pool = KvPool::new(usize::MAX);
        let a: Vec<u32> = (1..=40).collect();
        let mut c = m.new_cache();
        let full = m.forward(&a, &mut c).unwrap();
        pool.checkin("a", c, a.clone());
        // Same first 30 tokens, then different.
        let mut b: Vec<u32> = (1..=30).collect();
        b.extend([7, 7, 7]);
        let (mut shared, toks) = pool.shared_prefix(&b, 8, 1).unwrap();
        assert_eq!(toks.len(), 30);
        assert_eq!(pool.shared_prefix(&b, 8, 16).unwrap().1.len(), 16, "cut to whole chunks");
        assert!(pool.contains("a"), "the donor keeps its cache");
        let via_shared = m.forward(&b[30..], &mut shared).unwrap();
        let mut fresh = m.new_cache();
        let direct = m.forward(&b, &mut fresh).unwrap();
        let diff = via_shared.iter().zip(&direct).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "logits differ by {diff}");
        assert!(pool.shared_prefix(&[9, 9, 9], 8, 1).is_none());
        let _ = full;
    }

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[5, 6], &[5, 6]), 2);
    }
}
