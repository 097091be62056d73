//! A tiny anti-aliased rasteriser: RGB images, capsules (thick lines with round caps) and discs,
//! covered by exact pixel-to-segment distances.

/// An 8-bit RGB image, row-major, `width * height * 3` bytes, row 0 at the top.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// A `width × height` image filled with `rgb`.
    pub fn new(width: u32, height: u32, rgb: [u8; 3]) -> Self {
        let n = width as usize * height as usize;
        let mut data = Vec::with_capacity(n * 3);
        for _ in 0..n {
            data.extend_from_slice(&rgb);
        }
        Self {
            width,
            height,
            data,
        }
    }

    /// The pixel at `(x, y)`, or `None` outside the image.
    pub fn get(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let o = (y as usize * self.width as usize + x as usize) * 3;
        Some([self.data[o], self.data[o + 1], self.data[o + 2]])
    }

    /// Iterates over all pixels.
    pub fn pixels(&self) -> impl Iterator<Item = [u8; 3]> + '_ {
        self.data.chunks_exact(3).map(|p| [p[0], p[1], p[2]])
    }

    /// Blends `rgb` into pixel `(x, y)` with opacity `a` in `[0, 1]`; out-of-range is ignored.
    #[inline]
    pub fn blend(&mut self, x: i64, y: i64, rgb: [f32; 3], a: f32) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || a.is_nan() {
            return;
        }
        let a = (a.clamp(0.0, 1.0) * 256.0) as i32;
        if a == 0 {
            return;
        }
        let o = (y as usize * self.width as usize + x as usize) * 3;
        for (px, &c) in self.data[o..o + 3].iter_mut().zip(rgb.iter()) {
            let old = *px as i32;
            let col = c.clamp(0.0, 255.0) as i32;
            *px = (old + (((col - old) * a + 128) >> 8)).clamp(0, 255) as u8;
        }
    }

    /// Draws a thin (about one pixel) anti-aliased line (Wu's algorithm). Pixels are sampled on
    /// the half-open major-axis range `[p0, p1)`, so chained segments do not overlap.
    pub fn line(&mut self, p0: [f32; 2], p1: [f32; 2], rgb: [f32; 3], alpha: f32) {
        let vals = [p0[0], p0[1], p1[0], p1[1], alpha];
        if vals.iter().any(|v| !v.is_finite()) || alpha <= 0.0 {
            return;
        }
        let (dx, dy) = (p1[0] - p0[0], p1[1] - p0[1]);
        let x_major = dx.abs() >= dy.abs();
        let (a0, b0, da, db, amax) = if x_major {
            (p0[0], p0[1], dx, dy, self.width as f32)
        } else {
            (p0[1], p0[0], dy, dx, self.height as f32)
        };
        if da.abs() < 1e-6 {
            return;
        }
        let slope = db / da;
        // Brightness compensation for diagonal lines.
        let alpha = alpha * (1.0 + slope * slope).sqrt().min(1.42);
        let (lo, hi) = if da > 0.0 {
            (a0, a0 + da)
        } else {
            (a0 + da, a0)
        };
        let i0 = (lo - 0.5).ceil().max(0.0) as i64;
        let i1 = (hi - 0.5).ceil().min(amax) as i64;
        for i in i0..i1 {
            let ac = i as f32 + 0.5;
            let b = b0 + (ac - a0) * slope - 0.5;
            let bf = b.floor();
            let frac = b - bf;
            let j = bf as i64;
            let (x0, y0, x1, y1) = if x_major {
                (i, j, i, j + 1)
            } else {
                (j, i, j + 1, i)
            };
            self.blend(x0, y0, rgb, (1.0 - frac) * alpha);
            self.blend(x1, y1, rgb, frac * alpha);
        }
    }

    /// Draws an anti-aliased capsule from `p0` to `p1` (pixel coordinates, pixel centres at
    /// `i + 0.5`) of radius `r`, colour `rgb`, opacity `alpha`. With `shade`, the colour darkens
    /// towards the rim (a tube look). Non-finite input draws nothing.
    pub fn capsule(
        &mut self,
        p0: [f32; 2],
        p1: [f32; 2],
        r: f32,
        rgb: [f32; 3],
        alpha: f32,
        shade: bool,
    ) {
        let vals = [p0[0], p0[1], p1[0], p1[1], r, alpha];
        if vals.iter().any(|v| !v.is_finite()) || r <= 0.0 || alpha <= 0.0 {
            return;
        }
        let (w, h) = (self.width as f32, self.height as f32);
        let reach = r + 1.0;
        // Entirely outside the image?
        if p0[0].max(p1[0]) + reach < 0.0
            || p0[0].min(p1[0]) - reach > w
            || p0[1].max(p1[1]) + reach < 0.0
            || p0[1].min(p1[1]) - reach > h
        {
            return;
        }
        let (dx, dy) = (p1[0] - p0[0], p1[1] - p0[1]);
        let len2 = dx * dx + dy * dy;
        let x_major = dx.abs() >= dy.abs();
        // Iterate over the major axis; on each line, only the pixels within reach of the segment.
        let (a0, a1, b0, b1, da, db, amax, bmax) = if x_major {
            (p0[0], p1[0], p0[1], p1[1], dx, dy, w, h)
        } else {
            (p0[1], p1[1], p0[0], p1[0], dy, dx, h, w)
        };
        let slope = if da.abs() > 1e-6 { db / da } else { 0.0 };
        let half = reach * (1.0 + slope * slope).sqrt();
        let (alo, ahi) = (a0.min(a1), a0.max(a1));
        let i_start = ((alo - reach).floor().max(0.0)) as i64;
        let i_end = ((ahi + reach).ceil().min(amax)) as i64;
        for i in i_start..i_end {
            let ac = i as f32 + 0.5;
            let t = ac.clamp(alo, ahi);
            let bc = if da.abs() > 1e-6 {
                b0 + (t - a0) * slope
            } else {
                0.5 * (b0 + b1)
            };
            let extra = if da.abs() > 1e-6 {
                0.0
            } else {
                (b0 - b1).abs() * 0.5
            };
            let j_start = ((bc - half - extra).floor().max(0.0)) as i64;
            let j_end = ((bc + half + extra).ceil().min(bmax)) as i64;
            for j in j_start..j_end {
                let bcen = j as f32 + 0.5;
                let (px, py) = if x_major { (ac, bcen) } else { (bcen, ac) };
                // Distance from the pixel centre to the segment.
                let s = if len2 > 1e-12 {
                    (((px - p0[0]) * dx + (py - p0[1]) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let qx = p0[0] + s * dx - px;
                let qy = p0[1] + s * dy - py;
                let d = (qx * qx + qy * qy).sqrt();
                let cov = (r + 0.5 - d).clamp(0.0, 1.0);
                if cov <= 0.0 {
                    continue;
                }
                let col = if shade {
                    let k = 1.0 - 0.45 * (d / r).min(1.0).powi(2);
                    [rgb[0] * k, rgb[1] * k, rgb[2] * k]
                } else {
                    rgb
                };
                let (x, y) = if x_major { (i, j) } else { (j, i) };
                self.blend(x, y, col, cov * alpha);
            }
        }
    }

    /// Draws an anti-aliased filled disc.
    pub fn disc(&mut self, c: [f32; 2], r: f32, rgb: [f32; 3], alpha: f32, shade: bool) {
        self.capsule(c, c, r, rgb, alpha, shade);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capsule_covers_its_centre_line_and_not_far_pixels() {
        let mut img = RgbImage::new(100, 60, [0, 0, 0]);
        img.capsule(
            [10.0, 10.0],
            [90.0, 50.0],
            3.0,
            [255.0, 0.0, 0.0],
            1.0,
            false,
        );
        assert_eq!(img.get(50, 30), Some([255, 0, 0]));
        assert_eq!(img.get(10, 50), Some([0, 0, 0]));
        assert_eq!(img.get(90, 10), Some([0, 0, 0]));
        // Anti-aliasing: some partially covered pixels exist.
        let partial = img.pixels().filter(|p| p[0] > 0 && p[0] < 255).count();
        assert!(partial > 20, "{partial}");
    }

    #[test]
    fn vertical_and_degenerate_capsules_draw() {
        let mut img = RgbImage::new(40, 40, [0, 0, 0]);
        img.capsule(
            [20.0, 5.0],
            [20.0, 35.0],
            2.0,
            [0.0, 255.0, 0.0],
            1.0,
            false,
        );
        assert_eq!(img.get(20, 20), Some([0, 255, 0]));
        img.disc([5.0, 5.0], 3.0, [0.0, 0.0, 255.0], 1.0, false);
        assert_eq!(img.get(4, 4), Some([0, 0, 255]));
    }

    #[test]
    fn non_finite_and_offscreen_input_draw_nothing() {
        let mut img = RgbImage::new(20, 20, [0, 0, 0]);
        img.capsule([f32::NAN, 1.0], [5.0, 5.0], 2.0, [255.0; 3], 1.0, false);
        img.capsule([1e9, 1.0], [2e9, 5.0], 2.0, [255.0; 3], 1.0, false);
        img.capsule(
            [-1e30, -1e30],
            [1e30, 1e30],
            f32::INFINITY,
            [255.0; 3],
            1.0,
            false,
        );
        img.line([f32::NAN, 1.0], [5.0, 5.0], [255.0; 3], 1.0);
        img.line([-1e9, -5.0], [1e9, -5.0], [255.0; 3], 1.0);
        assert!(img.pixels().all(|p| p == [0, 0, 0]));
    }

    #[test]
    fn thin_lines_are_antialiased_and_chain_without_overlap() {
        let mut img = RgbImage::new(60, 20, [0, 0, 0]);
        img.line([0.0, 10.0], [30.0, 10.0], [200.0, 200.0, 200.0], 0.5);
        img.line([30.0, 10.0], [60.0, 10.0], [200.0, 200.0, 200.0], 0.5);
        // A horizontal line at y = 10.0 covers rows 9 and 10 half each, evenly along its length.
        let row9: Vec<u8> = (0..60).map(|x| img.get(x, 9).unwrap()[0]).collect();
        assert!(row9.iter().all(|&v| v == row9[0] && v > 0), "{row9:?}");
        let mut img = RgbImage::new(20, 60, [0, 0, 0]);
        img.line([3.0, 2.0], [12.0, 55.0], [255.0, 0.0, 0.0], 1.0);
        let lit = img.pixels().filter(|p| p[0] > 0).count();
        assert!((53..=2 * 54).contains(&lit), "{lit}");
    }
}
