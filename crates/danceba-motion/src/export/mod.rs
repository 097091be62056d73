//! Exporters: npy, official pkl.npy, json, bvh, glb. Atomic writes.
