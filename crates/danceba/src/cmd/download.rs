//! `danceba download`: fetch the official checkpoints from Hugging Face, audit them and convert
//! them once to safetensors.

use std::path::PathBuf;

use anyhow::Context;
use danceba::weights::{self, DownloadOptions, HubConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const AFTER_HELP: &str = "\
Fetches the GPT (experiments/cc_motion_gpt/ckpt/epoch_*.pt, about 1 GB) and the VQ-VAE
(experiments/sep_vqvae_root/ckpt/epoch_500.pt, about 260 MB) from the Hugging Face dataset
repository fancongyi/danceba into the Hugging Face cache, checks every tensor against the
architecture, and converts them once to safetensors. An interrupted download resumes where it
stopped when you run the command again.

LICENSE: the DanceBa weights are released by their authors under the S-Lab License 1.0, which
allows non-commercial use only. danceba does not ship them; by downloading them you accept that
license.

Environment:
  HF_ENDPOINT      hub or mirror URL (default https://huggingface.co)
  HF_TOKEN         access token, sent as Authorization: Bearer
  HF_HOME          Hugging Face home (checkpoints go to $HF_HOME/hub; HF_HUB_CACHE overrides)
  DANCEBA_CACHE    where the converted safetensors go (default ~/.cache/danceba/weights)

Example:
  danceba download
  danceba generate song.mp3";

/// Arguments of `danceba download`.
#[derive(clap::Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    /// Download and convert again even if the files are present.
    #[arg(long)]
    pub force: bool,
    /// GPT checkpoint file name in experiments/cc_motion_gpt/ckpt/ (default: epoch_0.pt as in the
    /// official config, else the highest epoch listed).
    #[arg(long, value_name = "NAME")]
    pub gpt_file: Option<String>,
    /// Repository revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Keep only the official .pt files; skip the conversion to safetensors.
    #[arg(long)]
    pub no_convert: bool,
    /// Write the converted safetensors here instead of the cache (use it with --weights DIR).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(name) = &args.gpt_file {
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            anyhow::bail!("--gpt-file takes a file name (e.g. epoch_0.pt), got {name:?}");
        }
    }
    // before a gigabyte is downloaded, not after
    let _out_dir = args
        .out
        .as_deref()
        .map(super::create_output_dir)
        .transpose()?;
    let mut cfg = HubConfig::from_env()?;
    cfg.revision = args.revision.clone();
    if !args.quiet {
        eprintln!(
            "Downloading the DanceBa checkpoints from {}/datasets/{} (S-Lab License 1.0, non-commercial use only)",
            cfg.endpoint, cfg.repo_id
        );
    }
    let mut bar: Option<(String, ProgressBar)> = None;
    let quiet = args.quiet;
    let mut progress = |path: &str, done: u64, total: Option<u64>| {
        if bar.as_ref().is_none_or(|(p, _)| p != path) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = if quiet {
                ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden())
            } else {
                ProgressBar::new(total.unwrap_or(0))
            };
            if let Ok(s) = ProgressStyle::with_template(
                "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ) {
                b.set_style(s.progress_chars("=> "));
            }
            b.set_message(path.rsplit('/').next().unwrap_or(path).to_string());
            bar = Some((path.to_string(), b));
        }
        if let Some((_, b)) = &bar {
            if let Some(t) = total {
                b.set_length(t);
            }
            b.set_position(done);
        }
    };
    let opts = DownloadOptions {
        force: args.force,
        gpt_file: args.gpt_file.clone(),
        no_convert: args.no_convert,
        converted_dir: args.out.clone(),
    };
    let report = weights::download(&cfg, &opts, &mut progress);
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    let report = report.context("danceba download failed")?;
    if !args.quiet {
        eprintln!("GPT:     {}", report.official.gpt.display());
        eprintln!("VQ-VAE:  {}", report.official.vqvae.display());
        eprintln!("commit:  {}", report.commit);
        for r in &report.reused {
            eprintln!("(already present: {})", r.display());
        }
        match &report.converted {
            Some(c) => eprintln!(
                "Checked and converted to {} and {}.",
                c.gpt.display(),
                c.vqvae.display()
            ),
            None => eprintln!("Checked; not converted (--no-convert)."),
        }
        eprintln!("Ready: danceba generate song.mp3");
    }
    Ok(())
}
