//! Losses as free functions with their shapes documented.
//!
//! Contrastive (SimCLR's NT-Xent here; BYOL and MoCo v3 in [`contrastive`]), self-distillation (DINO, iBOT, KoLeo
//! in [`distill`]) and redundancy reduction (Barlow Twins, VICReg in [`redundancy`]). Every loss computes in fp32
//! (f64 when given f64, so that finite-difference checks are meaningful) whatever the input precision, and
//! callers run it outside autocast (`autocast(false)`): logits divided by small temperatures, variances and
//! cross-correlations do not survive bf16.

use tch::{Kind, Reduction, Tensor};

pub mod contrastive;
pub mod distill;
pub mod redundancy;

pub use contrastive::{byol_loss, infonce, infonce_with_offset};
pub use distill::{dino_loss, ibot_patch_loss, koleo};
pub use redundancy::{barlow_twins, vicreg};

/// A loss made of several weighted terms.
pub struct LossTerms {
    /// The weighted sum of the terms: the scalar that is backpropagated.
    pub total: Tensor,
    /// Each term as a scalar, UNWEIGHTED and detached (no graph is kept alive by logging them), to be logged as
    /// `train/loss/<name>`.
    pub terms: Vec<(&'static str, Tensor)>,
}

/// The kind the joint-embedding losses compute in: f64 stays f64, everything else (bf16, f16, f32) becomes f32.
pub(crate) fn compute_kind(xs: &[&Tensor]) -> Kind {
    if xs.iter().any(|x| x.kind() == Kind::Double) {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Rows divided by their l2 norm clamped at `eps`, as `F.normalize(x, dim=-1, eps=eps)`: a zero row stays zero.
pub(crate) fn l2_normalize(x: &Tensor, eps: f64) -> Tensor {
    x / x.norm_scalaropt_dim(2.0, [-1i64].as_slice(), true).clamp_min(eps)
}

/// NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al. 2020,
/// https://arxiv.org/abs/2002.05709, eq. 1), averaged over all 2N anchors.
///
/// Each embedding's positive is the other view of the same sample; the 2N-2 other embeddings in the batch are
/// its negatives. Computed in fp32 even under autocast: the logits are divided by a small temperature.
///
/// # Shapes
/// `z1`, `z2`: `[N, D]` (the two views, row i of each from the same sample) → scalar.
pub fn nt_xent(z1: &Tensor, z2: &Tensor, temperature: f64) -> Tensor {
    let n = z1.size()[0];
    let z = Tensor::cat(&[z1, z2], 0).to_kind(Kind::Float);
    let z = &z / z.norm_scalaropt_dim(2.0, [1i64].as_slice(), true).clamp_min(1e-12);
    let logits = z.matmul(&z.tr()) / temperature;
    // An embedding is never its own negative: mask the diagonal out of the softmax.
    let eye = Tensor::eye(2 * n, (Kind::Bool, z.device()));
    let logits = logits.masked_fill(&eye, f64::NEG_INFINITY);
    let idx = Tensor::arange(n, (Kind::Int64, z.device()));
    let targets = Tensor::cat(&[&idx + n, idx], 0);
    logits.cross_entropy_for_logits(&targets)
}

/// Cross entropy of `logits` against class indices, averaged over the batch, with label smoothing as
/// `F.cross_entropy(logits, targets, label_smoothing=...)` (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567):
/// the target distribution puts `1 - label_smoothing + label_smoothing / K` on the true class and
/// `label_smoothing / K` on each other class. Computed in fp32 even under autocast.
///
/// # Shapes
/// `logits`: `[N, K]`, `targets`: `[N]` int64 in `0..K` → scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, label_smoothing: f64) -> Tensor {
    logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(targets, None, Reduction::Mean, -100, label_smoothing)
}

/// Test inputs: standard-normal fp32 values of `shape` from a generator of our own (splitmix64, Box-Muller), the same
/// for the same `seed` whatever the unit tests on other threads draw from torch's global RNG (docs/testing.md).
#[cfg(test)]
pub(crate) fn test_normal(shape: &[i64], seed: u64) -> Tensor {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // 53 bits in (0, 1]: never 0, so the logarithm below is finite.
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + f64::EPSILON / 2.0
    };
    let n: i64 = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_slice(&values).view(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_orthonormal_pairs() {
        // z1 = z2 = [e0, e1]: each anchor has cosine 1 with its positive and 0 with the two negatives,
        // so the loss is -log(e^{1/t} / (e^{1/t} + 2)) = log(1 + 2 e^{-1/t}).
        let z = Tensor::from_slice(&[1f32, 0., 0., 1.]).view([2, 2]);
        for t in [0.1, 0.5, 1.0] {
            let got = nt_xent(&z, &z, t).double_value(&[]);
            let want = (1.0 + 2.0 * (-1.0 / t).exp()).ln();
            assert!((got - want).abs() < 1e-5, "t={t}: got {got}, want {want}");
        }
    }

    #[test]
    fn invariant_to_scale_and_symmetric_in_views() {
        let (z1, z2) = (test_normal(&[8, 5], 0), test_normal(&[8, 5], 1));
        let a = nt_xent(&z1, &z2, 0.2).double_value(&[]);
        let b = nt_xent(&(&z1 * 3.0), &(&z2 * 0.5), 0.2).double_value(&[]);
        let c = nt_xent(&z2, &z1, 0.2).double_value(&[]);
        assert!((a - b).abs() < 1e-5 && (a - c).abs() < 1e-5, "{a} {b} {c}");
        // Uniformly random embeddings score near log(2N-1); aligned views score far lower.
        assert!(a > 1.5, "{a}");
        assert!(nt_xent(&z1, &z1, 0.2).double_value(&[]) < a - 1.0);
    }
}
