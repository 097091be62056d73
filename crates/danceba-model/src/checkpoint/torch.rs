//! The torch zip container: `<prefix>/data.pkl`, `<prefix>/data/<key>`, `<prefix>/byteorder`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pickle::unpickle;
use super::value::{PyValue, StorageDtype, TensorRecord};
use super::zipfile::Archive;
use super::{strip_module_prefix, CheckpointError, StateDict};

/// A tensor whose materialised size exceeds its storage (stride-0 views) is refused above this.
const MAX_EXPANDED_BYTES: u64 = 256 << 20;

pub(crate) fn load_torch(
    path: &Path,
    data: &[u8],
    device: &Device,
    dtype: DType,
    keep: &dyn Fn(&str) -> bool,
    release: &dyn Fn(usize, usize),
) -> Result<StateDict, CheckpointError> {
    let p = || path.to_path_buf();
    let archive =
        Archive::parse(data).map_err(|source| CheckpointError::Zip { path: p(), source })?;
    let pkl = archive
        .entries
        .iter()
        .filter(|e| e.name.ends_with("data.pkl"))
        .min_by_key(|e| e.name.len())
        .ok_or_else(|| CheckpointError::MissingEntry {
            path: p(),
            what: "data.pkl entry".into(),
        })?;
    let prefix = pkl.name.trim_end_matches("data.pkl").to_string();
    let pickle_bytes =
        Archive::read(data, pkl).map_err(|source| CheckpointError::Zip { path: p(), source })?;
    let big_endian = match archive.find(&format!("{prefix}byteorder")) {
        Some(e) => {
            let b = Archive::read(data, e)
                .map_err(|source| CheckpointError::Zip { path: p(), source })?;
            match &b[..] {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(CheckpointError::NotACheckpoint {
                        path: p(),
                        detail: format!("unknown byteorder {:?}", String::from_utf8_lossy(other)),
                    })
                }
            }
        }
        None => false,
    };
    let root =
        unpickle(&pickle_bytes).map_err(|source| CheckpointError::Pickle { path: p(), source })?;
    drop(pickle_bytes);

    let (model, config, epoch) = find_state_dict(path, &root)?;

    let mut tensors = BTreeMap::new();
    let mut source_dtypes = BTreeMap::new();
    let mut ignored = Vec::new();
    let mut skipped = BTreeMap::new();
    for (k, v) in model.entries() {
        let key = match k {
            PyValue::Str(s) => strip_module_prefix(s).to_string(),
            other => {
                ignored.push(format!("{other:?}"));
                continue;
            }
        };
        let PyValue::Tensor(rec) = v else {
            ignored.push(key);
            continue;
        };
        if !keep(&key) {
            let shape = rec.shape.iter().map(|&d| d as usize).collect();
            if skipped.insert(key.clone(), shape).is_some() {
                return Err(CheckpointError::BadTensor {
                    path: p(),
                    key,
                    msg: "appears twice (with and without the `module.` prefix?)".into(),
                });
            }
            continue;
        }
        let entry_name = format!("{prefix}data/{}", rec.storage_key);
        let entry = archive
            .find(&entry_name)
            .ok_or_else(|| CheckpointError::BadTensor {
                path: p(),
                key: key.clone(),
                msg: format!("its storage {entry_name} is missing from the archive"),
            })?;
        let storage = Archive::read(data, entry)
            .map_err(|source| CheckpointError::Zip { path: p(), source })?;
        let t =
            materialise(&storage, rec, big_endian).map_err(|msg| CheckpointError::BadTensor {
                path: p(),
                key: key.clone(),
                msg,
            })?;
        let t = if rec.dtype.is_float() && t.dtype() != dtype {
            t.to_dtype(dtype)?
        } else {
            t
        };
        let t = t.to_device(device)?;
        if let Ok(r) = Archive::data_range(data, entry) {
            release(r.start, r.len());
        }
        source_dtypes.insert(key.clone(), rec.dtype.torch_name().to_string());
        if tensors.insert(key.clone(), t).is_some() {
            return Err(CheckpointError::BadTensor {
                path: p(),
                key,
                msg: "appears twice (with and without the `module.` prefix?)".into(),
            });
        }
    }
    Ok(StateDict {
        tensors,
        config,
        epoch,
        ignored,
        source_dtypes,
        skipped,
        metadata: BTreeMap::new(),
        source: p(),
    })
}

fn find_state_dict<'a>(
    path: &Path,
    root: &'a PyValue,
) -> Result<(&'a PyValue, Option<PyValue>, Option<i64>), CheckpointError> {
    if !root.is_dict_like() {
        return Err(CheckpointError::NoStateDict {
            path: path.to_path_buf(),
            detail: format!(
                "the pickled object is {}, not a dict",
                match root {
                    PyValue::Object { class, .. } => class.clone(),
                    PyValue::None => "None".into(),
                    PyValue::Bool(_) => "a bool".into(),
                    PyValue::Int(_) | PyValue::BigInt(_) => "an int".into(),
                    PyValue::Float(_) => "a float".into(),
                    PyValue::Str(_) => "a str".into(),
                    PyValue::Bytes(_) => "bytes".into(),
                    PyValue::List(_) => "a list".into(),
                    PyValue::Tuple(_) => "a tuple".into(),
                    PyValue::Set(_) => "a set".into(),
                    PyValue::Global { module, name } => format!("the global {module}.{name}"),
                    PyValue::Storage { .. } => "a storage".into(),
                    PyValue::Tensor(_) => "a single tensor".into(),
                    PyValue::Dict(_) => "an unusable dict".into(),
                }
            ),
        });
    }
    for name in ["model", "state_dict", "model_state_dict"] {
        if let Some(m) = root.get(name) {
            if m.is_dict_like() || matches!(m, PyValue::Dict(_)) {
                let config = root.get("config").cloned();
                let epoch = root.get("epoch").and_then(|e| e.as_i64());
                return Ok((m, config, epoch));
            }
        }
    }
    if root
        .entries()
        .iter()
        .any(|(_, v)| matches!(v, PyValue::Tensor(_)))
    {
        return Ok((root, None, None));
    }
    let keys: Vec<String> = root
        .entries()
        .iter()
        .take(10)
        .map(|(k, _)| k.as_str().map(str::to_string).unwrap_or_else(|| "?".into()))
        .collect();
    Err(CheckpointError::NoStateDict {
        path: path.to_path_buf(),
        detail: format!("no 'model' entry and no tensors; top-level keys: {keys:?}"),
    })
}

fn candle_dtype(d: StorageDtype) -> DType {
    match d {
        StorageDtype::F32 => DType::F32,
        StorageDtype::F16 => DType::F16,
        StorageDtype::BF16 => DType::BF16,
        StorageDtype::F64 => DType::F64,
        StorageDtype::I64 => DType::I64,
        StorageDtype::I32 => DType::I32,
        StorageDtype::I16 => DType::I16,
        StorageDtype::I8 => DType::I16,
        StorageDtype::U8 | StorageDtype::Bool => DType::U8,
    }
}

/// Copies a (possibly strided, offset, shared) view out of its storage bytes into a CPU tensor.
pub(crate) fn materialise(
    storage: &[u8],
    rec: &TensorRecord,
    big_endian: bool,
) -> Result<Tensor, String> {
    let elem = rec.dtype.size() as u64;
    let have = storage.len() as u64 / elem;
    if rec.storage_numel > have {
        return Err(format!(
            "storage {} declares {} elements but holds only {} bytes (truncated?)",
            rec.storage_key,
            rec.storage_numel,
            storage.len()
        ));
    }
    let mut numel: u64 = 1;
    for &d in &rec.shape {
        numel = numel
            .checked_mul(d)
            .ok_or_else(|| format!("absurd shape {:?}: element count overflows", rec.shape))?;
    }
    let shape: Vec<usize> = rec
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("absurd shape {:?}", rec.shape)))
        .collect::<Result<_, _>>()?;
    let nbytes = numel
        .checked_mul(elem)
        .ok_or_else(|| format!("absurd shape {:?}: byte count overflows", rec.shape))?;
    if numel > 0 {
        let mut last = rec.offset;
        for (&d, &s) in rec.shape.iter().zip(&rec.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| {
                    format!(
                        "absurd shape/stride {:?}/{:?}: overflow",
                        rec.shape, rec.stride
                    )
                })?;
        }
        if last >= rec.storage_numel {
            return Err(format!(
                "view (offset {}, shape {:?}, stride {:?}) reaches element {last}, past the end of its storage of {} elements",
                rec.offset, rec.shape, rec.stride, rec.storage_numel
            ));
        }
        if nbytes > storage.len() as u64 && nbytes > MAX_EXPANDED_BYTES {
            return Err(format!(
                "expanded view of shape {:?} would need {nbytes} bytes from a storage of {} bytes",
                rec.shape,
                storage.len()
            ));
        }
    }
    let elem = elem as usize;
    let numel = numel as usize;
    let mut contiguous = true;
    let mut expect: u64 = 1;
    for (&d, &s) in rec.shape.iter().zip(&rec.stride).rev() {
        if d != 1 && s != expect {
            contiguous = false;
            break;
        }
        expect = expect.saturating_mul(d);
    }
    let start = rec.offset as usize * elem;
    let mut owned: Vec<u8>;
    let bytes: &[u8] = if numel == 0 {
        &[]
    } else if contiguous && !big_endian {
        storage
            .get(start..start + numel * elem)
            .ok_or_else(|| "view past the end of its storage".to_string())?
    } else {
        owned = if contiguous {
            storage
                .get(start..start + numel * elem)
                .ok_or_else(|| "view past the end of its storage".to_string())?
                .to_vec()
        } else {
            gather(storage, rec, elem, numel)?
        };
        if big_endian && elem > 1 {
            for c in owned.chunks_exact_mut(elem) {
                c.reverse();
            }
        }
        &owned
    };
    let t = match rec.dtype {
        StorageDtype::I8 => {
            let v: Vec<i16> = bytes.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)
        }
        StorageDtype::Bool => {
            let v: Vec<u8> = bytes.iter().map(|&b| u8::from(b != 0)).collect();
            Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)
        }
        d => Tensor::from_raw_buffer(bytes, candle_dtype(d), &shape, &Device::Cpu),
    };
    t.map_err(|e| e.to_string())
}

fn gather(
    storage: &[u8],
    rec: &TensorRecord,
    elem: usize,
    numel: usize,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(numel * elem);
    let nd = rec.shape.len();
    let mut idx = vec![0u64; nd];
    for _ in 0..numel {
        let off = rec.offset + idx.iter().zip(&rec.stride).map(|(i, s)| i * s).sum::<u64>();
        let b = off as usize * elem;
        out.extend_from_slice(
            storage
                .get(b..b + elem)
                .ok_or_else(|| "view past the end of its storage".to_string())?,
        );
        for k in (0..nd).rev() {
            idx[k] += 1;
            if idx[k] < rec.shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Ok(out)
}
