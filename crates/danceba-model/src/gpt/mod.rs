//! The DanceBa GPT (`CrossCondGPT2`, reference §3): LPE, base blocks (temporal-gated causal
//! attention), Mamba head blocks, and the windowed sampler (§3.7).
//!
//! All sizes come from [`GptArch`] (detected from the checkpoint). The forward pass is plain
//! candle on any device; on the CPU the Mamba layers use the fused kernels of [`scan`] unless
//! [`MambaImpl::Portable`] is selected.

pub mod block_base;
pub mod cpu_gemm;
mod cpu_step;
#[cfg(feature = "cuda")]
pub mod cuda_gemm;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
#[cfg(feature = "cuda")]
pub mod cuda_ops;
#[cfg(feature = "cuda")]
pub mod cuda_scan;
pub mod lpe;
pub mod mamba;
pub mod metal_scan;
pub mod random;
pub mod sampler;
pub mod scan;
pub(crate) mod vmath;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::arch::GptArch;
use block_base::{tiled_causal_mask, BlockBase, Lin, RmsNorm};
use lpe::Lpe;
use mamba::BlockHead;
pub use mamba::MambaImpl;
pub use sampler::{GenerateOptions, SamplingPolicy, Tokens, DEFAULT_START};

/// Errors of the GPT.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// An input (condition, tokens, options) that the model cannot take; the message says what
    /// was wrong.
    #[error("invalid GPT input: {0}")]
    Input(String),
    /// A tensor operation or a weight lookup failed (e.g. a missing or mis-shaped key).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, GptError>;

fn input_err<T>(msg: String) -> Result<T> {
    Err(GptError::Input(msg))
}

/// Every token id of a stream must index its codebook of `vocab` entries.
fn check_token_ids(ids: impl Iterator<Item = i64>, name: &str, vocab: usize) -> Result<()> {
    for x in ids {
        if x < 0 || x as u64 >= vocab as u64 {
            return input_err(format!(
                "{name} token id {x} is outside the codebook of {vocab} entries"
            ));
        }
    }
    Ok(())
}

/// The condition (batch, t, width values, row-major) must be finite; the error names the
/// first bad value's place.
fn check_finite_condition(cond: &[f32], t: usize, width: usize) -> Result<()> {
    // a branch-free pass over the exponent bits first (it vectorises: the whole window is
    // checked on every step), the position only when something is not finite
    const EXP: u32 = 0x7f80_0000;
    if cond
        .iter()
        .fold(0u32, |m, v| m | u32::from(v.to_bits() & EXP == EXP))
        == 0
    {
        return Ok(());
    }
    if let Some(i) = cond.iter().position(|v| !v.is_finite()) {
        return input_err(format!(
            "the condition contains a non-finite value ({}) at batch {}, row {}, column {}",
            cond[i],
            i / (t * width),
            (i / width) % t,
            i % width
        ));
    }
    Ok(())
}

/// Intermediate values of one forward pass, for parity tests.
#[derive(Debug, Clone)]
pub struct ForwardTrace {
    /// LPE output before `position_scale` and before the `[:3t]` slice: (B, 3F', C).
    pub lpe_out: Tensor,
    /// After the base blocks: (B, 3t, C).
    pub base_out: Tensor,
    /// After the head's Mamba blocks (before its `block_base`): (B, 3t, C).
    pub head_blocks_out: Tensor,
    /// (B, t, vocab_up).
    pub logits_up: Tensor,
    /// (B, t, vocab_down).
    pub logits_down: Tensor,
}

/// `CrossCondGPT2` with its weights.
#[derive(Debug, Clone)]
pub struct Gpt {
    arch: GptArch,
    device: Device,
    dtype: DType,
    tok_up: Tensor,
    tok_down: Tensor,
    cond_emb: Lin,
    lpe: Lpe,
    position_scale: f64,
    base: Vec<BlockBase>,
    head: Vec<BlockHead>,
    head_base: BlockBase,
    rms_f: RmsNorm,
    head_up: Lin,
    head_down: Lin,
    mamba_impl: MambaImpl,
    /// Whether [`Gpt::last_logits`] replays CUDA graphs on a CUDA device.
    cuda_graphs: bool,
    /// The host step's buffers ([`cpu_step`]), kept between steps; shared by clones (one
    /// that finds them in use takes buffers of its own).
    host_ws: std::sync::Arc<std::sync::Mutex<cpu_step::Workspace>>,
    /// The captured graphs, shared by clones (same weights).
    #[cfg(feature = "cuda")]
    graphs: std::sync::Arc<cuda_graph::GraphCache>,
}

/// The environment variable that turns the CUDA graphs off by default (`0`, `off`, `false` or
/// `no`); [`Gpt::set_cuda_graphs`] overrides it.
pub const CUDA_GRAPHS_ENV: &str = "DANCEBA_CUDA_GRAPHS";

fn cuda_graphs_default() -> bool {
    !env_off(CUDA_GRAPHS_ENV)
}

/// The environment variable `var` trimmed and lower-cased ("" when unset or not Unicode).
pub(crate) fn env_value(var: &str) -> String {
    std::env::var(var)
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The number `var` is set to, if it is set to one.
pub(crate) fn env_usize(var: &str) -> Option<usize> {
    env_value(var).parse().ok()
}

/// Whether the switch `var` is set to off: `0`, `off`, `false` or `no`.
pub(crate) fn env_off(var: &str) -> bool {
    matches!(env_value(var).as_str(), "0" | "off" | "false" | "no")
}

impl Gpt {
    /// Loads the weights (keys without the `module.` prefix) with the sizes of `arch`.
    /// A missing or mis-shaped key is an error naming it.
    pub fn load(vb: VarBuilder, arch: &GptArch) -> Result<Self> {
        let c = arch.n_embd;
        if arch.n_head == 0 || !c.is_multiple_of(arch.n_head) {
            return input_err(format!(
                "n_embd {} is not divisible by n_head {}",
                c, arch.n_head
            ));
        }
        if arch.block_size < 2 {
            return input_err(format!("block_size {} is too small", arch.block_size));
        }
        let gb = vb.pp("gpt_base");
        let gh = vb.pp("gpt_head");
        let position_scale = gb
            .get((), "position_scale")?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let base = (0..arch.n_layer_base)
            .map(|i| {
                BlockBase::load(
                    gb.pp(format!("blocks.{i}")),
                    c,
                    arch.n_head,
                    arch.mlp_hidden,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let head = (0..arch.n_layer_head)
            .map(|i| {
                BlockHead::load(
                    gh.pp(format!("blocks.{i}")),
                    c,
                    arch.gated_mlp_hidden,
                    &arch.mamba,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let device = vb.device().clone();
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &device {
            // SAFETY: candle runs all work of a device on its one stream, so the per-buffer
            // CUDA events (never waited on with a single stream) are pure overhead; without
            // them no event is recorded inside a captured graph.
            unsafe { d.disable_event_tracking() };
        }
        let mamba_impl = if matches!(device, Device::Cpu) {
            MambaImpl::FusedCpu
        } else if cfg!(feature = "cuda") && device.is_cuda() {
            MambaImpl::FusedCuda
        } else {
            MambaImpl::Portable
        };
        Ok(Self {
            arch: arch.clone(),
            device,
            dtype: vb.dtype(),
            tok_up: gb.get((arch.vocab_up, c), "tok_emb_up.weight")?,
            tok_down: gb.get((arch.vocab_down, c), "tok_emb_down.weight")?,
            cond_emb: Lin::load(&gb, "cond_emb", arch.n_music, c, true)?,
            lpe: Lpe::load(gb.pp("pos_emb"), c, arch.lpe_bins)?,
            position_scale,
            base,
            head,
            head_base: BlockBase::load(gh.pp("block_base"), c, arch.n_head, arch.mlp_hidden)?,
            rms_f: RmsNorm::load(&gh, "RMS_f", c)?,
            head_up: Lin::load(&gh, "head_up", c, arch.vocab_up, false)?,
            head_down: Lin::load(&gh, "head_down", c, arch.vocab_down, false)?,
            mamba_impl,
            cuda_graphs: cuda_graphs_default(),
            host_ws: Default::default(),
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// Whether [`Gpt::last_logits`] (and so the sampler) replays CUDA graphs: on by default on
    /// a CUDA device in builds with the `cuda` feature, unless `DANCEBA_CUDA_GRAPHS=0`.
    pub fn cuda_graphs(&self) -> bool {
        cfg!(feature = "cuda") && self.device.is_cuda() && self.cuda_graphs
    }

    /// (window shapes seen, graphs captured, shapes whose capture failed) of the CUDA graphs.
    #[cfg(feature = "cuda")]
    pub fn cuda_graph_stats(&self) -> (usize, usize, usize) {
        self.graphs.stats()
    }

    /// Host-side time of the steps replayed from CUDA graphs so far.
    #[cfg(feature = "cuda")]
    pub fn cuda_graph_timing(&self) -> cuda_graph::GraphTiming {
        self.graphs.timing()
    }

    /// Turns the CUDA graphs on or off (no effect off CUDA).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
    }

    /// One forward pass of `b` windows of `t` positions from host data, returning the last
    /// position's logits of every window as f32: (b × vocab_up, b × vocab_down) values, row
    /// after row. `up`, `down`: b·t token ids; `cond`: b·t·n_music values, window-major.
    ///
    /// Equals [`Gpt::forward`] followed by the last row (to rounding: where the head's last
    /// block computes its queries, gate, MLP and norm only at the rows read, see
    /// `Gpt::sampler_logits`, its products have other shapes than in a whole forward). With
    /// [`Gpt::cuda_graphs`] on, the first call of a (b, t) runs the forward directly (warming
    /// up), the second captures it in a CUDA graph, and later calls only copy the inputs,
    /// replay the graph and read the logits.
    pub fn last_logits(
        &self,
        up: &[u32],
        down: &[u32],
        cond: &[f32],
        b: usize,
        t: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.last_logits_ahead(up, down, cond, b, t, None)
    }

    /// [`Gpt::last_logits`], told the condition of the next call's windows (`next`: its values
    /// and its number of windows). With CUDA graphs, while the GPU runs this call the host
    /// computes that window's LPE phase and stages it and the condition in the inputs of its
    /// shape's graph; the next call launches on them at once and uses the result only if its
    /// condition is the same bit for bit (otherwise it runs again on its own). Elsewhere `next`
    /// is ignored. The results are those of [`Gpt::last_logits`].
    pub fn last_logits_ahead(
        &self,
        up: &[u32],
        down: &[u32],
        cond: &[f32],
        b: usize,
        t: usize,
        next: Option<(&[f32], usize)>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let nm = self.arch.n_music;
        if b == 0 || t == 0 {
            return input_err(format!("empty window (batch {b}, t {t})"));
        }
        if cond.len() != b * t * nm {
            return input_err(format!(
                "window (batch {b}, t {t}) needs {} condition values, got {}",
                b * t * nm,
                cond.len()
            ));
        }
        let rows: Vec<&[f32]> = cond.chunks_exact(t * nm).collect();
        // the next call's `nb` windows (a hint that does not split evenly is dropped)
        let next_rows: Option<Vec<&[f32]>> = next.and_then(|(nc, nb)| {
            (nb > 0 && !nc.is_empty() && nc.len() % nb == 0)
                .then(|| nc.chunks_exact(nc.len() / nb).collect())
        });
        self.last_logits_windows(up, down, &rows, t, next_rows.as_deref())
    }

    /// [`Gpt::last_logits_ahead`] with the condition as one slice per window (`t · n_music`
    /// values each), the windows of the next call likewise: the sampler passes slices of the
    /// songs' conditions, with no copy on the step's path.
    pub fn last_logits_windows(
        &self,
        up: &[u32],
        down: &[u32],
        cond: &[&[f32]],
        t: usize,
        next: Option<&[&[f32]]>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut lu, mut ld) = (Vec::new(), Vec::new());
        self.last_logits_windows_into(up, down, cond, t, next, &mut lu, &mut ld)?;
        Ok((lu, ld))
    }

    /// [`Gpt::last_logits_windows`] into `lu` and `ld` (resized; their allocations reused):
    /// on the CPU with our GEMM kernels the step then allocates nothing once its buffers have
    /// the shape ([`cpu_step`]).
    #[allow(clippy::too_many_arguments)]
    pub fn last_logits_windows_into(
        &self,
        up: &[u32],
        down: &[u32],
        cond: &[&[f32]],
        t: usize,
        next: Option<&[&[f32]]>,
        lu: &mut Vec<f32>,
        ld: &mut Vec<f32>,
    ) -> Result<()> {
        #[cfg(not(feature = "cuda"))]
        let _ = next;
        let nm = self.arch.n_music;
        let b = cond.len();
        if b == 0 || t == 0 {
            return input_err(format!("empty window (batch {b}, t {t})"));
        }
        if up.len() != b * t || down.len() != b * t {
            return input_err(format!(
                "window (batch {b}, t {t}) needs {} token ids per stream, got {} / {}",
                b * t,
                up.len(),
                down.len()
            ));
        }
        if let Some((i, w)) = cond.iter().enumerate().find(|(_, w)| w.len() != t * nm) {
            return input_err(format!(
                "window {i} (t {t}) needs {} condition values, got {}",
                t * nm,
                w.len()
            ));
        }
        #[cfg(feature = "cuda")]
        if self.cuda_graphs() {
            self.check_window_len(t)?;
            check_token_ids(
                up.iter().map(|&x| x as i64),
                "upper-body",
                self.arch.vocab_up,
            )?;
            check_token_ids(
                down.iter().map(|&x| x as i64),
                "lower-body",
                self.arch.vocab_down,
            )?;
            // the condition is checked there (a staged window was checked a step ahead)
            (*lu, *ld) = cuda_graph::last_logits(self, &self.graphs, up, down, cond, t, next)?;
            return Ok(());
        }
        if self.cpu_host_step() {
            // on a thread of rayon's pool, as the candle forward below
            return rayon::scope(|_| self.last_logits_host(up, down, cond, t, lu, ld));
        }
        let cond = cond.concat();
        let dev = &self.device;
        let iu = Tensor::from_slice(up, (b, t), dev)?;
        let id = Tensor::from_slice(down, (b, t), dev)?;
        let c = Tensor::from_slice(&cond, (b, t, nm), dev)?;
        let forward = || self.forward_impl(&iu, &id, &c, false, self.sampler_logits());
        let tr = if dev.is_cpu() {
            // The whole forward on a thread of rayon's pool: its parallel loops then start from
            // a worker, which takes its share and wakes one other, instead of this thread
            // handing every loop to the pool and sleeping until it is done.
            rayon::scope(|_| forward())?
        } else {
            forward()?
        };
        // the last position's logits (the only ones with `Logits::Last`)
        let host = |l: Tensor| -> Result<Vec<f32>> {
            let t = l.dim(1)?;
            Ok(l.narrow(1, t - 1, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        (*lu, *ld) = (host(tr.logits_up)?, host(tr.logits_down)?);
        Ok(())
    }

    /// What [`Gpt::last_logits`] computes: the last rows only ([`Logits::Last`]), except on
    /// CUDA with f16/bf16 weights, where the last block's tensor-core products cost about the
    /// same at 3 rows as at 3t and the row copies the shortcut needs made the step 1–3 % slower
    /// on an H100 (f32 there: batch 8 3 % faster, batch 1 the same).
    pub(crate) fn sampler_logits(&self) -> Logits {
        if self.device.is_cuda() && self.dtype != DType::F32 {
            Logits::All
        } else {
            Logits::Last
        }
    }

    /// The precision of the residual stream and of everything between the linear layers. On
    /// the CPU it is f32 whatever the weights' dtype: with f16/bf16 weights only the GEMMs run
    /// in reduced precision (their inputs rounded to it), so that norms, softmax, activations
    /// and the residual sums keep f32 (this lifted bf16's teacher-forced agreement with f32).
    /// Elsewhere it is the weights' dtype (the CUDA kernels accumulate in f32 themselves).
    pub fn activation_dtype(&self) -> DType {
        if matches!(self.device, Device::Cpu) {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The sizes this model was loaded with.
    pub fn arch(&self) -> &GptArch {
        &self.arch
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The trained `position_scale`.
    pub fn position_scale(&self) -> f64 {
        self.position_scale
    }

    /// Which Mamba implementation runs (fused on the CPU by default, any dtype).
    pub fn mamba_impl(&self) -> MambaImpl {
        self.mamba_impl
    }

    /// Selects the Mamba implementation (`FusedCpu` falls back to `Portable` off the CPU).
    pub fn set_mamba_impl(&mut self, imp: MambaImpl) {
        self.mamba_impl = imp;
    }

    /// The largest window (tokens per stream) a forward pass accepts: `block_size`.
    pub fn max_window(&self) -> usize {
        self.arch.block_size
    }

    /// A window of `t` positions must fit the model's `block_size`.
    fn check_window_len(&self, t: usize) -> Result<()> {
        if t > self.arch.block_size {
            return input_err(format!(
                "a window of {t} positions exceeds the model's block_size {}",
                self.arch.block_size
            ));
        }
        Ok(())
    }

    /// Checks the shapes and values of one forward's inputs and returns the host copy of the
    /// condition, (B, t), and the token ids as u32 tensors.
    fn check_inputs(
        &self,
        idx_up: &Tensor,
        idx_down: &Tensor,
        cond: &Tensor,
    ) -> Result<(Vec<f32>, usize, usize, Tensor, Tensor)> {
        let (b, t, w) = match cond.dims() {
            [b, t, w] => (*b, *t, *w),
            d => {
                return input_err(format!(
                    "the condition must be (batch, t, n_music), got shape {d:?}"
                ))
            }
        };
        if w != self.arch.n_music {
            return input_err(format!(
                "the condition has {w} columns but this model takes {} music features per row",
                self.arch.n_music
            ));
        }
        if b == 0 || t == 0 {
            return input_err(format!("the condition is empty (shape {:?})", cond.dims()));
        }
        self.check_window_len(t)?;
        let host = cond.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        check_finite_condition(&host, t, w)?;
        let check_idx = |idx: &Tensor, name: &str, vocab: usize| -> Result<Tensor> {
            if idx.dims() != [b, t] {
                return input_err(format!(
                    "{name} token ids must be (batch {b}, t {t}) like the condition, got shape {:?}",
                    idx.dims()
                ));
            }
            let ids = match idx.dtype() {
                DType::U32 | DType::U8 | DType::I64 => idx.to_dtype(DType::I64)?,
                d => {
                    return input_err(format!(
                        "{name} token ids must be an integer tensor, got {d:?}"
                    ))
                }
            };
            let v = ids.flatten_all()?.to_vec1::<i64>()?;
            check_token_ids(v.iter().copied(), name, vocab)?;
            let v: Vec<u32> = v.iter().map(|&x| x as u32).collect();
            Ok(Tensor::from_vec(v, (b, t), &self.device)?)
        };
        let up = check_idx(idx_up, "upper-body", self.arch.vocab_up)?;
        let down = check_idx(idx_down, "lower-body", self.arch.vocab_down)?;
        Ok((host, b, t, up, down))
    }

    /// Forward pass: `idx_up`, `idx_down` (B, t) integer token ids, `cond` (B, t, n_music).
    /// Returns the logits (B, t, vocab_up) and (B, t, vocab_down).
    pub fn forward(
        &self,
        idx_up: &Tensor,
        idx_down: &Tensor,
        cond: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let tr = self.forward_impl(idx_up, idx_down, cond, false, Logits::All)?;
        Ok((tr.logits_up, tr.logits_down))
    }

    /// Forward pass keeping the intermediate values (see [`ForwardTrace`]).
    pub fn forward_trace(
        &self,
        idx_up: &Tensor,
        idx_down: &Tensor,
        cond: &Tensor,
    ) -> Result<ForwardTrace> {
        self.forward_impl(idx_up, idx_down, cond, true, Logits::All)
    }

    fn forward_impl(
        &self,
        idx_up: &Tensor,
        idx_down: &Tensor,
        cond: &Tensor,
        keep: bool,
        logits: Logits,
    ) -> Result<ForwardTrace> {
        let (host, b, t, up, down) = self.check_inputs(idx_up, idx_down, cond)?;
        let cond_t = Tensor::from_slice(&host, (b, t, self.arch.n_music), &self.device)?;
        let (phase, fc) = Lpe::cropped_phase_host(&host, b)?;
        let phase = Tensor::from_vec(phase, (b, fc, lpe::N_BINS), &self.device)?;
        let mask = tiled_causal_mask(t, &self.device)?.to_dtype(self.activation_dtype())?;
        self.forward_core(
            &CoreInputs {
                cond: &cond_t,
                up: &up,
                down: &down,
                phase: &phase,
                mask: &mask,
            },
            keep,
            logits,
        )
    }

    /// The device part of a forward pass, from inputs already on the device: no host
    /// synchronisation and no host data uploads besides small kernel parameters, so that it can
    /// be captured in a CUDA graph.
    fn forward_core(&self, inp: &CoreInputs, keep: bool, logits: Logits) -> Result<ForwardTrace> {
        let (b, t) = inp.up.dims2()?;
        let c = self.arch.n_embd;
        // on the CPU the embedding stage runs in f32 (activation_dtype) like the rest: the
        // f16/bf16 weights are widened in the products and the tables' rows exactly
        let act = self.activation_dtype();
        let ce = self.cond_emb.forward(&inp.cond.to_dtype(act)?)?;
        let lpe_out = self.lpe.forward_phase(inp.phase)?;
        if lpe_out.dim(1)? < 3 * t {
            return input_err(format!(
                "the LPE gives {} rows for a window of {t}, fewer than the 3t needed",
                lpe_out.dim(1)?
            ));
        }
        #[cfg(feature = "cuda")]
        if cuda_ops::usable(&ce) && act == self.dtype {
            let x = cuda_ops::embed(
                &ce,
                &self.tok_up,
                &self.tok_down,
                inp.up,
                inp.down,
                &lpe_out,
                self.position_scale,
            )?;
            return self.forward_blocks(x, lpe_out, inp, keep, logits);
        }
        let eu = self
            .tok_up
            .embedding(&inp.up.flatten_all()?)?
            .reshape((b, t, c))?
            .to_dtype(act)?;
        let ed = self
            .tok_down
            .embedding(&inp.down.flatten_all()?)?
            .reshape((b, t, c))?
            .to_dtype(act)?;
        let e = Tensor::cat(&[ce, eu, ed], 1)?;
        let p = (lpe_out.narrow(1, 0, 3 * t)? * self.position_scale)?;
        let x = (e + p.to_dtype(act)?)?;
        self.forward_blocks(x, lpe_out, inp, keep, logits)
    }

    /// The blocks and the heads, from the embedded input rows `x` (B, 3t, C).
    fn forward_blocks(
        &self,
        x: Tensor,
        lpe_out: Tensor,
        inp: &CoreInputs,
        keep: bool,
        logits: Logits,
    ) -> Result<ForwardTrace> {
        let t = inp.up.dim(1)?;
        let mut x = BlockBase::forward_chain(&self.base, &x, inp.mask)?;
        let base_out = x.clone();
        x = BlockHead::forward_chain(&self.head, &x, t, self.mamba_impl)?;
        let head_blocks_out = x.clone();
        let (up, down) = match logits {
            Logits::All => {
                // on CUDA the head's Block_Base ends in RMS_f's launch (with fc2's bias and
                // residual)
                let x = match self
                    .head_base
                    .forward_then_norm(&x, inp.mask, &self.rms_f)?
                {
                    (_, Some(n)) => n,
                    (x, None) => self.rms_f.forward(&x)?,
                };
                (x.narrow(1, t, t)?, x.narrow(1, 2 * t, t)?)
            }
            Logits::Last => {
                // the last row of each stream: (B, 3, C), music, upper, lower body
                let x = self.head_base.forward_last(&x, inp.mask, t, &self.rms_f)?;
                (x.narrow(1, 1, 1)?, x.narrow(1, 2, 1)?)
            }
        };
        let logits_up = self.head_up.forward(&up)?;
        let logits_down = self.head_down.forward(&down)?;
        let empty = || Tensor::zeros(0, self.dtype, &self.device);
        Ok(ForwardTrace {
            lpe_out: if keep { lpe_out } else { empty()? },
            base_out: if keep { base_out } else { empty()? },
            head_blocks_out: if keep { head_blocks_out } else { empty()? },
            logits_up,
            logits_down,
        })
    }
}

/// Which positions' logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Logits {
    /// Every position's: (B, t, vocab) per stream.
    All,
    /// The last position's only, (B, 1, vocab) per stream: the head's last block then computes
    /// its queries, gate, MLP and norm at the last row of each of the three streams alone (the
    /// sampler's case).
    Last,
}

/// The device inputs of [`Gpt::forward_core`].
struct CoreInputs<'a> {
    /// (B, t, n_music), any float dtype.
    cond: &'a Tensor,
    /// (B, t) u32 token ids, checked against the codebooks.
    up: &'a Tensor,
    down: &'a Tensor,
    /// The cropped STFT phase (B, F', bins), any float dtype.
    phase: &'a Tensor,
    /// [`tiled_causal_mask`] in the model's dtype.
    mask: &'a Tensor,
}
