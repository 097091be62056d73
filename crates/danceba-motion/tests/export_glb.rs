//! glTF export: structure, animation forward kinematics, and the Khronos validator.

mod motion_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use danceba_motion::export::{glb, ExportError};
use danceba_motion::skeleton::{JOINT_NAMES, NUM_JOINTS, PARENTS};
use danceba_motion::Motion;
use motion_common::*;
use serde_json::Value;

struct Glb {
    json: Value,
    bin: Vec<u8>,
}

fn parse(bytes: &[u8]) -> Glb {
    assert_eq!(&bytes[0..4], b"glTF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 2);
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
        bytes.len()
    );
    let jlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    assert_eq!(&bytes[16..20], b"JSON");
    let json: Value = serde_json::from_slice(&bytes[20..20 + jlen]).unwrap();
    let o = 20 + jlen;
    let blen = u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    assert_eq!(&bytes[o + 4..o + 8], b"BIN\0");
    let bin = bytes[o + 8..o + 8 + blen].to_vec();
    assert_eq!(o + 8 + blen, bytes.len());
    Glb { json, bin }
}

impl Glb {
    fn floats(&self, accessor: usize) -> Vec<f32> {
        let a = &self.json["accessors"][accessor];
        assert_eq!(a["componentType"], 5126);
        let v = &self.json["bufferViews"][a["bufferView"].as_u64().unwrap() as usize];
        let off = v["byteOffset"].as_u64().unwrap() as usize;
        let len = v["byteLength"].as_u64().unwrap() as usize;
        self.bin[off..off + len]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn quat_apply(q: [f64; 4], v: [f64; 3]) -> [f64; 3] {
    // q = [x, y, z, w]
    let (x, y, z, w) = (q[0], q[1], q[2], q[3]);
    let m = [
        [
            1.0 - 2.0 * (y * y + z * z),
            2.0 * (x * y - w * z),
            2.0 * (x * z + w * y),
        ],
        [
            2.0 * (x * y + w * z),
            1.0 - 2.0 * (x * x + z * z),
            2.0 * (y * z - w * x),
        ],
        [
            2.0 * (x * z - w * y),
            2.0 * (y * z + w * x),
            1.0 - 2.0 * (x * x + y * y),
        ],
    ];
    [
        m[0][0] * v[0] + m[0][1] * v[1] + m[0][2] * v[2],
        m[1][0] * v[0] + m[1][1] * v[1] + m[1][2] * v[2],
        m[2][0] * v[0] + m[2][1] * v[1] + m[2][2] * v[2],
    ]
}

fn quat_mul(a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
    let (ax, ay, az, aw) = (a[0], a[1], a[2], a[3]);
    let (bx, by, bz, bw) = (b[0], b[1], b[2], b[3]);
    [
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
        aw * bw - ax * bx - ay * by - az * bz,
    ]
}

/// Joint positions of the animated node hierarchy at key `f`.
fn animated_positions(g: &Glb, f: usize) -> Vec<[f64; 3]> {
    let nodes = g.json["nodes"].as_array().unwrap();
    let mut trans: Vec<[f64; 3]> = nodes
        .iter()
        .map(|n| {
            let t = &n["translation"];
            if t.is_null() {
                [0.0; 3]
            } else {
                [0, 1, 2].map(|k| t[k].as_f64().unwrap())
            }
        })
        .collect();
    let mut rot = vec![[0.0, 0.0, 0.0, 1.0]; nodes.len()];
    let anim = &g.json["animations"][0];
    for ch in anim["channels"].as_array().unwrap() {
        let s = &anim["samplers"][ch["sampler"].as_u64().unwrap() as usize];
        let out = g.floats(s["output"].as_u64().unwrap() as usize);
        let node = ch["target"]["node"].as_u64().unwrap() as usize;
        match ch["target"]["path"].as_str().unwrap() {
            "translation" => trans[node] = [0, 1, 2].map(|k| out[3 * f + k] as f64),
            "rotation" => rot[node] = [0, 1, 2, 3].map(|k| out[4 * f + k] as f64),
            p => panic!("{p}"),
        }
    }
    let mut pos = vec![[0.0; 3]; NUM_JOINTS];
    let mut grot = vec![[0.0, 0.0, 0.0, 1.0]; NUM_JOINTS];
    for j in 0..NUM_JOINTS {
        match PARENTS[j] {
            None => {
                pos[j] = trans[j];
                grot[j] = rot[j];
            }
            Some(p) => {
                let d = quat_apply(grot[p], trans[j]);
                pos[j] = [pos[p][0] + d[0], pos[p][1] + d[1], pos[p][2] + d[2]];
                grot[j] = quat_mul(grot[p], rot[j]);
            }
        }
    }
    pos
}

#[test]
fn glb_structure_and_animation_reproduce_the_motion() {
    let m = rigid_dance(300);
    let g = parse(&glb::glb_bytes(&m).unwrap());
    let j = &g.json;
    assert_eq!(j["asset"]["version"], "2.0");
    assert_eq!(
        j["skins"][0]["joints"].as_array().unwrap().len(),
        NUM_JOINTS
    );
    for (k, name) in JOINT_NAMES.iter().enumerate() {
        assert_eq!(j["nodes"][k]["name"], *name);
        // The node hierarchy is SMPL's.
        if let Some(p) = PARENTS[k] {
            assert!(j["nodes"][p]["children"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c.as_u64() == Some(k as u64)));
        }
    }
    let anim = &j["animations"][0];
    let times = g.floats(anim["samplers"][0]["input"].as_u64().unwrap() as usize);
    assert_eq!(times.len(), m.frames());
    assert!((times[60] - 1.0).abs() < 1e-6);
    let mut worst = 0.0f64;
    for f in 0..m.frames() {
        let p = animated_positions(&g, f);
        for (k, q) in p.iter().enumerate() {
            let want = m.joint(f, k);
            for c in 0..3 {
                worst = worst.max((q[c] - want[c] as f64).abs());
            }
        }
    }
    eprintln!("glb animation FK max error {worst:.3e} m");
    assert!(worst < 1e-3, "{worst}");
    // Rotations are unit quaternions.
    for ch in anim["samplers"].as_array().unwrap() {
        let out = g.floats(ch["output"].as_u64().unwrap() as usize);
        let a = &j["accessors"][ch["output"].as_u64().unwrap() as usize];
        if a["type"] == "VEC4" {
            for q in out.chunks_exact(4) {
                let n: f32 = q.iter().map(|v| v * v).sum();
                assert!((n - 1.0).abs() < 1e-5);
            }
        }
    }
}

fn node_cache(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

fn have_node() -> bool {
    let have = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    have("node") && have("npm")
}

/// `npm install` of `package` into a cache directory under target/ (once); returns the directory.
fn npm_package(cache: &str, package: &str, check: &str) -> PathBuf {
    let dir = node_cache(cache);
    if !dir
        .join("node_modules")
        .join(check)
        .join("package.json")
        .exists()
    {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(package)
            .output()
            .expect("run npm");
        assert!(
            out.status.success(),
            "npm install {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Installs the npm package `gltf-validator` into a cache under target/ (once) and returns the
/// report of `file`, or `None` (with a message) where Node.js/npm are absent.
fn validate(file: &Path) -> Option<Value> {
    if !have_node() {
        eprintln!("SKIPPED: node/npm not found; the Khronos glTF validator was not run");
        return None;
    }
    let dir = npm_package(
        "gltf-validator",
        "gltf-validator@2.0.0-dev.3.10",
        "gltf-validator",
    );
    let script = r#"
const fs = require('fs');
const v = require(process.argv[1]);
v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])), {maxIssues: 1000})
  .then(r => { console.log(JSON.stringify(r)); })
  .catch(e => { console.error(e); process.exit(2); });
"#;
    let out = Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(dir.join("node_modules/gltf-validator"))
        .arg(file)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "validator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("validator JSON"))
}

#[test]
fn glb_passes_the_khronos_validator() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![("rigid", rigid_dance(240))];
    let (_, decoded) = golden_f32(&pipeline_files()[0], "pose_decoded");
    files.push(("golden", Motion::from_decoded(&decoded, 60.0).unwrap()));
    for (name, m) in files {
        let p = dir.path().join(format!("{name}.glb"));
        glb::write_glb(&m, &p, false).unwrap();
        let Some(report) = validate(&p) else { return };
        let issues = &report["issues"];
        eprintln!(
            "{name}: errors {} warnings {} infos {} hints {}",
            issues["numErrors"], issues["numWarnings"], issues["numInfos"], issues["numHints"]
        );
        for m in issues["messages"].as_array().unwrap() {
            eprintln!("  {}", m);
        }
        assert_eq!(issues["numErrors"], 0, "{name}: {}", issues["messages"]);
        assert_eq!(issues["numWarnings"], 0, "{name}: {}", issues["messages"]);
    }
}

#[test]
fn glb_loads_and_plays_in_three_js() {
    if !have_node() {
        eprintln!("SKIPPED: node/npm not found; three.js was not run");
        return;
    }
    let dir = npm_package("threejs", "three@0.187.0", "three");
    let tmp = tempfile::tempdir().unwrap();
    let m = rigid_dance(120);
    let file = tmp.path().join("d.glb");
    glb::write_glb(&m, &file, false).unwrap();
    // An ES module next to node_modules so that `import 'three'` resolves.
    let script = dir.join("danceba_load_glb.mjs");
    std::fs::write(
        &script,
        r#"
import fs from 'fs';
import * as THREE from 'three';
import { GLTFLoader } from 'three/examples/jsm/loaders/GLTFLoader.js';
const buf = fs.readFileSync(process.argv[2]);
const ab = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
new GLTFLoader().parse(ab, '', (gltf) => {
  let skinned = 0, bones = 0;
  gltf.scene.traverse(o => { if (o.isSkinnedMesh) skinned++; if (o.isBone) bones++; });
  const clip = gltf.animations[0];
  const mixer = new THREE.AnimationMixer(gltf.scene);
  mixer.clipAction(clip).play();
  mixer.setTime(1.0);
  gltf.scene.updateMatrixWorld(true);
  const pos = {};
  for (const name of ['pelvis', 'head', 'left_wrist', 'right_foot']) {
    const p = new THREE.Vector3();
    gltf.scene.getObjectByName(name).getWorldPosition(p);
    pos[name] = [p.x, p.y, p.z];
  }
  console.log(JSON.stringify({skinned, bones, duration: clip.duration, pos}));
}, (e) => { console.error(e); process.exit(1); });
"#,
    )
    .unwrap();
    let out = Command::new("node")
        .arg(&script)
        .arg(&file)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "three.js could not load the glb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["skinned"], 1);
    assert_eq!(r["bones"], NUM_JOINTS);
    assert!((r["duration"].as_f64().unwrap() - 119.0 / 60.0).abs() < 1e-5);
    // At t = 1 s (frame 60) the animated bones sit on the motion's joints.
    for (name, j) in [
        ("pelvis", 0),
        ("head", 15),
        ("left_wrist", 20),
        ("right_foot", 11),
    ] {
        let want = m.joint(60, j);
        for c in 0..3 {
            let got = r["pos"][name][c].as_f64().unwrap();
            assert!(
                (got - want[c] as f64).abs() < 1e-4,
                "{name}: {got} vs {want:?}"
            );
        }
    }
}

#[test]
fn glb_write_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let m = rigid_dance(5);
    let p = dir.path().join("d.glb");
    glb::write_glb(&m, &p, false).unwrap();
    assert!(matches!(
        glb::write_glb(&m, &p, false),
        Err(ExportError::Exists { .. })
    ));
    glb::write_glb(&m, &p, true).unwrap();
    let bad = dir.path().join("nope/d.glb");
    assert!(matches!(
        glb::write_glb(&m, &bad, false),
        Err(ExportError::Write { .. })
    ));
    // A motion whose joints all coincide still gives a valid file.
    let still = Motion::new(vec![0.0; 72 * 2], 60.0).unwrap();
    parse(&glb::glb_bytes(&still).unwrap());
}
