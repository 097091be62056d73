//! `cargo run --release -p danceba-audio --example features_file -- SONG [--stages]`
//!
//! Computes the features of one file and prints timings (used for the README numbers and for
//! `/usr/bin/time -v` peak-memory measurements).

use std::time::Instant;

use danceba_audio::{cqt, extract_features, hpss, load_mono_3840, mel, mfcc, rhythm, stft, util};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: features_file SONG [--stages]");
        std::process::exit(2);
    };
    let t0 = Instant::now();
    let audio = match load_mono_3840(std::path::Path::new(path)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let t_load = t0.elapsed();
    let t1 = Instant::now();
    let s = match extract_features(&audio) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let t_feat = t1.elapsed();
    println!(
        "{path}: {} samples at 3840 Hz, L = {}; decode+resample {:.1} ms, features {:.1} ms, total {:.1} ms",
        audio.len(),
        s.features.rows,
        t_load.as_secs_f64() * 1e3,
        t_feat.as_secs_f64() * 1e3,
        (t_load + t_feat).as_secs_f64() * 1e3
    );
    if args.iter().any(|a| a == "--stages") {
        let time = |name: &str, f: &mut dyn FnMut()| {
            let t = Instant::now();
            f();
            println!("  {name:24} {:8.1} ms", t.elapsed().as_secs_f64() * 1e3);
        };
        let w = util::hann_periodic(2048);
        let mut spec = None;
        time("stft 2048", &mut || {
            spec = Some(stft::stft(&audio, 2048, 512, Some(&w)))
        });
        let spec = spec.unwrap();
        let bank = mel::mel_filterbank(3840.0, 2048, 128, 0.0, 1920.0);
        let mut m = None;
        time("mel power", &mut || m = Some(mel::mel_power(&spec, &bank)));
        let mut m = m.unwrap();
        time("power_to_db", &mut || mel::power_to_db_ref_max(&mut m));
        time("mfcc+delta", &mut || {
            let c = mfcc::mfcc(&m, 20);
            let _ = mfcc::delta_width3(&c);
        });
        let mut hs = None;
        time("hpss masks", &mut || {
            hs = Some(hpss::hpss_spectrogram(&spec))
        });
        let (xh, _xp) = hs.unwrap();
        time("istft", &mut || {
            let _ = stft::istft(&xh, 512, &w);
        });
        time("tuning", &mut || {
            let _ = cqt::estimate_tuning(&s.harmonic, 3840.0);
        });
        time("cqt", &mut || {
            let _ = cqt::cqt_magnitude(&s.harmonic, 3840.0, s.tuning, 5);
        });
        time("onset", &mut || {
            let _ = rhythm::onset_strength(&s.percussive, 3840.0);
        });
        time("tempogram", &mut || {
            let _ = rhythm::tempogram(&s.onset_env, 384);
        });
    }
}
