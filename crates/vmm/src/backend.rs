//! Device models in a separate process (docs/RPC.md). `start` (VMM side) runs
//! `splitvirt backend`, hands it the pool memfd, the control region and two doorbells over a
//! socket, and returns proxy functions for the ECAM. `serve` (backend side) maps the pool, builds
//! the description's backend devices exactly as the VMM would build in-process ones, registers
//! them and serves the proxy's requests. The backend never receives the RAM memfd: the pool is
//! all of the guest it can reach.

use crate::devices;
use crate::reaper::{Guarded, Reaper};
use layout::{Layout, Placement};
use pci::ecam::{devfn, DevFn};
use pci::PciFunction;
use rpc::backend::{Inbox, Kick, Outbox, Wait};
use rpc::setup::MsiFds;
use rpc::{Doorbell, Event, Proxy, Region, Registration, RemoteFunction};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a vCPU waits for a read from the backend before it reads all ones.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the backend may take to open its devices and register them.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(20);

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

/// The description's devices that run in the backend (never a connector: the layout places
/// connectors in-process).
pub fn remote_devices(l: &Layout) -> impl Iterator<Item = &layout::Device> {
    l.devices
        .iter()
        .filter(|d| d.placement == Placement::Backend)
}

/// Eventfds by which the hypervisor and the backend reach each other with splitvirt out of
/// the way (none: everything travels as messages).
#[derive(Default)]
pub struct Bypass<'a> {
    /// Eventfds the hypervisor turns into MSIs (irqfds): the backend's devices raise their
    /// MSIs through them.
    pub msi: Option<&'a MsiFds>,
    /// Per device, an eventfd the hypervisor rings when the guest notifies one of its queues
    /// (ioeventfd): the notification reaches the backend without an exit to splitvirt.
    pub notify: &'a [(u8, std::os::fd::BorrowedFd<'a>)],
}

/// A running backend, as the VMM holds it.
pub struct Remote {
    pub proxy: Arc<Proxy>,
    pub functions: Vec<(DevFn, Box<dyn PciFunction>)>,
    /// The console device whose input comes from splitvirt's stdin, if it is remote.
    pub stdio_console: Option<u8>,
    child: Child,
    _sock: OwnedFd,
    /// Set when splitvirt ends the backend itself (no "backend lost" then).
    stopping: Arc<AtomicBool>,
}

impl Remote {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the backend for `l`'s backend devices (None when there are none). `exe` is the
/// splitvirt binary (`/proc/self/exe` in splitvirt itself).
pub fn start(
    l: &Layout,
    exe: &Path,
    config: Option<&Path>,
    pool_fd: Option<&File>,
    mut events: Box<dyn FnMut(Event) + Send>,
    signal: &dyn Fn(&layout::Device) -> Arc<dyn virtio::transport::Signal>,
    bypass: Bypass,
) -> Result<Option<Remote>, BackendError> {
    let Bypass { msi, notify } = bypass;
    let msi_fds: Vec<_> = msi.map_or(Vec::new(), |m| {
        m.fds.iter().map(|f| f.as_raw_fd()).collect()
    });
    let wanted: Vec<&layout::Device> = remote_devices(l).collect();
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
    let region = Arc::new(Region::create()?);
    let (to_backend, to_proxy, replies) = (Doorbell::new()?, Doorbell::new()?, Doorbell::new()?);
    let (ours, theirs) = rpc::setup::socketpair()?;
    let mut cmd = Command::new(exe);
    // `ps` shows "splitvirt backend ..." rather than the path it was started by.
    std::os::unix::process::CommandExt::arg0(&mut cmd, "splitvirt");
    cmd.arg("backend").arg("--setup-fd").arg("3");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let fd = theirs.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 and prctl.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The backend ends with splitvirt, whatever happens to splitvirt.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| BackendError::Setup(format!("cannot start `splitvirt backend`: {e}")))?;
    drop(theirs);
    rpc::setup::send(
        &ours,
        pool.base,
        pool.size,
        [
            pool_fd.as_raw_fd(),
            region.fd().as_raw_fd(),
            to_backend.fd().as_raw_fd(),
            to_proxy.fd().as_raw_fd(),
            replies.fd().as_raw_fd(),
        ],
        msi.map(|m| (m.doorbell, m.first, msi_fds.as_slice())),
        &notify
            .iter()
            .map(|(dev, fd)| (*dev, fd.as_raw_fd()))
            .collect::<Vec<_>>(),
    )?;
    // A backend that breaks the protocol is ended, so that what follows its death follows.
    let pid = child.id();
    let events = Box::new(move |e: Event| {
        if matches!(e, Event::Dead(_)) {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
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
        l.rpc_poll,
    );
    // The backend's end of the setup socket closes when it dies, however it dies: then its
    // virtio-blk devices fail what they hold.
    let stopping = Arc::new(AtomicBool::new(false));
    let reapers: Arc<std::sync::Mutex<Vec<Arc<Reaper>>>> = Arc::default();
    let (watch, p, stop, r) = (
        ours.try_clone()?,
        proxy.clone(),
        stopping.clone(),
        reapers.clone(),
    );
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: a blocking recv into a local on our socket; 0 means the peer is gone.
        while unsafe { libc::recv(watch.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0) } > 0 {}
        if !stop.load(Ordering::Acquire) {
            p.fail(&format!("the backend process (pid {pid}) ended"));
            for reaper in r.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                reaper.fail_all();
            }
        }
    });
    let pool_mem = crate::memory::pool_memory(pool.base, pool.size, pool_fd)?;
    let mut remote = Remote {
        proxy: proxy.clone(),
        functions: Vec::new(),
        stdio_console: None,
        child,
        _sock: ours,
        stopping,
    };
    let Some(regs) = proxy.registrations(REGISTER_TIMEOUT) else {
        let status = remote.child.try_wait().ok().flatten();
        return Err(BackendError::Setup(match status {
            Some(s) => format!("the backend ended ({s}) before registering its devices"),
            None => format!("the backend registered no devices within {REGISTER_TIMEOUT:?}"),
        }));
    };
    for d in &wanted {
        let slot = d.slot as u8;
        let Some(r) = regs.iter().find(|r| r.dev == slot) else {
            return Err(BackendError::Setup(format!(
                "the backend did not register the {} at slot {slot}",
                d.kind.label()
            )));
        };
        let bar = d.bars.first().copied();
        let expect = (d.kind.pci_id(), bar.map(|b| b.size));
        if ((r.vendor, r.device), Some(r.bar0_size)) != expect {
            return Err(BackendError::Setup(format!(
                "the backend registered {:04x}:{:04x} with a {:#x}-byte BAR at slot {slot}; the \
                 description has a {} there",
                r.vendor,
                r.device,
                r.bar0_size,
                d.kind.label()
            )));
        }
        if matches!(
            d.kind,
            layout::DeviceKind::VirtioConsole {
                backend: layout::ConsoleBackend::Stdio
            }
        ) && remote.stdio_console.is_none()
        {
            remote.stdio_console = Some(slot);
        }
        let f = RemoteFunction::new(proxy.clone(), r, bar.map_or(0, |b| b.base));
        if matches!(d.kind, layout::DeviceKind::VirtioBlk { .. }) {
            let reaper = Reaper::new(slot, proxy.clone(), pool_mem.clone(), signal(d));
            reapers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(reaper.clone());
            let g = Guarded { inner: f, reaper };
            remote.functions.push((devfn(slot, 0), Box::new(g)));
        } else {
            remote.functions.push((devfn(slot, 0), Box::new(f)));
        }
    }
    proxy.start_devices();
    Ok(Some(remote))
}

/// The devices' interrupts, as the backend sends them: an MSI straight to the hypervisor
/// through its eventfd when splitvirt gave one for it, anything else as a message.
struct RemoteSignal {
    out: Arc<Outbox>,
    dev: u8,
    msi: Option<Arc<MsiFds>>,
}

impl virtio::transport::Signal for RemoteSignal {
    fn msi(&self, (addr, data): (u64, u32)) {
        if !self.msi.as_ref().is_some_and(|m| m.raise(addr, data)) {
            self.out.msi(self.dev, addr, data);
        }
    }
    fn intx(&self, level: bool) {
        self.out.intx(self.dev, level);
    }
}

/// A virtio-blk device's journal, kept in the control region for the VMM.
struct RegionJournal {
    region: Arc<Region>,
    dev: u8,
}

impl virtio::blk::Journal for RegionJournal {
    fn reset(&self, next_avail: u16) {
        self.region.journal_reset(self.dev, next_avail);
    }
    fn popped(&self, head: u16, next_avail: u16) {
        self.region.journal_popped(self.dev, head, next_avail);
    }
    fn completed(&self, head: u16) {
        self.region.journal_completed(self.dev, head);
    }
}

/// `splitvirt backend`: the backend process. Returns when the VMM goes away.
pub fn serve(l: &Layout, setup_fd: OwnedFd) -> Result<(), BackendError> {
    let s = rpc::setup::recv(&setup_fd)?;
    let Some(pool) = &l.pool else {
        return Err(BackendError::Setup("the description has no pool".into()));
    };
    if (s.pool_base, s.pool_size) != (pool.base, pool.size) {
        return Err(BackendError::Setup(format!(
            "offered a pool at {:#x}+{:#x}, the description says {:#x}+{:#x}",
            s.pool_base, s.pool_size, pool.base, pool.size
        )));
    }
    let pool_file = File::from(s.pool);
    let mem = crate::memory::pool_memory(pool.base, pool.size, &pool_file)?;
    drop(pool_file);
    let region = Arc::new(Region::open(s.control)?);
    let out = Outbox::new(
        region.clone(),
        Doorbell::from_fd(s.to_proxy),
        Doorbell::from_fd(s.to_proxy_replies),
    );
    let from_proxy = Doorbell::from_fd(s.to_backend);
    let msi = s.msi.map(Arc::new);
    let notify = s.notify;
    let signal = |d: &layout::Device| -> Arc<dyn virtio::transport::Signal> {
        Arc::new(RemoteSignal {
            out: out.clone(),
            dev: d.slot as u8,
            msi: msi.clone(),
        })
    };
    let journal = |d: &layout::Device| -> Option<Arc<dyn virtio::blk::Journal>> {
        Some(Arc::new(RegionJournal {
            region: region.clone(),
            dev: d.slot as u8,
        }))
    };
    // The backend's devices (`build` takes those placed here), built as the VMM builds its own.
    let built = devices::build(
        l,
        mem,
        &signal,
        Box::new(std::io::stdout()),
        Placement::Backend,
        &journal,
    )?;
    for s in &built.skipped {
        out.log(s);
    }
    let mut funcs: Vec<(Registration, Box<dyn PciFunction>)> = Vec::new();
    for (df, mut f) in built.functions {
        let slot = df >> 3;
        let Some(d) = l.devices.iter().find(|d| d.slot == u32::from(slot)) else {
            continue;
        };
        let mut id = [0u8; 12];
        f.config_read(0, &mut id);
        let bar = d.bars.first().copied();
        let reg = Registration {
            dev: slot,
            vendor: u16::from_le_bytes([id[0], id[1]]),
            device: u16::from_le_bytes([id[2], id[3]]),
            revision: id[8],
            class: u32::from_le_bytes([id[9], id[10], id[11], 0]),
            bar0_size: bar.map_or(0, |b| b.size),
            bar0_64bit: bar.is_some_and(|b| b.is_64bit),
            bar0_prefetchable: bar.is_some_and(|b| b.prefetchable),
            intx_pin: d.intx_pin as u8,
        };
        funcs.push((reg, f));
    }
    for start in built.starters {
        start();
    }
    // The VMM closing its end of the setup socket (it ended) ends the backend.
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: a blocking recv into a local; returns at EOF.
        unsafe { libc::recv(setup_fd.as_raw_fd(), b.as_mut_ptr().cast(), 1, 0) };
        std::process::exit(0);
    });
    let console = built.console;
    let mut input = move |_dev: u8, bytes: &[u8]| {
        if let Some(c) = &console {
            let mut f = c.lock().unwrap_or_else(|e| e.into_inner());
            f.with_device(|d| d.queue_input(bytes));
        }
    };
    // Queue notifications the hypervisor catches itself arrive as kicks, replayed as the
    // notify writes they stand for.
    let kicks: Vec<Kick> = notify
        .into_iter()
        .filter_map(|(dev, fd)| {
            let d = l.devices.iter().find(|d| d.slot == u32::from(dev))?;
            Some(Kick {
                dev,
                bell: Doorbell::from_fd(fd),
                writes: devices::notify_writes(&d.kind)?,
            })
        })
        .collect();
    let stop = AtomicBool::new(false);
    let inbox = Inbox {
        region: &region,
        bell: &from_proxy,
        kicks: &kicks,
    };
    let wait = l.rpc_poll.map_or(Wait::Block, Wait::Poll);
    rpc::backend::serve(inbox, &out, &mut funcs, &mut input, &stop, wait)
        .map_err(|e| BackendError::Setup(e.to_string()))
}
