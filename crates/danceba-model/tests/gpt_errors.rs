//! Bad inputs give clear errors, never a panic.

mod gpt_common;

use candle_core::{Device, Tensor};
use danceba_model::gpt::{GenerateOptions, Gpt, GptError, SamplingPolicy};
use gpt_common::*;

fn cond(b: usize, t: usize, w: usize) -> Tensor {
    Tensor::rand(0f32, 1f32, (b, t, w), &Device::Cpu).unwrap()
}

fn ids(b: usize, t: usize, v: u32) -> Tensor {
    Tensor::full(v, (b, t), &Device::Cpu).unwrap()
}

fn input_msg<T: std::fmt::Debug>(r: Result<T, GptError>) -> String {
    match r {
        Err(GptError::Input(m)) => m,
        other => panic!("expected an input error, got {other:?}"),
    }
}

#[test]
fn forward_rejects_bad_inputs() {
    let gpt: Gpt = tiny_gpt();
    let m = input_msg(gpt.forward(&ids(1, 4, 1), &ids(1, 4, 1), &cond(1, 4, 437)));
    assert!(m.contains("437 columns"), "{m}");
    let m = input_msg(gpt.forward(&ids(1, 4, 512), &ids(1, 4, 1), &cond(1, 4, 438)));
    assert!(m.contains("token id 512"), "{m}");
    let m = input_msg(gpt.forward(&ids(1, 4, 1), &ids(1, 4, 9999), &cond(1, 4, 438)));
    assert!(m.contains("token id 9999"), "{m}");
    let m = input_msg(gpt.forward(&ids(1, 0, 1), &ids(1, 0, 1), &cond(1, 0, 438)));
    assert!(m.contains("empty"), "{m}");
    let m = input_msg(gpt.forward(&ids(1, 30, 1), &ids(1, 30, 1), &cond(1, 30, 438)));
    assert!(m.contains("block_size 29"), "{m}");
    let m = input_msg(gpt.forward(&ids(1, 3, 1), &ids(1, 4, 1), &cond(1, 4, 438)));
    assert!(m.contains("shape"), "{m}");
    let mut v = vec![0.5f32; 4 * 438];
    v[438 + 7] = f32::NAN;
    let c = Tensor::from_vec(v, (1, 4, 438), &Device::Cpu).unwrap();
    let m = input_msg(gpt.forward(&ids(1, 4, 1), &ids(1, 4, 1), &c));
    assert!(
        m.contains("NaN") && m.contains("row 1") && m.contains("column 7"),
        "{m}"
    );
    let f = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    input_msg(gpt.forward(&f, &ids(1, 4, 1), &cond(1, 4, 438)));
    // a full window of block_size is accepted
    gpt.forward(&ids(1, 29, 1), &ids(1, 29, 1), &cond(1, 29, 438))
        .unwrap();
}

#[test]
fn generate_rejects_bad_inputs() {
    let gpt = tiny_gpt();
    let o = GenerateOptions::default();
    let two = |n: usize, w: usize| Tensor::rand(0f32, 1f32, (n, w), &Device::Cpu).unwrap();
    let m = input_msg(gpt.generate(&two(5, 400), &o, &mut |_, _| {}));
    assert!(m.contains("400 columns"), "{m}");
    let m = input_msg(gpt.generate(&two(0, 438), &o, &mut |_, _| {}));
    assert!(m.contains("empty"), "{m}");
    let m = input_msg(gpt.generate(&cond(1, 5, 438), &o, &mut |_, _| {}));
    assert!(m.contains("shape"), "{m}");
    let mut v = vec![0.1f32; 3 * 438];
    v[2 * 438] = f32::INFINITY;
    let c = Tensor::from_vec(v, (3, 438), &Device::Cpu).unwrap();
    let m = input_msg(gpt.generate(&c, &o, &mut |_, _| {}));
    assert!(m.contains("row 2"), "{m}");
    let bad_start = GenerateOptions {
        start: (512, 0),
        ..Default::default()
    };
    input_msg(gpt.generate(&two(3, 438), &bad_start, &mut |_, _| {}));
    for policy in [
        SamplingPolicy::Sample {
            temperature: -1.0,
            top_k: None,
            top_p: None,
            seed: 0,
        },
        SamplingPolicy::Sample {
            temperature: f32::NAN,
            top_k: None,
            top_p: None,
            seed: 0,
        },
        SamplingPolicy::Sample {
            temperature: 1.0,
            top_k: Some(0),
            top_p: None,
            seed: 0,
        },
        SamplingPolicy::Sample {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.0),
            seed: 0,
        },
        SamplingPolicy::Sample {
            temperature: 1.0,
            top_k: None,
            top_p: Some(1.5),
            seed: 0,
        },
    ] {
        let o = GenerateOptions {
            policy,
            ..Default::default()
        };
        input_msg(gpt.generate(&two(3, 438), &o, &mut |_, _| {}));
    }
    // no conditions at all: nothing to do, no panic
    assert!(gpt
        .generate_batch(&[], &o, &mut |_, _| {})
        .unwrap()
        .is_empty());
}

#[test]
fn last_logits_rejects_bad_windows() {
    let gpt = tiny_gpt();
    let (t, nm) = (4, 438);
    let w = vec![0.5f32; t * nm];
    let short = vec![0.5f32; t * nm - 1];
    let ids = vec![1u32; 2 * t];
    let m = input_msg(gpt.last_logits_windows(&ids, &ids, &[&w, &short], t, None));
    assert!(
        m.contains("window 1") && m.contains(&format!("{}", t * nm)),
        "{m}"
    );
    let m = input_msg(gpt.last_logits_windows(&ids[..t], &ids, &[&w, &w], t, None));
    assert!(m.contains("token ids"), "{m}");
    let m = input_msg(gpt.last_logits_windows(&[], &[], &[], t, None));
    assert!(m.contains("empty"), "{m}");
    let m = input_msg(gpt.last_logits(&ids, &ids, &w, 2, t));
    assert!(m.contains("condition values"), "{m}");
    let mut bad = w.clone();
    bad[nm + 3] = f32::INFINITY;
    let m = input_msg(gpt.last_logits_windows(&ids, &ids, &[&w, &bad], t, Some(&[&w, &w])));
    assert!(m.contains("non-finite") || m.contains("inf"), "{m}");
    // a hint that does not split into its window count is ignored, not an error
    let (lu, ld) = gpt
        .last_logits_ahead(
            &ids,
            &ids,
            &[w.clone(), w.clone()].concat(),
            2,
            t,
            Some((&w[..7], 2)),
        )
        .unwrap();
    let (wu, wd) = gpt
        .last_logits_windows(&ids, &ids, &[&w, &w], t, None)
        .unwrap();
    assert_eq!((lu, ld), (wu, wd));
}
