//! Building blocks of the network-namespace labs (`lab`: one node; `cluster`: several nodes
//! on a bridge): commands, namespaces, pod links, the agent's command line, waiting.

use std::{
    ffi::OsStr,
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

/// Runs a command; fails with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The folder with the workspace's binaries (`lb-agent`, `lab-server`, `lab-client`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LB_BIN_DIR") {
        return PathBuf::from(d);
    }
    // tests/ → workspace; the profile the tests were built with.
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| ws.join("target"), PathBuf::from);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target.join(profile)
}

pub fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build it first (`cargo build{}`)",
            p.display(),
            if cfg!(debug_assertions) {
                ""
            } else {
                " --release"
            }
        );
    }
    Ok(p)
}

/// Creates network namespace `ns` with its loopback up.
pub fn add_netns(ns: &str) -> Result<()> {
    run(&["ip", "netns", "add", ns])?;
    run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// A node namespace's sysctls: it forwards, and neither filters by reverse path nor sends
/// redirects (pods and nodes share links the way a CNI sets them up).
pub fn router_sysctls(ns: &str) -> Result<()> {
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.all.send_redirects", "0"),
        ("net.ipv4.conf.default.send_redirects", "0"),
    ] {
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{k}={v}"),
        ])?;
    }
    Ok(())
}

/// A namespace's IPv6 sysctls in a dual-stack lab: no duplicate address detection (every
/// address, link-local ones included, usable as soon as it is added: the lab numbers its
/// addresses without conflicts), and IPv6 forwarding if `forwarding` (a node). Set before
/// the namespace has interfaces, so that every one inherits them.
pub fn ipv6_sysctls(ns: &str, forwarding: bool) -> Result<()> {
    let mut settings = vec![
        ("net.ipv6.conf.all.accept_dad", "0"),
        ("net.ipv6.conf.default.accept_dad", "0"),
    ];
    if forwarding {
        settings.push(("net.ipv6.conf.all.forwarding", "1"));
    }
    for (k, v) in settings {
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{k}={v}"),
        ])?;
    }
    Ok(())
}

/// TX checksum offload off: what leaves the interface carries a full checksum, computed in
/// software from what the datapath left in the field, as a NIC computes it on the wire. On
/// a node's external interface this makes every rewrite of a pod's partial checksum checked
/// by the receiver.
pub fn checksum_offload_off(ns: &str, iface: &str) -> Result<()> {
    run(&[
        "ip", "netns", "exec", ns, "ethtool", "-K", iface, "tx", "off",
    ])?;
    Ok(())
}

/// One pod's link to its node, as a CNI's point-to-point setup makes it.
pub struct PodLink<'a> {
    pub node_ns: &'a str,
    pub pod_ns: &'a str,
    /// The veth's name on the node.
    pub host_iface: &'a str,
    pub ip: Ipv4Addr,
    /// The node's address on every pod veth, the pod's default gateway.
    pub gateway: Ipv4Addr,
}

/// Links pod namespace `pod_ns` (made by the caller) to its node with a veth: `eth0` with the
/// pod address in the pod, the gateway address on the node side, a /32 route to the pod on
/// the node, a default route through the gateway in the pod. The pod keeps TX checksum
/// offload on, as pods do: its TCP and UDP leave with partial checksums (`CHECKSUM_PARTIAL`),
/// which the datapath must update as such.
pub fn add_pod(link: &PodLink<'_>) -> Result<()> {
    let PodLink {
        node_ns: node,
        pod_ns: pod,
        host_iface: iface,
        ip,
        gateway,
    } = *link;
    let (ip32, gw32, gw) = (
        format!("{ip}/32"),
        format!("{gateway}/32"),
        gateway.to_string(),
    );
    let veth = [
        "link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", pod,
    ];
    for (ns, args) in [
        (node, &veth[..]),
        (node, &["addr", "add", &gw32, "dev", iface]),
        (node, &["link", "set", iface, "up"]),
        (node, &["route", "add", &ip32, "dev", iface]),
        (pod, &["addr", "add", &ip32, "dev", "eth0"]),
        (pod, &["link", "set", "eth0", "up"]),
        (pod, &["route", "add", &gw32, "dev", "eth0"]),
        (pod, &["route", "add", "default", "via", &gw]),
    ] {
        let mut cmd = vec!["ip", "-n", ns];
        cmd.extend_from_slice(args);
        run(&cmd)?;
    }
    Ok(())
}

/// Gives a pod linked by [`add_pod`] its IPv6 address, as a CNI's point-to-point setup in a
/// dual-stack cluster: `ip6`/128 on the pod's `eth0`, `gateway6`/128 (the node's IPv6 address
/// on every pod veth) on the node's end `host_iface`, a /128 route to the pod on the node, a
/// route to the gateway and a default route through it in the pod. No DAD: usable at once.
pub fn add_pod_ipv6(
    node_ns: &str,
    pod_ns: &str,
    host_iface: &str,
    ip6: Ipv6Addr,
    gateway6: Ipv6Addr,
) -> Result<()> {
    let (ip128, gw128, gw) = (
        format!("{ip6}/128"),
        format!("{gateway6}/128"),
        gateway6.to_string(),
    );
    for (ns, args) in [
        (
            node_ns,
            &["addr", "add", &gw128, "dev", host_iface, "nodad"][..],
        ),
        (node_ns, &["route", "add", &ip128, "dev", host_iface]),
        (pod_ns, &["addr", "add", &ip128, "dev", "eth0", "nodad"]),
        (pod_ns, &["route", "add", &gw128, "dev", "eth0"]),
        (
            pod_ns,
            &["-6", "route", "add", "default", "via", &gw, "dev", "eth0"],
        ),
    ] {
        let mut cmd = vec!["ip", "-n", ns];
        cmd.extend_from_slice(args);
        run(&cmd)?;
    }
    Ok(())
}

/// What `lb-agent run` is told about its node.
pub struct AgentFlags<'a> {
    pub node_name: &'a str,
    pub ext_iface: &'a str,
    pub pin: &'a Path,
    pub cgroup: Option<&'a Path>,
    /// `--ext-attach` (default: the agent's).
    pub ext_attach: Option<&'a str>,
    /// Sweep closed flows (and free their SNAT ports) within seconds, so that tests see it;
    /// otherwise the agent's defaults.
    pub fast_sweep: bool,
}

/// Appends `lb-agent run SOURCE <flags>` to `cmd` (a wrapper that ends by exec'ing its
/// arguments, e.g. `nsenter --net=...`) and starts it, logging to `log`. Health and metrics
/// listen on the namespace's loopback.
pub fn spawn_agent(
    mut cmd: Command,
    source: &[&OsStr],
    flags: &AgentFlags<'_>,
    log: &Path,
) -> Result<Child> {
    let bin = binary("lb-agent")?;
    let log = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.arg(&bin)
        .arg("run")
        .args(source)
        .args([
            "--node-name",
            flags.node_name,
            "--ext-iface",
            flags.ext_iface,
            "--pod-iface-prefix",
            "veth",
        ])
        .arg("--pin-path")
        .arg(flags.pin);
    if let Some(cg) = flags.cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    if let Some(mode) = flags.ext_attach {
        cmd.args(["--ext-attach", mode]);
    }
    if flags.fast_sweep {
        cmd.args(["--ct-gc-interval", "1", "--ct-close-grace", "2"]);
    }
    cmd.args([
        "--healthz-addr",
        "127.0.0.1:10256",
        "--metrics-addr",
        "127.0.0.1:10249",
    ])
    .env("RUST_LOG", "info")
    .env("NO_COLOR", "1")
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log)
    .spawn()
    .context("starting lb-agent")
}

/// Whether the agent in namespace `ns` answers 200 on /healthz (the datapath is programmed).
pub fn agent_healthy(ns: &str) -> bool {
    let url = "http://127.0.0.1:10256/healthz";
    curl_in(
        ns,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "1",
            url,
        ],
    )
    .is_ok_and(|code| code == "200")
}

/// One HTTP request from namespace `ns` with curl, on a new connection; returns the body.
pub fn curl(ns: &str, url: &str) -> Result<String> {
    curl_in(
        ns,
        &["-sS", "--max-time", "2", "-H", "Connection: close", url],
    )
}

/// `curl ARGS...` in namespace `ns`; returns stdout.
fn curl_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = vec!["ip", "netns", "exec", ns, "curl"];
    cmd.extend_from_slice(args);
    run(&cmd)
}

/// Removes file `name` from `dir`.
pub fn remove_manifest(dir: &Path, name: &str) -> Result<()> {
    fs::remove_file(dir.join(name)).with_context(|| format!("removing {name}"))
}

/// Writes file `name` into `dir` by writing and renaming, so that no agent reads half of it.
pub fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// `lb-agent ARGS... --pin-path PIN` in namespace `ns`; returns stdout.
pub fn agent_cli(ns: &str, pin: &Path, args: &[&str]) -> Result<String> {
    let bin = binary("lb-agent")?;
    let netns = format!("--net=/run/netns/{ns}");
    let pin = pin.to_string_lossy();
    let mut cmd: Vec<&str> = vec!["nsenter", &netns, bin.to_str().unwrap_or_default()];
    cmd.extend_from_slice(args);
    cmd.extend_from_slice(&["--pin-path", &pin]);
    run(&cmd)
}

/// Runs `f` on a thread that has entered network namespace `ns` (namespaces are per thread).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        f()
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("netns thread panicked")))
}

/// Moves the calling thread into network namespace `ns` (namespaces are per thread).
pub fn enter_netns(ns: &str) -> std::io::Result<()> {
    let file = fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Polls `cond` every 50 ms until it is true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `a` as a sockaddr_in or sockaddr_in6, in a sockaddr_storage, and its length.
pub fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_storage is larger than a sockaddr_in and aligned for it.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: a sockaddr_storage is larger than a sockaddr_in6 and aligned for it.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
