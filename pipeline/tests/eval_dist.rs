//! Evaluation sharded over a real process group (ranks as threads, Gloo over 127.0.0.1): each rank extracts its
//! slice of every batch and every rank gets the whole set, row for row what one process extracts, with unreadable
//! samples counted over the ranks, an uneven last batch and a rank left with no readable row in a batch.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use selfsup_augment::RecipeConfig;
use selfsup_models::dist::{Backend, Dist, GroupSpec};
use selfsup_pipeline::eval::{extract, ExtractOptions, Features};
use selfsup_pipeline::source::{self, Source};
use tch::{Device, Kind, Tensor};

/// Three classes of 8, 8 and 7 small PNGs (pixels a function of class and index) and two files that are not
/// images, next to each other: 25 files in batches of 4, so the last batch has one row (ranks 0 and 1 hold none),
/// and with 2 ranks, rank 0's half of the fourth batch is the two unreadable files.
fn folder(dir: &Path) {
    for (c, class) in ["ankle", "bag", "coat"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        let n = if c == 2 { 7 } else { 8 };
        for i in 0..n {
            let img = image::GrayImage::from_fn(12, 10, |x, y| {
                image::Luma([((x * 7 + y * 3 + i * 29 + c as u32 * 71) % 256) as u8])
            });
            img.save(dir.join(class).join(format!("{i:02}.png"))).unwrap();
        }
    }
    std::fs::write(dir.join("bag").join("03a.png"), b"not a png at all").unwrap();
    std::fs::write(dir.join("bag").join("03b.png"), b"\x89PNG\r\n\x1a\n truncated").unwrap();
}

fn opts<'a>(recipe: &'a RecipeConfig, dist: Option<&'a Dist>) -> ExtractOptions<'a> {
    ExtractOptions {
        recipe,
        batch_size: 4,
        threads: 1,
        device: Device::Cpu,
        limit: 0,
        autocast: false,
        dist,
        progress: None,
        stop_on_signal: false,
        data: "the test folder",
    }
}

/// Two feature sets per pass (as evaluation's network and raw pixels): the pixels and a per-row statistic.
fn run(dir: &Path, dist: Option<&Dist>) -> Vec<Features> {
    let src: Arc<dyn Source> = source::open(dir, 1).unwrap().into();
    let recipe = RecipeConfig::simclr(8, 1);
    let pixels = |x: &Tensor| x.flatten(1, -1);
    let stats = |x: &Tensor| {
        Tensor::stack(
            &[x.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float), x.amax([1i64, 2, 3].as_slice(), false)],
            1,
        )
    };
    extract(src, &opts(&recipe, dist), &[&pixels, &stats]).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

#[test]
fn sharded_extraction_equals_one_process_for_2_and_3_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    folder(tmp.path());
    let one = run(tmp.path(), None);
    assert_eq!(one[0].x.size(), vec![23, 64], "23 readable images of 8 x 8");
    assert_eq!(one[1].x.size(), vec![23, 2]);
    assert_eq!(one[0].unreadable, 2);
    let labels: Vec<i64> = Vec::try_from(&one[0].y).unwrap();
    assert_eq!(labels.iter().filter(|&&l| l == 1).count(), 8, "the unreadable bags are left out: {labels:?}");

    for world in [2usize, 3] {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tmp.path().to_path_buf();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let spec = GroupSpec {
                        backend: Backend::Gloo,
                        rank,
                        world,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        timeout: Duration::from_secs(30),
                        gloo_iface: String::new(),
                        agent_store: false,
                        host_channel: false,
                    };
                    let d = Dist::connect(&spec, Device::Cpu).expect("joining the group");
                    let f = run(&dir, Some(&d));
                    f.iter().map(|s| (values(&s.x), values(&s.y), s.unreadable)).collect::<Vec<_>>()
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let got = h.join().expect("a rank panicked");
            for (set, (x, y, bad)) in got.iter().enumerate() {
                assert_eq!(x, &values(&one[set].x), "world {world}, rank {rank}, set {set}: features differ");
                assert_eq!(y, &values(&one[set].y), "world {world}, rank {rank}: labels differ");
                assert_eq!(*bad, 2, "world {world}, rank {rank}: each unreadable file counted once over the ranks");
            }
        }
    }
}
