//! Every stage against the golden reference, starting from the golden's own 3840 Hz audio.

mod common;
use common::*;
use danceba_audio::{extract_features, FEATURE_DIM};

/// Assert `ours` matches the golden key within `rel` of the key's max |value| (plus `abs`).
fn check(g: &Golden, key: &str, ours: &[f64], rel: f64, abs: f64) {
    let (shape, gold) = g.tensor(key);
    let (e, m) = err(ours, &gold);
    println!(
        "{:28} {key:13} shape {shape:?} max_err {e:.3e} max_abs {m:.3e}",
        g.name
    );
    assert!(
        e <= rel * m + abs,
        "{} {key}: max error {e:e} exceeds {rel:e}·{m:e} + {abs:e}",
        g.name
    );
}

#[test]
fn every_stage_matches_golden_from_its_own_3840hz_audio() {
    for g in goldens() {
        let audio = g.f32("audio_3840hz");
        let s = extract_features(&audio).expect("extract");
        check(&g, "melspe_db", &to64(&s.melspe_db.data), 1e-6, 0.0);
        check(&g, "mfcc", &to64(&s.mfcc.data), 1e-6, 0.0);
        check(&g, "mfcc_delta", &to64(&s.mfcc_delta.data), 2e-6, 0.0);
        check(&g, "harmonic", &to64(&s.harmonic), 1e-6, 0.0);
        check(&g, "percussive", &to64(&s.percussive), 1e-6, 0.0);
        check(&g, "cqt_mag", &to64(&s.cqt_mag.data), 1e-6, 0.0);
        check(&g, "chroma_cqt", &to64(&s.chroma_cqt.data), 1e-6, 0.0);
        check(&g, "tuning", &[s.tuning], 0.0, 1e-12);
        check(&g, "onset_env", &to64(&s.onset_env), 1e-5, 1e-6);
        check(&g, "tempogram", &s.tempogram.data, 0.0, 1e-4);
        check(&g, "beats_onehot", &to64(&s.beats_onehot), 0.0, 0.0);
        check(&g, "peaks_onehot", &to64(&s.peaks_onehot), 0.0, 0.0);
        // HPSS tail: the last n mod 512 samples are exactly zero.
        let tail = audio.len() % 512;
        assert!(s.harmonic[audio.len() - tail..].iter().all(|&v| v == 0.0));
        assert!(s.percussive[audio.len() - tail..].iter().all(|&v| v == 0.0));
    }
}

#[test]
fn feature_matrix_matches_golden_per_column() {
    for g in goldens() {
        let audio = g.f32("audio_3840hz");
        let ours = extract_features(&audio).expect("extract").features;
        let (shape, gold) = g.tensor("features");
        assert_eq!(shape, vec![ours.rows, FEATURE_DIM], "{}: shape", g.name);
        let l = ours.rows;
        let mut worst = 0.0f64;
        for c in 0..FEATURE_DIM {
            let mut e = 0.0f64;
            let mut m = 0.0f64;
            for r in 0..l {
                let a = ours.data[r * FEATURE_DIM + c] as f64;
                let b = gold[r * FEATURE_DIM + c];
                e = e.max((a - b).abs());
                m = m.max(b.abs());
            }
            match c {
                0..=52 => {
                    assert!(
                        e <= 1e-3 * m + 1e-7,
                        "{} column {c}: err {e:e}, max {m:e}",
                        g.name
                    );
                    if m > 0.0 {
                        worst = worst.max(e / m);
                    }
                }
                53 => assert_eq!(e, 0.0, "{}: beat column differs", g.name),
                _ => assert!(e <= 1e-4, "{} tempogram column {c}: err {e:e}", g.name),
            }
        }
        println!(
            "{:28} L={l} worst relative column error (0..=52): {worst:.3e}",
            g.name
        );
    }
}

#[test]
fn condition_appends_last_row_and_drops_first() {
    let g = &goldens()[0];
    let f = extract_features(&g.f32("audio_3840hz")).unwrap().features;
    let c = f.condition();
    assert_eq!(c.rows, f.rows);
    for k in 0..f.rows - 1 {
        assert_eq!(
            &c.data[k * FEATURE_DIM..(k + 1) * FEATURE_DIM],
            f.row(k + 1)
        );
    }
    assert_eq!(&c.data[(f.rows - 1) * FEATURE_DIM..], f.row(f.rows - 1));
}
