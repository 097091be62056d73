//! Fused CUDA kernels of the Mamba layer (feature `cuda`): the causal depthwise convolution with
//! SiLU in one launch, and softplus(Δ) + selective scan + D skip + SiLU(z) gate in another, in
//! place of the portable path's few hundred small launches per layer. The kernels
//! (`cuda_scan.cu`) are compiled to PTX by the crate's build script and loaded once per device.
//! Storage dtypes f32, f16, bf16; the arithmetic and the scan state are f32.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cuda_scan.ptx"));
const MODULE: &str = "danceba_mamba_cuda_scan";

/// The largest `d_state` the scan kernel holds in registers (32 lanes of 8 states).
pub const MAX_D_STATE: usize = 256;

/// Threads per block of the conv kernel.
const CONV_THREADS: usize = 256;
/// Threads per block of the scan kernels (`SCAN_THREADS` in cuda_scan.cu).
const SCAN_THREADS: usize = 128;
/// Shared memory a scan block may use (the default limit, no opt-in needed).
const SCAN_SMEM: usize = 48 * 1024;

/// Which scan kernel runs a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScanKernel {
    /// The paired-channel kernel for 65..=128 states (the model's 128), else the single-channel
    /// one; `DANCEBA_CUDA_SCAN=single|paired` overrides it (as far as `d_state` allows).
    #[default]
    Auto,
    /// Each lane holds states of one channel (any `d_state` ≤ 256).
    Single,
    /// Each lane holds the same states of two channels, so every B and C value it reads
    /// serves two state updates (`d_state` ≤ 128).
    Paired,
}

/// `DANCEBA_CUDA_SCAN` (`single` or `paired`), read once.
fn env_override() -> Option<ScanKernel> {
    static KIND: std::sync::OnceLock<Option<ScanKernel>> = std::sync::OnceLock::new();
    *KIND.get_or_init(|| match std::env::var("DANCEBA_CUDA_SCAN").as_deref() {
        Ok("single") => Some(ScanKernel::Single),
        Ok("paired") => Some(ScanKernel::Paired),
        _ => None,
    })
}

/// The scan kernel variant for a `d_state`: `g` lanes per group of `ch` channels, each lane
/// holding `s` states of each (`mamba_scan_<T>_g<g>_s<s>_c<ch>` in cuda_scan.cu, `g·s >=
/// d_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScanConfig {
    g: usize,
    s: usize,
    ch: usize,
    /// Blocks per SM its registers are bounded for (`MINB` in cuda_scan.cu; 1: unbounded).
    minb: usize,
}

impl ScanConfig {
    /// The compiled single-channel variants, smallest first.
    /// One song's 128 states run on (8, 16), bounded for 5 blocks per SM (93 registers): on an
    /// H100 under ncu (bf16, 100-step bench) its scan took 24.4 µs for one song and 134 µs for
    /// eight, against 25.6 / 155 µs for (16, 8) bounded for 6 blocks per SM (76 registers) and
    /// 30.1 / 169 µs for (16, 8) unbounded (the driver's compiler gave it 105 registers: 4
    /// blocks per SM). Sixteen states per lane halve the per-block staging of B and C per state
    /// and the lane reduction per position: 17 % fewer instructions.
    const VARIANTS: [ScanConfig; 5] = [
        ScanConfig::single(4, 4, 1),
        ScanConfig::single(8, 4, 1),
        ScanConfig::single(8, 8, 1),
        ScanConfig::single(8, 16, 5),
        ScanConfig::single(32, 8, 1),
    ];

    /// The paired-channel variant: 16 lanes of 8 states for two channels (`d_state` 65..=128
    /// without much padding), bounded for 5 blocks per SM, 16 channels per block as (8, 16).
    /// At batch 8 ncu showed the single-channel kernel bound by shared-memory wavefronts (L1
    /// 85 % busy, every 16-byte read of B or C 4 wavefronts): two channels per lane halve those
    /// reads at the same instruction count. On an H100 (bf16, ncu) 128 against 134 µs per
    /// grouped scan at batch 8, 70.4–71.7 against 72.9–73.8 at batch 4, 38.8–40.6 against
    /// 40.6–41.7 at batch 2 and 24.2–25.6 against 24.5–25.6 at batch 1.
    const PAIRED: ScanConfig = ScanConfig {
        g: 16,
        s: 8,
        ch: 2,
        minb: 5,
    };

    const fn single(g: usize, s: usize, minb: usize) -> Self {
        ScanConfig { g, s, ch: 1, minb }
    }

    fn for_d_state(n: usize) -> Result<Self> {
        match Self::VARIANTS.iter().find(|v| v.g * v.s >= n) {
            Some(v) if n > 0 => Ok(*v),
            _ => bail!("fused CUDA Mamba: d_state {n} is not supported (1..={MAX_D_STATE})"),
        }
    }

    /// The kernel for a layer with `n` states.
    fn choose(kind: ScanKernel, n: usize) -> Result<Self> {
        let p = Self::PAIRED;
        let fits = n > 0 && n <= p.g * p.s;
        let kind = match kind {
            ScanKernel::Auto => match env_override() {
                Some(ScanKernel::Single) => ScanKernel::Single,
                Some(ScanKernel::Paired) if fits => ScanKernel::Paired,
                _ if fits && n > p.g * p.s / 2 => ScanKernel::Paired,
                _ => ScanKernel::Single,
            },
            k => k,
        };
        match kind {
            ScanKernel::Paired if fits => Ok(p),
            ScanKernel::Paired => bail!(
                "fused CUDA Mamba: the paired-channel scan holds at most {} states, not {n}",
                p.g * p.s
            ),
            _ => Self::for_d_state(n),
        }
    }

    fn channels_per_block(&self) -> usize {
        self.ch * SCAN_THREADS / self.g
    }

    /// Shared memory per staged position: B and C rows of g·s floats; Δ, u, z and C·h per
    /// channel.
    fn smem_row_bytes(&self) -> usize {
        (2 * self.g * self.s + 4 * self.channels_per_block()) * std::mem::size_of::<f32>()
    }

    /// Positions per tile: a multiple of 4, all of `len` (rounded up) if it fits in the
    /// shared memory of one of the `minb` blocks an SM (227 KiB usable, 1 KiB reserved per
    /// block) should hold, else the fewest tiles of equal length.
    fn tile_len(&self, len: usize) -> usize {
        let cap = SCAN_SMEM.min((227 * 1024) / self.minb - 1024);
        let max = ((cap / self.smem_row_bytes()) / 4 * 4).max(4);
        let len4 = len.next_multiple_of(4).max(4);
        let tiles = len4.div_ceil(max);
        len4.div_ceil(tiles).next_multiple_of(4)
    }
}

/// Whether the fused kernels can run a layer with this `d_state` in this dtype.
pub fn supports(d_state: usize, dtype: DType) -> bool {
    (1..=MAX_D_STATE).contains(&d_state) && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("fused CUDA Mamba: {what} must be contiguous"),
    }
}

/// Checks that `t` is a contiguous CUDA tensor of `dtype` with `elems` elements.
fn check(t: &Tensor, dtype: DType, elems: usize, what: &str) -> Result<()> {
    if !t.device().is_cuda() {
        bail!("fused CUDA Mamba: {what} is not on a CUDA device");
    }
    if t.dtype() != dtype {
        bail!(
            "fused CUDA Mamba: {what} is {:?}, expected {dtype:?}",
            t.dtype()
        );
    }
    if t.elem_count() != elems {
        bail!(
            "fused CUDA Mamba: {what} has shape {:?}, expected {elems} elements",
            t.dims()
        );
    }
    Ok(())
}

/// Runs `f` with the CUDA storage and layout of `t`.
fn with_cuda<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(cs) => f(cs, l),
        _ => bail!("fused CUDA Mamba: {what} is not on a CUDA device"),
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("the fused CUDA Mamba kernels take f32, f16 or bf16, not {d:?}"),
    })
}

struct ConvSilu<'a> {
    w: &'a Tensor,
    b: &'a Tensor,
    batch: usize,
    len: usize,
    d: usize,
    k: usize,
    stride: usize,
    /// Batch items per weight group.
    gb: usize,
}

impl ConvSilu<'_> {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        xz: &CudaStorage,
        xl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = xz.device().clone();
        let x = view::<T>(xz, xl, "in_proj output")?;
        let n = self.batch * self.len * self.d;
        let (len, d, k, stride, gb) = (
            as_i32(self.len, "len")?,
            as_i32(self.d, "d_inner")?,
            as_i32(self.k, "d_conv")?,
            as_i32(self.stride, "row stride")?,
            as_i32(self.gb, "batch items per group")?,
        );
        as_i32(n, "batch·len·d_inner")?;
        as_i32(self.batch * self.len * self.stride, "in_proj output size")?;
        if self.len > 65_535 || self.batch > 65_535 {
            bail!("fused CUDA Mamba: too many positions or batch items for one launch");
        }
        let name = format!("mamba_conv_silu_{}", suffix(T::DTYPE)?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(n)? };
        with_cuda(self.w, "conv weight", |ws, wl| {
            with_cuda(self.b, "conv bias", |bs, bl| {
                let w = view::<T>(ws, wl, "conv weight")?;
                let b = view::<T>(bs, bl, "conv bias")?;
                let mut lb = func.builder();
                lb.arg(&x).arg(&w).arg(&b).arg(&out);
                lb.arg(&len).arg(&d).arg(&k).arg(&stride).arg(&gb);
                // one thread per output: x over channels, y over positions, z over batch items
                let cfg = LaunchConfig {
                    grid_dim: (
                        self.d.div_ceil(CONV_THREADS) as u32,
                        self.len as u32,
                        self.batch as u32,
                    ),
                    block_dim: (CONV_THREADS as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument types and counts match the kernel's signature; the views
                // cover every index the kernel reads (checked shapes).
                unsafe { lb.launch(cfg) }.w()?;
                Ok(())
            })
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp1 for ConvSilu<'_> {
    fn name(&self) -> &'static str {
        "danceba-mamba-conv-silu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the fused CUDA Mamba convolution runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.launch::<f32>(s, l)?,
            DType::F16 => self.launch::<half::f16>(s, l)?,
            DType::BF16 => self.launch::<half::bf16>(s, l)?,
            d => bail!("the fused CUDA Mamba kernels take f32, f16 or bf16, not {d:?}"),
        };
        Ok((out, Shape::from((self.batch, self.len, self.d))))
    }
}

/// Causal depthwise convolution (kernel `w`: (d, K), zero history) plus `bias` (d), then SiLU,
/// over the first `d` columns of `xz` (B, L, S ≥ d). Returns (B, L, d).
pub fn conv_silu(xz: &Tensor, d: usize, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    conv_silu_grouped(xz, d, w, bias, 1)
}

/// Batch items in each of `groups` equal weight groups of a batch of `batch`.
fn per_group(batch: usize, groups: usize) -> Result<usize> {
    if groups == 0 || !batch.is_multiple_of(groups) {
        bail!("fused CUDA Mamba: a batch of {batch} does not split into {groups} weight groups");
    }
    Ok(batch / groups)
}

/// [`conv_silu`] with `groups` sets of weights, `w` (groups, d, K) and `bias` (groups, d): the
/// batch splits into `groups` equal runs, run g convolved with set g (the streams of a
/// Block_Head in one launch).
pub fn conv_silu_grouped(
    xz: &Tensor,
    d: usize,
    w: &Tensor,
    bias: &Tensor,
    groups: usize,
) -> Result<Tensor> {
    let (batch, len, stride) = xz.dims3()?;
    if d == 0 || d > stride {
        bail!("fused CUDA Mamba: {d} channels do not fit rows of {stride}");
    }
    let gb = per_group(batch, groups)?;
    let k = w.elem_count() / (groups * d);
    let dt = xz.dtype();
    check(w, dt, groups * d * k, "conv weight")?;
    check(bias, dt, groups * d, "conv bias")?;
    if k == 0 {
        bail!("fused CUDA Mamba: empty convolution kernel");
    }
    let xz = xz.contiguous()?;
    let (w, bias) = (w.contiguous()?, bias.contiguous()?);
    xz.apply_op1_no_bwd(&ConvSilu {
        w: &w,
        b: &bias,
        batch,
        len,
        d,
        k,
        stride,
        gb,
    })
}

/// Inputs of [`selective_scan`] besides `u`.
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

struct Scan<'a> {
    args: &'a ScanArgs<'a>,
    batch: usize,
    len: usize,
    d: usize,
    n: usize,
    bc_stride: usize,
    z_stride: usize,
    /// Batch items per weight group.
    gb: usize,
    kernel: ScanKernel,
}

impl Scan<'_> {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        us: &CudaStorage,
        ul: &Layout,
    ) -> Result<CudaStorage> {
        let dev = us.device().clone();
        let u = view::<T>(us, ul, "u")?;
        let a = self.args;
        let total = self.batch * self.len * self.d;
        as_i32(total, "batch·len·d_inner")?;
        as_i32(self.batch * self.len * self.bc_stride, "x_proj output size")?;
        as_i32(self.batch * self.len * self.z_stride, "in_proj output size")?;
        let ints = [
            as_i32(self.bc_stride, "x_proj width")?,
            as_i32(a.b_offset, "B offset")?,
            as_i32(a.c_offset, "C offset")?,
            as_i32(self.z_stride, "in_proj width")?,
            as_i32(a.z_offset, "z offset")?,
            as_i32(self.len, "len")?,
            as_i32(self.d, "d_inner")?,
            as_i32(self.n, "d_state")?,
            as_i32(self.gb, "batch items per group")?,
        ];
        let sc = ScanConfig::choose(self.kernel, self.n)?;
        let blocks_x = self.d.div_ceil(sc.channels_per_block());
        if blocks_x > u32::MAX as usize || self.batch > 65_535 {
            bail!("fused CUDA Mamba: too many channels or batch items for one launch");
        }
        let lt = sc.tile_len(self.len);
        let smem = (lt * sc.smem_row_bytes()) as u32;
        let lt = lt as i32;
        let name = format!(
            "mamba_scan_{}_g{}_s{}_c{}",
            suffix(T::DTYPE)?,
            sc.g,
            sc.s,
            sc.ch
        );
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // SAFETY: every element is written by the kernel below (each block writes every
        // position of its channels).
        let out = unsafe { dev.alloc::<T>(total)? };
        with_cuda(a.delta_pre, "delta", |s1, l1| {
            with_cuda(a.delta_bias, "delta bias", |s2, l2| {
                with_cuda(a.a, "A", |s3, l3| {
                    with_cuda(a.bc, "x_proj output", |s4, l4| {
                        with_cuda(a.d_skip, "D", |s5, l5| {
                            with_cuda(a.z, "in_proj output", |s6, l6| {
                                let dpre = view::<T>(s1, l1, "delta")?;
                                let dbias = view::<T>(s2, l2, "delta bias")?;
                                let av = view::<T>(s3, l3, "A")?;
                                let bc = view::<T>(s4, l4, "x_proj output")?;
                                let dsk = view::<T>(s5, l5, "D")?;
                                let z = view::<T>(s6, l6, "in_proj output")?;
                                let mut lb = func.builder();
                                lb.arg(&u).arg(&dpre).arg(&dbias).arg(&av).arg(&bc);
                                lb.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]);
                                lb.arg(&dsk).arg(&z).arg(&ints[3]).arg(&ints[4]).arg(&out);
                                lb.arg(&ints[5]).arg(&ints[6]).arg(&ints[7]);
                                lb.arg(&lt).arg(&ints[8]);
                                let cfg = LaunchConfig {
                                    grid_dim: (blocks_x as u32, self.batch as u32, 1),
                                    block_dim: (SCAN_THREADS as u32, 1, 1),
                                    shared_mem_bytes: smem,
                                };
                                // SAFETY: argument types and counts match the kernel's
                                // signature; the views cover every index it reads (checked
                                // shapes and offsets).
                                unsafe { lb.launch(cfg) }.w()?;
                                Ok(())
                            })
                        })
                    })
                })
            })
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp1 for Scan<'_> {
    fn name(&self) -> &'static str {
        "danceba-mamba-selective-scan"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the fused CUDA selective scan runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.launch::<f32>(s, l)?,
            DType::F16 => self.launch::<half::f16>(s, l)?,
            DType::BF16 => self.launch::<half::bf16>(s, l)?,
            d => bail!("the fused CUDA Mamba kernels take f32, f16 or bf16, not {d:?}"),
        };
        Ok((out, Shape::from((self.batch, self.len, self.d))))
    }
}

/// `y = (C·h_t + D·u) ⊙ SiLU(z)` with `h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t` from `h_0 = 0`
/// and `Δ = softplus(delta_pre + delta_bias)`, for `u` (B, L, d). Returns (B, L, d).
pub fn selective_scan(u: &Tensor, args: &ScanArgs) -> Result<Tensor> {
    selective_scan_grouped(u, args, 1)
}

/// [`selective_scan`] with `groups` sets of per-channel weights: `a` (groups, d, n),
/// `delta_bias` and `d_skip` (groups, d); the batch splits into `groups` equal runs, run g
/// scanned with set g (the streams of a Block_Head in one launch).
pub fn selective_scan_grouped(u: &Tensor, args: &ScanArgs, groups: usize) -> Result<Tensor> {
    selective_scan_with(u, args, groups, ScanKernel::Auto)
}

/// [`selective_scan_grouped`] with the scan kernel chosen by `kernel` (for tests and
/// measurements; [`ScanKernel::Paired`] fails above 128 states).
pub fn selective_scan_with(
    u: &Tensor,
    args: &ScanArgs,
    groups: usize,
    kernel: ScanKernel,
) -> Result<Tensor> {
    let (batch, len, d) = u.dims3()?;
    let gb = per_group(batch, groups)?;
    let dt = u.dtype();
    let n = args.a.elem_count() / (groups * d).max(1);
    if !supports(n, dt) {
        bail!("fused CUDA Mamba: d_state {n} / {dt:?} is not supported (at most {MAX_D_STATE})");
    }
    check(args.a, dt, groups * d * n, "A")?;
    check(args.delta_pre, dt, batch * len * d, "delta")?;
    check(args.delta_bias, dt, groups * d, "delta bias")?;
    check(args.d_skip, dt, groups * d, "D")?;
    let (b2, l2, bc_stride) = args.bc.dims3()?;
    let (b3, l3, z_stride) = args.z.dims3()?;
    if (b2, l2) != (batch, len) || (b3, l3) != (batch, len) {
        bail!(
            "fused CUDA Mamba: x_proj {:?} / in_proj {:?} outputs do not match u {:?}",
            args.bc.dims(),
            args.z.dims(),
            u.dims()
        );
    }
    if args.b_offset + n > bc_stride || args.c_offset + n > bc_stride {
        bail!("fused CUDA Mamba: B/C columns exceed the x_proj width {bc_stride}");
    }
    if args.z_offset + d > z_stride {
        bail!("fused CUDA Mamba: z columns exceed the in_proj width {z_stride}");
    }
    check(args.bc, dt, batch * len * bc_stride, "x_proj output")?;
    check(args.z, dt, batch * len * z_stride, "in_proj output")?;
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
    u.contiguous()?.apply_op1_no_bwd(&Scan {
        args: &c,
        batch,
        len,
        d,
        n,
        bc_stride,
        z_stride,
        gb,
        kernel,
    })
}
