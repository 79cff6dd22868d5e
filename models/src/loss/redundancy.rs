//! Redundancy-reduction losses on two views' embeddings: Barlow Twins (Zbontar et al. 2021,
//! https://arxiv.org/abs/2103.03230) and VICReg (Bardes, Ponce, LeCun 2022, https://arxiv.org/abs/2105.04906),
//! each as its authors' released implementation computes it on one process.

use tch::{Kind, Reduction, Tensor};

use super::{compute_kind, LossTerms};

/// Σ of the squared off-diagonal entries of a square matrix (masked rather than `Σ all - Σ diagonal`, which
/// would cancel catastrophically when the diagonal dominates).
fn off_diagonal_square_sum(c: &Tensor, kind: Kind) -> Tensor {
    let eye = Tensor::eye(c.size()[0], (Kind::Bool, c.device()));
    c.square().masked_fill(&eye, 0.0).sum(kind)
}

/// Barlow Twins' loss (Zbontar et al. 2021, https://arxiv.org/abs/2103.03230, eq. 1 and Algorithm 1).
///
/// Each view is standardized along the batch as `nn.BatchNorm1d(D, affine=False)` in training mode (mean 0,
/// biased variance, eps 1e-5); `c = bn(z1)ᵀ bn(z2) / N` is their `[D, D]` cross-correlation;
/// `on_diagonal = Σ_i (c_ii - 1)²`, `off_diagonal = Σ_{i≠j} c_ij²`, `total = on_diagonal + lambda · off_diagonal`.
/// The paper's `lambda` is 5e-3 (0.0051 in the released code); its `scale_loss` factor is the objective's.
/// Terms: `on_diagonal`, `off_diagonal` (unweighted, detached). Computed in fp32 (f64 if given f64); call it
/// outside autocast.
///
/// # Shapes
/// `z1`, `z2`: `[N, D]` projections of the two views (row i of each from the same sample), N >= 2 → scalars.
pub fn barlow_twins(z1: &Tensor, z2: &Tensor, lambda: f64) -> LossTerms {
    assert_eq!(z1.size(), z2.size(), "barlow_twins: z1 and z2 must have the same shape");
    let kind = compute_kind(&[z1, z2]);
    let n = z1.size()[0];
    assert!(n >= 2, "barlow_twins: needs a batch of at least 2 to standardize");
    let standardize = |z: &Tensor| {
        let z = z.to_kind(kind);
        let centered = &z - z.mean_dim([0i64].as_slice(), true, kind);
        let variance = centered.square().mean_dim([0i64].as_slice(), true, kind);
        centered / (variance + 1e-5).sqrt()
    };
    let c = standardize(z1).tr().matmul(&standardize(z2)) / n as f64;
    let on_diagonal = (c.diagonal(0, 0, 1) - 1.0).square().sum(kind);
    let off_diagonal = off_diagonal_square_sum(&c, kind);
    let total = &on_diagonal + &off_diagonal * lambda;
    LossTerms { total, terms: vec![("on_diagonal", on_diagonal.detach()), ("off_diagonal", off_diagonal.detach())] }
}

/// VICReg's loss (Bardes, Ponce, LeCun 2022, https://arxiv.org/abs/2105.04906, eqs. 1-6; `VICReg.forward` of
/// facebookresearch/vicreg).
///
/// `invariance = mse(z1, z2)` (mean over all N·D entries). With each view centered along the batch,
/// `std_j = sqrt(var_j + 1e-4)` (unbiased variance), `variance = mean_j relu(1 - std1_j) / 2 + mean_j
/// relu(1 - std2_j) / 2`; with `cov = zᵀ z / (N - 1)`, `covariance = Σ_{i≠j} cov1_ij² / D + Σ_{i≠j} cov2_ij² / D`.
/// `total = sim_coeff · invariance + std_coeff · variance + cov_coeff · covariance` (the paper: 25, 25, 1).
/// Terms: `invariance`, `variance`, `covariance` (unweighted, detached). Computed in fp32 (f64 if given f64);
/// call it outside autocast.
///
/// # Shapes
/// `z1`, `z2`: `[N, D]` expander outputs of the two views (row i of each from the same sample), N >= 2 → scalars.
pub fn vicreg(z1: &Tensor, z2: &Tensor, sim_coeff: f64, std_coeff: f64, cov_coeff: f64) -> LossTerms {
    assert_eq!(z1.size(), z2.size(), "vicreg: z1 and z2 must have the same shape");
    let kind = compute_kind(&[z1, z2]);
    let (n, d) = (z1.size()[0], z1.size()[1]);
    assert!(n >= 2, "vicreg: needs a batch of at least 2 for an unbiased variance");
    let (z1, z2) = (z1.to_kind(kind), z2.to_kind(kind));
    let invariance = z1.mse_loss(&z2, Reduction::Mean);
    // (variance hinge, covariance penalty) of one view.
    let regularizers = |z: &Tensor| {
        let centered = z - z.mean_dim([0i64].as_slice(), true, kind);
        let var = centered.square().sum_dim_intlist([0i64].as_slice(), false, kind) / (n - 1) as f64;
        let std = (var + 1e-4).sqrt();
        let hinge = (std * -1.0 + 1.0).relu().mean(kind);
        let cov = centered.tr().matmul(&centered) / (n - 1) as f64;
        (hinge, off_diagonal_square_sum(&cov, kind) / d as f64)
    };
    let (hinge1, cov1) = regularizers(&z1);
    let (hinge2, cov2) = regularizers(&z2);
    let variance = hinge1 / 2.0 + hinge2 / 2.0;
    let covariance = cov1 + cov2;
    let total = &invariance * sim_coeff + &variance * std_coeff + &covariance * cov_coeff;
    LossTerms {
        total,
        terms: vec![
            ("invariance", invariance.detach()),
            ("variance", variance.detach()),
            ("covariance", covariance.detach()),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns 1..8 of the 8×8 Sylvester-Hadamard matrix: ±1 entries, each column of mean 0 and biased variance 1,
    /// the columns mutually orthogonal: an already whitened batch of N = 8, D = 7.
    fn whitened() -> Tensor {
        let mut v = Vec::new();
        for i in 0..8u32 {
            for j in 1..8u32 {
                v.push(if (i & j).count_ones() % 2 == 0 { 1f64 } else { -1.0 });
            }
        }
        Tensor::from_slice(&v).view([8, 7])
    }

    fn term(t: &LossTerms, name: &str) -> f64 {
        t.terms.iter().find(|(n, _)| *n == name).unwrap().1.double_value(&[])
    }

    #[test]
    fn barlow_of_identical_whitened_inputs_is_zero() {
        let z = whitened();
        let loss = barlow_twins(&z, &z, 0.0051);
        // c = I / (1 + 1e-5): the on-diagonal term is D (1/(1+1e-5) - 1)² ≈ 7e-10.
        let want_on = 7.0 * (1.0 / (1.0 + 1e-5) - 1.0f64).powi(2);
        assert!((term(&loss, "on_diagonal") - want_on).abs() < 1e-15, "{}", term(&loss, "on_diagonal"));
        assert!(term(&loss, "off_diagonal").abs() < 1e-15);
        assert!(loss.total.double_value(&[]).abs() < 1e-9);
        // Invariant to a per-column affine change of either view.
        let shifted = &z * Tensor::from_slice(&[1f64, 2., 3., 4., 5., 6., 7.]) + 3.0;
        assert!(barlow_twins(&shifted, &z, 0.0051).total.double_value(&[]).abs() < 1e-9);
    }

    #[test]
    fn barlow_of_swapped_columns_applies_lambda() {
        // z2 = z1 with columns 0 and 1 swapped: c is that permutation (up to 1/(1+1e-5)), so two diagonal entries
        // are 0 and two off-diagonal ones are 1: on = 2, off = 2, total = 2 + 2 lambda.
        let z1 = whitened();
        let z2 = Tensor::cat(&[z1.narrow(1, 1, 1), z1.narrow(1, 0, 1), z1.narrow(1, 2, 5)], 1);
        let s = 1.0 / (1.0 + 1e-5);
        for lambda in [0.0, 0.0051, 1.0] {
            let loss = barlow_twins(&z1, &z2, lambda);
            let (on, off) = (2.0 + 5.0 * (s - 1.0f64).powi(2), 2.0 * s * s);
            assert!((term(&loss, "on_diagonal") - on).abs() < 1e-12);
            assert!((term(&loss, "off_diagonal") - off).abs() < 1e-12);
            assert!((loss.total.double_value(&[]) - (on + lambda * off)).abs() < 1e-12, "lambda {lambda}");
        }
        // fp32 inputs compute in fp32 and report the same terms.
        let loss = barlow_twins(&z1.to_kind(Kind::Float), &z2.to_kind(Kind::BFloat16), 0.5);
        assert_eq!(loss.total.kind(), Kind::Float);
        assert!((loss.total.double_value(&[]) - (2.0 + 0.5 * 2.0)).abs() < 1e-4);
    }

    #[test]
    fn vicreg_closed_forms_on_decorrelated_columns() {
        // Whitened columns scaled by s_j stay centered and orthogonal: covariance 0, unbiased std
        // sqrt(8/7 s_j² + 1e-4), so variance = mean_j relu(1 - std_j) for z1 = z2; invariance 0.
        let scale = [0.1f64, 0.3, 0.5, 0.9, 1.0, 2.0, 5.0];
        let z = whitened() * Tensor::from_slice(&scale);
        let hinge: f64 =
            scale.iter().map(|s| (1.0 - (8.0 / 7.0 * s * s + 1e-4).sqrt()).max(0.0)).sum::<f64>() / scale.len() as f64;
        let loss = vicreg(&z, &z, 25.0, 25.0, 1.0);
        assert!(term(&loss, "invariance").abs() < 1e-15);
        assert!((term(&loss, "variance") - hinge).abs() < 1e-12, "{} vs {hinge}", term(&loss, "variance"));
        assert!(term(&loss, "covariance").abs() < 1e-12, "{}", term(&loss, "covariance"));
        assert!((loss.total.double_value(&[]) - 25.0 * hinge).abs() < 1e-10);
        // Shifting one view by a constant c changes only the invariance: c².
        let loss = vicreg(&z, &(&z + 0.5), 2.0, 3.0, 4.0);
        assert!((term(&loss, "invariance") - 0.25).abs() < 1e-12);
        assert!((term(&loss, "variance") - hinge).abs() < 1e-12);
        assert!((loss.total.double_value(&[]) - (2.0 * 0.25 + 3.0 * hinge)).abs() < 1e-10);
    }

    #[test]
    fn vicreg_covariance_of_correlated_columns() {
        // Two identical centered columns x (N = 4, Σx² = 4): cov = (4/3) [[1,1],[1,1]], so each view's penalty is
        // 2 (4/3)² / 2 and the covariance term (both views) is 2 (4/3)² = 32/9.
        let x = Tensor::from_slice(&[1f64, 1., -1., -1., 1., 1., -1., -1.]).view([4, 2]);
        let loss = vicreg(&x, &x, 1.0, 1.0, 1.0);
        assert!((term(&loss, "covariance") - 32.0 / 9.0).abs() < 1e-12, "{}", term(&loss, "covariance"));
        // std = sqrt(4/3 + 1e-4) > 1: no variance penalty.
        assert_eq!(term(&loss, "variance"), 0.0);
    }

    #[test]
    fn terms_are_detached_and_the_total_is_not() {
        let z = whitened().to_kind(Kind::Float).set_requires_grad(true);
        let loss = vicreg(&z, &(&z * 0.5), 25.0, 25.0, 1.0);
        assert!(loss.total.requires_grad());
        assert!(loss.terms.iter().all(|(_, t)| !t.requires_grad()));
        let loss = barlow_twins(&z, &(&z * 0.5), 0.0051);
        assert!(loss.total.requires_grad() && loss.terms.iter().all(|(_, t)| !t.requires_grad()));
    }
}
