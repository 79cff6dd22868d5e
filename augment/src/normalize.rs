//! [`Normalize`]: the last step of every view, turning u8 HWC pixels into normalized f32 CHW
//! values written straight into the caller's batch buffer (no intermediate float image).

use crate::error::AugmentError;
use crate::image::Image;
use crate::simd::multiversion;

/// `(x / 255 - mean[c]) / std[c]`, computed as one multiply-add per value with the constants
/// folded at construction.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
}

impl Normalize {
    /// One (mean, std) per channel; a single value is broadcast to all channels.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Normalize, AugmentError> {
        if mean.is_empty() || mean.len() > 3 || mean.len() == 2 {
            return Err(AugmentError::param("mean", format!("must have 1 or 3 values, got {}", mean.len())));
        }
        if std.len() != mean.len() {
            return Err(AugmentError::param(
                "std",
                format!("must have as many values as mean ({}), got {}", mean.len(), std.len()),
            ));
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            return Err(AugmentError::param("mean", format!("must be finite, got {m}")));
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(AugmentError::param("std", format!("must be finite and > 0, got {s}")));
        }
        let scale = std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let bias = mean.iter().zip(&std).map(|(m, s)| -m / s).collect();
        Ok(Normalize { mean, std, scale, bias })
    }

    /// Number of (mean, std) pairs: 1 (broadcast) or 3.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// Writes `img` as normalized f32 in CHW order into `out`.
    ///
    /// # Panics
    /// If `out.len() != width * height * channels`, or this has 3 channels and `img` has 1.
    pub fn write_chw(&self, img: &Image, out: &mut [f32]) {
        let c = img.channels as usize;
        let n = img.pixels();
        assert_eq!(out.len(), n * c, "Normalize::write_chw: output slice has wrong length");
        assert!(
            self.channels() == 1 || self.channels() == c,
            "Normalize has {} channels, image has {c}",
            self.channels()
        );
        let param = |k: usize| {
            let k = if self.channels() == 1 { 0 } else { k };
            (self.scale[k], self.bias[k])
        };
        if c == 1 {
            let (s, b) = param(0);
            write_gray(&img.data, s, b, out);
        } else {
            write_rgb(&img.data, [param(0), param(1), param(2)], out);
        }
    }
}

multiversion!(fn write_gray(data: &[u8], scale: f32, bias: f32, out: &mut [f32]) => write_gray_body);
multiversion!(fn write_rgb(data: &[u8], params: [(f32, f32); 3], out: &mut [f32]) => write_rgb_body);

#[inline(always)]
fn write_gray_body(data: &[u8], scale: f32, bias: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(data) {
        *o = v as f32 * scale + bias;
    }
}

#[inline(always)]
fn write_rgb_body(data: &[u8], params: [(f32, f32); 3], out: &mut [f32]) {
    let n = data.len() / 3;
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let [(sr, br), (sg, bg), (sb, bb)] = params;
    for (((p, r), g), b) in data.as_chunks::<3>().0.iter().zip(r).zip(g).zip(b) {
        *r = p[0] as f32 * sr + br;
        *g = p[1] as f32 * sg + bg;
        *b = p[2] as f32 * sb + bb;
    }
}
