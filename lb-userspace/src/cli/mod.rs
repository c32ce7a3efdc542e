//! The operator's commands beside `run`: `services`, `status`, `flows`, `trace` and
//! `uninstall`, reading the pinned datapath and the agent's own endpoints.

pub mod args;
pub mod client;
pub mod flows;
pub mod frame;
pub mod services;
pub mod status;
pub mod trace;
pub mod uninstall;
