//! Decode + resample + features on a 60 s song (three golden clips back to back, written as a
//! 44.1 kHz stereo 16-bit WAV), plus the stages on their own.

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use danceba_audio::{decode_file, extract_features, features_from_file, load_mono_3840};

fn golden_dir() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

fn write_wav16(path: &Path, channels: u16, rate: u32, samples: &[f32]) {
    let mut data = Vec::with_capacity(samples.len() * 2);
    for &s in samples {
        data.extend_from_slice(
            &((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes(),
        );
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&((36 + data.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
    out.extend_from_slice(&(channels * 2).to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).expect("write bench wav");
}

/// A 60 s, 44.1 kHz stereo WAV made of the 20 s golden rock clip three times.
fn song_60s(dir: &Path) -> PathBuf {
    let pcm = decode_file(&golden_dir().join("audio/rock_armygeddon_20s.wav")).expect("golden wav");
    let mut s = Vec::with_capacity(pcm.samples.len() * 3);
    for _ in 0..3 {
        s.extend_from_slice(&pcm.samples);
    }
    let p = dir.join("song60.wav");
    write_wav16(&p, pcm.channels as u16, pcm.sample_rate, &s);
    p
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let wav = song_60s(dir.path());
    let audio = load_mono_3840(&wav).expect("load");
    let mut g = c.benchmark_group("features_60s");
    g.sample_size(20);
    g.bench_function("decode_resample_features_wav44k", |b| {
        b.iter(|| features_from_file(&wav).expect("features"))
    });
    g.bench_function("decode_resample_only", |b| {
        b.iter(|| load_mono_3840(&wav).expect("load"))
    });
    g.bench_function("features_only_from_3840hz", |b| {
        b.iter(|| extract_features(&audio).expect("features"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
