//! TensorBoard's embedding projector (https://www.tensorflow.org/tensorboard/tensorboard_projector_plugin): the
//! backbone's features of test images, their class names and a sprite of the images themselves, so one can fly
//! through the learned space in TensorBoard's PROJECTOR tab and see which classes it separates. Written beside the
//! run's event file: `projector_config.pbtxt` and `projector/{features.tsv, metadata.tsv, sprite.png}`.

use std::path::Path;

use selfsup_augment::Image;
use tch::{Kind, Tensor};

use crate::source::Source;
use crate::tensorboard::grid_tight;
use crate::{Error, Result};

/// Thumbnails in the sprite are at most this many pixels on a side.
const THUMB: u32 = 32;
/// TensorBoard's projector refuses sprites larger than this on a side.
const MAX_SPRITE: u32 = 8192;

/// Writes the projector files for the first `features.size()[0]` readable samples of `source` (the rows of
/// `features`, `[K, D]`, in the same order) into `dir`.
pub fn write(dir: &Path, features: &Tensor, labels: &[i64], names: &[String], source: &dyn Source) -> Result<()> {
    let k = features.size()[0] as usize;
    let sub = dir.join("projector");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| Error::Other(format!("{}: {e}", p.display()))
    };
    std::fs::create_dir_all(&sub).map_err(io(&sub))?;
    // Features: one row per image, tab-separated.
    let x: Vec<f32> = Vec::try_from(features.to_kind(Kind::Float).contiguous().flatten(0, -1))
        .map_err(|e| Error::Other(format!("projector features: {e}")))?;
    let d = if k == 0 { 0 } else { x.len() / k };
    let mut tsv = String::with_capacity(x.len() * 10);
    for row in x.chunks(d.max(1)) {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:.5}")).collect();
        tsv.push_str(&cells.join("\t"));
        tsv.push('\n');
    }
    std::fs::write(sub.join("features.tsv"), tsv).map_err(io(&sub))?;
    // Metadata: a header row, then class name and label per image.
    let mut meta = String::from("class\tlabel\n");
    for &l in &labels[..k.min(labels.len())] {
        let name = names.get(l as usize).cloned().unwrap_or_else(|| l.to_string());
        meta.push_str(&format!("{name}\t{l}\n"));
    }
    std::fs::write(sub.join("metadata.tsv"), meta).map_err(io(&sub))?;
    // Sprite: the same images, in the same order (unreadable ones skipped, as the loader skips them).
    let mut images = Vec::with_capacity(k);
    let mut i = 0;
    while images.len() < k && i < source.len() {
        if let Ok(s) = source.get(i) {
            images.push(s.image);
        }
        i += 1;
    }
    let (side, cols) = sprite_layout(&images);
    let channels = images.first().map_or(1, |im| im.channels);
    let mut thumbs: Vec<Image> = images.iter().map(|im| thumbnail(im, side, channels)).collect();
    // The projector takes the sprite as a square of `cols` x `cols` cells (it derives the rows from the width).
    let blank =
        Image { width: side, height: side, channels, data: vec![0; (side * side) as usize * channels as usize] };
    thumbs.resize(cols * cols, blank);
    let sprite = grid_tight(&thumbs, cols);
    let png = sub.join("sprite.png");
    std::fs::write(&png, crate::tensorboard::encode_png(&sprite)).map_err(io(&png))?;
    let config = format!(
        "embeddings {{\n  tensor_name: \"backbone features (test images)\"\n  tensor_path: \"projector/features.tsv\"\n  \
         tensor_shape: {k}\n  tensor_shape: {d}\n  metadata_path: \"projector/metadata.tsv\"\n  sprite {{\n    \
         image_path: \"projector/sprite.png\"\n    single_image_dim: {side}\n    single_image_dim: {side}\n  }}\n}}\n"
    );
    let cfg = dir.join("projector_config.pbtxt");
    std::fs::write(&cfg, config).map_err(io(&cfg))
}

/// The sprite's cell side and cells per row for `images`: `ceil(sqrt(n))` per row (as the projector lays them
/// out), each cell the longest image side, at most [`THUMB`], and small enough that the sprite stays within
/// [`MAX_SPRITE`].
fn sprite_layout(images: &[Image]) -> (u32, usize) {
    let cols = ((images.len() as f64).sqrt().ceil() as usize).max(1);
    let longest = images.iter().map(|im| im.width.max(im.height)).max().unwrap_or(1);
    let side = longest.min(THUMB).min(MAX_SPRITE / cols as u32).max(1);
    (side, cols)
}

/// Nearest-neighbour resize so the longer side is `side`, centered on a black `side` x `side` square with
/// `channels` channels (gray replicated to RGB, RGB to its luma): sprites need cells of one size and format.
fn thumbnail(image: &Image, side: u32, channels: u8) -> Image {
    let (w, h, c) = (image.width.max(1), image.height.max(1), image.channels as usize);
    let scale = side as f64 / w.max(h) as f64;
    let (tw, th) =
        (((w as f64 * scale).round() as u32).clamp(1, side), ((h as f64 * scale).round() as u32).clamp(1, side));
    let (x0, y0) = ((side - tw) / 2, (side - th) / 2);
    let oc = channels as usize;
    let mut data = vec![0u8; (side * side) as usize * oc];
    if image.data.len() < (w * h) as usize * c || c == 0 {
        return Image { width: side, height: side, channels, data };
    }
    for y in 0..th {
        let sy = (((y as f64 + 0.5) / scale) as u32).min(h - 1);
        for x in 0..tw {
            let sx = (((x as f64 + 0.5) / scale) as u32).min(w - 1);
            let src = &image.data[((sy * w + sx) as usize) * c..][..c];
            let dst = (((y0 + y) * side + x0 + x) as usize) * oc;
            match (c, oc) {
                (a, b) if a == b => data[dst..dst + oc].copy_from_slice(src),
                (1, _) => data[dst..dst + oc].fill(src[0]),
                (3.., 1) => {
                    let luma = 0.299 * f64::from(src[0]) + 0.587 * f64::from(src[1]) + 0.114 * f64::from(src[2]);
                    data[dst] = luma.round() as u8;
                }
                _ => data[dst..dst + oc.min(c)].copy_from_slice(&src[..oc.min(c)]),
            }
        }
    }
    Image { width: side, height: side, channels, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: u32, height: u32, channels: u8, value: impl Fn(u32, u32, usize) -> u8) -> Image {
        let mut data = Vec::new();
        for y in 0..height {
            for x in 0..width {
                data.extend((0..channels as usize).map(|c| value(x, y, c)));
            }
        }
        Image { width, height, channels, data }
    }

    #[test]
    fn the_sprite_is_a_square_of_equal_cells_within_the_projector_limit() {
        let small = vec![image(28, 28, 1, |_, _, _| 1); 50];
        assert_eq!(sprite_layout(&small), (28, 8)); // 8 x 8 cells, 14 of them blank
        let photos = vec![image(500, 375, 3, |_, _, _| 1), image(20, 10, 3, |_, _, _| 1)];
        assert_eq!(sprite_layout(&photos), (THUMB, 2));
        let many = vec![image(28, 28, 1, |_, _, _| 1); 100_000];
        let (side, cols) = sprite_layout(&many);
        assert_eq!(cols, 317);
        assert!(side as usize * cols <= MAX_SPRITE as usize && side >= 25, "{side} x {cols}");
        assert_eq!(sprite_layout(&[]), (1, 1));
    }

    #[test]
    fn thumbnails_share_one_size_and_format_whatever_the_image() {
        // A wide RGB image: scaled to the side, centered vertically on black.
        let wide = image(100, 50, 3, |x, _, c| if c == 0 { (x * 2) as u8 } else { 7 });
        let t = thumbnail(&wide, 32, 3);
        assert_eq!((t.width, t.height, t.channels, t.data.len()), (32, 32, 3, 32 * 32 * 3));
        let px = |t: &Image, x: u32, y: u32| t.data[((y * t.width + x) * t.channels as u32) as usize];
        assert_eq!(px(&t, 16, 2), 0, "above the image: black padding");
        assert!(px(&t, 31, 16) > px(&t, 0, 16), "left to right as in the image");
        // A small one is enlarged to the same cell; gray becomes RGB and RGB gray when the sprite needs it.
        let small = image(10, 10, 1, |_, _, _| 200);
        let t = thumbnail(&small, 32, 3);
        assert_eq!((t.width, t.channels), (32, 3));
        assert!(t.data.iter().all(|&v| v == 200));
        let red = image(8, 8, 3, |_, _, c| if c == 0 { 255 } else { 0 });
        let t = thumbnail(&red, 8, 1);
        assert!(t.data.iter().all(|&v| v == 76), "luma of pure red");
        // Degenerate input gives a blank cell, not a panic.
        let broken = Image { width: 4, height: 4, channels: 3, data: vec![1; 5] };
        assert!(thumbnail(&broken, 8, 3).data.iter().all(|&v| v == 0));
    }
}
