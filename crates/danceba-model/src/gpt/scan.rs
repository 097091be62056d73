//! Fused CPU kernels of the Mamba layer (reference §3.5) on plain f32 slices:
//! the causal depthwise convolution with SiLU, and the selective scan with softplus(Δ), the D
//! skip and the SiLU(z) gate. Parallel over channels (rayon); the per-channel loop over the
//! states is written so that it vectorises, with a branch-free polynomial `exp`, and is compiled
//! a second time for AVX2+FMA and picked at run time.

use rayon::prelude::*;

/// Softplus with PyTorch's threshold: `v` if `v > 20`, else `log1p(exp(v))`.
#[inline(always)]
pub fn softplus(v: f32) -> f32 {
    if v > 20.0 {
        v
    } else {
        v.exp().ln_1p()
    }
}

/// `u·σ(u)`.
#[inline(always)]
pub fn silu(u: f32) -> f32 {
    u / (1.0 + (-u).exp())
}

/// Branch-free `exp` for f32 (Cephes `expf` polynomial, ≈1 ulp on the range used here).
/// Arguments below −87.3 give ≈1.2e-38 instead of a denormal or 0, which is harmless as a decay
/// factor.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.336_54, 88.376_26);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let bits = ((n as i32 + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

/// Causal depthwise convolution (kernel K, zero history) followed by SiLU.
///
/// `x` holds `batch × len` rows of `stride` values; the convolved channels are columns
/// `offset .. offset + d` of each row. `w` is (d, K) and `b` is (d). Returns (batch, len, d).
#[allow(clippy::too_many_arguments)]
pub fn causal_conv_silu(
    x: &[f32],
    batch: usize,
    len: usize,
    stride: usize,
    offset: usize,
    d: usize,
    w: &[f32],
    b: &[f32],
) -> Vec<f32> {
    let k = w.len() / d.max(1);
    let mut out = vec![0f32; batch * len * d];
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (bi, l) = (row / len, row % len);
        for (c, oc) in o.iter_mut().enumerate() {
            let mut acc = b[c];
            for j in 0..k {
                // tap j multiplies x[l − (k−1) + j]
                if l + j + 1 >= k {
                    let src = l + j + 1 - k;
                    acc += w[c * k + j] * x[(bi * len + src) * stride + offset + c];
                }
            }
            *oc = silu(acc);
        }
    });
    out
}

/// Inputs of [`selective_scan`]. All row-major f32.
pub struct ScanInputs<'a> {
    pub batch: usize,
    pub len: usize,
    /// Channels (d_inner).
    pub d: usize,
    /// States (d_state).
    pub n: usize,
    /// (batch, len, d): the SiLU'd convolution output.
    pub u: &'a [f32],
    /// (batch, len, d): Δ before the bias and the softplus.
    pub delta_pre: &'a [f32],
    /// (d): Δ bias.
    pub delta_bias: &'a [f32],
    /// (d, n): A = −exp(A_log).
    pub a: &'a [f32],
    /// Rows of `bc_stride` values, one per (batch, len) position; B at `b_offset`, C at `c_offset`.
    pub bc: &'a [f32],
    pub bc_stride: usize,
    pub b_offset: usize,
    pub c_offset: usize,
    /// (d): the D skip.
    pub d_skip: &'a [f32],
    /// Rows of `z_stride` values, one per (batch, len) position; z at `z_offset`.
    pub z: &'a [f32],
    pub z_stride: usize,
    pub z_offset: usize,
}

/// One channel's scan, writing `y[0..len]` for channel `c` of batch item `bi`.
#[inline(always)]
fn scan_channel(p: &ScanInputs, bi: usize, c: usize, h: &mut [f32], da: &mut [f32], y: &mut [f32]) {
    let n = p.n;
    let a = &p.a[c * n..(c + 1) * n];
    h.iter_mut().for_each(|v| *v = 0.0);
    for (l, yl) in y.iter_mut().enumerate() {
        let pos = bi * p.len + l;
        let delta = softplus(p.delta_pre[pos * p.d + c] + p.delta_bias[c]);
        let uu = p.u[pos * p.d + c];
        let du = delta * uu;
        let row = &p.bc[pos * p.bc_stride..(pos + 1) * p.bc_stride];
        let bm = &row[p.b_offset..p.b_offset + n];
        let cm = &row[p.c_offset..p.c_offset + n];
        for (d, &av) in da.iter_mut().zip(a.iter()) {
            *d = fast_exp(delta * av);
        }
        let mut acc = [0f32; 8];
        let chunks = n / 8;
        for ch in 0..chunks {
            let s = ch * 8;
            for i in 0..8 {
                let hv = da[s + i] * h[s + i] + bm[s + i] * du;
                h[s + i] = hv;
                acc[i] += hv * cm[s + i];
            }
        }
        let mut tail = 0f32;
        for i in chunks * 8..n {
            let hv = da[i] * h[i] + bm[i] * du;
            h[i] = hv;
            tail += hv * cm[i];
        }
        let s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        let out = s + tail + p.d_skip[c] * uu;
        let zv = p.z[pos * p.z_stride + p.z_offset + c];
        *yl = out * silu(zv);
    }
}

/// AVX2+FMA version of [`scan_channel`] with explicit intrinsics (8 states per vector), so
/// that it is fast at any optimisation level.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{silu, softplus, ScanInputs};
    use std::arch::x86_64::*;

    /// 8-lane version of [`super::fast_exp`] (same polynomial and range reduction).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.336_54)),
            _mm256_set1_ps(88.376_26),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_2e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(e))
    }

    /// Requires `p.n % 8 == 0` and `h.len() == p.n`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scan_channel(
        p: &ScanInputs,
        bi: usize,
        c: usize,
        h: &mut [f32],
        y: &mut [f32],
    ) {
        let n = p.n;
        let a = &p.a[c * n..(c + 1) * n];
        assert!(h.len() == n && n.is_multiple_of(8));
        h.iter_mut().for_each(|v| *v = 0.0);
        for (l, yl) in y.iter_mut().enumerate() {
            let pos = bi * p.len + l;
            let delta = softplus(p.delta_pre[pos * p.d + c] + p.delta_bias[c]);
            let uu = p.u[pos * p.d + c];
            let row = &p.bc[pos * p.bc_stride..(pos + 1) * p.bc_stride];
            let bm = &row[p.b_offset..p.b_offset + n];
            let cm = &row[p.c_offset..p.c_offset + n];
            let dv = _mm256_set1_ps(delta);
            let duv = _mm256_set1_ps(delta * uu);
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                // SAFETY: i + 16 <= n and every slice here has n elements.
                let e0 = exp8(_mm256_mul_ps(dv, _mm256_loadu_ps(a.as_ptr().add(i))));
                let e1 = exp8(_mm256_mul_ps(dv, _mm256_loadu_ps(a.as_ptr().add(i + 8))));
                let b0 = _mm256_mul_ps(_mm256_loadu_ps(bm.as_ptr().add(i)), duv);
                let b1 = _mm256_mul_ps(_mm256_loadu_ps(bm.as_ptr().add(i + 8)), duv);
                let h0 = _mm256_fmadd_ps(e0, _mm256_loadu_ps(h.as_ptr().add(i)), b0);
                let h1 = _mm256_fmadd_ps(e1, _mm256_loadu_ps(h.as_ptr().add(i + 8)), b1);
                _mm256_storeu_ps(h.as_mut_ptr().add(i), h0);
                _mm256_storeu_ps(h.as_mut_ptr().add(i + 8), h1);
                acc0 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(cm.as_ptr().add(i)), acc0);
                acc1 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(cm.as_ptr().add(i + 8)), acc1);
                i += 16;
            }
            while i + 8 <= n {
                let e0 = exp8(_mm256_mul_ps(dv, _mm256_loadu_ps(a.as_ptr().add(i))));
                let b0 = _mm256_mul_ps(_mm256_loadu_ps(bm.as_ptr().add(i)), duv);
                let h0 = _mm256_fmadd_ps(e0, _mm256_loadu_ps(h.as_ptr().add(i)), b0);
                _mm256_storeu_ps(h.as_mut_ptr().add(i), h0);
                acc0 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(cm.as_ptr().add(i)), acc0);
                i += 8;
            }
            let acc = _mm256_add_ps(acc0, acc1);
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            let s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            let out = s + p.d_skip[c] * uu;
            let zv = p.z[pos * p.z_stride + p.z_offset + c];
            *yl = out * silu(zv);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{silu, softplus, ScanInputs};
    use std::arch::x86_64::*;

    /// 16-lane version of [`super::fast_exp`] (same polynomial and range reduction).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-87.336_54)),
            _mm512_set1_ps(88.376_26),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_2e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
        let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(y, _mm512_castsi512_ps(e))
    }

    /// Requires `p.n % 16 == 0` and `h.len() == p.n`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scan_channel(
        p: &ScanInputs,
        bi: usize,
        c: usize,
        h: &mut [f32],
        y: &mut [f32],
    ) {
        let n = p.n;
        let a = &p.a[c * n..(c + 1) * n];
        assert!(h.len() == n && n.is_multiple_of(16));
        h.iter_mut().for_each(|v| *v = 0.0);
        for (l, yl) in y.iter_mut().enumerate() {
            let pos = bi * p.len + l;
            let delta = softplus(p.delta_pre[pos * p.d + c] + p.delta_bias[c]);
            let uu = p.u[pos * p.d + c];
            let row = &p.bc[pos * p.bc_stride..(pos + 1) * p.bc_stride];
            let bm = &row[p.b_offset..p.b_offset + n];
            let cm = &row[p.c_offset..p.c_offset + n];
            let dv = _mm512_set1_ps(delta);
            let duv = _mm512_set1_ps(delta * uu);
            let mut acc0 = _mm512_setzero_ps();
            let mut acc1 = _mm512_setzero_ps();
            let mut i = 0;
            while i + 32 <= n {
                // SAFETY: i + 32 <= n and every slice here has n elements.
                let e0 = exp16(_mm512_mul_ps(dv, _mm512_loadu_ps(a.as_ptr().add(i))));
                let e1 = exp16(_mm512_mul_ps(dv, _mm512_loadu_ps(a.as_ptr().add(i + 16))));
                let b0 = _mm512_mul_ps(_mm512_loadu_ps(bm.as_ptr().add(i)), duv);
                let b1 = _mm512_mul_ps(_mm512_loadu_ps(bm.as_ptr().add(i + 16)), duv);
                let h0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(h.as_ptr().add(i)), b0);
                let h1 = _mm512_fmadd_ps(e1, _mm512_loadu_ps(h.as_ptr().add(i + 16)), b1);
                _mm512_storeu_ps(h.as_mut_ptr().add(i), h0);
                _mm512_storeu_ps(h.as_mut_ptr().add(i + 16), h1);
                acc0 = _mm512_fmadd_ps(h0, _mm512_loadu_ps(cm.as_ptr().add(i)), acc0);
                acc1 = _mm512_fmadd_ps(h1, _mm512_loadu_ps(cm.as_ptr().add(i + 16)), acc1);
                i += 32;
            }
            while i + 16 <= n {
                let e0 = exp16(_mm512_mul_ps(dv, _mm512_loadu_ps(a.as_ptr().add(i))));
                let b0 = _mm512_mul_ps(_mm512_loadu_ps(bm.as_ptr().add(i)), duv);
                let h0 = _mm512_fmadd_ps(e0, _mm512_loadu_ps(h.as_ptr().add(i)), b0);
                _mm512_storeu_ps(h.as_mut_ptr().add(i), h0);
                acc0 = _mm512_fmadd_ps(h0, _mm512_loadu_ps(cm.as_ptr().add(i)), acc0);
                i += 16;
            }
            let acc = _mm512_add_ps(acc0, acc1);
            let s = _mm512_reduce_add_ps(acc);
            let out = s + p.d_skip[c] * uu;
            let zv = p.z[pos * p.z_stride + p.z_offset + c];
            *yl = out * silu(zv);
        }
    }
}

fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The selective scan from a zero state, with softplus(Δ + bias), the D skip and the SiLU(z)
/// gate. Returns y (batch, len, d). The caller guarantees the slice sizes (checked in debug).
pub fn selective_scan(p: &ScanInputs) -> Vec<f32> {
    selective_scan_with(p, ScanKernel::Best)
}

/// Which scan kernel [`selective_scan_with`] may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanKernel {
    /// The widest SIMD kernel this CPU supports (AVX-512F, else AVX2+FMA), else the loop.
    Best,
    /// AVX2+FMA if supported, else the loop.
    Avx2,
    /// The portable Rust loop.
    Loop,
}

/// [`selective_scan`] with a chosen kernel (for tests and benchmarks).
pub fn selective_scan_with(p: &ScanInputs, kernel: ScanKernel) -> Vec<f32> {
    let (bsz, len, d, n) = (p.batch, p.len, p.d, p.n);
    debug_assert_eq!(p.u.len(), bsz * len * d);
    debug_assert_eq!(p.delta_pre.len(), bsz * len * d);
    debug_assert_eq!(p.a.len(), d * n);
    debug_assert!(p.bc.len() >= bsz * len * p.bc_stride);
    debug_assert!(p.z.len() >= bsz * len * p.z_stride);
    // channel-major scratch output: (batch, d, len)
    let mut ycm = vec![0f32; bsz * d * len];
    let avx512 = kernel == ScanKernel::Best && use_avx512() && n.is_multiple_of(16);
    let avx2 = kernel != ScanKernel::Loop && use_avx2() && n.is_multiple_of(8);
    const GROUP: usize = 16;
    ycm.par_chunks_mut(len * GROUP)
        .enumerate()
        .for_each(|(gi, chunk)| {
            let mut h = vec![0f32; n];
            let mut da = vec![0f32; n];
            for (j, y) in chunk.chunks_mut(len).enumerate() {
                let row = gi * GROUP + j;
                let (bi, c) = (row / d, row % d);
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: AVX-512F support was detected at run time, n % 16 == 0 was
                    // checked, and h has n elements.
                    unsafe { avx512::scan_channel(p, bi, c, &mut h, y) };
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 and FMA support was detected at run time, n % 8 == 0 was
                    // checked, and h has n elements.
                    unsafe { avx2::scan_channel(p, bi, c, &mut h, y) };
                    continue;
                }
                let _ = (avx2, avx512);
                scan_channel(p, bi, c, &mut h, &mut da, y);
            }
        });
    // transpose (batch, d, len) → (batch, len, d)
    let mut out = vec![0f32; bsz * len * d];
    for bi in 0..bsz {
        for c in 0..d {
            let src = &ycm[(bi * d + c) * len..(bi * d + c + 1) * len];
            for (l, v) in src.iter().enumerate() {
                out[(bi * len + l) * d + c] = *v;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 80.0 {
            let e = fast_exp(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max(((e - r) / r).abs());
            x += 0.01237;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1.2e-38);
    }

    #[test]
    fn simd_scan_matches_portable_loop() {
        let (batch, len, d, n) = (2, 13, 24, 32);
        let mut s = 12345u64;
        let mut rnd = |k: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..k)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
                })
                .collect()
        };
        let u = rnd(batch * len * d, -2.0, 2.0);
        let dp = rnd(batch * len * d, -6.0, 3.0);
        let bias = rnd(d, -1.0, 1.0);
        let a: Vec<f32> = rnd(d * n, 0.0, 3.0).iter().map(|v| -v.exp()).collect();
        let bc = rnd(batch * len * (5 + 2 * n), -1.0, 1.0);
        let dsk = rnd(d, -1.0, 1.0);
        let z = rnd(batch * len * 2 * d, -3.0, 3.0);
        let p = ScanInputs {
            batch,
            len,
            d,
            n,
            u: &u,
            delta_pre: &dp,
            delta_bias: &bias,
            a: &a,
            bc: &bc,
            bc_stride: 5 + 2 * n,
            b_offset: 5,
            c_offset: 5 + n,
            d_skip: &dsk,
            z: &z,
            z_stride: 2 * d,
            z_offset: d,
        };
        let y = selective_scan_with(&p, ScanKernel::Loop);
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
        for k in [ScanKernel::Best, ScanKernel::Avx2] {
            let x = selective_scan_with(&p, k);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5 * scale, "{k:?}: err {err} scale {scale}");
        }
    }

    #[test]
    fn softplus_matches_definition() {
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(0.0) - std::f32::consts::LN_2).abs() < 1e-7);
        let v = -30.0f32;
        assert!((softplus(v) - v.exp()).abs() / v.exp() < 1e-6);
    }
}
