//! End to end from the golden audio files: decode + mono mix + resample + features.
//!
//! Lossless files (WAV, FLAC) must match closely; lossy ones (MP3, Ogg Vorbis) go through a
//! different decoder than the reference (FFmpeg), so their errors are printed and only loosely
//! bounded (the bound is ~10× what was measured: 9.6e-4 for MP3, 3.5e-4 for Ogg).

mod common;
use common::*;
use danceba_audio::{extract_features, load_mono_3840, FEATURE_DIM};

#[test]
fn end_to_end_from_audio_files() {
    for g in goldens() {
        let source = g.source();
        let src = golden_dir().join("audio").join(&source);
        let lossless = source.ends_with(".wav") || source.ends_with(".flac");
        let audio = load_mono_3840(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let gold_audio = g.f32("audio_3840hz");
        assert_eq!(
            audio.len(),
            gold_audio.len(),
            "{source}: sample count at 3840 Hz"
        );
        let (ea, ma) = err(&to64(&audio), &to64(&gold_audio));
        let ours = extract_features(&audio).expect("features").features;
        let (shape, gold) = g.tensor("features");
        assert_eq!(ours.rows, shape[0], "{source}: frame count L");
        let l = ours.rows;
        let mut worst = 0.0f64;
        let mut worst_col = 0;
        for c in 0..52 {
            let mut e = 0.0f64;
            let mut m = 0.0f64;
            for r in 0..l {
                let i = r * FEATURE_DIM + c;
                e = e.max((ours.data[i] as f64 - gold[i]).abs());
                m = m.max(gold[i].abs());
            }
            let rel = if m > 0.0 { e / m } else { e };
            if rel > worst {
                worst = rel;
                worst_col = c;
            }
        }
        println!(
            "{source:32} L={l:4} audio max err {ea:.2e} (peak {ma:.2e}); features cols 0-51 worst \
             err/colmax {worst:.2e} (column {worst_col})"
        );
        if lossless {
            assert!(ea <= 1e-6, "{source}: audio error {ea:e}");
            assert!(
                worst <= 1e-4,
                "{source}: feature error {worst:e} (required 1e-2)"
            );
        } else {
            assert!(
                worst <= 1e-2,
                "{source}: lossy feature error {worst:e} above loose bound"
            );
        }
    }
}

#[test]
fn streaming_loader_equals_whole_file_path() {
    for g in goldens() {
        let src = golden_dir().join("audio").join(g.source());
        let pcm = danceba_audio::decode_file(&src).expect("decode");
        let whole =
            danceba_audio::resample_to_3840(&pcm.to_mono(), pcm.sample_rate).expect("resample");
        let streamed = load_mono_3840(&src).expect("stream");
        assert_eq!(streamed, whole, "{}", g.source());
    }
}
