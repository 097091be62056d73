//! `.npy`, official `.pkl.npy` and `.json` exporters and readers.

mod motion_common;

use danceba_motion::export::json::{SamplingMeta, StartTokens, TokenStreams};
use danceba_motion::export::{self, npy, ExportError, Format, MotionMeta};
use danceba_motion::{Motion, MotionError};
use motion_common::*;

fn golden_motion() -> Motion {
    let (_, decoded) = golden_f32(&pipeline_files()[0], "pose_decoded");
    Motion::from_decoded(&decoded, 60.0).unwrap()
}

fn no_temp_files(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.ends_with(".tmp"), "temporary file left: {name}");
    }
}

#[test]
fn npy_round_trip_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let m = golden_motion();
    let p = dir.path().join("a.npy");
    npy::write_npy(&m, &p, false).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0);
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(
        header.contains(&format!("'shape': ({}, 72)", m.frames())),
        "{header}"
    );
    assert!(header.contains("'descr': '<f4'"));
    assert_eq!(bytes.len(), 10 + hlen + m.positions.len() * 4);
    let back = npy::read_npy(&p, 60.0).unwrap();
    assert_eq!(back, m);
    let (back2, meta) = export::read_motion(&p, 60.0).unwrap();
    assert_eq!(back2, m);
    assert_eq!(meta, MotionMeta::default());
    no_temp_files(dir.path());
}

fn raw_npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(h.len() as u16).to_le_bytes());
    v.extend_from_slice(h.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn npy_reader_accepts_other_layouts_and_rejects_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let vals: Vec<f64> = (0..2 * 72).map(|i| i as f64 * 0.01).collect();
    let f64_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let p = dir.path().join("b.npy");
    std::fs::write(&p, raw_npy("<f8", "(1, 2, 72)", &f64_bytes)).unwrap();
    let m = npy::read_npy(&p, 60.0).unwrap();
    assert_eq!(m.frames(), 2);
    assert_eq!(m.positions[5], 0.05);

    let f32_bytes: Vec<u8> = vals
        .iter()
        .flat_map(|v| (*v as f32).to_le_bytes())
        .collect();
    std::fs::write(&p, raw_npy("<f4", "(2, 24, 3)", &f32_bytes)).unwrap();
    assert_eq!(npy::read_npy(&p, 60.0).unwrap().frames(), 2);

    // Wrong shape.
    std::fs::write(&p, raw_npy("<f4", "(3, 48)", &f32_bytes)).unwrap();
    let e = npy::read_npy(&p, 60.0).unwrap_err();
    assert!(matches!(e, ExportError::Format { .. }), "{e}");
    assert!(e.to_string().contains("(frames, 72)"), "{e}");
    // Data shorter than the shape.
    std::fs::write(&p, raw_npy("<f4", "(3, 72)", &f32_bytes)).unwrap();
    assert!(matches!(
        npy::read_npy(&p, 60.0),
        Err(ExportError::Format { .. })
    ));
    // NaN.
    let mut nan = f32_bytes.clone();
    nan[4 * 80..4 * 81].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&p, raw_npy("<f4", "(2, 72)", &nan)).unwrap();
    let e = npy::read_npy(&p, 60.0).unwrap_err();
    assert!(
        matches!(
            e,
            ExportError::Motion {
                source: MotionError::NotFinite {
                    frame: 1,
                    joint: 2,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    // Big-endian, integers, garbage, empty, truncated header.
    for bytes in [
        raw_npy(">f4", "(2, 72)", &f32_bytes),
        raw_npy("<i4", "(2, 72)", &f32_bytes),
        b"hello world, not numpy".to_vec(),
        Vec::new(),
        b"\x93NUMPY\x01\x00\xff\xff{'descr'".to_vec(),
    ] {
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            npy::read_npy(&p, 60.0),
            Err(ExportError::Format { .. })
        ));
    }
    // A pickled object array that is not the official layout is refused with a reason.
    let other = raw_npy("|O", "()", b"\x80\x03]q\x00.");
    std::fs::write(&p, other).unwrap();
    let e = npy::read_npy(&p, 60.0).unwrap_err();
    assert!(e.to_string().contains("pred_position"), "{e}");
    // Missing file.
    assert!(matches!(
        npy::read_npy(&dir.path().join("missing.npy"), 60.0),
        Err(ExportError::Read { .. })
    ));
}

#[test]
fn official_npy_holds_the_pickled_dict() {
    let m = golden_motion();
    let bytes = npy::official_npy_bytes(&m).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(
        header.contains("'descr': '|O'") && header.contains("'shape': ()"),
        "{header}"
    );
    let pickle = &bytes[10 + hlen..];
    assert_eq!(&pickle[..2], &[0x80, 3]);
    assert_eq!(*pickle.last().unwrap(), b'.');
    // The float32 data appears verbatim, once, after the key.
    let data: Vec<u8> = m.positions.iter().flat_map(|v| v.to_le_bytes()).collect();
    let at = pickle
        .windows(data.len())
        .position(|w| w == data.as_slice())
        .expect("data in pickle");
    let key = pickle
        .windows(13)
        .position(|w| w == b"pred_position")
        .unwrap();
    assert!(key < at);
    assert_eq!(pickle[at - 5], b'B');
    assert_eq!(&pickle[at - 4..at], &(data.len() as u32).to_le_bytes());
}

#[test]
fn official_npy_reads_back_ours_and_numpys() {
    let dir = tempfile::tempdir().unwrap();
    let m = golden_motion();
    let p = dir.path().join("x.pkl.npy");
    npy::write_official_npy(&m, &p, false).unwrap();
    assert_eq!(npy::read_npy(&p, 60.0).unwrap(), m);
    let (back, _) = export::read_motion(&p, 60.0).unwrap();
    assert_eq!(back, m);
    // Files written by numpy itself (protocol 4 / numpy 2, protocol 3 / numpy 1.x layout).
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/");
    for name in [
        "numpy2_protocol4_f32.pkl.npy",
        "numpy_protocol3_f64.pkl.npy",
    ] {
        let m = npy::read_npy(std::path::Path::new(&format!("{data}{name}")), 60.0).unwrap();
        assert_eq!(m.frames(), 2, "{name}");
        for (i, v) in m.positions.iter().enumerate() {
            let want = (i as f32 * 0.01 - 0.5) as f64;
            assert!((*v as f64 - want).abs() < 1e-6, "{name}[{i}] = {v}");
        }
    }
    // Corrupted bytes anywhere give an error or a motion, never a panic.
    let fx = std::fs::read(format!("{data}numpy2_protocol4_f32.pkl.npy")).unwrap();
    for i in 0..fx.len() {
        for v in [0u8, 0x80, 0xff, b'(', b'.', b'h'] {
            let mut b = fx.clone();
            b[i] = v;
            let _ = npy::read_npy_bytes(&b, 60.0);
        }
    }
    // Truncations of a valid file are errors, never panics.
    let bytes = std::fs::read(&p).unwrap();
    for cut in [11, 100, 130, 200, 400, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        assert!(npy::read_npy(&p, 60.0).is_err(), "cut {cut}");
    }
}

#[test]
fn json_round_trip_keeps_motion_and_meta() {
    let dir = tempfile::tempdir().unwrap();
    let m = golden_motion();
    let meta = MotionMeta {
        tokens: Some(TokenStreams {
            up: vec![423, 1, 2],
            down: vec![12, 3, 4],
        }),
        start_tokens: Some(StartTokens { up: 423, down: 12 }),
        sampling: Some(SamplingMeta {
            strategy: "greedy".into(),
            ..Default::default()
        }),
        audio: Some("song.mp3".into()),
        model: None,
        generator: Some("danceba test".into()),
    };
    let p = dir.path().join("d.json");
    export::export(&m, &meta, Format::Json, &p, false).unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["tokens"]["up"][0], 423);
    assert_eq!(v["tokens"]["down"][0], 12);
    assert_eq!(v["fps"], 60.0);
    assert_eq!(v["joint_names"][15], "head");
    assert_eq!(v["parents"][0], -1);
    assert_eq!(v["frames"].as_array().unwrap().len(), m.frames());
    assert_eq!(v["audio"], "song.mp3");
    let (back, meta2) = export::read_motion(&p, 1.0).unwrap();
    assert_eq!(back, m); // f32 values survive JSON exactly
    assert_eq!(meta2, meta);
}

#[test]
fn json_reader_rejects_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let m = Motion::new(vec![0.5; 72 * 2], 60.0).unwrap();
    let good = danceba_motion::export::json::json_string(&m, &MotionMeta::default()).unwrap();
    let p = dir.path().join("e.json");
    let cases: Vec<(String, &str)> = vec![
        (good.replacen("[0.5,", "[", 1), "frame 0 has 71"),
        (good.replacen("0.5", "null", 1), "not a danceba motion"),
        (good.replacen("0.5", "1e39", 1), "not finite"),
        (
            good.replace("\"num_frames\":2", "\"num_frames\":3"),
            "num_frames",
        ),
        (good.replace("\"head\"", "\"skull\""), "skeleton"),
        (good.replace("\"fps\":60.0", "\"fps\":-1.0"), "frame rate"),
        (good.replace("\"fps\":60.0", "\"fps\":1e9"), "frame rate"),
        (good.replace("\"fps\":60.0", "\"fps\":0.001"), "frame rate"),
        (good.replace("\"metres\"", "\"feet\""), "units"),
        (
            good.replace("\"up_axis\":\"y\"", "\"up_axis\":\"z\""),
            "up_axis",
        ),
        (good.replace("danceba-motion", "other"), "format"),
        ("{}".into(), "not a danceba motion"),
        (
            r#"{"id": "x", "music_array": [[0.5]]}"#.into(),
            "music-feature file",
        ),
        ("\u{0}\u{1}".into(), "not a danceba motion"),
    ];
    for (text, needle) in cases {
        std::fs::write(&p, &text).unwrap();
        let e = export::read_motion(&p, 60.0).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle}: {e}");
    }
    std::fs::write(&p, &good).unwrap();
    assert_eq!(export::read_motion(&p, 60.0).unwrap().0, m);
    // a file of another type, a missing file and a directory, each said as what it is
    let txt = dir.path().join("x.txt");
    let e = export::read_motion(&txt, 60.0).unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
    let e = export::read_motion(dir.path(), 60.0).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    std::fs::write(&txt, b"frames").unwrap();
    let e = export::read_motion(&txt, 60.0).unwrap_err();
    assert!(e.to_string().contains(".npy or .json"), "{e}");
}

#[test]
fn writes_are_atomic_and_do_not_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let m = golden_motion();
    let meta = MotionMeta::default();
    for f in [Format::Npy, Format::OfficialNpy, Format::Json] {
        let p = dir.path().join(format!("out.{}", f.extension()));
        std::fs::write(&p, b"keep me").unwrap();
        let e = export::export(&m, &meta, f, &p, false).unwrap_err();
        assert!(matches!(e, ExportError::Exists { .. }), "{e}");
        assert!(e.to_string().contains("--force"));
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        export::export(&m, &meta, f, &p, true).unwrap();
        assert_ne!(std::fs::read(&p).unwrap(), b"keep me");
        // Unwritable: the directory does not exist.
        let bad = dir
            .path()
            .join("no/such/dir")
            .join(format!("x.{}", f.extension()));
        let e = export::export(&m, &meta, f, &bad, false).unwrap_err();
        assert!(matches!(e, ExportError::Write { .. }), "{e}");
        assert!(!bad.exists());
    }
    no_temp_files(dir.path());
}

#[test]
fn format_names_parse() {
    assert_eq!(Format::parse("NPY"), Some(Format::Npy));
    assert_eq!(Format::parse("official-npy"), Some(Format::OfficialNpy));
    assert_eq!(Format::parse("bvh"), Some(Format::Bvh));
    assert_eq!(Format::parse("json"), Some(Format::Json));
    assert_eq!(Format::parse("fbx"), None);
}

/// A file name at the file system's 255-byte limit is written (the temporary file beside it
/// used to be named after it, and went over the limit).
#[test]
fn a_name_at_the_length_limit_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let m = golden_motion();
    for (format, ext) in [(Format::Npy, "npy"), (Format::Json, "json")] {
        let p = dir
            .path()
            .join(format!("{}.{ext}", "d".repeat(254 - ext.len())));
        assert_eq!(p.file_name().unwrap().len(), 255);
        export::export(&m, &MotionMeta::default(), format, &p, false)
            .unwrap_or_else(|e| panic!("{ext}: {e}"));
        assert!(p.is_file());
    }
    no_temp_files(dir.path());
}
