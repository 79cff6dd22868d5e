//! Device-wide switches that tch does not expose, through the C++ shim in `csrc/torch_shim.cpp`.

extern "C" {
    fn selfsup_set_autocast_bf16(enabled: i32) -> i32;
    fn selfsup_set_tf32(enabled: i32);
    fn selfsup_set_cudnn_benchmark(enabled: i32);
    fn selfsup_torch_version() -> i32;
    fn selfsup_cudnn_version() -> std::os::raw::c_long;
    fn selfsup_cudart_version() -> std::os::raw::c_long;
}

/// The libtorch version compiled against, e.g. `2.11.0`.
pub fn libtorch_version() -> String {
    // SAFETY: returns a compile-time constant.
    let v = unsafe { selfsup_torch_version() };
    format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
}

/// cuDNN version (e.g. 91300 for 9.13.0) when libtorch has CUDA loaded.
pub fn cudnn_version() -> Option<i64> {
    // SAFETY: the shim catches the exception libtorch throws without CUDA.
    let v = unsafe { selfsup_cudnn_version() };
    (v > 0).then_some(v as i64)
}

/// CUDA runtime version (e.g. 13000) when libtorch has CUDA loaded.
pub fn cuda_runtime_version() -> Option<i64> {
    // SAFETY: as above.
    let v = unsafe { selfsup_cudart_version() };
    (v > 0).then_some(v as i64)
}

/// Makes CUDA autocast (`tch::autocast`) run in bfloat16 instead of fp16. bf16 has fp32's range, so no grad scaler.
pub fn use_bf16_autocast() -> bool {
    // SAFETY: plain C call into libtorch's global autocast state; the shim catches every C++ exception.
    unsafe { selfsup_set_autocast_bf16(1) == 0 }
}

/// TF32 matmuls and convolutions on Ampere and later, as `torch.backends.{cuda.matmul,cudnn}.allow_tf32`.
pub fn set_tf32(enabled: bool) {
    // SAFETY: sets a flag in libtorch's global context.
    unsafe { selfsup_set_tf32(i32::from(enabled)) }
}

/// cuDNN autotuning of convolution algorithms for fixed input shapes (`torch.backends.cudnn.benchmark`).
pub fn set_cudnn_benchmark(enabled: bool) {
    // SAFETY: sets a flag in libtorch's global context.
    unsafe { selfsup_set_cudnn_benchmark(i32::from(enabled)) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shim_links_and_answers() {
        // On CPU builds the call still reaches libtorch; it must not fail.
        assert!(super::use_bf16_autocast());
        super::set_tf32(true);
        super::set_cudnn_benchmark(false);
        assert_eq!(super::libtorch_version(), "2.11.0");
    }
}
