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
    acc: Vec<i32>,
    tmp: Vec<u16>,
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
    let last = taps.len() - 1;
    s.tmp.resize(h * row_len, 0);
    s.acc.resize(row_len, 0);
    s.padded.resize((w + 2 * r) * c, 0);

    // Horizontal: pad each row by reflection, then out[i] = Σ_k w[k] * padded[i + k*c].
    for (row, tmp_row) in img.data.chunks_exact(row_len).zip(s.tmp.chunks_exact_mut(row_len)) {
        for (px, dst) in s.padded.chunks_exact_mut(c).enumerate() {
            let sx = reflect(px as isize - r as isize, w);
            dst.copy_from_slice(&row[sx * c..sx * c + c]);
        }
        let center = &s.padded[r * c..r * c + row_len];
        for (a, &p) in s.acc.iter_mut().zip(center) {
            *a = (1 << 5) + taps[r] * p as i32;
        }
        for (k, &wk) in taps[..r].iter().enumerate() {
            let left = &s.padded[k * c..k * c + row_len];
            let right = &s.padded[(last - k) * c..(last - k) * c + row_len];
            for ((a, &p), &q) in s.acc.iter_mut().zip(left).zip(right) {
                *a += wk * (p as i32 + q as i32);
            }
        }
        for (t, &a) in tmp_row.iter_mut().zip(s.acc.iter()) {
            *t = (a >> 6) as u16; // Q8: 8 fractional bits kept for the second pass
        }
    }

    // Vertical: out row y = Σ_k w[k] * tmp row reflect(y + k - r).
    let tmp_row = |y: usize, k: usize| {
        let sy = reflect(y as isize + k as isize - r as isize, h);
        &s.tmp[sy * row_len..(sy + 1) * row_len]
    };
    for (y, out) in img.data.chunks_exact_mut(row_len).enumerate() {
        for (a, &p) in s.acc.iter_mut().zip(tmp_row(y, r)) {
            *a = (1 << (WEIGHT_BITS + 8 - 1)) + taps[r] * p as i32;
        }
        for (k, &wk) in taps[..r].iter().enumerate() {
            for ((a, &p), &q) in s.acc.iter_mut().zip(tmp_row(y, k)).zip(tmp_row(y, last - k)) {
                *a += wk * (p as i32 + q as i32);
            }
        }
        for (o, &a) in out.iter_mut().zip(s.acc.iter()) {
            *o = (a >> (WEIGHT_BITS + 8)).min(255) as u8;
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
