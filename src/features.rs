//! One level of frozen features for a mini-batch, as the cache stores them.
//!
//! In: per image a `[C, H, W]` map in f16 or f32, either owned (one contiguous
//! `[bs, C, H, W]` buffer) or lent by something that keeps it alive, such as a
//! memory-mapped cache entry; or lent in q8 (a byte a value and per channel a
//! scale and offset, `cache::q8`). Out: `Features::image(b)`, image `b`'s
//! slice in its stored dtype. On the tape a `Features` is a leaf of shape
//! `[bs, C, H, W]` (`Tape::input`); the head's fused ops (`autograd::fused`)
//! read it only through this, one image at a time: f32 and f16 as stored, q8
//! dequantised to f32 one image at a time (`with_slice!`, `Q8Slice`).
//!
//! Why lending: a training epoch reads every cached image once; copying each
//! batch out of the page cache into a buffer first cost as much as the head's
//! own arithmetic on it.

use std::sync::Arc;

use half::f16;
use half::slice::HalfFloatSliceExt;

/// One image's level as stored: `[C·H·W]` row-major.
#[derive(Clone, Copy)]
pub enum FeatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Q8(Q8Slice<'a>),
}

/// A q8 level `[C, sp]`: value `[c, s]` = `offset[c] + scale[c]·q[c·sp + s]`.
#[derive(Clone, Copy)]
pub struct Q8Slice<'a> {
    pub q: &'a [u8],
    pub scale: &'a [f32],
    pub offset: &'a [f32],
}

impl Q8Slice<'_> {
    /// Positions per channel.
    pub fn sp(&self) -> usize {
        self.q.len() / self.scale.len().max(1)
    }

    /// All values as f32 into `out` (`[C·sp]`), a channel row at a time (one
    /// scale and offset a row). With AVX2, 8 codes a step; the portable loop
    /// is SSE2, 4 a step. Both round `z + s·q` as a multiply then an add, so
    /// they agree bit for bit (and with `gather_col`).
    pub fn dequantise_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.q.len(), "dequantise_into: lengths differ");
        let sp = self.sp();
        if sp == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::is_x86_feature_detected!("avx2");
        for ((o, q), (&s, &z)) in out.chunks_exact_mut(sp).zip(self.q.chunks_exact(sp)).zip(self.scale.iter().zip(self.offset)) {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2; the row lengths are equal.
                unsafe { dequantise_row_avx2(q, s, z, o) };
                continue;
            }
            dequantise_row(q, s, z, o);
        }
    }

    /// Position `s` of every channel into `col` (`[C]`).
    pub fn gather_col(&self, s: usize, col: &mut [f32]) {
        let sp = self.sp();
        assert!(col.len() <= self.scale.len() && s < sp, "gather_col: position or channels out of range");
        for (c, o) in col.iter_mut().enumerate() {
            *o = self.offset[c] + self.scale[c] * self.q[c * sp + s] as f32;
        }
    }
}

fn dequantise_row(q: &[u8], s: f32, z: f32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(q) {
        *o = z + s * q as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dequantise_row_avx2(q: &[u8], s: f32, z: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(q.len(), out.len());
    let n8 = q.len() / 8 * 8;
    let (vs, vz) = (_mm256_set1_ps(s), _mm256_set1_ps(z));
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 <= len for both slices.
        unsafe {
            let codes = _mm_loadl_epi64(q.as_ptr().add(i) as *const __m128i);
            let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_add_ps(vz, _mm256_mul_ps(vs, v)));
        }
    }
    dequantise_row(&q[n8..], s, z, &mut out[n8..]);
}

impl FeatSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            FeatSlice::F32(x) => x.len(),
            FeatSlice::F16(x) => x.len(),
            FeatSlice::Q8(x) => x.q.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored dtype's name, for errors.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            FeatSlice::F32(_) => "f32",
            FeatSlice::F16(_) => "f16",
            FeatSlice::Q8(_) => "q8",
        }
    }

    /// An f32 copy of the values.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        match self {
            FeatSlice::F32(x) => out.copy_from_slice(x),
            FeatSlice::F16(x) => x.convert_to_f32_slice(&mut out),
            FeatSlice::Q8(x) => x.dequantise_into(&mut out),
        }
        out
    }

    /// Position `s` of every channel (`sp` positions each) into `col`: what
    /// `kernels::gather_col` does, without dequantising a whole q8 image.
    pub fn gather_col(&self, sp: usize, s: usize, col: &mut [f32]) {
        match self {
            FeatSlice::F32(x) => crate::kernels::gather_col(*x, sp, s, col),
            FeatSlice::F16(x) => crate::kernels::gather_col(*x, sp, s, col),
            FeatSlice::Q8(x) => x.gather_col(s, col),
        }
    }
}

/// Something that holds one image's level and lends it out (a cache entry).
pub trait LendLevel: Send + Sync {
    fn level(&self) -> FeatSlice<'_>;
}

pub enum FeatData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// One lender per image, in batch order.
    Lent(Vec<Arc<dyn LendLevel>>),
}

/// `[bs, cin, ny, nx]` features of one level; never differentiated.
pub struct Features {
    pub data: FeatData,
    pub bs: usize,
    pub cin: usize,
    pub ny: usize,
    pub nx: usize,
}

impl Features {
    /// From an f32 array `[bs, cin, ny, nx]`.
    pub fn from_array(a: ndarray::ArrayD<f32>) -> Features {
        let sh: [usize; 4] = a.shape().try_into().unwrap_or_else(|_| panic!("features must be [bs, cin, ny, nx], got {:?}", a.shape()));
        let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        let (data, offset) = a.into_raw_vec_and_offset();
        assert_eq!(offset.unwrap_or(0), 0);
        let [bs, cin, ny, nx] = sh;
        Features { data: FeatData::F32(data), bs, cin, ny, nx }
    }

    /// Lent per-image levels; each must hold `cin·ny·nx` values of one dtype.
    pub fn lent(images: Vec<Arc<dyn LendLevel>>, cin: usize, ny: usize, nx: usize) -> anyhow::Result<Features> {
        let mut dtype = None;
        for (b, im) in images.iter().enumerate() {
            let l = im.level();
            anyhow::ensure!(l.len() == cin * ny * nx, "image {b} of the batch has {} feature values, expected {}", l.len(), cin * ny * nx);
            if let FeatSlice::Q8(q) = l {
                anyhow::ensure!(q.scale.len() == cin && q.offset.len() == cin, "image {b} of the batch has {} q8 scales, expected {cin}", q.scale.len());
            }
            let d = l.dtype_name();
            anyhow::ensure!(*dtype.get_or_insert(d) == d, "a batch mixes {} and {d} features", dtype.unwrap_or(d));
        }
        Ok(Features { bs: images.len(), data: FeatData::Lent(images), cin, ny, nx })
    }

    pub fn shape(&self) -> [usize; 4] {
        [self.bs, self.cin, self.ny, self.nx]
    }

    /// Positions per channel, ny·nx.
    pub fn sp(&self) -> usize {
        self.ny * self.nx
    }

    /// An f32 copy `[bs, cin, ny, nx]` (see `autograd::tape::Value` for why
    /// the head's ops do without one).
    pub fn to_array(&self) -> ndarray::ArrayD<f32> {
        let mut out = Vec::with_capacity(self.bs * self.cin * self.sp());
        for b in 0..self.bs {
            match self.image(b) {
                FeatSlice::F32(x) => out.extend_from_slice(x),
                FeatSlice::F16(x) => out.extend(x.iter().map(|v| v.to_f32())),
                q8 => out.extend(q8.to_f32_vec()),
            }
        }
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.shape()), out).expect("images hold cin·ny·nx values")
    }

    /// Image `b`'s `[cin·ny·nx]` values as stored.
    pub fn image(&self, b: usize) -> FeatSlice<'_> {
        let n = self.cin * self.sp();
        match &self.data {
            FeatData::F32(v) => FeatSlice::F32(&v[b * n..(b + 1) * n]),
            FeatData::F16(v) => FeatSlice::F16(&v[b * n..(b + 1) * n]),
            FeatData::Lent(v) => v[b].level(),
        }
    }
}

/// Runs `$body` with `$x` bound to a `FeatSlice`'s typed slice: f32 and f16
/// as stored, q8 dequantised to f32 (`with_dequantised`). `$body` runs inside
/// a closure for q8, so it must not `return` or use `?`.
#[macro_export]
macro_rules! with_slice {
    ($s:expr, $x:ident => $body:expr) => {
        match $s {
            $crate::features::FeatSlice::F32($x) => $body,
            $crate::features::FeatSlice::F16($x) => $body,
            $crate::features::FeatSlice::Q8(q) => $crate::features::with_dequantised(q, |$x: &[f32]| $body),
        }
    };
}

thread_local! {
    /// Each thread's dequantised image, reused across calls: a fresh buffer
    /// per image would cost page faults and zeroing every step.
    static DEQUANTISED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on `q` dequantised to f32, in this thread's buffer. Why a whole
/// image and not a row at a time: the kernels read all channels of a window
/// of positions at once (`kernels::conv_rows_window`); an image of the
/// largest level (64·80·80 at 640) is 1.6 MB, inside a core's L2. A nested
/// call (rayon may run another image's work on this thread inside `f`) finds
/// the buffer taken and uses its own.
pub fn with_dequantised<R>(q: Q8Slice<'_>, f: impl FnOnce(&[f32]) -> R) -> R {
    let mut buf = DEQUANTISED.take();
    buf.resize(q.q.len(), 0.0);
    q.dequantise_into(&mut buf);
    let r = f(&buf);
    DEQUANTISED.set(buf);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Own(Vec<f16>);
    impl LendLevel for Own {
        fn level(&self) -> FeatSlice<'_> {
            FeatSlice::F16(&self.0)
        }
    }

    #[test]
    fn owned_and_lent_images_read_the_same() {
        let vals: Vec<f16> = (0..12).map(|i| f16::from_f32(i as f32)).collect();
        let owned = Features { data: FeatData::F16(vals.clone()), bs: 2, cin: 2, ny: 1, nx: 3 };
        let lent = Features::lent(vec![Arc::new(Own(vals[..6].to_vec())), Arc::new(Own(vals[6..].to_vec()))], 2, 1, 3).unwrap();
        for b in 0..2 {
            let (FeatSlice::F16(x), FeatSlice::F16(y)) = (owned.image(b), lent.image(b)) else { panic!() };
            assert_eq!(x, y);
        }
        assert_eq!(lent.to_array(), owned.to_array());
        assert_eq!(lent.to_array().shape(), &[2, 2, 1, 3]);
        assert_eq!(lent.to_array()[[1, 1, 0, 2]], 11.0);
        assert!(Features::lent(vec![Arc::new(Own(vals.clone()))], 2, 1, 3).is_err());
    }

    struct OwnQ8 {
        q: Vec<u8>,
        scale: Vec<f32>,
        offset: Vec<f32>,
    }
    impl LendLevel for OwnQ8 {
        fn level(&self) -> FeatSlice<'_> {
            FeatSlice::Q8(Q8Slice { q: &self.q, scale: &self.scale, offset: &self.offset })
        }
    }

    #[test]
    fn q8_rows_dequantise_alike_with_and_without_avx2() {
        let q: Vec<u8> = (0..1003u32).map(|i| (i * 37 % 256) as u8).collect();
        let (scale, offset) = (vec![0.0173f32], vec![-0.2781f32]);
        let mut fast = vec![0.0; q.len()];
        Q8Slice { q: &q, scale: &scale, offset: &offset }.dequantise_into(&mut fast);
        let mut plain = vec![0.0; q.len()];
        dequantise_row(&q, scale[0], offset[0], &mut plain);
        assert_eq!(fast, plain);
        let mut col = [0.0];
        Q8Slice { q: &q, scale: &scale, offset: &offset }.gather_col(1001, &mut col);
        assert_eq!(col[0], plain[1001]);
    }

    #[test]
    fn q8_images_read_dequantised_everywhere() {
        // 2 channels of 3 positions: value = offset[c] + scale[c]·q
        let im = OwnQ8 { q: vec![0, 1, 255, 10, 20, 30], scale: vec![0.5, -0.25], offset: vec![-1.0, 2.0] };
        let want = [-1.0, -0.5, 126.5, -0.5, -3.0, -5.5];
        let f = Features::lent(vec![Arc::new(im)], 2, 1, 3).unwrap();
        assert_eq!(f.to_array().as_slice().unwrap(), &want);
        assert_eq!(f.image(0).to_f32_vec(), want);
        let seen: Vec<f32> = crate::with_slice!(f.image(0), x => x.iter().map(|&v| crate::kernels::Elem::to_f32(v)).collect());
        assert_eq!(seen, want);
        let mut col = [0.0; 2];
        f.image(0).gather_col(3, 2, &mut col);
        assert_eq!(col, [126.5, -5.5]);
        // a batch is one dtype, with one scale per channel
        let mixed: Vec<Arc<dyn LendLevel>> = vec![Arc::new(Own(vec![f16::ZERO; 6])), Arc::new(OwnQ8 { q: vec![0; 6], scale: vec![1.0; 2], offset: vec![0.0; 2] })];
        assert!(Features::lent(mixed, 2, 1, 3).err().unwrap().to_string().contains("mixes f16 and q8"));
        assert!(Features::lent(vec![Arc::new(OwnQ8 { q: vec![0; 6], scale: vec![1.0; 3], offset: vec![0.0; 3] })], 2, 1, 3).is_err());
    }
}
