//! `danceba bench`: speed of GPT generation steps (real-size model, random weights by
//! default), of VQ-VAE decoding, and of music feature extraction.
//!
//! The GPT measurement runs the real sampler (`Gpt::generate_batch`) on random conditions of
//! `28 + steps` rows and timestamps every step through the progress callback: steps 0..27 are
//! the ramp (window t = 1..28), the following ones the steady state (t = 28).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use danceba_model::arch::GptArch;
use danceba_model::gpt::random::{official_gpt_arch, random_gpt, random_gpt_on};
use danceba_model::gpt::{GenerateOptions, Gpt, MambaImpl};
use danceba_model::vqvae::{official_vqvae_arch, random_vqvae};
use serde_json::json;

/// Motion frames per generated token (60 fps, 8 frames per VQ-VAE token).
const FRAMES_PER_STEP: f64 = 8.0;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// GPT generation steps.
    Gpt,
    /// Music feature extraction from an audio file (`--audio`).
    Features,
    /// VQ-VAE decoding of `--tokens` token pairs (real-size model, random weights).
    Vqvae,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MambaArg {
    /// Fused kernels of the device (CPU; CUDA with the `cuda` feature). The default.
    Fused,
    /// Standard candle ops (the reference path).
    Portable,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

/// Arguments of `danceba bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to measure, comma-separated: gpt, features, vqvae.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "gpt")]
    what: Vec<What>,
    /// GPT checkpoint (.pt or .safetensors). Default: the real-size architecture with random
    /// weights in the official layout.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Attention heads of the `--weights` checkpoint if its config does not say.
    #[arg(long)]
    n_head: Option<usize>,
    /// Where to run the GPT: cpu, cuda, metal or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Precision of the GPT weights and activations: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Batch sizes to measure (songs advanced together), comma-separated, e.g. 1,8.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Steady-state steps (window t = 28) to time after the 28-step ramp.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Mamba implementation.
    #[arg(long, value_enum, default_value = "fused")]
    mamba: MambaArg,
    /// CUDA graphs of the GPT forward on a CUDA device (on by default; `off` runs every step
    /// op by op, as with DANCEBA_CUDA_GRAPHS=0).
    #[arg(long, value_enum)]
    cuda_graphs: Option<OnOff>,
    /// Audio file for `--what features`.
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Token pairs to decode for `--what vqvae` (151 ≈ 20 s of motion).
    #[arg(long, default_value_t = 151)]
    tokens: usize,
    /// Times to repeat the feature extraction and the VQ-VAE decoding.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Peak resident set size in MiB (Linux: VmHWM), if known.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time (user + system) of this process in seconds, if known (Linux: /proc/self/stat,
/// assuming the usual 100 ticks per second).
fn process_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the parenthesised command name; utime and stime are fields 14 and 15
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / 100.0)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => bail!("unknown --dtype {s:?}; choose f32, f16 or bf16"),
    }
}

fn load_gpt(args: &Args, dev: &Device, dtype: DType) -> anyhow::Result<(Gpt, String)> {
    match &args.weights {
        Some(p) => {
            let sd = danceba_model::checkpoint::load_on(p, dev, dtype)
                .with_context(|| format!("reading the GPT checkpoint {}", p.display()))?;
            let arch = GptArch::from_state_dict(&sd, args.n_head)
                .with_context(|| format!("{} is not a DanceBa GPT checkpoint", p.display()))?;
            let gpt = Gpt::load(sd.var_builder(dtype, dev), &arch)
                .with_context(|| format!("loading the GPT from {}", p.display()))?;
            Ok((gpt, p.display().to_string()))
        }
        None if matches!(dev, Device::Cpu) && dtype == DType::F32 => {
            let gpt = random_gpt(&official_gpt_arch(), args.seed)
                .context("building the real-size GPT with random weights")?;
            Ok((gpt, "random (real-size official layout)".into()))
        }
        None => {
            let gpt = random_gpt_on(&official_gpt_arch(), args.seed, dev, dtype)
                .context("building the real-size GPT with random weights on the device")?;
            Ok((gpt, "random (real-size official layout)".into()))
        }
    }
}

struct GptResult {
    batch: usize,
    ramp_s: f64,
    steady_mean_s: f64,
    steady_min_s: f64,
    steady_steps: usize,
    /// CPU seconds (all threads) per steady step, if known.
    steady_cpu_s: Option<f64>,
}

fn bench_gpt(gpt: &Gpt, batch: usize, steps: usize, seed: u64) -> anyhow::Result<GptResult> {
    let arch = gpt.arch();
    let ramp_len = arch.block_size.saturating_sub(1).max(1);
    let rows = ramp_len + steps;
    let mut conds = Vec::with_capacity(batch);
    for i in 0..batch {
        // deterministic pseudo-random features in [0, 1)
        let mut s = seed
            .wrapping_add(i as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            | 1;
        let data: Vec<f32> = (0..rows * arch.n_music)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect();
        conds.push(Tensor::from_vec(data, (rows, arch.n_music), gpt.device())?);
    }
    if gpt.cuda_graphs() {
        // untimed: the first sight of every window shape warms it up and the second t = 28
        // window captures its graph, so the timed run's steady steps are replays (its ramp
        // captures the graphs of t = 1..27)
        let warm: Vec<Tensor> = conds
            .iter()
            .map(|c| c.narrow(0, 0, (ramp_len + 1).min(rows)))
            .collect::<candle_core::Result<_>>()?;
        gpt.generate_batch(&warm, &GenerateOptions::default(), &mut |_, _| {})
            .context("warming up the CUDA graphs")?;
    }
    let mut stamps = Vec::with_capacity(rows + 1);
    // the process's CPU time after the ramp and at the end only (reading it costs tens of
    // microseconds, a few per cent of a GPU step)
    let (mut cpu_ramp, mut cpu_end) = (None, None);
    stamps.push(Instant::now());
    gpt.generate_batch(&conds, &GenerateOptions::default(), &mut |k, total| {
        stamps.push(Instant::now());
        if k == ramp_len && k < total {
            cpu_ramp = process_cpu_s();
        } else if k == total {
            cpu_end = process_cpu_s();
        }
    })
    .context("running the sampler")?;
    let steady_cpu_s = match (cpu_ramp, cpu_end) {
        (Some(a), Some(b)) if rows > ramp_len => Some((b - a) / (rows - ramp_len) as f64),
        _ => None,
    };
    let dt: Vec<f64> = stamps
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let ramp_s: f64 = dt[..ramp_len.min(dt.len())].iter().sum();
    let steady = &dt[ramp_len.min(dt.len())..];
    let (mean, min) = if steady.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (
            steady.iter().sum::<f64>() / steady.len() as f64,
            steady.iter().copied().fold(f64::INFINITY, f64::min),
        )
    };
    Ok(GptResult {
        batch,
        ramp_s,
        steady_mean_s: mean,
        steady_min_s: min,
        steady_steps: steady.len(),
        steady_cpu_s,
    })
}

/// The graph replay counters of `gpt` (replays, phase, upload, launch, GPU wait, readback
/// seconds, the next phase computed during the GPU's run, steps that used it); zeros without
/// CUDA.
fn graph_timing(gpt: &Gpt) -> [f64; 8] {
    #[cfg(feature = "cuda")]
    {
        let t = gpt.cuda_graph_timing();
        [
            t.replays as f64,
            t.phase_s,
            t.upload_s,
            t.launch_s,
            t.wait_s,
            t.readback_s,
            t.ahead_s,
            t.ahead_hits as f64,
        ]
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = gpt;
        [0.0; 8]
    }
}

/// Mean milliseconds per replayed step between two [`graph_timing`] readings.
fn graph_timing_json(before: [f64; 8], after: [f64; 8]) -> serde_json::Value {
    let n = after[0] - before[0];
    if n <= 0.0 {
        return serde_json::Value::Null;
    }
    let ms = |i: usize| (after[i] - before[i]) * 1e3 / n;
    json!({
        "replays": n,
        "phase": ms(1),
        "upload": ms(2),
        "launch": ms(3),
        "gpu_wait": ms(4),
        "readback": ms(5),
        "next_phase_during_gpu": ms(6),
        "phase_ahead_hits": after[7] - before[7],
    })
}

/// Upper limits of the counts `bench` takes: far above any useful measurement, low enough that
/// a typo gets an error instead of an allocation failure that aborts the process.
const MAX_THREADS: usize = 1024;
const MAX_BATCH: usize = 256;
const MAX_STEPS: usize = 100_000;
const MAX_TOKENS: usize = 100_000;
const MAX_REPEAT: usize = 1000;

/// `value` of `flag` within `1..=max`, or an error that says so.
fn check_count(flag: &str, value: usize, max: usize) -> anyhow::Result<()> {
    if value == 0 || value > max {
        bail!("{flag} must be between 1 and {max} (got {value})");
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    for &b in &args.batch {
        check_count("--batch", b, MAX_BATCH)?;
    }
    check_count("--steps", args.steps, MAX_STEPS)?;
    check_count("--tokens", args.tokens, MAX_TOKENS)?;
    check_count("--repeat", args.repeat, MAX_REPEAT)?;
    if let Some(n) = args.threads {
        check_count("--threads", n, MAX_THREADS)?;
        // read by rayon's global pool and by candle's CPU kernels at first use
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if args.what.contains(&What::Features) && args.audio.is_none() {
        bail!("`--what features` needs an audio file: pass --audio PATH");
    }
    let choice: danceba_model::device::DeviceChoice = args.device.parse()?;
    let device = danceba_model::device::open(choice).context("opening the --device")?;
    if args.cuda_graphs.is_some() && !device.is_cuda() {
        bail!("--cuda-graphs applies to CUDA devices only: pass --device cuda, or leave it out");
    }
    let dtype = parse_dtype(&args.dtype)?;
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut report = json!({
        "machine": { "cpu": cpu_name(), "logical_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) },
        "threads": threads,
        "device": danceba_model::device::describe(&device),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    if args.what.contains(&What::Gpt) {
        let t0 = Instant::now();
        let (mut gpt, source) = load_gpt(&args, &device, dtype)?;
        let load_s = t0.elapsed().as_secs_f64();
        gpt.set_mamba_impl(match args.mamba {
            MambaArg::Fused if device.is_cuda() => MambaImpl::FusedCuda,
            MambaArg::Fused => MambaImpl::FusedCpu,
            MambaArg::Portable => MambaImpl::Portable,
        });
        if let Some(g) = args.cuda_graphs {
            gpt.set_cuda_graphs(g == OnOff::On);
        }
        // the CPU's linear layers: our kernel (which version) or candle's GEMM
        let cpu_gemm = if gpt.device().is_cpu() {
            match danceba_model::gpt::cpu_gemm::kernel() {
                Some(k) => match danceba_model::gpt::cpu_gemm::max_rows() {
                    usize::MAX => format!("{k:?} kernel (any rows)"),
                    n => format!("{k:?} kernel (<= {n} rows, candle above)"),
                },
                None => "candle".to_string(),
            }
        } else {
            "not used".to_string()
        };
        // how a CPU step runs: on host buffers (no allocation per step) or as the candle forward
        let cpu_step = match (gpt.device().is_cpu(), gpt.cpu_host_step()) {
            (false, _) => "not used",
            (true, true) => "host",
            (true, false) => "candle",
        };
        if !args.json {
            println!(
                "GPT: {source}, n_embd {}, {} + {} layers; mamba {:?}; CPU GEMM {cpu_gemm}; CPU step {cpu_step}; CUDA graphs {}; {threads} threads; load {load_s:.2} s",
                gpt.arch().n_embd,
                gpt.arch().n_layer_base,
                gpt.arch().n_layer_head,
                gpt.mamba_impl(),
                if gpt.cuda_graphs() { "on" } else { "off" }
            );
        }
        let mut runs = Vec::new();
        for &b in &args.batch {
            let before = graph_timing(&gpt);
            let r = bench_gpt(&gpt, b, args.steps, args.seed)?;
            let replay = graph_timing_json(before, graph_timing(&gpt));
            let fps = FRAMES_PER_STEP * b as f64 / r.steady_mean_s;
            if !args.json {
                println!(
                    "batch {b}: steady step (t=28) {:.3} s mean, {:.3} s min over {} steps ({} CPU s per step); ramp (t=1..28) {:.2} s; {:.1} motion frames/s ({:.2}× real time at 60 fps)",
                    r.steady_mean_s,
                    r.steady_min_s,
                    r.steady_steps,
                    r.steady_cpu_s.map_or("?".into(), |c| format!("{c:.3}")),
                    r.ramp_s,
                    fps,
                    fps / 60.0
                );
            }
            runs.push(json!({
                "batch": r.batch,
                "steady_step_s": r.steady_mean_s,
                "steady_step_min_s": r.steady_min_s,
                "steady_steps_timed": r.steady_steps,
                "steady_step_cpu_s": r.steady_cpu_s,
                "ramp_s": r.ramp_s,
                "motion_frames_per_s": fps,
                "cuda_graph_replay_ms": replay,
            }));
        }
        report["gpt"] = json!({
            "weights": source,
            "mamba": format!("{:?}", gpt.mamba_impl()),
            "cpu_gemm": cpu_gemm,
            "cpu_step": cpu_step,
            "cuda_graphs": gpt.cuda_graphs(),
            "load_s": load_s,
            "runs": runs,
        });
    }
    if args.what.contains(&What::Features) {
        let audio = args.audio.as_ref().context("--audio is required")?;
        let mut times = Vec::new();
        let mut rows = 0;
        for _ in 0..args.repeat {
            let t0 = Instant::now();
            let f = danceba_audio::features_from_file(audio)
                .with_context(|| format!("extracting features from {}", audio.display()))?;
            times.push(t0.elapsed().as_secs_f64());
            rows = f.rows;
        }
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        let audio_s = rows as f64 / 7.5;
        let per_minute = if audio_s > 0.0 {
            best * 60.0 / audio_s
        } else {
            f64::NAN
        };
        if !args.json {
            println!(
                "features: {} ({rows} rows ≈ {audio_s:.1} s of audio): {best:.3} s best of {}; {per_minute:.2} s per 60 s of audio",
                audio.display(),
                times.len()
            );
        }
        report["features"] = json!({
            "audio": audio.display().to_string(),
            "rows": rows,
            "audio_s": audio_s,
            "best_s": best,
            "s_per_60s_audio": per_minute,
        });
    }
    if args.what.contains(&What::Vqvae) {
        let arch = official_vqvae_arch();
        let t0 = Instant::now();
        let vq = random_vqvae(&arch, args.seed, &device).context("building the VQ-VAE")?;
        let build_s = t0.elapsed().as_secs_f64();
        let bins = arch.l_bins as u64;
        let ids = |salt: u64| -> Vec<u32> {
            (0..args.tokens as u64)
                .map(|i| ((i.wrapping_mul(7919) + salt + args.seed) % bins) as u32)
                .collect()
        };
        let (up, down) = (ids(1), ids(2));
        let mut times = Vec::new();
        let mut frames = 0;
        for _ in 0..args.repeat {
            let t0 = Instant::now();
            let decoded = vq.decode(&up, &down).context("decoding")?;
            times.push(t0.elapsed().as_secs_f64());
            frames = decoded.len() / 72;
        }
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        let motion_s = frames as f64 / 60.0;
        if !args.json {
            println!(
                "vqvae: {} tokens → {frames} frames ({motion_s:.1} s of motion): {best:.3} s best of {}; {:.4} s per second of motion",
                args.tokens,
                times.len(),
                best / motion_s
            );
        }
        report["vqvae"] = json!({
            "tokens": args.tokens,
            "frames": frames,
            "motion_s": motion_s,
            "build_s": build_s,
            "best_s": best,
            "s_per_motion_s": best / motion_s,
        });
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        // the machine may be shared: say how busy it was
        report["loadavg_1min"] = json!(l
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok()));
    }
    let rss = peak_rss_mib();
    report["peak_rss_mib"] = json!(rss);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if let Some(r) = rss {
        println!("peak RSS {r:.0} MiB");
    }
    Ok(())
}
