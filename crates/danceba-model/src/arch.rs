//! Architecture detection from key names and shapes, and the key/shape audit.
//!
//! The sizes of both models are derived from the checkpoint, never hard-coded: the official
//! real-size models and the tiny golden models go through the same code.

use serde::{Deserialize, Serialize};

/// Sizes of one Mamba layer (reference §3.5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MambaArch {
    /// Inner width (`expand · n_embd`), 3072 in the official model.
    pub d_inner: usize,
    /// SSM state size, 128 in the official model.
    pub d_state: usize,
    /// Rank of the Δ projection, `ceil(n_embd / 16)`.
    pub dt_rank: usize,
    /// Depthwise causal convolution width, 4.
    pub d_conv: usize,
}

/// Sizes of the GPT (`CrossCondGPT2`, reference §3.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptArch {
    /// Model width C (768 official).
    pub n_embd: usize,
    /// Attention heads (12 official). Not visible in the weights: from the checkpoint's config, a
    /// flag, or the default 12.
    pub n_head: usize,
    /// Number of `gpt_base.blocks` (6 official).
    pub n_layer_base: usize,
    /// Number of `gpt_head.blocks` (6 official).
    pub n_layer_head: usize,
    /// Upper-body codebook size (512).
    pub vocab_up: usize,
    /// Lower-body codebook size (512).
    pub vocab_down: usize,
    /// Width of a music-feature row (438).
    pub n_music: usize,
    /// `block_size` (29), from the attention mask buffer.
    pub block_size: usize,
    /// Hidden width of the base blocks' GELU MLP (3072 official).
    pub mlp_hidden: usize,
    /// Hidden width of the GatedMLP (768 official; fc1 has 2× this many rows).
    pub gated_mlp_hidden: usize,
    /// Input width of the LPE `linear2` (257 = 512/2 + 1 STFT bins).
    pub lpe_bins: usize,
    /// Mamba sizes.
    pub mamba: MambaArch,
}

/// Sizes of the VQ-VAE (`SepVQVAER`, reference §4.1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VqVaeArch {
    /// Convolution width inside encoders/decoders (512 official).
    pub width: usize,
    /// Codebook vector width (512 official).
    pub emb_width: usize,
    /// Codebook size of each half (512).
    pub l_bins: usize,
    /// Number of temporal down/up-sampling stages (3 → 8 frames per token).
    pub downs_t: usize,
    /// Stride of each stage (2).
    pub stride_t: usize,
    /// Residual blocks per stage (3).
    pub depth: usize,
    /// Dilation growth rate of the residual blocks (3; from the config, not visible in weights).
    pub dilation_growth_rate: usize,
    /// Channels of the upper half (45 = 15 joints × 3).
    pub up_channels: usize,
    /// Channels of the lower half (27 = 9 joints × 3).
    pub down_channels: usize,
    /// Channels of the root decoder (3).
    pub root_channels: usize,
    /// Whether the encoders are present (only needed to encode a seed motion).
    pub has_encoders: bool,
}

// ---------------------------------------------------------------------------------------------
// Detection and audit
// ---------------------------------------------------------------------------------------------

use crate::checkpoint::{PyValue, ShapeMap, StateDict};

/// Default number of attention heads when neither a flag nor the checkpoint's config says.
pub const DEFAULT_N_HEAD: usize = 12;

/// Errors of architecture detection and the key audit.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error(
        "key {0} is missing: cannot determine the architecture (is this the right checkpoint?)"
    )]
    MissingKey(String),
    #[error("key {key} has shape {found:?}, expected {expected}")]
    BadShape {
        key: String,
        expected: String,
        found: Vec<usize>,
    },
    #[error("inconsistent checkpoint: {0}")]
    Inconsistent(String),
    #[error("the checkpoint does not match the model: {0}")]
    Audit(Box<Audit>),
    #[error("this is a {found} checkpoint, expected a {expected} checkpoint (are the GPT and VQ-VAE files swapped?)")]
    WrongKind {
        expected: ModelKind,
        found: ModelKind,
    },
}

/// What a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Gpt,
    Vqvae,
    Unknown,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Gpt => "gpt",
            ModelKind::Vqvae => "vqvae",
            ModelKind::Unknown => "unknown",
        })
    }
}

/// Decides the kind from key names (with or without the `module.` prefix).
pub fn detect_kind<'a, I: IntoIterator<Item = &'a String>>(keys: I) -> ModelKind {
    let (mut gpt, mut vq) = (false, false);
    for k in keys {
        let k = crate::checkpoint::strip_module_prefix(k);
        gpt |= k.starts_with("gpt_base.") || k.starts_with("gpt_head.");
        vq |= k.starts_with("vqvae_up.") || k.starts_with("vqvae_down.");
    }
    match (gpt, vq) {
        (true, false) => ModelKind::Gpt,
        (false, true) => ModelKind::Vqvae,
        _ => ModelKind::Unknown,
    }
}

fn shape_of<'a>(shapes: &'a ShapeMap, key: &str, rank: usize) -> Result<&'a [usize], ArchError> {
    let s = shapes
        .get(key)
        .ok_or_else(|| ArchError::MissingKey(key.to_string()))?;
    if s.len() != rank {
        return Err(ArchError::BadShape {
            key: key.to_string(),
            expected: format!("a rank-{rank} tensor"),
            found: s.clone(),
        });
    }
    Ok(s)
}

/// Number of consecutive indices `i = 0, 1, ...` for which `format(i)` is a key.
fn count_indexed(shapes: &ShapeMap, f: impl Fn(usize) -> String) -> usize {
    (0..).take_while(|&i| shapes.contains_key(&f(i))).count()
}

fn usize_at(config: Option<&PyValue>, path: &str) -> Option<usize> {
    config
        .and_then(|c| c.get_path(path))
        .and_then(PyValue::as_i64)
        .and_then(|v| usize::try_from(v).ok())
        .filter(|&v| v > 0)
}

/// Where the head count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NHeadSource {
    Flag,
    /// The `n_head` metadata of a converted safetensors file.
    Metadata,
    Config,
    Default,
}

/// `n_head` for a loaded checkpoint: the flag, else the `n_head` metadata of a converted file,
/// else the config, else [`DEFAULT_N_HEAD`].
pub fn resolve_n_head_for(sd: &StateDict, flag: Option<usize>) -> (usize, NHeadSource) {
    if flag.is_none() {
        if let Some(n) = sd
            .metadata
            .get("n_head")
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
        {
            return (n, NHeadSource::Metadata);
        }
    }
    resolve_n_head(sd.config.as_ref(), flag)
}

/// `n_head` from a flag, else the checkpoint's config (`structure_generate.base.n_head`), else 12.
pub fn resolve_n_head(config: Option<&PyValue>, flag: Option<usize>) -> (usize, NHeadSource) {
    if let Some(n) = flag {
        return (n, NHeadSource::Flag);
    }
    for path in [
        "structure_generate.base.n_head",
        "structure_generate.head.n_head",
        "n_head",
    ] {
        if let Some(n) = usize_at(config, path) {
            return (n, NHeadSource::Config);
        }
    }
    (DEFAULT_N_HEAD, NHeadSource::Default)
}

impl GptArch {
    /// Derives the sizes from key names and shapes (keys without `module.`); `n_head` comes from
    /// `n_head` (a flag) if given, else the config, else [`DEFAULT_N_HEAD`].
    pub fn detect(
        shapes: &ShapeMap,
        config: Option<&PyValue>,
        n_head: Option<usize>,
    ) -> Result<GptArch, ArchError> {
        let tok = shape_of(shapes, "gpt_base.tok_emb_up.weight", 2)?;
        let (vocab_up, n_embd) = (tok[0], tok[1]);
        let vocab_down = shape_of(shapes, "gpt_base.tok_emb_down.weight", 2)?[0];
        let n_music = shape_of(shapes, "gpt_base.cond_emb.weight", 2)?[1];
        let lpe_bins = shape_of(shapes, "gpt_base.pos_emb.pos_emb_1.linear2.weight", 2)?[1];
        let mask = shape_of(shapes, "gpt_base.blocks.0.attn.mask", 4)?;
        let block_size = mask[3];
        let mlp_hidden = shape_of(shapes, "gpt_base.blocks.0.mlp.0.weight", 2)?[0];
        let n_layer_base = count_indexed(shapes, |i| format!("gpt_base.blocks.{i}.norm1.weight"));
        let n_layer_head = count_indexed(shapes, |i| format!("gpt_head.blocks.{i}.ln1.weight"));
        if n_layer_head == 0 {
            return Err(ArchError::MissingKey("gpt_head.blocks.0.ln1.weight".into()));
        }
        let a = shape_of(shapes, "gpt_head.blocks.0.mamba_1.A_log", 2)?;
        let (d_inner, d_state) = (a[0], a[1]);
        let dt_rank = shape_of(shapes, "gpt_head.blocks.0.mamba_1.dt_proj.weight", 2)?[1];
        let d_conv = shape_of(shapes, "gpt_head.blocks.0.mamba_1.conv1d.weight", 3)?[2];
        let gated_mlp_hidden = shape_of(shapes, "gpt_head.blocks.0.gate_mlp_1.fc2.weight", 2)?[1];
        let (n_head, _) = resolve_n_head(config, n_head);
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(ArchError::Inconsistent(format!(
                "n_embd {n_embd} is not divisible by n_head {n_head}; pass the right --n-head"
            )));
        }
        Ok(GptArch {
            n_embd,
            n_head,
            n_layer_base,
            n_layer_head,
            vocab_up,
            vocab_down,
            n_music,
            block_size,
            mlp_hidden,
            gated_mlp_hidden,
            lpe_bins,
            mamba: MambaArch {
                d_inner,
                d_state,
                dt_rank,
                d_conv,
            },
        })
    }

    /// [`GptArch::detect`] on a loaded checkpoint, using its config. A head count given as
    /// `n_head` (a flag) that contradicts the one the checkpoint states (its config, or a
    /// converted file's metadata) is an error: the flag is for checkpoints that do not say, and
    /// overriding a stated count silently changes every attention layer.
    pub fn from_state_dict(sd: &StateDict, n_head: Option<usize>) -> Result<GptArch, ArchError> {
        let (stated, source) = resolve_n_head_for(sd, None);
        let n = match n_head {
            None => stated,
            Some(flag) if source != NHeadSource::Default && stated != flag => {
                let whence = match source {
                    NHeadSource::Metadata => "metadata",
                    _ => "config",
                };
                return Err(ArchError::Inconsistent(format!(
                    "the checkpoint's {whence} says n_head {stated}, and --n-head {flag} \
                     contradicts it: leave --n-head out (it is for checkpoints that do not say)"
                )));
            }
            Some(0) => {
                return Err(ArchError::Inconsistent(
                    "--n-head 0: the head count must be at least 1".into(),
                ))
            }
            Some(flag) => flag,
        };
        GptArch::detect(&sd.shapes(), sd.config.as_ref(), Some(n))
    }
}

impl VqVaeArch {
    /// Derives the sizes from key names and shapes (keys without `module.`).
    /// `dilation_growth_rate` is not visible in the weights: it comes from the config
    /// (`structure.up_half.dilation_growth_rate`), else 3.
    pub fn detect(shapes: &ShapeMap, config: Option<&PyValue>) -> Result<VqVaeArch, ArchError> {
        let d = "vqvae_up.decoders.0.level_blocks.0.model";
        let first = shape_of(shapes, &format!("{d}.0.weight"), 3)?;
        let (width, emb_width) = (first[0], first[1]);
        let l_bins = shape_of(shapes, "vqvae_up.bottleneck.level_blocks.0.k", 2)?[0];
        let downs_t = count_indexed(shapes, |s| format!("{d}.{}.1.weight", s + 1));
        if downs_t == 0 {
            return Err(ArchError::MissingKey(format!("{d}.1.1.weight")));
        }
        let depth = count_indexed(shapes, |j| format!("{d}.1.0.model.{j}.model.1.weight"));
        let k = shape_of(shapes, &format!("{d}.1.1.weight"), 3)?[2];
        if k < 2 || k % 2 != 0 {
            return Err(ArchError::Inconsistent(format!(
                "decoder upsampling kernel {k} is not 2 x stride"
            )));
        }
        let up_channels = shape_of(shapes, "vqvae_up.decoders.0.out.weight", 3)?[0];
        let down_channels = shape_of(shapes, "vqvae_down.decoders.0.out.weight", 3)?[0];
        let root_channels = shape_of(shapes, "vqvae_down.decoders_root.0.out.weight", 3)?[0];
        if shapes
            .keys()
            .any(|k| k.contains(".decoders.1.") || k.contains(".level_blocks.1."))
        {
            return Err(ArchError::Inconsistent(
                "more than one VQ-VAE level is not supported".into(),
            ));
        }
        let has_encoders =
            shapes.contains_key("vqvae_up.encoders.0.level_blocks.0.model.0.0.weight");
        let dilation_growth_rate = usize_at(config, "structure.up_half.dilation_growth_rate")
            .or_else(|| usize_at(config, "structure.down_half.dilation_growth_rate"))
            .unwrap_or(3);
        Ok(VqVaeArch {
            width,
            emb_width,
            l_bins,
            downs_t,
            stride_t: k / 2,
            depth,
            dilation_growth_rate,
            up_channels,
            down_channels,
            root_channels,
            has_encoders,
        })
    }

    /// [`VqVaeArch::detect`] on a loaded checkpoint, using its config.
    pub fn from_state_dict(sd: &StateDict) -> Result<VqVaeArch, ArchError> {
        VqVaeArch::detect(&sd.shapes(), sd.config.as_ref())
    }
}

fn push(out: &mut Vec<(String, Vec<usize>)>, key: String, shape: &[usize]) {
    out.push((key, shape.to_vec()));
}

fn block_base_keys(out: &mut Vec<(String, Vec<usize>)>, p: &str, a: &GptArch) {
    let c = a.n_embd;
    push(out, format!("{p}.norm1.weight"), &[c]);
    push(out, format!("{p}.norm2.weight"), &[c]);
    for l in ["in_proj", "act_proj", "out_proj"] {
        push(out, format!("{p}.{l}.weight"), &[c, c]);
        push(out, format!("{p}.{l}.bias"), &[c]);
    }
    push(
        out,
        format!("{p}.attn.mask"),
        &[1, 1, a.block_size, a.block_size],
    );
    for l in ["key", "query", "value", "proj"] {
        push(out, format!("{p}.attn.{l}.weight"), &[c, c]);
        push(out, format!("{p}.attn.{l}.bias"), &[c]);
    }
    push(out, format!("{p}.mlp.0.weight"), &[a.mlp_hidden, c]);
    push(out, format!("{p}.mlp.0.bias"), &[a.mlp_hidden]);
    push(out, format!("{p}.mlp.2.weight"), &[c, a.mlp_hidden]);
    push(out, format!("{p}.mlp.2.bias"), &[c]);
}

/// Every key (without `module.`) and shape the GPT needs, in state-dict order. All are float32
/// except the `*.num_batches_tracked` buffers (int64, shape ()).
pub fn expected_gpt_keys(a: &GptArch) -> Vec<(String, Vec<usize>)> {
    let c = a.n_embd;
    let m = &a.mamba;
    let mut out = Vec::new();
    push(&mut out, "gpt_base.position_scale".into(), &[]);
    push(
        &mut out,
        "gpt_base.tok_emb_up.weight".into(),
        &[a.vocab_up, c],
    );
    push(
        &mut out,
        "gpt_base.tok_emb_down.weight".into(),
        &[a.vocab_down, c],
    );
    for i in 1..=3 {
        let p = format!("gpt_base.pos_emb.pos_emb_{i}");
        push(&mut out, format!("{p}.linear2.weight"), &[c, a.lpe_bins]);
        push(&mut out, format!("{p}.linear2.bias"), &[c]);
        for n in ["weight", "bias", "running_mean", "running_var"] {
            push(&mut out, format!("{p}.bn2.{n}"), &[c]);
        }
        push(&mut out, format!("{p}.bn2.num_batches_tracked"), &[]);
    }
    push(&mut out, "gpt_base.cond_emb.weight".into(), &[c, a.n_music]);
    push(&mut out, "gpt_base.cond_emb.bias".into(), &[c]);
    for b in 0..a.n_layer_base {
        block_base_keys(&mut out, &format!("gpt_base.blocks.{b}"), a);
    }
    for b in 0..a.n_layer_head {
        let p = format!("gpt_head.blocks.{b}");
        for l in 1..=6 {
            push(&mut out, format!("{p}.ln{l}.weight"), &[c]);
        }
        for j in 1..=3 {
            let q = format!("{p}.mamba_{j}");
            push(&mut out, format!("{q}.A_log"), &[m.d_inner, m.d_state]);
            push(&mut out, format!("{q}.D"), &[m.d_inner]);
            push(&mut out, format!("{q}.in_proj.weight"), &[2 * m.d_inner, c]);
            push(
                &mut out,
                format!("{q}.conv1d.weight"),
                &[m.d_inner, 1, m.d_conv],
            );
            push(&mut out, format!("{q}.conv1d.bias"), &[m.d_inner]);
            push(
                &mut out,
                format!("{q}.x_proj.weight"),
                &[m.dt_rank + 2 * m.d_state, m.d_inner],
            );
            push(
                &mut out,
                format!("{q}.dt_proj.weight"),
                &[m.d_inner, m.dt_rank],
            );
            push(&mut out, format!("{q}.dt_proj.bias"), &[m.d_inner]);
            push(&mut out, format!("{q}.out_proj.weight"), &[c, m.d_inner]);
        }
        for j in 1..=3 {
            let q = format!("{p}.gate_mlp_{j}");
            push(
                &mut out,
                format!("{q}.fc1.weight"),
                &[2 * a.gated_mlp_hidden, c],
            );
            push(
                &mut out,
                format!("{q}.fc2.weight"),
                &[c, a.gated_mlp_hidden],
            );
        }
    }
    block_base_keys(&mut out, "gpt_head.block_base", a);
    push(&mut out, "gpt_head.ln_f.weight".into(), &[c]);
    push(&mut out, "gpt_head.ln_f.bias".into(), &[c]);
    push(&mut out, "gpt_head.RMS_f.weight".into(), &[c]);
    push(&mut out, "gpt_head.head_up.weight".into(), &[a.vocab_up, c]);
    push(
        &mut out,
        "gpt_head.head_down.weight".into(),
        &[a.vocab_down, c],
    );
    out
}

fn resnet_keys(out: &mut Vec<(String, Vec<usize>)>, p: &str, a: &VqVaeArch) {
    let w = a.width;
    for j in 0..a.depth {
        push(out, format!("{p}.model.{j}.model.1.weight"), &[w, w, 3]);
        push(out, format!("{p}.model.{j}.model.1.bias"), &[w]);
        push(out, format!("{p}.model.{j}.model.3.weight"), &[w, w, 1]);
        push(out, format!("{p}.model.{j}.model.3.bias"), &[w]);
    }
}

/// Every key (without `module.`) and shape the VQ-VAE needs, in state-dict order (all float32).
/// Encoder keys are included only when `a.has_encoders`.
pub fn expected_vqvae_keys(a: &VqVaeArch) -> Vec<(String, Vec<usize>)> {
    let (w, e, k) = (a.width, a.emb_width, 2 * a.stride_t);
    let mut out = Vec::new();
    type Half<'a> = (&'a str, usize, Vec<(&'a str, usize)>);
    let halves: [Half; 2] = [
        ("vqvae_up", a.up_channels, vec![("decoders", a.up_channels)]),
        (
            "vqvae_down",
            a.down_channels,
            vec![
                ("decoders", a.down_channels),
                ("decoders_root", a.root_channels),
            ],
        ),
    ];
    for (h, c_in, decoders) in halves {
        if a.has_encoders {
            let p = format!("{h}.encoders.0.level_blocks.0.model");
            for s in 0..a.downs_t {
                let cin = if s == 0 { c_in } else { w };
                push(&mut out, format!("{p}.{s}.0.weight"), &[w, cin, k]);
                push(&mut out, format!("{p}.{s}.0.bias"), &[w]);
                resnet_keys(&mut out, &format!("{p}.{s}.1"), a);
            }
            push(&mut out, format!("{p}.{}.weight", a.downs_t), &[e, w, 3]);
            push(&mut out, format!("{p}.{}.bias", a.downs_t), &[e]);
        }
        for (d, c_out) in decoders {
            let p = format!("{h}.{d}.0.level_blocks.0.model");
            push(&mut out, format!("{p}.0.weight"), &[w, e, 3]);
            push(&mut out, format!("{p}.0.bias"), &[w]);
            for s in 1..=a.downs_t {
                resnet_keys(&mut out, &format!("{p}.{s}.0"), a);
                let o = if s == a.downs_t { e } else { w };
                push(&mut out, format!("{p}.{s}.1.weight"), &[w, o, k]);
                push(&mut out, format!("{p}.{s}.1.bias"), &[o]);
            }
            push(&mut out, format!("{h}.{d}.0.out.weight"), &[c_out, e, 3]);
            push(&mut out, format!("{h}.{d}.0.out.bias"), &[c_out]);
        }
        push(
            &mut out,
            format!("{h}.bottleneck.level_blocks.0.k"),
            &[a.l_bins, e],
        );
    }
    out
}

/// A key whose shape differs from what the model needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MisShaped {
    pub key: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// Result of comparing a checkpoint's keys with the keys the model needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Needed keys that are absent (an error).
    pub missing: Vec<String>,
    /// Needed keys with the wrong shape (an error).
    pub mis_shaped: Vec<MisShaped>,
    /// Keys the model does not use and that are not known legacy entries.
    pub unexpected: Vec<String>,
    /// Known unused legacy entries: the LPE `linear1`/`bn1` of older official GPT checkpoints.
    pub ignored_known: Vec<String>,
    /// Needed tensors whose values the model cannot use (an error): integer data where weights
    /// are floating point, or NaN/infinite values (a damaged file). See [`check_values`].
    #[serde(default)]
    pub bad_values: Vec<BadValues>,
}

/// A needed tensor whose values are unusable, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadValues {
    pub key: String,
    pub problem: String,
}

impl Audit {
    /// True when nothing needed is missing, mis-shaped or unusable.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.mis_shaped.is_empty() && self.bad_values.is_empty()
    }

    /// `Ok(self)` if [`Audit::is_ok`], else [`ArchError::Audit`].
    pub fn into_result(self) -> Result<Audit, ArchError> {
        if self.is_ok() {
            Ok(self)
        } else {
            Err(ArchError::Audit(Box::new(self)))
        }
    }
}

impl std::fmt::Display for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            let list: Vec<&str> = self.missing.iter().take(8).map(String::as_str).collect();
            let more = self.missing.len().saturating_sub(8);
            parts.push(format!(
                "{} missing key(s): {}{}",
                self.missing.len(),
                list.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        for m in self.mis_shaped.iter().take(8) {
            parts.push(format!(
                "key {} has shape {:?}, expected {:?}",
                m.key, m.found, m.expected
            ));
        }
        if self.mis_shaped.len() > 8 {
            parts.push(format!(
                "{} more mis-shaped keys",
                self.mis_shaped.len() - 8
            ));
        }
        for b in self.bad_values.iter().take(8) {
            parts.push(format!("tensor {} {}", b.key, b.problem));
        }
        if self.bad_values.len() > 8 {
            parts.push(format!(
                "{} more tensors with unusable values",
                self.bad_values.len() - 8
            ));
        }
        if parts.is_empty() {
            parts.push(format!(
                "all keys present ({} unexpected, {} ignored known legacy)",
                self.unexpected.len(),
                self.ignored_known.len()
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Whether a key is one of the legacy, never-used LPE entries (`linear1`, `bn1`).
pub fn is_known_legacy_key(key: &str) -> bool {
    let key = crate::checkpoint::strip_module_prefix(key);
    let Some(rest) = key.strip_prefix("gpt_base.pos_emb.pos_emb_") else {
        return false;
    };
    let Some((idx, tail)) = rest.split_once('.') else {
        return false;
    };
    idx.parse::<u32>().is_ok() && (tail.starts_with("linear1.") || tail.starts_with("bn1."))
}

/// Compares present keys/shapes (and non-tensor entries `ignored`) with the expected list.
pub fn audit(expected: &[(String, Vec<usize>)], shapes: &ShapeMap, ignored: &[String]) -> Audit {
    let mut a = Audit::default();
    let mut wanted = std::collections::BTreeSet::new();
    for (k, s) in expected {
        wanted.insert(k.as_str());
        match shapes.get(k) {
            None => a.missing.push(k.clone()),
            Some(found) if found != s => a.mis_shaped.push(MisShaped {
                key: k.clone(),
                expected: s.clone(),
                found: found.clone(),
            }),
            Some(_) => {}
        }
    }
    for k in shapes.keys().chain(ignored.iter()) {
        if wanted.contains(k.as_str()) {
            continue;
        }
        if is_known_legacy_key(k) {
            a.ignored_known.push(k.clone());
        } else {
            a.unexpected.push(k.clone());
        }
    }
    a
}

/// Adds to `a` every tensor of `sd` that the audit expects (`expected`) and whose values the
/// model cannot use: integer data where the weights are floating point (every needed tensor
/// but BatchNorm's `num_batches_tracked` counter and the attention masks), or NaN/infinite
/// values, which a trained checkpoint never holds and which would silently turn every token
/// into the same one. Reads each tensor once (about 0.1 s per GB on the CPU).
pub fn check_values(sd: &StateDict, expected: &[(String, Vec<usize>)], a: &mut Audit) {
    use rayon::prelude::*;
    let found: Vec<BadValues> = expected
        .par_iter()
        .filter_map(|(key, _)| {
            let t = sd.tensors.get(key)?;
            let problem = if !t.dtype().is_float() {
                let may_be_integer =
                    key.ends_with(".num_batches_tracked") || key.ends_with(".attn.mask");
                (!may_be_integer).then(|| {
                    format!(
                        "holds {:?} data where the model's weights are floating point (a \
                         damaged or foreign file)",
                        t.dtype()
                    )
                })
            } else {
                match crate::checkpoint::has_non_finite(t) {
                    Ok(false) => None,
                    Ok(true) => Some(
                        "holds NaN or infinite values (a damaged file, or a diverged training \
                         run)"
                            .to_string(),
                    ),
                    Err(e) => Some(format!("could not be read: {e}")),
                }
            };
            problem.map(|problem| BadValues {
                key: key.clone(),
                problem,
            })
        })
        .collect();
    a.bad_values.extend(found);
}

/// [`audit`] of `sd`'s keys against `expected`, then [`check_values`] of its tensors.
fn audit_all(sd: &StateDict, expected: &[(String, Vec<usize>)], shapes: &ShapeMap) -> Audit {
    let mut a = audit(expected, shapes, &sd.ignored);
    check_values(sd, expected, &mut a);
    a
}

/// A detected architecture of either kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DetectedArch {
    Gpt(GptArch),
    Vqvae(VqVaeArch),
}

/// Kind, architecture and audit of a loaded checkpoint. Detection failures of a recognised kind
/// are errors; an unknown kind gives `Ok((Unknown, None, empty audit))`.
pub fn inspect_state_dict(
    sd: &StateDict,
    n_head: Option<usize>,
) -> Result<(ModelKind, Option<DetectedArch>, Audit), ArchError> {
    let shapes = sd.shapes();
    let kind = detect_kind(shapes.keys().chain(sd.ignored.iter()));
    match kind {
        ModelKind::Gpt => {
            let arch = GptArch::from_state_dict(sd, n_head)?;
            let audit = audit_all(sd, &expected_gpt_keys(&arch), &shapes);
            Ok((kind, Some(DetectedArch::Gpt(arch)), audit))
        }
        ModelKind::Vqvae => {
            let arch = VqVaeArch::detect(&shapes, sd.config.as_ref())?;
            let audit = audit_all(sd, &expected_vqvae_keys(&arch), &shapes);
            Ok((kind, Some(DetectedArch::Vqvae(arch)), audit))
        }
        ModelKind::Unknown => Ok((kind, None, Audit::default())),
    }
}

/// Detects the GPT and audits it; a missing or mis-shaped key is an error naming it.
pub fn audit_gpt(sd: &StateDict, n_head: Option<usize>) -> Result<(GptArch, Audit), ArchError> {
    let found = detect_kind(sd.tensors.keys());
    if found != ModelKind::Gpt {
        return Err(ArchError::WrongKind {
            expected: ModelKind::Gpt,
            found,
        });
    }
    let shapes = sd.shapes();
    let arch = GptArch::from_state_dict(sd, n_head)?;
    let audit = audit_all(sd, &expected_gpt_keys(&arch), &shapes).into_result()?;
    Ok((arch, audit))
}

/// Detects the VQ-VAE and audits it; a missing or mis-shaped key is an error naming it.
pub fn audit_vqvae(sd: &StateDict) -> Result<(VqVaeArch, Audit), ArchError> {
    let found = detect_kind(sd.tensors.keys());
    if found != ModelKind::Vqvae {
        return Err(ArchError::WrongKind {
            expected: ModelKind::Vqvae,
            found,
        });
    }
    let shapes = sd.shapes();
    let arch = VqVaeArch::detect(&shapes, sd.config.as_ref())?;
    let audit = audit_all(sd, &expected_vqvae_keys(&arch), &shapes).into_result()?;
    Ok((arch, audit))
}

/// Whether a key is a buffer rather than a trainable parameter (attention masks, BatchNorm
/// statistics, VQ codebooks).
pub fn is_buffer_key(key: &str) -> bool {
    let key = crate::checkpoint::strip_module_prefix(key);
    key.ends_with(".attn.mask")
        || key.ends_with(".running_mean")
        || key.ends_with(".running_var")
        || key.ends_with(".num_batches_tracked")
        || (key.contains(".bottleneck.") && key.ends_with(".k"))
}

/// Parameter and buffer counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamCount {
    /// Trainable parameters (all tensors except buffers and `skip`).
    pub parameters: u64,
    /// Values in buffers.
    pub buffer_values: u64,
    /// Parameters by module: the first two components of the key (`gpt_base.blocks`, ...).
    pub per_module: std::collections::BTreeMap<String, u64>,
}

/// Counts parameters over a key/shape map, leaving out the keys in `skip` (e.g. the known
/// legacy entries).
pub fn count_parameters(shapes: &ShapeMap, skip: &[String]) -> ParamCount {
    let mut c = ParamCount::default();
    for (k, s) in shapes {
        if skip.iter().any(|x| x == k) {
            continue;
        }
        let n: u64 = s.iter().map(|&d| d as u64).product();
        if is_buffer_key(k) {
            c.buffer_values += n;
        } else {
            c.parameters += n;
            let module = k.split('.').take(2).collect::<Vec<_>>().join(".");
            *c.per_module.entry(module).or_default() += n;
        }
    }
    c
}
