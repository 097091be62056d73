//! A minimal, bounds-checked zip reader over an in-memory (memory-mapped) byte slice.
//!
//! torch.save writes *stored* (uncompressed) entries, which are returned as slices of the
//! mapping without copying. Deflated entries (a re-zipped archive) are inflated through the `zip`
//! crate with a size limit.

use std::io::Read;

/// Errors of the zip reader.
#[derive(Debug, thiserror::Error)]
pub enum ZipError {
    #[error("not a zip archive: no end-of-central-directory record (file truncated or not a torch checkpoint)")]
    NoEocd,
    #[error("corrupt zip archive: {0}")]
    Corrupt(String),
    #[error("zip entry {name} uses unsupported compression method {method}")]
    Method { name: String, method: u16 },
}

/// CRC-32 of `bytes`; large ones in parallel chunks whose checksums are combined.
fn crc32(bytes: &[u8]) -> u32 {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    if bytes.len() <= 4 * CHUNK {
        return crc32fast::hash(bytes);
    }
    let parts: Vec<crc32fast::Hasher> = bytes
        .par_chunks(CHUNK)
        .map(|c| {
            let mut h = crc32fast::Hasher::new();
            h.update(c);
            h
        })
        .collect();
    let mut whole = crc32fast::Hasher::new();
    for p in &parts {
        whole.combine(p);
    }
    whole.finalize()
}

/// One entry of the archive.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub method: u16,
    pub compressed_size: u64,
    pub size: u64,
    pub local_header_offset: u64,
    /// The CRC-32 the central directory records for the entry's data.
    pub crc32: u32,
}

/// The central directory of an archive.
#[derive(Debug)]
pub struct Archive {
    pub entries: Vec<Entry>,
}

fn rd<const N: usize>(data: &[u8], at: u64) -> Result<[u8; N], ZipError> {
    let at = usize::try_from(at).map_err(|_| ZipError::Corrupt("offset overflow".into()))?;
    let end = at
        .checked_add(N)
        .ok_or_else(|| ZipError::Corrupt("offset overflow".into()))?;
    let s = data.get(at..end).ok_or_else(|| {
        ZipError::Corrupt(format!(
            "record at byte {at} runs past the end of the file (truncated?)"
        ))
    })?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}
fn u16_at(d: &[u8], at: u64) -> Result<u16, ZipError> {
    Ok(u16::from_le_bytes(rd::<2>(d, at)?))
}
fn u32_at(d: &[u8], at: u64) -> Result<u32, ZipError> {
    Ok(u32::from_le_bytes(rd::<4>(d, at)?))
}
fn u64_at(d: &[u8], at: u64) -> Result<u64, ZipError> {
    Ok(u64::from_le_bytes(rd::<8>(d, at)?))
}

impl Archive {
    /// Parses the central directory.
    pub fn parse(data: &[u8]) -> Result<Archive, ZipError> {
        if data.len() < 22 {
            return Err(ZipError::NoEocd);
        }
        let last = data.len() - 22;
        let first = last.saturating_sub(65535);
        let eocd = (first..=last)
            .rev()
            .find(|&i| data[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
            .ok_or(ZipError::NoEocd)? as u64;
        let mut n_entries = u16_at(data, eocd + 10)? as u64;
        let mut cd_size = u32_at(data, eocd + 12)? as u64;
        let mut cd_off = u32_at(data, eocd + 16)? as u64;
        if n_entries == 0xffff || cd_size == 0xffff_ffff || cd_off == 0xffff_ffff {
            // zip64: locator right before the EOCD
            let loc = eocd
                .checked_sub(20)
                .ok_or_else(|| ZipError::Corrupt("zip64 locator missing".into()))?;
            if u32_at(data, loc)? != 0x0706_4b50 {
                return Err(ZipError::Corrupt("zip64 locator missing".into()));
            }
            let z64 = u64_at(data, loc + 8)?;
            if u32_at(data, z64)? != 0x0606_4b50 {
                return Err(ZipError::Corrupt("zip64 end record missing".into()));
            }
            n_entries = u64_at(data, z64 + 32)?;
            cd_size = u64_at(data, z64 + 40)?;
            cd_off = u64_at(data, z64 + 48)?;
        }
        let cd_end = cd_off
            .checked_add(cd_size)
            .ok_or_else(|| ZipError::Corrupt("central directory size overflow".into()))?;
        if cd_end > data.len() as u64 {
            return Err(ZipError::Corrupt(
                "central directory runs past the end of the file (truncated?)".into(),
            ));
        }
        if n_entries > cd_size / 46 + 1 {
            return Err(ZipError::Corrupt(format!(
                "{n_entries} entries cannot fit the central directory"
            )));
        }
        let mut entries = Vec::with_capacity(n_entries as usize);
        let mut p = cd_off;
        for _ in 0..n_entries {
            if u32_at(data, p)? != 0x0201_4b50 {
                return Err(ZipError::Corrupt(format!(
                    "bad central directory entry at byte {p}"
                )));
            }
            let method = u16_at(data, p + 10)?;
            let crc32 = u32_at(data, p + 16)?;
            let mut csize = u32_at(data, p + 20)? as u64;
            let mut usize_ = u32_at(data, p + 24)? as u64;
            let name_len = u16_at(data, p + 28)? as u64;
            let extra_len = u16_at(data, p + 30)? as u64;
            let comment_len = u16_at(data, p + 32)? as u64;
            let mut lho = u32_at(data, p + 42)? as u64;
            let name_start =
                usize::try_from(p + 46).map_err(|_| ZipError::Corrupt("offset".into()))?;
            let name_bytes = data
                .get(name_start..name_start + name_len as usize)
                .ok_or_else(|| ZipError::Corrupt("entry name past the end".into()))?;
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            // zip64 extra field
            let mut e = p + 46 + name_len;
            let e_end = e + extra_len;
            while e + 4 <= e_end {
                let id = u16_at(data, e)?;
                let sz = u16_at(data, e + 2)? as u64;
                if id == 0x0001 {
                    let mut q = e + 4;
                    if usize_ == 0xffff_ffff {
                        usize_ = u64_at(data, q)?;
                        q += 8;
                    }
                    if csize == 0xffff_ffff {
                        csize = u64_at(data, q)?;
                        q += 8;
                    }
                    if lho == 0xffff_ffff {
                        lho = u64_at(data, q)?;
                    }
                }
                e += 4 + sz;
            }
            entries.push(Entry {
                name,
                method,
                compressed_size: csize,
                size: usize_,
                local_header_offset: lho,
                crc32,
            });
            p = e_end + comment_len;
        }
        Ok(Archive { entries })
    }

    /// Finds an entry by exact name.
    pub fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Byte range of a stored entry's data in the file.
    pub fn data_range(data: &[u8], e: &Entry) -> Result<std::ops::Range<usize>, ZipError> {
        let lh = e.local_header_offset;
        if u32_at(data, lh)? != 0x0403_4b50 {
            return Err(ZipError::Corrupt(format!(
                "bad local header for {}",
                e.name
            )));
        }
        let n = u16_at(data, lh + 26)? as u64;
        let x = u16_at(data, lh + 28)? as u64;
        let start = lh + 30 + n + x;
        let end = start
            .checked_add(e.compressed_size)
            .ok_or_else(|| ZipError::Corrupt("entry size overflow".into()))?;
        if end > data.len() as u64 {
            return Err(ZipError::Corrupt(format!(
                "entry {} runs past the end of the file (truncated?)",
                e.name
            )));
        }
        Ok(start as usize..end as usize)
    }

    /// The bytes of an entry: borrowed for stored entries, inflated for deflated ones. Their
    /// CRC-32 must be the one the archive records (the zip crate checks inflated entries); a
    /// recorded 0 is taken as "not computed" (`torch.serialization.set_crc32_options(False)`
    /// writes no checksums), so such entries are read unchecked.
    pub fn read<'a>(data: &'a [u8], e: &Entry) -> Result<std::borrow::Cow<'a, [u8]>, ZipError> {
        let r = Self::data_range(data, e)?;
        match e.method {
            0 => {
                if e.size != e.compressed_size {
                    return Err(ZipError::Corrupt(format!(
                        "stored entry {} has inconsistent sizes",
                        e.name
                    )));
                }
                let bytes = &data[r];
                if e.crc32 != 0 {
                    let found = crc32(bytes);
                    if found != e.crc32 {
                        return Err(ZipError::Corrupt(format!(
                            "entry {} is damaged: its CRC-32 is {found:08x}, the archive \
                             records {:08x} (download or copy the file again)",
                            e.name, e.crc32
                        )));
                    }
                }
                Ok(std::borrow::Cow::Borrowed(bytes))
            }
            8 => {
                // bounded inflate: deflate cannot expand more than ~1032x
                let limit = e
                    .compressed_size
                    .saturating_mul(1100)
                    .saturating_add(1 << 20)
                    .min(e.size);
                let mut out = Vec::new();
                let mut dec = zip::read::ZipArchive::new(std::io::Cursor::new(data))
                    .map_err(|err| ZipError::Corrupt(err.to_string()))?;
                let f = dec
                    .by_name(&e.name)
                    .map_err(|err| ZipError::Corrupt(err.to_string()))?;
                f.take(limit)
                    .read_to_end(&mut out)
                    .map_err(|err| ZipError::Corrupt(format!("{}: {err}", e.name)))?;
                if out.len() as u64 != e.size {
                    return Err(ZipError::Corrupt(format!(
                        "entry {} inflates to the wrong size",
                        e.name
                    )));
                }
                Ok(std::borrow::Cow::Owned(out))
            }
            m => Err(ZipError::Method {
                name: e.name.clone(),
                method: m,
            }),
        }
    }
}
