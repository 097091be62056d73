//! Loading the golden tiny checkpoints (official torch.save layout) with our own reader.

use std::path::PathBuf;

use danceba_model::checkpoint::{self, PyValue};

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

fn model(name: &str) -> PathBuf {
    golden().join("model").join(name)
}

#[test]
fn checkpoint_tiny_gpt_loads() {
    let sd = checkpoint::load(&model("tiny_gpt.pt")).unwrap();
    assert!(sd.tensors.keys().all(|k| !k.starts_with("module.")));
    assert!(sd.ignored.is_empty(), "{:?}", sd.ignored);
    assert!(sd.epoch.is_some());
    let emb = &sd.tensors["gpt_base.tok_emb_up.weight"];
    assert_eq!(emb.dims(), &[512, 64]);
    assert_eq!(emb.dtype(), candle_core::DType::F32);
    let ps = sd.tensors["gpt_base.position_scale"]
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(ps, 0.5);
    let nbt = &sd.tensors["gpt_base.pos_emb.pos_emb_1.bn2.num_batches_tracked"];
    assert_eq!(nbt.dtype(), candle_core::DType::I64);
    assert_eq!(nbt.dims(), &[] as &[usize]);
    let cfg = sd.config.as_ref().unwrap();
    assert_eq!(cfg.class_name().as_deref(), Some("easydict.EasyDict"));
    assert_eq!(
        cfg.get_path("structure_generate.base.n_head")
            .and_then(PyValue::as_i64),
        Some(4)
    );
    assert_eq!(
        cfg.get_path("structure_generate.base.n_embd")
            .and_then(PyValue::as_i64),
        Some(64)
    );
    // attention mask buffer is tril(ones)
    let mask = sd.tensors["gpt_base.blocks.0.attn.mask"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(mask.len(), 29 * 29);
    for i in 0..29 {
        for j in 0..29 {
            assert_eq!(mask[i * 29 + j], if j <= i { 1.0 } else { 0.0 });
        }
    }
}

#[test]
fn checkpoint_tiny_gpt_legacy_lpe_loads_with_ignored_placeholders() {
    let sd = checkpoint::load(&model("tiny_gpt_legacy_lpe.pt")).unwrap();
    let mut ignored = sd.ignored.clone();
    ignored.sort();
    let expected: Vec<String> = (1..=3)
        .flat_map(|i| {
            ["weight", "bias"]
                .into_iter()
                .map(move |w| format!("gpt_base.pos_emb.pos_emb_{i}.linear1.{w}"))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(ignored, expected);
    // bn1 entries are real tensors
    assert!(sd
        .tensors
        .contains_key("gpt_base.pos_emb.pos_emb_1.bn1.running_var"));
}

#[test]
fn checkpoint_tiny_vqvae_loads() {
    let sd = checkpoint::load(&model("tiny_vqvae.pt")).unwrap();
    assert_eq!(
        sd.tensors["vqvae_up.bottleneck.level_blocks.0.k"].dims(),
        &[512, 32]
    );
    assert!(sd.config.is_some());
    assert!(sd.epoch.is_some());
}

#[test]
fn filtered_load_skips_tensors_but_lists_their_shapes() {
    use candle_core::{DType, Device};
    let path = model("tiny_vqvae.pt");
    let full = checkpoint::load(&path).unwrap();
    let is_encoder = |k: &str| k.split('.').nth(1) == Some("encoders");
    let part =
        checkpoint::load_on_filtered(&path, &Device::Cpu, DType::F32, &|k: &str| !is_encoder(k))
            .unwrap();
    assert!(full.skipped.is_empty());
    assert!(!part.skipped.is_empty());
    assert_eq!(part.tensors.len() + part.skipped.len(), full.tensors.len());
    for (k, t) in &full.tensors {
        if is_encoder(k) {
            assert!(!part.tensors.contains_key(k), "{k} was read");
            assert_eq!(
                part.skipped.get(k).map(Vec::as_slice),
                Some(t.dims()),
                "{k}"
            );
        } else {
            let p = &part.tensors[k];
            let diff = (p - t).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{k}");
        }
    }
    // The same through a converted safetensors file.
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("vqvae.safetensors");
    checkpoint::convert_checkpoint(&path, &st, None, DType::F32, None, false).unwrap();
    let part_st =
        checkpoint::load_on_filtered(&st, &Device::Cpu, DType::F32, &|k: &str| !is_encoder(k))
            .unwrap();
    assert_eq!(part_st.skipped, part.skipped);
    assert_eq!(
        part_st.tensors.keys().collect::<Vec<_>>(),
        part.tensors.keys().collect::<Vec<_>>()
    );
}
