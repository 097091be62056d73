// Skinny GEMM of the GPT's linear layers on CUDA (feature `cuda`), compiled to PTX by build.rs
// and loaded by cuda_gemm.rs. One generation step multiplies 28 (or 84) rows by weights of up to
// 6144 x 3072: cuBLAS tiles such products into a few dozen blocks and leaves most of the GPU idle.
// Here every block computes 4 output columns for up to 32 rows, its warps splitting K, so even a
// 768-wide layer spreads over hundreds of warps.
//
//   y[m, n] = epilogue(sum_k x[m, k] * w[n, k])      x: (M, K) with row stride ldx,
//                                                    w: (N, K) (checkpoint layout)
//   epilogue: v = T(sum); with a bias v = T(v + b[n]); act (identity, SiLU, GELU-erf) as
//   T(act(v)); with a gate v = T(v * g[m, n]); with a residual v = r[m, n] + v; y = T(v)
//
// The rounding points are those of candle's GEMM followed by the fused bias_act kernel of
// cuda_ops.cu and candle's add; only the order of the K sum differs from cuBLAS (f32 FMAs per
// lane over k, then a fixed xor-shuffle tree and the K splits in order: deterministic).
//
// Requirements (checked by the host): K, N and ldx multiples of 4, x and w 16-byte (f32) / 8-byte
// (f16, bf16) aligned.

#include "cuda_common.cuh"

// Four consecutive values at p as floats.
__device__ __forceinline__ void load4(const float* p, float v[4]) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
}

__device__ __forceinline__ void load4(const __half* p, float v[4]) {
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(p));
    const __half2 a = *reinterpret_cast<const __half2*>(&t.x);
    const __half2 b = *reinterpret_cast<const __half2*>(&t.y);
    v[0] = __low2float(a);
    v[1] = __high2float(a);
    v[2] = __low2float(b);
    v[3] = __high2float(b);
}

__device__ __forceinline__ void load4(const __nv_bfloat16* p, float v[4]) {
    const uint2 t = __ldg(reinterpret_cast<const uint2*>(p));
    v[0] = __uint_as_float(t.x << 16);
    v[1] = __uint_as_float(t.x & 0xffff0000u);
    v[2] = __uint_as_float(t.y << 16);
    v[3] = __uint_as_float(t.y & 0xffff0000u);
}

// One level of the warp's reduce-scatter of `acc` (the first R >> LVL values still held): the
// lanes with bit (16 >> LVL) set keep the upper half, the others the lower half, each adding its
// partner's copy. Compile-time sizes so that `acc` stays in registers.
template <int R, int LVL>
__device__ __forceinline__ void reduce_level(float* acc, int lane) {
    constexpr int off = 16 >> LVL;
    constexpr int half = R >> (LVL + 1);
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
        const float send = upper ? acc[i] : acc[i + half];
        const float keep = upper ? acc[i + half] : acc[i];
        acc[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
}

// The epilogue of one output value (the rounding points of the unfused path).
template <typename T>
__device__ __forceinline__ void epilogue(float acc, const T* __restrict__ bias,
                                         const T* __restrict__ gate, const T* __restrict__ res,
                                         T* __restrict__ y, long long o, int col, int act) {
    float r = rnd<T>(acc);
    if (bias != nullptr) r = rnd<T>(r + to_f(bias[col]));
    if (act == 1) r = rnd<T>(r / (1.0f + expf(-r)));
    else if (act == 2) r = rnd<T>(r * normcdff(r));
    if (gate != nullptr) r = rnd<T>(r * to_f(gate[o]));
    if (res != nullptr) r = to_f(res[o]) + r;
    y[o] = from_f<T>(r);
}

#define KT 128     // k per chunk: one quad per lane
#define BN 16      // output columns per block: 4 per warp
#define STAGES 3   // chunks in flight (cp.async pipeline)

// Asynchronous copy of 4 elements (16 bytes for f32, 8 for f16/bf16) from global to shared
// memory, zeros when !valid (sm_80+; a plain copy before).
template <typename T>
__device__ __forceinline__ void copy4(T* dst, const T* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    const int n = valid ? (int)(4 * sizeof(T)) : 0;
    if (sizeof(T) == 4) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
    } else {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(d), "l"(src), "r"(n));
    }
#else
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (valid) load4(src, v);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = from_f<T>(v[i]);
#endif
}

__device__ __forceinline__ void copy_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most PENDING committed groups are still in flight (by default `STAGES - 2`:
// the chunk about to be summed has landed in a STAGES-deep pipeline).
template <int PENDING = STAGES - 2>
__device__ __forceinline__ void copy_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

__device__ __forceinline__ void smem4(const float* p, float v[4]) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
}
__device__ __forceinline__ void smem4(const __half* p, float v[4]) {
    const uint2 t = *reinterpret_cast<const uint2*>(p);
    const __half2 a = *reinterpret_cast<const __half2*>(&t.x);
    const __half2 b = *reinterpret_cast<const __half2*>(&t.y);
    v[0] = __low2float(a);
    v[1] = __high2float(a);
    v[2] = __low2float(b);
    v[3] = __high2float(b);
}
__device__ __forceinline__ void smem4(const __nv_bfloat16* p, float v[4]) {
    const uint2 t = *reinterpret_cast<const uint2*>(p);
    v[0] = __uint_as_float(t.x << 16);
    v[1] = __uint_as_float(t.x & 0xffff0000u);
    v[2] = __uint_as_float(t.y << 16);
    v[3] = __uint_as_float(t.y & 0xffff0000u);
}

// Copies the chunk [k0, min(k0 + KT, ke)) of the block's BM rows of x (from row m0) and of its
// COLS weight rows (from row nb) into shared memory, rows S elements apart; zeros past M (`rows`),
// N or ke. THREADS threads, 4 elements per copy, then one cp.async group.
template <typename T, int BM, int COLS, int S, int THREADS>
__device__ __forceinline__ void stage_chunk(T* __restrict__ xs, T* __restrict__ wsh,
                                            const T* __restrict__ x, const T* __restrict__ w,
                                            int m0, int rows, int nb, int N, int K, int ldx,
                                            int k0, int ke) {
    constexpr int XQ = BM * KT / 4 / THREADS;  // x quads each thread copies
    constexpr int WQ = COLS * KT / 4 / THREADS;  // weight quads each thread copies
    static_assert(XQ * THREADS * 4 == BM * KT && WQ * THREADS * 4 == COLS * KT, "even split");
#pragma unroll
    for (int i = 0; i < XQ; ++i) {
        const int q = threadIdx.x + i * THREADS;
        const int m = q / (KT / 4);
        const int kq = q % (KT / 4);
        const int k = k0 + 4 * kq;
        const bool ok = m < rows && k < ke;
        copy4(&xs[m * S + 4 * kq], ok ? x + (long long)(m0 + m) * ldx + k : x, ok);
    }
#pragma unroll
    for (int i = 0; i < WQ; ++i) {
        const int q = threadIdx.x + i * THREADS;
        const int j = q / (KT / 4);
        const int kq = q % (KT / 4);
        const int k = k0 + 4 * kq;
        const bool ok = nb + j < N && k < ke;
        copy4(&wsh[j * S + 4 * kq], ok ? w + (long long)(nb + j) * K + k : w, ok);
    }
}

// Grid (ceil(M / BM), ceil(N / BN), groups · splits) — row tiles fastest, so the blocks sharing
// weights run together; block = 4 warps, warp w computing the 4 columns n0 = blockIdx.y·BN + 4w
// .. n0 + 4 for the block's BM rows over the k range [split·kchunk, min(K, (split+1)·kchunk)),
// in chunks of KT (the group's pointers already offset, see GROUP_OFFSETS). The block copies
// each chunk of x (BM × KT, zeros past M or the range) and of its BN weight rows (zeros past N)
// into shared memory with a STAGES-deep cp.async pipeline; lane l takes the quad k = 4l of each
// chunk. With one split the epilogue follows; with several the f32 partial sums go to
// ws[split][row][col] and skinny_reduce finishes. act: 0 identity, 1 SiLU, 2 GELU (erf). bias,
// gate, res may be null.
template <typename T, int BM>
__device__ __forceinline__ void skinny_gemm(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ bias,
                                            const T* __restrict__ gate,
                                            const T* __restrict__ res, T* __restrict__ y,
                                            float* __restrict__ ws, int M, int N, int K, int ldx,
                                            int kchunk, int act, int split, int splits) {
    constexpr int R = BM * 4;    // accumulators per lane: (row, column) = (i / 4, i % 4)
    constexpr int PER = R / 32;  // values per lane after the reduce-scatter
    constexpr int THREADS = 128;
    __shared__ __align__(16) T xs[STAGES][BM * KT];
    __shared__ __align__(16) T wsh[STAGES][BN * KT];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int m0 = blockIdx.x * BM;
    const int nb = blockIdx.y * BN;
    const int n0 = nb + 4 * warp;
    const int rows = min(BM, M - m0);
    const int kb = split * kchunk;
    const int ke = min(K, kb + kchunk);
    const int chunks = (ke - kb + KT - 1) / KT;

    // copies chunk c into stage slot c % STAGES (nothing past the last chunk)
    auto issue = [&](int c) {
        if (c < chunks) {
            stage_chunk<T, BM, BN, KT, THREADS>(xs[c % STAGES], wsh[c % STAGES], x, w, m0, rows,
                                                nb, N, K, ldx, kb + c * KT, ke);
        }
        copy_commit();
    };

    float acc[R];
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < STAGES - 1; ++c) issue(c);
    for (int c = 0; c < chunks; ++c) {
        copy_wait();
        __syncthreads();  // chunk c is in; every warp is done with chunk c - 1's slot
        issue(c + STAGES - 1);
        const int slot = c % STAGES;
        float wv[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) smem4(&wsh[slot][(4 * warp + j) * KT + 4 * lane], wv[j]);
#pragma unroll
        for (int m = 0; m < BM; ++m) {
            if (m < rows) {
                float xv[4];
                smem4(&xs[slot][m * KT + 4 * lane], xv);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
#pragma unroll
                    for (int q = 0; q < 4; ++q)
                        acc[m * 4 + j] = fmaf(xv[q], wv[j][q], acc[m * 4 + j]);
                }
            }
        }
    }
    if (n0 >= N) return;

    // Reduce-scatter over the warp: lane l ends with values l·PER .. l·PER + PER.
    reduce_level<R, 0>(acc, lane);
    reduce_level<R, 1>(acc, lane);
    reduce_level<R, 2>(acc, lane);
    reduce_level<R, 3>(acc, lane);
    reduce_level<R, 4>(acc, lane);
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int v = lane * PER + i;
        const int m = v >> 2;
        const int col = n0 + (v & 3);
        if (m >= rows || col >= N) continue;
        const long long o = (long long)(m0 + m) * N + col;
        if (splits == 1) {
            epilogue<T>(acc[i], bias, gate, res, y, o, col, act);
        } else {
            ws[(long long)split * M * N + o] = acc[i];
        }
    }
}

#define MMA_BN 32        // output columns per block of the tensor-core kernel: 8 per warp
#define MMA_S (KT + 8)   // elements per shared-memory row: the padding makes fragment loads
                         // conflict-free (rows start 4 banks apart)

// d = a·b + d on the tensor cores, m16n8k16, f32 accumulators (sm_80+).
__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], const unsigned b[2],
                                         __half) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma16816(float c[4], const unsigned a[4], const unsigned b[2],
                                         __nv_bfloat16) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// The f16/bf16 skinny GEMM on the tensor cores. Grid (ceil(M / 16), ceil(N / MMA_BN),
// groups · splits);
// 4 warps, warp w computing the 16 × 8 tile of rows m0 .. m0 + 16 and columns
// n0 = blockIdx.y·MMA_BN + 8w .. n0 + 8 with one m16n8k16 product per 16 k, over the block's k
// range in chunks of KT staged in shared memory by the same cp.async pipeline as skinny_gemm
// (rows padded to MMA_S). Lane l holds the outputs (row l/4 [+ 8], column n0 + 2(l%4) [+ 1]).
// Before sm_80 the same tile is summed with FMAs (no tensor cores).
template <typename T>
__device__ __forceinline__ void skinny_mma(const T* __restrict__ x, const T* __restrict__ w,
                                           const T* __restrict__ bias, const T* __restrict__ gate,
                                           const T* __restrict__ res, T* __restrict__ y,
                                           float* __restrict__ ws, int M, int N, int K, int ldx,
                                           int kchunk, int act, int split, int splits) {
    constexpr int BM = 16;
    constexpr int THREADS = 128;
    __shared__ __align__(16) T xs[STAGES][BM * MMA_S];
    __shared__ __align__(16) T wsh[STAGES][MMA_BN * MMA_S];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * BM;
    const int nb = blockIdx.y * MMA_BN;
    const int n0 = nb + 8 * warp;
    const int rows = min(BM, M - m0);
    const int kb = split * kchunk;
    const int ke = min(K, kb + kchunk);
    const int chunks = (ke - kb + KT - 1) / KT;

    auto issue = [&](int c) {
        if (c < chunks) {
            stage_chunk<T, BM, MMA_BN, MMA_S, THREADS>(xs[c % STAGES], wsh[c % STAGES], x, w, m0,
                                                       rows, nb, N, K, ldx, kb + c * KT, ke);
        }
        copy_commit();
    };

    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(s);
    for (int ch = 0; ch < chunks; ++ch) {
        copy_wait();
        __syncthreads();
        issue(ch + STAGES - 1);
        const T* xa = xs[ch % STAGES];
        const T* wb = wsh[ch % STAGES] + 8 * warp * MMA_S;
#pragma unroll
        for (int k0 = 0; k0 < KT; k0 += 16) {
#if __CUDA_ARCH__ >= 800
            unsigned a[4], b[2];
            a[0] = *reinterpret_cast<const unsigned*>(xa + g * MMA_S + k0 + 2 * t);
            a[1] = *reinterpret_cast<const unsigned*>(xa + (g + 8) * MMA_S + k0 + 2 * t);
            a[2] = *reinterpret_cast<const unsigned*>(xa + g * MMA_S + k0 + 8 + 2 * t);
            a[3] = *reinterpret_cast<const unsigned*>(xa + (g + 8) * MMA_S + k0 + 8 + 2 * t);
            b[0] = *reinterpret_cast<const unsigned*>(wb + g * MMA_S + k0 + 2 * t);
            b[1] = *reinterpret_cast<const unsigned*>(wb + g * MMA_S + k0 + 8 + 2 * t);
            mma16816(c, a, b, T());
#else
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int m = g + (i >= 2 ? 8 : 0);
                const int j = 2 * t + (i & 1);
                for (int k = k0; k < k0 + 16; ++k)
                    c[i] = fmaf(to_f(xa[m * MMA_S + k]), to_f(wb[j * MMA_S + k]), c[i]);
            }
#endif
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = g + (i >= 2 ? 8 : 0);
        const int col = n0 + 2 * t + (i & 1);
        if (m >= rows || col >= N) continue;
        const long long o = (long long)(m0 + m) * N + col;
        if (splits == 1) {
            epilogue<T>(c[i], bias, gate, res, y, o, col, act);
        } else {
            ws[(long long)split * M * N + o] = c[i];
        }
    }
}

// Sums the splits' partial products in order and applies the epilogue; one thread per output
// of every group (the workspace holds (groups, splits, M, N), the outputs (groups, M, N)).
template <typename T>
__device__ __forceinline__ void skinny_reduce(const float* __restrict__ ws,
                                              const T* __restrict__ bias,
                                              const T* __restrict__ gate,
                                              const T* __restrict__ res, T* __restrict__ y, int M,
                                              int N, int splits, int act, int groups) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long total = (long long)M * N;
    if (i >= total * groups) return;
    const long long grp = i / total, o = i % total;
    ws += grp * splits * total;
    float s = ws[o];
    for (int p = 1; p < splits; ++p) s += ws[p * total + o];
    epilogue<T>(s, bias == nullptr ? nullptr : bias + grp * N,
                gate == nullptr ? nullptr : gate + grp * total,
                res == nullptr ? nullptr : res + grp * total, y + grp * total, o, (int)(o % N),
                act);
}

// Asynchronous 16-byte copy from global to shared memory bypassing L1 (cp.async.cg; zeros when
// !valid, and then nothing is read); a plain copy before sm_80.
__device__ __forceinline__ void copy16_cg(float* dst, const float* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(valid ? 16 : 0));
#else
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (valid) v = __ldg(reinterpret_cast<const float4*>(src));
    *reinterpret_cast<float4*>(dst) = v;
#endif
}

// The f32 register-tiled GEMM (sm_80+: cp.async; TG_STAGES · tg_stage(BN) floats of dynamic
// shared memory, `tile_smem` on the host).
// Block tile: TG_BM = 32 rows x BN = 32·TN columns, 8 warps: WM = 32 / TM row groups × WK =
// 8 / WM k groups, warp w taking rows TM·(w % WM) .. + TM over the k range (w / WM) of every
// TG_KT chunk. Lane l holds TM × TN outputs (tile row r, column l + 32j): every lane of a warp
// reads the same x quad (one broadcast wavefront) and its own TN weight rows (rows TG_S floats
// apart: conflict-free), 4·TM·TN FMAs per TM + TN loads. Sums: per lane FMAs over k in order
// within each k group, the groups added in order, then the K splits in order (skinny_reduce):
// deterministic.
#define TG_BM 32
#define TG_KT 64
#define TG_STAGES 2  // chunks in flight: one copied while the other is summed
#define TG_S (TG_KT + 4)
#define TG_THREADS 256

// Floats of one pipeline stage of a tile kernel with bn columns (TG_STAGES stages of dynamic
// shared memory: 16x4 87,040 bytes).
__host__ __device__ constexpr int tg_stage(int bn) { return (TG_BM + bn) * TG_S; }

template <int TM, int TN>
__device__ __forceinline__ void tile_gemm(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ bias,
                                          const float* __restrict__ gate,
                                          const float* __restrict__ res, float* __restrict__ y,
                                          float* __restrict__ ws, int M, int N, int K, int ldx,
                                          int kchunk, int act, int split, int splits) {
    constexpr int TBN = 32 * TN;
    constexpr int WM = TG_BM / TM;
    constexpr int WK = (TG_THREADS / 32) / WM;
    constexpr int KW = TG_KT / WK;  // k per warp and chunk
    constexpr int STAGE = tg_stage(TBN);
    static_assert(WM * TM == TG_BM && WM * WK * 32 == TG_THREADS && KW % 4 == 0, "tiling");
    static_assert(WK * TG_BM * TBN <= TG_STAGES * STAGE, "the k groups' sums fit the stages");
    extern __shared__ __align__(16) float tg_smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int wm = warp % WM, wk = warp / WM;
    const int m0 = blockIdx.x * TG_BM;
    const int nb = blockIdx.y * TBN;
    const int rows = min(TG_BM, M - m0);
    const int kb = split * kchunk;
    const int ke = min(K, kb + kchunk);
    const int chunks = (ke - kb + TG_KT - 1) / TG_KT;

    // Thread t copies quad kq of rows r0 + RP·i (r0 = t / QR, RP = TG_THREADS / QR rows per
    // pass) of the chunk's 32 x rows and then of its 32·TN weight rows (QR quads per row).
    constexpr int QR = TG_KT / 4;
    constexpr int RP = TG_THREADS / QR;
    constexpr int XP = TG_BM / RP, WP = TBN / RP;  // passes over x and over the weights
    static_assert(XP * RP == TG_BM && WP * RP == TBN, "whole passes");
    const int r0 = threadIdx.x / QR, kq = 4 * (threadIdx.x % QR);
    unsigned xrows = 0, wrows = 0;  // bit i: row r0 + RP·i exists (x: below M, weights: N)
#pragma unroll
    for (int i = 0; i < XP; ++i) xrows |= (r0 + RP * i < rows ? 1u : 0u) << i;
#pragma unroll
    for (int i = 0; i < WP; ++i) wrows |= (nb + r0 + RP * i < N ? 1u : 0u) << i;
    const float* xsrc = x + (long long)(m0 + r0) * ldx + kb + kq;
    const float* wsrc = w + (long long)(nb + r0) * K + kb + kq;
    // copies chunk c (zeros past M, N or ke) into stage c % TG_STAGES, then commits a group (an
    // empty one past the last chunk)
    auto issue = [&](int c) {
        if (c < chunks) {
            float* dst = tg_smem + (c % TG_STAGES) * STAGE + r0 * TG_S + kq;
            const bool kin = kb + c * TG_KT + kq < ke;
#pragma unroll
            for (int i = 0; i < XP; ++i) {
                const bool ok = kin && ((xrows >> i) & 1u);
                copy16_cg(dst + RP * i * TG_S,
                          ok ? xsrc + (long long)RP * i * ldx + c * TG_KT : x, ok);
            }
#pragma unroll
            for (int i = 0; i < WP; ++i) {
                const bool ok = kin && ((wrows >> i) & 1u);
                copy16_cg(dst + (TG_BM + RP * i) * TG_S,
                          ok ? wsrc + (long long)RP * i * K + c * TG_KT : w, ok);
            }
        }
        copy_commit();
    };

    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
    issue(0);
    for (int c = 0; c < chunks; ++c) {
        copy_wait<0>();  // two stages: the only group in flight is chunk c
        __syncthreads();  // chunk c is in; every warp is done with chunk c - 1's stage
        issue(c + 1);
        const float* xs = tg_smem + (c % TG_STAGES) * STAGE + wm * TM * TG_S + wk * KW;
        const float* wsh =
            tg_smem + (c % TG_STAGES) * STAGE + TG_BM * TG_S + lane * TG_S + wk * KW;
#pragma unroll
        for (int kq = 0; kq < KW; kq += 4) {
            float4 wv[TN];
#pragma unroll
            for (int j = 0; j < TN; ++j)
                wv[j] = *reinterpret_cast<const float4*>(wsh + 32 * j * TG_S + kq);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const float4 xv = *reinterpret_cast<const float4*>(xs + i * TG_S + kq);
#pragma unroll
                for (int j = 0; j < TN; ++j) {
                    acc[i][j] = fmaf(xv.x, wv[j].x, acc[i][j]);
                    acc[i][j] = fmaf(xv.y, wv[j].y, acc[i][j]);
                    acc[i][j] = fmaf(xv.z, wv[j].z, acc[i][j]);
                    acc[i][j] = fmaf(xv.w, wv[j].w, acc[i][j]);
                }
            }
        }
    }
    __syncthreads();  // every warp is done with the stages: reuse them for the k groups
    // red[q][r][c]: k group q's sums of tile row r, column c
    float* red = tg_smem;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j)
            red[(wk * TG_BM + wm * TM + i) * TBN + lane + 32 * j] = acc[i][j];
    __syncthreads();
    // every thread: column t % TBN of rows t / TBN + i·(TG_THREADS / TBN), k groups in order
    const int col = threadIdx.x % TBN;
    const long long mn = (long long)M * N;
    if (nb + col < N) {
#pragma unroll 1
        for (int r = threadIdx.x / TBN; r < rows; r += TG_THREADS / TBN) {
            float v = red[r * TBN + col];
#pragma unroll
            for (int q = 1; q < WK; ++q) v += red[(q * TG_BM + r) * TBN + col];
            const long long o = (long long)(m0 + r) * N + nb + col;
            if (splits == 1) {
                epilogue<float>(v, bias, gate, res, y, o, nb + col, act);
            } else {
                ws[split * mn + o] = v;
            }
        }
    }
}

// The kernels' grid z is (group, split), split fastest: group g reads x + g·xg and the weights
// w + g·wg, its bias b + g·N, gate, residual and output (and workspace) the g-th (M, N) block
// (the three streams of a Block_Head, each with its own weights, in one launch).
#define GROUP_OFFSETS                                                                           \
    const int split = blockIdx.z % splits;                                                     \
    const long long grp = blockIdx.z / splits;                                                 \
    const long long mn = (long long)M * N;                                                     \
    x += grp * xg;                                                                             \
    w += grp * wg;                                                                             \
    if (bias != nullptr) bias += grp * N;                                                      \
    if (gate != nullptr) gate += grp * mn;                                                     \
    if (res != nullptr) res += grp * mn;                                                       \
    y += grp * mn;                                                                             \
    if (ws != nullptr) ws += grp * splits * mn;

#define GEMM(T, S, BM)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                               \
        skinny_gemm##BM##_##S(const T* x, const T* w, const T* bias, const T* gate,             \
                              const T* res, T* y, float* ws, int M, int N, int K, int ldx,       \
                              int kchunk, int act, int splits, long long xg, long long wg) {   \
        GROUP_OFFSETS                                                                           \
        skinny_gemm<T, BM>(x, w, bias, gate, res, y, ws, M, N, K, ldx, kchunk, act, split,      \
                           splits);                                                             \
    }

#define GEMMS(T, S)                                                                             \
    GEMM(T, S, 8)                                                                               \
    GEMM(T, S, 16)                                                                              \
    extern "C" __global__ void skinny_reduce_##S(const float* ws, const T* bias, const T* gate, \
                                                 const T* res, T* y, int M, int N, int splits,  \
                                                 int act, int groups) {                         \
        skinny_reduce<T>(ws, bias, gate, res, y, M, N, splits, act, groups);                    \
    }

#define MMA(T, S)                                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        skinny_mma_##S(const T* x, const T* w, const T* bias, const T* gate, const T* res, T* y, \
                       float* ws, int M, int N, int K, int ldx, int kchunk, int act,            \
                       int splits, long long xg, long long wg) {                                \
        GROUP_OFFSETS                                                                           \
        skinny_mma<T>(x, w, bias, gate, res, y, ws, M, N, K, ldx, kchunk, act, split, splits);  \
    }

#define TILE(TM, TN, MINB)                                                                      \
    extern "C" __global__ void __launch_bounds__(TG_THREADS, MINB)                              \
        tile_gemm##TM##x##TN##_f32(const float* x, const float* w, const float* bias,           \
                                   const float* gate, const float* res, float* y, float* ws,    \
                                   int M, int N, int K, int ldx, int kchunk, int act,           \
                                   int splits, long long xg, long long wg) {                    \
        GROUP_OFFSETS                                                                           \
        tile_gemm<TM, TN>(x, w, bias, gate, res, y, ws, M, N, K, ldx, kchunk, act, split,       \
                          splits);                                                              \
    }

TILE(16, 4, 2)
TILE(16, 2, 3)

GEMMS(float, f32)
GEMMS(__half, f16)
GEMMS(__nv_bfloat16, bf16)
MMA(__half, f16)
MMA(__nv_bfloat16, bf16)
