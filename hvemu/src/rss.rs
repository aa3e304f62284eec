//! Receive-side scaling as a host computes it: the Toeplitz hash over a frame's flow.
//!
//! NDIS defines the hash input as the source address, destination address, source port
//! and destination port, in network byte order, concatenated; the 32-bit result selects a
//! queue through the guest's indirection table (`table[hash % len]`). The key is the
//! guest's 40-byte secret (OID_GEN_RECEIVE_SCALE_PARAMETERS).
//!
//! What [`flow_input`] hashes (the emulator's choice, as the netvsp brief asks; real
//! hosts also look at the guest's enabled hash types, which only narrows this):
//!
//! * IPv4 carrying TCP or UDP, not fragmented: `src, dst, sport, dport` (12 bytes);
//! * other IPv4 (other protocols, any fragment): `src, dst` (8 bytes);
//! * IPv6 whose next header is TCP or UDP: `src, dst, sport, dport` (36 bytes); other
//!   IPv6 (including extension headers, which are not walked): `src, dst` (32 bytes);
//! * anything else (ARP, truncated headers, ...): no hash; such frames go to queue 0.
//!
//! One 802.1Q tag in front of the EtherType is skipped.
//!
//! The algorithm and its verification vectors are in the Windows driver documentation
//! ("Verifying the RSS Hash Calculation"); the tests below check every IPv4 and IPv6
//! vector listed there.

/// EtherType of IPv4.
const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
const ETHERTYPE_IPV6: u16 = 0x86DD;
/// EtherType of an 802.1Q VLAN tag.
const ETHERTYPE_VLAN: u16 = 0x8100;
/// IP protocol number of TCP.
const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
const IPPROTO_UDP: u8 = 17;
/// Longest hash input: two IPv6 addresses and two ports.
const MAX_INPUT: usize = 36;

/// The Toeplitz hash of `input` under `key`.
///
/// For every set bit of the input (most significant bit of the first byte first) the
/// 32-bit window of the key that starts at that bit position is XORed into the result.
/// Key bits past the end of `key` count as zero, so a short key never panics (a 40-byte
/// key covers inputs up to 36 bytes, the longest RSS input).
pub fn toeplitz(key: &[u8], input: &[u8]) -> u32 {
    let key_bit = |pos: usize| -> u32 {
        key.get(pos / 8)
            .map_or(0, |b| u32::from((b >> (7 - pos % 8)) & 1))
    };
    let mut window = (0..32).fold(0u32, |w, pos| (w << 1) | key_bit(pos));
    let mut hash = 0u32;
    for (i, &byte) in input.iter().enumerate() {
        for bit in 0..8 {
            if byte & (0x80 >> bit) != 0 {
                hash ^= window;
            }
            window = (window << 1) | key_bit(32 + i * 8 + bit);
        }
    }
    hash
}

/// Which fields of a frame form its hash input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowKind {
    /// IPv4 source and destination addresses.
    Ipv4,
    /// IPv4 addresses and TCP/UDP ports.
    Ipv4Ports,
    /// IPv6 source and destination addresses.
    Ipv6,
    /// IPv6 addresses and TCP/UDP ports.
    Ipv6Ports,
}

/// The bytes a frame's RSS hash is computed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInput {
    kind: FlowKind,
    bytes: [u8; MAX_INPUT],
    len: usize,
}

impl FlowInput {
    /// Which fields were used.
    pub fn kind(&self) -> FlowKind {
        self.kind
    }

    /// The hash input (addresses then ports, network byte order).
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }

    fn new(kind: FlowKind, parts: &[&[u8]]) -> Self {
        let mut bytes = [0u8; MAX_INPUT];
        let mut len = 0;
        for part in parts {
            let end = (len + part.len()).min(MAX_INPUT);
            let n = end - len;
            bytes[len..end].copy_from_slice(&part[..n]);
            len = end;
        }
        FlowInput { kind, bytes, len }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Extracts the hash input of an Ethernet frame (see the module docs), or `None` if the
/// frame is not IP or its headers are truncated.
pub fn flow_input(frame: &[u8]) -> Option<FlowInput> {
    let mut ethertype = be16(frame, 12)?;
    let mut l3 = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16)?;
        l3 = 18;
    }
    let ip = frame.get(l3..)?;
    match ethertype {
        ETHERTYPE_IPV4 => {
            let first = *ip.first()?;
            let ihl = usize::from(first & 0x0F) * 4;
            if first >> 4 != 4 || ihl < 20 || ip.len() < ihl {
                return None;
            }
            let addrs = ip.get(12..20)?;
            let frag = be16(ip, 6)?;
            // More-fragments bit or a non-zero offset: the ports may not be here.
            let fragmented = frag & 0x3FFF != 0;
            let proto = ip[9];
            if !fragmented && (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
                if let Some(ports) = ip.get(ihl..ihl + 4) {
                    return Some(FlowInput::new(FlowKind::Ipv4Ports, &[addrs, ports]));
                }
            }
            Some(FlowInput::new(FlowKind::Ipv4, &[addrs]))
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < 40 || ip[0] >> 4 != 6 {
                return None;
            }
            let addrs = &ip[8..40];
            let next = ip[6];
            if next == IPPROTO_TCP || next == IPPROTO_UDP {
                if let Some(ports) = ip.get(40..44) {
                    return Some(FlowInput::new(FlowKind::Ipv6Ports, &[addrs, ports]));
                }
            }
            Some(FlowInput::new(FlowKind::Ipv6, &[addrs]))
        }
        _ => None,
    }
}

/// The RSS hash of `frame` under `key`, or `None` for frames that are not hashed.
pub fn rss_hash(key: &[u8], frame: &[u8]) -> Option<u32> {
    flow_input(frame).map(|f| toeplitz(key, f.as_bytes()))
}

/// The queue an indirection table picks for `hash` (`table[hash % len]`); 0 for an empty
/// table.
pub fn select_queue(table: &[u32], hash: u32) -> u32 {
    if table.is_empty() {
        return 0;
    }
    table[(hash as usize) % table.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The key of the Microsoft verification vectors (also Linux's default key).
    const KEY: [u8; 40] = [
        0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f,
        0xb0, 0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30,
        0xf2, 0x0c, 0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
    ];

    /// (destination, dport, source, sport, IPv4-only hash, IPv4+TCP hash), from "Verifying
    /// the RSS Hash Calculation" (Windows driver docs).
    const V4: [(&str, u16, &str, u16, u32, u32); 5] = [
        (
            "161.142.100.80",
            1766,
            "66.9.149.187",
            2794,
            0x323e_8fc2,
            0x51cc_c178,
        ),
        (
            "65.69.140.83",
            4739,
            "199.92.111.2",
            14230,
            0xd718_262a,
            0xc626_b0ea,
        ),
        (
            "12.22.207.184",
            38024,
            "24.19.198.95",
            12898,
            0xd2d0_a5de,
            0x5c2b_394a,
        ),
        (
            "209.142.163.6",
            2217,
            "38.27.205.30",
            48228,
            0x8298_9176,
            0xafc7_327f,
        ),
        (
            "202.188.127.2",
            1303,
            "153.39.163.191",
            44251,
            0x5d18_09c5,
            0x10e8_28a2,
        ),
    ];

    /// The same for IPv6.
    const V6: [(&str, u16, &str, u16, u32, u32); 3] = [
        (
            "3ffe:2501:200:3::1",
            1766,
            "3ffe:2501:200:1fff::7",
            2794,
            0x2cc1_8cd5,
            0x4020_7d3d,
        ),
        (
            "ff02::1",
            4739,
            "3ffe:501:8::260:97ff:fe40:efab",
            14230,
            0x0f0c_461c,
            0xdde5_1bbf,
        ),
        (
            "fe80::200:f8ff:fe21:67cf",
            38024,
            "3ffe:1900:4545:3:200:f8ff:fe21:67cf",
            44251,
            0x4b61_e985,
            0x02d1_feef,
        ),
    ];

    fn v4(s: &str) -> [u8; 4] {
        s.parse::<Ipv4Addr>().unwrap().octets()
    }

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn microsoft_ipv4_vectors() {
        for (dst, dport, src, sport, h_ip, h_tcp) in V4 {
            let mut input = Vec::new();
            input.extend_from_slice(&v4(src));
            input.extend_from_slice(&v4(dst));
            assert_eq!(toeplitz(&KEY, &input), h_ip, "{src} -> {dst}");
            input.extend_from_slice(&sport.to_be_bytes());
            input.extend_from_slice(&dport.to_be_bytes());
            assert_eq!(
                toeplitz(&KEY, &input),
                h_tcp,
                "{src}:{sport} -> {dst}:{dport}"
            );
        }
    }

    #[test]
    fn microsoft_ipv6_vectors() {
        for (dst, dport, src, sport, h_ip, h_tcp) in V6 {
            let mut input = Vec::new();
            input.extend_from_slice(&v6(src));
            input.extend_from_slice(&v6(dst));
            assert_eq!(toeplitz(&KEY, &input), h_ip, "{src} -> {dst}");
            input.extend_from_slice(&sport.to_be_bytes());
            input.extend_from_slice(&dport.to_be_bytes());
            assert_eq!(
                toeplitz(&KEY, &input),
                h_tcp,
                "{src}:{sport} -> {dst}:{dport}"
            );
        }
    }

    /// An Ethernet + IPv4 frame with `proto` and 8 bytes of L4 header (ports first).
    fn ipv4_frame(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&28u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0; 4]);
        f
    }

    #[test]
    fn frames_hash_like_the_vectors() {
        for (dst, dport, src, sport, h_ip, h_tcp) in V4 {
            let tcp = ipv4_frame(v4(src), v4(dst), IPPROTO_TCP, sport, dport);
            let fi = flow_input(&tcp).unwrap();
            assert_eq!(fi.kind(), FlowKind::Ipv4Ports);
            assert_eq!(rss_hash(&KEY, &tcp), Some(h_tcp));
            // UDP uses the ports too (the brief's rule); ICMP only the addresses.
            let udp = ipv4_frame(v4(src), v4(dst), IPPROTO_UDP, sport, dport);
            assert_eq!(rss_hash(&KEY, &udp), Some(h_tcp));
            let icmp = ipv4_frame(v4(src), v4(dst), 1, sport, dport);
            assert_eq!(rss_hash(&KEY, &icmp), Some(h_ip));
            // A fragment: addresses only.
            let mut frag = tcp.clone();
            frag[14 + 6] = 0x20; // more fragments
            assert_eq!(flow_input(&frag).unwrap().kind(), FlowKind::Ipv4);
            assert_eq!(rss_hash(&KEY, &frag), Some(h_ip));
            // Behind a VLAN tag: the same hash.
            let mut tagged = tcp[..12].to_vec();
            tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
            tagged.extend_from_slice(&tcp[12..]);
            assert_eq!(rss_hash(&KEY, &tagged), Some(h_tcp));
        }
        for (dst, dport, src, sport, h_ip, h_tcp) in V6 {
            let mut f = vec![0u8; 14];
            f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[6] = IPPROTO_TCP;
            ip[8..24].copy_from_slice(&v6(src));
            ip[24..40].copy_from_slice(&v6(dst));
            f.extend_from_slice(&ip);
            f.extend_from_slice(&sport.to_be_bytes());
            f.extend_from_slice(&dport.to_be_bytes());
            assert_eq!(rss_hash(&KEY, &f), Some(h_tcp));
            f[14 + 6] = 58; // ICMPv6
            assert_eq!(rss_hash(&KEY, &f), Some(h_ip));
        }
    }

    #[test]
    fn non_ip_and_truncated_frames_are_not_hashed() {
        let arp = {
            let mut f = vec![0u8; 42];
            f[12] = 0x08;
            f[13] = 0x06;
            f
        };
        assert_eq!(flow_input(&arp), None);
        let tcp = ipv4_frame([1, 2, 3, 4], [5, 6, 7, 8], IPPROTO_TCP, 1, 2);
        for len in 0..tcp.len() {
            // Never panics; a frame cut inside the IP header has no hash.
            let r = flow_input(&tcp[..len]);
            if len < 34 {
                assert_eq!(r, None, "len {len}");
            }
        }
        // Bad IHL or version.
        let mut bad = tcp.clone();
        bad[14] = 0x44;
        assert_eq!(flow_input(&bad), None);
        bad[14] = 0x4F; // IHL 60 > header bytes present
        assert_eq!(flow_input(&bad), None);
        bad[14] = 0x65;
        assert_eq!(flow_input(&bad), None);
    }

    #[test]
    fn short_keys_and_queue_selection() {
        assert_eq!(toeplitz(&[], &[0xff; 12]), 0);
        // A one-byte key: only its bits can contribute.
        assert_eq!(toeplitz(&[0x80], &[0x80]), 0x8000_0000);
        assert_eq!(select_queue(&[], 12345), 0);
        assert_eq!(select_queue(&[0, 1, 2], 4), 1);
        assert_eq!(select_queue(&[7; 128], u32::MAX), 7);
    }
}
