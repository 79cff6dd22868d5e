//! Flat chunks of parameters for the multi-tensor optimizer paths. tch 0.24 exposes neither `_foreach_*` nor the
//! fused optimizers, so on CUDA the parameters of one spec are updated as one flat fp32 tensor: grads and params
//! are concatenated, a dozen kernels update the whole chunk, and one copy per parameter writes the result back,
//! instead of ~10-16 kernels per parameter (ResNet-18 + projector: ~1,000 launches per LARS step otherwise).

use tch::{Device, Kind, Tensor};

use super::{Buffers, OptimizerKind, Param, ParamSpec};

/// Largest number of elements updated in one flat chunk; bounds the temporaries of a step to a few such
/// buffers (64 MiB each in fp32).
pub(super) const CHUNK_NUMEL: i64 = 1 << 24;

/// Parameters with the same spec, device and dtype whose optimizer state lives in flat fp32 buffers (AdamW: the
/// two moments; SGD/LARS: the momentum). Each parameter's state tensors are views into these buffers, so
/// checkpoints still name them per parameter.
pub(super) struct Chunk {
    pub(super) spec: ParamSpec,
    pub(super) device: Device,
    pub(super) kind: Kind,
    pub(super) members: Vec<usize>,
    /// Elements of each member, in order, and their total.
    pub(super) lengths: Vec<i64>,
    pub(super) numel: i64,
    /// The flat state buffers, `[numel]` fp32 each.
    pub(super) state: Vec<Tensor>,
    /// `lengths` as an int64 tensor on the device (segment reductions), made on first use.
    lengths_tensor: Option<Tensor>,
}

/// `ts` flattened and concatenated (one kernel).
pub(super) fn flat(ts: &[Tensor]) -> Tensor {
    Tensor::cat(&ts.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0)
}

impl Chunk {
    /// The members' current values, flat.
    pub(super) fn flat_params(&self, params: &[Param]) -> Tensor {
        flat(&self.members.iter().map(|&i| params[i].tensor.shallow_clone()).collect::<Vec<_>>())
    }

    /// Copies the flat `updated` values back into the members.
    pub(super) fn write_back(&self, params: &mut [Param], updated: &Tensor) {
        let mut offset = 0;
        for (&i, &n) in self.members.iter().zip(&self.lengths) {
            let param = &mut params[i].tensor;
            param.copy_(&updated.narrow(0, offset, n).view(param.size().as_slice()));
            offset += n;
        }
    }

    /// The L2 norm of each member's part of the flat `x`: `[members]` fp32, two kernels whatever the count.
    pub(super) fn segment_norms(&mut self, x: &Tensor) -> Tensor {
        // unsafe_ = true: no validation of `lengths` (ours, known good), which would read them back to the host.
        Tensor::segment_reduce(&x.square(), "sum", Some(self.lengths_tensor()), None, None, 0, true, 0.0).sqrt()
    }

    /// `per_member` (`[members]`) repeated over each member's elements: `[numel]`, without a host sync.
    pub(super) fn expand(&mut self, per_member: &Tensor) -> Tensor {
        let numel = self.numel;
        per_member.repeat_interleave_self_tensor(self.lengths_tensor(), 0, numel)
    }

    /// `lengths` on the device, copied there once.
    fn lengths_tensor(&mut self) -> &Tensor {
        let (lengths, device) = (&self.lengths, self.device);
        self.lengths_tensor.get_or_insert_with(|| Tensor::from_slice(lengths).to_device(device))
    }
}

/// Groups parameters into chunks (same spec, device and dtype; at most `max_numel` elements unless one parameter
/// is larger) and gives each parameter its optimizer state as views into the chunk's zeroed flat buffers.
pub(super) fn make_chunks(params: &mut [Param], kind: OptimizerKind, max_numel: i64) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let (device, dtype, numel) = (p.tensor.device(), p.tensor.kind(), p.tensor.numel() as i64);
        let open = chunks.iter_mut().rev().find(|c| c.spec == p.spec && c.device == device && c.kind == dtype);
        match open {
            Some(c) if c.numel + numel <= max_numel => {
                c.members.push(i);
                c.lengths.push(numel);
                c.numel += numel;
            }
            _ => chunks.push(Chunk {
                spec: p.spec,
                device,
                kind: dtype,
                members: vec![i],
                lengths: vec![numel],
                numel,
                state: Vec::new(),
                lengths_tensor: None,
            }),
        }
    }
    let buffers = if kind == OptimizerKind::Adamw { 2 } else { 1 };
    for c in &mut chunks {
        c.state = (0..buffers).map(|_| Tensor::zeros([c.numel], (Kind::Float, c.device))).collect();
        let mut offset = 0;
        for (&i, &n) in c.members.iter().zip(&c.lengths) {
            let p = &mut params[i];
            let shape = p.tensor.size();
            let view = |flat: &Tensor| flat.narrow(0, offset, n).view(shape.as_slice());
            p.buffers = match kind {
                OptimizerKind::Adamw => Buffers::Adam { exp_avg: view(&c.state[0]), exp_avg_sq: view(&c.state[1]) },
                OptimizerKind::Sgd | OptimizerKind::Lars => Buffers::Momentum(view(&c.state[0])),
            };
            offset += n;
        }
    }
    chunks
}
