//! danceba: music in, 3D dance out. The `Pipeline` facade over the audio, model and motion crates.
