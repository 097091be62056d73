// Storage-type conversions shared by the GPT's CUDA kernels (cuda_ops.cu, cuda_scan.cu,
// cuda_gemm.cu): storage types f32, f16 and bf16, arithmetic in f32.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// rounds through T (identity for f32)
template <typename T> __device__ __forceinline__ float rnd(float x) { return to_f(from_f<T>(x)); }
