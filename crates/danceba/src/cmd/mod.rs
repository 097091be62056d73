//! One module per CLI subcommand. Each defines `Args` (clap) and `run(args) -> anyhow::Result<()>`.
pub mod bench;
pub mod convert;
pub mod download;
pub mod features;
pub mod generate;
pub mod inspect;
pub mod outputs;
pub mod render;

use std::path::Path;

/// Refuses an input path that is not a readable-looking file, saying what it is instead:
/// missing, or a directory (`what` names the argument, e.g. "--audio", or is empty).
pub fn check_input_file(path: &Path, what: &str) -> anyhow::Result<()> {
    let name = if what.is_empty() {
        path.display().to_string()
    } else {
        format!("{what} {}", path.display())
    };
    if path.is_dir() {
        anyhow::bail!(
            "{name} is a directory: give a file (for a folder of songs, its files, e.g. DIR/*.mp3)"
        );
    }
    if !path.is_file() {
        if path.exists() {
            anyhow::bail!("{name} is not a regular file");
        }
        anyhow::bail!("{name}: no such file");
    }
    Ok(())
}

/// An output directory [`create_output_dir`] made: removed again when dropped if it is still
/// empty, so that a command that fails leaves no empty directory behind (one it did not make,
/// or that holds anything, is left alone).
#[must_use = "bind it for the command's whole run: dropping it removes the directory if empty"]
#[derive(Debug)]
pub struct OutputDir(Option<std::path::PathBuf>);

impl Drop for OutputDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            // fails, harmlessly, unless the directory is empty
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Creates the output directory `dir` (and its parents) if needed; an existing non-directory
/// there is refused with a message that says so (not the OS's "File exists"). Then checks that
/// files can be created in it (by creating and removing an empty one), so that a read-only
/// directory is reported before the work, not after it.
pub fn create_output_dir(dir: &Path) -> anyhow::Result<OutputDir> {
    let created = !dir.exists();
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "the output directory {} is a file: choose another with -o, or remove it",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).map_err(|e| {
        anyhow::anyhow!("cannot create the output directory {}: {e}", dir.display())
    })?;
    let probe = dir.join(format!(".danceba-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create files in the output directory {}: {e}; choose another with -o",
                dir.display()
            )
        })?;
    let _ = std::fs::remove_file(&probe);
    Ok(OutputDir(created.then(|| dir.to_path_buf())))
}

/// A note for an audio file that decoded to clearly less than its header declares (`decoded`
/// seconds against the header's, more than 1 s and 5 % short): the file is truncated or damaged,
/// and only what could be decoded is used.
pub fn truncation_note(audio: &Path, decoded: f64) -> Option<String> {
    let declared = danceba_audio::declared_seconds(audio)?;
    (declared - decoded > f64::max(1.0, 0.05 * declared)).then(|| {
        format!(
            "note: {} decoded to {decoded:.1} s of audio, but its header declares {declared:.1} s: \
             the file is truncated or damaged, and only what was decoded is used",
            audio.display()
        )
    })
}

/// A failure whose JSON report a `--json` command already printed on stdout: `main` then says
/// it on stderr only, so that stdout stays one JSON object.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Reported(pub String);

/// The message of an error and its causes, `outer: cause: …`, leaving out a cause whose text
/// an outer message already holds (many of ours include their source in their own text, as
/// `{path}: {source}`, so `{:#}` would print it twice), and an outer message that its cause
/// begins with (`cannot write x` around `cannot write x: disk full`).
pub fn error_message(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || parts.iter().any(|p| p.contains(&s)) {
            continue;
        }
        match parts.last_mut() {
            Some(last) if s.starts_with(last.as_str()) => *last = s,
            _ => parts.push(s),
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_an_outer_message_already_holds_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("{path}: {source}")]
        struct Outer {
            path: String,
            #[source]
            source: std::io::Error,
        }
        let io = std::io::Error::other("this is a vqvae checkpoint");
        let e = anyhow::Error::new(Outer {
            path: "a.pt".into(),
            source: io,
        })
        .context("could not load the model");
        assert_eq!(
            error_message(&e),
            "could not load the model: a.pt: this is a vqvae checkpoint"
        );
        // causes that add something are all kept, in order
        let e = anyhow::anyhow!("disk full")
            .context("cannot write x")
            .context("rendering");
        assert_eq!(error_message(&e), "rendering: cannot write x: disk full");
        // an outer message that its cause repeats and extends is said once, by the cause
        let e = anyhow::anyhow!("cannot write x: read-only file system")
            .context("cannot write x")
            .context("rendering");
        assert_eq!(
            error_message(&e),
            "rendering: cannot write x: read-only file system"
        );
    }

    #[test]
    fn inputs_and_output_directories_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_input_file(dir.path(), "").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let gone = dir.path().join("gone.mp3");
        let e = check_input_file(&gone, "--audio").unwrap_err().to_string();
        assert!(
            e.starts_with("--audio ") && e.ends_with("no such file"),
            "{e}"
        );
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        check_input_file(&file, "").unwrap();
        let e = create_output_dir(&file).unwrap_err().to_string();
        assert!(e.contains("is a file"), "{e}");
        let nested = dir.path().join("a/b");
        let made = create_output_dir(&nested).unwrap();
        assert!(nested.is_dir());
        // a directory it made is removed when its guard goes while still empty (a failed
        // command leaves no empty directory), and kept once it holds something
        drop(made);
        assert!(!nested.exists());
        let made = create_output_dir(&nested).unwrap();
        std::fs::write(nested.join("song.npy"), b"x").unwrap();
        drop(made);
        assert!(nested.join("song.npy").is_file());
        // one that was there before is never removed
        let there = dir.path().join("there");
        std::fs::create_dir(&there).unwrap();
        drop(create_output_dir(&there).unwrap());
        assert!(there.is_dir());
    }
}
