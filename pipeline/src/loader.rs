//! The parallel loader: rayon workers read, decode and augment samples straight into the batch buffers that
//! become tensors; a crossbeam bounded channel hands ready batches to the trainer, `prefetch` batches ahead.
//!
//! Determinism: the epoch's order comes from (seed, epoch) and each sample's augmentation randomness from
//! (seed, epoch, index), so batches are bit-identical whatever the number of threads.
//! A sample that cannot be read is dropped from its batch and reported in [`HostBatch::bad`]; it never panics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;
use selfsup_augment::{Rng, Views};

use crate::source::{thread_decode_ns, Source};

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Ready batches buffered ahead of the consumer.
    pub prefetch: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Shuffle sample by sample even when the source reads in blocks (slower for HDF5; same order as any other source).
    pub full_shuffle: bool,
    pub drop_last: bool,
    /// `(rank, world)`: this process loads rows `rank * b / world .. (rank + 1) * b / world` of every global batch
    /// of `b = batch_size` rows (`(0, 1)`: all of it). The order and each sample's augmentation depend only on
    /// (seed, epoch, index), so the global batch is the same pixels for any number of ranks.
    pub slice: (usize, usize),
}

/// A sample that could not be read, with where it lives and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BadSample {
    pub index: usize,
    pub location: String,
    pub error: String,
}

/// One batch in host memory: `views[v]` is `[len, C_v, H_v, W_v]` f32, row-major, ready for `Tensor::from_slice`.
#[derive(Debug)]
pub struct HostBatch {
    pub views: Vec<Vec<f32>>,
    pub shapes: Vec<[usize; 3]>,
    /// Dataset indices of the rows, in row order.
    pub indices: Vec<usize>,
    /// Labels of the rows when the source has labels.
    pub labels: Option<Vec<i64>>,
    pub bad: Vec<BadSample>,
    /// Where the view buffers go back when the batch is dropped (the loader reuses them).
    recycle: Option<Sender<Vec<Vec<f32>>>>,
}

impl Drop for HostBatch {
    fn drop(&mut self) {
        if let Some(tx) = &self.recycle {
            // A full or closed pool just frees the buffers.
            let _ = tx.try_send(std::mem::take(&mut self.views));
        }
    }
}

impl HostBatch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Time spent per stage, summed over worker threads (nanoseconds). `read` is getting a sample's stored bytes
/// (file reads, cache lookups, copies), `decode` turning them into pixels (image codecs, chunk decompression,
/// as the sources report it through [`timed_decode`](crate::source::timed_decode)), `augment` all views into
/// the batch buffers, `collate` the batch around them on the loader thread (buffers, compaction, labels).
#[derive(Debug, Default)]
pub struct StageTimes {
    pub read_ns: AtomicU64,
    pub decode_ns: AtomicU64,
    pub augment_ns: AtomicU64,
    pub collate_ns: AtomicU64,
    pub samples: AtomicU64,
}

impl StageTimes {
    /// (read, decode, augment, collate) in nanoseconds and samples, as one snapshot.
    pub fn snapshot(&self) -> ([u64; 4], u64) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ([l(&self.read_ns), l(&self.decode_ns), l(&self.augment_ns), l(&self.collate_ns)], l(&self.samples))
    }
}

pub struct Loader {
    source: Arc<dyn Source>,
    views: Arc<Views>,
    cfg: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
    pub stage_times: Arc<StageTimes>,
    /// Buffers of dropped batches, reused: steady state allocates (and page-faults) nothing. Measured with
    /// bench-loader on Fashion-MNIST, 1 thread: fresh 3.2 MB buffers per batch cost ~1/3 of the time in page faults.
    recycled: (Sender<Vec<Vec<f32>>>, Receiver<Vec<Vec<f32>>>),
}

impl Loader {
    pub fn new(
        source: Arc<dyn Source>,
        views: Arc<Views>,
        cfg: LoaderConfig,
    ) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .thread_name(|i| format!("selfsup-loader-{i}"))
            .build()?;
        let recycled = bounded(cfg.prefetch + 4);
        Ok(Loader { source, views, cfg, pool: Arc::new(pool), stage_times: Arc::default(), recycled })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.source
    }

    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.source.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of `epoch`, a pure function of (seed, epoch) and the source's length and block length.
    ///
    /// When the source reads in blocks (`block_len() > 1`, e.g. HDF5 chunks), the shuffle is block-aware:
    /// whole blocks are shuffled, then samples are shuffled within each window of
    /// [`SHUFFLE_WINDOW_BLOCKS`](crate::source::SHUFFLE_WINDOW_BLOCKS) consecutive blocks of that order. Each
    /// block is then read about once per epoch, and a batch still mixes samples from several blocks.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.source.len();
        let mut order: Vec<usize> = (0..n).collect();
        if !self.cfg.shuffle {
            return order;
        }
        let mut rng = Rng::for_sample(self.cfg.seed, epoch, u64::MAX);
        let block = self.source.block_len().max(1);
        if block == 1 || self.cfg.full_shuffle {
            rng.shuffle(&mut order);
            return order;
        }
        let mut blocks: Vec<usize> = (0..n.div_ceil(block)).collect();
        rng.shuffle(&mut blocks);
        order.clear();
        for window in blocks.chunks(crate::source::SHUFFLE_WINDOW_BLOCKS) {
            let start = order.len();
            for &b in window {
                order.extend(b * block..((b + 1) * block).min(n));
            }
            rng.shuffle(&mut order[start..]);
        }
        order
    }

    /// Starts producing the batches of `epoch` in the background.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `first` on (a resume in the middle of an epoch): the same batches, pixel
    /// for pixel, as [`Loader::epoch`] gives from there, since the order and each sample's augmentation are pure
    /// functions of (seed, epoch, index). The skipped batches cost nothing.
    pub fn epoch_from(&self, epoch: u64, first: usize) -> EpochIter {
        let (tx, rx) = bounded(self.cfg.prefetch.max(1));
        let order = self.order(epoch);
        let nb = self.batches_per_epoch();
        let (source, views, pool, times) =
            (self.source.clone(), self.views.clone(), self.pool.clone(), self.stage_times.clone());
        let (recycle_tx, recycle_rx) = self.recycled.clone();
        let (bs, seed) = (self.cfg.batch_size, self.cfg.seed);
        let (rank, world) = (self.cfg.slice.0, self.cfg.slice.1.max(1));
        let handle = std::thread::Builder::new()
            .name("selfsup-loader".into())
            .spawn(move || {
                for b in first..nb {
                    let global = &order[b * bs..((b + 1) * bs).min(order.len())];
                    let idx = &global[rank * global.len() / world..(rank + 1) * global.len() / world];
                    let job = BatchJob { indices: idx, seed, epoch, reuse: recycle_rx.try_recv().ok() };
                    let mut batch = pool.install(|| build_batch(source.as_ref(), &views, job, &times));
                    batch.recycle = Some(recycle_tx.clone());
                    if tx.send(batch).is_err() {
                        return; // the consumer stopped early
                    }
                }
            })
            .expect("spawning the loader thread");
        EpochIter { rx, handle: Some(handle) }
    }
}

/// One batch to build: which samples, and buffers to reuse if the loader has some.
pub struct BatchJob<'a> {
    pub indices: &'a [usize],
    pub seed: u64,
    pub epoch: u64,
    pub reuse: Option<Vec<Vec<f32>>>,
}

/// Reads and augments the samples of `job` into one batch, in parallel on the current rayon pool.
pub fn build_batch(source: &dyn Source, views: &Views, job: BatchJob, times: &StageTimes) -> HostBatch {
    let BatchJob { indices, seed, epoch, reuse } = job;
    let t_collate = Instant::now();
    let n = indices.len();
    let lens: Vec<usize> = views.recipes.iter().map(|p| p.out_len()).collect();
    // Reused buffers are not cleared: every kept row is overwritten, dropped rows are compacted away.
    let mut bufs = reuse.filter(|b| b.len() == lens.len()).unwrap_or_default();
    bufs.resize_with(lens.len(), Vec::new);
    for (buf, &l) in bufs.iter_mut().zip(&lens) {
        buf.resize(l * n, 0.0);
    }
    // rows[i][v] is sample i's slice of view v's buffer.
    let mut rows: Vec<Vec<&mut [f32]>> = (0..n).map(|_| Vec::with_capacity(bufs.len())).collect();
    for (buf, &l) in bufs.iter_mut().zip(&lens) {
        for (row, chunk) in rows.iter_mut().zip(buf.chunks_mut(l)) {
            row.push(chunk);
        }
    }
    let mut collate_ns = t_collate.elapsed().as_nanos() as u64;
    // Blocks first (one per worker), so no worker waits for a block another one is reading.
    let blocks: Vec<[u64; 2]> = source
        .missing_blocks(indices)
        .into_par_iter()
        .map(|b| {
            let (t0, d0) = (Instant::now(), thread_decode_ns());
            source.load_block(b);
            [t0.elapsed().as_nanos() as u64, thread_decode_ns() - d0]
        })
        .collect();
    // Per sample: (label or why not, read+decode ns, decode ns, augment ns).
    type Timed = (Result<Option<i64>, BadSample>, u64, u64, u64);
    let results: Vec<Timed> = rows
        .into_par_iter()
        .zip(indices.par_iter())
        .map(|(mut outs, &index)| {
            let (t0, d0) = (Instant::now(), thread_decode_ns());
            let got = source.get(index);
            let t1 = Instant::now();
            let (get_ns, decode_ns) = ((t1 - t0).as_nanos() as u64, thread_decode_ns() - d0);
            let sample = match got {
                Ok(s) => s,
                Err(e) => {
                    let bad = BadSample { index, location: source.describe(index), error: e.to_string() };
                    return (Err(bad), get_ns, decode_ns, 0);
                }
            };
            let mut rng = Rng::for_sample(seed, epoch, index as u64);
            views.run(&sample.image, &mut rng, &mut outs);
            (Ok(sample.label), get_ns, decode_ns, t1.elapsed().as_nanos() as u64)
        })
        .collect();
    let t_collate = Instant::now();
    // One update of the shared counters per batch, not per sample (they share a cache line).
    let get_ns: u64 = results.iter().map(|r| r.1).chain(blocks.iter().map(|b| b[0])).sum();
    let decode_ns: u64 = results.iter().map(|r| r.2).chain(blocks.iter().map(|b| b[1])).sum();
    times.read_ns.fetch_add(get_ns.saturating_sub(decode_ns), Ordering::Relaxed);
    times.decode_ns.fetch_add(decode_ns, Ordering::Relaxed);
    times.augment_ns.fetch_add(results.iter().map(|r| r.3).sum(), Ordering::Relaxed);
    times.samples.fetch_add(results.iter().filter(|r| r.0.is_ok()).count() as u64, Ordering::Relaxed);

    let mut kept = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut bad = Vec::new();
    for (row, (r, ..)) in results.into_iter().enumerate() {
        match r {
            Ok(label) => {
                if kept.len() != row {
                    // Compact: move this row down over the dropped ones (deterministic, no reallocation).
                    let dst = kept.len();
                    for (buf, &l) in bufs.iter_mut().zip(&lens) {
                        buf.copy_within(row * l..(row + 1) * l, dst * l);
                    }
                }
                kept.push(row);
                labels.push(label);
            }
            Err(b) => bad.push(b),
        }
    }
    for (buf, &l) in bufs.iter_mut().zip(&lens) {
        buf.truncate(kept.len() * l);
    }
    let labels = labels.iter().all(Option::is_some).then(|| labels.into_iter().flatten().collect());
    let batch = HostBatch {
        views: bufs,
        shapes: views.recipes.iter().map(|p| p.out_shape()).collect(),
        indices: kept.iter().map(|&r| indices[r]).collect(),
        labels: if kept.is_empty() { None } else { labels },
        bad,
        recycle: None,
    };
    collate_ns += t_collate.elapsed().as_nanos() as u64;
    times.collate_ns.fetch_add(collate_ns, Ordering::Relaxed);
    batch
}

/// The batches of one epoch, in order. Dropping it early stops the producer.
pub struct EpochIter {
    rx: Receiver<HostBatch>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for EpochIter {
    type Item = HostBatch;
    fn next(&mut self) -> Option<HostBatch> {
        self.rx.recv().ok()
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Disconnect first so a producer blocked on a full channel wakes up and exits.
        let (_, dead) = bounded(0);
        drop(std::mem::replace(&mut self.rx, dead));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
