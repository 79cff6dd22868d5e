//! Antialiased bilinear resize of a crop box, the work horse of `RandomResizedCrop`.
//!
//! Same filter as PIL's `BILINEAR` and torchvision's `antialias=True`: a separable triangle
//! filter whose support widens with the downscale factor, so a 2x downscale averages 4 source
//! columns instead of sampling 2 and aliasing. When upscaling the support stays 1 and the
//! filter reduces to plain bilinear interpolation (half-pixel centers). The crop box is treated
//! as if it had been cut out first (the filter never reads outside it), as torchvision does.
//!
//! Weights are computed once per call per axis in f64, stored as 22-bit fixed point like PIL,
//! and the two passes accumulate in i32; all buffers live in a thread-local scratch so a call
//! allocates nothing once warm. The pass that shrinks more runs first (PIL always goes
//! horizontal first; only intermediate rounding differs), since the vertical pass vectorizes
//! over whole rows while the horizontal one is a short gather per pixel (RGB: 8 rows at a time,
//! staged column-major so that it vectorizes too).

use std::cell::RefCell;

use crate::image::Image;
use crate::simd::multiversion;

/// A rectangle of a source image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl CropBox {
    /// The whole of `img`.
    pub fn full(img: &Image) -> CropBox {
        CropBox { x: 0, y: 0, width: img.width, height: img.height }
    }
}

/// Fixed-point precision of the weights, as in PIL: 255 * 2^22 still fits an i32 accumulator.
const PRECISION_BITS: u32 = 22;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Per-output-sample filter taps along one axis.
#[derive(Default)]
struct Coeffs {
    /// (first input index relative to the box, number of taps) per output sample.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output sample (only the first `count` are used).
    weights: Vec<i32>,
    ksize: usize,
    /// Triangle values before normalization, reused across outputs.
    taps: Vec<f64>,
}

impl Coeffs {
    /// PIL's `precompute_coeffs` for the bilinear (triangle) filter, clamped to the box. Casts
    /// truncate like PIL's `(int)`; no `floor`/`round` calls, which are libm calls on baseline
    /// x86-64 and dominated small resizes.
    ///
    /// `fixed`: every output gets the same number of taps (a window of `ksize`, zero-padded and
    /// shifted to stay inside the input), so the horizontal pass's short inner loop always runs
    /// the same count and its branch is predicted. Otherwise zero taps at the ends are dropped,
    /// which saves whole-row passes in the vertical direction.
    fn compute(&mut self, in_size: usize, out_size: usize, fixed: bool) {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = filter_scale; // the triangle has support 1, widened when downscaling
        self.ksize = support.ceil() as usize * 2 + 1;
        let window = self.ksize.min(in_size);
        self.bounds.clear();
        self.weights.clear();
        self.weights.resize(out_size * self.ksize, 0);
        self.taps.resize(self.ksize, 0.0);
        let inv = 1.0 / filter_scale;
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax - xmin;
            let mut total = 0.0;
            for (x, t) in self.taps[..n].iter_mut().enumerate() {
                let d = ((x + xmin) as f64 - center + 0.5) * inv;
                *t = (1.0 - d.abs()).max(0.0);
                total += *t;
            }
            let norm = if total != 0.0 { (1 << PRECISION_BITS) as f64 / total } else { 0.0 };
            let taps = &self.taps[..n];
            let k = &mut self.weights[xx * self.ksize..(xx + 1) * self.ksize];
            if fixed {
                // offset + n <= window: the window ends at or after xmax.
                let first = xmin.min(in_size - window);
                for (dst, &t) in k[xmin - first..].iter_mut().zip(taps) {
                    *dst = (t * norm + 0.5) as i32;
                }
                self.bounds.push((first, window));
            } else {
                let lead = taps.iter().take_while(|&&t| t == 0.0).count().min(n - 1);
                let trail = taps[lead..].iter().rev().take_while(|&&t| t == 0.0).count();
                let trail = trail.min(n - lead - 1);
                for (dst, &t) in k.iter_mut().zip(&taps[lead..n - trail]) {
                    *dst = (t * norm + 0.5) as i32;
                }
                self.bounds.push((xmin + lead, n - lead - trail));
            }
        }
    }
}

/// Slots of the per-thread coefficient cache. Small images only ever see a few dozen
/// (box side, output side) pairs, so their weights are computed once per thread.
const CACHE_SLOTS: usize = 128;
/// Larger tables are not cached (a 512px source gives hundreds of box sides; caching them
/// would hold megabytes per thread for a small hit rate).
const CACHE_MAX_WEIGHTS: usize = 4096;

type CacheKey = (usize, usize, bool);

/// Direct-mapped cache of [`Coeffs`]; slots `CACHE_SLOTS..` are uncached work slots.
struct CoeffCache {
    keys: Vec<Option<CacheKey>>,
    slots: Vec<Coeffs>,
}

impl Default for CoeffCache {
    fn default() -> CoeffCache {
        CoeffCache { keys: vec![None; CACHE_SLOTS], slots: (0..CACHE_SLOTS + 2).map(|_| Coeffs::default()).collect() }
    }
}

impl CoeffCache {
    /// Index of a slot holding the coefficients for `key`, never `avoid` (the other axis's
    /// slot, still in use); `spare` is this axis's uncached slot.
    fn slot(&mut self, key: CacheKey, avoid: usize, spare: usize) -> usize {
        let (in_size, out_size, fixed) = key;
        let est = out_size * (2 * (in_size / out_size + 1) + 1);
        let h = (in_size as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (out_size as u64 ^ ((fixed as u64) << 32)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        let i = (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 57) as usize % CACHE_SLOTS;
        if est > CACHE_MAX_WEIGHTS || i == avoid {
            self.slots[spare].compute(in_size, out_size, fixed);
            return spare;
        }
        if self.keys[i] != Some(key) {
            self.slots[i].compute(in_size, out_size, fixed);
            self.keys[i] = Some(key);
        }
        i
    }
}

/// Rows of a larger buffer: row `i` starts at `(row0 + i) * stride + col0`.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [u8],
    stride: usize,
    row0: usize,
    col0: usize,
}

impl<'a> Rows<'a> {
    #[inline(always)]
    fn row(&self, i: usize, len: usize) -> &'a [u8] {
        let start = (self.row0 + i) * self.stride + self.col0;
        &self.data[start..start + len]
    }
}

#[derive(Default)]
struct Scratch {
    coeffs: CoeffCache,
    tmp: Vec<u8>,
    acc: Vec<i32>,
    /// A block of input rows and its results, column-major (see [`horizontal_rows_block`]).
    cols: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[inline(always)]
fn clamp8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass: input rows of `in_w` pixels, output rows of `co.bounds.len()` pixels; as
/// many rows as `dst` holds.
#[inline(always)]
fn horizontal_pass<const C: usize>(input: Rows, in_w: usize, co: &Coeffs, dst: &mut [u8]) {
    let out_w = co.bounds.len();
    for (r, out) in dst.chunks_exact_mut(out_w * C).enumerate() {
        let row = input.row(r, in_w * C);
        for (xx, px) in out.chunks_exact_mut(C).enumerate() {
            let (first, n) = co.bounds[xx];
            let w = &co.weights[xx * co.ksize..][..n];
            let taps = &row[first * C..(first + n) * C];
            let mut acc = [HALF; C];
            for (&wk, p) in w.iter().zip(taps.chunks_exact(C)) {
                for c in 0..C {
                    acc[c] += wk * p[c] as i32;
                }
            }
            for c in 0..C {
                px[c] = clamp8(acc[c]);
            }
        }
    }
}

/// Vertical pass: output row `yy` is a weighted sum of whole input rows, so the inner loop runs
/// over contiguous bytes and vectorizes.
#[inline(always)]
fn vertical_pass(input: Rows, row_len: usize, co: &Coeffs, acc: &mut Vec<i32>, dst: &mut [u8]) {
    acc.clear();
    acc.resize(row_len, 0);
    for (yy, out) in dst.chunks_exact_mut(row_len).enumerate() {
        let (first, n) = co.bounds[yy];
        let w = &co.weights[yy * co.ksize..][..n];
        acc.fill(HALF);
        for (k, &wk) in w.iter().enumerate() {
            for (a, &p) in acc.iter_mut().zip(input.row(first + k, row_len)) {
                *a += wk * p as i32;
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = clamp8(a);
        }
    }
}

/// Rows the RGB horizontal pass computes at once.
const BLOCK_ROWS: usize = 8;

/// The RGB horizontal pass for [`BLOCK_ROWS`] rows at once, for fixed windows of `K` taps. The rows are
/// copied column-major first (`cols[x]` = pixel x of the 8 rows, 24 bytes), so a tap is one weight times 24
/// contiguous bytes and vectorizes, where a row at a time is a gather of 3 bytes per tap; the results go to
/// `cols` column-major too and are copied into the rows at the end. Same sums as [`horizontal_pass`], so the
/// same bytes. (Both details matter to LLVM: with the 24 results stored straight into the rows it kept the
/// arithmetic scalar; with a run-time tap count it vectorized across taps instead, loading byte by byte.)
#[inline(always)]
fn horizontal_rows_block<const K: usize>(input: Rows, in_w: usize, co: &Coeffs, cols: &mut Vec<u8>, dst: &mut [u8]) {
    const C: usize = 3;
    const L: usize = BLOCK_ROWS * C;
    let out_w = co.bounds.len();
    cols.resize((in_w + out_w) * L, 0);
    let (src, res) = cols.as_chunks_mut::<L>().0.split_at_mut(in_w);
    for r in 0..BLOCK_ROWS {
        let row = input.row(r, in_w * C);
        for (col, px) in src.iter_mut().zip(row.as_chunks::<C>().0) {
            col[r * C..r * C + C].copy_from_slice(px);
        }
    }
    for ((&(first, _), w), out) in co.bounds.iter().zip(co.weights.chunks_exact(co.ksize)).zip(res.iter_mut()) {
        let w: &[i32; K] = w[..K].try_into().expect("window of K taps");
        let taps: &[[u8; L]; K] = src[first..first + K].try_into().expect("K columns");
        let mut acc = [HALF; L];
        for k in 0..K {
            for i in 0..L {
                acc[i] += w[k] * taps[k][i] as i32;
            }
        }
        for i in 0..L {
            out[i] = clamp8(acc[i]);
        }
    }
    for (r, row) in dst.chunks_exact_mut(out_w * C).enumerate() {
        for (px, col) in row.as_chunks_mut::<C>().0.iter_mut().zip(res.iter()) {
            px.copy_from_slice(&col[r * C..r * C + C]);
        }
    }
}

/// The horizontal pass: RGB with a common window in blocks of [`BLOCK_ROWS`] rows, the rest a row at a time.
#[inline(always)]
fn horizontal_blocked(c: usize, input: Rows, in_w: usize, co: &Coeffs, cols: &mut Vec<u8>, dst: &mut [u8]) {
    let window = co.bounds.first().map_or(0, |b| b.1);
    let mut done = 0;
    if c == 3 && matches!(window, 3 | 5 | 7 | 9 | 11) {
        let block_len = BLOCK_ROWS * co.bounds.len() * c;
        for (b, out) in dst.chunks_exact_mut(block_len).enumerate() {
            let rows = Rows { row0: input.row0 + b * BLOCK_ROWS, ..input };
            // Direct calls, not a function pointer: they must inline into the AVX2 copy.
            match window {
                3 => horizontal_rows_block::<3>(rows, in_w, co, cols, out),
                5 => horizontal_rows_block::<5>(rows, in_w, co, cols, out),
                7 => horizontal_rows_block::<7>(rows, in_w, co, cols, out),
                9 => horizontal_rows_block::<9>(rows, in_w, co, cols, out),
                _ => horizontal_rows_block::<11>(rows, in_w, co, cols, out),
            }
            done += block_len;
        }
    }
    let rest = Rows { row0: input.row0 + done / (co.bounds.len() * c), ..input };
    horizontal_body(c, rest, in_w, co, &mut dst[done..]);
}

multiversion!(fn horizontal(c: usize, input: Rows, in_w: usize, co: &Coeffs, cols: &mut Vec<u8>, dst: &mut [u8]) => horizontal_blocked);
multiversion!(fn vertical(input: Rows, row_len: usize, co: &Coeffs, acc: &mut Vec<i32>, dst: &mut [u8]) => vertical_pass);

/// [`horizontal_pass`] for fixed windows of exactly `K` taps, fully unrolled: the common
/// small windows (upscaling has 3) then run without a data-dependent inner loop.
#[inline(always)]
fn horizontal_pass_k<const C: usize, const K: usize>(input: Rows, in_w: usize, co: &Coeffs, dst: &mut [u8]) {
    let out_w = co.bounds.len();
    for (r, out) in dst.chunks_exact_mut(out_w * C).enumerate() {
        let row = input.row(r, in_w * C);
        let per_pixel = out.chunks_exact_mut(C).zip(&co.bounds).zip(co.weights.chunks_exact(co.ksize));
        for ((px, &(first, _)), w) in per_pixel {
            let w: &[i32; K] = w[..K].try_into().expect("window of K taps");
            let taps = &row[first * C..(first + K) * C];
            let mut acc = [HALF; C];
            for k in 0..K {
                for c in 0..C {
                    acc[c] += w[k] * taps[k * C + c] as i32;
                }
            }
            for c in 0..C {
                px[c] = clamp8(acc[c]);
            }
        }
    }
}

#[inline(always)]
fn horizontal_body(c: usize, input: Rows, in_w: usize, co: &Coeffs, dst: &mut [u8]) {
    // Fixed windows: every output has the same tap count.
    let window = co.bounds.first().map_or(0, |b| b.1);
    match (c, window) {
        (1, 3) => horizontal_pass_k::<1, 3>(input, in_w, co, dst),
        (1, 5) => horizontal_pass_k::<1, 5>(input, in_w, co, dst),
        (1, 7) => horizontal_pass_k::<1, 7>(input, in_w, co, dst),
        (1, _) => horizontal_pass::<1>(input, in_w, co, dst),
        (_, 3) => horizontal_pass_k::<3, 3>(input, in_w, co, dst),
        (_, 5) => horizontal_pass_k::<3, 5>(input, in_w, co, dst),
        (_, 7) => horizontal_pass_k::<3, 7>(input, in_w, co, dst),
        _ => horizontal_pass::<3>(input, in_w, co, dst),
    }
}

/// Resizes the `crop` box of `src` to `out_w x out_h` into `dst` (reshaped, allocation reused).
///
/// # Panics
/// If the box is empty or not inside `src`, or an output side is zero.
pub fn resize_crop_into(src: &Image, crop: CropBox, out_w: u32, out_h: u32, dst: &mut Image) {
    assert!(
        crop.width > 0 && crop.height > 0 && crop.x + crop.width <= src.width && crop.y + crop.height <= src.height,
        "crop box {crop:?} not inside {}x{} image",
        src.width,
        src.height
    );
    assert!(out_w > 0 && out_h > 0, "resize to empty size {out_w}x{out_h}");
    let c = src.channels as usize;
    dst.reshape(out_w, out_h, src.channels);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let (bw, bh) = (crop.width as usize, crop.height as usize);
    let boxed = Rows { data: &src.data, stride: src.stride(), row0: crop.y as usize, col0: crop.x as usize * c };

    if bw == ow && bh == oh {
        // Pure crop: the triangle weights would be exactly one tap of 1.0 anyway.
        for (r, out) in dst.data.chunks_exact_mut(ow * c).enumerate() {
            out.copy_from_slice(boxed.row(r, ow * c));
        }
        return;
    }

    SCRATCH.with(|s| {
        let mut guard = s.borrow_mut();
        let s = &mut *guard;
        let (mut ih, mut iv) = (usize::MAX, usize::MAX);
        if bw != ow {
            ih = s.coeffs.slot((bw, ow, true), usize::MAX, CACHE_SLOTS);
        }
        if bh != oh {
            iv = s.coeffs.slot((bh, oh, false), ih, CACHE_SLOTS + 1);
        }
        let empty = Coeffs::default();
        let hco = s.coeffs.slots.get(ih).unwrap_or(&empty);
        let vco = s.coeffs.slots.get(iv).unwrap_or(&empty);
        if bh == oh {
            horizontal(c, boxed, bw, hco, &mut s.cols, &mut dst.data);
        } else if bw == ow {
            vertical(boxed, ow * c, vco, &mut s.acc, &mut dst.data);
        } else {
            // Estimated cost, counting a horizontal tap ~4x a (vectorized) vertical one. RGB's blocked
            // horizontal pass is cheaper than that now, but the order decides the intermediate rounding,
            // so retuning it would change the output.
            let (kx, ky) = (hco.ksize, vco.ksize);
            let h_first = 4 * bh * ow * kx + oh * ow * ky;
            let v_first = oh * bw * ky + 4 * oh * ow * kx;
            if h_first <= v_first {
                s.tmp.resize(bh * ow * c, 0);
                horizontal(c, boxed, bw, hco, &mut s.cols, &mut s.tmp);
                let tmp = Rows { data: &s.tmp, stride: ow * c, row0: 0, col0: 0 };
                vertical(tmp, ow * c, vco, &mut s.acc, &mut dst.data);
            } else {
                s.tmp.resize(oh * bw * c, 0);
                vertical(boxed, bw * c, vco, &mut s.acc, &mut s.tmp);
                let tmp = Rows { data: &s.tmp, stride: bw * c, row0: 0, col0: 0 };
                horizontal(c, tmp, bw, hco, &mut s.cols, &mut dst.data);
            }
        }
    });
}

/// Resizes the whole image to `width x height` (allocates the result; for one-off use).
pub fn resize(src: &Image, width: u32, height: u32) -> Image {
    let mut dst = Image::zeros(1, 1, src.channels);
    resize_crop_into(src, CropBox::full(src), width, height, &mut dst);
    dst
}
