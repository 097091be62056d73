//! The CUDA skinny GEMM (feature `cuda`, needs a GPU) against candle's cuBLAS matmul and ops:
//! every epilogue (bias, SiLU, GELU, gate, residual), all three dtypes, the shapes of one
//! generation step and odd ones, inputs that are column slices of a wider tensor, determinism,
//! and the shapes it must refuse.
#![cfg(feature = "cuda")]

mod gpt_common;

use candle_core::{DType, Device, Tensor, D};
use danceba_model::gpt::block_base::Act;
use danceba_model::gpt::cuda_gemm::{self, Epilogue, F32Kernel};
use gpt_common::rel_err;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

fn uniform(rng: &mut StdRng, shape: &[usize], lo: f32, hi: f32, dt: DType, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// candle's ops in the order of the unfused path: matmul, bias, activation, gate, residual.
fn reference(x: &Tensor, w: &Tensor, ep: &Epilogue) -> Tensor {
    let k = *x.dims().last().unwrap();
    let rows = x.elem_count() / k;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = w.dims()[0];
    let mut y = x
        .contiguous()
        .unwrap()
        .reshape((rows, k))
        .unwrap()
        .matmul(&w.t().unwrap())
        .unwrap()
        .reshape(dims)
        .unwrap();
    if let Some(b) = ep.bias {
        y = y.broadcast_add(b).unwrap();
    }
    y = match ep.act {
        Act::Identity => y,
        Act::Silu => candle_nn::ops::silu(&y).unwrap(),
        Act::GeluErf => y.gelu_erf().unwrap(),
    };
    if let Some(g) = ep.gate {
        y = (y * g).unwrap();
    }
    if let Some(r) = ep.residual {
        y = (r + y).unwrap();
    }
    y
}

#[test]
fn skinny_gemm_matches_cublas_and_candle_ops() {
    let dev = cuda();
    let mut rng = StdRng::seed_from_u64(11);
    // (leading dims, K, N): the step's layers at batch 1 and 4, the ramp, odd sizes
    let shapes: &[(&[usize], usize, usize)] = &[
        (&[1, 28], 768, 6144),
        (&[1, 28], 3072, 768),
        (&[1, 28], 3072, 304),
        (&[1, 28], 48, 3072),
        (&[1, 84], 768, 2304),
        (&[1, 84], 3072, 768),
        (&[4, 28], 768, 1536),
        (&[1, 1], 768, 512),
        (&[1, 9], 768, 768),
        (&[5], 12, 8),
        (&[17], 132, 20),
        (&[3, 11], 260, 36),
        (&[128], 1028, 4),
        // batch 8, and tails of the register-tiled f32 kernel (rows, columns, k chunks)
        (&[8, 28], 3072, 768),
        (&[672], 768, 768),
        (&[33], 1060, 132),
        (&[2, 47], 36, 260),
    ];
    let kinds = F32Kernel::ALL.map(|k| (DType::F32, k)).into_iter().chain([
        (DType::F16, F32Kernel::Tile16x4),
        (DType::BF16, F32Kernel::Tile16x4),
    ]);
    for &(lead, k, n) in shapes {
        for (dt, f32k) in kinds.clone() {
            let tol = if dt == DType::F32 { 2e-6 } else { 1e-2 };
            let mut xdims = lead.to_vec();
            xdims.push(k);
            let mut ydims = lead.to_vec();
            ydims.push(n);
            let scale = 1.0 / (k as f32).sqrt();
            let x = uniform(&mut rng, &xdims, -2.0, 2.0, dt, &dev);
            let w = uniform(&mut rng, &[n, k], -scale, scale, dt, &dev);
            let b = uniform(&mut rng, &[n], -0.5, 0.5, dt, &dev);
            let g = uniform(&mut rng, &ydims, -2.0, 2.0, dt, &dev);
            let r = uniform(&mut rng, &ydims, -2.0, 2.0, dt, &dev);
            assert!(cuda_gemm::supports(&x, &w), "{xdims:?} x {n}");
            let eps = [
                Epilogue {
                    bias: None,
                    act: Act::Identity,
                    gate: None,
                    residual: None,
                },
                Epilogue {
                    bias: Some(&b),
                    act: Act::Identity,
                    gate: None,
                    residual: None,
                },
                Epilogue {
                    bias: Some(&b),
                    act: Act::Silu,
                    gate: None,
                    residual: None,
                },
                Epilogue {
                    bias: Some(&b),
                    act: Act::GeluErf,
                    gate: None,
                    residual: None,
                },
                Epilogue {
                    bias: Some(&b),
                    act: Act::Identity,
                    gate: Some(&g),
                    residual: None,
                },
                Epilogue {
                    bias: Some(&b),
                    act: Act::Identity,
                    gate: None,
                    residual: Some(&r),
                },
                Epilogue {
                    bias: None,
                    act: Act::Identity,
                    gate: None,
                    residual: Some(&r),
                },
            ];
            for (i, ep) in eps.iter().enumerate() {
                let got = cuda_gemm::linear_with(&x, &w, *ep, f32k).unwrap();
                assert_eq!(got.dims(), ydims.as_slice());
                let want = reference(&x, &w, ep);
                let e = rel_err(&got, &want);
                if i == 0 || e > tol / 10.0 {
                    println!(
                        "{xdims:?} x ({n}, {k}) {dt:?} {f32k:?} epilogue {i}: rel err {e:.2e}"
                    );
                }
                assert!(
                    e <= tol,
                    "{xdims:?} x ({n}, {k}) {dt:?} {f32k:?} epilogue {i}: rel err {e}"
                );
            }
            // deterministic: the same bits twice
            let a = cuda_gemm::linear_with(&x, &w, eps[1], f32k).unwrap();
            let b2 = cuda_gemm::linear_with(&x, &w, eps[1], f32k).unwrap();
            let diff = (a.to_dtype(DType::F32).unwrap() - b2.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(
                diff, 0.0,
                "{xdims:?} x {n} {dt:?} {f32k:?} is not deterministic"
            );
        }
    }
}

#[test]
fn stacked_products_match_one_by_one() {
    let dev = cuda();
    let mut rng = StdRng::seed_from_u64(14);
    // (groups, rows per group, K, N): the head's three streams at batch 1 and 8, odd sizes
    for &(g, rows, k, n) in &[
        (3, 28, 768, 6144),
        (3, 28, 3072, 304),
        (3, 224, 3072, 768),
        (2, 37, 100, 132),
    ] {
        for (dt, f32k) in F32Kernel::ALL
            .map(|k| (DType::F32, k))
            .into_iter()
            .chain([(DType::BF16, F32Kernel::Auto)])
        {
            let tol = if dt == DType::F32 { 2e-6 } else { 1e-2 };
            let scale = 1.0 / (k as f32).sqrt();
            let x = uniform(&mut rng, &[g, rows, k], -2.0, 2.0, dt, &dev);
            let w = uniform(&mut rng, &[g, n, k], -scale, scale, dt, &dev);
            let b = uniform(&mut rng, &[g, n], -0.5, 0.5, dt, &dev);
            let r = uniform(&mut rng, &[g, rows, n], -2.0, 2.0, dt, &dev);
            let ep = Epilogue {
                bias: Some(&b),
                act: Act::Silu,
                gate: None,
                residual: Some(&r),
            };
            let got = cuda_gemm::linear_with(&x, &w, ep, f32k).unwrap();
            assert_eq!(got.dims(), &[g, rows, n]);
            for i in 0..g {
                let (bi, ri) = (b.get(i).unwrap(), r.get(i).unwrap());
                let want = reference(
                    &x.get(i).unwrap(),
                    &w.get(i).unwrap(),
                    &Epilogue {
                        bias: Some(&bi),
                        residual: Some(&ri),
                        ..ep
                    },
                );
                let e = rel_err(&got.get(i).unwrap(), &want);
                assert!(
                    e <= tol,
                    "group {i} of {g} × ({rows}, {k}) → {n} {dt:?} {f32k:?}: rel err {e}"
                );
            }
        }
    }
}

#[test]
fn skinny_gemm_reads_column_slices_in_place() {
    let dev = cuda();
    let mut rng = StdRng::seed_from_u64(12);
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let tol = if dt == DType::F32 { 2e-6 } else { 1e-2 };
        // the Mamba's dt_proj reads the first 48 of 304 columns of x_proj's output
        let xd = uniform(&mut rng, &[2, 28, 304], -2.0, 2.0, dt, &dev);
        let w = uniform(&mut rng, &[3072, 48], -0.15, 0.15, dt, &dev);
        for (start, len) in [(0, 48), (48, 128), (176, 128)] {
            let x = xd.narrow(D::Minus1, start, len).unwrap();
            let w = if len == 48 {
                w.clone()
            } else {
                uniform(&mut rng, &[64, len], -0.1, 0.1, dt, &dev)
            };
            assert!(!x.is_contiguous());
            assert!(cuda_gemm::supports(&x, &w));
            let ep = Epilogue {
                bias: None,
                act: Act::Identity,
                gate: None,
                residual: None,
            };
            let got = cuda_gemm::linear(&x, &w, ep).unwrap();
            let e = rel_err(&got, &reference(&x, &w, &ep));
            assert!(e <= tol, "columns {start}..+{len} {dt:?}: rel err {e}");
        }
    }
}

#[test]
fn skinny_gemm_refuses_what_it_cannot_take() {
    let dev = cuda();
    let mut rng = StdRng::seed_from_u64(13);
    let f32u = |rng: &mut StdRng, s: &[usize]| uniform(rng, s, -1.0, 1.0, DType::F32, &dev);
    let ep = Epilogue {
        bias: None,
        act: Act::Identity,
        gate: None,
        residual: None,
    };
    let cases = [
        // K not a multiple of 4 (the LPE's 257 bins, the 438 music features)
        (f32u(&mut rng, &[28, 438]), f32u(&mut rng, &[768, 438])),
        // N not a multiple of 4
        (f32u(&mut rng, &[28, 64]), f32u(&mut rng, &[10, 64])),
        // K mismatch
        (f32u(&mut rng, &[28, 64]), f32u(&mut rng, &[16, 68])),
        // dtype mismatch
        (
            f32u(&mut rng, &[28, 64]),
            f32u(&mut rng, &[16, 64]).to_dtype(DType::F16).unwrap(),
        ),
        // a transposed (row-strided in the wrong dimension) input
        (
            f32u(&mut rng, &[64, 28]).t().unwrap(),
            f32u(&mut rng, &[16, 64]),
        ),
    ];
    for (x, w) in &cases {
        assert!(
            !cuda_gemm::supports(x, w),
            "{:?} x {:?}",
            x.dims(),
            w.dims()
        );
        assert!(cuda_gemm::linear(x, w, ep).is_err());
    }
    // a bias of the wrong width is an error, not a crash
    let x = f32u(&mut rng, &[28, 64]);
    let w = f32u(&mut rng, &[16, 64]);
    let b = f32u(&mut rng, &[12]);
    let bad = Epilogue {
        bias: Some(&b),
        ..ep
    };
    assert!(cuda_gemm::linear(&x, &w, bad).is_err());
    // the model's layers send at most max_rows() rows to it (f16/bf16 and the K-splitting f32
    // kernel: 32 by default; the register-tiled f32 kernels: any number)
    let limit = cuda_gemm::max_rows(DType::F16);
    let tall = f32u(&mut rng, &[limit + 1, 64])
        .to_dtype(DType::F16)
        .unwrap();
    let wh16 = w.to_dtype(DType::F16).unwrap();
    assert!(cuda_gemm::supports(&tall, &wh16) && !cuda_gemm::applies(&tall, &wh16));
    let f32_limit = cuda_gemm::max_rows(DType::F32);
    if f32_limit < 100_000 {
        let tall = f32u(&mut rng, &[f32_limit + 1, 64]);
        assert!(cuda_gemm::supports(&tall, &w) && !cuda_gemm::applies(&tall, &w));
    } else {
        let tall = f32u(&mut rng, &[4096, 64]);
        assert!(cuda_gemm::applies(&tall, &w));
    }
    // the model's layers send f32 to it by default, f16/bf16 to cuBLAS (`DANCEBA_CUDA_GEMM`)
    let xh = x.to_dtype(DType::F16).unwrap();
    let wh = w.to_dtype(DType::F16).unwrap();
    assert!(cuda_gemm::supports(&xh, &wh));
    match cuda_gemm::mode() {
        cuda_gemm::Mode::F32 => {
            assert!(cuda_gemm::applies(&x, &w) && !cuda_gemm::applies(&xh, &wh))
        }
        cuda_gemm::Mode::All => assert!(cuda_gemm::applies(&xh, &wh)),
        cuda_gemm::Mode::Off => assert!(!cuda_gemm::applies(&x, &w)),
    }
    // CPU tensors are not taken
    let xc = x.to_device(&Device::Cpu).unwrap();
    let wc = w.to_device(&Device::Cpu).unwrap();
    assert!(!cuda_gemm::supports(&xc, &wc));
}
