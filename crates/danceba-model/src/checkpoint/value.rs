//! Generic, inert Python value tree produced by the pickle reader.
//!
//! Nothing in here is ever executed: classes and functions named by a pickle become
//! [`PyValue::Global`] and [`PyValue::Object`] placeholders that only record their names.

use serde_json::Value as Json;

/// Element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    /// From a torch storage class name such as `FloatStorage`.
    pub fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "DoubleStorage" => Self::F64,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    /// The torch name (`float32`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
            Self::F64 => "float64",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::I16 => "int16",
            Self::I8 => "int8",
            Self::U8 => "uint8",
            Self::Bool => "bool",
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::F64)
    }
}

/// A tensor record found in a pickle (`torch._utils._rebuild_tensor_v2`): metadata only; the
/// bytes stay in the archive until the tensor is materialised.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRecord {
    /// Storage name inside the archive (`<prefix>/data/<key>`).
    pub storage_key: String,
    /// Storage element type.
    pub dtype: StorageDtype,
    /// Number of elements the pickle says the storage has.
    pub storage_numel: u64,
    /// Offset in elements of the first element of this view.
    pub offset: u64,
    /// Shape of the view.
    pub shape: Vec<u64>,
    /// Strides of the view, in elements.
    pub stride: Vec<u64>,
    /// Whether the record came from `_rebuild_parameter` (an `nn.Parameter`).
    pub requires_grad: bool,
}

/// An inert Python value.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in i64: little-endian two's complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<PyValue>),
    Tuple(Vec<PyValue>),
    Set(Vec<PyValue>),
    /// A dict (or OrderedDict); insertion order is kept.
    Dict(Vec<(PyValue, PyValue)>),
    /// A reference to a class or function (`module.name`); never resolved.
    Global {
        module: String,
        name: String,
    },
    /// An instance of a class that was not executed: `easydict.EasyDict`,
    /// `argparse.Namespace`, `torch.nn.parameter.UninitializedParameter`, `os.system(...)`, ...
    Object {
        /// `module.name` of the class (or callable) that would have built it.
        class: String,
        /// Positional arguments it would have been called with.
        args: Vec<PyValue>,
        /// State passed to `__setstate__` (BUILD), if any.
        state: Option<Box<PyValue>>,
        /// Items set on it as on a dict (dict subclasses such as EasyDict).
        items: Vec<(PyValue, PyValue)>,
        /// Items appended to it as to a list (list subclasses).
        list: Vec<PyValue>,
    },
    /// A torch storage reference (persistent id).
    Storage {
        key: String,
        dtype: StorageDtype,
        numel: u64,
    },
    /// A tensor record.
    Tensor(TensorRecord),
}

impl PyValue {
    /// Dict-like entries: a dict's items, or an object's dict items followed by the entries of a
    /// dict-valued state (EasyDict keeps its keys in both).
    pub fn entries(&self) -> Vec<(&PyValue, &PyValue)> {
        match self {
            PyValue::Dict(items) => items.iter().map(|(k, v)| (k, v)).collect(),
            PyValue::Object { items, state, .. } => {
                let mut out: Vec<(&PyValue, &PyValue)> =
                    items.iter().map(|(k, v)| (k, v)).collect();
                if let Some(state) = state {
                    let st: &PyValue = state;
                    let st = match st {
                        // (state, slotstate) form
                        PyValue::Tuple(t) if t.len() == 2 => &t[0],
                        s => s,
                    };
                    if let PyValue::Dict(d) = st {
                        for (k, v) in d {
                            if !out.iter().any(|(ok, _)| *ok == k) {
                                out.push((k, v));
                            }
                        }
                    }
                }
                out
            }
            _ => Vec::new(),
        }
    }

    /// Whether this value behaves like a dict (a dict, or an object with dict items or state).
    pub fn is_dict_like(&self) -> bool {
        match self {
            PyValue::Dict(_) => true,
            PyValue::Object { .. } => !self.entries().is_empty(),
            _ => false,
        }
    }

    /// The value under a string key of a dict-like value.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        self.entries()
            .into_iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The value under a dotted path of string keys, e.g. `structure_generate.base.n_head`.
    pub fn get_path(&self, path: &str) -> Option<&PyValue> {
        let mut cur = self;
        for part in path.split('.') {
            cur = cur.get(part)?;
        }
        Some(cur)
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            PyValue::Int(i) => Some(*i),
            PyValue::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PyValue::Float(f) => Some(*f),
            PyValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            PyValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Elements of a list, tuple or set.
    pub fn as_list(&self) -> Option<&[PyValue]> {
        match self {
            PyValue::List(v) | PyValue::Tuple(v) | PyValue::Set(v) => Some(v),
            _ => None,
        }
    }

    /// `module.name` of an object or global.
    pub fn class_name(&self) -> Option<String> {
        match self {
            PyValue::Object { class, .. } => Some(class.clone()),
            PyValue::Global { module, name } => Some(format!("{module}.{name}")),
            _ => None,
        }
    }

    /// A JSON rendering: dict-likes with string keys become objects, sequences arrays, objects
    /// without dict content `{"__class__": ..}`, tensors and storages a short description.
    pub fn to_json(&self) -> Json {
        self.to_json_depth(0)
    }

    fn to_json_depth(&self, depth: usize) -> Json {
        if depth > 64 {
            return Json::String("<too deep>".into());
        }
        match self {
            PyValue::None => Json::Null,
            PyValue::Bool(b) => Json::Bool(*b),
            PyValue::Int(i) => Json::from(*i),
            PyValue::BigInt(_) => Json::String("<big int>".into()),
            PyValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(Json::Number)
                .unwrap_or_else(|| Json::String(f.to_string())),
            PyValue::Str(s) => Json::String(s.clone()),
            PyValue::Bytes(b) => Json::String(format!("<{} bytes>", b.len())),
            PyValue::List(v) | PyValue::Tuple(v) | PyValue::Set(v) => {
                Json::Array(v.iter().map(|x| x.to_json_depth(depth + 1)).collect())
            }
            PyValue::Dict(_) | PyValue::Object { .. } if self.is_dict_like() => {
                let mut map = serde_json::Map::new();
                for (k, v) in self.entries() {
                    let key = match k {
                        PyValue::Str(s) => s.clone(),
                        PyValue::Int(i) => i.to_string(),
                        other => format!("{:?}", other.to_json_depth(depth + 1)),
                    };
                    map.insert(key, v.to_json_depth(depth + 1));
                }
                Json::Object(map)
            }
            PyValue::Dict(_) => Json::Object(serde_json::Map::new()),
            PyValue::Object { class, .. } => {
                let mut map = serde_json::Map::new();
                map.insert("__class__".into(), Json::String(class.clone()));
                Json::Object(map)
            }
            PyValue::Global { module, name } => Json::String(format!("<global {module}.{name}>")),
            PyValue::Storage { dtype, numel, .. } => {
                Json::String(format!("<storage {} x{numel}>", dtype.torch_name()))
            }
            PyValue::Tensor(t) => {
                Json::String(format!("<tensor {} {:?}>", t.dtype.torch_name(), t.shape))
            }
        }
    }

    /// Inverse of [`PyValue::to_json`] for plain data: objects become dicts with string keys.
    pub fn from_json(json: &Json) -> PyValue {
        match json {
            Json::Null => PyValue::None,
            Json::Bool(b) => PyValue::Bool(*b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => PyValue::Int(i),
                None => PyValue::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => PyValue::Str(s.clone()),
            Json::Array(a) => PyValue::List(a.iter().map(PyValue::from_json).collect()),
            Json::Object(m) => PyValue::Dict(
                m.iter()
                    .map(|(k, v)| (PyValue::Str(k.clone()), PyValue::from_json(v)))
                    .collect(),
            ),
        }
    }
}
