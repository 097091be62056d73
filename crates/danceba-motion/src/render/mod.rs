//! Renderers: mp4 through a found `ffmpeg` (animated-GIF fallback without it) and a
//! self-contained html viewer. Frames are drawn by our own anti-aliased rasteriser.
//!
//! ```no_run
//! # use danceba_motion::{Motion, render};
//! # fn demo(motion: &Motion) -> Result<(), render::RenderError> {
//! use std::path::Path;
//! let outcome = render::video::render_video(
//!     motion,
//!     Some(Path::new("song.mp3")),
//!     Path::new("song.mp4"),
//!     &render::video::VideoOptions::default(),
//! )?;
//! render::html::write_html(motion, Some(Path::new("song.mp3")), "song", Path::new("song.html"), false)?;
//! # let _ = outcome; Ok(()) }
//! ```

pub mod html;
pub mod raster;
pub mod scene;
pub mod video;

use std::path::{Path, PathBuf};

pub use raster::RgbImage;
pub use scene::{render_frame, render_openpose_frame, Camera, CameraRig};

/// Errors of the renderers.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{path} already exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the audio file {path}: {source}")]
    ReadAudio {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an audio format a browser can play (use mp3, ogg, wav, flac or m4a)")]
    UnsupportedAudio { path: PathBuf },
    #[error("ffmpeg ({ffmpeg}) failed: {message}")]
    Ffmpeg { ffmpeg: PathBuf, message: String },
    #[error("video size {width}×{height} is not supported (both must be even and in 16..=8192)")]
    BadSize { width: u32, height: u32 },
    #[error("frame rate {0} is not supported (use 1..=240)")]
    BadFps(f32),
    #[error("motion has no frames")]
    EmptyMotion,
    #[error("cancelled")]
    Cancelled,
    #[error("GIF encoding failed: {0}")]
    Gif(String),
}

/// Refuses to go on if `out` exists and `force` is not set.
pub(crate) fn check_overwrite(out: &Path, force: bool) -> Result<(), RenderError> {
    if !force && out.exists() {
        return Err(RenderError::Exists {
            path: out.to_path_buf(),
        });
    }
    Ok(())
}

/// A temporary file next to `out`, to be renamed over it once complete.
pub(crate) fn temp_beside(out: &Path) -> Result<tempfile::NamedTempFile, RenderError> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // not named after the output: a name near the 255-byte limit would push it over
    let mut builder = tempfile::Builder::new();
    builder.prefix(".danceba-").suffix(".part");
    // An output file, not a secret: the usual rw-r--r-- (mode 0666 filtered by the umask, like
    // any created file) instead of tempfile's owner-only 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(&dir)
        .map_err(|source| RenderError::Write {
            path: out.to_path_buf(),
            source,
        })
}

/// Moves a finished temporary file to `out` (refusing to replace an existing file unless `force`).
pub(crate) fn persist(
    tmp: tempfile::NamedTempFile,
    out: &Path,
    force: bool,
) -> Result<(), RenderError> {
    let res = if force {
        tmp.persist(out).map(|_| ())
    } else {
        tmp.persist_noclobber(out).map(|_| ())
    };
    res.map_err(|e| {
        if !force && out.exists() {
            RenderError::Exists {
                path: out.to_path_buf(),
            }
        } else {
            RenderError::Write {
                path: out.to_path_buf(),
                source: e.error,
            }
        }
    })
}

/// Standard base64 (RFC 4648, with padding).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (i, o) in cases {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
    }

    #[test]
    fn atomic_write_refuses_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.html");
        let one = crate::Motion::new(vec![0.5; 72], 60.0).unwrap();
        let two = crate::Motion::new(vec![0.25; 72 * 2], 60.0).unwrap();
        html::write_html(&one, None, "one", &p, false).unwrap();
        let first = std::fs::read(&p).unwrap();
        assert!(matches!(
            html::write_html(&two, None, "two", &p, false),
            Err(RenderError::Exists { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), first);
        html::write_html(&two, None, "two", &p, true).unwrap();
        assert_eq!(
            std::fs::read(&p).unwrap(),
            html::html_string(&two, None, "two").unwrap().as_bytes()
        );
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn rendered_files_get_the_permissions_of_a_created_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("a.html");
        let m = crate::Motion::new(vec![0.5; 72], 60.0).unwrap();
        html::write_html(&m, None, "x", &ours, false).unwrap();
        let plain = dir.path().join("b.txt");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&ours),
            mode(&plain),
            "same as File::create under this umask"
        );
    }
}
