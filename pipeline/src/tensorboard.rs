//! Logging sinks. [`TensorBoard`] writes event files with the `tfrecord` crate's event writer, whose scalars,
//! images and histograms TensorBoard's own reader reads back exactly (`tensorboard-rs` writes images
//! transposed and panics on text). Images are PNG-encoded here with the `image` crate.

use std::io::Cursor;
use std::path::Path;

use selfsup_augment::Image;
use tfrecord::protobuf::summary::Image as TbImage;
use tfrecord::EventWriter;

pub trait Sink {
    fn scalar(&mut self, tag: &str, step: i64, value: f64);
    fn image(&mut self, tag: &str, step: i64, image: &Image);
    fn histogram(&mut self, tag: &str, step: i64, values: &[f32]);
    fn flush(&mut self);
}

/// A sink that drops everything (for `eval` without a run folder, and for benchmarks).
pub struct NullSink;

impl Sink for NullSink {
    fn scalar(&mut self, _: &str, _: i64, _: f64) {}
    fn image(&mut self, _: &str, _: i64, _: &Image) {}
    fn histogram(&mut self, _: &str, _: i64, _: &[f32]) {}
    fn flush(&mut self) {}
}

/// Writes `<dir>/events.out.tfevents.<time>.<host>`. Write errors are reported once on stderr and then
/// ignored: losing a log line must never stop a training run.
pub struct TensorBoard {
    writer: EventWriter<std::io::BufWriter<std::fs::File>>,
    failed: bool,
}

impl TensorBoard {
    pub fn create(dir: &Path) -> Result<Self, tfrecord::Error> {
        let prefix = dir.join("events");
        let writer = EventWriter::from_prefix(prefix.to_string_lossy().into_owned(), "", Default::default())?;
        Ok(TensorBoard { writer, failed: false })
    }

    fn check(&mut self, r: Result<(), tfrecord::Error>) {
        if let Err(e) = r {
            if !self.failed {
                eprintln!("warning: TensorBoard event write failed ({e}); further errors are not shown");
                self.failed = true;
            }
        }
    }
}

/// PNG bytes of an 8-bit gray or RGB image.
pub fn encode_png(image: &Image) -> Vec<u8> {
    let color = if image.channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(Cursor::new(&mut out)),
        &image.data,
        image.width,
        image.height,
        color,
    )
    .expect("encoding a well-formed image into memory cannot fail");
    out
}

impl Sink for TensorBoard {
    fn scalar(&mut self, tag: &str, step: i64, value: f64) {
        let r = self.writer.write_scalar(tag, step, value as f32);
        self.check(r);
    }

    fn image(&mut self, tag: &str, step: i64, image: &Image) {
        let tb = TbImage {
            height: image.height as i32,
            width: image.width as i32,
            colorspace: i32::from(image.channels),
            encoded_image_string: encode_png(image),
        };
        let r = self.writer.write_image(tag, step, tb);
        self.check(r);
    }

    fn histogram(&mut self, tag: &str, step: i64, values: &[f32]) {
        let r = self.writer.write_histogram(tag, step, values);
        self.check(r);
    }

    fn flush(&mut self) {
        let r = self.writer.flush();
        self.check(r);
    }
}

/// Nearest-neighbour upscaling by an integer factor, so 28-pixel views are not thumbnails in TensorBoard.
pub fn upscale(image: &Image, factor: u32) -> Image {
    if factor <= 1 {
        return image.clone();
    }
    let (w, h, c) = (image.width as usize, image.height as usize, image.channels as usize);
    let f = factor as usize;
    let mut data = Vec::with_capacity(w * h * c * f * f);
    for y in 0..h * f {
        let row = &image.data[(y / f) * w * c..(y / f + 1) * w * c];
        for x in 0..w * f {
            data.extend_from_slice(&row[(x / f) * c..(x / f + 1) * c]);
        }
    }
    Image { width: image.width * factor, height: image.height * factor, channels: image.channels, data }
}

/// Lays images out in a grid with `cols` columns and a 2-pixel gray border; every cell is as large as the largest
/// image, smaller ones (multi-crop's local views) are centered in theirs.
pub fn grid(images: &[Image], cols: usize) -> Image {
    layout(images, cols, 2, 128)
}

/// Images of equal size edge to edge, row by row, on black: the sprite layout of TensorBoard's projector.
pub fn grid_tight(images: &[Image], cols: usize) -> Image {
    layout(images, cols, 0, 0)
}

fn layout(images: &[Image], cols: usize, pad: usize, background: u8) -> Image {
    let w = images.iter().map(|i| i.width as usize).max().unwrap_or(1);
    let h = images.iter().map(|i| i.height as usize).max().unwrap_or(1);
    let c = images.first().map_or(1, |i| i.channels as usize);
    let cols = cols.max(1).min(images.len().max(1));
    let rows = images.len().div_ceil(cols).max(1);
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut out = Image { width: gw as u32, height: gh as u32, channels: c as u8, data: vec![background; gw * gh * c] };
    for (k, img) in images.iter().enumerate() {
        assert_eq!(img.channels as usize, c, "grid images must have the same channels");
        let (iw, ih) = (img.width as usize, img.height as usize);
        let x0 = pad + (k % cols) * (w + pad) + (w - iw) / 2;
        let y0 = pad + (k / cols) * (h + pad) + (h - ih) / 2;
        for y in 0..ih {
            let src = &img.data[y * iw * c..(y + 1) * iw * c];
            let at = ((y0 + y) * gw + x0) * c;
            out.data[at..at + iw * c].copy_from_slice(src);
        }
    }
    out
}

/// Reads the event files of `dir` back with TensorBoard's own `EventAccumulator` (the setup venv's python and
/// `scripts/read_events.py`): `{"scalars": {tag: [[step, value]..]}, "images": {tag: [[step, w, h]..]},
/// "histograms": {tag: [[step, count]..]}}`. How the tests check what TensorBoard will show.
pub fn read_back(dir: &Path) -> Result<serde_json::Value, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/read_events.py");
    let py = crate::venv_python();
    if !py.exists() {
        return Err(format!("{} missing: run scripts/setup", py.display()));
    }
    let out =
        std::process::Command::new(&py).arg(&script).arg(dir).output().map_err(|e| format!("{}: {e}", py.display()))?;
    if !out.status.success() {
        return Err(format!("read_events.py failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("read_events.py output: {e}"))
}

/// `[N, C, H, W]` float images normalized with per-channel `mean` / `std` (as the augmentation recipes do) back
/// to 8-bit images for display; values outside [0, 1] after un-normalizing are clamped.
pub fn images_from_tensor(x: &tch::Tensor, mean: &[f32], std: &[f32]) -> Vec<Image> {
    let x = x.to_device(tch::Device::Cpu).to_kind(tch::Kind::Float);
    let [n, c, h, w] = x.size()[..] else { return Vec::new() };
    let per =
        |v: &[f32]| -> Vec<f32> { (0..c as usize).map(|i| v.get(i).or(v.first()).copied().unwrap_or(0.5)).collect() };
    let (mean, std) = (per(mean), per(std));
    let m = tch::Tensor::from_slice(&mean).view([1, c, 1, 1]);
    let s = tch::Tensor::from_slice(&std).view([1, c, 1, 1]);
    let u8s =
        ((x * s + m).clamp(0.0, 1.0) * 255.0).round().to_kind(tch::Kind::Uint8).permute([0, 2, 3, 1]).contiguous();
    let data: Vec<u8> = Vec::try_from(u8s.flatten(0, -1)).expect("u8 tensor");
    let len = (h * w * c) as usize;
    (0..n as usize)
        .map(|i| Image {
            width: w as u32,
            height: h as u32,
            channels: c as u8,
            data: data[i * len..(i + 1) * len].to_vec(),
        })
        .collect()
}

/// A confusion matrix as an image: one `cell` x `cell` gray square per (true class row, predicted class column),
/// brightness = the share of that row's images (white = all of them), on a 1-pixel dark grid. Off-diagonal
/// bright cells are the classes the model mixes up.
pub fn confusion_image(confusion: &[Vec<usize>], cell: u32) -> Image {
    let k = confusion.len().max(1) as u32;
    let side = k * (cell + 1) + 1;
    let mut data = vec![40u8; (side * side) as usize];
    for (t, row) in confusion.iter().enumerate() {
        let total = row.iter().sum::<usize>().max(1) as f64;
        for (p, &n) in row.iter().enumerate() {
            let v = (255.0 * n as f64 / total).round() as u8;
            let (x0, y0) = (1 + p as u32 * (cell + 1), 1 + t as u32 * (cell + 1));
            for y in y0..y0 + cell {
                let at = (y * side + x0) as usize;
                data[at..at + cell as usize].fill(v);
            }
        }
    }
    Image { width: side, height: side, channels: 1, data }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_centers_smaller_tiles_in_cells_of_the_largest() {
        let tile =
            |side: u32, v: u8| Image { width: side, height: side, channels: 1, data: vec![v; (side * side) as usize] };
        // Multi-crop: a 4 px global view and a 2 px local one.
        let g = grid(&[tile(4, 200), tile(2, 50)], 2);
        assert_eq!((g.width, g.height), (2 + 2 * (4 + 2), 2 + 4 + 2));
        let at = |x: usize, y: usize| g.data[y * g.width as usize + x];
        assert_eq!(at(2, 2), 200, "the large tile fills its cell");
        // Second cell starts at x = 8; the 2 px tile sits at its center (offset 1, 1).
        assert_eq!((at(9, 3), at(10, 4)), (50, 50));
        assert_eq!((at(8, 2), at(11, 5)), (128, 128), "around the small tile: background");
    }
}
