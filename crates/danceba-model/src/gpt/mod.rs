//! The DanceBa GPT (`CrossCondGPT2`): LPE, base blocks, Mamba head blocks, sampler.
