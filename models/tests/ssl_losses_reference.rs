//! The joint-embedding losses of `selfsup_models::loss` against values produced by PyTorch
//! (scripts/reference/ssl_losses_reference.py, float64): each loss's value and its gradient with respect to every
//! input, on fp32 inputs, within 1e-5 relative to the scale of the reference (the largest |value| of that
//! gradient); each term of the multi-term losses likewise. Then finite-difference checks of the gradients in f64.

use std::cell::RefCell;
use std::collections::BTreeMap;

use selfsup_models::loss::{
    barlow_twins, byol_loss, dino_loss, ibot_patch_loss, infonce_with_offset, koleo, vicreg, LossTerms,
};
use serde_json::Value;
use tch::{Kind, Tensor};

/// Largest error allowed, relative to the reference's scale.
const TOLERANCE: f64 = 1e-5;

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ssl_losses_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// A `{"shape", "data"}` tensor of the reference, in `kind`.
fn tensor(v: &Value, kind: Kind) -> Tensor {
    let shape: Vec<i64> = v["shape"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect();
    Tensor::from_slice(&floats(&v["data"])).view(shape.as_slice()).to_kind(kind)
}

fn leaf(v: &Value) -> Tensor {
    tensor(v, Kind::Float).set_requires_grad(true)
}

fn param(case: &Value, name: &str) -> f64 {
    case["params"][name].as_f64().unwrap_or_else(|| panic!("param {name}"))
}

/// The largest error of each loss, relative to scale, reported at the end of every test.
#[derive(Default)]
struct Errors(RefCell<BTreeMap<String, f64>>);

impl Errors {
    fn record(&self, what: &str, err: f64) {
        let mut m = self.0.borrow_mut();
        let e = m.entry(what.to_string()).or_insert(0.0);
        *e = e.max(err);
    }

    /// |got - want| relative to |want| (absolute when want is 0).
    fn value(&self, what: &str, got: &Tensor, want: &Value) {
        let (got, want) = (got.double_value(&[]), want.as_f64().unwrap());
        let err = (got - want).abs() / if want == 0.0 { 1.0 } else { want.abs() };
        assert!(err < TOLERANCE, "{what}: value {got} vs PyTorch {want} (relative error {err:.2e})");
        self.record(&format!("{what} value"), err);
    }

    /// The largest |got - want| over the gradient relative to the largest |want|; a reference gradient of exactly
    /// zero (a detached input) must come back undefined or exactly zero.
    fn grad(&self, what: &str, got: &Tensor, want: &Value) {
        let want_t = tensor(want, Kind::Double);
        let scale = want_t.abs().max().double_value(&[]);
        if scale == 0.0 {
            let got = if got.defined() { got.abs().max().double_value(&[]) } else { 0.0 };
            assert_eq!(got, 0.0, "{what}: gradient must be zero");
            return;
        }
        assert!(got.defined(), "{what}: no gradient");
        assert_eq!(got.size(), want_t.size(), "{what}: gradient shape");
        let err = (got.to_kind(Kind::Double) - &want_t).abs().max().double_value(&[]) / scale;
        assert!(err < TOLERANCE, "{what}: gradient off by {err:.2e} of its scale {scale:.3e}");
        self.record(&format!("{what} grad"), err);
    }

    fn report(&self) {
        for (what, err) in self.0.borrow().iter() {
            println!("max relative error {what}: {err:.2e}");
        }
    }
}

#[test]
fn byol_matches_pytorch() {
    let r = reference();
    let errors = Errors::default();
    for case in r["byol"].as_array().unwrap() {
        let (p, z) = (leaf(&case["inputs"]["p"]), leaf(&case["inputs"]["z"]));
        let loss = byol_loss(&p, &z);
        loss.backward();
        errors.value("byol", &loss, &case["value"]);
        errors.grad("byol d/dp", &p.grad(), &case["grads"]["p"]);
        errors.grad("byol d/dz", &z.grad(), &case["grads"]["z"]);
    }
    errors.report();
}

#[test]
fn infonce_matches_pytorch() {
    let r = reference();
    let errors = Errors::default();
    let cases = r["infonce"].as_array().unwrap();
    assert!(cases.iter().any(|c| param(c, "offset") > 0.0), "an offset case");
    for case in cases {
        let (q, k) = (leaf(&case["inputs"]["q"]), leaf(&case["inputs"]["k"]));
        let loss = infonce_with_offset(&q, &k, param(case, "temperature"), param(case, "offset") as i64);
        loss.backward();
        errors.value("infonce", &loss, &case["value"]);
        errors.grad("infonce d/dq", &q.grad(), &case["grads"]["q"]);
        errors.grad("infonce d/dk", &k.grad(), &case["grads"]["k"]);
    }
    errors.report();
}

fn views(v: &Value) -> Vec<Tensor> {
    v.as_array().unwrap().iter().map(leaf).collect()
}

#[test]
fn dino_matches_pytorch() {
    let r = reference();
    let errors = Errors::default();
    for case in r["dino"].as_array().unwrap() {
        let (student, teacher) = (views(&case["inputs"]["student"]), views(&case["inputs"]["teacher"]));
        let center = leaf(&case["inputs"]["center"]);
        let loss = dino_loss(&student, &teacher, &center, param(case, "student_temp"), param(case, "teacher_temp"));
        loss.backward();
        errors.value("dino", &loss, &case["value"]);
        for (i, s) in student.iter().enumerate() {
            errors.grad("dino d/dstudent", &s.grad(), &case["grads"]["student"][i]);
        }
        // PyTorch's reference gradients for the teacher and the center are zero (detached): ours must be too.
        for (i, t) in teacher.iter().enumerate() {
            errors.grad("dino d/dteacher", &t.grad(), &case["grads"]["teacher"][i]);
        }
        errors.grad("dino d/dcenter", &center.grad(), &case["grads"]["center"]);
    }
    errors.report();
}

#[test]
fn ibot_patch_loss_matches_pytorch() {
    let r = reference();
    let errors = Errors::default();
    for (i, case) in r["ibot"].as_array().unwrap().iter().enumerate() {
        let inputs = &case["inputs"];
        let (student, teacher, center) = (leaf(&inputs["student"]), leaf(&inputs["teacher"]), leaf(&inputs["center"]));
        // The reference stores the mask as 0/1: pass it as a float mask in one case, as bool in the others.
        let mask = tensor(&inputs["mask"], Kind::Float);
        let mask = if i == 1 { mask } else { mask.to_kind(Kind::Bool) };
        let loss = ibot_patch_loss(
            &student,
            &teacher,
            &mask,
            &center,
            param(case, "student_temp"),
            param(case, "teacher_temp"),
        );
        loss.backward();
        errors.value("ibot", &loss, &case["value"]);
        errors.grad("ibot d/dstudent", &student.grad(), &case["grads"]["student"]);
        errors.grad("ibot d/dteacher", &teacher.grad(), &case["grads"]["teacher"]);
        errors.grad("ibot d/dcenter", &center.grad(), &case["grads"]["center"]);
    }
    errors.report();
}

#[test]
fn koleo_matches_pytorch() {
    // The duplicated-row case: rows 2 and 5 are identical, so their distance is ||1e-8 · 1|| and each gets a
    // gradient of ~1e6 from its own term and the opposite from its twin's; these cancel exactly (the same fp32
    // numbers) only because the script made sure no third row has one of the twins as its nearest neighbour.
    // Were that so, its ~0.1 contribution would be added to a ~1e6 partial sum whose fp32 ulp is ~0.1: a
    // limit of fp32 at an exact duplicate, not of the formula.
    let r = reference();
    let errors = Errors::default();
    for case in r["koleo"].as_array().unwrap() {
        let x = leaf(&case["inputs"]["x"]);
        let loss = koleo(&x);
        loss.backward();
        errors.value("koleo", &loss, &case["value"]);
        errors.grad("koleo d/dx", &x.grad(), &case["grads"]["x"]);
    }
    errors.report();
}

/// A multi-term loss against its reference: the total's value and gradients, each term's value, and each term's
/// gradients through `term_total(name, z1, z2)`, a total that is that term alone.
fn check_terms(
    errors: &Errors,
    what: &str,
    case: &Value,
    loss: impl Fn(&Tensor, &Tensor) -> LossTerms,
    term_total: impl Fn(&str, &Tensor, &Tensor) -> Tensor,
) {
    let (z1, z2) = (leaf(&case["inputs"]["z1"]), leaf(&case["inputs"]["z2"]));
    let out = loss(&z1, &z2);
    out.total.backward();
    errors.value(what, &out.total, &case["value"]);
    errors.grad(&format!("{what} d/dz1"), &z1.grad(), &case["grads"]["z1"]);
    errors.grad(&format!("{what} d/dz2"), &z2.grad(), &case["grads"]["z2"]);
    let want_terms = case["terms"].as_object().unwrap();
    assert_eq!(out.terms.len(), want_terms.len(), "{what}: terms");
    for (name, value) in &out.terms {
        let want = &want_terms[*name];
        errors.value(&format!("{what}/{name}"), value, &want["value"]);
        let (a, b) = (leaf(&case["inputs"]["z1"]), leaf(&case["inputs"]["z2"]));
        let t = term_total(name, &a, &b);
        errors.value(&format!("{what}/{name} (as total)"), &t, &want["value"]);
        t.backward();
        errors.grad(&format!("{what}/{name} d/dz1"), &a.grad(), &want["grads"]["z1"]);
        errors.grad(&format!("{what}/{name} d/dz2"), &b.grad(), &want["grads"]["z2"]);
    }
}

#[test]
fn barlow_twins_matches_pytorch() {
    let r = reference();
    let errors = Errors::default();
    for case in r["barlow"].as_array().unwrap() {
        let lambda = param(case, "lambd");
        // The terms come back detached; their gradients are reached through the total: lambda = 0 leaves the
        // on-diagonal term, and (total(L) - total(0)) / L with a large L is the off-diagonal term with the
        // on-diagonal part a 1/L fraction of the sum, so that fp32 cancellation stays below 1e-6.
        let term_total = |name: &str, a: &Tensor, b: &Tensor| match name {
            "on_diagonal" => barlow_twins(a, b, 0.0).total,
            "off_diagonal" => (barlow_twins(a, b, 1e3).total - barlow_twins(a, b, 0.0).total) / 1e3,
            other => panic!("unexpected term {other}"),
        };
        check_terms(&errors, "barlow_twins", case, |a, b| barlow_twins(a, b, lambda), term_total);
    }
    errors.report();
}

#[test]
fn vicreg_matches_pytorch() {
    let r = reference();
    let errors = Errors::default();
    for case in r["vicreg"].as_array().unwrap() {
        let (sim, std, cov) = (param(case, "sim_coeff"), param(case, "std_coeff"), param(case, "cov_coeff"));
        let term_total = |name: &str, a: &Tensor, b: &Tensor| match name {
            "invariance" => vicreg(a, b, 1.0, 0.0, 0.0).total,
            "variance" => vicreg(a, b, 0.0, 1.0, 0.0).total,
            "covariance" => vicreg(a, b, 0.0, 0.0, 1.0).total,
            other => panic!("unexpected term {other}"),
        };
        check_terms(&errors, "vicreg", case, |a, b| vicreg(a, b, sim, std, cov), term_total);
    }
    errors.report();
}

/// Central finite differences of `f` at every coordinate of every input, in f64, against autograd.
fn check_finite_differences(what: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) {
    let leaves: Vec<Tensor> = inputs.iter().map(|x| x.to_kind(Kind::Double).set_requires_grad(true)).collect();
    f(&leaves).backward();
    let eps = 1e-6;
    let mut worst = 0f64;
    for (i, x) in leaves.iter().enumerate() {
        let grad: Vec<f64> = Vec::try_from(&x.grad().flatten(0, -1)).unwrap();
        let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
        let base: Vec<Tensor> = leaves.iter().map(|x| x.detach().copy()).collect();
        for (j, g) in grad.iter().enumerate() {
            let bump = |d: f64| {
                let bumped: Vec<Tensor> = base.iter().map(|x| x.copy()).collect();
                let _ = bumped[i].view([-1]).get(j as i64).g_add_scalar_(d);
                f(&bumped).double_value(&[])
            };
            let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
            let err = (fd - g).abs() / scale.max(1e-2);
            assert!(err < 1e-6, "{what}: input {i} coordinate {j}: fd {fd} vs autograd {g}");
            worst = worst.max(err);
        }
    }
    println!("finite differences vs autograd, {what}: max error {worst:.2e} of the gradient's scale");
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let r = reference();
    let inputs = |loss: &str, case: usize, names: &[&str]| -> Vec<Tensor> {
        names.iter().map(|n| tensor(&r[loss][case]["inputs"][*n], Kind::Double)).collect()
    };
    // DINO: all student views (the teacher side is detached, so perturbing it is not a gradient check).
    let case = &r["dino"][0];
    let teacher: Vec<Tensor> =
        case["inputs"]["teacher"].as_array().unwrap().iter().map(|t| tensor(t, Kind::Double)).collect();
    let student: Vec<Tensor> =
        case["inputs"]["student"].as_array().unwrap().iter().map(|t| tensor(t, Kind::Double)).collect();
    let center = tensor(&case["inputs"]["center"], Kind::Double);
    check_finite_differences("dino", &student, |s| dino_loss(s, &teacher, &center, 0.1, 0.04));
    // VICReg with the paper's coefficients; the inputs' column stds stay away from the hinge at 1.
    check_finite_differences("vicreg", &inputs("vicreg", 0, &["z1", "z2"]), |z| {
        vicreg(&z[0], &z[1], 25.0, 25.0, 1.0).total
    });
    check_finite_differences("barlow_twins", &inputs("barlow", 0, &["z1", "z2"]), |z| {
        barlow_twins(&z[0], &z[1], 0.0051).total
    });
    let ibot = inputs("ibot", 0, &["student", "mask", "center"]);
    let ibot_teacher = tensor(&r["ibot"][0]["inputs"]["teacher"], Kind::Double);
    check_finite_differences("ibot", &ibot[..1], |s| {
        ibot_patch_loss(&s[0], &ibot_teacher, &ibot[1], &ibot[2], 0.1, 0.04)
    });
    check_finite_differences("koleo", &inputs("koleo", 0, &["x"]), |x| koleo(&x[0]));
    check_finite_differences("byol", &inputs("byol", 0, &["p", "z"]), |x| byol_loss(&x[0], &x[1]));
    check_finite_differences("infonce", &inputs("infonce", 3, &["q", "k"]), |x| {
        infonce_with_offset(&x[0], &x[1], 0.2, 3)
    });
}
