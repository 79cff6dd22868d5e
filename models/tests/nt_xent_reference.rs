//! nt_xent against values produced by PyTorch (scripts/reference/nt_xent_reference.py): loss and gradients.

use selfsup_models::nt_xent;
use tch::{Kind, Tensor};

mod common;

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn matches_pytorch_loss_and_gradients() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/nt_xent_reference.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let shape: Vec<i64> = r["shape"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let t = case["temperature"].as_f64().unwrap();
        // Our loss runs in fp32 internally; feed fp32 inputs and compare with fp32 tolerances.
        let z1 =
            Tensor::from_slice(&floats(&r["z1"])).view(shape.as_slice()).to_kind(Kind::Float).set_requires_grad(true);
        let z2 =
            Tensor::from_slice(&floats(&r["z2"])).view(shape.as_slice()).to_kind(Kind::Float).set_requires_grad(true);
        let loss = nt_xent(&z1, &z2, t);
        loss.backward();
        let want = case["loss"].as_f64().unwrap();
        let got = loss.double_value(&[]);
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "t={t}: loss {got} vs PyTorch {want}");
        for (grad, key) in [(z1.grad(), "grad_z1"), (z2.grad(), "grad_z2")] {
            let got: Vec<f64> = Vec::try_from(&grad.flatten(0, -1).to_kind(Kind::Double)).unwrap();
            let want = floats(&case[key]);
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4 * scale.max(1e-3), "t={t} {key}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn gradient_matches_finite_differences() {
    // Inputs from our own generator, not torch's global one (which other tests of a binary may draw from).
    let z1 = common::normal(&[4, 3], Kind::Double, 7);
    let z2 = common::normal(&[4, 3], Kind::Double, 8);
    let a = z1.copy().set_requires_grad(true);
    nt_xent(&a, &z2, 0.3).backward();
    let grad: Vec<f64> = Vec::try_from(&a.grad().flatten(0, -1)).unwrap();
    let eps = 1e-3;
    for i in 0..12 {
        let bump = |d: f64| {
            let z = z1.copy();
            let _ = z.view([-1]).get(i).g_add_scalar_(d);
            nt_xent(&z, &z2, 0.3).double_value(&[])
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        // fp32 inside the loss limits the agreement to ~1e-3.
        assert!((fd - grad[i as usize]).abs() < 2e-3, "coord {i}: fd {fd} vs autograd {}", grad[i as usize]);
    }
}
