//! End-to-end tests of `danceba generate`: the real binary on the golden clips with the tiny golden
//! checkpoints.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

mod common;

fn golden() -> PathBuf {
    match std::env::var_os("DANCEBA_GOLDEN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"),
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_danceba"));
    // No weights from the environment of whoever runs the tests.
    c.env_remove("DANCEBA_WEIGHTS");
    c
}

fn tiny() -> [String; 4] {
    models("tiny_gpt.pt", "tiny_vqvae.pt")
}

/// `--gpt golden/model/GPT --vqvae golden/model/VQVAE`.
fn models(gpt: &str, vqvae: &str) -> [String; 4] {
    let m = golden().join("model");
    [
        "--gpt".into(),
        m.join(gpt).display().to_string(),
        "--vqvae".into(),
        m.join(vqvae).display().to_string(),
    ]
}

/// `danceba generate INPUT MODELS --formats FORMATS -o OUT`.
fn generate(input: &Path, models: &[String], formats: &str, out: &Path) -> Command {
    let mut c = bin();
    c.arg("generate")
        .arg(input)
        .args(models)
        .args(["--formats", formats, "-o"])
        .arg(out);
    c
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run danceba");
    assert!(
        out.status.success(),
        "danceba failed: {}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run danceba");
    assert!(!out.status.success(), "danceba unexpectedly succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "panic: {err}");
    err
}

fn read_f32(st: &SafeTensors, key: &str) -> Vec<f32> {
    let v = st.tensor(key).unwrap();
    v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_i64(st: &SafeTensors, key: &str) -> Vec<i64> {
    let v = st.tensor(key).unwrap();
    v.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

struct GoldenPipeline {
    up: Vec<i64>,
    down: Vec<i64>,
    margin_up: Vec<f32>,
    margin_down: Vec<f32>,
    pose_absolute: Vec<f32>,
}

fn golden_pipeline(clip: &str) -> GoldenPipeline {
    let bytes = std::fs::read(golden().join(format!("model/{clip}.pipeline.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    GoldenPipeline {
        up: read_i64(&st, "tokens_up"),
        down: read_i64(&st, "tokens_down"),
        margin_up: read_f32(&st, "margin_up"),
        margin_down: read_f32(&st, "margin_down"),
        pose_absolute: read_f32(&st, "pose_absolute"),
    }
}

fn json_tokens(path: &Path) -> (Vec<i64>, Vec<i64>) {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let get = |k: &str| -> Vec<i64> {
        v["tokens"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    (get("up"), get("down"))
}

/// Steps whose golden margin exceeds 1e-3 must give the golden token; returns the match rate
/// over all steps.
fn compare_tokens(g: &GoldenPipeline, up: &[i64], down: &[i64], strict: bool, what: &str) -> f64 {
    assert_eq!(up.len(), g.up.len(), "{what}: token count");
    assert_eq!(down.len(), g.down.len(), "{what}: token count");
    assert_eq!((up[0], down[0]), (423, 12), "{what}: start tokens");
    let mut same = 0;
    let mut decisive_mismatch = Vec::new();
    for k in 0..g.margin_up.len() {
        for (mine, gold, margin, s) in [
            (up[k + 1], g.up[k + 1], g.margin_up[k], "up"),
            (down[k + 1], g.down[k + 1], g.margin_down[k], "down"),
        ] {
            if mine == gold {
                same += 1;
            } else if margin > 1e-3 {
                decisive_mismatch.push((k, s, mine, gold, margin));
            }
        }
    }
    let rate = same as f64 / (2 * g.margin_up.len()) as f64;
    eprintln!(
        "{what}: {:.2} % of tokens equal the golden ones",
        rate * 100.0
    );
    if strict {
        assert!(
            decisive_mismatch.is_empty(),
            "{what}: tokens differ at decisive steps (step, stream, ours, golden, margin): {decisive_mismatch:?}"
        );
    }
    rate
}

fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
    assert!(header.contains("'<f4'"), "{header}");
    let shape_s = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_s
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

const PIPELINE_CLIPS: [&str; 3] = [
    "electronic_motion_20s",
    "mono22k_mutilated_mime_12s",
    "rock_armygeddon_20s",
];

#[test]
fn from_golden_features_the_pipeline_matches_the_official_one() {
    let dir = tempfile::tempdir().unwrap();
    let inputs: Vec<PathBuf> = PIPELINE_CLIPS
        .iter()
        .map(|c| golden().join(format!("features/{c}.features.safetensors")))
        .collect();
    // All three songs in one batched run.
    let out = run_ok(
        bin()
            .arg("generate")
            .args(&inputs)
            .args(tiny())
            .args(["--formats", "json,npy", "--json", "-o"])
            .arg(dir.path()),
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json summary");
    assert_eq!(summary["dances"].as_array().unwrap().len(), 3);
    for clip in PIPELINE_CLIPS {
        let g = golden_pipeline(clip);
        let (up, down) = json_tokens(&dir.path().join(format!("{clip}.features.json")));
        compare_tokens(&g, &up, &down, true, clip);
        if up.iter().zip(&g.up).all(|(a, b)| a == b)
            && down.iter().zip(&g.down).all(|(a, b)| a == b)
        {
            let (shape, pos) = read_npy_f32(&dir.path().join(format!("{clip}.features.npy")));
            assert_eq!(shape, vec![g.pose_absolute.len() / 72, 72]);
            let err = pos
                .iter()
                .zip(&g.pose_absolute)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 1e-4, "{clip}: pose_absolute differs by {err}");
        }
    }
}

fn ffprobe_streams(path: &Path) -> Option<serde_json::Value> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_streams",
            "-show_format",
        ])
        .arg(path)
        .output()
        .ok()?;
    assert!(out.status.success(), "ffprobe failed on {}", path.display());
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

fn audio_seconds(path: &Path) -> Option<f64> {
    let v = ffprobe_streams(path)?;
    v["format"]["duration"].as_str()?.parse().ok()
}

#[test]
fn every_golden_clip_gives_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let audio_dir = golden().join("audio");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&audio_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "md"))
        .collect();
    inputs.sort();
    assert_eq!(inputs.len(), 5);
    run_ok(
        bin()
            .arg("generate")
            .args(&inputs)
            .args(tiny())
            .args(["--quiet", "-o"])
            .arg(dir.path()),
    );
    let have_ffprobe = Command::new("ffprobe").arg("-version").output().is_ok();
    for input in &inputs {
        let stem = input.file_stem().unwrap().to_string_lossy().into_owned();
        for ext in ["npy", "json", "bvh", "glb", "html"] {
            let p = dir.path().join(format!("{stem}.{ext}"));
            assert!(
                p.metadata().map(|m| m.len() > 0).unwrap_or(false),
                "missing {}",
                p.display()
            );
        }
        let mp4 = dir.path().join(format!("{stem}.mp4"));
        if !have_ffprobe {
            eprintln!("ffmpeg/ffprobe not installed: mp4 checks skipped");
            continue;
        }
        let v = ffprobe_streams(&mp4).unwrap();
        let streams = v["streams"].as_array().unwrap();
        let video = streams
            .iter()
            .find(|s| s["codec_type"] == "video")
            .expect("video stream");
        assert_eq!(video["width"], 960);
        assert_eq!(video["height"], 540);
        assert_eq!(video["r_frame_rate"], "60/1");
        let audio = streams
            .iter()
            .find(|s| s["codec_type"] == "audio")
            .expect("audio stream");
        // the whole dance (8 frames per token, a little longer than the song), the song padded
        // with silence to its end
        let (shape, _) = read_npy_f32(&dir.path().join(format!("{stem}.npy")));
        let dance = shape[0] as f64 / 60.0;
        let got: f64 = video["duration"].as_str().unwrap().parse().unwrap();
        assert!(
            (got - dance).abs() <= 1.0 / 60.0,
            "{stem}: video {got} s, dance {dance} s"
        );
        let got: f64 = audio["duration"].as_str().unwrap().parse().unwrap();
        let song = audio_seconds(input).unwrap();
        assert!(
            got >= song - 0.05 && (got - dance).abs() <= 0.05,
            "{stem}: audio {got} s, song {song} s, dance {dance} s"
        );
        // Lossless inputs reproduce the official tokens end to end; lossy ones are reported.
        if let Some(clip) = PIPELINE_CLIPS.iter().find(|c| **c == stem) {
            let g = golden_pipeline(clip);
            let (up, down) = json_tokens(&dir.path().join(format!("{stem}.json")));
            let lossless = input.extension().is_some_and(|e| e == "wav" || e == "flac");
            compare_tokens(&g, &up, &down, lossless, &format!("{stem} from audio"));
        }
    }
}

#[test]
fn without_ffmpeg_the_video_falls_back_to_a_gif() {
    let dir = tempfile::tempdir().unwrap();
    let input = golden().join("audio/mono22k_mutilated_mime_12s.wav");
    let empty = tempfile::tempdir().unwrap();
    let out = run_ok(
        bin()
            .env("PATH", empty.path())
            .arg("generate")
            .arg(&input)
            .args(tiny())
            .args(["--formats", "mp4", "--max-seconds", "3", "-o"])
            .arg(dir.path()),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GIF"), "the fallback is announced: {err}");
    let gif = dir.path().join("mono22k_mutilated_mime_12s.gif");
    let bytes = std::fs::read(&gif).expect("gif written");
    assert_eq!(&bytes[..6], b"GIF89a");
    assert!(!dir.path().join("mono22k_mutilated_mime_12s.mp4").exists());
}

#[test]
fn feature_json_and_audio_give_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let input = golden().join("audio/rock_armygeddon_20s.wav");
    let feats = dir.path().join("rock_feats.json");
    run_ok(bin().arg("features").arg(&input).arg("-o").arg(&feats));
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    run_ok(
        bin()
            .arg("generate")
            .arg(&input)
            .args(tiny())
            .args(["--formats", "json", "--quiet", "-o"])
            .arg(&a),
    );
    run_ok(
        bin()
            .arg("generate")
            .arg(&feats)
            .args(tiny())
            .args(["--formats", "json", "--quiet", "-o"])
            .arg(&b),
    );
    let ta = json_tokens(&a.join("rock_armygeddon_20s.json"));
    let tb = json_tokens(&b.join("rock_feats.json"));
    assert_eq!(ta, tb);
}

#[test]
fn user_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let song = golden().join("audio/mono22k_mutilated_mime_12s.wav");

    // No weights anywhere: names the download command.
    let home = tempfile::tempdir().unwrap();
    let err = run_err(
        bin()
            .env("HF_HOME", home.path())
            .env("HOME", home.path())
            .env("XDG_CACHE_HOME", home.path())
            .arg("generate")
            .arg(&song)
            .arg("-o")
            .arg(dir.path()),
    );
    assert!(err.contains("danceba download"), "{err}");

    // A VQ-VAE given as the GPT.
    let vq_twice = models("tiny_vqvae.pt", "tiny_vqvae.pt");
    let err = run_err(&mut generate(&song, &vq_twice, "npy", dir.path()));
    assert!(err.to_lowercase().contains("vq"), "{err}");
    // the two checkpoints the other way round: said once, with the likely cause
    let swapped = models("tiny_vqvae.pt", "tiny_gpt.pt");
    let err = run_err(&mut generate(&song, &swapped, "npy", dir.path()));
    assert!(err.contains("swapped"), "{err}");
    assert_eq!(err.matches("expected a gpt checkpoint").count(), 1, "{err}");

    // A directory given as a song.
    let audio_dir = golden().join("audio");
    let err = run_err(&mut generate(&audio_dir, &tiny(), "npy", dir.path()));
    assert!(err.contains("is a directory"), "{err}");

    // Unreadable audio.
    let bogus = dir.path().join("notes.mp3");
    std::fs::write(&bogus, b"this is not audio").unwrap();
    let err = run_err(&mut generate(&bogus, &tiny(), "npy", dir.path()));
    assert!(err.contains("notes.mp3"), "{err}");
    assert!(!dir.path().join("notes.npy").exists());
    // a failed run leaves no empty output directory behind
    let fresh = dir.path().join("fresh/out");
    run_err(&mut generate(&bogus, &tiny(), "npy", &fresh));
    assert!(!fresh.exists());
    // with --json the failure is also one JSON object on stdout
    let out = generate(&bogus, &tiny(), "npy", dir.path())
        .arg("--json")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(!out.status.success());
    assert!(v["error"].as_str().unwrap().contains("notes.mp3"), "{v}");

    // An output directory that cannot be created (a file is in the way).
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let err = run_err(&mut generate(&song, &tiny(), "npy", &blocker.join("out")));
    assert!(err.contains("output directory"), "{err}");
    // the file itself as the output directory
    let err = run_err(&mut generate(&song, &tiny(), "npy", &blocker));
    assert!(err.contains("is a file"), "{err}");

    // Sampling settings out of range, negative numbers included, refused before the model
    // is loaded (the output names the setting, and nothing was loaded).
    for (flag, value, what) in [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top-p"),
        ("--top-k", "0", "top-k"),
        ("--max-seconds", "-1", "max-seconds"),
    ] {
        let mut cmd = generate(&song, &tiny(), "npy", dir.path());
        let out = cmd.args([flag, value]).output().unwrap();
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains(what) && text.contains(value), "{text}");
        assert!(!text.contains("loading"), "{text}");
    }

    // Two inputs whose outputs meet under different stems: refused before any work, nothing
    // written ("a.pkl" as npy and "a" as pkl.npy are both a.pkl.npy).
    let meet = dir.path().join("meet");
    std::fs::create_dir_all(&meet).unwrap();
    let (a, a_pkl) = (meet.join("a.wav"), meet.join("a.pkl.wav"));
    std::fs::copy(&song, &a).unwrap();
    std::fs::copy(&song, &a_pkl).unwrap();
    let out = meet.join("out");
    let err = run_err(
        bin()
            .arg("generate")
            .args([&a, &a_pkl])
            .args(tiny())
            .args(["--formats", "npy,pkl.npy", "-o"])
            .arg(&out),
    );
    assert!(
        err.contains("would both write") && err.contains("a.pkl.npy"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written, not even the directory");

    // An output directory where no file can be created (even as root): said before the work.
    #[cfg(target_os = "linux")]
    {
        let err = run_err(&mut generate(
            &song,
            &tiny(),
            "npy",
            Path::new("/proc/self"),
        ));
        assert!(
            err.contains("cannot create files in the output directory"),
            "{err}"
        );
        assert!(!err.contains("loading"), "{err}");
    }

    // A device given as a checkpoint is said to be one (its size reads 0: not "empty")
    #[cfg(target_os = "linux")]
    {
        let mut cmd = bin();
        cmd.arg("generate").arg(&song).arg("--gpt").arg("/dev/zero");
        cmd.arg("--vqvae")
            .arg(golden().join("model/tiny_vqvae.pt"))
            .arg("-o")
            .arg(dir.path());
        let err = run_err(&mut cmd);
        assert!(err.contains("not a regular file"), "{err}");
    }

    // A seed without sampling would do nothing: said, before the model is loaded.
    let err = run_err(generate(&song, &tiny(), "npy", dir.path()).args(["--seed", "7"]));
    assert!(
        err.contains("--seed 7") && err.contains("--temperature"),
        "{err}"
    );
    assert!(!err.contains("loading"), "{err}");
    // Temperature 0 is the greedy choice whatever top-k says, and is recorded as greedy.
    let t0 = dir.path().join("t0");
    run_ok(generate(&song, &tiny(), "json", &t0).args([
        "--temperature",
        "0",
        "--top-k",
        "5",
        "--max-seconds",
        "2",
        "--quiet",
    ]));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t0.join("mono22k_mutilated_mime_12s.json")).unwrap())
            .unwrap();
    assert_eq!(
        json["sampling"]["strategy"], "greedy",
        "{}",
        json["sampling"]
    );

    // Unknown format.
    let err = run_err(&mut generate(&song, &tiny(), "npy,fbx", dir.path()));
    assert!(err.contains("fbx") && err.contains("glb"), "{err}");

    // Existing outputs are not overwritten without --force, and are untouched.
    let out = dir.path().join("existing");
    std::fs::create_dir_all(&out).unwrap();
    let target = out.join("mono22k_mutilated_mime_12s.npy");
    std::fs::write(&target, b"keep me").unwrap();
    let err = run_err(&mut generate(&song, &tiny(), "npy", &out));
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    run_ok(
        bin()
            .arg("generate")
            .arg(&song)
            .args(tiny())
            .args([
                "--formats",
                "npy",
                "--force",
                "--quiet",
                "--max-seconds",
                "2",
                "-o",
            ])
            .arg(&out),
    );
    assert_ne!(std::fs::read(&target).unwrap(), b"keep me");
}

/// `--start-tokens` and `--seed-motion` set the first token pair: given, and encoded from a
/// saved dance (the dance's own first pair, which the VQ-VAE round-trips); a missing seed file
/// or a malformed pair is said before the model is loaded.
#[test]
fn start_tokens_and_seed_motion() {
    let dir = tempfile::tempdir().unwrap();
    let song = golden().join("audio/mono22k_mutilated_mime_12s.wav");
    let start_of = |json: &Path| {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        (
            v["start_tokens"]["up"].clone(),
            v["start_tokens"]["down"].clone(),
        )
    };
    let a = dir.path().join("a");
    run_ok(generate(&song, &tiny(), "json,npy", &a).args([
        "--start-tokens",
        "7,300",
        "--max-seconds",
        "3",
        "--quiet",
    ]));
    let a_json = a.join("mono22k_mutilated_mime_12s.json");
    assert_eq!(start_of(&a_json), (7.into(), 300.into()));
    let (up, down) = json_tokens(&a_json);
    assert_eq!((up[0], down[0]), (7, 300));

    // seeded from that dance: its start pair is the one the encoder gives the dance's first
    // frames, the same from the .json and the .npy
    let mut seeded = Vec::new();
    for seed in [
        "mono22k_mutilated_mime_12s.json",
        "mono22k_mutilated_mime_12s.npy",
    ] {
        let out = dir.path().join(format!("from_{seed}"));
        run_ok(
            generate(&song, &tiny(), "json", &out)
                .args(["--max-seconds", "3", "--quiet", "--seed-motion"])
                .arg(a.join(seed)),
        );
        seeded.push(start_of(&out.join("mono22k_mutilated_mime_12s.json")));
    }
    assert_eq!(seeded[0], seeded[1]);
    assert!(seeded[0].0.as_u64().unwrap() < 512 && seeded[0].1.as_u64().unwrap() < 512);

    for (flag, value, says) in [
        ("--seed-motion", "/nonexistent/dance.json", "No such file"),
        ("--seed-motion", "/", "is a directory"),
        ("--start-tokens", "7", "UP,DOWN"),
        ("--start-tokens", "7,x", "\"x\" is not a token id"),
    ] {
        let err = run_err(generate(&song, &tiny(), "json", dir.path()).args([flag, value]));
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert!(!err.contains("loading"), "{flag} {value}: {err}");
    }
}

#[test]
fn ctrl_c_during_rendering_leaves_no_file() {
    if Command::new("ffmpeg").arg("-version").output().is_err() {
        eprintln!("SKIPPED: ffmpeg not installed; the interrupt is tested while the mp4 renders");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let input = golden().join("audio/rock_armygeddon_20s.wav");
    let mut child = bin()
        .arg("generate")
        .arg(&input)
        .args(tiny())
        .args(["--formats", "mp4", "--quiet", "-o"])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The renderer writes to a temporary file beside the output: interrupt once it exists.
    let start = std::time::Instant::now();
    let mut seen = false;
    while start.elapsed() < std::time::Duration::from_secs(120) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::fs::read_dir(&out)
            .map(|d| d.count() > 0)
            .unwrap_or(false)
        {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(seen, "the mp4 finished before it could be interrupted");
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let result = child.wait_with_output().unwrap();
    assert!(
        !result.status.success(),
        "an interrupted run must not report success"
    );
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // nothing left, the directory it made included
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "files left behind: {left:?}");
    assert!(!out.exists(), "the empty output directory was left behind");
}

/// An AIFF song (the Mac's uncompressed format, which only Safari plays): the dance is the one
/// of the same samples as a WAV, and the page carries music every browser plays (AAC by
/// ffmpeg, else a WAV copy).
#[test]
fn generate_from_an_aiff_song() {
    let dir = tempfile::tempdir().unwrap();
    let samples = common::tones(4.0, 44_100);
    let aiff = dir.path().join("song.aiff");
    std::fs::write(&aiff, common::aiff16(&samples, 44_100)).unwrap();
    let wav = dir.path().join("song.wav");
    std::fs::write(&wav, common::wav16(&samples, 44_100)).unwrap();
    let (a, w) = (dir.path().join("a"), dir.path().join("w"));
    run_ok(&mut generate(&aiff, &tiny(), "npy,html", &a));
    run_ok(&mut generate(&wav, &tiny(), "npy", &w));
    let dance = std::fs::read(a.join("song.npy")).unwrap();
    assert!(
        dance == std::fs::read(w.join("song.npy")).unwrap(),
        "the AIFF's dance differs from the WAV's"
    );
    let (mime, music) = common::page_music(&a.join("song.html"));
    assert!(mime == "audio/mp4" || mime == "audio/wav", "{mime}");
    assert!(music.len() > 1000, "{} bytes of music", music.len());
}
