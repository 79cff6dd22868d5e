//! Transformer pieces shared by the ViT encoder and the MAE decoder: the pre-norm block of timm's
//! `VisionTransformer` (Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929) with timm's parameter names,
//! and the fixed 2-D sin-cos position table of MAE (He et al. 2021, https://arxiv.org/abs/2111.06377).

use tch::nn;
use tch::{Kind, Tensor};

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

/// One pre-norm transformer block, timm names: `norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`.
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Block {
    /// A block of width `dim` with `heads` heads (`dim % heads == 0`) and an MLP of `int(dim * mlp_ratio)` units.
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
        }
    }

    /// # Shapes
    /// `[N, L, D]` → `[N, L, D]`. No dropout or drop-path (MAE pretraining uses neither), so `train` is unused.
    pub fn forward(&self, x: &Tensor, _train: bool) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.norm1));
        let h = x.apply(&self.norm2).apply(&self.fc1).gelu("none").apply(&self.fc2);
        x + h
    }
}

/// MAE's `get_2d_sincos_pos_embed(dim, grid)` without the cls row: for the patch in row i, column j (index
/// i·grid + j), the first half of the vector encodes j and the second half i, each half as
/// `[sin(pos·ω), cos(pos·ω)]` with ω_d = 10000^(-d / (dim/4)), d < dim/4.
///
/// # Shapes
/// → `[grid * grid, dim]` float32 on the CPU; `dim % 4 == 0`.
pub fn sincos_2d(dim: i64, grid: i64) -> Tensor {
    assert!(dim % 4 == 0 && dim > 0, "sin-cos position embedding needs a width divisible by 4, got {dim}");
    let quarter = (dim / 4) as usize;
    let omega: Vec<f64> = (0..quarter).map(|d| 1.0 / 10000f64.powf(d as f64 / quarter as f64)).collect();
    let mut table = Vec::with_capacity((grid * grid * dim) as usize);
    for i in 0..grid {
        for j in 0..grid {
            for pos in [j as f64, i as f64] {
                table.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                table.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    Tensor::from_slice(&table).view([grid * grid, dim]).to_kind(Kind::Float)
}
