// Fused CUDA kernels of the Mamba layer (reference §3.5), compiled to PTX by build.rs when the
// `cuda` feature is on and loaded by cuda_scan.rs.
//
//  * mamba_conv_silu_<T>: causal depthwise convolution (zero history) + bias + SiLU over the
//    first `d` columns of the in_proj output, one thread per (batch, position, channel).
//  * mamba_scan_<T>_g<G>_s<S>_c<CH>: softplus(Δ + bias), the selective scan from a zero state,
//    the D skip and the SiLU(z) gate. G lanes per group of CH channels (1 or 2), each holding S
//    states of each channel in registers (so the (L, d, d_state) state tensor never reaches
//    memory); the B and C rows and the channels' Δ, u and z of a tile of positions are staged
//    in shared memory once per block of channels. With two channels every B and C value a lane
//    reads from shared memory serves two state updates.
//
// Both kernels take their per-channel weights in groups: batch item b uses group b / gb (`gb`
// batch items per group), so one launch runs the three streams of a Block_Head, each with its
// own Mamba weights (one group: gb = batch).
//
// Storage types f32, f16 and bf16; all arithmetic is f32.

#include "cuda_common.cuh"

__device__ __forceinline__ float silu_f(float v) { return v / (1.0f + expf(-v)); }

// PyTorch's softplus (beta 1, threshold 20).
__device__ __forceinline__ float softplus_f(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// 2^t on the special-function unit, results below 2^-126 flushed to 0 (exp2f adds three
// instructions per call to keep denormal results; a decay factor below 2^-126 is 0 anyway).
__device__ __forceinline__ float exp2_mufu(float t) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(t));
    return y;
}

// 2^t on the FMA pipe, for t <= 0 (the scan's decays): t = n + f with n the nearest integer,
// 2^f by the degree-6 polynomial of the CPU scan (scan.rs EXP2_POLY), n added to the exponent
// bits. Below -126 it gives at most 2^-126. The scan computes one state in eight this way, so
// that the special-function unit, not the instruction issue, no longer bounds it alone.
__device__ __forceinline__ float exp2_fma(float t) {
    t = fmaxf(t, -126.0f);
    const float s = t + 12582912.0f;  // 1.5 * 2^23: its low mantissa bits hold round(t)
    const float f = t - (s - 12582912.0f);
    float p = 1.5461445e-4f;
    p = fmaf(p, f, 1.3400428e-3f);
    p = fmaf(p, f, 9.618057e-3f);
    p = fmaf(p, f, 5.550327e-2f);
    p = fmaf(p, f, 2.402265e-1f);
    p = fmaf(p, f, 6.931472e-1f);
    p = fmaf(p, f, 1.0f);
    // (bits(s) << 23) is round(t) << 23 modulo 2^32: the exponent of p plus round(t)
    return __int_as_float(__float_as_int(p) + (__float_as_int(s) << 23));
}

// xz: rows of `xz_stride` values, one per (batch, position); the convolved channels are the
// columns 0..d. w: (d, k). u: (batch, len, d). Grid (ceil(d / blockDim.x), len, batch): one
// thread per output.
template <typename T>
__device__ __forceinline__ void conv_silu(const T* __restrict__ xz, const T* __restrict__ w,
                                          const T* __restrict__ bias, T* __restrict__ u,
                                          int len, int d, int k, int xz_stride) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    const int l = blockIdx.y;
    const long long row0 = (long long)blockIdx.z * len;  // this batch item's first row
    float acc = to_f(bias[c]);
    const T* wc = w + (long long)c * k;
    // tap j multiplies x[l - (k - 1) + j]; the taps before position 0 are zeros
#pragma unroll 4
    for (int j = max(0, k - 1 - l); j < k; ++j)
        acc += to_f(wc[j]) * to_f(xz[(row0 + l - (k - 1) + j) * xz_stride + c]);
    u[(row0 + l) * d + c] = from_f<T>(silu_f(acc));
}

// 16 bytes of T (4 floats or 8 halves) widened to f32.
__device__ __forceinline__ void widen16(const uint4& r, float* o, float) {
    o[0] = __uint_as_float(r.x);
    o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z);
    o[3] = __uint_as_float(r.w);
}
__device__ __forceinline__ void widen16(const uint4& r, float* o, __half) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void widen16(const uint4& r, float* o, __nv_bfloat16) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        o[2 * i] = __low2float(h[i]);
        o[2 * i + 1] = __high2float(h[i]);
    }
}

// u, dpre, y: (batch, len, d). dt_bias, dskip: (d). a: (d, n) = -exp(A_log).
// bc: rows of bc_stride values per (batch, position), B at b_off, C at c_off (n each).
// z: rows of z_stride values per (batch, position), z at z_off.
//
// Grid (ceil(d / (CH·THREADS / G)), batch), THREADS threads per block: G consecutive lanes per
// group of CH consecutive channels, lane j holding the states 4(j + G·m) + i (m < S/4, i < 4)
// of each, so that a lane reads its B and C values as float4s and the G lanes cover G·S >= n
// states (the missing ones are zeros: A = B = C = 0 keeps them at 0). Positions go in tiles of `lt` (a multiple of 4):
//  1. the block stages the tile's B and C rows (shared by its channels; 16-byte loads where the
//     layout allows) and its channels' Δ = softplus(dpre + bias), u and z in shared memory, all
//     of a thread's loads issued before its stores (rows past the end as zeros: Δ = 0 leaves h
//     unchanged);
//  2. per 4 positions each lane updates its states, h = exp(Δ·A)·h + B·(Δ·u), and sums h·C
//     over them; per channel the G lanes' 4 partial sums are reduced with a transposing
//     butterfly (3 shuffles for the 4 positions; with two channels one more transposing step
//     over lanes j and j ^ 4; then log2(G/4) or log2(G/8) more) that leaves position j % 4's
//     total of channel j / 4 in lane j, which stores it. exp(Δ·A) is computed as exp2(Δ·(A·log2 e)), A scaled once, on
//     the special-function unit except for one state in eight (exp2_fma);
//  3. the block writes y = (C·h + D·u)·SiLU(z) for the tile, consecutive threads on
//     consecutive channels.
template <typename T, int G, int S, int CH, int THREADS>
__device__ __forceinline__ void scan(const T* __restrict__ u, const T* __restrict__ dpre,
                                     const T* __restrict__ dt_bias, const T* __restrict__ a,
                                     const T* __restrict__ bc, int bc_stride, int b_off, int c_off,
                                     const T* __restrict__ dskip, const T* __restrict__ z,
                                     int z_stride, int z_off, T* __restrict__ y, int len, int d,
                                     int n, int lt) {
    static_assert(G >= 4 && G <= 32 && (G & (G - 1)) == 0, "G: 4, 8, 16 or 32 lanes");
    static_assert(S >= 4 && (S & (S - 1)) == 0, "S: a power of two >= 4");
    static_assert(THREADS % 32 == 0 && THREADS % G == 0, "whole warps of whole channels");
    static_assert(CH == 1 || (CH == 2 && G >= 8), "CH: 1 or 2 channels per lane group");
    constexpr int CPB = CH * THREADS / G;  // channels per block
    constexpr int RPS = THREADS / CPB;     // positions per staging pass of the block
    constexpr int NP = G * S;         // staged states per row (n padded with zeros)
    constexpr int V = 16 / sizeof(T);  // values per 16-byte load
    constexpr int QPR = NP / V;       // 16-byte chunks per staged row
    constexpr int SR = 4;             // 16-byte loads (of B and of C) in flight per thread
    constexpr unsigned FULL = 0xffffffffu;
    extern __shared__ float4 smem4[];
    float* bs = reinterpret_cast<float*>(smem4);  // B (lt, NP)
    float* cs = bs + lt * NP;                     // C (lt, NP)
    float* ds = cs + lt * NP;                     // Δ (lt, CPB)
    float* us = ds + lt * CPB;                    // u (lt, CPB)
    float* zs = us + lt * CPB;                    // z (lt, CPB)
    float* ys = zs + lt * CPB;                    // C·h (lt, CPB)
    const int tid = threadIdx.x;
    const int c0 = blockIdx.x * CPB;
    const long long b = blockIdx.y;
    // the scan: lane j of the lane group of channels cl..cl + CH
    const int cl = CH * (tid / G), j = tid % G;
    // staging and output: channel c0 + tid % CPB at positions tid / CPB + RPS·i
    const int cw = c0 + tid % CPB;
    const bool cw_ok = cw < d;
    const float bias = cw_ok ? to_f(dt_bias[cw]) : 0.0f;
    const float dsk = cw_ok ? to_f(dskip[cw]) : 0.0f;
    // B and C rows can be read 16 bytes at a time
    const bool vec = n % V == 0 && bc_stride % V == 0 && b_off % V == 0 && c_off % V == 0 &&
                     (reinterpret_cast<unsigned long long>(bc) & 15) == 0;
    float av[CH][S], h[CH][S];
#pragma unroll
    for (int q = 0; q < CH; ++q) {
        const int c = c0 + cl + q;
#pragma unroll
        for (int k = 0; k < S; ++k) {
            const int s = 4 * (j + G * (k / 4)) + k % 4;
            av[q][k] =
                (c < d && s < n) ? to_f(a[(long long)c * n + s]) * 1.44269504088896341f : 0.0f;
            h[q][k] = 0.0f;
        }
    }
    for (int l0 = 0; l0 < len; l0 += lt) {
        const int cnt = min(lt, len - l0);
        const int cnt4 = (cnt + 3) & ~3;  // <= lt
        __syncthreads();                  // the previous tile is no longer read
        // 1. staging
        const T* bcb = bc + (b * len + l0) * bc_stride;
        if (vec) {
            for (int q0 = 0; q0 < cnt4 * QPR; q0 += SR * THREADS) {
                uint4 rb[SR], rc[SR];
#pragma unroll
                for (int r = 0; r < SR; ++r) {
                    const int q = q0 + r * THREADS + tid;
                    const int l = q / QPR, s = (q % QPR) * V;
                    rb[r] = make_uint4(0, 0, 0, 0);
                    rc[r] = rb[r];
                    if (l < cnt && s < n) {
                        const T* row = bcb + (long long)l * bc_stride;
                        rb[r] = *reinterpret_cast<const uint4*>(row + b_off + s);
                        rc[r] = *reinterpret_cast<const uint4*>(row + c_off + s);
                    }
                }
#pragma unroll
                for (int r = 0; r < SR; ++r) {
                    const int q = q0 + r * THREADS + tid;
                    if (q < cnt4 * QPR) {
                        float fb[V], fc[V];
                        widen16(rb[r], fb, T());
                        widen16(rc[r], fc, T());
#pragma unroll
                        for (int i = 0; i < V / 4; ++i) {
                            smem4[q * (V / 4) + i] =
                                make_float4(fb[4 * i], fb[4 * i + 1], fb[4 * i + 2], fb[4 * i + 3]);
                            smem4[lt * NP / 4 + q * (V / 4) + i] =
                                make_float4(fc[4 * i], fc[4 * i + 1], fc[4 * i + 2], fc[4 * i + 3]);
                        }
                    }
                }
            }
        } else {
            for (int i0 = 0; i0 < cnt4 * NP; i0 += 2 * SR * THREADS) {
                float vb[2 * SR], vc[2 * SR];
#pragma unroll
                for (int r = 0; r < 2 * SR; ++r) {
                    const int i = i0 + r * THREADS + tid;
                    const int l = i / NP, s = i % NP;
                    vb[r] = 0.0f;
                    vc[r] = 0.0f;
                    if (l < cnt && s < n) {
                        const T* row = bcb + (long long)l * bc_stride;
                        vb[r] = to_f(row[b_off + s]);
                        vc[r] = to_f(row[c_off + s]);
                    }
                }
#pragma unroll
                for (int r = 0; r < 2 * SR; ++r) {
                    const int i = i0 + r * THREADS + tid;
                    if (i < cnt4 * NP) {
                        bs[i] = vb[r];
                        cs[i] = vc[r];
                    }
                }
            }
        }
        for (int l1 = tid / CPB; l1 < cnt4; l1 += 2 * RPS) {
            float vd[2], vu[2], vz[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int l = l1 + r * RPS;
                vd[r] = 0.0f;
                vu[r] = 0.0f;
                vz[r] = 0.0f;
                if (l < cnt && cw_ok) {
                    const long long pos = b * len + l0 + l;
                    vd[r] = to_f(dpre[pos * d + cw]);
                    vu[r] = to_f(u[pos * d + cw]);
                    vz[r] = to_f(z[pos * z_stride + z_off + cw]);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int l = l1 + r * RPS;
                if (l < cnt4) {
                    const int i = l * CPB + tid % CPB;
                    ds[i] = (l < cnt && cw_ok) ? softplus_f(vd[r] + bias) : 0.0f;
                    us[i] = vu[r];
                    zs[i] = vz[r];
                }
            }
        }
        __syncthreads();
        // 2. the recurrence, 4 positions at a time
        for (int l = 0; l < cnt4; l += 4) {
            float acc[CH][4];
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                float dl[CH], du[CH], sum[CH];
#pragma unroll
                for (int q = 0; q < CH; ++q) {
                    dl[q] = ds[(l + p) * CPB + cl + q];
                    du[q] = dl[q] * us[(l + p) * CPB + cl + q];
                    sum[q] = 0.0f;
                }
                const float4* brow = reinterpret_cast<const float4*>(bs + (l + p) * NP) + j;
                const float4* crow = reinterpret_cast<const float4*>(cs + (l + p) * NP) + j;
#pragma unroll
                for (int m = 0; m < S / 4; ++m) {
                    const float4 bv = brow[G * m], cv = crow[G * m];
                    const float bb[4] = {bv.x, bv.y, bv.z, bv.w};
                    const float cc[4] = {cv.x, cv.y, cv.z, cv.w};
#pragma unroll
                    for (int q = 0; q < CH; ++q) {
#pragma unroll
                        for (int i = 0; i < 4; ++i) {
                            const int k = 4 * m + i;
                            const float e = (CH * k + q) % 8 == 7 ? exp2_fma(dl[q] * av[q][k])
                                                                  : exp2_mufu(dl[q] * av[q][k]);
                            h[q][k] = e * h[q][k] + bb[i] * du[q];
                            sum[q] += h[q][k] * cc[i];
                        }
                    }
                }
#pragma unroll
                for (int q = 0; q < CH; ++q) acc[q][p] = sum[q];
            }
            // per channel, a transposing butterfly leaves position (j % 4)'s partial sum of
            // lanes j, j ^ 1, j ^ 2, j ^ 3 in lane j
            const bool odd = j & 1, two = j & 2;
            float r[CH];
#pragma unroll
            for (int q = 0; q < CH; ++q) {
                const float* ac = acc[q];
                const float w0 = (odd ? ac[1] : ac[0]) + __shfl_xor_sync(FULL, odd ? ac[0] : ac[1], 1);
                const float w1 = (odd ? ac[3] : ac[2]) + __shfl_xor_sync(FULL, odd ? ac[2] : ac[3], 1);
                r[q] = (two ? w1 : w0) + __shfl_xor_sync(FULL, two ? w0 : w1, 2);
            }
            float t;
            if constexpr (CH == 2) {
                // lanes with j & 4 take the second channel: one more transposing step
                const bool hi = j & 4;
                t = (hi ? r[1] : r[0]) + __shfl_xor_sync(FULL, hi ? r[0] : r[1], 4);
#pragma unroll
                for (int o = 8; o < G; o <<= 1) t += __shfl_xor_sync(FULL, t, o);
            } else {
                t = r[0];
#pragma unroll
                for (int o = 4; o < G; o <<= 1) t += __shfl_xor_sync(FULL, t, o);
            }
            // lane j < 4·CH holds position j % 4 of channel cl + j / 4
            if (j < 4 * CH) ys[(l + j % 4) * CPB + cl + j / 4] = t;
        }
        __syncthreads();
        // 3. the gated output
        if (cw_ok) {
            for (int l = tid / CPB; l < cnt; l += RPS) {
                const int i = l * CPB + tid % CPB;
                y[(b * len + l0 + l) * d + cw] = from_f<T>((ys[i] + dsk * us[i]) * silu_f(zs[i]));
            }
        }
    }
}

// Threads per block of the scan kernels (cuda_scan.rs uses the same number).
#define SCAN_THREADS 128

// MINB: blocks per SM the registers must allow (__launch_bounds__; cuda_scan.rs sizes the
// position tiles so that shared memory allows as many).
#define DANCEBA_MAMBA_SCAN(SUFFIX, T, G, S, CH, MINB)                                             \
    extern "C" __global__ void __launch_bounds__(SCAN_THREADS, MINB)                              \
        mamba_scan_##SUFFIX##_g##G##_s##S##_c##CH(const T* u, const T* dpre, const T* dt_bias,            \
                                          const T* a, const T* bc, int bc_stride, int b_off,      \
                                          int c_off, const T* dskip, const T* z, int z_stride,    \
                                          int z_off, T* y, int len, int d, int n, int lt,        \
                                          int gb) {                                               \
        const long long g = blockIdx.y / gb; /* the batch item's weight group */                   \
        scan<T, G, S, CH, SCAN_THREADS>(u, dpre, dt_bias + g * d, a + g * d * n, bc, bc_stride, b_off, \
                                    c_off, dskip + g * d, z, z_stride, z_off, y, len, d, n, lt);  \
    }

#define DANCEBA_MAMBA_KERNELS(SUFFIX, T)                                                        \
    extern "C" __global__ void mamba_conv_silu_##SUFFIX(const T* xz, const T* w, const T* bias, \
                                                        T* u, int len, int d, int k,            \
                                                        int xz_stride, int gb) {                \
        const long long g = blockIdx.z / gb; /* the batch item's weight group */                  \
        conv_silu<T>(xz, w + g * d * k, bias + g * d, u, len, d, k, xz_stride);                 \
    }                                                                                           \
    DANCEBA_MAMBA_SCAN(SUFFIX, T, 4, 4, 1, 1)                                                      \
    DANCEBA_MAMBA_SCAN(SUFFIX, T, 8, 4, 1, 1)                                                      \
    DANCEBA_MAMBA_SCAN(SUFFIX, T, 8, 8, 1, 1)                                                      \
    DANCEBA_MAMBA_SCAN(SUFFIX, T, 8, 16, 1, 5)                                                     \
    DANCEBA_MAMBA_SCAN(SUFFIX, T, 32, 8, 1, 1)                                                     \
    DANCEBA_MAMBA_SCAN(SUFFIX, T, 16, 8, 2, 5)

DANCEBA_MAMBA_KERNELS(f32, float)
DANCEBA_MAMBA_KERNELS(f16, __half)
DANCEBA_MAMBA_KERNELS(bf16, __nv_bfloat16)
