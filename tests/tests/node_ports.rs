//! Which addresses serve NodePorts: every address of the node by default, those inside
//! `--nodeport-addresses` CIDRs, or only the primary one with `primary` (kube-proxy's flag);
//! and 127.0.0.1 for the node's own processes (kube-proxy's iptables localhost NodePorts)
//! unless `--localhost-nodeports false` or the CIDRs leave loopback out.
// Harness code: a lab that cannot be built panics with a message.
#![allow(clippy::missing_panics_doc)]

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use lb_testkit::{
    cluster::{
        node_ip, pod_gateway,
        services::{WEB_NODEPORT_TCP, WEB_NODEPORT_UDP},
        Cluster, ClusterConfig, Origin, Outcome, Proto,
    },
    require_root,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `origin` gets an answer from a pod at `ip`'s web NodePort, TCP and UDP alike
/// (a NodePort not served there meets the node's own stack: refused).
fn served(cluster: &Cluster, origin: &Origin, ip: Ipv4Addr) -> bool {
    let mut answers = Vec::new();
    for (proto, port) in [
        (Proto::Tcp, WEB_NODEPORT_TCP),
        (Proto::Udp, WEB_NODEPORT_UDP),
    ] {
        let to = SocketAddrV4::new(ip, port);
        let outcome = cluster.request(origin, proto, to, Duration::from_secs(2));
        match outcome {
            Outcome::Reply { .. } => answers.push(true),
            Outcome::Refused => answers.push(false),
            other => panic!("{origin:?} → {to} {proto:?}: {other:?}"),
        }
    }
    assert_eq!(
        answers[0], answers[1],
        "{origin:?} → {ip}: TCP and UDP differ"
    );
    answers[0]
}

#[test]
fn nodeport_addresses_select_where_node_ports_are_served() {
    require_root();
    let _turn = turn();
    let node1 = node_ip(1);
    // Node 1's address on its pod veths, a second address of the node (reached from node 2
    // through node 1's pod-network route).
    let second = pod_gateway(1);
    let host1 = Origin::Node(1);
    let host2 = Origin::Node(2);
    #[rustfmt::skip]
    let cases: [(&[&str], bool, bool, bool); 4] = [
        // flags, served at node1's address, at its second address, on 127.0.0.1 (host 1)
        (&[], true, true, true),
        (&["--nodeport-addresses", "172.18.0.0/24,127.0.0.0/8"], true, false, true),
        (&["--nodeport-addresses", "primary"], true, false, false),
        (&["--localhost-nodeports", "false"], true, true, false),
    ];
    for (flags, at_node, at_second, at_localhost) in cases {
        let mut cluster = Cluster::up_with(ClusterConfig {
            agent_args: flags.iter().map(ToString::to_string).collect(),
            ..ClusterConfig::new(2, 1)
        })
        .expect("cluster up");
        cluster.start_all().expect("servers, manifests, agents");
        let got = (
            served(&cluster, &host2, node1),
            served(&cluster, &host2, second),
            served(&cluster, &host1, Ipv4Addr::LOCALHOST),
        );
        println!("{flags:?}: node address, second address, 127.0.0.1 served: {got:?}");
        assert_eq!(got, (at_node, at_second, at_localhost), "{flags:?}");
    }
}
