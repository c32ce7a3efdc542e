//! Real traffic through a datapath: `wrk` (HTTP request and new-connection rates, latency
//! percentiles) and `iperf3` (TCP throughput), run in a lab namespace; and the parsers of
//! their output.

use std::{net::SocketAddrV4, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::stats;

/// What one `wrk` run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Wrk {
    /// Completed requests.
    pub requests: u64,
    /// wrk's own run time.
    pub seconds: f64,
    /// Latency percentiles (ms): 50, 75, 90, 99.
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    pub errors: u64,
}

impl Wrk {
    /// Completed requests per second (with `Connection: close`: new connections per second).
    pub fn rate(&self) -> f64 {
        stats::rate(
            self.requests,
            Duration::from_secs_f64(self.seconds.max(0.0)),
        )
        .unwrap_or(0.0)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "seconds": self.seconds,
            "per_second": self.rate(),
            "latency_ms": {"p50": self.p50_ms, "p75": self.p75_ms, "p90": self.p90_ms, "p99": self.p99_ms},
            "errors": self.errors,
        })
    }
}

/// A wrk duration such as `812.00us`, `1.25ms`, `5.00s` or `1.00m`, in milliseconds.
fn wrk_time_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(v * factor)
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(text: &str) -> Result<Wrk> {
    let mut requests = None;
    let mut seconds = None;
    let mut pct = [None; 4];
    let mut errors = 0u64;
    for line in text.lines() {
        let line = line.trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        // "64687 requests in 5.00s, 5.12MB read"
        if words.len() >= 4 && words[1] == "requests" && words[2] == "in" {
            requests = words[0].parse::<u64>().ok();
            seconds = wrk_time_ms(words[3].trim_end_matches(',')).map(|ms| ms / 1000.0);
        }
        // "50%    1.10ms" (the latency distribution)
        if words.len() == 2 {
            let slot = match words[0] {
                "50%" | "50.000%" => Some(0),
                "75%" | "75.000%" => Some(1),
                "90%" | "90.000%" => Some(2),
                "99%" | "99.000%" => Some(3),
                _ => None,
            };
            if let Some(i) = slot {
                pct[i] = wrk_time_ms(words[1]);
            }
        }
        // "Socket errors: connect 0, read 12, write 0, timeout 0"
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let n = part
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse::<u64>().ok());
                errors += n.context("a socket error count that is not a number")?;
            }
        }
        // "Non-2xx or 3xx responses: 3"
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().context("non-2xx count")?;
        }
    }
    let (Some(requests), Some(seconds)) = (requests, seconds) else {
        bail!("no `N requests in T` line in wrk's output:\n{text}");
    };
    let [Some(p50_ms), Some(p75_ms), Some(p90_ms), Some(p99_ms)] = pct else {
        bail!("no latency distribution in wrk's output (run with --latency):\n{text}");
    };
    Ok(Wrk {
        requests,
        seconds,
        p50_ms,
        p75_ms,
        p90_ms,
        p99_ms,
        errors,
    })
}

/// What wrk is asked to do.
pub struct WrkRun<'a> {
    pub ns: &'a str,
    pub to: SocketAddrV4,
    pub duration: Duration,
    pub threads: usize,
    pub connections: usize,
    /// `Connection: close`: every request on a new connection.
    pub close: bool,
}

/// Runs wrk in namespace `ns` against `http://to/`.
pub fn wrk(r: &WrkRun<'_>) -> Result<Wrk> {
    let secs = r.duration.as_secs().max(1).to_string();
    let (t, c) = (r.threads.to_string(), r.connections.to_string());
    let url = format!("http://{}/", r.to);
    let mut args = vec![
        "ip",
        "netns",
        "exec",
        r.ns,
        "wrk",
        "--latency",
        "--timeout",
        "2s",
        "-t",
        &t,
        "-c",
        &c,
        "-d",
        &secs,
    ];
    if r.close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = lb_testkit::lab::run(&args)?;
    parse_wrk(&out).with_context(|| format!("wrk against {url}"))
}

/// What one `iperf3` run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Iperf {
    /// What the server received, bits per second.
    pub bits_per_second: f64,
    /// TCP retransmissions the sender counted.
    pub retransmits: Option<u64>,
}

impl Iperf {
    pub fn to_json(&self) -> Value {
        json!({"gbit_per_second": self.bits_per_second / 1e9, "retransmits": self.retransmits})
    }
}

/// Parses `iperf3 -J` output (client side).
pub fn parse_iperf3(text: &str) -> Result<Iperf> {
    let v: Value = serde_json::from_str(text).context("iperf3 -J output is not JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 -J output has no end.sum_received.bits_per_second")?;
    Ok(Iperf {
        bits_per_second: bps,
        retransmits: end["sum_sent"]["retransmits"].as_u64(),
    })
}

/// Runs an iperf3 TCP client in namespace `ns` against `to` for `duration`.
pub fn iperf3(ns: &str, to: SocketAddrV4, duration: Duration) -> Result<Iperf> {
    let secs = duration.as_secs().max(1).to_string();
    let (ip, port) = (to.ip().to_string(), to.port().to_string());
    // iperf3 -J prints its JSON (with an "error" member) also when it fails.
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iperf3", "-J", "-c", &ip, "-p", &port])
        .args(["-t", &secs, "--connect-timeout", "2000"])
        .output()
        .context("running iperf3")?;
    parse_iperf3(&String::from_utf8_lossy(&out.stdout)).with_context(|| format!("iperf3 to {to}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_CLOSE: &str = "Running 5s test @ http://10.96.39.15:80/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.23ms  456.78us  12.34ms   78.90%
    Req/Sec     6.50k   300.12     7.00k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.40ms
     90%    1.80ms
     99%    3.20ms
  64687 requests in 5.00s, 5.12MB read
  Socket errors: connect 0, read 12, write 1, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:  12937.40
Transfer/sec:      1.02MB
";

    #[test]
    fn parses_wrk() {
        let w = parse_wrk(WRK_CLOSE).expect("parse");
        assert_eq!(w.requests, 64687);
        assert!((w.seconds - 5.0).abs() < 1e-9);
        assert!((w.p50_ms - 0.812).abs() < 1e-9, "{w:?}");
        assert!((w.p75_ms - 1.4).abs() < 1e-9);
        assert!((w.p90_ms - 1.8).abs() < 1e-9);
        assert!((w.p99_ms - 3.2).abs() < 1e-9);
        assert_eq!(w.errors, 12 + 1 + 2 + 3);
        // The same rate wrk prints.
        assert!((w.rate() - 12937.40).abs() < 0.1, "{}", w.rate());
    }

    #[test]
    fn parses_wrk_without_errors_and_with_long_units() {
        let text = "Running 1m test @ http://198.18.0.2:30000/
  1 threads and 1 connections
  Latency Distribution
     50%    1.00s
     75%    1.50s
     90%    2.00s
     99%    1.00m
  12 requests in 1.00m, 1.00KB read
Requests/sec:      0.20
";
        let w = parse_wrk(text).expect("parse");
        assert_eq!((w.requests, w.errors), (12, 0));
        assert!((w.seconds - 60.0).abs() < 1e-9);
        assert!((w.p50_ms - 1000.0).abs() < 1e-9);
        assert!((w.p99_ms - 60_000.0).abs() < 1e-9);
        assert!((w.rate() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn rejects_incomplete_wrk_output() {
        assert!(parse_wrk("").is_err());
        assert!(parse_wrk("unable to connect to 10.96.0.1:80 Connection refused").is_err());
        // Counts without the distribution (wrk run without --latency).
        assert!(parse_wrk("  10 requests in 1.00s, 1.00KB read\n").is_err());
        assert!(parse_wrk(&WRK_CLOSE.replace("read 12", "read x")).is_err());
        assert_eq!(wrk_time_ms("3.5ks"), None);
        assert_eq!(wrk_time_ms("ms"), None);
    }

    #[test]
    fn parses_iperf3() {
        let text = r#"{"start": {"connected": []},
          "intervals": [],
          "end": {"sum_sent": {"bytes": 1, "bits_per_second": 9.9e9, "retransmits": 7},
                  "sum_received": {"bytes": 1, "bits_per_second": 9.8e9}}}"#;
        let i = parse_iperf3(text).expect("parse");
        assert_eq!(i.bits_per_second, 9.8e9);
        assert_eq!(i.retransmits, Some(7));
        assert_eq!(i.to_json()["gbit_per_second"].as_f64(), Some(9.8));
        let err = r#"{"start": {}, "intervals": [], "end": {},
          "error": "unable to connect to server: Connection refused"}"#;
        let e = parse_iperf3(err).expect_err("an iperf3 error is an error");
        assert!(format!("{e}").contains("Connection refused"), "{e}");
        assert!(parse_iperf3("not json").is_err());
        assert!(parse_iperf3(r#"{"end": {}}"#).is_err());
    }
}
