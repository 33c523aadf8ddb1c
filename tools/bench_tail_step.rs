// Timing check (not a test): one training batch of `train --freeze N` (N < 24)
// through `freezesplit::train::tail::step`, on yolov5n at 640 with random
// crossing tensors of the cut's shapes (from ../shared/models/yolov5n.onnx),
// a re-initialised head of NC classes (5: vehicles_openimages) and ~6 random
// boxes per image.
// Prints the whole step per rep and, with FREEZESPLIT_PROFILE=1, the tape's
// time by op family (forward: time since the previous node, so the tail's
// convs and the loss's ops each carry their own computation; backward: each
// node's backward), summed over the timed reps.
// Run: FREEZESPLIT_PROFILE=1 cargo run --release --features tools --example bench_tail_step [N,..] [BATCH] [REPS] [NC]

use std::time::Instant;

use freezesplit::autograd::profile;
use freezesplit::graph::Model;
use freezesplit::head::Head;
use freezesplit::loss::{Hyp, LossConfig, scale_hyp};
use freezesplit::tail::TailNet;
use freezesplit::train::params::{Group, HeadLayout, Param, ParamStore};
use freezesplit::train::tail::{TailRun, add_params, step};
use ndarray::{Array2, ArrayD, IxDyn};
use rand::{Rng, SeedableRng};

/// This process's CPU time (user + system) in seconds, from /proc/self/stat
/// (0 where there is none): a step's work on a machine shared with others.
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // the fields after the command name's closing parenthesis: utime is the 12th, stime the 13th
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
    let ticks: f64 = f.get(11..13).map_or(0.0, |v| v.iter().filter_map(|x| x.parse::<f64>().ok()).sum());
    ticks / 100.0
}

fn main() {
    // as the CLI does (FREEZESPLIT_MALLOC=default: glibc's defaults)
    freezesplit::kernels::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let ns: Vec<usize> = args.get(1).map_or(vec![17, 10], |s| s.split(',').map(|v| v.parse().unwrap()).collect());
    let bs: usize = args.get(2).map_or(16, |s| s.parse().unwrap());
    let reps: usize = args.get(3).map_or(3, |s| s.parse().unwrap());
    let nc: usize = args.get(4).map_or(5, |s| s.parse().unwrap());
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/yolov5n.onnx");
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    let head = Head::from_model(&model).unwrap();
    let layout = HeadLayout::of(&model);
    let imgsz = 640;
    let anchors: Vec<Vec<[f32; 2]>> = head.anchors.iter().zip(&head.strides).map(|(a, s)| a.iter().map(|[w, h]| [w / s, h / s]).collect()).collect();
    let cfg = LossConfig::new(scale_hyp(&Hyp::scratch_low(), nc, 3, imgsz), nc, anchors);
    let grids: Vec<(usize, usize)> = head.strides.iter().map(|&s| (imgsz / s as usize, imgsz / s as usize)).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut rand_arr = |shape: &[usize], lo: f32, hi: f32| ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(lo..hi));
    // the head of a new class set: [na*no, cin] per level
    let mut store = ParamStore::default();
    for l in 0..head.nl() {
        let cin = head.weights[l].shape()[1];
        store.insert(&layout.weights[l], Param { value: rand_arr(&[cfg.na() * cfg.no(), cin], -0.05, 0.05), group: Group::Decay, row_lr: None });
        store.insert(&layout.biases[l], Param { value: rand_arr(&[cfg.na() * cfg.no()], -4.0, 0.0), group: Group::NoDecay, row_lr: None });
    }
    let nt = bs * 6;
    let targets = Array2::from_shape_fn((nt, 6), |(k, j)| match j {
        0 => (k % bs) as f32,
        1 => (k % nc) as f32,
        2 | 3 => 0.1 + 0.8 * ((k * 37 + j * 11) % 97) as f32 / 97.0,
        _ => 0.03 + 0.4 * ((k * 53 + j * 7) % 89) as f32 / 89.0,
    });
    if std::env::var("BENCH_FTZ").is_ok_and(|v| v == "1") {
        // diagnostic only: flush denormals to zero (MXCSR FTZ | DAZ) on every thread
        #[allow(deprecated)]
        let set = || unsafe { std::arch::x86_64::_mm_setcsr(std::arch::x86_64::_mm_getcsr() | 0x8040) };
        set();
        rayon::broadcast(|_| set());
        eprintln!("BENCH_FTZ=1: denormals flushed to zero");
    }
    eprintln!("yolov5n {imgsz}, batch {bs}, nc {nc}, {nt} targets, {} rayon threads", rayon::current_num_threads());
    for &n in &ns {
        let cut = model.cut(n).unwrap();
        let net = TailNet::build(&model, &cut, imgsz).unwrap();
        let mut store = store.clone();
        let tail = TailRun { net, trains: true, gemm: std::env::var("BENCH_BF16").is_ok_and(|v| v == "1").then(|| freezesplit::kernels::conv::bf16_path().expect("BENCH_BF16=1 on a CPU without AVX512-BF16")), val_dir: tempfile::tempdir().unwrap(), frozen_val: None };
        add_params(&tail.net, &mut store, 1.0);
        let crossing: Vec<ArrayD<f32>> = (0..cut.crossing.len()).map(|i| { let [c, h, w] = cut.shape(i, imgsz); rand_arr(&[bs, c, h, w], -0.3, 3.0) }).collect();
        // warm-up (allocator, rayon pool), not counted
        let _ = step(&store, crossing.clone(), targets.view(), bs, &cfg, &grids, &layout, &tail);
        profile::take();
        let mut times = Vec::new();
        let mut last = [0.0; 3];
        let c0 = cpu_s();
        for _ in 0..reps {
            let t0 = Instant::now();
            let (l, _g) = step(&store, crossing.clone(), targets.view(), bs, &cfg, &grids, &layout, &tail);
            times.push(t0.elapsed().as_secs_f64());
            last = l;
        }
        let cpu = (cpu_s() - c0) / reps as f64;
        let mean = times.iter().sum::<f64>() / reps as f64;
        let min = times.iter().cloned().fold(f64::MAX, f64::min);
        println!("N = {n}: step {mean:.3} s mean, {min:.3} s min over {reps}, CPU {cpu:.3} s/step (loss {last:?}); {} steps/epoch of 439 images -> {:.1} s", 439usize.div_ceil(bs), mean * 439usize.div_ceil(bs) as f64);
        let totals = profile::take();
        if !totals.is_empty() {
            let mut rows: Vec<_> = totals.into_iter().collect();
            rows.sort_by(|a, b| b.1.0.cmp(&a.1.0));
            for (k, (d, _)) in rows.iter().filter(|r| r.0.starts_with("phase")) {
                println!("  {k:<28} {:>8.1} ms/step", d.as_secs_f64() * 1e3 / reps as f64);
            }
            for (k, (d, c)) in rows.iter().filter(|r| !r.0.starts_with("phase")).take(30) {
                println!("  {k:<28} {:>8.1} ms/step {:>6} calls/step", d.as_secs_f64() * 1e3 / reps as f64, c / reps);
            }
        }
    }
}
