//! The photo presets end to end on real photos: the 20 ImageNet JPEGs (512 px) of PyPI's foolbox 3.3.4 wheel, which
//! scripts/setup installs into selfsup's cache (`<cache>/photos`), with the real binary.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// The 20 photos' folder; fails (rather than skips) when they are not there, saying how to get them.
fn photos() -> PathBuf {
    let dir = selfsup_pipeline::cache_dir().join("photos");
    let jpegs = std::fs::read_dir(&dir)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".jpg")).count())
        .unwrap_or(0);
    assert_eq!(jpegs, 20, "{}: expected the 20 ImageNet JPEGs of foolbox 3.3.4; run scripts/setup", dir.display());
    dir
}

/// The new user's first run: a photo preset's CPU twin on a folder of unlabeled photos, one epoch.
#[test]
fn simclr_photos_tiny_pretrains_on_a_folder_of_photos() {
    let photos = photos();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut c = Command::new(env!("CARGO_BIN_EXE_selfsup"));
    c.args(["pretrain", "--config", "simclr-photos-tiny", "--out", run.to_str().unwrap()]);
    c.args(common::sets(&[&format!("data.train={}", photos.display()), "train.epochs=1"]));
    let t = std::time::Instant::now();
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // The preset fits the photos: nothing for recipe_fit to say (a 28 px gray preset here would be warned about).
    assert!(!err.contains("shrunk to") && !err.contains("gray dataset's statistic"), "{err}");
    assert!(out.status.success(), "{c:?} failed:\n{}\n{err}", String::from_utf8_lossy(&out.stdout));
    eprintln!("simclr-photos-tiny, 1 epoch on 20 photos: {:.1} s", t.elapsed().as_secs_f64());
    assert!(run.join("checkpoints/LATEST").is_file(), "no checkpoint in {}:\n{err}", run.display());
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(config.contains("channels = 3") && config.contains("size = 96"), "{config}");
    let summary = common::json(&run.join("summary.json"));
    assert!(summary.is_object(), "{summary}");
}

/// `selfsup presets` starts with the presets for a folder of photos, and each of the six loads.
#[test]
fn presets_lists_the_photo_presets_first() {
    let list = common::ok(&["presets"]);
    let first = list.lines().next().and_then(|l| l.split_whitespace().next()).unwrap_or("");
    assert!(first.contains("-photos"), "the first preset is {first:?}:\n{list}");
    let names: Vec<&str> = list.lines().step_by(2).filter_map(|l| l.split_whitespace().next()).collect();
    let photos = names.iter().take_while(|n| n.contains("-photos")).count();
    assert!(names[photos..].iter().all(|n| !n.contains("-photos")), "{names:?}");
    for method in ["simclr", "byol", "dino"] {
        for name in [format!("{method}-photos"), format!("{method}-photos-tiny")] {
            assert!(names[..photos].contains(&name.as_str()), "{name} is not among the first presets: {names:?}");
        }
    }
    assert!(!list.contains("does not load"), "{list}");
}
