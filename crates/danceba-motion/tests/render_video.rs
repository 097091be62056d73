//! Video renderer: frame sanity, the mp4 probed by ffprobe (960×540 60 fps video, an audio stream
//! of the song's length), the GIF fallback without ffmpeg, and atomic/no-overwrite output.
//! The ffmpeg tests skip (with a message) when ffmpeg/ffprobe are not installed.

mod common;

use common::{count_near, golden, have, synthetic_motion};
use danceba_motion::render::{self, scene, video, RenderError};
use std::path::Path;
use std::process::Command;

#[test]
fn a_rendered_frame_shows_the_skeleton_and_the_floor() {
    let motion = synthetic_motion(120);
    let rig = render::CameraRig::new(&motion, 960, 540);
    for f in [0, 59, 119] {
        let img = render::render_frame(&motion, f, &rig.camera_at(f));
        assert_eq!(
            (img.width, img.height, img.data.len()),
            (960, 540, 960 * 540 * 3)
        );
        let left = count_near(&img.data, scene::LEFT_RGB, 8);
        let right = count_near(&img.data, scene::RIGHT_RGB, 8);
        let centre = count_near(&img.data, scene::CENTER_RGB, 8);
        assert!(
            left > 200 && right > 200 && centre > 100,
            "{left} {right} {centre}"
        );
        // Floor grid: greyish-blue pixels clearly brighter than the background below the horizon.
        let grid = (270..540)
            .flat_map(|y| (0..960).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let p = img.get(x, y).unwrap();
                p[2] > 60 && p[2] as i32 - p[0] as i32 > 5 && p[2] < 200
            })
            .count();
        assert!(grid > 2000, "grid pixels {grid}");
        // The dancer is roughly centred by the follow camera.
        let xs: Vec<u32> = (0..540)
            .flat_map(|y| (0..960).map(move |x| (x, y)))
            .filter(|&(x, y)| {
                let p = img.get(x, y).unwrap();
                (0..3).all(|c| (p[c] as i32 - scene::LEFT_RGB[c] as i32).abs() <= 8)
            })
            .map(|(x, _)| x)
            .collect();
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        assert!((250.0..710.0).contains(&mean), "left side at x {mean}");
    }
}

#[test]
fn a_far_away_or_degenerate_motion_draws_without_panicking() {
    // All joints at one point, far from the origin: nothing NaN-driven, no panic.
    let motion = danceba_motion::Motion::new(vec![1.0e4; 72 * 4], 60.0).unwrap();
    let rig = render::CameraRig::new(&motion, 320, 180);
    let img = render::render_frame(&motion, 10, &rig.camera_at(10));
    assert_eq!(img.data.len(), 320 * 180 * 3);
    let op = render::render_openpose_frame(&motion, 3, 320, 180);
    assert_eq!(op.data.len(), 320 * 180 * 3);
}

#[test]
fn openpose_style_uses_the_official_projection_and_colours() {
    let motion = synthetic_motion(10);
    let kp = scene::openpose_keypoints(&motion, 0, 960, 540);
    // Slot 8 is the pelvis (SMPL 0): x = (X/3.3 + 1)·480, y = (Y/1.5 + 1)·270.
    let p = motion.joint(0, 0);
    assert!((kp[8][0] - (p[0] / 3.3 + 1.0) * 480.0).abs() < 1e-3);
    assert!((kp[8][1] - (p[1] / 1.5 + 1.0) * 270.0).abs() < 1e-3);
    let img = render::render_openpose_frame(&motion, 0, 960, 540);
    // The [1,8] edge (spine) is drawn in (153,0,0) somewhere; the image is flipped (y up).
    assert!(count_near(&img.data, [153, 0, 0], 40) > 20);
    let pelvis_row = (540.0 - 1.0 - kp[8][1].trunc()) as u32;
    let px = img.get(kp[8][0] as u32, pelvis_row).unwrap();
    assert!(px != [0, 0, 0], "pelvis not drawn at row {pelvis_row}");
}

fn ffprobe_streams(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_entries"])
        .arg("stream=codec_type,codec_name,width,height,r_frame_rate,duration")
        .args(["-of", "json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ffprobe_duration(path: &Path) -> f64 {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "format=duration",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn mp4_has_960x540_60fps_video_and_the_whole_dance_and_song() {
    if !have("ffmpeg") || !have("ffprobe") {
        eprintln!("SKIPPED: ffmpeg/ffprobe not found (apt-get install -y ffmpeg)");
        return;
    }
    let song = golden().join("audio/mono22k_mutilated_mime_12s.wav");
    let song_secs = ffprobe_duration(&song);
    // DanceBa's motion is 8(L+1) frames: a little longer than the song.
    let motion = synthetic_motion(((song_secs + 0.2) * 60.0) as usize);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dance.mp4");
    let outcome =
        video::render_video(&motion, Some(&song), &out, &video::VideoOptions::default()).unwrap();
    assert!(matches!(
        outcome,
        video::VideoOutcome::Mp4 {
            with_audio: true,
            ..
        }
    ));
    let v = ffprobe_streams(&out);
    let streams = v["streams"].as_array().unwrap();
    let video = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    assert_eq!(video["width"], 960);
    assert_eq!(video["height"], 540);
    assert_eq!(video["r_frame_rate"], "60/1");
    let audio = streams
        .iter()
        .find(|s| s["codec_type"] == "audio")
        .expect("audio stream");
    assert_eq!(audio["codec_name"], "aac");
    // the whole dance, the song padded with silence to its end
    let dance_secs = motion.frames() as f64 / 60.0;
    let vd: f64 = video["duration"].as_str().unwrap().parse().unwrap();
    assert!(
        (vd - dance_secs).abs() <= 1.0 / 60.0,
        "video {vd} s vs dance {dance_secs} s"
    );
    let a: f64 = audio["duration"].as_str().unwrap().parse().unwrap();
    assert!(
        a >= song_secs && (a - dance_secs).abs() <= 0.05,
        "audio {a} s vs song {song_secs} s and dance {dance_secs} s"
    );

    // No overwrite without force; nothing but the output in the directory.
    let again = video::render_video(&motion, Some(&song), &out, &video::VideoOptions::default());
    assert!(matches!(again, Err(RenderError::Exists { .. })));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_song_longer_than_the_motion_stops_at_the_motion() {
    if !have("ffmpeg") || !have("ffprobe") {
        eprintln!("SKIPPED: ffmpeg/ffprobe not found (apt-get install -y ffmpeg)");
        return;
    }
    let song = golden().join("audio/synth_machine_wars_20s.mp3");
    let motion = synthetic_motion(60 * 3);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("short.mp4");
    let opts = video::VideoOptions {
        style: video::Style::OpenPose,
        ..Default::default()
    };
    video::render_video(&motion, Some(&song), &out, &opts).unwrap();
    let v = ffprobe_streams(&out);
    for s in v["streams"].as_array().unwrap() {
        let d: f64 = s["duration"].as_str().unwrap().parse().unwrap();
        assert!((d - 3.0).abs() <= 0.1, "{} lasts {d} s", s["codec_type"]);
    }
}

#[test]
fn unreadable_audio_is_a_clear_error_and_leaves_no_file() {
    if !have("ffmpeg") {
        eprintln!("SKIPPED: ffmpeg not found (apt-get install -y ffmpeg)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.mp3");
    std::fs::write(&junk, b"this is not audio").unwrap();
    let out = dir.path().join("x.mp4");
    let err = video::render_video(
        &synthetic_motion(30),
        Some(&junk),
        &out,
        &video::VideoOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("junk.mp3"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn without_ffmpeg_a_gif_is_written_and_the_outcome_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dance.mp4");
    let motion = synthetic_motion(90);
    for choice in [
        video::FfmpegChoice::Disabled,
        video::FfmpegChoice::Path(dir.path().join("no-such-ffmpeg")),
    ] {
        let opts = video::VideoOptions {
            ffmpeg: choice,
            force: true,
            ..Default::default()
        };
        let outcome = video::render_video(&motion, None, &out, &opts).unwrap();
        let video::VideoOutcome::GifFallback {
            path,
            frames,
            reason,
            ..
        } = outcome
        else {
            panic!("expected the GIF fallback");
        };
        assert_eq!(path, dir.path().join("dance.gif"));
        assert_eq!(frames, 30); // 1.5 s at 20 fps
        assert!(!reason.is_empty());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..6], b"GIF89a");
        // Decode it back: 480×270, 30 frames, and the skeleton colours appear.
        let mut opts = gif::DecodeOptions::new();
        opts.set_color_output(gif::ColorOutput::RGBA);
        let mut dec = opts.read_info(std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!((dec.width(), dec.height()), (480, 270));
        let mut n = 0;
        let mut coloured = 0;
        while let Some(f) = dec.read_next_frame().unwrap() {
            n += 1;
            coloured += f
                .buffer
                .chunks_exact(4)
                .filter(|p| p[0] > 200 && p[2] < 80 && p[1] > 90 && p[1] < 190)
                .count();
        }
        assert_eq!(n, 30);
        assert!(coloured > 30 * 50, "orange pixels {coloured}");
    }
    assert!(!out.exists());
}

#[test]
fn cancelling_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.mp4");
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let opts = video::VideoOptions {
        ffmpeg: video::FfmpegChoice::Disabled,
        cancel: Some(cancel),
        ..Default::default()
    };
    let r = video::render_video(&synthetic_motion(300), None, &out, &opts);
    assert!(matches!(r, Err(RenderError::Cancelled)));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_drifting_small_figure_stays_in_view() {
    // The tiny golden model's dance drifts tens of metres and is a fraction of a person's size:
    // the follow camera, per-frame floor and size scaling keep it visible on every frame.
    let motion = common::golden_motion("rock_armygeddon_20s");
    let rig = render::CameraRig::new(&motion, 960, 540);
    let n = motion.frames();
    for f in [0, n / 4, n / 2, 3 * n / 4, n - 1] {
        let img = render::render_frame(&motion, f, &rig.camera_at(f));
        let px = count_near(&img.data, scene::LEFT_RGB, 8)
            + count_near(&img.data, scene::RIGHT_RGB, 8)
            + count_near(&img.data, scene::CENTER_RGB, 8);
        assert!(px > 300, "frame {f}: {px} skeleton pixels");
    }
}
