//! Converting the golden `.pt` files to safetensors and reading them back: every tensor equal
//! bit for bit (f32), same architecture, same audit; f16/bf16 conversions round as expected.

use std::path::PathBuf;

use candle_core::DType;
use danceba_model::arch::{inspect_state_dict, DetectedArch, ModelKind};
use danceba_model::checkpoint::{self, convert_checkpoint, sha256_file, ConvertError};

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

fn bits(t: &candle_core::Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as u64)
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    }
}

#[test]
fn checkpoint_convert_golden_roundtrip_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    for (name, kind) in [
        ("tiny_gpt.pt", ModelKind::Gpt),
        ("tiny_gpt_legacy_lpe.pt", ModelKind::Gpt),
        ("tiny_vqvae.pt", ModelKind::Vqvae),
    ] {
        let src = golden().join("model").join(name);
        let dst = dir.path().join(format!("{name}.safetensors"));
        let report = convert_checkpoint(&src, &dst, Some(kind), DType::F32, None, false).unwrap();
        assert_eq!(report.kind, kind);
        let a = checkpoint::load(&src).unwrap();
        let b = checkpoint::load(&dst).unwrap();
        assert_eq!(
            a.tensors.keys().collect::<Vec<_>>(),
            b.tensors.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, ta) in &a.tensors {
            let tb = &b.tensors[k];
            assert_eq!(ta.dims(), tb.dims(), "{name} {k}");
            assert_eq!(ta.dtype(), tb.dtype(), "{name} {k}");
            assert_eq!(bits(ta), bits(tb), "{name} {k}");
        }
        assert!(b.tensors.keys().all(|k| !k.starts_with("module.")));
        // metadata
        assert_eq!(b.metadata["kind"], kind.to_string());
        assert_eq!(b.metadata["dtype"], "f32");
        assert_eq!(b.metadata["source_file"], name);
        assert_eq!(b.metadata["source_sha256"], sha256_file(&src).unwrap());
        assert_eq!(b.epoch, a.epoch);
        // same detection and audit through both paths
        let (ka, arch_a, audit_a) = inspect_state_dict(&a, None).unwrap();
        let (kb, arch_b, audit_b) = inspect_state_dict(&b, None).unwrap();
        assert_eq!((ka, &arch_a), (kb, &arch_b), "{name}");
        assert_eq!(audit_a.missing, audit_b.missing);
        assert!(audit_b.is_ok());
        let arch_json: serde_json::Value =
            serde_json::from_str(&b.metadata["architecture"]).unwrap();
        assert_eq!(
            arch_json,
            serde_json::to_value(arch_a.as_ref().unwrap()).unwrap()
        );
        match arch_b.unwrap() {
            DetectedArch::Gpt(g) => {
                assert_eq!(
                    (g.n_embd, g.n_head, g.n_layer_base, g.n_layer_head),
                    (64, 4, 2, 2)
                );
                assert_eq!(
                    (g.mamba.d_state, g.mamba.d_inner, g.gated_mlp_hidden),
                    (16, 128, 128)
                );
                assert_eq!((g.vocab_up, g.vocab_down, g.block_size), (512, 512, 29));
                assert_eq!(b.metadata["n_head"], "4");
            }
            DetectedArch::Vqvae(v) => {
                assert_eq!((v.width, v.emb_width, v.l_bins), (32, 32, 512));
            }
        }
        // the legacy placeholders are dropped, the legacy bn1 tensors kept as they were
        if name.contains("legacy") {
            assert_eq!(a.ignored.len(), 6);
            assert!(b.ignored.is_empty());
            assert_eq!(audit_b.ignored_known.len(), 15);
        }
        // refuses to overwrite without force, overwrites with it
        let e = convert_checkpoint(&src, &dst, Some(kind), DType::F32, None, false).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        convert_checkpoint(&src, &dst, Some(kind), DType::F32, None, true).unwrap();
    }
}

#[test]
fn checkpoint_convert_half_precision() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden().join("model/tiny_vqvae.pt");
    let a = checkpoint::load(&src).unwrap();
    for (dt, name) in [(DType::F16, "f16"), (DType::BF16, "bf16")] {
        let dst = dir.path().join(format!("vq_{name}.safetensors"));
        convert_checkpoint(&src, &dst, Some(ModelKind::Vqvae), dt, None, false).unwrap();
        let b = checkpoint::load_on(&dst, &candle_core::Device::Cpu, dt).unwrap();
        assert_eq!(b.metadata["dtype"], name);
        for (k, ta) in &a.tensors {
            let tb = &b.tensors[k];
            assert_eq!(tb.dtype(), dt, "{k}");
            let want = bits(&ta.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap());
            let got = bits(&tb.to_dtype(DType::F32).unwrap());
            assert_eq!(want, got, "{k}");
        }
    }
}

#[test]
fn checkpoint_convert_wrong_kind_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden().join("model/tiny_vqvae.pt");
    let dst = dir.path().join("gpt.safetensors");
    let e =
        convert_checkpoint(&src, &dst, Some(ModelKind::Gpt), DType::F32, None, false).unwrap_err();
    assert!(matches!(e, ConvertError::WrongKind { .. }), "{e}");
    assert!(!dst.exists());
    let e = convert_checkpoint(&src, &dst, None, DType::U8, None, false).unwrap_err();
    assert!(matches!(e, ConvertError::Dtype(_)), "{e}");
    // no stray temporary files
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[cfg(unix)]
#[test]
fn converted_file_has_the_permissions_of_a_created_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let src = golden().join("model").join("tiny_vqvae.pt");
    let dst = dir.path().join("vqvae.safetensors");
    convert_checkpoint(&src, &dst, None, DType::F16, None, false).unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"x").unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&dst),
        mode(&plain),
        "same as File::create under this umask"
    );
    // the probe file is gone
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 2);
}
