//! `cargo xtask bench`: what the datapath and the agent cost, measured on this machine.
//!
//! For each number of Services (4 endpoints each):
//! * programming: Kubernetes objects → translation → the real pinned maps, from empty;
//! * endpoint change: one EndpointSlice changes, the whole state is translated again and the
//!   difference written (p50 / p99 over many changes);
//! * per packet: the real XDP program on a new-flow SYN and on a conntrack hit, next to an
//!   XDP program that does nothing, by BPF_PROG_TEST_RUN (the kernel's own timing, one frame
//!   per run, many runs).
//!
//! Results go to a markdown table and JSON under `bench-results/`. Not measured yet: the
//! comparison with kube-proxy's iptables and nftables modes and real connections (wrk, iperf3).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use lb_tests::PinDir;
use lb_userspace::{
    bpf::{Datapath, PinnedMaps, EBPF_OBJECT},
    manifests::Objects,
    packet::{Frame, ACK, SYN},
    reconcile::Reconciler,
    translate::{translate, NodeInfo},
};
use serde_json::json;

fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

fn endpoint_ip(i: usize, e: usize) -> Ipv4Addr {
    let n = i * 4 + e;
    Ipv4Addr::new(10, 244 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// `n` ClusterIP Services with 4 endpoints each, as the API server would hand them over.
fn objects(n: usize, generation: usize) -> Result<Objects> {
    let mut o = Objects::default();
    for i in 0..n {
        o.services.push(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
            "spec": {"clusterIP": service_ip(i).to_string(), "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?);
        // Endpoint 0 of the changed Service alternates between two addresses.
        let eps: Vec<_> = (0..4)
            .map(|e| {
                let ip = if i == n - 1 && e == 0 && generation % 2 == 1 {
                    Ipv4Addr::new(10, 255, 0, 1)
                } else {
                    endpoint_ip(i, e)
                };
                json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": "bench-node"})
            })
            .collect();
        o.slices.push(serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{i}-abc"), "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps,
        }))?);
    }
    Ok(o)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Average kernel-measured time of one run of `prog` over `frames` (one frame per run).
fn per_packet(prog: &Xdp, frames: &[Vec<u8>]) -> Result<f64> {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 256];
    for f in frames {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(f);
        opts.data_out = Some(&mut out);
        total += prog.test_run(opts).context("BPF_PROG_TEST_RUN")?.duration;
    }
    Ok(total.as_nanos() as f64 / frames.len().max(1) as f64)
}

pub struct Options {
    pub services: Vec<usize>,
    pub changes: usize,
    pub packets: usize,
    pub out_dir: PathBuf,
}

pub fn run(opts: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    let node = NodeInfo {
        name: "bench-node".into(),
        addresses: vec![Ipv4Addr::new(198, 18, 0, 2)],
        zone: None,
    };
    let mut rows = Vec::new();
    for &n in &opts.services {
        if n == 0 {
            continue;
        }
        let pin = PinDir::new("bench");
        let datapath = Datapath::load(
            pin.path(),
            lb_userspace::bpf::MapSizes {
                conntrack: 262_144,
                ..Default::default()
            },
        )?;
        let mut reconciler = Reconciler::new(PinnedMaps::open(pin.path())?)?;
        let base = objects(n, 0)?;
        let started = Instant::now();
        let t = translate(&base, &node);
        reconciler.apply(&t.desired)?;
        let programming = started.elapsed();

        let mut changes = Vec::with_capacity(opts.changes);
        let variants = [objects(n, 1)?, base];
        for k in 0..opts.changes {
            let objs = &variants[k % 2];
            let started = Instant::now();
            let t = translate(objs, &node);
            let stats = reconciler.apply(&t.desired)?;
            changes.push(started.elapsed());
            if stats.writes == 0 {
                bail!("an endpoint change wrote nothing");
            }
        }
        changes.sort();

        // Per packet, towards the last Service created.
        let vip = service_ip(n - 1);
        let client = Ipv4Addr::new(198, 18, 1, 1);
        let new_flows: Vec<Vec<u8>> = (0..opts.packets)
            .map(|i| Frame::tcp((client, 1024 + (i % 60_000) as u16), (vip, 80), SYN).build())
            .collect();
        let hit = Frame::tcp((client, 65_000), (vip, 80), SYN).build();
        let prog = datapath.xdp();
        per_packet(prog, std::slice::from_ref(&hit))?; // opens the flow
        let hits: Vec<Vec<u8>> = (0..opts.packets)
            .map(|_| Frame::tcp((client, 65_000), (vip, 80), ACK).build())
            .collect();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin.path())
            .load(EBPF_OBJECT)?;
        let pass: &mut Xdp = ebpf
            .program_mut("lb_xdp_pass")
            .context("lb_xdp_pass missing")?
            .try_into()?;
        pass.load()?;
        let empty_ns = per_packet(pass, &hits)?;
        let hit_ns = per_packet(prog, &hits)?;
        let new_ns = per_packet(prog, &new_flows)?;
        rows.push(json!({
            "services": n,
            "programming_ms": programming.as_secs_f64() * 1000.0,
            "endpoint_change_p50_ms": percentile(&changes, 0.5).as_secs_f64() * 1000.0,
            "endpoint_change_p99_ms": percentile(&changes, 0.99).as_secs_f64() * 1000.0,
            "empty_program_ns": empty_ns,
            "conntrack_hit_ns": hit_ns,
            "new_flow_ns": new_ns,
        }));
        eprintln!("{n} services: done");
    }

    let mut md = String::new();
    writeln!(md, "| Services | programming (ms) | endpoint change p50 / p99 (ms) | empty XDP (ns) | conntrack hit (ns) | new flow (ns) |")?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {:.1} | {:.2} / {:.2} | {:.0} | {:.0} | {:.0} |",
            r["services"],
            r["programming_ms"].as_f64().unwrap_or(0.0),
            r["endpoint_change_p50_ms"].as_f64().unwrap_or(0.0),
            r["endpoint_change_p99_ms"].as_f64().unwrap_or(0.0),
            r["empty_program_ns"].as_f64().unwrap_or(0.0),
            r["conntrack_hit_ns"].as_f64().unwrap_or(0.0),
            r["new_flow_ns"].as_f64().unwrap_or(0.0),
        )?;
    }
    let machine = format!(
        "{} CPUs, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    writeln!(
        md,
        "\nMeasured on {machine}; {} endpoint changes and {} packets per size. Per-packet times are \
         the kernel's BPF_PROG_TEST_RUN timing of one frame per run (a debug build of the agent \
         does not change them: the BPF object is always an optimised build).",
        opts.changes, opts.packets
    )?;
    std::fs::create_dir_all(&opts.out_dir)?;
    write(&opts.out_dir.join("results.md"), &md)?;
    write(
        &opts.out_dir.join("results.json"),
        &serde_json::to_string_pretty(&json!({"machine": machine, "results": rows}))?,
    )?;
    print!("{md}");
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny run: the benchmark works end to end and writes numbers that make sense.
    #[test]
    fn smoke() {
        let out = std::env::temp_dir().join(format!("lb-bench-smoke-{}", std::process::id()));
        run(&Options {
            services: vec![1, 20],
            changes: 4,
            packets: 50,
            out_dir: out.clone(),
        })
        .expect("bench");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("json"))
                .expect("valid json");
        let rows = v["results"].as_array().expect("results");
        assert_eq!(rows.len(), 2);
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
        }
        let md = std::fs::read_to_string(out.join("results.md")).expect("md");
        assert!(md.contains("| 20 |"), "{md}");
        let _ = std::fs::remove_dir_all(&out);
    }
}
