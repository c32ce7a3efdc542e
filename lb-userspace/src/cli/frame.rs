//! Building test frames and checking them independently of the datapath's own checksum code:
//! checksums here are computed from scratch over the whole header and payload.

use std::net::Ipv4Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

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
            TCP => {
                let mut h = Vec::with_capacity(20 + self.payload.len());
                h.extend(self.sport.to_be_bytes());
                h.extend(self.dport.to_be_bytes());
                h.extend(self.seq.to_be_bytes());
                h.extend(self.ack.to_be_bytes());
                h.push(0x50);
                h.push(self.flags);
                h.extend(64240u16.to_be_bytes());
                h.extend([0, 0, 0, 0]);
                h.extend(&self.payload);
                let c = checksum(pseudo(self.src, self.dst, TCP, h.len()), &h);
                h[16..18].copy_from_slice(&c.to_be_bytes());
                h
            }
            UDP => {
                let len = 8 + self.payload.len();
                let mut h = Vec::with_capacity(len);
                h.extend(self.sport.to_be_bytes());
                h.extend(self.dport.to_be_bytes());
                h.extend((len as u16).to_be_bytes());
                h.extend([0, 0]);
                h.extend(&self.payload);
                if !self.udp_no_checksum {
                    let mut c = checksum(pseudo(self.src, self.dst, UDP, len), &h);
                    if c == 0 {
                        c = 0xffff;
                    }
                    h[6..8].copy_from_slice(&c.to_be_bytes());
                }
                h
            }
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
}
