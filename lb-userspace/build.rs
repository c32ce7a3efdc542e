//! Builds the BPF object (see xtask/src/ebpf_build.rs) and hands its path to the agent,
//! which embeds it.

#[path = "../xtask/src/ebpf_build.rs"]
#[allow(
    dead_code,
    reason = "the build script only builds the object; xtask also lints it"
)]
mod ebpf_build;

fn main() {
    let manifest =
        std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest.parent().unwrap_or(&manifest).to_path_buf();
    for path in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
        "Cargo.lock",
        "xtask/src/ebpf_build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    match ebpf_build::build_ebpf(&workspace) {
        Ok(object) => println!("cargo:rustc-env=LB_EBPF_OBJECT={}", object.display()),
        Err(e) => {
            println!("cargo:warning={e}");
            std::process::exit(1);
        }
    }
}
