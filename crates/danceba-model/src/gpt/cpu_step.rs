//! The sampler's generation step on the CPU on host buffers, without tensors: the same
//! layers and arithmetic as the candle forward ([`Gpt::forward_core`] with `Logits::Last`),
//! every product in [`super::cpu_gemm`], the Mamba layers in the fused kernels of
//! [`super::scan`], the norms, attention, LPE and embeddings on host rows, all written into a
//! [`Workspace`] that the model keeps. After the first step of a (batch, window) shape the
//! buffers have their size and a step allocates nothing (the thread pool's job queue aside:
//! rayon allocates a block of its injector queue once per 63 steps). Used where our GEMM
//! kernels run (x86-64 with AVX2 or AVX-512, AArch64) with the fused Mamba; elsewhere, and with
//! `DANCEBA_CPU_STEP=candle` (for comparisons), the candle forward runs.
//!
//! The results equal the candle forward's to float rounding: the attention's products and
//! the LPE's run in our GEMM rather than candle's, and the softmax sums in order (tested
//! against it in `tests/gpt_forward.rs`, `last_logits_match_the_whole_forward_at_the_last_row`
//! and `host_step_matches_the_candle_forward_on_odd_sizes`, and against the official step
//! logits in `tests/gpt_pipeline.rs`).

use super::block_base::{host_unavailable, tiled_causal_mask_host, Act};
use super::mamba::BlockHead;
use super::{check_finite_condition, check_token_ids, input_err, lpe, Gpt, Result};
use candle_core::{CpuStorage, Storage, Tensor};

/// `v` with at least `len` values (grown, never shrunk: no allocation once it has reached the
/// largest shape), its first `len` values returned (their contents unspecified).
pub(crate) fn grow(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// Scratch rows of one block (or of one stream of the head's blocks) on the host.
#[derive(Debug, Default)]
pub(crate) struct HostScratch {
    pub a: Vec<f32>,
    pub al: Vec<f32>,
    pub g: Vec<f32>,
    pub h: Vec<f32>,
    pub hl: Vec<f32>,
    pub ql: Vec<f32>,
    pub qkv: Vec<f32>,
    pub o: Vec<f32>,
    pub y: Vec<f32>,
    pub yg: Vec<f32>,
    pub s: Vec<f32>,
    pub m: Vec<f32>,
    pub f: Vec<f32>,
    pub xz: Vec<f32>,
    pub u: Vec<f32>,
    pub xd: Vec<f32>,
    pub dt: Vec<f32>,
    pub dpre: Vec<f32>,
    pub ys: Vec<f32>,
}

/// Everything a host step writes: kept by the model between steps.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    cond: Vec<f32>,
    phase: Vec<f32>,
    lpe: [Vec<f32>; 3],
    ce: Vec<f32>,
    x: Vec<f32>,
    mask: Vec<f32>,
    mask_t: usize,
    base: HostScratch,
    streams: [HostScratch; 3],
    last: Vec<f32>,
    rows: Vec<f32>,
}

/// Whether the host step is switched off (`DANCEBA_CPU_STEP=candle`, for comparisons).
fn switched_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| super::env_value("DANCEBA_CPU_STEP") == "candle")
}

/// Row `id` of the embedding table `table` (vocab × c, f32/f16/bf16 on the CPU) as f32 into
/// `out` (exact widening, as candle's `to_dtype`). `false` where the table is not there.
fn table_row(table: &Tensor, id: usize, out: &mut [f32]) -> bool {
    let c = out.len();
    let (st, layout) = table.storage_and_layout();
    let Some((o, _)) = layout.contiguous_offsets() else {
        return false;
    };
    let at = o + id * c;
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => out.copy_from_slice(&v[at..at + c]),
        Storage::Cpu(CpuStorage::F16(v)) => {
            for (d, s) in out.iter_mut().zip(&v[at..at + c]) {
                *d = s.to_f32();
            }
        }
        Storage::Cpu(CpuStorage::BF16(v)) => {
            for (d, s) in out.iter_mut().zip(&v[at..at + c]) {
                *d = s.to_f32();
            }
        }
        _ => return false,
    }
    true
}

impl Gpt {
    /// Whether the sampler's steps ([`Gpt::last_logits_windows`] and the generation built on
    /// it) run as the CPU host step here: the CPU with our GEMM kernels (x86-64 with AVX2 or
    /// AVX-512, AArch64) and the fused Mamba, unless `DANCEBA_CPU_STEP=candle`. Otherwise they run the
    /// candle forward.
    pub fn cpu_host_step(&self) -> bool {
        self.device.is_cpu()
            && super::cpu_gemm::available()
            && self.mamba_impl == super::MambaImpl::FusedCpu
            && !switched_off()
    }

    /// The last position's logits of `b` windows of `t` positions (the sampler's step, see
    /// [`Gpt::last_logits_windows`]) on host buffers into `lu` (b × vocab_up) and `ld`
    /// (b × vocab_down). Call only where [`Gpt::cpu_host_step`].
    pub(crate) fn last_logits_host(
        &self,
        up: &[u32],
        down: &[u32],
        cond: &[&[f32]],
        t: usize,
        lu: &mut Vec<f32>,
        ld: &mut Vec<f32>,
    ) -> Result<()> {
        // a clone used from another thread at the same time gets a workspace of its own
        let mut own = None;
        let mut guard = self.host_ws.try_lock().ok();
        let ws: &mut Workspace = match guard.as_deref_mut() {
            Some(ws) => ws,
            None => own.insert(Workspace::default()),
        };
        let arch = &self.arch;
        let (b, c, nm) = (cond.len(), arch.n_embd, arch.n_music);
        self.check_window_len(t)?;
        check_token_ids(up.iter().map(|&x| x as i64), "upper-body", arch.vocab_up)?;
        check_token_ids(
            down.iter().map(|&x| x as i64),
            "lower-body",
            arch.vocab_down,
        )?;
        // the windows' condition rows, contiguous (the LPE's STFT and cond_emb read them so)
        ws.cond.clear();
        for w in cond {
            ws.cond.extend_from_slice(w);
        }
        check_finite_condition(&ws.cond, t, nm)?;
        // the embeddings: cond_emb, the token tables, the LPE
        let fc = lpe::Lpe::cropped_phase_host_into(&ws.cond, b, &mut ws.phase)?;
        if fc < t {
            return input_err(format!(
                "the LPE gives {} rows for a window of {t}, fewer than the 3t needed",
                3 * fc
            ));
        }
        for (i, out) in ws.lpe.iter_mut().enumerate() {
            let out = grow(out, b * fc * c);
            if !self.lpe.forward_module_into(i, &ws.phase, b * fc, out)? {
                return Err(host_unavailable("the LPE"));
            }
        }
        let ce = grow(&mut ws.ce, b * t * c);
        let lin_cond = self
            .cond_emb
            .linear_into(&ws.cond, b * t, Act::Identity, None, None, ce)?;
        if !lin_cond {
            return Err(host_unavailable("cond_emb"));
        }
        let n = 3 * t;
        let x = grow(&mut ws.x, b * n * c);
        let scale = self.position_scale as f32;
        for bi in 0..b {
            for r in 0..n {
                let row = &mut x[(bi * n + r) * c..(bi * n + r + 1) * c];
                let ok = match r / t {
                    0 => {
                        row.copy_from_slice(&ce[(bi * t + r) * c..(bi * t + r + 1) * c]);
                        true
                    }
                    1 => table_row(&self.tok_up, up[bi * t + r - t] as usize, row),
                    _ => table_row(&self.tok_down, down[bi * t + r - 2 * t] as usize, row),
                };
                if !ok {
                    return Err(host_unavailable("the token embeddings"));
                }
                let (m, f) = (r / fc, r % fc);
                let p = &ws.lpe[m][(bi * fc + f) * c..(bi * fc + f + 1) * c];
                for (v, &pv) in row.iter_mut().zip(p) {
                    *v += pv * scale;
                }
            }
        }
        if ws.mask_t != t || ws.mask.len() != n * n {
            ws.mask.clear();
            ws.mask.resize(n * n, 0.0);
            tiled_causal_mask_host(t, &mut ws.mask);
            ws.mask_t = t;
        }
        for blk in &self.base {
            blk.forward_host(x, b, n, &ws.mask, &mut ws.base)?;
        }
        BlockHead::forward_chain_host(&self.head, x, b, t, &mut ws.streams)?;
        let last = grow(&mut ws.last, b * 3 * c);
        self.head_base
            .forward_last_host(x, b, t, &ws.mask, &self.rms_f, &mut ws.base, last)?;
        // the logits: the upper body's last row (stream 1) and the lower body's (stream 2)
        for (stream, head, out) in [(1, &self.head_up, lu), (2, &self.head_down, ld)] {
            let rows = grow(&mut ws.rows, b * c);
            for bi in 0..b {
                let from = (bi * 3 + stream) * c;
                rows[bi * c..(bi + 1) * c].copy_from_slice(&last[from..from + c]);
            }
            out.clear();
            out.resize(b * head.out_dim(), 0.0);
            if !head.linear_into(rows, b, Act::Identity, None, None, out)? {
                return Err(host_unavailable("the output heads"));
            }
        }
        Ok(())
    }
}
