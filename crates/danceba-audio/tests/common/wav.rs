//! A minimal WAV writer for tests.

use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub enum WavFormat {
    Int(u16),
    Float32,
}

/// Write interleaved samples in [-1, 1] as a RIFF/WAVE file.
pub fn write_wav(path: &Path, channels: u16, rate: u32, fmt: WavFormat, samples: &[f32]) {
    let (tag, bits) = match fmt {
        WavFormat::Int(b) => (1u16, b),
        WavFormat::Float32 => (3u16, 32),
    };
    let bytes_per = (bits / 8) as usize;
    let mut data = Vec::with_capacity(samples.len() * bytes_per);
    for &s in samples {
        match fmt {
            WavFormat::Float32 => data.extend_from_slice(&s.to_le_bytes()),
            WavFormat::Int(8) => {
                data.push(((s * 128.0).round().clamp(-128.0, 127.0) as i32 + 128) as u8)
            }
            WavFormat::Int(16) => data.extend_from_slice(
                &((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_le_bytes(),
            ),
            WavFormat::Int(24) => {
                let v = (s as f64 * 8388608.0).round().clamp(-8388608.0, 8388607.0) as i32;
                data.extend_from_slice(&v.to_le_bytes()[..3]);
            }
            WavFormat::Int(32) => {
                let v = (s as f64 * 2147483648.0)
                    .round()
                    .clamp(-2147483648.0, 2147483647.0) as i32;
                data.extend_from_slice(&v.to_le_bytes());
            }
            WavFormat::Int(b) => panic!("unsupported bit depth {b}"),
        }
    }
    let block_align = channels as usize * bytes_per;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&((36 + data.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&((rate as usize * block_align) as u32).to_le_bytes());
    out.extend_from_slice(&(block_align as u16).to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// A test tone: a sum of two sines at `f1` and `f2` Hz.
pub fn tone(n: usize, rate: u32, f1: f64, f2: f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = i as f64 / rate as f64;
            (0.3 * (2.0 * std::f64::consts::PI * f1 * t).sin()
                + 0.2 * (2.0 * std::f64::consts::PI * f2 * t).sin()) as f32
        })
        .collect()
}
