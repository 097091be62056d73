//! Reduced precision (f16, bf16) judged against f32 on the golden pipelines
//! (`golden/model/*.pipeline.safetensors`, the tiny golden GPT and VQ-VAE):
//!
//! * teacher-forced: at every step of every pipeline the window holds the golden (f32 greedy)
//!   tokens, and the reduced-precision model's argmax of the last position must pick the golden
//!   token — at least 98 % of all (step, stream) decisions;
//! * the motion of those teacher-forced tokens (start token, then each step's argmax), decoded
//!   as the pipeline decodes (f32 VQ-VAE, root integration, absolute joint positions in
//!   metres), must stay within 1 cm of the golden motion in mean per-joint position error. The
//!   largest error and the frames it touches are printed, not asserted: any differing token
//!   moves joints by several cm around it (the decoder's receptive field is 31 tokens each
//!   way), and one differing token of the lower half changes the decoded root velocity, which
//!   the root trajectory integrates into an offset that every later frame keeps.
//!
//! f16 meets the motion criterion; bf16 does not, so its test is `#[ignore]`d, a known failure
//! (run it with `--ignored`): bf16 weights (8 mantissa bits) move the logits by 0.016 on
//! average (`reduced_precision_logits_stay_close_to_f32`), more than the logit margins of the
//! tiny random model's near-ties (the flipped decisions had margins 0.0002–0.010), and a
//! flipped lower-half token's integrated root then stays 10.2 cm (electronic), 8.1 cm
//! (mono22k) and 4.0 cm (rock) away. Which near-ties flip changes with any change of rounding:
//! folding the LPE's batch norm in f32 instead of bf16 brought the logits closer to f32 (mean
//! error 1.71e-2 → 1.64e-2) and flipped electronic's step 49 (margin 0.0002), which had held.
//! Keeping every small parameter in f32 would not help (measured by rounding only the weight
//! matrices to bf16 and leaving A_log, D, the biases, norms and convolutions exact, all in f32
//! arithmetic): mono22k and rock still flip (8.1 and 3.7 cm); the matrices' rounding alone
//! moves the logits that much.
//!
//! The VQ-VAE always decodes in f32 (`danceba generate` loads it in f32 whatever `--dtype`
//! says): decoding the golden tokens in f16 moved joints by up to 3.7 cm (the root trajectory
//! integrates the error), so tokens equal ⇒ motion identical.
//!
//! Free-running generation is reported, not asserted: one token that differs at a near-tie
//! (the tiny random model has many: 54 of 784 golden decisions have a logit margin < 0.1)
//! changes the whole continuation, so whole-song token equality says little about precision.

mod gpt_common;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use danceba_model::arch::VqVaeArch;
use danceba_model::checkpoint;
use danceba_model::gpt::sampler::window;
use danceba_model::gpt::{GenerateOptions, Gpt};
use danceba_model::vqvae::VqVae;
use danceba_motion::skeleton::NUM_JOINTS;
use danceba_motion::Motion;
use gpt_common::*;

/// Motion frame rate of DanceBa (the pipeline's `MOTION_FPS`).
const FPS: f32 = 60.0;

/// Index of the largest value (the lowest index on ties, like the sampler).
fn argmax(t: &Tensor) -> u32 {
    let v = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Teacher-forced greedy tokens of one pipeline: the golden start token, then at every step k
/// the argmax of the last-position logits of the window of golden tokens ending at token k.
struct TeacherForced {
    up: Vec<u32>,
    down: Vec<u32>,
    /// Σ |logit − golden f32 logit| over every step's last-position logits of both streams,
    /// their count, and the largest.
    logit_err_sum: f64,
    logit_count: usize,
    logit_err_max: f32,
}

fn teacher_forced(gpt: &Gpt, p: &Golden) -> TeacherForced {
    let n = p.cond.dim(0).unwrap();
    let (mut up, mut down) = (vec![p.up[0]], vec![p.down[0]]);
    let (mut logit_err_sum, mut logit_count, mut logit_err_max) = (0f64, 0usize, 0f32);
    // Step k predicts token k + 1 from the window ending at token k. The windows of one length
    // (all of them once the window is full) go through the model together, up to BATCH at a
    // time: the same computation as one forward each (every window is an item of the batch),
    // in far fewer calls (this test runs under qemu in CI).
    const BATCH: usize = 32;
    let bs = gpt.arch().block_size;
    let mut k = 0;
    while k < n {
        // steps k..end: the windows of k's length
        let t = window(k, bs).1;
        let mut end = k + 1;
        while end < n && end - k < BATCH && window(end, bs).1 == t {
            end += 1;
        }
        let ks = k..end;
        let starts: Vec<usize> = ks.clone().map(|j| window(j, bs).0).collect();
        let ids = |tokens: &[u32]| {
            let v: Vec<u32> = starts
                .iter()
                .flat_map(|&s| tokens[s..s + t].iter().copied())
                .collect();
            Tensor::from_slice(&v, (starts.len(), t), &Device::Cpu).unwrap()
        };
        let windows: Vec<Tensor> = starts
            .iter()
            .map(|&s| p.cond.narrow(0, s, t).unwrap())
            .collect();
        let c = Tensor::stack(&windows, 0).unwrap();
        let (lu, ld) = gpt.forward(&ids(&p.up), &ids(&p.down), &c).unwrap();
        for (i, k) in ks.enumerate() {
            let (lu, ld) = (
                lu.get(i).unwrap().get(t - 1).unwrap(),
                ld.get(i).unwrap().get(t - 1).unwrap(),
            );
            // the golden step k saw this very window (golden tokens): its logits are the f32
            // ones
            for (got, want) in [(&lu, &p.logits_up), (&ld, &p.logits_down)] {
                let got = got.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
                let want = want.get(k).unwrap().to_vec1::<f32>().unwrap();
                for (a, b) in got.iter().zip(&want) {
                    let e = (a - b).abs();
                    logit_err_sum += e as f64;
                    logit_err_max = logit_err_max.max(e);
                }
                logit_count += want.len();
            }
            up.push(argmax(&lu));
            down.push(argmax(&ld));
        }
        k = end;
    }
    assert_eq!(up.len(), p.up.len(), "{}: token count", p.name);
    TeacherForced {
        up,
        down,
        logit_err_sum,
        logit_count,
        logit_err_max,
    }
}

const DTYPES: [DType; 2] = [DType::F16, DType::BF16];

type Shared = (Vec<Golden>, Vec<(DType, Vec<TeacherForced>)>);

/// The golden pipelines and, for each of [`DTYPES`], every pipeline's teacher-forced tokens;
/// computed once for all tests of this file.
fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let pipes = golden_pipelines();
        let tf = DTYPES
            .iter()
            .map(|&dtype| {
                let gpt = tiny_gpt_dtype(dtype);
                (
                    dtype,
                    pipes.iter().map(|p| teacher_forced(&gpt, p)).collect(),
                )
            })
            .collect();
        (pipes, tf)
    })
}

fn vqvae(dtype: DType) -> VqVae {
    // f32 only, see the module doc
    let sd = checkpoint::load_on(
        &golden_dir().join("model/tiny_vqvae.pt"),
        &Device::Cpu,
        dtype,
    )
    .unwrap();
    let arch = VqVaeArch::detect(&sd.shapes(), sd.config.as_ref()).unwrap();
    VqVae::load(sd.var_builder(dtype, &Device::Cpu), &arch).unwrap()
}

/// Tokens → absolute motion as the pipeline decodes them (`Pipeline::decode`: the VQ-VAE's
/// `pose_decoded`, then root integration and absolute positions; its chunked decode equals
/// the whole-song decode).
fn decode(vq: &VqVae, up: &[u32], down: &[u32]) -> Motion {
    Motion::from_decoded(&vq.decode(up, down).unwrap(), FPS).unwrap()
}

/// Largest joint-position difference in cm between two decoded motions.
fn motion_cm(a: &[f32], b: &[f32]) -> f32 {
    let ma = Motion::from_decoded(a, FPS).unwrap();
    let mb = Motion::from_decoded(b, FPS).unwrap();
    ma.positions
        .iter()
        .zip(&mb.positions)
        .fold(0f32, |w, (x, y)| w.max((x - y).abs()))
        * 100.0
}

/// Per-joint position error (Euclidean distance, metres) between two motions of equal length.
struct JointError {
    mean: f64,
    max: f32,
    /// frames where some joint moved at all
    frames_nonzero: usize,
    frames: usize,
    /// first such frame
    first_frame: Option<usize>,
}

fn joint_error(a: &Motion, b: &Motion) -> JointError {
    assert_eq!(a.frames(), b.frames(), "frame counts");
    let (mut sum, mut max, mut frames_nonzero, mut first_frame) = (0f64, 0f32, 0, None);
    for (f, (ra, rb)) in a
        .positions
        .chunks_exact(3 * NUM_JOINTS)
        .zip(b.positions.chunks_exact(3 * NUM_JOINTS))
        .enumerate()
    {
        let mut frame_max = 0f32;
        for (ja, jb) in ra.chunks_exact(3).zip(rb.chunks_exact(3)) {
            let d = ja
                .iter()
                .zip(jb)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f32>()
                .sqrt();
            sum += f64::from(d);
            frame_max = frame_max.max(d);
        }
        max = max.max(frame_max);
        if frame_max > 0.0 {
            frames_nonzero += 1;
            first_frame.get_or_insert(f);
        }
    }
    JointError {
        mean: sum / (a.frames() * NUM_JOINTS) as f64,
        max,
        frames_nonzero,
        frames: a.frames(),
        first_frame,
    }
}

#[test]
fn reduced_precision_gpt_agrees_with_f32_teacher_forced() {
    let f32_gpt = tiny_gpt();
    let vq = vqvae(DType::F32);
    let (pipes, tf) = shared();
    let mut report = Vec::new();
    for (dtype, tokens_tf) in tf {
        let gpt = tiny_gpt_dtype(*dtype);
        let (mut agree, mut all) = (0, 0);
        let (mut same, mut tokens, mut worst_cm) = (0, 0, 0f32);
        for (p, tf) in pipes.iter().zip(tokens_tf) {
            // token 0 is the start token, not a decision
            agree += tf.up[1..]
                .iter()
                .zip(&p.up[1..])
                .filter(|(a, b)| a == b)
                .count();
            agree += tf.down[1..]
                .iter()
                .zip(&p.down[1..])
                .filter(|(a, b)| a == b)
                .count();
            all += 2 * (p.up.len() - 1);
            // reported only (see the module doc)
            let opts = GenerateOptions::default();
            let reference = f32_gpt.generate(&p.cond, &opts, &mut |_, _| {}).unwrap();
            assert_eq!(reference.up, p.up, "{}: f32 free-running tokens", p.name);
            let got = gpt.generate(&p.cond, &opts, &mut |_, _| {}).unwrap();
            tokens += 2 * p.up.len();
            same += got.up.iter().zip(&p.up).filter(|(a, b)| a == b).count();
            same += got.down.iter().zip(&p.down).filter(|(a, b)| a == b).count();
            let cm = motion_cm(
                &vq.decode(&got.up, &got.down).unwrap(),
                &vq.decode(&p.up, &p.down).unwrap(),
            );
            worst_cm = worst_cm.max(cm);
        }
        let pct = 100.0 * agree as f64 / all as f64;
        println!(
            "{dtype:?}: teacher-forced argmax agreement {agree}/{all} = {pct:.2} %; free-running: \
             {:.2} % of tokens equal, motion differs by up to {worst_cm:.1} cm",
            100.0 * same as f64 / tokens as f64
        );
        report.push((*dtype, pct));
    }
    for (dtype, pct) in report {
        assert!(
            pct >= 98.0,
            "{dtype:?}: teacher-forced agreement {pct:.2} % < 98 %"
        );
    }
}

/// How far the reduced-precision logits are from the official f32 ones, over every
/// teacher-forced step of every golden pipeline (last position, both streams). Unlike the
/// token and motion criteria, which hinge on the tiny random model's near-ties, this moves
/// smoothly with the precision of the arithmetic, so it catches a loss of precision (say, a
/// stage that silently runs in half precision instead of f32) before it flips tokens. This
/// release measures mean 1.91e-3 / max 1.55e-2 (f16) and 1.64e-2 / 0.135 (bf16), on logits of
/// magnitude ~1; the mean bounds are ~15 % above that, which the LPE alone running in the
/// weights' dtype on the CPU exceeds (2.27e-3 and 1.88e-2, measured), the max bounds ~1.5×.
/// The half-precision rounding of the weights (2⁻¹¹ / 2⁻⁸ relative) is the floor of each.
#[test]
fn reduced_precision_logits_stay_close_to_f32() {
    let (_, tf) = shared();
    let mut over = Vec::new();
    for (dtype, tokens_tf) in tf {
        let sum: f64 = tokens_tf.iter().map(|t| t.logit_err_sum).sum();
        let count: usize = tokens_tf.iter().map(|t| t.logit_count).sum();
        let max = tokens_tf.iter().fold(0f32, |m, t| m.max(t.logit_err_max));
        let mean = sum / count as f64;
        println!(
            "{dtype:?}: logits vs the official f32 ones: mean |error| {mean:.3e}, max {max:.3e}"
        );
        let (mean_bound, max_bound) = match dtype {
            DType::F16 => (2.2e-3, 2.5e-2),
            _ => (1.85e-2, 0.2),
        };
        if mean > mean_bound || max > max_bound as f32 {
            over.push(format!(
                "{dtype:?}: mean {mean:.3e} (bound {mean_bound:e}), max {max:.3e} (bound {max_bound:e})"
            ));
        }
    }
    assert!(over.is_empty(), "logit error above its bound: {over:?}");
}

/// The motion of `dtype`'s teacher-forced tokens against the golden motion, per pipeline:
/// prints what differs and returns the pipelines whose mean per-joint position error is above
/// 1 cm.
fn teacher_forced_motion(dtype: DType) -> Vec<String> {
    let vq = vqvae(DType::F32);
    let (pipes, tf) = shared();
    let tokens_tf = &tf.iter().find(|(d, _)| *d == dtype).unwrap().1;
    let mut failures = Vec::new();
    for (p, tf) in pipes.iter().zip(tokens_tf) {
        // The fp32 reference: the golden tokens (the official f32 greedy run, which the f32
        // model reproduces, see the agreement test), decoded; it must be the official motion.
        let want = decode(&vq, &p.up, &p.down);
        let official = load_st(&p.name)["pose_absolute"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(want.positions.len(), official.len(), "{}", p.name);
        let err = want
            .positions
            .iter()
            .zip(&official)
            .fold(0f32, |w, (x, y)| w.max((x - y).abs()));
        assert!(err < 1e-4, "{}: golden tokens decode {err} m off", p.name);

        let got = decode(&vq, &tf.up, &tf.down);
        let diff_up = tf.up.iter().zip(&p.up).filter(|(a, b)| a != b).count();
        let diff_down = tf.down.iter().zip(&p.down).filter(|(a, b)| a != b).count();
        let e = joint_error(&got, &want);
        // without the root trajectory: what the pose itself does
        let rel = joint_error(
            &Motion::new(got.root_relative(), FPS).unwrap(),
            &Motion::new(want.root_relative(), FPS).unwrap(),
        );
        println!(
            "{dtype:?} {}: {diff_up} up + {diff_down} down of {} tokens differ; per-joint \
             position error mean {:.3} cm, max {:.3} cm, non-zero on {} of {} frames{} \
             (root-relative: mean {:.3} cm, max {:.3} cm)",
            p.name.trim_end_matches(".pipeline.safetensors"),
            2 * p.up.len(),
            100.0 * e.mean,
            100.0 * e.max,
            e.frames_nonzero,
            e.frames,
            e.first_frame
                .map(|f| format!(" from frame {f}"))
                .unwrap_or_default(),
            100.0 * rel.mean,
            100.0 * rel.max,
        );
        if e.mean > 0.01 {
            failures.push(format!("{}: mean {:.2} cm", p.name, 100.0 * e.mean));
        }
    }
    failures
}

#[test]
fn f16_teacher_forced_motion_within_1cm_of_f32() {
    let failures = teacher_forced_motion(DType::F16);
    assert!(
        failures.is_empty(),
        "F16: mean per-joint position error above 1 cm: {failures:?}"
    );
}

#[test]
#[ignore = "fails (mean 10.19 cm on electronic, 8.10 cm on mono22k, 3.99 cm on rock): bf16 \
            flips lower-half tokens at near-ties, and root integration keeps the offset for the \
            rest of the song"]
fn bf16_teacher_forced_motion_within_1cm_of_f32() {
    let failures = teacher_forced_motion(DType::BF16);
    assert!(
        failures.is_empty(),
        "BF16: mean per-joint position error above 1 cm: {failures:?}"
    );
}
