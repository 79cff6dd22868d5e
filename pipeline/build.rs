include!("../build/libtorch_link.rs");
fn main() {
    link_libtorch();
    // The read-only HDF5 file driver that refuses global heap collections HDF5 would loop on (see
    // src/source/hdf5/guard.rs), compiled against the headers of the HDF5 that hdf5-metno-src built.
    println!("cargo:rerun-if-changed=csrc/h5guard.c");
    let include =
        std::env::var("DEP_HDF5_INCLUDE").expect("DEP_HDF5_INCLUDE: hdf5-metno-sys sets it for direct dependents");
    cc::Build::new()
        .file("csrc/h5guard.c")
        .include(include)
        .warnings(true)
        .extra_warnings(true)
        .compile("selfsup_h5guard");
}
