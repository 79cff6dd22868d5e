//! Masked-image modelling: random masking, patchify order, the masked losses, and MAE / SimMIM end to end
//! (names, what the encoder may see, where the loss gradient goes, reconstruction, a short training run).

use selfsup_models::objective::{
    keep_count, masked_l1, masked_mse, normalize_patches, patchify, random_masking, unpatchify, MaskedForward,
};
use selfsup_models::{BackboneConfig, Batch, Mae, MaeConfig, ObjectiveConfig, ResNetConfig, SimMim, SimMimConfig};
use selfsup_models::{Objective, VitConfig};
use tch::nn::{OptimizerConfig, VarStore};
use tch::{Device, Kind, Tensor};

// Tests here reseed torch's global RNG and rerun forwards expecting the same masks; the test harness runs them
// on parallel threads that share that RNG, so each test holds `common::torch_rng`.
mod common;

const CPU: (Kind, Device) = tch::kind::FLOAT_CPU;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

/// ViT depth 1, width 32, 2 heads, 7 px patches on 28 px: 16 patches.
fn tiny_vit() -> BackboneConfig {
    BackboneConfig::Vit(VitConfig {
        depth: Some(1),
        width: Some(32),
        heads: Some(2),
        patch_size: 7,
        ..Default::default()
    })
}

fn tiny_mae(vs: &VarStore, channels: i64, norm_pix_loss: bool) -> Mae {
    let backbone = tiny_vit().build(vs.root() / "backbone", channels).unwrap();
    let cfg = MaeConfig { decoder_width: 16, decoder_depth: 1, decoder_heads: 2, norm_pix_loss, ..Default::default() };
    Mae::new(&vs.root(), backbone, &cfg).unwrap()
}

fn tiny_simmim(vs: &VarStore, channels: i64) -> SimMim {
    let backbone = tiny_vit().build(vs.root() / "backbone", channels).unwrap();
    SimMim::new(&vs.root(), backbone, &SimMimConfig::default()).unwrap()
}

#[test]
fn random_masking_masks_exactly_and_restores_order() {
    let _rng = common::torch_rng(0);
    // int(L * (1 - r)) truncates, as MAE: 49 * 0.25 = 12.25 → 12; 49 * 0.4 = 19.6 → 19; 16 * 0.4 = 6.4 → 6.
    assert_eq!(keep_count(49, 0.75), 12);
    assert_eq!(keep_count(49, 0.6), 19);
    assert_eq!(keep_count(16, 0.6), 6);
    assert_eq!(keep_count(16, 0.75), 4);
    let (n, l) = (6i64, 49i64);
    for ratio in [0.1, 0.5, 0.6, 0.75, 0.9] {
        let m = random_masking(n, l, ratio, Device::Cpu, &selfsup_models::dist::Dist::alone());
        let k = keep_count(l, ratio);
        assert_eq!(m.ids_keep.size(), vec![n, k]);
        assert_eq!(m.mask.size(), vec![n, l]);
        assert_eq!(m.mask.kind(), Kind::Float);
        let per_row = Vec::<f32>::try_from(m.mask.sum_dim_intlist(1, false, Kind::Float)).unwrap();
        assert!(per_row.iter().all(|&c| c == (l - k) as f32), "ratio {ratio}: {per_row:?}, want {}", l - k);
        // The kept ids are exactly the unmasked positions.
        assert_eq!(m.mask.gather(1, &m.ids_keep, false).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // MAE's decoder round trip: [kept values, placeholders] gathered with ids_restore puts every kept value
        // back at its own position and a placeholder at every masked one.
        let values = Tensor::arange(l, (Kind::Float, Device::Cpu)).expand([n, l], false);
        let kept = values.gather(1, &m.ids_keep, false);
        let filled = Tensor::cat(&[kept, Tensor::full([n, l - k], -1.0, CPU)], 1).gather(1, &m.ids_restore, false);
        let want = values.where_self(&m.mask.eq(0.0), &Tensor::full([n, l], -1.0, CPU));
        assert_eq!(max_abs_diff(&filled, &want), 0.0, "ratio {ratio}");
    }
    // Rows differ; the same seed gives the same masks, another seed others.
    tch::manual_seed(7);
    let a = random_masking(n, l, 0.75, Device::Cpu, &selfsup_models::dist::Dist::alone());
    for i in 1..n {
        assert!(max_abs_diff(&a.mask.get(0), &a.mask.get(i)) > 0.0, "row {i} has row 0's mask");
    }
    tch::manual_seed(7);
    let b = random_masking(n, l, 0.75, Device::Cpu, &selfsup_models::dist::Dist::alone());
    tch::manual_seed(8);
    let c = random_masking(n, l, 0.75, Device::Cpu, &selfsup_models::dist::Dist::alone());
    assert_eq!(max_abs_diff(&a.mask, &b.mask), 0.0);
    assert_eq!(max_abs_diff(&a.ids_restore, &b.ids_restore), 0.0);
    assert!(max_abs_diff(&a.mask, &c.mask) > 0.0);
}

#[test]
fn patchify_uses_maes_pixel_order_and_round_trips() {
    let _rng = common::torch_rng(0);
    // 2 channels, 4x4, patch 2: pixel (c, y, x) = 100c + 10y + x. Patch vectors are ordered (row, col, channel).
    let img: Vec<f32> =
        (0..2).flat_map(|c| (0..4).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32))).collect();
    let img = Tensor::from_slice(&img).view([1, 2, 4, 4]);
    let p = patchify(&img, 2);
    assert_eq!(p.size(), vec![1, 4, 8]);
    let patch = |i: i64| Vec::<f32>::try_from(p.get(0).get(i)).unwrap();
    assert_eq!(patch(0), vec![0., 100., 1., 101., 10., 110., 11., 111.]);
    // Patch 1 is row 0, column 1: x in 2..4.
    assert_eq!(patch(1), vec![2., 102., 3., 103., 12., 112., 13., 113.]);
    // Patch 2 is row 1, column 0: y in 2..4.
    assert_eq!(patch(2), vec![20., 120., 21., 121., 30., 130., 31., 131.]);
    assert_eq!(max_abs_diff(&unpatchify(&p, 2, 2), &img), 0.0);

    for c in [1, 3] {
        let x = Tensor::randn([3, c, 28, 28], CPU);
        let p = patchify(&x, 7);
        assert_eq!(p.size(), vec![3, 16, 49 * c]);
        assert_eq!(max_abs_diff(&unpatchify(&p, 7, c), &x), 0.0, "C = {c}");
    }
}

#[test]
fn masked_losses_have_closed_forms_and_ignore_visible_patches() {
    let _rng = common::torch_rng(0);
    // 1 sample, 3 patches of 2 values; patch 1 visible. pred 0, target [[1,1],[5,5],[2,4]].
    let pred = Tensor::zeros([1, 3, 2], CPU).set_requires_grad(true);
    let target = Tensor::from_slice(&[1f32, 1., 5., 5., 2., 4.]).view([1, 3, 2]);
    let mask = Tensor::from_slice(&[1f32, 0., 1.]).view([1, 3]);
    // MSE per patch: 1, 25, 10; mean over the masked ones (0 and 2): 5.5.
    let mse = masked_mse(&pred, &target, &mask);
    assert!((mse.double_value(&[]) - 5.5).abs() < 1e-6);
    // L1: (1 + 1 + 2 + 4) / (2 masked patches * 2 values) = 2.
    assert!((masked_l1(&pred, &target, &mask).double_value(&[]) - 2.0).abs() < 1e-6);

    tch::manual_seed(0);
    let (n, l, k) = (4, 10, 12);
    let pred = Tensor::randn([n, l, k], CPU).set_requires_grad(true);
    let target = Tensor::randn([n, l, k], CPU);
    let mask = random_masking(n, l, 0.7, Device::Cpu, &selfsup_models::dist::Dist::alone()).mask;
    let visible = (1f64 - &mask).unsqueeze(-1);
    let noise = Tensor::randn([n, l, k], CPU) * 10.0;
    for (name, loss) in [("mse", masked_mse as fn(&Tensor, &Tensor, &Tensor) -> Tensor), ("l1", masked_l1)] {
        let base = loss(&pred, &target, &mask);
        // Changing the targets of visible patches changes nothing; changing masked ones does.
        let same = loss(&pred, &(&target + &noise * &visible), &mask);
        let other = loss(&pred, &(&target + &noise * mask.unsqueeze(-1)), &mask);
        assert!((base.double_value(&[]) - same.double_value(&[])).abs() < 1e-6, "{name}");
        assert!((base.double_value(&[]) - other.double_value(&[])).abs() > 1e-2, "{name}");
        // The gradient reaches every masked prediction and no visible one.
        let g = Tensor::run_backward(&[&base], &[&pred], false, false).pop().unwrap();
        let per_patch = g.abs().sum_dim_intlist(-1, false, Kind::Float);
        assert_eq!((&per_patch * (1f64 - &mask)).sum(Kind::Float).double_value(&[]), 0.0, "{name}");
        let masked_zero = per_patch.eq(0.0).logical_and(&mask.eq(1.0)).any().int64_value(&[]);
        assert_eq!(masked_zero, 0, "{name}: a masked patch got no gradient");
    }
}

#[test]
fn normalize_patches_uses_unbiased_variance_and_eps() {
    let _rng = common::torch_rng(0);
    let p = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([1, 1, 4]);
    // mean 2.5, unbiased var 5/3.
    let s = (5.0f64 / 3.0 + 1e-6).sqrt();
    let want = Tensor::from_slice(&[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]).view([1, 1, 4]);
    assert!(max_abs_diff(&normalize_patches(&p), &want) < 1e-6);
}

#[test]
fn mae_has_models_mae_names_and_needs_a_vit() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let _mae = tiny_mae(&vs, 3, true);
    let vars = vs.variables();
    let mut heads: Vec<&str> = vars.keys().map(String::as_str).filter(|n| !n.starts_with("backbone.")).collect();
    heads.sort();
    let mut want = vec![
        "decoder_embed.weight",
        "decoder_embed.bias",
        "mask_token",
        "decoder_pos_embed",
        "decoder_blocks.0.norm1.weight",
        "decoder_blocks.0.norm1.bias",
        "decoder_blocks.0.attn.qkv.weight",
        "decoder_blocks.0.attn.qkv.bias",
        "decoder_blocks.0.attn.proj.weight",
        "decoder_blocks.0.attn.proj.bias",
        "decoder_blocks.0.norm2.weight",
        "decoder_blocks.0.norm2.bias",
        "decoder_blocks.0.mlp.fc1.weight",
        "decoder_blocks.0.mlp.fc1.bias",
        "decoder_blocks.0.mlp.fc2.weight",
        "decoder_blocks.0.mlp.fc2.bias",
        "decoder_norm.weight",
        "decoder_norm.bias",
        "decoder_pred.weight",
        "decoder_pred.bias",
    ];
    want.sort();
    assert_eq!(heads, want);
    assert_eq!(vars["decoder_embed.weight"].size(), vec![16, 32]);
    assert_eq!(vars["mask_token"].size(), vec![1, 1, 16]);
    assert_eq!(vars["decoder_pos_embed"].size(), vec![1, 17, 16]);
    assert!(!vars["decoder_pos_embed"].requires_grad() && !vars["backbone.pos_embed"].requires_grad());
    assert_eq!(vars["decoder_blocks.0.mlp.fc1.weight"].size(), vec![64, 16]);
    // Predicts 7 * 7 * 3 pixels per patch.
    assert_eq!(vars["decoder_pred.weight"].size(), vec![147, 16]);

    // From the config, with a ResNet: a clear error naming the field.
    let obj: ObjectiveConfig = toml::from_str("kind = \"mae\"\nmask_ratio = 0.5").unwrap();
    assert_eq!(obj.num_views(), 1);
    let resnet = BackboneConfig::Resnet(ResNetConfig { layers: [1, 1, 1, 1], width: 4, ..Default::default() });
    let vs = VarStore::new(Device::Cpu);
    let err = obj.build(&vs, &resnet, 1).err().unwrap().to_string();
    assert!(err.contains("model.backbone.kind") && err.contains("vit"), "{err}");
    let simmim: ObjectiveConfig = toml::from_str("kind = \"simmim\"").unwrap();
    assert_eq!(simmim, ObjectiveConfig::Simmim(SimMimConfig { mask_ratio: 0.6 }));
    assert_eq!(simmim.num_views(), 1);
    let err = simmim.build(&VarStore::new(Device::Cpu), &resnet, 1).err().unwrap().to_string();
    assert!(err.contains("model.backbone.kind"), "{err}");
    // A ratio that hides every one of the 16 patches, and invalid fields.
    let vs = VarStore::new(Device::Cpu);
    let hide_all: ObjectiveConfig = toml::from_str("kind = \"mae\"\nmask_ratio = 0.99").unwrap();
    let err = hide_all.build(&vs, &tiny_vit(), 1).err().unwrap();
    assert!(err.to_string().contains("objective.mask_ratio"), "{err}");
    assert!(toml::from_str::<ObjectiveConfig>("kind = \"mae\"\nmask = 0.5").is_err());
    for (bad, field) in [
        ("kind = \"mae\"\nmask_ratio = 1.0", "objective.mask_ratio"),
        ("kind = \"mae\"\ndecoder_width = 30", "objective.decoder_width"),
        ("kind = \"mae\"\ndecoder_heads = 3", "objective.decoder_heads"),
        ("kind = \"simmim\"\nmask_ratio = 0.0", "objective.mask_ratio"),
    ] {
        let err = toml::from_str::<ObjectiveConfig>(bad).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains(field), "{bad}: {err}");
    }
}

/// Runs `forward` twice from the same seed (so with the same mask): on `x` and on `x` changed only where
/// `which` of the first run's mask says (1 = the masked patches, 0 = the visible ones).
fn rerun_changed(forward: &dyn Fn(&Tensor) -> MaskedForward, x: &Tensor, which: f64) -> (MaskedForward, MaskedForward) {
    tch::manual_seed(11);
    let a = forward(x);
    let sel = a.mask.eq(which).to_kind(Kind::Float).unsqueeze(-1);
    let p = patchify(x, 7);
    let changed = unpatchify(&(&p + Tensor::randn_like(&p) * 3.0 * sel), 7, x.size()[1]);
    tch::manual_seed(11);
    let b = forward(&changed);
    assert_eq!(max_abs_diff(&a.mask, &b.mask), 0.0, "same seed, same mask");
    (a, b)
}

#[test]
fn mae_encoder_and_decoder_never_see_masked_pixels() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let mae = tiny_mae(&vs, 1, true);
    let x = Tensor::randn([4, 1, 28, 28], CPU);
    let fwd = |x: &Tensor| mae.forward(x, true, &selfsup_models::dist::Dist::alone());
    let (a, b) = rerun_changed(&fwd, &x, 1.0);
    // 16 patches at 0.75: 4 visible, 12 masked in every row.
    assert_eq!(a.mask.sum(Kind::Float).double_value(&[]), 4.0 * 12.0);
    assert_eq!(a.pred.size(), vec![4, 16, 49]);
    assert_eq!(a.features.size(), vec![4, 32]);
    assert!(max_abs_diff(&a.pred, &b.pred) < 1e-6, "masked pixels leaked into the prediction");
    assert!(max_abs_diff(&a.features, &b.features) < 1e-6);
    assert!((a.loss.double_value(&[]) - b.loss.double_value(&[])).abs() > 1e-3, "masked targets must count");
    let (a, b) = rerun_changed(&fwd, &x, 0.0);
    assert!(max_abs_diff(&a.pred, &b.pred) > 1e-4, "visible pixels must drive the prediction");

    // The loss is the masked MSE against per-patch normalized targets, and only masked predictions get gradient.
    let want = masked_mse(&a.pred, &normalize_patches(&patchify(&x, 7)), &a.mask);
    assert!((a.loss.double_value(&[]) - want.double_value(&[])).abs() < 1e-6);
    let g = Tensor::run_backward(&[&a.loss], &[&a.pred], false, false).pop().unwrap();
    let per_patch = g.abs().sum_dim_intlist(-1, false, Kind::Float);
    assert_eq!((&per_patch * (1f64 - &a.mask)).sum(Kind::Float).double_value(&[]), 0.0);
    assert!((&per_patch * &a.mask).min().double_value(&[]) >= 0.0);
    assert!(per_patch.eq(0.0).logical_and(&a.mask.eq(1.0)).any().int64_value(&[]) == 0);

    // Without norm_pix_loss the target is the raw pixels.
    let vs = VarStore::new(Device::Cpu);
    let raw = tiny_mae(&vs, 1, false);
    let out = raw.forward(&x, true, &selfsup_models::dist::Dist::alone());
    let want = masked_mse(&out.pred, &patchify(&x, 7), &out.mask);
    assert!((out.loss.double_value(&[]) - want.double_value(&[])).abs() < 1e-6);
}

#[test]
fn simmim_replaces_masked_patches_by_the_mask_token() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let simmim = tiny_simmim(&vs, 3);
    assert_eq!(vs.variables()["mask_token"].size(), vec![1, 1, 32]);
    assert_eq!(vs.variables()["decoder.weight"].size(), vec![147, 32]);
    let x = Tensor::randn([4, 3, 28, 28], CPU);
    let fwd = |x: &Tensor| simmim.forward(x, true, &selfsup_models::dist::Dist::alone());
    let (a, b) = rerun_changed(&fwd, &x, 1.0);
    // 16 patches at 0.6: int(6.4) = 6 visible, 10 masked.
    assert_eq!(a.mask.sum(Kind::Float).double_value(&[]), 4.0 * 10.0);
    assert!(max_abs_diff(&a.pred, &b.pred) < 1e-6, "masked pixels leaked into the prediction");
    assert!((a.loss.double_value(&[]) - b.loss.double_value(&[])).abs() > 1e-3);
    let (a, b) = rerun_changed(&fwd, &x, 0.0);
    assert!(max_abs_diff(&a.pred, &b.pred) > 1e-4);
    let want = masked_l1(&a.pred, &patchify(&x, 7), &a.mask);
    assert!((a.loss.double_value(&[]) - want.double_value(&[])).abs() < 1e-6);
    let g = Tensor::run_backward(&[&a.loss], &[&a.pred], false, false).pop().unwrap();
    let per_patch = g.abs().sum_dim_intlist(-1, false, Kind::Float);
    assert_eq!((&per_patch * (1f64 - &a.mask)).sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn reconstruct_pastes_visible_patches_and_denormalizes_predictions() {
    let _rng = common::torch_rng(0);
    let x = Tensor::randn([3, 1, 28, 28], CPU);
    let vs = VarStore::new(Device::Cpu);
    let mut mae = tiny_mae(&vs, 1, true);
    tch::manual_seed(5);
    let out = tch::no_grad(|| mae.forward(&x, false, &selfsup_models::dist::Dist::alone()));
    tch::manual_seed(5);
    let (masked, rec) = mae.reconstruct(&x).unwrap();
    check_pasted(&x, &masked, &rec, &out.mask);
    // Masked patches: the normalized prediction mapped back with each target patch's mean and √(var + 1e-6).
    let px = patchify(&x, 7);
    let mean = px.mean_dim(-1, true, None::<Kind>);
    let std = (px.var_dim(-1, true, true) + 1e-6).sqrt();
    let m = out.mask.unsqueeze(-1);
    let want = (&out.pred * std + mean) * &m;
    assert!(max_abs_diff(&(patchify(&rec, 7) * &m), &want) < 1e-5);

    let vs = VarStore::new(Device::Cpu);
    let x3 = Tensor::randn([2, 3, 28, 28], CPU);
    let mut simmim = tiny_simmim(&vs, 3);
    tch::manual_seed(5);
    let out = tch::no_grad(|| simmim.forward(&x3, false, &selfsup_models::dist::Dist::alone()));
    tch::manual_seed(5);
    let (masked, rec) = simmim.reconstruct(&x3).unwrap();
    check_pasted(&x3, &masked, &rec, &out.mask);
    let m = out.mask.unsqueeze(-1);
    assert!(max_abs_diff(&(patchify(&rec, 7) * &m), &(&out.pred * &m)) < 1e-6);
}

/// Shapes; visible patches equal `x` in both images; masked patches 0 in the masked input.
fn check_pasted(x: &Tensor, masked: &Tensor, rec: &Tensor, mask: &Tensor) {
    assert_eq!(masked.size(), x.size());
    assert_eq!(rec.size(), x.size());
    assert!(!masked.requires_grad() && !rec.requires_grad());
    let (px, pm, pr) = (patchify(x, 7), patchify(masked, 7), patchify(rec, 7));
    let vis = (1f64 - mask).unsqueeze(-1);
    assert_eq!(max_abs_diff(&(&pm * &vis), &(&px * &vis)), 0.0, "visible patches are the input");
    assert_eq!(max_abs_diff(&(&pr * &vis), &(&px * &vis)), 0.0, "visible patches are pasted back");
    let hidden = (&pm * mask.unsqueeze(-1)).abs().sum(Kind::Float).double_value(&[]);
    assert_eq!(hidden, 0.0, "masked patches are 0 in the masked input");
}

/// Eight 28 px images of smooth stripes (random frequency, direction and phase), `c` channels.
fn stripes(c: i64) -> Tensor {
    let coords = Tensor::arange(28, CPU) / 28.0;
    let (yy, xx) = (coords.view([1, 1, 28, 1]), coords.view([1, 1, 1, 28]));
    let r = |shape: &[i64]| Tensor::rand(shape, CPU);
    let (fy, fx, phase) =
        (r(&[8, c, 1, 1]) * 12.0 - 6.0, r(&[8, c, 1, 1]) * 12.0 - 6.0, r(&[8, c, 1, 1]) * std::f64::consts::TAU);
    (yy * fy + xx * fx + phase).sin()
}

/// Trains `objective` on one fixed batch with Adam for `steps` steps; returns the losses.
fn train(vs: &VarStore, objective: &mut dyn Objective, x: &Tensor, steps: usize) -> Vec<f64> {
    let mut opt = tch::nn::Adam::default().build(vs, 5e-3).unwrap();
    let batch = Batch::new(vec![x.shallow_clone()]);
    (0..steps)
        .map(|_| {
            let step = objective.loss(&batch, true);
            assert!(!step.features.requires_grad());
            opt.backward_step(&step.loss);
            step.loss.double_value(&[])
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn mae_and_simmim_losses_fall_in_60_steps_and_fixed_tables_stay() {
    let _rng = common::torch_rng(0);
    for kind in ["mae", "simmim"] {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let x = stripes(1);
        let mut objective: Box<dyn Objective> = match kind {
            "mae" => Box::new(tiny_mae(&vs, 1, true)),
            _ => Box::new(tiny_simmim(&vs, 1)),
        };
        let before: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let losses = train(&vs, objective.as_mut(), &x, 60);
        assert!(losses.iter().all(|l| l.is_finite()), "{kind}: {losses:?}");
        let last = mean(&losses[55..]);
        assert!(
            last < 0.75 * losses[0],
            "{kind}: loss must fall clearly, from {:.4} to {last:.4}: {losses:?}",
            losses[0]
        );
        // And beat the trivial predictor: every patch's own mean (0 after normalization, scoring (P-1)/P = 48/49
        // under MAE's unbiased normalization) or, for SimMIM's raw pixels, 0 (scoring mean |x|).
        let trivial = if kind == "mae" { 48.0 / 49.0 } else { x.abs().mean(Kind::Float).double_value(&[]) };
        assert!(last < 0.95 * trivial, "{kind}: {last:.4} is no better than the trivial {trivial:.4}");
        let after = vs.variables();
        for (name, t0) in &before {
            let moved = max_abs_diff(&after[name], t0);
            if name.ends_with("pos_embed") {
                assert_eq!(moved, 0.0, "{kind}: fixed table {name} moved");
            } else {
                assert!(moved > 0.0, "{kind}: {name} did not move");
            }
        }
    }
}

#[test]
fn bf16_autocast_keeps_the_loss_fp32_on_cuda() {
    let _rng = common::torch_rng(0);
    if !tch::Cuda::is_available() {
        println!("skipped: bf16 autocast is exercised only on CUDA");
        return;
    }
    assert!(selfsup_models::device::use_bf16_autocast());
    let vs = VarStore::new(Device::Cuda(0));
    let mut mae = tiny_mae(&vs, 1, true);
    let mut simmim = {
        let backbone = tiny_vit().build(vs.root() / "simmim_backbone", 1).unwrap();
        SimMim::new(&(vs.root() / "simmim"), backbone, &SimMimConfig::default()).unwrap()
    };
    let x = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cuda(0)));
    let batch = Batch::new(vec![x.shallow_clone()]);
    for objective in [&mut mae as &mut dyn Objective, &mut simmim] {
        let step = selfsup_models::device::autocast(true, || objective.loss(&batch, true));
        assert_eq!(step.loss.kind(), Kind::Float);
        assert!(step.loss.double_value(&[]).is_finite());
        step.loss.backward();
        let (masked, rec) = selfsup_models::device::autocast(true, || objective.reconstruct(&x).unwrap());
        assert_eq!((masked.kind(), rec.kind()), (Kind::Float, Kind::Float));
        assert_eq!(rec.size(), x.size());
    }
}
