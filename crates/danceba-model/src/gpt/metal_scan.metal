// Fused Metal kernels of the Mamba layer (reference §3.5), the Metal counterpart of
// cuda_scan.cu: compiled from source at run time by metal_scan.rs (feature `metal`), with fast
// math off, and checked against the portable path before first use.
//
//  * mamba_conv_silu_<T>: causal depthwise convolution (zero history) + bias + SiLU over the
//    first `d` columns of the in_proj output, one thread per (batch, position, channel).
//  * mamba_scan_<T>: softplus(Δ + bias), the selective scan from a zero state, the D skip and
//    the SiLU(z) gate, one SIMD group per (batch, channel) in a grid-stride loop; each lane keeps
//    ceil(d_state / SIMD width) states in registers, so the (L, d, d_state) state tensor never
//    reaches memory. A layer whose d_state does not fit (more than MAX_STATES_PER_LANE per lane)
//    gets NaN outputs, which the self-check rejects; the host also refuses such launches.
//
// Storage types f32, f16 and bf16 (bf16 as raw 16-bit words, so no `bfloat` type is needed);
// all arithmetic is f32.

#include <metal_stdlib>
using namespace metal;

#ifndef MAX_STATES_PER_LANE
#define MAX_STATES_PER_LANE 16
#endif

// Must match ConvParams / ScanParams in metal_scan.rs (#[repr(C)], u32 fields).
struct ConvParams {
    uint batch;
    uint len;
    uint d;
    uint k;
    uint xz_stride;
};

struct ScanParams {
    uint bc_stride;
    uint b_off;
    uint c_off;
    uint z_stride;
    uint z_off;
    uint batch;
    uint len;
    uint d;
    uint n;
};

// bf16 is stored and passed as its raw 16-bit pattern (ushort, used for nothing else here).
inline float to_f(float x) { return x; }
inline float to_f(half x) { return float(x); }
inline float to_f(ushort bf16_bits) { return as_type<float>(uint(bf16_bits) << 16); }

template <typename T> inline T from_f(float x);
template <> inline float from_f<float>(float x) { return x; }
template <> inline half from_f<half>(float x) { return half(x); }
template <> inline ushort from_f<ushort>(float x) {
    // bf16: round to nearest even, NaN kept (quiet), as half::bf16::from_f32
    const uint u = as_type<uint>(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return ushort((u >> 16) | 0x0040u);
    return ushort((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float silu_f(float v) { return v / (1.0f + exp(-v)); }

// softplus with PyTorch's threshold 20; log1p(e) as log(1+e)·e/((1+e)−1), exact e where 1+e
// rounds to 1 (the portable path's formula).
inline float softplus_f(float v) {
    if (v > 20.0f) return v;
    const float e = exp(v);
    const float u = 1.0f + e;
    return u == 1.0f ? e : log(u) * e / (u - 1.0f);
}

// xz: rows of `xz_stride` values, one per (batch, position); the convolved channels are the
// columns 0..d. w: (d, k). u: (batch, len, d).
template <typename T>
inline void conv_silu(device const T* xz, device const T* w, device const T* bias, device T* u,
                      constant ConvParams& p, uint i) {
    const uint total = p.batch * p.len * p.d;
    if (i >= total) return;
    const uint c = i % p.d;
    const uint row = i / p.d;
    const uint l = row % p.len;
    const uint b = row / p.len;
    float acc = to_f(bias[c]);
    for (uint j = 0; j < p.k; ++j) {
        // tap j multiplies x[l - (k - 1) + j]
        if (l + j + 1 >= p.k) {
            const uint src = l + j + 1 - p.k;
            acc += to_f(w[c * p.k + j]) * to_f(xz[(b * p.len + src) * p.xz_stride + c]);
        }
    }
    u[i] = from_f<T>(silu_f(acc));
}

// u, dpre, y: (batch, len, d). dt_bias, dskip: (d). a: (d, n) = -exp(A_log).
// bc: rows of bc_stride values per (batch, position), B at b_off, C at c_off (n each).
// z: rows of z_stride values per (batch, position), z at z_off.
template <typename T>
inline void scan(device const T* u, device const T* dpre, device const T* dt_bias,
                 device const T* a, device const T* bc, device const T* dskip, device const T* z,
                 device T* y, constant ScanParams& p, uint first_group, uint group_stride,
                 uint lane, uint width) {
    const uint channels = p.batch * p.d;
    const uint n = p.n;
    const bool fits = n <= width * MAX_STATES_PER_LANE;
    const uint per_lane = (n + width - 1) / width;
    // gw is the same for every lane of a SIMD group, so control flow stays uniform in it.
    for (uint gw = first_group; gw < channels; gw += group_stride) {
        const uint c = gw % p.d;
        const uint b = gw / p.d;
        if (!fits) {
            if (lane == 0) {
                for (uint l = 0; l < p.len; ++l) y[(b * p.len + l) * p.d + c] = from_f<T>(as_type<float>(0x7fc00000u));
            }
            continue;
        }
        float av[MAX_STATES_PER_LANE], h[MAX_STATES_PER_LANE];
        for (uint k = 0; k < MAX_STATES_PER_LANE; ++k) {
            const uint s = lane + width * k;
            av[k] = (k < per_lane && s < n) ? to_f(a[c * n + s]) : 0.0f;
            h[k] = 0.0f;
        }
        const float bias = to_f(dt_bias[c]);
        const float dsk = to_f(dskip[c]);
        for (uint l = 0; l < p.len; ++l) {
            const uint pos = b * p.len + l;
            const float delta = softplus_f(to_f(dpre[pos * p.d + c]) + bias);
            const float uu = to_f(u[pos * p.d + c]);
            const float du = delta * uu;
            device const T* row = bc + pos * p.bc_stride;
            float acc = 0.0f;
            for (uint k = 0; k < MAX_STATES_PER_LANE; ++k) {
                if (k >= per_lane) break;
                const uint s = lane + width * k;
                if (s < n) {
                    const float hv = exp(delta * av[k]) * h[k] + to_f(row[p.b_off + s]) * du;
                    h[k] = hv;
                    acc += hv * to_f(row[p.c_off + s]);
                }
            }
            acc = simd_sum(acc);
            if (lane == 0) {
                const float zv = to_f(z[pos * p.z_stride + p.z_off + c]);
                y[pos * p.d + c] = from_f<T>((acc + dsk * uu) * silu_f(zv));
            }
        }
    }
}

#define DANCEBA_MAMBA_KERNELS(SUFFIX, T)                                                       \
    kernel void mamba_conv_silu_##SUFFIX(                                                      \
        device const T* xz [[buffer(0)]], device const T* w [[buffer(1)]],                     \
        device const T* bias [[buffer(2)]], device T* u [[buffer(3)]],                         \
        constant ConvParams& p [[buffer(4)]], uint i [[thread_position_in_grid]]) {            \
        conv_silu<T>(xz, w, bias, u, p, i);                                                    \
    }                                                                                          \
    kernel void mamba_scan_##SUFFIX(                                                           \
        device const T* u [[buffer(0)]], device const T* dpre [[buffer(1)]],                   \
        device const T* dt_bias [[buffer(2)]], device const T* a [[buffer(3)]],                \
        device const T* bc [[buffer(4)]], device const T* dskip [[buffer(5)]],                 \
        device const T* z [[buffer(6)]], device T* y [[buffer(7)]],                            \
        constant ScanParams& p [[buffer(8)]], uint tg [[threadgroup_position_in_grid]],        \
        uint tgs [[threadgroups_per_grid]], uint sg [[simdgroup_index_in_threadgroup]],        \
        uint sgs [[simdgroups_per_threadgroup]], uint lane [[thread_index_in_simdgroup]],      \
        uint width [[threads_per_simdgroup]]) {                                                \
        scan<T>(u, dpre, dt_bias, a, bc, dskip, z, y, p, tg * sgs + sg, tgs * sgs, lane, width); \
    }

DANCEBA_MAMBA_KERNELS(f32, float)
DANCEBA_MAMBA_KERNELS(f16, half)
DANCEBA_MAMBA_KERNELS(bf16, ushort)
