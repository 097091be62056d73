//! Exporters: `.npy` (plain and the official `.pkl.npy`), `.json` (with tokens and settings),
//! `.bvh` (rigged skeleton with solved rotations) and `.glb` (glTF 2.0 skinned skeleton), and the
//! readers that bring a `.npy` or `.json` back as a [`Motion`].
//!
//! Every writer builds the whole file in memory, writes it to a temporary file in the target's
//! directory and renames it into place, so a failure never leaves a partial file; an existing
//! file is only replaced when `force` is set.

pub mod bvh;
pub mod glb;
pub mod json;
pub mod npy;
mod pickle;
pub mod rig;
pub mod rotation;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::motion::MotionError;

pub use json::MotionMeta;

/// Errors of the exporters and readers.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path} already exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Motion {
        path: PathBuf,
        #[source]
        source: MotionError,
    },
    #[error("invalid motion metadata: {0}")]
    Meta(String),
}

/// The file formats of the exporters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `(frames, 72)` float32 absolute positions.
    Npy,
    /// The official `<name>.pkl.npy`: a pickled `{'pred_position': A}` in a 0-d object array.
    OfficialNpy,
    /// Positions, skeleton, tokens and settings as JSON.
    Json,
    /// Biovision hierarchy with solved joint rotations.
    Bvh,
    /// glTF 2.0 binary with a skinned skeleton and its animation.
    Glb,
}

impl Format {
    /// The file-name ending of this format (without the leading dot).
    pub fn extension(self) -> &'static str {
        match self {
            Format::Npy => "npy",
            Format::OfficialNpy => "pkl.npy",
            Format::Json => "json",
            Format::Bvh => "bvh",
            Format::Glb => "glb",
        }
    }

    /// Parses a format name as given on the command line (`npy`, `pkl.npy`/`official-npy`,
    /// `json`, `bvh`, `glb`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "npy" => Some(Format::Npy),
            "pkl.npy" | "pkl" | "official-npy" | "official_npy" => Some(Format::OfficialNpy),
            "json" => Some(Format::Json),
            "bvh" => Some(Format::Bvh),
            "glb" | "gltf" => Some(Format::Glb),
            _ => None,
        }
    }
}

/// Writes `motion` (with `meta` where the format has room for it) to `path` in `format`.
pub fn export(
    motion: &crate::Motion,
    meta: &MotionMeta,
    format: Format,
    path: &Path,
    force: bool,
) -> Result<(), ExportError> {
    match format {
        Format::Npy => npy::write_npy(motion, path, force),
        Format::OfficialNpy => npy::write_official_npy(motion, path, force),
        Format::Json => json::write_json(motion, meta, path, force),
        Format::Bvh => bvh::write_bvh(motion, path, force),
        Format::Glb => glb::write_glb(motion, path, force),
    }
}

/// Writes `bytes` to `out` atomically: a temporary file in the same directory, flushed, then
/// renamed over `out`. Refuses to replace an existing `out` unless `force`.
pub fn write_atomic(out: &Path, bytes: &[u8], force: bool) -> Result<(), ExportError> {
    let werr = |source: std::io::Error| ExportError::Write {
        path: out.to_path_buf(),
        source,
    };
    if !force && out.exists() {
        return Err(ExportError::Exists {
            path: out.to_path_buf(),
        });
    }
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if out.file_name().is_none() {
        return Err(werr(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the output path has no file name",
        )));
    }
    let mut attempt = 0u32;
    let (tmp_path, mut file) = loop {
        // not named after the output: a name near the 255-byte limit would push it over
        let candidate = dir.join(format!(".danceba-{}.{attempt}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(f) => break (candidate, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 1000 => {
                attempt += 1;
            }
            Err(e) => return Err(werr(e)),
        }
    };
    let result = file
        .write_all(bytes)
        .and_then(|_| file.sync_all())
        .and_then(|_| {
            drop(file);
            std::fs::rename(&tmp_path, out)
        });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp_path);
        return Err(werr(e));
    }
    Ok(())
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|source| ExportError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn format_err(path: &Path, message: impl Into<String>) -> ExportError {
    ExportError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads a motion back from a `.npy` (plain `(F, 72)`, `(F, 24, 3)` or `(1, F, 72)` float32 /
/// float64, or the official `.pkl.npy`) or our `.json`. A `.npy` carries no frame rate:
/// `npy_fps` is used (60 for DanceBa).
pub fn read_motion(path: &Path, npy_fps: f32) -> Result<(crate::Motion, MotionMeta), ExportError> {
    // what is at the path first: "no such file" says more than "unknown type" for a typo
    match std::fs::metadata(path) {
        Err(source) => {
            return Err(ExportError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
        Ok(m) if m.is_dir() => {
            return Err(format_err(
                path,
                "is a directory: give a .npy or .json motion file written by danceba",
            ))
        }
        Ok(_) => {}
    }
    let lower = path.to_string_lossy().to_ascii_lowercase();
    if lower.ends_with(".json") {
        json::read_json(path)
    } else if lower.ends_with(".npy") {
        Ok((npy::read_npy(path, npy_fps)?, MotionMeta::default()))
    } else {
        Err(format_err(
            path,
            "unknown motion file type: expected a .npy or .json file written by danceba",
        ))
    }
}
