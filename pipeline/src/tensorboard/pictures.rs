//! Pictures for TensorBoard: PNG encoding, view grids, the projector's sprite, tensors back to images, and the
//! confusion matrix.

use std::io::Cursor;

use selfsup_augment::Image;

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

/// A confusion matrix as an RGB picture, readable at 10 and at 100 classes: one cell per (true class row,
/// predicted class column) coloured by the share of that row's images (viridis: dark blue = none, yellow = all),
/// the share printed in the cell as a percentage when cells are large enough for it (up to ~20 classes), class
/// names on both axes (columns written bottom-up), axis titles, and a colour bar. `names` may be shorter than the
/// matrix (missing names are the class index).
pub fn confusion_image(confusion: &[Vec<usize>], names: &[String]) -> Image {
    let k = confusion.len().max(1);
    // 48 px cells at 10 classes, 10 px at 64 or more: the picture stays under ~1,300 px a side.
    let cell = (640 / k).clamp(10, 48);
    let label = |i: usize| -> String {
        let name = names.get(i).cloned().unwrap_or_else(|| i.to_string());
        name.chars().take(MAX_LABEL).collect()
    };
    let longest = (0..k).map(|i| label(i).chars().count()).max().unwrap_or(1);
    let (title, gap) = (GLYPH + 6, 6);
    let left = title + longest * GLYPH + gap;
    let top = title + longest * GLYPH + gap;
    let side = k * cell;
    let bar = 14;
    let (w, h) = (left + side + 8, top + side + 8 + bar + GLYPH + 12);
    let mut img = Canvas::new(w, h, [255, 255, 255]);
    let ink = [0, 0, 0];
    img.text("true class", 2, top + side / 2 + 5 * GLYPH, ink, true);
    img.text("predicted class", (left + side / 2).saturating_sub(15 * GLYPH / 2), 2, ink, false);
    for (t, row) in confusion.iter().enumerate() {
        let total = row.iter().sum::<usize>();
        let name = label(t);
        let y = top + t * cell + (cell - GLYPH) / 2;
        img.text(&name, left - gap - name.chars().count() * GLYPH, y, ink, false);
        for (p, &n) in row.iter().enumerate() {
            let share = if total > 0 { n as f64 / total as f64 } else { 0.0 };
            let (x0, y0) = (left + p * cell, top + t * cell);
            let colour = viridis(share);
            img.fill(x0, y0, cell, cell, colour);
            if cell >= 32 && n > 0 {
                let pct = match (100.0 * share).round() as u32 {
                    0 => "<1%".to_string(),
                    p => format!("{p}%"),
                };
                let fg = if share < 0.6 { [255, 255, 255] } else { [0, 0, 0] };
                let tx = x0 + cell.saturating_sub(pct.len() * GLYPH) / 2;
                img.text(&pct, tx, y0 + (cell - GLYPH) / 2, fg, false);
            }
        }
    }
    for p in 0..k {
        let name = label(p);
        // Vertical, reading bottom-up, ending just above the matrix.
        let x = left + p * cell + (cell - GLYPH) / 2;
        img.text(&name, x, top - gap, ink, true);
    }
    // Cell borders at large sizes, so that neighbouring equal shares stay separate cells.
    if cell >= 20 {
        for i in 0..=k {
            img.fill(left + i * cell, top, 1, side, [255, 255, 255]);
            img.fill(left, top + i * cell, side + 1, 1, [255, 255, 255]);
        }
    }
    // The colour bar: 0% .. 100% under the matrix.
    let y_bar = top + side + 8;
    for x in 0..side {
        img.fill(left + x, y_bar, 1, bar, viridis(x as f64 / (side.max(2) - 1) as f64));
    }
    img.text("0%", left, y_bar + bar + 3, ink, false);
    img.text("100%", (left + side).saturating_sub(4 * GLYPH), y_bar + bar + 3, ink, false);
    img.text("share of the row", (left + side / 2).saturating_sub(8 * GLYPH), y_bar + bar + 3, ink, false);
    img.into_image()
}

/// Pixels per character of the 8x8 bitmap font.
const GLYPH: usize = 8;
/// Class names longer than this are cut.
const MAX_LABEL: usize = 18;

/// An RGB drawing surface with clipped rectangle fills and 8x8 bitmap text (the public-domain `font8x8` glyphs).
struct Canvas {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize, background: [u8; 3]) -> Canvas {
        Canvas { w, h, data: background.repeat(w * h) }
    }

    fn put(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let at = 3 * (y * self.w + x);
            self.data[at..at + 3].copy_from_slice(&c);
        }
    }

    fn fill(&mut self, x0: usize, y0: usize, w: usize, h: usize, c: [u8; 3]) {
        for y in y0..(y0 + h).min(self.h) {
            for x in x0..(x0 + w).min(self.w) {
                self.put(x, y, c);
            }
        }
    }

    /// Draws `s` with its top-left corner at (`x`, `y`); `vertical`: rotated 90° counter-clockwise, reading
    /// bottom-up from (`x`, `y`), which is then its bottom-left corner. Characters outside the font are '?'.
    fn text(&mut self, s: &str, x: usize, y: usize, c: [u8; 3], vertical: bool) {
        use font8x8::UnicodeFonts;
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(ch).or_else(|| font8x8::BASIC_FONTS.get('?')).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..GLYPH {
                    if bits >> col & 1 == 1 {
                        if vertical {
                            // Glyph column -> upwards, glyph row -> rightwards.
                            let (px, py) = (x + row, (y + GLYPH).wrapping_sub(1 + i * GLYPH + col + GLYPH));
                            self.put(px, py, c);
                        } else {
                            self.put(x + i * GLYPH + col, y + row, c);
                        }
                    }
                }
            }
        }
    }

    fn into_image(self) -> Image {
        Image { width: self.w as u32, height: self.h as u32, channels: 3, data: self.data }
    }
}

/// matplotlib's viridis colour map at `v` in [0, 1] (linear between 9 of its stops): perceptually uniform, and
/// readable in grey and by colour-blind readers.
pub fn viridis(v: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 9] = [
        [68.0, 1.0, 84.0],
        [71.0, 44.0, 122.0],
        [59.0, 81.0, 139.0],
        [44.0, 113.0, 142.0],
        [33.0, 144.0, 141.0],
        [39.0, 173.0, 129.0],
        [92.0, 200.0, 99.0],
        [170.0, 220.0, 50.0],
        [253.0, 231.0, 37.0],
    ];
    let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 } * (STOPS.len() - 1) as f64;
    let i = (v.floor() as usize).min(STOPS.len() - 2);
    let f = v - i as f64;
    let mix = |c: usize| (STOPS[i][c] * (1.0 - f) + STOPS[i + 1][c] * f).round() as u8;
    [mix(0), mix(1), mix(2)]
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

#[cfg(test)]
mod confusion_tests {
    use super::*;

    fn pixel(img: &Image, x: usize, y: usize) -> [u8; 3] {
        let at = 3 * (y * img.width as usize + x);
        [img.data[at], img.data[at + 1], img.data[at + 2]]
    }

    #[test]
    fn viridis_ends_and_middle() {
        assert_eq!(viridis(0.0), [68, 1, 84]);
        assert_eq!(viridis(1.0), [253, 231, 37]);
        assert_eq!(viridis(0.5), [33, 144, 141]);
        assert_eq!(viridis(f64::NAN), viridis(0.0));
        assert_eq!(viridis(7.0), viridis(1.0));
    }

    #[test]
    fn confusion_cells_are_coloured_by_row_share_with_labels_around() {
        // 2 classes: class 0 always right, class 1 right 3 times out of 4.
        let names = ["T-shirt".to_string(), "Trouser".to_string()];
        let img = confusion_image(&[vec![8, 0], vec![1, 3]], &names);
        assert_eq!(img.channels, 3);
        let cell = 48;
        let longest = 7 * GLYPH;
        let (left, top) = (GLYPH + 6 + longest + 6, GLYPH + 6 + longest + 6);
        // Sample each cell off its centre (the centre holds the printed share), inside its border.
        let at = |t: usize, p: usize| pixel(&img, left + p * cell + 3, top + t * cell + 3);
        assert_eq!(at(0, 0), viridis(1.0));
        assert_eq!(at(0, 1), viridis(0.0));
        assert_eq!(at(1, 0), viridis(0.25));
        assert_eq!(at(1, 1), viridis(0.75));
        // Text was drawn: dark pixels left of the matrix (row names) and above it (column names).
        let dark = |x0: usize, x1: usize, y0: usize, y1: usize| {
            (y0..y1).any(|y| (x0..x1).any(|x| pixel(&img, x, y) == [0, 0, 0]))
        };
        assert!(dark(GLYPH + 6, left - 6, top, top + cell), "row name of class 0");
        assert!(dark(left, left + cell, GLYPH + 6, top - 6), "column name of class 0");
        // The 75% cell holds its percentage in black (bright cell), the 25% cell in white.
        let (cx, cy) = (left + cell + cell / 2, top + cell + cell / 2);
        assert!((cy - 4..cy + 4).any(|y| (cx - 12..cx + 12).any(|x| pixel(&img, x, y) == [0, 0, 0])));
        let (cx, cy) = (left + cell / 2, top + cell + cell / 2);
        assert!((cy - 4..cy + 4).any(|y| (cx - 12..cx + 12).any(|x| pixel(&img, x, y) == [255, 255, 255])));
    }

    #[test]
    fn confusion_at_100_classes_stays_bounded_and_skips_numbers() {
        let k = 100;
        let m: Vec<Vec<usize>> = (0..k).map(|t| (0..k).map(|p| usize::from(t == p) * 9 + 1).collect()).collect();
        let names: Vec<String> = (0..k).map(|i| format!("class number {i} with a long name")).collect();
        let img = confusion_image(&m, &names);
        assert!(img.width <= 1400 && img.height <= 1500, "{}x{}", img.width, img.height);
        // An empty matrix and missing names do not panic.
        let empty = confusion_image(&[], &[]);
        assert!(empty.width > 0);
        let unnamed = confusion_image(&[vec![1, 0, 0], vec![0, 1, 0], vec![0, 0, 0]], &[]);
        assert_eq!(unnamed.channels, 3);
    }
}
