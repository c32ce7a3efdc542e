//! `cargo xtask lab`: the standalone demo. A node and its pods in network namespaces, real
//! servers in the pods, `lb-agent run --manifests` on the node with a tutorial's Services,
//! traffic from a client outside the node and from a pod, and a table of how it spread. The
//! lab is dual-stack: every pod has an IPv4 and an IPv6 address, and a dual-stack Service
//! (`dual`) is reached over both families.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_testkit::lab::{
    tutorial_manifests, Lab, LabPod, CLIENT_IP6, HTTP_PORT, NODE_IP, NODE_IP6, NODE_NAME,
};

/// The dual-stack Service: both families' ClusterIPs and the NodePort 30090 on the node's
/// IPv4 and IPv6 addresses, over every pod (an EndpointSlice per family).
fn dual_manifest(pods: &[LabPod]) -> String {
    let slice = |family: &str, addrs: Vec<String>| {
        let mut endpoints = String::new();
        for a in addrs {
            let _ = write!(
                endpoints,
                "\n- {{addresses: [\"{a}\"], nodeName: {NODE_NAME}, conditions: {{ready: true}}}}"
            );
        }
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: dual-{f}, \
             labels: {{kubernetes.io/service-name: dual}}}}\naddressType: {family}\nports: \
             [{{name: http, port: {HTTP_PORT}}}]\nendpoints:{endpoints}\n",
            f = family.to_ascii_lowercase(),
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: dual}}\nspec:\n  type: NodePort\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.30\n  \
         clusterIPs: [10.96.0.30, \"fd00:10:96::30\"]\n  ports:\n  - {{name: http, port: 80, \
         nodePort: 30090}}\n{}{}",
        slice("IPv4", pods.iter().map(|p| p.ip.to_string()).collect()),
        slice("IPv6", pods.iter().map(|p| p.ip6().to_string()).collect()),
    )
}

/// Pod names and addresses as the lab gives them, without creating anything.
pub fn sample_pods(n: usize) -> Vec<LabPod> {
    (1..=n)
        .map(|i| LabPod {
            name: format!("pod{i}"),
            ns: String::new(),
            ip: Ipv4Addr::new(10, 244, 0, 10 + i as u8),
            host_iface: format!("veth{i}"),
        })
        .collect()
}

fn bar(n: usize, total: usize) -> String {
    let width = (n * 40).checked_div(total).unwrap_or(0);
    "█".repeat(width)
}

struct Pattern {
    what: String,
    counts: BTreeMap<String, usize>,
    failed: usize,
}

fn tally(what: String, replies: Vec<Result<String, String>>) -> Pattern {
    let mut counts = BTreeMap::new();
    let mut failed = 0;
    for r in replies {
        match r {
            Ok(body) => {
                let pod = body.split_whitespace().next().unwrap_or("?").to_string();
                *counts.entry(pod).or_insert(0) += 1;
            }
            Err(_) => failed += 1,
        }
    }
    Pattern {
        what,
        counts,
        failed,
    }
}

pub fn run(pods: usize, requests: usize) -> Result<()> {
    if pods == 0 || pods > 200 {
        bail!("--pods must be between 1 and 200");
    }
    println!(
        "Setting up the lab: one node ({NODE_IP}, {NODE_IP6}), {pods} dual-stack pods, a client \
         outside (198.18.0.1, {CLIENT_IP6})..."
    );
    let mut lab = Lab::up(pods)?;
    lab.add_ipv6()?;
    lab.start_servers()?;
    for (name, text) in tutorial_manifests(&lab.pods) {
        lab.write_manifest(&name, &text)?;
    }
    lab.write_manifest("dual.yaml", &dual_manifest(&lab.pods))?;
    lab.start_agent()?;
    lab.wait_healthy(Duration::from_secs(15))?;
    println!(
        "lb-agent is up (manifests in {}).\n",
        lab.dir.join("manifests").display()
    );

    let mut patterns = Vec::new();
    let curl = |lab: &Lab, ns: &str, url: &str| -> Result<Vec<Result<String, String>>> {
        Ok(lab
            .curl_many(ns, url, requests)?
            .into_iter()
            .map(|r| r.map_err(|()| "failed".to_string()))
            .collect())
    };
    let udp = |lab: &Lab, ns: &str, to: SocketAddr| -> Vec<Result<String, String>> {
        (0..requests)
            .map(|i| {
                lab.udp(ns, to, format!("q{i}").as_bytes())
                    .map_err(|e| e.to_string())
            })
            .collect()
    };
    let ext = lab.ext_ns.clone();
    let pod1 = lab.pods[0].ns.clone();
    patterns.push(tally(
        format!("outside → NodePort {NODE_IP}:30080 (web, TCP, curl, a new connection each)"),
        curl(&lab, &ext, &format!("http://{NODE_IP}:30080/"))?,
    ));
    patterns.push(tally(
        "pod1 → ClusterIP 10.96.0.10:80 (web, TCP, curl)".into(),
        curl(&lab, &pod1, "http://10.96.0.10:80/")?,
    ));
    patterns.push(tally(
        format!("outside → NodePort {NODE_IP}:30053 (echo, UDP, a new socket each)"),
        udp(
            &lab,
            &ext,
            SocketAddr::V4(SocketAddrV4::new(NODE_IP, 30053)),
        ),
    ));
    patterns.push(tally(
        "pod1 → ClusterIP 10.96.0.53:53 (echo, UDP)".into(),
        udp(
            &lab,
            &pod1,
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53)),
        ),
    ));
    patterns.push(tally(
        format!("outside → NodePort [{NODE_IP6}]:30090 (dual, TCP over IPv6)"),
        curl(&lab, &ext, &format!("http://[{NODE_IP6}]:30090/"))?,
    ));
    patterns.push(tally(
        "pod1 → ClusterIP 10.96.0.30:80 (dual, its IPv4 ClusterIP)".into(),
        curl(&lab, &pod1, "http://10.96.0.30:80/")?,
    ));
    patterns.push(tally(
        "pod1 → ClusterIP [fd00:10:96::30]:80 (dual, its IPv6 ClusterIP)".into(),
        curl(&lab, &pod1, "http://[fd00:10:96::30]:80/")?,
    ));

    println!("How {requests} requests per pattern spread over the pods:\n");
    for p in &patterns {
        println!("{}", p.what);
        let total: usize = p.counts.values().sum();
        for pod in &lab.pods {
            let n = p.counts.get(&pod.name).copied().unwrap_or(0);
            println!(
                "  {:<6} {:>5}  {:>5.1}%  {}",
                pod.name,
                n,
                100.0 * n as f64 / total.max(1) as f64,
                bar(n, total)
            );
        }
        if p.failed > 0 {
            println!("  failed {:>5}", p.failed);
        }
        println!();
    }

    let hairpin = lab.curl(&pod1, "http://10.96.0.20:80/")?;
    println!(
        "pod1 → its own Service 10.96.0.20:80 (hairpin): answered \"{}\"",
        hairpin.trim()
    );
    let started = Instant::now();
    let refused = lab.curl(&pod1, "http://10.96.0.99:80/");
    println!(
        "pod1 → 10.96.0.99:80 (a Service without endpoints): {}, {} ms after the request",
        match &refused {
            Ok(body) => format!("unexpectedly answered {body:?}"),
            Err(e) => {
                let e = e.to_string();
                match e.find("curl: ") {
                    Some(i) => format!("refused ({})", e[i..].trim()),
                    None => e,
                }
            }
        },
        started.elapsed().as_millis()
    );
    println!("\nOne packet through the datapath (lb-agent trace tcp 198.18.0.1:40000 {NODE_IP}:30080):\n");
    print!(
        "{}",
        lab.agent_cli(&[
            "trace",
            "tcp",
            "198.18.0.1:40000",
            &format!("{NODE_IP}:30080")
        ])?
    );
    let (from6, to6) = (
        format!("[{CLIENT_IP6}]:40000"),
        format!("[{NODE_IP6}]:30090"),
    );
    println!("\nAnd over IPv6 (lb-agent trace tcp {from6} {to6}):\n");
    print!("{}", lab.agent_cli(&["trace", "tcp", &from6, &to6])?);
    println!("\nWhat the datapath holds (lb-agent services --stats):\n");
    println!("{}", lab.services_table().context("lb-agent services")?);

    let failed: usize = patterns.iter().map(|p| p.failed).sum();
    let all_served = patterns.iter().all(|p| p.counts.len() == pods);
    println!("Cleaning up the lab.");
    drop(lab);
    if failed > 0 || !all_served || refused.is_ok() {
        bail!("the demo did not go as it should: {failed} failed requests, every pod served: {all_served}");
    }
    println!("Done: every request answered, every pod served, the lab is gone.");
    Ok(())
}
