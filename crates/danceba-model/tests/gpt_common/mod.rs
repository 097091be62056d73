//! Shared helpers of the GPT tests: golden paths, the tiny golden model, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use danceba_model::arch::{GptArch, MambaArch};
use danceba_model::gpt::Gpt;
use rand::rngs::StdRng;
use rand::Rng;

pub fn golden_dir() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

pub fn load_st(name: &str) -> HashMap<String, Tensor> {
    let p = golden_dir().join("model").join(name);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

pub fn tiny_arch() -> GptArch {
    GptArch {
        n_embd: 64,
        n_head: 4,
        n_layer_base: 2,
        n_layer_head: 2,
        vocab_up: 512,
        vocab_down: 512,
        n_music: 438,
        block_size: 29,
        mlp_hidden: 256,
        gated_mlp_hidden: 128,
        lpe_bins: 257,
        mamba: MambaArch {
            d_inner: 128,
            d_state: 16,
            dt_rank: 4,
            d_conv: 4,
        },
    }
}

/// The tiny golden GPT's weights (`golden/model/tiny_gpt.pt`, keys without `module.`) as a
/// VarBuilder on the CPU in f32, and its sizes.
pub fn tiny_vb() -> (candle_nn::VarBuilder<'static>, GptArch) {
    let p = golden_dir().join("model").join("tiny_gpt.pt");
    let sd = danceba_model::checkpoint::load_on(&p, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    let arch = GptArch::from_state_dict(&sd, None).expect("tiny gpt architecture");
    (sd.var_builder(DType::F32, &Device::Cpu), arch)
}

/// The tiny golden GPT (`golden/model/tiny_gpt.pt`) in `dtype` on `dev`, its sizes detected
/// from the checkpoint.
pub fn tiny_gpt_on(dev: &Device, dtype: DType) -> Gpt {
    let p = golden_dir().join("model").join("tiny_gpt.pt");
    let sd = danceba_model::checkpoint::load_on(&p, dev, dtype)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    let arch = GptArch::from_state_dict(&sd, None).expect("tiny gpt architecture");
    assert_eq!(arch, tiny_arch(), "the tiny golden GPT's detected sizes");
    Gpt::load(sd.var_builder(dtype, dev), &arch).expect("load tiny gpt")
}

/// The tiny golden GPT in `dtype` on the CPU.
pub fn tiny_gpt_dtype(dtype: DType) -> Gpt {
    tiny_gpt_on(&Device::Cpu, dtype)
}

/// The tiny golden GPT in f32.
pub fn tiny_gpt() -> Gpt {
    tiny_gpt_dtype(DType::F32)
}

/// One `golden/model/*.pipeline.safetensors`: the condition, the official greedy tokens (start
/// token first), each step's logits and the top-1/top-2 margins.
pub struct Golden {
    pub name: String,
    pub cond: Tensor, // (N, n_music)
    pub up: Vec<u32>,
    pub down: Vec<u32>,
    pub logits_up: Tensor, // (N, vocab)
    pub logits_down: Tensor,
    pub margin_up: Vec<f32>,
    pub margin_down: Vec<f32>,
}

/// Every pipeline golden, sorted by name.
pub fn golden_pipelines() -> Vec<Golden> {
    let dir = golden_dir().join("model");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".pipeline.safetensors"))
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no pipeline goldens in {}",
        dir.display()
    );
    names
        .into_iter()
        .map(|n| {
            let g = load_st(&n);
            let toks = |k: &str| -> Vec<u32> {
                g[k].to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .map(|&v| v as u32)
                    .collect()
            };
            Golden {
                cond: g["cond"].squeeze(0).unwrap(),
                up: toks("tokens_up"),
                down: toks("tokens_down"),
                logits_up: g["step_logits_up"].clone(),
                logits_down: g["step_logits_down"].clone(),
                margin_up: g["margin_up"].to_vec1::<f32>().unwrap(),
                margin_down: g["margin_down"].to_vec1::<f32>().unwrap(),
                name: n,
            }
        })
        .collect()
}

/// Token ids as a (1, len) tensor.
pub fn token_ids(v: &[u32]) -> Tensor {
    Tensor::from_slice(v, (1, v.len()), &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    d / scale
}

/// Uniform random values in [lo, hi) as a CPU f32 tensor.
pub fn uniform(rng: &mut StdRng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A real-size Mamba layer with weights at the official initialisation's scales.
pub fn random_mamba_weights(rng: &mut StdRng, c: usize, a: &MambaArch) -> HashMap<String, Tensor> {
    let (di, ds, dr, dc) = (a.d_inner, a.d_state, a.dt_rank, a.d_conv);
    let k = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    let mut w = HashMap::new();
    w.insert(
        "in_proj.weight".into(),
        uniform(rng, &[2 * di, c], -k(c), k(c)),
    );
    w.insert(
        "conv1d.weight".into(),
        uniform(rng, &[di, 1, dc], -k(dc), k(dc)),
    );
    w.insert("conv1d.bias".into(), uniform(rng, &[di], -k(dc), k(dc)));
    w.insert(
        "x_proj.weight".into(),
        uniform(rng, &[dr + 2 * ds, di], -k(di), k(di)),
    );
    let dts = (dr as f32).powf(-0.5);
    w.insert("dt_proj.weight".into(), uniform(rng, &[di, dr], -dts, dts));
    // inverse softplus of Δ log-uniform in [1e-3, 1e-1]
    let bias: Vec<f32> = (0..di)
        .map(|_| {
            let dt = (rng.gen_range(1e-3f32.ln()..1e-1f32.ln())).exp();
            dt + (-(-dt).exp_m1()).ln()
        })
        .collect();
    w.insert(
        "dt_proj.bias".into(),
        Tensor::from_vec(bias, di, &Device::Cpu).unwrap(),
    );
    let alog: Vec<f32> = (0..di * ds).map(|i| ((i % ds) as f32 + 1.0).ln()).collect();
    w.insert(
        "A_log".into(),
        Tensor::from_vec(alog, (di, ds), &Device::Cpu).unwrap(),
    );
    w.insert("D".into(), uniform(rng, &[di], 0.5, 1.5));
    w.insert(
        "out_proj.weight".into(),
        uniform(rng, &[c, di], -k(di), k(di)),
    );
    w
}

/// A real-size `Block_Head` (three streams: norms, Mamba, GatedMLP) with random weights.
pub fn random_block_head(rng: &mut StdRng, c: usize, a: &MambaArch) -> HashMap<String, Tensor> {
    let k = (c as f32).powf(-0.5);
    let mut w = HashMap::new();
    for i in 1..=3 {
        for (key, t) in random_mamba_weights(rng, c, a) {
            w.insert(format!("mamba_{i}.{key}"), t);
        }
        for j in [2 * i - 1, 2 * i] {
            w.insert(format!("ln{j}.weight"), uniform(rng, &[c], 0.5, 1.5));
        }
        let g = format!("gate_mlp_{i}");
        w.insert(format!("{g}.fc1.weight"), uniform(rng, &[2 * c, c], -k, k));
        w.insert(format!("{g}.fc2.weight"), uniform(rng, &[c, c], -k, k));
    }
    w
}
