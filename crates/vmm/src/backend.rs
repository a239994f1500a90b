//! splitvirt's side of the device models in a separate process (docs/RPC.md; the process
//! itself is the `backend` crate). `start` runs `splitvirt backend` (or reaches one that
//! listens), hands it the pool memfd, the control region, its doorbells and eventfds and its
//! devices' host ends over a socket, checks what it registers, and returns proxy functions for
//! the ECAM; `Watch` replaces a backend that dies; `listen` is `splitvirt backend --listen`.

use crate::devices;
use crate::kept::{Kept, Watched};
use crate::reaper::Reaper;
use layout::Layout;
use pci::ecam::{devfn, DevFn};
use pci::PciFunction;

use rpc::{Doorbell, Event, Proxy, Region, Registration, RemoteFunction};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a vCPU waits for a read from the backend before it reads all ones.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the backend may take to open its devices and register them.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);
/// The same for a device VM, whose splitvirt takes the connection at once but whose guest may
/// still be booting: waited for while its splitvirt holds the connection, up to this.
const DEVICE_VM_REGISTER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend: {0}")]
    Setup(String),
    #[error(transparent)]
    Devices(#[from] devices::OpenError),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
}

/// Eventfds by which the hypervisor and the backend reach each other with splitvirt out of
/// the way (none: everything travels as messages). Kept for the life of the VM: a restarted
/// backend gets them again.
#[derive(Default)]
pub struct Bypass {
    /// One eventfd per MSI-X vector of each backend device, routed by the hypervisor to the
    /// SPI the guest programmed into that vector: the backend's devices raise their own MSIs
    /// through them, and no one else's.
    pub msi: Option<Arc<crate::msiroute::MsiRoutes>>,
    /// Per device, an eventfd the hypervisor rings when the guest notifies one of its queues
    /// (ioeventfd): the notification reaches the backend without an exit to splitvirt.
    pub notify: Vec<(u8, OwnedFd)>,
    /// Called when a restarted backend has taken the devices over (the hypervisor's
    /// notification eventfds, detached when the backend died, go back on).
    pub reattached: Option<Box<dyn Fn() + Send + Sync>>,
}

/// Everything a backend process is started from, kept to start another one.
struct Launch {
    layout: Layout,
    exe: PathBuf,
    config: Option<PathBuf>,
    pool: (u64, u64),
    pool_fd: File,
    bypass: Bypass,
    events: Arc<dyn Fn(Event) + Send + Sync>,
    /// What the devices reach on the host, opened here and handed to each backend.
    hosts: hostio::hostends::HostEnds,
    /// Which devices' drivers enabled MSI-X: their INTx from the backend is dropped.
    msix_on: Arc<crate::kept::MsixFlags>,
}

/// A backend just started (or reached), its devices registered and checked.
struct Started {
    proxy: Arc<Proxy>,
    /// None for a backend reached through `[backend] connect`.
    child: Option<Child>,
    sock: OwnedFd,
    regs: Vec<Registration>,
}

/// How long splitvirt tries to reach a listening backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `splitvirt backend --setup-fd 3` on `setup`. `bound` (a backend of this VM's own)
/// ties its life to ours (the parent-death signal follows the forking *thread*: a restarted
/// backend is forked by the watch thread, which lives as long as that backend does). Its stdin
/// is /dev/null and its stdout and stderr are pipes to us: it never holds the operator's
/// terminal or a log file.
fn spawn_backend(
    exe: &Path,
    config: Option<&Path>,
    setup: &OwnedFd,
    bound: bool,
) -> std::io::Result<Child> {
    use std::process::Stdio;
    let mut cmd = Command::new(exe);
    // `ps` shows "splitvirt backend ..." rather than the path it was started by.
    std::os::unix::process::CommandExt::arg0(&mut cmd, "splitvirt");
    cmd.arg("backend").arg("--setup-fd").arg("3");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    // Its log lines come through splitvirt (or the listener), which logs them where it logs
    // its own: it holds no terminal and no log file.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove(crate::LOG_FILE_ENV);
    rpc::setup::pass_as_fd3(&mut cmd, setup.as_raw_fd());
    // SAFETY: between fork and exec only an async-signal-safe call: prctl.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if bound {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        // The guest's stdio console, when the backend serves it.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut { out }, &mut std::io::stdout());
        });
    }
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || relay_log(err));
    }
    Ok(child)
}

/// The backend's log lines, logged here at their level with "backend:" in front, each cut
/// at 1 KiB and rate-limited like anything else a backend can provoke.
fn relay_log(from: impl std::io::Read) {
    use std::io::BufRead;
    use std::io::Read;
    let mut r = std::io::BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut r).take(1024).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        let body = text.strip_prefix("splitvirt-backend: ").unwrap_or(text);
        let (level, body) = [
            ("error: ", log::Level::Error),
            ("warning: ", log::Level::Warn),
            ("debug: ", log::Level::Debug),
            ("trace: ", log::Level::Trace),
        ]
        .into_iter()
        .find_map(|(tag, level)| body.strip_prefix(tag).map(|b| (level, b)))
        .unwrap_or((log::Level::Info, body));
        ratelog::log!(level, "backend: {body}");
    }
}

/// A descriptor that names process `pid` for as long as it is held, even after it is reaped.
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SIGKILL to the process a pidfd names; ESRCH once it has ended, never another process.
fn kill_by_pidfd(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to a listening backend, trying again until `CONNECT_TIMEOUT`.
fn connect(path: &Path) -> Result<OwnedFd, BackendError> {
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        match rpc::setup::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if std::time::Instant::now() >= deadline => {
                return Err(BackendError::Setup(format!(
                    "cannot reach the backend at {} ({e}); start `splitvirt backend --listen {} \
                     --config FILE` there first, with this VM's description",
                    path.display(),
                    path.display()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Who a listening backend serves, how many at once, and how long a VM has to send its setup.
#[derive(Clone, Debug)]
pub struct ListenPolicy {
    /// User ids whose connections are served (the kernel's record of the peer, SO_PEERCRED).
    pub allow_uids: Vec<u32>,
    /// VMs served at once; a connection past it is closed.
    pub max_vms: usize,
    /// A connection that sends no setup within this is closed before any process serves it.
    pub setup_timeout: Duration,
}

impl ListenPolicy {
    /// Only this process's own user, 16 VMs, 20 s for the setup.
    pub fn own_user() -> ListenPolicy {
        ListenPolicy {
            // SAFETY: geteuid cannot fail.
            allow_uids: vec![unsafe { libc::geteuid() }],
            max_vms: 16,
            setup_timeout: Duration::from_secs(20),
        }
    }
}

/// A listening setup socket at `socket`. A socket left by an earlier listener is replaced;
/// any other file is not touched.
pub(crate) fn listen_at(socket: &Path) -> Result<OwnedFd, BackendError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        if !m.file_type().is_socket() {
            return Err(BackendError::Setup(format!(
                "{} exists and is not a socket: remove it or listen elsewhere",
                socket.display()
            )));
        }
        std::fs::remove_file(socket)?;
    }
    Ok(rpc::setup::listen(socket)?)
}

/// `splitvirt backend --listen SOCKET`: each VM that connects (its description says
/// `[backend] connect = SOCKET`) is served by a backend process of its own, started as
/// `splitvirt run` would start it, which lives as long as that VM's connection. Who may
/// connect, how many at once and how long a setup may take come from `policy`.
pub fn listen(
    socket: &Path,
    exe: &Path,
    config: Option<&Path>,
    policy: &ListenPolicy,
) -> Result<(), BackendError> {
    use std::sync::atomic::AtomicUsize;
    let listener = listen_at(socket)?;
    log::info!(
        "listening on {} (users {:?}, at most {} VMs)",
        socket.display(),
        policy.allow_uids,
        policy.max_vms
    );
    let serving = Arc::new(AtomicUsize::new(0));
    loop {
        let conn = match rpc::setup::accept(&listener) {
            Ok(c) => c,
            Err(e) => {
                ratelog::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match rpc::setup::peer_uid(&conn) {
            Ok(uid) if policy.allow_uids.contains(&uid) => {}
            Ok(uid) => {
                ratelog::warn!("refused a connection from uid {uid}: not an allowed user");
                continue;
            }
            Err(e) => {
                ratelog::warn!("refused a connection whose user is unknown: {e}");
                continue;
            }
        }
        if serving.load(Ordering::Acquire) >= policy.max_vms {
            ratelog::warn!(
                "refused a connection: already serving {} VMs",
                policy.max_vms
            );
            continue;
        }
        serving.fetch_add(1, Ordering::AcqRel);
        let (serving, exe, config) = (serving.clone(), exe.to_owned(), config.map(Path::to_owned));
        let timeout = policy.setup_timeout;
        std::thread::spawn(move || {
            // No process for a connection that sends nothing.
            match rpc::setup::readable_within(&conn, timeout) {
                Ok(true) => match spawn_backend(&exe, config.as_deref(), &conn, false) {
                    Ok(mut child) => {
                        let pid = child.id();
                        ratelog::info!("a VM connected; process {pid} serves it");
                        drop(conn);
                        let status = child.wait();
                        ratelog::info!("process {pid} ended ({status:?})");
                    }
                    Err(e) => ratelog::error!("cannot start a backend process: {e}"),
                },
                Ok(false) => {
                    ratelog::warn!("closed a connection that sent no setup within {timeout:?}")
                }
                Err(e) => ratelog::warn!("a connection failed before its setup: {e}"),
            }
            serving.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The backend process of the moment.
struct Current {
    child: Mutex<Option<Child>>,
    /// A copy of the setup socket, to hang up on a backend splitvirt did not start.
    sock: Mutex<Option<OwnedFd>>,
    proxy: Arc<rpc::Link>,
    /// Set when splitvirt ends the backend itself (no "backend lost", no restart then).
    stopping: AtomicBool,
}

/// Host input for a console.
pub type Input = Box<dyn Fn(&[u8]) + Send>;

/// The backend, as the VMM holds it.
pub struct Remote {
    pub functions: Vec<(DevFn, Box<dyn PciFunction>)>,
    /// The console device whose input comes from splitvirt's stdin, if it is remote.
    pub stdio_console: Option<u8>,
    current: Arc<Current>,
}

impl Remote {
    /// The backend process of the moment (0 between a death and a restart).
    pub fn pid(&self) -> u32 {
        lock(&self.current.child).as_ref().map_or(0, |c| c.id())
    }

    /// The proxy to the backend of the moment.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.proxy.get()
    }

    /// Host input for the stdio console, for whichever backend serves it.
    pub fn console_input(&self) -> Option<Input> {
        let (dev, link) = (self.stdio_console?, self.current.proxy.clone());
        Some(Box::new(move |b: &[u8]| link.get().input(dev, b)))
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.current.stopping.store(true, Ordering::Release);
        if let Some(mut c) = lock(&self.current.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(s) = lock(&self.current.sock).take() {
            // SAFETY: shutting down our own socket.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Launch {
    /// Starts a backend process and waits for its devices, which must be the description's.
    fn start(&self) -> Result<Started, BackendError> {
        let hosts = self.hosts.for_backend()?;
        let region = Arc::new(Region::create()?);
        let (to_backend, to_proxy, replies) =
            (Doorbell::new()?, Doorbell::new()?, Doorbell::new()?);
        let (ours, mut child) = match &self.layout.rpc_connect {
            Some(path) => (connect(path)?, None),
            None => {
                let (ours, theirs) = rpc::setup::socketpair()?;
                // The backend ends with splitvirt, whatever happens to splitvirt.
                let child = spawn_backend(&self.exe, self.config.as_deref(), &theirs, true)
                    .map_err(|e| {
                        BackendError::Setup(format!("cannot start `splitvirt backend`: {e}"))
                    })?;
                (ours, Some(child))
            }
        };
        let end = |child: &mut Option<Child>| {
            if let Some(c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
        };
        let msi_fds = self.bypass.msi.as_ref().map_or(Vec::new(), |m| m.fds());
        rpc::setup::send(
            &ours,
            self.pool.0,
            self.pool.1,
            [
                self.pool_fd.as_raw_fd(),
                region.fd().as_raw_fd(),
                to_backend.fd().as_raw_fd(),
                to_proxy.fd().as_raw_fd(),
                replies.fd().as_raw_fd(),
            ],
            &msi_fds,
            &self
                .bypass
                .notify
                .iter()
                .map(|(dev, fd)| (*dev, fd.as_raw_fd()))
                .collect::<Vec<_>>(),
            &hosts
                .iter()
                .map(|(dev, fd)| (*dev, fd.as_raw_fd()))
                .collect::<Vec<_>>(),
        )?;
        drop(hosts);
        // A backend that breaks the protocol is ended (a connected one is hung up on), so
        // that what follows its death follows. The process is held by a pidfd: once the
        // watch thread has reaped it, its pid may be another process's, the pidfd never.
        let pidfd = match child.as_ref().map(|c| pidfd_open(c.id())).transpose() {
            Ok(fd) => fd,
            Err(e) => {
                end(&mut child);
                return Err(BackendError::Setup(format!(
                    "pidfd_open on the backend process: {e} (Linux 5.3 or later is needed)"
                )));
            }
        };
        let (hangup, events) = (ours.try_clone()?, self.events.clone());
        let msix_on = self.msix_on.clone();
        let events = Box::new(move |e: Event| {
            match e {
                Event::Intx { dev, level: true } if msix_on.get(dev) => {
                    ratelog::warn!(
                        "the backend raised INTx for device {dev}, whose driver uses MSI-X; \
                         dropped"
                    );
                    return;
                }
                // A device raises its MSIs through its own vectors' eventfds (`msiroute`),
                // which reach only what the guest programmed into that device's table: an
                // MSI sent as a message could name any SPI, so none is taken.
                Event::Msi { dev, addr, data } => {
                    ratelog::warn!(
                        "the backend sent an MSI message ({addr:#x}, {data}) for device {dev}; \
                         its vectors have eventfds of their own, so it is refused"
                    );
                    return;
                }
                _ => {}
            }
            if matches!(e, Event::Dead(_)) {
                match &pidfd {
                    // An error means it has ended already: nothing to do.
                    Some(fd) => {
                        let _ = kill_by_pidfd(fd);
                    }
                    // SAFETY: shutting down our own socket.
                    None => unsafe {
                        libc::shutdown(hangup.as_raw_fd(), libc::SHUT_RDWR);
                    },
                };
            }
            events(e)
        });
        let proxy = Proxy::start_with(
            region,
            to_backend,
            to_proxy,
            replies,
            events,
            READ_TIMEOUT,
            self.layout.rpc_poll,
        );
        let wait = if self.layout.rpc_device_vm {
            DEVICE_VM_REGISTER_TIMEOUT
        } else {
            REGISTER_TIMEOUT
        };
        let Some(regs) = registrations(&proxy, &ours, wait) else {
            let status = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            end(&mut child);
            return Err(BackendError::Setup(match status {
                Some(s) => format!("the backend ended ({s}) before registering its devices"),
                None => {
                    format!("the backend registered no devices within {wait:?}, or hung up first")
                }
            }));
        };
        let wanted: Vec<&layout::Device> = self.layout.backend_devices().collect();
        if let Err(e) = check_registrations(&wanted, &regs) {
            end(&mut child);
            return Err(e);
        }
        Ok(Started {
            proxy,
            child,
            sock: ours,
            regs,
        })
    }
}

/// The devices `proxy`'s backend registers within `wait`; None at once if the other end of
/// `sock` hangs up first.
fn registrations(proxy: &Proxy, sock: &OwnedFd, wait: Duration) -> Option<Vec<Registration>> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if let Some(r) = proxy.registrations(left.min(Duration::from_secs(1))) {
            return Some(r);
        }
        if left.is_zero() || proxy.is_dead() || hung_up(sock) {
            return None;
        }
    }
}

/// Whether the other end of `sock` has gone.
fn hung_up(sock: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one pollfd of ours, without waiting.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

/// Every device of the description, registered as described.
fn check_registrations(
    wanted: &[&layout::Device],
    regs: &[Registration],
) -> Result<(), BackendError> {
    for d in wanted {
        let slot = d.slot as u8;
        let Some(r) = regs.iter().find(|r| r.dev == slot) else {
            return Err(BackendError::Setup(format!(
                "the backend did not register the {} at slot {slot}",
                d.kind.label()
            )));
        };
        // All of it: the BAR's width and prefetchability decide where the guest may put it,
        // the pin which INTx line the device's level reaches.
        let bar = d.bars.first();
        let expect = (
            d.kind.pci_id(),
            bar.map(|b| (b.size, b.is_64bit, b.prefetchable)),
            d.intx_pin as u8,
        );
        let got = (
            (r.vendor, r.device),
            Some((r.bar0_size, r.bar0_64bit, r.bar0_prefetchable)),
            r.intx_pin,
        );
        if got != expect {
            return Err(BackendError::Setup(format!(
                "the backend registered {:04x}:{:04x} at slot {slot} with a {:#x}-byte{}{} BAR 0 \
                 and INTx pin {}; the description has a {} there ({:?})",
                r.vendor,
                r.device,
                r.bar0_size,
                if r.bar0_64bit { " 64-bit" } else { " 32-bit" },
                if r.bar0_prefetchable {
                    " prefetchable"
                } else {
                    ""
                },
                r.intx_pin,
                d.kind.label(),
                expect
            )));
        }
    }
    Ok(())
}

/// Starts the backend for `l`'s backend devices (None when there are none). `exe` is the
/// splitvirt binary (`/proc/self/exe` in splitvirt itself). When the backend dies, its
/// virtio-blk requests fail, and a new backend is started (up to `[backend] restarts`
/// times) that takes the devices over where they stood.
pub fn start(
    l: &Layout,
    exe: &Path,
    config: Option<&Path>,
    pool_fd: Option<&File>,
    events: Arc<dyn Fn(Event) + Send + Sync>,
    signal: &dyn Fn(&layout::Device) -> Arc<dyn virtio::transport::Signal>,
    bypass: Bypass,
) -> Result<Option<Remote>, BackendError> {
    let wanted: Vec<&layout::Device> = l.backend_devices().collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    let (Some(pool), Some(pool_fd)) = (&l.pool, pool_fd) else {
        return Err(BackendError::Setup(
            "devices with placement = \"backend\" need a restricted DMA pool (the only memory \
             the backend gets); add a [pool] or set placement = \"in-process\""
                .into(),
        ));
    };
    let launch = Launch {
        layout: l.clone(),
        exe: exe.to_owned(),
        config: config.map(Path::to_owned),
        pool: (pool.base, pool.size),
        pool_fd: pool_fd.try_clone()?,
        bypass,
        events,
        hosts: hostio::hostends::HostEnds::open(l)?,
        msix_on: Arc::default(),
    };
    let started = launch.start()?;
    let pool_mem = crate::memory::pool_memory(pool.base, pool.size, pool_fd)?;
    let mut functions: Vec<(DevFn, Box<dyn PciFunction>)> = Vec::new();
    let mut kept = Vec::new();
    let mut stdio_console = None;
    for d in &wanted {
        let slot = d.slot as u8;
        let Some(r) = started.regs.iter().find(|r| r.dev == slot) else {
            continue; // checked above
        };
        if matches!(
            d.kind,
            layout::DeviceKind::VirtioConsole {
                backend: layout::ConsoleBackend::Stdio
            }
        ) && stdio_console.is_none()
        {
            stdio_console = Some(slot);
        }
        let bar = d.bars.first().map_or(0, |b| b.base);
        let link = rpc::Link::new(started.proxy.clone());
        let inner = RemoteFunction::new(link.clone(), r, bar);
        let Some((ty, queues)) = devices::virtio_shape(&d.kind) else {
            functions.push((devfn(slot, 0), Box::new(inner)));
            continue;
        };
        let shadow =
            virtio::shadow::Shadow::new(ty, &queues, pool_mem.clone(), bar, d.intx_pin as u8);
        let reaper = matches!(d.kind, layout::DeviceKind::VirtioBlk { .. })
            .then(|| Reaper::new(slot, pool_mem.clone(), signal(d)));
        let notify = devices::notify_writes(&d.kind).unwrap_or_default();
        let routes = launch.bypass.msi.clone();
        let k = Kept::new(
            slot,
            link,
            shadow,
            reaper,
            notify,
            routes,
            launch.msix_on.clone(),
        );
        kept.push(k.clone());
        functions.push((devfn(slot, 0), Box::new(Watched { inner, kept: k })));
    }
    started.proxy.start_devices();
    let current = Arc::new(Current {
        child: Mutex::new(started.child),
        sock: Mutex::new(started.sock.try_clone().ok()),
        proxy: rpc::Link::new(started.proxy),
        stopping: AtomicBool::new(false),
    });
    let watch = Watch {
        launch,
        kept,
        current: current.clone(),
        restarts: l.rpc_restarts,
    };
    let sock = started.sock;
    std::thread::Builder::new()
        .name("backend-watch".into())
        .spawn(move || watch.run(sock))?;
    Ok(Some(Remote {
        functions,
        stdio_console,
        current,
    }))
}

/// Watches the backend process, and starts another one when it dies.
struct Watch {
    launch: Launch,
    kept: Vec<Arc<Kept>>,
    current: Arc<Current>,
    restarts: u32,
}

/// Between a backend's death and its successor's start: time for the guest to see its I/O
/// errors, and a bound on how fast a backend that dies at once can be restarted.
const RESTART_DELAY: Duration = Duration::from_millis(500);

impl Watch {
    fn run(mut self, mut sock: OwnedFd) {
        loop {
            // The backend's end of the setup socket closes when it dies, however it dies.
            let mut b = [0u8; 1];
            // SAFETY: a blocking recv into a local on our socket; 0 means the peer is gone.
            while unsafe { libc::recv(sock.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0) } > 0 {}
            if self.current.stopping.load(Ordering::Acquire) {
                return;
            }
            let who = match lock(&self.current.child).take() {
                Some(mut c) => {
                    let _ = c.wait();
                    format!("process (pid {})", c.id())
                }
                None => "connection".to_owned(),
            };
            self.current
                .proxy
                .get()
                .fail(&format!("the backend {who} ended"));
            for k in &self.kept {
                k.reap();
            }
            // A start that fails costs a restart too: a backend that comes up slowly (a
            // device VM still booting) is waited for again, as often as restarts allow.
            let started = loop {
                if self.restarts == 0 {
                    log::error!("the backend is not restarted: its devices fail from now on");
                    return;
                }
                self.restarts -= 1;
                std::thread::sleep(RESTART_DELAY);
                if self.current.stopping.load(Ordering::Acquire) {
                    return;
                }
                match self.launch.start() {
                    Ok(s) => break s,
                    Err(e) => log::warn!(
                        "cannot restart the backend ({e}); {} restart(s) left",
                        self.restarts
                    ),
                }
            };
            started.proxy.start_devices();
            for k in &self.kept {
                k.reattach(&started.proxy);
            }
            let who = started
                .child
                .as_ref()
                .map_or("reached again".to_owned(), |c| {
                    format!("restarted (pid {})", c.id())
                });
            *lock(&self.current.child) = started.child;
            *lock(&self.current.sock) = started.sock.try_clone().ok();
            self.current.proxy.set(started.proxy);
            if let Some(f) = &self.launch.bypass.reattached {
                f();
            }
            log::warn!(
                "backend {who}; its devices carry on ({} restart(s) left)",
                self.restarts
            );
            sock = started.sock;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registration must match its device whole, not only in its ids and BAR size.
    #[test]
    fn a_registration_is_checked_whole() {
        let l = layout::resolve(&layout::Description::default_vm())
            .unwrap()
            .layout;
        let d = &l.devices[0];
        let bar = d.bars[0];
        let good = Registration {
            dev: d.slot as u8,
            vendor: d.kind.pci_id().0,
            device: d.kind.pci_id().1,
            class: 0,
            revision: 1,
            bar0_size: bar.size,
            bar0_64bit: bar.is_64bit,
            bar0_prefetchable: bar.prefetchable,
            intx_pin: d.intx_pin as u8,
        };
        check_registrations(&[d], std::slice::from_ref(&good)).unwrap();
        for bad in [
            Registration {
                bar0_64bit: !bar.is_64bit,
                ..good
            },
            Registration {
                bar0_prefetchable: !bar.prefetchable,
                ..good
            },
            Registration {
                intx_pin: good.intx_pin % 4 + 1,
                ..good
            },
            Registration {
                bar0_size: bar.size * 2,
                ..good
            },
        ] {
            let e = check_registrations(&[d], &[bad]).unwrap_err().to_string();
            assert!(e.contains("the description has a"), "{e}");
        }
    }

    /// A device VM's registration is waited for only while its splitvirt holds the connection:
    /// its hangup is seen at once, and bytes it sends are no hangup.
    #[test]
    fn a_hangup_is_told_from_a_message() {
        let (ours, theirs) = rpc::setup::socketpair().unwrap();
        assert!(!hung_up(&ours));
        // SAFETY: a one-byte send from a local on our socket.
        assert_eq!(
            unsafe { libc::send(theirs.as_raw_fd(), b"x".as_ptr().cast(), 1, 0) },
            1
        );
        assert!(!hung_up(&ours));
        drop(theirs);
        // Another test's fork may hold a copy of `theirs` until its exec: wait for the hangup
        // itself rather than assume it came with the close.
        let mut p = libc::pollfd {
            fd: ours.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll on one pollfd of ours.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 60_000) }, 1);
        assert!(hung_up(&ours));
    }

    /// The backend is signalled through a pidfd: after it has been reaped (its pid free for
    /// any new process), the signal reaches nobody.
    #[test]
    fn a_reaped_backend_cannot_be_signalled_by_its_pidfd() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        kill_by_pidfd(&fd).unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        let e = kill_by_pidfd(&fd).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
    }
}
