//! `.json` writer and reader: positions, skeleton, and everything known about how the dance was
//! made (tokens, start tokens, sampling settings, source audio).
//!
//! Layout (`"format": "danceba-motion"`, `"version": 1`):
//! ```json
//! {
//!   "format": "danceba-motion", "version": 1,
//!   "fps": 60.0, "num_frames": 2, "units": "metres", "up_axis": "y",
//!   "joint_names": ["pelvis", ...], "parents": [-1, 0, ...],
//!   "frames": [[x0, y0, z0, x1, ...72 values], ...],        // absolute positions per frame
//!   "tokens": {"up": [423, ...], "down": [12, ...]},          // optional
//!   "start_tokens": {"up": 423, "down": 12},                  // optional
//!   "sampling": {"strategy": "greedy", ...},                  // optional
//!   "audio": "song.mp3", "model": "...", "generator": "danceba 0.1.0"   // optional
//! }
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{format_err, read_file, write_atomic, ExportError};
use crate::skeleton::{JOINT_NAMES, NUM_JOINTS, PARENTS};
use crate::Motion;

/// The paired token streams of a dance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStreams {
    pub up: Vec<u32>,
    pub down: Vec<u32>,
}

/// The start token pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTokens {
    pub up: u32,
    pub down: u32,
}

/// How the tokens were sampled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingMeta {
    /// `greedy` (the official behaviour) or another strategy name.
    pub strategy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Everything about a dance that is not the motion itself. All fields are optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MotionMeta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenStreams>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_tokens: Option<StartTokens>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingMeta>,
    /// File name of the source audio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio: Option<String>,
    /// Which weights made the dance (file name or hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The program that wrote the file, e.g. `danceba 0.1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct JsonFile {
    format: String,
    version: u32,
    fps: f32,
    num_frames: usize,
    #[serde(default)]
    units: Option<String>,
    #[serde(default)]
    up_axis: Option<String>,
    joint_names: Vec<String>,
    parents: Vec<i64>,
    frames: Vec<Vec<f32>>,
    #[serde(flatten)]
    meta: MotionMeta,
}

const FORMAT: &str = "danceba-motion";

/// The JSON text for `motion` and `meta`.
pub fn json_string(motion: &Motion, meta: &MotionMeta) -> Result<String, ExportError> {
    if let Some(t) = &meta.tokens {
        if t.up.len() != t.down.len() {
            return Err(ExportError::Meta(format!(
                "token streams differ in length ({} up, {} down)",
                t.up.len(),
                t.down.len()
            )));
        }
    }
    let file = JsonFile {
        format: FORMAT.into(),
        version: 1,
        fps: motion.fps,
        num_frames: motion.frames(),
        units: Some("metres".into()),
        up_axis: Some("y".into()),
        joint_names: JOINT_NAMES.iter().map(|s| s.to_string()).collect(),
        parents: PARENTS
            .iter()
            .map(|p| p.map(|i| i as i64).unwrap_or(-1))
            .collect(),
        frames: motion
            .positions
            .chunks_exact(NUM_JOINTS * 3)
            .map(|c| c.to_vec())
            .collect(),
        meta: meta.clone(),
    };
    serde_json::to_string(&file).map_err(|e| ExportError::Meta(e.to_string()))
}

/// Writes the `.json` of `motion` with `meta`.
pub fn write_json(
    motion: &Motion,
    meta: &MotionMeta,
    path: &Path,
    force: bool,
) -> Result<(), ExportError> {
    let mut text = json_string(motion, meta)?;
    text.push('\n');
    write_atomic(path, text.as_bytes(), force)
}

/// Reads a `.json` written by [`write_json`], checking the skeleton, the shape of every frame and
/// that every value is finite.
pub fn read_json(path: &Path) -> Result<(Motion, MotionMeta), ExportError> {
    let bytes = read_file(path)?;
    parse_json(&bytes).map_err(|e| match e {
        Err1::Format(m) => format_err(path, m),
        Err1::Motion(source) => ExportError::Motion {
            path: path.to_path_buf(),
            source,
        },
    })
}

enum Err1 {
    Format(String),
    Motion(crate::MotionError),
}

fn parse_json(bytes: &[u8]) -> Result<(Motion, MotionMeta), Err1> {
    let file: JsonFile = serde_json::from_slice(bytes).map_err(|e| {
        // a music-feature file (the official layout) is a common mix-up: say what it is
        let features = serde_json::from_slice::<serde_json::Value>(bytes)
            .is_ok_and(|v| v.get("music_array").is_some());
        Err1::Format(if features {
            "this is a music-feature file (\"music_array\"), not a dance: give it to `danceba \
             generate` to dance to it"
                .into()
        } else {
            format!("not a danceba motion .json: {e}")
        })
    })?;
    if file.format != FORMAT {
        return Err(Err1::Format(format!(
            "\"format\" is {:?}, expected {FORMAT:?}",
            file.format
        )));
    }
    if file.version != 1 {
        return Err(Err1::Format(format!(
            "version {} is newer than this program understands (1)",
            file.version
        )));
    }
    // what the file says of its units and axes must be what its numbers are read as
    if let Some(u) = file
        .units
        .as_deref()
        .filter(|u| !matches!(*u, "metres" | "meters" | "m"))
    {
        return Err(Err1::Format(format!(
            "\"units\" is {u:?}: positions must be in metres (\"metres\")"
        )));
    }
    if let Some(a) = file
        .up_axis
        .as_deref()
        .filter(|a| !a.eq_ignore_ascii_case("y"))
    {
        return Err(Err1::Format(format!(
            "\"up_axis\" is {a:?}: positions must have y up (\"y\")"
        )));
    }
    let names_ok = file.joint_names.len() == NUM_JOINTS
        && file
            .joint_names
            .iter()
            .zip(JOINT_NAMES)
            .all(|(a, b)| a == b);
    let parents_ok = file.parents.len() == NUM_JOINTS
        && file
            .parents
            .iter()
            .zip(PARENTS)
            .all(|(&a, b)| a == b.map(|i| i as i64).unwrap_or(-1));
    if !names_ok || !parents_ok {
        return Err(Err1::Format(
            "the skeleton is not the SMPL 24-joint skeleton (joint_names/parents differ)".into(),
        ));
    }
    if file.frames.len() != file.num_frames {
        return Err(Err1::Format(format!(
            "num_frames is {} but there are {} frames",
            file.num_frames,
            file.frames.len()
        )));
    }
    if let Some((i, f)) = file
        .frames
        .iter()
        .enumerate()
        .find(|(_, f)| f.len() != NUM_JOINTS * 3)
    {
        return Err(Err1::Format(format!(
            "frame {i} has {} values, expected 72 (24 joints × 3)",
            f.len()
        )));
    }
    if let Some(t) = &file.meta.tokens {
        if t.up.len() != t.down.len() {
            return Err(Err1::Format(format!(
                "token streams differ in length ({} up, {} down)",
                t.up.len(),
                t.down.len()
            )));
        }
    }
    let positions: Vec<f32> = file.frames.into_iter().flatten().collect();
    let motion = Motion::new(positions, file.fps).map_err(Err1::Motion)?;
    Ok((motion, file.meta))
}
