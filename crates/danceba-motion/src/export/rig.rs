//! The rigged skeleton the BVH and glTF exporters share: rest offsets taken from the motion
//! itself and per-frame joint rotations solved from the joint positions.
//!
//! **Rest pose.** Each bone (joint → parent) gets the *mean length* of that bone over all frames,
//! pointing in the bone's direction in the *first frame* where it has a non-zero length. The rest
//! pose is therefore the first frame's pose with averaged bone lengths, expressed with the root at
//! the origin. The root's rest offset is zero; its translation is animated.
//!
//! **Rotations.** Joints are solved from the root outwards, each in its parent's solved frame:
//! * a joint with one child gets the *shortest-arc* rotation taking the rest bone direction to the
//!   current one. This is the twist rule: no twist about the bone relative to the parent, so the
//!   result is stable from frame to frame; a bone that points exactly against its rest direction
//!   turns about the axis `rest × e`, `e` the coordinate axis least aligned with the rest direction;
//! * a joint with several children (pelvis, spine3) gets the rotation that best aligns all its
//!   rest child offsets with the current ones in the least-squares sense (Horn's method);
//! * a joint without children (feet, head, hands) keeps its parent's orientation.
//!
//! For a motion whose bone lengths are constant this reproduces every joint position exactly
//! (up to rounding); DanceBa's decoded positions have slightly varying bone lengths, and the
//! difference to the mean length is the only error.

use super::rotation::{apply, best_fit_rotation, mul, norm, scale, shortest_arc, sub, transpose};
use super::rotation::{IDENTITY, M3, V3};
use crate::skeleton::{NUM_JOINTS, PARENTS};
use crate::Motion;

/// Rest offsets and child lists of the skeleton of one motion.
#[derive(Clone, Debug)]
pub struct Rig {
    /// Offset of each joint from its parent in the rest pose (metres); zero for the root.
    pub offsets: [V3; NUM_JOINTS],
    /// Children of each joint, in joint-index order.
    pub children: Vec<Vec<usize>>,
}

/// One frame of the rig: the root translation and each joint's rotation relative to its parent.
#[derive(Clone, Debug)]
pub struct RigFrame {
    pub root: V3,
    pub local: [M3; NUM_JOINTS],
}

fn pos(motion: &Motion, f: usize, j: usize) -> V3 {
    let p = motion.joint(f, j);
    [p[0] as f64, p[1] as f64, p[2] as f64]
}

impl Rig {
    /// Rest offsets from `motion` (see the module documentation).
    pub fn from_motion(motion: &Motion) -> Self {
        let frames = motion.frames();
        let mut offsets = [[0.0; 3]; NUM_JOINTS];
        let mut children = vec![Vec::new(); NUM_JOINTS];
        for (j, parent) in PARENTS.iter().enumerate() {
            let Some(p) = *parent else { continue };
            children[p].push(j);
            let mut sum = 0.0;
            let mut dir = None;
            for f in 0..frames {
                let d = sub(pos(motion, f, j), pos(motion, f, p));
                let n = norm(d);
                sum += n;
                if dir.is_none() && n > 1e-9 {
                    dir = Some(scale(d, 1.0 / n));
                }
            }
            let mean = sum / frames.max(1) as f64;
            offsets[j] = scale(dir.unwrap_or([0.0, 1.0, 0.0]), mean);
        }
        Self { offsets, children }
    }

    /// Rest positions of the joints (root at the origin).
    pub fn rest_positions(&self) -> [V3; NUM_JOINTS] {
        let mut out = [[0.0; 3]; NUM_JOINTS];
        for (j, parent) in PARENTS.iter().enumerate() {
            if let Some(p) = *parent {
                out[j] = super::rotation::add(out[p], self.offsets[j]);
            }
        }
        out
    }

    /// Solves frame `f` of `motion`.
    pub fn solve(&self, motion: &Motion, f: usize) -> RigFrame {
        let mut global = [IDENTITY; NUM_JOINTS];
        let mut local = [IDENTITY; NUM_JOINTS];
        for j in 0..NUM_JOINTS {
            let parent_g = PARENTS[j].map(|p| global[p]).unwrap_or(IDENTITY);
            let kids = &self.children[j];
            let l = if kids.is_empty() {
                IDENTITY
            } else {
                let to_parent = transpose(&parent_g);
                let here = pos(motion, f, j);
                let pairs: Vec<(V3, V3)> = kids
                    .iter()
                    .map(|&c| {
                        let cur = apply(&to_parent, sub(pos(motion, f, c), here));
                        (self.offsets[c], cur)
                    })
                    .collect();
                if pairs.len() == 1 {
                    shortest_arc(pairs[0].0, pairs[0].1)
                } else {
                    best_fit_rotation(&pairs)
                }
            };
            local[j] = l;
            global[j] = mul(&parent_g, &l);
        }
        RigFrame {
            root: pos(motion, f, 0),
            local,
        }
    }

    /// Forward kinematics of a solved frame: the joint positions it produces.
    pub fn forward(&self, frame: &RigFrame) -> [V3; NUM_JOINTS] {
        let mut global = [IDENTITY; NUM_JOINTS];
        let mut out = [[0.0; 3]; NUM_JOINTS];
        for j in 0..NUM_JOINTS {
            match PARENTS[j] {
                None => {
                    global[j] = frame.local[j];
                    out[j] = frame.root;
                }
                Some(p) => {
                    global[j] = mul(&global[p], &frame.local[j]);
                    out[j] = super::rotation::add(out[p], apply(&global[p], self.offsets[j]));
                }
            }
        }
        out
    }
}
