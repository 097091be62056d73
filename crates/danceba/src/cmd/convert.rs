//! `danceba convert`: official `.pt` checkpoints to safetensors (f32, f16, bf16) after the key
//! audit, for fast memory-mapped loading.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;
use danceba_model::arch::{DetectedArch, ModelKind};
use danceba_model::checkpoint::{convert_checkpoint, ConvertReport};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for DType {
    fn from(d: DtypeArg) -> DType {
        match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Arguments of `danceba convert`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// GPT checkpoint (`experiments/cc_motion_gpt/ckpt/epoch_*.pt`); writes DIR/gpt.safetensors.
    #[arg(long)]
    pub gpt: Option<PathBuf>,
    /// VQ-VAE checkpoint (`experiments/sep_vqvae_root/ckpt/epoch_500.pt`); writes
    /// DIR/vqvae.safetensors.
    #[arg(long)]
    pub vqvae: Option<PathBuf>,
    /// Output directory (created if needed).
    #[arg(short = 'o', long = "out")]
    pub out: PathBuf,
    /// Floating-point type of the written tensors.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Attention heads of the GPT if its config does not say (default 12); one that contradicts
    /// the config is refused.
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Overwrite existing output files.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.gpt.is_none() && args.vqvae.is_none() {
        bail!("nothing to convert: give --gpt GPT.pt and/or --vqvae VQVAE.pt");
    }
    super::create_output_dir(&args.out)?;
    let jobs = [
        (args.gpt.as_ref(), ModelKind::Gpt, "gpt.safetensors"),
        (args.vqvae.as_ref(), ModelKind::Vqvae, "vqvae.safetensors"),
    ];
    // refuse before doing any work if an output exists
    if !args.force {
        for (src, _, name) in &jobs {
            let dst = args.out.join(name);
            if src.is_some() && dst.exists() {
                bail!(
                    "{} already exists; pass --force to overwrite",
                    dst.display()
                );
            }
        }
    }
    for (src, kind, name) in jobs {
        let Some(src) = src else { continue };
        let dst = args.out.join(name);
        let report = convert_checkpoint(
            src,
            &dst,
            Some(kind),
            args.dtype.into(),
            args.n_head,
            args.force,
        )
        .with_context(|| format!("converting {} to {}", src.display(), dst.display()))?;
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &ConvertReport) {
    let arch = match &r.arch {
        DetectedArch::Gpt(g) => format!(
            "n_embd {}, n_head {}, {}+{} layers, vocab {}/{}",
            g.n_embd, g.n_head, g.n_layer_base, g.n_layer_head, g.vocab_up, g.vocab_down
        ),
        DetectedArch::Vqvae(v) => format!(
            "width {}, emb_width {}, codebook {}",
            v.width, v.emb_width, v.l_bins
        ),
    };
    println!(
        "{} -> {}: {} ({arch}), {} tensors, {} known legacy entries ignored, {} unexpected kept; source sha256 {}",
        r.source.display(),
        r.output.display(),
        r.kind,
        r.n_tensors,
        r.audit.ignored_known.len(),
        r.audit.unexpected.len(),
        r.source_sha256
    );
}
