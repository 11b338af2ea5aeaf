//! Results and their summary: pass^k, tables by domain and language,
//! reason codes, latency and tokens. Rendering is in [`super::render`].

use super::score::{Code, Failure, Transcript};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One run of one dialogue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialResult {
    pub id: String,
    /// From 1.
    pub trial: usize,
    pub lang: String,
    pub domain: String,
    pub tags: Vec<String>,
    pub simulated: bool,
    pub passed: bool,
    pub failures: Vec<Failure>,
    pub wall_ms: f64,
    /// How a simulated user ended: `done`, `gave_up` or `max_turns`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sim_end: Option<String>,
    pub transcript: Transcript,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub key: String,
    pub dialogues: usize,
    pub runs: usize,
    /// pass^1 … pass^k over this row's dialogues.
    pub pass_hat: Vec<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub turn_p50_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub turns: usize,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p90_ms: Option<f64>,
    pub turn_p50_ms: Option<f64>,
    pub turn_p90_ms: Option<f64>,
    pub turn_max_ms: Option<f64>,
    /// Every turn's (ttft, total), for the charts.
    pub samples: Vec<(Option<f64>, f64)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Tokens {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub dialogues: usize,
    pub runs: usize,
    pub passed_runs: usize,
    /// pass^1 … pass^trials: the chance that k runs of a dialogue all pass,
    /// averaged over dialogues (τ-bench's estimator: C(c, k) / C(n, k)).
    pub pass_hat: Vec<f64>,
    pub by_domain: Vec<Row>,
    pub by_lang: Vec<Row>,
    /// Each reason code with the number of runs that had it.
    pub codes: Vec<(Code, usize)>,
    pub latency: Latency,
    pub tokens: Tokens,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub errand_version: String,
    pub model: String,
    pub server: String,
    pub started: String,
    pub wall_s: f64,
    pub trials: usize,
    pub temperature: f32,
    pub paths: Vec<String>,
    pub summary: Summary,
    pub results: Vec<TrialResult>,
}

/// C(n, k) as a float (small n).
fn choose(n: usize, k: usize) -> f64 {
    if k > n {
        return 0.0;
    }
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// pass^k for k = 1..=max_k over the given results (grouped by dialogue id).
pub fn pass_hat(results: &[&TrialResult], max_k: usize) -> Vec<f64> {
    let mut by_id: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for r in results {
        let e = by_id.entry(r.id.as_str()).or_default();
        e.0 += 1;
        e.1 += r.passed as usize;
    }
    (1..=max_k)
        .map(|k| {
            let vals: Vec<f64> = by_id.values().filter(|(n, _)| *n >= k).map(|(n, c)| choose(*c, k) / choose(*n, k)).collect();
            if vals.is_empty() {
                0.0
            } else {
                vals.iter().sum::<f64>() / vals.len() as f64
            }
        })
        .collect()
}

fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    Some(v[i])
}

fn row(key: &str, rs: &[&TrialResult], max_k: usize) -> Row {
    let mut ids: Vec<&str> = rs.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    let turns = rs.iter().flat_map(|r| r.transcript.turns.iter());
    let mut ttft: Vec<f64> = turns.clone().filter_map(|t| t.ttft_ms).collect();
    let mut total: Vec<f64> = turns.filter(|t| t.input_id.is_some()).map(|t| t.latency_ms).collect();
    Row {
        key: key.into(),
        dialogues: ids.len(),
        runs: rs.len(),
        pass_hat: pass_hat(rs, max_k),
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        turn_p50_ms: percentile(&mut total, 0.5),
    }
}

pub fn summarize(results: &[TrialResult], trials: usize) -> Summary {
    let all: Vec<&TrialResult> = results.iter().collect();
    let group = |f: &dyn Fn(&TrialResult) -> String| -> Vec<Row> {
        let mut m: BTreeMap<String, Vec<&TrialResult>> = BTreeMap::new();
        for r in results {
            m.entry(f(r)).or_default().push(r);
        }
        m.iter().map(|(k, v)| row(k, v, trials)).collect()
    };
    let mut codes: BTreeMap<Code, usize> = BTreeMap::new();
    for r in results {
        let mut seen: Vec<Code> = r.failures.iter().map(|f| f.code).collect();
        seen.sort();
        seen.dedup();
        for c in seen {
            *codes.entry(c).or_default() += 1;
        }
    }
    let turns: Vec<_> = results.iter().flat_map(|r| r.transcript.turns.iter()).filter(|t| t.input_id.is_some()).collect();
    let mut ttft: Vec<f64> = turns.iter().filter_map(|t| t.ttft_ms).collect();
    let mut total: Vec<f64> = turns.iter().map(|t| t.latency_ms).collect();
    let latency = Latency {
        turns: turns.len(),
        ttft_p50_ms: percentile(&mut ttft, 0.5),
        ttft_p90_ms: percentile(&mut ttft, 0.9),
        turn_p50_ms: percentile(&mut total, 0.5),
        turn_p90_ms: percentile(&mut total, 0.9),
        turn_max_ms: total.last().copied(),
        samples: turns.iter().map(|t| (t.ttft_ms, t.latency_ms)).collect(),
    };
    let tokens = Tokens {
        prompt: turns.iter().map(|t| t.prompt_tokens).sum(),
        cached: turns.iter().map(|t| t.cached_tokens).sum(),
        completion: turns.iter().map(|t| t.completion_tokens).sum(),
    };
    let mut ids: Vec<&str> = results.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    Summary {
        dialogues: ids.len(),
        runs: results.len(),
        passed_runs: results.iter().filter(|r| r.passed).count(),
        pass_hat: pass_hat(&all, trials),
        by_domain: group(&|r| r.domain.clone()),
        by_lang: group(&|r| r.lang.clone()),
        codes: codes.into_iter().collect(),
        latency,
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, passed: bool) -> TrialResult {
        TrialResult {
            id: id.into(),
            trial: 1,
            lang: "en".into(),
            domain: "food".into(),
            tags: vec![],
            simulated: false,
            passed,
            failures: if passed { vec![] } else { vec![Failure::new(Code::NoCall, Some(0), "x")] },
            wall_ms: 1.0,
            sim_end: None,
            transcript: Transcript::default(),
        }
    }

    #[test]
    fn pass_hat_follows_the_tau_bench_estimator() {
        // a: 3 of 3, b: 2 of 3, c: 0 of 3.
        let rs = [r("a", true), r("a", true), r("a", true), r("b", true), r("b", false), r("b", true), r("c", false), r("c", false), r("c", false)];
        let refs: Vec<&TrialResult> = rs.iter().collect();
        let p = pass_hat(&refs, 3);
        // k=1: (1 + 2/3 + 0) / 3; k=2: (1 + 1/3 + 0) / 3; k=3: (1 + 0 + 0) / 3.
        assert!((p[0] - (1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-9);
        assert!((p[1] - (1.0 + 1.0 / 3.0) / 3.0).abs() < 1e-9);
        assert!((p[2] - 1.0 / 3.0).abs() < 1e-9);
        let s = summarize(&rs, 3);
        assert_eq!((s.dialogues, s.runs, s.passed_runs), (3, 9, 5));
        assert_eq!(s.codes, vec![(Code::NoCall, 4)]);
        assert_eq!(s.by_domain.len(), 1);
    }
}
