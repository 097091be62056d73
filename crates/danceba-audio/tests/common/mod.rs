#![allow(dead_code)]
//! Shared helpers for the golden tests.

use std::path::PathBuf;

pub fn golden_dir() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

pub struct Golden {
    pub name: String,
    bytes: Vec<u8>,
}

impl Golden {
    pub fn tensor(&self, key: &str) -> (Vec<usize>, Vec<f64>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("golden safetensors");
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("{}: no key {key}", self.name));
        let data: Vec<f64> = match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            safetensors::Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            d => panic!("unexpected dtype {d:?}"),
        };
        (t.shape().to_vec(), data)
    }
    pub fn f32(&self, key: &str) -> Vec<f32> {
        self.tensor(key).1.iter().map(|&v| v as f32).collect()
    }
    pub fn source(&self) -> String {
        let (_, meta) = safetensors::SafeTensors::read_metadata(&self.bytes).expect("metadata");
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("source").cloned())
            .expect("source in metadata")
    }
}

/// Every golden feature file (sorted by name).
pub fn goldens() -> Vec<Golden> {
    let dir = golden_dir().join("features");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("golden dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".features.safetensors"))
        .collect();
    entries.sort();
    assert!(
        !entries.is_empty(),
        "no golden feature files in {}",
        dir.display()
    );
    entries
        .into_iter()
        .map(|p| Golden {
            name: p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace(".features.safetensors", ""),
            bytes: std::fs::read(&p).unwrap(),
        })
        .collect()
}

/// (max abs error, max abs of reference)
pub fn err(ours: &[f64], golden: &[f64]) -> (f64, f64) {
    assert_eq!(ours.len(), golden.len(), "length mismatch");
    let mut e = 0.0f64;
    let mut m = 0.0f64;
    for (a, b) in ours.iter().zip(golden) {
        e = e.max((a - b).abs());
        m = m.max(b.abs());
    }
    (e, m)
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}
