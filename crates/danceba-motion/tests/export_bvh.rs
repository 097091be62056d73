//! BVH export: forward kinematics of the written file reproduces the motion.

mod bvh_common;
mod motion_common;

use danceba_motion::export::{bvh, ExportError};
use danceba_motion::skeleton::{JOINT_NAMES, NUM_JOINTS, PARENTS};
use danceba_motion::Motion;
use motion_common::*;

/// Max FK error (metres) over all frames and joints.
fn fk_error(m: &Motion, text: &str) -> f64 {
    let b = bvh_common::parse(text);
    assert_eq!(b.joints.len(), NUM_JOINTS);
    assert_eq!(b.frames.len(), m.frames());
    assert!((b.frame_time - 1.0 / m.fps as f64).abs() < 1e-9);
    let idx: Vec<usize> = b
        .joints
        .iter()
        .map(|j| JOINT_NAMES.iter().position(|n| *n == j.name).unwrap())
        .collect();
    // The hierarchy is SMPL's.
    for (k, j) in b.joints.iter().enumerate() {
        assert_eq!(j.parent.map(|p| idx[p]), PARENTS[idx[k]], "{}", j.name);
    }
    let mut worst = 0.0f64;
    for f in 0..m.frames() {
        let p = bvh_common::fk(&b, f);
        for (k, q) in p.iter().enumerate() {
            let want = m.joint(f, idx[k]);
            for c in 0..3 {
                worst = worst.max((q[c] - want[c] as f64).abs());
            }
        }
    }
    worst
}

#[test]
fn bvh_fk_reproduces_a_rigid_dance_within_a_millimetre() {
    let m = rigid_dance(600);
    let text = bvh::bvh_string(&m);
    let err = fk_error(&m, &text);
    eprintln!("rigid dance: max FK error {:.3e} m", err);
    assert!(err < 1e-3, "{err}");
    // With constant bone lengths it is in fact exact up to the printed precision.
    assert!(err < 2e-5, "{err}");
}

#[test]
fn bvh_of_decoded_golden_motion() {
    // The golden motions come from a random-weight model, so their bone lengths vary from frame to
    // frame; the BVH's fixed bones reproduce them up to that variation. Check the root and the
    // joints whose positions follow from a single bone exactly where the lengths happen to be
    // constant, and report the overall error.
    for path in pipeline_files() {
        let (_, decoded) = golden_f32(&path, "pose_decoded");
        let m = Motion::from_decoded(&decoded, 60.0).unwrap();
        let text = bvh::bvh_string(&m);
        let b = bvh_common::parse(&text);
        assert_eq!(b.frames.len(), m.frames());
        let err = fk_error(&m, &text);
        eprintln!(
            "{}: max FK error {:.3e} m (non-rigid input)",
            path.display(),
            err
        );
        // The root is written exactly.
        for f in 0..m.frames() {
            let p = bvh_common::fk(&b, f);
            let r = m.joint(f, 0);
            for c in 0..3 {
                assert!((p[0][c] - r[c] as f64).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn bvh_handles_degenerate_poses() {
    // All joints at one point, and a bone pointing exactly against its rest direction.
    let mut pos = vec![0.0f32; 72 * 3];
    let rigid = rigid_dance(2);
    pos[72..].copy_from_slice(&rigid.positions);
    let m = Motion::new(pos, 60.0).unwrap();
    let text = bvh::bvh_string(&m);
    assert!(!text.contains("NaN") && !text.contains("inf"));
    let m2 = rigid_dance(3);
    let mut flipped = m2.positions.clone();
    // Frame 2: mirror the left forearm through the elbow (exactly opposite direction).
    for c in 0..3 {
        let e = flipped[2 * 72 + 18 * 3 + c];
        let w = flipped[2 * 72 + 20 * 3 + c];
        flipped[2 * 72 + 20 * 3 + c] = 2.0 * e - w;
        let h = flipped[2 * 72 + 22 * 3 + c];
        flipped[2 * 72 + 22 * 3 + c] = 2.0 * e - (h - w + w);
    }
    let m3 = Motion::new(flipped, 60.0).unwrap();
    let text = bvh::bvh_string(&m3);
    assert!(!text.contains("NaN"));
    let b = bvh_common::parse(&text);
    let p = bvh_common::fk(&b, 2);
    let k = b
        .joints
        .iter()
        .position(|j| j.name == "left_wrist")
        .unwrap();
    let want = m3.joint(2, 20);
    for c in 0..3 {
        assert!(
            (p[k][c] - want[c] as f64).abs() < 1e-4,
            "{:?} {:?}",
            p[k],
            want
        );
    }
}

#[test]
fn bvh_write_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let m = rigid_dance(10);
    let p = dir.path().join("d.bvh");
    bvh::write_bvh(&m, &p, false).unwrap();
    assert!(matches!(
        bvh::write_bvh(&m, &p, false),
        Err(ExportError::Exists { .. })
    ));
    let bad = dir.path().join("missing/d.bvh");
    assert!(matches!(
        bvh::write_bvh(&m, &bad, false),
        Err(ExportError::Write { .. })
    ));
    assert!(!bad.exists());
}
