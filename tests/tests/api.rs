//! End-to-end through the API server double: `lb-agent run --kubeconfig` in a lab node,
//! Services and EndpointSlices changed in the double, real clients. Needs root and the
//! workspace's binaries (`cargo build`).
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    collections::BTreeSet,
    path::Path,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_testkit::{
    apiserver::{wait_requests, ApiServer, Kind},
    lab::{
        endpoint_list, wait_for, Background, InCluster, Lab, LabPod, HTTP_PORT, NODE_IP, NODE_NAME,
    },
    require_root,
};

/// One lab at a time (timings on a 2-core machine); shared with nothing else in this binary.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Setup {
    api: ApiServer,
    lab: Lab,
    _turn: MutexGuard<'static, ()>,
}

impl Setup {
    /// `lb-agent run --kubeconfig` pointed at the double, until it is healthy.
    fn start_agent(&mut self) {
        let kubeconfig = self.api.kubeconfig();
        self.lab.start_agent_kube(&kubeconfig).expect("agent");
        self.lab
            .wait_healthy(Duration::from_secs(15))
            .expect("healthy");
    }
}

fn setup(pods: usize) -> Setup {
    require_root();
    let turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut lab = Lab::up(pods).expect("lab up");
    lab.start_servers().expect("servers");
    let api = ApiServer::start(Some(&lab.node_ns)).expect("api double");
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}, labels: {{topology.kubernetes.io/zone: zone-a}}}}\n"
    ))
    .expect("node");
    Setup {
        api,
        lab,
        _turn: turn,
    }
}

fn web_service(kind: &str, labels: &str) -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default, labels: {{{labels}}}}}
spec:
  type: {kind}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}, nodePort: 30080}}
"
    )
}

fn web_slice(pods: &[&LabPod]) -> String {
    let ips: Vec<std::net::Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    format!(
        r"apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: default
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]
endpoints:{}",
        endpoint_list(&ips, NODE_NAME)
    )
}

/// The (API group, resource, verb) triples the agent's requests to the double need, against
/// the rules of deploy/clusterrole.yaml: the ClusterRole must allow exactly those.
fn rbac_covers_exactly(requests: &[String]) {
    let mut used = BTreeSet::new();
    for r in requests {
        let path = r
            .trim_start_matches("GET ")
            .split('?')
            .next()
            .unwrap_or_default();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", g, _v, rest @ ..] => (*g, rest),
            _ => panic!("unexpected request {r}"),
        };
        let rest = match rest {
            ["namespaces", _, rest @ ..] => rest,
            _ => rest,
        };
        let verb = match (
            rest.len(),
            r.contains("watch=true") || r.contains("watch=1"),
        ) {
            (_, true) => "watch",
            (1, false) => "list",
            _ => "get",
        };
        used.insert((group.to_string(), rest[0].to_string(), verb.to_string()));
    }
    let role: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/clusterrole.yaml"),
        )
        .expect("clusterrole.yaml"),
    )
    .expect("yaml");
    let mut allowed = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let strs = |k: &str| -> Vec<String> {
            rule[k]
                .as_sequence()
                .expect(k)
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        for g in strs("apiGroups") {
            for res in strs("resources") {
                for v in strs("verbs") {
                    allowed.insert((g.clone(), res.clone(), v));
                }
            }
        }
    }
    assert_eq!(
        used, allowed,
        "the ClusterRole must allow exactly what the agent uses"
    );
}

/// The pods that answered `n` requests from `ns` to `url`.
fn served(lab: &Lab, ns: &str, url: &str, n: usize) -> BTreeSet<String> {
    lab.curl_many(ns, url, n)
        .expect("curl")
        .into_iter()
        .map(|r| match r {
            Ok(body) => body.split_whitespace().next().unwrap_or("?").to_string(),
            Err(()) => "FAILED".to_string(),
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(ToString::to_string).collect()
}

fn frontends(lab: &Lab) -> Vec<String> {
    lab.services_json()
        .expect("services")
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|f| f["frontend"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the pods answering NodePort requests from outside are exactly `want`.
/// The agent retries a failed watch after at most 5 s (and ±20 %); 8 s covers that.
fn wait_served(lab: &Lab, want: &[&str], what: &str) {
    let want = set(want);
    let url = format!("http://{NODE_IP}:30080/");
    let started = Instant::now();
    let mut last = BTreeSet::new();
    while started.elapsed() < Duration::from_secs(8) {
        last = served(lab, &lab.ext_ns, &url, 40);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what}: served by {last:?}, want {want:?}; agent log:\n{}",
        lab.agent_log()
    );
}

#[test]
fn services_and_endpointslices_from_the_api_server() {
    let mut s = setup(4);
    let pods = s.lab.pods.clone();
    let p = |i: usize| &pods[i - 1];
    s.api
        .apply_yaml(&web_service("NodePort", ""))
        .expect("service");
    s.api.apply_yaml(&web_slice(&[p(1), p(2)])).expect("slice");
    s.start_agent();

    // kube-proxy's informer selectors, and a watch with bookmarks after the list.
    let reqs = s.api.requests();
    assert!(
        reqs.iter().any(|r| r.starts_with("GET /api/v1/services?")
            && r.contains("labelSelector=!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless")),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.contains("fieldSelector=metadata.name=lab-node")),
        "{reqs:?}"
    );
    wait_requests(&s.api, Duration::from_secs(5), |r| {
        ["/api/v1/services?", "/api/v1/nodes?"].iter().all(|p| {
            r.iter()
                .any(|r| r.starts_with(&format!("GET {p}")) && r.contains("watch=true"))
        })
    })
    .expect("watches on Services and Nodes");
    wait_requests(&s.api, Duration::from_secs(5), |r| {
        r.iter().any(|r| {
            r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices?")
                && r.contains("watch=true")
        })
    })
    .expect("a watch on EndpointSlices");
    rbac_covers_exactly(&s.api.requests());

    wait_served(&s.lab, &["pod1", "pod2"], "created");
    s.api
        .apply_yaml(&web_slice(&[p(1), p(2), p(3), p(4)]))
        .expect("scale up");
    wait_served(&s.lab, &["pod1", "pod2", "pod3", "pod4"], "scaled up");
    s.api.apply_yaml(&web_slice(&[p(3)])).expect("scale down");
    wait_served(&s.lab, &["pod3"], "scaled down");
    // A second slice of the Service, then deleted: its endpoint comes and goes.
    let second = web_slice(&[p(4)]).replace("name: web-abcde", "name: web-fghij");
    s.api.apply_yaml(&second).expect("second slice");
    wait_served(&s.lab, &["pod3", "pod4"], "second slice");
    s.api
        .delete(Kind::EndpointSlice, "default", "web-fghij")
        .expect("delete slice");
    wait_served(&s.lab, &["pod3"], "second slice deleted");

    // Claimed by another proxy: the agent lets go of it; unclaimed: back.
    s.api
        .apply_yaml(&web_service(
            "NodePort",
            "service.kubernetes.io/service-proxy-name: other",
        ))
        .expect("label");
    wait_for(Duration::from_secs(5), || Ok(frontends(&s.lab).is_empty()))
        .expect("frontends removed");
    s.api
        .apply_yaml(&web_service("NodePort", ""))
        .expect("unlabel");
    wait_served(&s.lab, &["pod3"], "label removed");

    // Type changes: NodePort → ClusterIP drops the NodePort frontends; → ExternalName drops all.
    s.api
        .apply_yaml(&web_service("ClusterIP", ""))
        .expect("type ClusterIP");
    wait_for(Duration::from_secs(5), || {
        let f = frontends(&s.lab);
        Ok(f == vec!["10.96.0.10:80/TCP".to_string()])
    })
    .unwrap_or_else(|_| panic!("{:?}", frontends(&s.lab)));
    let pod1 = s.lab.pods[0].ns.clone();
    assert_eq!(
        served(&s.lab, &pod1, "http://10.96.0.10:80/", 10),
        set(&["pod3"])
    );
    s.api
        .apply_yaml(&web_service("ExternalName", "").replace(
            "  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]\n",
            "  externalName: example.com\n",
        ))
        .expect("type ExternalName");
    wait_for(Duration::from_secs(5), || Ok(frontends(&s.lab).is_empty())).expect("all removed");

    // Deleted.
    s.api
        .apply_yaml(&web_service("NodePort", ""))
        .expect("service again");
    wait_served(&s.lab, &["pod3"], "recreated");
    s.api
        .delete(Kind::Service, "default", "web")
        .expect("delete");
    wait_for(Duration::from_secs(5), || Ok(frontends(&s.lab).is_empty()))
        .expect("removed after delete");
}

#[test]
fn the_datapath_keeps_serving_while_the_api_server_is_away_and_catches_up_after() {
    let mut s = setup(4);
    let pods = s.lab.pods.clone();
    let p = |i: usize| &pods[i - 1];
    s.api
        .apply_yaml(&web_service("NodePort", ""))
        .expect("service");
    s.api.apply_yaml(&web_slice(&[p(1), p(2)])).expect("slice");
    s.start_agent();
    wait_served(&s.lab, &["pod1", "pod2"], "start");

    // Requests in a loop from outside for the whole test.
    let client = Background::requests(&s.lab.ext_ns, &format!("http://{NODE_IP}:30080/"));

    // The API server goes away; the datapath keeps its state.
    s.api.set_up(false);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        served(
            &s.lab,
            &s.lab.ext_ns,
            &format!("http://{NODE_IP}:30080/"),
            20
        ),
        set(&["pod1", "pod2"])
    );
    // Changes made meanwhile arrive once it is back, even though the history that would
    // have let the watch resume is gone (410 Gone → relist).
    s.api
        .apply_yaml(&web_slice(&[p(4)]))
        .expect("change while away");
    s.api.compact();
    s.api.set_up(true);
    wait_served(&s.lab, &["pod4"], "after the API server came back");

    // A dropped watch connection: resumes, and later changes arrive too.
    s.api.drop_connections();
    s.api
        .apply_yaml(&web_slice(&[p(2), p(3)]))
        .expect("change after drop");
    wait_served(&s.lab, &["pod2", "pod3"], "after a dropped connection");

    let (ok, failed) = client.finish();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while the API server was away: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 10, "only {ok} requests");
    let log = s.lab.agent_log();
    assert!(
        log.contains("watch failed"),
        "the outage was noticed: {log}"
    );
}

#[test]
fn the_agent_starts_with_in_cluster_configuration() {
    // As in a pod of the DaemonSet: no --kubeconfig, the API server at
    // KUBERNETES_SERVICE_HOST:PORT over TLS, trusted through the service account's ca.crt,
    // authenticated with its token.
    require_root();
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut lab = Lab::up(2).expect("lab up");
    lab.start_servers().expect("servers");
    let (api, ca) = ApiServer::start_tls(Some(&lab.node_ns)).expect("api double over TLS");
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\n"
    ))
    .expect("node");
    let pods = lab.pods.clone();
    api.apply_yaml(&web_service("NodePort", ""))
        .expect("service");
    api.apply_yaml(&web_slice(&pods.iter().collect::<Vec<_>>()))
        .expect("slice");
    lab.start_agent_incluster(api.addr.port(), &ca, "sa-token-123")
        .expect("agent");
    lab.wait_healthy(Duration::from_secs(15)).expect("healthy");
    wait_served(&lab, &["pod1", "pod2"], "in-cluster");
    let auth = api.authorizations();
    assert!(
        !auth.is_empty() && auth.iter().all(|a| a == "Bearer sa-token-123"),
        "{auth:?}"
    );
    // Nothing of the agent's mount namespace leaked to the host.
    assert!(!Path::new("/run/secrets/kubernetes.io/serviceaccount/token").exists());
}

#[test]
fn the_agent_starts_in_cluster_at_the_api_servers_own_address() {
    // On a cluster without kube-proxy: KUBERNETES_SERVICE_HOST:PORT is the `kubernetes`
    // Service's ClusterIP, which nothing serves before the agent has programmed it, so the
    // agent is given the API server's own address with --api-server. The double answers
    // only there (127.0.0.1:PORT in the node), nothing answers 10.96.0.1:443.
    require_root();
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut lab = Lab::up(2).expect("lab up");
    lab.start_servers().expect("servers");
    let (api, ca) = ApiServer::start_tls(Some(&lab.node_ns)).expect("api double over TLS");
    api.apply_yaml(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\n"
    ))
    .expect("node");
    let pods = lab.pods.clone();
    api.apply_yaml(&web_service("NodePort", ""))
        .expect("service");
    api.apply_yaml(&web_slice(&pods.iter().collect::<Vec<_>>()))
        .expect("slice");
    let port = api.addr.port();

    // HOST:PORT, with the environment naming the unprogrammed ClusterIP.
    let addr = format!("127.0.0.1:{port}");
    lab.start_agent_incluster_with(&InCluster {
        service_env: Some(("10.96.0.1", 443)),
        api_server: Some(&addr),
        ca_pem: &ca,
        token: "sa-token-123",
    })
    .expect("agent");
    lab.wait_healthy(Duration::from_secs(15)).expect("healthy");
    wait_served(&lab, &["pod1", "pod2"], "--api-server HOST:PORT");
    let log = lab.agent_log();
    assert!(
        log.contains(&format!("https://127.0.0.1:{port}/")) && log.contains("--api-server"),
        "the address used is logged: {log}"
    );
    let auth = api.authorizations();
    assert!(
        !auth.is_empty() && auth.iter().all(|a| a == "Bearer sa-token-123"),
        "{auth:?}"
    );

    // https://HOST:PORT with a DNS name (the certificate names `localhost`), and no
    // KUBERNETES_SERVICE_HOST/PORT at all. The new agent takes the datapath over; a change
    // made after its start shows that it watches.
    lab.kill_agent().expect("kill");
    let requests_before = api.authorizations().len();
    let url = format!("https://localhost:{port}");
    lab.start_agent_incluster_with(&InCluster {
        service_env: None,
        api_server: Some(&url),
        ca_pem: &ca,
        token: "sa-token-456",
    })
    .expect("agent again");
    lab.wait_healthy(Duration::from_secs(15))
        .expect("healthy again");
    api.apply_yaml(&web_slice(&[&pods[0]])).expect("change");
    wait_served(
        &lab,
        &["pod1"],
        "--api-server https://HOST:PORT, no environment",
    );
    let auth = api.authorizations();
    assert!(
        auth.len() > requests_before
            && auth[requests_before..]
                .iter()
                .all(|a| a == "Bearer sa-token-456"),
        "{auth:?}"
    );
    let log = lab.agent_log();
    assert!(
        log.contains(&format!("https://localhost:{port}/")),
        "the address used is logged: {log}"
    );
    assert!(!Path::new("/run/secrets/kubernetes.io/serviceaccount/token").exists());
}

#[test]
fn a_restarted_agent_changes_nothing_before_its_first_list() {
    let mut s = setup(2);
    let pods = s.lab.pods.clone();
    s.api
        .apply_yaml(&web_service("NodePort", ""))
        .expect("service");
    s.api
        .apply_yaml(&web_slice(&pods.iter().collect::<Vec<_>>()))
        .expect("slice");
    s.start_agent();
    wait_served(&s.lab, &["pod1", "pod2"], "start");
    let before = frontends(&s.lab);

    // The agent restarts while the API server answers lists slowly: until the lists are in,
    // the taken-over datapath must stay as it is (kube-proxy does not sync before that either).
    s.lab.kill_agent().expect("kill");
    s.api.set_list_delay(Duration::from_millis(2500));
    let client = Background::requests(&s.lab.ext_ns, &format!("http://{NODE_IP}:30080/"));
    let kubeconfig = s.api.kubeconfig();
    s.lab.start_agent_kube(&kubeconfig).expect("restart");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        frontends(&s.lab),
        before,
        "frontends changed before the first list"
    );
    s.lab
        .wait_healthy(Duration::from_secs(15))
        .expect("healthy again");
    let (ok, failed) = client.finish();
    assert!(
        failed.is_empty(),
        "{} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 5, "only {ok} requests");
    assert_eq!(frontends(&s.lab), before);
}

/// `web` with session affinity (`timeout` seconds) or without (`None`).
fn web_with_affinity(timeout: Option<u32>) -> String {
    let svc = web_service("NodePort", "");
    match timeout {
        Some(t) => svc.replace(
            "  selector:",
            &format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n  selector:"),
        ),
        None => svc.replace("  selector:", "  sessionAffinity: None\n  selector:"),
    }
}

#[test]
fn session_affinity_switched_on_off_and_expiring() {
    let mut s = setup(4);
    let pods = s.lab.pods.clone();
    let all: Vec<&LabPod> = pods.iter().collect();
    s.api
        .apply_yaml(&web_with_affinity(Some(30)))
        .expect("service");
    s.api.apply_yaml(&web_slice(&all)).expect("slice");
    s.start_agent();
    let url = format!("http://{NODE_IP}:30080/");
    let ext = s.lab.ext_ns.clone();

    // Sticky: every new connection of the client lands on one pod.
    let sticky = served(&s.lab, &ext, &url, 30);
    assert_eq!(sticky.len(), 1, "affinity on: {sticky:?}");

    // Switched off: spread again.
    s.api
        .apply_yaml(&web_with_affinity(None))
        .expect("affinity off");
    wait_for(Duration::from_secs(8), || {
        Ok(served(&s.lab, &ext, &url, 40).len() >= 3)
    })
    .expect("spread once affinity is off");

    // On again with a 1 s timeout: sticky within a burst; after each pause longer than the
    // timeout the choice is made afresh. Eight rounds all on one pod: a chance of 4^-7.
    s.api
        .apply_yaml(&web_with_affinity(Some(1)))
        .expect("affinity 1 s");
    wait_for(Duration::from_secs(8), || {
        Ok(served(&s.lab, &ext, &url, 10).len() == 1)
    })
    .expect("sticky again");
    let mut rounds = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1200));
        let burst = served(&s.lab, &ext, &url, 5);
        assert_eq!(
            burst.len(),
            1,
            "a burst within the timeout sticks: {burst:?}"
        );
        rounds.extend(burst);
    }
    assert!(rounds.len() > 1, "affinity never expired: {rounds:?}");
}

#[test]
fn only_terminating_endpoints_left_are_still_served() {
    let mut s = setup(2);
    s.api
        .apply_yaml(&web_service("NodePort", ""))
        .expect("service");
    let ips: Vec<String> = s.lab.pods.iter().map(|p| p.ip.to_string()).collect();
    let slice = |conditions: &str| {
        let eps: String = ips
            .iter()
            .map(|ip| format!("- {{addresses: [\"{ip}\"], nodeName: {NODE_NAME}, conditions: {conditions}}}\n"))
            .collect();
        web_slice(&[]).replace("endpoints: []\n", &format!("endpoints:\n{eps}"))
    };
    s.api.apply_yaml(&slice("{ready: true}")).expect("slice");
    s.start_agent();
    wait_served(&s.lab, &["pod1", "pod2"], "ready");
    // Both terminating but still serving: kube-proxy falls back to them.
    s.api
        .apply_yaml(&slice("{ready: false, serving: true, terminating: true}"))
        .expect("terminating");
    wait_for(Duration::from_secs(5), || {
        let v = s.lab.services_json()?;
        Ok(v.as_array().is_some_and(|l| {
            l.iter().any(|f| {
                f["frontend"] == "10.96.0.10:80/TCP"
                    && f["backends"].as_array().is_some_and(|b| {
                        b.iter().all(|b| b["state"] == "terminating") && b.len() == 2
                    })
            })
        }))
    })
    .expect("terminating endpoints programmed");
    wait_served(&s.lab, &["pod1", "pod2"], "only terminating endpoints");
    // No longer serving either: nothing usable, so refused.
    s.api
        .apply_yaml(&slice("{ready: false, serving: false, terminating: true}"))
        .expect("not serving");
    let pod1 = s.lab.pods[0].ns.clone();
    wait_for(Duration::from_secs(5), || {
        Ok(s.lab
            .curl(&pod1, "http://10.96.0.10:80/")
            .is_err_and(|e| e.to_string().contains("curl: (7)")))
    })
    .expect("refused once nothing serves");
}

fn metrics(lab: &Lab) -> String {
    lb_testkit::lab::run(&[
        "ip",
        "netns",
        "exec",
        &lab.node_ns,
        "curl",
        "-sS",
        "--max-time",
        "2",
        "http://127.0.0.1:10249/metrics",
    ])
    .expect("metrics")
}

fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn external_traffic_policy_local_with_health_check_and_load_balancer_ip() {
    let mut s = setup(3);
    let lb_ip = "192.0.2.10";
    lb_testkit::lab::run(&[
        "ip",
        "-n",
        &s.lab.ext_ns,
        "route",
        "add",
        &format!("{lb_ip}/32"),
        "via",
        &NODE_IP.to_string(),
    ])
    .expect("route to the LB IP");
    let svc = web_service("LoadBalancer", "").replace(
        "  selector:",
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n  selector:",
    ) + &format!("status:\n  loadBalancer:\n    ingress: [{{ip: {lb_ip}}}]\n");
    s.api.apply_yaml(&svc).expect("service");
    // pod1 is this node's; pod2 and pod3 are reported on another node.
    let ips: Vec<String> = s.lab.pods.iter().map(|p| p.ip.to_string()).collect();
    let slice = |local: &[usize], trigger: &str| {
        let eps: String = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                let node = if local.contains(&i) {
                    NODE_NAME
                } else {
                    "other-node"
                };
                format!("- {{addresses: [\"{ip}\"], nodeName: {node}}}\n")
            })
            .collect();
        web_slice(&[])
            .replace("endpoints: []\n", &format!("endpoints:\n{eps}"))
            .replace(
                "  labels: {kubernetes.io/service-name: web}",
                &format!("  labels: {{kubernetes.io/service-name: web}}\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}"),
            )
    };
    s.api
        .apply_yaml(&slice(&[0], &rfc3339_now()))
        .expect("slice");
    s.start_agent();
    let ext = s.lab.ext_ns.clone();
    let hc = || {
        lb_testkit::lab::run(&[
            "ip",
            "netns",
            "exec",
            &ext,
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "2",
            &format!("http://{NODE_IP}:32000/"),
        ])
        .unwrap_or_else(|e| e.to_string())
        .replace("\r\n", "\n")
    };

    // From outside, to the NodePort and to the LB IP: only the local endpoint, client kept.
    wait_served(&s.lab, &["pod1"], "external, Local");
    assert_eq!(
        served(&s.lab, &ext, &format!("http://{lb_ip}:80/"), 20),
        set(&["pod1"])
    );
    let body = s
        .lab
        .curl(&ext, &format!("http://{NODE_IP}:30080/"))
        .expect("request");
    assert!(body.contains("198.18.0.1:"), "client address kept: {body}");
    // The ClusterIP (internal policy Cluster) still spreads over all three.
    let pod2 = s.lab.pods[1].ns.clone();
    assert_eq!(
        served(&s.lab, &pod2, "http://10.96.0.10:80/", 60),
        set(&["pod1", "pod2", "pod3"])
    );
    // kube-proxy's health check: 200 with one local endpoint.
    let r = hc();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains("X-Load-Balancing-Endpoint-Weight: 1")
            && r.contains("X-Content-Type-Options: nosniff"),
        "{r}"
    );
    assert!(
        r.contains("\"localEndpoints\": 1") && r.contains("\"serviceProxyHealthy\": true"),
        "{r}"
    );
    // Any method and path, as kube-proxy's health check servers answer.
    let post = lb_testkit::lab::run(&[
        "ip",
        "netns",
        "exec",
        &ext,
        "curl",
        "-sS",
        "-i",
        "--max-time",
        "2",
        "-X",
        "POST",
        &format!("http://{NODE_IP}:32000/any"),
    ])
    .unwrap_or_else(|e| e.to_string());
    assert!(post.starts_with("HTTP/1.1 200"), "{post}");

    // No local endpoint: external traffic is dropped (not refused), the ClusterIP works on,
    // the health check says 503.
    s.api
        .apply_yaml(&slice(&[], &rfc3339_now()))
        .expect("no local endpoint");
    wait_for(Duration::from_secs(5), || {
        let v = s.lab.services_json()?;
        Ok(v.as_array().is_some_and(|l| {
            l.iter()
                .any(|f| f["frontend"] == "198.18.0.2:30080/TCP" && f["no_backend"] == "drop")
        }))
    })
    .expect("NodePort set to drop");
    let started = Instant::now();
    let err = s
        .lab
        .curl(&ext, &format!("http://{NODE_IP}:30080/"))
        .expect_err("dropped");
    assert!(
        err.to_string().contains("curl: (28)"),
        "a timeout, not a refusal: {err}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        served(&s.lab, &pod2, "http://10.96.0.10:80/", 30),
        set(&["pod1", "pod2", "pod3"])
    );
    // A pod of this node reaching the NodePort or the LB IP gets the Cluster set (kube-proxy's
    // short-circuit for local pods), so it is served although no endpoint is local.
    for url in [
        format!("http://{NODE_IP}:30080/"),
        format!("http://{lb_ip}:80/"),
    ] {
        assert_eq!(
            served(&s.lab, &pod2, &url, 30),
            set(&["pod1", "pod2", "pod3"]),
            "{url}"
        );
    }
    let r = hc();
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("\"localEndpoints\": 0"),
        "{r}"
    );

    // Metrics under kube-proxy's names.
    let m = metrics(&s.lab);
    assert_eq!(
        metric_value(
            &m,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"}"
        ),
        Some(1.0),
        "{m}"
    );
    let programmed =
        metric_value(&m, "kubeproxy_network_programming_duration_seconds_count").unwrap_or(0.0);
    assert!(programmed >= 1.0, "the slice change was measured: {m}");
    assert!(
        metric_value(
            &m,
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert!(
        metric_value(&m, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    assert!(
        metric_value(
            &m,
            "lb_frontend_new_flows_total{frontend=\"10.96.0.10:80/TCP\"}"
        )
        .unwrap_or(0.0)
            >= 90.0,
        "{m}"
    );
    // Per backend: pod1 served requests through the ClusterIP, counted in both directions.
    let pod1_ip = s.lab.pods[0].ip;
    let backend = format!("lb_backend_packets_total{{backend=\"{pod1_ip}:{HTTP_PORT}/TCP\"}}");
    assert!(
        metric_value(&m, &backend).unwrap_or(0.0) >= 20.0,
        "{backend}: {m}"
    );
}

/// Now, as the API writes timestamps (RFC 3339, UTC).
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let out = lb_testkit::lab::run(&[
        "date",
        "-u",
        "-d",
        &format!("@{secs}"),
        "+%Y-%m-%dT%H:%M:%SZ",
    ])
    .unwrap_or_default();
    out.trim().to_string()
}
