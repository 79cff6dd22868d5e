//! Photometric ops on u8 pixels: brightness, contrast, saturation, hue (the building blocks of
//! [`ColorJitter`](crate::ColorJitter)), grayscale and solarize, plus the [`RandomGrayscale`]
//! and [`Solarize`] transforms.
//!
//! Formulas follow torchvision's tensor ops (`adjust_*` blend with black, the mean gray, or the
//! per-pixel gray). Results are rounded to nearest instead of torchvision's truncation: four
//! jitter ops in a row would otherwise darken every image by up to 2 levels on average.
//! Loops run through `multiversion!` so they vectorize with AVX2 where available; color
//! ops deinterleave blocks of pixels into small planar f32 arrays to make that possible.

use crate::error::{check_prob, AugmentError};
use crate::image::Image;
use crate::pipeline::Transform;
use crate::rng::Rng;
use crate::simd::multiversion;

/// Luma with weights 0.299, 0.587, 0.114 in 16-bit fixed point, rounded (PIL's RGB→L). The
/// weights sum to exactly 65536, so white stays 255 and gray pixels stay unchanged.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `clamp(x, 0, 255)` rounded to nearest (ties to even). Adding 2^23 leaves the rounded
/// integer in the low mantissa bits; unlike a saturating `as` cast this vectorizes.
#[inline(always)]
fn to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 255.0) + 8_388_608.0).to_bits() as u8
}

/// An integer-valued `x` in `[0, 2^23)` as i32, via the 2^23 mantissa trick (a plain `as`
/// cast saturates and does not vectorize).
#[inline(always)]
fn small_int(x: f32) -> i32 {
    ((x + 8_388_608.0).to_bits() - 0x4b00_0000) as i32
}

multiversion!(fn apply_affine(data: &mut [u8], a: f32, b: f32) => affine_body);

/// `v -> round(a * v + b)` clamped, for every byte. Direct arithmetic beats a lookup table
/// once vectorized (8 values per instruction against one lookup each).
#[inline(always)]
fn affine_body(data: &mut [u8], a: f32, b: f32) {
    for v in data {
        *v = to_u8(a * *v as f32 + b);
    }
}

/// Multiplies every value by `factor` (torchvision: blend with black); 1 is the identity.
pub fn adjust_brightness(img: &mut Image, factor: f32) {
    apply_affine(&mut img.data, factor, 0.0);
}

multiversion!(fn sum_gray(img: &Image, out: &mut u64) => sum_gray_body);

#[inline(always)]
fn sum_gray_body(img: &Image, out: &mut u64) {
    *out = if img.channels == 1 {
        // u32 partial sums vectorize better than u64; 2^16 values cannot overflow them.
        img.data.chunks(1 << 16).map(|c| c.iter().map(|&v| v as u32).sum::<u32>() as u64).sum()
    } else {
        img.data.chunks_exact(3).map(|p| luma(p[0], p[1], p[2]) as u64).sum()
    };
}

/// Mean gray level: the plain mean for gray images, the mean luma for RGB (torchvision uses the
/// grayscale-converted image for RGB contrast).
pub(crate) fn mean_gray(img: &Image) -> f32 {
    let mut sum = 0;
    sum_gray(img, &mut sum);
    sum as f32 / img.pixels() as f32
}

/// Blends every value with the image's mean gray: `factor * v + (1 - factor) * mean`;
/// 0 gives a flat gray image, 1 is the identity.
pub fn adjust_contrast(img: &mut Image, factor: f32) {
    let mean = mean_gray(img);
    apply_affine(&mut img.data, factor, (1.0 - factor) * mean);
}

/// Pixels per block when RGB is deinterleaved into planar arrays for vectorized math.
const BLOCK: usize = 64;

/// Runs `f` on planar f32 copies of each block of up to [`BLOCK`] RGB pixels and writes the
/// rounded results back. Fixed-size arrays let the compiler vectorize `f`'s loops.
#[inline(always)]
fn per_block(data: &mut [u8], mut f: impl FnMut(&mut [[f32; BLOCK]; 3])) {
    for block in data.chunks_mut(BLOCK * 3) {
        let pixels = block.as_chunks_mut::<3>().0;
        let mut planes = [[0f32; BLOCK]; 3];
        for (i, p) in pixels.iter().enumerate() {
            for c in 0..3 {
                planes[c][i] = p[c] as f32;
            }
        }
        f(&mut planes);
        for (i, p) in pixels.iter_mut().enumerate() {
            for c in 0..3 {
                p[c] = to_u8(planes[c][i]);
            }
        }
    }
}

multiversion!(fn saturation_rgb(data: &mut [u8], factor: f32) => saturation_body);

#[inline(always)]
fn saturation_body(data: &mut [u8], factor: f32) {
    per_block(data, |[r, g, b]| {
        for i in 0..BLOCK {
            // Same fixed-point luma as `luma`, so factor 0 equals `to_grayscale` exactly.
            let (ri, gi, bi) = (small_int(r[i]), small_int(g[i]), small_int(b[i]));
            let l = (ri * 19595 + gi * 38470 + bi * 7471 + 0x8000) >> 16;
            let l = l as f32 * (1.0 - factor);
            r[i] = factor * r[i] + l;
            g[i] = factor * g[i] + l;
            b[i] = factor * b[i] + l;
        }
    });
}

/// Blends each RGB pixel with its own luma: 0 gives grayscale, 1 is the identity, >1
/// oversaturates. Gray images have no saturation and are left unchanged.
pub fn adjust_saturation(img: &mut Image, factor: f32) {
    if img.channels == 3 {
        saturation_rgb(&mut img.data, factor);
    }
}

multiversion!(fn hue_rgb(data: &mut [u8], shift: f32) => hue_body);

/// Branch-free HSV hue rotation. Value (max) and chroma (max - min) are kept, so with the hue
/// `h` in sector units [0, 6) each channel is `max - chroma * clamp(min(k, 4 - k), 0, 1)` with
/// `k = (n + h) mod 6`, n = 5, 3, 1 for R, G, B (the closed form of the HSV→RGB table).
#[inline(always)]
fn hue_body(data: &mut [u8], shift: f32) {
    let shift6 = shift * 6.0;
    per_block(data, |[r, g, b]| {
        for i in 0..BLOCK {
            let (rv, gv, bv) = (r[i], g[i], b[i]);
            let max = rv.max(gv).max(bv);
            let chroma = max - rv.min(gv).min(bv);
            let inv = 1.0 / chroma.max(1.0); // values are integers: chroma is 0 or >= 1
            let h = if max == rv {
                (gv - bv) * inv
            } else if max == gv {
                2.0 + (bv - rv) * inv
            } else {
                4.0 + (rv - gv) * inv
            };
            // h + shift lies in [-4, 9): one wrap brings it into [0, 6).
            let h = h + shift6;
            let h = if h < 0.0 {
                h + 6.0
            } else if h >= 6.0 {
                h - 6.0
            } else {
                h
            };
            let channel = |n: f32| {
                let k = n + h;
                let k = if k >= 6.0 { k - 6.0 } else { k };
                max - chroma * k.min(4.0 - k).clamp(0.0, 1.0)
            };
            r[i] = channel(5.0);
            g[i] = channel(3.0);
            b[i] = channel(1.0);
        }
    });
}

/// Rotates hue by `shift` turns (in [-0.5, 0.5]) in HSV space, like torchvision `adjust_hue`,
/// computed directly on 0..255 values. Gray images are left unchanged.
pub fn adjust_hue(img: &mut Image, shift: f32) {
    if img.channels == 3 {
        hue_rgb(&mut img.data, shift);
    }
}

/// RGB → luma written to all three channels (the channel count is kept, like torchvision
/// `RandomGrayscale`, so batches stay uniform). Gray images are unchanged.
pub fn to_grayscale(img: &mut Image) {
    if img.channels != 3 {
        return;
    }
    for p in img.data.as_chunks_mut::<3>().0 {
        *p = [luma(p[0], p[1], p[2]); 3];
    }
}

/// Inverts every value `>= threshold` (`v -> 255 - v`); threshold 0 inverts everything.
pub fn solarize(img: &mut Image, threshold: u8) {
    for v in &mut img.data {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

/// Converts RGB images to grayscale (3 channels kept) with probability `p`.
#[derive(Clone, Debug)]
pub struct RandomGrayscale {
    p: f32,
}

impl RandomGrayscale {
    pub fn new(p: f32) -> Result<RandomGrayscale, AugmentError> {
        check_prob("grayscale_p", p)?;
        Ok(RandomGrayscale { p })
    }
}

impl Transform for RandomGrayscale {
    fn apply(&self, img: &mut Image, rng: &mut Rng) {
        if img.channels == 3 && rng.bernoulli(self.p) {
            to_grayscale(img);
        }
    }
}

/// Solarization (BYOL, Grill et al. 2020, <https://arxiv.org/abs/2006.07733>): inverts values
/// `>= threshold` with probability `p`.
#[derive(Clone, Debug)]
pub struct Solarize {
    threshold: u8,
    p: f32,
}

impl Solarize {
    pub fn new(threshold: u8, p: f32) -> Result<Solarize, AugmentError> {
        check_prob("solarize_p", p)?;
        Ok(Solarize { threshold, p })
    }
}

impl Transform for Solarize {
    fn apply(&self, img: &mut Image, rng: &mut Rng) {
        if rng.bernoulli(self.p) {
            solarize(img, self.threshold);
        }
    }
}
