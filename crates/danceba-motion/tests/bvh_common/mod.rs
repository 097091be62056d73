//! A small independent BVH parser and forward kinematics for the tests.
#![allow(dead_code, clippy::needless_range_loop)]

pub struct BvhJoint {
    pub name: String,
    pub parent: Option<usize>,
    pub offset: [f64; 3],
    pub channels: Vec<String>,
}

pub struct Bvh {
    pub joints: Vec<BvhJoint>,
    pub frame_time: f64,
    pub frames: Vec<Vec<f64>>,
}

pub fn parse(text: &str) -> Bvh {
    let mut tokens = text.split_whitespace().peekable();
    let mut joints: Vec<BvhJoint> = Vec::new();
    let mut stack: Vec<Option<usize>> = Vec::new();
    assert_eq!(tokens.next(), Some("HIERARCHY"));
    let mut pending: Option<usize> = None;
    let mut in_end = false;
    loop {
        let t = tokens.next().expect("unexpected end of hierarchy");
        match t {
            "ROOT" | "JOINT" => {
                let name = tokens.next().unwrap().to_string();
                let parent = stack.last().copied().flatten();
                joints.push(BvhJoint {
                    name,
                    parent,
                    offset: [0.0; 3],
                    channels: vec![],
                });
                pending = Some(joints.len() - 1);
            }
            "End" => {
                assert_eq!(tokens.next(), Some("Site"));
                in_end = true;
            }
            "{" => {
                if in_end {
                    stack.push(None);
                } else {
                    stack.push(pending);
                }
            }
            "}" => {
                let top = stack.pop().unwrap();
                if top.is_none() {
                    in_end = false;
                }
                if stack.is_empty() {
                    break;
                }
            }
            "OFFSET" => {
                let v: Vec<f64> = (0..3)
                    .map(|_| tokens.next().unwrap().parse().unwrap())
                    .collect();
                if !in_end {
                    let j = stack.last().unwrap().unwrap();
                    joints[j].offset = [v[0], v[1], v[2]];
                }
            }
            "CHANNELS" => {
                let n: usize = tokens.next().unwrap().parse().unwrap();
                let j = stack.last().unwrap().unwrap();
                joints[j].channels = (0..n).map(|_| tokens.next().unwrap().to_string()).collect();
            }
            other => panic!("unexpected token {other}"),
        }
    }
    assert_eq!(tokens.next(), Some("MOTION"));
    assert_eq!(tokens.next(), Some("Frames:"));
    let n: usize = tokens.next().unwrap().parse().unwrap();
    assert_eq!(tokens.next(), Some("Frame"));
    assert_eq!(tokens.next(), Some("Time:"));
    let frame_time: f64 = tokens.next().unwrap().parse().unwrap();
    let per: usize = joints.iter().map(|j| j.channels.len()).sum();
    let vals: Vec<f64> = tokens.map(|t| t.parse().unwrap()).collect();
    assert_eq!(vals.len(), n * per, "motion values");
    let frames = vals.chunks(per).map(|c| c.to_vec()).collect();
    Bvh {
        joints,
        frame_time,
        frames,
    }
}

fn rot(axis: usize, deg: f64) -> [[f64; 3]; 3] {
    let (s, c) = deg.to_radians().sin_cos();
    match axis {
        0 => [[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]],
        1 => [[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]],
        _ => [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]],
    }
}

fn mul(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut r = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            r[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    r
}

/// World positions of every joint (in file order) at frame `f`.
pub fn fk(bvh: &Bvh, f: usize) -> Vec<[f64; 3]> {
    let vals = &bvh.frames[f];
    let mut k = 0;
    let mut glob: Vec<[[f64; 3]; 3]> = Vec::new();
    let mut pos: Vec<[f64; 3]> = Vec::new();
    for j in &bvh.joints {
        let mut t = j.offset;
        let mut r = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        for ch in &j.channels {
            let v = vals[k];
            k += 1;
            match ch.as_str() {
                "Xposition" => t[0] += v,
                "Yposition" => t[1] += v,
                "Zposition" => t[2] += v,
                "Xrotation" => r = mul(&r, &rot(0, v)),
                "Yrotation" => r = mul(&r, &rot(1, v)),
                "Zrotation" => r = mul(&r, &rot(2, v)),
                other => panic!("channel {other}"),
            }
        }
        match j.parent {
            None => {
                glob.push(r);
                pos.push(t);
            }
            Some(p) => {
                let g = glob[p];
                let d = [
                    g[0][0] * t[0] + g[0][1] * t[1] + g[0][2] * t[2],
                    g[1][0] * t[0] + g[1][1] * t[1] + g[1][2] * t[2],
                    g[2][0] * t[0] + g[2][1] * t[1] + g[2][2] * t[2],
                ];
                pos.push([pos[p][0] + d[0], pos[p][1] + d[1], pos[p][2] + d[2]]);
                glob.push(mul(&g, &r));
            }
        }
    }
    pos
}
