//! MAE, masked autoencoders (He et al. 2021, https://arxiv.org/abs/2111.06377), after facebookresearch/mae
//! `models_mae.py`: the ViT encodes only a random 25% of the patches; a small transformer decoder fills in mask
//! tokens and predicts the pixels of every patch; the loss is the MSE on the masked patches, each target patch
//! normalized by its own mean and variance (`norm_pix_loss`).

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

use crate::dist::Dist;

use super::masking::{
    masked_mse, normalize_patches, patch_stats, patchify, random_masking, validate_mask_ratio, vit_for, MaskedForward,
    MaskedImageModel,
};
use crate::backbone::{layer_norm, sincos_2d, xavier_linear, Backbone, Block, Vit};
use crate::{invalid, ModelError};

/// MLP ratio of the decoder blocks, as every MAE model.
const DECODER_MLP_RATIO: f64 = 4.0;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaeConfig {
    /// Share of the patches hidden from the encoder.
    pub mask_ratio: f64,
    pub decoder_width: i64,
    /// Decoder blocks; 0 leaves a linear decoder.
    pub decoder_depth: i64,
    pub decoder_heads: i64,
    /// Predict per-patch normalized pixels (MAE's default for its best representations).
    pub norm_pix_loss: bool,
}

impl Default for MaeConfig {
    fn default() -> Self {
        MaeConfig { mask_ratio: 0.75, decoder_width: 128, decoder_depth: 2, decoder_heads: 4, norm_pix_loss: true }
    }
}

impl MaeConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        validate_mask_ratio(self.mask_ratio)?;
        if self.decoder_width < 4 || self.decoder_width % 4 != 0 {
            let msg = format!("must be a positive multiple of 4 (sin-cos positions), got {}", self.decoder_width);
            return Err(invalid("objective.decoder_width", msg));
        }
        if self.decoder_depth < 0 {
            return Err(invalid("objective.decoder_depth", format!("must be >= 0, got {}", self.decoder_depth)));
        }
        if self.decoder_heads < 1 || self.decoder_width % self.decoder_heads != 0 {
            let msg =
                format!("must be >= 1 and divide decoder_width {}, got {}", self.decoder_width, self.decoder_heads);
            return Err(invalid("objective.decoder_heads", msg));
        }
        Ok(())
    }
}

/// MAE: the ViT backbone plus the decoder, named as `models_mae.py` (siblings of `backbone.`): `decoder_embed`,
/// `mask_token`, `decoder_pos_embed` (fixed sin-cos, not trained), `decoder_blocks.{i}`, `decoder_norm`,
/// `decoder_pred`.
pub struct Mae {
    backbone: Box<dyn Backbone>,
    decoder_embed: nn::Linear,
    mask_token: Tensor,
    decoder_pos_embed: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: nn::LayerNorm,
    decoder_pred: nn::Linear,
    mask_ratio: f64,
    norm_pix_loss: bool,
}

impl Mae {
    /// Errors if the backbone is not a ViT or the mask ratio leaves no visible or no masked patch.
    pub fn new(root: &nn::Path, backbone: Box<dyn Backbone>, cfg: &MaeConfig) -> Result<Mae, ModelError> {
        cfg.validate()?;
        let vit = vit_for(backbone.as_ref(), "mae", cfg.mask_ratio)?;
        let (d, dd, grid) = (vit.width(), cfg.decoder_width, vit.grid());
        let pixels = vit.patch_size() * vit.patch_size() * vit.in_channels();
        let table = Tensor::cat(&[Tensor::zeros([1, dd], (Kind::Float, tch::Device::Cpu)), sincos_2d(dd, grid)], 0);
        let decoder_pos_embed = root.add("decoder_pos_embed", table.unsqueeze(0).to_device(root.device()), false);
        let blocks = root / "decoder_blocks";
        Ok(Mae {
            decoder_embed: xavier_linear(root / "decoder_embed", d, dd),
            mask_token: root.var("mask_token", &[1, 1, dd], nn::Init::Randn { mean: 0.0, stdev: 0.02 }),
            decoder_pos_embed,
            decoder_blocks: (0..cfg.decoder_depth)
                .map(|i| Block::new(&blocks / i, dd, cfg.decoder_heads, DECODER_MLP_RATIO))
                .collect(),
            decoder_norm: layer_norm(root / "decoder_norm", dd),
            decoder_pred: xavier_linear(root / "decoder_pred", dd, pixels),
            mask_ratio: cfg.mask_ratio,
            norm_pix_loss: cfg.norm_pix_loss,
            backbone,
        })
    }

    fn vit(&self) -> &Vit {
        self.backbone.as_vit().expect("checked in Mae::new")
    }

    /// One masked forward: a fresh random mask (global torch RNG), encoder on the visible patches, decoder on
    /// all, loss on the masked ones.
    ///
    /// # Shapes
    /// `imgs`: `[N, C, H, W]` → loss scalar, pred `[N, L, p*p*C]`, mask `[N, L]`, features `[N, D]`.
    pub fn forward(&self, imgs: &Tensor, train: bool, dist: &Dist) -> MaskedForward {
        let vit = self.vit();
        let (n, l, d) = (imgs.size()[0], vit.num_patches(), vit.width());
        let m = random_masking(n, l, self.mask_ratio, imgs.device(), dist);
        let k = m.ids_keep.size()[1];
        let tokens = vit.add_pos(&vit.patch_tokens(imgs));
        let visible = tokens.gather(1, &m.ids_keep.unsqueeze(-1).expand([n, k, d], false), false);
        let latent = vit.encode(&visible, train);
        let features = vit.pool(&latent);

        let x = latent.apply(&self.decoder_embed);
        let dd = x.size()[2];
        let mask_tokens = self.mask_token.expand([n, l - k, dd], false).to_kind(x.kind());
        // [visible in shuffled order, mask tokens] → patch order, then the cls token back in front.
        let patches = Tensor::cat(&[x.narrow(1, 1, k), mask_tokens], 1);
        let patches = patches.gather(1, &m.ids_restore.unsqueeze(-1).expand([n, l, dd], false), false);
        let mut x = Tensor::cat(&[x.narrow(1, 0, 1), patches], 1) + &self.decoder_pos_embed;
        for block in &self.decoder_blocks {
            x = block.forward(&x, train);
        }
        let pred = x.apply(&self.decoder_norm).apply(&self.decoder_pred).narrow(1, 1, l);

        let p = vit.patch_size();
        // fp32 even under autocast: the normalized targets and squared errors want the precision.
        let loss = crate::device::autocast(false, || masked_mse(&pred, &self.target(&patchify(imgs, p)), &m.mask));
        MaskedForward { loss, pred, mask: m.mask, features }
    }

    /// The loss's target for fp32 image patches: per-patch normalized when `norm_pix_loss`.
    fn target(&self, patches: &Tensor) -> Tensor {
        let patches = patches.to_kind(Kind::Float);
        if self.norm_pix_loss {
            normalize_patches(&patches)
        } else {
            patches
        }
    }
}

impl MaskedImageModel for Mae {
    fn loss_term(&self) -> &'static str {
        "pixel_mse"
    }

    fn forward(&self, imgs: &Tensor, train: bool, dist: &Dist) -> MaskedForward {
        Mae::forward(self, imgs, train, dist)
    }

    fn encoder(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }

    fn to_pixels(&self, pred: Tensor, target: &Tensor) -> Tensor {
        if !self.norm_pix_loss {
            return pred;
        }
        // Back to pixels with each target patch's own statistics, as MAE's visualization demo.
        let (mean, std) = patch_stats(target);
        pred * std + mean
    }
}
