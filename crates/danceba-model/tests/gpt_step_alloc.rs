//! A steady generation step of the CPU host step (`src/gpt/cpu_step.rs`) allocates nothing:
//! a counting global allocator around `Gpt::generate_batch`, read from its progress callback.
//! (Its own binary, without libtest's harness: the counter sees every thread of the process,
//! and libtest's main thread allocates while a test runs, for its "has been running for over
//! 60 seconds" notice, which a slow run under emulation reaches. `main` below runs the one
//! test and reports it in libtest's words, honouring a name filter and `--list`.)

mod gpt_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use danceba_model::gpt::{GenerateOptions, SamplingPolicy};
use gpt_common::tiny_gpt_dtype;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NAME: &str = "steady_cpu_steps_do_not_allocate";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return;
    }
    // the flags cargo and libtest users pass take no effect here; a filter is a plain argument
    // (the value after a flag that takes one, e.g. `--test-threads 1`, is not a filter)
    let mut filters = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if matches!(
            a.as_str(),
            "--test-threads" | "--format" | "--color" | "--skip" | "-Z"
        ) {
            it.next();
        } else if !a.starts_with('-') {
            filters.push(a.as_str());
        }
    }
    let exact = args.iter().any(|a| a == "--exact");
    let only_ignored = args.iter().any(|a| a == "--ignored");
    let selected = !only_ignored
        && (filters.is_empty()
            || filters
                .iter()
                .any(|f| if exact { *f == NAME } else { NAME.contains(f) }));
    println!();
    if !selected {
        println!("running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n");
        return;
    }
    println!("running 1 test");
    let t = std::time::Instant::now();
    // a failed assertion panics, and the process exits with 101, as libtest's does
    steady_cpu_steps_do_not_allocate();
    println!("test {NAME} ... ok\n");
    println!(
        "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s\n",
        t.elapsed().as_secs_f64()
    );
}

/// Steps 40..=140 of greedy generation (the window full from step 28 on), at batch 1 and 3
/// (songs of different lengths: one stops at step 120), with f32, f16 and bf16 weights: no
/// allocation but rayon's job queue, which takes a new block of 63 slots every 63 steps (one
/// job per step). The candle forward allocated ~40 times per layer and step.
fn steady_cpu_steps_do_not_allocate() {
    let mut rng = StdRng::seed_from_u64(11);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let gpt = tiny_gpt_dtype(dtype);
        if !gpt.cpu_host_step() {
            println!(
                "SKIPPED: no CPU host step here (needs x86-64 with AVX2 or AVX-512, or AArch64)"
            );
            return;
        }
        let nm = gpt.arch().n_music;
        for lens in [vec![141], vec![141, 120, 141]] {
            let conds: Vec<Tensor> = lens
                .iter()
                .map(|&n| {
                    let v: Vec<f32> = (0..n * nm).map(|_| rng.gen_range(-1.0..1.0)).collect();
                    Tensor::from_vec(v, (n, nm), &Device::Cpu).unwrap()
                })
                .collect();
            let opts = GenerateOptions {
                policy: SamplingPolicy::Greedy,
                ..Default::default()
            };
            let (from, to) = (40, 140);
            let mut seen = (0, 0);
            gpt.generate_batch(&conds, &opts, &mut |k, _| {
                if k == from {
                    seen.0 = ALLOCATIONS.load(Ordering::SeqCst);
                } else if k == to {
                    seen.1 = ALLOCATIONS.load(Ordering::SeqCst);
                }
            })
            .unwrap();
            let n = seen.1 - seen.0;
            let steps = to - from;
            println!(
                "{dtype:?}, batch {}: {n} allocations in {steps} steps",
                lens.len()
            );
            assert!(
                n <= steps.div_ceil(63),
                "{dtype:?}, batch {}: {n} allocations in {steps} steady steps",
                lens.len()
            );
        }
    }
}
