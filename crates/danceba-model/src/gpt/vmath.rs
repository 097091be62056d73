//! Vectorised f32 math shared by the CPU kernels: `exp`, `ln`, softplus and SiLU over 16
//! AVX-512 lanes, 8 AVX2+FMA lanes or 4 NEON lanes (≈1 ulp), GELU (AVX2, NEON), and over
//! slices the SiLU gate, the GEMM epilogue's activation, gate and residual, and the softmax
//! numerators (AVX-512 where noted, AVX2, NEON). Each has a scalar counterpart whose result it
//! matches to a few ulp (tested), not bit for bit.

/// Numerical Recipes' Chebyshev fit of `erfc`: `erfc(z) ≈ t·exp(−z² + P(t))` with
/// `t = 1/(1 + z/2)`, relative error < 1.2e-7 for all z ≥ 0; the coefficients of `P`, constant
/// term first (the vector GELUs, `avx2::gelu8` and `neon::gelu4`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[allow(clippy::excessive_precision)]
const ERFC_POLY: [f32; 10] = [
    -1.265_512_23,
    1.000_023_68,
    0.374_091_96,
    0.096_784_18,
    -0.186_288_06,
    0.278_868_07,
    -1.135_203_98,
    1.488_515_87,
    -0.822_152_23,
    0.170_872_77,
];

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// `eˣ`, 16 lanes (Cephes `expf` polynomial with Cody–Waite reduction, ≈1 ulp; arguments
    /// clamped to [−87.3, 88.4]; the power of two applied with `scalef`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp16(x: __m512) -> __m512 {
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
        _mm512_scalef_ps(y, n)
    }

    /// Natural logarithm of positive normal `x` (Cephes `logf` polynomial, ≈1 ulp).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn ln16(x: __m512) -> __m512 {
        // x = m · 2^e with m in [1, 2); fold m into [√½, √2)
        let mut e = _mm512_getexp_ps(x);
        let mut m = _mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(x);
        let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_set1_ps(std::f32::consts::SQRT_2));
        m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5));
        e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0));
        let f = _mm512_sub_ps(m, _mm512_set1_ps(1.0));
        let z = _mm512_mul_ps(f, f);
        let mut y = _mm512_set1_ps(7.037_683_6e-2);
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.151_461e-1));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.167_699_9e-1));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.242_014_1e-1));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.424_932_3e-1));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-1.666_805_8e-1));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.000_071_4e-1));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(-2.499_999_4e-1));
        y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(3.333_333e-1));
        y = _mm512_mul_ps(_mm512_mul_ps(y, f), z);
        y = _mm512_fmadd_ps(e, _mm512_set1_ps(-2.121_944_4e-4), y);
        y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5), y);
        let r = _mm512_add_ps(f, y);
        _mm512_fmadd_ps(e, _mm512_set1_ps(0.693_359_4), r)
    }

    /// Softplus with PyTorch's threshold (see [`crate::gpt::scan::softplus`]): `log1p(eᵛ)` evaluated as
    /// `ln(u)·e/(u − 1)` with `u = 1 + e` (exact `e` where `u` rounds to 1).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softplus16(v: __m512) -> __m512 {
        let e = exp16(v);
        let u = _mm512_add_ps(e, _mm512_set1_ps(1.0));
        let um1 = _mm512_sub_ps(u, _mm512_set1_ps(1.0));
        let l = _mm512_div_ps(_mm512_mul_ps(ln16(u), e), um1);
        let tiny = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(um1, _mm512_setzero_ps());
        let r = _mm512_mask_blend_ps(tiny, l, e);
        let over = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_set1_ps(20.0));
        _mm512_mask_blend_ps(over, r, v)
    }

    /// `v·σ(v)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu16(v: __m512) -> __m512 {
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
        _mm512_div_ps(v, _mm512_add_ps(e, _mm512_set1_ps(1.0)))
    }

    /// `out[i] = v[i] · SiLU(g[i])` (the GatedMLP gate), 16 lanes at a time with a masked
    /// tail.
    ///
    /// # Safety
    /// AVX-512F must be available; the three slices have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_gate(v: &[f32], g: &[f32], out: &mut [f32]) {
        assert!(v.len() == out.len() && g.len() == out.len());
        let n = out.len();
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let gv = silu16(_mm512_maskz_loadu_ps(m, g.as_ptr().add(i)));
            let vv = _mm512_maskz_loadu_ps(m, v.as_ptr().add(i));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, _mm512_mul_ps(vv, gv));
            i += 16;
        }
    }

    /// `y[i] = (silu? SiLU(y[i]) : y[i]) · gate[i] + residual[i]` in place, the gate and the
    /// residual optional, 16 lanes at a time with a masked tail.
    ///
    /// # Safety
    /// AVX-512F must be available; `y` points to `n` writable f32, and `gate`/`residual`
    /// to `n` readable ones where given.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn silu_gate_residual(
        y: *mut f32,
        n: usize,
        silu: bool,
        gate: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let mut v = _mm512_maskz_loadu_ps(m, y.add(i));
            if silu {
                v = silu16(v);
            }
            if let Some(g) = gate {
                v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, g.add(i)));
            }
            if let Some(r) = residual {
                v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, r.add(i)), v);
            }
            _mm512_mask_storeu_ps(y.add(i), m, v);
            i += 16;
        }
    }

    /// The lanes `0..rest.min(16)`.
    #[inline]
    fn tail_mask(rest: usize) -> __mmask16 {
        if rest >= 16 {
            0xffff
        } else {
            ((1u32 << rest) - 1) as u16
        }
    }

    /// `out[i] = f(x[i] (+ add[i]))` over a slice, 16 lanes at a time with a masked tail.
    #[cfg(test)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn map16(
        x: &[f32],
        add: Option<&[f32]>,
        out: &mut [f32],
        f: unsafe fn(__m512) -> __m512,
    ) {
        let n = x.len();
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let mut v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
            if let Some(a) = add {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, a.as_ptr().add(i)));
            }
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), m, f(v));
            i += 16;
        }
    }
}

/// The 8-lane AVX2+FMA versions of [`avx512`]'s `exp16`, `ln16`, `softplus16` and `silu16`:
/// the same polynomials and formulas, with the power of two and the exponent/mantissa split
/// done with integer operations on the bit patterns (AVX2 has no `scalef`/`getexp`/`getmant`)
/// and blends on comparison masks instead of mask registers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// `eˣ`, 8 lanes (Cephes `expf` polynomial with Cody–Waite reduction, ≈1 ulp). Arguments
    /// are clamped to [−87.3, 88.0]: at the top `n = round(x·log2 e)` stays ≤ 127, so that
    /// `2ⁿ`, built in the exponent bits, is finite (e⁸⁸ ≈ 1.65e38); at the bottom `n ≥ −126`
    /// keeps it normal.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.336_54)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        exp8_reduced(r, n)
    }

    /// `eʳ·2ⁿ` for the reduced argument `r` (|r| ≤ ½ ln 2 and a little) and the integer `n`
    /// in [−127, 127] (2⁻¹²⁷ gives 0): the polynomial and the exponent step of [`exp8`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8_reduced(r: __m256, n: __m256) -> __m256 {
        let mut p = _mm256_set1_ps(1.987_569_2e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        // the biased exponent n + 127 in bits 23..31
        let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        _mm256_mul_ps(y, pow2n)
    }

    /// Natural logarithm of positive normal `x` (Cephes `logf` polynomial, ≈1 ulp).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn ln8(x: __m256) -> __m256 {
        // x = m · 2^e with m in [1, 2) from the bits (x > 0: no sign bit); fold m into
        // [√½, √2]
        let bits = _mm256_castps_si256(x);
        let e = _mm256_sub_epi32(_mm256_srli_epi32::<23>(bits), _mm256_set1_epi32(127));
        let m = _mm256_castsi256_ps(_mm256_or_si256(
            _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x3f80_0000),
        ));
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(m, _mm256_set1_ps(std::f32::consts::SQRT_2));
        let m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5)), big);
        let e = _mm256_add_ps(
            _mm256_cvtepi32_ps(e),
            _mm256_and_ps(big, _mm256_set1_ps(1.0)),
        );
        let f = _mm256_sub_ps(m, _mm256_set1_ps(1.0));
        let z = _mm256_mul_ps(f, f);
        let mut y = _mm256_set1_ps(7.037_683_6e-2);
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.151_461e-1));
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.167_699_9e-1));
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.242_014_1e-1));
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.424_932_3e-1));
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.666_805_8e-1));
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.000_071_4e-1));
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.499_999_4e-1));
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.333_333e-1));
        y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
        y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.121_944_4e-4), y);
        y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5), y);
        let r = _mm256_add_ps(f, y);
        _mm256_fmadd_ps(e, _mm256_set1_ps(0.693_359_4), r)
    }

    /// Softplus with PyTorch's threshold (see [`crate::gpt::scan::softplus`]): `log1p(eᵛ)`
    /// evaluated as `ln(u)·e/(u − 1)` with `u = 1 + e` (exact `e` where `u` rounds to 1), `v`
    /// itself where `v > 20`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softplus8(v: __m256) -> __m256 {
        let e = exp8(v);
        let u = _mm256_add_ps(e, _mm256_set1_ps(1.0));
        let um1 = _mm256_sub_ps(u, _mm256_set1_ps(1.0));
        let l = _mm256_div_ps(_mm256_mul_ps(ln8(u), e), um1);
        let tiny = _mm256_cmp_ps::<_CMP_EQ_OQ>(um1, _mm256_setzero_ps());
        let r = _mm256_blendv_ps(l, e, tiny);
        let over = _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_set1_ps(20.0));
        _mm256_blendv_ps(r, v, over)
    }

    /// `v·σ(v)`; for `v` below −88 the clamped `e⁻ᵛ` ≈ 1.65e38 gives ≈ 0 (|v|·6e-39).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu8(v: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        _mm256_div_ps(v, _mm256_add_ps(e, _mm256_set1_ps(1.0)))
    }

    /// Lane mask (all bits set) of the lanes `0..rest.min(8)`, for `_mm256_maskload_ps` and
    /// `_mm256_maskstore_ps`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn tail_mask(rest: usize) -> __m256i {
        let rest = rest.min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(rest),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// `e^(hi + lo)` for `hi + lo` in [−88, 1], `lo` not necessarily small (exp8's reduction with
    /// `lo` added after the subtraction of `n·ln 2` from `hi`, so that a large `hi` known
    /// exactly keeps its accuracy: ≈1 ulp where `fl(hi + lo)` alone would lose |hi|·ε).
    /// Below −87.3 the result is meaningless (the caller masks it).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8_sum(hi: __m256, lo: __m256) -> __m256 {
        let s = _mm256_max_ps(_mm256_add_ps(hi, lo), _mm256_set1_ps(-88.0));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(s, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), hi);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        // n in [−127, 1] (0 for −127, where the caller masks)
        exp8_reduced(_mm256_add_ps(r, lo), n)
    }

    /// GELU in its erf form, `x·Φ(x)` with `Φ(x) = ½·erfc(−x/√2)`, 8 lanes, within a few ulp
    /// of the exact value (tested against f64). `erfc(z)` for `z = |x|/√2` comes from
    /// Numerical Recipes' Chebyshev fit `t·exp(−z² + P(t))`, `t = 1/(1 + z/2)` (relative error
    /// < 1.2e-7 for all z ≥ 0), with `z² = x²/2` kept as an unrounded pair (`x·x` and its
    /// FMA remainder) up to the exponential; `Φ = 1 − ½·erfc(z)` for x ≥ 0 and `½·erfc(z)`
    /// for x < 0, so that the negative side keeps its relative accuracy (`(erf + 1)/2`
    /// cancels there: the scalar erf form is up to 5e-4 off on [−4, −3]). `Φ` is 0 where the exponent
    /// is below −87 (x < −13, where |GELU| < 1e-37): no denormal results.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu8(x: __m256) -> __m256 {
        use super::ERFC_POLY as P;
        let sign = _mm256_set1_ps(-0.0);
        let z = _mm256_mul_ps(
            _mm256_andnot_ps(sign, x),
            _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        );
        let one = _mm256_set1_ps(1.0);
        let half = _mm256_set1_ps(0.5);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(z, half, one));
        let mut p = _mm256_set1_ps(P[9]);
        for &c in P[..9].iter().rev() {
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c));
        }
        // −z² + P(t) = −½·xx − ½·xl + P(t), with x² = xx + xl exactly
        let xx = _mm256_mul_ps(x, x);
        let xl = _mm256_fmsub_ps(x, x, xx);
        let hi = _mm256_mul_ps(xx, _mm256_set1_ps(-0.5));
        let lo = _mm256_fnmadd_ps(xl, half, p);
        let he = _mm256_mul_ps(_mm256_mul_ps(t, exp8_sum(hi, lo)), half);
        let live = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_add_ps(hi, lo), _mm256_set1_ps(-87.0));
        let he = _mm256_and_ps(he, live);
        let neg = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
        let phi = _mm256_blendv_ps(_mm256_sub_ps(one, he), he, neg);
        _mm256_mul_ps(x, phi)
    }

    /// `out[i] = v[i] · SiLU(g[i])` (the GatedMLP gate; [`super::avx512::silu_gate`] on 8
    /// lanes): full vectors load and store plainly, the tail through a lane mask.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; the three slices have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_gate(v: &[f32], g: &[f32], out: &mut [f32]) {
        assert!(v.len() == out.len() && g.len() == out.len());
        let n = out.len();
        let mut i = 0;
        while i < n {
            let (gp, vp, op) = (
                g.as_ptr().add(i),
                v.as_ptr().add(i),
                out.as_mut_ptr().add(i),
            );
            if n - i >= 8 {
                let y = _mm256_mul_ps(silu8(_mm256_loadu_ps(gp)), _mm256_loadu_ps(vp));
                _mm256_storeu_ps(op, y);
            } else {
                let m = tail_mask(n - i);
                let y = _mm256_mul_ps(silu8(_mm256_maskload_ps(gp, m)), _mm256_maskload_ps(vp, m));
                _mm256_maskstore_ps(op, m, y);
            }
            i += 8;
        }
    }

    /// `y[i] = e^(y[i] − max)` in place (a softmax's numerators, `max` the row's maximum), by
    /// [`exp8`] (≈1 ulp), and exactly 0 where `y[i] − max` is below −87.3 (masked entries,
    /// −∞, among them): no denormal weights.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_in_place(y: &mut [f32], max: f32) {
        let n = y.len();
        let mv = _mm256_set1_ps(max);
        let floor = _mm256_set1_ps(-87.336_54);
        let mut i = 0;
        while i < n {
            let full = n - i >= 8;
            let m = tail_mask(n - i);
            let at = y.as_mut_ptr().add(i);
            let v = if full {
                _mm256_loadu_ps(at)
            } else {
                _mm256_maskload_ps(at, m)
            };
            let d = _mm256_sub_ps(v, mv);
            let e = _mm256_and_ps(exp8(d), _mm256_cmp_ps::<_CMP_GE_OQ>(d, floor));
            if full {
                _mm256_storeu_ps(at, e);
            } else {
                _mm256_maskstore_ps(at, m, e);
            }
            i += 8;
        }
    }

    /// `y[i] = SiLU(y[i])` in place, 8 lanes at a time: full vectors load and store plainly,
    /// the tail through a lane mask ([`silu_gate_residual`]; a `vmaskmovps` store per vector
    /// made this 0.65 % of a step on Zen 2).
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_in_place(y: &mut [f32]) {
        silu_gate_residual(y.as_mut_ptr(), y.len(), true, None, None);
    }

    /// `y = T(act(y)) · gate + residual` over `n` values (act: SiLU when `silu`, else none),
    /// gate and residual optional, 8 lanes at a time; full vectors load and store plainly,
    /// the tail through a lane mask (`vmaskmovps` is slow on AMD).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `y` points to `n` writable f32, and `gate`/`residual`
    /// to `n` readable ones where given.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_gate_residual(
        y: *mut f32,
        n: usize,
        silu: bool,
        gate: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        if silu {
            act_gate_residual::<ACT_SILU>(y, n, gate, residual)
        } else {
            act_gate_residual::<ACT_NONE>(y, n, gate, residual)
        }
    }

    /// [`silu_gate_residual`] with [`gelu8`] as the activation.
    ///
    /// # Safety
    /// As [`silu_gate_residual`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_gate_residual(
        y: *mut f32,
        n: usize,
        gate: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        act_gate_residual::<ACT_GELU>(y, n, gate, residual)
    }

    const ACT_NONE: u8 = 0;
    const ACT_SILU: u8 = 1;
    const ACT_GELU: u8 = 2;

    /// The loop of [`silu_gate_residual`] and [`gelu_gate_residual`], the activation a
    /// constant (none, SiLU or GELU) so that each one is inlined.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn act_gate_residual<const ACT: u8>(
        y: *mut f32,
        n: usize,
        gate: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        let mut i = 0;
        while i < n {
            let full = n - i >= 8;
            let m = tail_mask(n - i);
            let load = |p: *const f32| {
                if full {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, m)
                }
            };
            let mut v = load(y.add(i));
            if ACT == ACT_SILU {
                v = silu8(v);
            } else if ACT == ACT_GELU {
                v = gelu8(v);
            }
            if let Some(g) = gate {
                v = _mm256_mul_ps(v, load(g.add(i)));
            }
            if let Some(r) = residual {
                v = _mm256_add_ps(load(r.add(i)), v);
            }
            if full {
                _mm256_storeu_ps(y.add(i), v);
            } else {
                _mm256_maskstore_ps(y.add(i), m, v);
            }
            i += 8;
        }
    }

    /// `out[i] = f(x[i])` over a slice, 8 lanes at a time with a masked tail.
    #[cfg(test)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn map8(x: &[f32], out: &mut [f32], f: unsafe fn(__m256) -> __m256) {
        assert_eq!(x.len(), out.len());
        let n = x.len();
        let mut i = 0;
        while i < n {
            let m = tail_mask(n - i);
            let v = _mm256_maskload_ps(x.as_ptr().add(i), m);
            _mm256_maskstore_ps(out.as_mut_ptr().add(i), m, f(v));
            i += 8;
        }
    }
}

/// The 4-lane NEON (AArch64: Apple Silicon, Arm servers) counterparts of [`avx2`]'s `exp`,
/// `ln`, softplus and SiLU: the same Cephes polynomials and the same clamps, with NEON's fused
/// multiply-adds. NEON is part of every AArch64 target, so nothing is detected at run time.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use std::arch::aarch64::*;

    /// `eˣ`, 4 lanes (as [`super::avx2::exp8`]: arguments clamped to [−87.3, 88.0], ≈1 ulp).
    #[inline(always)]
    pub fn exp4(x: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe {
            let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.336_54)), vdupq_n_f32(88.0));
            let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
            let r = vfmsq_f32(x, n, vdupq_n_f32(0.693_359_4));
            let r = vfmsq_f32(r, n, vdupq_n_f32(-2.121_944_4e-4));
            exp4_reduced(r, n)
        }
    }

    /// `eʳ·2ⁿ` for the reduced argument `r` and the integer `n` in [−127, 127] (2⁻¹²⁷ gives
    /// 0): the polynomial and the exponent step of [`exp4`] (as [`super::avx2`]'s
    /// `exp8_reduced`).
    #[inline(always)]
    fn exp4_reduced(r: float32x4_t, n: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe {
            let mut p = vdupq_n_f32(1.987_569_2e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ] {
                p = vfmaq_f32(vdupq_n_f32(c), p, r);
            }
            let y = vaddq_f32(vfmaq_f32(r, p, vmulq_f32(r, r)), vdupq_n_f32(1.0));
            // 2ⁿ: the biased exponent n + 127 in bits 23..31
            let pow2n = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(
                vcvtq_s32_f32(n),
                vdupq_n_s32(127),
            )));
            vmulq_f32(y, pow2n)
        }
    }

    /// `e^(hi + lo)` for `hi + lo` in [−88, 1], `lo` not necessarily small: [`exp4`]'s
    /// reduction with `lo` added after the subtraction of `n·ln 2` from `hi` (as
    /// [`super::avx2`]'s `exp8_sum`). Below −87.3 the result is meaningless (the caller masks
    /// it).
    #[inline(always)]
    fn exp4_sum(hi: float32x4_t, lo: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe {
            let s = vmaxq_f32(vaddq_f32(hi, lo), vdupq_n_f32(-88.0));
            let n = vrndnq_f32(vmulq_f32(s, vdupq_n_f32(std::f32::consts::LOG2_E)));
            let r = vfmsq_f32(hi, n, vdupq_n_f32(0.693_359_4));
            let r = vfmsq_f32(r, n, vdupq_n_f32(-2.121_944_4e-4));
            exp4_reduced(vaddq_f32(r, lo), n)
        }
    }

    /// GELU in its erf form, 4 lanes: [`super::avx2::gelu8`]'s method (the Chebyshev fit of
    /// `erfc`, `x²/2` as an unrounded pair, `Φ` from the side that does not cancel, 0 below
    /// x ≈ −13), the same operations in the same order.
    #[inline(always)]
    pub fn gelu4(x: float32x4_t) -> float32x4_t {
        use super::ERFC_POLY as P;
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe {
            let z = vmulq_f32(vabsq_f32(x), vdupq_n_f32(std::f32::consts::FRAC_1_SQRT_2));
            let one = vdupq_n_f32(1.0);
            let half = vdupq_n_f32(0.5);
            let t = vdivq_f32(one, vfmaq_f32(one, z, half));
            let mut p = vdupq_n_f32(P[9]);
            for &c in P[..9].iter().rev() {
                p = vfmaq_f32(vdupq_n_f32(c), p, t);
            }
            // −z² + P(t) = −½·xx − ½·xl + P(t), with x² = xx + xl exactly
            let xx = vmulq_f32(x, x);
            let xl = vfmaq_f32(vnegq_f32(xx), x, x);
            let hi = vmulq_f32(xx, vdupq_n_f32(-0.5));
            let lo = vfmsq_f32(p, xl, half);
            let he = vmulq_f32(vmulq_f32(t, exp4_sum(hi, lo)), half);
            let live = vcgeq_f32(vaddq_f32(hi, lo), vdupq_n_f32(-87.0));
            let he = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(he), live));
            let neg = vcltq_f32(x, vdupq_n_f32(0.0));
            let phi = vbslq_f32(neg, he, vsubq_f32(one, he));
            vmulq_f32(x, phi)
        }
    }

    /// Natural logarithm of positive normal `x` (as [`super::avx2`]'s `ln8`, ≈1 ulp).
    #[inline(always)]
    fn ln4(x: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe {
            let bits = vreinterpretq_u32_f32(x);
            let e = vsubq_s32(
                vreinterpretq_s32_u32(vshrq_n_u32::<23>(bits)),
                vdupq_n_s32(127),
            );
            let m = vreinterpretq_f32_u32(vorrq_u32(
                vandq_u32(bits, vdupq_n_u32(0x007f_ffff)),
                vdupq_n_u32(0x3f80_0000),
            ));
            let big = vcgtq_f32(m, vdupq_n_f32(std::f32::consts::SQRT_2));
            let m = vbslq_f32(big, vmulq_f32(m, vdupq_n_f32(0.5)), m);
            let e = vaddq_f32(
                vcvtq_f32_s32(e),
                vreinterpretq_f32_u32(vandq_u32(big, vreinterpretq_u32_f32(vdupq_n_f32(1.0)))),
            );
            let f = vsubq_f32(m, vdupq_n_f32(1.0));
            let z = vmulq_f32(f, f);
            let mut y = vdupq_n_f32(7.037_683_6e-2);
            for c in [
                -1.151_461e-1,
                1.167_699_9e-1,
                -1.242_014_1e-1,
                1.424_932_3e-1,
                -1.666_805_8e-1,
                2.000_071_4e-1,
                -2.499_999_4e-1,
                3.333_333e-1,
            ] {
                y = vfmaq_f32(vdupq_n_f32(c), y, f);
            }
            let y = vmulq_f32(vmulq_f32(y, f), z);
            let y = vfmaq_f32(y, e, vdupq_n_f32(-2.121_944_4e-4));
            let y = vfmsq_f32(y, z, vdupq_n_f32(0.5));
            let r = vaddq_f32(f, y);
            vfmaq_f32(r, e, vdupq_n_f32(0.693_359_4))
        }
    }

    /// Softplus with PyTorch's threshold, as [`super::avx2::softplus8`].
    #[inline(always)]
    pub fn softplus4(v: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe {
            let e = exp4(v);
            let u = vaddq_f32(e, vdupq_n_f32(1.0));
            let um1 = vsubq_f32(u, vdupq_n_f32(1.0));
            let l = vdivq_f32(vmulq_f32(ln4(u), e), um1);
            let r = vbslq_f32(vceqzq_f32(um1), e, l);
            vbslq_f32(vcgtq_f32(v, vdupq_n_f32(20.0)), v, r)
        }
    }

    /// `v·σ(v)`, as [`super::avx2::silu8`].
    #[inline(always)]
    pub fn silu4(v: float32x4_t) -> float32x4_t {
        // SAFETY: NEON is part of the AArch64 baseline; no memory is touched.
        unsafe { vdivq_f32(v, vaddq_f32(exp4(vnegq_f32(v)), vdupq_n_f32(1.0))) }
    }

    /// `y[i] = SiLU(y[i])` in place, 4 lanes at a time (the tail through a small buffer).
    pub fn silu_in_place(y: &mut [f32]) {
        map_in_place(y, silu4);
    }

    /// The `cw` ≤ 4 values at `at` as 4 lanes (zeros after them); nothing beyond them is read.
    ///
    /// # Safety
    /// `at` points to `cw` readable f32.
    #[inline(always)]
    unsafe fn load_part(at: *const f32, cw: usize) -> float32x4_t {
        if cw >= 4 {
            vld1q_f32(at)
        } else {
            let mut buf = [0f32; 4];
            std::ptr::copy_nonoverlapping(at, buf.as_mut_ptr(), cw);
            vld1q_f32(buf.as_ptr())
        }
    }

    /// Stores the first `cw` ≤ 4 lanes of `v` at `at`; nothing beyond them is written.
    ///
    /// # Safety
    /// `at` points to `cw` writable f32.
    #[inline(always)]
    unsafe fn store_part(at: *mut f32, cw: usize, v: float32x4_t) {
        if cw >= 4 {
            vst1q_f32(at, v)
        } else {
            let mut buf = [0f32; 4];
            vst1q_f32(buf.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), at, cw);
        }
    }

    /// `out[i] = v[i] · SiLU(g[i])` (the GatedMLP gate), as [`super::avx2::silu_gate`].
    ///
    /// # Panics
    /// If the three slices differ in length.
    pub fn silu_gate(v: &[f32], g: &[f32], out: &mut [f32]) {
        assert!(v.len() == out.len() && g.len() == out.len());
        // SAFETY: `out` holds n writable values and `g`, `v` n readable ones.
        unsafe {
            act_gate_residual::<ACT_SILU>(
                g.as_ptr(),
                out.as_mut_ptr(),
                out.len(),
                Some(v.as_ptr()),
                None,
            )
        }
    }

    /// `y[i] = e^(y[i] − max)` in place (a softmax's numerators), by [`exp4`] (≈1 ulp), and
    /// exactly 0 where `y[i] − max` is below −87.3 (as [`super::avx2::exp_shifted_in_place`]).
    pub fn exp_shifted_in_place(y: &mut [f32], max: f32) {
        let n = y.len();
        let mut i = 0;
        while i < n {
            let cw = (n - i).min(4);
            // SAFETY: `cw` values at `i` are inside `y`.
            unsafe {
                let at = y.as_mut_ptr().add(i);
                let d = vsubq_f32(load_part(at, cw), vdupq_n_f32(max));
                let keep = vcgeq_f32(d, vdupq_n_f32(-87.336_54));
                let e = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(exp4(d)), keep));
                store_part(at, cw, e);
            }
            i += 4;
        }
    }

    /// `y = act(y) · gate + residual` over `n` values (act: SiLU when `silu`, else none), gate
    /// and residual optional, as [`super::avx2::silu_gate_residual`].
    ///
    /// # Safety
    /// `y` points to `n` writable f32, and `gate`/`residual` to `n` readable ones where given.
    pub unsafe fn silu_gate_residual(
        y: *mut f32,
        n: usize,
        silu: bool,
        gate: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        if silu {
            act_gate_residual::<ACT_SILU>(y, y, n, gate, residual)
        } else {
            act_gate_residual::<ACT_NONE>(y, y, n, gate, residual)
        }
    }

    /// [`silu_gate_residual`] with [`gelu4`] as the activation.
    ///
    /// # Safety
    /// As [`silu_gate_residual`].
    pub unsafe fn gelu_gate_residual(
        y: *mut f32,
        n: usize,
        gate: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        act_gate_residual::<ACT_GELU>(y, y, n, gate, residual)
    }

    const ACT_NONE: u8 = 0;
    const ACT_SILU: u8 = 1;
    const ACT_GELU: u8 = 2;

    /// The loop of [`silu_gate_residual`] and [`gelu_gate_residual`] from `x` to `out` (the
    /// same pointer for in place), the activation a constant so that each one is inlined; the
    /// tail goes through a small buffer.
    #[inline(always)]
    unsafe fn act_gate_residual<const ACT: u8>(
        x: *const f32,
        out: *mut f32,
        n: usize,
        gate: Option<*const f32>,
        residual: Option<*const f32>,
    ) {
        let mut i = 0;
        while i < n {
            let cw = (n - i).min(4);
            let mut v = load_part(x.add(i), cw);
            if ACT == ACT_SILU {
                v = silu4(v);
            } else if ACT == ACT_GELU {
                v = gelu4(v);
            }
            if let Some(g) = gate {
                v = vmulq_f32(v, load_part(g.add(i), cw));
            }
            if let Some(r) = residual {
                v = vaddq_f32(load_part(r.add(i), cw), v);
            }
            store_part(out.add(i), cw, v);
            i += 4;
        }
    }

    /// `y[i] = f(y[i])` in place, 4 lanes at a time (the tail through a small buffer).
    fn map_in_place(y: &mut [f32], f: fn(float32x4_t) -> float32x4_t) {
        for i in (0..y.len()).step_by(4) {
            let cw = (y.len() - i).min(4);
            // SAFETY: `cw` values at `i` are inside `y`.
            unsafe {
                let at = y.as_mut_ptr().add(i);
                store_part(at, cw, f(load_part(at, cw)));
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::gpt::scan::{silu, softplus};

        fn map(xs: &[f32], f: fn(float32x4_t) -> float32x4_t) -> Vec<f32> {
            let mut out = xs.to_vec();
            map_in_place(&mut out, f);
            out
        }

        #[test]
        fn neon_softplus_silu_and_exp_match_the_scalar_ones() {
            // 39 997 values: the last one through the tail buffer
            let xs: Vec<f32> = (0..39_997).map(|i| -60.0 + i as f32 * 0.002_1).collect();
            let (sp, si) = (map(&xs, softplus4), map(&xs, silu4));
            for (i, &x) in xs.iter().enumerate() {
                let (rs, ri) = (softplus(x), silu(x));
                assert!(
                    (sp[i] - rs).abs() <= 4.0 * f32::EPSILON * rs.abs(),
                    "softplus({x}) = {} vs {rs}",
                    sp[i]
                );
                assert!(
                    (si[i] - ri).abs() <= 4.0 * f32::EPSILON * ri.abs().max(1e-30),
                    "silu({x}) = {} vs {ri}",
                    si[i]
                );
            }
            let mut si2 = xs.clone();
            silu_in_place(&mut si2);
            assert_eq!(si2, si, "silu_in_place");
            let xs: Vec<f32> = (0..100_000).map(|i| -87.0 + i as f32 * 0.001_75).collect();
            let mut worst = 0f64;
            for (&x, &e) in xs.iter().zip(&map(&xs, exp4)) {
                let r = (x as f64).exp();
                worst = worst.max(((e as f64 - r) / r).abs());
            }
            assert!(worst < 2.5e-7, "exp4: worst relative error {worst}");
            let big = [88.0f32, 88.5, 100.0, 1e4, f32::MAX, -88.0, -100.0, -1e4];
            for (&x, &e) in big.iter().zip(&map(&big, exp4)) {
                assert!(e.is_finite() && e > 0.0, "exp4({x}) = {e}");
            }
            let xs = [
                20.001f32, 25.0, 88.5, 100.0, 1e4, -17.0, -30.0, -60.0, -87.0,
            ];
            let (sp, e) = (map(&xs, softplus4), map(&xs, exp4));
            // v itself above 20, e where 1 + e rounds to 1
            for i in 0..xs.len() {
                let want = if xs[i] > 20.0 { xs[i] } else { e[i] };
                assert_eq!(sp[i], want, "softplus({})", xs[i]);
            }
            // SiLU: ≈ 0 for large negative v, v for large positive v
            let xs = [-88.5f32, -100.0, -1e4, 90.0, 1e4];
            for (&x, &y) in xs.iter().zip(&map(&xs, silu4)) {
                if x < 0.0 {
                    assert!(y <= 0.0 && y > -1e-30, "silu({x}) = {y}");
                } else {
                    assert_eq!(y, x, "silu({x})");
                }
            }
        }

        #[test]
        fn neon_gelu_is_accurate_on_both_sides() {
            crate::gpt::vmath::test_support::check_gelu("gelu4", |out| {
                // SAFETY: `out` holds out.len() values.
                unsafe { gelu_gate_residual(out.as_mut_ptr(), out.len(), None, None) }
            });
        }

        #[test]
        fn neon_softmax_numerators_match_libm_and_zero_the_masked() {
            crate::gpt::vmath::test_support::check_softmax_numerators(exp_shifted_in_place);
        }

        #[test]
        fn neon_silu_gate_residual_matches_the_scalar_ones() {
            // 37 values: nine full vectors and a tail of 1; 8: no tail; 3: only a tail
            for n in [37, 8, 3] {
                let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
                let g: Vec<f32> = (0..n)
                    .map(|i| (i as f32 * 0.91).cos() * 9.0 - 2.0)
                    .collect();
                let r: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 4.0).collect();
                crate::gpt::vmath::test_support::check_silu_gate_residual(
                    &v,
                    &g,
                    &r,
                    |y, act, gate, res| {
                        // SAFETY: all slices have n elements.
                        unsafe { silu_gate_residual(y.as_mut_ptr(), y.len(), act, gate, res) }
                    },
                );
                // the GatedMLP gate: the same values as the gated in-place form
                let mut out = vec![0f32; n];
                silu_gate(&v, &g, &mut out);
                let mut inplace = g.clone();
                // SAFETY: as above.
                unsafe {
                    silu_gate_residual(inplace.as_mut_ptr(), n, true, Some(v.as_ptr()), None)
                };
                assert_eq!(out, inplace, "silu_gate, n = {n}");
                // a tail writes nothing beyond the slice
                let mut padded = v.clone();
                padded.push(7.0);
                // SAFETY: the first n of the n + 1 values.
                unsafe { silu_gate_residual(padded.as_mut_ptr(), n, true, None, None) };
                assert_eq!(padded[n], 7.0, "n = {n}");
            }
        }
    }
}

/// Checks shared by the x86-64 and NEON tests of the vector functions.
#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod test_support {
    use crate::gpt::scan::silu;

    /// GELU (erf form) in f64, from the complementary error function.
    fn gelu_exact(x: f32) -> f64 {
        let x = x as f64;
        0.5 * x * candle_core::cpu::erf::erfc_f64(-x * std::f64::consts::FRAC_1_SQRT_2)
    }

    /// A vector GELU (`gelu`, in place over a slice) against the exact one: within 5e-7
    /// relative for x ≥ −8 and 1e-6 wherever |GELU| > 1e-30, no denormals, `x` itself from 6
    /// up, and far closer than the scalar erf form on [−4, −3], where that one cancels.
    pub(super) fn check_gelu(name: &str, gelu: impl Fn(&mut [f32])) {
        // −16 .. 16 in steps of 1e-4 (a vector tail included), and some far arguments
        let mut xs: Vec<f32> = (0..320_003).map(|i| -16.0 + i as f32 * 1e-4).collect();
        xs.extend([
            -1e30f32, -1e4, -100.0, -13.5, 13.5, 100.0, 1e4, 1e30, 0.0, -0.0, 1e-30, -1e-30,
        ]);
        let mut out = xs.clone();
        gelu(&mut out);
        let (mut worst_rel, mut worst_near, mut worst_scalar) = (0f64, 0f64, 0f64);
        for (&x, &g) in xs.iter().zip(&out) {
            assert!(
                g.is_finite() && (g == 0.0 || g.is_normal()),
                "{name}({x}) = {g}"
            );
            let r = gelu_exact(x);
            if r.abs() > 1e-30 {
                let e = ((g as f64 - r) / r).abs();
                if x >= -8.0 {
                    worst_near = worst_near.max(e);
                }
                worst_rel = worst_rel.max(e);
            } else {
                assert!(g.abs() <= 1e-30, "{name}({x}) = {g} vs {r}");
            }
            // the scalar erf form (candle's, libm's erf) on the same scale
            let s = (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.)
                * 0.5
                * x;
            if (-4.0..=-3.0).contains(&x) {
                worst_scalar = worst_scalar.max(((s as f64 - r) / r).abs());
            }
        }
        eprintln!(
            "{name} worst relative error {worst_near:e} for x ≥ −8, {worst_rel:e} where |GELU| > \
             1e-30; scalar erf form {worst_scalar:e} on [−4, −3]"
        );
        assert!(
            worst_near < 5e-7,
            "{name}: worst relative error {worst_near} for x ≥ −8"
        );
        assert!(worst_rel < 1e-6, "{name}: worst relative error {worst_rel}");
        // the scalar erf form cancels on the negative side; the vector form does not
        assert!(
            worst_scalar > 10.0 * worst_near,
            "{worst_scalar} vs {worst_near}"
        );
        // large positive arguments give x itself
        for (&x, &g) in xs.iter().zip(&out) {
            if x >= 6.0 {
                assert_eq!(g, x, "{name}({x})");
            }
        }
    }

    /// A vector softmax numerator (`exp_shifted(y, max)`, in place) against libm's `exp`
    /// (2 ulp), exactly 0 for masked (−∞) and far entries.
    pub(super) fn check_softmax_numerators(exp_shifted: impl Fn(&mut [f32], f32)) {
        // 21 values (a vector tail), −∞ among them
        let mut row: Vec<f32> = (0..21).map(|i| (i as f32 * 0.77).sin() * 40.0).collect();
        for i in [3, 8, 20] {
            row[i] = f32::NEG_INFINITY;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut got = row.clone();
        exp_shifted(&mut got, max);
        for (i, (&v, &g)) in row.iter().zip(&got).enumerate() {
            let e = (v - max).exp();
            if v - max < -87.336_54 {
                assert_eq!(g.to_bits(), 0, "at {i}: {g}");
            } else {
                assert!(
                    (g - e).abs() <= 2.0 * f32::EPSILON * e,
                    "at {i}: {g} vs {e}"
                );
            }
        }
        assert_eq!(got[3], 0.0);
    }

    /// `f(y, silu, gate, residual)` against the scalar SiLU, product and sum (8 ulp).
    pub(super) fn check_silu_gate_residual(
        v: &[f32],
        g: &[f32],
        r: &[f32],
        f: impl Fn(&mut [f32], bool, Option<*const f32>, Option<*const f32>),
    ) {
        let n = v.len();
        for act in [false, true] {
            for gate in [None, Some(g.as_ptr())] {
                for res in [None, Some(r.as_ptr())] {
                    let mut y = v.to_vec();
                    f(&mut y, act, gate, res);
                    for i in 0..n {
                        let mut e = if act { silu(v[i]) } else { v[i] };
                        if gate.is_some() {
                            e *= g[i];
                        }
                        if res.is_some() {
                            e += r[i];
                        }
                        let tol = 8.0 * f32::EPSILON * (e.abs() + r[i].abs());
                        assert!((y[i] - e).abs() <= tol, "{act} {gate:?} {res:?} at {i}");
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::test_support::{check_gelu, check_silu_gate_residual, check_softmax_numerators};
    use super::{avx2, avx512};
    use crate::gpt::scan::{silu, softplus};

    fn avx512_here() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    fn avx2_here() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// Checks vector softplus (`sp`) and SiLU (`si`) values of `xs` against the scalar ones
    /// (4 ulp relative).
    fn check_softplus_silu(what: &str, xs: &[f32], sp: &[f32], si: &[f32]) {
        for (i, &x) in xs.iter().enumerate() {
            let (rs, ri) = (softplus(x), silu(x));
            assert!(
                (sp[i] - rs).abs() <= 4.0 * f32::EPSILON * rs.abs(),
                "{what}: softplus({x}) = {} vs {rs}",
                sp[i]
            );
            assert!(
                (si[i] - ri).abs() <= 4.0 * f32::EPSILON * ri.abs().max(1e-30),
                "{what}: silu({x}) = {} vs {ri}",
                si[i]
            );
        }
    }

    #[test]
    fn vector_softplus_and_silu_match_the_scalar_ones() {
        let xs: Vec<f32> = (0..40_000).map(|i| -60.0 + i as f32 * 0.002_1).collect();
        let mut sp = vec![0f32; xs.len()];
        let mut si = vec![0f32; xs.len()];
        if avx512_here() {
            // SAFETY: AVX-512F was detected.
            unsafe {
                avx512::map16(&xs, None, &mut sp, avx512::softplus16);
                avx512::map16(&xs, None, &mut si, avx512::silu16);
            }
            check_softplus_silu("avx512", &xs, &sp, &si);
        } else {
            eprintln!("no AVX-512F here: the 16-lane functions are not used");
        }
        if avx2_here() {
            // 39 997 values: the last 5 through the masked tail
            let xs = &xs[..39_997];
            let (sp, si) = (&mut sp[..39_997], &mut si[..39_997]);
            // SAFETY: AVX2 and FMA were detected; the slices have the same length.
            unsafe {
                avx2::map8(xs, sp, avx2::softplus8);
                avx2::map8(xs, si, avx2::silu8);
            }
            check_softplus_silu("avx2", xs, sp, si);
            let mut si2 = xs.to_vec();
            // SAFETY: AVX2 and FMA were detected.
            unsafe { avx2::silu_in_place(&mut si2) };
            assert_eq!(&si2[..], &si[..], "silu_in_place");
        } else {
            eprintln!("no AVX2+FMA here: the 8-lane functions are not used");
        }
    }

    #[test]
    fn avx2_exp_is_accurate_and_large_arguments_are_safe() {
        if !avx2_here() {
            eprintln!("no AVX2+FMA here: the 8-lane functions are not used");
            return;
        }
        let map =
            |xs: &[f32], f: unsafe fn(std::arch::x86_64::__m256) -> std::arch::x86_64::__m256| {
                let mut out = vec![0f32; xs.len()];
                // SAFETY: AVX2 and FMA were detected; `out` has the length of `xs`.
                unsafe { avx2::map8(xs, &mut out, f) };
                out
            };
        // eˣ over the unclamped range, vs f64
        let xs: Vec<f32> = (0..100_000).map(|i| -87.0 + i as f32 * 0.001_75).collect();
        let mut worst = 0f64;
        for (&x, &e) in xs.iter().zip(&map(&xs, avx2::exp8)) {
            let r = (x as f64).exp();
            worst = worst.max(((e as f64 - r) / r).abs());
        }
        assert!(worst < 2.5e-7, "exp8: worst relative error {worst}");
        // clamped arguments: finite, and normal at the bottom
        let big = [88.0f32, 88.5, 100.0, 1e4, f32::MAX, -88.0, -100.0, -1e4];
        for (&x, &e) in big.iter().zip(&map(&big, avx2::exp8)) {
            assert!(e.is_finite() && e > 0.0, "exp8({x}) = {e}");
        }
        // softplus: v itself above 20, e where 1 + e rounds to 1
        let xs = [
            20.001f32, 25.0, 88.5, 100.0, 1e4, -17.0, -30.0, -60.0, -87.0,
        ];
        let sp = map(&xs, avx2::softplus8);
        let e = map(&xs, avx2::exp8);
        for i in 0..xs.len() {
            if xs[i] > 20.0 {
                assert_eq!(sp[i], xs[i], "softplus({})", xs[i]);
            } else {
                assert_eq!(sp[i], e[i], "softplus({})", xs[i]);
            }
        }
        // SiLU: ≈ 0 for large negative v, v for large positive v
        let xs = [-88.5f32, -100.0, -1e4, 90.0, 1e4];
        for (&x, &y) in xs.iter().zip(&map(&xs, avx2::silu8)) {
            if x < 0.0 {
                assert!(y <= 0.0 && y > -1e-30, "silu({x}) = {y}");
            } else {
                assert_eq!(y, x, "silu({x})");
            }
        }
    }

    #[test]
    fn avx2_gelu_is_accurate_on_both_sides() {
        if !avx2_here() {
            eprintln!("no AVX2+FMA here: the 8-lane functions are not used");
            return;
        }
        check_gelu("gelu8", |out| {
            // SAFETY: AVX2 and FMA were detected; `out` holds out.len() values.
            unsafe { avx2::gelu_gate_residual(out.as_mut_ptr(), out.len(), None, None) }
        });
    }

    #[test]
    fn avx2_softmax_numerators_match_libm_and_zero_the_masked() {
        if !avx2_here() {
            eprintln!("no AVX2+FMA here: the 8-lane functions are not used");
            return;
        }
        // SAFETY: AVX2 and FMA were detected.
        check_softmax_numerators(|y, max| unsafe { avx2::exp_shifted_in_place(y, max) });
    }

    #[test]
    fn vector_silu_gate_and_epilogue_match_the_scalar_ones() {
        if !avx512_here() {
            eprintln!("no AVX-512F here: the vector functions are not used");
            return;
        }
        // 37 values: two full vectors and a masked tail
        let n = 37;
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let g: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.91).cos() * 9.0 - 2.0)
            .collect();
        let r: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 4.0).collect();
        let close = |a: f32, b: f32| (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1e-30);
        let mut out = vec![0f32; n];
        // SAFETY: AVX-512F was detected; all slices have n elements.
        unsafe { avx512::silu_gate(&v, &g, &mut out) };
        for i in 0..n {
            assert!(close(out[i], v[i] * silu(g[i])), "gate at {i}");
        }
        check_silu_gate_residual(&v, &g, &r, |y, act, gate, res| {
            // SAFETY: AVX-512F was detected; all slices have n elements.
            unsafe { avx512::silu_gate_residual(y.as_mut_ptr(), y.len(), act, gate, res) }
        });
    }

    #[test]
    fn avx2_silu_gate_residual_matches_the_scalar_ones() {
        if !avx2_here() {
            eprintln!("no AVX2+FMA here: the vector functions are not used");
            return;
        }
        // 37 values: four full vectors and a masked tail; 8: no tail
        for n in [37, 8, 5] {
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let g: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.91).cos() * 9.0 - 2.0)
                .collect();
            let r: Vec<f32> = (0..n).map(|i| i as f32 * 0.25 - 4.0).collect();
            check_silu_gate_residual(&v, &g, &r, |y, act, gate, res| {
                // SAFETY: AVX2 and FMA were detected; all slices have n elements.
                unsafe { avx2::silu_gate_residual(y.as_mut_ptr(), y.len(), act, gate, res) }
            });
            // the GatedMLP gate: the same values as the gated in-place form
            let mut out = vec![0f32; n];
            // SAFETY: AVX2 and FMA were detected; all slices have n elements.
            unsafe { avx2::silu_gate(&v, &g, &mut out) };
            let mut inplace = g.clone();
            // SAFETY: as above.
            unsafe {
                avx2::silu_gate_residual(inplace.as_mut_ptr(), n, true, Some(v.as_ptr()), None)
            };
            assert_eq!(out, inplace, "silu_gate, n = {n}");
        }
    }
}
