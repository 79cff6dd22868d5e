//! SimMIM (Xie et al. 2021, https://arxiv.org/abs/2111.09886): the ViT sees every patch, with the masked ones
//! replaced by a learned mask token; a linear head predicts the raw pixels of each patch from its output token,
//! and the loss is the L1 distance on the masked patches.

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

use crate::dist::Dist;

use super::masking::{
    masked_l1, patchify, random_masking, validate_mask_ratio, vit_for, MaskedForward, MaskedImageModel,
};
use crate::backbone::{Backbone, Vit};
use crate::head::linear;
use crate::ModelError;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimMimConfig {
    /// Share of the patches replaced by the mask token.
    pub mask_ratio: f64,
}

impl Default for SimMimConfig {
    fn default() -> Self {
        SimMimConfig { mask_ratio: 0.6 }
    }
}

impl SimMimConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_mask_ratio(self.mask_ratio)
    }
}

/// SimMIM: the ViT backbone, `mask_token [1,1,D]` and the prediction head `decoder` (Linear D → p·p·C), both
/// siblings of `backbone.`. The head is SimMIM's 1×1 conv + PixelShuffle written per patch; its outputs are in
/// [`patchify`]'s (row, column, channel) order.
pub struct SimMim {
    backbone: Box<dyn Backbone>,
    mask_token: Tensor,
    decoder: nn::Linear,
    mask_ratio: f64,
}

impl SimMim {
    /// Errors if the backbone is not a ViT or the mask ratio leaves no visible or no masked patch.
    pub fn new(root: &nn::Path, backbone: Box<dyn Backbone>, cfg: &SimMimConfig) -> Result<SimMim, ModelError> {
        cfg.validate()?;
        let vit = vit_for(backbone.as_ref(), "simmim", cfg.mask_ratio)?;
        let (d, pixels) = (vit.width(), vit.patch_size() * vit.patch_size() * vit.in_channels());
        Ok(SimMim {
            mask_token: root.var("mask_token", &[1, 1, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 }),
            // PyTorch's default init, as SimMIM's nn.Conv2d decoder.
            decoder: linear(root / "decoder", d, pixels),
            mask_ratio: cfg.mask_ratio,
            backbone,
        })
    }

    fn vit(&self) -> &Vit {
        self.backbone.as_vit().expect("checked in SimMim::new")
    }

    /// One masked forward with a fresh random mask (global torch RNG).
    ///
    /// # Shapes
    /// `imgs`: `[N, C, H, W]` → loss scalar, pred `[N, L, p*p*C]` (raw pixels), mask `[N, L]`, features `[N, D]`.
    pub fn forward(&self, imgs: &Tensor, train: bool, dist: &Dist) -> MaskedForward {
        let vit = self.vit();
        let (n, l) = (imgs.size()[0], vit.num_patches());
        let m = random_masking(n, l, self.mask_ratio, imgs.device(), dist);
        let tokens = vit.patch_tokens(imgs);
        let w = m.mask.unsqueeze(-1).to_kind(tokens.kind());
        let tokens = &tokens * (1.0 - &w) + self.mask_token.to_kind(tokens.kind()) * &w;
        let encoded = vit.encode(&vit.add_pos(&tokens), train);
        let features = vit.pool(&encoded);
        let pred = encoded.narrow(1, 1, l).apply(&self.decoder);
        let target = patchify(imgs, vit.patch_size());
        let loss = crate::device::autocast(false, || masked_l1(&pred, &target, &m.mask));
        MaskedForward { loss, pred, mask: m.mask, features }
    }
}

impl MaskedImageModel for SimMim {
    fn loss_term(&self) -> &'static str {
        "pixel_l1"
    }

    fn forward(&self, imgs: &Tensor, train: bool, dist: &Dist) -> MaskedForward {
        SimMim::forward(self, imgs, train, dist)
    }

    fn encoder(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }
}
