//! Fine-tuning data: the low-label subset is fixed by the seed, balanced and nested; labeled data sets that do
//! not agree (classes, channels, a training set without its own test set) are refused before anything trains.

mod common;

use std::path::Path;
use std::sync::Arc;

use selfsup_pipeline::finetune::open_data;
use selfsup_pipeline::source::{self, Source, Subset};
use selfsup_pipeline::Config;

#[test]
fn low_label_subsets_are_seeded_balanced_and_nested() {
    let src: Arc<dyn Source> = source::open(common::fmnist_train(), 1).unwrap().into();
    let labels = src.labels().unwrap();
    let a = Subset::per_class(src.clone(), 100, 7).unwrap();
    let again = Subset::per_class(src.clone(), 100, 7).unwrap();
    let other = Subset::per_class(src.clone(), 100, 8).unwrap();
    assert_eq!(a.indices(), again.indices(), "same seed, same subset");
    assert_ne!(a.indices(), other.indices(), "another seed, another subset");
    assert_eq!(a.len(), 1000);
    let mut per_class = [0usize; 10];
    for &i in a.indices() {
        per_class[labels[i] as usize] += 1;
    }
    assert_eq!(per_class, [100; 10]);
    assert_eq!(a.labels().unwrap(), a.indices().iter().map(|&i| labels[i]).collect::<Vec<_>>());
    assert_eq!(a.get(5).unwrap().image, src.get(a.indices()[5]).unwrap().image);
    // 10 per class is a subset of 100 per class (same seed): more labels only add images.
    let small = Subset::per_class(src.clone(), 10, 7).unwrap();
    assert!(small.indices().iter().all(|i| a.indices().contains(i)));
    // Not spread by index order: the chosen images come from all over the file.
    assert!(a.indices().iter().any(|&i| i > 50_000) && a.indices().iter().any(|&i| i < 10_000));
}

fn write_png(path: &Path, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x as u8 * 17) ^ (y as u8 * seed)])).save(path).unwrap();
}

fn cfg(sets: &[String]) -> Result<Config, String> {
    let mut all = vec!["data.channels=1".to_string()];
    all.extend_from_slice(sets);
    Config::from_toml("", "test.toml", &all).map_err(|e| e.to_string())
}

#[test]
fn labeled_sets_that_disagree_are_refused_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (set, classes) in
        [("train", ["a", "b", "c"].as_slice()), ("test", ["a", "c"].as_slice()), ("ok", ["a", "b", "c"].as_slice())]
    {
        for (k, c) in classes.iter().enumerate() {
            for j in 0..2u8 {
                write_png(&dir.path().join(set).join(c).join(format!("{j}.png")), k as u8 * 3 + j + 1);
            }
        }
    }
    let q = |s: &str| format!("\"{}\"", dir.path().join(s).display());
    // A training set without its own test set: the config itself is refused, naming finetune.test.
    let e = cfg(&[format!("finetune.train={}", q("train"))]).unwrap_err();
    assert!(e.contains("finetune.test"), "{e}");
    // Test classes that do not line up with the training classes (label 1 = "b" in one, "c" in the other).
    let c = cfg(&[format!("finetune.train={}", q("train")), format!("finetune.test={}", q("test"))]).unwrap();
    let e = open_data(&c).err().expect("refused").to_string();
    assert!(e.contains("finetune.train") && e.contains("finetune.test") && e.contains("different classes"), "{e}");
    // Agreeing sets open, with the folder names as class names.
    let c = cfg(&[format!("finetune.train={}", q("train")), format!("finetune.test={}", q("ok"))]).unwrap();
    let (train, test, names) = open_data(&c).unwrap();
    assert_eq!((train.len(), test.len(), names), (6, 6, vec!["a".to_string(), "b".into(), "c".into()]));
}

/// A low-label subset of a packed HDF5 file still lets the loader read a batch's chunks up front: the subset maps
/// its indices to the file's chunks, and chunks already read are not asked for again.
#[test]
fn subsets_of_block_sources_forward_chunk_reads() {
    use selfsup_pipeline::pack::{self, PackOptions};
    use selfsup_pipeline::source::{Hdf5Source, Prefix};
    let dir = tempfile::tempdir().unwrap();
    let idx: Arc<dyn Source> = source::open(common::fmnist_train(), 1).unwrap().into();
    let out = dir.path().join("fm.h5");
    pack::pack_source(&Prefix::new(idx, 2000), "fmnist-2000", &out, &PackOptions::default()).unwrap();
    let h5: Arc<dyn Source> = Arc::new(Hdf5Source::open(&out, 1).unwrap());
    assert_eq!(h5.block_len(), 256);
    let sub = Subset::new(h5.clone(), vec![10, 300, 600, 1999]);
    // Subset rows 0..3 live in chunks 0, 1, 2 and 7 of the file.
    assert_eq!(sub.missing_blocks(&[0, 1, 2, 3]), vec![0, 1, 2, 7]);
    sub.load_block(1);
    assert_eq!(sub.missing_blocks(&[1, 2]), vec![2]);
    assert_eq!(sub.get(1).unwrap().image, h5.get(300).unwrap().image);
    // A prefix forwards them too.
    let pre = Prefix::new(h5, 1000);
    assert_eq!(pre.missing_blocks(&[0, 999]), vec![0, 3]);
}
