//! Builds (and lints) the `lb-ebpf` object with the BPF toolchain `scripts/setup.sh` installs:
//! Debian's Rust (`/usr/bin/rustc`, which ships its library source) with `-Z build-std=core`
//! for `bpfel-unknown-none`, linked by `bpf-linker`; Debian's clippy for it.
//!
//! Shared by `cargo xtask build-ebpf` and `lb-userspace/build.rs` (which includes this file),
//! so both build the object the same way. It uses its own target directory, so running it
//! from a build script cannot deadlock on the outer cargo's lock.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// The compiler that has the library source `-Z build-std` needs.
pub const BPF_RUSTC: &str = "/usr/bin/rustc";
/// The cargo that goes with it.
pub const BPF_CARGO: &str = "/usr/bin/cargo";

/// Where the object ends up.
pub fn object_path(workspace: &Path) -> PathBuf {
    workspace.join("target/bpf/bpfel-unknown-none/release/lb-ebpf")
}

/// Debian's clippy for that compiler (package rust-web-clippy).
pub const BPF_CLIPPY: &str = "/usr/bin/cargo-clippy";

/// A command of the BPF toolchain in `lb-ebpf`, with nothing of an outer cargo or rustup
/// invocation leaking into it.
fn bpf_command(workspace: &Path, program: &str) -> Result<Command, String> {
    for tool in [BPF_RUSTC, BPF_CARGO, program] {
        if !Path::new(tool).exists() {
            return Err(format!(
                "{tool} is missing: the BPF toolchain is not installed (run scripts/setup.sh)"
            ));
        }
    }
    let mut cmd = Command::new(program);
    // Nothing of an outer cargo or rustup invocation may leak into this one.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTUP")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(workspace.join("lb-ebpf"))
        .env("CARGO", BPF_CARGO)
        .env("RUSTC", BPF_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1");
    Ok(cmd)
}

/// Builds the object and returns its path.
pub fn build_ebpf(workspace: &Path) -> Result<PathBuf, String> {
    let mut cmd = bpf_command(workspace, BPF_CARGO)?;
    cmd.env("CARGO_TARGET_DIR", workspace.join("target/bpf"))
        // BTF for the verifier and bpftool; debug info is what bpf-linker turns into BTF.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-Cdebuginfo=2", "-Clink-arg=--btf", "-Ctarget-cpu=v3"].join("\u{1f}"),
        )
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {BPF_CARGO}: {e}"))?;
    if !status.success() {
        return Err(format!("building lb-ebpf failed ({status})"));
    }
    Ok(object_path(workspace))
}

/// Runs clippy on `lb-ebpf` for the BPF target, warnings denied.
pub fn clippy_ebpf(workspace: &Path) -> Result<(), String> {
    let mut cmd = bpf_command(workspace, BPF_CLIPPY)?;
    cmd.env("CARGO_TARGET_DIR", workspace.join("target/bpf-clippy"))
        .args([
            "clippy",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {BPF_CLIPPY}: {e}"))?;
    if !status.success() {
        return Err(format!("clippy on lb-ebpf failed ({status})"));
    }
    Ok(())
}
