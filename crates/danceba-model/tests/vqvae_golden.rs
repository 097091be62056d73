//! Parity of the VQ-VAE against the golden outputs of the official code
//! (`golden/model/*.pipeline.safetensors`, `vqvae_roundtrip.safetensors`).

use std::path::PathBuf;

use candle_core::{DType, Device};
use danceba_model::arch::VqVaeArch;
use danceba_model::checkpoint;
use danceba_model::vqvae::{VqVae, VqVaeError};

fn golden_dir() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

fn load_model() -> VqVae {
    let sd =
        checkpoint::load(&golden_dir().join("model/tiny_vqvae.pt")).expect("load tiny_vqvae.pt");
    let arch = VqVaeArch::detect(&sd.shapes(), sd.config.as_ref()).expect("detect VQ-VAE sizes");
    assert!(arch.has_encoders);
    VqVae::load(sd.var_builder(DType::F32, &Device::Cpu), &arch).expect("build vqvae")
}

#[test]
fn missing_or_misshaped_weights_are_errors() {
    let sd = checkpoint::load(&golden_dir().join("model/tiny_vqvae.pt")).unwrap();
    let mut arch = VqVaeArch::detect(&sd.shapes(), sd.config.as_ref()).unwrap();
    // Without encoders it still decodes, and encoding is a clear error.
    arch.has_encoders = false;
    let m = VqVae::load(sd.var_builder(DType::F32, &Device::Cpu), &arch).unwrap();
    assert!(m.decode(&[1, 2], &[3, 4]).is_ok());
    assert!(matches!(
        m.encode(&[0.0; 72 * 8], 8),
        Err(VqVaeError::NoEncoder)
    ));
    // Wrong sizes: a shape mismatch error, not a panic.
    let mut wrong = arch.clone();
    wrong.width = 48;
    assert!(VqVae::load(sd.var_builder(DType::F32, &Device::Cpu), &wrong).is_err());
    let mut layout = arch.clone();
    layout.up_channels = 39;
    assert!(matches!(
        VqVae::load(sd.var_builder(DType::F32, &Device::Cpu), &layout),
        Err(VqVaeError::UnsupportedLayout { .. })
    ));
    let mut tensors: std::collections::HashMap<_, _> = sd.tensors.clone().into_iter().collect();
    tensors.remove("vqvae_down.decoders_root.0.out.bias");
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let e = VqVae::load(vb, &arch).unwrap_err().to_string();
    assert!(e.contains("decoders_root.0.out.bias"), "{e}");
}

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(path: &std::path::Path) -> Self {
        Self {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }
    fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (t.shape().to_vec(), v)
    }
    fn tokens(&self, key: &str) -> Vec<u32> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::I64, "{key}");
        t.data()
            .chunks_exact(8)
            .map(|c| {
                let v = i64::from_le_bytes(c.try_into().unwrap());
                u32::try_from(v).unwrap()
            })
            .collect()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn pipeline_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(golden_dir().join("model"))
        .expect("golden/model")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".pipeline.safetensors"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no golden pipeline files");
    v
}

#[test]
fn decode_matches_golden_pose_decoded() {
    let model = load_model();
    for path in pipeline_files() {
        let g = Golden::open(&path);
        let up = g.tokens("tokens_up");
        let down = g.tokens("tokens_down");
        let (shape, want) = g.f32("pose_decoded");
        let got = model.decode(&up, &down).unwrap();
        assert_eq!(shape, vec![1, 8 * up.len(), 72]);
        let err = max_abs_diff(&got, &want);
        eprintln!("{}: pose_decoded max abs err {err:e}", path.display());
        assert!(err < 1e-4, "{}: {err}", path.display());
    }
}

#[test]
fn tokens_to_absolute_motion_match_golden() {
    use danceba_motion::motion::root_integrated;
    let model = load_model();
    for path in pipeline_files() {
        let g = Golden::open(&path);
        let decoded = model
            .decode(&g.tokens("tokens_up"), &g.tokens("tokens_down"))
            .unwrap();
        let integrated = root_integrated(&decoded).unwrap();
        let motion = danceba_motion::Motion::from_decoded(&decoded, 60.0).unwrap();
        let (_, want_int) = g.f32("pose_root_integrated");
        let (_, want_abs) = g.f32("pose_absolute");
        let e1 = max_abs_diff(&integrated, &want_int);
        let e2 = max_abs_diff(&motion.positions, &want_abs);
        eprintln!(
            "{}: root_integrated {e1:e}, absolute {e2:e}",
            path.display()
        );
        assert!(e1 < 1e-4 && e2 < 1e-4, "{e1} {e2}");
    }
}

#[test]
fn encode_matches_golden_tokens() {
    let model = load_model();
    let g = Golden::open(&golden_dir().join("model/vqvae_roundtrip.safetensors"));
    let (shape, motion) = g.f32("motion_root_relative");
    let (up, down) = model.encode(&motion, shape[1]).unwrap();
    assert_eq!(up, g.tokens("tokens_up"));
    assert_eq!(down, g.tokens("tokens_down"));
}

#[test]
fn chunked_decode_is_identical() {
    let model = load_model();
    let path = &pipeline_files()[0];
    let g = Golden::open(path);
    let up = g.tokens("tokens_up");
    let down = g.tokens("tokens_down");
    let whole = model.decode(&up, &down).unwrap();
    eprintln!("halo {} tokens", model.decoder_halo_tokens());
    for chunk in [1, 7, 16, 40, 64, up.len() - 1, up.len() + 3] {
        let parts = model.decode_chunked(&up, &down, chunk).unwrap();
        let err = max_abs_diff(&whole, &parts);
        eprintln!("chunk {chunk}: max abs diff {err:e}");
        assert_eq!(whole, parts, "chunk {chunk}");
    }
}

#[test]
fn bad_tokens_are_clear_errors() {
    let model = load_model();
    assert!(matches!(
        model.decode(&[1, 512], &[3, 4]),
        Err(VqVaeError::BadToken {
            stream: "up",
            index: 1,
            id: 512,
            ..
        })
    ));
    assert!(matches!(
        model.decode(&[1, 2], &[3, u32::MAX]),
        Err(VqVaeError::BadToken {
            stream: "down",
            index: 1,
            ..
        })
    ));
    assert!(matches!(
        model.decode(&[], &[]),
        Err(VqVaeError::EmptyTokens { .. })
    ));
    assert!(matches!(
        model.decode(&[1, 2, 3], &[1, 2]),
        Err(VqVaeError::LengthMismatch { up: 3, down: 2 })
    ));
    assert!(matches!(
        model.decode_chunked(&[1], &[1], 0),
        Err(VqVaeError::BadChunk)
    ));
    let msg = model.decode(&[600], &[1]).unwrap_err().to_string();
    assert!(msg.contains("600") && msg.contains("512"), "{msg}");
    assert!(matches!(
        model.encode(&[0.0; 72 * 7], 7),
        Err(VqVaeError::BadMotion { .. })
    ));
    assert!(matches!(
        model.encode(&[0.0; 72 * 8], 9),
        Err(VqVaeError::BadMotion { .. })
    ));
    let mut nan = vec![0.0; 72 * 8];
    nan[100] = f32::NAN;
    assert!(matches!(
        model.encode(&nan, 8),
        Err(VqVaeError::NotFinite { index: 100, .. })
    ));
}
