//! `lb-agent trace`: one synthesized packet through the pinned programs (BPF_PROG_TEST_RUN),
//! with the decision explained from the verdict, the rewritten headers and the maps: an IPv4
//! packet against the `LB4_*` maps, an IPv6 one against the `LB6_*` maps (slots, members and
//! counters are shared by both families).
//!
//! The run is real: a new flow leaves conntrack entries, which the trace removes again (an
//! affinity entry for the traced client stays, as after any new flow).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
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

fn describe4(f: &Frame) -> String {
    describe(
        f.proto,
        SocketAddr::from((f.src, f.sport)),
        SocketAddr::from((f.dst, f.dport)),
        f.flags,
    )
}

fn describe6(f: &Frame6) -> String {
    describe(
        f.proto,
        SocketAddr::from((f.src, f.sport)),
        SocketAddr::from((f.dst, f.dport)),
        f.flags,
    )
}

fn ct_key(f: &Frame) -> CtKeyV4 {
    CtKeyV4 {
        saddr: u32::from_ne_bytes(f.src.octets()),
        daddr: u32::from_ne_bytes(f.dst.octets()),
        sport: f.sport.to_be(),
        dport: f.dport.to_be(),
        proto: f.proto,
        _pad: [0; 3],
    }
}

fn ct_key6(f: &Frame6) -> CtKeyV6 {
    CtKeyV6 {
        saddr: ipv6_words(f.src.octets()),
        daddr: ipv6_words(f.dst.octets()),
        sport: f.sport.to_be(),
        dport: f.dport.to_be(),
        proto: f.proto,
        _pad: [0; 3],
    }
}

/// The IPv6 twin of `partner_key`: the other direction's entry of a flow.
fn partner_key6(key: &CtKeyV6, e: &CtEntryV6) -> CtKeyV6 {
    CtKeyV6 {
        saddr: e.nat_daddr,
        daddr: e.nat_saddr,
        sport: e.nat_dport,
        dport: e.nat_sport,
        proto: key.proto,
        _pad: [0; 3],
    }
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
        (SocketAddr::V4(s), SocketAddr::V4(d)) => trace4(pin, proto, s, d, iface),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => trace6(pin, proto, s, d, iface),
        _ => bail!(
            "{src} and {dst} are of different address families: a packet has one \
             (an IPv4 client of an IPv6 socket is traced with its IPv4 address)"
        ),
    }
}

fn trace4(
    pin: &Path,
    proto: Proto,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    iface: Option<&str>,
) -> Result<String> {
    let PinnedPrograms {
        xdp, tc_reject: tc, ..
    } = pinned_programs(pin)?;
    let frame = match proto {
        Proto::Tcp => Frame::tcp((*src.ip(), src.port()), (*dst.ip(), dst.port()), SYN),
        Proto::Udp => Frame::udp(
            (*src.ip(), src.port()),
            (*dst.ip(), dst.port()),
            b"lb-agent trace",
        ),
    };
    let bytes = frame.build();
    let (ifindex, from_pod, words) = origin(pin, iface)?;

    let services: HashMap<MapData, ServiceKeyV4, ServiceEntry> =
        open_hash(pin, map_names::LB4_SERVICES)?;
    let backends: HashMap<MapData, u32, BackendV4> = open_hash(pin, map_names::LB4_BACKENDS)?;
    let mut conntrack: HashMap<MapData, CtKeyV4, CtEntryV4> =
        open_hash(pin, map_names::LB4_CONNTRACK)?;
    let key = ct_key(&frame);
    let existing = conntrack.get(&key, 0).ok();

    let mut out = String::new();
    writeln!(out, "packet:    {} ({words})", describe4(&frame))?;

    // The frontend the packet is addressed to, as the program looks it up.
    let mut fkey = ServiceKeyV4 {
        addr: key.daddr,
        port: key.dport,
        proto: key.proto,
        scope: SCOPE_ALL,
    };
    let mut svc = services.get(&fkey, 0).ok();
    if let Some(s) = svc {
        if s.flags & SVC_F_POD_SCOPE != 0 && from_pod {
            fkey.scope = SCOPE_PODS;
            svc = services.get(&fkey, 0).ok().or(svc);
        }
    }
    frontend_line(&mut out, dst.into(), proto, svc.map(|s| (s, fkey.scope)))?;

    let (verdict, buf, grown) = run_counted(pin, &xdp, &bytes, ifindex)?;

    match verdict {
        XDP_PASS if buf != bytes => {
            let o = parse(&buf);
            let created = conntrack.get(&key, 0).ok();
            let backend = created.or(existing).and_then(|e| {
                let b = backends.get(&e.backend_id, 0).ok()?;
                let addr =
                    SocketAddr::from((Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port)));
                Some((e.backend_id, addr, b.flags))
            });
            decision_line(&mut out, existing.is_some(), backend)?;
            writeln!(
                out,
                "verdict:   XDP_PASS, rewritten to {} ({})",
                describe4(&o),
                checks(&buf)
            )?;
            // Leave no trace of the synthetic flow (a source-NATed one's reply entry, which
            // holds its port, is in LB4_SNAT).
            if existing.is_none() {
                if let Some(e) = created {
                    let reply = partner_key(&key, &e);
                    if e.flags & CT_F_SNAT != 0 {
                        let mut snat: HashMap<MapData, CtKeyV4, CtEntryV4> =
                            open_hash(pin, map_names::LB4_SNAT)?;
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
                    TC_ACT_REDIRECT if proto == Proto::Tcp => {
                        writeln!(out, "verdict:   rejected with {} (connection refused)", describe4(&parse(&tbuf)))?;
                    }
                    TC_ACT_REDIRECT => match tbuf.get(26..34) {
                        Some(a) => writeln!(
                            out,
                            "verdict:   rejected with ICMP port unreachable {} → {} (connection refused)",
                            Ipv4Addr::new(a[0], a[1], a[2], a[3]),
                            Ipv4Addr::new(a[4], a[5], a[6], a[7])
                        )?,
                        None => writeln!(out, "verdict:   rejected with a truncated frame of {} bytes", tbuf.len())?,
                    },
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

fn trace6(
    pin: &Path,
    proto: Proto,
    src: SocketAddrV6,
    dst: SocketAddrV6,
    iface: Option<&str>,
) -> Result<String> {
    let PinnedPrograms {
        xdp, tc_reject: tc, ..
    } = pinned_programs(pin)?;
    let frame = match proto {
        Proto::Tcp => Frame6::tcp((*src.ip(), src.port()), (*dst.ip(), dst.port()), SYN),
        Proto::Udp => Frame6::udp(
            (*src.ip(), src.port()),
            (*dst.ip(), dst.port()),
            b"lb-agent trace",
        ),
    };
    let bytes = frame.build();
    let (ifindex, from_pod, words) = origin(pin, iface)?;

    let services: HashMap<MapData, ServiceKeyV6, ServiceEntry> =
        open_hash(pin, map_names::LB6_SERVICES)?;
    let backends: HashMap<MapData, u32, BackendV6> = open_hash(pin, map_names::LB6_BACKENDS)?;
    let mut conntrack: HashMap<MapData, CtKeyV6, CtEntryV6> =
        open_hash(pin, map_names::LB6_CONNTRACK)?;
    let key = ct_key6(&frame);
    let existing = conntrack.get(&key, 0).ok();

    let mut out = String::new();
    writeln!(out, "packet:    {} ({words})", describe6(&frame))?;

    let mut fkey = ServiceKeyV6 {
        addr: key.daddr,
        port: key.dport,
        proto: key.proto,
        scope: SCOPE_ALL,
    };
    let mut svc = services.get(&fkey, 0).ok();
    if let Some(s) = svc {
        if s.flags & SVC_F_POD_SCOPE != 0 && from_pod {
            fkey.scope = SCOPE_PODS;
            svc = services.get(&fkey, 0).ok().or(svc);
        }
    }
    frontend_line(&mut out, dst.into(), proto, svc.map(|s| (s, fkey.scope)))?;

    let (verdict, buf, grown) = run_counted(pin, &xdp, &bytes, ifindex)?;

    match verdict {
        XDP_PASS if buf != bytes => {
            let created = conntrack.get(&key, 0).ok();
            let backend = created.or(existing).and_then(|e| {
                let b = backends.get(&e.backend_id, 0).ok()?;
                let addr =
                    SocketAddr::from((Ipv6Addr::from(ipv6_bytes(b.addr)), u16::from_be(b.port)));
                Some((e.backend_id, addr, b.flags))
            });
            decision_line(&mut out, existing.is_some(), backend)?;
            let rewritten = match parse6(&buf) {
                Ok(o) => describe6(&o),
                Err(e) => format!("an unreadable frame ({e})"),
            };
            writeln!(
                out,
                "verdict:   XDP_PASS, rewritten to {rewritten} ({})",
                checks(&buf)
            )?;
            // Leave no trace of the synthetic flow (a source-NATed one's reply entry is in
            // LB6_SNAT).
            if existing.is_none() {
                if let Some(e) = created {
                    let reply = partner_key6(&key, &e);
                    if e.flags & CT_F_SNAT != 0 {
                        let mut snat: HashMap<MapData, CtKeyV6, CtEntryV6> =
                            open_hash(pin, map_names::LB6_SNAT)?;
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
                match (tc_verdict, parse6(&tbuf)) {
                    (TC_ACT_REDIRECT, Ok(r)) if r.proto == ICMPV6 => {
                        // Type 1 (destination unreachable), code 4 (port unreachable).
                        let what = match r.payload.get(..2) {
                            Some([1, 4]) => "ICMPv6 port unreachable".to_string(),
                            Some([t, c]) => format!("ICMPv6 type {t} code {c}"),
                            _ => "a truncated ICMPv6 message".to_string(),
                        };
                        writeln!(
                            out,
                            "verdict:   rejected with {what} {} → {} (connection refused)",
                            r.src, r.dst
                        )?;
                    }
                    (TC_ACT_REDIRECT, Ok(r)) => writeln!(
                        out,
                        "verdict:   rejected with {} (connection refused)",
                        describe6(&r)
                    )?,
                    (TC_ACT_REDIRECT, Err(e)) => {
                        writeln!(out, "verdict:   rejected with an unreadable frame ({e})")?;
                    }
                    (TC_ACT_SHOT, _) => writeln!(out, "verdict:   dropped by lb_tc_reject")?,
                    (v, _) => writeln!(
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
