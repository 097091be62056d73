//! Loading the GPT from the legacy-LPE `.pt` and from converted safetensors gives the same
//! model as the golden `.pt`.

mod gpt_common;

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use danceba_model::arch::GptArch;
use danceba_model::checkpoint::{self, save_safetensors, SafetensorsWriteOptions};
use danceba_model::gpt::Gpt;
use gpt_common::*;

fn logits_t17(gpt: &Gpt) -> (Vec<f32>, Vec<f32>) {
    let g = load_st("gpt_forward.safetensors");
    let (u, d) = gpt
        .forward(&g["t17.idx_up"], &g["t17.idx_down"], &g["t17.cond"])
        .unwrap();
    let f = |t: candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (f(u), f(d))
}

#[test]
fn legacy_lpe_checkpoint_gives_the_same_model() {
    let reference = logits_t17(&tiny_gpt());
    let p = golden_dir().join("model/tiny_gpt_legacy_lpe.pt");
    let sd = checkpoint::load(&p).unwrap();
    let arch = GptArch::from_state_dict(&sd, None).unwrap();
    let gpt = Gpt::load(sd.var_builder(DType::F32, &Device::Cpu), &arch).unwrap();
    assert_eq!(logits_t17(&gpt), reference);
}

#[test]
fn converted_safetensors_give_the_same_model() {
    let reference = logits_t17(&tiny_gpt());
    let sd = checkpoint::load(&golden_dir().join("model/tiny_gpt.pt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny_gpt.safetensors");
    let tensors: BTreeMap<_, _> = sd.tensors.clone().into_iter().collect();
    save_safetensors(
        &out,
        &tensors,
        &BTreeMap::new(),
        &SafetensorsWriteOptions::default(),
    )
    .unwrap();
    let st = checkpoint::load(&out).unwrap();
    let arch = GptArch::from_state_dict(&st, Some(4)).unwrap();
    assert_eq!(arch, tiny_arch());
    let gpt = Gpt::load(st.var_builder(DType::F32, &Device::Cpu), &arch).unwrap();
    assert_eq!(logits_t17(&gpt), reference);
}

#[test]
fn missing_key_is_an_error_naming_it() {
    let mut sd = checkpoint::load(&golden_dir().join("model/tiny_gpt.pt")).unwrap();
    let arch = tiny_arch();
    sd.tensors.remove("gpt_head.blocks.1.mamba_3.A_log");
    let err = Gpt::load(sd.var_builder(DType::F32, &Device::Cpu), &arch).unwrap_err();
    assert!(
        err.to_string().contains("gpt_head.blocks.1.mamba_3.A_log"),
        "{err}"
    );
}
