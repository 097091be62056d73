//! Video: frames drawn in parallel (rayon) and piped as raw RGB into an `ffmpeg` found on PATH
//! (libx264 when available, else MPEG-4 part 2; yuv420p; the music muxed in as AAC). Without
//! ffmpeg, an animated GIF (no sound) is written instead and the outcome says so.
//!
//! Length: the output covers `min(motion, audio)`: a motion longer than the song (DanceBa's
//! `8(L+1)` frames run 0.13–0.27 s past it) is cut at the song's end, and a song longer than the
//! motion is cut at the motion's end, so audio and video streams have the same length.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use super::raster::RgbImage;
use super::scene::{background, draw_frame_into, render_openpose_frame, CameraRig};
use super::{check_overwrite, persist, temp_beside, RenderError};
use crate::Motion;

/// What the frames look like.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Style {
    /// Our 3D view: shaded skeleton, follow camera, floor grid, shadows.
    #[default]
    Skeleton3d,
    /// The official 2D OpenPose-style projection (reference §5).
    OpenPose,
}

/// Which ffmpeg to use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum FfmpegChoice {
    /// The first `ffmpeg` on PATH.
    #[default]
    FromPath,
    /// This executable.
    Path(PathBuf),
    /// Do not use ffmpeg: write the GIF fallback.
    Disabled,
}

/// A progress callback: `(frames done, frames total)`.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Options of [`render_video`].
#[derive(Clone)]
pub struct VideoOptions {
    /// Video width (even), default 960.
    pub width: u32,
    /// Video height (even), default 540.
    pub height: u32,
    /// Video frame rate, default 60.
    pub fps: f32,
    pub style: Style,
    pub ffmpeg: FfmpegChoice,
    /// Replace existing output files.
    pub force: bool,
    /// GIF fallback size and rate (default 480×270 at 20 fps).
    pub gif_width: u32,
    pub gif_height: u32,
    pub gif_fps: f32,
    /// Called as frames are written.
    pub progress: Option<Progress>,
    /// Set to stop early; the call then returns [`RenderError::Cancelled`] and leaves no file.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for VideoOptions {
    fn default() -> Self {
        Self {
            width: 960,
            height: 540,
            fps: 60.0,
            style: Style::Skeleton3d,
            ffmpeg: FfmpegChoice::FromPath,
            force: false,
            gif_width: 480,
            gif_height: 270,
            gif_fps: 20.0,
            progress: None,
            cancel: None,
        }
    }
}

impl std::fmt::Debug for VideoOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoOptions")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("fps", &self.fps)
            .field("style", &self.style)
            .field("ffmpeg", &self.ffmpeg)
            .field("force", &self.force)
            .finish_non_exhaustive()
    }
}

/// What [`render_video`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub enum VideoOutcome {
    /// The mp4 was written (with the music when audio was given).
    Mp4 {
        path: PathBuf,
        frames: u64,
        seconds: f64,
        /// The video encoder used (`libx264` or `mpeg4`).
        encoder: String,
        with_audio: bool,
    },
    /// No usable ffmpeg: an animated GIF without sound was written instead.
    GifFallback {
        path: PathBuf,
        frames: u64,
        seconds: f64,
        /// Why (e.g. "ffmpeg was not found on PATH").
        reason: String,
    },
}

impl VideoOutcome {
    /// The file written.
    pub fn path(&self) -> &Path {
        match self {
            VideoOutcome::Mp4 { path, .. } | VideoOutcome::GifFallback { path, .. } => path,
        }
    }
}

/// ffmpeg's arguments for the music of an mp4 (and of the html page where the song is made
/// compact, `danceba::page_audio`): AAC at 192 kb/s.
pub const AAC_AUDIO: [&str; 4] = ["-c:a", "aac", "-b:a", "192k"];

/// The first `ffmpeg` executable on PATH.
pub fn find_ffmpeg() -> Option<PathBuf> {
    find_on_path("ffmpeg")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for cand in [dir.join(name), dir.join(format!("{name}.exe"))] {
            if is_executable(&cand) {
                return Some(cand);
            }
        }
    }
    None
}

fn is_executable(p: &Path) -> bool {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o111 != 0
            }
            #[cfg(not(unix))]
            {
                true
            }
        }
        _ => false,
    }
}

fn ffmpeg_err(ffmpeg: &Path, message: impl Into<String>) -> RenderError {
    RenderError::Ffmpeg {
        ffmpeg: ffmpeg.to_path_buf(),
        message: message.into(),
    }
}

/// Whether this ffmpeg has the libx264 encoder.
fn has_libx264(ffmpeg: &Path) -> Result<bool, RenderError> {
    let out = Command::new(ffmpeg)
        .args(["-hide_banner", "-encoders"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ffmpeg_err(ffmpeg, format!("cannot run it: {e}")))?;
    if !out.status.success() {
        return Err(ffmpeg_err(ffmpeg, "`ffmpeg -encoders` failed"));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("libx264")))
}

/// Duration of a media file in seconds, from `ffmpeg -i` (its "Duration:" line).
pub fn probe_duration(ffmpeg: &Path, media: &Path) -> Result<f64, RenderError> {
    let out = Command::new(ffmpeg)
        .arg("-hide_banner")
        .arg("-i")
        .arg(media)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ffmpeg_err(ffmpeg, format!("cannot run it: {e}")))?;
    let text = String::from_utf8_lossy(&out.stderr);
    let parse = |s: &str| -> Option<f64> {
        let rest = s.split("Duration:").nth(1)?.trim_start();
        let hms = rest.split(',').next()?.trim();
        let mut it = hms.split(':');
        let h: f64 = it.next()?.parse().ok()?;
        let m: f64 = it.next()?.parse().ok()?;
        let s: f64 = it.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    };
    text.lines()
        .find_map(parse)
        .filter(|d| d.is_finite() && *d > 0.0)
        .ok_or_else(|| {
            let last = text.lines().last().unwrap_or("").trim().to_string();
            ffmpeg_err(
                ffmpeg,
                format!(
                    "cannot read the audio file {} ({last}); give a readable audio file",
                    media.display()
                ),
            )
        })
}

fn check_opts(opts: &VideoOptions) -> Result<(), RenderError> {
    for (w, h) in [(opts.width, opts.height), (opts.gif_width, opts.gif_height)] {
        if w % 2 != 0 || h % 2 != 0 || !(16..=8192).contains(&w) || !(16..=8192).contains(&h) {
            return Err(RenderError::BadSize {
                width: w,
                height: h,
            });
        }
    }
    for f in [opts.fps, opts.gif_fps] {
        if !(f.is_finite() && (1.0..=240.0).contains(&f)) {
            return Err(RenderError::BadFps(f));
        }
    }
    Ok(())
}

/// Draws one output frame: video frame `i` at `fps` maps to motion frame `⌊i·motion.fps/fps⌋`.
struct FrameSource<'a> {
    motion: &'a Motion,
    style: Style,
    rig: CameraRig,
    bg: RgbImage,
    fps: f32,
}

impl<'a> FrameSource<'a> {
    fn new(motion: &'a Motion, style: Style, width: u32, height: u32, fps: f32) -> Self {
        Self {
            motion,
            style,
            rig: CameraRig::new(motion, width, height),
            bg: background(width, height),
            fps,
        }
    }
    fn motion_frame(&self, i: u64) -> usize {
        let f = (i as f64 * self.motion.fps as f64 / self.fps as f64 + 1e-6).floor() as usize;
        f.min(self.motion.frames().saturating_sub(1))
    }
    fn draw(&self, i: u64) -> RgbImage {
        let f = self.motion_frame(i);
        match self.style {
            Style::Skeleton3d => {
                let mut img = self.bg.clone();
                let cam = self.rig.camera_at(f);
                draw_frame_into(&mut img, self.motion, f, &cam);
                img
            }
            Style::OpenPose => render_openpose_frame(self.motion, f, self.bg.width, self.bg.height),
        }
    }
}

fn cancelled(opts: &VideoOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Renders `motion` to `out` (an mp4), with `audio` muxed in when given; falls back to an
/// animated GIF beside `out` (same stem, `.gif`) when no ffmpeg is usable.
pub fn render_video(
    motion: &Motion,
    audio: Option<&Path>,
    out: &Path,
    opts: &VideoOptions,
) -> Result<VideoOutcome, RenderError> {
    check_opts(opts)?;
    if motion.frames() == 0 {
        return Err(RenderError::EmptyMotion);
    }
    let ffmpeg = match &opts.ffmpeg {
        FfmpegChoice::FromPath => find_ffmpeg().ok_or("ffmpeg was not found on PATH"),
        FfmpegChoice::Path(p) if is_executable(p) => Ok(p.clone()),
        FfmpegChoice::Path(_) => Err("the given ffmpeg is not an executable file"),
        FfmpegChoice::Disabled => Err("ffmpeg was disabled"),
    };
    match ffmpeg {
        Ok(ff) => render_mp4(motion, audio, out, opts, &ff),
        Err(reason) => {
            let gif = out.with_extension("gif");
            let (frames, seconds) = render_gif(motion, &gif, opts)?;
            Ok(VideoOutcome::GifFallback {
                path: gif,
                frames,
                seconds,
                reason: reason.to_string(),
            })
        }
    }
}

fn render_mp4(
    motion: &Motion,
    audio: Option<&Path>,
    out: &Path,
    opts: &VideoOptions,
    ffmpeg: &Path,
) -> Result<VideoOutcome, RenderError> {
    check_overwrite(out, opts.force)?;
    let motion_secs = motion.seconds() as f64;
    if let Some(a) = audio {
        if !a.is_file() {
            return Err(RenderError::ReadAudio {
                path: a.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        // a readable audio file, said now rather than as ffmpeg's failure after the frames
        probe_duration(ffmpeg, a)?;
    }
    // The video is the whole dance, as every other output is: a song that ends first (the
    // motion is 8 frames per token, a little longer than the song; much longer for the shortest
    // clips) is padded with silence, one that goes on is cut at the dance's end.
    let total = ((motion_secs * opts.fps as f64).round() as u64).max(1);
    let encoder = if has_libx264(ffmpeg)? {
        "libx264"
    } else {
        "mpeg4"
    };
    let tmp = temp_beside(out)?;

    let (w, h) = (opts.width, opts.height);
    let mut cmd = Command::new(ffmpeg);
    cmd.args(["-hide_banner", "-loglevel", "error", "-y"])
        // Frames arrive as yuv420p (converted in parallel here), so ffmpeg's single-threaded
        // colour conversion is not on the critical path and the pipe carries half the bytes.
        .args(["-f", "rawvideo", "-pix_fmt", "yuv420p"])
        .args(["-colorspace", "bt470bg", "-color_range", "tv"])
        .args(["-s", &format!("{w}x{h}"), "-r", &format!("{}", opts.fps)])
        .args(["-i", "pipe:0"]);
    if let Some(a) = audio {
        cmd.arg("-i")
            .arg(a)
            .args(["-map", "0:v:0", "-map", "1:a:0", "-af", "apad"]);
        cmd.args(AAC_AUDIO);
        cmd.args(["-t", &format!("{:.6}", total as f64 / opts.fps as f64)]);
    }
    cmd.args(["-c:v", encoder]);
    if encoder == "libx264" {
        // veryfast with the cheapest motion search: ~30% faster than plain veryfast at about
        // the same size for this content (flat background, thin lines).
        cmd.args(["-preset", "veryfast", "-crf", "21"])
            .args(["-x264-params", "ref=1:subme=1:me=dia:trellis=0"]);
    } else {
        cmd.args(["-q:v", "3"]);
    }
    cmd.args(["-pix_fmt", "yuv420p", "-colorspace", "bt470bg"])
        .args(["-color_primaries", "bt470bg", "-color_trc", "smpte170m"])
        .args(["-color_range", "tv", "-movflags", "+faststart", "-f", "mp4"])
        .arg(tmp.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| ffmpeg_err(ffmpeg, format!("cannot start it: {e}")))?;
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let Some(stdin) = child.stdin.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ffmpeg_err(ffmpeg, "no stdin pipe"));
    };

    let src = FrameSource::new(motion, opts.style, w, h, opts.fps);
    let written = pipe_frames(&src, total, stdin, opts);
    let fail = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    if let Err(e) = written {
        fail(&mut child);
        let msg = err_reader.join().unwrap_or_default();
        return Err(match e {
            PipeError::Cancelled => RenderError::Cancelled,
            PipeError::Io(io) => ffmpeg_err(
                ffmpeg,
                format!("writing frames failed ({io}): {}", msg.trim()),
            ),
        });
    }
    let status = child
        .wait()
        .map_err(|e| ffmpeg_err(ffmpeg, format!("waiting for it failed: {e}")))?;
    let msg = err_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(ffmpeg_err(
            ffmpeg,
            format!("exited with {status}: {}", msg.trim()),
        ));
    }
    persist(tmp, out, opts.force)?;
    Ok(VideoOutcome::Mp4 {
        path: out.to_path_buf(),
        frames: total,
        seconds: total as f64 / opts.fps as f64,
        encoder: encoder.to_string(),
        with_audio: audio.is_some(),
    })
}

enum PipeError {
    Cancelled,
    Io(std::io::Error),
}

/// Renders frames in parallel batches while a writer thread streams the previous batch to `sink`.
fn pipe_frames(
    src: &FrameSource<'_>,
    total: u64,
    sink: impl Write + Send,
    opts: &VideoOptions,
) -> Result<(), PipeError> {
    let batch = (rayon::current_num_threads() as u64 * 4).clamp(8, 64);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Vec<u8>>>(1);
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> std::io::Result<()> {
            let mut sink = std::io::BufWriter::with_capacity(1 << 20, sink);
            let mut done = 0u64;
            for frames in rx {
                for f in &frames {
                    sink.write_all(f)?;
                }
                done += frames.len() as u64;
                if let Some(p) = &opts.progress {
                    p(done, total);
                }
            }
            sink.flush()
        });
        let mut start = 0u64;
        let mut result = Ok(());
        while start < total {
            if cancelled(opts) {
                result = Err(PipeError::Cancelled);
                break;
            }
            let end = (start + batch).min(total);
            let frames: Vec<Vec<u8>> = (start..end)
                .into_par_iter()
                .map(|i| rgb_to_yuv420(&src.draw(i)))
                .collect();
            if tx.send(frames).is_err() {
                break; // the writer failed; its error is reported below
            }
            start = end;
        }
        drop(tx);
        let w = writer
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("frame writer panicked")));
        result?;
        w.map_err(PipeError::Io)
    })
}

/// Converts to planar YUV 4:2:0 (BT.601, limited range, chroma from the 2×2 mean), the same
/// conversion ffmpeg applies to rgb24 by default. Odd trailing rows/columns are ignored for
/// chroma.
pub fn rgb_to_yuv420(img: &RgbImage) -> Vec<u8> {
    let (w, h) = (img.width as usize, img.height as usize);
    let (cw, ch) = (w / 2, h / 2);
    let mut out = vec![0u8; w * h + 2 * cw * ch];
    let (ys, uv) = out.split_at_mut(w * h);
    let (us, vs) = uv.split_at_mut(cw * ch);
    for (yv, p) in ys.iter_mut().zip(img.data.chunks_exact(3)) {
        let (r, g, b) = (p[0] as i32, p[1] as i32, p[2] as i32);
        *yv = (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8;
    }
    for cy in 0..ch {
        let row0 = &img.data[(2 * cy) * w * 3..(2 * cy + 1) * w * 3];
        let row1 = &img.data[(2 * cy + 1) * w * 3..(2 * cy + 2) * w * 3];
        let urow = &mut us[cy * cw..(cy + 1) * cw];
        let vrow = &mut vs[cy * cw..(cy + 1) * cw];
        for (cx, (u, v)) in urow.iter_mut().zip(vrow.iter_mut()).enumerate() {
            let o = cx * 6;
            let sum = |c: usize| {
                row0[o + c] as i32
                    + row0[o + 3 + c] as i32
                    + row1[o + c] as i32
                    + row1[o + 3 + c] as i32
            };
            let (r, g, b) = ((sum(0) + 2) >> 2, (sum(1) + 2) >> 2, (sum(2) + 2) >> 2);
            *u = (((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128).clamp(0, 255) as u8;
            *v = (((112 * r - 94 * g - 18 * b + 128) >> 8) + 128).clamp(0, 255) as u8;
        }
    }
    out
}

/// A fixed 3-3-2 palette (8 red × 8 green × 4 blue levels).
fn palette_332() -> Vec<u8> {
    let mut p = Vec::with_capacity(768);
    for i in 0..256u32 {
        let r = (i >> 5) & 7;
        let g = (i >> 2) & 7;
        let b = i & 3;
        p.push((r * 255 / 7) as u8);
        p.push((g * 255 / 7) as u8);
        p.push((b * 255 / 3) as u8);
    }
    p
}

fn index_332(img: &RgbImage) -> Vec<u8> {
    // Round to the nearest level rather than truncating.
    let q = |v: u8, levels: u32| ((v as u32 * (levels - 1) + 127) / 255) as u8;
    img.data
        .chunks_exact(3)
        .map(|p| q(p[0], 8) << 5 | q(p[1], 8) << 2 | q(p[2], 4))
        .collect()
}

/// Writes the GIF fallback; returns (frames, seconds).
fn render_gif(motion: &Motion, out: &Path, opts: &VideoOptions) -> Result<(u64, f64), RenderError> {
    check_overwrite(out, opts.force)?;
    let (w, h) = (opts.gif_width, opts.gif_height);
    // GIF delays are in centiseconds: use a whole number of them per frame.
    let delay_cs = (100.0 / opts.gif_fps).round().max(2.0) as u16;
    let fps = 100.0 / delay_cs as f32;
    let total = ((motion.seconds() as f64 * fps as f64).round() as u64).max(1);
    let src = FrameSource::new(motion, opts.style, w, h, fps);
    let tmp = temp_beside(out)?;
    let wr = |source: std::io::Error| RenderError::Write {
        path: out.to_path_buf(),
        source,
    };
    let file = tmp.reopen().map_err(wr)?;
    let palette = palette_332();
    let gif_err = |e: gif::EncodingError| match e {
        gif::EncodingError::Io(io) => wr(io),
        other => RenderError::Gif(other.to_string()),
    };
    let mut enc = gif::Encoder::new(std::io::BufWriter::new(file), w as u16, h as u16, &palette)
        .map_err(gif_err)?;
    enc.set_repeat(gif::Repeat::Infinite).map_err(gif_err)?;
    let batch = (rayon::current_num_threads() as u64 * 4).clamp(8, 64);
    let mut start = 0;
    while start < total {
        if cancelled(opts) {
            return Err(RenderError::Cancelled);
        }
        let end = (start + batch).min(total);
        let frames: Vec<gif::Frame<'static>> = (start..end)
            .into_par_iter()
            .map(|i| {
                let img = src.draw(i);
                let mut f =
                    gif::Frame::from_indexed_pixels(w as u16, h as u16, index_332(&img), None);
                f.delay = delay_cs;
                f.make_lzw_pre_encoded();
                f
            })
            .collect();
        for f in &frames {
            enc.write_lzw_pre_encoded_frame(f).map_err(gif_err)?;
        }
        if let Some(p) = &opts.progress {
            p(end, total);
        }
        start = end;
    }
    let mut inner = enc.into_inner().map_err(gif_err)?;
    inner.flush().map_err(wr)?;
    drop(inner);
    persist(tmp, out, opts.force)?;
    Ok((total, total as f64 / fps as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuv420_conversion_matches_bt601_limited_range() {
        let mut img = RgbImage::new(4, 2, [0, 0, 0]);
        for x in 2..4 {
            for y in 0..2 {
                let o = (y * 4 + x) * 3;
                img.data[o..o + 3].copy_from_slice(&[255, 255, 255]);
            }
        }
        let yuv = rgb_to_yuv420(&img);
        assert_eq!(yuv.len(), 8 + 2 + 2);
        assert_eq!(&yuv[..4], &[16, 16, 235, 235]);
        assert_eq!(&yuv[8..], &[128, 128, 128, 128]);
        // Pure red: U 90, V 240 (BT.601).
        let red = RgbImage::new(2, 2, [255, 0, 0]);
        let yuv = rgb_to_yuv420(&red);
        assert_eq!((yuv[0], yuv[4], yuv[5]), (82, 90, 240));
    }
}
