//! Frame drawing: the 3D skeleton under a perspective camera that follows the dancer, with a
//! floor grid and shadows; and the official OpenPose-style 2D projection (reference §5).

use super::raster::RgbImage;
use crate::skeleton::{NUM_JOINTS, PARENTS};
use crate::Motion;

/// Colour of the dancer's left limbs (orange).
pub const LEFT_RGB: [u8; 3] = [255, 140, 40];
/// Colour of the dancer's right limbs (blue).
pub const RIGHT_RGB: [u8; 3] = [60, 150, 255];
/// Colour of the spine, neck and head (light grey-green).
pub const CENTER_RGB: [u8; 3] = [225, 235, 225];
/// Background colour at the top of the 3D view; it darkens towards the bottom.
pub const BACKGROUND_TOP: [u8; 3] = [38, 42, 54];
/// Floor grid line colour (drawn with a distance fade).
pub const GRID_RGB: [u8; 3] = [120, 128, 145];

/// SMPL joints on the dancer's left side.
const LEFT_JOINTS: [usize; 9] = [1, 4, 7, 10, 13, 16, 18, 20, 22];
/// SMPL joints on the dancer's right side.
const RIGHT_JOINTS: [usize; 9] = [2, 5, 8, 11, 14, 17, 19, 21, 23];

/// Which side of the body a joint belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
    Center,
}

/// The side of SMPL joint `j` (the bone from its parent gets this colour).
pub fn joint_side(j: usize) -> Side {
    if LEFT_JOINTS.contains(&j) {
        Side::Left
    } else if RIGHT_JOINTS.contains(&j) {
        Side::Right
    } else {
        Side::Center
    }
}

/// The display colour of a side.
pub fn side_rgb(s: Side) -> [u8; 3] {
    match s {
        Side::Left => LEFT_RGB,
        Side::Right => RIGHT_RGB,
        Side::Center => CENTER_RGB,
    }
}

type V3 = [f32; 3];

fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn dot(a: V3, b: V3) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn cross(a: V3, b: V3) -> V3 {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}
fn normalize(a: V3) -> Option<V3> {
    let n = dot(a, a).sqrt();
    (n.is_finite() && n > 1e-9).then(|| [a[0] / n, a[1] / n, a[2] / n])
}

/// A pinhole camera looking from `eye` at `target` with y up, for a `width × height` image.
#[derive(Clone, Debug, PartialEq)]
pub struct Camera {
    pub eye: V3,
    pub target: V3,
    /// Vertical field of view in degrees.
    pub fov_y_deg: f32,
    pub width: u32,
    pub height: u32,
    /// Height of the floor (y) under the dancer.
    pub floor_y: f32,
    /// Size of the figure relative to a 1.7 m person: bone thickness and grid spacing scale
    /// with it.
    pub scale: f32,
}

/// Near clipping distance in metres.
const NEAR: f32 = 0.05;

struct View {
    eye: V3,
    right: V3,
    up: V3,
    fwd: V3,
    focal: f32,
    cx: f32,
    cy: f32,
}

impl View {
    fn new(cam: &Camera) -> Self {
        let fwd = normalize(sub(cam.target, cam.eye)).unwrap_or([0.0, 0.0, -1.0]);
        let right = normalize(cross(fwd, [0.0, 1.0, 0.0])).unwrap_or([1.0, 0.0, 0.0]);
        let up = cross(right, fwd);
        let fov = cam.fov_y_deg.clamp(5.0, 150.0).to_radians();
        let focal = 0.5 * cam.height as f32 / (0.5 * fov).tan();
        Self {
            eye: cam.eye,
            right,
            up,
            fwd,
            focal,
            cx: 0.5 * cam.width as f32,
            cy: 0.5 * cam.height as f32,
        }
    }
    /// Camera-space coordinates (x right, y up, z forward).
    fn to_cam(&self, p: V3) -> V3 {
        let d = sub(p, self.eye);
        [dot(d, self.right), dot(d, self.up), dot(d, self.fwd)]
    }
    fn project(&self, c: V3) -> [f32; 2] {
        [
            self.cx + self.focal * c[0] / c[2],
            self.cy - self.focal * c[1] / c[2],
        ]
    }
    /// Clips the camera-space segment to the near plane and projects it.
    fn segment(&self, a: V3, b: V3) -> Option<([f32; 2], [f32; 2], f32, f32)> {
        let (mut a, mut b) = (self.to_cam(a), self.to_cam(b));
        if a[2] < NEAR && b[2] < NEAR {
            return None;
        }
        if a[2] < NEAR || b[2] < NEAR {
            let t = (NEAR - a[2]) / (b[2] - a[2]);
            let m = [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]), NEAR];
            if a[2] < NEAR {
                a = m;
            } else {
                b = m;
            }
        }
        Some((self.project(a), self.project(b), a[2], b[2]))
    }
}

/// Per-motion camera placement: a smoothed track of the dancer, the floor under it (a sliding
/// minimum of the lowest joint, so a drifting motion stays in view), the figure's size, and a
/// viewing direction in front of the dancer (three-quarter view).
#[derive(Clone, Debug)]
pub struct CameraRig {
    /// Smoothed (x, z) of the root per motion frame.
    track: Vec<[f32; 2]>,
    /// Smoothed floor height (y) per motion frame.
    floor: Vec<f32>,
    /// Smoothed root height (y) per motion frame.
    root_y: Vec<f32>,
    /// Figure size relative to a 1.7 m person.
    pub scale: f32,
    /// Unit horizontal direction from the dancer towards the camera.
    dir: [f32; 2],
    /// Horizontal distance from the dancer to the camera for a 1.7 m person, in metres.
    pub distance: f32,
    pub fov_y_deg: f32,
    pub width: u32,
    pub height: u32,
}

/// Centred moving average of `v` over `±half` samples, the window shrinking symmetrically at
/// the ends (so a steady drift is followed exactly, ends included).
fn box_smooth(v: &[f64], half: usize) -> Vec<f64> {
    let n = v.len();
    let mut cum = vec![0f64; n + 1];
    for i in 0..n {
        cum[i + 1] = cum[i] + v[i];
    }
    (0..n)
        .map(|i| {
            let h = half.min(i).min(n - 1 - i);
            (cum[i + h + 1] - cum[i - h]) / (2 * h + 1) as f64
        })
        .collect()
}

impl CameraRig {
    /// Builds the rig for `motion`, rendering at `width × height`.
    pub fn new(motion: &Motion, width: u32, height: u32) -> Self {
        let n = motion.frames();
        let half = ((0.75 * motion.fps).round() as usize).max(1);
        let mut lows = Vec::with_capacity(n);
        let mut sizes = Vec::with_capacity(n);
        for f in 0..n {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for j in 0..NUM_JOINTS {
                let y = motion.joint(f, j)[1];
                lo = lo.min(y);
                hi = hi.max(y);
            }
            lows.push(lo as f64);
            sizes.push(hi - lo);
        }
        // Figure size: the median vertical extent.
        sizes.sort_by(|a, b| a.total_cmp(b));
        let size = sizes.get(n / 2).copied().unwrap_or(1.7);
        let scale = if size.is_finite() {
            (size / 1.7).clamp(0.05, 20.0)
        } else {
            1.0
        };
        // Floor: sliding minimum of the lowest joint over ±0.75 s, then smoothed.
        let slid: Vec<f64> = (0..n)
            .map(|f| {
                let lo = f.saturating_sub(half);
                let hi = (f + half + 1).min(n);
                lows[lo..hi].iter().copied().fold(f64::INFINITY, f64::min)
            })
            .collect();
        let floor = box_smooth(&slid, half)
            .into_iter()
            .map(|v| if v.is_finite() { v as f32 } else { 0.0 })
            .collect();
        let ys: Vec<f64> = (0..n).map(|f| motion.joint(f, 0)[1] as f64).collect();
        let root_y = box_smooth(&ys, half)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let xs: Vec<f64> = (0..n).map(|f| motion.joint(f, 0)[0] as f64).collect();
        let zs: Vec<f64> = (0..n).map(|f| motion.joint(f, 0)[2] as f64).collect();
        let track = box_smooth(&xs, half)
            .into_iter()
            .zip(box_smooth(&zs, half))
            .map(|(x, z)| [x as f32, z as f32])
            .collect();

        // Mean facing direction: (left hip - right hip) × up, averaged, then turned by 30°.
        let mut acc = [0f32; 2];
        for f in 0..n {
            let lr = sub(motion.joint(f, 1), motion.joint(f, 2));
            let fwd = cross(lr, [0.0, 1.0, 0.0]);
            acc[0] += fwd[0];
            acc[1] += fwd[2];
        }
        let norm = (acc[0] * acc[0] + acc[1] * acc[1]).sqrt();
        let facing = if norm.is_finite() && norm > 1e-6 {
            [acc[0] / norm, acc[1] / norm]
        } else {
            [0.0, 1.0]
        };
        let (s, c) = 30f32.to_radians().sin_cos();
        let dir = [c * facing[0] - s * facing[1], s * facing[0] + c * facing[1]];
        Self {
            track,
            floor,
            root_y,
            scale,
            dir,
            distance: 4.2,
            fov_y_deg: 40.0,
            width,
            height,
        }
    }

    /// The camera for motion frame `frame` (clamped to the motion).
    pub fn camera_at(&self, frame: usize) -> Camera {
        let i = frame.min(self.track.len().saturating_sub(1));
        let t = self.track.get(i).copied().unwrap_or([0.0, 0.0]);
        let floor_y = self.floor.get(i).copied().unwrap_or(0.0);
        let s = self.scale;
        // Aim at the (smoothed) pelvis, from 0.8 m (scaled) above it.
        let ty = self.root_y.get(i).copied().unwrap_or(floor_y + 0.95 * s);
        let target = [t[0], ty, t[1]];
        let eye = [
            t[0] + self.dir[0] * self.distance * s,
            ty + 0.8 * s,
            t[1] + self.dir[1] * self.distance * s,
        ];
        Camera {
            eye,
            target,
            fov_y_deg: self.fov_y_deg,
            width: self.width,
            height: self.height,
            floor_y,
            scale: s,
        }
    }
}

fn to_f(c: [u8; 3]) -> [f32; 3] {
    [c[0] as f32, c[1] as f32, c[2] as f32]
}

/// The background: a vertical gradient.
pub fn background(width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::new(width, height, BACKGROUND_TOP);
    let top = to_f(BACKGROUND_TOP);
    for y in 0..height as usize {
        let k = 1.0 - 0.55 * y as f32 / height.max(1) as f32;
        let c = [(top[0] * k) as u8, (top[1] * k) as u8, (top[2] * k) as u8];
        let row = &mut img.data[y * width as usize * 3..(y + 1) * width as usize * 3];
        for p in row.chunks_exact_mut(3) {
            p.copy_from_slice(&c);
        }
    }
    img
}

/// Renders motion frame `frame` (clamped) in 3D with `camera` (e.g. from
/// [`CameraRig::camera_at`]).
pub fn render_frame(motion: &Motion, frame: usize, camera: &Camera) -> RgbImage {
    let mut img = background(camera.width, camera.height);
    draw_frame_into(&mut img, motion, frame, camera);
    img
}

/// Draws the 3D scene over `img` (whose size must match the camera's).
pub(crate) fn draw_frame_into(img: &mut RgbImage, motion: &Motion, frame: usize, camera: &Camera) {
    let floor_y = camera.floor_y;
    let sc = if camera.scale.is_finite() && camera.scale > 0.0 {
        camera.scale
    } else {
        1.0
    };
    let n = motion.frames();
    if n == 0 {
        return;
    }
    let frame = frame.min(n - 1);
    let view = View::new(camera);
    let joints: Vec<V3> = (0..NUM_JOINTS).map(|j| motion.joint(frame, j)).collect();

    // Floor grid: 0.5 m cells (for a 1.7 m person) around the camera target, fading with distance.
    let step = 0.5f32 * sc;
    let cells = 12i32;
    let gx0 = (camera.target[0] / step).round() * step;
    let gz0 = (camera.target[2] / step).round() * step;
    let grid = to_f(GRID_RGB);
    let radius = cells as f32 * step;
    for i in -cells..=cells {
        for k in -cells..cells {
            for axis in 0..2 {
                let (a, b) = if axis == 0 {
                    (
                        [gx0 + i as f32 * step, floor_y, gz0 + k as f32 * step],
                        [gx0 + i as f32 * step, floor_y, gz0 + (k + 1) as f32 * step],
                    )
                } else {
                    (
                        [gx0 + k as f32 * step, floor_y, gz0 + i as f32 * step],
                        [gx0 + (k + 1) as f32 * step, floor_y, gz0 + i as f32 * step],
                    )
                };
                let mid = [
                    0.5 * (a[0] + b[0]) - camera.target[0],
                    0.5 * (a[2] + b[2]) - camera.target[2],
                ];
                let dist = (mid[0] * mid[0] + mid[1] * mid[1]).sqrt();
                let fade = (1.0 - dist / radius).clamp(0.0, 1.0);
                if fade <= 0.0 {
                    continue;
                }
                if let Some((p, q, _, _)) = view.segment(a, b) {
                    img.line(p, q, grid, 0.6 * fade);
                }
            }
        }
    }

    // Shadows: the bones flattened onto the floor.
    for (j, parent) in PARENTS.iter().enumerate() {
        if let Some(p) = *parent {
            let a = [joints[p][0], floor_y, joints[p][2]];
            let b = [joints[j][0], floor_y, joints[j][2]];
            if let Some((s, e, za, zb)) = view.segment(a, b) {
                let r = 0.05 * sc * view.focal / (0.5 * (za + zb)).max(NEAR);
                img.capsule(s, e, r, [8.0, 9.0, 12.0], 0.45, false);
            }
        }
    }

    // Bones, far to near (painter's algorithm).
    let mut bones: Vec<(f32, usize, usize)> = PARENTS
        .iter()
        .enumerate()
        .filter_map(|(j, p)| p.map(|p| (j, p)))
        .map(|(j, p)| {
            let z = 0.5 * (view.to_cam(joints[j])[2] + view.to_cam(joints[p])[2]);
            (z, p, j)
        })
        .collect();
    bones.sort_by(|a, b| b.0.total_cmp(&a.0));
    for &(_, p, j) in &bones {
        let col = to_f(side_rgb(joint_side(j)));
        if let Some((s, e, za, zb)) = view.segment(joints[p], joints[j]) {
            let r = 0.032 * sc * view.focal / (0.5 * (za + zb)).max(NEAR);
            img.capsule(s, e, r.max(1.0), col, 1.0, true);
            // Joint balls at the child end.
            let rj = 0.042 * sc * view.focal / zb.max(NEAR);
            img.disc(e, rj.max(1.2), col, 1.0, true);
        }
    }
    // The head.
    let head = view.to_cam(joints[15]);
    if head[2] > NEAR {
        let r = 0.1 * sc * view.focal / head[2];
        img.disc(view.project(head), r, to_f(CENTER_RGB), 1.0, true);
    }
}

/// OpenPose BODY_25 slot → SMPL joint (reference §5 step 4).
pub const OPENPOSE_FROM_SMPL: [usize; 25] = [
    12, 9, 16, 18, 20, 17, 19, 21, 0, 1, 4, 7, 2, 5, 8, 15, 15, 15, 15, 11, 11, 8, 10, 10, 7,
];

/// The vid2vid OpenPose edges and their colours (reference §5 step 6).
pub const OPENPOSE_EDGES: [([usize; 2], [u8; 3]); 24] = [
    ([17, 15], [153, 0, 153]),
    ([15, 0], [153, 0, 102]),
    ([0, 16], [102, 0, 153]),
    ([16, 18], [51, 0, 153]),
    ([0, 1], [153, 0, 51]),
    ([1, 8], [153, 0, 0]),
    ([1, 2], [153, 51, 0]),
    ([2, 3], [153, 102, 0]),
    ([3, 4], [153, 153, 0]),
    ([1, 5], [102, 153, 0]),
    ([5, 6], [51, 153, 0]),
    ([6, 7], [0, 153, 0]),
    ([8, 9], [0, 153, 51]),
    ([9, 10], [0, 153, 102]),
    ([10, 11], [0, 153, 153]),
    ([11, 24], [0, 153, 153]),
    ([11, 22], [0, 153, 153]),
    ([22, 23], [0, 153, 153]),
    ([8, 12], [0, 102, 153]),
    ([12, 13], [0, 51, 153]),
    ([13, 14], [0, 0, 153]),
    ([14, 21], [0, 0, 153]),
    ([14, 19], [0, 0, 153]),
    ([19, 20], [0, 0, 153]),
];

/// The official 2D keypoints of a frame in a `width × height` image, y measured from the bottom
/// as written to the official JSON (before the image flip): `x = (X/3.3 + 1)·w/2`,
/// `y = (Y/1.5 + 1)·h/2`.
pub fn openpose_keypoints(
    motion: &Motion,
    frame: usize,
    width: u32,
    height: u32,
) -> [[f32; 2]; 25] {
    let frame = frame.min(motion.frames().saturating_sub(1));
    let mut out = [[0f32; 2]; 25];
    for (slot, &j) in OPENPOSE_FROM_SMPL.iter().enumerate() {
        let p = motion.joint(frame, j);
        out[slot] = [
            (p[0] / 1.5 / 2.2 + 1.0) * 0.5 * width as f32,
            (p[1] / 1.5 + 1.0) * 0.5 * height as f32,
        ];
    }
    out
}

/// Renders a frame the way the official visualiser does (black canvas, BODY_25 edges in the
/// vid2vid colours, 6-pixel strokes with radius-6 end discs, y flipped so that up is up). Not
/// pixel-exact with the official (which depends on curve-fit round-off); the token text overlay is
/// not drawn.
pub fn render_openpose_frame(motion: &Motion, frame: usize, width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::new(width, height, [0, 0, 0]);
    let kp = openpose_keypoints(motion, frame, width, height);
    // Official pixel row after the flip: row = height - 1 - y.
    let to_px = |p: [f32; 2]| {
        [
            p[0].trunc() + 0.5,
            (height as f32 - 1.0 - p[1].trunc()) + 0.5,
        ]
    };
    for ([a, b], col) in OPENPOSE_EDGES {
        let (pa, pb) = (kp[a], kp[b]);
        if pa[0] == 0.0 || pb[0] == 0.0 {
            continue;
        }
        // Edges shorter than a pixel along their major axis are not drawn (official rule).
        if (pa[0] - pb[0]).abs().max((pa[1] - pb[1]).abs()) < 1.0 {
            continue;
        }
        let (s, e) = (to_px(pa), to_px(pb));
        let c = to_f(col);
        img.capsule(s, e, 3.0, c, 0.75, false);
        img.disc(s, 6.0, c, 0.75, false);
        img.disc(e, 6.0, c, 0.75, false);
    }
    img
}
