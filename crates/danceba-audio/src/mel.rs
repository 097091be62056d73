//! Slaney mel filterbank, mel power spectrogram and `power_to_db` (reference §1.3, §1.8).

use crate::stft::Stft;
use crate::util::{linspace, Mat};

const F_SP: f64 = 200.0 / 3.0;
const MIN_LOG_HZ: f64 = 1000.0;

fn min_log_mel() -> f64 {
    (MIN_LOG_HZ - 0.0) / F_SP
}
fn logstep() -> f64 {
    6.4f64.ln() / 27.0
}

/// `librosa.hz_to_mel(f, htk=False)` (Slaney scale).
pub fn hz_to_mel(f: f64) -> f64 {
    if f >= MIN_LOG_HZ {
        min_log_mel() + (f / MIN_LOG_HZ).ln() / logstep()
    } else {
        (f - 0.0) / F_SP
    }
}

/// `librosa.mel_to_hz(m, htk=False)` (Slaney scale).
pub fn mel_to_hz(m: f64) -> f64 {
    if m >= min_log_mel() {
        MIN_LOG_HZ * (logstep() * (m - min_log_mel())).exp()
    } else {
        0.0 + F_SP * m
    }
}

/// A mel filterbank: `n_mels × n_bins` float32 weights plus the non-zero bin range of each row.
#[derive(Clone, Debug)]
pub struct MelBank {
    pub weights: Mat,
    pub ranges: Vec<(usize, usize)>,
}

/// `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm='slaney', dtype=float32)`.
pub fn mel_filterbank(sr: f64, n_fft: usize, n_mels: usize, fmin: f64, fmax: f64) -> MelBank {
    let n_bins = 1 + n_fft / 2;
    let fftfreqs = linspace(0.0, sr / 2.0, n_bins);
    let mels = linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2);
    let mel_f: Vec<f64> = mels.iter().map(|&m| mel_to_hz(m)).collect();
    let fdiff: Vec<f64> = mel_f.windows(2).map(|w| w[1] - w[0]).collect();
    let mut weights = Mat::zeros(n_mels, n_bins);
    let mut ranges = Vec::with_capacity(n_mels);
    for i in 0..n_mels {
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        let row = weights.row_mut(i);
        let mut lo = usize::MAX;
        let mut hi = 0;
        for (k, &fk) in fftfreqs.iter().enumerate() {
            let lower = -(mel_f[i] - fk) / fdiff[i];
            let upper = (mel_f[i + 2] - fk) / fdiff[i + 1];
            let w = 0.0f64.max(lower.min(upper)) as f32;
            let w = (w as f64 * enorm) as f32;
            row[k] = w;
            if w != 0.0 {
                lo = lo.min(k);
                hi = k + 1;
            }
        }
        ranges.push(if lo == usize::MAX { (0, 0) } else { (lo, hi) });
    }
    MelBank { weights, ranges }
}

/// `mel_basis · |X|²`: the mel power spectrogram, `n_mels × n_frames`.
pub fn mel_power(spec: &Stft, bank: &MelBank) -> Mat {
    let n_mels = bank.weights.rows;
    let mut out = Mat::zeros(n_mels, spec.n_frames);
    let mut power = vec![0.0f32; spec.n_bins];
    for f in 0..spec.n_frames {
        for (p, c) in power.iter_mut().zip(spec.frame(f)) {
            let a = c.re.hypot(c.im);
            *p = a * a;
        }
        for m in 0..n_mels {
            let (lo, hi) = bank.ranges[m];
            let w = &bank.weights.row(m)[lo..hi];
            let mut acc = 0.0f64;
            for (wk, pk) in w.iter().zip(&power[lo..hi]) {
                acc += *wk as f64 * *pk as f64;
            }
            out.data[m * spec.n_frames + f] = acc as f32;
        }
    }
    out
}

/// `librosa.power_to_db(S, ref=np.max, amin=1e-10, top_db=80)` (float32 arithmetic).
pub fn power_to_db_ref_max(s: &mut Mat) {
    let maxv = s.data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let ref_db = (10.0 * (maxv as f64).max(1e-10).log10()) as f32;
    power_to_db_impl(s, ref_db);
}

/// `librosa.power_to_db(S, ref=1.0, amin=1e-10, top_db=80)` (float32 arithmetic).
pub fn power_to_db_ref_one(s: &mut Mat) {
    power_to_db_impl(s, 0.0);
}

fn power_to_db_impl(s: &mut Mat, ref_db: f32) {
    let amin = 1e-10f32;
    let mut top = f32::NEG_INFINITY;
    for v in s.data.iter_mut() {
        let d = 10.0f32 * v.max(amin).log10() - ref_db;
        *v = d;
        top = top.max(d);
    }
    let floor = top - 80.0f32;
    for v in s.data.iter_mut() {
        *v = v.max(floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn slaney_scale_points() {
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
        assert!((mel_to_hz(hz_to_mel(1920.0)) - 1920.0).abs() < 1e-9);
        assert!((hz_to_mel(1920.0) - 24.488121).abs() < 1e-5);
    }
    #[test]
    fn onset_bank_has_empty_upper_filters() {
        let b = mel_filterbank(3840.0, 2048, 128, 0.0, 11025.0);
        assert!(b.ranges[..64].iter().all(|r| r.1 > r.0));
        assert!(b.ranges[64..].iter().all(|r| r.1 == r.0));
    }
}
