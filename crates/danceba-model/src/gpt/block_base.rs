//! `Block_Base` (temporal-gated causal attention, reference §3.4), and the small layers shared
//! by the GPT: linear layers and RMSNorm.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor, D};

use super::cpu_gemm;
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
    fn new(w: Tensor, b: Option<Tensor>) -> Result<Self> {
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

    /// f32 activations and f16/bf16 weights on a CPU without our GEMM kernels (AArch64, or
    /// `DANCEBA_CPU_GEMM=candle`): `x·Wᵀ + b` with the weights widened (exactly) for an f32
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
        let (n, k) = self.w.dims2()?;
        let sizes_ok = x.len() == rows * k
            && gate.is_none_or(|g| g.len() == rows * n)
            && residual.is_none_or(|r| r.len() == rows * n);
        if !sizes_ok {
            return Err(candle_core::Error::Msg(format!(
                "linear layer {n}×{k}: host input of {} values for {rows} rows (or gate/residual \
                 not {rows}×{n})",
                x.len()
            ))
            .into());
        }
        if self.b.is_some() && self.b_host.is_none() {
            return Ok(None);
        }
        let ep = cpu_gemm::Epilogue {
            bias: self.b_host.as_deref(),
            act: act.into(),
            gate,
            residual,
        };
        let (ws, wl) = self.w.storage_and_layout();
        let Some((w0, w1)) = wl.contiguous_offsets() else {
            return Ok(None);
        };
        Ok(match &*ws {
            Storage::Cpu(CpuStorage::F32(w)) => cpu_gemm::linear_ep(x, &w[w0..w1], rows, k, n, &ep),
            Storage::Cpu(CpuStorage::F16(w)) => cpu_gemm::linear_ep(x, &w[w0..w1], rows, k, n, &ep),
            Storage::Cpu(CpuStorage::BF16(w)) => {
                cpu_gemm::linear_ep(x, &w[w0..w1], rows, k, n, &ep)
            }
            _ => None,
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
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, name: &str, dim: usize) -> Result<Self> {
        Ok(Self {
            w: vb.pp(name).get(dim, "weight")?,
        })
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
    for i in 0..n {
        for j in 0..n {
            if j % t > i % t {
                m[i * n + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (n, n), device)?)
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
