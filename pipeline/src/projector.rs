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
    let mut thumbs = Vec::with_capacity(k);
    let mut i = 0;
    while thumbs.len() < k && i < source.len() {
        if let Ok(s) = source.get(i) {
            thumbs.push(thumbnail(&s.image, THUMB));
        }
        i += 1;
    }
    let side = thumbs.first().map_or(1, |t| t.width);
    let cols = (thumbs.len() as f64).sqrt().ceil() as usize;
    let sprite = grid_tight(&thumbs, cols.max(1));
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

/// Nearest-neighbour downscale so the longer side is at most `max` (and square-padded with black): sprites need
/// cells of one size.
fn thumbnail(image: &Image, max: u32) -> Image {
    let (w, h, c) = (image.width, image.height, image.channels as usize);
    let scale = (max as f64 / w.max(h) as f64).min(1.0);
    let (tw, th) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    let side = tw.max(th);
    let mut data = vec![0u8; (side * side) as usize * c];
    for y in 0..th {
        let sy = ((y as f64 + 0.5) / scale) as u32;
        for x in 0..tw {
            let sx = ((x as f64 + 0.5) / scale) as u32;
            let src = ((sy.min(h - 1) * w + sx.min(w - 1)) as usize) * c;
            let dst = ((y * side + x) as usize) * c;
            data[dst..dst + c].copy_from_slice(&image.data[src..src + c]);
        }
    }
    Image { width: side, height: side, channels: image.channels, data }
}
