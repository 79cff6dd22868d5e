//! Heads: the MLPs between backbone features and a loss. Projection heads (SimCLR, Chen et al. 2020,
//! https://arxiv.org/abs/2002.05709, with batch norm in the hidden layers as SimCLR v2 and solo-learn), BYOL's
//! and MoCo v3's projectors and predictors, the Barlow Twins / VICReg expanders and the MLP of DINO's head are all
//! one [`Mlp`] with different [`MlpSpec`]s.

use crate::dist::NormExt;
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

/// The shape of an [`Mlp`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlpSpec {
    pub input: i64,
    pub hidden: i64,
    pub output: i64,
    /// Linear layers (>= 1); all but the last are followed by [batch norm] and the activation.
    pub layers: usize,
    /// Batch norm after each hidden linear layer.
    pub batch_norm: bool,
    /// Bias in the linear layers followed by batch norm (it cancels out, its gradient is 0: MoCo v3 leaves it
    /// out; SimCLR's projector kept it).
    pub bias_before_bn: bool,
    /// Batch norm without affine parameters after the last layer (MoCo v3's projector).
    pub last_bn: bool,
    /// GELU instead of ReLU (DINO's head).
    pub gelu: bool,
    /// Linear weights normal(0, std) with zero bias (DINO's `trunc_normal_(std=.02)`, whose ±2 cut is ±100 std)
    /// instead of PyTorch's default uniform init.
    pub init_std: Option<f64>,
}

impl MlpSpec {
    /// `Linear → BN → ReLU → Linear`, the SimCLR / BYOL projector and predictor.
    pub fn projector(input: i64, hidden: i64, output: i64) -> Self {
        MlpSpec {
            input,
            hidden,
            output,
            layers: 2,
            batch_norm: true,
            bias_before_bn: false,
            last_bn: false,
            gelu: false,
            init_std: None,
        }
    }

    /// SimCLR's projector: as [`MlpSpec::projector`] with the (redundant) hidden bias, as it always had.
    pub fn simclr(input: i64, hidden: i64, output: i64) -> Self {
        MlpSpec { bias_before_bn: true, ..Self::projector(input, hidden, output) }
    }
}

/// An MLP named like the equivalent `nn.Sequential`: modules are numbered in order (linear, batch norm,
/// activation), so a 2-layer projector has `0.weight`, `1.running_mean`, `3.weight`.
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<(nn::Linear, Option<nn::BatchNorm>)>,
    last_bn: Option<nn::BatchNorm>,
    gelu: bool,
}

impl Mlp {
    pub fn new(p: nn::Path, spec: MlpSpec) -> Self {
        assert!(spec.layers >= 1, "an MLP has at least one layer");
        let mut index = 0;
        let mut layers = Vec::with_capacity(spec.layers);
        let mut input = spec.input;
        for l in 0..spec.layers {
            let last = l + 1 == spec.layers;
            let output = if last { spec.output } else { spec.hidden };
            let bn_follows = (!last && spec.batch_norm) || (last && spec.last_bn);
            let bias = spec.bias_before_bn || !bn_follows;
            let fc = match (spec.init_std, bias) {
                (None, true) => linear(&p / index, input, output),
                (init, _) => {
                    // PyTorch's nn.Linear weight init is uniform in ±1/√in.
                    let bound = 1.0 / (input as f64).sqrt();
                    let ws_init = match init {
                        Some(std) => nn::Init::Randn { mean: 0.0, stdev: std },
                        None => nn::Init::Uniform { lo: -bound, up: bound },
                    };
                    let bs_init = Some(match init {
                        Some(_) => nn::Init::Const(0.0),
                        None => nn::Init::Uniform { lo: -bound, up: bound },
                    });
                    nn::linear(&p / index, input, output, nn::LinearConfig { ws_init, bs_init, bias })
                }
            };
            index += 1;
            let bn = (!last && spec.batch_norm).then(|| {
                index += 1;
                nn::batch_norm1d(&p / (index - 1), output, bn_config())
            });
            if !last {
                index += 1; // the activation
            }
            layers.push((fc, bn));
            input = output;
        }
        let last_bn = spec.last_bn.then(|| {
            let cfg = nn::BatchNormConfig { affine: false, ..bn_config() };
            nn::batch_norm1d(&p / index, spec.output, cfg)
        });
        Mlp { layers, last_bn, gelu: spec.gelu }
    }
}

impl ModuleT for Mlp {
    /// # Shapes
    /// `[N, input]` → `[N, output]`.
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = x.shallow_clone();
        let hidden = self.layers.len() - 1;
        for (i, (fc, bn)) in self.layers.iter().enumerate() {
            y = y.apply(fc);
            if let Some(bn) = bn {
                y = y.norm_t(bn, train);
            }
            if i < hidden {
                y = if self.gelu { y.gelu("none") } else { y.relu() };
            }
        }
        match &self.last_bn {
            Some(bn) => y.norm_t(bn, train),
            None => y,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn names_follow_nn_sequential() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = Mlp::new(vs.root() / "p", MlpSpec::simclr(8, 16, 4));
        let spec = MlpSpec { layers: 3, last_bn: true, ..MlpSpec::projector(8, 16, 4) };
        let mlp = Mlp::new(vs.root() / "m", spec);
        let vars = vs.variables();
        for name in ["p.0.weight", "p.1.running_var", "p.3.bias", "m.3.weight", "m.4.running_mean", "m.6.weight"] {
            assert!(vars.contains_key(name), "{name} missing from {:?}", vars.keys());
        }
        assert!(!vars.contains_key("m.7.weight"), "the last batch norm has no affine parameters");
        assert!(vars.contains_key("p.0.bias") && !vars.contains_key("m.0.bias") && !vars.contains_key("m.6.bias"));
        assert!(vars.contains_key("m.7.running_mean"));
        let y = mlp.forward_t(&Tensor::randn([5, 8], (Kind::Float, Device::Cpu)), true);
        assert_eq!(y.size(), vec![5, 4]);
        // The affine-free last batch norm standardizes each output over the batch.
        let mean = y.mean_dim(0, false, Kind::Float).abs().max().double_value(&[]);
        assert!(mean < 1e-5, "{mean}");
    }
}
