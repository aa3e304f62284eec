//! The Azure guest agent: tells the WireServer the VM is Ready (so provisioning does not
//! time out) and reads the instance metadata once.
//!
//! # What it does
//! - Ready report, once per boot: fetch the goal state, post a `Health` document with
//!   state `Ready` naming its incarnation, container and instance
//!   ([`wireserver`]). An attempt is the pair; a failed attempt (no connection, a
//!   timeout, a status other than 200/201/202, a response the parsers refuse) is
//!   retried after a backoff that starts at [`AzureConfig::initial_backoff`] and
//!   doubles up to [`AzureConfig::max_backoff`] (1 s to 15 s), with the goal state
//!   fetched again every time since its incarnation may have moved on. After
//!   [`AzureConfig::max_attempts`] (30, as WALinuxAgent) it logs a warning and stops.
//! - IMDS, once per boot, with its own few retries ([`AzureConfig::imds_attempts`]),
//!   whatever becomes of the report ([`imds`]). What it read is logged and shown on the
//!   status page.
//!
//! Every outcome is logged: info for success, warn for giving up, debug for each retry.
//!
//! # How it runs
//! [`AzureAgent`] is a synchronous state machine with no task of its own. The manager
//! creates one and attaches an [`AzureLink`] to every interface; the interface polls its
//! link after smoltcp (time passed in) like its other services, and the agent's TCP
//! socket lives in that interface's socket set. One connection at a time: the next
//! request starts only after the previous connection has closed (or been reset).
//!
//! Only one interface runs the agent at a time, its *owner*. The first interface that
//! polls with a route to the WireServer (a default gateway, or the WireServer in its own
//! subnet) claims it; that is the interface holding the default route when the agent
//! comes up, since it is the one whose lease arrived first. The owner keeps it until it
//! loses its route (lease lost, link down) or goes away (NIC removed or unregistered);
//! then an exchange in flight counts as a failed attempt, and the agent waits for the
//! next interface that has a route: interfaces with a route wait on
//! [`AzureLink::claim_event`], which is set while the agent has no owner, so a hot-removed
//! NIC hands over at once without anyone polling for it.
//!
//! Off by default in [`AzureConfig`] (`enabled: false`), so a manager built for tests or
//! for plain Hyper-V sends nothing; the appliance switches it on from its command line
//! (`azure=`, `wireserver=`, `imds=`). Off Azure an enabled agent costs its attempts and
//! then stops with a warning.

pub mod http_client;
pub mod imds;
pub mod wireserver;

use alloc::rc::Rc;
use alloc::string::String;
use core::cell::RefCell;
use core::fmt;
use core::net::Ipv4Addr;

use hvnet_runtime::sync::Event;
use hvnet_runtime::{Duration, Instant};
use smoltcp::iface::{Interface as SmolInterface, SocketSet};

use crate::iface::IpConfig;
use http_client::{Exchange, HttpError, Limits, Linger, Response};
use imds::{imds_request, parse_instance, ImdsError, ImdsInfo};
use wireserver::{
    goal_state_request, health_report_xml, health_request, parse_goal_state, report_accepted,
    GoalState, GoalStateError,
};

/// The WireServer's usual address (DHCP option 245 may name another).
pub const DEFAULT_WIRESERVER: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
/// The instance metadata service's address.
pub const DEFAULT_IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// First ephemeral port (RFC 6335 dynamic range); the agent's connections use
/// consecutive ports from a seeded start in `49152..=65535`.
const EPHEMERAL_FIRST: u16 = 49152;
const EPHEMERAL_COUNT: u16 = 16384;

/// Settings of the agent, part of [`ManagerConfig`](crate::ManagerConfig).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AzureConfig {
    /// Run the agent at all (false by default: only Azure has a WireServer).
    pub enabled: bool,
    /// The WireServer (168.63.129.16).
    pub wireserver: Ipv4Addr,
    /// The instance metadata service (169.254.169.254).
    pub imds: Ipv4Addr,
    /// TCP port of both (80).
    pub port: u16,
    /// `x-ms-agent-name` sent to the WireServer (`hvnet`).
    pub agent_name: &'static str,
    /// Ready report attempts before giving up (30).
    pub max_attempts: u32,
    /// IMDS attempts before giving up (5).
    pub imds_attempts: u32,
    /// Wait before the first retry; doubled for each further one (1 s).
    pub initial_backoff: Duration,
    /// Longest wait between retries (15 s).
    pub max_backoff: Duration,
    /// Connect, request and response of one exchange must fit in this (10 s).
    pub request_timeout: Duration,
    /// Largest response body accepted (64 KiB).
    pub max_body: usize,
}

impl Default for AzureConfig {
    fn default() -> Self {
        AzureConfig {
            enabled: false,
            wireserver: DEFAULT_WIRESERVER,
            imds: DEFAULT_IMDS,
            port: 80,
            agent_name: "hvnet",
            max_attempts: 30,
            imds_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(15),
            request_timeout: Duration::from_secs(10),
            max_body: 64 * 1024,
        }
    }
}

impl AzureConfig {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

/// Where the Ready report is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AzureState {
    /// Not started: disabled, or no interface with a route to the WireServer yet.
    #[default]
    Idle,
    /// Fetching the goal state (or waiting to retry).
    GoalState,
    /// Posting the health report.
    Reporting,
    /// The WireServer took the Ready report.
    Ready,
    /// Gave up after the attempt limit.
    Failed,
}

impl AzureState {
    /// Lower-case name for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AzureState::Idle => "idle",
            AzureState::GoalState => "goal-state",
            AzureState::Reporting => "reporting",
            AzureState::Ready => "ready",
            AzureState::Failed => "failed",
        }
    }
}

/// Where the IMDS read is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImdsState {
    /// Not started.
    #[default]
    Idle,
    /// Reading (or waiting to retry).
    Reading,
    /// Read.
    Done,
    /// Gave up.
    Failed,
}

impl ImdsState {
    /// Lower-case name for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ImdsState::Idle => "idle",
            ImdsState::Reading => "reading",
            ImdsState::Done => "done",
            ImdsState::Failed => "failed",
        }
    }
}

/// Why an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentError {
    /// The exchange failed (connection, timeout, malformed response).
    Http(HttpError),
    /// The server answered with this status.
    Status(u16),
    /// The goal state was not usable.
    GoalState(GoalStateError),
    /// The IMDS document was not usable.
    Imds(ImdsError),
    /// The interface running the agent lost its route or went away mid-exchange.
    InterfaceGone,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Http(error) => write!(f, "{error}"),
            AgentError::Status(status) => write!(f, "HTTP status {status}"),
            AgentError::GoalState(error) => write!(f, "{error}"),
            AgentError::Imds(error) => write!(f, "{error}"),
            AgentError::InterfaceGone => f.write_str("the interface went away"),
        }
    }
}

/// What the agent has done, for the status page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AzureStatus {
    /// Whether the agent is configured to run.
    pub enabled: bool,
    /// The Ready report's state.
    pub state: AzureState,
    /// The interface running the agent now.
    pub interface: Option<String>,
    /// Ready report attempts started.
    pub attempts: u32,
    /// The last goal state's incarnation.
    pub incarnation: Option<u64>,
    /// The last goal state's container id.
    pub container_id: Option<String>,
    /// The last goal state's (first) role instance id.
    pub instance_id: Option<String>,
    /// Why the last report attempt failed (cleared on success).
    pub last_error: Option<AgentError>,
    /// The IMDS read's state.
    pub imds: ImdsState,
    /// IMDS attempts started.
    pub imds_attempts: u32,
    /// What IMDS said.
    pub imds_info: Option<ImdsInfo>,
    /// Why the last IMDS attempt failed.
    pub imds_error: Option<AgentError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    GoalState,
    Health,
    Imds,
}

#[derive(Debug)]
struct Conn {
    job: Job,
    exchange: Exchange,
}

struct Agent {
    config: AzureConfig,
    next_token: u64,
    /// The owning link's token and its interface's name.
    owner: Option<(u64, String)>,
    conn: Option<Conn>,
    linger: Option<Linger>,
    started: bool,
    state: AzureState,
    attempts: u32,
    next_report: Instant,
    goal: Option<GoalState>,
    last_error: Option<AgentError>,
    imds_state: ImdsState,
    imds_attempts: u32,
    next_imds: Instant,
    imds: Option<ImdsInfo>,
    imds_error: Option<AgentError>,
    port_base: u16,
    port_counter: u16,
    /// The time of the last poll (a removed interface releases without a clock).
    last_now: Instant,
}

/// The agent. Cheap to clone (clones are one agent). See the [module docs](self).
#[derive(Clone)]
pub struct AzureAgent {
    inner: Rc<RefCell<Agent>>,
    /// Set while the agent has work and no owner.
    homeless: Rc<Event>,
}

impl fmt::Debug for AzureAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureAgent")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl AzureAgent {
    /// An agent with `config`; `seed` picks where its ephemeral ports start.
    pub fn new(config: AzureConfig, seed: u64) -> Self {
        AzureAgent {
            inner: Rc::new(RefCell::new(Agent {
                config,
                next_token: 1,
                owner: None,
                conn: None,
                linger: None,
                started: false,
                state: AzureState::Idle,
                attempts: 0,
                next_report: Instant::ZERO,
                goal: None,
                last_error: None,
                imds_state: ImdsState::Idle,
                imds_attempts: 0,
                next_imds: Instant::ZERO,
                imds: None,
                imds_error: None,
                port_base: (seed % u64::from(EPHEMERAL_COUNT)) as u16,
                port_counter: 0,
                last_now: Instant::ZERO,
            })),
            homeless: Rc::new(Event::named("azure agent without an interface")),
        }
    }

    /// Whether the agent is configured to run.
    pub fn enabled(&self) -> bool {
        self.inner.borrow().config.enabled
    }

    /// What the agent has done so far.
    pub fn status(&self) -> AzureStatus {
        let agent = self.inner.borrow();
        AzureStatus {
            enabled: agent.config.enabled,
            state: agent.state,
            interface: agent.owner.as_ref().map(|(_, name)| name.clone()),
            attempts: agent.attempts,
            incarnation: agent.goal.as_ref().map(|g| g.incarnation),
            container_id: agent.goal.as_ref().map(|g| g.container_id.clone()),
            instance_id: agent.goal.as_ref().map(|g| g.instance_id.clone()),
            last_error: agent.last_error,
            imds: agent.imds_state,
            imds_attempts: agent.imds_attempts,
            imds_info: agent.imds.clone(),
            imds_error: agent.imds_error,
        }
    }

    /// A link for one interface to poll the agent through.
    pub fn attach(&self) -> AzureLink {
        let mut agent = self.inner.borrow_mut();
        let token = agent.next_token;
        agent.next_token += 1;
        AzureLink {
            agent: self.clone(),
            token,
        }
    }
}

/// One interface's connection to the [`AzureAgent`]. Dropping it without
/// [`detach`](Self::detach) leaves a claim behind; the interface detaches when it goes.
pub struct AzureLink {
    agent: AzureAgent,
    token: u64,
}

impl fmt::Debug for AzureLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureLink")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl AzureLink {
    /// Runs the agent if this interface owns it (or claims it now): called by the
    /// interface after smoltcp has processed what arrived. Returns whether anything was
    /// queued for sending.
    pub fn poll(
        &self,
        name: &str,
        now: Instant,
        ip: Option<&IpConfig>,
        iface: &mut SmolInterface,
        sockets: &mut SocketSet<'static>,
    ) -> bool {
        let mut agent = self.agent.inner.borrow_mut();
        if !agent.config.enabled {
            return false;
        }
        agent.last_now = now;
        let routed = agent.routed(ip);
        match &agent.owner {
            Some((token, _)) if *token == self.token => {
                if !routed {
                    agent.release(self.token, sockets, "lost its route", &self.agent.homeless);
                    return false;
                }
            }
            Some(_) => return false,
            None => {
                if !routed || !agent.has_work() {
                    return false;
                }
                agent.claim(self.token, name, now);
                self.agent.homeless.reset();
            }
        }
        agent.drive(now, iface, sockets)
    }

    /// When this interface must poll again for the agent (`None`: it does not own it,
    /// or nothing is pending).
    pub fn next_deadline(&self) -> Option<Instant> {
        let agent = self.agent.inner.borrow();
        if agent.owner.as_ref().map(|(t, _)| *t) != Some(self.token) {
            return None;
        }
        agent.next_deadline()
    }

    /// The event an interface with `ip` waits on to take the agent over when its owner
    /// goes (`None` when it has no reason to).
    pub fn claim_event(&self, ip: Option<&IpConfig>) -> Option<&Event> {
        let agent = self.agent.inner.borrow();
        let mine = agent.owner.as_ref().map(|(t, _)| *t) == Some(self.token);
        (agent.config.enabled && !mine && agent.has_work() && agent.routed(ip))
            .then_some(&*self.agent.homeless)
    }

    /// The interface is going away: gives the agent up (its sockets in `sockets` are
    /// removed) so another interface can take over.
    pub fn detach(&self, sockets: &mut SocketSet<'static>) {
        let mut agent = self.agent.inner.borrow_mut();
        agent.release(self.token, sockets, "went away", &self.agent.homeless);
    }
}

fn format_mac(mac: Option<[u8; 6]>) -> String {
    match mac {
        Some(m) => alloc::format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5]
        ),
        None => String::from("(unreadable)"),
    }
}

impl Agent {
    fn routed(&self, ip: Option<&IpConfig>) -> bool {
        ip.is_some_and(|ip| {
            ip.gateway.is_some() || ip.address.contains_addr(&self.config.wireserver)
        })
    }

    fn has_work(&self) -> bool {
        !matches!(self.state, AzureState::Ready | AzureState::Failed)
            || !matches!(self.imds_state, ImdsState::Done | ImdsState::Failed)
            || self.conn.is_some()
            || self.linger.is_some()
    }

    fn claim(&mut self, token: u64, name: &str, now: Instant) {
        self.owner = Some((token, String::from(name)));
        if self.started {
            log::info!("azure: agent continues on {name}");
            return;
        }
        self.started = true;
        self.state = AzureState::GoalState;
        self.imds_state = ImdsState::Reading;
        self.next_report = now;
        self.next_imds = now;
        log::info!(
            "azure: agent starts on {name}: WireServer {}, IMDS {}, port {}",
            self.config.wireserver,
            self.config.imds,
            self.config.port
        );
    }

    fn release(
        &mut self,
        token: u64,
        sockets: &mut SocketSet<'static>,
        why: &str,
        homeless: &Event,
    ) {
        let name = match &self.owner {
            Some((t, name)) if *t == token => name.clone(),
            _ => return,
        };
        self.owner = None;
        if let Some(linger) = self.linger.take() {
            linger.remove(sockets);
        }
        if self.has_work() {
            log::info!("azure: {name} {why}; the agent waits for another interface with a route");
            homeless.set();
        }
        if let Some(conn) = self.conn.take() {
            sockets.remove(conn.exchange.handle());
            let now = self.last_now;
            self.finish(conn.job, Err(AgentError::InterfaceGone), now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if let Some(conn) = &self.conn {
            return Some(conn.exchange.deadline());
        }
        if let Some(linger) = &self.linger {
            return Some(linger.deadline());
        }
        let report = matches!(self.state, AzureState::GoalState | AzureState::Reporting)
            .then_some(self.next_report);
        let imds = (self.imds_state == ImdsState::Reading).then_some(self.next_imds);
        match (report, imds) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn next_port(&mut self) -> u16 {
        let offset = (self.port_base + self.port_counter) % EPHEMERAL_COUNT;
        self.port_counter = (self.port_counter + 1) % EPHEMERAL_COUNT;
        EPHEMERAL_FIRST + offset
    }

    /// Moves the owned agent along.
    fn drive(
        &mut self,
        now: Instant,
        iface: &mut SmolInterface,
        sockets: &mut SocketSet<'static>,
    ) -> bool {
        let mut queued = false;
        if let Some(linger) = self.linger.as_mut() {
            if linger.poll(sockets, now) {
                self.linger = None;
            }
        }
        if let Some(conn) = self.conn.as_mut() {
            if let Some(result) = conn.exchange.poll(sockets, now) {
                let job = conn.job;
                let handle = conn.exchange.handle();
                self.conn = None;
                self.linger = Some(Linger::new(sockets, handle, now));
                queued = true;
                self.finish(job, result.map_err(AgentError::Http), now);
            }
        }
        if self.conn.is_none() && self.linger.is_none() {
            queued |= self.start_due(now, iface, sockets);
        }
        queued
    }

    /// Starts the job that is due, report first. Returns whether a connection opened.
    fn start_due(
        &mut self,
        now: Instant,
        iface: &mut SmolInterface,
        sockets: &mut SocketSet<'static>,
    ) -> bool {
        let report_due = now >= self.next_report;
        let job = match self.state {
            AzureState::GoalState if report_due => Job::GoalState,
            AzureState::Reporting if report_due => Job::Health,
            _ if self.imds_state == ImdsState::Reading && now >= self.next_imds => Job::Imds,
            _ => return false,
        };
        let config = &self.config;
        let (server, request) = match job {
            Job::GoalState => {
                self.attempts += 1;
                log::debug!(
                    "azure: fetching the goal state (attempt {} of {})",
                    self.attempts,
                    config.max_attempts
                );
                (
                    config.wireserver,
                    goal_state_request(config.wireserver, config.agent_name),
                )
            }
            Job::Health => {
                let Some(goal) = self.goal.as_ref() else {
                    // Cannot happen (Reporting follows a goal state); fetch one again.
                    self.state = AzureState::GoalState;
                    return false;
                };
                let xml = health_report_xml(goal, "Ready");
                log::debug!(
                    "azure: reporting Ready for incarnation {}",
                    goal.incarnation
                );
                (
                    config.wireserver,
                    health_request(config.wireserver, config.agent_name, &xml),
                )
            }
            Job::Imds => {
                self.imds_attempts += 1;
                log::debug!(
                    "azure: reading IMDS (attempt {} of {})",
                    self.imds_attempts,
                    config.imds_attempts
                );
                (config.imds, imds_request(config.imds))
            }
        };
        let limits = Limits {
            timeout: self.config.request_timeout,
            max_body: self.config.max_body,
        };
        let port = self.config.port;
        let local_port = self.next_port();
        match Exchange::start(
            iface,
            sockets,
            (server, port),
            local_port,
            request,
            limits,
            now,
        ) {
            Ok(exchange) => {
                self.conn = Some(Conn { job, exchange });
                true
            }
            Err(error) => {
                self.finish(job, Err(AgentError::Http(error)), now);
                false
            }
        }
    }

    /// Takes the outcome of an exchange.
    fn finish(&mut self, job: Job, result: Result<Response, AgentError>, now: Instant) {
        let ok = |result: Result<Response, AgentError>| match result {
            Ok(response) if response.status == 200 => Ok(response),
            Ok(response) => Err(AgentError::Status(response.status)),
            Err(error) => Err(error),
        };
        match job {
            Job::GoalState => {
                let goal = ok(result)
                    .and_then(|r| parse_goal_state(&r.body).map_err(AgentError::GoalState));
                match goal {
                    Ok(goal) => {
                        if let Some(old) = self.goal.as_ref() {
                            if old.incarnation != goal.incarnation {
                                log::debug!(
                                    "azure: goal state incarnation {} -> {}",
                                    old.incarnation,
                                    goal.incarnation
                                );
                            }
                        }
                        self.goal = Some(goal);
                        self.state = AzureState::Reporting;
                        self.next_report = now;
                    }
                    Err(error) => self.report_failed(error, now),
                }
            }
            Job::Health => match result {
                Ok(response) if report_accepted(response.status) => {
                    self.state = AzureState::Ready;
                    self.last_error = None;
                    if let Some(goal) = self.goal.as_ref() {
                        log::info!(
                            "azure: reported Ready to the WireServer (incarnation {}, container {}, instance {}) after {} attempt(s)",
                            goal.incarnation,
                            goal.container_id,
                            goal.instance_id,
                            self.attempts
                        );
                    }
                }
                Ok(response) => self.report_failed(AgentError::Status(response.status), now),
                Err(error) => self.report_failed(error, now),
            },
            Job::Imds => {
                let info =
                    ok(result).and_then(|r| parse_instance(&r.body).map_err(AgentError::Imds));
                match info {
                    Ok(info) => {
                        log::info!(
                            "azure: IMDS: VM {}, size {}, location {}, {} interface(s)",
                            info.name,
                            info.vm_size,
                            info.location,
                            info.interfaces.len()
                        );
                        for (index, nic) in info.interfaces.iter().enumerate() {
                            log::info!(
                                "azure: IMDS interface {index}: MAC {}, private IPv4 {:?}",
                                format_mac(nic.mac),
                                nic.ipv4
                            );
                        }
                        self.imds_state = ImdsState::Done;
                        self.imds_error = None;
                        self.imds = Some(info);
                    }
                    Err(error) => {
                        self.imds_error = Some(error);
                        if self.imds_attempts >= self.config.imds_attempts {
                            self.imds_state = ImdsState::Failed;
                            log::warn!(
                                "azure: giving up on IMDS after {} attempt(s): {error}",
                                self.imds_attempts
                            );
                        } else {
                            let delay = self.config.backoff(self.imds_attempts);
                            self.next_imds = now + delay;
                            log::debug!(
                                "azure: IMDS attempt {} failed: {error}; retrying in {delay:?}",
                                self.imds_attempts
                            );
                        }
                    }
                }
            }
        }
    }

    fn report_failed(&mut self, error: AgentError, now: Instant) {
        self.last_error = Some(error);
        if self.attempts >= self.config.max_attempts {
            self.state = AzureState::Failed;
            log::warn!(
                "azure: giving up on reporting Ready after {} attempt(s): {error}",
                self.attempts
            );
        } else {
            self.state = AzureState::GoalState;
            let delay = self.config.backoff(self.attempts);
            self.next_report = now + delay;
            log::debug!(
                "azure: Ready report attempt {} failed: {error}; retrying in {delay:?}",
                self.attempts
            );
        }
    }
}

/// Test inputs for the parsers: `rounds` copies of `sample` with one to four bits
/// flipped at random (a SplitMix64 stream from `seed`, so every run is the same), each
/// handed to `check` with a piece size in 1..=17 for incremental parsers.
#[cfg(test)]
pub(crate) fn bit_flips(
    sample: &[u8],
    seed: u64,
    rounds: usize,
    mut check: impl FnMut(&[u8], usize),
) {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut bytes = alloc::vec::Vec::with_capacity(sample.len());
    for _ in 0..rounds {
        bytes.clear();
        bytes.extend_from_slice(sample);
        if bytes.is_empty() {
            return;
        }
        for _ in 0..1 + next() % 4 {
            let i = (next() % bytes.len() as u64) as usize;
            bytes[i] ^= 1 << (next() % 8);
        }
        check(&bytes, 1 + (next() % 17) as usize);
    }
}

/// Writes `status` as the status page's `azure` object.
pub(crate) fn write_status_json(w: &mut crate::services::json::JsonWriter, status: &AzureStatus) {
    w.begin_object();
    w.key("enabled").boolean(status.enabled);
    w.key("state").string(status.state.as_str());
    w.key("interface");
    match &status.interface {
        Some(name) => w.string(name),
        None => w.null(),
    };
    w.key("attempts").number(u64::from(status.attempts));
    w.key("incarnation");
    match status.incarnation {
        Some(n) => w.number(n),
        None => w.null(),
    };
    w.key("container_id");
    match &status.container_id {
        Some(id) => w.string(id),
        None => w.null(),
    };
    w.key("instance_id");
    match &status.instance_id {
        Some(id) => w.string(id),
        None => w.null(),
    };
    w.key("last_error");
    match status.last_error {
        Some(error) => w.display(error),
        None => w.null(),
    };
    w.key("imds").begin_object();
    w.key("state").string(status.imds.as_str());
    w.key("attempts").number(u64::from(status.imds_attempts));
    w.key("error");
    match status.imds_error {
        Some(error) => w.display(error),
        None => w.null(),
    };
    match &status.imds_info {
        Some(info) => {
            w.key("vm_name").string(&info.name);
            w.key("vm_size").string(&info.vm_size);
            w.key("location").string(&info.location);
            w.key("interfaces").begin_array();
            for nic in &info.interfaces {
                w.begin_object();
                w.key("mac");
                match nic.mac {
                    Some(_) => w.string(&format_mac(nic.mac)),
                    None => w.null(),
                };
                w.key("ipv4").begin_array();
                for ip in &nic.ipv4 {
                    w.display(ip);
                }
                w.end_array();
                w.end_object();
            }
            w.end_array();
        }
        None => {
            w.key("vm_name").null();
            w.key("vm_size").null();
            w.key("location").null();
            w.key("interfaces").begin_array().end_array();
        }
    }
    w.end_object();
    w.end_object();
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let config = AzureConfig::default();
        let waits: Vec<u64> = (1..=7).map(|n| config.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 15, 15, 15]);
        assert_eq!(config.backoff(u32::MAX), Duration::from_secs(15));
        assert_eq!(config.backoff(0), Duration::from_secs(1));
    }

    #[test]
    fn ports_stay_in_the_dynamic_range() {
        let agent = AzureAgent::new(AzureConfig::default(), u64::MAX);
        let mut inner = agent.inner.borrow_mut();
        let first = inner.next_port();
        for _ in 0..40_000 {
            let port = inner.next_port();
            assert!(port >= EPHEMERAL_FIRST);
            assert_ne!(port, 0);
        }
        assert!(first >= EPHEMERAL_FIRST);
    }

    #[test]
    fn status_json_shape() {
        let status = AzureStatus {
            enabled: true,
            state: AzureState::Ready,
            interface: Some("eth0".into()),
            attempts: 2,
            incarnation: Some(3),
            container_id: Some("c".into()),
            instance_id: Some("i\"".into()),
            last_error: None,
            imds: ImdsState::Done,
            imds_attempts: 1,
            imds_info: Some(ImdsInfo {
                name: "vm".into(),
                vm_size: "Standard_B1s".into(),
                location: "here".into(),
                interfaces: alloc::vec![imds::ImdsInterface {
                    mac: Some([0, 0x15, 0x5d, 0, 0, 1]),
                    ipv4: alloc::vec![Ipv4Addr::new(10, 0, 0, 4)],
                }],
            }),
            imds_error: Some(AgentError::Status(500)),
        };
        let mut w = crate::services::json::JsonWriter::new();
        write_status_json(&mut w, &status);
        assert_eq!(
            w.finish(),
            concat!(
                r#"{"enabled":true,"state":"ready","interface":"eth0","attempts":2,"incarnation":3,"#,
                r#""container_id":"c","instance_id":"i\"","last_error":null,"imds":{"state":"done","#,
                r#""attempts":1,"error":"HTTP status 500","vm_name":"vm","vm_size":"Standard_B1s","#,
                r#""location":"here","interfaces":[{"mac":"00:15:5d:00:00:01","ipv4":["10.0.0.4"]}]}}"#
            )
        );
    }
}
