include!("../build/libtorch_link.rs");

fn main() {
    link_libtorch();
    // The C++ shim for what tch lacks (bf16 autocast dtype, TF32, cuDNN benchmark); compiled against the same libtorch.
    println!("cargo:rerun-if-changed=csrc/torch_shim.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::path::PathBuf::from(
        std::env::var("LIBTORCH").expect("LIBTORCH is set by .cargo/config.toml; run scripts/setup"),
    );
    cc::Build::new()
        .cpp(true)
        .file("csrc/torch_shim.cpp")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("selfsup_torch_shim");
}
