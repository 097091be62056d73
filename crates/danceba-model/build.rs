//! With the `cuda` feature: compiles the fused CUDA kernels (src/gpt/cuda_scan.cu, src/gpt/cuda_ops.cu,
//! src/gpt/cuda_gemm.cu) to PTX with
//! `nvcc`, for the compute capability in `CUDA_COMPUTE_CAP` (as candle's kernels use; default 75,
//! whose PTX the driver compiles for any newer GPU). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/gpt/cuda_scan.cu");
    println!("cargo:rerun-if-changed=src/gpt/cuda_ops.cu");
    println!("cargo:rerun-if-changed=src/gpt/cuda_gemm.cu");
    println!("cargo:rerun-if-changed=src/gpt/cuda_common.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|s| s.trim().replace('.', ""))
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
        .unwrap_or_else(|| "75".to_string());
    // the host side picks kernels by it (tensor cores from 8.0)
    println!("cargo:rustc-env=DANCEBA_CUDA_COMPUTE_CAP={cap}");
    let nvcc = std::env::var_os("NVCC").unwrap_or_else(|| "nvcc".into());
    for name in ["cuda_scan", "cuda_ops", "cuda_gemm"] {
        let src = format!("src/gpt/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed ({s}) compiling {src} for compute_{cap}"),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc (the CUDA toolkit) on PATH or in $NVCC: {e} ({})",
                PathBuf::from(&nvcc).display()
            ),
        }
    }
}
