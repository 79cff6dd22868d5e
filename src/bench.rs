//! `selfsup bench-loader`: the data stage alone, as fast as it goes. The last line is `pairs_per_s=<number>`
//! (a pair = one sample with all the views its objective needs).

use selfsup_pipeline::out;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use selfsup_augment::Views;
use selfsup_pipeline::config::ShuffleMode;
use selfsup_pipeline::loader::{Loader, LoaderConfig};
use selfsup_pipeline::source::{self, Source};

pub struct Options {
    pub seconds: f64,
    pub threads: Option<usize>,
    pub gpu_img_per_s: Option<f64>,
}

pub fn run(spec: &str, set: &[String], opts: Options) -> Result<()> {
    let Options { seconds, threads, gpu_img_per_s } = opts;
    let cfg = crate::load_config(spec, set)?;
    let src: Arc<dyn Source> = source::open_with(&cfg.data.train, cfg.data.open_options())?.into();
    let channels = src.channels();
    let recipes = cfg.view_recipes().iter().map(|r| r.build(channels)).collect::<Result<Vec<_>, _>>()?;
    let lc = LoaderConfig {
        batch_size: cfg.train.batch_size,
        threads: threads.unwrap_or(cfg.train.threads),
        prefetch: cfg.train.prefetch,
        seed: cfg.seed,
        shuffle: true,
        full_shuffle: cfg.data.shuffle == ShuffleMode::Full,
        drop_last: true,
        slice: (0, 1),
    };
    let loader = Loader::new(src.clone(), Arc::new(Views::new(recipes)), lc)?;
    selfsup_pipeline::say!(
        "bench-loader: {} samples, batch {}, {} views, {} threads, {:.0}s",
        src.len(),
        cfg.train.batch_size,
        cfg.objective.num_views(),
        loader.threads(),
        seconds
    );
    // The first batch pays for thread start-up and page-cache misses: not counted.
    let mut epoch = 0u64;
    let mut it = loader.epoch(epoch);
    let _ = it.next();
    let times = loader.stage_times.clone();
    let (t0, s0) = times.snapshot();
    let start = Instant::now();
    let mut pairs = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        match it.next() {
            Some(b) => pairs += b.len(),
            None => {
                epoch += 1;
                it = loader.epoch(epoch);
            }
        }
    }
    let dt = start.elapsed().as_secs_f64();
    drop(it);
    let (t1, s1) = times.snapshot();
    let samples = (s1 - s0).max(1) as f64;
    let per: Vec<f64> = (0..4).map(|i| (t1[i] - t0[i]) as f64 / samples / 1000.0).collect();
    let total: f64 = per.iter().sum();
    let share = |x: f64| 100.0 * x / total.max(1e-12);
    selfsup_pipeline::say!(
        "per sample, one thread's time: read {:.2} us ({:.0}%), decode {:.2} us ({:.0}%), \
         augment all views + normalize {:.2} us ({:.0}%), collate {:.2} us ({:.0}%)",
        per[0],
        share(per[0]),
        per[1],
        share(per[1]),
        per[2],
        share(per[2]),
        per[3],
        share(per[3])
    );
    let rate = pairs as f64 / dt;
    if let Some(gpu) = gpu_img_per_s {
        // Assumes near-linear scaling with threads (see scripts/bench-augment --scaling).
        let per_thread = rate / loader.threads() as f64;
        let needed = (gpu / per_thread).ceil() as usize;
        if rate >= gpu {
            out!(
                "a GPU at {gpu:.0} samples/s would not wait: this loader makes {rate:.0}/s ({:.1}x headroom)",
                rate / gpu
            );
        } else {
            out!(
                "a GPU at {gpu:.0} samples/s WOULD wait ({:.0}% of the time): it needs ~{needed} threads at {per_thread:.0}/s each",
                100.0 * (1.0 - rate / gpu)
            );
        }
    }
    out!("pairs_per_s={rate:.1}");
    Ok(())
}
