//! [`RecipeConfig`]: the serde-configurable description of one view's augmentation recipe (a
//! table in the TOML config), with the SimCLR preset (Chen et al. 2020,
//! <https://arxiv.org/abs/2002.05709>, appendix A) and validation that names the bad field.

use serde::{Deserialize, Serialize};

use crate::blur::GaussianBlur;
use crate::color::{RandomGrayscale, Solarize};
use crate::crop::{HorizontalFlip, RandomResizedCrop};
use crate::equalize::Equalize;
use crate::error::AugmentError;
use crate::jitter::ColorJitter;
use crate::normalize::Normalize;
use crate::pipeline::{Pipeline, Transform};

/// Threshold used for solarization, as in BYOL (0.5 of the range).
const SOLARIZE_THRESHOLD: u8 = 128;

/// Color jitter strengths (torchvision `ColorJitter` arguments) and the probability to apply it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JitterConfig {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub p: f32,
}

impl Default for JitterConfig {
    fn default() -> JitterConfig {
        JitterConfig { brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1, p: 0.8 }
    }
}

/// Gaussian blur settings; `kernel_size` 0 means about 10% of the output side, made odd.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlurConfig {
    pub p: f32,
    pub sigma: (f32, f32),
    pub kernel_size: u32,
}

impl Default for BlurConfig {
    fn default() -> BlurConfig {
        BlurConfig { p: 0.0, sigma: (0.1, 2.0), kernel_size: 0 }
    }
}

impl BlurConfig {
    /// The kernel size used for output side `size`: the configured one, or SimCLR's
    /// `int(0.1 * size)` made odd (at least 3).
    pub fn kernel_size_for(&self, size: u32) -> u32 {
        if self.kernel_size != 0 {
            self.kernel_size
        } else {
            (size / 10).max(3) | 1
        }
    }
}

/// One view's augmentation recipe.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecipeConfig {
    /// Output side in pixels (views are square).
    pub size: u32,
    /// Range of the crop area as a fraction of the image area.
    pub crop_scale: (f32, f32),
    /// Range of the crop aspect ratio (width / height), sampled log-uniformly.
    pub crop_ratio: (f32, f32),
    pub flip_p: f32,
    pub jitter: JitterConfig,
    pub grayscale_p: f32,
    pub blur: BlurConfig,
    pub solarize_p: f32,
    pub equalize_p: f32,
    /// Per-channel mean for normalization; empty = 0.5 per channel.
    pub mean: Vec<f32>,
    /// Per-channel std for normalization; empty = 0.5 per channel.
    pub std: Vec<f32>,
}

impl Default for RecipeConfig {
    fn default() -> RecipeConfig {
        RecipeConfig {
            size: 224,
            crop_scale: (0.08, 1.0),
            crop_ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            jitter: JitterConfig::default(),
            grayscale_p: 0.2,
            blur: BlurConfig::default(),
            solarize_p: 0.0,
            equalize_p: 0.0,
            mean: Vec::new(),
            std: Vec::new(),
        }
    }
}

impl RecipeConfig {
    /// SimCLR recipe. Gray (`channels == 1`): crop, flip, jitter of brightness and contrast
    /// only, no grayscale, no blur. RGB: crop, flip, jitter(0.4, 0.4, 0.4, 0.1, p 0.8),
    /// grayscale p 0.2, and blur p 0.5 when `size >= 96` (SimCLR drops blur for CIFAR-sized
    /// images, where it hurts).
    pub fn simclr(size: u32, channels: u8) -> RecipeConfig {
        let mut cfg = RecipeConfig { size, ..RecipeConfig::default() };
        if channels == 1 {
            cfg.jitter.saturation = 0.0;
            cfg.jitter.hue = 0.0;
            cfg.grayscale_p = 0.0;
            cfg.blur.p = 0.0;
        } else {
            cfg.blur.p = if size >= 96 { 0.5 } else { 0.0 };
        }
        cfg
    }

    /// Checks every field without keeping the result (same checks as [`build`](Self::build)).
    pub fn validate(&self, channels: u8) -> Result<(), AugmentError> {
        self.build(channels).map(|_| ())
    }

    /// Validates and builds the pipeline for images with `channels` channels; the output has
    /// the same channel count and is `size x size`. Ops whose probability is 0 are left out.
    pub fn build(&self, channels: u8) -> Result<Pipeline, AugmentError> {
        if channels != 1 && channels != 3 {
            return Err(AugmentError::param("channels", format!("must be 1 or 3, got {channels}")));
        }
        if self.size == 0 {
            return Err(AugmentError::param("size", "must be > 0, got 0"));
        }
        let size = self.size;
        let mut ops: Vec<Box<dyn Transform>> = Vec::new();
        ops.push(Box::new(RandomResizedCrop::new((size, size), self.crop_scale, self.crop_ratio)?));

        let flip = HorizontalFlip::new(self.flip_p)?;
        if self.flip_p > 0.0 {
            ops.push(Box::new(flip));
        }

        let j = &self.jitter;
        let jitter = ColorJitter::new(j.brightness, j.contrast, j.saturation, j.hue, j.p)?;
        let color_matters = channels == 3 && (j.saturation > 0.0 || j.hue > 0.0);
        if j.p > 0.0 && (j.brightness > 0.0 || j.contrast > 0.0 || color_matters) {
            ops.push(Box::new(jitter));
        }

        let gray = RandomGrayscale::new(self.grayscale_p)?;
        if channels == 3 && self.grayscale_p > 0.0 {
            ops.push(Box::new(gray));
        }

        let blur = GaussianBlur::new(self.blur.kernel_size_for(size), self.blur.sigma, self.blur.p)?;
        if self.blur.p > 0.0 {
            ops.push(Box::new(blur));
        }

        let solarize = Solarize::new(SOLARIZE_THRESHOLD, self.solarize_p)?;
        if self.solarize_p > 0.0 {
            ops.push(Box::new(solarize));
        }

        let equalize = Equalize::new(self.equalize_p)?;
        if self.equalize_p > 0.0 {
            ops.push(Box::new(equalize));
        }

        let c = channels as usize;
        let pick = |v: &Vec<f32>, field: &str| -> Result<Vec<f32>, AugmentError> {
            match v.len() {
                0 => Ok(vec![0.5; c]),
                n if n == 1 || n == c => Ok(v.clone()),
                n => Err(AugmentError::param(
                    field,
                    format!("must have 1 or {c} values for {c}-channel images, got {n}"),
                )),
            }
        };
        let (mean, std) = (pick(&self.mean, "mean")?, pick(&self.std, "std")?);
        let normalize = Normalize::new(mean, std)?;
        Ok(Pipeline::new(ops, normalize, channels, (size, size)))
    }
}
