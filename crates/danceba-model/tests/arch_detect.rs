//! Architecture detection and key audit, against the full-size manifest and the golden tiny
//! checkpoints.

use std::path::PathBuf;

use danceba_model::arch::{
    audit, audit_gpt, audit_vqvae, detect_kind, expected_gpt_keys, expected_vqvae_keys,
    inspect_state_dict, ArchError, GptArch, MambaArch, ModelKind, VqVaeArch,
};
use danceba_model::checkpoint::{self, ShapeMap};

fn golden() -> PathBuf {
    std::env::var_os("DANCEBA_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/golden"
            ))
        })
}

type Manifest = Vec<(String, Vec<usize>, String)>;

fn manifest() -> (Manifest, Manifest) {
    let text = std::fs::read_to_string(golden().join("model/manifest_full_size.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let parse = |name: &str| -> Manifest { serde_json::from_value(v[name].clone()).unwrap() };
    (parse("gpt"), parse("vqvae"))
}

/// The official configuration (reference §3.1, §4.1, Appendix A).
fn official_gpt() -> GptArch {
    let n_embd = 768;
    GptArch {
        n_embd,
        n_head: 12,
        n_layer_base: 6,
        n_layer_head: 6,
        vocab_up: 512,
        vocab_down: 512,
        n_music: 438,
        block_size: 29,
        mlp_hidden: 4 * n_embd,
        gated_mlp_hidden: n_embd.div_ceil(128) * 128,
        lpe_bins: 512 / 2 + 1,
        mamba: MambaArch {
            d_inner: 4 * n_embd,
            d_state: 128,
            dt_rank: n_embd.div_ceil(16),
            d_conv: 4,
        },
    }
}

fn official_vqvae() -> VqVaeArch {
    VqVaeArch {
        width: 512,
        emb_width: 512,
        l_bins: 512,
        downs_t: 3,
        stride_t: 2,
        depth: 3,
        dilation_growth_rate: 3,
        up_channels: 15 * 3,
        down_channels: 9 * 3,
        root_channels: 3,
        has_encoders: true,
    }
}

fn strip(m: &Manifest) -> Vec<(String, Vec<usize>)> {
    m.iter()
        .map(|(k, s, _)| {
            (
                k.strip_prefix("module.")
                    .expect("module. prefix")
                    .to_string(),
                s.clone(),
            )
        })
        .collect()
}

fn shapes(m: &Manifest) -> ShapeMap {
    strip(m).into_iter().collect()
}

#[test]
fn arch_expected_gpt_keys_equal_manifest_exactly() {
    let (gpt, _) = manifest();
    assert_eq!(gpt.len(), 412);
    let expected = expected_gpt_keys(&official_gpt());
    assert_eq!(expected.len(), 412);
    // same keys, same shapes, same (state-dict) order
    assert_eq!(expected, strip(&gpt));
    for (k, _, dtype) in &gpt {
        let want = if k.ends_with("num_batches_tracked") {
            "int64"
        } else {
            "float32"
        };
        assert_eq!(dtype, want, "{k}");
    }
}

#[test]
fn arch_expected_vqvae_keys_equal_manifest_exactly() {
    let (_, vq) = manifest();
    assert_eq!(vq.len(), 228);
    let expected = expected_vqvae_keys(&official_vqvae());
    assert_eq!(expected.len(), 228);
    assert_eq!(expected, strip(&vq));
    assert!(vq.iter().all(|(_, _, d)| d == "float32"));
}

#[test]
fn arch_detect_on_manifest_gives_official_sizes() {
    let (gpt, vq) = manifest();
    let g = shapes(&gpt);
    let v = shapes(&vq);
    assert_eq!(detect_kind(g.keys()), ModelKind::Gpt);
    assert_eq!(detect_kind(v.keys()), ModelKind::Vqvae);
    // no config, no flag: n_head defaults to 12
    assert_eq!(GptArch::detect(&g, None, None).unwrap(), official_gpt());
    assert_eq!(VqVaeArch::detect(&v, None).unwrap(), official_vqvae());
    let a = audit(&expected_gpt_keys(&official_gpt()), &g, &[]);
    assert!(a.is_ok() && a.unexpected.is_empty() && a.ignored_known.is_empty());
    // the flag overrides
    assert_eq!(GptArch::detect(&g, None, Some(8)).unwrap().n_head, 8);
    // a head count that does not divide n_embd is refused
    assert!(matches!(
        GptArch::detect(&g, None, Some(7)),
        Err(ArchError::Inconsistent(_))
    ));
}

#[test]
fn arch_audit_names_missing_and_misshaped_keys() {
    let (gpt, _) = manifest();
    let mut g = shapes(&gpt);
    g.remove("gpt_head.blocks.3.mamba_2.D");
    g.insert("gpt_head.head_up.weight".into(), vec![511, 768]);
    g.insert(
        "gpt_base.pos_emb.pos_emb_2.linear1.weight".into(),
        vec![768, 257],
    );
    g.insert("something.else".into(), vec![1]);
    let a = audit(
        &expected_gpt_keys(&official_gpt()),
        &g,
        &["gpt_base.pos_emb.pos_emb_1.linear1.bias".into()],
    );
    assert_eq!(a.missing, vec!["gpt_head.blocks.3.mamba_2.D".to_string()]);
    assert_eq!(a.mis_shaped.len(), 1);
    assert_eq!(a.mis_shaped[0].key, "gpt_head.head_up.weight");
    assert_eq!(a.unexpected, vec!["something.else".to_string()]);
    assert_eq!(a.ignored_known.len(), 2);
    let err = a.into_result().unwrap_err().to_string();
    assert!(err.contains("gpt_head.blocks.3.mamba_2.D"), "{err}");
    assert!(err.contains("gpt_head.head_up.weight"), "{err}");
}

fn model(name: &str) -> PathBuf {
    golden().join("model").join(name)
}

fn tiny_gpt() -> GptArch {
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

#[test]
fn arch_golden_tiny_gpt_detected_and_audited() {
    for name in ["tiny_gpt.pt", "tiny_gpt_legacy_lpe.pt"] {
        let sd = checkpoint::load(&model(name)).unwrap();
        let (arch, audit) = audit_gpt(&sd, None).unwrap();
        assert_eq!(arch, tiny_gpt(), "{name}");
        assert!(
            audit.unexpected.is_empty(),
            "{name}: {:?}",
            audit.unexpected
        );
        if name.contains("legacy") {
            // linear1.{weight,bias} (UninitializedParameter) + bn1.{5 entries}, for 3 modules
            assert_eq!(
                audit.ignored_known.len(),
                3 * 7,
                "{:?}",
                audit.ignored_known
            );
        } else {
            assert!(audit.ignored_known.is_empty());
        }
        let (kind, _, _) = inspect_state_dict(&sd, None).unwrap();
        assert_eq!(kind, ModelKind::Gpt);
    }
}

/// `--n-head` is for checkpoints that do not state the head count: the one the config states
/// is accepted, another is refused (it used to replace the config's silently, which changes
/// every attention layer), and 0 says what is wrong with it.
#[test]
fn an_n_head_that_contradicts_the_config_is_refused() {
    let sd = checkpoint::load(&model("tiny_gpt.pt")).unwrap();
    assert_eq!(audit_gpt(&sd, Some(4)).unwrap().0, tiny_gpt());
    for (flag, says) in [(16, "contradicts"), (8, "contradicts"), (0, "contradicts")] {
        let e = audit_gpt(&sd, Some(flag)).unwrap_err().to_string();
        assert!(e.contains(says) && e.contains("n_head 4"), "{flag}: {e}");
        assert!(inspect_state_dict(&sd, Some(flag)).is_err());
    }
    // without a config the flag decides; 0 is refused with the flag's name
    let mut bare = sd.clone();
    bare.config = None;
    assert_eq!(audit_gpt(&bare, Some(16)).unwrap().0.n_head, 16);
    let e = audit_gpt(&bare, Some(0)).unwrap_err().to_string();
    assert!(e.contains("--n-head 0"), "{e}");
}

#[test]
fn arch_golden_tiny_vqvae_detected_and_audited() {
    let sd = checkpoint::load(&model("tiny_vqvae.pt")).unwrap();
    let (arch, audit) = audit_vqvae(&sd).unwrap();
    assert_eq!(arch.width, 32);
    assert_eq!(arch.emb_width, 32);
    assert_eq!(arch.l_bins, 512);
    assert_eq!(
        (arch.up_channels, arch.down_channels, arch.root_channels),
        (45, 27, 3)
    );
    assert_eq!(
        (
            arch.downs_t,
            arch.stride_t,
            arch.depth,
            arch.dilation_growth_rate
        ),
        (3, 2, 3, 3)
    );
    assert!(arch.has_encoders);
    assert!(audit.unexpected.is_empty() && audit.ignored_known.is_empty());
    // asking for the wrong kind is a clear error
    let err = audit_gpt(&sd, None).unwrap_err();
    assert!(matches!(err, ArchError::WrongKind { .. }), "{err}");
}

#[test]
fn arch_missing_or_misshaped_key_in_checkpoint_is_an_error_naming_it() {
    let mut sd = checkpoint::load(&model("tiny_gpt.pt")).unwrap();
    let removed = "gpt_head.blocks.1.gate_mlp_3.fc2.weight";
    sd.tensors.remove(removed);
    let err = audit_gpt(&sd, None).unwrap_err().to_string();
    assert!(err.contains(removed), "{err}");

    let mut sd = checkpoint::load(&model("tiny_gpt.pt")).unwrap();
    let key = "gpt_base.blocks.1.attn.proj.weight";
    sd.tensors.insert(
        key.into(),
        candle_core::Tensor::zeros((64, 63), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    );
    let err = audit_gpt(&sd, None).unwrap_err().to_string();
    assert!(err.contains(key) && err.contains("[64, 63]"), "{err}");
}

#[test]
fn arch_parameter_counts_match_reference_table() {
    use danceba_model::arch::count_parameters;
    let (gpt, vq) = manifest();
    let g = count_parameters(&shapes(&gpt), &[]);
    assert_eq!(g.parameters, 250_727_425);
    assert_eq!(g.parameters + g.buffer_values, 250_737_923);
    assert_eq!(g.per_module["gpt_base.blocks"], 53_148_672);
    assert_eq!(g.per_module["gpt_head.blocks"], 186_209_280);
    let v = count_parameters(&shapes(&vq), &[]);
    assert_eq!(v.parameters, 65_068_619);
    assert_eq!(v.buffer_values, 524_288);
}

/// A needed tensor with NaN/infinite values or integer data fails the audit, naming the key
/// (it used to pass, and the model then gave the same token at every step).
#[test]
fn arch_unusable_values_fail_the_audit_naming_the_tensor() {
    use candle_core::{DType, Tensor};
    let sd = checkpoint::load(&model("tiny_gpt.pt")).unwrap();
    let key = "gpt_base.blocks.0.attn.key.weight";
    let w = sd.tensors[key].clone();
    let n = w.elem_count();
    for (what, bad, says) in [
        ("NaN", f32::NAN, "NaN or infinite"),
        ("+inf", f32::INFINITY, "NaN or infinite"),
        ("-inf", f32::NEG_INFINITY, "NaN or infinite"),
    ] {
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[n - 1] = bad; // the last value: a scan that stops early misses it
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut damaged = sd.clone();
            let t = Tensor::from_vec(v.clone(), w.shape(), &candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            damaged.tensors.insert(key.to_string(), t);
            let e = audit_gpt(&damaged, None).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{what} {dtype:?}: {e}");
            let (_, _, audit) = inspect_state_dict(&damaged, None).unwrap();
            assert!(!audit.is_ok() && audit.bad_values.len() == 1, "{what}");
        }
    }
    // a non-contiguous view is checked too (through the device path)
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[0] = f32::NAN;
    let t = Tensor::from_vec(v, w.shape(), &candle_core::Device::Cpu).unwrap();
    assert!(checkpoint::has_non_finite(&t.t().unwrap()).unwrap());
    assert!(!checkpoint::has_non_finite(&w.t().unwrap()).unwrap());
    // integer data where a weight is expected
    let mut damaged = sd.clone();
    damaged
        .tensors
        .insert(key.to_string(), w.to_dtype(DType::I64).unwrap());
    let e = audit_gpt(&damaged, None).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("I64"), "{e}");
    // the untouched checkpoint passes
    assert!(audit_gpt(&sd, None).unwrap().1.bad_values.is_empty());
}
