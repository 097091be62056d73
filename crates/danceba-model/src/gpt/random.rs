//! Random GPT weights in the official state-dict layout (keys without `module.`), for
//! benchmarks and size tests without the real checkpoint. The values follow the usual
//! initialisations (uniform ±1/√fan_in linears, unit norms, Mamba's A_log = log(1..N) and a Δ
//! bias giving Δ ≈ 0.01), so activations stay in a realistic range.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::Result;
use crate::arch::{GptArch, MambaArch};

/// The sizes of the official real-size GPT (reference §3.1).
pub fn official_gpt_arch() -> GptArch {
    GptArch {
        n_embd: 768,
        n_head: 12,
        n_layer_base: 6,
        n_layer_head: 6,
        vocab_up: 512,
        vocab_down: 512,
        n_music: 438,
        block_size: 29,
        mlp_hidden: 3072,
        gated_mlp_hidden: 768,
        lpe_bins: 257,
        mamba: MambaArch {
            d_inner: 3072,
            d_state: 128,
            dt_rank: 48,
            d_conv: 4,
        },
    }
}

/// What a tensor is filled with.
#[derive(Clone, Copy)]
enum Fill {
    Uniform(f32),
    Const(f32),
    ALog,
    Mask,
    Count,
}

/// How each key of the official layout is filled: norms and BatchNorm at identity, Mamba's
/// `A_log`/`D`/Δ bias as initialised, linears uniform in ±1/√fan_in (fan_in read off the weight).
fn fill_for(key: &str, shapes: &HashMap<&str, &[usize]>) -> Fill {
    let fan_in = |weight_key: &str| -> f32 {
        let n: usize = shapes
            .get(weight_key)
            .map(|s| s.iter().skip(1).product())
            .unwrap_or(1);
        1.0 / (n.max(1) as f32).sqrt()
    };
    let last = key.rsplit('.').next().unwrap_or(key);
    if key.ends_with("position_scale") {
        Fill::Const(0.5)
    } else if key.contains("tok_emb_") {
        Fill::Uniform(1.0)
    } else if last == "num_batches_tracked" {
        Fill::Count
    } else if key.ends_with("attn.mask") {
        Fill::Mask
    } else if last == "A_log" {
        Fill::ALog
    } else if last == "D" || last == "running_var" {
        Fill::Const(1.0)
    } else if last == "running_mean" {
        Fill::Const(0.0)
    } else if key.ends_with("dt_proj.bias") {
        // softplus⁻¹(0.01)
        Fill::Const(-4.600_17)
    } else if is_norm(key) {
        // norm weights (RMSNorm, BatchNorm γ, the unused ln_f) are 1, their biases 0
        Fill::Const(if last == "bias" { 0.0 } else { 1.0 })
    } else if last == "bias" {
        Fill::Uniform(fan_in(&format!("{}.weight", &key[..key.len() - 5])))
    } else {
        Fill::Uniform(fan_in(key))
    }
}

/// Whether `key` belongs to a normalisation layer (RMSNorm, LayerNorm, BatchNorm).
fn is_norm(key: &str) -> bool {
    let module = key.rsplit('.').nth(1).unwrap_or("");
    matches!(module, "norm1" | "norm2" | "RMS_f" | "ln_f" | "bn2")
        || module
            .strip_prefix("ln")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Every key of the official GPT state dict (without `module.`), its shape, and how to fill it.
/// The keys and shapes are the audit's ([`crate::arch::expected_gpt_keys`]).
fn key_list(a: &GptArch) -> Vec<(String, Vec<usize>, Fill)> {
    let keys = crate::arch::expected_gpt_keys(a);
    let shapes: HashMap<&str, &[usize]> = keys
        .iter()
        .map(|(k, s)| (k.as_str(), s.as_slice()))
        .collect();
    keys.iter()
        .map(|(k, s)| (k.clone(), s.clone(), fill_for(k, &shapes)))
        .collect()
}

/// A CPU f32 tensor of `shape` uniform in `[-r, r)`, from a splitmix64 stream seeded with `seed`
/// (fast and reproducible; shared by the random GPT and VQ-VAE weights).
pub fn uniform_tensor(shape: &[usize], r: f32, seed: u64) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            (2.0 * u - 1.0) * r
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// The keys and shapes of the official GPT state dict for `arch` (without `module.`).
pub fn gpt_key_shapes(arch: &GptArch) -> Vec<(String, Vec<usize>)> {
    key_list(arch).into_iter().map(|(k, s, _)| (k, s)).collect()
}

/// A random state dict of `arch` in the official layout, on the CPU in f32 (the
/// `num_batches_tracked` counters are i64 scalars). Deterministic for a given `seed`.
pub fn random_gpt_weights(arch: &GptArch, seed: u64) -> Result<HashMap<String, Tensor>> {
    random_gpt_weights_as(arch, seed, DType::F32)
}

/// [`random_gpt_weights`] with the float tensors rounded to `dtype` one at a time as they are
/// made, so that f16/bf16 weights never coexist with a full f32 copy (the same values as
/// converting the f32 state dict).
pub fn random_gpt_weights_as(
    arch: &GptArch,
    seed: u64,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (idx, (key, shape, fill)) in key_list(arch).into_iter().enumerate() {
        let t = match fill {
            Fill::Count => Tensor::new(0i64, &Device::Cpu)?,
            Fill::Const(v) => Tensor::full(v, shape, &Device::Cpu)?,
            Fill::Uniform(r) => uniform_tensor(
                &shape,
                r,
                seed ^ (idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            )?,
            Fill::ALog => {
                let (d, ns) = (shape[0], shape[1]);
                let data: Vec<f32> = (0..d * ns).map(|i| ((i % ns) as f32 + 1.0).ln()).collect();
                Tensor::from_vec(data, shape, &Device::Cpu)?
            }
            Fill::Mask => {
                let bs = arch.block_size;
                let data: Vec<f32> = (0..bs * bs)
                    .map(|i| if i % bs <= i / bs { 1.0 } else { 0.0 })
                    .collect();
                Tensor::from_vec(data, shape, &Device::Cpu)?
            }
        };
        debug_assert!(t.dtype() == DType::F32 || matches!(fill, Fill::Count));
        let t = if matches!(fill, Fill::Count) || dtype == DType::F32 {
            t
        } else {
            t.to_dtype(dtype)?
        };
        out.insert(key, t);
    }
    Ok(out)
}

/// A real-size-layout GPT of `arch` with random weights ([`random_gpt_weights`]) on the CPU
/// in f32.
pub fn random_gpt(arch: &GptArch, seed: u64) -> Result<super::Gpt> {
    let w = random_gpt_weights(arch, seed)?;
    let vb = candle_nn::VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    super::Gpt::load(vb, arch)
}

/// [`random_gpt`] with its weights on `device` in `dtype` (e.g. for `danceba bench --device`).
pub fn random_gpt_on(
    arch: &GptArch,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<super::Gpt> {
    let w = random_gpt_weights_as(arch, seed, dtype)?;
    let vb = candle_nn::VarBuilder::from_tensors(w, dtype, device);
    super::Gpt::load(vb, arch)
}
