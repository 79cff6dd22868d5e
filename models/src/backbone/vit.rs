//! Vision Transformer (Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929) with timm's
//! `VisionTransformer` parameter names and MAE's initialisation (facebookresearch/mae `models_mae.py`), exposing
//! its token-level steps so masked-image objectives (MAE, SimMIM, iBOT) can drop or replace patches. Inputs of
//! any size that is a multiple of the patch size are accepted (multi-crop, as DINO: Caron et al. 2021,
//! https://arxiv.org/abs/2104.14294): the position table is resampled bicubically to the input's patch grid.
//! Optional stochastic depth (`drop_path`) on every block, with rates rising linearly over the depth as timm.

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::{Kind, Tensor};

use super::pos_embed::{resample_pos_embed, sincos_2d};
use super::transformer::{layer_norm, xavier_bound, Block};
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
    /// Side of the square images the position table is made for, in pixels. Other inputs whose sides are
    /// multiples of `patch_size` (multi-crop views) get the table resampled to their patch grid.
    pub image_size: i64,
    /// Side of the square patches; divides `image_size`.
    pub patch_size: i64,
    pub mlp_ratio: f64,
    pub pos_embed: PosEmbed,
    pub pool: VitPool,
    /// Stochastic-depth rate of the last block, in `[0, 1)`; block i of depth n gets `drop_path * i / (n - 1)`
    /// (timm's `linspace(0, drop_path_rate, depth)`). Training only; 0 (the default) turns it off.
    pub drop_path: f64,
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
            drop_path: 0.0,
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

    /// The stochastic-depth rate of each block: linearly spaced from 0 to `drop_path` over the depth, as timm's
    /// `[x.item() for x in torch.linspace(0, drop_path_rate, depth)]` (a single block gets 0).
    pub fn drop_path_rates(&self) -> Vec<f64> {
        let depth = self.depth().max(0);
        let last = (depth - 1).max(1) as f64;
        (0..depth).map(|i| self.drop_path * i as f64 / last).collect()
    }

    /// Whether the ViT takes `[N, channels, h, w]` inputs: every side a positive multiple of the patch size
    /// (the position table is resampled to other grids than the native one). Config validation calls this for
    /// every view size, so that a wrong crop size is an error naming the patch size, not a panic mid-training.
    pub fn check_input(&self, channels: i64, h: i64, w: i64) -> Result<(), ModelError> {
        if channels < 1 {
            return Err(invalid("model.backbone", format!("input has {channels} channels, needs >= 1")));
        }
        let p = self.patch_size;
        if h < p || w < p || h % p != 0 || w % p != 0 {
            let msg = format!("input {h}x{w} is not a positive multiple of model.backbone.patch_size {p}");
            return Err(invalid("model.backbone.patch_size", msg));
        }
        Ok(())
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
        if !(0.0..1.0).contains(&self.drop_path) {
            return Err(invalid("model.backbone.drop_path", format!("must be in [0, 1), got {}", self.drop_path)));
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
        let blocks = (cfg.drop_path_rates().into_iter().enumerate())
            .map(|(i, rate)| Block::new(&p / "blocks" / i, d, cfg.heads(), cfg.mlp_ratio).with_drop_path(rate))
            .collect();
        let norm = layer_norm(&p / "norm", d);
        Vit { patch_embed, cls_token, pos_embed, blocks, norm, patch, grid, width: d, in_channels, pool: cfg.pool }
    }

    pub fn patch_size(&self) -> i64 {
        self.patch
    }

    /// Patches per side of the native (`image_size`) input, the grid `pos_embed` is stored for.
    pub fn grid(&self) -> i64 {
        self.grid
    }

    /// Patches of the native input, `grid()²`.
    pub fn num_patches(&self) -> i64 {
        self.grid * self.grid
    }

    pub fn width(&self) -> i64 {
        self.width
    }

    pub fn in_channels(&self) -> i64 {
        self.in_channels
    }

    /// The stochastic-depth rate of each block, in order.
    pub fn drop_path_rates(&self) -> Vec<f64> {
        self.blocks.iter().map(Block::drop_path_rate).collect()
    }

    /// The patch grid `(H / patch, W / patch)` of an image batch. Panics (the backstop behind
    /// [`VitConfig::check_input`]) unless `x` is `[N, in_channels, H, W]` with H, W positive multiples of the patch.
    pub fn grid_of(&self, x: &Tensor) -> (i64, i64) {
        let size = x.size();
        let p = self.patch;
        assert!(
            size.len() == 4 && size[1] == self.in_channels && size[2..].iter().all(|&s| s >= p && s % p == 0),
            "the ViT expects [N, {}, H, W] images with H and W positive multiples of the patch size {p}, got {size:?}",
            self.in_channels
        );
        (size[2] / p, size[3] / p)
    }

    /// The patch position embeddings for an `h`×`w` patch grid: the stored table itself at the native grid, else
    /// its bicubic resampling ([`resample_pos_embed`]; computed per call, it is a tiny op and keeps the gradient
    /// of a learned table). The cls position (row 0 of `pos_embed`) is never resampled.
    ///
    /// # Shapes
    /// → `[1, h * w, D]`, row-major over the grid.
    pub fn pos_for(&self, h: i64, w: i64) -> Tensor {
        let native = self.pos_embed.narrow(1, 1, self.num_patches());
        resample_pos_embed(&native, (self.grid, self.grid), (h, w))
    }

    /// The conv projection of each patch, without position embedding; [`Vit::grid_of`] gives the grid.
    ///
    /// # Shapes
    /// `x`: `[N, C, H, W]`, H and W multiples of the patch → `[N, h * w, D]` with `(h, w) = grid_of(x)`,
    /// patches in row-major order.
    pub fn patch_tokens(&self, x: &Tensor) -> Tensor {
        self.grid_of(x);
        x.apply(&self.patch_embed).flatten(2, -1).transpose(1, 2)
    }

    /// Adds the position embeddings of the native grid to all patch tokens (MAE, SimMIM); for other input sizes
    /// use [`Vit::add_pos_grid`].
    ///
    /// # Shapes
    /// `tokens`: `[N, L, D]` with `L = num_patches()` → `[N, L, D]`.
    pub fn add_pos(&self, tokens: &Tensor) -> Tensor {
        self.add_pos_grid(tokens, self.grid, self.grid)
    }

    /// Adds the position embeddings of an `h`×`w` patch grid ([`Vit::pos_for`]) to all its patch tokens.
    ///
    /// # Shapes
    /// `tokens`: `[N, h * w, D]` → `[N, h * w, D]`.
    pub fn add_pos_grid(&self, tokens: &Tensor, h: i64, w: i64) -> Tensor {
        let l = tokens.size()[1];
        assert!(l == h * w, "{l} patch tokens do not fill a {h}x{w} grid");
        tokens + self.pos_for(h, w)
    }

    /// Adds the position embeddings of the patches `ids` of the native grid to a subset of patch tokens.
    ///
    /// # Shapes
    /// `tokens`: `[N, K, D]`, `ids`: `[N, K]` int64 patch indices in `0..num_patches()` → `[N, K, D]`.
    pub fn add_pos_at(&self, tokens: &Tensor, ids: &Tensor) -> Tensor {
        self.add_pos_at_grid(tokens, ids, self.grid, self.grid)
    }

    /// Adds the position embeddings of the patches `ids` of an `h`×`w` grid to a subset of its patch tokens.
    ///
    /// # Shapes
    /// `tokens`: `[N, K, D]`, `ids`: `[N, K]` int64 patch indices in `0..h * w` → `[N, K, D]`.
    pub fn add_pos_at_grid(&self, tokens: &Tensor, ids: &Tensor, h: i64, w: i64) -> Tensor {
        let (n, k) = ids.size2().expect("ids are [N, K]");
        let table = self.pos_for(h, w).get(0);
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
    /// Any input size that [`VitConfig::check_input`] accepts; the native size uses the stored table as is.
    fn features(&self, x: &Tensor, train: bool) -> Tensor {
        let (h, w) = self.grid_of(x);
        self.pool(&self.encode(&self.add_pos_grid(&self.patch_tokens(x), h, w), train))
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
