include!("../build/libtorch_link.rs");

fn main() {
    link_libtorch();
    println!("cargo:rerun-if-changed=csrc/torch_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=SELFSUP_NO_GLOO");
    let libtorch = std::path::PathBuf::from(
        std::env::var("LIBTORCH").expect("LIBTORCH is set by .cargo/config.toml; run scripts/setup"),
    );
    let cpp = |file: &str| {
        let mut b = cc::Build::new();
        b.cpp(true)
            .file(file)
            .include(libtorch.join("include"))
            .include(libtorch.join("include/torch/csrc/api/include"))
            .flag("-std=c++17")
            .define("_GLIBCXX_USE_CXX11_ABI", "1")
            .warnings(false);
        b
    };
    // The C++ shim for what tch lacks (bf16 autocast dtype, TF32, cuDNN benchmark).
    cpp("csrc/torch_shim.cpp").compile("selfsup_torch_shim");
    // torch.distributed's c10d (models/src/dist.rs). ProcessGroupGloo's header needs Gloo's headers, which the
    // torch wheel does not ship: Debian's libgloo-dev has them (scripts/setup installs it; nothing of it is
    // linked, the symbols are libtorch_cpu's). Without them the build stops, unless SELFSUP_NO_GLOO=1 says to
    // build without multi-process training on CPU.
    let mut dist = cpp("csrc/dist_shim.cpp");
    let gloo = std::path::Path::new("/usr/include/gloo/allreduce.h").exists();
    if gloo {
        dist.define("USE_C10D_GLOO", None).define("SELFSUP_GLOO", None);
    } else if std::env::var("SELFSUP_NO_GLOO").as_deref() != Ok("1") {
        panic!(
            "Gloo's headers are missing (/usr/include/gloo): `apt-get install libgloo-dev` (scripts/setup does), or \
             build with SELFSUP_NO_GLOO=1 to leave out multi-process training on CPU"
        );
    }
    // ProcessGroupNCCL, when this libtorch has CUDA and the headers it pulls in are in the venv (nccl.h from the
    // torch wheel's nvidia-nccl; crt/host_config.h from nvidia-cuda-crt and cccl's from nvidia-cuda-cccl, which
    // scripts/setup installs). Without them a CUDA run with more than one rank is refused with an error saying so.
    let nvidia = libtorch.join("../nvidia");
    let cuda_inc = nvidia.join("cu13/include");
    let nccl_inc = nvidia.join("nccl/include");
    let nccl = libtorch.join("lib/libtorch_cuda.so").exists()
        && nccl_inc.join("nccl.h").exists()
        && cuda_inc.join("crt/host_config.h").exists()
        && std::env::var("SELFSUP_NO_NCCL").as_deref() != Ok("1");
    println!("cargo:rerun-if-env-changed=SELFSUP_NO_NCCL");
    if nccl {
        dist.define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("SELFSUP_NCCL", None)
            .include(&cuda_inc)
            .include(cuda_inc.join("cccl"))
            .include(&nccl_inc);
    } else {
        println!("cargo:warning=building without NCCL (no CUDA headers): multi-GPU training is off in this build");
    }
    dist.compile("selfsup_dist_shim");
    if nccl {
        // ProcessGroupNCCL lives in libtorch_cuda (kept linked by link_libtorch) and uses c10_cuda.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
