//! Forward parity of the GPT with `golden/model/gpt_forward.safetensors`.

mod gpt_common;

use candle_core::{DType, Device, Tensor};
use danceba_model::gpt::{lpe::lpe_phase, mamba::Mamba, MambaImpl};
use gpt_common::*;

const TOL: f32 = 1e-4;
const WINDOWS: [usize; 5] = [1, 4, 17, 18, 28];

#[test]
fn lpe_phase_matches_golden() {
    let g = load_st("gpt_forward.safetensors");
    for t in WINDOWS {
        let cond = &g[&format!("t{t}.cond")];
        let want = &g[&format!("t{t}.lpe_phase")];
        let got = lpe_phase(cond).unwrap();
        assert_eq!(got.dims(), want.dims(), "t={t}");
        let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = 0f32;
        let mut wraps = 0;
        for (x, y) in a.iter().zip(&b) {
            let mut d = (x - y).abs();
            // ±π for an imaginary part that is rounding noise around a negative real part
            if (d - 2.0 * std::f32::consts::PI).abs() < 1e-3 {
                wraps += 1;
                d = (d - 2.0 * std::f32::consts::PI).abs();
            }
            worst = worst.max(d);
        }
        println!(
            "t={t}: worst phase diff {worst:e}, ±π wraps {wraps} of {}",
            a.len()
        );
        assert!(
            worst < 1e-4 && wraps == 0,
            "t={t}: phase differs by {worst} ({wraps} wraps)"
        );
    }
}

#[test]
fn forward_matches_golden_at_every_window() {
    let g = load_st("gpt_forward.safetensors");
    let mut gpt = tiny_gpt();
    for imp in [MambaImpl::Portable, MambaImpl::FusedCpu] {
        gpt.set_mamba_impl(imp);
        for t in WINDOWS {
            let k = |n: &str| g[&format!("t{t}.{n}")].clone();
            let tr = gpt
                .forward_trace(&k("idx_up"), &k("idx_down"), &k("cond"))
                .unwrap();
            for (name, got) in [
                ("lpe_out", &tr.lpe_out),
                ("base_out", &tr.base_out),
                ("head_blocks_out", &tr.head_blocks_out),
                ("logits_up", &tr.logits_up),
                ("logits_down", &tr.logits_down),
            ] {
                let e = rel_err(got, &k(name));
                println!("{imp:?} t={t} {name}: rel err {e:e}");
                assert!(e <= TOL, "{imp:?} t={t} {name}: rel err {e}");
            }
        }
    }
}

#[test]
fn mamba_layer_matches_golden_portable_and_fused() {
    let g = load_st("gpt_forward.safetensors");
    let (vb, arch) = tiny_vb();
    let m = Mamba::load(vb.pp("gpt_head.blocks.0.mamba_2"), arch.n_embd, &arch.mamba).unwrap();
    let x = &g["mamba.in"];
    let want = &g["mamba.out"];
    let p = m.forward(x, MambaImpl::Portable).unwrap();
    let f = m.forward(x, MambaImpl::FusedCpu).unwrap();
    let (ep, ef, epf) = (rel_err(&p, want), rel_err(&f, want), rel_err(&f, &p));
    println!("mamba: portable {ep:e}, fused {ef:e}, fused vs portable {epf:e}");
    assert!(ep <= TOL && ef <= TOL && epf <= TOL);
}

/// The sampler's forward (`last_logits`: the head's last block only at the last row of each
/// stream) against the whole forward's last row, at every golden window and on a batch of two
/// different windows, in f32 and with bf16 weights.
#[test]
fn last_logits_match_the_whole_forward_at_the_last_row() {
    let g = load_st("gpt_forward.safetensors");
    for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 1e-5)] {
        let gpt = tiny_gpt_dtype(dtype);
        let nm = gpt.arch().n_music;
        for t in WINDOWS {
            let k = |n: &str| g[&format!("t{t}.{n}")].clone();
            let ids = |n: &str| -> Vec<u32> {
                let v = k(n).flatten_all().unwrap().to_dtype(DType::I64).unwrap();
                v.to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .map(|&x| x as u32)
                    .collect()
            };
            let (up, down) = (ids("idx_up"), ids("idx_down"));
            let cond = k("cond").flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // a second window: the streams' tokens swapped and reversed, the condition scaled
            let up2: Vec<u32> = down.iter().rev().copied().collect();
            let down2: Vec<u32> = up.iter().rev().copied().collect();
            let cond2: Vec<f32> = cond.iter().map(|v| 0.5 * v - 0.25).collect();
            let cat = |a: &[u32], b: &[u32]| [a, b].concat();
            let (bu, bd, bc) = (
                cat(&up, &up2),
                cat(&down, &down2),
                [&cond[..], &cond2].concat(),
            );
            let (lu, ld) = gpt.last_logits(&bu, &bd, &bc, 2, t).unwrap();
            let (vu, vd) = (gpt.arch().vocab_up, gpt.arch().vocab_down);
            assert_eq!((lu.len(), ld.len()), (2 * vu, 2 * vd));
            for (i, (u, d, c)) in [(&up, &down, &cond), (&up2, &down2, &cond2)]
                .into_iter()
                .enumerate()
            {
                let tensor = |v: &[u32]| Tensor::from_slice(v, (1, t), &Device::Cpu).unwrap();
                let ct = Tensor::from_slice(c, (1, t, nm), &Device::Cpu).unwrap();
                let (fu, fd) = gpt.forward(&tensor(u), &tensor(d), &ct).unwrap();
                let last = |l: &Tensor| {
                    l.narrow(1, t - 1, 1)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                };
                let got_u = Tensor::new(&lu[i * vu..(i + 1) * vu], &Device::Cpu).unwrap();
                let got_d = Tensor::new(&ld[i * vd..(i + 1) * vd], &Device::Cpu).unwrap();
                let (eu, ed) = (rel_err(&got_u, &last(&fu)), rel_err(&got_d, &last(&fd)));
                println!("{dtype:?} t={t} window {i}: rel err up {eu:e}, down {ed:e}");
                assert!(
                    eu <= tol && ed <= tol,
                    "{dtype:?} t={t} window {i}: {eu} / {ed}"
                );
            }
        }
    }
}

/// `BlockHead::forward_chain` on the CPU runs each stream through all the blocks as its own
/// task; it must give the bits of the blocks applied one after another, stream by stream
/// (`forward_streams`), at batch 1 and 2, a short window and a full one, f32 and bf16 weights.
#[test]
fn block_head_chain_with_parallel_streams_matches_stream_by_stream() {
    use candle_nn::VarBuilder;
    use danceba_model::arch::MambaArch;
    use danceba_model::gpt::mamba::BlockHead;
    use rand::SeedableRng;
    let (c, arch) = (
        64,
        MambaArch {
            d_inner: 128,
            d_state: 32,
            dt_rank: 4,
            d_conv: 4,
        },
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let ws = [
        random_block_head(&mut rng, c, &arch),
        random_block_head(&mut rng, c, &arch),
    ];
    for dt in [DType::F32, DType::BF16] {
        let blocks: Vec<BlockHead> = ws
            .iter()
            .map(|w| {
                let vb = VarBuilder::from_tensors(w.clone(), dt, &Device::Cpu);
                BlockHead::load(vb, c, c, &arch).unwrap()
            })
            .collect();
        for (batch, t) in [(1, 3), (1, 28), (2, 28)] {
            let x = uniform(&mut rng, &[batch, 3 * t, c], -2.0, 2.0);
            let got = BlockHead::forward_chain(&blocks, &x, t, MambaImpl::FusedCpu).unwrap();
            let mut want = x.clone();
            for b in &blocks {
                want = b.forward_streams(&want, t, MambaImpl::FusedCpu).unwrap();
            }
            let (g, w) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(got.dims(), want.dims());
            assert!(
                g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dt:?} B={batch} t={t}: the parallel streams differ"
            );
        }
    }
}

/// The sampler's CPU step on host buffers (`cpu_step.rs`) on a model of other sizes than the
/// golden ones: a head size of 8 (5 heads of 40), 12 states (the portable scan loop; not a
/// multiple of 8), odd widths and vocabularies, block size 11. Its last-position logits
/// against the candle forward's, at every window length, batches of 1 and 3, f32 and f16
/// weights; and a generation with that model equals the one the candle forward gives.
#[test]
fn host_step_matches_the_candle_forward_on_odd_sizes() {
    use danceba_model::arch::{GptArch, MambaArch};
    use danceba_model::gpt::random::random_gpt_on;
    use danceba_model::gpt::MambaImpl;
    use rand::{Rng, SeedableRng};
    let arch = GptArch {
        n_embd: 40,
        n_head: 5,
        n_layer_base: 2,
        n_layer_head: 2,
        vocab_up: 37,
        vocab_down: 41,
        n_music: 438,
        block_size: 11,
        mlp_hidden: 100,
        gated_mlp_hidden: 48,
        lpe_bins: 257,
        mamba: MambaArch {
            d_inner: 80,
            d_state: 12,
            dt_rank: 3,
            d_conv: 4,
        },
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    for dtype in [DType::F32, DType::F16] {
        let gpt = random_gpt_on(&arch, 3, &Device::Cpu, dtype).unwrap();
        if !gpt.cpu_host_step() {
            println!(
                "SKIPPED: no CPU host step here (needs x86-64 with AVX2 or AVX-512, or AArch64)"
            );
            return;
        }
        let nm = arch.n_music;
        for b in [1usize, 3] {
            for t in 1..arch.block_size {
                let up: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..37)).collect();
                let down: Vec<u32> = (0..b * t).map(|_| rng.gen_range(0..41)).collect();
                let cond: Vec<f32> = (0..b * t * nm).map(|_| rng.gen_range(-2.0..2.0)).collect();
                let (lu, ld) = gpt.last_logits(&up, &down, &cond, b, t).unwrap();
                let tensor = |v: &[u32]| Tensor::from_slice(v, (b, t), &Device::Cpu).unwrap();
                let ct = Tensor::from_slice(&cond, (b, t, nm), &Device::Cpu).unwrap();
                let (fu, fd) = gpt.forward(&tensor(&up), &tensor(&down), &ct).unwrap();
                let last = |l: &Tensor| {
                    l.narrow(1, t - 1, 1)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                };
                let got_u = Tensor::new(lu.as_slice(), &Device::Cpu).unwrap();
                let got_d = Tensor::new(ld.as_slice(), &Device::Cpu).unwrap();
                let (eu, ed) = (rel_err(&got_u, &last(&fu)), rel_err(&got_d, &last(&fd)));
                assert!(
                    eu <= 2e-6 && ed <= 2e-6,
                    "{dtype:?} b={b} t={t}: rel err {eu} / {ed}"
                );
            }
        }
        // whole generations: the host step and the candle forward (the portable Mamba, which
        // the host step never runs) choose the same tokens on this model
        let cond = Tensor::from_vec(
            (0..30 * nm)
                .map(|_| rng.gen_range(-2.0f32..2.0))
                .collect::<Vec<_>>(),
            (30, nm),
            &Device::Cpu,
        )
        .unwrap();
        let opts = danceba_model::gpt::GenerateOptions {
            start: (5, 7),
            ..Default::default()
        };
        let host = gpt.generate(&cond, &opts, &mut |_, _| {}).unwrap();
        let mut portable = gpt.clone();
        portable.set_mamba_impl(MambaImpl::Portable);
        assert!(!portable.cpu_host_step());
        let candle = portable.generate(&cond, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(host, candle, "{dtype:?}: the host step's tokens differ");
    }
}
