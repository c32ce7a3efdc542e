//! What `lb-agent run` is told, and the checks it makes before touching anything.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Result};
use lb_control::node_ports::NodePortAddresses;

use crate::{
    datapath::{conntrack::Timeouts, ExtAttach, MapSizes},
    source::kube::ApiServerAddr,
};

/// The agent's configuration (`lb-agent run`'s flags).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    /// In-cluster configuration with the API server at this address instead of
    /// `KUBERNETES_SERVICE_HOST:PORT`.
    pub api_server: Option<ApiServerAddr>,
    pub node_name: String,
    pub ext_ifaces: Vec<String>,
    /// How external interfaces are attached (XDP or TC).
    pub ext_attach: ExtAttach,
    pub pod_iface_prefix: String,
    pub cgroup: Option<PathBuf>,
    pub pin_path: PathBuf,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    /// How long a change may wait for the datapath before /healthz and /livez say 503
    /// (`state::HEALTH_TIMEOUT` by default).
    pub healthz_timeout: Duration,
    /// Sizes of the maps when they are first created.
    pub map_sizes: MapSizes,
    /// Report one new flow in N to `lb-agent flows` (0: none).
    pub flow_sample: u32,
    /// The source address of SNATed flows; default: the first IPv4 address of the first
    /// `--ext-iface`, else the Node object's IPv4 host IP.
    pub node_ip: Option<Ipv4Addr>,
    /// The source address of SNATed IPv6 flows (`LB6_NODE_ADDR`); default: the first IPv6
    /// address, neither loopback nor link-local, of the first `--ext-iface` that has one,
    /// else the Node object's host IP of the family.
    pub node_ipv6: Option<Ipv6Addr>,
    /// Source ports for SNAT (first, last).
    pub snat_ports: (u16, u16),
    /// Entries of one Maglev table (a prime).
    pub maglev_size: u32,
    /// Conntrack garbage collection: how often, and the timeouts.
    pub ct_gc_interval: Duration,
    pub ct_timeouts: Timeouts,
    /// Which of the node's addresses serve NodePorts.
    pub nodeport_addresses: NodePortAddresses,
    /// NodePorts on 127.0.0.1 for the node's own processes (when the addresses include
    /// loopback).
    pub localhost_nodeports: bool,
}

impl RunConfig {
    /// Refuses values the datapath cannot work with, before anything is loaded.
    pub fn check(&self) -> Result<()> {
        let cfg = self;
        if let Some(api) = &cfg.api_server {
            if cfg.kubeconfig.is_some() || cfg.manifests.is_some() {
                bail!(
                    "--api-server {api}: only with in-cluster configuration (a kubeconfig names \
                     its server, --manifests reads no API server)"
                );
            }
        }
        if !lb_control::maglev::is_prime(cfg.maglev_size) {
            bail!("--maglev-table-size {}: must be a prime", cfg.maglev_size);
        }
        for (flag, n) in [
            ("--max-services", cfg.map_sizes.services),
            ("--max-backends", cfg.map_sizes.backends),
            ("--max-backend-slots", cfg.map_sizes.slots),
        ] {
            if n < 2 {
                bail!("{flag} {n}: must be at least 2");
            }
        }
        if cfg.healthz_timeout.is_zero() {
            bail!("--healthz-timeout 0: must be more than 0 s");
        }
        if cfg.snat_ports.0 == 0 || cfg.snat_ports.0 > cfg.snat_ports.1 {
            bail!(
                "--snat-ports {}-{}: must be FIRST-LAST with 0 < FIRST <= LAST",
                cfg.snat_ports.0,
                cfg.snat_ports.1
            );
        }
        Ok(())
    }
}
