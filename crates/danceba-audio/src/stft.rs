//! STFT and inverse STFT exactly as librosa 0.8.1 defines them (reference §1.2).

use std::sync::Arc;

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex;

use crate::util::{reflect_index, TINY_F32};

/// A complex spectrogram stored frame-major: `data[f * n_bins + k]`, complex64 like librosa's
/// `stft(..., dtype=complex64)`.
#[derive(Clone, Debug)]
pub struct Stft {
    pub n_bins: usize,
    pub n_frames: usize,
    pub data: Vec<Complex<f32>>,
}

impl Stft {
    pub fn frame(&self, f: usize) -> &[Complex<f32>] {
        &self.data[f * self.n_bins..(f + 1) * self.n_bins]
    }
}

/// Number of frames of a centred STFT: `1 + n // hop`.
pub fn n_frames_centered(n: usize, hop: usize) -> usize {
    1 + n / hop
}

fn r2c_plan(n_fft: usize) -> Arc<dyn RealToComplex<f64>> {
    let mut planner = RealFftPlanner::<f64>::new();
    planner.plan_fft_forward(n_fft)
}

/// `librosa.stft(y, n_fft, hop_length, window, center=True, pad_mode='reflect')`.
///
/// `window = None` is the rectangular `'ones'` window. The windowed frame is formed in f64,
/// transformed in f64 and rounded to complex64, as numpy does. `y` must not be empty.
pub fn stft(y: &[f32], n_fft: usize, hop: usize, window: Option<&[f64]>) -> Stft {
    let n = y.len();
    let n_bins = n_fft / 2 + 1;
    let n_frames = n_frames_centered(n, hop);
    let half = (n_fft / 2) as isize;
    let plan = r2c_plan(n_fft);
    let mut data = vec![Complex::new(0.0f32, 0.0f32); n_bins * n_frames];
    data.par_chunks_mut(n_bins).enumerate().for_each_init(
        || {
            (
                vec![0.0f64; n_fft],
                vec![Complex::new(0.0f64, 0.0); n_bins],
                plan.make_scratch_vec(),
            )
        },
        |(buf, spec, scratch), (f, out)| {
            let start = (f * hop) as isize - half;
            for (j, b) in buf.iter_mut().enumerate() {
                let i = start + j as isize;
                let s = if i >= 0 && (i as usize) < n {
                    y[i as usize]
                } else {
                    y[reflect_index(i, n)]
                };
                *b = match window {
                    Some(w) => w[j] * s as f64,
                    None => s as f64,
                };
            }
            // Lengths are consistent by construction, so this cannot fail.
            let _ = plan.process_with_scratch(buf, spec, scratch);
            for (o, c) in out.iter_mut().zip(spec.iter()) {
                *o = Complex::new(c.re as f32, c.im as f32);
            }
        },
    );
    Stft {
        n_bins,
        n_frames,
        data,
    }
}

fn c2r_plan(n_fft: usize) -> Arc<dyn ComplexToReal<f64>> {
    let mut planner = RealFftPlanner::<f64>::new();
    planner.plan_fft_inverse(n_fft)
}

/// `librosa.istft(D, hop_length, window='hann', center=True, dtype=float32)` without `length`:
/// returns `hop · (n_frames − 1)` samples.
pub fn istft(spec: &Stft, hop: usize, window: &[f64]) -> Vec<f32> {
    let n_fft = 2 * (spec.n_bins - 1);
    let n_frames = spec.n_frames;
    if n_frames == 0 {
        return Vec::new();
    }
    let plan = c2r_plan(n_fft);
    let scale = 1.0 / n_fft as f64;
    // Inverse transforms in parallel (f64), overlap-add sequentially into a float32 buffer.
    let mut frames = vec![0.0f64; n_fft * n_frames];
    frames.par_chunks_mut(n_fft).enumerate().for_each_init(
        || {
            (
                vec![Complex::new(0.0f64, 0.0); spec.n_bins],
                plan.make_scratch_vec(),
            )
        },
        |(buf, scratch), (f, out)| {
            for (b, c) in buf.iter_mut().zip(spec.frame(f)) {
                *b = Complex::new(c.re as f64, c.im as f64);
            }
            // numpy's irfft ignores the imaginary parts of DC and Nyquist.
            buf[0].im = 0.0;
            let last = buf.len() - 1;
            buf[last].im = 0.0;
            let _ = plan.process_with_scratch(buf, out, scratch);
            for (o, w) in out.iter_mut().zip(window) {
                *o = w * (*o * scale);
            }
        },
    );
    let len = n_fft + hop * (n_frames - 1);
    let mut y = vec![0.0f32; len];
    let mut wss = vec![0.0f32; len];
    for f in 0..n_frames {
        let s = f * hop;
        let fr = &frames[f * n_fft..(f + 1) * n_fft];
        for j in 0..n_fft {
            y[s + j] = (y[s + j] as f64 + fr[j]) as f32;
            wss[s + j] = (wss[s + j] as f64 + window[j] * window[j]) as f32;
        }
    }
    for (v, w) in y.iter_mut().zip(&wss) {
        if *w > TINY_F32 {
            *v /= *w;
        }
    }
    let half = n_fft / 2;
    y[half..len - half].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::hann_periodic;

    #[test]
    fn frame_count_and_roundtrip() {
        let y: Vec<f32> = (0..5000).map(|i| ((i as f32) * 0.01).sin()).collect();
        let w = hann_periodic(2048);
        let s = stft(&y, 2048, 512, Some(&w));
        assert_eq!(s.n_frames, 1 + 5000 / 512);
        assert_eq!(s.n_bins, 1025);
        let back = istft(&s, 512, &w);
        assert_eq!(back.len(), 512 * (s.n_frames - 1));
        for (a, b) in back.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
