//! selfsup-pipeline: sources → parallel loader → batches; the trainer, the evaluators, checkpoints and the
//! TensorBoard sink. The only crate that sees loader, objective and sinks together.

pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod finetune;
pub mod inspect;
pub mod loader;
pub mod pack;
pub mod progress;
pub mod source;
pub mod tensorboard;
pub mod trainer;
pub mod transfer;

pub use config::Config;

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
