//! Restart under load over IPv6: an IPv6 NodePort Service keeps answering new connections,
//! and its open TCP connection and UDP flow keep their pods, while the agent is killed and
//! started again. Needs root and the workspace's binaries (`cargo build`).
#![allow(clippy::missing_panics_doc)]

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use lb_testkit::{
    lab::{Background, Lab, Persistent, HTTP_PORT, NODE_IP6, NODE_NAME, UDP_PORT},
    require_root,
};

/// An IPv6-only NodePort Service (TCP 30080, UDP 30053) over every pod's IPv6 address.
fn web6(lab: &Lab) -> String {
    let mut endpoints = String::new();
    for p in &lab.pods {
        let _ = write!(
            endpoints,
            "\n- {{addresses: [\"{}\"], nodeName: {NODE_NAME}, conditions: {{ready: true}}}}",
            p.ip6()
        );
    }
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web6}}
spec:
  type: NodePort
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: fd00:10:96::10
  clusterIPs: [fd00:10:96::10]
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}, nodePort: 30080}}
  - {{name: dns, port: 53, targetPort: {UDP_PORT}, protocol: UDP, nodePort: 30053}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web6-1, labels: {{kubernetes.io/service-name: web6}}}}
addressType: IPv6
ports:
- {{name: http, port: {HTTP_PORT}}}
- {{name: dns, port: {UDP_PORT}, protocol: UDP}}
endpoints:{endpoints}
"
    )
}

#[test]
#[ignore = "needs root"]
fn ipv6_traffic_keeps_flowing_while_the_agent_is_killed_and_restarted() {
    require_root();
    let mut lab = Lab::up(3).expect("lab up");
    lab.add_ipv6().expect("IPv6 addresses");
    lab.start_servers().expect("servers");
    lab.write_manifest("web6.yaml", &web6(&lab))
        .expect("manifest");
    lab.start_agent().expect("agent");
    lab.wait_healthy(Duration::from_secs(10)).expect("healthy");

    let url = format!("http://[{NODE_IP6}]:30080/");
    let first = lab.curl(&lab.ext_ns, &url);
    assert!(
        first.as_ref().is_ok_and(|b| b.starts_with("pod")),
        "the IPv6 NodePort does not answer: {first:?}\n{}",
        lab.agent_log()
    );
    // Requests in a loop from outside, each a new connection, for the whole test.
    let client = Background::requests(&lab.ext_ns, &url);
    let mut open = Persistent::open(
        &lab.ext_ns,
        SocketAddr::from((NODE_IP6, 30080)),
        SocketAddr::from((NODE_IP6, 30053)),
    )
    .expect("open");
    let (tcp_pod, udp_pod) = (open.http().expect("http"), open.udp().expect("udp"));
    std::thread::sleep(Duration::from_millis(700));

    lab.kill_agent().expect("kill -9");
    std::thread::sleep(Duration::from_millis(1500));
    lab.start_agent().expect("restart");
    lab.wait_healthy(Duration::from_secs(10))
        .expect("healthy again");
    std::thread::sleep(Duration::from_millis(700));
    let (ok, failed) = client.finish();

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
    let log = lab.agent_log();
    assert!(log.contains("taken_over=true"), "{log}");
    eprintln!("{ok} IPv6 requests, none failed, across an agent kill and restart");
}
