//! The netvsc driver: probe (primary worker, under the configuration lock), the
//! sub-channel handler (sub-channel worker, never the lock), removal, and MTU changes.
//!
//! The probe follows Linux's `netvsc_probe` -> `rndis_filter_device_add` order: open the
//! primary channel; NVSP INIT (newest version first); NDIS config and version; receive
//! and send buffers; RNDIS INITIALIZE; query MAC, MTU and link; for multi-queue, RSS
//! capabilities, the SUBCHANNEL request and the wait until the sub-channel worker has
//! opened what the host granted; RSS parameters; packet filter; register the interface.
//! The configuration lock is held from start to end, as rtnl is held in Linux: that is
//! exactly the situation the two offer workers make safe.
//!
//! # MTU changes
//!
//! The MTU reaches the host only in NVSP's SEND_NDIS_CONFIG, which a host takes once per
//! session and only before the receive buffer (it sizes the receive sections by it).
//! There is no lighter way to change it than Linux's `netvsc_change_mtu`: detach the
//! device and attach it again with the new value. Detaching stops the queues, sets the
//! packet filter to 0 (`rndis_filter_close`), waits until every send is completed and
//! the rings are quiet, sends RNDIS HALT, revokes both buffers, closes the sub-channels
//! and then the primary, and tears the buffer GPADLs down (after the close, the order of
//! Windows 10 and later hosts). Attaching is the probe's sequence again on the same NIC
//! with the new MTU in the NDIS config. Sub-channels the host still offers are reopened
//! directly; the ones it offers anew come through the sub-channel worker as at probe.
//! If the host does not take the new MTU the NIC is attached again with the old one.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::{Rc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use core::mem::size_of;

use hvnet_runtime::sync::Semaphore;
use hvnet_runtime::Handle;
use hvnet_vmbus::bus::{Device, Driver, OpenedChannel, RingSizes};
use hvnet_vmbus::channel::{BoxFuture, ChannelError, DeviceInstance};
use hvnet_vmbus::memory::SharedBuffer;
use hvnet_wire::nvsp::{
    Init, InitComplete, NvspMessage, NvspStatus, NvspVersion, RevokeBuffer, SendNdisConfig,
    SendNdisVersion, SendReceiveBuffer, SendSendBuffer, Sender, SubchannelRequest,
    NDIS_CAP_IEEE8021Q, NDIS_CAP_SRIOV, NDIS_CAP_TEAMING, NETVSC_RECEIVE_BUFFER_ID,
    NETVSC_SEND_BUFFER_ID, NVSP_GUEST_VERSIONS, NVSP_SUBCHANNEL_ALLOCATE, VRSS_CHANNEL_MAX,
};
use hvnet_wire::rndis::{
    encode_rss_parameters, HaltRequest, InitializeComplete, InitializeRequest, NdisRecvScaleCap,
    Oid, QueryRequest, RndisMessage, RndisPacket, RndisStatus, SetRequest, ITAB_NUM, ITAB_NUM_MAX,
    NDIS_HASH_FUNC_TOEPLITZ, NDIS_HASH_IPV4, NDIS_HASH_TCP_IPV4, NDIS_MEDIA_STATE_CONNECTED,
    NDIS_PACKET_TYPE_ALL_MULTICAST, NDIS_PACKET_TYPE_BROADCAST, NDIS_PACKET_TYPE_DIRECTED,
    NETVSC_DEFAULT_HASH_KEY, RNDIS_HEADER_SIZE, RNDIS_LINUX_MAX_XFER_SIZE, RNDIS_MAJOR_VERSION,
    RNDIS_MINOR_VERSION,
};
use hvnet_wire::vmbus::{Guid, HV_NIC_GUID};
use log::{debug, info, warn};
use zerocopy::FromBytes;

use crate::config::NetvscConfig;
use crate::device::{NetvscError, NetvscNic, RecvBuffer, SendBuffer, ETH_HEADER, VLAN_PPI};
use crate::nic::{MtuError, Nic, NicRegistry, MIN_MTU};
use crate::sections::Sections;

/// The IP MTU of a standard Ethernet frame (Linux `ETH_DATA_LEN`): the initial MTU, and
/// the most a host that sends no usable maximum (or an NVSP 1 host, which takes no NDIS
/// config) allows.
const ETH_DATA_LEN: usize = 1500;
/// The largest IP MTU NVSP can describe (Linux `NETVSC_MTU - ETH_HLEN`).
const NETVSC_MAX_MTU: usize = 65535 - ETH_HEADER;

/// The netvsc driver, registered with the VMBus for the synthetic NIC class.
pub struct NetvscDriver<R: NicRegistry + 'static> {
    registry: Rc<R>,
    config: NetvscConfig,
}

impl<R: NicRegistry + 'static> NetvscDriver<R> {
    /// A driver that registers the NICs it brings up with `registry`.
    pub fn new(registry: Rc<R>, config: NetvscConfig) -> Self {
        Self { registry, config }
    }
}

/// What a successful probe leaves with the VMBus: told when the NIC goes away.
struct NetvscInstance<R: NicRegistry + 'static> {
    nic: Rc<NetvscNic>,
    registry: Rc<R>,
}

impl<R: NicRegistry + 'static> Driver for NetvscDriver<R> {
    fn name(&self) -> &'static str {
        "netvsc"
    }

    fn class_id(&self) -> Guid {
        HV_NIC_GUID
    }

    fn probe(
        &self,
        device: Device,
    ) -> BoxFuture<'static, Result<Rc<dyn DeviceInstance>, ChannelError>> {
        let registry = self.registry.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let handle = device.bus()?.handle().clone();
            let mut table = registry.config_lock().lock().await;
            let nic = match bring_up(&device, handle, config).await {
                Ok(nic) => nic,
                Err((e, nic)) => {
                    warn!(
                        "netvsc: probe of {} failed: {e}",
                        device.channel().instance_id()
                    );
                    for ch in nic.shut_down() {
                        let _ = ch.close().await;
                    }
                    return Err(e.into());
                }
            };
            let as_nic: Rc<dyn Nic> = nic.clone();
            registry.register(&mut table, as_nic);
            drop(table);
            info!(
                "netvsc {}: up, MAC {}, MTU {} (at most {}), {} queue(s), NVSP {:#x}, link {}",
                nic.id,
                MacDisplay(nic.mac()),
                nic.mtu(),
                nic.max_mtu(),
                nic.queue_count(),
                nic.nvsp_version().0,
                if nic.link_up() { "up" } else { "down" }
            );
            let instance: Rc<dyn DeviceInstance> = Rc::new(NetvscInstance { nic, registry });
            Ok(instance)
        })
    }
}

impl<R: NicRegistry + 'static> DeviceInstance for NetvscInstance<R> {
    fn remove(&self) -> BoxFuture<'static, ()> {
        let nic = self.nic.clone();
        let registry = self.registry.clone();
        Box::pin(async move {
            // Stop the data path first so nothing waits on a dead channel, then take the
            // interface out under the lock.
            let _ = nic.shut_down();
            let mut table = registry.config_lock().lock().await;
            let as_nic: Rc<dyn Nic> = nic.clone();
            registry.unregister(&mut table, &as_nic);
            drop(table);
            info!("netvsc {}: removed", nic.id);
        })
    }

    fn subchannel_removed(&self, index: u16) -> BoxFuture<'static, ()> {
        let nic = self.nic.clone();
        Box::pin(async move {
            // An MTU change may be closing or reopening this very sub-channel: the bus
            // releases the channel once this returns, so let the change end first (it
            // ends soon once the channel is rescinded). The primary's rescind waits for
            // the change through the configuration lock.
            nic.change_done().await;
            nic.detach_queue(index);
        })
    }
}

type ProbeError = (NetvscError, Rc<NetvscNic>);

async fn bring_up(
    device: &Device,
    handle: Handle,
    config: NetvscConfig,
) -> Result<Rc<NetvscNic>, ProbeError> {
    let id = format!("{}", device.channel().instance_id());
    let nic = Rc::new_cyclic(|me: &Weak<NetvscNic>| {
        NetvscNic::new(id, handle, config, device.clone(), me.clone())
    });
    match attach(device, &nic, Vec::new()).await {
        Ok(()) => Ok(nic),
        Err(e) => Err((e, nic)),
    }
}

fn ring_sizes(nic: &NetvscNic) -> RingSizes {
    RingSizes {
        outgoing_pages: nic.config.ring_pages,
        incoming_pages: nic.config.ring_pages,
    }
}

/// Brings the device up on `nic` (the probe, and the second half of an MTU change):
/// opens the primary, negotiates with the NIC's current MTU, sets up buffers, RNDIS and
/// the queues. `known` are sub-channels opened before (an MTU change closed them) that
/// may be reopened without a new offer.
async fn attach(device: &Device, nic: &NetvscNic, known: Vec<Device>) -> Result<(), NetvscError> {
    let sizes = ring_sizes(nic);
    let primary = device.open(sizes).await?;
    if let Err(ch) = nic.attach_primary(primary) {
        let _ = ch.close().await;
        return Err(ChannelError::Rescinded.into());
    }
    negotiate(nic).await?;
    setup_buffers(device, nic).await?;
    rndis_init(nic).await?;
    setup_queues(device, nic, sizes, known).await?;
    set_packet_filter(nic, default_filter()).await?;
    Ok(())
}

/// NVSP INIT, newest version first, then NDIS config and version.
async fn negotiate(nic: &NetvscNic) -> Result<(), NetvscError> {
    let mut agreed = None;
    for version in NVSP_GUEST_VERSIONS {
        let init = NvspMessage::Init(Init {
            min_protocol_ver: version.0.into(),
            max_protocol_ver: version.0.into(),
        });
        let reply = nic.nvsp_request(&init, true).await?;
        match NvspMessage::parse(&reply, Sender::Host) {
            Ok(NvspMessage::InitComplete(InitComplete { status, .. }))
                if status.get() == NvspStatus::SUCCESS.0 =>
            {
                agreed = Some(version);
                break;
            }
            Ok(NvspMessage::InitComplete(_)) => continue,
            _ => return Err(NetvscError::BadReply("INIT_COMPLETE")),
        }
    }
    let version = agreed.ok_or(NetvscError::NoVersion)?;
    nic.nvsp_version.set(version);
    if version >= NvspVersion::PROTOCOL_VERSION_2 {
        let mut capability = NDIS_CAP_IEEE8021Q;
        if version >= NvspVersion::PROTOCOL_VERSION_5 {
            capability |= NDIS_CAP_SRIOV | NDIS_CAP_TEAMING;
        }
        // The frame MTU: the IP MTU and the Ethernet header (Linux: mtu + ETH_HLEN).
        let frame_mtu = u32::try_from(nic.mtu.get() + ETH_HEADER).unwrap_or(u32::MAX);
        let ndis_config = NvspMessage::SendNdisConfig(SendNdisConfig {
            mtu: frame_mtu.into(),
            reserved: 0.into(),
            capability: capability.into(),
        });
        nic.nvsp_request(&ndis_config, false).await?;
    }
    let ndis = NvspMessage::SendNdisVersion(SendNdisVersion::new(version.ndis_version()));
    nic.nvsp_request(&ndis, false).await?;
    Ok(())
}

fn pages_for(bytes: usize) -> usize {
    bytes.div_ceil(hvnet_vmbus::memory::PAGE_SIZE).max(1)
}

/// Tears down a GPADL the host refused or that the NIC could not keep (best effort:
/// after a rescind the bus takes care of it).
async fn drop_gpadl(device: &Device, gpadl: u32) {
    if !device.channel().is_rescinded() {
        if let Err(e) = device.teardown_gpadl(gpadl).await {
            debug!("netvsc: GPADL {gpadl:#x} teardown: {e}");
        }
    }
}

/// Receive buffer (GPADL, id 0xCAFE) and send buffer (id 0), checking the host's layout.
async fn setup_buffers(device: &Device, nic: &NetvscNic) -> Result<(), NetvscError> {
    let (recv, gpadl, limit) = host_buffer(device, nic, nic.config.recv_buffer_bytes, |g, len| {
        receive_buffer_layout(nic, g, len)
    })
    .await?;
    *nic.recv.borrow_mut() = Some(RecvBuffer {
        buf: recv,
        limit,
        gpadl,
    });

    let (send, gpadl, section_size) =
        host_buffer(device, nic, nic.config.send_buffer_bytes, |g, len| {
            send_buffer_layout(nic, g, len)
        })
        .await?;
    let count = send.len() / section_size;
    *nic.send.borrow_mut() = Some(SendBuffer {
        buf: send,
        section_size,
        sections: Sections::new(count),
        gpadl,
    });
    Ok(())
}

/// Allocates `bytes` of shared memory, gives it a GPADL and has the host take it with
/// `layout` (given the GPADL and the length; it answers the layout's figure). The GPADL
/// is torn down again if the host refuses or the NIC went away meanwhile.
async fn host_buffer<Fut>(
    device: &Device,
    nic: &NetvscNic,
    bytes: usize,
    layout: impl FnOnce(u32, usize) -> Fut,
) -> Result<(Rc<dyn SharedBuffer>, u32, usize), NetvscError>
where
    Fut: core::future::Future<Output = Result<usize, NetvscError>>,
{
    let buf: Rc<dyn SharedBuffer> = Rc::from(device.bus()?.allocator().alloc(pages_for(bytes))?);
    let gpadl = device.create_gpadl(buf.clone()).await?;
    match layout(gpadl, buf.len()).await {
        Ok(figure) if !nic.removed() => Ok((buf, gpadl, figure)),
        Ok(_) => {
            drop_gpadl(device, gpadl).await;
            Err(ChannelError::Rescinded.into())
        }
        Err(e) => {
            drop_gpadl(device, gpadl).await;
            Err(e)
        }
    }
}

/// SEND_RECV_BUF for `gpadl` (a buffer of `len` bytes); returns the end of the host's
/// section area.
async fn receive_buffer_layout(
    nic: &NetvscNic,
    gpadl: u32,
    len: usize,
) -> Result<usize, NetvscError> {
    let msg = NvspMessage::SendReceiveBuffer(SendReceiveBuffer {
        gpadl_handle: gpadl.into(),
        id: NETVSC_RECEIVE_BUFFER_ID.into(),
    });
    let reply = nic.nvsp_request(&msg, true).await?;
    match NvspMessage::parse(&reply, Sender::Host) {
        Ok(NvspMessage::SendReceiveBufferComplete(m)) => {
            if m.fixed.status.get() != NvspStatus::SUCCESS.0 {
                return Err(NetvscError::Refused(m.fixed.status.get()));
            }
            let [section] = m.sections else {
                return Err(NetvscError::BadReply(
                    "receive buffer must have one section",
                ));
            };
            let size = section.sub_alloc_size.get() as u64;
            let count = section.num_sub_allocs.get() as u64;
            let start = section.offset.get() as u64;
            let end = section.end_offset.get() as u64;
            if size == 0
                || count == 0
                || end > len as u64
                || start.saturating_add(size * count) > end
            {
                return Err(NetvscError::BadReply(
                    "receive buffer section outside the buffer",
                ));
            }
            Ok(end as usize)
        }
        _ => Err(NetvscError::BadReply("SEND_RECV_BUF_COMPLETE")),
    }
}

/// SEND_SEND_BUF for `gpadl` (a buffer of `len` bytes); returns the section size.
async fn send_buffer_layout(nic: &NetvscNic, gpadl: u32, len: usize) -> Result<usize, NetvscError> {
    let msg = NvspMessage::SendSendBuffer(SendSendBuffer {
        gpadl_handle: gpadl.into(),
        id: NETVSC_SEND_BUFFER_ID.into(),
    });
    let reply = nic.nvsp_request(&msg, true).await?;
    match NvspMessage::parse(&reply, Sender::Host) {
        Ok(NvspMessage::SendSendBufferComplete(m)) => {
            if m.status.get() != NvspStatus::SUCCESS.0 {
                return Err(NetvscError::Refused(m.status.get()));
            }
            let size = m.section_size.get() as usize;
            // A section must hold at least a full frame with its RNDIS header.
            if !(2048..=len).contains(&size) {
                return Err(NetvscError::BadReply("send section size"));
            }
            Ok(size)
        }
        _ => Err(NetvscError::BadReply("SEND_SEND_BUF_COMPLETE")),
    }
}

/// Sends an RNDIS QUERY and returns the information buffer of the answer.
async fn query(nic: &NetvscNic, oid: Oid, input: &[u8]) -> Result<Vec<u8>, NetvscError> {
    let req_id = nic.next_id();
    let msg = RndisMessage::QueryRequest {
        body: QueryRequest {
            req_id: req_id.into(),
            oid: oid.0.into(),
            ..QueryRequest::default()
        },
        info: input,
    };
    let reply = nic.rndis_request(&msg, req_id, true).await?;
    match RndisMessage::parse(&reply) {
        Ok(RndisMessage::QueryComplete { body, info }) => {
            if body.status.get() != RndisStatus::SUCCESS.0 {
                return Err(NetvscError::Refused(body.status.get()));
            }
            Ok(info.to_vec())
        }
        _ => Err(NetvscError::BadReply("QUERY_CMPLT")),
    }
}

/// Sends an RNDIS SET and checks its status.
async fn set(nic: &NetvscNic, oid: Oid, info: &[u8]) -> Result<(), NetvscError> {
    let req_id = nic.next_id();
    let msg = RndisMessage::SetRequest {
        body: SetRequest {
            req_id: req_id.into(),
            oid: oid.0.into(),
            ..SetRequest::default()
        },
        info,
    };
    let reply = nic.rndis_request(&msg, req_id, true).await?;
    match RndisMessage::parse(&reply) {
        Ok(RndisMessage::SetComplete(c)) if c.status.get() == RndisStatus::SUCCESS.0 => Ok(()),
        Ok(RndisMessage::SetComplete(c)) => Err(NetvscError::Refused(c.status.get())),
        _ => Err(NetvscError::BadReply("SET_CMPLT")),
    }
}

fn u32_of(info: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(info.get(..4)?.try_into().ok()?))
}

/// RNDIS INITIALIZE, then MAC, maximum frame size and link state.
async fn rndis_init(nic: &NetvscNic) -> Result<(), NetvscError> {
    let req_id = nic.next_id();
    let msg = RndisMessage::InitializeRequest(InitializeRequest {
        req_id: req_id.into(),
        major_ver: RNDIS_MAJOR_VERSION.into(),
        minor_ver: RNDIS_MINOR_VERSION.into(),
        max_xfer_size: RNDIS_LINUX_MAX_XFER_SIZE.into(),
    });
    let reply = nic.rndis_request(&msg, req_id, true).await?;
    match RndisMessage::parse(&reply) {
        Ok(RndisMessage::InitializeComplete(InitializeComplete { status, .. })) => {
            if status.get() != RndisStatus::SUCCESS.0 {
                return Err(NetvscError::Refused(status.get()));
            }
        }
        _ => return Err(NetvscError::BadReply("INITIALIZE_CMPLT")),
    }
    let mac = query(nic, Oid::OID_802_3_PERMANENT_ADDRESS, &[]).await?;
    let mac: [u8; 6] = mac
        .get(..6)
        .and_then(|m| m.try_into().ok())
        .ok_or(NetvscError::BadReply("MAC address"))?;
    nic.mac.set(mac);
    // The host's maximum frame size is the largest IP MTU it carries; as Linux does, it
    // only ever lowers the MTU in use.
    let host_max = match query(nic, Oid::GEN_MAXIMUM_FRAME_SIZE, &[]).await {
        Ok(info) => match u32_of(&info).map(|v| v as usize) {
            Some(mtu) if (MIN_MTU..=NETVSC_MAX_MTU).contains(&mtu) => mtu,
            other => {
                warn!("netvsc {}: ignoring host MTU {other:?}", nic.id);
                ETH_DATA_LEN
            }
        },
        Err(NetvscError::Refused(_)) => ETH_DATA_LEN,
        Err(e) => return Err(e),
    };
    let max = max_mtu(nic, host_max);
    nic.max_mtu.set(max);
    if nic.mtu.get() > max {
        nic.mtu.set(max);
    }
    let link = query(nic, Oid::GEN_MEDIA_CONNECT_STATUS, &[]).await?;
    nic.link
        .set(u32_of(&link) == Some(NDIS_MEDIA_STATE_CONNECTED));
    Ok(())
}

/// The largest MTU the NIC can use with a host whose maximum is `host_max`: a frame of
/// that MTU with its RNDIS header and a VLAN PPI (a tag travels in the PPI, not in the
/// frame) must fit one send section (large frames are not sent from page buffers), and
/// an NVSP 1 host takes no NDIS config.
fn max_mtu(nic: &NetvscNic, host_max: usize) -> usize {
    let section = nic
        .send
        .borrow()
        .as_ref()
        .map_or(0, |s| s.section_size)
        .saturating_sub(RNDIS_HEADER_SIZE + size_of::<RndisPacket>() + VLAN_PPI + ETH_HEADER);
    let mut max = host_max.min(section);
    if nic.nvsp_version() < NvspVersion::PROTOCOL_VERSION_2 {
        max = max.min(ETH_DATA_LEN);
    }
    max.max(MIN_MTU)
}

/// Multi-queue setup (NVSP >= 5): RSS capabilities, SUBCHANNEL, the wait for the
/// sub-channel worker, RSS parameters. Sub-channels in `known` (opened before an MTU
/// change) that the host grants again are reopened here instead of waiting for offers.
async fn setup_queues(
    device: &Device,
    nic: &NetvscNic,
    sizes: RingSizes,
    known: Vec<Device>,
) -> Result<(), NetvscError> {
    let wanted = usize::from(nic.config.queues).clamp(1, VRSS_CHANNEL_MAX);
    if nic.nvsp_version() < NvspVersion::PROTOCOL_VERSION_5 || wanted < 2 {
        return Ok(());
    }
    let caps = match query(nic, Oid::GEN_RECEIVE_SCALE_CAPABILITIES, &[]).await {
        Ok(info) => match NdisRecvScaleCap::read_from_prefix(&info) {
            Ok((caps, _)) => caps,
            Err(_) => return Err(NetvscError::BadReply("RSS capabilities")),
        },
        Err(NetvscError::Refused(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let host_queues = caps.num_recv_que.get() as usize;
    let queues = wanted.min(host_queues);
    if queues < 2 {
        return Ok(());
    }
    let asked = queues - 1;
    // The handler runs on the sub-channel worker: it opens the channel and attaches it,
    // never touching the configuration lock the probe holds.
    let opened = Rc::new(Semaphore::named("netvsc sub-channels opened", 0));
    let weak = nic.me.clone();
    let done = opened.clone();
    device.set_subchannel_handler(Rc::new(move |sub: Device| {
        let weak = weak.clone();
        let done = done.clone();
        Box::pin(async move {
            open_subchannel(weak, sub, sizes, asked).await;
            done.release(1);
        })
    }));
    let request = NvspMessage::SubchannelRequest(SubchannelRequest {
        op: NVSP_SUBCHANNEL_ALLOCATE.into(),
        num_subchannels: (asked as u32).into(),
    });
    let reply = nic.nvsp_request(&request, true).await?;
    let granted = match NvspMessage::parse(&reply, Sender::Host) {
        Ok(NvspMessage::SubchannelComplete(c)) if c.status.get() == NvspStatus::SUCCESS.0 => {
            c.num_subchannels.get() as usize
        }
        Ok(NvspMessage::SubchannelComplete(c)) => {
            warn!(
                "netvsc {}: host refused sub-channels (status {:#x}); one queue",
                nic.id,
                c.status.get()
            );
            0
        }
        _ => return Err(NetvscError::BadReply("SUBCHANNEL completion")),
    };
    if granted > asked {
        warn!(
            "netvsc {}: host granted {granted} sub-channels, {asked} asked; using {asked}",
            nic.id
        );
    }
    let granted = granted.min(asked);
    // Sub-channels still offered from before: the host will not offer them again.
    let mut reopened = 0;
    for sub in known {
        let index = usize::from(sub.channel().sub_channel_index());
        if index == 0 || index > granted || sub.channel().is_rescinded() {
            continue;
        }
        reopened += 1;
        open_subchannel(nic.me.clone(), sub, sizes, asked).await;
    }
    let offered = granted.saturating_sub(reopened);
    if offered > 0 {
        let wait = nic
            .handle
            .timeout(nic.subchannel_timeout(), opened.acquire(offered));
        let waited = device
            .channel()
            .or_rescind(async { Ok(wait.await.is_ok()) })
            .await?;
        if !waited {
            warn!(
                "netvsc {}: only {} of {granted} sub-channels opened within {:?}; carrying on with them",
                nic.id,
                nic.queue_count().saturating_sub(1),
                nic.subchannel_timeout()
            );
        }
    }
    if nic.removed() {
        return Err(ChannelError::Rescinded.into());
    }
    let open = nic.open_queues();
    if open.len() < 2 {
        return Ok(());
    }
    let table_len = match caps.num_indirect_tabent.get() as usize {
        0 => ITAB_NUM,
        n => n.min(ITAB_NUM_MAX),
    };
    let table: Vec<u32> = (0..table_len)
        .map(|i| u32::from(open[i % open.len()]))
        .collect();
    let mut buf = vec![0u8; 64 + table_len * 4 + NETVSC_DEFAULT_HASH_KEY.len()];
    let len = encode_rss_parameters(
        &mut buf,
        0,
        NDIS_HASH_FUNC_TOEPLITZ | NDIS_HASH_IPV4 | NDIS_HASH_TCP_IPV4,
        &table,
        &NETVSC_DEFAULT_HASH_KEY,
    )
    .map_err(|_| NetvscError::BadReply("RSS parameters"))?;
    set(nic, Oid::GEN_RECEIVE_SCALE_PARAMETERS, &buf[..len]).await?;
    info!("netvsc {}: RSS over queues {open:?}", nic.id);
    Ok(())
}

/// Sub-channel worker (or an MTU change): opens sub-channel `sub` and attaches it as a
/// queue.
async fn open_subchannel(nic: Weak<NetvscNic>, sub: Device, sizes: RingSizes, asked: usize) {
    let index = sub.channel().sub_channel_index();
    if usize::from(index) > asked {
        warn!("netvsc: sub-channel {index} was not asked for; left closed");
        return;
    }
    if nic.upgrade().is_none_or(|n| n.is_removed()) {
        return;
    }
    let channel = match sub.open(sizes).await {
        Ok(ch) => ch,
        Err(e) => {
            warn!("netvsc: opening sub-channel {index} failed: {e}");
            return;
        }
    };
    let rejected: Option<OpenedChannel> = match nic.upgrade() {
        Some(nic) => nic.attach_queue(index, channel).err(),
        None => Some(channel),
    };
    if let Some(ch) = rejected {
        let _ = ch.close().await;
    }
}

fn default_filter() -> u32 {
    NDIS_PACKET_TYPE_DIRECTED | NDIS_PACKET_TYPE_BROADCAST | NDIS_PACKET_TYPE_ALL_MULTICAST
}

async fn set_packet_filter(nic: &NetvscNic, filter: u32) -> Result<(), NetvscError> {
    set(nic, Oid::GEN_CURRENT_PACKET_FILTER, &filter.to_le_bytes()).await
}

// ---------------------------------------------------------------------------------------
// MTU changes.

/// [`Nic::set_mtu`] for netvsc (see the module docs). Runs under the caller's
/// configuration lock; takes no lock itself.
pub(crate) async fn change_mtu(nic: &NetvscNic, mtu: usize) -> Result<(), MtuError> {
    if nic.removed() {
        return Err(MtuError::Removed);
    }
    let max = nic.max_mtu.get();
    if !(MIN_MTU..=max).contains(&mtu) {
        return Err(MtuError::OutOfRange {
            mtu,
            min: MIN_MTU,
            max,
        });
    }
    if nic.changing.replace(true) {
        return Err(MtuError::Busy);
    }
    let result = if mtu == nic.mtu.get() {
        Ok(())
    } else {
        reconfigure(nic, mtu).await
    };
    nic.changing.set(false);
    nic.bump();
    result
}

/// Detach, then attach with `mtu`; on failure attach again with the old MTU.
async fn reconfigure(nic: &NetvscNic, mtu: usize) -> Result<(), MtuError> {
    let Some(device) = nic.device.borrow().clone() else {
        return Err(MtuError::Removed);
    };
    let old = nic.mtu.get();
    info!("netvsc {}: changing MTU {old} -> {mtu}", nic.id);
    nic.paused.set(true);
    nic.bump();
    let result = async {
        let known = detach(&device, nic).await?;
        nic.mtu.set(mtu);
        let e = match attach(&device, nic, known).await {
            Ok(()) => {
                nic.count(|c| c.mtu_changes += 1);
                info!("netvsc {}: MTU {}", nic.id, nic.mtu.get());
                return Ok(());
            }
            Err(e) => e,
        };
        gone(nic, &device)?;
        warn!(
            "netvsc {}: MTU {mtu} not taken ({e}); back to {old}",
            nic.id
        );
        let known = detach(&device, nic).await?;
        nic.mtu.set(old);
        match attach(&device, nic, known).await {
            Ok(()) => Err(MtuError::Failed {
                restored: Some(nic.mtu.get()),
            }),
            Err(e) => {
                gone(nic, &device)?;
                warn!("netvsc {}: cannot bring the NIC back: {e}", nic.id);
                let _ = detach(&device, nic).await;
                nic.link.set(false);
                Err(MtuError::Failed { restored: None })
            }
        }
    }
    .await;
    nic.paused.set(false);
    nic.bump();
    result
}

/// `Removed` once the NIC or its primary channel is gone.
fn gone(nic: &NetvscNic, device: &Device) -> Result<(), MtuError> {
    if nic.removed() || device.channel().is_rescinded() {
        Err(MtuError::Removed)
    } else {
        Ok(())
    }
}

/// Takes the device down as Linux's `netvsc_detach` does (see the module docs). Steps
/// that fail are logged and skipped: whatever happens, the channels are closed and the
/// buffers given back. Returns the sub-channels that were open, to reopen them.
async fn detach(device: &Device, nic: &NetvscNic) -> Result<Vec<Device>, MtuError> {
    if nic.primary().is_some() {
        // The host stops indicating frames (`rndis_filter_close`).
        if let Err(e) = set_packet_filter(nic, 0).await {
            debug!("netvsc {}: clearing the packet filter: {e}", nic.id);
        }
        let deadline = nic.handle.now().saturating_add(nic.config.reply_timeout);
        if !nic.drain(deadline).await {
            warn!(
                "netvsc {}: queues not quiet before detaching ({} of {} send sections back)",
                nic.id,
                nic.free_send_sections(),
                nic.send_sections()
            );
        }
        gone(nic, device)?;
        let req_id = nic.next_id();
        let halt = RndisMessage::HaltRequest(HaltRequest {
            req_id: req_id.into(),
        });
        if let Err(e) = nic.rndis_request(&halt, req_id, false).await {
            debug!("netvsc {}: HALT: {e}", nic.id);
        }
        for revoke in [
            NvspMessage::RevokeReceiveBuffer(RevokeBuffer {
                id: NETVSC_RECEIVE_BUFFER_ID.into(),
            }),
            NvspMessage::RevokeSendBuffer(RevokeBuffer {
                id: NETVSC_SEND_BUFFER_ID.into(),
            }),
        ] {
            if nic.recv.borrow().is_none() && nic.send.borrow().is_none() {
                break;
            }
            if let Err(e) = nic.nvsp_request(&revoke, false).await {
                debug!("netvsc {}: revoking a buffer: {e}", nic.id);
            }
        }
    }
    let mut known = Vec::new();
    for channel in nic.take_queues() {
        let sub = channel.device().clone();
        if let Err(e) = channel.close().await {
            debug!("netvsc {}: closing a channel: {e}", nic.id);
        }
        if sub.channel().sub_channel_index() != 0 {
            known.push(sub);
        }
    }
    let (recv, send) = nic.take_buffers();
    for gpadl in [recv.map(|r| r.gpadl), send.map(|s| s.gpadl)]
        .into_iter()
        .flatten()
    {
        drop_gpadl(device, gpadl).await;
    }
    gone(nic, device)?;
    Ok(known)
}

struct MacDisplay([u8; 6]);

impl core::fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

const _: () = assert!(size_of::<NdisRecvScaleCap>() == 18);
