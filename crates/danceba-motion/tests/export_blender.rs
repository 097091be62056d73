//! Imports the exported BVH and GLB into real Blender (run headless) and checks what Blender
//! sees: the frame count and rate, the 24 joints, and joint positions at several frames.
//!
//! Skipped, with a message, where no `blender` executable is found (set `BLENDER` to choose one).

mod motion_common;

use std::process::Command;

use danceba_motion::export::{bvh, glb};
use danceba_motion::skeleton::{JOINT_NAMES, NUM_JOINTS};
use motion_common::*;
use serde_json::Value;

const SCRIPT: &str = r#"
import bpy, sys, json
argv = sys.argv[sys.argv.index("--") + 1:]
path, frames = argv[0], [int(f) for f in argv[1].split(",")]
bpy.ops.wm.read_factory_settings(use_empty=True)
# Debian's Blender 3.4 runs on Python 3.11, where the BVH importer's open(path, 'rU') fails;
# give that module an open() that drops the obsolete 'U' flag (nothing else changes).
import builtins, io_anim_bvh.import_bvh as _ib
_ib.open = lambda f, mode='r', *a, **k: builtins.open(f, mode.replace('U', ''), *a, **k)
bpy.ops.import_anim.bvh(filepath=path, axis_forward='-Z', axis_up='Y', global_scale=1.0,
                        rotate_mode='NATIVE', update_scene_fps=True, update_scene_duration=True)
arms = [o for o in bpy.context.scene.objects if o.type == 'ARMATURE']
arm = arms[0]
act = arm.animation_data.action
sc = bpy.context.scene
out = {"armatures": len(arms), "bones": [b.name for b in arm.data.bones],
       "frame_range": list(act.frame_range), "fps": sc.render.fps / sc.render.fps_base,
       "frame_start": sc.frame_start, "frame_end": sc.frame_end, "pos": {}}
for f in frames:
    sc.frame_set(sc.frame_start + f)
    out["pos"][str(f)] = {pb.name: list(arm.matrix_world @ pb.head) for pb in arm.pose.bones}
print("DANCEBA_RESULT " + json.dumps(out))
"#;

const GLB_SCRIPT: &str = r#"
import bpy, sys, json
argv = sys.argv[sys.argv.index("--") + 1:]
bpy.ops.wm.read_factory_settings(use_empty=True)
# Debian's Blender 3.4 glTF add-on still uses numpy.bool, which numpy >= 1.24 removed.
import numpy
if not hasattr(numpy, "bool"):
    numpy.bool = bool
sc = bpy.context.scene
sc.render.fps = 60
sc.render.fps_base = 1.0
bpy.ops.import_scene.gltf(filepath=argv[0])
arms = [o for o in sc.objects if o.type == 'ARMATURE']
arm = arms[0]
act = arm.animation_data.action
out = {"armatures": len(arms), "bones": [b.name for b in arm.data.bones],
       "meshes": len([o for o in sc.objects if o.type == 'MESH']),
       "frame_range": list(act.frame_range), "pos": {}}
for f in [int(x) for x in argv[1].split(",")]:
    sc.frame_set(f)
    out["pos"][str(f)] = {pb.name: list(arm.matrix_world @ pb.head) for pb in arm.pose.bones}
print("DANCEBA_RESULT " + json.dumps(out))
"#;

/// Largest |Blender's joint position − ours| over `frames`, from the script's `pos` table.
/// Blender is z-up: the importers map (x, y, z) → (x, −z, y).
fn worst_position_error(r: &Value, m: &danceba_motion::Motion, frames: &[usize]) -> f64 {
    let mut worst = 0.0f64;
    for &f in frames {
        for (j, name) in JOINT_NAMES.iter().enumerate() {
            let p = &r["pos"][f.to_string()][name];
            let got = [0, 1, 2].map(|k| p[k].as_f64().unwrap());
            let w = m.joint(f, j);
            let want = [w[0] as f64, -(w[2] as f64), w[1] as f64];
            for c in 0..3 {
                worst = worst.max((got[c] - want[c]).abs());
            }
        }
    }
    worst
}

fn blender() -> Option<String> {
    let blender = std::env::var("BLENDER").unwrap_or_else(|_| "blender".into());
    let found = Command::new(&blender)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        eprintln!("SKIPPED: `{blender}` not found; install Blender (Debian: apt-get install blender) to run this test");
        return None;
    }
    Some(blender)
}

#[test]
fn blender_imports_the_glb() {
    let Some(blender) = blender() else { return };
    let dir = tempfile::tempdir().unwrap();
    let m = rigid_dance(180);
    let path = dir.path().join("dance.glb");
    glb::write_glb(&m, &path, false).unwrap();
    let script = dir.path().join("check_glb.py");
    std::fs::write(&script, GLB_SCRIPT).unwrap();
    let frames = [0usize, 60, 131];
    let out = Command::new(&blender)
        .args(["--background", "--factory-startup", "--python"])
        .arg(&script)
        .arg("--")
        .arg(&path)
        .arg(frames.map(|f| f.to_string()).join(","))
        .output()
        .expect("run blender");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let Some(line) = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DANCEBA_RESULT "))
    else {
        if stdout.contains("No module named 'numpy'") || stderr.contains("No module named 'numpy'")
        {
            eprintln!("SKIPPED: Blender's glTF importer needs numpy (Debian: apt-get install python3-numpy)");
            return;
        }
        panic!("no result from Blender:\n{stdout}\n{stderr}");
    };
    let r: Value = serde_json::from_str(line).unwrap();
    assert_eq!(r["armatures"], 1);
    assert_eq!(r["meshes"], 1);
    let bones = r["bones"].as_array().unwrap();
    assert_eq!(bones.len(), NUM_JOINTS);
    let range = r["frame_range"].as_array().unwrap();
    assert!((range[1].as_f64().unwrap() - range[0].as_f64().unwrap() - 179.0).abs() < 1e-3);
    let worst = worst_position_error(&r, &m, &frames);
    eprintln!("Blender glTF joint positions: max error {worst:.3e} m");
    assert!(worst < 1e-3, "{worst}");
}

#[test]
fn blender_imports_the_bvh() {
    let Some(blender) = blender() else { return };
    let dir = tempfile::tempdir().unwrap();
    let m = rigid_dance(240);
    let path = dir.path().join("dance.bvh");
    bvh::write_bvh(&m, &path, false).unwrap();
    let script = dir.path().join("check.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let frames = [0usize, 1, 77, 160, 239];
    let frames_arg = frames.map(|f| f.to_string()).join(",");
    let out = Command::new(&blender)
        .args(["--background", "--factory-startup", "--python"])
        .arg(&script)
        .arg("--")
        .arg(&path)
        .arg(&frames_arg)
        .output()
        .expect("run blender");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("DANCEBA_RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "no result from Blender:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let r: Value = serde_json::from_str(line).unwrap();
    assert_eq!(r["armatures"], 1);
    let bones: Vec<&str> = r["bones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    assert_eq!(bones.len(), NUM_JOINTS);
    for name in JOINT_NAMES {
        assert!(bones.contains(&name), "{name} missing in {bones:?}");
    }
    let range = r["frame_range"].as_array().unwrap();
    let span = range[1].as_f64().unwrap() - range[0].as_f64().unwrap() + 1.0;
    assert_eq!(span as usize, m.frames(), "{range:?}");
    assert!((r["fps"].as_f64().unwrap() - 60.0).abs() < 1e-6);
    let worst = worst_position_error(&r, &m, &frames);
    eprintln!("Blender joint positions: max error {worst:.3e} m");
    assert!(worst < 1e-3, "{worst}");
}
