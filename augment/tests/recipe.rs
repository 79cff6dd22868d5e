//! Whole recipes: SimCLR on gray and RGB, output shape and value lattice, determinism,
//! p = 0 identity, multi-view, config parsing and validation messages.

mod common;

use std::time::Instant;

use common::{gradient_rgb, noise};
use selfsup_augment::{Image, Normalize, Pipeline, RecipeConfig, Rng, Views};

/// Every output value must be `(v / 255 - mean) / std` for an integer v in 0..=255.
fn assert_on_lattice(out: &[f32], mean: f32, std: f32) {
    for &x in out {
        assert!(x.is_finite());
        let v = (x * std + mean) * 255.0;
        assert!((-1e-3..=255.001).contains(&v), "value {x} maps to {v}");
        assert!((v - v.round()).abs() < 2e-3, "value {x} maps to non-integer {v}");
    }
}

fn run(p: &Pipeline, src: &Image, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; p.out_len()];
    p.run(src, &mut Rng::for_sample(seed, 0, 0), &mut out);
    out
}

#[test]
fn simclr_gray_and_rgb_shapes_ranges_and_determinism() {
    let cases = [(28u32, 1u8, 28u32, 28u32), (32, 3, 40, 30), (96, 3, 120, 100), (24, 3, 17, 64)];
    for (size, c, w, h) in cases {
        let pipe = RecipeConfig::simclr(size, c).build(c).unwrap();
        assert_eq!(pipe.out_shape(), [c as usize, size as usize, size as usize]);
        assert_eq!(pipe.out_len(), (c as u32 * size * size) as usize);
        let src = if c == 1 { noise(w, h, 1, 1) } else { gradient_rgb(w, h) };
        let mut distinct = std::collections::HashSet::new();
        for seed in 0..30 {
            let a = run(&pipe, &src, seed);
            assert_on_lattice(&a, 0.5, 0.5);
            assert_eq!(a, run(&pipe, &src, seed), "same seed must give the same view");
            distinct.insert(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
        assert!(distinct.len() >= 29, "different seeds must give different views");
    }
}

#[test]
fn all_probabilities_zero_full_crop_is_identity() {
    for c in [1u8, 3] {
        let cfg = RecipeConfig {
            size: 28,
            crop_scale: (1.0, 1.0),
            crop_ratio: (1.0, 1.0),
            flip_p: 0.0,
            jitter: selfsup_augment::JitterConfig { p: 0.0, ..Default::default() },
            grayscale_p: 0.0,
            blur: selfsup_augment::BlurConfig { p: 0.0, ..Default::default() },
            solarize_p: 0.0,
            equalize_p: 0.0,
            mean: vec![],
            std: vec![],
        };
        let pipe = cfg.build(c).unwrap();
        let src = noise(28, 28, c, 2);
        let mut want = vec![0f32; pipe.out_len()];
        Normalize::new(vec![0.5; c as usize], vec![0.5; c as usize]).unwrap().write_chw(&src, &mut want);
        for seed in 0..10 {
            assert_eq!(run(&pipe, &src, seed), want);
            assert_eq!(pipe.run_image(&src, &mut Rng::new(seed)), src);
        }
    }
}

#[test]
fn run_image_matches_run_and_custom_stats_apply() {
    let cfg = RecipeConfig {
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
        solarize_p: 0.3,
        equalize_p: 0.3,
        blur: selfsup_augment::BlurConfig { p: 0.5, ..Default::default() },
        ..RecipeConfig::simclr(48, 3)
    };
    let pipe = cfg.build(3).unwrap();
    let src = noise(64, 64, 3, 3);
    for seed in 0..20 {
        let img = pipe.run_image(&src, &mut Rng::new(seed));
        let mut want = vec![0f32; pipe.out_len()];
        pipe.normalize().write_chw(&img, &mut want);
        let mut got = vec![0f32; pipe.out_len()];
        pipe.run(&src, &mut Rng::new(seed), &mut got);
        assert_eq!(got, want);
        let plane = 48 * 48;
        for (k, (m, s)) in cfg.mean.iter().zip(&cfg.std).enumerate() {
            assert_on_lattice(&got[k * plane..(k + 1) * plane], *m, *s);
        }
    }
}

#[test]
fn gray_source_into_rgb_recipe_replicates_channels() {
    let pipe = RecipeConfig { grayscale_p: 0.0, ..RecipeConfig::simclr(16, 3) }.build(3).unwrap();
    let src = noise(30, 30, 1, 4);
    let out = run(&pipe, &src, 1);
    let n = 16 * 16;
    assert_eq!(&out[..n], &out[n..2 * n]);
    assert_eq!(&out[..n], &out[2 * n..]);
    // RGB source into a gray recipe: converted to luma, one plane.
    let pipe = RecipeConfig::simclr(16, 1).build(1).unwrap();
    assert_eq!(run(&pipe, &gradient_rgb(20, 20), 1).len(), n);
}

#[test]
fn views_run_recipes_in_order_from_one_stream() {
    let a = RecipeConfig::simclr(20, 3).build(3).unwrap();
    let b = RecipeConfig { solarize_p: 1.0, ..RecipeConfig::simclr(12, 3) }.build(3).unwrap();
    let src = gradient_rgb(40, 40);
    let (mut va, mut vb) = (vec![0f32; a.out_len()], vec![0f32; b.out_len()]);
    let views = Views::new(vec![
        RecipeConfig::simclr(20, 3).build(3).unwrap(),
        RecipeConfig { solarize_p: 1.0, ..RecipeConfig::simclr(12, 3) }.build(3).unwrap(),
    ]);
    views.run(&src, &mut Rng::for_sample(1, 2, 3), &mut [&mut va, &mut vb]);
    let mut rng = Rng::for_sample(1, 2, 3);
    let (mut wa, mut wb) = (vec![0f32; a.out_len()], vec![0f32; b.out_len()]);
    a.run(&src, &mut rng, &mut wa);
    b.run(&src, &mut rng, &mut wb);
    assert_eq!((va, vb), (wa, wb));
}

#[test]
fn results_do_not_depend_on_thread() {
    let pipe = std::sync::Arc::new(RecipeConfig::simclr(24, 3).build(3).unwrap());
    let src = std::sync::Arc::new(noise(50, 40, 3, 5));
    let expected: Vec<Vec<f32>> = (0..8).map(|i| run(&pipe, &src, i)).collect();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (pipe, src) = (pipe.clone(), src.clone());
            // Each thread visits the samples in a different order, with warm scratch buffers
            // left behind by other samples.
            std::thread::spawn(move || {
                (0..8u64).map(|k| (k * 3 + t) % 8).map(|i| (i, run(&pipe, &src, i))).collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for (i, out) in h.join().unwrap() {
            assert_eq!(out, expected[i as usize]);
        }
    }
}

#[test]
fn config_presets_defaults_and_toml() {
    let gray = RecipeConfig::simclr(28, 1);
    assert_eq!((gray.jitter.saturation, gray.jitter.hue, gray.grayscale_p, gray.blur.p), (0.0, 0.0, 0.0, 0.0));
    assert_eq!(RecipeConfig::simclr(32, 3).blur.p, 0.0);
    let big = RecipeConfig::simclr(224, 3);
    assert_eq!((big.blur.p, big.blur.kernel_size_for(224), big.grayscale_p), (0.5, 23, 0.2));
    assert_eq!(big.blur.kernel_size_for(96), 9);
    let cfg: RecipeConfig = toml::from_str("size = 32\ncrop_scale = [0.2, 1.0]\n[jitter]\np = 0.5\n").unwrap();
    assert_eq!(cfg.size, 32);
    assert_eq!(cfg.crop_scale, (0.2, 1.0));
    assert_eq!(cfg.jitter.p, 0.5);
    assert_eq!(cfg.jitter.brightness, 0.4);
    assert_eq!(cfg.crop_ratio, RecipeConfig::default().crop_ratio);
    let back: RecipeConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    assert!(toml::from_str::<RecipeConfig>("sise = 32").is_err());
    assert!(toml::from_str::<RecipeConfig>("[jitter]\nhue_max = 0.1").is_err());
}

#[test]
fn validation_names_the_field() {
    let check = |cfg: RecipeConfig, channels: u8, want: &str| {
        let e = cfg.build(channels).err().unwrap_or_else(|| panic!("expected error for {want}"));
        assert!(e.to_string().contains(want), "{e} should mention {want}");
    };
    let base = RecipeConfig::simclr(32, 3);
    let mut c = base.clone();
    c.jitter.p = 1.5;
    check(c.clone(), 3, "jitter.p must be in [0,1], got 1.5");
    check(RecipeConfig { size: 0, ..base.clone() }, 3, "size");
    check(RecipeConfig { crop_scale: (0.9, 0.2), ..base.clone() }, 3, "crop_scale");
    check(RecipeConfig { crop_ratio: (-1.0, 1.0), ..base.clone() }, 3, "crop_ratio");
    check(RecipeConfig { flip_p: 2.0, ..base.clone() }, 3, "flip_p");
    check(RecipeConfig { grayscale_p: -0.5, ..base.clone() }, 3, "grayscale_p");
    check(RecipeConfig { solarize_p: 1.1, ..base.clone() }, 3, "solarize_p");
    check(RecipeConfig { equalize_p: f32::NAN, ..base.clone() }, 3, "equalize_p");
    let mut c = base.clone();
    c.blur.kernel_size = 8;
    check(c, 3, "blur.kernel_size");
    let mut c = base.clone();
    c.blur.sigma = (2.0, 1.0);
    check(c, 3, "blur.sigma");
    check(RecipeConfig { mean: vec![0.5, 0.5], ..base.clone() }, 3, "mean");
    check(RecipeConfig { mean: vec![0.1, 0.2, 0.3], ..base.clone() }, 1, "mean");
    check(RecipeConfig { std: vec![0.0, 1.0, 1.0], ..base.clone() }, 3, "std");
    check(base.clone(), 2, "channels");
    assert!(base.validate(3).is_ok());
}

/// Not an assertion: prints per-view timings (`cargo test --release -- --nocapture timing`).
#[test]
fn timing_report() {
    let time = |pipe: &Pipeline, src: &Image, iters: u32| {
        let mut out = vec![0f32; pipe.out_len()];
        for i in 0..iters / 10 {
            pipe.run(src, &mut Rng::for_sample(0, 0, i as u64), &mut out);
        }
        let t = Instant::now();
        for i in 0..iters {
            pipe.run(src, &mut Rng::for_sample(0, 1, i as u64), &mut out);
        }
        t.elapsed().as_secs_f64() / iters as f64 * 1e6
    };
    let gray = RecipeConfig::simclr(28, 1).build(1).unwrap();
    let us = time(&gray, &noise(28, 28, 1, 1), 50_000);
    println!("simclr 28x28 gray: {us:.2} us/view");
    let mut cfg = RecipeConfig::simclr(224, 3);
    cfg.blur.p = 1.0;
    let rgb = cfg.build(3).unwrap();
    let us = time(&rgb, &noise(512, 512, 3, 2), 200);
    println!("simclr 512x512 rgb -> 224 (blur p=1): {us:.1} us/view");
    cfg.blur.p = 0.0;
    let us = time(&cfg.build(3).unwrap(), &noise(512, 512, 3, 2), 200);
    println!("simclr 512x512 rgb -> 224 (no blur): {us:.1} us/view");
}
