//! selfsup-pipeline: sources → parallel loader → batches; the trainer, the evaluators, checkpoints and the
//! TensorBoard sink. The only crate that sees loader, objective and sinks together.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod finetune;
pub mod inspect;
pub mod launch;
pub mod loader;
pub mod output;
pub mod pack;
pub mod pretrained;
pub mod progress;
pub mod projector;
pub mod recipe_fit;
pub mod runlock;
pub mod signals;
pub mod source;
pub mod tensorboard;
pub mod trainer;
pub mod transfer;

pub use config::Config;

/// `eprintln!` that never panics: with stderr closed (`selfsup ... 2>&1 | head -3`, a log reader that exited) the
/// line is dropped and the command goes on with its work (checkpoints, summaries, reports). Every message of the
/// CLI and the pipeline goes through it (`tests/hostile.rs` checks that no source calls `eprintln!`).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that never panics: with stdout closed (`selfsup inspect ... | head`) the output is dropped and the
/// command still finishes its work (files, checkpoints).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Data(#[from] source::DataError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Model(#[from] selfsup_models::ModelError),
    #[error(transparent)]
    Augment(#[from] selfsup_augment::AugmentError),
    #[error("{0}")]
    Other(String),
    /// SIGINT or SIGTERM asked to stop a pass that polls for it ([`eval::ExtractOptions::stop_on_signal`]).
    #[error("stopped by {}", signals::name(*.0))]
    Stopped(i32),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// selfsup's cache: `$SELFSUP_CACHE`, else `$XDG_CACHE_HOME/selfsup`, else `~/.cache/selfsup`. scripts/setup
/// keeps its Python venv here; inflated copies of gzipped datasets go here too.
pub fn cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(d) = std::env::var_os("SELFSUP_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("selfsup")
}

/// The setup venv's python (torch, torchvision, TensorBoard's reader).
pub fn venv_python() -> std::path::PathBuf {
    cache_dir().join("venv/bin/python")
}

/// Writes `value` as pretty JSON to `path` crash-safely: a temporary file beside it, synced, then renamed.
pub fn write_json_atomic(path: &std::path::Path, value: &impl serde::Serialize) -> Result<()> {
    use std::io::Write;
    let name = path.file_name().map_or("out.json".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let io = |e: std::io::Error| Error::Other(format!("{}: {e}", path.display()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(value).expect("reports serialize")).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The device of `choice`, set up for training: on CUDA TF32 matmuls, cuDNN autotuning and (when `bf16`) bf16 as
/// the autocast type. Returns the device and whether to run under autocast.
pub fn prepare_device(choice: config::DeviceChoice, bf16: bool) -> Result<(tch::Device, bool)> {
    let device = select_device(choice)?;
    if !device.is_cuda() {
        return Ok((device, false));
    }
    selfsup_models::device::set_tf32(true);
    selfsup_models::device::set_cudnn_benchmark(true);
    if bf16 && !selfsup_models::device::use_bf16_autocast() {
        return Err(Error::Other("libtorch refused bf16 autocast".into()));
    }
    Ok((device, bf16))
}

/// The device a run asks for: CUDA when visible for `auto`; `cuda` without a GPU is an error, not a silent CPU run.
pub fn select_device(choice: config::DeviceChoice) -> Result<tch::Device> {
    use config::DeviceChoice::*;
    match choice {
        Auto => Ok(tch::Device::cuda_if_available()),
        Cpu => Ok(tch::Device::Cpu),
        Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        Cuda => Err(Error::Other("train.device = \"cuda\" but no CUDA device is visible to libtorch".into())),
    }
}
