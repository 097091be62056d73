//! The `Pipeline`: audio (or precomputed features) → condition → tokens → motion.
//!
//! ```no_run
//! # fn main() -> Result<(), danceba::PipelineError> {
//! use danceba::{ModelFiles, Pipeline, PipelineOptions};
//! let pipeline = Pipeline::load(&ModelFiles::new("gpt.safetensors", "vqvae.safetensors"), &PipelineOptions::default())?;
//! let dance = pipeline.dance(std::path::Path::new("song.mp3"), &Default::default())?;
//! println!("{} frames", dance.motion.frames());
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use danceba_audio::{AudioError, Condition, MusicFeatures, FEATURE_DIM};
use danceba_model::arch::{self, ArchError, GptArch, VqVaeArch};
use danceba_model::checkpoint::{self, CheckpointError};
use danceba_model::device::{self, DeviceChoice, DeviceError};
use danceba_model::gpt::{GenerateOptions, Gpt, GptError, Tokens};
use danceba_model::vqvae::{VqVae, VqVaeError};
use danceba_motion::{Motion, MotionError};

/// Motion frame rate of DanceBa (8 frames per token at 7.5 tokens/s).
pub const MOTION_FPS: f32 = 60.0;

/// Tokens the VQ-VAE decodes at a time (each with its receptive-field halo): bounds the
/// decoder's activations (about 100 KB per token at the official width) for long songs; the
/// result is identical to a whole-song decode.
pub const DECODE_CHUNK_TOKENS: usize = 256;

/// Errors of the pipeline, each naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: {source}")]
    Arch {
        path: PathBuf,
        #[source]
        source: ArchError,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error(transparent)]
    Gpt(#[from] GptError),
    #[error(transparent)]
    VqVae(#[from] VqVaeError),
    #[error(transparent)]
    Motion(#[from] MotionError),
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("the GPT predicts {gpt} tokens per stream but the VQ-VAE codebooks hold {vqvae}: the two checkpoints do not belong together")]
    Mismatch { gpt: usize, vqvae: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The two checkpoints a pipeline needs (official `.pt` or converted safetensors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles {
    pub gpt: PathBuf,
    pub vqvae: PathBuf,
}

impl ModelFiles {
    pub fn new(gpt: impl Into<PathBuf>, vqvae: impl Into<PathBuf>) -> Self {
        Self {
            gpt: gpt.into(),
            vqvae: vqvae.into(),
        }
    }
}

/// How to load the models.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineOptions {
    pub device: DeviceChoice,
    /// Weight and activation precision of the GPT (f32 is the reference).
    pub dtype: DType,
    /// Attention heads, overriding the checkpoint's config (the weights cannot tell).
    pub n_head: Option<usize>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: DType::F32,
            n_head: None,
        }
    }
}

/// What a song becomes.
#[derive(Clone, Debug)]
pub struct Dance {
    /// Rows of 7.5 fps music features (L); the dance has L+1 tokens and 8(L+1) frames.
    pub feature_rows: usize,
    pub tokens: Tokens,
    pub motion: Motion,
}

/// Loaded models on a device.
pub struct Pipeline {
    gpt: Gpt,
    /// The VQ-VAE decoders (the encoders are loaded on demand: see [`Pipeline::load`]).
    vqvae: VqVae,
    /// Whether the VQ-VAE checkpoint holds encoders.
    vqvae_has_encoders: bool,
    device: Device,
    files: ModelFiles,
}

/// The VQ-VAE of a [`Pipeline`] without its GPT ([`Pipeline::into_decoder`]).
pub struct Decoder {
    vqvae: VqVae,
    device: Device,
}

impl Decoder {
    /// As [`Pipeline::decode`].
    pub fn decode(&self, tokens: &Tokens) -> Result<Motion, PipelineError> {
        decode_with(&self.vqvae, tokens)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// The motion of `tokens` decoded by `vqvae` (in chunks of [`DECODE_CHUNK_TOKENS`]).
fn decode_with(vqvae: &VqVae, tokens: &Tokens) -> Result<Motion, PipelineError> {
    let decoded = vqvae.decode_chunked(&tokens.up, &tokens.down, DECODE_CHUNK_TOKENS)?;
    Ok(Motion::from_decoded(&decoded, MOTION_FPS)?)
}

/// Which kind of input a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Audio,
    /// An official feature JSON `{"id", "music_array"}`.
    FeatureJson,
    /// An `L × 438` float32/float64 `.npy`.
    FeatureNpy,
    /// A safetensors file with an `L × 438` tensor under `features`.
    FeatureSafetensors,
}

impl InputKind {
    /// Classifies by file name ending; everything that is not a feature file is taken as audio.
    pub fn of(path: &Path) -> Self {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if name.ends_with(".json") {
            Self::FeatureJson
        } else if name.ends_with(".npy") {
            Self::FeatureNpy
        } else if name.ends_with(".safetensors") {
            Self::FeatureSafetensors
        } else {
            Self::Audio
        }
    }
}

/// Reads the music features of an input: computes them for audio, reads them for feature files.
pub fn read_features(path: &Path) -> Result<MusicFeatures, PipelineError> {
    let features = match InputKind::of(path) {
        InputKind::Audio => danceba_audio::features_from_file(path)?,
        InputKind::FeatureJson => MusicFeatures::from_official_json(path)?,
        InputKind::FeatureNpy => MusicFeatures::from_npy(path)?,
        InputKind::FeatureSafetensors => read_features_safetensors(path)?,
    };
    if features.rows == 0 {
        return Err(PipelineError::Input {
            path: path.to_path_buf(),
            message: "the feature matrix has no rows".into(),
        });
    }
    if let Some(i) = features.data.iter().position(|v| !v.is_finite()) {
        return Err(PipelineError::Input {
            path: path.to_path_buf(),
            message: format!(
                "feature row {}, column {} is not finite",
                i / FEATURE_DIM,
                i % FEATURE_DIM
            ),
        });
    }
    Ok(features)
}

fn read_features_safetensors(path: &Path) -> Result<MusicFeatures, PipelineError> {
    let bad = |message: String| PipelineError::Input {
        path: path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let view = st
        .tensor("features")
        .map_err(|_| bad("has no tensor named `features` (an L × 438 matrix)".into()))?;
    let shape = view.shape().to_vec();
    if shape.len() != 2 || shape[1] != FEATURE_DIM {
        return Err(bad(format!(
            "`features` has shape {shape:?}; expected (L, {FEATURE_DIM})"
        )));
    }
    let data: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        safetensors::Dtype::F64 => view
            .data()
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        other => {
            return Err(bad(format!(
                "`features` has dtype {other:?}; expected F32 or F64"
            )))
        }
    };
    Ok(MusicFeatures::new(shape[0], data)?)
}

/// Returns the allocator's free heap pages to the operating system. glibc's `malloc` keeps freed
/// memory of its heap for reuse, which would otherwise stay resident (counted in RSS) next to the
/// weights for the whole song. A no-op where the C library is not glibc.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: `malloc_trim` (glibc) only releases unused pages of malloc's own arenas; it
        // has no preconditions and does not move or invalidate live allocations.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Whether a VQ-VAE key (without `module.`) belongs to an encoder (`vqvae_up.encoders.…`).
fn is_vqvae_encoder_key(key: &str) -> bool {
    key.split('.').nth(1) == Some("encoders")
}

/// Loads and audits a VQ-VAE checkpoint in f32 and builds it. Without `encoders` the encoder
/// tensors are not read from the file at all (the decoders are audited); says whether the file
/// has encoders.
fn load_vqvae(
    path: &Path,
    device: &Device,
    encoders: bool,
) -> Result<(VqVae, bool), PipelineError> {
    let keep = |key: &str| encoders || !is_vqvae_encoder_key(key);
    let sd = checkpoint::load_on_filtered(path, device, DType::F32, &keep)?;
    let (arch, _) = arch::audit_vqvae(&sd).map_err(|source| PipelineError::Arch {
        path: path.to_path_buf(),
        source,
    })?;
    let has_encoders = arch.has_encoders || sd.skipped.keys().any(|k| is_vqvae_encoder_key(k));
    let vqvae = VqVae::load(sd.var_builder(DType::F32, device), &arch)?;
    Ok((vqvae, has_encoders))
}

impl Pipeline {
    /// Loads, audits and builds both models. A missing or mis-shaped key, or a file of the wrong
    /// kind (a VQ-VAE given as the GPT, say), is an error that names the file and the key.
    ///
    /// Memory: each checkpoint's file pages are released as its tensors are copied out; the GPT
    /// comes first, then the allocator's free pages (the GPT's load-time temporaries) are handed
    /// back, then the VQ-VAE decoders are read (its encoders stay in the file: only
    /// [`Pipeline::start_tokens_from_motion`] needs them, and reads them then). The peak is
    /// about one copy of the GPT in `dtype` plus the VQ-VAE decoders in f32.
    pub fn load(files: &ModelFiles, opts: &PipelineOptions) -> Result<Self, PipelineError> {
        let device = device::open(opts.device)?;
        let gpt_sd = checkpoint::load_on(&files.gpt, &device, opts.dtype)?;
        let (gpt_arch, _) =
            arch::audit_gpt(&gpt_sd, opts.n_head).map_err(|source| PipelineError::Arch {
                path: files.gpt.clone(),
                source,
            })?;
        let gpt = Gpt::load(gpt_sd.var_builder(opts.dtype, &device), &gpt_arch)?;
        drop(gpt_sd);
        release_free_heap();
        // The VQ-VAE is small and decodes once per song: it stays in f32 for accuracy.
        let (vqvae, vqvae_has_encoders) = load_vqvae(&files.vqvae, &device, false)?;
        let l_bins = vqvae.arch().l_bins;
        if l_bins != gpt_arch.vocab_up || l_bins != gpt_arch.vocab_down {
            return Err(PipelineError::Mismatch {
                gpt: gpt_arch.vocab_up.max(gpt_arch.vocab_down),
                vqvae: l_bins,
            });
        }
        release_free_heap();
        Ok(Self {
            gpt,
            vqvae,
            vqvae_has_encoders,
            device,
            files: files.clone(),
        })
    }

    pub fn gpt_arch(&self) -> &GptArch {
        self.gpt.arch()
    }

    pub fn vqvae_arch(&self) -> &VqVaeArch {
        self.vqvae.arch()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    pub fn gpt(&self) -> &Gpt {
        &self.gpt
    }

    pub fn vqvae(&self) -> &VqVae {
        &self.vqvae
    }

    /// The condition (reference §2) as an `(L, 438)` tensor on the pipeline's device.
    pub fn condition_tensor(&self, cond: &Condition) -> Result<Tensor, PipelineError> {
        Ok(Tensor::from_slice(
            &cond.data,
            (cond.rows, FEATURE_DIM),
            &self.device,
        )?)
    }

    /// Generates the token streams of several songs together (batched), one progress call per
    /// step: `(step, total steps)`.
    pub fn generate_tokens(
        &self,
        conds: &[Condition],
        opts: &GenerateOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tokens>, PipelineError> {
        let tensors = conds
            .iter()
            .map(|c| self.condition_tensor(c))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.gpt.generate_batch(&tensors, opts, progress)?)
    }

    /// Decodes token streams into absolute joint positions at 60 fps.
    pub fn decode(&self, tokens: &Tokens) -> Result<Motion, PipelineError> {
        decode_with(&self.vqvae, tokens)
    }

    /// Drops the GPT (its memory goes back to the system) and keeps what decoding needs: for
    /// callers done generating, whose decoding and writing then run without the GPT's weights
    /// resident (`danceba generate`: ~0.5 GB less at the end of a song with f16 weights).
    pub fn into_decoder(self) -> Decoder {
        let Self {
            gpt, vqvae, device, ..
        } = self;
        drop(gpt);
        release_free_heap();
        Decoder { vqvae, device }
    }

    /// Encodes the first token pair of a seed motion (absolute positions), the official test-mode
    /// way of choosing start tokens (reference §2.3).
    pub fn start_tokens_from_motion(&self, seed: &Motion) -> Result<(u32, u32), PipelineError> {
        let rel = seed.root_relative();
        let (up, down) = if self.vqvae_has_encoders {
            let (full, _) = load_vqvae(&self.files.vqvae, &self.device, true)?;
            full.encode(&rel, seed.frames())?
        } else {
            // The decoders-only model answers with the clear "no encoder" error.
            self.vqvae.encode(&rel, seed.frames())?
        };
        match (up.first(), down.first()) {
            (Some(&u), Some(&d)) => Ok((u, d)),
            _ => Err(PipelineError::Input {
                path: PathBuf::from("<seed motion>"),
                message: format!(
                    "{} frames are too short to encode one token (need at least {})",
                    seed.frames(),
                    self.vqvae.frames_per_token()
                ),
            }),
        }
    }

    /// The whole pipeline for one input, without progress reporting.
    pub fn dance(&self, input: &Path, opts: &GenerateOptions) -> Result<Dance, PipelineError> {
        let features = read_features(input)?;
        let cond = features.condition();
        let mut tokens = self.generate_tokens(std::slice::from_ref(&cond), opts, &mut |_, _| {})?;
        let tokens = tokens.pop().ok_or_else(|| PipelineError::Input {
            path: input.to_path_buf(),
            message: "generation returned no tokens".into(),
        })?;
        let motion = self.decode(&tokens)?;
        Ok(Dance {
            feature_rows: features.rows,
            tokens,
            motion,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `golden/model/name`, the golden directory from `DANCEBA_GOLDEN` or `../shared/golden`
    /// beside the repository.
    fn golden_model(name: &str) -> PathBuf {
        std::env::var_os("DANCEBA_GOLDEN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../../shared/golden"
                ))
            })
            .join("model")
            .join(name)
    }

    /// The library's one-call entry point, `Pipeline::dance`, on a golden clip's WAV: the
    /// official greedy tokens and the official absolute motion.
    #[test]
    fn dance_of_a_golden_song_is_the_official_dance() {
        let files = ModelFiles::new(golden_model("tiny_gpt.pt"), golden_model("tiny_vqvae.pt"));
        let p = Pipeline::load(&files, &PipelineOptions::default()).unwrap();
        let clip = "mono22k_mutilated_mime_12s";
        let wav = golden_model("..").join(format!("audio/{clip}.wav"));
        let dance = p.dance(&wav, &GenerateOptions::default()).unwrap();
        let bytes = std::fs::read(golden_model(&format!("{clip}.pipeline.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensor = |k: &str| st.tensor(k).unwrap().data().to_vec();
        let tokens = |k: &str| -> Vec<u32> {
            tensor(k)
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect()
        };
        assert_eq!(dance.tokens.up, tokens("tokens_up"));
        assert_eq!(dance.tokens.down, tokens("tokens_down"));
        let want: Vec<f32> = tensor("pose_absolute")
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(dance.motion.positions.len(), want.len());
        let err = dance
            .motion
            .positions
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-4, "motion {err} m from the official one");
    }

    #[test]
    fn decoders_only_pipeline_still_encodes_seed_motions_like_the_full_vqvae() {
        let files = ModelFiles::new(golden_model("tiny_gpt.pt"), golden_model("tiny_vqvae.pt"));
        let p = Pipeline::load(&files, &PipelineOptions::default()).unwrap();
        assert!(p.vqvae_has_encoders);
        assert!(
            !p.vqvae_arch().has_encoders,
            "the encoders were read at load"
        );
        let up: Vec<u32> = (0..300).map(|i| (i * 37 % 512) as u32).collect();
        let down: Vec<u32> = (0..300).map(|i| (i * 11 % 512) as u32).collect();
        let tokens = Tokens { up, down };
        let motion = p.decode(&tokens).unwrap();
        // Chunked decoding (300 tokens > DECODE_CHUNK_TOKENS) equals the whole-song decode.
        let whole = p.vqvae.decode(&tokens.up, &tokens.down).unwrap();
        assert_eq!(motion, Motion::from_decoded(&whole, MOTION_FPS).unwrap());
        // Seed tokens come from the full VQ-VAE (encoders read on demand).
        let (sd, full_arch) = {
            let sd = checkpoint::load(&files.vqvae).unwrap();
            let (a, _) = arch::audit_vqvae(&sd).unwrap();
            (sd, a)
        };
        assert!(full_arch.has_encoders);
        let full = VqVae::load(sd.var_builder(DType::F32, &Device::Cpu), &full_arch).unwrap();
        let (u, d) = full
            .encode(&motion.root_relative(), motion.frames())
            .unwrap();
        assert_eq!(p.start_tokens_from_motion(&motion).unwrap(), (u[0], d[0]));
        // Without the GPT the decoder gives the same motion.
        let decoder = p.into_decoder();
        assert_eq!(decoder.decode(&tokens).unwrap(), motion);
        assert!(decoder.device().is_cpu());
    }
}
