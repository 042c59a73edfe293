//! Attention of the query heads that share one KV head over cached keys and values
//! (stored in f16, widened to f32 exactly as they are read), in f32: the arithmetic of
//! a decode step's attention. A sequence's positions are cut
//! into chunks of [`CHUNK`] (fixed by position, so a sequence's result does not depend
//! on its batch or the thread count); each chunk is a task ([`partial`]) and
//! [`merge`] combines them. Like the matrix kernels, every path performs the same
//! float operations, so results are bit-identical on every path:
//!
//! - a score is `dot(q, k) × scale`, the dot product in sixteen lane accumulators
//!   (element `i` into lane `i % 16`, fused multiply-adds in element order) summed in
//!   one fixed tree ([`sum_lanes`]); with a soft-cap ([`Scoring`]) it is then
//!   `cap × tanh(score)` with the scale divided by the cap beforehand, as ggml caps;
//! - a chunk's weights are `exp(score - max)` over the chunk, with the exp and sum of
//!   [`super::softmax`], and its output accumulates `weight × v` per element with fused
//!   multiply-adds in position order;
//! - the merge scales each chunk's sum and output by `exp(max_chunk - max)`, adds them
//!   in chunk order and multiplies the output by `1 / sum`. With one chunk this is the
//!   plain softmax-weighted sum (the factor is exactly 1).
//!
//! The SIMD paths need a head size that is a multiple of 16 (every Llama model's is);
//! other sizes take the portable path.

// The SIMD paths are `unsafe` functions called after checking the CPU's features.
#![allow(unsafe_code)]

use half::f16;

use super::softmax::{exp, softmax_rows};
use super::Simd;

/// Positions per task.
pub const CHUNK: usize = 128;
/// Positions whose keys (or values) all heads of a group read while they stay in the
/// first-level cache: each row is fetched from memory once per group, not per head.
const BLOCK: usize = 32;
/// Lanes of the dot product's accumulators.
const LANES: usize = 16;

/// `count` rows, `stride` apart from `start` in `data` (a cache's keys or values of
/// one KV head).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f16],
    pub start: usize,
    pub stride: usize,
    pub count: usize,
}

impl Rows<'_> {
    /// Rows `from..`.
    pub fn skip(self, from: usize) -> Self {
        Rows {
            start: self.start + from * self.stride,
            count: self.count.saturating_sub(from),
            ..self
        }
    }
}

/// How a score is made of a dot product: `dot × scale`, then, where the model caps
/// attention logits (Gemma 2), `cap × tanh(score / cap)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scoring {
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl Scoring {
    /// What the dot product is multiplied by before the cap: ggml divides its scale
    /// by the cap once and caps with `cap × tanh`, so the division rounds the same.
    fn inner_scale(self) -> f32 {
        match self.softcap {
            Some(cap) => self.scale / cap,
            None => self.scale,
        }
    }

    /// The cap applied to scores made with [`inner_scale`](Self::inner_scale).
    fn cap(self, scores: &mut [f32]) {
        if let Some(cap) = self.softcap {
            // `tanhf` from `libm`, so that every platform rounds alike.
            scores.iter_mut().for_each(|s| *s = cap * libm::tanhf(*s));
        }
    }
}

/// One chunk's result for a group of heads: per head the chunk's largest score, the
/// sum of its weights, and the weighted sum of its values (`heads × head_dim`).
pub struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// The heads `q` (`heads × hd` values, one KV head's queries) over the positions of
/// `keys` and `values` (at least one; rows of `hd` values).
pub fn partial(
    q: &[f32],
    hd: usize,
    keys: Rows,
    values: Rows,
    scoring: Scoring,
    simd: Simd,
) -> Partial {
    let scale = scoring.inner_scale();
    let heads = q.len() / hd;
    let positions = keys.count.min(values.count);
    assert!(hd > 0 && q.len() == heads * hd && positions > 0);
    // Bounds checked once here, so the paths below may index without checks.
    for rows in [&keys, &values] {
        assert!(
            rows.stride >= hd && rows.start + (positions - 1) * rows.stride + hd <= rows.data.len()
        );
    }
    let simd = if hd.is_multiple_of(LANES) {
        simd
    } else {
        Simd::Portable
    };
    let mut scores = vec![0f32; heads * positions];
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx512 {
        // SAFETY: as checked above; AVX-512 present (detection).
        let done = unsafe { group_avx512(q, hd, keys, values, scoring, positions, &mut scores) };
        if let Some(partial) = done {
            return partial;
        }
    }
    // SAFETY: as checked above.
    unsafe { all_scores(q, hd, keys, values, scale, simd, &mut scores) };
    scoring.cap(&mut scores);
    let (max, sum) = softmax_rows(&mut scores, positions, simd);
    let mut out = vec![0f32; heads * hd];
    for first in (0..positions).step_by(BLOCK) {
        let n = BLOCK.min(positions - first);
        for (r, y) in out.chunks_exact_mut(hd).enumerate() {
            let weights = &scores[r * positions + first..][..n];
            // SAFETY: as above.
            unsafe { weighted_into(simd, weights, values.skip(first), y) };
        }
    }
    Partial { max, sum, out }
}

/// Every head's scores over every position (`scores`: `heads × positions`).
///
/// # Safety
/// As checked in [`partial`]; `simd`'s features are present.
unsafe fn all_scores(
    q: &[f32],
    hd: usize,
    keys: Rows,
    values: Rows,
    scale: f32,
    simd: Simd,
    scores: &mut [f32],
) {
    let positions = scores.len() / (q.len() / hd);
    #[cfg(target_arch = "x86_64")]
    if simd == Simd::Avx2 {
        // SAFETY: the caller's guarantees.
        return unsafe { scores_heads_avx2(q, hd, keys, values, scale, positions, scores) };
    }
    let _ = values;
    for first in (0..positions).step_by(BLOCK) {
        let n = BLOCK.min(positions - first);
        for (r, q) in q.chunks_exact(hd).enumerate() {
            let scores = &mut scores[r * positions + first..][..n];
            // SAFETY: the caller's guarantees.
            unsafe { scores_into(simd, q, keys.skip(first), scale, scores) };
        }
    }
}

/// The chunks of one group of heads, in position order, merged into `out`
/// (`heads × hd` values).
pub fn merge(parts: &[Partial], out: &mut [f32]) {
    let Some(first) = parts.first() else { return };
    let hd = out.len() / first.max.len().max(1);
    for (r, y) in out.chunks_exact_mut(hd).enumerate() {
        let max = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[r]));
        let mut sum = 0f32;
        y.fill(0.0);
        for part in parts {
            // The module's own `exp`, not the platform's: the same bits everywhere.
            let factor = exp(part.max[r] - max);
            sum += part.sum[r] * factor;
            for (y, &v) in y.iter_mut().zip(&part.out[r * hd..][..hd]) {
                *y += v * factor;
            }
        }
        let inv = 1.0 / sum;
        y.iter_mut().for_each(|y| *y *= inv);
    }
}

/// `scores[j] = dot(q, keys row j) × scale`.
///
/// # Safety
/// `simd`'s features are present; `keys` holds `scores.len()` rows of `q.len()`
/// values; for a SIMD path `q.len()` is a multiple of 16.
unsafe fn scores_into(simd: Simd, q: &[f32], keys: Rows, scale: f32, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the caller's guarantees.
        Simd::Avx512 => return unsafe { scores_avx512(q, keys, scale, scores) },
        Simd::Avx2 => return unsafe { scores_avx2(q, keys, scale, scores) },
        Simd::Neon | Simd::Portable => {}
    }
    let _ = simd;
    for (j, score) in scores.iter_mut().enumerate() {
        *score = dot_portable(q, &keys.data[keys.start + j * keys.stride..][..q.len()]) * scale;
    }
}

/// `out += Σ_j weights[j] × values row j`, fused, in position order.
///
/// # Safety
/// As [`scores_into`], with `values` holding `weights.len()` rows of `out.len()`.
unsafe fn weighted_into(simd: Simd, weights: &[f32], values: Rows, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the caller's guarantees.
        Simd::Avx512 => return unsafe { weighted_avx512(weights, values, out) },
        Simd::Avx2 => return unsafe { weighted_avx2(weights, values, out) },
        Simd::Neon | Simd::Portable => {}
    }
    let _ = simd;
    for (j, &w) in weights.iter().enumerate() {
        let v = &values.data[values.start + j * values.stride..][..out.len()];
        for (y, &v) in out.iter_mut().zip(v) {
            *y = w.mul_add(v.to_f32(), *y);
        }
    }
}

fn dot_portable(a: &[f32], b: &[f16]) -> f32 {
    let mut acc = [0f32; LANES];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        acc[i % LANES] = x.mul_add(y.to_f32(), acc[i % LANES]);
    }
    sum_lanes(acc)
}

/// The sixteen lanes summed as the SIMD paths do: halves, then quarters, then pairs.
fn sum_lanes(acc: [f32; LANES]) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let quad = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (quad[0] + quad[2]) + (quad[1] + quad[3])
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Sixteen cached values from `p`, widened to f32 (exactly).
///
/// # Safety
/// AVX-512F; 16 values readable from `p`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16(p: *const f16) -> __m512 {
    _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
}

/// Eight cached values from `p`, widened to f32 (exactly).
///
/// # Safety
/// F16C; 8 values readable from `p`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load8(p: *const f16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// Four lanes of `quad` summed as [`sum_lanes`] does: `(0 + 2) + (1 + 3)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_quad(quad: __m128) -> f32 {
    let pairs = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
}

/// # Safety
/// AVX-512F; `q.len()` a multiple of 16; `keys`' first `scores.len()` rows in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scores_avx512(q: &[f32], keys: Rows, scale: f32, scores: &mut [f32]) {
    let chunks = q.len() / LANES;
    let base = keys.data.as_ptr().add(keys.start);
    for (j, score) in scores.iter_mut().enumerate() {
        let k = base.add(j * keys.stride);
        let mut acc = _mm512_setzero_ps();
        for c in 0..chunks {
            let qc = _mm512_loadu_ps(q.as_ptr().add(c * LANES));
            acc = _mm512_fmadd_ps(qc, load16(k.add(c * LANES)), acc);
        }
        let v = _mm256_add_ps(
            _mm512_castps512_ps256(acc),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
        );
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        *score = sum_quad(quad) * scale;
    }
}

/// # Safety
/// AVX-512F; `out.len()` a multiple of 16; `values`' first `weights.len()` rows of
/// `out.len()` values in bounds. Adds to `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weighted_avx512(weights: &[f32], values: Rows, out: &mut [f32]) {
    // Four 16-value chunks of the output at a time (independent accumulators).
    let chunks = out.len() / LANES;
    let group = if chunks.is_multiple_of(4) { 4 } else { 1 };
    let base = values.data.as_ptr().add(values.start);
    for first in (0..chunks).step_by(group) {
        let mut y = [_mm512_setzero_ps(); 4];
        for (c, y) in y.iter_mut().enumerate().take(group) {
            *y = _mm512_loadu_ps(out.as_ptr().add((first + c) * LANES));
        }
        for (j, &w) in weights.iter().enumerate() {
            let (w, row) = (
                _mm512_set1_ps(w),
                base.add(j * values.stride + first * LANES),
            );
            for (c, y) in y.iter_mut().enumerate().take(group) {
                *y = _mm512_fmadd_ps(w, load16(row.add(c * LANES)), *y);
            }
        }
        for (c, y) in y.iter().enumerate().take(group) {
            _mm512_storeu_ps(out.as_mut_ptr().add((first + c) * LANES), *y);
        }
    }
}

/// A whole chunk for a group of heads on AVX-512, for head sizes of 64 and 128 (`None`
/// for others): each key and value row is loaded once for all heads of the group and
/// the accumulators stay in registers, four positions' scores are summed at once
/// ([`sum_lanes4`]), and the next rows are prefetched. The float operations per score
/// and per output element are those of the other paths.
///
/// # Safety
/// AVX-512F; `keys` and `values` hold `positions` rows of `hd` values;
/// `scores.len() == q.len() / hd × positions`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn group_avx512(
    q: &[f32],
    hd: usize,
    keys: Rows,
    values: Rows,
    scoring: Scoring,
    positions: usize,
    scores: &mut [f32],
) -> Option<Partial> {
    let heads = q.len() / hd;
    let scale = scoring.inner_scale();
    // SAFETY (all calls): the caller's guarantees.
    match hd {
        64 => unsafe { scores_heads_avx512::<4>(q, keys, values, scale, positions, scores) },
        128 => unsafe { scores_heads_avx512::<8>(q, keys, values, scale, positions, scores) },
        _ => return None,
    }
    scoring.cap(scores);
    let (max, sum) = softmax_rows(scores, positions, Simd::Avx512);
    let mut out = vec![0f32; heads * hd];
    match hd {
        64 => unsafe { weighted_heads_avx512::<4>(scores, values, positions, &mut out) },
        _ => unsafe { weighted_heads_avx512::<8>(scores, values, positions, &mut out) },
    }
    Some(Partial { max, sum, out })
}

/// Rows ahead of the one in use that are prefetched.
#[cfg(target_arch = "x86_64")]
const PREFETCH_ROWS: usize = 8;

/// Cached values in one 64-byte cache line.
#[cfg(target_arch = "x86_64")]
const LINE_VALUES: usize = 64 / std::mem::size_of::<f16>();

/// Requests the `lines` cache lines of the row at `row`.
///
/// # Safety
/// SSE (prefetches never fault, so `row` may point past the cache).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_lines(row: *const f16, lines: usize) {
    for c in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(c * LINE_VALUES) as *const i8);
    }
}

/// `scores[h × positions + j] = dot(q head h, keys row j) × scale` for every head of
/// `q` (`C × 16` values each), four positions at a time; also prefetches `values`'
/// rows for [`weighted_heads_avx512`].
///
/// # Safety
/// As [`group_avx512`], with head size `C × 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scores_heads_avx512<const C: usize>(
    q: &[f32],
    keys: Rows,
    values: Rows,
    scale: f32,
    positions: usize,
    scores: &mut [f32],
) {
    let hd = C * LANES;
    let heads = q.len() / hd;
    let lines = hd.div_ceil(LINE_VALUES);
    let kb = keys.data.as_ptr().add(keys.start);
    let vb = values.data.as_ptr().add(values.start);
    let scale4 = _mm_set1_ps(scale);
    let full = positions / 4 * 4;
    for j in (0..full).step_by(4) {
        let mut rows = [[_mm512_setzero_ps(); C]; 4];
        for (p, row) in rows.iter_mut().enumerate() {
            let k = kb.add((j + p) * keys.stride);
            for (c, v) in row.iter_mut().enumerate() {
                *v = load16(k.add(c * LANES));
            }
            prefetch_lines(
                kb.wrapping_add((j + p + PREFETCH_ROWS) * keys.stride),
                lines,
            );
            prefetch_lines(vb.wrapping_add((j + p) * values.stride), lines);
        }
        for h in 0..heads {
            let qh = q.as_ptr().add(h * hd);
            let mut acc = [_mm512_setzero_ps(); 4];
            for (acc, row) in acc.iter_mut().zip(&rows) {
                for (c, k) in row.iter().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh.add(c * LANES)), *k, *acc);
                }
            }
            let four = _mm_mul_ps(sum_lanes4(acc), scale4);
            _mm_storeu_ps(scores.as_mut_ptr().add(h * positions + j), four);
        }
    }
    if full < positions {
        for (h, qh) in q.chunks_exact(hd).enumerate() {
            let tail = &mut scores[h * positions + full..(h + 1) * positions];
            scores_avx512(qh, keys.skip(full), scale, tail);
        }
    }
}

/// [`sum_lanes`] of four accumulators at once, by the same additions: the results in
/// order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_lanes4(acc: [__m512; 4]) -> __m128 {
    // Halves: `[a0..8 + a8..16, b0..8 + b8..16]`, the same for c and d.
    let halves = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        )
    };
    let (ab, cd) = (halves(acc[0], acc[1]), halves(acc[2], acc[3]));
    // Quarters: 128-bit lane `i` holds accumulator `i`'s `v0..4 + v4..8`.
    let quads = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd),
    );
    // Pairs: element 0 of each lane becomes `(q0 + q2) + (q1 + q3)`.
    let pairs = _mm512_add_ps(quads, _mm512_permute_ps::<0b01_00_11_10>(quads));
    let sums = _mm512_add_ps(pairs, _mm512_permute_ps::<0b10_11_00_01>(pairs));
    let firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, sums))
}

/// `out[h] += Σ_j scores[h × positions + j] × values row j` for every head, fused, in
/// position order: each value row is loaded once for up to `16 / C` heads.
///
/// # Safety
/// As [`group_avx512`], with head size `C × 16`; `out.len()` is heads × `C × 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weighted_heads_avx512<const C: usize>(
    weights: &[f32],
    values: Rows,
    positions: usize,
    out: &mut [f32],
) {
    let hd = C * LANES;
    let heads = out.len() / hd;
    let mut h = 0;
    while h < heads {
        let (w, o) = (&weights[h * positions..], &mut out[h * hd..]);
        // SAFETY: the caller's guarantees.
        h += match (heads - h).min(16 / C) {
            1 => unsafe { weighted_pass::<C, 1>(w, values, positions, o) },
            2 => unsafe { weighted_pass::<C, 2>(w, values, positions, o) },
            3 => unsafe { weighted_pass::<C, 3>(w, values, positions, o) },
            _ => unsafe { weighted_pass::<C, 4>(w, values, positions, o) },
        };
    }
}

/// [`weighted_heads_avx512`] for `G` heads (`G × C` accumulators in registers);
/// returns `G`.
///
/// # Safety
/// As [`weighted_heads_avx512`], for the first `G` heads of `weights` and `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn weighted_pass<const C: usize, const G: usize>(
    weights: &[f32],
    values: Rows,
    positions: usize,
    out: &mut [f32],
) -> usize {
    let hd = C * LANES;
    assert!(weights.len() >= (G - 1) * positions + positions && out.len() >= G * hd);
    let vb = values.data.as_ptr().add(values.start);
    let lines = hd.div_ceil(LINE_VALUES);
    let mut y = [[_mm512_setzero_ps(); C]; G];
    for j in 0..positions {
        let row = vb.add(j * values.stride);
        prefetch_lines(row.wrapping_add(PREFETCH_ROWS * values.stride), lines);
        let mut v = [_mm512_setzero_ps(); C];
        for (c, v) in v.iter_mut().enumerate() {
            *v = load16(row.add(c * LANES));
        }
        for (g, y) in y.iter_mut().enumerate() {
            let w = _mm512_set1_ps(*weights.get_unchecked(g * positions + j));
            for (y, v) in y.iter_mut().zip(&v) {
                *y = _mm512_fmadd_ps(w, *v, *y);
            }
        }
    }
    for (g, y) in y.iter().enumerate() {
        for (c, y) in y.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(g * hd + c * LANES), *y);
        }
    }
    G
}

/// `scores[h × positions + j]` for every head, four positions at a time: each group
/// of four key rows is fetched from memory once for all heads (prefetched
/// [`PREFETCH_ROWS`] rows ahead), and the value rows the weighted sum will read are
/// prefetched meanwhile.
///
/// # Safety
/// AVX2, FMA and F16C; `hd` a multiple of 16; `keys` and `values` hold `positions`
/// rows of `hd` values; `scores.len() == q.len() / hd × positions`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_heads_avx2(
    q: &[f32],
    hd: usize,
    keys: Rows,
    values: Rows,
    scale: f32,
    positions: usize,
    scores: &mut [f32],
) {
    let lines = hd.div_ceil(LINE_VALUES);
    let kb = keys.data.as_ptr().add(keys.start);
    let vb = values.data.as_ptr().add(values.start);
    let full = positions / 4 * 4;
    for j in (0..full).step_by(4) {
        for p in 0..4 {
            prefetch_lines(
                kb.wrapping_add((j + p + PREFETCH_ROWS) * keys.stride),
                lines,
            );
            prefetch_lines(vb.wrapping_add((j + p) * values.stride), lines);
        }
        for (h, qh) in q.chunks_exact(hd).enumerate() {
            let four = scores4_avx2(qh, kb.add(j * keys.stride), keys.stride, scale);
            _mm_storeu_ps(scores.as_mut_ptr().add(h * positions + j), four);
        }
    }
    if full < positions {
        for (h, qh) in q.chunks_exact(hd).enumerate() {
            let tail = &mut scores[h * positions + full..(h + 1) * positions];
            scores_avx2(qh, keys.skip(full), scale, tail);
        }
    }
}

/// Scores of the four rows from `k` (`stride` apart) against `q`: eight independent
/// chains of fused multiply-adds, where one position alone waits on two.
///
/// # Safety
/// AVX2, FMA and F16C; `q.len()` a multiple of 16; the four rows in bounds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores4_avx2(q: &[f32], k: *const f16, stride: usize, scale: f32) -> __m128 {
    let (mut lo, mut hi) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    for c in 0..q.len() / LANES {
        let qc = q.as_ptr().add(c * LANES);
        let (ql, qh) = (_mm256_loadu_ps(qc), _mm256_loadu_ps(qc.add(8)));
        for p in 0..4 {
            let kc = k.add(p * stride + c * LANES);
            lo[p] = _mm256_fmadd_ps(ql, load8(kc), lo[p]);
            hi[p] = _mm256_fmadd_ps(qh, load8(kc.add(8)), hi[p]);
        }
    }
    let v = [
        _mm256_add_ps(lo[0], hi[0]),
        _mm256_add_ps(lo[1], hi[1]),
        _mm256_add_ps(lo[2], hi[2]),
        _mm256_add_ps(lo[3], hi[3]),
    ];
    _mm_mul_ps(sum_lanes_4x8(v), _mm_set1_ps(scale))
}

/// # Safety
/// AVX2, FMA and F16C; as [`scores_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2(q: &[f32], keys: Rows, scale: f32, scores: &mut [f32]) {
    let chunks = q.len() / LANES;
    let base = keys.data.as_ptr().add(keys.start);
    let full = scores.len() / 4 * 4;
    for j in (0..full).step_by(4) {
        let four = scores4_avx2(q, base.add(j * keys.stride), keys.stride, scale);
        _mm_storeu_ps(scores.as_mut_ptr().add(j), four);
    }
    for (j, score) in scores.iter_mut().enumerate().skip(full) {
        let k = base.add(j * keys.stride);
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in 0..chunks {
            let (qc, kc) = (q.as_ptr().add(c * LANES), k.add(c * LANES));
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(qc), load8(kc), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(qc.add(8)), load8(kc.add(8)), hi);
        }
        let v = _mm256_add_ps(lo, hi);
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        *score = sum_quad(quad) * scale;
    }
}

/// The eight lanes of each of four vectors summed as [`sum_lanes`] ends (after its
/// halves): `v[i] + v[i + 4]`, then `(0 + 2) + (1 + 3)`; lane `p` of the result is
/// `v[p]`'s sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_lanes_4x8(v: [__m256; 4]) -> __m128 {
    // Quarters: [v0's four | v1's four], [v2's | v3's].
    let x = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
        _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
    );
    let y = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(v[2], v[3]),
        _mm256_permute2f128_ps::<0x31>(v[2], v[3]),
    );
    // Per 128-bit half: [x0 + x2, x1 + x3, y0 + y2, y1 + y3].
    let pairs = _mm256_add_ps(
        _mm256_shuffle_ps::<0b01_00_01_00>(x, y),
        _mm256_shuffle_ps::<0b11_10_11_10>(x, y),
    );
    // Per half: [x, y, x, y]; the low half holds v0 and v2, the high one v1 and v3.
    let sums = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(pairs, pairs),
        _mm256_shuffle_ps::<0b11_01_11_01>(pairs, pairs),
    );
    _mm_unpacklo_ps(
        _mm256_castps256_ps128(sums),
        _mm256_extractf128_ps::<1>(sums),
    )
}

/// Eight accumulators where the head size allows (eight independent chains keep both
/// multiply-add units busy; four waited on their latency).
///
/// # Safety
/// AVX2, FMA and F16C; as [`weighted_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_avx2(weights: &[f32], values: Rows, out: &mut [f32]) {
    let chunks = out.len() / 8;
    let group = [8, 4, 1]
        .into_iter()
        .find(|g| chunks.is_multiple_of(*g))
        .unwrap_or(1);
    let base = values.data.as_ptr().add(values.start);
    for first in (0..chunks).step_by(group) {
        let mut y = [_mm256_setzero_ps(); 8];
        for (c, y) in y.iter_mut().enumerate().take(group) {
            *y = _mm256_loadu_ps(out.as_ptr().add((first + c) * 8));
        }
        for (j, &w) in weights.iter().enumerate() {
            let (w, row) = (_mm256_set1_ps(w), base.add(j * values.stride + first * 8));
            for (c, y) in y.iter_mut().enumerate().take(group) {
                *y = _mm256_fmadd_ps(w, load8(row.add(c * 8)), *y);
            }
        }
        for (c, y) in y.iter().enumerate().take(group) {
            _mm256_storeu_ps(out.as_mut_ptr().add((first + c) * 8), *y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed * 40_503);
                ((x >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `heads` query heads against one KV head, the positions cut into chunks.
    fn attend(
        (heads, hd): (usize, usize),
        positions: usize,
        stride: usize,
        chunk: usize,
        simd: Simd,
    ) -> Vec<f32> {
        let q = random(heads * hd, 1);
        let cached = |seed| -> Vec<f16> {
            random(positions * stride, seed)
                .into_iter()
                .map(f16::from_f32)
                .collect()
        };
        let (k, v) = (cached(2), cached(3));
        let rows = |data| Rows {
            data,
            start: 0,
            stride,
            count: positions,
        };
        let parts: Vec<Partial> = (0..positions)
            .step_by(chunk)
            .map(|first| {
                let n = chunk.min(positions - first);
                let (k, v) = (rows(&k[..]).skip(first), rows(&v[..]).skip(first));
                let (k, v) = (Rows { count: n, ..k }, Rows { count: n, ..v });
                let scoring = Scoring {
                    scale: 0.125,
                    softcap: None,
                };
                partial(&q, hd, k, v, scoring, simd)
            })
            .collect();
        let mut out = vec![f32::NAN; heads * hd];
        merge(&parts, &mut out);
        out
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        // Head sizes with a SIMD path of their own (64, 128) and without (48); group
        // sizes that the AVX-512 path splits into passes (5 = 4 + 1, 3 of 128 = 2 + 1);
        // position counts that leave a tail after groups of four.
        let cases = [
            ((3, 64), 1, 64),
            ((3, 64), 37, 128),
            ((5, 64), 130, 64),
            ((3, 128), 300, 256),
            ((1, 128), 6, 128),
            ((3, 48), 5, 48),
        ];
        for (shape, positions, stride) in cases {
            for chunk in [CHUNK, 16] {
                let reference = attend(shape, positions, stride, chunk, Simd::Portable);
                for simd in Simd::available() {
                    assert_eq!(
                        bits(&attend(shape, positions, stride, chunk, simd)),
                        bits(&reference),
                        "{simd:?}, heads and head size {shape:?}, {positions} positions in chunks of {chunk}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_merge_to_the_whole_within_rounding() {
        for simd in Simd::available() {
            let whole = attend((3, 64), 300, 64, 300, simd);
            for chunk in [1, 7, 128] {
                let merged = attend((3, 64), 300, 64, chunk, simd);
                for (a, b) in merged.iter().zip(&whole) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{a} vs {b}, chunks of {chunk}"
                    );
                }
            }
        }
    }
}
