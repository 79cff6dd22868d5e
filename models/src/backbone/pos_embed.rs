//! The ViT's 2-D position tables: MAE's fixed sin-cos table (He et al. 2021, https://arxiv.org/abs/2111.06377)
//! and the bicubic resampling of a table to another patch grid, as timm's `resample_abs_pos_embed` and DINO's
//! `interpolate_pos_encoding` (Caron et al. 2021, https://arxiv.org/abs/2104.14294), so that one model can take
//! multi-crop inputs (e.g. 2 global 28 px and 6 local 12 px crops) and non-square images; and its antialiased
//! form, as timm resamples a pretrained table for a model of another image size.

use tch::{Kind, Tensor};

/// MAE's `get_2d_sincos_pos_embed(dim, grid)` without the cls row: for the patch in row i, column j (index
/// i·grid + j), the first half of the vector encodes j and the second half i, each half as
/// `[sin(pos·ω), cos(pos·ω)]` with ω_d = 10000^(-d / (dim/4)), d < dim/4.
///
/// # Shapes
/// → `[grid * grid, dim]` float32 on the CPU; `dim % 4 == 0`.
pub fn sincos_2d(dim: i64, grid: i64) -> Tensor {
    assert!(dim % 4 == 0 && dim > 0, "sin-cos position embedding needs a width divisible by 4, got {dim}");
    let quarter = (dim / 4) as usize;
    let omega: Vec<f64> = (0..quarter).map(|d| 1.0 / 10000f64.powf(d as f64 / quarter as f64)).collect();
    let mut table = Vec::with_capacity((grid * grid * dim) as usize);
    for i in 0..grid {
        for j in 0..grid {
            for pos in [j as f64, i as f64] {
                table.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                table.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    Tensor::from_slice(&table).view([grid * grid, dim]).to_kind(Kind::Float)
}

/// Resamples the patch position table of a `from = (rows, cols)` grid to a `to = (h, w)` grid: viewed as a
/// `[1, D, rows, cols]` image, `F.interpolate(mode="bicubic", align_corners=False, size=(h, w))` without
/// antialias (DINO; timm's dynamic-size path does the same but antialiases when shrinking), in float32 as timm,
/// then flattened back row-major. Differentiable, so a learned table trains through it. At `to == from` the
/// table itself is returned (no copy, bit-identical), so the native input size costs nothing.
///
/// # Shapes
/// `patch_pos`: `[1, rows * cols, D]` (no cls row) → `[1, h * w, D]`, same kind as the input.
pub fn resample_pos_embed(patch_pos: &Tensor, from: (i64, i64), to: (i64, i64)) -> Tensor {
    resample(patch_pos, from, to, false)
}

/// [`resample_pos_embed`] with `antialias=True`: what timm's `checkpoint_filter_fn` does to a pretrained table
/// when a model of another image size loads it (`resample_abs_pos_embed(..., antialias=True)`; PyTorch's
/// antialiased bicubic kernel, with PIL's cubic coefficient -0.5, differs from the plain one also when
/// enlarging). Used once, when weights are imported; the forward pass keeps [`resample_pos_embed`].
///
/// # Shapes
/// `patch_pos`: `[1, rows * cols, D]` (no cls row) → `[1, h * w, D]`, same kind as the input.
pub fn resample_pos_embed_antialiased(patch_pos: &Tensor, from: (i64, i64), to: (i64, i64)) -> Tensor {
    resample(patch_pos, from, to, true)
}

fn resample(patch_pos: &Tensor, from: (i64, i64), to: (i64, i64), antialias: bool) -> Tensor {
    let (one, l, d) = patch_pos.size3().expect("position table is [1, L, D]");
    let (rows, cols) = from;
    assert!(one == 1 && l == rows * cols, "position table {:?} is not a {rows}x{cols} grid", patch_pos.size());
    assert!(to.0 >= 1 && to.1 >= 1, "cannot resample positions to a {}x{} grid", to.0, to.1);
    if to == from {
        return patch_pos.shallow_clone();
    }
    let grid = patch_pos.to_kind(Kind::Float).reshape([1, from.0, from.1, d]).permute([0, 3, 1, 2]);
    // Scales None: the kernel derives them from the sizes, as F.interpolate(size=...) does.
    let resized = if antialias {
        grid.internal_upsample_bicubic2d_aa([to.0, to.1], false, None, None)
    } else {
        grid.upsample_bicubic2d([to.0, to.1], false, None, None)
    };
    resized.permute([0, 2, 3, 1]).reshape([1, to.0 * to.1, d]).to_kind(patch_pos.kind())
}
