//! Small numpy/scipy-compatible helpers shared by the DSP stages.

/// A dense row-major f32 matrix (`rows × cols`), laid out like the numpy arrays of the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }
    pub fn transpose(&self) -> Mat {
        let mut out = Mat::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        out
    }
}

/// A dense row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat64 {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat64 {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Mat64 {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
    pub fn get(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }
}

/// `scipy.signal.get_window('hann', n, fftbins=True)`: the periodic Hann window, evaluated the way
/// scipy does (`0.5 + 0.5·cos(linspace(-π, π, n+1))`, truncated to n).
pub fn hann_periodic(n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![1.0];
    }
    let m = n + 1; // extended length
    let start = -std::f64::consts::PI;
    let stop = std::f64::consts::PI;
    let step = (stop - start) / (m - 1) as f64;
    (0..n)
        .map(|k| {
            let fac = if k == m - 1 {
                stop
            } else {
                k as f64 * step + start
            };
            0.5 + 0.5 * fac.cos()
        })
        .collect()
}

/// `scipy.signal.hann(n)` (symmetric).
pub fn hann_symmetric(n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n == 1 {
        return vec![1.0];
    }
    let start = -std::f64::consts::PI;
    let stop = std::f64::consts::PI;
    let step = (stop - start) / (n - 1) as f64;
    (0..n)
        .map(|k| {
            let fac = if k == n - 1 {
                stop
            } else {
                k as f64 * step + start
            };
            0.5 + 0.5 * fac.cos()
        })
        .collect()
}

/// Index into a signal of length `n` extended with numpy's `mode='reflect'` (the edge sample is
/// not repeated), for any offset, including pads wider than the signal.
#[inline]
pub fn reflect_index(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let p = 2 * (n as isize - 1);
    let mut m = i.rem_euclid(p);
    if m >= n as isize {
        m = p - m;
    }
    m as usize
}

/// Index into a signal of length `n` extended with scipy.ndimage's `mode='reflect'`
/// (half-sample symmetric: `d c b a | a b c d | d c b a`).
#[inline]
pub fn ndimage_reflect_index(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let p = 2 * n as isize;
    let mut m = i.rem_euclid(p);
    if m >= n as isize {
        m = p - 1 - m;
    }
    m as usize
}

/// numpy's pairwise summation (`add.reduce` on a contiguous float array), accumulating in `T`:
/// sequential below 8 values, 8 interleaved partial sums up to 128, halves (multiples of 8) above.
fn pairwise_sum<T: Copy + Default + std::ops::Add<Output = T> + std::ops::AddAssign>(a: &[T]) -> T {
    let n = a.len();
    if n < 8 {
        let mut res = T::default();
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [T::default(); 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - (n % 8) {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// numpy's pairwise summation of a float64 array.
pub fn pairwise_sum_f64(a: &[f64]) -> f64 {
    pairwise_sum(a)
}

/// numpy's pairwise summation for float32 arrays (accumulating in float32).
pub fn pairwise_sum_f32(a: &[f32]) -> f32 {
    pairwise_sum(a)
}

/// `np.median` of float32 values (mean of the two middle values, in float32, for an even count).
/// Returns NaN for an empty slice, as numpy does.
pub fn median_f32(values: &mut [f32]) -> f32 {
    let n = values.len();
    if n == 0 {
        return f32::NAN;
    }
    values.sort_unstable_by(|a, b| a.total_cmp(b));
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `np.median` of float64 values.
pub fn median_f64(values: &mut [f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    values.sort_unstable_by(|a, b| a.total_cmp(b));
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Python's `round()` / numpy's `np.round`: round half to even.
pub fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// numpy `linspace(start, stop, num)` (endpoint=True), evaluated as numpy does.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut y: Vec<f64> = (0..num)
        .map(|i| {
            if step == 0.0 {
                (i as f64 / div) * delta + start
            } else {
                i as f64 * step + start
            }
        })
        .collect();
    y[num - 1] = stop;
    y
}

/// `np.finfo(np.float32).tiny`
pub const TINY_F32: f32 = f32::MIN_POSITIVE;
/// `np.finfo(np.float64).tiny`
pub const TINY_F64: f64 = f64::MIN_POSITIVE;
