include!("build/libtorch_link.rs");

/// Compiles every `configs/*.toml` into the binary as a preset named after its file (`PRESETS` in
/// `$OUT_DIR/presets.rs`): a new preset is a new file, nothing else to register.
fn embed_presets() {
    println!("cargo:rerun-if-changed=configs");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("configs/ exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".toml")).map(str::to_string))
        .collect();
    names.sort();
    let mut code = format!("/// Presets compiled into the binary (every `configs/*.toml`), usable by name wherever a config file is expected.\npub const PRESETS: [(&str, &str); {}] = [\n", names.len());
    for n in &names {
        let path = dir.join(format!("{n}.toml"));
        println!("cargo:rerun-if-changed={}", path.display());
        code.push_str(&format!("    ({n:?}, include_str!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("presets.rs");
    std::fs::write(out, code).expect("writing presets.rs");
}

fn main() {
    link_libtorch();
    embed_presets();
}
