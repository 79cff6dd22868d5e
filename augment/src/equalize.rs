//! [`Equalize`]: per-channel histogram equalization, the same lookup table as PIL
//! `ImageOps.equalize` (used by RandAugment / AutoAugment style recipes).

use crate::error::{check_prob, AugmentError};
use crate::image::Image;
use crate::pipeline::Transform;
use crate::rng::Rng;

/// PIL's equalization table for one channel's histogram, or `None` for the identity (a single
/// gray level, or too few pixels outside the top level to spread). The top occupied level is
/// left out of the step so it maps to 255 and the others spread evenly below it.
fn equalize_lut(hist: &[u32; 256]) -> Option<[u8; 256]> {
    let occupied = hist.iter().filter(|&&h| h > 0).count();
    if occupied <= 1 {
        return None;
    }
    let total: u64 = hist.iter().map(|&h| h as u64).sum();
    let last = *hist.iter().rev().find(|&&h| h > 0)? as u64;
    let step = (total - last) / 255;
    if step == 0 {
        return None;
    }
    let mut lut = [0u8; 256];
    let mut n = step / 2;
    for (out, &h) in lut.iter_mut().zip(hist.iter()) {
        *out = (n / step).min(255) as u8;
        n += h as u64;
    }
    Some(lut)
}

/// Equalizes each channel's histogram in place.
pub fn equalize(img: &mut Image) {
    let c = img.channels as usize;
    for ch in 0..c {
        let mut hist = [0u32; 256];
        for &v in img.data.iter().skip(ch).step_by(c) {
            hist[v as usize] += 1;
        }
        if let Some(lut) = equalize_lut(&hist) {
            for v in img.data.iter_mut().skip(ch).step_by(c) {
                *v = lut[*v as usize];
            }
        }
    }
}

/// Histogram equalization with probability `p`.
#[derive(Clone, Debug)]
pub struct Equalize {
    p: f32,
}

impl Equalize {
    pub fn new(p: f32) -> Result<Equalize, AugmentError> {
        check_prob("equalize_p", p)?;
        Ok(Equalize { p })
    }
}

impl Transform for Equalize {
    fn apply(&self, img: &mut Image, rng: &mut Rng) {
        if rng.bernoulli(self.p) {
            equalize(img);
        }
    }
}
