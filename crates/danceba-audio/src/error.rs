//! Typed errors of the audio crate.

use std::path::PathBuf;

/// Everything that can go wrong between an audio file and the feature matrix.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is empty (0 bytes); give an audio file")]
    EmptyFile { path: PathBuf },
    #[error(
        "{path}: not a recognised audio file ({detail}). Supported formats: {}",
        crate::decode::SUPPORTED_FORMATS
    )]
    UnsupportedFormat { path: PathBuf, detail: String },
    #[error(
        "{path}: the audio codec is not supported ({detail}). Supported formats: {}",
        crate::decode::SUPPORTED_FORMATS
    )]
    UnsupportedCodec { path: PathBuf, detail: String },
    #[error("{path}: decoding failed: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("{path}: the file holds no audio samples")]
    NoAudio { path: PathBuf },
    #[error("{path}: sample rate {rate} Hz is outside the supported range 3840..=384000 Hz")]
    SampleRate { path: PathBuf, rate: u32 },
    #[error("audio contains a non-finite sample (NaN or infinity) at sample {index}; the file is corrupt")]
    NonFinite { index: usize },
    #[error(
        "audio too short: {samples} samples at 3840 Hz ({seconds:.3} s); the features need at least \
         {min_samples} samples at 3840 Hz ({min_seconds:.3} s, 3 feature frames)"
    )]
    TooShort {
        samples: usize,
        seconds: f64,
        min_samples: usize,
        min_seconds: f64,
    },
    #[error("resampler error: {0}")]
    Resample(String),
    #[error("invalid feature data: {0}")]
    InvalidFeatures(String),
    #[error("{path}: {detail}")]
    Format { path: PathBuf, detail: String },
}
