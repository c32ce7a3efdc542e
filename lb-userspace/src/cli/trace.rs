//! `lb-agent trace`: one synthesized packet through the pinned programs (BPF_PROG_TEST_RUN),
//! with the decision explained from the verdict, the rewritten headers and the maps.
//!
//! The run is real: a new flow leaves conntrack entries, which the trace removes again (an
//! affinity entry for the traced client stays, as after any new flow).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    map_names, BackendV4, CtEntryV4, CtKeyV4, ServiceEntry, ServiceKeyV4, CT_F_SNAT, IFACE_F_POD,
    SCOPE_ALL, SCOPE_PODS, SVC_F_DROP_NO_ENDPOINTS, SVC_F_POD_SCOPE,
};

use lb_control::{maps::dump, model::Proto};

use super::frame::{parse, verify_checksums, Frame, ACK, RST, SYN, TCP};
use crate::datapath::{
    conntrack::partner_key,
    pins::{open_map, pinned_programs},
    test_run::run_frame,
    PinnedMaps,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

fn open_hash<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str) -> Result<HashMap<MapData, K, V>> {
    let data = open_map(pin, name)?;
    let map = match name {
        map_names::LB4_CONNTRACK | map_names::LB4_SNAT => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    };
    Ok(HashMap::try_from(map)?)
}

fn describe(f: &Frame) -> String {
    let proto = if f.proto == TCP { "TCP" } else { "UDP" };
    let mut s = format!("{proto} {}:{} → {}:{}", f.src, f.sport, f.dst, f.dport);
    if f.proto == TCP {
        let flags: Vec<&str> = [(SYN, "SYN"), (ACK, "ACK"), (RST, "RST")]
            .iter()
            .filter(|(b, _)| f.flags & b != 0)
            .map(|(_, n)| *n)
            .collect();
        let _ = write!(s, " [{}]", flags.join(","));
    }
    s
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

/// Traces one packet. `iface`: the interface it arrives on (a pod veth or an external one);
/// `None`: as if from outside.
pub fn trace(
    pin: &Path,
    proto: Proto,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    iface: Option<&str>,
) -> Result<String> {
    // Pod interfaces run lb_tc_pod, and external ones lb_xdp or lb_tc_ext, all making the
    // same decisions (one translation function); lb_xdp stands in for them here, told
    // whether the interface is a pod's.
    let progs = pinned_programs(pin)?;
    let (xdp, tc) = (progs.xdp, progs.tc_reject);
    let frame = match proto {
        Proto::Tcp => Frame::tcp((*src.ip(), src.port()), (*dst.ip(), dst.port()), SYN),
        Proto::Udp => Frame::udp(
            (*src.ip(), src.port()),
            (*dst.ip(), dst.port()),
            b"lb-agent trace",
        ),
    };
    let bytes = frame.build();
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

    let services: HashMap<MapData, ServiceKeyV4, ServiceEntry> =
        open_hash(pin, map_names::LB4_SERVICES)?;
    let backends: HashMap<MapData, u32, BackendV4> = open_hash(pin, map_names::LB4_BACKENDS)?;
    let mut conntrack: HashMap<MapData, CtKeyV4, CtEntryV4> =
        open_hash(pin, map_names::LB4_CONNTRACK)?;
    let key = ct_key(&frame);
    let existing = conntrack.get(&key, 0).ok();

    let mut out = String::new();
    let origin = match (iface, from_pod) {
        (Some(i), true) => format!("from pod interface {i}"),
        (Some(i), false) => format!("from interface {i}"),
        (None, _) => "from outside".to_string(),
    };
    writeln!(out, "packet:    {} ({origin})", describe(&frame))?;

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
    let rows = dump(&PinnedMaps::open(pin)?)?;
    match svc {
        Some(s) => {
            let row = rows.iter().find(|r| r.id == s.svc_id);
            writeln!(
                out,
                "frontend:  {dst}/{proto} {}{} (id {}), {} backend(s){}",
                row.map_or("?", |r| r.kind.as_str()),
                if fkey.scope == SCOPE_PODS {
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
            )?;
        }
        None => writeln!(out, "frontend:  none at {dst}/{proto}")?,
    }

    let (verdict, buf) = run_frame(&xdp, &bytes, ifindex).context("running lb_xdp")?;

    match verdict {
        XDP_PASS if buf != bytes => {
            let o = parse(&buf);
            let created = conntrack.get(&key, 0).ok();
            let entry = created.or(existing);
            let backend = entry.and_then(|e| {
                backends
                    .get(&e.backend_id, 0)
                    .ok()
                    .map(|b| (e.backend_id, b))
            });
            let how = if existing.is_some() {
                "established flow"
            } else {
                "new flow"
            };
            match backend {
                Some((id, b)) => {
                    let state = if b.flags & lb_common::BACKEND_F_TERMINATING != 0 {
                        "terminating"
                    } else {
                        "active"
                    };
                    let local = if b.flags & lb_common::BACKEND_F_LOCAL != 0 {
                        ", local"
                    } else {
                        ""
                    };
                    writeln!(
                        out,
                        "decision:  {how} → backend {}:{} (id {id}, {state}{local})",
                        Ipv4Addr::from(b.addr.to_ne_bytes()),
                        u16::from_be(b.port)
                    )?;
                }
                None => writeln!(out, "decision:  {how} → reverse translation of a reply")?,
            }
            let checks = match verify_checksums(&buf) {
                Ok(()) => "checksums valid".to_string(),
                Err(e) => e,
            };
            writeln!(
                out,
                "verdict:   XDP_PASS, rewritten to {} ({checks})",
                describe(&o)
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
                        writeln!(out, "verdict:   rejected with {} (connection refused)", describe(&parse(&tbuf)))?;
                    }
                    TC_ACT_REDIRECT => writeln!(
                        out,
                        "verdict:   rejected with ICMP port unreachable {} → {} (connection refused)",
                        Ipv4Addr::new(tbuf[26], tbuf[27], tbuf[28], tbuf[29]),
                        Ipv4Addr::new(tbuf[30], tbuf[31], tbuf[32], tbuf[33])
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
        XDP_DROP => {
            let why = match svc {
                Some(s) if s.flags & SVC_F_DROP_NO_ENDPOINTS != 0 => {
                    "no endpoint on this node (Local traffic policy) while some exist elsewhere"
                }
                _ => "the service's backend slots are inconsistent",
            };
            writeln!(out, "verdict:   XDP_DROP: {why}")?;
        }
        v => writeln!(out, "verdict:   XDP verdict {v}")?,
    }
    Ok(out)
}
