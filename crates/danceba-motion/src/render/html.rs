//! A self-contained html viewer: one file with the motion (base64 float32) and the music
//! (base64 data URI) embedded and a small canvas 3D viewer (play/pause driven by the audio clock,
//! orbit camera, scrub slider). Needs no network.
//!
//! The page reports its state in `#status` (`data-state` = `ready` | `playing` | `paused` |
//! `blocked`, `data-errors` = number of script errors, `data-frame` = the frame drawn). Opening it
//! with `#autoplay` in the URL starts playback at once (where the browser allows it).

use std::path::Path;

use std::io::Write;

use super::{base64, RenderError};
use crate::Motion;

const TEMPLATE: &str = include_str!("viewer.html");

/// The MIME type of an audio file, from its magic bytes, else its extension.
pub fn audio_mime(path: &Path, bytes: &[u8]) -> Option<&'static str> {
    let head = |n: usize| bytes.get(..n);
    if head(4) == Some(b"RIFF") && bytes.get(8..12) == Some(b"WAVE") {
        return Some("audio/wav");
    }
    if head(4) == Some(b"OggS") {
        return Some("audio/ogg");
    }
    if head(4) == Some(b"fLaC") {
        return Some("audio/flac");
    }
    if head(3) == Some(b"ID3") || (bytes.len() > 1 && bytes[0] == 0xff && bytes[1] & 0xe0 == 0xe0) {
        return Some("audio/mpeg");
    }
    if bytes.get(4..8) == Some(b"ftyp") {
        return Some("audio/mp4");
    }
    if head(4) == Some(&[0x1a, 0x45, 0xdf, 0xa3]) {
        return Some("audio/webm");
    }
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "mp3" => "audio/mpeg",
        "ogg" | "oga" | "opus" => "audio/ogg",
        "wav" => "audio/wav",
        "flac" => "audio/flac",
        "m4a" | "mp4" | "aac" => "audio/mp4",
        "webm" => "audio/webm",
        _ => return None,
    })
}

fn escape_html(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            // Keep template markers inert.
            '{' => o.push_str("&#123;"),
            '}' => o.push_str("&#125;"),
            c => o.push(c),
        }
    }
    o
}

/// The audio file to embed, opened, with its MIME type.
struct Audio {
    file: std::fs::File,
    mime: &'static str,
}

fn open_audio(path: &Path) -> Result<Audio, RenderError> {
    use std::io::{Read, Seek};
    let read_err = |source| RenderError::ReadAudio {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    // the magic bytes (12 are enough for every format `audio_mime` knows)
    let mut head = Vec::with_capacity(16);
    (&mut file)
        .take(16)
        .read_to_end(&mut head)
        .map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let mime = audio_mime(path, &head).ok_or_else(|| RenderError::UnsupportedAudio {
        path: path.to_path_buf(),
    })?;
    Ok(Audio { file, mime })
}

/// Why writing the page stopped: reading the embedded audio, or writing the page.
#[derive(Debug)]
enum PageError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Writes the base64 of everything `r` yields, in chunks (no copy of the whole input or its
/// encoding in memory: a song's WAV is tens of MB).
fn write_base64(r: &mut dyn std::io::Read, w: &mut dyn Write) -> Result<(), PageError> {
    // a multiple of 3 bytes, so that only the last chunk can need padding
    let mut buf = vec![0u8; 3 * 21_846];
    loop {
        let mut n = 0;
        while n < buf.len() {
            match r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PageError::Read(e)),
            }
        }
        if n == 0 {
            return Ok(());
        }
        w.write_all(base64(&buf[..n]).as_bytes())
            .map_err(PageError::Write)?;
        if n < buf.len() {
            return Ok(());
        }
    }
}

/// Writes the page: the template with its markers replaced in one pass (no inserted text
/// contains a marker: base64 and numbers have no braces, the title is escaped), the audio and
/// the motion streamed as base64.
fn write_page(
    motion: &Motion,
    audio: Option<&mut Audio>,
    title: &str,
    w: &mut dyn Write,
) -> Result<(), PageError> {
    use PageError::Write as W;
    let mut audio = audio;
    let mut rest = TEMPLATE;
    while let Some(at) = rest.find("{{") {
        w.write_all(&rest.as_bytes()[..at]).map_err(W)?;
        let after = &rest[at..];
        let marker = after.find("}}").map(|e| &after[..e + 2]);
        match marker {
            Some("{{FPS}}") => write!(w, "{}", motion.fps).map_err(W)?,
            Some("{{FRAMES}}") => write!(w, "{}", motion.frames()).map_err(W)?,
            Some("{{TITLE}}") => w.write_all(escape_html(title).as_bytes()).map_err(W)?,
            Some("{{AUDIO}}") => {
                if let Some(a) = audio.as_deref_mut() {
                    use std::io::Seek;
                    a.file.rewind().map_err(PageError::Read)?;
                    write!(
                        w,
                        "<audio id=\"audio\" preload=\"auto\" src=\"data:{};base64,",
                        a.mime
                    )
                    .map_err(W)?;
                    write_base64(&mut a.file, w)?;
                    w.write_all(b"\"></audio>").map_err(W)?;
                }
            }
            Some("{{MOTION}}") => {
                let mut raw = Vec::with_capacity(motion.positions.len() * 4);
                for v in &motion.positions {
                    raw.extend_from_slice(&v.to_le_bytes());
                }
                write_base64(&mut raw.as_slice(), w)?;
            }
            // not a marker: the braces are text
            _ => {
                w.write_all(b"{{").map_err(W)?;
                rest = &after[2..];
                continue;
            }
        }
        rest = &after[marker.map_or(2, str::len)..];
    }
    w.write_all(rest.as_bytes()).map_err(W)
}

/// The error of a failed page: a failed read names the audio file, a failed write `out`.
fn page_error(e: PageError, audio: Option<&Path>, out: &Path) -> RenderError {
    match e {
        PageError::Read(source) => RenderError::ReadAudio {
            path: audio.map(Path::to_path_buf).unwrap_or_default(),
            source,
        },
        PageError::Write(source) => RenderError::Write {
            path: out.to_path_buf(),
            source,
        },
    }
}

/// Refuses a motion without frames (the viewer needs one to show).
fn check_frames(motion: &Motion) -> Result<(), RenderError> {
    if motion.frames() == 0 {
        return Err(RenderError::EmptyMotion);
    }
    Ok(())
}

/// Builds the html page as a string.
pub fn html_string(
    motion: &Motion,
    audio: Option<&Path>,
    title: &str,
) -> Result<String, RenderError> {
    check_frames(motion)?;
    let mut opened = audio.map(open_audio).transpose()?;
    let mut page = Vec::new();
    // (a Vec never fails a write: only reading the audio can fail here)
    write_page(motion, opened.as_mut(), title, &mut page)
        .map_err(|e| page_error(e, audio, Path::new("(the page in memory)")))?;
    Ok(String::from_utf8(page).expect("the page is UTF-8"))
}

/// Writes the self-contained viewer for `motion` (with `audio` embedded if given) to `out`,
/// atomically; refuses to overwrite an existing file unless `force`. The page is streamed to
/// a temporary file beside `out` (the audio's base64 is never whole in memory), which a failed
/// read or write removes.
pub fn write_html(
    motion: &Motion,
    audio: Option<&Path>,
    title: &str,
    out: &Path,
    force: bool,
) -> Result<(), RenderError> {
    super::check_overwrite(out, force)?;
    check_frames(motion)?;
    let mut audio_file = audio.map(open_audio).transpose()?;
    let mut tmp = super::temp_beside(out)?;
    let write_err = |source| RenderError::Write {
        path: out.to_path_buf(),
        source,
    };
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        write_page(motion, audio_file.as_mut(), title, &mut w)
            .map_err(|e| page_error(e, audio, out))?;
        w.flush().map_err(write_err)?;
    }
    tmp.as_file().sync_all().map_err(write_err)?;
    super::persist(tmp, out, force)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn motion() -> Motion {
        Motion::new(vec![0.5; 72 * 3], 60.0).unwrap()
    }

    #[test]
    fn page_embeds_motion_and_has_no_external_references() {
        let page = html_string(&motion(), None, "a <b> {{MOTION}}").unwrap();
        assert!(!page.contains("{{"), "unreplaced marker");
        assert!(page.contains("data-frames=\"3\""));
        assert!(page.contains("a &lt;b&gt; &#123;&#123;MOTION&#125;&#125;"));
        for bad in ["http://", "https://", "src=\"//", "<link"] {
            assert!(!page.contains(bad), "external reference {bad}");
        }
        // 0.5f32 = 0x3f000000 little-endian → "AAAAPw" prefix.
        assert!(page.contains(">AAAAPwAAAD8AAAA/"));
    }

    #[test]
    fn long_audio_and_motion_stream_as_one_base64_each() {
        // several read chunks (65,538 bytes each), not a multiple of 3: the streamed encoding
        // is the whole input's
        let dir = tempfile::tempdir().unwrap();
        let wav = dir.path().join("a.wav");
        let mut bytes = b"RIFF\0\0\0\0WAVE".to_vec();
        bytes.extend((0..200_001u32).map(|i| (i * 7 % 251) as u8));
        std::fs::write(&wav, &bytes).unwrap();
        let m = Motion::new((0..72 * 50).map(|i| i as f32 * 0.01).collect(), 60.0).unwrap();
        let out = dir.path().join("a.html");
        write_html(&m, Some(&wav), "t", &out, false).unwrap();
        let page = std::fs::read_to_string(&out).unwrap();
        assert_eq!(page, html_string(&m, Some(&wav), "t").unwrap());
        let tag = format!("src=\"data:audio/wav;base64,{}\"></audio>", base64(&bytes));
        assert!(page.contains(&tag));
        let raw: Vec<u8> = m.positions.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(page.contains(&format!(">{}<", base64(&raw))));
        assert!(!page.contains("{{"));
        // a missing audio file: an error naming it, and no page
        let gone = dir.path().join("gone.wav");
        let err = write_html(&m, Some(&gone), "t", &dir.path().join("b.html"), false);
        assert!(matches!(err, Err(RenderError::ReadAudio { .. })));
        assert!(!dir.path().join("b.html").exists());
    }

    /// A reader that yields `n` bytes, then fails; a writer that takes `n` bytes, then fails.
    struct FailAfter(usize);
    impl std::io::Read for FailAfter {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("the disk went away"));
            }
            let k = buf.len().min(self.0);
            buf[..k].fill(7);
            self.0 -= k;
            Ok(k)
        }
    }
    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
            }
            let k = buf.len().min(self.0);
            self.0 -= k;
            Ok(k)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_read_names_the_audio_and_a_failed_write_the_page() {
        // a read failing mid-stream (after a whole chunk) and a write failing mid-page, each
        // told apart whatever its error kind
        let mut sink = Vec::new();
        let r = write_base64(&mut FailAfter(3 * 21_846 + 5), &mut sink);
        assert!(matches!(r, Err(PageError::Read(_))), "{r:?}");
        let r = write_base64(&mut [1u8; 100].as_slice(), &mut FailAfter(10));
        assert!(matches!(r, Err(PageError::Write(_))), "{r:?}");
        let r = write_page(&motion(), None, "t", &mut FailAfter(1000));
        assert!(matches!(r, Err(PageError::Write(_))), "{r:?}");
        let (song, out) = (Path::new("song.wav"), Path::new("out.html"));
        let read = page_error(PageError::Read(std::io::Error::other("x")), Some(song), out);
        assert!(matches!(read, RenderError::ReadAudio { ref path, .. } if path == song));
        let write = page_error(
            PageError::Write(std::io::Error::other("x")),
            Some(song),
            out,
        );
        assert!(matches!(write, RenderError::Write { ref path, .. } if path == out));
    }

    #[test]
    fn audio_is_sniffed_and_unknown_audio_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ogg = dir.path().join("x.bin");
        std::fs::write(&ogg, b"OggS\0\0\0\0").unwrap();
        let page = html_string(&motion(), Some(&ogg), "t").unwrap();
        assert!(page.contains("src=\"data:audio/ogg;base64,T2dnUwAAAAA=\""));
        let junk = dir.path().join("x.xyz");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(matches!(
            html_string(&motion(), Some(&junk), "t"),
            Err(RenderError::UnsupportedAudio { .. })
        ));
        assert!(matches!(
            html_string(&motion(), Some(&dir.path().join("missing.mp3")), "t"),
            Err(RenderError::ReadAudio { .. })
        ));
    }
}
