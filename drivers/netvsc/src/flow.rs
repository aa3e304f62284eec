//! Choosing the transmit queue of a frame from its flow.
//!
//! The host's send indirection table maps a flow hash to a queue (16 entries). Any
//! stable hash of the IPv4 addresses and ports keeps a flow on one queue; this one is a
//! multiplication, far cheaper than Toeplitz, which only receive-side steering needs.

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETH_HEADER: usize = 14;

/// A hash of the frame's IPv4 flow (addresses, and ports for TCP/UDP), or `None` for
/// frames that are not IPv4 (ARP and the like go to queue 0).
#[inline(always)]
pub fn flow_hash(frame: &[u8]) -> Option<u32> {
    // Ethernet, an IPv4 header without options and 4 bytes after it in one bounds check
    // (the common case); shorter frames and IP options take the general path.
    let Some(head) = frame.first_chunk::<{ ETH_HEADER + 24 }>() else {
        return flow_hash_general(frame);
    };
    if head[12..14] != ETHERTYPE_IPV4.to_be_bytes() || head[ETH_HEADER] != 0x45 {
        return flow_hash_general(frame);
    }
    let ip = &head[ETH_HEADER..];
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    let ports = match (ip[9], fragment) {
        (6 | 17, 0) => u32::from_be_bytes([ip[20], ip[21], ip[22], ip[23]]),
        _ => 0,
    };
    let addresses = u64::from_be_bytes([
        ip[12], ip[13], ip[14], ip[15], ip[16], ip[17], ip[18], ip[19],
    ]);
    Some(mix(addresses, ports))
}

/// [`flow_hash`] for any IPv4 header length (and frames too short for the fast path).
#[cold]
fn flow_hash_general(frame: &[u8]) -> Option<u32> {
    // Ethernet and the fixed IPv4 header in one bounds check.
    let head: &[u8; ETH_HEADER + 20] = frame.get(..ETH_HEADER + 20)?.try_into().ok()?;
    if u16::from_be_bytes([head[12], head[13]]) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &head[ETH_HEADER..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let src = u32::from_be_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let dst = u32::from_be_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    let ports = match (ip[9], fragment) {
        (6 | 17, 0) => frame
            .get(ETH_HEADER + ihl..ETH_HEADER + ihl + 4)
            .map_or(0, |p| u32::from_be_bytes([p[0], p[1], p[2], p[3]])),
        _ => 0,
    };
    Some(mix(u64::from(src) << 32 | u64::from(dst), ports))
}

/// Mixes the addresses (source high, destination low) and ports into 32 bits whose low
/// bits (the send table's index) depend on all of them: one multiply (Fibonacci
/// hashing), whose top byte depends on every bit of its input, rotated to the bottom.
#[inline]
fn mix(addresses: u64, ports: u32) -> u32 {
    let h = (addresses ^ u64::from(ports) << 16).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h.rotate_left(8) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(src_port: u16) -> [u8; 42] {
        let mut f = [0u8; 42];
        f[12] = 0x08;
        f[14] = 0x45;
        f[23] = 17;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&src_port.to_be_bytes());
        f[36..38].copy_from_slice(&7u16.to_be_bytes());
        f
    }

    #[test]
    fn same_flow_same_hash_and_flows_spread() {
        assert_eq!(flow_hash(&udp(1000)), flow_hash(&udp(1000)));
        let mut buckets = [0u32; 16];
        for port in 1000..1256 {
            buckets[(flow_hash(&udp(port)).unwrap() % 16) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 0), "{buckets:?}");
    }

    #[test]
    fn both_paths_hash_alike() {
        // Options (IHL 6) move the ports: the general path finds them, and a frame that
        // only differs by those 4 option bytes hashes as the plain one.
        let plain = udp(1234);
        let mut with_options = plain[..34].to_vec();
        with_options[14] = 0x46;
        with_options.extend_from_slice(&[1, 1, 1, 1]);
        with_options.extend_from_slice(&plain[34..]);
        assert_eq!(flow_hash(&plain), flow_hash(&with_options));
        assert_eq!(flow_hash(&plain), flow_hash_general(&plain));
        // Too short for the fast path, long enough for the general one (no ports).
        assert_eq!(flow_hash(&plain[..36]), flow_hash_general(&plain[..36]));
        // Fragments carry no ports: two flows' fragments hash alike.
        let fragment = |port| {
            let mut f = udp(port);
            f[20] = 0x20;
            f
        };
        assert_eq!(flow_hash(&fragment(1234)), flow_hash(&fragment(4321)));
        assert_ne!(flow_hash(&udp(1234)), flow_hash(&udp(4321)));
    }

    #[test]
    fn non_ip_and_truncated_frames_have_no_hash() {
        assert_eq!(flow_hash(&[0u8; 14]), None);
        assert_eq!(flow_hash(&udp(1)[..20]), None);
        let mut arp = udp(1);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(flow_hash(&arp), None);
    }
}
