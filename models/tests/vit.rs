//! The ViT backbone: timm names and shapes, parameter count, MAE's sin-cos table and initialisation, the
//! attention block against an explicit per-head computation, token-level helpers, layer ids for layer-wise lr
//! decay, and config parsing / validation; multi-crop inputs (the position table resampled bicubically, against
//! PyTorch) and stochastic depth.

use selfsup_models::backbone::{drop_path, resample_pos_embed, sincos_2d, Block};
use selfsup_models::{Backbone, BackboneConfig, PosEmbed, ResNetConfig, Vit, VitConfig, VitPool, VitSize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

// Torch's RNG is global and the init, drop-path and "same seed" checks here need fixed draws: every test of this
// binary that draws from it (building a ViT included) holds `common::torch_rng`.
mod common;

fn small(depth: i64, width: i64, heads: i64, patch: i64) -> VitConfig {
    VitConfig { depth: Some(depth), width: Some(width), heads: Some(heads), patch_size: patch, ..Default::default() }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

#[test]
fn vit_depth2_has_exactly_timms_names_and_shapes() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let cfg = small(2, 32, 2, 7);
    let net = BackboneConfig::Vit(cfg).build(vs.root(), 3).unwrap();
    let vars = vs.variables();
    let mut names: Vec<&str> = vars.keys().map(String::as_str).collect();
    names.sort();
    let mut want = vec![
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "blocks.0.norm1.weight",
        "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.norm2.weight",
        "blocks.0.norm2.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc2.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.1.norm1.weight",
        "blocks.1.norm1.bias",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.qkv.bias",
        "blocks.1.attn.proj.weight",
        "blocks.1.attn.proj.bias",
        "blocks.1.norm2.weight",
        "blocks.1.norm2.bias",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc1.bias",
        "blocks.1.mlp.fc2.weight",
        "blocks.1.mlp.fc2.bias",
        "norm.weight",
        "norm.bias",
    ];
    want.sort();
    assert_eq!(names, want);
    let shape = |n: &str| vars[n].size();
    // 28 px / patch 7 = 4x4 = 16 patches, plus the cls position.
    assert_eq!(shape("cls_token"), vec![1, 1, 32]);
    assert_eq!(shape("pos_embed"), vec![1, 17, 32]);
    assert_eq!(shape("patch_embed.proj.weight"), vec![32, 3, 7, 7]);
    assert_eq!(shape("patch_embed.proj.bias"), vec![32]);
    assert_eq!(shape("blocks.1.attn.qkv.weight"), vec![96, 32]);
    assert_eq!(shape("blocks.1.attn.qkv.bias"), vec![96]);
    assert_eq!(shape("blocks.0.attn.proj.weight"), vec![32, 32]);
    assert_eq!(shape("blocks.0.mlp.fc1.weight"), vec![128, 32]);
    assert_eq!(shape("blocks.0.mlp.fc2.weight"), vec![32, 128]);
    assert_eq!(shape("norm.weight"), vec![32]);

    assert_eq!(net.dim(), 32);
    let vit = net.as_vit().expect("a ViT exposes its tokens");
    assert_eq!((vit.patch_size(), vit.grid(), vit.num_patches(), vit.width(), vit.in_channels()), (7, 4, 16, 32, 3));
    let x = Tensor::randn([2, 3, 28, 28], tch::kind::FLOAT_CPU);
    assert_eq!(vit.patch_tokens(&x).size(), vec![2, 16, 32]);
    assert_eq!(net.features(&x, false).size(), vec![2, 32]);
    assert!(net.features(&x, false).isfinite().all().int64_value(&[]) == 1);
}

#[test]
fn vit_tiny_parameter_count_matches_hand_computation() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let cfg = VitConfig { size: VitSize::Tiny, image_size: 28, patch_size: 4, ..Default::default() };
    assert_eq!((cfg.depth(), cfg.width(), cfg.heads()), (12, 192, 3));
    let _net = Vit::new(vs.root(), &cfg, 1);
    // D = 192, 7x7 = 49 patches of 4x4x1 pixels, MLP 4D = 768.
    //   patch_embed: 192*1*4*4 + 192                    =     3_264
    //   cls_token:   192                                 =       192
    //   one block:   norm1 2*192                         =       384
    //                qkv  192*576 + 576                  =   111_168
    //                proj 192*192 + 192                  =    37_056
    //                norm2 2*192                         =       384
    //                fc1  192*768 + 768                  =   148_224
    //                fc2  768*192 + 192                  =   147_648
    //                                                    =   444_864, x12 = 5_338_368
    //   norm:        2*192                               =       384
    //   trainable: 3_264 + 192 + 5_338_368 + 384         = 5_342_208
    //   pos_embed (fixed sin-cos): (1 + 49) * 192        =     9_600 → 5_351_808 stored.
    // (timm's vit_tiny_patch16_224 has 5,717,416 = the same blocks/cls/norm 5,338,944 + patch_embed 147,648
    // + pos_embed 37,824 + head 193,000.)
    let trainable: i64 = vs.trainable_variables().iter().map(|t| t.numel() as i64).sum();
    let all: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(trainable, 5_342_208);
    assert_eq!(all, 5_351_808);
}

#[test]
fn sincos_table_matches_maes_formula_by_hand() {
    // dim 8: each coordinate gets 4 values, ω = [1, 10000^(-1/2)] = [1, 0.01]; grid 3, patch (row i, col j) at
    // index 3i + j; the first half encodes the column j, the second the row i (MAE's meshgrid(w, h) order).
    let t = sincos_2d(8, 3);
    assert_eq!(t.size(), vec![9, 8]);
    assert_eq!(t.kind(), Kind::Float);
    let row = |k: i64| Vec::<f32>::try_from(t.get(k)).unwrap();
    let close = |got: Vec<f32>, want: [f64; 8]| {
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "got {got:?}, want {want:?}");
        }
    };
    close(row(0), [0., 0., 1., 1., 0., 0., 1., 1.]);
    // i = 1, j = 2 → index 5.
    let (s, c) = (f64::sin, f64::cos);
    close(row(5), [s(2.), s(0.02), c(2.), c(0.02), s(1.), s(0.01), c(1.), c(0.01)]);
    // i = 2, j = 0 → index 6.
    close(row(6), [0., 0., 1., 1., s(2.), s(0.02), c(2.), c(0.02)]);
    // dim 16: ω = [1, 0.1, 0.01, 0.001]; patch i = 0, j = 1 → index 1, entry 1 is sin(0.1), entry 7 cos(0.001).
    let t = sincos_2d(16, 2);
    assert!((t.double_value(&[1, 1]) - 0.1f64.sin()).abs() < 1e-7);
    assert!((t.double_value(&[1, 7]) - 0.001f64.cos()).abs() < 1e-7);
    assert!((t.double_value(&[2, 9]) - 0.1f64.sin()).abs() < 1e-7, "index 2 is row 1: second half");
}

#[test]
fn sincos_pos_embed_is_fixed_and_learned_one_trains() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let _ = Vit::new(vs.root() / "fixed", &small(1, 16, 2, 7), 1);
    let learned = VitConfig { pos_embed: PosEmbed::Learned, ..small(1, 16, 2, 7) };
    let _ = Vit::new(vs.root() / "learned", &learned, 1);
    let vars = vs.variables();
    let fixed = &vars["fixed.pos_embed"];
    assert!(!fixed.requires_grad(), "sin-cos table must not be trained");
    assert!(vars["learned.pos_embed"].requires_grad());
    let trainable = vs.trainable_variables();
    assert!(!trainable.iter().any(|t| t.data_ptr() == fixed.data_ptr()), "fixed table is not handed to optimizers");
    // Row 0 (cls) is zero, rows 1.. are the table.
    assert_eq!(max_abs_diff(&fixed.get(0).get(0), &Tensor::zeros([16], tch::kind::FLOAT_CPU)), 0.0);
    assert_eq!(max_abs_diff(&fixed.get(0).narrow(0, 1, 16), &sincos_2d(16, 4)), 0.0);
    let std = vars["learned.pos_embed"].std(true).double_value(&[]);
    assert!((0.015..0.025).contains(&std), "learned pos_embed ~ N(0, 0.02): std {std}");
}

#[test]
fn init_follows_mae() {
    let _rng = common::torch_rng(1);
    let vs = VarStore::new(Device::Cpu);
    let _ = Vit::new(vs.root(), &small(1, 64, 4, 4), 3);
    let vars = vs.variables();
    let abs_max = |n: &str| vars[n].abs().max().double_value(&[]);
    // xavier_uniform: bound √(6 / (fan_in + fan_out)); the sample max of thousands of draws is close to it.
    for (name, fan_in, fan_out) in [
        ("blocks.0.attn.qkv.weight", 64, 192),
        ("blocks.0.mlp.fc1.weight", 64, 256),
        ("patch_embed.proj.weight", 3 * 4 * 4, 64),
    ] {
        let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
        let m = abs_max(name);
        assert!(m <= bound && m > 0.95 * bound, "{name}: max |w| {m}, xavier bound {bound}");
    }
    for name in ["blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc2.bias", "norm.bias"] {
        assert_eq!(abs_max(name), 0.0, "{name} starts at 0");
    }
    assert_eq!(max_abs_diff(&vars["blocks.0.norm1.weight"], &Tensor::ones([64], tch::kind::FLOAT_CPU)), 0.0);
    let std = vars["cls_token"].std(true).double_value(&[]);
    assert!((0.01..0.03).contains(&std), "cls_token ~ N(0, 0.02): std {std}");
}

#[test]
fn block_matches_explicit_per_head_attention() {
    let _rng = common::torch_rng(2);
    let vs = VarStore::new(Device::Cpu);
    let (dim, heads, hd) = (12i64, 3i64, 4i64);
    let block = Block::new(vs.root() / "b", dim, heads, 2.0);
    // Non-trivial norms and biases so that every parameter matters.
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            t.copy_(&(Tensor::randn_like(&t) * 0.3 + 0.1));
        }
    });
    let v = vs.variables();
    let w = |n: &str| v[&format!("b.{n}")].shallow_clone();
    let x = Tensor::randn([2, 5, dim], tch::kind::FLOAT_CPU);
    let ln = |x: &Tensor, n: &str| {
        let mean = x.mean_dim(-1, true, None::<Kind>);
        let var = x.var_dim(-1, false, true);
        (x - mean) / (var + 1e-6).sqrt() * w(&format!("{n}.weight")) + w(&format!("{n}.bias"))
    };
    let lin = |x: &Tensor, n: &str| x.matmul(&w(&format!("{n}.weight")).tr()) + w(&format!("{n}.bias"));
    let qkv = lin(&ln(&x, "norm1"), "attn.qkv");
    // timm's layout: [q | k | v] along the features, each split into heads of hd consecutive features.
    let mut outs = Vec::new();
    for h in 0..heads {
        let q = qkv.narrow(2, h * hd, hd);
        let k = qkv.narrow(2, dim + h * hd, hd);
        let val = qkv.narrow(2, 2 * dim + h * hd, hd);
        let att = (q.matmul(&k.transpose(1, 2)) / (hd as f64).sqrt()).softmax(-1, Kind::Float);
        outs.push(att.matmul(&val));
    }
    let x1 = &x + lin(&Tensor::cat(&outs, 2), "attn.proj");
    let h = lin(&ln(&x1, "norm2"), "mlp.fc1");
    let gelu = &h * 0.5 * (1.0 + (&h / 2f64.sqrt()).erf());
    let want = &x1 + lin(&gelu, "mlp.fc2");
    let got = block.forward(&x, true);
    assert!(max_abs_diff(&got, &want) < 1e-5, "{}", max_abs_diff(&got, &want));
}

#[test]
fn token_helpers_compose_into_features() {
    let _rng = common::torch_rng(3);
    let vs = VarStore::new(Device::Cpu);
    let learned = VitConfig { pos_embed: PosEmbed::Learned, ..small(1, 16, 2, 7) };
    let vit = Vit::new(vs.root(), &learned, 1);
    let x = Tensor::randn([3, 1, 28, 28], tch::kind::FLOAT_CPU);
    let tokens = vit.patch_tokens(&x);
    // Patch 5 (row 1, col 1) is the conv of pixels [7..14, 7..14].
    let w = vs.variables()["patch_embed.proj.weight"].shallow_clone();
    let b = vs.variables()["patch_embed.proj.bias"].shallow_clone();
    let patch = x.narrow(2, 7, 7).narrow(3, 7, 7);
    let want = (patch * w.squeeze_dim(1).unsqueeze(0)).sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Float) + &b;
    assert!(max_abs_diff(&tokens.select(1, 5), &want) < 1e-5);
    // add_pos_at on a gathered subset equals gathering after add_pos.
    let ids = Tensor::from_slice(&[3i64, 0, 15, 7, 7, 1, 2, 9, 4]).view([3, 3]);
    let idx = ids.unsqueeze(-1).expand([3, 3, 16], false);
    let at = vit.add_pos_at(&tokens.gather(1, &idx, false), &ids);
    assert!(max_abs_diff(&at, &vit.add_pos(&tokens).gather(1, &idx, false)) < 1e-6);
    // Mean pooling averages the patch tokens after the final norm; features = pool(encode(add_pos(tokens))).
    let encoded = vit.encode(&vit.add_pos(&tokens), false);
    assert_eq!(encoded.size(), vec![3, 17, 16]);
    let mean = encoded.narrow(1, 1, 16).mean_dim(1, false, None::<Kind>);
    assert!(max_abs_diff(&vit.features(&x, false), &mean) < 1e-6);
    let vs2 = VarStore::new(Device::Cpu);
    let cls = Vit::new(vs2.root(), &VitConfig { pool: VitPool::Cls, ..small(1, 16, 2, 7) }, 1);
    let enc = cls.encode(&cls.add_pos(&cls.patch_tokens(&x)), false);
    assert!(max_abs_diff(&cls.features(&x, false), &enc.select(1, 0)) < 1e-6);
}

#[test]
fn layer_ids_follow_the_beit_convention() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let vit = BackboneConfig::Vit(small(2, 16, 2, 7)).build(vs.root(), 1).unwrap();
    assert_eq!(vit.num_layers(), 3);
    for (name, id) in [
        ("cls_token", 0),
        ("pos_embed", 0),
        ("patch_embed.proj.weight", 0),
        ("blocks.0.norm1.weight", 1),
        ("blocks.1.mlp.fc1.weight", 2),
        ("norm.weight", 3),
        ("norm.bias", 3),
    ] {
        assert_eq!(vit.layer_id(name), id, "{name}");
    }
    for name in vs.variables().keys() {
        assert!(vit.layer_id(name) <= vit.num_layers(), "{name}");
    }
    assert!(vit.no_weight_decay("cls_token") && vit.no_weight_decay("pos_embed"));
    assert!(!vit.no_weight_decay("blocks.0.attn.qkv.weight") && !vit.no_weight_decay("norm.weight"));

    let vs = VarStore::new(Device::Cpu);
    let resnet = BackboneConfig::Resnet(ResNetConfig { layers: [1, 1, 1, 1], width: 4, ..Default::default() })
        .build(vs.root(), 1)
        .unwrap();
    assert_eq!(resnet.num_layers(), 5);
    assert!(resnet.as_vit().is_none());
    for (name, id) in [
        ("conv1.weight", 0),
        ("bn1.running_mean", 0),
        ("layer1.0.conv1.weight", 1),
        ("layer3.0.conv1.weight", 3),
        ("layer4.0.downsample.1.bias", 4),
    ] {
        assert_eq!(resnet.layer_id(name), id, "{name}");
    }
    assert!(!resnet.no_weight_decay("conv1.weight"));
}

#[test]
fn vit_config_parses_and_validates_naming_the_field() {
    let cfg: BackboneConfig =
        toml::from_str("kind = \"vit\"\nsize = \"small\"\npatch_size = 7\npool = \"cls\"").unwrap();
    let BackboneConfig::Vit(v) = &cfg else { panic!("{cfg:?}") };
    assert_eq!((v.depth(), v.width(), v.heads(), v.image_size, v.patch_size), (12, 384, 6, 28, 7));
    assert_eq!((v.pool, v.pos_embed), (VitPool::Cls, PosEmbed::Sincos));
    let base: BackboneConfig = toml::from_str("kind = \"vit\"\nsize = \"base\"\ndepth = 4").unwrap();
    let BackboneConfig::Vit(b) = &base else { panic!() };
    assert_eq!((b.depth(), b.width(), b.heads()), (4, 768, 12));
    // The resolved config round-trips (unset overrides stay unset).
    let text = toml::to_string(&cfg).unwrap();
    assert_eq!(toml::from_str::<BackboneConfig>(&text).unwrap(), cfg);
    assert!(toml::from_str::<BackboneConfig>("kind = \"vit\"\npatch = 4").is_err(), "unknown fields are errors");
    assert!(toml::from_str::<BackboneConfig>("kind = \"vit\"\npos_embed = \"rope\"").is_err());

    let err = |c: VitConfig| BackboneConfig::Vit(c).validate().unwrap_err().to_string();
    assert!(err(VitConfig { patch_size: 5, ..Default::default() }).contains("model.backbone.patch_size"));
    assert!(err(VitConfig { heads: Some(5), ..Default::default() }).contains("model.backbone.heads"));
    assert!(err(VitConfig { depth: Some(0), ..Default::default() }).contains("model.backbone.depth"));
    assert!(err(VitConfig { width: Some(18), heads: Some(3), ..Default::default() }).contains("model.backbone.width"));
    assert!(err(VitConfig { mlp_ratio: 0.0, ..Default::default() }).contains("model.backbone.mlp_ratio"));
    assert!(err(VitConfig { image_size: 0, ..Default::default() }).contains("model.backbone.image_size"));
    // Learned positions do not need a width divisible by 4.
    let odd = VitConfig { width: Some(18), heads: Some(3), pos_embed: PosEmbed::Learned, ..Default::default() };
    assert!(BackboneConfig::Vit(odd).validate().is_ok());
}

// ---- Multi-crop inputs: the position table resampled to other patch grids (DINO / timm) ----

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// Depth 2, width 32, 2 heads, 4 px patches on 28 px: a 7x7 native grid.
fn multi_crop_vit(drop_path: f64) -> VitConfig {
    VitConfig { drop_path, ..small(2, 32, 2, 4) }
}

#[test]
fn pos_embed_resampling_matches_pytorch_bicubic() {
    let _rng = common::torch_rng(0);
    // scripts/reference/vit_pos_interp_reference.py: a random [1, 1 + 7*7, 8] table resampled by
    // F.interpolate(mode="bicubic", align_corners=False, size=(h, w)) to 3x3, 5x7, 14x14, 2x9 (and 7x7).
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vit_pos_interp_reference.json"))
            .unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (grid, dim) = (r["grid"].as_i64().unwrap(), r["dim"].as_i64().unwrap());
    let table = Tensor::from_slice(&floats(&r["pos_embed"])).view([1, 1 + grid * grid, dim]);
    let vs = VarStore::new(Device::Cpu);
    let cfg = VitConfig { pos_embed: PosEmbed::Learned, ..small(1, dim, 2, 28 / grid) };
    let vit = Vit::new(vs.root(), &cfg, 1);
    let mut pos = vs.variables()["pos_embed"].shallow_clone();
    tch::no_grad(|| pos.copy_(&table));
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    let mut worst = 0f64;
    for case in cases {
        let (h, w) = (case["h"].as_i64().unwrap(), case["w"].as_i64().unwrap());
        let want = Tensor::from_slice(&floats(&case["pos_embed"])).view([1, 1 + h * w, dim]);
        let got = vit.pos_for(h, w);
        assert_eq!(got.size(), vec![1, h * w, dim]);
        let err = max_abs_diff(&got, &want.narrow(1, 1, h * w));
        // The free function is the same resampling; the cls row is never resampled.
        let free = resample_pos_embed(&table.narrow(1, 1, grid * grid), (grid, grid), (h, w));
        assert!(max_abs_diff(&free, &want.narrow(1, 1, h * w)) < 1e-5, "{h}x{w}");
        assert_eq!(max_abs_diff(&want.narrow(1, 0, 1), &table.narrow(1, 0, 1)), 0.0);
        println!("pos_for({h}, {w}) vs PyTorch: max |diff| {err:.3e}");
        assert!(err < 1e-5, "pos_for({h}, {w}): max |diff| {err} vs PyTorch");
        worst = worst.max(err);
    }
    println!("worst max |diff| over all sizes: {worst:.3e}");
    // The native grid is the stored table itself: bit-identical, no copy.
    let native = vit.pos_for(grid, grid);
    assert_eq!(max_abs_diff(&native, &table.narrow(1, 1, grid * grid)), 0.0);
    assert_eq!(native.data_ptr(), pos.narrow(1, 1, grid * grid).data_ptr());
    // Resampling keeps the graph, so a learned table trains from local crops too.
    vit.pos_for(3, 3).sum(Kind::Float).backward();
    let grad = pos.grad();
    assert!(grad.narrow(1, 1, grid * grid).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert_eq!(grad.narrow(1, 0, 1).abs().sum(Kind::Float).double_value(&[]), 0.0, "the cls row is not resampled");
}

#[test]
fn vit_takes_multi_crop_and_non_square_inputs() {
    let _rng = common::torch_rng(4);
    let vs = VarStore::new(Device::Cpu);
    let cfg = multi_crop_vit(0.0);
    let vit = Vit::new(vs.root(), &cfg, 3);
    let global = Tensor::randn([2, 3, 28, 28], tch::kind::FLOAT_CPU);
    let local = Tensor::randn([6, 3, 12, 12], tch::kind::FLOAT_CPU);
    let wide = Tensor::randn([2, 3, 16, 20], tch::kind::FLOAT_CPU);
    assert_eq!((vit.grid_of(&global), vit.grid_of(&local), vit.grid_of(&wide)), ((7, 7), (3, 3), (4, 5)));
    assert_eq!(vit.patch_tokens(&local).size(), vec![6, 9, 32]);
    assert_eq!(vit.patch_tokens(&wide).size(), vec![2, 20, 32]);
    for (x, n) in [(&global, 2), (&local, 6), (&wide, 2)] {
        let f = vit.features(x, false);
        assert_eq!(f.size(), vec![n, 32]);
        assert!(f.isfinite().all().int64_value(&[]) == 1);
    }
    // The native size takes the MAE path bit for bit.
    let old = vit.pool(&vit.encode(&vit.add_pos(&vit.patch_tokens(&global)), false));
    assert_eq!(max_abs_diff(&vit.features(&global, false), &old), 0.0);
    // 16x20 is 4 rows of 5 patches: the table is resampled to (4, 5), not (5, 4).
    let native = vs.variables()["pos_embed"].narrow(1, 1, 49);
    let tokens = vit.patch_tokens(&wide) + resample_pos_embed(&native, (7, 7), (4, 5));
    let want = vit.pool(&vit.encode(&tokens, false));
    assert!(max_abs_diff(&vit.features(&wide, false), &want) < 1e-6);
    let swapped = vit.patch_tokens(&wide) + resample_pos_embed(&native, (7, 7), (5, 4));
    assert!(max_abs_diff(&vit.features(&wide, false), &vit.pool(&vit.encode(&swapped, false))) > 1e-3);
    // add_pos_at_grid on a gathered subset equals gathering after add_pos_grid (iBOT-style masking on a 3x3 crop).
    let t = vit.patch_tokens(&local);
    let ids = Tensor::from_slice(&[8i64, 0, 4, 1, 1, 7]).view([6, 1]);
    let idx = ids.unsqueeze(-1).expand([6, 1, 32], false);
    let at = vit.add_pos_at_grid(&t.gather(1, &idx, false), &ids, 3, 3);
    assert!(max_abs_diff(&at, &vit.add_pos_grid(&t, 3, 3).gather(1, &idx, false)) < 1e-6);

    // Config-time check: a clear error naming the patch size instead of a panic mid-training.
    for (c, h, w) in [(3, 28, 28), (3, 12, 12), (3, 16, 20), (1, 4, 4)] {
        assert!(cfg.check_input(c, h, w).is_ok(), "{c}x{h}x{w}");
    }
    let msg = cfg.check_input(3, 30, 30).unwrap_err().to_string();
    assert!(msg.contains("model.backbone.patch_size") && msg.contains("30x30") && msg.contains(" 4"), "{msg}");
    assert!(cfg.check_input(3, 28, 30).is_err());
    assert!(cfg.check_input(3, 0, 28).is_err(), "an empty image is not a multiple");
    assert!(cfg.check_input(0, 28, 28).is_err());
    let backbone = BackboneConfig::Vit(cfg.clone());
    assert!(backbone.check_input(3, 12, 12).is_ok());
    assert!(backbone.check_input(3, 30, 30).unwrap_err().to_string().contains("model.backbone.patch_size"));
    let resnet = BackboneConfig::Resnet(ResNetConfig::default());
    assert!(resnet.check_input(3, 30, 30).is_ok() && resnet.check_input(1, 1, 1).is_ok());
    assert!(resnet.check_input(3, 0, 30).is_err());
}

#[test]
#[should_panic(expected = "multiples of the patch size 4, got [2, 3, 30, 30]")]
fn patch_tokens_panics_on_sizes_not_a_multiple_of_the_patch() {
    let _rng = common::torch_rng(0);
    let vs = VarStore::new(Device::Cpu);
    let vit = Vit::new(vs.root(), &multi_crop_vit(0.0), 3);
    let _ = vit.patch_tokens(&Tensor::zeros([2, 3, 30, 30], tch::kind::FLOAT_CPU));
}

// ---- Stochastic depth ----

#[test]
fn drop_path_zeroes_or_rescales_whole_samples_and_is_unbiased() {
    let _rng = common::torch_rng(5);
    let (n, rate) = (4000i64, 0.25);
    let x = Tensor::randn([n, 3, 5], tch::kind::FLOAT_CPU) + 0.5;
    // Off in eval mode and at rate 0: x itself.
    assert_eq!(max_abs_diff(&drop_path(&x, rate, false), &x), 0.0);
    assert_eq!(max_abs_diff(&drop_path(&x, 0.0, true), &x), 0.0);
    let y = drop_path(&x, rate, true);
    assert_eq!(y.size(), x.size());
    // Every sample is either all zero or all x / keep, never a mix.
    let zero = y.abs().flatten(1, -1).max_dim(1, false).0.eq(0.0);
    let scaled = (&y - &x / (1.0 - rate)).abs().flatten(1, -1).max_dim(1, false).0.le(1e-6);
    let both = zero.logical_or(&scaled).all().int64_value(&[]);
    assert_eq!(both, 1, "some sample is neither dropped nor kept whole");
    let kept = scaled.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
    // Binomial(4000, 0.75): std 0.0068, so ±0.035 is five sigma.
    assert!((kept - 0.75).abs() < 0.035, "kept fraction {kept}");
    // A second draw is another mask; the same seed the same mask (torch's global RNG).
    assert!(max_abs_diff(&drop_path(&x, rate, true), &y) > 0.0);
    tch::manual_seed(6);
    let a = drop_path(&x, rate, true);
    tch::manual_seed(6);
    assert_eq!(max_abs_diff(&drop_path(&x, rate, true), &a), 0.0);
    // Unbiased: the mean over 200k samples of drop_path(1) is 1 (std of the mean 0.0015, tolerance 0.01).
    let ones = Tensor::ones([200_000, 2], tch::kind::FLOAT_CPU);
    let mean = drop_path(&ones, 0.3, true).mean(Kind::Double).double_value(&[]);
    assert!((mean - 1.0).abs() < 0.01, "E[drop_path(1)] = {mean}");
}

#[test]
fn block_drop_path_drops_each_residual_branch_per_sample() {
    let _rng = common::torch_rng(7);
    let vs = VarStore::new(Device::Cpu);
    let (rate, keep) = (0.5, 0.5);
    let block = Block::new(vs.root() / "b", 12, 3, 2.0).with_drop_path(rate);
    assert_eq!(block.drop_path_rate(), rate);
    let x = Tensor::randn([64, 5, 12], tch::kind::FLOAT_CPU);
    // Eval: both branches in full, exactly as a block without drop-path.
    let a = block.attn_branch(&x);
    let full = &x + &a;
    let full = &full + block.mlp_branch(&full);
    assert_eq!(max_abs_diff(&block.forward(&x, false), &full), 0.0);
    // Train: each sample gets one of the four (attention kept?, MLP kept?) combinations, kept branches scaled
    // by 1 / keep; all four occur among 64 samples (each misses with probability 0.75^64 ≈ 1e-8).
    let y = block.forward(&x, true);
    let mut seen = [0usize; 4];
    for s in 0..64 {
        let (xs, ys, as_) = (x.narrow(0, s, 1), y.narrow(0, s, 1), a.narrow(0, s, 1));
        let mut matched = None;
        for combo in 0..4 {
            let (ka, km) = ((combo & 1) as f64, (combo >> 1) as f64);
            let y1 = &xs + &as_ * (ka / keep);
            let want = &y1 + block.mlp_branch(&y1) * (km / keep);
            if max_abs_diff(&ys, &want) < 1e-5 {
                matched = Some(combo);
            }
        }
        seen[matched.unwrap_or_else(|| panic!("sample {s} matches no drop-path combination"))] += 1;
    }
    assert!(seen.iter().all(|&c| c > 0), "combinations seen {seen:?}");
}

#[test]
fn vit_drop_path_rates_rise_linearly_and_act_only_in_training() {
    let _rng = common::torch_rng(0);
    let cfg = VitConfig { drop_path: 0.2, ..small(5, 16, 2, 7) };
    let vs = VarStore::new(Device::Cpu);
    let rates = Vit::new(vs.root(), &cfg, 1).drop_path_rates();
    assert_eq!(rates.len(), 5);
    for (got, want) in rates.iter().zip([0.0, 0.05, 0.1, 0.15, 0.2]) {
        assert!((got - want).abs() < 1e-12, "{rates:?}");
    }
    assert_eq!(VitConfig { drop_path: 0.3, ..small(1, 16, 2, 7) }.drop_path_rates(), vec![0.0]);
    assert_eq!(small(3, 16, 2, 7).drop_path_rates(), vec![0.0; 3], "off by default");

    // Same seed, same weights: drop-path adds no parameters and draws nothing at init. (Deterministic because this
    // test holds the binary's RNG lock: no other test draws between the two builds, nor between the passes below.)
    let build = |drop_path: f64| {
        tch::manual_seed(8);
        let vs = VarStore::new(Device::Cpu);
        let vit = Vit::new(vs.root(), &multi_crop_vit(drop_path), 3);
        (vs, vit)
    };
    let ((a, plain), (b, dropped)) = (build(0.0), build(0.5));
    let (wa, wb) = (a.variables(), b.variables());
    assert_eq!(wa.len(), wb.len(), "drop_path adds no parameters");
    for (name, t) in &wa {
        assert!(t.equal(&wb[name]), "{name}: drop_path changed the seeded init");
    }
    let x = Tensor::randn([8, 3, 28, 28], tch::kind::FLOAT_CPU);
    let local = Tensor::randn([8, 3, 12, 12], tch::kind::FLOAT_CPU);
    for input in [&x, &local] {
        let eval = plain.features(input, false);
        assert_eq!(max_abs_diff(&dropped.features(input, false), &eval), 0.0, "eval ignores drop_path");
        assert_eq!(max_abs_diff(&plain.features(input, true), &eval), 0.0, "rate 0 trains as today");
        let (t1, t2) = (dropped.features(input, true), dropped.features(input, true));
        assert!(max_abs_diff(&t1, &t2) > 1e-4, "two training passes draw different paths");
        assert!(max_abs_diff(&t1, &eval) > 1e-4);
    }

    // Config: serde default 0, validated in [0, 1).
    let parsed: BackboneConfig = toml::from_str("kind = \"vit\"\ndrop_path = 0.1").unwrap();
    assert_eq!(parsed, BackboneConfig::Vit(VitConfig { drop_path: 0.1, ..Default::default() }));
    assert_eq!(VitConfig::default().drop_path, 0.0);
    assert!(BackboneConfig::Vit(VitConfig { drop_path: 0.99, ..Default::default() }).validate().is_ok());
    for bad in [1.0, -0.1, f64::NAN] {
        let err = BackboneConfig::Vit(VitConfig { drop_path: bad, ..Default::default() }).validate().unwrap_err();
        assert!(err.to_string().contains("model.backbone.drop_path"), "{bad}: {err}");
    }
}
