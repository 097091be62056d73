//! The official windowed sampler (reference §3.7) and the optional sampling policies.
//!
//! At step k the model sees the last t = min(k+1, block_size−1) tokens of each stream and the
//! condition rows at the same positions, recomputes the whole window, and picks the next token
//! of each stream from the last position's logits.

use candle_core::{DType, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{input_err, Gpt, Result};

/// The official demo-mode start tokens (up 423, down 12), reference §2.3.
pub const DEFAULT_START: (u32, u32) = (423, 12);

/// How the next token is chosen from the last position's logits.
#[derive(Clone, Debug, PartialEq)]
pub enum SamplingPolicy {
    /// Argmax, lowest index on exact ties (the official behaviour).
    Greedy,
    /// Sampling from softmax(logits / temperature), optionally restricted to the `top_k` most
    /// likely tokens and/or the smallest set whose probability reaches `top_p`. Each song draws
    /// from its own RNG seeded with `seed` (up then down at each step), so the same seed gives
    /// the same dance, alone or in a batch. `temperature == 0` is greedy.
    Sample {
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
    },
}

/// Options of [`Gpt::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Start tokens (up, down).
    pub start: (u32, u32),
    pub policy: SamplingPolicy,
    /// Stop after this many steps (default: one step per condition row).
    pub max_steps: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            start: DEFAULT_START,
            policy: SamplingPolicy::Greedy,
            max_steps: None,
        }
    }
}

/// Generated token streams, start token first (N+1 each for N steps).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Tokens {
    pub up: Vec<u32>,
    pub down: Vec<u32>,
}

/// The window of sampling step `k` (0-based) for a model of `block_size`: `(start, t)`, i.e.
/// tokens `x[start .. start+t]` and condition rows `cond[start .. start+t]`.
pub fn window(k: usize, block_size: usize) -> (usize, usize) {
    let max = block_size.saturating_sub(1).max(1);
    let t = (k + 1).min(max);
    (k + 1 - t, t)
}

/// Argmax with the lowest index on exact ties.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

impl SamplingPolicy {
    /// Whether the policy's settings are usable (temperature finite and ≥ 0, top-k ≥ 1, top-p
    /// in (0, 1]), so that a caller can refuse bad settings before any work; [`Gpt::generate`]
    /// checks them too.
    pub fn check(&self) -> Result<()> {
        check_policy(self)
    }
}

fn check_policy(p: &SamplingPolicy) -> Result<()> {
    if let SamplingPolicy::Sample {
        temperature,
        top_k,
        top_p,
        ..
    } = p
    {
        if !temperature.is_finite() || *temperature < 0.0 {
            return input_err(format!(
                "temperature must be a finite number ≥ 0, got {temperature}"
            ));
        }
        if *top_k == Some(0) {
            return input_err("top-k must be at least 1, got 0".into());
        }
        if let Some(p) = top_p {
            if !(p.is_finite() && *p > 0.0 && *p <= 1.0) {
                return input_err(format!("top-p must be in (0, 1], got {p}"));
            }
        }
    }
    Ok(())
}

/// Picks one token from `logits` under `policy` (`rng` is used only when sampling).
pub fn choose(logits: &[f32], policy: &SamplingPolicy, rng: &mut StdRng) -> usize {
    let (temperature, top_k, top_p) = match policy {
        SamplingPolicy::Greedy => return argmax(logits),
        SamplingPolicy::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } => (*temperature, *top_k, *top_p),
    };
    if temperature == 0.0 || top_k == Some(1) || logits.len() <= 1 {
        return argmax(logits);
    }
    // candidates by decreasing logit, lowest index first among equals
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let t = temperature as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = top_p {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let r: f64 = rng.gen::<f64>();
    let mut cum = 0.0;
    for (i, q) in probs.iter().enumerate() {
        cum += q;
        if r < cum {
            return order[i];
        }
    }
    order[probs.len() - 1]
}

impl Gpt {
    /// Generates the token streams for one song: `cond` (N, n_music), one step per row (or
    /// `opts.max_steps`). `progress(step, total)` is called after every step.
    pub fn generate(
        &self,
        cond: &Tensor,
        opts: &GenerateOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tokens> {
        let mut out = self.generate_batch(std::slice::from_ref(cond), opts, progress)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Generates several songs (conditions of possibly different lengths) together: every step
    /// runs one batched forward over the songs that still have rows. All songs share the window
    /// size of a step, so the results equal the single-song runs.
    pub fn generate_batch(
        &self,
        conds: &[Tensor],
        opts: &GenerateOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Tokens>> {
        check_policy(&opts.policy)?;
        let arch = self.arch();
        let (su, sd) = opts.start;
        if su as usize >= arch.vocab_up || sd as usize >= arch.vocab_down {
            return input_err(format!(
                "start tokens ({su}, {sd}) are outside the codebooks ({}, {})",
                arch.vocab_up, arch.vocab_down
            ));
        }
        let mut hosts = Vec::with_capacity(conds.len());
        let mut steps = Vec::with_capacity(conds.len());
        for (i, c) in conds.iter().enumerate() {
            let (n, w) = match c.dims() {
                [n, w] => (*n, *w),
                d => {
                    return input_err(format!(
                        "condition {i} must be (rows, n_music), got shape {d:?}"
                    ))
                }
            };
            if w != arch.n_music {
                return input_err(format!(
                    "condition {i} has {w} columns but this model takes {} music features per row",
                    arch.n_music
                ));
            }
            if n == 0 {
                return input_err(format!("condition {i} is empty (no rows)"));
            }
            let host = c.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(j) = host.iter().position(|v| !v.is_finite()) {
                return input_err(format!(
                    "condition {i} contains a non-finite value ({}) at row {}, column {}",
                    host[j],
                    j / w,
                    j % w
                ));
            }
            steps.push(opts.max_steps.map_or(n, |m| m.min(n)));
            hosts.push(host);
        }
        let total = steps.iter().copied().max().unwrap_or(0);
        let seed = match opts.policy {
            SamplingPolicy::Sample { seed, .. } => seed,
            SamplingPolicy::Greedy => 0,
        };
        let mut rngs: Vec<StdRng> = conds.iter().map(|_| StdRng::seed_from_u64(seed)).collect();
        let mut toks: Vec<Tokens> = steps
            .iter()
            .map(|&n| {
                // room for every step's token: no allocation in the loop
                let (mut up, mut down) = (Vec::with_capacity(n + 1), Vec::with_capacity(n + 1));
                up.push(su);
                down.push(sd);
                Tokens { up, down }
            })
            .collect();
        let nm = arch.n_music;
        // step k's windows: the songs still going and their condition rows (known in advance,
        // unlike the tokens), as slices of the songs' conditions; the next step's are handed
        // to the GPT with this step's (CUDA graphs stage them while the GPU runs this step;
        // elsewhere they are ignored)
        // (every buffer of the loop is reused from step to step: with the CPU host step a
        // greedy step allocates nothing once the window has its full length)
        fn fill<'a>(
            hosts: &'a [Vec<f32>],
            steps: &[usize],
            (k, block_size, nm): (usize, usize, usize),
            out: &mut Vec<(usize, &'a [f32])>,
        ) {
            out.clear();
            let (start, t) = window(k, block_size);
            out.extend(
                (0..hosts.len())
                    .filter(|&i| steps[i] > k)
                    .map(|i| (i, &hosts[i][start * nm..(start + t) * nm])),
            );
        }
        let n = conds.len();
        let (mut cu, mut cd) = (Vec::with_capacity(n * 32), Vec::with_capacity(n * 32));
        let (mut this, mut next) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut cc, mut nc): (Vec<&[f32]>, Vec<&[f32]>) =
            (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut lu, mut ld) = (Vec::new(), Vec::new());
        fill(&hosts, &steps, (0, arch.block_size, nm), &mut this);
        for k in 0..total {
            let (start, t) = window(k, arch.block_size);
            fill(&hosts, &steps, (k + 1, arch.block_size, nm), &mut next);
            if k + 1 >= total {
                next.clear();
            }
            cu.clear();
            cd.clear();
            for &(i, _) in &this {
                cu.extend_from_slice(&toks[i].up[start..start + t]);
                cd.extend_from_slice(&toks[i].down[start..start + t]);
            }
            cc.clear();
            cc.extend(this.iter().map(|&(_, w)| w));
            nc.clear();
            nc.extend(next.iter().map(|&(_, w)| w));
            let hint = (!nc.is_empty()).then_some(nc.as_slice());
            self.last_logits_windows_into(&cu, &cd, &cc, t, hint, &mut lu, &mut ld)?;
            let (vu, vd) = (arch.vocab_up, arch.vocab_down);
            for (j, &(i, _)) in this.iter().enumerate() {
                let nu = choose(&lu[j * vu..(j + 1) * vu], &opts.policy, &mut rngs[i]);
                let nd = choose(&ld[j * vd..(j + 1) * vd], &opts.policy, &mut rngs[i]);
                toks[i].up.push(nu as u32);
                toks[i].down.push(nd as u32);
            }
            std::mem::swap(&mut this, &mut next);
            progress(k + 1, total);
        }
        Ok(toks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_official_rule() {
        assert_eq!(window(0, 29), (0, 1));
        assert_eq!(window(26, 29), (0, 27));
        assert_eq!(window(27, 29), (0, 28));
        assert_eq!(window(28, 29), (1, 28));
        assert_eq!(window(100, 29), (73, 28));
    }

    #[test]
    fn argmax_takes_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
    }

    #[test]
    fn sampling_edge_cases_equal_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 50) as f32 * 0.1).collect();
        let g = argmax(&logits);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let p = SamplingPolicy::Sample {
                temperature: 1.0,
                top_k: Some(1),
                top_p: None,
                seed: 0,
            };
            assert_eq!(choose(&logits, &p, &mut rng), g);
            let p = SamplingPolicy::Sample {
                temperature: 1e-6,
                top_k: None,
                top_p: None,
                seed: 0,
            };
            assert_eq!(choose(&logits, &p, &mut rng), g);
            let p = SamplingPolicy::Sample {
                temperature: 1.0,
                top_k: None,
                top_p: Some(1e-6),
                seed: 0,
            };
            assert_eq!(choose(&logits, &p, &mut rng), g);
        }
        // top-k restricts to the k best
        let p = SamplingPolicy::Sample {
            temperature: 5.0,
            top_k: Some(3),
            top_p: None,
            seed: 0,
        };
        let mut sorted: Vec<usize> = (0..logits.len()).collect();
        sorted.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        for _ in 0..200 {
            let c = choose(&logits, &p, &mut rng);
            assert!(sorted[..3].contains(&c));
        }
    }
}
