//! Times decoding and essentia-style resampling separately (diagnostics for the README).
use std::time::Instant;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: resample_cost SONG");
        std::process::exit(2);
    };
    let t = Instant::now();
    let pcm = match danceba_audio::decode_file(std::path::Path::new(&path)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let t_dec = t.elapsed();
    let t = Instant::now();
    let mono = pcm.to_mono();
    let t_mix = t.elapsed();
    let t = Instant::now();
    let out = danceba_audio::resample_to_3840(&mono, pcm.sample_rate).unwrap_or_default();
    let t_res = t.elapsed();
    println!(
        "decode {:.1} ms, mix {:.1} ms, resample {:.1} ms ({} → {} samples)",
        t_dec.as_secs_f64() * 1e3,
        t_mix.as_secs_f64() * 1e3,
        t_res.as_secs_f64() * 1e3,
        mono.len(),
        out.len()
    );
}
