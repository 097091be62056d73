//! MFCC (orthonormal DCT-II) and ΔMFCC (savgol width 3, interp edges) (reference §1.4, §1.5).

use crate::util::Mat;
use crate::AudioError;

/// `librosa.feature.mfcc(S=melspe_db, n_mfcc, dct_type=2, norm='ortho')`.
pub fn mfcc(melspe_db: &Mat, n_mfcc: usize) -> Mat {
    let n = melspe_db.rows;
    let frames = melspe_db.cols;
    let nf = n as f64;
    let mut basis = vec![0.0f64; n_mfcc * n];
    for k in 0..n_mfcc {
        let scale = if k == 0 {
            (1.0 / nf).sqrt()
        } else {
            (2.0 / nf).sqrt()
        };
        for i in 0..n {
            basis[k * n + i] =
                scale * (std::f64::consts::PI * k as f64 * (2 * i + 1) as f64 / (2.0 * nf)).cos();
        }
    }
    let mut out = Mat::zeros(n_mfcc, frames);
    let t = melspe_db.transpose(); // frames × n
    for f in 0..frames {
        let col = t.row(f);
        for k in 0..n_mfcc {
            let b = &basis[k * n..(k + 1) * n];
            let mut acc = 0.0f64;
            for (x, c) in col.iter().zip(b) {
                acc += *x as f64 * c;
            }
            out.data[k * frames + f] = acc as f32;
        }
    }
    out
}

/// Centre tap of `scipy.signal.savgol_coeffs(3, 1, deriv=1)`.
const SAVGOL_CENTRE: f64 = 2.7755575615628914e-17;

/// `librosa.feature.delta(data, width=3, order=1, axis=-1, mode='interp')` along each row.
pub fn delta_width3(data: &Mat) -> Result<Mat, AudioError> {
    let n = data.cols;
    if n < 3 {
        return Err(AudioError::InvalidFeatures(format!(
            "delta with width 3 needs at least 3 frames, got {n}"
        )));
    }
    let mut out = Mat::zeros(data.rows, n);
    for r in 0..data.rows {
        let x = data.row(r);
        let o = out.row_mut(r);
        for i in 1..n - 1 {
            // scipy.ndimage correlate1d, antisymmetric kernel path, in double precision.
            let v = x[i] as f64 * SAVGOL_CENTRE + (x[i + 1] as f64 - x[i - 1] as f64) * 0.5;
            o[i] = v as f32;
        }
        // polyfit of a line to the 3 edge samples, derivative = slope.
        o[0] = ((x[2] as f64 - x[0] as f64) * 0.5) as f32;
        o[n - 1] = ((x[n - 1] as f64 - x[n - 3] as f64) * 0.5) as f32;
    }
    Ok(out)
}
