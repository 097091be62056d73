//! The skinny GEMM of the GPT's linear layers on CUDA (feature `cuda`): `y = x·Wᵀ` for a few
//! rows (one window: 28 or 84 rows per song) with the bias, the activation, an elementwise gate
//! and a residual add fused into its epilogue (`cuda_gemm.cu`, compiled to PTX by the build
//! script). cuBLAS cuts such products into a few dozen 32×32 tiles and leaves most of the GPU
//! idle; here each block streams x and the weights through a cp.async pipeline in shared
//! memory, and K is split over blocks (a second kernel adds the partial sums in order) until the
//! GPU is busy. f32 runs on CUDA-core FMAs: register tiles of 16 rows × 2 or 4 columns per lane,
//! 32 × 64 or 32 × 128 per block ([`F32Kernel`]; the K-splitting kernel with 16 output columns
//! of 8 or 16 rows per block takes at most 8 rows), f16/bf16 on the tensor cores (m16n8k16
//! products, 32 columns of 16 rows per block).
//!
//! f32 results differ from cuBLAS only by the order of the K sum (deterministic: per-lane FMAs
//! in k order, fixed partial-sum trees, the K splits in order); f16/bf16 keep f32 sums and the
//! rounding points of the unfused path (GEMM result, bias, activation, gate, residual).
//!
//! The model uses it for every f32 product (measured on an H100 against cuBLAS: one song's
//! step 1.97–2.04 ms instead of 2.19–2.22, eight songs' 7.27–7.38 instead of 7.46–7.47 ms);
//! [`max_rows`] (`DANCEBA_CUDA_GEMM_MAX_ROWS`) limits it. In f16/bf16 the tensor-core kernel
//! and cuBLAS measured the same, so the default leaves them to cuBLAS; `DANCEBA_CUDA_GEMM=all`
//! takes every dtype (up to 32 rows), `DANCEBA_CUDA_GEMM=0|off|false|no` none ([`Mode`]).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};

use super::block_base::Act;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cuda_gemm.ptx"));
const MODULE: &str = "danceba_gpt_cuda_gemm";
/// Warps per block, each computing 4 output columns (`BN` = 16 in the kernel).
const WARPS: usize = 4;
/// k per staged chunk of x (`KT` in the kernel).
const KT: usize = 128;
/// Blocks to aim for: four per SM of an H100/H200 (132 SMs; registers and shared memory allow
/// four); K is split until there are.
const TARGET_BLOCKS: usize = 528;
/// Default of [`max_rows`] for the K-splitting kernels (f16/bf16 with `DANCEBA_CUDA_GEMM=all`,
/// f32 with `DANCEBA_CUDA_GEMM_F32=skinny`). On an H200 (f32, batch 1): 32 → 2.87 ms per step,
/// 128 (the 84-row base blocks too) → 2.96 ms, 16 (the ramp only) → 3.11 ms, cuBLAS only →
/// 3.14 ms.
pub const DEFAULT_MAX_ROWS: usize = 32;

/// Which dtypes the model's linear layers send to the skinny GEMM (`DANCEBA_CUDA_GEMM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `0`, `off`, `false`, `no`: cuBLAS for everything.
    Off,
    /// The default (unset or `auto`): f32 only. On an H200, batch 1, per step: f32 2.84–2.90 ms
    /// against 3.12 ms with cuBLAS; bf16 1.77 ms against 1.76 ms, f16 1.73 ms against 1.74 ms
    /// (the tensor-core kernel gains nothing over cuBLAS there).
    F32,
    /// `all`: every dtype (f16/bf16 on the tensor-core kernel, in builds for compute
    /// capability ≥ 8.0).
    All,
}

/// The mode of this process (`DANCEBA_CUDA_GEMM`: `0|off|false|no`, `auto` (default), `all`).
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| {
        if super::env_off("DANCEBA_CUDA_GEMM") {
            Mode::Off
        } else if super::env_value("DANCEBA_CUDA_GEMM") == "all" {
            Mode::All
        } else {
            Mode::F32
        }
    })
}

/// The most rows (per group) the model's `dtype` products send here; bigger ones go to cuBLAS.
/// `DANCEBA_CUDA_GEMM_MAX_ROWS` overrides the default: no limit for f32 on the register-tiled
/// kernels, [`DEFAULT_MAX_ROWS`] for the K-splitting ones.
pub fn max_rows(dtype: DType) -> usize {
    static N: OnceLock<Option<usize>> = OnceLock::new();
    let set = *N.get_or_init(|| super::env_usize("DANCEBA_CUDA_GEMM_MAX_ROWS"));
    set.unwrap_or(
        if dtype == DType::F32 && f32_kernel() != F32Kernel::Skinny {
            usize::MAX
        } else {
            DEFAULT_MAX_ROWS
        },
    )
}

/// The epilogue of one product.
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    /// Bias (N), added to the rounded product.
    pub bias: Option<&'a Tensor>,
    /// Activation after the bias.
    pub act: Act,
    /// Multiplies the activation elementwise (the output's shape).
    pub gate: Option<&'a Tensor>,
    /// Added last (the output's shape).
    pub residual: Option<&'a Tensor>,
}

/// The stride between the rows of `l` (its leading dimensions flattened) when its last
/// dimension is contiguous and the rows are evenly spaced: a contiguous tensor or a `narrow` of
/// the last dimension of one. Strides and start must keep 4-element alignment.
fn row_stride(l: &Layout) -> Option<usize> {
    let dims = l.dims();
    let strides = l.stride();
    let last = dims.len().checked_sub(1)?;
    if strides[last] != 1 && dims[last] > 1 {
        return None;
    }
    let ldx = if last == 0 {
        dims[0]
    } else {
        strides[last - 1]
    };
    for i in 0..last.saturating_sub(1) {
        if dims[i] > 1 && strides[i] != strides[i + 1] * dims[i + 1] {
            return None;
        }
    }
    (ldx >= dims[last] && ldx.is_multiple_of(4) && l.start_offset().is_multiple_of(4))
        .then_some(ldx)
}

/// Whether the model's linear layers use [`linear`] for `x` with the weight `w`: [`supports`],
/// at most [`max_rows`] rows (per group), and the [`mode`] takes the dtype.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    let dtype_on = match mode() {
        Mode::Off => false,
        Mode::F32 => x.dtype() == DType::F32,
        Mode::All => x.dtype() == DType::F32 || tensor_cores(),
    };
    dtype_on && supports(x, w) && group_shape(x, w).is_some_and(|g| g.rows <= max_rows(x.dtype()))
}

/// The product's shape: `groups` products of `rows` × `k` → `n`.
struct GroupShape {
    groups: usize,
    rows: usize,
    k: usize,
    n: usize,
}

/// Whether the model should still send `x` to [`linear`] when its rows are not contiguous (a
/// column slice) although [`applies`] says no for its dtype: one launch instead of a copy and a
/// cuBLAS call. Any dtype the build computes well (f32; f16/bf16 with tensor cores), at most
/// [`max_rows`] rows, unless `DANCEBA_CUDA_GEMM=0`.
pub fn takes_strided(x: &Tensor, w: &Tensor) -> bool {
    mode() != Mode::Off
        && (x.dtype() == DType::F32 || tensor_cores())
        && supports(x, w)
        && group_shape(x, w).is_some_and(|g| g.rows <= max_rows(x.dtype()))
}

/// The shape of `x` (.., K) times `w` (N, K) (one group), or of `x` (G, .., K) times `w`
/// (G, N, K) (group g: `x[g]·w[g]ᵀ`); `None` when they do not fit together.
fn group_shape(x: &Tensor, w: &Tensor) -> Option<GroupShape> {
    let &k = x.dims().last()?;
    let (groups, n, wk) = match *w.dims() {
        [n, wk] => (1, n, wk),
        [g, n, wk] if x.rank() >= 2 && x.dims()[0] == g => (g, n, wk),
        _ => return None,
    };
    (k == wk && k > 0 && groups > 0).then(|| GroupShape {
        groups,
        rows: x.elem_count() / k / groups,
        k,
        n,
    })
}

/// Whether [`linear`] can take `x` (.., K) with the weight `w` (N, K), or `x` (G, .., K) with
/// stacked weights `w` (G, N, K): a CUDA tensor of the weight's dtype (f32/f16/bf16), K and N
/// multiples of 4, rows evenly spaced (contiguous, or a `narrow` of the last dimension).
pub fn supports(x: &Tensor, w: &Tensor) -> bool {
    let Some(GroupShape { groups, rows, k, n }) = group_shape(x, w) else {
        return false;
    };
    x.device().is_cuda()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && row_stride(x.layout()).is_some()
        && k.is_multiple_of(4)
        && n.is_multiple_of(4)
        && n > 0
        && rows >= 1
        && rows <= i32::MAX as usize
        && groups <= u16::MAX as usize
}

struct Gemm<'a> {
    w: &'a Tensor,
    ep: Epilogue<'a>,
    /// Independent products, each with its own weights (rows of x, bias, gate, residual and
    /// output in `groups` equal consecutive blocks).
    groups: usize,
    /// Rows per group.
    rows: usize,
    k: usize,
    n: usize,
    out_shape: Shape,
    f32_kernel: F32Kernel,
}

/// The rows of `x` (layout `l`, rows evenly spaced by [`row_stride`]) and that stride.
fn rows_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    rows: usize,
    k: usize,
) -> Result<(CudaView<'a, T>, usize)> {
    let Some(ldx) = row_stride(l) else {
        bail!("CUDA skinny GEMM: the input's rows are not evenly spaced and aligned");
    };
    let a = l.start_offset();
    Ok((
        s.as_cuda_slice::<T>()?.slice(a..a + (rows - 1) * ldx + k),
        ldx,
    ))
}

fn act_code(act: Act) -> i32 {
    match act {
        Act::Identity => 0,
        Act::Silu => 1,
        Act::GeluErf => 2,
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        d => bail!("the CUDA skinny GEMM takes f32, f16 or bf16, not {d:?}"),
    })
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

/// A contiguous view whose start is a multiple of 4 elements (16/8-byte aligned quads).
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) if a.is_multiple_of(4) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        Some(_) => bail!("CUDA skinny GEMM: {what} does not start on a 4-element boundary"),
        None => bail!("CUDA skinny GEMM: {what} must be contiguous"),
    }
}

fn with_cuda<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(cs) => f(cs, l),
        _ => bail!("CUDA skinny GEMM: {what} is not on a CUDA device"),
    }
}

/// Runs `f` with the view of an optional operand (a null pointer when absent).
fn with_opt<T: CudaDType + DeviceRepr, R>(
    t: Option<&Tensor>,
    what: &str,
    f: impl FnOnce(Option<&CudaView<'_, T>>) -> Result<R>,
) -> Result<R> {
    match t {
        None => f(None),
        Some(t) => with_cuda(t, what, |s, l| f(Some(&view::<T>(s, l, what)?))),
    }
}

/// Whether the PTX was built for a GPU with the m16n8k16 tensor-core products (compute
/// capability ≥ 8.0, `CUDA_COMPUTE_CAP` at build time); before that the f16/bf16 kernel sums
/// its tiles with FMAs.
fn tensor_cores() -> bool {
    env!("DANCEBA_CUDA_COMPUTE_CAP")
        .parse::<u32>()
        .is_ok_and(|cap| cap >= 80)
}

/// The f32 kernel ([`f32_kernel`], `DANCEBA_CUDA_GEMM_F32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    /// The default: [`F32Kernel::Tile16x2`] for at most [`AUTO_16X2_ROWS`] rows per group (one
    /// song: more, smaller blocks), [`F32Kernel::Tile16x4`] above (batches: more FMAs per
    /// shared-memory load).
    Auto,
    /// `16x4`: register tiles of 16 rows × 4 columns per lane, 32 × 128 outputs per block of 8
    /// warps, every lane of a warp reading the same x values (`tile_gemm16x4_f32`).
    Tile16x4,
    /// `16x2`: 16 × 2 per lane, 32 × 64 per block (`tile_gemm16x2_f32`).
    Tile16x2,
    /// `skinny`: lanes splitting K, 4 columns of 8/16 rows per warp (`skinny_gemm{8,16}_f32`),
    /// at most [`DEFAULT_MAX_ROWS`] rows by default.
    Skinny,
}

/// Rows per group up to which [`F32Kernel::Auto`] takes the 16 × 2 tiles. H100, f32 batch 1
/// (28- and 84-row products): 16 × 2 1.97 / 1.97 ms per step, 16 × 4 2.04 / 2.02 ms; at batch 8
/// (224 and 672 rows) 16 × 4 ran 8.15 ms against 16 × 2's 8.85 ms (an earlier build).
pub const AUTO_16X2_ROWS: usize = 96;

impl F32Kernel {
    /// Every kernel, for tests.
    pub const ALL: [F32Kernel; 4] = [Self::Auto, Self::Tile16x4, Self::Tile16x2, Self::Skinny];

    /// (kernel name prefix, columns per block) of the register-tiled kernel for `rows` rows per
    /// group; `None` for the K-splitting one.
    fn tile(self, rows: usize) -> Option<(&'static str, usize)> {
        match self {
            Self::Auto if rows <= AUTO_16X2_ROWS => Self::Tile16x2.tile(rows),
            Self::Auto => Self::Tile16x4.tile(rows),
            Self::Tile16x4 => Some(("tile_gemm16x4_", 128)),
            Self::Tile16x2 => Some(("tile_gemm16x2_", 64)),
            Self::Skinny => None,
        }
    }
}

/// The f32 kernel of this process (`DANCEBA_CUDA_GEMM_F32`: `16x4`, `16x2`, `skinny`; by
/// default [`F32Kernel::Auto`]).
pub fn f32_kernel() -> F32Kernel {
    static K: OnceLock<F32Kernel> = OnceLock::new();
    *K.get_or_init(
        || match super::env_value("DANCEBA_CUDA_GEMM_F32").as_str() {
            "skinny" => F32Kernel::Skinny,
            "16x4" => F32Kernel::Tile16x4,
            "16x2" => F32Kernel::Tile16x2,
            _ => F32Kernel::Auto,
        },
    )
}

/// Rows per block of the register-tiled kernels (`TG_BM`).
const TILE_BM: usize = 32;
/// Threads per block of the register-tiled kernels (8 warps, `TG_THREADS`).
const TILE_THREADS: usize = 256;
/// k per chunk of the register-tiled kernels (`TG_KT`).
const TILE_KT: usize = 64;

/// Dynamic shared memory of a register-tiled kernel with `bn` columns per block: two pipeline
/// stages (`TG_STAGES`) of x and weight rows, `TG_KT + 4` floats each (`tg_stage`).
fn tile_smem(bn: usize) -> usize {
    2 * (TILE_BM + bn) * (TILE_KT + 4) * 4
}

/// A launch plan: the kernel, its block tile, K split and shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    /// Kernel name without the dtype suffix.
    name: &'static str,
    /// Rows per block.
    bm: usize,
    /// Columns per block.
    bn: usize,
    /// Threads per block.
    threads: usize,
    /// K splits (blocks along K, their partial sums added by `skinny_reduce`).
    splits: usize,
    /// k per split, a multiple of the kernel's chunk.
    kchunk: usize,
    /// Dynamic shared memory per block.
    smem: usize,
}

/// K splits for `tiles` blocks of `chunks` chunks each on `sms` SMs: the fewest that minimise
/// a cost in chunk times. An SM runs its share of the blocks (the most any SM gets) in the time
/// of their chunks, plus two per block for the pipeline fill and the epilogue, and a single
/// block leaves it under-used (measured: its warps issue about 60 % of what two blocks' do);
/// with splits comes the reduction (a launch, about two chunk times, and its traffic:
/// `outputs` floats per split at roughly 3 MB per chunk time).
fn tile_splits(tiles: usize, chunks: usize, sms: usize, outputs: usize) -> usize {
    let sms = sms.max(1);
    let cost = |s: usize| {
        let per_sm = (tiles * s).div_ceil(sms);
        let efficiency = if per_sm == 1 { 0.6 } else { 1.0 };
        let reduce = if s > 1 {
            2.0 + (s * outputs * 4) as f64 / 3e6
        } else {
            0.0
        };
        per_sm as f64 * (chunks.div_ceil(s) as f64 + 2.0) / efficiency + reduce
    };
    (1..=chunks.clamp(1, 64))
        .map(|s| (s, cost(s)))
        .fold(
            (1, f64::INFINITY),
            |best, (s, c)| if c < best.1 { (s, c) } else { best },
        )
        .0
}

/// The kernel's tiles for a product of `rows` × `k` → `n` in `dtype` on a GPU with `sms`
/// SMs. f32 runs on a register-tiled kernel (32 × 64 or 32 × 128 per block, [`F32Kernel`],
/// [`tile_splits`]) or, for at most 8 rows or when asked, the K-splitting FMA kernel (8/16 rows
/// × 16 columns); f16/bf16 on the tensor-core kernel (16 × 32). The latter two split K over
/// blocks (their partial sums added by a second kernel) until the `groups` products have
/// [`TARGET_BLOCKS`].
fn plan(
    groups: usize,
    rows: usize,
    k: usize,
    n: usize,
    dtype: DType,
    f32k: F32Kernel,
    sms: usize,
) -> Plan {
    let tile = match dtype {
        DType::F32 if rows > 8 => f32k.tile(rows),
        _ => None,
    };
    let (name, bm, bn) = match (dtype, tile) {
        (DType::F16 | DType::BF16, _) => ("skinny_mma_", 16, 32),
        (_, Some((name, bn))) => (name, TILE_BM, bn),
        _ if rows <= 8 => ("skinny_gemm8_", 8, 4 * WARPS),
        _ => ("skinny_gemm16_", 16, 4 * WARPS),
    };
    let tiles = groups * n.div_ceil(bn) * rows.div_ceil(bm);
    let (kt, threads, smem, splits) = if let Some((_, bn)) = tile {
        let chunks = k.div_ceil(TILE_KT);
        let outputs = groups * rows * n;
        let s = tile_splits(tiles, chunks, sms, outputs);
        (TILE_KT, TILE_THREADS, tile_smem(bn), s)
    } else {
        let s = TARGET_BLOCKS.div_ceil(tiles).clamp(1, k.div_ceil(KT));
        (KT, 32 * WARPS, 0, s)
    };
    // whole chunks per split, then as few splits as that needs
    let kchunk = k.div_ceil(kt).div_ceil(splits) * kt;
    Plan {
        name,
        bm,
        bn,
        threads,
        splits: k.div_ceil(kchunk),
        kchunk,
        smem,
    }
}

/// The number of SMs of the device (132 on an H100 SXM when the driver does not say).
fn sm_count(dev: &candle_core::CudaDevice) -> usize {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    dev.cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .unwrap_or(132)
}

impl Gemm<'_> {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = xs.device().clone();
        let (x, ldx) = rows_view::<T>(xs, xl, self.groups * self.rows, self.k)?;
        let Plan {
            name,
            bm,
            bn,
            threads,
            splits,
            kchunk,
            smem,
        } = plan(
            self.groups,
            self.rows,
            self.k,
            self.n,
            T::DTYPE,
            self.f32_kernel,
            sm_count(&dev),
        );
        if self.groups * splits > u16::MAX as usize {
            bail!(
                "CUDA skinny GEMM: {} products of input width {} are too many for one launch",
                self.groups,
                self.k
            );
        }
        let func =
            dev.get_or_load_custom_func(&format!("{name}{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        if smem > 48 * 1024 {
            // above the default limit: opt in (fails on GPUs with less shared memory per block)
            func.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .w()?;
        }
        let cfg = LaunchConfig {
            grid_dim: (
                as_i32(self.rows.div_ceil(bm), "row tiles")? as u32,
                as_i32(self.n.div_ceil(bn), "column blocks")? as u32,
                (self.groups * splits) as u32,
            ),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (m_i, n_i) = (as_i32(self.rows, "rows")?, as_i32(self.n, "output width")?);
        let ints = [
            as_i32(self.k, "input width")?,
            as_i32(ldx, "input row stride")?,
            as_i32(kchunk, "K chunk")?,
            act_code(self.ep.act),
        ];
        let total = self.groups * self.rows * self.n;
        let splits_i = splits as i32;
        // group strides of x (rows evenly spaced) and of the stacked weights
        let xg = (self.rows * ldx) as i64;
        let wg = (self.n * self.k) as i64;
        let groups_i = self.groups as i32;
        // SAFETY: every output element (group, row < rows, column < n) is written once, by the
        // GEMM (one split) or by the reduction; with splits every workspace element (group,
        // split, row, column) is written by the GEMM before the reduction reads it.
        let out = unsafe { dev.alloc::<T>(total)? };
        let ws = if splits > 1 {
            Some(unsafe { dev.alloc::<f32>(splits * total)? })
        } else {
            None
        };
        let null = 0u64;
        with_cuda(self.w, "weight", |wst, wl| {
            let wv = view::<T>(wst, wl, "weight")?;
            with_opt::<T, _>(self.ep.bias, "bias", |b| {
                with_opt::<T, _>(self.ep.gate, "gate", |g| {
                    with_opt::<T, _>(self.ep.residual, "residual", |r| {
                        // bias, gate, residual (null when absent), output
                        macro_rules! push_epilogue {
                            ($lb:expr) => {
                                match b {
                                    Some(b) => $lb.arg(b),
                                    None => $lb.arg(&null),
                                };
                                match g {
                                    Some(g) => $lb.arg(g),
                                    None => $lb.arg(&null),
                                };
                                match r {
                                    Some(r) => $lb.arg(r),
                                    None => $lb.arg(&null),
                                };
                                $lb.arg(&out);
                            };
                        }
                        let mut lb = func.builder();
                        lb.arg(&x).arg(&wv);
                        push_epilogue!(lb);
                        match &ws {
                            Some(ws) => lb.arg(ws),
                            None => lb.arg(&null),
                        };
                        lb.arg(&m_i).arg(&n_i);
                        for v in &ints {
                            lb.arg(v);
                        }
                        lb.arg(&splits_i).arg(&xg).arg(&wg);
                        // SAFETY: argument types and counts match the kernel; x holds groups ×
                        // rows rows of k (stride ldx), w groups × n × k, the bias groups × n,
                        // gate and residual groups × rows × n elements (checked by `linear`),
                        // the workspace groups × splits × rows × n; null pointers are never
                        // read (the workspace only with one split).
                        unsafe { lb.launch(cfg) }.w()?;
                        if let Some(ws) = &ws {
                            let reduce = dev.get_or_load_custom_func(
                                &format!("skinny_reduce_{}", suffix(T::DTYPE)?),
                                MODULE,
                                PTX,
                            )?;
                            let mut lb = reduce.builder();
                            lb.arg(ws);
                            push_epilogue!(lb);
                            lb.arg(&m_i).arg(&n_i).arg(&splits_i).arg(&ints[3]);
                            lb.arg(&groups_i);
                            // SAFETY: as above; one thread per output element.
                            unsafe { lb.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
                        }
                        Ok(())
                    })
                })
            })
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp1 for Gemm<'_> {
    fn name(&self) -> &'static str {
        "danceba-gpt-cuda-skinny-gemm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the CUDA skinny GEMM runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.launch::<f32>(s, l)?,
            DType::F16 => self.launch::<half::f16>(s, l)?,
            DType::BF16 => self.launch::<half::bf16>(s, l)?,
            d => bail!("the CUDA skinny GEMM takes f32, f16 or bf16, not {d:?}"),
        };
        Ok((out, self.out_shape.clone()))
    }
}

/// A contiguous copy of `t` (or `t`) checked to be a CUDA tensor of `dtype` with `dims`.
fn operand(t: &Tensor, dtype: DType, dims: &[usize], what: &str) -> Result<Tensor> {
    if !t.device().is_cuda() || t.dtype() != dtype || t.dims() != dims {
        bail!(
            "CUDA skinny GEMM: {what} is {:?} {:?} on {:?}, expected {dtype:?} {dims:?} on CUDA",
            t.dtype(),
            t.dims(),
            t.device().location()
        );
    }
    let t = t.contiguous()?;
    let aligned = t.layout().start_offset().is_multiple_of(4);
    Ok(if aligned { t } else { t.copy()? })
}

/// `epilogue(x · wᵀ)` for `x` (.., K) and `w` (N, K): (.., N); or, with stacked weights `w`
/// (G, N, K), `x[g]·w[g]ᵀ` for each g of `x` (G, .., K) in one launch, the bias then (G, N).
/// Errors unless [`supports`].
pub fn linear(x: &Tensor, w: &Tensor, ep: Epilogue) -> Result<Tensor> {
    linear_with(x, w, ep, f32_kernel())
}

/// [`linear`] with the given f32 kernel (f16/bf16 ignore it): for comparing the kernels.
pub fn linear_with(x: &Tensor, w: &Tensor, ep: Epilogue, f32k: F32Kernel) -> Result<Tensor> {
    let shape = group_shape(x, w).filter(|_| supports(x, w));
    let Some(GroupShape { groups, rows, k, n }) = shape else {
        bail!(
            "CUDA skinny GEMM: cannot take x {:?} {:?} with w {:?} {:?}",
            x.dtype(),
            x.dims(),
            w.dtype(),
            w.dims()
        );
    };
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = n;
    let dtype = x.dtype();
    let w = operand(w, dtype, w.dims(), "weight")?;
    let bias_dims: &[usize] = if w.rank() == 3 { &[groups, n] } else { &[n] };
    let bias = match ep.bias {
        Some(b) => Some(operand(b, dtype, bias_dims, "bias")?),
        None => None,
    };
    let gate = match ep.gate {
        Some(g) => Some(operand(g, dtype, &out_dims, "gate")?),
        None => None,
    };
    let residual = match ep.residual {
        Some(r) => Some(operand(r, dtype, &out_dims, "residual")?),
        None => None,
    };
    x.apply_op1_no_bwd(&Gemm {
        w: &w,
        ep: Epilogue {
            bias: bias.as_ref(),
            act: ep.act,
            gate: gate.as_ref(),
            residual: residual.as_ref(),
        },
        groups,
        rows,
        k,
        n,
        out_shape: Shape::from(out_dims),
        f32_kernel: f32k,
    })
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn plans_cover_k_and_fill_the_gpu() {
        use super::F32Kernel;
        use candle_core::DType;
        let kinds = F32Kernel::ALL.map(|k| (DType::F32, k)).into_iter().chain([
            (DType::F16, F32Kernel::Auto),
            (DType::BF16, F32Kernel::Auto),
        ]);
        for (dtype, f32k) in kinds {
            let plan = |g, rows, k, n| plan(g, rows, k, n, dtype, f32k, 132);
            for &(rows, k, n) in &[
                (28, 768, 6144),
                (28, 3072, 768),
                (28, 3072, 304),
                (28, 48, 3072),
                (84, 768, 2304),
                (84, 3072, 768),
                (672, 3072, 768),
                (1, 768, 512),
                (96, 3076, 12),
            ] {
                let p = plan(1, rows, k, n);
                assert!(p.bm >= rows.min(16), "{rows} rows in tiles of {}", p.bm);
                assert!(p.bn >= 16);
                assert!(p.splits >= 1);
                let tiled = p.name.starts_with("tile_gemm");
                let kt = if tiled { super::TILE_KT } else { super::KT };
                assert_eq!(p.kchunk % kt, 0);
                assert!(
                    p.splits * p.kchunk >= k && (p.splits - 1) * p.kchunk < k,
                    "{k}: {} × {}",
                    p.splits,
                    p.kchunk
                );
                assert_eq!(p.smem > 0, tiled);
                assert!(p.smem <= 227 * 1024);
            }
            // a narrow layer with a long K is split more than a wide one with a short K
            assert!(plan(1, 28, 3072, 768).splits > 2);
            assert!(plan(1, 28, 768, 6144).splits < plan(1, 28, 3072, 768).splits);
            // three stacked products fill the GPU with fewer splits each
            assert!(plan(3, 28, 3072, 768).splits < plan(1, 28, 3072, 768).splits);
        }
        // f32: the tiled kernel unless asked otherwise or for at most 8 rows
        let f32 = |rows, k, f32k| plan(1, rows, k, 768, DType::F32, f32k, 132);
        assert_eq!(f32(28, 768, F32Kernel::Tile16x4).name, "tile_gemm16x4_");
        assert_eq!(f32(28, 768, F32Kernel::Tile16x2).bn, 64);
        assert_eq!(f32(84, 768, F32Kernel::Auto).name, "tile_gemm16x2_");
        assert_eq!(f32(224, 768, F32Kernel::Auto).name, "tile_gemm16x4_");
        assert_eq!(f32(28, 768, F32Kernel::Skinny).name, "skinny_gemm16_");
        assert_eq!(f32(8, 768, F32Kernel::Tile16x4).name, "skinny_gemm8_");
        // a GPU with fewer SMs splits less
        let tile = |sms| plan(1, 84, 3072, 768, DType::F32, F32Kernel::Tile16x4, sms).splits;
        assert!(tile(16) < tile(132), "{} vs {}", tile(16), tile(132));
    }

    #[test]
    fn tile_splits_balance_the_sms() {
        use super::tile_splits;
        // few tiles, long K: split until the SMs are busy, within one wave
        let s = tile_splits(18, 48, 132, 84 * 768);
        assert!(s > 4 && 18 * s <= 264, "{s}");
        // enough tiles for every SM: no split
        assert_eq!(tile_splits(1008, 12, 132, 672 * 6144), 1);
        // one chunk: nothing to split
        assert_eq!(tile_splits(1, 1, 132, 32), 1);
    }
}
