//! The deploy/ manifests: every one validates against the Kubernetes API schemas offline
//! (kubernetes-validate, installed by scripts/setup.sh), and the kustomization lists them all.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::path::{Path, PathBuf};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The Kubernetes objects under deploy/ (not the kustomization and kind configs, which are
/// not API objects).
fn object_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            n != "kustomization.yaml" && n != "kind-config.yaml"
        })
        .collect();
    files.sort();
    files
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .output()
        .expect("kubernetes-validate is missing: run scripts/setup.sh")
}

#[test]
fn every_manifest_validates_against_the_api_schemas() {
    let files = object_files();
    assert!(files.len() >= 6, "{files:?}");
    let out = validate(&files);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            text.contains(&format!("{name} passed")),
            "{name} not validated:\n{text}"
        );
    }

    // The validator does refuse a broken manifest (a DaemonSet with an unknown field).
    let broken = std::env::temp_dir().join(format!("lb-broken-{}.yaml", std::process::id()));
    let ds = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).expect("read");
    std::fs::write(
        &broken,
        ds.replace("  updateStrategy:", "  updateStrategyy:"),
    )
    .expect("write");
    let out = validate(std::slice::from_ref(&broken));
    let _ = std::fs::remove_file(&broken);
    assert!(!out.status.success(), "a broken manifest passed");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).expect("read");
    for f in object_files() {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            k.contains(&format!("- {name}")),
            "{name} missing from kustomization.yaml"
        );
    }
}
