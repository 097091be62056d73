//! `.glb` writer: a glTF 2.0 binary with a skinned SMPL skeleton and its animation.
//!
//! * One node per joint, named after the SMPL joint, nested as the SMPL hierarchy; each node's
//!   rest translation is the rig's rest offset (see [`super::rig`]: first-frame bone directions,
//!   mean bone lengths), its rest rotation the identity.
//! * A skin over the 24 joint nodes with inverse bind matrices of the rest pose, and a mesh of
//!   one tapered box per bone plus a small cube per joint, each vertex rigidly bound to one joint,
//!   so that any viewer (three.js, Blender, Unity, model-viewer) shows the dancing skeleton.
//! * One animation, `dance`: the root node's translation and every joint-with-children's rotation
//!   (unit quaternions, sign-continuous), one key per frame at `frame / fps` seconds, linear.
//!
//! Units are metres, y up, as glTF expects.

use std::path::Path;

use serde_json::json;

use super::rig::Rig;
use super::rotation::{matrix_to_quat, norm, scale, sub, V3};
use super::{write_atomic, ExportError};
use crate::skeleton::{JOINT_NAMES, NUM_JOINTS, PARENTS};
use crate::Motion;

const FLOAT: u32 = 5126;
const UNSIGNED_BYTE: u32 = 5121;
const UNSIGNED_INT: u32 = 5125;
const ARRAY_BUFFER: u32 = 34962;
const ELEMENT_ARRAY_BUFFER: u32 = 34963;

/// The binary buffer with its views and accessors under construction.
#[derive(Default)]
struct Builder {
    bin: Vec<u8>,
    views: Vec<serde_json::Value>,
    accessors: Vec<serde_json::Value>,
}

impl Builder {
    fn view(&mut self, bytes: &[u8], target: Option<u32>) -> usize {
        while !self.bin.len().is_multiple_of(4) {
            self.bin.push(0);
        }
        let mut v = json!({"buffer": 0, "byteOffset": self.bin.len(), "byteLength": bytes.len()});
        if let Some(t) = target {
            v["target"] = json!(t);
        }
        self.bin.extend_from_slice(bytes);
        self.views.push(v);
        self.views.len() - 1
    }

    fn floats(&mut self, data: &[f32], ty: &str, target: Option<u32>, min_max: bool) -> usize {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = self.view(&bytes, target);
        let n = match ty {
            "SCALAR" => 1,
            "VEC3" => 3,
            "VEC4" => 4,
            "MAT4" => 16,
            _ => 1,
        };
        let mut a = json!({
            "bufferView": view, "componentType": FLOAT, "count": data.len() / n, "type": ty
        });
        if min_max {
            let mut lo = vec![f32::INFINITY; n];
            let mut hi = vec![f32::NEG_INFINITY; n];
            for c in data.chunks_exact(n) {
                for k in 0..n {
                    lo[k] = lo[k].min(c[k]);
                    hi[k] = hi[k].max(c[k]);
                }
            }
            a["min"] = json!(lo);
            a["max"] = json!(hi);
        }
        self.accessors.push(a);
        self.accessors.len() - 1
    }

    fn bytes_vec4(&mut self, data: &[u8]) -> usize {
        let view = self.view(data, Some(ARRAY_BUFFER));
        self.accessors.push(json!({
            "bufferView": view, "componentType": UNSIGNED_BYTE, "count": data.len() / 4,
            "type": "VEC4"
        }));
        self.accessors.len() - 1
    }

    fn indices(&mut self, data: &[u32]) -> usize {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = self.view(&bytes, Some(ELEMENT_ARRAY_BUFFER));
        self.accessors.push(json!({
            "bufferView": view, "componentType": UNSIGNED_INT, "count": data.len(),
            "type": "SCALAR"
        }));
        self.accessors.len() - 1
    }
}

/// Flat-shaded triangle mesh bound to joints.
#[derive(Default)]
struct Mesh {
    pos: Vec<f32>,
    normal: Vec<f32>,
    joints: Vec<u8>,
    weights: Vec<f32>,
    index: Vec<u32>,
}

impl Mesh {
    /// A convex hexahedron given by its 8 corners (bottom face 0..4, top face 4..8, both
    /// counter-clockwise seen from below→above along the axis), bound to `joint`.
    fn hexahedron(&mut self, c: [V3; 8], joint: usize) {
        let faces: [[usize; 4]; 6] = [
            [0, 3, 2, 1], // bottom
            [4, 5, 6, 7], // top
            [0, 1, 5, 4],
            [1, 2, 6, 5],
            [2, 3, 7, 6],
            [3, 0, 4, 7],
        ];
        let centre = scale(
            c.iter().fold([0.0; 3], |a, v| super::rotation::add(a, *v)),
            0.125,
        );
        for f in faces {
            let (a, b, d) = (c[f[0]], c[f[1]], c[f[3]]);
            let mut n = super::rotation::cross(sub(b, a), sub(d, a));
            // Make the normal point away from the centre (robust to the corner order).
            let face_mid = scale(
                f.iter()
                    .fold([0.0; 3], |s, &i| super::rotation::add(s, c[i])),
                0.25,
            );
            let outward = super::rotation::dot(n, sub(face_mid, centre)) >= 0.0;
            if !outward {
                n = scale(n, -1.0);
            }
            let len = norm(n);
            let n = if len > 1e-12 {
                scale(n, 1.0 / len)
            } else {
                [0.0, 1.0, 0.0]
            };
            let base = (self.pos.len() / 3) as u32;
            for &i in &f {
                self.pos.extend(c[i].iter().map(|&v| v as f32));
                self.normal.extend(n.iter().map(|&v| v as f32));
                self.joints.extend_from_slice(&[joint as u8, 0, 0, 0]);
                self.weights.extend_from_slice(&[1.0, 0.0, 0.0, 0.0]);
            }
            let tri = if outward {
                [0, 1, 2, 0, 2, 3]
            } else {
                [0, 2, 1, 0, 3, 2]
            };
            self.index.extend(tri.iter().map(|&k| base + k));
        }
    }

    /// A box around the segment `a → b` of half-width `r`, tapering to `r_end` at `b`.
    fn bone(&mut self, a: V3, b: V3, r: f64, r_end: f64, joint: usize) {
        let axis = sub(b, a);
        let len = norm(axis);
        if len < 1e-6 {
            return;
        }
        let z = scale(axis, 1.0 / len);
        let helper = if z[1].abs() < 0.9 {
            [0.0, 1.0, 0.0]
        } else {
            [1.0, 0.0, 0.0]
        };
        let x = super::rotation::cross(helper, z);
        let x = scale(x, 1.0 / norm(x));
        let y = super::rotation::cross(z, x);
        let corner = |p: V3, s: f64, i: usize| -> V3 {
            let (sx, sy) = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)][i];
            super::rotation::add(p, super::rotation::add(scale(x, sx * s), scale(y, sy * s)))
        };
        let c = [
            corner(a, r, 0),
            corner(a, r, 1),
            corner(a, r, 2),
            corner(a, r, 3),
            corner(b, r_end, 0),
            corner(b, r_end, 1),
            corner(b, r_end, 2),
            corner(b, r_end, 3),
        ];
        self.hexahedron(c, joint);
    }

    fn cube(&mut self, p: V3, r: f64, joint: usize) {
        self.bone(
            super::rotation::add(p, [0.0, -r, 0.0]),
            super::rotation::add(p, [0.0, r, 0.0]),
            r,
            r,
            joint,
        );
    }
}

/// The `.glb` bytes of `motion`.
pub fn glb_bytes(motion: &Motion) -> Result<Vec<u8>, ExportError> {
    let rig = Rig::from_motion(motion);
    let rest = rig.rest_positions();
    let frames = motion.frames();
    let mut b = Builder::default();

    // Mesh: a box per bone bound to the parent joint, a cube per joint.
    let mut mesh = Mesh::default();
    for j in 0..NUM_JOINTS {
        if let Some(p) = PARENTS[j] {
            let len = norm(rig.offsets[j]);
            let r = (len * 0.12).clamp(0.008, 0.03);
            mesh.bone(rest[p], rest[j], r, r * 0.6, p);
        }
        mesh.cube(rest[j], 0.018, j);
    }
    let a_pos = b.floats(&mesh.pos, "VEC3", Some(ARRAY_BUFFER), true);
    let a_nrm = b.floats(&mesh.normal, "VEC3", Some(ARRAY_BUFFER), false);
    let a_jnt = b.bytes_vec4(&mesh.joints);
    let a_wgt = b.floats(&mesh.weights, "VEC4", Some(ARRAY_BUFFER), false);
    let a_idx = b.indices(&mesh.index);

    // Inverse bind matrices: the rest pose has identity rotations, so each is a translation by
    // minus the joint's rest position (column-major).
    let mut ibm = Vec::with_capacity(16 * NUM_JOINTS);
    for r in &rest {
        ibm.extend_from_slice(&[
            1.0,
            0.0,
            0.0,
            0.0,
            0.0,
            1.0,
            0.0,
            0.0,
            0.0,
            0.0,
            1.0,
            0.0,
            -r[0] as f32,
            -r[1] as f32,
            -r[2] as f32,
            1.0,
        ]);
    }
    let a_ibm = b.floats(&ibm, "MAT4", None, false);

    // Animation.
    let times: Vec<f32> = (0..frames)
        .map(|f| (f as f64 / motion.fps as f64) as f32)
        .collect();
    let a_time = b.floats(&times, "SCALAR", None, true);
    let mut root_t = Vec::with_capacity(frames * 3);
    let mut rots: Vec<Vec<f32>> = (0..NUM_JOINTS)
        .map(|_| Vec::with_capacity(frames * 4))
        .collect();
    let mut prev = [[1.0f64, 0.0, 0.0, 0.0]; NUM_JOINTS];
    for f in 0..frames {
        let fr = rig.solve(motion, f);
        root_t.extend(fr.root.iter().map(|&v| v as f32));
        for j in 0..NUM_JOINTS {
            let mut q = matrix_to_quat(&fr.local[j]);
            let d = q[0] * prev[j][0] + q[1] * prev[j][1] + q[2] * prev[j][2] + q[3] * prev[j][3];
            if d < 0.0 {
                q = [-q[0], -q[1], -q[2], -q[3]];
            }
            prev[j] = q;
            // glTF order is x, y, z, w.
            rots[j].extend_from_slice(&[q[1] as f32, q[2] as f32, q[3] as f32, q[0] as f32]);
        }
    }
    let mut samplers = Vec::new();
    let mut channels = Vec::new();
    let a_root = b.floats(&root_t, "VEC3", None, false);
    samplers.push(json!({"input": a_time, "output": a_root, "interpolation": "LINEAR"}));
    channels.push(json!({"sampler": 0, "target": {"node": 0, "path": "translation"}}));
    for (j, r) in rots.iter().enumerate() {
        if rig.children[j].is_empty() {
            continue; // leaves keep their parent's orientation: identity throughout
        }
        let a = b.floats(r, "VEC4", None, false);
        samplers.push(json!({"input": a_time, "output": a, "interpolation": "LINEAR"}));
        channels.push(
            json!({"sampler": samplers.len() - 1, "target": {"node": j, "path": "rotation"}}),
        );
    }

    // Nodes 0..24 are the joints (node index = joint index); 24 is the skinned mesh.
    let mut nodes = Vec::with_capacity(NUM_JOINTS + 1);
    for (j, name) in JOINT_NAMES.iter().enumerate() {
        let t = if j == 0 {
            motion.joint(0, 0).map(|v| v as f64)
        } else {
            rig.offsets[j]
        };
        let mut n = json!({
            "name": name,
            "translation": [t[0] as f32, t[1] as f32, t[2] as f32],
        });
        if !rig.children[j].is_empty() {
            n["children"] = json!(rig.children[j]);
        }
        nodes.push(n);
    }
    nodes.push(json!({"name": "skeleton_mesh", "mesh": 0, "skin": 0}));

    let doc = json!({
        "asset": {"version": "2.0", "generator": concat!("danceba ", env!("CARGO_PKG_VERSION"))},
        "scene": 0,
        "scenes": [{"name": "dance", "nodes": [0, NUM_JOINTS]}],
        "nodes": nodes,
        "meshes": [{
            "name": "skeleton",
            "primitives": [{
                "attributes": {
                    "POSITION": a_pos, "NORMAL": a_nrm, "JOINTS_0": a_jnt, "WEIGHTS_0": a_wgt
                },
                "indices": a_idx,
                "material": 0,
                "mode": 4
            }]
        }],
        "materials": [{
            "name": "bone",
            "pbrMetallicRoughness": {
                "baseColorFactor": [0.85, 0.55, 0.25, 1.0],
                "metallicFactor": 0.0,
                "roughnessFactor": 0.7
            }
        }],
        "skins": [{
            "name": "smpl",
            "inverseBindMatrices": a_ibm,
            "joints": (0..NUM_JOINTS).collect::<Vec<_>>(),
            "skeleton": 0
        }],
        "animations": [{"name": "dance", "samplers": samplers, "channels": channels}],
        "buffers": [{"byteLength": b.bin.len()}],
        "bufferViews": b.views,
        "accessors": b.accessors,
    });
    let mut json_bytes =
        serde_json::to_vec(&doc).map_err(|e| ExportError::Meta(format!("glTF JSON: {e}")))?;
    while !json_bytes.len().is_multiple_of(4) {
        json_bytes.push(b' ');
    }
    let mut bin = b.bin;
    while !bin.len().is_multiple_of(4) {
        bin.push(0);
    }
    let total = 12 + 8 + json_bytes.len() + 8 + bin.len();
    let total = u32::try_from(total)
        .map_err(|_| ExportError::Meta("motion too long for a .glb (over 4 GiB)".into()))?;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(b"glTF");
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&(json_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(b"JSON");
    out.extend_from_slice(&json_bytes);
    out.extend_from_slice(&(bin.len() as u32).to_le_bytes());
    out.extend_from_slice(b"BIN\0");
    out.extend_from_slice(&bin);
    Ok(out)
}

/// Writes the `.glb` of `motion`.
pub fn write_glb(motion: &Motion, path: &Path, force: bool) -> Result<(), ExportError> {
    write_atomic(path, &glb_bytes(motion)?, force)
}
