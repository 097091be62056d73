//! Mamba (reference §3.5), the GatedMLP and `Block_Head` (three independent streams).
//!
//! Two implementations of the Mamba core: [`MambaImpl::Portable`] from standard candle ops
//! (works on every device; the oracle), and [`MambaImpl::FusedCpu`], which runs the
//! convolution, the selective scan and the gate in the Rust kernels of [`super::scan`].

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;

use super::block_base::{host_lin, host_unavailable, with_host_f32, Act, Lin, RmsNorm};
use super::cpu_step::{grow, HostScratch};
use super::scan;
use super::Result;
use crate::arch::MambaArch;

/// Which Mamba implementation to run. With the `metal` feature, either fused choice on a Metal
/// device selects the fused Metal kernels of [`super::metal_scan`] once their self-check has
/// passed (`Portable` otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MambaImpl {
    /// Standard candle ops on any device (the reference path in tests).
    Portable,
    /// Fused CPU kernels (f32 on the CPU device only; other devices/dtypes fall back to
    /// `Portable`).
    FusedCpu,
    /// Fused CUDA kernels of [`super::cuda_scan`] (builds with the `cuda` feature, tensors on a
    /// CUDA device; `Portable` otherwise). `FusedCpu` on a CUDA device also selects them.
    FusedCuda,
}

/// `softplus(v)` with PyTorch's threshold 20, from candle ops; `log1p` evaluated accurately
/// as `log(1+e)·e/((1+e)−1)` (exact `e` where `1+e` rounds to 1).
fn softplus_portable(v: &Tensor) -> Result<Tensor> {
    let e = v.exp()?;
    let u = (&e + 1.0)?;
    let r = u.log()?.mul(&e)?.div(&(&u - 1.0)?)?;
    let r = u.eq(1.0)?.where_cond(&e, &r)?;
    Ok(v.gt(20.0)?.where_cond(v, &r)?)
}

/// One Mamba layer.
#[derive(Debug, Clone)]
pub struct Mamba {
    d_inner: usize,
    d_state: usize,
    dt_rank: usize,
    d_conv: usize,
    in_proj: Lin,
    conv_w: Tensor, // (d_inner, d_conv)
    conv_b: Tensor, // (d_inner)
    x_proj: Lin,
    dt_proj: Lin, // no bias: the bias is added before the softplus
    dt_bias: Tensor,
    a: Tensor, // (d_inner, d_state) = −exp(A_log)
    d_skip: Tensor,
    out_proj: Lin,
    host: Option<MambaHost>,
}

/// Host copies of the small per-channel parameters for the fused CPU kernels.
#[derive(Debug, Clone)]
struct MambaHost {
    conv_w: Vec<f32>,
    conv_b: Vec<f32>,
    dt_bias: Vec<f32>,
    a: Vec<f32>,
    /// Each channel's smallest A ([`scan::channel_minima`]).
    a_min: Vec<f32>,
    /// The convolution weights taps-major ([`scan::conv_taps_major`]).
    conv_wt: Vec<f32>,
    d_skip: Vec<f32>,
}

impl Mamba {
    /// Loads a `mamba_*` module: `in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`,
    /// `out_proj`.
    pub fn load(vb: VarBuilder, n_embd: usize, arch: &MambaArch) -> Result<Self> {
        let (di, ds, dr, dc) = (arch.d_inner, arch.d_state, arch.dt_rank, arch.d_conv);
        let conv_w = vb.get((di, 1, dc), "conv1d.weight")?.reshape((di, dc))?;
        let conv_b = vb.get(di, "conv1d.bias")?;
        let dt_bias = vb.get(di, "dt_proj.bias")?;
        let a = vb.get((di, ds), "A_log")?.exp()?.neg()?;
        let d_skip = vb.get(di, "D")?;
        let host = if matches!(vb.device(), Device::Cpu) {
            let f = |t: &Tensor| -> Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let a_host = f(&a)?;
            let conv_w_host = f(&conv_w)?;
            Some(MambaHost {
                conv_wt: scan::conv_taps_major(&conv_w_host, di),
                conv_w: conv_w_host,
                conv_b: f(&conv_b)?,
                dt_bias: f(&dt_bias)?,
                a_min: scan::channel_minima(&a_host, di, ds),
                a: a_host,
                d_skip: f(&d_skip)?,
            })
        } else {
            None
        };
        Ok(Self {
            d_inner: di,
            d_state: ds,
            dt_rank: dr,
            d_conv: dc,
            in_proj: Lin::load(&vb, "in_proj", n_embd, 2 * di, false)?,
            conv_w,
            conv_b,
            x_proj: Lin::load(&vb, "x_proj", di, dr + 2 * ds, false)?,
            dt_proj: Lin::load(&vb, "dt_proj", dr, di, false)?,
            dt_bias,
            a,
            d_skip,
            out_proj: Lin::load(&vb, "out_proj", di, n_embd, false)?,
            host,
        })
    }

    /// Forward of one stream `x` (B, L, C) → (B, L, C), from a zero state.
    pub fn forward(&self, x: &Tensor, imp: MambaImpl) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if imp != MambaImpl::Portable
            && x.device().is_cuda()
            && super::cuda_scan::supports(self.d_state, x.dtype())
        {
            return self.forward_fused_cuda(x);
        }
        #[cfg(feature = "metal")]
        if imp != MambaImpl::Portable
            && x.device().is_metal()
            && super::metal_scan::use_fused(x.device(), self.d_state, x.dtype())
        {
            return self.forward_fused_metal(x);
        }
        match (imp, &self.host) {
            (MambaImpl::FusedCpu, Some(host)) if matches!(x.device(), Device::Cpu) => {
                self.forward_fused(x, host)
            }
            _ => self.forward_portable(x),
        }
    }

    /// The reference math with standard candle ops. The small parameters are taken in `x`'s
    /// dtype (f32 activations with f16/bf16 weights on the CPU: widened exactly, as the fused
    /// kernels' host copies are).
    pub fn forward_portable(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (di, ds, dr) = (self.d_inner, self.d_state, self.dt_rank);
        let dt = x.dtype();
        let (conv_w, conv_b) = (self.conv_w.to_dtype(dt)?, self.conv_b.to_dtype(dt)?);
        let (dt_bias, a) = (self.dt_bias.to_dtype(dt)?, self.a.to_dtype(dt)?);
        let d_skip = self.d_skip.to_dtype(dt)?;
        let xz = self.in_proj.forward(x)?;
        let xs = xz.narrow(D::Minus1, 0, di)?;
        let z = xz.narrow(D::Minus1, di, di)?;
        // causal depthwise conv as shifted multiply-adds, zero history
        let xp = xs.pad_with_zeros(1, self.d_conv - 1, 0)?;
        let mut c = conv_b
            .reshape((1, 1, di))?
            .broadcast_as((b, l, di))?
            .contiguous()?;
        for k in 0..self.d_conv {
            let wk = conv_w.narrow(1, k, 1)?.reshape((1, 1, di))?;
            c = (c + xp.narrow(1, k, l)?.broadcast_mul(&wk)?)?;
        }
        let u = candle_nn::ops::silu(&c)?;
        let xd = self.x_proj.forward(&u)?;
        let dt_r = xd.narrow(D::Minus1, 0, dr)?;
        let bm = xd.narrow(D::Minus1, dr, ds)?;
        let cm = xd.narrow(D::Minus1, dr + ds, ds)?;
        let dpre = self.dt_proj.forward(&dt_r)?.broadcast_add(&dt_bias)?;
        let delta = softplus_portable(&dpre)?;
        let mut h = Tensor::zeros((b, di, ds), x.dtype(), x.device())?;
        let mut ys = Vec::with_capacity(l);
        for t in 0..l {
            let dl = delta.narrow(1, t, 1)?.reshape((b, di, 1))?;
            let ul = u.narrow(1, t, 1)?.reshape((b, di, 1))?;
            let bl = bm.narrow(1, t, 1)?; // (b, 1, ds)
            let cl = cm.narrow(1, t, 1)?;
            let da = dl.broadcast_mul(&a)?.exp()?;
            h = (da.mul(&h)? + dl.mul(&ul)?.broadcast_mul(&bl)?)?;
            ys.push(h.broadcast_mul(&cl)?.sum(D::Minus1)?); // (b, di)
        }
        let y = Tensor::stack(&ys, 1)?; // (b, l, di)
        let y = (y + u.broadcast_mul(&d_skip)?)?;
        let y = y.mul(&candle_nn::ops::silu(&z)?)?;
        self.out_proj.forward(&y)
    }

    /// The fused CUDA path: in_proj, conv+SiLU kernel, x_proj, dt_proj, scan kernel, out_proj.
    #[cfg(feature = "cuda")]
    fn forward_fused_cuda(&self, x: &Tensor) -> Result<Tensor> {
        use super::cuda_scan;
        let (di, ds, dr) = (self.d_inner, self.d_state, self.dt_rank);
        let xz = self.in_proj.forward(x)?.contiguous()?;
        let u = cuda_scan::conv_silu(&xz, di, &self.conv_w, &self.conv_b)?;
        let xd = self.x_proj.forward(&u)?.contiguous()?;
        // the skinny GEMM reads the Δ columns of `xd` in place (no copy)
        let dpre = self.dt_proj.forward(&xd.narrow(D::Minus1, 0, dr)?)?;
        let y = cuda_scan::selective_scan(
            &u,
            &cuda_scan::ScanArgs {
                delta_pre: &dpre,
                delta_bias: &self.dt_bias,
                a: &self.a,
                bc: &xd,
                b_offset: dr,
                c_offset: dr + ds,
                d_skip: &self.d_skip,
                z: &xz,
                z_offset: di,
            },
        )?;
        self.out_proj.forward(&y)
    }

    /// The fused Metal path (as the CUDA one, with the kernels of [`super::metal_scan`]); the
    /// self-check calls it directly, [`Mamba::forward`] only once that check passed.
    #[cfg(feature = "metal")]
    pub(crate) fn forward_fused_metal(&self, x: &Tensor) -> Result<Tensor> {
        use super::metal_scan;
        let (di, ds, dr) = (self.d_inner, self.d_state, self.dt_rank);
        let xz = self.in_proj.forward(x)?.contiguous()?;
        let u = metal_scan::conv_silu(&xz, di, &self.conv_w, &self.conv_b)?;
        let xd = self.x_proj.forward(&u)?.contiguous()?;
        let dpre = self.dt_proj.forward(&xd.narrow(D::Minus1, 0, dr)?)?;
        let y = metal_scan::selective_scan(
            &u,
            &metal_scan::ScanArgs {
                delta_pre: &dpre,
                delta_bias: &self.dt_bias,
                a: &self.a,
                bc: &xd,
                b_offset: dr,
                c_offset: dr + ds,
                d_skip: &self.d_skip,
                z: &xz,
                z_offset: di,
            },
        )?;
        self.out_proj.forward(&y)
    }

    /// The fused CPU path. In f16/bf16 the linear layers run in that precision and the
    /// convolution, the scan (state, softplus, D skip, gate) in f32, like the CUDA kernels.
    fn forward_fused(&self, x: &Tensor, host: &MambaHost) -> Result<Tensor> {
        if let Some(y) = self.forward_fused_host(x)? {
            return Ok(y);
        }
        let (b, l, _) = x.dims3()?;
        let (di, dr) = (self.d_inner, self.dt_rank);
        let dtype = x.dtype();
        let host_f32 = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let xz = self.in_proj.forward(x)?;
        let xz_h = host_f32(&xz)?;
        let u = scan::causal_conv_silu(&xz_h, b, l, 2 * di, 0, di, &host.conv_w, &host.conv_b);
        let u_t = Tensor::from_slice(&u, (b, l, di), x.device())?.to_dtype(dtype)?;
        let xd = self.x_proj.forward(&u_t)?;
        let dpre = self.dt_proj.forward(&xd.narrow(D::Minus1, 0, dr)?)?;
        let xd_h = host_f32(&xd)?;
        let dpre_h = host_f32(&dpre)?;
        let mut y = vec![0f32; b * l * di];
        self.scan_host(host, (b, l), &u, &dpre_h, &xd_h, &xz_h, &mut y);
        let y = Tensor::from_vec(y, (b, l, di), x.device())?.to_dtype(dtype)?;
        self.out_proj.forward(&y)
    }
}

impl Mamba {
    /// The fused CPU scan (softplus(Δ), selective scan, D skip, SiLU(z) gate) of `b` × `l`
    /// positions on host rows into `out` (b·l × d_inner): `u` and `dpre` (d_inner wide), `xd`
    /// (x_proj's output: Δ rank, B, C), `xz` (in_proj's output: x, z).
    #[allow(clippy::too_many_arguments)]
    fn scan_host(
        &self,
        host: &MambaHost,
        (b, l): (usize, usize),
        u: &[f32],
        dpre: &[f32],
        xd: &[f32],
        xz: &[f32],
        out: &mut [f32],
    ) {
        let (di, ds, dr) = (self.d_inner, self.d_state, self.dt_rank);
        scan::selective_scan_into(
            &scan::ScanInputs {
                batch: b,
                len: l,
                d: di,
                n: ds,
                u,
                delta_pre: dpre,
                delta_bias: &host.dt_bias,
                a: &host.a,
                a_min: &host.a_min,
                bc: xd,
                bc_stride: dr + 2 * ds,
                b_offset: dr,
                c_offset: dr + ds,
                d_skip: &host.d_skip,
                z: xz,
                z_stride: 2 * di,
                z_offset: di,
            },
            out,
        )
    }

    /// [`Mamba::forward_fused`] for f32 on the CPU with every linear layer in
    /// [`super::cpu_gemm`] on host vectors: no tensors between the layers, one at the end.
    /// `None` where the kernel does not apply (then the tensor path runs).
    fn forward_fused_host(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (b, l, c) = x.dims3()?;
        if b * l > super::cpu_gemm::max_rows() || !super::cpu_gemm::available() {
            return Ok(None);
        }
        let mut out = vec![0f32; b * l * c];
        let done = with_host_f32(x, |xv| {
            self.forward_host_into(xv, None, b, l, &mut HostScratch::default(), &mut out)?;
            Ok(Some(()))
        })?;
        Ok(match done {
            Some(()) => Some(Tensor::from_vec(out, (b, l, c), x.device())?),
            None => None,
        })
    }
}

impl Mamba {
    /// The fused Mamba on host rows: `a` (b·l × C) the (normed) input into `s` (the same
    /// size), plus `residual` where given (the stream's rows: the add in out_proj's epilogue,
    /// the same bits as candle's add). Every product in [`super::cpu_gemm`]; no allocation
    /// once `sc` has grown to the shape.
    fn forward_host_into(
        &self,
        a: &[f32],
        residual: Option<&[f32]>,
        b: usize,
        l: usize,
        sc: &mut HostScratch,
        s: &mut [f32],
    ) -> Result<()> {
        let Some(host) = &self.host else {
            return Err(host_unavailable("a Mamba layer"));
        };
        let (di, ds, dr) = (self.d_inner, self.d_state, self.dt_rank);
        let rows = b * l;
        let xz = grow(&mut sc.xz, rows * 2 * di);
        host_lin!(self.in_proj, a, rows, Act::Identity, None, None, xz);
        let u = grow(&mut sc.u, rows * di);
        scan::causal_conv_silu_into(xz, b, l, 2 * di, 0, di, &host.conv_wt, &host.conv_b, u);
        let stride = dr + 2 * ds;
        let xd = grow(&mut sc.xd, rows * stride);
        host_lin!(self.x_proj, u, rows, Act::Identity, None, None, xd);
        let dt = grow(&mut sc.dt, rows * dr);
        for (o, r) in dt.chunks_exact_mut(dr.max(1)).zip(xd.chunks_exact(stride)) {
            o.copy_from_slice(&r[..dr]);
        }
        let dpre = grow(&mut sc.dpre, rows * di);
        host_lin!(self.dt_proj, dt, rows, Act::Identity, None, None, dpre);
        let ys = grow(&mut sc.ys, rows * di);
        self.scan_host(host, (b, l), u, dpre, xd, xz, ys);
        host_lin!(self.out_proj, ys, rows, Act::Identity, None, residual, s);
        Ok(())
    }
}

/// `GatedMLP`: `fc2(v ⊙ silu(g))` with `[v, g] = fc1(x)`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    fc1: Lin,
    fc2: Lin,
    hidden: usize,
}

impl GatedMlp {
    pub fn load(vb: VarBuilder, n_embd: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            fc1: Lin::load(&vb, "fc1", n_embd, 2 * hidden, false)?,
            fc2: Lin::load(&vb, "fc2", hidden, n_embd, false)?,
            hidden,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// `residual + forward(x)`, the add fused into `fc2` where it can be.
    pub fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        use super::block_base::Act;
        let h = self.fc1.forward(x)?;
        #[cfg(feature = "cuda")]
        if super::cuda_ops::usable(&h) && h.dims().last() == Some(&(2 * self.hidden)) {
            let gated = super::cuda_ops::silu_gate(&h)?;
            return self
                .fc2
                .forward_fused(&gated, Act::Identity, None, residual);
        }
        if let Some(y) = self.forward_host(x, &h, residual)? {
            return Ok(y);
        }
        let v = h.narrow(D::Minus1, 0, self.hidden)?;
        let g = h.narrow(D::Minus1, self.hidden, self.hidden)?;
        let gated = v.mul(&candle_nn::ops::silu(&g.contiguous()?)?)?;
        self.fc2
            .forward_fused(&gated, Act::Identity, None, residual)
    }
}

impl GatedMlp {
    /// The CPU f32 tail of [`GatedMlp::forward_residual`] from `h = fc1(x)`: the gate on host
    /// data (parallel over rows; the candle ops' f32 operations, with AVX-512 the SiLU through
    /// [`super::vmath`]'s vector `exp`, within a few ulp of them) and `fc2` with the
    /// residual in [`super::cpu_gemm`]'s epilogue. `None` where that kernel does not apply.
    fn forward_host(
        &self,
        x: &Tensor,
        h: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let dims = h.dims();
        let hid = self.hidden;
        if dims.last() != Some(&(2 * hid)) || residual.is_some_and(|r| r.dims() != x.dims()) {
            return Ok(None);
        }
        let rows = h.elem_count() / (2 * hid);
        let Some(gated) = with_host_f32(h, |hv| {
            let mut gated = vec![0f32; rows * hid];
            silu_gate_rows(hv, hid, &mut gated);
            Ok(Some(gated))
        })?
        else {
            return Ok(None);
        };
        let fc2 = |r: Option<&[f32]>| self.fc2.linear_host(&gated, rows, Act::Identity, None, r);
        let y = match residual {
            Some(r) => with_host_f32(r, |rv| fc2(Some(rv)))?,
            None => fc2(None)?,
        };
        let Some(y) = y else {
            return Ok(None);
        };
        Ok(Some(Tensor::from_vec(y, x.dims(), x.device())?))
    }
}

/// `v ⊙ silu(g)` of each row `[v, g]` of `h` (rows × 2·hid) into `out` (rows × hid), as
/// [`GatedMlp::forward_host`] computes it.
fn silu_gate_rows(h: &[f32], hid: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    out.par_chunks_mut(hid)
        .zip(h.par_chunks(2 * hid))
        .for_each(|(o, r)| {
            let (v, g) = r.split_at(hid);
            #[cfg(target_arch = "x86_64")]
            {
                use super::cpu_gemm::{kernel, Kernel};
                use super::vmath::{avx2, avx512};
                // SAFETY: the kernel's CPU features are there (`kernel`: AVX-512F, or AVX2 and
                // FMA); the slices have `hid` values
                match kernel() {
                    Some(Kernel::Avx512) => return unsafe { avx512::silu_gate(v, g, o) },
                    Some(Kernel::Avx2) => return unsafe { avx2::silu_gate(v, g, o) },
                    _ => {}
                }
            }
            #[cfg(target_arch = "aarch64")]
            if super::cpu_gemm::kernel() == Some(super::cpu_gemm::Kernel::Neon) {
                return super::vmath::neon::silu_gate(v, g, o);
            }
            for ((o, &v), &g) in o.iter_mut().zip(v).zip(g) {
                *o = v * (g / (1.0 + (-g).exp()));
            }
        });
}

/// One stream of a `Block_Head`: RMSNorm → Mamba → residual, RMSNorm → GatedMLP → residual.
#[derive(Debug, Clone)]
struct Stream {
    norm_a: RmsNorm,
    mamba: Mamba,
    norm_b: RmsNorm,
    mlp: GatedMlp,
}

impl Stream {
    /// [`Stream::forward`] on the host rows `x` (b songs of `l` rows × C, updated in place),
    /// with the fused Mamba and no allocation once `sc` has grown to the shape.
    fn forward_host(&self, x: &mut [f32], b: usize, l: usize, sc: &mut HostScratch) -> Result<()> {
        let c = x.len() / (b * l).max(1);
        let rows = b * l;
        let hid = self.mlp.hidden;
        let mut a = std::mem::take(&mut sc.a);
        let mut s = std::mem::take(&mut sc.s);
        let (av, sv) = (grow(&mut a, rows * c), grow(&mut s, rows * c));
        let done = (|| -> Result<()> {
            if !self.norm_a.forward_into(x, av) {
                return Err(host_unavailable("a norm"));
            }
            self.mamba.forward_host_into(av, Some(x), b, l, sc, sv)?;
            if !self.norm_b.forward_into(sv, av) {
                return Err(host_unavailable("a norm"));
            }
            let h = grow(&mut sc.h, rows * 2 * hid);
            host_lin!(self.mlp.fc1, av, rows, Act::Identity, None, None, h);
            let gated = grow(&mut sc.g, rows * hid);
            silu_gate_rows(h, hid, gated);
            host_lin!(
                self.mlp.fc2,
                gated,
                rows,
                Act::Identity,
                None,
                Some(&*sv),
                x
            );
            Ok(())
        })();
        sc.a = a;
        sc.s = s;
        done
    }

    fn forward(&self, x: &Tensor, imp: MambaImpl) -> Result<Tensor> {
        let y = self.mamba.forward(&self.norm_a.forward(x)?, imp)?;
        let (x, n) = self.norm_b.add_forward(x, &y)?;
        self.mlp.forward_residual(&n, Some(&x))
    }
}

/// `Block_Head`: three independent streams (music, up, down).
#[derive(Debug, Clone)]
pub struct BlockHead {
    streams: [Stream; 3],
    /// The streams' weights stacked for the grouped CUDA path (CUDA devices only; the streams'
    /// own weights are views of these).
    #[cfg(feature = "cuda")]
    grouped: Option<HeadGroup>,
}

/// Whether [`BlockHead`] runs its three streams as one group of launches on CUDA (default on;
/// `DANCEBA_CUDA_GROUPED=0|off|false|no` runs them one after another, for comparison).
#[cfg(feature = "cuda")]
pub fn grouped_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !super::env_off("DANCEBA_CUDA_GROUPED"))
}

/// The three streams' weights of one `Block_Head`, each stacked along a new first dimension
/// (music, up, down), so that each step of the layer is one launch for the three streams: the
/// grouped skinny GEMM (or cuBLAS's batched GEMM), and the norm, convolution and scan kernels
/// with per-group weights.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
struct HeadGroup {
    norm_a: Tensor,   // (3, C)
    norm_b: Tensor,   // (3, C)
    in_proj: Tensor,  // (3, 2·d_inner, C)
    conv_w: Tensor,   // (3, d_inner, d_conv)
    conv_b: Tensor,   // (3, d_inner)
    x_proj: Tensor,   // (3, dt_rank + 2·d_state, d_inner)
    dt_proj: Tensor,  // (3, d_inner, dt_rank)
    dt_bias: Tensor,  // (3, d_inner)
    a: Tensor,        // (3, d_inner, d_state)
    d_skip: Tensor,   // (3, d_inner)
    out_proj: Tensor, // (3, C, d_inner)
    fc1: Tensor,      // (3, 2·hidden, C)
    fc2: Tensor,      // (3, C, hidden)
}

#[cfg(feature = "cuda")]
impl HeadGroup {
    /// Stacks the streams' weights and replaces each stream's by its view of the stack (no
    /// second copy stays in memory).
    fn stack(streams: &mut [Stream; 3]) -> Result<Self> {
        use super::block_base::SharedWeight;
        fn stack<W: SharedWeight>(
            streams: &mut [Stream; 3],
            field: impl Fn(&mut Stream) -> &mut W,
        ) -> Result<Tensor> {
            let parts: Vec<Tensor> = streams
                .iter_mut()
                .map(|s| field(s).weight().clone())
                .collect();
            let all = Tensor::stack(&parts, 0)?;
            for (i, s) in streams.iter_mut().enumerate() {
                field(s).share_weight(all.get(i)?);
            }
            Ok(all)
        }
        Ok(Self {
            norm_a: stack(streams, |s| &mut s.norm_a)?,
            norm_b: stack(streams, |s| &mut s.norm_b)?,
            in_proj: stack(streams, |s| &mut s.mamba.in_proj)?,
            conv_w: stack(streams, |s| &mut s.mamba.conv_w)?,
            conv_b: stack(streams, |s| &mut s.mamba.conv_b)?,
            x_proj: stack(streams, |s| &mut s.mamba.x_proj)?,
            dt_proj: stack(streams, |s| &mut s.mamba.dt_proj)?,
            dt_bias: stack(streams, |s| &mut s.mamba.dt_bias)?,
            a: stack(streams, |s| &mut s.mamba.a)?,
            d_skip: stack(streams, |s| &mut s.mamba.d_skip)?,
            out_proj: stack(streams, |s| &mut s.mamba.out_proj)?,
            fc1: stack(streams, |s| &mut s.mlp.fc1)?,
            fc2: stack(streams, |s| &mut s.mlp.fc2)?,
        })
    }
}

/// `x[g]·w[g]ᵀ` for `x` (G, M, K) and stacked weights `w` (G, N, K): the grouped skinny GEMM
/// where it applies (and for a column slice `x` it can read in place, in any dtype), else
/// cuBLAS's batched GEMM.
#[cfg(feature = "cuda")]
fn grouped_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    use super::cuda_gemm;
    if cuda_gemm::applies(x, w) || (!x.is_contiguous() && cuda_gemm::takes_strided(x, w)) {
        let ep = cuda_gemm::Epilogue {
            bias: None,
            act: super::block_base::Act::Identity,
            gate: None,
            residual: None,
        };
        return Ok(cuda_gemm::linear(x, w, ep)?);
    }
    Ok(x.contiguous()?.matmul(&w.transpose(1, 2)?)?)
}

impl BlockHead {
    pub fn load(
        vb: VarBuilder,
        n_embd: usize,
        gated_hidden: usize,
        arch: &MambaArch,
    ) -> Result<Self> {
        let stream = |i: usize| -> Result<Stream> {
            Ok(Stream {
                norm_a: RmsNorm::load(&vb, &format!("ln{}", 2 * i + 1), n_embd)?,
                mamba: Mamba::load(vb.pp(format!("mamba_{}", i + 1)), n_embd, arch)?,
                norm_b: RmsNorm::load(&vb, &format!("ln{}", 2 * i + 2), n_embd)?,
                mlp: GatedMlp::load(vb.pp(format!("gate_mlp_{}", i + 1)), n_embd, gated_hidden)?,
            })
        };
        #[allow(unused_mut)]
        let mut streams = [stream(0)?, stream(1)?, stream(2)?];
        Ok(Self {
            #[cfg(feature = "cuda")]
            grouped: if vb.device().is_cuda() {
                Some(HeadGroup::stack(&mut streams)?)
            } else {
                None
            },
            streams,
        })
    }

    /// `x`: (B, 3t, C) → (B, 3t, C). On CUDA with the fused kernels the three streams run as
    /// one group of launches ([`BlockHead::forward_streams`] is the same math stream by
    /// stream).
    pub fn forward(&self, x: &Tensor, t: usize, imp: MambaImpl) -> Result<Tensor> {
        Self::forward_chain(std::slice::from_ref(self), x, t, imp)
    }

    /// `blocks` one after another. On CUDA with the fused kernels the rows stay stream-major
    /// from the first block to the last (one reorder each way at batch > 1), and each block's
    /// last residual add joins the next block's first norm in one launch.
    pub fn forward_chain(
        blocks: &[BlockHead],
        x: &Tensor,
        t: usize,
        imp: MambaImpl,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(groups) = blocks
            .iter()
            .map(|blk| blk.grouped.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            let all = blocks
                .iter()
                .all(|blk| super::cuda_scan::supports(blk.streams[0].mamba.d_state, x.dtype()));
            if imp != MambaImpl::Portable && grouped_enabled() && super::cuda_ops::usable(x) && all
            {
                return Self::forward_grouped(blocks, &groups, x, t);
            }
        }
        if matches!(x.device(), Device::Cpu) && x.dim(1)? == 3 * t {
            return Self::forward_chain_cpu(blocks, x, t, imp);
        }
        let mut x = x.clone();
        for blk in blocks {
            x = blk.forward_streams(&x, t, imp)?;
        }
        Ok(x)
    }

    /// [`BlockHead::forward_chain`] on the CPU: the three streams never mix inside the head's
    /// blocks, so each runs through all of them as one task (rayon), its layers' own parallel
    /// loops shared with the other tasks by work stealing. Two threads then rarely wait for
    /// each other at the end of a product or a scan, as they do running one stream's layers
    /// after another's. Each stream's arithmetic is that of [`BlockHead::forward_streams`].
    fn forward_chain_cpu(
        blocks: &[BlockHead],
        x: &Tensor,
        t: usize,
        imp: MambaImpl,
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        let outs = (0..3)
            .into_par_iter()
            .map(|i| -> Result<Tensor> {
                let mut y = x.narrow(1, i * t, t)?.contiguous()?;
                for blk in blocks {
                    y = blk.streams[i].forward(&y, imp)?;
                }
                Ok(y)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// [`BlockHead::forward_chain`] on host rows `x` (b songs of 3t rows × C, updated in
    /// place): each stream's rows gathered into its scratch (`sc`, one per stream), run
    /// through all the blocks as one task (the three in parallel, as
    /// [`BlockHead::forward_chain_cpu`]), and scattered back. No allocation once the scratch
    /// has grown to the shape.
    pub(crate) fn forward_chain_host(
        blocks: &[BlockHead],
        x: &mut [f32],
        b: usize,
        t: usize,
        sc: &mut [HostScratch; 3],
    ) -> Result<()> {
        let c = x.len() / (b * 3 * t).max(1);
        let [s0, s1, s2] = sc;
        let stream = |i: usize, sc: &mut HostScratch, x: &[f32]| -> Result<()> {
            let mut y = std::mem::take(&mut sc.y);
            let yv = grow(&mut y, b * t * c);
            for bi in 0..b {
                let from = (bi * 3 * t + i * t) * c;
                yv[bi * t * c..(bi + 1) * t * c].copy_from_slice(&x[from..from + t * c]);
            }
            let mut done = Ok(());
            for blk in blocks {
                done = blk.streams[i].forward_host(yv, b, t, sc);
                if done.is_err() {
                    break;
                }
            }
            sc.y = y;
            done
        };
        let xr = &*x;
        let (r0, (r1, r2)) = rayon::join(
            || stream(0, s0, xr),
            || rayon::join(|| stream(1, s1, xr), || stream(2, s2, xr)),
        );
        r0?;
        r1?;
        r2?;
        for (i, sc) in [&*s0, &*s1, &*s2].into_iter().enumerate() {
            for bi in 0..b {
                let to = (bi * 3 * t + i * t) * c;
                x[to..to + t * c].copy_from_slice(&sc.y[bi * t * c..(bi + 1) * t * c]);
            }
        }
        Ok(())
    }

    /// [`BlockHead::forward`] one stream after another.
    pub fn forward_streams(&self, x: &Tensor, t: usize, imp: MambaImpl) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(3);
        for (i, s) in self.streams.iter().enumerate() {
            outs.push(s.forward(&x.narrow(1, i * t, t)?.contiguous()?, imp)?);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }
}

#[cfg(feature = "cuda")]
impl BlockHead {
    /// The three streams of every block as one group of CUDA launches: the rows stream-major
    /// (3, B·t, C) (a copy only at batch > 1), then each step of a layer once for the three.
    /// The last product of a block (fc2) is added to its residual by the next block's first
    /// norm (one launch; the same rounding as the add, then the norm).
    fn forward_grouped(
        blocks: &[BlockHead],
        groups: &[&HeadGroup],
        x: &Tensor,
        t: usize,
    ) -> Result<Tensor> {
        use super::block_base::RMS_EPS;
        use super::{cuda_ops, cuda_scan};
        let (b, rows, c) = x.dims3()?;
        if rows != 3 * t {
            return Err(super::GptError::Input(format!(
                "Block_Head: {rows} rows are not three streams of {t}"
            )));
        }
        let dtype = x.dtype();
        // stream-major rows; at batch 1 they already are (no copy)
        let mut xs = if b == 1 {
            x.reshape((3, t, c))?
        } else {
            cuda_ops::swap_mid(&x.reshape((1, b, 3, t * c))?)?
        }
        .reshape((3, b * t, c))?;
        // the previous block's fc2 output, not yet added to `xs`
        let mut pending: Option<Tensor> = None;
        for (blk, g) in blocks.iter().zip(groups) {
            let m = &blk.streams[0].mamba;
            let (di, ds, dr) = (m.d_inner, m.d_state, m.dt_rank);
            // Mamba
            let norm_a = g.norm_a.to_dtype(dtype)?;
            let n = match pending.take() {
                None => cuda_ops::rms_norm_grouped(&xs, &norm_a, RMS_EPS, 3)?,
                Some(y) => {
                    let (s, n) = cuda_ops::add_rms_norm_grouped(&xs, &y, &norm_a, RMS_EPS, 3)?;
                    xs = s;
                    n
                }
            };
            let xz = grouped_linear(&n, &g.in_proj)?.contiguous()?;
            let xz3 = xz.reshape((3 * b, t, 2 * di))?;
            let u = cuda_scan::conv_silu_grouped(&xz3, di, &g.conv_w, &g.conv_b, 3)?;
            let xd = grouped_linear(&u.reshape((3, b * t, di))?, &g.x_proj)?.contiguous()?;
            // the skinny GEMM reads the Δ columns of `xd` in place (no copy)
            let dpre = grouped_linear(&xd.narrow(D::Minus1, 0, dr)?, &g.dt_proj)?;
            let y = cuda_scan::selective_scan_grouped(
                &u,
                &cuda_scan::ScanArgs {
                    delta_pre: &dpre.reshape((3 * b, t, di))?,
                    delta_bias: &g.dt_bias,
                    a: &g.a,
                    bc: &xd.reshape((3 * b, t, dr + 2 * ds))?,
                    b_offset: dr,
                    c_offset: dr + ds,
                    d_skip: &g.d_skip,
                    z: &xz3,
                    z_offset: di,
                },
                3,
            )?;
            let y = grouped_linear(&y.reshape((3, b * t, di))?, &g.out_proj)?;
            // GatedMLP
            let (s, n) =
                cuda_ops::add_rms_norm_grouped(&xs, &y, &g.norm_b.to_dtype(dtype)?, RMS_EPS, 3)?;
            xs = s;
            let h = grouped_linear(&n, &g.fc1)?;
            let gated = cuda_ops::silu_gate(&h)?;
            pending = Some(grouped_linear(&gated, &g.fc2)?);
        }
        if let Some(y) = pending {
            xs = cuda_ops::add(&y, &xs)?;
        }
        Ok(if b == 1 {
            xs
        } else {
            cuda_ops::swap_mid(&xs.reshape((1, 3, b, t * c))?)?
        }
        .reshape((b, 3 * t, c))?)
    }
}
