//! Root integration and absolute positions against the golden outputs of the official code.

mod motion_common;

use danceba_motion::motion::{absolute_from_root_relative, root_integrated};
use danceba_motion::{Motion, MotionError};
use motion_common::*;

#[test]
fn root_integration_and_absolute_match_golden() {
    for path in pipeline_files() {
        let (shape, decoded) = golden_f32(&path, "pose_decoded");
        let (_, want_int) = golden_f32(&path, "pose_root_integrated");
        let (_, want_abs) = golden_f32(&path, "pose_absolute");
        assert_eq!(shape[2], 72);
        let integrated = root_integrated(&decoded).unwrap();
        let e1 = max_abs_diff(&integrated, &want_int);
        let abs = absolute_from_root_relative(&integrated).unwrap();
        let e2 = max_abs_diff(&abs, &want_abs);
        let motion = Motion::from_decoded(&decoded, 60.0).unwrap();
        assert_eq!(motion.positions, abs);
        assert_eq!(motion.frames(), shape[1]);
        eprintln!("{}: integrated {e1:e}, absolute {e2:e}", path.display());
        assert!(e1 < 1e-4 && e2 < 1e-4);
        // The root starts at the origin.
        assert_eq!(&motion.positions[0..3], &[0.0, 0.0, 0.0]);
        // Round trip to root-relative.
        let rel = motion.root_relative();
        assert!(max_abs_diff(&rel, &integrated) < 1e-5);
    }
}

#[test]
fn integration_is_exclusive_and_sequential() {
    let mut decoded = vec![0f32; 3 * 72];
    decoded[0..3].copy_from_slice(&[1.0, 2.0, 3.0]);
    decoded[72..75].copy_from_slice(&[0.5, 0.5, 0.5]);
    decoded[144..147].copy_from_slice(&[100.0, 100.0, 100.0]); // last velocity unused
    decoded[147] = 7.0; // joint 1 relative x of frame 2
    let r = root_integrated(&decoded).unwrap();
    assert_eq!(&r[0..3], &[0.0, 0.0, 0.0]);
    assert_eq!(&r[72..75], &[1.0, 2.0, 3.0]);
    assert_eq!(&r[144..147], &[1.5, 2.5, 3.5]);
    let a = absolute_from_root_relative(&r).unwrap();
    assert_eq!(a[147], 8.5);
    assert_eq!(a[144], 1.5);
}

#[test]
fn bad_decoded_input_is_an_error() {
    assert!(matches!(
        root_integrated(&[0.0; 71]),
        Err(MotionError::BadLength { len: 71 })
    ));
    assert!(matches!(root_integrated(&[]), Err(MotionError::Empty)));
    let mut v = vec![0.0; 144];
    v[80] = f32::NAN;
    assert!(matches!(
        Motion::from_decoded(&v, 60.0),
        Err(MotionError::NotFinite {
            frame: 1,
            joint: 2,
            ..
        })
    ));
    assert!(matches!(
        Motion::from_decoded(&[0.0; 72], 0.0),
        Err(MotionError::BadFps(_))
    ));
}
