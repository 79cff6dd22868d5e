//! The loader on real Fashion-MNIST: bit-identical batches for any thread count, per-epoch shuffling that
//! covers every sample once, drop-last, and the views' shapes.

mod common;

use std::sync::Arc;

use selfsup_augment::{RecipeConfig, Views};
use selfsup_pipeline::loader::{HostBatch, Loader, LoaderConfig};
use selfsup_pipeline::source::{self, Prefix, Source};

fn loader(n: usize, threads: usize, batch: usize, drop_last: bool) -> Loader {
    sliced(n, threads, batch, drop_last, (0, 1))
}

fn sliced(n: usize, threads: usize, batch: usize, drop_last: bool, slice: (usize, usize)) -> Loader {
    let src: Arc<dyn Source> = source::open(common::fmnist_train(), 1).unwrap().into();
    let src: Arc<dyn Source> = Arc::new(Prefix::new(src, n));
    let recipe = RecipeConfig::simclr(28, 1);
    let views = Views::new(vec![recipe.build(1).unwrap(), recipe.build(1).unwrap()]);
    let cfg = LoaderConfig {
        batch_size: batch,
        threads,
        prefetch: 2,
        seed: 42,
        shuffle: true,
        full_shuffle: false,
        drop_last,
        slice,
    };
    Loader::new(src, Arc::new(views), cfg).unwrap()
}

/// Data parallelism: the global batch is the same pixels, rows and labels whether 1, 2 or 3 ranks load it, each
/// its slice (rank r: rows r * b / w .. (r + 1) * b / w), including from the middle of an epoch.
#[test]
fn the_global_batch_is_pixel_identical_for_1_2_and_3_ranks() {
    let one: Vec<HostBatch> = loader(400, 2, 48, true).epoch_from(1, 2).collect();
    for world in [2, 3] {
        let ranks: Vec<Vec<HostBatch>> =
            (0..world).map(|r| sliced(400, 2, 48, true, (r, world)).epoch_from(1, 2).collect()).collect();
        for (b, whole) in one.iter().enumerate() {
            let parts: Vec<&HostBatch> = ranks.iter().map(|r| &r[b]).collect();
            assert!(parts.iter().all(|p| p.len() == 48 / world), "equal slices");
            let indices: Vec<usize> = parts.iter().flat_map(|p| p.indices.clone()).collect();
            assert_eq!(indices, whole.indices, "world {world}, batch {b}: rows");
            let labels: Vec<i64> = parts.iter().flat_map(|p| p.labels.clone().unwrap()).collect();
            assert_eq!(Some(labels), whole.labels.clone());
            for v in 0..whole.views.len() {
                let pixels: Vec<u32> = parts.iter().flat_map(|p| p.views[v].iter().map(|x| x.to_bits())).collect();
                let expected: Vec<u32> = whole.views[v].iter().map(|x| x.to_bits()).collect();
                assert!(pixels == expected, "world {world}, batch {b}, view {v}: pixels differ");
            }
        }
    }
}

fn bits(batches: &[HostBatch]) -> Vec<Vec<u32>> {
    batches.iter().flat_map(|b| b.views.iter().map(|v| v.iter().map(|x| x.to_bits()).collect())).collect()
}

#[test]
fn batches_are_bit_identical_for_1_and_3_threads() {
    let one: Vec<HostBatch> = loader(700, 1, 64, true).epoch(3).collect();
    let three: Vec<HostBatch> = loader(700, 3, 64, true).epoch(3).collect();
    assert_eq!(one.len(), 700 / 64);
    assert_eq!(bits(&one), bits(&three));
    assert_eq!(
        one.iter().map(|b| b.indices.clone()).collect::<Vec<_>>(),
        three.iter().map(|b| b.indices.clone()).collect::<Vec<_>>()
    );
    // The two views of a sample differ (independent random crops), and epochs differ.
    assert_ne!(one[0].views[0], one[0].views[1]);
    let other: Vec<HostBatch> = loader(700, 2, 64, true).epoch(4).collect();
    assert_ne!(bits(&one), bits(&other));
}

#[test]
fn an_epoch_visits_every_sample_once_in_a_new_order() {
    let l = loader(300, 2, 32, false);
    let a: Vec<usize> = l.epoch(0).flat_map(|b| b.indices.clone()).collect();
    let b: Vec<usize> = l.epoch(1).flat_map(|b| b.indices.clone()).collect();
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..300).collect::<Vec<_>>());
    assert_ne!(a, b);
    assert_ne!(a, (0..300).collect::<Vec<_>>(), "shuffled");
    // drop_last = false keeps the short final batch: 9 full + 12.
    assert_eq!(l.epoch(0).map(|b| b.len()).collect::<Vec<_>>().last(), Some(&12));
}

#[test]
fn batch_layout_and_labels() {
    let l = loader(128, 2, 64, true);
    let b = l.epoch(0).next().unwrap();
    assert_eq!(b.shapes, vec![[1, 28, 28], [1, 28, 28]]);
    assert_eq!(b.views[0].len(), 64 * 28 * 28);
    let labels = b.labels.as_ref().expect("Fashion-MNIST has labels");
    let all = l.source().labels().unwrap();
    for (row, &i) in b.indices.iter().enumerate() {
        assert_eq!(labels[row], all[i]);
    }
    // Normalized with mean/std 0.5: values lie in [-1, 1].
    assert!(b.views.iter().flatten().all(|x| (-1.0001..=1.0001).contains(x)));
}

#[test]
fn dropping_the_iterator_early_stops_the_producer() {
    let l = loader(2000, 2, 16, true);
    let mut it = l.epoch(0);
    assert!(it.next().is_some());
    drop(it); // must not hang on the full channel
}

#[test]
fn recycled_buffers_give_the_same_batches() {
    // Dropping each batch as it is consumed hands its buffers back for reuse; the batches must not change.
    let streamed: Vec<Vec<u32>> = loader(700, 2, 64, true)
        .epoch(5)
        .flat_map(|b| b.views.iter().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()).collect::<Vec<_>>())
        .collect();
    let kept: Vec<HostBatch> = loader(700, 2, 64, true).epoch(5).collect();
    assert_eq!(streamed, bits(&kept));
}
