//! The netvsc driver: probe (primary worker, under the configuration lock), the
//! sub-channel handler (sub-channel worker, never the lock) and removal.
//!
//! The probe follows Linux's `netvsc_probe` -> `rndis_filter_device_add` order: open the
//! primary channel; NVSP INIT (newest version first); NDIS config and version; receive
//! and send buffers; RNDIS INITIALIZE; query MAC, MTU and link; for multi-queue, RSS
//! capabilities, the SUBCHANNEL request and the wait until the sub-channel worker has
//! opened what the host granted; RSS parameters; packet filter; register the interface.
//! The configuration lock is held from start to end, as rtnl is held in Linux: that is
//! exactly the situation the two offer workers make safe.

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
    Init, InitComplete, NvspMessage, NvspStatus, NvspVersion, SendNdisConfig, SendNdisVersion,
    SendReceiveBuffer, SendSendBuffer, Sender, SubchannelRequest, NDIS_CAP_IEEE8021Q,
    NDIS_CAP_SRIOV, NDIS_CAP_TEAMING, NETVSC_RECEIVE_BUFFER_ID, NETVSC_SEND_BUFFER_ID,
    NVSP_GUEST_VERSIONS, NVSP_SUBCHANNEL_ALLOCATE, VRSS_CHANNEL_MAX,
};
use hvnet_wire::rndis::{
    encode_rss_parameters, InitializeComplete, InitializeRequest, NdisRecvScaleCap, Oid,
    QueryRequest, RndisMessage, RndisStatus, SetRequest, ITAB_NUM, ITAB_NUM_MAX,
    NDIS_HASH_FUNC_TOEPLITZ, NDIS_HASH_IPV4, NDIS_HASH_TCP_IPV4, NDIS_MEDIA_STATE_CONNECTED,
    NDIS_PACKET_TYPE_ALL_MULTICAST, NDIS_PACKET_TYPE_BROADCAST, NDIS_PACKET_TYPE_DIRECTED,
    NETVSC_DEFAULT_HASH_KEY, RNDIS_LINUX_MAX_XFER_SIZE, RNDIS_MAJOR_VERSION, RNDIS_MINOR_VERSION,
};
use hvnet_wire::vmbus::{Guid, HV_NIC_GUID};
use log::{info, warn};
use zerocopy::FromBytes;

use crate::config::NetvscConfig;
use crate::device::{NetvscError, NetvscNic, RecvBuffer, SendBuffer};
use crate::nic::{Nic, NicRegistry};
use crate::sections::Sections;

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
                    if let Some(nic) = nic {
                        for ch in nic.shut_down() {
                            let _ = ch.close().await;
                        }
                    }
                    return Err(e.into());
                }
            };
            let as_nic: Rc<dyn Nic> = nic.clone();
            registry.register(&mut table, as_nic);
            drop(table);
            info!(
                "netvsc {}: up, MAC {}, MTU {}, {} queue(s), NVSP {:#x}, link {}",
                nic.id,
                MacDisplay(nic.mac()),
                nic.mtu(),
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
            nic.detach_queue(index);
        })
    }
}

type ProbeError = (NetvscError, Option<Rc<NetvscNic>>);

fn with_nic<T>(nic: &Rc<NetvscNic>, r: Result<T, NetvscError>) -> Result<T, ProbeError> {
    r.map_err(|e| (e, Some(nic.clone())))
}

async fn bring_up(
    device: &Device,
    handle: Handle,
    config: NetvscConfig,
) -> Result<Rc<NetvscNic>, ProbeError> {
    let sizes = RingSizes {
        outgoing_pages: config.ring_pages,
        incoming_pages: config.ring_pages,
    };
    let primary = device.open(sizes).await.map_err(|e| (e.into(), None))?;
    let id = format!("{}", device.channel().instance_id());
    let nic = Rc::new(NetvscNic::new(id, handle, config, primary));
    with_nic(&nic, negotiate(&nic).await)?;
    with_nic(&nic, setup_buffers(device, &nic).await)?;
    with_nic(&nic, rndis_init(&nic).await)?;
    with_nic(&nic, setup_queues(device, &nic, sizes).await)?;
    with_nic(&nic, set_packet_filter(&nic).await)?;
    Ok(nic)
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
        let ndis_config = NvspMessage::SendNdisConfig(SendNdisConfig {
            mtu: ((nic.mtu.get() + 14) as u32).into(),
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

/// Receive buffer (GPADL, id 0xCAFE) and send buffer (id 0), checking the host's layout.
async fn setup_buffers(device: &Device, nic: &NetvscNic) -> Result<(), NetvscError> {
    let bus = device.bus()?;
    let recv: Rc<dyn SharedBuffer> = Rc::from(
        bus.allocator()
            .alloc(pages_for(nic.config.recv_buffer_bytes))?,
    );
    let gpadl = device.create_gpadl(recv.clone()).await?;
    let msg = NvspMessage::SendReceiveBuffer(SendReceiveBuffer {
        gpadl_handle: gpadl.into(),
        id: NETVSC_RECEIVE_BUFFER_ID.into(),
    });
    let reply = nic.nvsp_request(&msg, true).await?;
    let limit = match NvspMessage::parse(&reply, Sender::Host) {
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
                || end > recv.len() as u64
                || start.saturating_add(size * count) > end
            {
                return Err(NetvscError::BadReply(
                    "receive buffer section outside the buffer",
                ));
            }
            end as usize
        }
        _ => return Err(NetvscError::BadReply("SEND_RECV_BUF_COMPLETE")),
    };
    *nic.recv.borrow_mut() = Some(RecvBuffer { buf: recv, limit });

    let send: Rc<dyn SharedBuffer> = Rc::from(
        bus.allocator()
            .alloc(pages_for(nic.config.send_buffer_bytes))?,
    );
    let gpadl = device.create_gpadl(send.clone()).await?;
    let msg = NvspMessage::SendSendBuffer(SendSendBuffer {
        gpadl_handle: gpadl.into(),
        id: NETVSC_SEND_BUFFER_ID.into(),
    });
    let reply = nic.nvsp_request(&msg, true).await?;
    let section_size = match NvspMessage::parse(&reply, Sender::Host) {
        Ok(NvspMessage::SendSendBufferComplete(m)) => {
            if m.status.get() != NvspStatus::SUCCESS.0 {
                return Err(NetvscError::Refused(m.status.get()));
            }
            let size = m.section_size.get() as usize;
            // A section must hold at least a full frame with its RNDIS header.
            if !(2048..=send.len()).contains(&size) {
                return Err(NetvscError::BadReply("send section size"));
            }
            size
        }
        _ => return Err(NetvscError::BadReply("SEND_SEND_BUF_COMPLETE")),
    };
    let count = send.len() / section_size;
    *nic.send.borrow_mut() = Some(SendBuffer {
        buf: send,
        section_size,
        sections: Sections::new(count),
    });
    Ok(())
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
    let reply = nic.rndis_request(&msg, req_id).await?;
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
    let reply = nic.rndis_request(&msg, req_id).await?;
    match RndisMessage::parse(&reply) {
        Ok(RndisMessage::SetComplete(c)) if c.status.get() == RndisStatus::SUCCESS.0 => Ok(()),
        Ok(RndisMessage::SetComplete(c)) => Err(NetvscError::Refused(c.status.get())),
        _ => Err(NetvscError::BadReply("SET_CMPLT")),
    }
}

fn u32_of(info: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(info.get(..4)?.try_into().ok()?))
}

/// RNDIS INITIALIZE, then MAC, MTU and link state.
async fn rndis_init(nic: &NetvscNic) -> Result<(), NetvscError> {
    let req_id = nic.next_id();
    let msg = RndisMessage::InitializeRequest(InitializeRequest {
        req_id: req_id.into(),
        major_ver: RNDIS_MAJOR_VERSION.into(),
        minor_ver: RNDIS_MINOR_VERSION.into(),
        max_xfer_size: RNDIS_LINUX_MAX_XFER_SIZE.into(),
    });
    let reply = nic.rndis_request(&msg, req_id).await?;
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
    // The host's maximum frame size is the IP MTU; keep it within Ethernet limits a
    // send section can carry.
    if let Ok(info) = query(nic, Oid::GEN_MAXIMUM_FRAME_SIZE, &[]).await {
        match u32_of(&info) {
            Some(mtu @ 576..=9000) => nic.mtu.set(mtu as usize),
            other => warn!("netvsc {}: ignoring host MTU {other:?}", nic.id),
        }
    }
    let link = query(nic, Oid::GEN_MEDIA_CONNECT_STATUS, &[]).await?;
    nic.link
        .set(u32_of(&link) == Some(NDIS_MEDIA_STATE_CONNECTED));
    Ok(())
}

/// Multi-queue setup (NVSP >= 5): RSS capabilities, SUBCHANNEL, the wait for the
/// sub-channel worker, RSS parameters.
async fn setup_queues(
    device: &Device,
    nic: &Rc<NetvscNic>,
    sizes: RingSizes,
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
    let weak: Weak<NetvscNic> = Rc::downgrade(nic);
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
    if granted > 0 {
        let wait = nic
            .handle
            .timeout(nic.subchannel_timeout(), opened.acquire(granted));
        let waited = device
            .channel()
            .or_rescind(async { Ok(wait.await.is_ok()) })
            .await?;
        if !waited {
            warn!(
                "netvsc {}: only {} of {granted} sub-channels opened within {:?}; carrying on with them",
                nic.id,
                nic.queue_count() - 1,
                nic.subchannel_timeout()
            );
        }
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

/// Sub-channel worker: opens sub-channel `sub` and attaches it as a queue.
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

async fn set_packet_filter(nic: &NetvscNic) -> Result<(), NetvscError> {
    let filter =
        NDIS_PACKET_TYPE_DIRECTED | NDIS_PACKET_TYPE_BROADCAST | NDIS_PACKET_TYPE_ALL_MULTICAST;
    set(nic, Oid::GEN_CURRENT_PACKET_FILTER, &filter.to_le_bytes()).await
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
