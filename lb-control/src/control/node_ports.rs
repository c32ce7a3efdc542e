//! Which of the node's addresses serve NodePorts: kube-proxy's `--nodeport-addresses`
//! (`nodePortAddresses`) and its localhost NodePorts, per family as kube-proxy's per-family
//! proxiers select them (`nodeport_addresses.go`).

use std::{
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use super::{
    model::Family,
    translate::{parse_cidr, Cidr},
};

/// `--nodeport-addresses`: unset (every address of the node), `primary` (the node's primary
/// address of each family) or a list of CIDRs of either family (the node's addresses inside
/// them; a family none of the CIDRs is of is served on every address of that family, as
/// kube-proxy's per-family proxiers do).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    #[default]
    All,
    Primary,
    Cidrs(Vec<Cidr>),
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
                Some(c) => cidrs.push(c),
                None => return Err(invalid(format!("{item:?} is neither a CIDR nor `primary`"))),
            }
        }
        Ok(NodePortAddresses::Cidrs(cidrs))
    }
}

impl NodePortAddresses {
    /// The CIDRs that select the addresses of `family`; None: every address of it (no CIDR
    /// given, or none of that family).
    fn cidrs_of(&self, family: Family) -> Option<Vec<Cidr>> {
        match self {
            NodePortAddresses::Cidrs(c) => {
                let own: Vec<Cidr> = c.iter().copied().filter(|c| c.family() == family).collect();
                (!own.is_empty()).then_some(own)
            }
            _ => None,
        }
    }

    /// Whether NodePorts are served on 127.0.0.1 for the node's own processes, when localhost
    /// NodePorts are on: with every IPv4 address, or when an IPv4 CIDR holds 127.0.0.1
    /// (kube-proxy's iptables mode; never with `primary`, never on IPv6's ::1).
    pub fn includes_loopback(&self) -> bool {
        match self {
            NodePortAddresses::Primary => false,
            _ => self
                .cidrs_of(Family::Ipv4)
                .is_none_or(|c| c.iter().any(|n| n.contains(Ipv4Addr::LOCALHOST.into()))),
        }
    }

    /// The addresses NodePorts are served on: of the node's `addresses` of both families
    /// (loopback left out), those selected; its `primary` addresses (at most one per family)
    /// for `primary`, a family without one getting none; and 127.0.0.1 when `localhost`
    /// NodePorts are on and the selection includes IPv4 loopback.
    pub fn select(&self, addresses: &[IpAddr], primary: &[IpAddr], localhost: bool) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = match self {
            NodePortAddresses::Primary => primary.to_vec(),
            _ => addresses
                .iter()
                .copied()
                .filter(|a| {
                    self.cidrs_of(Family::of(a))
                        .is_none_or(|c| c.iter().any(|n| n.contains(*a)))
                })
                .collect(),
        };
        out.retain(|a| !a.is_loopback());
        if localhost && self.includes_loopback() {
            out.push(Ipv4Addr::LOCALHOST.into());
        }
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn cidr(s: &str) -> Cidr {
        parse_cidr(s).expect("CIDR")
    }

    #[test]
    fn parsing() {
        assert_eq!("".parse(), Ok(NodePortAddresses::All));
        assert_eq!(" primary ".parse(), Ok(NodePortAddresses::Primary));
        // CIDRs of both families are kept (each selects its family's addresses).
        assert_eq!(
            "10.0.0.5/8, 2001:db8::1/64,127.0.0.0/8".parse(),
            Ok(NodePortAddresses::Cidrs(vec![
                cidr("10.0.0.0/8"),
                cidr("2001:db8::/64"),
                cidr("127.0.0.0/8")
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
        let e = "2001:db8::/129"
            .parse::<NodePortAddresses>()
            .expect_err("prefix too long");
        assert!(e.to_string().contains("neither a CIDR"), "{e}");
    }

    #[test]
    fn selection() {
        let node = [ip("172.18.0.2"), ip("10.244.1.1"), ip("192.168.5.9")];
        let primary = [ip("172.18.0.2")];
        let all = NodePortAddresses::All;
        assert_eq!(
            all.select(&node, &primary, true),
            vec![
                ip("10.244.1.1"),
                ip("127.0.0.1"),
                ip("172.18.0.2"),
                ip("192.168.5.9")
            ]
        );
        assert_eq!(all.select(&node, &primary, false).len(), 3, "no localhost");
        assert_eq!(
            NodePortAddresses::Primary.select(&node, &primary, true),
            vec![ip("172.18.0.2")]
        );
        let cidrs: NodePortAddresses = "172.18.0.0/16,192.168.0.0/16".parse().expect("cidrs");
        assert_eq!(
            cidrs.select(&node, &primary, true),
            vec![ip("172.18.0.2"), ip("192.168.5.9")]
        );
        let with_lo: NodePortAddresses = "172.18.0.0/16,127.0.0.0/8".parse().expect("cidrs");
        assert_eq!(
            with_lo.select(&node, &primary, true),
            vec![ip("127.0.0.1"), ip("172.18.0.2")]
        );
    }

    #[test]
    fn each_family_is_selected_by_its_own_cidrs() {
        // kube-proxy's NewNodePortAddresses: a family with no CIDR of its own matches every
        // address of it, whatever the other family's CIDRs say.
        let node = [
            ip("172.18.0.2"),
            ip("10.244.1.1"),
            ip("fc00:f853:ccd:e793::2"),
            ip("2001:db8:5::9"),
        ];
        let v4_only: NodePortAddresses = "172.18.0.0/16".parse().expect("cidrs");
        assert_eq!(
            v4_only.select(&node, &[], true),
            vec![
                ip("172.18.0.2"),
                ip("2001:db8:5::9"),
                ip("fc00:f853:ccd:e793::2")
            ],
            "IPv6 unrestricted; no 127.0.0.1 (outside the IPv4 CIDRs)"
        );
        let v6_only: NodePortAddresses = "2001:db8::/32".parse().expect("cidrs");
        assert!(
            v6_only.includes_loopback(),
            "IPv4 unrestricted, loopback too"
        );
        assert_eq!(
            v6_only.select(&node, &[], true),
            vec![
                ip("10.244.1.1"),
                ip("127.0.0.1"),
                ip("172.18.0.2"),
                ip("2001:db8:5::9")
            ]
        );
        let both: NodePortAddresses = "2001:db8::/32, 10.244.0.0/16".parse().expect("cidrs");
        assert_eq!(
            both.select(&node, &[], true),
            vec![ip("10.244.1.1"), ip("2001:db8:5::9")]
        );
        // Loopback of either family is never a NodePort address; ::1 is not added.
        let with_lo = [ip("::1"), ip("127.0.0.1"), ip("2001:db8:5::9")];
        assert_eq!(
            NodePortAddresses::All.select(&with_lo, &[], true),
            vec![ip("127.0.0.1"), ip("2001:db8:5::9")]
        );
        // `primary`: the primary address of each family; a family without one gets none.
        let primary = [ip("172.18.0.2"), ip("fc00:f853:ccd:e793::2")];
        assert_eq!(
            NodePortAddresses::Primary.select(&node, &primary, true),
            primary.to_vec()
        );
        assert_eq!(
            NodePortAddresses::Primary.select(&node, &primary[..1], true),
            vec![ip("172.18.0.2")]
        );
    }
}
