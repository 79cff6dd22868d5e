// What tch 0.24 does not expose, reached through libtorch's C++ API directly.
// Every function is extern "C", takes plain values and never throws across the boundary.
#include <ATen/autocast_mode.h>
#include <ATen/Context.h>
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

}
