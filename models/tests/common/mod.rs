//! Shared by the models' integration tests: torch's global RNG and inputs that do not come from it.
//!
//! The tests of one binary run on parallel threads of one process, and every `Tensor::randn`, dropout mask and
//! `VarStore` initialisation draws from the one global CPU generator. A test whose outcome depends on the values
//! drawn either draws its inputs from [`normal`] or holds [`torch_rng`] for its whole body; once a binary uses
//! [`torch_rng`], every test of it that draws from torch's RNG holds it (docs/testing.md).

#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use tch::{Kind, Tensor};

static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Locks this binary's torch RNG lock (also after a test panicked holding it) and seeds torch's global RNG with
/// `seed`. Keep the guard for the whole test: `let _rng = common::torch_rng(0);`.
pub fn torch_rng(seed: i64) -> MutexGuard<'static, ()> {
    let guard = TORCH_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    guard
}

/// Standard-normal values of `shape` and `kind` from our own generator (splitmix64, Box-Muller): the same for the
/// same `seed` whatever other threads draw from torch's RNG.
pub fn normal(shape: &[i64], kind: Kind, seed: u64) -> Tensor {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        // 53 bits in (0, 1]: never 0, so the logarithm below is finite.
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 + f64::EPSILON / 2.0
    };
    let n: i64 = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_slice(&values).view(shape).to_kind(kind)
}
