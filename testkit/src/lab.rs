//! A one-node lab in network namespaces, shaped like a kind node:
//!
//! ```text
//!  ext (outside client)            node (lb-agent, XDP)                 pod1..podN
//!  eth0 198.18.0.1/24 ──veth── ext0 198.18.0.2/24
//!                                  vethK 10.244.0.1/32 ──veth── eth0 10.244.0.(10+K)/32
//! ```
//!
//! Pods route everything through the node (default via 10.244.0.1, as a CNI's point-to-point
//! setup does); the node routes each pod address to its veth. Every namespace, process,
//! cgroup and pin belongs to one `Lab` and is removed when it is dropped, also when a test
//! fails.
//!
//! `Lab::add_ipv6` makes it dual-stack (the same shape in IPv6: `NODE_IP6`, `CLIENT_IP6`,
//! `POD_GATEWAY6`, `LabPod::ip6`, and a default route of the node through the client, as a
//! node's default gateway); `Lab::add_host_cgroup` gives the node's host processes a cgroup
//! v2 folder, which the agent gets as `--cgroup`, and `Lab::host_socket` makes sockets
//! there.
//!
//! The pods keep TX checksum offload on, as pods do (their TCP and UDP leave with partial
//! checksums); the node's `ext0` and the client's `eth0` have it off, so that what leaves
//! towards the client carries a checksum computed from what the datapath wrote, as on a
//! wire, and the client's stack checks it.

use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::{
    add_netns, add_pod, agent_cli, agent_healthy, checksum_offload_off, remove_manifest,
    router_sysctls, spawn_agent, write_manifest, AgentFlags, PodLink,
};
pub use crate::netns::{bin_dir, binary, curl, enter_netns, in_netns, run, wait_for};

pub const NODE_NAME: &str = "lab-node";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The IPv6 twins of the addresses above (`Lab::add_ipv6`).
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 2);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
pub const HTTP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 5353;

/// How `Lab::start_agent_incluster_with` points the agent at the API server.
#[derive(Clone, Copy, Debug)]
pub struct InCluster<'a> {
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT` (None: unset).
    pub service_env: Option<(&'a str, u16)>,
    /// `--api-server` (None: not given).
    pub api_server: Option<&'a str>,
    /// The service account's `ca.crt` (PEM) and `token`.
    pub ca_pem: &'a str,
    pub token: &'a str,
}

#[derive(Clone, Debug)]
pub struct LabPod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub host_iface: String,
}

impl LabPod {
    /// The pod's IPv6 address once the lab is dual-stack (`Lab::add_ipv6`): fd00:10:244::N
    /// for 10.244.0.N.
    pub fn ip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            0x10,
            0x244,
            0,
            0,
            0,
            0,
            u16::from(self.ip.octets()[3]),
        )
    }
}

pub struct Lab {
    pub tag: String,
    pub node_ns: String,
    pub ext_ns: String,
    pub pods: Vec<LabPod>,
    /// Work folder: manifests/ and the logs.
    pub dir: PathBuf,
    /// bpffs folder the lab's agent pins under.
    pub pin: PathBuf,
    /// `--ext-attach` for the next agent start (default: the agent's).
    pub ext_attach: Option<&'static str>,
    /// The next agent sweeps conntrack every second with a 2 s grace (tests), or at its
    /// defaults (benchmarks).
    pub fast_sweep: bool,
    /// The node's host processes' cgroup v2 folder (`add_host_cgroup`), the agent's
    /// `--cgroup`.
    pub host_cgroup: Option<PathBuf>,
    /// Pods get IPv6 addresses too (`add_ipv6`).
    ipv6: bool,
    servers: Vec<Child>,
    agent: Option<Child>,
    agent_runs: u32,
}

impl Lab {
    /// Creates the namespaces and links for a node with `pods` pods.
    pub fn up(pods: usize) -> Result<Lab> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tag = format!("lb{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("lb-lab-{tag}"));
        let mut lab = Lab {
            node_ns: format!("{tag}-node"),
            ext_ns: format!("{tag}-ext"),
            pods: (1..=pods)
                .map(|i| LabPod {
                    name: format!("pod{i}"),
                    ns: format!("{tag}-pod{i}"),
                    ip: Ipv4Addr::new(10, 244, 0, 10 + i as u8),
                    host_iface: format!("veth{i}"),
                })
                .collect(),
            pin: PathBuf::from(format!("/sys/fs/bpf/lb-lab-{tag}")),
            dir,
            tag,
            ext_attach: None,
            fast_sweep: true,
            host_cgroup: None,
            ipv6: false,
            servers: Vec::new(),
            agent: None,
            agent_runs: 0,
        };
        // From here on, Drop cleans up whatever part exists.
        lab.build().context("building the lab")?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        fs::create_dir_all(self.dir.join("manifests"))?;
        let node = self.node_ns.clone();
        let ext = self.ext_ns.clone();
        for ns in [&node, &ext] {
            add_netns(ns)?;
        }
        run(&[
            "ip", "-n", &node, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0",
            "netns", &ext,
        ])?;
        run(&[
            "ip",
            "-n",
            &node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            "ext0",
        ])?;
        run(&[
            "ip",
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", &node, "link", "set", "ext0", "up"])?;
        run(&["ip", "-n", &ext, "link", "set", "eth0", "up"])?;
        checksum_offload_off(&ext, "eth0")?;
        checksum_offload_off(&node, "ext0")?;
        router_sysctls(&node)?;
        for i in 0..self.pods.len() {
            self.add_pod_links(i)?;
        }
        Ok(())
    }

    fn add_pod_links(&self, i: usize) -> Result<()> {
        let p = &self.pods[i];
        add_netns(&p.ns)?;
        add_pod(&PodLink {
            node_ns: &self.node_ns,
            pod_ns: &p.ns,
            host_iface: &p.host_iface,
            ip: p.ip,
            gateway: POD_GATEWAY,
        })?;
        if self.ipv6 {
            self.add_pod_ipv6(i)?;
        }
        Ok(())
    }

    /// Makes the lab dual-stack: IPv6 on in every namespace (`disable_ipv6=0`, and no
    /// duplicate address detection, so that addresses work at once), `NODE_IP6/64` on the
    /// node's `ext0` and `CLIENT_IP6/64` on the client's `eth0`, the node's default route
    /// through the client (a node's default gateway: what a host socket sends to an address
    /// no route names leaves there), and each pod `LabPod::ip6` as for IPv4 (a /128 on its
    /// `eth0`, `POD_GATEWAY6` on the node's side of every veth, a default route through it,
    /// a /128 route to the pod on the node). Pods added later get theirs too.
    pub fn add_ipv6(&mut self) -> Result<()> {
        let (node, ext) = (self.node_ns.clone(), self.ext_ns.clone());
        ipv6_sysctls(&node, &["ext0", "lo"])?;
        ipv6_sysctls(&ext, &["eth0", "lo"])?;
        run(&[
            "ip",
            "netns",
            "exec",
            &node,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        let (node_addr, client_addr) = (format!("{NODE_IP6}/64"), format!("{CLIENT_IP6}/64"));
        let gw = CLIENT_IP6.to_string();
        for (ns, args) in [
            (
                &node,
                &["addr", "add", &node_addr, "dev", "ext0", "nodad"][..],
            ),
            (&ext, &["addr", "add", &client_addr, "dev", "eth0", "nodad"]),
            (
                &node,
                &["route", "add", "default", "via", &gw, "dev", "ext0"],
            ),
        ] {
            let mut cmd = vec!["ip", "-6", "-n", ns];
            cmd.extend_from_slice(args);
            run(&cmd)?;
        }
        self.ipv6 = true;
        for i in 0..self.pods.len() {
            self.add_pod_ipv6(i)?;
        }
        Ok(())
    }

    fn add_pod_ipv6(&self, i: usize) -> Result<()> {
        let p = &self.pods[i];
        ipv6_sysctls(&p.ns, &["eth0", "lo"])?;
        ipv6_sysctls(&self.node_ns, &[&p.host_iface])?;
        let (ip128, gw128, gw) = (
            format!("{}/128", p.ip6()),
            format!("{POD_GATEWAY6}/128"),
            POD_GATEWAY6.to_string(),
        );
        let (node, pod, iface) = (&self.node_ns, &p.ns, &p.host_iface);
        for (ns, args) in [
            (node, &["addr", "add", &gw128, "dev", iface, "nodad"][..]),
            (node, &["route", "add", &ip128, "dev", iface]),
            (pod, &["addr", "add", &ip128, "dev", "eth0", "nodad"]),
            (pod, &["route", "add", &gw128, "dev", "eth0"]),
            (pod, &["route", "add", "default", "via", &gw, "dev", "eth0"]),
        ] {
            let mut cmd = vec!["ip", "-6", "-n", ns];
            cmd.extend_from_slice(args);
            run(&cmd)?;
        }
        Ok(())
    }

    /// Creates a cgroup v2 folder for the node's host processes, which the next agent start
    /// gets as `--cgroup` (the agent itself stays outside it). Removed with the lab.
    pub fn add_host_cgroup(&mut self) -> Result<PathBuf> {
        let root = crate::cluster::cgroup2_mount()?
            .context("no cgroup2 hierarchy mounted (see /proc/mounts)")?;
        let cg = root.join(format!("lb-lab-{}", self.tag));
        fs::create_dir(&cg).with_context(|| format!("creating {}", cg.display()))?;
        self.host_cgroup = Some(cg.clone());
        Ok(cg)
    }

    /// Runs `f` as one of the node's host processes would: on a thread in the node's network
    /// namespace, with this process in the lab's host cgroup (`add_host_cgroup`) meanwhile.
    /// A socket belongs to the cgroup it was made in, so the sockets `f` makes are under the
    /// agent's socket hooks for as long as they live; the process goes back to its own
    /// cgroup afterwards (no child may be started meanwhile: it would stay in the cgroup).
    pub fn host_socket<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let cg = self
            .host_cgroup
            .clone()
            .ok_or_else(|| std::io::Error::other("the lab has no host cgroup (add_host_cgroup)"))?;
        let _moved = InCgroup::enter(&cg)?;
        in_netns(&self.node_ns, f)
    }

    /// Adds one more pod (namespace, veth, routes) and starts its server.
    pub fn add_pod(&mut self) -> Result<()> {
        let i = self.pods.len() + 1;
        self.pods.push(LabPod {
            name: format!("pod{i}"),
            ns: format!("{}-pod{i}", self.tag),
            ip: Ipv4Addr::new(10, 244, 0, 10 + i as u8),
            host_iface: format!("veth{i}"),
        });
        self.add_pod_links(i - 1)?;
        self.start_server(i - 1)
    }

    pub fn pod(&self, name: &str) -> &LabPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// Starts `lab-server` in every pod (HTTP on 8080, UDP echo on 5353).
    pub fn start_servers(&mut self) -> Result<()> {
        for i in 0..self.pods.len() {
            self.start_server(i)?;
        }
        Ok(())
    }

    fn start_server(&mut self, i: usize) -> Result<()> {
        let bin = binary("lab-server")?;
        {
            let p = &self.pods[i];
            let log = fs::File::create(self.dir.join(format!("{}.log", p.name)))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &p.ns])
                .arg(&bin)
                .args([&p.name, &HTTP_PORT.to_string(), &UDP_PORT.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting lab-server")?;
            self.servers.push(child);
        }
        // Wait until the server answers on its own address.
        {
            let p = &self.pods[i];
            let url = format!("http://{}:{HTTP_PORT}/", p.ip);
            wait_for(Duration::from_secs(5), || {
                Ok(self.curl(&self.node_ns, &url).is_ok())
            })
            .with_context(|| format!("{} does not answer", p.name))?;
        }
        Ok(())
    }

    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        write_manifest(&self.dir.join("manifests"), name, text)
    }

    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        remove_manifest(&self.dir.join("manifests"), name)
    }

    /// Starts `lb-agent run --manifests` (the lab's manifests folder) in the node namespace.
    pub fn start_agent(&mut self) -> Result<()> {
        let dir = self.dir.join("manifests");
        self.start_agent_with(&["--manifests".as_ref(), dir.as_os_str()])
    }

    /// Starts `lb-agent run --manifests` with more flags (e.g. `--healthz-timeout 3`).
    pub fn start_agent_args(&mut self, flags: &[&str]) -> Result<()> {
        let dir = self.dir.join("manifests");
        let mut args = vec!["--manifests".as_ref(), dir.as_os_str()];
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        self.start_agent_with(&args)
    }

    /// Starts `lb-agent run --kubeconfig FILE` in the node namespace.
    pub fn start_agent_kube(&mut self, kubeconfig: &str) -> Result<()> {
        self.start_agent_kube_args(kubeconfig, &[])
    }

    /// Starts `lb-agent run --kubeconfig FILE` with more flags.
    pub fn start_agent_kube_args(&mut self, kubeconfig: &str, flags: &[&str]) -> Result<()> {
        let path = self.dir.join("kubeconfig");
        fs::write(&path, kubeconfig)?;
        let mut args = vec!["--kubeconfig".as_ref(), path.as_os_str()];
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        self.start_agent_with(&args)
    }

    /// Starts `lb-agent run` with no source flag, so with in-cluster configuration, as in a
    /// pod: `KUBERNETES_SERVICE_HOST`/`PORT` (127.0.0.1 and `port`) and a service-account
    /// folder (token, ca.crt, namespace) mounted at the standard place in a mount namespace of
    /// its own.
    pub fn start_agent_incluster(&mut self, port: u16, ca_pem: &str, token: &str) -> Result<()> {
        self.start_agent_incluster_with(&InCluster {
            service_env: Some(("127.0.0.1", port)),
            api_server: None,
            ca_pem,
            token,
        })
    }

    /// Starts `lb-agent run` with in-cluster configuration as `how` says: the service account
    /// mounted as in `start_agent_incluster`, `KUBERNETES_SERVICE_HOST`/`PORT` set or unset,
    /// `--api-server` given or not.
    pub fn start_agent_incluster_with(&mut self, how: &InCluster<'_>) -> Result<()> {
        let sa = self.dir.join("serviceaccount");
        fs::create_dir_all(&sa)?;
        fs::write(sa.join("token"), how.token)?;
        fs::write(sa.join("ca.crt"), how.ca_pem)?;
        fs::write(sa.join("namespace"), "lb-system")?;
        let script = format!(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/secrets/kubernetes.io/serviceaccount \
             && cp {sa}/* /run/secrets/kubernetes.io/serviceaccount/ && exec \"$@\"",
            sa = sa.display(),
        );
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node_ns)).args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ]);
        match how.service_env {
            Some((host, port)) => cmd
                .env("KUBERNETES_SERVICE_HOST", host)
                .env("KUBERNETES_SERVICE_PORT", port.to_string()),
            None => cmd
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env_remove("KUBERNETES_SERVICE_PORT"),
        };
        match how.api_server {
            Some(a) => self.spawn_agent(cmd, &["--api-server".as_ref(), a.as_ref()]),
            None => self.spawn_agent(cmd, &[]),
        }
    }

    /// Starts `lb-agent run` with the lab's node flags and `source` in the node namespace.
    /// `nsenter --net` (not `ip netns exec`) keeps the host's /sys, so the bpffs under
    /// /sys/fs/bpf stays visible.
    fn start_agent_with(&mut self, source: &[&std::ffi::OsStr]) -> Result<()> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node_ns));
        self.spawn_agent(cmd, source)
    }

    /// Appends `lb-agent run SOURCE <the lab's node flags>` to `cmd` (a wrapper that ends by
    /// exec'ing its arguments) and starts it, logging to the run's log file.
    fn spawn_agent(&mut self, cmd: Command, source: &[&std::ffi::OsStr]) -> Result<()> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        self.agent_runs += 1;
        let flags = AgentFlags {
            node_name: NODE_NAME,
            ext_iface: "ext0",
            pin: &self.pin,
            cgroup: self.host_cgroup.as_deref(),
            ext_attach: self.ext_attach,
            fast_sweep: self.fast_sweep,
        };
        let log = self.dir.join(format!("agent-{}.log", self.agent_runs));
        self.agent = Some(spawn_agent(cmd, source, &flags, &log)?);
        Ok(())
    }

    /// Waits for the agent's /healthz to answer 200 (the datapath is programmed).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let r = wait_for(timeout, || {
            if let Some(a) = self.agent.as_mut() {
                if let Some(status) = a.try_wait()? {
                    bail!("lb-agent exited ({status})");
                }
            }
            Ok(agent_healthy(&self.node_ns))
        });
        r.with_context(|| format!("agent not healthy; log:\n{}", self.agent_log()))
    }

    /// The running agent's process id (`nsenter` execs it, so it is the child's).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// The current (or last) agent run's log.
    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("agent-{}.log", self.agent_runs)))
            .unwrap_or_default()
    }

    /// Kills the agent with SIGKILL (no chance to clean anything up).
    pub fn kill_agent(&mut self) -> Result<()> {
        if let Some(mut a) = self.agent.take() {
            a.kill()?;
            a.wait()?;
        }
        Ok(())
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) -> Result<()> {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while a.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    a.kill()?;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// `lb-agent services -o json` against the lab's pins.
    pub fn services_json(&self) -> Result<serde_json::Value> {
        let bin = binary("lb-agent")?;
        let out = run(&[
            bin.to_str().unwrap_or_default(),
            "services",
            "-o",
            "json",
            "--pin-path",
            self.pin.to_str().unwrap_or_default(),
        ])?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn services_table(&self) -> Result<String> {
        let bin = binary("lb-agent")?;
        run(&[
            bin.to_str().unwrap_or_default(),
            "services",
            "--stats",
            "--pin-path",
            self.pin.to_str().unwrap_or_default(),
        ])
    }

    /// `lb-agent ARGS... --pin-path <the lab's>` in the node namespace; returns stdout.
    pub fn agent_cli(&self, args: &[&str]) -> Result<String> {
        agent_cli(&self.node_ns, &self.pin, args)
    }

    /// Starts `lb-agent ARGS... --pin-path <the lab's>` in the node namespace, stdout piped.
    pub fn spawn_agent_cli(&self, args: &[&str]) -> Result<Child> {
        Ok(Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_ns))
            .arg(binary("lb-agent")?)
            .args(args)
            .arg("--pin-path")
            .arg(&self.pin)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?)
    }

    /// One HTTP request with a new connection; returns the body.
    pub fn curl(&self, ns: &str, url: &str) -> Result<String> {
        curl(ns, url)
    }

    /// `count` HTTP requests, each on a new connection and in its own curl process; returns
    /// each body, or `Err` for a request that failed.
    pub fn curl_many(&self, ns: &str, url: &str, count: usize) -> Result<Vec<Result<String, ()>>> {
        let script = format!(
            "for i in $(seq {count}); do curl -s --max-time 2 -H 'Connection: close' {url} || echo FAILED; done"
        );
        let out = run(&["ip", "netns", "exec", ns, "sh", "-c", &script])?;
        Ok(out
            .lines()
            .map(|l| {
                if l == "FAILED" {
                    Err(())
                } else {
                    Ok(l.to_string())
                }
            })
            .collect())
    }

    /// One UDP exchange from namespace `ns`: sends `msg`, returns the reply. A refused port
    /// (ICMP port-unreachable) comes back as `ErrorKind::ConnectionRefused`.
    pub fn udp(&self, ns: &str, to: SocketAddr, msg: &[u8]) -> std::io::Result<String> {
        let msg = msg.to_vec();
        in_netns(ns, move || {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.connect(to)?;
            sock.set_read_timeout(Some(Duration::from_secs(1)))?;
            sock.send(&msg)?;
            let mut buf = [0u8; 512];
            let n = sock.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
    }
}

/// IPv6 on in namespace `ns` (`disable_ipv6=0`) without duplicate address detection
/// (`accept_dad=0`), for every interface and for `ifaces` (which exist already).
fn ipv6_sysctls(ns: &str, ifaces: &[&str]) -> Result<()> {
    for scope in ["all", "default"].iter().chain(ifaces) {
        for (k, v) in [("disable_ipv6", "0"), ("accept_dad", "0")] {
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{scope}.{k}={v}"),
            ])?;
        }
    }
    Ok(())
}

/// This process in a cgroup v2 folder until dropped, then back in the one it came from.
/// One at a time: the process has one cgroup.
struct InCgroup {
    home: PathBuf,
    _one: std::sync::MutexGuard<'static, ()>,
}

impl InCgroup {
    fn enter(cg: &Path) -> std::io::Result<InCgroup> {
        static ONE: Mutex<()> = Mutex::new(());
        let one = ONE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // cgroup v2: the "0::PATH" line.
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| std::io::Error::other("this process is in no cgroup v2"))?;
        let root = crate::cluster::cgroup2_mount()
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("no cgroup2 hierarchy mounted"))?;
        let home = root.join(path.trim_start_matches('/'));
        fs::write(cg.join("cgroup.procs"), std::process::id().to_string())?;
        Ok(InCgroup { home, _one: one })
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
    }
}

/// A long-lived client in one namespace: a keep-alive HTTP connection and a connected UDP
/// socket, used across changes to see that their flows survive.
pub struct Persistent {
    tcp: std::io::BufReader<std::net::TcpStream>,
    udp: UdpSocket,
}

impl Persistent {
    /// Opens both to `to_tcp` and `to_udp` from namespace `ns` (sockets keep the namespace
    /// they were made in, whatever thread uses them later).
    pub fn open(ns: &str, to_tcp: SocketAddr, to_udp: SocketAddr) -> std::io::Result<Persistent> {
        in_netns(ns, move || {
            let tcp = std::net::TcpStream::connect_timeout(&to_tcp, Duration::from_secs(2))?;
            tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
            let any: SocketAddr = if to_udp.is_ipv6() {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let udp = UdpSocket::bind(any)?;
            udp.connect(to_udp)?;
            udp.set_read_timeout(Some(Duration::from_secs(1)))?;
            Ok(Persistent {
                tcp: std::io::BufReader::new(tcp),
                udp,
            })
        })
    }

    /// One request on the open connection; returns the answering pod's name.
    pub fn http(&mut self) -> std::io::Result<String> {
        use std::io::{BufRead, Read, Write};
        self.tcp
            .get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if self.tcp.read_line(&mut line)? == 0 {
                return Err(std::io::Error::other("connection closed"));
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.tcp.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string())
    }

    /// One datagram on the open socket; returns the answering pod's name.
    pub fn udp(&self) -> std::io::Result<String> {
        self.udp.send(b"q")?;
        let mut buf = [0u8; 512];
        let n = self.udp.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string())
    }
}

/// Requests in a loop on a thread, each a new connection, until `finish`.
pub struct Background {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Background {
    /// Starts requesting `url` from namespace `ns`; a reply counts as answered when it comes
    /// from a lab pod.
    pub fn requests(ns: &str, url: &str) -> Background {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, url, flag) = (ns.to_string(), url.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                match curl(&ns, &url) {
                    Ok(b) if b.starts_with("pod") => ok += 1,
                    Ok(b) => failed.push(b),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        });
        Background { stop, thread }
    }

    /// Stops and returns (answered, failures).
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| (0, vec!["the request thread panicked".into()]))
    }
}

/// EndpointSlice `endpoints:` entries for `ips` on `node`, ready.
pub fn endpoint_list(ips: &[Ipv4Addr], node: &str) -> String {
    if ips.is_empty() {
        return " []\n".to_string();
    }
    let eps: String = ips
        .iter()
        .map(|ip| {
            format!("- {{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: true}}}}\n")
        })
        .collect();
    format!("\n{eps}")
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        // Unpinning the links detaches the program; deleting the namespaces removes the rest.
        let _ = fs::remove_dir_all(&self.pin);
        if let Some(cg) = &self.host_cgroup {
            // No process is left in it (the sockets made there do not keep it).
            let _ = wait_for(Duration::from_secs(2), || Ok(fs::remove_dir(cg).is_ok()));
        }
        for p in &self.pods {
            let _ = run(&["ip", "netns", "del", &p.ns]);
        }
        let _ = run(&["ip", "netns", "del", &self.ext_ns]);
        let _ = run(&["ip", "netns", "del", &self.node_ns]);
        if std::env::var_os("LB_KEEP_LAB_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Manifests like a Kubernetes tutorial's, for this lab's pods:
/// * `web`: NodePort 30080 → every pod's named port `http` (8080), endpoints from the Pods;
/// * `echo`: ClusterIP 10.96.0.53, port 53 over UDP (→ 5353, NodePort 30053) and TCP (→ 8080),
///   endpoints from an EndpointSlice;
/// * `self`: ClusterIP 10.96.0.20:80 → pod1 only (pod1 reaching itself: hairpin);
/// * `empty`: ClusterIP 10.96.0.99:80 and NodePort 30099 with no endpoints (refused).
pub fn tutorial_manifests(pods: &[LabPod]) -> Vec<(String, String)> {
    let mut files = Vec::new();
    files.push((
        "web.yaml".to_string(),
        r"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
"
        .to_string(),
    ));
    let mut pod_docs = String::new();
    for p in pods {
        pod_docs.push_str(&format!(
            r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
spec:
  nodeName: {NODE_NAME}
  containers:
  - name: server
    image: lab-server
    ports:
    - {{name: http, containerPort: {HTTP_PORT}}}
    - {{name: echo, containerPort: {UDP_PORT}, protocol: UDP}}
status:
  phase: Running
  podIP: {ip}
  conditions: [{{type: Ready, status: "True"}}]
"#,
            name = p.name,
            ip = p.ip
        ));
    }
    files.push(("pods.yaml".to_string(), pod_docs));
    files.push(("echo.yaml".to_string(), echo_manifest(pods)));
    let first = pods.first().map(|p| p.ip.to_string()).unwrap_or_default();
    files.push((
        "self.yaml".to_string(),
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: self}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: self-1, labels: {{kubernetes.io/service-name: self}}}}
addressType: IPv4
ports: [{{port: {HTTP_PORT}}}]
endpoints: [{{addresses: ["{first}"], nodeName: {NODE_NAME}}}]
"#
        ),
    ));
    files.push((
        "empty.yaml".to_string(),
        r"apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  type: NodePort
  clusterIP: 10.96.0.99
  selector: {app: nothing}
  ports:
  - {name: http, port: 80, nodePort: 30099}
  - {name: dns, port: 53, protocol: UDP}
"
        .to_string(),
    ));
    files
}

/// The `echo` Service with an EndpointSlice listing `pods`.
pub fn echo_manifest(pods: &[LabPod]) -> String {
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  type: NodePort
  clusterIP: 10.96.0.53
  ports:
  - {{name: dns, port: 53, protocol: UDP, nodePort: 30053}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-1, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports:
- {{name: dns, port: {UDP_PORT}, protocol: UDP}}
- {{name: dns-tcp, port: {HTTP_PORT}, protocol: TCP}}
endpoints:{}",
        endpoint_list(&ips, NODE_NAME)
    )
}
