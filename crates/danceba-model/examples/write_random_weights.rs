//! Writes real-size DanceBa checkpoints with random weights in the official `torch.save` layout,
//! for measuring load time, memory and speed without the real (non-commercial) weights:
//!
//! ```text
//! cargo run --release -p danceba-model --example write_random_weights -- DIR [--seed N]
//! ```
//!
//! writes `DIR/experiments/cc_motion_gpt/ckpt/epoch_0.pt` (the GPT, 250.7 M parameters, ~1 GB)
//! and `DIR/experiments/sep_vqvae_root/ckpt/epoch_500.pt` (the VQ-VAE), so that
//! `danceba generate --weights DIR` and `danceba convert` take them like the downloaded ones.
//! The values are those of `gpt::random::random_gpt_weights` and `vqvae::random_vqvae_weights`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use danceba_model::arch::{expected_gpt_keys, expected_vqvae_keys};
use danceba_model::checkpoint::writer::{
    pickle_dumps, tensor_storage, write_torch_zip, PickleWrite,
};
use danceba_model::checkpoint::StorageDtype;
use danceba_model::gpt::random::{official_gpt_arch, random_gpt_weights};
use danceba_model::vqvae::{official_vqvae_arch, random_vqvae_weights};

type Error = Box<dyn std::error::Error>;

/// `torch.save({'model': OrderedDict('module.' + key → tensor), 'config': config, 'epoch':
/// epoch}, path)`, the tensors in `order`, each storage serialised only when it is written.
fn write_official(
    path: &Path,
    order: &[(String, Vec<usize>)],
    mut tensors: HashMap<String, Tensor>,
    config: PickleWrite,
    epoch: i64,
) -> Result<(), Error> {
    let mut items = Vec::new();
    let mut ordered = Vec::new();
    for (i, (key, shape)) in order.iter().enumerate() {
        let t = tensors
            .remove(key)
            .ok_or_else(|| format!("no random weight for {key}"))?;
        if t.dims() != shape.as_slice() {
            return Err(format!("{key}: shape {:?}, expected {shape:?}", t.dims()).into());
        }
        let dtype = match t.dtype() {
            DType::F32 => StorageDtype::F32,
            DType::I64 => StorageDtype::I64,
            other => return Err(format!("{key}: unexpected dtype {other:?}").into()),
        };
        items.push((
            PickleWrite::Str(format!("module.{key}")),
            PickleWrite::tensor(&i.to_string(), dtype, shape, dtype.is_float()),
        ));
        ordered.push((i.to_string(), t));
    }
    if let Some(k) = tensors.keys().next() {
        return Err(format!("random weight {k} is not in the official layout").into());
    }
    let pkl = pickle_dumps(&PickleWrite::Dict(vec![
        (PickleWrite::str("model"), PickleWrite::OrderedDict(items)),
        (PickleWrite::str("config"), config),
        (PickleWrite::str("epoch"), PickleWrite::Int(epoch)),
    ]));
    let mut failed = None;
    let storages = ordered
        .into_iter()
        .map_while(|(key, t)| match tensor_storage(&t) {
            Ok((_, bytes)) => Some((key, bytes)),
            Err(e) => {
                failed = Some(e);
                None
            }
        });
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "archive".into());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_torch_zip(path, &stem, &pkl, storages)?;
    if let Some(e) = failed {
        let _ = std::fs::remove_file(path);
        return Err(e.into());
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let mut seed = 0u64;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                seed = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seed takes an integer")?
            }
            "-h" | "--help" => {
                println!("usage: write_random_weights DIR [--seed N]");
                return Ok(());
            }
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(PathBuf::from(a)),
            _ => {
                return Err(format!(
                    "unexpected argument {a:?}; usage: write_random_weights DIR [--seed N]"
                )
                .into())
            }
        }
    }
    let dir = dir.ok_or("usage: write_random_weights DIR [--seed N]")?;

    let g = official_gpt_arch();
    let gpt_path = dir.join("experiments/cc_motion_gpt/ckpt/epoch_0.pt");
    let block = |n_layer: usize| {
        PickleWrite::easydict(vec![
            ("n_embd", PickleWrite::Int(g.n_embd as i64)),
            ("n_head", PickleWrite::Int(g.n_head as i64)),
            ("n_layer", PickleWrite::Int(n_layer as i64)),
            ("block_size", PickleWrite::Int(g.block_size as i64)),
            ("n_music", PickleWrite::Int(g.n_music as i64)),
        ])
    };
    let gpt_config = PickleWrite::easydict(vec![
        ("expname", PickleWrite::str("cc_motion_gpt")),
        (
            "structure_generate",
            PickleWrite::easydict(vec![
                ("base", block(g.n_layer_base)),
                ("head", block(g.n_layer_head)),
            ]),
        ),
    ]);
    let weights = random_gpt_weights(&g, seed)?;
    write_official(&gpt_path, &expected_gpt_keys(&g), weights, gpt_config, 0)?;
    println!(
        "wrote {} ({:.1} MB)",
        gpt_path.display(),
        std::fs::metadata(&gpt_path)?.len() as f64 / 1e6
    );

    let v = official_vqvae_arch();
    let vq_path = dir.join("experiments/sep_vqvae_root/ckpt/epoch_500.pt");
    let half = PickleWrite::easydict(vec![
        ("width", PickleWrite::Int(v.width as i64)),
        ("emb_width", PickleWrite::Int(v.emb_width as i64)),
        ("l_bins", PickleWrite::Int(v.l_bins as i64)),
        (
            "downs_t",
            PickleWrite::List(vec![PickleWrite::Int(v.downs_t as i64)]),
        ),
        (
            "strides_t",
            PickleWrite::List(vec![PickleWrite::Int(v.stride_t as i64)]),
        ),
        ("depth", PickleWrite::Int(v.depth as i64)),
        (
            "dilation_growth_rate",
            PickleWrite::Int(v.dilation_growth_rate as i64),
        ),
    ]);
    let vq_config = PickleWrite::easydict(vec![
        ("expname", PickleWrite::str("sep_vqvae_root")),
        (
            "structure",
            PickleWrite::easydict(vec![
                ("up_half", half.clone()),
                ("down_half", half),
                ("use_bottleneck", PickleWrite::Bool(true)),
            ]),
        ),
    ]);
    let weights = random_vqvae_weights(&v, seed)?;
    write_official(&vq_path, &expected_vqvae_keys(&v), weights, vq_config, 500)?;
    println!(
        "wrote {} ({:.1} MB)",
        vq_path.display(),
        std::fs::metadata(&vq_path)?.len() as f64 / 1e6
    );
    Ok(())
}
