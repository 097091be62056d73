//! A minimal, inert pickle reader for the official `.pkl.npy` (a 0-d object array holding
//! `{'pred_position': A}`), as numpy writes it (protocol 3 from numpy 1.x, protocol 4 from
//! numpy 2.x). Nothing is ever imported or called: globals and reductions are kept as data, and
//! only the ndarray layout numpy uses is interpreted.

use std::collections::HashMap;
use std::rc::Rc;

#[derive(Debug)]
pub(crate) enum V {
    None,
    Bool(bool),
    Int(i64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Rc<V>>),
    List(Vec<Rc<V>>),
    Dict(Vec<(Rc<V>, Rc<V>)>),
    Global(String, String),
    Reduce(Rc<V>, Rc<V>),
    Built(Rc<V>, Rc<V>),
    Mark,
}

const MAX_OPS: usize = 1_000_000;
const MAX_STACK: usize = 100_000;
const MAX_COPY: usize = 10_000_000;

fn take<'a>(data: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= data.len())
        .ok_or("truncated pickle")?;
    let s = &data[*pos..end];
    *pos = end;
    Ok(s)
}

fn u32le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn line(data: &[u8], pos: &mut usize) -> Result<String, String> {
    let rest = &data[*pos..];
    let n = rest
        .iter()
        .position(|&c| c == b'\n')
        .ok_or("truncated pickle")?;
    let s = String::from_utf8_lossy(&rest[..n]).into_owned();
    *pos += n + 1;
    Ok(s)
}

/// Runs the pickle and returns the top-level value.
pub(crate) fn load(data: &[u8]) -> Result<Rc<V>, String> {
    let mut stack: Vec<Rc<V>> = Vec::new();
    let mut memo: HashMap<u32, Rc<V>> = HashMap::new();
    let mut pos = 0usize;
    // Work spent copying containers on APPEND/SETITEM; bounded so hostile input stays cheap.
    let mut copied = 0usize;
    let pop = |stack: &mut Vec<Rc<V>>| {
        stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".to_string())
    };
    let pop_mark = |stack: &mut Vec<Rc<V>>| -> Result<Vec<Rc<V>>, String> {
        let m = stack
            .iter()
            .rposition(|v| matches!(**v, V::Mark))
            .ok_or("pickle MARK missing")?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    for _ in 0..MAX_OPS {
        if stack.len() > MAX_STACK {
            return Err("pickle too deep".into());
        }
        let op = *take(data, &mut pos, 1)?.first().ok_or("truncated pickle")?;
        match op {
            0x80 => {
                take(data, &mut pos, 1)?;
            }
            0x95 => {
                take(data, &mut pos, 8)?;
            }
            b'.' => return pop(&mut stack),
            b'c' => {
                let m = line(data, &mut pos)?;
                let n = line(data, &mut pos)?;
                stack.push(Rc::new(V::Global(m, n)));
            }
            0x93 => {
                let n = pop(&mut stack)?;
                let m = pop(&mut stack)?;
                match (&*m, &*n) {
                    (V::Str(m), V::Str(n)) => stack.push(Rc::new(V::Global(m.clone(), n.clone()))),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            0x94 => {
                let top = stack.last().ok_or("pickle stack underflow")?.clone();
                let id = memo.len() as u32;
                memo.insert(id, top);
            }
            b'q' | b'r' | b'p' => {
                let id = match op {
                    b'q' => take(data, &mut pos, 1)?[0] as u32,
                    b'r' => u32le(take(data, &mut pos, 4)?),
                    _ => line(data, &mut pos)?
                        .trim()
                        .parse()
                        .map_err(|_| "bad PUT index")?,
                };
                let top = stack.last().ok_or("pickle stack underflow")?.clone();
                memo.insert(id, top);
            }
            b'h' | b'j' | b'g' => {
                let id = match op {
                    b'h' => take(data, &mut pos, 1)?[0] as u32,
                    b'j' => u32le(take(data, &mut pos, 4)?),
                    _ => line(data, &mut pos)?
                        .trim()
                        .parse()
                        .map_err(|_| "bad GET index")?,
                };
                stack.push(memo.get(&id).ok_or("pickle memo entry missing")?.clone());
            }
            b'(' => stack.push(Rc::new(V::Mark)),
            b')' => stack.push(Rc::new(V::Tuple(vec![]))),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Rc::new(V::Tuple(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Rc::new(V::Tuple(items)));
            }
            b']' => stack.push(Rc::new(V::List(vec![]))),
            b'}' => stack.push(Rc::new(V::Dict(vec![]))),
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Rc::new(V::List(items)));
            }
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let pairs = items
                    .chunks_exact(2)
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect();
                stack.push(Rc::new(V::Dict(pairs)));
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack)?
                };
                let list = pop(&mut stack)?;
                match &*list {
                    V::List(old) => {
                        copied += old.len() + items.len();
                        if copied > MAX_COPY {
                            return Err("pickle too large".into());
                        }
                        let mut v = old.clone();
                        v.extend(items);
                        stack.push(Rc::new(V::List(v)));
                    }
                    _ => return Err("APPEND to a non-list".into()),
                }
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack)?
                };
                let dict = pop(&mut stack)?;
                match &*dict {
                    V::Dict(old) => {
                        copied += old.len() + items.len();
                        if copied > MAX_COPY {
                            return Err("pickle too large".into());
                        }
                        let mut d = old.clone();
                        d.extend(items.chunks_exact(2).map(|c| (c[0].clone(), c[1].clone())));
                        stack.push(Rc::new(V::Dict(d)));
                    }
                    _ => return Err("SETITEM on a non-dict".into()),
                }
            }
            b'N' => stack.push(Rc::new(V::None)),
            0x88 => stack.push(Rc::new(V::Bool(true))),
            0x89 => stack.push(Rc::new(V::Bool(false))),
            b'K' => stack.push(Rc::new(V::Int(take(data, &mut pos, 1)?[0] as i64))),
            b'M' => {
                let b = take(data, &mut pos, 2)?;
                stack.push(Rc::new(V::Int(u16::from_le_bytes([b[0], b[1]]) as i64)));
            }
            b'J' => {
                let b = take(data, &mut pos, 4)?;
                stack.push(Rc::new(V::Int(
                    i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
                )));
            }
            0x8a => {
                let n = take(data, &mut pos, 1)?[0] as usize;
                let b = take(data, &mut pos, n)?;
                if n > 8 {
                    return Err("integer too large".into());
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Rc::new(V::Int(v)));
            }
            0x8c | b'X' | 0x8d | b'U' | b'T' => {
                let n = match op {
                    0x8c | b'U' => take(data, &mut pos, 1)?[0] as usize,
                    b'X' | b'T' => u32le(take(data, &mut pos, 4)?) as usize,
                    _ => {
                        let b = take(data, &mut pos, 8)?;
                        usize::try_from(u64::from_le_bytes(b.try_into().map_err(|_| "bad length")?))
                            .map_err(|_| "string too long")?
                    }
                };
                let s = take(data, &mut pos, n)?;
                stack.push(Rc::new(V::Str(String::from_utf8_lossy(s).into_owned())));
            }
            b'C' | b'B' | 0x8e => {
                let n = match op {
                    b'C' => take(data, &mut pos, 1)?[0] as usize,
                    b'B' => u32le(take(data, &mut pos, 4)?) as usize,
                    _ => {
                        let b = take(data, &mut pos, 8)?;
                        usize::try_from(u64::from_le_bytes(b.try_into().map_err(|_| "bad length")?))
                            .map_err(|_| "bytes too long")?
                    }
                };
                stack.push(Rc::new(V::Bytes(take(data, &mut pos, n)?.to_vec())));
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                stack.push(Rc::new(V::Reduce(func, args)));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let obj = pop(&mut stack)?;
                stack.push(Rc::new(V::Built(obj, state)));
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
        }
    }
    Err("pickle too long".into())
}

fn is_reconstruct(v: &V) -> bool {
    matches!(v, V::Global(m, n)
        if (m == "numpy.core.multiarray" || m == "numpy._core.multiarray") && n == "_reconstruct")
}

/// An interpreted numpy array: (shape, dtype string like "<f4" or "|O8", fortran, data).
pub(crate) struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: String,
    pub fortran: bool,
    pub data: Rc<V>,
}

/// Interprets `Built(Reduce(_reconstruct, ..), (1, shape, dtype, fortran, data))`.
pub(crate) fn ndarray(v: &V) -> Result<NdArray, String> {
    let V::Built(obj, state) = v else {
        return Err("not a pickled numpy array".into());
    };
    match &**obj {
        V::Reduce(f, _) if is_reconstruct(f) => {}
        _ => return Err("not a pickled numpy array".into()),
    }
    let V::Tuple(st) = &**state else {
        return Err("bad numpy array state".into());
    };
    let [_, shape, dtype, fortran, data] = st.as_slice() else {
        return Err("bad numpy array state".into());
    };
    let V::Tuple(dims) = &**shape else {
        return Err("bad numpy array shape".into());
    };
    let shape = dims
        .iter()
        .map(|d| match **d {
            V::Int(n) if n >= 0 => Ok(n as usize),
            _ => Err("bad numpy array shape".to_string()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    // dtype: Built(Reduce(Global(numpy, dtype), (name, False, True)), (3, order, ...))
    let dtype = match &**dtype {
        V::Built(d, dstate) => {
            let name = match &**d {
                V::Reduce(g, args) if matches!(&**g, V::Global(m, n) if m == "numpy" && n == "dtype") => {
                    match &**args {
                        V::Tuple(a) => match a.first().map(|x| &**x) {
                            Some(V::Str(s)) => s.clone(),
                            _ => return Err("bad numpy dtype".into()),
                        },
                        _ => return Err("bad numpy dtype".into()),
                    }
                }
                _ => return Err("bad numpy dtype".into()),
            };
            let order = match &**dstate {
                V::Tuple(s) => match s.get(1).map(|x| &**x) {
                    Some(V::Str(o)) => o.clone(),
                    _ => "|".into(),
                },
                _ => "|".into(),
            };
            format!("{order}{name}")
        }
        _ => return Err("bad numpy dtype".into()),
    };
    let fortran = matches!(**fortran, V::Bool(true));
    Ok(NdArray {
        shape,
        dtype,
        fortran,
        data: data.clone(),
    })
}
