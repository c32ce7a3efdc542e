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

fn yaml(name: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(deploy_dir().join(name)).expect("read");
    serde_yaml::from_str(&text).expect("yaml")
}

/// Every `$(VAR)` in the agent's arguments is an environment variable of the container (an
/// undefined one would reach the agent as it is written), and every ConfigMap key it reads
/// is in the ConfigMap.
#[test]
fn the_daemonset_passes_every_setting_it_names() {
    let cm = yaml("configmap.yaml");
    let ds = yaml("daemonset.yaml");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_sequence().expect("env");
    let names: Vec<&str> = env.iter().filter_map(|e| e["name"].as_str()).collect();
    for arg in container["args"].as_sequence().expect("args") {
        let arg = arg.as_str().unwrap_or_default();
        if let Some((_, var)) = arg.split_once("$(") {
            let var = var.trim_end_matches(')');
            assert!(names.contains(&var), "{arg}: no variable {var}");
        }
    }
    for e in env {
        let r = &e["valueFrom"]["configMapKeyRef"];
        if let Some(key) = r["key"].as_str() {
            assert_eq!(r["name"].as_str(), Some("lb-agent"), "{e:?}");
            assert!(
                cm["data"][key].as_str().is_some(),
                "the ConfigMap has no {key}"
            );
        }
    }
}

/// The agent reaches the API server before any Service works: the DaemonSet passes the
/// ConfigMap's `api-server` (a value the agent accepts) as `--api-server`, and resolves
/// names with the node's resolver (cluster DNS is a Service).
#[test]
fn the_agent_reaches_the_api_server_without_services() {
    let cm = yaml("configmap.yaml");
    let ds = yaml("daemonset.yaml");
    let value = cm["data"]["api-server"].as_str().expect("api-server");
    let addr: lb_userspace::source::kube::ApiServerAddr =
        value.parse().expect("an address the agent accepts");
    assert_eq!(addr.to_string(), "kind-control-plane:6443");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["dnsPolicy"].as_str(), Some("Default"));
    let container = &spec["containers"][0];
    let args = container["args"].as_sequence().expect("args");
    assert!(
        args.iter()
            .any(|a| a.as_str() == Some("--api-server=$(API_SERVER)")),
        "{args:?}"
    );
    let env = container["env"].as_sequence().expect("env");
    assert!(
        env.iter().any(|e| e["name"].as_str() == Some("API_SERVER")
            && e["valueFrom"]["configMapKeyRef"]["key"].as_str() == Some("api-server")),
        "{env:?}"
    );
}
