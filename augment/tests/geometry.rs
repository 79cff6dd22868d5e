//! Resize, RandomResizedCrop and flip: closed-form values and properties.

mod common;

use common::{checkerboard, constant, noise};
use selfsup_augment::{
    flip_horizontal, resize, resize_crop_into, CropBox, HorizontalFlip, Image, RandomResizedCrop, Rng, Transform,
};

#[test]
fn resize_of_constant_image_is_constant() {
    for &(w, h, ow, oh) in &[(28, 28, 28, 28), (28, 28, 13, 7), (10, 6, 37, 50), (512, 300, 224, 224)] {
        for c in [1u8, 3] {
            let out = resize(&constant(w, h, c, 173), ow, oh);
            assert_eq!((out.width, out.height, out.channels), (ow, oh, c));
            assert!(out.data.iter().all(|&v| v == 173), "{w}x{h} -> {ow}x{oh}");
        }
    }
}

#[test]
fn downscaled_checkerboard_is_mid_gray() {
    for c in [1u8, 3] {
        let img = checkerboard(64, 64, c);
        let out = resize(&img, 32, 32);
        // Antialiasing averages 0s and 255s; naive point sampling would return one phase only.
        for &v in &out.data {
            assert!((120..=135).contains(&v), "got {v}");
        }
        let naive: Vec<u8> = (0..32).map(|x| img.get(2 * x, 0, 0)).collect();
        assert!(naive.iter().all(|&v| v == 255), "the test image must alias without a filter");
        // A 3x downscale (odd factor, wider support) also comes out gray.
        let out = resize(&img, 21, 21);
        let mean = out.data.iter().map(|&v| v as f64).sum::<f64>() / out.data.len() as f64;
        assert!((mean - 127.5).abs() < 4.0, "mean {mean}");
        assert!(out.data.iter().all(|&v| (90..=165).contains(&v)));
    }
}

#[test]
fn resize_matches_closed_form_triangle_weights() {
    // Upscale 2 -> 4: plain bilinear with half-pixel centers, edges clamped.
    let img = Image::new(2, 1, 1, vec![0, 255]).unwrap();
    assert_eq!(resize(&img, 4, 1).data, vec![0, 64, 191, 255]);
    // Downscale 4 -> 2: support 2, output 0 sees weights .75, .75, .25 over [0, 0, 255].
    let img = Image::new(4, 1, 1, vec![0, 0, 255, 255]).unwrap();
    assert_eq!(resize(&img, 2, 1).data, vec![36, 219]);
    // Same along the vertical axis, on RGB.
    let img = Image::new(1, 4, 3, vec![0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255]).unwrap();
    assert_eq!(resize(&img, 1, 2).data, vec![36, 36, 36, 219, 219, 219]);
}

#[test]
fn two_axis_resize_matches_one_axis_at_a_time() {
    // The two passes run in either order depending on cost; either way the result must be
    // the separable filter, i.e. within one rounding step of resizing one axis at a time.
    let src = common::gradient_rgb(90, 70);
    let mut noisy = noise(90, 70, 3, 3);
    for (n, g) in noisy.data.iter_mut().zip(&src.data) {
        *n = (*n / 8).saturating_add(*g / 2); // mild noise on a gradient
    }
    for &(ow, oh) in &[(30, 20), (200, 150), (30, 150), (200, 20), (89, 71)] {
        let both = resize(&noisy, ow, oh);
        let split = resize(&resize(&noisy, ow, 70), ow, oh);
        let split2 = resize(&resize(&noisy, 90, oh), ow, oh);
        for ((&a, &b), &c) in both.data.iter().zip(&split.data).zip(&split2.data) {
            assert!(a.abs_diff(b) <= 1 || a.abs_diff(c) <= 1, "{ow}x{oh}: {a} vs {b}/{c}");
        }
    }
}

#[test]
fn resize_to_same_size_and_crop_box_are_exact_copies() {
    let img = noise(17, 11, 3, 1);
    assert_eq!(resize(&img, 17, 11), img);
    let mut out = Image::zeros(1, 1, 3);
    resize_crop_into(&img, CropBox { x: 3, y: 2, width: 5, height: 4 }, 5, 4, &mut out);
    for y in 0..4 {
        for x in 0..5 {
            for c in 0..3 {
                assert_eq!(out.get(x, y, c), img.get(x + 3, y + 2, c));
            }
        }
    }
}

#[test]
fn resize_never_reads_outside_the_crop_box() {
    // A white box inside a black frame: resizing just the box must stay white.
    let mut img = constant(40, 30, 1, 0);
    for y in 10..20 {
        for x in 10..30 {
            img.data[y * 40 + x] = 255;
        }
    }
    let mut out = Image::zeros(1, 1, 1);
    resize_crop_into(&img, CropBox { x: 10, y: 10, width: 20, height: 10 }, 7, 33, &mut out);
    assert!(out.data.iter().all(|&v| v == 255));
}

#[test]
fn random_resized_crop_output_size_and_range() {
    let crop = RandomResizedCrop::new((24, 20), (0.08, 1.0), (0.75, 4.0 / 3.0)).unwrap();
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed);
        let (w, h) = (8 + rng.below(60) as u32, 8 + rng.below(60) as u32);
        let c = if seed % 2 == 0 { 1 } else { 3 };
        let mut img = constant(w, h, c, 77);
        crop.apply(&mut img, &mut rng);
        assert_eq!((img.width, img.height, img.channels), (24, 20, c));
        assert!(img.data.iter().all(|&v| v == 77));
    }
}

#[test]
fn crop_params_follow_scale_and_ratio() {
    let crop = RandomResizedCrop::new((32, 32), (0.2, 0.5), (0.5, 2.0)).unwrap();
    let mut rng = Rng::new(9);
    for _ in 0..1000 {
        let b = crop.get_params(200, 150, &mut rng);
        assert!(b.x + b.width <= 200 && b.y + b.height <= 150 && b.width > 0 && b.height > 0);
        let area = (b.width * b.height) as f64 / (200.0 * 150.0);
        let ratio = b.width as f64 / b.height as f64;
        // Rounding w and h to integers moves area and ratio a little.
        assert!((0.19..=0.51).contains(&area), "area {area}");
        assert!((0.48..=2.05).contains(&ratio), "ratio {ratio}");
    }
}

#[test]
fn crop_falls_back_to_center_crop() {
    // A square area of the whole image cannot fit a 40x20 image: 10 failures, then the
    // largest centered box with ratio clamped to 1.
    let crop = RandomResizedCrop::new((8, 8), (1.0, 1.0), (1.0, 1.0)).unwrap();
    let b = crop.get_params(40, 20, &mut Rng::new(0));
    assert_eq!(b, CropBox { x: 10, y: 0, width: 20, height: 20 });
    let b = crop.get_params(20, 40, &mut Rng::new(0));
    assert_eq!(b, CropBox { x: 0, y: 10, width: 20, height: 20 });
}

#[test]
fn full_scale_unit_ratio_crop_to_same_size_is_identity() {
    let crop = RandomResizedCrop::new((28, 28), (1.0, 1.0), (1.0, 1.0)).unwrap();
    for seed in 0..20 {
        for c in [1u8, 3] {
            let src = noise(28, 28, c, seed);
            let mut img = src.clone();
            crop.apply(&mut img, &mut Rng::new(seed));
            assert_eq!(img, src);
            let mut dst = Image::zeros(1, 1, 1);
            crop.apply_to(&src, &mut dst, &mut Rng::new(seed));
            assert_eq!(dst, src);
        }
    }
}

#[test]
fn crop_apply_and_apply_to_agree_and_seeds_matter() {
    let crop = RandomResizedCrop::new((16, 16), (0.08, 1.0), (0.75, 4.0 / 3.0)).unwrap();
    let src = noise(50, 40, 3, 5);
    let mut a = src.clone();
    crop.apply(&mut a, &mut Rng::new(1));
    let mut b = Image::zeros(1, 1, 3);
    crop.apply_to(&src, &mut b, &mut Rng::new(1));
    assert_eq!(a, b);
    let mut c = src.clone();
    crop.apply(&mut c, &mut Rng::new(2));
    assert_ne!(a, c);
}

#[test]
fn crop_rejects_bad_params() {
    assert!(RandomResizedCrop::new((0, 5), (0.1, 1.0), (1.0, 1.0)).is_err());
    let e = RandomResizedCrop::new((5, 5), (0.9, 0.1), (1.0, 1.0)).unwrap_err().to_string();
    assert!(e.contains("crop_scale"), "{e}");
    let e = RandomResizedCrop::new((5, 5), (0.1, 1.0), (0.0, 1.0)).unwrap_err().to_string();
    assert!(e.contains("crop_ratio"), "{e}");
}

#[test]
fn flip_twice_is_identity_and_mirrors() {
    for c in [1u8, 3] {
        let src = noise(13, 7, c, 3);
        let mut img = src.clone();
        flip_horizontal(&mut img);
        assert_ne!(img, src);
        for y in 0..7 {
            for x in 0..13 {
                for k in 0..c {
                    assert_eq!(img.get(x, y, k), src.get(12 - x, y, k));
                }
            }
        }
        flip_horizontal(&mut img);
        assert_eq!(img, src);
    }
}

#[test]
fn flip_probability_zero_and_one() {
    let src = noise(9, 9, 3, 4);
    let never = HorizontalFlip::new(0.0).unwrap();
    let always = HorizontalFlip::new(1.0).unwrap();
    let mut flipped = src.clone();
    flip_horizontal(&mut flipped);
    for seed in 0..50 {
        let mut img = src.clone();
        never.apply(&mut img, &mut Rng::new(seed));
        assert_eq!(img, src);
        always.apply(&mut img, &mut Rng::new(seed));
        assert_eq!(img, flipped);
    }
    assert!(HorizontalFlip::new(1.5).is_err());
    assert!(HorizontalFlip::new(f32::NAN).is_err());
}

#[test]
fn image_new_validates_shape() {
    assert!(Image::new(2, 2, 1, vec![0; 4]).is_ok());
    assert!(Image::new(2, 2, 1, vec![0; 5]).is_err());
    assert!(Image::new(2, 2, 2, vec![0; 8]).is_err());
    assert!(Image::new(0, 2, 3, vec![]).is_err());
    assert_eq!(Image::zeros(3, 2, 3).data.len(), 18);
}
