//! `danceba generate`: songs in, dance files out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::outputs::{parse_formats, parse_style, write_page, Output};
use candle_core::DType;
use danceba::{read_features, InputKind, ModelFiles, Pipeline, PipelineOptions};
use danceba_model::device::DeviceChoice;
use danceba_model::gpt::{GenerateOptions, GptError, SamplingPolicy, DEFAULT_START};
use danceba_motion::export::json::{SamplingMeta, StartTokens, TokenStreams};
use danceba_motion::export::{self, MotionMeta};
use danceba_motion::render::video::{render_video, VideoOptions, VideoOutcome};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Feature rows per second of music (7.5 fps).
const FEATURE_FPS: f32 = 7.5;

/// Arguments of `danceba generate`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  danceba generate song.mp3\n  danceba generate a.wav b.flac -o dances/ --formats glb,mp4\n  danceba generate features.json --formats npy,json --json"
)]
pub struct Args {
    /// Songs (mp3, wav, flac, ogg, m4a, aiff), official feature JSONs ({"id", "music_array"}),
    /// or feature matrices (.npy / .safetensors, L × 438). Several inputs are generated together.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output directory; files are named <input stem>.<ext>.
    #[arg(short, long, default_value = ".")]
    pub output: PathBuf,
    /// Weights directory: the official layout (experiments/cc_motion_gpt/ckpt/*.pt and
    /// experiments/sep_vqvae_root/ckpt/*.pt) or a directory written by `danceba convert`.
    /// Default: $DANCEBA_WEIGHTS, then the download cache of `danceba download`.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["gpt", "vqvae"])]
    pub weights: Option<PathBuf>,
    /// The GPT checkpoint (.pt or .safetensors); needs --vqvae too.
    #[arg(long, value_name = "FILE", requires = "vqvae")]
    pub gpt: Option<PathBuf>,
    /// The VQ-VAE checkpoint (.pt or .safetensors); needs --gpt too.
    #[arg(long, value_name = "FILE", requires = "gpt")]
    pub vqvae: Option<PathBuf>,
    /// Where to run: auto, cpu, metal, cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the GPT weights: f32 (the reference), f16 or bf16. Half precision halves the
    /// GPT's memory and is faster on GPUs; given the same context its next-token choice agrees
    /// with f32 at ≥ 98 % of steps (golden pipelines: f16 99.9 %, bf16 99.2 %), but one differing
    /// choice changes the rest of the dance.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Attention heads of the GPT, for a checkpoint that does not state them (default 12); one
    /// that contradicts the checkpoint is refused.
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Start tokens as UP,DOWN (default: the official 423,12).
    #[arg(long, value_name = "UP,DOWN", conflicts_with = "seed_motion")]
    pub start_tokens: Option<String>,
    /// Start from a saved motion (.npy or .json): its first token pair, encoded by the VQ-VAE.
    #[arg(long, value_name = "FILE")]
    pub seed_motion: Option<PathBuf>,
    /// Sample instead of the official greedy choice, at this temperature (0 = greedy).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P.
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Random seed for sampling (same seed, same dance; default 0). Only with sampling
    /// (--temperature, --top-k or --top-p).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Dance only the first SECONDS of each song.
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true)]
    pub max_seconds: Option<f32>,
    /// Output formats, comma-separated: npy, pkl.npy (official), json, bvh, glb, mp4, html.
    #[arg(
        long,
        default_value = "npy,json,bvh,glb,mp4,html",
        value_delimiter = ','
    )]
    pub formats: Vec<String>,
    /// Video style: 3d (our skeleton view) or openpose (the official 2D drawing).
    #[arg(long, default_value = "3d")]
    pub style: String,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
    /// No progress bars or messages (errors are still printed).
    #[arg(short, long)]
    pub quiet: bool,
    /// Print a machine-readable summary (one JSON object) on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_dtype(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => bail!("unknown --dtype {s:?}; choose f32, f16 or bf16"),
    }
}

fn parse_start(s: &str) -> Result<(u32, u32)> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    match parts.as_slice() {
        [u, d] => Ok((
            u.parse()
                .with_context(|| format!("--start-tokens: {u:?} is not a token id"))?,
            d.parse()
                .with_context(|| format!("--start-tokens: {d:?} is not a token id"))?,
        )),
        _ => bail!("--start-tokens takes two token ids as UP,DOWN (e.g. 423,12), got {s:?}"),
    }
}

/// The sampling policy the flags ask for, and how the output files record it. With no
/// sampling flag, or at temperature 0 (where the sampler takes the argmax whatever top-k/top-p
/// say), it is the official greedy choice, and is recorded as such.
fn policy(args: &Args) -> Result<(SamplingPolicy, SamplingMeta)> {
    let sampling = args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some();
    let greedy = || {
        (
            SamplingPolicy::Greedy,
            SamplingMeta {
                strategy: "greedy".into(),
                ..Default::default()
            },
        )
    };
    if !sampling {
        if let Some(seed) = args.seed {
            bail!(
                "--seed {seed} has no effect on the official greedy choice: add --temperature T \
                 (or --top-k/--top-p) to sample, or leave --seed out"
            );
        }
        return Ok(greedy());
    }
    let temperature = args.temperature.unwrap_or(1.0);
    let seed = args.seed.unwrap_or(0);
    let policy = SamplingPolicy::Sample {
        temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed,
    };
    // the model's own check, now rather than after the model and the music are loaded
    match policy.check() {
        Err(GptError::Input(m)) => bail!("bad sampling setting: {m}"),
        other => other?,
    }
    if temperature == 0.0 {
        return Ok(greedy());
    }
    Ok((
        policy,
        SamplingMeta {
            strategy: "sample".into(),
            temperature: Some(temperature),
            top_k: args.top_k,
            top_p: args.top_p,
            seed: Some(seed),
        },
    ))
}

/// Resolves the two checkpoints from the flags, the environment, or the download cache.
fn model_files(args: &Args) -> Result<ModelFiles> {
    if let (Some(g), Some(v)) = (&args.gpt, &args.vqvae) {
        return Ok(ModelFiles::new(g, v));
    }
    Ok(danceba::weights::resolve(args.weights.as_deref())?)
}

fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dance".into());
    // "song.mp3" → "song"; "song.features.json" → "song.features"
    match name.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s.to_string(),
        _ => name,
    }
}

fn bar(quiet: bool, len: u64, template: &str) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new(len)
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

pub fn run(args: Args) -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second Ctrl-C (or an error installing the handler) falls back to the default exit;
        // outputs are written atomically, so no partial file is ever left behind.
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let quiet = args.quiet || args.json;
    let say = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };

    // Everything that can be checked before any work is checked first.
    let outputs = parse_formats(&args.formats)?;
    let style = parse_style(&args.style)?;
    let device: DeviceChoice = args.device.parse()?;
    let dtype = parse_dtype(&args.dtype)?;
    if dtype != DType::F32 {
        say(&format!(
            "note: --dtype {}: the dance can differ from the f32 reference after any step where the \
             rounded model picks another token",
            args.dtype
        ));
    }
    let (policy, sampling_meta) = policy(&args)?;
    if let Some(s) = args.max_seconds {
        if !(s.is_finite() && s > 0.0) {
            bail!("--max-seconds must be a positive number of seconds, got {s}");
        }
    }
    for input in &args.inputs {
        super::check_input_file(input, "")?;
    }
    let start_tokens = args.start_tokens.as_deref().map(parse_start).transpose()?;
    let seed_motion = match &args.seed_motion {
        Some(path) => {
            let (seed, _) = export::read_motion(path, danceba::MOTION_FPS)
                .with_context(|| format!("cannot read the seed motion {}", path.display()))?;
            Some((path, seed))
        }
        None => None,
    };
    let _out_dir = super::create_output_dir(&args.output)?;
    let mut stems: BTreeMap<String, &Path> = BTreeMap::new();
    for input in &args.inputs {
        if let Some(prev) = stems.insert(stem(input), input) {
            bail!(
                "{} and {} would write the same output files ({}.*); generate them in separate runs or rename one",
                prev.display(),
                input.display(),
                stem(input)
            );
        }
    }
    let out_path = |input: &Path, o: Output| {
        args.output
            .join(format!("{}.{}", stem(input), o.extension()))
    };
    // Different stems can still meet: "a.pkl" as npy and "a" as pkl.npy are both a.pkl.npy.
    let mut planned: BTreeMap<std::path::PathBuf, &Path> = BTreeMap::new();
    for input in &args.inputs {
        for &o in &outputs {
            let p = out_path(input, o);
            if let Some(prev) = planned.insert(p.clone(), input) {
                bail!(
                    "{} and {} would both write {}; generate them in separate runs or rename one",
                    prev.display(),
                    input.display(),
                    p.display()
                );
            }
        }
    }
    if !args.force {
        for input in &args.inputs {
            for &o in &outputs {
                let p = out_path(input, o);
                if p.exists() {
                    bail!(
                        "{} already exists; pass --force to overwrite it",
                        p.display()
                    );
                }
            }
        }
    }
    let files = model_files(&args)?;
    // A missing or non-checkpoint weights file is reported now, not after the music is read.
    for path in [&files.gpt, &files.vqvae] {
        danceba_model::checkpoint::sniff_file(path).with_context(|| {
            if danceba::weights::is_downloaded(path) {
                "could not load the downloaded model (damaged or incomplete): run `danceba \
                 download --force` to fetch and convert it again"
            } else {
                "could not load the model"
            }
        })?;
    }

    // Music features.
    let t_feat = Instant::now();
    let pb = bar(
        quiet,
        args.inputs.len() as u64,
        "features  [{bar:30}] {pos}/{len} {msg}",
    );
    let mut conds = Vec::new();
    let mut rows = Vec::new();
    for input in &args.inputs {
        pb.set_message(input.display().to_string());
        let mut features = read_features(input)
            .with_context(|| format!("{}: cannot read the music", input.display()))?;
        if InputKind::of(input) == InputKind::Audio {
            let decoded = features.rows as f64 / f64::from(FEATURE_FPS);
            if let Some(note) = super::truncation_note(input, decoded) {
                pb.suspend(|| say(&note));
            }
        }
        if let Some(s) = args.max_seconds {
            let keep = ((s * FEATURE_FPS).floor() as usize).max(1);
            if keep < features.rows {
                features.rows = keep;
                features.data.truncate(keep * danceba_audio::FEATURE_DIM);
            }
        }
        rows.push(features.rows);
        conds.push(features.condition());
        pb.inc(1);
    }
    pb.finish_and_clear();
    let features_s = t_feat.elapsed().as_secs_f64();
    danceba::pipeline::release_free_heap();

    // Load the models (after the features: their transient buffers then never sit on top of
    // the weights, which keeps the peak memory down).
    let t_load = Instant::now();
    say(&format!(
        "loading {} and {}",
        files.gpt.display(),
        files.vqvae.display()
    ));
    let pipeline = Pipeline::load(
        &files,
        &PipelineOptions {
            device,
            dtype,
            n_head: args.n_head,
        },
    )
    .context("could not load the model")?;
    let load_s = t_load.elapsed().as_secs_f64();
    // Weights stored in half precision: what that means here, said once.
    let gpt_stored = danceba::weights::stored_half_dtype(&files.gpt);
    if let (Some(half), DType::F32) = (gpt_stored, dtype) {
        say(&format!(
            "note: {} holds {half} weights, computed in f32 here (the dance is that of the \
             rounded weights either way): pass --dtype {half} to use half the memory",
            files.gpt.display()
        ));
    }
    if let Some(half) = danceba::weights::stored_half_dtype(&files.vqvae) {
        say(&format!(
            "note: {} holds {half} weights: the VQ-VAE decodes in f32, but its rounded weights \
             move joints by centimetres; convert it again in f32 (danceba convert --vqvae \
             epoch_500.pt -o DIR)",
            files.vqvae.display()
        ));
    }

    // Start tokens (the flags were read before any work, above).
    let start = match (start_tokens, &seed_motion) {
        (Some(s), _) => s,
        (None, Some((path, seed))) => pipeline
            .start_tokens_from_motion(seed)
            .with_context(|| format!("cannot encode the seed motion {}", path.display()))?,
        (None, None) => DEFAULT_START,
    };

    // Tokens.
    let t_gen = Instant::now();
    let total_steps = *rows.iter().max().unwrap_or(&0) as u64;
    let pb = bar(
        quiet,
        total_steps,
        "dancing   [{bar:30}] {pos}/{len} steps  {per_sec}  ETA {eta}",
    );
    let opts = GenerateOptions {
        start,
        policy,
        max_steps: None,
    };
    let flag = interrupted.clone();
    let tokens = pipeline
        .generate_tokens(&conds, &opts, &mut |step, total| {
            if flag.load(Ordering::SeqCst) {
                pb.abandon();
                eprintln!("interrupted: no files were written");
                std::process::exit(130);
            }
            pb.set_length(total as u64);
            pb.set_position(step as u64 + 1);
        })
        .context("generation failed")?;
    pb.finish_and_clear();
    let generate_s = t_gen.elapsed().as_secs_f64();
    // The GPT and the sampler's buffers are done with: hand them back before decoding and
    // writing (the end of a long song is otherwise the peak of the run's memory).
    let pipeline = pipeline.into_decoder();

    // Motion and outputs.
    let mut summary = Vec::new();
    for (i, input) in args.inputs.iter().enumerate() {
        let t_dec = Instant::now();
        let motion = pipeline
            .decode(&tokens[i])
            .with_context(|| format!("{}: decoding the dance failed", input.display()))?;
        let decode_s = t_dec.elapsed().as_secs_f64();
        danceba::pipeline::release_free_heap();
        let meta = MotionMeta {
            tokens: Some(TokenStreams {
                up: tokens[i].up.clone(),
                down: tokens[i].down.clone(),
            }),
            start_tokens: Some(StartTokens {
                up: start.0,
                down: start.1,
            }),
            sampling: Some(sampling_meta.clone()),
            audio: input.file_name().map(|n| n.to_string_lossy().into_owned()),
            model: files
                .gpt
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            generator: Some(format!("danceba {}", env!("CARGO_PKG_VERSION"))),
        };
        let audio = (InputKind::of(input) == InputKind::Audio).then_some(input.as_path());
        let t_out = Instant::now();
        let mut written = Vec::new();
        for &o in &outputs {
            if interrupted.load(Ordering::SeqCst) {
                bail!("interrupted; files written so far are complete: {written:?}");
            }
            let path = out_path(input, o);
            match o {
                Output::Export(format) => {
                    export::export(&motion, &meta, format, &path, args.force)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    written.push(path);
                }
                Output::Html => {
                    write_page(&motion, audio, &stem(input), &path, args.force, &say)?;
                    written.push(path);
                }
                Output::Video => {
                    let frames = motion.frames() as u64;
                    let pb = bar(
                        quiet,
                        frames,
                        "rendering [{bar:30}] {pos}/{len} frames  ETA {eta}",
                    );
                    let pbc = pb.clone();
                    let vopts = VideoOptions {
                        style,
                        force: args.force,
                        progress: Some(Arc::new(move |done, total| {
                            pbc.set_length(total);
                            pbc.set_position(done);
                        })),
                        cancel: Some(interrupted.clone()),
                        ..VideoOptions::default()
                    };
                    let outcome = render_video(&motion, audio, &path, &vopts)
                        .with_context(|| format!("cannot render {}", path.display()))?;
                    pb.finish_and_clear();
                    if let VideoOutcome::GifFallback { reason, .. } = &outcome {
                        say(&format!(
                            "note: {reason}; wrote an animated GIF without sound instead of an mp4 (install ffmpeg for mp4 with music)"
                        ));
                    }
                    written.push(outcome.path().to_path_buf());
                }
            }
        }
        let outputs_s = t_out.elapsed().as_secs_f64();
        for p in &written {
            say(&format!("wrote {}", p.display()));
        }
        summary.push(serde_json::json!({
            "input": input,
            "files": written,
            "feature_rows": rows[i],
            "frames": motion.frames(),
            "seconds": motion.seconds(),
            "tokens": { "up": tokens[i].up, "down": tokens[i].down },
            "timings_s": { "decode": decode_s, "outputs": outputs_s },
        }));
    }
    if args.json {
        let out = serde_json::json!({
            "device": danceba_model::device::describe(pipeline.device()),
            "dtype": args.dtype,
            "gpt_stored_half": gpt_stored,
            "gpt": files.gpt,
            "vqvae": files.vqvae,
            "start_tokens": [start.0, start.1],
            "timings_s": { "load": load_s, "features": features_s, "generate": generate_s },
            "dances": summary,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
