//! danceba-audio: the official DanceBa music pre-processing, reimplemented.
//!
//! `audio file → decode (symphonia) → mono mix + libsamplerate to 3840 Hz (essentia MonoLoader)
//! → librosa 0.8.1 features (L × 438, 7.5 fps) → condition (L × 438)`.
//!
//! Every stage is a public function with its own tests against the reference (see
//! `docs/danceba-reference.md` §1–§2 and the golden files).

#![allow(clippy::needless_range_loop)]

pub mod cqt;
pub mod decode;
mod error;
pub mod features;
pub mod hpss;
pub mod mel;
pub mod mfcc;
pub mod rhythm;
pub mod stft;
pub mod util;

pub use decode::{
    check_audio_file, declared_seconds, decode_file, load_mono_3840, resample_to_3840, Pcm,
    SUPPORTED_FORMATS,
};
pub use error::AudioError;
pub use features::{
    extract_features, features_from_file, frame_count, stages_from_file, Condition, FeatureStages,
    MusicFeatures, FEATURE_DIM, MIN_SAMPLES, SAMPLE_RATE,
};
pub use util::{Mat, Mat64};
