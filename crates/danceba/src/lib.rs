//! danceba: music in, 3D dance out. The `Pipeline` facade over the audio, model and motion crates.

pub mod page_audio;
pub mod pipeline;
pub mod weights;

pub use pipeline::{
    read_features, Dance, Decoder, InputKind, ModelFiles, Pipeline, PipelineError, PipelineOptions,
    MOTION_FPS,
};
