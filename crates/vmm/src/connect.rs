//! The host side of a cross-VM connector (`connector` crate): its dataport and its peer.
//! Two VMs whose connectors name the same `peer` socket path are connected by a `Link` at that
//! path (whichever VM starts first listens), after a greeting that carries the connection's
//! name and dataport size, so that a peer whose name or size differs is refused. The dataport
//! is a file beside the socket (`PATH.dataport`) that both VMs map: the first VM creates it,
//! later ones (and a peer that returns) map the same bytes, so nothing has to be handed over
//! or remapped when a peer comes and goes.
//!
//! Events cross in the kernels, with no thread of either splitvirt woken: each side hands the
//! other, over the link, its event page (a sealed one-page memfd) and its doorbell (an
//! eventfd). An emit traps on the sending vCPU, which adds one to the count in the peer's page
//! and writes the peer's doorbell; while the peer's guest has the connector's MSI-X vector
//! routed, that doorbell is an irqfd of the peer VM, so its interrupt is raised by the
//! hypervisor. Otherwise (INTx, or the vector masked) a thread of the peer's splitvirt waits on
//! the doorbell and sets the level from the count. The count is exact: the sender adds, the
//! receiving guest's acknowledgement subtracts what it read, both atomically in the page.
//! A ring (REG_RING, a wake-up with no count) has a doorbell of its own, which the sender's
//! hypervisor signals itself on the guest's write (an ioeventfd at BAR 0 + REG_RING): with the
//! peer's vector routed, no exit and no thread anywhere between one guest's store and the other
//! guest's interrupt.

use connector::{Connector, Dataport, Interrupt, Peer};
use hostio::endpoint::{EndpointError, Link, Offer};
use layout::layout::V2m;
use pci::msix::Message;
use rpc::shm::Doorbell;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The dataport file, mapped shared.
pub struct FileDataport {
    ptr: *mut u8,
    size: u64,
    _file: File,
}

// SAFETY: the mapping is only read and written with bounds-checked volatile copies.
unsafe impl Send for FileDataport {}
// SAFETY: as above; concurrent guest access to shared memory is the guest's business.
unsafe impl Sync for FileDataport {}

impl FileDataport {
    /// A dataport no other VM shares (no peer): a memfd, so that it maps into the guest too.
    pub fn anonymous(size: u64) -> Result<FileDataport, EndpointError> {
        let file =
            crate::memory::memfd(c"splitvirt-dataport", size).map_err(|e| EndpointError {
                what: "connector dataport",
                path: "memfd".into(),
                why: e.0,
            })?;
        Self::map(file, size, Path::new("memfd"))
    }

    pub fn open(path: &Path, size: u64) -> Result<FileDataport, EndpointError> {
        let err = |why: String| EndpointError {
            what: "connector dataport",
            path: path.display().to_string(),
            why,
        };
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        // Made here (O_EXCL, mode 0600) or the peer's, never through a symlink, and only a
        // regular file of this user: anything else at the path is someone else's doing.
        let open = |create: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(create)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
        };
        let file = match open(true) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => open(false),
            r => r,
        }
        .map_err(|e| {
            err(format!(
                "cannot open it: {e} (a symlink there is refused; remove whatever is at the \
                 path when no VM runs)"
            ))
        })?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.file_type().is_file() || meta.uid() != me {
            return Err(err(format!(
                "it is not a regular file of this user (uid {}, owner {}): remove it when no \
                 VM runs",
                me,
                meta.uid()
            )));
        }
        let len = meta.len();
        if len == 0 {
            file.set_len(size).map_err(|e| err(e.to_string()))?;
        } else if len != size {
            return Err(err(format!(
                "it holds {len} bytes and this connector's dataport_size is {size}: the peer \
                 uses another size (make them equal, or remove the file when no VM runs)"
            )));
        }
        Self::map(file, size, path)
    }

    fn map(file: File, size: u64, path: &Path) -> Result<FileDataport, EndpointError> {
        Self::map_shared(file, size, path, "connector dataport")
    }

    /// `file`'s first `size` bytes mapped shared, for a guest to reach as memory (`what` and
    /// `path` name it in errors).
    pub fn map_shared(
        file: File,
        size: u64,
        path: &Path,
        what: &'static str,
    ) -> Result<FileDataport, EndpointError> {
        let err = |why: String| EndpointError {
            what,
            path: path.display().to_string(),
            why,
        };
        // SAFETY: a new shared mapping of the whole file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(format!("mmap: {}", std::io::Error::last_os_error())));
        }
        // Huge pages where the file's file system gives them (a tmpfs mounted huge=advise or
        // within_size): each 4 KiB page is a stage-2 fault and a TLB entry of the guest's, and
        // copies through a dataport on 2 MiB pages run 3-4x faster (docs/BENCHMARKS.md).
        // SAFETY: advice on our own new mapping; refused advice changes nothing.
        unsafe { libc::madvise(ptr, size as usize, libc::MADV_HUGEPAGE) };
        Ok(FileDataport {
            ptr: ptr.cast(),
            size,
            _file: file,
        })
    }

    /// Where the dataport is in this process (for mapping it into the guest).
    pub fn host_address(&self) -> u64 {
        self.ptr as u64
    }

    fn range(&self, off: u64, len: usize) -> Option<usize> {
        let end = off.checked_add(len as u64)?;
        (end <= self.size).then_some(off as usize)
    }
}

impl Drop for FileDataport {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.size as usize) };
    }
}

impl Dataport for FileDataport {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, off: u64, data: &mut [u8]) {
        match self.range(off, data.len()) {
            Some(at) => {
                for (i, d) in data.iter_mut().enumerate() {
                    // SAFETY: in bounds (checked above).
                    *d = unsafe { self.ptr.add(at + i).read_volatile() };
                }
            }
            None => data.fill(0),
        }
    }
    fn write(&self, off: u64, data: &[u8]) {
        if let Some(at) = self.range(off, data.len()) {
            for (i, d) in data.iter().enumerate() {
                // SAFETY: in bounds (checked above).
                unsafe { self.ptr.add(at + i).write_volatile(*d) };
            }
        }
    }
}

impl FileDataport {
    /// The event page: a sealed memfd of one page (so that a peer's VMM may map it, and can
    /// never shrink it under us) and a descriptor of it to hand over.
    fn event_page() -> Result<(FileDataport, OwnedFd), EndpointError> {
        let err = |e: std::io::Error| EndpointError {
            what: "connector event page",
            path: "memfd".into(),
            why: e.to_string(),
        };
        let fd = rpc::shm::sealed_memfd(c"splitvirt-connector-events", connector::EVENT_PAGE)
            .map_err(err)?;
        let handed = fd.try_clone().map_err(err)?;
        Ok((
            Self::map(File::from(fd), connector::EVENT_PAGE, Path::new("memfd"))?,
            handed,
        ))
    }
}

/// The event page the guest reads without trapping (mapped read-only at BAR 0 by the
/// hypervisor), whose count the peer's VMM adds to.
impl connector::PageMemory for FileDataport {
    fn read(&self, off: u64, data: &mut [u8]) {
        Dataport::read(self, off, data)
    }
    fn write(&self, off: u64, data: &[u8]) {
        Dataport::write(self, off, data)
    }
    fn count(&self) -> &AtomicU32 {
        // SAFETY: the page is at least EVENT_PAGE bytes (every caller maps one), so the aligned
        // word at REG_EVENTS is in our mapping for as long as &self lives.
        unsafe {
            &*self
                .ptr
                .add(connector::REG_EVENTS as usize)
                .cast::<AtomicU32>()
        }
    }
}

/// The peer's side as its VMM handed it over: its event page, mapped here, and its doorbells
/// for events and for rings.
struct Remote {
    page: FileDataport,
    doorbell: Doorbell,
    ring: Doorbell,
}

/// A descriptor's kind as the kernel names it (`anon_inode:[eventfd]`, say).
fn fd_kind(fd: RawFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Checks that a descriptor another process handed over is an eventfd, and makes it
/// non-blocking: else one whose counter that process filled would hold our writer (a vCPU) in
/// `write`.
pub(crate) fn peer_eventfd(fd: &OwnedFd, what: std::fmt::Arguments<'_>) -> Result<(), String> {
    let kind = fd_kind(fd.as_raw_fd());
    if kind != "anon_inode:[eventfd]" {
        return Err(format!("{what} is {kind:?}, not an eventfd"));
    }
    // SAFETY: fcntl on a descriptor we hold.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Remote {
    /// Checks what a peer handed over (`[page, doorbell, ring]`): a page sealed at its size
    /// (else the peer could shrink it under our accesses) and eventfds, made non-blocking (else
    /// a peer that filled a counter would hold our vCPU in write).
    fn take(fds: Vec<OwnedFd>) -> Result<Remote, String> {
        let [page, doorbell, ring]: [OwnedFd; 3] = fds
            .try_into()
            .map_err(|v: Vec<OwnedFd>| format!("{} descriptors, not 3", v.len()))?;
        rpc::shm::check_sealed(&page, connector::EVENT_PAGE, "its event page")
            .map_err(|e| e.to_string())?;
        for (fd, what) in [(&doorbell, "doorbell"), (&ring, "ring")] {
            peer_eventfd(fd, format_args!("its {what}"))?;
        }
        let page = FileDataport::map(File::from(page), connector::EVENT_PAGE, Path::new("peer"))
            .map_err(|e| e.to_string())?;
        Ok(Remote {
            page,
            doorbell: Doorbell::from_fd(doorbell),
            ring: Doorbell::from_fd(ring),
        })
    }
}

/// The ring's ioeventfd: the peer's ring doorbell, signalled by this VM's hypervisor on a guest
/// write at BAR 0 + REG_RING, for as long as there is a peer and BAR 0 decodes somewhere.
pub struct Ring {
    hv: Option<Box<dyn crate::msiroute::Ioeventfds>>,
    at: Mutex<RingAt>,
}

#[derive(Default)]
struct RingAt {
    bar0: Option<u64>,
    remote: Option<Arc<Remote>>,
    /// What the hypervisor has now: (address, the remote whose ring it signals).
    attached: Option<(u64, Arc<Remote>)>,
}

impl Ring {
    /// BAR 0 now decodes at `at` (None: nowhere).
    pub fn bar0_at(&self, at: Option<u64>) {
        let mut a = self.at.lock().unwrap_or_else(|e| e.into_inner());
        a.bar0 = at;
        self.sync(&mut a);
    }

    fn peer(&self, remote: Option<Arc<Remote>>) {
        let mut a = self.at.lock().unwrap_or_else(|e| e.into_inner());
        a.remote = remote;
        self.sync(&mut a);
    }

    /// The peer of the moment, if there is one.
    fn remote(&self) -> Option<Arc<Remote>> {
        self.at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remote
            .clone()
    }

    fn sync(&self, a: &mut RingAt) {
        let Some(hv) = &self.hv else { return };
        let want = a
            .bar0
            .zip(a.remote.clone())
            .map(|(bar0, r)| (bar0 + connector::REG_RING, r));
        let same = match (&want, &a.attached) {
            (Some((x, r)), Some((y, s))) => x == y && Arc::ptr_eq(r, s),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        if let Some((addr, r)) = a.attached.take() {
            if let Err(e) = hv.detach(r.ring.fd().as_raw_fd(), addr) {
                ratelog::warn!("cannot take a connector's ring from the hypervisor: {e}");
            }
        }
        if let Some((addr, r)) = want {
            match hv.attach(r.ring.fd().as_raw_fd(), addr) {
                Ok(()) => a.attached = Some((addr, r)),
                // Not fatal: the write then exits, and LinkPeer::ring rings it.
                Err(e) => ratelog::warn!("the hypervisor will not catch a connector's ring: {e}"),
            }
        }
    }
}

/// Events to the peer: counted in its page and rung at its doorbell, on the emitting vCPU.
/// Without a peer they are dropped, and the log says so.
struct LinkPeer {
    /// Where the peer is (its ring's state holds the peer of the moment).
    ring: Arc<Ring>,
    name: String,
    dropped: AtomicU64,
}

impl Peer for LinkPeer {
    fn emit(&self) {
        match self.ring.remote() {
            Some(r) => {
                connector::count_event(connector::PageMemory::count(&r.page));
                r.doorbell.ring();
            }
            None => self.drop_one(),
        }
    }

    fn ring(&self) {
        match self.ring.remote() {
            Some(r) => r.ring.ring(),
            None => self.drop_one(),
        }
    }
}

impl LinkPeer {
    fn drop_one(&self) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed);
        if n < 3 || n.is_power_of_two() {
            ratelog::warn!(
                "connector {}: no peer; event dropped ({} so far)",
                self.name,
                n + 1
            );
        }
    }
}

/// The connector's interrupt. INTx through the device's signal; MSI-X vector 0 through the
/// doorbell, which the hypervisor turns into the interrupt the guest programmed (an irqfd)
/// while the vector is routed into the GICv2m frame. While no irqfd carries the doorbell, the
/// doorbell's thread (`watch`) delivers what rings it.
struct Irq {
    doorbell: Doorbell,
    /// The peer's rings: counted here unless the vector is routed.
    rings: Doorbell,
    signal: Arc<dyn virtio::transport::Signal>,
    irqfds: Option<Box<dyn crate::msiroute::Irqfds>>,
    frame: Option<V2m>,
    /// (message, GSI its irqfd is attached to) of vector 0 now.
    routed: Mutex<(Option<Message>, Option<u32>)>,
    /// Whether the thread must watch the doorbell (no irqfd carries it).
    watched: AtomicBool,
    /// Rung when `watched` changes, to wake the thread.
    ctl: Doorbell,
}

impl Irq {
    fn new(
        signal: Arc<dyn virtio::transport::Signal>,
        irqfds: Option<Box<dyn crate::msiroute::Irqfds>>,
        frame: Option<V2m>,
    ) -> std::io::Result<Irq> {
        Ok(Irq {
            doorbell: Doorbell::new()?,
            rings: Doorbell::new()?,
            signal,
            irqfds,
            frame,
            routed: Mutex::new((None, None)),
            watched: AtomicBool::new(true),
            ctl: Doorbell::new()?,
        })
    }

    /// Waits for rings while no irqfd carries them and hands each to `events` (which raises
    /// the INTx level, or the MSI itself, from the count). Runs for the VM's life.
    fn watch(self: Arc<Self>, events: Arc<connector::Events>) {
        loop {
            let watched = self.watched.load(Ordering::Acquire);
            let mut p = [
                libc::pollfd {
                    fd: self.ctl.fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.doorbell.fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.rings.fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let n = if watched { 3 } else { 1 };
            // SAFETY: poll on descriptors we hold.
            if unsafe { libc::poll(p.as_mut_ptr(), n, -1) } < 0 {
                continue;
            }
            let mut rings = 0u64;
            for q in &p[..n as usize] {
                if q.revents & libc::POLLIN != 0 {
                    let mut v = 0u64;
                    // SAFETY: an 8-byte read into a local from an eventfd we hold.
                    unsafe { libc::read(q.fd, (&mut v as *mut u64).cast(), 8) };
                    if q.fd == self.rings.fd().as_raw_fd() {
                        rings = v;
                    }
                }
            }
            // Each ring the hypervisor could not deliver itself (bounded: the counter holds
            // what a peer wrote, and one delivery covers any number of them under MSI-X).
            for _ in 0..rings.min(1024) {
                events.ring();
            }
            if watched && p[1].revents & libc::POLLIN != 0 {
                events.deliver();
            }
        }
    }
}

impl Interrupt for Irq {
    fn set_level(&self, high: bool) {
        self.signal.intx(high);
    }

    fn route(&self, msi: Option<Message>) {
        let want = msi.and_then(|m| crate::msiroute::gsi_of(self.frame.as_ref(), m));
        let mut r = self.routed.lock().unwrap_or_else(|e| e.into_inner());
        r.0 = msi;
        if let Some(hv) = &self.irqfds {
            let fds = [self.doorbell.fd().as_raw_fd(), self.rings.fd().as_raw_fd()];
            r.1 = crate::msiroute::reroute(
                &**hv,
                &fds,
                r.1,
                want,
                format_args!("a connector's MSI-X vector"),
            );
        }
        self.watched.store(r.1.is_none(), Ordering::Release);
        self.ctl.ring();
    }

    fn fire(&self) {
        let r = *self.routed.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            (_, Some(_)) => self.doorbell.ring(),
            (Some(msg), None) => self.signal.msi(msg),
            (None, None) => {}
        }
    }
}

/// Memory of this process that the hypervisor maps into the guest (a dataport, an event page).
#[derive(Clone, Copy, Debug)]
pub struct HostMemory {
    pub addr: u64,
    pub size: u64,
    /// The guest reads it; its writes exit to splitvirt.
    pub read_only: bool,
}

/// Where a connector's memory is in this process: the event page (for BAR 0, read-only) and
/// the dataport (BAR 1); and its ring, which follows BAR 0.
#[derive(Clone)]
pub struct ConnectorMemory {
    pub event_page: HostMemory,
    pub dataport: HostMemory,
    pub ring: Arc<Ring>,
}

/// What a connector takes from the hypervisor, where it offers it: irqfds for its MSI-X vector
/// and an ioeventfd for its ring.
pub struct Hv {
    pub irqfds: Option<Box<dyn crate::msiroute::Irqfds>>,
    pub ioeventfds: Option<Box<dyn crate::msiroute::Ioeventfds>>,
}

impl Hv {
    /// Nothing: interrupts through the signal, rings through exits.
    pub fn none() -> Hv {
        Hv {
            irqfds: None,
            ioeventfds: None,
        }
    }
}

/// A connector function, the threads that carry its peer's events (None without a peer) and
/// its memory. Its interrupts go through `signal` (INTx, and MSIs the VMM writes) and, where
/// `hv` offers them, irqfds for its MSI-X vector within `frame`.
pub fn build(
    d: &layout::Device,
    name: &str,
    dataport_size: u64,
    peer: Option<&str>,
    signal: Arc<dyn virtio::transport::Signal>,
    frame: Option<V2m>,
    hv: Hv,
) -> Result<(Connector, Option<crate::devices::Starter>, ConnectorMemory), EndpointError> {
    let bars = connector::Bars {
        event_page: d.bars.first().map_or(0, |b| b.base),
        dataport: d.bars.get(1).map_or(0, |b| b.base),
        msix: d.bars.get(2).map(|b| b.base),
    };
    let irq = Arc::new(
        Irq::new(signal, hv.irqfds, frame).map_err(|e| EndpointError {
            what: "connector doorbell",
            path: "eventfd".into(),
            why: e.to_string(),
        })?,
    );
    let (port, link) = match peer {
        None => (FileDataport::anonymous(dataport_size)?, None),
        Some(path) => {
            let path = Path::new(path);
            let mut dataport_path = path.as_os_str().to_owned();
            dataport_path.push(".dataport");
            let port = FileDataport::open(Path::new(&dataport_path), dataport_size)?;
            let mut hello = b"splitvirt connector 2\0".to_vec();
            hello.extend_from_slice(&dataport_size.to_le_bytes());
            hello.extend_from_slice(name.as_bytes());
            (port, Some(Link::with_hello(path, "connector", hello)?))
        }
    };
    let (page, page_fd) = FileDataport::event_page()?;
    let page = Arc::new(page);
    let ring_hv = Arc::new(Ring {
        hv: hv.ioeventfds,
        at: Mutex::default(),
    });
    let host = ConnectorMemory {
        ring: ring_hv.clone(),
        event_page: HostMemory {
            addr: page.host_address(),
            size: connector::EVENT_PAGE,
            read_only: true,
        },
        dataport: HostMemory {
            addr: port.host_address(),
            size: dataport_size,
            read_only: false,
        },
    };
    let p = Arc::new(LinkPeer {
        ring: ring_hv.clone(),
        name: name.to_owned(),
        dropped: AtomicU64::new(0),
    });
    let c = Connector::new(
        name,
        bars,
        d.intx_pin as u8,
        irq.clone(),
        p,
        Arc::new(port),
        page,
    );
    let events = c.events();
    let start = match link {
        None => None,
        Some(link) => {
            let dup = |fd: &OwnedFd| {
                fd.try_clone().map_err(|e| EndpointError {
                    what: "connector doorbell",
                    path: "eventfd".into(),
                    why: e.to_string(),
                })
            };
            let ours = vec![page_fd, dup(irq.doorbell.fd())?, dup(irq.rings.fd())?];
            let on_peer = Box::new(move |fds: Option<Vec<OwnedFd>>| {
                ring_hv.peer(fds.map(Remote::take).transpose()?.map(Arc::new));
                Ok(())
            });
            let link = link.offering(Offer { fds: ours, on_peer });
            let start: crate::devices::Starter = Box::new(move || {
                // Events arrive through the page and the doorbell; the link carries none.
                link.serve(Box::new(|_packet: &[u8]| {}));
                std::thread::spawn(move || irq.watch(events));
            });
            Some(start)
        }
    };
    Ok((c, start, host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use layout::layout::SPI_BASE_INTID;
    use pci::PciFunction;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[derive(Default)]
    struct Levels(Mutex<Vec<bool>>);
    impl virtio::transport::Signal for Levels {
        fn msi(&self, _: (u64, u32)) {}
        fn intx(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }

    /// A connector of `d` with no hypervisor help: interrupts through `levels`, rings by exit.
    fn plain(
        d: &layout::Device,
        name: &str,
        size: u64,
        peer: Option<&str>,
        levels: Arc<Levels>,
    ) -> Result<(Connector, Option<crate::devices::Starter>, ConnectorMemory), EndpointError> {
        build(d, name, size, peer, levels, None, Hv::none())
    }

    fn device() -> layout::Device {
        let toml = "[[device]]\nkind = \"connector\"\nname = \"storage\"\ndataport_size = \"8K\"\n";
        let d = layout::Description::parse(toml, "t.toml").unwrap();
        layout::resolve(&d).unwrap().layout.devices.remove(0)
    }

    fn r32(c: &mut Connector, bar: usize, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.bar_read(bar, off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The dataport file is made 0600 and never opened through a symlink someone put there.
    #[test]
    fn the_dataport_file_is_private_and_no_symlink_is_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock.dataport");
        drop(FileDataport::open(&path, 8192).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The peer's file is taken as it is.
        FileDataport::open(&path, 8192).unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, [0u8; 8192]).unwrap();
        let link = dir.path().join("l.sock.dataport");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = FileDataport::open(&link, 8192).err().unwrap().to_string();
        assert!(e.contains("symlink"), "{e}");
    }

    #[test]
    fn two_vms_share_the_dataport_and_their_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storage.sock");
        let d = device();
        let mut ends = Vec::new();
        for _ in 0..2 {
            let levels = Arc::new(Levels::default());
            let (c, start, _) =
                plain(&d, "storage", 0x2000, path.to_str(), levels.clone()).unwrap();
            start.unwrap()();
            ends.push((c, levels));
        }
        let (mut b, lb) = ends.pop().unwrap();
        let (mut a, _la) = ends.pop().unwrap();
        // The dataport is one piece of memory.
        a.bar_write(1, 0x10, b"ping");
        let mut got = [0u8; 4];
        b.bar_read(1, 0x10, &mut got);
        assert_eq!(&got, b"ping");
        // Events: emit until the link is up, then B counts them, and its doorbell's thread
        // raises its line.
        let deadline = Instant::now() + Duration::from_secs(10);
        while r32(&mut b, 0, connector::REG_EVENTS) == 0 {
            assert!(Instant::now() < deadline, "no event crossed");
            a.bar_write(0, connector::REG_EMIT, &[1]);
            std::thread::sleep(Duration::from_millis(20));
        }
        while lb.0.lock().unwrap().last() != Some(&true) {
            assert!(Instant::now() < deadline, "B's line never rose");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Exact counts once the link is up: each emit is one more in B's page, at once.
        b.bar_write(0, connector::REG_EVENTS, &0u32.to_le_bytes());
        assert_eq!(lb.0.lock().unwrap().last(), Some(&false));
        for n in 1..=100 {
            a.bar_write(0, connector::REG_EMIT, &[1]);
            assert_eq!(r32(&mut b, 0, connector::REG_EVENTS), n);
        }
        b.bar_write(0, connector::REG_EVENTS, &60u32.to_le_bytes());
        assert_eq!(r32(&mut b, 0, connector::REG_EVENTS), 40);
        // A ring that no hypervisor caught exits, crosses to B's ring doorbell, and B's thread
        // counts it as an event (B takes INTx).
        a.bar_write(0, connector::REG_RING, &[1]);
        while r32(&mut b, 0, connector::REG_EVENTS) != 41 {
            assert!(Instant::now() < deadline, "the ring never reached B");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Records irqfd (GSI) and ioeventfd (address) attach and detach calls as (what, attached).
    #[derive(Default, Clone)]
    struct Calls(Arc<Mutex<Vec<(u64, bool)>>>);
    impl Calls {
        fn push(&self, what: u64, on: bool) -> std::io::Result<()> {
            self.0.lock().unwrap().push((what, on));
            Ok(())
        }
    }
    impl crate::msiroute::Irqfds for Calls {
        fn attach(&self, _: RawFd, gsi: u32) -> std::io::Result<()> {
            self.push(gsi.into(), true)
        }
        fn detach(&self, _: RawFd, gsi: u32) -> std::io::Result<()> {
            self.push(gsi.into(), false)
        }
    }
    impl crate::msiroute::Ioeventfds for Calls {
        fn attach(&self, _: RawFd, addr: u64) -> std::io::Result<()> {
            self.push(addr, true)
        }
        fn detach(&self, _: RawFd, addr: u64) -> std::io::Result<()> {
            self.push(addr, false)
        }
    }

    /// The guest routes the connector's MSI-X vector into the frame: the doorbell becomes an
    /// irqfd of that SPI (nowhere else), and an event rings it rather than raising INTx.
    #[test]
    fn a_routed_vector_makes_the_doorbell_an_irqfd_of_its_spi() {
        let l = layout::resolve(
            &layout::Description::parse(
                "[[device]]\nkind = \"connector\"\nname = \"c\"\ndataport_size = \"8K\"\n",
                "t.toml",
            )
            .unwrap(),
        )
        .unwrap()
        .layout;
        let (d, v2m) = (l.devices[0].clone(), l.v2m.clone().unwrap());
        assert_eq!(d.bars.len(), 3, "BAR 2 holds the MSI-X table");
        let (fds, levels) = (Calls::default(), Arc::new(Levels::default()));
        let hv = Hv {
            irqfds: Some(Box::new(fds.clone())),
            ioeventfds: None,
        };
        let (mut c, _, _) =
            build(&d, "c", 0x2000, None, levels.clone(), Some(v2m.clone()), hv).unwrap();
        let events = c.events();
        let mut cap = [0u8];
        c.config_read(0x34, &mut cap);
        let cap = u64::from(cap[0]);
        let doorbell = v2m.region.base + platform::gicv2m::MSI_SETSPI_NS;
        // Outside the frame's SPIs first: routed nowhere.
        for (addr, data, gsi) in [
            (doorbell, v2m.spi_base + v2m.spi_count, None),
            (
                doorbell,
                v2m.spi_base + 2,
                Some(v2m.spi_base + 2 - SPI_BASE_INTID),
            ),
        ] {
            c.bar_write(2, 0, &(addr as u32).to_le_bytes());
            c.bar_write(2, 8, &data.to_le_bytes());
            c.bar_write(2, 12, &0u32.to_le_bytes());
            c.config_write(cap + 2, &0x8000u16.to_le_bytes());
            let attached: Vec<u64> = fds
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, on)| *on)
                .map(|(g, _)| *g)
                .collect();
            assert_eq!(
                attached.last().copied(),
                gsi.map(u64::from),
                "message {addr:#x}/{data}"
            );
        }
        let before = levels.0.lock().unwrap().len();
        events.arrive();
        assert_eq!(
            levels.0.lock().unwrap().len(),
            before,
            "no INTx under MSI-X"
        );
        // MSI-X off: detached, back to INTx, the waiting event's level up.
        c.config_write(cap + 2, &0u16.to_le_bytes());
        assert_eq!(fds.0.lock().unwrap().last().map(|x| x.1), Some(false));
        assert_eq!(levels.0.lock().unwrap().last(), Some(&true));
    }

    /// What a peer hands over is checked before it is used: a page not sealed at its size or a
    /// doorbell that is not an eventfd refuses the peer.
    #[test]
    fn a_peers_descriptors_are_checked() {
        let sealed = || rpc::shm::sealed_memfd(c"t", connector::EVENT_PAGE).unwrap();
        let bell = || crate::msiroute::new_eventfd().unwrap();
        let loose = tempfile::tempfile().unwrap();
        loose.set_len(connector::EVENT_PAGE).unwrap();
        let other_size = rpc::shm::sealed_memfd(c"t", 2 * connector::EVENT_PAGE).unwrap();
        let (pipe, _w) = std::io::pipe().unwrap();
        for (fds, want) in [
            (vec![loose.into(), bell(), bell()], "sealed"),
            (vec![other_size, bell(), bell()], "not 4096"),
            (vec![sealed(), OwnedFd::from(pipe), bell()], "doorbell is"),
            (vec![sealed(), bell(), sealed()], "ring is"),
            (vec![sealed(), bell()], "not 3"),
        ] {
            let e = Remote::take(fds).err().unwrap();
            assert!(e.contains(want), "{e}");
        }
        let r = Remote::take(vec![sealed(), bell(), bell()]).unwrap();
        connector::count_event(connector::PageMemory::count(&r.page));
        for bell in [&r.doorbell, &r.ring] {
            bell.ring();
            assert!(bell.wait(Some(Duration::ZERO)), "rung");
        }
    }

    /// The ring is the hypervisor's while there is a peer and BAR 0 decodes: caught at
    /// BAR 0 + REG_RING, moved with BAR 0, released when the peer goes.
    #[test]
    fn the_ring_follows_bar_0_and_the_peer() {
        let catches = Calls::default();
        let ring = Ring {
            hv: Some(Box::new(catches.clone())),
            at: Mutex::default(),
        };
        let bell = || crate::msiroute::new_eventfd().unwrap();
        let page = rpc::shm::sealed_memfd(c"t", connector::EVENT_PAGE).unwrap();
        let remote = Arc::new(Remote::take(vec![page, bell(), bell()]).unwrap());
        ring.bar0_at(Some(0x1000_0000));
        assert!(catches.0.lock().unwrap().is_empty(), "no peer yet");
        ring.peer(Some(remote));
        ring.bar0_at(Some(0x2000_0000));
        ring.bar0_at(None);
        ring.bar0_at(Some(0x2000_0000));
        ring.peer(None);
        let r = connector::REG_RING;
        assert_eq!(
            *catches.0.lock().unwrap(),
            [
                (0x1000_0000 + r, true),
                (0x1000_0000 + r, false),
                (0x2000_0000 + r, true),
                (0x2000_0000 + r, false),
                (0x2000_0000 + r, true),
                (0x2000_0000 + r, false),
            ]
        );
    }

    #[test]
    fn bar_1_moves_are_reported_for_mapping() {
        let d = device();
        let (c, _, _) = plain(&d, "m", 0x2000, None, Arc::default()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut m = pci::BarWatch::new(
            Box::new(c),
            1,
            Box::new(move |a| s2.lock().unwrap().push(a)),
        );
        m.config_write(0x04, &[2, 0]); // memory decoding on
        m.config_write(0x14, &0x2000_0000u32.to_le_bytes()); // BAR 1 moved
        m.config_write(0x04, &[0, 0]); // off
        let bar1 = d.bars[1].base;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Some(bar1), Some(0x2000_0000), None]
        );
    }

    #[test]
    fn a_peer_with_another_size_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let d = device();
        plain(&d, "storage", 0x2000, path.to_str(), Arc::default()).unwrap();
        let e = plain(&d, "storage", 0x4000, path.to_str(), Arc::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("8192") && e.contains("16384"), "{e}");
    }

    #[test]
    fn without_a_peer_events_are_dropped_and_the_vm_goes_on() {
        let d = device();
        let (mut c, start, host) = plain(&d, "alone", 0x1000, None, Arc::default()).unwrap();
        for m in [host.dataport, host.event_page] {
            assert_eq!((m.size, m.addr % 4096), (0x1000, 0), "mappable");
        }
        assert!(host.event_page.read_only && !host.dataport.read_only);
        // The mapped event page holds what the guest reads there: the name at 0x8.
        // SAFETY: the page is mapped for as long as `c` lives.
        let name =
            unsafe { std::slice::from_raw_parts((host.event_page.addr + 8) as *const u8, 6) };
        assert_eq!(name, b"alone\0");
        assert!(start.is_none());
        c.bar_write(0, connector::REG_EMIT, &[1]);
        c.bar_write(1, 0, b"x");
        let mut got = [0u8];
        c.bar_read(1, 0, &mut got);
        assert_eq!(&got, b"x");
    }
}
