// Fused elementwise / normalisation CUDA kernels of the GPT (feature `cuda`), compiled to PTX by
// build.rs and loaded by cuda_ops.rs. Storage types f32, f16, bf16; arithmetic in f32 with the
// same formulas and rounding points as candle's kernels they replace.
//
//  * rmsnorm_<T>_v<V>: one block per row: y = T(x·rsqrt(mean(x²)+eps)·w)
//    (candle_nn::ops::rms_norm)
//  * add_rmsnorm_<T>_v<V>: s = T(x + r) (r optionally T(r + bias) first) and y = rmsnorm(s) in
//    one pass; writes (2, rows, n) = [s, y].
//  * bias_act_<T>_v<V>: y = act(T(x + b)) [· g] [+ r], act ∈ {identity, SiLU, GELU(erf)}; the
//    bias add after a GEMM (or none: a plain residual add), its activation, an optional
//    elementwise gate and residual in one launch.
//  * silu_gate_<T>_v<V>: y[r, c] = h[r, c] · T(SiLU(h[r, n + c])) (the GatedMLP's v ⊙ silu(g)).
//  * split_heads_<T>_v<V>: (B, n, 3·H·hd) (+ bias) → q, k, v heads (3, B, H, n, hd).
//  * swap_mid_<T>_v<V>: (A, M, N, D) → (A, N, M, D), optionally with the LPE's bias + batch
//    norm + ReLU.
//  * embed_<T>_v<V>: the GPT's input rows (condition embedding, token lookups, + position
//    scale × LPE) in one launch.
//    (V: values per vector access, 1, 2 or 4.)
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

// V consecutive values of T, loaded and stored as one (aligned) vector access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> ld(const T* p) {
    return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void st(T* p, const Pack<T, V>& v) {
    *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// x, r, s, y: (rows, n) contiguous; w: (groups, n), group g weighting the rows
// g·rpg .. (g + 1)·rpg (one group: rpg = rows). r/s may be null (plain RMSNorm); rb (n), may be
// null, is a bias added to r first: s = T(x + T(r + rb)) (a GEMM's bias add, then the residual).
// One block per row, each thread V consecutive values at a time (n and every row start
// V-aligned: checked by the host).
template <typename T, int V>
__device__ __forceinline__ void rmsnorm_row(const T* __restrict__ x, const T* __restrict__ r,
                                            const T* __restrict__ rb, const T* __restrict__ w,
                                            T* __restrict__ s, T* __restrict__ y, int n,
                                            float eps, int rpg) {
    __shared__ float sh[32];
    const long long base = (long long)blockIdx.x * n;
    w += (long long)(blockIdx.x / rpg) * n;
    float acc = 0.0f;
    for (int c = threadIdx.x * V; c < n; c += blockDim.x * V) {
        Pack<T, V> xv = ld<T, V>(x + base + c);
        if (r != nullptr) {
            const Pack<T, V> rv = ld<T, V>(r + base + c);
            Pack<T, V> bv;
            if (rb != nullptr) bv = ld<T, V>(rb + c);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float rf = to_f(rv.v[k]);
                if (rb != nullptr) rf = rnd<T>(rf + to_f(bv.v[k]));
                xv.v[k] = from_f<T>(to_f(xv.v[k]) + rf);
            }
            st<T, V>(s + base + c, xv);
        }
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float v = to_f(xv.v[k]);
            acc += v * v;
        }
    }
    const float sum = block_sum(acc, sh);
    const float scale = rsqrtf(sum / n + eps);
    for (int c = threadIdx.x * V; c < n; c += blockDim.x * V) {
        // each thread re-reads the values it wrote itself: no barrier needed for s
        const Pack<T, V> xv = ld<T, V>((r != nullptr ? s : x) + base + c);
        const Pack<T, V> wv = ld<T, V>(w + c);
        Pack<T, V> o;
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = from_f<T>(scale * to_f(xv.v[k]) * to_f(wv.v[k]));
        st<T, V>(y + base + c, o);
    }
}

// The row-wise kernels below run on 2-D launches: threadIdx.x/blockIdx.x over the columns, V at
// a time (n % V == 0, every row start V-aligned: checked by the host), threadIdx.y/blockIdx.y
// over the rows, looping when there are more rows than the grid has (its y is capped at 65535).
// No per-element division: the row's offsets are computed once per row.
#define ROW_LOOP(rows)                                                           \
    for (int row = blockIdx.y * blockDim.y + threadIdx.y; row < (rows);          \
         row += gridDim.y * blockDim.y)
__device__ __forceinline__ int col0(int v) { return (blockIdx.x * blockDim.x + threadIdx.x) * v; }

// act: 0 identity, 1 SiLU, 2 GELU (erf). x, g, r, y: (rows, n); b: (groups, n) or null (no
// bias), bias row row / rpg adding to row `row`; g and r may be null. With r: y = T(r + T(v))
// (the residual add after the stored result, as candle's add).
template <typename T, int V>
__device__ __forceinline__ void bias_act(const T* __restrict__ x, const T* __restrict__ b,
                                         const T* __restrict__ g, const T* __restrict__ r,
                                         T* __restrict__ y, int rows, int n, int act, int rpg) {
    const int c = col0(V);
    if (c >= n) return;
    ROW_LOOP(rows) {
        const long long i = (long long)row * n + c;
        const Pack<T, V> xv = ld<T, V>(x + i);
        Pack<T, V> bv, gv, rv, out;
        if (b != nullptr) bv = ld<T, V>(b + (long long)(row / rpg) * n + c);
        if (g != nullptr) gv = ld<T, V>(g + i);
        if (r != nullptr) rv = ld<T, V>(r + i);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            float v = to_f(xv.v[k]);
            if (b != nullptr) v = rnd<T>(v + to_f(bv.v[k]));
            if (act == 1) v = rnd<T>(v / (1.0f + expf(-v)));
            else if (act == 2) v = rnd<T>(v * normcdff(v));
            if (g != nullptr) v = __fmul_rn(v, to_f(gv.v[k]));  // rounded before the residual add
            if (r != nullptr) v = to_f(rv.v[k]) + rnd<T>(v);
            out.v[k] = from_f<T>(v);
        }
        st<T, V>(y + i, out);
    }
}

// h: (rows, 2n); y: (rows, n).
template <typename T, int V>
__device__ __forceinline__ void silu_gate(const T* __restrict__ h, T* __restrict__ y, int rows,
                                          int n) {
    const int c = col0(V);
    if (c >= n) return;
    ROW_LOOP(rows) {
        const T* hr = h + (long long)row * 2 * n;
        const Pack<T, V> vv = ld<T, V>(hr + c), gv = ld<T, V>(hr + n + c);
        Pack<T, V> out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float gf = to_f(gv.v[k]);
            const float sg = rnd<T>(gf / (1.0f + expf(-gf)));
            out.v[k] = from_f<T>(to_f(vv.v[k]) * sg);
        }
        st<T, V>(y + (long long)row * n + c, out);
    }
}

// qkv: (B, n, 3C) with C = H·hd, one row per (batch item, position); out: (3, B, H, n, hd) (q, k,
// v heads, contiguous), T(qkv + bias) when the projection's bias (3C) is given. hd % V == 0, so
// a vector never straddles two heads.
template <typename T, int V>
__device__ __forceinline__ void split_heads(const T* __restrict__ qkv, const T* __restrict__ bias,
                                            T* __restrict__ out, int bsz, int n, int h, int hd) {
    const int c3 = 3 * h * hd;
    const int col = col0(V);
    if (col >= c3) return;
    const int s = col / (h * hd), rem = col - s * (h * hd);
    const int head = rem / hd, d = rem - head * hd;
    ROW_LOOP(bsz * n) {
        const int b = row / n, p = row - b * n;
        const long long o = ((((long long)s * bsz + b) * h + head) * n + p) * hd + d;
        Pack<T, V> v = ld<T, V>(qkv + (long long)row * c3 + col);
        if (bias != nullptr) {
            const Pack<T, V> bv = ld<T, V>(bias + col);
#pragma unroll
            for (int k = 0; k < V; ++k) v.v[k] = from_f<T>(to_f(v.v[k]) + to_f(bv.v[k]));
        }
        st<T, V>(out + o, v);
    }
}

// x (A, M, N, D) → y (A, N, M, D): the middle axes swapped, rows of D contiguous values moved
// whole (a head merge (B, H, n, hd) → (B, n, H·hd), the stream-major reorder of the head blocks
// and back). With p (M, 3, C), C dividing D: the LPE's bias, batch norm and ReLU on the way,
// y = relu(T(T(T(x + p[m][0][c])·p[m][1][c]) + p[m][2][c])) with c the column modulo C (the
// rounding points of candle's broadcast add, mul, add and relu).
template <typename T, int V>
__device__ __forceinline__ void swap_mid(const T* __restrict__ x, T* __restrict__ y, int a_n,
                                         int m_n, int n_n, int d_n, const T* __restrict__ p,
                                         int cn) {
    const int col = col0(V);
    if (col >= d_n) return;
    const int pc = p != nullptr ? col % cn : 0;
    ROW_LOOP(a_n * n_n * m_n) {
        // output row (a, nn, m) reads input row (a, m, nn)
        const int m = row % m_n, q = row / m_n;
        const int nn = q % n_n, a = q / n_n;
        const long long src = (((long long)a * m_n + m) * n_n + nn) * d_n + col;
        Pack<T, V> v = ld<T, V>(x + src);
        if (p != nullptr) {
            const T* pm = p + (long long)m * 3 * cn + pc;
            const Pack<T, V> bias = ld<T, V>(pm), scale = ld<T, V>(pm + cn),
                             shift = ld<T, V>(pm + 2 * cn);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                float f = rnd<T>(to_f(v.v[k]) + to_f(bias.v[k]));
                f = rnd<T>(__fmul_rn(f, to_f(scale.v[k])));  // no FMA with the add
                f = rnd<T>(f + to_f(shift.v[k]));
                v.v[k] = from_f<T>(fmaxf(f, 0.0f));
            }
        }
        st<T, V>(y + (long long)row * d_n + col, v);
    }
}

// The GPT's input rows: out (B, 3t, C), batch item b's rows 0..t the condition embedding ce
// (B, t, C), rows t..2t and 2t..3t the embeddings of the up / down token ids (B, t) from their
// tables (vocab, C), each plus T(lpe[b, r]·scale) (lpe: (B, lpe_rows, C), the LPE output before
// its [:3t] slice; scale already rounded to T): the concatenation, the lookups, candle's affine
// and its add in one launch. An id out of its table (checked on the host before upload) gives NaN.
template <typename T, int V>
__device__ __forceinline__ void embed(const T* __restrict__ ce, const T* __restrict__ tab_up,
                                      const T* __restrict__ tab_down,
                                      const unsigned* __restrict__ up,
                                      const unsigned* __restrict__ down, const T* __restrict__ lpe,
                                      int lpe_rows, float scale, T* __restrict__ out, int bsz,
                                      int t, int cn, int vocab_up, int vocab_down) {
    const int c = col0(V);
    if (c >= cn) return;
    ROW_LOOP(bsz * 3 * t) {
        const int b = row / (3 * t), r = row - b * 3 * t;
        const T* src = nullptr;
        if (r < t) {
            src = ce + ((long long)b * t + r) * cn;
        } else if (r < 2 * t) {
            const unsigned id = up[b * t + r - t];
            if (id < (unsigned)vocab_up) src = tab_up + (long long)id * cn;
        } else {
            const unsigned id = down[b * t + r - 2 * t];
            if (id < (unsigned)vocab_down) src = tab_down + (long long)id * cn;
        }
        const Pack<T, V> pv = ld<T, V>(lpe + ((long long)b * lpe_rows + r) * cn + c);
        Pack<T, V> ev, o;
        if (src != nullptr) ev = ld<T, V>(src + c);
#pragma unroll
        for (int k = 0; k < V; ++k) {
            const float e = src != nullptr ? to_f(ev.v[k]) : __int_as_float(0x7fc00000);
            const float p = rnd<T>(__fmul_rn(to_f(pv.v[k]), scale));  // no FMA with the add
            o.v[k] = from_f<T>(e + p);
        }
        st<T, V>(out + (long long)row * cn + c, o);
    }
}

// One warp per row of s (rows × n): p = softmax(T(T(s·scale) + mask[row mod m])), the order of
// candle's affine, broadcast_add and softmax_last_dim kernels (f32 sums). mask: (m, n).
template <typename T>
__device__ __forceinline__ void scale_mask_softmax(const T* __restrict__ s,
                                                   const T* __restrict__ mask,
                                                   T* __restrict__ p, int rows, int n, int m,
                                                   float scale) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const int lane = threadIdx.x;
    const long long base = (long long)row * n;
    const long long mbase = (long long)(row % m) * n;
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

#define VEC_OPS(T, S, V)                                                                        \
    extern "C" __global__ void rmsnorm_##S##_v##V(const T* x, const T* w, T* y, int n,          \
                                                  float eps, int rpg) {                         \
        rmsnorm_row<T, V>(x, nullptr, nullptr, w, nullptr, y, n, eps, rpg);                     \
    }                                                                                           \
    extern "C" __global__ void add_rmsnorm_##S##_v##V(const T* x, const T* r, const T* rb,      \
                                                      const T* w, T* out, int n, float eps,     \
                                                      int rpg) {                                \
        rmsnorm_row<T, V>(x, r, rb, w, out, out + (long long)gridDim.x * n, n, eps, rpg);       \
    }                                                                                           \
    extern "C" __global__ void bias_act_##S##_v##V(const T* x, const T* b, const T* g,          \
                                                   const T* r, T* y, int rows, int n, int act,  \
                                                   int rpg) {                                   \
        bias_act<T, V>(x, b, g, r, y, rows, n, act, rpg);                                       \
    }                                                                                           \
    extern "C" __global__ void silu_gate_##S##_v##V(const T* h, T* y, int rows, int n) {        \
        silu_gate<T, V>(h, y, rows, n);                                                         \
    }                                                                                           \
    extern "C" __global__ void split_heads_##S##_v##V(const T* qkv, const T* bias, T* out,      \
                                                      int bsz, int n, int h, int hd) {          \
        split_heads<T, V>(qkv, bias, out, bsz, n, h, hd);                                       \
    }                                                                                           \
    extern "C" __global__ void embed_##S##_v##V(                                                \
        const T* ce, const T* tab_up, const T* tab_down, const unsigned* up,                   \
        const unsigned* down, const T* lpe, int lpe_rows, float scale, T* out, int bsz, int t,  \
        int cn, int vocab_up, int vocab_down) {                                                 \
        embed<T, V>(ce, tab_up, tab_down, up, down, lpe, lpe_rows, scale, out, bsz, t, cn,      \
                    vocab_up, vocab_down);                                                      \
    }                                                                                           \
    extern "C" __global__ void swap_mid_##S##_v##V(const T* x, T* y, int a, int m, int n,       \
                                                   int d, const T* p, int cn) {                 \
        swap_mid<T, V>(x, y, a, m, n, d, p, cn);                                                \
    }

#define OPS(T, S)                                                                               \
    extern "C" __global__ void scale_mask_softmax_##S(const T* s, const T* mask, T* p, int rows,\
                                                      int n, int m, float scale) {              \
        scale_mask_softmax<T>(s, mask, p, rows, n, m, scale);                                   \
    }                                                                                           \
    VEC_OPS(T, S, 1)                                                                            \
    VEC_OPS(T, S, 2)                                                                            \
    VEC_OPS(T, S, 4)

OPS(float, f32)
OPS(__half, f16)
OPS(__nv_bfloat16, bf16)
