//! Fused CPU kernels of the Mamba layer (reference §3.5) on plain f32 slices:
//! the causal depthwise convolution with SiLU, and the selective scan with softplus(Δ), the D
//! skip and the SiLU(z) gate. Parallel over channels (rayon). On x86-64 the scan runs as
//! explicit AVX-512 or AVX2+FMA kernels picked at run time (blocks of 16 or 8 channels, the
//! states in registers), on AArch64 (Apple Silicon) as NEON kernels (blocks of 4); the portable
//! per-channel loop, with a branch-free polynomial `exp` written so that compilers vectorise
//! it, is the fallback and the reference.

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

/// Coefficients of the degree-6 polynomial for `2^f` on `[−½, ½]` (interpolation at the
/// Chebyshev nodes; truncation error 2.5e-9, below f32 rounding), constant term first.
const EXP2_POLY: [f32; 7] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    5.550_327e-2,
    9.618_057e-3,
    1.340_042_8e-3,
    1.546_144_5e-4,
];

/// Branch-free `2^t` for f32 (≈1 ulp): `t = n + f` with `n` the nearest integer, `2^f` by
/// [`EXP2_POLY`], `2^n` through the exponent bits. Arguments below −126 give 2^−126 ≈ 1.2e-38
/// instead of a denormal or 0, which is harmless as a decay factor.
///
/// The scan's decay `exp(Δ·A)` is `2^(Δ·A')` with `A' = A·log2(e)` scaled once per channel: one
/// multiplication and no Cody–Waite reduction per state.
#[inline(always)]
pub fn fast_exp2(t: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let t = t.clamp(-126.0, 127.0);
    let s = t + ROUND;
    let n = s - ROUND;
    let f = t - n;
    let c = EXP2_POLY;
    let mut p = c[6];
    for &ck in c[..6].iter().rev() {
        p = p * f + ck;
    }
    // `bits(s)` is `bits(ROUND) + n`, whose low 9 bits are `n mod 512` (those of `bits(ROUND)`
    // are 0): adding 127 and shifting by 23 leaves `(n + 127) << 23`, the exponent of `2^n`
    // (1 ≤ n + 127 ≤ 254). Integer operations only, unlike `n as i32` (a saturating conversion
    // that keeps the compiler from vectorising the callers' loops).
    let bits = s.to_bits().wrapping_add(127) << 23;
    p * f32::from_bits(bits)
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
    let wt = conv_taps_major(w, d);
    let mut out = vec![0f32; batch * len * d];
    causal_conv_silu_into(x, batch, len, stride, offset, d, &wt, b, &mut out);
    out
}

/// The convolution weights `w` (d, K) taps-major, (K, d), as [`causal_conv_silu_into`] takes
/// them: its channel loops then run over contiguous slices and vectorise (per channel the sum
/// is still b + Σ_j w_j·x_j in tap order).
pub fn conv_taps_major(w: &[f32], d: usize) -> Vec<f32> {
    let k = w.len() / d.max(1);
    let mut wt = vec![0f32; k * d];
    for c in 0..d {
        for j in 0..k {
            wt[j * d + c] = w[c * k + j];
        }
    }
    wt
}

/// [`causal_conv_silu`] into `out` (batch × len × d values) with the weights taps-major
/// ([`conv_taps_major`]): no allocation.
#[allow(clippy::too_many_arguments)]
pub fn causal_conv_silu_into(
    x: &[f32],
    batch: usize,
    len: usize,
    stride: usize,
    offset: usize,
    d: usize,
    wt: &[f32],
    b: &[f32],
    out: &mut [f32],
) {
    let k = wt.len() / d.max(1);
    assert_eq!(out.len(), batch * len * d, "out is not batch × len × d");
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (bi, l) = (row / len, row % len);
        o.copy_from_slice(&b[..d]);
        for j in 0..k {
            // tap j multiplies x[l − (k−1) + j]
            if l + j + 1 >= k {
                let src = (bi * len + l + j + 1 - k) * stride + offset;
                let xs = &x[src..src + d];
                let wj = &wt[j * d..(j + 1) * d];
                for ((oc, &wv), &xv) in o.iter_mut().zip(wj).zip(xs) {
                    *oc += wv * xv;
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            use super::cpu_gemm::{kernel, Kernel};
            use super::vmath::{avx2, avx512};
            // SAFETY: the kernel's CPU features are there (`kernel`: AVX-512F, or AVX2 and
            // FMA); `o` holds d values
            match kernel() {
                Some(Kernel::Avx512) => {
                    return unsafe {
                        avx512::silu_gate_residual(o.as_mut_ptr(), d, true, None, None)
                    }
                }
                Some(Kernel::Avx2) => return unsafe { avx2::silu_in_place(o) },
                _ => {}
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            super::vmath::neon::silu_in_place(o);
        }
        #[cfg(not(target_arch = "aarch64"))]
        for oc in o.iter_mut() {
            *oc = silu(*oc);
        }
    });
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
    /// (d): each channel's smallest A, NaN where its row holds one: [`channel_minima`] of `a`,
    /// computed once with the weights (the SIMD kernels leave out their exponent clamp where
    /// it bounds every decay above 2⁻¹²⁶; a wrong value there gives wrong decays).
    pub a_min: &'a [f32],
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

/// The smallest value of each of the `d` rows of `n` values of `a` (A, (d, n)): NaN for a row
/// that holds a NaN, +∞ for empty rows. [`ScanInputs::a_min`].
pub fn channel_minima(a: &[f32], d: usize, n: usize) -> Vec<f32> {
    if n == 0 {
        return vec![f32::INFINITY; d];
    }
    a.chunks_exact(n)
        .map(|row| {
            row.iter().fold(f32::INFINITY, |m, &v| {
                if v.is_nan() || m.is_nan() {
                    f32::NAN
                } else {
                    m.min(v)
                }
            })
        })
        .collect()
}

/// `A·log2(e)` of channel `c` into `a2` (n values): the scan's decay is `2^(Δ·A·log2(e))`.
#[inline]
fn scaled_a(p: &ScanInputs, c: usize, a2: &mut [f32]) {
    for (a2v, &av) in a2.iter_mut().zip(&p.a[c * p.n..(c + 1) * p.n]) {
        *a2v = av * std::f32::consts::LOG2_E;
    }
}

/// One channel's scan, writing `y[0..len]` for channel `c` of batch item `bi`; `a2` is the
/// channel's A scaled by [`scaled_a`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scan_channel(
    p: &ScanInputs,
    bi: usize,
    c: usize,
    a2: &[f32],
    h: &mut [f32],
    da: &mut [f32],
    y: &mut [f32],
) {
    let n = p.n;
    h.iter_mut().for_each(|v| *v = 0.0);
    for (l, yl) in y.iter_mut().enumerate() {
        let pos = bi * p.len + l;
        let delta = softplus(p.delta_pre[pos * p.d + c] + p.delta_bias[c]);
        let uu = p.u[pos * p.d + c];
        let du = delta * uu;
        let row = &p.bc[pos * p.bc_stride..(pos + 1) * p.bc_stride];
        let bm = &row[p.b_offset..p.b_offset + n];
        let cm = &row[p.c_offset..p.c_offset + n];
        for (d, &av) in da.iter_mut().zip(a2.iter()) {
            *d = fast_exp2(delta * av);
        }
        // blocks of 8 states as fixed-size arrays, so that the compiler keeps `acc` in vector
        // registers and drops the bounds checks (the same operations in the same order)
        let mut acc = [0f32; 8];
        let whole = n / 8 * 8;
        for (((hc, dc), bc), cc) in h[..whole]
            .chunks_exact_mut(8)
            .zip(da[..whole].chunks_exact(8))
            .zip(bm[..whole].chunks_exact(8))
            .zip(cm[..whole].chunks_exact(8))
        {
            let mut hv = [0f32; 8];
            for i in 0..8 {
                hv[i] = dc[i] * hc[i] + bc[i] * du;
            }
            for i in 0..8 {
                acc[i] += hv[i] * cc[i];
            }
            hc.copy_from_slice(&hv);
        }
        let mut tail = 0f32;
        for i in whole..n {
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

/// Defines, in a SIMD kernel module, `scan_channel`: one channel's scan with Δ and the gate
/// (SiLU(z)) already computed, on lane `lane` of the `W`-lane rows of `delta` and `gate`
/// (position-major, `[l · W + lane]`), writing lane `lane` of the rows of `y`. The module's
/// `states::<K, CLAMP>` runs the states `W·K` at a time (8·W, then 4·W, then W; in
/// `state_chunks`), the first chunk storing the lanes of Σ h·C per position into `acc`
/// (len × W) and later ones adding to them; its `lane_sum` adds a position's lanes at the end.
/// `CLAMP` is [`decay_may_underflow`] of the channel. Requires `p.n % W == 0` and every slice
/// ≥ W · `p.len` long. The attributes (the module's target features) go on the functions.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! scan_channel_fn {
    ($w:literal, $(#[$attr:meta])*) => {
        #[allow(clippy::too_many_arguments)]
        $(#[$attr])*
        pub(super) unsafe fn scan_channel(
            p: &ScanInputs,
            bi: usize,
            c: usize,
            delta: &[f32],
            gate: &[f32],
            lane: usize,
            acc: &mut [f32],
            y: &mut [f32],
        ) {
            const W: usize = $w;
            let (n, len) = (p.n, p.len);
            assert!(lane < W);
            for v in [delta.len(), gate.len(), acc.len(), y.len()] {
                assert!(v >= W * len);
            }
            let accp = acc.as_mut_ptr();
            if super::decay_may_underflow(p.a_min[c], delta, W, lane, len) {
                state_chunks::<true>(p, bi, c, delta, lane, accp);
            } else {
                state_chunks::<false>(p, bi, c, delta, lane, accp);
            }
            let uu = |l: usize| *p.u.get_unchecked((bi * len + l) * p.d + c);
            for l in 0..len {
                let sum = if n == 0 { 0.0 } else { lane_sum(accp.add(W * l)) };
                y[W * l + lane] = (sum + p.d_skip[c] * uu(l)) * gate[W * l + lane];
            }
        }

        /// All states of one channel, in chunks of `8·W`, `4·W` and `W` (see `scan_channel`);
        /// `CLAMP` as the module's `states`.
        #[allow(clippy::too_many_arguments)]
        #[inline]
        $(#[$attr])*
        unsafe fn state_chunks<const CLAMP: bool>(
            p: &ScanInputs,
            bi: usize,
            c: usize,
            delta: &[f32],
            lane: usize,
            accp: *mut f32,
        ) {
            const W: usize = $w;
            let n = p.n;
            let mut s = 0;
            while s + 8 * W <= n {
                states::<8, CLAMP>(p, bi, c, s, delta, lane, accp, s == 0);
                s += 8 * W;
            }
            while s + 4 * W <= n {
                states::<4, CLAMP>(p, bi, c, s, delta, lane, accp, s == 0);
                s += 4 * W;
            }
            while s + W <= n {
                states::<1, CLAMP>(p, bi, c, s, delta, lane, accp, s == 0);
                s += W;
            }
        }
    };
}
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use scan_channel_fn;

/// Whether some decay `2^(Δ·A·log2 e)` of a channel could fall below 2⁻¹²⁶, given the
/// smallest value of its row of `A` (NaN where the row holds one, see [`channel_minima`]) and
/// its Δ (lane `lane` of the `w`-lane rows of `delta`, `len` positions): the SIMD kernels
/// then clamp the exponent at −126 (a vector max per 8 or 16 states, ~8 % of the scan on Zen
/// 2), else they leave that out, with the same results. Δ is a softplus, so ≥ 0, and rounding
/// is monotone: every `t = fl(Δ·fl(A·log2 e))` is ≥ `fl(Δmax·fl(Amin·log2 e))`. A NaN in `A`
/// says yes (the clamp turns its decays into 2⁻¹²⁶, as the kernels always did); a NaN Δ needs
/// nothing (its state turns NaN on either path).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn decay_may_underflow(amin: f32, delta: &[f32], w: usize, lane: usize, len: usize) -> bool {
    if amin.is_nan() {
        return true;
    }
    let mut dmax = 0f32;
    for l in 0..len {
        let d = delta[w * l + lane];
        // a plain comparison (one maxss; f32::max handles NaN in more steps)
        if d > dmax {
            dmax = d;
        }
    }
    let t_min = dmax * (amin * std::f32::consts::LOG2_E);
    // NaN (∞ · 0) too
    t_min.is_nan() || t_min < -126.0
}

/// The AVX2+FMA kernels of [`selective_scan_lanes`]: the design of [`avx512`]'s with 8 lanes (ymm
/// registers) and lane masks in integer vectors, AVX2 having no mask registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::vmath::avx2::{silu8, softplus8};
    use super::ScanInputs;
    use std::arch::x86_64::*;

    /// The `cw` ≤ 8 values at `at` as 8 lanes (zeros after them). A full block loads
    /// plainly: a masked load (`vmaskmovps`) is much slower on some CPUs (AMD).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_lanes(at: *const f32, cw: usize, mask: __m256i) -> __m256 {
        if cw == 8 {
            _mm256_loadu_ps(at)
        } else {
            _mm256_maskload_ps(at, mask)
        }
    }

    /// softplus(Δ + bias) and SiLU(z) of a block of `cw` ≤ 8 channels for `len` positions, as
    /// [`softplus8`] and [`silu8`] compute them: position `l` reads `cw` values at
    /// `delta_pre + l·d_stride`, at `bias` and at `z + l·z_stride` (nothing beyond them) and
    /// stores 8 lanes at `delta + 8·l` and `gate + 8·l`. One call per block (not per position)
    /// so that the positions' independent evaluations overlap.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softplus_silu_rows(
        cw: usize,
        len: usize,
        delta_pre: *const f32,
        d_stride: usize,
        bias: *const f32,
        z: *const f32,
        z_stride: usize,
        delta: *mut f32,
        gate: *mut f32,
    ) {
        let mask = super::super::vmath::avx2::tail_mask(cw);
        let bv = load_lanes(bias, cw, mask);
        for l in 0..len {
            let v = _mm256_add_ps(load_lanes(delta_pre.add(l * d_stride), cw, mask), bv);
            _mm256_storeu_ps(delta.add(8 * l), softplus8(v));
            let zv = load_lanes(z.add(l * z_stride), cw, mask);
            _mm256_storeu_ps(gate.add(8 * l), silu8(zv));
        }
    }

    /// The first `cw` ≤ 8 lanes of the `len` rows of `y` (8 lanes each) to `out + l·stride`,
    /// plainly for a full block and through a lane mask otherwise (as [`load_lanes`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn store_rows(
        cw: usize,
        len: usize,
        y: *const f32,
        out: *mut f32,
        stride: usize,
    ) {
        let mask = super::super::vmath::avx2::tail_mask(cw);
        for l in 0..len {
            let v = _mm256_loadu_ps(y.add(8 * l));
            let at = out.add(l * stride);
            if cw == 8 {
                _mm256_storeu_ps(at, v);
            } else {
                _mm256_maskstore_ps(at, mask, v);
            }
        }
    }

    /// Coefficients of `2^f ≈ 1 + f·(c0 + c1·f + c2·f²)` on `[−1/16, 1/16]` (fitted for the
    /// least maximum relative error: 2.5e-8).
    const EXP2_POLY8: [f32; 3] = [0.693_147_24, 0.240_257_62, 5.549_622e-2];

    /// `bits(2^(j/8)) − (j << 20)` for j = 0..8: [`exp2_8`]'s table, less what its exponent
    /// step adds to the mantissa bits.
    const EXP2_TABLE8: [i32; 8] = [
        0x3f80_0000,
        0x3f7b_95c2,
        0x3f78_37f0,
        0x3f75_fed7,
        0x3f75_04f3,
        0x3f75_672a,
        0x3f77_44fd,
        0x3f7a_c0c7,
    ];

    /// 8-lane `2^t` (≈1 ulp) for the scan's decay, `t ≤ 0` (Δ ≥ 0, A < 0; correct up to
    /// `t = 127`, no upper clamp). With `CLAMP`, arguments below −126 give 2^−126 ≈ 1.2e-38
    /// rather than a denormal, which would cost a microcode assist per use and is harmless as a
    /// decay factor.
    ///
    /// `s = t + 1.5·2²⁰` rounds `t` to the nearest multiple of 1/8, `m/8`, in the low mantissa
    /// bits (`bits(s) = 0x49c0_0000 + m`), and `f = t − (s − 1.5·2²⁰)` ∈ [−1/16, 1/16] is
    /// exact. With `m = 8n + j`: `2^(j/8)` comes from an 8-entry table by one lane permute
    /// (it reads the low 3 bits of `bits(s)`, which are `j`), and `bits(s) << 20` is
    /// `(n << 23) + (j << 20)` (the high bits of 0x49c0_0000 shift out), which added to the
    /// table's bits (stored less `j << 20`) gives `2^(j/8)·2^n` exactly, a normal number for
    /// `n ≥ −126`. Then `2^f` by a degree-3 polynomial ([`EXP2_POLY8`]) in one fused
    /// multiply-add with the scale: four multiplications in all instead of the six of a
    /// degree-6 polynomial on [−½, ½] (on Zen 2 the scan is bound by the FMA pipes).
    ///
    /// Without `CLAMP` the arguments must be ≥ −126 (see [`super::decay_may_underflow`]): the
    /// exponent bits would wrap.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp2_8<const CLAMP: bool>(t: __m256) -> __m256 {
        const ROUND: f32 = 1_572_864.0; // 1.5 · 2^20
        let t = if CLAMP {
            _mm256_max_ps(t, _mm256_set1_ps(-126.0))
        } else {
            t
        };
        let s = _mm256_add_ps(t, _mm256_set1_ps(ROUND));
        let f = _mm256_sub_ps(t, _mm256_sub_ps(s, _mm256_set1_ps(ROUND)));
        exp2_8_from(s, f)
    }

    /// The decay `2^(Δ·a)` of [`states`]: [`exp2_8`] of the rounded product with `CLAMP`;
    /// without it the product stays unrounded, `s = Δ·a + 1.5·2²⁰` and `f = Δ·a − (s −
    /// 1.5·2²⁰)` in two fused multiply-adds (one operation fewer, and `f` exact).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decay8<const CLAMP: bool>(dv: __m256, a: __m256) -> __m256 {
        const ROUND: f32 = 1_572_864.0; // 1.5 · 2^20
        if CLAMP {
            return exp2_8::<true>(_mm256_mul_ps(dv, a));
        }
        let s = _mm256_fmadd_ps(dv, a, _mm256_set1_ps(ROUND));
        let f = _mm256_fmsub_ps(dv, a, _mm256_sub_ps(s, _mm256_set1_ps(ROUND)));
        exp2_8_from(s, f)
    }

    /// `2^t` from `s = t + 1.5·2²⁰` (rounded to eighths) and `f = t − (s − 1.5·2²⁰)`, see
    /// [`exp2_8`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp2_8_from(s: __m256, f: __m256) -> __m256 {
        let sb = _mm256_castps_si256(s);
        let tab = _mm256_loadu_si256(EXP2_TABLE8.as_ptr().cast());
        let tj = _mm256_permutevar8x32_epi32(tab, sb);
        let scale = _mm256_castsi256_ps(_mm256_add_epi32(tj, _mm256_slli_epi32::<20>(sb)));
        let c = EXP2_POLY8;
        let q = _mm256_fmadd_ps(_mm256_set1_ps(c[2]), f, _mm256_set1_ps(c[1]));
        let q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(c[0]));
        // scale · (1 + f·q): the product inside the FMA is not rounded (no denormal
        // intermediate near the clamp)
        _mm256_fmadd_ps(scale, _mm256_mul_ps(f, q), scale)
    }

    /// Stores the 8 lanes `v` at `at` (the first chunk of states) or adds them to those there.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn add_lanes(at: *mut f32, v: __m256, first: bool) {
        let v = if first {
            v
        } else {
            _mm256_add_ps(_mm256_loadu_ps(at), v)
        };
        _mm256_storeu_ps(at, v);
    }

    /// The sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_lanes(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// States `s .. s + 8·K` of one channel's scan: their `h` and `A·log2(e)` stay in
    /// registers for the whole sequence (2·K of the 16 ymm registers); per position the lanes
    /// of Σ h·C over these states (two products and K − 2 fused multiply-adds in two chains,
    /// then one addition) are stored to `acc` (`first`) or added to it. `CLAMP`: clamp the decays' exponents at −126 (without it
    /// they must not go below, see [`super::decay_may_underflow`]).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn states<const K: usize, const CLAMP: bool>(
        p: &ScanInputs,
        bi: usize,
        c: usize,
        s: usize,
        delta: &[f32],
        lane: usize,
        acc: *mut f32,
        first: bool,
    ) {
        let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
        let a = p.a.as_ptr().add(c * p.n + s);
        let mut a2 = [_mm256_setzero_ps(); K];
        for (k, v) in a2.iter_mut().enumerate() {
            *v = _mm256_mul_ps(_mm256_loadu_ps(a.add(8 * k)), log2e);
        }
        let mut h = [_mm256_setzero_ps(); K];
        for l in 0..p.len {
            let dl = *delta.get_unchecked(8 * l + lane);
            let dv = _mm256_set1_ps(dl);
            let duv = _mm256_set1_ps(dl * *p.u.get_unchecked((bi * p.len + l) * p.d + c));
            let row = p.bc.as_ptr().add((bi * p.len + l) * p.bc_stride);
            let (bm, cm) = (row.add(p.b_offset + s), row.add(p.c_offset + s));
            // Σ h·C in two chains (even and odd k), added at the end: one chain of K dependent
            // fused multiply-adds (40 cycles of latency for K = 8 on Zen 2) held the loop
            // back, measured 3.5 % (unclamped) and 7 % (clamped) slower per scan
            let mut sums = [_mm256_setzero_ps(); 2];
            for k in 0..K {
                h[k] = _mm256_fmadd_ps(
                    decay8::<CLAMP>(dv, a2[k]),
                    h[k],
                    _mm256_mul_ps(_mm256_loadu_ps(bm.add(8 * k)), duv),
                );
                let ck = _mm256_loadu_ps(cm.add(8 * k));
                sums[k % 2] = if k < 2 {
                    _mm256_mul_ps(h[k], ck)
                } else {
                    _mm256_fmadd_ps(h[k], ck, sums[k % 2])
                };
            }
            let sum = if K == 1 {
                sums[0]
            } else {
                _mm256_add_ps(sums[0], sums[1])
            };
            add_lanes(acc.add(8 * l), sum, first);
        }
    }

    /// The sum of the 8 values at `at`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lane_sum(at: *const f32) -> f32 {
        sum_lanes(_mm256_loadu_ps(at))
    }

    // 64 states per pass: with 16 ymm registers they spill some of their h, which measured ≈2 %
    // faster on Zen 2 than 32 without spills and twice the passes over the positions
    super::scan_channel_fn!(8, #[target_feature(enable = "avx2,fma")]);
}

/// The NEON kernels of [`selective_scan_lanes`] (AArch64: Apple Silicon, Arm servers):
/// [`avx2`]'s design with 4 lanes, 32 vector registers (so 32 states per pass), and the
/// portable path's `2^t` ([`EXP2_POLY`] on [−½, ½]) with fused multiply-adds. NEON is part of
/// every AArch64 target: nothing is detected at run time.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::super::vmath::neon::{silu4, softplus4};
    use super::ScanInputs;
    use std::arch::aarch64::*;

    /// The `cw` ≤ 4 values at `at` as 4 lanes (zeros after them); nothing beyond them is read.
    #[inline(always)]
    unsafe fn load_lanes(at: *const f32, cw: usize) -> float32x4_t {
        if cw == 4 {
            vld1q_f32(at)
        } else {
            let mut buf = [0f32; 4];
            std::ptr::copy_nonoverlapping(at, buf.as_mut_ptr(), cw);
            vld1q_f32(buf.as_ptr())
        }
    }

    /// softplus(Δ + bias) and SiLU(z) of a block of `cw` ≤ 4 channels for `len` positions, as
    /// [`avx2`](super::avx2)'s `softplus_silu_rows` with 4 lanes.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn softplus_silu_rows(
        cw: usize,
        len: usize,
        delta_pre: *const f32,
        d_stride: usize,
        bias: *const f32,
        z: *const f32,
        z_stride: usize,
        delta: *mut f32,
        gate: *mut f32,
    ) {
        let bv = load_lanes(bias, cw);
        for l in 0..len {
            let v = vaddq_f32(load_lanes(delta_pre.add(l * d_stride), cw), bv);
            vst1q_f32(delta.add(4 * l), softplus4(v));
            vst1q_f32(gate.add(4 * l), silu4(load_lanes(z.add(l * z_stride), cw)));
        }
    }

    /// The first `cw` ≤ 4 lanes of the `len` rows of `y` (4 lanes each) to `out + l·stride`.
    pub(super) unsafe fn store_rows(
        cw: usize,
        len: usize,
        y: *const f32,
        out: *mut f32,
        stride: usize,
    ) {
        for l in 0..len {
            std::ptr::copy_nonoverlapping(y.add(4 * l), out.add(l * stride), cw);
        }
    }

    /// 4-lane `2^t` for the scan's decay, `t ≤ 127` (Δ ≥ 0, A < 0 give t ≤ 0; no upper clamp),
    /// as [`super::fast_exp2`]: with `CLAMP`, arguments below −126 give 2^−126 (without it they
    /// must be ≥ −126); `t` rounded to an integer
    /// `n` by adding 1.5·2²³, `2^(t − n)` by [`super::EXP2_POLY`] (fused multiply-adds), `2^n`
    /// from the low bits of the rounded sum shifted into the exponent.
    #[inline(always)]
    pub(super) fn exp2_4<const CLAMP: bool>(t: float32x4_t) -> float32x4_t {
        // 1.5 · 2^23
        const ROUND: f32 = 12_582_912.0;
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe {
            let t = if CLAMP {
                vmaxq_f32(t, vdupq_n_f32(-126.0))
            } else {
                t
            };
            let s = vaddq_f32(t, vdupq_n_f32(ROUND));
            let f = vsubq_f32(t, vsubq_f32(s, vdupq_n_f32(ROUND)));
            let c = super::EXP2_POLY;
            let mut q = vdupq_n_f32(c[6]);
            for &ck in c[..6].iter().rev() {
                q = vfmaq_f32(vdupq_n_f32(ck), q, f);
            }
            let bits = vshlq_n_u32::<23>(vaddq_u32(vreinterpretq_u32_f32(s), vdupq_n_u32(127)));
            vmulq_f32(q, vreinterpretq_f32_u32(bits))
        }
    }

    /// States `s .. s + 4·K` of one channel's scan, their `h` and `A·log2(e)` in registers for
    /// the whole sequence; per position the lanes of Σ h·C over these states are stored to
    /// `acc` (`first`) or added to it (as [`avx2`](super::avx2)'s `states`, `CLAMP` too).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn states<const K: usize, const CLAMP: bool>(
        p: &ScanInputs,
        bi: usize,
        c: usize,
        s: usize,
        delta: &[f32],
        lane: usize,
        acc: *mut f32,
        first: bool,
    ) {
        let a = p.a.as_ptr().add(c * p.n + s);
        let mut a2 = [vdupq_n_f32(0.0); K];
        for (k, v) in a2.iter_mut().enumerate() {
            *v = vmulq_n_f32(vld1q_f32(a.add(4 * k)), std::f32::consts::LOG2_E);
        }
        let mut h = [vdupq_n_f32(0.0); K];
        for l in 0..p.len {
            let dl = *delta.get_unchecked(4 * l + lane);
            let du = dl * *p.u.get_unchecked((bi * p.len + l) * p.d + c);
            let row = p.bc.as_ptr().add((bi * p.len + l) * p.bc_stride);
            let (bm, cm) = (row.add(p.b_offset + s), row.add(p.c_offset + s));
            // Σ h·C in two chains of fused multiply-adds (even and odd k), added at the end:
            // half the latency of one chain (as `avx2`'s `states`)
            let mut sums = [vdupq_n_f32(0.0); 2];
            for k in 0..K {
                h[k] = vfmaq_f32(
                    vmulq_n_f32(vld1q_f32(bm.add(4 * k)), du),
                    exp2_4::<CLAMP>(vmulq_n_f32(a2[k], dl)),
                    h[k],
                );
                let ck = vld1q_f32(cm.add(4 * k));
                sums[k % 2] = if k < 2 {
                    vmulq_f32(h[k], ck)
                } else {
                    vfmaq_f32(sums[k % 2], h[k], ck)
                };
            }
            let sum = if K == 1 {
                sums[0]
            } else {
                vaddq_f32(sums[0], sums[1])
            };
            let at = acc.add(4 * l);
            vst1q_f32(
                at,
                if first {
                    sum
                } else {
                    vaddq_f32(vld1q_f32(at), sum)
                },
            );
        }
    }

    /// The sum of the 4 values at `at`.
    #[inline(always)]
    unsafe fn lane_sum(at: *const f32) -> f32 {
        vaddvq_f32(vld1q_f32(at))
    }

    super::scan_channel_fn!(4,);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::vmath::avx512::{silu16, softplus16};
    use super::ScanInputs;
    use std::arch::x86_64::*;

    /// softplus(Δ + bias) and SiLU(z) of 16 channels (`mask`ed lanes read nothing), as
    /// [`softplus16`] and [`silu16`] compute them, stored as 16 lanes at `delta` and `gate`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softplus_silu16(
        mask: __mmask16,
        delta_pre: *const f32,
        bias: *const f32,
        z: *const f32,
        delta: *mut f32,
        gate: *mut f32,
    ) {
        let v = _mm512_add_ps(
            _mm512_maskz_loadu_ps(mask, delta_pre),
            _mm512_maskz_loadu_ps(mask, bias),
        );
        _mm512_storeu_ps(delta, softplus16(v));
        _mm512_storeu_ps(gate, silu16(_mm512_maskz_loadu_ps(mask, z)));
    }

    /// Row `l` of `y` (16 lanes, `mask`ed) to `out`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_lanes(mask: __mmask16, y: *const f32, out: *mut f32) {
        _mm512_mask_storeu_ps(out, mask, _mm512_loadu_ps(y));
    }

    /// Coefficients of the degree-6 polynomial for `2^f` on `[0, 1)` (interpolation at the
    /// Chebyshev nodes of that interval; truncation error 6e-9), constant term first.
    const EXP2_POLY_01: [f32; 7] = [
        1.0,
        0.693_146_94,
        0.240_230_46,
        5.548_063e-2,
        9.684_186e-3,
        1.239_133_2e-3,
        2.186_578_5e-4,
    ];

    /// 16-lane `2^t` (≈1 ulp) for the scan's decay, `t ≤ 0` (Δ ≥ 0, A < 0): `f = t − ⌊t⌋` in
    /// one `vreduceps`, `2^f` by [`EXP2_POLY_01`], and `scalef` applies `2^⌊t⌋` from `t`
    /// itself (it floors its exponent argument), so no rounding and no subtraction per lane.
    /// With `CLAMP`, arguments below −126 give 2^−126 ≈ 1.2e-38 rather than a denormal, which
    /// would cost a microcode assist per use and is harmless as a decay factor.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn exp2_16<const CLAMP: bool>(t: __m512) -> __m512 {
        let t = if CLAMP {
            _mm512_max_ps(t, _mm512_set1_ps(-126.0))
        } else {
            t
        };
        // imm8: keep 0 fraction bits, round down → t − ⌊t⌋ ∈ [0, 1)
        let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF }>(t);
        let c = EXP2_POLY_01;
        let mut q = _mm512_set1_ps(c[6]);
        for &ck in c[..6].iter().rev() {
            q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(ck));
        }
        _mm512_scalef_ps(q, t)
    }

    /// Stores the 16 lanes `v` at `at` (the first chunk of states) or adds them to those there.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add_lanes(at: *mut f32, v: __m512, first: bool) {
        let v = if first {
            v
        } else {
            _mm512_add_ps(_mm512_loadu_ps(at), v)
        };
        _mm512_storeu_ps(at, v);
    }

    /// States `s .. s + 16·K` of one channel's scan: their `h` and `A·log2(e)` stay in
    /// registers for the whole sequence; per position the lanes of Σ h·C over these states
    /// (one product and K − 1 fused multiply-adds) are stored to `acc` (`first`) or added to it.
    /// `CLAMP`: clamp the decays' exponents at −126 (without it they must not go below).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn states<const K: usize, const CLAMP: bool>(
        p: &ScanInputs,
        bi: usize,
        c: usize,
        s: usize,
        delta: &[f32],
        lane: usize,
        acc: *mut f32,
        first: bool,
    ) {
        let log2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
        let a = p.a.as_ptr().add(c * p.n + s);
        let mut a2 = [_mm512_setzero_ps(); K];
        for (k, v) in a2.iter_mut().enumerate() {
            *v = _mm512_mul_ps(_mm512_loadu_ps(a.add(16 * k)), log2e);
        }
        let mut h = [_mm512_setzero_ps(); K];
        for l in 0..p.len {
            let dl = *delta.get_unchecked(16 * l + lane);
            let dv = _mm512_set1_ps(dl);
            let duv = _mm512_set1_ps(dl * *p.u.get_unchecked((bi * p.len + l) * p.d + c));
            let row = p.bc.as_ptr().add((bi * p.len + l) * p.bc_stride);
            let (bm, cm) = (row.add(p.b_offset + s), row.add(p.c_offset + s));
            // one chain for Σ h·C: two (as AVX2 and NEON have) measured 3–4 % slower on a Xeon
            let mut sum = _mm512_setzero_ps();
            for k in 0..K {
                h[k] = _mm512_fmadd_ps(
                    exp2_16::<CLAMP>(_mm512_mul_ps(dv, a2[k])),
                    h[k],
                    _mm512_mul_ps(_mm512_loadu_ps(bm.add(16 * k)), duv),
                );
                let ck = _mm512_loadu_ps(cm.add(16 * k));
                sum = if k == 0 {
                    _mm512_mul_ps(h[k], ck)
                } else {
                    _mm512_fmadd_ps(h[k], ck, sum)
                };
            }
            add_lanes(acc.add(16 * l), sum, first);
        }
    }

    /// The sum of the 16 values at `at`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn lane_sum(at: *const f32) -> f32 {
        _mm512_reduce_add_ps(_mm512_loadu_ps(at))
    }

    super::scan_channel_fn!(16, #[target_feature(enable = "avx512f,avx512dq")]);
}

// off x86-64 only the tests ask (and get false)
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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

/// A raw pointer to an output shared by parallel tasks that each write their own elements (the
/// scans' channels, the attention's heads).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the tasks write disjoint elements (different channels) and the buffer outlives the
// parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    /// Element `i` (a method, so that closures capture the `Sync` wrapper, not the pointer).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// The AVX-512 scan in one parallel loop over blocks of 16 channels of one batch item: each
/// task computes softplus(Δ + bias) and SiLU(z) of its channels for every position (16 lanes
/// = 16 channels), runs [`avx512::scan_channel`] per channel on those lanes and writes its
/// channels of y (batch, len, d) a position (16 lanes) at a time: one parallel region per
/// scan, no transposes.
#[cfg(target_arch = "x86_64")]
fn selective_scan_avx512(p: &ScanInputs, out: &mut [f32]) {
    const W: usize = 16;
    let (bsz, len, d) = (p.batch, p.len, p.d);
    assert_eq!(out.len(), bsz * len * d);
    let blocks = d.div_ceil(W);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..bsz * blocks).into_par_iter().for_each(|task| {
        with_scratch(4 * len * W, |scratch| {
            let (delta, rest) = scratch.split_at_mut(len * W);
            let (gate, rest) = rest.split_at_mut(len * W);
            let (y, acc) = rest.split_at_mut(len * W);
            let (bi, c0) = (task / blocks, task % blocks * W);
            let cw = (d - c0).min(W);
            let mask: u16 = if cw == W {
                0xffff
            } else {
                ((1u32 << cw) - 1) as u16
            };
            // SAFETY: AVX-512F was detected and p.n % 16 == 0 (checked by the caller); the
            // masked loads stay within channels c0..c0+cw of rows of the sizes of `p`; this task
            // writes only channels c0..c0+cw of `out`.
            unsafe {
                for l in 0..len {
                    let pos = bi * len + l;
                    avx512::softplus_silu16(
                        mask,
                        p.delta_pre.as_ptr().add(pos * d + c0),
                        p.delta_bias.as_ptr().add(c0),
                        p.z.as_ptr().add(pos * p.z_stride + p.z_offset + c0),
                        delta.as_mut_ptr().add(l * W),
                        gate.as_mut_ptr().add(l * W),
                    );
                }
                for j in 0..cw {
                    avx512::scan_channel(p, bi, c0 + j, delta, gate, j, acc, y);
                }
                for l in 0..len {
                    avx512::store_lanes(
                        mask,
                        y.as_ptr().add(l * W),
                        ptr.at((bi * len + l) * d + c0),
                    );
                }
            }
        })
    });
}

thread_local! {
    /// Scratch rows of the scans' tasks, per thread (grown once, then reused).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on this thread's scratch buffer of `len` values (their contents unspecified): no
/// allocation once the thread's buffer has reached that size.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// The three kernels of one vector width `W` that [`selective_scan_lanes`] runs: softplus(Δ +
/// bias) and SiLU(z) of a block of channels for every position, one channel's scan on its lane
/// of those rows, and the block's rows of y back into the output (see [`avx2`]'s functions of
/// these names for the arguments).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::type_complexity)]
struct LaneKernels {
    softplus_silu_rows: unsafe fn(
        usize,
        usize,
        *const f32,
        usize,
        *const f32,
        *const f32,
        usize,
        *mut f32,
        *mut f32,
    ),
    scan_channel:
        unsafe fn(&ScanInputs, usize, usize, &[f32], &[f32], usize, &mut [f32], &mut [f32]),
    store_rows: unsafe fn(usize, usize, *const f32, *mut f32, usize),
}

/// The AVX2+FMA and NEON scans, [`selective_scan_avx512`]'s design with `W` = 8 or 4 lanes: one
/// parallel loop over blocks of `W` channels of one batch item; each task computes
/// softplus(Δ + bias) and SiLU(z) of its channels for every position (`W` lanes = `W`
/// channels), runs the kernels' `scan_channel` per channel on those lanes and writes its
/// channels of y (batch, len, d) a position (`W` lanes) at a time. A last block of fewer than
/// `W` channels reads and writes only its lanes.
///
/// # Safety
/// The CPU must support `kernels` (AVX2 and FMA for [`AVX2`]); `p.n` must be a multiple of `W`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn selective_scan_lanes<const W: usize>(
    p: &ScanInputs,
    kernels: &LaneKernels,
    out: &mut [f32],
) {
    let (bsz, len, d) = (p.batch, p.len, p.d);
    assert_eq!(out.len(), bsz * len * d);
    let blocks = d.div_ceil(W);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..bsz * blocks).into_par_iter().for_each(|task| {
        with_scratch(4 * len * W, |scratch| {
            let (delta, rest) = scratch.split_at_mut(len * W);
            let (gate, rest) = rest.split_at_mut(len * W);
            let (y, acc) = rest.split_at_mut(len * W);
            let (bi, c0) = (task / blocks, task % blocks * W);
            let cw = (d - c0).min(W);
            // SAFETY: the kernels are supported and p.n % W == 0 (the caller's contract); the
            // loads stay within channels c0..c0+cw of rows of the sizes of `p`; this task
            // writes only channels c0..c0+cw of `out`; the scratch rows hold len × W values.
            unsafe {
                let pos = bi * len;
                (kernels.softplus_silu_rows)(
                    cw,
                    len,
                    p.delta_pre.as_ptr().add(pos * d + c0),
                    d,
                    p.delta_bias.as_ptr().add(c0),
                    p.z.as_ptr().add(pos * p.z_stride + p.z_offset + c0),
                    p.z_stride,
                    delta.as_mut_ptr(),
                    gate.as_mut_ptr(),
                );
                for j in 0..cw {
                    (kernels.scan_channel)(p, bi, c0 + j, delta, gate, j, acc, y);
                }
                (kernels.store_rows)(cw, len, y.as_ptr(), ptr.at(pos * d + c0), d);
            }
        })
    });
}

/// [`avx2`]'s kernels for [`selective_scan_lanes`] (8 lanes).
#[cfg(target_arch = "x86_64")]
const AVX2: LaneKernels = LaneKernels {
    softplus_silu_rows: avx2::softplus_silu_rows,
    scan_channel: avx2::scan_channel,
    store_rows: avx2::store_rows,
};

/// [`neon`]'s kernels for [`selective_scan_lanes`] (4 lanes).
#[cfg(target_arch = "aarch64")]
const NEON: LaneKernels = LaneKernels {
    softplus_silu_rows: neon::softplus_silu_rows,
    scan_channel: neon::scan_channel,
    store_rows: neon::store_rows,
};

/// The selective scan from a zero state, with softplus(Δ + bias), the D skip and the SiLU(z)
/// gate. Returns y (batch, len, d). The caller guarantees the slice sizes (checked in debug).
/// `DANCEBA_CPU_SCAN=loop` (or `avx2`) restricts it to the portable loop (or to the AVX2
/// kernel on an AVX-512 CPU), for comparisons.
pub fn selective_scan(p: &ScanInputs) -> Vec<f32> {
    let mut out = vec![0f32; p.batch * p.len * p.d];
    selective_scan_into(p, &mut out);
    out
}

/// [`selective_scan`] into `out` (batch × len × d values): with the SIMD kernels no
/// allocation once each thread's scratch rows have reached the size of `p`.
pub fn selective_scan_into(p: &ScanInputs, out: &mut [f32]) {
    static KERNEL: std::sync::OnceLock<ScanKernel> = std::sync::OnceLock::new();
    let kernel = *KERNEL.get_or_init(|| match super::env_value("DANCEBA_CPU_SCAN").as_str() {
        "loop" => ScanKernel::Loop,
        "avx2" => ScanKernel::Avx2,
        _ => ScanKernel::Best,
    });
    selective_scan_with_into(p, kernel, out)
}

/// Which scan kernel [`selective_scan_with`] may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanKernel {
    /// The widest SIMD kernel this CPU supports (x86-64: AVX-512F+DQ where `n % 16 == 0`,
    /// else AVX2+FMA where `n % 8 == 0`; AArch64: NEON where `n % 4 == 0`), else the loop.
    Best,
    /// AVX2+FMA if supported and `n % 8 == 0`, else the loop (the loop on AArch64).
    Avx2,
    /// The portable Rust loop.
    Loop,
}

/// [`selective_scan`] with a chosen kernel (for tests and benchmarks).
pub fn selective_scan_with(p: &ScanInputs, kernel: ScanKernel) -> Vec<f32> {
    let mut out = vec![0f32; p.batch * p.len * p.d];
    selective_scan_with_into(p, kernel, &mut out);
    out
}

/// [`selective_scan_with`] into `out` (batch × len × d values).
pub fn selective_scan_with_into(p: &ScanInputs, kernel: ScanKernel, out: &mut [f32]) {
    let (bsz, len, d, n) = (p.batch, p.len, p.d, p.n);
    assert_eq!(out.len(), bsz * len * d, "out is not batch × len × d");
    debug_assert_eq!(p.u.len(), bsz * len * d);
    debug_assert_eq!(p.delta_pre.len(), bsz * len * d);
    debug_assert_eq!(p.a.len(), d * n);
    debug_assert_eq!(p.a_min.len(), d);
    debug_assert!(p.bc.len() >= bsz * len * p.bc_stride);
    debug_assert!(p.z.len() >= bsz * len * p.z_stride);
    #[cfg(target_arch = "x86_64")]
    {
        if kernel == ScanKernel::Best && use_avx512() && n.is_multiple_of(16) {
            return selective_scan_avx512(p, out);
        }
        if kernel != ScanKernel::Loop && use_avx2() && n.is_multiple_of(8) {
            // SAFETY: AVX2 and FMA were detected; n % 8 == 0
            return unsafe { selective_scan_lanes::<8>(p, &AVX2, out) };
        }
    }
    #[cfg(target_arch = "aarch64")]
    if kernel == ScanKernel::Best && n.is_multiple_of(4) {
        // SAFETY: NEON is part of every AArch64 target; n % 4 == 0
        return unsafe { selective_scan_lanes::<4>(p, &NEON, out) };
    }
    // elsewhere every kernel choice is the loop
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = kernel;
    // the portable loop: groups of channels per task, each channel's y (len values) into the
    // task's scratch and then into its column of the output
    const GROUP: usize = 16;
    let ptr = OutPtr(out.as_mut_ptr());
    (0..(bsz * d).div_ceil(GROUP))
        .into_par_iter()
        .for_each(|gi| {
            with_scratch(3 * n + len, |scratch| {
                let (h, rest) = scratch.split_at_mut(n);
                let (a2, rest) = rest.split_at_mut(n);
                let (da, y) = rest.split_at_mut(n);
                for row in gi * GROUP..((gi + 1) * GROUP).min(bsz * d) {
                    let (bi, c) = (row / d, row % d);
                    scaled_a(p, c, a2);
                    scan_channel(p, bi, c, a2, h, da, y);
                    for (l, &v) in y.iter().enumerate() {
                        // SAFETY: element (bi, l, c) of `out` (its size was asserted), written
                        // by this task alone (channel c of song bi)
                        unsafe { *ptr.at((bi * len + l) * d + c) = v };
                    }
                }
            })
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp2_is_accurate() {
        let mut worst = 0f64;
        let mut t = -125.0f32;
        while t < 126.0 {
            let e = fast_exp2(t) as f64;
            let r = (t as f64).exp2();
            worst = worst.max(((e - r) / r).abs());
            t += 0.01237;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(fast_exp2(0.0), 1.0);
        assert_eq!(fast_exp2(-3.0), 0.125);
        assert!(fast_exp2(-1000.0) < 1.2e-38);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp2_is_accurate() {
        use std::arch::x86_64::*;
        if !use_avx512() {
            eprintln!("no AVX-512F/DQ here: the AVX-512 scan is not used");
            return;
        }
        let ts: Vec<f32> = (0..200_000).map(|i| -130.0 + i as f32 * 0.000_65).collect();
        let mut worst = 0f64;
        for ch in ts.chunks_exact(16) {
            let mut out = [0f32; 16];
            // SAFETY: AVX-512F and DQ were detected; `ch` and `out` hold 16 values.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr(),
                    avx512::exp2_16::<true>(_mm512_loadu_ps(ch.as_ptr())),
                )
            };
            for (&t, &e) in ch.iter().zip(&out) {
                let r = (t.max(-126.0) as f64).exp2();
                worst = worst.max(((e as f64 - r) / r).abs());
            }
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_exp2_is_accurate() {
        use std::arch::aarch64::*;
        let mut ts: Vec<f32> = (0..200_000).map(|i| -130.0 + i as f32 * 0.000_65).collect();
        ts.extend([
            -126.0, -125.5, -125.0, -0.5, -3.0, -1.0, 0.0, 0.499_99, 3.0, 126.9,
        ]);
        ts.resize(ts.len().next_multiple_of(4), -1.0);
        let mut worst = 0f64;
        for ch in ts.chunks_exact(4) {
            let mut out = [0f32; 4];
            // SAFETY: `ch` and `out` hold 4 values.
            unsafe {
                vst1q_f32(
                    out.as_mut_ptr(),
                    neon::exp2_4::<true>(vld1q_f32(ch.as_ptr())),
                )
            };
            for (&t, &e) in ch.iter().zip(&out) {
                let r = (t.max(-126.0) as f64).exp2();
                worst = worst.max(((e as f64 - r) / r).abs());
                if t.fract() == 0.0 && t >= -126.0 {
                    assert_eq!(e as f64, r, "2^{t}");
                }
            }
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp2_is_accurate() {
        use std::arch::x86_64::*;
        if !use_avx2() {
            eprintln!("no AVX2+FMA here: the AVX2 scan is not used");
            return;
        }
        let mut ts: Vec<f32> = (0..200_000).map(|i| -130.0 + i as f32 * 0.000_65).collect();
        // the rounding boundaries next to the clamp, and exact powers of two
        ts.extend([
            -126.0,
            -125.5,
            -125.499_99,
            -125.500_01,
            -125.0,
            -0.5,
            -3.0,
            -1.0,
            0.0,
        ]);
        ts.resize(ts.len().next_multiple_of(8), -1.0);
        let mut worst = 0f64;
        for ch in ts.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected; `ch` and `out` hold 8 values.
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    avx2::exp2_8::<true>(_mm256_loadu_ps(ch.as_ptr())),
                )
            };
            for (&t, &e) in ch.iter().zip(&out) {
                let r = (t.max(-126.0) as f64).exp2();
                assert!(e >= f32::MIN_POSITIVE, "2^{t} = {e} is not normal");
                worst = worst.max(((e as f64 - r) / r).abs());
                if t == t.round() {
                    assert_eq!(e as f64, r, "2^{t}");
                }
            }
        }
        println!("AVX2 2^t: worst relative error {worst:e}");
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn simd_scan_matches_portable_loop() {
        // AVX-512: 80 states = a chunk of 64 and one of 16; 208 = one of each size (128, 64,
        // 16). AVX2: 8 and 16 = 8-state chunks only, 40 = 32 + 8, 104 = 64 + 32 + 8, 128 =
        // 2 × 64, 208 = 3 × 64 + 2 × 8.
        for n in [8, 16, 40, 80, 104, 128, 208] {
            // channel counts with and without a partial block (of 8 and of 16), one position
            // and sequences longer than the model's 28
            for (batch, len, d) in [(2, 13, 24), (2, 28, 21), (1, 1, 13), (3, 70, 11)] {
                // |A| up to e³ (no decay can fall below 2⁻¹²⁶: the kernels' unclamped path)
                // and, in odd channels, up to e⁶ (most of those need the clamp)
                for a_hi in [3.0, 6.0] {
                    simd_scan_matches_portable_loop_with(batch, len, d, n, a_hi);
                }
            }
        }
    }

    fn simd_scan_matches_portable_loop_with(
        batch: usize,
        len: usize,
        d: usize,
        n: usize,
        a_hi: f32,
    ) {
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
        // odd channels' |A| up to e^a_hi, even ones' up to e³
        let a: Vec<f32> = rnd(d * n, 0.0, 1.0)
            .iter()
            .enumerate()
            .map(|(i, v)| -(v * if (i / n) % 2 == 1 { a_hi } else { 3.0 }).exp())
            .collect();
        let a_min = channel_minima(&a, d, n);
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
            a_min: &a_min,
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
        // which path the kernels take per (item, channel), by the decisive predicate on the
        // final Δ (one lane per row here)
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            let mut clamped = 0;
            for bi in 0..batch {
                for c in 0..d {
                    let delta: Vec<f32> = (0..len)
                        .map(|l| softplus(dp[(bi * len + l) * d + c] + bias[c]))
                        .collect();
                    clamped += usize::from(decay_may_underflow(a_min[c], &delta, 1, 0, len));
                }
            }
            let all = batch * d;
            if a_hi <= 3.0 {
                assert_eq!(clamped, 0, "|A| ≤ e³ must take the unclamped path");
            } else {
                assert!(
                    clamped > 0 && clamped < all,
                    "both paths: {clamped} of {all} clamped"
                );
            }
        }
        for k in [ScanKernel::Best, ScanKernel::Avx2] {
            let x = selective_scan_with(&p, k);
            let err = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5 * scale,
                "{k:?} ({batch}, {len}, {d}, {n}): err {err} scale {scale}"
            );
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
