//! Fused Metal kernels of the Mamba layer (feature `metal`), the Metal counterpart of
//! `cuda_scan` (feature `cuda`): the causal depthwise convolution with SiLU in one launch, and
//! softplus(Δ) + selective scan + D skip + SiLU(z) gate in another (`metal_scan.metal`, compiled
//! from source at run time with fast math off). Storage dtypes f32, f16, bf16; the arithmetic
//! and the scan state are f32.
//!
//! The kernels are only used after a **self-check**: the first time a (device, dtype, d_state)
//! is seen, a small deterministic random Mamba layer ([`check_layer`]) runs through both the
//! portable path and the fused Metal path, and the outputs must agree within [`tolerance`]
//! ([`compare`]). If they disagree, or the library fails to compile or launch, one warning goes
//! to stderr and that combination keeps the portable path for the rest of the process. The
//! environment variable `DANCEBA_METAL_SCAN=0` turns the fused kernels off.
//!
//! The host-side logic (shape and argument checks, the comparison, the self-check harness) is
//! compiled on every platform and unit-tested on the CPU; the Metal launch code only with the
//! `metal` feature.
#![cfg_attr(not(feature = "metal"), allow(dead_code))]

use std::collections::HashMap;

use candle_core::{bail, DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::mamba::Mamba;
use super::random::uniform_tensor;
use crate::arch::MambaArch;

/// States per SIMD lane that the scan kernel keeps in registers (`MAX_STATES_PER_LANE` in
/// `metal_scan.metal`).
pub const MAX_STATES_PER_LANE: usize = 16;

/// The largest `d_state` the scan kernel takes with 32-wide SIMD groups (Apple GPUs). A device
/// with narrower SIMD groups takes less; the launch checks the real width.
pub const MAX_D_STATE: usize = 32 * MAX_STATES_PER_LANE;

/// Whether the fused kernels can run a layer with this `d_state` in this dtype (on a device
/// with 32-wide SIMD groups).
pub fn supports(d_state: usize, dtype: DType) -> bool {
    (1..=MAX_D_STATE).contains(&d_state) && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// Every index the kernels compute is a 32-bit `uint`: each buffer must have fewer elements.
fn check_u32(elems: usize, what: &str) -> Result<u32> {
    u32::try_from(elems).map_err(|_| {
        candle_core::Error::Msg(format!("fused Metal Mamba: {what} = {elems} exceeds u32"))
    })
}

/// Sizes of one convolution launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvDims {
    pub batch: usize,
    pub len: usize,
    pub d: usize,
    pub k: usize,
    pub stride: usize,
}

impl ConvDims {
    /// Checks the sizes of a convolution over the first `d` columns of `xz` (`xz_dims` = (B, L,
    /// S)) with a (d, K) kernel of `w_elems` values and `bias_elems` biases.
    pub fn new(xz_dims: &[usize], d: usize, w_elems: usize, bias_elems: usize) -> Result<Self> {
        let &[batch, len, stride] = xz_dims else {
            bail!("fused Metal Mamba: in_proj output must be (B, L, S), got {xz_dims:?}");
        };
        if d == 0 || d > stride {
            bail!("fused Metal Mamba: {d} channels do not fit rows of {stride}");
        }
        if w_elems == 0 || !w_elems.is_multiple_of(d) {
            bail!("fused Metal Mamba: conv weight has {w_elems} values, not (d = {d}, K)");
        }
        if bias_elems != d {
            bail!("fused Metal Mamba: conv bias has {bias_elems} values, expected {d}");
        }
        if batch * len == 0 {
            bail!("fused Metal Mamba: empty input {xz_dims:?}");
        }
        let dims = Self {
            batch,
            len,
            d,
            k: w_elems / d,
            stride,
        };
        dims.params()?;
        Ok(dims)
    }

    /// The kernel's parameter block (checks that every index fits a `uint`).
    pub fn params(&self) -> Result<ConvParams> {
        check_u32(self.batch * self.len * self.stride, "in_proj output size")?;
        check_u32(self.d * self.k, "conv weight size")?;
        Ok(ConvParams {
            batch: check_u32(self.batch, "batch")?,
            len: check_u32(self.len, "len")?,
            d: check_u32(self.d, "d_inner")?,
            k: check_u32(self.k, "d_conv")?,
            xz_stride: check_u32(self.stride, "in_proj width")?,
        })
    }

    pub fn out_elems(&self) -> usize {
        self.batch * self.len * self.d
    }
}

/// `ConvParams` of `metal_scan.metal`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvParams {
    pub batch: u32,
    pub len: u32,
    pub d: u32,
    pub k: u32,
    pub xz_stride: u32,
}

/// `ScanParams` of `metal_scan.metal`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScanParams {
    pub bc_stride: u32,
    pub b_off: u32,
    pub c_off: u32,
    pub z_stride: u32,
    pub z_off: u32,
    pub batch: u32,
    pub len: u32,
    pub d: u32,
    pub n: u32,
}

/// Inputs of [`selective_scan`] besides `u` (the same layout as the CUDA kernels').
pub struct ScanArgs<'a> {
    /// Δ before its bias and the softplus: (B, L, d).
    pub delta_pre: &'a Tensor,
    /// (d).
    pub delta_bias: &'a Tensor,
    /// A = −exp(A_log): (d, n).
    pub a: &'a Tensor,
    /// The x_proj output (B, L, S): B at columns `b_offset..+n`, C at `c_offset..+n`.
    pub bc: &'a Tensor,
    pub b_offset: usize,
    pub c_offset: usize,
    /// The D skip: (d).
    pub d_skip: &'a Tensor,
    /// The in_proj output (B, L, S'): z at columns `z_offset..+d`.
    pub z: &'a Tensor,
    pub z_offset: usize,
}

/// Sizes of one scan launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScanDims {
    pub batch: usize,
    pub len: usize,
    pub d: usize,
    pub n: usize,
    pub bc_stride: usize,
    pub z_stride: usize,
    pub b_offset: usize,
    pub c_offset: usize,
    pub z_offset: usize,
}

impl ScanDims {
    /// Checks the dtypes and shapes of a scan of `u` (B, L, d) with `args` (any device).
    pub fn new(u: &Tensor, args: &ScanArgs) -> Result<Self> {
        let (batch, len, d) = u.dims3()?;
        let dt = u.dtype();
        if !matches!(dt, DType::F32 | DType::F16 | DType::BF16) {
            bail!("the fused Metal Mamba kernels take f32, f16 or bf16, not {dt:?}");
        }
        if batch * len * d == 0 {
            bail!("fused Metal Mamba: empty input {:?}", u.dims());
        }
        let n = args.a.elem_count() / d;
        if n == 0 {
            bail!("fused Metal Mamba: A has no states");
        }
        check(args.a, dt, d * n, "A")?;
        check(args.delta_pre, dt, batch * len * d, "delta")?;
        check(args.delta_bias, dt, d, "delta bias")?;
        check(args.d_skip, dt, d, "D")?;
        let (b2, l2, bc_stride) = args.bc.dims3()?;
        let (b3, l3, z_stride) = args.z.dims3()?;
        if (b2, l2) != (batch, len) || (b3, l3) != (batch, len) {
            bail!(
                "fused Metal Mamba: x_proj {:?} / in_proj {:?} outputs do not match u {:?}",
                args.bc.dims(),
                args.z.dims(),
                u.dims()
            );
        }
        check(args.bc, dt, batch * len * bc_stride, "x_proj output")?;
        check(args.z, dt, batch * len * z_stride, "in_proj output")?;
        let dims = Self {
            batch,
            len,
            d,
            n,
            bc_stride,
            z_stride,
            b_offset: args.b_offset,
            c_offset: args.c_offset,
            z_offset: args.z_offset,
        };
        dims.params()?;
        Ok(dims)
    }

    /// The kernel's parameter block: checks that the B/C/z columns lie inside their rows and
    /// that every index fits a `uint`.
    pub fn params(&self) -> Result<ScanParams> {
        let fits =
            |off: usize, w: usize, stride: usize| off.checked_add(w).is_some_and(|e| e <= stride);
        if !fits(self.b_offset, self.n, self.bc_stride)
            || !fits(self.c_offset, self.n, self.bc_stride)
        {
            bail!(
                "fused Metal Mamba: B/C columns ({}, {}, +{}) exceed the x_proj width {}",
                self.b_offset,
                self.c_offset,
                self.n,
                self.bc_stride
            );
        }
        if !fits(self.z_offset, self.d, self.z_stride) {
            bail!(
                "fused Metal Mamba: z columns ({}, +{}) exceed the in_proj width {}",
                self.z_offset,
                self.d,
                self.z_stride
            );
        }
        let rows = self.batch * self.len;
        check_u32(rows * self.bc_stride, "x_proj output size")?;
        check_u32(rows * self.z_stride, "in_proj output size")?;
        check_u32(rows * self.d, "batch·len·d_inner")?;
        check_u32(self.d * self.n, "A size")?;
        Ok(ScanParams {
            bc_stride: check_u32(self.bc_stride, "x_proj width")?,
            b_off: check_u32(self.b_offset, "B offset")?,
            c_off: check_u32(self.c_offset, "C offset")?,
            z_stride: check_u32(self.z_stride, "in_proj width")?,
            z_off: check_u32(self.z_offset, "z offset")?,
            batch: check_u32(self.batch, "batch")?,
            len: check_u32(self.len, "len")?,
            d: check_u32(self.d, "d_inner")?,
            n: check_u32(self.n, "d_state")?,
        })
    }

    pub fn out_elems(&self) -> usize {
        self.batch * self.len * self.d
    }
}

/// Checks that `t` is of `dtype` with `elems` elements.
fn check(t: &Tensor, dtype: DType, elems: usize, what: &str) -> Result<()> {
    if t.dtype() != dtype {
        bail!(
            "fused Metal Mamba: {what} is {:?}, expected {dtype:?}",
            t.dtype()
        );
    }
    if t.elem_count() != elems {
        bail!(
            "fused Metal Mamba: {what} has shape {:?}, expected {elems} elements",
            t.dims()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Self-check

/// Largest accepted `max|fused − portable| / max|portable|` of the self-check, per dtype.
///
/// * f32 (2e-3): both paths compute in f32 and differ only by summation order, by the
///   `exp`/`log` implementations (candle's Metal kernels use fast math, the fused kernels precise
///   math) and the round-off these leave through the recurrence and `out_proj`. The CPU fused
///   kernels, a correct second implementation, land at ≈ 2e-7 (tests: < tolerance/50); 2e-3
///   leaves room for fast-math `exp`. Logic errors are far above: the tests' mutant layers (one
///   inner channel of 72 off, the scan or skip term dropped, the softplus threshold branch
///   broken, half the states not decaying, the output a time step late, a uniform 1 % error)
///   give ≥ 1e-2, most ≥ 0.2.
/// * f16 (4e-2) / bf16 (0.12): the portable path rounds every intermediate (conv taps, Δ, each
///   state update, C·h) to the storage type, the fused kernels keep them in f32. The tests
///   measure the portable f16/bf16 layer against its f32 twin (same rounded weights) on the
///   CPU: at most 1.0e-2 / 3.6e-2 for d_state ≤ 256 (3.5e-3 / 2.4e-2 at the official 128),
///   and require a 3× margin. Gross errors (wrong conversions, a dropped term) are ≥ 0.2; the
///   fine logic is the same template code as in f32, whose check every dtype must also pass.
pub fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 4e-2,
        DType::BF16 => 1.2e-1,
        _ => 2e-3,
    }
}

/// Compares `fused` with `reference`: returns `max|fused − reference| / max|reference|` if it is
/// at most `tol` and every value is finite, else a message saying what was wrong.
pub fn compare(fused: &[f32], reference: &[f32], tol: f32) -> std::result::Result<f32, String> {
    if fused.len() != reference.len() {
        return Err(format!(
            "{} values, expected {}",
            fused.len(),
            reference.len()
        ));
    }
    if let Some(i) = reference.iter().position(|v| !v.is_finite()) {
        return Err(format!("the portable path gave {} at {i}", reference[i]));
    }
    if let Some(i) = fused.iter().position(|v| !v.is_finite()) {
        return Err(format!("the fused kernels gave {} at {i}", fused[i]));
    }
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    if scale == 0.0 || !scale.is_normal() {
        return Err("the portable path gave an all-zero output".into());
    }
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (f, r)) in fused.iter().zip(reference).enumerate() {
        let e = (f - r).abs();
        if e > worst {
            (worst, at) = (e, i);
        }
    }
    let rel = worst / scale;
    if rel <= tol {
        Ok(rel)
    } else {
        Err(format!(
            "max |fused − portable| = {worst:.3e} at {at} ({} vs {}), {rel:.3e} of the output \
             scale {scale:.3e}, above the tolerance {tol:.1e}",
            fused[at], reference[at]
        ))
    }
}

/// Sizes of the self-check layer: small, but with widths that are not multiples of the SIMD
/// width or the threadgroup size, a length past the convolution window, two batch rows, and the
/// real `d_state` (so the per-lane state count is the one the model uses).
pub(crate) const CHECK_N_EMBD: usize = 24;
pub(crate) const CHECK_BATCH: usize = 2;
pub(crate) const CHECK_LEN: usize = 11;

pub(crate) fn check_arch(d_state: usize) -> MambaArch {
    MambaArch {
        d_inner: 72,
        d_state,
        dt_rank: 5,
        d_conv: 4,
    }
}

/// The weights of the self-check layer (CPU, f32, the official key names), see
/// [`layer_weights`].
pub(crate) fn check_weights(d_state: usize) -> Result<HashMap<String, Tensor>> {
    layer_weights(&check_arch(d_state), CHECK_N_EMBD)
}

/// Deterministic random Mamba weights (CPU, f32, the official key names) in realistic ranges:
/// uniform ±1/√fan_in projections with larger B/C, A_log = log(1..N), a Δ bias spread so Δ
/// ranges over ≈ 0.02..1.3, and channel 0 with a bias above softplus's threshold 20.
pub(crate) fn layer_weights(arch: &MambaArch, n_embd: usize) -> Result<HashMap<String, Tensor>> {
    let (c, di, ds, dr, dc) = (
        n_embd,
        arch.d_inner,
        arch.d_state,
        arch.dt_rank,
        arch.d_conv,
    );
    let inv = |n: usize| 1.0 / (n as f32).sqrt();
    let mut w: HashMap<String, Tensor> = HashMap::new();
    let mut put = |key: &str, t: Tensor| {
        w.insert(key.to_string(), t);
    };
    put("in_proj.weight", uniform_tensor(&[2 * di, c], inv(c), 11)?);
    put("conv1d.weight", uniform_tensor(&[di, 1, dc], inv(dc), 12)?);
    put("conv1d.bias", uniform_tensor(&[di], inv(dc), 13)?);
    put(
        "x_proj.weight",
        uniform_tensor(&[dr + 2 * ds, di], 3.0 * inv(di), 14)?,
    );
    put("dt_proj.weight", uniform_tensor(&[di, dr], inv(dr), 15)?);
    let mut bias = (uniform_tensor(&[di], 2.5, 16)? - 1.5)?.to_vec1::<f32>()?;
    bias[0] = 22.0;
    put("dt_proj.bias", Tensor::from_vec(bias, di, &Device::Cpu)?);
    let a_log: Vec<f32> = (0..di * ds).map(|i| ((i % ds) as f32 + 1.0).ln()).collect();
    put("A_log", Tensor::from_vec(a_log, (di, ds), &Device::Cpu)?);
    put("D", (uniform_tensor(&[di], 0.5, 17)? + 1.0)?);
    put("out_proj.weight", uniform_tensor(&[c, di], inv(di), 18)?);
    Ok(w)
}

/// A self-check-sized layer from `weights` on `device` in `dtype`.
pub(crate) fn layer_from(
    weights: HashMap<String, Tensor>,
    device: &Device,
    dtype: DType,
    d_state: usize,
) -> Result<Mamba> {
    let vb = VarBuilder::from_tensors(weights, dtype, device);
    Mamba::load(vb, CHECK_N_EMBD, &check_arch(d_state)).map_err(to_candle)
}

/// The self-check layer (`check_weights`) on `device` in `dtype`, and its input x (B, L, C)
/// uniform in ±2.
pub fn check_layer(device: &Device, dtype: DType, d_state: usize) -> Result<(Mamba, Tensor)> {
    let layer = layer_from(check_weights(d_state)?, device, dtype, d_state)?;
    let x = uniform_tensor(&[CHECK_BATCH, CHECK_LEN, CHECK_N_EMBD], 2.0, 19)?
        .to_dtype(dtype)?
        .to_device(device)?;
    Ok((layer, x))
}

fn to_candle(e: super::GptError) -> candle_core::Error {
    match e {
        super::GptError::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    }
}

/// Runs the self-check layer of `d_state` on `device` in `dtype` through the portable path and
/// through `fused`, and [`compare`]s them with [`tolerance`]`(dtype)`. `Ok` holds the relative
/// error; `Err` says why the fused path must not be used.
pub fn run_self_check(
    device: &Device,
    dtype: DType,
    d_state: usize,
    fused: impl Fn(&Mamba, &Tensor) -> super::Result<Tensor>,
) -> std::result::Result<f32, String> {
    let host = |t: Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1() };
    let run = || -> Result<(Vec<f32>, Vec<f32>)> {
        let (layer, x) = check_layer(device, dtype, d_state)?;
        let reference = host(layer.forward_portable(&x).map_err(to_candle)?)?;
        let got = host(fused(&layer, &x).map_err(to_candle)?)?;
        Ok((got, reference))
    };
    let (got, reference) = run().map_err(|e| format!("the fused kernels failed: {e}"))?;
    compare(&got, &reference, tolerance(dtype))
}

#[cfg(feature = "metal")]
pub use self::metal::{conv_silu, selective_scan, use_fused};

#[cfg(feature = "metal")]
mod metal {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::metal_backend::DeviceId;
    use candle_core::{
        bail, CpuStorage, CustomOp1, DType, Device, Layout, MetalDevice, MetalError, MetalStorage,
        Result, Shape, Storage, Tensor,
    };
    use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline};
    use objc2_metal::{MTLCompileOptions, MTLComputePipelineState, MTLSize};

    use super::{ConvDims, ScanArgs, ScanDims, MAX_STATES_PER_LANE};

    const SOURCE: &str = include_str!("metal_scan.metal");

    /// The compiled kernels of one device, indexed by dtype (f32, f16, bf16).
    struct Pipelines {
        conv: [ComputePipeline; 3],
        scan: [ComputePipeline; 3],
    }

    fn dtype_index(dtype: DType) -> Result<usize> {
        Ok(match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            d => bail!("the fused Metal Mamba kernels take f32, f16 or bf16, not {d:?}"),
        })
    }

    fn metal_err(e: candle_metal_kernels::MetalKernelError) -> candle_core::Error {
        MetalError::from(e).into()
    }

    /// Compiles the library (fast math off) and its six pipelines.
    fn compile(dev: &MetalDevice) -> Result<Pipelines> {
        let opts = MTLCompileOptions::new();
        // Precise exp/log and IEEE semantics, on every macOS version (mathMode needs 15+).
        #[allow(deprecated)]
        opts.setFastMathEnabled(false);
        let device = dev.metal_device();
        let lib = device
            .new_library_with_source(SOURCE, Some(&*opts))
            .map_err(metal_err)?;
        let pipeline = |name: String| -> Result<ComputePipeline> {
            let f = lib.get_function(&name, None).map_err(metal_err)?;
            device
                .new_compute_pipeline_state_with_function(&f)
                .map_err(metal_err)
        };
        let mut conv = Vec::with_capacity(3);
        let mut scan = Vec::with_capacity(3);
        for s in ["f32", "f16", "bf16"] {
            conv.push(pipeline(format!("mamba_conv_silu_{s}"))?);
            scan.push(pipeline(format!("mamba_scan_{s}"))?);
        }
        let arr = |v: Vec<ComputePipeline>| -> Result<[ComputePipeline; 3]> {
            v.try_into()
                .map_err(|_| candle_core::Error::Msg("fused Metal Mamba: pipeline count".into()))
        };
        Ok(Pipelines {
            conv: arr(conv)?,
            scan: arr(scan)?,
        })
    }

    /// The pipelines of `dev`, compiled on first use (a failure is returned each time).
    fn pipelines(dev: &MetalDevice) -> Result<Arc<Pipelines>> {
        static CACHE: OnceLock<Mutex<HashMap<DeviceId, Arc<Pipelines>>>> = OnceLock::new();
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&dev.id()) {
            return Ok(p.clone());
        }
        let p = Arc::new(compile(dev)?);
        cache.insert(dev.id(), p.clone());
        Ok(p)
    }

    /// Holds the storages of the auxiliary tensors while a kernel is encoded.
    fn metal_buffer<'a>(
        guard: &'a (candle_core::StorageRef<'a>, &'a Layout),
        what: &str,
    ) -> Result<(&'a Buffer, usize)> {
        let (s, l) = guard;
        match &**s {
            Storage::Metal(ms) => {
                if !l.is_contiguous() {
                    bail!("fused Metal Mamba: {what} must be contiguous");
                }
                Ok((ms.buffer(), l.start_offset() * ms.dtype().size_in_bytes()))
            }
            _ => bail!("fused Metal Mamba: {what} is not on a Metal device"),
        }
    }

    fn primary<'a>(s: &'a MetalStorage, l: &Layout, what: &str) -> Result<(&'a Buffer, usize)> {
        if !l.is_contiguous() {
            bail!("fused Metal Mamba: {what} must be contiguous");
        }
        Ok((s.buffer(), l.start_offset() * s.dtype().size_in_bytes()))
    }

    fn size1(width: usize) -> MTLSize {
        MTLSize {
            width,
            height: 1,
            depth: 1,
        }
    }

    /// Threads per threadgroup: at most 256, a multiple of the SIMD width.
    fn group_size(p: &ComputePipeline) -> Result<(usize, usize)> {
        let simd = p.as_ref().threadExecutionWidth();
        let max = p.max_total_threads_per_threadgroup().min(256);
        if simd == 0 || max < simd {
            bail!("fused Metal Mamba: SIMD width {simd} / threadgroup limit {max} unusable");
        }
        Ok((max / simd * simd, simd))
    }

    struct ConvSilu<'a> {
        w: &'a Tensor,
        b: &'a Tensor,
        dims: ConvDims,
    }

    impl CustomOp1 for ConvSilu<'_> {
        fn name(&self) -> &'static str {
            "danceba-mamba-conv-silu-metal"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the fused Metal Mamba convolution runs on Metal devices only")
        }

        fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
            let dev = s.device();
            let dtype = s.dtype();
            let pipeline = &pipelines(dev)?.conv[dtype_index(dtype)?];
            let params = self.dims.params()?;
            let total = self.dims.out_elems();
            let (tg, _) = group_size(pipeline)?;
            let (xz, xz_off) = primary(s, l, "in_proj output")?;
            let wg = self.w.storage_and_layout();
            let bg = self.b.storage_and_layout();
            let (w, w_off) = metal_buffer(&wg, "conv weight")?;
            let (b, b_off) = metal_buffer(&bg, "conv bias")?;
            let out = dev
                .new_buffer_builder()
                .with_size_for(total, dtype)
                .with_label("danceba-mamba-conv-silu")
                .build()?;
            let encoder = dev.command_encoder()?;
            encoder.set_label("danceba-mamba-conv-silu");
            let enc: &ComputeCommandEncoder = encoder.as_ref();
            enc.set_compute_pipeline_state(pipeline);
            enc.set_input_buffer(0, Some(xz), xz_off);
            enc.set_input_buffer(1, Some(w), w_off);
            enc.set_input_buffer(2, Some(b), b_off);
            enc.set_output_buffer(3, Some(&out), 0);
            enc.set_bytes(4, &params);
            enc.dispatch_thread_groups(size1(total.div_ceil(tg)), size1(tg));
            drop(encoder);
            let shape = Shape::from((self.dims.batch, self.dims.len, self.dims.d));
            Ok((MetalStorage::new(out, dev.clone(), total, dtype), shape))
        }
    }

    /// Causal depthwise convolution (kernel `w`: (d, K), zero history) plus `bias` (d), then
    /// SiLU, over the first `d` columns of `xz` (B, L, S ≥ d) on a Metal device. Returns
    /// (B, L, d).
    pub fn conv_silu(xz: &Tensor, d: usize, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let dims = ConvDims::new(xz.dims(), d, w.elem_count(), bias.elem_count())?;
        let dt = xz.dtype();
        super::check(w, dt, w.elem_count(), "conv weight")?;
        super::check(bias, dt, d, "conv bias")?;
        if !xz.device().is_metal() || !w.device().is_metal() || !bias.device().is_metal() {
            bail!("fused Metal Mamba: the convolution's tensors must be on a Metal device");
        }
        let xz = xz.contiguous()?;
        let (w, bias) = (w.contiguous()?, bias.contiguous()?);
        xz.apply_op1_no_bwd(&ConvSilu {
            w: &w,
            b: &bias,
            dims,
        })
    }

    struct Scan<'a> {
        args: &'a ScanArgs<'a>,
        dims: ScanDims,
    }

    impl CustomOp1 for Scan<'_> {
        fn name(&self) -> &'static str {
            "danceba-mamba-selective-scan-metal"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("the fused Metal selective scan runs on Metal devices only")
        }

        fn metal_fwd(&self, s: &MetalStorage, l: &Layout) -> Result<(MetalStorage, Shape)> {
            let dev = s.device();
            let dtype = s.dtype();
            let pipeline = &pipelines(dev)?.scan[dtype_index(dtype)?];
            let params = self.dims.params()?;
            let (tg, simd) = group_size(pipeline)?;
            if self.dims.n > simd * MAX_STATES_PER_LANE {
                bail!(
                    "fused Metal Mamba: d_state {} exceeds {} on this GPU (SIMD width {simd})",
                    self.dims.n,
                    simd * MAX_STATES_PER_LANE
                );
            }
            let total = self.dims.out_elems();
            let channels = self.dims.batch * self.dims.d;
            // one SIMD group per (batch, channel); the kernel strides over any remainder
            let groups = channels.div_ceil(tg / simd).clamp(1, 1 << 16);
            let (u, u_off) = primary(s, l, "u")?;
            let a = self.args;
            let guards = [
                (a.delta_pre.storage_and_layout(), "delta"),
                (a.delta_bias.storage_and_layout(), "delta bias"),
                (a.a.storage_and_layout(), "A"),
                (a.bc.storage_and_layout(), "x_proj output"),
                (a.d_skip.storage_and_layout(), "D"),
                (a.z.storage_and_layout(), "in_proj output"),
            ];
            let mut bufs = Vec::with_capacity(guards.len());
            for (g, what) in &guards {
                bufs.push(metal_buffer(g, what)?);
            }
            let out = dev
                .new_buffer_builder()
                .with_size_for(total, dtype)
                .with_label("danceba-mamba-scan")
                .build()?;
            let encoder = dev.command_encoder()?;
            encoder.set_label("danceba-mamba-scan");
            let enc: &ComputeCommandEncoder = encoder.as_ref();
            enc.set_compute_pipeline_state(pipeline);
            enc.set_input_buffer(0, Some(u), u_off);
            for (i, (buf, off)) in bufs.iter().enumerate() {
                enc.set_input_buffer(i + 1, Some(buf), *off);
            }
            enc.set_output_buffer(7, Some(&out), 0);
            enc.set_bytes(8, &params);
            enc.dispatch_thread_groups(size1(groups), size1(tg));
            drop(encoder);
            let shape = Shape::from((self.dims.batch, self.dims.len, self.dims.d));
            Ok((MetalStorage::new(out, dev.clone(), total, dtype), shape))
        }
    }

    /// `y = (C·h_t + D·u) ⊙ SiLU(z)` with `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t` from
    /// `h_0 = 0` and `Δ = softplus(delta_pre + delta_bias)`, for `u` (B, L, d) on a Metal
    /// device. Returns (B, L, d).
    pub fn selective_scan(u: &Tensor, args: &ScanArgs) -> Result<Tensor> {
        let dims = ScanDims::new(u, args)?;
        let all = [
            u,
            args.delta_pre,
            args.delta_bias,
            args.a,
            args.bc,
            args.d_skip,
            args.z,
        ];
        if !all.iter().all(|t| t.device().is_metal()) {
            bail!("fused Metal Mamba: the scan's tensors must be on a Metal device");
        }
        let (dpre, dbias, a, bc, dsk, z) = (
            args.delta_pre.contiguous()?,
            args.delta_bias.contiguous()?,
            args.a.contiguous()?,
            args.bc.contiguous()?,
            args.d_skip.contiguous()?,
            args.z.contiguous()?,
        );
        let c = ScanArgs {
            delta_pre: &dpre,
            delta_bias: &dbias,
            a: &a,
            bc: &bc,
            b_offset: args.b_offset,
            c_offset: args.c_offset,
            d_skip: &dsk,
            z: &z,
            z_offset: args.z_offset,
        };
        u.contiguous()?.apply_op1_no_bwd(&Scan { args: &c, dims })
    }

    /// Whether a Mamba layer with this `d_state` on `device` in `dtype` may take the fused Metal
    /// kernels: the dtype and size are supported, `DANCEBA_METAL_SCAN` is not `0`, and the
    /// self-check for this (device, dtype, d_state) passed — for f16/bf16 also the f32 one, whose
    /// tighter tolerance covers the index and scan logic that all dtypes share. Each self-check
    /// runs once per process; a failure prints one warning to stderr and the portable path is
    /// used from then on.
    pub fn use_fused(device: &Device, d_state: usize, dtype: DType) -> bool {
        if !super::supports(d_state, dtype)
            || std::env::var("DANCEBA_METAL_SCAN").is_ok_and(|v| v.trim() == "0")
        {
            return false;
        }
        let Ok(dev) = device.as_metal_device() else {
            return false;
        };
        /// (device, dtype, d_state) → whether the self-check passed.
        type Checked = Mutex<HashMap<(DeviceId, DType, usize), bool>>;
        static CHECKED: OnceLock<Checked> = OnceLock::new();
        // Held through the checks, so concurrent first calls run each once.
        let mut checked = CHECKED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut passes = |dt: DType| -> bool {
            *checked.entry((dev.id(), dt, d_state)).or_insert_with(|| {
                match super::run_self_check(device, dt, d_state, |m, x| m.forward_fused_metal(x)) {
                    Ok(_) => true,
                    Err(why) => {
                        eprintln!(
                            "warning: the fused Metal Mamba kernels ({dt:?}, d_state {d_state}) \
                             failed their self-check against the portable path, which is used \
                             instead: {why}"
                        );
                        false
                    }
                }
            })
        };
        passes(DType::F32) && (dtype == DType::F32 || passes(dtype))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::MambaImpl;

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn compare_accepts_within_and_rejects_beyond_tolerance() {
        let r = [1.0f32, -2.0, 0.5, 4.0];
        assert_eq!(compare(&r, &r, 1e-3), Ok(0.0));
        // error 4e-3 on a scale of 4 → 1e-3 relative
        let f = [1.0f32, -2.0, 0.504, 4.0];
        let rel = compare(&f, &r, 2e-3).unwrap();
        assert!((rel - 1e-3).abs() < 1e-6, "{rel}");
        assert!(compare(&f, &r, 5e-4)
            .unwrap_err()
            .contains("above the tolerance"));
        // the worst element decides, not the mean
        let mut big = vec![1.0f32; 1000];
        let good = big.clone();
        big[777] = 1.1;
        assert!(compare(&big, &good, 2e-3).unwrap_err().contains("at 777"));
    }

    #[test]
    fn compare_rejects_non_finite_empty_and_mismatched() {
        let r = [1.0f32, 2.0];
        assert!(compare(&[1.0, f32::NAN], &r, 1.0)
            .unwrap_err()
            .contains("fused"));
        assert!(compare(&[1.0, f32::INFINITY], &r, 1.0).is_err());
        assert!(compare(&r, &[1.0, f32::NAN], 1.0)
            .unwrap_err()
            .contains("portable"));
        assert!(compare(&[0.0, 0.0], &[0.0, 0.0], 1.0)
            .unwrap_err()
            .contains("all-zero"));
        assert!(compare(&[1.0], &r, 1.0)
            .unwrap_err()
            .contains("1 values, expected 2"));
    }

    #[test]
    fn tolerances_order_with_precision() {
        assert!(tolerance(DType::F32) < tolerance(DType::F16));
        assert!(tolerance(DType::F16) < tolerance(DType::BF16));
        // still far below the ≥ 0.2 errors of a dropped term or a broken conversion
        assert!(tolerance(DType::BF16) < 0.2);
    }

    #[test]
    fn supports_dtypes_and_sizes() {
        assert!(supports(128, DType::F32) && supports(128, DType::F16) && supports(1, DType::BF16));
        assert!(supports(MAX_D_STATE, DType::F32));
        assert!(!supports(0, DType::F32));
        assert!(!supports(MAX_D_STATE + 1, DType::F32));
        assert!(!supports(128, DType::F64));
    }

    #[test]
    fn conv_dims_checks_shapes() {
        let d = ConvDims::new(&[2, 28, 6144], 3072, 3072 * 4, 3072).unwrap();
        assert_eq!((d.batch, d.len, d.d, d.k, d.stride), (2, 28, 3072, 4, 6144));
        assert_eq!(
            d.params().unwrap(),
            ConvParams {
                batch: 2,
                len: 28,
                d: 3072,
                k: 4,
                xz_stride: 6144
            }
        );
        assert_eq!(d.out_elems(), 2 * 28 * 3072);
        assert!(ConvDims::new(&[2, 28], 3, 12, 3).is_err());
        assert!(ConvDims::new(&[2, 28, 6], 7, 28, 7).is_err()); // d > row
        assert!(ConvDims::new(&[2, 28, 6], 0, 0, 0).is_err());
        assert!(ConvDims::new(&[2, 28, 6], 3, 10, 3).is_err()); // weight not (d, K)
        assert!(ConvDims::new(&[2, 28, 6], 3, 0, 3).is_err()); // empty kernel
        assert!(ConvDims::new(&[2, 28, 6], 3, 12, 4).is_err()); // bias
        assert!(ConvDims::new(&[0, 28, 6], 3, 12, 3).is_err()); // empty input
                                                                // indices past u32 are refused, not wrapped
        let e = ConvDims::new(&[1 << 16, 1 << 8, 1 << 9], 4, 16, 4).unwrap_err();
        assert!(e.to_string().contains("exceeds u32"), "{e}");
    }

    struct ScanShapes {
        u: Tensor,
        dpre: Tensor,
        dbias: Tensor,
        a: Tensor,
        bc: Tensor,
        dsk: Tensor,
        z: Tensor,
    }

    fn scan_shapes(b: usize, l: usize, d: usize, n: usize, bcw: usize, zw: usize) -> ScanShapes {
        ScanShapes {
            u: zeros(&[b, l, d]),
            dpre: zeros(&[b, l, d]),
            dbias: zeros(&[d]),
            a: zeros(&[d, n]),
            bc: zeros(&[b, l, bcw]),
            dsk: zeros(&[d]),
            z: zeros(&[b, l, zw]),
        }
    }

    fn args<'a>(s: &'a ScanShapes, b_off: usize, c_off: usize, z_off: usize) -> ScanArgs<'a> {
        ScanArgs {
            delta_pre: &s.dpre,
            delta_bias: &s.dbias,
            a: &s.a,
            bc: &s.bc,
            b_offset: b_off,
            c_offset: c_off,
            d_skip: &s.dsk,
            z: &s.z,
            z_offset: z_off,
        }
    }

    #[test]
    fn scan_dims_checks_shapes_offsets_and_dtypes() {
        // the official layout: x_proj width dt_rank + 2·d_state, z after the d_inner x columns
        let s = scan_shapes(2, 5, 8, 4, 3 + 8, 16);
        let d = ScanDims::new(&s.u, &args(&s, 3, 7, 8)).unwrap();
        assert_eq!((d.batch, d.len, d.d, d.n), (2, 5, 8, 4));
        let p = d.params().unwrap();
        assert_eq!(
            (p.bc_stride, p.b_off, p.c_off, p.z_stride, p.z_off),
            (11, 3, 7, 16, 8)
        );
        assert_eq!((p.batch, p.len, p.d, p.n), (2, 5, 8, 4));
        // columns past the rows
        assert!(ScanDims::new(&s.u, &args(&s, 3, 8, 8)).is_err());
        assert!(ScanDims::new(&s.u, &args(&s, 8, 3, 8)).is_err());
        assert!(ScanDims::new(&s.u, &args(&s, 3, 7, 9)).is_err());
        assert!(ScanDims::new(&s.u, &args(&s, usize::MAX, 7, 8)).is_err());
        // wrong sizes of each argument
        let mut bad = scan_shapes(2, 5, 8, 4, 11, 16);
        bad.dbias = zeros(&[7]);
        assert!(ScanDims::new(&bad.u, &args(&bad, 3, 7, 8)).is_err());
        let mut bad = scan_shapes(2, 5, 8, 4, 11, 16);
        bad.dpre = zeros(&[2, 4, 8]);
        assert!(ScanDims::new(&bad.u, &args(&bad, 3, 7, 8)).is_err());
        let mut bad = scan_shapes(2, 5, 8, 4, 11, 16);
        bad.z = zeros(&[2, 4, 16]);
        assert!(ScanDims::new(&bad.u, &args(&bad, 3, 7, 8)).is_err());
        let mut bad = scan_shapes(2, 5, 8, 4, 11, 16);
        bad.a = zeros(&[8, 4, 2])
            .narrow(2, 0, 1)
            .unwrap()
            .squeeze(2)
            .unwrap();
        assert!(ScanDims::new(&bad.u, &args(&bad, 3, 7, 8)).is_ok()); // same count: fine
        bad.a = zeros(&[3]);
        assert!(ScanDims::new(&bad.u, &args(&bad, 3, 7, 8)).is_err()); // no states
                                                                       // mixed dtypes
        let mut bad = scan_shapes(2, 5, 8, 4, 11, 16);
        bad.dsk = bad.dsk.to_dtype(DType::F16).unwrap();
        let e = ScanDims::new(&bad.u, &args(&bad, 3, 7, 8)).unwrap_err();
        assert!(e.to_string().contains("F16"), "{e}");
        // unsupported dtype
        let mut bad = scan_shapes(2, 5, 8, 4, 11, 16);
        bad.u = bad.u.to_dtype(DType::F64).unwrap();
        assert!(ScanDims::new(&bad.u, &args(&bad, 3, 7, 8)).is_err());
        // u32 overflow of the index space is refused
        let huge = ScanDims {
            batch: 1 << 12,
            len: 1 << 10,
            d: 1 << 10,
            n: 4,
            bc_stride: 16,
            z_stride: 2048,
            b_offset: 0,
            c_offset: 4,
            z_offset: 1024,
        };
        assert!(huge
            .params()
            .unwrap_err()
            .to_string()
            .contains("exceeds u32"));
    }

    #[test]
    fn params_layout_matches_the_shader_structs() {
        // metal_scan.metal declares ConvParams with 5 and ScanParams with 9 `uint` fields
        assert_eq!(std::mem::size_of::<ConvParams>(), 5 * 4);
        assert_eq!(std::mem::size_of::<ScanParams>(), 9 * 4);
        let src = include_str!("metal_scan.metal");
        for (name, fields) in [("ConvParams", 5), ("ScanParams", 9)] {
            let body = src
                .split(&format!("struct {name} {{"))
                .nth(1)
                .and_then(|s| s.split("};").next())
                .unwrap();
            assert_eq!(body.matches("uint ").count(), fields, "{name}");
        }
        assert!(src.contains(&format!(
            "#define MAX_STATES_PER_LANE {MAX_STATES_PER_LANE}"
        )));
    }

    type LayerFn<'a> = &'a dyn Fn(&Mamba, &Tensor) -> crate::gpt::Result<Tensor>;

    fn cpu_fused(m: &Mamba, x: &Tensor) -> crate::gpt::Result<Tensor> {
        m.forward(x, MambaImpl::FusedCpu)
    }

    #[test]
    fn self_check_passes_a_correct_fused_path() {
        // The CPU fused kernels are a correct second implementation: the harness must accept
        // them with a wide margin (the f32 tolerance leaves room for Metal's fast-math exp).
        for ds in [16, 100, 128] {
            let rel = run_self_check(&Device::Cpu, DType::F32, ds, cpu_fused).unwrap();
            assert!(rel < tolerance(DType::F32) / 50.0, "d_state {ds}: {rel:e}");
        }
    }

    /// The portable output of the self-check layer with `edit` applied to its weights.
    fn mutant(
        dtype: DType,
        ds: usize,
        edit: impl Fn(&mut HashMap<String, Tensor>),
    ) -> impl Fn(&Mamba, &Tensor) -> crate::gpt::Result<Tensor> {
        let mut w = check_weights(ds).unwrap();
        edit(&mut w);
        let layer = layer_from(w, &Device::Cpu, dtype, ds).unwrap();
        move |_, x| layer.forward_portable(x)
    }

    fn set(w: &mut HashMap<String, Tensor>, key: &str, f: impl Fn(usize, f32) -> f32) {
        let t = &w[key];
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v.into_iter().enumerate().map(|(i, x)| f(i, x)).collect();
        let new = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
        w.insert(key.to_string(), new);
    }

    #[test]
    fn self_check_rejects_kernel_bugs() {
        let ds = 100;
        let arch = check_arch(ds);
        let (di, dr) = (arch.d_inner, arch.dt_rank);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // the scan term dropped (C = 0): y = D·u ⊙ SiLU(z)
            let no_scan = mutant(dtype, ds, |w| {
                set(
                    w,
                    "x_proj.weight",
                    |i, x| if i / di >= dr + ds { 0.0 } else { x },
                )
            });
            // the D skip dropped
            let no_skip = mutant(dtype, ds, |w| set(w, "D", |_, _| 0.0));
            // one channel (the last, in the last partial SIMD group) wrong
            let last = mutant(dtype, ds, |w| {
                set(w, "D", |i, x| if i == di - 1 { x + 1.0 } else { x })
            });
            // the softplus threshold branch mishandled (channel 0: Δ = 0)
            let thr = mutant(dtype, ds, |w| {
                set(w, "dt_proj.bias", |i, x| if i == 0 { -80.0 } else { x })
            });
            // the state decay ignored for the upper half of the states (A = 0)
            let decay = mutant(dtype, ds, |w| {
                set(w, "A_log", |i, x| {
                    if i % ds >= ds / 2 {
                        f32::NEG_INFINITY
                    } else {
                        x
                    }
                })
            });
            let names = ["no scan", "no skip", "last channel", "threshold", "decay"];
            let fns: [LayerFn; 5] = [&no_scan, &no_skip, &last, &thr, &decay];
            for (name, f) in names.iter().zip(fns) {
                if *name == "last channel" && dtype != DType::F32 {
                    // within low-precision noise: left to the f32 check, which every dtype
                    // also needs to pass (see `use_fused`)
                    continue;
                }
                let r = run_self_check(&Device::Cpu, dtype, ds, f);
                assert!(r.is_err(), "{dtype:?} {name}: accepted ({r:?})");
            }
            // an output one time step late
            let r = run_self_check(&Device::Cpu, dtype, ds, |m, x| {
                let y = m.forward_portable(x)?;
                let (b, l, c) = y.dims3()?;
                let pad = Tensor::zeros((b, 1, c), y.dtype(), y.device())?;
                Ok(Tensor::cat(&[&pad, &y.narrow(1, 0, l - 1)?], 1)?)
            });
            assert!(r.is_err(), "{dtype:?} time shift: accepted ({r:?})");
        }
        // in f32, a uniform 1 % error is caught
        let r = run_self_check(&Device::Cpu, DType::F32, ds, |m, x| {
            Ok((m.forward_portable(x)? * 1.01)?)
        });
        assert!(r.is_err(), "1 % scale: accepted ({r:?})");
    }

    #[test]
    fn low_precision_tolerances_cover_the_rounding_of_the_portable_path() {
        // The fused kernels keep the scan in f32 while the portable path rounds every step to
        // the storage type; the layer computed wholly in f32 (unrounded weights too) differs from
        // the portable f16/bf16 one by more than the fused kernels can. It must stay 3× inside
        // the tolerance.
        for dtype in [DType::F16, DType::BF16] {
            for ds in [16, 64, 100, 128, 256] {
                let w = check_weights(ds).unwrap();
                let w = w
                    .into_iter()
                    .map(|(k, t)| {
                        let t = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                        (k, t)
                    })
                    .collect();
                let exact = layer_from(w, &Device::Cpu, DType::F32, ds).unwrap();
                let rel = run_self_check(&Device::Cpu, dtype, ds, |_, x| {
                    let y = exact.forward_portable(&x.to_dtype(DType::F32)?)?;
                    Ok(y.to_dtype(dtype)?)
                })
                .unwrap();
                // On AArch64 CPUs candle's NEON bf16 add and multiply narrow their f32 results
                // by truncation (`vshrn` of the high half; x86 and the scalar code round to
                // nearest even), which drifts the CPU's portable bf16 layer up to 0.10 from the
                // f32 one (measured under qemu-aarch64; 0.036 on x86). There the margin is 1×; on a
                // Mac the self-check's portable layer runs on the Metal device, whose bf16
                // arithmetic is the GPU's, not this CPU code.
                let margin = if cfg!(target_arch = "aarch64") && dtype == DType::BF16 {
                    1.0
                } else {
                    3.0
                };
                assert!(
                    rel * margin < tolerance(dtype),
                    "{dtype:?} d_state {ds}: {rel:e}"
                );
            }
        }
    }
}

/// On a real Metal device: these run only on a Mac with `cargo test -p danceba-model --features
/// metal --lib metal_scan` (they were written and type-checked on Linux, never run).
#[cfg(all(test, feature = "metal"))]
mod metal_tests {
    use super::*;
    use crate::gpt::scan;
    use crate::gpt::MambaImpl;

    fn device() -> Device {
        Device::new_metal(0).expect("the metal feature's tests need a Metal device")
    }

    fn fused_metal(m: &Mamba, x: &Tensor) -> crate::gpt::Result<Tensor> {
        m.forward_fused_metal(x)
    }

    fn host(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn self_check_passes_in_every_dtype() {
        let dev = device();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for ds in [16, 100, 128] {
                let rel = run_self_check(&dev, dtype, ds, fused_metal)
                    .unwrap_or_else(|e| panic!("{dtype:?} d_state {ds}: {e}"));
                eprintln!("self-check {dtype:?} d_state {ds}: {rel:e}");
            }
            assert!(use_fused(&dev, 128, dtype), "{dtype:?}");
        }
        // d_state past what the kernel holds is never selected
        assert!(!use_fused(&dev, MAX_D_STATE + 1, DType::F32));
    }

    #[test]
    fn kernels_match_the_cpu_kernels() {
        // odd sizes and offsets: x at columns 0..d and z at z_off of a wider in_proj row, B/C
        // at non-adjacent offsets of the x_proj row
        let (b, l, d, n, k) = (3, 13, 77, 40, 4);
        let (zw, z_off) = (2 * d + 5, d + 3);
        let (bcw, b_off, c_off) = (6 + 2 * n + 3, 6, 6 + n + 3);
        let dev = device();
        let xz = uniform_tensor(&[b, l, zw], 2.0, 1).unwrap();
        let w = uniform_tensor(&[d, k], 0.5, 2).unwrap();
        let cb = uniform_tensor(&[d], 0.5, 3).unwrap();
        let on = |t: &Tensor| t.to_device(&dev).unwrap();
        let u_m = conv_silu(&on(&xz), d, &on(&w), &on(&cb)).unwrap();
        let (xz_h, w_h, cb_h) = (host(&xz), host(&w), host(&cb));
        let u_c = scan::causal_conv_silu(&xz_h, b, l, zw, 0, d, &w_h, &cb_h);
        compare(&host(&u_m), &u_c, 1e-5).unwrap();

        let dpre = uniform_tensor(&[b, l, d], 3.0, 4).unwrap();
        let mut dbias = host(&uniform_tensor(&[d], 2.0, 5).unwrap());
        dbias[1] = 25.0; // softplus threshold branch
        let dbias = Tensor::from_vec(dbias, d, &Device::Cpu).unwrap();
        let a = (uniform_tensor(&[d, n], 1.0, 6).unwrap() - 1.5).unwrap();
        let bc = uniform_tensor(&[b, l, bcw], 1.5, 7).unwrap();
        let dsk = uniform_tensor(&[d], 1.0, 8).unwrap();
        let y_m = selective_scan(
            &u_m,
            &ScanArgs {
                delta_pre: &on(&dpre),
                delta_bias: &on(&dbias),
                a: &on(&a),
                bc: &on(&bc),
                b_offset: b_off,
                c_offset: c_off,
                d_skip: &on(&dsk),
                z: &on(&xz),
                z_offset: z_off,
            },
        )
        .unwrap();
        let (dpre_h, dbias_h, a_h, bc_h, dsk_h) =
            (host(&dpre), host(&dbias), host(&a), host(&bc), host(&dsk));
        let u_h = host(&u_m);
        let inputs = scan::ScanInputs {
            batch: b,
            len: l,
            d,
            n,
            u: &u_h,
            delta_pre: &dpre_h,
            delta_bias: &dbias_h,
            a: &a_h,
            a_min: &scan::channel_minima(&a_h, d, n),
            bc: &bc_h,
            bc_stride: bcw,
            b_offset: b_off,
            c_offset: c_off,
            d_skip: &dsk_h,
            z: &xz_h,
            z_stride: zw,
            z_offset: z_off,
        };
        // the plain loop, the clearest statement of the math
        let y_c = scan::selective_scan_with(&inputs, scan::ScanKernel::Loop);
        let rel = compare(&host(&y_m), &y_c, 1e-4).unwrap();
        eprintln!("scan kernel vs CPU kernel: {rel:e}");
    }

    #[test]
    fn official_size_layer_matches_the_portable_path() {
        let arch = crate::gpt::random::official_gpt_arch().mamba;
        let c = 768;
        let dev = device();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let vb = VarBuilder::from_tensors(layer_weights(&arch, c).unwrap(), dtype, &dev);
            let layer = Mamba::load(vb, c, &arch).unwrap();
            let x = uniform_tensor(&[2, 28, c], 2.0, 9)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            // on a Metal device any fused implementation selects the Metal kernels
            let fused = layer.forward(&x, MambaImpl::FusedCpu).unwrap();
            let portable = layer.forward_portable(&x).unwrap();
            let rel = compare(&host(&fused), &host(&portable), tolerance(dtype))
                .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
            eprintln!("official-size layer {dtype:?}: {rel:e}");
        }
    }
}
