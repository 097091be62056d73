//! Onset strength, tempogram, tempo, beats and peak picking on a signal where they are not zero.
//!
//! At 3840 Hz the onset envelope of real music is almost always zero (the fmax = 11025 quirk,
//! reference §1.8), so the golden clips do not exercise these stages. This test uses a synthetic
//! signal (noise bursts after silence, generated bit-exactly by an integer LCG) whose reference
//! values were computed once with librosa 0.8.1 / numpy 1.23.5 / scipy 1.10.1 exactly as the
//! official extractor does (`effects.hpss`, `onset.onset_strength(aggregate=np.median)`,
//! `feature.tempogram`, `beat.beat_track`, `util.peak_pick(onset, 3, 3, 3, 5, 0.5, 10)`).

#![allow(clippy::excessive_precision)]

use danceba_audio::extract_features;
use danceba_audio::rhythm::tempo;

/// Noise bursts of 400 samples every 1843 samples, amplitude 0.5, silence between.
fn synth(n: usize, period: usize, burst: usize, amp: f32) -> Vec<f32> {
    let mut s: u64 = 12345;
    (0..n)
        .map(|i| {
            s = (s * 1103515245 + 12345) & 0x7fff_ffff;
            let noise = (s >> 8) as f32 / 8_388_608.0 - 0.5;
            if i % period < burst {
                noise * amp
            } else {
                0.0
            }
        })
        .collect()
}

const ONSET: [f32; 91] = [
    0.0,
    0.0,
    0.0,
    0.0,
    0.0,
    0.0,
    1.5635690689086914,
    0.0,
    0.0,
    4.900942802429199,
    0.0,
    0.0,
    0.0,
    2.833359718322754,
    0.0,
    0.0,
    2.541269302368164,
    0.4412654638290405,
    0.0,
    0.0,
    3.941096544265747,
    0.0,
    0.0,
    0.6837277412414551,
    1.2228175401687622,
    0.0,
    0.0,
    4.928728103637695,
    0.0,
    0.0,
    0.0,
    2.8755648136138916,
    0.0,
    0.0,
    1.7788276672363281,
    0.6033115386962891,
    0.0,
    0.0,
    3.570392370223999,
    0.0,
    0.0,
    0.580420970916748,
    1.6084251403808594,
    0.0,
    0.0,
    5.789799213409424,
    0.0,
    0.0,
    0.0,
    2.6320908069610596,
    0.0,
    0.0,
    3.6396756172180176,
    0.0,
    0.0,
    0.0,
    4.158343315124512,
    0.0,
    0.0,
    0.0,
    1.495864987373352,
    0.0,
    0.0,
    5.444520473480225,
    0.0,
    0.0,
    0.0,
    2.769843578338623,
    0.0,
    0.0,
    4.288484573364258,
    0.24680061638355255,
    0.0,
    0.0,
    4.256538391113281,
    0.0,
    0.0,
    0.888221263885498,
    1.4410018920898438,
    0.0,
    0.0,
    5.287204742431641,
    0.0,
    0.0,
    0.0,
    2.474233627319336,
    0.0,
    0.0,
    4.882259368896484,
    0.17936038970947266,
    0.0,
];
const BEATS: [usize; 20] = [
    5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77, 81,
];
const PEAKS: [usize; 7] = [6, 20, 31, 42, 56, 67, 81];
const TEMPO: f64 = 112.5;
const TEMPOGRAM_ABS_SUM: f64 = 1045.5150015583527;
const TEMPOGRAM_SAMPLES: [(usize, usize, f64); 35] = [
    (1, 10, 0.022527221968794805),
    (3, 10, 0.3085010410768541),
    (4, 10, 0.5156092587110375),
    (7, 10, 0.7826750013917726),
    (8, 10, 0.09851269233196373),
    (12, 10, 0.001938398316223277),
    (16, 10, -2.7914843464921326e-17),
    (1, 20, 0.02246406902022799),
    (3, 20, 0.30791362031431996),
    (4, 20, 0.5138202284717985),
    (7, 20, 0.785412628686972),
    (8, 20, 0.09834120809995002),
    (12, 20, 0.0018986005547234968),
    (16, 20, -2.528480227983075e-17),
    (1, 45, 0.02234723166735555),
    (3, 45, 0.3067929720104118),
    (4, 45, 0.5084036577277363),
    (7, 45, 0.7901460257445582),
    (8, 45, 0.0976761484794776),
    (12, 45, 0.0018016210047660096),
    (16, 45, -4.3582740694674195e-17),
    (1, 70, 0.02229097661296603),
    (3, 70, 0.3060837562775041),
    (4, 70, 0.5015998128145515),
    (7, 70, 0.7923048410860518),
    (8, 70, 0.0966970339874389),
    (12, 70, 0.0017074180579360594),
    (16, 70, -4.715979590336149e-17),
    (1, 88, 0.02229452957523872),
    (3, 88, 0.30580784068893563),
    (4, 88, 0.495662509657228),
    (7, 88, 0.7923157227781169),
    (8, 88, 0.09577960953316979),
    (12, 88, 0.0016407080880338205),
    (16, 88, -1.0335980272384147e-16),
];

#[test]
fn rhythm_stages_match_librosa_on_noise_bursts() {
    let x = synth(46080, 1843, 400, 0.5);
    let s = extract_features(&x).expect("features");
    let l = s.onset_env.len();
    assert_eq!(l, ONSET.len());
    let max = ONSET.iter().fold(0.0f32, |a, &b| a.max(b));
    let mut e = 0.0f32;
    for (a, b) in s.onset_env.iter().zip(ONSET.iter()) {
        e = e.max((a - b).abs());
        // zero exactly where the reference is zero
        assert_eq!(*a == 0.0, *b == 0.0, "onset zero pattern differs");
    }
    println!("onset max err {e:e} (max {max})");
    assert!(e <= 1e-5 * max, "onset error {e}");

    let t = tempo(&s.onset_env, 3840.0, 512);
    assert_eq!(t, TEMPO);

    let beats: Vec<usize> = (0..l).filter(|&i| s.beats_onehot[i] == 1.0).collect();
    assert_eq!(beats, BEATS.to_vec(), "beats");
    let peaks: Vec<usize> = (0..l).filter(|&i| s.peaks_onehot[i] == 1.0).collect();
    assert_eq!(peaks, PEAKS.to_vec(), "peaks");

    let mut te = 0.0f64;
    for &(k, f, v) in TEMPOGRAM_SAMPLES.iter() {
        te = te.max((s.tempogram.get(k, f) - v).abs());
    }
    let abs_sum: f64 = s.tempogram.data.iter().map(|v| v.abs()).sum();
    println!("tempogram sample max err {te:e}; |tg| sum {abs_sum} vs {TEMPOGRAM_ABS_SUM}");
    assert!(te <= 1e-5, "tempogram error {te}");
    assert!((abs_sum - TEMPOGRAM_ABS_SUM).abs() <= 1e-4 * TEMPOGRAM_ABS_SUM);

    // The feature columns carry the same values.
    for f in 0..l {
        let row = s.features.row(f);
        assert_eq!(row[52], s.onset_env[f]);
        assert_eq!(row[53], s.beats_onehot[f]);
        assert_eq!(row[54 + 4] as f64, s.tempogram.get(4, f) as f32 as f64);
    }
}
