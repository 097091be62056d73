//! safetensors reading (memory-mapped) and atomic writing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors};

use super::value::PyValue;
use super::{CheckpointError, StateDict};

pub(crate) fn load_safetensors(
    path: &Path,
    data: &[u8],
    device: &Device,
    dtype: DType,
    keep: &dyn Fn(&str) -> bool,
    release: &dyn Fn(usize, usize),
) -> Result<StateDict, CheckpointError> {
    let p = || path.to_path_buf();
    let st = SafeTensors::deserialize(data).map_err(|e| CheckpointError::Safetensors {
        path: p(),
        msg: e.to_string(),
    })?;
    let (_, meta) = SafeTensors::read_metadata(data).map_err(|e| CheckpointError::Safetensors {
        path: p(),
        msg: e.to_string(),
    })?;
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut tensors = BTreeMap::new();
    let mut source_dtypes = BTreeMap::new();
    let mut skipped = BTreeMap::new();
    for (name, view) in st.iter() {
        let key = super::strip_module_prefix(name);
        if !keep(key) {
            skipped.insert(key.to_string(), view.shape().to_vec());
            continue;
        }
        let (cd, tname, is_float) = match view.dtype() {
            StDtype::F32 => (DType::F32, "float32", true),
            StDtype::F16 => (DType::F16, "float16", true),
            StDtype::BF16 => (DType::BF16, "bfloat16", true),
            StDtype::F64 => (DType::F64, "float64", true),
            StDtype::I64 => (DType::I64, "int64", false),
            StDtype::I32 => (DType::I32, "int32", false),
            StDtype::I16 => (DType::I16, "int16", false),
            StDtype::U8 => (DType::U8, "uint8", false),
            StDtype::BOOL => (DType::U8, "bool", false),
            StDtype::U32 => (DType::U32, "uint32", false),
            other => {
                return Err(CheckpointError::BadTensor {
                    path: p(),
                    key: name.to_string(),
                    msg: format!("unsupported safetensors dtype {other:?}"),
                })
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), cd, view.shape(), &Device::Cpu)?;
        let t = if is_float && cd != dtype {
            t.to_dtype(dtype)?
        } else {
            t
        };
        let t = t.to_device(device)?;
        let start = (view.data().as_ptr() as usize).saturating_sub(data.as_ptr() as usize);
        release(start, view.data().len());
        let key = super::strip_module_prefix(name).to_string();
        source_dtypes.insert(key.clone(), tname.to_string());
        tensors.insert(key, t);
    }
    let config = metadata
        .get("config")
        .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        .map(|j| PyValue::from_json(&j));
    let epoch = metadata.get("epoch").and_then(|s| s.parse().ok());
    Ok(StateDict {
        tensors,
        config,
        epoch,
        ignored: Vec::new(),
        source_dtypes,
        skipped,
        metadata,
        source: p(),
    })
}

/// Options of [`save_safetensors`].
#[derive(Clone, Debug, Default)]
pub struct SafetensorsWriteOptions {
    /// Replace an existing file.
    pub force: bool,
}

/// Writes tensors and string metadata to `path` atomically (temporary file in the same
/// directory, then rename). Refuses to replace an existing file unless `opts.force`.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
    opts: &SafetensorsWriteOptions,
) -> Result<(), CheckpointError> {
    let p = || path.to_path_buf();
    if path.exists() && !opts.force {
        return Err(CheckpointError::Write {
            path: p(),
            msg: "already exists; pass --force to overwrite".into(),
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if path.file_name().is_none() {
        return Err(CheckpointError::Write {
            path: p(),
            msg: "not a file path".into(),
        });
    }
    // not named after the output: a name near the 255-byte limit would push it over
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".danceba-{}.{serial}.safetensors.tmp",
        std::process::id()
    ));
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_, candle_core::Error>>()?;
    let result = safetensors::serialize_to_file(cpu, Some(meta), &tmp)
        .map_err(|e| CheckpointError::Write {
            path: p(),
            msg: e.to_string(),
        })
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|source| CheckpointError::Io {
                    path: tmp.clone(),
                    source,
                })
        })
        .and_then(|()| {
            // safetensors writes through an owner-only (0600) temporary file: give the result
            // the permissions of a plainly created file (0666 under the umask)
            if let Some(perm) = created_file_permissions(&dir) {
                let _ = std::fs::set_permissions(&tmp, perm);
            }
            std::fs::rename(&tmp, path).map_err(|source| CheckpointError::Io { path: p(), source })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The permissions `File::create` gives a new file in `dir` (0666 filtered by the process's
/// umask), found by creating and removing a probe file; `None` if that fails.
fn created_file_permissions(dir: &std::path::Path) -> Option<std::fs::Permissions> {
    let probe = dir.join(format!(".danceba-perm-probe.{}", std::process::id()));
    let perm = std::fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions())
        .ok();
    let _ = std::fs::remove_file(&probe);
    perm
}
