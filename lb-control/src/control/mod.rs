//! Kubernetes objects → the desired datapath state of one node.

pub mod hash;
pub mod incremental;
pub mod maglev;
pub mod model;
pub mod node_ports;
pub mod translate;
