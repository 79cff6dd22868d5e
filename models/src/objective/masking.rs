//! Masked-image modelling pieces shared by MAE (He et al. 2021, https://arxiv.org/abs/2111.06377) and SimMIM
//! (Xie et al. 2021, https://arxiv.org/abs/2111.09886): patchify / unpatchify in MAE's pixel order, per-sample
//! random patch masking, and the reconstruction losses restricted to masked patches.

use crate::dist::Dist;
use tch::{Device, Kind, Tensor};

use super::{Batch, Objective, Step};
use crate::backbone::{Backbone, Vit};
use crate::{invalid, ModelError};

/// One random mask per sample, as MAE's `random_masking`.
pub struct Masking {
    /// Indices of the visible patches, in shuffled order: `[N, K]` int64.
    pub ids_keep: Tensor,
    /// 1 where a patch is masked, 0 where it is visible: `[N, L]` float32.
    pub mask: Tensor,
    /// The inverse permutation of the shuffle: `[N, L]` int64; gathering `[visible, masked]` tokens with it
    /// restores patch order.
    pub ids_restore: Tensor,
}

/// What a masked-image objective's forward pass produces (see `Mae::forward`, `SimMim::forward`).
pub struct MaskedForward {
    /// Scalar fp32 loss over the masked patches.
    pub loss: Tensor,
    /// Predicted patches `[N, L, p*p*C]` in the loss's target space (per-patch normalized pixels for MAE with
    /// `norm_pix_loss`), for every patch including the visible ones.
    pub pred: Tensor,
    /// `[N, L]` float32, 1 = masked.
    pub mask: Tensor,
    /// Pooled encoder features of the masked forward: `[N, D]` (not detached).
    pub features: Tensor,
}

/// Number of visible patches out of `l` at `mask_ratio`: `int(l * (1 - mask_ratio))`, truncated as MAE does.
pub fn keep_count(l: i64, mask_ratio: f64) -> i64 {
    (l as f64 * (1.0 - mask_ratio)) as i64
}

/// Per-sample random masking by argsort of uniform noise (from the global torch RNG, so `tch::manual_seed`
/// reproduces it). Exactly `l - keep_count(l, mask_ratio)` patches are masked in every row.
///
/// # Shapes
/// → `ids_keep [n, K]`, `mask [n, l]`, `ids_restore [n, l]` on `device`.
pub fn random_masking(n: i64, l: i64, mask_ratio: f64, device: Device, dist: &Dist) -> Masking {
    // Drawn for the global batch and sliced: a sample's mask does not depend on the number of ranks.
    masking_from_noise(&dist.rand_rows(n, l, device), mask_ratio)
}

/// The mask that keeps each row's patches of smallest `noise` (`[N, L]`, uniform): [`random_masking`] with the
/// noise given (several groups of rows drawn separately, e.g. DINO's two global crops).
pub fn masking_from_noise(noise: &Tensor, mask_ratio: f64) -> Masking {
    let (n, l, device) = (noise.size()[0], noise.size()[1], noise.device());
    let len_keep = keep_count(l, mask_ratio);
    // Ascending: the patches with the smallest noise are kept.
    let ids_shuffle = noise.argsort(1, false);
    let ids_restore = ids_shuffle.argsort(1, false);
    let ids_keep = ids_shuffle.narrow(1, 0, len_keep);
    let mask = Tensor::ones([n, l], (Kind::Float, device));
    let _ = mask.narrow(1, 0, len_keep).fill_(0.0);
    let mask = mask.gather(1, &ids_restore, false);
    Masking { ids_keep, mask, ids_restore }
}

pub(crate) fn validate_mask_ratio(r: f64) -> Result<(), ModelError> {
    if !(r > 0.0 && r < 1.0) {
        return Err(invalid("objective.mask_ratio", format!("must be in (0, 1), got {r}")));
    }
    Ok(())
}

/// The ViT of `backbone`, and a check that `mask_ratio` leaves at least one visible and one masked patch.
pub(crate) fn vit_for<'a>(backbone: &'a dyn Backbone, objective: &str, mask_ratio: f64) -> Result<&'a Vit, ModelError> {
    let vit =
        backbone.as_vit().ok_or_else(|| invalid("model.backbone.kind", format!("{objective} needs a vit backbone")))?;
    let (l, k) = (vit.num_patches(), keep_count(vit.num_patches(), mask_ratio));
    if k < 1 || k >= l {
        let msg = format!("keeps {k} of {l} patches; at least one must be visible and one masked");
        return Err(invalid("objective.mask_ratio", msg));
    }
    Ok(vit)
}

/// Cuts images into flattened non-overlapping `p`×`p` patches, row-major over the patch grid, each patch in
/// MAE's (row, column, channel) order (`nchpwq → nhwpqc`).
///
/// # Shapes
/// `imgs`: `[N, C, H, W]` with `p | H, W` → `[N, (H/p)(W/p), p*p*C]`.
pub fn patchify(imgs: &Tensor, p: i64) -> Tensor {
    let (n, c, h, w) = imgs.size4().expect("patchify takes [N, C, H, W]");
    assert!(h % p == 0 && w % p == 0, "patch size {p} does not divide the image size {h}x{w}");
    let (gh, gw) = (h / p, w / p);
    imgs.reshape([n, c, gh, p, gw, p]).permute([0, 2, 4, 3, 5, 1]).reshape([n, gh * gw, p * p * c])
}

/// The inverse of [`patchify`] for square images.
///
/// # Shapes
/// `x`: `[N, L, p*p*c]` with `L` a square → `[N, c, √L·p, √L·p]`.
pub fn unpatchify(x: &Tensor, p: i64, c: i64) -> Tensor {
    let (n, l, k) = x.size3().expect("unpatchify takes [N, L, p*p*C]");
    let g = (l as f64).sqrt().round() as i64;
    assert!(g * g == l && k == p * p * c, "unpatchify: {l} patches of {k} values is not a square grid of {p}x{p}x{c}");
    x.reshape([n, g, g, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([n, c, g * p, g * p])
}

/// Per-patch mean and standard deviation `√(var + 1e-6)` (unbiased variance, as MAE's `target.var(dim=-1)`).
///
/// # Shapes
/// `patches`: `[N, L, P]` → two `[N, L, 1]`.
pub fn patch_stats(patches: &Tensor) -> (Tensor, Tensor) {
    let mean = patches.mean_dim(-1, true, None::<Kind>);
    let std = (patches.var_dim(-1, true, true) + 1e-6).sqrt();
    (mean, std)
}

/// MAE's `norm_pix_loss` target: every patch normalized by its own mean and standard deviation.
///
/// # Shapes
/// `patches`: `[N, L, P]` → `[N, L, P]`.
pub fn normalize_patches(patches: &Tensor) -> Tensor {
    let (mean, std) = patch_stats(patches);
    (patches - mean) / std
}

/// MAE's loss: the mean squared error of each patch, averaged over the masked patches only. Computed in fp32.
///
/// # Shapes
/// `pred`, `target`: `[N, L, P]`, `mask`: `[N, L]` (1 = masked) → scalar.
pub fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Tensor {
    let mask = mask.to_kind(Kind::Float);
    let per_patch =
        (pred.to_kind(Kind::Float) - target.to_kind(Kind::Float)).square().mean_dim(-1, false, None::<Kind>);
    (per_patch * &mask).sum(Kind::Float) / mask.sum(Kind::Float)
}

/// SimMIM's loss: the L1 distance over the pixels of masked patches, `Σ|pred - target|·mask / (Σmask · P)`.
/// Computed in fp32.
///
/// # Shapes
/// `pred`, `target`: `[N, L, P]`, `mask`: `[N, L]` (1 = masked) → scalar.
pub fn masked_l1(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Tensor {
    let mask = mask.to_kind(Kind::Float);
    let per_patch = (pred.to_kind(Kind::Float) - target.to_kind(Kind::Float)).abs().mean_dim(-1, false, None::<Kind>);
    (per_patch * &mask).sum(Kind::Float) / mask.sum(Kind::Float)
}

/// The images shown for a masked objective: the input with masked patches set to 0, and the prediction with the
/// visible patches replaced by the input's own pixels.
///
/// # Shapes
/// `target`, `pred`: `[N, L, p*p*c]` fp32 pixels, `mask`: `[N, L]` → two `[N, c, H, W]`.
pub(crate) fn masked_and_pasted(target: &Tensor, pred: &Tensor, mask: &Tensor, p: i64, c: i64) -> (Tensor, Tensor) {
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    let visible = target * (1.0 - &m);
    let pasted = &visible + pred * &m;
    (unpatchify(&visible, p, c), unpatchify(&pasted, p, c))
}

/// What MAE and SimMIM share: a forward pass over randomly masked images with the ViT they are built on.
/// [`Objective`] comes with it: the loss of one view, the encoder as the backbone, and reconstructions with the
/// visible patches pasted back.
pub trait MaskedImageModel {
    /// A masked forward; the masks are drawn for `dist`'s global batch ([`Dist::rand_rows`]).
    fn forward(&self, imgs: &Tensor, train: bool, dist: &Dist) -> MaskedForward;
    /// The ViT being pretrained.
    fn encoder(&self) -> &dyn Backbone;
    /// The name of the reconstruction loss, logged as `train/loss/<name>`.
    fn loss_term(&self) -> &'static str;
    /// Predicted patches (fp32, `[N, L, p*p*C]`) back to pixels, given the target patches: the identity unless
    /// the targets were normalized.
    fn to_pixels(&self, pred: Tensor, _target: &Tensor) -> Tensor {
        pred
    }
}

impl<T: MaskedImageModel> Objective for T {
    /// # Shapes
    /// `batch.views`: one `[N, C, H, W]` → loss scalar, features `[N, D]`.
    fn loss(&mut self, batch: &Batch, train: bool) -> Step {
        let out = self.forward(&batch.views[0], train, &batch.dist);
        let features = out.features.detach();
        let terms = vec![(self.loss_term(), out.loss.detach())];
        Step { loss: out.loss, embedding: features.shallow_clone(), features, terms }
    }

    fn backbone(&self) -> &dyn Backbone {
        self.encoder()
    }

    fn num_views(&self) -> usize {
        1
    }

    fn reconstruct(&mut self, x: &Tensor) -> Option<(Tensor, Tensor)> {
        tch::no_grad(|| {
            let out = self.forward(x, false, &Dist::alone());
            let vit = self.encoder().as_vit().expect("masked-image objectives are built on a ViT");
            let (p, c) = (vit.patch_size(), vit.in_channels());
            let target = patchify(&x.to_kind(Kind::Float), p);
            let pred = self.to_pixels(out.pred.to_kind(Kind::Float), &target);
            Some(masked_and_pasted(&target, &pred, &out.mask, p, c))
        })
    }
}
