//! [`ColorJitter`]: random brightness, contrast, saturation and hue in random order, applied as
//! a whole with probability `p` (torchvision `RandomApply([ColorJitter(..)], p)`), the color
//! distortion SimCLR pairs with random cropping.

use crate::color::{adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation};
use crate::error::{check_prob, AugmentError};
use crate::image::Image;
use crate::pipeline::Transform;
use crate::rng::Rng;

/// Random color distortion with torchvision semantics: brightness, contrast and saturation
/// factors uniform in `[max(0, 1 - x), 1 + x]`, hue shift uniform in `[-hue, hue]` turns; the
/// four applied in a random order. A strength of 0 disables that component. On gray images only
/// brightness and contrast apply.
#[derive(Clone, Debug)]
pub struct ColorJitter {
    brightness: Option<(f32, f32)>,
    contrast: Option<(f32, f32)>,
    saturation: Option<(f32, f32)>,
    hue: Option<(f32, f32)>,
    p: f32,
}

fn factor_range(field: &str, x: f32) -> Result<Option<(f32, f32)>, AugmentError> {
    if !(x.is_finite() && x >= 0.0) {
        return Err(AugmentError::param(field, format!("must be a finite number >= 0, got {x}")));
    }
    Ok((x > 0.0).then(|| ((1.0 - x).max(0.0), 1.0 + x)))
}

impl ColorJitter {
    /// Strengths as in torchvision `ColorJitter(brightness, contrast, saturation, hue)`;
    /// `hue` must be in [0, 0.5]. `p` is the probability the jitter is applied at all.
    pub fn new(brightness: f32, contrast: f32, saturation: f32, hue: f32, p: f32) -> Result<ColorJitter, AugmentError> {
        if !(0.0..=0.5).contains(&hue) {
            return Err(AugmentError::param("jitter.hue", format!("must be in [0,0.5], got {hue}")));
        }
        check_prob("jitter.p", p)?;
        Ok(ColorJitter {
            brightness: factor_range("jitter.brightness", brightness)?,
            contrast: factor_range("jitter.contrast", contrast)?,
            saturation: factor_range("jitter.saturation", saturation)?,
            hue: (hue > 0.0).then_some((-hue, hue)),
            p,
        })
    }
}

impl Transform for ColorJitter {
    fn apply(&self, img: &mut Image, rng: &mut Rng) {
        if !rng.bernoulli(self.p) {
            return;
        }
        let rgb = img.channels == 3;
        let mut order = [0u8, 1, 2, 3];
        rng.shuffle(&mut order);
        let mut draw = |r: Option<(f32, f32)>, applies: bool| match r {
            Some((lo, hi)) if applies => Some(rng.range(lo, hi)),
            _ => None,
        };
        let b = draw(self.brightness, true);
        let c = draw(self.contrast, true);
        let s = draw(self.saturation, rgb);
        let h = draw(self.hue, rgb);
        for op in order {
            match (op, b, c, s, h) {
                (0, Some(f), ..) => adjust_brightness(img, f),
                (1, _, Some(f), ..) => adjust_contrast(img, f),
                (2, _, _, Some(f), _) => adjust_saturation(img, f),
                (3, .., Some(f)) => adjust_hue(img, f),
                _ => {}
            }
        }
    }
}
