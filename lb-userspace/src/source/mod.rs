//! The API server as a source of objects (`kube`). The `Source` trait, the manifests source
//! and validation are pure and live in `lb_control::source`; this one needs the Kubernetes
//! client and the async runtime.

pub mod kube;
