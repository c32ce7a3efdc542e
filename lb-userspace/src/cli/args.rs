//! `lb-agent`'s command line (the contract tests and docs rely on: extend, do not rename).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use lb_control::node_ports::{InvalidNodePortAddresses, NodePortAddresses};

use crate::{
    agent::RunConfig,
    datapath::{conntrack::Timeouts, ExtAttach, MapSizes},
    source::kube::ApiServerAddr,
};

/// eBPF/XDP Kubernetes service load balancer: a kube-proxy replacement.
#[derive(Parser)]
#[command(name = "lb-agent", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Print what the datapath holds, from the pinned maps.
    Services {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        pin_path: PathBuf,
        /// Add the per-service packet counters.
        #[arg(long)]
        stats: bool,
    },
    /// Live load-balancing decisions (client → frontend → backend, new and closed).
    Flows {
        /// Only flows whose service (namespace/name:port) or frontend contains this.
        #[arg(long)]
        service: Option<String>,
        /// Per frontend, each backend's share of new flows (at the end of --duration).
        #[arg(long)]
        summary: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Stop after this many seconds (default: run until interrupted; 10 with --summary).
        #[arg(long)]
        duration: Option<f64>,
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        pin_path: PathBuf,
        /// Where the agent serves /metrics (for service names).
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_addr: SocketAddr,
    },
    /// Remove the datapath: unpin links (which detaches the programs), programs and maps.
    /// Stop the agent first, or it attaches again.
    Uninstall {
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        pin_path: PathBuf,
    },
    /// The datapath and the agent at a glance: attachments, map fill levels, last sync, source.
    /// Exits 1 when something needs attention.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        pin_path: PathBuf,
        /// Where the agent serves /healthz.
        #[arg(long, default_value = "127.0.0.1:10256")]
        healthz_addr: SocketAddr,
        /// Where the agent serves /metrics.
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_addr: SocketAddr,
    },
    /// Send one synthesized packet through the pinned datapath and explain the decision.
    Trace {
        #[arg(value_enum)]
        proto: TraceProto,
        /// Client address and port: 198.18.0.1:41000, or [2001:db8::1]:41000 for IPv6.
        src: SocketAddr,
        /// Destination address and port, of the client's family.
        dst: SocketAddr,
        /// The interface the packet arrives on (default: from outside).
        #[arg(long)]
        iface: Option<String>,
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        pin_path: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum TraceProto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Read Services, EndpointSlices and Pods from the manifests in DIR (standalone mode).
    #[arg(long, value_name = "DIR", conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Watch the API server named in this kubeconfig.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// In-cluster configuration (the service account's token and CA) with the API server at
    /// this address, HOST:PORT or https://HOST:PORT, instead of KUBERNETES_SERVICE_HOST:PORT:
    /// that is the `kubernetes` Service, which nothing serves before this agent on a cluster
    /// without kube-proxy. Empty: KUBERNETES_SERVICE_HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    api_server: Option<String>,
    /// This node's name (endpoint locality). Default: the hostname.
    #[arg(long)]
    node_name: Option<String>,
    /// External interfaces. Repeat or separate with commas.
    #[arg(long = "ext-iface", value_name = "IFACE", value_delimiter = ',')]
    ext_ifaces: Vec<String>,
    /// How to attach to the external interfaces: `auto` (XDP where the driver runs it
    /// natively, TC ingress on veths, bridges, bonds, tunnels and drivers without native
    /// XDP), `xdp` (everywhere, generic XDP where there is no native one) or `tc`.
    #[arg(long, value_name = "auto|xdp|tc", default_value = "auto")]
    ext_attach: ExtAttach,
    /// Pod interfaces to attach to: every interface whose name starts with this.
    #[arg(long, default_value = "veth")]
    pod_iface_prefix: String,
    /// cgroup v2 directory for the socket-level hooks.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// Where maps, program and links are pinned (on a bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    pin_path: PathBuf,
    /// Where /metrics, /proxyMode and /debug/frontends are served (kube-proxy's default:
    /// loopback only; 0.0.0.0:10249 to scrape from off the node).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_addr: SocketAddr,
    /// Seconds a change may wait for the datapath before /healthz and /livez answer 503
    /// (kube-proxy: 2 × its sync period, 60 s).
    #[arg(long, default_value_t = crate::agent::state::HEALTH_TIMEOUT.as_secs_f64())]
    healthz_timeout: f64,
    /// Frontends (ClusterIP, NodePort, externalIP, LoadBalancer IP, per port and protocol)
    /// the maps hold, plus one; also the per-CPU counters per frontend (32 bytes × CPUs
    /// each). Used when the maps are first created.
    #[arg(long, default_value_t = lb_common::DEFAULT_SERVICES)]
    max_services: u32,
    /// Distinct endpoints (address, port, protocol) the maps hold, plus one; also the
    /// per-CPU counters per endpoint (16 bytes × CPUs each). Used when the maps are first
    /// created.
    #[arg(long, default_value_t = lb_common::DEFAULT_BACKENDS)]
    max_backends: u32,
    /// Backend slots over all frontends (a frontend with N endpoints takes N). Used when the
    /// maps are first created.
    #[arg(long, default_value_t = lb_common::DEFAULT_BACKEND_SLOTS)]
    max_backend_slots: u32,
    /// Connection-tracking entries (used when the map is first created).
    #[arg(long, default_value_t = lb_common::DEFAULT_CONNTRACK_ENTRIES)]
    conntrack_entries: u32,
    /// Report one new flow in N to `lb-agent flows` (0: none). Events go to a bounded ring
    /// buffer; when nobody reads it, they are dropped and counted.
    #[arg(long, default_value_t = 1)]
    flow_sample: u32,
    /// Source address of flows from outside to backends on other nodes (SNAT). Default: the
    /// first IPv4 address of the first --ext-iface, else the Node object's IPv4 InternalIP.
    #[arg(long, value_name = "IP")]
    node_ip: Option<std::net::Ipv4Addr>,
    /// Source address of IPv6 flows from outside to backends on other nodes. Default: the
    /// first IPv6 address, neither loopback nor link-local, of the first --ext-iface that
    /// has one, else the Node object's IPv6 InternalIP (or ExternalIP).
    #[arg(long, value_name = "IPV6")]
    node_ipv6: Option<std::net::Ipv6Addr>,
    /// Source ports for that SNAT, FIRST-LAST. Keep them out of the node's own ephemeral
    /// range (net.ipv4.ip_local_port_range, 32768-60999 by default) and the NodePort range.
    #[arg(long, value_name = "FIRST-LAST", default_value = "61000-65535", value_parser = port_range)]
    snat_ports: (u16, u16),
    /// SNAT map entries (used when the map is first created).
    #[arg(long, default_value_t = lb_common::DEFAULT_SNAT_ENTRIES)]
    snat_entries: u32,
    /// Entries of one Maglev table: a prime well above 100 × the largest backend count of
    /// a Service (the same on every node, or flows change backend between nodes).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_SIZE)]
    maglev_table_size: u32,
    /// Maglev tables: one per Service port with NodePort / externalIPs / LoadBalancer IPs
    /// (used when the map is first created).
    #[arg(long, default_value_t = lb_common::DEFAULT_MAGLEV_TABLES)]
    maglev_tables: u32,
    /// Seconds between conntrack sweeps (closed and idle flows, SNAT ports).
    #[arg(long, default_value_t = 5.0)]
    ct_gc_interval: f64,
    /// Seconds a closed flow (FIN both ways, or RST) stays before its entries and SNAT port
    /// are freed: as long as its peers keep TIME_WAIT (60 s), so that a client reusing the
    /// port for a connection straight to the backend is told apart (netfilter keeps 120 s).
    #[arg(long, default_value_t = 60.0)]
    ct_close_grace: f64,
    /// Seconds an idle UDP flow keeps its backend.
    #[arg(long, default_value_t = 120.0)]
    ct_udp_timeout: f64,
    /// Seconds an idle TCP flow keeps its backend (kube-proxy: 86400).
    #[arg(long, default_value_t = 86400.0)]
    ct_tcp_timeout: f64,
    /// NodePorts only on the node's addresses in these CIDRs (comma-separated), or
    /// `primary` (the node's primary address of each family: --node-ip / --node-ipv6, else
    /// the first address of the family on the --ext-ifaces), as kube-proxy's flag. Each
    /// family is selected by its own CIDRs; a family none of them is of is served on every
    /// address of it, as kube-proxy does. Default: every address of the node.
    #[arg(long, value_name = "CIDRS|primary", default_value = "", value_parser = nodeport_addresses)]
    nodeport_addresses: NodePortAddresses,
    /// Also serve NodePorts on 127.0.0.1 to the node's own processes (kube-proxy's iptables
    /// mode does), when --nodeport-addresses is unset or includes 127.0.0.1.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    localhost_nodeports: bool,
}

fn nodeport_addresses(s: &str) -> Result<NodePortAddresses, String> {
    s.parse().map_err(|e: InvalidNodePortAddresses| e.reason)
}

/// `FIRST-LAST` → (first, last).
fn port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if a == 0 || a > b {
        return Err(format!("{s:?}: need 0 < FIRST <= LAST"));
    }
    Ok((a, b))
}

/// Seconds from the command line as a Duration (negative or not finite: an error).
fn seconds(name: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|e| anyhow::anyhow!("--{name} {v}: {e}"))
}

/// `--api-server`'s value (empty: none, so that a deployment can pass an empty setting).
fn api_server(value: Option<&str>) -> Result<Option<ApiServerAddr>> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--api-server {v:?}: {e}")),
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

impl RunArgs {
    /// The agent's configuration from the flags.
    pub fn into_config(self) -> Result<RunConfig> {
        let a = self;
        Ok(RunConfig {
            manifests: a.manifests,
            kubeconfig: a.kubeconfig,
            api_server: api_server(a.api_server.as_deref())?,
            node_name: a.node_name.unwrap_or_else(hostname),
            ext_ifaces: a.ext_ifaces,
            ext_attach: a.ext_attach,
            pod_iface_prefix: a.pod_iface_prefix,
            cgroup: a.cgroup,
            pin_path: a.pin_path,
            metrics_addr: a.metrics_addr,
            healthz_addr: a.healthz_addr,
            healthz_timeout: seconds("healthz-timeout", a.healthz_timeout)?,
            map_sizes: MapSizes {
                services: a.max_services,
                backends: a.max_backends,
                slots: a.max_backend_slots,
                conntrack: a.conntrack_entries,
                snat: a.snat_entries,
                maglev: a.maglev_table_size.saturating_mul(a.maglev_tables),
            },
            flow_sample: a.flow_sample,
            node_ip: a.node_ip,
            node_ipv6: a.node_ipv6,
            snat_ports: a.snat_ports,
            maglev_size: a.maglev_table_size,
            ct_gc_interval: seconds("ct-gc-interval", a.ct_gc_interval)?,
            ct_timeouts: Timeouts {
                closed: seconds("ct-close-grace", a.ct_close_grace)?,
                tcp_idle: seconds("ct-tcp-timeout", a.ct_tcp_timeout)?,
                udp_idle: seconds("ct-udp-timeout", a.ct_udp_timeout)?,
            },
            nodeport_addresses: a.nodeport_addresses,
            localhost_nodeports: a.localhost_nodeports,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    fn run_config(args: &[&str]) -> anyhow::Result<crate::agent::RunConfig> {
        let cli = Cli::try_parse_from(["lb-agent", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(a) => a.into_config(),
            _ => anyhow::bail!("not run"),
        }
    }

    #[test]
    fn node_address_flags_of_each_family() {
        let cfg = run_config(&["--node-ip", "172.18.0.2", "--node-ipv6", "fc00:f853::2"])
            .expect("accepted");
        assert_eq!(
            cfg.node_ip.map(|a| a.to_string()).as_deref(),
            Some("172.18.0.2")
        );
        assert_eq!(
            cfg.node_ipv6.map(|a| a.to_string()).as_deref(),
            Some("fc00:f853::2")
        );
        assert!(
            run_config(&["--node-ipv6", "172.18.0.2"]).is_err(),
            "IPv4 refused"
        );
        assert!(
            run_config(&["--node-ip", "fc00::2"]).is_err(),
            "IPv6 refused"
        );
    }

    #[test]
    fn api_server_flag() {
        let cfg = run_config(&["--api-server", "kind-control-plane:6443"]).expect("accepted");
        assert_eq!(
            cfg.api_server.map(|a| a.to_string()).as_deref(),
            Some("kind-control-plane:6443")
        );
        // An empty setting (the DaemonSet passes the ConfigMap's value as it is): none.
        for empty in ["--api-server=", "--api-server= "] {
            let cfg = run_config(&[empty]).expect("accepted");
            assert!(cfg.api_server.is_none(), "{empty:?}");
        }
        assert!(run_config(&[]).expect("accepted").api_server.is_none());
        // A bad value: the error names the flag, the value and the reason.
        let e = run_config(&["--api-server=kind-control-plane"])
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                r#"--api-server "kind-control-plane": no port: expected HOST:PORT (or https://HOST for port 443)"#
            )
        );
        // Only for in-cluster configuration.
        let cfg = run_config(&["--api-server=10.0.0.1:6443", "--kubeconfig=/k"]).expect("parsed");
        let e = cfg.check().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.starts_with("--api-server 10.0.0.1:6443: only with in-cluster"),
            "{e}"
        );
    }
}
