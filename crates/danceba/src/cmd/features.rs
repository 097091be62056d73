//! `danceba features`: compute the 438-column music features of a song, or check a feature file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use danceba_audio::features::columns;
use danceba_audio::{MusicFeatures, FEATURE_DIM};

/// Arguments of `danceba features`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  danceba features song.mp3 -o song.json\n  \
danceba features song.wav -o song.npy\n  danceba features song.flac -o song.safetensors   \
(features plus every intermediate stage)\n  danceba features mBR0.json --check")]
pub struct Args {
    /// Audio file (wav, flac, mp3, ogg, m4a, aiff...), or with --check a feature file
    /// (.json in the official layout, .npy or .safetensors).
    pub input: PathBuf,
    /// Output file; the extension picks the format: .npy (L×438 float32), .json (official
    /// `{"id", "music_array"}` layout) or .safetensors (key `features` plus every stage).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Overwrite the output file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Read a feature file and print its shape and per-column-group statistics.
    #[arg(long)]
    pub check: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum OutFormat {
    Npy,
    Json,
    Safetensors,
}

fn out_format(path: &Path) -> anyhow::Result<OutFormat> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .as_deref()
    {
        Some("npy") => Ok(OutFormat::Npy),
        Some("json") => Ok(OutFormat::Json),
        Some("safetensors") => Ok(OutFormat::Safetensors),
        _ => bail!(
            "cannot tell the output format of {}: use a name ending in .npy, .json or .safetensors",
            path.display()
        ),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.check {
        if args.output.is_some() {
            bail!("--check reads a feature file and writes nothing; drop -o");
        }
        let f = read_feature_file(&args.input)?;
        print!("{}", check_report(&args.input, &f));
        // the verdict: what `generate` would refuse
        if f.rows == 0 {
            bail!(
                "{}: the feature matrix has no rows; generate cannot use it",
                args.input.display()
            );
        }
        let non_finite = f.data.iter().filter(|v| !v.is_finite()).count();
        if non_finite > 0 {
            bail!(
                "{}: {non_finite} values are NaN or infinite; generate cannot use it",
                args.input.display()
            );
        }
        return Ok(());
    }
    let Some(out) = args.output.as_ref() else {
        bail!(
            "no output file: pass -o OUT.npy, -o OUT.json or -o OUT.safetensors \
             (or --check to inspect a feature file)"
        );
    };
    let fmt = out_format(out)?;
    if out.is_dir() {
        bail!(
            "{} is a directory: give the output file's name, e.g. {}",
            out.display(),
            out.join("song.npy").display()
        );
    }
    // the directory is checked now, not after the features are computed
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!(
            "cannot write {}: the directory {} does not exist",
            out.display(),
            parent.display()
        );
    }
    if out.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            out.display()
        );
    }
    let t0 = std::time::Instant::now();
    let stages = danceba_audio::stages_from_file(&args.input)
        .with_context(|| format!("computing features of {}", args.input.display()))?;
    let elapsed = t0.elapsed();
    if let Some(note) =
        super::truncation_note(&args.input, stages.audio_3840hz.len() as f64 / 3840.0)
    {
        eprintln!("{note}");
    }
    let f = &stages.features;
    let id = args
        .input
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    match fmt {
        OutFormat::Npy => f.write_npy(out, args.force),
        OutFormat::Json => f.write_json(out, &id, args.force),
        OutFormat::Safetensors => stages.write_safetensors(out, args.force),
    }
    .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "wrote {}: {} rows × {FEATURE_DIM} ({:.2} s of audio at 7.5 rows/s, tuning {:+.2} bin) in {:.2} s",
        out.display(),
        f.rows,
        stages.audio_3840hz.len() as f64 / 3840.0,
        stages.tuning,
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// Read features from an official .json, a .npy or a .safetensors (key `features`).
pub fn read_feature_file(path: &Path) -> anyhow::Result<MusicFeatures> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "json" => Ok(MusicFeatures::from_official_json(path)?),
        "npy" => Ok(MusicFeatures::from_npy(path)?),
        "safetensors" => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
            let t = st
                .tensor("features")
                .with_context(|| format!("{} has no `features` tensor", path.display()))?;
            if t.dtype() != safetensors::Dtype::F32 {
                bail!(
                    "{}: `features` is {:?}, expected F32",
                    path.display(),
                    t.dtype()
                );
            }
            let shape = t.shape();
            if shape.len() != 2 || shape[1] != FEATURE_DIM {
                bail!(
                    "{}: `features` has shape {shape:?}, expected (L, {FEATURE_DIM})",
                    path.display()
                );
            }
            let data = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Ok(MusicFeatures::new(shape[0], data)?)
        }
        _ => bail!(
            "{}: --check reads .json (official layout), .npy or .safetensors feature files",
            path.display()
        ),
    }
}

/// Shape and per-column-group statistics of a feature matrix.
pub fn check_report(path: &Path, f: &MusicFeatures) -> String {
    let mut s = String::new();
    let l = f.rows;
    s.push_str(&format!(
        "{}: {l} rows × {FEATURE_DIM} columns ({:.2} s at 7.5 rows/s)\n",
        path.display(),
        l as f64 / 7.5
    ));
    let non_finite = f.data.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        s.push_str(&format!("WARNING: {non_finite} non-finite values\n"));
    }
    if l == 0 {
        return s;
    }
    s.push_str(&format!(
        "{:<16} {:>9} {:>12} {:>12} {:>12} {:>12} {:>9}\n",
        "group", "columns", "min", "max", "mean", "std", "nonzero"
    ));
    let groups: [(&str, std::ops::Range<usize>); 6] = [
        ("mfcc", columns::MFCC),
        ("mfcc_delta", columns::MFCC_DELTA),
        ("chroma_cqt", columns::CHROMA),
        ("onset_env", columns::ONSET..columns::ONSET + 1),
        ("beats_onehot", columns::BEAT..columns::BEAT + 1),
        ("tempogram", columns::TEMPOGRAM),
    ];
    for (name, cols) in groups {
        let mut min = f64::INFINITY;
        let mut max = f64::NEG_INFINITY;
        let mut sum = 0.0f64;
        let mut sq = 0.0f64;
        let mut nz = 0usize;
        let mut n = 0usize;
        for r in 0..l {
            for c in cols.clone() {
                let v = f.data[r * FEATURE_DIM + c] as f64;
                if !v.is_finite() {
                    continue;
                }
                min = min.min(v);
                max = max.max(v);
                sum += v;
                sq += v * v;
                n += 1;
                if v != 0.0 {
                    nz += 1;
                }
            }
        }
        let (mean, std) = if n > 0 {
            let m = sum / n as f64;
            (m, (sq / n as f64 - m * m).max(0.0).sqrt())
        } else {
            (f64::NAN, f64::NAN)
        };
        let frac = if n > 0 { nz as f64 / n as f64 } else { 0.0 };
        s.push_str(&format!(
            "{name:<16} {:>9} {min:>12.5} {max:>12.5} {mean:>12.5} {std:>12.5} {:>8.1}%\n",
            format!("{}-{}", cols.start, cols.end - 1),
            frac * 100.0
        ));
    }
    let beats = (0..l)
        .filter(|&r| f.data[r * FEATURE_DIM + columns::BEAT] != 0.0)
        .count();
    s.push_str(&format!("beats: {beats}\n"));
    s
}
