//! `selfsup-augment`: image augmentations on 8-bit HWC buffers, composed into per-view
//! recipes for contrastive self-supervised learning (SimCLR, Chen et al. 2020,
//! <https://arxiv.org/abs/2002.05709>).
//!
//! The crate knows nothing of tensors: a [`Pipeline`] ends by writing normalized `f32` CHW
//! values straight into a caller-provided slice (the batch buffer that later becomes a tensor).
//! Every op is per-sample and allocation-light; parallelism is added by the caller (rayon),
//! and randomness comes from [`Rng::for_sample`], so results never depend on thread count.
//!
//! Semantics follow torchvision (`RandomResizedCrop.get_params`, `ColorJitter` factor ranges
//! and random order, antialiased bilinear resize like PIL) so recipes from papers carry over.

mod blur;
mod color;
mod crop;
mod equalize;
mod error;
mod image;
mod jitter;
mod normalize;
mod pipeline;
mod recipe;
mod resize;
mod rng;
mod simd;

pub use blur::{gaussian_blur, gaussian_kernel, GaussianBlur};
pub use color::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, luma, solarize, to_grayscale, RandomGrayscale,
    Solarize,
};
pub use crop::{flip_horizontal, HorizontalFlip, RandomResizedCrop};
pub use equalize::{equalize, Equalize};
pub use error::AugmentError;
pub use image::Image;
pub use jitter::ColorJitter;
pub use normalize::Normalize;
pub use pipeline::{Pipeline, Transform, Views};
pub use recipe::{BlurConfig, JitterConfig, RecipeConfig};
pub use resize::{resize, resize_crop_into, CropBox};
pub use rng::Rng;
