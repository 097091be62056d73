//! Renders a synthetic dance (a swaying stick figure) to html, mp4 (or GIF) and one PNG-less
//! frame timing, for eyeballing the renderers and timing them:
//! `cargo run -p danceba-motion --example render_synthetic --release -- OUTDIR SECONDS [AUDIO [draw|mp4]]`.

#[path = "../tests/common/mod.rs"]
mod common;

use danceba_motion::render::{html, video};
use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "render_out".into()));
    let secs: f32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20.0);
    let audio = args.next().map(PathBuf::from);
    // `ONLY`: "draw" (drawing alone), "mp4" (the 3D mp4 alone), else everything.
    let only = args.next().unwrap_or_default();
    std::fs::create_dir_all(&out)?;
    let motion = common::synthetic_motion((secs * 60.0) as usize);
    if only == "draw" {
        time_frames(&motion);
        return Ok(());
    }
    if only == "mp4" {
        let opts = video::VideoOptions {
            force: true,
            ..Default::default()
        };
        let t = Instant::now();
        let o = video::render_video(&motion, audio.as_deref(), &out.join("synthetic.mp4"), &opts)?;
        println!("{:?} in {:.2} s", o, t.elapsed().as_secs_f64());
        return Ok(());
    }
    time_frames(&motion);
    let t = Instant::now();
    html::write_html(
        &motion,
        audio.as_deref(),
        "synthetic",
        &out.join("synthetic.html"),
        true,
    )?;
    println!("html: {:.2} s", t.elapsed().as_secs_f64());
    for (name, style) in [
        ("synthetic", video::Style::Skeleton3d),
        ("synthetic_openpose", video::Style::OpenPose),
    ] {
        let opts = video::VideoOptions {
            force: true,
            style,
            ..Default::default()
        };
        let t = Instant::now();
        let o = video::render_video(
            &motion,
            audio.as_deref(),
            &out.join(format!("{name}.mp4")),
            &opts,
        )?;
        println!("{name}: {:?} in {:.2} s", o, t.elapsed().as_secs_f64());
    }
    let opts = video::VideoOptions {
        force: true,
        ffmpeg: video::FfmpegChoice::Disabled,
        ..Default::default()
    };
    let t = Instant::now();
    let o = video::render_video(&motion, None, &out.join("synthetic_fallback.mp4"), &opts)?;
    println!("gif: {:?} in {:.2} s", o, t.elapsed().as_secs_f64());
    Ok(())
}

/// Times drawing alone (no encoding) of all frames, in parallel.
fn time_frames(motion: &danceba_motion::Motion) {
    use rayon::prelude::*;
    let rig = danceba_motion::render::CameraRig::new(motion, 960, 540);
    let t = Instant::now();
    let n: usize = (0..motion.frames())
        .into_par_iter()
        .map(|f| {
            danceba_motion::render::render_frame(motion, f, &rig.camera_at(f)).data[0] as usize
        })
        .sum();
    println!(
        "drawing {} frames: {:.2} s ({n})",
        motion.frames(),
        t.elapsed().as_secs_f64()
    );
}
