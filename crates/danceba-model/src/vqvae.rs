//! SepVQVAER: codebooks, decoders (up, down, root) and encoders (reference §4).
//!
//! The model splits the 24 SMPL joints into an upper half (`smpl_up`, 15 joints, 45 channels) and a
//! lower half (`smpl_down`, 9 joints, 27 channels, root first). Each half has its own codebook,
//! encoder and decoder; the lower half has a second decoder for the root velocity.
//!
//! Every layer is a standard candle op (`conv1d`, `conv_transpose1d`, `index_select`, `matmul`),
//! so this is the portable path on every device. Sizes come from [`VqVaeArch`].

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::arch::VqVaeArch;

/// Joints of the upper-body half, in VQ-VAE channel order (`smpl_up`, reference §4.1).
pub const SMPL_UP: [usize; 15] = [3, 6, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23];
/// Joints of the lower-body half, in VQ-VAE channel order (`smpl_down`, root first).
pub const SMPL_DOWN: [usize; 9] = [0, 1, 2, 4, 5, 7, 8, 10, 11];
/// Number of SMPL joints in the assembled output.
pub const NUM_JOINTS: usize = 24;
/// Floats per frame of the assembled output (24 joints × 3).
pub const FRAME_WIDTH: usize = NUM_JOINTS * 3;

/// Errors of the VQ-VAE stage.
#[derive(Debug, thiserror::Error)]
pub enum VqVaeError {
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("the {stream} token stream is empty: at least one token per stream is needed")]
    EmptyTokens { stream: &'static str },
    #[error(
        "the up and down token streams differ in length ({up} vs {down}); they must be paired \
         token by token"
    )]
    LengthMismatch { up: usize, down: usize },
    #[error("{stream} token #{index} is {id}, outside the codebook (valid ids are 0..{l_bins})")]
    BadToken {
        stream: &'static str,
        index: usize,
        id: u32,
        l_bins: usize,
    },
    #[error(
        "this VQ-VAE has {up} up / {down} down / {root} root channels; only the SMPL 24-joint \
         layout (45 / 27 / 3) is supported"
    )]
    UnsupportedLayout { up: usize, down: usize, root: usize },
    #[error("the checkpoint has no encoders, so motions cannot be encoded into tokens")]
    NoEncoder,
    #[error(
        "a motion to encode must have frames × 72 values with at least {min_frames} frames \
         (one token); got {len} values for {frames} frames"
    )]
    BadMotion {
        len: usize,
        frames: usize,
        min_frames: usize,
    },
    #[error("motion value #{index} is not finite ({value})")]
    NotFinite { index: usize, value: f32 },
    #[error("chunk size must be at least one token")]
    BadChunk,
}

pub type Result<T> = std::result::Result<T, VqVaeError>;

/// A 1-D convolution with bias (zero padding).
#[derive(Debug, Clone)]
struct Conv1d {
    w: Tensor,
    b: Tensor,
    padding: usize,
    stride: usize,
    dilation: usize,
}

impl Conv1d {
    #[allow(clippy::too_many_arguments)]
    fn load(
        vb: &VarBuilder,
        c_out: usize,
        c_in: usize,
        k: usize,
        padding: usize,
        stride: usize,
        dilation: usize,
    ) -> Result<Self> {
        let w = vb.get((c_out, c_in, k), "weight")?;
        let b = vb.get(c_out, "bias")?.reshape((1, c_out, 1))?;
        Ok(Self {
            w,
            b,
            padding,
            stride,
            dilation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv1d(&self.w, self.padding, self.stride, self.dilation, 1)?;
        Ok(y.broadcast_add(&self.b)?)
    }
}

/// A 1-D transposed convolution with bias; weight shape (in, out, k) as in torch.
#[derive(Debug, Clone)]
struct ConvTranspose1d {
    w: Tensor,
    b: Tensor,
    padding: usize,
    stride: usize,
}

impl ConvTranspose1d {
    fn load(
        vb: &VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let w = vb.get((c_in, c_out, k), "weight")?;
        let b = vb.get(c_out, "bias")?.reshape((1, c_out, 1))?;
        Ok(Self {
            w,
            b,
            padding,
            stride,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv_transpose1d(&self.w, self.padding, 0, self.stride, 1, 1)?;
        Ok(y.broadcast_add(&self.b)?)
    }
}

/// `ResConv1DBlock`: `x + conv1x1(relu(conv_k3_dilated(relu(x))))`.
#[derive(Debug, Clone)]
struct ResBlock {
    conv: Conv1d,
    proj: Conv1d,
}

impl ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv.forward(&x.relu()?)?;
        let h = self.proj.forward(&h.relu()?)?;
        Ok((x + h)?)
    }
}

/// `Resnet1D`: `depth` residual blocks with dilations `growth^i` (reversed in the decoder).
#[derive(Debug, Clone)]
struct Resnet {
    blocks: Vec<ResBlock>,
}

impl Resnet {
    fn load(vb: &VarBuilder, arch: &VqVaeArch, reverse: bool) -> Result<Self> {
        let width = arch.width;
        let mut dilations = resnet_dilations(arch);
        if reverse {
            dilations.reverse();
        }
        let vb = vb.pp("model");
        let blocks = dilations
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let vbi = vb.pp(i).pp("model");
                Ok(ResBlock {
                    conv: Conv1d::load(&vbi.pp(1), width, width, 3, d, 1, d)?,
                    proj: Conv1d::load(&vbi.pp(3), width, width, 1, 0, 1, 1)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        Ok(x)
    }
}

fn resnet_dilations(arch: &VqVaeArch) -> Vec<usize> {
    (0..arch.depth)
        .map(|i| arch.dilation_growth_rate.max(1).saturating_pow(i as u32))
        .collect()
}

/// Kernel and padding of the strided (transposed) convolutions: `(2·stride, stride/2)` (Jukebox).
fn stride_conv_params(arch: &VqVaeArch) -> (usize, usize) {
    (arch.stride_t * 2, arch.stride_t / 2)
}

/// `Decoder` (`decoders.0` / `decoders_root.0`, reference §4.3).
#[derive(Debug, Clone)]
struct Decoder {
    input: Conv1d,
    stages: Vec<(Resnet, ConvTranspose1d)>,
    out: Conv1d,
}

impl Decoder {
    fn load(vb: &VarBuilder, arch: &VqVaeArch, c_out: usize) -> Result<Self> {
        let (k, pad) = stride_conv_params(arch);
        let blocks = vb.pp("level_blocks").pp(0).pp("model");
        let input = Conv1d::load(&blocks.pp(0), arch.width, arch.emb_width, 3, 1, 1, 1)?;
        let stages = (0..arch.downs_t)
            .map(|s| {
                let vbs = blocks.pp(s + 1);
                let res = Resnet::load(&vbs.pp(0), arch, true)?;
                let up_out = if s + 1 == arch.downs_t {
                    arch.emb_width
                } else {
                    arch.width
                };
                let up =
                    ConvTranspose1d::load(&vbs.pp(1), arch.width, up_out, k, pad, arch.stride_t)?;
                Ok((res, up))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Conv1d::load(&vb.pp("out"), c_out, arch.emb_width, 3, 1, 1, 1)?;
        Ok(Self { input, stages, out })
    }

    /// (1, emb_width, T_z) → (1, c_out, stride^downs · T_z)
    fn forward(&self, q: &Tensor) -> Result<Tensor> {
        let mut x = self.input.forward(q)?;
        for (res, up) in &self.stages {
            x = res.forward(&x)?;
            x = up.forward(&x)?;
        }
        self.out.forward(&x)
    }
}

/// `Encoder` (`encoders.0`, reference §4.2).
#[derive(Debug, Clone)]
struct Encoder {
    stages: Vec<(Conv1d, Resnet)>,
    out: Conv1d,
}

impl Encoder {
    fn load(vb: &VarBuilder, arch: &VqVaeArch, c_in: usize) -> Result<Self> {
        let (k, pad) = stride_conv_params(arch);
        let blocks = vb.pp("level_blocks").pp(0).pp("model");
        let stages = (0..arch.downs_t)
            .map(|s| {
                let vbs = blocks.pp(s);
                let cin = if s == 0 { c_in } else { arch.width };
                let down = Conv1d::load(&vbs.pp(0), arch.width, cin, k, pad, arch.stride_t, 1)?;
                let res = Resnet::load(&vbs.pp(1), arch, false)?;
                Ok((down, res))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Conv1d::load(
            &blocks.pp(arch.downs_t),
            arch.emb_width,
            arch.width,
            3,
            1,
            1,
            1,
        )?;
        Ok(Self { stages, out })
    }

    /// (1, c_in, T) → (1, emb_width, T / stride^downs)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (down, res) in &self.stages {
            x = down.forward(&x)?;
            x = res.forward(&x)?;
        }
        self.out.forward(&x)
    }
}

/// One half of the SepVQVAER (`vqvae_up` or `vqvae_down`).
#[derive(Debug, Clone)]
struct Half {
    codebook: Tensor,
    decoder: Decoder,
    encoder: Option<Encoder>,
}

impl Half {
    fn load(vb: &VarBuilder, arch: &VqVaeArch, channels: usize) -> Result<Self> {
        let codebook = vb
            .pp("bottleneck")
            .pp("level_blocks")
            .pp(0)
            .get((arch.l_bins, arch.emb_width), "k")?;
        let decoder = Decoder::load(&vb.pp("decoders").pp(0), arch, channels)?;
        let encoder = if arch.has_encoders {
            Some(Encoder::load(&vb.pp("encoders").pp(0), arch, channels)?)
        } else {
            None
        };
        Ok(Self {
            codebook,
            decoder,
            encoder,
        })
    }

    fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(ids, ids.len(), self.codebook.device())?;
        // (T_z, emb) → (1, emb, T_z)
        Ok(self
            .codebook
            .index_select(&idx, 0)?
            .t()?
            .unsqueeze(0)?
            .contiguous()?)
    }

    /// Nearest codebook entry of each column of `e` (1, emb, T'):
    /// `argmin_j Σe² − 2 e·k_j + Σk_j²`, lowest index on ties.
    fn quantise(&self, e: &Tensor) -> Result<Vec<u32>> {
        let x = e.squeeze(0)?.t()?.contiguous()?; // (T', emb)
        let k = &self.codebook; // (l_bins, emb)
        let x2 = x.sqr()?.sum_keepdim(1)?; // (T', 1)
        let k2 = k.sqr()?.sum_keepdim(1)?.t()?; // (1, l_bins)
        let xk = x.matmul(&k.t()?)?; // (T', l_bins)
        let d = x2
            .broadcast_sub(&(xk * 2.0)?)?
            .broadcast_add(&k2)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(d.iter().map(|row| argmin(row)).collect())
    }
}

fn argmin(row: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::INFINITY;
    for (i, &v) in row.iter().enumerate() {
        // `<` keeps the lowest index on exact ties; NaN never wins.
        if v < best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

/// The SepVQVAER of the official model, for decoding token streams into motion and encoding
/// seed motions into tokens.
#[derive(Debug, Clone)]
pub struct VqVae {
    arch: VqVaeArch,
    up: Half,
    down: Half,
    /// `vqvae_down.decoders_root`: the root-velocity decoder.
    root_decoder: Decoder,
    device: Device,
    dtype: DType,
}

impl VqVae {
    /// Builds the model from a var builder over the checkpoint's tensors (keys without the
    /// `module.` prefix, e.g. `vqvae_up.decoders.0.out.weight`). The encoders are loaded only when
    /// `arch.has_encoders`.
    pub fn load(vb: VarBuilder, arch: &VqVaeArch) -> Result<Self> {
        if arch.up_channels != SMPL_UP.len() * 3
            || arch.down_channels != SMPL_DOWN.len() * 3
            || arch.root_channels != 3
        {
            return Err(VqVaeError::UnsupportedLayout {
                up: arch.up_channels,
                down: arch.down_channels,
                root: arch.root_channels,
            });
        }
        let up = Half::load(&vb.pp("vqvae_up"), arch, arch.up_channels)?;
        let down = Half::load(&vb.pp("vqvae_down"), arch, arch.down_channels)?;
        let root_decoder = Decoder::load(
            &vb.pp("vqvae_down").pp("decoders_root").pp(0),
            arch,
            arch.root_channels,
        )?;
        Ok(Self {
            arch: arch.clone(),
            up,
            down,
            root_decoder,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The architecture this model was built with.
    pub fn arch(&self) -> &VqVaeArch {
        &self.arch
    }

    /// Frames produced per token (`stride^downs_t`, 8 in the official model).
    pub fn frames_per_token(&self) -> usize {
        self.arch.stride_t.saturating_pow(self.arch.downs_t as u32)
    }

    /// How many tokens on each side of a decoded token can influence its frames: the decoder's
    /// receptive field, rounded up, plus one token of margin. Used by [`VqVae::decode_chunked`].
    pub fn decoder_halo_tokens(&self) -> usize {
        // Work in units of output frames: a layer at resolution r (frames per element) with
        // one-sided reach `h` elements adds `h · r` frames of reach.
        let fpt = self.frames_per_token();
        let s = self.arch.stride_t.max(1);
        let (k, pad) = stride_conv_params(&self.arch);
        let res_reach: usize = resnet_dilations(&self.arch).iter().sum(); // k3 convs: d each
                                                                          // Transposed conv: output o reads inputs i with o = s·i + kk − pad, kk < k.
        let convt_reach = (k + pad).div_ceil(s);
        let mut frames = fpt; // input k3 conv at token resolution
        let mut r = fpt;
        for _ in 0..self.arch.downs_t {
            frames += res_reach * r + convt_reach * r;
            r /= s;
        }
        frames += r.max(1); // output k3 conv at frame resolution
        frames.div_ceil(fpt.max(1)) + 1
    }

    fn check_tokens(&self, up: &[u32], down: &[u32]) -> Result<()> {
        if up.is_empty() {
            return Err(VqVaeError::EmptyTokens { stream: "up" });
        }
        if down.is_empty() {
            return Err(VqVaeError::EmptyTokens { stream: "down" });
        }
        if up.len() != down.len() {
            return Err(VqVaeError::LengthMismatch {
                up: up.len(),
                down: down.len(),
            });
        }
        for (stream, ids) in [("up", up), ("down", down)] {
            if let Some((index, &id)) = ids
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= self.arch.l_bins)
            {
                return Err(VqVaeError::BadToken {
                    stream,
                    index,
                    id,
                    l_bins: self.arch.l_bins,
                });
            }
        }
        Ok(())
    }

    /// Decodes paired token streams into `(frames_per_token · T_z) × 72` floats (`pose_decoded`):
    /// joints 1..23 relative to the root, joint 0 the root *velocity* (reference §4.3, §4.4).
    pub fn decode(&self, up: &[u32], down: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(up, down)?;
        self.decode_unchecked(up, down)
    }

    fn decode_unchecked(&self, up: &[u32], down: &[u32]) -> Result<Vec<f32>> {
        let q_up = self.up.lookup(up)?;
        let q_down = self.down.lookup(down)?;
        let o_up = to_frames(&self.up.decoder.forward(&q_up)?)?;
        let o_down = to_frames(&self.down.decoder.forward(&q_down)?)?;
        let root = to_frames(&self.root_decoder.forward(&q_down)?)?;
        let frames = o_up.len() / self.arch.up_channels;
        let mut out = vec![0f32; frames * FRAME_WIDTH];
        for f in 0..frames {
            let row = &mut out[f * FRAME_WIDTH..(f + 1) * FRAME_WIDTH];
            let u = &o_up[f * self.arch.up_channels..(f + 1) * self.arch.up_channels];
            let d = &o_down[f * self.arch.down_channels..(f + 1) * self.arch.down_channels];
            for (j, &joint) in SMPL_UP.iter().enumerate() {
                row[3 * joint..3 * joint + 3].copy_from_slice(&u[3 * j..3 * j + 3]);
            }
            for (j, &joint) in SMPL_DOWN.iter().enumerate() {
                row[3 * joint..3 * joint + 3].copy_from_slice(&d[3 * j..3 * j + 3]);
            }
            // The root slot (joint 0, first of smpl_down) comes from the root decoder.
            row[0..3].copy_from_slice(&root[f * 3..f * 3 + 3]);
        }
        Ok(out)
    }

    /// Like [`VqVae::decode`], but decodes at most `chunk_tokens` tokens at a time, each with
    /// [`VqVae::decoder_halo_tokens`] tokens of context on both sides, so that memory stays
    /// bounded for long songs. Every output frame sees exactly the same inputs as in a
    /// whole-song decode.
    pub fn decode_chunked(
        &self,
        up: &[u32],
        down: &[u32],
        chunk_tokens: usize,
    ) -> Result<Vec<f32>> {
        if chunk_tokens == 0 {
            return Err(VqVaeError::BadChunk);
        }
        self.check_tokens(up, down)?;
        let n = up.len();
        if n <= chunk_tokens {
            return self.decode_unchecked(up, down);
        }
        let halo = self.decoder_halo_tokens();
        let fpt = self.frames_per_token();
        let mut out = Vec::with_capacity(n * fpt * FRAME_WIDTH);
        let mut start = 0;
        while start < n {
            let end = (start + chunk_tokens).min(n);
            let lo = start.saturating_sub(halo);
            let hi = (end + halo).min(n);
            let part = self.decode_unchecked(&up[lo..hi], &down[lo..hi])?;
            let a = (start - lo) * fpt * FRAME_WIDTH;
            let b = (end - lo) * fpt * FRAME_WIDTH;
            out.extend_from_slice(&part[a..b]);
            start = end;
        }
        Ok(out)
    }

    /// Encodes a root-relative motion (`frames × 72`, joint 0 is ignored: the lower half's root
    /// is zeroed as in `VQVAER.encode`) into paired token streams of
    /// `frames / frames_per_token` tokens (floor, as the strided convolutions do).
    pub fn encode(&self, root_relative: &[f32], frames: usize) -> Result<(Vec<u32>, Vec<u32>)> {
        let (Some(enc_up), Some(enc_down)) = (&self.up.encoder, &self.down.encoder) else {
            return Err(VqVaeError::NoEncoder);
        };
        let min_frames = self.frames_per_token();
        if frames.checked_mul(FRAME_WIDTH) != Some(root_relative.len()) || frames < min_frames {
            return Err(VqVaeError::BadMotion {
                len: root_relative.len(),
                frames,
                min_frames,
            });
        }
        if let Some((index, &value)) = root_relative
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            return Err(VqVaeError::NotFinite { index, value });
        }
        let mut x_up = Vec::with_capacity(frames * SMPL_UP.len() * 3);
        let mut x_down = Vec::with_capacity(frames * SMPL_DOWN.len() * 3);
        for f in 0..frames {
            let row = &root_relative[f * FRAME_WIDTH..(f + 1) * FRAME_WIDTH];
            for &j in &SMPL_UP {
                x_up.extend_from_slice(&row[3 * j..3 * j + 3]);
            }
            for &j in &SMPL_DOWN {
                if j == 0 {
                    x_down.extend_from_slice(&[0.0; 3]);
                } else {
                    x_down.extend_from_slice(&row[3 * j..3 * j + 3]);
                }
            }
        }
        let codes = |half: &Half, enc: &Encoder, x: Vec<f32>, c: usize| -> Result<Vec<u32>> {
            let t = Tensor::from_vec(x, (1, frames, c), &self.device)?
                .to_dtype(self.dtype)?
                .transpose(1, 2)?
                .contiguous()?;
            let e = enc.forward(&t)?;
            half.quantise(&e)
        };
        let up = codes(&self.up, enc_up, x_up, self.arch.up_channels)?;
        let down = codes(&self.down, enc_down, x_down, self.arch.down_channels)?;
        Ok((up, down))
    }
}

/// (1, C, T) → T × C row-major f32.
fn to_frames(x: &Tensor) -> Result<Vec<f32>> {
    let x = x.squeeze(0)?.t()?.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.flatten_all()?.to_vec1::<f32>()?)
}

/// The sizes of the official SepVQVAER (reference §4.1), with encoders.
pub fn official_vqvae_arch() -> VqVaeArch {
    VqVaeArch {
        width: 512,
        emb_width: 512,
        l_bins: 512,
        downs_t: 3,
        stride_t: 2,
        depth: 3,
        dilation_growth_rate: 3,
        up_channels: 45,
        down_channels: 27,
        root_channels: 3,
        has_encoders: true,
    }
}

/// Random weights of a VQ-VAE of `arch` in the official layout (every key of
/// [`crate::arch::expected_vqvae_keys`], without `module.`; convolutions uniform in ±1/√fan_in,
/// codebooks in ±1), on the CPU in f32. Deterministic for a given `seed`.
pub fn random_vqvae_weights(
    arch: &VqVaeArch,
    seed: u64,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut weights = std::collections::HashMap::new();
    for (idx, (key, shape)) in crate::arch::expected_vqvae_keys(arch)
        .into_iter()
        .enumerate()
    {
        let fan_in: usize = shape.iter().skip(1).product();
        let r = if key.ends_with(".k") {
            1.0
        } else {
            1.0 / (fan_in.max(1) as f32).sqrt()
        };
        let t = crate::gpt::random::uniform_tensor(
            &shape,
            r,
            seed ^ (idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )?;
        weights.insert(key, t);
    }
    Ok(weights)
}

/// A VQ-VAE of `arch` with the random weights of [`random_vqvae_weights`] on `device`: for
/// benchmarks without the real checkpoint. Deterministic for a given `seed`.
pub fn random_vqvae(arch: &VqVaeArch, seed: u64, device: &Device) -> Result<VqVae> {
    let weights = random_vqvae_weights(arch, seed)?;
    VqVae::load(VarBuilder::from_tensors(weights, DType::F32, device), arch)
}
