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
    /// Floating-point type of the written GPT tensors. The VQ-VAE is always written in f32: it
    /// decodes in f32 whatever `generate --dtype` says (rounding its weights to half precision
    /// moved joints by centimetres).
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
    let _out_dir = super::create_output_dir(&args.out)?;
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
    // Each file is converted to a temporary name beside its destination, and they are moved
    // into place only once every conversion has succeeded: a failure leaves the directory as it
    // was, never a new GPT beside an old VQ-VAE.
    let mut done: Vec<(PathBuf, PathBuf, ConvertReport)> = Vec::new();
    let outcome = (|| -> anyhow::Result<()> {
        for (src, kind, name) in jobs {
            let Some(src) = src else { continue };
            let dst = args.out.join(name);
            let tmp = args
                .out
                .join(format!(".danceba-{}.{name}.tmp", std::process::id()));
            let dtype = match kind {
                ModelKind::Vqvae => DType::F32,
                _ => args.dtype.into(),
            };
            // (written atomically: nothing is left at `tmp` when it fails)
            let report = convert_checkpoint(src, &tmp, Some(kind), dtype, args.n_head, true)
                .with_context(|| format!("converting {} to {}", src.display(), dst.display()))?;
            done.push((tmp, dst, report));
        }
        if let Some((_, dst, _)) = done.iter().find(|(_, d, _)| !args.force && d.exists()) {
            bail!(
                "{} appeared during the conversion; pass --force to overwrite",
                dst.display()
            );
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        for (tmp, _, _) in &done {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    if args.vqvae.is_some() && args.dtype != DtypeArg::F32 {
        eprintln!(
            "note: the VQ-VAE was written in f32 (it always decodes in f32); --dtype applies to \
             the GPT"
        );
    }
    let mut left = done.into_iter();
    while let Some((tmp, dst, mut report)) = left.next() {
        if let Err(e) = std::fs::rename(&tmp, &dst) {
            for (tmp, _, _) in std::iter::once((tmp, dst.clone(), report)).chain(left) {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(anyhow::Error::new(e).context(format!("cannot write {}", dst.display())));
        }
        report.output = dst;
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
