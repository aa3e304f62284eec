//! A simulated Azure fabric: the LAN's gateway, which also answers for the WireServer
//! and the instance metadata service, as the host does on Azure.
//!
//! On Azure, 168.63.129.16 (WireServer) and 169.254.169.254 (IMDS) are not on the VM's
//! subnet: a guest reaches them through its default gateway, which the host answers for.
//! [`AzureFabric`] does the same on a simulated LAN. It owns the gateway address (it
//! answers ARP and ping for it and nothing else) and takes TCP port 80 for the two
//! service addresses as if they were /32s behind it (smoltcp's any-IP mode with a /32
//! route to each through the gateway address), so a guest with a DHCP lease naming the
//! fabric as router talks to it exactly as it would on Azure.
//!
//! HTTP/1.1 on port 80, one request per connection, answered with
//! `Connection: close`:
//! - WireServer `GET /machine/?comp=goalstate` (needs `x-ms-version`): a goal state in
//!   the shape WALinuxAgent reads (`Incarnation`, `Container/ContainerId`,
//!   `RoleInstanceList/RoleInstance/InstanceId`, plus the usual neighbours), with the
//!   configured incarnation, container and instance.
//! - WireServer `POST /machine?comp=health` (needs `x-ms-version`): the `Health` XML is
//!   read and recorded as a [`HealthReport`] (state, incarnation, container, instance);
//!   the answer is 200, or 400 for a document it cannot read (and, with
//!   [`AzureFabricConfig::strict_incarnation`], for a report of an incarnation that is
//!   not the current one).
//! - IMDS `GET /metadata/instance?api-version=...`: 400 without `Metadata: true`,
//!   otherwise an `instance` document (compute and `network.interface[]`), sent with
//!   chunked transfer coding so clients meet both framings.
//! - anything else: 404.
//!
//! [`FabricFaults`] makes it misbehave on purpose, deterministically: 500 for the first
//! N requests of a path, black-holed connections (every frame of the first N
//! connections dropped, so the client times out), malformed responses (garbage bodies,
//! truncated bodies, absurd `Content-Length`, broken chunking, oversized bodies, a
//! non-HTTP status line) and an incarnation that changes after a goal state was served.
//! Counters, the list of reports and every request are kept for tests.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use smoltcp::iface::Route;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    HardwareAddress, IpAddress, IpCidr, IpProtocol, Ipv4Packet, TcpPacket,
};

use super::device::QueueDevice;
use super::flows::tcp_socket;
use super::stack::{run_until_idle, StackPeer};
use super::Endpoint;

/// The WireServer's address.
pub const WIRESERVER_IP: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
/// The instance metadata service's address.
pub const IMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The protocol version the WireServer wants in `x-ms-version`.
pub const WIRESERVER_VERSION: &str = "2012-11-30";
/// Listening sockets on port 80 (connections served at once).
const LISTENERS: usize = 8;
/// Socket buffers each way.
const BUFFER: usize = 64 * 1024;
/// Largest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;
/// A connection that has not sent its request by then is aborted.
const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// Requests remembered in [`AzureFabric::requests`].
const REQUEST_LOG: usize = 1024;

/// One network interface in the IMDS document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImdsNic {
    /// Its MAC (IMDS writes it as twelve upper-case hex digits).
    pub mac: [u8; 6],
    /// Its private IPv4 addresses.
    pub private_ipv4: Vec<Ipv4Addr>,
}

/// Addressing and content of an [`AzureFabric`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureFabricConfig {
    /// Ethernet address.
    pub mac: [u8; 6],
    /// The gateway address (the router the LAN's DHCP server hands out).
    pub gateway: Ipv4Addr,
    /// Prefix length of the LAN.
    pub prefix_len: u8,
    /// The WireServer address served ([`WIRESERVER_IP`]).
    pub wireserver: Ipv4Addr,
    /// The IMDS address served ([`IMDS_IP`]).
    pub imds: Ipv4Addr,
    /// Goal state incarnation.
    pub incarnation: u64,
    /// Goal state container id.
    pub container_id: String,
    /// Goal state role instance id.
    pub instance_id: String,
    /// IMDS `compute.name`.
    pub vm_name: String,
    /// IMDS `compute.vmSize`.
    pub vm_size: String,
    /// IMDS `compute.location`.
    pub location: String,
    /// IMDS `network.interface[]`.
    pub interfaces: Vec<ImdsNic>,
    /// Refuse (400) a health report whose incarnation is not the current one.
    pub strict_incarnation: bool,
}

impl AzureFabricConfig {
    /// A fabric at `gateway`/`prefix_len` with `mac`, the usual service addresses and
    /// made-up but well-formed identities.
    pub fn new(mac: [u8; 6], gateway: Ipv4Addr, prefix_len: u8) -> Self {
        AzureFabricConfig {
            mac,
            gateway,
            prefix_len,
            wireserver: WIRESERVER_IP,
            imds: IMDS_IP,
            incarnation: 1,
            container_id: "5f0e3c2a-8d41-4b7e-9a16-0c3b2d4e6f81".into(),
            instance_id: "9b2d7e4c-1a3f-4c58-b6e0-7d8f9a0b1c2d._hvnet-vm".into(),
            vm_name: "hvnet-vm".into(),
            vm_size: "Standard_D2s_v5".into(),
            location: "westeurope".into(),
            interfaces: Vec::new(),
            strict_incarnation: false,
        }
    }
}

/// A way to spoil a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformation {
    /// 200 with a body of garbage (neither XML nor JSON).
    GarbageBody,
    /// 200 whose `Content-Length` promises more than is sent before the close.
    TruncatedBody,
    /// 200 with `Content-Length: 1099511627776`.
    HugeContentLength,
    /// 200 with `Transfer-Encoding: chunked` and a chunk size that is not hex.
    BadChunked,
    /// 200 with a 100 KiB body (framed by `Content-Length`).
    OversizedBody,
    /// 200 with a 100 KiB body in 8 KiB chunks.
    OversizedChunked,
    /// Not HTTP at all.
    GarbageStatusLine,
}

/// The services, for faults and counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FabricPath {
    /// `GET /machine/?comp=goalstate`.
    GoalState,
    /// `POST /machine?comp=health`.
    Health,
    /// `GET /metadata/instance`.
    Imds,
}

/// Deliberate misbehaviour; every count is consumed as it is used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FabricFaults {
    /// Answer the next N goal state requests with 500.
    pub fail_goal_state: u32,
    /// Answer the next N health reports with 500 (they are not recorded).
    pub fail_health: u32,
    /// Answer the next N IMDS requests with 500.
    pub fail_imds: u32,
    /// Drop every frame of the next N TCP connections to port 80 (from their SYN on).
    pub ignore_connections: u32,
    /// Spoil the next goal state responses, one entry each.
    pub malformed_goal_state: VecDeque<Malformation>,
    /// Spoil the next health report responses (after recording the report).
    pub malformed_health: VecDeque<Malformation>,
    /// Spoil the next IMDS responses.
    pub malformed_imds: VecDeque<Malformation>,
    /// After the next goal state is served, the incarnation becomes this.
    pub incarnation_after_goal_state: Option<u64>,
}

/// A health report the fabric received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// When (simulated milliseconds).
    pub at_ms: u64,
    /// `Health/.../Health/State` (`Ready`, `NotReady`).
    pub state: String,
    /// `GoalStateIncarnation`, if it is a number.
    pub incarnation: Option<u64>,
    /// `ContainerId`, unescaped.
    pub container_id: String,
    /// `InstanceId`, unescaped.
    pub instance_id: String,
    /// `x-ms-agent-name`.
    pub agent_name: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// Whether the fabric took it (200).
    pub accepted: bool,
}

impl HealthReport {
    /// A taken report of state `Ready`.
    pub fn is_ready(&self) -> bool {
        self.accepted && self.state == "Ready"
    }
}

/// One request the fabric answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// When (simulated milliseconds).
    pub at_ms: u64,
    /// The address it was sent to.
    pub to: Ipv4Addr,
    /// Method.
    pub method: String,
    /// Request target (path and query).
    pub target: String,
    /// Status answered (0: a spoiled response with no usable status).
    pub status: u16,
}

/// What the fabric has seen and done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FabricCounters {
    /// TCP connections accepted on port 80.
    pub connections: u64,
    /// Connections black-holed by [`FabricFaults::ignore_connections`].
    pub ignored_connections: u64,
    /// Frames dropped for them.
    pub ignored_frames: u64,
    /// Requests read (complete heads).
    pub requests: u64,
    /// Goal state requests.
    pub goal_state: u64,
    /// Health reports (all, including refused ones).
    pub health: u64,
    /// IMDS requests.
    pub imds: u64,
    /// 404 answers.
    pub not_found: u64,
    /// 400 answers and unreadable requests.
    pub bad_requests: u64,
    /// 500 answers from the fault settings.
    pub injected_failures: u64,
    /// Spoiled responses sent.
    pub malformed: u64,
    /// Connections aborted because the request never came.
    pub timeouts: u64,
}

enum Phase {
    Listening,
    Reading { since_ms: u64, raw: Vec<u8> },
    Writing { out: Vec<u8>, sent: usize },
    Closing,
}

struct Listener {
    handle: SocketHandle,
    phase: Phase,
}

/// A parsed request.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn path_and_query(&self) -> (&str, &str) {
        self.target.split_once('?').unwrap_or((&self.target, ""))
    }
}

/// What the bytes of a connection amount to so far.
enum Parsed {
    Incomplete,
    Complete(Request),
    Bad(&'static str),
}

fn parse_request(raw: &[u8]) -> Parsed {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if raw.len() > MAX_HEAD {
            Parsed::Bad("head too large")
        } else {
            Parsed::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&raw[..end]) else {
        return Parsed::Bad("head not text");
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Parsed::Bad("bad request line");
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') || method.is_empty() {
        return Parsed::Bad("bad request line");
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Bad("header without colon");
        };
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut request = Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return Parsed::Bad("chunked requests are not taken");
    }
    let length = match request.header("content-length") {
        None => 0,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n <= MAX_BODY => n,
            _ => return Parsed::Bad("bad Content-Length"),
        },
    };
    let body = &raw[end + 4..];
    if body.len() < length {
        return Parsed::Incomplete;
    }
    request.body = body[..length].to_vec();
    Parsed::Complete(request)
}

fn response(status: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Server: hvemu-azure-fabric\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn chunked_response(
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    chunk: usize,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\
         Server: hvemu-azure-fabric\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn text_response(status: u16, reason: &str) -> Vec<u8> {
    response(
        status,
        reason,
        "text/plain",
        format!("{reason}\n").as_bytes(),
    )
}

/// The bytes of a spoiled 200 response.
fn spoiled(kind: Malformation, content_type: &str, good: &[u8]) -> Vec<u8> {
    match kind {
        Malformation::GarbageBody => response(
            200,
            "OK",
            content_type,
            b"\x00\x01<<Goal State>>&&; {\"not\": json or xml\xff",
        ),
        Malformation::TruncatedBody => {
            let mut out = response(200, "OK", content_type, good);
            out.truncate(out.len() - good.len() / 2 - 1);
            out
        }
        Malformation::HugeContentLength => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: 1099511627776\r\n\
             Connection: close\r\n\r\n<GoalState>"
        )
        .into_bytes(),
        Malformation::BadChunked => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\nzz;\r\n<GoalState>\r\n0\r\n\r\n"
        )
        .into_bytes(),
        Malformation::OversizedBody => response(200, "OK", content_type, &vec![b'x'; 100 * 1024]),
        Malformation::OversizedChunked => {
            chunked_response(200, "OK", content_type, &vec![b'y'; 100 * 1024], 8 * 1024)
        }
        Malformation::GarbageStatusLine => b"SSH-2.0-OpenSSH_9.6\r\n\r\nnot http".to_vec(),
    }
}

/// Appends `text` with XML's five special characters escaped.
fn escape_xml(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
}

/// Decodes the predefined entities and character references; `None` for anything else.
fn unescape_xml(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let semi = after.find(';')?;
        let entity = &after[..semi];
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = match entity.strip_prefix("#x") {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => entity.strip_prefix('#')?.parse().ok()?,
                };
                char::from_u32(code)?
            }
        };
        out.push(c);
        rest = &after[semi + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The unescaped text of the first `<tag>...</tag>` after `from` in `xml`, and where it
/// ends.
fn element_text(xml: &str, from: usize, tag: &str) -> Option<(String, usize)> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.get(from..)?.find(&open)? + from + open.len();
    let end = xml[start..].find(&close)? + start;
    Some((unescape_xml(&xml[start..end])?, end + close.len()))
}

fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The simulated fabric. See the [module docs](self).
pub struct AzureFabric {
    config: AzureFabricConfig,
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    listeners: Vec<Listener>,
    faults: FabricFaults,
    counters: FabricCounters,
    reports: Vec<HealthReport>,
    requests: VecDeque<RequestRecord>,
    /// Black-holed connections: (client address, client port).
    ignored: BTreeSet<(Ipv4Addr, u16)>,
    now_ms: u64,
    next_poll: Option<u64>,
}

impl AzureFabric {
    /// A fabric with `config`, listening.
    pub fn new(config: AzureFabricConfig) -> Self {
        let mut device = QueueDevice::new();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(config.mac)));
        let mut seed = [0u8; 8];
        seed[..6].copy_from_slice(&config.mac);
        iface_config.random_seed = u64::from_le_bytes(seed) ^ 0x00a2_09e0_fab1;
        let mut iface = Interface::new(iface_config, &mut device, Instant::from_millis(0));
        let gateway = IpAddress::Ipv4(config.gateway);
        iface.update_ip_addrs(|addrs| {
            if addrs.push(IpCidr::new(gateway, config.prefix_len)).is_err() {
                log::error!("azure fabric: no room for the gateway address");
            }
        });
        // The service addresses are /32s "behind" the gateway address: with any-IP on,
        // smoltcp takes packets for them (and ARP is filtered in `receive`).
        iface.set_any_ip(true);
        iface.routes_mut().update(|routes| {
            for service in [config.wireserver, config.imds] {
                let route = Route {
                    cidr: IpCidr::new(IpAddress::Ipv4(service), 32),
                    via_router: gateway,
                    preferred_until: None,
                    expires_at: None,
                };
                if routes.push(route).is_err() {
                    log::error!("azure fabric: route table full");
                }
            }
        });
        let mut sockets = SocketSet::new(Vec::new());
        let listeners = (0..LISTENERS)
            .map(|_| {
                let mut socket = tcp_socket(BUFFER);
                // A fresh socket on a valid port always listens.
                let _ = socket.listen(80);
                Listener {
                    handle: sockets.add(socket),
                    phase: Phase::Listening,
                }
            })
            .collect();
        AzureFabric {
            config,
            iface,
            device,
            sockets,
            listeners,
            faults: FabricFaults::default(),
            counters: FabricCounters::default(),
            reports: Vec::new(),
            requests: VecDeque::new(),
            ignored: BTreeSet::new(),
            now_ms: 0,
            next_poll: None,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &AzureFabricConfig {
        &self.config
    }

    /// The faults still to happen (change them at any time).
    pub fn faults_mut(&mut self) -> &mut FabricFaults {
        &mut self.faults
    }

    /// The faults still to happen.
    pub fn faults(&self) -> &FabricFaults {
        &self.faults
    }

    /// Sets the goal state incarnation from now on.
    pub fn set_incarnation(&mut self, incarnation: u64) {
        self.config.incarnation = incarnation;
    }

    /// Sets the IMDS interface list.
    pub fn set_imds_interfaces(&mut self, interfaces: Vec<ImdsNic>) {
        self.config.interfaces = interfaces;
    }

    /// Counters so far.
    pub fn counters(&self) -> FabricCounters {
        self.counters
    }

    /// Every health report received, in order.
    pub fn reports(&self) -> &[HealthReport] {
        &self.reports
    }

    /// Taken reports of state `Ready`.
    pub fn ready_reports(&self) -> usize {
        self.reports.iter().filter(|r| r.is_ready()).count()
    }

    /// The last [`REQUEST_LOG`] requests answered, oldest first.
    pub fn requests(&self) -> impl Iterator<Item = &RequestRecord> {
        self.requests.iter()
    }

    /// The goal state document as served now.
    pub fn goal_state_xml(&self) -> String {
        let c = &self.config;
        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<GoalState xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xsi:noNamespaceSchemaLocation=\"goalstate10.xsd\">\n  <Version>2015-04-05</Version>\n",
        );
        let _ = write!(
            xml,
            "  <Incarnation>{}</Incarnation>\n  <Machine>\n    <ExpectedState>Started</ExpectedState>\n    \
             <StopRolesDeadlineHint>300000</StopRolesDeadlineHint>\n    <LBProbePorts>\n      \
             <Port>16001</Port>\n    </LBProbePorts>\n    <ExpectHealthReport>FALSE</ExpectHealthReport>\n  \
             </Machine>\n  <Container>\n    <ContainerId>",
            c.incarnation
        );
        escape_xml(&mut xml, &c.container_id);
        xml.push_str(
            "</ContainerId>\n    <RoleInstanceList>\n      <RoleInstance>\n        <InstanceId>",
        );
        escape_xml(&mut xml, &c.instance_id);
        xml.push_str("</InstanceId>\n        <State>Started</State>\n        <Configuration>\n          <HostingEnvironmentConfig>");
        let mut url = String::new();
        let _ = write!(
            url,
            "http://{}:80/machine/{}?comp=config&type=hostingEnvironmentConfig&incarnation={}",
            c.wireserver, c.container_id, c.incarnation
        );
        escape_xml(&mut xml, &url);
        xml.push_str("</HostingEnvironmentConfig>\n          <ConfigName>");
        escape_xml(
            &mut xml,
            &format!("{}.{}.xml", c.instance_id, c.incarnation),
        );
        xml.push_str(
            "</ConfigName>\n        </Configuration>\n      </RoleInstance>\n    </RoleInstanceList>\n  </Container>\n</GoalState>\n",
        );
        xml
    }

    /// The IMDS `instance` document as served now.
    pub fn imds_json(&self) -> String {
        let c = &self.config;
        let mut json =
            String::from("{\"compute\":{\"azEnvironment\":\"AzurePublicCloud\",\"location\":");
        json_string(&mut json, &c.location);
        json.push_str(",\"name\":");
        json_string(&mut json, &c.vm_name);
        json.push_str(",\"osProfile\":{\"adminUsername\":\"azureuser\",\"computerName\":");
        json_string(&mut json, &c.vm_name);
        json.push_str("},\"osType\":\"Linux\",\"platformFaultDomain\":\"0\",\"publicKeys\":[],\"tagsList\":[],\"vmId\":");
        json_string(&mut json, &c.container_id);
        json.push_str(",\"vmSize\":");
        json_string(&mut json, &c.vm_size);
        json.push_str(",\"zone\":\"\"},\"network\":{\"interface\":[");
        for (i, nic) in c.interfaces.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str("{\"ipv4\":{\"ipAddress\":[");
            for (j, ip) in nic.private_ipv4.iter().enumerate() {
                if j > 0 {
                    json.push(',');
                }
                let _ = write!(
                    json,
                    "{{\"privateIpAddress\":\"{ip}\",\"publicIpAddress\":\"\"}}"
                );
            }
            let m = nic.mac;
            let _ = write!(
                json,
                "],\"subnet\":[]}},\"ipv6\":{{\"ipAddress\":[]}},\"macAddress\":\"{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}\"}}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            );
        }
        json.push_str("]}}");
        json
    }

    /// The answer to one complete request sent to `to`.
    fn answer(&mut self, to: Ipv4Addr, request: &Request) -> Vec<u8> {
        self.counters.requests += 1;
        let (path, query) = request.path_and_query();
        let params: Vec<&str> = query.split('&').collect();
        let kind = if to == self.config.wireserver {
            match (request.method.as_str(), path) {
                ("GET", "/machine/" | "/machine") if params.contains(&"comp=goalstate") => {
                    Some(FabricPath::GoalState)
                }
                ("POST", "/machine/" | "/machine") if params.contains(&"comp=health") => {
                    Some(FabricPath::Health)
                }
                _ => None,
            }
        } else if to == self.config.imds {
            (request.method == "GET" && path == "/metadata/instance").then_some(FabricPath::Imds)
        } else {
            None
        };
        let Some(kind) = kind else {
            self.counters.not_found += 1;
            return text_response(404, "Not Found");
        };
        match kind {
            FabricPath::GoalState => self.counters.goal_state += 1,
            FabricPath::Health => self.counters.health += 1,
            FabricPath::Imds => self.counters.imds += 1,
        }
        // What the real services refuse is refused before any fault applies.
        let valid = match kind {
            FabricPath::GoalState | FabricPath::Health => {
                request.header("x-ms-version") == Some(WIRESERVER_VERSION)
            }
            FabricPath::Imds => {
                request
                    .header("metadata")
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"))
                    && params.iter().any(|p| p.starts_with("api-version="))
            }
        };
        if !valid {
            self.counters.bad_requests += 1;
            return match kind {
                FabricPath::Imds => response(
                    400,
                    "Bad Request",
                    "application/json; charset=utf-8",
                    b"{\"error\":\"Bad request. Required metadata header not specified\"}",
                ),
                _ => text_response(400, "Bad Request"),
            };
        }
        let faults = &mut self.faults;
        let (fail, malformed) = match kind {
            FabricPath::GoalState => (
                &mut faults.fail_goal_state,
                &mut faults.malformed_goal_state,
            ),
            FabricPath::Health => (&mut faults.fail_health, &mut faults.malformed_health),
            FabricPath::Imds => (&mut faults.fail_imds, &mut faults.malformed_imds),
        };
        if *fail > 0 {
            *fail -= 1;
            self.counters.injected_failures += 1;
            return text_response(500, "Internal Server Error");
        }
        let spoil = malformed.pop_front();
        match kind {
            FabricPath::GoalState => {
                let body = self.goal_state_xml();
                if spoil.is_none() {
                    if let Some(next) = self.faults.incarnation_after_goal_state.take() {
                        self.config.incarnation = next;
                    }
                }
                self.finish(spoil, "text/xml; charset=utf-8", body.as_bytes(), false)
            }
            FabricPath::Health => {
                let status = self.take_report(request);
                if status != 200 {
                    return text_response(status, "Bad Request");
                }
                self.finish(spoil, "text/plain", b"", false)
            }
            FabricPath::Imds => {
                let body = self.imds_json();
                self.finish(
                    spoil,
                    "application/json; charset=utf-8",
                    body.as_bytes(),
                    true,
                )
            }
        }
    }

    fn finish(
        &mut self,
        spoil: Option<Malformation>,
        content_type: &str,
        body: &[u8],
        chunked: bool,
    ) -> Vec<u8> {
        match spoil {
            Some(kind) => {
                self.counters.malformed += 1;
                spoiled(kind, content_type, body)
            }
            None if chunked => chunked_response(200, "OK", content_type, body, 700),
            None => response(200, "OK", content_type, body),
        }
    }

    /// Reads and records a health report; returns the status to answer.
    fn take_report(&mut self, request: &Request) -> u16 {
        let Ok(xml) = std::str::from_utf8(&request.body) else {
            self.counters.bad_requests += 1;
            return 400;
        };
        let read = || {
            let (incarnation, _) = element_text(xml, 0, "GoalStateIncarnation")?;
            let (container_id, after) = element_text(xml, 0, "ContainerId")?;
            let (instance_id, after) = element_text(xml, after, "InstanceId")?;
            let (state, _) = element_text(xml, after, "State")?;
            Some((incarnation, container_id, instance_id, state))
        };
        let Some((incarnation, container_id, instance_id, state)) = read() else {
            self.counters.bad_requests += 1;
            return 400;
        };
        let incarnation = incarnation.trim().parse::<u64>().ok();
        let accepted = incarnation.is_some()
            && (!self.config.strict_incarnation || incarnation == Some(self.config.incarnation));
        self.reports.push(HealthReport {
            at_ms: self.now_ms,
            state,
            incarnation,
            container_id,
            instance_id,
            agent_name: request.header("x-ms-agent-name").map(str::to_string),
            content_type: request.header("content-type").map(str::to_string),
            accepted,
        });
        if accepted {
            200
        } else {
            self.counters.bad_requests += 1;
            400
        }
    }

    fn log_request(&mut self, to: Ipv4Addr, request: &Request, out: &[u8]) {
        let status = out
            .get(9..12)
            .and_then(|code| std::str::from_utf8(code).ok())
            .and_then(|code| code.parse().ok())
            .filter(|_| out.starts_with(b"HTTP/1.1 "))
            .unwrap_or(0);
        if self.requests.len() >= REQUEST_LOG {
            self.requests.pop_front();
        }
        self.requests.push_back(RequestRecord {
            at_ms: self.now_ms,
            to,
            method: request.method.clone(),
            target: request.target.clone(),
            status,
        });
    }

    /// Runs the HTTP listeners once; true if anything moved.
    fn serve_listeners(&mut self) -> bool {
        let mut progress = false;
        for index in 0..self.listeners.len() {
            progress |= self.serve_one(index);
        }
        progress
    }

    fn serve_one(&mut self, index: usize) -> bool {
        let now_ms = self.now_ms;
        let handle = self.listeners[index].handle;
        let mut phase = std::mem::replace(&mut self.listeners[index].phase, Phase::Listening);
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        let state = socket.state();
        if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
            // TIME-WAIT would hold the listener for smoltcp's 10 s; the client has
            // closed by then, so start over at once.
            socket.abort();
            let _ = socket.listen(80);
            return !matches!(state, tcp::State::Closed);
        }
        if matches!(state, tcp::State::Listen | tcp::State::SynReceived) {
            self.listeners[index].phase = phase;
            return false;
        }
        let to = match socket.local_endpoint().map(|e| e.addr) {
            Some(IpAddress::Ipv4(addr)) => addr,
            _ => self.config.gateway,
        };
        let mut progress = false;
        if let Phase::Listening = phase {
            self.counters.connections += 1;
            phase = Phase::Reading {
                since_ms: now_ms,
                raw: Vec::new(),
            };
            progress = true;
        }
        if let Phase::Reading { since_ms, raw } = &mut phase {
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            let mut buf = [0u8; 4096];
            while socket.can_recv() {
                match socket.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        raw.extend_from_slice(&buf[..n]);
                        progress = true;
                    }
                }
            }
            let closed = !socket.may_recv();
            let timed_out = now_ms >= *since_ms + REQUEST_TIMEOUT_MS;
            let out = match parse_request(raw) {
                Parsed::Complete(request) => {
                    let out = self.answer(to, &request);
                    self.log_request(to, &request, &out);
                    Some(out)
                }
                Parsed::Bad(why) => {
                    log::debug!("azure fabric: bad request: {why}");
                    self.counters.bad_requests += 1;
                    Some(text_response(400, "Bad Request"))
                }
                Parsed::Incomplete if closed || timed_out => {
                    self.counters.timeouts += u64::from(timed_out);
                    self.sockets.get_mut::<tcp::Socket>(handle).abort();
                    return true;
                }
                Parsed::Incomplete => None,
            };
            if let Some(out) = out {
                phase = Phase::Writing { out, sent: 0 };
                progress = true;
            }
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        if let Phase::Writing { out, sent } = &mut phase {
            while *sent < out.len() && socket.can_send() {
                match socket.send_slice(&out[*sent..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        *sent += n;
                        progress = true;
                    }
                }
            }
            if *sent >= out.len() {
                socket.close();
                phase = Phase::Closing;
                progress = true;
            }
        }
        if let Phase::Closing = phase {
            // Whatever else the client sends is read and dropped.
            while socket.can_recv() {
                match socket.recv(|data| (data.len(), data.len())) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        self.listeners[index].phase = phase;
        progress
    }

    /// Whether `frame` belongs to a black-holed connection (and, for the SYN of a new
    /// connection, whether it should become one).
    fn ignore(&mut self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return false;
        }
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return false;
        };
        if ip.next_header() != IpProtocol::Tcp {
            return false;
        }
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            return false;
        };
        let dst = ip.dst_addr();
        if tcp.dst_port() != 80 || (dst != self.config.wireserver && dst != self.config.imds) {
            return false;
        }
        let key = (ip.src_addr(), tcp.src_port());
        if self.ignored.contains(&key) {
            self.counters.ignored_frames += 1;
            return true;
        }
        if tcp.syn() && !tcp.ack() && self.faults.ignore_connections > 0 {
            self.faults.ignore_connections -= 1;
            self.counters.ignored_connections += 1;
            self.counters.ignored_frames += 1;
            self.ignored.insert(key);
            return true;
        }
        false
    }

    /// Any-IP would have smoltcp answer ARP for every address; only the gateway's is
    /// the fabric's.
    fn foreign_arp(&self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        if eth.ethertype() != EthernetProtocol::Arp {
            return false;
        }
        let Ok(packet) = ArpPacket::new_checked(eth.payload()) else {
            return true;
        };
        match ArpRepr::parse(&packet) {
            Ok(ArpRepr::EthernetIpv4 {
                operation,
                target_protocol_addr,
                ..
            }) => operation == ArpOperation::Request && target_protocol_addr != self.config.gateway,
            _ => true,
        }
    }
}

impl StackPeer for AzureFabric {
    fn stack(&mut self) -> (&mut Interface, &mut QueueDevice, &mut SocketSet<'static>) {
        (&mut self.iface, &mut self.device, &mut self.sockets)
    }

    fn serve(&mut self) -> bool {
        self.serve_listeners()
    }
}

impl Endpoint for AzureFabric {
    fn mac(&self) -> [u8; 6] {
        self.config.mac
    }

    fn receive(&mut self, now_ms: u64, frame: &[u8]) {
        self.now_ms = self.now_ms.max(now_ms);
        let for_us = frame.len() >= 14 && (frame[..6] == self.config.mac || frame[0] & 1 == 1);
        if !for_us || self.foreign_arp(frame) || self.ignore(frame) {
            return;
        }
        self.device.push_rx(frame);
    }

    fn transmit(&mut self, now_ms: u64, out: &mut dyn FnMut(&[u8])) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = Instant::from_millis(self.now_ms as i64);
        run_until_idle(self, now);
        while let Some(frame) = self.device.pop_tx() {
            out(&frame);
        }
        let stack = self
            .iface
            .poll_at(now, &self.sockets)
            .map(|t| t.total_millis().max(0) as u64);
        // Connections waiting for their request time out on the fabric's own clock.
        let request_deadline = self
            .listeners
            .iter()
            .filter_map(|l| match l.phase {
                Phase::Reading { since_ms, .. } => Some(since_ms + REQUEST_TIMEOUT_MS),
                _ => None,
            })
            .min();
        self.next_poll = match (stack, request_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn poll_at(&self, now_ms: u64) -> Option<u64> {
        if self.device.rx_pending() > 0 {
            Some(now_ms)
        } else {
            self.next_poll
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::{shared, Hub, Shared};

    const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 42);
    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);

    /// A smoltcp host that sends raw requests through its default gateway, one
    /// connection each, and keeps whatever comes back.
    struct Client {
        iface: Interface,
        device: QueueDevice,
        sockets: SocketSet<'static>,
        flows: Vec<(SocketHandle, Vec<u8>, usize, Vec<u8>)>,
        next_port: u16,
        next_poll: Option<u64>,
    }

    impl Client {
        fn new() -> Self {
            let mut device = QueueDevice::new();
            let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(CLIENT_MAC)));
            let mut iface = Interface::new(config, &mut device, Instant::from_millis(0));
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(CLIENT_IP), 24));
            });
            let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
            Client {
                iface,
                device,
                sockets: SocketSet::new(Vec::new()),
                flows: Vec::new(),
                next_port: 40000,
                next_poll: Some(0),
            }
        }

        fn send(&mut self, to: Ipv4Addr, request: &[u8]) -> usize {
            let mut socket = tcp_socket(BUFFER);
            self.next_port += 1;
            socket
                .connect(
                    self.iface.context(),
                    (IpAddress::Ipv4(to), 80),
                    self.next_port,
                )
                .unwrap();
            let handle = self.sockets.add(socket);
            self.flows.push((handle, request.to_vec(), 0, Vec::new()));
            self.next_poll = Some(0);
            self.flows.len() - 1
        }

        fn done(&self, flow: usize) -> bool {
            let socket = self.sockets.get::<tcp::Socket>(self.flows[flow].0);
            !socket.may_recv() && socket.state() != tcp::State::SynSent
        }

        fn response(&self, flow: usize) -> String {
            String::from_utf8_lossy(&self.flows[flow].3).into_owned()
        }
    }

    impl Endpoint for Client {
        fn mac(&self) -> [u8; 6] {
            CLIENT_MAC
        }

        fn receive(&mut self, _now_ms: u64, frame: &[u8]) {
            if frame.len() >= 14 && (frame[..6] == CLIENT_MAC || frame[0] & 1 == 1) {
                self.device.push_rx(frame);
            }
        }

        fn transmit(&mut self, now_ms: u64, out: &mut dyn FnMut(&[u8])) {
            let now = Instant::from_millis(now_ms as i64);
            for _ in 0..16 {
                self.iface.poll(now, &mut self.device, &mut self.sockets);
                for (handle, request, sent, got) in &mut self.flows {
                    let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
                    if *sent < request.len() && socket.can_send() {
                        *sent += socket.send_slice(&request[*sent..]).unwrap_or(0);
                    }
                    while socket.can_recv() {
                        let _ = socket.recv(|d| {
                            got.extend_from_slice(d);
                            (d.len(), ())
                        });
                    }
                    if socket.state() == tcp::State::CloseWait {
                        socket.close();
                    }
                }
            }
            while let Some(frame) = self.device.pop_tx() {
                out(&frame);
            }
            self.next_poll = self
                .iface
                .poll_at(now, &self.sockets)
                .map(|t| t.total_millis().max(0) as u64);
        }

        fn poll_at(&self, now_ms: u64) -> Option<u64> {
            if self.device.rx_pending() > 0 {
                Some(now_ms)
            } else {
                self.next_poll
            }
        }
    }

    fn world() -> (Hub, Shared<AzureFabric>, Shared<Client>) {
        let mut config = AzureFabricConfig::new([0x02, 0, 0, 0, 0, 1], GATEWAY, 24);
        config.container_id = "c&<1>".into();
        config.interfaces = vec![ImdsNic {
            mac: CLIENT_MAC,
            private_ipv4: vec![CLIENT_IP],
        }];
        let fabric = shared(AzureFabric::new(config));
        let client = shared(Client::new());
        let mut hub = Hub::new();
        hub.attach(fabric.clone());
        hub.attach(client.clone());
        (hub, fabric, client)
    }

    fn exchange(hub: &mut Hub, client: &Shared<Client>, to: Ipv4Addr, request: &str) -> String {
        let flow = client.borrow_mut().send(to, request.as_bytes());
        assert!(
            hub.run_within(60_000, || client.borrow().done(flow)),
            "no answer to {request:?}"
        );
        client.borrow().response(flow)
    }

    const GOAL: &str =
        "GET /machine/?comp=goalstate HTTP/1.1\r\nHost: x\r\nx-ms-version: 2012-11-30\r\n\r\n";

    #[test]
    fn serves_goal_state_health_and_imds_through_the_gateway() {
        let (mut hub, fabric, client) = world();
        let goal = exchange(&mut hub, &client, WIRESERVER_IP, GOAL);
        assert!(goal.starts_with("HTTP/1.1 200 OK\r\n"), "{goal}");
        assert!(goal.contains("<Incarnation>1</Incarnation>"));
        assert!(goal.contains("<ContainerId>c&amp;&lt;1&gt;</ContainerId>"));
        let body = "<Health><GoalStateIncarnation>1</GoalStateIncarnation><Container><ContainerId>c&amp;&lt;1&gt;</ContainerId><RoleInstanceList><Role><InstanceId>i</InstanceId><Health><State>Ready</State></Health></Role></RoleInstanceList></Container></Health>";
        let post = format!(
            "POST /machine?comp=health HTTP/1.1\r\nx-ms-version: 2012-11-30\r\nx-ms-agent-name: t\r\nContent-Type: text/xml;charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange(&mut hub, &client, WIRESERVER_IP, &post);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let report = fabric.borrow().reports()[0].clone();
        assert_eq!(
            (
                report.incarnation,
                report.container_id.as_str(),
                report.instance_id.as_str()
            ),
            (Some(1), "c&<1>", "i")
        );
        assert!(report.is_ready());
        assert_eq!(report.agent_name.as_deref(), Some("t"));
        let no_header = exchange(
            &mut hub,
            &client,
            IMDS_IP,
            "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\n\r\n",
        );
        assert!(no_header.starts_with("HTTP/1.1 400 "), "{no_header}");
        let imds = exchange(
            &mut hub,
            &client,
            IMDS_IP,
            "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nMetadata: true\r\n\r\n",
        );
        assert!(imds.contains("Transfer-Encoding: chunked"), "{imds}");
        assert!(imds.contains("\"macAddress\":\"020000000042\""), "{imds}");
        assert!(
            imds.contains("\"privateIpAddress\":\"10.1.0.42\""),
            "{imds}"
        );
        let missing = exchange(
            &mut hub,
            &client,
            WIRESERVER_IP,
            "GET /nope HTTP/1.1\r\n\r\n",
        );
        assert!(missing.starts_with("HTTP/1.1 404 "));
        let unversioned = exchange(
            &mut hub,
            &client,
            WIRESERVER_IP,
            "GET /machine/?comp=goalstate HTTP/1.1\r\n\r\n",
        );
        assert!(unversioned.starts_with("HTTP/1.1 400 "));
        let c = fabric.borrow().counters();
        assert_eq!((c.goal_state, c.health, c.imds, c.not_found), (2, 1, 2, 1));
        assert_eq!(fabric.borrow().requests().count(), 6);
    }

    #[test]
    fn faults_fire_in_order() {
        let (mut hub, fabric, client) = world();
        {
            let mut f = fabric.borrow_mut();
            let faults = f.faults_mut();
            faults.fail_goal_state = 1;
            faults.malformed_goal_state =
                [Malformation::TruncatedBody, Malformation::GarbageStatusLine].into();
            faults.incarnation_after_goal_state = Some(9);
            faults.ignore_connections = 1;
        }
        // The first connection is black-holed: no answer in a minute.
        let flow = client.borrow_mut().send(WIRESERVER_IP, GOAL.as_bytes());
        assert!(!hub.run_within(5_000, || client.borrow().done(flow)));
        assert_eq!(fabric.borrow().counters().ignored_connections, 1);
        assert!(exchange(&mut hub, &client, WIRESERVER_IP, GOAL).starts_with("HTTP/1.1 500 "));
        let truncated = exchange(&mut hub, &client, WIRESERVER_IP, GOAL);
        assert!(truncated.starts_with("HTTP/1.1 200 ") && !truncated.contains("</GoalState>"));
        assert!(exchange(&mut hub, &client, WIRESERVER_IP, GOAL).starts_with("SSH-2.0"));
        let good = exchange(&mut hub, &client, WIRESERVER_IP, GOAL);
        assert!(good.contains("<Incarnation>1</Incarnation>"), "{good}");
        let moved = exchange(&mut hub, &client, WIRESERVER_IP, GOAL);
        assert!(moved.contains("<Incarnation>9</Incarnation>"), "{moved}");
        let c = fabric.borrow().counters();
        assert_eq!((c.injected_failures, c.malformed), (1, 2));
    }

    #[test]
    fn arp_is_answered_for_the_gateway_only() {
        let (mut hub, _fabric, client) = world();
        // The client reaches the fabric through its gateway: ARP for it works.
        let flow = client.borrow_mut().send(WIRESERVER_IP, GOAL.as_bytes());
        assert!(hub.run_within(5_000, || client.borrow().done(flow)));
        // An address nobody has stays unanswered (the fabric does not claim it).
        hub.start_capture();
        let other = client.borrow_mut().send(Ipv4Addr::new(10, 1, 0, 77), b"x");
        hub.run_for(2_000);
        let frames = hub.take_capture();
        let replies = frames
            .iter()
            .filter(|(_, port, f)| *port == 0 && f.len() > 13 && f[12..14] == [0x08, 0x06])
            .count();
        assert_eq!(replies, 0, "the fabric answered ARP for 10.1.0.77");
        assert!(!client.borrow().done(other));
    }

    #[test]
    fn report_xml_extraction_is_tolerant_of_garbage() {
        assert_eq!(unescape_xml("a&amp;b&#x41;&#66;"), Some("a&bAB".into()));
        assert_eq!(unescape_xml("&bogus;"), None);
        assert_eq!(
            element_text("<a>1</a><b>2</b>", 0, "b"),
            Some(("2".into(), 16))
        );
        assert_eq!(element_text("<a>1", 0, "a"), None);
        for body in ["", "<Health>", "\u{0}<<", "<ContainerId>&</ContainerId>"] {
            let request = Request {
                method: "POST".into(),
                target: "/machine?comp=health".into(),
                headers: vec![("x-ms-version".into(), WIRESERVER_VERSION.into())],
                body: body.as_bytes().to_vec(),
            };
            let mut fabric =
                AzureFabric::new(AzureFabricConfig::new([2, 0, 0, 0, 0, 1], GATEWAY, 24));
            assert!(fabric
                .answer(WIRESERVER_IP, &request)
                .starts_with(b"HTTP/1.1 400 "));
            assert!(fabric.reports().is_empty());
        }
    }
}
