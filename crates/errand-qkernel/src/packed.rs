//! Weights repacked at load, [`ROWS`] rows interleaved per block, so that
//! one 512-bit register holds 4 weights of each of 16 rows and a VNNI
//! `vpdpbusd` against 4 activations broadcast to every lane adds 64
//! products into 16 per-row sums. Eight of them finish a block: every lane
//! then holds one row's whole block sum, so each (block, activation row)
//! costs one conversion, one scale product and one FMA for 16 weight rows,
//! where the file's layout (`pairs`, the 4x4 tiles) needs that for every
//! 2 rows and sums lanes at the end. The accumulators are the output rows
//! themselves: no horizontal sums.
//!
//! Arithmetic, the same on every path and for every batch size: for weight
//! row `r` and activation row `t`, `acc = fma(float(int_b), d_rb * d_tb,
//! acc)` over blocks `b` in order from 0, where `int_b` is the exact
//! integer block product. That is also the order candle's and ggml's
//! scalar code adds in, so a product differs from theirs only where they
//! round the scale product differently.
//!
//! Layout of one block of one group of 16 rows:
//! - 16 `f16` scales as the file has them, row by row (32 bytes);
//! - Q8_0: 8 registers' worth (512 bytes); register `j` holds, for row `r`
//!   at bytes `4r..4r + 4`, weights `4j..4j + 4` of the block plus 128
//!   (unsigned);
//! - Q5_0: 4 registers of nibbles (256 bytes), register `i` holding at
//!   bytes `4r..4r + 4` the file's bytes `4i..4i + 4` of row `r`'s block
//!   (low nibbles: weights `4i..4i + 4`, high nibbles: weights `16 + 4i..`),
//!   then 8 `u64` masks (64 bytes), mask `j` holding at bit `4r + e` the
//!   fifth bit of weight `4j + e` of row `r`. Values are 0..31, the weight
//!   plus 16.
//!
//! The same bytes as the file's blocks (22 per 32 Q5_0 weights, 34 for
//! Q8_0): decode streams every weight once per token, so a bigger layout
//! would cost one-row speed (with `f32` scales, 24 and 36 bytes, decode ran
//! 0.89x llama.cpp's on an AVX2 machine). The file's bytes are dropped once
//! packed.

use super::{quantize_acts, Kind, Path, PREFETCH_BYTES, QK};

/// Weight rows interleaved in one group.
pub const ROWS: usize = 16;

/// Most activation rows one tile multiplies with a group.
pub const MAX_T: usize = 16;

/// Activation rows whose blocks a worker keeps hot (in L2) while it walks
/// its groups: each group's weights are then read once per this many rows.
const ROW_CHUNK: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A matrix of `n` rows of `k` weights in the interleaved layout.
pub struct Packed {
    kind: Kind,
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

/// Bytes of one block of one group.
fn block_bytes(kind: Kind) -> usize {
    match kind {
        Kind::Q5_0 => 352,
        Kind::Q8_0 => 544,
    }
}

/// Where a packed block's weights start (after 16 f16 scales).
const W: usize = 32;

/// Where a packed Q5_0 block's masks start.
const MASKS: usize = W + 256;

impl Packed {
    /// Repacks `n` rows of `k` weights stored as the file has them; `None`
    /// when `n` is not a multiple of [`ROWS`] or `k` of 32, or the bytes do
    /// not hold exactly that matrix.
    pub fn new(kind: Kind, w: &[u8], n: usize, k: usize) -> Option<Packed> {
        if n % ROWS != 0 || k % QK != 0 || k == 0 || w.len() != n * k / QK * kind.block_bytes() {
            return None;
        }
        let nb = k / QK;
        let fb = kind.block_bytes();
        let bb = block_bytes(kind);
        let mut lines = vec![Line([0; 64]); (n / ROWS * nb * bb).div_ceil(64)];
        // SAFETY: `Line` is 64 plain bytes; the vector is viewed as bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, lines.len() * 64) };
        for g in 0..n / ROWS {
            for b in 0..nb {
                let o = &mut out[(g * nb + b) * bb..][..bb];
                for r in 0..ROWS {
                    let src = &w[((g * ROWS + r) * nb + b) * fb..][..fb];
                    o[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
                    match kind {
                        Kind::Q8_0 => {
                            for j in 0..8 {
                                for e in 0..4 {
                                    o[W + 64 * j + 4 * r + e] = src[2 + 4 * j + e] ^ 0x80;
                                }
                            }
                        }
                        Kind::Q5_0 => {
                            let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                            for i in 0..4 {
                                o[W + 64 * i + 4 * r..][..4].copy_from_slice(&src[6 + 4 * i..][..4]);
                            }
                            for j in 0..8 {
                                let bits = ((qh >> (4 * j)) & 0xF) as u64;
                                let at = MASKS + 8 * j;
                                let mask = u64::from_le_bytes(o[at..at + 8].try_into().expect("8 bytes")) | bits << (4 * r);
                                o[at..at + 8].copy_from_slice(&mask.to_le_bytes());
                            }
                        }
                    }
                }
            }
        }
        Some(Packed { kind, n, k, lines })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Rows (outputs).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Weights per row (inputs).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.n / ROWS * (self.k / QK) * block_bytes(self.kind)
    }

    fn group(&self, g: usize) -> *const u8 {
        let nb = self.k / QK;
        // SAFETY (callers): g < n / ROWS, so the group's blocks are inside.
        unsafe { (self.lines.as_ptr() as *const u8).add(g * nb * block_bytes(self.kind)) }
    }
}

/// The activations of one product, block-major: block `b` of row `t` is
/// at `b * m + t` (32 values in `q`, a scale in `d`, and in `c` minus the
/// weights' offset times the sum of its values, the VNNI lanes' start).
struct Acts {
    m: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    c: Vec<i32>,
}

fn acts(kind: Kind, x: &[f32], k: usize) -> Acts {
    let a = quantize_acts(x, k);
    let m = x.len() / k;
    let nb = k / QK;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * nb];
    let mut c = vec![0i32; m * nb];
    for t in 0..m {
        for b in 0..nb {
            let src = &a.q[t * k + b * QK..][..QK];
            q[(b * m + t) * QK..][..QK].copy_from_slice(src);
            d[b * m + t] = a.d[t * nb + b];
            c[b * m + t] = -kind.offset() * src.iter().map(|&v| v as i32).sum::<i32>();
        }
    }
    Acts { m, q, d, c }
}

/// `x` (`m` rows of `k`) times the transpose of `p`: `m` rows of `n`,
/// row-major. Bit for bit the same on every path and for any `m` (row `t`
/// of a batch equals that row alone).
pub fn matmul(p: &Packed, x: &[f32], path: Path) -> Vec<f32> {
    let (n, k) = (p.n, p.k);
    assert!(x.len() % k == 0, "activations are not whole rows of {k}");
    let m = x.len() / k;
    let path = path.resolve();
    let a = acts(p.kind, x, k);
    let mut out = vec![0f32; m * n];
    if m == 0 {
        return out;
    }
    let groups = n / ROWS;
    // Big matrices go out four groups at a time, so a worker reuses each
    // chunk of activation rows across 64 weight rows.
    let per_item = if groups >= 64 { 4 } else { 1 };
    let items = groups.div_ceil(per_item);
    let out_ptr = out.as_mut_ptr() as usize;
    let work = |range: std::ops::Range<usize>| {
        let g0 = range.start * per_item;
        let g1 = groups.min(range.end * per_item);
        for c0 in (0..m).step_by(ROW_CHUNK) {
            let c1 = m.min(c0 + ROW_CHUNK);
            for g in g0..g1 {
                let mut t0 = c0;
                while t0 < c1 {
                    let t = MAX_T.min(c1 - t0);
                    // SAFETY: g < groups; rows t0 .. t0 + t < m; this worker
                    // alone writes columns g * 16 .. g * 16 + 16 of `out`.
                    unsafe {
                        let o = (out_ptr as *mut f32).add(t0 * n + g * ROWS);
                        tile(p.kind, p.group(g), k / QK, &a, t0, t, o, n, path);
                    }
                    t0 += t;
                }
            }
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(items, work);
    out
}

/// One group against activation rows `t0 .. t0 + t` (`t` 1 to
/// [`MAX_T`]), written to `out` (row `t0`'s first column of the group,
/// rows `n` apart).
///
/// # Safety
/// `w` must point at a whole group of `nb` blocks of `kind`; `a` must hold
/// the rows; `out` must have room; the resolved `path` must be the CPU's.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(kind: Kind, w: *const u8, nb: usize, a: &Acts, t0: usize, t: usize, out: *mut f32, n: usize, path: Path) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_t {
            ($m:ident, $q8:expr) => {
                match t {
                    1 => $m::tile::<$q8, 1>(w, nb, a, t0, out, n),
                    2 => $m::tile::<$q8, 2>(w, nb, a, t0, out, n),
                    3 => $m::tile::<$q8, 3>(w, nb, a, t0, out, n),
                    4 => $m::tile::<$q8, 4>(w, nb, a, t0, out, n),
                    5 => $m::tile::<$q8, 5>(w, nb, a, t0, out, n),
                    6 => $m::tile::<$q8, 6>(w, nb, a, t0, out, n),
                    7 => $m::tile::<$q8, 7>(w, nb, a, t0, out, n),
                    8 => $m::tile::<$q8, 8>(w, nb, a, t0, out, n),
                    9 => $m::tile::<$q8, 9>(w, nb, a, t0, out, n),
                    10 => $m::tile::<$q8, 10>(w, nb, a, t0, out, n),
                    11 => $m::tile::<$q8, 11>(w, nb, a, t0, out, n),
                    12 => $m::tile::<$q8, 12>(w, nb, a, t0, out, n),
                    13 => $m::tile::<$q8, 13>(w, nb, a, t0, out, n),
                    14 => $m::tile::<$q8, 14>(w, nb, a, t0, out, n),
                    15 => $m::tile::<$q8, 15>(w, nb, a, t0, out, n),
                    _ => $m::tile::<$q8, 16>(w, nb, a, t0, out, n),
                }
            };
        }
        match (path, kind) {
            (Path::Auto, Kind::Q8_0) => return by_t!(vnni, true),
            (Path::Auto, Kind::Q5_0) => return by_t!(vnni, false),
            (Path::Avx2, Kind::Q8_0) => return by_t!(avx2, true),
            (Path::Avx2, Kind::Q5_0) => return by_t!(avx2, false),
            _ => {}
        }
    }
    let _ = path;
    tile_scalar(kind, w, nb, a, t0, t, out, n)
}

/// Weight `4j + e` of row `r` of a packed block, plus the kind's offset.
///
/// # Safety
/// `blk` must point at a whole packed block of `kind`.
unsafe fn unsigned_at(kind: Kind, blk: *const u8, r: usize, j: usize, e: usize) -> i32 {
    match kind {
        Kind::Q8_0 => *blk.add(W + 64 * j + 4 * r + e) as i32,
        Kind::Q5_0 => {
            let byte = *blk.add(W + 64 * (j % 4) + 4 * r + e);
            let nib = if j < 4 { byte & 0x0F } else { byte >> 4 };
            let mask = u64::from_le((blk.add(MASKS + 8 * j) as *const u64).read_unaligned());
            (nib as i32) | ((((mask >> (4 * r + e)) & 1) as i32) << 4)
        }
    }
}

/// The reference: plain Rust, the arithmetic the module's docs give.
///
/// # Safety
/// As [`tile`].
#[allow(clippy::too_many_arguments)]
unsafe fn tile_scalar(kind: Kind, w: *const u8, nb: usize, a: &Acts, t0: usize, t: usize, out: *mut f32, n: usize) {
    let bb = block_bytes(kind);
    let off = kind.offset();
    for r in 0..ROWS {
        for ti in 0..t {
            let mut acc = 0f32;
            for b in 0..nb {
                let blk = w.add(b * bb);
                let idx = b * a.m + t0 + ti;
                let q = &a.q[idx * QK..][..QK];
                let mut s = 0i32;
                for j in 0..8 {
                    for e in 0..4 {
                        s += (unsigned_at(kind, blk, r, j, e) - off) * q[4 * j + e] as i32;
                    }
                }
                let dw = half::f16::from_bits(u16::from_le((blk as *const u16).add(r).read_unaligned())).to_f32();
                acc = (s as f32).mul_add(dw * a.d[idx], acc);
            }
            *out.add(ti * n + r) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{block_bytes, Acts, Kind, MASKS, PREFETCH_BYTES, QK, W};
    use std::arch::x86_64::*;

    /// The 8 registers of a block's weights as unsigned bytes.
    #[inline(always)]
    unsafe fn weights<const Q8: bool>(blk: *const u8) -> [__m512i; 8] {
        let mut wv = [_mm512_setzero_si512(); 8];
        if Q8 {
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(blk.add(W + 64 * j) as *const _);
            }
        } else {
            let low = _mm512_set1_epi8(0x0F);
            let sixteen = _mm512_set1_epi8(16);
            let masks = blk.add(MASKS) as *const u64;
            for i in 0..4 {
                let l = _mm512_loadu_si512(blk.add(W + 64 * i) as *const _);
                let lo = _mm512_and_si512(l, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(l), low);
                wv[i] = _mm512_mask_add_epi8(lo, masks.add(i).read_unaligned(), lo, sixteen);
                wv[i + 4] = _mm512_mask_add_epi8(hi, masks.add(i + 4).read_unaligned(), hi, sixteen);
            }
        }
        wv
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const Q8: bool, const T: usize>(w: *const u8, nb: usize, a: &Acts, t0: usize, out: *mut f32, n: usize) {
        let kind = if Q8 { Kind::Q8_0 } else { Kind::Q5_0 };
        let bb = block_bytes(kind);
        let mut acc = [_mm512_setzero_ps(); T];
        let (q, d, c) = (a.q.as_ptr(), a.d.as_ptr(), a.c.as_ptr());
        for b in 0..nb {
            let blk = w.add(b * bb);
            if T <= 4 {
                // Few rows: the weights stream from memory; fetch ahead.
                let ahead = blk.wrapping_add(PREFETCH_BYTES);
                for l in 0..bb.div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l) as *const i8);
                }
            }
            let sw = _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i));
            let wv = weights::<Q8>(blk);
            for (ti, acc) in acc.iter_mut().enumerate() {
                let idx = b * a.m + t0 + ti;
                let ap = q.add(idx * QK) as *const i32;
                let s = if T < 8 {
                    // Two chains: with few rows, latency would bound them.
                    let mut s0 = _mm512_set1_epi32(*c.add(idx));
                    let mut s1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        s0 = _mm512_dpbusd_epi32(s0, wv[j], _mm512_set1_epi32(ap.add(j).read_unaligned()));
                        s1 = _mm512_dpbusd_epi32(s1, wv[j + 4], _mm512_set1_epi32(ap.add(j + 4).read_unaligned()));
                    }
                    _mm512_add_epi32(s0, s1)
                } else {
                    let mut s = _mm512_set1_epi32(*c.add(idx));
                    for (j, wj) in wv.iter().enumerate() {
                        s = _mm512_dpbusd_epi32(s, *wj, _mm512_set1_epi32(ap.add(j).read_unaligned()));
                    }
                    s
                };
                let sc = _mm512_mul_ps(sw, _mm512_set1_ps(*d.add(idx)));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *acc);
            }
        }
        for (ti, v) in acc.iter().enumerate() {
            _mm512_storeu_ps(out.add(ti * n), *v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{block_bytes, Acts, Kind, MASKS, QK, W};
    use std::arch::x86_64::*;

    /// Eight rows' worth (`half` 0 or 1 of 16) of register `j`'s weights
    /// as signed values (Q8_0) or unsigned 0..31 (Q5_0).
    #[inline(always)]
    unsafe fn weights<const Q8: bool>(blk: *const u8, half: usize, j: usize) -> __m256i {
        if Q8 {
            let u = _mm256_loadu_si256(blk.add(W + 64 * j + 32 * half) as *const __m256i);
            _mm256_xor_si256(u, _mm256_set1_epi8(0x80_u8 as i8))
        } else {
            let low = _mm256_set1_epi8(0x0F);
            let l = _mm256_loadu_si256(blk.add(W + 64 * (j % 4) + 32 * half) as *const __m256i);
            let nib = if j < 4 { _mm256_and_si256(l, low) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(l), low) };
            // The 32 mask bits of these rows, spread one to a byte.
            let bits = (blk.add(MASKS + 8 * j + 4 * half) as *const u32).read_unaligned();
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
            );
            let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
            let on = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
            _mm256_or_si256(nib, _mm256_and_si256(on, _mm256_set1_epi8(16)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile<const Q8: bool, const T: usize>(w: *const u8, nb: usize, a: &Acts, t0: usize, out: *mut f32, n: usize) {
        let kind = if Q8 { Kind::Q8_0 } else { Kind::Q5_0 };
        let bb = block_bytes(kind);
        let ones = _mm256_set1_epi16(1);
        let (q, d, c) = (a.q.as_ptr(), a.d.as_ptr(), a.c.as_ptr());
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let blk = w.add(b * bb);
                let sw = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16 * half) as *const __m128i));
                let mut wv = [_mm256_setzero_si256(); 8];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = weights::<Q8>(blk, half, j);
                }
                let mut mag = [_mm256_setzero_si256(); 8];
                if Q8 {
                    for (m, v) in mag.iter_mut().zip(&wv) {
                        *m = _mm256_abs_epi8(*v);
                    }
                }
                for (ti, acc) in acc.iter_mut().enumerate() {
                    let idx = b * a.m + t0 + ti;
                    let ap = q.add(idx * QK) as *const i32;
                    macro_rules! y {
                        ($j:expr) => {
                            _mm256_set1_epi32(ap.add($j).read_unaligned())
                        };
                    }
                    let s = if Q8 {
                        // The exact sum of w * a: the sign trick keeps
                        // maddubs from saturating (|w| <= 128, |a| <= 127).
                        let mut s = _mm256_setzero_si256();
                        for j in 0..8 {
                            let p = _mm256_maddubs_epi16(mag[j], _mm256_sign_epi8(y!(j), wv[j]));
                            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                        }
                        s
                    } else {
                        // (w + 16) * a, four registers summed in 16 bits
                        // (4 * 2 * 31 * 127 < 2^15), then the correction.
                        macro_rules! quad {
                            ($j:expr) => {{
                                let j = $j;
                                let p01 = _mm256_add_epi16(_mm256_maddubs_epi16(wv[j], y!(j)), _mm256_maddubs_epi16(wv[j + 1], y!(j + 1)));
                                let p23 = _mm256_add_epi16(_mm256_maddubs_epi16(wv[j + 2], y!(j + 2)), _mm256_maddubs_epi16(wv[j + 3], y!(j + 3)));
                                _mm256_madd_epi16(_mm256_add_epi16(p01, p23), ones)
                            }};
                        }
                        _mm256_add_epi32(_mm256_set1_epi32(*c.add(idx)), _mm256_add_epi32(quad!(0), quad!(4)))
                    };
                    let sc = _mm256_mul_ps(sw, _mm256_set1_ps(*d.add(idx)));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, *acc);
                }
            }
            for (ti, v) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(ti * n + 8 * half), *v);
            }
        }
    }
}
