//! Device-wide switches that tch does not expose, through the C++ shim in `csrc/torch_shim.cpp`: autocast without
//! tch's deprecation warnings, pinned host tensors, bf16, TF32, cuDNN autotuning, versions.

use tch::{Device, Tensor};

extern "C" {
    fn selfsup_set_autocast_bf16(enabled: i32) -> i32;
    fn selfsup_set_tf32(enabled: i32);
    fn selfsup_set_cudnn_benchmark(enabled: i32);
    fn selfsup_torch_version() -> i32;
    fn selfsup_cudnn_version() -> std::os::raw::c_long;
    fn selfsup_cudart_version() -> std::os::raw::c_long;
    fn selfsup_autocast_enter(enabled: i32) -> i32;
    fn selfsup_autocast_exit(prev: i32);
    fn selfsup_pinned_from(
        src: *const std::ffi::c_void,
        nbytes: std::os::raw::c_long,
        shape: *const std::os::raw::c_long,
        ndim: i32,
        kind: i32,
    ) -> *mut torch_sys::C_tensor;
}

/// Runs `f` with CUDA autocast on or off (bf16 after [`use_bf16_autocast`]), as `tch::autocast`, but through
/// libtorch's per-device calls: tch's use the deprecated global ones, which print a warning on every call (17 lines
/// per SimCLR step on the GPU machine). The previous state comes back even if `f` panics. Without CUDA: just `f()`.
pub fn autocast<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: pairs with the enter below on this thread; plain calls into libtorch's thread-local state.
            unsafe { selfsup_autocast_exit(self.0) }
        }
    }
    if !tch::Cuda::is_available() {
        return f();
    }
    // SAFETY: as above; the shim catches every C++ exception.
    let _restore = Restore(unsafe { selfsup_autocast_enter(i32::from(enabled)) });
    f()
}

/// Element types [`pinned`] copies.
pub trait PinnedElement: tch::kind::Element + Copy {
    #[doc(hidden)]
    const SHIM_KIND: i32;
}
impl PinnedElement for f32 {
    const SHIM_KIND: i32 = 0;
}
impl PinnedElement for i64 {
    const SHIM_KIND: i32 = 1;
}

/// `data` as a CPU tensor of `shape` in page-locked memory, in one copy (`from_slice` + `pin_memory` make two), so
/// that `to_device_(cuda, .., non_blocking = true, ..)` is a truly asynchronous copy. `None` when pinning is
/// impossible (no CUDA) or `shape` does not hold `data.len()` elements.
pub fn pinned<T: PinnedElement>(data: &[T], shape: &[i64]) -> Option<Tensor> {
    if shape.iter().product::<i64>() != data.len() as i64 {
        return None;
    }
    let dims: Vec<std::os::raw::c_long> = shape.iter().map(|&d| d as std::os::raw::c_long).collect();
    let nbytes = std::mem::size_of_val(data) as std::os::raw::c_long;
    // SAFETY: `data` is valid for `nbytes` bytes and `dims` for `ndim` entries during the call; the shim copies
    // and returns a new heap at::Tensor (tch's C_tensor) or null, never throwing.
    let ptr =
        unsafe { selfsup_pinned_from(data.as_ptr().cast(), nbytes, dims.as_ptr(), dims.len() as i32, T::SHIM_KIND) };
    // SAFETY: a non-null pointer is a fresh at::Tensor that the returned Tensor now owns.
    (!ptr.is_null()).then(|| unsafe { Tensor::from_ptr(ptr) })
}

/// `data` as a tensor of `shape` on `device`: on CUDA through pinned memory and an asynchronous copy (the caller
/// does not wait for it; later kernels on the stream do), elsewhere a plain CPU tensor.
pub fn host_to_device<T: PinnedElement>(data: &[T], shape: &[i64], device: Device) -> Tensor {
    if device.is_cuda() {
        if let Some(t) = pinned(data, shape) {
            return t.to_device_(device, <T as tch::kind::Element>::KIND, true, false);
        }
    }
    Tensor::from_slice(data).view(shape).to_device(device)
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

/// Makes CUDA autocast ([`autocast`]) run in bfloat16 instead of fp16. bf16 has fp32's range, so no grad scaler.
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

thread_local! {
    /// Set while [`catch_torch`] runs on this thread: its panics are errors to return, not messages to print.
    static CATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, returning the message of a LibTorch error that tch's infallible calls raise as a panic (a shape
/// that does not fit the network: `expected input[4, 3, 28, 28] to have 1 channels`) instead of unwinding
/// through the caller; the caller names the data it was fed. Nothing is printed for such a panic (the default
/// hook stays in place for every other one). Use around calls on user data only: a panic here means the data,
/// not the program, is wrong.
pub fn catch_torch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CATCHING.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            CATCHING.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(CATCHING.with(|c| c.replace(true)));
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let text = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "LibTorch failed".into());
        // tch wraps the C++ message: `called Result::unwrap() on an Err value: Torch("...\nException raised
        // from ...")` (the Debug form escapes the newlines): keep the first line of what LibTorch said.
        let inner = text.split_once("Torch(\"").map_or(text.as_str(), |(_, t)| t);
        let first = inner.split("\\n").next().unwrap_or(inner);
        first.lines().next().unwrap_or(first).trim_end_matches(['"', ')']).to_string()
    })
}

#[cfg(test)]
mod catch_tests {
    use super::*;

    #[test]
    fn a_shape_error_is_returned_with_libtorch_s_words_and_other_panics_still_print() {
        let x = Tensor::zeros([2, 3], (tch::Kind::Float, Device::Cpu));
        let y = Tensor::zeros([4, 5], (tch::Kind::Float, Device::Cpu));
        let err = catch_torch(|| x.matmul(&y)).unwrap_err();
        assert!(err.contains("cannot be multiplied") || err.contains("shapes"), "{err}");
        assert!(!err.contains("Exception raised from"), "{err}");
        assert_eq!(catch_torch(|| 7).unwrap(), 7);
        // The flag is off again afterwards, nested or not.
        let _ = catch_torch(|| catch_torch(|| x.matmul(&y)));
        assert!(!CATCHING.with(std::cell::Cell::get));
    }
}
