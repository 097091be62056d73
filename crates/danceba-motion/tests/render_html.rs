//! The html viewer opened in real headless Chromium shows a skeleton and reports no errors.
//! Skips (with a message) when `chromium` is not installed (Debian package `chromium`).

mod common;

use common::{count_near, golden, synthetic_motion};
use danceba_motion::render::{html, scene};
use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(PathBuf::from(name));
        }
    }
    None
}

/// Runs headless Chromium on `url` with `extra` args; returns stdout.
fn run_chromium(chrome: &Path, profile: &Path, url: &str, extra: &[String]) -> String {
    let out = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--mute-audio",
            "--autoplay-policy=no-user-gesture-required",
            "--window-size=960,540",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn attr<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let i = dom.find("id=\"status\"")?;
    let tag_end = dom[i..].find('>')? + i;
    let tag = &dom[..tag_end];
    let key = format!("{name}=\"");
    let s = tag.rfind(&key)? + key.len();
    let e = tag[s..].find('"')? + s;
    Some(&dom[s..e])
}

fn check_viewer(audio: Option<&Path>) {
    check_viewer_with(synthetic_motion(60 * 12), audio);
}

fn check_viewer_with(motion: danceba_motion::Motion, audio: Option<&Path>) {
    let Some(chrome) = chromium() else {
        eprintln!("SKIPPED: chromium not found (apt-get install -y chromium)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("dance.html");
    html::write_html(&motion, audio, "test dance", &page, false).unwrap();
    let url = format!("file://{}#autoplay", page.display());

    // The page state after playback has started.
    let dom = run_chromium(
        &chrome,
        &dir.path().join("p1"),
        &url,
        &["--dump-dom".into()],
    );
    let state = attr(&dom, "data-state");
    let errors = attr(&dom, "data-errors");
    let frame: usize = attr(&dom, "data-frame")
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        errors,
        Some("0"),
        "page reported errors: {:?}",
        dom.find("error:")
            .map(|i| &dom[i..(i + 200).min(dom.len())])
    );
    assert_eq!(state, Some("playing"), "state {state:?}");
    eprintln!("viewer state {state:?}, frame {frame}");

    // A screenshot shows the skeleton in its colours.
    let shot = dir.path().join("shot.png");
    run_chromium(
        &chrome,
        &dir.path().join("p2"),
        &url,
        &[format!("--screenshot={}", shot.display())],
    );
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = info.line_size / info.width as usize;
    let rgb: Vec<u8> = buf[..info.buffer_size()]
        .chunks_exact(bpp)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    let left = count_near(&rgb, scene::LEFT_RGB, 12);
    let right = count_near(&rgb, scene::RIGHT_RGB, 12);
    let centre = count_near(&rgb, scene::CENTER_RGB, 12);
    eprintln!("skeleton pixels: left {left}, right {right}, centre {centre}");
    assert!(
        left > 150 && right > 150 && centre > 100,
        "no skeleton visible: {left} {right} {centre}"
    );
}

#[test]
fn html_viewer_plays_with_music_in_headless_chromium() {
    let audio = golden().join("audio/electronic_motion_20s.ogg");
    check_viewer(Some(&audio));
}

#[test]
fn html_viewer_plays_without_music_in_headless_chromium() {
    check_viewer(None);
}

#[test]
fn html_viewer_shows_the_tiny_golden_models_dance() {
    let motion = common::golden_motion("rock_armygeddon_20s");
    let audio = golden().join("audio/rock_armygeddon_20s.wav");
    check_viewer_with(motion, Some(&audio));
}

/// The music `danceba` embeds for WAV, FLAC and AIFF songs where ffmpeg is installed: AAC at
/// 192 kb/s in MP4 (made here by ffmpeg as `danceba::page_audio` makes it).
#[test]
fn html_viewer_plays_aac_music_in_headless_chromium() {
    let Some(ffmpeg) = danceba_motion::render::video::find_ffmpeg() else {
        eprintln!("SKIPPED: ffmpeg not installed (it makes the AAC copy)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let m4a = dir.path().join("music.m4a");
    let ok = Command::new(ffmpeg)
        .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
        .arg(golden().join("audio/rock_armygeddon_20s.wav"))
        .args(["-map", "0:a:0", "-vn"])
        .args(danceba_motion::render::video::AAC_AUDIO)
        .args(["-movflags", "+faststart", "-f", "mp4"])
        .arg(&m4a)
        .status()
        .unwrap()
        .success();
    assert!(ok, "ffmpeg could not make the AAC copy");
    check_viewer(Some(&m4a));
}
