//! The agent's health and metrics as operators meet them, kube-proxy's way: `/healthz` and
//! `/livez` on the healthz address (node eligibility through the API double, a change left
//! unprogrammed past the health timeout, a failed apply retried in time), the metrics address
//! (`/metrics` parsed as Prometheus text, `/proxyMode`, `/debug/frontends`), and the HTTP
//! server itself (a stalled half request, keep-alive, concurrent scrapes). Needs root and the
//! workspace's binaries (`cargo build`).
// Harness code: a lab that cannot be built panics with a message, and floats are compared
// exactly where they were parsed from integers.
#![allow(clippy::missing_panics_doc, clippy::float_cmp)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use lb_testkit::{
    apiserver::{ApiServer, Kind},
    lab::{enter_netns, in_netns, wait_for, Lab, NODE_NAME},
    require_root,
};
use prometheus_parse::{Sample, Scrape, Value};

/// One lab at a time (timings on a 2-core machine).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const HEALTHZ_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;
/// The agent's header read timeout (`agent::http::HEADER_READ_TIMEOUT`).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

fn turn() -> MutexGuard<'static, ()> {
    require_root();
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `web`: ClusterIP 10.96.0.10:80 with one endpoint (one frontend).
const WEB: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["10.244.0.11"], nodeName: lab-node}]
"#;

/// Three more ClusterIP Services: with `web`, four frontends, one more than
/// `--max-services 4` holds (service ids start at 1), so the apply is refused.
fn too_many() -> String {
    (1..=3)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: extra-{i}, namespace: default}}\n\
                 spec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80}}]}}\n---\n"
            )
        })
        .collect()
}

/// A lab with `web` in its manifests and the agent started with `flags`, healthy.
fn manifests_lab(flags: &[&str]) -> Lab {
    let mut lab = Lab::up(1).expect("lab up");
    lab.write_manifest("web.yaml", WEB).expect("manifest");
    lab.start_agent_args(flags).expect("agent");
    lab.wait_healthy(Duration::from_secs(15)).expect("healthy");
    lab
}

/// An answer as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A TCP connection to the agent's `port` from the node's namespace.
fn connect(lab: &Lab, port: u16) -> BufReader<TcpStream> {
    let conn = in_netns(&lab.node_ns, move || {
        let s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    })
    .expect("connect");
    BufReader::new(conn)
}

/// Sends one request on `conn` and reads its answer (the agent's have a Content-Length).
fn exchange(conn: &mut BufReader<TcpStream>, method: &str, path: &str) -> std::io::Result<Answer> {
    write!(
        conn.get_mut(),
        "{method} {path} HTTP/1.1\r\nHost: lb-agent\r\n\r\n"
    )?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if conn.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("closed in the headers"));
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut answer = Answer {
        status,
        headers,
        body: String::new(),
    };
    let len: usize = answer
        .header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    if method != "HEAD" {
        let mut body = vec![0; len];
        conn.read_exact(&mut body)?;
        answer.body = String::from_utf8_lossy(&body).into_owned();
    }
    Ok(answer)
}

/// One GET on a new connection.
fn get(lab: &Lab, port: u16, path: &str) -> Answer {
    exchange(&mut connect(lab, port), "GET", path)
        .unwrap_or_else(|e| panic!("GET :{port}{path}: {e}; agent log:\n{}", lab.agent_log()))
}

fn healthz(lab: &Lab) -> u16 {
    get(lab, HEALTHZ_PORT, "/healthz").status
}

/// /metrics, parsed by a Prometheus text-format parser.
fn scrape(lab: &Lab) -> Scrape {
    let a = get(lab, METRICS_PORT, "/metrics");
    assert_eq!(a.status, 200, "{a:?}");
    Scrape::parse(a.body.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text")
}

fn sample<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
}

/// A counter's value; panics if the series is missing or not a counter.
fn counter(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(s, metric, labels).map(|x| &x.value) {
        Some(Value::Counter(v)) => *v,
        other => panic!("{metric}{labels:?}: not a counter: {other:?}"),
    }
}

/// A gauge's value; panics if the series is missing or not a gauge.
fn gauge(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(s, metric, labels).map(|x| &x.value) {
        Some(Value::Gauge(v)) => *v,
        other => panic!("{metric}{labels:?}: not a gauge: {other:?}"),
    }
}

/// A histogram's buckets (upper bound, cumulative count); panics if it is not one.
fn histogram(s: &Scrape, metric: &str) -> Vec<(f64, f64)> {
    match sample(s, metric, &[]).map(|x| &x.value) {
        Some(Value::Histogram(b)) => b.iter().map(|b| (b.less_than, b.count)).collect(),
        other => panic!("{metric}: not a histogram: {other:?}"),
    }
}

/// How many observations a histogram holds (its +Inf bucket).
fn observations(s: &Scrape, metric: &str) -> f64 {
    histogram(s, metric)
        .iter()
        .find(|(le, _)| le.is_infinite())
        .map_or(0.0, |(_, c)| *c)
}

/// Samples /healthz on fresh connections every 50 ms from a thread, until `finish`.
struct HealthSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl HealthSampler {
    fn start(lab: &Lab) -> HealthSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, flag) = (lab.node_ns.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            if let Err(e) = enter_netns(&ns) {
                return vec![format!("entering {ns}: {e}")];
            }
            while !flag.load(Ordering::Relaxed) {
                let answer = TcpStream::connect(("127.0.0.1", HEALTHZ_PORT)).and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    exchange(&mut BufReader::new(s), "GET", "/healthz")
                });
                seen.push(match answer {
                    Ok(a) => a.status.to_string(),
                    Err(e) => e.to_string(),
                });
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        HealthSampler { stop, thread }
    }

    /// What each sample answered ("200", "503" or an error).
    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| vec!["the sampler panicked".into()])
    }
}

/// The API double with this lab's Node (and `taints` / a deletionTimestamp when asked), `web`
/// as a Service and its EndpointSlice, and the agent started against it, healthy.
struct ApiLab {
    api: ApiServer,
    lab: Lab,
}

fn node_yaml(taints: &str, deleting: bool) -> String {
    let deletion = if deleting {
        ", deletionTimestamp: \"2024-01-01T00:00:00Z\", finalizers: [test/hold]"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}{deletion}}}\nspec: {{taints: [{taints}]}}\n"
    )
}

fn api_lab(flags: &[&str]) -> ApiLab {
    let mut lab = Lab::up(1).expect("lab up");
    let api = ApiServer::start(Some(&lab.node_ns)).expect("api double");
    api.apply_yaml(&node_yaml("", false)).expect("node");
    api.apply_yaml(WEB).expect("web");
    lab.start_agent_kube_args(&api.kubeconfig(), flags)
        .expect("agent");
    lab.wait_healthy(Duration::from_secs(15)).expect("healthy");
    ApiLab { api, lab }
}

/// Waits until /healthz answers `code`.
fn wait_healthz(lab: &Lab, code: u16, what: &str) {
    wait_for(Duration::from_secs(8), || Ok(healthz(lab) == code)).unwrap_or_else(|_| {
        panic!(
            "{what}: /healthz is not {code}: {:?}; agent log:\n{}",
            get(lab, HEALTHZ_PORT, "/healthz"),
            lab.agent_log()
        )
    });
}

#[test]
fn healthz_says_503_while_the_node_is_being_deleted_and_livez_stays_200() {
    let _turn = turn();
    let s = api_lab(&[]);
    let lab = &s.lab;
    let a = get(lab, HEALTHZ_PORT, "/healthz");
    assert_eq!(a.status, 200, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("json");
    assert_eq!(v["nodeEligible"], true, "{a:?}");
    assert!(
        v["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{a:?}"
    );
    assert!(
        v["currentTime"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{a:?}"
    );
    assert_eq!(a.header("content-type"), Some("application/json"));

    let cases = [
        (
            "the ToBeDeletedByClusterAutoscaler taint",
            node_yaml(
                "{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}",
                false,
            ),
        ),
        ("a deletionTimestamp", node_yaml("", true)),
    ];
    for (what, node) in cases {
        // Another taint changes nothing.
        s.api
            .apply_yaml(&node_yaml(
                "{key: node.kubernetes.io/unschedulable, effect: NoSchedule}",
                false,
            ))
            .expect("other taint");
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(healthz(lab), 200, "another taint");

        s.api.apply_yaml(&node).expect(what);
        wait_healthz(lab, 503, what);
        let a = get(lab, HEALTHZ_PORT, "/healthz");
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("json");
        assert_eq!(v["nodeEligible"], false, "{what}: {a:?}");
        assert!(
            v["lastUpdated"].as_str().is_some_and(|t| !t.is_empty()),
            "{a:?}"
        );
        let live = get(lab, HEALTHZ_PORT, "/livez");
        assert_eq!(live.status, 200, "{what}: /livez {live:?}");
        assert!(!live.body.contains("nodeEligible"), "{live:?}");

        s.api.apply_yaml(&node_yaml("", false)).expect("back");
        wait_healthz(lab, 200, &format!("{what} gone"));
    }
    // Counted by code, as kube-proxy's proxy_healthz_total / proxy_livez_total.
    let m = scrape(lab);
    assert!(counter(&m, "kubeproxy_proxy_healthz_total", &[("code", "503")]) >= 2.0);
    assert!(counter(&m, "kubeproxy_proxy_healthz_total", &[("code", "200")]) >= 3.0);
    assert!(counter(&m, "kubeproxy_proxy_livez_total", &[("code", "200")]) >= 2.0);
}

#[test]
fn a_change_left_unprogrammed_past_the_health_timeout_makes_the_agent_unhealthy() {
    let _turn = turn();
    let timeout = Duration::from_secs(3);
    let lab = manifests_lab(&["--max-services", "4", "--healthz-timeout", "3"]);
    let before = get(&lab, HEALTHZ_PORT, "/healthz");
    assert_eq!(before.status, 200, "{before:?}");

    let written = Instant::now();
    lab.write_manifest("extra.yaml", &too_many())
        .expect("manifest");
    wait_for(Duration::from_secs(3), || {
        Ok(lab.agent_log().contains("programming the datapath failed"))
    })
    .unwrap_or_else(|_| panic!("the apply was not refused:\n{}", lab.agent_log()));
    // Refused, and retried: healthy while the change is younger than the timeout.
    if written.elapsed() + Duration::from_millis(800) < timeout {
        assert_eq!(healthz(&lab), 200, "a failed apply alone");
    }
    wait_healthz(
        &lab,
        503,
        "a change unprogrammed for longer than the timeout",
    );
    assert!(
        written.elapsed() >= timeout,
        "503 after {:?}, before the timeout",
        written.elapsed()
    );
    let a = get(&lab, HEALTHZ_PORT, "/healthz");
    let v: serde_json::Value = serde_json::from_str(&a.body).expect("json");
    assert_eq!(v["nodeEligible"], true, "{a:?}");
    let was: serde_json::Value = serde_json::from_str(&before.body).expect("json");
    assert_eq!(v["lastUpdated"], was["lastUpdated"], "no sync since");
    assert_eq!(get(&lab, HEALTHZ_PORT, "/livez").status, 503);

    // The change taken back: programmed, healthy again.
    lab.remove_manifest("extra.yaml").expect("remove");
    wait_healthz(&lab, 200, "the change taken back");
    assert_eq!(get(&lab, HEALTHZ_PORT, "/livez").status, 200);
}

#[test]
fn a_failed_apply_retried_in_time_keeps_the_agent_healthy() {
    let _turn = turn();
    // The default health timeout (60 s): the refused state stays for about 2 s.
    let lab = manifests_lab(&["--max-services", "4"]);
    let sampler = HealthSampler::start(&lab);
    lab.write_manifest("extra.yaml", &too_many())
        .expect("manifest");
    wait_for(Duration::from_secs(3), || {
        Ok(lab.agent_log().contains("programming the datapath failed"))
    })
    .unwrap_or_else(|_| panic!("the apply was not refused:\n{}", lab.agent_log()));
    std::thread::sleep(Duration::from_secs(1));
    lab.remove_manifest("extra.yaml").expect("remove");
    // Programmed again: the extra frontends never made it, web is there.
    wait_for(Duration::from_secs(5), || {
        let log = lab.agent_log();
        let after = log
            .rfind("programming the datapath failed")
            .map_or("", |i| &log[i..]);
        Ok(after.contains("datapath programmed"))
    })
    .unwrap_or_else(|_| panic!("not programmed again:\n{}", lab.agent_log()));
    std::thread::sleep(Duration::from_millis(300));
    let seen = sampler.finish();
    assert!(seen.len() >= 20, "only {} samples", seen.len());
    let bad: Vec<&String> = seen.iter().filter(|s| *s != "200").collect();
    assert!(
        bad.is_empty(),
        "/healthz was not 200 {} times of {}: {:?}",
        bad.len(),
        seen.len(),
        &bad[..bad.len().min(5)]
    );
    let frontends = get(&lab, METRICS_PORT, "/debug/frontends");
    let list: Vec<serde_json::Value> = serde_json::from_str(&frontends.body).expect("json");
    assert_eq!(list.len(), 1, "{list:?}");
}

#[test]
fn the_metrics_address_serves_metrics_proxy_mode_and_debug_and_the_healthz_address_health_only() {
    let _turn = turn();
    let lab = manifests_lab(&[]);

    let m = get(&lab, METRICS_PORT, "/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        m.headers
    );
    let mode = get(&lab, METRICS_PORT, "/proxyMode");
    assert_eq!((mode.status, mode.body.as_str()), (200, "ebpf"));
    let debug = get(&lab, METRICS_PORT, "/debug/frontends");
    assert_eq!(debug.status, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&debug.body).expect("json");
    assert!(
        list.iter()
            .any(|f| f["frontend"] == "10.96.0.10:80/TCP" && f["service"] == "default/web:http"),
        "{list:?}"
    );
    // kube-proxy's metrics server has the generic health handler, not the proxy's health.
    let ok = get(&lab, METRICS_PORT, "/healthz");
    assert_eq!((ok.status, ok.body.as_str()), (200, "ok"));
    for path in ["/livez", "/"] {
        assert_eq!(get(&lab, METRICS_PORT, path).status, 404, "metrics {path}");
    }

    for path in [
        "/metrics",
        "/debug/frontends",
        "/proxyMode",
        "/",
        "/healthz/x",
    ] {
        let a = get(&lab, HEALTHZ_PORT, path);
        assert_eq!(a.status, 404, "healthz {path}: {a:?}");
    }
    let mut conn = connect(&lab, HEALTHZ_PORT);
    let post = exchange(&mut conn, "POST", "/healthz").expect("POST");
    assert_eq!(post.status, 405, "{post:?}");
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    let head = exchange(&mut connect(&lab, HEALTHZ_PORT), "HEAD", "/healthz").expect("HEAD");
    assert_eq!(head.status, 200, "{head:?}");
    assert!(
        head.header("content-length")
            .is_some_and(|l| l.parse::<usize>().is_ok_and(|n| n > 0)),
        "{head:?}"
    );
    // kube-proxy's query strings are ignored.
    assert_eq!(get(&lab, HEALTHZ_PORT, "/healthz?verbose=1").status, 200);
}

#[test]
fn metrics_count_changes_and_programming_latency_as_kube_proxy() {
    let _turn = turn();
    let s = api_lab(&[]);
    let lab = &s.lab;
    let settled = |m: &Scrape| {
        gauge(
            m,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            &[],
        ) == 0.0
            && gauge(m, "kubeproxy_sync_proxy_rules_service_changes_pending", &[]) == 0.0
    };
    wait_for(Duration::from_secs(5), || Ok(settled(&scrape(lab)))).expect("nothing pending");
    let m = scrape(lab);

    // Types, labels and buckets as kube-proxy's.
    let sync = histogram(&m, "kubeproxy_sync_proxy_rules_duration_seconds");
    assert_eq!(sync.len(), 16, "{sync:?}");
    assert_eq!((sync[0].0, sync[14].0), (0.001, 16.384));
    let prog = histogram(&m, "kubeproxy_network_programming_duration_seconds");
    assert_eq!(prog.len(), 81, "{prog:?}");
    assert_eq!((prog[0].0, prog[2].0, prog[79].0), (0.25, 1.0, 300.0));
    assert!(gauge(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[]) > 1.6e9);
    assert!(
        gauge(
            &m,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            &[]
        ) > 1.6e9
    );
    for policy in ["internal", "external"] {
        assert_eq!(
            gauge(
                &m,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                &[("traffic_policy", policy)]
            ),
            0.0
        );
    }
    assert_eq!(
        gauge(&m, "lb_source_info", &[("source", "kubernetes")]),
        1.0
    );
    assert_eq!(gauge(&m, "lb_api_connected", &[]), 1.0);
    assert!(counter(&m, "kubeproxy_proxy_healthz_total", &[("code", "200")]) >= 1.0);
    assert!(gauge(&m, "lb_map_capacity", &[("map", "LB4_SERVICES")]) > 0.0);
    // The initial lists count as changes, as kube-proxy's informers' adds do.
    let services = counter(&m, "kubeproxy_sync_proxy_rules_service_changes_total", &[]);
    let endpoints = counter(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total", &[]);
    assert_eq!((services, endpoints), (1.0, 1.0));
    let programmed = observations(&m, "kubeproxy_network_programming_duration_seconds");
    assert_eq!(
        programmed, 0.0,
        "the initial list is not a change to measure"
    );

    // Each step: an object change, then the counts once it is programmed.
    let step = |what: &str, change: &dyn Fn(), want: (f64, f64, f64)| {
        change();
        let mut last = None;
        let done = wait_for(Duration::from_secs(5), || {
            let m = scrape(lab);
            let got = (
                counter(&m, "kubeproxy_sync_proxy_rules_service_changes_total", &[]),
                counter(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total", &[]),
                observations(&m, "kubeproxy_network_programming_duration_seconds"),
            );
            last = Some(got);
            Ok(got == want && settled(&m))
        });
        assert!(
            done.is_ok(),
            "{what}: (service changes, endpoint changes, latencies measured) {last:?}, want \
             {want:?}; agent log:\n{}",
            lab.agent_log()
        );
    };
    let slice = |ips: &str, trigger: &str| {
        WEB.split("---\n")
            .nth(1)
            .unwrap_or_default()
            .replace(
                "labels: {kubernetes.io/service-name: web}}",
                &format!(
                    "labels: {{kubernetes.io/service-name: web}}, annotations: \
                 {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}}}"
                ),
            )
            .replace("[\"10.244.0.11\"]", ips)
    };
    // Trigger times have second precision: one from after the agent started.
    std::thread::sleep(Duration::from_millis(1100));
    step(
        "an EndpointSlice edit",
        &|| {
            s.api
                .apply_yaml(&slice("[\"10.244.0.12\"]", &rfc3339_now()))
                .expect("slice");
        },
        (1.0, 2.0, 1.0),
    );
    step(
        "an EndpointSlice edit with a trigger time from before the agent started",
        &|| {
            s.api
                .apply_yaml(&slice("[\"10.244.0.13\"]", "2020-01-01T00:00:00Z"))
                .expect("slice");
        },
        (1.0, 3.0, 1.0),
    );
    step(
        "a Service edit",
        &|| {
            s.api
                .apply_yaml(
                    &WEB.split("---\n")
                        .next()
                        .unwrap_or_default()
                        .replace("namespace: default}", "namespace: default, labels: {a: b}}"),
                )
                .expect("service");
        },
        (2.0, 3.0, 1.0),
    );
    step(
        "another EndpointSlice edit",
        &|| {
            s.api
                .apply_yaml(&slice("[\"10.244.0.14\"]", &rfc3339_now()))
                .expect("slice");
        },
        (2.0, 4.0, 2.0),
    );
    // Its annotation tells when the slice last changed, not when it was deleted.
    step(
        "the EndpointSlice deleted",
        &|| {
            s.api
                .delete(Kind::EndpointSlice, "default", "web-1")
                .expect("delete");
        },
        (2.0, 5.0, 2.0),
    );
    // The latencies measured are sane ones (each change was programmed within seconds).
    let m = scrape(lab);
    let prog = histogram(&m, "kubeproxy_network_programming_duration_seconds");
    let within_5s = prog
        .iter()
        .find(|(le, _)| *le == 5.0)
        .map_or(0.0, |(_, c)| *c);
    assert_eq!(within_5s, 2.0, "{prog:?}");
}

#[test]
fn a_stalled_half_request_holds_up_nothing_and_is_closed_after_the_header_timeout() {
    let _turn = turn();
    let lab = manifests_lab(&[]);
    let mut stalled = connect(&lab, HEALTHZ_PORT);
    let opened = Instant::now();
    stalled
        .get_mut()
        .write_all(b"GET /heal")
        .expect("half a request");
    let mut stalled_metrics = connect(&lab, METRICS_PORT);
    stalled_metrics
        .get_mut()
        .write_all(b"GET /metr")
        .expect("half a request");
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(healthz(&lab), 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "/healthz took {:?} beside a stalled request",
            started.elapsed()
        );
        let started = Instant::now();
        assert_eq!(get(&lab, METRICS_PORT, "/metrics").status, 200);
        assert!(started.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The stalled connection is closed once the header timeout is over (with or without a
    // 408 first), not before.
    let mut rest = Vec::new();
    let read = stalled.read_to_end(&mut rest);
    let closed = opened.elapsed();
    assert!(
        read.is_ok() || opened.elapsed() < Duration::from_secs(10),
        "{read:?}"
    );
    assert!(
        closed + Duration::from_millis(500) >= HEADER_READ_TIMEOUT
            && closed < HEADER_READ_TIMEOUT + Duration::from_secs(3),
        "closed after {closed:?}: {read:?} {:?}",
        String::from_utf8_lossy(&rest)
    );
    let mut rest = Vec::new();
    let _ = stalled_metrics.read_to_end(&mut rest);
    assert!(opened.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(3));
}

#[test]
fn requests_on_a_kept_alive_connection_and_concurrent_scrapes_are_all_answered() {
    let _turn = turn();
    let lab = manifests_lab(&[]);
    let mut conn = connect(&lab, HEALTHZ_PORT);
    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/livez"),
        ("HEAD", "/healthz"),
        ("GET", "/healthz"),
    ] {
        let a = exchange(&mut conn, method, path)
            .unwrap_or_else(|e| panic!("{method} {path} on the same connection: {e}"));
        assert_eq!(a.status, 200, "{method} {path}: {a:?}");
        assert_ne!(a.header("connection"), Some("close"), "{a:?}");
    }
    let mut conn = connect(&lab, METRICS_PORT);
    let m = exchange(&mut conn, "GET", "/metrics").expect("metrics");
    assert_eq!(m.status, 200);
    let mode = exchange(&mut conn, "GET", "/proxyMode").expect("proxyMode on the same connection");
    assert_eq!(mode.body, "ebpf");

    // Eight scrapers at once, five scrapes each.
    let ns = lab.node_ns.clone();
    let started = Instant::now();
    let scrapers: Vec<_> = (0..8)
        .map(|_| {
            let ns = ns.clone();
            std::thread::spawn(move || -> Result<usize, String> {
                enter_netns(&ns).map_err(|e| e.to_string())?;
                let mut ok = 0;
                for _ in 0..5 {
                    let s = TcpStream::connect(("127.0.0.1", METRICS_PORT))
                        .map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(|e| e.to_string())?;
                    let a = exchange(&mut BufReader::new(s), "GET", "/metrics")
                        .map_err(|e| e.to_string())?;
                    Scrape::parse(a.body.lines().map(|l| Ok(l.to_owned())))
                        .map_err(|e| e.to_string())?;
                    if a.status == 200
                        && a.body
                            .contains("kubeproxy_sync_proxy_rules_duration_seconds_count")
                    {
                        ok += 1;
                    }
                }
                Ok(ok)
            })
        })
        .collect();
    let answered: Vec<Result<usize, String>> = scrapers
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("panicked".into())))
        .collect();
    assert!(
        answered.iter().all(|r| r == &Ok(5)),
        "{answered:?}; agent log:\n{}",
        lab.agent_log()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Now, as the API writes timestamps (RFC 3339, UTC, seconds).
fn rfc3339_now() -> String {
    let out = lb_testkit::lab::run(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default();
    out.trim().to_string()
}
