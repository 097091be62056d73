//! The LPE (`LPE_1`: three `LinearPhaseEmbedding_1` modules), reference §3.3.
//!
//! The STFT phase is computed on the CPU (candle has neither FFT nor atan2): a 512-point
//! rectangular-window STFT with hop 256, centred with reflect padding, over the frame-major
//! flattened condition. Frame 0 is real by symmetry and its phase is computed exactly
//! (imaginary part +0, reference Appendix C); DC and Nyquist bins have an imaginary part of
//! exactly +0 (quirk Q3).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rustfft::{num_complex::Complex, FftPlanner};

use super::block_base::{Act, Lin};
use super::{GptError, Result};

/// FFT size of the official `torch.stft` call.
pub const N_FFT: usize = 512;
/// Hop length of the official `torch.stft` call.
pub const HOP: usize = 256;
/// Number of STFT bins of a real 512-point FFT.
pub const N_BINS: usize = N_FFT / 2 + 1;
/// The crop length hard-coded in the official LPE (`seq_len = 29`, quirk Q4), independent of
/// `block_size`.
pub const LPE_SEQ_LEN: usize = 29;

/// Phase of `(re, im)` for a bin whose imaginary part is exactly +0 (atan2(+0, re) semantics,
/// with Re = ±0 mapped to 0 as in Appendix C).
fn real_phase(re: f64) -> f32 {
    if re < 0.0 {
        std::f32::consts::PI
    } else {
        0.0
    }
}

/// STFT phase of one flattened signal: returns `(phase, frames)` with `phase` frame-major,
/// `frames × N_BINS` values in [−π, π].
pub fn stft_phase(signal: &[f32]) -> Result<(Vec<f32>, usize)> {
    let frames = stft_frames(signal.len())?;
    Ok((stft_phase_frames(signal, 0, frames)?, frames))
}

/// Number of STFT frames of a flattened signal of `len` values (error if too short for the
/// reflect padding).
pub fn stft_frames(len: usize) -> Result<usize> {
    let pad = N_FFT / 2;
    if len <= pad {
        return Err(GptError::Input(format!(
            "the LPE needs more than {pad} condition values per window (reflect padding), got {len}"
        )));
    }
    Ok(1 + len / HOP)
}

/// The one 512-point forward FFT plan, shared by all threads.
fn fft_plan() -> std::sync::Arc<dyn rustfft::Fft<f64>> {
    static PLAN: std::sync::OnceLock<std::sync::Arc<dyn rustfft::Fft<f64>>> =
        std::sync::OnceLock::new();
    PLAN.get_or_init(|| FftPlanner::<f64>::new().plan_fft_forward(N_FFT))
        .clone()
}

/// Phase of STFT frame `f` of `signal` into `out` (`N_BINS` values).
fn frame_phase(signal: &[f32], f: usize, fft: &dyn rustfft::Fft<f64>, out: &mut [f32]) {
    let len = signal.len();
    let pad = N_FFT / 2;
    let at = |i: usize| -> f64 {
        // index into the reflect-padded signal
        let j = i as isize - pad as isize;
        let k = if j < 0 {
            (-j) as usize
        } else if (j as usize) >= len {
            2 * (len - 1) - j as usize
        } else {
            j as usize
        };
        signal[k] as f64
    };
    let mut buf = [Complex::new(0.0f64, 0.0f64); N_FFT];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = Complex::new(at(f * HOP + i), 0.0);
    }
    thread_local! {
        /// The FFT's scratch, per thread (no allocation per frame).
        static SCRATCH: std::cell::RefCell<Vec<Complex<f64>>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.resize(fft.get_inplace_scratch_len(), Complex::new(0.0, 0.0));
        fft.process_with_scratch(&mut buf, &mut scratch);
    });
    for (bin, (c, o)) in buf.iter().zip(out.iter_mut()).enumerate() {
        *o = if f == 0 || bin == 0 || bin == N_BINS - 1 {
            real_phase(c.re)
        } else {
            c.im.atan2(c.re) as f32
        };
    }
}

/// STFT phase of frames `first .. first + count` of one flattened signal (the same values as
/// those rows of [`stft_phase`]), frame-major; the frames are computed in parallel.
pub fn stft_phase_frames(signal: &[f32], first: usize, count: usize) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let frames = stft_frames(signal.len())?;
    if first + count > frames {
        return Err(GptError::Input(format!(
            "STFT frames {first}..{} requested of {frames}",
            first + count
        )));
    }
    let fft = fft_plan();
    let mut phase = vec![0f32; count * N_BINS];
    phase
        .par_chunks_mut(N_BINS)
        .enumerate()
        .for_each(|(i, out)| frame_phase(signal, first + i, fft.as_ref(), out));
    Ok(phase)
}

/// The frames the LPE keeps out of `frames`: `(first, count)`, the centre crop to
/// [`LPE_SEQ_LEN`].
pub(crate) fn lpe_crop(frames: usize) -> (usize, usize) {
    if frames > LPE_SEQ_LEN {
        ((frames - LPE_SEQ_LEN) / 2, LPE_SEQ_LEN)
    } else {
        (0, frames)
    }
}

/// One `LinearPhaseEmbedding_1`: `relu(BN_eval(linear2(phase)))`.
#[derive(Debug, Clone)]
struct PhaseEmbedding {
    w: Tensor,     // (C, bins)
    bias: Tensor,  // (C,)
    scale: Tensor, // (C,) = γ / sqrt(var + eps)
    shift: Tensor, // (C,) = β − mean·scale
    /// On the CPU: the layer as a [`Lin`] (weight and bias, for the host step) and host
    /// copies of the scale and shift.
    host: Option<(Lin, Vec<f32>, Vec<f32>)>,
}

impl PhaseEmbedding {
    /// On the CPU the parameters are widened to f32 here, once (the CPU runs the LPE in f32
    /// whatever the weights' dtype, see [`Lpe::forward_phase`]), and the batch norm's scale and
    /// shift are folded in f32; elsewhere they keep the weights' dtype.
    fn load(vb: VarBuilder, n_embd: usize) -> Result<Self> {
        let cpu = matches!(vb.device(), Device::Cpu);
        let get = |vb: &VarBuilder, n: usize, name: &str| -> Result<Tensor> {
            let t = vb.get(n, name)?;
            Ok(if cpu { t.to_dtype(DType::F32)? } else { t })
        };
        let w = vb.get((n_embd, N_BINS), "linear2.weight")?;
        let w = if cpu { w.to_dtype(DType::F32)? } else { w };
        let bias = get(&vb, n_embd, "linear2.bias")?;
        let bn = vb.pp("bn2");
        let gamma = get(&bn, n_embd, "weight")?;
        let beta = get(&bn, n_embd, "bias")?;
        let mean = get(&bn, n_embd, "running_mean")?;
        let var = get(&bn, n_embd, "running_var")?;
        let scale = gamma.div(&(var + 1e-5)?.sqrt()?)?;
        let shift = (beta - mean.mul(&scale)?)?;
        let host = if cpu {
            Some((
                Lin::new(w.clone(), Some(bias.clone()))?,
                scale.to_vec1::<f32>()?,
                shift.to_vec1::<f32>()?,
            ))
        } else {
            None
        };
        Ok(Self {
            w,
            bias,
            scale,
            shift,
            host,
        })
    }

    /// [`PhaseEmbedding::forward`] on host rows: `phase` (rows × bins) into `out` (rows × C),
    /// the same f32 operations after the product (bias, scale, shift, ReLU). `false` where the
    /// host data or the kernel are not there.
    fn forward_into(&self, phase: &[f32], rows: usize, out: &mut [f32]) -> Result<bool> {
        let Some((lin, scale, shift)) = &self.host else {
            return Ok(false);
        };
        if !lin.linear_into(phase, rows, Act::Identity, None, None, out)? {
            return Ok(false);
        }
        for row in out.chunks_exact_mut(scale.len()) {
            for ((v, &a), &b) in row.iter_mut().zip(scale).zip(shift) {
                let z = *v * a + b;
                *v = if z > 0.0 { z } else { 0.0 };
            }
        }
        Ok(true)
    }

    /// `phase`: (B·F', bins) → (B·F', C), in `phase`'s dtype (the parameters are converted
    /// where they differ; [`Lpe::forward_phase`] passes the parameters' own dtype).
    fn forward(&self, phase: &Tensor) -> Result<Tensor> {
        let dt = phase.dtype();
        let z = phase
            .matmul(&self.w.to_dtype(dt)?.t()?)?
            .broadcast_add(&self.bias.to_dtype(dt)?)?;
        let z = z
            .broadcast_mul(&self.scale.to_dtype(dt)?)?
            .broadcast_add(&self.shift.to_dtype(dt)?)?;
        Ok(z.relu()?)
    }
}

/// The three LPE modules.
#[derive(Debug, Clone)]
pub struct Lpe {
    mods: [PhaseEmbedding; 3],
    /// On CUDA: the three modules' weights stacked (3, C, bins) (the modules' `w` are views of
    /// it) and their bias, batch-norm scale and shift (3, 3, C), for one batched GEMM and one
    /// launch of bias + batch norm + ReLU + concatenation (instead of 15 small launches).
    #[cfg(feature = "cuda")]
    stacked: Option<(Tensor, Tensor)>,
}

impl Lpe {
    pub(crate) fn load(vb: VarBuilder, n_embd: usize, lpe_bins: usize) -> Result<Self> {
        if lpe_bins != N_BINS {
            return Err(GptError::Input(format!(
                "the LPE linear2 input width is {lpe_bins}, but the official 512-point STFT gives {N_BINS} bins"
            )));
        }
        #[allow(unused_mut)]
        let mut mods = [
            PhaseEmbedding::load(vb.pp("pos_emb_1"), n_embd)?,
            PhaseEmbedding::load(vb.pp("pos_emb_2"), n_embd)?,
            PhaseEmbedding::load(vb.pp("pos_emb_3"), n_embd)?,
        ];
        #[cfg(feature = "cuda")]
        let stacked = if vb.device().is_cuda() {
            let w = Tensor::stack(&[&mods[0].w, &mods[1].w, &mods[2].w], 0)?;
            let p = mods
                .iter()
                .map(|m| Tensor::stack(&[&m.bias, &m.scale, &m.shift], 0))
                .collect::<candle_core::Result<Vec<_>>>()?;
            for (i, m) in mods.iter_mut().enumerate() {
                m.w = w.get(i)?;
            }
            Some((w, Tensor::stack(&p, 0)?))
        } else {
            None
        };
        Ok(Self {
            mods,
            #[cfg(feature = "cuda")]
            stacked,
        })
    }

    /// Full (uncropped) STFT phase of each batch item, from host values of `cond` (B, t, n_music)
    /// flattened frame-major. Returns (phase values B×F×bins, F).
    pub(crate) fn phase_host(cond_host: &[f32], batch: usize) -> Result<(Vec<f32>, usize)> {
        let per = cond_host.len() / batch.max(1);
        let mut all = Vec::new();
        let mut frames = 0;
        for b in 0..batch {
            let (p, f) = stft_phase(&cond_host[b * per..(b + 1) * per])?;
            frames = f;
            all.extend_from_slice(&p);
        }
        Ok((all, frames))
    }

    /// The cropped STFT phase the LPE layers take, from host values of `cond` (B, t, n_music)
    /// flattened frame-major: (B × F' × bins values, F').
    pub(crate) fn cropped_phase_host(cond_host: &[f32], batch: usize) -> Result<(Vec<f32>, usize)> {
        let mut all = Vec::new();
        let fc = Self::cropped_phase_host_into(cond_host, batch, &mut all)?;
        Ok((all, fc))
    }

    /// [`Lpe::cropped_phase_host`] into `all` (resized, its allocation reused); returns F'.
    pub(crate) fn cropped_phase_host_into(
        cond_host: &[f32],
        batch: usize,
        all: &mut Vec<f32>,
    ) -> Result<usize> {
        use rayon::prelude::*;
        let per = cond_host.len() / batch.max(1);
        let (first, fc) = lpe_crop(stft_frames(per)?);
        let fft = fft_plan();
        // every (batch item, frame) in parallel
        all.resize(batch * fc * N_BINS, 0.0);
        all.par_chunks_mut(N_BINS).enumerate().for_each(|(i, out)| {
            let b = i / fc;
            frame_phase(
                &cond_host[b * per..(b + 1) * per],
                first + i % fc,
                fft.as_ref(),
                out,
            )
        });
        Ok(fc)
    }

    /// [`Lpe::forward_phase`] on the host: module `i` of the cropped phase `phase` (rows =
    /// B·F' × bins) into `out` (rows × C). `false` where the host data or the kernel are not
    /// there.
    pub(crate) fn forward_module_into(
        &self,
        i: usize,
        phase: &[f32],
        rows: usize,
        out: &mut [f32],
    ) -> Result<bool> {
        self.mods[i].forward_into(phase, rows, out)
    }

    /// The LPE layers on a cropped phase (B, F', bins) of any float dtype: (B, 3F', C).
    pub(crate) fn forward_phase(&self, phase: &Tensor) -> Result<Tensor> {
        let (batch, fc, bins) = phase.dims3()?;
        // f32 on the CPU (as the rest of a CPU forward; the parameters were widened at load),
        // the weights' dtype elsewhere
        let dt = self.mods[0].w.dtype();
        let phase = phase.to_dtype(dt)?.reshape((batch * fc, bins))?;
        #[cfg(feature = "cuda")]
        if let Some((w, p)) = &self.stacked {
            if super::cuda_ops::usable(&phase) {
                let rows = batch * fc;
                let c = w.dim(1)?;
                let z = phase
                    .reshape((1, rows, bins))?
                    .broadcast_as((3, rows, bins))?
                    .matmul(&w.transpose(1, 2)?)?
                    .reshape((3, batch, fc, c))?;
                return Ok(super::cuda_ops::lpe_bias_bn_relu(&z, p)?.reshape((
                    batch,
                    3 * fc,
                    c,
                ))?);
            }
        }
        let mut outs = Vec::with_capacity(3);
        for m in self.mods.iter() {
            let c = m.w.dim(0)?;
            outs.push(m.forward(&phase)?.reshape((batch, fc, c))?);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }
}

/// The STFT phase as a tensor (B, F, bins), for tests and inspection.
pub fn lpe_phase(cond: &Tensor) -> Result<Tensor> {
    let (b, _, _) = cond.dims3()?;
    let host = cond.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (p, f) = Lpe::phase_host(&host, b)?;
    Ok(Tensor::from_vec(p, (b, f, N_BINS), &Device::Cpu)?)
}
