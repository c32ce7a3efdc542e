//! The node agent's pure logic, tested without root, a kernel or a cluster:
//!
//! ```text
//! source ──Objects──▶ control ──Desired──▶ reconcile ──writes──▶ maps (ServiceMaps)
//! ```
//!
//! * `source`: where Services, EndpointSlices and Pods come from (the `Source` trait, the
//!   manifests folder, validation); the API server source is in `lb-userspace`.
//! * `control`: Kubernetes objects → the desired datapath state with kube-proxy's semantics
//!   (`translate`, `model`), kept per Service so a change is translated alone
//!   (`incremental`), and the Maglev tables external frontends choose by (`maglev`).
//! * `reconcile`: the desired state → the fewest map writes, in an order that never shows a
//!   packet a half-updated Service; ids and capacities.
//! * `maps`: the trait the reconciler writes through, its in-memory implementation, and the
//!   encoding of the desired state into map keys and values. The pinned maps implement it
//!   in `lb-userspace`: only the reconciler writes the service maps.
#![forbid(unsafe_code)]

pub mod control;
pub mod maps;
pub mod reconcile;
pub mod source;

pub use control::{incremental, maglev, model, node_ports, translate};
