//! Edge cases: odd lengths, channel counts, sample rates, corrupt and non-audio files.

mod common;
#[path = "common/wav.rs"]
mod wav;

use common::golden_dir;
use danceba_audio::{
    decode_file, extract_features, features_from_file, load_mono_3840, AudioError, MIN_SAMPLES,
};
use wav::{tone, write_wav, WavFormat};

fn all_finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

#[test]
fn digital_silence_gives_finite_features() {
    let s = extract_features(&vec![0.0f32; 3840 * 5]).expect("silence");
    assert_eq!(s.features.rows, 1 + 3840 * 5 / 512);
    assert!(all_finite(&s.features.data));
    // Reference behaviour: power_to_db floors at -80 dB below the max (here 1e-10 → -100 dB
    // everywhere, so every mel band is -100 − (−100) = 0 → clipped to the constant); chroma of
    // an all-zero CQT is divided by 1.
    assert!(s.chroma_cqt.data.iter().all(|&v| v == 0.0));
    assert!(s.beats_onehot.iter().all(|&v| v == 0.0));
}

#[test]
fn silent_wav_file_gives_finite_features() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("silence.wav");
    write_wav(&p, 2, 44100, WavFormat::Int(16), &vec![0.0; 44100 * 2 * 3]);
    let f = features_from_file(&p).expect("silent wav");
    assert!(all_finite(&f.data));
    assert_eq!(f.rows, 1 + 11520 / 512);
}

#[test]
fn three_frame_clip_is_the_minimum() {
    for n in [MIN_SAMPLES, MIN_SAMPLES + 511] {
        let x = tone(n, 3840, 440.0, 660.0);
        let s = extract_features(&x).unwrap_or_else(|e| panic!("{n} samples: {e}"));
        assert_eq!(s.features.rows, 3);
        assert!(all_finite(&s.features.data));
    }
}

#[test]
fn too_short_clip_names_the_minimum() {
    let x = tone(MIN_SAMPLES - 1, 3840, 440.0, 660.0);
    let e = extract_features(&x).unwrap_err();
    assert!(matches!(e, AudioError::TooShort { .. }));
    let msg = e.to_string();
    assert!(msg.contains(&MIN_SAMPLES.to_string()), "{msg}");
    assert!(msg.contains("0.267 s"), "{msg}");
    assert!(extract_features(&[]).is_err());
}

#[test]
fn mono_and_six_channel_files_agree() {
    let dir = tempfile::tempdir().unwrap();
    let rate = 22050;
    let mono = tone(rate as usize * 3, rate, 440.0, 587.33);
    let p1 = dir.path().join("mono.wav");
    write_wav(&p1, 1, rate, WavFormat::Int(16), &mono);
    let six: Vec<f32> = mono
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, 6))
        .collect();
    let p6 = dir.path().join("six.wav");
    write_wav(&p6, 6, rate, WavFormat::Int(16), &six);
    let pcm = decode_file(&p6).expect("6-channel decode");
    assert_eq!(pcm.channels, 6);
    assert_eq!(pcm.sample_rate, rate);
    let a = load_mono_3840(&p1).unwrap();
    let b = load_mono_3840(&p6).unwrap();
    assert_eq!(a.len(), b.len());
    let e = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(e < 1e-6, "mono vs 6-channel mean: {e}");
    let f = features_from_file(&p6).unwrap();
    assert!(all_finite(&f.data));
}

/// Chroma of an A4 + D5 tone must peak at A (index 9) or D (index 2).
fn check_tone_file(rate: u32, fmt: WavFormat) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("tone_{rate}.wav"));
    let secs = 4;
    write_wav(
        &p,
        1,
        rate,
        fmt,
        &tone(rate as usize * secs, rate, 440.0, 587.33),
    );
    let audio = load_mono_3840(&p).unwrap_or_else(|e| panic!("{rate} Hz: {e}"));
    let expected = (rate as usize * secs) as f64 * (3840.0f32 / rate as f32) as f64;
    assert!(
        (audio.len() as f64 - expected).abs() <= 2.0,
        "{rate} Hz: {} samples at 3840 Hz, expected about {expected}",
        audio.len()
    );
    let s = extract_features(&audio).unwrap();
    assert!(all_finite(&s.features.data));
    let mid = s.features.rows / 2;
    let chroma: Vec<f32> = (0..12).map(|c| s.chroma_cqt.get(c, mid)).collect();
    let best = (0..12)
        .max_by(|&a, &b| chroma[a].total_cmp(&chroma[b]))
        .unwrap();
    assert!(
        best == 9 || best == 2,
        "{rate} Hz: chroma peak at {best}: {chroma:?}"
    );
}

#[test]
fn eight_khz_and_192_khz_inputs() {
    check_tone_file(8000, WavFormat::Int(16));
    check_tone_file(192_000, WavFormat::Int(24));
}

/// Write a big-endian 16-bit AIFF file.
fn write_aiff(path: &std::path::Path, channels: u16, rate: u32, samples: &[f32]) {
    let mut data = Vec::new();
    for &s in samples {
        data.extend_from_slice(
            &((s * 32768.0).round().clamp(-32768.0, 32767.0) as i16).to_be_bytes(),
        );
    }
    let frames = (samples.len() / channels as usize) as u32;
    let e = 31 - rate.leading_zeros(); // floor(log2(rate))
    let mut ext = [0u8; 10];
    ext[..2].copy_from_slice(&((16383 + e) as u16).to_be_bytes());
    ext[2..].copy_from_slice(&((rate as u64) << (63 - e)).to_be_bytes());
    let mut comm = Vec::new();
    comm.extend_from_slice(&channels.to_be_bytes());
    comm.extend_from_slice(&frames.to_be_bytes());
    comm.extend_from_slice(&16u16.to_be_bytes());
    comm.extend_from_slice(&ext);
    let mut body = Vec::new();
    body.extend_from_slice(b"AIFF");
    body.extend_from_slice(b"COMM");
    body.extend_from_slice(&(comm.len() as u32).to_be_bytes());
    body.extend_from_slice(&comm);
    body.extend_from_slice(b"SSND");
    body.extend_from_slice(&((data.len() + 8) as u32).to_be_bytes());
    body.extend_from_slice(&[0u8; 8]);
    body.extend_from_slice(&data);
    let mut out = Vec::new();
    out.extend_from_slice(b"FORM");
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    std::fs::write(path, out).unwrap();
}

#[test]
fn aiff_decodes_like_wav() {
    let dir = tempfile::tempdir().unwrap();
    let x = tone(44100 * 2, 44100, 440.0, 660.0);
    let stereo: Vec<f32> = x.iter().flat_map(|&v| [v, -v * 0.5]).collect();
    let pa = dir.path().join("t.aiff");
    write_aiff(&pa, 2, 44100, &stereo);
    let pw = dir.path().join("t.wav");
    write_wav(&pw, 2, 44100, WavFormat::Int(16), &stereo);
    let a = decode_file(&pa).unwrap_or_else(|e| panic!("aiff: {e}"));
    let w = decode_file(&pw).unwrap();
    assert_eq!((a.channels, a.sample_rate), (2, 44100));
    assert_eq!(a.samples, w.samples);
    assert_eq!(load_mono_3840(&pa).unwrap(), load_mono_3840(&pw).unwrap());
}

#[test]
fn input_at_3840_hz_is_not_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("native.wav");
    let x = tone(3840 * 2, 3840, 440.0, 660.0);
    write_wav(&p, 1, 3840, WavFormat::Float32, &x);
    assert_eq!(load_mono_3840(&p).unwrap(), x);
}

#[test]
fn every_wav_sample_format_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let x = tone(44100, 44100, 440.0, 660.0);
    let reference = {
        let p = dir.path().join("f32.wav");
        write_wav(&p, 1, 44100, WavFormat::Float32, &x);
        decode_file(&p).unwrap().samples
    };
    assert_eq!(reference, x);
    for (fmt, tol) in [
        (WavFormat::Int(8), 1.0 / 64.0),
        (WavFormat::Int(16), 1.0 / 16384.0),
        (WavFormat::Int(24), 1e-6),
        (WavFormat::Int(32), 1e-7),
    ] {
        let p = dir.path().join(format!("{fmt:?}.wav"));
        write_wav(&p, 1, 44100, fmt, &x);
        let got = decode_file(&p)
            .unwrap_or_else(|e| panic!("{fmt:?}: {e}"))
            .samples;
        assert_eq!(got.len(), x.len(), "{fmt:?}");
        let e = got
            .iter()
            .zip(&x)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(e <= tol, "{fmt:?}: error {e}");
    }
}

#[test]
fn float_wav_with_nan_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nan.wav");
    let mut x = tone(44100, 44100, 440.0, 660.0);
    x[1234] = f32::NAN;
    write_wav(&p, 1, 44100, WavFormat::Float32, &x);
    let e = load_mono_3840(&p).unwrap_err();
    assert!(matches!(e, AudioError::NonFinite { index: 1234 }), "{e}");
    assert!(e.to_string().contains("NaN"));
    assert!(decode_file(&p).is_err());
    assert!(features_from_file(&p).is_err());
}

#[test]
fn truncated_mp3_decodes_what_is_there() {
    let src = golden_dir().join("audio/synth_machine_wars_20s.mp3");
    let bytes = std::fs::read(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.mp3");
    // Cut in the middle of a frame.
    std::fs::write(&p, &bytes[..bytes.len() / 2 + 77]).unwrap();
    let audio = load_mono_3840(&p).expect("truncated mp3 decodes its first half");
    let full = load_mono_3840(&src).unwrap();
    let ratio = audio.len() as f64 / full.len() as f64;
    assert!((0.4..0.6).contains(&ratio), "decoded {ratio} of the file");
    // What was decoded matches the start of the full decode (until the resampler flush).
    let n = audio.len() - 200;
    let e = audio[..n]
        .iter()
        .zip(&full[..n])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(e < 1e-5, "prefix differs by {e}");
    let f = extract_features(&audio).unwrap().features;
    assert!(all_finite(&f.data));
    // A file cut inside its first frame holds no audio: a clear error naming the file.
    std::fs::write(&p, &bytes[..40]).unwrap();
    let e = load_mono_3840(&p).unwrap_err();
    assert!(e.to_string().contains("cut.mp3"), "{e}");
}

#[test]
fn non_audio_empty_and_unsupported_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("readme.mp3");
    std::fs::write(&txt, "Hello, this is not an MP3 file at all.\n".repeat(50)).unwrap();
    let e = load_mono_3840(&txt).unwrap_err();
    assert!(e.to_string().contains("Supported formats"), "{e}");

    let empty = dir.path().join("empty.wav");
    std::fs::write(&empty, b"").unwrap();
    let e = load_mono_3840(&empty).unwrap_err();
    assert!(matches!(e, AudioError::EmptyFile { .. }), "{e}");
    assert!(e.to_string().contains("empty"));

    // A WAV whose codec (format tag 0x7a21, none known) is not supported, by symphonia or by
    // ffmpeg where one is installed (ffmpeg would decode a known one, WMA's 0x0161 say).
    let wma = dir.path().join("wma.wav");
    write_wav(
        &wma,
        1,
        44100,
        WavFormat::Int(16),
        &tone(4410, 44100, 440.0, 660.0),
    );
    let mut b = std::fs::read(&wma).unwrap();
    b[20..22].copy_from_slice(&0x7a21u16.to_le_bytes());
    std::fs::write(&wma, b).unwrap();
    let e = load_mono_3840(&wma).unwrap_err();
    assert!(e.to_string().contains("Supported formats"), "{e}");

    let missing = dir.path().join("missing.flac");
    assert!(matches!(
        load_mono_3840(&missing).unwrap_err(),
        AudioError::Io { .. }
    ));
    assert!(load_mono_3840(dir.path()).is_err());
}

#[test]
fn unsupported_sample_rate_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("2k.wav");
    write_wav(
        &p,
        1,
        2000,
        WavFormat::Int(16),
        &tone(8000, 2000, 440.0, 660.0),
    );
    let e = load_mono_3840(&p).unwrap_err();
    assert!(
        matches!(e, AudioError::SampleRate { rate: 2000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("3840"));
    // a header that says 0 Hz (symphonia's WAV reader panics on it): an error, not a crash
    let p0 = dir.path().join("0hz.wav");
    write_wav(
        &p0,
        1,
        2000,
        WavFormat::Int(16),
        &tone(8000, 2000, 440.0, 660.0),
    );
    let mut bytes = std::fs::read(&p0).unwrap();
    let fmt = bytes.windows(4).position(|w| w == b"fmt ").unwrap();
    bytes[fmt + 12..fmt + 16].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&p0, &bytes).unwrap();
    let e = load_mono_3840(&p0).unwrap_err();
    assert!(e.to_string().contains("0 Hz"), "{e}");
}

#[test]
fn garbage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut s: u64 = 99;
    let mp3 = std::fs::read(golden_dir().join("audio/synth_machine_wars_20s.mp3")).unwrap();
    for (i, ext) in ["mp3", "wav", "flac", "ogg", "m4a", "aiff"]
        .iter()
        .enumerate()
    {
        // random bytes
        let bytes: Vec<u8> = (0..5000)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 56) as u8
            })
            .collect();
        let p = dir.path().join(format!("junk{i}.{ext}"));
        std::fs::write(&p, &bytes).unwrap();
        let _ = load_mono_3840(&p);
        // a real mp3 with corrupted bytes in the middle
        let mut m = mp3.clone();
        for k in 0..200 {
            let j = 10_000 + k * 997 + i * 31;
            if j < m.len() {
                m[j] ^= 0x5a;
            }
        }
        let p = dir.path().join(format!("corrupt{i}.{ext}"));
        std::fs::write(&p, &m).unwrap();
        let _ = load_mono_3840(&p);
    }
}

/// The codec names the html page's music is chosen by (`danceba::page_audio`).
#[test]
fn codec_names_of_the_golden_clips() {
    let a = golden_dir().join("audio");
    for (file, codec) in [
        ("synth_machine_wars_20s.mp3", "mp3"),
        ("electronic_motion_20s.ogg", "vorbis"),
        ("flac48k_feelings_20s.flac", "flac"),
        ("rock_armygeddon_20s.wav", "pcm_s16le"),
    ] {
        assert_eq!(
            danceba_audio::decode::codec_name(&a.join(file)).unwrap(),
            codec,
            "{file}"
        );
    }
    let not_audio = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_audio.path(), b"hello, this is not audio at all").unwrap();
    assert!(danceba_audio::decode::codec_name(not_audio.path()).is_err());
}

/// Runs ffmpeg with `args`; false where it is not installed.
fn ffmpeg(args: &[&std::ffi::OsStr]) -> bool {
    match std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-loglevel", "error", "-y"])
        .args(args)
        .status()
    {
        Ok(s) => {
            assert!(s.success(), "ffmpeg {args:?} failed");
            true
        }
        Err(_) => false,
    }
}

/// Opus (what `yt-dlp -x` gives, and WebM audio) has no symphonia decoder: it is decoded
/// through ffmpeg, to exactly the samples ffmpeg's own float WAV of it holds (the official code
/// reads audio through FFmpeg too), and the features follow.
#[test]
fn opus_is_decoded_through_ffmpeg() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden_dir().join("audio/rock_armygeddon_20s.wav");
    let opus = dir.path().join("song.opus");
    let reference = dir.path().join("reference.wav");
    let o = |p: &std::path::Path| p.as_os_str().to_owned();
    let made = ffmpeg(&[
        "-i".as_ref(),
        o(&src).as_ref(),
        "-t".as_ref(),
        "6".as_ref(),
        "-c:a".as_ref(),
        "libopus".as_ref(),
        o(&opus).as_ref(),
    ]);
    if !made {
        eprintln!("SKIPPED: ffmpeg not installed");
        return;
    }
    assert!(ffmpeg(&[
        "-i".as_ref(),
        o(&opus).as_ref(),
        "-c:a".as_ref(),
        "pcm_f32le".as_ref(),
        o(&reference).as_ref(),
    ]));
    let ours = decode_file(&opus).unwrap();
    let want = decode_file(&reference).unwrap();
    assert_eq!((ours.channels, ours.sample_rate), (2, 48_000));
    assert!(ours == want, "the Opus decode differs from ffmpeg's own");
    assert_eq!(
        features_from_file(&opus).unwrap().data,
        features_from_file(&reference).unwrap().data
    );
    danceba_audio::decode::check_audio_file(&opus).unwrap();
    // a look at the header does not decode the whole file through ffmpeg
    assert!(danceba_audio::decode::codec_name(&opus).is_err());
    assert_eq!(danceba_audio::decode::declared_seconds(&opus), None);
}
