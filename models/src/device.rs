//! Device-wide switches that tch does not expose, through the C++ shim in `csrc/torch_shim.cpp`.

extern "C" {
    fn selfsup_set_autocast_bf16(enabled: i32) -> i32;
    fn selfsup_set_tf32(enabled: i32);
    fn selfsup_set_cudnn_benchmark(enabled: i32);
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
    }
}
