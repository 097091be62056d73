// Fused elementwise / normalisation CUDA kernels of the GPT (feature `cuda`), compiled to PTX by
// build.rs and loaded by cuda_ops.rs. Storage types f32, f16, bf16; arithmetic in f32 with the
// same formulas and rounding points as candle's kernels they replace.
//
//  * rmsnorm_<T>: one block per row: y = T(x·rsqrt(mean(x²)+eps)·w)  (candle_nn::ops::rms_norm)
//  * add_rmsnorm_<T>: s = T(x + r) (r optionally T(r + bias) first) and y = rmsnorm(s) in one
//    pass; writes (2, rows, n) = [s, y].
//  * bias_act_<T>: y = act(T(x + b)) [· g] [+ r], act ∈ {identity, SiLU, GELU(erf)}; the bias
//    add after a GEMM, its activation, an optional elementwise gate and residual in one launch.
//  * silu_gate_<T>: y[r, c] = h[r, c] · T(SiLU(h[r, n + c])) (the GatedMLP's v ⊙ silu(g)).
//  * split_heads_<T>: (B, n, 3·H·hd) → q, k, v heads (3, B, H, n, hd).
//  * scale_mask_softmax_<T>: softmax(T(T(s·scale) + mask)) per row, one warp per row.

#include "cuda_common.cuh"

__device__ __forceinline__ float block_sum(float v, float* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? sh[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// x, r, s, y: (rows, n) contiguous; w: (groups, n), group g weighting the rows
// g·rpg .. (g + 1)·rpg (one group: rpg = rows). r/s may be null (plain RMSNorm); rb (n), may be
// null, is a bias added to r first: s = T(x + T(r + rb)) (a GEMM's bias add, then the residual).
template <typename T>
__device__ __forceinline__ void rmsnorm_row(const T* __restrict__ x, const T* __restrict__ r,
                                            const T* __restrict__ rb, const T* __restrict__ w,
                                            T* __restrict__ s, T* __restrict__ y, int n,
                                            float eps, int rpg) {
    __shared__ float sh[32];
    const long long base = (long long)blockIdx.x * n;
    w += (long long)(blockIdx.x / rpg) * n;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        float v = to_f(x[base + c]);
        if (r != nullptr) {
            float rv = to_f(r[base + c]);
            if (rb != nullptr) rv = rnd<T>(rv + to_f(rb[c]));
            v = rnd<T>(v + rv);
            s[base + c] = from_f<T>(v);
        }
        acc += v * v;
    }
    const float sum = block_sum(acc, sh);
    const float scale = rsqrtf(sum / n + eps);
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        // each thread re-reads the values it wrote itself: no barrier needed for s
        const float v = r != nullptr ? to_f(s[base + c]) : to_f(x[base + c]);
        y[base + c] = from_f<T>(scale * v * to_f(w[c]));
    }
}

// act: 0 identity, 1 SiLU, 2 GELU (erf). x, g, r, y: (rows, n); b: (groups, n), group j adding
// its row to the `gsize` = rows·n / groups consecutive elements j·gsize ..; g and r may be
// null. With r: y = T(r + T(v)) (the residual add after the stored result, as candle's add).
template <typename T>
__device__ __forceinline__ void bias_act(const T* __restrict__ x, const T* __restrict__ b,
                                         const T* __restrict__ g, const T* __restrict__ r,
                                         T* __restrict__ y, long long total, int n, int act,
                                         long long gsize) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    float v = rnd<T>(to_f(x[i]) + to_f(b[(i / gsize) * n + i % n]));
    if (act == 1) v = rnd<T>(v / (1.0f + expf(-v)));
    else if (act == 2) v = rnd<T>(v * normcdff(v));
    if (g != nullptr) v = v * to_f(g[i]);
    if (r != nullptr) v = to_f(r[i]) + rnd<T>(v);
    y[i] = from_f<T>(v);
}

// h: (rows, 2n); y: (rows, n).
template <typename T>
__device__ __forceinline__ void silu_gate(const T* __restrict__ h, T* __restrict__ y,
                                          long long total, int n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long row = i / n;
    const int c = (int)(i % n);
    const float gv = to_f(h[row * 2 * n + n + c]);
    const float sg = rnd<T>(gv / (1.0f + expf(-gv)));
    y[i] = from_f<T>(to_f(h[row * 2 * n + c]) * sg);
}

// qkv: (B, n, 3C) with C = H·hd; out: (3, B, H, n, hd) (q, k, v heads, contiguous).
template <typename T>
__device__ __forceinline__ void split_heads(const T* __restrict__ qkv, T* __restrict__ out,
                                            long long total, int bsz, int n, int h, int hd) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int d = (int)(i % hd);
    long long r = i / hd;
    const int p = (int)(r % n);
    r /= n;
    const int head = (int)(r % h);
    r /= h;
    const int b = (int)(r % bsz);
    const int s = (int)(r / bsz);
    const int c = h * hd;
    out[i] = qkv[((long long)b * n + p) * 3 * c + (long long)s * c + head * hd + d];
}

// One warp per row of s (rows × n): p = softmax(T(T(s·scale) + mask[row mod n])), the order of
// candle's affine, broadcast_add and softmax_last_dim kernels (f32 sums).
template <typename T>
__device__ __forceinline__ void scale_mask_softmax(const T* __restrict__ s,
                                                   const T* __restrict__ mask,
                                                   T* __restrict__ p, int rows, int n,
                                                   float scale) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const int lane = threadIdx.x;
    const long long base = (long long)row * n;
    const long long mbase = (long long)(row % n) * n;
    float mx = -INFINITY;
    for (int c = lane; c < n; c += 32) {
        const float v = rnd<T>(rnd<T>(to_f(s[base + c]) * scale) + to_f(mask[mbase + c]));
        mx = fmaxf(mx, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
    float sum = 0.0f;
    for (int c = lane; c < n; c += 32) {
        const float v = rnd<T>(rnd<T>(to_f(s[base + c]) * scale) + to_f(mask[mbase + c]));
        const float e = rnd<T>(expf(v - mx));
        sum += e;
        p[base + c] = from_f<T>(e);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    const float inv = 1.0f / sum;
    for (int c = lane; c < n; c += 32) p[base + c] = from_f<T>(to_f(p[base + c]) * inv);
}

#define OPS(T, S)                                                                               \
    extern "C" __global__ void rmsnorm_##S(const T* x, const T* w, T* y, int n, float eps,      \
                                           int rpg) {                                           \
        rmsnorm_row<T>(x, nullptr, nullptr, w, nullptr, y, n, eps, rpg);                        \
    }                                                                                           \
    extern "C" __global__ void add_rmsnorm_##S(const T* x, const T* r, const T* rb, const T* w,  \
                                               T* out, int n, float eps, int rpg) {             \
        rmsnorm_row<T>(x, r, rb, w, out, out + (long long)gridDim.x * n, n, eps, rpg);          \
    }                                                                                           \
    extern "C" __global__ void bias_act_##S(const T* x, const T* b, const T* g, const T* r,     \
                                            T* y, long long total, int n, int act,              \
                                            long long gsize) {                                  \
        bias_act<T>(x, b, g, r, y, total, n, act, gsize);                                       \
    }                                                                                           \
    extern "C" __global__ void silu_gate_##S(const T* h, T* y, long long total, int n) {       \
        silu_gate<T>(h, y, total, n);                                                           \
    }                                                                                           \
    extern "C" __global__ void split_heads_##S(const T* qkv, T* out, long long total, int bsz,  \
                                               int n, int h, int hd) {                          \
        split_heads<T>(qkv, out, total, bsz, n, h, hd);                                         \
    }                                                                                           \
    extern "C" __global__ void scale_mask_softmax_##S(const T* s, const T* mask, T* p, int rows,\
                                                      int n, float scale) {                     \
        scale_mask_softmax<T>(s, mask, p, rows, n, scale);                                      \
    }

OPS(float, f32)
OPS(__half, f16)
OPS(__nv_bfloat16, bf16)
