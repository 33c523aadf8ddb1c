//! One level of frozen features for a mini-batch, as the cache stores them.
//!
//! In: per image a `[C, H, W]` map in f16 or f32, either owned (one contiguous
//! `[bs, C, H, W]` buffer) or lent by something that keeps it alive, such as a
//! memory-mapped cache entry. Out: `Features::image(b)`, image `b`'s slice in
//! its stored dtype. On the tape a `Features` is a leaf of shape `[bs, C, H, W]`
//! (`Tape::input`); the head's fused ops (`autograd::fused`) read it only
//! through this, one image at a time.
//!
//! Why lending: a training epoch reads every cached image once; copying each
//! batch out of the page cache into a buffer first cost as much as the head's
//! own arithmetic on it.

use std::sync::Arc;

use half::f16;

/// One image's level as stored: `[C·H·W]` row-major.
#[derive(Clone, Copy)]
pub enum FeatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl FeatSlice<'_> {
    pub fn len(&self) -> usize {
        match self {
            FeatSlice::F32(x) => x.len(),
            FeatSlice::F16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        let mut f16s = None;
        for (b, im) in images.iter().enumerate() {
            let l = im.level();
            anyhow::ensure!(l.len() == cin * ny * nx, "image {b} of the batch has {} feature values, expected {}", l.len(), cin * ny * nx);
            let is16 = matches!(l, FeatSlice::F16(_));
            anyhow::ensure!(*f16s.get_or_insert(is16) == is16, "a batch mixes f16 and f32 features");
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

/// Runs `$body` with `$x` bound to a `FeatSlice`'s typed slice.
#[macro_export]
macro_rules! with_slice {
    ($s:expr, $x:ident => $body:expr) => {
        match $s {
            $crate::features::FeatSlice::F32($x) => $body,
            $crate::features::FeatSlice::F16($x) => $body,
        }
    };
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
}
