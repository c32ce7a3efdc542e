//! Building test frames and checking them independently of the datapath's own checksum code:
//! checksums here are computed from scratch over the whole header and payload.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// Ethertypes.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Bytes of an Ethernet header and of an IPv6 header (which has no options: extension
/// headers follow it).
pub const ETH_LEN: usize = 14;
pub const IPV6_LEN: usize = 40;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// RFC 1071 checksum of `data` with an initial sum.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u64::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a TCP or UDP segment is built from, in frames of either family.
trait Segment {
    fn proto(&self) -> u8;
    fn ports(&self) -> (u16, u16);
    /// Sequence and acknowledgement numbers, and the TCP flags.
    fn tcp(&self) -> (u32, u32, u8);
    fn payload(&self) -> &[u8];
}

impl Segment for Frame {
    fn proto(&self) -> u8 {
        self.proto
    }
    fn ports(&self) -> (u16, u16) {
        (self.sport, self.dport)
    }
    fn tcp(&self) -> (u32, u32, u8) {
        (self.seq, self.ack, self.flags)
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

impl Segment for Frame6 {
    fn proto(&self) -> u8 {
        self.proto
    }
    fn ports(&self) -> (u16, u16) {
        (self.sport, self.dport)
    }
    fn tcp(&self) -> (u32, u32, u8) {
        (self.seq, self.ack, self.flags)
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
}

/// A frame's TCP or UDP header and payload, with its checksum over `pseudo(length)`, the
/// sum of its family's pseudo-header; `udp_checksum` false leaves a UDP checksum zero
/// ("none", IPv4 only).
fn segment(f: &impl Segment, pseudo: impl Fn(usize) -> u32, udp_checksum: bool) -> Vec<u8> {
    let ((sport, dport), payload) = (f.ports(), f.payload());
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    if f.proto() == TCP {
        let (seq, ack, flags) = f.tcp();
        h.extend(seq.to_be_bytes());
        h.extend(ack.to_be_bytes());
        h.push(0x50);
        h.push(flags);
        h.extend(64240u16.to_be_bytes());
        h.extend([0, 0, 0, 0]);
        h.extend(payload);
        let c = checksum(pseudo(h.len()), &h);
        h[16..18].copy_from_slice(&c.to_be_bytes());
    } else {
        let len = 8 + payload.len();
        h.extend((len as u16).to_be_bytes());
        h.extend([0, 0]);
        h.extend(payload);
        if udp_checksum {
            let mut c = checksum(pseudo(len), &h);
            if c == 0 {
                c = 0xffff;
            }
            h[6..8].copy_from_slice(&c.to_be_bytes());
        }
    }
    h
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u32::from(u16::from_be_bytes([s[0], s[1]]))
        + u32::from(u16::from_be_bytes([s[2], s[3]]))
        + u32::from(u16::from_be_bytes([d[0], d[1]]))
        + u32::from(u16::from_be_bytes([d[2], d[3]]))
        + u32::from(proto)
        + len as u32
}

/// The IPv6 pseudo-header's sum (RFC 8200 8.1): both addresses, the upper-layer length and
/// the next header.
fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let words = |a: Ipv6Addr| a.segments().iter().map(|w| u32::from(*w)).sum::<u32>();
    words(src) + words(dst) + (len as u32 >> 16) + (len as u32 & 0xffff) + u32::from(proto)
}

/// A frame's fields, for building and for reading back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP only.
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
    /// UDP: send a zero ("no checksum") checksum.
    pub udp_no_checksum: bool,
    pub ttl: u8,
    pub ip_id: u16,
}

impl Frame {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Frame {
        Frame {
            eth_dst: NODE_MAC,
            eth_src: CLIENT_MAC,
            src: src.0,
            dst: dst.0,
            proto: TCP,
            sport: src.1,
            dport: dst.1,
            seq: 0x1000_0000,
            ack: if flags & ACK != 0 { 0x2000_0000 } else { 0 },
            flags,
            payload: Vec::new(),
            udp_no_checksum: false,
            ttl: 64,
            ip_id: 0x1234,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Frame {
        Frame {
            proto: UDP,
            payload: payload.to_vec(),
            seq: 0,
            ..Frame::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, p: &[u8]) -> Frame {
        self.payload = p.to_vec();
        self
    }

    /// The frame's bytes, with correct checksums.
    pub fn build(&self) -> Vec<u8> {
        let l4 = match self.proto {
            TCP | UDP => segment(
                self,
                |len| pseudo(self.src, self.dst, self.proto, len),
                !self.udp_no_checksum,
            ),
            _ => self.payload.clone(),
        };
        let mut out = Vec::with_capacity(34 + l4.len());
        out.extend(self.eth_dst);
        out.extend(self.eth_src);
        out.extend([0x08, 0x00]);
        let total = 20 + l4.len();
        let mut ip = vec![0x45, 0];
        ip.extend((total as u16).to_be_bytes());
        ip.extend(self.ip_id.to_be_bytes());
        ip.extend([0x40, 0]);
        ip.push(self.ttl);
        ip.push(self.proto);
        ip.extend([0, 0]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        let c = checksum(0, &ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend(ip);
        out.extend(l4);
        out
    }
}

/// Checks a frame's IPv4 and L4 checksums from scratch. Returns a description of what is
/// wrong, if anything.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    if ethertype(frame) == Some(ETH_P_IPV6) {
        return verify_checksums6(frame);
    }
    if frame.len() < 34 {
        return Err(format!("frame of {} bytes has no IPv4 header", frame.len()));
    }
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if checksum(0, &ip[..ihl]) != 0 {
        return Err("bad IPv4 header checksum".into());
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total > ip.len() {
        return Err(format!(
            "IPv4 total length {total} > {} bytes present",
            ip.len()
        ));
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..total];
    let ok = match ip[9] {
        TCP => checksum(pseudo(src, dst, TCP, l4.len()), l4) == 0,
        // A zero UDP checksum means "none".
        UDP => (l4[6] == 0 && l4[7] == 0) || checksum(pseudo(src, dst, UDP, l4.len()), l4) == 0,
        ICMP => checksum(0, l4) == 0,
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad checksum for IP protocol {}", ip[9]))
    }
}

/// Reads the fields back from a frame built like `Frame::build` makes them.
pub fn parse(frame: &[u8]) -> Frame {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let l4 = &ip[ihl..];
    let proto = ip[9];
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let (seq, ack, flags, payload, no_csum) = match proto {
        TCP => {
            let doff = ((l4[12] >> 4) as usize) * 4;
            (
                u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
                l4[13],
                ip[ihl + doff..total].to_vec(),
                false,
            )
        }
        UDP => (
            0,
            0,
            0,
            ip[ihl + 8..total].to_vec(),
            l4[6] == 0 && l4[7] == 0,
        ),
        _ => (0, 0, 0, ip[ihl..total].to_vec(), false),
    };
    Frame {
        eth_dst: frame[0..6].try_into().unwrap_or_default(),
        eth_src: frame[6..12].try_into().unwrap_or_default(),
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        seq,
        ack,
        flags,
        payload,
        udp_no_checksum: no_csum,
        ttl: ip[8],
        ip_id: u16::from_be_bytes([ip[4], ip[5]]),
    }
}

/// The ethertype of an Ethernet frame, if it has a header.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    frame.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// An IPv6 frame's fields (no extension headers), for building and for reading back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame6 {
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The upper-layer protocol (the IPv6 header's next header).
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP only.
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
    pub hop_limit: u8,
    /// The 20-bit flow label.
    pub flow_label: u32,
}

impl Frame6 {
    pub fn tcp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), flags: u8) -> Frame6 {
        Frame6 {
            eth_dst: NODE_MAC,
            eth_src: CLIENT_MAC,
            src: src.0,
            dst: dst.0,
            proto: TCP,
            sport: src.1,
            dport: dst.1,
            seq: 0x1000_0000,
            ack: if flags & ACK != 0 { 0x2000_0000 } else { 0 },
            flags,
            payload: Vec::new(),
            hop_limit: 64,
            flow_label: 0x1_2345,
        }
    }

    pub fn udp(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Frame6 {
        Frame6 {
            proto: UDP,
            payload: payload.to_vec(),
            seq: 0,
            ..Frame6::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, p: &[u8]) -> Frame6 {
        self.payload = p.to_vec();
        self
    }

    /// The frame's bytes, with correct checksums (UDP over IPv6 always has one).
    pub fn build(&self) -> Vec<u8> {
        let l4 = match self.proto {
            TCP | UDP => segment(
                self,
                |len| pseudo6(self.src, self.dst, self.proto, len),
                true,
            ),
            _ => self.payload.clone(),
        };
        let mut out = Vec::with_capacity(ETH_LEN + IPV6_LEN + l4.len());
        out.extend(self.eth_dst);
        out.extend(self.eth_src);
        out.extend(ETH_P_IPV6.to_be_bytes());
        out.extend((0x6000_0000 | (self.flow_label & 0xf_ffff)).to_be_bytes());
        out.extend((l4.len() as u16).to_be_bytes());
        out.push(self.proto);
        out.push(self.hop_limit);
        out.extend(self.src.octets());
        out.extend(self.dst.octets());
        out.extend(l4);
        out
    }
}

/// The IPv6 header of a frame: (source, destination, next header, payload) with the payload
/// cut to the header's payload length.
fn ipv6_parts(frame: &[u8]) -> Result<(Ipv6Addr, Ipv6Addr, u8, &[u8]), String> {
    let ip = frame
        .get(ETH_LEN..ETH_LEN + IPV6_LEN)
        .ok_or_else(|| format!("frame of {} bytes has no IPv6 header", frame.len()))?;
    if ip[0] >> 4 != 6 {
        return Err(format!("IP version {} in an IPv6 frame", ip[0] >> 4));
    }
    let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let payload = frame
        .get(ETH_LEN + IPV6_LEN..ETH_LEN + IPV6_LEN + len)
        .ok_or_else(|| {
            format!(
                "IPv6 payload length {len} > {} bytes present",
                frame.len() - ETH_LEN - IPV6_LEN
            )
        })?;
    let addr = |b: &[u8]| {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        Ipv6Addr::from(a)
    };
    Ok((addr(&ip[8..24]), addr(&ip[24..40]), ip[6], payload))
}

/// Checks an IPv6 frame's L4 checksum from scratch (IPv6 has no header checksum; TCP, UDP
/// and ICMPv6 checksums all cover the pseudo-header). Returns what is wrong, if anything.
pub fn verify_checksums6(frame: &[u8]) -> Result<(), String> {
    let (src, dst, proto, l4) = ipv6_parts(frame)?;
    let ok = match proto {
        TCP if l4.len() >= 20 => checksum(pseudo6(src, dst, TCP, l4.len()), l4) == 0,
        // Over IPv6 a zero UDP checksum is not allowed (RFC 8200 8.1).
        UDP if l4.len() >= 8 => {
            !(l4[6] == 0 && l4[7] == 0) && checksum(pseudo6(src, dst, UDP, l4.len()), l4) == 0
        }
        ICMPV6 if l4.len() >= 4 => checksum(pseudo6(src, dst, ICMPV6, l4.len()), l4) == 0,
        TCP | UDP | ICMPV6 => return Err(format!("truncated header of IP protocol {proto}")),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("bad checksum for IP protocol {proto}"))
    }
}

/// Reads the fields back from an IPv6 frame built like `Frame6::build` makes them (TCP,
/// UDP, or another protocol's payload as it is).
pub fn parse6(frame: &[u8]) -> Result<Frame6, String> {
    if ethertype(frame) != Some(ETH_P_IPV6) {
        return Err("not an IPv6 frame".into());
    }
    let (src, dst, proto, l4) = ipv6_parts(frame)?;
    let ip = &frame[ETH_LEN..];
    let short = || format!("truncated header of IP protocol {proto}");
    let (sport, dport, seq, ack, flags, payload) = match proto {
        TCP => {
            let h = l4.get(..20).ok_or_else(short)?;
            let doff = usize::from(h[12] >> 4) * 4;
            (
                u16::from_be_bytes([h[0], h[1]]),
                u16::from_be_bytes([h[2], h[3]]),
                u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
                h[13],
                l4.get(doff..).ok_or_else(short)?.to_vec(),
            )
        }
        UDP => {
            let h = l4.get(..8).ok_or_else(short)?;
            (
                u16::from_be_bytes([h[0], h[1]]),
                u16::from_be_bytes([h[2], h[3]]),
                0,
                0,
                0,
                l4[8..].to_vec(),
            )
        }
        _ => (0, 0, 0, 0, 0, l4.to_vec()),
    };
    let mut eth_dst = [0u8; 6];
    let mut eth_src = [0u8; 6];
    eth_dst.copy_from_slice(&frame[0..6]);
    eth_src.copy_from_slice(&frame[6..12]);
    Ok(Frame6 {
        eth_dst,
        eth_src,
        src,
        dst,
        proto,
        sport,
        dport,
        seq,
        ack,
        flags,
        payload,
        hop_limit: ip[7],
        flow_label: u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]) & 0xf_ffff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_parse_back() {
        let f = Frame::tcp(
            (Ipv4Addr::new(198, 18, 0, 1), 40000),
            (Ipv4Addr::new(198, 18, 0, 2), 30080),
            SYN,
        )
        .with_payload(b"abc");
        let b = f.build();
        verify_checksums(&b).expect("valid");
        assert_eq!(parse(&b), f);
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(verify_checksums(&bad).is_err());

        let u = Frame::udp(
            (Ipv4Addr::new(10, 0, 0, 1), 5000),
            (Ipv4Addr::new(10, 0, 0, 2), 53),
            b"hello",
        );
        let b = u.build();
        verify_checksums(&b).expect("valid");
        assert_eq!(parse(&b), u);
    }

    #[test]
    fn ipv6_frames_verify_and_parse_back() {
        let (a, b): (Ipv6Addr, Ipv6Addr) = (
            "2001:db8::1".parse().expect("a"),
            "fd00::a".parse().expect("b"),
        );
        let f = Frame6::tcp((a, 40000), (b, 80), SYN).with_payload(b"abc");
        let bytes = f.build();
        assert_eq!(ethertype(&bytes), Some(ETH_P_IPV6));
        assert_eq!(bytes.len(), ETH_LEN + IPV6_LEN + 20 + 3);
        verify_checksums(&bytes).expect("valid");
        assert_eq!(parse6(&bytes), Ok(f));
        // A flipped bit in an address is caught: the pseudo-header covers all 128 bits.
        let mut bad = bytes.clone();
        bad[ETH_LEN + 8 + 9] ^= 0x40;
        assert!(verify_checksums(&bad).is_err());

        let u = Frame6::udp((a, 5000), (b, 53), b"hello");
        let bytes = u.build();
        verify_checksums(&bytes).expect("valid");
        assert_eq!(parse6(&bytes), Ok(u));
        // A zero UDP checksum is invalid over IPv6.
        let mut zero = bytes.clone();
        zero[ETH_LEN + IPV6_LEN + 6..ETH_LEN + IPV6_LEN + 8].copy_from_slice(&[0, 0]);
        assert!(verify_checksums6(&zero).is_err());
        // Truncated input is an error, not a panic.
        for n in [0, 13, 30, ETH_LEN + IPV6_LEN + 4] {
            assert!(parse6(&bytes[..n]).is_err(), "{n} bytes");
            assert!(verify_checksums(&bytes[..n]).is_err(), "{n} bytes");
        }
        // An IPv4 frame is not parsed as IPv6.
        let v4 = Frame::tcp((Ipv4Addr::LOCALHOST, 1), (Ipv4Addr::LOCALHOST, 2), SYN).build();
        assert!(parse6(&v4).is_err());
    }

    #[test]
    fn the_ipv6_checksum_matches_a_known_packet() {
        // A UDP datagram fe80::1:1234 -> ff02::1:5678 "hi", whose checksum is computed by hand:
        // sum of the pseudo-header and the header/payload words, folded and inverted.
        let src: Ipv6Addr = "fe80::1".parse().expect("src");
        let dst: Ipv6Addr = "ff02::1".parse().expect("dst");
        let u = Frame6::udp((src, 0x1234), (dst, 0x5678), b"hi");
        let b = u.build();
        let sum: u32 = 0xfe80 + 1 + 0xff02 + 1 + 10 + 17 + 0x1234 + 0x5678 + 10 + 0x6869;
        let folded = (sum & 0xffff) + (sum >> 16);
        let want = !(folded as u16);
        let at = ETH_LEN + IPV6_LEN + 6;
        assert_eq!(u16::from_be_bytes([b[at], b[at + 1]]), want);
    }
}
