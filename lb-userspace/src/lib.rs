//! The node agent, `lb-agent`:
//!
//! ```text
//! source ─▶ control (translate, incremental) ─▶ reconcile ─▶ datapath (pinned BPF maps)
//! ```
//!
//! The pure steps (sources' objects, translation, reconciliation against a map trait) are in
//! the `lb-control` crate; this crate adds what touches the kernel and the network:
//!
//! * `source`: the API server as a source (the manifests source is `lb_control`'s).
//! * `datapath`: the BPF object loaded, pinned and attached; the pinned maps the reconciler
//!   writes; the clock, the conntrack sweep, counters, the node's interfaces. All raw system
//!   calls are in `datapath::sys`, the only module with `unsafe` code.
//! * `agent`: `lb-agent run`'s loop, its state and its HTTP endpoints (health, metrics,
//!   health check node ports).
//! * `cli`: the command line and the operator's commands (`services`, `status`, `flows`,
//!   `trace`, `uninstall`).
//!
//! `docs/architecture.md` draws the flow and says where new work goes.
#![deny(unsafe_code)]

pub mod agent;
pub mod cli;
pub mod datapath;
pub mod source;
