//! `lb-agent flows`: the load-balancing decisions as they happen (client → frontend →
//! backend, new and closed), from the datapath's `LB_FLOWS` ring buffer, and per-service
//! shares per backend with `--summary`.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, RingBuf};
use lb_common::{map_names, FlowEvent, FLOW_CLOSED, FLOW_NEW};

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

fn decode(bytes: &[u8], names: &BTreeMap<u32, String>) -> Option<Flow> {
    let ev: FlowEvent = *bytemuck::try_from_bytes(bytes.get(..size_of::<FlowEvent>())?).ok()?;
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(ev.ts_ns));
    let time = jiff::Timestamp::try_from(SystemTime::now() - age)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let addr = |a: u32, p: u16| format!("{}:{}", Ipv4Addr::from(a.to_ne_bytes()), u16::from_be(p));
    Some(Flow {
        time,
        event: match ev.kind {
            FLOW_NEW => "new",
            FLOW_CLOSED => "closed",
            _ => "?",
        },
        proto: Proto::from_number(ev.proto).map_or_else(|| ev.proto.to_string(), |p| p.to_string()),
        client: addr(ev.client_addr, ev.client_port),
        frontend: addr(ev.frontend_addr, ev.frontend_port),
        backend: addr(ev.backend_addr, ev.backend_port),
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
