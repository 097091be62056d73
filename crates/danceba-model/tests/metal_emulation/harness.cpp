// Runs the kernels of src/gpt/metal_scan.metal on the CPU: the shader compiled as C++20 against
// the shim `metal_stdlib` next to this file, each SIMD group emulated by one std::thread per lane
// (simd_sum through a barrier), and checks them against a double-precision reference of the
// same math. Exit status 0 if every case passes. Built and run by tests/metal_shader_emulation.rs.
//
// What this covers: the index arithmetic, strides and offsets, the causal window, softplus and
// its threshold, the scan recurrence, the lane striding of the states and the grid-stride loop
// over channels (several SIMD widths and grid shapes), the f16/bf16 conversions, and the NaN
// output for a d_state the kernel cannot hold. What it cannot cover: Metal's compiler, its math
// library and the real simd_sum, which only the self-check on a Mac exercises.
#include "metal_scan.metal"
#include <cstdio>
#include <random>
#include <thread>
#include <vector>
#include <functional>

static uint64_t rs = 12345;
static float rnd(float r) { rs = rs * 6364136223846793005ULL + 1442695040888963407ULL; return (float)((rs >> 40) / double(1 << 24)) * 2 * r - r; }

template <typename T> T st(float x) { return from_f<T>(x); }

// reference (double) of conv+silu and scan on the rounded inputs
static double silu_d(double v) { return v / (1 + std::exp(-v)); }
static double softplus_d(double v) { return v > 20 ? v : std::log1p(std::exp(v)); }

template <typename T>
int run(const char* name, uint B, uint L, uint D, uint N, uint K, uint width, uint tgs, uint sgs, double tol) {
    uint zw = 2 * D + 5, z_off = D + 3, dr = 6, bcw = dr + 2 * N + 3, b_off = dr, c_off = dr + N + 3;
    std::vector<T> xz(B * L * zw), w(D * K), cb(D), dpre(B * L * D), dbias(D), a(D * N), bc(B * L * bcw), dsk(D);
    for (auto& v : xz) v = st<T>(rnd(2)); for (auto& v : w) v = st<T>(rnd(0.5));
    for (auto& v : cb) v = st<T>(rnd(0.5)); for (auto& v : dpre) v = st<T>(rnd(3));
    for (uint i = 0; i < D; ++i) dbias[i] = st<T>(i == 1 ? 25.0f : rnd(2));
    for (auto& v : a) v = st<T>(rnd(1) - 1.5f); for (auto& v : bc) v = st<T>(rnd(1.5));
    for (auto& v : dsk) v = st<T>(rnd(1));
    std::vector<T> u(B * L * D), y(B * L * D);
    ConvParams cp{B, L, D, K, zw};
    for (uint i = 0; i < B * L * D + 100; ++i) conv_silu<T>(xz.data(), w.data(), cb.data(), u.data(), cp, i);
    // reference conv
    double cerr = 0, cscale = 0;
    std::vector<double> uref(B * L * D);
    for (uint b = 0; b < B; ++b) for (uint l = 0; l < L; ++l) for (uint c = 0; c < D; ++c) {
        double acc = to_f(cb[c]);
        for (uint j = 0; j < K; ++j) { int src = (int)l - (int)(K - 1) + (int)j; if (src >= 0) acc += (double)to_f(w[c * K + j]) * to_f(xz[(b * L + src) * zw + c]); }
        uint i = (b * L + l) * D + c; uref[i] = silu_d(acc);
        cerr = std::max(cerr, std::fabs(uref[i] - to_f(u[i]))); cscale = std::max(cscale, std::fabs(uref[i]));
    }
    ScanParams sp{bcw, b_off, c_off, zw, z_off, B, L, D, N};
    for (uint tg = 0; tg < tgs; ++tg) for (uint sg = 0; sg < sgs; ++sg) {
        std::barrier<> bar(width);
        std::vector<float> slots(width);
        SimdEmu emu{&bar, slots.data(), width};
        std::vector<std::thread> th;
        for (uint lane = 0; lane < width; ++lane) th.emplace_back([&, lane] {
            g_simd = &emu; g_lane = lane;
            scan<T>(u.data(), dpre.data(), dbias.data(), a.data(), bc.data(), dsk.data(), xz.data(), y.data(), sp, tg * sgs + sg, tgs * sgs, lane, width);
        });
        for (auto& t : th) t.join();
    }
    double err = 0, scale = 0; int nonfinite = 0;
    for (uint b = 0; b < B; ++b) for (uint c = 0; c < D; ++c) {
        std::vector<double> h(N, 0.0);
        for (uint l = 0; l < L; ++l) {
            uint pos = b * L + l;
            double delta = softplus_d((double)to_f(dpre[pos * D + c]) + to_f(dbias[c]));
            double uu = to_f(u[pos * D + c]);  // the kernel's u (rounded), as the scan sees it
            double acc = 0;
            for (uint s = 0; s < N; ++s) {
                h[s] = std::exp(delta * to_f(a[c * N + s])) * h[s] + delta * to_f(bc[pos * bcw + b_off + s]) * uu;
                acc += h[s] * to_f(bc[pos * bcw + c_off + s]);
            }
            double zv = to_f(xz[pos * zw + z_off + c]);
            double yr = (acc + to_f(dsk[c]) * uu) * silu_d(zv);
            double yk = to_f(y[pos * D + c]);
            if (!std::isfinite(yk)) nonfinite++;
            err = std::max(err, std::fabs(yr - yk)); scale = std::max(scale, std::fabs(yr));
        }
    }
    bool ok = nonfinite == 0 && err / scale <= tol && cerr / cscale <= tol;
    printf("%-5s B%u L%u D%u N%u width %u grid %ux%u: conv rel %.2e, scan rel %.2e, nonfinite %d -> %s\n", name, B, L, D, N, width, tgs, sgs, cerr / cscale, err / scale, nonfinite, ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}

int main() {
    int bad = 0;
    bad += run<float>("f32", 3, 13, 77, 40, 4, 32, 5, 4, 1e-5);     // 40 states over 32 lanes, grid-stride
    bad += run<float>("f32", 2, 11, 72, 128, 4, 32, 1, 1, 1e-5);    // one SIMD group does all channels
    bad += run<float>("f32", 2, 9, 33, 100, 3, 8, 7, 3, 1e-5);      // narrow SIMD width 8
    bad += run<float>("f32", 1, 5, 10, 7, 4, 1, 2, 2, 1e-5);        // width 1
    bad += run<half>("f16", 3, 13, 77, 40, 4, 32, 5, 4, 2e-3);
    bad += run<ushort>("bf16", 3, 13, 77, 40, 4, 32, 5, 4, 1.6e-2);
    // d_state beyond width * MAX_STATES_PER_LANE: must give NaN (so the self-check rejects it)
    {
        uint B = 1, L = 3, D = 4, N = 40, width = 2;
        std::vector<float> u(B * L * D, 1), dpre(B * L * D, 0), db(D, 0), a(D * N, -1), bc(B * L * (2 * N), 1), dsk(D, 1), z(B * L * D, 1), y(B * L * D, 0);
        ScanParams sp{2 * N, 0, N, D, 0, B, L, D, N};
        std::barrier<> bar(width); std::vector<float> slots(width); SimdEmu emu{&bar, slots.data(), width};
        std::vector<std::thread> th;
        for (uint lane = 0; lane < width; ++lane) th.emplace_back([&, lane] { g_simd = &emu; g_lane = lane; scan<float>(u.data(), dpre.data(), db.data(), a.data(), bc.data(), dsk.data(), z.data(), y.data(), sp, 0, 1, lane, width); });
        for (auto& t : th) t.join();
        int nans = 0; for (float v : y) nans += std::isnan(v);
        printf("too many states (N %u > %u): %d/%zu NaN -> %s\n", N, width * MAX_STATES_PER_LANE, nans, y.size(), nans == (int)y.size() ? "ok" : "FAIL");
        bad += nans != (int)y.size();
    }
    // bf16 rounding: to nearest, ties to even, as half::bf16::from_f32
    struct { float v; ushort bits; } cases[] = {{1.0f, 0x3f80}, {1.00390625f, 0x3f80}, {1.01171875f, 0x3f82},
        {-3.1415926f, 0xc049}, {65504.0f, 0x4780}, {1e-40f, 0x0001}, {INFINITY, 0x7f80}};
    for (auto c : cases) {
        ushort got = from_f<ushort>(c.v);
        if (got != c.bits || to_f(got) != to_f(c.bits)) { printf("bf16(%g) = 0x%04x, expected 0x%04x -> FAIL\n", c.v, got, c.bits); bad++; }
    }
    if (!std::isnan(to_f(from_f<ushort>(NAN)))) { printf("bf16(NaN) is not NaN -> FAIL\n"); bad++; }
    printf("%s\n", bad ? "FAILED" : "all passed");
    return bad;
}
