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
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage,
    Tensor, WithDType,
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

/// Checks that `t` has `x`'s shape (and, by [`prep`], its device and dtype) and makes it
/// contiguous.
fn like(t: &Tensor, x: &Tensor, what: &str) -> Result<Tensor> {
    if t.dims() != x.dims() {
        bail!(
            "fused CUDA op: {what} {:?} does not match {:?}",
            t.dims(),
            x.dims()
        );
    }
    prep(t, x.dtype(), x.elem_count(), what)
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
    /// `b` holds one bias row per group of `rows / groups` rows (none: no bias).
    BiasAct {
        b: Option<&'a Tensor>,
        g: Option<&'a Tensor>,
        r: Option<&'a Tensor>,
        act: Act,
        groups: usize,
    },
    SiluGate,
    SplitHeads {
        /// The projection's bias (3·H·hd), added on the way.
        bias: Option<&'a Tensor>,
        bsz: usize,
        n: usize,
        heads: usize,
        hd: usize,
    },
    Softmax {
        mask: &'a Tensor,
        /// The mask's rows (its width is the op's `n`).
        m: usize,
        scale: f32,
    },
    /// The GPT's input rows from the condition embedding (the op's input), the token tables and
    /// ids and the LPE output.
    Embed {
        tab_up: &'a Tensor,
        tab_down: &'a Tensor,
        up: &'a Tensor,
        down: &'a Tensor,
        lpe: &'a Tensor,
        bsz: usize,
        t: usize,
        scale: f32,
    },
    /// (A, M, N, D) → (A, N, M, D); with `p` (M, 3, C): the LPE's bias, batch norm and ReLU.
    SwapMid {
        a: usize,
        m: usize,
        n: usize,
        p: Option<&'a Tensor>,
        c: usize,
    },
}

/// The widest vector access (4, 2 or 1 values) that divides every row width in `widths` and
/// every operand's start offset (allocations themselves are 256-byte aligned).
fn vec_width(widths: &[usize], offsets: &[usize]) -> usize {
    [4, 2]
        .into_iter()
        .find(|v| widths.iter().chain(offsets).all(|x| x % v == 0))
        .unwrap_or(1)
}

/// The start offset of a contiguous operand (0 when absent).
fn start(t: Option<&Tensor>) -> usize {
    t.map_or(0, |t| t.layout().start_offset())
}

/// A 2-D launch for the row-wise kernels: `cols` vectors per row across x, rows across y (at
/// most 65535 blocks; the kernels loop over the rest), about 256 threads per block.
fn rows_cfg(rows: usize, cols: usize) -> LaunchConfig {
    let bx = if cols >= 32 {
        cols.next_multiple_of(32).min(256)
    } else {
        cols.next_power_of_two()
    };
    let by = (256 / bx).max(1);
    LaunchConfig {
        grid_dim: (
            cols.div_ceil(bx) as u32,
            rows.div_ceil(by).min(65535) as u32,
            1,
        ),
        block_dim: (bx as u32, by as u32, 1),
        shared_mem_bytes: 0,
    }
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
                let v = vec_width(
                    &[self.n],
                    &[xl.start_offset(), start(Some(*w)), start(*r), start(*rb)],
                );
                // one block per row, a vector per thread where the row allows (768: 192 threads)
                let threads = (self.n / v).next_multiple_of(32).min(NORM_THREADS as usize);
                let cfg = LaunchConfig {
                    grid_dim: (self.rows as u32, 1, 1),
                    block_dim: (threads as u32, 1, 1),
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
                                &format!("rmsnorm_{sfx}_v{v}"),
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
                                &format!("add_rmsnorm_{sfx}_v{v}"),
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
                let rows = as_i32(self.rows, "rows")?;
                let rpg = as_i32(self.rows / groups, "rows per group")?;
                let act = act_code(*act);
                let v = vec_width(
                    &[self.n],
                    &[xl.start_offset(), start(*b), start(*g), start(*r)],
                );
                // SAFETY: the kernel writes every output element (each row, every column).
                let out = unsafe { dev.alloc::<T>(total)? };
                let func =
                    dev.get_or_load_custom_func(&format!("bias_act_{sfx}_v{v}"), MODULE, PTX)?;
                let cfg = rows_cfg(self.rows, self.n / v);
                with_opt::<T, _>(*b, |bv| {
                    with_opt::<T, _>(*g, |gv| {
                        with_opt::<T, _>(*r, |rv| {
                            let null = 0u64;
                            let mut lb = func.builder();
                            lb.arg(&x);
                            for o in [bv, gv, rv] {
                                match o {
                                    Some(o) => lb.arg(o),
                                    None => lb.arg(&null),
                                };
                            }
                            lb.arg(&out).arg(&rows).arg(&n).arg(&act).arg(&rpg);
                            // SAFETY: argument types and counts match the kernel (null bias, gate
                            // and residual pointers are never read); the views cover every index
                            // it reads (bias groups × n, gate and residual rows × n elements,
                            // checked); every operand's start and n are multiples of v.
                            unsafe { lb.launch(cfg) }.w()?;
                            Ok(())
                        })
                    })
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::SplitHeads {
                bias,
                bsz,
                n,
                heads,
                hd,
            } => {
                let ints = [
                    as_i32(*bsz, "batch")?,
                    as_i32(*n, "positions")?,
                    as_i32(*heads, "heads")?,
                    as_i32(*hd, "head width")?,
                ];
                let v = vec_width(&[*hd], &[xl.start_offset(), start(*bias)]);
                // SAFETY: the kernel writes every output element (every input one once).
                let out = unsafe { dev.alloc::<T>(total)? };
                let func =
                    dev.get_or_load_custom_func(&format!("split_heads_{sfx}_v{v}"), MODULE, PTX)?;
                with_opt::<T, _>(*bias, |bv| {
                    let null = 0u64;
                    let mut lb = func.builder();
                    lb.arg(&x);
                    match bv {
                        Some(bv) => lb.arg(bv),
                        None => lb.arg(&null),
                    };
                    lb.arg(&out);
                    lb.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]);
                    // SAFETY: argument types and counts match the kernel; the input holds
                    // B × n × 3·H·hd elements, the bias 3·H·hd (checked; a null one is never
                    // read); hd and the starts are multiples of v.
                    unsafe { lb.launch(rows_cfg(bsz * n, 3 * heads * hd / v)) }.w()
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::Embed {
                tab_up,
                tab_down,
                up,
                down,
                lpe,
                bsz,
                t,
                scale,
            } => {
                let ints = [
                    as_i32(lpe.dims()[1], "LPE rows")?,
                    as_i32(*bsz, "batch")?,
                    as_i32(*t, "window")?,
                    n,
                    as_i32(tab_up.dims()[0], "upper-body vocabulary")?,
                    as_i32(tab_down.dims()[0], "lower-body vocabulary")?,
                ];
                let v = vec_width(
                    &[self.n],
                    &[
                        xl.start_offset(),
                        start(Some(tab_up)),
                        start(Some(tab_down)),
                        start(Some(lpe)),
                    ],
                );
                // SAFETY: the kernel writes every output element (each row, every column).
                let out = unsafe { dev.alloc::<T>(total)? };
                let func =
                    dev.get_or_load_custom_func(&format!("embed_{sfx}_v{v}"), MODULE, PTX)?;
                with_cuda(tab_up, |s1, l1| {
                    with_cuda(tab_down, |s2, l2| {
                        with_cuda(up, |s3, l3| {
                            with_cuda(down, |s4, l4| {
                                with_cuda(lpe, |s5, l5| {
                                    let (tu, td) = (view::<T>(s1, l1)?, view::<T>(s2, l2)?);
                                    let (iu, id) = (view::<u32>(s3, l3)?, view::<u32>(s4, l4)?);
                                    let lv = view::<T>(s5, l5)?;
                                    let mut lb = func.builder();
                                    lb.arg(&x).arg(&tu).arg(&td).arg(&iu).arg(&id).arg(&lv);
                                    lb.arg(&ints[0]).arg(scale).arg(&out);
                                    lb.arg(&ints[1]).arg(&ints[2]).arg(&ints[3]);
                                    lb.arg(&ints[4]).arg(&ints[5]);
                                    // SAFETY: argument types and counts match the kernel; the
                                    // views cover every index it reads (shapes checked: tables
                                    // (vocab, C), ids (B, t), LPE (B, rows ≥ 3t, C)); ids out of
                                    // a table are not read; C and the starts are multiples of v.
                                    unsafe { lb.launch(rows_cfg(self.rows, self.n / v)) }.w()
                                })
                            })
                        })
                    })
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::SwapMid { a, m, n: nn, p, c } => {
                let ints = [
                    as_i32(*a, "outer size")?,
                    as_i32(*m, "first swapped size")?,
                    as_i32(*nn, "second swapped size")?,
                    n,
                    as_i32(*c, "parameter width")?,
                ];
                let v = vec_width(&[self.n, *c], &[xl.start_offset(), start(*p)]);
                // SAFETY: the kernel writes every output element (every input one once).
                let out = unsafe { dev.alloc::<T>(total)? };
                let func =
                    dev.get_or_load_custom_func(&format!("swap_mid_{sfx}_v{v}"), MODULE, PTX)?;
                with_opt::<T, _>(*p, |pv| {
                    let null = 0u64;
                    let mut lb = func.builder();
                    lb.arg(&x).arg(&out);
                    lb.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]);
                    match pv {
                        Some(pv) => lb.arg(pv),
                        None => lb.arg(&null),
                    };
                    lb.arg(&ints[4]);
                    // SAFETY: argument types and counts match the kernel; the input holds
                    // A·M·N rows of D (checked), the parameters M × 3 × C with C dividing D
                    // (checked; a null pointer is never read); D, C and the starts are
                    // multiples of v.
                    unsafe { lb.launch(rows_cfg(self.rows, self.n / v)) }.w()?;
                    Ok(())
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::Softmax { mask, m, scale } => {
                let rows = as_i32(self.rows, "rows")?;
                let m = as_i32(*m, "mask rows")?;
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
                    lb.arg(&x)
                        .arg(&mv)
                        .arg(&out)
                        .arg(&rows)
                        .arg(&n)
                        .arg(&m)
                        .arg(scale);
                    // SAFETY: argument types and counts match the kernel; the mask holds
                    // m × n elements, the input rows × n (checked).
                    unsafe { lb.launch(cfg) }.w()?;
                    Ok(())
                })?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            Kind::SiluGate => {
                let rows = as_i32(self.rows, "rows")?;
                let v = vec_width(&[self.n], &[xl.start_offset()]);
                // SAFETY: the kernel writes every output element (each row, every column).
                let out = unsafe { dev.alloc::<T>(total)? };
                let func =
                    dev.get_or_load_custom_func(&format!("silu_gate_{sfx}_v{v}"), MODULE, PTX)?;
                let mut lb = func.builder();
                lb.arg(&x).arg(&out).arg(&rows).arg(&n);
                // SAFETY: argument types and counts match the kernel; the input holds
                // rows × 2n elements; n and its start are multiples of v.
                unsafe { lb.launch(rows_cfg(self.rows, self.n / v)) }.w()?;
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
    let r = like(r, x, "residual")?;
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
    let g = g.map(|g| like(g, x, "gate")).transpose()?;
    let r = r.map(|r| like(r, x, "residual")).transpose()?;
    x.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::BiasAct {
            b: Some(&b),
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

/// `r + x` (same shapes) as candle's add, on the row-wise kernel of [`bias_act`] (candle's
/// binary kernels index every element through the shapes and strides).
pub fn add(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (rows, n) = rows_and_width(x)?;
    let r = like(r, x, "residual")?;
    x.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::BiasAct {
            b: None,
            g: None,
            r: Some(&r),
            act: Act::Identity,
            groups: 1,
        },
        rows,
        n,
        out_shape: x.shape().clone(),
    })
}

/// The GPT's input rows (B, 3t, C): per batch item the condition embedding `ce` (B, t, C), the
/// rows of `tab_up` / `tab_down` (vocab, C) for the token ids `up` / `down` (B, t, u32, in
/// range: checked by the caller), each plus `T(lpe·scale)` for the first 3t rows of `lpe` (B,
/// rows, C); `scale` as candle's affine takes it (rounded to the dtype). One launch for the
/// concatenation, the two lookups, the position scale and the add (the same rounding).
#[allow(clippy::too_many_arguments)]
pub fn embed(
    ce: &Tensor,
    tab_up: &Tensor,
    tab_down: &Tensor,
    up: &Tensor,
    down: &Tensor,
    lpe: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (bsz, t, c) = ce.dims3()?;
    let dt = ce.dtype();
    let ok = tab_up.rank() == 2
        && tab_up.dim(1)? == c
        && tab_down.rank() == 2
        && tab_down.dim(1)? == c
        && up.dims() == [bsz, t]
        && down.dims() == [bsz, t]
        && up.dtype() == DType::U32
        && down.dtype() == DType::U32
        && lpe.rank() == 3
        && lpe.dim(0)? == bsz
        && lpe.dim(1)? >= 3 * t
        && lpe.dim(2)? == c
        && t > 0
        && c > 0;
    if !ok {
        bail!(
            "fused CUDA op: embedding inputs do not fit: ce {:?}, tables {:?} / {:?}, ids {:?} / {:?}, LPE {:?}",
            ce.dims(),
            tab_up.dims(),
            tab_down.dims(),
            up.dims(),
            down.dims(),
            lpe.dims()
        );
    }
    let tab_up = prep(tab_up, dt, tab_up.elem_count(), "upper-body table")?;
    let tab_down = prep(tab_down, dt, tab_down.elem_count(), "lower-body table")?;
    let lpe = prep(lpe, dt, lpe.elem_count(), "LPE output")?;
    let (up, down) = (up.contiguous()?, down.contiguous()?);
    if !up.device().is_cuda() || !down.device().is_cuda() {
        bail!("fused CUDA op: token ids are not on a CUDA device");
    }
    let scale = match dt {
        DType::F16 => half::f16::from_f64(scale).to_f32(),
        DType::BF16 => half::bf16::from_f64(scale).to_f32(),
        _ => scale as f32,
    };
    as_i32(bsz * 3 * t, "rows")?;
    ce.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::Embed {
            tab_up: &tab_up,
            tab_down: &tab_down,
            up: &up,
            down: &down,
            lpe: &lpe,
            bsz,
            t,
            scale,
        },
        rows: bsz * 3 * t,
        n: c,
        out_shape: Shape::from((bsz, 3 * t, c)),
    })
}

/// `x` (A, M, N, ..) with its axes 1 and 2 swapped, contiguous: (A, N, M, ..), the trailing
/// dimensions moved as whole rows (`x.transpose(1, 2)?.contiguous()` in one vectorised launch).
pub fn swap_mid(x: &Tensor) -> Result<Tensor> {
    swap_mid_op(x, None)
}

/// The LPE's tail for its three modules at once: `z` (3, B, F, C) the three linear outputs
/// (without bias), `p` (3, 3, C) each module's bias, batch-norm scale and shift; returns
/// `relu((z + bias)·scale + shift)` as (B, 3, F, C) (the modules' outputs concatenated per
/// batch item), with the rounding points of candle's broadcast ops.
pub fn lpe_bias_bn_relu(z: &Tensor, p: &Tensor) -> Result<Tensor> {
    let dims = z.dims();
    if dims.len() != 4 || p.dims() != [dims[0], 3, dims[3]] {
        bail!(
            "fused CUDA op: LPE outputs {:?} / parameters {:?} are not (M, B, F, C) / (M, 3, C)",
            dims,
            p.dims()
        );
    }
    let p = prep(p, z.dtype(), p.elem_count(), "LPE parameters")?;
    let (m, b, f, c) = (dims[0], dims[1], dims[2], dims[3]);
    // (1, M, B, F·C) → (1, B, M, F·C): the module index is the swapped axis M
    swap_mid_op(&z.reshape((1, m, b, f * c))?, Some(&p))?.reshape((b, m, f, c))
}

fn swap_mid_op(x: &Tensor, p: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 3 || x.elem_count() == 0 || !usable(x) {
        bail!(
            "fused CUDA op: cannot swap the middle axes of {:?} ({:?}, {:?})",
            dims,
            x.dtype(),
            x.device().location()
        );
    }
    let (a, m, n) = (dims[0], dims[1], dims[2]);
    let d: usize = dims[3..].iter().product();
    let c = p.map_or(d, |p| p.dims()[2]);
    if c == 0 || !d.is_multiple_of(c) || a * m * n > i32::MAX as usize || d > i32::MAX as usize {
        bail!("fused CUDA op: unsupported shape {dims:?}");
    }
    let mut out = dims.to_vec();
    out.swap(1, 2);
    x.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::SwapMid { a, m, n, p, c },
        rows: a * m * n,
        n: d,
        out_shape: Shape::from(out),
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
    split_heads_bias(qkv, None, heads)
}

/// [`split_heads`] of the projection without its bias, `bias` (3·H·hd) added on the way (as
/// the bias kernel would: the same rounding).
pub fn split_heads_bias(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
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
    let bias = match bias {
        Some(b) => Some(prep(b, qkv.dtype(), c3, "attention projection bias")?),
        None => None,
    };
    as_i32(bsz * n, "rows")?;
    let all = qkv.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::SplitHeads {
            bias: bias.as_ref(),
            bsz,
            n,
            heads,
            hd,
        },
        rows: 3 * bsz * heads * n,
        n: hd,
        out_shape: Shape::from((3, bsz, heads, n, hd)),
    })?;
    Ok((all.get(0)?, all.get(1)?, all.get(2)?))
}

/// `softmax(s · scale + mask)` over the last dimension for attention scores `s` (.., m, n)
/// and an additive mask (m, n), as candle's affine, broadcast_add and softmax_last_dim.
pub fn scale_mask_softmax(s: &Tensor, mask: &Tensor, scale: f32) -> Result<Tensor> {
    let (rows, n) = rows_and_width(s)?;
    let d = s.dims();
    let m = if d.len() < 2 { 0 } else { d[d.len() - 2] };
    if m == 0 || mask.dims() != [m, n] {
        bail!(
            "fused CUDA op: scores {:?} / mask {:?} are not (.., m, n) / (m, n)",
            d,
            mask.dims()
        );
    }
    let mask = prep(mask, s.dtype(), m * n, "mask")?;
    s.contiguous()?.apply_op1_no_bwd(&Op {
        kind: Kind::Softmax {
            mask: &mask,
            m,
            scale,
        },
        rows,
        n,
        out_shape: s.shape().clone(),
    })
}

/// `p·v` of one song's attention with the heads merged on the way: `p` (1, H, m, n) the softmax
/// of m queries over n keys, `v` (1, H, n, hd) the value heads; returns (1, m, H·hd). One cuBLAS
/// strided-batched GEMM that writes each head's block of columns in place (ldc = H·hd) instead
/// of a product and a merge launch; the same product as candle's matmul.
pub fn attention_pv_merged(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (pb, heads, m, n) = p.dims4()?;
    let (vb, vh, vn, hd) = v.dims4()?;
    if pb != 1 || vb != 1 || vh != heads || vn != n || hd == 0 || n == 0 || m == 0 {
        bail!(
            "fused CUDA op: attention p {:?} / v {:?} are not (1, H, m, n) / (1, H, n, hd)",
            p.dims(),
            v.dims()
        );
    }
    if !usable(p) || v.dtype() != p.dtype() || !v.device().is_cuda() {
        bail!("fused CUDA op: attention operands must be CUDA tensors of one float dtype");
    }
    if heads * m.max(n) * n.max(hd) > i32::MAX as usize {
        bail!("fused CUDA op: unsupported attention shape {:?}", p.dims());
    }
    p.contiguous()?
        .apply_op2_no_bwd(&v.contiguous()?, &PvMerged { heads, m, n, hd })
}

struct PvMerged {
    heads: usize,
    /// Queries (rows of the output).
    m: usize,
    /// Keys.
    n: usize,
    hd: usize,
}

impl PvMerged {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        ps: &CudaStorage,
        pl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
        dt: candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t,
    ) -> Result<CudaStorage> {
        use candle_core::cuda_backend::cudarc::cublas::{result, sys};
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        let dev = ps.device().clone();
        let p = view::<T>(ps, pl)?;
        let v = view::<T>(vs, vl)?;
        let (h, m, n, hd) = (self.heads, self.m, self.n, self.hd);
        let c = h * hd;
        // SAFETY: the GEMM writes every element (each head its hd columns of every row).
        let mut out = unsafe { dev.alloc::<T>(m * c)? };
        let blas = dev.cublas_handle();
        let stream = dev.cuda_stream();
        let (alpha, beta) = (1f32, 0f32);
        {
            let (pp, _gp) = p.device_ptr(&stream);
            let (vp, _gv) = v.device_ptr(&stream);
            let (op, _go) = out.device_ptr_mut(&stream);
            // column-major: O_hᵀ (hd × m, ld C) = V_hᵀ (hd × n, ld hd) · P_hᵀ (n × m, ld n)
            // SAFETY: the pointers cover H·n·hd (v), H·m·n (p) and m·C (out) elements, which
            // the strides and leading dimensions below stay within; f32 alpha/beta with an f32
            // compute type, as candle's GEMM calls.
            unsafe {
                result::gemm_strided_batched_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    hd as i32,
                    m as i32,
                    n as i32,
                    (&alpha) as *const f32 as *const _,
                    vp as *const _,
                    dt,
                    hd as i32,
                    (n * hd) as i64,
                    pp as *const _,
                    dt,
                    n as i32,
                    (m * n) as i64,
                    (&beta) as *const f32 as *const _,
                    op as *mut _,
                    dt,
                    c as i32,
                    hd as i64,
                    h as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .map_err(|e| candle_core::Error::Msg(format!("cuBLAS attention p·v: {e:?}")))?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp2 for PvMerged {
    fn name(&self) -> &'static str {
        "danceba-attention-pv-merged"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("the fused CUDA ops run on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        ps: &CudaStorage,
        pl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::cublas::sys::cudaDataType_t as Dt;
        let out = match ps.dtype() {
            DType::F32 => self.run::<f32>(ps, pl, vs, vl, Dt::CUDA_R_32F)?,
            DType::F16 => self.run::<half::f16>(ps, pl, vs, vl, Dt::CUDA_R_16F)?,
            DType::BF16 => self.run::<half::bf16>(ps, pl, vs, vl, Dt::CUDA_R_16BF)?,
            d => bail!("the fused CUDA ops take f32, f16 or bf16, not {d:?}"),
        };
        Ok((out, Shape::from((1, self.m, self.heads * self.hd))))
    }
}
