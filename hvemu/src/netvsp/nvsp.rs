//! NVSP decisions of the host: version negotiation, buffer geometry and the size of the
//! messages it sends (hyperv-facts.md section 6).

use hvnet_wire::nvsp::{
    NvspMessage, NvspStatus, NvspVersion, NVSP_MESSAGE_SIZE, NVSP_MESSAGE_SIZE_V1,
};

/// Versions the host knows, oldest first.
pub const KNOWN_VERSIONS: [NvspVersion; 6] = [
    NvspVersion::PROTOCOL_VERSION_1,
    NvspVersion::PROTOCOL_VERSION_2,
    NvspVersion::PROTOCOL_VERSION_4,
    NvspVersion::PROTOCOL_VERSION_5,
    NvspVersion::PROTOCOL_VERSION_6,
    NvspVersion::PROTOCOL_VERSION_61,
];

/// `max_mdl_chain_len` in INIT_COMPLETE (OpenVMM's value).
pub const MAX_MDL_CHAIN_LEN: u32 = 34;
/// Frame MTU (Ethernet header included) when the guest sent no usable NDIS config.
pub const DEFAULT_FRAME_MTU: u32 = 1514;
/// Smallest frame MTU an NDIS config may ask for: the smallest IP MTU (68) and the
/// Ethernet header. Smaller values leave the port's MTU in effect.
pub const MIN_FRAME_MTU: u32 = 68 + 14;
/// Largest frame MTU accepted from NDIS config (OpenVMM's range is 1514..=9216).
pub const MAX_FRAME_MTU: u32 = 9216;
/// Bytes a receive section reserves for RNDIS headers (OpenVMM `RX_HEADER_LEN`).
pub const RX_HEADER_LEN: u32 = 256;
/// Trailing bytes of a section the host never writes (OpenVMM: a Windows guest bug
/// forbids using the last 36 bytes of each sub-allocation).
pub const RX_FOOTER_LEN: u32 = 36;

/// Picks the version for an INIT of `[min, max]` on a host that speaks up to `host_max`:
/// the newest known version in the guest's range the host accepts. Otherwise the
/// status tells the guest why (it then tries its next version): PROTOCOL_TOO_NEW when
/// the guest's whole range is above the host's maximum, PROTOCOL_TOO_OLD when it is
/// below the oldest version, FAIL for an empty or unknown range.
pub fn negotiate(min: u32, max: u32, host_max: u32) -> Result<NvspVersion, NvspStatus> {
    let pick = KNOWN_VERSIONS
        .iter()
        .rev()
        .find(|v| v.0 >= min && v.0 <= max && v.0 <= host_max);
    match pick {
        Some(v) => Ok(*v),
        None if min > max => Err(NvspStatus::FAIL),
        None if min > host_max => Err(NvspStatus::PROTOCOL_TOO_NEW),
        None if max < NvspVersion::PROTOCOL_VERSION_1.0 => Err(NvspStatus::PROTOCOL_TOO_OLD),
        None => Err(NvspStatus::FAIL),
    }
}

/// The frame MTU the host uses for a guest's NDIS config value: the value if it lies in
/// 1514..=9216, else 1514 (OpenVMM's rule).
pub fn frame_mtu(ndis_config_mtu: Option<u32>) -> u32 {
    match ndis_config_mtu {
        Some(m) if (DEFAULT_FRAME_MTU..=MAX_FRAME_MTU).contains(&m) => m,
        _ => DEFAULT_FRAME_MTU,
    }
}

/// Receive-buffer sub-allocation size for a frame MTU: 256 + MTU + 36, as OpenVMM
/// computes it (1806 for 1514). Deliberately not Linux's 1728: a guest must use the
/// size the host reports.
pub fn recv_section_size(frame_mtu: u32) -> u32 {
    RX_HEADER_LEN + frame_mtu + RX_FOOTER_LEN
}

/// Bytes of a section the host may fill: all but the footer (and at least 1).
pub fn usable_section_bytes(section_size: u32) -> u32 {
    section_size.saturating_sub(RX_FOOTER_LEN).max(1)
}

/// The padded size of a host NVSP message in `version`: 28 bytes below NVSP 6.1, 40 from
/// 6.1 (OpenVMM), so guests see both lengths.
pub fn message_size(version: Option<NvspVersion>) -> usize {
    match version {
        Some(v) if v >= NvspVersion::PROTOCOL_VERSION_61 => NVSP_MESSAGE_SIZE,
        _ => NVSP_MESSAGE_SIZE_V1,
    }
}

/// Encodes a host message padded to [`message_size`].
pub fn encode(msg: &NvspMessage<'_>, version: Option<NvspVersion>) -> Vec<u8> {
    let mut buf = vec![0u8; 128];
    match msg.encode_into(&mut buf) {
        Ok(n) => {
            buf.truncate(n.max(message_size(version)));
            buf
        }
        Err(e) => {
            log::error!("netvsp: cannot encode {:?}: {e}", msg.message_type());
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvnet_wire::nvsp::{Init, NvspMessageType};

    #[test]
    fn negotiation_walks_down_like_linux() {
        // Linux tries 6.1, 6, 5, 4, 2, 1 with min = max; a 5.0 host accepts 5 first.
        let host = NvspVersion::PROTOCOL_VERSION_5.0;
        let tries: Vec<_> = hvnet_wire::nvsp::NVSP_GUEST_VERSIONS
            .iter()
            .map(|v| negotiate(v.0, v.0, host))
            .collect();
        assert_eq!(tries[0], Err(NvspStatus::PROTOCOL_TOO_NEW));
        assert_eq!(tries[1], Err(NvspStatus::PROTOCOL_TOO_NEW));
        assert_eq!(tries[2], Ok(NvspVersion::PROTOCOL_VERSION_5));
        assert_eq!(tries[3], Ok(NvspVersion::PROTOCOL_VERSION_4));
        // A range picks the newest the host accepts.
        assert_eq!(
            negotiate(2, 0x60001, 0x60000),
            Ok(NvspVersion::PROTOCOL_VERSION_6)
        );
        // A host maximum that is not a version still bounds the choice.
        assert_eq!(
            negotiate(2, 0x60001, 0x45555),
            Ok(NvspVersion::PROTOCOL_VERSION_4)
        );
        assert_eq!(negotiate(0x30000, 0x30000, 0x60001), Err(NvspStatus::FAIL));
        assert_eq!(negotiate(0, 1, 0x60001), Err(NvspStatus::PROTOCOL_TOO_OLD));
        assert_eq!(negotiate(5, 2, 0x60001), Err(NvspStatus::FAIL));
        assert_eq!(negotiate(2, 2, 2), Ok(NvspVersion::PROTOCOL_VERSION_1));
    }

    #[test]
    fn section_geometry() {
        assert_eq!(frame_mtu(None), 1514);
        assert_eq!(frame_mtu(Some(1514)), 1514);
        assert_eq!(frame_mtu(Some(9000)), 9000);
        assert_eq!(frame_mtu(Some(100)), 1514);
        assert_eq!(frame_mtu(Some(u32::MAX)), 1514);
        assert_eq!(recv_section_size(1514), 1806);
        assert_eq!(usable_section_bytes(1806), 1770);
        assert_eq!(usable_section_bytes(10), 1);
    }

    #[test]
    fn message_padding_follows_the_version() {
        let m = NvspMessage::Init(Init {
            min_protocol_ver: 2.into(),
            max_protocol_ver: 2.into(),
        });
        assert_eq!(encode(&m, None).len(), 28);
        assert_eq!(encode(&m, Some(NvspVersion::PROTOCOL_VERSION_6)).len(), 28);
        let b = encode(&m, Some(NvspVersion::PROTOCOL_VERSION_61));
        assert_eq!(b.len(), 40);
        assert_eq!(&b[..4], &NvspMessageType::INIT.0.to_le_bytes());
    }
}
