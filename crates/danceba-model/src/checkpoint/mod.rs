//! Torch `.pt` (zip + pickle) and safetensors checkpoint reading, and safetensors writing.
//!
//! The torch reader is our own: a bounds-checked zip parser over a memory map, and a pickle
//! virtual machine that never executes anything (see [`pickle`]). Every global other than the
//! few torch/collections callables it knows becomes an inert placeholder, so the official
//! checkpoints, which pickle an `easydict.EasyDict` and (in older files) never-materialised
//! `UninitializedParameter`s beside the state dict, load without Python.

pub mod convert;
pub mod pickle;
mod safetensors_io;
mod torch;
pub mod value;
pub mod writer;
pub mod zipfile;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use convert::{convert_checkpoint, sha256_file, ConvertError, ConvertReport};
pub use pickle::PickleError;
pub use safetensors_io::{save_safetensors, SafetensorsWriteOptions};
pub use value::{PyValue, StorageDtype, TensorRecord};
pub use zipfile::ZipError;

/// Key → shape map (keys without the `module.` prefix).
pub type ShapeMap = BTreeMap<String, Vec<usize>>;

/// Errors of checkpoint reading and writing.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is empty (0 bytes): not a checkpoint; download it again", path.display())]
    Empty { path: PathBuf },
    #[error("{} is not a checkpoint: it is neither a torch zip archive (.pt) nor a safetensors file ({detail})", path.display())]
    NotACheckpoint { path: PathBuf, detail: String },
    #[error("{} uses the legacy (pre-1.6) torch serialization format, which is not supported; re-save it with torch>=1.6", path.display())]
    LegacyFormat { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Zip { path: PathBuf, source: ZipError },
    #[error("{}: corrupt pickle: {source}", path.display())]
    Pickle { path: PathBuf, source: PickleError },
    #[error("{}: the archive has no {what} (truncated or not a torch checkpoint)", path.display())]
    MissingEntry { path: PathBuf, what: String },
    #[error("{}: tensor {key}: {msg}", path.display())]
    BadTensor {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{}: no state dict found ({detail})", path.display())]
    NoStateDict { path: PathBuf, detail: String },
    #[error("{}: invalid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Write { path: PathBuf, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A loaded checkpoint: the model's tensors plus what was saved beside them.
#[derive(Debug, Clone)]
pub struct StateDict {
    /// Tensors by key, without the `module.` prefix, on the requested device. Floating-point
    /// tensors have the requested dtype; integer and bool tensors keep their own (i64, u8, ...).
    pub tensors: BTreeMap<String, Tensor>,
    /// The pickled config (an EasyDict for the official `.pt` files) as an inert value tree;
    /// for converted safetensors files, rebuilt from the metadata.
    pub config: Option<PyValue>,
    /// The saved epoch, if any.
    pub epoch: Option<i64>,
    /// State-dict entries that were not tensors (e.g. `UninitializedParameter` placeholders), by
    /// key without the `module.` prefix.
    pub ignored: Vec<String>,
    /// The dtype each tensor had in the file (`float32`, `int64`, ...), by key.
    pub source_dtypes: BTreeMap<String, String>,
    /// Tensors left unread by the key filter of [`load_on_filtered`], with their shapes, by key
    /// without the `module.` prefix (empty for [`load_on`]).
    pub skipped: BTreeMap<String, Vec<usize>>,
    /// safetensors metadata (empty for `.pt` files).
    pub metadata: BTreeMap<String, String>,
    /// The file it came from.
    pub source: PathBuf,
}

/// Whether a floating-point tensor holds a NaN or an infinity (false for other dtypes). On the
/// CPU it scans the values in place; elsewhere it reduces `t − t` (NaN exactly where `t` is not
/// finite) on the device.
pub fn has_non_finite(t: &Tensor) -> candle_core::Result<bool> {
    use candle_core::{CpuStorage, Storage};
    use rayon::prelude::*;
    fn any_in<T: Copy + Sync>(v: &[T], bad: impl Fn(T) -> bool + Sync) -> bool {
        // a branch-free fold within each chunk, which vectorises (`any` stops at each value)
        v.par_chunks(1 << 16)
            .any(|c| c.iter().fold(false, |found, &x| found | bad(x)))
    }
    if !t.dtype().is_float() {
        return Ok(false);
    }
    if t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        let range = layout.start_offset()..layout.start_offset() + t.elem_count();
        if let Storage::Cpu(cpu) = &*storage {
            return Ok(match cpu {
                CpuStorage::F32(v) => any_in(&v[range], |x| !x.is_finite()),
                CpuStorage::F16(v) => any_in(&v[range], |x| !x.is_finite()),
                CpuStorage::BF16(v) => any_in(&v[range], |x| !x.is_finite()),
                CpuStorage::F64(v) => any_in(&v[range], |x| !x.is_finite()),
                _ => false,
            });
        }
    }
    let v = t.flatten_all()?.to_dtype(DType::F32)?;
    // `x − x` is NaN exactly where x is not finite
    Ok(v.broadcast_sub(&v)?.sum_all()?.to_scalar::<f32>()?.is_nan())
}

/// Which container a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    TorchZip,
    Safetensors,
}

/// Loads a `.pt` or safetensors checkpoint (sniffed by content) as f32 on the CPU.
pub fn load(path: &Path) -> Result<StateDict, CheckpointError> {
    load_on(path, &Device::Cpu, DType::F32)
}

/// Loads a checkpoint onto `device`, converting floating-point tensors to `dtype`.
pub fn load_on(path: &Path, device: &Device, dtype: DType) -> Result<StateDict, CheckpointError> {
    load_on_filtered(path, device, dtype, &|_| true)
}

/// Like [`load_on`], but reads only the tensors whose key (without `module.`) passes `keep`; the
/// others are never copied out of the file and are listed with their shapes in
/// [`StateDict::skipped`] (e.g. the VQ-VAE encoders, which decoding does not need).
pub fn load_on_filtered(
    path: &Path,
    device: &Device,
    dtype: DType,
    keep: &dyn Fn(&str) -> bool,
) -> Result<StateDict, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        return Err(CheckpointError::NotACheckpoint {
            path: path.to_path_buf(),
            detail: "it is a directory".into(),
        });
    }
    if meta.len() == 0 {
        return Err(CheckpointError::Empty {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: the file is mapped read-only; we never create references that outlive the
    // mapping, and a file truncated by another process while mapped is outside what any reader
    // can guard against (the same contract as candle's and safetensors' mmap loaders).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // Once a storage is copied out, hand its pages back to the page cache so that peak
    // memory stays near one copy of the model (file pages count towards RSS).
    let release = |start: usize, len: usize| {
        #[cfg(unix)]
        // SAFETY: read-only file mapping: dropped pages are re-read from the file if
        // touched again, so no data is lost and no live reference is invalidated.
        unsafe {
            let _ = mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
        }
        #[cfg(not(unix))]
        let _ = (start, len);
    };
    match sniff(path, &mmap)? {
        FileFormat::TorchZip => torch::load_torch(path, &mmap, device, dtype, keep, &release),
        FileFormat::Safetensors => {
            safetensors_io::load_safetensors(path, &mmap, device, dtype, keep, &release)
        }
    }
}

/// Loads a checkpoint held in memory (same formats as [`load_on`]); `source` names it in errors.
pub fn load_from_bytes(
    data: &[u8],
    source: &Path,
    device: &Device,
    dtype: DType,
) -> Result<StateDict, CheckpointError> {
    match sniff(source, data)? {
        FileFormat::TorchZip => {
            torch::load_torch(source, data, device, dtype, &|_| true, &|_, _| {})
        }
        FileFormat::Safetensors => {
            safetensors_io::load_safetensors(source, data, device, dtype, &|_| true, &|_, _| {})
        }
    }
}

/// Decides the container of a file on disk from its first bytes.
pub fn sniff_file(path: &Path) -> Result<FileFormat, CheckpointError> {
    use std::io::Read;
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    // a device or a pipe is neither a checkpoint nor "empty" (its size reads 0)
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
        return Err(io(std::io::Error::other(
            "is not a regular file (a device or a pipe?): give a checkpoint file",
        )));
    }
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .map_err(io)?
        .take(16)
        .read_to_end(&mut head)
        .map_err(io)?;
    if head.len() >= 9 && head[8] == b'{' {
        // the header-length check needs the file size
        let len = std::fs::metadata(path).map_err(io)?.len();
        let mut n = [0u8; 8];
        n.copy_from_slice(&head[..8]);
        if u64::from_le_bytes(n) <= len.saturating_sub(8) {
            return Ok(FileFormat::Safetensors);
        }
    }
    sniff(path, &head)
}

/// Decides the container of a file from its first bytes.
pub fn sniff(path: &Path, data: &[u8]) -> Result<FileFormat, CheckpointError> {
    if data.is_empty() {
        return Err(CheckpointError::Empty {
            path: path.to_path_buf(),
        });
    }
    if data.starts_with(b"PK\x03\x04") || data.starts_with(b"PK\x05\x06") {
        return Ok(FileFormat::TorchZip);
    }
    if data.len() >= 9 {
        let mut n = [0u8; 8];
        n.copy_from_slice(&data[..8]);
        let n = u64::from_le_bytes(n);
        if data[8] == b'{' && n >= 2 && n <= (data.len() as u64 - 8) {
            return Ok(FileFormat::Safetensors);
        }
    }
    if data.starts_with(&[0x80, 0x02, 0x8a]) || data.starts_with(&[0x80, 0x02]) {
        return Err(CheckpointError::LegacyFormat {
            path: path.to_path_buf(),
        });
    }
    let head: Vec<String> = data.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let hint = if data.starts_with(b"RIFF") {
        " — it looks like a WAV audio file"
    } else if data.starts_with(b"<") {
        " — it looks like an HTML/XML page (a failed download?)"
    } else {
        ""
    };
    Err(CheckpointError::NotACheckpoint {
        path: path.to_path_buf(),
        detail: format!("first bytes {}{hint}", head.join(" ")),
    })
}

impl StateDict {
    /// A candle `VarBuilder` over these tensors (cloned handles; tensors are reference-counted).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
        let map: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        candle_nn::VarBuilder::from_tensors(map, dtype, device)
    }

    /// Key → shape map of the tensors.
    pub fn shapes(&self) -> ShapeMap {
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect()
    }

    /// A tensor by key (without `module.`), or an error naming it.
    pub fn get(&self, key: &str) -> Result<&Tensor, CheckpointError> {
        self.tensors
            .get(key)
            .ok_or_else(|| CheckpointError::BadTensor {
                path: self.source.clone(),
                key: key.to_string(),
                msg: "missing from the checkpoint".into(),
            })
    }
}

/// Strips the DataParallel `module.` prefix.
pub fn strip_module_prefix(key: &str) -> &str {
    key.strip_prefix("module.").unwrap_or(key)
}
