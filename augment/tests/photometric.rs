//! Color ops, blur, solarize, equalize and normalize: closed forms and p = 0 identities.

mod common;

use common::{constant, gradient_rgb, noise};
use selfsup_augment::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, equalize, gaussian_blur, gaussian_kernel, luma,
    solarize, to_grayscale, ColorJitter, Equalize, GaussianBlur, Image, Normalize, RandomGrayscale, Rng, Solarize,
    Transform,
};

fn rgb(pixels: &[[u8; 3]]) -> Image {
    Image::new(pixels.len() as u32, 1, 3, pixels.concat()).unwrap()
}

#[test]
fn brightness_closed_form() {
    for c in [1u8, 3] {
        let src = noise(16, 16, c, 1);
        let mut img = src.clone();
        adjust_brightness(&mut img, 1.0);
        assert_eq!(img, src);
        adjust_brightness(&mut img, 0.0);
        assert!(img.data.iter().all(|&v| v == 0));
    }
    let mut img = Image::new(3, 1, 1, vec![100, 200, 7]).unwrap();
    adjust_brightness(&mut img, 2.0);
    assert_eq!(img.data, vec![200, 255, 14]);
}

#[test]
fn contrast_closed_form() {
    let src = noise(16, 16, 3, 2);
    let mut img = src.clone();
    adjust_contrast(&mut img, 1.0);
    assert_eq!(img, src);
    // Factor 0 gives the rounded mean gray level everywhere.
    let mut img = Image::new(4, 1, 1, vec![0, 10, 20, 31]).unwrap();
    adjust_contrast(&mut img, 0.0);
    assert_eq!(img.data, vec![15; 4]);
    // Factor 2 stretches around the mean (15.25): 0 -> 0 (clamped), 31 -> 46.75 -> 47.
    let mut img = Image::new(4, 1, 1, vec![0, 10, 20, 31]).unwrap();
    adjust_contrast(&mut img, 2.0);
    assert_eq!(img.data, vec![0, 5, 25, 47]);
    // RGB contrast uses the mean luma.
    let mut img = rgb(&[[255, 0, 0], [0, 0, 255]]);
    let mean = (luma(255, 0, 0) as f32 + luma(0, 0, 255) as f32) / 2.0;
    adjust_contrast(&mut img, 0.0);
    assert_eq!(mean, 52.5);
    assert!(img.data.iter().all(|&v| v == 52), "ties round to even: {:?}", img.data);
}

#[test]
fn saturation_and_grayscale() {
    let src = gradient_rgb(20, 10);
    let mut img = src.clone();
    adjust_saturation(&mut img, 1.0);
    assert_eq!(img, src);
    let mut desat = src.clone();
    adjust_saturation(&mut desat, 0.0);
    let mut gray = src.clone();
    to_grayscale(&mut gray);
    assert_eq!(desat, gray);
    for p in gray.data.chunks_exact(3) {
        assert!(p[0] == p[1] && p[1] == p[2]);
    }
    assert_eq!(luma(255, 255, 255), 255);
    assert_eq!(luma(255, 0, 0), 76);
    // Gray images: grayscale and saturation are identities.
    let src = noise(8, 8, 1, 3);
    let mut img = src.clone();
    to_grayscale(&mut img);
    adjust_saturation(&mut img, 0.0);
    assert_eq!(img, src);
}

#[test]
fn hue_rotates_primaries_and_keeps_grays() {
    let mut img = rgb(&[[255, 0, 0], [0, 255, 0], [10, 10, 10], [200, 100, 50]]);
    adjust_hue(&mut img, 1.0 / 3.0);
    assert_eq!(&img.data[..9], &[0, 255, 0, 0, 0, 255, 10, 10, 10]);
    let mut img = rgb(&[[255, 0, 0], [255, 128, 0]]);
    adjust_hue(&mut img, 0.5);
    assert_eq!(img.data, vec![0, 255, 255, 0, 127, 255]);
    let mut img = rgb(&[[255, 0, 0]]);
    adjust_hue(&mut img, -1.0 / 3.0);
    assert_eq!(img.data, vec![0, 0, 255]);
    // Zero shift and a full turn are identities; value and chroma are always kept.
    let src = noise(32, 32, 3, 4);
    let mut img = src.clone();
    adjust_hue(&mut img, 0.0);
    assert_eq!(img, src);
    let mut img = src.clone();
    adjust_hue(&mut img, 0.37);
    for (a, b) in img.data.chunks_exact(3).zip(src.data.chunks_exact(3)) {
        let (amax, bmax) = (a.iter().max().unwrap(), b.iter().max().unwrap());
        let (amin, bmin) = (a.iter().min().unwrap(), b.iter().min().unwrap());
        assert_eq!((amax, amin), (bmax, bmin));
    }
    let src = noise(8, 8, 1, 5);
    let mut img = src.clone();
    adjust_hue(&mut img, 0.25);
    assert_eq!(img, src);
}

#[test]
fn jitter_probability_zero_and_factor_ranges() {
    let never = ColorJitter::new(0.8, 0.8, 0.8, 0.2, 0.0).unwrap();
    let nothing = ColorJitter::new(0.0, 0.0, 0.0, 0.0, 1.0).unwrap();
    for c in [1u8, 3] {
        let src = noise(16, 16, c, 6);
        for seed in 0..30 {
            let mut img = src.clone();
            never.apply(&mut img, &mut Rng::new(seed));
            nothing.apply(&mut img, &mut Rng::new(seed));
            assert_eq!(img, src);
        }
    }
    // Brightness only, strength 0.5: factors in [0.5, 1.5] scale a constant 100 into [50, 150].
    let b = ColorJitter::new(0.5, 0.0, 0.0, 0.0, 1.0).unwrap();
    let (mut lo, mut hi) = (255u8, 0u8);
    for seed in 0..400 {
        let mut img = constant(4, 4, 3, 100);
        b.apply(&mut img, &mut Rng::new(seed));
        lo = lo.min(img.data[0]);
        hi = hi.max(img.data[0]);
        assert!(img.data.iter().all(|&v| v == img.data[0]));
    }
    assert!((50..=53).contains(&lo) && (147..=150).contains(&hi), "{lo}..{hi}");
    let src = noise(16, 16, 3, 7);
    let full = ColorJitter::new(0.4, 0.4, 0.4, 0.1, 1.0).unwrap();
    let (mut a, mut b2, mut c) = (src.clone(), src.clone(), src.clone());
    full.apply(&mut a, &mut Rng::new(1));
    full.apply(&mut b2, &mut Rng::new(1));
    full.apply(&mut c, &mut Rng::new(2));
    assert_eq!(a, b2);
    assert_ne!(a, c);
    assert_ne!(a, src);
    let e = ColorJitter::new(0.4, 0.4, 0.4, 0.6, 0.8).unwrap_err().to_string();
    assert!(e.contains("jitter.hue"), "{e}");
    let e = ColorJitter::new(-1.0, 0.4, 0.4, 0.1, 0.8).unwrap_err().to_string();
    assert!(e.contains("jitter.brightness"), "{e}");
}

#[test]
fn random_grayscale_probability() {
    let src = gradient_rgb(10, 10);
    let mut gray = src.clone();
    to_grayscale(&mut gray);
    let (never, always) = (RandomGrayscale::new(0.0).unwrap(), RandomGrayscale::new(1.0).unwrap());
    let mut img = src.clone();
    never.apply(&mut img, &mut Rng::new(0));
    assert_eq!(img, src);
    always.apply(&mut img, &mut Rng::new(0));
    assert_eq!(img, gray);
    assert_eq!(img.channels, 3);
    let g = noise(5, 5, 1, 1);
    let mut img = g.clone();
    always.apply(&mut img, &mut Rng::new(0));
    assert_eq!(img, g);
}

#[test]
fn solarize_closed_form() {
    let src = noise(16, 16, 3, 8);
    let mut img = src.clone();
    solarize(&mut img, 0);
    assert!(img.data.iter().zip(&src.data).all(|(&a, &b)| a == 255 - b));
    let mut img = Image::new(4, 1, 1, vec![0, 127, 128, 255]).unwrap();
    solarize(&mut img, 128);
    assert_eq!(img.data, vec![0, 127, 127, 0]);
    let never = Solarize::new(0, 0.0).unwrap();
    let mut img = src.clone();
    never.apply(&mut img, &mut Rng::new(0));
    assert_eq!(img, src);
    assert!(Solarize::new(0, -0.1).is_err());
}

#[test]
fn equalize_keeps_uniform_ramp_and_stretches_narrow_histograms() {
    // 64x64 with every level exactly 16 times: already equalized.
    let ramp = Image::new(64, 64, 1, (0..4096).map(|i| (i % 256) as u8).collect()).unwrap();
    let mut img = ramp.clone();
    equalize(&mut img);
    assert_eq!(img, ramp);
    // Levels 100..=131 only: spread to the full range, order kept.
    let narrow = Image::new(32, 32, 3, (0..3072).map(|i| 100 + (i / 3 % 32) as u8).collect()).unwrap();
    let mut img = narrow.clone();
    equalize(&mut img);
    assert_eq!(*img.data.iter().min().unwrap(), 0);
    assert_eq!(*img.data.iter().max().unwrap(), 255);
    for (a, b) in img.data.iter().zip(&narrow.data) {
        for (c, d) in img.data.iter().zip(&narrow.data).take(64) {
            assert_eq!(b < d, a < c);
        }
    }
    let flat = constant(8, 8, 3, 42);
    let mut img = flat.clone();
    equalize(&mut img);
    assert_eq!(img, flat);
    let never = Equalize::new(0.0).unwrap();
    let mut img = narrow.clone();
    never.apply(&mut img, &mut Rng::new(0));
    assert_eq!(img, narrow);
}

#[test]
fn blur_keeps_constants_and_mass() {
    for k in [3usize, 5, 9, 23, 41] {
        for c in [1u8, 3] {
            let mut img = constant(12, 9, c, 201);
            gaussian_blur(&mut img, k, 1.7);
            assert!(img.data.iter().all(|&v| v == 201), "k {k}");
        }
    }
    // An impulse in the middle spreads symmetrically and keeps its mass (no border effects).
    let mut img = constant(21, 21, 1, 0);
    img.data[10 * 21 + 10] = 255;
    gaussian_blur(&mut img, 7, 1.0);
    let mass: u32 = img.data.iter().map(|&v| v as u32).sum();
    assert!((245..=265).contains(&mass), "mass {mass}");
    assert_eq!(img.get(9, 10, 0), img.get(11, 10, 0));
    assert_eq!(img.get(10, 9, 0), img.get(10, 11, 0));
    assert!(img.get(10, 10, 0) < 60 && img.get(10, 10, 0) > img.get(11, 10, 0));
    let kern = gaussian_kernel(5, 1.0);
    assert!((kern.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    let e = (-0.5f32).exp();
    assert!((kern[1] / kern[2] - e).abs() < 1e-5 && kern[0] == kern[4]);
}

#[test]
fn blur_smooths_noise_and_p_zero_is_identity() {
    let src = noise(32, 32, 3, 9);
    let var = |img: &Image| {
        let m = img.data.iter().map(|&v| v as f64).sum::<f64>() / img.data.len() as f64;
        img.data.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / img.data.len() as f64
    };
    let mut img = src.clone();
    GaussianBlur::new(9, (1.5, 2.0), 1.0).unwrap().apply(&mut img, &mut Rng::new(0));
    assert!(var(&img) < var(&src) / 10.0);
    let mut img = src.clone();
    GaussianBlur::new(9, (1.5, 2.0), 0.0).unwrap().apply(&mut img, &mut Rng::new(0));
    assert_eq!(img, src);
    // Kernel wider than a tiny image: reflection wraps around without panicking.
    let mut tiny = noise(2, 3, 1, 1);
    gaussian_blur(&mut tiny, 15, 2.0);
    let mut one = noise(1, 1, 3, 1);
    let before = one.clone();
    gaussian_blur(&mut one, 5, 2.0);
    assert_eq!(one, before);
    let e = GaussianBlur::new(4, (0.1, 2.0), 0.5).unwrap_err().to_string();
    assert!(e.contains("blur.kernel_size"), "{e}");
    assert!(GaussianBlur::new(5, (0.0, 2.0), 0.5).is_err());
}

#[test]
fn normalize_writes_chw_affine_values() {
    let img = rgb(&[[0, 51, 255], [255, 102, 0]]);
    let norm = Normalize::new(vec![0.5, 0.2, 0.0], vec![0.5, 0.1, 1.0]).unwrap();
    let mut out = vec![0f32; 6];
    norm.write_chw(&img, &mut out);
    let want = [-1.0, 1.0, 0.0, 2.0, 1.0, 0.0];
    for (o, w) in out.iter().zip(want) {
        assert!((o - w).abs() < 1e-5, "{out:?}");
    }
    let gray = Image::new(2, 1, 1, vec![0, 255]).unwrap();
    let norm = Normalize::new(vec![0.5], vec![0.5]).unwrap();
    let mut out = vec![0f32; 2];
    norm.write_chw(&gray, &mut out);
    assert_eq!(out, vec![-1.0, 1.0]);
    assert!(Normalize::new(vec![0.5, 0.5], vec![0.5, 0.5]).is_err());
    assert!(Normalize::new(vec![0.5], vec![0.0]).is_err());
    assert!(Normalize::new(vec![0.5, 0.5, 0.5], vec![0.5]).is_err());
}
