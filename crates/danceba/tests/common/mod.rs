//! Audio files and page reading shared by the CLI tests.
#![allow(dead_code)]

/// Interleaved 16-bit samples of a few seconds of a two-tone stereo signal.
pub fn tones(seconds: f32, rate: u32) -> Vec<i16> {
    let n = (seconds * rate as f32) as usize;
    let mut s = Vec::with_capacity(2 * n);
    for i in 0..n {
        let t = i as f32 / rate as f32;
        s.push((8000.0 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()) as i16);
        s.push((6000.0 * (2.0 * std::f32::consts::PI * 660.0 * t).sin()) as i16);
    }
    s
}

/// A stereo 16-bit PCM AIFF (the Mac's uncompressed format) of `samples`.
pub fn aiff16(samples: &[i16], rate: u32) -> Vec<u8> {
    let data = 2 * samples.len() as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"FORM");
    b.extend_from_slice(&(4 + 26 + 16 + data).to_be_bytes());
    b.extend_from_slice(b"AIFFCOMM");
    b.extend_from_slice(&18u32.to_be_bytes());
    b.extend_from_slice(&2u16.to_be_bytes());
    b.extend_from_slice(&(samples.len() as u32 / 2).to_be_bytes());
    b.extend_from_slice(&16u16.to_be_bytes());
    // the rate as an 80-bit extended float: exponent, then the mantissa with its explicit 1
    let k = 31 - rate.leading_zeros();
    b.extend_from_slice(&(16383 + k as u16).to_be_bytes());
    b.extend_from_slice(&(u64::from(rate) << (63 - k)).to_be_bytes());
    b.extend_from_slice(b"SSND");
    b.extend_from_slice(&(8 + data).to_be_bytes());
    b.extend_from_slice(&[0; 8]);
    for v in samples {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// A stereo 16-bit PCM WAV of `samples`.
pub fn wav16(samples: &[i16], rate: u32) -> Vec<u8> {
    let data = 2 * samples.len() as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    for v in [16u32, 0x0002_0001, rate, 4 * rate, 0x0010_0004] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    for v in samples {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// The MIME type and the bytes of the audio a page embeds.
pub fn page_music(page: &std::path::Path) -> (String, Vec<u8>) {
    let html = std::fs::read_to_string(page).unwrap();
    let at = html
        .find("src=\"data:audio/")
        .expect("the page embeds audio")
        + 10;
    let rest = &html[at..];
    let semi = rest.find(";base64,").unwrap();
    let end = rest.find('"').unwrap();
    (
        rest[..semi].to_string(),
        base64_decode(&rest[semi + 8..end]),
    )
}

pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for q in s.trim_end_matches('=').as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in q.iter().enumerate() {
            acc |= u32::from(val(c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..q.len()]);
    }
    out
}

/// A directory for PATH whose `ffmpeg` fails, printing `message` as ffmpeg prints an error.
pub fn failing_ffmpeg(dir: &std::path::Path, message: &str) -> std::path::PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let ff = bin.join("ffmpeg");
    std::fs::write(&ff, format!("#!/bin/sh\necho \"{message}\" >&2\nexit 1\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ff, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}
