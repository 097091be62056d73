//! Decoding (symphonia) and essentia `MonoLoader` semantics: channel mean, then libsamplerate
//! `SRC_SINC_MEDIUM_QUALITY` at the float32-rounded ratio, fed in 4096-sample chunks like
//! essentia's streaming `Resample` (reference §1.1). Everything is streamed: the native-rate
//! PCM of a file is never held whole. Files symphonia cannot read (Opus, WMA, …) are decoded by
//! a found `ffmpeg` to a temporary float WAV first ([`ffmpeg_copy`]).

use std::fs::File;
use std::path::Path;

use symphonia::core::audio::{AudioBufferRef, SampleBuffer, SignalSpec};
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::AudioError;

/// Human-readable list of what [`decode_file`] accepts.
pub const SUPPORTED_FORMATS: &str = "WAV (PCM 8/16/24/32-bit integer, 32/64-bit float), FLAC, \
MP3, Ogg Vorbis, AAC/ALAC in M4A/MP4, AIFF, CAF, MKV/WebM (Vorbis/FLAC/PCM), and with ffmpeg on \
PATH whatever it decodes (Opus, WMA, …)";

/// Lowest and highest accepted input sample rates (the feature rate up to 384 kHz; 8–192 kHz
/// is the tested range).
pub const MIN_RATE: u32 = 3840;
pub const MAX_RATE: u32 = 384_000;
/// Sample rate of the features.
pub const TARGET_RATE: u32 = 3840;
/// essentia streaming Resample's preferred input chunk.
pub const RESAMPLE_CHUNK: usize = 4096;

/// Decoded PCM, interleaved.
#[derive(Clone, Debug, PartialEq)]
pub struct Pcm {
    pub samples: Vec<f32>,
    pub channels: usize,
    pub sample_rate: u32,
}

impl Pcm {
    /// Number of frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len().checked_div(self.channels).unwrap_or(0)
    }
    /// essentia MonoMixer 'mix': `(L+R)·0.5` for stereo, the mean of all channels otherwise.
    pub fn to_mono(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.frames());
        mix_to_mono(&self.samples, self.channels, &mut out);
        out
    }
}

/// Append the channel mean of interleaved `samples` to `out` (float32 arithmetic).
pub fn mix_to_mono(samples: &[f32], channels: usize, out: &mut Vec<f32>) {
    match channels {
        0 => {}
        1 => out.extend_from_slice(samples),
        2 => out.extend(samples.chunks_exact(2).map(|c| (c[0] + c[1]) * 0.5)),
        n => out.extend(samples.chunks_exact(n).map(|c| {
            let mut s = 0.0f32;
            for v in c {
                s += v;
            }
            s / n as f32
        })),
    }
}

thread_local! {
    /// Set while [`guarded`] runs a closure on this thread.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside it (a bug of symphonia's on malformed data) into `Err(())`
/// without printing the panic message: the caller reports a clear error instead. The process's
/// panic hook is wrapped once so that it stays silent while a guarded closure runs on the
/// panicking thread, and reports every other panic as before.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    result.map_err(|_| ())
}

/// The sample rate a RIFF/RF64 WAVE file's `fmt ` chunk states (found within its first 64 KiB),
/// to name it when the demuxer fails on the header.
fn wav_header_rate(path: &Path) -> Option<u32> {
    use std::io::Read;
    let mut head = Vec::new();
    File::open(path)
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut head)
        .ok()?;
    if !(head.starts_with(b"RIFF") || head.starts_with(b"RF64")) || head.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut at = 12usize;
    while at + 8 <= head.len() {
        let size = u32::from_le_bytes(head[at + 4..at + 8].try_into().ok()?) as usize;
        if &head[at..at + 4] == b"fmt " {
            return Some(u32::from_le_bytes(
                head.get(at + 12..at + 16)?.try_into().ok()?,
            ));
        }
        // chunks are padded to an even size
        at = at
            .checked_add(8)?
            .checked_add(size)?
            .checked_add(size & 1)?;
    }
    None
}

/// `path`'s first audio stream as a 32-bit float WAV at its own rate and channels, made by the
/// `ffmpeg` on PATH in a temporary file, for the codecs and containers symphonia lacks (Opus,
/// WMA, …). The official code reads its audio through FFmpeg too (essentia's `AudioLoader`),
/// so these samples are the ones it would see. Err: why not, for the error message.
fn ffmpeg_copy(path: &Path) -> Result<tempfile::TempPath, String> {
    let copy = tempfile::Builder::new()
        .prefix("danceba-decoded-")
        .suffix(".wav")
        .tempfile()
        .map_err(|e| format!("no temporary file for ffmpeg to decode into: {e}"))?
        .into_temp_path();
    let out = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i"])
        .arg(path)
        .args(["-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav"])
        .arg(&*copy)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "install ffmpeg, through which danceba decodes Opus, WMA and more, or convert the \
             file to WAV or FLAC"
                .into(),
        ),
        Err(e) => Err(format!("ffmpeg could not be run: {e}")),
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().rev().find(|l| !l.trim().is_empty());
            Err(format!(
                "ffmpeg could not decode it either: {}",
                last.unwrap_or("no message")
            ))
        }
        Ok(_) => Ok(copy),
    }
}

/// A streaming packet decoder over one file.
struct Decoder {
    path: std::path::PathBuf,
    format: Box<dyn symphonia::core::formats::FormatReader>,
    decoder: Box<dyn symphonia::core::codecs::Decoder>,
    track_id: u32,
    sample_buf: Option<SampleBuffer<f32>>,
    rate: Option<u32>,
    /// Frames the container's header declares, if it does.
    declared_frames: Option<u64>,
    channels: Option<usize>,
    /// Frames still to drop at the start (MP4 edit list priming, as FFmpeg does).
    skip_frames: u64,
    /// Offset (in samples) of the first kept sample in the current buffer.
    view_start: usize,
    /// The WAV that ffmpeg made of the file, where symphonia could not read it (removed on drop).
    _ffmpeg_copy: Option<tempfile::TempPath>,
}

impl Decoder {
    /// Opens `path` with symphonia, or where symphonia has no reader or decoder for it, through
    /// an `ffmpeg` on PATH (see [`ffmpeg_copy`]).
    fn open(path: &Path) -> Result<Self, AudioError> {
        Self::open_with(path, true)
    }

    /// [`Decoder::open`], trying ffmpeg only if `ffmpeg` (it decodes the whole file at once,
    /// which a look at the header does not need).
    fn open_with(path: &Path, ffmpeg: bool) -> Result<Self, AudioError> {
        let err = match Self::open_native(path) {
            Err(
                e @ (AudioError::UnsupportedCodec { .. } | AudioError::UnsupportedFormat { .. }),
            ) => e,
            other => return other,
        };
        if !ffmpeg {
            return Err(err);
        }
        match ffmpeg_copy(path) {
            Ok(copy) => {
                let mut dec = Self::open_native(&copy).map_err(|_| err)?;
                dec.path = path.to_path_buf();
                dec._ffmpeg_copy = Some(copy);
                Ok(dec)
            }
            Err(why) => Err(match err {
                AudioError::UnsupportedCodec { path, detail } => AudioError::UnsupportedCodec {
                    path,
                    detail: format!("{detail}; {why}"),
                },
                AudioError::UnsupportedFormat { path, detail } => AudioError::UnsupportedFormat {
                    path,
                    detail: format!("{detail}; {why}"),
                },
                e => e,
            }),
        }
    }

    /// Opens `path` with symphonia.
    fn open_native(path: &Path) -> Result<Self, AudioError> {
        let pb = path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|source| AudioError::Io {
            path: pb.clone(),
            source,
        })?;
        if meta.is_dir() {
            return Err(AudioError::Io {
                path: pb,
                source: std::io::Error::other("is a directory, not an audio file"),
            });
        }
        if meta.len() == 0 {
            return Err(AudioError::EmptyFile { path: pb });
        }
        let file = File::open(path).map_err(|source| AudioError::Io {
            path: pb.clone(),
            source,
        })?;
        let mss = MediaSourceStream::new(Box::new(file), Default::default());
        let mut hint = Hint::new();
        if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
            hint.with_extension(ext);
        }
        let fmt_opts = FormatOptions {
            enable_gapless: true,
            ..Default::default()
        };
        // symphonia's readers can panic on headers they do not check (a WAV of 0 Hz makes a
        // zero time base): that is a malformed file, not a crash.
        let probed = guarded(|| {
            symphonia::default::get_probe().format(
                &hint,
                mss,
                &fmt_opts,
                &MetadataOptions::default(),
            )
        })
        .map_err(|()| match wav_header_rate(path) {
            Some(rate) if !(MIN_RATE..=MAX_RATE).contains(&rate) => AudioError::SampleRate {
                path: pb.clone(),
                rate,
            },
            _ => AudioError::UnsupportedFormat {
                path: pb.clone(),
                detail: "the file's header is malformed (the demuxer failed on it)".into(),
            },
        })?
        .map_err(|e| AudioError::UnsupportedFormat {
            path: pb.clone(),
            detail: e.to_string(),
        })?;
        let format = probed.format;
        let track = format
            .tracks()
            .iter()
            .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
            .ok_or_else(|| AudioError::NoAudio { path: pb.clone() })?;
        let track_id = track.id;
        let rate = track.codec_params.sample_rate;
        let codec_params = track.codec_params.clone();
        if let Some(r) = rate {
            if !(MIN_RATE..=MAX_RATE).contains(&r) {
                return Err(AudioError::SampleRate { path: pb, rate: r });
            }
        }
        let decoder = symphonia::default::get_codecs()
            .make(&codec_params, &DecoderOptions::default())
            .map_err(|e| AudioError::UnsupportedCodec {
                path: pb.clone(),
                detail: e.to_string(),
            })?;
        Ok(Decoder {
            path: pb,
            format,
            decoder,
            track_id,
            sample_buf: None,
            rate,
            declared_frames: codec_params.n_frames,
            channels: codec_params.channels.map(|c| c.count()),
            skip_frames: mp4_priming_frames(path, rate).unwrap_or(0),
            view_start: 0,
            _ffmpeg_copy: None,
        })
    }

    /// Decode the next packet into interleaved f32; `Ok(None)` at the end of the stream.
    /// A corrupt packet is skipped; a truncated file ends the stream.
    fn next(&mut self) -> Result<Option<(usize, u32)>, AudioError> {
        let mut bad_packets = 0usize;
        loop {
            // A malformed file must never bring the process down: a panic inside the demuxer or
            // decoder (a bug there) becomes a decode error.
            let next = guarded(|| self.format.next_packet()).map_err(|()| AudioError::Decode {
                path: self.path.clone(),
                detail: "the demuxer failed on malformed data".into(),
            })?;
            let packet = match next {
                Ok(p) => p,
                Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(None)
                }
                Err(SymError::IoError(e)) => {
                    return Err(AudioError::Decode {
                        path: self.path.clone(),
                        detail: e.to_string(),
                    })
                }
                Err(SymError::ResetRequired) => return Ok(None),
                Err(e) => {
                    return Err(AudioError::Decode {
                        path: self.path.clone(),
                        detail: e.to_string(),
                    })
                }
            };
            if packet.track_id() != self.track_id {
                continue;
            }
            let decoder = &mut self.decoder;
            let sample_buf = &mut self.sample_buf;
            let result =
                guarded(|| decode_into(decoder.as_mut(), &packet, sample_buf)).map_err(|()| {
                    AudioError::Decode {
                        path: self.path.clone(),
                        detail: "the decoder failed on malformed data".into(),
                    }
                })?;
            let (spec, frames) = match result {
                Ok(d) => d,
                Err(SymError::DecodeError(e)) => {
                    bad_packets += 1;
                    if bad_packets > 1000 {
                        return Err(AudioError::Decode {
                            path: self.path.clone(),
                            detail: format!("too many corrupt packets ({e})"),
                        });
                    }
                    continue;
                }
                Err(SymError::IoError(_)) => return Ok(None),
                Err(e) => {
                    return Err(AudioError::Decode {
                        path: self.path.clone(),
                        detail: e.to_string(),
                    })
                }
            };
            let ch = spec.channels.count();
            if ch == 0 {
                return Err(AudioError::Decode {
                    path: self.path.clone(),
                    detail: "stream has no channels".into(),
                });
            }
            let rate = spec.rate;
            if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                return Err(AudioError::SampleRate {
                    path: self.path.clone(),
                    rate,
                });
            }
            match self.rate {
                Some(r) if r != rate => {
                    return Err(AudioError::Decode {
                        path: self.path.clone(),
                        detail: format!("sample rate changes mid-stream ({r} Hz to {rate} Hz)"),
                    })
                }
                _ => self.rate = Some(rate),
            }
            match self.channels {
                Some(c) if c != ch => {
                    return Err(AudioError::Decode {
                        path: self.path.clone(),
                        detail: format!("channel count changes mid-stream ({c} to {ch})"),
                    })
                }
                _ => self.channels = Some(ch),
            }
            if frames == 0 {
                continue;
            }
            self.view_start = 0;
            if self.skip_frames > 0 {
                if self.skip_frames >= frames as u64 {
                    self.skip_frames -= frames as u64;
                    continue;
                }
                self.view_start = self.skip_frames as usize * ch;
                self.skip_frames = 0;
            }
            return Ok(Some((ch, rate)));
        }
    }
}

impl Decoder {
    /// Samples of the last decoded packet, interleaved.
    fn samples(&self) -> &[f32] {
        self.sample_buf
            .as_ref()
            .and_then(|b| b.samples().get(self.view_start..))
            .unwrap_or(&[])
    }
}

/// The number of priming frames an MP4/M4A file asks the player to skip: the `media_time` of the
/// first non-empty edit of the first sound track's edit list, converted to the sample rate.
/// FFmpeg (and so essentia) drops them; symphonia 0.5 does not. `None` for other files.
pub fn mp4_priming_frames(path: &Path, rate: Option<u32>) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; 8];
    f.read_exact(&mut head).ok()?;
    if &head[4..8] != b"ftyp" {
        return None;
    }
    // Walk top-level boxes to find moov (it may follow the media data).
    let mut off = 0u64;
    let mut moov: Option<Vec<u8>> = None;
    while off + 8 <= len {
        f.seek(SeekFrom::Start(off)).ok()?;
        let mut h = [0u8; 16];
        f.read_exact(&mut h[..8]).ok()?;
        let mut size = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as u64;
        let mut hdr = 8u64;
        if size == 1 {
            f.read_exact(&mut h[8..16]).ok()?;
            size = u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            hdr = 16;
        } else if size == 0 {
            size = len - off;
        }
        if size < hdr {
            return None;
        }
        if &h[4..8] == b"moov" {
            if size > 64 << 20 {
                return None;
            }
            let mut body = vec![0u8; (size - hdr) as usize];
            f.read_exact(&mut body).ok()?;
            moov = Some(body);
            break;
        }
        off += size;
    }
    mp4_priming_from_moov(&moov?, rate)
}

/// Children `(type, body)` of a box body.
fn mp4_children(mut b: &[u8]) -> Vec<([u8; 4], &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 8 {
        let size32 = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let typ = [b[4], b[5], b[6], b[7]];
        let (size, hdr) = match size32 {
            0 => (b.len(), 8),
            1 if b.len() >= 16 => (
                u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]) as usize,
                16,
            ),
            n => (n, 8),
        };
        if size < hdr || size > b.len() {
            break;
        }
        out.push((typ, &b[hdr..size]));
        b = &b[size..];
    }
    out
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// See [`mp4_priming_frames`]; `moov` is the body of the moov box.
pub fn mp4_priming_from_moov(moov: &[u8], rate: Option<u32>) -> Option<u64> {
    for (typ, trak) in mp4_children(moov) {
        if &typ != b"trak" {
            continue;
        }
        let kids = mp4_children(trak);
        let mdia = kids.iter().find(|k| &k.0 == b"mdia")?.1;
        let mdia_kids = mp4_children(mdia);
        let is_sound = mdia_kids
            .iter()
            .any(|k| &k.0 == b"hdlr" && k.1.get(8..12) == Some(b"soun".as_slice()));
        if !is_sound {
            continue;
        }
        let mdhd = mdia_kids.iter().find(|k| &k.0 == b"mdhd")?.1;
        let timescale = match mdhd.first()? {
            0 => be_u32(mdhd, 12)?,
            _ => be_u32(mdhd, 20)?,
        };
        let Some(edts) = kids.iter().find(|k| &k.0 == b"edts") else {
            return Some(0);
        };
        let Some(elst) = mp4_children(edts.1).into_iter().find(|k| &k.0 == b"elst") else {
            return Some(0);
        };
        let body = elst.1;
        let version = *body.first()?;
        let count = be_u32(body, 4)? as usize;
        let entry = if version == 1 { 20 } else { 12 };
        for i in 0..count.min(64) {
            let at = 8 + i * entry;
            let media_time: i64 = if version == 1 {
                be_u64(body, at + 8)? as i64
            } else {
                be_u32(body, at + 4)? as i32 as i64
            };
            if media_time < 0 {
                continue; // an empty edit
            }
            if timescale == 0 {
                return None;
            }
            let r = rate.unwrap_or(timescale) as u128;
            let frames = (media_time as u128 * r + timescale as u128 / 2) / timescale as u128;
            return Some(frames.min(u64::MAX as u128) as u64);
        }
        return Some(0);
    }
    None
}

/// Decode one packet and copy its samples (interleaved f32) into `buf`.
fn decode_into(
    decoder: &mut dyn symphonia::core::codecs::Decoder,
    packet: &symphonia::core::formats::Packet,
    buf: &mut Option<SampleBuffer<f32>>,
) -> Result<(SignalSpec, usize), SymError> {
    let decoded: AudioBufferRef<'_> = decoder.decode(packet)?;
    let spec = *decoded.spec();
    let frames = decoded.frames();
    let ch = spec.channels.count();
    if frames == 0 || ch == 0 {
        if let Some(b) = buf.as_mut() {
            // leave an empty buffer behind so samples() is empty
            b.clear();
        }
        return Ok((spec, frames));
    }
    let cap = decoded.capacity() as u64;
    let fits = match buf {
        Some(b) => b.capacity() >= cap as usize * ch && b.capacity() % ch == 0,
        None => false,
    };
    if !fits {
        *buf = Some(SampleBuffer::<f32>::new(cap, spec));
    }
    if let Some(b) = buf.as_mut() {
        b.copy_interleaved_ref(decoded);
    }
    Ok((spec, frames))
}

/// The duration in seconds that the file's header declares (frames over rate), if it declares
/// both; `None` for streams that do not say. Opens the file only: nothing is decoded. A decode
/// that yields much less than this means the file is truncated or damaged (the decoder ends at
/// the damage, as FFmpeg does).
pub fn declared_seconds(path: &Path) -> Option<f64> {
    let dec = Decoder::open_with(path, false).ok()?;
    Some(dec.declared_frames? as f64 / f64::from(dec.rate.filter(|&r| r > 0)?))
}

/// The short name symphonia gives the codec of `path`'s audio track ("mp3", "aac", "alac",
/// "flac", "vorbis", "pcm_s16le", …): what a browser needs in order to play the file, which
/// the container does not say (an `.m4a` holds AAC or Apple Lossless). Opens the file only.
pub fn codec_name(path: &Path) -> Result<&'static str, AudioError> {
    let dec = Decoder::open_with(path, false)?;
    let codec = dec.decoder.codec_params().codec;
    Ok(symphonia::default::get_codecs()
        .get_codec(codec)
        .map_or("unknown", |d| d.short_name))
}

/// Checks that `path` is audio this crate decodes: a known container and codec, a supported
/// sample rate, and at least one packet of samples (decoding only that far).
pub fn check_audio_file(path: &Path) -> Result<(), AudioError> {
    let mut dec = Decoder::open(path)?;
    loop {
        match dec.next()? {
            Some(_) if dec.samples().is_empty() => continue,
            Some(_) => return Ok(()),
            None => {
                return Err(AudioError::NoAudio {
                    path: path.to_path_buf(),
                })
            }
        }
    }
}

/// Decode a whole file to interleaved f32 PCM at its native rate.
pub fn decode_file(path: &Path) -> Result<Pcm, AudioError> {
    let mut dec = Decoder::open(path)?;
    let mut samples = Vec::new();
    let mut channels = 0;
    let mut rate = 0;
    while let Some((ch, r)) = dec.next()? {
        samples.extend_from_slice(dec.samples());
        channels = ch;
        rate = r;
    }
    if samples.is_empty() {
        return Err(AudioError::NoAudio {
            path: path.to_path_buf(),
        });
    }
    if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
        return Err(AudioError::NonFinite { index: i });
    }
    Ok(Pcm {
        samples,
        channels,
        sample_rate: rate,
    })
}

/// libsamplerate driven like essentia's streaming `Resample`.
pub struct EssentiaResampler {
    state: *mut libsamplerate_sys::SRC_STATE,
    ratio: f64,
    pending: Vec<f32>,
    start: usize,
    out: Vec<f32>,
    scratch: Vec<f32>,
    delay: f32,
}

// The SRC state is owned exclusively by this struct.
unsafe impl Send for EssentiaResampler {}

impl EssentiaResampler {
    /// `in_rate → 3840 Hz`; the ratio is `f32(3840) / f32(in_rate)` as essentia computes it.
    pub fn new(in_rate: u32) -> Result<Self, AudioError> {
        let ratio = (TARGET_RATE as f32 / in_rate as f32) as f64;
        let mut err: std::os::raw::c_int = 0;
        // SAFETY: plain FFI constructor; the result is checked for null.
        let state = unsafe {
            libsamplerate_sys::src_new(
                libsamplerate_sys::SRC_SINC_MEDIUM_QUALITY as i32,
                1,
                &mut err,
            )
        };
        if state.is_null() || err != 0 {
            return Err(AudioError::Resample(format!("src_new failed (code {err})")));
        }
        Ok(EssentiaResampler {
            state,
            ratio,
            pending: Vec::new(),
            start: 0,
            out: Vec::new(),
            scratch: Vec::new(),
            delay: 0.0,
        })
    }

    fn available(&self) -> usize {
        self.pending.len() - self.start
    }

    fn process(&mut self, n_in: usize, out_space: usize, end: bool) -> Result<usize, AudioError> {
        if self.scratch.len() < out_space {
            self.scratch.resize(out_space, 0.0);
        }
        let input = &self.pending[self.start..self.start + n_in];
        let mut data = libsamplerate_sys::SRC_DATA {
            data_in: input.as_ptr(),
            data_out: self.scratch.as_mut_ptr(),
            input_frames: n_in as std::os::raw::c_long,
            output_frames: out_space as std::os::raw::c_long,
            input_frames_used: 0,
            output_frames_gen: 0,
            end_of_input: end as std::os::raw::c_int,
            src_ratio: self.ratio,
        };
        // SAFETY: the pointers are valid for the given lengths for the duration of the call.
        let err = unsafe { libsamplerate_sys::src_process(self.state, &mut data) };
        if err != 0 {
            return Err(AudioError::Resample(format!(
                "src_process failed (code {err})"
            )));
        }
        let used = data.input_frames_used.max(0) as usize;
        let gen = data.output_frames_gen.max(0) as usize;
        self.out
            .extend_from_slice(&self.scratch[..gen.min(out_space)]);
        self.delay =
            (self.delay as f64 + (used as f32 as f64 * self.ratio - gen as f32 as f64)) as f32;
        self.start += used;
        if self.start > (1 << 16) {
            self.pending.drain(..self.start);
            self.start = 0;
        }
        Ok(used)
    }

    /// Feed mono samples at the input rate.
    pub fn push(&mut self, samples: &[f32]) -> Result<(), AudioError> {
        self.pending.extend_from_slice(samples);
        while self.available() >= RESAMPLE_CHUNK {
            let space = (self.ratio * RESAMPLE_CHUNK as f64) as usize + 100;
            let used = self.process(RESAMPLE_CHUNK, space, false)?;
            if used == 0 {
                return Err(AudioError::Resample(
                    "internal consumption problem while resampling".into(),
                ));
            }
        }
        Ok(())
    }

    /// Flush (essentia's last call with `end_of_input`), returning all output at 3840 Hz.
    pub fn finish(mut self) -> Result<Vec<f32>, AudioError> {
        let mut guard = 0;
        while self.available() > 0 && guard < 4 {
            let avail = self.available();
            let space = (self.ratio * avail as f64 + 100.0 + (self.delay as i32) as f64) as i64;
            let space = space.max(1) as usize;
            let used = self.process(avail, space, true)?;
            if used == 0 {
                break;
            }
            guard += 1;
        }
        Ok(std::mem::take(&mut self.out))
    }

    /// Output produced so far.
    pub fn output_len(&self) -> usize {
        self.out.len()
    }
}

impl Drop for EssentiaResampler {
    fn drop(&mut self) {
        if !self.state.is_null() {
            // SAFETY: state was created by src_new and is deleted once.
            unsafe {
                libsamplerate_sys::src_delete(self.state);
            }
            self.state = std::ptr::null_mut();
        }
    }
}

/// Resample mono audio from `in_rate` to 3840 Hz as essentia's MonoLoader does.
pub fn resample_to_3840(mono: &[f32], in_rate: u32) -> Result<Vec<f32>, AudioError> {
    if in_rate == TARGET_RATE {
        return Ok(mono.to_vec());
    }
    let mut r = EssentiaResampler::new(in_rate)?;
    r.push(mono)?;
    r.finish()
}

/// Decode, mix to mono and resample to 3840 Hz like `essentia.standard.MonoLoader(sampleRate=3840)`,
/// streaming (bounded memory: only the 3840 Hz output is kept). Decoding and mixing run on the
/// calling thread while libsamplerate runs on a second one, fed through a bounded channel.
pub fn load_mono_3840(path: &Path) -> Result<Vec<f32>, AudioError> {
    let mut dec = Decoder::open(path)?;
    let Some((ch, rate)) = dec.next()? else {
        return Err(AudioError::NoAudio {
            path: path.to_path_buf(),
        });
    };
    let mut mono = Vec::new();
    let mut seen = 0usize;
    // Mix the current packet to mono, checking for non-finite samples.
    let mix = |dec: &Decoder, ch: usize, seen: &mut usize, mono: &mut Vec<f32>| {
        let s = dec.samples();
        if let Some(i) = s.iter().position(|v| !v.is_finite()) {
            return Err(AudioError::NonFinite {
                index: *seen + i / ch.max(1),
            });
        }
        mono.clear();
        mix_to_mono(s, ch, mono);
        *seen += mono.len();
        Ok(())
    };
    mix(&dec, ch, &mut seen, &mut mono)?;
    if rate == TARGET_RATE {
        let mut out = mono.clone();
        while let Some((ch, _)) = dec.next()? {
            mix(&dec, ch, &mut seen, &mut mono)?;
            out.extend_from_slice(&mono);
        }
        if out.is_empty() {
            return Err(AudioError::NoAudio {
                path: path.to_path_buf(),
            });
        }
        return Ok(out);
    }
    let mut resampler = EssentiaResampler::new(rate)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<f32>>(32);
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || -> Result<Vec<f32>, AudioError> {
            for chunk in rx {
                resampler.push(&chunk)?;
            }
            resampler.finish()
        });
        let mut decode_result: Result<(), AudioError> = Ok(());
        let mut pending = std::mem::take(&mut mono);
        loop {
            // Batch small packets to keep channel traffic low.
            // (a failed send means the resampler failed; its error is reported below)
            if pending.len() >= 8192 && tx.send(std::mem::take(&mut pending)).is_err() {
                break;
            }
            match dec.next() {
                Ok(Some((ch, _))) => {
                    if let Err(e) = mix(&dec, ch, &mut seen, &mut mono) {
                        decode_result = Err(e);
                        break;
                    }
                    pending.extend_from_slice(&mono);
                }
                Ok(None) => break,
                Err(e) => {
                    decode_result = Err(e);
                    break;
                }
            }
        }
        if decode_result.is_ok() && !pending.is_empty() {
            let _ = tx.send(pending);
        }
        drop(tx);
        let resampled = worker
            .join()
            .map_err(|_| AudioError::Resample("the resampling thread failed".into()))?;
        decode_result?;
        if seen == 0 {
            return Err(AudioError::NoAudio {
                path: path.to_path_buf(),
            });
        }
        resampled
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bx(typ: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(typ);
        v.extend_from_slice(body);
        v
    }

    fn moov(media_times: &[i32], handler: &[u8; 4], timescale: u32) -> Vec<u8> {
        let mut elst = vec![0u8, 0, 0, 0];
        elst.extend_from_slice(&(media_times.len() as u32).to_be_bytes());
        for &m in media_times {
            elst.extend_from_slice(&20000u32.to_be_bytes());
            elst.extend_from_slice(&m.to_be_bytes());
            elst.extend_from_slice(&0x0001_0000u32.to_be_bytes());
        }
        let mut mdhd = vec![0u8; 24];
        mdhd[12..16].copy_from_slice(&timescale.to_be_bytes());
        let mut hdlr = vec![0u8; 24];
        hdlr[8..12].copy_from_slice(handler);
        let mdia = [bx(b"mdhd", &mdhd), bx(b"hdlr", &hdlr)].concat();
        let trak = [bx(b"edts", &bx(b"elst", &elst)), bx(b"mdia", &mdia)].concat();
        bx(b"trak", &trak)
    }

    #[test]
    fn mp4_edit_list_priming() {
        assert_eq!(
            mp4_priming_from_moov(&moov(&[1024], b"soun", 44100), Some(44100)),
            Some(1024)
        );
        // an empty edit first, then the real one; media timescale differs from the rate
        assert_eq!(
            mp4_priming_from_moov(&moov(&[-1, 2112], b"soun", 48000), Some(24000)),
            Some(1056)
        );
        assert_eq!(
            mp4_priming_from_moov(&moov(&[1024], b"vide", 44100), Some(44100)),
            None
        );
        assert_eq!(mp4_priming_from_moov(&[1, 2, 3], Some(44100)), None);
    }
}
