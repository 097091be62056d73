//! `danceba render` end to end through the binary.

use std::path::PathBuf;
use std::process::Command;

use danceba_motion::export::json::TokenStreams;
use danceba_motion::export::{self, Format, MotionMeta};
use danceba_motion::Motion;

mod common;
use common::{aiff16, failing_ffmpeg, page_music, tones, wav16};

fn golden_dir() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/golden"
        )),
    }
}

fn danceba() -> Command {
    Command::new(env!("CARGO_BIN_EXE_danceba"))
}

/// A short motion: the first second of the golden absolute pose.
fn motion() -> Motion {
    let bytes =
        std::fs::read(golden_dir().join("model/mono22k_mutilated_mime_12s.pipeline.safetensors"))
            .unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("pose_absolute").unwrap();
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take(60 * 72)
        .collect();
    Motion::new(v, 60.0).unwrap()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn render_reexports_a_json_motion() {
    let dir = tempfile::tempdir().unwrap();
    let m = motion();
    let meta = MotionMeta {
        tokens: Some(TokenStreams {
            up: vec![423; 8],
            down: vec![12; 8],
        }),
        audio: Some("missing.mp3".into()),
        ..Default::default()
    };
    let input = dir.path().join("dance.json");
    export::export(&m, &meta, Format::Json, &input, false).unwrap();
    let out = dir.path().join("out");
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--formats", "npy,pkl.npy,json,bvh,glb,html"]));
    assert!(ok, "{err}");
    for ext in ["npy", "pkl.npy", "json", "bvh", "glb", "html"] {
        let p = out.join(format!("dance.{ext}"));
        assert!(p.is_file(), "{} missing; {err}", p.display());
    }
    // The re-exported json keeps the motion and the tokens.
    let (back, meta2) = export::read_motion(&out.join("dance.json"), 60.0).unwrap();
    assert_eq!(back, m);
    assert_eq!(meta2.tokens, meta.tokens);
    let (npy, _) = export::read_motion(&out.join("dance.npy"), 60.0).unwrap();
    assert_eq!(npy, m);
    let bvh = std::fs::read_to_string(out.join("dance.bvh")).unwrap();
    assert!(bvh.contains("Frames: 60"));

    // Again without --force: refused before anything is written, files unchanged.
    let before = std::fs::read(out.join("dance.glb")).unwrap();
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--formats", "glb"]));
    assert!(!ok);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(out.join("dance.glb")).unwrap(), before);
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--formats", "glb", "--force"]));
    assert!(ok, "{err}");
}

#[test]
fn render_npy_to_video() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("d.npy");
    export::export(
        &motion(),
        &MotionMeta::default(),
        Format::Npy,
        &input,
        false,
    )
    .unwrap();
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&input)
        .arg("-o")
        .arg(dir.path())
        .args(["--formats", "mp4", "--quiet"]));
    assert!(ok, "{err}");
    // mp4 with ffmpeg, else the GIF fallback.
    assert!(
        dir.path().join("d.mp4").is_file() || dir.path().join("d.gif").is_file(),
        "{err}"
    );
}

#[test]
fn render_rejects_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // A .npy of the wrong shape.
    let bad = dir.path().join("bad.npy");
    let mut h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 71), }".to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(&[0u8; 2 * 71 * 4]);
    std::fs::write(&bad, bytes).unwrap();
    let (ok, err) = run(danceba().arg("render").arg(&bad).arg("-o").arg(&out));
    assert!(!ok);
    assert!(err.contains("(frames, 72)"), "{err}");
    assert!(!out.exists(), "nothing may be created for a bad input");
    // Unknown format, missing file, unwritable output directory.
    let good = dir.path().join("good.npy");
    export::export(&motion(), &MotionMeta::default(), Format::Npy, &good, false).unwrap();
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&good)
        .args(["--formats", "fbx"]));
    assert!(!ok && err.contains("choose from"), "{err}");
    let (ok, err) = run(danceba().arg("render").arg(dir.path().join("nope.json")));
    assert!(!ok && err.contains("nope.json"), "{err}");
    let file_as_dir = dir.path().join("plain");
    std::fs::write(&file_as_dir, b"x").unwrap();
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&good)
        .arg("-o")
        .arg(file_as_dir.join("sub")));
    assert!(!ok && err.contains("output directory"), "{err}");
    // --fps for a .json, which carries its own rate: refused (it was silently ignored), unless
    // it is that rate; for a .npy it is the rate
    let good_json = dir.path().join("good.json");
    export::export(
        &motion(),
        &MotionMeta::default(),
        Format::Json,
        &good_json,
        false,
    )
    .unwrap();
    let fps_out = dir.path().join("fps");
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&good_json)
        .args(["--formats", "json", "--fps", "30", "-o"])
        .arg(&fps_out));
    assert!(!ok && err.contains("carries its own frame rate"), "{err}");
    assert!(!fps_out.exists());
    for input in [&good_json, &good] {
        let rate = if input == &good { "30" } else { "60" };
        let (ok, err) = run(danceba()
            .arg("render")
            .arg(input)
            .args(["--formats", "json", "--fps", rate, "--force", "-o"])
            .arg(&fps_out));
        assert!(ok, "{err}");
        let stem = input.file_stem().unwrap().to_string_lossy();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fps_out.join(format!("{stem}.json"))).unwrap())
                .unwrap();
        assert_eq!(v["fps"].as_f64().unwrap().to_string(), rate);
    }
    // --audio that is not audio is refused before anything is written (the page embedded it
    // as it was, "audio/mpeg" of a text file)
    let text = dir.path().join("notes.mp3");
    std::fs::write(&text, b"hello, this is not audio").unwrap();
    let out2 = dir.path().join("out2");
    let (ok, err) = run(danceba()
        .arg("render")
        .arg(&good)
        .args(["--formats", "html", "--audio"])
        .arg(&text)
        .arg("-o")
        .arg(&out2));
    assert!(
        !ok && err.contains("--audio") && err.contains("notes.mp3"),
        "{err}"
    );
    assert!(!out2.exists(), "nothing may be created for a bad --audio");
}

/// Renders `d.html` of the short motion with `music` into a new directory under `dir`, with
/// PATH set to `path` (None: as it is); returns the directory and stderr.
fn render_page(
    dir: &std::path::Path,
    name: &str,
    music: &std::path::Path,
    path: Option<&std::path::Path>,
) -> (PathBuf, String) {
    let input = dir.join("d.npy");
    if !input.exists() {
        export::export(
            &motion(),
            &MotionMeta::default(),
            Format::Npy,
            &input,
            false,
        )
        .unwrap();
    }
    let out = dir.join(name);
    let mut cmd = danceba();
    cmd.arg("render")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(["--formats", "html", "--audio"])
        .arg(music);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let (ok, err) = run(&mut cmd);
    assert!(ok, "{name}: {err}");
    // the page only: no temporary copy of the music is left
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["d.html"], "{name}");
    (out, err)
}

/// AIFF and Apple Lossless (which only Safari plays) reach the page as AAC made by ffmpeg, or
/// without ffmpeg as a WAV of the same samples; a WAV is made compact by ffmpeg and is embedded
/// as it is without.
#[test]
fn html_pages_embed_music_every_browser_plays() {
    let dir = tempfile::tempdir().unwrap();
    let rate = 44_100;
    let samples = tones(3.0, rate);
    let aiff = dir.path().join("song.aiff");
    std::fs::write(&aiff, aiff16(&samples, rate)).unwrap();
    let wav = dir.path().join("song.wav");
    let wav_bytes = wav16(&samples, rate);
    std::fs::write(&wav, &wav_bytes).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();

    // no ffmpeg: the AIFF decoded to a 16-bit WAV of exactly its samples
    let (out, _) = render_page(dir.path(), "aiff-plain", &aiff, Some(&empty));
    let (mime, bytes) = page_music(&out.join("d.html"));
    assert_eq!(mime, "audio/wav");
    assert_eq!(&bytes[..4], b"RIFF");
    assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), rate);
    assert_eq!(u16::from_le_bytes(bytes[22..24].try_into().unwrap()), 2);
    let got: Vec<i16> = bytes[44..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert!(
        got == samples,
        "the WAV copy's samples differ from the AIFF's"
    );

    // no ffmpeg: a WAV as it is
    let (out, _) = render_page(dir.path(), "wav-plain", &wav, Some(&empty));
    assert_eq!(
        page_music(&out.join("d.html")),
        ("audio/wav".into(), wav_bytes.clone())
    );

    // an ffmpeg that fails: said, and the page still has music
    let bin = failing_ffmpeg(dir.path(), "Unknown encoder 'aac'");
    let (out, err) = render_page(dir.path(), "aiff-failing", &aiff, Some(&bin));
    assert!(err.contains("could not make an AAC copy"), "{err}");
    assert!(err.contains("Unknown encoder 'aac'"), "{err}");
    assert_eq!(page_music(&out.join("d.html")).0, "audio/wav");

    let Some(ffmpeg) = danceba_motion::render::video::find_ffmpeg() else {
        eprintln!(
            "SKIPPED: ffmpeg not installed; the AAC copies and Apple Lossless are not tested"
        );
        return;
    };
    // Apple Lossless in .m4a (the Music app's lossless files; Safari only): decoded to a WAV
    // without ffmpeg although its container is the one AAC comes in
    let alac = dir.path().join("song-alac.m4a");
    let made = std::process::Command::new(&ffmpeg)
        .args(["-nostdin", "-loglevel", "error", "-y", "-i"])
        .arg(&wav)
        .args(["-c:a", "alac"])
        .arg(&alac)
        .status()
        .unwrap();
    assert!(made.success(), "ffmpeg could not make an ALAC file");
    let (out, _) = render_page(dir.path(), "alac-plain", &alac, Some(&empty));
    let (mime, bytes) = page_music(&out.join("d.html"));
    assert_eq!(mime, "audio/wav");
    let got: Vec<i16> = bytes[44..]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert!(
        got == samples,
        "the WAV copy's samples differ from the ALAC's"
    );

    for (name, music) in [("aiff-aac", &aiff), ("wav-aac", &wav), ("alac-aac", &alac)] {
        let (out, _) = render_page(dir.path(), name, music, None);
        let page = out.join("d.html");
        let (mime, bytes) = page_music(&page);
        assert_eq!(mime, "audio/mp4", "{name}");
        // 192 kb/s against 1411 kb/s
        assert!(
            std::fs::metadata(&page).unwrap().len() < wav_bytes.len() as u64 / 3,
            "{name}: the page is not smaller"
        );
        let m4a = dir.path().join(format!("{name}.m4a"));
        std::fs::write(&m4a, &bytes).unwrap();
        assert_eq!(
            danceba_audio::decode::codec_name(&m4a).unwrap(),
            "aac",
            "{name}"
        );
        let pcm = danceba_audio::decode::decode_file(&m4a).unwrap();
        assert_eq!((pcm.channels, pcm.sample_rate), (2, rate), "{name}");
        let seconds = pcm.frames() as f64 / f64::from(rate);
        // (the decoder keeps the encoder's priming and padding, up to ~0.05 s)
        assert!(
            (seconds - 3.0).abs() < 0.1,
            "{name}: {seconds} s of AAC for 3 s of music"
        );
    }
}
