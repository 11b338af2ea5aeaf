//! Fused causal attention on the CPU for one sequence, over a KV cache as
//! stored (one block of `capacity` rows of `head_dim` per KV head).
//!
//! The tensor path builds, per layer, a `(n_head, s, pos + s)` score tensor,
//! a broadcast mask of the same size, its softmax, and only then the product
//! with V: at a 4k-token context and 512-token chunks that is three freshly
//! allocated 117 MB tensors per layer, and prefill ran at a third of
//! llama.cpp's speed, mostly in page faults, mask adds and memory traffic.
//! Here each task takes one KV head and a block of queries, computes its
//! scores into a per-thread scratch buffer of at most
//! `max(QUERY_BLOCK, n_rep) * (pos + s)` floats (reused across layers, so
//! no page faults), masks by limiting each row's softmax to its causal
//! length, and multiplies with V straight into the output rows. A task
//! handles every query head that shares its KV head (grouped-query
//! attention), so those keys stay in cache between heads; in decode the
//! group's heads are one product. Products use the `gemm` crate that candle
//! itself uses, single-threaded inside a task; tasks are spread over
//! candle's CPU thread pool.
//!
//! Per row the steps are the tensor path's (scaled dot products,
//! max-subtracted exponentials normalised by their sum, then the weighted
//! sum of values); the sums run in another order and the exponential is a
//! polynomial ([`exp_nonpositive`]), so results agree to rounding, not bit
//! for bit.

use std::cell::RefCell;

/// Queries of one head handled by one task during prefill.
pub const QUERY_BLOCK: usize = 64;

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` is a multiple of it).
    pub n_kv: usize,
    pub head_dim: usize,
    /// New positions (queries) in this call.
    pub s: usize,
    /// Positions already in the cache before this call.
    pub pos: usize,
    /// Distance in floats between two KV heads in `k` and `v` (the cache's
    /// capacity times `head_dim`).
    pub kv_head_stride: usize,
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Causal attention of `s` new queries over `pos + s` cached positions.
///
/// * `q`: `(n_head, s, head_dim)`, contiguous, rotary embedding applied.
/// * `k`, `v`: KV head `g` starts at `g * kv_head_stride`; rows of
///   `head_dim`; at least `pos + s` rows valid (the new ones included).
///
/// Returns `(s, n_head * head_dim)`, row-major: each query's heads side by
/// side, ready for the output projection.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape, scale: f32) -> Vec<f32> {
    let AttnShape { n_head, n_kv, head_dim: hd, s, pos, kv_head_stride } = sh;
    assert!(n_kv > 0 && n_head % n_kv == 0, "{n_head} query heads over {n_kv} KV heads");
    assert!(s > 0, "no queries");
    assert_eq!(q.len(), n_head * s * hd, "queries are not (n_head, s, head_dim)");
    let total = pos + s;
    let kv_need = (n_kv - 1) * kv_head_stride + total * hd;
    assert!(kv_head_stride >= total * hd, "KV head stride {kv_head_stride} under {total} rows");
    assert!(k.len() >= kv_need && v.len() >= kv_need, "KV cache shorter than {total} positions");
    let n_rep = n_head / n_kv;
    let row = n_head * hd;
    let mut out = vec![0f32; s * row];
    let out_ptr = out.as_mut_ptr() as usize;
    let blocks = s.div_ceil(QUERY_BLOCK);
    let work = |range: std::ops::Range<usize>| {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for item in range {
                let g = item / blocks;
                let i0 = (item % blocks) * QUERY_BLOCK;
                let i1 = s.min(i0 + QUERY_BLOCK);
                let kg = &k[g * kv_head_stride..];
                let vg = &v[g * kv_head_stride..];
                if s == 1 {
                    // Decode: the group's n_rep query rows are contiguous.
                    let rows = Rows {
                        q: &q[g * n_rep * hd..(g + 1) * n_rep * hd],
                        q_rs: hd,
                        m: n_rep,
                        out: out_ptr as *mut f32,
                        out_off: g * n_rep * hd,
                        out_rs: hd,
                    };
                    attend(&rows, |_| total, kg, vg, hd, total, scale, &mut scratch);
                } else {
                    let nk = pos + i1;
                    for h in g * n_rep..(g + 1) * n_rep {
                        let qh = &q[(h * s + i0) * hd..(h * s + i1) * hd];
                        let rows = Rows {
                            q: qh,
                            q_rs: hd,
                            m: i1 - i0,
                            out: out_ptr as *mut f32,
                            out_off: i0 * row + h * hd,
                            out_rs: row,
                        };
                        attend(&rows, |r| pos + i0 + r + 1, kg, vg, hd, nk, scale, &mut scratch);
                    }
                }
            }
        })
    };
    candle_core::utils::barrier_pool().execute_chunked(n_kv * blocks, work);
    out
}

/// `m` query rows attending together, and where their outputs go.
struct Rows<'a> {
    q: &'a [f32],
    q_rs: usize,
    m: usize,
    out: *mut f32,
    out_off: usize,
    out_rs: usize,
}

/// Scores of `rows` against the first `nk` keys, softmax of row `r` over
/// its first `limit(r)` keys (the rest weigh zero), times the values.
#[allow(clippy::too_many_arguments)]
fn attend(
    rows: &Rows,
    limit: impl Fn(usize) -> usize,
    k: &[f32],
    v: &[f32],
    hd: usize,
    nk: usize,
    scale: f32,
    scratch: &mut Vec<f32>,
) {
    let m = rows.m;
    if scratch.len() < m * nk {
        scratch.resize(m * nk, 0.0);
    }
    let sc = &mut scratch[..m * nk];
    debug_assert!(rows.q.len() >= (m - 1) * rows.q_rs + hd);
    debug_assert!(k.len() >= nk * hd && v.len() >= nk * hd);
    // SAFETY: sc is m×nk (row stride nk); q holds m rows of hd at stride
    // q_rs; k holds nk rows of hd (read as the hd×nk transpose). All three
    // are in bounds (checked above) and sc does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            nk,
            hd,
            sc.as_mut_ptr(),
            1,
            nk as isize,
            false,
            rows.q.as_ptr(),
            1,
            rows.q_rs as isize,
            k.as_ptr(),
            hd as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    for (r, srow) in sc.chunks_exact_mut(nk).enumerate() {
        let l = limit(r).min(nk);
        let (live, dead) = srow.split_at_mut(l);
        softmax_row(live);
        dead.fill(0.0);
    }
    // SAFETY: the destination rows (m rows of hd at stride out_rs from
    // out_off) belong to this task alone: callers hand each (head, query)
    // pair to exactly one task, and they lie inside the output buffer.
    unsafe {
        gemm::gemm(
            m,
            hd,
            nk,
            rows.out.add(rows.out_off),
            1,
            rows.out_rs as isize,
            false,
            sc.as_ptr(),
            1,
            nk as isize,
            v.as_ptr(),
            1,
            hd as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `e^x` for `x <= 0` (scores minus their maximum): Cephes' polynomial
/// after a power-of-two range reduction, within a few ulp of `f32::exp`
/// (tested), and written out on 8 AVX2 lanes in `exp8` (libm's `expf` is
/// a call per element, and a 4k-token prefill takes 700 million of them).
/// Inputs under -87 give `e^-87`, which weighs nothing next to the row's
/// maximum (`e^0`).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 5.000_000_1e-1);
    let e = (p * r).mul_add(r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// In-place softmax of one row of scores, in AVX2 lanes where the CPU has
/// them (public for tests).
pub fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present (checked just above).
        unsafe { softmax_avx2(row) };
        return;
    }
    softmax(row)
}

/// In-place softmax of one row of scores (the portable path).
fn softmax(row: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, x) in mx.iter_mut().zip(c) {
            *m = m.max(*x);
        }
    }
    let max = chunks.remainder().iter().chain(&mx).copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, x) in sums.iter_mut().zip(c) {
            *x = exp_nonpositive(*x - max);
            *s += *x;
        }
    }
    let mut sum: f32 = 0.0;
    for x in chunks.into_remainder() {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    sum += sums.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// [`softmax`] in AVX2 lanes, with [`exp_nonpositive`] on 8 floats at a
/// time (the compiler does not vectorise the scalar one: its float-to-int
/// conversion saturates).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let mut lanes = [0f32; 8];
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 8 <= n {
        vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
    let max = row[i..].iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
    let vm = _mm256_set1_ps(max);
    let mut vsum = _mm256_setzero_ps();
    i = 0;
    while i + 8 <= n {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
        _mm256_storeu_ps(p.add(i), e);
        vsum = _mm256_add_ps(vsum, e);
        i += 8;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), vsum);
    let mut sum: f32 = lanes.iter().sum();
    for x in &mut row[i..] {
        *x = exp_nonpositive(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    let vinv = _mm256_set1_ps(inv);
    i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv));
        i += 8;
    }
    for x in &mut row[i..] {
        *x *= inv;
    }
}

/// [`exp_nonpositive`] on 8 lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let c = _mm256_set1_ps;
    let x = _mm256_max_ps(x, c(-87.0));
    let n = _mm256_floor_ps(_mm256_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(0.5)));
    let r = _mm256_fnmadd_ps(n, c(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, c(-2.121_944_4e-4), r);
    let mut q = _mm256_fmadd_ps(c(1.987_569_1e-4), r, c(1.398_199_9e-3));
    q = _mm256_fmadd_ps(q, r, c(8.333_452e-3));
    q = _mm256_fmadd_ps(q, r, c(4.166_579_6e-2));
    q = _mm256_fmadd_ps(q, r, c(1.666_666_5e-1));
    q = _mm256_fmadd_ps(q, r, c(5.000_000_1e-1));
    let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(q, r), r, r), c(1.0));
    let pow = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(e, _mm256_castsi256_ps(pow))
}

/// Straightforward reference: per head and query, scores, softmax, values.
pub fn attention_reference(q: &[f32], k: &[f32], v: &[f32], sh: AttnShape, scale: f32) -> Vec<f32> {
    let AttnShape { n_head, n_kv, head_dim: hd, s, pos, kv_head_stride } = sh;
    let n_rep = n_head / n_kv;
    let mut out = vec![0f32; s * n_head * hd];
    for h in 0..n_head {
        let g = h / n_rep;
        for i in 0..s {
            let qi = &q[(h * s + i) * hd..(h * s + i + 1) * hd];
            let l = pos + i + 1;
            let mut sc: Vec<f32> = (0..l)
                .map(|j| {
                    let kj = &k[g * kv_head_stride + j * hd..][..hd];
                    qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
                })
                .collect();
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = sc.iter_mut().map(|x| {
                *x = (*x - max).exp();
                *x
            }).sum();
            let o = &mut out[i * n_head * hd + h * hd..][..hd];
            for (j, p) in sc.iter().enumerate() {
                let vj = &v[g * kv_head_stride + j * hd..][..hd];
                for (od, vd) in o.iter_mut().zip(vj) {
                    *od += p / sum * vd;
                }
            }
        }
    }
    out
}
