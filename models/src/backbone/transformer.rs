//! Transformer pieces shared by the ViT encoder and the MAE decoder: the pre-norm block of timm's
//! `VisionTransformer` (Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929) with timm's parameter names,
//! and stochastic depth on its residual branches (Huang et al. 2016, https://arxiv.org/abs/1603.09382) as timm's
//! `DropPath`. The position tables live in `pos_embed.rs`.

use tch::nn;
use tch::Tensor;

/// LayerNorm as timm's ViT and MAE (`partial(nn.LayerNorm, eps=1e-6)`): weight 1, bias 0.
pub(crate) fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], nn::LayerNormConfig { eps: 1e-6, ..Default::default() })
}

/// The bound of `xavier_uniform_` for a weight with these fans: √(6 / (fan_in + fan_out)).
pub(crate) fn xavier_bound(fan_in: i64, fan_out: i64) -> f64 {
    (6.0 / (fan_in + fan_out) as f64).sqrt()
}

/// A linear layer initialised as MAE's `_init_weights`: xavier-uniform weight, zero bias.
pub(crate) fn xavier_linear(p: nn::Path, input: i64, output: i64) -> nn::Linear {
    let bound = xavier_bound(input, output);
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Uniform { lo: -bound, up: bound },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, input, output, cfg)
}

/// Multi-head self-attention with a fused `qkv` projection (with bias, as MAE's `qkv_bias=True`).
#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
}

impl Attention {
    /// # Shapes
    /// `[N, L, D]` → `[N, L, D]`.
    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, l, d) = x.size3().expect("attention input is [N, L, D]");
        let qkv = x.apply(&self.qkv).reshape([n, l, 3, self.heads, d / self.heads]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        // Fused kernel (flash / memory-efficient on CUDA); scale defaults to 1/√head_dim as in timm.
        let y = Tensor::scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, false, None, false);
        y.transpose(1, 2).reshape([n, l, d]).apply(&self.proj)
    }
}

/// Stochastic depth as timm's `drop_path(x, rate, training, scale_by_keep=True)`: in training, each sample
/// (row of the first dimension) is kept with probability `1 - rate` and then scaled by `1 / (1 - rate)`, or
/// zeroed, so the expectation is `x`. The keep mask comes from torch's global RNG (the trainer reseeds it), in
/// `x`'s kind as timm's `x.new_empty(...).bernoulli_(keep)`. `train == false` or `rate == 0` → `x` itself.
///
/// # Shapes
/// `x`: `[N, ...]` → same; `rate` in `[0, 1)`.
pub fn drop_path(x: &Tensor, rate: f64, train: bool) -> Tensor {
    assert!((0.0..1.0).contains(&rate), "drop_path rate must be in [0, 1), got {rate}");
    if !train || rate == 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - rate;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = Tensor::empty(shape.as_slice(), (x.kind(), x.device())).bernoulli_float_(keep) / keep;
    x * mask
}

/// One pre-norm transformer block, timm names: `norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`;
/// `x + drop_path(attn(norm1(x)))`, then `x + drop_path(mlp(norm2(x)))`.
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    drop_path: f64,
}

impl Block {
    /// A block of width `dim` with `heads` heads (`dim % heads == 0`) and an MLP of `int(dim * mlp_ratio)` units,
    /// without stochastic depth (see [`Block::with_drop_path`]).
    pub fn new(p: nn::Path, dim: i64, heads: i64, mlp_ratio: f64) -> Block {
        assert!(heads >= 1 && dim % heads == 0, "block width {dim} is not divisible by {heads} heads");
        let hidden = (dim as f64 * mlp_ratio) as i64;
        let attn = &p / "attn";
        let mlp = &p / "mlp";
        Block {
            norm1: layer_norm(&p / "norm1", dim),
            attn: Attention {
                qkv: xavier_linear(&attn / "qkv", dim, 3 * dim),
                proj: xavier_linear(&attn / "proj", dim, dim),
                heads,
            },
            norm2: layer_norm(&p / "norm2", dim),
            fc1: xavier_linear(&mlp / "fc1", dim, hidden),
            fc2: xavier_linear(&mlp / "fc2", hidden, dim),
            drop_path: 0.0,
        }
    }

    /// The same block with stochastic depth `rate` in `[0, 1)` on both residual branches (adds no parameters).
    pub fn with_drop_path(self, rate: f64) -> Block {
        assert!((0.0..1.0).contains(&rate), "drop_path rate must be in [0, 1), got {rate}");
        Block { drop_path: rate, ..self }
    }

    /// The stochastic-depth rate of this block's residual branches.
    pub fn drop_path_rate(&self) -> f64 {
        self.drop_path
    }

    /// The attention residual branch, before drop-path: `attn(norm1(x))`.
    ///
    /// # Shapes
    /// `[N, L, D]` → `[N, L, D]`.
    pub fn attn_branch(&self, x: &Tensor) -> Tensor {
        self.attn.forward(&x.apply(&self.norm1))
    }

    /// The MLP residual branch, before drop-path: `fc2(gelu(fc1(norm2(x))))`.
    ///
    /// # Shapes
    /// `[N, L, D]` → `[N, L, D]`.
    pub fn mlp_branch(&self, x: &Tensor) -> Tensor {
        x.apply(&self.norm2).apply(&self.fc1).gelu("none").apply(&self.fc2)
    }

    /// `train` only matters for drop-path; there is no dropout (MAE, DINO and iBOT pretrain without it).
    ///
    /// # Shapes
    /// `[N, L, D]` → `[N, L, D]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let x = x + drop_path(&self.attn_branch(x), self.drop_path, train);
        &x + drop_path(&self.mlp_branch(&x), self.drop_path, train)
    }
}
