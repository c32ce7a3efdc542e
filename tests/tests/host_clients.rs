//! The node's own processes (host-network clients, translated by the cgroup socket hooks)
//! get what pods get: sessionAffinity ClientIP, and a connected UDP socket that leaves a
//! backend once the backend is removed (kube-proxy deletes a removed UDP endpoint's conntrack
//! entries, so the next datagram goes elsewhere). Drops where kube-proxy drops (source
//! ranges, internalTrafficPolicy Local) are rows of the reachability matrix (cluster.rs).
// Harness code: a lab that cannot be built panics with a message.
#![allow(clippy::missing_panics_doc)]

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    process::Child,
    sync::{mpsc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_testkit::{
    cluster::{pod_ip, services::STICKY, Cluster, Origin, Outcome, Proto, UDP_PORT},
    netns::binary,
    require_root,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The pods that answered `n` requests from `origin` (each on a new socket).
fn answered_by(
    cluster: &Cluster,
    origin: &Origin,
    proto: Proto,
    port: u16,
    n: usize,
) -> Vec<String> {
    (0..n)
        .map(|_| {
            match cluster.request(
                origin,
                proto,
                SocketAddrV4::new(STICKY, port),
                Duration::from_secs(2),
            ) {
                Outcome::Reply { backend, .. } => backend,
                other => panic!("{origin:?} → {STICKY}:{port} {proto:?}: {other:?}"),
            }
        })
        .collect()
}

/// `sticky` (sessionAffinity ClientIP over 4 pods on 2 nodes): every new connection of a
/// client goes to the pod its first one did, from a node's processes as from a pod. Twelve
/// requests all on one pod by chance: 4 × (1/4)^12, about one in four million.
#[test]
fn host_processes_get_session_affinity() {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up(2, 2).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    for origin in [
        Origin::Node(1),
        Origin::Node(2),
        Origin::Pod("node2-pod2".into()),
    ] {
        for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
            let pods = answered_by(&cluster, &origin, proto, port, 12);
            let distinct: BTreeSet<&String> = pods.iter().collect();
            println!("{origin:?} {proto:?}: {pods:?}");
            assert_eq!(distinct.len(), 1, "{origin:?} {proto:?} went to {pods:?}");
        }
    }
}

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const PAIR: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 40);

/// `pair`: a UDP Service over the given pods (name, address), an EndpointSlice of its own.
fn pair(pods: &[(&str, Ipv4Addr)]) -> String {
    let mut endpoints = String::new();
    for (name, ip) in pods {
        let node = &name[..5];
        endpoints.push_str(&format!(
            "- {{addresses: [\"{ip}\"], nodeName: {node}, conditions: {{ready: true}}}}\n"
        ));
    }
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: pair, namespace: default}}
spec:
  clusterIP: {PAIR}
  ports: [{{name: dns, port: 53, protocol: UDP, targetPort: {UDP_PORT}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: pair-1, namespace: default, labels: {{kubernetes.io/service-name: pair}}}}
addressType: IPv4
ports: [{{name: dns, port: {UDP_PORT}, protocol: UDP}}]
endpoints:
{endpoints}"
    )
}

/// Waits up to `within` for the next line of the client's output.
fn next_line(lines: &mpsc::Receiver<String>, within: Duration) -> String {
    lines
        .recv_timeout(within)
        .unwrap_or_else(|e| panic!("no output from the UDP client: {e}"))
}

/// A node's process with one connected UDP socket to a Service (a resolver, say) keeps
/// sending to the backend the socket hooks gave it at connect time. When that backend is
/// removed from the Service (its pod still answering at its own address), kube-proxy's
/// conntrack cleanup sends the next datagram elsewhere; here the agent destroys the socket,
/// the client opens a new one and is answered by the remaining backend. Without that, the
/// client stays on the removed pod for as long as its socket lives.
#[test]
fn a_connected_udp_socket_of_the_node_leaves_a_removed_backend() {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up(2, 1).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    let both = [("node1-pod1", pod_ip(1, 1)), ("node2-pod1", pod_ip(2, 1))];
    cluster
        .write_manifest("pair.yaml", &pair(&both))
        .expect("pair");
    // Wait until the Service answers from node 1's host.
    let started = Instant::now();
    while !matches!(
        cluster.request(
            &Origin::Node(1),
            Proto::Udp,
            SocketAddrV4::new(PAIR, 53),
            Duration::from_millis(500)
        ),
        Outcome::Reply { .. }
    ) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "pair never answered"
        );
    }

    let to = SocketAddrV4::new(PAIR, 53).to_string();
    let client = cluster
        .spawn_from(
            &Origin::Node(1),
            &binary("lab-client").expect("lab-client"),
            &["udp-stream", &to, "--count", "60", "--timeout-ms", "300"],
        )
        .expect("udp client");
    let mut client = Killed(client);
    let stdout = client.0.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Five answers on the socket: all from one pod, the one to remove.
    let mut first = Vec::new();
    for _ in 0..5 {
        first.push(next_line(&lines, Duration::from_secs(3)));
    }
    let chosen = first[0]
        .strip_prefix("reply=")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("first datagram not answered: {first:?}"))
        .to_string();
    assert!(
        first
            .iter()
            .all(|l| l.starts_with(&format!("reply={chosen} "))),
        "one socket, one backend: {first:?}"
    );
    let (other, _) = *both
        .iter()
        .find(|(n, _)| *n != chosen)
        .expect("the other pod");
    let kept: Vec<(&str, Ipv4Addr)> = both.iter().copied().filter(|(n, _)| *n != chosen).collect();
    cluster
        .write_manifest("pair.yaml", &pair(&kept))
        .expect("pair without it");
    let removed_at = Instant::now();

    // The rest: after at most a few datagrams, answers from the other pod only.
    let mut after = Vec::new();
    for _ in 0..40 {
        after.push(next_line(&lines, Duration::from_secs(3)));
    }
    println!(
        "removed {chosen} ({:.1} s ago at the end); then: {after:?}",
        removed_at.elapsed().as_secs_f64()
    );
    let last_from_removed = after
        .iter()
        .rposition(|l| l.starts_with(&format!("reply={chosen} ")));
    let moved = after
        .iter()
        .position(|l| l.starts_with(&format!("reply={other} ")))
        .unwrap_or_else(|| {
            panic!("never answered by {other} after {chosen} was removed: {after:?}")
        });
    assert!(
        last_from_removed.is_none_or(|i| i < moved),
        "answered by the removed {chosen} after {other}: {after:?}"
    );
    assert!(moved < 25, "moved only after {moved} datagrams: {after:?}");
    assert!(
        after[moved..]
            .iter()
            .all(|l| l.starts_with(&format!("reply={other} "))),
        "every answer after the move from {other}: {after:?}"
    );
    let log = cluster.agent_log(1);
    assert!(
        log.contains("connected UDP sockets of the node destroyed"),
        "{log}"
    );
}
