//! Tests on a tiny random model built in code: cache reuse must give the same
//! logits as recomputing from scratch.

use super::*;
use candle_core::quantized::GgmlDType;

/// A random 2-layer model with GQA (4 query heads, 2 KV heads).
pub(crate) fn tiny_model(arch: &str, seed: u64) -> Transformer {
    tiny_model_in(arch, seed, GgmlDType::F32)
}

/// The same model with its matrices stored as `dtype` (Q5_0 and Q8_0 run on
/// Errand's own kernels).
pub(crate) fn tiny_model_in(arch: &str, seed: u64, dtype: GgmlDType) -> Transformer {
    tiny_model_with(arch, seed, dtype, LoadOptions::default())
}

fn tiny_model_with(arch: &str, seed: u64, dtype: GgmlDType, opts: LoadOptions) -> Transformer {
    let dev = Device::Cpu;
    let cfg = ModelConfig {
        arch: arch.into(),
        spec: ArchSpec::for_name(arch).unwrap(),
        n_layer: 2,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 16,
        hidden: 64,
        context_length: 2048,
        rms_eps: 1e-6,
        rope_theta: 10_000.0,
        vocab_size: 96,
    };
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rnd = |shape: &[usize], scale: f32| -> QTensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        let t = Tensor::from_vec(data, shape, &dev).unwrap();
        let dtype = if shape.len() == 2 { dtype } else { GgmlDType::F32 };
        QTensor::quantize(&t, dtype).unwrap()
    };
    let mut t = HashMap::new();
    let (h, kvd, ff) = (cfg.hidden, cfg.n_kv_head * cfg.head_dim, 128);
    t.insert("token_embd.weight".to_string(), rnd(&[cfg.vocab_size, h], 1.0));
    t.insert("output_norm.weight".to_string(), rnd(&[h], 1.0));
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        t.insert(p("attn_norm.weight"), rnd(&[h], 1.0));
        t.insert(p("attn_q.weight"), rnd(&[h, h], 0.3));
        t.insert(p("attn_k.weight"), rnd(&[kvd, h], 0.3));
        t.insert(p("attn_v.weight"), rnd(&[kvd, h], 0.3));
        if arch == "qwen2" {
            t.insert(p("attn_q.bias"), rnd(&[h], 0.1));
            t.insert(p("attn_k.bias"), rnd(&[kvd], 0.1));
            t.insert(p("attn_v.bias"), rnd(&[kvd], 0.1));
        }
        t.insert(p("attn_output.weight"), rnd(&[h, h], 0.3));
        t.insert(p("ffn_norm.weight"), rnd(&[h], 1.0));
        t.insert(p("ffn_gate.weight"), rnd(&[ff, h], 0.3));
        t.insert(p("ffn_up.weight"), rnd(&[ff, h], 0.3));
        t.insert(p("ffn_down.weight"), rnd(&[h, ff], 0.3));
    }
    Transformer::from_tensors(cfg, t, &dev, opts).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 31 + seed * 7 + 3) % 96).collect()
}

#[test]
fn incremental_decode_matches_full_recompute() {
    for arch in ["qwen2", "llama"] {
        let m = tiny_model(arch, 1);
        let toks = tokens(40, 1);
        let mut full = m.new_cache();
        let want = m.forward(&toks, &mut full).unwrap();
        let mut inc = m.new_cache();
        m.forward(&toks[..25], &mut inc).unwrap();
        let mut got = Vec::new();
        for t in &toks[25..] {
            got = m.forward(&[*t], &mut inc).unwrap();
        }
        assert_eq!(inc.len(), 40);
        let d = max_diff(&want, &got);
        assert!(d < 1e-4, "{arch}: max logit difference {d}");
    }
}

#[test]
fn truncated_cache_reuse_matches_full_recompute() {
    let m = tiny_model("qwen2", 2);
    let a = tokens(300, 2); // crosses the cache's growth step
    let mut cache = m.new_cache();
    m.forward(&a, &mut cache).unwrap();
    // A follow-up that shares the first 200 tokens and then diverges.
    let mut b = a[..200].to_vec();
    b.extend(tokens(30, 9));
    cache.truncate(200);
    let reused = m.forward(&b[200..], &mut cache).unwrap();
    let mut fresh = m.new_cache();
    let full = m.forward(&b, &mut fresh).unwrap();
    let d = max_diff(&reused, &full);
    assert!(d < 1e-4, "max logit difference {d}");
    // And the wrong prefix really does change the answer.
    let mut wrong = m.new_cache();
    m.forward(&a[..200], &mut wrong).unwrap();
    wrong.truncate(199);
    let off = m.forward(&b[200..], &mut wrong).unwrap();
    assert!(max_diff(&off, &full) > 1e-3);
}

#[test]
fn prefill_in_chunks_matches_one_pass() {
    let m = tiny_model("llama", 3);
    let toks: Vec<u32> = (0..(PREFILL_CHUNK as u32 + 70)).map(|i| (i * 13 + 5) % 96).collect();
    let mut c1 = m.new_cache();
    let chunked = m.forward(&toks, &mut c1).unwrap();
    let mut c2 = m.new_cache();
    m.forward(&toks[..100], &mut c2).unwrap();
    let two = m.forward(&toks[100..], &mut c2).unwrap();
    assert!(max_diff(&chunked, &two) < 1e-4);
}

/// Fused CPU attention (the default) against candle's tensor ops (the
/// reference path) on the same f32 weights: a multi-chunk prefill, a
/// follow-up chunk, decode steps and a batched step give the same logits.
#[test]
fn fused_attention_matches_the_tensor_path() {
    for arch in ["qwen2", "llama"] {
        let reference = LoadOptions { native_kernels: false, requantize_to_q8_0: false };
        let fused = tiny_model_with(arch, 5, GgmlDType::F32, LoadOptions::default());
        let plain = tiny_model_with(arch, 5, GgmlDType::F32, reference);
        let toks = tokens(PREFILL_CHUNK + 90, 4);
        let (mut cf, mut cp) = (fused.new_cache(), plain.new_cache());
        let mut worst = max_diff(&fused.forward(&toks, &mut cf).unwrap(), &plain.forward(&toks, &mut cp).unwrap());
        let more = tokens(9, 6);
        worst = worst.max(max_diff(&fused.forward(&more, &mut cf).unwrap(), &plain.forward(&more, &mut cp).unwrap()));
        for t in [5u32, 17, 60] {
            worst = worst.max(max_diff(&fused.forward(&[t], &mut cf).unwrap(), &plain.forward(&[t], &mut cp).unwrap()));
        }
        let (mut cf2, mut cp2) = (fused.new_cache(), plain.new_cache());
        fused.forward(&toks[..40], &mut cf2).unwrap();
        plain.forward(&toks[..40], &mut cp2).unwrap();
        let a = fused.forward_batch(&[3, 4], &mut [&mut cf, &mut cf2]).unwrap();
        let b = plain.forward_batch(&[3, 4], &mut [&mut cp, &mut cp2]).unwrap();
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max(max_diff(x, y));
        }
        assert!(worst < 1e-3, "{arch}: fused attention differs by {worst}");
    }
}

#[test]
fn context_overflow_is_an_error_not_a_panic() {
    let m = tiny_model("llama", 4);
    let toks = vec![1u32; 2049];
    let mut c = m.new_cache();
    let err = m.forward(&toks, &mut c).unwrap_err();
    assert!(matches!(err, ModelError::ContextOverflow { needed: 2049, limit: 2048 }));
    assert_eq!(c.len(), 0);
}

#[test]
fn unsupported_architectures_name_the_seam() {
    let e = ArchSpec::for_name("qwen3").unwrap_err().to_string();
    assert!(e.contains("qwen3") && e.contains("q/k"), "{e}");
    assert!(ArchSpec::for_name("mamba").is_err());
}

#[test]
fn a_batched_decode_step_equals_each_sequence_alone() {
    for (arch, dtype) in [("qwen2", GgmlDType::F32), ("qwen2", GgmlDType::Q5_0), ("llama", GgmlDType::Q8_0)] {
        let m = tiny_model_in(arch, 5, dtype);
        // Three sequences of different lengths (so different positions).
        let prompts = [tokens(7, 1), tokens(30, 2), tokens(3, 3)];
        let next = [5u32, 17, 42];
        let mut alone = Vec::new();
        let mut batch_caches = Vec::new();
        for (p, t) in prompts.iter().zip(next) {
            let mut c = m.new_cache();
            m.forward(p, &mut c).unwrap();
            batch_caches.push(c.copy_prefix(p.len()).unwrap());
            alone.push(m.forward(&[t], &mut c).unwrap());
        }
        let mut refs: Vec<&mut KvCache> = batch_caches.iter_mut().collect();
        let together = m.forward_batch(&next, &mut refs).unwrap();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            if dtype == GgmlDType::F32 {
                // candle's f32 GEMM may block one row differently from three.
                assert!(max_diff(a, b) < 1e-4, "{arch}: sequence {i} differs in a batch");
            } else {
                // Errand's kernels sum every row in the same order.
                assert_eq!(a, b, "{arch} {dtype:?}: sequence {i} differs in a batch");
            }
        }
        for (c, p) in batch_caches.iter().zip(&prompts) {
            assert_eq!(c.len(), p.len() + 1);
        }
        // The caches really were extended: one more step still matches.
        let mut c0 = m.new_cache();
        let mut seq0 = prompts[0].clone();
        seq0.extend([next[0], 9]);
        let want = m.forward(&seq0, &mut c0).unwrap();
        let mut refs: Vec<&mut KvCache> = batch_caches.iter_mut().collect();
        let got = m.forward_batch(&[9, 9, 9], &mut refs).unwrap();
        assert!(max_diff(&want, &got[0]) < 1e-3, "{arch} {dtype:?}");
    }
}

#[test]
fn a_batch_refuses_mismatched_inputs_and_overflow() {
    let m = tiny_model("llama", 6);
    let mut c = m.new_cache();
    let mut refs = vec![&mut c];
    assert!(matches!(m.forward_batch(&[1, 2], &mut refs), Err(ModelError::Shape(_))));
    assert!(m.forward_batch(&[], &mut []).unwrap().is_empty());
    let mut full = m.new_cache();
    m.forward(&vec![1u32; 2048], &mut full).unwrap();
    let mut refs = vec![&mut full];
    assert!(matches!(m.forward_batch(&[1], &mut refs), Err(ModelError::ContextOverflow { .. })));
}
