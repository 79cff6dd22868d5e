//! ResNet (He et al. 2015, "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385)
//! with torchvision's parameter names: basic blocks (ResNet-18/34) or bottleneck blocks (ResNet-50/101/152, in
//! torchvision's "V1.5" form with the stride on the 3x3 convolution), a CIFAR-style stem option, configurable
//! width, depth and input channels, and torchvision's `zero_init_residual`.

use crate::dist::NormExt;
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

use super::Backbone;
use crate::{invalid, ModelError};

/// The residual block of every stage.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResNetBlock {
    /// Two 3x3 convolutions; a stage of width `p` outputs `p` channels.
    #[default]
    Basic,
    /// 1x1 reduce, 3x3, 1x1 expand; a stage of width `p` outputs `4p` channels.
    Bottleneck,
}

impl ResNetBlock {
    /// Output channels per stage width (torchvision's `expansion`).
    pub fn expansion(self) -> i64 {
        match self {
            ResNetBlock::Basic => 1,
            ResNetBlock::Bottleneck => 4,
        }
    }
}

/// ResNet configuration. With `width = 64`: `layers = [2,2,2,2]` basic is ResNet-18, `[3,4,6,3]` basic is
/// ResNet-34, `[3,4,6,3]` bottleneck is ResNet-50 and `[3,4,23,3]` bottleneck is ResNet-101.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResNetConfig {
    /// Blocks per stage.
    pub layers: [i64; 4],
    /// Channels of the first stage; stages have width, 2w, 4w, 8w (times 4 at the output of bottleneck blocks).
    /// Features have 8w dimensions with basic blocks, 32w with bottleneck blocks.
    pub width: i64,
    /// 3x3 stride-1 stem without max-pool (for 28-32 px images) instead of 7x7 stride-2 + max-pool.
    pub cifar_stem: bool,
    /// Basic or bottleneck blocks.
    pub block: ResNetBlock,
    /// Start the last batch norm of every block (bn2 of basic, bn3 of bottleneck blocks) at weight 0, so that
    /// every residual branch is zero and every block is relu(shortcut) at init (Goyal et al. 2017,
    /// https://arxiv.org/abs/1706.02677; torchvision's `zero_init_residual=True`).
    pub zero_init_residual: bool,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        ResNetConfig {
            layers: [2, 2, 2, 2],
            width: 64,
            cifar_stem: true,
            block: ResNetBlock::Basic,
            zero_init_residual: false,
        }
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

/// The batch norm that closes a residual branch; `zero` starts its weight at 0 (`zero_init_residual`). A constant
/// init draws nothing from torch's RNG, so the option changes no other weight.
fn last_batch_norm(p: nn::Path, c: i64, zero: bool) -> nn::BatchNorm {
    let cfg = if zero { nn::BatchNormConfig { ws_init: nn::Init::Const(0.0), ..bn_config() } } else { bn_config() };
    nn::batch_norm2d(p, c, cfg)
}

/// torchvision's projection shortcut `downsample.0` (1x1 conv, stride `stride`) + `downsample.1` (BN), needed
/// where the block changes resolution or channels. Created before the block's own layers, as torchvision's
/// `_make_layer` does (and as the basic block always did here, which keeps old seeds' weights).
fn projection(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> Option<(nn::Conv2D, nn::BatchNorm)> {
    (stride != 1 || cin != cout)
        .then(|| (conv(p / "downsample" / "0", cin, cout, 1, stride), batch_norm(p / "downsample" / "1", cout)))
}

/// # Shapes
/// `x`: `[N, cin, H, W]` → `[N, cout, ceil(H/stride), ceil(W/stride)]`.
fn shortcut(projection: &Option<(nn::Conv2D, nn::BatchNorm)>, x: &Tensor, train: bool) -> Tensor {
    match projection {
        Some((c, bn)) => x.apply(c).norm_t(bn, train),
        None => x.shallow_clone(),
    }
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
    fn new(p: nn::Path, cin: i64, cout: i64, stride: i64, zero_last: bool) -> Self {
        let downsample = projection(&p, cin, cout, stride);
        BasicBlock {
            conv1: conv(&p / "conv1", cin, cout, 3, stride),
            bn1: batch_norm(&p / "bn1", cout),
            conv2: conv(&p / "conv2", cout, cout, 3, 1),
            bn2: last_batch_norm(&p / "bn2", cout, zero_last),
            downsample,
        }
    }
}

/// torchvision's `Bottleneck`: the stride sits on the 3x3 conv2 ("ResNet V1.5"), not on conv1 as in the paper;
/// it is what torchvision's and most self-supervised checkpoints use.
#[derive(Debug)]
struct Bottleneck {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    conv3: nn::Conv2D,
    bn3: nn::BatchNorm,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl Bottleneck {
    fn new(p: nn::Path, cin: i64, planes: i64, stride: i64, zero_last: bool) -> Self {
        let cout = planes * ResNetBlock::Bottleneck.expansion();
        let downsample = projection(&p, cin, cout, stride);
        Bottleneck {
            conv1: conv(&p / "conv1", cin, planes, 1, 1),
            bn1: batch_norm(&p / "bn1", planes),
            conv2: conv(&p / "conv2", planes, planes, 3, stride),
            bn2: batch_norm(&p / "bn2", planes),
            conv3: conv(&p / "conv3", planes, cout, 1, 1),
            bn3: last_batch_norm(&p / "bn3", cout, zero_last),
            downsample,
        }
    }
}

/// A residual block of either kind, boxed in the stage lists.
trait Residual: std::fmt::Debug + Send {
    /// # Shapes
    /// `x`: `[N, cin, H, W]` → `[N, cout, ceil(H/stride), ceil(W/stride)]`.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor;
}

impl Residual for BasicBlock {
    /// # Shapes
    /// `x`: `[N, cin, H, W]` → `[N, cout, ceil(H/stride), ceil(W/stride)]`.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.apply(&self.conv1).norm_t(&self.bn1, train).relu();
        let y = y.apply(&self.conv2).norm_t(&self.bn2, train);
        (y + shortcut(&self.downsample, x, train)).relu()
    }
}

impl Residual for Bottleneck {
    /// # Shapes
    /// `x`: `[N, cin, H, W]` → `[N, 4 * planes, ceil(H/stride), ceil(W/stride)]`.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.apply(&self.conv1).norm_t(&self.bn1, train).relu();
        let y = y.apply(&self.conv2).norm_t(&self.bn2, train).relu();
        let y = y.apply(&self.conv3).norm_t(&self.bn3, train);
        (y + shortcut(&self.downsample, x, train)).relu()
    }
}

/// ResNet feature extractor (the classifier `fc` is not part of it).
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    cifar_stem: bool,
    stages: Vec<Vec<Box<dyn Residual>>>,
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
            let planes = w << i;
            let sp = &p / format!("layer{}", i + 1);
            let blocks = (0..n)
                .map(|j| {
                    let stride = if i > 0 && j == 0 { 2 } else { 1 };
                    let (bp, zero) = (&sp / j, cfg.zero_init_residual);
                    let b: Box<dyn Residual> = match cfg.block {
                        ResNetBlock::Basic => Box::new(BasicBlock::new(bp, cin, planes, stride, zero)),
                        ResNetBlock::Bottleneck => Box::new(Bottleneck::new(bp, cin, planes, stride, zero)),
                    };
                    cin = planes * cfg.block.expansion();
                    b
                })
                .collect();
            stages.push(blocks);
        }
        ResNet { conv1, bn1, cifar_stem: cfg.cifar_stem, stages, dim: cin }
    }
}

impl Backbone for ResNet {
    /// # Shapes
    /// `x`: `[N, in_channels, H, W]` → `[N, dim()]`, dim = 8 * width (basic) or 32 * width (bottleneck).
    fn features(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.apply(&self.conv1).norm_t(&self.bn1, train).relu();
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
