//! Criterion benches of the GPT on the CPU at the real size (random weights, fp32):
//! the selective-scan kernel of one Mamba layer (L = 28, 3072 channels, 128 states; SIMD and
//! portable loop), one Mamba layer fused vs portable, one full sampling step at t = 28, and the
//! step's product shapes with candle's matmul and with our `cpu_gemm` kernel.
//!
//! Run: `cargo bench -p danceba-model --bench gpt_step`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use danceba_model::gpt::cpu_gemm;
use danceba_model::gpt::random::{official_gpt_arch, random_gpt};
use danceba_model::gpt::scan::{channel_minima, selective_scan_with, ScanInputs, ScanKernel};
use danceba_model::gpt::MambaImpl;

fn lcg(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

fn scan(c: &mut Criterion) {
    // Δ = softplus(dp + bias) up to ~2.1: with |A| up to 128, most channels have decays below
    // 2⁻¹²⁶ and take the kernels' clamped path; dp ≤ −2.5 keeps Δ ≤ 0.2 (Mamba initialises Δ
    // in [0.001, 0.1]), whose decays never get there (the unclamped path)
    for (group, dp_hi) in [
        ("scan_L28_D3072_N128", 1.0),
        ("scan_L28_D3072_N128_small_delta", -2.5),
    ] {
        scan_group(c, group, dp_hi);
    }
}

fn scan_group(c: &mut Criterion, group: &str, dp_hi: f32) {
    let (len, d, n, r) = (28, 3072, 128, 48);
    let u = lcg(1, len * d, -2.0, 2.0);
    let dp = lcg(2, len * d, -6.0, dp_hi);
    let bias = lcg(3, d, -1.0, 1.0);
    let a: Vec<f32> = (0..d * n).map(|i| -((i % n) as f32 + 1.0)).collect();
    let a_min = channel_minima(&a, d, n);
    let bc = lcg(4, len * (r + 2 * n), -1.0, 1.0);
    let dsk = vec![1.0; d];
    let z = lcg(5, len * 2 * d, -3.0, 3.0);
    let p = ScanInputs {
        batch: 1,
        len,
        d,
        n,
        u: &u,
        delta_pre: &dp,
        delta_bias: &bias,
        a: &a,
        a_min: &a_min,
        bc: &bc,
        bc_stride: r + 2 * n,
        b_offset: r,
        c_offset: r + n,
        d_skip: &dsk,
        z: &z,
        z_stride: 2 * d,
        z_offset: d,
    };
    let mut g = c.benchmark_group(group);
    g.sample_size(20);
    for k in [ScanKernel::Best, ScanKernel::Avx2, ScanKernel::Loop] {
        g.bench_function(format!("{k:?}"), |b| b.iter(|| selective_scan_with(&p, k)));
    }
    g.finish();
}

fn step(c: &mut Criterion) {
    let arch = official_gpt_arch();
    let mut gpt = random_gpt(&arch, 0).expect("random real-size GPT");
    let t = 28;
    let dev = Device::Cpu;
    let up = Tensor::from_vec((0..t as u32).map(|i| i * 17 % 512).collect(), (1, t), &dev).unwrap();
    let down =
        Tensor::from_vec((0..t as u32).map(|i| i * 29 % 512).collect(), (1, t), &dev).unwrap();
    let cond = Tensor::rand(0f32, 1f32, (1, t, arch.n_music), &dev).unwrap();
    let mut g = c.benchmark_group("gpt_step_t28_b1");
    g.sample_size(10);
    for imp in [MambaImpl::FusedCpu, MambaImpl::Portable] {
        gpt.set_mamba_impl(imp);
        g.bench_function(format!("{imp:?}"), |b| {
            b.iter(|| gpt.forward(&up, &down, &cond).unwrap())
        });
    }
    g.finish();
}

/// The largest GEMM shapes of a step, with the weight as a transposed view (out, in)ᵀ and as
/// a contiguous (in, out) copy.
fn matmul(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("matmul");
    g.sample_size(20);
    for (m, k, n) in [(84, 768, 3072), (28, 768, 6144), (28, 3072, 768)] {
        let x = Tensor::rand(-1f32, 1f32, (m, k), &dev).unwrap();
        let w = Tensor::rand(-1f32, 1f32, (n, k), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        g.bench_function(format!("{m}x{k}x{n}/contiguous"), |b| {
            b.iter(|| x.matmul(&wt).unwrap())
        });
        g.bench_function(format!("{m}x{k}x{n}/view"), |b| {
            b.iter(|| x.matmul(&w.t().unwrap()).unwrap())
        });
        // our kernel (the one this CPU runs; `DANCEBA_CPU_GEMM=avx2` for the AVX2 one), on the
        // weights in their (n, k) layout
        if let Some(kern) = cpu_gemm::kernel() {
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            g.bench_function(format!("{m}x{k}x{n}/cpu_gemm_{kern:?}"), |b| {
                b.iter(|| cpu_gemm::linear(&xs, &ws, None, m, k, n).unwrap())
            });
            // with f16 and bf16 weights (`--dtype f16|bf16`)
            let wh: Vec<half::f16> = ws.iter().map(|&v| half::f16::from_f32(v)).collect();
            g.bench_function(format!("{m}x{k}x{n}/cpu_gemm_{kern:?}_f16"), |b| {
                b.iter(|| cpu_gemm::linear(&xs, &wh, None, m, k, n).unwrap())
            });
            let wb: Vec<half::bf16> = ws.iter().map(|&v| half::bf16::from_f32(v)).collect();
            g.bench_function(format!("{m}x{k}x{n}/cpu_gemm_{kern:?}_bf16"), |b| {
                b.iter(|| cpu_gemm::linear(&xs, &wb, None, m, k, n).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, matmul, scan, step);
criterion_main!(benches);
