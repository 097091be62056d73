//! `danceba bench` runs each mode and reports what it measured as JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

fn golden() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"),
    }
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_danceba"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run danceba bench");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn gpt_mode_times_the_ramp_and_steady_steps_of_a_checkpoint() {
    let gpt = golden().join("model/tiny_gpt.pt");
    let v = bench_json(&[
        "--what",
        "gpt",
        "--weights",
        gpt.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "1,2",
    ]);
    // how the CPU step ran: on host buffers where our GEMM kernels run (x86-64), else candle
    let step = v["gpt"]["cpu_step"].as_str().unwrap();
    let host_here = danceba_model::gpt::cpu_gemm::available();
    assert_eq!(step, if host_here { "host" } else { "candle" });
    let runs = v["gpt"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (r, b) in runs.iter().zip([1, 2]) {
        assert_eq!(r["batch"], b);
        assert!(r["steady_step_s"].as_f64().unwrap() > 0.0);
        assert!(r["ramp_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn vqvae_mode_decodes_a_real_size_model() {
    let v = bench_json(&["--what", "vqvae", "--tokens", "3"]);
    assert_eq!(v["vqvae"]["frames"], 24);
    assert!(v["vqvae"]["s_per_motion_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn features_mode_needs_audio_and_measures_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_danceba"))
        .args(["bench", "--what", "features"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--audio"));
    let audio = golden().join("audio/mono22k_mutilated_mime_12s.wav");
    let v = bench_json(&["--what", "features", "--audio", audio.to_str().unwrap()]);
    assert_eq!(v["features"]["rows"], 92 - 1);
}

/// Counts of zero or far beyond any measurement are refused up front with the flag's range
/// (they used to abort the process in an allocation, or silently become 1).
#[test]
fn out_of_range_counts_are_errors_not_aborts() {
    for args in [
        &["--steps", "0"][..],
        &["--steps", "100000000"],
        &["--what", "vqvae", "--tokens", "100000000"],
        &["--repeat", "0"],
        &["--batch", "1,100000"],
        &["--threads", "100000"],
        &["--threads", "0"],
        &["--cuda-graphs", "on"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_danceba"))
            .arg("bench")
            .args(args)
            .output()
            .expect("run danceba bench");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(args[args.len() - 2]) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
