//! The bench's lab: the tests' one-node lab (tests/src/lab.rs) with five pods. Pods 1-4 are
//! the endpoints of every generated Service; pod 5 is the client inside the cluster; the
//! lab's outside namespace is the client from outside. pod1 also runs `iperf3 -s`, behind a
//! Service of its own (one endpoint: iperf3's control and data connections must meet the
//! same server). One datapath per lab: whatever a datapath leaves behind (pins, processes,
//! iptables and nftables rules, which live in the node namespace) goes with the lab.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_testkit::lab::{self, Lab, LabPod, NODE_IP};

use super::{
    kube_proxy::{self, Node},
    services::{self, Svc},
};

pub const IPERF_PORT: u16 = 5201;
pub const IPERF_NODE_PORT: u16 = 32000;
pub const IPERF_IP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 16);

/// The datapaths compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    /// Straight to a pod's address: no service translation (the floor).
    Pod,
    /// lb-agent as it runs by default (on the lab's veth uplink: TC).
    LbAgent,
    /// lb-agent with `--ext-attach xdp`: XDP on the veth uplink.
    LbAgentXdp,
    Iptables,
    Nftables,
}

impl Datapath {
    pub const ALL: [Datapath; 5] = [
        Datapath::Pod,
        Datapath::LbAgent,
        Datapath::LbAgentXdp,
        Datapath::Iptables,
        Datapath::Nftables,
    ];

    /// The key in results.json.
    pub fn key(self) -> &'static str {
        match self {
            Datapath::Pod => "pod",
            Datapath::LbAgent => "lb-agent",
            Datapath::LbAgentXdp => "lb-agent-xdp",
            Datapath::Iptables => "iptables",
            Datapath::Nftables => "nftables",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Datapath::Pod => "straight to pod",
            Datapath::LbAgent => "lb-agent",
            Datapath::LbAgentXdp => "lb-agent, XDP on the uplink",
            Datapath::Iptables => "kube-proxy iptables",
            Datapath::Nftables => "kube-proxy nftables",
        }
    }
}

/// The Service set a lab programs: `n` generated Services on pods 1-4, and the iperf3
/// Service created just before the last one (the last-created Service is the one the
/// HTTP traffic addresses).
pub fn service_set(n: usize, endpoints: &[Ipv4Addr]) -> Vec<Svc> {
    let mut set = services::generate(n, lab::HTTP_PORT, |_, e| endpoints[e % endpoints.len()]);
    let last = set.pop();
    set.push(Svc {
        name: "iperf".into(),
        port_name: "iperf".into(),
        cluster_ip: IPERF_IP,
        port: IPERF_PORT,
        target_port: IPERF_PORT,
        node_port: Some(IPERF_NODE_PORT),
        endpoints: endpoints[..1].to_vec(),
    });
    set.extend(last);
    set
}

/// The addresses traffic goes to through one datapath.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    /// HTTP, from the client pod (a ClusterIP, or pod1 for the floor).
    pub http_inside: SocketAddrV4,
    /// HTTP, from outside (the NodePort on the node, or pod1 for the floor).
    pub http_outside: SocketAddrV4,
    pub iperf_inside: SocketAddrV4,
    pub iperf_outside: SocketAddrV4,
}

/// lb-agent's memory after programming, from /proc/PID/status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub vm_rss_kib: u64,
    pub vm_hwm_kib: u64,
}

/// Reads VmRSS and VmHWM (kB) out of a /proc/PID/status text.
pub fn parse_status(text: &str) -> Result<Memory> {
    let field = |name: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/PID/status"))?;
        line[name.len()..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{line}: not a number of kB"))
    };
    Ok(Memory {
        vm_rss_kib: field("VmRSS:")?,
        vm_hwm_kib: field("VmHWM:")?,
    })
}

pub struct BenchLab {
    pub lab: Lab,
    iperf: Option<Child>,
}

impl BenchLab {
    /// A lab with five pods, their servers, iperf3 in pod1, and clients tuned for many
    /// short connections.
    pub fn up() -> Result<BenchLab> {
        let mut lab = Lab::up(5)?;
        lab.start_servers()?;
        let mut b = BenchLab { lab, iperf: None };
        for ns in [b.client().ns.clone(), b.lab.ext_ns.clone()] {
            for kv in [
                "net.ipv4.ip_local_port_range=1024 65000",
                "net.ipv4.tcp_tw_reuse=1",
            ] {
                lab::run(&["ip", "netns", "exec", &ns, "sysctl", "-qw", kv])?;
            }
        }
        // The floor from outside goes to a pod address: route the pods via the node.
        lab::run(&[
            "ip",
            "-n",
            &b.lab.ext_ns,
            "route",
            "add",
            "10.244.0.0/16",
            "via",
            &NODE_IP.to_string(),
        ])?;
        let server = &b.lab.pods[0].ns;
        let child = Command::new("ip")
            .args(["netns", "exec", server, "iperf3", "-s", "-p"])
            .arg(IPERF_PORT.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        b.iperf = Some(child);
        let listening = format!("ss -ltn | grep -q ':{IPERF_PORT} '");
        lab::wait_for(Duration::from_secs(5), || {
            Ok(lab::run(&["ip", "netns", "exec", server, "sh", "-c", &listening]).is_ok())
        })
        .context("iperf3 -s does not listen")?;
        Ok(b)
    }

    /// The first `n` of pods 1-4: the endpoints.
    pub fn endpoints(&self, n: usize) -> Vec<Ipv4Addr> {
        self.lab.pods[..n.clamp(1, 4)]
            .iter()
            .map(|p| p.ip)
            .collect()
    }

    /// pod5: the client inside the cluster.
    pub fn client(&self) -> &LabPod {
        &self.lab.pods[4]
    }

    pub fn node(&self) -> Node {
        Node {
            ip: NODE_IP,
            cluster_cidr: CLUSTER_CIDR,
        }
    }

    /// Where traffic goes through datapath `dp` for the Service set `set`.
    pub fn targets(&self, dp: Datapath, set: &[Svc]) -> Result<Targets> {
        let pod1 = self.lab.pods[0].ip;
        if dp == Datapath::Pod {
            let http = SocketAddrV4::new(pod1, lab::HTTP_PORT);
            let iperf = SocketAddrV4::new(pod1, IPERF_PORT);
            return Ok(Targets {
                http_inside: http,
                http_outside: http,
                iperf_inside: iperf,
                iperf_outside: iperf,
            });
        }
        let last = set.last().context("no Services")?;
        let np = last.node_port.context("the last Service has no NodePort")?;
        Ok(Targets {
            http_inside: SocketAddrV4::new(last.cluster_ip, last.port),
            http_outside: SocketAddrV4::new(NODE_IP, np),
            iperf_inside: SocketAddrV4::new(IPERF_IP, IPERF_PORT),
            iperf_outside: SocketAddrV4::new(NODE_IP, IPERF_NODE_PORT),
        })
    }

    /// Writes `text` to the lab's folder and runs `cmd` with it as standard input in the
    /// node namespace; returns how long `cmd` took, or `None` when it did not finish within
    /// `timeout` (it is killed then).
    fn load(
        &self,
        file: &str,
        text: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<Option<Duration>> {
        let path = self.lab.dir.join(file);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let err = self.lab.dir.join(format!("{file}.err"));
        let started = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.lab.node_ns])
            .args(cmd)
            .stdin(fs::File::open(&path)?)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("running {}", cmd[0]))?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = started.elapsed();
        if !status.success() {
            bail!(
                "`{}` < {} failed ({status}): {}",
                cmd.join(" "),
                path.display(),
                fs::read_to_string(&err).unwrap_or_default().trim()
            );
        }
        Ok(Some(took))
    }

    /// kube-proxy's iptables mode: one full sync as kube-proxy runs it,
    /// `iptables-restore --noflush` (timed; given up after `timeout`), then the jumps from the
    /// base chains. When the sync does not finish in time, the same rules are loaded with a
    /// plain `iptables-restore` (which replaces the tables whole) so that traffic can still
    /// be measured; that time is returned second.
    pub fn load_iptables(
        &self,
        set: &[Svc],
        timeout: Duration,
    ) -> Result<(Option<Duration>, Option<Duration>)> {
        let rules = kube_proxy::iptables_rules(set, &self.node());
        let noflush = ["iptables-restore", "--noflush"];
        let synced = self.load("iptables-rules", &rules, &noflush, timeout)?;
        let mut plain = None;
        if synced.is_none() {
            plain = self.load(
                "iptables-rules",
                &rules,
                &["iptables-restore"],
                Duration::from_mins(10),
            )?;
            plain.context("plain iptables-restore did not finish in 10 minutes")?;
        }
        self.load(
            "iptables-jumps",
            &kube_proxy::iptables_jumps(),
            &noflush,
            Duration::from_mins(1),
        )?
        .context("loading the jumps did not finish in a minute")?;
        Ok((synced, plain))
    }

    /// kube-proxy's nftables mode: one full sync with `nft -f` (timed).
    pub fn load_nft(&self, set: &[Svc], timeout: Duration) -> Result<Duration> {
        self.load(
            "nft-rules",
            &kube_proxy::nft_rules(set, &self.node()),
            &["nft", "-f", "-"],
            timeout,
        )?
        .with_context(|| format!("nft -f did not finish within {timeout:?}"))
    }

    /// lb-agent with the Services as manifests and `--ext-attach ext_attach` (None: the
    /// default); returns the time from start to healthy (programmed) and its memory then.
    pub fn start_agent(
        &mut self,
        set: &[Svc],
        ext_attach: Option<&'static str>,
    ) -> Result<(Duration, Memory)> {
        self.lab
            .write_manifest("services.yaml", &services::manifest(set)?)?;
        self.lab.ext_attach = ext_attach;
        // The agent's own conntrack sweep (every 5 s, 10 s grace), as on a node.
        self.lab.fast_sweep = false;
        let started = Instant::now();
        self.lab.start_agent()?;
        self.lab.wait_healthy(Duration::from_mins(2))?;
        let ready = started.elapsed();
        let pid = self.lab.agent_pid().context("lb-agent is not running")?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        Ok((ready, parse_status(&status)?))
    }

    /// One HTTP request from namespace `ns` to `to`; the answering pod's name.
    pub fn ask(&self, ns: &str, to: SocketAddrV4) -> Result<String> {
        let body = lab::curl(ns, &format!("http://{to}/"))?;
        let pod = body.split_whitespace().next().unwrap_or("").to_string();
        if !pod.starts_with("pod") {
            bail!("{to} answered {body:?}, not a lab pod");
        }
        Ok(pod)
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.iperf.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The lab (dropped next) stops the agent and servers, removes the pins and deletes
        // the namespaces with every rule in them.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status() {
        let text =
            "Name:\tlb-agent\nVmPeak:\t  900000 kB\nVmHWM:\t   53124 kB\nVmRSS:\t   41000 kB\n";
        let m = parse_status(text).expect("parse");
        assert_eq!((m.vm_rss_kib, m.vm_hwm_kib), (41000, 53124));
        assert!(parse_status("Name:\tx\n").is_err());
        assert!(parse_status("VmRSS:\tlots kB\nVmHWM:\t1 kB\n").is_err());
    }

    #[test]
    fn set_shape() {
        let eps = [
            Ipv4Addr::new(10, 244, 0, 11),
            Ipv4Addr::new(10, 244, 0, 12),
            Ipv4Addr::new(10, 244, 0, 13),
            Ipv4Addr::new(10, 244, 0, 14),
        ];
        let set = service_set(3, &eps);
        let names: Vec<&str> = set.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["svc-0", "svc-1", "iperf", "svc-2"]);
        assert_eq!(set[2].endpoints, [eps[0]]);
        assert_eq!(set[3].endpoints, eps);
        assert_eq!(set[3].node_port, Some(30000));
        let one = service_set(1, &eps);
        assert_eq!(one.len(), 2);
        assert_eq!(one[1].name, "svc-0");
    }
}
