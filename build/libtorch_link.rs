// Shared by every build.rs of a package that links libtorch into a binary or a test binary
// (included with `include!`, so there is one copy of this logic).
//
// torch-sys sets no usable rpath, and rustc links with `--as-needed`, which drops libtorch_cuda.so because
// nothing references its symbols directly: CUDA would then be silently unavailable on a GPU machine.
// `cargo:rustc-link-arg` applies only to the package that prints it, hence one call per package.
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB not set: is torch-sys a direct dependency?");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    if std::path::Path::new(&dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{dir}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
