//! `Motion`: absolute SMPL joint positions at a frame rate, and the root integration that turns
//! the VQ-VAE output into it (reference §4.4, §5 step 1).

use crate::skeleton::NUM_JOINTS;

/// Errors about motion data.
#[derive(Debug, thiserror::Error)]
pub enum MotionError {
    #[error("motion data has {len} values, which is not frames × 24 joints × 3 (72 per frame)")]
    BadLength { len: usize },
    #[error("motion has no frames")]
    Empty,
    #[error("motion value at frame {frame}, joint {joint} is not finite ({value})")]
    NotFinite {
        frame: usize,
        joint: usize,
        value: f32,
    },
    #[error(
        "frame rate must be between {min} and {max} frames per second, got {0}",
        min = Motion::MIN_FPS,
        max = Motion::MAX_FPS
    )]
    BadFps(f32),
}

/// Integrates the root velocity of a decoded pose (`pose_decoded`, `frames × 72`, joint 0 the
/// per-frame root velocity, joints 1..23 relative to the root) into the root trajectory, exactly
/// as the official `mc_gpt_all.eval` does (reference §4.4, Q15): sequential f32 adds, exclusive
/// (`root[i] = Σ_{j<i} v[j]`), starting at the origin; the last velocity is unused. Joints 1..23
/// are copied unchanged, so the result is the reference's `pose_root_integrated`.
pub fn root_integrated(decoded: &[f32]) -> Result<Vec<f32>, MotionError> {
    check_layout(decoded)?;
    let w = NUM_JOINTS * 3;
    let mut out = decoded.to_vec();
    let mut root = [0f32; 3];
    for f in 0..decoded.len() / w {
        let row = f * w;
        let v = [decoded[row], decoded[row + 1], decoded[row + 2]];
        out[row..row + 3].copy_from_slice(&root);
        for c in 0..3 {
            root[c] += v[c];
        }
    }
    Ok(out)
}

/// Turns a root-integrated pose (joint 0 absolute, joints 1..23 relative to it) into absolute
/// positions as `visualizeAndWrite` does (reference §5 step 1): the root is added to joints
/// 1..23 in f32, the root stays as it is.
pub fn absolute_from_root_relative(root_relative: &[f32]) -> Result<Vec<f32>, MotionError> {
    check_layout(root_relative)?;
    let w = NUM_JOINTS * 3;
    let mut out = root_relative.to_vec();
    for row in out.chunks_exact_mut(w) {
        let root = [row[0], row[1], row[2]];
        for j in 1..NUM_JOINTS {
            for c in 0..3 {
                row[3 * j + c] += root[c];
            }
        }
    }
    Ok(out)
}

fn check_layout(values: &[f32]) -> Result<(), MotionError> {
    if !values.len().is_multiple_of(NUM_JOINTS * 3) {
        return Err(MotionError::BadLength { len: values.len() });
    }
    if values.is_empty() {
        return Err(MotionError::Empty);
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(MotionError::NotFinite {
            frame: i / (NUM_JOINTS * 3),
            joint: (i % (NUM_JOINTS * 3)) / 3,
            value: values[i],
        });
    }
    Ok(())
}

/// A dance: absolute joint positions (metres, y up), `frames × 24 × 3`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Motion {
    /// Frames per second (60 for DanceBa).
    pub fps: f32,
    /// `frames × 72` floats: joint j of frame f at `[f * 72 + 3 * j ..][..3]`.
    pub positions: Vec<f32>,
}

impl Motion {
    /// Wraps absolute positions, checking the shape and that every value is finite.
    /// The frame rates a motion may have: far beyond what any player or exporter uses (the
    /// model's is 60), so that a frame rate that is surely a typo or damage is refused.
    pub const MIN_FPS: f32 = 1.0;
    pub const MAX_FPS: f32 = 1000.0;

    pub fn new(positions: Vec<f32>, fps: f32) -> Result<Self, MotionError> {
        if !(Self::MIN_FPS..=Self::MAX_FPS).contains(&fps) {
            return Err(MotionError::BadFps(fps));
        }
        check_layout(&positions)?;
        Ok(Self { fps, positions })
    }

    /// Builds the absolute motion from the VQ-VAE output (`pose_decoded`: joint 0 the root
    /// velocity, joints 1..23 relative to the root): [`root_integrated`], then
    /// [`absolute_from_root_relative`] (reference §4.4, §5 step 1).
    pub fn from_decoded(decoded: &[f32], fps: f32) -> Result<Self, MotionError> {
        let rel = root_integrated(decoded)?;
        Self::new(absolute_from_root_relative(&rel)?, fps)
    }

    /// The inverse of [`absolute_from_root_relative`]: joints 1..23 relative to the root, the
    /// root absolute (the layout the VQ-VAE encoder reads).
    pub fn root_relative(&self) -> Vec<f32> {
        let w = NUM_JOINTS * 3;
        let mut out = self.positions.clone();
        for row in out.chunks_exact_mut(w) {
            let root = [row[0], row[1], row[2]];
            for j in 1..NUM_JOINTS {
                for c in 0..3 {
                    row[3 * j + c] -= root[c];
                }
            }
        }
        out
    }

    /// Position of `joint` at `frame`, or `None` when either is out of range.
    pub fn get(&self, frame: usize, joint: usize) -> Option<[f32; 3]> {
        if joint >= NUM_JOINTS || frame >= self.frames() {
            return None;
        }
        Some(self.joint(frame, joint))
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.positions.len() / (NUM_JOINTS * 3)
    }

    /// Duration in seconds.
    pub fn seconds(&self) -> f32 {
        self.frames() as f32 / self.fps
    }

    /// Position of `joint` at `frame`. Panics when either is out of range (use [`Motion::get`]
    /// for indices that come from a user).
    pub fn joint(&self, frame: usize, joint: usize) -> [f32; 3] {
        let o = frame * NUM_JOINTS * 3 + joint * 3;
        [
            self.positions[o],
            self.positions[o + 1],
            self.positions[o + 2],
        ]
    }
}
