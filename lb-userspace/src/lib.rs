//! The node agent: Kubernetes objects → desired datapath state → BPF maps.
//!
//! `manifests`, `validate`, `translate`, `model` and `reconcile` are pure (no I/O beyond
//! reading manifest files) and tested without root; `bpf`, `node` and `agent` touch the kernel.

pub mod agent;
pub mod bpf;
pub mod clock;
pub mod conntrack;
pub mod flows;
pub mod http;
pub mod kube_source;
pub mod maglev;
pub mod manifests;
pub mod maps;
pub mod model;
pub mod node;
pub mod packet;
pub mod reconcile;
pub mod status;
pub mod sync;
pub mod trace;
pub mod translate;
pub mod validate;
