//! `lb-agent flows`: the load-balancing decisions as they happen (client → frontend →
//! backend, new and closed), from the datapath's `LB_FLOWS` ring buffer, and per-service
//! shares per backend with `--summary`.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use lb_common::{ipv6_bytes, map_names, FlowEvent, FlowEventV6, Ipv6Words, FLOW_CLOSED, FLOW_NEW};

use lb_control::model::Proto;

use super::client;
use crate::{agent::state::FrontendName, datapath::clock::monotonic_ns};

/// Service names by service id, from the agent's `/debug/frontends` (empty if it does not
/// answer: events then show frontends only).
fn names(metrics: SocketAddr) -> BTreeMap<u32, String> {
    let list: Vec<FrontendName> = client::get(metrics, "/debug/frontends")
        .ok()
        .filter(|a| a.status == 200)
        .and_then(|a| serde_json::from_str(&a.body).ok())
        .unwrap_or_default();
    list.into_iter().map(|f| (f.id, f.service)).collect()
}

/// One decision, readable.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Flow {
    pub time: String,
    pub event: &'static str,
    pub proto: String,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    pub service: String,
}

/// The fields of a record of either family, addresses as text (`a.b.c.d:port`, `[v6]:port`).
struct Record {
    ts_ns: u64,
    kind: u8,
    proto: u8,
    svc_id: u32,
    client: String,
    frontend: String,
    backend: String,
}

/// A ring-buffer record: a `FlowEvent` (IPv4) or a `FlowEventV6`, told apart by size.
fn record(bytes: &[u8]) -> Option<Record> {
    let v4 = |a: u32, p: u16| SocketAddr::from((Ipv4Addr::from(a.to_ne_bytes()), u16::from_be(p)));
    let v6 =
        |a: Ipv6Words, p: u16| SocketAddr::from((Ipv6Addr::from(ipv6_bytes(a)), u16::from_be(p)));
    if bytes.len() >= size_of::<FlowEventV6>() {
        let ev: FlowEventV6 = *bytemuck::try_from_bytes(&bytes[..size_of::<FlowEventV6>()]).ok()?;
        return Some(Record {
            ts_ns: ev.ts_ns,
            kind: ev.kind,
            proto: ev.proto,
            svc_id: ev.svc_id,
            client: v6(ev.client_addr, ev.client_port).to_string(),
            frontend: v6(ev.frontend_addr, ev.frontend_port).to_string(),
            backend: v6(ev.backend_addr, ev.backend_port).to_string(),
        });
    }
    let ev: FlowEvent = *bytemuck::try_from_bytes(bytes.get(..size_of::<FlowEvent>())?).ok()?;
    Some(Record {
        ts_ns: ev.ts_ns,
        kind: ev.kind,
        proto: ev.proto,
        svc_id: ev.svc_id,
        client: v4(ev.client_addr, ev.client_port).to_string(),
        frontend: v4(ev.frontend_addr, ev.frontend_port).to_string(),
        backend: v4(ev.backend_addr, ev.backend_port).to_string(),
    })
}

fn decode(bytes: &[u8], names: &BTreeMap<u32, String>) -> Option<Flow> {
    let ev = record(bytes)?;
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(ev.ts_ns));
    let time = jiff::Timestamp::try_from(SystemTime::now() - age)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Some(Flow {
        time,
        event: match ev.kind {
            FLOW_NEW => "new",
            FLOW_CLOSED => "closed",
            _ => "?",
        },
        proto: Proto::from_number(ev.proto).map_or_else(|| ev.proto.to_string(), |p| p.to_string()),
        client: ev.client,
        frontend: ev.frontend,
        backend: ev.backend,
        service: names.get(&ev.svc_id).cloned().unwrap_or_default(),
    })
}

pub struct Options<'a> {
    pub pin: &'a Path,
    pub metrics: SocketAddr,
    /// Keep the flows whose service name or frontend contains this.
    pub filter: Option<&'a str>,
    pub summary: bool,
    pub json: bool,
    /// Stop after this long (None: until interrupted).
    pub duration: Option<Duration>,
}

/// Runs the view, writing to `out`.
pub fn run(opts: &Options<'_>, out: &mut dyn Write) -> Result<()> {
    let data = MapData::from_pin(opts.pin.join(map_names::LB_FLOWS)).with_context(|| {
        format!(
            "opening {} (is an agent running with this --pin-path?)",
            opts.pin.join(map_names::LB_FLOWS).display()
        )
    })?;
    let mut ring = RingBuf::try_from(Map::RingBuf(data))?;
    let mut names = names(opts.metrics);
    let started = Instant::now();
    let mut last_names = Instant::now();
    // frontend (and service) → backend → new flows
    let mut shares: BTreeMap<(String, String), BTreeMap<String, u64>> = BTreeMap::new();
    if !opts.summary && !opts.json {
        writeln!(
            out,
            "{:<31} {:<6} {:<4} {:<21} {:<21} {:<21} SERVICE",
            "TIME", "EVENT", "", "CLIENT", "FRONTEND", "BACKEND"
        )?;
    }
    while opts.duration.is_none_or(|d| started.elapsed() < d) {
        let mut idle = true;
        while let Some(item) = ring.next() {
            idle = false;
            let Some(flow) = decode(&item, &names) else {
                continue;
            };
            if let Some(f) = opts.filter {
                if !flow.service.contains(f) && !flow.frontend.contains(f) {
                    continue;
                }
            }
            if opts.summary {
                if flow.event == "new" {
                    *shares
                        .entry((
                            format!("{}/{}", flow.frontend, flow.proto),
                            flow.service.clone(),
                        ))
                        .or_default()
                        .entry(flow.backend.clone())
                        .or_default() += 1;
                }
            } else if opts.json {
                writeln!(out, "{}", serde_json::to_string(&flow)?)?;
            } else {
                writeln!(
                    out,
                    "{:<31} {:<6} {:<4} {:<21} {:<21} {:<21} {}",
                    flow.time,
                    flow.event,
                    flow.proto,
                    flow.client,
                    flow.frontend,
                    flow.backend,
                    flow.service
                )?;
            }
        }
        out.flush()?;
        if idle {
            std::thread::sleep(Duration::from_millis(20));
        }
        if last_names.elapsed() > Duration::from_secs(5) {
            names = self::names(opts.metrics);
            last_names = Instant::now();
        }
    }
    if opts.summary {
        write_summary(&shares, opts.json, out)?;
    }
    Ok(())
}

fn write_summary(
    shares: &BTreeMap<(String, String), BTreeMap<String, u64>>,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    if json {
        let v: Vec<serde_json::Value> = shares
            .iter()
            .map(|((fe, svc), b)| {
                let total: u64 = b.values().sum();
                serde_json::json!({
                    "frontend": fe, "service": svc, "newFlows": total,
                    "backends": b.iter().map(|(be, n)| serde_json::json!({
                        "backend": be, "newFlows": n, "share": *n as f64 / total.max(1) as f64
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::from(v))?;
        return Ok(());
    }
    for ((fe, svc), b) in shares {
        let total: u64 = b.values().sum();
        writeln!(out, "{fe}  {svc}  ({total} new flows)")?;
        for (be, n) in b {
            let share = *n as f64 / total.max(1) as f64;
            writeln!(
                out,
                "  {be:<21} {n:>6}  {:5.1}%  {}",
                share * 100.0,
                "█".repeat((share * 40.0).round() as usize)
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{ipv6_words, IPPROTO_TCP, IPPROTO_UDP};

    #[test]
    fn records_of_both_families_decode() {
        let names = BTreeMap::from([(7, "default/web:http".to_string())]);
        let v4 = FlowEvent {
            client_addr: u32::from_ne_bytes([10, 244, 1, 11]),
            frontend_addr: u32::from_ne_bytes([10, 96, 0, 10]),
            backend_addr: u32::from_ne_bytes([10, 244, 2, 11]),
            svc_id: 7,
            client_port: 40000u16.to_be(),
            frontend_port: 80u16.to_be(),
            backend_port: 8080u16.to_be(),
            proto: IPPROTO_TCP,
            kind: FLOW_NEW,
            ..FlowEvent::default()
        };
        let f = decode(bytemuck::bytes_of(&v4), &names).expect("v4");
        assert_eq!(
            (
                f.client.as_str(),
                f.frontend.as_str(),
                f.backend.as_str(),
                f.event
            ),
            (
                "10.244.1.11:40000",
                "10.96.0.10:80",
                "10.244.2.11:8080",
                "new"
            )
        );
        assert_eq!(f.service, "default/web:http");
        let a = |s: &str| ipv6_words(s.parse::<Ipv6Addr>().expect("v6").octets());
        let v6 = FlowEventV6 {
            client_addr: a("fd00:10:244:1::b"),
            frontend_addr: a("fd00:10:96::a"),
            backend_addr: a("fd00:10:244:2::b"),
            svc_id: 7,
            client_port: 40000u16.to_be(),
            frontend_port: 53u16.to_be(),
            backend_port: 5353u16.to_be(),
            proto: IPPROTO_UDP,
            kind: FLOW_CLOSED,
            ..FlowEventV6::default()
        };
        let f = decode(bytemuck::bytes_of(&v6), &names).expect("v6");
        assert_eq!(
            (
                f.client.as_str(),
                f.frontend.as_str(),
                f.backend.as_str(),
                f.event
            ),
            (
                "[fd00:10:244:1::b]:40000",
                "[fd00:10:96::a]:53",
                "[fd00:10:244:2::b]:5353",
                "closed"
            )
        );
        assert_eq!(f.proto, "UDP");
        assert!(decode(&[0u8; 12], &names).is_none(), "too short");
    }
}
