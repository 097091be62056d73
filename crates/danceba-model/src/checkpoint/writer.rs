//! A minimal writer of torch-format checkpoints (zip container + protocol-2 pickle), the inverse
//! of the reader. It exists to build test and benchmark inputs (including hostile ones) without
//! Python; the files it writes load in `torch.load(..., weights_only=False)`.

use std::io::Write;
use std::path::Path;

use super::value::StorageDtype;

/// A value to pickle. Mirrors what `torch.save` emits for a checkpoint dict.
#[derive(Clone, Debug)]
pub enum PickleWrite {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<PickleWrite>),
    Tuple(Vec<PickleWrite>),
    Dict(Vec<(PickleWrite, PickleWrite)>),
    /// `collections.OrderedDict` built by REDUCE, then SETITEMS.
    OrderedDict(Vec<(PickleWrite, PickleWrite)>),
    /// A global reference (`module`, `name`).
    Global(String, String),
    /// `callable(*args)` through REDUCE.
    Reduce(Box<PickleWrite>, Vec<PickleWrite>),
    /// An instance of a dict subclass (e.g. `easydict.EasyDict`): NEWOBJ, SETITEMS, BUILD with
    /// the same items as `__dict__`, as pickle protocol 2 writes it.
    DictObject {
        module: String,
        name: String,
        items: Vec<(PickleWrite, PickleWrite)>,
    },
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`,
    /// wrapped in `_rebuild_parameter` when `parameter`.
    Tensor {
        storage_key: String,
        dtype: StorageDtype,
        storage_numel: u64,
        offset: u64,
        shape: Vec<u64>,
        stride: Vec<u64>,
        parameter: bool,
    },
    /// Raw opcode bytes spliced in as they are (for hostile-input tests).
    Raw(Vec<u8>),
}

impl PickleWrite {
    pub fn str(s: &str) -> Self {
        PickleWrite::Str(s.to_string())
    }

    /// An `easydict.EasyDict` with string keys (the official checkpoints' config objects).
    pub fn easydict(items: Vec<(&str, PickleWrite)>) -> Self {
        PickleWrite::DictObject {
            module: "easydict".into(),
            name: "EasyDict".into(),
            items: items
                .into_iter()
                .map(|(k, v)| (PickleWrite::str(k), v))
                .collect(),
        }
    }

    /// A contiguous tensor over a whole storage.
    pub fn tensor(
        storage_key: &str,
        dtype: StorageDtype,
        shape: &[usize],
        parameter: bool,
    ) -> Self {
        let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let mut stride = vec![1u64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        PickleWrite::Tensor {
            storage_key: storage_key.to_string(),
            dtype,
            storage_numel: shape.iter().product(),
            offset: 0,
            shape,
            stride,
            parameter,
        }
    }
}

fn storage_class(d: StorageDtype) -> &'static str {
    match d {
        StorageDtype::F32 => "FloatStorage",
        StorageDtype::F16 => "HalfStorage",
        StorageDtype::BF16 => "BFloat16Storage",
        StorageDtype::F64 => "DoubleStorage",
        StorageDtype::I64 => "LongStorage",
        StorageDtype::I32 => "IntStorage",
        StorageDtype::I16 => "ShortStorage",
        StorageDtype::I8 => "CharStorage",
        StorageDtype::U8 => "ByteStorage",
        StorageDtype::Bool => "BoolStorage",
    }
}

/// Serialises a value as a protocol-2 pickle.
pub fn pickle_dumps(v: &PickleWrite) -> Vec<u8> {
    let mut out = vec![0x80, 2];
    emit(v, &mut out);
    out.push(b'.');
    out
}

fn emit_global(m: &str, n: &str, out: &mut Vec<u8>) {
    out.push(b'c');
    out.extend_from_slice(m.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(n.as_bytes());
    out.push(b'\n');
}

fn emit_items(items: &[(PickleWrite, PickleWrite)], out: &mut Vec<u8>) {
    if items.is_empty() {
        return;
    }
    out.push(b'(');
    for (k, v) in items {
        emit(k, out);
        emit(v, out);
    }
    out.push(b'u');
}

fn emit_tuple(items: &[PickleWrite], out: &mut Vec<u8>) {
    match items.len() {
        0 => out.push(b')'),
        1..=3 => {
            for i in items {
                emit(i, out);
            }
            out.push(0x84 + items.len() as u8);
        }
        _ => {
            out.push(b'(');
            for i in items {
                emit(i, out);
            }
            out.push(b't');
        }
    }
}

fn emit(v: &PickleWrite, out: &mut Vec<u8>) {
    match v {
        PickleWrite::None => out.push(b'N'),
        PickleWrite::Bool(true) => out.push(0x88),
        PickleWrite::Bool(false) => out.push(0x89),
        PickleWrite::Int(i) => {
            let i = *i;
            if (0..256).contains(&i) {
                out.push(b'K');
                out.push(i as u8);
            } else if (0..65536).contains(&i) {
                out.push(b'M');
                out.extend_from_slice(&(i as u16).to_le_bytes());
            } else if i32::try_from(i).is_ok() {
                out.push(b'J');
                out.extend_from_slice(&(i as i32).to_le_bytes());
            } else {
                out.push(0x8a);
                out.push(8);
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        PickleWrite::Float(f) => {
            out.push(b'G');
            out.extend_from_slice(&f.to_be_bytes());
        }
        PickleWrite::Str(s) => {
            out.push(b'X');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        PickleWrite::List(items) => {
            out.push(b']');
            if !items.is_empty() {
                out.push(b'(');
                for i in items {
                    emit(i, out);
                }
                out.push(b'e');
            }
        }
        PickleWrite::Tuple(items) => emit_tuple(items, out),
        PickleWrite::Dict(items) => {
            out.push(b'}');
            emit_items(items, out);
        }
        PickleWrite::OrderedDict(items) => {
            emit_global("collections", "OrderedDict", out);
            out.push(b')');
            out.push(b'R');
            emit_items(items, out);
        }
        PickleWrite::Global(m, n) => emit_global(m, n, out),
        PickleWrite::Reduce(f, args) => {
            emit(f, out);
            emit_tuple(args, out);
            out.push(b'R');
        }
        PickleWrite::DictObject {
            module,
            name,
            items,
        } => {
            emit_global(module, name, out);
            out.push(b')');
            out.push(0x81);
            emit_items(items, out);
            out.push(b'}');
            emit_items(items, out);
            out.push(b'b');
        }
        PickleWrite::Tensor {
            storage_key,
            dtype,
            storage_numel,
            offset,
            shape,
            stride,
            parameter,
        } => {
            if *parameter {
                emit_global("torch._utils", "_rebuild_parameter", out);
                out.push(b'(');
            }
            emit_global("torch._utils", "_rebuild_tensor_v2", out);
            out.push(b'(');
            // persistent id
            out.push(b'(');
            emit(&PickleWrite::str("storage"), out);
            emit_global("torch", storage_class(*dtype), out);
            emit(&PickleWrite::Str(storage_key.clone()), out);
            emit(&PickleWrite::str("cpu"), out);
            emit(&PickleWrite::Int(*storage_numel as i64), out);
            out.push(b't');
            out.push(b'Q');
            emit(&PickleWrite::Int(*offset as i64), out);
            let ints = |v: &[u64]| {
                v.iter()
                    .map(|&x| PickleWrite::Int(x as i64))
                    .collect::<Vec<_>>()
            };
            emit_tuple(&ints(shape), out);
            emit_tuple(&ints(stride), out);
            out.push(0x89);
            emit(&PickleWrite::OrderedDict(Vec::new()), out);
            out.push(b't');
            out.push(b'R');
            if *parameter {
                out.push(0x88);
                emit(&PickleWrite::OrderedDict(Vec::new()), out);
                out.push(b't');
                out.push(b'R');
            }
        }
        PickleWrite::Raw(b) => out.extend_from_slice(b),
    }
}

/// CRC-32 (IEEE) as zip requires.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// A streaming writer of stored (uncompressed) zip entries, data aligned to 64 bytes like
/// torch's writer. Archives must stay below 4 GiB (no zip64).
pub struct ZipStoreWriter<W: Write> {
    w: W,
    pos: u64,
    central: Vec<u8>,
    count: u64,
}

impl<W: Write> ZipStoreWriter<W> {
    pub fn new(w: W) -> Self {
        ZipStoreWriter {
            w,
            pos: 0,
            central: Vec::new(),
            count: 0,
        }
    }

    /// Appends one stored entry.
    pub fn add(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let too_big =
            || std::io::Error::other("archive exceeds 4 GiB (zip64 not supported by this writer)");
        let size = u32::try_from(data.len()).map_err(|_| too_big())?;
        let offset = u32::try_from(self.pos).map_err(|_| too_big())?;
        let crc = crc32(data);
        let header_len = 30 + name.len() as u64;
        let pad = (64 - (self.pos + header_len + 4) % 64) % 64;
        let mut h = Vec::with_capacity(30 + name.len() + 4 + pad as usize);
        h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        h.extend_from_slice(&20u16.to_le_bytes()); // version needed
        h.extend_from_slice(&0u16.to_le_bytes()); // flags
        h.extend_from_slice(&0u16.to_le_bytes()); // stored
        h.extend_from_slice(&0u16.to_le_bytes()); // time
        h.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        h.extend_from_slice(&crc.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&((4 + pad) as u16).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&0x4246u16.to_le_bytes()); // "FB" padding field, as torch
        h.extend_from_slice(&(pad as u16).to_le_bytes());
        h.resize(h.len() + pad as usize, b'Z');
        self.w.write_all(&h)?;
        self.w.write_all(data)?;
        self.pos += h.len() as u64 + data.len() as u64;

        let c = &mut self.central;
        c.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        c.extend_from_slice(&20u16.to_le_bytes()); // made by
        c.extend_from_slice(&20u16.to_le_bytes()); // needed
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes());
        c.extend_from_slice(&0x21u16.to_le_bytes());
        c.extend_from_slice(&crc.to_le_bytes());
        c.extend_from_slice(&size.to_le_bytes());
        c.extend_from_slice(&size.to_le_bytes());
        c.extend_from_slice(&(name.len() as u16).to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes()); // extra
        c.extend_from_slice(&0u16.to_le_bytes()); // comment
        c.extend_from_slice(&0u16.to_le_bytes()); // disk
        c.extend_from_slice(&0u16.to_le_bytes()); // internal attrs
        c.extend_from_slice(&0u32.to_le_bytes()); // external attrs
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        self.count += 1;
        Ok(())
    }

    /// Writes the central directory and returns the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        let too_big =
            || std::io::Error::other("archive exceeds 4 GiB (zip64 not supported by this writer)");
        let cd_off = u32::try_from(self.pos).map_err(|_| too_big())?;
        let cd_size = u32::try_from(self.central.len()).map_err(|_| too_big())?;
        let n =
            u16::try_from(self.count).map_err(|_| std::io::Error::other("too many zip entries"))?;
        self.w.write_all(&self.central)?;
        let mut e = Vec::with_capacity(22);
        e.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend_from_slice(&n.to_le_bytes());
        e.extend_from_slice(&n.to_le_bytes());
        e.extend_from_slice(&cd_size.to_le_bytes());
        e.extend_from_slice(&cd_off.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        self.w.write_all(&e)?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// Writes a torch-format checkpoint: `<archive>/data.pkl` (the given pickle), then each storage as
/// `<archive>/data/<key>` (little-endian bytes), `byteorder` and `version`, in torch's layout.
/// `storages` is consumed one at a time so large files need not be held in memory.
pub fn write_torch_zip<I>(
    path: &Path,
    archive: &str,
    pickle: &[u8],
    storages: I,
) -> std::io::Result<()>
where
    I: IntoIterator<Item = (String, Vec<u8>)>,
{
    let f = std::fs::File::create(path)?;
    let mut z = ZipStoreWriter::new(std::io::BufWriter::with_capacity(1 << 20, f));
    z.add(&format!("{archive}/data.pkl"), pickle)?;
    z.add(&format!("{archive}/.format_version"), b"1")?;
    z.add(&format!("{archive}/.storage_alignment"), b"64")?;
    z.add(&format!("{archive}/byteorder"), b"little")?;
    for (key, bytes) in storages {
        z.add(&format!("{archive}/data/{key}"), &bytes)?;
    }
    z.add(&format!("{archive}/version"), b"3\n")?;
    z.add(
        &format!("{archive}/.data/serialization_id"),
        b"0000000000000000000000000000000000000000",
    )?;
    let w = z.finish()?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()
}

/// The storage dtype and little-endian bytes of a CPU tensor (f32, f16, bf16, f64, i64, i32,
/// i16, u8).
pub fn tensor_storage(t: &candle_core::Tensor) -> candle_core::Result<(StorageDtype, Vec<u8>)> {
    use candle_core::DType;
    let t = t.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
    fn bytes<T: Copy, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.into_iter().flat_map(f).collect()
    }
    Ok(match t.dtype() {
        DType::F32 => (
            StorageDtype::F32,
            bytes(t.to_vec1::<f32>()?, f32::to_le_bytes),
        ),
        DType::F16 => (
            StorageDtype::F16,
            bytes(t.to_vec1::<half::f16>()?, half::f16::to_le_bytes),
        ),
        DType::BF16 => (
            StorageDtype::BF16,
            bytes(t.to_vec1::<half::bf16>()?, half::bf16::to_le_bytes),
        ),
        DType::F64 => (
            StorageDtype::F64,
            bytes(t.to_vec1::<f64>()?, f64::to_le_bytes),
        ),
        DType::I64 => (
            StorageDtype::I64,
            bytes(t.to_vec1::<i64>()?, i64::to_le_bytes),
        ),
        DType::I32 => (
            StorageDtype::I32,
            bytes(t.to_vec1::<i32>()?, i32::to_le_bytes),
        ),
        DType::I16 => (
            StorageDtype::I16,
            bytes(t.to_vec1::<i16>()?, i16::to_le_bytes),
        ),
        DType::U8 => (StorageDtype::U8, t.to_vec1::<u8>()?),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "cannot write dtype {other:?} to a torch checkpoint"
            )))
        }
    })
}

/// Writes `{'model': OrderedDict(prefix + key → tensor), 'config': config, 'epoch': epoch}` in
/// the official `torch.save` layout (one storage per tensor; `extra_model_entries` are spliced
/// into the state dict as they are, e.g. `UninitializedParameter` placeholders).
pub fn save_torch_checkpoint(
    path: &Path,
    tensors: &std::collections::BTreeMap<String, candle_core::Tensor>,
    key_prefix: &str,
    extra_model_entries: Vec<(PickleWrite, PickleWrite)>,
    config: Option<PickleWrite>,
    epoch: Option<i64>,
) -> std::io::Result<()> {
    let mut items = Vec::new();
    let mut storages = Vec::new();
    for (i, (k, t)) in tensors.iter().enumerate() {
        let (dtype, bytes) = tensor_storage(t).map_err(std::io::Error::other)?;
        let key = i.to_string();
        items.push((
            PickleWrite::Str(format!("{key_prefix}{k}")),
            PickleWrite::tensor(&key, dtype, t.dims(), dtype.is_float()),
        ));
        storages.push((key, bytes));
    }
    items.extend(extra_model_entries);
    let mut top = vec![(PickleWrite::str("model"), PickleWrite::OrderedDict(items))];
    if let Some(c) = config {
        top.push((PickleWrite::str("config"), c));
    }
    if let Some(e) = epoch {
        top.push((PickleWrite::str("epoch"), PickleWrite::Int(e)));
    }
    let pkl = pickle_dumps(&PickleWrite::Dict(top));
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    write_torch_zip(path, &stem, &pkl, storages)
}
