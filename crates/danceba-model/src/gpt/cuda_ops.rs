//! Fused CUDA kernels of the GPT's small ops (feature `cuda`): RMSNorm (optionally with the
//! residual add before it), the bias add after a GEMM with its activation and an optional
//! elementwise gate, the GatedMLP's `v ⊙ SiLU(g)`, the attention's q/k/v head split and its
//! scale + mask + softmax. Each replaces two to four of candle's
//! launches (`cuda_ops.cu`, compiled to PTX by the build script). f32 results are bit-identical
//! to candle's ops (same formulas and rounding points; RMSNorm sums in another order); f16/bf16
//! keep f32 arithmetic between the storage roundings.
//!
//! `DANCEBA_CUDA_FUSED_OPS=0|off|false|no` turns them off (candle's ops are used instead).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cuda_ops.ptx"));
const MODULE: &str = "danceba_gpt_cuda_ops";
const NORM_THREADS: u32 = 256;

/// Whether the fused ops are on (default) for this process (`DANCEBA_CUDA_FUSED_OPS`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !super::env_off("DANCEBA_CUDA_FUSED_OPS"))
}

/// Whether `t` can go through the fused ops: a CUDA tensor of f32/f16/bf16, ops enabled.
pub fn usable(t: &Tensor) -> bool {
    enabled() && t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
}

pub use super::block_base::Act;

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
        d => bail!("the fused CUDA ops take f32, f16 or bf16, not {d:?}"),
    })
}

fn as_i32(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{what} = {v} exceeds i32")))
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("fused CUDA op: input must be contiguous"),
    }
}

/// Checks that `t` is a CUDA tensor of `dtype` with `elems` elements and makes it contiguous.
fn prep(t: &Tensor, dtype: DType, elems: usize, what: &str) -> Result<Tensor> {
    if !t.device().is_cuda() {
        bail!("fused CUDA op: {what} is not on a CUDA device");
    }
    if t.dtype() != dtype {
        bail!(
            "fused CUDA op: {what} is {:?}, expected {dtype:?}",
            t.dtype()
        );
    }
    if t.elem_count() != elems {
        bail!(
            "fused CUDA op: {what} has shape {:?}, expected {elems} elements",
            t.dims()
        );
    }
    t.contiguous()
}

/// Runs `f` with the view of an optional operand.
fn with_opt<T: CudaDType, R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&CudaView<'_, T>>) -> Result<R>,
) -> Result<R> {
    match t {
        None => f(None),
        Some(t) => with_cuda(t, |s, l| f(Some(&view::<T>(s, l)?))),
    }
}

fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(cs) => f(cs, l),
        _ => bail!("fused CUDA op: input is not on a CUDA device"),
    }
}

/// Which kernel, and its extra inputs (contiguous, checked).
enum Kind<'a> {
    /// `rmsnorm(x)·w`, or with `r`: `[x + r, rmsnorm(x + r)·w]`; `w` holds one row of weights
    /// per group of `rows / groups` consecutive rows.
    Norm {
        w: &'a Tensor,
        r: Option<&'a Tensor>,
        /// A bias (n) added to `r` before the sum (with `r` only).
        rb: Option<&'a Tensor>,
        eps: f32,
        groups: usize,
    },
    /// `b` holds one bias row per group of `rows / groups` rows.
    BiasAct {
        b: &'a Tensor,
        g: Option<&'a Tensor>,
        r: Option<&'a Tensor>,
        act: Act,
        groups: usize,
    },
    SiluGate,
    SplitHeads {
        bsz: usize,
        n: usize,
        heads: usize,
        hd: usize,
    },
    Softmax {
        mask: &'a Tensor,
        n: usize,
        scale: f32,
    },
}

struct Op<'a> {
    kind: Kind<'a>,
    rows: usize,
    /// Row width of the output (for SiluGate: half the input's).
    n: usize,
    out_shape: Shape,
}

impl Op<'_> {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
    ) -> Result<CudaStorage> {
        let dev = xs.device().clone();
        let x = view::<T>(xs, xl)?;
        let n = as_i32(self.n, "row width")?;
        let total = self.rows * self.n;
        let sfx = suffix(T::DTYPE)?;
        match &self.kind {
            Kind::Norm {
                w,
                r,
                rb,
                eps,
                groups,
            } => {
                as_i32(self.rows, "rows")?;
                let rpg = as_i32(self.rows / groups, "rows per group")?;
                let cfg = LaunchConfig {
                    grid_dim: (self.rows as u32, 1, 1),
                    block_dim: (NORM_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let outs = if r.is_some() { 2 } else { 1 };
                // SAFETY: the kernel writes every output element (each row, every column).
                let out = unsafe { dev.alloc::<T>(outs * total)? };
                with_cuda(w, |ws, wl| {
                    let wv = view::<T>(ws, wl)?;
                    match r {
                        None => {
                            let func = dev.get_or_load_custom_func(
                                &format!("rmsnorm_{sfx}"),
                                MODULE,
                                PTX,
                            )?;
                            let mut lb = func.builder();
                            lb.arg(&x).arg(&wv).arg(&out).arg(&n).arg(eps).arg(&rpg);
                            // SAFETY: argument types and counts match the kernel; the views
                            // cover rows × n elements (checked shapes).
                            unsafe { lb.launch(cfg) }.w()?;
                            Ok(())
                        }
                        Some(r) => with_cuda(r, |rs, rl| {
                            let rv = view::<T>(rs, rl)?;
                            let func = dev.get_or_load_custom_func(
                                &format!("add_rmsnorm_{sfx}"),
                                MODULE,
                                PTX,
                            )?;
                            with_opt::<T, _>(*rb, |bv| {
                                let null = 0u64;
                                let mut lb = func.builder();
                                lb.arg(&x).arg(&rv);
                                match bv {
                                    Some(bv) => lb.arg(bv),
                                    None => lb.arg(&null),
                                };
                                lb.arg(&wv).arg(&out).arg(&n).arg(eps).arg(&rpg);
                                // SAFETY: as above (a null bias is never read; a bias holds n
                                // elements); the output holds 2 × rows × n elements.
                                unsafe { lb.launch(cfg) }.w()
                            })?;
                            Ok(())
                        }),
                    }
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::BiasAct {
                b,
                g,
                r,
                act,
                groups,
            } => {
                let total_i = total as i64;
                let gsize = (total / groups) as i64;
                let act = act_code(*act);
                // SAFETY: one thread per output element.
                let out = unsafe { dev.alloc::<T>(total)? };
                let func = dev.get_or_load_custom_func(&format!("bias_act_{sfx}"), MODULE, PTX)?;
                let cfg = LaunchConfig::for_num_elems(total as u32);
                with_cuda(b, |bs, bl| {
                    let bv = view::<T>(bs, bl)?;
                    with_opt::<T, _>(*g, |gv| {
                        with_opt::<T, _>(*r, |rv| {
                            let null = 0u64;
                            let mut lb = func.builder();
                            lb.arg(&x).arg(&bv);
                            match gv {
                                Some(gv) => lb.arg(gv),
                                None => lb.arg(&null),
                            };
                            match rv {
                                Some(rv) => lb.arg(rv),
                                None => lb.arg(&null),
                            };
                            lb.arg(&out).arg(&total_i).arg(&n).arg(&act).arg(&gsize);
                            // SAFETY: argument types and counts match the kernel (null gate and
                            // residual pointers are never read); the views cover every index
                            // it reads (gate and residual rows × n elements, checked).
                            unsafe { lb.launch(cfg) }.w()?;
                            Ok(())
                        })
                    })
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::SplitHeads { bsz, n, heads, hd } => {
                let total_i = total as i64;
                let ints = [
                    as_i32(*bsz, "batch")?,
                    as_i32(*n, "positions")?,
                    as_i32(*heads, "heads")?,
                    as_i32(*hd, "head width")?,
                ];
                // SAFETY: one thread per output element.
                let out = unsafe { dev.alloc::<T>(total)? };
                let func =
                    dev.get_or_load_custom_func(&format!("split_heads_{sfx}"), MODULE, PTX)?;
                let mut lb = func.builder();
                lb.arg(&x).arg(&out).arg(&total_i);
                lb.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]);
                // SAFETY: argument types and counts match the kernel; the input holds
                // B × n × 3·H·hd elements (checked).
                unsafe { lb.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::Softmax { mask, n: mn, scale } => {
                let rows = as_i32(self.rows, "rows")?;
                let mn = as_i32(*mn, "mask width")?;
                // SAFETY: the kernel writes every element of every row.
                let out = unsafe { dev.alloc::<T>(total)? };
                let func =
                    dev.get_or_load_custom_func(&format!("scale_mask_softmax_{sfx}"), MODULE, PTX)?;
                const WARPS: usize = 4;
                let cfg = LaunchConfig {
                    grid_dim: (self.rows.div_ceil(WARPS) as u32, 1, 1),
                    block_dim: (32, WARPS as u32, 1),
                    shared_mem_bytes: 0,
                };
                with_cuda(mask, |ms, ml| {
                    let mv = view::<T>(ms, ml)?;
                    let mut lb = func.builder();
                    lb.arg(&x).arg(&mv).arg(&out).arg(&rows).arg(&mn).arg(scale);
                    // SAFETY: argument types and counts match the kernel; the mask holds
                    // n × n elements, the input rows × n (checked).
                    unsafe { lb.launch(cfg) }.w()?;
                    Ok(())
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::SiluGate => {
                let total_i = total as i64;
                // SAFETY: one thread per output element.
                let out = unsafe { dev.alloc::<T>(total)? };
                let func = dev.get_or_load_custom_func(&format!("silu_gate_{sfx}"), MODULE, PTX)?;
                let mut lb = func.builder();
                lb.arg(&x).arg(&out).arg(&total_i).arg(&n);
                // SAFETY: argument types and counts match the kernel; the input holds
                // rows × 2n elements.
                unsafe { lb.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
        }
    }
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "danceba-gpt-cuda-op"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("the fused CUDA ops run on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match s.dtype() {
            DType::F32 => self.launch::<f32>(s, l)?,
            DType::F16 => self.launch::<half::f16>(s, l)?,
            DType::BF16 => self.launch::<half::bf16>(s, l)?,
            d => bail!("the fused CUDA ops take f32, f16 or bf16, not {d:?}"),
        };
        Ok((out, self.out_shape.clone()))
    }
}

fn rows_and_width(x: &Tensor) -> Result<(usize, usize)> {
    let n = match x.dims().last() {
        Some(&n) if n > 0 => n,
        _ => bail!("fused CUDA op: empty last dimension in {:?}", x.dims()),
    };
    let rows = x.elem_count() / n;
    if rows == 0 || x.elem_count() > u32::MAX as usize {
        bail!("fused CUDA op: unsupported shape {:?}", x.dims());
    }
    Ok((rows, n))
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension (`w`: (n)), as
/// `candle_nn::ops::rms_norm`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    rms_norm_grouped(x, w, eps, 1)
}

/// [`rms_norm`] with one weight row per group: `w` (groups, n) weights the rows of `x` in
/// `groups` equal runs of consecutive rows (`x` (groups, .., n): one stream per group).
pub fn rms_norm_grouped(x: &Tensor, w: &Tensor, eps: f32, groups: usize) -> Result<Tensor> {
    let (rows, n) = rows_and_width(x)?;
    check_groups(rows, groups)?;
    let w = prep(w, x.dtype(), groups * n, "norm weight")?;
    x.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::Norm {
            w: &w,
            r: None,
            rb: None,
            eps,
            groups,
        },
        rows,
        n,
        out_shape: x.shape().clone(),
    })
}

fn check_groups(rows: usize, groups: usize) -> Result<()> {
    if groups == 0 || !rows.is_multiple_of(groups) {
        bail!("fused CUDA op: {rows} rows do not split into {groups} equal groups");
    }
    Ok(())
}

/// `s = x + r` and `rms_norm(s, w, eps)` in one launch; returns `(s, norm)`.
pub fn add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    add_rms_norm_grouped(x, r, w, eps, 1)
}

/// [`add_rms_norm`] with one weight row per group of rows (as [`rms_norm_grouped`]).
pub fn add_rms_norm_grouped(
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f32,
    groups: usize,
) -> Result<(Tensor, Tensor)> {
    add_norm(x, r, None, w, eps, groups)
}

/// `s = x + (r + rb)` and `rms_norm(s, w, eps)` in one launch, `rb` (n) a bias added to `r`
/// first (a GEMM's bias, then the residual add: the rounding points of those two ops); returns
/// `(s, norm)`.
pub fn add_bias_rms_norm(
    x: &Tensor,
    r: &Tensor,
    rb: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    add_norm(x, r, Some(rb), w, eps, 1)
}

fn add_norm(
    x: &Tensor,
    r: &Tensor,
    rb: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
    groups: usize,
) -> Result<(Tensor, Tensor)> {
    let (rows, n) = rows_and_width(x)?;
    check_groups(rows, groups)?;
    if r.dims() != x.dims() {
        bail!(
            "fused CUDA op: residual {:?} does not match {:?}",
            r.dims(),
            x.dims()
        );
    }
    let r = prep(r, x.dtype(), rows * n, "residual")?;
    let rb = match rb {
        Some(b) => Some(prep(b, x.dtype(), n, "residual bias")?),
        None => None,
    };
    let w = prep(w, x.dtype(), groups * n, "norm weight")?;
    let mut dims = vec![2];
    dims.extend_from_slice(x.dims());
    let both = x.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::Norm {
            w: &w,
            r: Some(&r),
            rb: rb.as_ref(),
            eps,
            groups,
        },
        rows,
        n,
        out_shape: Shape::from(dims),
    })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `act(x + b)`, times `g` when given, over the last dimension (`b`: (n); `g`: `x`'s shape).
pub fn bias_act(x: &Tensor, b: &Tensor, act: Act, g: Option<&Tensor>) -> Result<Tensor> {
    bias_act_residual(x, b, act, g, None)
}

/// [`bias_act`] and then `r + ·` when a residual `r` (`x`'s shape) is given, in one launch.
pub fn bias_act_residual(
    x: &Tensor,
    b: &Tensor,
    act: Act,
    g: Option<&Tensor>,
    r: Option<&Tensor>,
) -> Result<Tensor> {
    bias_act_grouped(x, b, act, g, r, 1)
}

/// [`bias_act_residual`] with one bias row per group: `b` (groups, n) adds to the rows of `x`
/// in `groups` equal runs of consecutive rows (`x` (groups, .., n): stacked products).
pub fn bias_act_grouped(
    x: &Tensor,
    b: &Tensor,
    act: Act,
    g: Option<&Tensor>,
    r: Option<&Tensor>,
    groups: usize,
) -> Result<Tensor> {
    let (rows, n) = rows_and_width(x)?;
    check_groups(rows, groups)?;
    let b = prep(b, x.dtype(), groups * n, "bias")?;
    let same = |t: Option<&Tensor>, what: &str| -> Result<Option<Tensor>> {
        match t {
            Some(t) => {
                if t.dims() != x.dims() {
                    bail!(
                        "fused CUDA op: {what} {:?} does not match {:?}",
                        t.dims(),
                        x.dims()
                    );
                }
                Ok(Some(prep(t, x.dtype(), rows * n, what)?))
            }
            None => Ok(None),
        }
    };
    let g = same(g, "gate")?;
    let r = same(r, "residual")?;
    x.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::BiasAct {
            b: &b,
            g: g.as_ref(),
            r: r.as_ref(),
            act,
            groups,
        },
        rows,
        n,
        out_shape: x.shape().clone(),
    })
}

/// `h[.., :n] ⊙ SiLU(h[.., n:])` for `h` (.., 2n); returns (.., n).
pub fn silu_gate(h: &Tensor) -> Result<Tensor> {
    let (rows, n2) = rows_and_width(h)?;
    if n2 % 2 != 0 {
        bail!("fused CUDA op: odd gated width {n2}");
    }
    let mut dims = h.dims().to_vec();
    let last = dims.len() - 1;
    dims[last] = n2 / 2;
    h.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::SiluGate,
        rows,
        n: n2 / 2,
        out_shape: Shape::from(dims),
    })
}

/// Splits the fused attention projection `qkv` (B, n, 3·H·hd) into contiguous heads
/// q, k, v, each (B, H, n, hd), in one launch.
pub fn split_heads(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (bsz, n, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 || qkv.elem_count() == 0 {
        bail!(
            "fused CUDA op: cannot split {:?} into 3 × {heads} heads",
            qkv.dims()
        );
    }
    if qkv.elem_count() > u32::MAX as usize {
        bail!("fused CUDA op: unsupported shape {:?}", qkv.dims());
    }
    let hd = c3 / (3 * heads);
    let all = qkv.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::SplitHeads { bsz, n, heads, hd },
        rows: 3 * bsz * heads * n,
        n: hd,
        out_shape: Shape::from((3, bsz, heads, n, hd)),
    })?;
    Ok((all.get(0)?, all.get(1)?, all.get(2)?))
}

/// `softmax(s · scale + mask)` over the last dimension for attention scores `s` (.., n, n)
/// and an additive mask (n, n), as candle's affine, broadcast_add and softmax_last_dim.
pub fn scale_mask_softmax(s: &Tensor, mask: &Tensor, scale: f32) -> Result<Tensor> {
    let (rows, n) = rows_and_width(s)?;
    let d = s.dims();
    if d.len() < 2 || d[d.len() - 2] != n || mask.dims() != [n, n] {
        bail!(
            "fused CUDA op: scores {:?} / mask {:?} are not (.., n, n) / (n, n)",
            d,
            mask.dims()
        );
    }
    let mask = prep(mask, s.dtype(), n * n, "mask")?;
    s.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::Softmax {
            mask: &mask,
            n,
            scale,
        },
        rows,
        n,
        out_shape: s.shape().clone(),
    })
}
