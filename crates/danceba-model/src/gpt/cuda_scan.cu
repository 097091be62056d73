// Fused CUDA kernels of the Mamba layer (reference §3.5), compiled to PTX by build.rs when the
// `cuda` feature is on and loaded by cuda_scan.rs.
//
//  * mamba_conv_silu_<T>: causal depthwise convolution (zero history) + bias + SiLU over the
//    first `d` columns of the in_proj output, one thread per (batch, position, channel).
//  * mamba_scan_<T>: softplus(Δ + bias), the selective scan from a zero state, the D skip and
//    the SiLU(z) gate, one warp per (batch, channel); each lane keeps d_state/32 states in
//    registers, so the (L, d, d_state) state tensor never reaches memory; the B and C rows are
//    staged in shared memory once per block of channels.
//
// Storage types f32, f16 and bf16; all arithmetic is f32.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define MAX_STATES_PER_LANE 8  // d_state <= 256

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

// PyTorch's softplus (beta 1, threshold 20).
__device__ __forceinline__ float softplus_f(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// xz: rows of `xz_stride` values, one per (batch, position); the convolved channels are the
// columns 0..d. w: (d, k). u: (batch, len, d).
template <typename T>
__device__ __forceinline__ void conv_silu(const T* __restrict__ xz, const T* __restrict__ w,
                                          const T* __restrict__ bias, T* __restrict__ u,
                                          int batch, int len, int d, int k, int xz_stride) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)batch * len * d;
    if (i >= total) return;
    const int c = (int)(i % d);
    const long long row = i / d;
    const int l = (int)(row % len);
    const long long b = row / len;
    float acc = to_f(bias[c]);
    for (int j = 0; j < k; ++j) {
        // tap j multiplies x[l - (k - 1) + j]
        const int src = l + j + 1 - k;
        if (src >= 0) acc += to_f(w[(long long)c * k + j]) * to_f(xz[(b * len + src) * xz_stride + c]);
    }
    u[i] = from_f<T>(silu_f(acc));
}

// u, dpre, y: (batch, len, d). dt_bias, dskip: (d). a: (d, n) = -exp(A_log).
// bc: rows of bc_stride values per (batch, position), B at b_off, C at c_off (n each).
// z: rows of z_stride values per (batch, position), z at z_off.
//
// Grid (ceil(d / warps per block), batch); one warp per channel, lane s + 32k holding state
// s + 32k. The positions go in tiles of `lt` <= 32: the block first stages the tile's B and C
// rows (shared by all its channels) in shared memory, and lane i of each warp loads Δ, u and z
// of position i of the tile, so the sequential loop reads only registers and shared memory.
// The arithmetic and its order are those of the one-warp-per-channel loop: per position
// h = exp(Δ·A)·h + B·(Δ·u), y = Σ_s h·C (xor-shuffle sum) + D·u, times SiLU(z).
template <typename T>
__device__ __forceinline__ void scan(const T* __restrict__ u, const T* __restrict__ dpre,
                                     const T* __restrict__ dt_bias, const T* __restrict__ a,
                                     const T* __restrict__ bc, int bc_stride, int b_off, int c_off,
                                     const T* __restrict__ dskip, const T* __restrict__ z,
                                     int z_stride, int z_off, T* __restrict__ y, int batch,
                                     int len, int d, int n, int lt) {
    extern __shared__ float smem[];  // B tile (lt, n), then C tile (lt, n)
    float* bs = smem;
    float* cs = smem + lt * n;
    const int warps = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int c = blockIdx.x * warps + warp;
    const long long b = blockIdx.y;
    const bool active = c < d;  // inactive warps still help stage the tiles
    float av[MAX_STATES_PER_LANE], h[MAX_STATES_PER_LANE];
#pragma unroll
    for (int k = 0; k < MAX_STATES_PER_LANE; ++k) {
        const int s = lane + 32 * k;
        av[k] = (active && s < n) ? to_f(a[(long long)c * n + s]) : 0.0f;
        h[k] = 0.0f;
    }
    const float bias = active ? to_f(dt_bias[c]) : 0.0f;
    const float dsk = active ? to_f(dskip[c]) : 0.0f;
    for (int l0 = 0; l0 < len; l0 += lt) {
        const int cnt = min(lt, len - l0);
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < cnt * n; i += blockDim.x) {
            const int l = i / n, s = i - l * n;
            const T* row = bc + (b * len + l0 + l) * bc_stride;
            bs[l * n + s] = to_f(row[b_off + s]);
            cs[l * n + s] = to_f(row[c_off + s]);
        }
        // lane i: position l0 + i of this channel
        float delta = 0.0f, uu = 0.0f, zv = 0.0f;
        const long long pos = b * len + l0 + lane;
        if (active && lane < cnt) {
            delta = softplus_f(to_f(dpre[pos * d + c]) + bias);
            uu = to_f(u[pos * d + c]);
            zv = to_f(z[pos * z_stride + z_off + c]);
        }
        const float du_lane = delta * uu;
        __syncthreads();
        float mine = 0.0f;
        if (active) {
            for (int l = 0; l < cnt; ++l) {
                const float dl = __shfl_sync(0xffffffffu, delta, l);
                const float du = __shfl_sync(0xffffffffu, du_lane, l);
                const float* brow = bs + l * n;
                const float* crow = cs + l * n;
                float acc = 0.0f;
#pragma unroll
                for (int k = 0; k < MAX_STATES_PER_LANE; ++k) {
                    const int s = lane + 32 * k;
                    if (s < n) {
                        const float hv = expf(dl * av[k]) * h[k] + brow[s] * du;
                        h[k] = hv;
                        acc += hv * crow[s];
                    }
                }
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
                if (lane == l) mine = acc;
            }
            if (lane < cnt) y[pos * d + c] = from_f<T>((mine + dsk * uu) * silu_f(zv));
        }
    }
}

#define DANCEBA_MAMBA_KERNELS(SUFFIX, T)                                                        \
    extern "C" __global__ void mamba_conv_silu_##SUFFIX(                                        \
        const T* xz, const T* w, const T* bias, T* u, int batch, int len, int d, int k,         \
        int xz_stride) {                                                                        \
        conv_silu<T>(xz, w, bias, u, batch, len, d, k, xz_stride);                              \
    }                                                                                           \
    extern "C" __global__ void mamba_scan_##SUFFIX(                                             \
        const T* u, const T* dpre, const T* dt_bias, const T* a, const T* bc, int bc_stride,    \
        int b_off, int c_off, const T* dskip, const T* z, int z_stride, int z_off, T* y,        \
        int batch, int len, int d, int n, int lt) {                                             \
        scan<T>(u, dpre, dt_bias, a, bc, bc_stride, b_off, c_off, dskip, z, z_stride, z_off, y, \
                batch, len, d, n, lt);                                                          \
    }

DANCEBA_MAMBA_KERNELS(f32, float)
DANCEBA_MAMBA_KERNELS(f16, __half)
DANCEBA_MAMBA_KERNELS(bf16, __nv_bfloat16)
