//! `lb-agent trace`: one synthesized packet through the pinned programs (BPF_PROG_TEST_RUN),
//! with the decision explained from the verdict, the rewritten headers and the maps: an IPv4
//! packet against the `LB4_*` maps, an IPv6 one against the `LB6_*` maps (slots, members and
//! counters are shared by both families).
//!
//! The run is real: a new flow leaves conntrack entries, which the trace removes again (an
//! affinity entry for the traced client stays, as after any new flow).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    ipv6_bytes, ipv6_words, map_names, BackendV4, BackendV6, CtEntryV4, CtEntryV6, CtKeyV4,
    CtKeyV6, ServiceEntry, ServiceKeyV4, ServiceKeyV6, BACKEND_F_LOCAL, BACKEND_F_TERMINATING,
    CT_F_SNAT, IFACE_F_POD, SCOPE_ALL, SCOPE_PODS, SVC_F_CLUSTER_IP, SVC_F_DROP_NO_ENDPOINTS,
    SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, SVC_F_POD_SCOPE,
};

use lb_control::model::Proto;

use super::frame::{parse, parse6, verify_checksums, Frame, Frame6, ACK, ICMPV6, RST, SYN, TCP};
use crate::datapath::{
    conntrack::partner_key,
    pins::{open_map, pinned_programs, PinnedPrograms},
    stats::read_stats,
    test_run::run_frame,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

fn open_hash<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str) -> Result<HashMap<MapData, K, V>> {
    let data = open_map(pin, name)?;
    let map = match name {
        map_names::LB4_CONNTRACK
        | map_names::LB4_SNAT
        | map_names::LB6_CONNTRACK
        | map_names::LB6_SNAT => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    };
    Ok(HashMap::try_from(map)?)
}

/// A packet as the trace prints it: `TCP 198.18.0.1:41000 → 198.18.0.2:80 [SYN]`, or with
/// IPv6 addresses in brackets.
fn describe(proto: u8, src: SocketAddr, dst: SocketAddr, flags: u8) -> String {
    let name = if proto == TCP { "TCP" } else { "UDP" };
    let mut s = format!("{name} {src} → {dst}");
    if proto == TCP {
        let flags: Vec<&str> = [(SYN, "SYN"), (ACK, "ACK"), (RST, "RST")]
            .iter()
            .filter(|(b, _)| flags & b != 0)
            .map(|(_, n)| *n)
            .collect();
        let _ = write!(s, " [{}]", flags.join(","));
    }
    s
}

/// The frontend's kind, from its flags (as `lb-agent services` names it).
fn kind(flags: u32) -> &'static str {
    [
        (SVC_F_CLUSTER_IP, "ClusterIP"),
        (SVC_F_NODE_PORT, "NodePort"),
        (SVC_F_EXTERNAL_IP, "ExternalIP"),
        (SVC_F_LOAD_BALANCER, "LoadBalancer"),
    ]
    .iter()
    .find(|(f, _)| flags & f != 0)
    .map_or("?", |(_, n)| n)
}

/// The frontend line, for the entry found (or none) at `dst`.
fn frontend_line(
    out: &mut String,
    dst: SocketAddr,
    proto: Proto,
    svc: Option<(ServiceEntry, u8)>,
) -> Result<()> {
    match svc {
        Some((s, scope)) => writeln!(
            out,
            "frontend:  {dst}/{proto} {}{} (id {}), {} backend(s){}",
            kind(s.flags),
            if scope == SCOPE_PODS {
                " for this node's pods"
            } else {
                ""
            },
            s.svc_id,
            s.count,
            if s.affinity_timeout_s != 0 {
                format!(", sessionAffinity ClientIP {}s", s.affinity_timeout_s)
            } else {
                String::new()
            }
        )?,
        None => writeln!(out, "frontend:  none at {dst}/{proto}")?,
    }
    Ok(())
}

/// The decision line of a translated packet: the backend the flow went to, or a reply.
fn decision_line(
    out: &mut String,
    established: bool,
    backend: Option<(u32, SocketAddr, u8)>,
) -> Result<()> {
    let how = if established {
        "established flow"
    } else {
        "new flow"
    };
    match backend {
        Some((id, addr, flags)) => {
            let state = if flags & BACKEND_F_TERMINATING != 0 {
                "terminating"
            } else {
                "active"
            };
            let local = if flags & BACKEND_F_LOCAL != 0 {
                ", local"
            } else {
                ""
            };
            writeln!(
                out,
                "decision:  {how} → backend {addr} (id {id}, {state}{local})"
            )?;
        }
        None => writeln!(out, "decision:  {how} → reverse translation of a reply")?,
    }
    Ok(())
}

/// The verdict line of a packet XDP dropped: why, from the drop counter the run raised
/// (`grown`: the global counters that grew during the run), else from the frontend's flags.
fn drop_line(out: &mut String, svc: Option<ServiceEntry>, grown: &[&str]) -> Result<()> {
    let counted = [
        (
            "drop_source_range",
            "the client is outside the frontend's loadBalancerSourceRanges",
        ),
        (
            "drop_snat_ports",
            "no free SNAT port for a flow to a backend on another node",
        ),
        (
            "drop_no_local",
            "no endpoint on this node (Local traffic policy) while some exist elsewhere",
        ),
        (
            "drop_inconsistent",
            "the service's backend slots are inconsistent",
        ),
    ]
    .into_iter()
    .find(|(name, _)| grown.contains(name))
    .map(|(_, why)| why);
    let why = counted.unwrap_or(match svc {
        Some(s) if s.flags & SVC_F_DROP_NO_ENDPOINTS != 0 => {
            "no endpoint on this node (Local traffic policy) while some exist elsewhere"
        }
        _ => "the service's backend slots are inconsistent",
    });
    writeln!(out, "verdict:   XDP_DROP: {why}")?;
    Ok(())
}

/// Runs `frame` through `prog`: its verdict, the frame it left, and the global counters that
/// grew meanwhile (the node's own traffic may add to them; a hint, not a proof).
fn run_counted(
    pin: &Path,
    prog: &aya::programs::Xdp,
    frame: &[u8],
    ifindex: Option<u32>,
) -> Result<(u32, Vec<u8>, Vec<&'static str>)> {
    let before = read_stats(pin)?;
    let (verdict, buf) = run_frame(prog, frame, ifindex).context("running lb_xdp")?;
    let after = read_stats(pin)?;
    let grown = after
        .iter()
        .zip(&before)
        .filter(|((_, a), (_, b))| a > b)
        .map(|((name, _), _)| *name)
        .collect();
    Ok((verdict, buf, grown))
}

fn checks(buf: &[u8]) -> String {
    match verify_checksums(buf) {
        Ok(()) => "checksums valid".to_string(),
        Err(e) => e,
    }
}

/// Where the packet comes from: (ifindex, whether it is a pod interface, the words saying so).
fn origin(pin: &Path, iface: Option<&str>) -> Result<(Option<u32>, bool, String)> {
    let ifindex = match iface {
        Some(name) => Some(
            nix::net::if_::if_nametoindex(name)
                .with_context(|| format!("no interface {name} in this network namespace"))?,
        ),
        None => None,
    };
    let ifaces: HashMap<MapData, u32, u32> = open_hash(pin, map_names::LB_IFACES)?;
    let from_pod = ifindex
        .and_then(|i| ifaces.get(&i, 0).ok())
        .is_some_and(|f| f & IFACE_F_POD != 0);
    let words = match (iface, from_pod) {
        (Some(i), true) => format!("from pod interface {i}"),
        (Some(i), false) => format!("from interface {i}"),
        (None, _) => "from outside".to_string(),
    };
    Ok((ifindex, from_pod, words))
}

/// Traces one packet from `src` to `dst` (both of one address family). `iface`: the
/// interface it arrives on (a pod veth or an external one); `None`: as if from outside.
pub fn trace(
    pin: &Path,
    proto: Proto,
    src: SocketAddr,
    dst: SocketAddr,
    iface: Option<&str>,
) -> Result<String> {
    // Pod interfaces run lb_tc_pod, and external ones lb_xdp or lb_tc_ext, all making the
    // same decisions (one translation function); lb_xdp stands in for them here, told
    // whether the interface is a pod's.
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            trace_family::<Frame>(pin, proto, (*s.ip(), s.port()), (*d.ip(), d.port()), iface)
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            trace_family::<Frame6>(pin, proto, (*s.ip(), s.port()), (*d.ip(), d.port()), iface)
        }
        _ => bail!(
            "{src} and {dst} are of different address families: a packet has one \
             (an IPv4 client of an IPv6 socket is traced with its IPv4 address)"
        ),
    }
}

/// What the trace needs of an address family: its frame, its maps and their keys, and how
/// its answers read.
trait Family: Sized {
    type Addr: Copy + Into<std::net::IpAddr>;
    type SvcKey: aya::Pod;
    type Backend: aya::Pod;
    type CtKey: aya::Pod;
    type CtEntry: aya::Pod;
    const SERVICES: &'static str;
    const BACKENDS: &'static str;
    const CONNTRACK: &'static str;
    const SNAT: &'static str;

    fn frame(proto: Proto, src: (Self::Addr, u16), dst: (Self::Addr, u16)) -> Self;
    fn bytes(&self) -> Vec<u8>;
    /// The packet as the trace prints it.
    fn describe(&self) -> String;
    fn ct_key(&self) -> Self::CtKey;
    /// The frontend's key, as the program looks the packet's destination up.
    fn svc_key(key: &Self::CtKey, scope: u8) -> Self::SvcKey;
    /// The other direction's entry of a flow.
    fn partner(key: &Self::CtKey, e: &Self::CtEntry) -> Self::CtKey;
    /// A flow's backend id, and whether it is source-NATed.
    fn flow(e: &Self::CtEntry) -> (u32, bool);
    /// A backend's address and flags.
    fn backend(b: &Self::Backend) -> (SocketAddr, u8);
    /// A frame the program rewrote, as the trace prints it.
    fn rewritten(frame: &[u8]) -> String;
    /// What `lb_tc_reject` answered with (`TC_ACT_REDIRECT`), as the trace prints it.
    fn rejected(proto: Proto, frame: &[u8]) -> String;
}

impl Family for Frame {
    type Addr = Ipv4Addr;
    type SvcKey = ServiceKeyV4;
    type Backend = BackendV4;
    type CtKey = CtKeyV4;
    type CtEntry = CtEntryV4;
    const SERVICES: &'static str = map_names::LB4_SERVICES;
    const BACKENDS: &'static str = map_names::LB4_BACKENDS;
    const CONNTRACK: &'static str = map_names::LB4_CONNTRACK;
    const SNAT: &'static str = map_names::LB4_SNAT;

    fn frame(proto: Proto, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Frame {
        match proto {
            Proto::Tcp => Frame::tcp(src, dst, SYN),
            Proto::Udp => Frame::udp(src, dst, b"lb-agent trace"),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        self.build()
    }
    fn describe(&self) -> String {
        describe(
            self.proto,
            SocketAddr::from((self.src, self.sport)),
            SocketAddr::from((self.dst, self.dport)),
            self.flags,
        )
    }
    fn ct_key(&self) -> CtKeyV4 {
        CtKeyV4 {
            saddr: u32::from_ne_bytes(self.src.octets()),
            daddr: u32::from_ne_bytes(self.dst.octets()),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            _pad: [0; 3],
        }
    }
    fn svc_key(key: &CtKeyV4, scope: u8) -> ServiceKeyV4 {
        ServiceKeyV4 {
            addr: key.daddr,
            port: key.dport,
            proto: key.proto,
            scope,
        }
    }
    fn partner(key: &CtKeyV4, e: &CtEntryV4) -> CtKeyV4 {
        partner_key(key, e)
    }
    fn flow(e: &CtEntryV4) -> (u32, bool) {
        (e.backend_id, e.flags & CT_F_SNAT != 0)
    }
    fn backend(b: &BackendV4) -> (SocketAddr, u8) {
        let addr = Ipv4Addr::from(b.addr.to_ne_bytes());
        (SocketAddr::from((addr, u16::from_be(b.port))), b.flags)
    }
    fn rewritten(frame: &[u8]) -> String {
        match frame.len() {
            34.. => parse(frame).describe(),
            n => format!("a truncated frame of {n} bytes"),
        }
    }
    fn rejected(proto: Proto, frame: &[u8]) -> String {
        match (proto, frame.get(26..34)) {
            (Proto::Tcp, Some(_)) => Self::rewritten(frame),
            (Proto::Udp, Some(a)) => format!(
                "ICMP port unreachable {} → {}",
                Ipv4Addr::new(a[0], a[1], a[2], a[3]),
                Ipv4Addr::new(a[4], a[5], a[6], a[7])
            ),
            (_, None) => format!("a truncated frame of {} bytes", frame.len()),
        }
    }
}

impl Family for Frame6 {
    type Addr = Ipv6Addr;
    type SvcKey = ServiceKeyV6;
    type Backend = BackendV6;
    type CtKey = CtKeyV6;
    type CtEntry = CtEntryV6;
    const SERVICES: &'static str = map_names::LB6_SERVICES;
    const BACKENDS: &'static str = map_names::LB6_BACKENDS;
    const CONNTRACK: &'static str = map_names::LB6_CONNTRACK;
    const SNAT: &'static str = map_names::LB6_SNAT;

    fn frame(proto: Proto, src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16)) -> Frame6 {
        match proto {
            Proto::Tcp => Frame6::tcp(src, dst, SYN),
            Proto::Udp => Frame6::udp(src, dst, b"lb-agent trace"),
        }
    }
    fn bytes(&self) -> Vec<u8> {
        self.build()
    }
    fn describe(&self) -> String {
        describe(
            self.proto,
            SocketAddr::from((self.src, self.sport)),
            SocketAddr::from((self.dst, self.dport)),
            self.flags,
        )
    }
    fn ct_key(&self) -> CtKeyV6 {
        CtKeyV6 {
            saddr: ipv6_words(self.src.octets()),
            daddr: ipv6_words(self.dst.octets()),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            _pad: [0; 3],
        }
    }
    fn svc_key(key: &CtKeyV6, scope: u8) -> ServiceKeyV6 {
        ServiceKeyV6 {
            addr: key.daddr,
            port: key.dport,
            proto: key.proto,
            scope,
        }
    }
    fn partner(key: &CtKeyV6, e: &CtEntryV6) -> CtKeyV6 {
        CtKeyV6 {
            saddr: e.nat_daddr,
            daddr: e.nat_saddr,
            sport: e.nat_dport,
            dport: e.nat_sport,
            proto: key.proto,
            _pad: [0; 3],
        }
    }
    fn flow(e: &CtEntryV6) -> (u32, bool) {
        (e.backend_id, e.flags & CT_F_SNAT != 0)
    }
    fn backend(b: &BackendV6) -> (SocketAddr, u8) {
        let addr = Ipv6Addr::from(ipv6_bytes(b.addr));
        (SocketAddr::from((addr, u16::from_be(b.port))), b.flags)
    }
    fn rewritten(frame: &[u8]) -> String {
        match parse6(frame) {
            Ok(o) => o.describe(),
            Err(e) => format!("an unreadable frame ({e})"),
        }
    }
    fn rejected(_: Proto, frame: &[u8]) -> String {
        match parse6(frame) {
            // Type 1 (destination unreachable), code 4 (port unreachable).
            Ok(r) if r.proto == ICMPV6 => {
                let what = match r.payload.get(..2) {
                    Some([1, 4]) => "ICMPv6 port unreachable".to_string(),
                    Some([t, c]) => format!("ICMPv6 type {t} code {c}"),
                    _ => "a truncated ICMPv6 message".to_string(),
                };
                format!("{what} {} → {}", r.src, r.dst)
            }
            Ok(r) => r.describe(),
            Err(e) => format!("an unreadable frame ({e})"),
        }
    }
}

/// `trace` for one family.
fn trace_family<F: Family>(
    pin: &Path,
    proto: Proto,
    src: (F::Addr, u16),
    dst: (F::Addr, u16),
    iface: Option<&str>,
) -> Result<String> {
    let PinnedPrograms {
        xdp, tc_reject: tc, ..
    } = pinned_programs(pin)?;
    let frame = F::frame(proto, src, dst);
    let bytes = frame.bytes();
    let (ifindex, from_pod, words) = origin(pin, iface)?;

    let services: HashMap<MapData, F::SvcKey, ServiceEntry> = open_hash(pin, F::SERVICES)?;
    let backends: HashMap<MapData, u32, F::Backend> = open_hash(pin, F::BACKENDS)?;
    let mut conntrack: HashMap<MapData, F::CtKey, F::CtEntry> = open_hash(pin, F::CONNTRACK)?;
    let key = frame.ct_key();
    let existing = conntrack.get(&key, 0).ok();

    let mut out = String::new();
    writeln!(out, "packet:    {} ({words})", frame.describe())?;

    // The frontend the packet is addressed to, as the program looks it up.
    let mut scope = SCOPE_ALL;
    let mut svc = services.get(&F::svc_key(&key, scope), 0).ok();
    if let Some(s) = svc {
        if s.flags & SVC_F_POD_SCOPE != 0 && from_pod {
            scope = SCOPE_PODS;
            svc = services.get(&F::svc_key(&key, scope), 0).ok().or(svc);
        }
    }
    let dst = SocketAddr::new(dst.0.into(), dst.1);
    frontend_line(&mut out, dst, proto, svc.map(|s| (s, scope)))?;

    let (verdict, buf, grown) = run_counted(pin, &xdp, &bytes, ifindex)?;

    match verdict {
        XDP_PASS if buf != bytes => {
            let created = conntrack.get(&key, 0).ok();
            let backend = created.as_ref().or(existing.as_ref()).and_then(|e| {
                let (id, _) = F::flow(e);
                let (addr, flags) = F::backend(&backends.get(&id, 0).ok()?);
                Some((id, addr, flags))
            });
            decision_line(&mut out, existing.is_some(), backend)?;
            writeln!(
                out,
                "verdict:   XDP_PASS, rewritten to {} ({})",
                F::rewritten(&buf),
                checks(&buf)
            )?;
            // Leave no trace of the synthetic flow (a source-NATed one's reply entry, which
            // holds its port, is in the SNAT map).
            if existing.is_none() {
                if let Some(e) = created {
                    let reply = F::partner(&key, &e);
                    if F::flow(&e).1 {
                        let mut snat: HashMap<MapData, F::CtKey, F::CtEntry> =
                            open_hash(pin, F::SNAT)?;
                        let _ = snat.remove(&reply);
                    } else {
                        let _ = conntrack.remove(&reply);
                    }
                    let _ = conntrack.remove(&key);
                }
            }
        }
        XDP_PASS => match svc {
            Some(s) if s.count == 0 => {
                writeln!(
                    out,
                    "decision:  no usable endpoint → handed to lb_tc_reject"
                )?;
                let (tc_verdict, tbuf) =
                    run_frame(&tc, &bytes, None).context("running lb_tc_reject")?;
                match tc_verdict {
                    TC_ACT_REDIRECT => writeln!(
                        out,
                        "verdict:   rejected with {} (connection refused)",
                        F::rejected(proto, &tbuf)
                    )?,
                    TC_ACT_SHOT => writeln!(out, "verdict:   dropped by lb_tc_reject")?,
                    v => writeln!(
                        out,
                        "verdict:   passed on by lb_tc_reject (TC verdict {})",
                        v as i32
                    )?,
                }
            }
            _ => writeln!(
                out,
                "verdict:   XDP_PASS, untouched: not a Service frontend"
            )?,
        },
        XDP_DROP => drop_line(&mut out, svc, &grown)?,
        v => writeln!(out, "verdict:   XDP verdict {v}")?,
    }
    Ok(out)
}
