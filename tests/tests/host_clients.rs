//! The node's own processes (host-network clients, translated by the cgroup socket hooks)
//! get what pods get: sessionAffinity ClientIP, and a connected UDP socket that leaves a
//! backend once the backend is removed (kube-proxy deletes a removed UDP endpoint's conntrack
//! entries, so the next datagram goes elsewhere). Drops where kube-proxy drops (source
//! ranges, internalTrafficPolicy Local) are rows of the reachability matrix (cluster.rs).
// Harness code: a lab that cannot be built panics with a message.
#![allow(clippy::missing_panics_doc)]

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use lb_testkit::{
    cluster::{services::STICKY, Cluster, Origin, Outcome, Proto},
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
