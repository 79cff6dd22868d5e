//! Runtime dispatch of hot loops to a copy compiled with AVX2.
//!
//! Release builds target baseline x86-64 (SSE2), where the i32 multiply-accumulate loops of
//! resize and blur barely vectorize. `multiversion!` defines a function that calls an
//! `#[inline(always)]` body either as compiled for the baseline or as compiled a second time
//! with AVX2 enabled, picked at run time by CPU detection. Only integer and plain IEEE float
//! arithmetic (no FMA contraction) runs inside, so both copies give bit-identical results and
//! augmentations stay reproducible across machines.

/// `multiversion!(fn name(a: A, b: B) => body_fn);` defines `fn name(a: A, b: B)` that runs
/// `body_fn(a, b)` with AVX2 when the CPU has it. `body_fn` (and everything it calls) must be
/// `#[inline(always)]` so it is compiled into the AVX2 copy rather than called from it.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:path) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn with_avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if $crate::simd::avx2_allowed() {
                    // SAFETY: `with_avx2` only requires AVX2, which the CPU was just found to have.
                    return unsafe { with_avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

#[cfg(test)]
thread_local! {
    /// Lets tests run the baseline copies on an AVX2 machine, to compare both.
    static FORCE_BASELINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the AVX2 copies may run: the CPU has AVX2 (the check is a cached atomic load).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn avx2_allowed() -> bool {
    #[cfg(test)]
    if FORCE_BASELINE.get() {
        return false;
    }
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(test)]
mod tests {
    use super::FORCE_BASELINE;
    use crate::{resize, Image, Pipeline, RecipeConfig, Rng};

    fn noise(w: u32, h: u32, c: u8, seed: u64) -> Image {
        let mut rng = Rng::new(seed);
        let data = (0..w * h * c as u32).map(|_| rng.below(256) as u8).collect();
        Image::new(w, h, c, data).unwrap()
    }

    fn outputs(pipe: &Pipeline, src: &Image) -> Vec<Vec<f32>> {
        (0..40)
            .map(|seed| {
                let mut out = vec![0f32; pipe.out_len()];
                pipe.run(src, &mut Rng::new(seed), &mut out);
                out
            })
            .collect()
    }

    /// Every op with p = 1 (or 0.5 for the ones that would hide others), on gray and RGB,
    /// through both copies: results must be bit-identical.
    #[test]
    fn baseline_and_avx2_copies_agree() {
        for (c, size, w, h) in [(1u8, 28, 28, 28), (3, 40, 61, 47), (3, 24, 13, 90)] {
            let mut cfg = RecipeConfig::simclr(size, c);
            cfg.jitter.p = 1.0;
            cfg.grayscale_p = 0.3;
            cfg.blur.p = 1.0;
            cfg.solarize_p = 0.5;
            cfg.equalize_p = 0.5;
            let pipe = cfg.build(c).unwrap();
            let src = noise(w, h, c, 7);
            let fast = outputs(&pipe, &src);
            let resized = resize(&src, 17, 33);
            FORCE_BASELINE.set(true);
            let slow = outputs(&pipe, &src);
            let resized_slow = resize(&src, 17, 33);
            FORCE_BASELINE.set(false);
            assert!(fast == slow, "outputs differ between copies for {c} channels");
            assert_eq!(resized, resized_slow);
        }
    }
}
