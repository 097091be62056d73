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

/// Every key of the official GPT state dict (without `module.`), its shape, and how to fill it.
fn key_list(a: &GptArch) -> Vec<(String, Vec<usize>, Fill)> {
    let c = a.n_embd;
    let mut v: Vec<(String, Vec<usize>, Fill)> = Vec::new();
    let mut push = |k: String, s: Vec<usize>, f: Fill| v.push((k, s, f));
    let lin = |fan_in: usize| Fill::Uniform(1.0 / (fan_in as f32).sqrt());
    push("gpt_base.position_scale".into(), vec![], Fill::Const(0.5));
    push(
        "gpt_base.tok_emb_up.weight".into(),
        vec![a.vocab_up, c],
        Fill::Uniform(1.0),
    );
    push(
        "gpt_base.tok_emb_down.weight".into(),
        vec![a.vocab_down, c],
        Fill::Uniform(1.0),
    );
    for m in 1..=3 {
        let p = format!("gpt_base.pos_emb.pos_emb_{m}");
        push(
            format!("{p}.linear2.weight"),
            vec![c, a.lpe_bins],
            lin(a.lpe_bins),
        );
        push(format!("{p}.linear2.bias"), vec![c], lin(a.lpe_bins));
        push(format!("{p}.bn2.weight"), vec![c], Fill::Const(1.0));
        push(format!("{p}.bn2.bias"), vec![c], Fill::Const(0.0));
        push(format!("{p}.bn2.running_mean"), vec![c], Fill::Const(0.0));
        push(format!("{p}.bn2.running_var"), vec![c], Fill::Const(1.0));
        push(format!("{p}.bn2.num_batches_tracked"), vec![], Fill::Count);
    }
    push(
        "gpt_base.cond_emb.weight".into(),
        vec![c, a.n_music],
        lin(a.n_music),
    );
    push("gpt_base.cond_emb.bias".into(), vec![c], lin(a.n_music));
    let block_base = |p: String, push: &mut dyn FnMut(String, Vec<usize>, Fill)| {
        push(format!("{p}.norm1.weight"), vec![c], Fill::Const(1.0));
        push(format!("{p}.norm2.weight"), vec![c], Fill::Const(1.0));
        for n in ["in_proj", "act_proj", "out_proj"] {
            push(format!("{p}.{n}.weight"), vec![c, c], lin(c));
            push(format!("{p}.{n}.bias"), vec![c], lin(c));
        }
        push(
            format!("{p}.attn.mask"),
            vec![1, 1, a.block_size, a.block_size],
            Fill::Mask,
        );
        for n in ["key", "query", "value", "proj"] {
            push(format!("{p}.attn.{n}.weight"), vec![c, c], lin(c));
            push(format!("{p}.attn.{n}.bias"), vec![c], lin(c));
        }
        push(format!("{p}.mlp.0.weight"), vec![a.mlp_hidden, c], lin(c));
        push(format!("{p}.mlp.0.bias"), vec![a.mlp_hidden], lin(c));
        push(
            format!("{p}.mlp.2.weight"),
            vec![c, a.mlp_hidden],
            lin(a.mlp_hidden),
        );
        push(format!("{p}.mlp.2.bias"), vec![c], lin(a.mlp_hidden));
    };
    for i in 0..a.n_layer_base {
        block_base(format!("gpt_base.blocks.{i}"), &mut push);
    }
    let m = &a.mamba;
    for i in 0..a.n_layer_head {
        let p = format!("gpt_head.blocks.{i}");
        for j in 1..=6 {
            push(format!("{p}.ln{j}.weight"), vec![c], Fill::Const(1.0));
        }
        for s in 1..=3 {
            let q = format!("{p}.mamba_{s}");
            push(format!("{q}.A_log"), vec![m.d_inner, m.d_state], Fill::ALog);
            push(format!("{q}.D"), vec![m.d_inner], Fill::Const(1.0));
            push(
                format!("{q}.in_proj.weight"),
                vec![2 * m.d_inner, c],
                lin(c),
            );
            push(
                format!("{q}.conv1d.weight"),
                vec![m.d_inner, 1, m.d_conv],
                lin(m.d_conv),
            );
            push(format!("{q}.conv1d.bias"), vec![m.d_inner], lin(m.d_conv));
            push(
                format!("{q}.x_proj.weight"),
                vec![m.dt_rank + 2 * m.d_state, m.d_inner],
                lin(m.d_inner),
            );
            push(
                format!("{q}.dt_proj.weight"),
                vec![m.d_inner, m.dt_rank],
                lin(m.dt_rank),
            );
            // softplus⁻¹(0.01)
            push(
                format!("{q}.dt_proj.bias"),
                vec![m.d_inner],
                Fill::Const(-4.600_17),
            );
            push(
                format!("{q}.out_proj.weight"),
                vec![c, m.d_inner],
                lin(m.d_inner),
            );
        }
        for s in 1..=3 {
            let q = format!("{p}.gate_mlp_{s}");
            push(
                format!("{q}.fc1.weight"),
                vec![2 * a.gated_mlp_hidden, c],
                lin(c),
            );
            push(
                format!("{q}.fc2.weight"),
                vec![c, a.gated_mlp_hidden],
                lin(a.gated_mlp_hidden),
            );
        }
    }
    block_base("gpt_head.block_base".into(), &mut push);
    push("gpt_head.ln_f.weight".into(), vec![c], Fill::Const(1.0));
    push("gpt_head.ln_f.bias".into(), vec![c], Fill::Const(0.0));
    push("gpt_head.RMS_f.weight".into(), vec![c], Fill::Const(1.0));
    push(
        "gpt_head.head_up.weight".into(),
        vec![a.vocab_up, c],
        lin(c),
    );
    push(
        "gpt_head.head_down.weight".into(),
        vec![a.vocab_down, c],
        lin(c),
    );
    v
}

/// The keys and shapes of the official GPT state dict for `arch` (without `module.`).
pub fn gpt_key_shapes(arch: &GptArch) -> Vec<(String, Vec<usize>)> {
    key_list(arch).into_iter().map(|(k, s, _)| (k, s)).collect()
}

/// A random state dict of `arch` in the official layout, on the CPU in f32 (the
/// `num_batches_tracked` counters are i64 scalars). Deterministic for a given `seed`.
pub fn random_gpt_weights(arch: &GptArch, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (idx, (key, shape, fill)) in key_list(arch).into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let t = match fill {
            Fill::Count => Tensor::new(0i64, &Device::Cpu)?,
            Fill::Const(v) => Tensor::full(v, shape, &Device::Cpu)?,
            Fill::Uniform(r) => {
                // splitmix64 per tensor: fast and reproducible
                let mut s = seed ^ (idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
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
                Tensor::from_vec(data, shape, &Device::Cpu)?
            }
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
    let w = random_gpt_weights(arch, seed)?;
    let vb = candle_nn::VarBuilder::from_tensors(w, dtype, device);
    super::Gpt::load(vb, arch)
}
