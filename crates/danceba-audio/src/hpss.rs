//! Harmonic–percussive source separation as `librosa.effects.hpss` (reference §1.6).

use rayon::prelude::*;
use rustfft::num_complex::Complex;

use crate::stft::{istft, stft, Stft};
use crate::util::{hann_periodic, ndimage_reflect_index, TINY_F32};

/// Kernel size of the median filters.
pub const KERNEL: usize = 31;

/// Sliding median of width `w` (odd) with scipy.ndimage `reflect` boundaries, written to `out`.
/// Exact: the median of a window is one of its elements.
pub fn median_filter_reflect(x: &[f32], w: usize, out: &mut [f32]) {
    let n = x.len();
    if n == 0 {
        return;
    }
    let h = (w / 2) as isize;
    let mut win: Vec<f32> = (-h..=h).map(|d| x[ndimage_reflect_index(d, n)]).collect();
    win.sort_unstable_by(|a, b| a.total_cmp(b));
    out[0] = win[w / 2];
    for i in 1..n {
        let old = x[ndimage_reflect_index(i as isize - 1 - h, n)];
        let new = x[ndimage_reflect_index(i as isize + h, n)];
        if old.to_bits() != new.to_bits() {
            let pos = win.partition_point(|v| v.total_cmp(&old).is_lt());
            win.remove(pos);
            let ins = win.partition_point(|v| v.total_cmp(&new).is_lt());
            win.insert(ins, new);
        }
        out[i] = win[w / 2];
    }
}

/// Harmonic and percussive STFTs of `X` (librosa `decompose.hpss`, kernel 31, power 2, margin 1).
pub fn hpss_spectrogram(x: &Stft) -> (Stft, Stft) {
    let nb = x.n_bins;
    let nf = x.n_frames;
    // Magnitude, frame-major, and bin-major copy.
    let mag: Vec<f32> = x.data.iter().map(|c| c.re.hypot(c.im)).collect();
    let mut mag_t = vec![0.0f32; nb * nf];
    for f in 0..nf {
        for k in 0..nb {
            mag_t[k * nf + f] = mag[f * nb + k];
        }
    }
    // Harmonic: median along time (for each bin).
    let mut harm_t = vec![0.0f32; nb * nf];
    harm_t
        .par_chunks_mut(nf)
        .zip(mag_t.par_chunks(nf))
        .for_each(|(o, row)| median_filter_reflect(row, KERNEL, o));
    // Percussive: median along frequency (for each frame).
    let mut perc = vec![0.0f32; nb * nf];
    perc.par_chunks_mut(nb)
        .zip(mag.par_chunks(nb))
        .for_each(|(o, col)| median_filter_reflect(col, KERNEL, o));
    let mut xh = vec![Complex::new(0.0f32, 0.0); nb * nf];
    let mut xp = vec![Complex::new(0.0f32, 0.0); nb * nf];
    xh.par_chunks_mut(nb)
        .zip(xp.par_chunks_mut(nb))
        .enumerate()
        .for_each(|(f, (oh, op))| {
            for k in 0..nb {
                let i = f * nb + k;
                let h = harm_t[k * nf + f];
                let p = perc[i];
                let s = mag[i];
                let (mh, mp) = soft_masks(h, p);
                let c = x.data[i];
                let theta = c.im.atan2(c.re);
                let (sn, cs) = (theta.sin(), theta.cos());
                let a = s * mh;
                let b = s * mp;
                oh[k] = Complex::new(a * cs, a * sn);
                op[k] = Complex::new(b * cs, b * sn);
            }
        });
    (
        Stft {
            n_bins: nb,
            n_frames: nf,
            data: xh,
        },
        Stft {
            n_bins: nb,
            n_frames: nf,
            data: xp,
        },
    )
}

/// `librosa.util.softmask` for both masks with power 2 and split zeros, in float32.
#[inline]
pub fn soft_masks(h: f32, p: f32) -> (f32, f32) {
    let z = h.max(p);
    if z < TINY_F32 {
        return (0.5, 0.5);
    }
    let a = h / z;
    let a = a * a;
    let b = p / z;
    let b = b * b;
    (a / (a + b), b / (b + a))
}

/// `librosa.effects.hpss(y)`: harmonic and percussive signals, each of length `len(y)` (the
/// last `len(y) mod 512` samples are zero, as in the reference).
pub fn hpss(y: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let w = hann_periodic(2048);
    let x = stft(y, 2048, 512, Some(&w));
    hpss_from_stft(&x, y.len())
}

/// [`hpss`] from the signal's STFT (2048/512/hann, centred) and its length.
pub fn hpss_from_stft(x: &Stft, n: usize) -> (Vec<f32>, Vec<f32>) {
    let w = hann_periodic(2 * (x.n_bins - 1));
    let (xh, xp) = hpss_spectrogram(x);
    let (mut yh, mut yp) = rayon::join(|| istft(&xh, 512, &w), || istft(&xp, 512, &w));
    yh.resize(n, 0.0);
    yp.resize(n, 0.0);
    (yh, yp)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sliding_median_matches_brute_force() {
        let x: Vec<f32> = (0..100).map(|i| ((i * 37) % 23) as f32 * 0.5).collect();
        for &n in &[1usize, 5, 20, 31, 100] {
            let xs = &x[..n];
            let mut out = vec![0.0; n];
            median_filter_reflect(xs, 31, &mut out);
            for i in 0..n {
                let mut w: Vec<f32> = (-15isize..=15)
                    .map(|d| xs[ndimage_reflect_index(i as isize + d, n)])
                    .collect();
                w.sort_by(|a, b| a.partial_cmp(b).unwrap());
                assert_eq!(out[i], w[15]);
            }
        }
    }
}
