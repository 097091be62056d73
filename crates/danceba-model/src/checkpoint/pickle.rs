//! A pickle virtual machine for the opcodes `torch.save` emits (protocols 0–5).
//!
//! It never imports, calls or instantiates anything: every global becomes an inert
//! [`PyValue::Global`], every call (REDUCE, NEWOBJ, OBJ, INST) an inert [`PyValue::Object`],
//! except for a few torch/collections callables whose meaning is known and reproduced as data
//! (`_rebuild_tensor_v2`, `_rebuild_parameter`, `OrderedDict`).
//!
//! Values live in an arena while the program runs, so that pickle's shared, mutable references
//! (memo, DUP) behave as in Python; the result is then copied into a [`PyValue`] tree with a size
//! budget (shared sub-trees could otherwise blow up exponentially) and a depth limit.

use std::collections::HashMap;

use super::value::{PyValue, StorageDtype, TensorRecord};

/// Errors of the pickle reader.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("pickle ends unexpectedly at byte {0} (truncated or corrupt)")]
    Truncated(usize),
    #[error("unknown pickle opcode 0x{op:02x} at byte {pos} (corrupt pickle)")]
    UnknownOpcode { op: u8, pos: usize },
    #[error("unsupported pickle opcode {name} at byte {pos}")]
    Unsupported { name: &'static str, pos: usize },
    #[error("malformed pickle at byte {pos}: {msg}")]
    Malformed { pos: usize, msg: String },
    #[error("pickle has no STOP opcode")]
    NoStop,
    #[error("pickled object graph too large or too deep to expand ({0})")]
    TooLarge(&'static str),
    #[error("malformed tensor record: {0}")]
    BadTensor(String),
}

type Id = usize;

#[derive(Debug)]
enum Node {
    Leaf(PyValue),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Set(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Object {
        class: String,
        args: Vec<Id>,
        state: Option<Id>,
        items: Vec<(Id, Id)>,
        list: Vec<Id>,
    },
}

/// Far above what a checkpoint needs (~10k for the official GPT), far below a memory hazard.
const MAX_NODES: usize = 2_000_000;
const MAX_STACK: usize = 2_000_000;
const MAX_DEPTH: usize = 200;
const MAX_EXPANDED: usize = 2_000_000;

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    arena: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

/// Runs a pickle program and returns the resulting value tree.
pub fn unpickle(data: &[u8]) -> Result<PyValue, PickleError> {
    let mut vm = Vm {
        data,
        pos: 0,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm.run()?;
    let mut budget = MAX_EXPANDED;
    vm.expand(root, 0, &mut budget)
}

impl<'a> Vm<'a> {
    fn err(&self, msg: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            pos: self.pos,
            msg: msg.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(PickleError::Truncated(self.pos))?;
        let s = self
            .data
            .get(self.pos..end)
            .ok_or(PickleError::Truncated(self.pos))?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> Result<&'a [u8], PickleError> {
        let rest = self
            .data
            .get(self.pos..)
            .ok_or(PickleError::Truncated(self.pos))?;
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.pos))?;
        let s = &rest[..nl];
        self.pos += nl + 1;
        Ok(s)
    }
    fn line_str(&mut self) -> Result<String, PickleError> {
        let l = self.line()?;
        String::from_utf8(l.to_vec()).map_err(|_| self.err("non-UTF-8 text argument"))
    }
    fn len_arg(&mut self, n: u64) -> Result<usize, PickleError> {
        let remaining = self.data.len().saturating_sub(self.pos) as u64;
        if n > remaining {
            return Err(PickleError::Truncated(self.pos));
        }
        Ok(n as usize)
    }

    fn alloc(&mut self, n: Node) -> Result<Id, PickleError> {
        if self.arena.len() >= MAX_NODES {
            return Err(PickleError::TooLarge("too many objects"));
        }
        self.arena.push(n);
        Ok(self.arena.len() - 1)
    }
    fn push(&mut self, n: Node) -> Result<(), PickleError> {
        let id = self.alloc(n)?;
        self.push_id(id)
    }
    fn push_id(&mut self, id: Id) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_STACK {
            return Err(PickleError::TooLarge("stack too deep"));
        }
        self.stack.push(id);
        Ok(())
    }
    fn push_leaf(&mut self, v: PyValue) -> Result<(), PickleError> {
        self.push(Node::Leaf(v))
    }
    fn pop(&mut self) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&self) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        if m > self.stack.len() {
            return Err(self.err("MARK above stack top"));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_put(&mut self, idx: u64) -> Result<(), PickleError> {
        let top = self.top()?;
        self.memo.insert(idx, top);
        Ok(())
    }
    fn memo_get(&mut self, idx: u64) -> Result<(), PickleError> {
        let id = *self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo key {idx} not found")))?;
        self.push_id(id)?;
        Ok(())
    }

    fn leaf(&self, id: Id) -> Option<&PyValue> {
        match self.arena.get(id) {
            Some(Node::Leaf(v)) => Some(v),
            _ => None,
        }
    }
    fn seq(&self, id: Id) -> Option<&[Id]> {
        match self.arena.get(id) {
            Some(Node::Tuple(v)) | Some(Node::List(v)) => Some(v),
            _ => None,
        }
    }
    fn int_of(&self, id: Id) -> Option<i64> {
        self.leaf(id).and_then(|v| v.as_i64())
    }

    fn run(&mut self) -> Result<Id, PickleError> {
        loop {
            let op_pos = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push_leaf(PyValue::None)?,
                0x88 => self.push_leaf(PyValue::Bool(true))?,
                0x89 => self.push_leaf(PyValue::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push_leaf(PyValue::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push_leaf(PyValue::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push_leaf(PyValue::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8()? as u64;
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push_leaf(long_from_bytes(b))?
                }
                0x8b => {
                    let n = self.u32()? as u64;
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push_leaf(long_from_bytes(b))?
                }
                b'I' => {
                    let s = self.line_str()?;
                    let v = match s.trim() {
                        "00" => PyValue::Bool(false),
                        "01" => PyValue::Bool(true),
                        t => PyValue::Int(t.parse().map_err(|_| self.err("bad INT"))?),
                    };
                    self.push_leaf(v)?
                }
                b'L' => {
                    let s = self.line_str()?;
                    let t = s.trim().trim_end_matches('L');
                    let v = t.parse().map_err(|_| self.err("bad LONG"))?;
                    self.push_leaf(PyValue::Int(v))?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push_leaf(PyValue::Float(f64::from_be_bytes(a)))?
                }
                b'F' => {
                    let s = self.line_str()?;
                    let v = s.trim().parse().map_err(|_| self.err("bad FLOAT"))?;
                    self.push_leaf(PyValue::Float(v))?
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?;
                    let s = String::from_utf8(b.to_vec())
                        .map_err(|_| self.err("string is not valid UTF-8"))?;
                    self.push_leaf(PyValue::Str(s))?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.u32()? as u64
                    } else {
                        self.u8()? as u64
                    };
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?;
                    // Python-2 str: treat as latin-1 text.
                    let s: String = b.iter().map(|&c| c as char).collect();
                    self.push_leaf(PyValue::Str(s))?
                }
                b'S' => {
                    let l = self.line_str()?;
                    let t = l.trim();
                    let t = t
                        .strip_prefix(['\'', '"'])
                        .and_then(|x| x.strip_suffix(['\'', '"']))
                        .unwrap_or(t);
                    self.push_leaf(PyValue::Str(t.to_string()))?
                }
                b'V' => {
                    let l = self.line_str()?;
                    self.push_leaf(PyValue::Str(l))?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push_leaf(PyValue::Bytes(b))?
                }
                b']' => self.push(Node::List(Vec::new()))?,
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b'}' => self.push(Node::Dict(Vec::new()))?,
                0x8f => self.push(Node::Set(Vec::new()))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items))?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs =
                        pairs(&items).ok_or_else(|| self.err("odd number of dict items"))?;
                    self.push(Node::Dict(pairs))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?;
                    self.append(target, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append(target, items)?
                }
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    match self.arena.get_mut(target) {
                        Some(Node::Set(v)) => v.extend(items),
                        _ => return Err(self.err("ADDITEMS on a non-set")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![(k, v)])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs =
                        pairs(&items).ok_or_else(|| self.err("odd number of dict items"))?;
                    let target = self.top()?;
                    self.set_items(target, pairs)?
                }
                b'0' => {
                    // POP: pops the top item, or a mark if the mark is on top.
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.push_id(t)?
                }
                b'p' => {
                    let s = self.line_str()?;
                    let idx = s.trim().parse().map_err(|_| self.err("bad PUT index"))?;
                    self.memo_put(idx)?
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?
                }
                b'g' => {
                    let s = self.line_str()?;
                    let idx = s.trim().parse().map_err(|_| self.err("bad GET index"))?;
                    self.memo_get(idx)?
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()? as u64;
                    self.memo_get(i)?
                }
                b'c' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    self.push_leaf(PyValue::Global { module, name })?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(PyValue::Str(m)), Some(PyValue::Str(n))) =
                        (self.leaf(module), self.leaf(name))
                    else {
                        return Err(self.err("STACK_GLOBAL needs two strings"));
                    };
                    let v = PyValue::Global {
                        module: m.clone(),
                        name: n.clone(),
                    };
                    self.push_leaf(v)?
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push_leaf(v)?
                }
                b'P' => {
                    let s = self.line_str()?;
                    self.push_leaf(PyValue::Object {
                        class: "persistent_id".into(),
                        args: vec![PyValue::Str(s)],
                        state: None,
                        items: Vec::new(),
                        list: Vec::new(),
                    })?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let id = self.reduce(func, args)?;
                    self.push_id(id)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let id = self.reduce(cls, args)?;
                    self.push_id(id)?
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let id = self.reduce(cls, args)?;
                    self.push_id(id)?
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.err("OBJ without a class"));
                    }
                    let cls = items.remove(0);
                    let class = self.class_of(cls);
                    self.push(Node::Object {
                        class,
                        args: items,
                        state: None,
                        items: Vec::new(),
                        list: Vec::new(),
                    })?
                }
                b'i' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    let items = self.pop_mark()?;
                    self.push(Node::Object {
                        class: format!("{module}.{name}"),
                        args: items,
                        state: None,
                        items: Vec::new(),
                        list: Vec::new(),
                    })?
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    if let Some(Node::Object { state: s, .. }) = self.arena.get_mut(target) {
                        *s = Some(state);
                    }
                    // BUILD on a dict (OrderedDict `_metadata`), tensor or other leaf: the state
                    // carries nothing the reader needs; it is dropped.
                }
                0x82..=0x84 => {
                    return Err(PickleError::Unsupported {
                        name: "EXT (copyreg extension registry)",
                        pos: op_pos,
                    })
                }
                0x97 | 0x98 => {
                    return Err(PickleError::Unsupported {
                        name: "out-of-band buffer",
                        pos: op_pos,
                    })
                }
                _ => return Err(PickleError::UnknownOpcode { op, pos: op_pos }),
            }
        }
    }

    fn append(&mut self, target: Id, items: Vec<Id>) -> Result<(), PickleError> {
        let pos = self.pos;
        match self.arena.get_mut(target) {
            Some(Node::List(v)) => v.extend(items),
            Some(Node::Object { list, .. }) => list.extend(items),
            _ => {
                return Err(PickleError::Malformed {
                    pos,
                    msg: "APPEND on a value that is not a list".into(),
                })
            }
        }
        Ok(())
    }

    fn set_items(&mut self, target: Id, new: Vec<(Id, Id)>) -> Result<(), PickleError> {
        let pos = self.pos;
        match self.arena.get_mut(target) {
            Some(Node::Dict(v)) => v.extend(new),
            Some(Node::Object { items, .. }) => items.extend(new),
            _ => {
                return Err(PickleError::Malformed {
                    pos,
                    msg: "SETITEM on a value that is not a dict".into(),
                })
            }
        }
        Ok(())
    }

    fn class_of(&self, id: Id) -> String {
        match self.leaf(id) {
            Some(PyValue::Global { module, name }) => format!("{module}.{name}"),
            _ => "<non-global callable>".to_string(),
        }
    }

    fn persistent_load(&self, pid: Id) -> Result<PyValue, PickleError> {
        let inert = |what: &str| PyValue::Object {
            class: "persistent_id".into(),
            args: vec![PyValue::Str(what.to_string())],
            state: None,
            items: Vec::new(),
            list: Vec::new(),
        };
        let Some(items) = self.seq(pid) else {
            return Ok(inert("non-tuple persistent id"));
        };
        if items.len() != 5 || self.leaf(items[0]).and_then(|v| v.as_str()) != Some("storage") {
            return Ok(inert("unknown persistent id"));
        }
        let dtype = match self.leaf(items[1]) {
            Some(PyValue::Global { module, name }) if module == "torch" => {
                StorageDtype::from_storage_class(name).ok_or_else(|| {
                    PickleError::BadTensor(format!("unsupported storage type torch.{name}"))
                })?
            }
            _ => {
                return Err(PickleError::BadTensor(
                    "storage type is not a torch class".into(),
                ))
            }
        };
        let key = match self.leaf(items[2]) {
            Some(PyValue::Str(s)) => s.clone(),
            Some(PyValue::Int(i)) => i.to_string(),
            _ => return Err(PickleError::BadTensor("storage key is not a string".into())),
        };
        let numel = self
            .int_of(items[4])
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| {
                PickleError::BadTensor("storage size is not a non-negative int".into())
            })?;
        Ok(PyValue::Storage { key, dtype, numel })
    }

    fn int_tuple(&self, id: Id, what: &str) -> Result<Vec<u64>, PickleError> {
        let items = self
            .seq(id)
            .ok_or_else(|| PickleError::BadTensor(format!("{what} is not a tuple")))?;
        if items.len() > 64 {
            return Err(PickleError::BadTensor(format!(
                "{what} has {} dimensions",
                items.len()
            )));
        }
        items
            .iter()
            .map(|&i| {
                self.int_of(i)
                    .and_then(|v| u64::try_from(v).ok())
                    .ok_or_else(|| {
                        PickleError::BadTensor(format!(
                            "{what} holds a non-integer or negative value"
                        ))
                    })
            })
            .collect()
    }

    fn rebuild_tensor(&self, args: &[Id]) -> Result<PyValue, PickleError> {
        if args.len() < 4 {
            return Err(PickleError::BadTensor(format!(
                "_rebuild_tensor_v2 with {} arguments",
                args.len()
            )));
        }
        let Some(PyValue::Storage { key, dtype, numel }) = self.leaf(args[0]) else {
            return Err(PickleError::BadTensor(
                "first argument is not a storage".into(),
            ));
        };
        let offset = self
            .int_of(args[1])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| {
                PickleError::BadTensor("storage offset is not a non-negative int".into())
            })?;
        let shape = self.int_tuple(args[2], "size")?;
        let stride = self.int_tuple(args[3], "stride")?;
        if shape.len() != stride.len() {
            return Err(PickleError::BadTensor(format!(
                "size has {} dimensions but stride {}",
                shape.len(),
                stride.len()
            )));
        }
        let requires_grad = args
            .get(4)
            .and_then(|&i| self.leaf(i))
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(PyValue::Tensor(TensorRecord {
            storage_key: key.clone(),
            dtype: *dtype,
            storage_numel: *numel,
            offset,
            shape,
            stride,
            requires_grad,
        }))
    }

    fn reduce(&mut self, func: Id, args: Id) -> Result<Id, PickleError> {
        let name = match self.leaf(func) {
            Some(PyValue::Global { module, name }) => Some((module.clone(), name.clone())),
            _ => None,
        };
        let arg_ids: Vec<Id> = self.seq(args).map(|s| s.to_vec()).unwrap_or_default();
        if let Some((m, n)) = &name {
            match (m.as_str(), n.as_str()) {
                ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                    let t = self.rebuild_tensor(&arg_ids)?;
                    return self.alloc(Node::Leaf(t));
                }
                ("torch._utils", "_rebuild_parameter")
                | ("torch._utils", "_rebuild_parameter_with_state") => {
                    let data = *arg_ids.first().ok_or_else(|| {
                        PickleError::BadTensor("_rebuild_parameter without data".into())
                    })?;
                    let rg = arg_ids
                        .get(1)
                        .and_then(|&i| self.leaf(i))
                        .and_then(|v| v.as_bool())
                        .unwrap_or(true);
                    if let Some(Node::Leaf(PyValue::Tensor(t))) = self.arena.get(data) {
                        let mut t = t.clone();
                        t.requires_grad = rg;
                        return self.alloc(Node::Leaf(PyValue::Tensor(t)));
                    }
                    return Ok(data);
                }
                ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                    // OrderedDict() or OrderedDict([(k, v), ...])
                    let mut pairs_out = Vec::new();
                    if let Some(&first) = arg_ids.first() {
                        if let Some(items) = self.seq(first) {
                            for &p in items {
                                match self.seq(p) {
                                    Some([k, v]) => pairs_out.push((*k, *v)),
                                    _ => {
                                        return Err(
                                            self.err("OrderedDict argument is not a list of pairs")
                                        )
                                    }
                                }
                            }
                        }
                    }
                    return self.alloc(Node::Dict(pairs_out));
                }
                _ => {}
            }
        }
        let class = self.class_of(func);
        self.alloc(Node::Object {
            class,
            args: arg_ids,
            state: None,
            items: Vec::new(),
            list: Vec::new(),
        })
    }

    fn expand(&self, id: Id, depth: usize, budget: &mut usize) -> Result<PyValue, PickleError> {
        if depth > MAX_DEPTH {
            return Err(PickleError::TooLarge("nesting too deep (or a cycle)"));
        }
        if *budget == 0 {
            return Err(PickleError::TooLarge("too many values"));
        }
        *budget -= 1;
        let node = self
            .arena
            .get(id)
            .ok_or(PickleError::TooLarge("dangling reference"))?;
        let list = |ids: &[Id], budget: &mut usize| -> Result<Vec<PyValue>, PickleError> {
            ids.iter()
                .map(|&i| self.expand(i, depth + 1, budget))
                .collect()
        };
        let dict = |ids: &[(Id, Id)],
                    budget: &mut usize|
         -> Result<Vec<(PyValue, PyValue)>, PickleError> {
            ids.iter()
                .map(|&(k, v)| {
                    Ok((
                        self.expand(k, depth + 1, budget)?,
                        self.expand(v, depth + 1, budget)?,
                    ))
                })
                .collect()
        };
        Ok(match node {
            Node::Leaf(v) => v.clone(),
            Node::List(v) => PyValue::List(list(v, budget)?),
            Node::Tuple(v) => PyValue::Tuple(list(v, budget)?),
            Node::Set(v) => PyValue::Set(list(v, budget)?),
            Node::Dict(v) => PyValue::Dict(dict(v, budget)?),
            Node::Object {
                class,
                args,
                state,
                items,
                list: l,
            } => PyValue::Object {
                class: class.clone(),
                args: list(args, budget)?,
                state: match state {
                    Some(s) => Some(Box::new(self.expand(*s, depth + 1, budget)?)),
                    None => None,
                },
                items: dict(items, budget)?,
                list: list(l, budget)?,
            },
        })
    }
}

fn pairs(items: &[Id]) -> Option<Vec<(Id, Id)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    Some(items.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

fn long_from_bytes(b: Vec<u8>) -> PyValue {
    if b.is_empty() {
        return PyValue::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut a = if neg { [0xffu8; 8] } else { [0u8; 8] };
        a[..b.len()].copy_from_slice(&b);
        return PyValue::Int(i64::from_le_bytes(a));
    }
    PyValue::BigInt(b)
}
