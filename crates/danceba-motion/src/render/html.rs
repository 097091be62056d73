//! A self-contained html viewer: one file with the motion (base64 float32) and the music
//! (base64 data URI) embedded and a small canvas 3D viewer (play/pause driven by the audio clock,
//! orbit camera, scrub slider). Needs no network.
//!
//! The page reports its state in `#status` (`data-state` = `ready` | `playing` | `paused` |
//! `blocked`, `data-errors` = number of script errors, `data-frame` = the frame drawn). Opening it
//! with `#autoplay` in the URL starts playback at once (where the browser allows it).

use std::path::Path;

use super::{base64, write_atomic, RenderError};
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

/// Builds the html page as a string.
pub fn html_string(
    motion: &Motion,
    audio: Option<&Path>,
    title: &str,
) -> Result<String, RenderError> {
    if motion.frames() == 0 {
        return Err(RenderError::EmptyMotion);
    }
    let audio_tag = match audio {
        None => String::new(),
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|source| RenderError::ReadAudio {
                path: path.to_path_buf(),
                source,
            })?;
            let mime = audio_mime(path, &bytes).ok_or_else(|| RenderError::UnsupportedAudio {
                path: path.to_path_buf(),
            })?;
            format!(
                "<audio id=\"audio\" preload=\"auto\" src=\"data:{mime};base64,{}\"></audio>",
                base64(&bytes)
            )
        }
    };
    let mut raw = Vec::with_capacity(motion.positions.len() * 4);
    for v in &motion.positions {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    // Markers are replaced in an order where no inserted text can contain a later marker
    // (base64 and numbers have no braces; the title is escaped).
    let page = TEMPLATE
        .replace("{{FPS}}", &format!("{}", motion.fps))
        .replace("{{FRAMES}}", &motion.frames().to_string())
        .replace("{{TITLE}}", &escape_html(title))
        .replace("{{AUDIO}}", &audio_tag)
        .replace("{{MOTION}}", &base64(&raw));
    Ok(page)
}

/// Writes the self-contained viewer for `motion` (with `audio` embedded if given) to `out`,
/// atomically; refuses to overwrite an existing file unless `force`.
pub fn write_html(
    motion: &Motion,
    audio: Option<&Path>,
    title: &str,
    out: &Path,
    force: bool,
) -> Result<(), RenderError> {
    super::check_overwrite(out, force)?;
    let page = html_string(motion, audio, title)?;
    write_atomic(out, page.as_bytes(), force)
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
