//! Onset strength, tempogram, tempo and beat tracking, and `peak_pick`, as librosa 0.8.1
//! (reference §1.8–§1.10).

use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

use crate::mel::{mel_filterbank, mel_power, power_to_db_ref_one};
use crate::stft::stft;
use crate::util::{
    hann_periodic, hann_symmetric, median_f32, median_f64, pairwise_sum_f32, pairwise_sum_f64,
    round_half_even, Mat64, TINY_F64,
};

/// `librosa.onset.onset_strength(y, sr, aggregate=np.median)` with the default mel feature
/// (`fmax = 11025` whatever the sample rate), lag 1, max_size 1, centred.
pub fn onset_strength(y: &[f32], sr: f64) -> Vec<f32> {
    let n_fft = 2048usize;
    let hop = 512usize;
    let w = hann_periodic(n_fft);
    let spec = stft(y, n_fft, hop, Some(&w));
    let bank = mel_filterbank(sr, n_fft, 128, 0.0, 11025.0);
    let mut s = mel_power(&spec, &bank);
    power_to_db_ref_one(&mut s);
    let nf = s.cols;
    let nb = s.rows;
    let pad = 1 + n_fft / (2 * hop);
    let mut onset = vec![0.0f32; nf];
    let mut col = vec![0.0f32; nb];
    for j in 0..nf.saturating_sub(1) {
        let f = j + pad;
        if f >= nf {
            break;
        }
        for (b, c) in col.iter_mut().enumerate() {
            let d = s.data[b * nf + j + 1] - s.data[b * nf + j];
            *c = 0.0f32.max(d);
        }
        onset[f] = median_f32(&mut col);
    }
    onset
}

/// `librosa.feature.tempogram(onset_envelope, win_length, center=True, window='hann',
/// norm=np.inf)`: `win_length × n` float64.
pub fn tempogram(onset: &[f32], win_length: usize) -> Mat64 {
    let n = onset.len();
    let mut out = Mat64::zeros(win_length, n);
    if n == 0 || win_length == 0 {
        return out;
    }
    let half = win_length / 2;
    // np.pad(mode='linear_ramp', end_values=0), float32
    let mut padded = vec![0.0f32; n + 2 * half];
    let e0 = onset[0] as f64;
    let en = onset[n - 1] as f64;
    let step_l = e0 / half as f64;
    let step_r = en / half as f64;
    for i in 0..half {
        padded[i] = ramp_value(i, half, e0, step_l);
        padded[n + 2 * half - 1 - i] = ramp_value(i, half, en, step_r);
    }
    padded[half..half + n].copy_from_slice(onset);
    let win = hann_periodic(win_length);
    let n_fft = 2 * win_length + 1;
    let mut planner = FftPlanner::<f64>::new();
    let fwd = planner.plan_fft_forward(n_fft);
    let inv = planner.plan_fft_inverse(n_fft);
    let mut buf = vec![Complex::new(0.0f64, 0.0); n_fft];
    let mut col = vec![0.0f64; win_length];
    for f in 0..n {
        let frame = &padded[f..f + win_length];
        if frame.iter().all(|&v| v == 0.0) {
            continue; // all-zero autocorrelation, left as zeros (normalised by 1)
        }
        for b in buf.iter_mut() {
            *b = Complex::new(0.0, 0.0);
        }
        for j in 0..win_length {
            buf[j] = Complex::new(frame[j] as f64 * win[j], 0.0);
        }
        fwd.process(&mut buf);
        for b in buf.iter_mut() {
            let a = b.re.hypot(b.im);
            *b = Complex::new(a * a, 0.0);
        }
        inv.process(&mut buf);
        let scale = 1.0 / n_fft as f64;
        let mut m = 0.0f64;
        for j in 0..win_length {
            col[j] = buf[j].re * scale;
            m = m.max(col[j].abs());
        }
        if m < TINY_F64 {
            m = 1.0;
        }
        for j in 0..win_length {
            out.data[j * n + f] = col[j] / m;
        }
    }
    out
}

/// Value `i` (0-based, from the outside in) of numpy's `linear_ramp` pad of width `width`
/// towards edge value `edge`, stored as float32.
fn ramp_value(i: usize, width: usize, edge: f64, step: f64) -> f32 {
    let _ = width;
    if step == 0.0 {
        ((i as f64 / width as f64) * edge) as f32
    } else {
        (i as f64 * step + 0.0) as f32
    }
}

/// `librosa.beat.tempo(onset_envelope, sr, hop_length=512, start_bpm=120)`: the tempo in BPM.
pub fn tempo(onset: &[f32], sr: f64, hop: usize) -> f64 {
    let win = ((8.0 * sr) as i64 / hop as i64).max(1) as usize; // time_to_frames(8.0)
    let tg = tempogram(onset, win);
    let n = tg.cols;
    let mut best = 0usize;
    let mut best_score = f64::NEG_INFINITY;
    let bpms: Vec<f64> = (0..win)
        .map(|k| {
            if k == 0 {
                f64::INFINITY
            } else {
                60.0 * sr / (hop as f64 * k as f64)
            }
        })
        .collect();
    let max_idx = bpms.iter().position(|&b| b < 320.0).unwrap_or(0);
    for k in 0..win {
        let mean = if n > 0 {
            pairwise_sum_f64(&tg.data[k * n..(k + 1) * n]) / n as f64
        } else {
            f64::NAN
        };
        let logprior = if k < max_idx {
            f64::NEG_INFINITY
        } else {
            let d = (bpms[k].log2() - 120.0f64.log2()) / 1.0;
            -0.5 * d * d
        };
        let score = (1e6 * mean).ln_1p() + logprior;
        if score > best_score {
            best_score = score;
            best = k;
        }
    }
    bpms[best]
}

/// `librosa.beat.beat_track(onset_envelope, sr, hop_length=512)`: beat frame indices (trimmed).
pub fn beat_track(onset: &[f32], sr: f64, hop: usize) -> Vec<usize> {
    if !onset.iter().any(|&v| v != 0.0) {
        return Vec::new();
    }
    let bpm = tempo(onset, sr, hop);
    if bpm.is_nan() || bpm <= 0.0 || !bpm.is_finite() {
        return Vec::new();
    }
    let fft_res = sr / hop as f64;
    let period = round_half_even(60.0 * fft_res / bpm) as i64;
    if period <= 0 {
        return Vec::new();
    }
    let localscore = beat_local_score(onset, period);
    let (backlink, cumscore) = beat_track_dp(&localscore, period, 100.0);
    let Some(last) = last_beat(&cumscore) else {
        return Vec::new();
    };
    let mut beats = vec![last];
    loop {
        let b = backlink[*beats.last().unwrap_or(&0)];
        if b < 0 {
            break;
        }
        beats.push(b as usize);
    }
    beats.reverse();
    trim_beats(&localscore, &beats)
}

fn beat_local_score(onset: &[f32], period: i64) -> Vec<f64> {
    // onsets / std(onsets, ddof=1) in float32
    let n = onset.len();
    let norm = if n > 1 {
        let mean = pairwise_sum_f32(onset) / n as f32;
        let sq: Vec<f32> = onset
            .iter()
            .map(|&v| {
                let d = v - mean;
                d * d
            })
            .collect();
        (pairwise_sum_f32(&sq) / (n - 1) as f32).sqrt()
    } else {
        f32::NAN
    };
    let x: Vec<f32> = if norm > 0.0 {
        onset.iter().map(|&v| v / norm).collect()
    } else {
        onset.to_vec()
    };
    let p = period as f64;
    let window: Vec<f64> = (-period..=period)
        .map(|m| {
            let a = m as f64 * 32.0 / p;
            (-0.5 * a * a).exp()
        })
        .collect();
    convolve_same(&x, &window)
}

/// `scipy.signal.convolve(x, h, 'same')` for 1-D inputs (output length `len(x)`).
fn convolve_same(x: &[f32], h: &[f64]) -> Vec<f64> {
    let n = x.len() as isize;
    let m = h.len() as isize;
    let off = (m - 1) / 2;
    (0..n)
        .map(|j| {
            let t = j + off; // index into the full convolution
            let mut acc = 0.0f64;
            for k in 0..m {
                let i = t - k;
                if i >= 0 && i < n {
                    acc += x[i as usize] as f64 * h[k as usize];
                }
            }
            acc
        })
        .collect()
}

fn convolve_same_f64(x: &[f64], h: &[f64]) -> Vec<f64> {
    let n = x.len() as isize;
    let m = h.len() as isize;
    let off = (m - 1) / 2;
    (0..n)
        .map(|j| {
            let t = j + off;
            let mut acc = 0.0f64;
            for k in 0..m {
                let i = t - k;
                if i >= 0 && i < n {
                    acc += x[i as usize] * h[k as usize];
                }
            }
            acc
        })
        .collect()
}

fn beat_track_dp(localscore: &[f64], period: i64, tightness: f64) -> (Vec<i64>, Vec<f64>) {
    let n = localscore.len();
    let mut backlink = vec![0i64; n];
    let mut cumscore = vec![0.0f64; n];
    let w_start = -2 * period;
    let w_stop = -(round_half_even(period as f64 / 2.0) as i64) + 1;
    let mut window: Vec<i64> = (w_start..w_stop).collect();
    let p = period as f64;
    let txwt: Vec<f64> = window
        .iter()
        .map(|&w| {
            let l = (-(w as f64) / p).ln();
            -tightness * (l * l)
        })
        .collect();
    let max_local = localscore.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut first_beat = true;
    for i in 0..n {
        let lw = window.len();
        let z_pad = if lw == 0 {
            0
        } else {
            (-window[0]).min(lw as i64).max(0) as usize
        };
        let mut best = 0usize;
        let mut best_v = f64::NEG_INFINITY;
        for j in 0..lw {
            let mut c = txwt[j];
            if j >= z_pad {
                let idx = window[j];
                let v = if idx >= 0 && (idx as usize) < n {
                    cumscore[idx as usize]
                } else if idx < 0 && ((-idx) as usize) <= n {
                    cumscore[(n as i64 + idx) as usize]
                } else {
                    0.0
                };
                c += v;
            }
            if c > best_v || (j == 0 && best_v == f64::NEG_INFINITY && c.is_nan()) {
                best_v = c;
                best = j;
            }
        }
        let score_i = localscore[i];
        cumscore[i] = score_i + if lw > 0 { best_v } else { 0.0 };
        if first_beat && score_i < 0.01 * max_local {
            backlink[i] = -1;
        } else {
            backlink[i] = if lw > 0 { window[best] } else { -1 };
            first_beat = false;
        }
        for w in window.iter_mut() {
            *w += 1;
        }
    }
    (backlink, cumscore)
}

fn localmax_f64(x: &[f64]) -> Vec<bool> {
    let n = x.len();
    (0..n)
        .map(|i| {
            let left = if i == 0 { x[0] } else { x[i - 1] };
            let right = if i + 1 == n { x[n - 1] } else { x[i + 1] };
            x[i] > left && x[i] >= right
        })
        .collect()
}

fn last_beat(cumscore: &[f64]) -> Option<usize> {
    let maxes = localmax_f64(cumscore);
    let mut at_max: Vec<f64> = cumscore
        .iter()
        .zip(&maxes)
        .filter(|(_, &m)| m)
        .map(|(&v, _)| v)
        .collect();
    let med = median_f64(&mut at_max);
    (0..cumscore.len())
        .rev()
        .find(|&i| cumscore[i] * (maxes[i] as u8 as f64) * 2.0 > med)
}

fn trim_beats(localscore: &[f64], beats: &[usize]) -> Vec<usize> {
    let vals: Vec<f64> = beats.iter().map(|&b| localscore[b]).collect();
    let smooth = convolve_same_f64(&vals, &hann_symmetric(5));
    let sq: Vec<f64> = smooth.iter().map(|v| v * v).collect();
    let mean = if sq.is_empty() {
        0.0
    } else {
        pairwise_sum_f64(&sq) / sq.len() as f64
    };
    let threshold = 0.5 * mean.sqrt();
    let valid: Vec<usize> = (0..smooth.len())
        .filter(|&i| smooth[i] > threshold)
        .collect();
    match (valid.first(), valid.last()) {
        (Some(&a), Some(&b)) => beats[a..b].to_vec(),
        _ => Vec::new(),
    }
}

/// `librosa.util.peak_pick(x, pre_max, post_max, pre_avg, post_avg, delta, wait)`.
pub fn peak_pick(
    x: &[f32],
    pre_max: usize,
    post_max: usize,
    pre_avg: usize,
    post_avg: usize,
    delta: f32,
    wait: usize,
) -> Vec<usize> {
    let n = x.len();
    if n == 0 {
        return Vec::new();
    }
    let xmin = x.iter().copied().fold(f32::INFINITY, f32::min);
    // maximum_filter1d(size=pre+post, mode='constant', cval=min, origin=ceil((pre-post)/2))
    let max_len = pre_max + post_max;
    let max_origin = (0.5 * (pre_max as f64 - post_max as f64)).ceil() as isize;
    let size1 = (max_len / 2) as isize;
    let size2 = max_len as isize - size1 - 1;
    let mov_max: Vec<f32> = (0..n as isize)
        .map(|i| {
            let mut m = f32::NEG_INFINITY;
            for j in (i - size1 - max_origin)..=(i + size2 - max_origin) {
                let v = if j < 0 || j >= n as isize {
                    xmin
                } else {
                    x[j as usize]
                };
                m = m.max(v);
            }
            m
        })
        .collect();
    // uniform_filter1d(size=pre+post, mode='nearest', origin=ceil((pre-post)/2))
    let avg_len = pre_avg + post_avg;
    let avg_origin = (0.5 * (pre_avg as f64 - post_avg as f64)).ceil() as isize;
    let s1 = (avg_len / 2) as isize;
    let s2 = avg_len as isize - s1 - 1;
    let mut mov_avg: Vec<f32> = (0..n as isize)
        .map(|i| {
            let mut acc = 0.0f64;
            for j in (i - s1 - avg_origin)..=(i + s2 - avg_origin) {
                acc += x[j.clamp(0, n as isize - 1) as usize] as f64;
            }
            (acc / avg_len as f64) as f32
        })
        .collect();
    let mean_range = |a: usize, b: usize| -> f32 {
        let b = b.min(n);
        if b <= a {
            return f32::NAN;
        }
        pairwise_sum_f32(&x[a..b]) / (b - a) as f32
    };
    let mut i = 0usize;
    while i < pre_avg && i < n {
        mov_avg[i] = mean_range(i.saturating_sub(pre_avg), i + post_avg);
        i += 1;
    }
    let mut i = n.saturating_sub(post_avg);
    while i < n {
        mov_avg[i] = mean_range(i.saturating_sub(pre_avg), i + post_avg);
        i += 1;
    }
    let mut peaks = Vec::new();
    let mut last: Option<usize> = None;
    for i in 0..n {
        let det = if x[i] == mov_max[i] { x[i] } else { 0.0 };
        let det = if det >= mov_avg[i] + delta { det } else { 0.0 };
        if det != 0.0 {
            let ok = match last {
                None => true,
                Some(l) => i > l + wait,
            };
            if ok {
                peaks.push(i);
                last = Some(i);
            }
        }
    }
    peaks
}
