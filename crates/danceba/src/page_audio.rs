//! The music an html page embeds.
//!
//! Every browser plays MP3, AAC, Vorbis and Opus, and those are compact, so the page takes such
//! a source as it is. WAV and FLAC play everywhere too but are 5–10 times larger than the page
//! needs (a 3-minute WAV made a 46.5 MB page); AIFF, the Mac's uncompressed format, and Apple
//! Lossless (`.m4a` from the Music app) play in Safari only. For those (and any other codec
//! danceba decodes) the page gets:
//!
//! * with an `ffmpeg` on PATH: an AAC copy at 192 kb/s in MP4, the audio the mp4 video gets;
//! * without one (or where it fails): WAV and FLAC as they are (large but playable), anything
//!   else as a 16-bit PCM WAV decoded here, at the source's rate and channels.
//!
//! A copy is a hidden temporary file in the directory given (the output directory), removed
//! when the [`PageAudio`] is dropped.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use danceba_motion::render::html::audio_mime;
use danceba_motion::render::video::AAC_AUDIO;

/// The audio file to embed in a page: the source, or the copy made of it.
#[derive(Debug)]
pub struct PageAudio {
    source: PathBuf,
    copy: Option<tempfile::TempPath>,
    /// Where an ffmpeg was found and could not make the AAC copy: why (the caller says it).
    pub ffmpeg_failed: Option<String>,
}

impl PageAudio {
    /// The file to embed.
    pub fn path(&self) -> &Path {
        self.copy.as_deref().unwrap_or(&self.source)
    }
}

/// The MIME type `audio_mime` gives `path` from its first bytes (and extension).
fn sniff(path: &Path) -> Result<Option<&'static str>> {
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(audio_mime(path, &head))
}

/// Whether every browser plays `source` and it is compressed (kept as it is): by its codec
/// (MP3, AAC, Vorbis, Opus), where danceba-audio can name it, else by its container.
fn compact(source: &Path, mime: Option<&str>) -> bool {
    match danceba_audio::decode::codec_name(source) {
        Ok(codec) => matches!(codec, "mp3" | "aac" | "vorbis" | "opus"),
        Err(_) => matches!(
            mime,
            Some("audio/mpeg" | "audio/ogg" | "audio/mp4" | "audio/webm")
        ),
    }
}

/// The audio for a page of `source`'s music (see the module's text): `ffmpeg` is the ffmpeg
/// to use (None: none), `dir` where a copy goes.
pub fn page_audio(source: &Path, ffmpeg: Option<&Path>, dir: &Path) -> Result<PageAudio> {
    let mime = sniff(source)?;
    let made = |copy, ffmpeg_failed| PageAudio {
        source: source.to_path_buf(),
        copy,
        ffmpeg_failed,
    };
    if compact(source, mime) {
        return Ok(made(None, None));
    }
    let mut ffmpeg_failed = None;
    if let Some(ff) = ffmpeg {
        match transcode_aac(ff, source, dir) {
            Ok(file) => return Ok(made(Some(file), None)),
            Err(e) => ffmpeg_failed = Some(format!("{e:#}")),
        }
    }
    if matches!(mime, Some("audio/wav" | "audio/flac")) {
        return Ok(made(None, ffmpeg_failed));
    }
    let file = decode_to_wav(source, dir)?;
    Ok(made(Some(file), ffmpeg_failed))
}

/// A hidden temporary file in `dir` with `suffix`.
fn temp_in(dir: &Path, suffix: &str) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".danceba-page-audio-")
        .suffix(suffix)
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

/// AAC at 192 kb/s in MP4 (`+faststart`) of the first audio stream of `source`.
fn transcode_aac(ffmpeg: &Path, source: &Path, dir: &Path) -> Result<tempfile::TempPath> {
    let file = temp_in(dir, ".m4a")?.into_temp_path();
    let out = Command::new(ffmpeg)
        .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i"])
        .arg(source)
        .args(["-map", "0:a:0", "-vn"])
        .args(AAC_AUDIO)
        .args(["-movflags", "+faststart", "-f", "mp4"])
        .arg(&*file)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", ffmpeg.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!(
            "{} could not make an AAC copy ({}): {last}",
            ffmpeg.display(),
            out.status
        );
    }
    let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        bail!("{} wrote an empty AAC copy", ffmpeg.display());
    }
    Ok(file)
}

/// `source` decoded (danceba-audio) to a 16-bit PCM WAV at its rate and channels.
fn decode_to_wav(source: &Path, dir: &Path) -> Result<tempfile::TempPath> {
    let pcm = danceba_audio::decode::decode_file(source)
        .with_context(|| format!("cannot decode {} for the page", source.display()))?;
    let tmp = temp_in(dir, ".wav")?;
    let werr = || format!("cannot write a WAV copy of the music in {}", dir.display());
    {
        let mut w = BufWriter::new(tmp.as_file());
        write_wav16(&mut w, &pcm.samples, pcm.channels, pcm.sample_rate).with_context(werr)?;
        w.flush().with_context(werr)?;
    }
    Ok(tmp.into_temp_path())
}

/// A canonical 44-byte-header WAV of interleaved `samples` (±1 full scale) as 16-bit PCM,
/// rounded to nearest and clipped.
pub fn write_wav16(w: &mut dyn Write, samples: &[f32], channels: usize, rate: u32) -> Result<()> {
    if channels == 0 || channels > 64 || rate == 0 {
        bail!("cannot write a WAV of {channels} channels at {rate} Hz");
    }
    let data = samples.len() as u64 * 2;
    let block = channels as u64 * 2;
    if data + 36 > u64::from(u32::MAX) || !samples.len().is_multiple_of(channels) {
        bail!(
            "the music is too long for a WAV ({} samples of {channels} channels)",
            samples.len()
        );
    }
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&((data + 36) as u32).to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&(channels as u16).to_le_bytes());
    h.extend_from_slice(&rate.to_le_bytes());
    h.extend_from_slice(&((u64::from(rate) * block) as u32).to_le_bytes());
    h.extend_from_slice(&(block as u16).to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&(data as u32).to_le_bytes());
    w.write_all(&h)?;
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in samples.chunks(1 << 15) {
        buf.clear();
        for &v in chunk {
            let q = (v * 32768.0).round().clamp(-32768.0, 32767.0) as i16;
            buf.extend_from_slice(&q.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav16_header_and_samples() {
        let mut out = Vec::new();
        write_wav16(&mut out, &[0.0, 1.0, -1.0, 0.5, -2.0, 1e-6], 2, 8000).unwrap();
        assert_eq!(out.len(), 44 + 12);
        assert_eq!(&out[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), 36 + 12);
        assert_eq!(u16::from_le_bytes(out[22..24].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(out[24..28].try_into().unwrap()), 8000);
        assert_eq!(u32::from_le_bytes(out[28..32].try_into().unwrap()), 32000);
        assert_eq!(u32::from_le_bytes(out[40..44].try_into().unwrap()), 12);
        let s: Vec<i16> = out[44..]
            .chunks(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(s, [0, 32767, -32768, 16384, -32768, 0]);
        assert!(write_wav16(&mut Vec::new(), &[0.0; 3], 2, 8000).is_err());
        assert!(write_wav16(&mut Vec::new(), &[0.0; 2], 0, 8000).is_err());
    }
}
