//! Properties of the deterministic PRNG.

use std::collections::HashSet;

use selfsup_augment::Rng;

#[test]
fn same_seed_same_stream_different_seed_differs() {
    let a: Vec<u64> = (0..100).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
    let b: Vec<u64> = (0..100).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
    let c: Vec<u64> = (0..100).scan(Rng::new(8), |r, _| Some(r.next_u64())).collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().zip(&c).all(|(x, y)| x != y), "neighbouring seeds must decorrelate");
}

#[test]
fn for_sample_is_deterministic_and_distinct() {
    let mut seen = HashSet::new();
    for seed in [0u64, 1, 42] {
        for epoch in 0..20u64 {
            for index in 0..500u64 {
                let x = Rng::for_sample(seed, epoch, index).next_u64();
                assert_eq!(x, Rng::for_sample(seed, epoch, index).next_u64());
                assert!(seen.insert(x), "collision at seed {seed} epoch {epoch} index {index}");
            }
        }
    }
    // Swapping epoch and index must not give the same stream.
    assert_ne!(Rng::for_sample(0, 1, 2).next_u64(), Rng::for_sample(0, 2, 1).next_u64());
}

#[test]
fn uniform_and_range_stay_in_bounds_with_right_mean() {
    let mut rng = Rng::new(1);
    let n = 200_000;
    let mut sum = 0.0f64;
    for _ in 0..n {
        let u = rng.uniform();
        assert!((0.0..1.0).contains(&u));
        sum += u as f64;
        let r = rng.range(-3.0, 5.0);
        assert!((-3.0..=5.0).contains(&r));
    }
    let mean = sum / n as f64;
    assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
    assert_eq!(rng.range(2.5, 2.5), 2.5);
}

#[test]
fn below_is_in_range_and_roughly_uniform() {
    let mut rng = Rng::new(3);
    assert_eq!(rng.below(1), 0);
    let n = 7u64;
    let mut counts = [0u32; 7];
    for _ in 0..70_000 {
        let v = rng.below(n);
        assert!(v < n);
        counts[v as usize] += 1;
    }
    for c in counts {
        assert!((9_400..10_600).contains(&c), "counts {counts:?}");
    }
    // Large n (rejection path) still in range.
    for _ in 0..1000 {
        assert!(rng.below(u64::MAX / 3 * 2) < u64::MAX / 3 * 2);
    }
}

#[test]
fn bernoulli_extremes_and_frequency() {
    let mut rng = Rng::new(5);
    let mut hits = 0;
    for _ in 0..100_000 {
        assert!(!rng.bernoulli(0.0));
        assert!(rng.bernoulli(1.0));
        hits += rng.bernoulli(0.3) as u32;
    }
    let f = hits as f64 / 100_000.0;
    assert!((f - 0.3).abs() < 0.01, "frequency {f}");
}

#[test]
fn shuffle_is_a_permutation_and_varies() {
    let mut rng = Rng::new(11);
    let mut orders = HashSet::new();
    for _ in 0..200 {
        let mut v: Vec<u32> = (0..4).collect();
        rng.shuffle(&mut v);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
        orders.insert(v);
    }
    assert_eq!(orders.len(), 24, "all 4! orders should appear in 200 shuffles");
    let mut empty: [u8; 0] = [];
    rng.shuffle(&mut empty);
}
