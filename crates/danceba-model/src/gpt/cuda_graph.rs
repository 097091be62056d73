//! CUDA graphs of the GPT forward pass (feature `cuda`).
//!
//! A sampling step launches some 600 small kernels; through candle each costs several
//! microseconds of host time, which dominates the step on a fast GPU. Here the device part of
//! the forward ([`Gpt::forward_core`]) is captured once per window shape (batch, t) into a CUDA
//! graph and replayed: a step then costs four host→device copies into static input buffers
//! (token ids, condition, the STFT phase computed on the host), one graph launch and one copy of
//! the last position's logits back. The phase depends on the condition window only, which the
//! sampler knows a step ahead: given the next window's condition, a replay computes its phase on
//! the host while the GPU runs the graph, and the next call takes it when its condition is the
//! same, bit for bit (about a tenth of a step at batch 1 and 8 on an H100).
//!
//! The first call of a shape runs the forward directly through the same static buffers, with
//! candle's host→device cache on so that the small kernel-parameter uploads (shapes and strides)
//! are cached on the device, the kernels are loaded and cuBLAS has its workspace; the second
//! call captures, instantiates and launches the graph. Every temporary of the captured forward
//! is dropped before the capture ends (its allocation and free become graph nodes); the logits
//! are copied into a static output buffer inside the graph. A shape whose capture fails runs
//! directly from then on.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{result as cu, sys, CudaGraph, DevicePtr};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{DType, Device, Storage, Tensor, WithDType};

use super::block_base::tiled_causal_mask;
use super::lpe::{Lpe, N_BINS};
use super::{CoreInputs, Gpt, GptError, MambaImpl, Result};

/// A captured graph. `CudaGraph` is not `Send` (raw handles); it is only touched under the
/// cache's mutex, one thread at a time, as CUDA requires of graph objects.
struct Graph(CudaGraph);

// SAFETY: see above: every use of the handle is serialised by `GraphCache::entries`.
unsafe impl Send for Graph {}

/// The static buffers and the graph of one window shape.
struct Entry {
    up: Tensor,
    down: Tensor,
    cond: Tensor,
    phase: Tensor,
    mask: Tensor,
    /// (b, vocab_up + vocab_down) f32: the last position's logits.
    out: Tensor,
    graph: Option<Graph>,
    /// Direct runs so far (the first one warms up).
    runs: usize,
    /// The capture failed: run directly.
    failed: bool,
}

type Key = (usize, usize, u8);

/// Host-side time of the replayed steps, in seconds summed over `replays`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GraphTiming {
    /// Steps served by a graph replay.
    pub replays: usize,
    /// Computing the STFT phase of the condition windows (host).
    pub phase_s: f64,
    /// Copying the inputs into the static buffers.
    pub upload_s: f64,
    /// Launching the graph (host call).
    pub launch_s: f64,
    /// Waiting for the GPU to finish the graph.
    pub wait_s: f64,
    /// Copying the logits back.
    pub readback_s: f64,
    /// Computing the next window's phase while the GPU ran the graph (not on the step's path).
    pub ahead_s: f64,
    /// Steps that took the phase computed ahead.
    pub ahead_hits: usize,
}

/// The phase of a condition window computed ahead of its step (the buffers are kept from step
/// to step: no allocation on the step's path).
#[derive(Default)]
struct Ahead {
    cond: Vec<f32>,
    b: usize,
    phase: Vec<f32>,
    fc: usize,
    valid: bool,
}

impl Ahead {
    /// Whether this was computed from exactly `cond` split into `b` windows.
    fn is_for(&self, cond: &[f32], b: usize) -> bool {
        self.valid
            && self.b == b
            && self.cond.len() == cond.len()
            // bit for bit, without an early exit (so that it vectorises)
            && self
                .cond
                .iter()
                .zip(cond)
                .fold(0u32, |d, (x, y)| d | (x.to_bits() ^ y.to_bits()))
                == 0
    }
}

/// The graphs of one model, one per (batch, t, Mamba implementation).
#[derive(Default)]
pub struct GraphCache {
    entries: Mutex<HashMap<Key, Entry>>,
    timing: Mutex<GraphTiming>,
    ahead: Mutex<Ahead>,
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|m| m.len()).unwrap_or(0);
        write!(f, "GraphCache({n} shapes)")
    }
}

impl GraphCache {
    /// Host-side time of the replayed steps so far.
    pub fn timing(&self) -> GraphTiming {
        self.timing.lock().map(|t| *t).unwrap_or_default()
    }

    /// (shapes seen, graphs captured, shapes whose capture failed).
    pub fn stats(&self) -> (usize, usize, usize) {
        self.entries.lock().map_or((0, 0, 0), |m| {
            (
                m.len(),
                m.values().filter(|e| e.graph.is_some()).count(),
                m.values().filter(|e| e.failed).count(),
            )
        })
    }
}

fn imp_code(imp: MambaImpl) -> u8 {
    match imp {
        MambaImpl::Portable => 0,
        MambaImpl::FusedCpu => 1,
        MambaImpl::FusedCuda => 2,
    }
}

fn cuda_err(msg: String) -> GptError {
    GptError::Candle(candle_core::Error::Msg(msg))
}

/// The rows of a 2-D tensor of `T` as f32 (exact for f16/bf16).
fn widen<T: WithDType>(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<T>()?
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.to_f64() as f32).collect())
        .collect())
}

/// Copies `src` into the (contiguous, CUDA) tensor `dst` on its stream, without allocating.
fn upload<T: CudaDType + WithDType>(dst: &Tensor, src: &[T]) -> Result<()> {
    if dst.elem_count() != src.len() || dst.dtype() != T::DTYPE {
        return Err(cuda_err(format!(
            "CUDA graph input: {} {:?} values for a {:?} {:?} buffer",
            src.len(),
            T::DTYPE,
            dst.dims(),
            dst.dtype()
        )));
    }
    let (s, l) = dst.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        return Err(cuda_err(
            "CUDA graph input buffer is not on a CUDA device".into(),
        ));
    };
    let Some((start, _)) = l.contiguous_offsets() else {
        return Err(cuda_err("CUDA graph input buffer is not contiguous".into()));
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let stream = cs.device().cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    let ptr = ptr + (start * std::mem::size_of::<T>()) as u64;
    // SAFETY: `ptr` points into `slice`, which holds at least `start + src.len()` elements
    // (checked above); the copy is ordered on the stream that runs every kernel, and from
    // pageable memory it has read `src` when the call returns.
    unsafe { cu::memcpy_htod_async(ptr, src, stream.cu_stream()) }.w()?;
    Ok(())
}

impl Entry {
    fn new(gpt: &Gpt, b: usize, t: usize, fc: usize) -> Result<Self> {
        let dev = gpt.device();
        let a = gpt.arch();
        Ok(Self {
            up: Tensor::zeros((b, t), DType::U32, dev)?,
            down: Tensor::zeros((b, t), DType::U32, dev)?,
            // the logits in the model's dtype (the host converts them: no cast launches); the
            // inputs stay f32 (converting them on the host cost more than the casts at batch 8)
            cond: Tensor::zeros((b, t, a.n_music), DType::F32, dev)?,
            phase: Tensor::zeros((b, fc, N_BINS), DType::F32, dev)?,
            mask: tiled_causal_mask(t, dev)?.to_dtype(gpt.dtype)?,
            out: Tensor::zeros((b, a.vocab_up + a.vocab_down), gpt.dtype, dev)?,
            graph: None,
            runs: 0,
            failed: false,
        })
    }

    /// The forward from the static inputs into `out`; every temporary is dropped on return.
    fn run(&self, gpt: &Gpt) -> Result<()> {
        let tr = gpt.forward_core(
            &CoreInputs {
                cond: &self.cond,
                up: &self.up,
                down: &self.down,
                phase: &self.phase,
                mask: &self.mask,
            },
            true,
            gpt.sampler_logits(),
        )?;
        // the last position's logits, (b, vocab) each
        let last = |l: &Tensor| -> Result<Tensor> {
            let t = l.dim(1)?;
            Ok(l.narrow(1, t - 1, 1)?
                .squeeze(1)?
                .to_dtype(self.out.dtype())?
                .contiguous()?)
        };
        let lu = last(&tr.logits_up)?;
        let ld = last(&tr.logits_down)?;
        self.out.slice_set(&lu, 1, 0)?;
        self.out.slice_set(&ld, 1, lu.dim(1)?)?;
        Ok(())
    }
}

/// See [`Gpt::last_logits_ahead`]; the inputs are already checked (`next` is not: a bad one
/// only fails to match the next call's window).
#[allow(clippy::too_many_arguments)]
pub(crate) fn last_logits(
    gpt: &Gpt,
    cache: &GraphCache,
    up: &[u32],
    down: &[u32],
    cond: &[f32],
    b: usize,
    t: usize,
    next: Option<(&[f32], usize)>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let Device::Cuda(dev) = gpt.device() else {
        return Err(cuda_err("CUDA graphs need a CUDA device".into()));
    };
    let t0 = std::time::Instant::now();
    let mut ahead = cache
        .ahead
        .lock()
        .map_err(|_| cuda_err("the CUDA graph cache is poisoned".into()))?;
    let hit = ahead.is_for(cond, b);
    let computed;
    let (phase, fc) = if hit {
        (ahead.phase.as_slice(), ahead.fc)
    } else {
        computed = Lpe::cropped_phase_host(cond, b)?;
        (computed.0.as_slice(), computed.1)
    };
    let t1 = std::time::Instant::now();
    let mut map = cache
        .entries
        .lock()
        .map_err(|_| cuda_err("the CUDA graph cache is poisoned".into()))?;
    let key = (b, t, imp_code(gpt.mamba_impl()));
    let e = match map.entry(key) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => v.insert(Entry::new(gpt, b, t, fc)?),
    };
    upload(&e.up, up)?;
    upload(&e.down, down)?;
    upload(&e.cond, cond)?;
    upload(&e.phase, phase)?;
    let t2 = std::time::Instant::now();
    let mut replay = None;
    if let Some(g) = &e.graph {
        g.0.launch().w()?;
        let t3 = std::time::Instant::now();
        // the next window's phase while the GPU runs; an error there is the next call's to report
        ahead.valid = false;
        if let Some((nc, nb)) = next {
            let a = &mut *ahead;
            if let Ok(fc) = Lpe::cropped_phase_host_into(nc, nb, &mut a.phase) {
                a.cond.clear();
                a.cond.extend_from_slice(nc);
                (a.b, a.fc, a.valid) = (nb, fc, true);
            }
        }
        let t3a = std::time::Instant::now();
        dev.cuda_stream().synchronize().w()?;
        replay = Some((t3, t3a, std::time::Instant::now()));
    } else if e.failed {
        e.run(gpt)?;
    } else if e.runs == 0 {
        let _cache = dev.enable_cuda_graph_htod_cache();
        e.run(gpt)?;
        e.runs += 1;
    } else {
        let stream = dev.cuda_stream();
        let captured = {
            let _cache = dev.enable_cuda_graph_htod_cache();
            stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .w()?;
            let ran = e.run(gpt);
            let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
            match (ran, graph) {
                (Ok(()), Ok(Some(g))) => Ok(g),
                (Err(err), _) => Err(err.to_string()),
                (_, Err(err)) => Err(err.to_string()),
                (_, Ok(None)) => Err("empty graph".to_string()),
            }
        };
        match captured {
            Ok(g) => {
                if std::env::var_os("DANCEBA_CUDA_GRAPHS_DEBUG").is_some() {
                    eprintln!(
                        "danceba: CUDA graph of batch {b}, t {t}: {}",
                        node_counts(&g)
                    );
                }
                g.launch().w()?;
                e.graph = Some(Graph(g));
            }
            Err(why) => {
                // errors recorded while the failed capture unwound are stale now
                let _ = stream.context().check_err();
                if std::env::var_os("DANCEBA_CUDA_GRAPHS_DEBUG").is_some() {
                    eprintln!("danceba: CUDA graph capture of batch {b}, t {t} failed ({why}); running without a graph");
                }
                e.failed = true;
                e.run(gpt)?;
            }
        }
    }
    let out = match e.out.dtype() {
        DType::F16 => widen::<half::f16>(&e.out)?,
        DType::BF16 => widen::<half::bf16>(&e.out)?,
        _ => e.out.to_vec2::<f32>()?,
    };
    if let Some((t3, t3a, t4)) = replay {
        let t5 = std::time::Instant::now();
        if let Ok(mut tm) = cache.timing.lock() {
            tm.replays += 1;
            tm.phase_s += (t1 - t0).as_secs_f64();
            tm.upload_s += (t2 - t1).as_secs_f64();
            tm.launch_s += (t3 - t2).as_secs_f64();
            tm.ahead_s += (t3a - t3).as_secs_f64();
            tm.ahead_hits += usize::from(hit);
            tm.wait_s += (t4 - t3a).as_secs_f64();
            tm.readback_s += (t5 - t4).as_secs_f64();
        }
    }
    let vu = gpt.arch().vocab_up;
    let mut lu = Vec::with_capacity(b * vu);
    let mut ld = Vec::with_capacity(b * gpt.arch().vocab_down);
    for row in &out {
        lu.extend_from_slice(&row[..vu]);
        ld.extend_from_slice(&row[vu..]);
    }
    Ok((lu, ld))
}

/// The graph's nodes counted by type, for the debug output.
fn node_counts(g: &CudaGraph) -> String {
    let mut n = 0usize;
    // SAFETY: the graph handle is valid while `g` lives; the first call only counts.
    if unsafe { sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) }
        != sys::CUresult::CUDA_SUCCESS
    {
        return "node count unavailable".into();
    }
    let mut nodes = vec![std::ptr::null_mut(); n];
    // SAFETY: `nodes` has room for the `n` nodes counted above.
    if unsafe { sys::cuGraphGetNodes(g.cu_graph(), nodes.as_mut_ptr(), &mut n) }
        != sys::CUresult::CUDA_SUCCESS
    {
        return "node list unavailable".into();
    }
    let mut by_type = std::collections::BTreeMap::<String, usize>::new();
    for &node in nodes.iter().take(n) {
        let mut ty = std::mem::MaybeUninit::<sys::CUgraphNodeType>::uninit();
        // SAFETY: `node` belongs to the graph; `ty` is written on success.
        let key = if unsafe { sys::cuGraphNodeGetType(node, ty.as_mut_ptr()) }
            == sys::CUresult::CUDA_SUCCESS
        {
            // SAFETY: initialised by the successful call.
            format!("{:?}", unsafe { ty.assume_init() })
        } else {
            "unknown".into()
        };
        *by_type.entry(key).or_default() += 1;
    }
    let parts: Vec<String> = by_type.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("{n} nodes: {}", parts.join(", "))
}
