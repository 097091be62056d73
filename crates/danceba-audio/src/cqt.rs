//! Constant-Q chroma as `librosa.feature.chroma_cqt(y, sr=3840, n_octaves=5)` (reference §1.7):
//! piptrack tuning estimate, resampy `kaiser_fast` 2:1 octave down-sampling, sparse FFT filter
//! bank, CQT magnitude and chroma folding with inf-norm.

use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

use crate::stft::stft;
use crate::util::{hann_periodic, linspace, pairwise_sum_f64, Mat, TINY_F32};
use crate::AudioError;

/// Bins per octave of the CQT.
pub const BINS_PER_OCTAVE: usize = 36;
/// Octaves of the CQT (the official script passes 5 at 3840 Hz).
pub const N_OCTAVES: usize = 5;
/// `librosa.filters.window_bandwidth('hann')`.
pub const HANN_BANDWIDTH: f64 = 1.50018310546875;
/// resampy kaiser_fast roll-off.
pub const KAISER_FAST_ROLLOFF: f64 = 0.8682120388377784;
/// resampy kaiser_fast Kaiser window shape parameter (recovered from resampy's filter table).
pub const KAISER_FAST_BETA: f64 = 9.903224416454963;
/// resampy kaiser_fast: zero crossings kept and table entries per crossing.
pub const KAISER_FAST_ZEROS: usize = 24;
pub const KAISER_FAST_PRECISION: usize = 512;

/// Frequency of C1 (`librosa.note_to_hz('C1')`).
pub fn c1_hz() -> f64 {
    440.0 * 2.0f64.powf((24.0 - 69.0) / 12.0)
}

// ----------------------------------------------------------------------------------------------
// Tuning

/// `librosa.piptrack(y, sr, n_fft=2048, fmin=150, fmax=min(4000, sr/2), threshold=0.1)` reduced to
/// what `estimate_tuning` uses: the (pitch, magnitude) pairs of the detected peaks, in float32.
pub fn piptrack_peaks(y: &[f32], sr: f64) -> Vec<(f32, f32)> {
    let n_fft = 2048usize;
    let w = hann_periodic(n_fft);
    let spec = stft(y, n_fft, 512, Some(&w));
    let nb = spec.n_bins;
    let fmin = 150.0f64;
    let fmax = 4000.0f64.min(sr / 2.0);
    let freqs = linspace(0.0, sr / 2.0, nb);
    let mut out = Vec::new();
    let mut s = vec![0.0f32; nb];
    let mut masked = vec![0.0f32; nb];
    for f in 0..spec.n_frames {
        for (v, c) in s.iter_mut().zip(spec.frame(f)) {
            *v = c.re.hypot(c.im);
        }
        let refv = 0.1f32 * s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (m, &v) in masked.iter_mut().zip(&s) {
            *m = if v > refv { v } else { 0.0 };
        }
        for k in 1..nb - 1 {
            if !(fmin <= freqs[k] && freqs[k] < fmax) {
                continue;
            }
            let x = masked[k];
            if !(x > masked[k - 1] && x >= masked[k + 1]) {
                continue;
            }
            let avg = 0.5f32 * (s[k + 1] - s[k - 1]);
            let sh = 2.0f32 * s[k] - s[k + 1] - s[k - 1];
            let shift = avg / (sh + if sh.abs() < TINY_F32 { 1.0 } else { 0.0 });
            let dskew = 0.5f32 * avg * shift;
            let pitch = ((k as f64 + shift as f64) * sr / n_fft as f64) as f32;
            let mag = s[k] + dskew;
            out.push((pitch, mag));
        }
    }
    out
}

/// `librosa.estimate_tuning(y, sr, bins_per_octave=36)` (resolution 0.01).
pub fn estimate_tuning(y: &[f32], sr: f64) -> f64 {
    let peaks = piptrack_peaks(y, sr);
    let mut mags: Vec<f32> = peaks.iter().filter(|p| p.0 > 0.0).map(|p| p.1).collect();
    let threshold = if mags.is_empty() {
        0.0f32
    } else {
        crate::util::median_f32(&mut mags)
    };
    let freqs: Vec<f32> = peaks
        .iter()
        .filter(|p| p.0 > 0.0 && p.1 >= threshold)
        .map(|p| p.0)
        .collect();
    pitch_tuning(&freqs, BINS_PER_OCTAVE)
}

/// `librosa.pitch_tuning(frequencies, resolution=0.01, bins_per_octave)`.
pub fn pitch_tuning(freqs: &[f32], bins_per_octave: usize) -> f64 {
    let freqs: Vec<f32> = freqs.iter().copied().filter(|&f| f > 0.0).collect();
    if freqs.is_empty() {
        return 0.0;
    }
    let edges = linspace(-0.5, 0.5, 101);
    let mut counts = [0usize; 100];
    for &f in &freqs {
        let octs = (f / 27.5f32).log2();
        let mut r = bins_per_octave as f32 * octs;
        // np.mod(r, 1.0) in float32
        let mut m = r % 1.0f32;
        if m != 0.0 && m < 0.0 {
            m += 1.0;
        }
        r = m;
        if r >= 0.5 {
            r -= 1.0;
        }
        let v = r as f64;
        if v < edges[0] || v > edges[100] {
            continue;
        }
        // bin i: edges[i] <= v < edges[i+1]; the last bin is closed.
        let i = edges.partition_point(|&e| e <= v);
        let bin = if i >= 101 { 99 } else { i - 1 };
        counts[bin.min(99)] += 1;
    }
    let mut best = 0;
    for i in 1..100 {
        if counts[i] > counts[best] {
            best = i;
        }
    }
    edges[best]
}

// ----------------------------------------------------------------------------------------------
// resampy kaiser_fast, 2:1

fn bessel_i0(x: f64) -> f64 {
    // Power series; converges quickly for the arguments used here (|x| <= 10).
    let mut sum = 1.0f64;
    let mut term = 1.0f64;
    let q = x * x / 4.0;
    let mut k = 1.0f64;
    loop {
        term *= q / (k * k);
        sum += term;
        if term < sum * 1e-18 {
            break;
        }
        k += 1.0;
    }
    sum
}

/// The right wing of resampy's kaiser_fast interpolation filter at the table positions `idx`
/// (`rolloff · sinc(rolloff · t) · kaiser(t)`, 512 entries per zero crossing, 24 crossings).
pub fn kaiser_fast_table_at(idx: usize) -> f64 {
    let n = KAISER_FAST_ZEROS * KAISER_FAST_PRECISION;
    let t = linspace_point(0.0, KAISER_FAST_ZEROS as f64, n + 1, idx);
    let x = KAISER_FAST_ROLLOFF * t;
    let sinc = if x == 0.0 {
        1.0
    } else {
        let px = std::f64::consts::PI * x;
        px.sin() / px
    };
    // np.kaiser(2n+1, beta)[n + idx]
    let m = 2 * n + 1;
    let k = (n + idx) as f64;
    let alpha = (m as f64 - 1.0) / 2.0;
    let r = (k - alpha) / alpha;
    let taper =
        bessel_i0(KAISER_FAST_BETA * (1.0 - r * r).max(0.0).sqrt()) / bessel_i0(KAISER_FAST_BETA);
    KAISER_FAST_ROLLOFF * sinc * taper
}

fn linspace_point(start: f64, stop: f64, num: usize, i: usize) -> f64 {
    if i == num - 1 {
        return stop;
    }
    let step = (stop - start) / (num - 1) as f64;
    i as f64 * step + start
}

/// The 48 taps `h_m = 0.5 · table[256·m]` used by a 2:1 kaiser_fast down-sampling.
pub fn half_band_taps() -> Vec<f64> {
    let n = KAISER_FAST_ZEROS * KAISER_FAST_PRECISION + 1;
    let step = KAISER_FAST_PRECISION / 2;
    (0..n)
        .step_by(step)
        .map(|i| 0.5 * kaiser_fast_table_at(i))
        .collect()
}

/// `librosa.resample(y, 2, 1, res_type='kaiser_fast', scale=True)`: resampy 2:1 followed by
/// zero padding to `ceil(n/2)` and division by `sqrt(0.5)` (in float32).
///
/// Each output accumulates into a float32 register, left wing first, each product formed in
/// float64 (numba's `y[t] += weight * x[...]`). Outputs are independent, so they are computed in
/// parallel and eight at a time (same per-output operation order).
pub fn resample_half(y: &[f32], taps: &[f64]) -> Vec<f32> {
    let n = y.len();
    let n_out = n / 2;
    let nwin = taps.len(); // 49 taps; the left wing uses up to 48, the right wing up to 47
    let left_max = nwin - 1; // (12289 - 0) // 256 = 48
    let right_max = nwin - 2; // (12289 - 256) // 256 = 47
    let mut out = vec![0.0f32; n.div_ceil(2)];
    let scale = 0.5f64.sqrt() as f32;
    let one = |t: usize| -> f32 {
        let c = 2 * t;
        let mut acc = 0.0f32;
        let imax = (c + 1).min(left_max);
        for i in 0..imax {
            acc = (acc as f64 + taps[i] * y[c - i] as f64) as f32;
        }
        let kmax = (n - c - 1).min(right_max);
        for k in 0..kmax {
            acc = (acc as f64 + taps[k + 1] * y[c + k + 1] as f64) as f32;
        }
        acc
    };
    const LANES: usize = 8;
    const BLOCK: usize = 4096;
    out[..n_out]
        .par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(bi, chunk)| {
            let t0 = bi * BLOCK;
            let mut j = 0;
            while j < chunk.len() {
                let t = t0 + j;
                let c = 2 * t;
                // Full-width interior block: every lane uses all 48 left and 47 right taps.
                let interior = j + LANES <= chunk.len()
                    && c + 1 >= left_max
                    && 2 * (t + LANES - 1) + 1 + right_max <= n;
                if interior {
                    let mut acc = [0.0f32; LANES];
                    for i in 0..left_max {
                        let h = taps[i];
                        for l in 0..LANES {
                            acc[l] = (acc[l] as f64 + h * y[c + 2 * l - i] as f64) as f32;
                        }
                    }
                    for k in 0..right_max {
                        let h = taps[k + 1];
                        for l in 0..LANES {
                            acc[l] = (acc[l] as f64 + h * y[c + 2 * l + k + 1] as f64) as f32;
                        }
                    }
                    chunk[j..j + LANES].copy_from_slice(&acc);
                    j += LANES;
                } else {
                    chunk[j] = one(t);
                    j += 1;
                }
            }
        });
    for o in out.iter_mut() {
        *o /= scale;
    }
    out
}

// ----------------------------------------------------------------------------------------------
// Filter bank

/// A sparse CSR complex64 matrix (rows × 257 FFT bins), rows in increasing column order.
#[derive(Clone, Debug)]
pub struct SparseBasis {
    pub n_rows: usize,
    pub n_cols: usize,
    pub indptr: Vec<usize>,
    pub indices: Vec<usize>,
    pub values: Vec<Complex<f32>>,
}

/// `librosa.filters.constant_q_lengths` for `gamma = 0`, `filter_scale = 1`.
pub fn constant_q_lengths(sr: f64, fmin: f64, n_bins: usize, bins_per_octave: usize) -> Vec<f64> {
    let alpha = 2.0f64.powf(1.0 / bins_per_octave as f64) - 1.0;
    let q = 1.0 / alpha;
    (0..n_bins)
        .map(|k| {
            let freq = fmin * 2.0f64.powf(k as f64 / bins_per_octave as f64);
            q * sr / (freq + 0.0 / alpha)
        })
        .collect()
}

/// `__cqt_filter_fft(sr, fmin, n_bins, bins_per_octave, filter_scale=1, norm=1, sparsity=0.01,
/// window='hann', gamma=0)`: the sparse FFT-domain filter bank and its FFT size.
pub fn cqt_filter_fft(
    sr: f64,
    fmin: f64,
    n_bins: usize,
    bins_per_octave: usize,
) -> Result<(SparseBasis, usize), AudioError> {
    let alpha = 2.0f64.powf(1.0 / bins_per_octave as f64) - 1.0;
    let q = 1.0 / alpha;
    let lengths = constant_q_lengths(sr, fmin, n_bins, bins_per_octave);
    let fmax = fmin * 2.0f64.powf((n_bins - 1) as f64 / bins_per_octave as f64);
    if fmax * (1.0 + 0.5 * HANN_BANDWIDTH / q) > sr / 2.0 {
        return Err(AudioError::InvalidFeatures(
            "CQT filter pass-band lies beyond Nyquist".into(),
        ));
    }
    let max_len = lengths.iter().copied().fold(0.0f64, f64::max);
    let n_fft = 2.0f64.powf(max_len.log2().ceil()) as usize;
    let mut planner = FftPlanner::<f64>::new();
    let fft = planner.plan_fft_forward(n_fft);
    let keep = n_fft / 2 + 1;
    let two_pi = 2.0 * std::f64::consts::PI;
    let mut indptr = vec![0usize];
    let mut indices = Vec::new();
    let mut values = Vec::new();
    for (j, &ilen) in lengths.iter().enumerate() {
        let freq = fmin * 2.0f64.powf(j as f64 / bins_per_octave as f64);
        let start = (-ilen / 2.0).floor();
        let stop = (ilen / 2.0).floor();
        let len = (stop - start) as usize;
        let win = hann_periodic(len);
        let inv_sr = 1.0 / sr;
        let sig: Vec<Complex<f64>> = (0..len)
            .map(|m| {
                let t = start + m as f64;
                let phase = (t * 2.0 * std::f64::consts::PI * freq) * inv_sr;
                let (s, c) = phase.sin_cos();
                Complex::new(c * win[m], s * win[m])
            })
            .collect();
        let _ = two_pi;
        let mags: Vec<f64> = sig.iter().map(|c| c.re.hypot(c.im)).collect();
        let l1 = pairwise_sum_f64(&mags);
        let scl = 1.0 / l1;
        // pad_center to n_fft, stored as complex64, then scaled by len/n_fft in complex128.
        let lpad = (n_fft - len) / 2;
        let mut buf = vec![Complex::new(0.0f64, 0.0); n_fft];
        let s = ilen / n_fft as f64;
        for (m, c) in sig.iter().enumerate() {
            let re32 = (c.re * scl) as f32;
            let im32 = (c.im * scl) as f32;
            buf[lpad + m] = Complex::new(
                ((re32 as f64) * s) as f32 as f64,
                ((im32 as f64) * s) as f32 as f64,
            );
        }
        fft.process(&mut buf);
        let row = &buf[..keep];
        // sparsify_rows(quantile=0.01)
        let rmags: Vec<f64> = row.iter().map(|c| c.re.hypot(c.im)).collect();
        let norm = pairwise_sum_f64(&rmags);
        let mut sorted = rmags.clone();
        sorted.sort_unstable_by(|a, b| a.total_cmp(b));
        let mut cum = 0.0f64;
        let mut thr_idx = 0usize;
        let mut found = false;
        for (i, &m) in sorted.iter().enumerate() {
            cum += m / norm;
            if cum >= 0.01 {
                thr_idx = i;
                found = true;
                break;
            }
        }
        if !found {
            thr_idx = 0;
        }
        let thr = sorted[thr_idx];
        for (k, c) in row.iter().enumerate() {
            if rmags[k] >= thr {
                indices.push(k);
                values.push(Complex::new(c.re as f32, c.im as f32));
            }
        }
        indptr.push(indices.len());
    }
    Ok((
        SparseBasis {
            n_rows: n_bins,
            n_cols: keep,
            indptr,
            indices,
            values,
        },
        n_fft,
    ))
}

// ----------------------------------------------------------------------------------------------
// CQT

/// Magnitude of `librosa.cqt(y, sr, hop_length=512, n_bins=n_octaves·36, bins_per_octave=36,
/// tuning)` at sample rates where no early down-sampling happens (3840 Hz): `n_bins × L`.
pub fn cqt_magnitude(y: &[f32], sr: f64, tuning: f64, n_octaves: usize) -> Result<Mat, AudioError> {
    let bpo = BINS_PER_OCTAVE;
    let n_bins = n_octaves * bpo;
    let fmin = c1_hz() * 2.0f64.powf(tuning / bpo as f64);
    // Top-octave frequencies: fmin_t is the lowest of the last 36 bins.
    let fmin_t = (1.0 * fmin) * 2.0f64.powf((n_bins - bpo) as f64 / bpo as f64);
    let hop0 = 512usize;
    if hop0.trailing_zeros() as usize + 1 < n_octaves {
        return Err(AudioError::InvalidFeatures(
            "hop length has too few factors of two for the CQT".into(),
        ));
    }
    let taps = half_band_taps();
    let (basis0, n_fft) = cqt_filter_fft(sr, fmin_t, bpo, bpo)?;
    // The octave signals: y, then repeated 2:1 down-sampling.
    let mut signals: Vec<Vec<f32>> = Vec::with_capacity(n_octaves);
    signals.push(y.to_vec());
    for _ in 1..n_octaves {
        let prev = &signals[signals.len() - 1];
        if prev.len() < 2 {
            return Err(AudioError::InvalidFeatures(format!(
                "input signal length={} is too short for {n_octaves}-octave CQT",
                y.len()
            )));
        }
        let next = resample_half(prev, &taps);
        signals.push(next);
    }
    // The filter bank is the same for every octave (frequencies and rates scale together),
    // multiplied by sqrt(2^i) in complex64 arithmetic.
    let results: Vec<(Vec<Complex<f32>>, usize)> = signals
        .par_iter()
        .enumerate()
        .map(|(i, my_y)| {
            let hop = hop0 >> i;
            let s32 = (2.0f64.powi(i as i32)).sqrt() as f32;
            let d = stft(my_y, n_fft, hop, None);
            let nf = d.n_frames;
            let nb = d.n_bins;
            // bins-major copy so the inner loop is contiguous
            let mut dt = vec![Complex::new(0.0f32, 0.0); nb * nf];
            for f in 0..nf {
                for k in 0..nb {
                    dt[k * nf + f] = d.data[f * nb + k];
                }
            }
            let mut r = vec![Complex::new(0.0f32, 0.0); bpo * nf];
            for j in 0..bpo {
                let (a0, a1) = (basis0.indptr[j], basis0.indptr[j + 1]);
                let out = &mut r[j * nf..(j + 1) * nf];
                for nz in a0..a1 {
                    let col = basis0.indices[nz];
                    let v = basis0.values[nz];
                    let a = if i == 0 {
                        v
                    } else {
                        Complex::new(v.re * s32, v.im * s32)
                    };
                    let xs = &dt[col * nf..(col + 1) * nf];
                    for (o, x) in out.iter_mut().zip(xs) {
                        let re = a.re * x.re - a.im * x.im;
                        let im = a.re * x.im + a.im * x.re;
                        o.re += re;
                        o.im += im;
                    }
                }
            }
            (r, nf)
        })
        .collect();
    let frames: Vec<usize> = results.iter().map(|r| r.1).collect();
    let responses: Vec<Vec<Complex<f32>>> = results.into_iter().map(|r| r.0).collect();
    let max_col = frames.iter().copied().min().unwrap_or(0);
    let lengths = constant_q_lengths(sr, fmin, n_bins, bpo);
    let mut out = Mat::zeros(n_bins, max_col);
    for (i, r) in responses.iter().enumerate() {
        let nf = frames[i];
        // octave i occupies rows n_bins - (i+1)·36 .. n_bins - i·36
        let row0 = n_bins - (i + 1) * bpo;
        for j in 0..bpo {
            let row = row0 + j;
            let scl = 1.0 / lengths[row].sqrt();
            for f in 0..max_col {
                let c = r[j * nf + f];
                let re = (c.re as f64 * scl) as f32;
                let im = (c.im as f64 * scl) as f32;
                out.data[row * max_col + f] = re.hypot(im);
            }
        }
    }
    Ok(out)
}

/// `cq_to_chroma(n_input, bins_per_octave=36, n_chroma=12)` applied to a CQT magnitude, then
/// `normalize(norm=inf, axis=0)`: `12 × L`, C first.
pub fn chroma_from_cqt(cmag: &Mat) -> Mat {
    let n_input = cmag.rows;
    let l = cmag.cols;
    let bpo = BINS_PER_OCTAVE as isize;
    let n_merge = BINS_PER_OCTAVE / 12;
    let mut chroma = Mat::zeros(12, l);
    for c in 0..12usize {
        let mut bins: Vec<usize> = Vec::new();
        for b in 0..n_input {
            let within = (b as isize).rem_euclid(bpo);
            // np.roll(repeat(eye(12), 3), -1): column j belongs to chroma ((j + 1) mod 36) / 3
            let owner = ((within + (n_merge / 2) as isize).rem_euclid(bpo)) as usize / n_merge;
            if owner == c {
                bins.push(b);
            }
        }
        for f in 0..l {
            let mut acc = 0.0f32;
            for &b in &bins {
                acc += cmag.data[b * l + f];
            }
            chroma.data[c * l + f] = acc.max(0.0);
        }
    }
    for f in 0..l {
        let mut m = 0.0f64;
        for c in 0..12 {
            m = m.max((chroma.data[c * l + f] as f64).abs());
        }
        if m < TINY_F32 as f64 {
            m = 1.0;
        }
        for c in 0..12 {
            let v = &mut chroma.data[c * l + f];
            *v = (*v as f64 / m) as f32;
        }
    }
    chroma
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn kaiser_table_endpoints() {
        assert!((kaiser_fast_table_at(0) - KAISER_FAST_ROLLOFF).abs() < 1e-15);
        let taps = half_band_taps();
        assert_eq!(taps.len(), 49);
    }
    #[test]
    fn chroma_c_bins() {
        // C sums bins {0, 1, 35, 36, 37, ...}
        let mut m = Mat::zeros(180, 1);
        m.data[35] = 1.0;
        let c = chroma_from_cqt(&m);
        assert_eq!(c.data[0], 1.0);
        for k in 1..12 {
            assert_eq!(c.data[k], 0.0);
        }
    }
}
