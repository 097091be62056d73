//! DanceBa model stage: checkpoint I/O (torch `.pt` and safetensors), architecture detection and
//! key audit, the GPT (`CrossCondGPT2`) with its sampler, and the SepVQVAER decoder/encoder.
//!
//! Every module follows `docs/design.md`: sizes come from the checkpoint, the portable candle path
//! is the oracle, and fused kernels are tested against it.

pub mod arch;
pub mod checkpoint;
pub mod device;
pub mod gpt;
pub mod vqvae;
