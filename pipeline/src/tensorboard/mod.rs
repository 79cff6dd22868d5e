//! Logging sinks. [`TensorBoard`] writes event files with the `tfrecord` crate (its event writer and its
//! prost-generated TensorFlow protobufs; the hparams plugin's messages are prost messages of our own in
//! [`hparams`]). TensorBoard's own reader reads everything back: scalars, images, histograms, text (Markdown),
//! hparams; every tag carries the description of [`tags::describe`], shown in TensorBoard's cards.
//! (`tensorboard-rs` writes images transposed and panics on text.)

pub mod hparams;
mod pictures;
pub mod tags;

use std::collections::HashSet;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use selfsup_augment::Image;
use tfrecord::protobuf::summary::value::Value as TbValue;
use tfrecord::protobuf::summary::{Image as TbImage, Value as SummaryValue};
use tfrecord::protobuf::summary_metadata::PluginData;
use tfrecord::protobuf::{
    event, DataClass, DataType, Event, HistogramProto, Summary, SummaryMetadata, TensorProto, TensorShapeProto,
};
use tfrecord::EventWriter;

pub use hparams::{HParam, HValue, Metric, Session};
pub use pictures::{confusion_image, encode_png, grid, grid_tight, images_from_tensor, upscale, viridis};

pub trait Sink {
    fn scalar(&mut self, tag: &str, step: i64, value: f64);
    fn image(&mut self, tag: &str, step: i64, image: &Image);
    fn histogram(&mut self, tag: &str, step: i64, histogram: &Histogram);
    /// Markdown for TensorBoard's Text tab.
    fn text(&mut self, tag: &str, step: i64, markdown: &str);
    /// The run's hyperparameters and the metrics that judge it (TensorBoard's HParams tab), at its start.
    fn hparams(&mut self, session: &Session);
    /// The end of the run the hparams describe: `ok` false for a failed or interrupted one.
    fn hparams_end(&mut self, ok: bool);
    fn flush(&mut self);
}

/// A sink that drops everything (for `eval` without a run folder, and for benchmarks).
pub struct NullSink;

impl Sink for NullSink {
    fn scalar(&mut self, _: &str, _: i64, _: f64) {}
    fn image(&mut self, _: &str, _: i64, _: &Image) {}
    fn histogram(&mut self, _: &str, _: i64, _: &Histogram) {}
    fn text(&mut self, _: &str, _: i64, _: &str) {}
    fn hparams(&mut self, _: &Session) {}
    fn hparams_end(&mut self, _: bool) {}
    fn flush(&mut self) {}
}

/// A histogram as TensorBoard stores it: exact min, max, count, sum and sum of squares, and bucket counts with
/// each bucket's right edge.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    pub limits: Vec<f64>,
    pub counts: Vec<f64>,
}

impl Histogram {
    /// `bins` equal-width buckets from the min to the max of `values` (non-finite values are left out).
    pub fn of_values(values: &[f32], bins: usize) -> Histogram {
        let v: Vec<f64> = values.iter().filter(|x| x.is_finite()).map(|&x| x as f64).collect();
        if v.is_empty() {
            return Histogram {
                min: 0.0,
                max: 0.0,
                num: 0.0,
                sum: 0.0,
                sum_squares: 0.0,
                limits: vec![],
                counts: vec![],
            };
        }
        let (min, max) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let bins = bins.max(1);
        let mut counts = vec![0.0; bins];
        let width = (max - min) / bins as f64;
        for &x in &v {
            let i = if width > 0.0 { (((x - min) / width) as usize).min(bins - 1) } else { bins - 1 };
            counts[i] += 1.0;
        }
        Histogram {
            min,
            max,
            num: v.len() as f64,
            sum: v.iter().sum(),
            sum_squares: v.iter().map(|x| x * x).sum(),
            limits: edges(min, max, bins),
            counts,
        }
    }

    /// The same, computed on the tensor's device (`histc`): only the `bins` counts and five statistics come back
    /// to the host, whatever the tensor's size. Non-finite values count as NaN statistics.
    pub fn of_tensor(t: &tch::Tensor, bins: usize) -> Histogram {
        let t = t.detach().flatten(0, -1).to_kind(tch::Kind::Float);
        let bins = bins.max(1);
        let stats =
            tch::Tensor::stack(&[t.min(), t.max(), t.sum(tch::Kind::Float), t.square().sum(tch::Kind::Float)], 0);
        let s: Vec<f64> =
            Vec::try_from(stats.to_kind(tch::Kind::Double).to_device(tch::Device::Cpu)).unwrap_or_default();
        let (min, max) = (s[0], s[1]);
        let counts: Vec<f64> = if min.is_finite() && max.is_finite() && max > min {
            // histc's range is the tensor's own min and max, as here.
            Vec::try_from(t.histc(bins as i64).to_kind(tch::Kind::Double).to_device(tch::Device::Cpu))
                .unwrap_or_default()
        } else {
            // One value (or a non-finite one): everything in the last bucket, as `edges` lays them out.
            let mut c = vec![0.0; bins];
            c[bins - 1] = if min.is_finite() { t.numel() as f64 } else { 0.0 };
            c
        };
        Histogram {
            min,
            max,
            num: t.numel() as f64,
            sum: s[2],
            sum_squares: s[3],
            limits: edges(min, max, bins),
            counts,
        }
    }
}

/// Right edges of `bins` equal buckets over [min, max] (a single value: one bucket ending just above it).
fn edges(min: f64, max: f64, bins: usize) -> Vec<f64> {
    if max > min {
        (1..=bins).map(|i| min + (max - min) * i as f64 / bins as f64).collect()
    } else {
        let mut e = vec![min; bins];
        if let Some(last) = e.last_mut() {
            *last = min + min.abs().max(1e-12) * 1e-6;
        }
        e
    }
}

/// Writes `<dir>/events.out.tfevents.<time>.<host>`. Write errors are reported once on stderr and then
/// ignored: losing a log line must never stop a training run.
pub struct TensorBoard {
    writer: EventWriter<std::io::BufWriter<std::fs::File>>,
    failed: bool,
    /// Tags whose metadata (plugin, description) was written: TensorBoard reads it from a tag's first value.
    described: HashSet<String>,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl TensorBoard {
    pub fn create(dir: &Path) -> Result<Self, tfrecord::Error> {
        let prefix = dir.join("events");
        let writer = EventWriter::from_prefix(prefix.to_string_lossy().into_owned(), "", Default::default())?;
        Ok(TensorBoard { writer, failed: false, described: HashSet::new() })
    }

    fn check(&mut self, r: Result<(), tfrecord::Error>) {
        if let Err(e) = r {
            if !self.failed {
                crate::say!("warning: TensorBoard event write failed ({e}); further errors are not shown");
                self.failed = true;
            }
        }
    }

    /// The metadata of `tag`'s first value: its description, the plugin that owns it (with its serialized data;
    /// every plugin used here has version-0 data, which serializes to nothing) and its data class
    /// (TensorBoard's Rust data server, its default loader, drops metadata without one: the descriptions with it).
    fn metadata(&mut self, tag: &str, plugin: &str) -> Option<SummaryMetadata> {
        if !self.described.insert(tag.to_string()) {
            return None;
        }
        Some(SummaryMetadata {
            plugin_data: Some(PluginData { plugin_name: plugin.into(), content: Vec::new() }),
            display_name: String::new(),
            summary_description: tags::describe(tag).unwrap_or_default(),
            data_class: match plugin {
                "scalars" => DataClass::Scalar,
                "images" => DataClass::BlobSequence,
                _ => DataClass::Tensor,
            } as i32,
        })
    }

    /// An hparams plugin record: all of it is in the metadata (which every record carries; TensorBoard reads only
    /// that), the value an empty float tensor.
    fn write_hparams(&mut self, tag: &str, content: Vec<u8>) {
        let m = SummaryMetadata {
            plugin_data: Some(PluginData { plugin_name: hparams::PLUGIN.into(), content }),
            ..Default::default()
        };
        let empty = TensorProto { dtype: DataType::DtFloat as i32, ..Default::default() };
        self.write(tag, 0, Some(m), TbValue::Tensor(empty));
    }

    fn write(&mut self, tag: &str, step: i64, metadata: Option<SummaryMetadata>, value: TbValue) {
        let value = SummaryValue { node_name: String::new(), tag: tag.to_string(), metadata, value: Some(value) };
        let event = Event {
            wall_time: now(),
            step,
            source_metadata: None,
            what: Some(event::What::Summary(Summary { value: vec![value] })),
        };
        let r = self.writer.write_event(event);
        self.check(r);
    }
}

/// A rank-0 string tensor (the text plugin's and the hparams plugin's value).
fn string_tensor(s: &str) -> TensorProto {
    TensorProto {
        dtype: DataType::DtString as i32,
        tensor_shape: Some(TensorShapeProto::default()),
        string_val: vec![s.as_bytes().to_vec()],
        ..Default::default()
    }
}

impl Sink for TensorBoard {
    fn scalar(&mut self, tag: &str, step: i64, value: f64) {
        let m = self.metadata(tag, "scalars");
        self.write(tag, step, m, TbValue::SimpleValue(value as f32));
    }

    fn image(&mut self, tag: &str, step: i64, image: &Image) {
        let tb = TbImage {
            height: image.height as i32,
            width: image.width as i32,
            colorspace: i32::from(image.channels),
            encoded_image_string: encode_png(image),
        };
        let m = self.metadata(tag, "images");
        self.write(tag, step, m, TbValue::Image(tb));
    }

    fn histogram(&mut self, tag: &str, step: i64, h: &Histogram) {
        let proto = HistogramProto {
            min: h.min,
            max: h.max,
            num: h.num,
            sum: h.sum,
            sum_squares: h.sum_squares,
            bucket_limit: h.limits.clone(),
            bucket: h.counts.clone(),
        };
        let m = self.metadata(tag, "histograms");
        self.write(tag, step, m, TbValue::Histo(proto));
    }

    fn text(&mut self, tag: &str, step: i64, markdown: &str) {
        let m = self.metadata(tag, "text");
        self.write(tag, step, m, TbValue::Tensor(string_tensor(markdown)));
    }

    fn hparams(&mut self, session: &Session) {
        for (tag, content) in session.encode() {
            self.write_hparams(tag, content);
        }
        self.flush();
    }

    fn hparams_end(&mut self, ok: bool) {
        let (tag, content) = hparams::end(ok);
        self.write_hparams(tag, content);
    }

    fn flush(&mut self) {
        let r = self.writer.flush();
        self.check(r);
    }
}

/// Reads the event files of `dir` back with TensorBoard's own `EventAccumulator` (the setup venv's python and
/// `scripts/read_events.py`): `{"scalars": {tag: [[step, value]..]}, "images": {tag: [[step, w, h]..]},
/// "histograms": {tag: [[step, count]..]}, "text": {tag: [[step, markdown]..]}, "descriptions": {tag: text},
/// "hparams": {"hparams": {name: value}, "metrics": [tag..], "status": n}}`. How the tests check what
/// TensorBoard will show.
pub fn read_back(dir: &Path) -> Result<serde_json::Value, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/read_events.py");
    let py = crate::venv_python();
    if !py.exists() {
        return Err(format!("{} missing: run scripts/setup", py.display()));
    }
    let out =
        std::process::Command::new(&py).arg(&script).arg(dir).output().map_err(|e| format!("{}: {e}", py.display()))?;
    if !out.status.success() {
        return Err(format!("read_events.py failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("read_events.py output: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_of_values_counts_every_finite_value_once() {
        let h = Histogram::of_values(&[0.0, 1.0, 2.0, 3.0, f32::NAN, 4.0], 4);
        assert_eq!((h.min, h.max, h.num, h.sum, h.sum_squares), (0.0, 4.0, 5.0, 10.0, 30.0));
        assert_eq!(h.limits, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(h.counts, [1.0, 1.0, 1.0, 2.0]);
        let one = Histogram::of_values(&[2.5; 3], 5);
        assert_eq!(one.counts.iter().sum::<f64>(), 3.0);
        assert!(one.limits.windows(2).all(|w| w[0] <= w[1]) && *one.limits.last().unwrap() > 2.5);
        assert_eq!(Histogram::of_tensor(&tch::Tensor::from_slice(&[2.5f32; 3]), 5), one);
    }

    #[test]
    fn histogram_on_the_device_matches_the_host_one() {
        // Integers 0..=9 in uneven numbers: over [0, 9] in 10 buckets none sits on an inner edge.
        let v: Vec<f32> = (0..1000).map(|i| ((i * i) % 10) as f32).collect();
        let host = Histogram::of_values(&v, 10);
        let dev = Histogram::of_tensor(&tch::Tensor::from_slice(&v).view([10, 100]), 10);
        assert_eq!((dev.min, dev.max, dev.num), (host.min, host.max, host.num));
        assert_eq!((dev.sum, dev.sum_squares), (host.sum, host.sum_squares));
        assert_eq!(dev.counts.iter().sum::<f64>(), 1000.0);
        // histc and the host loop agree on every bucket (no value sits on an inner edge here).
        assert_eq!(dev.counts, host.counts);
    }
}
