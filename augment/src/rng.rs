//! [`Rng`]: xoshiro256++ (Blackman & Vigna, <https://prng.di.unimi.it/>) seeded through
//! splitmix64. Small, fast and reproducible across platforms; written here so the stream is
//! pinned by this crate rather than by a dependency's version.

/// Small fast deterministic PRNG (xoshiro256++).
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

/// One step of splitmix64's output function: a bijective 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// Expands `seed` into the 256-bit state with splitmix64, as the xoshiro authors advise
    /// (guarantees a non-zero state and decorrelates nearby seeds).
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut s = [0u64; 4];
        for w in &mut s {
            x = x.wrapping_add(GOLDEN);
            *w = mix64(x);
        }
        Rng { s }
    }

    /// Stream for one sample in one epoch: depends only on these three numbers, so a sample
    /// gets the same augmentation whichever worker thread processes it.
    pub fn for_sample(seed: u64, epoch: u64, index: u64) -> Rng {
        // Each step is a bijection of the running hash, so for a fixed (seed, epoch) distinct
        // indices give distinct seeds; odd multipliers keep small epochs/indices far apart.
        let mut h = mix64(seed ^ 0x5851_f42d_4c95_7f2d);
        h = mix64(h ^ epoch.wrapping_mul(GOLDEN));
        h = mix64(h.wrapping_add(index.wrapping_mul(0xd1b5_4a32_d192_ed03)));
        Rng::new(h)
    }

    /// Next 64 random bits (xoshiro256++).
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)`: the top 24 bits, so every value is exactly representable and 1.0
    /// can never come out.
    #[inline]
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in `[lo, hi)` (up to f32 rounding at `hi`); `lo == hi` returns `lo`.
    #[inline]
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `[0, n)` without modulo bias (Lemire's nearly divisionless method: the
    /// 64-bit division only runs in the rare case that rejection may be needed).
    ///
    /// # Panics
    /// If `n == 0` (the range is empty).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0): empty range");
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }

    /// True with probability `p`; `p <= 0` never fires and `p >= 1` always does, because
    /// `uniform()` lies in `[0, 1)`.
    #[inline]
    pub fn bernoulli(&mut self, p: f32) -> bool {
        self.uniform() < p
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}
