//! splitvirt as a vhost-user frontend (rust-vmm's `vhost` crate speaks the protocol): a virtio
//! device whose queues another program serves, qemu-storage-daemon or virtiofsd say. What sets
//! it apart from every other frontend is its memory table: the restricted DMA pool alone (the
//! memory the device is given, a sealed memfd), never the guest's RAM. Rings the driver placed
//! outside the pool are refused before anything is sent (the transport checks them), so the
//! backend cannot be told of any other address.
//!
//! The device knows nothing of PCI or of the hypervisor: the transport calls `notify`, which
//! kicks the backend's eventfd (or the hypervisor's eventfd is the kick, `use_kick`); a queue
//! whose MSI-X vector has an eventfd of the hypervisor's (`use_vector_calls`) has the backend
//! signal that, and the other queues' calls are waited on by one thread that raises their
//! interrupt. That thread also watches the connection: a backend that hangs up is connected
//! to again at the same socket (a restarted daemon) and told everything anew, its queues
//! resuming where their used rings stand, as QEMU does. A backend that tracks its requests in
//! flight (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) is given the region its predecessor kept
//! them in, and resubmits them; one that does not (qemu-storage-daemon, the rust-vmm family)
//! redoes every request past the used index, so that a request completed out of order just
//! before the hang-up may be done twice. If no backend comes back in time, the device fails.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio::{DeviceError, Interrupt, Memory, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// VHOST_USER_F_PROTOCOL_FEATURES: the backend speaks the protocol extensions (config space,
/// ring enabling); a virtio feature bit that is the frontend's business, never the driver's.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Ring layout features the transport supports besides the device's own (bits 0-23):
/// indirect descriptors and event index. Packed rings and the rest are not offered.
const RING_FEATURES: u64 = (1 << 28) | virtio::F_EVENT_IDX;
/// virtio-blk's multiqueue bit: offered only when the description gives the device more
/// than one queue (the driver would otherwise ask for queues the transport does not have).
const BLK_F_MQ: u64 = 1 << 12;
/// virtio-console's multiport bit: its control queues (2 and 3) come with it.
const CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// How long one message may take before the backend is deemed gone: a vCPU waits on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The protocol extensions asked for, where offered.
const WANTED: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
/// How long a backend that hung up may take to come back (a daemon restarted by its
/// supervisor) before its device fails; the driver's requests wait meanwhile.
pub const RECONNECT_WINDOW: Duration = Duration::from_secs(60);
/// How often the socket is tried meanwhile.
const RECONNECT_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(
        "cannot connect to the vhost-user backend at {path}: {source}; start the backend \
         (for instance qemu-storage-daemon --export type=vhost-user-blk,addr.type=unix,\
         addr.path={path},...) before splitvirt"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user backend at {path}: {what}: {source}")]
    Protocol {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("vhost-user backend at {path}: {what}")]
    Refused { path: PathBuf, what: String },
}

/// The size of a device type's configuration space as the backend is asked for it: the
/// fields every backend of that type has (struct virtio_blk_config up to write_zeroes).
fn config_size(device_type: u32) -> u32 {
    match device_type {
        2 => 60,
        // virtio-fs: tag[36] and num_request_queues; vsock: guest_cid; console: cols, rows,
        // max_nr_ports, emerg_wr.
        26 => 40,
        19 => 8,
        3 => 12,
        _ => 0,
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    path: PathBuf,
    /// The connection: the vCPU's config writes and resets and the supervisor thread's
    /// reconnection share it (held only for one exchange, never while connecting).
    conn: Arc<Mutex<Conn>>,
    device_type: u32,
    /// What the backend offers that the transport may pass on to the driver.
    offered: u64,
    acked: u64,
    protocol: VhostUserProtocolFeatures,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    kicks: Vec<EventFd>,
    /// By MSI-X vector: eventfds the hypervisor turns into the interrupt the driver programmed
    /// into that vector (irqfds); a queue whose vector has one takes it as its call.
    vector_calls: Vec<EventFd>,
    running: Option<Supervisor>,
    reconnect_window: Duration,
}

/// One connection to the backend, and a clone of its socket watched for a hang-up.
struct Conn {
    frontend: Frontend,
    watch: Option<UnixStream>,
}

fn lock(conn: &Mutex<Conn>) -> MutexGuard<'_, Conn> {
    conn.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a message to the backend at `path` failed: `proto(path)(what)(source)`.
fn proto(
    path: &Path,
) -> impl Fn(&'static str) -> Box<dyn FnOnce(vhost::Error) -> VhostUserError> + '_ {
    move |what| {
        let path = path.to_owned();
        Box::new(move |source| VhostUserError::Protocol { path, what, source })
    }
}

/// The backend at `path` offers what splitvirt cannot use: `refused(path)(what)`.
fn refused(path: &Path) -> impl Fn(String) -> VhostUserError + '_ {
    move |what| VhostUserError::Refused {
        path: path.to_owned(),
        what,
    }
}

/// A connection through its first exchanges: what the backend offers, checked.
struct Handshake {
    conn: Conn,
    features: u64,
    protocol: VhostUserProtocolFeatures,
}

/// Connects to `path` and agrees on the protocol: `queues` queues.
fn handshake(path: &Path, queues: u16) -> Result<Handshake, VhostUserError> {
    let sock = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
        path: path.to_owned(),
        source,
    })?;
    // A backend that stops answering fails the device instead of holding a vCPU.
    let _ = sock.set_read_timeout(Some(REPLY_TIMEOUT));
    let _ = sock.set_write_timeout(Some(REPLY_TIMEOUT));
    let watch = sock.try_clone().ok();
    let mut frontend = Frontend::from_stream(sock, u64::from(queues));
    let (proto, refused) = (proto(path), refused(path));
    frontend.set_owner().map_err(proto("SET_OWNER"))?;
    let features = frontend.get_features().map_err(proto("GET_FEATURES"))?;
    if features & virtio::F_VERSION_1 == 0 {
        return Err(refused(format!(
            "it offers features {features:#x} without VERSION_1 (a legacy device)"
        )));
    }
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & F_PROTOCOL_FEATURES != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(proto("GET_PROTOCOL_FEATURES"))?;
        protocol = offered & WANTED;
        frontend
            .set_protocol_features(protocol)
            .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let n = frontend.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
        if n < u64::from(queues) {
            return Err(refused(format!(
                "it serves {n} queues, the description asks for {queues}"
            )));
        }
    } else if queues > 1 {
        return Err(refused(format!(
            "it serves one queue (no MQ protocol feature), the description asks for {queues}"
        )));
    }
    Ok(Handshake {
        conn: Conn { frontend, watch },
        features,
        protocol,
    })
}

impl VhostUserDevice {
    /// Connects to the backend at `path` and learns what it offers: a device of
    /// `device_type` with `queues` queues of at most `queue_size` entries.
    pub fn connect(
        path: &Path,
        device_type: u32,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, VhostUserError> {
        let Handshake {
            mut conn,
            features,
            protocol,
        } = handshake(path, queues)?;
        let (proto, refused) = (proto(path), refused(path));
        let size = config_size(device_type);
        if size > 0 && !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            // The driver would read zeros: a disk of no sectors, a file system with no tag.
            return Err(refused(format!(
                "it does not give its configuration space (no CONFIG protocol feature), which \
                 a device of type {device_type} needs; use a backend that does (for virtiofsd, \
                 a version with --tag)"
            )));
        }
        let config = if size > 0 {
            let (_, payload) = conn
                .frontend
                .get_config(
                    0,
                    size,
                    VhostUserConfigFlags::WRITABLE,
                    &vec![0u8; size as usize],
                )
                .map_err(proto("GET_CONFIG"))?;
            payload
        } else {
            Vec::new()
        };
        let mut offered = features & (0xff_ffff | RING_FEATURES);
        if device_type == 2 && queues == 1 {
            offered &= !BLK_F_MQ;
        }
        // Multiport needs the control queues: only with four.
        if device_type == 3 && queues < 4 {
            offered &= !CONSOLE_F_MULTIPORT;
        }
        let kicks = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| refused(format!("cannot create its kick eventfds: {e}")))?;
        log::info!(
            "vhost-user backend at {}: device type {device_type}, features {features:#x}, \
             protocol features {:#x}",
            path.display(),
            protocol.bits()
        );
        Ok(VhostUserDevice {
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
            device_type,
            offered,
            acked: 0,
            protocol,
            queue_sizes: vec![queue_size; usize::from(queues)],
            config,
            kicks,
            vector_calls: Vec::new(),
            running: None,
            reconnect_window: RECONNECT_WINDOW,
        })
    }

    /// How long a backend that hung up may take to come back before the device fails
    /// (`RECONNECT_WINDOW` unless told; zero: it fails at once).
    pub fn set_reconnect_window(&mut self, window: Duration) {
        self.reconnect_window = window;
    }

    /// Makes `kick` queue `queue`'s kick: the hypervisor's eventfd for the queue's notify
    /// address (a KVM ioeventfd), so that a notification wakes the backend with no thread of
    /// splitvirt in between. Before the driver starts the device.
    pub fn use_kick(&mut self, queue: usize, kick: OwnedFd) {
        if let Some(k) = self.kicks.get_mut(queue) {
            // SAFETY: an eventfd handed over whole; EventFd owns it from here.
            *k = unsafe { EventFd::from_raw_fd(kick.into_raw_fd()) };
        }
    }

    /// Gives the device one eventfd per MSI-X vector, each routed by the hypervisor to what the
    /// driver programs into that vector: a queue whose driver chose a vector takes its eventfd
    /// as the backend's call, and the backend's completions raise the interrupt with no thread
    /// of splitvirt in between. Before the driver starts the device.
    pub fn use_vector_calls(&mut self, fds: Vec<OwnedFd>) {
        // SAFETY: eventfds handed over whole; each EventFd owns its own from here.
        self.vector_calls = fds
            .into_iter()
            .map(|fd| unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
            .collect();
    }

    /// Works out what the backend is to be told (the pool as its one memory region, each
    /// queue's size, rings as addresses in our mapping of the pool, which the table
    /// translates, first index and eventfds), tells it, and starts the thread that forwards
    /// calls and watches the connection.
    fn start(
        &mut self,
        mem: &Memory,
        queues: &[Queue],
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), String> {
        let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
        let regions = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(e("memory table")))
            .collect::<Result<Vec<_>, _>>()?;
        // The transport hands the device the pool alone, mapped from its memfd.
        if regions.len() != 1 {
            return Err(format!(
                "the device memory has {} regions, not the pool alone",
                regions.len()
            ));
        }
        // Every ring is checked before anything is sent: one outside the pool fails the
        // device with nothing told to the backend.
        let mut rings = Vec::new();
        let mut calls = Vec::new();
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let va = |gpa: u64, len: u64| -> Result<u64, String> {
                match mem.get_slice(GuestAddress(gpa), len as usize) {
                    Ok(s) => Ok(s.ptr_guard().as_ptr() as u64),
                    Err(_) => Err(format!(
                        "queue {i}: ring at {gpa:#x}+{len:#x} is outside the pool"
                    )),
                }
            };
            let n = u64::from(q.size());
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: va(q.desc_table(), 16 * n)?,
                used_ring_addr: va(q.used_ring(), 6 + 8 * n)?,
                avail_ring_addr: va(q.avail_ring(), 6 + 2 * n)?,
                log_addr: None,
            };
            // Through the queue's MSI-X vector's own route where it has one, else through
            // the supervisor thread (INTx, or no vector).
            let routed = interrupt
                .queue_vector(i as u16)
                .and_then(|v| self.vector_calls.get(usize::from(v)));
            let clone = |fd: &EventFd| fd.try_clone().map_err(|e| format!("eventfd: {e}"));
            let call = match routed {
                Some(fd) => Call::Routed(clone(fd)?),
                None => {
                    let own = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
                    calls.push((i as u16, clone(&own)?));
                    Call::Own(own)
                }
            };
            let kick = clone(self.kicks.get(i).ok_or("a queue past the device's")?)?;
            rings.push(Ring {
                index: i,
                config,
                used: q.used_ring(),
                next_avail: q.next_avail(),
                call,
                kick,
            });
        }
        let mut features = self.acked & (self.offered | virtio::F_VERSION_1);
        if !self.protocol.is_empty() {
            features |= F_PROTOCOL_FEATURES;
        }
        let mut setup = Setup {
            features,
            protocol: self.protocol,
            regions,
            rings,
            inflight: None,
            mem: mem.clone(),
            queues: self.queue_sizes.len() as u16,
        };
        let watch = {
            let mut conn = lock(&self.conn);
            // A region the backend tracks its requests in flight in, kept here for the next
            // backend (a new one at each start: a reset driver abandoned its requests).
            if self
                .protocol
                .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
            {
                let ask = VhostUserInflight {
                    num_queues: setup.queues,
                    queue_size: self.queue_sizes.first().copied().unwrap_or(0),
                    ..Default::default()
                };
                let got = conn
                    .frontend
                    .get_inflight_fd(&ask)
                    .map_err(e("GET_INFLIGHT_FD"))?;
                setup.inflight = Some(got);
            }
            setup.tell(&mut conn.frontend, Resume::AtAvail)?;
            conn.watch.as_ref().and_then(|w| w.try_clone().ok())
        };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
        let thread = {
            let watcher = Watcher {
                path: self.path.clone(),
                conn: self.conn.clone(),
                stop: stop.clone(),
                interrupt,
                calls,
                setup,
                window: self.reconnect_window,
            };
            std::thread::Builder::new()
                .name("vhost-calls".into())
                .spawn(move || watcher.run(watch))
                .map_err(|e| format!("cannot start its interrupt thread: {e}"))?
        };
        self.running = Some(Supervisor {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }
}

/// Where a queue's completions go: the eventfd of its MSI-X vector's route, or one of ours
/// that the supervisor thread waits on.
enum Call {
    Routed(EventFd),
    Own(EventFd),
}

impl Call {
    fn fd(&self) -> &EventFd {
        match self {
            Call::Routed(fd) | Call::Own(fd) => fd,
        }
    }
}

/// One started queue as the backend is told of it.
struct Ring {
    index: usize,
    config: VringConfigData,
    /// The used ring's guest address: a new backend starts where it stands.
    used: u64,
    /// Where the driver's start left the queue (its first backend starts there).
    next_avail: u16,
    call: Call,
    kick: EventFd,
}

/// Where a backend's queues start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// Where the driver's start left them.
    AtAvail,
    /// Where the used ring stands: a backend taking over from one that died. With the
    /// inflight region the backend resubmits what its predecessor held and moves on from there.
    AtUsed,
}

/// Everything a backend is told at a start, kept to tell the next one.
struct Setup {
    features: u64,
    protocol: VhostUserProtocolFeatures,
    regions: Vec<VhostUserMemoryRegionInfo>,
    rings: Vec<Ring>,
    inflight: Option<(VhostUserInflight, File)>,
    /// Keeps the mapping the regions point into, and reads the used rings.
    mem: Memory,
    queues: u16,
}

impl Setup {
    fn tell(&self, frontend: &mut Frontend, from: Resume) -> Result<(), String> {
        let e = |what: &'static str| move |err: vhost::Error| format!("{what}: {err}");
        if let Some((inflight, file)) = &self.inflight {
            frontend
                .set_inflight_fd(inflight, file.as_raw_fd())
                .map_err(e("SET_INFLIGHT_FD"))?;
        }
        frontend
            .set_features(self.features)
            .map_err(e("SET_FEATURES"))?;
        frontend
            .set_mem_table(&self.regions)
            .map_err(e("SET_MEM_TABLE"))?;
        for r in &self.rings {
            let base = match from {
                Resume::AtAvail => r.next_avail,
                Resume::AtUsed => self
                    .mem
                    .read_obj::<u16>(GuestAddress(r.used.wrapping_add(2)))
                    .map_err(|err| format!("queue {}: used ring: {err}", r.index))?,
            };
            frontend
                .set_vring_num(r.index, r.config.queue_size)
                .map_err(e("SET_VRING_NUM"))?;
            frontend
                .set_vring_addr(r.index, &r.config)
                .map_err(e("SET_VRING_ADDR"))?;
            frontend
                .set_vring_base(r.index, base)
                .map_err(e("SET_VRING_BASE"))?;
            frontend
                .set_vring_call(r.index, r.call.fd())
                .map_err(e("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(r.index, &r.kick)
                .map_err(e("SET_VRING_KICK"))?;
            if !self.protocol.is_empty() {
                frontend
                    .set_vring_enable(r.index, true)
                    .map_err(e("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

/// The thread that forwards the backend's calls and watches its connection, and how to stop
/// it.
struct Supervisor {
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the supervisor thread works with.
struct Watcher {
    path: PathBuf,
    conn: Arc<Mutex<Conn>>,
    stop: Arc<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    /// The queues whose calls come through here (no vector of their own).
    calls: Vec<(u16, EventFd)>,
    setup: Setup,
    window: Duration,
}

impl Watcher {
    fn run(self, mut watch: Option<UnixStream>) {
        loop {
            if !forward_calls(&self.calls, watch.as_ref(), &self.stop, &*self.interrupt) {
                return;
            }
            if self.window.is_zero() {
                log::error!(
                    "vhost-user backend at {} hung up: its device needs a reset",
                    self.path.display()
                );
                self.interrupt.failed();
                return;
            }
            log::warn!(
                "vhost-user backend at {} hung up: connecting again (for up to {} s){}",
                self.path.display(),
                self.window.as_secs(),
                if self.setup.inflight.is_none() {
                    "; it tracks no requests in flight (no INFLIGHT_SHMFD): the next one \
                     starts at the used index, and requests completed out of order just \
                     before the hang-up may be done again"
                } else {
                    ""
                }
            );
            match self.reconnect() {
                Reconnect::Done(w) => watch = w,
                Reconnect::Stopped => return,
                Reconnect::Failed(why) => {
                    log::error!(
                        "vhost-user backend at {}: {why}: its device needs a reset",
                        self.path.display()
                    );
                    self.interrupt.failed();
                    return;
                }
            }
        }
    }

    /// Tries the socket until a backend answers and takes the queues over, the window
    /// closes, or the device is stopped.
    fn reconnect(&self) -> Reconnect {
        let until = Instant::now() + self.window;
        let mut last = String::from("no backend listened");
        while Instant::now() < until {
            // The pause between tries, cut short by a stop.
            let mut p = libc::pollfd {
                fd: self.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one descriptor we hold open.
            let n = unsafe { libc::poll(&mut p, 1, RECONNECT_EVERY.as_millis() as i32) };
            if n > 0 {
                return Reconnect::Stopped;
            }
            let h = match handshake(&self.path, self.setup.queues) {
                Ok(h) => h,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let Handshake {
                mut conn,
                features,
                protocol,
            } = h;
            // The driver was promised these: the new backend must give them all.
            let wanted = self.setup.features & !F_PROTOCOL_FEATURES;
            if features & wanted != wanted || protocol != self.setup.protocol {
                return Reconnect::Failed(format!(
                    "the backend that answered offers features {features:#x} and protocol \
                     features {:#x}, the driver was given {wanted:#x} and {:#x}",
                    protocol.bits(),
                    self.setup.protocol.bits()
                ));
            }
            if let Err(e) = self.setup.tell(&mut conn.frontend, Resume::AtUsed) {
                last = e;
                continue;
            }
            let watch = conn.watch.as_ref().and_then(|w| w.try_clone().ok());
            *lock(&self.conn) = conn;
            // A kick or a call may have been lost with the old backend: one more of each
            // (a spurious one is harmless to both ends).
            for r in &self.setup.rings {
                let _ = r.kick.write(1);
                match &r.call {
                    Call::Routed(fd) => {
                        let _ = fd.write(1);
                    }
                    Call::Own(_) => self.interrupt.queue(r.index as u16),
                }
            }
            log::info!(
                "vhost-user backend at {}: connected again, its queues resumed where their \
                 used rings stood",
                self.path.display()
            );
            return Reconnect::Done(watch);
        }
        Reconnect::Failed(format!(
            "no backend took the device over within {} s ({last})",
            self.window.as_secs()
        ))
    }
}

enum Reconnect {
    Done(Option<UnixStream>),
    Stopped,
    Failed(String),
}

/// Waits on the backend's call eventfds and raises each queue's interrupt, until `stop` or
/// until the backend hangs up `watch` (its connection): returns whether it did.
fn forward_calls(
    calls: &[(u16, EventFd)],
    watch: Option<&UnixStream>,
    stop: &EventFd,
    interrupt: &dyn Interrupt,
) -> bool {
    let poll_in = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds: Vec<libc::pollfd> = calls
        .iter()
        .map(|(_, e)| poll_in(e.as_raw_fd()))
        .chain([poll_in(stop.as_raw_fd())])
        .collect();
    // Not POLLIN: replies are the frontend's to read. A hang-up is reported whatever is asked.
    fds.extend(watch.map(|w| libc::pollfd {
        fd: w.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    }));
    let stop_at = calls.len();
    loop {
        // SAFETY: poll over our own array of descriptors we hold open.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[stop_at].revents != 0 {
            return false;
        }
        if fds.get(stop_at + 1).is_some_and(|p| p.revents != 0) {
            return true;
        }
        for ((queue, call), p) in calls.iter().zip(&fds) {
            if p.revents & libc::POLLIN != 0 && call.read().is_ok() {
                interrupt.queue(*queue);
            }
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn features(&self) -> u64 {
        self.offered
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if off
            .checked_add(data.len())
            .is_none_or(|end| end > self.config.len())
        {
            return;
        }
        let sent =
            lock(&self.conn)
                .frontend
                .set_config(off as u32, VhostUserConfigFlags::WRITABLE, data);
        if let Err(e) = sent {
            ratelog::warn!(
                "vhost-user backend at {}: SET_CONFIG: {e}",
                self.path.display()
            );
            return;
        }
        self.config[off..off + data.len()].copy_from_slice(data);
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn activate(
        &mut self,
        mem: Memory,
        queues: Vec<Queue>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<(), DeviceError> {
        self.start(&mem, &queues, interrupt).map_err(|what| {
            log::error!("vhost-user backend at {}: {what}", self.path.display());
            DeviceError::Queue { queue: 0, what }
        })
    }
    fn notify(&mut self, index: u16) -> Result<(), DeviceError> {
        if let Some(k) = self.kicks.get(usize::from(index)) {
            let _ = k.write(1);
        }
        Ok(())
    }
    /// Stops the supervisor thread, then the rings (GET_VRING_BASE answers once the backend
    /// has stopped one); the backend keeps its connection for the driver's next start, which
    /// gets a new inflight region (the driver abandoned its requests).
    fn reset(&mut self) {
        if self.running.take().is_none() {
            return;
        }
        let conn = lock(&self.conn);
        for i in 0..self.queue_sizes.len() {
            if let Err(e) = conn.frontend.get_vring_base(i) {
                ratelog::warn!(
                    "vhost-user backend at {}: GET_VRING_BASE {i}: {e}",
                    self.path.display()
                );
            }
        }
    }
}
