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
