//! Torch `.pt` (zip + pickle) and safetensors checkpoint reading.
