//! One level of frozen features for a mini-batch, as the cache stores them.
//!
//! In: per image a `[C, H·W]` map in f16 or f32, either owned (one contiguous
//! `[bs, C, H·W]` buffer) or lent by something that keeps it alive, such as a
//! memory-mapped cache entry. Out: `Features::image(b)`, image `b`'s slice in
//! its stored dtype. The head's ops (`autograd::conv1x1`, `autograd::obj_bce`)
//! read features only through this, one image at a time.
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

/// `[bs, cin, sp]` features of one level; never differentiated.
pub struct Features {
    pub data: FeatData,
    pub bs: usize,
    pub cin: usize,
    pub sp: usize,
}

impl Features {
    /// From an f32 array `[bs, cin, spatial...]`.
    pub fn from_array(a: ndarray::ArrayD<f32>) -> Features {
        let sh = a.shape().to_vec();
        assert!(sh.len() >= 3, "features must be [bs, cin, spatial...]");
        let a = if a.is_standard_layout() { a } else { a.as_standard_layout().into_owned() };
        let (data, offset) = a.into_raw_vec_and_offset();
        assert_eq!(offset.unwrap_or(0), 0);
        Features { data: FeatData::F32(data), bs: sh[0], cin: sh[1], sp: sh[2..].iter().product() }
    }

    /// Lent per-image levels; each must hold `cin·sp` values of one dtype.
    pub fn lent(images: Vec<Arc<dyn LendLevel>>, cin: usize, sp: usize) -> anyhow::Result<Features> {
        let mut f16s = None;
        for (b, im) in images.iter().enumerate() {
            let l = im.level();
            anyhow::ensure!(l.len() == cin * sp, "image {b} of the batch has {} feature values, expected {}", l.len(), cin * sp);
            let is16 = matches!(l, FeatSlice::F16(_));
            anyhow::ensure!(*f16s.get_or_insert(is16) == is16, "a batch mixes f16 and f32 features");
        }
        Ok(Features { bs: images.len(), data: FeatData::Lent(images), cin, sp })
    }

    pub fn shape(&self) -> [usize; 3] {
        [self.bs, self.cin, self.sp]
    }

    /// Image `b`'s `[cin·sp]` values as stored.
    pub fn image(&self, b: usize) -> FeatSlice<'_> {
        let n = self.cin * self.sp;
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
        let owned = Features { data: FeatData::F16(vals.clone()), bs: 2, cin: 2, sp: 3 };
        let lent = Features::lent(vec![Arc::new(Own(vals[..6].to_vec())), Arc::new(Own(vals[6..].to_vec()))], 2, 3).unwrap();
        for b in 0..2 {
            let (FeatSlice::F16(x), FeatSlice::F16(y)) = (owned.image(b), lent.image(b)) else { panic!() };
            assert_eq!(x, y);
        }
        assert!(Features::lent(vec![Arc::new(Own(vals.clone()))], 2, 3).is_err());
    }
}
