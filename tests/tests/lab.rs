//! End-to-end in network namespaces: real clients (curl, UDP sockets) against real servers
//! in pods, through `lb-agent run --manifests` on a lab node. Needs root and the workspace's
//! binaries (`cargo build`).
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_testkit::{
    lab::{
        echo_manifest, tutorial_manifests, wait_for, Background, Lab, LabPod, Persistent,
        CLIENT_IP, NODE_IP, POD_GATEWAY,
    },
    netns::{add_netns, binary, run},
    require_root,
};

/// The lab tests measure timings (refused at once, changes within a second) on a 2-core
/// machine: one lab at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct LabGuard {
    lab: Lab,
    _turn: MutexGuard<'static, ()>,
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

fn lab_with_agent(pods: usize) -> LabGuard {
    lab_with_agent_attached(pods, None)
}

/// A lab whose agent runs with `--ext-attach ext_attach` (None: the default).
fn lab_with_agent_attached(pods: usize, ext_attach: Option<&'static str>) -> LabGuard {
    require_root();
    // A test that failed while holding the lock poisons it; the next may still run.
    let turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut lab = Lab::up(pods).expect("lab up");
    lab.ext_attach = ext_attach;
    lab.start_servers().expect("servers");
    for (name, text) in tutorial_manifests(&lab.pods) {
        lab.write_manifest(&name, &text).expect("manifest");
    }
    lab.start_agent().expect("agent");
    lab.wait_healthy(Duration::from_secs(10)).expect("healthy");
    LabGuard { lab, _turn: turn }
}

/// Which pod answered each response ("podN client-addr"), counted.
fn spread<'a>(bodies: impl IntoIterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for b in bodies {
        let pod = b.split_whitespace().next().unwrap_or("?").to_string();
        *m.entry(pod).or_insert(0) += 1;
    }
    m
}

fn assert_spread(what: &str, counts: &BTreeMap<String, usize>, pods: usize, total: usize) {
    assert_eq!(counts.values().sum::<usize>(), total, "{what}: {counts:?}");
    assert_eq!(
        counts.len(),
        pods,
        "{what}: not every pod served: {counts:?}"
    );
    // Uniform choice: each pod gets 1/4 of 200 = 50 on average (sd 6); 15 is far below.
    for (pod, n) in counts {
        assert!(
            *n >= total / pods / 3,
            "{what}: {pod} served only {n} of {total}: {counts:?}"
        );
    }
}

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

#[test]
fn nodeport_from_outside_and_clusterip_from_a_pod_spread_over_all_pods() {
    let lab = lab_with_agent(4);
    let n = 200;

    // Outside → NodePort, TCP: every pod serves, and sees the real client address.
    let bodies = lab
        .curl_many(&lab.ext_ns, &format!("http://{NODE_IP}:30080/"), n)
        .expect("curl");
    let ok: Vec<String> = bodies.iter().filter_map(|b| b.clone().ok()).collect();
    assert_eq!(ok.len(), n, "failed requests: {}", n - ok.len());
    assert_spread("outside → NodePort TCP", &spread(&ok), 4, n);
    assert!(
        ok.iter().all(|b| b
            .split_whitespace()
            .nth(1)
            .is_some_and(|peer| peer.starts_with(&format!("{CLIENT_IP}:")))),
        "client address not kept: {:?}",
        &ok[..3]
    );

    // Pod → ClusterIP, TCP.
    let pod2 = lab.pod("pod2").ns.clone();
    let bodies = lab
        .curl_many(&pod2, "http://10.96.0.10:80/", n)
        .expect("curl");
    let ok: Vec<String> = bodies.iter().filter_map(|b| b.clone().ok()).collect();
    assert_eq!(ok.len(), n);
    assert_spread("pod → ClusterIP TCP", &spread(&ok), 4, n);

    // UDP: outside → NodePort 30053, pod → ClusterIP 10.96.0.53:53. Each exchange uses a new
    // socket (a new source port), so a new flow.
    for (what, ns, to) in [
        (
            "outside → NodePort UDP",
            lab.ext_ns.clone(),
            sock(NODE_IP, 30053),
        ),
        (
            "pod → ClusterIP UDP",
            pod2.clone(),
            sock(Ipv4Addr::new(10, 96, 0, 53), 53),
        ),
    ] {
        let mut replies = Vec::new();
        for i in 0..n {
            let r = lab
                .udp(&ns, to, format!("q{i}").as_bytes())
                .unwrap_or_else(|e| panic!("{what}: exchange {i}: {e}"));
            replies.push(r);
        }
        assert_spread(what, &spread(&replies), 4, n);
    }

    // TCP and UDP on the same port number are separate frontends with their own targets.
    let body = lab.curl(&pod2, "http://10.96.0.53:53/").expect("TCP 53");
    assert!(body.starts_with("pod"), "{body}");

    let table = lab.services_table().expect("services");
    assert!(table.contains("198.18.0.2:30080/TCP"), "{table}");
    assert!(table.contains("NodePort"), "{table}");
}

#[test]
fn a_pod_reaches_itself_through_its_service() {
    let lab = lab_with_agent(2);
    let pod1 = lab.pod("pod1").ns.clone();
    for _ in 0..5 {
        let body = lab
            .curl(&pod1, "http://10.96.0.20:80/")
            .expect("hairpin request");
        // pod1 served it, and saw the hairpin source address, not its own.
        assert!(body.starts_with("pod1 169.254.42.1:"), "{body}");
    }
    // Another pod reaching the same Service keeps its own address.
    let body = lab
        .curl(&lab.pod("pod2").ns, "http://10.96.0.20:80/")
        .expect("request");
    assert!(
        body.starts_with(&format!("pod1 {}:", lab.pod("pod2").ip)),
        "{body}"
    );
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    let lab = lab_with_agent(1);
    let pod1 = lab.pod("pod1").ns.clone();
    for (ns, ip, port) in [
        (pod1.clone(), Ipv4Addr::new(10, 96, 0, 99), 80),
        (lab.ext_ns.clone(), NODE_IP, 30099),
    ] {
        // curl: exit 7, "Failed to connect", at once (not after its 2 s timeout).
        let started = Instant::now();
        let err = lab
            .curl(&ns, &format!("http://{ip}:{port}/"))
            .expect_err("must be refused");
        let took = started.elapsed();
        assert!(
            err.to_string().contains("curl: (7) Failed to connect"),
            "{ip}:{port}: {err}"
        );
        assert!(
            took < Duration::from_millis(900),
            "{ip}:{port}: refused only after {took:?}"
        );
        // The socket sees ECONNREFUSED (the RST), not a timeout.
        let to = sock(ip, port);
        let err = lb_testkit::lab::in_netns(&ns, move || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).map(|_| ())
        })
        .expect_err("must be refused");
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "{ip}:{port}: {err}"
        );
    }
    let err = lab
        .udp(&pod1, sock(Ipv4Addr::new(10, 96, 0, 99), 53), b"q")
        .expect_err("must be refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn endpoint_changes_reach_the_datapath_within_a_second_and_bad_files_change_nothing() {
    let mut lab = lab_with_agent(4);
    let pod1 = lab.pod("pod1").ns.clone();
    let clusterip = sock(Ipv4Addr::new(10, 96, 0, 53), 53);

    // Remove pod4 from the echo EndpointSlice.
    let three = lab.pods[..3].to_vec();
    let written = Instant::now();
    lab.write_manifest("echo.yaml", &echo_manifest(&three))
        .expect("write");
    wait_for(Duration::from_secs(1), || {
        let v = lab.services_json()?;
        let fe = v
            .as_array()
            .and_then(|l| l.iter().find(|f| f["frontend"] == "10.96.0.53:53/UDP"))
            .cloned();
        Ok(fe.is_some_and(|f| f["backends"].as_array().is_some_and(|b| b.len() == 3)))
    })
    .expect("the change reached the maps within a second");
    eprintln!(
        "endpoint removal reached the maps after {:?}",
        written.elapsed()
    );
    for i in 0..100 {
        let r = lab
            .udp(&pod1, clusterip, b"q")
            .unwrap_or_else(|e| panic!("exchange {i}: {e}"));
        assert!(!r.starts_with("pod4 "), "new flow {i} still went to pod4");
    }

    // A broken file: reported with its path, and nothing is dropped.
    lab.write_manifest(
        "echo.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec:\n  ports: [{port: 70000}]\n",
    )
    .expect("write");
    wait_for(Duration::from_secs(2), || {
        Ok(lab.agent_log().contains("echo.yaml"))
    })
    .unwrap_or_else(|_| panic!("error not reported; log:\n{}", lab.agent_log()));
    let log = lab.agent_log();
    assert!(
        log.contains("Service default/echo") && log.contains("70000"),
        "{log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let r = lab
        .udp(&pod1, clusterip, b"q")
        .expect("still served from the last good state");
    assert!(r.starts_with("pod"), "{r}");

    // A new pod interface appears: the agent attaches to it and it serves.
    lab.add_pod().expect("add pod");
    lab.write_manifest("echo.yaml", &echo_manifest(&lab.pods[4..]))
        .expect("write");
    let pod5 = lab.pod("pod5").ns.clone();
    wait_for(Duration::from_secs(2), || {
        // pod5 → its own Service is a hairpin through its own (new) veth.
        Ok(lab
            .udp(&pod5, clusterip, b"q")
            .is_ok_and(|r| r.starts_with("pod5 169.254.42.1:")))
    })
    .unwrap_or_else(|_| panic!("pod5 not served; log:\n{}", lab.agent_log()));
    let r = lab.udp(&pod1, clusterip, b"q").expect("pod1 → pod5");
    assert!(
        r.starts_with(&format!("pod5 {}:", lab.pod("pod1").ip)),
        "{r}"
    );
}

#[test]
fn traffic_keeps_flowing_while_the_agent_is_killed_and_restarted() {
    // The first agent runs XDP on the uplink; the restarted one, with the default (TC on a
    // veth), puts lb_tc_ext in its place: an upgrade that changes the hook loses nothing either.
    let mut lab = lab_with_agent_attached(4, Some("xdp"));
    let before = lab.services_json().expect("services");

    // Requests in a loop from outside, each a new connection, for the whole test.
    let client = Background::requests(&lab.ext_ns, &format!("http://{NODE_IP}:30080/"));
    // A long-lived TCP connection and a UDP "connection" through the NodePorts.
    let mut open = Persistent::open(
        &lab.ext_ns,
        SocketAddr::from((NODE_IP, 30080)),
        SocketAddr::from((NODE_IP, 30053)),
    )
    .expect("open");
    let (tcp_pod, udp_pod) = (open.http().expect("http"), open.udp().expect("udp"));

    std::thread::sleep(Duration::from_millis(700));
    let programs = |lab: &Lab| -> String {
        let st = lab.agent_cli(&["status"]).unwrap_or_else(|e| e.to_string());
        st.lines()
            .find(|l| l.starts_with("Programs:"))
            .unwrap_or_default()
            .to_string()
    };
    let old_programs = programs(&lab);
    let first_log = lab.agent_log();
    assert!(first_log.contains("attached iface=veth1"), "{first_log}");
    assert!(
        first_log
            .lines()
            .any(|l| l.contains("attached iface=ext0") && l.contains("hook=XDP")),
        "{first_log}"
    );
    lab.kill_agent().expect("kill -9");
    lab.ext_attach = None;
    // While the agent is down, the manifests change: `empty` goes away.
    lab.remove_manifest("empty.yaml").expect("rm");
    std::thread::sleep(Duration::from_millis(1500));
    lab.start_agent().expect("restart");
    lab.wait_healthy(Duration::from_secs(10))
        .expect("healthy again");
    std::thread::sleep(Duration::from_millis(700));
    let (ok, failed) = client.finish();
    // The open connection and the UDP flow carried on, with the same pods.
    assert_eq!(open.http().expect("the TCP connection survived"), tcp_pod);
    assert_eq!(open.udp().expect("the UDP flow survived"), udp_pod);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 10, "only {ok} requests completed");
    eprintln!("{ok} requests, none failed, across an agent kill and restart");

    let log = lab.agent_log();
    assert!(log.contains("taken_over=true"), "{log}");
    // The restarted agent's own programs replaced the old ones on the same links (an
    // upgrade path): new program ids; the pod interfaces run the new lb_tc_pod, and the
    // uplink the new lb_tc_ext instead of XDP.
    let new_programs = programs(&lab);
    assert!(
        new_programs.starts_with("Programs:") && new_programs != old_programs,
        "{old_programs} / {new_programs}"
    );
    let id_of = |what: &str| {
        new_programs
            .split(what)
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap_or_default()
            .to_string()
    };
    let (ext_id, pod_id) = (
        id_of("external interfaces, id "),
        id_of("pod interfaces, id "),
    );
    let links = run(&["ip", "-n", &lab.node_ns, "-d", "link", "show"]).expect("ip link");
    assert!(!links.contains("prog/xdp"), "XDP left on ext0: {links}");
    // tcx links; program ids are unique.
    let net = run(&["bpftool", "-j", "link", "show"]).expect("bpftool link");
    let links: serde_json::Value = serde_json::from_str(&net).expect("bpftool json");
    let running = |id: &str| {
        links.as_array().map_or(0, |l| {
            l.iter()
                .filter(|k| k["prog_id"].as_u64() == id.parse::<u64>().ok())
                .count()
        })
    };
    assert_eq!(
        running(&pod_id),
        4,
        "lb_tc_pod id {pod_id} on the four pod veths: {net}"
    );
    assert_eq!(running(&ext_id), 1, "lb_tc_ext id {ext_id} on ext0: {net}");
    let attached: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("attached iface"))
        .collect();
    assert!(
        attached.len() == 1
            && attached[0].contains("iface=ext0")
            && attached[0].contains("hook=TC ingress"),
        "only ext0 is attached again, in TC:\n{log}"
    );
    let after = lab.services_json().expect("services");
    let web = |v: &serde_json::Value| {
        v.as_array().and_then(|l| {
            l.iter()
                .find(|f| f["frontend"] == "198.18.0.2:30080/TCP")
                .cloned()
        })
    };
    assert_eq!(
        web(&before),
        web(&after),
        "the restart rewrote the web frontend"
    );
    let frontends: Vec<String> = after
        .as_array()
        .map(|l| {
            l.iter()
                .map(|f| f["frontend"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !frontends.iter().any(|f| f.starts_with("10.96.0.99:")),
        "stale frontend kept: {frontends:?}"
    );
}

#[test]
fn trace_explains_each_decision_without_leaving_flows_behind() {
    let lab = lab_with_agent(2);
    let ct_before = lab.services_json().expect("services");

    let t = lab
        .agent_cli(&["trace", "tcp", "198.18.0.1:41000", "198.18.0.2:30080"])
        .expect("trace NodePort");
    assert!(
        t.contains("frontend:  198.18.0.2:30080/TCP NodePort"),
        "{t}"
    );
    assert!(
        t.contains("decision:  new flow → backend 10.244.0.1"),
        "{t}"
    );
    assert!(
        t.contains("verdict:   XDP_PASS, rewritten to TCP 198.18.0.1:41000 → 10.244.0.1"),
        "{t}"
    );
    assert!(t.contains("checksums valid"), "{t}");
    // The synthetic flow left no conntrack entry: tracing it again is a new flow again.
    let again = lab
        .agent_cli(&["trace", "tcp", "198.18.0.1:41000", "198.18.0.2:30080"])
        .expect("trace again");
    assert!(again.contains("new flow"), "{again}");

    let t = lab
        .agent_cli(&[
            "trace",
            "tcp",
            "10.244.0.11:41001",
            "10.96.0.99:80",
            "--iface",
            "veth1",
        ])
        .expect("trace no-endpoint");
    assert!(t.contains("from pod interface veth1"), "{t}");
    assert!(t.contains("no usable endpoint"), "{t}");
    assert!(
        t.contains("rejected with TCP 10.96.0.99:80 → 10.244.0.11:41001 [ACK,RST]"),
        "{t}"
    );
    let t = lab
        .agent_cli(&["trace", "udp", "10.244.0.11:41002", "10.96.0.99:53"])
        .expect("trace UDP no-endpoint");
    assert!(
        t.contains("ICMP port unreachable 10.96.0.99 → 10.244.0.11"),
        "{t}"
    );
    let t = lab
        .agent_cli(&["trace", "tcp", "198.18.0.1:41003", "198.18.0.2:22"])
        .expect("trace non-service");
    assert!(
        t.contains("frontend:  none") && t.contains("not a Service frontend"),
        "{t}"
    );
    assert_eq!(
        lab.services_json().expect("services"),
        ct_before,
        "tracing changed the services"
    );
}

#[test]
fn status_shows_attachments_maps_and_the_agent() {
    let mut lab = lab_with_agent(2);
    let s = lab
        .agent_cli(&["status"])
        .expect("status exits 0 when all is well");
    for want in [
        "ext0 (external): ",
        "veth1 (pod): ",
        "veth2 (pod): ",
        "LB4_SERVICES",
        "LB4_CONNTRACK",
        "Agent:        healthy",
        "Source:       manifests",
    ] {
        assert!(s.contains(want), "{want:?} missing:\n{s}");
    }
    // The default on a veth uplink: TC; every interface's replies leave through TC egress.
    assert!(
        s.contains("ext0 (external): TC ingress, TC egress (reverse NAT)\n"),
        "{s}"
    );
    assert!(
        s.contains("veth1 (pod): TC ingress (pod), TC egress (reverse NAT)\n"),
        "{s}"
    );
    let ids: Vec<String> = s
        .lines()
        .find(|l| l.starts_with("Programs:"))
        .unwrap_or_default()
        .split("id ")
        .skip(1)
        .filter_map(|r| r.split(')').next().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 5, "{s}");
    assert!(!s.contains("Warning"), "{s}");
    // The agent stopped gracefully (SIGTERM: its program handles are dropped): status says
    // so and exits 1; the datapath is still attached and forwarding.
    lab.stop_agent().expect("stop");
    let err = lab
        .agent_cli(&["status"])
        .expect_err("exit 1 without an agent");
    assert!(err.to_string().contains("failed"), "{err}");
    let body = lab
        .curl(&lab.ext_ns, &format!("http://{NODE_IP}:30080/"))
        .expect("still forwarding");
    assert!(body.starts_with("pod"), "{body}");

    // Uninstall: nothing attached any more, NodePort traffic is no longer translated.
    let out = lab.agent_cli(&["uninstall"]).expect("uninstall");
    assert!(out.contains("links detached"), "{out}");
    let links = run(&["ip", "-n", &lab.node_ns, "-d", "link", "show"]).expect("ip link");
    assert!(!links.contains("prog/xdp"), "XDP still attached:\n{links}");
    // No link holds any of the programs any more: the kernel frees them (a link dropped with
    // its pin is released by a kernel worker, so not always at once).
    for id in &ids {
        wait_for(Duration::from_secs(5), || {
            Ok(run(&["bpftool", "prog", "show", "id", id]).is_err())
        })
        .unwrap_or_else(|_| panic!("program {id} still loaded after uninstall"));
    }
    assert!(lab
        .curl(&lab.ext_ns, &format!("http://{NODE_IP}:30080/"))
        .is_err());
}

fn output_of(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "exit {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn flows_show_each_decision_and_the_share_per_backend() {
    let lab = lab_with_agent(4);
    let url = format!("http://{NODE_IP}:30080/");

    // Live view: each request is a new flow, then a closed one, client → frontend → backend.
    let live = lab
        .spawn_agent_cli(&["flows", "-o", "json", "--duration", "2.5"])
        .expect("flows");
    std::thread::sleep(Duration::from_millis(500));
    let ok = lab.curl_many(&lab.ext_ns, &url, 10).expect("curl");
    assert!(ok.iter().all(Result::is_ok));
    let events: Vec<serde_json::Value> = output_of(live)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    let new: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "new").collect();
    let closed = events.iter().filter(|e| e["event"] == "closed").count();
    assert_eq!(new.len(), 10, "{events:?}");
    assert_eq!(closed, 10, "{events:?}");
    for e in &new {
        assert!(
            e["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("198.18.0.1:")),
            "{e}"
        );
        assert_eq!(e["frontend"], "198.18.0.2:30080", "{e}");
        assert!(
            e["backend"]
                .as_str()
                .is_some_and(|b| b.starts_with("10.244.0.1") && b.ends_with(":8080")),
            "{e}"
        );
        assert_eq!(e["service"], "default/web:http", "{e}");
        assert_eq!(e["proto"], "TCP");
    }

    // Summary, filtered by service: 80 new flows over the four pods.
    let summary = lab
        .spawn_agent_cli(&[
            "flows",
            "--summary",
            "--service",
            "default/web",
            "-o",
            "json",
            "--duration",
            "3",
        ])
        .expect("flows --summary");
    std::thread::sleep(Duration::from_millis(500));
    lab.curl_many(&lab.ext_ns, &url, 80).expect("curl");
    // Traffic to another service, filtered out.
    lab.udp(&lab.ext_ns, SocketAddr::from((NODE_IP, 30053)), b"q")
        .expect("udp");
    let s: serde_json::Value = serde_json::from_str(output_of(summary).trim()).expect("json");
    let list = s.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{s}");
    assert_eq!(list[0]["frontend"], "198.18.0.2:30080/TCP");
    assert_eq!(list[0]["newFlows"], 80);
    let backends = list[0]["backends"].as_array().expect("backends");
    assert_eq!(backends.len(), 4, "{s}");
    let shares: f64 = backends.iter().filter_map(|b| b["share"].as_f64()).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{s}");
}

#[test]
fn a_terminating_endpoint_keeps_its_open_connection_while_new_ones_avoid_it() {
    let lab = lab_with_agent(2);
    let (pod1, pod2) = (lab.pods[0].ip, lab.pods[1].ip);
    let slice = |eps: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: grace}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.30\n  ports:\n  - {{name: http, port: 80, nodePort: 30090}}\n  - {{name: dns, port: 53, protocol: UDP, nodePort: 30091}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: grace-1, labels: {{kubernetes.io/service-name: grace}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints:\n{eps}"
        )
    };
    lab.write_manifest(
        "grace.yaml",
        &slice(&format!(
            "- {{addresses: [\"{pod1}\"], conditions: {{ready: true}}}}\n"
        )),
    )
    .expect("write");
    let url = format!("http://{NODE_IP}:30090/");
    wait_for(Duration::from_secs(3), || {
        Ok(lab
            .curl(&lab.ext_ns, &url)
            .is_ok_and(|b| b.starts_with("pod1 ")))
    })
    .expect("served by pod1");
    let mut open = Persistent::open(
        &lab.ext_ns,
        SocketAddr::from((NODE_IP, 30090)),
        SocketAddr::from((NODE_IP, 30091)),
    )
    .expect("open");
    assert_eq!(open.http().expect("http"), "pod1");
    assert_eq!(open.udp().expect("udp"), "pod1");

    // pod1 starts terminating (still serving), pod2 is ready.
    lab.write_manifest(
        "grace.yaml",
        &slice(&format!(
            "- {{addresses: [\"{pod1}\"], conditions: {{ready: false, serving: true, terminating: true}}}}\n- {{addresses: [\"{pod2}\"], conditions: {{ready: true}}}}\n"
        )),
    )
    .expect("write");
    wait_for(Duration::from_secs(3), || {
        Ok(lab
            .curl_many(&lab.ext_ns, &url, 10)?
            .iter()
            .all(|r| r.as_ref().is_ok_and(|b| b.starts_with("pod2 "))))
    })
    .expect("new connections go to pod2 only");
    for _ in 0..5 {
        assert_eq!(open.http().expect("the open connection survives"), "pod1");
        assert_eq!(open.udp().expect("the UDP flow stays"), "pod1");
    }
}

/// A pod sends to a ClusterIP as soon as it starts (an init container's DNS query): its
/// interface must be attached by then. The agent follows links by netlink events; here each
/// new pod's veth is made, addressed and brought up, and the pod's single UDP datagram (no
/// retry) leaves within milliseconds of it, five pods in a row.
#[test]
fn a_new_pods_first_packet_is_translated() {
    let mut lab = lab_with_agent(2);
    let client = binary("lab-client").expect("lab-client");
    let node = lab.node_ns.clone();
    for _ in 0..5 {
        let n = lab.pods.len() + 1;
        let pod = LabPod {
            name: format!("pod{n}"),
            ns: format!("{}-pod{n}", lab.tag),
            ip: Ipv4Addr::new(10, 244, 0, 10 + n as u8),
            host_iface: format!("veth{n}"),
        };
        // Noted first, so that the lab removes it whatever happens.
        lab.pods.push(pod.clone());
        add_netns(&pod.ns).expect("pod namespace");
        let (ns, iface, ip) = (&pod.ns, &pod.host_iface, pod.ip);
        let script = format!(
            "t0=$(date +%s%N); \
             ip -n {node} link add {iface} type veth peer name eth0 netns {ns} && \
             printf 'addr add {POD_GATEWAY}/32 dev {iface}\\nlink set {iface} up\\nroute add {ip}/32 dev {iface}\\n' | ip -n {node} -batch - && \
             printf 'addr add {ip}/32 dev eth0\\nlink set eth0 up\\nroute add {POD_GATEWAY}/32 dev eth0\\nroute add default via {POD_GATEWAY}\\n' | ip -n {ns} -batch - && \
             t1=$(date +%s%N) && \
             echo \"sent=$(( (t1 - t0) / 1000000 ))ms\" && \
             ip netns exec {ns} {} udp 10.96.0.53:53 --timeout-ms 1500",
            client.display()
        );
        let started = Instant::now();
        let out = run(&["sh", "-c", &script]).unwrap_or_else(|e| {
            panic!(
                "{}: the first datagram of a new pod got no answer: {e:#}\n{}",
                pod.name,
                lab.agent_log()
            )
        });
        println!(
            "{}: {} answered in {:?}",
            pod.name,
            out.split_whitespace().collect::<Vec<_>>().join(" "),
            started.elapsed()
        );
        assert!(out.contains("reply=pod"), "{}: {out}", pod.name);
    }
}
