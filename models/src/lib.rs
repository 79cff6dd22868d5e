//! selfsup-models: backbones, heads, losses, optimizers and self-supervised objectives on LibTorch (tch).
//!
//! This crate knows nothing of files or data loading: it turns batches of tensors into losses.
//! Parameter names follow torchvision (`layer1.0.conv1.weight`) so exported weights load in PyTorch.

pub mod backbone;
pub mod device;
pub mod dist;
pub mod head;
pub mod loss;
pub mod objective;
pub mod optim;
pub mod teacher;

pub use backbone::{
    Backbone, BackboneConfig, PosEmbed, ResNet, ResNetBlock, ResNetConfig, Vit, VitConfig, VitPool, VitSize,
};
pub use head::{linear, Mlp, MlpSpec};
pub use loss::{cross_entropy, nt_xent};
pub use objective::{Batch, Mae, MaeConfig, Objective, ObjectiveConfig, SimMim, SimMimConfig, Step, TrainProgress};
pub use optim::{layer_decay_scale, Optimizer, OptimizerConfig, OptimizerKind, ParamSpec};
pub use teacher::MomentumTeacher;

/// Errors from building models from configuration.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {field}: {message}")]
    InvalidConfig { field: String, message: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig { field: field.to_string(), message: message.into() }
}
