//! Losses between two views' embeddings: BYOL's normalized regression (Grill et al. 2020,
//! https://arxiv.org/abs/2006.07733) and MoCo v3's InfoNCE (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057).
//! SimCLR's NT-Xent is [`super::nt_xent`].

use tch::{Kind, Reduction, Tensor};

use super::{compute_kind, l2_normalize};

/// BYOL's loss (Grill et al. 2020, https://arxiv.org/abs/2006.07733, eq. 2): the mean over the batch of the squared
/// distance between l2-normalized prediction and target, `2 - 2 cos(p_i, z_i)`, in [0, 4].
///
/// Rows are normalized as `F.normalize` (norm clamped at 1e-12, so a zero row has cosine 0 and loss 2). Nothing is
/// detached here: the caller passes the target projection `z` detached (or from a no-grad EMA network) and sums
/// the symmetrized loss over both view orders itself. Computed in fp32 (f64 if given f64); call it outside
/// autocast.
///
/// # Shapes
/// `p`: `[N, D]` online predictions, `z`: `[N, D]` target projections (row i of each from the same sample) → scalar.
pub fn byol_loss(p: &Tensor, z: &Tensor) -> Tensor {
    assert_eq!(p.size(), z.size(), "byol_loss: p and z must have the same shape");
    let kind = compute_kind(&[p, z]);
    let p = l2_normalize(&p.to_kind(kind), 1e-12);
    let z = l2_normalize(&z.to_kind(kind), 1e-12);
    let cos = (p * z).sum_dim_intlist([-1i64].as_slice(), false, kind);
    (cos * -2.0 + 2.0).mean(kind)
}

/// MoCo v3's contrastive loss (Chen, Xie, He 2021, https://arxiv.org/abs/2104.02057, Algorithm 1,
/// `contrastive_loss`): with `q` and `k` l2-normalized, the cross entropy of the logits `q kᵀ / T` against the
/// diagonal, times `2T` (MoCo v3's scaling, which makes the gradient magnitude independent of `T`).
///
/// `infonce(q, k, t)` is [`infonce_with_offset`] with offset 0, for keys from this process only (`N == M`).
/// Computed in fp32 (f64 if given f64); call it outside autocast.
///
/// # Shapes
/// `q`: `[N, D]` queries, `k`: `[N, D]` keys (row i of each from the same sample) → scalar.
pub fn infonce(q: &Tensor, k: &Tensor, temperature: f64) -> Tensor {
    infonce_with_offset(q, k, temperature, 0)
}

/// [`infonce`] against a larger set of keys whose positives for `q` are rows `offset..offset + N` of `k`: the
/// distributed form, where `k` is the keys gathered from all processes and `offset = N * rank` (MoCo v3's
/// `labels = arange(N) + N * rank`). Every other row of `k` is a negative.
///
/// # Shapes
/// `q`: `[N, D]`, `k`: `[M, D]` with `offset + N <= M` → scalar.
pub fn infonce_with_offset(q: &Tensor, k: &Tensor, temperature: f64, offset: i64) -> Tensor {
    let (n, m) = (q.size()[0], k.size()[0]);
    assert!(offset >= 0 && offset + n <= m, "infonce: positives {offset}..{} are not rows of k ({m} rows)", offset + n);
    let kind = compute_kind(&[q, k]);
    let q = l2_normalize(&q.to_kind(kind), 1e-12);
    let k = l2_normalize(&k.to_kind(kind), 1e-12);
    let logits = q.matmul(&k.tr()) / temperature;
    let targets = Tensor::arange_start(offset, offset + n, (Kind::Int64, q.device()));
    logits.cross_entropy_loss::<Tensor>(&targets, None, Reduction::Mean, -100, 0.0) * (2.0 * temperature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byol_of_identical_and_opposite_vectors() {
        let p = crate::loss::test_normal(&[7, 5], 0);
        // Scale does not matter, direction does: identical directions give 0, opposite ones 4.
        let same = byol_loss(&p, &(&p * 3.0)).double_value(&[]);
        let opposite = byol_loss(&p, &(&p * -0.5)).double_value(&[]);
        assert!(same.abs() < 1e-6, "{same}");
        assert!((opposite - 4.0).abs() < 1e-5, "{opposite}");
        // Orthogonal rows: cosine 0, loss 2.
        let e = Tensor::eye(4, tch::kind::FLOAT_CPU);
        let ortho = byol_loss(&e, &e.roll([1i64].as_slice(), [0i64].as_slice())).double_value(&[]);
        assert!((ortho - 2.0).abs() < 1e-6, "{ortho}");
    }

    #[test]
    fn byol_keeps_gradients_to_both_inputs_and_computes_bf16_in_fp32() {
        let p = crate::loss::test_normal(&[4, 3], 1).set_requires_grad(true);
        let z = crate::loss::test_normal(&[4, 3], 2).set_requires_grad(true);
        byol_loss(&p, &z).backward();
        assert!(p.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(z.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0, "byol_loss must not detach z itself");
        let half = byol_loss(&p.to_kind(Kind::BFloat16), &z.to_kind(Kind::BFloat16));
        assert_eq!(half.kind(), Kind::Float);
    }

    #[test]
    fn infonce_closed_form_orthonormal_identical() {
        // q = k = the N standard basis vectors: the positive logit is 1/T, the N-1 negatives are 0, so the loss is
        // 2T * -log(e^{1/T} / (e^{1/T} + N - 1)) = 2T * log(1 + (N-1) e^{-1/T}).
        for n in [2i64, 5] {
            let e = Tensor::eye(n, tch::kind::FLOAT_CPU);
            for t in [0.1, 0.2, 1.0] {
                let got = infonce(&e, &e, t).double_value(&[]);
                let want = 2.0 * t * (1.0 + (n - 1) as f64 * (-1.0 / t).exp()).ln();
                assert!((got - want).abs() < 1e-6, "n={n} t={t}: got {got}, want {want}");
            }
        }
    }

    #[test]
    fn infonce_with_offset_finds_the_positives_among_more_keys() {
        let q = crate::loss::test_normal(&[3, 4], 3);
        let other = crate::loss::test_normal(&[5, 4], 4);
        let k = Tensor::cat(&[other.narrow(0, 0, 2), q.shallow_clone(), other.narrow(0, 2, 3)], 0);
        // With the positives placed at rows 2..5 the loss is low; pointing at the wrong rows it is high.
        let right = infonce_with_offset(&q, &k, 0.2, 2).double_value(&[]);
        let wrong = infonce_with_offset(&q, &k, 0.2, 0).double_value(&[]);
        assert!(right < wrong, "{right} vs {wrong}");
        // Offset 0 on exactly N keys is infonce.
        let a = infonce(&q, &other.narrow(0, 0, 3), 0.5).double_value(&[]);
        let b = infonce_with_offset(&q, &other.narrow(0, 0, 3), 0.5, 0).double_value(&[]);
        assert_eq!(a, b);
    }

    #[test]
    #[should_panic(expected = "are not rows of k")]
    fn infonce_rejects_positives_outside_the_keys() {
        let q = Tensor::ones([3, 2], tch::kind::FLOAT_CPU);
        let _ = infonce_with_offset(&q, &q, 0.2, 1);
    }
}
