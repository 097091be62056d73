//! `danceba inspect`: what a checkpoint holds (kind, epoch, architecture, parameters, dtypes,
//! config summary, key audit). Works on the official `.pt` files and on converted safetensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use danceba_model::arch::{
    count_parameters, inspect_state_dict, resolve_n_head_for, DetectedArch, ModelKind,
};
use danceba_model::checkpoint::{self, PyValue};
use std::fmt::Write as _;

use serde_json::{json, Value};

macro_rules! outln {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}

/// Writes the report; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Arguments of `danceba inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint file: an official `.pt` (torch zip) or a converted `.safetensors`.
    pub file: PathBuf,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Attention heads (not visible in the weights) for a checkpoint that does not state them
    /// (default 12); one that contradicts the checkpoint is refused.
    #[arg(long)]
    pub n_head: Option<usize>,
}

/// Config entries worth showing, when present.
const CONFIG_SUMMARY: &[&str] = &[
    "expname",
    "epoch",
    "structure_generate.base.n_embd",
    "structure_generate.base.n_head",
    "structure_generate.base.n_layer",
    "structure_generate.head.n_layer",
    "structure_generate.base.block_size",
    "structure_generate.base.n_music",
    "structure.up_half.width",
    "structure.up_half.emb_width",
    "structure.up_half.l_bins",
    "structure.up_half.downs_t",
    "structure.up_half.strides_t",
    "structure.up_half.dilation_growth_rate",
    "structure.use_bottleneck",
];

fn config_summary(cfg: Option<&PyValue>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Some(c) = cfg {
        for path in CONFIG_SUMMARY {
            if let Some(v) = c.get_path(path) {
                out.insert((*path).to_string(), v.to_json());
            }
        }
    }
    out
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut out = String::new();
    let path = &args.file;
    let sd = checkpoint::load(path)
        .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    let format = match checkpoint::sniff_file(path)? {
        checkpoint::FileFormat::TorchZip => "torch",
        checkpoint::FileFormat::Safetensors => "safetensors",
    };
    let (kind, arch, audit) = inspect_state_dict(&sd, args.n_head)
        .with_context(|| format!("cannot determine the architecture of {}", path.display()))?;
    let shapes = sd.shapes();
    let counts = count_parameters(&shapes, &audit.ignored_known);
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for d in sd.source_dtypes.values() {
        *dtypes.entry(d.clone()).or_default() += 1;
    }
    let n_head_source = match (&arch, kind) {
        (Some(DetectedArch::Gpt(_)), _) => Some(resolve_n_head_for(&sd, args.n_head).1),
        _ => None,
    };
    let architecture = match &arch {
        Some(DetectedArch::Gpt(g)) => serde_json::to_value(g)?,
        Some(DetectedArch::Vqvae(v)) => serde_json::to_value(v)?,
        None => Value::Null,
    };
    let summary = config_summary(sd.config.as_ref());

    if args.json {
        let obj = json!({
            "file": path.display().to_string(),
            "format": format,
            "kind": kind,
            "epoch": sd.epoch,
            "architecture": architecture,
            "n_head_source": n_head_source,
            "parameters": counts.parameters,
            "buffer_values": counts.buffer_values,
            "parameters_per_module": counts.per_module,
            "tensors": sd.tensors.len(),
            "dtypes": dtypes,
            "config": sd.config.as_ref().map(PyValue::to_json),
            "config_summary": summary,
            "audit_ok": audit.is_ok(),
            "missing": audit.missing,
            "mis_shaped": audit.mis_shaped,
            "unexpected": audit.unexpected,
            "ignored": audit.ignored_known,
            "bad_values": audit.bad_values,
            "metadata": sd.metadata,
        });
        outln!(out, "{}", serde_json::to_string_pretty(&obj)?);
    } else {
        outln!(out, "file:          {}", path.display());
        outln!(out, "format:        {format}");
        outln!(out, "kind:          {kind}");
        outln!(
            out,
            "epoch:         {}",
            sd.epoch
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into())
        );
        match &arch {
            Some(DetectedArch::Gpt(g)) => {
                let src = n_head_source
                    .and_then(|s| serde_json::to_value(s).ok())
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                outln!(out,
                    "architecture:  GPT n_embd {}, n_head {} (from {src}), layers {} base + {} head, vocab {}/{}, n_music {}, block_size {}",
                    g.n_embd, g.n_head, g.n_layer_base, g.n_layer_head, g.vocab_up, g.vocab_down, g.n_music, g.block_size
                );
                outln!(out,
                    "               MLP hidden {}, GatedMLP hidden {}, LPE bins {}, Mamba d_inner {} d_state {} dt_rank {} d_conv {}",
                    g.mlp_hidden, g.gated_mlp_hidden, g.lpe_bins, g.mamba.d_inner, g.mamba.d_state, g.mamba.dt_rank, g.mamba.d_conv
                );
            }
            Some(DetectedArch::Vqvae(v)) => {
                outln!(out,
                    "architecture:  VQ-VAE width {}, emb_width {}, codebook {}, {} x stride {} down/up-sampling, depth {}, dilation growth {}",
                    v.width, v.emb_width, v.l_bins, v.downs_t, v.stride_t, v.depth, v.dilation_growth_rate
                );
                outln!(
                    out,
                    "               channels up {} / down {} / root {}, encoders {}",
                    v.up_channels,
                    v.down_channels,
                    v.root_channels,
                    if v.has_encoders { "present" } else { "absent" }
                );
            }
            None => outln!(
                out,
                "architecture:  - (not a DanceBa GPT or VQ-VAE checkpoint)"
            ),
        }
        outln!(
            out,
            "parameters:    {} (+ {} buffer values) in {} tensors",
            group(counts.parameters),
            group(counts.buffer_values),
            sd.tensors.len()
        );
        for (m, n) in &counts.per_module {
            outln!(out, "  {m:<28} {:>14}", group(*n));
        }
        let d: Vec<String> = dtypes.iter().map(|(k, n)| format!("{k} x{n}")).collect();
        outln!(out, "dtypes:        {}", d.join(", "));
        if summary.is_empty() {
            outln!(
                out,
                "config:        {}",
                if sd.config.is_some() {
                    "(no known entries)"
                } else {
                    "-"
                }
            );
        } else {
            outln!(out, "config:");
            for (k, v) in &summary {
                outln!(out, "  {k:<40} {v}");
            }
        }
        if kind == ModelKind::Unknown {
            outln!(out, "audit:         skipped (unknown kind)");
        } else {
            outln!(out,
                "audit:         {} - {} missing, {} mis-shaped, {} with unusable values, {} unexpected, {} ignored (known legacy LPE linear1/bn1)",
                if audit.is_ok() { "ok" } else { "FAILED" },
                audit.missing.len(),
                audit.mis_shaped.len(),
                audit.bad_values.len(),
                audit.unexpected.len(),
                audit.ignored_known.len()
            );
        }
        for k in &audit.missing {
            outln!(out, "  missing     {k}");
        }
        for m in &audit.mis_shaped {
            outln!(
                out,
                "  mis-shaped  {} {:?} (expected {:?})",
                m.key,
                m.found,
                m.expected
            );
        }
        for b in &audit.bad_values {
            outln!(out, "  bad values  {} {}", b.key, b.problem);
        }
        for k in &audit.unexpected {
            outln!(out, "  unexpected  {k}");
        }
        for k in &audit.ignored_known {
            outln!(out, "  ignored     {k}");
        }
        for k in sd
            .ignored
            .iter()
            .filter(|k| !audit.ignored_known.contains(k))
        {
            outln!(out, "  non-tensor  {k}");
        }
    }
    emit(&out)?;
    if !audit.is_ok() {
        let message = format!(
            "{} does not match the {kind} model: {audit}",
            path.display()
        );
        // with --json the report above already says so ("audit_ok": false)
        return Err(if args.json {
            super::Reported(message).into()
        } else {
            anyhow::anyhow!(message)
        });
    }
    Ok(())
}

/// 250727425 → "250,727,425".
fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
