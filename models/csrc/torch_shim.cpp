// What tch 0.24 does not expose, reached through libtorch's C++ API directly.
// Every function is extern "C", takes plain values and never throws across the boundary.
#include <ATen/autocast_mode.h>
#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <cstring>
#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/headeronly/version.h>

extern "C" {

// tch::autocast enables autocast but always with fp16 (and tch has no grad scaler); bf16 needs no scaler.
// Returns 0 on success, 1 if libtorch refused.
int selfsup_set_autocast_bf16(int enabled) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, enabled ? at::kBFloat16 : at::kHalf);
    return 0;
  } catch (...) {
    return 1;
  }
}

// TF32 for fp32 matmuls and convolutions on Ampere and later (what torch.backends.*.allow_tf32 sets).
void selfsup_set_tf32(int enabled) {
  at::globalContext().setAllowTF32CuBLAS(enabled != 0);
  at::globalContext().setAllowTF32CuDNN(enabled != 0);
}

// cuDNN autotuning (torch.backends.cudnn.benchmark).
void selfsup_set_cudnn_benchmark(int enabled) { at::globalContext().setBenchmarkCuDNN(enabled != 0); }

// The libtorch version these headers belong to, as MAJOR*10000 + MINOR*100 + PATCH.
int selfsup_torch_version() { return TORCH_VERSION_MAJOR * 10000 + TORCH_VERSION_MINOR * 100 + TORCH_VERSION_PATCH; }

// cuDNN and CUDA runtime versions as libtorch reports them; -1 when libtorch has no CUDA.
long selfsup_cudnn_version() {
  try {
    return at::detail::getCUDAHooks().versionCuDNN();
  } catch (...) {
    return -1;
  }
}

long selfsup_cudart_version() {
  try {
    return at::detail::getCUDAHooks().versionCUDART();
  } catch (...) {
    return -1;
  }
}

// Enters an autocast region for CUDA (what tch::autocast does, through the non-deprecated per-device calls: tch's
// at::autocast::is_enabled/set_enabled print a deprecation warning on every call). Returns the previous state.
int selfsup_autocast_enter(int enabled) {
  try {
    bool prev = at::autocast::is_autocast_enabled(at::kCUDA);
    at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
    at::autocast::increment_nesting();
    return prev ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// Leaves the region entered with selfsup_autocast_enter, restoring `prev`; the cast cache is cleared when the
// outermost region ends.
void selfsup_autocast_exit(int prev) {
  try {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCUDA, prev != 0);
  } catch (...) {
  }
}

// A new CPU tensor in page-locked (pinned) memory with `ndim` sizes `shape`, of float32 (kind 0) or int64 (kind 1),
// filled with `nbytes` bytes from `src`: one copy, where from_slice + pin_memory made two (and tch's pin_memory
// passes a device, deprecated, warning every call). Returns a heap at::Tensor* (tch's C_tensor), or null on error
// (size mismatch, or no CUDA to pin with).
void* selfsup_pinned_from(const void* src, long nbytes, const long* shape, int ndim, int kind) {
  try {
    std::vector<int64_t> sizes(shape, shape + ndim);
    auto dtype = kind == 1 ? at::kLong : at::kFloat;
    at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype).pinned_memory(true));
    if (static_cast<long>(t.nbytes()) != nbytes) return nullptr;
    if (nbytes > 0) std::memcpy(t.data_ptr(), src, nbytes);
    return new at::Tensor(std::move(t));
  } catch (...) {
    return nullptr;
  }
}

}
