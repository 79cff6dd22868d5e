//! Self-distillation losses: DINO's cross-view cross entropy (Caron et al. 2021, https://arxiv.org/abs/2104.14294),
//! iBOT's masked patch-token loss (Zhou et al. 2022, https://arxiv.org/abs/2111.07832) as DINOv2 uses it (Oquab et
//! al. 2023, https://arxiv.org/abs/2304.07193), and the KoLeo spreading regularizer (Sablayrolles et al. 2019,
//! https://arxiv.org/abs/1806.03198) as DINOv2's `KoLeoLoss`.
//!
//! The teacher's centering state (its EMA update) belongs to the objective; these functions take the center as
//! an input and never change it.

use tch::{Kind, Tensor};

use super::{compute_kind, l2_normalize};

/// DINO's loss (Caron et al. 2021, https://arxiv.org/abs/2104.14294, Algorithm 1; `DINOLoss.forward` of
/// facebookresearch/dino): the student's prediction of every view is pulled towards the teacher's output of every
/// *other* global view.
///
/// With `q_g = softmax((teacher[g] - center) / teacher_temp)` (detached: no gradient reaches the teacher or the
/// center) and `log p_v = log_softmax(student[v] / student_temp)`:
/// `loss = mean over pairs (g, v), v != g, of mean over n of -Σ_k q_g[n,k] log p_v[n,k]`.
/// The first `teacher.len()` student views are the global crops, in the teacher's order; the rest are local
/// crops. Computed in fp32 (f64 if given f64); call it outside autocast.
///
/// # Shapes
/// `student`: V tensors `[N, K]` (logits), `teacher`: G tensors `[N, K]` (logits, G <= V), `center`: `[1, K]`
/// → scalar. Needs at least one pair: V >= 2.
pub fn dino_loss(
    student: &[Tensor],
    teacher: &[Tensor],
    center: &Tensor,
    student_temp: f64,
    teacher_temp: f64,
) -> Tensor {
    assert!(
        !teacher.is_empty() && student.len() >= teacher.len() && student.len() >= 2,
        "dino_loss: needs 1 <= teacher views ({}) <= student views ({}) and at least 2 student views",
        teacher.len(),
        student.len()
    );
    let mut all: Vec<&Tensor> = student.iter().chain(teacher).collect();
    all.push(center);
    let kind = compute_kind(&all);
    let center = center.to_kind(kind);
    let targets: Vec<Tensor> =
        teacher.iter().map(|t| ((t.to_kind(kind) - &center) / teacher_temp).softmax(-1, kind).detach()).collect();
    let log_probs: Vec<Tensor> =
        student.iter().map(|s| (s.to_kind(kind) / student_temp).log_softmax(-1, kind)).collect();
    let mut terms = Vec::new();
    for (g, q) in targets.iter().enumerate() {
        for (v, log_p) in log_probs.iter().enumerate() {
            if v != g {
                assert_eq!(q.size(), log_p.size(), "dino_loss: teacher view {g} and student view {v} differ in shape");
                terms.push(-(q * log_p).sum_dim_intlist([-1i64].as_slice(), false, kind).mean(kind));
            }
        }
    }
    Tensor::stack(&terms, 0).mean(kind)
}

/// iBOT's masked patch-token loss (Zhou et al. 2022, https://arxiv.org/abs/2111.07832, eq. 2) with its per-image
/// normalization, exactly DINOv2's `iBOTPatchLoss.forward_masked` with `masks_weight = 1 / num_masked(image)`.
///
/// Per token: `-Σ_k softmax((t - center) / teacher_temp)_k · log_softmax(s / student_temp)_k` (teacher side
/// detached). Per image: the mean over its masked tokens (0 for an image without any). Result: the sum over images
/// divided by the number of images N — as DINOv2 and iBOT divide by the batch, so an image without masked tokens
/// counts as a zero, and a batch without any masked token gives exactly 0 (never NaN). Unmasked tokens get
/// exactly zero gradient. Computed in fp32 (f64 if given f64); call it outside autocast.
///
/// # Shapes
/// `student`: `[N, L, K]` patch-token logits of the masked input, `teacher`: `[N, L, K]` patch-token logits of the
/// unmasked image, `mask`: `[N, L]` bool or {0, 1} (true/nonzero = masked), `center`: `[1, 1, K]` (or anything
/// broadcastable to `[N, L, K]`) → scalar.
pub fn ibot_patch_loss(
    student: &Tensor,
    teacher: &Tensor,
    mask: &Tensor,
    center: &Tensor,
    student_temp: f64,
    teacher_temp: f64,
) -> Tensor {
    assert_eq!(student.size(), teacher.size(), "ibot_patch_loss: student and teacher differ in shape");
    assert_eq!(mask.size(), student.size()[..2], "ibot_patch_loss: mask must be [N, L]");
    let kind = compute_kind(&[student, teacher, center]);
    let q = ((teacher.to_kind(kind) - center.to_kind(kind)) / teacher_temp).softmax(-1, kind).detach();
    let log_p = (student.to_kind(kind) / student_temp).log_softmax(-1, kind);
    let per_token = -(q * log_p).sum_dim_intlist([-1i64].as_slice(), false, kind);
    let masked = mask.to_kind(Kind::Bool);
    // masked_fill rather than a product with the mask: an unmasked token contributes exactly 0 even if its own
    // cross entropy were not finite.
    let per_token = per_token.masked_fill(&masked.logical_not(), 0.0);
    let count = masked.sum_dim_intlist([-1i64].as_slice(), false, kind).clamp_min(1.0);
    (per_token.sum_dim_intlist([-1i64].as_slice(), false, kind) / count).mean(kind)
}

/// The KoLeo regularizer (Sablayrolles et al. 2019, https://arxiv.org/abs/1806.03198, eq. 6), as DINOv2's
/// `KoLeoLoss`: the Kozachenko-Leonenko entropy estimator's term, which spreads the rows over the unit sphere.
///
/// Rows are l2-normalized (norm clamped at 1e-8); each row's nearest other row is the argmax of its dot products
/// with the diagonal excluded (set to -inf; DINOv2 sets -1, the same unless every other row is exactly opposite),
/// an index carrying no gradient; with `d_i = ||x_i - x_nn(i) + 1e-8||_2`
/// (`nn.PairwiseDistance(eps=1e-8)`), `loss = -mean_i log(d_i + 1e-8)`.
/// Finite with finite gradients for degenerate batches: identical rows (`d` = √D·1e-8, a large but finite
/// gradient), zero rows (normalized to zero) and a batch of one row (0, no neighbour). Computed in fp32 (f64 if
/// given f64); call it outside autocast.
///
/// # Shapes
/// `x`: `[N, D]` (DINOv2: the student's class tokens of one global view) → scalar.
pub fn koleo(x: &Tensor) -> Tensor {
    let kind = compute_kind(&[x]);
    let x = x.to_kind(kind);
    let n = x.size()[0];
    if n < 2 {
        // No neighbour to be far from; keep the graph so that backward through this term is well defined.
        return x.sum(kind) * 0.0;
    }
    let x = l2_normalize(&x, 1e-8);
    let nearest = tch::no_grad(|| {
        let eye = Tensor::eye(n, (Kind::Bool, x.device()));
        x.matmul(&x.tr()).masked_fill(&eye, f64::NEG_INFINITY).argmax(1, false)
    });
    let distance = (&x - x.index_select(0, &nearest) + 1e-8).norm_scalaropt_dim(2.0, [-1i64].as_slice(), false);
    -(distance + 1e-8).log().mean(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not torch's global RNG, which the unit tests on other threads draw from too.
    fn randn(shape: &[i64], seed: u64) -> Tensor {
        crate::loss::test_normal(shape, seed)
    }

    #[test]
    fn dino_with_uniform_teacher_is_the_students_cross_entropy_to_uniform() {
        let (n, k) = (4, 6);
        // Teacher logits equal to the center: q is uniform, so each pair scores
        // mean_n (logsumexp(s/ts) - mean_k(s/ts)) and the loss is the mean of that over the pairs.
        let center = randn(&[1, k], 0);
        let teacher = vec![center.repeat([n, 1]), center.repeat([n, 1])];
        let student: Vec<Tensor> = (1..5).map(|seed| randn(&[n, k], seed)).collect();
        let ts = 0.1;
        let per_view: Vec<f64> = student
            .iter()
            .map(|s| {
                let s = s / ts;
                (s.logsumexp([-1i64].as_slice(), false) - s.mean_dim([-1i64].as_slice(), false, Kind::Float))
                    .mean(Kind::Float)
                    .double_value(&[])
            })
            .collect();
        // Pairs: g=0 with v=1,2,3 and g=1 with v=0,2,3.
        let want = (per_view[1] + per_view[2] + per_view[3] + per_view[0] + per_view[2] + per_view[3]) / 6.0;
        let got = dino_loss(&student, &teacher, &center, ts, 0.04).double_value(&[]);
        assert!((got - want).abs() < 1e-5 * want.abs(), "got {got}, want {want}");
        // A uniform student against a uniform teacher: log K.
        let flat: Vec<Tensor> = (0..3).map(|_| Tensor::zeros([n, k], tch::kind::FLOAT_CPU)).collect();
        let got = dino_loss(&flat, &teacher, &center, ts, 0.04).double_value(&[]);
        assert!((got - (k as f64).ln()).abs() < 1e-6, "{got}");
    }

    #[test]
    fn dino_sends_no_gradient_to_the_teacher_or_center() {
        let teacher: Vec<Tensor> = (10..12).map(|seed| randn(&[3, 5], seed).set_requires_grad(true)).collect();
        let student: Vec<Tensor> = (12..15).map(|seed| randn(&[3, 5], seed).set_requires_grad(true)).collect();
        let center = randn(&[1, 5], 15).set_requires_grad(true);
        dino_loss(&student, &teacher, &center, 0.1, 0.04).backward();
        for s in &student {
            assert!(s.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
        for t in teacher.iter().chain([&center]) {
            assert!(!t.grad().defined(), "teacher side must be detached");
        }
    }

    #[test]
    fn ibot_without_masked_tokens_is_zero_with_zero_gradient() {
        let student = randn(&[2, 3, 4], 20).set_requires_grad(true);
        let teacher = randn(&[2, 3, 4], 21);
        let center = Tensor::zeros([1, 1, 4], tch::kind::FLOAT_CPU);
        let none = Tensor::zeros([2, 3], (Kind::Bool, tch::Device::Cpu));
        let loss = ibot_patch_loss(&student, &teacher, &none, &center, 0.1, 0.04);
        assert_eq!(loss.double_value(&[]), 0.0);
        loss.backward();
        assert_eq!(student.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn ibot_averages_per_image_then_over_all_images() {
        let (s, t) = (randn(&[3, 4, 5], 30), randn(&[3, 4, 5], 31));
        let center = randn(&[1, 1, 5], 32);
        let tokens = -((&t - &center) / 0.05).softmax(-1, Kind::Float) * (&s / 0.1).log_softmax(-1, Kind::Float);
        let tokens = tokens.sum_dim_intlist([-1i64].as_slice(), false, Kind::Float);
        let tok = |i: i64, j: i64| tokens.double_value(&[i, j]);
        // Image 0: tokens 1 and 3 masked; image 1: none; image 2: all four. A float {0,1} mask works as a bool one.
        let mask = Tensor::from_slice(&[0f32, 1., 0., 1., 0., 0., 0., 0., 1., 1., 1., 1.]).view([3, 4]);
        let want = ((tok(0, 1) + tok(0, 3)) / 2.0 + 0.0 + (0..4).map(|j| tok(2, j)).sum::<f64>() / 4.0) / 3.0;
        let got = ibot_patch_loss(&s, &t, &mask, &center, 0.1, 0.05).double_value(&[]);
        assert!((got - want).abs() < 1e-5 * want.abs(), "got {got}, want {want}");
        let got_bool = ibot_patch_loss(&s, &t, &mask.to_kind(Kind::Bool), &center, 0.1, 0.05).double_value(&[]);
        assert_eq!(got, got_bool);
    }

    fn koleo_value_and_grad(x: &Tensor) -> (f64, Tensor) {
        let x = x.copy().set_requires_grad(true);
        let loss = koleo(&x);
        loss.backward();
        (loss.double_value(&[]), x.grad())
    }

    fn all_finite(t: &Tensor) -> bool {
        t.isfinite().all().int64_value(&[]) == 1
    }

    #[test]
    fn koleo_degenerate_batches_are_finite_with_finite_gradients() {
        let row = randn(&[1, 5], 40);
        let others = randn(&[3, 5], 41);
        let _ = others.get(1).zero_();
        let cases = [
            ("identical rows", row.repeat([4, 1])),
            ("zero rows", Tensor::zeros([3, 5], tch::kind::FLOAT_CPU)),
            ("one zero row", others.shallow_clone()),
            ("a duplicated row", Tensor::cat(&[&others, &others.narrow(0, 0, 1)], 0)),
            ("two rows", randn(&[2, 5], 42)),
            ("bf16", randn(&[6, 5], 43).to_kind(Kind::BFloat16).to_kind(Kind::Float)),
        ];
        for (name, x) in cases {
            let (value, grad) = koleo_value_and_grad(&x);
            assert!(value.is_finite(), "{name}: loss {value}");
            assert!(all_finite(&grad), "{name}: gradient {grad:?}");
        }
        // Identical rows: every distance is ||1e-8 · 1||, so the loss is -log(√D·1e-8 + 1e-8).
        let (value, _) = koleo_value_and_grad(&row.repeat([4, 1]));
        let want = -((5f64).sqrt() * 1e-8 + 1e-8).ln();
        assert!((value - want).abs() < 1e-4 * want, "{value} vs {want}");
        // A batch of one has no neighbour: 0, and a zero (not missing) gradient.
        let (value, grad) = koleo_value_and_grad(&row);
        assert_eq!(value, 0.0);
        assert_eq!(grad.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(koleo(&row.to_kind(Kind::BFloat16)).kind(), Kind::Float);
    }

    #[test]
    fn koleo_prefers_spread_rows() {
        // The 4 axis directions of the plane (nearest-neighbour distance √2) beat 4 rows clustered near one axis.
        let spread = Tensor::from_slice(&[1f32, 0., 0., 1., -1., 0., 0., -1.]).view([4, 2]);
        let clustered = Tensor::from_slice(&[1f32, 0., 1., 0.1, 1., 0.2, 1., 0.3]).view([4, 2]);
        let (a, b) = (koleo(&spread).double_value(&[]), koleo(&clustered).double_value(&[]));
        assert!((a + (2f64.sqrt() + 1e-8).ln()).abs() < 1e-6, "{a}");
        assert!(a < b, "{a} vs {b}");
    }
}
