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
    #[error("frame rate must be a positive finite number, got {0}")]
    BadFps(f32),
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
    pub fn new(positions: Vec<f32>, fps: f32) -> Result<Self, MotionError> {
        if !(fps.is_finite() && fps > 0.0) {
            return Err(MotionError::BadFps(fps));
        }
        if positions.len() % (NUM_JOINTS * 3) != 0 {
            return Err(MotionError::BadLength {
                len: positions.len(),
            });
        }
        if positions.is_empty() {
            return Err(MotionError::Empty);
        }
        if let Some(i) = positions.iter().position(|v| !v.is_finite()) {
            return Err(MotionError::NotFinite {
                frame: i / (NUM_JOINTS * 3),
                joint: (i % (NUM_JOINTS * 3)) / 3,
                value: positions[i],
            });
        }
        Ok(Self { fps, positions })
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.positions.len() / (NUM_JOINTS * 3)
    }

    /// Duration in seconds.
    pub fn seconds(&self) -> f32 {
        self.frames() as f32 / self.fps
    }

    /// Position of `joint` at `frame`.
    pub fn joint(&self, frame: usize, joint: usize) -> [f32; 3] {
        let o = frame * NUM_JOINTS * 3 + joint * 3;
        [
            self.positions[o],
            self.positions[o + 1],
            self.positions[o + 2],
        ]
    }
}
