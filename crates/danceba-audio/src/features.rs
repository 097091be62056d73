//! The 438-column feature matrix (reference §1.11), its stages, and the condition rule (§2).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cqt::{chroma_from_cqt, cqt_magnitude, estimate_tuning, N_OCTAVES};
use crate::hpss::hpss_from_stft;
use crate::mel::{mel_filterbank, mel_power, power_to_db_ref_max};
use crate::mfcc::{delta_width3, mfcc};
use crate::rhythm::{beat_track, onset_strength, peak_pick, tempogram};
use crate::stft::stft;
use crate::util::{hann_periodic, Mat, Mat64};
use crate::AudioError;

/// Width of a feature row: 20 MFCC + 20 ΔMFCC + 12 chroma + 1 onset + 1 beat + 384 tempogram.
pub const FEATURE_DIM: usize = 438;
/// Sample rate of the audio the features are computed from.
pub const SAMPLE_RATE: f32 = 3840.0;
/// Hop between feature frames (samples at 3840 Hz): 7.5 frames per second.
pub const HOP: usize = 512;
/// Number of MFCC coefficients.
pub const N_MFCC: usize = 20;
/// Tempogram window (lags).
pub const TEMPOGRAM_WIN: usize = 384;
/// The shortest input the reference pipeline accepts: 3 frames (ΔMFCC with width 3 needs 3).
pub const MIN_SAMPLES: usize = 2 * HOP;

/// Column ranges of the feature matrix.
pub mod columns {
    use std::ops::Range;
    pub const MFCC: Range<usize> = 0..20;
    pub const MFCC_DELTA: Range<usize> = 20..40;
    pub const CHROMA: Range<usize> = 40..52;
    pub const ONSET: usize = 52;
    pub const BEAT: usize = 53;
    pub const TEMPOGRAM: Range<usize> = 54..438;
}

/// Number of feature rows for `n` samples at 3840 Hz: `1 + n / 512`.
pub fn frame_count(n_samples: usize) -> usize {
    1 + n_samples / HOP
}

/// Every stage of the extraction, named as the golden keys.
#[derive(Clone, Debug)]
pub struct FeatureStages {
    pub audio_3840hz: Vec<f32>,
    /// 128 × L
    pub melspe_db: Mat,
    /// 20 × L
    pub mfcc: Mat,
    /// 20 × L
    pub mfcc_delta: Mat,
    pub harmonic: Vec<f32>,
    pub percussive: Vec<f32>,
    /// 12 × L
    pub chroma_cqt: Mat,
    /// 180 × L
    pub cqt_mag: Mat,
    pub tuning: f64,
    /// L
    pub onset_env: Vec<f32>,
    /// 384 × L, float64 as in the reference
    pub tempogram: Mat64,
    /// L (0/1)
    pub beats_onehot: Vec<f32>,
    /// L (0/1); computed by the reference and discarded
    pub peaks_onehot: Vec<f32>,
    /// L × 438
    pub features: MusicFeatures,
}

/// Check the audio is usable: finite samples and at least [`MIN_SAMPLES`].
pub fn validate_audio(audio: &[f32]) -> Result<(), AudioError> {
    if let Some(index) = audio.iter().position(|v| !v.is_finite()) {
        return Err(AudioError::NonFinite { index });
    }
    if audio.len() < MIN_SAMPLES {
        return Err(AudioError::TooShort {
            samples: audio.len(),
            seconds: audio.len() as f64 / SAMPLE_RATE as f64,
            min_samples: MIN_SAMPLES,
            min_seconds: MIN_SAMPLES as f64 / SAMPLE_RATE as f64,
        });
    }
    Ok(())
}

/// `extractor.get_melspectrogram`: `power_to_db(melspectrogram(y, sr), ref=np.max)`.
pub fn melspectrogram_db(audio: &[f32], sr: f64) -> Mat {
    let w = hann_periodic(2048);
    let spec = stft(audio, 2048, HOP, Some(&w));
    melspectrogram_db_from_stft(&spec, sr)
}

/// [`melspectrogram_db`] from the signal's STFT (2048/512/hann, centred).
pub fn melspectrogram_db_from_stft(spec: &crate::stft::Stft, sr: f64) -> Mat {
    let bank = mel_filterbank(sr, 2048, 128, 0.0, sr / 2.0);
    let mut m = mel_power(spec, &bank);
    power_to_db_ref_max(&mut m);
    m
}

/// Runs the official extractor on mono 3840 Hz audio, keeping every stage.
pub fn extract_features(audio_3840: &[f32]) -> Result<FeatureStages, AudioError> {
    validate_audio(audio_3840)?;
    let sr = SAMPLE_RATE as f64;
    let l = frame_count(audio_3840.len());
    // melspectrogram and HPSS share the same STFT (2048/512/hann, centred, reflect).
    let spec = stft(audio_3840, 2048, HOP, Some(&hann_periodic(2048)));
    let (melspe_db, (harmonic, percussive)) = rayon::join(
        || melspectrogram_db_from_stft(&spec, sr),
        || hpss_from_stft(&spec, audio_3840.len()),
    );
    drop(spec);
    let mfcc_m = mfcc(&melspe_db, N_MFCC);
    let mfcc_delta = delta_width3(&mfcc_m)?;
    let (cqt_res, onset_env) = rayon::join(
        || -> Result<(f64, Mat), AudioError> {
            let tuning = estimate_tuning(&harmonic, sr);
            let cmag = cqt_magnitude(&harmonic, sr, tuning, N_OCTAVES)?;
            Ok((tuning, cmag))
        },
        || onset_strength(&percussive, sr),
    );
    let (tuning, cqt_mag) = cqt_res?;
    let chroma = chroma_from_cqt(&cqt_mag);
    let tg = tempogram(&onset_env, TEMPOGRAM_WIN);
    let beats = beat_track(&onset_env, sr, HOP);
    let peaks = peak_pick(&onset_env, 3, 3, 3, 5, 0.5, 10);
    let mut beats_onehot = vec![0.0f32; onset_env.len()];
    for &b in &beats {
        if let Some(v) = beats_onehot.get_mut(b) {
            *v = 1.0;
        }
    }
    let mut peaks_onehot = vec![0.0f32; onset_env.len()];
    for &p in &peaks {
        if let Some(v) = peaks_onehot.get_mut(p) {
            *v = 1.0;
        }
    }
    for (name, cols) in [
        ("melspe_db", melspe_db.cols),
        ("mfcc", mfcc_m.cols),
        ("chroma_cqt", chroma.cols),
        ("onset_env", onset_env.len()),
        ("tempogram", tg.cols),
    ] {
        if cols != l {
            return Err(AudioError::InvalidFeatures(format!(
                "stage {name} has {cols} frames, expected {l}"
            )));
        }
    }
    let mut data = vec![0.0f32; l * FEATURE_DIM];
    for f in 0..l {
        let row = &mut data[f * FEATURE_DIM..(f + 1) * FEATURE_DIM];
        for k in 0..N_MFCC {
            row[columns::MFCC.start + k] = mfcc_m.get(k, f);
            row[columns::MFCC_DELTA.start + k] = mfcc_delta.get(k, f);
        }
        for c in 0..12 {
            row[columns::CHROMA.start + c] = chroma.get(c, f);
        }
        row[columns::ONSET] = onset_env[f];
        row[columns::BEAT] = beats_onehot[f];
        for k in 0..TEMPOGRAM_WIN {
            row[columns::TEMPOGRAM.start + k] = tg.get(k, f) as f32;
        }
    }
    Ok(FeatureStages {
        audio_3840hz: audio_3840.to_vec(),
        melspe_db,
        mfcc: mfcc_m,
        mfcc_delta,
        harmonic,
        percussive,
        chroma_cqt: chroma,
        cqt_mag,
        tuning,
        onset_env,
        tempogram: tg,
        beats_onehot,
        peaks_onehot,
        features: MusicFeatures { rows: l, data },
    })
}

/// Decode, mix, resample and extract: the whole official pre-processing of one file.
pub fn features_from_file(path: &Path) -> Result<MusicFeatures, AudioError> {
    let audio = crate::decode::load_mono_3840(path)?;
    Ok(extract_features(&audio)?.features)
}

/// Like [`features_from_file`] but keeping every stage.
pub fn stages_from_file(path: &Path) -> Result<FeatureStages, AudioError> {
    let audio = crate::decode::load_mono_3840(path)?;
    extract_features(&audio)
}

/// The `L × 438` feature matrix (row-major float32), 7.5 rows per second.
#[derive(Clone, Debug, PartialEq)]
pub struct MusicFeatures {
    pub rows: usize,
    pub data: Vec<f32>,
}

/// The GPT condition: `L × 438` float32 (reference §2).
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub rows: usize,
    pub data: Vec<f32>,
}

impl MusicFeatures {
    /// Build from row-major data, checking the shape.
    pub fn new(rows: usize, data: Vec<f32>) -> Result<Self, AudioError> {
        if data.len() != rows * FEATURE_DIM {
            return Err(AudioError::InvalidFeatures(format!(
                "{} values do not make {rows} rows of {FEATURE_DIM}",
                data.len()
            )));
        }
        Ok(MusicFeatures { rows, data })
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * FEATURE_DIM..(r + 1) * FEATURE_DIM]
    }

    /// The official loader appends one copy of the last row and the model drops row 0:
    /// `cond[k] = row[k+1]` for k < L−1 and `cond[L−1] = row[L−1]`.
    pub fn condition(&self) -> Condition {
        if self.rows == 0 {
            return Condition {
                rows: 0,
                data: Vec::new(),
            };
        }
        let mut data = Vec::with_capacity(self.data.len());
        data.extend_from_slice(&self.data[FEATURE_DIM..]);
        data.extend_from_slice(self.row(self.rows - 1));
        Condition {
            rows: self.rows,
            data,
        }
    }

    /// Read an official feature JSON (`{"id": ..., "music_array": [[438 numbers] × L]}`).
    /// Values are parsed as f64 and rounded to f32, as the model does.
    pub fn from_official_json(path: &Path) -> Result<Self, AudioError> {
        let bytes = std::fs::read(path).map_err(|source| AudioError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let fmt = |detail: String| AudioError::Format {
            path: path.to_path_buf(),
            detail,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| fmt(format!("not valid JSON: {e}")))?;
        let arr = v
            .get("music_array")
            .and_then(|a| a.as_array())
            .ok_or_else(|| {
                fmt("no \"music_array\" list (expected the official feature layout)".into())
            })?;
        let mut data = Vec::with_capacity(arr.len() * FEATURE_DIM);
        for (i, row) in arr.iter().enumerate() {
            let row = row
                .as_array()
                .ok_or_else(|| fmt(format!("music_array[{i}] is not a list")))?;
            if row.len() != FEATURE_DIM {
                return Err(fmt(format!(
                    "music_array[{i}] has {} values, expected {FEATURE_DIM}",
                    row.len()
                )));
            }
            for (j, x) in row.iter().enumerate() {
                let x = x
                    .as_f64()
                    .ok_or_else(|| fmt(format!("music_array[{i}][{j}] is not a number")))?;
                data.push(x as f32);
            }
        }
        MusicFeatures::new(arr.len(), data)
    }

    /// The official JSON layout as a string.
    pub fn to_json_string(&self, id: &str) -> String {
        let mut s = String::with_capacity(self.data.len() * 12);
        s.push_str("{\"id\": ");
        s.push_str(&serde_json::Value::String(id.to_string()).to_string());
        s.push_str(", \"music_array\": [");
        for r in 0..self.rows {
            if r > 0 {
                s.push_str(", ");
            }
            s.push('[');
            for (j, &v) in self.row(r).iter().enumerate() {
                if j > 0 {
                    s.push_str(", ");
                }
                let x = v as f64;
                if x == x.trunc() && x.abs() < 1e16 {
                    s.push_str(&format!("{x:.1}"));
                } else {
                    s.push_str(&format!("{x:?}"));
                }
            }
            s.push(']');
        }
        s.push_str("]}");
        s
    }

    /// `.npy` bytes: `<f4`, shape (L, 438), C order.
    pub fn to_npy_bytes(&self) -> Vec<u8> {
        npy_bytes_f32(&[self.rows, FEATURE_DIM], &self.data)
    }

    /// Read a `.npy` file written by [`MusicFeatures::to_npy_bytes`] (or numpy, `<f4`/`<f8`).
    pub fn from_npy(path: &Path) -> Result<Self, AudioError> {
        let bytes = std::fs::read(path).map_err(|source| AudioError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (shape, data) = parse_npy(&bytes).map_err(|detail| AudioError::Format {
            path: path.to_path_buf(),
            detail,
        })?;
        if shape.len() != 2 || shape[1] != FEATURE_DIM {
            return Err(AudioError::Format {
                path: path.to_path_buf(),
                detail: format!("shape {shape:?}, expected (L, {FEATURE_DIM})"),
            });
        }
        MusicFeatures::new(shape[0], data)
    }

    pub fn write_npy(&self, path: &Path, force: bool) -> Result<(), AudioError> {
        write_atomic(path, &self.to_npy_bytes(), force)
    }

    pub fn write_json(&self, path: &Path, id: &str, force: bool) -> Result<(), AudioError> {
        write_atomic(path, self.to_json_string(id).as_bytes(), force)
    }
}

impl FeatureStages {
    /// All stages as float32 tensors keyed like the golden files (plus `features`).
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>, AudioError> {
        let l = self.features.rows;
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)> = Vec::new();
        let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let push32 = |t: &mut Vec<(String, Vec<usize>, Vec<u8>, safetensors::Dtype)>,
                      name: &str,
                      shape: Vec<usize>,
                      v: &[f32]| {
            t.push((name.to_string(), shape, f32b(v), safetensors::Dtype::F32));
        };
        push32(
            &mut tensors,
            "features",
            vec![l, FEATURE_DIM],
            &self.features.data,
        );
        push32(
            &mut tensors,
            "audio_3840hz",
            vec![self.audio_3840hz.len()],
            &self.audio_3840hz,
        );
        push32(
            &mut tensors,
            "melspe_db",
            vec![self.melspe_db.rows, l],
            &self.melspe_db.data,
        );
        push32(
            &mut tensors,
            "mfcc",
            vec![self.mfcc.rows, l],
            &self.mfcc.data,
        );
        push32(
            &mut tensors,
            "mfcc_delta",
            vec![self.mfcc_delta.rows, l],
            &self.mfcc_delta.data,
        );
        push32(
            &mut tensors,
            "harmonic",
            vec![self.harmonic.len()],
            &self.harmonic,
        );
        push32(
            &mut tensors,
            "percussive",
            vec![self.percussive.len()],
            &self.percussive,
        );
        push32(
            &mut tensors,
            "chroma_cqt",
            vec![12, l],
            &self.chroma_cqt.data,
        );
        push32(
            &mut tensors,
            "cqt_mag",
            vec![self.cqt_mag.rows, self.cqt_mag.cols],
            &self.cqt_mag.data,
        );
        push32(&mut tensors, "onset_env", vec![l], &self.onset_env);
        let tg: Vec<f32> = self.tempogram.data.iter().map(|&v| v as f32).collect();
        push32(&mut tensors, "tempogram", vec![self.tempogram.rows, l], &tg);
        push32(&mut tensors, "beats_onehot", vec![l], &self.beats_onehot);
        push32(&mut tensors, "peaks_onehot", vec![l], &self.peaks_onehot);
        tensors.push((
            "tuning".into(),
            vec![1],
            self.tuning.to_le_bytes().to_vec(),
            safetensors::Dtype::F64,
        ));
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b, d)| {
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| AudioError::InvalidFeatures(format!("safetensors: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let mut meta = HashMap::new();
        meta.insert(
            "columns".to_string(),
            "mfcc[0:20] mfcc_delta[20:40] chroma_cqt[40:52] onset_env[52] beats_onehot[53] tempogram[54:438]"
                .to_string(),
        );
        meta.insert("sample_rate".to_string(), "3840".to_string());
        safetensors::tensor::serialize(views, Some(meta))
            .map_err(|e| AudioError::InvalidFeatures(format!("safetensors: {e}")))
    }

    pub fn write_safetensors(&self, path: &Path, force: bool) -> Result<(), AudioError> {
        write_atomic(path, &self.to_safetensors_bytes()?, force)
    }
}

/// `.npy` (version 1.0) bytes for a little-endian float32 array.
pub fn npy_bytes_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    let total = 10 + header.len() + 1;
    let pad = (64 - total % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Parse a little-endian `<f4` or `<f8` C-order `.npy` file.
pub fn parse_npy(bytes: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "bad .npy header")?;
    if header.contains("'fortran_order': True") {
        return Err("Fortran-ordered .npy is not supported".into());
    }
    let f8 = if header.contains("'<f4'") {
        false
    } else if header.contains("'<f8'") {
        true
    } else {
        return Err(format!("unsupported dtype in header {header}"));
    };
    let s0 = header.find("'shape': (").ok_or("no shape in .npy header")? + 10;
    let s1 = header[s0..].find(')').ok_or("bad shape in .npy header")? + s0;
    let shape: Vec<usize> = header[s0..s1]
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<usize>().map_err(|_| format!("bad dimension {t}")))
        .collect::<Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let body = &bytes[hstart + hlen..];
    let width = if f8 { 8 } else { 4 };
    if body.len() != count * width {
        return Err(format!(
            "data has {} bytes, shape {shape:?} needs {}",
            body.len(),
            count * width
        ));
    }
    let data = if f8 {
        body.chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()
    } else {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    Ok((shape, data))
}

/// Write `bytes` to `path` through a temporary file in the same directory and a rename.
/// Refuses to replace an existing file unless `force`.
pub fn write_atomic(path: &Path, bytes: &[u8], force: bool) -> Result<(), AudioError> {
    let io = |source: std::io::Error| AudioError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() && !force {
        return Err(AudioError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "file exists; pass --force to overwrite",
            ),
        });
    }
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // not named after the output: a name near the 255-byte limit would push it over
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".danceba-{}.{serial}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}
