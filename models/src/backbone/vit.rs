//! Vision Transformer (Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929) with timm's
//! `VisionTransformer` parameter names and MAE's initialisation (facebookresearch/mae `models_mae.py`), exposing
//! its token-level steps so masked-image objectives (MAE, SimMIM) can drop or replace patches.

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

use super::transformer::{layer_norm, sincos_2d, xavier_bound, Block};
use super::Backbone;
use crate::{invalid, ModelError};

/// Named ViT sizes (depth / width / heads): tiny 12/192/3, small 12/384/6, base 12/768/12.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VitSize {
    #[default]
    Tiny,
    Small,
    Base,
}

/// Position embedding of the patches.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PosEmbed {
    /// Fixed 2-D sin-cos table as MAE (zeros for the cls token); stored, checkpointed, never trained.
    #[default]
    Sincos,
    /// Trained, initialised normal(0, 0.02).
    Learned,
}

/// How [`Vit::pool`] turns tokens into one feature vector.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VitPool {
    /// Mean of the patch tokens after the final norm.
    #[default]
    Mean,
    /// The cls token after the final norm.
    Cls,
}

/// `[model.backbone] kind = "vit"`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VitConfig {
    pub size: VitSize,
    /// Overrides the size's depth (number of blocks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<i64>,
    /// Overrides the size's width (embedding dimension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<i64>,
    /// Overrides the size's number of attention heads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heads: Option<i64>,
    /// Side of the square input images, in pixels.
    pub image_size: i64,
    /// Side of the square patches; divides `image_size`.
    pub patch_size: i64,
    pub mlp_ratio: f64,
    pub pos_embed: PosEmbed,
    pub pool: VitPool,
}

impl Default for VitConfig {
    fn default() -> Self {
        VitConfig {
            size: VitSize::Tiny,
            depth: None,
            width: None,
            heads: None,
            image_size: 28,
            patch_size: 4,
            mlp_ratio: 4.0,
            pos_embed: PosEmbed::Sincos,
            pool: VitPool::Mean,
        }
    }
}

impl VitConfig {
    fn size_dims(&self) -> (i64, i64, i64) {
        match self.size {
            VitSize::Tiny => (12, 192, 3),
            VitSize::Small => (12, 384, 6),
            VitSize::Base => (12, 768, 12),
        }
    }

    pub fn depth(&self) -> i64 {
        self.depth.unwrap_or(self.size_dims().0)
    }

    pub fn width(&self) -> i64 {
        self.width.unwrap_or(self.size_dims().1)
    }

    pub fn heads(&self) -> i64 {
        self.heads.unwrap_or(self.size_dims().2)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("model.backbone.depth", self.depth()),
            ("model.backbone.width", self.width()),
            ("model.backbone.heads", self.heads()),
            ("model.backbone.image_size", self.image_size),
            ("model.backbone.patch_size", self.patch_size),
        ];
        for (field, v) in positive {
            if v < 1 {
                return Err(invalid(field, format!("must be >= 1, got {v}")));
            }
        }
        if self.image_size % self.patch_size != 0 {
            let msg = format!("must divide image_size {}, got {}", self.image_size, self.patch_size);
            return Err(invalid("model.backbone.patch_size", msg));
        }
        if self.width() % self.heads() != 0 {
            let msg = format!("width {} is not divisible by {} heads", self.width(), self.heads());
            return Err(invalid("model.backbone.heads", msg));
        }
        if self.pos_embed == PosEmbed::Sincos && self.width() % 4 != 0 {
            let msg = format!("sincos position embedding needs a width divisible by 4, got {}", self.width());
            return Err(invalid("model.backbone.width", msg));
        }
        if !(self.mlp_ratio.is_finite() && self.width() as f64 * self.mlp_ratio >= 1.0) {
            let msg = format!("must be > 0 and give >= 1 hidden unit, got {}", self.mlp_ratio);
            return Err(invalid("model.backbone.mlp_ratio", msg));
        }
        Ok(())
    }
}

/// ViT encoder (no classifier head). Parameters, relative to its root: `cls_token [1,1,D]`,
/// `pos_embed [1,1+L,D]`, `patch_embed.proj.{weight,bias}`, `blocks.{i}.*` (see [`Block`]), `norm.{weight,bias}`.
#[derive(Debug)]
pub struct Vit {
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    patch: i64,
    grid: i64,
    width: i64,
    in_channels: i64,
    pool: VitPool,
}

impl Vit {
    /// Builds the ViT under `p`. `cfg` must have passed [`VitConfig::validate`].
    pub fn new(p: nn::Path, cfg: &VitConfig, in_channels: i64) -> Vit {
        let (d, patch) = (cfg.width(), cfg.patch_size);
        let grid = cfg.image_size / patch;
        let fan_in = in_channels * patch * patch;
        // MAE: xavier-uniform on the weight viewed as [D, C*p*p]; the bias keeps nn.Conv2d's default init.
        let (w, b) = (xavier_bound(fan_in, d), 1.0 / (fan_in as f64).sqrt());
        let conv = nn::ConvConfig {
            stride: patch,
            ws_init: nn::Init::Uniform { lo: -w, up: w },
            bs_init: nn::Init::Uniform { lo: -b, up: b },
            ..Default::default()
        };
        let patch_embed = nn::conv2d(&p / "patch_embed" / "proj", in_channels, d, patch, conv);
        let cls_token = p.var("cls_token", &[1, 1, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
        let pos_embed = match cfg.pos_embed {
            PosEmbed::Learned => {
                p.var("pos_embed", &[1, 1 + grid * grid, d], nn::Init::Randn { mean: 0.0, stdev: 0.02 })
            }
            PosEmbed::Sincos => {
                let table =
                    Tensor::cat(&[Tensor::zeros([1, d], (Kind::Float, tch::Device::Cpu)), sincos_2d(d, grid)], 0);
                p.add("pos_embed", table.unsqueeze(0).to_device(p.device()), false)
            }
        };
        let blocks = (0..cfg.depth()).map(|i| Block::new(&p / "blocks" / i, d, cfg.heads(), cfg.mlp_ratio)).collect();
        let norm = layer_norm(&p / "norm", d);
        Vit { patch_embed, cls_token, pos_embed, blocks, norm, patch, grid, width: d, in_channels, pool: cfg.pool }
    }

    pub fn patch_size(&self) -> i64 {
        self.patch
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.grid
    }

    pub fn num_patches(&self) -> i64 {
        self.grid * self.grid
    }

    pub fn width(&self) -> i64 {
        self.width
    }

    pub fn in_channels(&self) -> i64 {
        self.in_channels
    }

    /// The conv projection of each patch, without position embedding.
    ///
    /// # Shapes
    /// `x`: `[N, C, H, W]` with `H = W = grid * patch` → `[N, L, D]`, patches in row-major order.
    pub fn patch_tokens(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let side = self.grid * self.patch;
        assert!(
            size.len() == 4 && size[1] == self.in_channels && size[2] == side && size[3] == side,
            "the ViT expects [N, {}, {side}, {side}] images, got {size:?}",
            self.in_channels
        );
        x.apply(&self.patch_embed).flatten(2, -1).transpose(1, 2)
    }

    /// Adds the patch position embeddings (positions 1..) to all patch tokens.
    ///
    /// # Shapes
    /// `tokens`: `[N, L, D]` → `[N, L, D]`.
    pub fn add_pos(&self, tokens: &Tensor) -> Tensor {
        tokens + self.pos_embed.narrow(1, 1, self.num_patches())
    }

    /// Adds the position embeddings of the patches `ids` to a subset of patch tokens.
    ///
    /// # Shapes
    /// `tokens`: `[N, K, D]`, `ids`: `[N, K]` int64 patch indices in `0..L` → `[N, K, D]`.
    pub fn add_pos_at(&self, tokens: &Tensor, ids: &Tensor) -> Tensor {
        let (n, k) = ids.size2().expect("ids are [N, K]");
        let table = self.pos_embed.get(0).narrow(0, 1, self.num_patches());
        tokens + table.index_select(0, &ids.flatten(0, -1)).view([n, k, self.width])
    }

    /// Prepends the cls token (plus its position embedding), runs the blocks and the final norm.
    ///
    /// # Shapes
    /// `tokens`: `[N, K, D]` (position embeddings already added) → `[N, 1 + K, D]`, the cls token first.
    pub fn encode(&self, tokens: &Tensor, train: bool) -> Tensor {
        let n = tokens.size()[0];
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)).expand([n, 1, self.width], false);
        let mut x = Tensor::cat(&[cls.to_kind(tokens.kind()), tokens.shallow_clone()], 1);
        for block in &self.blocks {
            x = block.forward(&x, train);
        }
        x.apply(&self.norm)
    }

    /// Pools [`Vit::encode`]'s output into one vector per image (mean of the patch tokens, or the cls token).
    ///
    /// # Shapes
    /// `encoded`: `[N, 1 + K, D]` → `[N, D]`.
    pub fn pool(&self, encoded: &Tensor) -> Tensor {
        match self.pool {
            VitPool::Mean => {
                let k = encoded.size()[1] - 1;
                encoded.narrow(1, 1, k).mean_dim(1, false, None::<Kind>)
            }
            VitPool::Cls => encoded.select(1, 0),
        }
    }
}

impl Backbone for Vit {
    fn features(&self, x: &Tensor, train: bool) -> Tensor {
        self.pool(&self.encode(&self.add_pos(&self.patch_tokens(x)), train))
    }

    fn dim(&self) -> i64 {
        self.width
    }

    fn as_vit(&self) -> Option<&Vit> {
        Some(self)
    }

    /// BEiT/MAE convention: embeddings are layer 0, block i is layer i + 1, the final norm is layer depth + 1.
    fn layer_id(&self, name: &str) -> usize {
        if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed.") {
            return 0;
        }
        name.strip_prefix("blocks.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < self.blocks.len())
            .map_or(self.num_layers(), |i| i + 1)
    }

    fn num_layers(&self) -> usize {
        self.blocks.len() + 1
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name == "cls_token" || name == "pos_embed"
    }
}
