//! `.npy` writer and reader, and the official `<name>.pkl.npy` (reference §5 step 2).
//!
//! The official file is what `np.save(path, {'pred_position': A})` writes: an `.npy` holding a
//! 0-d object array whose single element is the dict, pickled. The pickle is produced here with
//! protocol 3 and the `numpy.core.multiarray._reconstruct` path, which numpy 1.x and 2.x both load
//! with `np.load(path, allow_pickle=True).item()`.

use std::path::Path;

use super::{format_err, read_file, write_atomic, ExportError};
use crate::skeleton::NUM_JOINTS;
use crate::Motion;

const MAGIC: &[u8] = b"\x93NUMPY";

/// Builds an `.npy` (format 1.0) file: header dict padded to a multiple of 64 bytes, then data.
fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic(6) + version(2) + header length(2) + header + '\n' must be a multiple of 64.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f32_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The bytes of a `(frames, 72)` little-endian float32 `.npy` of the absolute positions.
pub fn npy_file_bytes(motion: &Motion) -> Vec<u8> {
    let shape = format!("({}, {})", motion.frames(), NUM_JOINTS * 3);
    npy_bytes("<f4", &shape, &f32_le(&motion.positions))
}

/// Writes the absolute positions as a `(frames, 72)` float32 `.npy`.
pub fn write_npy(motion: &Motion, path: &Path, force: bool) -> Result<(), ExportError> {
    write_atomic(path, &npy_file_bytes(motion), force)
}

/// A tiny pickle (protocol 3) writer for the fixed object graph of the official file.
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn int(&mut self, v: i32) {
        if (0..256).contains(&v) {
            self.0.push(b'K');
            self.0.push(v as u8);
        } else {
            self.0.push(b'J');
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        if b.len() < 256 {
            self.0.push(b'C');
            self.0.push(b.len() as u8);
        } else {
            self.0.push(b'B');
            self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        }
        self.0.extend_from_slice(b);
    }
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }
    /// `numpy.dtype(name, False, True)` with its `__setstate__` tuple.
    fn dtype(&mut self, name: &str, byteorder: &str, flags: i32) {
        self.global("numpy", "dtype");
        self.str(name);
        self.op(0x89); // NEWFALSE
        self.op(0x88); // NEWTRUE
        self.op(0x87); // TUPLE3
        self.op(b'R'); // REDUCE
        self.op(b'('); // MARK
        self.int(3);
        self.str(byteorder);
        self.op(b'N');
        self.op(b'N');
        self.op(b'N');
        self.int(-1);
        self.int(-1);
        self.int(flags);
        self.op(b't'); // TUPLE
        self.op(b'b'); // BUILD
    }
    /// `_reconstruct(ndarray, (0,), b'b')`, the start of every pickled ndarray.
    fn ndarray_start(&mut self) {
        self.global("numpy.core.multiarray", "_reconstruct");
        self.global("numpy", "ndarray");
        self.int(0);
        self.op(0x85); // TUPLE1
        self.bytes(b"b");
        self.op(0x87); // TUPLE3
        self.op(b'R');
    }
}

/// The bytes of the official `.pkl.npy` for `motion` (reference §5 step 2).
pub fn official_npy_bytes(motion: &Motion) -> Result<Vec<u8>, ExportError> {
    let frames = i32::try_from(motion.frames())
        .map_err(|_| ExportError::Meta("too many frames for the official format".into()))?;
    let data = f32_le(&motion.positions);
    if u32::try_from(data.len()).is_err() {
        return Err(ExportError::Meta(
            "motion too large for the official format (over 4 GiB)".into(),
        ));
    }
    let mut p = Pickle(vec![0x80, 3]); // PROTO 3
                                       // The outer 0-d object array.
    p.ndarray_start();
    p.op(b'(');
    p.int(1);
    p.op(b')'); // shape ()
    p.dtype("O8", "|", 63);
    p.op(0x89); // not Fortran order
    p.op(b']'); // EMPTY_LIST: the object array's elements
    p.op(b'}'); // EMPTY_DICT
    p.str("pred_position");
    // The float32 (F, 72) array.
    p.ndarray_start();
    p.op(b'(');
    p.int(1);
    p.int(frames);
    p.int((NUM_JOINTS * 3) as i32);
    p.op(0x86); // TUPLE2: shape
    p.dtype("f4", "<", 0);
    p.op(0x89);
    p.bytes(&data);
    p.op(b't');
    p.op(b'b'); // BUILD the float array
    p.op(b's'); // SETITEM into the dict
    p.op(b'a'); // APPEND the dict to the list
    p.op(b't');
    p.op(b'b'); // BUILD the object array
    p.op(b'.'); // STOP
    Ok(npy_bytes("|O", "()", &p.0))
}

/// Writes the official `<name>.pkl.npy` (`{'pred_position': A}` pickled in a 0-d object array).
pub fn write_official_npy(motion: &Motion, path: &Path, force: bool) -> Result<(), ExportError> {
    write_atomic(path, &official_npy_bytes(motion)?, force)
}

/// Reads a `.npy` of absolute positions: float32 or float64, little-endian, C order, shape
/// `(F, 72)`, `(F, 24, 3)` or `(1, F, 72)`; or the official `.pkl.npy` (`{'pred_position': A}`).
pub fn read_npy(path: &Path, fps: f32) -> Result<Motion, ExportError> {
    let bytes = read_file(path)?;
    parse_npy(&bytes, fps).map_err(|e| match e {
        NpyError::Format(m) => format_err(path, m),
        NpyError::Motion(source) => ExportError::Motion {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Like [`read_npy`], from bytes in memory (errors name the file as `<memory>`).
pub fn read_npy_bytes(bytes: &[u8], fps: f32) -> Result<Motion, ExportError> {
    let path = Path::new("<memory>");
    parse_npy(bytes, fps).map_err(|e| match e {
        NpyError::Format(m) => format_err(path, m),
        NpyError::Motion(source) => ExportError::Motion {
            path: path.to_path_buf(),
            source,
        },
    })
}

enum NpyError {
    Format(String),
    Motion(crate::MotionError),
}

fn parse_npy(bytes: &[u8], fps: f32) -> Result<Motion, NpyError> {
    let fmt = |m: &str| NpyError::Format(m.to_string());
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(fmt("not a .npy file (bad magic)"));
    }
    let (hlen, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(fmt("truncated .npy header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(NpyError::Format(format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(start..start.saturating_add(hlen))
        .ok_or_else(|| fmt("truncated .npy header"))?;
    let header = std::str::from_utf8(header).map_err(|_| fmt("the .npy header is not text"))?;
    let data = &bytes[start + hlen..];
    let descr = dict_value(header, "descr").ok_or_else(|| fmt("the .npy header has no 'descr'"))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    if descr.contains('O') {
        // The official `.pkl.npy`: a pickled 0-d object array holding {'pred_position': A}.
        return parse_official(data, fps);
    }
    if dict_value(header, "fortran_order").map(|v| v.starts_with("True")) == Some(true) {
        return Err(fmt("Fortran-ordered .npy files are not supported"));
    }
    let shape_text =
        dict_value(header, "shape").ok_or_else(|| fmt("the .npy header has no 'shape'"))?;
    let shape = parse_shape(shape_text).ok_or_else(|| fmt("cannot parse the .npy shape"))?;
    let frames = motion_frames(&shape)?;
    let values = decode_floats(descr, frames, data)?;
    Motion::new(values, fps).map_err(NpyError::Motion)
}

/// The frame count of a motion array of this shape.
fn motion_frames(shape: &[usize]) -> Result<usize, NpyError> {
    match shape {
        [f, 72] | [f, 24, 3] | [1, f, 72] => Ok(*f),
        _ => Err(NpyError::Format(format!(
            "shape {shape:?} is not a motion: expected (frames, 72), (frames, 24, 3) or \
             (1, frames, 72)"
        ))),
    }
}

/// Reads `frames × 72` little-endian float32/float64 values.
fn decode_floats(descr: &str, frames: usize, data: &[u8]) -> Result<Vec<f32>, NpyError> {
    let fmt = |m: &str| NpyError::Format(m.to_string());
    let n = frames
        .checked_mul(NUM_JOINTS * 3)
        .ok_or_else(|| fmt("shape too large"))?;
    let values: Vec<f32> = match descr {
        "<f4" | "f4" | "=f4" => {
            if data.len() != n * 4 {
                return Err(NpyError::Format(format!(
                    "data has {} bytes, the shape needs {}",
                    data.len(),
                    n * 4
                )));
            }
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
        "<f8" | "f8" | "=f8" => {
            if data.len() != n * 8 {
                return Err(NpyError::Format(format!(
                    "data has {} bytes, the shape needs {}",
                    data.len(),
                    n * 8
                )));
            }
            data.chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect()
        }
        other => {
            return Err(NpyError::Format(format!(
                "unsupported dtype {other}: expected little-endian float32 or float64"
            )))
        }
    };
    Ok(values)
}

/// Reads the official `{'pred_position': A}` pickle (protocol 3 or 4, numpy 1.x or 2.x).
fn parse_official(pickled: &[u8], fps: f32) -> Result<Motion, NpyError> {
    use super::pickle::{self, V};
    let not_official = |why: String| {
        NpyError::Format(format!(
            "this .npy holds pickled Python objects but not the official \
             {{'pred_position': array}} layout ({why})"
        ))
    };
    let top = pickle::load(pickled).map_err(not_official)?;
    let outer = pickle::ndarray(&top).map_err(not_official)?;
    let V::List(items) = &*outer.data else {
        return Err(not_official("no object list".into()));
    };
    let [item] = items.as_slice() else {
        return Err(not_official("not a single object".into()));
    };
    let V::Dict(pairs) = &**item else {
        return Err(not_official("the object is not a dict".into()));
    };
    let value = pairs
        .iter()
        .find(|(k, _)| matches!(&**k, V::Str(s) if s == "pred_position"))
        .map(|(_, v)| v.clone())
        .ok_or_else(|| not_official("no 'pred_position' key".into()))?;
    let arr = pickle::ndarray(&value).map_err(not_official)?;
    if arr.fortran {
        return Err(NpyError::Format(
            "Fortran-ordered arrays are not supported".into(),
        ));
    }
    let frames = motion_frames(&arr.shape)?;
    let V::Bytes(data) = &*arr.data else {
        return Err(not_official("'pred_position' has no raw data".into()));
    };
    let values = decode_floats(&arr.dtype, frames, data)?;
    Motion::new(values, fps).map_err(NpyError::Motion)
}

/// The text after `'key':` up to the next top-level comma (shape tuples kept whole).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat1 = format!("'{key}':");
    let pat2 = format!("\"{key}\":");
    let pos = header
        .find(&pat1)
        .map(|p| p + pat1.len())
        .or_else(|| header.find(&pat2).map(|p| p + pat2.len()))?;
    let rest = header[pos..].trim_start();
    if rest.starts_with('(') {
        let end = rest.find(')')?;
        Some(&rest[..=end])
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim())
    }
}

fn parse_shape(text: &str) -> Option<Vec<usize>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}
