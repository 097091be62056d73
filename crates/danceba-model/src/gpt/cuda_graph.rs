//! CUDA graphs of the GPT forward pass (feature `cuda`).
//!
//! A sampling step launches some 600 small kernels; through candle each costs several
//! microseconds of host time, which dominates the step on a fast GPU. Here the device part of
//! the forward ([`Gpt::forward_core`]) is captured once per window shape (batch, t) into a CUDA
//! graph and replayed. The condition window of the next step is known a step ahead (the
//! sampler passes it along), so while the GPU runs a replay the host computes that window's STFT
//! phase and copies it and the condition into the graph's static inputs, in stream order behind
//! the replay, from page-locked memory. The next step then launches at once after copying its
//! token ids (the only inputs that depend on the step just sampled), and checks while the GPU
//! runs that its condition is the staged one, bit for bit; if not, it waits, uploads its own
//! inputs and replays again. The logits come back by an asynchronous copy into page-locked
//! memory queued behind the graph. At batch 8 on an H200 this took a step from 1.98–2.04 ms to
//! 1.79–1.80 ms (upload, phase lookup and read-back off the step's path).
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
use candle_core::cuda_backend::cudarc::driver::{
    result as cu, sys, CudaEvent, CudaGraph, CudaStream, DevicePtr, PinnedHostSlice,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{DType, Device, Storage, Tensor, WithDType};

use super::block_base::tiled_causal_mask;
use super::lpe::{Lpe, N_BINS};
use super::{check_finite_condition, CoreInputs, Gpt, GptError, MambaImpl, Result};

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
    /// The page-locked buffers of the replays (with the graph).
    io: Option<Io>,
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
    /// Computing the STFT phase of a condition window on the step's path (steps whose window
    /// was not staged).
    pub phase_s: f64,
    /// Copying a condition window and its phase from pageable memory (steps whose window was
    /// not staged).
    pub upload_s: f64,
    /// Queueing the token ids' copy, the graph and the logits' copy back (host calls).
    pub launch_s: f64,
    /// Waiting for the GPU to finish the graph and the logits' copy.
    pub wait_s: f64,
    /// Converting the logits read back to f32.
    pub readback_s: f64,
    /// While the GPU ran: checking the staged window against the step's, computing the next
    /// window's phase and staging its inputs (not on the step's path).
    pub ahead_s: f64,
    /// Steps launched on a staged condition window.
    pub ahead_hits: usize,
}

impl GraphTiming {
    fn add(&mut self, o: &GraphTiming) {
        self.replays += o.replays;
        self.phase_s += o.phase_s;
        self.upload_s += o.upload_s;
        self.launch_s += o.launch_s;
        self.wait_s += o.wait_s;
        self.readback_s += o.readback_s;
        self.ahead_s += o.ahead_s;
        self.ahead_hits += o.ahead_hits;
    }
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
    /// The shape whose static inputs hold this window (staged behind the previous replay).
    staged: Option<Key>,
}

impl Ahead {
    /// Whether this was computed from exactly the windows `cond`.
    fn is_for(&self, cond: &[&[f32]]) -> bool {
        let per = self.cond.len() / self.b.max(1);
        self.valid
            && self.b == cond.len()
            && cond.iter().all(|w| w.len() == per)
            && self.cond.chunks_exact(per.max(1)).zip(cond).all(|(a, w)| {
                // bit for bit, without an early exit within a window (so that it vectorises)
                a.iter()
                    .zip(w.iter())
                    .fold(0u32, |d, (x, y)| d | (x.to_bits() ^ y.to_bits()))
                    == 0
            })
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

/// The device address of the first element of the (contiguous, CUDA) tensor `t` of `T`s,
/// checked to hold exactly `len` of them.
fn device_ptr<T: CudaDType + WithDType>(t: &Tensor, len: usize) -> Result<u64> {
    if t.elem_count() != len || t.dtype() != T::DTYPE {
        return Err(cuda_err(format!(
            "CUDA graph buffer: {len} {:?} values for a {:?} {:?} buffer",
            T::DTYPE,
            t.dims(),
            t.dtype()
        )));
    }
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        return Err(cuda_err("CUDA graph buffer is not on a CUDA device".into()));
    };
    let Some((start, _)) = l.contiguous_offsets() else {
        return Err(cuda_err("CUDA graph buffer is not contiguous".into()));
    };
    let slice = cs.as_cuda_slice::<T>()?;
    let stream = cs.device().cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr + (start * std::mem::size_of::<T>()) as u64)
}

/// Copies `src` into the (contiguous, CUDA) tensor `dst` on `stream`, without allocating. From
/// pageable memory the call has read `src` when it returns; from page-locked memory the copy
/// runs later, in stream order, and `src` must stay untouched until it has.
fn upload<T: CudaDType + WithDType>(dst: &Tensor, src: &[T], stream: &CudaStream) -> Result<()> {
    let ptr = device_ptr::<T>(dst, src.len())?;
    // SAFETY: `ptr` addresses `src.len()` elements of `dst` (checked above); the copy is
    // ordered on the stream that runs every kernel (see the caller for `src`'s lifetime).
    unsafe { cu::memcpy_htod_async(ptr, src, stream.cu_stream()) }.w()?;
    Ok(())
}

/// Page-locked host buffers for a captured shape's inputs and output, so that their copies are
/// asynchronous: the token ids, the staged condition and phase of a next window, the logits
/// read back, and the events that order their reuse.
struct Io {
    up: PinnedHostSlice<u32>,
    down: PinnedHostSlice<u32>,
    cond: PinnedHostSlice<f32>,
    phase: PinnedHostSlice<f32>,
    /// The logits as raw bytes of the model's dtype.
    out: PinnedHostSlice<u8>,
    /// Recorded after a replay's logits are copied into `out`.
    done: CudaEvent,
    /// Recorded after `cond` and `phase` were last copied to the device.
    staged: CudaEvent,
}

impl Io {
    fn new(dev: &candle_core::CudaDevice, e: &Entry) -> Result<Self> {
        let ctx = dev.cuda_stream().context().clone();
        let out_bytes = e.out.elem_count() * e.out.dtype().size_in_bytes();
        // SAFETY: page-locked allocations (not write-combined: the host reads `out` and
        // nothing is read before it is written).
        unsafe {
            Ok(Self {
                up: ctx.alloc_pinned_with_flags(e.up.elem_count(), 0).w()?,
                down: ctx.alloc_pinned_with_flags(e.down.elem_count(), 0).w()?,
                cond: ctx.alloc_pinned_with_flags(e.cond.elem_count(), 0).w()?,
                phase: ctx.alloc_pinned_with_flags(e.phase.elem_count(), 0).w()?,
                out: ctx.alloc_pinned_with_flags(out_bytes, 0).w()?,
                done: ctx.new_event(None).w()?,
                staged: ctx.new_event(None).w()?,
            })
        }
    }
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
            io: None,
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

    /// Replays the graph on the token ids `up`, `down` and whatever condition and phase the
    /// static buffers hold: the ids go through the page-locked buffers, the logits come back
    /// into `io.out` and `io.done` marks the end. Returns without waiting for the GPU.
    fn replay(&mut self, up: &[u32], down: &[u32], stream: &CudaStream) -> Result<()> {
        let (Some(g), Some(io)) = (&self.graph, &mut self.io) else {
            return Err(cuda_err("no captured CUDA graph to replay".into()));
        };
        // the previous replay's copies of the ids were done before its graph ran, and its
        // end was waited for: the buffers are free
        io.up.as_mut_slice().w()?.copy_from_slice(up);
        io.down.as_mut_slice().w()?.copy_from_slice(down);
        upload(&self.up, io.up.as_slice().w()?, stream)?;
        upload(&self.down, io.down.as_slice().w()?, stream)?;
        g.0.launch().w()?;
        let n = io.out.len();
        let src = match self.out.dtype() {
            DType::F16 => device_ptr::<half::f16>(&self.out, n / 2)?,
            DType::BF16 => device_ptr::<half::bf16>(&self.out, n / 2)?,
            _ => device_ptr::<f32>(&self.out, n / 4)?,
        };
        // SAFETY: `src` addresses the `n` bytes of `out`; `io.out` is page-locked and is read
        // only after `done`, recorded next, has completed.
        unsafe { cu::memcpy_dtoh_async(io.out.as_mut_slice().w()?, src, stream.cu_stream()) }
            .w()?;
        io.done.record(stream).w()?;
        Ok(())
    }

    /// The logits of the last replay, (b, vocab_up + vocab_down) as f32, once `io.done`.
    fn replayed_logits(&self) -> Result<Vec<f32>> {
        let Some(io) = &self.io else {
            return Err(cuda_err("no captured CUDA graph to read".into()));
        };
        io.done.synchronize().w()?;
        let bytes = io.out.as_slice().w()?;
        Ok(match self.out.dtype() {
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        })
    }

    /// The logits of a direct run, (b, vocab_up + vocab_down) as f32 (waits for the GPU).
    fn direct_logits(&self) -> Result<Vec<f32>> {
        let rows = match self.out.dtype() {
            DType::F16 => widen::<half::f16>(&self.out)?,
            DType::BF16 => widen::<half::bf16>(&self.out)?,
            _ => self.out.to_vec2::<f32>()?,
        };
        Ok(rows.concat())
    }
}

/// See [`Gpt::last_logits_ahead`]; the token ids and the window length are already checked,
/// the condition is checked here (`next` is not: a bad one is not staged, and only fails to
/// match the next call's window).
///
/// A replayed step whose condition and phase were staged by the previous call (its `next`)
/// launches first and checks after: while the GPU runs, the condition is compared with the
/// staged one bit for bit (the staged one was checked finite), and a mismatch waits, uploads
/// the right inputs and replays again. Then the next window's phase is computed and, when its
/// shape has a graph, its condition and phase are copied to that graph's static buffers in
/// stream order behind this replay. So a steady step puts only the token ids' copy, the
/// launch and the logits' read-back on its path.
#[allow(clippy::too_many_arguments)]
pub(crate) fn last_logits(
    gpt: &Gpt,
    cache: &GraphCache,
    up: &[u32],
    down: &[u32],
    cond: &[&[f32]],
    t: usize,
    next: Option<&[&[f32]]>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let b = cond.len();
    let Device::Cuda(dev) = gpt.device() else {
        return Err(cuda_err("CUDA graphs need a CUDA device".into()));
    };
    let stream = dev.cuda_stream();
    let nm = gpt.arch().n_music;
    let mut ahead = cache
        .ahead
        .lock()
        .map_err(|_| cuda_err("the CUDA graph cache is poisoned".into()))?;
    let mut map = cache
        .entries
        .lock()
        .map_err(|_| cuda_err("the CUDA graph cache is poisoned".into()))?;
    let key = (b, t, imp_code(gpt.mamba_impl()));
    // what a previous call staged is consumed here, whatever this call turns out to be
    let staged = ahead.staged.take() == Some(key);
    let fast = staged
        && map
            .get(&key)
            .is_some_and(|e| e.graph.is_some() && e.io.is_some());
    let mut timing = GraphTiming::default();
    let mut replayed = false;
    let mut hit = false;
    if fast {
        let e = map.get_mut(&key).expect("checked above");
        let t1 = std::time::Instant::now();
        e.replay(up, down, &stream)?;
        let t2 = std::time::Instant::now();
        timing.launch_s = (t2 - t1).as_secs_f64();
        hit = ahead.is_for(cond);
        if hit {
            replayed = true;
        } else if let Some(io) = &e.io {
            // not the staged window: wait for the GPU, then take the slow path
            io.done.synchronize().w()?;
        }
        timing.ahead_s = t2.elapsed().as_secs_f64();
    }
    if !replayed {
        let cond_is_ahead = ahead.is_for(cond);
        let cond = cond.concat();
        let cond = cond.as_slice();
        check_finite_condition(cond, t, nm)?;
        let t0 = std::time::Instant::now();
        let computed;
        let (phase, fc) = if cond_is_ahead {
            (ahead.phase.as_slice(), ahead.fc)
        } else {
            computed = Lpe::cropped_phase_host(cond, b)?;
            (computed.0.as_slice(), computed.1)
        };
        let t1 = std::time::Instant::now();
        timing.phase_s = (t1 - t0).as_secs_f64();
        let e = match map.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Entry::new(gpt, b, t, fc)?),
        };
        // pageable copies: the call returns when they have read the host slices
        upload(&e.cond, cond, &stream)?;
        upload(&e.phase, phase, &stream)?;
        let t2 = std::time::Instant::now();
        timing.upload_s = (t2 - t1).as_secs_f64();
        if e.graph.is_some() && e.io.is_some() {
            e.replay(up, down, &stream)?;
            replayed = true;
        } else {
            upload(&e.up, up, &stream)?;
            upload(&e.down, down, &stream)?;
            run_or_capture(gpt, dev, e, b, t)?;
        }
        timing.launch_s = t2.elapsed().as_secs_f64();
    }
    // the direct runs read their logits now (a wait on the whole stream), before anything
    // more is queued on it
    let direct = if replayed {
        None
    } else {
        Some(map.get(&key).expect("inserted above").direct_logits()?)
    };
    // the next window: its phase on the host while the GPU runs, and its inputs staged
    let t3 = std::time::Instant::now();
    ahead.valid = false;
    if let Some(next) = next.filter(|w| !w.is_empty()) {
        let a = &mut *ahead;
        let nb = next.len();
        a.cond.clear();
        for w in next {
            a.cond.extend_from_slice(w);
        }
        let nc = a.cond.as_slice();
        let per = next[0].len();
        if next.iter().all(|w| w.len() == per) {
            if let Ok(fc) = Lpe::cropped_phase_host_into(nc, nb, &mut a.phase) {
                (a.b, a.fc, a.valid) = (nb, fc, true);
            }
        }
        if a.valid {
            let nt = per / nm;
            let nkey = (nb, nt, key.2);
            if nt > 0 && nt * nm == per && check_finite_condition(nc, nt, nm).is_ok() {
                if let Some(ne) = map.get_mut(&nkey) {
                    if stage(ne, &a.cond, &a.phase, &stream)? {
                        a.staged = Some(nkey);
                    }
                }
            }
        }
    }
    timing.ahead_s += t3.elapsed().as_secs_f64();
    let t4 = std::time::Instant::now();
    let out = match direct {
        Some(v) => v,
        None => {
            let e = map.get(&key).expect("inserted above");
            let v = e.replayed_logits()?;
            let t5 = std::time::Instant::now();
            timing.wait_s = (t5 - t4).as_secs_f64();
            v
        }
    };
    if replayed {
        timing.readback_s = t4.elapsed().as_secs_f64() - timing.wait_s;
        timing.replays = 1;
        timing.ahead_hits = usize::from(hit);
        if let Ok(mut tm) = cache.timing.lock() {
            tm.add(&timing);
        }
    }
    let vu = gpt.arch().vocab_up;
    let w = out.len() / b.max(1);
    let mut lu = Vec::with_capacity(b * vu);
    let mut ld = Vec::with_capacity(b * (w - vu));
    for row in out.chunks_exact(w) {
        lu.extend_from_slice(&row[..vu]);
        ld.extend_from_slice(&row[vu..]);
    }
    Ok((lu, ld))
}
/// Copies a next window's condition and phase into the page-locked buffers of `e` and on to
/// its static inputs, in stream order behind everything queued so far. False (nothing done)
/// when `e` has no graph or other shapes.
fn stage(e: &mut Entry, cond: &[f32], phase: &[f32], stream: &CudaStream) -> Result<bool> {
    let Some(io) = &mut e.io else {
        return Ok(false);
    };
    if e.graph.is_none() || io.cond.len() != cond.len() || io.phase.len() != phase.len() {
        return Ok(false);
    }
    // the buffers' previous copies to the device must have read them
    io.staged.synchronize().w()?;
    io.cond.as_mut_slice().w()?.copy_from_slice(cond);
    io.phase.as_mut_slice().w()?.copy_from_slice(phase);
    upload(&e.cond, io.cond.as_slice().w()?, stream)?;
    upload(&e.phase, io.phase.as_slice().w()?, stream)?;
    io.staged.record(stream).w()?;
    Ok(true)
}

/// A shape without a graph: the first call runs the forward directly (warming up), the second
/// captures the graph and launches it; a shape whose capture failed runs directly. The inputs
/// are in the static buffers; the logits are left in `e.out`.
fn run_or_capture(
    gpt: &Gpt,
    dev: &candle_core::CudaDevice,
    e: &mut Entry,
    b: usize,
    t: usize,
) -> Result<()> {
    if e.failed {
        return e.run(gpt);
    }
    if e.runs == 0 {
        let _cache = dev.enable_cuda_graph_htod_cache();
        e.run(gpt)?;
        e.runs += 1;
        return Ok(());
    }
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
    let debug = std::env::var_os("DANCEBA_CUDA_GRAPHS_DEBUG").is_some();
    match captured {
        Ok(g) => {
            if debug {
                eprintln!(
                    "danceba: CUDA graph of batch {b}, t {t}: {}",
                    node_counts(&g)
                );
            }
            g.launch().w()?;
            e.io = Some(Io::new(dev, e)?);
            e.graph = Some(Graph(g));
        }
        Err(why) => {
            // errors recorded while the failed capture unwound are stale now
            let _ = stream.context().check_err();
            if debug {
                eprintln!("danceba: CUDA graph capture of batch {b}, t {t} failed ({why}); running without a graph");
            }
            e.failed = true;
            e.run(gpt)?;
        }
    }
    Ok(())
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
