//! Forward parity of the GPT with `golden/model/gpt_forward.safetensors`.

mod gpt_common;

use danceba_model::gpt::{lpe::lpe_phase, mamba::Mamba, MambaImpl};
use gpt_common::*;

const TOL: f32 = 1e-4;
const WINDOWS: [usize; 5] = [1, 4, 17, 18, 28];

#[test]
fn lpe_phase_matches_golden() {
    let g = load_st("gpt_forward.safetensors");
    for t in WINDOWS {
        let cond = &g[&format!("t{t}.cond")];
        let want = &g[&format!("t{t}.lpe_phase")];
        let got = lpe_phase(cond).unwrap();
        assert_eq!(got.dims(), want.dims(), "t={t}");
        let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut worst = 0f32;
        let mut wraps = 0;
        for (x, y) in a.iter().zip(&b) {
            let mut d = (x - y).abs();
            // ±π for an imaginary part that is rounding noise around a negative real part
            if (d - 2.0 * std::f32::consts::PI).abs() < 1e-3 {
                wraps += 1;
                d = (d - 2.0 * std::f32::consts::PI).abs();
            }
            worst = worst.max(d);
        }
        println!(
            "t={t}: worst phase diff {worst:e}, ±π wraps {wraps} of {}",
            a.len()
        );
        assert!(
            worst < 1e-4 && wraps == 0,
            "t={t}: phase differs by {worst} ({wraps} wraps)"
        );
    }
}

#[test]
fn forward_matches_golden_at_every_window() {
    let g = load_st("gpt_forward.safetensors");
    let mut gpt = tiny_gpt();
    for imp in [MambaImpl::Portable, MambaImpl::FusedCpu] {
        gpt.set_mamba_impl(imp);
        for t in WINDOWS {
            let k = |n: &str| g[&format!("t{t}.{n}")].clone();
            let tr = gpt
                .forward_trace(&k("idx_up"), &k("idx_down"), &k("cond"))
                .unwrap();
            for (name, got) in [
                ("lpe_out", &tr.lpe_out),
                ("base_out", &tr.base_out),
                ("head_blocks_out", &tr.head_blocks_out),
                ("logits_up", &tr.logits_up),
                ("logits_down", &tr.logits_down),
            ] {
                let e = rel_err(got, &k(name));
                println!("{imp:?} t={t} {name}: rel err {e:e}");
                assert!(e <= TOL, "{imp:?} t={t} {name}: rel err {e}");
            }
        }
    }
}

#[test]
fn mamba_layer_matches_golden_portable_and_fused() {
    let g = load_st("gpt_forward.safetensors");
    let (vb, arch) = tiny_vb();
    let m = Mamba::load(vb.pp("gpt_head.blocks.0.mamba_2"), arch.n_embd, &arch.mamba).unwrap();
    let x = &g["mamba.in"];
    let want = &g["mamba.out"];
    let p = m.forward(x, MambaImpl::Portable).unwrap();
    let f = m.forward(x, MambaImpl::FusedCpu).unwrap();
    let (ep, ef, epf) = (rel_err(&p, want), rel_err(&f, want), rel_err(&f, &p));
    println!("mamba: portable {ep:e}, fused {ef:e}, fused vs portable {epf:e}");
    assert!(ep <= TOL && ef <= TOL && epf <= TOL);
}
