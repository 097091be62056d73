//! `Block_Base` (temporal-gated causal attention, reference §3.4), and the small layers shared
//! by the GPT: linear layers and RMSNorm.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor, D};

use super::cpu_gemm;
use super::cpu_step::{grow, HostScratch};
use candle_nn::VarBuilder;

use super::Result;

/// RMSNorm epsilon of every norm in the GPT.
pub const RMS_EPS: f32 = 1e-6;

/// The activation after a linear layer ([`Lin::forward_act`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Identity,
    /// `candle_nn::ops::silu`.
    Silu,
    /// `Tensor::gelu_erf`.
    GeluErf,
}

/// A linear layer `y = x·Wᵀ (+ b)` on the last dimension, with inputs of any rank flattened to
/// one GEMM. The weight stays in the checkpoint's (out, in) layout and is used through a
/// transposed view: no copy at load time, and candle's CPU GEMM measured 3–4× faster on the
/// wide layers of a step this way than with a contiguous (in, out) copy.
#[derive(Debug, Clone)]
pub struct Lin {
    w: Tensor,
    b: Option<Tensor>,
    /// Host f32 copy of the bias for [`cpu_gemm`] (CPU weights only).
    b_host: Option<Vec<f32>>,
}

/// `f(data)` with the row-major f32 data of `t` when it is an f32 tensor on the CPU
/// (made contiguous first if needed); `None` otherwise.
pub(crate) fn with_host_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> Result<Option<R>>,
) -> Result<Option<R>> {
    if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 {
        return Ok(None);
    }
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match host_f32(&s, l) {
        Some(v) => f(v),
        None => Ok(None),
    }
}

/// The f32 data of a contiguous CPU tensor's storage.
fn host_f32<'a>(s: &'a Storage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

impl From<Act> for cpu_gemm::Act {
    fn from(a: Act) -> Self {
        match a {
            Act::Identity => cpu_gemm::Act::Identity,
            Act::Silu => cpu_gemm::Act::Silu,
            Act::GeluErf => cpu_gemm::Act::GeluErf,
        }
    }
}

impl Lin {
    /// Loads `{name}.weight` (out, in) and, when `bias`, `{name}.bias` (out).
    pub fn load(
        vb: &VarBuilder,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let vb = vb.pp(name);
        let w = vb.get((out_dim, in_dim), "weight")?;
        let b = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Self::new(w, b)
    }

    /// From the weight (out, in) and the optional bias (out).
    pub(crate) fn new(w: Tensor, b: Option<Tensor>) -> Result<Self> {
        let b_host = match (&b, w.device()) {
            (Some(b), Device::Cpu) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(Self { w, b, b_host })
    }

    /// The bias (out), if any.
    #[cfg(feature = "cuda")]
    pub(super) fn bias(&self) -> Option<&Tensor> {
        self.b.as_ref()
    }

    /// Replaces the bias by `b`, equal to it (a view of a stacked copy, see [`SharedWeight`]).
    #[cfg(feature = "cuda")]
    pub(super) fn share_bias(&mut self, b: Tensor) {
        debug_assert_eq!(Some(b.dims()), self.b.as_ref().map(|b| b.dims()));
        self.b = Some(b);
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.w.dims()[0]
    }

    /// `x·Wᵀ + b`. `x` in another dtype than the weight (f32 activations with f16/bf16
    /// weights) is rounded to the weight's dtype for the product and the result returned in
    /// `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, Act::Identity, None, None)
    }

    /// `act(self.forward(x))`, times `gate` (the output's shape) when given.
    pub fn forward_act(&self, x: &Tensor, act: Act, gate: Option<&Tensor>) -> Result<Tensor> {
        self.forward_fused(x, act, gate, None)
    }

    /// `residual + act(self.forward(x)) [· gate]` (`residual`: the output's shape), the one
    /// dispatcher of the products: on CUDA for few rows one launch of the skinny GEMM with all
    /// of it in its epilogue ([`super::cuda_gemm`]); on the CPU [`cpu_gemm`] with the same
    /// epilogue; elsewhere the unfused product, activation, gate and add.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        act: Act,
        gate: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if super::cuda_gemm::applies(x, &self.w) {
            let ep = super::cuda_gemm::Epilogue {
                bias: self.b.as_ref(),
                act,
                gate,
                residual,
            };
            return Ok(super::cuda_gemm::linear(x, &self.w, ep)?);
        }
        if let Some(y) = self.forward_cpu_gemm(x, act, gate, residual)? {
            return Ok(y);
        }
        self.unfused(x, act, gate, residual)
    }

    /// `residual + act(x·Wᵀ + b) [· gate]` without the fused GEMMs. On CUDA with a bias:
    /// cuBLAS and one fused bias + activation + gate + residual kernel ([`super::cuda_ops`]).
    fn unfused(
        &self,
        x: &Tensor,
        act: Act,
        gate: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(b) = &self.b {
            if super::cuda_ops::usable(x) && x.dtype() == self.w.dtype() {
                let dims = x.dims().to_vec();
                let last = dims.len() - 1;
                let rows: usize = dims[..last].iter().product();
                let mut out_dims = dims.clone();
                out_dims[last] = self.out_dim();
                let y = self.product_rows(x)?;
                let as_rows = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
                    Ok(match t {
                        Some(t) => Some(t.reshape((rows, self.out_dim()))?),
                        None => None,
                    })
                };
                let (g, r) = (as_rows(gate)?, as_rows(residual)?);
                let y = super::cuda_ops::bias_act_residual(&y, b, act, g.as_ref(), r.as_ref())?;
                return Ok(y.reshape(out_dims)?);
            }
        }
        let y = self.unfused_product(x)?;
        let y = match act {
            Act::Identity => y,
            Act::Silu => candle_nn::ops::silu(&y)?,
            Act::GeluErf => y.gelu_erf()?,
        };
        let y = match gate {
            Some(g) => (y * g)?,
            None => y,
        };
        Ok(match residual {
            Some(r) => (r + y)?,
            None => y,
        })
    }

    /// `x·Wᵀ + b` with [`cpu_gemm`] where it applies, else candle's matmul and add (on CUDA
    /// with a bias [`Lin::unfused`] has taken the fused bias kernel already).
    fn unfused_product(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu_gemm(x, Act::Identity, None, None)? {
            return Ok(y);
        }
        if let Some(y) = self.widened_product(x)? {
            return Ok(y);
        }
        if x.dtype() != self.w.dtype() {
            let y = self.forward(&x.to_dtype(self.w.dtype())?)?;
            return Ok(y.to_dtype(x.dtype())?);
        }
        self.forward_candle(x)
    }

    /// f32 activations and f16/bf16 weights on a CPU without our GEMM kernels (`accelerate`
    /// builds, `DANCEBA_CPU_GEMM=candle`): `x·Wᵀ + b` with the weights widened (exactly) for an f32
    /// product, as our kernels do, one matrix at a time. candle's own f16 product would round
    /// the activations to f16 and, on AArch64 CPUs with FP16 arithmetic (every Apple M-series
    /// chip), accumulate in f16 (gemm-f16's NEON kernel). `None` where this does not apply.
    fn widened_product(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !matches!(x.device(), Device::Cpu)
            || x.dtype() != DType::F32
            || !matches!(self.w.dtype(), DType::F16 | DType::BF16)
        {
            return Ok(None);
        }
        let b = self
            .b
            .as_ref()
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        Ok(Some(candle_product(
            x,
            &self.w.to_dtype(DType::F32)?,
            b.as_ref(),
        )?))
    }

    /// `x·Wᵀ` without the bias, as (rows, out) (`x`'s leading dimensions flattened): candle's
    /// matmul, i.e. cuBLAS on CUDA, for the fused launches that add the bias afterwards.
    #[cfg(feature = "cuda")]
    fn product_rows(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.w.dim(1)?;
        Ok(x.reshape((x.elem_count() / k, k))?.matmul(&self.w.t()?)?)
    }

    /// On CUDA where cuBLAS takes the product: `s = r + (x·Wᵀ + b)` and `norm(s)` as one GEMM
    /// and one launch (the rounding points of the separate ops), `s` shaped like the residual
    /// `r`; `None` where that does not apply.
    #[cfg(feature = "cuda")]
    fn add_norm_fused(
        &self,
        x: &Tensor,
        r: &Tensor,
        norm: &RmsNorm,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Some(b) = &self.b else {
            return Ok(None);
        };
        if !(super::cuda_ops::usable(x)
            && x.dtype() == self.w.dtype()
            && r.dtype() == self.w.dtype()
            && x.elem_count() / self.w.dim(1)? * self.out_dim() == r.elem_count()
            && !super::cuda_gemm::applies(x, &self.w))
        {
            return Ok(None);
        }
        let y = self.product_rows(x)?.reshape(r.dims())?;
        let nw = norm.weight().to_dtype(r.dtype())?;
        Ok(Some(super::cuda_ops::add_bias_rms_norm(
            r, &y, b, &nw, RMS_EPS,
        )?))
    }

    /// The same product with candle's matmul, whatever the device (the oracle of the tests).
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        candle_product(x, &self.w, self.b.as_ref())
    }

    /// `residual + act(x·Wᵀ + b) [· gate]` with [`cpu_gemm::linear_ep`] for f32 `x` (and
    /// `gate`, `residual`, of the output's shape) on the CPU with f32/f16/bf16 weights, at most
    /// [`cpu_gemm::max_rows`] rows, when the kernel is available; `None` otherwise.
    fn forward_cpu_gemm(
        &self,
        x: &Tensor,
        act: Act,
        gate: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let dims = x.dims();
        let Some((&k, lead)) = dims.split_last() else {
            return Ok(None);
        };
        let rows: usize = lead.iter().product();
        if k != self.w.dims()[1] {
            // candle's matmul reports the mismatch
            return Ok(None);
        }
        let mut out_dims = dims.to_vec();
        out_dims[lead.len()] = self.out_dim();
        let on_cpu_f32 = |t: &Tensor| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32;
        let extra_ok = |t: Option<&Tensor>| t.is_none_or(|t| on_cpu_f32(t) && t.dims() == out_dims);
        if rows > cpu_gemm::max_rows()
            || !on_cpu_f32(x)
            || !extra_ok(gate)
            || !extra_ok(residual)
            || !cpu_gemm::available()
        {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let gate = gate.map(|g| g.contiguous()).transpose()?;
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        let (xs, xl) = x.storage_and_layout();
        let gs = gate.as_ref().map(|g| g.storage_and_layout());
        let rs = residual.as_ref().map(|r| r.storage_and_layout());
        let Some(xv) = host_f32(&xs, xl) else {
            return Ok(None);
        };
        let g = match &gs {
            None => None,
            Some((g, l)) => match host_f32(g, l) {
                Some(v) => Some(v),
                None => return Ok(None),
            },
        };
        let r = match &rs {
            None => None,
            Some((r, l)) => match host_f32(r, l) {
                Some(v) => Some(v),
                None => return Ok(None),
            },
        };
        let y = self.linear_host(xv, rows, act, g, r)?;
        Ok(match y {
            Some(y) => Some(Tensor::from_vec(y, out_dims, x.device())?),
            None => None,
        })
    }

    /// [`cpu_gemm::linear_ep`] on host data: `x` (rows × in) row-major, `gate` and `residual`
    /// (rows × out). `None` when the kernel does not apply (not available, too many rows, the
    /// weight not on the CPU).
    pub(crate) fn linear_host(
        &self,
        x: &[f32],
        rows: usize,
        act: Act,
        gate: Option<&[f32]>,
        residual: Option<&[f32]>,
    ) -> Result<Option<Vec<f32>>> {
        if rows > cpu_gemm::max_rows() || !cpu_gemm::available() {
            return Ok(None);
        }
        // every value is written by the kernel where it runs
        let mut out = vec![0f32; rows * self.out_dim()];
        Ok(self
            .linear_into(x, rows, act, gate, residual, &mut out)?
            .then_some(out))
    }
}

impl Lin {
    /// [`Lin::linear_host`] into `out` (rows × out values): no allocation. `Ok(false)` (and
    /// `out` untouched) where the kernel does not apply.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn linear_into(
        &self,
        x: &[f32],
        rows: usize,
        act: Act,
        gate: Option<&[f32]>,
        residual: Option<&[f32]>,
        out: &mut [f32],
    ) -> Result<bool> {
        self.rows_into(x, rows, 0, self.out_dim(), act, gate, residual, out, true)
    }

    /// Output columns `j0..j1` of the layer (weight rows `j0..j1`, their bias) into `out`
    /// (rows × (j1 − j0)), on this thread alone when `!parallel`: each value the same as
    /// [`Lin::linear_into`]'s column (the kernel's sums do not depend on the neighbours).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rows_into(
        &self,
        x: &[f32],
        rows: usize,
        j0: usize,
        j1: usize,
        act: Act,
        gate: Option<&[f32]>,
        residual: Option<&[f32]>,
        out: &mut [f32],
        parallel: bool,
    ) -> Result<bool> {
        if !cpu_gemm::available() || (self.b.is_some() && self.b_host.is_none()) {
            return Ok(false);
        }
        let (n_all, k) = self.w.dims2()?;
        let n = j1.saturating_sub(j0);
        let sizes_ok = j0 <= j1
            && j1 <= n_all
            && x.len() == rows * k
            && out.len() == rows * n
            && gate.is_none_or(|g| g.len() == rows * n)
            && residual.is_none_or(|r| r.len() == rows * n);
        if !sizes_ok {
            return Err(candle_core::Error::Msg(format!(
                "linear layer {n_all}×{k}: host input of {} values for {rows} rows, columns \
                 {j0}..{j1} (or output/gate/residual not {rows}×{n})",
                x.len()
            ))
            .into());
        }
        let ep = cpu_gemm::Epilogue {
            bias: self.b_host.as_deref().map(|b| &b[j0..j1]),
            act: act.into(),
            gate,
            residual,
        };
        let (ws, wl) = self.w.storage_and_layout();
        let Some((w0, _)) = wl.contiguous_offsets() else {
            return Ok(false);
        };
        let (a, b) = (w0 + j0 * k, w0 + j1 * k);
        Ok(match &*ws {
            Storage::Cpu(CpuStorage::F32(w)) => {
                cpu_gemm::linear_ep_into(x, &w[a..b], rows, k, n, &ep, out, parallel)
            }
            Storage::Cpu(CpuStorage::F16(w)) => {
                cpu_gemm::linear_ep_into(x, &w[a..b], rows, k, n, &ep, out, parallel)
            }
            Storage::Cpu(CpuStorage::BF16(w)) => {
                cpu_gemm::linear_ep_into(x, &w[a..b], rows, k, n, &ep, out, parallel)
            }
            _ => false,
        })
    }
}

/// `x·wᵀ (+ b)` with candle's matmul, `x` of any rank flattened to rows on its last dimension.
fn candle_product(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = dims.len() - 1;
    let rows: usize = dims[..last].iter().product();
    let mut y = x.reshape((rows, dims[last]))?.matmul(&w.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    let mut out_dims = dims;
    out_dims[last] = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// RMSNorm (weight only): `v · rsqrt(mean(v²) + 1e-6) · w`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    w: Tensor,
    /// f32 copy of the weight for the host path (CPU weights only).
    w_host: Option<Vec<f32>>,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, name: &str, dim: usize) -> Result<Self> {
        let w = vb.pp(name).get(dim, "weight")?;
        let w_host = match w.device() {
            Device::Cpu => Some(w.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            _ => None,
        };
        Ok(Self { w, w_host })
    }

    /// The norm of each of the `rows` rows of `x` into `out` (same size), the f32 arithmetic
    /// of candle's CPU `rms_norm` (the sum of squares in order, `v / rms · w`): the same bits.
    /// `false` where there is no host weight (not on the CPU).
    pub(crate) fn forward_into(&self, x: &[f32], out: &mut [f32]) -> bool {
        use rayon::prelude::*;
        let Some(w) = self.w_host.as_deref() else {
            return false;
        };
        let n = w.len();
        assert!(n > 0 && x.len() == out.len() && x.len().is_multiple_of(n));
        let row = |(src, dst): (&[f32], &mut [f32])| {
            let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
            let m = (sum2 / n as f32 + RMS_EPS).sqrt();
            for ((d, &s), &a) in dst.iter_mut().zip(src).zip(w) {
                *d = s / m * a;
            }
        };
        if x.len() / n <= 32 {
            x.chunks_exact(n).zip(out.chunks_exact_mut(n)).for_each(row);
        } else {
            x.par_chunks_exact(n)
                .zip(out.par_chunks_exact_mut(n))
                .for_each(row);
        }
        true
    }

    /// In `x`'s dtype (the weight is converted if it differs).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.w.to_dtype(x.dtype())?; // the same tensor when the dtypes agree
        #[cfg(feature = "cuda")]
        if super::cuda_ops::usable(x) {
            return Ok(super::cuda_ops::rms_norm(x, &w, RMS_EPS)?);
        }
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &w, RMS_EPS)?)
    }

    /// `s = x + r` and `forward(s)`; returns `(s, forward(s))`. One fused kernel on CUDA.
    pub fn add_forward(&self, x: &Tensor, r: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if super::cuda_ops::usable(x) && r.dtype() == x.dtype() && r.dims() == x.dims() {
            let w = self.w.to_dtype(x.dtype())?;
            return Ok(super::cuda_ops::add_rms_norm(x, r, &w, RMS_EPS)?);
        }
        let s = (x + r)?;
        let n = self.forward(&s)?;
        Ok((s, n))
    }
}

thread_local! {
    /// [`attention_host`]'s per-task rows (a head's queries, keys, transposed values, scores
    /// and output), per thread: grown once, then reused.
    static ATTN: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where [`attention_host`] reads a head's rows: row `r` of song `bi` at
/// `data[(bi · rows + r) · stride + offset + head · head_size ..]`.
#[derive(Clone, Copy)]
struct HeadRows<'a> {
    data: &'a [f32],
    stride: usize,
    offset: usize,
    rows: usize,
}

/// `softmax(q·kᵀ · scale + mask)·v` for every song and head on host rows, the heads merged into
/// `out` (b · q.rows × c): queries from `q`, keys from `k` and values from `v` (each `k.rows`
/// = n rows per song), query row `r` at window position `q_pos(r)` (its mask row). The f32
/// operations of [`attention_probs`] (scores times the scale, plus the mask, the max, `exp`,
/// the sum, the division), with the products in [`cpu_gemm`] on the calling task (songs and
/// heads run in parallel). `false` where the kernel is not available.
#[allow(clippy::too_many_arguments)]
fn attention_host(
    q: HeadRows,
    k: HeadRows,
    v: HeadRows,
    q_pos: &(dyn Fn(usize) -> usize + Sync),
    b: usize,
    heads: usize,
    head_size: usize,
    mask: &[f32],
    scale: f32,
    out: &mut [f32],
) -> bool {
    use rayon::prelude::*;
    if !cpu_gemm::available() {
        return false;
    }
    let (mq, n, hd) = (q.rows, k.rows, head_size);
    let c = heads * hd;
    assert_eq!(out.len(), b * mq * c);
    assert_eq!(mask.len(), n * n);
    let dst = super::scan::OutPtr(out.as_mut_ptr());
    (0..b * heads).into_par_iter().for_each(|task| {
        let (bi, hh) = (task / heads, task % heads);
        ATTN.with(|buf| {
            let mut buf = buf.borrow_mut();
            let need = 2 * mq * hd + 2 * n * hd + mq * n;
            if buf.len() < need {
                buf.resize(need, 0.0);
            }
            let (qh, rest) = buf.split_at_mut(mq * hd);
            let (kh, rest) = rest.split_at_mut(n * hd);
            let (vt, rest) = rest.split_at_mut(n * hd);
            let (sc, rest) = rest.split_at_mut(mq * n);
            let oh = &mut rest[..mq * hd];
            fn row<'a>(h: HeadRows<'a>, bi: usize, hh: usize, hd: usize, r: usize) -> &'a [f32] {
                let at = (bi * h.rows + r) * h.stride + h.offset + hh * hd;
                &h.data[at..at + hd]
            }
            for r in 0..mq {
                qh[r * hd..(r + 1) * hd].copy_from_slice(row(q, bi, hh, hd, r));
            }
            for j in 0..n {
                kh[j * hd..(j + 1) * hd].copy_from_slice(row(k, bi, hh, hd, j));
                for (d, &val) in row(v, bi, hh, hd, j).iter().enumerate() {
                    vt[d * n + j] = val;
                }
            }
            let none = cpu_gemm::Epilogue::bias(None);
            cpu_gemm::linear_ep_into(qh, kh, mq, hd, n, &none, sc, false);
            for (r, srow) in sc.chunks_exact_mut(n).enumerate() {
                let mrow = &mask[q_pos(r) * n..(q_pos(r) + 1) * n];
                let mut max = f32::NEG_INFINITY;
                for (s, &m) in srow.iter_mut().zip(mrow) {
                    *s = *s * scale + m;
                    max = max.max(*s);
                }
                #[cfg(target_arch = "x86_64")]
                // SAFETY: our GEMM kernels run here (`available`), so AVX2 and FMA are there
                unsafe {
                    super::vmath::avx2::exp_shifted_in_place(srow, max)
                };
                #[cfg(target_arch = "aarch64")]
                super::vmath::neon::exp_shifted_in_place(srow, max);
                #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
                for s in srow.iter_mut() {
                    *s = (*s - max).exp();
                }
                // summed in order
                let mut sum = 0f32;
                for s in srow.iter() {
                    sum += *s;
                }
                for s in srow.iter_mut() {
                    *s /= sum;
                }
            }
            cpu_gemm::linear_ep_into(sc, vt, mq, n, hd, &none, oh, false);
            for r in 0..mq {
                // SAFETY: row r of song bi, columns of head hh: written by this task alone,
                // inside `out` (asserted sizes)
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        oh[r * hd..].as_ptr(),
                        dst.at((bi * mq + r) * c + hh * hd),
                        hd,
                    );
                }
            }
        });
    });
    true
}

/// The error of a host step whose kernel turned out not to apply (checked before it starts,
/// so an internal fault, not a bad input: reported as a failed operation).
pub(crate) fn host_unavailable(what: &str) -> super::GptError {
    candle_core::Error::Msg(format!(
        "internal error: the CPU host step cannot run {what} here (DANCEBA_CPU_STEP=candle \
         avoids it; please report this)"
    ))
    .into()
}

/// `layer.linear_into(..)`, an error where the kernel does not apply.
macro_rules! host_lin {
    ($layer:expr, $x:expr, $rows:expr, $act:expr, $gate:expr, $res:expr, $out:expr) => {
        if !$layer.linear_into($x, $rows, $act, $gate, $res, $out)? {
            return Err(host_unavailable("a linear layer"));
        }
    };
}
pub(crate) use host_lin;

/// Rows `t − 1`, `2t − 1` and `3t − 1` of each song's `3t` rows of `width` values in `src`,
/// into `dst` (b · 3 rows).
fn gather_last_rows(src: &[f32], b: usize, t: usize, width: usize, dst: &mut [f32]) {
    for bi in 0..b {
        for s in 0..3 {
            let from = (bi * 3 * t + (s + 1) * t - 1) * width;
            let to = (bi * 3 + s) * width;
            dst[to..to + width].copy_from_slice(&src[from..from + width]);
        }
    }
}

impl BlockBase {
    /// The block on host rows `x` (b songs of `n` rows × C, updated in place), `mask` its
    /// (n × n) host mask: [`BlockBase::forward`]'s operations with [`cpu_gemm`] and host
    /// norms and attention, no allocation once `sc` has grown to the shape.
    pub(crate) fn forward_host(
        &self,
        x: &mut [f32],
        b: usize,
        n: usize,
        mask: &[f32],
        sc: &mut HostScratch,
    ) -> Result<()> {
        let c = self.proj.out_dim();
        let rows = b * n;
        let hidden = self.fc1.out_dim();
        let a = grow(&mut sc.a, rows * c);
        if !self.norm1.forward_into(x, a) {
            return Err(host_unavailable("a norm"));
        }
        let g = grow(&mut sc.g, rows * c);
        host_lin!(self.act_proj, a, rows, Act::Silu, None, None, g);
        let h = grow(&mut sc.h, rows * c);
        host_lin!(self.in_proj, a, rows, Act::Silu, None, None, h);
        let qkv = grow(&mut sc.qkv, rows * 3 * c);
        host_lin!(self.qkv, h, rows, Act::Identity, None, None, qkv);
        let o = grow(&mut sc.o, rows * c);
        let at = |offset| HeadRows {
            data: qkv,
            stride: 3 * c,
            offset,
            rows: n,
        };
        let (heads, scale) = (self.n_head, self.scale_for(c));
        if !attention_host(
            at(0),
            at(c),
            at(2 * c),
            &|r| r,
            b,
            heads,
            c / heads,
            mask,
            scale,
            o,
        ) {
            return Err(host_unavailable("the attention"));
        }
        self.finish_host(x, b * n, sc, hidden)
    }

    /// [`BlockBase::forward_last`] on host rows `x` (b songs of 3t rows × C): `norm` of the
    /// block's output at the last row of each stream into `out` (b · 3 × C). The queries only
    /// at those rows (the keys and values at all: columns C..3C of the fused projection).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_last_host(
        &self,
        x: &[f32],
        b: usize,
        t: usize,
        mask: &[f32],
        norm: &RmsNorm,
        sc: &mut HostScratch,
        out: &mut [f32],
    ) -> Result<()> {
        let c = self.proj.out_dim();
        let n = 3 * t;
        let (rows, rl) = (b * n, b * 3);
        let hidden = self.fc1.out_dim();
        let a = grow(&mut sc.a, rows * c);
        if !self.norm1.forward_into(x, a) {
            return Err(host_unavailable("a norm"));
        }
        let al = grow(&mut sc.al, rl * c);
        gather_last_rows(a, b, t, c, al);
        let g = grow(&mut sc.g, rl * c);
        host_lin!(self.act_proj, al, rl, Act::Silu, None, None, g);
        let h = grow(&mut sc.h, rows * c);
        host_lin!(self.in_proj, a, rows, Act::Silu, None, None, h);
        let hl = grow(&mut sc.hl, rl * c);
        gather_last_rows(h, b, t, c, hl);
        let ql = grow(&mut sc.ql, rl * c);
        if !self
            .qkv
            .rows_into(hl, rl, 0, c, Act::Identity, None, None, ql, true)?
        {
            return Err(host_unavailable("a linear layer"));
        }
        let kv = grow(&mut sc.qkv, rows * 2 * c);
        if !self
            .qkv
            .rows_into(h, rows, c, 3 * c, Act::Identity, None, None, kv, true)?
        {
            return Err(host_unavailable("a linear layer"));
        }
        let o = grow(&mut sc.o, rl * c);
        let q = HeadRows {
            data: ql,
            stride: c,
            offset: 0,
            rows: 3,
        };
        let kv_at = |offset| HeadRows {
            data: kv,
            stride: 2 * c,
            offset,
            rows: n,
        };
        let (heads, scale) = (self.n_head, self.scale_for(c));
        let q_pos = |r: usize| (r + 1) * t - 1;
        if !attention_host(
            q,
            kv_at(0),
            kv_at(c),
            &q_pos,
            b,
            heads,
            c / heads,
            mask,
            scale,
            o,
        ) {
            return Err(host_unavailable("the attention"));
        }
        // the rows themselves leave `sc` while `finish_host` uses it (a move, no allocation)
        let mut y = std::mem::take(&mut sc.y);
        let yv = grow(&mut y, rl * c);
        gather_last_rows(x, b, t, c, yv);
        let done = self.finish_host(yv, rl, sc, hidden);
        let normed = norm.forward_into(yv, out);
        sc.y = y;
        done?;
        if !normed {
            return Err(host_unavailable("a norm"));
        }
        Ok(())
    }

    /// 1/√(head size) as the f32 factor candle's `Tensor * f64` applies, for rows of `c`.
    fn scale_for(&self, c: usize) -> f32 {
        (1.0 / ((c / self.n_head) as f64).sqrt()) as f32
    }

    /// [`BlockBase::finish`] on host rows: `x` (rows × C) becomes the block's output, from the
    /// merged heads `sc.o` and the gate `sc.g` (both rows × C).
    fn finish_host(
        &self,
        x: &mut [f32],
        rows: usize,
        sc: &mut HostScratch,
        hidden: usize,
    ) -> Result<()> {
        let c = self.proj.out_dim();
        let (o, g) = (&sc.o[..rows * c], &sc.g[..rows * c]);
        let yg = grow(&mut sc.yg, rows * c);
        host_lin!(self.proj, o, rows, Act::Identity, Some(g), None, yg);
        let s = grow(&mut sc.s, rows * c);
        host_lin!(self.out_proj, yg, rows, Act::Identity, None, Some(&*x), s);
        let m = grow(&mut sc.m, rows * c);
        if !self.norm2.forward_into(s, m) {
            return Err(host_unavailable("a norm"));
        }
        let f = grow(&mut sc.f, rows * hidden);
        host_lin!(self.fc1, m, rows, Act::GeluErf, None, None, f);
        host_lin!(self.fc2, f, rows, Act::Identity, None, Some(s), x);
        Ok(())
    }
}

/// The last position's row of each of the three streams of `v`, whose dimension `dim` holds
/// the window's 3t rows: that dimension becomes 3 (one strided copy).
fn last_rows(v: &Tensor, dim: usize, t: usize) -> Result<Tensor> {
    let mut split = v.dims().to_vec();
    split.splice(dim..=dim, [3, t]);
    let mut out = v.dims().to_vec();
    out[dim] = 3;
    Ok(v.reshape(split)?
        .narrow(dim + 1, t - 1, 1)?
        .contiguous()?
        .reshape(out)?)
}

/// `p·v` with the heads merged: `p` (B, H, m, n) the attention weights, `v` (B, H, n, hd) the
/// value heads; returns (B, m, H·hd). On CUDA one song's product writes the heads merged (one
/// GEMM), a batch's are merged by one vectorised launch (candle's strided copy is ~4× slower).
fn attend(p: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, heads, m, _) = p.dims4()?;
    let c = heads * v.dim(3)?;
    #[cfg(feature = "cuda")]
    if super::cuda_ops::usable(p) && v.dtype() == p.dtype() {
        use super::cuda_ops;
        return Ok(if b == 1 {
            cuda_ops::attention_pv_merged(p, v)?
        } else {
            cuda_ops::swap_mid(&p.matmul(v)?)?.reshape((b, m, c))?
        });
    }
    Ok(p.matmul(v)?.transpose(1, 2)?.reshape((b, m, c))?)
}

/// `softmax(s · scale + mask)` over the last dimension: `s` the raw scores (B, H, m, n), `mask`
/// additive (m, n). One fused launch on CUDA. On the CPU candle's softmax sums in the tensor's
/// own type: in f16/bf16 it is taken in f32 (the CUDA kernel accumulates in f32 already).
fn attention_probs(s: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda_ops::usable(s) && mask.dtype() == s.dtype() {
        return Ok(super::cuda_ops::scale_mask_softmax(s, mask, scale as f32)?);
    }
    let dt = s.dtype();
    let s = (s * scale)?;
    Ok(if dt != DType::F32 && matches!(s.device(), Device::Cpu) {
        let s = s
            .to_dtype(DType::F32)?
            .broadcast_add(&mask.to_dtype(DType::F32)?)?;
        candle_nn::ops::softmax_last_dim(&s)?.to_dtype(dt)?
    } else {
        candle_nn::ops::softmax_last_dim(&s.broadcast_add(mask)?)?
    })
}

/// The additive attention mask of a window of `t` positions per stream: allowed(i, j) ⇔
/// (j mod t) ≤ (i mod t) over the 3t × 3t rows (the causal mask tiled 3×3).
pub fn tiled_causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let n = 3 * t;
    let mut m = vec![0f32; n * n];
    tiled_causal_mask_host(t, &mut m);
    Ok(Tensor::from_vec(m, (n, n), device)?)
}

/// [`tiled_causal_mask`]'s values into `m` (3t × 3t).
pub(crate) fn tiled_causal_mask_host(t: usize, m: &mut [f32]) {
    let n = 3 * t;
    assert_eq!(m.len(), n * n);
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = if j % t > i % t {
                f32::NEG_INFINITY
            } else {
                0.0
            };
        }
    }
}

/// A layer's weight that CUDA paths stack with its siblings' (the head's three streams,
/// act_proj with in_proj): the layer then keeps a view of the stack, so that the two share
/// memory.
#[cfg(feature = "cuda")]
pub(super) trait SharedWeight {
    /// The weight ((out, in) for a `Lin`).
    fn weight(&self) -> &Tensor;
    /// Replaces the weight by `w`, equal to it (a view of the stacked copy).
    fn share_weight(&mut self, w: Tensor);
}

/// [`SharedWeight`] for layers whose weight is their field `w`.
macro_rules! shared_weight_field {
    ($($t:ty),*) => {$(
        #[cfg(feature = "cuda")]
        impl SharedWeight for $t {
            fn weight(&self) -> &Tensor {
                &self.w
            }
            fn share_weight(&mut self, w: Tensor) {
                debug_assert_eq!(w.dims(), self.w.dims());
                self.w = w;
            }
        }
    )*};
}
shared_weight_field!(Lin, RmsNorm);

#[cfg(feature = "cuda")]
impl SharedWeight for Tensor {
    fn weight(&self) -> &Tensor {
        self
    }
    fn share_weight(&mut self, w: Tensor) {
        debug_assert_eq!(w.dims(), self.dims());
        *self = w;
    }
}

/// `Block_Base`.
#[derive(Debug, Clone)]
pub struct BlockBase {
    norm1: RmsNorm,
    norm2: RmsNorm,
    in_proj: Lin,
    act_proj: Lin,
    out_proj: Lin,
    /// Fused query/key/value projection (C → 3C).
    qkv: Lin,
    proj: Lin,
    fc1: Lin,
    fc2: Lin,
    n_head: usize,
    /// On CUDA: act_proj's and in_proj's weights (2, C, C) and biases (2, C) stacked (the two
    /// `Lin`s keep views), so that both products of the block's normed input are one batched
    /// GEMM and one bias + SiLU launch.
    #[cfg(feature = "cuda")]
    gate_in: Option<(Tensor, Tensor)>,
}

impl BlockBase {
    pub fn load(vb: VarBuilder, n_embd: usize, n_head: usize, mlp_hidden: usize) -> Result<Self> {
        let c = n_embd;
        let attn = vb.pp("attn");
        let q = Lin::load(&attn, "query", c, c, true)?;
        let k = Lin::load(&attn, "key", c, c, true)?;
        let v = Lin::load(&attn, "value", c, c, true)?;
        let qkv = Lin::new(
            Tensor::cat(&[&q.w, &k.w, &v.w], 0)?,
            match (q.b, k.b, v.b) {
                (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
                _ => None,
            },
        )?;
        #[allow(unused_mut)]
        let mut in_proj = Lin::load(&vb, "in_proj", c, c, true)?;
        #[allow(unused_mut)]
        let mut act_proj = Lin::load(&vb, "act_proj", c, c, true)?;
        #[cfg(feature = "cuda")]
        let gate_in = match (act_proj.bias(), in_proj.bias()) {
            (Some(ba), Some(bi)) if vb.device().is_cuda() => {
                let w = Tensor::stack(&[act_proj.weight(), in_proj.weight()], 0)?;
                let b = Tensor::stack(&[ba, bi], 0)?;
                act_proj.share_weight(w.get(0)?);
                in_proj.share_weight(w.get(1)?);
                act_proj.share_bias(b.get(0)?);
                in_proj.share_bias(b.get(1)?);
                Some((w, b))
            }
            _ => None,
        };
        Ok(Self {
            norm1: RmsNorm::load(&vb, "norm1", c)?,
            norm2: RmsNorm::load(&vb, "norm2", c)?,
            in_proj,
            act_proj,
            out_proj: Lin::load(&vb, "out_proj", c, c, true)?,
            qkv,
            proj: Lin::load(&attn, "proj", c, c, true)?,
            fc1: Lin::load(&vb, "mlp.0", c, mlp_hidden, true)?,
            fc2: Lin::load(&vb, "mlp.2", mlp_hidden, c, true)?,
            n_head,
            #[cfg(feature = "cuda")]
            gate_in,
        })
    }

    /// `silu(act_proj(a))` and `silu(in_proj(a))`. On CUDA, where the skinny GEMM does not take
    /// them, one batched cuBLAS GEMM of `a` with the stacked weights and one bias + SiLU launch
    /// (the same products and rounding points as two of each).
    fn gate_and_input(&self, a: &Tensor) -> Result<(Tensor, Tensor)> {
        if let Some(both) = self.gate_and_input_stacked(a)? {
            return Ok(both);
        }
        Ok((
            self.act_proj.forward_act(a, Act::Silu, None)?,
            self.in_proj.forward_act(a, Act::Silu, None)?,
        ))
    }

    /// [`BlockBase::gate_and_input`] where its two products are one GEMM (on CUDA where
    /// cuBLAS takes them); `None` elsewhere.
    fn gate_and_input_stacked(&self, a: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        #[cfg(feature = "cuda")]
        if let Some((w, b)) = &self.gate_in {
            if super::cuda_ops::usable(a)
                && a.dtype() == w.dtype()
                && !super::cuda_gemm::applies(a, self.act_proj.weight())
            {
                let dims = a.dims();
                let c = dims[dims.len() - 1];
                let rows = a.elem_count() / c;
                let y = a
                    .reshape((1, rows, c))?
                    .broadcast_as((2, rows, c))?
                    .matmul(&w.transpose(1, 2)?)?;
                let z = super::cuda_ops::bias_act_grouped(&y, b, Act::Silu, None, None, 2)?;
                let out = w.dims()[1];
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("a has a last dimension") = out;
                return Ok(Some((
                    z.get(0)?.reshape(&*out_dims)?,
                    z.get(1)?.reshape(out_dims)?,
                )));
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = a;
        Ok(None)
    }

    /// `x`: (B, 3t, C); `mask`: (3t, 3t) additive mask from [`tiled_causal_mask`].
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        Ok(self.forward_parts(x, None, mask, None)?.0)
    }

    /// `blocks` one after another. On CUDA each block's last product (fc2), its bias, the
    /// residual add and the next block's first norm are one cuBLAS GEMM and one launch (the
    /// rounding points of the separate ops).
    pub fn forward_chain(blocks: &[BlockBase], x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let mut a = None;
        for (i, blk) in blocks.iter().enumerate() {
            let next = blocks.get(i + 1).map(|n| &n.norm1);
            (x, a) = blk.forward_parts(&x, a, mask, next)?;
        }
        Ok(x)
    }

    /// The block and then `norm` of its output: `(output, Some(norm))` where the two were fused
    /// (CUDA, cuBLAS taking fc2), else `(output, None)`.
    pub fn forward_then_norm(
        &self,
        x: &Tensor,
        mask: &Tensor,
        norm: &RmsNorm,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_parts(x, None, mask, Some(norm))
    }

    /// The block on `x`, `a` its first norm when the previous block computed it already;
    /// returns the output and, where it fused them, `next`'s norm of it.
    fn forward_parts(
        &self,
        x: &Tensor,
        a: Option<Tensor>,
        mask: &Tensor,
        next: Option<&RmsNorm>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let a = match a {
            Some(a) => a,
            None => self.norm1.forward(x)?,
        };
        let (g, h) = self.gate_and_input(&a)?;
        let (q, k, v) = self.heads(&h)?;
        let p = attention_probs(&q.matmul(&k.t()?)?, mask, self.scale(x)?)?;
        let o = attend(&p, &v)?;
        self.finish(x, &o, &g, next)
    }

    /// The block's output at the last position of each of the window's three streams only,
    /// then `norm` of it: (B, 3, C) from `x` (B, 3t, C), equal to the rows t − 1, 2t − 1 and
    /// 3t − 1 of [`BlockBase::forward`] followed by `norm`. The keys and values need every
    /// row's input projection; the gate, the attention's output and all that follows it only
    /// these rows (the GPT's last block, whose logits are read at one row per stream: about 5 %
    /// of a step's products).
    pub fn forward_last(
        &self,
        x: &Tensor,
        mask: &Tensor,
        t: usize,
        norm: &RmsNorm,
    ) -> Result<Tensor> {
        let (_, n, _) = x.dims3()?;
        if t == 0 || n != 3 * t {
            return Err(candle_core::Error::Msg(format!(
                "a window of {n} rows is not three streams of {t} positions"
            ))
            .into());
        }
        let a = self.norm1.forward(x)?;
        // the gate at the chosen rows: of all rows where one GEMM gives it with the input
        let (g, h) = match self.gate_and_input_stacked(&a)? {
            Some((g, h)) => (last_rows(&g, 1, t)?, h),
            None => (
                self.act_proj
                    .forward_act(&last_rows(&a, 1, t)?, Act::Silu, None)?,
                self.in_proj.forward_act(&a, Act::Silu, None)?,
            ),
        };
        let (q, k, v) = self.heads(&h)?;
        let p = attention_probs(
            &last_rows(&q, 2, t)?.matmul(&k.t()?)?,
            &last_rows(mask, 0, t)?,
            self.scale(x)?,
        )?;
        let o = attend(&p, &v)?;
        Ok(
            match self.finish(&last_rows(x, 1, t)?, &o, &g, Some(norm))? {
                (_, Some(normed)) => normed,
                (y, None) => norm.forward(&y)?,
            },
        )
    }

    /// 1/√(head size) for the input `x` (B, n, C).
    fn scale(&self, x: &Tensor) -> Result<f64> {
        Ok(1.0 / ((x.dim(2)? / self.n_head) as f64).sqrt())
    }

    /// The attention heads q, k, v, each (B, H, n, hd), of `h` (B, n, C). On CUDA one product
    /// and one launch that splits the heads (adding the bias where cuBLAS took the product).
    fn heads(&self, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, n, c) = h.dims3()?;
        #[cfg(feature = "cuda")]
        if super::cuda_ops::usable(h) {
            use super::cuda_ops;
            let w = self.qkv.weight();
            return Ok(match self.qkv.bias() {
                // cuBLAS's product, its bias added by the head split (one launch less)
                Some(bias) if h.dtype() == w.dtype() && !super::cuda_gemm::applies(h, w) => {
                    let raw = self.qkv.product_rows(h)?.reshape((b, n, 3 * c))?;
                    cuda_ops::split_heads_bias(&raw, Some(bias), self.n_head)?
                }
                _ => cuda_ops::split_heads(&self.qkv.forward(h)?, self.n_head)?,
            });
        }
        let qkv = self.qkv.forward(h)?; // (B, n, 3C)
        let split = |i: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, i * c, c)?
                .reshape((b, n, self.n_head, c / self.n_head))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        Ok((split(0)?, split(1)?, split(2)?))
    }

    /// `s = x + out_proj(yg)` and `norm2(s)`. On CUDA where cuBLAS takes the product, its bias
    /// add joins the residual add and the norm in one launch (same rounding points).
    fn out_proj_add_norm(&self, x: &Tensor, yg: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(both) = self.out_proj.add_norm_fused(yg, x, &self.norm2)? {
            return Ok(both);
        }
        self.norm2.add_forward(x, &self.out_proj.forward(yg)?)
    }

    /// The block after the attention core: `o` (B, n, C) heads merged, `g` the SiLU gate;
    /// returns the output and, on CUDA where cuBLAS takes fc2, `next`'s norm of it (fc2's bias,
    /// the residual add and that norm in one launch).
    fn finish(
        &self,
        x: &Tensor,
        o: &Tensor,
        g: &Tensor,
        next: Option<&RmsNorm>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let yg = self.proj.forward_act(o, Act::Identity, Some(g))?;
        let (x, m) = self.out_proj_add_norm(x, &yg)?;
        let h = self.fc1.forward_act(&m, Act::GeluErf, None)?;
        #[cfg(feature = "cuda")]
        if let Some(next) = next {
            if let Some((s, n)) = self.fc2.add_norm_fused(&h, &x, next)? {
                return Ok((s, Some(n)));
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = next;
        Ok((
            self.fc2.forward_fused(&h, Act::Identity, None, Some(&x))?,
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16/bf16 weights with f32 activations on the CPU: the product is the f32 product of the
    /// widened weights (our GEMM kernels on x86-64; elsewhere, e.g. AArch64, the weights are
    /// widened for candle's f32 product), not one in half precision. Rows past the kernels'
    /// row limit take the widening path on x86-64 too.
    #[test]
    fn half_weights_multiply_in_f32_on_the_cpu() {
        let dev = Device::Cpu;
        let (rows, k, out) = (37, 300, 45);
        let mut s = 7u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .collect()
        };
        let x = Tensor::from_vec(rnd(rows * k), (rows, k), &dev).unwrap();
        let w32 = Tensor::from_vec(rnd(out * k), (out, k), &dev).unwrap();
        let b32 = Tensor::from_vec(rnd(out), out, &dev).unwrap();
        for dt in [DType::F16, DType::BF16] {
            let (w, b) = (w32.to_dtype(dt).unwrap(), b32.to_dtype(dt).unwrap());
            let exact = Lin::new(
                w.to_dtype(DType::F32).unwrap(),
                Some(b.to_dtype(DType::F32).unwrap()),
            )
            .unwrap()
            .forward_candle(&x)
            .unwrap();
            let lin = Lin::new(w, Some(b)).unwrap();
            for (what, y) in [
                ("forward", lin.forward(&x).unwrap()),
                (
                    "unfused",
                    lin.unfused(&x, Act::Identity, None, None).unwrap(),
                ),
                ("widened", lin.widened_product(&x).unwrap().unwrap()),
            ] {
                assert_eq!(y.dtype(), DType::F32, "{dt:?} {what}");
                let d = (y - &exact).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                // f32 sums of 300 products of values ≤ 1 in magnitude: ~1e-5 at most; the
                // same product in f16 with f16 accumulation is off by ~1e-2
                assert!(d < 2e-5, "{dt:?} {what}: max difference {d}");
            }
        }
    }
}
