//! The developer workflow: `cargo xtask build-ebpf | build-and-load | lab | test | clippy |
//! bench`.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

mod bench;
mod cluster;
mod demo;
mod ebpf_build;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lb_testkit::cluster::Network;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum LabAction {
    /// Build a kind-like cluster in network namespaces (nodes on a bridge, pods, a client
    /// outside, one lb-agent per node, sample Services), print how to reach it, and leave it
    /// running.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Pods per node.
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// How pod traffic crosses between nodes: `bridge` (kindnet: routes via the nodes),
        /// `vxlan` (flannel's flannel.1) or `tunnel` (an L3 device without an Ethernet header,
        /// like Calico IPIP or WireGuard: tun0 and a UDP relay per node).
        #[arg(long, default_value_t = Network::Bridge)]
        network: Network,
        /// IPv4 only. By default the lab is dual-stack, as a kind cluster with `ipFamily:
        /// dual`: node, pod and client IPv6 addresses, IPv6 routes and overlays
        /// (flannel-v6.1 in vxlan), dual-stack Services.
        #[arg(long)]
        ipv4_only: bool,
    },
    /// Remove what `lab up` made (whatever of it is left).
    Down,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the BPF object (lb-ebpf) with the BPF toolchain.
    BuildEbpf,
    /// Build everything, then run the agent with the datapath on IFACE (Ctrl-C to stop; the
    /// datapath stays pinned until `--pin-path` is removed).
    BuildAndLoad {
        #[arg(long)]
        iface: String,
        /// Manifests to program (default: the lab's sample Services).
        #[arg(long)]
        manifests: Option<PathBuf>,
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        pin_path: PathBuf,
    },
    /// The standalone lab demo: a node and its pods in network namespaces, sample Services,
    /// traffic from outside and from a pod, and how it spread over the pods. Cleans up after.
    /// `lab up` / `lab down`: a kind-like cluster of several nodes, left running.
    #[command(args_conflicts_with_subcommands = true)]
    Lab {
        #[command(subcommand)]
        action: Option<LabAction>,
        /// Pods behind the node.
        #[arg(long, default_value_t = 4)]
        pods: usize,
        /// Requests per traffic pattern.
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// Build everything and run every test, the privileged ones included (the README's test
    /// command; needs root).
    Test,
    /// Clippy on every crate, warnings denied: the host crates with all their targets, and
    /// lb-ebpf for the BPF target with the BPF toolchain.
    Clippy,
    /// Compare lb-agent with kube-proxy's iptables and nftables modes and with no service
    /// translation, on the lab: programming time, new connections, requests, throughput,
    /// memory; plus lb-agent's endpoint-change latency and per-packet cost (needs root).
    Bench {
        /// Numbers of Services to measure at (4 endpoints each).
        #[arg(long, value_delimiter = ',', default_value = "1,1000")]
        services: Vec<usize>,
        /// Endpoint changes per size.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Frames per per-packet measurement.
        #[arg(long, default_value_t = 20000)]
        packets: usize,
        /// How long each wrk and iperf3 run lasts (e.g. 5s, 500ms).
        #[arg(long, default_value = "2s", value_parser = bench::parse_duration)]
        duration: std::time::Duration,
        /// wrk's open connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// How long loading kube-proxy's ruleset (iptables-restore, nft -f) may take.
        #[arg(long, default_value = "120s", value_parser = bench::parse_duration)]
        restore_timeout: std::time::Duration,
        /// Where results.md, results.json and results.png go.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Only the in-process measurements (programming, endpoint change, per packet): no
        /// lab, no kube-proxy.
        #[arg(long)]
        in_process_only: bool,
        /// The lab (five datapaths) runs at the sizes up to this; larger ones are measured
        /// in process only (kube-proxy's iptables sync alone takes minutes at 10,000).
        #[arg(long, default_value_t = 10_000)]
        lab_max: usize,
        /// Rounds of new-connection runs over the datapaths (the best is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Endpoints of each Service on the lab, 1 to 4 (the lab's four server pods). With 1,
        /// every datapath sends to the one pod the floor goes to.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=4))]
        endpoints: u8,
    },
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace())
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// `cargo test`, echoed, with one closing line for the whole run: the per-binary
/// `test result:` lines end with doc-test binaries that have no tests.
fn test() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The whole workspace: the privileged tests crate is not a default member, and the
    // privileged unit tests elsewhere are ignored by a plain `cargo test`.
    let mut child = Command::new(&cargo)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--",
            "--include-ignored",
        ])
        .current_dir(workspace())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo} test"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(what), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    println!("all tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("`cargo test` failed ({status})");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf => {
            let obj = ebpf_build::build_ebpf(&workspace()).map_err(anyhow::Error::msg)?;
            println!("{}", obj.display());
            Ok(())
        }
        Cmd::BuildAndLoad {
            iface,
            manifests,
            pin_path,
        } => {
            cargo(&["build", "--release", "--bin", "lb-agent"])?;
            let dir = if let Some(d) = manifests {
                d
            } else {
                let d = std::env::temp_dir().join("lb-build-and-load");
                std::fs::create_dir_all(&d)?;
                let pods = demo::sample_pods(4);
                for (name, text) in lb_testkit::lab::tutorial_manifests(&pods) {
                    std::fs::write(d.join(name), text)?;
                }
                d
            };
            let agent = workspace().join("target/release/lb-agent");
            let status = Command::new(agent)
                .args(["run", "--ext-iface", &iface, "--pod-iface-prefix", ""])
                .arg("--manifests")
                .arg(&dir)
                .arg("--pin-path")
                .arg(&pin_path)
                .status()?;
            if !status.success() {
                bail!("lb-agent exited ({status})");
            }
            Ok(())
        }
        Cmd::Lab {
            action: None,
            pods,
            requests,
        } => {
            cargo(&["build", "--bins"])?;
            demo::run(pods, requests)
        }
        Cmd::Lab {
            action:
                Some(LabAction::Up {
                    nodes,
                    pods,
                    network,
                    ipv4_only,
                }),
            ..
        } => {
            cargo(&["build", "--bins"])?;
            cluster::up(nodes, pods, network, !ipv4_only)
        }
        Cmd::Lab {
            action: Some(LabAction::Down),
            ..
        } => cluster::down(),
        Cmd::Bench {
            services,
            changes,
            packets,
            duration,
            connections,
            restore_timeout,
            out,
            in_process_only,
            lab_max,
            rounds,
            endpoints,
        } => {
            // What is measured includes this process's own work (translation, map writes):
            // measure an optimised build, not the debug one `cargo xtask` runs.
            if cfg!(debug_assertions) {
                // The lab runs lb-agent and lab-server from the same profile.
                cargo(&["build", "--release", "--bins"])?;
                let list: Vec<String> = services.iter().map(usize::to_string).collect();
                let list = list.join(",");
                let out = out.to_string_lossy().into_owned();
                let (changes, packets) = (changes.to_string(), packets.to_string());
                let duration = format!("{}ms", duration.as_millis());
                let connections = connections.to_string();
                let restore_timeout = format!("{}ms", restore_timeout.as_millis());
                let lab_max = lab_max.to_string();
                let rounds = rounds.to_string();
                let endpoints = endpoints.to_string();
                let mut args = vec![
                    "run",
                    "--release",
                    "--quiet",
                    "--package",
                    "xtask",
                    "--",
                    "bench",
                    "--services",
                    &list,
                    "--changes",
                    &changes,
                    "--packets",
                    &packets,
                    "--duration",
                    &duration,
                    "--connections",
                    &connections,
                    "--restore-timeout",
                    &restore_timeout,
                    "--out",
                    &out,
                    "--lab-max",
                    &lab_max,
                    "--rounds",
                    &rounds,
                    "--endpoints",
                    &endpoints,
                ];
                if in_process_only {
                    args.push("--in-process-only");
                }
                return cargo(&args);
            }
            bench::run(&bench::Options {
                services,
                changes,
                packets,
                duration,
                connections,
                restore_timeout,
                out_dir: out,
                in_process_only,
                lab_max,
                rounds,
                endpoints: endpoints as usize,
            })
        }
        Cmd::Test => {
            cargo(&["build", "--bins"])?;
            test()
        }
        Cmd::Clippy => {
            cargo(&[
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            ebpf_build::clippy_ebpf(&workspace()).map_err(anyhow::Error::msg)
        }
    }
}
