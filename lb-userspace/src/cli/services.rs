//! `lb-agent services`: what the datapath holds, from the pinned maps, as `cilium service
//! list` shows it.

use std::path::Path;

use anyhow::{Context, Result};
use lb_control::maps::{dump, FrontendDump};

use crate::datapath::{stats::read_service_stats, PinnedMaps};

/// Prints the frontends and their backends (as JSON with `json`), with each one's counters
/// with `stats`.
pub fn run(pin: &Path, json: bool, stats: bool) -> Result<()> {
    let m = PinnedMaps::open(pin)?;
    let rows = dump(&m).context("reading the service maps")?;
    let counters = if stats {
        let ids: Vec<u32> = rows.iter().map(|r| r.id).collect();
        Some(read_service_stats(pin, &ids)?)
    } else {
        None
    };
    if json {
        let mut v = serde_json::to_value(&rows)?;
        if let (Some(counters), Some(list)) = (&counters, v.as_array_mut()) {
            for (row, (_, c)) in list.iter_mut().zip(counters) {
                row["stats"] = serde_json::json!({
                    "packets": c.packets, "bytes": c.bytes,
                    "newFlows": c.new_flows, "rejected": c.rejected,
                });
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", format_table(&rows));
    if let Some(counters) = counters {
        println!(
            "\n{:<5} {:>10} {:>12} {:>10} {:>9}",
            "ID", "packets", "bytes", "new flows", "rejected"
        );
        for (id, c) in counters {
            println!(
                "{id:<5} {:>10} {:>12} {:>10} {:>9}",
                c.packets, c.bytes, c.new_flows, c.rejected
            );
        }
    }
    Ok(())
}

/// `cilium service list`-style table, both families: the frontend column as wide as the
/// longest frontend (an IPv6 one may be 47 characters), so that columns stay aligned.
pub fn format_table(rows: &[FrontendDump]) -> String {
    let width = rows
        .iter()
        .map(|r| r.frontend.len())
        .max()
        .unwrap_or(0)
        .max(24);
    let mut out = format!(
        "{:<5} {:<width$} {:<28} {}\n",
        "ID", "Frontend", "Service Type", "Backend"
    );
    for r in rows {
        let mut kind = r.kind.clone();
        if r.scope == "pods" {
            kind.push_str(" (pods)");
        }
        if r.affinity_timeout_s != 0 {
            kind.push_str(&format!(" (sticky {}s)", r.affinity_timeout_s));
        }
        let mut first = true;
        let mut line = |backend: String| {
            let (id, frontend, kind) = if first {
                (r.id.to_string(), r.frontend.as_str(), kind.as_str())
            } else {
                (String::new(), "", "")
            };
            out.push_str(&format!(
                "{id:<5} {frontend:<width$} {kind:<28} {backend}\n"
            ));
            first = false;
        };
        if r.backends.is_empty() {
            line(format!("(none: {})", r.no_backend));
        }
        for (i, b) in r.backends.iter().enumerate() {
            line(format!(
                "{} => {} ({}{})",
                i + 1,
                b.address,
                b.state,
                if b.local { ", local" } else { "" }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_control::maps::BackendDump;

    #[test]
    fn ipv6_frontends_are_listed_beside_ipv4_ones_in_aligned_columns() {
        let row = |id: u32, frontend: &str, backend: &str| FrontendDump {
            id,
            frontend: frontend.into(),
            kind: "NodePort".into(),
            no_backend: "reject",
            affinity_timeout_s: 0,
            scope: "all",
            backends: vec![BackendDump {
                id: id + 10,
                address: backend.into(),
                state: "active",
                local: false,
            }],
        };
        let rows = vec![
            row(1, "198.18.0.2:30080/TCP", "10.244.0.11:8080/TCP"),
            row(
                2,
                "[fc00:f853:ccd:e793::2]:30080/TCP",
                "[fd00:10:244::11]:8080/TCP",
            ),
        ];
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[2].starts_with("2     [fc00:f853:ccd:e793::2]:30080/TCP NodePort"),
            "{t}"
        );
        assert!(
            lines[2].ends_with("1 => [fd00:10:244::11]:8080/TCP (active)"),
            "{t}"
        );
        // Every column starts where its heading does.
        for heading in ["Service Type", "Backend"] {
            let at = lines[0].find(heading).expect("heading");
            for l in &lines[1..] {
                assert!(
                    l[at..].starts_with(if heading == "Backend" {
                        "1 =>"
                    } else {
                        "NodePort"
                    }),
                    "{t}"
                );
                assert_eq!(&l[at - 1..at], " ", "{t}");
            }
        }
    }

    #[test]
    fn table_names_scope_affinity_and_states() {
        let rows = vec![
            FrontendDump {
                id: 1,
                frontend: "198.18.0.2:30080/TCP".into(),
                kind: "NodePort".into(),
                no_backend: "drop",
                affinity_timeout_s: 0,
                scope: "all",
                backends: vec![],
            },
            FrontendDump {
                id: 2,
                frontend: "198.18.0.2:30080/TCP".into(),
                kind: "NodePort".into(),
                no_backend: "reject",
                affinity_timeout_s: 30,
                scope: "pods",
                backends: vec![
                    BackendDump {
                        id: 7,
                        address: "10.244.0.11:8080/TCP".into(),
                        state: "active",
                        local: true,
                    },
                    BackendDump {
                        id: 8,
                        address: "10.244.0.12:8080/TCP".into(),
                        state: "terminating",
                        local: false,
                    },
                ],
            },
        ];
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[1].contains("NodePort") && lines[1].ends_with("(none: drop)"),
            "{t}"
        );
        assert!(lines[2].contains("NodePort (pods) (sticky 30s)"), "{t}");
        assert!(
            lines[2].ends_with("1 => 10.244.0.11:8080/TCP (active, local)"),
            "{t}"
        );
        assert!(
            lines[3].starts_with("      ")
                && lines[3].ends_with("2 => 10.244.0.12:8080/TCP (terminating)"),
            "{t}"
        );
    }
}
