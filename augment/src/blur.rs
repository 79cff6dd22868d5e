//! [`GaussianBlur`]: separable Gaussian blur with reflect padding, sigma drawn per call
//! (SimCLR blurs ImageNet views with p = 0.5, kernel ~10% of the side, sigma in [0.1, 2]).
//!
//! Fixed point: weights are Q14 and sum to exactly 2^14, the horizontal pass keeps 8 extra
//! bits in a u16 buffer and the vertical pass rounds once at the end, so a constant image comes
//! out exactly unchanged. Both passes run as "weight times a whole shifted row" loops over
//! contiguous memory, which the compiler vectorizes.

use std::cell::RefCell;

use crate::error::{check_prob, check_range, AugmentError};
use crate::image::Image;
use crate::pipeline::Transform;
use crate::rng::Rng;
use crate::simd::multiversion;

const WEIGHT_BITS: u32 = 14;

/// torchvision `_get_gaussian_kernel1d`: samples of exp(-x²/2σ²) at integer offsets
/// `-(k-1)/2 ..= (k-1)/2`, normalized to sum 1.
pub fn gaussian_kernel(kernel_size: usize, sigma: f32) -> Vec<f32> {
    let half = (kernel_size as f32 - 1.0) * 0.5;
    let mut k: Vec<f32> = (0..kernel_size)
        .map(|i| {
            let x = (i as f32 - half) / sigma;
            (-0.5 * x * x).exp()
        })
        .collect();
    let sum: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    k
}

/// Index `i` reflected into `0..n` without repeating the edge (torch "reflect" padding),
/// repeatedly if the kernel is wider than the image.
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    if m >= n as isize {
        (period - m) as usize
    } else {
        m as usize
    }
}

#[derive(Default)]
struct Scratch {
    weights: Vec<i32>,
    bufs: Buffers,
}

#[derive(Default)]
struct Buffers {
    padded: Vec<u8>,
    tmp: Vec<u16>,
    /// Start of the source row of each tap, for the row being computed.
    offsets: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Q14 weights of the kernel, rounding error folded into the center tap so the sum is exact.
fn fixed_weights(kernel_size: usize, sigma: f32, out: &mut Vec<i32>) {
    let half = (kernel_size as f32 - 1.0) * 0.5;
    let gauss = |i: usize| {
        let x = (i as f32 - half) / sigma;
        (-0.5 * x * x).exp()
    };
    let total: f32 = (0..kernel_size).map(gauss).sum();
    let one = 1i32 << WEIGHT_BITS;
    out.clear();
    out.extend((0..kernel_size).map(|i| (gauss(i) / total * one as f32).round() as i32));
    let sum: i32 = out.iter().sum();
    out[kernel_size / 2] += one - sum;
}

/// Blurs `img` in place with a `kernel_size` (odd) Gaussian of standard deviation `sigma`.
///
/// # Panics
/// If `kernel_size` is even or zero, or `sigma <= 0`.
pub fn gaussian_blur(img: &mut Image, kernel_size: usize, sigma: f32) {
    assert!(kernel_size % 2 == 1, "kernel_size must be odd, got {kernel_size}");
    assert!(sigma > 0.0, "sigma must be > 0, got {sigma}");
    SCRATCH.with(|s| {
        let mut guard = s.borrow_mut();
        let s = &mut *guard;
        fixed_weights(kernel_size, sigma, &mut s.weights);
        // Taps whose Q14 weight rounds to 0 contribute nothing: with SimCLR's sigma range most
        // of a 23-tap kernel is zero, so trimming them is exact and saves most of the work.
        let r = kernel_size / 2;
        let zeros = s.weights.iter().take_while(|&&w| w == 0).count().min(r);
        if zeros < r {
            blur_passes(img, &s.weights[zeros..kernel_size - zeros], &mut s.bufs);
        }
    });
}

multiversion!(fn blur_passes(img: &mut Image, taps: &[i32], s: &mut Buffers) => blur_body);

/// Both passes. The kernel is symmetric, so mirrored taps are added before multiplying.
#[inline(always)]
fn blur_body(img: &mut Image, taps: &[i32], s: &mut Buffers) {
    let c = img.channels as usize;
    let (w, h) = (img.width as usize, img.height as usize);
    let row_len = w * c;
    let r = taps.len() / 2;
    s.tmp.resize(h * row_len, 0);
    s.padded.resize((w + 2 * r) * c, 0);

    // Horizontal: pad each row by reflection, then out[i] = Σ_k w[k] * padded[i + k*c].
    s.offsets.clear();
    s.offsets.extend((0..taps.len()).map(|k| k * c));
    for (row, tmp_row) in img.data.chunks_exact(row_len).zip(s.tmp.chunks_exact_mut(row_len)) {
        // Only the 2r edge pixels need reflecting (a division each); the row itself is one copy.
        let (left, rest) = s.padded.split_at_mut(r * c);
        let (middle, right) = rest.split_at_mut(row_len);
        middle.copy_from_slice(row);
        for (px, dst) in left.chunks_exact_mut(c).enumerate() {
            let sx = reflect(px as isize - r as isize, w);
            dst.copy_from_slice(&row[sx * c..sx * c + c]);
        }
        for (px, dst) in right.chunks_exact_mut(c).enumerate() {
            let sx = reflect((w + px) as isize, w);
            dst.copy_from_slice(&row[sx * c..sx * c + c]);
        }
        // Q8: 8 fractional bits kept for the second pass.
        convolve(&s.padded, &s.offsets, taps, 1 << 5, tmp_row, |a| (a >> 6) as u16);
    }

    // Vertical: out row y = Σ_k w[k] * tmp row reflect(y + k - r).
    for (y, out) in img.data.chunks_exact_mut(row_len).enumerate() {
        s.offsets.clear();
        s.offsets.extend((0..taps.len()).map(|k| reflect(y as isize + k as isize - r as isize, h) * row_len));
        let round = 1 << (WEIGHT_BITS + 8 - 1);
        convolve(&s.tmp, &s.offsets, taps, round, out, |a| (a >> (WEIGHT_BITS + 8)).min(255) as u8);
    }
}

/// Accumulator elements per block: a stack array, so LLVM knows no other buffer overlaps it and
/// vectorizes the tap loops (over the scratch buffers' heap memory it kept them scalar, half the blur's time).
const BLOCK: usize = 128;

/// `out[i] = finish(bias + Σ_k taps[k] * src[offsets[k] + i])` for a symmetric kernel (mirrored taps added
/// before multiplying), a block of outputs at a time.
#[inline(always)]
fn convolve<T: Copy + Into<i32>, O>(
    src: &[T],
    offsets: &[usize],
    taps: &[i32],
    bias: i32,
    out: &mut [O],
    finish: impl Fn(i32) -> O,
) {
    let (r, last) = (taps.len() / 2, taps.len() - 1);
    for (b, out) in out.chunks_mut(BLOCK).enumerate() {
        let (start, len) = (b * BLOCK, out.len());
        let at = |k: usize| &src[offsets[k] + start..offsets[k] + start + len];
        let mut acc = [0i32; BLOCK];
        let acc = &mut acc[..len];
        for (a, &p) in acc.iter_mut().zip(at(r)) {
            *a = bias + taps[r] * p.into();
        }
        for (k, &wk) in taps[..r].iter().enumerate() {
            for ((a, &p), &q) in acc.iter_mut().zip(at(k)).zip(at(last - k)) {
                *a += wk * (p.into() + q.into());
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = finish(a);
        }
    }
}

/// Gaussian blur with probability `p`, sigma uniform in `sigma` per call.
#[derive(Clone, Debug)]
pub struct GaussianBlur {
    kernel_size: usize,
    sigma: (f32, f32),
    p: f32,
}

impl GaussianBlur {
    /// `kernel_size` must be odd (1 = no-op); `sigma` = (lo, hi) with 0 < lo <= hi.
    pub fn new(kernel_size: u32, sigma: (f32, f32), p: f32) -> Result<GaussianBlur, AugmentError> {
        if kernel_size.is_multiple_of(2) {
            return Err(AugmentError::param("blur.kernel_size", format!("must be odd, got {kernel_size}")));
        }
        check_range("blur.sigma", sigma, 0.0)?;
        check_prob("blur.p", p)?;
        Ok(GaussianBlur { kernel_size: kernel_size as usize, sigma, p })
    }

    /// The (odd) kernel size.
    pub fn kernel_size(&self) -> u32 {
        self.kernel_size as u32
    }
}

impl Transform for GaussianBlur {
    fn apply(&self, img: &mut Image, rng: &mut Rng) {
        if rng.bernoulli(self.p) {
            let sigma = rng.range(self.sigma.0, self.sigma.1);
            gaussian_blur(img, self.kernel_size, sigma);
        }
    }
}
