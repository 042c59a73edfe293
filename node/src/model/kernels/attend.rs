//! Attention of the query heads that share one KV head over cached keys and values,
//! in f32: the arithmetic of a decode step's attention. A sequence's positions are cut
//! into chunks of [`CHUNK`] (fixed by position, so a sequence's result does not depend
//! on its batch or the thread count); each chunk is a task ([`partial`]) and
//! [`merge`] combines them. Like the matrix kernels, every path performs the same
//! float operations, so results are bit-identical on every path:
//!
//! - a score is `dot(q, k) × scale`, the dot product in sixteen lane accumulators
//!   (element `i` into lane `i % 16`, fused multiply-adds in element order) summed in
//!   one fixed tree ([`sum_lanes`]);
//! - a chunk's weights are `exp(score - max)` over the chunk, summed in position
//!   order, and its output accumulates `weight × v` per element with fused
//!   multiply-adds in position order;
//! - the merge scales each chunk's sum and output by `exp(max_chunk - max)`, adds them
//!   in chunk order and multiplies the output by `1 / sum`. With one chunk this is the
//!   plain softmax-weighted sum (the factor is exactly 1).
//!
//! The SIMD paths need a head size that is a multiple of 16 (every Llama model's is);
//! other sizes take the portable path.

// The SIMD paths are `unsafe` functions called after checking the CPU's features.
#![allow(unsafe_code)]

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
    pub data: &'a [f32],
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

/// One chunk's result for a group of heads: per head the chunk's largest score, the
/// sum of its weights, and the weighted sum of its values (`heads × head_dim`).
pub struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// The heads `q` (`heads × hd` values, one KV head's queries) over the positions of
/// `keys` and `values` (at least one; rows of `hd` values).
pub fn partial(q: &[f32], hd: usize, keys: Rows, values: Rows, scale: f32, simd: Simd) -> Partial {
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
    for first in (0..positions).step_by(BLOCK) {
        let n = BLOCK.min(positions - first);
        for (r, q) in q.chunks_exact(hd).enumerate() {
            let scores = &mut scores[r * positions + first..][..n];
            // SAFETY: as checked above; the path's features at detection.
            unsafe { scores_into(simd, q, keys.skip(first), scale, scores) };
        }
    }
    let (mut max, mut sum) = (Vec::with_capacity(heads), Vec::with_capacity(heads));
    for scores in scores.chunks_exact_mut(positions) {
        let (m, s) = softmax_weights(scores);
        max.push(m);
        sum.push(s);
    }
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
            let factor = (part.max[r] - max).exp();
            sum += part.sum[r] * factor;
            for (y, &v) in y.iter_mut().zip(&part.out[r * hd..][..hd]) {
                *y += v * factor;
            }
        }
        let inv = 1.0 / sum;
        y.iter_mut().for_each(|y| *y *= inv);
    }
}

/// Scores → `exp(score - max)` in place; returns the max and the weights' sum.
fn softmax_weights(scores: &mut [f32]) -> (f32, f32) {
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        sum += *score;
    }
    (max, sum)
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
        Simd::Portable => {}
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
        Simd::Portable => {}
    }
    let _ = simd;
    for (j, &w) in weights.iter().enumerate() {
        let v = &values.data[values.start + j * values.stride..][..out.len()];
        for (y, &v) in out.iter_mut().zip(v) {
            *y = w.mul_add(v, *y);
        }
    }
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        acc[i % LANES] = x.mul_add(y, acc[i % LANES]);
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
            acc = _mm512_fmadd_ps(qc, _mm512_loadu_ps(k.add(c * LANES)), acc);
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
                *y = _mm512_fmadd_ps(w, _mm512_loadu_ps(row.add(c * LANES)), *y);
            }
        }
        for (c, y) in y.iter().enumerate().take(group) {
            _mm512_storeu_ps(out.as_mut_ptr().add((first + c) * LANES), *y);
        }
    }
}

/// # Safety
/// AVX2 and FMA; as [`scores_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_avx2(q: &[f32], keys: Rows, scale: f32, scores: &mut [f32]) {
    let chunks = q.len() / LANES;
    let base = keys.data.as_ptr().add(keys.start);
    for (j, score) in scores.iter_mut().enumerate() {
        let k = base.add(j * keys.stride);
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for c in 0..chunks {
            let (qc, kc) = (q.as_ptr().add(c * LANES), k.add(c * LANES));
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(qc), _mm256_loadu_ps(kc), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(qc.add(8)), _mm256_loadu_ps(kc.add(8)), hi);
        }
        let v = _mm256_add_ps(lo, hi);
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        *score = sum_quad(quad) * scale;
    }
}

/// # Safety
/// AVX2 and FMA; as [`weighted_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_avx2(weights: &[f32], values: Rows, out: &mut [f32]) {
    let chunks = out.len() / 8;
    let group = if chunks.is_multiple_of(4) { 4 } else { 1 };
    let base = values.data.as_ptr().add(values.start);
    for first in (0..chunks).step_by(group) {
        let mut y = [_mm256_setzero_ps(); 4];
        for (c, y) in y.iter_mut().enumerate().take(group) {
            *y = _mm256_loadu_ps(out.as_ptr().add((first + c) * 8));
        }
        for (j, &w) in weights.iter().enumerate() {
            let (w, row) = (_mm256_set1_ps(w), base.add(j * values.stride + first * 8));
            for (c, y) in y.iter_mut().enumerate().take(group) {
                *y = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(c * 8)), *y);
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

    /// Three heads against one KV head, the positions cut into chunks.
    fn attend(hd: usize, positions: usize, stride: usize, chunk: usize, simd: Simd) -> Vec<f32> {
        let q = random(3 * hd, 1);
        let (k, v) = (random(positions * stride, 2), random(positions * stride, 3));
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
                partial(&q, hd, k, v, 0.125, simd)
            })
            .collect();
        let mut out = vec![f32::NAN; 3 * hd];
        merge(&parts, &mut out);
        out
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn every_path_gives_the_same_bits() {
        for (hd, positions, stride) in [(64, 1, 64), (64, 37, 128), (128, 300, 256), (48, 5, 48)] {
            for chunk in [CHUNK, 16] {
                let reference = attend(hd, positions, stride, chunk, Simd::Portable);
                for simd in Simd::available() {
                    assert_eq!(
                        bits(&attend(hd, positions, stride, chunk, simd)),
                        bits(&reference),
                        "{simd:?}, head size {hd}, {positions} positions in chunks of {chunk}"
                    );
                }
            }
        }
    }

    #[test]
    fn chunks_merge_to_the_whole_within_rounding() {
        for simd in Simd::available() {
            let whole = attend(64, 300, 64, 300, simd);
            for chunk in [1, 7, 128] {
                let merged = attend(64, 300, 64, chunk, simd);
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
