//! Conversion of official `.pt` checkpoints to safetensors (f32, f16 or bf16), after the
//! architecture detection and key audit.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use sha2::{Digest, Sha256};

use super::{load_on, save_safetensors, CheckpointError, SafetensorsWriteOptions};
use crate::arch::{
    inspect_state_dict, resolve_n_head_for, ArchError, Audit, DetectedArch, ModelKind,
};

/// Errors of [`convert_checkpoint`].
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: {source}", path.display())]
    Arch { path: PathBuf, source: ArchError },
    #[error("{}: is a {found} checkpoint, expected {expected} (are the GPT and VQ-VAE files swapped?)", path.display())]
    WrongKind {
        path: PathBuf,
        expected: ModelKind,
        found: ModelKind,
    },
    #[error("unsupported output dtype {0:?}: use f32, f16 or bf16")]
    Dtype(DType),
}

/// What a conversion did.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub source: PathBuf,
    pub output: PathBuf,
    pub kind: ModelKind,
    pub arch: DetectedArch,
    pub audit: Audit,
    pub n_tensors: usize,
    pub source_sha256: String,
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Name of a dtype in metadata and on the command line.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// Loads `src` (a `.pt` or safetensors checkpoint), detects and audits it (a missing or
/// mis-shaped key is an error), and writes every tensor (keys without `module.`) to `dst` as
/// safetensors, floating-point tensors in `dtype`. Non-tensor placeholders are dropped. The
/// metadata holds `kind`, `architecture` (JSON), `n_head`, `source_file`, `source_sha256`,
/// `dtype`, `epoch` and `config` (JSON). The write is atomic and refuses to replace `dst`
/// unless `force`.
pub fn convert_checkpoint(
    src: &Path,
    dst: &Path,
    expected: Option<ModelKind>,
    dtype: DType,
    n_head: Option<usize>,
    force: bool,
) -> Result<ConvertReport, ConvertError> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ConvertError::Dtype(dtype));
    }
    if dst.exists() && !force {
        return Err(CheckpointError::Write {
            path: dst.to_path_buf(),
            msg: "already exists; pass --force to overwrite".into(),
        }
        .into());
    }
    let sd = load_on(src, &Device::Cpu, dtype)?;
    let arch_err = |source| ConvertError::Arch {
        path: src.to_path_buf(),
        source,
    };
    let (kind, arch, audit) = inspect_state_dict(&sd, n_head).map_err(arch_err)?;
    if let Some(e) = expected {
        if e != kind {
            return Err(ConvertError::WrongKind {
                path: src.to_path_buf(),
                expected: e,
                found: kind,
            });
        }
    }
    let Some(arch) = arch else {
        return Err(ConvertError::WrongKind {
            path: src.to_path_buf(),
            expected: expected.unwrap_or(ModelKind::Gpt),
            found: kind,
        });
    };
    let audit = audit.into_result().map_err(arch_err)?;
    let sha = sha256_file(src)?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("kind".to_string(), kind.to_string());
    meta.insert(
        "architecture".to_string(),
        serde_json::to_string(&arch).unwrap_or_default(),
    );
    if let DetectedArch::Gpt(g) = &arch {
        meta.insert("n_head".to_string(), g.n_head.to_string());
        let (_, source) = resolve_n_head_for(&sd, n_head);
        meta.insert(
            "n_head_source".to_string(),
            serde_json::to_value(source)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        );
    }
    meta.insert(
        "source_file".to_string(),
        src.file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    meta.insert("source_sha256".to_string(), sha.clone());
    meta.insert("dtype".to_string(), dtype_name(dtype).to_string());
    if let Some(e) = sd.epoch {
        meta.insert("epoch".to_string(), e.to_string());
    }
    if let Some(c) = &sd.config {
        meta.insert("config".to_string(), c.to_json().to_string());
    }
    meta.insert(
        "converter".to_string(),
        format!("danceba-model {}", env!("CARGO_PKG_VERSION")),
    );
    save_safetensors(dst, &sd.tensors, &meta, &SafetensorsWriteOptions { force })?;
    Ok(ConvertReport {
        source: src.to_path_buf(),
        output: dst.to_path_buf(),
        kind,
        arch,
        audit,
        n_tensors: sd.tensors.len(),
        source_sha256: sha,
    })
}
