//! danceba-audio
