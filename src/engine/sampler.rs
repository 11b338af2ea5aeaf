//! Seeded sampling: greedy, temperature, top-k, top-p and repeat penalty.
//!
//! The same seed and the same logits always give the same tokens, so tests
//! and evaluations are reproducible.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 1.0 disables the repeat penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }

    /// Errand's conversational default: mild sampling with a fixed seed.
    pub fn chat(seed: u64) -> Self {
        Self {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!("repeat_penalty must be > 0, got {}", self.repeat_penalty));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            scratch: Vec::new(),
        }
    }

    /// Picks the next token. `history` is every token so far (prompt and
    /// reply); only its tail feeds the repeat penalty. Returns `None` when
    /// every logit is -inf (nothing can be sampled).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Option<u32> {
        let p = self.params;
        if p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            let (best, v) = logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc });
            return (v > f32::NEG_INFINITY).then_some(best as u32);
        }
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| (i as u32, v / p.temperature)),
        );
        if c.is_empty() {
            return None;
        }
        // Highest first; ties broken by id so the order is deterministic.
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit);
        let max = c[0].1;
        let mut total = 0f32;
        for e in c.iter_mut() {
            e.1 = (e.1 - max).exp();
            total += e.1;
        }
        if p.top_p < 1.0 {
            let mut acc = 0f32;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                acc += e.1 / total;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|e| e.1).sum();
        }
        let mut r = self.rng.random::<f32>() * total;
        for e in c.iter() {
            r -= e.1;
            if r <= 0.0 {
                return Some(e.0);
            }
        }
        c.last().map(|e| e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..200).map(|i| ((i * 37 % 101) as f32) / 10.0).collect()
    }

    fn run(params: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params);
        let mut hist = Vec::new();
        for _ in 0..n {
            let t = s.sample(&mut logits(), &hist).unwrap();
            hist.push(t);
        }
        hist
    }

    #[test]
    fn greedy_is_argmax() {
        let l = logits();
        let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let best = l.iter().position(|&v| v == max).unwrap() as u32;
        assert_eq!(run(SamplingParams::greedy(), 3), vec![best; 3]);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let a = run(SamplingParams::chat(7), 50);
        let b = run(SamplingParams::chat(7), 50);
        let c = run(SamplingParams::chat(8), 50);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_limits_choices() {
        let mut p = SamplingParams::chat(1);
        p.top_k = 1;
        p.repeat_penalty = 1.0;
        assert_eq!(run(p, 5), run(SamplingParams::greedy(), 5));
        let mut p = SamplingParams::chat(3);
        p.top_k = 0;
        p.top_p = 0.05;
        p.temperature = 0.5;
        p.repeat_penalty = 1.0;
        // The top entries are 10.0 (several ids); a small top_p keeps only the best one.
        let toks = run(p, 20);
        let l = logits();
        assert!(toks.iter().all(|&t| l[t as usize] >= 9.9), "{toks:?}");
    }

    #[test]
    fn repeat_penalty_moves_greedy_off_a_repeated_token() {
        let mut l = vec![0.0f32; 10];
        l[3] = 2.0;
        l[4] = 1.9;
        let mut p = SamplingParams::greedy();
        p.repeat_penalty = 1.5;
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut l.clone(), &[3]), Some(4));
        assert_eq!(s.sample(&mut l.clone(), &[]), Some(3));
    }

    #[test]
    fn all_masked_gives_none_and_bad_params_are_rejected() {
        let mut l = vec![f32::NEG_INFINITY; 4];
        assert_eq!(Sampler::new(SamplingParams::chat(1)).sample(&mut l, &[]), None);
        let mut p = SamplingParams::greedy();
        p.top_p = 0.0;
        assert!(p.validate().is_err());
    }
}
