//! The output formats and video styles that `generate` and `render` share.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use danceba::page_audio::page_audio;
use danceba_motion::export::Format;
use danceba_motion::render::html::write_html;
use danceba_motion::render::video::{find_ffmpeg, Style};
use danceba_motion::Motion;

const FORMAT_NAMES: &str = "npy, pkl.npy, json, bvh, glb, mp4, html";

/// An output the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Export(Format),
    Video,
    Html,
}

impl Output {
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        match n.as_str() {
            "mp4" | "video" => Ok(Output::Video),
            "html" => Ok(Output::Html),
            _ => Format::parse(&n).map(Output::Export).ok_or_else(|| {
                anyhow!("unknown output format {name:?}; choose from {FORMAT_NAMES}")
            }),
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Output::Export(f) => f.extension(),
            Output::Video => "mp4",
            Output::Html => "html",
        }
    }
}

/// Parses a `--formats` list (blank entries ignored, duplicates dropped); an empty list is an
/// error.
pub fn parse_formats(names: &[String]) -> Result<Vec<Output>> {
    let mut outputs = Vec::new();
    for name in names.iter().filter(|n| !n.trim().is_empty()) {
        let o = Output::parse(name)?;
        if !outputs.contains(&o) {
            outputs.push(o);
        }
    }
    if outputs.is_empty() {
        bail!("--formats is empty; choose from {FORMAT_NAMES}");
    }
    Ok(outputs)
}

/// Writes the html page `path` of `motion` titled `title`, with `audio`'s music as
/// [`danceba::page_audio`] prepares it (an AAC copy by an ffmpeg on PATH where the source is
/// WAV, FLAC, AIFF or another format that is large or not played by every browser); `note`
/// says where ffmpeg failed.
pub fn write_page(
    motion: &Motion,
    audio: Option<&Path>,
    title: &str,
    path: &Path,
    force: bool,
    note: &dyn Fn(&str),
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let music = match audio {
        Some(a) => Some(
            page_audio(a, find_ffmpeg().as_deref(), dir)
                .with_context(|| format!("cannot prepare the music of {}", path.display()))?,
        ),
        None => None,
    };
    if let Some(why) = music.as_ref().and_then(|m| m.ffmpeg_failed.as_deref()) {
        note(&format!(
            "note: {why}; {} embeds the music as WAV or FLAC instead (a larger page)",
            path.display()
        ));
    }
    write_html(motion, music.as_ref().map(|m| m.path()), title, path, force)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Parses `--style`.
pub fn parse_style(name: &str) -> Result<Style> {
    match name.to_ascii_lowercase().as_str() {
        "3d" | "skeleton" => Ok(Style::Skeleton3d),
        "openpose" | "2d" => Ok(Style::OpenPose),
        s => bail!("unknown --style {s:?}; choose 3d or openpose"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse() {
        assert_eq!(Output::parse("MP4").unwrap(), Output::Video);
        assert_eq!(
            Output::parse("pkl.npy").unwrap(),
            Output::Export(Format::OfficialNpy)
        );
        assert!(Output::parse("fbx")
            .unwrap_err()
            .to_string()
            .contains("choose from"));
        let list = parse_formats(&["glb".into(), " ".into(), "GLB".into(), "html".into()]).unwrap();
        assert_eq!(list, vec![Output::Export(Format::Glb), Output::Html]);
        assert!(parse_formats(&[]).is_err());
    }

    #[test]
    fn styles_parse() {
        assert_eq!(parse_style("OpenPose").unwrap(), Style::OpenPose);
        assert_eq!(parse_style("3d").unwrap(), Style::Skeleton3d);
        assert!(parse_style("cartoon").is_err());
    }
}
