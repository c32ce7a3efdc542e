//! The kernel side: the BPF object loaded, pinned and attached (`loader`, `pins`), the pinned
//! maps the reconciler writes through (`pinned_maps`), and what the agent does to the
//! datapath beside programming it: the clock (`clock`), the conntrack sweep (`conntrack`),
//! the counters (`stats`), running frames through the programs (`test_run`), reading the
//! node's interfaces and addresses (`node`) and moving the node's connected UDP sockets off
//! removed backends (`host_sockets`). Every raw system call is in `sys`.

pub mod clock;
pub mod conntrack;
pub mod error;
pub mod host_sockets;
pub mod loader;
pub mod node;
pub mod pinned_maps;
pub mod pins;
pub mod stats;
pub mod sys;
pub mod test_run;

pub use error::{Error, Result};
pub use loader::{Attached, Datapath, ExtAttach, MapSizes};
pub use pinned_maps::{read_capacity, PinnedMaps};
