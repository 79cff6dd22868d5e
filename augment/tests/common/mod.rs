//! Image generators shared by the integration tests.
#![allow(dead_code)]

use selfsup_augment::{Image, Rng};

/// Uniform noise, reproducible from `seed`.
pub fn noise(w: u32, h: u32, c: u8, seed: u64) -> Image {
    let mut rng = Rng::new(seed);
    let data = (0..w as usize * h as usize * c as usize).map(|_| rng.below(256) as u8).collect();
    Image::new(w, h, c, data).unwrap()
}

/// Every value equal to `v`.
pub fn constant(w: u32, h: u32, c: u8, v: u8) -> Image {
    Image::new(w, h, c, vec![v; w as usize * h as usize * c as usize]).unwrap()
}

/// Alternating 0 / 255 pixels (1-pixel squares).
pub fn checkerboard(w: u32, h: u32, c: u8) -> Image {
    let mut img = Image::zeros(w, h, c);
    for y in 0..h as usize {
        for x in 0..w as usize {
            let v = if (x + y) % 2 == 0 { 255 } else { 0 };
            for k in 0..c as usize {
                img.data[(y * w as usize + x) * c as usize + k] = v;
            }
        }
    }
    img
}

/// Smooth-ish RGB content: horizontal, vertical and diagonal gradients in the three channels.
pub fn gradient_rgb(w: u32, h: u32) -> Image {
    let mut data = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h {
        for x in 0..w {
            data.push((x * 255 / (w - 1).max(1)) as u8);
            data.push((y * 255 / (h - 1).max(1)) as u8);
            data.push(((x + y) * 255 / (w + h - 2).max(1)) as u8);
        }
    }
    Image::new(w, h, 3, data).unwrap()
}
