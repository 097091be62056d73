//! CUDA graphs of the GPT forward (feature `cuda`, needs a GPU): the replayed graph gives the
//! logits of the direct forward for every window shape (warm-up, capture and replays, each with
//! new inputs), on the tiny golden model and on the real-size architecture in f32 and bf16, and
//! the graph path reproduces the golden teacher-forced step logits.
#![cfg(feature = "cuda")]

mod gpt_common;

use candle_core::{DType, Device, Tensor};
use danceba_model::gpt::random::{official_gpt_arch, random_gpt_on};
use danceba_model::gpt::sampler::window;
use danceba_model::gpt::Gpt;
use gpt_common::{golden_pipelines, tiny_gpt_on};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

/// Largest |a − b| over max |b| (0 when both are zero).
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let m = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d.is_finite(), "non-finite logits");
    if m == 0.0 {
        d
    } else {
        d / m
    }
}

/// Graph replays against direct forwards for several window shapes, four calls per shape
/// (warm-up, capture, two replays), each with fresh random tokens and condition; the first call
/// of each shape also against the last row of the whole forward (every position's logits, the
/// head's last block on all rows), within `tol_whole`.
fn graph_matches_direct(gpt: &Gpt, shapes: &[(usize, usize)], tol: f32, tol_whole: f32, seed: u64) {
    let mut direct = gpt.clone();
    direct.set_cuda_graphs(false);
    assert!(gpt.cuda_graphs() && !direct.cuda_graphs());
    let a = gpt.arch().clone();
    let mut rng = StdRng::seed_from_u64(seed);
    for &(b, t) in shapes {
        for call in 0..4 {
            let up: Vec<u32> = (0..b * t)
                .map(|_| rng.gen_range(0..a.vocab_up as u32))
                .collect();
            let down: Vec<u32> = (0..b * t)
                .map(|_| rng.gen_range(0..a.vocab_down as u32))
                .collect();
            let cond: Vec<f32> = (0..b * t * a.n_music)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect();
            let (gu, gd) = gpt.last_logits(&up, &down, &cond, b, t).unwrap();
            let (wu, wd) = direct.last_logits(&up, &down, &cond, b, t).unwrap();
            assert_eq!(gu.len(), b * a.vocab_up);
            assert_eq!(gd.len(), b * a.vocab_down);
            let (eu, ed) = (rel(&gu, &wu), rel(&gd, &wd));
            println!("b={b} t={t} call {call}: graph vs direct rel err up {eu:e} down {ed:e}");
            assert!(eu <= tol && ed <= tol, "b={b} t={t} call {call}: {eu} {ed}");
            if call == 0 {
                let dev = gpt.device();
                let ids = |v: &[u32]| Tensor::from_slice(v, (b, t), dev).unwrap();
                let c = Tensor::from_slice(&cond, (b, t, a.n_music), dev).unwrap();
                let (fu, fd) = direct.forward(&ids(&up), &ids(&down), &c).unwrap();
                let last = |l: Tensor| -> Vec<f32> {
                    let l = l.narrow(1, t - 1, 1).unwrap().to_dtype(DType::F32).unwrap();
                    l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                let (eu, ed) = (rel(&gu, &last(fu)), rel(&gd, &last(fd)));
                println!("b={b} t={t}: last rows vs whole forward rel err up {eu:e} down {ed:e}");
                assert!(eu <= tol_whole && ed <= tol_whole, "b={b} t={t}: {eu} {ed}");
            }
        }
    }
    let (seen, captured, failed) = gpt.cuda_graph_stats();
    println!("graph cache: {seen} shapes, {captured} captured, {failed} failed");
    assert_eq!(failed, 0, "a capture failed");
    assert_eq!(captured, shapes.len());
}

#[test]
fn tiny_model_graphs_match_direct_forward() {
    let dev = cuda();
    let gpt = tiny_gpt_on(&dev, DType::F32);
    graph_matches_direct(
        &gpt,
        &[(1, 1), (1, 5), (1, 28), (3, 28), (2, 17)],
        1e-6,
        1e-5,
        1,
    );
}

#[test]
fn real_size_graphs_match_direct_forward() {
    let dev = cuda();
    // bf16: where the sampler's forward takes the last block at the last rows only, its
    // products of 3 rows and the whole block's of 3t round their bf16 outputs apart (on CUDA the
    // sampler takes the whole block in bf16, Gpt::sampler_logits: equal)
    for (dt, tol, whole) in [(DType::F32, 1e-6, 1e-5), (DType::BF16, 1e-6, 3e-2)] {
        let gpt = random_gpt_on(&official_gpt_arch(), 3, &dev, dt).unwrap();
        println!("{dt:?}");
        graph_matches_direct(&gpt, &[(1, 28), (8, 28), (3, 9)], tol, whole, 2);
    }
}

#[test]
fn graph_path_reproduces_golden_step_logits() {
    let dev = cuda();
    let gpt = tiny_gpt_on(&dev, DType::F32);
    assert!(gpt.cuda_graphs());
    let (vu, vd) = (gpt.arch().vocab_up, gpt.arch().vocab_down);
    for g in golden_pipelines() {
        let (n, nm) = g.cond.dims2().unwrap();
        let cond = g.cond.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = 0f32;
        for k in 0..n {
            let (s, t) = window(k, gpt.arch().block_size);
            let (lu, ld) = gpt
                .last_logits(
                    &g.up[s..s + t],
                    &g.down[s..s + t],
                    &cond[s * nm..(s + t) * nm],
                    1,
                    t,
                )
                .unwrap();
            let wu = g.logits_up.get(k).unwrap().to_vec1::<f32>().unwrap();
            let wd = g.logits_down.get(k).unwrap().to_vec1::<f32>().unwrap();
            let (eu, ed) = (rel(&lu[..vu], &wu), rel(&ld[..vd], &wd));
            assert!(
                eu <= 1e-4 && ed <= 1e-4,
                "{} step {k}: rel err up {eu} down {ed}",
                g.name
            );
            worst = worst.max(eu).max(ed);
        }
        println!(
            "{}: {n} steps through the graph path, worst rel err {worst:e}",
            g.name
        );
    }
    let (_, captured, failed) = gpt.cuda_graph_stats();
    assert_eq!(failed, 0);
    assert!(
        captured >= 1,
        "the steady window was never replayed from a graph"
    );
}

/// The tiny model with CUDA graphs and a copy without, the window shape (2, block_size − 1),
/// `count` random conditions of that shape and one of a single window.
fn staged_setup(seed: u64, count: usize) -> (Gpt, Gpt, usize, usize, Vec<Vec<f32>>, Vec<f32>) {
    let gpt = tiny_gpt_on(&cuda(), DType::F32);
    let mut direct = gpt.clone();
    direct.set_cuda_graphs(false);
    let nm = gpt.arch().n_music;
    let (b, t) = (2, gpt.arch().block_size - 1);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect() };
    let conds = (0..count).map(|_| random(b * t * nm)).collect();
    let other = random(t * nm);
    (gpt, direct, b, t, conds, other)
}

/// The next window staged during a call (`Gpt::last_logits_ahead`: its phase computed and its
/// condition copied to the graph's inputs while the GPU runs): a run of steady windows, each
/// call told the next window's condition, except one hint with a single value changed and one
/// with another window count. Every call gives the direct forward's logits, and exactly the
/// matching hints are used (call 0 warms up, call 1 captures and stages call 2's window; the
/// replays 2–6: 2, 3 and 5 launch on their staged window, 4 launches on the changed one, finds
/// the mismatch and replays again on its own, 6 has nothing staged).
#[test]
fn phase_computed_ahead_is_used_only_for_its_window() {
    let (gpt, direct, b, t, conds, _) = staged_setup(9, 8);
    let before = gpt.cuda_graph_timing();
    for i in 0..7 {
        let ids = |v: u32| {
            (0..b * t)
                .map(|j| (j as u32 * 7 + v) % 50)
                .collect::<Vec<u32>>()
        };
        let (up, down) = (ids(i as u32), ids(3 * i as u32 + 1));
        let (hint, nb) = match i {
            3 => {
                let mut c = conds[4].clone();
                c[17] += 0.25;
                (c, b)
            }
            5 => (conds[6].clone(), 1),
            _ => (conds[i + 1].clone(), b),
        };
        let (gu, gd) = gpt
            .last_logits_ahead(&up, &down, &conds[i], b, t, Some((&hint, nb)))
            .unwrap();
        let (wu, wd) = direct.last_logits(&up, &down, &conds[i], b, t).unwrap();
        let (eu, ed) = (rel(&gu, &wu), rel(&gd, &wd));
        println!("call {i}: graph (phase ahead) vs direct rel err up {eu:e} down {ed:e}");
        assert!(eu <= 1e-6 && ed <= 1e-6, "call {i}: {eu} {ed}");
    }
    let after = gpt.cuda_graph_timing();
    assert_eq!(after.replays - before.replays, 5);
    assert_eq!(after.ahead_hits - before.ahead_hits, 3);
}

/// A staged window is only a guess: a hint with a non-finite value is not staged and its call
/// reports the value; a staged window followed by a call of another shape is dropped, and the
/// staged shape's next call uploads its own window (every result equals the direct forward's).
#[test]
fn staged_windows_never_replace_a_calls_own_inputs() {
    let (gpt, direct, b, t, conds, other) = staged_setup(11, 6);
    let a = gpt.arch().clone();
    let ids = |n: usize, v: u32| {
        (0..n)
            .map(|j| (j as u32 * 5 + v) % 40)
            .collect::<Vec<u32>>()
    };
    let check = |up: &[u32], down: &[u32], cond: &[f32], bb: usize, got: (Vec<f32>, Vec<f32>)| {
        let (wu, wd) = direct.last_logits(up, down, cond, bb, t).unwrap();
        let (eu, ed) = (rel(&got.0, &wu), rel(&got.1, &wd));
        assert!(eu <= 1e-6 && ed <= 1e-6, "{eu} {ed}");
    };
    // warm up and capture, the capture staging conds[2]
    for i in 0..2 {
        let (up, down) = (ids(b * t, i), ids(b * t, i + 3));
        let got = gpt
            .last_logits_ahead(&up, &down, &conds[i as usize], b, t, Some((&conds[2], b)))
            .unwrap();
        check(&up, &down, &conds[i as usize], b, got);
    }
    // a NaN in the next window's hint: nothing staged, and that window is refused
    let mut bad = conds[3].clone();
    bad[b * t * a.n_music - 5] = f32::NAN;
    let (up, down) = (ids(b * t, 7), ids(b * t, 8));
    let got = gpt
        .last_logits_ahead(&up, &down, &conds[2], b, t, Some((&bad, b)))
        .unwrap();
    check(&up, &down, &conds[2], b, got);
    let err = gpt
        .last_logits_ahead(&up, &down, &bad, b, t, Some((&conds[4], b)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
    // stage conds[4], then a call of another shape, then the staged shape with conds[5]
    let got = gpt
        .last_logits_ahead(&up, &down, &conds[3], b, t, Some((&conds[4], b)))
        .unwrap();
    check(&up, &down, &conds[3], b, got);
    let (u1, d1) = (ids(t, 1), ids(t, 2));
    let got = gpt.last_logits(&u1, &d1, &other, 1, t).unwrap();
    check(&u1, &d1, &other, 1, got);
    let got = gpt.last_logits(&up, &down, &conds[5], b, t).unwrap();
    check(&up, &down, &conds[5], b, got);
    // and a staged window that is used
    let got = gpt
        .last_logits_ahead(&up, &down, &conds[0], b, t, Some((&conds[1], b)))
        .unwrap();
    check(&up, &down, &conds[0], b, got);
    let before = gpt.cuda_graph_timing();
    let got = gpt.last_logits(&up, &down, &conds[1], b, t).unwrap();
    check(&up, &down, &conds[1], b, got);
    assert_eq!(gpt.cuda_graph_timing().ahead_hits - before.ahead_hits, 1);
}
