//! Helpers shared by the motion/export tests: the golden-data location, golden tensors and a
//! rigid synthetic dance.
#![allow(dead_code, clippy::needless_range_loop)]

use std::path::{Path, PathBuf};

use danceba_motion::skeleton::{NUM_JOINTS, PARENTS};
use danceba_motion::Motion;

pub fn golden_dir() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

pub fn pipeline_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir().join("model"))
        .expect("golden/model")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".pipeline.safetensors"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no golden pipeline files");
    v
}

/// An f32 tensor of a golden file: (shape, values).
pub fn golden_f32(path: &Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    let v = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

/// An int64 token tensor of a golden file.
pub fn golden_tokens(path: &Path, key: &str) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    t.data()
        .chunks_exact(8)
        .map(|c| u32::try_from(i64::from_le_bytes(c.try_into().unwrap())).unwrap())
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Rest joint positions of a plausible SMPL-like body (metres, y up, facing +z).
pub const REST: [[f64; 3]; NUM_JOINTS] = [
    [0.0, 0.93, 0.0],
    [0.06, 0.84, -0.01],
    [-0.06, 0.84, -0.01],
    [0.0, 1.04, -0.02],
    [0.10, 0.47, 0.0],
    [-0.10, 0.47, 0.0],
    [0.0, 1.17, 0.0],
    [0.09, 0.07, -0.03],
    [-0.09, 0.07, -0.03],
    [0.0, 1.22, 0.01],
    [0.11, 0.02, 0.10],
    [-0.11, 0.02, 0.10],
    [0.0, 1.43, -0.01],
    [0.08, 1.35, 0.0],
    [-0.08, 1.35, 0.0],
    [0.0, 1.6, 0.03],
    [0.18, 1.38, -0.01],
    [-0.18, 1.38, -0.01],
    [0.44, 1.38, -0.03],
    [-0.44, 1.38, -0.03],
    [0.68, 1.39, -0.02],
    [-0.68, 1.39, -0.02],
    [0.76, 1.39, -0.01],
    [-0.76, 1.39, -0.01],
];

fn rot(axis: [f64; 3], angle: f64) -> [[f64; 3]; 3] {
    let n = (axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]).sqrt();
    let (x, y, z) = (axis[0] / n, axis[1] / n, axis[2] / n);
    let (s, c) = angle.sin_cos();
    let t = 1.0 - c;
    [
        [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
        [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
        [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
    ]
}

fn mul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    r
}

fn apply(a: &[[f64; 3]; 3], v: [f64; 3]) -> [f64; 3] {
    [
        a[0][0] * v[0] + a[0][1] * v[1] + a[0][2] * v[2],
        a[1][0] * v[0] + a[1][1] * v[1] + a[1][2] * v[2],
        a[2][0] * v[0] + a[2][1] * v[1] + a[2][2] * v[2],
    ]
}

/// A rigid dance: every joint rotates by smooth, large, joint-specific rotations (full 3-D,
/// including twists and a turning, travelling root), so bone lengths are constant and
/// forward kinematics can reproduce it exactly.
pub fn rigid_dance(frames: usize) -> Motion {
    let mut pos = Vec::with_capacity(frames * 72);
    for f in 0..frames {
        let t = f as f64 / 60.0;
        let mut glob = vec![[[0.0; 3]; 3]; NUM_JOINTS];
        let mut p = [[0.0f64; 3]; NUM_JOINTS];
        for j in 0..NUM_JOINTS {
            let a = j as f64;
            let axis = [
                (1.3 * a + 0.4).sin(),
                (0.7 * a + 1.1).cos(),
                (2.1 * a + 0.2).sin() + 0.3,
            ];
            let amp = if j == 0 { 3.0 } else { 1.4 };
            let local = rot(axis, amp * (t * (1.0 + 0.13 * a) + 0.3 * a).sin());
            match PARENTS[j] {
                None => {
                    glob[j] = local;
                    p[j] = [0.5 * t.sin(), 0.93 + 0.1 * (3.0 * t).sin(), 0.3 * t];
                }
                Some(par) => {
                    glob[j] = mul(&glob[par], &local);
                    let off = [
                        REST[j][0] - REST[par][0],
                        REST[j][1] - REST[par][1],
                        REST[j][2] - REST[par][2],
                    ];
                    let d = apply(&glob[par], off);
                    p[j] = [p[par][0] + d[0], p[par][1] + d[1], p[par][2] + d[2]];
                }
            }
        }
        for q in p {
            pos.extend(q.iter().map(|&v| v as f32));
        }
    }
    Motion::new(pos, 60.0).unwrap()
}
