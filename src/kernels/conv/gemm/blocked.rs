// The loops around the register-tiled kernels (avx512, avx2), for any tile
// size: the packed-operand GEMM and the row-dot-product GEMM.
// In: the operands as `Mat` / row slices, the tile sizes as const generics,
// and the instruction set's tile kernel as a function. Out: C.
// `gemm`: BLIS-style: A (the weights: small) packed whole, once per call,
// into MR-row panels per k block; B in KB x NB blocks of NR-column panels
// (zero past the matrix edge, so the kernel's inner loop reads both operands
// with unit stride and no edge tests); each B micro-panel stays in L1 while
// the A panels of one MB-row block stream past it from L2. `nt_acc`: TI x TJ tiles of dot products
// along the rows, L lanes wide, in PC-long chunks (the tile's rows then sit
// in L1) whose lane partials carry over to the next chunk, so each output
// ends in one horizontal sum.
// Why shared: the instruction sets differ in the register tile and the
// cache-block sizes only.

use std::cell::RefCell;

use super::Mat;

thread_local! {
    /// Packing buffers (A, B) and `nt_acc`'s lane partials, kept per
    /// thread so a call allocates nothing.
    static BUFS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// One MR x NR tile: C[..rows, ..cols] = alpha·Apanel·Bpanel + beta·C, for
/// an A panel of kc·MR and a B panel of kc·NR elements (f32, or `bf16`'s
/// u32 pairs along k) and C's rows `ldc` apart (f32).
/// Arguments: kc, a, b, alpha, beta, c, ldc, rows, cols.
pub(super) type TileKernel<E = f32> = unsafe fn(usize, *const E, *const E, f32, f32, *mut f32, usize, usize, usize);

/// Packs B's k rows pc..pc+kc, columns jc..jc+nc into NR-column panels of
/// kc·NR elements (zero past the matrix edge). Arguments: pc, kc, jc, nc, dst.
pub(super) type PackB<'a, E> = &'a mut dyn FnMut(usize, usize, usize, usize, &mut [E]);

/// Packs kc rows of nc floats (row-major, rows `ld` apart) into NR-column
/// panels of kc·NR floats as `pack_b` does (zero past nc), in the
/// instruction set's registers: `pack_b`'s slice copy of one panel row
/// was a call to memcpy per NR floats.
/// Arguments: src, ld, kc, nc, dst.
pub(super) type RowPacker = unsafe fn(*const f32, usize, usize, usize, *mut f32);

/// An instruction set's pieces for `gemm`: the register tile, and a packer
/// of row-major B where it has one (else `pack_b`'s portable loop).
#[derive(Clone, Copy)]
pub(super) struct Kernels {
    pub tile: TileKernel,
    pub rows: Option<RowPacker>,
}

/// C = alpha·A·B + beta·C with the tile `kernel` (see the file header);
/// k blocks of `kb`, column blocks of `nb` (a multiple of NR), row blocks of
/// `mb` (a multiple of MR): within one, every B micro-panel of the column
/// block meets that block's A panels, so C is written in runs of `nb`
/// columns (a tall C, as dX's col matrix, then does not scatter its rows
/// over a page each per micro-panel).
///
/// # Safety
/// The CPU runs `kernel`; the operands hold what `super::sgemm_on` checks.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm<const MR: usize, const NR: usize>(
    kernel: Kernels, blocks: [usize; 3], m: usize, k: usize, n: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &mut [f32],
) {
    BUFS.with(|bufs| {
        let (av, bv) = &mut *bufs.borrow_mut();
        let ap = aligned(av, m.div_ceil(MR) * MR * k);
        pack_a::<MR>(&a, m, k, blocks[1], ap);
        // SAFETY: as the caller promises; ap holds A packed as `body` reads it.
        unsafe { body::<MR, NR, f32>(kernel.tile, &mut f32_packer::<NR>(kernel, b, n), blocks, ap, m, k, n, alpha, beta, c, bv) }
    })
}

/// A [m, k] packed as `gemm` packs it with k blocks of `kb`, for several
/// products with the same A (a conv's weights, shared by a batch's images).
pub(super) fn packed_a<const MR: usize>(a: &Mat, m: usize, k: usize, kb: usize) -> Vec<f32> {
    let mut ap = vec![0.0; m.div_ceil(MR) * MR * k];
    pack_a::<MR>(a, m, k, kb, &mut ap);
    ap
}

/// `gemm` with A already packed by `packed_a` (same MR and k block).
///
/// # Safety
/// The CPU runs `kernel`; ap is `packed_a::<MR>` of an [m, k] A with k
/// blocks of `blocks[1]`; b and c hold what `super::sgemm_on` checks.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_packed<const MR: usize, const NR: usize>(
    kernel: Kernels, blocks: [usize; 3], ap: &[f32], m: usize, k: usize, n: usize, alpha: f32, b: Mat, beta: f32, c: &mut [f32],
) {
    assert!(ap.len() >= m.div_ceil(MR) * MR * k, "gemm_packed: packed A too small");
    BUFS.with(|bufs| {
        let bv = &mut bufs.borrow_mut().1;
        // SAFETY: as the caller promises.
        unsafe { body::<MR, NR, f32>(kernel.tile, &mut f32_packer::<NR>(kernel, b, n), blocks, ap, m, k, n, alpha, beta, c, bv) }
    })
}

/// The B packer of the f32 kernels: the instruction set's row packer for a
/// row-major B, else `pack_b`'s portable loop.
fn f32_packer<const NR: usize>(kernel: Kernels, b: Mat, n: usize) -> impl FnMut(usize, usize, usize, usize, &mut [f32]) {
    move |pc, kc, jc, nc, bp| match kernel.rows {
        // SAFETY: B's rows pc..pc+kc hold columns jc..jc+nc (sgemm_on
        // checked B's extent); bp holds kc·NR per panel; the kernel's
        // instruction set is the one its caller checked
        Some(rows) if b.cs == 1 => unsafe { rows(b.data.as_ptr().wrapping_add(pc * b.rs + jc), b.rs, kc, nc, bp.as_mut_ptr()) },
        _ => pack_b::<NR>(&b, n, pc, kc, jc, nc, bp),
    }
}

/// The loops of `gemm` after A is packed (k in elements of E; `bv`: the B
/// packing buffer, filled by `pack`).
///
/// # Safety
/// As `gemm_packed`; `pack` writes the panels `tile` reads.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn body<const MR: usize, const NR: usize, E: Copy + Default>(
    tile: TileKernel<E>, pack: PackB<E>, [mb, kb, nb]: [usize; 3], ap: &[E], m: usize, k: usize, n: usize, alpha: f32, beta: f32, c: &mut [f32], bv: &mut Vec<E>,
) {
    let mp = m.div_ceil(MR);
    let mbp = (mb / MR).max(1);
    let bp = aligned(bv, kb * nb.min(n.div_ceil(NR) * NR));
    for jc in (0..n).step_by(nb) {
        let nc = nb.min(n - jc);
        for pc in (0..k).step_by(kb) {
            let kc = kb.min(k - pc);
            pack(pc, kc, jc, nc, bp);
            let beta = if pc == 0 { beta } else { 1.0 };
            for ib in (0..mp).step_by(mbp) {
                for jp in 0..nc.div_ceil(NR) {
                    let j0 = jc + jp * NR;
                    for ip in ib..mp.min(ib + mbp) {
                        let i0 = ip * MR;
                        // SAFETY: the panels hold kc·MR and kc·NR elements; the
                        // tile's rows i0..i0+rows, columns j0..j0+cols lie in
                        // c [m, n]; the caller vouches for the CPU.
                        unsafe {
                            tile(
                                kc, ap.as_ptr().wrapping_add(pc * mp * MR + ip * kc * MR), bp.as_ptr().wrapping_add(jp * kc * NR), alpha, beta,
                                c.as_mut_ptr().wrapping_add(i0 * n + j0), n, MR.min(m - i0), NR.min(n - j0),
                            )
                        };
                    }
                }
            }
        }
    }
}

/// Adds the TI x TJ lane-wise products of a's and b's rows over `len`
/// elements (f32, or bf16 as u16) to `part` (f32) (TI·TJ vectors of L lanes, row-major [TI][TJ][L]), or,
/// when `first`, writes them there (part's old contents ignored: no zero
/// fill of the partials before each column block).
/// Arguments: len, a's TI row pointers, b's TJ row pointers, part, first.
pub(super) type DotTile<const TI: usize, const TJ: usize, E = f32> = unsafe fn(usize, [*const E; TI], [*const E; TJ], &mut [f32], bool);

/// C [m, n] += A [m, len] · B [n, len]ᵀ with the `tile` kernel (see the file
/// header): chunks of `pc` floats, `jb` b tiles per pass over a's chunk;
/// `reduce` sums one output's L lane partials (a fixed order).
/// Each output keeps L lane sums over the whole length (lane l adds positions
/// ≡ l mod L in order): the order depends on the shapes alone.
///
/// # Safety
/// The CPU runs `tile`; the operands hold what `super::sgemm_nt_acc_on` checks.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn nt_acc<const TI: usize, const TJ: usize, const L: usize, E>(
    tile: DotTile<TI, TJ, E>, reduce: fn(&[f32]) -> f32, pc: usize, jb: usize, m: usize, n: usize, len: usize, a: &[E], lda: usize, b: &[E], ldb: usize, c: &mut [f32],
) {
    let ti = m.div_ceil(TI);
    let tsz = TI * TJ * L;
    BUFS.with(|bufs| {
        let parts = &mut bufs.borrow_mut().0;
        let need = ti * jb * tsz;
        if parts.len() < need {
            parts.resize(need, 0.0);
        }
        for j_blk in (0..n).step_by(TJ * jb) {
            let tj = (n - j_blk).div_ceil(TJ).min(jb);
            for p0 in (0..len).step_by(pc) {
                let pl = pc.min(len - p0);
                for jt in 0..tj {
                    let j0 = j_blk + TJ * jt;
                    // rows past the edge repeat the first one; their sums are dropped
                    let bj: [*const E; TJ] = std::array::from_fn(|t| b[(if j0 + t < n { j0 + t } else { j0 }) * ldb + p0..].as_ptr());
                    for it in 0..ti {
                        let i0 = TI * it;
                        let ai: [*const E; TI] = std::array::from_fn(|t| a[(if i0 + t < m { i0 + t } else { i0 }) * lda + p0..].as_ptr());
                        let part = &mut parts[(it * jb + jt) * tsz..][..tsz];
                        // SAFETY: every row pointer has pl floats after it
                        // (checked sizes); part holds TI·TJ vectors; the
                        // caller vouches for the CPU.
                        unsafe { tile(pl, ai, bj, part, p0 == 0) };
                    }
                }
            }
            for jt in 0..tj {
                let j0 = j_blk + TJ * jt;
                for it in 0..ti {
                    let i0 = TI * it;
                    let part = &parts[(it * jb + jt) * tsz..][..tsz];
                    for (r, pr) in part.chunks_exact(TJ * L).enumerate().take(m - i0) {
                        for (t, v) in pr.chunks_exact(L).enumerate().take(n - j0) {
                            c[(i0 + r) * n + j0 + t] += reduce(v);
                        }
                    }
                }
            }
        }
    })
}

/// `len` elements of `v` starting on a 64-byte boundary (growing `v` as needed).
pub(super) fn aligned<E: Copy + Default>(v: &mut Vec<E>, len: usize) -> &mut [E] {
    let slack = 64 / size_of::<E>();
    if v.len() < len + slack {
        v.resize(len + slack, E::default());
    }
    let off = v.as_ptr().align_offset(64).min(slack);
    &mut v[off..off + len]
}

/// A [m, k] as panels: for k block q (`kb` long, the last one shorter),
/// panel ip: kc·MR floats at q·kb·mp·MR + ip·kc·MR, element (kk, r) =
/// A[ip·MR + r, q·kb + kk] (0 past row m).
fn pack_a<const MR: usize>(a: &Mat, m: usize, k: usize, kb: usize, ap: &mut [f32]) {
    let mp = m.div_ceil(MR);
    for pc in (0..k).step_by(kb) {
        let kc = kb.min(k - pc);
        for ip in 0..mp {
            let dst = &mut ap[pc * mp * MR + ip * kc * MR..][..kc * MR];
            let i0 = ip * MR;
            if a.rs == 1 && i0 + MR <= m {
                // a transposed matrix (the conv's Wᵀ in dX): a panel's MR
                // rows at one kk are MR adjacent floats
                for (kk, d) in dst.chunks_exact_mut(MR).enumerate() {
                    d.copy_from_slice(&a.data[(pc + kk) * a.cs + i0..][..MR]);
                }
                continue;
            }
            for r in 0..MR {
                let i = i0 + r;
                if i >= m {
                    dst.iter_mut().skip(r).step_by(MR).for_each(|d| *d = 0.0);
                } else if a.cs == 1 {
                    let row = &a.data[i * a.rs + pc..][..kc];
                    dst.iter_mut().skip(r).step_by(MR).zip(row).for_each(|(d, &v)| *d = v);
                } else {
                    (0..kc).for_each(|kk| dst[kk * MR + r] = a.at(i, pc + kk));
                }
            }
        }
    }
}

/// `pack_a`'s panels for any element type: element (kk, r) of a k block's
/// panel ip is `at(ip·MR + r, pc + kk)` (E's default past row m), k
/// counted in elements of E.
pub(super) fn pack_a_with<const MR: usize, E: Copy + Default>(m: usize, k: usize, kb: usize, at: impl Fn(usize, usize) -> E) -> Vec<E> {
    let mp = m.div_ceil(MR);
    let mut ap = vec![E::default(); mp * MR * k];
    for pc in (0..k).step_by(kb) {
        let kc = kb.min(k - pc);
        for ip in 0..mp {
            let dst = &mut ap[pc * mp * MR + ip * kc * MR..][..kc * MR];
            for (kk, d) in dst.chunks_exact_mut(MR).enumerate() {
                for (r, v) in d.iter_mut().enumerate().take(m.saturating_sub(ip * MR)) {
                    *v = at(ip * MR + r, pc + kk);
                }
            }
        }
    }
    ap
}

/// B [pc..pc+kc, jc..jc+nc] as NR-column panels of kc·NR floats, element
/// (kk, jj) of panel jp = B[pc + kk, jc + jp·NR + jj] (0 past column n).
pub(super) fn pack_b<const NR: usize>(b: &Mat, n: usize, pc: usize, kc: usize, jc: usize, nc: usize, bp: &mut [f32]) {
    if b.cs == 1 {
        // a row-major B (the col matrix, or x itself for a 1x1 conv): each
        // row's nc floats are read in one sweep and dealt out to the panels
        // (which sit in L2), so the reads from memory run along the rows
        // rather than hopping a row (a page, at 6400 pixels) per 64 bytes
        for kk in 0..kc {
            let row = &b.data[(pc + kk) * b.rs + jc..][..nc];
            for (jp, src) in row.chunks(NR).enumerate() {
                let d = &mut bp[jp * kc * NR + kk * NR..][..NR];
                d[..src.len()].copy_from_slice(src);
                d[src.len()..].fill(0.0);
            }
        }
        return;
    }
    for jp in 0..nc.div_ceil(NR) {
        let j0 = jc + jp * NR;
        let w = NR.min(n - j0);
        let dst = &mut bp[jp * kc * NR..][..kc * NR];
        if w < NR {
            dst.fill(0.0);
        }
        for jj in 0..w {
            let col = dst.iter_mut().skip(jj).step_by(NR);
            if b.rs == 1 {
                // a transposed matrix (the col matrix in dW): column jj is contiguous
                col.zip(&b.data[(j0 + jj) * b.cs + pc..][..kc]).for_each(|(d, &v)| *d = v);
            } else {
                col.enumerate().for_each(|(kk, d)| *d = b.at(pc + kk, j0 + jj));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout and edge: the panels hold what their definition says.
    #[test]
    fn panels_hold_the_definition() {
        let (m, k, n) = (13, 11, 37);
        let data: Vec<f32> = (0..m.max(n) * k).map(|i| i as f32 + 1.0).collect();
        for t in [false, true] {
            let a = if t { Mat::t(&data, m) } else { Mat::rows(&data, k) };
            let kb = 4;
            let mut ap = vec![f32::NAN; m.div_ceil(8) * 8 * k];
            pack_a::<8>(&a, m, k, kb, &mut ap);
            let mp = m.div_ceil(8);
            for pc in (0..k).step_by(kb) {
                let kc = kb.min(k - pc);
                for ip in 0..mp {
                    for kk in 0..kc {
                        for r in 0..8 {
                            let want = if ip * 8 + r < m { a.at(ip * 8 + r, pc + kk) } else { 0.0 };
                            assert_eq!(ap[pc * mp * 8 + ip * kc * 8 + kk * 8 + r], want, "a t {t} ({ip}, {kk}, {r})");
                        }
                    }
                }
            }
            let b = if t { Mat::t(&data, k) } else { Mat::rows(&data, n) };
            let (pc, kc, jc, nc) = (3, 7, 5, 32usize);
            let mut bp = vec![f32::NAN; nc.div_ceil(6) * 6 * kc];
            pack_b::<6>(&b, n, pc, kc, jc, nc, &mut bp);
            for jp in 0..nc.div_ceil(6) {
                for kk in 0..kc {
                    for jj in 0..6 {
                        let j = jc + jp * 6 + jj;
                        let want = if j < n { b.at(pc + kk, j) } else { 0.0 };
                        assert_eq!(bp[jp * kc * 6 + kk * 6 + jj], want, "b t {t} ({jp}, {kk}, {jj})");
                    }
                }
            }
        }
    }

    /// A portable tile kernel with `TileKernel`'s contract, so the loops can
    /// run with any instruction set's tile and block sizes on any CPU.
    unsafe fn scalar_tile<const MR: usize, const NR: usize>(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
        for r in 0..rows {
            for j in 0..cols {
                // SAFETY: the contract of `TileKernel`.
                unsafe {
                    let s: f32 = (0..kc).map(|kk| *a.add(kk * MR + r) * *b.add(kk * NR + j)).sum();
                    let p = c.add(r * ldc + j);
                    *p = alpha * s + if beta != 0.0 { beta * *p } else { 0.0 };
                }
            }
        }
    }

    /// A portable `DotTile`: lane l of each output adds positions ≡ l mod L.
    unsafe fn scalar_dot<const TI: usize, const TJ: usize, const L: usize>(len: usize, a: [*const f32; TI], b: [*const f32; TJ], part: &mut [f32], first: bool) {
        if first {
            part[..TI * TJ * L].fill(0.0);
        }
        for r in 0..TI {
            for t in 0..TJ {
                for p in 0..len {
                    // SAFETY: every pointer has len floats after it.
                    part[(r * TJ + t) * L + p % L] += unsafe { *a[r].add(p) * *b[t].add(p) };
                }
            }
        }
    }

    /// The loops with AVX-512's tile and block sizes (8x48, k blocks of 128,
    /// column blocks of 768, one row block; dot tiles 4x6x16 in chunks of 512,
    /// 8 per pass) and with AVX2's, through portable kernels: the blocking,
    /// packing and edge handling each instruction set relies on, checked on
    /// machines that lack it, on every stride layout and off-tile sizes.
    #[test]
    fn the_loops_compute_the_product_at_every_tile_and_block_size() {
        let naive = |m: usize, k: usize, n: usize, a: &Mat, b: &Mat| -> Vec<f32> { (0..m * n).map(|i| (0..k).map(|kk| a.at(i / n, kk) * b.at(kk, i % n)).sum()).collect() };
        for (m, k, n) in [(13, 515, 131), (7, 77, 17), (64, 300, 800), (9, 129, 1601)] {
            let ad: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
            let bd: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let a = if ta { Mat::t(&ad, m) } else { Mat::rows(&ad, k) };
                let b = if tb { Mat::t(&bd, k) } else { Mat::rows(&bd, n) };
                let want = naive(m, k, n, &a, &b);
                let c0: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32).collect();
                for beta in [0.0, 0.5] {
                    let runs: [(&str, Vec<f32>); 2] = [
                        ("8x48", { let mut c = c0.clone(); unsafe { gemm::<8, 48>(Kernels { tile: scalar_tile::<8, 48>, rows: None }, [usize::MAX, 128, 768], m, k, n, 1.5, a, b, beta, &mut c) }; c }),
                        ("6x16", { let mut c = c0.clone(); unsafe { gemm::<6, 16>(Kernels { tile: scalar_tile::<6, 16>, rows: None }, [144, 256, 256], m, k, n, 1.5, a, b, beta, &mut c) }; c }),
                    ];
                    for (name, c) in runs {
                        for i in 0..m * n {
                            let w = 1.5 * want[i] + beta * c0[i];
                            assert!((c[i] - w).abs() <= 1e-3 * (1.0 + w.abs()), "{name} ({m}, {k}, {n}) t {ta} {tb} beta {beta}: [{i}] {} vs {w}", c[i]);
                        }
                    }
                }
            }
            // C += A·Bᵀ with A [m, k] and B [n, k] row-major
            let bt: Vec<f32> = (0..n * k).map(|i| ((i * 29 % 89) as f32 - 44.0) / 22.0).collect();
            let want: Vec<f32> = (0..m * n).map(|i| 1.0 + (0..k).map(|p| ad[(i / n) * k + p] * bt[(i % n) * k + p]).sum::<f32>()).collect();
            let sum = |v: &[f32]| v.iter().sum::<f32>();
            for (name, c) in [
                ("4x6x16", { let mut c = vec![1.0; m * n]; unsafe { nt_acc::<4, 6, 16, f32>(scalar_dot::<4, 6, 16>, sum, 512, 8, m, n, k, &ad, k, &bt, k, &mut c) }; c }),
                ("3x4x8", { let mut c = vec![1.0; m * n]; unsafe { nt_acc::<3, 4, 8, f32>(scalar_dot::<3, 4, 8>, sum, 512, 8, m, n, k, &ad, k, &bt, k, &mut c) }; c }),
            ] {
                for i in 0..m * n {
                    assert!((c[i] - want[i]).abs() <= 1e-3 * (1.0 + want[i].abs()), "nt {name} ({m}, {k}, {n}): [{i}] {} vs {}", c[i], want[i]);
                }
            }
        }
    }
}
