//! Shared helpers of the GPT tests: golden paths, the tiny golden model, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use danceba_model::arch::{GptArch, MambaArch};
use danceba_model::gpt::Gpt;

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
