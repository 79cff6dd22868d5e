//! ResNet (He et al. 2015, https://arxiv.org/abs/1512.03385) with torchvision's parameter names, a CIFAR-style
//! stem option and configurable width, depth and input channels.

use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

use super::Backbone;
use crate::{invalid, ModelError};

/// ResNet with basic blocks. `layers = [2,2,2,2]` and `width = 64` is ResNet-18.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResNetConfig {
    /// Basic blocks per stage.
    pub layers: [i64; 4],
    /// Channels of the first stage; stages have width, 2w, 4w, 8w. Features have 8w dimensions.
    pub width: i64,
    /// 3x3 stride-1 stem without max-pool (for 28-32 px images) instead of 7x7 stride-2 + max-pool.
    pub cifar_stem: bool,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        ResNetConfig { layers: [2, 2, 2, 2], width: 64, cifar_stem: true }
    }
}

impl ResNetConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.width < 1 {
            return Err(invalid("model.backbone.width", format!("must be >= 1, got {}", self.width)));
        }
        if self.layers.iter().any(|&n| n < 1) {
            return Err(invalid(
                "model.backbone.layers",
                format!("each stage needs >= 1 block, got {:?}", self.layers),
            ));
        }
        Ok(())
    }
}

fn conv(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding: k / 2,
        bias: false,
        // torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    nn::conv2d(p, cin, cout, k, cfg)
}

/// Batch-norm settings as torchvision: tch initialises BN weights uniformly in [0,1); every recipe starts at 1.
pub(crate) fn bn_config() -> nn::BatchNormConfig {
    nn::BatchNormConfig { ws_init: nn::Init::Const(1.0), ..Default::default() }
}

fn batch_norm(p: nn::Path, c: i64) -> nn::BatchNorm {
    nn::batch_norm2d(p, c, bn_config())
}

#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(p: nn::Path, cin: i64, cout: i64, stride: i64) -> Self {
        let downsample = (stride != 1 || cin != cout)
            .then(|| (conv(&p / "downsample" / "0", cin, cout, 1, stride), batch_norm(&p / "downsample" / "1", cout)));
        BasicBlock {
            conv1: conv(&p / "conv1", cin, cout, 3, stride),
            bn1: batch_norm(&p / "bn1", cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1),
            bn2: batch_norm(&p / "bn2", cout),
            downsample,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        let y = y.apply(&self.conv2).apply_t(&self.bn2, train);
        let shortcut = match &self.downsample {
            Some((c, bn)) => x.apply(c).apply_t(bn, train),
            None => x.shallow_clone(),
        };
        (y + shortcut).relu()
    }
}

/// ResNet feature extractor (the classifier `fc` is not part of it).
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    cifar_stem: bool,
    stages: Vec<Vec<BasicBlock>>,
    dim: i64,
}

impl ResNet {
    pub fn new(p: nn::Path, cfg: &ResNetConfig, in_channels: i64) -> Self {
        let w = cfg.width;
        let (k, s) = if cfg.cifar_stem { (3, 1) } else { (7, 2) };
        let conv1 = conv(&p / "conv1", in_channels, w, k, s);
        let bn1 = batch_norm(&p / "bn1", w);
        let mut stages = Vec::new();
        let mut cin = w;
        for (i, &n) in cfg.layers.iter().enumerate() {
            let cout = w << i;
            let sp = &p / format!("layer{}", i + 1);
            let blocks = (0..n)
                .map(|j| {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    let b = BasicBlock::new(&sp / j, cin, cout, stride);
                    cin = cout;
                    b
                })
                .collect();
            stages.push(blocks);
        }
        ResNet { conv1, bn1, cifar_stem: cfg.cifar_stem, stages, dim: cin }
    }
}

impl Backbone for ResNet {
    fn features(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.apply(&self.conv1).apply_t(&self.bn1, train).relu();
        if !self.cifar_stem {
            y = y.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, train);
            }
        }
        y.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }

    fn dim(&self) -> i64 {
        self.dim
    }

    /// The stem (`conv1`, `bn1`) is layer 0, stage `layerK` is layer K.
    fn layer_id(&self, name: &str) -> usize {
        if name.starts_with("conv1.") || name.starts_with("bn1.") {
            return 0;
        }
        name.strip_prefix("layer")
            .and_then(|rest| rest.split('.').next())
            .and_then(|k| k.parse::<usize>().ok())
            .filter(|&k| (1..=4).contains(&k))
            .unwrap_or(self.num_layers())
    }

    fn num_layers(&self) -> usize {
        5
    }
}
