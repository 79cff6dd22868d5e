//! AdamW, gradient clipping and cross entropy against values produced by PyTorch
//! (scripts/reference/optim_reference.py prints the constants below; the inputs are written out in both files).

use selfsup_models::{cross_entropy, Optimizer, OptimizerConfig, OptimizerKind};
use tch::{nn, Device, Kind, Tensor};

const W0: [f32; 6] = [0.5, -1.0, 2.0, 0.25, 1.5, -0.75];
const B0: [f32; 3] = [0.1, -0.2, 0.3];
const GW: [[f32; 6]; 3] =
    [[0.3, -0.2, 0.1, 0.05, 0.4, -0.6], [-0.1, 0.25, 0.0, 0.2, -0.35, 0.15], [0.7, 0.1, -0.3, -0.05, 0.0, 0.45]];
const GB: [[f32; 3]; 3] = [[0.2, -0.1, 0.05], [-0.3, 0.15, 0.0], [0.1, 0.1, -0.2]];

// torch 2.11.0+cu130
const ADAMW_W1: [f64; 6] = [
    0.4897499978542328,
    -0.9894999861717224,
    1.9889999628067017,
    0.23987498879432678,
    1.4892499446868896,
    -0.7396249771118164,
];
const ADAMW_B1: [f64; 3] = [0.09000000357627869, -0.1899999976158142, 0.2900000214576721];
const ADAMW_W2: [f64; 6] = [
    0.48014870285987854,
    -0.979341447353363,
    1.9780163764953613,
    0.22987745702266693,
    1.4788739681243896,
    -0.7300565838813782,
];
const ADAMW_B2: [f64; 3] = [0.08877506852149963, -0.1822800189256668, 0.28006911277770996];
const ADAMW_W3: [f64; 6] = [
    0.4705703854560852,
    -0.9691094756126404,
    1.9671109914779663,
    0.22040554881095886,
    1.4683836698532104,
    -0.7214100360870361,
];
const ADAMW_B3: [f64; 3] = [0.08497770130634308, -0.17475444078445435, 0.2712962329387665];
const CLIP_TOTAL: f64 = 6.224950313568115;
const CLIP_W_AFTER: [f64; 4] = [0.48193150758743286, -0.6425753235816956, 0.1606438308954239, 0.3212876617908478];
const CLIP_B_AFTER: [f64; 3] = [0.08032191544771194, -0.24096575379371643, 0.4016095697879791];
const CE0_LOSS: f64 = 1.4057632684707642;
const CE0_GRAD: [f64; 20] = [
    0.052019644528627396,
    0.011607151478528976,
    0.025832191109657288,
    -0.10859595239162445,
    0.019136957824230194,
    -0.21449939906597137,
    0.03212226927280426,
    0.008754340000450611,
    0.04336053133010864,
    0.13026224076747894,
    0.009047233499586582,
    -0.08557423949241638,
    0.04481124132871628,
    0.018218891695141792,
    0.013496886938810349,
    0.010372523218393326,
    0.010372523218393326,
    0.2083377093076706,
    0.003815838135778904,
    -0.23289859294891357,
];
const CE1_LOSS: f64 = 1.4862632751464844;
const CE1_GRAD: [f64; 20] = [
    0.04701964184641838,
    0.006607151124626398,
    0.020832190290093422,
    -0.08859594911336899,
    0.014136957004666328,
    -0.19449938833713531,
    0.027122264727950096,
    0.0037543391808867455,
    0.03836052492260933,
    0.12526223063468933,
    0.0040472326800227165,
    -0.06557425111532211,
    0.039811234921216965,
    0.013218889944255352,
    0.008496885187923908,
    0.0053725228644907475,
    0.0053725228644907475,
    0.20333769917488098,
    -0.0011841619852930307,
    -0.2128985971212387,
];

fn values(t: &Tensor) -> Vec<f64> {
    Vec::try_from(&t.flatten(0, -1).to_kind(Kind::Double)).unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: {g} vs PyTorch {w}");
    }
}

#[test]
fn adamw_matches_torch_optim_adamw() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var_copy("w", &Tensor::from_slice(&W0).view([2, 3]));
    let b = vs.root().var_copy("b", &Tensor::from_slice(&B0));
    let cfg = OptimizerConfig {
        kind: OptimizerKind::Adamw,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.05,
        ..Default::default()
    };
    // The default spec decays the matrix and not the bias, as the two parameter groups of the reference.
    let mut opt = Optimizer::new(&vs, &cfg).unwrap();
    let want = [(ADAMW_W1, ADAMW_B1), (ADAMW_W2, ADAMW_B2), (ADAMW_W3, ADAMW_B3)];
    for (k, (want_w, want_b)) in want.iter().enumerate() {
        opt.zero_grad();
        let gw = Tensor::from_slice(&GW[k]).view([2, 3]);
        let gb = Tensor::from_slice(&GB[k]);
        let loss = (&gw * &w).sum(Kind::Float)
            + (&gb * &b).sum(Kind::Float)
            + (&w * &w).sum(Kind::Float) * 0.5
            + (&b * &b).sum(Kind::Float) * 0.5;
        loss.backward();
        opt.step(1e-2);
        assert_close(&values(&w), want_w, 1e-6, &format!("w after step {}", k + 1));
        assert_close(&values(&b), want_b, 1e-6, &format!("b after step {}", k + 1));
    }
}

#[test]
fn clip_grad_norm_matches_torch_and_leaves_small_gradients_alone() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().zeros("w", &[2, 2]);
    let b = vs.root().zeros("b", &[3]);
    let cfg = OptimizerConfig { kind: OptimizerKind::Adamw, ..Default::default() };
    let mut opt = Optimizer::new(&vs, &cfg).unwrap();
    let set_grads = || {
        let gw = Tensor::from_slice(&[3f32, -4., 1., 2.]).view([2, 2]);
        let gb = Tensor::from_slice(&[0.5f32, -1.5, 2.5]);
        ((&gw * &w).sum(Kind::Float) + (&gb * &b).sum(Kind::Float)).backward();
    };
    opt.zero_grad();
    set_grads();
    let total = opt.clip_grad_norm(1.0);
    assert_eq!(total.size(), Vec::<i64>::new());
    assert!((total.double_value(&[]) - CLIP_TOTAL).abs() < 1e-5, "{total}");
    assert_close(&values(&w.grad()), &CLIP_W_AFTER, 1e-6, "clipped w grad");
    assert_close(&values(&b.grad()), &CLIP_B_AFTER, 1e-6, "clipped b grad");

    opt.zero_grad();
    set_grads();
    let total = opt.clip_grad_norm(100.0);
    assert!((total.double_value(&[]) - CLIP_TOTAL).abs() < 1e-5, "{total}");
    assert_eq!(values(&w.grad()), vec![3.0, -4.0, 1.0, 2.0]);
    assert_eq!(values(&b.grad()), vec![0.5, -1.5, 2.5]);
}

#[test]
fn cross_entropy_matches_torch_with_and_without_label_smoothing() {
    let logits: [f32; 20] =
        [1.0, -0.5, 0.3, 2.0, 0.0, 0.2, 0.1, -1.2, 0.4, 1.5, -0.7, 2.2, 0.9, 0.0, -0.3, 0.0, 0.0, 3.0, -1.0, 0.5];
    let targets = Tensor::from_slice(&[3i64, 0, 1, 4]);
    for (smoothing, want_loss, want_grad) in [(0.0, CE0_LOSS, CE0_GRAD), (0.1, CE1_LOSS, CE1_GRAD)] {
        let x = Tensor::from_slice(&logits).view([4, 5]).set_requires_grad(true);
        let loss = cross_entropy(&x, &targets, smoothing);
        assert_eq!((loss.size(), loss.kind()), (vec![], Kind::Float));
        loss.backward();
        let got = loss.double_value(&[]);
        assert!((got - want_loss).abs() < 1e-6, "smoothing {smoothing}: {got} vs PyTorch {want_loss}");
        assert_close(&values(&x.grad()), &want_grad, 1e-6, &format!("grad, smoothing {smoothing}"));
    }
    // Half-precision logits still give an fp32 loss.
    let x = Tensor::from_slice(&logits).view([4, 5]).to_kind(Kind::Half);
    let loss = cross_entropy(&x, &targets, 0.0);
    assert_eq!(loss.kind(), Kind::Float);
    assert!((loss.double_value(&[]) - CE0_LOSS).abs() < 1e-2);
}
