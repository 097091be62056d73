//! The real-size GPT (random weights in the official layout): key set against the full-size
//! manifest, and a t = 28 forward on the CPU with the fused and the portable Mamba.

mod gpt_common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use danceba_model::gpt::random::{gpt_key_shapes, official_gpt_arch, random_gpt_weights};
use danceba_model::gpt::{Gpt, MambaImpl};
use gpt_common::*;

#[test]
fn random_weights_have_the_full_size_key_set() {
    let p = golden_dir().join("model/manifest_full_size.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut want = BTreeMap::new();
    for e in v["gpt"].as_array().unwrap() {
        let k = e[0].as_str().unwrap();
        let k = k.strip_prefix("module.").unwrap_or(k).to_string();
        let s: Vec<usize> = e[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        want.insert(k, s);
    }
    let got: BTreeMap<String, Vec<usize>> =
        gpt_key_shapes(&official_gpt_arch()).into_iter().collect();
    assert_eq!(got.len(), 412);
    assert_eq!(got, want);
}

#[test]
fn real_size_forward_at_full_window() {
    let arch = official_gpt_arch();
    let w = random_gpt_weights(&arch, 1).unwrap();
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let mut gpt = Gpt::load(vb, &arch).unwrap();
    let t = 28;
    let up = Tensor::from_vec(
        (0..t as u32).map(|i| i * 17 % 512).collect(),
        (1, t),
        &Device::Cpu,
    )
    .unwrap();
    let down = Tensor::from_vec(
        (0..t as u32).map(|i| i * 29 % 512).collect(),
        (1, t),
        &Device::Cpu,
    )
    .unwrap();
    let cond = Tensor::rand(0f32, 1f32, (1, t, arch.n_music), &Device::Cpu).unwrap();
    assert_eq!(gpt.mamba_impl(), MambaImpl::FusedCpu);
    let (fu, fd) = gpt.forward(&up, &down, &cond).unwrap();
    assert_eq!(fu.dims(), &[1, t, 512]);
    assert_eq!(fd.dims(), &[1, t, 512]);
    let v = fu.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    gpt.set_mamba_impl(MambaImpl::Portable);
    let (pu, pd) = gpt.forward(&up, &down, &cond).unwrap();
    let (eu, ed) = (rel_err(&fu, &pu), rel_err(&fd, &pd));
    println!("real size, fused vs portable: up {eu:e}, down {ed:e}");
    assert!(eu <= 1e-4 && ed <= 1e-4);
}
