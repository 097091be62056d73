//! DanceBa motion stage: `Motion`, the SMPL 24-joint skeleton, root integration, exporters
//! (npy, json, bvh, glb) and renderers (mp4/gif, html).

pub mod export;
pub mod motion;
pub mod render;
pub mod skeleton;

pub use motion::{Motion, MotionError};
