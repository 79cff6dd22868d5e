// torch.distributed's c10d reached from Rust: a TCPStore rendezvous, a ProcessGroupGloo (CPU) or ProcessGroupNCCL
// (CUDA) backend, the few collectives the trainer uses, and one autograd function (an all-gather whose backward
// reduces the gradient back to the rank that owns each slice). Every function is extern "C", catches every C++
// exception and returns it as a malloc'ed message in `*err` (freed with selfsup_dist_free_error); Rust wraps the
// group in a safe type (models/src/dist.rs). Built with -DSELFSUP_GLOO (Debian's libgloo-dev gives the headers;
// the symbols are libtorch_cpu's) and, for CUDA builds, -DSELFSUP_NCCL.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef SELFSUP_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef SELFSUP_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  // Host numbers (row counts, votes) without touching the GPU stream: the Gloo backend itself, or for NCCL a
  // Gloo group of its own beside it; null when there is none (the numbers then go through `backend`).
  c10::intrusive_ptr<c10d::Backend> host;
  int rank = 0;
  int world = 1;
  std::chrono::milliseconds timeout{0};
};

void set_error(char** err, const char* what) {
  if (err) *err = strdup(what ? what : "unknown C++ error");
}


// Waits for `work`, turning a timeout into an exception that names it (Gloo and NCCL throw on failures).
void finish(const c10::intrusive_ptr<c10d::Work>& work, const Group* g, const char* what) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error(std::string(what) + ": no answer from every rank within " +
                             std::to_string(g->timeout.count() / 1000) + " s (dist.timeout_s)");
  }
}

// In-place sum over the ranks of a dense tensor.
void allreduce_sum(Group* g, at::Tensor& t) {
  std::vector<at::Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  finish(g->backend->allreduce(v, o), g, "all-reduce");
}

// The ranks' `x` (same shape on every rank) concatenated along dim 0, rank order.
at::Tensor allgather(Group* g, const at::Tensor& x) {
  at::Tensor input = x.contiguous();
  std::vector<at::Tensor> inputs{input};
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < g->world; r++) outputs[0].push_back(at::empty_like(input));
  finish(g->backend->allgather(outputs, inputs), g, "all-gather");
  return at::cat(outputs[0], 0);
}

// All-gather with a gradient: forward concatenates every rank's slice; backward sums the incoming gradient over
// the ranks (each rank's loss may use every slice) and returns this rank's rows of it (a reduce-scatter).
struct GatherWithGrad : public torch::autograd::Function<GatherWithGrad> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t group) {
    Group* g = reinterpret_cast<Group*>(group);
    ctx->saved_data["group"] = group;
    ctx->saved_data["rows"] = x.size(0);
    return allgather(g, x.detach());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    Group* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    int64_t rows = ctx->saved_data["rows"].toInt();
    at::Tensor grad = grads[0].contiguous().clone();
    allreduce_sum(g, grad);
    return {grad.narrow(0, g->rank * rows, rows), at::Tensor()};
  }
};

// Batch norm over every rank's rows (torch.nn.SyncBatchNorm's maths, in plain ATen ops so it runs on CPU and
// CUDA): per-channel sums, sums of squares and counts all-reduced (in fp64) give the global mean and variance;
// backward all-reduces the per-channel sums of dy and dy * x_hat. The weight and bias gradients stay local sums
// (the trainer averages parameter gradients over the ranks like every other).
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static std::vector<int64_t> reduce_dims(const at::Tensor& x) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); d++) dims.push_back(d);
    return dims;
  }
  static std::vector<int64_t> channel_shape(const at::Tensor& x) {
    std::vector<int64_t> shape(x.dim(), 1);
    shape[1] = x.size(1);
    return shape;
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, at::Tensor running_mean, at::Tensor running_var, double eps,
                            double momentum, int64_t group) {
    Group* g = reinterpret_cast<Group*>(group);
    auto dims = reduce_dims(x);
    int64_t c = x.size(1);
    at::Tensor xd = x.detach();
    at::Tensor sum = xd.sum(dims).to(at::kDouble);
    at::Tensor sumsq = (xd * xd).sum(dims).to(at::kDouble);
    at::Tensor count = at::full({1}, static_cast<double>(x.numel() / std::max<int64_t>(c, 1)), sum.options());
    at::Tensor stats = at::cat({sum, sumsq, count});
    allreduce_sum(g, stats);
    at::Tensor total = stats.narrow(0, 2 * c, 1);
    at::Tensor mean = stats.narrow(0, 0, c) / total;
    at::Tensor var = (stats.narrow(0, c, c) / total - mean * mean).clamp_min(0.0);
    {
      at::NoGradGuard no_grad;
      if (running_mean.defined()) {
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()) * momentum);
        at::Tensor unbiased = var * total / (total - 1.0).clamp_min(1.0);
        running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()) * momentum);
      }
    }
    auto shape = channel_shape(x);
    at::Tensor mean_x = mean.to(x.scalar_type()).view(shape);
    at::Tensor invstd_x = (var + eps).rsqrt().to(x.scalar_type()).view(shape);
    at::Tensor y = (xd - mean_x) * invstd_x;
    if (weight.defined()) y = y * weight.detach().view(shape);
    if (bias.defined()) y = y + bias.detach().view(shape);
    ctx->save_for_backward({xd, weight, mean_x, invstd_x, total});
    ctx->saved_data["group"] = group;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    Group* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    auto saved = ctx->get_saved_variables();
    at::Tensor x = saved[0], weight = saved[1], mean = saved[2], invstd = saved[3], total = saved[4];
    at::Tensor dy = grads[0];
    auto dims = reduce_dims(x);
    auto shape = channel_shape(x);
    int64_t c = x.size(1);
    at::Tensor xhat = (x - mean) * invstd;
    at::Tensor sum_dy = dy.sum(dims);
    at::Tensor sum_dy_xhat = (dy * xhat).sum(dims);
    at::Tensor both = at::cat({sum_dy, sum_dy_xhat}).to(at::kDouble);
    allreduce_sum(g, both);
    at::Tensor mean_dy = (both.narrow(0, 0, c) / total).to(x.scalar_type()).view(shape);
    at::Tensor mean_dy_xhat = (both.narrow(0, c, c) / total).to(x.scalar_type()).view(shape);
    at::Tensor gx = (dy - mean_dy - xhat * mean_dy_xhat) * invstd;
    if (weight.defined()) gx = gx * weight.view(shape);
    at::Tensor gw = weight.defined() ? sum_dy_xhat.to(weight.scalar_type()) : at::Tensor();
    at::Tensor gb = weight.defined() ? sum_dy.to(weight.scalar_type()) : at::Tensor();
    return {gx, gw, gb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Gradients averaged while backward runs (what DDP's Reducer does, in a few lines): the parameters in buckets of
// about `bucket_numel` elements, in reverse order (backward produces the last layers' gradients first); a hook on
// each parameter's gradient accumulator marks it ready; a bucket whose parameters are all ready is flattened and
// its all-reduce started at once, in bucket order, so that every rank issues the same collectives in the same
// order. finish() starts what is left (a parameter without a gradient counts as zeros), waits, and copies the
// averages back. Hooks do nothing unless armed (evaluation and other backward passes are not touched).
struct Overlap {
  Group* g = nullptr;
  std::vector<at::Tensor> params;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;  // kept alive: they hold the hooks
  std::vector<std::vector<size_t>> buckets;                          // parameter indices
  std::vector<size_t> bucket_of;
  std::vector<size_t> pending;  // per bucket: parameters not ready yet this step
  std::vector<bool> ready;
  std::vector<at::Tensor> flat;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;  // the next bucket to start
  size_t early = 0;  // buckets started during the last backward pass (before finish)
  bool armed = false;
  std::string error;  // the first failure inside a hook, reported by finish()
  std::mutex m;

  at::Tensor flatten(size_t b) {
    std::vector<at::Tensor> parts;
    for (size_t i : buckets[b]) {
      const at::Tensor& p = params[i];
      at::Tensor grad = p.grad();
      parts.push_back(grad.defined() ? grad.reshape({-1}) : at::zeros({p.numel()}, p.options()));
    }
    return at::cat(parts);
  }

  // Starts every complete bucket from `next` on, in order (`all`: the incomplete ones too). Caller holds m.
  void launch(bool all) {
    while (next < buckets.size() && (all || pending[next] == 0)) {
      flat[next] = flatten(next);
      std::vector<at::Tensor> v{flat[next]};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      works[next] = g->backend->allreduce(v, o);
      ++next;
    }
  }

  void mark(size_t i) {
    std::lock_guard<std::mutex> lock(m);
    if (!armed || !error.empty()) return;
    try {
      if (ready[i]) {
        error = "a parameter's gradient was produced twice in one backward pass (set dist.overlap = false)";
        return;
      }
      ready[i] = true;
      size_t b = bucket_of[i];
      if (b < next) {
        error = "a parameter's gradient came after its bucket was sent (set dist.overlap = false)";
        return;
      }
      --pending[b];
      launch(false);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
};

struct ReadyHook : public torch::autograd::FunctionPostHook {
  Overlap* ov;
  size_t index;
  ReadyHook(Overlap* o, size_t i) : ov(o), index(i) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list& /*inputs*/) override {
    ov->mark(index);
    return outputs;
  }
};

#ifdef SELFSUP_GLOO
// A Gloo backend over `store`: on interface `iface` if given, else on the address `bind_host`.
c10::intrusive_ptr<c10d::Backend> new_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
                                           std::chrono::milliseconds timeout, const char* iface, const char* bind_host) {
  auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
  if (iface && *iface) {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
  } else {
    opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind_host));
  }
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
}
#endif

}  // namespace

extern "C" {

// Batch norm of `*x` ([N, C, *]) in training mode with the statistics of every rank's rows; `weight`, `bias`,
// `running_mean`, `running_var` may be null (no affine / no running statistics). A new at::Tensor*, or null.
void* selfsup_dist_sync_batch_norm(void* group, void* x, void* weight, void* bias, void* running_mean,
                                   void* running_var, double eps, double momentum, char** err) {
  try {
    auto t = [](void* p) { return p ? *static_cast<at::Tensor*>(p) : at::Tensor(); };
    at::Tensor y = SyncBatchNorm::apply(t(x), t(weight), t(bias), t(running_mean), t(running_var), eps, momentum,
                                        reinterpret_cast<int64_t>(group));
    return new at::Tensor(y);
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return nullptr;
  }
}

void selfsup_dist_free_error(char* err) { free(err); }

// A process group of `world` ranks, this one being `rank`, meeting at host:port (rank 0 serves the TCPStore there).
// backend: 0 = Gloo (CPU tensors), 1 = NCCL (CUDA tensors). `iface` (may be empty): the network interface Gloo
// binds (GLOO_SOCKET_IFNAME); otherwise Gloo binds the address `bind_host`. Null on error (`*err` set).
// `serve`: this rank serves the TCPStore (rank 0, unless torchrun's agent already serves it). `host_channel`
// (NCCL only, with Gloo built in): also a Gloo group for host numbers (see Group::host), on `iface` / `bind_host`.
void* selfsup_dist_new(int backend, const char* host, int port, int rank, int world, long timeout_ms,
                       const char* iface, const char* bind_host, int serve, int host_channel, char** err) {
  // c10d's flight recorder (a process-wide log of every collective, with a stack trace each) inserts into a map
  // outside its own lock (FlightRecorder::recordWithResetEnabled, torch 2.11): two groups recording at once, as
  // ranks-as-threads do, crash in it. Off unless the user asks for it (TORCH_FR_BUFFER_SIZE or the older
  // TORCH_NCCL_TRACE_BUFFER_SIZE); it also saves the stack capture per collective. Read once, at first use.
  static std::once_flag recorder;
  std::call_once(recorder, [] {
    if (!std::getenv("TORCH_FR_BUFFER_SIZE") && !std::getenv("TORCH_NCCL_TRACE_BUFFER_SIZE")) {
      setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
    }
  });
  try {
    auto g = new Group();
    g->rank = rank;
    g->world = world;
    g->timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = serve != 0;
    o.numWorkers = world;
    o.waitWorkers = true;
    o.timeout = g->timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    g->store = tcp;
    auto store = c10::make_intrusive<c10d::PrefixStore>("selfsup/0/", tcp);
    if (backend == 0) {
#ifdef SELFSUP_GLOO
      g->backend = new_gloo(store, rank, world, g->timeout, iface, bind_host);
      g->host = g->backend;
#else
      delete g;
      set_error(err, "this selfsup was built without Gloo (SELFSUP_NO_GLOO=1): no multi-process training on CPU");
      return nullptr;
#endif
    } else {
#ifdef SELFSUP_NCCL
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = g->timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#ifdef SELFSUP_GLOO
      if (host_channel) {
        auto host_store = c10::make_intrusive<c10d::PrefixStore>("selfsup/host/", tcp);
        g->host = new_gloo(host_store, rank, world, g->timeout, iface, bind_host);
      }
#endif
#else
      delete g;
      set_error(err, "this selfsup was built without NCCL (no CUDA headers at build time): use dist.backend = \"gloo\"");
      return nullptr;
#endif
    }
    return g;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return nullptr;
  }
}

void selfsup_dist_free(void* group) { delete static_cast<Group*>(group); }

// In-place sum over the ranks of `*tensor` (an at::Tensor*, tch's C_tensor). 0 on success.
int selfsup_dist_allreduce_sum(void* group, void* tensor, char** err) {
  try {
    allreduce_sum(static_cast<Group*>(group), *static_cast<at::Tensor*>(tensor));
    return 0;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return 1;
  }
}

// In-place: `*tensor` takes rank `root`'s value on every rank. 0 on success.
int selfsup_dist_broadcast(void* group, void* tensor, int root, char** err) {
  try {
    Group* g = static_cast<Group*>(group);
    std::vector<at::Tensor> v{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    finish(g->backend->broadcast(v, o), g, "broadcast");
    return 0;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return 1;
  }
}

// An Overlap (see there) over the `n` parameters `params` (at::Tensor*, leaves that require grad), buckets of
// about `bucket_numel` elements of one dtype and device. Null on error.
void* selfsup_dist_overlap_new(void* group, void** params, int n, long bucket_numel, char** err) {
  try {
    auto ov = new Overlap();
    ov->g = static_cast<Group*>(group);
    for (int i = 0; i < n; ++i) ov->params.push_back(*static_cast<at::Tensor*>(params[i]));
    ov->bucket_of.assign(n, 0);
    long numel = 0;
    for (int i = n - 1; i >= 0; --i) {
      const at::Tensor& p = ov->params[i];
      // A new bucket when this one is full (a parameter larger than a bucket is one alone) or of another kind.
      bool fresh = ov->buckets.empty() || (numel > 0 && numel + p.numel() > bucket_numel) ||
                   ov->params[ov->buckets.back().front()].scalar_type() != p.scalar_type() ||
                   ov->params[ov->buckets.back().front()].device() != p.device();
      if (fresh) {
        ov->buckets.emplace_back();
        numel = 0;
      }
      ov->buckets.back().push_back(i);
      ov->bucket_of[i] = ov->buckets.size() - 1;
      numel += p.numel();
    }
    size_t nb = ov->buckets.size();
    ov->pending.assign(nb, 0);
    ov->flat.resize(nb);
    ov->works.resize(nb);
    ov->ready.assign(n, false);
    for (int i = 0; i < n; ++i) {
      auto acc = ov->params[i].requires_grad() ? torch::autograd::impl::grad_accumulator(ov->params[i]) : nullptr;
      if (!acc) {
        delete ov;
        throw std::runtime_error("a parameter to average is not a leaf that requires grad");
      }
      ov->accumulators.push_back(acc);
    }
    for (int i = 0; i < n; ++i) ov->accumulators[i]->add_post_hook(std::make_unique<ReadyHook>(ov, i));
    return ov;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return nullptr;
  }
}

// Before a backward pass: every parameter not ready, no bucket sent.
void selfsup_dist_overlap_arm(void* overlap) {
  auto ov = static_cast<Overlap*>(overlap);
  std::lock_guard<std::mutex> lock(ov->m);
  std::fill(ov->ready.begin(), ov->ready.end(), false);
  for (size_t b = 0; b < ov->buckets.size(); ++b) {
    ov->pending[b] = ov->buckets[b].size();
    ov->flat[b] = at::Tensor();
    ov->works[b].reset();
  }
  ov->next = 0;
  ov->error.clear();
  ov->armed = true;
}

// After the backward pass: sends what is left, waits for every bucket, writes the averages into the gradients
// (a parameter without one gets none). 0 on success.
int selfsup_dist_overlap_finish(void* overlap, char** err) {
  auto ov = static_cast<Overlap*>(overlap);
  try {
    std::lock_guard<std::mutex> lock(ov->m);
    ov->armed = false;
    if (!ov->error.empty()) throw std::runtime_error(ov->error);
    ov->early = ov->next;
    ov->launch(true);
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < ov->buckets.size(); ++b) {
      finish(ov->works[b], ov->g, "all-reduce of gradients");
      ov->flat[b].div_(ov->g->world);
      long offset = 0;
      for (size_t i : ov->buckets[b]) {
        at::Tensor& p = ov->params[i];
        long k = p.numel();
        at::Tensor grad = p.grad();
        if (grad.defined()) grad.copy_(ov->flat[b].narrow(0, offset, k).view(p.sizes()));
        offset += k;
      }
      ov->flat[b] = at::Tensor();
      ov->works[b].reset();
    }
    return 0;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return 1;
  }
}

// How many buckets the last backward pass started before finish().
int selfsup_dist_overlap_early(void* overlap) { return static_cast<int>(static_cast<Overlap*>(overlap)->early); }

// Removes the hooks' effect (they stay on the accumulators, disarmed) and frees the Overlap.
void selfsup_dist_overlap_free(void* overlap) {
  auto ov = static_cast<Overlap*>(overlap);
  {
    std::lock_guard<std::mutex> lock(ov->m);
    ov->armed = false;
  }
  // The hooks hold a raw pointer: they must not outlive it. Remove them from the accumulators.
  for (auto& acc : ov->accumulators) {
    auto& hooks = acc->post_hooks();
    for (auto it = hooks.begin(); it != hooks.end();) {
      auto h = dynamic_cast<ReadyHook*>(it->get());
      it = (h && h->ov == ov) ? hooks.erase(it) : it + 1;
    }
  }
  delete ov;
}

// 1 when the group has a host channel (see Group::host).
int selfsup_dist_has_host_channel(void* group) { return static_cast<Group*>(group)->host ? 1 : 0; }

// In place: `values[0..n]` summed over the ranks through the host channel (no GPU work). 0 on success.
int selfsup_dist_allreduce_host(void* group, int64_t* values, int n, char** err) {
  try {
    Group* g = static_cast<Group*>(group);
    if (!g->host) throw std::runtime_error("this group has no host channel");
    std::vector<at::Tensor> v{at::from_blob(values, {n}, at::kLong)};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    finish(g->host->allreduce(v, o), g, "all-reduce of host numbers");
    return 0;
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return 1;
  }
}

// Every rank's `*tensor` (same shape everywhere) concatenated along dim 0: a new at::Tensor*, or null on error.
// `with_grad`: the result's gradient flows back to each rank's own slice (see GatherWithGrad).
void* selfsup_dist_allgather(void* group, void* tensor, int with_grad, char** err) {
  try {
    Group* g = static_cast<Group*>(group);
    const at::Tensor& x = *static_cast<at::Tensor*>(tensor);
    at::Tensor out = with_grad ? GatherWithGrad::apply(x, reinterpret_cast<int64_t>(g)) : allgather(g, x);
    return new at::Tensor(out);
  } catch (const std::exception& e) {
    set_error(err, e.what());
    return nullptr;
  }
}

}  // extern "C"
