//! Property test: mutated checkpoints never make the reader panic (errors are fine).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use danceba_model::checkpoint::writer::{pickle_dumps, write_torch_zip, PickleWrite};
use danceba_model::checkpoint::{self, StorageDtype};
use proptest::prelude::*;

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

fn small_checkpoint() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("small.pt");
    let cfg = PickleWrite::easydict(vec![
        ("n_head", PickleWrite::Int(4)),
        ("lr", PickleWrite::Float(3e-4)),
        (
            "betas",
            PickleWrite::List(vec![PickleWrite::Float(0.5), PickleWrite::Float(0.9)]),
        ),
    ]);
    let model = PickleWrite::OrderedDict(vec![
        (
            PickleWrite::str("module.a"),
            PickleWrite::tensor("0", StorageDtype::F32, &[3, 4], true),
        ),
        (
            PickleWrite::str("module.b"),
            PickleWrite::Tensor {
                storage_key: "0".into(),
                dtype: StorageDtype::F32,
                storage_numel: 12,
                offset: 1,
                shape: vec![4, 2],
                stride: vec![1, 4],
                parameter: false,
            },
        ),
        (
            PickleWrite::str("module.c"),
            PickleWrite::tensor("1", StorageDtype::I64, &[], false),
        ),
        (
            PickleWrite::str("module.u"),
            PickleWrite::Reduce(
                Box::new(PickleWrite::Global(
                    "torch.nn.parameter".into(),
                    "UninitializedParameter".into(),
                )),
                vec![PickleWrite::Bool(true)],
            ),
        ),
    ]);
    let pkl = pickle_dumps(&PickleWrite::Dict(vec![
        (PickleWrite::str("model"), model),
        (PickleWrite::str("config"), cfg),
        (PickleWrite::str("epoch"), PickleWrite::Int(5)),
    ]));
    let a: Vec<u8> = (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect();
    write_torch_zip(
        &p,
        "small",
        &pkl,
        vec![("0".into(), a), ("1".into(), 9i64.to_le_bytes().to_vec())],
    )
    .unwrap();
    std::fs::read(&p).unwrap()
}

fn try_load(bytes: &[u8]) {
    let _ = checkpoint::load_from_bytes(bytes, Path::new("<fuzz>"), &Device::Cpu, DType::F32);
}

#[test]
fn checkpoint_fuzz_base_files_load() {
    let small = small_checkpoint();
    let sd =
        checkpoint::load_from_bytes(&small, Path::new("small"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(sd.tensors["b"].to_vec2::<f32>().unwrap()[3], vec![4.0, 8.0]);
    assert_eq!(sd.ignored, vec!["u".to_string()]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn checkpoint_fuzz_small_mutations_never_panic(
        muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = small_checkpoint_cached().to_vec();
        for (i, v) in muts {
            let i = i.index(b.len());
            b[i] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        try_load(&b);
    }

    #[test]
    fn checkpoint_fuzz_golden_pickle_and_directory_never_panic(
        muts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
    ) {
        let golden = golden_cached();
        let mut b = golden.to_vec();
        let n = b.len();
        for (i, v, tail) in muts {
            // the pickle sits at the start of the archive, the central directory at its end
            let i = if tail { n - 1 - i.index(4096.min(n)) } else { i.index(40_000.min(n)) };
            b[i] = v;
        }
        try_load(&b);
    }
}

fn small_checkpoint_cached() -> &'static [u8] {
    static S: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    S.get_or_init(small_checkpoint)
}

fn golden_cached() -> &'static [u8] {
    static S: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    S.get_or_init(|| std::fs::read(golden().join("model/tiny_gpt_legacy_lpe.pt")).unwrap())
}
