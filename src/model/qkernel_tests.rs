//! The kernels of `errand-qkernel` against candle's dequantization and
//! quantized matmul, and against f32 products.

use super::qkernel::*;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn quantized(kind: Kind, n: usize, k: usize, seed: u64) -> (Vec<u8>, QTensor) {
    let w = Tensor::from_vec(rnd(n * k, seed, 1.0), (n, k), &Device::Cpu).unwrap();
    let dt = match kind {
        Kind::Q5_0 => GgmlDType::Q5_0,
        Kind::Q8_0 => GgmlDType::Q8_0,
    };
    let q = QTensor::quantize(&w, dt).unwrap();
    (q.data().unwrap().into_owned(), q)
}

#[test]
fn unpacking_matches_candles_dequantization() {
    for kind in [Kind::Q5_0, Kind::Q8_0] {
        let (bytes, q) = quantized(kind, 8, 64, 3);
        let theirs = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(dequantize(kind, &bytes, 8, 64, Path::Scalar), theirs, "{kind:?}");
        assert_eq!(dequantize(kind, &bytes, 8, 64, Path::Auto), theirs, "{kind:?}");
    }
}

/// Every row count from 1 to past a tile, on both paths, against f32
/// products of the dequantized weights. The only error left is the
/// activations' 8-bit rounding.
#[test]
fn products_match_the_dequantized_reference_on_both_paths() {
    let (n, k) = (37, 96);
    for kind in [Kind::Q5_0, Kind::Q8_0] {
        let (bytes, _) = quantized(kind, n, k, 7);
        let wf = dequantize(kind, &bytes, n, k, Path::Scalar);
        for m in [1, 2, 3, 4, 5, 8, 9, 17] {
            let x = rnd(m * k, 11 + m as u64, 2.0);
            let slow = matmul(kind, &bytes, n, k, &x, Path::Scalar);
            for (path, fast) in [Path::Auto, Path::Avx2].map(|p| (p, matmul(kind, &bytes, n, k, &x, p))) {
                for i in 0..m {
                    for r in 0..n {
                        let exact: f32 = (0..k).map(|j| x[i * k + j] * wf[r * k + j]).sum();
                        let bound = 0.02 * (0..k).map(|j| (x[i * k + j] * wf[r * k + j]).abs()).sum::<f32>() + 1e-4;
                        let (f, s) = (fast[i * n + r], slow[i * n + r]);
                        assert!(
                            (f - s).abs() <= 1e-3 * (1.0 + s.abs()),
                            "{kind:?} {path:?} m={m} ({i},{r}): simd {f} scalar {s}"
                        );
                        assert!((s - exact).abs() <= bound, "{kind:?} m={m} ({i},{r}): {s} vs exact {exact}");
                    }
                }
            }
        }
    }
}

/// candle's own quantized matmul quantizes activations the same way, so
/// the two agree up to the order of summation.
#[test]
fn products_match_candles_quantized_matmul() {
    let (n, k) = (40, 128);
    for kind in [Kind::Q5_0, Kind::Q8_0] {
        let (bytes, q) = quantized(kind, n, k, 21);
        let qm = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
        for m in [1, 5] {
            let x = rnd(m * k, 5 + m as u64, 3.0);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let theirs = candle_core::Module::forward(&qm, &xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ours = matmul(kind, &bytes, n, k, &x, Path::Auto);
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{kind:?} m={m} [{i}]: ours {a} candle {b}");
            }
        }
    }
}

/// The VNNI lanes start from the activations' correction and end holding
/// the same integers as AVX2's, so the two paths agree to the bit (greedy
/// outputs cannot drift between CPUs that have VNNI and those without).
#[test]
fn vnni_and_avx2_products_are_identical() {
    if Path::Auto.resolve() != Path::Auto {
        eprintln!("no AVX-512 VNNI on this CPU; nothing to compare");
        return;
    }
    // 37 weight rows leave single rows after the groups of four; 64 do
    // not, so 8 and 16 activation rows run on pair tiles alone.
    for (n, k) in [(37, 160), (64, 96)] {
        for kind in [Kind::Q5_0, Kind::Q8_0] {
            let (bytes, _) = quantized(kind, n, k, 13);
            for m in [1, 2, 3, 8, 9, 16, 20, 37] {
                let x = rnd(m * k, 40 + m as u64, 4.0);
                let vnni = matmul(kind, &bytes, n, k, &x, Path::Auto);
                let avx2 = matmul(kind, &bytes, n, k, &x, Path::Avx2);
                assert_eq!(vnni, avx2, "{kind:?} n={n} m={m}");
            }
        }
    }
}

/// Extreme values: Q8_0's -127..127 weights with full-scale activations,
/// where an 8-bit offset or a saturating 16-bit sum would show.
#[test]
fn full_scale_blocks_are_exact_on_every_path() {
    let k = 64;
    let w =
        Tensor::from_vec((0..2 * k).map(|j| if j % 3 == 0 { -1.0f32 } else { 1.0 }).collect::<Vec<_>>(), (2, k), &Device::Cpu)
            .unwrap();
    let x: Vec<f32> = (0..k).map(|j| if j % 2 == 0 { 1.0 } else { -1.0 }).collect();
    for (kind, dt) in [(Kind::Q8_0, GgmlDType::Q8_0), (Kind::Q5_0, GgmlDType::Q5_0)] {
        let q = QTensor::quantize(&w, dt).unwrap();
        let bytes = q.data().unwrap().into_owned();
        let wf = dequantize(kind, &bytes, 2, k, Path::Scalar);
        let exact: Vec<f32> = (0..2).map(|r| (0..k).map(|j| wf[r * k + j] * x[j]).sum()).collect();
        for path in [Path::Auto, Path::Avx2, Path::Scalar] {
            let got = matmul(kind, &bytes, 2, k, &x, path);
            for (g, e) in got.iter().zip(&exact) {
                assert!((g - e).abs() <= 1e-3 * (1.0 + e.abs()), "{kind:?} {path:?}: {g} vs {e}");
            }
        }
    }
}

/// The SIMD activation quantizer equals the scalar one to the bit,
/// including values that land exactly on a half (rounded away from zero),
/// zero blocks and blocks whose extreme value is negative.
#[test]
fn activation_quantization_matches_the_scalar_reference() {
    let k = 128;
    let mut x = rnd(4 * k, 99, 3.0);
    // Block 1: 127 * v / amax hits exact halves for these values.
    for (j, v) in x[32..64].iter_mut().enumerate() {
        *v = (j as f32 - 16.0) + 0.5;
    }
    x[63] = -127.0; // the block's extreme is negative: scale 1.0, halves stay halves
    x[64..96].iter_mut().for_each(|v| *v = 0.0);
    x[100] = -1e30;
    let fast = quantize_acts(&x, k);
    let slow = quantize_acts_scalar(&x, k);
    assert_eq!(fast.q, slow.q);
    assert_eq!(fast.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), slow.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    // The halves really were rounded away from zero.
    assert_eq!(slow.q[32], -16, "-15.5 rounds to -16");
    assert_eq!((slow.q[47], slow.q[48]), (-1, 1), "-0.5 and 0.5 round away from zero");
}

#[test]
fn zero_activations_give_zero() {
    let (bytes, _) = quantized(Kind::Q5_0, 4, 32, 1);
    assert_eq!(matmul(Kind::Q5_0, &bytes, 4, 32, &[0.0; 32], Path::Auto), vec![0.0; 4]);
}

#[test]
#[should_panic(expected = "do not match")]
fn wrong_weight_size_is_refused() {
    matmul(Kind::Q8_0, &[0u8; 33], 1, 32, &[0.0; 32], Path::Auto);
}

/// Fused attention against the per-query reference: prefill chunks that
/// start mid-cache and span several query blocks, decode, grouped-query
/// heads, and a cache with spare capacity between KV heads.
#[test]
fn fused_attention_matches_the_reference() {
    use super::qkernel::attention::{attention, attention_reference, AttnShape, QUERY_BLOCK};
    for (n_head, n_kv, hd, s, pos) in [
        (4, 2, 16, 1, 0),
        (4, 2, 16, 1, 37),
        (14, 2, 64, 1, 300),
        (9, 3, 64, 7, 0),
        (4, 4, 32, QUERY_BLOCK + 5, 11),
        (14, 2, 64, 2 * QUERY_BLOCK + 1, 200),
    ] {
        let cap = (pos + s).next_multiple_of(64) + 64;
        let stride = cap * hd;
        let q = rnd(n_head * s * hd, 1 + s as u64, 1.0);
        let k = rnd(n_kv * stride, 2 + pos as u64, 1.0);
        let v = rnd(n_kv * stride, 3, 1.0);
        let sh = AttnShape { n_head, n_kv, head_dim: hd, s, pos, kv_head_stride: stride };
        let scale = 1.0 / (hd as f32).sqrt();
        let ours = attention(&q, &k, &v, sh, scale);
        let want = attention_reference(&q, &k, &v, sh, scale);
        let worst = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{sh:?}: max difference {worst}");
    }
}

/// A wrong mask must show: the last position's value may change only the
/// last query's output.
#[test]
fn fused_attention_is_causal() {
    use super::qkernel::attention::{attention, AttnShape};
    let (n_head, n_kv, hd, s) = (2, 1, 16, 5);
    let stride = 8 * hd;
    let q = rnd(n_head * s * hd, 9, 1.0);
    let k = rnd(n_kv * stride, 10, 1.0);
    let mut v = rnd(n_kv * stride, 11, 1.0);
    let sh = AttnShape { n_head, n_kv, head_dim: hd, s, pos: 0, kv_head_stride: stride };
    let a = attention(&q, &k, &v, sh, 0.25);
    // Changing the last position's value changes only the last query.
    for x in &mut v[(s - 1) * hd..s * hd] {
        *x += 1.0;
    }
    let b = attention(&q, &k, &v, sh, 0.25);
    let row = n_head * hd;
    assert_eq!(a[..(s - 1) * row], b[..(s - 1) * row]);
    assert_ne!(a[(s - 1) * row..], b[(s - 1) * row..]);
}

/// The polynomial exponential against `f64::exp`, scalar and on AVX2 lanes
/// (through a softmax whose row is longer than 8 with a remainder).
#[test]
fn the_softmax_exponential_is_accurate() {
    use super::qkernel::attention::{exp_nonpositive, softmax_row};
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 0.0 {
        let want = (x as f64).exp();
        worst = worst.max(((exp_nonpositive(x) as f64 - want) / want).abs());
        x += 0.000_37;
    }
    eprintln!("exp_nonpositive: worst relative error {worst:e}");
    assert!(worst < 5.0 * f32::EPSILON as f64, "scalar exp off by {worst:e}");
    for len in [1, 7, 8, 29, 1000] {
        let row: Vec<f32> = rnd(len, len as u64, 20.0);
        let mut ours = row.clone();
        softmax_row(&mut ours);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (o, v) in ours.iter().zip(&row) {
            let want = (*v as f64 - max).exp() / sum;
            assert!((*o as f64 - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12, "len {len}: {o} vs {want}");
        }
    }
}

/// The model's products for the k-quant types it leaves to candle (Q4_K
/// and Q6_K `ffn_down` in the default model) give each activation row the
/// same bits in a batch as alone, at decode batch sizes and prompt
/// lengths, which batching relies on. candle itself multiplies a lone Q6_K
/// row with another kernel (different bits; Q2_K to Q5_K agree);
/// `Linear` sends it through the many-row one.
#[test]
fn candles_k_quant_rows_do_not_depend_on_the_batch() {
    use super::{Linear, LoadOptions};
    use std::sync::Arc;
    let (n, k) = (96, 512);
    for dt in [GgmlDType::Q2K, GgmlDType::Q3K, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
        let w = Tensor::from_vec(rnd(n * k, 3, 1.0), (n, k), &Device::Cpu).unwrap();
        // Kept as stored (`--no-requant`); by default Q4_K and Q6_K become Q8_0.
        let as_stored = LoadOptions { requantize_to_q8_0: false, ..LoadOptions::default() };
        let lin = Linear::new(Arc::new(QTensor::quantize(&w, dt).unwrap()), as_stored).unwrap();
        assert!(matches!(lin, Linear::Candle(_)), "{dt:?} should stay on candle's kernels");
        if matches!(dt, GgmlDType::Q4K | GgmlDType::Q6K) {
            let q8 = Linear::new(Arc::new(QTensor::quantize(&w, dt).unwrap()), LoadOptions::default()).unwrap();
            assert!(matches!(q8, Linear::Packed(_)), "{dt:?} should be re-quantized and packed by default");
        }
        let x = rnd(64 * k, 5, 2.0);
        let run = |rows: &[f32]| -> Vec<f32> {
            let m = rows.len() / k;
            let t = Tensor::from_vec(rows.to_vec(), (1, m, k), &Device::Cpu).unwrap();
            lin.forward(&t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let alone: Vec<Vec<f32>> = (0..64).map(|i| run(&x[i * k..(i + 1) * k])).collect();
        for m in [2, 3, 4, 5, 8, 15, 16, 17, 27, 33, 48, 64] {
            let together = run(&x[..m * k]);
            for (i, a) in alone.iter().take(m).enumerate() {
                assert_eq!(&together[i * n..(i + 1) * n], &a[..], "{dt:?}: row {i} of {m} differs from alone");
            }
        }
    }
}

/// The repacked layout on every path, against the file's-layout kernels and
/// f32 products: VNNI, AVX2 and scalar give the same bits, each batch row
/// equals that row alone, and the products stay as close to the exact ones
/// as the 8-bit activations allow.
#[test]
fn packed_products_are_identical_on_every_path_and_batch() {
    // 1024 rows: work items of four groups.
    for (n, k) in [(16, 32), (48, 160), (128, 96), (1024, 32)] {
        for kind in [Kind::Q5_0, Kind::Q8_0] {
            let (mut bytes, _) = quantized(kind, n, k, 17);
            if kind == Kind::Q8_0 {
                // A -128 weight, which ggml's quantizer never writes but a file may hold.
                bytes[2 + 5] = 0x80;
            }
            let p = packed::Packed::new(kind, &bytes, n, k).expect("packable");
            assert_eq!(p.bytes(), bytes.len(), "the file's size");
            let wf = dequantize(kind, &bytes, n, k, Path::Scalar);
            let x = rnd(70 * k, 90, 4.0);
            let alone: Vec<Vec<f32>> = (0..70).map(|i| packed::matmul(&p, &x[i * k..(i + 1) * k], Path::Scalar)).collect();
            for m in [1, 2, 3, 7, 8, 15, 16, 17, 33, 64, 70] {
                let rows = &x[..m * k];
                let scalar = packed::matmul(&p, rows, Path::Scalar);
                for path in [Path::Auto, Path::Avx2] {
                    assert_eq!(packed::matmul(&p, rows, path), scalar, "{kind:?} {n}x{k} m={m} {path:?}");
                }
                let file = matmul(kind, &bytes, n, k, rows, Path::Scalar);
                for i in 0..m {
                    assert_eq!(&scalar[i * n..(i + 1) * n], &alone[i][..], "{kind:?} {n}x{k}: row {i} of {m} differs from alone");
                    for r in 0..n {
                        let (s, f) = (scalar[i * n + r], file[i * n + r]);
                        assert!((s - f).abs() <= 1e-4 * (1.0 + f.abs()), "{kind:?} ({i},{r}): packed {s}, file layout {f}");
                        let exact: f32 = (0..k).map(|j| rows[i * k + j] * wf[r * k + j]).sum();
                        let bound = 0.02 * (0..k).map(|j| (rows[i * k + j] * wf[r * k + j]).abs()).sum::<f32>() + 1e-4;
                        assert!((s - exact).abs() <= bound, "{kind:?} ({i},{r}): {s} vs exact {exact}");
                    }
                }
            }
        }
    }
}

/// Full-scale weights (Q8_0's -127..127 against full-scale activations,
/// where a saturating 16-bit sum would show) and a row count the layout
/// cannot hold.
#[test]
fn packed_products_are_exact_at_full_scale_and_refuse_odd_shapes() {
    let (n, k) = (16, 64);
    let w = Tensor::from_vec((0..n * k).map(|j| if j % 3 == 0 { -1.0f32 } else { 1.0 }).collect::<Vec<_>>(), (n, k), &Device::Cpu)
        .unwrap();
    let x: Vec<f32> = (0..2 * k).map(|j| if j % 2 == 0 { 1.0 } else { -1.0 }).collect();
    for (kind, dt) in [(Kind::Q8_0, GgmlDType::Q8_0), (Kind::Q5_0, GgmlDType::Q5_0)] {
        let bytes = QTensor::quantize(&w, dt).unwrap().data().unwrap().into_owned();
        let wf = dequantize(kind, &bytes, n, k, Path::Scalar);
        let p = packed::Packed::new(kind, &bytes, n, k).expect("packable");
        for path in [Path::Auto, Path::Avx2, Path::Scalar] {
            let got = packed::matmul(&p, &x, path);
            for i in 0..2 {
                for r in 0..n {
                    let e: f32 = (0..k).map(|j| wf[r * k + j] * x[i * k + j]).sum();
                    let g = got[i * n + r];
                    assert!((g - e).abs() <= 1e-3 * (1.0 + e.abs()), "{kind:?} {path:?}: {g} vs {e}");
                }
            }
        }
        let (odd, _) = quantized(kind, 17, k, 3);
        assert!(packed::Packed::new(kind, &odd, 17, k).is_none(), "17 rows do not fill groups of 16");
        assert!(packed::Packed::new(kind, &bytes[1..], n, k).is_none(), "short bytes");
    }
}
