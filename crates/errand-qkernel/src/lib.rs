//! Errand's quantized matrix products on the CPU for the block types the default
//! model mostly ships in (Q5_0 and Q8_0), read straight from the file's bytes.
//!
//! candle's Q5_0 dot product is scalar, so Errand used to re-quantize Q5_0
//! matrices to Q8_0 at load: 55% more bytes to stream per decoded token, and
//! decode streams every weight once per token. Here the activations
//! are quantized to 8-bit blocks of 32 with an f32 scale (as llama.cpp does
//! for these types), each weight block is unpacked once and multiplied with
//! up to [`TILE`] activation rows: with AVX-512 VNNI one `vpdpbusd` per
//! block and row (the weights enter as unsigned bytes and each lane starts
//! from a correction, so the lanes hold the same integers as AVX2's), else
//! AVX2 `maddubs` with the sign trick (a scalar path serves other CPUs and
//! is the reference in tests). Decode (one activation row) takes four
//! weight rows at a time and prefetches the weights [`PREFETCH_BYTES`]
//! ahead; batches of 8 or more activation rows take two weight rows per
//! 512-bit register against 8 or 16 activation rows (`pairs`), fewer
//! rows four weight rows against four activation rows in 256-bit
//! registers (VNNI). Each (weight row, activation row) pair always sees the
//! same operations in the same order, so every path and batch size gives
//! the same bits as AVX2's one row. The weight rows are split
//! across candle's own CPU thread pool, so no second pool competes for the
//! cores.
//!
//! The model multiplies with [`packed`]: the same blocks repacked at load,
//! 16 rows interleaved, so one register holds 4 weights of 16 rows and
//! every lane sums one row's whole block (one conversion and FMA per block
//! for 16 rows instead of 1-2; 2.3-3.3x faster for 16-row batches and
//! 1.1-1.9x for one row on an AVX2-only machine, kbench). The file-layout kernels below
//! remain for matrices whose rows do not fill groups of 16.
//!
//! Layouts (ggml's): a Q5_0 block is an f16 scale, 32 high bits and 16
//! bytes of nibbles (22 bytes for 32 weights; weight `j` is the low nibble
//! of byte `j`, weight `j + 16` the high one, minus 16 after the high bit is
//! added); a Q8_0 block is an f16 scale and 32 `i8` (34 bytes).
//!
//! A crate of its own so that the test profile, which builds Errand itself
//! with little optimisation, still builds these loops fully optimised (like
//! every dependency); Errand re-exports it as `errand::model::qkernel`, and
//! its tests live there (`src/model/qkernel_tests.rs`).

use candle_core::quantized::GgmlDType;

pub mod attention;
pub mod packed;

/// How far ahead of the one-row kernels' reads the weights are prefetched.
/// Decode streams every weight once; on its own the hardware prefetcher
/// kept the 2-core machine's kernels at about 10 GB/s (Q5_0 `output`-sized
/// matrix, kbench: 2.1–2.4 ns per block), with this 4–8 KiB ahead at
/// 0.9–1.4 ns (4 KiB 1.00–1.34, 6 KiB 0.87–1.71, 8 KiB 0.86–1.37; noisy).
pub const PREFETCH_BYTES: usize = 6 * 1024;

/// Weights (and activations) per block.
pub const QK: usize = 32;

/// Activation rows multiplied with one unpacked weight block.
pub const TILE: usize = 8;

/// Weight block types these kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Q5_0,
    Q8_0,
}

impl Kind {
    pub fn of(d: GgmlDType) -> Option<Kind> {
        match d {
            GgmlDType::Q5_0 => Some(Kind::Q5_0),
            GgmlDType::Q8_0 => Some(Kind::Q8_0),
            _ => None,
        }
    }

    /// What the VNNI path adds to each weight to make it unsigned.
    pub fn offset(self) -> i32 {
        match self {
            Kind::Q5_0 => 16,
            Kind::Q8_0 => 128,
        }
    }

    pub fn block_bytes(self) -> usize {
        match self {
            Kind::Q5_0 => 22,
            Kind::Q8_0 => 34,
        }
    }
}

/// `m` rows of `k` activations as 8-bit blocks: `q` holds `m * k` values,
/// `d` one scale per block (`m * k / 32`).
pub struct QActs {
    pub k: usize,
    pub d: Vec<f32>,
    pub q: Vec<i8>,
    /// For the VNNI path: per block, 8 lanes of `-offset * (sum of 4
    /// consecutive q)` (see [`lane_corrections`]); empty otherwise.
    pub corr: Vec<i32>,
}

/// Quantizes row-major `x` (`m` rows of `k`, `k` a multiple of 32) per
/// block as ggml's Q8_0 does: values rounded to nearest at max |x| / 127,
/// the scale kept at f16 precision (so products equal candle's and
/// llama.cpp's up to the order of summation).
pub fn quantize_acts(x: &[f32], k: usize) -> QActs {
    debug_assert!(k % QK == 0 && x.len() % k == 0);
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        let mut d = vec![0f32; x.len() / QK];
        let mut q = vec![0i8; x.len()];
        // SAFETY: the CPU has AVX2; whole blocks on every side.
        unsafe { avx2::quantize_blocks(x, &mut q, &mut d) };
        return QActs { k, d, q, corr: Vec::new() };
    }
    quantize_acts_scalar(x, k)
}

/// [`quantize_acts`] in plain Rust: the reference the SIMD version must
/// equal bit for bit (tests).
pub fn quantize_acts_scalar(x: &[f32], k: usize) -> QActs {
    let nb = x.len() / QK;
    let mut d = Vec::with_capacity(nb);
    let mut q = vec![0i8; x.len()];
    for (xs, qs) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (o, v) in qs.iter_mut().zip(xs) {
            *o = (v * inv).round() as i8;
        }
        d.push(half::f16::from_f32(scale).to_f32());
    }
    QActs { k, d, q, corr: Vec::new() }
}

/// VNNI multiplies unsigned bytes with signed ones, so the weights enter it
/// as `u = w + offset` (Q5_0's raw 5-bit values, offset 16; Q8_0 with its
/// sign bit flipped, offset 128), and each 32-bit lane, which sums 4
/// products, starts from `-offset` times the sum of its 4 activations. A
/// lane then holds exactly the integer that AVX2's `maddubs`/`madd` pair
/// gives, so both paths produce the same bits.
pub fn lane_corrections(q: &[i8], offset: i32) -> Vec<i32> {
    q.chunks_exact(4).map(|c| -offset * c.iter().map(|&v| v as i32).sum::<i32>()).collect()
}

fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// One weight block unpacked to its 32 signed values and its scale.
fn unpack_scalar(kind: Kind, blk: &[u8], out: &mut [i8; QK]) -> f32 {
    match kind {
        Kind::Q5_0 => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            for j in 0..QK / 2 {
                let lo = blk[6 + j] & 0x0F;
                let hi = blk[6 + j] >> 4;
                let h0 = (((qh >> j) & 1) << 4) as u8;
                let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                out[j] = (lo | h0) as i8 - 16;
                out[j + 16] = (hi | h1) as i8 - 16;
            }
        }
        Kind::Q8_0 => {
            for (o, b) in out.iter_mut().zip(&blk[2..34]) {
                *o = *b as i8;
            }
        }
    }
    f16_at(blk)
}

fn dequantize_blocks_scalar(kind: Kind, w: &[u8], out: &mut [f32]) {
    let mut vals = [0i8; QK];
    for (blk, o) in w.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(QK)) {
        let d = unpack_scalar(kind, blk, &mut vals);
        for (o, v) in o.iter_mut().zip(vals) {
            *o = d * v as f32;
        }
    }
}

/// Dequantizes `n` rows of `k` weights to f32 (row-major), for the GEMM
/// path of long prefills: SIMD where the CPU has it, rows split across the
/// pool.
pub fn dequantize(kind: Kind, w: &[u8], n: usize, k: usize, path: Path) -> Vec<f32> {
    assert!(k % QK == 0 && w.len() == n * k / QK * kind.block_bytes(), "weight bytes do not match {n} rows of {k}");
    let mut out = vec![0f32; n * k];
    let row_bytes = k / QK * kind.block_bytes();
    let out_ptr = out.as_mut_ptr() as usize;
    let simd = path.resolve() != Path::Scalar;
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(ROWS_PER_ITEM), |range| {
        let r0 = range.start * ROWS_PER_ITEM;
        let r1 = n.min(range.end * ROWS_PER_ITEM);
        // SAFETY: workers get disjoint row ranges of `out`.
        let dst = unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add(r0 * k), (r1 - r0) * k) };
        let src = &w[r0 * row_bytes..r1 * row_bytes];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2, FMA and F16C are present; whole blocks on both sides.
            unsafe { avx2::dequantize_blocks(kind, src, dst) };
            return;
        }
        let _ = simd;
        dequantize_blocks_scalar(kind, src, dst);
    });
    out
}

/// Dot products of weight row `row` (its bytes) with activation rows
/// `i0 .. i0 + t`, written to `out[..t]`. Scalar reference.
fn row_dots_scalar(kind: Kind, row: &[u8], a: &QActs, i0: usize, t: usize, out: &mut [f32]) {
    let bb = kind.block_bytes();
    let nb = a.k / QK;
    let mut vals = [0i8; QK];
    let mut acc = [0f32; TILE];
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let dw = unpack_scalar(kind, blk, &mut vals);
        for (ti, acc) in acc.iter_mut().enumerate().take(t) {
            let i = i0 + ti;
            let qa = &a.q[i * a.k + b * QK..i * a.k + (b + 1) * QK];
            let s: i32 = vals.iter().zip(qa).map(|(w, x)| *w as i32 * *x as i32).sum();
            *acc += dw * a.d[i * nb + b] * s as f32;
        }
    }
    out[..t].copy_from_slice(&acc[..t]);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Kind, QActs, PREFETCH_BYTES, QK};
    use std::arch::x86_64::*;

    /// A Q5_0 block's 32 low nibbles, weight `j` in byte `j` (the fifth
    /// bits not yet added; each path adds them its own way).
    #[inline(always)]
    pub(super) unsafe fn nibbles(blk: *const u8) -> __m256i {
        let qs = _mm_loadu_si128(blk.add(6) as *const __m128i);
        let m4 = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(qs, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
        _mm256_set_m128i(hi, lo)
    }

    /// The 32 signed values of one weight block in one register.
    #[inline(always)]
    unsafe fn unpack(kind: Kind, blk: *const u8) -> __m256i {
        match kind {
            Kind::Q5_0 => {
                let nib = nibbles(blk);
                // Byte i of `bits` is 0xFF when bit i of qh is set.
                let qh = (blk.add(2) as *const u32).read_unaligned();
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh as i32),
                    _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
                );
                let bits = _mm256_cmpeq_epi8(
                    _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64)),
                    _mm256_set1_epi64x(-1),
                );
                // Without the high bit the value is nibble - 16: nibble | 0xF0 as i8.
                _mm256_or_si256(nib, _mm256_andnot_si256(bits, _mm256_set1_epi8(0xF0_u8 as i8)))
            }
            Kind::Q8_0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
        }
    }

    #[inline(always)]
    pub(super) unsafe fn scale(blk: *const u8) -> f32 {
        let bits = (blk as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The f16 scales of the blocks at byte `at` of `R <= 4` weight rows
    /// (`row_bytes` apart), converted in one instruction.
    #[inline(always)]
    pub(super) unsafe fn group_scales<const R: usize>(w: *const u8, row_bytes: usize, at: usize) -> __m128 {
        let mut bits = 0u64;
        for r in 0..R {
            bits |= ((w.add(r * row_bytes + at) as *const u16).read_unaligned() as u64) << (16 * r);
        }
        _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64))
    }

    /// Blocks whose scales [`row_scales`] converts at a time.
    pub(super) const SEG: usize = 64;

    /// Tiles of fewer rows than this convert the scales first; in wider
    /// tiles each block's rows give the scale's latency enough work to hide
    /// behind, and the extra pass cost more than it saved (kbench, 16 rows
    /// on 4864x896: 1.53 ms with it against 1.39 without).
    pub(super) const SCALES_FIRST_BELOW: usize = 4;

    /// The f32 scales of `n <= SEG` consecutive blocks, eight per
    /// conversion, written to `out`. Converting each block's scale inside
    /// the dot-product loop put it on that loop's critical path: the
    /// compiler loads the 16 bits with `vpinsrw` into whatever register is
    /// free, often the accumulator, so each block waited for the previous
    /// block's sum (about 12 cycles a block instead of 5). Read back from
    /// memory, the scales depend on nothing.
    #[inline(always)]
    pub(super) unsafe fn row_scales(w: *const u8, bb: usize, n: usize, out: &mut [f32; SEG]) {
        let at = |b: usize| (w.add(b * bb) as *const i16).read_unaligned();
        let mut b = 0;
        while b + 8 <= n {
            let mut v = _mm_setzero_si128();
            v = _mm_insert_epi16::<0>(v, at(b) as i32);
            v = _mm_insert_epi16::<1>(v, at(b + 1) as i32);
            v = _mm_insert_epi16::<2>(v, at(b + 2) as i32);
            v = _mm_insert_epi16::<3>(v, at(b + 3) as i32);
            v = _mm_insert_epi16::<4>(v, at(b + 4) as i32);
            v = _mm_insert_epi16::<5>(v, at(b + 5) as i32);
            v = _mm_insert_epi16::<6>(v, at(b + 6) as i32);
            v = _mm_insert_epi16::<7>(v, at(b + 7) as i32);
            _mm256_storeu_ps(out.as_mut_ptr().add(b), _mm256_cvtph_ps(v));
            b += 8;
        }
        while b < n {
            out[b] = scale(w.add(b * bb));
            b += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequantize_blocks(kind: Kind, w: &[u8], out: &mut [f32]) {
        let bb = kind.block_bytes();
        let mut lanes = [0i8; QK];
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let blk = w.as_ptr().add(b * bb);
            let d = _mm256_set1_ps(scale(blk));
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, unpack(kind, blk));
            for part in 0..4 {
                let v = _mm_loadl_epi64(lanes.as_ptr().add(part * 8) as *const __m128i);
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                _mm256_storeu_ps(o.as_mut_ptr().add(part * 8), _mm256_mul_ps(f, d));
            }
        }
    }

    /// As `row_dots_scalar`, for exactly `T` activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn row_dots<const T: usize>(kind: Kind, row: &[u8], a: &QActs, i0: usize, out: &mut [f32]) {
        let bb = kind.block_bytes();
        let nb = a.k / QK;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); T];
        let w = row.as_ptr();
        let q = a.q.as_ptr();
        let d = a.d.as_ptr();
        macro_rules! block {
            ($b:expr, $dw:expr) => {{
                let (b, dw) = ($b, $dw);
                _mm_prefetch::<_MM_HINT_T0>(w.add(b * bb).wrapping_add(PREFETCH_BYTES) as *const i8);
                let x = unpack(kind, w.add(b * bb));
                let ax = _mm256_sign_epi8(x, x);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let i = i0 + t;
                    let y = _mm256_loadu_si256(q.add(i * a.k + b * QK) as *const __m256i);
                    let sy = _mm256_sign_epi8(y, x);
                    let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), ones));
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * *d.add(i * nb + b)), s, *acc);
                }
            }};
        }
        if T < SCALES_FIRST_BELOW {
            let mut dws = [0f32; SEG];
            for b0 in (0..nb).step_by(SEG) {
                let seg = SEG.min(nb - b0);
                row_scales(w.add(b0 * bb), bb, seg, &mut dws);
                for (j, &dw) in dws[..seg].iter().enumerate() {
                    block!(b0 + j, dw);
                }
            }
        } else {
            for b in 0..nb {
                block!(b, scale(w.add(b * bb)));
            }
        }
        for (o, v) in out.iter_mut().zip(acc) {
            *o = hsum(v);
        }
    }

    /// [`super::quantize_acts_scalar`]'s blocks with AVX2, the same bits:
    /// the same maximum, scale and product per value, and `f32::round`
    /// (halves away from zero) as truncation plus one step where the
    /// exact remainder is at least a half. It ran serially on the calling
    /// thread (4% of a 16-sequence decode step, with `roundf` a call per
    /// value) while the pool's other threads waited.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (b, (xs, qs)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
            let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(xs.as_ptr().add(o)));
            let m = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let inv = _mm256_set1_ps(inv);
            let r = v.map(|v| {
                let p = _mm256_mul_ps(v, inv);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
                let rem = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
                let step = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(rem, half), _mm256_or_ps(one, _mm256_and_ps(sign, p)));
                _mm256_cvttps_epi32(_mm256_add_ps(t, step))
            });
            let lo = _mm256_packs_epi32(r[0], r[1]);
            let hi = _mm256_packs_epi32(r[2], r[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
            _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, bytes);
            d[b] = half::f16::from_f32(scale).to_f32();
        }
    }

    /// As [`super::vnni::rows_dot`] on AVX2: `R` weight rows against
    /// activation row `i`, each row's lanes computed exactly as
    /// `row_dots::<1>` computes them.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_dot<const Q8: bool, const R: usize>(
        w: *const u8,
        row_bytes: usize,
        a: &QActs,
        i: usize,
        out: &mut [f32],
    ) {
        let kind = if Q8 { Kind::Q8_0 } else { Kind::Q5_0 };
        let bb = if Q8 { 34 } else { 22 };
        let nb = a.k / QK;
        let q = a.q.as_ptr().add(i * a.k);
        let d = a.d.as_ptr().add(i * nb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut sc = [0f32; 4];
        for b in 0..nb {
            let y = _mm256_loadu_si256(q.add(b * QK) as *const __m256i);
            let da = _mm_set1_ps(*d.add(b));
            _mm_storeu_ps(sc.as_mut_ptr(), _mm_mul_ps(group_scales::<R>(w, row_bytes, b * bb), da));
            for (r, acc) in acc.iter_mut().enumerate() {
                let p = w.add(r * row_bytes + b * bb);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
                let x = unpack(kind, p);
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)), ones));
                *acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[r]), s, *acc);
            }
        }
        for (o, v) in out.iter_mut().zip(acc) {
            *o = hsum(v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::avx2::{group_scales, hsum, nibbles, row_scales, scale, SCALES_FIRST_BELOW, SEG};
    use super::{Kind, QActs, PREFETCH_BYTES, QK};
    use std::arch::x86_64::*;

    /// One weight block as unsigned bytes `w + kind.offset()`.
    #[inline(always)]
    unsafe fn unpack_unsigned(kind: Kind, blk: *const u8) -> __m256i {
        match kind {
            Kind::Q5_0 => {
                let nib = nibbles(blk);
                // Bit j of qh is the fifth bit of weight j, which sits in byte j.
                let qh = (blk.add(2) as *const u32).read_unaligned();
                _mm256_mask_add_epi8(nib, qh, nib, _mm256_set1_epi8(16))
            }
            Kind::Q8_0 => _mm256_xor_si256(_mm256_loadu_si256(blk.add(2) as *const __m256i), _mm256_set1_epi8(0x80_u8 as i8)),
        }
    }

    /// As `avx2::row_dots`, one `vpdpbusd` per block and row in place of
    /// two sign flips, `maddubs` and `madd`; lanes start from `a.corr`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn row_dots<const T: usize>(kind: Kind, row: &[u8], a: &QActs, i0: usize, out: &mut [f32]) {
        let bb = kind.block_bytes();
        let nb = a.k / QK;
        let mut acc = [_mm256_setzero_ps(); T];
        let w = row.as_ptr();
        let q = a.q.as_ptr();
        let d = a.d.as_ptr();
        let c = a.corr.as_ptr();
        macro_rules! block {
            ($b:expr, $dw:expr) => {{
                let (b, dw) = ($b, $dw);
                _mm_prefetch::<_MM_HINT_T0>(w.add(b * bb).wrapping_add(PREFETCH_BYTES) as *const i8);
                let u = unpack_unsigned(kind, w.add(b * bb));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let i = i0 + t;
                    let y = _mm256_loadu_si256(q.add(i * a.k + b * QK) as *const __m256i);
                    let start = _mm256_loadu_si256(c.add((i * nb + b) * 8) as *const __m256i);
                    let s = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, u, y));
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * *d.add(i * nb + b)), s, *acc);
                }
            }};
        }
        if T < SCALES_FIRST_BELOW {
            let mut dws = [0f32; SEG];
            for b0 in (0..nb).step_by(SEG) {
                let seg = SEG.min(nb - b0);
                row_scales(w.add(b0 * bb), bb, seg, &mut dws);
                for (j, &dw) in dws[..seg].iter().enumerate() {
                    block!(b0 + j, dw);
                }
            }
        } else {
            for b in 0..nb {
                block!(b, scale(w.add(b * bb)));
            }
        }
        for (o, v) in out.iter_mut().zip(acc) {
            *o = hsum(v);
        }
    }

    /// Several weight rows against one activation row at a time (decode).
    ///
    /// Each row's lanes see exactly the operations of [`row_dots`] with one
    /// activation row, in the same order, so the products are the same bits;
    /// what changes is that the activation block, its correction and its
    /// scale are loaded once for `R` rows, the `R` accumulators are
    /// independent chains, and the block type and size are constants.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_dot<const Q8: bool, const R: usize>(
        w: *const u8,
        row_bytes: usize,
        a: &QActs,
        i: usize,
        out: &mut [f32],
    ) {
        let kind = if Q8 { Kind::Q8_0 } else { Kind::Q5_0 };
        let bb = if Q8 { 34 } else { 22 };
        let nb = a.k / QK;
        let q = a.q.as_ptr().add(i * a.k);
        let d = a.d.as_ptr().add(i * nb);
        let c = a.corr.as_ptr().add(i * nb * 8);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut sc = [0f32; 4];
        for b in 0..nb {
            let y = _mm256_loadu_si256(q.add(b * QK) as *const __m256i);
            let start = _mm256_loadu_si256(c.add(b * 8) as *const __m256i);
            let da = _mm_set1_ps(*d.add(b));
            // The R scales in one conversion, multiplied by the activation's,
            // then broadcast from memory (a load, off the arithmetic ports).
            _mm_storeu_ps(sc.as_mut_ptr(), _mm_mul_ps(group_scales::<R>(w, row_bytes, b * bb), da));
            for (r, acc) in acc.iter_mut().enumerate() {
                // Decode streams every weight once, faster than the hardware
                // prefetcher fetches it on its own: ask for the bytes
                // PREFETCH_BYTES ahead (never faults, even past the end).
                let p = w.add(r * row_bytes + b * bb);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
                let u = unpack_unsigned(kind, p);
                let s = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, u, y));
                *acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[r]), s, *acc);
            }
        }
        for (o, v) in out.iter_mut().zip(acc) {
            *o = hsum(v);
        }
    }
    /// `RW` weight rows (from `w`, `row_bytes` apart) against `T`
    /// activation rows `i0 ..` at once (batched decode, short prompts):
    /// each unpacked weight block meets `T` activation rows and each
    /// activation block `RW` weight rows, from registers. `dt` holds the
    /// activation scales block-major (`dt[b * stride + i]`, readable 8
    /// past `i0`). Every (weight row, activation row) pair sees the
    /// operations of `row_dots` in the same order, so the bits are the
    /// same. Results go to `out[r * T + t]`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const Q8: bool, const RW: usize, const T: usize>(
        w: *const u8,
        row_bytes: usize,
        a: &QActs,
        dt: &[f32],
        stride: usize,
        i0: usize,
        out: &mut [f32],
    ) {
        let kind = if Q8 { Kind::Q8_0 } else { Kind::Q5_0 };
        let bb = if Q8 { 34 } else { 22 };
        let nb = a.k / QK;
        debug_assert!(RW <= 4 && T <= 8 && out.len() >= RW * T);
        debug_assert!(dt.len() >= (nb - 1) * stride + i0 + 8);
        let q = a.q.as_ptr();
        let c = a.corr.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); T]; RW];
        let mut dws = [0f32; 4];
        let mut sc = [[0f32; 8]; RW];
        for b in 0..nb {
            _mm_storeu_ps(dws.as_mut_ptr(), group_scales::<RW>(w, row_bytes, b * bb));
            let da = _mm256_loadu_ps(dt.as_ptr().add(b * stride + i0));
            let mut u = [_mm256_setzero_si256(); RW];
            for r in 0..RW {
                _mm256_storeu_ps(sc[r].as_mut_ptr(), _mm256_mul_ps(_mm256_broadcast_ss(&dws[r]), da));
                let p = w.add(r * row_bytes + b * bb);
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
                u[r] = unpack_unsigned(kind, p);
            }
            for t in 0..T {
                let i = i0 + t;
                let y = _mm256_loadu_si256(q.add(i * a.k + b * QK) as *const __m256i);
                let start = _mm256_loadu_si256(c.add((i * nb + b) * 8) as *const __m256i);
                for r in 0..RW {
                    let s = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, u[r], y));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&sc[r][t]), s, acc[r][t]);
                }
            }
        }
        for r in 0..RW {
            for t in 0..T {
                out[r * T + t] = hsum(acc[r][t]);
            }
        }
    }
}

/// Batched products with two weight rows per 512-bit register: each
/// `vpdpbusd`, conversion and fused multiply-add does the work of two in
/// 256 bits, at the same rate on this machine (a loop of independent
/// `vpdpbusd` ran 0.17 ns each for ymm and zmm). kbench, 4864x896 Q5_0, one
/// thread, 16 activation rows: 14.9 ns per weight block with the 4x4 ymm
/// tiles, 9.8 here (Q8_0 12.5 and 8.8); a 16-sequence decode step of the
/// default model went from 137 to 104 ms.
#[cfg(target_arch = "x86_64")]
mod pairs {
    use super::avx2::{group_scales, hsum};
    use super::{PREFETCH_BYTES, QK};
    use std::arch::x86_64::*;

    /// Most activation rows one pair tile takes: two weight rows against
    /// up to 16 activation rows are 16 of the 32 vector registers.
    pub(super) const MAX_T: usize = 16;

    /// Which 4-byte group (32-bit lane of the one-row kernels) of a block
    /// each 32-bit lane of a pair register holds: the two weight rows'
    /// lanes alternate (even: the first row), in the order that
    /// `unpacklo/hi_epi32` and one 256-bit insert leave them.
    pub(super) const GROUP: [u32; 16] = [0, 0, 1, 1, 4, 4, 5, 5, 2, 2, 3, 3, 6, 6, 7, 7];

    /// Where the first row's lanes 0..8 sit in a pair register (the second
    /// row's are one further), to gather them back into the one-row order.
    const FIRST: [u32; 8] = [0, 2, 8, 10, 4, 6, 12, 14];

    /// The activations laid out for [`tile`]: per row and block, 64 bytes
    /// with each 4-byte group where [`GROUP`] says, as unsigned bytes
    /// `q + 128` (VNNI multiplies unsigned by signed; here the weights are
    /// the signed side).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn lay_out(q: &[i8]) -> Vec<u8> {
        let mut out = vec![0u8; q.len() * 2];
        let idx = _mm512_loadu_si512(GROUP.as_ptr() as *const _);
        let flip = _mm512_set1_epi8(0x80_u8 as i8);
        for (b, o) in q.chunks_exact(QK).zip(out.chunks_exact_mut(2 * QK)) {
            let y = _mm512_castsi256_si512(_mm256_loadu_si256(b.as_ptr() as *const __m256i));
            let v = _mm512_xor_si512(_mm512_permutexvar_epi32(idx, y), flip);
            _mm512_storeu_si512(o.as_mut_ptr() as *mut _, v);
        }
        out
    }

    /// One weight block as signed bytes.
    #[inline(always)]
    unsafe fn unpack_signed<const Q8: bool>(blk: *const u8) -> __m256i {
        if Q8 {
            return _mm256_loadu_si256(blk.add(2) as *const __m256i);
        }
        let nib = super::avx2::nibbles(blk);
        // Weight j is its nibble, less 16 unless bit j of qh is set.
        let qh = (blk.add(2) as *const u32).read_unaligned();
        _mm256_mask_sub_epi8(nib, !qh, nib, _mm256_set1_epi8(16))
    }

    /// One activation row's step of [`tile`]: `acc += sc * f32(start +
    /// dpbusd(y, x))` with the activation block `y` loaded from `y_at` and
    /// the scale pair `sc` broadcast from `sc_at`, both by loads. Written
    /// as `asm!`: from intrinsics the compiler hoisted all 16 rows' loads
    /// to the top of the block and spilled them (16 stores and reloads a
    /// block), or rebuilt the scale pairs with shuffles, which compete
    /// with the products for the vector ports.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn pair_step(acc: &mut __m512, y_at: *const u8, sc_at: *const f32, start: __m512i, x: __m512i) {
        // Named scratch outputs: `out(zmm_reg) _` came out as invalid
        // register names once inlined (rustc nightly 2026-05).
        let (_y, _s): (__m512, __m512);
        std::arch::asm!(
            "vmovdqu64 {y:z}, zmmword ptr [{ya}]",
            "vmovdqa64 {s:z}, {start:z}",
            "vpdpbusd {s:z}, {y:z}, {x:z}",
            "vcvtdq2ps {s:z}, {s:z}",
            "vbroadcastsd {y:z}, qword ptr [{sa}]",
            "vfmadd231ps {acc:z}, {y:z}, {s:z}",
            acc = inout(zmm_reg) *acc,
            y = out(zmm_reg) _y,
            s = out(zmm_reg) _s,
            ya = in(reg) y_at,
            sa = in(reg) sc_at,
            start = in(zmm_reg) start,
            x = in(zmm_reg) x,
            options(readonly, nostack, preserves_flags),
        );
    }

    /// Offset in the scale-pair buffer of activation row `t`'s pair (see
    /// `tile`: `unpacklo/hi_ps` of two 16-wide rows of scales).
    const fn pair_at(t: usize) -> usize {
        let (l, j) = (t / 4, t % 4);
        if j < 2 {
            4 * l + 2 * j
        } else {
            16 + 4 * l + 2 * (j - 2)
        }
    }

    /// Two weight rows (`w`, `row_bytes` apart) against `T` activation rows
    /// `i0 ..` (batched decode, short prompts), two products per 512-bit
    /// instruction: the rows' 32-bit lanes alternate in one register, each
    /// activation block (laid out by [`lay_out`]) meets both at once, and
    /// each lane starts from `-128` times the sum of its four weights (the
    /// activations enter as `q + 128`). A lane ends up holding the same
    /// integer as in `vnni::row_dots` and goes through the same conversion
    /// and fused multiply-add with the same scale (`dw * da`, one f32
    /// product); the first row's eight lanes are gathered back into their
    /// one-row order for the same final sum. So every (weight row,
    /// activation row) pair gives the same bits as alone. `dt` holds the
    /// activation scales block-major (`dt[b * stride + i]`, readable 16
    /// past `i0`). Results go to `out[r * T + t]`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile<const Q8: bool, const T: usize>(
        w: *const u8,
        row_bytes: usize,
        au: &[u8],
        nb: usize,
        dt: &[f32],
        stride: usize,
        i0: usize,
        out: &mut [f32],
    ) {
        let bb = if Q8 { 34 } else { 22 };
        debug_assert!(T <= MAX_T && out.len() >= 2 * T);
        debug_assert!(au.len() >= (i0 + T) * nb * 2 * QK);
        debug_assert!(dt.len() >= (nb - 1) * stride + i0 + MAX_T);
        let a = au.as_ptr().add(i0 * nb * 2 * QK);
        let mut acc = [_mm512_setzero_ps(); T];
        let mut sp = [0f32; 2 * MAX_T];
        let k128 = _mm512_set1_epi8(0x80_u8 as i8);
        let zero = _mm512_setzero_si512();
        for b in 0..nb {
            // Scales: dw * da for both rows and every activation row, stored
            // as (first row, second row) pairs for 64-bit broadcasts.
            let dws = group_scales::<2>(w, row_bytes, b * bb);
            let da = _mm512_loadu_ps(dt.as_ptr().add(b * stride + i0));
            let s0 = _mm512_mul_ps(_mm512_set1_ps(_mm_cvtss_f32(dws)), da);
            let s1 = _mm512_mul_ps(_mm512_set1_ps(_mm_cvtss_f32(_mm_movehdup_ps(dws))), da);
            _mm512_storeu_ps(sp.as_mut_ptr(), _mm512_unpacklo_ps(s0, s1));
            _mm512_storeu_ps(sp.as_mut_ptr().add(16), _mm512_unpackhi_ps(s0, s1));
            let p0 = w.add(b * bb);
            let p1 = p0.add(row_bytes);
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(PREFETCH_BYTES) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(p1.wrapping_add(PREFETCH_BYTES) as *const i8);
            let (x0, x1) = (unpack_signed::<Q8>(p0), unpack_signed::<Q8>(p1));
            let x = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_unpacklo_epi32(x0, x1)),
                _mm256_unpackhi_epi32(x0, x1),
            );
            let start = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, k128, x));
            // Written out for each t (a loop kept the accumulators in memory).
            macro_rules! act {
                ($($t:literal)*) => {$(
                    if $t < T {
                        const AT: usize = pair_at($t);
                        pair_step(&mut acc[$t], a.add(($t * nb + b) * 2 * QK), sp.as_ptr().add(AT), start, x);
                    }
                )*};
            }
            act!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        }
        let first = _mm512_castsi256_si512(_mm256_loadu_si256(FIRST.as_ptr() as *const __m256i));
        let second = _mm512_add_epi32(first, _mm512_set1_epi32(1));
        for (t, acc) in acc.iter().enumerate() {
            out[t] = hsum(_mm512_castps512_ps256(_mm512_permutexvar_ps(first, *acc)));
            out[T + t] = hsum(_mm512_castps512_ps256(_mm512_permutexvar_ps(second, *acc)));
        }
    }
}

/// AVX-512 VNNI with byte masks and 256-bit forms (Ice Lake, Sapphire
/// Rapids, Zen 4 and later), on top of AVX2.
pub fn have_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        have_avx2()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn have_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which code path [`matmul`] takes (tests run each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The fastest the CPU has: AVX-512 VNNI, else AVX2, else scalar.
    Auto,
    /// AVX2 (falls back to scalar on CPUs without it).
    Avx2,
    Scalar,
}

impl Path {
    /// The path `matmul` actually takes on this CPU.
    pub fn resolve(self) -> Path {
        match self {
            Path::Auto if have_vnni() => Path::Auto,
            Path::Auto | Path::Avx2 if have_avx2() => Path::Avx2,
            _ => Path::Scalar,
        }
    }
}

fn row_dots(kind: Kind, row: &[u8], a: &QActs, i0: usize, t: usize, out: &mut [f32], path: Path) {
    #[cfg(target_arch = "x86_64")]
    if path == Path::Auto && !a.corr.is_empty() {
        // SAFETY: `resolve` chose this path, so the CPU has AVX-512 VNNI,
        // BW and VL besides AVX2; `a.corr` holds 8 lanes per block.
        unsafe {
            match t {
                1 => vnni::row_dots::<1>(kind, row, a, i0, out),
                2 => vnni::row_dots::<2>(kind, row, a, i0, out),
                3 => vnni::row_dots::<3>(kind, row, a, i0, out),
                4 => vnni::row_dots::<4>(kind, row, a, i0, out),
                5 => vnni::row_dots::<5>(kind, row, a, i0, out),
                6 => vnni::row_dots::<6>(kind, row, a, i0, out),
                7 => vnni::row_dots::<7>(kind, row, a, i0, out),
                _ => vnni::row_dots::<8>(kind, row, a, i0, out),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if path != Path::Scalar {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); `row`
        // holds k / 32 whole blocks and `a` rows i0 .. i0 + t of k values.
        unsafe {
            match t {
                1 => avx2::row_dots::<1>(kind, row, a, i0, out),
                2 => avx2::row_dots::<2>(kind, row, a, i0, out),
                3 => avx2::row_dots::<3>(kind, row, a, i0, out),
                4 => avx2::row_dots::<4>(kind, row, a, i0, out),
                5 => avx2::row_dots::<5>(kind, row, a, i0, out),
                6 => avx2::row_dots::<6>(kind, row, a, i0, out),
                7 => avx2::row_dots::<7>(kind, row, a, i0, out),
                _ => avx2::row_dots::<8>(kind, row, a, i0, out),
            }
        }
        return;
    }
    row_dots_scalar(kind, row, a, i0, t, out)
}

/// Weight rows one activation row meets at a time (decode): enough
/// independent accumulators to hide the FMA latency, with the activation
/// block loaded once for all of them.
const ROW_GROUP: usize = 4;

/// `g` (1 or [`ROW_GROUP`]) weight rows from `w` against the single
/// activation row of `a`, on a SIMD `path` (resolved, not scalar).
///
/// # Safety
/// `w` must hold `g` whole rows of `row_bytes`, and the CPU must have the
/// path's instructions.
unsafe fn rows_dot(kind: Kind, w: *const u8, row_bytes: usize, a: &QActs, g: usize, out: &mut [f32], path: Path) {
    #[cfg(target_arch = "x86_64")]
    {
        let vnni = path == Path::Auto && !a.corr.is_empty();
        match (vnni, kind, g) {
            (true, Kind::Q5_0, ROW_GROUP) => vnni::rows_dot::<false, ROW_GROUP>(w, row_bytes, a, 0, out),
            (true, Kind::Q8_0, ROW_GROUP) => vnni::rows_dot::<true, ROW_GROUP>(w, row_bytes, a, 0, out),
            (true, Kind::Q5_0, _) => vnni::rows_dot::<false, 1>(w, row_bytes, a, 0, out),
            (true, Kind::Q8_0, _) => vnni::rows_dot::<true, 1>(w, row_bytes, a, 0, out),
            (false, Kind::Q5_0, ROW_GROUP) => avx2::rows_dot::<false, ROW_GROUP>(w, row_bytes, a, 0, out),
            (false, Kind::Q8_0, ROW_GROUP) => avx2::rows_dot::<true, ROW_GROUP>(w, row_bytes, a, 0, out),
            (false, Kind::Q5_0, _) => avx2::rows_dot::<false, 1>(w, row_bytes, a, 0, out),
            (false, Kind::Q8_0, _) => avx2::rows_dot::<true, 1>(w, row_bytes, a, 0, out),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let row = std::slice::from_raw_parts(w, g * row_bytes);
        for (j, o) in out[..g].iter_mut().enumerate() {
            row_dots_scalar(kind, &row[j * row_bytes..(j + 1) * row_bytes], a, 0, 1, std::slice::from_mut(o));
        }
    }
}

/// Weight rows and activation rows in one VNNI tile of a many-row product:
/// 16 accumulators of the 32 registers. kbench, 4864x896, 16 rows, 2
/// threads: 8.4–9.3 ns per weight block (Q5_0) and 7.3–7.6 (Q8_0), against
/// 8.4–8.8 and 8.5 for 2 x 8 and 10.2–11.3 and 10.0–11.4 for one weight row
/// against 8 activation rows (`row_dots`).
const TILE_ROWS: usize = 4;
const TILE_ACTS: usize = 4;

/// [`vnni::tile`] for `g` (1 or [`TILE_ROWS`]) weight rows and `t` (1 to
/// [`TILE_ACTS`]) activation rows.
///
/// # Safety
/// As `vnni::tile`; the CPU must have AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn vnni_tile(
    kind: Kind,
    w: *const u8,
    row_bytes: usize,
    a: &QActs,
    dt: &[f32],
    stride: usize,
    i0: usize,
    g: usize,
    t: usize,
    out: &mut [f32],
) {
    macro_rules! by_t {
        ($q8:expr, $rw:expr) => {
            match t {
                1 => vnni::tile::<$q8, $rw, 1>(w, row_bytes, a, dt, stride, i0, out),
                2 => vnni::tile::<$q8, $rw, 2>(w, row_bytes, a, dt, stride, i0, out),
                3 => vnni::tile::<$q8, $rw, 3>(w, row_bytes, a, dt, stride, i0, out),
                _ => vnni::tile::<$q8, $rw, TILE_ACTS>(w, row_bytes, a, dt, stride, i0, out),
            }
        };
    }
    match (kind, g) {
        (Kind::Q5_0, TILE_ROWS) => by_t!(false, TILE_ROWS),
        (Kind::Q8_0, TILE_ROWS) => by_t!(true, TILE_ROWS),
        (Kind::Q5_0, _) => by_t!(false, 1),
        (Kind::Q8_0, _) => by_t!(true, 1),
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn vnni_tile(_: Kind, _: *const u8, _: usize, _: &QActs, _: &[f32], _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("VNNI is x86-64 only")
}

/// Most activation rows in one pair tile.
#[cfg(target_arch = "x86_64")]
const PAIR_T: usize = pairs::MAX_T;
#[cfg(not(target_arch = "x86_64"))]
const PAIR_T: usize = 16;

/// Fewest activation rows a pair tile takes; fewer go through the 4x4
/// tiles, which unpack each weight block for fewer rows (kbench,
/// 4864x896, one thread: 4 rows Q5_0 3.71 ns per weight block in 4x4
/// tiles against 4.39 in pairs; 8 rows 7.40 against 6.28; 16 rows 14.9
/// against 9.9).
const PAIR_MIN_T: usize = 8;

/// Activation rows the next pair tile takes when `left` (at least
/// [`PAIR_MIN_T`]) remain.
fn pair_width(left: usize) -> usize {
    if left >= 16 {
        16
    } else {
        8
    }
}

/// [`pairs::tile`] for `t` (from [`pair_width`]) activation rows.
///
/// # Safety
/// As `pairs::tile`; the CPU must have AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn pair_tile(
    kind: Kind,
    w: *const u8,
    row_bytes: usize,
    au: &[u8],
    nb: usize,
    dt: &[f32],
    stride: usize,
    i0: usize,
    t: usize,
    out: &mut [f32],
) {
    macro_rules! by_t {
        ($q8:expr) => {
            match t {
                16 => pairs::tile::<$q8, 16>(w, row_bytes, au, nb, dt, stride, i0, out),
                _ => pairs::tile::<$q8, 8>(w, row_bytes, au, nb, dt, stride, i0, out),
            }
        };
    }
    match kind {
        Kind::Q5_0 => by_t!(false),
        Kind::Q8_0 => by_t!(true),
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn pair_tile(_: Kind, _: *const u8, _: usize, _: &[u8], _: usize, _: &[f32], _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("VNNI is x86-64 only")
}

/// Weight rows handed to a worker at a time.
const ROWS_PER_ITEM: usize = 16;

/// `x` (`m` rows of `k`) times the transpose of `w` (`n` rows of `k` in
/// `kind` blocks): `m` rows of `n`, row-major. `k` must be a multiple of 32.
pub fn matmul(kind: Kind, w: &[u8], n: usize, k: usize, x: &[f32], path: Path) -> Vec<f32> {
    assert!(k % QK == 0, "row length {k} is not a multiple of {QK}");
    let row_bytes = k / QK * kind.block_bytes();
    assert_eq!(w.len(), n * row_bytes, "weight bytes do not match {n} rows of {k}");
    assert!(x.len() % k == 0, "activations are not whole rows of {k}");
    let m = x.len() / k;
    let path = path.resolve();
    let nb = k / QK;
    let mut a = quantize_acts(x, k);
    // Many rows on VNNI go through pair tiles (two weight rows a register),
    // with a single-row tile for an odd last row; one row through `rows_dot`.
    let tiles = path == Path::Auto && m > 1;
    // The one-row kernel and the 4x4 tiles (fewer than PAIR_MIN_T rows
    // left, or weight rows not a multiple of 4) start from corrections.
    let needs_corr = !tiles || m % PAIR_MIN_T != 0 || n % TILE_ROWS != 0;
    if path == Path::Auto && needs_corr {
        a.corr = lane_corrections(&a.q, kind.offset());
    }
    // The activations laid out for the pair tiles, and their scales
    // block-major, padded so that a tile can always load 16.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `tiles` means `resolve` chose VNNI.
    let au = if tiles && m >= PAIR_MIN_T { unsafe { pairs::lay_out(&a.q) } } else { Vec::new() };
    #[cfg(not(target_arch = "x86_64"))]
    let au: Vec<u8> = Vec::new();
    let stride = m + PAIR_T;
    let dt = if tiles {
        let mut dt = vec![0f32; nb * stride];
        for i in 0..m {
            for b in 0..nb {
                dt[b * stride + i] = a.d[i * nb + b];
            }
        }
        dt
    } else {
        Vec::new()
    };
    let mut out = vec![0f32; m * n];
    let out_ptr = out.as_mut_ptr() as usize;
    let items = n.div_ceil(ROWS_PER_ITEM);
    let work = |range: std::ops::Range<usize>| {
        let mut dots = [0f32; TILE];
        if m == 1 && path != Path::Scalar {
            let r1 = n.min(range.end * ROWS_PER_ITEM);
            let mut r = range.start * ROWS_PER_ITEM;
            while r < r1 {
                let g = if r1 - r >= ROW_GROUP { ROW_GROUP } else { 1 };
                // SAFETY: rows r .. r + g < n are whole rows of `w`.
                unsafe { rows_dot(kind, w[r * row_bytes..].as_ptr(), row_bytes, &a, g, &mut dots, path) };
                for (j, v) in dots[..g].iter().enumerate() {
                    // SAFETY: as below; this worker owns rows r .. r + g.
                    unsafe { *(out_ptr as *mut f32).add(r + j) = *v };
                }
                r += g;
            }
            return;
        }
        if tiles {
            let mut tile_out = [0f32; 2 * PAIR_T];
            let r1 = n.min(range.end * ROWS_PER_ITEM);
            let mut r = range.start * ROWS_PER_ITEM;
            while r < r1 {
                let g = if r1 - r >= TILE_ROWS { TILE_ROWS } else { 1 };
                let wr = w[r * row_bytes..].as_ptr();
                let put = |i0: usize, j0: usize, g: usize, t: usize, tile_out: &[f32]| {
                    for j in 0..g {
                        for ti in 0..t {
                            // SAFETY: as below; this worker owns rows r .. r + g.
                            unsafe { *(out_ptr as *mut f32).add((i0 + ti) * n + r + j0 + j) = tile_out[j * t + ti] };
                        }
                    }
                };
                let mut i0 = 0;
                if g == TILE_ROWS {
                    while m - i0 >= PAIR_MIN_T {
                        let t = pair_width(m - i0);
                        for j0 in (0..TILE_ROWS).step_by(2) {
                            // SAFETY: `resolve` chose VNNI; rows r + j0, r +
                            // j0 + 1 < n are whole; `au` holds the m laid-out
                            // rows; `dt` is padded by PAIR_T past each block's.
                            unsafe { pair_tile(kind, wr.add(j0 * row_bytes), row_bytes, &au, nb, &dt, stride, i0, t, &mut tile_out) };
                            put(i0, j0, 2, t, &tile_out);
                        }
                        i0 += t;
                    }
                }
                while i0 < m {
                    let t = TILE_ACTS.min(m - i0);
                    // SAFETY: as above, rows r .. r + g; `a.corr` is there
                    // whenever these tiles run (see `needs_corr`).
                    unsafe { vnni_tile(kind, wr, row_bytes, &a, &dt, stride, i0, g, t, &mut tile_out) };
                    put(i0, 0, g, t, &tile_out);
                    i0 += t;
                }
                r += g;
            }
            return;
        }
        for item in range {
            for r in item * ROWS_PER_ITEM..n.min((item + 1) * ROWS_PER_ITEM) {
                let row = &w[r * row_bytes..(r + 1) * row_bytes];
                for i0 in (0..m).step_by(TILE) {
                    let t = TILE.min(m - i0);
                    row_dots(kind, row, &a, i0, t, &mut dots, path);
                    for (ti, v) in dots[..t].iter().enumerate() {
                        // SAFETY: each (row i, column r) is written by the one
                        // worker that owns weight row r; i < m, r < n.
                        unsafe { *(out_ptr as *mut f32).add((i0 + ti) * n + r) = *v };
                    }
                }
            }
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(items, work);
    out
}
