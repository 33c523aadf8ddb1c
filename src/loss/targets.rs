// YOLOv5 v7.0 ComputeLoss.build_targets, on plain data (no tape).
// In: targets [nt, 6] rows (image, class, x, y, w, h) normalised 0..1; per
// level the anchors in grid units (Detect.anchors) and the grid (ny, nx).
// Out: per level tcls, tbox (gxy - gij, gwh), indices (b, a, gj, gi), anch,
// in exactly YOLOv5's order: offset (none, j, k, l, m) outer, then anchor,
// then target. That order decides which write to tobj wins on duplicates.
//
// All arithmetic is f32 in the same operation order as torch, so the
// border decisions (`gxy % 1 < g`) and ratio test match bit for bit.

use ndarray::ArrayView2;

/// Offset bias g and the five (dx, dy) offsets times g: centre, j, k, l, m.
const G: f32 = 0.5;
const OFF: [[f32; 2]; 5] = [[0.0, 0.0], [G, 0.0], [0.0, G], [-G, 0.0], [0.0, -G]];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LevelTargets {
    pub tcls: Vec<usize>,
    pub tbox: Vec<[f32; 4]>,
    pub b: Vec<usize>,
    pub a: Vec<usize>,
    pub gj: Vec<usize>,
    pub gi: Vec<usize>,
    pub anch: Vec<[f32; 2]>,
}

impl LevelTargets {
    pub fn len(&self) -> usize {
        self.b.len()
    }

    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }

    /// Row of p[i] in the (b, a, y, x) row layout used by `compute_loss`.
    pub fn rows(&self, na: usize, ny: usize, nx: usize) -> Vec<usize> {
        (0..self.len())
            .map(|k| ((self.b[k] * na + self.a[k]) * ny + self.gj[k]) * nx + self.gi[k])
            .collect()
    }
}

/// Python-style `x % 1` for f32 (exact for finite x).
fn frac(x: f32) -> f32 {
    x - x.floor()
}

/// One anchor-matched target in grid units (a row of YOLOv5's `t`).
struct Matched {
    b: f32,
    c: f32,
    gxy: [f32; 2],
    gwh: [f32; 2],
    a: usize,
}

pub fn build_targets(
    targets: ArrayView2<f32>,
    anchors: &[Vec<[f32; 2]>],
    grids: &[(usize, usize)],
    anchor_t: f32,
) -> Vec<LevelTargets> {
    assert_eq!(
        targets.ncols(),
        6,
        "targets rows are (image, class, x, y, w, h)"
    );
    assert_eq!(anchors.len(), grids.len());
    let nt = targets.nrows();
    let mut out = Vec::with_capacity(grids.len());

    for (i, &(ny, nx)) in grids.iter().enumerate() {
        let anc = &anchors[i];
        let (fnx, fny) = (nx as f32, ny as f32);

        // Match targets to anchors: wh ratio within anchor_t in both dims.
        let mut t: Vec<Matched> = Vec::new();
        for (a, an) in anc.iter().enumerate() {
            for r in 0..nt {
                let row = targets.row(r);
                let gwh = [row[4] * fnx, row[5] * fny];
                let worst = (0..2)
                    .map(|d| {
                        let ratio = gwh[d] / an[d];
                        ratio.max(1.0 / ratio)
                    })
                    .fold(f32::NEG_INFINITY, f32::max);
                if worst < anchor_t {
                    t.push(Matched {
                        b: row[0],
                        c: row[1],
                        gxy: [row[2] * fnx, row[3] * fny],
                        gwh,
                        a,
                    });
                }
            }
        }

        // Offsets: besides its own cell, a target also goes to the two
        // neighbouring cells nearest to its centre (unless at the border).
        let flags: Vec<[bool; 5]> = t
            .iter()
            .map(|m| {
                let gxi = [fnx - m.gxy[0], fny - m.gxy[1]];
                let jk = |v: f32| frac(v) < G && v > 1.0;
                [true, jk(m.gxy[0]), jk(m.gxy[1]), jk(gxi[0]), jk(gxi[1])]
            })
            .collect();

        let mut lt = LevelTargets::default();
        for (o, off) in OFF.iter().enumerate() {
            for (m, f) in t.iter().zip(&flags) {
                if !f[o] {
                    continue;
                }
                // `.long()` truncates toward zero; values here are >= 0.
                let gi_raw = (m.gxy[0] - off[0]) as i64;
                let gj_raw = (m.gxy[1] - off[1]) as i64;
                // v7.0 clamps gij in place before tbox uses it, so tbox is
                // relative to the clamped cell.
                let gi = gi_raw.clamp(0, nx as i64 - 1) as usize;
                let gj = gj_raw.clamp(0, ny as i64 - 1) as usize;
                lt.b.push(m.b as i64 as usize);
                lt.tcls.push(m.c as i64 as usize);
                lt.a.push(m.a);
                lt.gi.push(gi);
                lt.gj.push(gj);
                lt.tbox.push([
                    m.gxy[0] - gi as f32,
                    m.gxy[1] - gj as f32,
                    m.gwh[0],
                    m.gwh[1],
                ]);
                lt.anch.push(anc[m.a]);
            }
        }
        out.push(lt);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr2;

    fn anchors() -> Vec<Vec<[f32; 2]>> {
        vec![vec![[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]]]
    }

    #[test]
    fn centre_target_gets_neighbours() {
        // gx = 5.3 -> frac .3 < .5 -> left neighbour (j); gy = 6.8 -> bottom (m).
        let t = arr2(&[[0.0f32, 2.0, 5.3 / 16.0, 6.8 / 16.0, 2.0 / 16.0, 3.0 / 16.0]]);
        let lt = &build_targets(t.view(), &anchors(), &[(16, 16)], 4.0)[0];
        // Anchors 0,1,2 all pass (ratios < 4): 3 centre + 3 j + 3 m.
        assert_eq!(lt.len(), 9);
        assert_eq!(&lt.gi[..3], &[5, 5, 5]);
        assert_eq!(&lt.gi[3..6], &[4, 4, 4]);
        assert_eq!(&lt.gj[6..9], &[7, 7, 7]);
        assert_eq!(lt.a, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
        assert!((lt.tbox[3][0] - 1.3).abs() < 1e-5);
        assert!((lt.tbox[6][1] - (-0.2)).abs() < 1e-5);
        assert_eq!(lt.tcls, vec![2; 9]);
    }

    #[test]
    fn ratio_test_rejects_extreme_aspect() {
        let t = arr2(&[[1.0f32, 0.0, 0.5, 0.5, 0.9, 0.01]]);
        let lt = &build_targets(t.view(), &anchors(), &[(16, 16)], 4.0)[0];
        assert!(lt.is_empty());
    }

    #[test]
    fn border_cell_is_clamped_and_tbox_uses_clamped_cell() {
        // x = 1.0 -> gx = 16 -> cell 16 clamped to 15, tbox x = 1.0.
        let t = arr2(&[[0.0f32, 0.0, 1.0, 0.55, 0.1, 0.1]]);
        let lt = &build_targets(t.view(), &anchors(), &[(16, 16)], 4.0)[0];
        assert!(lt.gi.iter().all(|&g| g <= 15));
        let k = lt.gi.iter().position(|&g| g == 15).unwrap();
        assert_eq!(lt.tbox[k][0], 1.0);
    }

    #[test]
    fn no_targets() {
        let t = ndarray::Array2::<f32>::zeros((0, 6));
        let lt = build_targets(t.view(), &anchors(), &[(16, 16)], 4.0);
        assert!(lt[0].is_empty());
    }
}
