// Timing check (not a test): the tail convolutions against the machine's peak.
// 1. The f32 FMA peak, from a tight loop of independent FMAs (AVX2 8-wide and,
//    where the CPU has it, AVX-512 16-wide), on 1 and 2 threads.
// 2. GFLOP/s of conv2d forward, backward-weights (dW, db) and backward-input
//    (dX) for the conv shapes of yolov5n's layers 10..23 at 640, batch 16
//    (from ../shared/models/yolov5n.onnx), on 1 and 2 rayon threads, as a % of
//    that peak. FLOPs count 2·N·M·(C/g·kH·kW)·H'·W' per pass (padding
//    included), the convention oneDNN and PyTorch benchmarks use.
// 3. The same shapes' GEMMs alone, one image, buffers reused (what
//    freezesplit::kernels::conv runs, without im2col/col2im, allocation and
//    the parallel loop): forward W·col, dW = dY·colᵀ both as row dot
//    products (sgemm_nt_acc, which autograd::conv uses from 1600 pixels on)
//    and packed (sgemm on colᵀ), dX = Wᵀ·dY. FREEZESPLIT_GEMM=fallback
//    times matrixmultiply instead.
// On 1 thread the times are the thread's CPU time (/proc/thread-self/schedstat),
// so that other processes on a shared machine inflate them less than the wall
// clock; 2 threads use the wall clock.
// Run: cargo run --features tools --example bench_conv [BATCH]
// (BENCH_THREADS=1: the 1-thread tables only; BENCH_GEMMS_ONLY=1: the GEMM table only;
// BENCH_BF16=1: the convs and GEMMs on the bf16 path (train's --precision bf16),
// as a % of the bf16 dot-product peak, measured the same way with vdpbf16ps)

use std::time::Instant;

use freezesplit::autograd::Tape;
use freezesplit::kernels::conv::{Mat, Path, sgemm_nt_acc_on, sgemm_on};
use freezesplit::tail::ops::ConvSpec;
use ndarray::{ArrayD, IxDyn};

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    const ITERS: u64 = 200_000_000;

    /// 12 independent 8-wide FMA chains: enough to cover a 4-cycle latency on
    /// two FMA ports.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_avx2(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); 12];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for v in acc {
            s = _mm256_add_ps(s, v);
        }
        let mut l = [0.0f32; 8];
        // SAFETY: l holds 8 floats.
        unsafe { _mm256_storeu_ps(l.as_mut_ptr(), s) };
        l.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn fma_avx512(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); 12];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        sum(acc)
    }

    /// The sum of the chains (so that the loop is not optimised away).
    #[target_feature(enable = "avx512f")]
    fn sum(acc: [__m512; 12]) -> f32 {
        _mm512_reduce_add_ps(acc.into_iter().fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, v)))
    }

    /// 12 independent bf16 dot-product chains (`vdpbf16ps`: 32 multiply-adds each).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dp_bf16(iters: u64) -> f32 {
        let mut acc = [_mm512_set1_ps(1.0); 12];
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.999), _mm512_set1_ps(0.999));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-7), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        sum(acc)
    }

    /// GFLOP/s of `threads` copies of the loop at `width` lanes (32: the
    /// bf16 dot product, 32 multiply-adds per instruction).
    pub fn gflops(width: usize, threads: usize) -> f64 {
        let iters = ITERS / width as u64;
        let t0 = std::time::Instant::now();
        let cpu = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(move || {
                        let c0 = super::cpu_s();
                        // SAFETY: callers check the CPU features first.
                        let v = unsafe {
                            match width {
                                32 => dp_bf16(iters),
                                16 => fma_avx512(iters),
                                _ => fma_avx2(iters),
                            }
                        };
                        std::hint::black_box(v);
                        super::cpu_s() - c0
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold(0.0, f64::max)
        });
        let flops = 2.0 * 12.0 * width as f64 * iters as f64 * threads as f64;
        flops / if threads == 1 { cpu } else { t0.elapsed().as_secs_f64() } / 1e9
    }
}

fn rand(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32) / ((1u64 << 24) as f32) - 0.5
    })
}

/// (name, cin, cout, k, stride, input size) of yolov5n's tail convs at 640
/// (the same shape appears in several layers; one row each).
const SHAPES: &[(&str, usize, usize, usize, usize, usize)] = &[
    ("L10 1x1 256>128 @20", 256, 128, 1, 1, 20),
    ("L13.cv1 1x1 256>64 @40", 256, 64, 1, 1, 40),
    ("L13.m 3x3 64>64 @40", 64, 64, 3, 1, 40),
    ("L13.cv3 1x1 128>128 @40", 128, 128, 1, 1, 40),
    ("L14 1x1 128>64 @40", 128, 64, 1, 1, 40),
    ("L17.cv1 1x1 128>32 @80", 128, 32, 1, 1, 80),
    ("L17.m.cv1 1x1 32>32 @80", 32, 32, 1, 1, 80),
    ("L17.m 3x3 32>32 @80", 32, 32, 3, 1, 80),
    ("L17.cv3 1x1 64>64 @80", 64, 64, 1, 1, 80),
    ("L18 3x3 s2 64>64 80>40", 64, 64, 3, 2, 80),
    ("L21 3x3 s2 128>128 40>20", 128, 128, 3, 2, 40),
    ("L23.m 3x3 128>128 @20", 128, 128, 3, 1, 20),
    ("L23.cv3 1x1 256>256 @20", 256, 256, 1, 1, 20),
];

/// This thread's CPU time in seconds (0 where /proc has no schedstat).
fn cpu_s() -> f64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
}

/// Seconds per call of `f`: the best of `reps` rounds, each the mean of as
/// many calls as fill 0.2 s (CPU time on this machine ticks in 4 ms steps).
/// CPU time when rayon has one thread (the work then runs on this thread),
/// wall time otherwise.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    let cpu = rayon::current_num_threads() == 1;
    (0..reps)
        .map(|_| {
            let (t0, c0) = (Instant::now(), cpu_s());
            let mut calls = 0;
            loop {
                f();
                calls += 1;
                let d = if cpu { cpu_s() - c0 } else { t0.elapsed().as_secs_f64() };
                if d >= 0.2 {
                    break d / calls as f64;
                }
            }
        })
        .fold(f64::INFINITY, f64::min)
}

/// The GEMM path timed: the bf16 one with BENCH_BF16=1, else the CPU's f32 default.
fn gemm_path() -> Path {
    if std::env::var("BENCH_BF16").is_ok_and(|v| v == "1") {
        freezesplit::kernels::conv::bf16_path().expect("BENCH_BF16=1 on a CPU without AVX512-BF16")
    } else {
        freezesplit::kernels::conv::path()
    }
}

fn tape() -> Tape {
    Tape::with_gemm(gemm_path())
}

/// (forward, backward dW+db, backward dX) seconds of one conv shape.
fn time_conv(n: usize, cin: usize, cout: usize, k: usize, s: usize, hw: usize) -> [f64; 3] {
    let spec = ConvSpec::square(k, s, k / 2);
    let x = rand(&[n, cin, hw, hw], 1);
    let w = rand(&[cout, cin, k, k], 2);
    let b = rand(&[cout], 3);
    let reps = 2;
    let mut t = tape();
    let (xv, wv, bv) = (t.constant(x.clone()), t.constant(w.clone()), t.constant(b.clone()));
    let fwd = best(reps, || {
        std::hint::black_box(t.conv2d(xv, wv, Some(bv), &spec));
        // drop the output (the outputs of many calls would pile up)
        t.nodes.truncate(3);
    });
    drop(t);
    let bwd = |x_param: bool| {
        let mut t = tape();
        let xv = if x_param { t.param(x.clone()) } else { t.constant(x.clone()) };
        let (wv, bv) = if x_param { (t.constant(w.clone()), t.constant(b.clone())) } else { (t.param(w.clone()), t.param(b.clone())) };
        let y = t.conv2d(xv, wv, Some(bv), &spec);
        best(reps, || {
            std::hint::black_box(t.backward(y));
        })
    };
    [fwd, bwd(false), bwd(true)]
}

/// Seconds per call of the GEMMs of one image of one conv shape (see the
/// file header): [forward, dW as dot products, dW packed, dX].
fn time_gemms(cin: usize, cout: usize, k: usize, s: usize, hw: usize) -> [f64; 4] {
    let spec = ConvSpec::square(k, s, k / 2);
    let g = spec.geom(cin, hw, hw).unwrap();
    let (m, kk, p) = (cout, g.k(), g.p());
    let x = rand(&[cin * hw * hw], 1).into_raw_vec_and_offset().0;
    let w = rand(&[m * kk], 2).into_raw_vec_and_offset().0;
    let gy = rand(&[m * p], 3).into_raw_vec_and_offset().0;
    let mut col = vec![0.0f32; kk * p];
    freezesplit::kernels::conv::im2col(&g, &x, &mut col);
    let (mut out, mut dw, mut dcol) = (vec![0.0f32; m * p], vec![0.0f32; m * kk], vec![0.0f32; kk * p]);
    // a pointwise conv's dX adds into the gradient buffer, a 3x3's overwrites col
    let beta_dx = if g.is_pointwise() { 1.0 } else { 0.0 };
    let gp = gemm_path();
    [
        best(2, || sgemm_on(gp, m, kk, p, 1.0, Mat::rows(&w, kk), Mat::rows(&col, p), 1.0, &mut out)),
        best(2, || sgemm_nt_acc_on(gp, m, kk, p, &gy, p, &col, p, &mut dw)),
        best(2, || sgemm_on(gp, m, p, kk, 1.0, Mat::rows(&gy, p), Mat::t(&col, p), 0.0, &mut dw)),
        best(2, || sgemm_on(gp, kk, m, p, 1.0, Mat::t(&w, kk), Mat::rows(&gy, p), beta_dx, &mut dcol)),
    ]
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(16);
    // BENCH_THREADS=1: only the 1-thread table
    let max_threads: usize = std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let mut peak1 = 0.0;
    let mut peak2 = 0.0;
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let (a1, a2) = (peak::gflops(8, 1), peak::gflops(8, 2));
            println!("FMA peak AVX2    (8 lanes):  1 thread {a1:7.1} GFLOP/s   2 threads {a2:7.1} GFLOP/s");
            (peak1, peak2) = (a1, a2);
        }
        if is_x86_feature_detected!("avx512f") {
            let (a1, a2) = (peak::gflops(16, 1), peak::gflops(16, 2));
            println!("FMA peak AVX-512 (16 lanes): 1 thread {a1:7.1} GFLOP/s   2 threads {a2:7.1} GFLOP/s");
            (peak1, peak2) = (f64::max(peak1, a1), f64::max(peak2, a2));
        }
        if gemm_path() == Path::Avx512Bf16 {
            // the bf16 path's own peak: the percentages below are of it
            (peak1, peak2) = (peak::gflops(32, 1), peak::gflops(32, 2));
            println!("bf16 dot-product peak (vdpbf16ps, 32 multiply-adds): 1 thread {peak1:7.1} GFLOP/s   2 threads {peak2:7.1} GFLOP/s");
        }
    }
    // BENCH_GEMMS_ONLY=1: skip the conv tables (a block-size sweep needs only the last one)
    let convs = std::env::var_os("BENCH_GEMMS_ONLY").is_none();
    println!("batch {n}; GFLOP/s and % of the best peak above (fwd | dW | dX)");
    for threads in (1..=max_threads).filter(|t| convs && [1, 2].contains(t)) {
        let peak = if threads == 1 { peak1 } else { peak2 };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        println!("-- {threads} thread(s), peak {peak:.1} GFLOP/s");
        let mut tot = [0.0f64; 3];
        let mut flops_tot = 0.0;
        for &(name, cin, cout, k, s, hw) in SHAPES {
            let oh = (hw + 2 * (k / 2) - k) / s + 1;
            let flops = 2.0 * (n * cout * cin * k * k * oh * oh) as f64;
            let t = pool.install(|| time_conv(n, cin, cout, k, s, hw));
            let g: Vec<f64> = t.iter().map(|&s| flops / s / 1e9).collect();
            println!(
                "{name:26} {:6.1} {:4.0}% | {:6.1} {:4.0}% | {:6.1} {:4.0}%   ({:.1} / {:.1} / {:.1} ms)",
                g[0],
                100.0 * g[0] / peak,
                g[1],
                100.0 * g[1] / peak,
                g[2],
                100.0 * g[2] / peak,
                t[0] * 1e3,
                t[1] * 1e3,
                t[2] * 1e3
            );
            for i in 0..3 {
                tot[i] += t[i];
            }
            flops_tot += flops;
        }
        let g: Vec<f64> = tot.iter().map(|&s| flops_tot / s / 1e9).collect();
        println!("{:26} {:6.1} {:4.0}% | {:6.1} {:4.0}% | {:6.1} {:4.0}%", "all shapes", g[0], 100.0 * g[0] / peak, g[1], 100.0 * g[1] / peak, g[2], 100.0 * g[2] / peak);
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    println!("-- the GEMMs alone, one image, 1 thread: GFLOP/s and % of {peak1:.1} (fwd | dW dot | dW packed | dX)");
    for &(name, cin, cout, k, s, hw) in SHAPES {
        let oh = (hw + 2 * (k / 2) - k) / s + 1;
        let flops = 2.0 * (cout * cin * k * k * oh * oh) as f64;
        let t = pool.install(|| time_gemms(cin, cout, k, s, hw));
        let cells: Vec<String> = t.iter().map(|&s| format!("{:6.1} {:4.0}%", flops / s / 1e9, 100.0 * flops / s / 1e9 / peak1)).collect();
        println!("{name:26} {}", cells.join(" | "));
    }
}
