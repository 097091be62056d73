//! Load and convert a real-size (250.7 M parameters, ~1 GB) GPT checkpoint with random weights in
//! the official `torch.save` layout, and report wall time and peak memory (VmHWM).
//!
//! Run: `cargo bench -p danceba-model --bench checkpoint_load`
//!
//! The checkpoint is written with our own torch writer under cargo's target tmp directory (or
//! `$DANCEBA_BENCH_DIR`), then each measurement runs in a fresh child process so that its peak
//! RSS is its own. The files are removed at the end unless `--keep` is given.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device};
use danceba_model::arch::{expected_gpt_keys, ModelKind};
use danceba_model::checkpoint::writer::{pickle_dumps, write_torch_zip, PickleWrite};
use danceba_model::checkpoint::{self, convert_checkpoint, StorageDtype};
use danceba_model::gpt::random::official_gpt_arch;

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// xorshift64* uniform values in [-0.05, 0.05): fast and good enough for weights.
fn random_f32_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let v = ((r >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn write_checkpoint(path: &Path) -> std::io::Result<u64> {
    let arch = official_gpt_arch();
    let keys = expected_gpt_keys(&arch);
    let mut items = Vec::new();
    for (i, (k, shape)) in keys.iter().enumerate() {
        let dtype = if k.ends_with("num_batches_tracked") {
            StorageDtype::I64
        } else {
            StorageDtype::F32
        };
        items.push((
            PickleWrite::Str(format!("module.{k}")),
            PickleWrite::tensor(&i.to_string(), dtype, shape, dtype == StorageDtype::F32),
        ));
    }
    let easy = PickleWrite::easydict;
    let base = easy(vec![
        ("n_embd", PickleWrite::Int(768)),
        ("n_head", PickleWrite::Int(12)),
        ("n_layer", PickleWrite::Int(6)),
        ("block_size", PickleWrite::Int(29)),
    ]);
    let config = easy(vec![(
        "structure_generate",
        easy(vec![("base", base.clone()), ("head", base)]),
    )]);
    let pkl = pickle_dumps(&PickleWrite::Dict(vec![
        (PickleWrite::str("model"), PickleWrite::OrderedDict(items)),
        (PickleWrite::str("config"), config),
        (PickleWrite::str("epoch"), PickleWrite::Int(0)),
    ]));
    let bs = arch.block_size;
    let storages = keys.iter().enumerate().map(move |(i, (k, shape))| {
        let n: usize = shape.iter().product();
        let bytes = if k.ends_with("num_batches_tracked") {
            7i64.to_le_bytes().to_vec()
        } else if k.ends_with("attn.mask") {
            (0..bs * bs)
                .flat_map(|j| (if j % bs <= j / bs { 1.0f32 } else { 0.0 }).to_le_bytes())
                .collect()
        } else {
            random_f32_bytes(n, i as u64 + 1)
        };
        (i.to_string(), bytes)
    });
    write_torch_zip(path, "epoch_0", &pkl, storages)?;
    Ok(std::fs::metadata(path)?.len())
}

fn child(mode: &str, a: &str, b: &str) {
    let t0 = Instant::now();
    let detail = match mode {
        "load" | "load-st" => {
            let sd = checkpoint::load_on(Path::new(a), &Device::Cpu, DType::F32).expect("load");
            let n: usize = sd.tensors.values().map(|t| t.elem_count()).sum();
            format!("{} tensors, {n} values", sd.tensors.len())
        }
        "convert" => {
            let r = convert_checkpoint(
                Path::new(a),
                Path::new(b),
                Some(ModelKind::Gpt),
                DType::F32,
                None,
                true,
            )
            .expect("convert");
            format!("{} tensors written", r.n_tensors)
        }
        _ => panic!("unknown mode {mode}"),
    };
    let secs = t0.elapsed().as_secs_f64();
    println!("RESULT {mode} {secs:.3} {} {detail}", vm_hwm_kib());
}

fn measure(exe: &Path, mode: &str, a: &Path, b: &Path) -> (f64, f64, String) {
    let out = Command::new(exe)
        .args(["--child", mode, a.to_str().unwrap(), b.to_str().unwrap()])
        .output()
        .expect("spawn child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or_else(|| panic!("child failed: {}", String::from_utf8_lossy(&out.stderr)));
    let parts: Vec<&str> = line.splitn(5, ' ').collect();
    let secs: f64 = parts[2].parse().unwrap();
    let kib: f64 = parts[3].parse().unwrap();
    (secs, kib / 1024.0, parts.get(4).unwrap_or(&"").to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], &args[i + 2], &args[i + 3]);
        return;
    }
    let keep = args.iter().any(|a| a == "--keep");
    let dir = std::env::var_os("DANCEBA_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoint_bench"));
    std::fs::create_dir_all(&dir).unwrap();
    let pt = dir.join("epoch_0.pt");
    let st = dir.join("gpt.safetensors");
    let t0 = Instant::now();
    let size = write_checkpoint(&pt).expect("write checkpoint");
    println!(
        "wrote {} ({:.1} MB) in {:.1} s",
        pt.display(),
        size as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    let exe = std::env::current_exe().unwrap();
    // drop the page cache's claim on timing as far as we can: read once so every run sees a warm cache
    let _ = std::fs::read(&pt).map(|v| v.len());
    for (mode, a, b) in [
        ("load", &pt, &st),
        ("convert", &pt, &st),
        ("load-st", &st, &st),
    ] {
        let mut best: Option<(f64, f64, String)> = None;
        for _ in 0..3 {
            let r = measure(&exe, mode, a, b);
            if best.as_ref().is_none_or(|b| r.0 < b.0) {
                best = Some(r);
            }
        }
        let (secs, mib, detail) = best.unwrap();
        let what = match mode {
            "load" => "load .pt (f32, CPU)",
            "convert" => "convert .pt -> safetensors (sha256 + load + audit + write)",
            _ => "load converted safetensors (f32, CPU)",
        };
        println!("{what:<60} best of 3: {secs:>7.2} s, peak RSS {mib:>7.0} MiB ({detail})");
    }
    if !keep {
        let _ = std::fs::remove_file(&pt);
        let _ = std::fs::remove_file(&st);
    }
}
