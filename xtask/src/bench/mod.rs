//! `cargo xtask bench`: what the datapath and the agent cost, measured on this machine, next
//! to kube-proxy's iptables and nftables modes and to no service translation at all.
//!
//! For each number of Services (4 endpoints each; on the lab `--endpoints`):
//! * in this process ([`micro`]): lb-agent's programming time, endpoint-change latency and
//!   per-packet cost by BPF_PROG_TEST_RUN;
//! * on the lab ([`lab`]), five datapaths, each on a lab of its own, all up at once:
//!   lb-agent (`lb-agent run --manifests`; as by default, and with `--ext-attach xdp`),
//!   kube-proxy's iptables ruleset (`iptables-restore`), its nftables ruleset (`nft -f`), and
//!   straight to the pod: the time to program the Services, new connections per second and their latency with `wrk` and
//!   `Connection: close` (from a pod to the ClusterIP, from outside to the NodePort of the
//!   last-created Service), keep-alive requests per second, iperf3 TCP throughput, and
//!   lb-agent's memory.
//!
//! Results go to a markdown table, JSON and a PNG plot under `bench-results/`. A number that
//! could not be measured is written as missing, with the reason in the JSON.

mod kube_proxy;
mod lab;
mod micro;
mod plot;
mod services;
mod stats;
mod traffic;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use lab::{BenchLab, Datapath};
use traffic::WrkRun;

pub struct Options {
    pub services: Vec<usize>,
    pub changes: usize,
    pub packets: usize,
    /// Per wrk or iperf3 run.
    pub duration: Duration,
    /// wrk's open connections (over 2 threads).
    pub connections: usize,
    /// How long `iptables-restore --noflush` and `nft -f` may take.
    pub restore_timeout: Duration,
    pub out_dir: PathBuf,
    /// Only the in-process measurements (programming, endpoint change, per packet).
    pub in_process_only: bool,
    /// The lab runs at sizes up to this.
    pub lab_max: usize,
    /// Rounds of new-connection runs over the datapaths (the best is reported).
    pub rounds: usize,
    /// Endpoints of each Service on the lab (1-4).
    pub endpoints: usize,
}

/// A duration as `5s`, `500ms` or plain seconds (`5`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num
        .parse()
        .with_context(|| format!("{s:?}: not a duration like 5s"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (ms, s, m)"),
    };
    if !secs.is_finite() || secs <= 0.0 {
        bail!("{s:?}: not a positive duration");
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads BPF programs and builds network namespaces: run it as root");
    }
    let mut rows = Vec::new();
    for &n in &opts.services {
        if n == 0 {
            continue;
        }
        let mut row = micro::measure(n, opts.changes, opts.packets)?;
        let mut datapaths = if !opts.in_process_only && n <= opts.lab_max {
            measure_labs(n, opts)
        } else {
            Map::new()
        };
        for dp in [Datapath::LbAgent, Datapath::LbAgentXdp] {
            if let Some(v) = datapaths.get_mut(dp.key()) {
                // lb-agent's programming time is the in-process measurement above.
                v["programming_ms"] = row["programming_ms"].clone();
            }
        }
        row["datapaths"] = Value::Object(datapaths);
        rows.push(row);
    }

    let machine = format!(
        "{} CPUs, kernel {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let md = markdown(&rows, &machine, opts)?;
    std::fs::create_dir_all(&opts.out_dir)?;
    write(&opts.out_dir.join("results.md"), &md)?;
    let settings = json!({
        "changes": opts.changes, "packets": opts.packets,
        "duration_s": opts.duration.as_secs_f64(), "connections": opts.connections,
        "restore_timeout_s": opts.restore_timeout.as_secs_f64(),
        "rounds": opts.rounds, "lab_max": opts.lab_max, "lab_endpoints": opts.endpoints,
    });
    write(
        &opts.out_dir.join("results.json"),
        &serde_json::to_string_pretty(
            &json!({"machine": machine, "settings": settings, "results": rows}),
        )?,
    )?;
    if let Err(e) = plot::draw(&rows, &opts.out_dir.join("results.png"), opts.endpoints) {
        eprintln!("bench: no plot: {e:#}");
    }
    print!("{md}");
    Ok(())
}

/// Stores what `f` measured under `key`, or the reason it could not.
fn attempt(v: &mut Value, key: &str, f: impl FnOnce() -> Result<Value>) {
    v[key] = f().unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
}

/// One datapath on a lab of its own, programmed and answering.
struct Ready {
    dp: Datapath,
    lab: BenchLab,
    targets: lab::Targets,
    /// What was measured so far (programming time, memory, ...).
    v: Value,
}

/// Builds a lab for `dp`, programs the Services and checks both clients get an answer.
fn prepare(dp: Datapath, n: usize, opts: &Options) -> Result<Ready> {
    let mut b = BenchLab::up()?;
    let set = lab::service_set(n, &b.endpoints(opts.endpoints));
    let mut v = json!({});
    match dp {
        Datapath::Pod => {}
        Datapath::LbAgent | Datapath::LbAgentXdp => {
            let xdp = (dp == Datapath::LbAgentXdp).then_some("xdp");
            let (ready, mem) = b.start_agent(&set, xdp)?;
            v["agent_ready_ms"] = json!(ready.as_secs_f64() * 1000.0);
            v["memory_kib"] = json!({"vm_rss": mem.vm_rss_kib, "vm_hwm": mem.vm_hwm_kib});
        }
        Datapath::Iptables => {
            let (synced, plain) = b.load_iptables(&set, opts.restore_timeout)?;
            match synced {
                Some(t) => v["programming_ms"] = json!(t.as_secs_f64() * 1000.0),
                None => {
                    v["programming_ms"] = json!({"error": format!(
                        "iptables-restore --noflush did not finish within {:?}",
                        opts.restore_timeout
                    )});
                }
            }
            if let Some(t) = plain {
                v["plain_restore_ms"] = json!(t.as_secs_f64() * 1000.0);
            }
        }
        Datapath::Nftables => {
            v["programming_ms"] =
                json!(b.load_nft(&set, opts.restore_timeout)?.as_secs_f64() * 1000.0);
        }
    }
    let targets = b.targets(dp, &set)?;
    let a = b
        .ask(&b.client().ns, targets.http_inside)
        .context("from the client pod")?;
    let o = b
        .ask(&b.lab.ext_ns, targets.http_outside)
        .context("from outside")?;
    v["answered_by"] = json!([a, o]);
    Ok(Ready {
        dp,
        lab: b,
        targets,
        v,
    })
}

/// The run with the best rate out of `runs` (wrk JSON), with every run's rate beside it.
/// On a shared 2-CPU machine noise only ever slows a run down, and the netfilter datapaths'
/// later rounds can lose connections to their own conntrack: a client that goes round its
/// ports meets tuples still in TIME_WAIT there (seen: a third of the first round's rate).
fn best_run(mut runs: Vec<Value>) -> Result<Value> {
    let rate = |v: &Value| num(v, &["per_second"]).unwrap_or(0.0);
    runs.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    let rates: Vec<f64> = runs.iter().map(rate).collect();
    let mut best = runs.last().cloned().context("no run measured")?;
    best["rounds"] = json!(rates);
    Ok(best)
}

/// The datapaths side by side, each on a lab of its own, all labs up at once: the
/// new-connection runs go round the datapaths `opts.rounds` times (so that every datapath
/// samples the same stretches of a noisy machine) and each reports its best round; then
/// keep-alive and iperf3 once each.
fn measure_labs(n: usize, opts: &Options) -> Map<String, Value> {
    let mut out = Map::new();
    let mut ready = Vec::new();
    for dp in Datapath::ALL {
        eprintln!("{n} services: {}", dp.title());
        match prepare(dp, n, opts) {
            Ok(r) => ready.push(r),
            Err(e) => {
                out.insert(dp.key().into(), json!({"error": format!("{e:#}")}));
            }
        }
    }
    let wrk = |ns: &str, to, close| -> Result<Value> {
        let w = traffic::wrk(&WrkRun {
            ns,
            to,
            duration: opts.duration,
            threads: 2,
            connections: opts.connections,
            close,
        })?;
        Ok(w.to_json())
    };
    let mut runs: Vec<[Vec<Value>; 2]> = ready.iter().map(|_| [vec![], vec![]]).collect();
    let mut failed: Vec<[Option<String>; 2]> = ready.iter().map(|_| [None, None]).collect();
    for round in 0..opts.rounds.max(1) {
        eprintln!("{n} services: new connections, round {}", round + 1);
        for (i, r) in ready.iter().enumerate() {
            let from = [r.lab.client().ns.clone(), r.lab.lab.ext_ns.clone()];
            let to = [r.targets.http_inside, r.targets.http_outside];
            for k in 0..2 {
                match wrk(&from[k], to[k], true) {
                    Ok(v) => runs[i][k].push(v),
                    Err(e) => failed[i][k] = Some(format!("{e:#}")),
                }
            }
        }
    }
    for (i, mut r) in ready.into_iter().enumerate() {
        let keys = ["new_connections_inside", "new_connections_outside"];
        for k in 0..2 {
            let got = std::mem::take(&mut runs[i][k]);
            let why = failed[i][k].take();
            attempt(&mut r.v, keys[k], || match why {
                Some(e) => bail!(e),
                None => best_run(got),
            });
        }
        let (inside, outside) = (r.lab.client().ns.clone(), r.lab.lab.ext_ns.clone());
        let t = r.targets;
        attempt(&mut r.v, "keepalive_inside", || {
            wrk(&inside, t.http_inside, false)
        });
        attempt(&mut r.v, "iperf_inside", || {
            Ok(traffic::iperf3(&inside, t.iperf_inside, opts.duration)?.to_json())
        });
        attempt(&mut r.v, "iperf_outside", || {
            Ok(traffic::iperf3(&outside, t.iperf_outside, opts.duration)?.to_json())
        });
        out.insert(r.dp.key().into(), r.v);
    }
    out
}

/// A number at `path` in `v`, if it was measured.
fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// The per-packet cells of an in-process row (or of its `ipv6` part): empty, hit, hit − empty,
/// and the one-frame-per-run triple.
fn per_packet_cells(r: &Value) -> String {
    let over = num(r, &["conntrack_hit_ns"])
        .zip(num(r, &["empty_program_ns"]))
        .map(|(h, e)| h - e);
    format!(
        "{} | {} | {} | {} / {} / {}",
        cell(num(r, &["empty_program_ns"]), 0),
        cell(num(r, &["conntrack_hit_ns"]), 0),
        cell(over, 0),
        cell(num(r, &["empty_program_single_run_ns"]), 0),
        cell(num(r, &["conntrack_hit_single_run_ns"]), 0),
        cell(num(r, &["new_flow_ns"]), 0),
    )
}

fn cell(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(x) => format!("{x:.decimals$}"),
        None => "missing".into(),
    }
}

/// `rate (p50 / p99 ms)` of a wrk result, with its error count when there were errors.
fn wrk_cell(v: &Value) -> String {
    let Some(rate) = num(v, &["per_second"]) else {
        return "missing".into();
    };
    let mut s = format!(
        "{rate:.0} ({} / {})",
        cell(num(v, &["latency_ms", "p50"]), 2),
        cell(num(v, &["latency_ms", "p99"]), 2)
    );
    if let Some(e) = num(v, &["errors"]).filter(|e| *e > 0.0) {
        let _ = write!(s, ", {e:.0} errors");
    }
    s
}

fn markdown(rows: &[Value], machine: &str, opts: &Options) -> Result<String> {
    let mut md = String::new();
    writeln!(md, "## lb-agent in process\n")?;
    writeln!(md, "| Services | family | programming (ms) | endpoint change p50 / p99 (ms) | empty XDP (ns) | conntrack hit (ns) | hit − empty (ns) | one frame per run: empty / hit / new flow (ns) |")?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|")?;
    for r in rows {
        writeln!(
            md,
            "| {} | IPv4 | {} | {} / {} | {} |",
            r["services"],
            cell(num(r, &["programming_ms"]), 1),
            cell(num(r, &["endpoint_change_p50_ms"]), 2),
            cell(num(r, &["endpoint_change_p99_ms"]), 2),
            per_packet_cells(r),
        )?;
        // IPv6: the same per-packet measurements on as many IPv6 frontends, written to the
        // maps directly (no programming time of their own).
        let v6 = &r["ipv6"];
        match v6.get("error").and_then(Value::as_str) {
            Some(e) => writeln!(
                md,
                "| {} | IPv6 | — | — | not measured: {} |  |  |  |",
                r["services"],
                e.replace('|', "/")
            )?,
            None if v6.is_object() => writeln!(
                md,
                "| {} | IPv6 | — | — | {} |",
                r["services"],
                per_packet_cells(v6),
            )?,
            None => {}
        }
    }

    let mut failures = Vec::new();
    // The lab's sections, for the sizes the lab ran at.
    let lab_rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["datapaths"].as_object().is_some_and(|d| !d.is_empty()))
        .collect();
    if !lab_rows.is_empty() {
        writeln!(md, "\n## The datapaths on the lab\n")?;
        writeln!(md, "| Services | datapath | programming (ms) | new conn/s pod → ClusterIP (p50 / p99 ms) | new conn/s outside → NodePort (p50 / p99 ms) | keep-alive req/s pod → ClusterIP | iperf3 pod → ClusterIP (Gbit/s) | iperf3 outside → NodePort (Gbit/s) |")?;
        writeln!(md, "|---:|---|---:|---:|---:|---:|---:|---:|")?;
        for r in &lab_rows {
            for dp in Datapath::ALL {
                let v = &r["datapaths"][dp.key()];
                if let Some(e) = v.get("error") {
                    failures.push(format!("{} Services, {}: {e}", r["services"], dp.title()));
                }
                for (k, m) in v.as_object().into_iter().flatten() {
                    if let Some(e) = m.get("error") {
                        failures.push(format!(
                            "{} Services, {}, {k}: {e}",
                            r["services"],
                            dp.title()
                        ));
                    }
                }
                let programming = match (dp, num(v, &["plain_restore_ms"])) {
                    (Datapath::Pod, _) => "—".to_string(),
                    (_, Some(plain)) => format!(
                        "{} (> {:.0} s; plain restore {plain:.0})",
                        cell(num(v, &["programming_ms"]), 1),
                        opts.restore_timeout.as_secs_f64()
                    ),
                    _ => cell(num(v, &["programming_ms"]), 1),
                };
                writeln!(
                    md,
                    "| {} | {} | {programming} | {} | {} | {} | {} | {} |",
                    r["services"],
                    dp.title(),
                    wrk_cell(&v["new_connections_inside"]),
                    wrk_cell(&v["new_connections_outside"]),
                    cell(num(v, &["keepalive_inside", "per_second"]), 0),
                    cell(num(v, &["iperf_inside", "gbit_per_second"]), 2),
                    cell(num(v, &["iperf_outside", "gbit_per_second"]), 2),
                )?;
            }
        }

        writeln!(md, "\n## lb-agent against the others (new connections per second, pod → ClusterIP; outside → NodePort)\n")?;
        writeln!(md, "| Services | ÷ iptables | ÷ nftables | ÷ straight to pod | XDP on the uplink ÷ straight to pod | lb-agent start → programmed (ms) | lb-agent VmRSS / VmHWM (MiB) |")?;
        writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
        for r in &lab_rows {
            let d = &r["datapaths"];
            let rate = |dp: Datapath, which: &str| num(&d[dp.key()], &[which, "per_second"]);
            let ratios_of = |dp: Datapath, other: Datapath| {
                ["new_connections_inside", "new_connections_outside"]
                    .map(|w| cell(stats::ratio(rate(dp, w), rate(other, w)), 2))
                    .join("; ")
            };
            let ratios = |other: Datapath| ratios_of(Datapath::LbAgent, other);
            let mib = |k: &str| num(&d["lb-agent"], &["memory_kib", k]).map(|x| x / 1024.0);
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} / {} |",
                r["services"],
                ratios(Datapath::Iptables),
                ratios(Datapath::Nftables),
                ratios(Datapath::Pod),
                ratios_of(Datapath::LbAgentXdp, Datapath::Pod),
                cell(num(&d["lb-agent"], &["agent_ready_ms"]), 0),
                cell(mib("vm_rss"), 1),
                cell(mib("vm_hwm"), 1),
            )?;
        }
    }
    if !failures.is_empty() {
        writeln!(md, "\nNot measured:\n")?;
        for f in &failures {
            writeln!(md, "* {f}")?;
        }
    }
    writeln!(
        md,
        "\nMeasured on {machine}; {} endpoint changes and {} packets per size in process; on the \
         lab (five labs up at once; lb-agent attaches the lab's veth uplink in TC by default, \
         and with XDP in its own row; {} endpoint(s) per Service), wrk with 2 threads and {} connections and iperf3, {:.0} s \
         each, the new-connection runs {} rounds over the datapaths, the best round shown. Programming: \
         lb-agent's translation and map writes in process, `iptables-restore --noflush` and \
         `nft -f` of kube-proxy's full ruleset, each timed as a whole. Per-packet times are the \
         kernel's BPF_PROG_TEST_RUN timing: the empty program and a conntrack hit 1,000 runs of \
         one frame per call (a flow of a Service whose endpoint is its own address, so the \
         frame stays as it was), and, with the clock read around every run, one frame per \
         call; new flows (SYNs of distinct flows to the last Service) one frame per call. \
         The IPv6 rows measure the same on as many IPv6 ClusterIP frontends, written straight \
         into the LB6 maps (4 local backends each; no programming of their own).",
        opts.changes,
        opts.packets,
        opts.endpoints,
        opts.connections,
        opts.duration.as_secs_f64(),
        opts.rounds.max(1)
    )?;
    Ok(md)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The lab tests and the smoke run take the lab's namespaces and the machine's 2 CPUs: one
/// at a time.
#[cfg(test)]
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
fn lab_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_round_is_reported_with_all_rounds() {
        let run = |r: f64| json!({"per_second": r, "latency_ms": {"p50": r / 1000.0}});
        let m = best_run(vec![run(200.0), run(300.0), run(100.0)]).expect("best");
        assert_eq!(m["per_second"], json!(300.0));
        assert_eq!(
            m["latency_ms"]["p50"],
            json!(0.3),
            "the best run's own latencies"
        );
        assert_eq!(m["rounds"], json!([100.0, 200.0, 300.0]));
        assert!(best_run(vec![]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").ok(), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("5").ok(), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_duration("500ms").ok(),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("1m").ok(), Some(Duration::from_mins(1)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5h").is_err());
    }

    /// A tiny run: the benchmark works end to end, every datapath answers, and the numbers
    /// make sense.
    #[test]
    #[ignore = "privileged (root, network namespaces): `cargo xtask test` runs it"]
    fn smoke() {
        lb_testkit::require_root();
        let _turn = lab_turn();
        let out = std::env::temp_dir().join(format!("lb-bench-smoke-{}", std::process::id()));
        run(&Options {
            services: vec![1, 20, 50],
            changes: 4,
            packets: 2000,
            duration: Duration::from_secs(1),
            connections: 4,
            restore_timeout: Duration::from_mins(1),
            out_dir: out.clone(),
            in_process_only: false,
            lab_max: 20,
            rounds: 2,
            endpoints: 4,
        })
        .expect("bench");
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("json"))
                .expect("valid json");
        let rows = v["results"].as_array().expect("results");
        assert_eq!(rows.len(), 3);
        for r in rows {
            for k in [
                "programming_ms",
                "endpoint_change_p99_ms",
                "empty_program_ns",
                "conntrack_hit_ns",
                "new_flow_ns",
            ] {
                let x = r[k].as_f64().unwrap_or(-1.0);
                assert!(x > 0.0, "{k} = {x} in {r}");
            }
            // The translating program does more than the empty one.
            assert!(
                r["conntrack_hit_ns"].as_f64() > r["empty_program_ns"].as_f64(),
                "{r}"
            );
            if r["services"].as_u64() > Some(20) {
                // Above --lab-max: in process only.
                assert_eq!(r["datapaths"], serde_json::json!({}), "{r}");
                continue;
            }
            for dp in Datapath::ALL {
                let d = &r["datapaths"][dp.key()];
                for k in [
                    "new_connections_inside",
                    "new_connections_outside",
                    "keepalive_inside",
                ] {
                    let rate = num(d, &[k, "per_second"]).unwrap_or(-1.0);
                    assert!(rate > 0.0, "{} {k}: {d}", dp.key());
                    if k != "keepalive_inside" {
                        let rounds = d[k]["rounds"].as_array().map(Vec::len);
                        assert_eq!(rounds, Some(2), "{} {k}: {d}", dp.key());
                    }
                }
                for k in ["iperf_inside", "iperf_outside"] {
                    let g = num(d, &[k, "gbit_per_second"]).unwrap_or(-1.0);
                    assert!(g > 0.0, "{} {k}: {d}", dp.key());
                }
                if dp != Datapath::Pod {
                    assert!(num(d, &["programming_ms"]).unwrap_or(-1.0) > 0.0, "{d}");
                }
            }
            let mem = num(&r["datapaths"]["lb-agent"], &["memory_kib", "vm_hwm"]).unwrap_or(0.0);
            assert!(mem > 1000.0, "lb-agent VmHWM {mem} KiB");
        }
        let md = std::fs::read_to_string(out.join("results.md")).expect("md");
        assert!(md.contains("| 20 | kube-proxy nftables |"), "{md}");
        assert!(md.contains("\n| 50 | "), "{md}");
        assert!(!md.contains("| 50 | lb-agent"), "{md}");
        assert!(!md.contains("Not measured"), "{md}");
        let png = std::fs::read(out.join("results.png")).expect("png");
        assert_eq!(&png[1..4], b"PNG");
        let _ = std::fs::remove_dir_all(&out);
    }
}
