//! `danceba features` end to end through the binary.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

fn golden_dir() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

fn danceba() -> Command {
    Command::new(env!("CARGO_BIN_EXE_danceba"))
}

fn golden_features(clip: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(
        golden_dir()
            .join("features")
            .join(format!("{clip}.features.safetensors")),
    )
    .expect("golden features");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("features").unwrap();
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), data)
}

fn max_rel_err_cols_0_51(ours: &[f32], gold: &[f32], rows: usize) -> f64 {
    let mut worst = 0.0f64;
    for c in 0..52 {
        let mut e = 0.0f64;
        let mut m = 0.0f64;
        for r in 0..rows {
            e = e.max((ours[r * 438 + c] as f64 - gold[r * 438 + c] as f64).abs());
            m = m.max((gold[r * 438 + c] as f64).abs());
        }
        worst = worst.max(e / m.max(1e-12));
    }
    worst
}

#[test]
fn features_to_npy_json_and_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let wav = golden_dir().join("audio/mono22k_mutilated_mime_12s.wav");
    let (gshape, gold) = golden_features("mono22k_mutilated_mime_12s");
    let rows = gshape[0];

    // .npy
    let npy = dir.path().join("f.npy");
    let out = danceba()
        .arg("features")
        .arg(&wav)
        .arg("-o")
        .arg(&npy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = danceba_audio::MusicFeatures::from_npy(&npy).unwrap();
    assert_eq!(f.rows, rows);
    assert!(max_rel_err_cols_0_51(&f.data, &gold, rows) < 1e-4);

    // .json (official layout) and --check reading it back
    let json = dir.path().join("f.json");
    let out = danceba()
        .arg("features")
        .arg(&wav)
        .arg("-o")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["id"], "mono22k_mutilated_mime_12s");
    assert_eq!(v["music_array"].as_array().unwrap().len(), rows);
    assert_eq!(v["music_array"][0].as_array().unwrap().len(), 438);
    let back = danceba_audio::MusicFeatures::from_official_json(&json).unwrap();
    assert_eq!(back, f, "JSON round trip must be exact");
    let out = danceba()
        .arg("features")
        .arg(&json)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{rows} rows × 438 columns")),
        "{text}"
    );
    for g in [
        "mfcc",
        "mfcc_delta",
        "chroma_cqt",
        "onset_env",
        "beats_onehot",
        "tempogram",
    ] {
        assert!(text.contains(g), "{text}");
    }

    // .safetensors with every stage
    let st_path = dir.path().join("f.safetensors");
    let out = danceba()
        .arg("features")
        .arg(&wav)
        .arg("-o")
        .arg(&st_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&st_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for key in [
        "features",
        "audio_3840hz",
        "melspe_db",
        "mfcc",
        "mfcc_delta",
        "harmonic",
        "percussive",
        "chroma_cqt",
        "cqt_mag",
        "tuning",
        "onset_env",
        "tempogram",
        "beats_onehot",
        "peaks_onehot",
    ] {
        assert!(st.tensor(key).is_ok(), "missing {key}");
    }
    assert_eq!(st.tensor("features").unwrap().shape(), &[rows, 438]);
}

#[test]
fn refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let wav = golden_dir().join("audio/mono22k_mutilated_mime_12s.wav");
    let npy = dir.path().join("f.npy");
    std::fs::write(&npy, b"keep me").unwrap();
    let out = danceba()
        .arg("features")
        .arg(&wav)
        .arg("-o")
        .arg(&npy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(&npy).unwrap(), b"keep me");
    let out = danceba()
        .arg("features")
        .arg(&wav)
        .arg("-o")
        .arg(&npy)
        .arg("--force")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(danceba_audio::MusicFeatures::from_npy(&npy).is_ok());
}

#[test]
fn clear_errors_for_bad_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "this is not audio").unwrap();
    let out_path = dir.path().join("x.npy");
    let out = danceba()
        .arg("features")
        .arg(&txt)
        .arg("-o")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Supported formats"), "{err}");
    assert!(!out_path.exists(), "no partial output");

    let wav = golden_dir().join("audio/mono22k_mutilated_mime_12s.wav");
    let out = danceba()
        .arg("features")
        .arg(&wav)
        .arg("-o")
        .arg(dir.path().join("x.csv"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(".npy, .json or .safetensors"));

    let out = danceba().arg("features").arg(&wav).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("-o"));

    // an output that is a directory, or in a directory that does not exist: said before the
    // features are computed
    let as_dir = dir.path().join("d.npy");
    std::fs::create_dir(&as_dir).unwrap();
    for (out, says) in [
        (as_dir.clone(), "is a directory"),
        (dir.path().join("no/such/f.npy"), "does not exist"),
    ] {
        let o = danceba()
            .arg("features")
            .arg(&wav)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{err}");
    }

    let bad_json = dir.path().join("bad.json");
    std::fs::write(&bad_json, r#"{"id": "x", "music_array": [[1, 2, 3]]}"#).unwrap();
    let out = danceba()
        .arg("features")
        .arg(&bad_json)
        .arg("--check")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected 438"));

    // what generate cannot use fails the check (it printed a warning and succeeded): no rows,
    // and a non-finite value (an .npy of 2 × 438 float32 with one NaN)
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"id": "x", "music_array": []}"#).unwrap();
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 438), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    npy.extend_from_slice(&(header.len() as u16).to_le_bytes());
    npy.extend_from_slice(header.as_bytes());
    for i in 0..2 * 438 {
        let v = if i == 500 { f32::NAN } else { 0.25 };
        npy.extend_from_slice(&v.to_le_bytes());
    }
    let nan = dir.path().join("nan.npy");
    std::fs::write(&nan, &npy).unwrap();
    for (file, says) in [(&empty, "no rows"), (&nan, "NaN or infinite")] {
        let out = danceba()
            .arg("features")
            .arg(file)
            .arg("--check")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{err}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("NaN"));
    }
}

/// A file that decodes to clearly less than its header declares (truncated or damaged) gets a
/// note, in WAV, MP3 and FLAC alike, from `features` and `generate`; the intact golden clips
/// (whose MP3/Ogg/FLAC headers declare their length too) get none.
#[test]
fn truncated_audio_is_noted() {
    let dir = tempfile::tempdir().unwrap();
    let audio = golden_dir().join("audio");
    let out = dir.path().join("f.npy");
    let features_stderr = |input: &Path| {
        let o = danceba()
            .arg("features")
            .arg(input)
            .arg("-o")
            .arg(&out)
            .arg("--force")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    for entry in std::fs::read_dir(&audio).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e != "md") {
            let err = features_stderr(&p);
            assert!(!err.contains("note:"), "{}: {err}", p.display());
        }
    }
    for name in [
        "rock_armygeddon_20s.wav",
        "synth_machine_wars_20s.mp3",
        "flac48k_feelings_20s.flac",
    ] {
        let bytes = std::fs::read(audio.join(name)).unwrap();
        let cut = dir.path().join(format!("cut_{name}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
        let err = features_stderr(&cut);
        assert!(
            err.contains("header declares 20.0 s") && err.contains("truncated or damaged"),
            "{name}: {err}"
        );
    }
    let model = golden_dir().join("model");
    let o = danceba()
        .arg("generate")
        .arg(dir.path().join("cut_rock_armygeddon_20s.wav"))
        .arg("--gpt")
        .arg(model.join("tiny_gpt.pt"))
        .arg("--vqvae")
        .arg(model.join("tiny_vqvae.pt"))
        .args(["--formats", "npy", "-o"])
        .arg(dir.path().join("dance"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("truncated or damaged"),
        "{err}"
    );
}

/// Without ffmpeg an Opus file gets an error that says what to do; with an ffmpeg that fails,
/// what it said.
#[test]
fn opus_without_a_working_ffmpeg_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let opus = dir.path().join("song.opus");
    let made = Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
        .arg(golden_dir().join("audio/rock_armygeddon_20s.wav"))
        .args(["-t", "4", "-c:a", "libopus"])
        .arg(&opus)
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: ffmpeg (with libopus) not installed; the Opus file cannot be made");
        return;
    }
    let out = dir.path().join("f.json");
    let ok = danceba()
        .arg("features")
        .arg(&opus)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::remove_file(&out).unwrap();

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let bin = common::failing_ffmpeg(dir.path(), "Decoder (codec opus) not found");
    for (path, says) in [
        (&empty, "install ffmpeg"),
        (
            &bin,
            "ffmpeg could not decode it either: Decoder (codec opus) not found",
        ),
    ] {
        let r = danceba()
            .env("PATH", path)
            .arg("features")
            .arg(&opus)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success());
        assert!(err.contains(says), "{err}");
        assert!(!out.exists());
    }
}
