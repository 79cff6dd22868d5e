//! Projection heads: the MLP between backbone features and the contrastive loss (SimCLR, Chen et al. 2020,
//! https://arxiv.org/abs/2002.05709; with batch norm in the hidden layer as in SimCLR v2 and solo-learn).

use tch::nn::{self, ModuleT};
use tch::Tensor;

use crate::backbone::bn_config;

/// A linear layer initialised as PyTorch's `nn.Linear` (weights and bias uniform in ±1/√in). tch's default
/// weight init is Kaiming-uniform, √6 ≈ 2.45 times wider, which starts heads and probes with oversized logits.
pub fn linear(p: nn::Path, input: i64, output: i64) -> nn::Linear {
    let bound = 1.0 / (input as f64).sqrt();
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -bound, up: bound },
        bs_init: Some(nn::Init::Uniform { lo: -bound, up: bound }),
        bias: true,
    };
    nn::linear(p, input, output, cfg)
}

/// `Linear(in, hidden) → BN → ReLU → Linear(hidden, out)`, named `0`, `1`, `3` like the equivalent `nn.Sequential`.
#[derive(Debug)]
pub struct ProjectionHead {
    fc1: nn::Linear,
    bn: nn::BatchNorm,
    fc2: nn::Linear,
}

impl ProjectionHead {
    pub fn new(p: nn::Path, input: i64, hidden: i64, output: i64) -> Self {
        ProjectionHead {
            fc1: linear(&p / "0", input, hidden),
            bn: nn::batch_norm1d(&p / "1", hidden, bn_config()),
            fc2: linear(&p / "3", hidden, output),
        }
    }
}

impl ModuleT for ProjectionHead {
    /// # Shapes
    /// `[N, input]` → `[N, output]`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        x.apply(&self.fc1).apply_t(&self.bn, train).relu().apply(&self.fc2)
    }
}
