//! The single-node lab over IPv6, end to end through `lb-agent run --manifests`: an IPv6
//! NodePort Service keeps answering new connections, and its open TCP connection and UDP
//! flow keep their pods, while the agent is killed and started again (restart under load);
//! `lb-agent flows` shows each IPv6 decision. Needs root and the workspace's binaries
//! (`cargo build`).
#![allow(clippy::missing_panics_doc)]

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use lb_testkit::{
    lab::{self, Background, Lab, Persistent, HTTP_PORT, NODE_IP6, NODE_NAME, UDP_PORT},
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

/// A lab of `pods` dual-stack pods whose agent serves `web6`.
fn lab_with_web6(pods: usize) -> Lab {
    require_root();
    let mut lab = Lab::up(pods).expect("lab up");
    lab.add_ipv6().expect("IPv6 addresses");
    lab.start_servers().expect("servers");
    lab.write_manifest("web6.yaml", &web6(&lab))
        .expect("manifest");
    lab.start_agent().expect("agent");
    lab.wait_healthy(Duration::from_secs(10)).expect("healthy");
    lab
}

#[test]
fn ipv6_traffic_keeps_flowing_while_the_agent_is_killed_and_restarted() {
    let mut lab = lab_with_web6(3);
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

#[test]
fn flows_show_each_ipv6_decision() {
    let lab = lab_with_web6(2);
    let live = lab
        .spawn_agent_cli(&["flows", "-o", "json", "--duration", "2.5"])
        .expect("flows");
    std::thread::sleep(Duration::from_millis(500));
    let answers = lab
        .curl_many(&lab.ext_ns, &format!("http://[{NODE_IP6}]:30080/"), 10)
        .expect("curl");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let out = live.wait_with_output().expect("flows ends");
    assert!(out.status.success(), "flows: exit {}", out.status);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    let new: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "new").collect();
    let closed = events.iter().filter(|e| e["event"] == "closed").count();
    assert_eq!((new.len(), closed), (10, 10), "{events:?}");
    let client = format!("[{}]:", lab::CLIENT_IP6);
    for e in &new {
        assert!(
            e["client"].as_str().is_some_and(|c| c.starts_with(&client)),
            "{e}"
        );
        assert_eq!(e["frontend"], format!("[{NODE_IP6}]:30080"), "{e}");
        assert!(
            e["backend"].as_str().is_some_and(|b| lab
                .pods
                .iter()
                .any(|p| b == format!("[{}]:{HTTP_PORT}", p.ip6()))),
            "{e}"
        );
        assert_eq!(e["service"], "default/web6:http", "{e}");
        assert_eq!(e["proto"], "TCP", "{e}");
    }
}
