//! Shared test helpers: a synthetic dancing skeleton and the golden-data location.
#![allow(dead_code)]

use danceba_motion::Motion;
use std::path::PathBuf;

/// Rest pose (metres, y up, SMPL joint order, left = +x, facing +z).
const REST: [[f32; 3]; 24] = [
    [0.0, 0.93, 0.0],
    [0.07, 0.84, 0.0],
    [-0.07, 0.84, 0.0],
    [0.0, 1.04, 0.0],
    [0.10, 0.47, 0.0],
    [-0.10, 0.47, 0.0],
    [0.0, 1.17, 0.0],
    [0.09, 0.07, 0.0],
    [-0.09, 0.07, 0.0],
    [0.0, 1.22, 0.0],
    [0.11, 0.02, 0.12],
    [-0.11, 0.02, 0.12],
    [0.0, 1.43, 0.0],
    [0.08, 1.35, 0.0],
    [-0.08, 1.35, 0.0],
    [0.0, 1.6, 0.03],
    [0.18, 1.38, 0.0],
    [-0.18, 1.38, 0.0],
    [0.22, 1.12, 0.0],
    [-0.22, 1.12, 0.0],
    [0.24, 0.88, 0.05],
    [-0.24, 0.88, 0.05],
    [0.25, 0.80, 0.06],
    [-0.25, 0.80, 0.06],
];

/// A synthetic dance of `frames` frames at 60 fps: swaying, bobbing, waving arms.
pub fn synthetic_motion(frames: usize) -> Motion {
    let mut pos = Vec::with_capacity(frames * 72);
    for f in 0..frames {
        let t = f as f32 / 60.0;
        let sway = 0.3 * (0.8 * t).sin();
        let bob = 0.05 * (4.0 * t).sin().abs();
        for (j, r) in REST.iter().enumerate() {
            let mut p = [r[0] + sway, r[1] + bob, r[2] + 0.1 * (0.5 * t).sin()];
            // Arms wave up and down.
            if [18, 20, 22].contains(&j) {
                p[1] += 0.35 * (3.0 * t).sin() * if j == 18 { 0.5 } else { 1.0 };
                p[0] += 0.15;
            }
            if [19, 21, 23].contains(&j) {
                p[1] += 0.35 * (3.0 * t + 1.5).sin() * if j == 19 { 0.5 } else { 1.0 };
                p[0] -= 0.15;
            }
            pos.extend_from_slice(&p);
        }
    }
    Motion::new(pos, 60.0).expect("synthetic motion is valid")
}

/// The shared golden directory.
pub fn golden() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

/// Whether `cmd` runs (`cmd -version`).
pub fn have(cmd: &str) -> bool {
    std::process::Command::new(cmd)
        .arg("-version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// Pixels of `rgb` within `tol` per channel of `want`.
pub fn count_near(rgb: &[u8], want: [u8; 3], tol: i32) -> usize {
    rgb.chunks_exact(3)
        .filter(|p| (0..3).all(|c| (p[c] as i32 - want[c] as i32).abs() <= tol))
        .count()
}

/// `pose_absolute` of a golden pipeline file (the tiny random model: drifting, small figure).
pub fn golden_motion(clip: &str) -> Motion {
    let bytes = std::fs::read(golden().join(format!("model/{clip}.pipeline.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("pose_absolute").unwrap();
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Motion::new(v, 60.0).unwrap()
}
