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
//! interrupt. That thread also fails the device if the backend hangs up.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio::{DeviceError, Interrupt, Memory, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
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
/// How long one message may take before the backend is deemed gone: a vCPU waits on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The protocol extensions asked for, where offered.
const WANTED: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK);

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
    frontend: Frontend,
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
    running: Option<Calls>,
    /// The connection, watched for the backend hanging up while the device runs.
    watch: Option<UnixStream>,
}

/// The thread that turns the backend's call eventfds into interrupts, and how to stop it.
struct Calls {
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Calls {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
        let sock = UnixStream::connect(path).map_err(|source| VhostUserError::Connect {
            path: path.to_owned(),
            source,
        })?;
        // A backend that stops answering fails the device instead of holding a vCPU.
        let _ = sock.set_read_timeout(Some(REPLY_TIMEOUT));
        let _ = sock.set_write_timeout(Some(REPLY_TIMEOUT));
        let watch = sock.try_clone().ok();
        let mut frontend = Frontend::from_stream(sock, u64::from(queues));
        let proto = |what: &'static str| {
            let path = path.to_owned();
            move |source| VhostUserError::Protocol { path, what, source }
        };
        let refused = |what: String| VhostUserError::Refused {
            path: path.to_owned(),
            what,
        };
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
        let size = config_size(device_type);
        if size > 0 && !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            // The driver would read zeros: a disk of no sectors, a file system with no tag.
            return Err(refused(format!(
                "it does not give its configuration space (no CONFIG protocol feature), which                  a device of type {device_type} needs; use a backend that does (for virtiofsd,                  a version with --tag)"
            )));
        }
        let config = if size > 0 {
            let (_, payload) = frontend
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
            frontend,
            device_type,
            offered,
            acked: 0,
            protocol,
            queue_sizes: vec![queue_size; usize::from(queues)],
            config,
            kicks,
            vector_calls: Vec::new(),
            running: None,
            watch,
        })
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

    /// Tells the backend where everything is and lets it start: the pool as its one memory
    /// region, then each queue's size, rings (as addresses in our mapping of the pool, which
    /// the table translates), first index and eventfds.
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
            let ring = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: va(q.desc_table(), 16 * n)?,
                used_ring_addr: va(q.used_ring(), 6 + 8 * n)?,
                avail_ring_addr: va(q.avail_ring(), 6 + 2 * n)?,
                log_addr: None,
            };
            rings.push((i, q.size(), q.next_avail(), ring));
        }
        let mut features = self.acked & (self.offered | virtio::F_VERSION_1);
        if !self.protocol.is_empty() {
            features |= F_PROTOCOL_FEATURES;
        }
        self.frontend
            .set_features(features)
            .map_err(e("SET_FEATURES"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        let mut calls = Vec::new();
        for (i, size, next_avail, ring) in rings {
            self.frontend
                .set_vring_num(i, size)
                .map_err(e("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &ring)
                .map_err(e("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, next_avail)
                .map_err(e("SET_VRING_BASE"))?;
            // Through the queue's MSI-X vector's own route where it has one, else through
            // the interrupt thread (INTx, or no vector).
            let routed = interrupt
                .queue_vector(i as u16)
                .and_then(|v| self.vector_calls.get(usize::from(v)));
            let own = match routed {
                Some(fd) => {
                    self.frontend
                        .set_vring_call(i, fd)
                        .map_err(e("SET_VRING_CALL"))?;
                    None
                }
                None => {
                    let call = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
                    self.frontend
                        .set_vring_call(i, &call)
                        .map_err(e("SET_VRING_CALL"))?;
                    Some(call)
                }
            };
            self.frontend
                .set_vring_kick(i, self.kicks.get(i).ok_or("a queue past the device's")?)
                .map_err(e("SET_VRING_KICK"))?;
            if !self.protocol.is_empty() {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(e("SET_VRING_ENABLE"))?;
            }
            calls.extend(own.map(|call| (i as u16, call)));
        }
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
        let thread = {
            let stop = stop.clone();
            let watch = self.watch.as_ref().and_then(|w| w.try_clone().ok());
            let path = self.path.clone();
            std::thread::Builder::new()
                .name("vhost-calls".into())
                .spawn(move || {
                    let hung_up = forward_calls(&calls, watch.as_ref(), &stop, &*interrupt);
                    if hung_up {
                        log::error!(
                            "vhost-user backend at {} hung up: its device needs a reset",
                            path.display()
                        );
                        interrupt.failed();
                    }
                })
                .map_err(|e| format!("cannot start its interrupt thread: {e}"))?
        };
        self.running = Some(Calls {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }
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
        if let Err(e) = self
            .frontend
            .set_config(off as u32, VhostUserConfigFlags::WRITABLE, data)
        {
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
    /// Stops the rings (GET_VRING_BASE answers once the backend has stopped one) and the
    /// interrupt thread; the backend keeps its connection for the driver's next start.
    fn reset(&mut self) {
        if self.running.take().is_none() {
            return;
        }
        for i in 0..self.queue_sizes.len() {
            if let Err(e) = self.frontend.get_vring_base(i) {
                ratelog::warn!(
                    "vhost-user backend at {}: GET_VRING_BASE {i}: {e}",
                    self.path.display()
                );
            }
        }
    }
}
