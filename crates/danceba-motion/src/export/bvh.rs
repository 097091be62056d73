//! `.bvh` writer: the SMPL hierarchy with rest offsets from the motion, root translation and
//! per-joint rotations solved from the joint positions (see [`super::rig`] for the rest pose and
//! the twist rule).
//!
//! Units are metres, y up, as in the motion. Every joint has the channels
//! `Zrotation Xrotation Yrotation` (the rotation is `Rz·Rx·Ry`, angles in degrees, unwrapped from
//! frame to frame so that they change continuously); the root also has
//! `Xposition Yposition Zposition` (absolute, with a zero root offset). Leaf joints end in an
//! `End Site` half a bone further along their bone. The frame time is `1 / fps`.

use std::fmt::Write as _;
use std::path::Path;

use super::rig::Rig;
use super::rotation::matrix_to_euler_zxy;
use super::{write_atomic, ExportError};
use crate::skeleton::{JOINT_NAMES, NUM_JOINTS};
use crate::Motion;

/// The joints in BVH (depth-first) order.
pub fn bvh_joint_order(rig: &Rig) -> Vec<usize> {
    fn visit(rig: &Rig, j: usize, out: &mut Vec<usize>) {
        out.push(j);
        for &c in &rig.children[j] {
            visit(rig, c, out);
        }
    }
    let mut out = Vec::with_capacity(NUM_JOINTS);
    visit(rig, 0, &mut out);
    out
}

/// The BVH text of `motion`.
pub fn bvh_string(motion: &Motion) -> String {
    let rig = Rig::from_motion(motion);
    let mut s = String::new();
    s.push_str("HIERARCHY\n");
    write_joint(&rig, 0, 0, &mut s);
    let order = bvh_joint_order(&rig);
    let frames = motion.frames();
    let _ = writeln!(
        s,
        "MOTION\nFrames: {frames}\nFrame Time: {:.9}",
        1.0 / motion.fps as f64
    );
    let mut prev: Vec<[f64; 3]> = vec![[0.0; 3]; NUM_JOINTS];
    for f in 0..frames {
        let fr = rig.solve(motion, f);
        let mut line = String::new();
        let _ = write!(
            line,
            "{:.6} {:.6} {:.6}",
            fr.root[0], fr.root[1], fr.root[2]
        );
        for &j in &order {
            let e = matrix_to_euler_zxy(&fr.local[j]);
            let mut deg = [e[0].to_degrees(), e[1].to_degrees(), e[2].to_degrees()];
            if f > 0 {
                // Unwrap z and y (x is in [-90, 90]) to the nearest turn of the previous frame.
                for k in [0, 2] {
                    deg[k] += 360.0 * ((prev[j][k] - deg[k]) / 360.0).round();
                }
            }
            prev[j] = deg;
            let _ = write!(line, " {:.6} {:.6} {:.6}", deg[0], deg[1], deg[2]);
        }
        s.push_str(&line);
        s.push('\n');
    }
    s
}

fn write_joint(rig: &Rig, j: usize, depth: usize, s: &mut String) {
    let ind = "  ".repeat(depth);
    let o = rig.offsets[j];
    if depth == 0 {
        let _ = writeln!(s, "ROOT {}", JOINT_NAMES[j]);
    } else {
        let _ = writeln!(s, "{ind}JOINT {}", JOINT_NAMES[j]);
    }
    let _ = writeln!(s, "{ind}{{");
    let _ = writeln!(s, "{ind}  OFFSET {:.6} {:.6} {:.6}", o[0], o[1], o[2]);
    if depth == 0 {
        let _ = writeln!(
            s,
            "{ind}  CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation"
        );
    } else {
        let _ = writeln!(s, "{ind}  CHANNELS 3 Zrotation Xrotation Yrotation");
    }
    if rig.children[j].is_empty() {
        let e = [o[0] * 0.5, o[1] * 0.5, o[2] * 0.5];
        let _ = writeln!(s, "{ind}  End Site\n{ind}  {{");
        let _ = writeln!(s, "{ind}    OFFSET {:.6} {:.6} {:.6}", e[0], e[1], e[2]);
        let _ = writeln!(s, "{ind}  }}");
    }
    for &c in &rig.children[j] {
        write_joint(rig, c, depth + 1, s);
    }
    let _ = writeln!(s, "{ind}}}");
}

/// Writes the `.bvh` of `motion`.
pub fn write_bvh(motion: &Motion, path: &Path, force: bool) -> Result<(), ExportError> {
    write_atomic(path, bvh_string(motion).as_bytes(), force)
}
