//! Geometric ops: [`RandomResizedCrop`] (the augmentation SimCLR found most important, paired
//! with color distortion) and [`HorizontalFlip`].

use std::cell::RefCell;

use crate::error::{check_prob, AugmentError};
use crate::image::Image;
use crate::pipeline::Transform;
use crate::resize::{resize_crop_into, CropBox};
use crate::rng::Rng;

thread_local! {
    /// Spare pixel buffer so an in-place crop can resize into fresh memory and swap, without
    /// allocating per call.
    static SPARE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Crop a random box of random area and aspect ratio, then resize it (antialiased bilinear)
/// to a fixed size.
#[derive(Clone, Debug)]
pub struct RandomResizedCrop {
    size: (u32, u32),
    scale: (f32, f32),
    ratio: (f32, f32),
}

impl RandomResizedCrop {
    /// `size` = output (width, height); `scale` = range of the box area as a fraction of the
    /// image area; `ratio` = range of box width/height, sampled log-uniformly.
    pub fn new(size: (u32, u32), scale: (f32, f32), ratio: (f32, f32)) -> Result<RandomResizedCrop, AugmentError> {
        if size.0 == 0 || size.1 == 0 {
            return Err(AugmentError::param("size", format!("must be > 0, got {size:?}")));
        }
        let (lo, hi) = scale;
        if !(lo.is_finite() && hi.is_finite() && lo >= 0.0 && hi > 0.0 && lo <= hi) {
            return Err(AugmentError::param(
                "crop_scale",
                format!("must satisfy 0 <= lo <= hi, hi > 0, got ({lo}, {hi})"),
            ));
        }
        crate::error::check_range("crop_ratio", ratio, 0.0)?;
        Ok(RandomResizedCrop { size, scale, ratio })
    }

    /// Output (width, height).
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// torchvision `RandomResizedCrop.get_params`: up to 10 attempts at a box of the drawn area
    /// and log-uniform aspect ratio that fits; otherwise the largest centered box whose ratio
    /// is clamped into `ratio`. Rounding is Python's (half to even).
    pub fn get_params(&self, width: u32, height: u32, rng: &mut Rng) -> CropBox {
        let area = width as f64 * height as f64;
        let (log_lo, log_hi) = ((self.ratio.0 as f64).ln(), (self.ratio.1 as f64).ln());
        for _ in 0..10 {
            let target_area = area * rng.range(self.scale.0, self.scale.1) as f64;
            let aspect = (log_lo + (log_hi - log_lo) * rng.uniform() as f64).exp();
            let w = (target_area * aspect).sqrt().round_ties_even();
            let h = (target_area / aspect).sqrt().round_ties_even();
            if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
                let (w, h) = (w as u32, h as u32);
                let y = rng.below((height - h + 1) as u64) as u32;
                let x = rng.below((width - w + 1) as u64) as u32;
                return CropBox { x, y, width: w, height: h };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (min_r, max_r) = (self.ratio.0 as f64, self.ratio.1 as f64);
        let (w, h) = if in_ratio < min_r {
            (width, ((width as f64 / min_r).round_ties_even() as u32).clamp(1, height))
        } else if in_ratio > max_r {
            (((height as f64 * max_r).round_ties_even() as u32).clamp(1, width), height)
        } else {
            (width, height)
        };
        CropBox { x: (width - w) / 2, y: (height - h) / 2, width: w, height: h }
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, img: &mut Image, rng: &mut Rng) {
        let crop = self.get_params(img.width, img.height, rng);
        let mut out = Image { width: 0, height: 0, channels: img.channels, data: SPARE.take() };
        resize_crop_into(img, crop, self.size.0, self.size.1, &mut out);
        std::mem::swap(img, &mut out);
        SPARE.set(out.data);
    }

    /// Resizes straight from `src`, skipping the copy of a possibly large decoded image.
    fn apply_to(&self, src: &Image, dst: &mut Image, rng: &mut Rng) {
        let crop = self.get_params(src.width, src.height, rng);
        resize_crop_into(src, crop, self.size.0, self.size.1, dst);
    }
}

/// Mirrors the image left-right in place.
pub fn flip_horizontal(img: &mut Image) {
    let stride = img.stride();
    for row in img.data.chunks_exact_mut(stride) {
        if img.channels == 1 {
            row.reverse();
        } else {
            // Whole pixels as [u8; 3] elements, so channels stay in order.
            row.as_chunks_mut::<3>().0.reverse();
        }
    }
}

/// Mirror left-right with probability `p`.
#[derive(Clone, Debug)]
pub struct HorizontalFlip {
    p: f32,
}

impl HorizontalFlip {
    pub fn new(p: f32) -> Result<HorizontalFlip, AugmentError> {
        check_prob("flip_p", p)?;
        Ok(HorizontalFlip { p })
    }
}

impl Transform for HorizontalFlip {
    fn apply(&self, img: &mut Image, rng: &mut Rng) {
        if rng.bernoulli(self.p) {
            flip_horizontal(img);
        }
    }
}
