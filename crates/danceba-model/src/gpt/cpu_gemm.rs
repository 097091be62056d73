//! A CPU GEMM for the linear layers of a generation step: `y = x · Wᵀ (+ b)` with the weight
//! `W` (N × K) in the checkpoint's own row-major layout and few rows `M` (28–84 per song).
//!
//! Why not the general GEMM: at these shapes every weight element is used only `M` times, so a
//! library GEMM that first packs `W` into its own panel layout spends as long copying the weights
//! (≈1 GB per step) as multiplying them. This kernel reads `W` in place: it forms blocks of
//! 4 rows of `x` × 6 rows of `W`, accumulates 24 dot products in AVX-512 registers along `K`
//! (16 lanes at a time, a masked tail), and reduces each at the end. Each weight is read from
//! memory once per call; columns are split between threads.
//!
//! The weights may also be f16 or bf16 (converted to f32 as they are loaded into registers; in
//! the AVX2 kernel f16, and bf16 up to K = 1024, a block of weight rows is converted once into
//! an f32 buffer that its row blocks then read): then `x`, the products and the sums stay f32
//! and only the weights are rounded, with half the memory traffic of f32 weights. The products
//! are those of f32 weights of the same values, bit for bit.
//!
//! Used on x86-64 CPUs with AVX-512F/BW/VL, or in an AVX2 + FMA + F16C version (3 × 4 blocks of
//! 8 lanes) on those without AVX-512 (detected at run time, see [`kernel`]), and on AArch64
//! (Apple Silicon, Arm servers) in a NEON version (4 × 4 blocks of 4 lanes); elsewhere, in
//! builds with the `accelerate` feature (Apple's BLAS, unless `DANCEBA_CPU_GEMM=neon`), and when
//! `DANCEBA_CPU_GEMM=candle` is set (for comparisons), the linear layers use candle's matmul.
//! The summation order differs from candle's, so results agree to float rounding (tested).

use rayon::prelude::*;

/// The most rows the linear layers give [`linear`] (more go to candle's matmul): unlimited, for
/// both kernels (in panels of [`PANEL`] rows); `DANCEBA_CPU_GEMM_MAX_ROWS` sets a limit (for
/// comparisons). Batches of songs measured against candle's packing GEMM: the AVX-512 kernel
/// 1.18–1.32 s per batch-8 step against 1.39 s in f32 and 1.20 s against 2.08 s with f16
/// weights (Xeon); the AVX2 kernel on an AVX2-only AMD EPYC 1.64 s against 1.74 s in f32 and
/// 1.70 s against 2.08 s with bf16 weights. Candle's matmul with f16/bf16 weights also rounds
/// the activations to the weights' type, so the kernel for every row count keeps a batch's
/// results equal to each song's alone (the CPU's activations stay f32).
pub fn max_rows() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| super::env_usize("DANCEBA_CPU_GEMM_MAX_ROWS").unwrap_or(usize::MAX))
}

/// Rows of `x` per register block.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const MR: usize = 4;
/// Rows of `x` per panel: a thread's weight columns pass over one panel of `x` at a time, so
/// that the panel stays in cache with many rows (batches of songs); one song's window (≤ 84
/// rows) is one panel.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
const PANEL: usize = 96;
/// Length of the chunks of k of the AVX-512 kernel's 4 × 6 blocks (6 weight rows of 1024 f32 =
/// 24 KiB stay in L1 across the row blocks of a panel).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const KC: usize = 1024;
/// Rows of `W` (output columns) per register block.
const NR: usize = 6;
/// Rows of `x` and of `W` per register block of the AVX2 kernel (12 accumulators of 16
/// registers).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const MR2: usize = 3;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const NR2: usize = 4;
/// Rows of `x` and of `W` per register block of the NEON kernel (16 accumulators of 32
/// registers: enough independent fused multiply-adds to cover their latency on 4 pipes).
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
const MR3: usize = 4;
const NR3: usize = 4;

/// Which SIMD version of the kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512F/BW/VL: 4 × 6 blocks of 16-lane accumulators.
    Avx512,
    /// AVX2 + FMA + F16C (x86-64 CPUs without AVX-512): 3 × 4 blocks of 8-lane accumulators.
    Avx2,
    /// NEON (every AArch64 CPU): 4 × 4 blocks of 4-lane accumulators.
    Neon,
}

/// The kernel [`linear`] uses here: the widest this CPU supports, `None` where none does
/// (then the linear layers use candle's matmul). `DANCEBA_CPU_GEMM=candle` switches the kernel
/// off and `DANCEBA_CPU_GEMM=avx2` picks the AVX2 one on an AVX-512 CPU (for comparisons). A
/// build with the `accelerate` feature leaves the products to candle's matmul, i.e. Apple's
/// BLAS, which the build asked for, unless `DANCEBA_CPU_GEMM=neon`.
pub fn kernel() -> Option<Kernel> {
    static ON: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *ON.get_or_init(|| match super::env_value("DANCEBA_CPU_GEMM").as_str() {
        "candle" => None,
        "avx2" => detected(Kernel::Avx2).then_some(Kernel::Avx2),
        "neon" => detected(Kernel::Neon).then_some(Kernel::Neon),
        _ if cfg!(feature = "accelerate") => None,
        _ => [Kernel::Avx512, Kernel::Avx2, Kernel::Neon]
            .into_iter()
            .find(|&k| detected(k)),
    })
}

impl Kernel {
    /// Rows of `W` (output columns) per register block.
    fn block_cols(self) -> usize {
        match self {
            Kernel::Avx512 => NR,
            Kernel::Avx2 => NR2,
            Kernel::Neon => NR3,
        }
    }
}

/// Whether [`linear`] can run here (see [`kernel`]).
pub fn available() -> bool {
    kernel().is_some()
}

fn detected(kernel: Kernel) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match kernel {
            Kernel::Neon => false,
            // the AVX-512 kernel's epilogue and attention also run 8-lane AVX2+FMA functions
            // (GELU, the softmax): every AVX-512 CPU has them, checked all the same
            Kernel::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && detected(Kernel::Avx2)
            }
            Kernel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
        }
    }
    // NEON is part of the AArch64 baseline: nothing to detect
    #[cfg(target_arch = "aarch64")]
    {
        kernel == Kernel::Neon
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = kernel;
        false
    }
}

/// A raw output pointer shared by the threads; each writes a disjoint set of columns.
#[derive(Clone, Copy)]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
struct OutPtr(*mut f32);
// SAFETY: the threads write disjoint elements (different columns) and the buffer outlives the
// parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// A weight element type the kernel reads: f32, f16 or bf16.
pub trait Weight: Copy + Send + Sync + sealed::Sealed {
    #[doc(hidden)]
    const KIND: WeightKind;
    #[doc(hidden)]
    fn to_f32(self) -> f32;
}

#[doc(hidden)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WeightKind {
    F32,
    F16,
    Bf16,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

impl Weight for f32 {
    const KIND: WeightKind = WeightKind::F32;
    fn to_f32(self) -> f32 {
        self
    }
}
impl Weight for half::f16 {
    const KIND: WeightKind = WeightKind::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}
impl Weight for half::bf16 {
    const KIND: WeightKind = WeightKind::Bf16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// The activation [`Epilogue`] applies after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Identity,
    /// `v / (1 + e^(−v))`, as candle's f32 `silu`.
    Silu,
    /// `(erf(v / √2) + 1) · 0.5 · v`, as candle's f32 `gelu_erf`.
    GeluErf,
}

/// What [`linear_ep`] does to every output after the product, in this order: `+ bias[j]`,
/// the activation, `· gate[i, j]`, `residual[i, j] +`. Each step is the same f32 operation
/// as the separate candle op it replaces, except the activations, which are the vector ones
/// of [`super::vmath`]: SiLU through a vector `exp` within a few ulp of candle's libm one,
/// GELU within a few ulp of the exact value (candle's scalar erf form is up to 5e-4 off for
/// x in [−4, −3]). It is applied by the thread that computed the columns, while they are in
/// cache.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// (n)
    pub bias: Option<&'a [f32]>,
    pub act: Act,
    /// (m × n)
    pub gate: Option<&'a [f32]>,
    /// (m × n)
    pub residual: Option<&'a [f32]>,
}

impl<'a> Epilogue<'a> {
    /// Only the bias (or nothing).
    pub fn bias(bias: Option<&'a [f32]>) -> Self {
        Self {
            bias,
            act: Act::Identity,
            gate: None,
            residual: None,
        }
    }
}

/// `y (m × n) = x (m × k) · wᵀ + b`, with `w` (n × k) row-major and `b` (n) optional, all
/// arithmetic in f32.
///
/// Returns `None` when the kernel is not available on this CPU (see [`available`]); the caller
/// then uses its portable GEMM.
///
/// # Panics
/// If the slice lengths do not match the sizes.
pub fn linear<W: Weight>(
    x: &[f32],
    w: &[W],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    linear_ep(x, w, m, k, n, &Epilogue::bias(b))
}

/// [`linear`] with the whole [`Epilogue`] (bias, activation, gate, residual) applied in the
/// same parallel loop.
///
/// # Panics
/// If the slice lengths do not match the sizes.
pub fn linear_ep<W: Weight>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    ep: &Epilogue,
) -> Option<Vec<f32>> {
    kernel().map(|kern| linear_with(kern, x, w, m, k, n, ep))
}

/// [`linear_ep`] into `y` (m × n values, every one written): no allocation. With `parallel`
/// the columns are split between rayon's threads; without, the calling thread computes them
/// all (for products small enough that several run side by side: the attention's per-head
/// products). Returns `false` (and leaves `y` alone) when the kernel is not available here.
///
/// # Panics
/// If the slice lengths do not match the sizes.
#[allow(clippy::too_many_arguments)]
pub fn linear_ep_into<W: Weight>(
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    ep: &Epilogue,
    y: &mut [f32],
    parallel: bool,
) -> bool {
    let Some(kern) = kernel() else {
        return false;
    };
    assert_eq!(y.len(), m * n, "y is not m × n");
    // SAFETY: `y` holds m × n values
    unsafe { linear_raw(kern, x, w, m, k, n, ep, OutPtr(y.as_mut_ptr()), parallel) };
    true
}

/// `v` after the activation, the gate `g` and the residual `r` (bias already added), as
/// candle's separate ops: the scalar epilogue (the x86-64 and NEON kernels use the vector
/// one; the tests compare them).
#[cfg(any(test, not(any(target_arch = "x86_64", target_arch = "aarch64"))))]
#[inline(always)]
fn finish(v: f32, act: Act, g: Option<f32>, r: Option<f32>) -> f32 {
    let mut v = match act {
        Act::Identity => v,
        Act::Silu => v / (1.0 + (-v).exp()),
        Act::GeluErf => {
            (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * v
        }
    };
    if let Some(g) = g {
        v *= g;
    }
    if let Some(r) = r {
        // IEEE addition is commutative: the same bits as `r + v`
        v += r;
    }
    v
}

/// Applies the activation, gate and residual of `ep` to columns `n0..n1` of `y` (m × n).
///
/// # Safety
/// `y` points to m × n writable f32 that no other thread touches in columns `n0..n1`.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
unsafe fn epilogue_columns(
    ep: &Epilogue,
    kern: Kernel,
    y: OutPtr,
    m: usize,
    n: usize,
    n0: usize,
    n1: usize,
) {
    if ep.act == Act::Identity && ep.gate.is_none() && ep.residual.is_none() {
        return;
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = kern;
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    for i in 0..m {
        let at = i * n + n0;
        let (row, len) = (y.0.add(at), n1 - n0);
        let gate = ep.gate.map(|g| g[at..].as_ptr());
        let residual = ep.residual.map(|r| r[at..].as_ptr());
        let silu = ep.act == Act::Silu;
        // x86-64: SiLU through the vector `exp` (≈1 ulp from libm's), 16 or 8 lanes; GELU
        // through the 8-lane `gelu8` (a few ulp from the exact value) with either kernel: the
        // kernel's CPU features are there (`kern`; `detected` checks AVX2 and FMA for both)
        #[cfg(target_arch = "x86_64")]
        {
            use super::vmath::{avx2, avx512};
            match (ep.act, kern) {
                (Act::GeluErf, _) => avx2::gelu_gate_residual(row, len, gate, residual),
                (_, Kernel::Avx512) => avx512::silu_gate_residual(row, len, silu, gate, residual),
                (_, Kernel::Avx2) => avx2::silu_gate_residual(row, len, silu, gate, residual),
                (_, Kernel::Neon) => unreachable!("NEON is not an x86-64 kernel"),
            }
        }
        // AArch64: the 4-lane NEON functions (the same methods as x86-64's)
        #[cfg(target_arch = "aarch64")]
        {
            use super::vmath::neon;
            debug_assert_eq!(kern, Kernel::Neon);
            match ep.act {
                Act::GeluErf => neon::gelu_gate_residual(row, len, gate, residual),
                _ => neon::silu_gate_residual(row, len, silu, gate, residual),
            }
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    for i in 0..m {
        for j in n0..n1 {
            let p = y.0.add(i * n + j);
            let g = ep.gate.map(|g| g[i * n + j]);
            let r = ep.residual.map(|r| r[i * n + j]);
            *p = finish(*p, ep.act, g, r);
        }
    }
}

/// The product with `kern`, which must be [`detected`].
fn linear_with<W: Weight>(
    kern: Kernel,
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    ep: &Epilogue,
) -> Vec<f32> {
    // every element is written by `linear_raw`: no zeroing
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `y` has room for m × n values, all of which `linear_raw` writes
    unsafe {
        linear_raw(kern, x, w, m, k, n, ep, OutPtr(y.as_mut_ptr()), true);
        y.set_len(m * n);
    }
    y
}

/// The product with `kern` (which must be [`detected`]) into the m × n values at `out`,
/// with the columns split between rayon's threads when `parallel`.
///
/// # Safety
/// `out` points to m × n writable f32 that nothing else touches during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn linear_raw<W: Weight>(
    kern: Kernel,
    x: &[f32],
    w: &[W],
    m: usize,
    k: usize,
    n: usize,
    ep: &Epilogue,
    out: OutPtr,
    parallel: bool,
) {
    assert_eq!(x.len(), m * k, "x is not m × k");
    assert_eq!(w.len(), n * k, "w is not n × k");
    if let Some(b) = ep.bias {
        assert_eq!(b.len(), n, "bias is not n");
    }
    for (name, t) in [("gate", ep.gate), ("residual", ep.residual)] {
        if let Some(t) = t {
            assert_eq!(t.len(), m * n, "{name} is not m × n");
        }
    }
    if m == 0 || n == 0 {
        return;
    }
    let b = ep.bias;
    let chunk = |n0: usize, n1: usize| {
        // SAFETY: `kern`'s CPU features were detected, the sizes were checked above, and this
        // chunk writes only columns n0..n1 of `out`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match kern {
                Kernel::Avx512 => avx512::columns(x, w, b, m, k, n, n0, n1, out),
                Kernel::Avx2 => avx2::columns(x, w, b, m, k, n, n0, n1, out),
                Kernel::Neon => unreachable!("NEON is not an x86-64 kernel"),
            }
            epilogue_columns(ep, kern, out, m, n, n0, n1);
        };
        // SAFETY: as above (NEON is the only kernel `detected` on AArch64)
        #[cfg(target_arch = "aarch64")]
        unsafe {
            neon::columns(x, w, b, m, k, n, n0, n1, out);
            epilogue_columns(ep, kern, out, m, n, n0, n1);
        };
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let _ = (x, w, b, m, k, n0, n1, out);
            unreachable!("the CPU GEMM kernels run only on x86-64 and AArch64");
        }
    };
    if !parallel {
        chunk(0, n);
        return;
    }
    // Column chunks of whole register blocks; enough of them to balance the threads.
    let threads = rayon::current_num_threads().max(1);
    let nr = kern.block_cols();
    let blocks = n.div_ceil(nr);
    let per = blocks.div_ceil(threads * 4).max(1);
    let chunk_cols = per * nr;
    (0..n.div_ceil(chunk_cols)).into_par_iter().for_each(|ci| {
        let n0 = ci * chunk_cols;
        chunk(n0, (n0 + chunk_cols).min(n));
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{OutPtr, Weight, WeightKind, KC, MR, NR, PANEL};
    use std::arch::x86_64::*;

    /// 16 weights from `p` as f32 (`mask`ed lanes 0).
    #[inline(always)]
    unsafe fn wload<W: Weight>(mask: __mmask16, p: *const W) -> __m512 {
        match W::KIND {
            WeightKind::F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
            WeightKind::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
            WeightKind::Bf16 => {
                let h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p as *const i16));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
            }
        }
    }

    /// The dot products of rows `x[i0..i0+R]` with rows `w[j0..j0+C]`, written into `y`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn block<W: Weight, const R: usize, const C: usize>(
        x: *const f32,
        w: *const W,
        k: usize,
        y: *mut f32,
        ldy: usize,
        bias: Option<*const f32>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let full = k / 16 * 16;
        let mut kk = 0;
        // Per 16-wide slice of k: the R slices of x stay in registers and each weight slice
        // is loaded once and used R times (R·C accumulators + R + 1 registers of 32).
        while kk < full {
            let mut xv = [_mm512_setzero_ps(); R];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(x.add(i * k + kk));
            }
            for j in 0..C {
                let wv = wload(0xffff, w.add(j * k + kk));
                for i in 0..R {
                    acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
            kk += 16;
        }
        if kk < k {
            let mask: __mmask16 = ((1u32 << (k - kk)) - 1) as u16;
            let mut xv = [_mm512_setzero_ps(); R];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, x.add(i * k + kk));
            }
            for j in 0..C {
                let wv = wload(mask, w.add(j * k + kk));
                for i in 0..R {
                    acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (j, v) in a.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*v);
                if let Some(b) = bias {
                    s += *b.add(j);
                }
                *y.add(i * ldy + j) = s;
            }
        }
    }

    /// The 4 × 6 block of [`block`] with every accumulator a named local, so that all 24 stay
    /// in registers (the array form of the generic block spills some of them). `k` values of
    /// each row are multiplied, the rows `ld` apart; with `add` the sums are added to `y` (a
    /// later chunk of k, no bias) instead of stored.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_4x6<W: Weight>(
        x: *const f32,
        w: *const W,
        k: usize,
        ld: usize,
        y: *mut f32,
        ldy: usize,
        bias: Option<*const f32>,
        add: bool,
    ) {
        macro_rules! zero {
            ($($a:ident),*) => { $(let mut $a = _mm512_setzero_ps();)* };
        }
        zero!(a00, a01, a02, a03, a04, a05, a10, a11, a12, a13, a14, a15);
        zero!(a20, a21, a22, a23, a24, a25, a30, a31, a32, a33, a34, a35);
        let (x0, x1, x2, x3) = (x, x.add(ld), x.add(2 * ld), x.add(3 * ld));
        let (w0, w1, w2) = (w, w.add(ld), w.add(2 * ld));
        let (w3, w4, w5) = (w.add(3 * ld), w.add(4 * ld), w.add(5 * ld));
        // `$o` is the offset along k; the pointers are named here, not passed, so the macro
        // sees the bindings above.
        macro_rules! step {
            ($o:expr, $mask:expr) => {{
                let (o, mask) = ($o, $mask);
                let v0 = _mm512_maskz_loadu_ps(mask, x0.add(o));
                let v1 = _mm512_maskz_loadu_ps(mask, x1.add(o));
                let v2 = _mm512_maskz_loadu_ps(mask, x2.add(o));
                let v3 = _mm512_maskz_loadu_ps(mask, x3.add(o));
                macro_rules! col {
                    ($wp:expr, $c0:ident, $c1:ident, $c2:ident, $c3:ident) => {{
                        let wv = wload(mask, $wp.add(o));
                        $c0 = _mm512_fmadd_ps(v0, wv, $c0);
                        $c1 = _mm512_fmadd_ps(v1, wv, $c1);
                        $c2 = _mm512_fmadd_ps(v2, wv, $c2);
                        $c3 = _mm512_fmadd_ps(v3, wv, $c3);
                    }};
                }
                col!(w0, a00, a10, a20, a30);
                col!(w1, a01, a11, a21, a31);
                col!(w2, a02, a12, a22, a32);
                col!(w3, a03, a13, a23, a33);
                col!(w4, a04, a14, a24, a34);
                col!(w5, a05, a15, a25, a35);
            }};
        }
        let full = k / 16 * 16;
        let mut kk = 0;
        while kk < full {
            step!(kk, 0xffff);
            kk += 16;
        }
        if kk < k {
            let mask: __mmask16 = ((1u32 << (k - kk)) - 1) as u16;
            step!(kk, mask);
        }
        // the 24 sums four at a time: columns 0..4 of each row, then columns 4 and 5 of two
        // rows
        let b4 = bias.map_or(_mm_setzero_ps(), |b| _mm_loadu_ps(b));
        let b2 = bias.map_or(_mm_setzero_ps(), |b| {
            let p = _mm_castpd_ps(_mm_load_sd(b.add(4) as *const f64));
            _mm_movelh_ps(p, p)
        });
        for (i, [c0, c1, c2, c3]) in [
            [a00, a01, a02, a03],
            [a10, a11, a12, a13],
            [a20, a21, a22, a23],
            [a30, a31, a32, a33],
        ]
        .into_iter()
        .enumerate()
        {
            let at = y.add(i * ldy);
            let base = if add { _mm_loadu_ps(at) } else { b4 };
            _mm_storeu_ps(at, _mm_add_ps(base, sum4(c0, c1, c2, c3)));
        }
        for (i, [c0, c1, c2, c3]) in [[a04, a05, a14, a15], [a24, a25, a34, a35]]
            .into_iter()
            .enumerate()
        {
            let (r0, r1) = (y.add(2 * i * ldy + 4), y.add((2 * i + 1) * ldy + 4));
            let base = if add {
                let lo = _mm_castpd_ps(_mm_load_sd(r0 as *const f64));
                let hi = _mm_castpd_ps(_mm_load_sd(r1 as *const f64));
                _mm_movelh_ps(lo, hi)
            } else {
                b2
            };
            let s = _mm_add_ps(base, sum4(c0, c1, c2, c3));
            _mm_store_sd(r0 as *mut f64, _mm_castps_pd(s));
            _mm_store_sd(r1 as *mut f64, _mm_castps_pd(_mm_movehl_ps(s, s)));
        }
    }

    /// The sums of the 16 lanes of `v0`..`v3` as lanes 0..4, in 13 instructions (four
    /// `reduce_add`s take ~32): pairwise within 128-bit lanes, then across them.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sum4(v0: __m512, v1: __m512, v2: __m512, v3: __m512) -> __m128 {
        // per 128-bit lane: [v0₀+v0₂, v1₀+v1₂, v0₁+v0₃, v1₁+v1₃], the same for v2, v3
        let t01 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
        let t23 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
        // per 128-bit lane: [Σv0, Σv1, Σv2, Σv3] over that lane's four values
        let u = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(t01, t23),
            _mm512_shuffle_ps::<0b11_10_11_10>(t01, t23),
        );
        let h = _mm256_add_ps(
            _mm512_castps512_ps256(u),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(u))),
        );
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    macro_rules! dispatch_c {
        ($r:literal, $c:expr, $($args:expr),*) => {
            match $c {
                1 => block::<W, $r, 1>($($args),*),
                2 => block::<W, $r, 2>($($args),*),
                3 => block::<W, $r, 3>($($args),*),
                4 => block::<W, $r, 4>($($args),*),
                5 => block::<W, $r, 5>($($args),*),
                _ => block::<W, $r, NR>($($args),*),
            }
        };
    }

    /// Columns `n0..n1` of `y (m × n)` for all rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns<W: Weight>(
        x: &[f32],
        w: &[W],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        n0: usize,
        n1: usize,
        out: OutPtr,
    ) {
        // row panels of `x` that stay in cache while the chunk's weights pass over them
        for p0 in (0..m).step_by(PANEL) {
            let p1 = (p0 + PANEL).min(m);
            let mut j0 = n0;
            while j0 < n1 {
                let c = (n1 - j0).min(NR);
                let wp = w.as_ptr().add(j0 * k);
                let bp = b.map(|b| b.as_ptr().add(j0));
                // whole 4 × 6 blocks in chunks of KC along k, so that the block's weight rows
                // stay in L1 while the panel's rows pass over them
                let mut i0 = p0;
                if c == NR {
                    let full = p0 + (p1 - p0) / MR * MR;
                    let mut k0 = 0;
                    while k0 < k {
                        let kc = (k - k0).min(KC);
                        let mut i = p0;
                        while i < full {
                            let xp = x.as_ptr().add(i * k + k0);
                            let yp = out.0.add(i * n + j0);
                            let bias = if k0 == 0 { bp } else { None };
                            block_4x6(xp, wp.add(k0), kc, k, yp, n, bias, k0 > 0);
                            i += MR;
                        }
                        k0 += kc;
                    }
                    i0 = full;
                }
                while i0 < p1 {
                    let r = (p1 - i0).min(MR);
                    let xp = x.as_ptr().add(i0 * k);
                    let yp = out.0.add(i0 * n + j0);
                    match r {
                        1 => dispatch_c!(1, c, xp, wp, k, yp, n, bp),
                        2 => dispatch_c!(2, c, xp, wp, k, yp, n, bp),
                        3 => dispatch_c!(3, c, xp, wp, k, yp, n, bp),
                        _ => dispatch_c!(4, c, xp, wp, k, yp, n, bp),
                    }
                    i0 += r;
                }
                j0 += c;
            }
        }
    }
}

/// The AVX2 + FMA + F16C version of [`avx512`] for x86-64 CPUs without AVX-512 (16 registers
/// of 8 lanes): 3 rows of `x` × 4 rows of `W` per block, the k tail (k % 8) in scalar code.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{OutPtr, Weight, WeightKind, MR2, NR2, PANEL};
    use std::arch::x86_64::*;

    /// Memory to prefetch while a block's row blocks run: `bytes` from `at` (nothing if 0).
    #[derive(Clone, Copy)]
    struct Ahead {
        at: *const u8,
        bytes: usize,
    }

    /// Prefetches part `i` of `parts` of `ahead`'s cache lines into L1. A step's weights (up to
    /// ~1 GB) come from memory, and a block's rows (4 rows of 3–12 KiB) are too short a stream
    /// for the hardware prefetchers: without it, each block's first row block waited on memory
    /// (a steady fp32 step ~5 % slower on the EPYC).
    ///
    /// # Safety
    /// `ahead` must be within one allocation (prefetches do not fault, but the pointer
    /// arithmetic must stay in bounds).
    #[inline]
    unsafe fn prefetch_part(ahead: Ahead, i: usize, parts: usize) {
        const LINE: usize = 64;
        let lines = ahead.bytes.div_ceil(LINE);
        for l in lines * i / parts..lines * (i + 1) / parts {
            _mm_prefetch::<_MM_HINT_T0>(ahead.at.add(l * LINE).cast());
        }
    }

    /// 8 weights from `p` as f32.
    #[inline(always)]
    unsafe fn wload<W: Weight>(p: *const W) -> __m256 {
        match W::KIND {
            WeightKind::F32 => _mm256_loadu_ps(p as *const f32),
            WeightKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            WeightKind::Bf16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
        }
    }

    /// The sum of the 8 lanes of `v`.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// The dot products of rows `x[i0..i0+R]` with rows `w[j0..j0+C]`, written into `y`
    /// (R · C ≤ 12 accumulators, R + 1 more registers).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<W: Weight, const R: usize, const C: usize>(
        x: *const f32,
        w: *const W,
        k: usize,
        y: *mut f32,
        ldy: usize,
        bias: Option<*const f32>,
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / 8 * 8;
        let mut kk = 0;
        while kk < full {
            let mut xv = [_mm256_setzero_ps(); R];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(x.add(i * k + kk));
            }
            for j in 0..C {
                let wv = wload(w.add(j * k + kk));
                for i in 0..R {
                    acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
            kk += 8;
        }
        for i in 0..R {
            for j in 0..C {
                let mut s = hsum(acc[i][j]);
                for t in full..k {
                    s += *x.add(i * k + t) * (*w.add(j * k + t)).to_f32();
                }
                if let Some(b) = bias {
                    s += *b.add(j);
                }
                *y.add(i * ldy + j) = s;
            }
        }
    }

    /// Columns `n0..n1` of `y (m × n)` for all rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns<W: Weight>(
        x: &[f32],
        w: &[W],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        n0: usize,
        n1: usize,
        out: OutPtr,
    ) {
        // f16 weights: each block of NR2 weight rows is converted to f32 once per panel into
        // `wide` and the blocks read that (converting per row block of `x` had cost more than
        // the products: on Zen 2 F16C's conversions compete with the FMAs; criterion, 28 and
        // 84 rows: 1.5–2× the f32 time before, 0.9–1.1× after). bf16's conversion (a shuffle
        // and a shift) is cheap: widened only while the block stays in L1 (k ≤ 1024: 17–22 %
        // faster; at k = 3072 14 % slower). The products are the same, bit for bit.
        let widened = match W::KIND {
            WeightKind::F32 => false,
            WeightKind::F16 => true,
            WeightKind::Bf16 => k <= 1024,
        };
        if widened {
            // the thread's buffer (grown once, then reused: no allocation per call); written
            // by `widen` before the blocks read it, so only its capacity is used
            WIDE.with(|wide| {
                let mut wide = wide.borrow_mut();
                wide.clear();
                wide.reserve(NR2 * k);
                columns_from::<W>(x, w, b, m, k, n, n0, n1, out, wide.as_mut_ptr());
            });
        } else {
            columns_from::<W>(x, w, b, m, k, n, n0, n1, out, std::ptr::null_mut());
        }
    }

    thread_local! {
        /// [`columns`]' buffer of widened f16/bf16 weight rows, per thread.
        static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// [`columns`] with `wide` (room for NR2 × k f32; null for f32 weights, and for bf16
    /// weights with k > 1024) the buffer of widened weight rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns_from<W: Weight>(
        x: &[f32],
        w: &[W],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        n0: usize,
        n1: usize,
        out: OutPtr,
        wide: *mut f32,
    ) {
        let widened = !wide.is_null();
        for p0 in (0..m).step_by(PANEL) {
            let p1 = (p0 + PANEL).min(m);
            let mut j0 = n0;
            while j0 < n1 {
                let c = (n1 - j0).min(NR2);
                let bp = b.map(|b| b.as_ptr().add(j0));
                // the next block's weight rows (they follow these), fetched while this block's
                // row blocks run
                let next = Ahead {
                    at: w.as_ptr().add((j0 + c) * k).cast(),
                    bytes: (n1 - j0 - c).min(NR2) * k * std::mem::size_of::<W>(),
                };
                if widened {
                    widen(w.as_ptr().add(j0 * k), c * k, wide);
                    row_blocks::<f32>(x, wide, k, n, p0, p1, c, j0, bp, out, next);
                } else {
                    let wp = w.as_ptr().add(j0 * k);
                    row_blocks::<W>(x, wp, k, n, p0, p1, c, j0, bp, out, next);
                }
                j0 += c;
            }
        }
    }

    /// `len` weights from `w` as f32 into `to`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen<W: Weight>(w: *const W, len: usize, to: *mut f32) {
        let full = len / 8 * 8;
        let mut i = 0;
        while i < full {
            _mm256_storeu_ps(to.add(i), wload(w.add(i)));
            i += 8;
        }
        for i in full..len {
            *to.add(i) = (*w.add(i)).to_f32();
        }
    }

    /// Rows `p0..p1` of `x` against weight rows `j0..j0 + c` (at `wp`, c ≤ NR2) into `out`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_blocks<W: Weight>(
        x: &[f32],
        wp: *const W,
        k: usize,
        n: usize,
        p0: usize,
        p1: usize,
        c: usize,
        j0: usize,
        bp: Option<*const f32>,
        out: OutPtr,
        ahead: Ahead,
    ) {
        macro_rules! by_c {
            ($r:literal, $c:expr, $($args:expr),*) => {
                match $c {
                    1 => block::<W, $r, 1>($($args),*),
                    2 => block::<W, $r, 2>($($args),*),
                    3 => block::<W, $r, 3>($($args),*),
                    _ => block::<W, $r, NR2>($($args),*),
                }
            };
        }
        let parts = (p1 - p0).div_ceil(MR2);
        let mut i0 = p0;
        while i0 < p1 {
            let r = (p1 - i0).min(MR2);
            // a share of the next block's weights ahead of each row block
            prefetch_part(ahead, (i0 - p0) / MR2, parts);
            let xp = x.as_ptr().add(i0 * k);
            let yp = out.0.add(i0 * n + j0);
            match r {
                1 => by_c!(1, c, xp, wp, k, yp, n, bp),
                2 => by_c!(2, c, xp, wp, k, yp, n, bp),
                _ => by_c!(3, c, xp, wp, k, yp, n, bp),
            }
            i0 += r;
        }
    }
}

/// The NEON kernel (AArch64: Apple Silicon, Arm servers): the AVX2 kernel's design with blocks of
/// 4 rows of `x` × 4 weight rows, 16 accumulators of 4 lanes. f16 and bf16 weights are widened
/// (exactly) block by block into an f32 buffer that the block's row blocks read, so the
/// products are those of f32 weights of the same values, bit for bit. No prefetching: stable
/// Rust has no AArch64 prefetch intrinsic, and these CPUs' prefetchers follow the row streams.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{OutPtr, Weight, WeightKind, MR3, NR3, PANEL};
    use half::slice::HalfFloatSliceExt;
    use std::arch::aarch64::*;

    /// The dot products of rows `x[i0..i0+R]` with rows `w[j0..j0+C]`, written into `y`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn block<const R: usize, const C: usize>(
        x: *const f32,
        w: *const f32,
        k: usize,
        y: *mut f32,
        ldy: usize,
        bias: Option<*const f32>,
    ) {
        let mut acc = [[vdupq_n_f32(0.0); C]; R];
        let full = k / 4 * 4;
        let mut kk = 0;
        while kk < full {
            let mut xv = [vdupq_n_f32(0.0); R];
            for (i, v) in xv.iter_mut().enumerate() {
                *v = vld1q_f32(x.add(i * k + kk));
            }
            for j in 0..C {
                let wv = vld1q_f32(w.add(j * k + kk));
                for i in 0..R {
                    acc[i][j] = vfmaq_f32(acc[i][j], xv[i], wv);
                }
            }
            kk += 4;
        }
        for i in 0..R {
            for j in 0..C {
                let mut s = vaddvq_f32(acc[i][j]);
                for t in full..k {
                    s += *x.add(i * k + t) * *w.add(j * k + t);
                }
                if let Some(b) = bias {
                    s += *b.add(j);
                }
                *y.add(i * ldy + j) = s;
            }
        }
    }

    thread_local! {
        /// [`columns`]' buffer of widened f16/bf16 weight rows, per thread.
        static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Columns `n0..n1` of `y (m × n)` for all rows.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn columns<W: Weight>(
        x: &[f32],
        w: &[W],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        n0: usize,
        n1: usize,
        out: OutPtr,
    ) {
        if W::KIND == WeightKind::F32 {
            return columns_from(x, w, b, m, k, n, n0, n1, out, None);
        }
        // the thread's buffer (grown once, then reused: no allocation per call)
        WIDE.with(|wide| {
            let mut wide = wide.borrow_mut();
            if wide.len() < NR3 * k {
                wide.resize(NR3 * k, 0.0);
            }
            columns_from(x, w, b, m, k, n, n0, n1, out, Some(&mut wide[..NR3 * k]));
        });
    }

    /// [`columns`] with `wide` (room for NR3 × k values; `None` for f32 weights, which are read
    /// in place) the buffer into which each block of f16/bf16 weight rows is widened.
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns_from<W: Weight>(
        x: &[f32],
        w: &[W],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
        n0: usize,
        n1: usize,
        out: OutPtr,
        mut wide: Option<&mut [f32]>,
    ) {
        for p0 in (0..m).step_by(PANEL) {
            let p1 = (p0 + PANEL).min(m);
            let mut j0 = n0;
            while j0 < n1 {
                let c = (n1 - j0).min(NR3);
                let bp = b.map(|b| b.as_ptr().add(j0));
                let rows = &w[j0 * k..(j0 + c) * k];
                let wp: *const f32 = match wide.as_deref_mut() {
                    // f32 weights (`columns`)
                    None => rows.as_ptr().cast(),
                    Some(buf) => {
                        let to = &mut buf[..c * k];
                        widen(rows, to);
                        to.as_ptr()
                    }
                };
                row_blocks(x, wp, k, n, p0, p1, c, j0, bp, out);
                j0 += c;
            }
        }
    }

    /// `from` as f32 into `to` (as long), exactly; f16 through the `half` crate's slice
    /// conversion (the CPU's FP16 conversions where it has them).
    fn widen<W: Weight>(from: &[W], to: &mut [f32]) {
        // SAFETY (both casts): `W::KIND` says what `W` is
        match W::KIND {
            WeightKind::F16 => {
                unsafe { std::slice::from_raw_parts(from.as_ptr().cast::<half::f16>(), from.len()) }
                    .convert_to_f32_slice(to)
            }
            WeightKind::Bf16 => unsafe {
                std::slice::from_raw_parts(from.as_ptr().cast::<half::bf16>(), from.len())
            }
            .convert_to_f32_slice(to),
            WeightKind::F32 => {
                for (t, &v) in to.iter_mut().zip(from) {
                    *t = v.to_f32();
                }
            }
        }
    }

    /// Rows `p0..p1` of `x` against the f32 weight rows `j0..j0 + c` at `wp` (c ≤ NR3).
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_blocks(
        x: &[f32],
        wp: *const f32,
        k: usize,
        n: usize,
        p0: usize,
        p1: usize,
        c: usize,
        j0: usize,
        bp: Option<*const f32>,
        out: OutPtr,
    ) {
        macro_rules! by_c {
            ($r:literal, $c:expr, $($args:expr),*) => {
                match $c {
                    1 => block::<$r, 1>($($args),*),
                    2 => block::<$r, 2>($($args),*),
                    3 => block::<$r, 3>($($args),*),
                    _ => block::<$r, NR3>($($args),*),
                }
            };
        }
        let mut i0 = p0;
        while i0 < p1 {
            let r = (p1 - i0).min(MR3);
            let xp = x.as_ptr().add(i0 * k);
            let yp = out.0.add(i0 * n + j0);
            match r {
                1 => by_c!(1, c, xp, wp, k, yp, n, bp),
                2 => by_c!(2, c, xp, wp, k, yp, n, bp),
                3 => by_c!(3, c, xp, wp, k, yp, n, bp),
                _ => by_c!(4, c, xp, wp, k, yp, n, bp),
            }
            i0 += r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels this CPU can run (the tests run each).
    fn kernels_here() -> Vec<Kernel> {
        let k: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2, Kernel::Neon]
            .into_iter()
            .filter(|&k| detected(k))
            .collect();
        if k.is_empty() {
            eprintln!("no AVX-512, AVX2 or NEON on this CPU: the kernels are not used here");
        }
        k
    }

    /// The f64 result and Σ|x·w| (for the rounding bound) of every output.
    fn reference(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<(f64, f64)> {
        let mut y = vec![(0f64, 0f64); m * n];
        for i in 0..m {
            for j in 0..n {
                let bj = b.map(|b| b[j] as f64).unwrap_or(0.0);
                let (mut s, mut a) = (bj, bj.abs());
                for kk in 0..k {
                    let p = x[i * k + kk] as f64 * w[j * k + kk] as f64;
                    s += p;
                    a += p.abs();
                }
                y[i * n + j] = (s, a);
            }
        }
        y
    }

    fn rnd(len: usize, seed: &mut u64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_f64_reference_on_every_tail_shape() {
        for kern in kernels_here() {
            tail_shapes(kern);
        }
    }

    fn tail_shapes(kern: Kernel) {
        let lanes = match kern {
            Kernel::Avx512 => 16,
            Kernel::Avx2 => 8,
            Kernel::Neon => 4,
        };
        let mut seed = 7u64;
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 15, 5),
            (4, 16, 6),
            (5, 17, 7),
            (28, 768, 130),
            (29, 438, 13),
            (84, 48, 97),
            (7, 3072, 11),
            (18, 5, 72),
            (18, 72, 205),
            (18, 16, 144),
            (6, 72, 16),
            // several panels of rows
            (230, 72, 30),
            // bf16 weights widened once per block (k ≤ 1024) or read directly, with k tails
            (5, 1021, 9),
            (4, 1030, 6),
        ] {
            let x = rnd(m * k, &mut seed);
            let w = rnd(n * k, &mut seed);
            let b = rnd(n, &mut seed);
            // f16/bf16 weights: the reference takes the rounded weights, exactly as f32
            let w16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let wb16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let w16_f32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let wb16_f32: Vec<f32> = wb16.iter().map(|v| v.to_f32()).collect();
            for bias in [None, Some(b.as_slice())] {
                for (kind, y, wref) in [
                    (
                        "f32",
                        linear_with(kern, &x, &w, m, k, n, &Epilogue::bias(bias)),
                        &w,
                    ),
                    (
                        "f16",
                        linear_with(kern, &x, &w16, m, k, n, &Epilogue::bias(bias)),
                        &w16_f32,
                    ),
                    (
                        "bf16",
                        linear_with(kern, &x, &wb16, m, k, n, &Epilogue::bias(bias)),
                        &wb16_f32,
                    ),
                ] {
                    // the f16/bf16 products are those of f32 weights of the same values, bit
                    // for bit (whether the kernel widens a block first or each load)
                    let exact = linear_with(kern, &x, wref, m, k, n, &Epilogue::bias(bias));
                    assert!(
                        y.iter()
                            .zip(&exact)
                            .all(|(a, e)| a.to_bits() == e.to_bits()),
                        "{kern:?} {kind} m {m} k {k} n {n}: not the f32 product's bits"
                    );
                    let r = reference(&x, wref, bias, m, k, n);
                    for (i, (a, (e, abs))) in y.iter().zip(&r).enumerate() {
                        // lanes summed along k, a reduction of the lanes, the tail and the bias
                        let tol = (k / lanes + 20) as f64 * f32::EPSILON as f64 * abs;
                        assert!(
                            (*a as f64 - e).abs() <= tol,
                            "{kern:?} {kind} m {m} k {k} n {n} bias {} at {i}: {a} vs {e}",
                            bias.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn epilogue_equals_the_separate_ops_bitwise() {
        for kern in kernels_here() {
            epilogue(kern);
        }
    }

    fn epilogue(kern: Kernel) {
        let mut seed = 11u64;
        let (m, k, n) = (5, 40, 29);
        let x = rnd(m * k, &mut seed);
        let w = rnd(n * k, &mut seed);
        let b = rnd(n, &mut seed);
        let g = rnd(m * n, &mut seed);
        let r = rnd(m * n, &mut seed);
        let plain = linear_with(kern, &x, &w, m, k, n, &Epilogue::bias(Some(&b)));
        type ActFn = fn(f32) -> f32;
        let acts: [(Act, ActFn); 3] = [
            (Act::Identity, |v| v),
            (Act::Silu, |v| v / (1.0 + (-v).exp())),
            // the exact GELU (the vector one is closer to it than the scalar erf form)
            (Act::GeluErf, |v| {
                let x = v as f64;
                (0.5 * x * candle_core::cpu::erf::erfc_f64(-x * std::f64::consts::FRAC_1_SQRT_2))
                    as f32
            }),
        ];
        for (act, f) in acts {
            for gate in [None, Some(g.as_slice())] {
                for residual in [None, Some(r.as_slice())] {
                    let ep = Epilogue {
                        bias: Some(&b),
                        act,
                        gate,
                        residual,
                    };
                    let y = linear_with(kern, &x, &w, m, k, n, &ep);
                    for (i, (&got, &p)) in y.iter().zip(&plain).enumerate() {
                        let mut e = f(p);
                        if let Some(g) = gate {
                            e *= g[i];
                        }
                        if let Some(r) = residual {
                            e += r[i];
                        }
                        if act != Act::Identity {
                            // the vector SiLU and GELU (every kernel): a few ulp of the scaled
                            // terms
                            let scale = f(p).abs() * gate.map_or(1.0, |g| g[i].abs())
                                + residual.map_or(0.0, |r| r[i].abs());
                            assert!(
                                (got - e).abs() <= 8.0 * f32::EPSILON * scale,
                                "{act:?} at {i}: {got} vs {e}"
                            );
                        } else {
                            assert_eq!(got.to_bits(), e.to_bits(), "{act:?} at {i}");
                        }
                    }
                }
            }
        }
        // the activations are candle's
        let t = candle_core::Tensor::new(&plain[..], &candle_core::Device::Cpu).unwrap();
        let silu: Vec<f32> = t.silu().unwrap().to_vec1().unwrap();
        let gelu: Vec<f32> = t.gelu_erf().unwrap().to_vec1().unwrap();
        for (i, &p) in plain.iter().enumerate() {
            assert_eq!(
                silu[i].to_bits(),
                finish(p, Act::Silu, None, None).to_bits()
            );
            assert_eq!(
                gelu[i].to_bits(),
                finish(p, Act::GeluErf, None, None).to_bits()
            );
        }
    }

    #[test]
    fn empty_sizes_give_empty_or_bias_free_output() {
        for kern in kernels_here() {
            let empty = Epilogue::bias(None);
            assert!(linear_with::<f32>(kern, &[], &[], 0, 0, 0, &empty).is_empty());
            assert_eq!(
                linear_with::<f32>(kern, &[], &[], 2, 0, 3, &empty),
                vec![0.0; 6]
            );
        }
    }
}
