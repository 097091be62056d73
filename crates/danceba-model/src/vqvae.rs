//! SepVQVAER: codebooks, decoders (up, down, root) and encoders.
