//! Data-parallel training's process group: torch.distributed's c10d (TCPStore rendezvous, ProcessGroupGloo on
//! CPU, ProcessGroupNCCL on CUDA) through the C++ shim (`csrc/dist_shim.cpp`), as a safe [`Dist`].
//!
//! At world size 1 a [`Dist`] is a no-op with the same API ([`Dist::single`]): the trainer and the objectives
//! call it unconditionally, and one process trains exactly as it did before distribution existed.
//!
//! Objectives that need the global batch call [`Dist::gather`] inside their loss (SimCLR's and MoCo v3's
//! negatives, Barlow Twins' cross-correlation, VICReg's variance and covariance): every rank's rows, in rank
//! order, with a gradient that flows back to the rank owning each row. A collective that fails inside a loss
//! (a rank died) cannot return an error through [`crate::objective::Objective::loss`]: it is recorded
//! ([`Dist::take_error`]), the loss goes on with zeros, and the trainer reports the error at its next collective.

use std::ffi::{c_char, c_int, c_long, c_void, CStr, CString};
use std::sync::{Arc, Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

extern "C" {
    fn selfsup_dist_new(
        backend: c_int,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_long,
        iface: *const c_char,
        bind_host: *const c_char,
        serve: c_int,
        host_channel: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn selfsup_dist_has_host_channel(group: *mut c_void) -> c_int;
    fn selfsup_dist_overlap_new(
        group: *mut c_void,
        params: *mut *mut torch_sys::C_tensor,
        n: c_int,
        bucket_numel: c_long,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn selfsup_dist_overlap_arm(overlap: *mut c_void);
    fn selfsup_dist_overlap_finish(overlap: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn selfsup_dist_overlap_free(overlap: *mut c_void);
    fn selfsup_dist_overlap_early(overlap: *mut c_void) -> c_int;
    fn selfsup_dist_allreduce_host(group: *mut c_void, values: *mut i64, n: c_int, err: *mut *mut c_char) -> c_int;
    fn selfsup_dist_free(group: *mut c_void);
    fn selfsup_dist_free_error(err: *mut c_char);
    fn selfsup_dist_allreduce_sum(group: *mut c_void, tensor: *mut torch_sys::C_tensor, err: *mut *mut c_char)
        -> c_int;
    fn selfsup_dist_broadcast(
        group: *mut c_void,
        tensor: *mut torch_sys::C_tensor,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn selfsup_dist_allgather(
        group: *mut c_void,
        tensor: *mut torch_sys::C_tensor,
        with_grad: c_int,
        err: *mut *mut c_char,
    ) -> *mut torch_sys::C_tensor;
    fn selfsup_dist_sync_batch_norm(
        group: *mut c_void,
        x: *mut torch_sys::C_tensor,
        weight: *mut torch_sys::C_tensor,
        bias: *mut torch_sys::C_tensor,
        running_mean: *mut torch_sys::C_tensor,
        running_var: *mut torch_sys::C_tensor,
        eps: f64,
        momentum: f64,
        err: *mut *mut c_char,
    ) -> *mut torch_sys::C_tensor;
}

/// The group whose global-batch statistics every batch norm in training mode uses (`model.sync_bn`), if any.
static SYNC_BN: std::sync::RwLock<Option<Arc<Dist>>> = std::sync::RwLock::new(None);

/// Makes every batch norm in training mode ([`NormExt::norm_t`]) use the statistics of `dist`'s global batch
/// (`model.sync_bn = true`; `None`: per-rank statistics, the default). Process-wide, as a model has one group.
pub fn set_sync_batch_norm(dist: Option<Arc<Dist>>) {
    *SYNC_BN.write().unwrap_or_else(|e| e.into_inner()) = dist.filter(|d| d.world() > 1);
}

/// Batch norm as every backbone and head applies it: tch's, or in training mode with `model.sync_bn` the
/// synchronized one (torch.nn.SyncBatchNorm's maths, `csrc/dist_shim.cpp`). Our batch norms all use
/// [`crate::backbone::bn_config`]'s eps 1e-5 and momentum 0.1, which the synchronized one repeats.
pub trait NormExt {
    fn norm_t(&self, bn: &tch::nn::BatchNorm, train: bool) -> Tensor;
}

impl NormExt for Tensor {
    fn norm_t(&self, bn: &tch::nn::BatchNorm, train: bool) -> Tensor {
        if train {
            let group = SYNC_BN.read().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(dist) = group {
                return dist.sync_batch_norm(self, bn, 1e-5, 0.1);
            }
        }
        tch::nn::ModuleT::forward_t(bn, self, train)
    }
}

/// Which c10d backend carries the collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors, over TCP.
    Gloo,
    /// CUDA tensors (NVLink, InfiniBand, TCP).
    Nccl,
}

/// Where and how to meet the other ranks.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub backend: Backend,
    pub rank: usize,
    pub world: usize,
    /// The TCPStore (served by rank 0): `MASTER_ADDR`, `MASTER_PORT`.
    pub master_addr: String,
    pub master_port: u16,
    /// How long a rendezvous or a collective may wait for the slowest rank before it is an error.
    pub timeout: std::time::Duration,
    /// The network interface Gloo binds (`GLOO_SOCKET_IFNAME`); when empty, Gloo binds the address this host
    /// resolves to (127.0.0.1 when the master is local).
    pub gloo_iface: String,
    /// The TCPStore is already served by the launcher (torchrun's agent: `TORCHELASTIC_USE_AGENT_STORE=True`);
    /// otherwise rank 0 serves it.
    pub agent_store: bool,
    /// NCCL: also a Gloo group beside it for host numbers (the row counts of every gather, the trainer's votes),
    /// so that they need no GPU synchronization. Gloo binds as above: set it where that works without asking
    /// (every rank on this machine, or `GLOO_SOCKET_IFNAME` given). Gloo groups always have it (themselves).
    pub host_channel: bool,
}

/// Gradient averaging overlapped with backward, as DDP's Reducer: hooks on the parameters' gradient accumulators
/// start each bucket's all-reduce once all its gradients are there (buckets in reverse parameter order, started
/// in order on every rank). [`Overlap::arm`] before backward, [`Overlap::finish`] after it.
pub struct Overlap {
    ptr: *mut c_void,
    /// The group the hooks use, kept alive as long as they are.
    dist: Arc<Dist>,
}

// SAFETY: the shim's Overlap locks its own mutex; it is used from the trainer's thread.
unsafe impl Send for Overlap {}

impl Overlap {
    /// Before a backward pass whose gradients are to be averaged.
    pub fn arm(&mut self) {
        // SAFETY: a live Overlap.
        unsafe { selfsup_dist_overlap_arm(self.ptr) }
    }

    /// After it: waits for every bucket and writes the averages into the gradients.
    pub fn finish(&mut self) -> Result<(), DistError> {
        self.dist.check()?;
        let mut err = std::ptr::null_mut();
        // SAFETY: a live Overlap.
        let rc = unsafe { selfsup_dist_overlap_finish(self.ptr, &mut err) };
        if rc == 0 {
            Ok(())
        } else {
            Err(self.dist.error("averaging gradients", take_message(err)))
        }
    }
}

impl Overlap {
    /// Buckets whose all-reduce the last backward pass started while it ran (the rest started in `finish`).
    pub fn started_during_backward(&self) -> usize {
        // SAFETY: a live Overlap.
        unsafe { selfsup_dist_overlap_early(self.ptr) as usize }
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        // SAFETY: made by selfsup_dist_overlap_new, freed once (the hooks are removed first).
        unsafe { selfsup_dist_overlap_free(self.ptr) }
    }
}

/// A c10d error: what failed and what c10d said.
#[derive(Debug, thiserror::Error)]
#[error("{what} (rank {rank} of {world}): {message}")]
pub struct DistError {
    pub what: String,
    pub rank: usize,
    pub world: usize,
    pub message: String,
}

/// The process group (see the module doc). `Sync`: the shim's group is used from one thread at a time (the
/// trainer's), which the mutex makes sure of.
pub struct Dist {
    group: Option<Mutex<GroupPtr>>,
    backend: Option<Backend>,
    /// The group has a host channel ([`GroupSpec::host_channel`]).
    host: bool,
    rank: usize,
    world: usize,
    device: Device,
    /// The first collective that failed inside a loss (see the module doc).
    failed: Mutex<Option<DistError>>,
}

struct GroupPtr(*mut c_void);
// SAFETY: the c10d group may be used from any thread, one at a time (the Mutex around it).
unsafe impl Send for GroupPtr {}

impl Drop for GroupPtr {
    fn drop(&mut self) {
        // SAFETY: made by selfsup_dist_new, freed once.
        unsafe { selfsup_dist_free(self.0) }
    }
}

fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    // SAFETY: a NUL-terminated string malloc'ed by the shim, freed here once.
    let s = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { selfsup_dist_free_error(err) };
    // torch's errors end with a C++ backtrace ("Exception raised from ...", frames): not for users.
    match s.find("\nException raised from") {
        Some(i) => s[..i].trim_end().to_string(),
        None => s,
    }
}

impl Dist {
    /// One process: every collective is the identity.
    pub fn single(device: Device) -> Dist {
        Dist { group: None, backend: None, host: false, rank: 0, world: 1, device, failed: Mutex::new(None) }
    }

    /// A shared one-process group (for batches made outside a trainer).
    pub fn alone() -> Arc<Dist> {
        static ALONE: OnceLock<Arc<Dist>> = OnceLock::new();
        ALONE.get_or_init(|| Arc::new(Dist::single(Device::Cpu))).clone()
    }

    /// Meets the other ranks (blocks until all `spec.world` have joined, or `spec.timeout`). Tensors given to the
    /// collectives live on `device` (CPU for Gloo, this rank's GPU for NCCL). A world of one is a real group too
    /// (its collectives go through the backend: what `--nproc-per-node 1` measures); [`Dist::single`] is none.
    pub fn connect(spec: &GroupSpec, device: Device) -> Result<Dist, DistError> {
        let err_of = |message: String| DistError {
            what: format!("joining the process group at {}:{}", spec.master_addr, spec.master_port),
            rank: spec.rank,
            world: spec.world,
            message,
        };
        let c = |s: &str| CString::new(s).map_err(|_| err_of(format!("{s:?} holds a NUL byte")));
        let (host, iface) = (c(&spec.master_addr)?, c(&spec.gloo_iface)?);
        let local = matches!(spec.master_addr.as_str(), "localhost" | "::1") || spec.master_addr.starts_with("127.");
        let bind_host = c(&if local { "127.0.0.1".to_string() } else { hostname().unwrap_or_default() })?;
        let mut err = std::ptr::null_mut();
        // SAFETY: NUL-terminated strings that outlive the call; the shim catches every C++ exception.
        let ptr = unsafe {
            selfsup_dist_new(
                i32::from(spec.backend == Backend::Nccl),
                host.as_ptr(),
                c_int::from(spec.master_port),
                spec.rank as c_int,
                spec.world as c_int,
                spec.timeout.as_millis().min(i64::MAX as u128) as c_long,
                iface.as_ptr(),
                bind_host.as_ptr(),
                c_int::from(spec.rank == 0 && !spec.agent_store),
                c_int::from(spec.host_channel),
                &mut err,
            )
        };
        if ptr.is_null() {
            return Err(err_of(take_message(err)));
        }
        // SAFETY: a live group, made just above.
        let host = unsafe { selfsup_dist_has_host_channel(ptr) } != 0;
        Ok(Dist {
            group: Some(Mutex::new(GroupPtr(ptr))),
            backend: Some(spec.backend),
            host,
            rank: spec.rank,
            world: spec.world,
            device,
            failed: Mutex::new(None),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// A process group (of any size), not [`Dist::single`].
    pub fn in_group(&self) -> bool {
        self.group.is_some()
    }

    /// The backend of the group; `None` for [`Dist::single`].
    pub fn backend(&self) -> Option<Backend> {
        self.backend
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0: the one that writes checkpoints, event files, progress and summaries.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn error(&self, what: &str, message: String) -> DistError {
        DistError { what: what.to_string(), rank: self.rank, world: self.world, message }
    }

    fn with_group<T>(&self, f: impl FnOnce(*mut c_void) -> T) -> Option<T> {
        let g = self.group.as_ref()?;
        let guard = g.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(guard.0))
    }

    /// In place: the sum of `t` over the ranks (a dense tensor on [`Dist::device`]).
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        self.check()?;
        let r = self.with_group(|g| {
            let mut err = std::ptr::null_mut();
            // SAFETY: `t` is a live tensor; the shim reduces it in place.
            let rc = unsafe { selfsup_dist_allreduce_sum(g, t.as_mut_ptr(), &mut err) };
            (rc == 0).then_some(()).ok_or_else(|| take_message(err))
        });
        r.unwrap_or(Ok(())).map_err(|m| self.error("all-reduce", m))
    }

    /// Gradients of `params` (leaves that require grad, the same list on every rank) averaged while backward runs,
    /// in buckets of about `bucket_numel` elements (see [`Overlap`]). `None` without a group.
    pub fn overlap(self: &Arc<Self>, params: &[Tensor], bucket_numel: i64) -> Result<Option<Overlap>, DistError> {
        let mut ptrs: Vec<*mut torch_sys::C_tensor> = params.iter().map(|t| t.as_ptr() as *mut _).collect();
        let r = self.with_group(|g| {
            let mut err = std::ptr::null_mut();
            // SAFETY: `ptrs` are live tensors for the call (the shim keeps its own references).
            let ptr = unsafe {
                selfsup_dist_overlap_new(g, ptrs.as_mut_ptr(), ptrs.len() as c_int, bucket_numel as c_long, &mut err)
            };
            if ptr.is_null() {
                Err(take_message(err))
            } else {
                Ok(ptr)
            }
        });
        match r {
            None => Ok(None),
            Some(Err(m)) => Err(self.error("setting up the gradient averaging", m)),
            Some(Ok(ptr)) => Ok(Some(Overlap { ptr, dist: self.clone() })),
        }
    }

    /// In place: the sum of `values` over the ranks, for numbers the host needs (row counts, votes): through the
    /// host channel when there is one (no GPU work, no synchronization), else through the backend and read back.
    pub fn all_reduce_host(&self, values: &mut [i64]) -> Result<(), DistError> {
        self.check()?;
        if self.group.is_none() || values.is_empty() {
            return Ok(());
        }
        if self.host {
            let r = self.with_group(|g| {
                let mut err = std::ptr::null_mut();
                // SAFETY: `values` is a live slice of `values.len()` i64 that the shim sums in place.
                let rc =
                    unsafe { selfsup_dist_allreduce_host(g, values.as_mut_ptr(), values.len() as c_int, &mut err) };
                (rc == 0).then_some(()).ok_or_else(|| take_message(err))
            });
            return r.unwrap_or(Ok(())).map_err(|m| self.error("all-reduce of host numbers", m));
        }
        let mut t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(&mut t)?;
        let sums = Vec::<i64>::try_from(t.to_device(Device::Cpu))
            .map_err(|e| self.error("all-reduce of host numbers", e.to_string()))?;
        values.copy_from_slice(&sums);
        Ok(())
    }

    /// In place: `t` takes rank `root`'s value.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        self.check()?;
        let r = self.with_group(|g| {
            let mut err = std::ptr::null_mut();
            // SAFETY: as in all_reduce_sum.
            let rc = unsafe { selfsup_dist_broadcast(g, t.as_mut_ptr(), root as c_int, &mut err) };
            (rc == 0).then_some(()).ok_or_else(|| take_message(err))
        });
        r.unwrap_or(Ok(())).map_err(|m| self.error("broadcast", m))
    }

    /// Every rank's `x` concatenated along dim 0 in rank order; `x` may have a different number of rows on each
    /// rank (the other dims must agree). `with_grad`: the gradient of the result flows back to each rank's own
    /// rows (summed over the ranks' losses); otherwise the result is detached.
    fn all_gather_rows(&self, x: &Tensor, with_grad: bool) -> Result<Tensor, DistError> {
        if self.group.is_none() {
            return Ok(if with_grad { x.shallow_clone() } else { x.detach() });
        }
        self.check()?;
        // Row counts first (host numbers): pad every slice to the largest, gather, then keep the real rows.
        let mut counts = vec![0i64; self.world];
        counts[self.rank] = x.size()[0];
        self.all_reduce_host(&mut counts)?;
        let most = counts.iter().copied().max().unwrap_or(0);
        if most == 0 {
            // No rank has a row (every rank sees the same counts and skips the gather).
            return Ok(if with_grad { x.shallow_clone() } else { x.detach() });
        }
        let rows = x.size()[0];
        let mut input = if rows < most {
            let mut shape = x.size();
            shape[0] = most - rows;
            Tensor::cat(&[x.shallow_clone(), Tensor::zeros(&shape, (x.kind(), x.device()))], 0)
        } else {
            x.shallow_clone()
        };
        if !with_grad {
            input = input.detach();
        }
        let r = self.with_group(|g| {
            let mut err = std::ptr::null_mut();
            // SAFETY: `input` is a live tensor; the shim returns a new heap tensor (owned here) or null.
            let ptr = unsafe { selfsup_dist_allgather(g, input.as_mut_ptr(), i32::from(with_grad), &mut err) };
            if ptr.is_null() {
                Err(take_message(err))
            } else {
                Ok(unsafe { Tensor::from_ptr(ptr) })
            }
        });
        let gathered = r.expect("a group").map_err(|m| self.error("all-gather", m))?;
        if counts.iter().all(|&c| c == most) {
            return Ok(gathered);
        }
        let keep: Vec<i64> =
            counts.iter().enumerate().flat_map(|(r, &c)| (0..c).map(move |i| r as i64 * most + i)).collect();
        Ok(gathered.index_select(0, &Tensor::from_slice(&keep).to_device(x.device())))
    }

    /// Every rank's rows of `x` (see [`Dist::all_gather_rows`]), detached: for statistics and evaluation.
    pub fn all_gather(&self, x: &Tensor) -> Result<Tensor, DistError> {
        self.all_gather_rows(x, false)
    }

    /// Every rank's rows of `x`, differentiable, for losses over the global batch. Infallible for the objectives'
    /// sake: on failure the error is kept for [`Dist::take_error`] and `x` is returned alone.
    pub fn gather(&self, x: &Tensor) -> Tensor {
        match self.all_gather_rows(x, true) {
            Ok(t) => t,
            Err(e) => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                x.shallow_clone()
            }
        }
    }

    /// The sum of `t` over the ranks, detached (statistics such as DINO's center). Infallible for the objectives'
    /// sake, as [`Dist::gather`]: on failure the error is kept and `t` is returned.
    pub fn sum(&self, t: &Tensor) -> Tensor {
        let mut s = t.detach().contiguous();
        if self.group.is_none() {
            return s;
        }
        s = s.copy();
        match self.all_reduce_sum(&mut s) {
            Ok(()) => s,
            Err(e) => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                t.detach()
            }
        }
    }

    /// The mean over every rank's rows of `rows` (`[N, K]` → `[1, K]` fp32), detached.
    pub fn mean_rows(&self, rows: &Tensor) -> Tensor {
        let rows = rows.detach().to_kind(Kind::Float);
        let n = Tensor::full([1, 1], rows.size()[0], (Kind::Float, rows.device()));
        let both = self.sum(&Tensor::cat(&[rows.sum_dim_intlist(0, true, Kind::Float), n], 1));
        let k = rows.size()[1];
        both.narrow(1, 0, k) / both.narrow(1, k, 1).clamp_min(1.0)
    }

    /// Uniform [0, 1) noise for this rank's `rows` of a global batch (`[rows, cols]`): drawn for all ranks'
    /// rows (equal slices) and sliced, so that a sample's draw does not depend on the number of ranks. torch's
    /// RNG is seeded the same on every rank (per step), so every rank draws the same global noise.
    pub fn rand_rows(&self, rows: i64, cols: i64, device: Device) -> Tensor {
        let all = Tensor::rand([rows * self.world as i64, cols], (Kind::Float, device));
        if self.world == 1 {
            all
        } else {
            all.narrow(0, self.rank as i64 * rows, rows)
        }
    }

    /// The error of a collective that failed inside a loss, if one did (consumed).
    pub fn take_error(&self) -> Option<DistError> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn check(&self) -> Result<(), DistError> {
        match self.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Batch norm of `x` (`[N, C, *]`, training mode) with the mean and variance of every rank's rows; updates
    /// `bn`'s running statistics with them. On failure the error is kept ([`Dist::take_error`]) and the local
    /// statistics are used.
    pub fn sync_batch_norm(&self, x: &Tensor, bn: &tch::nn::BatchNorm, eps: f64, momentum: f64) -> Tensor {
        let local = || tch::nn::ModuleT::forward_t(bn, x, true);
        if self.group.is_none() {
            return local();
        }
        let ptr = |t: Option<&Tensor>| t.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut torch_sys::C_tensor);
        let r = self.with_group(|g| {
            let mut err = std::ptr::null_mut();
            // SAFETY: live tensors (or null for absent ones); the shim returns a new heap tensor or null.
            let out = unsafe {
                selfsup_dist_sync_batch_norm(
                    g,
                    x.as_ptr() as *mut torch_sys::C_tensor,
                    ptr(bn.ws.as_ref()),
                    ptr(bn.bs.as_ref()),
                    ptr(Some(&bn.running_mean)),
                    ptr(Some(&bn.running_var)),
                    eps,
                    momentum,
                    &mut err,
                )
            };
            if out.is_null() {
                Err(take_message(err))
            } else {
                Ok(unsafe { Tensor::from_ptr(out) })
            }
        });
        match r.expect("a group") {
            Ok(y) => y,
            Err(m) => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(self.error("sync batch norm", m));
                local()
            }
        }
    }

    /// Waits until every rank got here (an all-reduce of one number, bounded by the group's timeout).
    pub fn barrier(&self) -> Result<(), DistError> {
        let mut one = Tensor::ones([1], (Kind::Float, self.device));
        self.all_reduce_sum(&mut one)
    }
}

/// This host's name (what Gloo binds when the master is on another machine).
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}
