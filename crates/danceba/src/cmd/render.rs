//! `danceba render`: re-export or re-render a saved motion (.npy or .json).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::outputs::{parse_formats, parse_style, write_page, Output};
use danceba_motion::export::{self, MotionMeta};
use danceba_motion::render::video::{render_video, VideoOptions, VideoOutcome};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Arguments of `danceba render`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  danceba render dances/song.json -o out/ --formats bvh,glb\n  \
danceba render song.npy -o out/ --formats mp4 --audio song.mp3\n  \
danceba render song.json -o out/ --formats npy,pkl.npy,json,bvh,glb,mp4,html --force"
)]
pub struct Args {
    /// A motion: a .json written by danceba (positions, tokens and settings), a .npy of absolute
    /// joint positions, shape (frames, 72), (frames, 24, 3) or (1, frames, 72), or an official
    /// DanceBa `<name>.pkl.npy` ({'pred_position': array}).
    pub input: PathBuf,
    /// Output directory (created if missing). Files are named after the input:
    /// `<stem>.<format>`.
    #[arg(short, long, default_value = ".")]
    pub output: PathBuf,
    /// Output formats, comma-separated: npy, pkl.npy (official), json, bvh, glb, mp4, html.
    #[arg(long, default_value = "bvh,glb", value_delimiter = ',')]
    pub formats: Vec<String>,
    /// Music to put in the mp4 and html. Default: the .json's source audio, if that file is next
    /// to the motion file.
    #[arg(long)]
    pub audio: Option<PathBuf>,
    /// Frame rate of a .npy input (default 60; a .json carries its own).
    #[arg(long)]
    pub fps: Option<f32>,
    /// Video style: 3d (our skeleton view) or openpose (the official 2D drawing).
    #[arg(long, default_value = "3d")]
    pub style: String,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
    /// No progress bar or messages (errors are still printed).
    #[arg(short, long)]
    pub quiet: bool,
}

/// "song.json" → "song"; "song.pkl.npy" → "song"; "a.b.npy" → "a.b".
fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dance".into());
    let lower = name.to_ascii_lowercase();
    let cut = [".pkl.npy", ".npy", ".json"]
        .iter()
        .find(|ext| lower.ends_with(*ext) && name.len() > ext.len())
        .map(|ext| name.len() - ext.len());
    match cut {
        Some(n) => name[..n].to_string(),
        None => name,
    }
}

pub fn run(args: Args) -> Result<()> {
    let quiet = args.quiet;
    let say = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };

    // Check everything that can be checked before writing anything.
    let outputs = parse_formats(&args.formats)?;
    let style = parse_style(&args.style)?;
    let fps = args.fps.unwrap_or(danceba::MOTION_FPS);
    if !(danceba_motion::Motion::MIN_FPS..=danceba_motion::Motion::MAX_FPS).contains(&fps) {
        bail!(
            "--fps must be between {} and {} frames per second, got {fps}",
            danceba_motion::Motion::MIN_FPS,
            danceba_motion::Motion::MAX_FPS,
        );
    }
    if let Some(a) = &args.audio {
        super::check_input_file(a, "--audio")?;
        // the page embeds the file as it is and the video muxes it: it must be audio
        danceba_audio::check_audio_file(a).context("--audio")?;
    }
    let (motion, meta): (_, MotionMeta) = export::read_motion(&args.input, fps)
        .with_context(|| format!("cannot read the motion {}", args.input.display()))?;
    if let Some(f) = args.fps.filter(|&f| f != motion.fps) {
        // a .json's own rate wins: asking for another would silently give it
        bail!(
            "--fps {f}: {} carries its own frame rate ({} fps); --fps applies to .npy inputs \
             (render its .npy, or leave --fps out)",
            args.input.display(),
            motion.fps
        );
    }

    let stem = stem(&args.input);
    let paths: Vec<(Output, PathBuf)> = outputs
        .iter()
        .map(|&o| (o, args.output.join(format!("{stem}.{}", o.extension()))))
        .collect();
    if !args.force {
        if let Some((_, p)) = paths.iter().find(|(_, p)| p.exists()) {
            bail!(
                "{} already exists; pass --force to overwrite it",
                p.display()
            );
        }
    }
    let _out_dir = super::create_output_dir(&args.output)?;

    // The music: --audio, else the .json's source audio when it sits beside the motion.
    let audio: Option<PathBuf> = args.audio.clone().or_else(|| {
        let name = meta.audio.as_ref()?;
        let dir = args.input.parent().unwrap_or(Path::new("."));
        let p = dir.join(Path::new(name).file_name()?);
        p.is_file().then_some(p)
    });
    let needs_audio = outputs
        .iter()
        .any(|o| matches!(o, Output::Video | Output::Html));
    if needs_audio {
        match (&audio, &meta.audio) {
            (Some(a), _) => say(&format!("music: {}", a.display())),
            (None, Some(name)) => say(&format!(
                "note: the source audio {name:?} is not next to the motion file; rendering \
                 without music (use --audio to give it)"
            )),
            (None, None) => {}
        }
    }

    // Ctrl-C stops between files and cancels a running video render; every file is written
    // atomically, so nothing partial is left. A second Ctrl-C exits at once.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let mut written = Vec::new();
    for (o, path) in paths {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted; files written so far are complete: {written:?}");
        }
        match o {
            Output::Export(format) => {
                export::export(&motion, &meta, format, &path, args.force)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                written.push(path);
            }
            Output::Html => {
                write_page(&motion, audio.as_deref(), &stem, &path, args.force, &say)?;
                written.push(path);
            }
            Output::Video => {
                let frames = motion.frames() as u64;
                let pb = if quiet {
                    ProgressBar::with_draw_target(Some(frames), ProgressDrawTarget::hidden())
                } else {
                    ProgressBar::new(frames)
                };
                if let Ok(s) = ProgressStyle::with_template(
                    "rendering [{bar:30}] {pos}/{len} frames  ETA {eta}",
                ) {
                    pb.set_style(s.progress_chars("=> "));
                }
                let pbc = pb.clone();
                let vopts = VideoOptions {
                    style,
                    force: args.force,
                    progress: Some(Arc::new(move |done, total| {
                        pbc.set_length(total);
                        pbc.set_position(done);
                    })),
                    cancel: Some(interrupted.clone()),
                    ..VideoOptions::default()
                };
                let outcome = render_video(&motion, audio.as_deref(), &path, &vopts)
                    .with_context(|| format!("cannot render {}", path.display()))?;
                pb.finish_and_clear();
                if let VideoOutcome::GifFallback { reason, .. } = &outcome {
                    say(&format!(
                        "note: {reason}; wrote an animated GIF without sound instead of an mp4 \
                         (install ffmpeg for mp4 with music)"
                    ));
                }
                written.push(outcome.path().to_path_buf());
            }
        }
    }
    for p in &written {
        say(&format!("wrote {}", p.display()));
    }
    say(&format!(
        "{} frames at {} fps ({:.2} s)",
        motion.frames(),
        motion.fps,
        motion.seconds()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        assert_eq!(stem(Path::new("a/song.json")), "song");
        assert_eq!(stem(Path::new("song.pkl.npy")), "song");
        assert_eq!(stem(Path::new("x.y.NPY")), "x.y");
        assert_eq!(stem(Path::new(".npy")), ".npy");
    }
}
