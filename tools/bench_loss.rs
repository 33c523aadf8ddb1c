// Timing sanity check (not a test): forward + backward of head + ComputeLoss
// for one batch of 16 images at imgsz 640, yolov5n head channels (64, 128, 256),
// nc = 5, two ways: `compute_loss_on_features` (what training runs: NCHW
// features, convs only where the loss reads them) and the plain route
// (`head_forward` on row-major features + `compute_loss`).
// Run: cargo run --release --features tools --example bench_loss [full|f16]
// Feature copies into the tape are timed separately: in training the cached
// batch is moved in, not copied. On glibc, repeated large allocations page-fault
// unless freed memory is kept, e.g. GLIBC_TUNABLES=glibc.malloc.mmap_threshold=
// 1073741824:glibc.malloc.trim_threshold=17179869184 (about 20% less CPU here).

use std::time::Instant;

use ndarray::{Array2, ArrayD, IxDyn};
use freezesplit::autograd::{FeatData, Features, Tape};
use freezesplit::loss::{
    ANCHORS_P3_P5, Hyp, LossConfig, STRIDES_P3_P5, anchors_in_grid_units, compute_loss, grids_for,
    compute_loss_on_features, head_forward, nchw_to_rows, scale_hyp,
};

/// CPU time of all threads of this process in ms (Linux; 0 elsewhere): less
/// sensitive than wall time to other load on a small shared machine.
fn cpu_ms() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e6
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32) / ((1u64 << 24) as f32)
}

fn rand(shape: &[usize], seed: u64, scale: f32) -> ArrayD<f32> {
    let mut s = seed;
    ArrayD::from_shape_simple_fn(IxDyn(shape), || (lcg(&mut s) * 2.0 - 1.0) * scale)
}

/// The batch as training holds it: f32, or f16 as cached.
fn to_features(a: ArrayD<f32>, f16: bool) -> Features {
    let f = Features::from_array(a);
    if !f16 {
        return f;
    }
    let FeatData::F32(v) = &f.data else { unreachable!() };
    Features { data: FeatData::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()), ..f }
}

fn main() {
    let (bs, imgsz, nc, na) = (16usize, 640usize, 5usize, 3usize);
    let no = nc + 5;
    let ch = [64usize, 128, 256];
    let grids = grids_for(imgsz, imgsz, &STRIDES_P3_P5);
    let anchors = anchors_in_grid_units(&ANCHORS_P3_P5, &STRIDES_P3_P5);
    let hyp = scale_hyp(&Hyp::scratch_low(), nc, 3, imgsz);
    let cfg = LossConfig::new(hyp, nc, anchors);

    let full = std::env::args().nth(1).as_deref() == Some("full");
    let f16 = std::env::args().nth(1).as_deref() == Some("f16");
    let feats: Vec<ArrayD<f32>> = (0..3)
        .map(|i| {
            let f = rand(&[bs, ch[i], grids[i].0, grids[i].1], 10 + i as u64, 1.0);
            if full { nchw_to_rows(f.view().into_dimensionality().unwrap()).into_dyn() } else { f }
        })
        .collect();
    let weights: Vec<ArrayD<f32>> = (0..3)
        .map(|i| rand(&[na * no, ch[i]], 20 + i as u64, 0.05))
        .collect();
    let biases: Vec<ArrayD<f32>> = (0..3)
        .map(|i| rand(&[na * no], 30 + i as u64, 0.5))
        .collect();

    // ~12 boxes per image, sizes from tiny to large.
    let mut s = 7u64;
    let nt = bs * 12;
    let targets = Array2::from_shape_fn((nt, 6), |(r, c)| match c {
        0 => (r / 12) as f32,
        1 => (lcg(&mut s) * nc as f32).floor().min(nc as f32 - 1.0),
        2 | 3 => 0.05 + 0.9 * lcg(&mut s),
        _ => 0.02 + 0.4 * lcg(&mut s) * lcg(&mut s),
    });

    let iters = 10;
    let mut times = Vec::new();
    let mut copy_times = Vec::new();
    let mut cpu = Vec::new();
    for it in 0..iters + 1 {
        let t0 = Instant::now();
        let fcopies: Vec<ArrayD<f32>> = feats.to_vec();
        let fcopies: Vec<Option<Features>> = if full { vec![] } else { fcopies.iter().map(|f| Some(to_features(f.clone(), f16))).collect() };
        let rows: Vec<ArrayD<f32>> = if full { feats.to_vec() } else { vec![] };
        let t1 = Instant::now();
        let c1 = cpu_ms();
        let mut t = Tape::new();
        let wv: Vec<_> = weights.iter().map(|w| t.param(w.clone())).collect();
        let bv: Vec<_> = biases.iter().map(|b| t.param(b.clone())).collect();
        let parts = if full {
            let fv: Vec<_> = rows.into_iter().map(|f| t.constant(f)).collect();
            let p = head_forward(&mut t, &fv, &wv, &bv, bs, &grids, na);
            compute_loss(&mut t, &cfg, &p, &grids, bs, targets.view())
        } else {
            let fv: Vec<_> = fcopies.into_iter().map(|f| t.input(f.unwrap())).collect();
            compute_loss_on_features(&mut t, &cfg, &fv, &wv, &bv, &grids, bs, targets.view())
        };
        let t2 = Instant::now();
        let g = t.backward(parts.total);
        let t3 = Instant::now();
        let c3 = cpu_ms();
        let gn: f32 = wv
            .iter()
            .map(|&w| g.get(w).unwrap().iter().map(|v| v * v).sum::<f32>())
            .sum();
        if it == 0 {
            println!(
                "loss total {:.5} (box {:.5} obj {:.5} cls {:.5}), |dW|^2 {:.3e}, tape nodes {}",
                t.scalar(parts.total),
                t.scalar(parts.lbox),
                t.scalar(parts.lobj),
                t.scalar(parts.lcls),
                gn,
                t.len()
            );
            continue; // warm-up
        }
        times.push(((t2 - t1).as_secs_f64() * 1e3, (t3 - t2).as_secs_f64() * 1e3));
        cpu.push(c3 - c1);
        copy_times.push((t1 - t0).as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| (a.0 + a.1).partial_cmp(&(b.0 + b.1)).unwrap());
    let (f, b) = times[times.len() / 2];
    copy_times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    cpu.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{} bs {bs} imgsz {imgsz} nc {nc}: median forward {f:.1} ms + backward {b:.1} ms = {:.1} ms \
         (feature copy excluded: {:.1} ms); CPU time (all threads) median {:.1} ms",
        if full { "plain conv + compute_loss:" } else if f16 { "compute_loss_on_features (f16):" } else { "compute_loss_on_features:" },
        f + b,
        copy_times[copy_times.len() / 2],
        cpu[cpu.len() / 2]
    );
}
