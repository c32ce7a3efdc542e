//! Which of the node's addresses serve NodePorts: kube-proxy's `--nodeport-addresses`
//! (`nodePortAddresses`) and its localhost NodePorts.

use std::{net::Ipv4Addr, str::FromStr};

use super::translate::{contains, parse_cidr, Cidr};

/// `--nodeport-addresses`: unset (every address of the node), `primary` (the node's primary
/// address) or a list of CIDRs (the node's addresses inside them; IPv6 CIDRs belong to the
/// other family and are ignored, as kube-proxy's per-family proxiers do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    #[default]
    All,
    Primary,
    Cidrs(Vec<(Ipv4Addr, u8)>),
}

/// A `--nodeport-addresses` value the agent cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--nodeport-addresses {value:?}: {reason}")]
pub struct InvalidNodePortAddresses {
    pub value: String,
    pub reason: String,
}

impl FromStr for NodePortAddresses {
    type Err = InvalidNodePortAddresses;

    /// Comma-separated CIDRs, or `primary` alone; empty: every address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| InvalidNodePortAddresses {
            value: s.to_string(),
            reason,
        };
        let items: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .collect();
        if items.is_empty() {
            return Ok(NodePortAddresses::All);
        }
        if items.contains(&"primary") {
            if items.len() > 1 {
                return Err(invalid("`primary` cannot be combined with CIDRs".into()));
            }
            return Ok(NodePortAddresses::Primary);
        }
        let mut cidrs = Vec::new();
        for item in items {
            match parse_cidr(item) {
                Some(Cidr::V4(net, len)) => cidrs.push((net, len)),
                Some(Cidr::V6) => {}
                None => return Err(invalid(format!("{item:?} is neither a CIDR nor `primary`"))),
            }
        }
        Ok(NodePortAddresses::Cidrs(cidrs))
    }
}

impl NodePortAddresses {
    /// Whether NodePorts are served on 127.0.0.1 for the node's own processes, when localhost
    /// NodePorts are on: with every address, or when a CIDR holds 127.0.0.1 (kube-proxy's
    /// iptables mode; never with `primary`).
    pub fn includes_loopback(&self) -> bool {
        match self {
            NodePortAddresses::All => true,
            NodePortAddresses::Primary => false,
            NodePortAddresses::Cidrs(c) => c.iter().any(|n| contains(*n, Ipv4Addr::LOCALHOST)),
        }
    }

    /// The addresses NodePorts are served on: of the node's `addresses` (loopback left out),
    /// those selected; its `primary` address for `primary`; and 127.0.0.1 when `localhost`
    /// NodePorts are on and the selection includes loopback.
    pub fn select(
        &self,
        addresses: &[Ipv4Addr],
        primary: Option<Ipv4Addr>,
        localhost: bool,
    ) -> Vec<Ipv4Addr> {
        let mut out: Vec<Ipv4Addr> = match self {
            NodePortAddresses::All => addresses.to_vec(),
            NodePortAddresses::Primary => primary.into_iter().collect(),
            NodePortAddresses::Cidrs(c) => addresses
                .iter()
                .copied()
                .filter(|a| c.iter().any(|n| contains(*n, *a)))
                .collect(),
        };
        out.retain(|a| !a.is_loopback());
        if localhost && self.includes_loopback() {
            out.push(Ipv4Addr::LOCALHOST);
        }
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    #[test]
    fn parsing() {
        assert_eq!("".parse(), Ok(NodePortAddresses::All));
        assert_eq!(" primary ".parse(), Ok(NodePortAddresses::Primary));
        assert_eq!(
            "10.0.0.5/8, 2001:db8::/64,127.0.0.0/8".parse(),
            Ok(NodePortAddresses::Cidrs(vec![
                (ip("10.0.0.0"), 8),
                (ip("127.0.0.0"), 8)
            ]))
        );
        let e = "primary,10.0.0.0/8"
            .parse::<NodePortAddresses>()
            .expect_err("mixed");
        assert!(e.to_string().contains("cannot be combined"), "{e}");
        let e = "10.0.0.0"
            .parse::<NodePortAddresses>()
            .expect_err("no prefix");
        assert_eq!(
            e.to_string(),
            "--nodeport-addresses \"10.0.0.0\": \"10.0.0.0\" is neither a CIDR nor `primary`"
        );
    }

    #[test]
    fn selection() {
        let node = [ip("172.18.0.2"), ip("10.244.1.1"), ip("192.168.5.9")];
        let primary = Some(ip("172.18.0.2"));
        let all = NodePortAddresses::All;
        assert_eq!(
            all.select(&node, primary, true),
            vec![
                ip("10.244.1.1"),
                ip("127.0.0.1"),
                ip("172.18.0.2"),
                ip("192.168.5.9")
            ]
        );
        assert_eq!(all.select(&node, primary, false).len(), 3, "no localhost");
        assert_eq!(
            NodePortAddresses::Primary.select(&node, primary, true),
            vec![ip("172.18.0.2")]
        );
        let cidrs: NodePortAddresses = "172.18.0.0/16,192.168.0.0/16".parse().expect("cidrs");
        assert_eq!(
            cidrs.select(&node, primary, true),
            vec![ip("172.18.0.2"), ip("192.168.5.9")]
        );
        let with_lo: NodePortAddresses = "172.18.0.0/16,127.0.0.0/8".parse().expect("cidrs");
        assert_eq!(
            with_lo.select(&node, primary, true),
            vec![ip("127.0.0.1"), ip("172.18.0.2")]
        );
    }
}
