//! Bad and hostile inputs to the checkpoint reader, and the layouts torch.save can produce
//! (strided views, offsets, shared storages, dtypes, byte order). Every bad file must give a clear
//! error, never a panic, never a huge allocation, and never execute anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use danceba_model::arch::audit_gpt;
use danceba_model::checkpoint::writer::{
    pickle_dumps, save_torch_checkpoint, write_torch_zip, PickleWrite, ZipStoreWriter,
};
use danceba_model::checkpoint::zipfile::Archive;
use danceba_model::checkpoint::{self, CheckpointError, PyValue, StorageDtype};

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

fn tiny_gpt_path() -> PathBuf {
    golden().join("model/tiny_gpt.pt")
}

fn load_err(path: &Path) -> String {
    match checkpoint::load(path) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e.to_string(),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A checkpoint dict with the given state-dict entries and storages.
fn write_ckpt(
    path: &Path,
    entries: Vec<(PickleWrite, PickleWrite)>,
    config: PickleWrite,
    storages: Vec<(String, Vec<u8>)>,
) {
    let pkl = pickle_dumps(&PickleWrite::Dict(vec![
        (PickleWrite::str("model"), PickleWrite::OrderedDict(entries)),
        (PickleWrite::str("config"), config),
        (PickleWrite::str("epoch"), PickleWrite::Int(7)),
    ]));
    write_torch_zip(path, "archive", &pkl, storages).unwrap();
}

fn view(
    key: &str,
    dtype: StorageDtype,
    numel: u64,
    offset: u64,
    shape: &[u64],
    stride: &[u64],
) -> PickleWrite {
    PickleWrite::Tensor {
        storage_key: key.into(),
        dtype,
        storage_numel: numel,
        offset,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
        parameter: false,
    }
}

#[test]
fn checkpoint_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.pt");
    std::fs::write(&p, b"").unwrap();
    let e = load_err(&p);
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn checkpoint_wav_renamed_pt() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("song.pt");
    let mut wav =
        b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x02\x00\x44\xac\x00\x00".to_vec();
    wav.resize(4096, 0);
    std::fs::write(&p, &wav).unwrap();
    let e = load_err(&p);
    assert!(e.contains("not a checkpoint") && e.contains("WAV"), "{e}");
}

#[test]
fn checkpoint_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("directory") || e.contains("cannot read"), "{e}");
}

#[test]
fn checkpoint_truncated() {
    let bytes = std::fs::read(tiny_gpt_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cut in [10, 100, bytes.len() / 2, bytes.len() - 30, bytes.len() - 1] {
        let p = dir.path().join(format!("cut{cut}.pt"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = load_err(&p);
        assert!(
            e.contains("truncated") || e.contains("zip"),
            "cut {cut}: {e}"
        );
    }
}

/// Rewrites the golden archive with data.pkl replaced.
fn with_pickle(src: &Path, dst: &Path, f: impl Fn(&[u8]) -> Vec<u8>) {
    let data = std::fs::read(src).unwrap();
    let ar = Archive::parse(&data).unwrap();
    let mut z = ZipStoreWriter::new(std::fs::File::create(dst).unwrap());
    for e in &ar.entries {
        let bytes = Archive::read(&data, e).unwrap();
        if e.name.ends_with("data.pkl") {
            z.add(&e.name, &f(&bytes)).unwrap();
        } else {
            z.add(&e.name, &bytes).unwrap();
        }
    }
    z.finish().unwrap();
}

#[test]
fn checkpoint_rewritten_archive_still_loads() {
    // the rewriting helper itself is faithful
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("same.pt");
    with_pickle(&tiny_gpt_path(), &p, |b| b.to_vec());
    let a = checkpoint::load(&p).unwrap();
    let b = checkpoint::load(&tiny_gpt_path()).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
}

#[test]
fn checkpoint_corrupt_pickle() {
    let dir = tempfile::tempdir().unwrap();
    type Mutation = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "truncated pickle",
            Box::new(|b: &[u8]| b[..b.len() / 3].to_vec()),
        ),
        (
            "garbage opcode",
            Box::new(|b: &[u8]| {
                let mut v = b.to_vec();
                v[2] = 0xff;
                v
            }),
        ),
        ("no STOP", Box::new(|b: &[u8]| b[..b.len() - 1].to_vec())),
        (
            "zeroed middle",
            Box::new(|b: &[u8]| {
                let mut v = b.to_vec();
                let n = v.len();
                v[n / 2..n / 2 + 64].fill(0);
                v
            }),
        ),
    ];
    for (name, f) in cases {
        let p = dir.path().join("bad.pt");
        with_pickle(&tiny_gpt_path(), &p, f);
        let e = load_err(&p);
        assert!(e.contains("pickle"), "{name}: {e}");
    }
    // a well-formed pickle of something other than a dict: named in Python's terms
    // (protocol 2: PROTO 2, then the object, then STOP)
    for (body, says) in [
        (&b"N"[..], "None"),
        (&b"]"[..], "a list"),
        (&b"K\x07"[..], "an int"),
    ] {
        let p = dir.path().join("not_a_dict.pt");
        with_pickle(&tiny_gpt_path(), &p, |_| {
            [&b"\x80\x02"[..], body, b"."].concat()
        });
        let e = load_err(&p);
        assert!(e.contains(&format!("is {says}, not a dict")), "{says}: {e}");
    }
}

#[test]
fn checkpoint_pickle_naming_os_system_and_eval_is_inert() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let p = dir.path().join("evil.pt");
    let cmd = format!("touch {}", marker.display());
    let evil = |m: &str, n: &str, arg: &str| {
        PickleWrite::Reduce(
            Box::new(PickleWrite::Global(m.into(), n.into())),
            vec![PickleWrite::Str(arg.into())],
        )
    };
    let pkl = pickle_dumps(&PickleWrite::Dict(vec![
        (
            PickleWrite::str("model"),
            PickleWrite::OrderedDict(vec![
                (
                    PickleWrite::str("module.w"),
                    PickleWrite::tensor("0", StorageDtype::F32, &[2], true),
                ),
                (
                    PickleWrite::str("module.x"),
                    evil("subprocess", "call", &cmd),
                ),
            ]),
        ),
        (PickleWrite::str("config"), evil("os", "system", &cmd)),
        (
            PickleWrite::str("epoch"),
            evil("builtins", "eval", "__import__('os').system('true')"),
        ),
    ]));
    write_torch_zip(
        &p,
        "archive",
        &pkl,
        vec![("0".into(), f32_bytes(&[1.0, 2.0]))],
    )
    .unwrap();
    let sd = checkpoint::load(&p).unwrap();
    assert!(!marker.exists(), "something was executed");
    assert_eq!(sd.tensors["w"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    assert_eq!(sd.ignored, vec!["x".to_string()]);
    match sd.config.as_ref().unwrap() {
        PyValue::Object { class, args, .. } => {
            assert_eq!(class, "os.system");
            assert_eq!(args[0].as_str(), Some(cmd.as_str()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sd.epoch, None);
}

#[test]
fn checkpoint_absurd_shapes_and_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let storage = vec![("0".to_string(), f32_bytes(&[0.0; 12]))];
    let cases = [
        (
            "overflowing shape",
            view("0", StorageDtype::F32, 12, 0, &[1 << 40, 1 << 40], &[1, 1]),
            "absurd",
        ),
        (
            "huge shape",
            view(
                "0",
                StorageDtype::F32,
                12,
                0,
                &[1 << 20, 1 << 20],
                &[1 << 20, 1],
            ),
            "past the end",
        ),
        (
            "stride-0 expansion",
            view("0", StorageDtype::F32, 12, 0, &[1 << 30, 1 << 10], &[0, 0]),
            "expanded view",
        ),
        (
            "offset past the end",
            view("0", StorageDtype::F32, 12, 12, &[1], &[1]),
            "past the end",
        ),
        (
            "view past the end",
            view("0", StorageDtype::F32, 12, 4, &[3, 4], &[4, 1]),
            "past the end",
        ),
        (
            "storage larger than its bytes",
            view("0", StorageDtype::F32, 1 << 40, 0, &[2], &[1]),
            "declares",
        ),
        (
            "missing storage",
            view("9", StorageDtype::F32, 12, 0, &[2], &[1]),
            "missing",
        ),
    ];
    for (name, t, want) in cases {
        let p = dir.path().join("absurd.pt");
        write_ckpt(
            &p,
            vec![(PickleWrite::str("module.t"), t)],
            PickleWrite::None,
            storage.clone(),
        );
        let e = load_err(&p);
        assert!(e.contains(want) && e.contains("tensor t"), "{name}: {e}");
    }
}

#[test]
fn checkpoint_strided_offset_shared_views() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("views.pt");
    let base: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let entries = vec![
        (
            PickleWrite::str("full"),
            view("0", StorageDtype::F32, 12, 0, &[3, 4], &[4, 1]),
        ),
        // transpose: non-contiguous
        (
            PickleWrite::str("t"),
            view("0", StorageDtype::F32, 12, 0, &[4, 3], &[1, 4]),
        ),
        // offset + step
        (
            PickleWrite::str("step"),
            view("0", StorageDtype::F32, 12, 5, &[3], &[2]),
        ),
        // a row of the shared storage
        (
            PickleWrite::str("row"),
            view("0", StorageDtype::F32, 12, 8, &[1, 4], &[4, 1]),
        ),
        // broadcast (stride 0)
        (
            PickleWrite::str("bcast"),
            view("0", StorageDtype::F32, 12, 1, &[2, 3], &[0, 1]),
        ),
        // scalar
        (
            PickleWrite::str("scalar"),
            view("0", StorageDtype::F32, 12, 11, &[], &[]),
        ),
        // empty
        (
            PickleWrite::str("empty"),
            view("0", StorageDtype::F32, 12, 0, &[0, 4], &[4, 1]),
        ),
    ];
    write_ckpt(
        &p,
        entries,
        PickleWrite::None,
        vec![("0".into(), f32_bytes(&base))],
    );
    let sd = checkpoint::load(&p).unwrap();
    assert_eq!(sd.epoch, Some(7));
    let v2 = |k: &str| sd.tensors[k].to_vec2::<f32>().unwrap();
    assert_eq!(v2("full")[2], vec![8.0, 9.0, 10.0, 11.0]);
    assert_eq!(
        v2("t"),
        vec![
            vec![0.0, 4.0, 8.0],
            vec![1.0, 5.0, 9.0],
            vec![2.0, 6.0, 10.0],
            vec![3.0, 7.0, 11.0]
        ]
    );
    assert_eq!(
        sd.tensors["step"].to_vec1::<f32>().unwrap(),
        vec![5.0, 7.0, 9.0]
    );
    assert_eq!(v2("row"), vec![vec![8.0, 9.0, 10.0, 11.0]]);
    assert_eq!(v2("bcast"), vec![vec![1.0, 2.0, 3.0], vec![1.0, 2.0, 3.0]]);
    assert_eq!(sd.tensors["scalar"].to_scalar::<f32>().unwrap(), 11.0);
    assert_eq!(sd.tensors["empty"].dims(), &[0, 4]);
}

#[test]
fn checkpoint_all_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dtypes.pt");
    let vals = [1.5f64, -2.25, 3.0];
    let mut storages = vec![];
    let mut entries = vec![];
    let mut add = |name: &str, d: StorageDtype, bytes: Vec<u8>| {
        let key = storages.len().to_string();
        entries.push((
            PickleWrite::Str(name.into()),
            view(&key, d, 3, 0, &[3], &[1]),
        ));
        storages.push((key, bytes));
    };
    add(
        "f32",
        StorageDtype::F32,
        vals.iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
    );
    add(
        "f16",
        StorageDtype::F16,
        vals.iter()
            .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
            .collect(),
    );
    add(
        "bf16",
        StorageDtype::BF16,
        vals.iter()
            .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
            .collect(),
    );
    add(
        "f64",
        StorageDtype::F64,
        vals.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    );
    add(
        "i64",
        StorageDtype::I64,
        [1i64, -2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    add(
        "i32",
        StorageDtype::I32,
        [1i32, -2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
    );
    add("u8", StorageDtype::U8, vec![1, 2, 255]);
    add("bool", StorageDtype::Bool, vec![1, 0, 1]);
    write_ckpt(&p, entries, PickleWrite::None, storages);

    let sd = checkpoint::load(&p).unwrap();
    for k in ["f32", "f16", "bf16", "f64"] {
        assert_eq!(sd.tensors[k].dtype(), DType::F32, "{k}");
        assert_eq!(
            sd.tensors[k].to_vec1::<f32>().unwrap(),
            vec![1.5, -2.25, 3.0],
            "{k}"
        );
    }
    assert_eq!(sd.source_dtypes["bf16"], "bfloat16");
    assert_eq!(sd.tensors["i64"].to_vec1::<i64>().unwrap(), vec![1, -2, 3]);
    assert_eq!(sd.tensors["i32"].to_vec1::<i32>().unwrap(), vec![1, -2, 3]);
    assert_eq!(sd.tensors["u8"].to_vec1::<u8>().unwrap(), vec![1, 2, 255]);
    assert_eq!(sd.tensors["bool"].to_vec1::<u8>().unwrap(), vec![1, 0, 1]);

    // load_on converts floating-point tensors only
    let sd = checkpoint::load_on(&p, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(sd.tensors["f32"].dtype(), DType::F16);
    assert_eq!(sd.tensors["i64"].dtype(), DType::I64);
}

#[test]
fn checkpoint_big_endian_byteorder() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("be.pt");
    let pkl = pickle_dumps(&PickleWrite::OrderedDict(vec![(
        PickleWrite::str("w"),
        view("0", StorageDtype::F32, 3, 0, &[3], &[1]),
    )]));
    let be: Vec<u8> = [1.0f32, 2.5, -3.0]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let mut z = ZipStoreWriter::new(std::fs::File::create(&p).unwrap());
    z.add("archive/data.pkl", &pkl).unwrap();
    z.add("archive/byteorder", b"big").unwrap();
    z.add("archive/data/0", &be).unwrap();
    z.finish().unwrap();
    // a bare state dict (torch.save(model.state_dict())) loads too
    let sd = checkpoint::load(&p).unwrap();
    assert_eq!(
        sd.tensors["w"].to_vec1::<f32>().unwrap(),
        vec![1.0, 2.5, -3.0]
    );
    assert!(sd.config.is_none());
}

#[test]
fn checkpoint_deep_or_exponential_pickles_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 100k nested lists
    let mut raw = vec![];
    raw.extend(std::iter::repeat_n(b']', 100_000));
    raw.extend(std::iter::repeat_n(b'a', 99_999));
    let p = dir.path().join("deep.pt");
    let pkl = pickle_dumps(&PickleWrite::Raw(raw));
    write_torch_zip(&p, "archive", &pkl, vec![]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("too deep"), "{e}");

    // l = []; then 64 times: l = [l, l]  → 2^64 nodes if expanded naively
    let mut raw = vec![b']', b'q', 0];
    for _ in 0..64 {
        raw.extend([b'h', 0, b'h', 0, 0x86, b'0']); // build (l, l), drop it (keeps memo small)
        raw.extend([b'h', 0, b'h', 0, 0x86, b'q', 0, b'0']); // memo[0] = (l, l)
    }
    raw.extend([b'h', 0]);
    let p = dir.path().join("bomb.pt");
    write_torch_zip(&p, "archive", &pickle_dumps(&PickleWrite::Raw(raw)), vec![]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("too large") || e.contains("too many"), "{e}");
}

fn tiny_gpt_tensors() -> BTreeMap<String, Tensor> {
    checkpoint::load(&tiny_gpt_path()).unwrap().tensors
}

#[test]
fn checkpoint_missing_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("missing.pt");
    let mut t = tiny_gpt_tensors();
    t.remove("gpt_head.RMS_f.weight");
    save_torch_checkpoint(&p, &t, "module.", vec![], None, Some(1)).unwrap();
    let sd = checkpoint::load(&p).unwrap();
    let e = audit_gpt(&sd, Some(4)).unwrap_err().to_string();
    assert!(
        e.contains("gpt_head.RMS_f.weight") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn checkpoint_misshaped_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("misshaped.pt");
    let mut t = tiny_gpt_tensors();
    t.insert(
        "gpt_head.blocks.1.mamba_3.D".into(),
        Tensor::zeros(127, DType::F32, &Device::Cpu).unwrap(),
    );
    save_torch_checkpoint(&p, &t, "module.", vec![], None, Some(1)).unwrap();
    let sd = checkpoint::load(&p).unwrap();
    let e = audit_gpt(&sd, Some(4)).unwrap_err().to_string();
    assert!(
        e.contains("gpt_head.blocks.1.mamba_3.D") && e.contains("[127]"),
        "{e}"
    );
}

#[test]
fn checkpoint_writer_roundtrip_matches_golden() {
    // our writer + our reader reproduce every golden tensor bit for bit
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rt.pt");
    let t = tiny_gpt_tensors();
    save_torch_checkpoint(&p, &t, "module.", vec![], None, Some(3)).unwrap();
    let sd = checkpoint::load(&p).unwrap();
    assert_eq!(sd.tensors.len(), t.len());
    for (k, a) in &t {
        let b = &sd.tensors[k];
        assert_eq!(a.dims(), b.dims(), "{k}");
        let a = a
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let b = b
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{k}"
        );
    }
}

#[test]
fn checkpoint_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.pt");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(
        checkpoint::load(&p),
        Err(CheckpointError::Empty { .. })
    ));
    let e = checkpoint::load(&dir.path().join("nope.pt")).unwrap_err();
    assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
}

#[test]
fn checkpoint_pickle_memory_bombs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // millions of DUPs (no new objects, only stack growth) and millions of new objects
    for (name, op) in [("dup", b'2'), ("lists", b']')] {
        let mut raw = vec![b'N'];
        raw.extend(std::iter::repeat_n(op, 3_000_000));
        let p = dir.path().join(format!("{name}.pt"));
        write_torch_zip(&p, "archive", &pickle_dumps(&PickleWrite::Raw(raw)), vec![]).unwrap();
        let e = load_err(&p);
        assert!(
            e.contains("too large") || e.contains("too many"),
            "{name}: {e}"
        );
    }
}

/// One flipped bit in a tensor's data is caught by the zip CRC-32, naming the entry (the values
/// themselves can look plausible, so no other check sees it); a CRC recorded as 0 (torch.save
/// with `set_crc32_options(False)`) is taken as "not computed" and the file loads.
#[test]
fn checkpoint_damaged_data_fails_its_crc() {
    let src = tiny_gpt_path();
    let bytes = std::fs::read(&src).unwrap();
    let archive = Archive::parse(&bytes).unwrap();
    let entry = archive
        .entries
        .iter()
        .find(|e| e.name.ends_with("/data/64"))
        .unwrap();
    let range = Archive::data_range(&bytes, entry).unwrap();
    let dir = tempfile::tempdir().unwrap();

    let mut flipped = bytes.clone();
    flipped[range.start + 8] ^= 0x40;
    let p = dir.path().join("flipped.pt");
    std::fs::write(&p, &flipped).unwrap();
    let e = load_err(&p);
    assert!(e.contains("data/64") && e.contains("CRC-32"), "{e}");

    // the same file with every CRC in the central directory zeroed: loads, data unchecked
    let mut no_crc = flipped.clone();
    let mut at = 0;
    while let Some(i) = no_crc[at..].windows(4).position(|w| w == b"PK\x01\x02") {
        let p = at + i;
        no_crc[p + 16..p + 20].fill(0);
        at = p + 4;
    }
    let p = dir.path().join("no_crc.pt");
    std::fs::write(&p, &no_crc).unwrap();
    checkpoint::load(&p).expect("an archive without checksums loads");
}
