//! `danceba inspect` and `danceba convert` end to end on the golden tiny checkpoints.

use std::path::{Path, PathBuf};
use std::process::Command;

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

fn danceba(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_danceba"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let (ok, out, err) = danceba(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn cli_inspect_gpt_json() {
    let v = inspect_json(&model("tiny_gpt_legacy_lpe.pt"));
    assert_eq!(v["kind"], "gpt");
    assert!(v["epoch"].is_i64());
    let a = &v["architecture"];
    assert_eq!(a["n_embd"], 64);
    assert_eq!(a["n_head"], 4);
    assert_eq!(a["n_layer_base"], 2);
    assert_eq!(a["n_layer_head"], 2);
    assert_eq!(a["mamba"]["d_state"], 16);
    assert_eq!(v["n_head_source"], "config");
    assert!(v["parameters"].as_u64().unwrap() > 0);
    assert_eq!(v["missing"].as_array().unwrap().len(), 0);
    assert_eq!(v["unexpected"].as_array().unwrap().len(), 0);
    let ignored = v["ignored"].as_array().unwrap();
    assert_eq!(ignored.len(), 21);
    assert!(ignored
        .iter()
        .any(|k| k == "gpt_base.pos_emb.pos_emb_1.linear1.weight"));
    // a flag that agrees with the config is taken; one that contradicts it is refused (it
    // would change every attention layer), by inspect and convert alike
    let tiny = model("tiny_gpt.pt");
    let (ok, out, err) = danceba(&["inspect", tiny.to_str().unwrap(), "--json", "--n-head", "4"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"]["n_head"], 4);
    assert_eq!(v["n_head_source"], "flag");
    let (ok, _, err) = danceba(&["inspect", tiny.to_str().unwrap(), "--n-head", "8"]);
    assert!(!ok && err.contains("contradicts"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = danceba(&[
        "convert",
        "--gpt",
        tiny.to_str().unwrap(),
        "-o",
        dir.path().to_str().unwrap(),
        "--n-head",
        "16",
    ]);
    assert!(!ok && err.contains("contradicts"), "{err}");
    assert!(!dir.path().join("gpt.safetensors").exists());
}

#[test]
fn cli_inspect_vqvae_text() {
    let (ok, out, err) = danceba(&["inspect", model("tiny_vqvae.pt").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("kind:          vqvae"), "{out}");
    assert!(
        out.contains("width 32, emb_width 32, codebook 512"),
        "{out}"
    );
    assert!(out.contains("audit:         ok"), "{out}");
}

#[test]
fn cli_inspect_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("song.pt");
    std::fs::write(&p, b"RIFF\0\0\0\0WAVEfmt hello hello hello").unwrap();
    let (ok, _, err) = danceba(&["inspect", p.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("not a checkpoint"), "{err}");
}

#[test]
fn cli_convert_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("weights");
    let gpt = model("tiny_gpt_legacy_lpe.pt");
    let vq = model("tiny_vqvae.pt");
    let args = |force: bool, dtype: &str| {
        let mut a = vec![
            "convert".to_string(),
            "--gpt".into(),
            gpt.display().to_string(),
            "--vqvae".into(),
            vq.display().to_string(),
            "-o".into(),
            out.display().to_string(),
            "--dtype".into(),
            dtype.into(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    let run = |a: Vec<String>| danceba(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, _, err) = run(args(false, "f32"));
    assert!(ok, "{err}");
    let g = inspect_json(&out.join("gpt.safetensors"));
    assert_eq!(g["kind"], "gpt");
    assert_eq!(g["format"], "safetensors");
    assert_eq!(g["architecture"]["n_head"], 4);
    assert_eq!(g["metadata"]["dtype"], "f32");
    assert_eq!(g["missing"].as_array().unwrap().len(), 0);
    let orig = inspect_json(&gpt);
    assert_eq!(g["architecture"], orig["architecture"]);
    assert_eq!(g["parameters"], orig["parameters"]);
    assert_eq!(g["epoch"], orig["epoch"]);
    let v = inspect_json(&out.join("vqvae.safetensors"));
    assert_eq!(v["kind"], "vqvae");
    assert_eq!(v["architecture"]["l_bins"], 512);

    // refuses to overwrite, then overwrites with --force in bf16
    let (ok, _, err) = run(args(false, "f32"));
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = run(args(true, "bf16"));
    assert!(ok, "{err}");
    let g = inspect_json(&out.join("gpt.safetensors"));
    assert_eq!(g["metadata"]["dtype"], "bf16");
    assert!(g["dtypes"]["bfloat16"].as_u64().unwrap() > 0);
    // the VQ-VAE stays f32 (it always decodes in f32): no rounded weights in it
    let v = inspect_json(&out.join("vqvae.safetensors"));
    assert_eq!(v["metadata"]["dtype"], "f32");
    assert!(v["dtypes"].get("bfloat16").is_none(), "{}", v["dtypes"]);
    // only the two outputs, no temporary leftovers
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["gpt.safetensors", "vqvae.safetensors"]);

    // a NaN in a weight of the converted file: the audit fails, and with --json stdout is still
    // one JSON object (the report, saying so), with exit code 1
    let path = out.join("gpt.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let key = "gpt_base.blocks.0.attn.key.weight";
    let start = 8 + n + header[key]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start..start + 2].copy_from_slice(&[0xc0, 0x7f]); // bf16 NaN
    std::fs::write(&path, &bytes).unwrap();
    let (ok, out_json, err) = danceba(&["inspect", path.to_str().unwrap(), "--json"]);
    assert!(!ok && err.contains(key) && err.contains("NaN"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out_json).expect("one JSON object");
    assert_eq!(v["audit_ok"], false);
    assert_eq!(v["bad_values"][0]["key"], key);
    // a failure before any report: one JSON object with the error
    let (ok, out_json, _) = danceba(&["inspect", out.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out_json).expect("one JSON object");
    assert!(!ok && v["error"].is_string(), "{v}");
}

#[test]
fn cli_convert_single_and_wrong_kind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, _, err) = danceba(&[
        "convert",
        "--vqvae",
        model("tiny_vqvae.pt").to_str().unwrap(),
        "-o",
        out,
    ]);
    assert!(ok, "{err}");
    assert!(dir.path().join("vqvae.safetensors").exists());
    assert!(!dir.path().join("gpt.safetensors").exists());
    // a VQ-VAE given as --gpt is refused with a clear message and leaves nothing behind
    let (ok, _, err) = danceba(&[
        "convert",
        "--gpt",
        model("tiny_vqvae.pt").to_str().unwrap(),
        "-o",
        out,
    ]);
    assert!(!ok && err.contains("expected gpt"), "{err}");
    assert!(!dir.path().join("gpt.safetensors").exists());
    let (ok, _, err) = danceba(&["convert", "-o", out]);
    assert!(!ok && err.contains("nothing to convert"), "{err}");
}

/// A conversion of both files in which the second fails leaves the directory as it was (with
/// --force too): never a new GPT beside the old VQ-VAE, and no temporary files.
#[test]
fn cli_convert_failure_leaves_the_pair_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let gpt = dir.path().join("gpt.safetensors");
    let vqvae = dir.path().join("vqvae.safetensors");
    std::fs::write(&gpt, b"old gpt").unwrap();
    std::fs::write(&vqvae, b"old vqvae").unwrap();
    let garbage = dir.path().join("garbage.pt");
    std::fs::write(&garbage, b"PK\x03\x04 not a checkpoint").unwrap();
    let (ok, _, err) = danceba(&[
        "convert",
        "--gpt",
        model("tiny_gpt.pt").to_str().unwrap(),
        "--vqvae",
        garbage.to_str().unwrap(),
        "-o",
        out,
        "--force",
    ]);
    assert!(!ok && err.contains("garbage.pt"), "{err}");
    assert_eq!(std::fs::read(&gpt).unwrap(), b"old gpt");
    assert_eq!(std::fs::read(&vqvae).unwrap(), b"old vqvae");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["garbage.pt", "gpt.safetensors", "vqvae.safetensors"]
    );
    // both good: both replaced, and reported under their real names
    let (ok, stdout, err) = danceba(&[
        "convert",
        "--gpt",
        model("tiny_gpt.pt").to_str().unwrap(),
        "--vqvae",
        model("tiny_vqvae.pt").to_str().unwrap(),
        "-o",
        out,
        "--force",
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("gpt.safetensors") && !stdout.contains(".danceba-"),
        "{stdout}"
    );
    assert_ne!(std::fs::read(&gpt).unwrap(), b"old gpt");
    assert_ne!(std::fs::read(&vqvae).unwrap(), b"old vqvae");
}

/// Half-precision files are said for what they are when generating: a GPT stored in f16 but
/// computed in f32 (without --dtype), and a VQ-VAE stored in half precision (written by an
/// earlier `convert --dtype f16`, whose rounding moves the joints).
#[test]
fn generate_notes_half_precision_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let (ok, _, err) = danceba(&[
        "convert",
        "--gpt",
        model("tiny_gpt.pt").to_str().unwrap(),
        "-o",
        out,
        "--dtype",
        "f16",
    ]);
    assert!(ok, "{err}");
    danceba_model::checkpoint::convert_checkpoint(
        &model("tiny_vqvae.pt"),
        &dir.path().join("vqvae.safetensors"),
        Some(danceba_model::arch::ModelKind::Vqvae),
        candle_core::DType::F16,
        None,
        false,
    )
    .unwrap();
    let song = golden().join("audio/mono22k_mutilated_mime_12s.wav");
    let dance = dir.path().join("dance");
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            song.to_str().unwrap(),
            "--weights",
            out,
            "--formats",
            "npy",
            "--max-seconds",
            "2",
            "--force",
            "-o",
            dance.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        danceba(&args)
    };
    let (ok, stdout, err) = generate(&["--json"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["gpt_stored_half"], "f16");
    // --json is quiet: run again without it to read the notes
    let (ok, _, err) = generate(&[]);
    assert!(ok, "{err}");
    assert!(err.contains("holds f16 weights, computed in f32"), "{err}");
    assert!(err.contains("the VQ-VAE decodes in f32"), "{err}");
    // with --dtype f16 the GPT's note has nothing to say
    let (ok, _, err) = generate(&["--dtype", "f16"]);
    assert!(ok && !err.contains("computed in f32"), "{err}");
}
