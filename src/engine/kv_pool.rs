//! Per-session KV caches under one memory budget, evicted least recently
//! used first.
//!
//! A session's cache is checked out for a request and checked back in with
//! the tokens it now holds; the next request for that session reuses the
//! longest common prefix of its prompt with those tokens.
//!
//! A session seen for the first time starts from another session's cache
//! where that gives exactly the bits it would compute itself: prompts are
//! prefilled in canonical chunks ([`next_boundary`]), which end at the end
//! of the first message (the system prompt with the tool list) and at every
//! [`PREFILL_CHUNK`] before and after it, and a prefix is shared only up to
//! such a boundary that both prompts have, computed by the donor in the
//! same chunks from position 0 ([`Chunking`]). Greedy replies therefore do
//! not depend on which session came first, while every conversation with
//! the same system prompt and tools skips computing them.

use crate::model::{KvCache, PREFILL_CHUNK};
use std::collections::HashMap;

/// How a cache's positions were computed, for sharing them exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chunking {
    /// Where the prompt's first message ends (a chunk boundary), if known.
    pub segment: Option<usize>,
    /// Positions below this were prefilled in the canonical chunks of
    /// `segment` from position 0 (later ones: decode steps, follow-ups).
    pub exact: usize,
}

/// The end of the canonical prefill chunk that starts at or covers `pos`:
/// the next multiple of [`PREFILL_CHUNK`] before `segment`, then `segment`,
/// then every `PREFILL_CHUNK` after it.
pub fn next_boundary(segment: Option<usize>, pos: usize) -> usize {
    let aligned = (pos / PREFILL_CHUNK + 1) * PREFILL_CHUNK;
    match segment {
        Some(s) if pos < s => aligned.min(s),
        Some(s) => s + ((pos - s) / PREFILL_CHUNK + 1) * PREFILL_CHUNK,
        None => aligned,
    }
}

/// The canonical chunk boundaries in `1..=upto`.
fn boundaries(segment: Option<usize>, upto: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        pos = next_boundary(segment, pos);
        if pos > upto {
            return out;
        }
        out.push(pos);
    }
}

/// Whether the first `len` positions of a cache computed as `donor` are
/// exactly what a prompt with first-message end `segment` computes itself:
/// `len` is a boundary of both, and their boundaries below it agree.
pub fn shares_exactly(donor: Chunking, segment: Option<usize>, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    if len > donor.exact {
        return false;
    }
    let mine = boundaries(segment, len);
    mine.last() == Some(&len) && mine == boundaries(donor.segment, len)
}

pub struct Entry {
    pub cache: KvCache,
    /// The tokens whose keys and values the cache holds, in order.
    pub tokens: Vec<u32>,
    pub chunking: Chunking,
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
    pub fn checkout(&mut self, session: &str) -> Option<(KvCache, Vec<u32>, Chunking)> {
        self.entries.remove(session).map(|e| (e.cache, e.tokens, e.chunking))
    }

    /// Returns a cache to the pool, then evicts the least recently used
    /// sessions until the pool fits its budget. A single cache larger than
    /// the whole budget is not kept.
    pub fn checkin(&mut self, session: &str, cache: KvCache, tokens: Vec<u32>, chunking: Chunking) {
        self.clock += 1;
        if cache.bytes() > self.budget_bytes {
            self.evictions += 1;
            return;
        }
        self.entries.insert(session.to_owned(), Entry { cache, tokens, chunking, last_used: self.clock });
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
    /// of `tokens` (whose first message ends at `segment`) that another
    /// session's cache holds exactly (see the module docs), if it is at
    /// least `min_len` tokens long; with the chunking the copy carries.
    pub fn shared_prefix(&self, tokens: &[u32], min_len: usize, segment: Option<usize>) -> Option<(KvCache, Vec<u32>, Chunking)> {
        let (n, e) = self
            .entries
            .values()
            .filter_map(|e| {
                // Never the whole prompt: its last token must run to give
                // logits, and it has to run in its own canonical chunk.
                let most = common_prefix(&e.tokens, tokens).min(e.cache.len()).min(e.chunking.exact).min(tokens.len().saturating_sub(1));
                let n = boundaries(segment, most).into_iter().rev().find(|&b| shares_exactly(e.chunking, segment, b))?;
                Some((n, e))
            })
            .max_by_key(|(n, _)| *n)?;
        if n < min_len.max(1) {
            return None;
        }
        let cache = e.cache.copy_prefix(n).ok()?;
        Some((cache, tokens[..n].to_vec(), Chunking { segment, exact: n }))
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
        pool.checkin("a", mk(10), vec![1; 10], Chunking::default());
        pool.checkin("b", mk(10), vec![1; 10], Chunking::default());
        // Touch "a" so that "b" is the least recently used.
        let (c, t, ch) = pool.checkout("a").unwrap();
        pool.checkin("a", c, t, ch);
        pool.checkin("c", mk(10), vec![1; 10], Chunking::default());
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
            pool.checkin(s, mk(), vec![1; 10], Chunking::default());
        }
        pool.shrink_to(one * 2);
        assert!(!pool.contains("a") && pool.contains("b") && pool.contains("c"));
        pool.shrink_to(0);
        assert_eq!(pool.sessions(), 0);
        assert_eq!(pool.evictions, 3);
    }

    #[test]
    fn a_new_session_starts_exactly_from_another_sessions_first_message() {
        let m = tiny_model("llama", 5);
        // Prefill in the canonical chunks of a first message ending at 30.
        let canonical = |toks: &[u32], seg: usize| {
            let mut c = m.new_cache();
            m.forward(&toks[..seg], &mut c).unwrap();
            let logits = m.forward(&toks[seg..], &mut c).unwrap();
            (c, logits)
        };
        let mut pool = KvPool::new(usize::MAX);
        let a: Vec<u32> = (1..=40).collect();
        let (c, _) = canonical(&a, 30);
        pool.checkin("a", c, a.clone(), Chunking { segment: Some(30), exact: 40 });
        // Same first message (30 tokens), then a different one.
        let mut b: Vec<u32> = (1..=30).collect();
        b.extend([7, 7, 7]);
        let (mut shared, toks, ch) = pool.shared_prefix(&b, 8, Some(30)).unwrap();
        assert_eq!(toks.len(), 30);
        assert_eq!(ch, Chunking { segment: Some(30), exact: 30 });
        assert!(pool.contains("a"), "the donor keeps its cache");
        let via_shared = m.forward(&b[30..], &mut shared).unwrap();
        let (_, direct) = canonical(&b, 30);
        assert_eq!(via_shared, direct, "sharing must give the bits of computing alone");
        // A prompt whose first message ends elsewhere, or is not known, was
        // never chunked like the donor: nothing is shared.
        assert!(pool.shared_prefix(&b, 8, Some(20)).is_none());
        assert!(pool.shared_prefix(&b, 8, None).is_none());
        // Nor beyond what the donor computed canonically, nor below min_len.
        pool.checkin("a", canonical(&a, 30).0, a.clone(), Chunking { segment: Some(30), exact: 25 });
        assert!(pool.shared_prefix(&b, 8, Some(30)).is_none());
        pool.checkin("a", canonical(&a, 30).0, a.clone(), Chunking { segment: Some(30), exact: 40 });
        assert!(pool.shared_prefix(&b, 31, Some(30)).is_none());
        assert!(pool.shared_prefix(&[9, 9, 9], 1, Some(1)).is_none());
        // The whole of a donor's prompt again: the last token's chunk
        // [30, 40) is computed, not just the last token.
        let (_, toks, _) = pool.shared_prefix(&a, 8, Some(30)).unwrap();
        assert_eq!(toks.len(), 30);
    }

    #[test]
    fn canonical_chunks_end_at_the_first_message_and_every_chunk() {
        let c = PREFILL_CHUNK;
        assert_eq!(next_boundary(None, 0), c);
        assert_eq!(next_boundary(None, c + 3), 2 * c);
        assert_eq!(next_boundary(Some(c + 88), 0), c);
        assert_eq!(next_boundary(Some(c + 88), c), c + 88);
        assert_eq!(next_boundary(Some(c + 88), c + 88), 2 * c + 88);
        assert_eq!(next_boundary(Some(30), 31), 30 + c);
        assert_eq!(boundaries(Some(c + 88), 2 * c + 88), vec![c, c + 88, 2 * c + 88]);
        // The donor's 512 is a boundary for both, 600 only for one of them.
        let donor = Chunking { segment: Some(c + 88), exact: 4 * c };
        assert!(shares_exactly(donor, Some(c + 200), c));
        assert!(!shares_exactly(donor, Some(c + 200), c + 88));
        assert!(shares_exactly(donor, Some(c + 88), c + 88));
        assert!(shares_exactly(donor, None, 0));
    }

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[5, 6], &[5, 6]), 2);
    }
}
