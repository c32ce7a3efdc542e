//! The rulesets kube-proxy writes for the generated Services, in its iptables mode (for
//! `iptables-restore`) and its nftables mode (for `nft -f`), written from the description of
//! kube-proxy's rules in shared/reference/kube-proxy-and-cilium.md, so that both can be
//! measured on the same lab as lb-agent.
//!
//! What is modelled: ClusterIP and NodePort (externalTrafficPolicy Cluster), random endpoint
//! choice, hairpin masquerade per endpoint, masquerade of off-cluster traffic to ClusterIPs
//! (`--cluster-cidr`), masquerade of NodePort traffic, the mark/masquerade chains and the
//! jumps from the base chains; iptables: the filter table's forward rules; nftables: the
//! no-endpoint checks (empty here, every Service has endpoints). Not modelled (nothing in
//! the generated Services uses them): session affinity, Local traffic policies, LoadBalancer
//! source ranges, externalIPs and nftables' ServiceCIDR checks.

use std::{fmt::Write as _, net::Ipv4Addr};

use data_encoding::BASE32;
use ring::digest::{digest, SHA256};

use super::services::{Svc, NAMESPACE};

/// kube-proxy's masquerade mark (bit 14).
const MASQ_MARK: &str = "0x4000";

/// Where the node and its pods are: what the rules need beyond the Services.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    /// The node's primary address (nftables mode accepts NodePorts on it only).
    pub ip: Ipv4Addr,
    /// `--cluster-cidr`: traffic to a ClusterIP from outside it is masqueraded.
    pub cluster_cidr: (Ipv4Addr, u8),
}

/// base32 (RFC 4648, padded alphabet) of the SHA-256 of `s`, first `len` characters.
fn hash(s: &str, len: usize) -> String {
    let h = digest(&SHA256, s.as_bytes());
    BASE32.encode(h.as_ref())[..len].to_string()
}

/// `KUBE-SVC-<16>`: the hash of the service port name (`ns/name:port`) and the protocol.
pub fn svc_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-SVC-{}", hash(&format!("{port_name}{proto}"), 16))
}

/// `KUBE-EXT-<16>`: the external (NodePort) entry of the same service port.
pub fn ext_chain(port_name: &str, proto: &str) -> String {
    format!("KUBE-EXT-{}", hash(&format!("{port_name}{proto}"), 16))
}

/// `KUBE-SEP-<16>`: the hash of the service port name, the protocol and `ip:port`.
pub fn sep_chain(port_name: &str, proto: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        hash(&format!("{port_name}{proto}{endpoint}"), 16)
    )
}

/// nftables' chain base: `<8 hash chars>-<name>`, cut to 112 characters.
pub fn nft_base(name: &str) -> String {
    let mut s = format!("{}-{name}", hash(name, 8));
    if s.len() > 112 {
        s.truncate(109);
        s.push_str("...");
    }
    s
}

/// `ns/name/proto/port-name`, the name nftables mode gives a service port.
fn nft_port_name(s: &Svc) -> String {
    format!("{NAMESPACE}/{}/tcp/{}", s.name, s.port_name)
}

/// kube-proxy's probability text: `1/n` with ten decimals.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The jumps from the base chains into kube-proxy's chains, which kube-proxy makes apart
/// from its syncs; load with `iptables-restore --noflush` after the rules (which declare the
/// chains they jump to).
pub fn iptables_jumps() -> String {
    let mut t = String::new();
    t.push_str("*filter\n");
    let portals = "-m comment --comment \"kubernetes service portals\"";
    let ext = "-m comment --comment \"kubernetes externally-visible service portals\"";
    let fw = "-m comment --comment \"kubernetes load balancer firewall\"";
    for line in [
        format!("-A INPUT -m conntrack --ctstate NEW {fw} -j KUBE-PROXY-FIREWALL"),
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS"
            .into(),
        format!("-A INPUT -m conntrack --ctstate NEW {ext} -j KUBE-EXTERNAL-SERVICES"),
        format!("-A FORWARD -m conntrack --ctstate NEW {fw} -j KUBE-PROXY-FIREWALL"),
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD".into(),
        format!("-A FORWARD -m conntrack --ctstate NEW {portals} -j KUBE-SERVICES"),
        format!("-A FORWARD -m conntrack --ctstate NEW {ext} -j KUBE-EXTERNAL-SERVICES"),
        format!("-A OUTPUT -m conntrack --ctstate NEW {fw} -j KUBE-PROXY-FIREWALL"),
        format!("-A OUTPUT -m conntrack --ctstate NEW {portals} -j KUBE-SERVICES"),
    ] {
        t.push_str(&line);
        t.push('\n');
    }
    t.push_str("COMMIT\n*nat\n");
    let _ = writeln!(t, "-A PREROUTING {portals} -j KUBE-SERVICES");
    let _ = writeln!(t, "-A OUTPUT {portals} -j KUBE-SERVICES");
    t.push_str("-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n");
    t.push_str("COMMIT\n");
    t
}

/// What one full sync of kube-proxy's iptables mode hands to `iptables-restore --noflush`.
/// Like kube-proxy, it leaves out rule comments when there are more than 1,000 endpoints.
pub fn iptables_rules(services: &[Svc], node: &Node) -> String {
    let endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
    let comments = endpoints <= 1000;
    let comment = |text: &str| -> String {
        if !comments {
            String::new()
        } else if text.contains(' ') {
            format!("-m comment --comment \"{text}\" ")
        } else {
            format!("-m comment --comment {text} ")
        }
    };
    let (cidr, bits) = node.cluster_cidr;
    let mut chains = String::new();
    let mut rules = String::new();
    let mut t = String::new();

    t.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(t, ":{c} - [0:0]");
    }
    t.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    let _ = writeln!(
        t,
        "-A KUBE-FORWARD {}-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        comment("kubernetes forwarding rules")
    );
    let _ = writeln!(
        t,
        "-A KUBE-FORWARD {}-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        comment("kubernetes forwarding conntrack rule")
    );
    t.push_str("COMMIT\n*nat\n");

    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING {}-j MASQUERADE --random-fully",
        comment("kubernetes service traffic requiring SNAT")
    );
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");

    for s in services {
        let spn = s.port_name();
        let svc = svc_chain(&spn, "tcp");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let cluster_ip = comment(&format!("{spn} cluster IP"));
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES {cluster_ip}-m tcp -p tcp -d {} --dport {} -j {svc}",
            s.cluster_ip, s.port
        );
        if let Some(np) = s.node_port {
            let ext = ext_chain(&spn, "tcp");
            let _ = writeln!(chains, ":{ext} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS {}-m tcp -p tcp --dport {np} -j {ext}",
                comment(&spn)
            );
            let _ = writeln!(
                rules,
                "-A {ext} {}-j KUBE-MARK-MASQ",
                comment(&format!(
                    "masquerade traffic for {spn} external destinations"
                ))
            );
            let _ = writeln!(rules, "-A {ext} -j {svc}");
        }
        let _ = writeln!(
            rules,
            "-A {svc} {cluster_ip}-m tcp -p tcp -d {} --dport {} ! -s {cidr}/{bits} -j KUBE-MARK-MASQ",
            s.cluster_ip, s.port
        );
        let n = s.endpoints.len();
        for (k, ip) in s.endpoints.iter().enumerate() {
            let ep = format!("{ip}:{}", s.target_port);
            let sep = sep_chain(&spn, "tcp", &ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let to = comment(&format!("{spn} -> {ep}"));
            if k + 1 < n {
                let _ = writeln!(
                    rules,
                    "-A {svc} {to}-m statistic --mode random --probability {} -j {sep}",
                    probability(n - k)
                );
            } else {
                let _ = writeln!(rules, "-A {svc} {to}-j {sep}");
            }
            let _ = writeln!(rules, "-A {sep} {}-s {ip} -j KUBE-MARK-MASQ", comment(&spn));
            let _ = writeln!(
                rules,
                "-A {sep} {}-m tcp -p tcp -j DNAT --to-destination {ep}",
                comment(&spn)
            );
        }
    }
    let _ = writeln!(
        rules,
        "-A KUBE-SERVICES {}-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    );
    t.push_str(&chains);
    t.push_str(&rules);
    t.push_str("COMMIT\n");
    t
}

/// What kube-proxy's nftables mode writes in one full sync, for `nft -f`.
pub fn nft_rules(services: &[Svc], node: &Node) -> String {
    let (cidr, bits) = node.cluster_cidr;
    let p = "ip kube-proxy";
    let mut chains = String::new();
    let mut rules = String::new();
    let mut elements = String::new();
    let mut t = String::new();
    let _ = writeln!(t, "add table {p} {{ comment \"rules for kube-proxy\" ; }}");
    for (name, hook) in [
        ("filter-input", Some("type filter hook input priority -110")),
        (
            "filter-forward",
            Some("type filter hook forward priority -110"),
        ),
        (
            "filter-output",
            Some("type filter hook output priority -110"),
        ),
        (
            "nat-prerouting",
            Some("type nat hook prerouting priority -100"),
        ),
        ("nat-output", Some("type nat hook output priority -100")),
        (
            "nat-postrouting",
            Some("type nat hook postrouting priority 100"),
        ),
        ("mark-for-masquerade", None),
        ("masquerading", None),
        ("services", None),
        ("service-endpoints-check", None),
        ("nodeport-endpoints-check", None),
        ("reject-chain", None),
    ] {
        match hook {
            Some(h) => writeln!(t, "add chain {p} {name} {{ {h} ; }}"),
            None => writeln!(t, "add chain {p} {name}"),
        }
        .ok();
    }
    for line in [
        "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }".to_string(),
        format!("add element {p} nodeport-ips {{ {} }}", node.ip),
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }".into(),
        "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }".into(),
        "add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }".into(),
        "add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }".into(),
        format!("add rule {p} mark-for-masquerade mark set mark or {MASQ_MARK}"),
        format!("add rule {p} masquerading mark and {MASQ_MARK} == 0 return"),
        format!("add rule {p} masquerading mark set mark xor {MASQ_MARK}"),
        format!("add rule {p} masquerading masquerade fully-random"),
        format!("add rule {p} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"),
        format!("add rule {p} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"),
        format!("add rule {p} reject-chain reject"),
        format!("add rule {p} filter-input ct state new jump nodeport-endpoints-check"),
        format!("add rule {p} filter-input ct state new jump service-endpoints-check"),
        format!("add rule {p} filter-forward ct state new jump service-endpoints-check"),
        format!("add rule {p} filter-output ct state new jump service-endpoints-check"),
        format!("add rule {p} nat-prerouting jump services"),
        format!("add rule {p} nat-output jump services"),
        format!("add rule {p} nat-postrouting jump masquerading"),
        format!("add rule {p} services ip daddr . meta l4proto . th dport vmap @service-ips"),
        format!("add rule {p} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
    ] {
        t.push_str(&line);
        t.push('\n');
    }
    for s in services {
        let base = nft_port_name(s);
        let svc = format!("service-{}", nft_base(&base));
        let _ = writeln!(chains, "add chain {p} {svc}");
        let _ = writeln!(
            rules,
            "add rule {p} {svc} ip daddr {} tcp dport {} ip saddr != {cidr}/{bits} jump mark-for-masquerade",
            s.cluster_ip, s.port
        );
        let mut vmap = Vec::new();
        for (k, ip) in s.endpoints.iter().enumerate() {
            let ep = format!(
                "endpoint-{}",
                nft_base(&format!("{base}__{ip}/{}", s.target_port))
            );
            let _ = writeln!(chains, "add chain {p} {ep}");
            let _ = writeln!(
                rules,
                "add rule {p} {ep} ip saddr {ip} jump mark-for-masquerade"
            );
            let _ = writeln!(
                rules,
                "add rule {p} {ep} meta l4proto tcp dnat to {ip}:{}",
                s.target_port
            );
            vmap.push(format!("{k} : goto {ep}"));
        }
        let _ = writeln!(
            rules,
            "add rule {p} {svc} numgen random mod {} vmap {{ {} }}",
            s.endpoints.len(),
            vmap.join(" , ")
        );
        let _ = writeln!(
            elements,
            "add element {p} service-ips {{ {} . tcp . {} : goto {svc} }}",
            s.cluster_ip, s.port
        );
        if let Some(np) = s.node_port {
            let ext = format!("external-{}", nft_base(&base));
            let _ = writeln!(chains, "add chain {p} {ext}");
            let _ = writeln!(rules, "add rule {p} {ext} jump mark-for-masquerade");
            let _ = writeln!(rules, "add rule {p} {ext} goto {svc}");
            let _ = writeln!(
                elements,
                "add element {p} service-nodeports {{ tcp . {np} : goto {ext} }}"
            );
        }
    }
    t.push_str(&chains);
    t.push_str(&rules);
    t.push_str(&elements);
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::services::generate;

    /// Names kube-proxy gives the same service ports (from its own test expectations).
    #[test]
    fn names_match_kube_proxy() {
        assert_eq!(
            svc_chain("ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            sep_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(nft_base("ns1/svc1/tcp/p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(nft_base("ns2/svc2/tcp/p80"), "42NFTM6N-ns2/svc2/tcp/p80");
        assert_eq!(
            nft_base("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        assert_eq!(nft_base(&"x".repeat(200)).len(), 112);
        assert_eq!(probability(4), "0.2500000000");
        assert_eq!(probability(3), "0.3333333333");
    }

    fn node() -> Node {
        Node {
            ip: Ipv4Addr::new(198, 18, 0, 2),
            cluster_cidr: (Ipv4Addr::new(10, 244, 0, 0), 16),
        }
    }

    #[test]
    fn iptables_shape() {
        let s = generate(3, 8080, |i, e| {
            Ipv4Addr::new(10, 244, i as u8, 10 + e as u8)
        });
        let t = iptables_rules(&s, &node());
        let svc = svc_chain("bench/svc-2:http", "tcp");
        let ext = ext_chain("bench/svc-2:http", "tcp");
        // One jump per ClusterIP, NodePorts last.
        let services: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(services.len(), 4, "{t}");
        assert!(
            services[3].contains("--dst-type LOCAL -j KUBE-NODEPORTS"),
            "{t}"
        );
        assert!(t.contains(&format!("--dport 30000 -j {ext}")), "{t}");
        assert!(t.contains(&format!("-A {ext} -j {svc}")), "{t}");
        // 1/4, 1/3, 1/2, then unconditional.
        let picks: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with(&format!("-A {svc}")) && l.contains("KUBE-SEP-"))
            .collect();
        assert_eq!(picks.len(), 4);
        assert!(picks[0].contains("--probability 0.2500000000"));
        assert!(picks[1].contains("--probability 0.3333333333"));
        assert!(picks[2].contains("--probability 0.5000000000"));
        assert!(!picks[3].contains("statistic"));
        assert!(t.contains("-s 10.244.2.10 -j KUBE-MARK-MASQ"));
        assert!(t.contains("-j DNAT --to-destination 10.244.2.13:8080"));
        assert!(t.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"));
        // Comments go above 1,000 endpoints, as in kube-proxy's large-cluster mode.
        assert!(t.contains("--comment"));
        let big = generate(251, 8080, |_, e| Ipv4Addr::new(10, 244, 0, 10 + e as u8));
        let t = iptables_rules(&big, &node());
        assert!(!t.contains("bench/svc"), "no comments at 1,004 endpoints");
    }

    #[test]
    fn nft_shape() {
        let s = generate(2, 8080, |i, e| {
            Ipv4Addr::new(10, 244, i as u8, 10 + e as u8)
        });
        let t = nft_rules(&s, &node());
        let svc = format!("service-{}", nft_base("bench/svc-1/tcp/http"));
        assert!(
            t.contains(&format!(
                "add element ip kube-proxy service-ips {{ 10.96.0.1 . tcp . 80 : goto {svc} }}"
            )),
            "{t}"
        );
        assert!(
            t.contains("numgen random mod 4 vmap { 0 : goto endpoint-"),
            "{t}"
        );
        assert!(
            t.contains("service-nodeports { tcp . 30000 : goto external-"),
            "{t}"
        );
        assert!(
            t.contains("meta l4proto tcp dnat to 10.244.1.13:8080"),
            "{t}"
        );
        assert!(t.contains("add element ip kube-proxy nodeport-ips { 198.18.0.2 }"));
        // The per-Service chains are all added before the first per-Service rule.
        let last_chain = t.rfind("add chain").unwrap_or(usize::MAX);
        let first = format!(
            "add rule ip kube-proxy service-{}",
            nft_base("bench/svc-0/tcp/http")
        );
        let first_svc_rule = t.find(&first).unwrap_or(0);
        assert!(last_chain < first_svc_rule, "{t}");
    }

    /// A network namespace of its own, deleted when dropped (with every rule in it).
    struct Netns(String);

    impl Netns {
        fn new() -> Netns {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("lbkp{}x{n}", std::process::id());
            lb_testkit::lab::run(&["ip", "netns", "add", &name]).expect("ip netns add");
            Netns(name)
        }

        /// Runs `cmd` in the namespace with `input` on its standard input.
        fn feed(&self, cmd: &[&str], input: &str) -> Result<String, String> {
            use std::io::Write;
            let mut child = std::process::Command::new("ip")
                .args(["netns", "exec", &self.0])
                .args(cmd)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| e.to_string())?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(input.as_bytes())
                    .map_err(|e| e.to_string())?;
            }
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = lb_testkit::lab::run(&["ip", "netns", "del", &self.0]);
        }
    }

    /// A few Services (NodePorts among them): the iptables ruleset passes
    /// `iptables-restore --test` and then really loads, with every chain and rule there.
    #[test]
    #[ignore = "privileged (root, network namespaces): `cargo xtask test` runs it"]
    fn iptables_ruleset_loads() {
        lb_testkit::require_root();
        let s = generate(12, 8080, |i, e| {
            Ipv4Addr::new(10, 244, i as u8, 10 + e as u8)
        });
        assert_eq!(s.iter().filter(|s| s.node_port.is_some()).count(), 2);
        let ns = Netns::new();
        let rules = iptables_rules(&s, &node());
        ns.feed(&["iptables-restore", "--test", "--noflush"], &rules)
            .expect("iptables-restore --test");
        ns.feed(&["iptables-restore", "--noflush"], &rules)
            .expect("iptables-restore");
        ns.feed(&["iptables-restore", "--noflush"], &iptables_jumps())
            .expect("jumps");
        let saved = ns
            .feed(&["iptables-save", "-t", "nat"], "")
            .expect("iptables-save");
        let svc = svc_chain("bench/svc-11:http", "tcp");
        assert_eq!(
            saved
                .lines()
                .filter(|l| l.starts_with(":KUBE-SVC-"))
                .count(),
            12
        );
        assert_eq!(
            saved
                .lines()
                .filter(|l| l.starts_with(":KUBE-SEP-"))
                .count(),
            48
        );
        assert_eq!(
            saved
                .lines()
                .filter(|l| l.starts_with(":KUBE-EXT-"))
                .count(),
            2
        );
        assert!(saved.contains(&format!("-j {svc}")), "{saved}");
        assert!(saved.contains("-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"), "{saved}");
        assert!(saved.contains("MASQUERADE --random-fully"), "{saved}");
        // A second sync of the same Services replaces the rules (no duplicates).
        ns.feed(&["iptables-restore", "--noflush"], &rules)
            .expect("second restore");
        let again = ns
            .feed(&["iptables-save", "-t", "nat"], "")
            .expect("iptables-save");
        assert_eq!(again.lines().count(), saved.lines().count());
    }

    /// The same for nftables: `nft -c -f` accepts the ruleset and `nft -f` loads it.
    #[test]
    #[ignore = "privileged (root, network namespaces): `cargo xtask test` runs it"]
    fn nft_ruleset_loads() {
        lb_testkit::require_root();
        let s = generate(12, 8080, |i, e| {
            Ipv4Addr::new(10, 244, i as u8, 10 + e as u8)
        });
        let ns = Netns::new();
        let rules = nft_rules(&s, &node());
        ns.feed(&["nft", "-c", "-f", "-"], &rules).expect("nft -c");
        ns.feed(&["nft", "-f", "-"], &rules).expect("nft -f");
        let listed = ns
            .feed(&["nft", "list", "table", "ip", "kube-proxy"], "")
            .expect("nft list");
        let chains = |prefix: &str| {
            listed
                .lines()
                .filter(|l| {
                    l.trim_start().starts_with(&format!("chain {prefix}")) && l.contains('/')
                })
                .count()
        };
        assert_eq!(chains("service-"), 12, "{listed}");
        assert_eq!(chains("endpoint-"), 48, "{listed}");
        assert_eq!(chains("external-"), 2, "{listed}");
        assert!(listed.contains("numgen random mod 4 vmap"), "{listed}");
        assert!(
            listed.contains("10.96.0.11 . tcp . 80 : goto service-"),
            "{listed}"
        );
    }

    /// Each ruleset on the bench's lab node translates real connections: curl from a pod to
    /// the ClusterIP and from outside to the NodePort get answers from the Service's pods,
    /// the pod's address kept for the first, masqueraded to the node for the second.
    #[test]
    #[ignore = "privileged (root, network namespaces): `cargo xtask test` runs it"]
    fn rulesets_translate_on_the_lab() {
        lb_testkit::require_root();
        let _turn = crate::bench::lab_turn();
        for iptables in [true, false] {
            let b = crate::bench::lab::BenchLab::up().expect("lab");
            let set = crate::bench::lab::service_set(30, &b.endpoints(4));
            if iptables {
                let (synced, _) = b
                    .load_iptables(&set, std::time::Duration::from_mins(1))
                    .expect("iptables-restore");
                assert!(
                    synced.is_some(),
                    "iptables-restore --noflush took over a minute"
                );
            } else {
                b.load_nft(&set, std::time::Duration::from_mins(1))
                    .expect("nft -f");
            }
            let t = b
                .targets(crate::bench::lab::Datapath::Iptables, &set)
                .expect("targets");
            let client = b.client().clone();
            let outside = b.lab.ext_ns.clone();
            let mut seen = std::collections::BTreeSet::new();
            for (ns, to, peer) in [
                (&client.ns, t.http_inside, client.ip),
                (&outside, t.http_outside, lb_testkit::lab::POD_GATEWAY),
            ] {
                for _ in 0..12 {
                    let body = lb_testkit::lab::curl(ns, &format!("http://{to}/"))
                        .unwrap_or_else(|e| panic!("iptables={iptables}: {to}: {e:#}"));
                    let mut words = body.split_whitespace();
                    let pod = words.next().unwrap_or("").to_string();
                    let from = words.next().unwrap_or("");
                    assert!(
                        ["pod1", "pod2", "pod3", "pod4"].contains(&pod.as_str()),
                        "iptables={iptables}: {to} answered {body:?}"
                    );
                    assert!(
                        from.starts_with(&format!("{peer}:")),
                        "iptables={iptables}: {to}: the pod saw {from}, not {peer}"
                    );
                    seen.insert(pod);
                }
            }
            assert!(
                seen.len() > 1,
                "iptables={iptables}: one pod answered all: {seen:?}"
            );
        }
    }
}
