//! Backbones: the networks whose features transfer. ResNet (torchvision names) and the Vision Transformer (timm
//! names), both behind the [`Backbone`] trait and built from the tagged [`BackboneConfig`].

mod pos_embed;
mod resnet;
mod transformer;
mod vit;

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

pub use pos_embed::{resample_pos_embed, resample_pos_embed_antialiased, sincos_2d};
pub(crate) use resnet::bn_config;
pub use resnet::{ResNet, ResNetBlock, ResNetConfig};
pub use transformer::{drop_path, Block};
pub(crate) use transformer::{layer_norm, xavier_linear};
pub use vit::{PosEmbed, Vit, VitConfig, VitPool, VitSize};

use crate::ModelError;

/// A feature extractor: images in, one vector per image out.
pub trait Backbone: Send {
    /// # Shapes
    /// `x`: `[N, C, H, W]` float → `[N, dim()]`.
    fn features(&self, x: &Tensor, train: bool) -> Tensor;
    fn dim(&self) -> i64;
    /// The ViT, for objectives that work on its tokens (MAE, SimMIM).
    fn as_vit(&self) -> Option<&Vit> {
        None
    }
    /// For layer-wise lr decay: the layer of backbone parameter `name` (relative to the backbone root, e.g.
    /// "blocks.3.attn.qkv.weight" or "layer2.0.conv1.weight"), in 0..=num_layers(); everything not in the
    /// backbone (heads) is treated by the caller as num_layers().
    fn layer_id(&self, _name: &str) -> usize {
        0
    }
    fn num_layers(&self) -> usize {
        1
    }
    /// Parameters that get no weight decay besides rank<=1 tensors (ViT: cls_token, pos_embed).
    fn no_weight_decay(&self, _name: &str) -> bool {
        false
    }
}

/// Which backbone, as a tagged enum in the config (`[model.backbone] kind = "resnet"` or `"vit"`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackboneConfig {
    Resnet(ResNetConfig),
    Vit(VitConfig),
}

impl Default for BackboneConfig {
    fn default() -> Self {
        BackboneConfig::Resnet(ResNetConfig::default())
    }
}

impl BackboneConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            BackboneConfig::Resnet(c) => c.validate(),
            BackboneConfig::Vit(c) => c.validate(),
        }
    }

    /// Whether the backbone takes `[N, channels, h, w]` inputs (called by config validation for every view size):
    /// a ResNet takes any size >= 1, a ViT sides that are positive multiples of its patch size.
    pub fn check_input(&self, channels: i64, h: i64, w: i64) -> Result<(), ModelError> {
        match self {
            BackboneConfig::Resnet(_) if channels < 1 || h < 1 || w < 1 => {
                Err(crate::invalid("model.backbone", format!("input {channels}x{h}x{w} (CxHxW) must be >= 1 per side")))
            }
            BackboneConfig::Resnet(_) => Ok(()),
            BackboneConfig::Vit(c) => c.check_input(channels, h, w),
        }
    }

    /// Builds the backbone under `path` (e.g. `vs.root() / "backbone"`) for images with `in_channels` channels.
    pub fn build(&self, path: nn::Path, in_channels: i64) -> Result<Box<dyn Backbone>, ModelError> {
        self.validate()?;
        match self {
            BackboneConfig::Resnet(c) => Ok(Box::new(ResNet::new(path, c, in_channels))),
            BackboneConfig::Vit(c) => Ok(Box::new(Vit::new(path, c, in_channels))),
        }
    }
}
