//! The reachability matrix in a two-node, kind-like lab (`lb_testkit::cluster`): pods, node
//! host namespaces and a client outside the cluster send TCP and UDP to ClusterIPs,
//! NodePorts, externalIPs and LoadBalancer IPs, and each row checks which backend answered,
//! which source address it saw and, for host clients, what their socket says it talked to.
//! The matrix is printed as a markdown table. Needs root and the workspace's binaries
//! (`cargo build`).
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_testkit::{
    cluster::{
        node_ip, pod_gateway, pod_ip, services::*, Cluster, ClusterConfig, ClusterState, Origin,
        Outcome, Proto, CLIENT_IP, DENIED_CLIENT_IP, HAIRPIN_SNAT_IP,
    },
    require_root,
};

/// Rows time out on purpose (drops): one cluster at a time on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock poisons it; the next may still run.
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long an answer may take, and how long a drop is waited for.
const ANSWER: Duration = Duration::from_secs(2);
const DROP: Duration = Duration::from_millis(1500);
/// Requests in flight at once.
const PARALLEL: usize = 8;

#[derive(Clone, Debug)]
enum Expect {
    /// An answer from a pod of `node`, which saw one of `sources`; if `peer`, the client's
    /// socket names the address it sent to (getpeername / recvfrom).
    Answer {
        node: usize,
        sources: Vec<Ipv4Addr>,
        peer: bool,
    },
    /// Dropped: no answer (a timeout, not a refusal).
    Dropped,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Answer {
                node,
                sources,
                peer,
            } => {
                let s: Vec<String> = sources.iter().map(Ipv4Addr::to_string).collect();
                write!(f, "node{node} sees {}", s.join(" or "))?;
                if *peer {
                    f.write_str("; peer = destination")?;
                }
                Ok(())
            }
            Expect::Dropped => f.write_str("dropped (timeout)"),
        }
    }
}

#[derive(Clone, Debug)]
struct Row {
    client: String,
    origin: Origin,
    destination: String,
    proto: Proto,
    to: SocketAddrV4,
    expect: Expect,
    /// The node the client's routes send externalIPs and LoadBalancer IPs through.
    vips_via: usize,
}

struct Result_ {
    row: Row,
    outcome: Outcome,
    pass: bool,
}

fn check(row: &Row, outcome: &Outcome, cluster: &Cluster) -> bool {
    match (&row.expect, outcome) {
        (
            Expect::Answer {
                node,
                sources,
                peer: want_peer,
            },
            Outcome::Reply {
                peer,
                backend,
                seen,
            },
        ) => {
            let SocketAddr::V4(seen) = seen else {
                return false;
            };
            cluster.node_of(backend) == Some(*node)
                && sources.contains(seen.ip())
                && (!want_peer || *peer == SocketAddr::V4(row.to))
        }
        (Expect::Dropped, Outcome::Timeout) => true,
        _ => false,
    }
}

/// The same row over TCP and UDP: `dst` is (address, TCP port, UDP port).
fn both(
    rows: &mut Vec<Row>,
    client: &str,
    origin: Origin,
    destination: &str,
    (ip, tcp, udp): (Ipv4Addr, u16, u16),
    expect: Expect,
    vips_via: usize,
) {
    for (proto, port) in [(Proto::Tcp, tcp), (Proto::Udp, udp)] {
        rows.push(Row {
            client: client.to_string(),
            origin: origin.clone(),
            destination: destination.to_string(),
            proto,
            to: SocketAddrV4::new(ip, port),
            expect: expect.clone(),
            vips_via,
        });
    }
}

fn at(ip: Ipv4Addr, (tcp, udp): (u16, u16)) -> (Ipv4Addr, u16, u16) {
    (ip, tcp, udp)
}

fn answer(node: usize, sources: &[Ipv4Addr]) -> Expect {
    Expect::Answer {
        node,
        sources: sources.to_vec(),
        peer: false,
    }
}

fn matrix() -> Vec<Row> {
    let mut rows = Vec::new();
    let pod = |name: &str| Origin::Pod(name.to_string());
    let outside = Origin::Outside(CLIENT_IP);
    let denied = Origin::Outside(DENIED_CLIENT_IP);
    let svc = (80, 53);
    let on_node_ports = |k: usize| (on_node_tcp(k), on_node_udp(k));
    let node1_addrs = [node_ip(1), pod_gateway(1)];

    // Pods → ClusterIP.
    let n1p2 = pod_ip(1, 2);
    #[rustfmt::skip]
    let pod_rows = [
        ("pod node1-pod2", "node1-pod2", "ClusterIP on-node1 (same node)", on_node(1), 1, n1p2),
        ("pod node1-pod2", "node1-pod2", "ClusterIP on-node2 (other node)", on_node(2), 2, n1p2),
        ("pod node2-pod2", "node2-pod2", "ClusterIP on-node1 (other node)", on_node(1), 1, pod_ip(2, 2)),
        ("pod node1-pod1", "node1-pod1", "ClusterIP self (itself: hairpin)", SELF, 1, HAIRPIN_SNAT_IP),
    ];
    for (client, name, dest, ip, node, seen) in pod_rows {
        both(
            &mut rows,
            client,
            pod(name),
            dest,
            at(ip, svc),
            answer(node, &[seen]),
            1,
        );
    }

    // Node 1's host network namespace (in its cgroup) → ClusterIP and its own NodePorts.
    for (dest, k) in [
        ("ClusterIP on-node1 (local backend)", 1),
        ("ClusterIP on-node2 (remote backend)", 2),
    ] {
        let expect = Expect::Answer {
            node: k,
            sources: node1_addrs.to_vec(),
            peer: true,
        };
        both(
            &mut rows,
            "host node1",
            Origin::Node(1),
            dest,
            at(on_node(k), svc),
            expect,
            1,
        );
    }
    for (dest, k) in [
        ("own NodePort on-node1 (local backend)", 1),
        ("own NodePort on-node2 (remote backend)", 2),
    ] {
        let expect = answer(k, &node1_addrs);
        let ports = on_node_ports(k);
        both(
            &mut rows,
            "host node1",
            Origin::Node(1),
            dest,
            at(node_ip(1), ports),
            expect,
            1,
        );
    }

    // Outside → NodePorts (externalTrafficPolicy Cluster).
    for (node, backend) in [(1, 1), (2, 2), (1, 2), (2, 1)] {
        let (what, seen) = if node == backend {
            ("local backend", CLIENT_IP)
        } else {
            ("remote backend", node_ip(node))
        };
        let dest = format!("node{node} NodePort on-node{backend} ({what})");
        let ports = on_node_ports(backend);
        let expect = answer(backend, &[seen]);
        both(
            &mut rows,
            "outside",
            outside.clone(),
            &dest,
            at(node_ip(node), ports),
            expect,
            1,
        );
    }

    // Outside → externalIP and LoadBalancer IP (endpoint on node 1), through each node.
    for (name, ip) in [("externalIP", EXTERNAL_IP), ("LB IP", LB_IP)] {
        for (via, seen) in [(1, CLIENT_IP), (2, node_ip(2))] {
            let what = if via == 1 { "local" } else { "remote" };
            let dest = format!("{name} {ip} via node{via} ({what} backend)");
            let expect = answer(1, &[seen]);
            both(
                &mut rows,
                "outside",
                outside.clone(),
                &dest,
                at(ip, svc),
                expect,
                via,
            );
        }
    }

    // externalTrafficPolicy Local, endpoints on node 1 only.
    let local_ports = (LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP);
    let client = answer(1, &[CLIENT_IP]);
    #[rustfmt::skip]
    let local_rows = [
        ("ETP Local: node1 NodePort (has endpoints)", node_ip(1), local_ports, client.clone(), 1),
        ("ETP Local: node2 NodePort (no local endpoint)", node_ip(2), local_ports, Expect::Dropped, 1),
        ("ETP Local: LB IP via node1 (has endpoints)", LOCAL_LB_IP, svc, client, 1),
        ("ETP Local: LB IP via node2 (no local endpoint)", LOCAL_LB_IP, svc, Expect::Dropped, 2),
    ];
    for (dest, ip, ports, expect, via) in local_rows {
        both(
            &mut rows,
            "outside",
            outside.clone(),
            dest,
            at(ip, ports),
            expect,
            via,
        );
    }
    let n2p1 = pod_ip(2, 1);
    for (dest, ip, ports) in [
        ("ETP Local: own node2's NodePort", node_ip(2), local_ports),
        ("ETP Local: LB IP", LOCAL_LB_IP, svc),
    ] {
        let expect = answer(1, &[n2p1]);
        both(
            &mut rows,
            "pod node2-pod1",
            pod("node2-pod1"),
            dest,
            at(ip, ports),
            expect,
            1,
        );
    }

    // loadBalancerSourceRanges: the LB IP for allowed sources only; NodePorts for all.
    let dest = "source ranges: LB IP via node1 (source not allowed)";
    both(
        &mut rows,
        "outside 172.18.0.200",
        denied.clone(),
        dest,
        at(LB_IP, svc),
        Expect::Dropped,
        1,
    );
    let dest = "source ranges: node1 NodePort of the same Service";
    let ports = (LB_NODEPORT_TCP, LB_NODEPORT_UDP);
    let expect = answer(1, &[DENIED_CLIENT_IP]);
    both(
        &mut rows,
        "outside 172.18.0.200",
        denied,
        dest,
        at(node_ip(1), ports),
        expect,
        1,
    );
    rows
}

/// Runs `rows` with at most PARALLEL requests in flight.
fn run_rows(cluster: &Cluster, rows: Vec<Row>) -> Vec<Result_> {
    let mut results = Vec::new();
    for chunk in rows.chunks(PARALLEL) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|row| {
                    s.spawn(move || {
                        let timeout = match row.expect {
                            Expect::Dropped => DROP,
                            Expect::Answer { .. } => ANSWER,
                        };
                        cluster.request(&row.origin, row.proto, row.to, timeout)
                    })
                })
                .collect();
            for (row, h) in chunk.iter().zip(handles) {
                let outcome = h
                    .join()
                    .unwrap_or_else(|_| Outcome::Failed("the request thread panicked".into()));
                let pass = check(row, &outcome, cluster);
                results.push(Result_ {
                    row: row.clone(),
                    outcome,
                    pass,
                });
            }
        });
    }
    results
}

fn table(cluster: &Cluster, results: &[Result_]) -> String {
    let mut t = String::from(
        "| client | destination | proto | backend node | source seen | expected | result |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let (node, seen) = match &r.outcome {
            Outcome::Reply {
                peer,
                backend,
                seen,
            } => {
                let node = cluster
                    .node_of(backend)
                    .map_or_else(|| backend.clone(), |k| format!("node{k} ({backend})"));
                let mut seen = seen.ip().to_string();
                if matches!(r.row.origin, Origin::Node(_)) {
                    seen.push_str(&format!(" (peer {peer})"));
                }
                (node, seen)
            }
            other => ("-".to_string(), other.to_string()),
        };
        t.push_str(&format!(
            "| {} | {} {} | {} | {} | {} | {} | {} |\n",
            r.row.client,
            r.row.destination,
            r.row.to,
            r.row.proto,
            node,
            seen,
            r.row.expect,
            if r.pass { "pass" } else { "FAIL" }
        ));
    }
    t
}

#[test]
fn reachability_matrix() {
    // The default on the nodes' veth uplinks: lb_tc_ext.
    matrix_with(None, "hook=TC ingress");
}

#[test]
fn reachability_matrix_with_xdp_on_the_uplinks() {
    matrix_with(Some("xdp"), "hook=XDP");
}

/// Runs the whole matrix on a cluster whose agents run with `--ext-attach ext_attach`, and
/// checks that each attached its uplink as `hook` says.
fn matrix_with(ext_attach: Option<&'static str>, hook: &str) {
    require_root();
    let _turn = turn();
    let started = Instant::now();
    let mut cfg = ClusterConfig::new(2, 2);
    cfg.ext_attach = ext_attach;
    let mut cluster = Cluster::up_with(cfg).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    let ready = started.elapsed();
    for k in 1..=2 {
        let log = cluster.agent_log(k);
        assert!(
            log.lines()
                .any(|l| l.contains("attached iface=eth0") && l.contains(hook)),
            "node {k}: eth0 not attached with {hook}:\n{log}"
        );
    }

    let rows = matrix();
    let mut results = Vec::new();
    for via in [1, 2] {
        cluster.route_vips_via(via).expect("route");
        let phase: Vec<Row> = rows.iter().filter(|r| r.vips_via == via).cloned().collect();
        results.extend(run_rows(&cluster, phase));
    }
    let passed = results.iter().filter(|r| r.pass).count();
    println!(
        "\nReachability matrix ({passed} of {} rows pass; cluster ready in {:.1} s, all in {:.1} s):\n\n{}",
        results.len(),
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        table(&cluster, &results)
    );
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.pass)
        .map(|r| {
            format!(
                "{} → {} {} {}: {} (expected {})",
                r.row.client, r.row.destination, r.row.to, r.row.proto, r.outcome, r.row.expect
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} rows fail:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}

/// Removes a detached cluster if the test fails before it does.
struct Leftovers(ClusterState);

impl Drop for Leftovers {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

fn leftovers(tag: &str, state: &ClusterState) -> Vec<String> {
    let mut found = Vec::new();
    let netns = lb_testkit::netns::run(&["ip", "netns", "list"]).expect("ip netns list");
    found.extend(
        netns
            .lines()
            .filter(|l| l.starts_with(&format!("{tag}-")))
            .map(|l| format!("namespace {l}")),
    );
    for p in [&state.pins, &state.cgroup, &state.dir, &state.state_file]
        .into_iter()
        .flatten()
    {
        if p.exists() {
            found.push(p.display().to_string());
        }
    }
    found
}

/// What `cargo xtask lab up` and `lab down` do: a cluster whose processes outlive its
/// handle, removed later from its state file alone, twice over.
#[test]
fn a_detached_cluster_is_removed_from_its_state_file() {
    require_root();
    let _turn = turn();
    let tag = format!("lcd{}", std::process::id());
    let state_file = std::env::temp_dir().join(format!("{tag}-state.json"));
    let mut cluster = Cluster::up_with(ClusterConfig {
        tag: Some(tag.clone()),
        detached: true,
        state_file: Some(state_file.clone()),
        ..ClusterConfig::new(2, 1)
    })
    .expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    let guard = Leftovers(cluster.state().clone());
    let node2 = cluster.node(2).expect("node2").clone();
    drop(cluster.detach());

    // Still serving with the handle gone: its processes are in their own sessions.
    let state = ClusterState::load(&state_file)
        .expect("state file")
        .expect("a state file is written");
    assert_eq!(state.tag, tag);
    assert!(node2.pin.exists(), "{}", node2.pin.display());
    let procs = std::fs::read_to_string(node2.cgroup.join("cgroup.procs")).expect("procs");
    assert_eq!(procs.lines().count(), 1, "node2's pod server: {procs}");
    let agents = state.cgroup.as_ref().expect("cgroup").join("agents");
    let procs = std::fs::read_to_string(agents.join("cgroup.procs")).expect("procs");
    assert_eq!(procs.lines().count(), 2, "two agents: {procs}");

    let problems = state.teardown();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(leftovers(&tag, &state), Vec::<String>::new());
    // Again, with everything gone: nothing to do, nothing fails.
    let problems = state.teardown();
    assert!(problems.is_empty(), "{problems:?}");
    drop(guard);
}

/// A cluster dropped after its agents ran leaves nothing behind.
#[test]
fn a_dropped_cluster_leaves_nothing_behind() {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up(2, 1).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    // Traffic across nodes works at all (pods reach each other through the node routes).
    let body = cluster
        .curl(
            &Origin::Pod("node1-pod1".into()),
            &format!("http://{}:8080/", pod_ip(2, 1)),
        )
        .expect("pod to pod across nodes");
    assert!(
        body.starts_with(&format!("node2-pod1 {}:", pod_ip(1, 1))),
        "{body}"
    );
    let (tag, state) = (cluster.tag.clone(), cluster.state().clone());
    drop(cluster);
    assert_eq!(leftovers(&tag, &state), Vec::<String>::new());
}

/// Entries of a node's `LB4_SNAT` (its source-NATed flows).
fn snat_entries(cluster: &Cluster, k: usize) -> usize {
    use aya::maps::{HashMap, Map, MapData};
    use lb_common::{CtEntryV4, CtKeyV4};
    let node = cluster.node(k).expect("node");
    let map = MapData::from_pin(node.pin.join("LB4_SNAT")).expect("LB4_SNAT pinned");
    let map: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(map)).expect("an LRU hash");
    map.keys().count()
}

/// Many connections from one outside client at once, through node 1 to a backend on node 2:
/// each is source-NATed to node 1 with a port of its own (the backend sees distinct
/// node1:port pairs), and once they are closed the agent frees every port.
#[test]
fn many_concurrent_flows_get_distinct_snat_ports_freed_after_close() {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up(2, 1).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    const FLOWS: usize = 300;
    let target = SocketAddrV4::new(node_ip(1), on_node_tcp(2));
    // `trace` of such a flow shows the SNAT and leaves neither conntrack nor a port behind.
    let trace = cluster
        .agent_cli(
            1,
            &[
                "trace",
                "tcp",
                &format!("{CLIENT_IP}:40000"),
                &target.to_string(),
            ],
        )
        .expect("trace");
    assert!(trace.contains(&node_ip(1).to_string()), "{trace}");
    assert_eq!(
        snat_entries(&cluster, 1),
        0,
        "trace left a SNAT entry: {trace}"
    );
    // One process holds all connections open, prints what the backend saw on each, and
    // closes them when told (a line on stdin).
    let script = format!(
        r#"
import socket, sys
socks = []
for i in range({FLOWS}):
    s = socket.create_connection(("{ip}", {port}), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
    data = b""
    while not data.endswith(b"\n") or b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.split(b"\r\n\r\n", 1)[1].decode().strip(), flush=True)
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
print("closed", flush=True)
"#,
        ip = target.ip(),
        port = target.port()
    );
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &cluster.client_ns,
            "python3",
            "-c",
            &script,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 in the client namespace");
    use std::io::{BufRead, Write};
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = std::collections::BTreeSet::new();
    for line in lines.by_ref() {
        let line = line.expect("read");
        if line == "open" {
            break;
        }
        // "<pod> <address:port it saw>"
        let addr: SocketAddrV4 = line
            .split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {line:?}"));
        assert_eq!(*addr.ip(), node_ip(1), "the backend sees node 1: {line}");
        assert!(
            (61000..=65535).contains(&addr.port()),
            "port {} in the SNAT range",
            addr.port()
        );
        assert!(
            seen.insert(addr.port()),
            "SNAT port {} used twice",
            addr.port()
        );
    }
    assert_eq!(
        seen.len(),
        FLOWS,
        "every connection answered on a port of its own"
    );
    let open = snat_entries(&cluster, 1);
    println!(
        "{FLOWS} concurrent connections: {} distinct SNAT ports; LB4_SNAT holds {open} entries",
        seen.len()
    );
    assert!(open >= FLOWS, "one SNAT entry per open flow ({open})");

    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"close\n")
        .expect("tell the client to close");
    assert_eq!(
        lines.next().map(|l| l.expect("read")),
        Some("closed".into())
    );
    let _ = child.wait();
    // Lab agents sweep every second and free closed flows after 2 s.
    let started = Instant::now();
    let mut left = open;
    while started.elapsed() < Duration::from_secs(15) {
        left = snat_entries(&cluster, 1);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "after closing: {left} SNAT entries left after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(left, 0, "SNAT ports leaked after the flows closed");
}

/// Maglev in the lab: the same client address and port reaching the NodePort of node 1 and
/// then of node 2 is answered by the same pod (4 pods over 2 nodes), for every port tried.
#[test]
fn a_flow_keeps_its_backend_whichever_node_it_arrives_at() {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up(2, 2).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    const PORTS: u16 = 20;
    let script = format!(
        r#"
import socket
def ask(node, sport):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{client}", sport))
    s.settimeout(5)
    s.connect((node, {port}))
    s.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        c = s.recv(4096)
        if not c:
            break
        data += c
    s.close()
    return data.split(b"\r\n\r\n", 1)[1].split()[0].decode()
for sport in range(41000, 41000 + {PORTS}):
    print(sport, ask("{n1}", sport), ask("{n2}", sport), flush=True)
"#,
        client = CLIENT_IP,
        port = WEB_NODEPORT_TCP,
        n1 = node_ip(1),
        n2 = node_ip(2),
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &cluster.client_ns,
            "python3",
            "-c",
            &script,
        ])
        .output()
        .expect("python3 in the client namespace");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pods = std::collections::BTreeSet::new();
    let mut agree = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{line}");
        pods.insert(f[1].to_string());
        agree += usize::from(f[1] == f[2]);
        assert_eq!(
            f[1], f[2],
            "source port {}: node 1 chose {}, node 2 {}",
            f[0], f[1], f[2]
        );
    }
    println!(
        "maglev across nodes: {agree} of {PORTS} client ports got the same pod via node 1 and node 2; pods used: {pods:?}"
    );
    assert_eq!(agree, PORTS as usize);
    assert!(pods.len() >= 2, "the flows spread over pods: {pods:?}");
}
